//! The Raft loop: the one thread that owns the `RawNode`.
//!
//! It ticks, drains proposals, reads and peer messages from its inbox, and handles each `Ready`
//! in the order the rules require (see [`RaftLoop::on_ready`]). It does consensus and log I/O
//! only: committed entries are handed to the apply stage over a channel, so a slow module never
//! delays a tick, an election or a log write. It runs on a thread of its own because the synced
//! RocksDB write blocks, and blocking the async runtime would stall every connection.
//!
//! Invariant: only this thread touches the `RawNode` and the raft part of storage.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use raft::eraftpb::{
    ConfChange, ConfChangeType, ConfChangeV2, ConfState, Entry, EntryType, Message,
};
use raft::{RawNode, StateRole};
use tokio::sync::{oneshot, watch};
use wraft_proto::log::{LogEntry, Op};
use wraft_proto::ENVELOPE_VERSION;

use crate::apply::{ApplyInput, ForwardedWaiter, Waiter};
use crate::envelope::{self, ProposalIds};
use crate::limits::MAX_ENTRY_BYTES;
use crate::metrics::METRICS;
use crate::storage::RaftStorage;
use crate::transport::Transport;
use crate::{Applied, Error};

/// How often raft-rs is ticked. Elections and heartbeats are counted in ticks.
pub const TICK: Duration = Duration::from_millis(100);
/// Ticks without a heartbeat before a follower campaigns (1 s; raft-rs randomises it up to 2x).
pub const ELECTION_TICKS: usize = 10;
/// Ticks between heartbeats.
pub const HEARTBEAT_TICKS: usize = 2;
/// How long a ReadIndex request waits before it is issued again: raft-rs drops it silently when
/// the leader has not yet committed an entry in its term.
const READ_RETRY: Duration = Duration::from_millis(300);
/// How many inbox messages one loop iteration takes before it handles a Ready, so that a flood
/// of peer messages cannot starve ticks.
const MAX_DRAIN: usize = 4096;
/// Committed entries the apply stage may lag behind before the leader stops taking proposals.
const MAX_APPLY_BACKLOG: u64 = 20_000;
/// How long a stopping leader waits for its leadership transfer to complete.
const TRANSFER_ON_STOP: Duration = Duration::from_secs(2);
/// What the lease keeps back from the election timeout: 200 ms for the followers' tick phase (a
/// follower counts its election timeout in ticks, and a late tick followed by an on-time one
/// counts two within milliseconds, so it may grant a vote 8 ticks after it last heard from the
/// leader) and 100 ms (12.5% of the remaining 800 ms) for drift between the nodes' monotonic
/// clocks.
pub const LEASE_MARGIN: Duration = Duration::from_millis(300);
/// How long after sending a ReadIndex round that a quorum then acknowledged the leader may
/// answer lease reads without another round: the election timeout less [`LEASE_MARGIN`].
pub const LEASE: Duration = TICK
    .saturating_mul(ELECTION_TICKS as u32)
    .saturating_sub(LEASE_MARGIN);
/// How long after its last lease read the leader keeps renewing its lease (one ReadIndex round
/// when less than half of it is left).
const LEASE_RENEW_WHILE_USED: Duration = Duration::from_secs(2);
/// For this long after the Raft loop starts, vote requests (other than a leadership transfer's)
/// are ignored: a voter that restarted forgot when it last heard from the leader, and raft-rs
/// would grant a vote at once, inside a lease it acknowledged before the crash.
const VOTE_GUARD_AFTER_START: Duration = TICK.saturating_mul(ELECTION_TICKS as u32);

/// The leader's read lease, written by the Raft loop and read by the client service without a
/// round trip to the Raft thread (see ARCHITECTURE.md, "Lease reads").
///
/// The leader holds it until `until`: [`LEASE`] after it sent a ReadIndex round that a quorum
/// then acknowledged, while it leads in the term it had committed an entry in and no leadership
/// transfer started. No other leader can be elected before then (the acknowledging voters
/// refuse votes for an election timeout), so the commit index published here covers every
/// acknowledged write.
pub struct Lease {
    epoch: Instant,
    /// Nanoseconds after `epoch` until which the lease holds; 0: no lease.
    until: AtomicU64,
    /// This node's commit index, published before committed entries go to the apply stage, so
    /// that it is at least the index of any write a client was told about.
    commit: AtomicU64,
    /// When a lease read was last asked for (nanoseconds after `epoch`): the leader renews its
    /// lease only while it is used.
    wanted: AtomicU64,
}

impl Default for Lease {
    fn default() -> Self {
        Self {
            epoch: Instant::now(),
            until: AtomicU64::new(0),
            commit: AtomicU64::new(0),
            wanted: AtomicU64::new(0),
        }
    }
}

impl Lease {
    /// Nanoseconds from `epoch` to `at` (at least 1, so that 0 can mean "never").
    fn nanos(&self, at: Instant) -> u64 {
        let n = at.saturating_duration_since(self.epoch).as_nanos();
        u64::try_from(n).unwrap_or(u64::MAX).max(1)
    }

    /// The index a lease read must wait for, if the lease holds now; `None`: fall back to a
    /// ReadIndex round.
    pub fn read_index(&self) -> Option<u64> {
        let now = self.nanos(Instant::now());
        // Written only when it moved by a millisecond: a hot path on many threads.
        let wanted = self.wanted.load(Ordering::Relaxed);
        if wanted == 0 || now.saturating_sub(wanted) > 1_000_000 {
            self.wanted.store(now, Ordering::Relaxed);
        }
        if now >= self.until.load(Ordering::Acquire) {
            return None;
        }
        Some(self.commit.load(Ordering::Acquire))
    }

    fn publish_commit(&self, commit: u64) {
        self.commit.fetch_max(commit, Ordering::AcqRel);
    }

    /// Holds the lease until `until`, or extends it (`extend`: keep a later end already set).
    fn grant(&self, until: Instant, extend: bool) {
        let until = self.nanos(until);
        if extend {
            self.until.fetch_max(until, Ordering::AcqRel);
        } else {
            self.until.store(until, Ordering::Release);
        }
    }

    fn revoke(&self) {
        self.until.store(0, Ordering::Release);
    }

    /// How much of the lease is left.
    fn remaining(&self) -> Duration {
        let now = self.nanos(Instant::now());
        Duration::from_nanos(self.until.load(Ordering::Acquire).saturating_sub(now))
    }

    /// Whether a lease read was asked for within `window`.
    fn wanted_within(&self, window: Duration) -> bool {
        let wanted = self.wanted.load(Ordering::Relaxed);
        wanted > 0 && self.nanos(Instant::now()).saturating_sub(wanted) <= window.as_nanos() as u64
    }
}

/// What the Raft loop is asked to do.
pub enum RaftInput {
    /// Replicate an op and answer once it is applied (or fails).
    Propose(Proposal),
    /// Confirm leadership and answer with the index a linearizable read must wait for.
    ReadIndex(oneshot::Sender<Result<u64, Error>>),
    /// A validated message from a peer.
    Peer(Message),
    /// The transport lost its connection to this peer.
    Unreachable(u64),
    /// On the leader: hand leadership to this voter (0: the most caught-up one). Answers with
    /// the chosen voter once the transfer has started.
    TransferLeader {
        to: u64,
        reply: oneshot::Sender<Result<u64, Error>>,
    },
    /// On the leader: each other member's replication progress (empty elsewhere).
    Progress(oneshot::Sender<Vec<wraft_proto::client::FollowerProgress>>),
    /// From the apply stage: every tenant's checkpoint covers the log up to `index`, so the log
    /// may be compacted up to there.
    Compact { index: u64 },
    /// From the snapshot receiver: the state `msg` (a `MsgSnapshot`) refers to is staged under
    /// `generation`; raft may now take the message and install it.
    SnapshotStaged { msg: Message, generation: u64 },
    /// From the peer service: a snapshot stream to `to` ended (`complete`: every chunk left).
    SnapshotSent { to: u64, complete: bool },
    /// A follower started downloading the snapshot it was sent.
    SnapshotFetching { to: u64 },
    /// From the peer service: the first stream of initial member `id` named its incarnation.
    LearnIncarnation { id: u64, incarnation: u64 },
    /// On the leader: change membership (one ConfChangeV2). Answered once the change applies.
    ChangeMembers {
        changes: Vec<wraft_proto::client::MemberChange>,
        reply: oneshot::Sender<Result<MembersChanged, Error>>,
    },
    /// Stop the loop.
    Shutdown,
}

/// A membership change that applied: its index and the configuration after it.
#[derive(Debug, Clone)]
pub struct MembersChanged {
    pub index: u64,
    pub voters: Vec<u64>,
    pub learners: Vec<u64>,
}

/// A membership change proposed and not yet applied.
struct PendingConf {
    index: u64,
    term: u64,
    reply: oneshot::Sender<Result<MembersChanged, Error>>,
}

/// An op to replicate, with the channel its result goes to.
pub struct Proposal {
    /// The op without its id; the loop assigns the id.
    pub op: Op,
    pub reply: oneshot::Sender<Result<Applied, Error>>,
}

/// What the rest of the node may know about raft, republished whenever it changes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RaftStatus {
    pub id: u64,
    pub role: Role,
    /// 0 when no leader is known.
    pub leader: u64,
    pub term: u64,
    pub commit: u64,
    pub voters: Vec<u64>,
    pub learners: Vec<u64>,
    /// The log's compaction point: entries up to it live only in snapshots.
    pub snapshot_index: u64,
}

/// A node's role, as clients see it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Role {
    #[default]
    Follower,
    PreCandidate,
    Candidate,
    Leader,
    Learner,
}

/// The raft thread's state.
pub struct RaftLoop {
    raw: RawNode<RaftStorage>,
    inbox: Receiver<RaftInput>,
    apply: Sender<ApplyInput>,
    transport: Transport,
    status: watch::Sender<RaftStatus>,
    ids: ProposalIds,
    /// The timestamp of the last entry this node proposed: the next is never below it, even if
    /// the wall clock steps back (guests see it through the deterministic context).
    last_stamp_ms: u64,
    /// Outstanding ReadIndex requests by context, with when they were last issued.
    reads: HashMap<u64, PendingRead>,
    next_read_ctx: u64,
    /// Set once shutdown is asked for: the loop keeps running until leadership has moved to
    /// another node (so the cluster does not wait out an election) or this deadline passes.
    stopping: Option<Instant>,
    /// Set when a conf change applied (and at start): the status republishes the member lists.
    membership_changed: bool,
    /// The apply stage's applied index, and the last index handed to it. Their distance is the
    /// apply backlog; new proposals wait (RESOURCE_EXHAUSTED) while it exceeds
    /// [`MAX_APPLY_BACKLOG`], so a slow module slows its clients instead of growing memory.
    applied: Arc<AtomicU64>,
    handed: u64,
    /// The address book (this loop is its only writer).
    members: crate::members::SharedMembers,
    /// The conf state after each conf change since the compaction point (and at it): a
    /// compaction records the configuration at its index.
    conf_history: Vec<(u64, ConfState)>,
    pending_conf: Option<PendingConf>,
    /// The snapshot staged for raft to install: (index, generation).
    staged: Option<(u64, u64)>,
    /// Set when a conf change added nodes: a snapshot for them must name them, so the apply
    /// stage is asked to make a compaction point past the change.
    compact_soon: bool,
    /// On the leader: snapshots sent, by follower, with when; a transfer that stalls is
    /// reported failed so raft sends a new one (raft-rs would otherwise wait forever).
    snapshots_out: HashMap<u64, SnapshotOut>,
    /// Shared with the peer service (which serves snapshots up to it) and the snapshot
    /// receiver (which stages into the next generation).
    compacted: Arc<AtomicU64>,
    generation: Arc<AtomicU64>,
    /// The read lease, shared with the client service.
    lease: Arc<Lease>,
    /// The term the lease was last granted in.
    lease_term: u64,
    /// A term in which a leadership transfer started: no lease for the rest of it (the
    /// transferee campaigns at once, and voters grant a transfer's votes inside a lease).
    lease_off_term: u64,
    /// The index of the last conf change seen, and when it was seen: rounds issued before a
    /// membership change do not grant a lease.
    lease_conf: u64,
    lease_floor: Instant,
    /// The ReadIndex round that renews the lease, while one is out.
    renewal: Option<u64>,
    /// When this loop started (see [`VOTE_GUARD_AFTER_START`]).
    started: Instant,
}

/// How long a snapshot transfer to a follower may go without finishing before raft is told it
/// failed (and sends another).
const SNAPSHOT_STALL: Duration = Duration::from_secs(60);
/// How long after its last chunk left a follower has to acknowledge a snapshot; one that
/// crashed meanwhile never will, and raft-rs would wait for it forever.
const SNAPSHOT_ACK_GRACE: Duration = Duration::from_secs(10);
/// How long after a snapshot message was sent the follower has to start downloading it. The
/// message is lost when the follower died before it arrived (and a restarted follower asks
/// for nothing), and raft-rs would wait for it forever: report it failed, and raft sends
/// another.
const SNAPSHOT_START_GRACE: Duration = Duration::from_secs(5);

/// A snapshot sent to a follower: when, when its download started, and when its stream
/// completed.
struct SnapshotOut {
    sent: Instant,
    fetching: Option<Instant>,
    streamed: Option<Instant>,
}

struct PendingRead {
    issued: Instant,
    /// When the round was first issued (re-issues keep the context, and an acknowledgement of
    /// an earlier heartbeat may complete it): where a lease it grants starts.
    first_issued: Instant,
    /// The term it was issued in.
    term: u64,
    /// Issued as leader (a round of our own), not as a follower asking its leader.
    as_leader: bool,
    replies: Vec<oneshot::Sender<Result<u64, Error>>>,
}

impl RaftLoop {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        raw: RawNode<RaftStorage>,
        inbox: Receiver<RaftInput>,
        apply: Sender<ApplyInput>,
        transport: Transport,
        status: watch::Sender<RaftStatus>,
        applied: Arc<AtomicU64>,
        members: crate::members::SharedMembers,
        compacted: Arc<AtomicU64>,
        generation: Arc<AtomicU64>,
    ) -> Self {
        let ids = ProposalIds::new(raw.raft.id);
        let handed = applied.load(Ordering::Acquire);
        let store = raw.store();
        let mut conf_history = Vec::new();
        if store.snapshot_index() > 0 {
            if let Ok(snapshot) = raft::Storage::snapshot(store, 0, 0) {
                conf_history.push((
                    store.snapshot_index(),
                    snapshot.get_metadata().get_conf_state().clone(),
                ));
            }
        }
        conf_history.push((store.conf_applied(), store.conf_state()));
        compacted.store(store.snapshot_index(), Ordering::Release);
        generation.store(store.generation(), Ordering::Release);
        Self {
            raw,
            inbox,
            apply,
            transport,
            status,
            ids,
            last_stamp_ms: 0,
            reads: HashMap::new(),
            // Read contexts must differ across nodes: a leader keys the rounds it runs for its
            // followers by context, and drops a read whose context it already holds.
            next_read_ctx: rand::random::<u64>() >> 1,
            stopping: None,
            membership_changed: true,
            applied,
            handed,
            members,
            conf_history,
            pending_conf: None,
            staged: None,
            compact_soon: false,
            snapshots_out: HashMap::new(),
            compacted,
            generation,
            lease: Arc::new(Lease::default()),
            lease_term: 0,
            lease_off_term: 0,
            lease_conf: 0,
            lease_floor: Instant::now(),
            renewal: None,
            started: Instant::now(),
        }
    }

    /// The read lease, for the client service.
    pub fn lease(&self) -> Arc<Lease> {
        self.lease.clone()
    }

    /// Runs until [`RaftInput::Shutdown`] or until every sender is gone. A storage failure ends
    /// the loop too: a node that cannot persist must stop voting and acknowledging.
    pub fn run(mut self) -> Result<(), crate::storage::StorageError> {
        let mut next_tick = Instant::now() + TICK;
        self.publish_status();
        loop {
            let mut proposals = Vec::new();
            let mut reads = Vec::new();
            let wait = next_tick.saturating_duration_since(Instant::now());
            match self.inbox.recv_timeout(wait) {
                Ok(first) => {
                    // Drain what is queued so that many requests share one Ready: one synced
                    // write and one message batch per peer (batching by draining, not timers).
                    let mut input = Some(first);
                    let mut taken = 0;
                    while let Some(msg) = input.take() {
                        match msg {
                            RaftInput::Propose(p) => proposals.push(p),
                            RaftInput::ReadIndex(r) => reads.push(r),
                            RaftInput::Peer(m) => self.step(m),
                            RaftInput::Unreachable(id) => self.raw.report_unreachable(id),
                            RaftInput::TransferLeader { to, reply } => {
                                let _ = reply.send(self.transfer_leader(to));
                            }
                            RaftInput::Progress(reply) => {
                                let _ = reply.send(self.progress());
                            }
                            RaftInput::Compact { index } => self.compact(index)?,
                            RaftInput::SnapshotStaged { msg, generation } => {
                                self.staged =
                                    Some((msg.get_snapshot().get_metadata().index, generation));
                                self.step(msg);
                            }
                            RaftInput::SnapshotFetching { to } => {
                                if let Some(out) = self.snapshots_out.get_mut(&to) {
                                    out.fetching = Some(Instant::now());
                                }
                            }
                            RaftInput::SnapshotSent { to, complete } => {
                                if !complete {
                                    self.snapshots_out.remove(&to);
                                    self.raw.report_snapshot(to, raft::SnapshotStatus::Failure);
                                } else if let Some(out) = self.snapshots_out.get_mut(&to) {
                                    out.streamed = Some(Instant::now());
                                }
                            }
                            RaftInput::LearnIncarnation { id, incarnation } => {
                                self.learn_incarnation(id, incarnation)?
                            }
                            RaftInput::ChangeMembers { changes, reply } => {
                                self.change_members(changes, reply)
                            }
                            RaftInput::Shutdown => self.begin_shutdown(),
                        }
                        taken += 1;
                        if taken < MAX_DRAIN {
                            input = self.inbox.try_recv().ok();
                        }
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return self.shutdown(),
            }
            if Instant::now() >= next_tick {
                self.raw.tick();
                next_tick += TICK;
                if next_tick < Instant::now() {
                    // The thread was starved (a slow disk, a stopped process): do not replay the
                    // missed ticks in a burst, which would fire an election at once.
                    next_tick = Instant::now() + TICK;
                }
                self.retry_reads();
                self.renew_lease();
                self.check_snapshot_transfers();
            }
            self.propose(proposals);
            self.read_index(reads);
            self.on_ready()?;
            self.publish_status();
            if let Some(deadline) = self.stopping {
                if self.raw.raft.state != StateRole::Leader || Instant::now() >= deadline {
                    return self.shutdown();
                }
            }
        }
    }

    /// Starts stopping. A leader first hands leadership to its most caught-up voter, so the
    /// cluster keeps serving without waiting out an election timeout.
    fn begin_shutdown(&mut self) {
        if self.stopping.is_some() {
            return;
        }
        self.stopping = Some(Instant::now() + TRANSFER_ON_STOP);
        if self.raw.raft.state != StateRole::Leader {
            return;
        }
        match self.most_caught_up_voter() {
            Some(id) => {
                tracing::info!(to = id, "stopping: transferring leadership");
                self.raw.transfer_leader(id);
            }
            None => tracing::info!("stopping: no other voter to transfer leadership to"),
        }
    }

    /// The voter other than this node with the longest replicated log.
    fn most_caught_up_voter(&self) -> Option<u64> {
        let me = self.raw.raft.id;
        let prs = self.raw.raft.prs();
        prs.iter()
            .filter(|(id, _)| **id != me && prs.conf().voters().contains(**id))
            .max_by_key(|(_, pr)| pr.matched)
            .map(|(id, _)| *id)
    }

    fn transfer_leader(&mut self, to: u64) -> Result<u64, Error> {
        if self.raw.raft.state != StateRole::Leader {
            return Err(Error::NotLeader {
                leader: self.raw.raft.leader_id,
            });
        }
        let target = if to == 0 {
            self.most_caught_up_voter().ok_or_else(|| {
                Error::FailedPrecondition("there is no other voter to lead".into())
            })?
        } else {
            to
        };
        if target == self.raw.raft.id {
            return Err(Error::InvalidArgument(format!(
                "node {target} already leads"
            )));
        }
        if !self.raw.raft.prs().conf().voters().contains(target) {
            return Err(Error::InvalidArgument(format!(
                "node {target} is not a voter of this cluster"
            )));
        }
        tracing::info!(to = target, "transferring leadership on request");
        self.raw.transfer_leader(target);
        Ok(target)
    }

    fn progress(&self) -> Vec<wraft_proto::client::FollowerProgress> {
        let raft = &self.raw.raft;
        if raft.state != StateRole::Leader {
            return Vec::new();
        }
        let mut out: Vec<_> = raft
            .prs()
            .iter()
            .filter(|(id, _)| **id != raft.id)
            .map(|(id, pr)| wraft_proto::client::FollowerProgress {
                id: *id,
                match_index: pr.matched,
                next_index: pr.next_idx,
                state: format!("{:?}", pr.state).to_lowercase(),
            })
            .collect();
        out.sort_by_key(|p| p.id);
        out
    }

    fn step(&mut self, mut msg: Message) {
        // raft-rs panics (`commit_to`) on a heartbeat that commits past our last index. A leader
        // never sends one (it caps the commit at what we acknowledged, which we had synced), so
        // such a message is corrupt or hostile: drop it rather than crash. This check needs our
        // log, which is why it is here and not in `transport::validate`.
        if msg.get_msg_type() == raft::eraftpb::MessageType::MsgHeartbeat
            && msg.commit > self.raw.raft.raft_log.last_index()
        {
            tracing::warn!(
                from = msg.from,
                commit = msg.commit,
                last_index = self.raw.raft.raft_log.last_index(),
                "dropping a heartbeat that commits past this node's log"
            );
            return;
        }
        // Lease reads: raft-rs refuses votes for an election timeout after hearing from the
        // leader, but a restarted voter has forgotten when that was. Ignore vote requests for an
        // election timeout after start, as if the leader had just been heard from (a
        // transfer's are exempt: the leader gave up its lease when it started the transfer).
        if matches!(
            msg.get_msg_type(),
            raft::eraftpb::MessageType::MsgRequestVote
                | raft::eraftpb::MessageType::MsgRequestPreVote
        ) && msg.term > self.raw.raft.term
            && msg.get_context() != raft::CAMPAIGN_TRANSFER
            && self.started.elapsed() < VOTE_GUARD_AFTER_START
        {
            tracing::debug!(
                from = msg.from,
                term = msg.term,
                "ignoring a vote request: this node started less than an election timeout ago"
            );
            return;
        }
        // A follower's proposal is checked and stamped where it enters the log: a node that is
        // not the leader hands it on (raft-rs forwards it, or drops it without a leader).
        if msg.get_msg_type() == raft::eraftpb::MessageType::MsgPropose
            && self.raw.raft.state == StateRole::Leader
        {
            if self.apply_backlog() > MAX_APPLY_BACKLOG {
                // As for this node's own clients: a lagging apply stage takes no more work.
                METRICS.proposals_dropped.inc();
                return;
            }
            if let Err(why) = self.restamp_forwarded(&mut msg) {
                tracing::warn!(from = msg.from, %why, "dropping a forwarded proposal");
                return;
            }
        }
        if let Err(err) = self.raw.step(msg) {
            tracing::debug!(%err, "raft rejected a peer message");
        }
    }

    /// Committed entries handed to the apply stage and not yet applied.
    fn apply_backlog(&self) -> u64 {
        self.handed
            .saturating_sub(self.applied.load(Ordering::Acquire))
    }

    /// A follower's proposal, on its way into the leader's log: it may carry commands only
    /// (deploys and the rest reach the leader as requests, which the leader validates), each
    /// with a proposal id, and it gets this node's timestamp, so that the clock a guest sees is
    /// the leader's, as for the leader's own entries.
    fn restamp_forwarded(&mut self, msg: &mut Message) -> Result<(), String> {
        let stamp = self.stamp();
        for entry in msg.mut_entries().iter_mut() {
            let mut decoded = envelope::decode(&entry.data).map_err(|e| e.to_string())?;
            if let Some(op) = decoded.ops.iter().find(|op| {
                op.id.is_none() || !matches!(op.kind, Some(wraft_proto::log::op::Kind::Command(_)))
            }) {
                return Err(format!(
                    "op for tenant `{}` is not a command with a proposal id",
                    op.tenant
                ));
            }
            decoded.timestamp_ms = stamp;
            entry.data = envelope::encode(&decoded).into();
        }
        Ok(())
    }

    /// The wall clock for a new entry: read here, once, and carried in the log (the only clock
    /// a guest ever sees); never behind an earlier stamp of this node.
    fn stamp(&mut self) -> u64 {
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        self.last_stamp_ms = self.last_stamp_ms.max(now_ms);
        self.last_stamp_ms
    }

    /// Packs the drained proposals into as few entries as the size budget allows and proposes
    /// them. Each op's waiter is registered with the apply stage before the entry can commit:
    /// the registration and the committed entries travel on the same ordered channel.
    fn propose(&mut self, proposals: Vec<Proposal>) {
        if proposals.is_empty() {
            return;
        }
        if self.stopping.is_some() {
            for p in proposals {
                let _ = p.reply.send(Err(Error::ShuttingDown));
            }
            return;
        }
        if self.apply_backlog() > MAX_APPLY_BACKLOG {
            METRICS.proposals_dropped.inc_by(proposals.len() as u64);
            for p in proposals {
                let _ = p.reply.send(Err(Error::Busy("the apply stage is behind")));
            }
            return;
        }
        // A follower proposes too: raft-rs sends the entry to the leader on the peer stream
        // (batched with everything else), and this node answers its client from its own apply
        // of the entry, which is the leader's result (apply is deterministic). No leader: fail.
        if self.raw.raft.state != StateRole::Leader && self.raw.raft.leader_id == raft::INVALID_ID {
            for p in proposals {
                let _ = p.reply.send(Err(Error::NotLeader {
                    leader: raft::INVALID_ID,
                }));
            }
            return;
        }
        let mut batch: Vec<Proposal> = Vec::new();
        let mut batch_bytes = 0;
        for mut p in proposals {
            p.op.id = Some(self.ids.next_id());
            let size = op_size(&p.op);
            if !batch.is_empty() && batch_bytes + size > MAX_ENTRY_BYTES {
                self.propose_entry(std::mem::take(&mut batch));
                batch_bytes = 0;
            }
            batch_bytes += size;
            batch.push(p);
        }
        self.propose_entry(batch);
    }

    fn propose_entry(&mut self, batch: Vec<Proposal>) {
        let (ops, replies): (Vec<Op>, Vec<_>) = batch.into_iter().map(|p| (p.op, p.reply)).unzip();
        let entry = LogEntry {
            version: ENVELOPE_VERSION,
            timestamp_ms: self.stamp(),
            ops,
        };
        let data = envelope::encode(&entry);
        let ops = replies.len() as u64;
        match self.raw.propose(Vec::new(), data) {
            Ok(()) if self.raw.raft.state != StateRole::Leader => {
                // Sent to the leader; its index is the leader's to choose.
                METRICS.proposals.inc_by(ops);
                METRICS
                    .forwarded
                    .with_label_values(&["propose"])
                    .inc_by(ops);
                let term = self.raw.raft.term;
                let waiters = entry
                    .ops
                    .into_iter()
                    .zip(replies)
                    .filter_map(|(op, reply)| {
                        Some(ForwardedWaiter {
                            id: op.id?,
                            term,
                            reply,
                        })
                    })
                    .collect();
                let _ = self.apply.send(ApplyInput::TrackForwarded(waiters));
            }
            Ok(()) => {
                METRICS.proposals.inc_by(ops);
                METRICS.entries_proposed.inc();
                let index = self.raw.raft.raft_log.last_index();
                let waiters = entry
                    .ops
                    .into_iter()
                    .zip(replies)
                    .enumerate()
                    .filter_map(|(position, (op, reply))| {
                        Some(Waiter {
                            index,
                            position: position as u32,
                            id: op.id?,
                            reply,
                        })
                    })
                    .collect();
                let _ = self.apply.send(ApplyInput::Track(waiters));
            }
            Err(err) => {
                METRICS.proposals_dropped.inc_by(ops);
                let reason = err.to_string();
                for reply in replies {
                    let _ = reply.send(Err(Error::Dropped(reason.clone())));
                }
            }
        }
    }

    /// One ReadIndex round serves every read drained in this iteration.
    fn read_index(&mut self, replies: Vec<oneshot::Sender<Result<u64, Error>>>) {
        if replies.is_empty() {
            return;
        }
        // A follower asks its leader (raft-rs sends MsgReadIndex) and serves the read itself
        // once it has applied up to the index the leader confirmed.
        if self.raw.raft.state != StateRole::Leader && self.raw.raft.leader_id == raft::INVALID_ID {
            for r in replies {
                let _ = r.send(Err(Error::NotLeader {
                    leader: raft::INVALID_ID,
                }));
            }
            return;
        }
        self.issue_read(replies);
    }

    /// Starts one ReadIndex round for `replies` (none: a round that only renews the lease).
    fn issue_read(&mut self, replies: Vec<oneshot::Sender<Result<u64, Error>>>) -> u64 {
        let ctx = self.next_read_ctx;
        self.next_read_ctx += 1;
        let now = Instant::now();
        // Stamped before raft-rs queues the heartbeats: a lease from this round starts no later
        // than any follower could acknowledge it.
        self.reads.insert(
            ctx,
            PendingRead {
                issued: now,
                first_issued: now,
                term: self.raw.raft.term,
                as_leader: self.raw.raft.state == StateRole::Leader,
                replies,
            },
        );
        self.raw.read_index(ctx.to_be_bytes().to_vec());
        ctx
    }

    /// On the leader, while lease reads are being asked for: one ReadIndex round when less than
    /// half of the lease is left, so that the lease does not lapse under a steady load.
    fn renew_lease(&mut self) {
        let raft = &self.raw.raft;
        if raft.state != StateRole::Leader
            || self.lease_off_term == raft.term
            || self.stopping.is_some()
            || !raft.commit_to_current_term()
            || !self.lease.wanted_within(LEASE_RENEW_WHILE_USED)
            || self.lease.remaining() > LEASE / 2
            || self
                .renewal
                .is_some_and(|ctx| self.reads.contains_key(&ctx))
        {
            return;
        }
        self.renewal = Some(self.issue_read(Vec::new()));
    }

    /// Revokes the lease when it no longer holds: this node does not lead in the lease's term,
    /// a leadership transfer started, or membership changed. Runs before every message leaves,
    /// so a transferee never hears `MsgTimeoutNow` while this node still holds a lease.
    fn check_lease(&mut self) {
        let raft = &self.raw.raft;
        if raft.state == StateRole::Leader && raft.lead_transferee.is_some() {
            self.lease_off_term = raft.term;
        }
        let conf = self.conf_history.last().map_or(0, |(index, _)| *index);
        if conf != self.lease_conf {
            self.lease_conf = conf;
            self.lease_floor = Instant::now();
            self.lease.revoke();
        }
        let holds = raft.state == StateRole::Leader
            && raft.term == self.lease_term
            && self.lease_off_term != raft.term;
        if !holds {
            self.lease.revoke();
        }
    }

    /// A ReadIndex round completed: a quorum acknowledged leadership after `read.first_issued`,
    /// so the lease holds until [`LEASE`] after that.
    fn grant_lease(&mut self, read: &PendingRead) {
        self.check_lease();
        let raft = &self.raw.raft;
        if raft.state != StateRole::Leader
            || read.term != raft.term
            || self.lease_off_term == raft.term
            || read.first_issued < self.lease_floor
            || !raft.commit_to_current_term()
        {
            return;
        }
        let extend = self.lease_term == raft.term;
        self.lease_term = raft.term;
        self.lease.publish_commit(raft.raft_log.committed);
        self.lease.grant(read.first_issued + LEASE, extend);
    }

    /// Issues again the reads raft-rs dropped (no leader yet, or no commit in this term yet);
    /// the callers' own deadlines bound how long they wait.
    fn retry_reads(&mut self) {
        let now = Instant::now();
        let as_leader = self.raw.raft.state == StateRole::Leader;
        if !as_leader {
            // Before anything is re-issued: a round started as leader must fail at a step-down
            // (a tick may have just caused one), never be re-issued as a follower's round that
            // waits out its caller's deadline for a leader this node may not find.
            self.fail_rounds_issued_as_leader();
        }
        let stale: Vec<u64> = self
            .reads
            .iter()
            .filter(|(_, r)| now.duration_since(r.issued) >= READ_RETRY)
            .map(|(ctx, _)| *ctx)
            .collect();
        for ctx in stale {
            if let Some(read) = self.reads.get_mut(&ctx) {
                read.replies.retain(|r| !r.is_closed());
                if read.replies.is_empty() {
                    self.reads.remove(&ctx);
                    continue;
                }
                read.issued = now;
                read.as_leader = as_leader;
                self.raw.read_index(ctx.to_be_bytes().to_vec());
            }
        }
    }

    /// Fails every ReadIndex round this node started as leader; called once it no longer
    /// leads. Such a round could be confirmed stale, and its callers retry at once (with the
    /// leader's id when one is known). A follower's own rounds are the leader's to confirm, and
    /// stay.
    fn fail_rounds_issued_as_leader(&mut self) {
        let leader = self.raw.raft.leader_id;
        self.reads.retain(|_, read| {
            if read.as_leader {
                for reply in read.replies.drain(..) {
                    let _ = reply.send(Err(Error::NotLeader { leader }));
                }
            }
            !read.as_leader
        });
    }

    /// Handles one `Ready`. The order is the rules' order; each step says why it is there.
    fn on_ready(&mut self) -> Result<(), crate::storage::StorageError> {
        self.check_lease();
        if !self.raw.has_ready() {
            return Ok(());
        }
        let mut ready = self.raw.ready();
        // Before any message leaves: a follower that learns the commit index from this Ready
        // may answer its client at once, and a lease read here must see that write.
        self.lease.publish_commit(self.raw.raft.raft_log.committed);

        // 1. Send messages. These are the ones raft-rs allows before persisting (a leader's
        //    appends and heartbeats): the leader writes its log in parallel with its followers,
        //    which is safe because an entry counts for the leader only once persisted locally.
        if !ready.messages().is_empty() {
            let messages = ready.take_messages();
            self.note_snapshots_sent(&messages);
            self.transport.send(messages);
        }

        // 2. Apply an incoming snapshot, before the committed entries that follow it. Its state
        //    was downloaded and staged before raft saw the message (see `snapshot`); installing
        //    is one synced write of the raft metadata, the hard state and the switch to the
        //    staged state. Then the apply stage is told, in order, to load it.
        if !ready.snapshot().is_empty() {
            let snapshot = ready.snapshot().clone();
            self.install_snapshot(&snapshot, ready.hs())?;
        }

        // 3. Hand committed entries to the apply stage. They are already persisted (raft-rs only
        //    releases committed entries up to the persisted index), so applying them now, before
        //    this Ready's own write, is safe and lets apply overlap with the fsync below.
        self.handle_committed(ready.take_committed_entries());

        // 4. Persist new entries and the hard state in ONE synced write. Nothing this node
        //    promises (a vote, an append acknowledgement) may leave before it is durable.
        if !ready.entries().is_empty() || ready.hs().is_some() {
            let started = Instant::now();
            let sync = ready.must_sync();
            self.raw
                .mut_store()
                .append(ready.entries(), ready.hs(), sync)?;
            METRICS
                .storage_write_seconds
                .with_label_values(&[if sync { "true" } else { "false" }])
                .observe(started.elapsed().as_secs_f64());
        }

        // 5. Only now send the persisted messages: votes and append responses promise state
        //    that step 4 just made durable.
        if !ready.persisted_messages().is_empty() {
            self.transport.send(ready.take_persisted_messages());
        }

        // Answer ReadIndex requests: each read may run once the applied index reaches it.
        for rs in ready.take_read_states() {
            let ctx = ctx_of(&rs.request_ctx);
            if let Some(read) = ctx.and_then(|c| self.reads.remove(&c)) {
                self.grant_lease(&read);
                for reply in read.replies {
                    let _ = reply.send(Ok(rs.index));
                }
            }
        }

        // 6. Advance. The LightReady holds what became committed by our own persist (a single
        //    node, or a leader whose append completed the quorum) and messages that follow it.
        let mut light = self.raw.advance(ready);
        if let Some(commit) = light.commit_index() {
            // Not synced: the commit index can be learnt again from the leader.
            self.raw.mut_store().set_commit(commit)?;
        }
        if !light.messages().is_empty() {
            // A conf change applied above may have started a leadership transfer.
            self.check_lease();
            self.lease.publish_commit(self.raw.raft.raft_log.committed);
            let messages = light.take_messages();
            self.note_snapshots_sent(&messages);
            self.transport.send(messages);
        }
        self.handle_committed(light.take_committed_entries());
        self.raw.advance_apply();
        Ok(())
    }

    /// Applies conf changes to raft here (raft-rs must see them on this thread) and passes every
    /// entry on to the apply stage in order.
    fn handle_committed(&mut self, entries: Vec<Entry>) {
        if entries.is_empty() {
            return;
        }
        for entry in &entries {
            match entry.get_entry_type() {
                EntryType::EntryNormal => {
                    // raft-rs turns a conf change it refuses (one is pending, or the
                    // configuration is joint) into an empty normal entry at the same index.
                    if self
                        .pending_conf
                        .as_ref()
                        .is_some_and(|p| p.index == entry.index)
                    {
                        if let Some(p) = self.pending_conf.take() {
                            let _ = p.reply.send(Err(Error::FailedPrecondition(
                                "raft refused the membership change: another change is still in progress (or the configuration is joint); retry when it has applied".into(),
                            )));
                        }
                    }
                }
                EntryType::EntryConfChange | EntryType::EntryConfChangeV2 => {
                    self.apply_conf_entry(entry)
                }
            }
        }
        if let Some(last) = entries.last() {
            self.handed = last.index;
        }
        // Before apply can answer a client: a lease read must see what that client was told.
        self.lease.publish_commit(self.raw.raft.raft_log.committed);
        let _ = self.apply.send(ApplyInput::Committed(entries));
        if std::mem::take(&mut self.compact_soon) {
            let _ = self.apply.send(ApplyInput::CompactNow);
        }
    }

    /// Applies one committed conf change to raft and records it with the address book it
    /// implies. A restart delivers committed entries again: one already applied is skipped.
    fn apply_conf_entry(&mut self, entry: &Entry) {
        if entry.index <= self.raw.store().conf_applied() {
            return;
        }
        let parsed: Result<ConfChangeV2, String> =
            if entry.get_entry_type() == EntryType::EntryConfChange {
                protobuf::Message::parse_from_bytes(entry.get_data())
                    .map(|cc: ConfChange| {
                        // A v1 change (none are proposed by wraft, but raft-rs accepts them) as v2.
                        let mut single = raft::eraftpb::ConfChangeSingle::default();
                        single.set_change_type(cc.get_change_type());
                        single.node_id = cc.node_id;
                        let mut v2 = ConfChangeV2::default();
                        v2.set_changes(vec![single].into());
                        v2.set_context(cc.get_context().to_vec().into());
                        v2
                    })
                    .map_err(|e| e.to_string())
            } else {
                protobuf::Message::parse_from_bytes(entry.get_data()).map_err(|e| e.to_string())
            };
        let me = self.raw.raft.id;
        let was_member = {
            let conf = self.raw.raft.prs().conf();
            conf.voters().contains(me) || conf.learners().contains(&me)
        };
        let result = parsed.and_then(|cc| {
            let cs = self.raw.apply_conf_change(&cc).map_err(|e| e.to_string())?;
            Ok((cc, cs))
        });
        let pending = self.pending_conf.take_if(|p| p.index == entry.index);
        match result {
            Ok((cc, cs)) => {
                crate::crashpoint::hit("conf-change-applied");
                let book = self.book_after(&cc, entry.get_context());
                self.compact_soon |= cc
                    .get_changes()
                    .iter()
                    .any(|c| c.get_change_type() != ConfChangeType::RemoveNode);
                if let Err(err) = self.raw.mut_store().set_conf_state(
                    &cs,
                    entry.index,
                    &crate::members::to_proto(&book),
                ) {
                    tracing::error!(%err, "persisting the conf state failed");
                }
                self.adopt_book(book);
                self.conf_history.push((entry.index, cs.clone()));
                self.membership_changed = true;
                tracing::info!(index = entry.index, voters = ?cs.voters, learners = ?cs.learners, joint = !cs.voters_outgoing.is_empty(), "membership changed");
                if let Some(p) = pending {
                    let answer = if p.term == entry.term {
                        Ok(MembersChanged {
                            index: entry.index,
                            voters: cs.voters.clone(),
                            learners: cs.learners.clone(),
                        })
                    } else {
                        Err(Error::Superseded { index: entry.index })
                    };
                    let _ = p.reply.send(answer);
                }
                let still_voter = cs.voters.contains(&me) || cs.voters_outgoing.contains(&me);
                if !still_voter && self.raw.raft.state == StateRole::Leader {
                    // A removed leader hands over rather than lead a group it is not part of.
                    if let Some(to) = self.most_caught_up_voter() {
                        tracing::info!(to, "this leader was removed; transferring leadership");
                        self.raw.transfer_leader(to);
                    }
                }
                // (A node replaying the log from the start meets configurations from before
                // it was added: not being in those is no removal.)
                if was_member
                    && !cs.voters.contains(&me)
                    && !cs.learners.contains(&me)
                    && !cs.voters_outgoing.contains(&me)
                {
                    tracing::warn!(
                        "this node was removed from the cluster; it no longer takes part (stop it)"
                    );
                }
            }
            Err(err) => {
                tracing::warn!(index = entry.index, %err, "conf change not applied");
                if let Some(p) = pending {
                    let _ = p.reply.send(Err(Error::FailedPrecondition(format!(
                        "membership change refused: {err}"
                    ))));
                }
            }
        }
    }

    /// The address book after `cc`: added nodes come with their record in the entry's context
    /// (raft-rs puts `propose_conf_change`'s context there, not in the change).
    fn book_after(&self, cc: &ConfChangeV2, context: &[u8]) -> crate::members::Book {
        let mut book = self.members.read().map(|b| b.clone()).unwrap_or_default();
        let context =
            <wraft_proto::peer::PeerBook as prost::Message>::decode(context).unwrap_or_default();
        for change in cc.get_changes() {
            match change.get_change_type() {
                ConfChangeType::AddNode | ConfChangeType::AddLearnerNode => {
                    if let Some(record) = context.peers.iter().find(|p| p.id == change.node_id) {
                        book.insert(change.node_id, record.clone());
                    }
                }
                ConfChangeType::RemoveNode => {
                    book.remove(&change.node_id);
                }
            }
        }
        book
    }

    /// Publishes a new address book to the rest of the node and the transport.
    fn adopt_book(&mut self, book: crate::members::Book) {
        let addrs: std::collections::BTreeMap<u64, String> =
            book.iter().map(|(id, r)| (*id, r.addr.clone())).collect();
        self.transport.set_peers(&addrs);
        if let Ok(mut shared) = self.members.write() {
            *shared = book;
        }
    }

    fn learn_incarnation(
        &mut self,
        id: u64,
        incarnation: u64,
    ) -> Result<(), crate::storage::StorageError> {
        let mut book = self.members.read().map(|b| b.clone()).unwrap_or_default();
        match book.get_mut(&id) {
            Some(record) if record.incarnation == 0 => record.incarnation = incarnation,
            _ => return Ok(()),
        }
        self.raw
            .mut_store()
            .set_peers(&crate::members::to_proto(&book))?;
        if let Ok(mut shared) = self.members.write() {
            *shared = book;
        }
        Ok(())
    }

    /// Proposes one ConfChangeV2 for `changes` (several at once enter a joint configuration,
    /// which raft-rs leaves by itself).
    fn change_members(
        &mut self,
        changes: Vec<wraft_proto::client::MemberChange>,
        reply: oneshot::Sender<Result<MembersChanged, Error>>,
    ) {
        use wraft_proto::client::member_change::Kind;
        if self.raw.raft.state != StateRole::Leader {
            let _ = reply.send(Err(Error::NotLeader {
                leader: self.raw.raft.leader_id,
            }));
            return;
        }
        if self.stopping.is_some() {
            let _ = reply.send(Err(Error::ShuttingDown));
            return;
        }
        if self.pending_conf.is_some() || self.raw.raft.has_pending_conf() {
            let _ = reply.send(Err(Error::FailedPrecondition(
                "another membership change is still in progress; retry when it has applied".into(),
            )));
            return;
        }
        let conf = self.raw.raft.prs().conf().to_conf_state();
        if !conf.voters_outgoing.is_empty() {
            let _ = reply.send(Err(Error::FailedPrecondition(
                "the configuration is joint (a change is being completed); retry shortly".into(),
            )));
            return;
        }
        let mut singles = Vec::new();
        let mut context = wraft_proto::peer::PeerBook::default();
        let mut voters_after: std::collections::BTreeSet<u64> =
            conf.voters.iter().copied().collect();
        for change in &changes {
            let id = change.id;
            let kind = Kind::try_from(change.kind).unwrap_or(Kind::AddLearner);
            let is_member = conf.voters.contains(&id) || conf.learners.contains(&id);
            let invalid = |why: String| Error::InvalidArgument(why);
            let checked = if id == 0 {
                Err(invalid("node id 0 is reserved".into()))
            } else {
                match kind {
                    Kind::AddLearner | Kind::AddVoter if !is_member && change.addr.is_empty() => {
                        Err(invalid(format!("adding node {id} needs its address")))
                    }
                    Kind::AddLearner if conf.voters.contains(&id) => {
                        Err(invalid(format!("node {id} is already a voter")))
                    }
                    Kind::Promote if !conf.learners.contains(&id) => {
                        Err(invalid(format!("node {id} is not a learner")))
                    }
                    Kind::Remove if !is_member => {
                        Err(invalid(format!("node {id} is not a member")))
                    }
                    _ => Ok(()),
                }
            };
            if let Err(err) = checked {
                let _ = reply.send(Err(err));
                return;
            }
            let mut single = raft::eraftpb::ConfChangeSingle {
                node_id: id,
                ..Default::default()
            };
            match kind {
                Kind::AddLearner => single.set_change_type(ConfChangeType::AddLearnerNode),
                Kind::AddVoter | Kind::Promote => {
                    single.set_change_type(ConfChangeType::AddNode);
                    voters_after.insert(id);
                }
                Kind::Remove => {
                    single.set_change_type(ConfChangeType::RemoveNode);
                    voters_after.remove(&id);
                }
            }
            if matches!(kind, Kind::AddLearner | Kind::AddVoter) && !change.addr.is_empty() {
                context.peers.push(wraft_proto::peer::PeerRecord {
                    id,
                    addr: change.addr.clone(),
                    incarnation: change.incarnation,
                });
            }
            singles.push(single);
        }
        if singles.is_empty() {
            let _ = reply.send(Err(Error::InvalidArgument(
                "no membership change given".into(),
            )));
            return;
        }
        if voters_after.is_empty() {
            let _ = reply.send(Err(Error::InvalidArgument(
                "the change would leave the cluster without voters".into(),
            )));
            return;
        }
        let mut cc = ConfChangeV2::default();
        cc.set_changes(singles.into());
        match self
            .raw
            .propose_conf_change(prost::Message::encode_to_vec(&context), cc)
        {
            Ok(()) => {
                self.pending_conf = Some(PendingConf {
                    index: self.raw.raft.raft_log.last_index(),
                    term: self.raw.raft.term,
                    reply,
                });
            }
            Err(err) => {
                let _ = reply.send(Err(Error::FailedPrecondition(format!(
                    "membership change refused: {err}"
                ))));
            }
        }
    }

    /// Compacts the log up to `index` (see [`RaftInput::Compact`]), recording the configuration
    /// at that index for snapshots.
    fn compact(&mut self, index: u64) -> Result<(), crate::storage::StorageError> {
        let index = index.min(self.raw.raft.raft_log.applied);
        if index <= self.raw.store().snapshot_index() {
            return Ok(());
        }
        let Some(conf) = self
            .conf_history
            .iter()
            .rev()
            .find(|(at, _)| *at <= index)
            .map(|(_, cs)| cs.clone())
        else {
            tracing::warn!(
                index,
                "no configuration known at the compaction point; not compacting"
            );
            return Ok(());
        };
        self.raw.mut_store().compact(index, &conf)?;
        crate::crashpoint::hit("compacted");
        // Keep the configuration in force at the compaction point and every later one.
        let keep_from = self
            .conf_history
            .iter()
            .rposition(|(at, _)| *at <= index)
            .unwrap_or(0);
        self.conf_history.drain(..keep_from);
        self.compacted.store(index, Ordering::Release);
        METRICS.snapshot_index.set(index as i64);
        tracing::debug!(index, "log compacted");
        Ok(())
    }

    /// Step 2 of a Ready: installs a snapshot whose state was staged.
    fn install_snapshot(
        &mut self,
        snapshot: &raft::eraftpb::Snapshot,
        hard_state: Option<&raft::eraftpb::HardState>,
    ) -> Result<(), crate::storage::StorageError> {
        let index = snapshot.get_metadata().index;
        let generation = match self.staged.take() {
            Some((staged, generation)) if staged == index => generation,
            other => {
                return Err(crate::storage::StorageError::Invalid(format!(
                    "raft installs snapshot {index} but the staged one is {other:?}"
                )))
            }
        };
        crate::crashpoint::hit("snapshot-installing");
        self.raw
            .mut_store()
            .apply_snapshot(snapshot, hard_state, generation)?;
        crate::crashpoint::hit("snapshot-installed");
        let book = self
            .raw
            .store()
            .peers()
            .map(crate::members::from_proto)
            .unwrap_or_default();
        self.adopt_book(book);
        let cs = snapshot.get_metadata().get_conf_state().clone();
        self.conf_history = vec![(index, cs)];
        self.membership_changed = true;
        self.compacted.store(index, Ordering::Release);
        self.generation.store(generation, Ordering::Release);
        self.handed = index;
        METRICS.snapshot_index.set(index as i64);
        METRICS.snapshots_installed.inc();
        tracing::info!(
            index,
            term = snapshot.get_metadata().term,
            "installed a snapshot from the leader"
        );
        let _ = self
            .apply
            .send(ApplyInput::InstallSnapshot { index, generation });
        Ok(())
    }

    fn note_snapshots_sent(&mut self, messages: &[Message]) {
        for m in messages {
            if m.get_msg_type() == raft::eraftpb::MessageType::MsgSnapshot {
                tracing::info!(
                    to = m.to,
                    index = m.get_snapshot().get_metadata().index,
                    "sending a snapshot"
                );
                METRICS.snapshots_sent.inc();
                self.snapshots_out.insert(
                    m.to,
                    SnapshotOut {
                        sent: Instant::now(),
                        fetching: None,
                        streamed: None,
                    },
                );
            }
        }
    }

    /// Forgets transfers the follower has acknowledged, and reports stalled ones as failed so
    /// raft sends another snapshot.
    fn check_snapshot_transfers(&mut self) {
        if self.snapshots_out.is_empty() {
            return;
        }
        let now = Instant::now();
        let mut failed = Vec::new();
        let prs = self.raw.raft.prs();
        self.snapshots_out.retain(|id, out| {
            let waiting = prs
                .get(*id)
                .is_some_and(|pr| pr.state == raft::ProgressState::Snapshot);
            let unacknowledged = out
                .streamed
                .is_some_and(|at| now.duration_since(at) > SNAPSHOT_ACK_GRACE);
            let never_fetched =
                out.fetching.is_none() && now.duration_since(out.sent) > SNAPSHOT_START_GRACE;
            let stalled = now.duration_since(out.sent) > SNAPSHOT_STALL;
            if waiting && (stalled || unacknowledged || never_fetched) {
                failed.push(*id);
                return false;
            }
            waiting
        });
        for id in failed {
            tracing::warn!(
                to = id,
                "a snapshot transfer stalled; raft will send another"
            );
            self.raw.report_snapshot(id, raft::SnapshotStatus::Failure);
        }
    }

    /// Republishes what changed. Runs every iteration, so it allocates only when membership
    /// changed (the voter and learner lists); otherwise it compares a few integers.
    fn publish_status(&mut self) {
        let raft = &self.raw.raft;
        let role = match raft.state {
            StateRole::Leader => Role::Leader,
            StateRole::Candidate => Role::Candidate,
            StateRole::PreCandidate => Role::PreCandidate,
            StateRole::Follower if raft.prs().conf().learners().contains(&raft.id) => Role::Learner,
            StateRole::Follower => Role::Follower,
        };
        let (id, leader, term, commit) =
            (raft.id, raft.leader_id, raft.term, raft.raft_log.committed);
        let snapshot_index = self.raw.store().snapshot_index();
        let members = std::mem::take(&mut self.membership_changed).then(|| {
            let conf = raft.prs().conf();
            let mut voters: Vec<u64> = conf.voters().ids().iter().collect();
            voters.sort_unstable();
            let mut learners: Vec<u64> = conf.learners().iter().copied().collect();
            learners.sort_unstable();
            (voters, learners)
        });
        if role != Role::Leader {
            self.fail_rounds_issued_as_leader();
        }
        let log = &self.raw.raft.raft_log;
        self.status.send_if_modified(|current| {
            let scalars_changed = current.id != id
                || current.role != role
                || current.leader != leader
                || current.term != term
                || current.commit != commit
                || current.snapshot_index != snapshot_index;
            if !scalars_changed && members.is_none() {
                return false;
            }
            METRICS.term.set(term as i64);
            METRICS.is_leader.set(i64::from(role == Role::Leader));
            METRICS.commit_index.set(commit as i64);
            METRICS.log_last_index.set(log.last_index() as i64);
            METRICS
                .log_entries
                .set((log.last_index() + 1).saturating_sub(log.first_index()) as i64);
            if current.role != role || current.term != term {
                METRICS.leader_changes.inc();
                // The fault tests check Raft's invariants from these lines (one leader per term,
                // commit never going backwards): keep the fields.
                tracing::info!(role = ?role, term, leader, commit, "raft role changed");
            }
            current.id = id;
            current.role = role;
            current.leader = leader;
            current.term = term;
            current.commit = commit;
            current.snapshot_index = snapshot_index;
            if let Some((voters, learners)) = members {
                current.voters = voters;
                current.learners = learners;
            }
            true
        });
    }

    fn shutdown(self) -> Result<(), crate::storage::StorageError> {
        for (_, read) in self.reads {
            for reply in read.replies {
                let _ = reply.send(Err(Error::ShuttingDown));
            }
        }
        let _ = self.apply.send(ApplyInput::Shutdown);
        Ok(())
    }
}

fn op_size(op: &Op) -> usize {
    prost::Message::encoded_len(op)
}

fn ctx_of(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.try_into().ok()?))
}

#[cfg(test)]
mod lease_tests {
    use super::*;

    #[test]
    fn a_lease_serves_until_it_ends_or_is_revoked() {
        let lease = Lease::default();
        assert_eq!(lease.read_index(), None, "no lease before a grant");
        lease.publish_commit(7);
        lease.grant(Instant::now() + Duration::from_secs(60), false);
        assert_eq!(lease.read_index(), Some(7));
        lease.publish_commit(5);
        assert_eq!(
            lease.read_index(),
            Some(7),
            "the commit index never goes back"
        );
        lease.grant(Instant::now() + Duration::from_secs(1), true);
        assert!(
            lease.remaining() > Duration::from_secs(30),
            "extending keeps the later end"
        );
        lease.revoke();
        assert_eq!(lease.read_index(), None, "a revoked lease serves nothing");
        let ended = Instant::now()
            .checked_sub(Duration::from_millis(1))
            .unwrap_or_else(Instant::now);
        lease.grant(ended, false);
        assert_eq!(
            lease.read_index(),
            None,
            "a lease that ended serves nothing"
        );
        assert!(lease.wanted_within(Duration::from_secs(1)));
    }

    #[test]
    fn the_lease_is_shorter_than_the_followers_vote_refusal() {
        // Followers refuse votes for at least ELECTION_TICKS - 2 ticks after hearing from the
        // leader (tick phase); the lease must end before that, with room for clock drift.
        let refusal = TICK * (ELECTION_TICKS as u32 - 2);
        assert!(LEASE < refusal, "{LEASE:?} vs {refusal:?}");
        assert!(refusal - LEASE >= refusal / 10, "drift margin under 10%");
        assert!(
            LEASE >= Duration::from_millis(500),
            "a lease too short to be useful"
        );
    }
}
