//! The client API (`Wraft` gRPC service): decode, validate, route, act, encode.
//!
//! Every request's token is checked first (when the node runs with auth, see [`crate::auth`]),
//! then the request itself (tenant name, sizes), before anything is forwarded or proposed.
//! A follower serves commands and linearizable reads itself, through raft: it proposes a
//! command (raft-rs sends it to the leader on the peer stream, where the leader restamps it)
//! and answers with its own apply's output; for a read it asks the leader for a ReadIndex and
//! runs the query once it has applied that far. Deploys, deletes, limits and leadership
//! transfers, and commands for a tenant the follower does not know yet, are forwarded over
//! gRPC (with the caller's token, which the leader checks again). Every path answers within a bounded time: no leader within
//! [`LEADER_WAIT`] is a definite `UNAVAILABLE`; a proposal not applied within the request
//! timeout is an indeterminate `DEADLINE_EXCEEDED`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crossbeam_channel::{Sender, TrySendError};
use sha2::{Digest as _, Sha256};
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};
use tracing::Instrument;
use wraft_proto::client::wraft_client::WraftClient;
use wraft_proto::client::wraft_server::{Wraft, WraftServer};
use wraft_proto::client::*;
use wraft_proto::log::{self as wlog, op};

mod membership;
mod pipeline;

use crate::apply::{
    Applied, ApplyInput, DigestTask, ModuleCache, OpOutcome, QueryTask, SharedView,
};
use crate::auth::{Access, Principal};
use crate::error::{with_outcome, Outcome};
use crate::limits::*;
use crate::raft_loop::{Proposal, RaftInput, RaftStatus, Role as RaftRole};
use crate::wasm::{Limits, Runtime};
use crate::Error;

/// How long a request waits for a leader to be elected before it fails.
pub const LEADER_WAIT: Duration = Duration::from_secs(3);
/// Marks a request forwarded by a follower, so the receiver never forwards it again.
const FORWARDED_KEY: &str = "wraft-forwarded";
/// Carries a request's id from the client, across forwarding, into the log entry.
pub const REQUEST_ID_KEY: &str = "wraft-request-id";

/// What the client API needs from the node.
pub struct NodeContext {
    pub id: u64,
    pub cluster_id: u64,
    pub raft: Sender<RaftInput>,
    pub apply: Sender<ApplyInput>,
    pub raft_status: watch::Receiver<RaftStatus>,
    pub view: SharedView,
    /// The address book (replicated; the Raft loop updates it on membership changes).
    pub members: crate::members::SharedMembers,
    /// Where to connect to a member when it differs from its address (`--dial` overrides).
    pub dial: Arc<HashMap<u64, String>>,
    /// A snapshot download in progress, for `Status`.
    pub snapshot_progress: Arc<crate::snapshot::Progress>,
    /// A deliberately broken mode that serves "linearizable" reads from local state, so the
    /// fault tests can show their checker catches stale reads. Never set in production.
    pub stale_reads_as_linearizable: bool,
    /// The leader's read lease (written by the Raft loop).
    pub lease: Arc<crate::raft_loop::Lease>,
    pub runtime: Runtime,
    pub limits: Limits,
    pub modules: ModuleCache,
    pub request_timeout: Duration,
    /// TLS (with this node's own certificate) for forwarding to the leader; `None`: plain text.
    pub tls: Option<tonic::transport::ClientTlsConfig>,
    /// Access control: off, or the cluster auth secret every client token is checked against.
    pub auth: crate::auth::Auth,
    /// Turns true when the node starts stopping: long-lived streams (`Pipeline`) then take no
    /// new calls, answer those in flight and end, so that they do not hold the shutdown.
    pub stopping: watch::Receiver<bool>,
}

tokio::task_local! {
    /// The caller's `authorization` entry, for the RPC the current task serves (set by
    /// `ClientService::traced`), so that every forwarded copy carries it.
    static CALLER_AUTHORIZATION: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>;
}

/// The `Wraft` service. Cloning it is cheap (two shared pointers): a `Pipeline` stream's
/// task holds a clone.
#[derive(Clone)]
pub struct ClientService {
    ctx: Arc<NodeContext>,
    /// One lazily connected channel per leader we forwarded to.
    leaders: Arc<Mutex<HashMap<u64, WraftClient<Channel>>>>,
}

enum Route {
    Local,
    /// This node follows `leader`: it forwards the request, or serves it through raft.
    Forward(u64),
}

impl ClientService {
    pub fn new(ctx: Arc<NodeContext>) -> Self {
        Self {
            ctx,
            leaders: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// The tonic server with deliberate message limits (a module is the largest request).
    pub fn into_server(self) -> WraftServer<Self> {
        WraftServer::new(self)
            .max_decoding_message_size(CLIENT_GRPC_MESSAGE_BYTES)
            .max_encoding_message_size(CLIENT_GRPC_MESSAGE_BYTES)
    }

    /// Decides where a leader-only request runs, waiting a bounded time for an election.
    async fn route(&self, forwarded: bool) -> Result<Route, Error> {
        let deadline = Instant::now() + LEADER_WAIT;
        let mut status = self.ctx.raft_status.clone();
        loop {
            let (role, leader) = {
                let s = status.borrow_and_update();
                (s.role, s.leader)
            };
            if role == RaftRole::Leader && leader == self.ctx.id {
                return Ok(Route::Local);
            }
            if leader != 0 && leader != self.ctx.id {
                if forwarded {
                    return Err(Error::NotLeader { leader });
                }
                return Ok(Route::Forward(leader));
            }
            match tokio::time::timeout_at(deadline, status.changed()).await {
                Ok(Ok(())) => continue,
                Ok(Err(_)) => return Err(Error::ShuttingDown),
                Err(_) => return Err(Error::NoLeader(LEADER_WAIT)),
            }
        }
    }

    fn leader_client(&self, leader: u64) -> Result<WraftClient<Channel>, Error> {
        let addr = self
            .ctx
            .dial
            .get(&leader)
            .cloned()
            .or_else(|| crate::members::addr_of(&self.ctx.members, leader))
            .ok_or_else(|| Error::Internal(format!("leader {leader} has no known address")))?;
        let addr = addr.as_str();
        let mut cache = self
            .leaders
            .lock()
            .map_err(|_| Error::Internal("leader client cache poisoned".into()))?;
        if let Some(c) = cache.get(&leader) {
            return Ok(c.clone());
        }
        let mut endpoint = Endpoint::from_shared(crate::tls::url(addr, self.ctx.tls.is_some()))
            .map_err(|e| Error::Internal(format!("leader {leader} address {addr}: {e}")))?;
        if let Some(tls) = &self.ctx.tls {
            endpoint = endpoint
                .tls_config(tls.clone())
                .map_err(|e| Error::Internal(format!("leader {leader} TLS: {e}")))?;
        }
        let endpoint = endpoint.connect_timeout(Duration::from_secs(1));
        let client = WraftClient::new(
            endpoint.connect_with_connector_lazy(crate::coalesce::CoalescedConnector),
        )
        .max_decoding_message_size(CLIENT_GRPC_MESSAGE_BYTES)
        .max_encoding_message_size(CLIENT_GRPC_MESSAGE_BYTES);
        cache.insert(leader, client.clone());
        Ok(client)
    }

    /// Builds the forwarded request: marked, and bounded by our own timeout plus slack.
    fn forward_request<T>(&self, method: &'static str, body: T, request_id: &str) -> Request<T> {
        crate::metrics::METRICS
            .forwarded
            .with_label_values(&[method])
            .inc();
        let mut req = Request::new(body);
        req.metadata_mut().insert(
            FORWARDED_KEY,
            tonic::metadata::MetadataValue::from_static("1"),
        );
        if let Ok(value) = tonic::metadata::MetadataValue::try_from(request_id) {
            req.metadata_mut().insert(REQUEST_ID_KEY, value);
        }
        // The caller's own token goes along and the leader checks it again. Trusting the
        // forwarding node instead would mean trusting `wraft-forwarded`, which any client can
        // set (and in plain text nothing proves a request comes from a member): it would let
        // any client skip the check. Checking twice costs one HMAC.
        if let Ok(Some(value)) = CALLER_AUTHORIZATION.try_with(Clone::clone) {
            req.metadata_mut()
                .insert(crate::auth::AUTHORIZATION_KEY, value);
        }
        req.set_timeout(self.ctx.request_timeout + Duration::from_secs(1));
        req
    }

    /// Turns a forwarding failure into a status with an outcome. A status from the leader carries
    /// its own; a broken connection is definite only if nothing can have been sent.
    fn forward_failed(&self, leader: u64, status: Status, write: bool) -> Status {
        if Outcome::of_status(&status).is_some() {
            return status;
        }
        let not_sent = status.code() == tonic::Code::Unavailable
            && (status.message().contains("connect") || status.message().contains("refused"));
        let outcome = if !write || not_sent {
            Outcome::Definite
        } else {
            Outcome::Indeterminate
        };
        let addr = crate::members::addr_of(&self.ctx.members, leader).unwrap_or_default();
        with_outcome(
            Error::Forward {
                leader,
                addr,
                message: status.message().to_string(),
                outcome,
            }
            .into(),
            outcome,
        )
    }

    async fn propose(
        &self,
        request_id: &str,
        tenant: String,
        kind: op::Kind,
    ) -> Result<Applied, Error> {
        let (reply, answer) = oneshot::channel();
        let op = wlog::Op {
            id: None,
            tenant,
            kind: Some(kind),
            request_id: request_id.to_string(),
        };
        self.ctx
            .raft
            .try_send(RaftInput::Propose(Proposal { op, reply }))
            .map_err(|e| match e {
                TrySendError::Full(_) => Error::Busy("the raft inbox is full"),
                TrySendError::Disconnected(_) => Error::ShuttingDown,
            })?;
        match tokio::time::timeout(self.ctx.request_timeout, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(Error::Interrupted),
            Err(_) => Err(Error::Timeout(self.ctx.request_timeout)),
        }
    }

    /// Asks the apply stage and waits a bounded time. Reads change nothing, so a timeout here
    /// is definite.
    async fn ask_apply<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, Error>>) -> ApplyInput,
        deadline: Instant,
    ) -> Result<T, Error> {
        let (reply, answer) = oneshot::channel();
        self.ctx
            .apply
            .send(make(reply))
            .map_err(|_| Error::ShuttingDown)?;
        match tokio::time::timeout_at(deadline, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(Error::ShuttingDown),
            Err(_) => Err(Error::ReadTimeout(self.ctx.request_timeout)),
        }
    }

    /// Confirms leadership (ReadIndex) and returns the index a linearizable read waits for.
    async fn read_index(&self, deadline: Instant) -> Result<u64, Error> {
        let started = std::time::Instant::now();
        let result = self.read_index_once(deadline).await;
        crate::metrics::METRICS
            .read_index_seconds
            .with_label_values(&[if result.is_ok() { "ok" } else { "error" }])
            .observe(started.elapsed().as_secs_f64());
        result
    }

    /// The index a lease read waits for: the commit index while the lease holds, else a
    /// ReadIndex round (which renews the lease).
    async fn lease_read_index(&self, deadline: Instant) -> Result<u64, Error> {
        let lease_reads = &crate::metrics::METRICS.lease_reads;
        if let Some(index) = self.ctx.lease.read_index() {
            lease_reads.with_label_values(&["served"]).inc();
            return Ok(index);
        }
        lease_reads.with_label_values(&["fallback"]).inc();
        self.read_index(deadline).await
    }

    async fn read_index_once(&self, deadline: Instant) -> Result<u64, Error> {
        let (reply, answer) = oneshot::channel();
        self.ctx
            .raft
            .try_send(RaftInput::ReadIndex(reply))
            .map_err(|e| match e {
                TrySendError::Full(_) => Error::Busy("the raft inbox is full"),
                TrySendError::Disconnected(_) => Error::ShuttingDown,
            })?;
        match tokio::time::timeout_at(deadline, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(Error::ShuttingDown),
            Err(_) => Err(Error::ReadTimeout(self.ctx.request_timeout)),
        }
    }

    /// The leader's view of its followers; empty if the Raft loop does not answer promptly
    /// (status must answer even when the loop is saturated).
    async fn follower_progress(&self) -> Vec<FollowerProgress> {
        let (reply, answer) = oneshot::channel();
        if self.ctx.raft.try_send(RaftInput::Progress(reply)).is_err() {
            return Vec::new();
        }
        tokio::time::timeout(Duration::from_secs(1), answer)
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default()
    }

    /// `None` if this node does not know the tenant; else whether it takes a new command for
    /// it: not while the tenant's traps have cost this node's apply thread more than their
    /// share, until that is paid back (see `TrapBudget` in `apply/tenant.rs`). One look at
    /// the applied view for both.
    fn commands_taken(&self, tenant: &str) -> Option<Result<(), Error>> {
        let refused_until = {
            let view = self.ctx.view.read().ok()?;
            view.tenants.get(tenant)?.commands_refused_until
        };
        let left = refused_until.map_or(Duration::ZERO, |u| {
            u.saturating_duration_since(std::time::Instant::now())
        });
        if left.is_zero() {
            return Some(Ok(()));
        }
        Some(Err(Error::Paused(format!(
            "tenant `{tenant}`: this node takes no new commands for it for another {} ms: \
             recovering from its traps (a restore of its whole state each) has taken more than \
             its share of the apply thread that every tenant shares; retry later",
            left.as_millis().max(1)
        ))))
    }

    fn tenant_exists(&self, tenant: &str) -> bool {
        self.ctx
            .view
            .read()
            .map(|v| v.tenants.contains_key(tenant))
            .unwrap_or(false)
    }
}

/// The request's id: the client's `wraft-request-id` (kept when it is short and printable),
/// else one drawn here. It goes into the log entry and every log line about the request.
fn request_id_of<T>(req: &Request<T>) -> String {
    req.metadata()
        .get(REQUEST_ID_KEY)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 64)
        .map(str::to_string)
        .unwrap_or_else(|| format!("{:016x}", rand::random::<u64>()))
}

/// Makes sure the request carries an id (drawn here when the client sent none), so the
/// handler, its span and any forwarded copy share it.
fn ensure_request_id<T>(mut req: Request<T>) -> (Request<T>, String) {
    let id = request_id_of(&req);
    if let Ok(value) = tonic::metadata::MetadataValue::try_from(id.as_str()) {
        req.metadata_mut().insert(REQUEST_ID_KEY, value);
    }
    (req, id)
}

/// What each RPC needs of its caller's token. [`ClientService::traced`] checks it before the
/// handler runs, so no RPC can skip the check: a new RPC does not compile without an impl here.
trait Authorize {
    fn access(&self) -> Access<'_>;
}

impl Authorize for DeployRequest {
    /// A tenant's token may deploy (create or upgrade) that tenant: minting a tenant token is
    /// what grants a tenant its name. Only the admin token deletes it.
    fn access(&self) -> Access<'_> {
        Access::Tenant(&self.tenant)
    }
}

impl Authorize for ExecRequest {
    fn access(&self) -> Access<'_> {
        Access::Tenant(&self.tenant)
    }
}

impl Authorize for QueryRequest {
    fn access(&self) -> Access<'_> {
        Access::Tenant(&self.tenant)
    }
}

impl Authorize for DigestRequest {
    fn access(&self) -> Access<'_> {
        Access::Tenant(&self.tenant)
    }
}

impl Authorize for StatusRequest {
    /// Any valid token; a tenant's token sees only its own tenant in the listing.
    fn access(&self) -> Access<'_> {
        Access::Any
    }
}

impl Authorize for DeleteTenantRequest {
    fn access(&self) -> Access<'_> {
        Access::Admin("deleting a tenant")
    }
}

impl Authorize for SetLimitsRequest {
    fn access(&self) -> Access<'_> {
        Access::Admin("setting a tenant's limits")
    }
}

impl Authorize for TransferLeaderRequest {
    fn access(&self) -> Access<'_> {
        Access::Admin("transferring leadership")
    }
}

impl Authorize for ChangeMembersRequest {
    fn access(&self) -> Access<'_> {
        Access::Admin("changing membership")
    }
}

impl ClientService {
    /// Runs a handler inside a span carrying the request id (the client's, or one drawn here)
    /// and records its count, status code and latency: what every RPC does around its own
    /// work. First of all it checks the caller's token; the handler finds whom it speaks for
    /// in the request's extensions ([`Principal`]).
    async fn traced<Req, Resp, F, Fut>(
        &self,
        method: &'static str,
        request: Request<Req>,
        handler: F,
    ) -> Result<Response<Resp>, Status>
    where
        Req: Authorize,
        F: FnOnce(Request<Req>) -> Fut,
        Fut: std::future::Future<Output = Result<Response<Resp>, Status>>,
    {
        let started = std::time::Instant::now();
        let (mut request, id) = ensure_request_id(request);
        let span = tracing::info_span!("request", method, request_id = %id);
        let authorization = crate::auth::authorization_of(request.metadata());
        let result = async {
            let checked = self
                .ctx
                .auth
                .check(request.metadata(), request.get_ref().access());
            match checked {
                Ok(principal) => {
                    request.extensions_mut().insert(principal);
                    CALLER_AUTHORIZATION
                        .scope(authorization, handler(request))
                        .await
                }
                Err(denied) => {
                    // Debug, not warn: a client with a stale token could flood the log.
                    // Refusals are counted by code in the gRPC metrics.
                    tracing::debug!(%denied, "request refused");
                    Err(denied.into())
                }
            }
        }
        .instrument(span)
        .await;
        crate::metrics::observe_grpc(method, started, &result);
        result
    }
}

fn is_forwarded<T>(req: &Request<T>) -> bool {
    req.metadata().get(FORWARDED_KEY).is_some()
}

fn module_error(kind: module_error::Kind, message: String) -> ModuleError {
    ModuleError {
        kind: kind as i32,
        message,
    }
}

/// The handlers, one per RPC: decode, validate, route, act, encode.
impl ClientService {
    async fn deploy_inner(
        &self,
        request: Request<DeployRequest>,
    ) -> Result<Response<DeployResponse>, Status> {
        let forwarded = is_forwarded(&request);
        let rid = request_id_of(&request);
        let mut req = request.into_inner();
        check_tenant_name(&req.tenant)?;
        check_size("the module", req.wasm.len(), MAX_MODULE_BYTES)?;
        if req.rollback_to_version > 0 && !req.wasm.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "deploy tenant {}: give either a module or a version to roll back to, not both",
                req.tenant
            ))
            .into());
        }
        let tenant = req.tenant.clone();
        match self.route(forwarded).await? {
            Route::Forward(leader) => {
                let mut client = self.leader_client(leader)?;
                return client
                    .deploy(self.forward_request("deploy", req, &rid))
                    .await
                    .map_err(|s| self.forward_failed(leader, s, true));
            }
            Route::Local => {}
        }
        if req.rollback_to_version > 0 {
            // The module the tenant ran as that version, from this (the leader's) storage;
            // from here on a rollback is an ordinary upgrade.
            let deadline = Instant::now() + self.ctx.request_timeout;
            let version = req.rollback_to_version;
            req.wasm = self
                .ask_apply(
                    |reply| {
                        ApplyInput::ModuleOf(crate::apply::ModuleTask {
                            tenant: tenant.clone(),
                            version,
                            reply,
                        })
                    },
                    deadline,
                )
                .await?;
        }
        // Validate before proposing: invalid Wasm never reaches the log. A module compiled
        // before (same bytes, same hash) was validated then: the cache skips the compile.
        let hash: [u8; 32] = Sha256::digest(&req.wasm).into();
        let cached = self
            .ctx
            .modules
            .lock()
            .map(|cache| cache.contains_key(&hash))
            .unwrap_or(false);
        let wasm = if cached {
            req.wasm
        } else {
            let runtime = self.ctx.runtime.clone();
            let limits = self.ctx.limits.clone();
            let wasm = req.wasm;
            let (module, wasm) = tokio::task::spawn_blocking(move || {
                let m = runtime.compile(&wasm, &limits);
                (m, wasm)
            })
            .await
            .map_err(|e| Error::Internal(format!("module validation task failed: {e}")))?;
            let module = module
                .map_err(|e| Error::InvalidArgument(format!("deploy tenant {tenant}: {e}")))?;
            if let Ok(mut cache) = self.ctx.modules.lock() {
                cache.insert(hash, module);
            }
            wasm
        };
        let applied = self
            .propose(
                &rid,
                tenant.clone(),
                op::Kind::Deploy(wlog::Deploy {
                    wasm,
                    module_hash: hash.to_vec(),
                    engine: crate::wasm::ENGINE.to_string(),
                }),
            )
            .await?;
        match applied.outcome {
            OpOutcome::Output(_) => Ok(Response::new(DeployResponse {
                module_hash: hex::encode(hash),
                index: applied.index,
            })),
            OpOutcome::Failed { message, .. } => Err(Error::FailedPrecondition(message).into()),
        }
    }

    async fn exec_inner(
        &self,
        request: Request<ExecRequest>,
    ) -> Result<Response<ExecResponse>, Status> {
        let forwarded = is_forwarded(&request);
        let rid = request_id_of(&request);
        let req = request.into_inner();
        check_tenant_name(&req.tenant)?;
        check_size("the command", req.command.len(), MAX_COMMAND_BYTES)?;
        check_size("the client id", req.client_id.len(), MAX_CLIENT_ID)?;
        let route = self.route(forwarded).await?;
        let taken = match (route, self.commands_taken(&req.tenant)) {
            // A tenant this follower knows: it proposes the command itself (raft-rs carries it
            // to the leader on the peer stream) and answers from its own apply. One it does not
            // know (yet: a deploy it has not applied) goes to the leader, which knows.
            (Route::Forward(_), Some(taken)) | (Route::Local, Some(taken)) => taken,
            (Route::Forward(leader), None) => {
                let mut client = self.leader_client(leader)?;
                return client
                    .exec(self.forward_request("exec", req, &rid))
                    .await
                    .map_err(|s| self.forward_failed(leader, s, true));
            }
            (Route::Local, None) => return Err(Error::UnknownTenant(req.tenant).into()),
        };
        taken?;
        let tenant = req.tenant.clone();
        let applied = self
            .propose(
                &rid,
                req.tenant,
                op::Kind::Command(wlog::Command {
                    payload: req.command,
                    client_id: req.client_id,
                    seq: req.seq,
                }),
            )
            .await?;
        let outcome = match applied.outcome {
            OpOutcome::Output(out) => exec_response::Outcome::Output(out),
            OpOutcome::Failed {
                kind: module_error::Kind::UnknownTenant,
                ..
            } => return Err(Error::UnknownTenant(tenant).into()),
            OpOutcome::Failed { kind, message } => {
                exec_response::Outcome::Error(module_error(kind, message))
            }
        };
        Ok(Response::new(ExecResponse {
            index: applied.index,
            outcome: Some(outcome),
        }))
    }

    async fn query_inner(
        &self,
        request: Request<QueryRequest>,
    ) -> Result<Response<QueryResponse>, Status> {
        let forwarded = is_forwarded(&request);
        let req = request.into_inner();
        check_tenant_name(&req.tenant)?;
        check_size("the query", req.query.len(), MAX_QUERY_BYTES)?;
        let deadline = Instant::now() + self.ctx.request_timeout;
        let min_index = match Consistency::try_from(req.consistency) {
            Ok(Consistency::Stale) => 0,
            Ok(Consistency::Linearizable) if self.ctx.stale_reads_as_linearizable => 0,
            Ok(level @ (Consistency::Linearizable | Consistency::Lease)) => {
                match self.route(forwarded).await? {
                    // A follower reads itself: the leader confirms its leadership and names
                    // its commit index (raft-rs's MsgReadIndex), this node waits until it has
                    // applied that far. The lease is the leader's, so a follower's lease read
                    // is a ReadIndex read (never weaker).
                    Route::Forward(_) => {
                        crate::metrics::METRICS
                            .forwarded
                            .with_label_values(&["read_index"])
                            .inc();
                        self.read_index(deadline).await?
                    }
                    Route::Local if level == Consistency::Lease => {
                        self.lease_read_index(deadline).await?
                    }
                    Route::Local => self.read_index(deadline).await?,
                }
            }
            Err(_) => {
                return Err(Error::InvalidArgument(format!(
                    "unknown consistency level {}",
                    req.consistency
                ))
                .into())
            }
        };
        let applied = self
            .ask_apply(
                |reply| {
                    ApplyInput::Query(QueryTask {
                        tenant: req.tenant,
                        query: req.query,
                        min_index,
                        reply,
                    })
                },
                deadline,
            )
            .await?;
        let outcome = match applied.outcome {
            OpOutcome::Output(out) => query_response::Outcome::Output(out),
            OpOutcome::Failed { kind, message } => {
                query_response::Outcome::Error(module_error(kind, message))
            }
        };
        Ok(Response::new(QueryResponse {
            index: applied.index,
            outcome: Some(outcome),
        }))
    }

    async fn status_inner(
        &self,
        request: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        // Listing every tenant is the admin's; a tenant's token sees its own. Without a
        // principal (cannot happen: `traced` sets it) nothing is listed.
        let principal = request.extensions().get::<Principal>();
        let visible = |name: &str| principal.is_some_and(|p| p.may_see(name));
        let raft = self.ctx.raft_status.borrow().clone();
        let followers = if raft.role == RaftRole::Leader {
            self.follower_progress().await
        } else {
            Vec::new()
        };
        let (applied, tenants) = match self.ctx.view.read() {
            Ok(v) => (
                v.applied,
                v.tenants
                    .iter()
                    .filter(|(name, _)| visible(name))
                    .map(|(name, t)| TenantStatus {
                        name: name.clone(),
                        module_hash: t.module_hash.clone(),
                        applied_index: t.last_index,
                        version: t.version,
                        state_bytes: t.memory_bytes,
                        limits: Some(limits_to_api(&crate::limits::to_stored(&t.limits))),
                        model: match t.model {
                            crate::wasm::Model::Memory => "memory".into(),
                            crate::wasm::Model::Store => "store".into(),
                        },
                        history: t
                            .history
                            .iter()
                            .map(
                                |(version, hash, index)| wraft_proto::client::TenantVersion {
                                    version: *version,
                                    module_hash: hash.clone(),
                                    index: *index,
                                },
                            )
                            .collect(),
                    })
                    .collect(),
            ),
            Err(_) => (0, Vec::new()),
        };
        let mut members: Vec<Member> = raft
            .voters
            .iter()
            .map(|id| (id, true))
            .chain(raft.learners.iter().map(|id| (id, false)))
            .map(|(id, voter)| Member {
                id: *id,
                addr: crate::members::addr_of(&self.ctx.members, *id).unwrap_or_default(),
                voter,
            })
            .collect();
        members.sort_by_key(|m| m.id);
        let role = match raft.role {
            RaftRole::Follower => Role::Follower,
            RaftRole::PreCandidate => Role::PreCandidate,
            RaftRole::Candidate => Role::Candidate,
            RaftRole::Leader => Role::Leader,
            RaftRole::Learner => Role::Learner,
        };
        Ok(Response::new(StatusResponse {
            node_id: self.ctx.id,
            role: role as i32,
            leader_id: raft.leader,
            term: raft.term,
            commit_index: raft.commit,
            applied_index: applied,
            members,
            tenants,
            cluster_id: format!("{:016x}", self.ctx.cluster_id),
            followers,
            snapshot_index: raft.snapshot_index,
            first_index: raft.snapshot_index + 1,
            receiving_snapshot: self
                .ctx
                .snapshot_progress
                .receiving
                .load(std::sync::atomic::Ordering::Relaxed),
            snapshot_bytes_received: self
                .ctx
                .snapshot_progress
                .bytes
                .load(std::sync::atomic::Ordering::Relaxed),
        }))
    }

    async fn delete_tenant_inner(
        &self,
        request: Request<DeleteTenantRequest>,
    ) -> Result<Response<DeleteTenantResponse>, Status> {
        let forwarded = is_forwarded(&request);
        let rid = request_id_of(&request);
        let req = request.into_inner();
        check_tenant_name(&req.tenant)?;
        match self.route(forwarded).await? {
            Route::Forward(leader) => {
                let mut client = self.leader_client(leader)?;
                return client
                    .delete_tenant(self.forward_request("delete_tenant", req, &rid))
                    .await
                    .map_err(|s| self.forward_failed(leader, s, true));
            }
            Route::Local => {}
        }
        if !self.tenant_exists(&req.tenant) {
            return Err(Error::UnknownTenant(req.tenant).into());
        }
        let tenant = req.tenant.clone();
        let applied = self
            .propose(&rid, req.tenant, op::Kind::Delete(wlog::Delete {}))
            .await?;
        match applied.outcome {
            OpOutcome::Output(_) => Ok(Response::new(DeleteTenantResponse {
                index: applied.index,
            })),
            OpOutcome::Failed { .. } => Err(Error::UnknownTenant(tenant).into()),
        }
    }

    async fn set_limits_inner(
        &self,
        request: Request<SetLimitsRequest>,
    ) -> Result<Response<SetLimitsResponse>, Status> {
        let forwarded = is_forwarded(&request);
        let rid = request_id_of(&request);
        let req = request.into_inner();
        check_tenant_name(&req.tenant)?;
        match self.route(forwarded).await? {
            Route::Forward(leader) => {
                let mut client = self.leader_client(leader)?;
                return client
                    .set_limits(self.forward_request("set_limits", req, &rid))
                    .await
                    .map_err(|s| self.forward_failed(leader, s, true));
            }
            Route::Local => {}
        }
        let asked = req.limits.unwrap_or_default();
        let change = wlog::TenantLimits {
            fuel_per_call: asked.fuel_per_call,
            fuel_per_snapshot: asked.fuel_per_snapshot,
            memory_bytes: asked.memory_bytes,
            max_result_bytes: asked.max_result_bytes,
            stack_units: asked.stack_units,
        };
        // Checked here against the limits the tenant has now (a clear error before anything
        // is proposed), and again at apply, where every replica decides alike.
        let current = self
            .ctx
            .view
            .read()
            .ok()
            .and_then(|v| v.tenants.get(&req.tenant).map(|t| t.limits.clone()))
            .ok_or_else(|| Error::UnknownTenant(req.tenant.clone()))?;
        crate::limits::merge_tenant_limits(&current, &change).map_err(|m| {
            Error::InvalidArgument(format!("set limits of tenant {}: {m}", req.tenant))
        })?;
        let applied = self
            .propose(
                &rid,
                req.tenant.clone(),
                op::Kind::SetLimits(wlog::SetLimits {
                    limits: Some(change),
                }),
            )
            .await?;
        match applied.outcome {
            OpOutcome::Output(bytes) => {
                let now = <wlog::TenantLimits as prost::Message>::decode(bytes.as_slice())
                    .map_err(|e| Error::Internal(format!("set limits: undecodable answer: {e}")))?;
                Ok(Response::new(SetLimitsResponse {
                    index: applied.index,
                    limits: Some(limits_to_api(&now)),
                }))
            }
            OpOutcome::Failed { message, .. } => Err(Error::FailedPrecondition(message).into()),
        }
    }

    async fn transfer_leader_inner(
        &self,
        request: Request<TransferLeaderRequest>,
    ) -> Result<Response<TransferLeaderResponse>, Status> {
        let forwarded = is_forwarded(&request);
        let rid = request_id_of(&request);
        let req = request.into_inner();
        match self.route(forwarded).await? {
            Route::Forward(leader) => {
                let mut client = self.leader_client(leader)?;
                return client
                    .transfer_leader(self.forward_request("transfer_leader", req, &rid))
                    .await
                    .map_err(|s| self.forward_failed(leader, s, false));
            }
            Route::Local => {}
        }
        let (reply, answer) = oneshot::channel();
        self.ctx
            .raft
            .try_send(RaftInput::TransferLeader { to: req.to, reply })
            .map_err(|_| Error::Busy("the raft inbox is full"))?;
        let deadline = Instant::now() + self.ctx.request_timeout;
        let target = match tokio::time::timeout_at(deadline, answer).await {
            Ok(Ok(result)) => result?,
            Ok(Err(_)) => return Err(Error::ShuttingDown.into()),
            Err(_) => return Err(Error::ReadTimeout(self.ctx.request_timeout).into()),
        };
        // Answer once the target leads: a client that acts on the answer must find it leading.
        let mut status = self.ctx.raft_status.clone();
        loop {
            let (leader, term) = {
                let s = status.borrow_and_update();
                (s.leader, s.term)
            };
            if leader == target {
                return Ok(Response::new(TransferLeaderResponse { leader, term }));
            }
            match tokio::time::timeout_at(deadline, status.changed()).await {
                Ok(Ok(())) => continue,
                Ok(Err(_)) => return Err(Error::ShuttingDown.into()),
                Err(_) => {
                    return Err(Error::FailedPrecondition(format!(
                        "leadership did not move to node {target} within {:?} (leader now: {leader}); retry",
                        self.ctx.request_timeout
                    ))
                    .into())
                }
            }
        }
    }

    async fn digest_inner(
        &self,
        request: Request<DigestRequest>,
    ) -> Result<Response<DigestResponse>, Status> {
        let req = request.into_inner();
        check_tenant_name(&req.tenant)?;
        let deadline = Instant::now() + self.ctx.request_timeout;
        let tenant = req.tenant.clone();
        let info = self
            .ask_apply(
                |reply| {
                    ApplyInput::Digest(DigestTask {
                        tenant: req.tenant,
                        reply,
                    })
                },
                deadline,
            )
            .await?;
        Ok(Response::new(DigestResponse {
            tenant,
            index: info.index,
            state_hash: info.state_hash,
            module_hash: info.module_hash,
        }))
    }
}

#[tonic::async_trait]
impl Wraft for ClientService {
    async fn deploy(
        &self,
        request: Request<DeployRequest>,
    ) -> Result<Response<DeployResponse>, Status> {
        self.traced("deploy", request, |r| self.deploy_inner(r))
            .await
    }

    async fn exec(&self, request: Request<ExecRequest>) -> Result<Response<ExecResponse>, Status> {
        self.traced("exec", request, |r| self.exec_inner(r)).await
    }

    async fn query(
        &self,
        request: Request<QueryRequest>,
    ) -> Result<Response<QueryResponse>, Status> {
        self.traced("query", request, |r| self.query_inner(r)).await
    }

    type PipelineStream = pipeline::PipelineStream;

    async fn pipeline(
        &self,
        request: Request<tonic::Streaming<PipelineRequest>>,
    ) -> Result<Response<Self::PipelineStream>, Status> {
        self.pipeline_inner(request).await
    }

    async fn status(
        &self,
        request: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        self.traced("status", request, |r| self.status_inner(r))
            .await
    }

    async fn digest(
        &self,
        request: Request<DigestRequest>,
    ) -> Result<Response<DigestResponse>, Status> {
        self.traced("digest", request, |r| self.digest_inner(r))
            .await
    }

    async fn transfer_leader(
        &self,
        request: Request<TransferLeaderRequest>,
    ) -> Result<Response<TransferLeaderResponse>, Status> {
        self.traced("transfer_leader", request, |r| {
            self.transfer_leader_inner(r)
        })
        .await
    }

    async fn delete_tenant(
        &self,
        request: Request<DeleteTenantRequest>,
    ) -> Result<Response<DeleteTenantResponse>, Status> {
        self.traced("delete_tenant", request, |r| self.delete_tenant_inner(r))
            .await
    }

    async fn set_limits(
        &self,
        request: Request<SetLimitsRequest>,
    ) -> Result<Response<SetLimitsResponse>, Status> {
        self.traced("set_limits", request, |r| self.set_limits_inner(r))
            .await
    }

    async fn change_members(
        &self,
        request: Request<ChangeMembersRequest>,
    ) -> Result<Response<ChangeMembersResponse>, Status> {
        self.traced("change_members", request, |r| self.change_members_inner(r))
            .await
    }
}

/// A cluster id derived from the initial membership, so that two clusters started from
/// different `--peers` never accept each other's traffic.
pub fn derive_cluster_id(peers: &std::collections::BTreeMap<u64, String>) -> u64 {
    let canonical: Vec<String> = peers
        .iter()
        .map(|(id, addr)| format!("{id}={addr}"))
        .collect();
    let digest = Sha256::digest(canonical.join(",").as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first)
}

/// A tenant's limits as the client API shows them.
fn limits_to_api(l: &wlog::TenantLimits) -> wraft_proto::client::Limits {
    wraft_proto::client::Limits {
        fuel_per_call: l.fuel_per_call,
        fuel_per_snapshot: l.fuel_per_snapshot,
        memory_bytes: l.memory_bytes,
        max_result_bytes: l.max_result_bytes,
        stack_units: l.stack_units,
    }
}
