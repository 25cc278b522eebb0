//! A client for the `Wraft` API that tries a list of endpoints in order, used by the CLI, the
//! benchmarks and the tests.
//!
//! An endpoint that cannot be reached is skipped; once one answers, its answer (success or
//! error) is final: a follower forwards to the leader itself, so trying another node would only
//! risk applying a command twice.

use std::time::Duration;

use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use wraft_proto::client::wraft_client::WraftClient;
use wraft_proto::client::*;

use crate::error::Outcome;
use crate::limits::{
    check_size, CLIENT_GRPC_MESSAGE_BYTES, MAX_COMMAND_BYTES, MAX_MODULE_BYTES, MAX_QUERY_BYTES,
};

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no endpoint answered ({endpoints}): {last}")]
    Unreachable { endpoints: String, last: String },
    #[error("{}", .0.message())]
    Status(tonic::Status),
    /// Refused before sending, with the same limits the node applies.
    #[error("{0}")]
    Invalid(crate::Error),
}

impl ClientError {
    /// Whether the failed call may have been applied. A status from a node says so itself; an
    /// unreachable cluster applied nothing; anything else after a write was sent is unknown.
    pub fn outcome(&self, write: bool) -> Outcome {
        match self {
            ClientError::Unreachable { .. } | ClientError::Invalid(_) => Outcome::Definite,
            ClientError::Status(s) => Outcome::of_status(s).unwrap_or(if write {
                Outcome::Indeterminate
            } else {
                Outcome::Definite
            }),
        }
    }
}

/// A connection to the first endpoint of a list that answers.
pub struct Client {
    endpoints: Vec<String>,
    connect_timeout: Duration,
    request_timeout: Duration,
    /// TLS for every connection (`https://`), or plain text when `None`.
    tls: Option<ClientTlsConfig>,
    /// `Bearer <token>` for every request, for a cluster that requires tokens.
    authorization: Option<MetadataValue<Ascii>>,
}

impl Client {
    /// `endpoints` are `HOST:PORT` (or full `http://` URLs).
    pub fn new(endpoints: Vec<String>) -> Self {
        Self {
            endpoints,
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(15),
            tls: None,
            authorization: None,
        }
    }

    /// Uses TLS (`Some`) or plain text (`None`) for every connection.
    pub fn with_tls(mut self, tls: Option<ClientTlsConfig>) -> Self {
        self.tls = tls;
        self
    }

    /// Sends `token` (from `wraft auth token`) with every request; `None` sends none. A token
    /// that cannot travel as a header value is refused here, before anything is sent.
    pub fn with_token(mut self, token: Option<&str>) -> Result<Self, String> {
        self.authorization = token.map(crate::auth::bearer).transpose()?;
        Ok(self)
    }

    /// Connects to one endpoint in plain text (or as its `https://` URL says).
    pub async fn connect_one(
        endpoint: &str,
        connect_timeout: Duration,
    ) -> Result<WraftClient<Channel>, String> {
        Self::connect_one_tls(endpoint, connect_timeout, None).await
    }

    /// Connects to one endpoint, with TLS when `tls` is given.
    pub async fn connect_one_tls(
        endpoint: &str,
        connect_timeout: Duration,
        tls: Option<&ClientTlsConfig>,
    ) -> Result<WraftClient<Channel>, String> {
        let url = crate::tls::url(endpoint, tls.is_some());
        let mut builder = Endpoint::from_shared(url).map_err(|e| format!("{endpoint}: {e}"))?;
        if let Some(tls) = tls {
            builder = builder
                .tls_config(tls.clone())
                .map_err(|e| format!("{endpoint}: TLS: {}", error_chain(&e)))?;
        }
        let channel = builder
            .connect_timeout(connect_timeout)
            .connect_with_connector(crate::coalesce::CoalescedConnector)
            .await
            .map_err(|e| {
                // A plain-text client gets no useful answer from a TLS node (nor the reverse):
                // say what to check rather than only "connection reset".
                let hint = if tls.is_some() {
                    ""
                } else {
                    " (if the node serves TLS, pass --ca)"
                };
                format!("{endpoint}: {}{hint}", error_chain(&e))
            })?;
        Ok(WraftClient::new(channel)
            .max_decoding_message_size(CLIENT_GRPC_MESSAGE_BYTES)
            .max_encoding_message_size(CLIENT_GRPC_MESSAGE_BYTES))
    }

    async fn connect(&self) -> Result<WraftClient<Channel>, ClientError> {
        let mut last = String::from("no endpoints given");
        for endpoint in &self.endpoints {
            match Self::connect_one_tls(endpoint, self.connect_timeout, self.tls.as_ref()).await {
                Ok(c) => return Ok(c),
                Err(e) => last = e,
            }
        }
        Err(ClientError::Unreachable {
            endpoints: self.endpoints.join(","),
            last,
        })
    }

    /// A failed call's status. A plain-text client talking to a TLS node sees only an HTTP/2
    /// protocol error (the node answered with a TLS alert), so that case gets a hint.
    fn status_error(&self, status: tonic::Status) -> ClientError {
        // A plain-text client talking to a TLS node sees the connection fail in several ways
        // (an h2 protocol error, a cancelled call), never with a wraft node's own answer, which
        // always carries `wraft-outcome`.
        let plain_to_tls = self.tls.is_none()
            && Outcome::of_status(&status).is_none()
            && matches!(
                status.code(),
                tonic::Code::Internal | tonic::Code::Cancelled | tonic::Code::Unknown
            );
        if !plain_to_tls {
            return ClientError::Status(status);
        }
        let message = format!(
            "{} (a connection error: if the node serves TLS, pass --ca, and --cert/--key if it requires client certificates)",
            status.message()
        );
        ClientError::Status(tonic::Status::with_metadata(
            status.code(),
            message,
            status.metadata().clone(),
        ))
    }

    fn request<T>(&self, body: T) -> tonic::Request<T> {
        self.request_with_timeout(body, self.request_timeout)
    }

    /// A request with this client's token, if it has one.
    fn request_with_timeout<T>(&self, body: T, timeout: Duration) -> tonic::Request<T> {
        let mut req = tonic::Request::new(body);
        req.set_timeout(timeout);
        if let Some(value) = &self.authorization {
            req.metadata_mut()
                .insert(crate::auth::AUTHORIZATION_KEY, value.clone());
        }
        req
    }

    pub async fn deploy(&self, tenant: &str, wasm: Vec<u8>) -> Result<DeployResponse, ClientError> {
        check_size("the module", wasm.len(), MAX_MODULE_BYTES).map_err(ClientError::Invalid)?;
        let mut c = self.connect().await?;
        let req = self.request(DeployRequest {
            tenant: tenant.into(),
            wasm,
            rollback_to_version: 0,
        });
        c.deploy(req)
            .await
            .map(|r| r.into_inner())
            .map_err(|s| self.status_error(s))
    }

    /// Deploys again the module `tenant` ran as `version`, as its newest version.
    pub async fn rollback(
        &self,
        tenant: &str,
        version: u64,
    ) -> Result<DeployResponse, ClientError> {
        let mut c = self.connect().await?;
        let req = self.request(DeployRequest {
            tenant: tenant.into(),
            wasm: Vec::new(),
            rollback_to_version: version,
        });
        c.deploy(req)
            .await
            .map(|r| r.into_inner())
            .map_err(|s| self.status_error(s))
    }

    pub async fn exec(
        &self,
        tenant: &str,
        command: Vec<u8>,
        session: Option<(String, u64)>,
    ) -> Result<ExecResponse, ClientError> {
        check_size("the command", command.len(), MAX_COMMAND_BYTES)
            .map_err(ClientError::Invalid)?;
        let mut c = self.connect().await?;
        let (client_id, seq) = session.unwrap_or_default();
        let req = self.request(ExecRequest {
            tenant: tenant.into(),
            command,
            client_id,
            seq,
        });
        c.exec(req)
            .await
            .map(|r| r.into_inner())
            .map_err(|s| self.status_error(s))
    }

    /// Opens a `Pipeline` stream on the first endpoint that answers: the calls `calls` yields go
    /// out as it yields them, and their answers come back on the returned stream as they finish
    /// (matched by id). The stream carries the token but no deadline (a gRPC deadline would
    /// end the whole stream): the node bounds each call, and the caller bounds its own wait.
    pub async fn pipeline(
        &self,
        calls: impl tokio_stream::Stream<Item = PipelineRequest> + Send + 'static,
    ) -> Result<tonic::Streaming<PipelineResponse>, ClientError> {
        let mut c = self.connect().await?;
        let mut req = tonic::Request::new(calls);
        if let Some(value) = &self.authorization {
            req.metadata_mut()
                .insert(crate::auth::AUTHORIZATION_KEY, value.clone());
        }
        c.pipeline(req)
            .await
            .map(|r| r.into_inner())
            .map_err(|s| self.status_error(s))
    }

    /// The time a single call may take ([`Client::pipeline`] callers bound their waits by it).
    pub fn request_timeout(&self) -> Duration {
        self.request_timeout
    }

    /// Removes a tenant on every replica; answers with the log index of the removal.
    pub async fn delete_tenant(&self, tenant: &str) -> Result<DeleteTenantResponse, ClientError> {
        let mut c = self.connect().await?;
        c.delete_tenant(self.request(DeleteTenantRequest {
            tenant: tenant.into(),
        }))
        .await
        .map(|r| r.into_inner())
        .map_err(|s| self.status_error(s))
    }

    /// Sets a tenant's limits (0 keeps a value); answers with the limits now in force.
    pub async fn set_limits(
        &self,
        tenant: &str,
        limits: wraft_proto::client::Limits,
    ) -> Result<SetLimitsResponse, ClientError> {
        let mut c = self.connect().await?;
        c.set_limits(self.request(SetLimitsRequest {
            tenant: tenant.into(),
            limits: Some(limits),
        }))
        .await
        .map(|r| r.into_inner())
        .map_err(|s| self.status_error(s))
    }

    /// Moves leadership (`to` 0: to the most caught-up voter); answers once it has moved.
    pub async fn transfer_leader(&self, to: u64) -> Result<TransferLeaderResponse, ClientError> {
        let mut c = self.connect().await?;
        c.transfer_leader(self.request(TransferLeaderRequest { to }))
            .await
            .map(|r| r.into_inner())
            .map_err(|s| self.status_error(s))
    }

    /// Changes membership (admin); answered once the change has applied on the leader.
    pub async fn change_members(
        &self,
        changes: Vec<MemberChange>,
    ) -> Result<ChangeMembersResponse, ClientError> {
        let mut c = self.connect().await?;
        c.change_members(self.request(ChangeMembersRequest { changes }))
            .await
            .map(|r| r.into_inner())
            .map_err(|s| self.status_error(s))
    }

    /// The status of the first endpoint that answers.
    pub async fn status(&self) -> Result<StatusResponse, ClientError> {
        let mut c = self.connect().await?;
        c.status(self.request(StatusRequest {}))
            .await
            .map(|r| r.into_inner())
            .map_err(|s| self.status_error(s))
    }

    pub async fn query(
        &self,
        tenant: &str,
        query: Vec<u8>,
        consistency: Consistency,
    ) -> Result<QueryResponse, ClientError> {
        check_size("the query", query.len(), MAX_QUERY_BYTES).map_err(ClientError::Invalid)?;
        let mut c = self.connect().await?;
        let req = self.request(QueryRequest {
            tenant: tenant.into(),
            query,
            consistency: consistency as i32,
        });
        c.query(req)
            .await
            .map(|r| r.into_inner())
            .map_err(|s| self.status_error(s))
    }

    /// Status of one specific endpoint (no failover: the caller asked about that node).
    pub async fn status_of(endpoint: &str) -> Result<StatusResponse, ClientError> {
        Self::new(Vec::new()).status_at(endpoint).await
    }

    /// Status of one specific endpoint, with this client's TLS settings.
    pub async fn status_at(&self, endpoint: &str) -> Result<StatusResponse, ClientError> {
        let mut c = Self::connect_one_tls(endpoint, Duration::from_secs(2), self.tls.as_ref())
            .await
            .map_err(|last| ClientError::Unreachable {
                endpoints: endpoint.into(),
                last,
            })?;
        let req = self.request_with_timeout(StatusRequest {}, Duration::from_secs(5));
        c.status(req)
            .await
            .map(|r| r.into_inner())
            .map_err(|s| self.status_error(s))
    }

    /// Digest of a tenant on one specific endpoint.
    pub async fn digest_of(endpoint: &str, tenant: &str) -> Result<DigestResponse, ClientError> {
        Self::new(Vec::new()).digest_at(endpoint, tenant).await
    }

    /// Digest of a tenant on one specific endpoint, with this client's TLS settings.
    pub async fn digest_at(
        &self,
        endpoint: &str,
        tenant: &str,
    ) -> Result<DigestResponse, ClientError> {
        let mut c = Self::connect_one_tls(endpoint, Duration::from_secs(2), self.tls.as_ref())
            .await
            .map_err(|last| ClientError::Unreachable {
                endpoints: endpoint.into(),
                last,
            })?;
        let req = self.request_with_timeout(
            DigestRequest {
                tenant: tenant.into(),
            },
            Duration::from_secs(15),
        );
        c.digest(req)
            .await
            .map(|r| r.into_inner())
            .map_err(|s| self.status_error(s))
    }
}

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
