//! Node-to-node raft traffic: the only module that moves raft messages over the network.
//!
//! Sending: one task per peer keeps one long-lived gRPC stream open and writes batches into it.
//! The Raft loop hands messages over without blocking ([`Transport::send`]); a task drains its
//! queue into one batch per write, so order to a peer is kept and a burst costs one write. A
//! broken stream is reported to raft (`report_unreachable`, which stops optimistic pipelining to
//! that peer) and reopened with capped exponential backoff; so is one that stops passing batches
//! on while its connection still answers keepalive pings ([`STREAM_STALL`]). A full queue drops
//! messages: raft retransmits, and a queue that never empties must not grow memory.
//!
//! Receiving ([`PeerService`]): peers are not clients. A stream is accepted only from a member of
//! this cluster, and every message is checked ([`validate`]) before it reaches raft-rs, which
//! panics on some malformed input. With TLS on, a stream must also come with a node certificate
//! from the cluster CA (see [`crate::tls`]), and peers are dialed with this node's own.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crossbeam_channel::Sender as SyncSender;
use protobuf::Message as _;
use raft::eraftpb::{Message, MessageType};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::transport::{ClientTlsConfig, Endpoint};
use tonic::{Request, Response, Status, Streaming};
use wraft_proto::peer::peer_client::PeerClient;
use wraft_proto::peer::peer_server::Peer;
use wraft_proto::peer::{RaftAck, RaftBatch};

use crate::limits::{PEER_BATCH_BYTES, PEER_GRPC_MESSAGE_BYTES};
use crate::metrics::METRICS;
use crate::raft_loop::RaftInput;

/// Messages queued for one peer before new ones are dropped.
const PEER_QUEUE: usize = 8192;
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// How long a peer stream may take every batch handed to it without passing one on before the
/// link gives up on it and reconnects. HTTP/2 keepalive catches a dead connection, but not one
/// that answers pings while its stream never drains (a flow-control window that never
/// reopens): raft would wait on that peer forever with nothing in the log. It also sets the
/// slowest link a full-size batch can cross: `PEER_BATCH_BYTES` (4 MiB) in 10 s is 400 KiB/s.
const STREAM_STALL: Duration = if cfg!(test) {
    Duration::from_millis(300)
} else {
    Duration::from_secs(10)
};

/// A peer's advertised address and its queue.
type Link = (String, mpsc::Sender<Message>);

/// The sending half: a queue per peer, each drained by its own task. Peers come and go with
/// membership ([`Transport::set_peers`], called by the Raft loop).
#[derive(Clone)]
pub struct Transport {
    links: Arc<Mutex<HashMap<u64, Link>>>,
    runtime: tokio::runtime::Handle,
    cluster_id: u64,
    self_id: u64,
    incarnation: u64,
    raft: SyncSender<RaftInput>,
    tls: Option<ClientTlsConfig>,
    /// Where to dial a peer instead of its advertised address (`--dial`: proxies in tests).
    dial: Arc<HashMap<u64, String>>,
    /// When a drop was last logged, per peer and reason ([`DROP_WARN_EVERY`]).
    drop_warned: Arc<Mutex<HashMap<(u64, &'static str), std::time::Instant>>>,
    /// Since when raft has been addressing each peer this node has no address for, and when
    /// it last did.
    unknown_since: Arc<Mutex<HashMap<u64, (std::time::Instant, std::time::Instant)>>>,
}

/// Raft addresses a node it has no address for only briefly after that node's removal (its
/// progress goes with the conf change); past this, the address book and raft disagree, which
/// must show in the log.
const UNKNOWN_PEER_GRACE: Duration = Duration::from_secs(5);

/// How often a peer's dropped messages are logged at warn level: one line per peer and reason
/// in this period, however many are dropped (the metric counts each).
const DROP_WARN_EVERY: Duration = Duration::from_secs(10);

impl Transport {
    /// A transport with no peers yet; must be made on the tokio runtime, whose handle it keeps
    /// so that the Raft thread can start links later. With `tls`, every peer is dialed over
    /// TLS with this node's certificate (mutual TLS).
    pub fn new(
        cluster_id: u64,
        self_id: u64,
        incarnation: u64,
        raft: SyncSender<RaftInput>,
        tls: Option<ClientTlsConfig>,
        dial: Arc<HashMap<u64, String>>,
    ) -> Self {
        Self {
            links: Arc::new(Mutex::new(HashMap::new())),
            runtime: tokio::runtime::Handle::current(),
            cluster_id,
            self_id,
            incarnation,
            raft,
            tls,
            dial,
            drop_warned: Arc::new(Mutex::new(HashMap::new())),
            unknown_since: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// Makes the set of links match `peers` (id → advertised address): starts a link for each
    /// new peer (or one whose address changed) and ends those of peers no longer listed.
    pub fn set_peers(&self, peers: &BTreeMap<u64, String>) {
        let Ok(mut links) = self.links.lock() else {
            return;
        };
        links.retain(|id, (addr, _)| peers.get(id) == Some(addr));
        if let Ok(mut unknown) = self.unknown_since.lock() {
            unknown.retain(|id, _| !peers.contains_key(id));
        }
        for (&id, addr) in peers {
            if id == self.self_id || links.contains_key(&id) {
                continue;
            }
            let (tx, rx) = mpsc::channel(PEER_QUEUE);
            let link = PeerLink {
                cluster_id: self.cluster_id,
                from: self.self_id,
                to: id,
                incarnation: self.incarnation,
                addr: self.dial.get(&id).cloned().unwrap_or_else(|| addr.clone()),
                raft: self.raft.clone(),
                tls: self.tls.clone(),
            };
            self.runtime.spawn(link.run(rx));
            links.insert(id, (addr.clone(), tx));
        }
    }

    /// Queues messages for their peers. Never blocks: the Raft loop calls it.
    pub fn send(&self, messages: Vec<Message>) {
        let Ok(links) = self.links.lock() else {
            return;
        };
        for msg in messages {
            let msg_to = msg.to;
            match links.get(&msg.to) {
                Some((_, queue)) => {
                    if queue.try_send(msg).is_err() {
                        METRICS
                            .peer_messages_dropped
                            .with_label_values(&[to_label(msg_to).as_str(), "queue_full"])
                            .inc();
                        self.warn_drop(
                            msg_to,
                            "its queue is full (the link is stuck or the peer is slow)",
                        );
                    }
                }
                None => self.unknown_peer(msg_to),
            }
        }
    }

    /// A message for a node with no known address is dropped: routine for the last messages to
    /// a node just removed (its link went with it), a fault if it goes on.
    fn unknown_peer(&self, peer: u64) {
        let now = std::time::Instant::now();
        let since = match self.unknown_since.lock() {
            Ok(mut unknown) => {
                let (since, last) = unknown.entry(peer).or_insert((now, now));
                // A pause as long as the grace starts the count again.
                if now.duration_since(*last) >= UNKNOWN_PEER_GRACE {
                    *since = now;
                }
                *last = now;
                *since
            }
            Err(_) => now,
        };
        if now.duration_since(since) < UNKNOWN_PEER_GRACE {
            tracing::debug!(to = peer, "raft addressed a node with no known address");
        } else {
            self.warn_drop(peer, "raft keeps addressing it but it has no known address");
        }
    }

    /// Logs that messages to `peer` are being dropped, at most once per [`DROP_WARN_EVERY`]
    /// per peer and reason: raft tolerates loss, but a peer that hears nothing for long must
    /// show in the log, not only at debug level.
    fn warn_drop(&self, peer: u64, why: &'static str) {
        let now = std::time::Instant::now();
        let Ok(mut warned) = self.drop_warned.lock() else {
            return;
        };
        if let Some(last) = warned.get(&(peer, why)) {
            if now.duration_since(*last) < DROP_WARN_EVERY {
                return;
            }
        }
        warned.insert((peer, why), now);
        tracing::warn!(peer, "dropping raft messages to a peer: {why}");
    }
}

fn to_label(id: u64) -> String {
    id.to_string()
}

/// One peer's sender task.
struct PeerLink {
    cluster_id: u64,
    from: u64,
    to: u64,
    incarnation: u64,
    addr: String,
    raft: SyncSender<RaftInput>,
    tls: Option<ClientTlsConfig>,
}

impl PeerLink {
    async fn run(self, mut queue: mpsc::Receiver<Message>) {
        let mut backoff = BACKOFF_MIN;
        let url = crate::tls::url(&self.addr, self.tls.is_some());
        let endpoint = match Endpoint::from_shared(url).and_then(|e| match &self.tls {
            Some(tls) => e.tls_config(tls.clone()),
            None => Ok(e),
        }) {
            Ok(e) => e
                .connect_timeout(Duration::from_secs(1))
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(5))
                .keep_alive_timeout(Duration::from_secs(5)),
            Err(err) => {
                tracing::error!(peer = self.to, addr = %self.addr, %err, "bad peer address; not sending to it");
                return;
            }
        };
        // The first message of the next batch, kept across a reconnect.
        let mut carry: Option<Message> = None;
        // Whether the last connect failed on a certificate: logged once, not at every retry.
        let mut refused = false;
        loop {
            let first = match carry.take() {
                Some(m) => m,
                None => match queue.recv().await {
                    Some(m) => m,
                    None => return, // the node is shutting down
                },
            };
            let channel = match endpoint.connect().await {
                Ok(c) => c,
                Err(err) => {
                    let why = crate::tls::error_chain(&err);
                    // A peer that is down is routine; a certificate refusal will not heal by
                    // retrying and must be seen (once, not at every retry).
                    let cert_error = self.tls.is_some() && crate::tls::is_certificate_error(&why);
                    if cert_error && !refused {
                        tracing::warn!(peer = self.to, addr = %self.addr, %why, "TLS refused: cannot connect to peer");
                    } else {
                        tracing::debug!(peer = self.to, %why, "cannot connect to peer");
                    }
                    refused = cert_error;
                    self.unreachable();
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    // Drop what queued up meanwhile: raft resends what still matters.
                    while queue.try_recv().is_ok() {}
                    continue;
                }
            };
            METRICS
                .peer_reconnects
                .with_label_values(&[self.to.to_string().as_str()])
                .inc();
            let mut client = PeerClient::new(channel)
                .max_decoding_message_size(PEER_GRPC_MESSAGE_BYTES)
                .max_encoding_message_size(PEER_GRPC_MESSAGE_BYTES);
            let (stream_tx, stream_rx) = mpsc::channel::<RaftBatch>(64);
            let mut call =
                tokio::spawn(async move { client.raft(ReceiverStream::new(stream_rx)).await });
            let mut next = Some(first);
            let broken = loop {
                let msg = match next.take() {
                    Some(m) => m,
                    None => tokio::select! {
                        m = queue.recv() => match m { Some(m) => m, None => return },
                        result = &mut call => {
                            self.log_stream_end(result);
                            break None;
                        }
                    },
                };
                let (batch, leftover) = self.batch(msg, &mut queue);
                // The fast path takes no timer; a full stream is watched for its end and for a
                // stall (see STREAM_STALL).
                let batch = match stream_tx.try_send(batch) {
                    Ok(()) => None,
                    Err(mpsc::error::TrySendError::Full(batch)) => Some(batch),
                    Err(mpsc::error::TrySendError::Closed(_)) => {
                        tracing::info!(peer = self.to, "peer stream closed; reconnecting");
                        break leftover;
                    }
                };
                if let Some(batch) = batch {
                    let sent = tokio::select! {
                        sent = stream_tx.send(batch) => sent.is_ok(),
                        result = &mut call => {
                            self.log_stream_end(result);
                            false
                        }
                        _ = tokio::time::sleep(STREAM_STALL) => {
                            tracing::warn!(
                                peer = self.to,
                                "peer stream passed nothing on for {STREAM_STALL:?}; reconnecting"
                            );
                            false
                        }
                    };
                    if !sent {
                        break leftover;
                    }
                }
                backoff = BACKOFF_MIN;
                next = leftover;
            };
            carry = broken;
            call.abort();
            self.unreachable();
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    fn log_stream_end<T>(&self, result: Result<Result<T, Status>, tokio::task::JoinError>) {
        match result {
            Ok(Err(status)) => tracing::warn!(peer = self.to, %status, "peer closed the stream"),
            Ok(Ok(_)) => tracing::info!(peer = self.to, "peer ended the stream"),
            Err(err) => tracing::warn!(peer = self.to, %err, "peer stream task failed"),
        }
    }

    /// Drains the queue into one batch, up to the batch byte budget. Returns the message that
    /// did not fit, if any.
    fn batch(
        &self,
        first: Message,
        queue: &mut mpsc::Receiver<Message>,
    ) -> (RaftBatch, Option<Message>) {
        let mut messages = Vec::new();
        let mut bytes = 0;
        let mut next = Some(first);
        let mut leftover = None;
        while let Some(msg) = next.take() {
            match msg.write_to_bytes() {
                Ok(encoded) => {
                    if !messages.is_empty() && bytes + encoded.len() > PEER_BATCH_BYTES {
                        leftover = Some(msg);
                        break;
                    }
                    bytes += encoded.len();
                    messages.push(encoded);
                }
                Err(err) => tracing::error!(%err, "cannot encode a raft message"),
            }
            next = queue.try_recv().ok();
        }
        let peer = self.to.to_string();
        METRICS
            .peer_messages_sent
            .with_label_values(&[peer.as_str()])
            .inc_by(messages.len() as u64);
        METRICS
            .peer_bytes_sent
            .with_label_values(&[peer.as_str()])
            .inc_by(bytes as u64);
        let batch = RaftBatch {
            cluster_id: self.cluster_id,
            from: self.from,
            to: self.to,
            messages,
            incarnation: self.incarnation,
        };
        (batch, leftover)
    }

    fn unreachable(&self) {
        let _ = self.raft.try_send(RaftInput::Unreachable(self.to));
    }
}

/// Who this node accepts raft traffic from.
#[derive(Clone)]
pub struct Membership {
    pub cluster_id: u64,
    pub self_id: u64,
    /// The members of the cluster (including this node), with their incarnations.
    pub members: crate::members::SharedMembers,
}

/// The receiving half: the `Peer` gRPC service.
pub struct PeerService {
    membership: Membership,
    raft: SyncSender<RaftInput>,
    /// Downloads the state behind a `MsgSnapshot` before raft sees the message.
    snapshots: Arc<crate::snapshot::Receiver>,
    /// Serves this node's state to followers that received a snapshot from it.
    store: crate::storage::StateStore,
    chunk_bytes: usize,
    /// This node's compaction point: a follower may fetch any snapshot up to it.
    compacted: Arc<std::sync::atomic::AtomicU64>,
    /// Becomes true when the node stops: peer streams never end on their own, and a graceful
    /// server shutdown waits for every open request, so each stream ends itself on this signal.
    stopping: tokio::sync::watch::Receiver<bool>,
    /// With TLS on: a stream must come with a node certificate (see [`crate::tls`]). The TLS
    /// handshake has already checked that any certificate chains to the cluster CA.
    require_cert: bool,
}

impl PeerService {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        membership: Membership,
        raft: SyncSender<RaftInput>,
        stopping: tokio::sync::watch::Receiver<bool>,
        snapshots: Arc<crate::snapshot::Receiver>,
        store: crate::storage::StateStore,
        chunk_bytes: usize,
        compacted: Arc<std::sync::atomic::AtomicU64>,
    ) -> Self {
        Self {
            membership,
            raft,
            snapshots,
            store,
            chunk_bytes,
            compacted,
            stopping,
            require_cert: false,
        }
    }

    /// Refuses streams that do not come with a node certificate (TLS on).
    pub fn require_peer_certificates(mut self, required: bool) -> Self {
        self.require_cert = required;
        self
    }

    /// Checks the connection's certificate, when certificates are required.
    fn authenticate<T>(&self, request: &Request<T>) -> Result<(), Status> {
        if !self.require_cert {
            return Ok(());
        }
        let is_node = request
            .peer_certs()
            .and_then(|certs| certs.first().map(crate::tls::is_peer_certificate))
            .unwrap_or(false);
        if is_node {
            return Ok(());
        }
        let remote = request
            .remote_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|| "an unknown address".into());
        tracing::warn!(%remote, "refused raft traffic: no node certificate from the cluster CA");
        Err(Status::unauthenticated(format!(
            "raft traffic needs a node certificate (one naming `{}`) from the cluster CA",
            crate::tls::PEER_NAME
        )))
    }

    /// The tonic server for this service, with deliberate message limits.
    pub fn into_server(self) -> wraft_proto::peer::peer_server::PeerServer<Self> {
        wraft_proto::peer::peer_server::PeerServer::new(self)
            .max_decoding_message_size(PEER_GRPC_MESSAGE_BYTES)
            .max_encoding_message_size(PEER_GRPC_MESSAGE_BYTES)
    }

    fn admit(&self, batch: &RaftBatch) -> Result<(), Status> {
        let m = &self.membership;
        if batch.cluster_id != m.cluster_id {
            return Err(Status::permission_denied(format!(
                "raft traffic for cluster {:016x} reached a node of cluster {:016x}",
                batch.cluster_id, m.cluster_id
            )));
        }
        if batch.to != m.self_id {
            return Err(Status::permission_denied(format!(
                "raft traffic for node {} reached node {}",
                batch.to, m.self_id
            )));
        }
        let known = m
            .members
            .read()
            .ok()
            .and_then(|book| book.get(&batch.from).map(|r| r.incarnation));
        let Some(known) = known.filter(|_| batch.from != m.self_id) else {
            return Err(Status::permission_denied(format!(
                "node {} is not a member of cluster {:016x}",
                batch.from, m.cluster_id
            )));
        };
        if batch.incarnation == 0 {
            return Err(Status::permission_denied(format!(
                "node {} sent no data-directory incarnation",
                batch.from
            )));
        }
        if known == 0 {
            // First contact with an initial member: remember who it is (the Raft loop records
            // it durably, so a later wiped directory is recognised).
            let _ = self.raft.try_send(RaftInput::LearnIncarnation {
                id: batch.from,
                incarnation: batch.incarnation,
            });
        } else if known != batch.incarnation {
            tracing::warn!(
                node = batch.from,
                "refused a member whose data directory was wiped or replaced"
            );
            return Err(Status::failed_precondition(format!(
                "node {} comes back with a new data directory (incarnation {:016x}, this cluster knows {:016x}): it has lost its log and votes, so it must not rejoin as node {}. Remove it (`wraft member remove {}`) and add it again as a new member with a new id",
                batch.from, batch.incarnation, known, batch.from, batch.from
            )));
        }
        Ok(())
    }

    /// Checks a snapshot download request: from a member of this cluster, for a snapshot this
    /// node can serve.
    fn admit_fetch(&self, req: &wraft_proto::peer::SnapshotRequest) -> Result<(), Status> {
        let m = &self.membership;
        if req.cluster_id != m.cluster_id || req.to != m.self_id {
            return Err(Status::permission_denied(
                "snapshot request for another cluster or node",
            ));
        }
        let member = m
            .members
            .read()
            .map(|book| book.contains_key(&req.from))
            .unwrap_or(false);
        if !member || req.from == m.self_id {
            return Err(Status::permission_denied(format!(
                "node {} is not a member of cluster {:016x}",
                req.from, m.cluster_id
            )));
        }
        let compacted = self.compacted.load(std::sync::atomic::Ordering::Acquire);
        if req.index == 0 || req.index > compacted {
            return Err(Status::failed_precondition(format!(
                "snapshot {} is beyond this node's compaction point {compacted}",
                req.index
            )));
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl Peer for PeerService {
    type FetchSnapshotStream = crate::snapshot::ChunkStream;

    async fn fetch_snapshot(
        &self,
        request: Request<wraft_proto::peer::SnapshotRequest>,
    ) -> Result<Response<Self::FetchSnapshotStream>, Status> {
        self.authenticate(&request)?;
        let req = request.into_inner();
        self.admit_fetch(&req)?;
        tracing::info!(to = req.from, index = req.index, "streaming a snapshot");
        let raft = self.raft.clone();
        let to = req.from;
        let _ = raft.try_send(RaftInput::SnapshotFetching { to });
        Ok(Response::new(crate::snapshot::serve(
            self.store.clone(),
            self.chunk_bytes,
            move |complete| {
                let _ = raft.try_send(RaftInput::SnapshotSent { to, complete });
            },
        )))
    }

    async fn raft(
        &self,
        request: Request<Streaming<RaftBatch>>,
    ) -> Result<Response<RaftAck>, Status> {
        self.authenticate(&request)?;
        let mut stream = request.into_inner();
        let mut stopping = self.stopping.clone();
        loop {
            let batch = tokio::select! {
                next = stream.next() => match next {
                    Some(batch) => batch?,
                    None => break,
                },
                _ = stopping.wait_for(|stop| *stop) => break,
            };
            self.admit(&batch)?;
            for bytes in &batch.messages {
                let msg = Message::parse_from_bytes(bytes).map_err(|err| {
                    Status::invalid_argument(format!(
                        "undecodable raft message from node {}: {err}",
                        batch.from
                    ))
                })?;
                if let Err(why) = validate(&msg, batch.from, self.membership.self_id) {
                    tracing::warn!(from = batch.from, %why, "dropping an invalid raft message");
                    continue;
                }
                METRICS
                    .peer_messages_received
                    .with_label_values(&[batch.from.to_string().as_str()])
                    .inc();
                if msg.get_msg_type() == MessageType::MsgSnapshot {
                    // The state comes separately; raft sees the message once it is on disk.
                    self.snapshots.offer(msg);
                    continue;
                }
                if self.raft.try_send(RaftInput::Peer(msg)).is_err() {
                    // The Raft loop is saturated or stopping: raft tolerates loss.
                    tracing::debug!("raft inbox full; dropping a peer message");
                }
            }
        }
        Ok(Response::new(RaftAck {}))
    }
}

/// Checks a peer's raft message before raft-rs sees it. raft-rs trusts its input: an empty
/// MsgPropose, a MsgReadIndex without entries, a local-only message type or entries out of
/// order can make it panic or corrupt its log.
pub fn validate(msg: &Message, batch_from: u64, self_id: u64) -> Result<(), String> {
    use MessageType::*;
    if msg.from != batch_from {
        return Err(format!(
            "message claims to be from {} inside a batch from {batch_from}",
            msg.from
        ));
    }
    if msg.to != self_id {
        return Err(format!("message to {} delivered to {self_id}", msg.to));
    }
    match msg.get_msg_type() {
        MsgAppend
        | MsgAppendResponse
        | MsgRequestVote
        | MsgRequestVoteResponse
        | MsgRequestPreVote
        | MsgRequestPreVoteResponse
        | MsgHeartbeat
        | MsgHeartbeatResponse
        | MsgTimeoutNow => {}
        MsgSnapshot => validate_snapshot(msg)?,
        // A follower's proposal or read, which raft-rs forwards to the leader. raft-rs sends
        // both without a term (it treats them as local input) and panics on an empty one.
        MsgPropose | MsgReadIndex => {
            if msg.term != 0 {
                return Err(format!("{:?} must not carry a term", msg.get_msg_type()));
            }
            if msg.get_msg_type() == MsgReadIndex && msg.get_entries().len() != 1 {
                return Err("MsgReadIndex must carry exactly one entry (its context)".into());
            }
            if msg.get_entries().is_empty() {
                return Err("MsgPropose must carry entries".into());
            }
            for entry in msg.get_entries() {
                if entry.get_entry_type() != raft::eraftpb::EntryType::EntryNormal
                    || entry.data.is_empty()
                {
                    return Err(format!(
                        "{:?} may carry only non-empty normal entries",
                        msg.get_msg_type()
                    ));
                }
            }
            return Ok(());
        }
        // The leader's answer to a follower's MsgReadIndex: the context comes back.
        MsgReadIndexResp => {
            if msg.get_entries().len() != 1 {
                return Err("MsgReadIndexResp must carry exactly one entry".into());
            }
        }
        // Local messages (MsgHup, MsgBeat, MsgUnreachable, MsgSnapStatus, MsgCheckQuorum) never
        // cross the network.
        other => return Err(format!("message type {other:?} is not accepted from peers")),
    }
    if msg.term == 0 {
        return Err("a peer message must carry a term".into());
    }
    if msg.get_msg_type() == MsgAppend {
        for (expect, entry) in (msg.index + 1..).zip(msg.get_entries()) {
            if entry.index != expect {
                return Err(format!(
                    "append entries out of order: expected index {expect}, found {}",
                    entry.index
                ));
            }
            if entry.term == 0 || entry.term < msg.log_term {
                return Err(format!(
                    "append entry {} has term {} below the message's log term {}",
                    entry.index, entry.term, msg.log_term
                ));
            }
        }
    } else if !msg.get_entries().is_empty() && msg.get_msg_type() != MsgReadIndexResp {
        return Err(format!("{:?} must not carry entries", msg.get_msg_type()));
    }
    Ok(())
}

/// A snapshot message must describe a snapshot raft-rs can restore without tripping its
/// assertions: a real index and term, and a configuration with voters, no id 0, and learners
/// apart from voters.
fn validate_snapshot(msg: &Message) -> Result<(), String> {
    let md = msg.get_snapshot().get_metadata();
    if md.index == 0 || md.term == 0 || md.term > msg.term {
        return Err(format!(
            "snapshot at index {} term {} in a message of term {}",
            md.index, md.term, msg.term
        ));
    }
    let cs = md.get_conf_state();
    if cs.voters.is_empty() {
        return Err("snapshot configuration has no voters".into());
    }
    let all = cs
        .voters
        .iter()
        .chain(&cs.learners)
        .chain(&cs.voters_outgoing)
        .chain(&cs.learners_next);
    if all.clone().any(|id| *id == 0) {
        return Err("snapshot configuration names node 0".into());
    }
    if cs
        .learners
        .iter()
        .any(|l| cs.voters.contains(l) || cs.voters_outgoing.contains(l))
    {
        return Err("snapshot configuration has a learner that is also a voter".into());
    }
    if cs
        .learners_next
        .iter()
        .any(|l| !cs.voters_outgoing.contains(l))
    {
        return Err("snapshot configuration has an incoming learner that was no voter".into());
    }
    crate::storage::decode_descriptor(msg.get_snapshot().get_data()).map_err(|e| e.to_string())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use raft::eraftpb::{Entry, EntryType};

    fn msg(t: MessageType) -> Message {
        let mut m = Message::default();
        m.set_msg_type(t);
        m.from = 2;
        m.to = 1;
        m.term = 3;
        m
    }

    #[test]
    fn accepts_ordinary_traffic() {
        assert!(validate(&msg(MessageType::MsgHeartbeat), 2, 1).is_ok());
        let mut app = msg(MessageType::MsgAppend);
        app.index = 4;
        app.log_term = 2;
        let e5 = Entry {
            index: 5,
            term: 3,
            ..Default::default()
        };
        let mut e6 = e5.clone();
        e6.index = 6;
        app.set_entries(vec![e5, e6].into());
        assert!(validate(&app, 2, 1).is_ok());
    }

    #[test]
    fn refuses_what_could_hurt_raft() {
        assert!(
            validate(&msg(MessageType::MsgPropose), 2, 1).is_err(),
            "empty propose panics raft-rs"
        );
        assert!(validate(&msg(MessageType::MsgReadIndex), 2, 1).is_err());
        assert!(
            validate(&msg(MessageType::MsgHup), 2, 1).is_err(),
            "local message"
        );
        assert!(
            validate(&msg(MessageType::MsgSnapshot), 2, 1).is_err(),
            "snapshot without metadata"
        );
        assert!(
            validate(&msg(MessageType::MsgHeartbeat), 3, 1).is_err(),
            "spoofed sender"
        );
        assert!(
            validate(&msg(MessageType::MsgHeartbeat), 2, 9).is_err(),
            "wrong recipient"
        );
        let mut zero = msg(MessageType::MsgHeartbeat);
        zero.term = 0;
        assert!(validate(&zero, 2, 1).is_err());
        let mut app = msg(MessageType::MsgAppend);
        app.index = 4;
        let e = Entry {
            index: 7,
            term: 3,
            ..Default::default()
        };
        app.set_entries(vec![e].into());
        assert!(validate(&app, 2, 1).is_err(), "gap in appended entries");
    }

    /// A follower's proposal and read, as raft-rs forwards them: no term, non-empty entries.
    #[test]
    fn forwarded_proposals_and_reads_are_checked() {
        let entry = |data: &[u8], kind: EntryType| {
            let mut e = Entry {
                data: data.to_vec().into(),
                ..Default::default()
            };
            e.set_entry_type(kind);
            e
        };
        let mut prop = msg(MessageType::MsgPropose);
        prop.term = 0;
        prop.set_entries(vec![entry(b"ops", EntryType::EntryNormal)].into());
        assert!(validate(&prop, 2, 1).is_ok());
        let mut termed = prop.clone();
        termed.term = 3;
        assert!(validate(&termed, 2, 1).is_err(), "a proposal with a term");
        let mut conf = prop.clone();
        conf.set_entries(vec![entry(b"cc", EntryType::EntryConfChangeV2)].into());
        assert!(validate(&conf, 2, 1).is_err(), "a forwarded conf change");
        let mut blank = prop.clone();
        blank.set_entries(vec![entry(b"", EntryType::EntryNormal)].into());
        assert!(validate(&blank, 2, 1).is_err(), "an empty entry");

        let mut read = msg(MessageType::MsgReadIndex);
        read.term = 0;
        read.set_entries(vec![entry(b"ctx", EntryType::EntryNormal)].into());
        assert!(validate(&read, 2, 1).is_ok());
        let mut two = read.clone();
        two.set_entries(vec![entry(b"a", EntryType::EntryNormal); 2].into());
        assert!(validate(&two, 2, 1).is_err(), "two read contexts");

        let mut resp = msg(MessageType::MsgReadIndexResp);
        assert!(
            validate(&resp, 2, 1).is_err(),
            "a read answer without its context"
        );
        resp.set_entries(vec![entry(b"ctx", EntryType::EntryNormal)].into());
        assert!(validate(&resp, 2, 1).is_ok());
    }

    /// A peer that takes the raft stream and never reads it: its connection stays up and
    /// answers HTTP/2 pings, so keepalive sees nothing wrong.
    struct NeverReads {
        streams: Arc<std::sync::atomic::AtomicUsize>,
    }

    #[tonic::async_trait]
    impl Peer for NeverReads {
        type FetchSnapshotStream = std::pin::Pin<
            Box<
                dyn tokio_stream::Stream<Item = Result<wraft_proto::peer::SnapshotChunk, Status>>
                    + Send,
            >,
        >;

        async fn fetch_snapshot(
            &self,
            _: Request<wraft_proto::peer::SnapshotRequest>,
        ) -> Result<Response<Self::FetchSnapshotStream>, Status> {
            Err(Status::unimplemented("not in this test"))
        }

        async fn raft(
            &self,
            request: Request<Streaming<RaftBatch>>,
        ) -> Result<Response<RaftAck>, Status> {
            self.streams
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let held = request.into_inner();
            let never = std::future::pending().await;
            drop(held);
            never
        }
    }

    /// The link gives up on a stream that stops passing batches on and opens another, rather
    /// than waiting on it forever.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stream_that_stops_draining_is_reopened() {
        use wraft_proto::peer::peer_server::PeerServer;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let streams = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let peer = NeverReads {
            streams: streams.clone(),
        };
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(PeerServer::new(peer))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let (raft_tx, _raft_rx) = crossbeam_channel::bounded(16);
        let transport = Transport::new(7, 1, 1, raft_tx, None, Arc::new(HashMap::new()));
        transport.set_peers(&BTreeMap::from([(2, addr.to_string())]));
        let append = || {
            let mut m = msg(MessageType::MsgAppend);
            m.from = 1;
            m.to = 2;
            m.set_entries(
                vec![Entry {
                    data: vec![7; 64 << 10].into(),
                    ..Default::default()
                }]
                .into(),
            );
            m
        };
        // Keep sending: HTTP/2's windows fill, then the link's stream buffer, then nothing
        // moves while the connection stays healthy.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while streams.load(std::sync::atomic::Ordering::SeqCst) < 2 {
            assert!(
                std::time::Instant::now() < deadline,
                "the link never reopened a stream that stopped draining"
            );
            transport.send((0..8).map(|_| append()).collect());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
