//! A wraft node: opens storage, starts the apply stage and the Raft loop on threads of their
//! own, and serves the client API and peer traffic on one gRPC port until told to stop.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use anyhow::{bail, Context};
use raft::RawNode;
use tokio::sync::watch;

use crate::apply::{AppliedView, ApplyStage};
use crate::raft_loop::{RaftInput, RaftLoop, RaftStatus, ELECTION_TICKS, HEARTBEAT_TICKS};
use crate::service::{derive_cluster_id, ClientService, NodeContext};
use crate::storage::{self, NodeIdentity};
use crate::transport::{Membership, PeerService, Transport};
use crate::wasm::{Limits, Runtime};
use wraft_proto::client::{member_change, MemberChange};
use wraft_proto::peer::PeerRecord;

/// Requests queued for the Raft loop before new ones get `RESOURCE_EXHAUSTED`.
const RAFT_INBOX: usize = 65_536;
/// Test-only: set to 1 to break linearizable reads on purpose (see `NodeContext`).
pub const STALE_READS_ENV: &str = "WRAFT_TEST_STALE_LINEARIZABLE_READS";
/// How long past the request timeout a stopping node waits for open requests.
const SHUTDOWN_SLACK: Duration = Duration::from_secs(2);

/// Everything a node is started with.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub id: u64,
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// Initial members: id → HOST:PORT (including this node).
    pub peers: BTreeMap<u64, String>,
    /// Where to connect to a peer when that differs from its address in `peers` (a proxy, NAT).
    /// Membership and the cluster id depend on `peers` only.
    pub dial: BTreeMap<u64, String>,
    pub request_timeout: Duration,
    /// Where to serve Prometheus metrics over HTTP, if anywhere.
    pub metrics_listen: Option<SocketAddr>,
    /// TLS for the port and for dialing peers and the leader (mutual TLS); `None`: plain text.
    pub tls: Option<crate::tls::NodeTls>,
    /// Client access control (tokens); off unless the node was given the cluster auth secret.
    pub auth: crate::auth::Auth,
    /// Members to ask for admission (`--join`): the node registers as a learner of their
    /// cluster instead of starting one from `peers`.
    pub join: Vec<String>,
    /// With `join`: ask to become a voter once caught up.
    pub auto_promote: bool,
    /// The token `join` presents (an admin token when the cluster has auth on).
    pub token: Option<String>,
    /// Compact the log every this many applied entries (0: never).
    pub snapshot_entries: u64,
    /// Bytes of state per snapshot chunk on the wire.
    pub snapshot_chunk_bytes: usize,
}

/// Default for [`NodeConfig::snapshot_entries`].
pub const DEFAULT_SNAPSHOT_ENTRIES: u64 = 20_000;

/// How long a joining node retries while other membership changes are in progress.
const JOIN_PATIENCE: Duration = Duration::from_secs(60);

/// How close to the leader's commit index a learner must be before it asks to become a voter.
const PROMOTE_LAG: u64 = 100;

/// A node that joined as a learner asks to become a voter once it has caught up: its applied
/// index within [`PROMOTE_LAG`] of the commit index it learnt from the leader. Retries until it
/// is a voter; gives up only when the node stops.
async fn auto_promote(
    client: crate::client::Client,
    id: u64,
    mut status: watch::Receiver<RaftStatus>,
    view: crate::apply::SharedView,
) {
    loop {
        let (learner, voter, commit) = {
            let s = status.borrow_and_update();
            (s.learners.contains(&id), s.voters.contains(&id), s.commit)
        };
        if voter {
            return;
        }
        let applied = view.read().map(|v| v.applied).unwrap_or(0);
        if learner && commit > 0 && applied + PROMOTE_LAG >= commit {
            let promote = MemberChange {
                kind: member_change::Kind::Promote as i32,
                id,
                ..Default::default()
            };
            match client.change_members(vec![promote]).await {
                Ok(r) => {
                    tracing::info!(index = r.index, "caught up: promoted to voter");
                    return;
                }
                Err(err) => tracing::info!(%err, "asking to become a voter failed; retrying"),
            }
        }
        let changed = tokio::time::timeout(Duration::from_millis(500), status.changed()).await;
        if matches!(changed, Ok(Err(_))) {
            return;
        }
    }
}

/// Runs a node until `shutdown` resolves or a fatal error stops it.
pub async fn run(
    config: NodeConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    if config.id == 0 {
        bail!("node id must be at least 1");
    }
    let joining = !config.join.is_empty();
    if !joining && !config.peers.contains_key(&config.id) {
        bail!("--peers must include this node's own id {}", config.id);
    }
    let advertise = config
        .peers
        .get(&config.id)
        .cloned()
        .unwrap_or_else(|| config.listen.to_string());
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("create data directory {}", config.data_dir.display()))?;
    let recorded = storage::recorded_identity(&config.data_dir)
        .with_context(|| format!("read data directory {}", config.data_dir.display()))?;
    let join_client = joining.then(|| {
        crate::client::Client::new(config.join.clone())
            .with_tls(config.tls.as_ref().map(|t| t.client.clone()))
            .with_token(config.token.as_deref())
    });
    let join_client = match join_client {
        Some(c) => Some(c.map_err(|e| anyhow::anyhow!("--token: {e}"))?),
        None => None,
    };
    let (cluster_id, voters, join_members) = match (&join_client, recorded) {
        // A node that joined before restarts from its own records (keep --join on its command
        // line: without it, the cluster id derived from --peers would not match and the
        // directory is refused, as a directory of another cluster must be).
        (Some(_), Some(identity)) => (identity.cluster_id, Vec::new(), None),
        (Some(client), None) => {
            let status = client
                .status()
                .await
                .map_err(|e| anyhow::anyhow!("--join: cannot reach the cluster: {e}"))?;
            let cluster_id = u64::from_str_radix(&status.cluster_id, 16)
                .with_context(|| format!("--join: bad cluster id {:?}", status.cluster_id))?;
            if status.members.iter().any(|m| m.id == config.id) {
                bail!(
                    "--join: node id {} is already a member of that cluster; a node that lost its data must join with a new id (remove the old one with `wraft member remove {}`)",
                    config.id, config.id
                );
            }
            (cluster_id, Vec::new(), Some(status.members))
        }
        (None, _) => (
            derive_cluster_id(&config.peers),
            config.peers.keys().copied().collect(),
            None,
        ),
    };
    let (mut raft_storage, state_store) = storage::open(
        &config.data_dir,
        NodeIdentity {
            cluster_id,
            node_id: config.id,
        },
        &voters,
    )
    .with_context(|| format!("open data directory {}", config.data_dir.display()))?;
    let incarnation = raft_storage.incarnation();
    if raft_storage.peers().is_none() {
        // First start: the book comes from --peers, or from the cluster being joined.
        let mut book = crate::members::Book::new();
        let listed: Vec<(u64, String)> = match &join_members {
            Some(members) => members.iter().map(|m| (m.id, m.addr.clone())).collect(),
            None => config.peers.clone().into_iter().collect(),
        };
        for (id, addr) in listed {
            book.insert(
                id,
                PeerRecord {
                    id,
                    addr,
                    incarnation: 0,
                },
            );
        }
        book.insert(
            config.id,
            PeerRecord {
                id: config.id,
                addr: advertise.clone(),
                incarnation,
            },
        );
        raft_storage
            .set_peers(&crate::members::to_proto(&book))
            .context("record the address book")?;
    }
    // The identity is recorded before the cluster is asked to add this node. If the answer
    // never came (refused, or the process died first), a restart would take the recorded
    // identity for a completed join and wait forever as a non-member: so a joining node that
    // has heard nothing from any leader yet (term 0, empty log) asks whether it is a member,
    // and asks to be added if not.
    let mut ask_to_join = join_members.is_some();
    if let (Some(client), false) = (&join_client, ask_to_join) {
        let pristine = raft_storage.hard_state().term == 0
            && raft_storage.snapshot_index() == 0
            && raft::Storage::last_index(&raft_storage).unwrap_or(0) == 0;
        if pristine {
            let status = client.status().await.map_err(|e| {
                anyhow::anyhow!("--join: this node never heard from the cluster, and cannot reach it to check its membership: {e}")
            })?;
            ask_to_join = !status.members.iter().any(|m| m.id == config.id);
            if ask_to_join {
                tracing::info!("an earlier start never completed its join; asking again");
            }
        }
    }
    if let (Some(client), true) = (&join_client, ask_to_join) {
        crate::crashpoint::hit("join-asking");
        // Another node may be joining at the same moment: raft takes one membership change
        // at a time, so a busy answer is retried for a while.
        let change = MemberChange {
            kind: member_change::Kind::AddLearner as i32,
            id: config.id,
            addr: advertise.clone(),
            incarnation,
        };
        let deadline = tokio::time::Instant::now() + JOIN_PATIENCE;
        let added = loop {
            match client.change_members(vec![change.clone()]).await {
                Ok(added) => break added,
                Err(crate::client::ClientError::Status(s))
                    if s.message().contains("in progress")
                        && tokio::time::Instant::now() < deadline =>
                {
                    tracing::info!("another membership change is in progress; retrying the join");
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
                Err(e) => bail!("--join: the cluster refused to add this node: {e}"),
            }
        };
        tracing::info!(index = added.index, "joined the cluster as a learner");
    }
    let members: crate::members::SharedMembers = Arc::new(RwLock::new(
        raft_storage
            .peers()
            .map(crate::members::from_proto)
            .unwrap_or_default(),
    ));

    // Compiled modules outlive the process: a restarted node loads instead of compiling.
    let runtime = Runtime::with_cache_dir(config.data_dir.join("module-cache"))
        .context("start the wasm runtime")?;
    crate::metrics::watch_wasm_runtime(&runtime);
    let limits = Limits::default();
    let view = Arc::new(RwLock::new(AppliedView::default()));
    let modules = Arc::new(Mutex::new(HashMap::new()));
    let (mut stage, replay_from) = ApplyStage::open(
        runtime.clone(),
        limits.clone(),
        state_store,
        modules.clone(),
        view.clone(),
    )
    .context("load tenants")?;

    let hard_state = raft_storage.hard_state();
    let raft_config = raft::Config {
        id: config.id,
        election_tick: ELECTION_TICKS,
        heartbeat_tick: HEARTBEAT_TICKS,
        // Raft must deliver again what the tenants' checkpoints do not cover; it cannot be
        // asked to start past its own commit index, nor before the compaction point.
        applied: ApplyStage::start_index(replay_from, raft_storage.snapshot_index())
            .min(hard_state.commit.max(raft_storage.snapshot_index())),
        max_size_per_msg: 1 << 20,
        // Appends in flight per follower. A follower in step needs a few (one per Ready while
        // the previous ones are acknowledged); a new node being caught up takes all it is
        // allowed, and the Raft thread reads each from RocksDB: 256 of up to 1 MiB stalled the
        // thread past an election timeout (BENCHMARKS.md, catch-up). 32 MiB per burst does not.
        max_inflight_msgs: 32,
        check_quorum: true,
        pre_vote: true,
        ..Default::default()
    };
    raft_config.validate().context("raft configuration")?;
    let logger = crate::logging::raft_logger();
    let state_store = stage.store();
    let raw = RawNode::new(&raft_config, raft_storage, &logger).context("start raft")?;

    let (raft_tx, raft_rx) = crossbeam_channel::bounded(RAFT_INBOX);
    let (apply_tx, apply_rx) = crossbeam_channel::unbounded();
    let (status_tx, status_rx) = watch::channel(RaftStatus::default());
    let dial: Arc<HashMap<u64, String>> = Arc::new(config.dial.clone().into_iter().collect());
    let peer_tls = config.tls.as_ref().map(|t| t.client.clone());
    let transport = Transport::new(
        cluster_id,
        config.id,
        incarnation,
        raft_tx.clone(),
        peer_tls.clone(),
        dial.clone(),
    );
    if let Ok(book) = members.read() {
        transport.set_peers(&book.iter().map(|(id, r)| (*id, r.addr.clone())).collect());
    }
    let compacted = Arc::new(AtomicU64::new(0));
    let generation = Arc::new(AtomicU64::new(0));
    stage.compact_every(
        config.snapshot_entries,
        raw.store().snapshot_index(),
        raft_tx.clone(),
    );
    let snapshots = crate::snapshot::Receiver::new(
        cluster_id,
        config.id,
        state_store.clone(),
        members.clone(),
        dial.clone(),
        peer_tls,
        raft_tx.clone(),
        generation.clone(),
    );
    let stale_reads = std::env::var_os(STALE_READS_ENV).is_some_and(|v| v == "1");
    if stale_reads {
        tracing::warn!("{STALE_READS_ENV}=1: linearizable reads are served from local state WITHOUT ReadIndex; for testing the checker only");
    }

    let applied = stage.applied_index();
    let apply_thread = std::thread::Builder::new()
        .name("apply".into())
        // Guest calls run here: room for the sandbox's deterministic stack bound plus host
        // frames, so a deep recursion hits that bound, never the thread's end.
        .stack_size(crate::wasm::GUEST_THREAD_STACK_BYTES)
        .spawn(move || stage.run(apply_rx))
        .context("spawn the apply thread")?;
    let (fatal_tx, fatal_rx) = tokio::sync::oneshot::channel::<String>();
    let raft_loop = RaftLoop::new(
        raw,
        raft_rx,
        apply_tx.clone(),
        transport,
        status_tx,
        applied,
        members.clone(),
        compacted.clone(),
        generation,
    );
    let lease = raft_loop.lease();
    let raft_thread = std::thread::Builder::new()
        .name("raft".into())
        .spawn(move || {
            if let Err(err) = raft_loop.run() {
                tracing::error!(%err, "the raft loop stopped");
                let _ = fatal_tx.send(err.to_string());
            }
        })
        .context("spawn the raft thread")?;

    let status_rx_for_promote = status_rx.clone();
    let view_for_promote = view.clone();
    let (stopping_tx, stopping_rx) = watch::channel(false);
    let ctx = Arc::new(NodeContext {
        id: config.id,
        cluster_id,
        raft: raft_tx.clone(),
        apply: apply_tx,
        raft_status: status_rx,
        view,
        members: members.clone(),
        dial,
        snapshot_progress: snapshots.progress.clone(),
        stale_reads_as_linearizable: stale_reads,
        lease,
        runtime,
        limits,
        modules,
        request_timeout: config.request_timeout,
        tls: config.tls.as_ref().map(|t| t.client.clone()),
        auth: config.auth.clone(),
        stopping: stopping_rx.clone(),
    });
    if let (Some(client), true) = (join_client, config.auto_promote) {
        tokio::spawn(auto_promote(
            client,
            config.id,
            status_rx_for_promote,
            view_for_promote,
        ));
    }
    let peer_service = PeerService::new(
        Membership {
            cluster_id,
            self_id: config.id,
            members,
        },
        raft_tx.clone(),
        stopping_rx,
        snapshots,
        state_store,
        config.snapshot_chunk_bytes,
        compacted,
    )
    .require_peer_certificates(config.tls.is_some());
    tracing::info!(id = config.id, listen = %config.listen, cluster = format!("{cluster_id:016x}"), data_dir = %config.data_dir.display(), security = config.tls.as_ref().map_or("plain text: no TLS", |t| t.describe()), auth = config.auth.describe(), "wraft node starting");

    // Metrics get a port of their own so scraping never competes with client or peer traffic.
    let (metrics_stop_tx, metrics_stop_rx) = tokio::sync::oneshot::channel::<()>();
    if let Some(addr) = config.metrics_listen {
        tokio::spawn(async move {
            let stop = async {
                let _ = metrics_stop_rx.await;
            };
            if let Err(err) = crate::metrics::serve(addr, stop).await {
                tracing::error!(%addr, %err, "the metrics endpoint stopped");
            }
        });
    }
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("listen on {}", config.listen))?;
    // Nagle's algorithm with delayed ACKs puts ~40 ms under every small request, and tonic's
    // own nodelay setting does not reach sockets from a listener we pass in: set it per socket.
    let incoming = tokio_stream::StreamExt::map(
        tokio_stream::wrappers::TcpListenerStream::new(listener),
        |conn| {
            if let Ok(stream) = &conn {
                if let Err(err) = stream.set_nodelay(true) {
                    tracing::debug!(%err, "cannot set TCP_NODELAY on an accepted connection");
                }
            }
            conn.map(crate::coalesce::Coalesced::new)
        },
    );
    let (fatal_seen_tx, fatal_seen_rx) = tokio::sync::oneshot::channel::<String>();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    // The order of a stop matters. First the Raft loop is told (a leader hands leadership to a
    // caught-up voter) while peer traffic still flows: cutting peers off first would cost the
    // leader its quorum and strand the writes in flight. The loop ends once leadership has moved
    // (or after a bounded wait); only then do peer streams end and the server drain.
    let raft_stop = raft_tx.clone();
    let stop = async move {
        let mut fatal_rx = fatal_rx;
        let finished = tokio::select! {
            _ = shutdown => {
                tracing::info!("stopping: handing leadership over, then closing");
                let _ = tokio::task::spawn_blocking(move || raft_stop.send(RaftInput::Shutdown).is_ok()).await;
                (&mut fatal_rx).await
            }
            why = &mut fatal_rx => why,
        };
        if let Ok(why) = finished {
            let _ = fatal_seen_tx.send(why);
        }
        tracing::info!("stopping: no new requests; answering those in flight");
        let _ = stopping_tx.send(true);
        let _ = stop_tx.send(());
    };
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = &config.tls {
        builder = builder
            .tls_config(tls.server.clone())
            .context("TLS configuration")?;
    }
    let server = builder
        .tcp_nodelay(true)
        .add_service(ClientService::new(ctx).into_server())
        .add_service(peer_service.into_server())
        .serve_with_incoming_shutdown(incoming, stop);
    tokio::pin!(server);
    // In-flight requests end within their own timeouts; the drain is bounded all the same.
    let served = tokio::select! {
        result = &mut server => result,
        _ = async {
            let _ = stop_rx.await;
            tokio::time::sleep(config.request_timeout + SHUTDOWN_SLACK).await;
        } => {
            tracing::warn!("requests still open after the shutdown grace period; stopping anyway");
            Ok(())
        }
    };

    let _ = metrics_stop_tx.send(());
    // Stop the loop (which stops the apply stage after it), then wait for both threads so that
    // checkpoints are written and RocksDB is closed before the process exits.
    let _ = raft_tx.send(RaftInput::Shutdown);
    let _ = tokio::task::spawn_blocking(move || {
        let _ = raft_thread.join();
        let _ = apply_thread.join();
    })
    .await;
    served.context("serve gRPC")?;
    if let Ok(why) = fatal_seen_rx.await {
        bail!("node stopped: {why}");
    }
    Ok(())
}
