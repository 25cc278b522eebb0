//! Snapshot transfer between nodes, out of band from the raft stream.
//!
//! A raft `MsgSnapshot` carries only the compaction point's metadata and a small descriptor
//! (see `storage::RaftStorage::snapshot`). The follower that receives one does not hand it to
//! raft at once: [`Receiver`] first downloads the sender's state over `FetchSnapshot` into the
//! next storage generation, verifying a SHA-256 over every record, and only then steps the
//! message into raft, whose `Ready` then installs it in one synced write (see `raft_loop`).
//!
//! Memory is bounded on both sides whatever the snapshot's size: the sender reads the state
//! through a RocksDB snapshot and keeps at most [`SEND_AHEAD`] chunks queued; the receiver
//! writes each chunk to disk as it arrives and holds at most one value in assembly (a value is
//! one tenant's checkpoint, so it is bounded by the tenant's memory limit).
//!
//! The state served is the sender's as of the download, not as of the snapshot's index: every
//! tenant checkpoint in it covers at least the compaction point (compaction waits for that), so
//! replaying the entries after the snapshot's index on top of it is exact: ops a checkpoint
//! already covers are skipped, as after a restart.
//!
//! A transfer that breaks is started again from the beginning (a few times, then the leader's
//! stall timer makes raft send a new snapshot).

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crossbeam_channel::Sender as SyncSender;
use raft::eraftpb::Message;
use sha2::{Digest as _, Sha256};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tonic::transport::{ClientTlsConfig, Endpoint};
use tonic::Status;
use wraft_proto::peer::peer_client::PeerClient;
use wraft_proto::peer::{SnapshotChunk, SnapshotRecord, SnapshotRequest};

// The chunk decoder and the checksum are pure and live in the proto crate, so the fuzz targets
// reach them without the node (its unit tests moved with it).
use wraft_proto::chunks::hash_record;
pub use wraft_proto::chunks::{ChunkDecoder, Record};

use crate::limits::PEER_GRPC_MESSAGE_BYTES;
use crate::members::SharedMembers;
use crate::raft_loop::RaftInput;
use crate::storage::StateStore;

/// The server side's chunk stream.
pub type ChunkStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<SnapshotChunk, Status>> + Send + 'static>>;

/// Default bytes of records per chunk (`--snapshot-chunk-bytes`).
pub const DEFAULT_CHUNK_BYTES: usize = 1 << 20;
/// Chunks the sender reads ahead of the network.
const SEND_AHEAD: usize = 4;
/// Attempts at one download before the follower gives up and waits for raft to retry.
const ATTEMPTS: u32 = 3;
/// Bound on one record (a tenant checkpoint: its state is bounded by its memory limit).
const MAX_VALUE_BYTES: usize = 1 << 30;
/// Records written to disk per batch on the receiving side.
const STAGE_BATCH_BYTES: usize = 4 << 20;

/// Streams this node's state, as of now, in chunks of about `chunk_bytes`. Runs the RocksDB
/// read on a blocking thread; a slow or gone receiver stops it (the queue is bounded).
pub fn serve(
    store: StateStore,
    chunk_bytes: usize,
    on_done: impl FnOnce(bool) + Send + 'static,
) -> ChunkStream {
    let (tx, rx) = mpsc::channel::<Result<SnapshotChunk, Status>>(SEND_AHEAD);
    let chunk_bytes = chunk_bytes.max(1);
    tokio::task::spawn_blocking(move || {
        let mut hasher = Sha256::new();
        let mut chunk = SnapshotChunk::default();
        let mut size = 0usize;
        let mut total = 0u64;
        let mut sent_any = false;
        let mut gone = false;
        let send = |chunk: SnapshotChunk| tx.blocking_send(Ok(chunk)).is_ok();
        let read = store.for_each_record(|key, value| {
            hash_record(&mut hasher, key, value);
            total += 1;
            // A value larger than a chunk travels in parts, the key with the first.
            let mut rest = value;
            let mut first = true;
            loop {
                let room = chunk_bytes.saturating_sub(size).max(1);
                let take = rest.len().min(room);
                let (part, tail) = rest.split_at(take);
                chunk.records.push(SnapshotRecord {
                    key: if first { key.to_vec() } else { Vec::new() },
                    value: part.to_vec(),
                    more: !tail.is_empty(),
                });
                size += part.len() + if first { key.len() } else { 0 } + 16;
                first = false;
                rest = tail;
                if size >= chunk_bytes {
                    if !send(std::mem::take(&mut chunk)) {
                        gone = true;
                        return false;
                    }
                    if !sent_any {
                        sent_any = true;
                        crate::crashpoint::hit("snapshot-sending");
                    }
                    size = 0;
                }
                if rest.is_empty() {
                    return true;
                }
            }
        });
        match read {
            Err(err) => {
                let _ = tx.blocking_send(Err(Status::internal(format!(
                    "reading the state for a snapshot: {err}"
                ))));
                on_done(false);
            }
            Ok(()) if gone => on_done(false),
            Ok(()) => {
                chunk.last = true;
                chunk.checksum = hasher.finalize().to_vec();
                chunk.records_total = total;
                on_done(send(chunk));
            }
        }
    });
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

/// What `wraft status` shows about a download in progress.
#[derive(Default)]
pub struct Progress {
    pub receiving: AtomicBool,
    pub bytes: AtomicU64,
}

/// The follower side: downloads the state a `MsgSnapshot` refers to, then hands the message to
/// raft. One download at a time; a message for a snapshot already being fetched is dropped
/// (raft resends).
pub struct Receiver {
    pub cluster_id: u64,
    pub self_id: u64,
    pub store: StateStore,
    pub members: SharedMembers,
    /// Where to dial a peer when it differs from its advertised address (`--dial`).
    pub dial: Arc<std::collections::HashMap<u64, String>>,
    pub tls: Option<ClientTlsConfig>,
    pub raft: SyncSender<RaftInput>,
    /// The `state` generation the node's meta records name; staging goes to the next one.
    pub generation: Arc<AtomicU64>,
    pub progress: Arc<Progress>,
    /// The snapshot index being fetched (0: none).
    busy: Mutex<u64>,
}

impl Receiver {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cluster_id: u64,
        self_id: u64,
        store: StateStore,
        members: SharedMembers,
        dial: Arc<std::collections::HashMap<u64, String>>,
        tls: Option<ClientTlsConfig>,
        raft: SyncSender<RaftInput>,
        generation: Arc<AtomicU64>,
    ) -> Arc<Self> {
        Arc::new(Self {
            cluster_id,
            self_id,
            store,
            members,
            dial,
            tls,
            raft,
            generation,
            progress: Arc::new(Progress::default()),
            busy: Mutex::new(0),
        })
    }

    /// Starts downloading the state `msg` (a validated `MsgSnapshot`) refers to, unless a
    /// download is already running.
    pub fn offer(self: &Arc<Self>, msg: Message) {
        let index = msg.get_snapshot().get_metadata().index;
        {
            let Ok(mut busy) = self.busy.lock() else {
                return;
            };
            if *busy != 0 {
                tracing::debug!(
                    index,
                    fetching = *busy,
                    "a snapshot download is already running"
                );
                return;
            }
            *busy = index;
        }
        let this = Arc::clone(self);
        tokio::spawn(async move {
            this.progress.receiving.store(true, Ordering::Relaxed);
            this.progress.bytes.store(0, Ordering::Relaxed);
            let mut result = Err(String::new());
            for attempt in 1..=ATTEMPTS {
                result = this.download(&msg).await;
                match &result {
                    Ok(_) => break,
                    Err(why) => {
                        tracing::warn!(from = msg.from, index, attempt, %why, "snapshot download failed");
                        tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt))).await;
                    }
                }
            }
            this.progress.receiving.store(false, Ordering::Relaxed);
            if let Ok(generation) = result {
                crate::crashpoint::hit("snapshot-staged");
                tracing::info!(
                    from = msg.from,
                    index,
                    generation,
                    "snapshot downloaded; installing"
                );
                let raft = this.raft.clone();
                let _ = tokio::task::spawn_blocking(move || {
                    raft.send(RaftInput::SnapshotStaged { msg, generation })
                        .is_ok()
                })
                .await;
            }
            if let Ok(mut busy) = this.busy.lock() {
                *busy = 0;
            }
        });
    }

    /// One attempt: returns the generation the state was staged under.
    async fn download(&self, msg: &Message) -> Result<u64, String> {
        let md = msg.get_snapshot().get_metadata();
        let addr = self
            .dial
            .get(&msg.from)
            .cloned()
            .or_else(|| {
                self.members
                    .read()
                    .ok()
                    .and_then(|m| m.get(&msg.from).map(|r| r.addr.clone()))
            })
            .ok_or_else(|| format!("no address for node {}", msg.from))?;
        let url = crate::tls::url(&addr, self.tls.is_some());
        let mut endpoint = Endpoint::from_shared(url)
            .map_err(|e| e.to_string())?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(10));
        if let Some(tls) = &self.tls {
            endpoint = endpoint
                .tls_config(tls.clone())
                .map_err(|e| e.to_string())?;
        }
        let channel = endpoint.connect().await.map_err(|e| e.to_string())?;
        let mut client = PeerClient::new(channel)
            .max_decoding_message_size(PEER_GRPC_MESSAGE_BYTES)
            .max_encoding_message_size(PEER_GRPC_MESSAGE_BYTES);
        let generation = self.generation.load(Ordering::Acquire) + 1;
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.stage_begin(generation))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        let mut stream = client
            .fetch_snapshot(SnapshotRequest {
                cluster_id: self.cluster_id,
                from: self.self_id,
                to: msg.from,
                index: md.index,
                term: md.term,
            })
            .await
            .map_err(|s| s.message().to_string())?
            .into_inner();
        let mut decoder = ChunkDecoder::new(MAX_VALUE_BYTES);
        let mut batch: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let mut batch_bytes = 0usize;
        loop {
            // A stalled sender must not hold the download forever.
            let next = tokio::time::timeout(Duration::from_secs(30), stream.next())
                .await
                .map_err(|_| "no chunk for 30 s".to_string())?;
            let chunk = match next {
                Some(chunk) => chunk.map_err(|s| s.message().to_string())?,
                None => break,
            };
            let bytes: usize = chunk
                .records
                .iter()
                .map(|r| r.key.len() + r.value.len())
                .sum();
            if self.progress.bytes.load(Ordering::Relaxed) > 0 && !chunk.last {
                // Not the first chunk, and more follow: the transfer is under way.
                crate::crashpoint::hit("snapshot-receiving");
            }
            self.progress
                .bytes
                .fetch_add(bytes as u64, Ordering::Relaxed);
            for (key, value) in decoder.push(chunk)? {
                batch_bytes += key.len() + value.len();
                batch.push((key, value));
            }
            if batch_bytes >= STAGE_BATCH_BYTES || decoder.finished() {
                let records = std::mem::take(&mut batch);
                batch_bytes = 0;
                let store = self.store.clone();
                tokio::task::spawn_blocking(move || store.stage_put(generation, &records))
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| e.to_string())?;
            }
            if decoder.finished() {
                return Ok(generation);
            }
        }
        Err("the stream ended before its last chunk".into())
    }
}
