//! The apply stage: the thread that feeds committed entries, in log order, to the tenants'
//! modules and answers the clients waiting for them.
//!
//! It runs apart from the Raft loop so that a slow module never delays consensus. Inputs arrive
//! on one ordered channel: the Raft loop registers a proposal's waiter ([`ApplyInput::Track`])
//! before the entry can commit, then hands over committed entries; the client API asks for
//! queries and digests on the same channel, so a read runs against a well-defined applied index.
//!
//! Invariant: `applied` only grows, and every op at a position up to `applied` has been applied
//! to its tenant exactly once (or is covered by the tenant's checkpoint).
//! Invariant: a waiter is answered exactly once: with its op's outcome when the entry at its
//! index carries its proposal id, with a definite `Superseded` error when another entry took
//! the index, or with an indeterminate error when the node stops first.
//! Invariant: a forwarded waiter (a follower's op, whose index only the leader knew) is answered
//! exactly once: with its op's outcome when an applied entry carries its proposal id, or with an
//! indeterminate error once an entry of a later term applies without it (or the node stops, or a
//! snapshot replaces the state).

mod tenant;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use crossbeam_channel::Receiver;
use prost::Message as _;
use raft::eraftpb::{Entry, EntryType};
use sha2::{Digest as _, Sha256};
use tokio::sync::oneshot;
use wraft_proto::client::module_error::Kind;
use wraft_proto::log::{op, Op, ProposalId, TenantCheckpoint};

pub use tenant::{EntryMeta, OpOutcome, OpPos};
use tenant::{Env, Tenant};

use crate::envelope;
use crate::metrics::METRICS;
use crate::storage::StateStore;
use crate::wasm::{Limits, Module, Runtime};
use crate::Error;

/// The result of an applied op, or of a query, with the index it describes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub index: u64,
    pub outcome: OpOutcome,
}

/// What the apply stage is asked to do.
pub enum ApplyInput {
    /// Committed entries, in log order.
    Committed(Vec<Entry>),
    /// Proposals whose entries are in the log but not yet applied.
    Track(Vec<Waiter>),
    /// Proposals this follower sent to the leader (raft-rs forwards them): their index is not
    /// known here, so they are found by proposal id.
    TrackForwarded(Vec<ForwardedWaiter>),
    /// A query to run once the applied index reaches `min_index`.
    Query(QueryTask),
    /// A hash of a tenant's state.
    Digest(DigestTask),
    /// The bytes of the module a tenant ran as a given version (for a rollback).
    ModuleOf(ModuleTask),
    /// Replace every tenant's state with an installed snapshot's, staged under `generation`;
    /// `index` is the snapshot's. Arrives in log order, before the entries that follow it.
    InstallSnapshot { index: u64, generation: u64 },
    /// Make a compaction point now (a new member needs a snapshot that names it).
    CompactNow,
    /// Checkpoint what changed, then stop.
    Shutdown,
    /// Stop at once, writing nothing: what `kill -9` does, for tests of replay.
    #[cfg(test)]
    Abort,
}

/// A client waiting for its op to apply.
pub struct Waiter {
    pub index: u64,
    pub position: u32,
    pub id: ProposalId,
    pub reply: oneshot::Sender<Result<Applied, Error>>,
}

/// A client waiting for an op this node proposed as a follower.
pub struct ForwardedWaiter {
    pub id: ProposalId,
    /// This node's term when it sent the op: an entry of a later term applied without the op
    /// means the op was lost with a leader (or will land later, rarely): the answer is then
    /// indeterminate, at once rather than at the request's timeout.
    pub term: u64,
    pub reply: oneshot::Sender<Result<Applied, Error>>,
}

/// A proposal id as a map key.
type IdKey = (u64, u64, u64);

fn id_key(id: &ProposalId) -> IdKey {
    (id.node, id.boot, id.seq)
}

pub struct QueryTask {
    pub tenant: String,
    pub query: Vec<u8>,
    pub min_index: u64,
    pub reply: oneshot::Sender<Result<Applied, Error>>,
}

pub struct ModuleTask {
    pub tenant: String,
    pub version: u64,
    pub reply: oneshot::Sender<Result<Vec<u8>, Error>>,
}

pub struct DigestTask {
    pub tenant: String,
    pub reply: oneshot::Sender<Result<DigestInfo, Error>>,
}

/// A tenant's state hash on this node.
#[derive(Debug, Clone)]
pub struct DigestInfo {
    pub index: u64,
    pub state_hash: String,
    pub module_hash: String,
}

/// What the rest of the node may read about applied state without asking the stage.
#[derive(Debug, Clone, Default)]
pub struct AppliedView {
    pub applied: u64,
    /// Per tenant: module hash (hex) and the index of the last entry that changed it.
    pub tenants: BTreeMap<String, TenantView>,
    /// Set when the stage stopped applying (an entry it cannot read): the node must be upgraded
    /// or repaired; it will not diverge silently.
    pub halted: Option<String>,
}

/// One tenant as the status API shows it.
#[derive(Debug, Clone, Default)]
pub struct TenantView {
    pub module_hash: String,
    /// The index of the last entry that changed the tenant.
    pub last_index: u64,
    pub version: u64,
    pub memory_bytes: u64,
    pub model: crate::wasm::Model,
    pub limits: crate::wasm::Limits,
    /// (version, module hash hex, deploy index), oldest first.
    pub history: Vec<(u64, String, u64)>,
    /// Until when this node takes no new commands for the tenant: its traps have cost the
    /// apply thread more than their share (see `TrapBudget` in `apply/tenant.rs`).
    pub commands_refused_until: Option<std::time::Instant>,
}

pub type SharedView = Arc<RwLock<AppliedView>>;

/// Compiled modules by hash, shared with the client API so that the leader's validation
/// compile is reused at apply.
pub type ModuleCache = Arc<Mutex<HashMap<[u8; 32], Module>>>;

/// The apply stage's state; owned by its thread.
pub struct ApplyStage {
    runtime: Runtime,
    limits: Limits,
    store: StateStore,
    modules: ModuleCache,
    tenants: BTreeMap<String, Tenant>,
    waiters: BTreeMap<u64, Vec<Waiter>>,
    forwarded: HashMap<IdKey, ForwardedWaiter>,
    /// The lowest term among `forwarded` (0: none): entries of a later term trigger a sweep.
    forwarded_min_term: u64,
    parked: BTreeMap<u64, Vec<QueryTask>>,
    applied: u64,
    /// The position of the last op applied; checkpoints at shutdown are taken there.
    last_pos: OpPos,
    view: SharedView,
    halted: Option<String>,
    /// `applied`, readable by the Raft loop without asking: it bounds how far apply may lag.
    applied_shared: Arc<AtomicU64>,
    /// Tenants changed since the view was last published: only they are republished, so an
    /// apply batch costs the same with one tenant or a thousand idle ones.
    touched: BTreeSet<String>,
    /// See [`Env::log_floor`]: the last compaction asked for, or the installed snapshot.
    log_floor: u64,
    /// Compaction: after this many entries every changed tenant is checkpointed and the Raft
    /// loop is told it may drop the log up to there. 0: never.
    snapshot_entries: u64,
    entries_since_compaction: u64,
    raft: Option<crossbeam_channel::Sender<crate::raft_loop::RaftInput>>,
}

impl ApplyStage {
    /// Loads every tenant from its checkpoint. Returns the stage and the index raft must
    /// consider applied: entries after it are delivered again and replayed into the tenants
    /// whose checkpoints do not cover them.
    pub fn open(
        runtime: Runtime,
        limits: Limits,
        store: StateStore,
        modules: ModuleCache,
        view: SharedView,
    ) -> Result<(Self, u64), crate::storage::StorageError> {
        let env = Env {
            runtime: &runtime,
            limits: &limits,
            store: &store,
            log_floor: 0,
        };
        let (tenants, replay_from) = load_tenants(&env)?;
        // The checkpoint's own entry is delivered again: ops after its position in it apply.
        let raft_applied = replay_from.map_or(0, |i| i.saturating_sub(1));
        let mut stage = ApplyStage {
            runtime,
            limits,
            store,
            modules,
            tenants,
            waiters: BTreeMap::new(),
            forwarded: HashMap::new(),
            forwarded_min_term: 0,
            parked: BTreeMap::new(),
            applied: raft_applied,
            last_pos: (raft_applied, 0),
            view,
            halted: None,
            applied_shared: Arc::new(AtomicU64::new(raft_applied)),
            touched: BTreeSet::new(),
            log_floor: 0,
            snapshot_entries: 0,
            entries_since_compaction: 0,
            raft: None,
        };
        stage.touched = stage.tenants.keys().cloned().collect();
        stage.publish();
        tracing::info!(
            tenants = stage.tenants.len(),
            replay_from = raft_applied + 1,
            "apply stage loaded its checkpoints"
        );
        Ok((stage, raft_applied))
    }

    /// Starts compacting the log: every `every` entries, changed tenants are checkpointed and
    /// `raft` is told it may drop the log up to the applied index. `floor` is the current
    /// compaction point (see [`Env::log_floor`]).
    pub fn compact_every(
        &mut self,
        every: u64,
        floor: u64,
        raft: crossbeam_channel::Sender<crate::raft_loop::RaftInput>,
    ) {
        self.snapshot_entries = every;
        self.log_floor = floor;
        self.raft = Some(raft);
        // Raft delivers nothing at or below the compaction point again.
        if self.applied < floor {
            self.applied = floor;
            self.last_pos = (floor, 0);
            self.publish();
        }
    }

    /// A handle on the state store (for serving snapshots and staging them).
    pub fn store(&self) -> StateStore {
        self.store.clone()
    }

    /// The index raft must consider applied at start: never below the compaction point, which
    /// raft-rs treats as applied already.
    pub fn start_index(replay_from: u64, floor: u64) -> u64 {
        replay_from.max(floor)
    }

    /// The applied index, updated as entries apply: the Raft loop reads it to stop taking
    /// proposals while apply lags too far (backpressure instead of an unbounded queue).
    pub fn applied_index(&self) -> Arc<AtomicU64> {
        self.applied_shared.clone()
    }

    /// Runs until [`ApplyInput::Shutdown`] or until every sender is gone.
    pub fn run(mut self, inbox: Receiver<ApplyInput>) {
        while let Ok(input) = inbox.recv() {
            match input {
                ApplyInput::Committed(entries) => {
                    for entry in entries {
                        self.apply_entry(entry);
                        self.entries_since_compaction += 1;
                    }
                    if self.snapshot_entries > 0
                        && self.entries_since_compaction >= self.snapshot_entries
                    {
                        self.checkpoint_for_compaction();
                    }
                    self.publish();
                    self.serve_parked();
                    self.waiters.retain(|_, ws| {
                        ws.retain(|w| !w.reply.is_closed());
                        !ws.is_empty()
                    });
                    self.forwarded.retain(|_, w| !w.reply.is_closed());
                }
                ApplyInput::TrackForwarded(waiters) => {
                    for w in waiters {
                        if self.forwarded.is_empty() || w.term < self.forwarded_min_term {
                            self.forwarded_min_term = w.term;
                        }
                        self.forwarded.insert(id_key(&w.id), w);
                    }
                }
                ApplyInput::Track(waiters) => {
                    for w in waiters {
                        if w.index <= self.applied {
                            let _ = w.reply.send(Err(Error::Superseded { index: w.index }));
                        } else {
                            self.waiters.entry(w.index).or_default().push(w);
                        }
                    }
                }
                ApplyInput::Query(task) => {
                    if task.min_index <= self.applied {
                        self.run_query(task);
                    } else {
                        self.parked.entry(task.min_index).or_default().push(task);
                    }
                }
                ApplyInput::Digest(task) => self.digest(task),
                ApplyInput::ModuleOf(task) => self.module_of(task),
                ApplyInput::CompactNow => {
                    if self.snapshot_entries > 0 {
                        self.checkpoint_for_compaction();
                    }
                }
                ApplyInput::InstallSnapshot { index, generation } => {
                    self.install_snapshot(index, generation);
                    self.serve_parked();
                }
                ApplyInput::Shutdown => break,
                #[cfg(test)]
                ApplyInput::Abort => return,
            }
        }
        self.shutdown();
    }

    /// Checkpoints every tenant changed since its last checkpoint at the last applied op, so
    /// every tenant's checkpoint covers all its ops up to `applied`, then lets the Raft loop
    /// drop the log up to there. The checkpoints are durable first: those written past the
    /// WAL are flushed and waited for, and RocksDB's log is ordered for the rest, so a
    /// compaction that survives a crash implies the checkpoints did.
    fn checkpoint_for_compaction(&mut self) {
        self.entries_since_compaction = 0;
        if self.halted.is_some() || self.applied <= self.log_floor {
            return;
        }
        let env = Env {
            runtime: &self.runtime,
            limits: &self.limits,
            store: &self.store,
            log_floor: self.log_floor,
        };
        let at = self.last_pos;
        for tenant in self.tenants.values_mut() {
            tenant.checkpoint_if_dirty(&env, at);
        }
        crate::crashpoint::hit("compaction-checkpointed");
        if let Err(err) = self.store.make_checkpoints_durable() {
            tracing::error!(%err, "flushing checkpoints for a compaction failed; the log is kept");
            return;
        }
        // A tenant whose checkpoint failed (its `snapshot` trapped) still needs the log from
        // its last checkpoint's entry on: compact no further, or its ops would be lost.
        let mut index = self.applied;
        for (name, tenant) in &self.tenants {
            if tenant.is_dirty() {
                let keep_from = tenant.checkpoint_pos().0;
                tracing::warn!(tenant = %name, keep_from, "a tenant could not be checkpointed; the log is kept from its last checkpoint");
                index = index.min(keep_from.saturating_sub(1));
            }
        }
        if index <= self.log_floor {
            return;
        }
        if let Some(raft) = &self.raft {
            if raft
                .try_send(crate::raft_loop::RaftInput::Compact { index })
                .is_ok()
            {
                self.log_floor = index;
            }
        }
    }

    /// Replaces every tenant with the state of an installed snapshot (see
    /// [`ApplyInput::InstallSnapshot`]). Waiters for entries up to `index` will never see them
    /// applied here: they get an indeterminate answer (the cluster may have applied them).
    fn install_snapshot(&mut self, index: u64, generation: u64) {
        let mut changed: BTreeSet<String> = self.tenants.keys().cloned().collect();
        self.tenants.clear();
        if let Err(err) = self.store.switch_generation(generation) {
            let why = format!("installing the snapshot at {index}: {err}");
            tracing::error!("{why}; this node stops applying");
            self.halted = Some(why);
            return;
        }
        let env = Env {
            runtime: &self.runtime,
            limits: &self.limits,
            store: &self.store,
            log_floor: index,
        };
        match load_tenants(&env) {
            Ok((tenants, _)) => {
                changed.extend(tenants.keys().cloned());
                self.tenants = tenants;
            }
            Err(err) => {
                let why = format!("loading the snapshot installed at {index}: {err}");
                tracing::error!("{why}; this node stops applying");
                self.halted = Some(why);
            }
        }
        self.log_floor = index;
        self.applied = index;
        self.last_pos = (index, 0);
        self.entries_since_compaction = 0;
        while let Some((&waiting_index, _)) = self.waiters.first_key_value() {
            if waiting_index > index {
                break;
            }
            if let Some((_, waiters)) = self.waiters.pop_first() {
                for w in waiters {
                    let _ = w.reply.send(Err(Error::Interrupted));
                }
            }
        }
        // A forwarded op may be inside the snapshot: whether it applied cannot be told.
        self.fail_forwarded(|_| true, || Error::Interrupted);
        self.touched.extend(changed);
        self.publish();
        tracing::info!(
            index,
            generation,
            tenants = self.tenants.len(),
            "installed a snapshot"
        );
    }

    fn apply_entry(&mut self, entry: Entry) {
        if self.halted.is_some() {
            return;
        }
        let index = entry.index;
        let mut meta = EntryMeta {
            term: entry.term,
            timestamp_ms: 0,
        };
        let ops: Vec<Op> =
            if entry.get_entry_type() == EntryType::EntryNormal && !entry.data.is_empty() {
                match envelope::decode(&entry.data) {
                    Ok(e) => {
                        meta.timestamp_ms = e.timestamp_ms;
                        e.ops
                    }
                    Err(err) => {
                        let why = format!("cannot apply log entry {index}: {err}");
                        tracing::error!("{why}; this node stops applying rather than diverge");
                        self.halted = Some(why);
                        return;
                    }
                }
            } else {
                // Empty entries (a new leader's) and conf changes change no tenant.
                Vec::new()
            };
        // A deploy made under another engine: applying it (or anything after it) here could
        // diverge from the replicas that share the leader's engine. Stop before the entry.
        if let Some(engine) = ops.iter().find_map(|op| match &op.kind {
            Some(op::Kind::Deploy(d)) if d.engine != crate::wasm::ENGINE => Some(d.engine.clone()),
            _ => None,
        }) {
            let why = format!(
                "log entry {index} deploys a module under the Wasm engine `{engine}`, but this node runs `{}`: upgrade this node to the cluster's wraft build",
                crate::wasm::ENGINE
            );
            tracing::error!("{why}; this node stops applying rather than diverge");
            for (_, waiters) in std::mem::take(&mut self.waiters) {
                for w in waiters {
                    let _ = w.reply.send(Err(Error::Internal(why.clone())));
                }
            }
            self.fail_forwarded(|_| true, || Error::Internal(why.clone()));
            self.halted = Some(why);
            return;
        }
        let mut outcomes = Vec::with_capacity(ops.len());
        for (pos, op) in ops.iter().enumerate() {
            let at = (index, pos as u32);
            let outcome = self.apply_op(at, meta, op);
            if let Some(OpOutcome::Failed { kind, message }) = &outcome {
                tracing::debug!(request_id = %op.request_id, tenant = %op.tenant, index, position = pos, kind = kind.as_str_name(), %message, "op failed");
            } else {
                tracing::trace!(request_id = %op.request_id, tenant = %op.tenant, index, position = pos, "op applied");
            }
            outcomes.push(outcome);
            self.last_pos = at;
        }
        self.applied = index;
        // A deploy or delete changes which tenants exist, and the client API checks that against
        // the published view: publish before answering, so a client that deployed can use the
        // tenant at once (read-your-writes). Commands wait for the end of the batch.
        if ops.iter().any(|op| {
            matches!(
                op.kind,
                Some(op::Kind::Deploy(_)) | Some(op::Kind::Delete(_))
            )
        }) {
            self.publish();
        }
        // Answer every waiter up to this index: an index is applied once, in order, so a waiter
        // still here after its index is applied lost it to another entry.
        while let Some((&waiting_index, _)) = self.waiters.first_key_value() {
            if waiting_index > index {
                break;
            }
            let Some((_, waiters)) = self.waiters.pop_first() else {
                break;
            };
            for w in waiters {
                let mine = (waiting_index == index)
                    .then(|| ops.get(w.position as usize))
                    .flatten()
                    .filter(|op| op.id.as_ref() == Some(&w.id))
                    .and_then(|_| outcomes.get(w.position as usize).cloned().flatten());
                let answer = match mine {
                    Some(outcome) => Ok(Applied { index, outcome }),
                    None => Err(Error::Superseded {
                        index: waiting_index,
                    }),
                };
                let _ = w.reply.send(answer);
            }
        }
        if !self.forwarded.is_empty() {
            self.answer_forwarded(index, entry.term, &ops, &outcomes);
        }
    }

    /// Answers the forwarded waiters whose ops this entry carries; once an entry of a later
    /// term than a waiter's applies, its op was lost with its leader, or (rarely: forwarded on
    /// by a deposed leader) lands later: either way the client hears "indeterminate" now.
    fn answer_forwarded(
        &mut self,
        index: u64,
        term: u64,
        ops: &[Op],
        outcomes: &[Option<OpOutcome>],
    ) {
        for (op, outcome) in ops.iter().zip(outcomes) {
            let Some(w) = op
                .id
                .as_ref()
                .and_then(|id| self.forwarded.remove(&id_key(id)))
            else {
                continue;
            };
            let answer = match outcome {
                Some(outcome) => Ok(Applied {
                    index,
                    outcome: outcome.clone(),
                }),
                // Covered by a checkpoint: cannot happen for an op proposed by this process.
                None => Err(Error::Interrupted),
            };
            let _ = w.reply.send(answer);
        }
        if term > self.forwarded_min_term {
            self.fail_forwarded(|w| w.term < term, || Error::LeaderChanged);
        }
    }

    /// Answers (with `error`) and forgets the forwarded waiters `lost` picks.
    fn fail_forwarded(
        &mut self,
        lost: impl Fn(&ForwardedWaiter) -> bool,
        error: impl Fn() -> Error,
    ) {
        let ids: Vec<IdKey> = self
            .forwarded
            .iter()
            .filter(|(_, w)| lost(w))
            .map(|(k, _)| *k)
            .collect();
        for id in ids {
            if let Some(w) = self.forwarded.remove(&id) {
                let _ = w.reply.send(Err(error()));
            }
        }
        self.forwarded_min_term = self.forwarded.values().map(|w| w.term).min().unwrap_or(0);
    }

    /// Applies one op. `None` when the tenant's checkpoint already covers it (a replay after
    /// restart).
    fn apply_op(&mut self, at: OpPos, meta: EntryMeta, op: &Op) -> Option<OpOutcome> {
        if let Some(t) = self.tenants.get(&op.tenant) {
            if at <= t.checkpoint_pos() {
                return None;
            }
        }
        if !self.touched.contains(&op.tenant) {
            self.touched.insert(op.tenant.clone());
        }
        let outcome = match &op.kind {
            Some(op::Kind::Deploy(deploy)) => {
                self.deploy(at, meta, &op.tenant, &deploy.wasm, &deploy.module_hash)
            }
            Some(op::Kind::SetLimits(set)) => {
                let env = Env {
                    runtime: &self.runtime,
                    limits: &self.limits,
                    store: &self.store,
                    log_floor: self.log_floor,
                };
                let change = set.limits.unwrap_or_default();
                match self.tenants.get_mut(&op.tenant) {
                    Some(tenant) => tenant.set_limits(&env, at, &change),
                    None => OpOutcome::Failed {
                        kind: Kind::UnknownTenant,
                        message: format!("tenant `{}` does not exist", op.tenant),
                    },
                }
            }
            Some(op::Kind::Delete(_)) => match self.tenants.remove(&op.tenant) {
                Some(_) => {
                    if let Err(err) = self.store.delete_checkpoint(&op.tenant) {
                        tracing::error!(tenant = %op.tenant, %err, "deleting a checkpoint failed");
                    }
                    if let Err(err) = self.store.delete_tenant_data(&op.tenant) {
                        tracing::error!(tenant = %op.tenant, %err, "deleting a tenant's storage failed");
                    }
                    tracing::info!(tenant = %op.tenant, index = at.0, "tenant deleted");
                    OpOutcome::Output(Vec::new())
                }
                None => OpOutcome::Failed {
                    kind: Kind::UnknownTenant,
                    message: format!("tenant `{}` does not exist", op.tenant),
                },
            },
            Some(op::Kind::Command(cmd)) => {
                let env = Env {
                    runtime: &self.runtime,
                    limits: &self.limits,
                    store: &self.store,
                    log_floor: self.log_floor,
                };
                match self.tenants.get_mut(&op.tenant) {
                    Some(tenant) => tenant.exec(&env, at, meta, cmd),
                    None => OpOutcome::Failed {
                        kind: Kind::UnknownTenant,
                        message: format!("tenant `{}` does not exist", op.tenant),
                    },
                }
            }
            None => OpOutcome::Failed {
                kind: Kind::Rejected,
                message: "empty op".into(),
            },
        };
        Some(outcome)
    }

    fn deploy(
        &mut self,
        at: OpPos,
        meta: EntryMeta,
        name: &str,
        wasm: &[u8],
        expected_hash: &[u8],
    ) -> OpOutcome {
        let module = match self.module(wasm) {
            Ok(m) => m,
            Err(message) => {
                return OpOutcome::Failed {
                    kind: Kind::Rejected,
                    message: format!("deploy tenant {name}: {message}"),
                }
            }
        };
        if module.hash().as_slice() != expected_hash {
            return OpOutcome::Failed {
                kind: Kind::Rejected,
                message: format!("deploy tenant {name}: module hash does not match the proposal"),
            };
        }
        let env = Env {
            runtime: &self.runtime,
            limits: &self.limits,
            store: &self.store,
            log_floor: self.log_floor,
        };
        match self.tenants.get_mut(name) {
            Some(tenant) => tenant.upgrade(&env, module, wasm, at, meta),
            None => match Tenant::create(&env, name, module, wasm, at, meta) {
                Ok(tenant) => {
                    let out = OpOutcome::Output(tenant.module_hash_hex().into_bytes());
                    self.tenants.insert(name.to_string(), tenant);
                    tracing::info!(tenant = name, index = at.0, "tenant created");
                    out
                }
                Err(outcome) => outcome,
            },
        }
    }

    /// The compiled module for these bytes, from the cache when the leader's validation (or an
    /// earlier deploy) compiled it already.
    fn module(&mut self, wasm: &[u8]) -> Result<Module, String> {
        let hash: [u8; 32] = Sha256::digest(wasm).into();
        if let Ok(cache) = self.modules.lock() {
            if let Some(m) = cache.get(&hash) {
                return Ok(m.clone());
            }
        }
        let module = self
            .runtime
            .compile(wasm, &self.limits)
            .map_err(|e| e.to_string())?;
        if let Ok(mut cache) = self.modules.lock() {
            cache.insert(hash, module.clone());
        }
        Ok(module)
    }

    fn run_query(&mut self, task: QueryTask) {
        let env = Env {
            runtime: &self.runtime,
            limits: &self.limits,
            store: &self.store,
            log_floor: self.log_floor,
        };
        let answer = match self.tenants.get_mut(&task.tenant) {
            Some(tenant) => match tenant.queries_paused_for() {
                Some((left, bytes)) => Err(Error::Paused(format!(
                    "tenant `{}`: its queries are paused on this node for another {} ms: one trapped, and rebuilding its state ({bytes} bytes of memory) holds the apply thread that every tenant shares; retry later",
                    task.tenant,
                    left.as_millis(),
                ))),
                None => Ok(Applied {
                    index: self.applied,
                    outcome: tenant.query(&env, self.applied, &task.query),
                }),
            },
            None => Err(Error::UnknownTenant(task.tenant)),
        };
        let _ = task.reply.send(answer);
    }

    fn serve_parked(&mut self) {
        while let Some((&min_index, _)) = self.parked.first_key_value() {
            if min_index > self.applied {
                break;
            }
            if let Some((_, tasks)) = self.parked.pop_first() {
                for task in tasks {
                    self.run_query(task);
                }
            }
        }
    }

    fn module_of(&mut self, task: ModuleTask) {
        let answer = match self.tenants.get(&task.tenant) {
            None => Err(Error::UnknownTenant(task.tenant)),
            Some(tenant) => match tenant.history().iter().find(|v| v.version == task.version) {
                None => Err(Error::FailedPrecondition(format!(
                    "rollback tenant {}: it never ran a version {} (versions: {})",
                    task.tenant,
                    task.version,
                    tenant
                        .history()
                        .iter()
                        .map(|v| v.version.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))),
                Some(v) => {
                    let hash = hex::encode(&v.module_hash);
                    match self.store.module(&hash) {
                        Ok(Some(bytes)) => Ok(bytes),
                        Ok(None) => Err(Error::FailedPrecondition(format!(
                            "rollback tenant {}: module {hash} of version {} is no longer stored",
                            task.tenant, task.version
                        ))),
                        Err(err) => Err(Error::Internal(format!(
                            "rollback tenant {}: reading module {hash}: {err}",
                            task.tenant
                        ))),
                    }
                }
            },
        };
        let _ = task.reply.send(answer);
    }

    fn digest(&mut self, task: DigestTask) {
        let env = Env {
            runtime: &self.runtime,
            limits: &self.limits,
            store: &self.store,
            log_floor: self.log_floor,
        };
        let answer = match self.tenants.get_mut(&task.tenant) {
            None => Err(Error::UnknownTenant(task.tenant)),
            Some(tenant) => tenant
                .snapshot(&env, self.applied)
                .map(|snapshot| DigestInfo {
                    index: tenant.last_index(),
                    state_hash: hex::encode(Sha256::digest(&snapshot)),
                    module_hash: tenant.module_hash_hex(),
                })
                .map_err(|e| {
                    Error::FailedPrecondition(format!(
                        "digest of tenant {}: snapshot failed: {e}",
                        task.tenant
                    ))
                }),
        };
        let _ = task.reply.send(answer);
    }

    fn publish(&mut self) {
        METRICS.applied_index.set(self.applied as i64);
        self.applied_shared.store(self.applied, Ordering::Release);
        let touched = std::mem::take(&mut self.touched);
        if let Ok(mut view) = self.view.write() {
            view.applied = self.applied;
            view.halted = self.halted.clone();
            for name in touched {
                match self.tenants.get(&name) {
                    Some(t) => {
                        let tenant = TenantView {
                            module_hash: t.module_hash_hex(),
                            last_index: t.last_index(),
                            version: t.version(),
                            memory_bytes: t.memory_bytes(),
                            model: t.model(),
                            limits: t.limits().clone(),
                            history: t
                                .history()
                                .iter()
                                .map(|v| (v.version, hex::encode(&v.module_hash), v.index))
                                .collect(),
                            commands_refused_until: t.commands_refused_until(),
                        };
                        view.tenants.insert(name, tenant);
                    }
                    None => {
                        view.tenants.remove(&name);
                    }
                }
            }
        }
    }

    /// Checkpoints every tenant that changed, so a restart replays little, and answers what is
    /// still waiting: the node stops before those ops are known to be applied.
    fn shutdown(mut self) {
        let env = Env {
            runtime: &self.runtime,
            limits: &self.limits,
            store: &self.store,
            log_floor: self.log_floor,
        };
        let at = self.last_pos;
        for tenant in self.tenants.values_mut() {
            tenant.checkpoint_if_dirty(&env, at);
        }
        if let Err(err) = self.store.flush() {
            tracing::error!(%err, "flushing state at shutdown failed");
        }
        for (_, waiters) in std::mem::take(&mut self.waiters) {
            for w in waiters {
                let _ = w.reply.send(Err(Error::Interrupted));
            }
        }
        self.fail_forwarded(|_| true, || Error::Interrupted);
        for (_, tasks) in std::mem::take(&mut self.parked) {
            for t in tasks {
                let _ = t.reply.send(Err(Error::ShuttingDown));
            }
        }
        tracing::info!(applied = self.applied, "apply stage stopped");
    }
}

/// Every tenant from its stored checkpoint, and the lowest checkpoint index (where replay
/// must start): at startup, and after a snapshot is installed.
fn load_tenants(
    env: &Env,
) -> Result<(BTreeMap<String, Tenant>, Option<u64>), crate::storage::StorageError> {
    let mut tenants = BTreeMap::new();
    let mut replay_from: Option<u64> = None;
    for (name, bytes) in env.store.checkpoints()? {
        let cp = TenantCheckpoint::decode(bytes.as_slice()).map_err(|e| {
            crate::storage::StorageError::Corrupt(format!("checkpoint of tenant {name}: {e}"))
        })?;
        let at = cp.index;
        let tenant = Tenant::load(env, cp)
            .map_err(|err| crate::storage::StorageError::Unloadable(err.to_string()))?;
        replay_from = Some(replay_from.map_or(at, |r| r.min(at)));
        tenants.insert(name, tenant);
    }
    Ok((tenants, replay_from))
}
