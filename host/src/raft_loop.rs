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
use raft::eraftpb::{ConfChange, ConfChangeV2, Entry, EntryType, Message};
use raft::{RawNode, StateRole};
use tokio::sync::{oneshot, watch};
use wraft_proto::log::{LogEntry, Op};
use wraft_proto::ENVELOPE_VERSION;

use crate::apply::{ApplyInput, Waiter};
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
    /// Stop the loop.
    Shutdown,
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
}

struct PendingRead {
    issued: Instant,
    replies: Vec<oneshot::Sender<Result<u64, Error>>>,
}

impl RaftLoop {
    pub fn new(
        raw: RawNode<RaftStorage>,
        inbox: Receiver<RaftInput>,
        apply: Sender<ApplyInput>,
        transport: Transport,
        status: watch::Sender<RaftStatus>,
        applied: Arc<AtomicU64>,
    ) -> Self {
        let ids = ProposalIds::new(raw.raft.id);
        let handed = applied.load(Ordering::Acquire);
        Self {
            raw,
            inbox,
            apply,
            transport,
            status,
            ids,
            reads: HashMap::new(),
            next_read_ctx: 1,
            stopping: None,
            membership_changed: true,
            applied,
            handed,
        }
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

    fn step(&mut self, msg: Message) {
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
        if let Err(err) = self.raw.step(msg) {
            tracing::debug!(%err, "raft rejected a peer message");
        }
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
        let backlog = self
            .handed
            .saturating_sub(self.applied.load(Ordering::Acquire));
        if backlog > MAX_APPLY_BACKLOG {
            METRICS.proposals_dropped.inc_by(proposals.len() as u64);
            for p in proposals {
                let _ = p.reply.send(Err(Error::Busy("the apply stage is behind")));
            }
            return;
        }
        if self.raw.raft.state != StateRole::Leader {
            let leader = self.raw.raft.leader_id;
            for p in proposals {
                let _ = p.reply.send(Err(Error::NotLeader { leader }));
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
            timestamp_ms: 0,
            ops,
        };
        let data = envelope::encode(&entry);
        let ops = replies.len() as u64;
        match self.raw.propose(Vec::new(), data) {
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
        if self.raw.raft.state != StateRole::Leader {
            let leader = self.raw.raft.leader_id;
            for r in replies {
                let _ = r.send(Err(Error::NotLeader { leader }));
            }
            return;
        }
        let ctx = self.next_read_ctx;
        self.next_read_ctx += 1;
        self.raw.read_index(ctx.to_be_bytes().to_vec());
        self.reads.insert(
            ctx,
            PendingRead {
                issued: Instant::now(),
                replies,
            },
        );
    }

    /// Issues again the reads raft-rs dropped (no leader yet, or no commit in this term yet);
    /// the callers' own deadlines bound how long they wait.
    fn retry_reads(&mut self) {
        let now = Instant::now();
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
                self.raw.read_index(ctx.to_be_bytes().to_vec());
            }
        }
    }

    /// Handles one `Ready`. The order is the rules' order; each step says why it is there.
    fn on_ready(&mut self) -> Result<(), crate::storage::StorageError> {
        if !self.raw.has_ready() {
            return Ok(());
        }
        let mut ready = self.raw.ready();

        // 1. Send messages. These are the ones raft-rs allows before persisting (a leader's
        //    appends and heartbeats): the leader writes its log in parallel with its followers,
        //    which is safe because an entry counts for the leader only once persisted locally.
        if !ready.messages().is_empty() {
            self.transport.send(ready.take_messages());
        }

        // 2. Apply an incoming snapshot. Log compaction, and so snapshot transfer, is not built
        //    yet: the transport refuses MsgSnapshot, so a Ready never carries one. If one ever
        //    did, storage could not install it: stop rather than run on a log with a hole.
        if !ready.snapshot().is_empty() {
            return Err(crate::storage::StorageError::Corrupt(
                "received a raft snapshot, which this build cannot install".into(),
            ));
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
            self.transport.send(light.take_messages());
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
            let result = match entry.get_entry_type() {
                EntryType::EntryConfChange => protobuf::Message::parse_from_bytes(entry.get_data())
                    .map_err(|e| e.to_string())
                    .and_then(|cc: ConfChange| {
                        self.raw.apply_conf_change(&cc).map_err(|e| e.to_string())
                    }),
                EntryType::EntryConfChangeV2 => {
                    protobuf::Message::parse_from_bytes(entry.get_data())
                        .map_err(|e| e.to_string())
                        .and_then(|cc: ConfChangeV2| {
                            self.raw.apply_conf_change(&cc).map_err(|e| e.to_string())
                        })
                }
                EntryType::EntryNormal => continue,
            };
            match result {
                Ok(cs) => {
                    self.membership_changed = true;
                    if let Err(err) = self.raw.mut_store().set_conf_state(&cs) {
                        tracing::error!(%err, "persisting the conf state failed");
                    }
                }
                Err(err) => tracing::warn!(index = entry.index, %err, "conf change not applied"),
            }
        }
        if let Some(last) = entries.last() {
            self.handed = last.index;
        }
        let _ = self.apply.send(ApplyInput::Committed(entries));
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
        let members = std::mem::take(&mut self.membership_changed).then(|| {
            let conf = raft.prs().conf();
            let mut voters: Vec<u64> = conf.voters().ids().iter().collect();
            voters.sort_unstable();
            let mut learners: Vec<u64> = conf.learners().iter().copied().collect();
            learners.sort_unstable();
            (voters, learners)
        });
        if role != Role::Leader && !self.reads.is_empty() {
            // A read confirmed by a former leader could be stale: fail them, the caller retries.
            for (_, read) in self.reads.drain() {
                for reply in read.replies {
                    let _ = reply.send(Err(Error::NotLeader { leader }));
                }
            }
        }
        let log = &self.raw.raft.raft_log;
        self.status.send_if_modified(|current| {
            let scalars_changed = current.id != id
                || current.role != role
                || current.leader != leader
                || current.term != term
                || current.commit != commit;
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
