//! One tenant on one replica: its module, its sessions, its deterministic clock and its durable
//! checkpoint, in either state model the module declares.
//!
//! **Memory model.** The state lives in the module's linear memory. Its durable form is a
//! checkpoint (the module's `snapshot` at op position `(index, position)`, with the sessions)
//! plus the log ops after that position; on restart the checkpoint is restored and the log
//! replayed from there. A trap can leave memory half-changed, so after one the instance is
//! dropped, rebuilt from the checkpoint plus the log up to the trapped op (which then counts as
//! applied-with-error), and checkpointed afresh so that repeated traps stay cheap: in memory,
//! and in storage every few traps (a large state's stored checkpoint is too costly to write on
//! every trap, on the apply thread that every tenant shares).
//!
//! **Store model.** The state lives only in host storage (`storage/tenant_data.rs`); every call
//! runs on a fresh instance, so nothing in memory outlives it. Each op's writes, its session
//! and the checkpoint record (the op's position) are committed in one batch, and a trap's
//! writes are dropped, so there is nothing to rebuild.
//!
//! Invariant: the tenant's state equals the checkpoint plus every op of this tenant after the
//! checkpoint up to the last one applied, each applied exactly once; after a trap it is
//! exactly as before the trapped op, on every replica.
//!
//! Every op that reaches the module gets a [`CallContext`] from the log alone: index, position,
//! term, the leader's timestamp clamped so the tenant's clock never goes back, and a seed
//! derived from (index, position).

use std::collections::HashMap;

use prost::Message as _;
use raft::eraftpb::EntryType;
use sha2::{Digest as _, Sha256};
use wraft_proto::client::module_error::Kind;
use wraft_proto::log::{
    op, Command, ModuleVersion, Session, StoredError, StoredOutcome, TenantCheckpoint,
};

use crate::envelope;
use crate::metrics::METRICS;
use crate::storage::StateStore;
use crate::wasm::{
    CallContext, CallError, Instance, Limits, Model, Module, Runtime, WriteSet, ENGINE,
};

/// What the log says about the entry an op is in, besides its position.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EntryMeta {
    pub term: u64,
    /// The leader's timestamp (`LogEntry.timestamp_ms`).
    pub timestamp_ms: u64,
}

/// The seed of the op at `at`: the same on every replica, different for every op.
fn seed(at: OpPos) -> [u8; 32] {
    let mut hash = Sha256::new();
    hash.update(b"wraft seed v1");
    hash.update(at.0.to_le_bytes());
    hash.update(at.1.to_le_bytes());
    hash.finalize().into()
}

/// A position in the log: an entry's index and an op's position within it.
pub type OpPos = (u64, u32);

/// What applying (or querying) an op produced, as the client will see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpOutcome {
    /// The module's output.
    Output(Vec<u8>),
    /// The module refused or was stopped; the state is unchanged.
    Failed { kind: Kind, message: String },
}

impl OpOutcome {
    fn failed(kind: Kind, message: impl Into<String>) -> Self {
        OpOutcome::Failed {
            kind,
            message: message.into(),
        }
    }

    fn from_call_error(err: &CallError) -> Self {
        let kind = match err {
            CallError::Rejected(_) => Kind::Rejected,
            CallError::OutOfFuel { .. } => Kind::OutOfFuel,
            CallError::MemoryLimit { .. } => Kind::MemoryLimit,
            CallError::ResultTooLarge { .. } => Kind::ResultTooLarge,
            CallError::Trap(_) | CallError::BadAbi(_) | CallError::StackLimit { .. } => Kind::Trap,
        };
        let message = match err {
            CallError::Rejected(msg) => msg.clone(),
            other => other.to_string(),
        };
        OpOutcome::failed(kind, message)
    }

    fn to_stored(&self) -> StoredOutcome {
        use wraft_proto::log::stored_outcome::Outcome;
        StoredOutcome {
            outcome: Some(match self {
                OpOutcome::Output(bytes) => Outcome::Output(bytes.clone()),
                OpOutcome::Failed { kind, message } => Outcome::Error(StoredError {
                    kind: *kind as i32,
                    message: message.clone(),
                }),
            }),
        }
    }

    fn from_stored(stored: Option<StoredOutcome>) -> Self {
        use wraft_proto::log::stored_outcome::Outcome;
        match stored.and_then(|s| s.outcome) {
            Some(Outcome::Output(bytes)) => OpOutcome::Output(bytes),
            Some(Outcome::Error(e)) => {
                OpOutcome::failed(Kind::try_from(e.kind).unwrap_or(Kind::Trap), e.message)
            }
            None => OpOutcome::Output(Vec::new()),
        }
    }
}

/// What a tenant needs from its surroundings.
pub struct Env<'a> {
    pub runtime: &'a Runtime,
    pub limits: &'a Limits,
    pub store: &'a StateStore,
    /// The log holds no entry at or below this index (it was compacted, or the state came from
    /// a snapshot), and every tenant's checkpoint covers all of its ops up to it.
    pub log_floor: u64,
}

/// Why a tenant could not be created, loaded or rebuilt.
#[derive(Debug, thiserror::Error)]
pub enum TenantError {
    #[error("tenant `{tenant}`: {message}")]
    Broken { tenant: String, message: String },
}

/// The last result a session saw.
#[derive(Debug, Clone)]
struct SessionEntry {
    seq: u64,
    outcome: OpOutcome,
    index: u64,
}

impl SessionEntry {
    fn to_proto(&self, client_id: &str) -> Session {
        Session {
            client_id: client_id.to_string(),
            seq: self.seq,
            outcome: Some(self.outcome.to_stored()),
            index: self.index,
        }
    }
}

/// This tenant's metric series, looked up once: apply is a hot path, and a labelled lookup
/// hashes the label and takes a lock each time.
#[derive(Clone)]
struct TenantMetrics {
    applies: prometheus::IntCounter,
    apply_seconds: prometheus::Histogram,
    fuel_used: prometheus::IntCounter,
    memory_bytes: prometheus::IntGauge,
    checkpoints: prometheus::IntCounter,
    checkpoint_bytes: prometheus::IntCounter,
}

impl TenantMetrics {
    fn new(tenant: &str) -> Self {
        Self {
            applies: METRICS.applies.with_label_values(&[tenant]),
            apply_seconds: METRICS.apply_seconds.with_label_values(&[tenant]),
            fuel_used: METRICS.fuel_used.with_label_values(&[tenant]),
            memory_bytes: METRICS.tenant_memory_bytes.with_label_values(&[tenant]),
            checkpoints: METRICS.checkpoints.with_label_values(&[tenant]),
            checkpoint_bytes: METRICS.checkpoint_bytes.with_label_values(&[tenant]),
        }
    }
}

/// A tenant's live state on this replica.
pub struct Tenant {
    name: String,
    module: Module,
    /// `None` after a trap: rebuilt from the checkpoint before the next use.
    instance: Option<Instance>,
    sessions: HashMap<String, SessionEntry>,
    /// Invariant: a checkpoint of this tenant at exactly this position is stored.
    checkpoint: OpPos,
    /// The index of the last entry that changed this tenant.
    last_index: u64,
    ops_since_checkpoint: u64,
    /// The encoded size of the commands applied since the checkpoint: what a replay from it
    /// reads and runs again.
    bytes_since_checkpoint: u64,
    /// The encoded size of the last checkpoint written or loaded: what the next one copies.
    checkpoint_bytes: u64,
    /// A checkpoint held in memory, at or past the stored one: the one the last rebuild
    /// started from, one taken after a trap, or the stored one itself when it was stored while
    /// the tenant traps. The next rebuild starts from it without reading and decoding the
    /// stored checkpoint, and most traps store no checkpoint: for a large state those were
    /// most of a trap's cost, paid on the apply thread that every tenant shares. Dropped at the
    /// first checkpoint stored after the tenant stops trapping; a restart starts from the
    /// stored one.
    rebuild_base: Option<TenantCheckpoint>,
    /// Traps since the stored checkpoint (see [`TRAPS_PER_STORED_CHECKPOINT`]).
    traps_since_checkpoint: u32,
    /// Set by a rebuild that replayed no op onto its checkpoint: the live state is then
    /// exactly the checkpoint's, whose bytes can serve again (see [`Tenant::after_trap`]).
    rebuilt_state_is_base: bool,
    /// Set when a query trapped: this node refuses the tenant's queries until then (see
    /// [`query_pause`]), with the instance's memory size at the trap. Local, like queries:
    /// commands are never refused by it.
    queries_paused_until: Option<(std::time::Instant, u64)>,
    /// What this node's recoveries from the tenant's command traps have cost: past its
    /// share, the node takes no new commands for the tenant for a while (see [`TrapBudget`]).
    trap_budget: TrapBudget,
    /// 1 at the first deploy, +1 at every successful upgrade.
    version: u64,
    /// The timestamp of the last op that reached the module: the context's clock never goes
    /// below it.
    last_timestamp_ms: u64,
    /// Every version the tenant ran, oldest first.
    history: Vec<ModuleVersion>,
    /// The tenant's own limits (replicated through `SetLimits`).
    limits: Limits,
    metrics: TenantMetrics,
}

/// A memory-model tenant is checkpointed after this many of its ops at the least... At 1,000,
/// a 268 KB kv state was checkpointed 17 times a second under 256 clients' writes, and copying
/// those into RocksDB's WAL took 15% of the nodes' CPU (BENCHMARKS.md, "Checkpoints of a small
/// state"); replaying up to 10,000 ops after a trap or a crash takes tens of milliseconds.
const CHECKPOINT_MIN_OPS: u64 = 10_000;
/// ...and once the commands since the last checkpoint add up to 1/N of its encoded size (N is
/// this constant). A checkpoint copies the whole state: at a fixed 1,000 ops a 40 MB kv tenant
/// held 256 clients' writes to 2,400-5,100 ops/s (19,000 with a small state; BENCHMARKS.md,
/// "A large tenant's checkpoints"). Tied to size, checkpoints write at most N bytes per byte of
/// command, and replay after a trap or a restart reads at most 1/N of the state's size in
/// commands.
const CHECKPOINT_STATE_FRACTION: u64 = 2;
/// ...or after this many ops whatever their size, so that replay after a trap or a restart
/// stays bounded when the commands are tiny and the state is large.
const CHECKPOINT_MAX_OPS: u64 = 100_000;
/// After this many traps a checkpoint is stored (the ones between are kept in memory). Replay
/// at a restart meets every trap since the stored checkpoint again and starts over from the
/// checkpoint at each, so this bounds how many times it does.
const TRAPS_PER_STORED_CHECKPOINT: u32 = 8;

/// How long a tenant's queries are refused on a node after one trapped. A trapping query
/// leaves the instance to be rebuilt (a restore of the whole state) on the apply thread that
/// every tenant of the node shares, and queries need no consensus, so a client could have
/// them trap back to back. Pausing for nine times the rebuild's estimated cost (at 200 MB/s,
/// about what a 40 MB state took here) keeps trapping queries under a tenth of the thread;
/// at least a quarter of a second.
pub(super) fn query_pause(state_bytes: u64) -> std::time::Duration {
    let rebuild = std::time::Duration::from_secs_f64(state_bytes as f64 / 200e6);
    (rebuild * 9).max(std::time::Duration::from_millis(250))
}

/// How much of the apply thread, which every tenant of a node shares, one tenant's command
/// traps may take. Recovering from a trap (a restore of the whole state, and a snapshot for
/// the next rebuild unless the trap follows another) costs 40-110 ms for a 40 MB state, and a
/// client looping on a trapping command took 93% of a neighbour's writes (BENCHMARKS.md, "A
/// large tenant that traps").
///
/// Each recovery adds nine times its measured cost to a debt that wall time pays back; while
/// the debt is over [`TrapBudget::BURST`], the node refuses the tenant's new commands
/// (RESOURCE_EXHAUSTED, with the time left), so recoveries get at most about a tenth of the
/// thread. A few traps, or traps of a small state, never reach it. This is admission on each
/// node, not state: commands already in the log apply as they are, on every replica, so the
/// replicated state stays deterministic. Every replica pays for the same traps, so every one
/// refuses at about the same time.
#[derive(Debug, Clone, Default)]
pub(super) struct TrapBudget {
    debt: std::time::Duration,
    settled_at: Option<std::time::Instant>,
}

impl TrapBudget {
    /// The debt a tenant may run up before its commands are refused (about 110 ms of trap
    /// recovery in a burst).
    pub const BURST: std::time::Duration = std::time::Duration::from_secs(1);
    /// A recovery that took `t` is paid back over `t * PAYBACK` of wall time.
    pub const PAYBACK: u32 = 9;

    /// Pays the debt back for the time since the last charge.
    fn settle(&mut self, now: std::time::Instant) {
        if let Some(at) = self.settled_at {
            self.debt = self.debt.saturating_sub(now.saturating_duration_since(at));
        }
        self.settled_at = Some(now);
    }

    /// Records a trap recovery that took `cost`, ending at `now`.
    pub fn charge(&mut self, cost: std::time::Duration, now: std::time::Instant) {
        self.settle(now);
        self.debt = self.debt.saturating_add(cost.saturating_mul(Self::PAYBACK));
    }

    /// Until when the tenant's commands are refused, if they are (possibly in the past).
    pub fn refuse_until(&self) -> Option<std::time::Instant> {
        let over = self.debt.checked_sub(Self::BURST)?;
        Some(self.settled_at? + over)
    }
}

/// Whether a memory-model tenant is due a checkpoint (see [`CHECKPOINT_MIN_OPS`]).
pub(super) fn checkpoint_due(ops_since: u64, bytes_since: u64, checkpoint_bytes: u64) -> bool {
    ops_since >= CHECKPOINT_MIN_OPS
        && (bytes_since.saturating_mul(CHECKPOINT_STATE_FRACTION) >= checkpoint_bytes
            || ops_since >= CHECKPOINT_MAX_OPS)
}

impl Tenant {
    /// A new tenant running a fresh instance of `module`, checkpointed at `at`.
    pub fn create(
        env: &Env,
        name: &str,
        module: Module,
        wasm: &[u8],
        at: OpPos,
        meta: EntryMeta,
    ) -> Result<Self, OpOutcome> {
        // A store-model tenant gets a fresh instance per call; instantiating one here checks
        // that it can be (a start function that traps, memory over the limit).
        let instance = env
            .runtime
            .instantiate(&module, env.limits)
            .map_err(|e| OpOutcome::failed(Kind::Rejected, format!("deploy tenant {name}: {e}")))?;
        let store_model = module.model() == Model::Store;
        let history = vec![ModuleVersion {
            version: 1,
            module_hash: module.hash().to_vec(),
            index: at.0,
        }];
        let mut tenant = Tenant {
            name: name.to_string(),
            module,
            instance: (!store_model).then_some(instance),
            sessions: HashMap::new(),
            checkpoint: at,
            last_index: at.0,
            ops_since_checkpoint: 0,
            bytes_since_checkpoint: 0,
            checkpoint_bytes: 0,
            rebuild_base: None,
            traps_since_checkpoint: 0,
            rebuilt_state_is_base: false,
            queries_paused_until: None,
            trap_budget: TrapBudget::default(),
            version: 1,
            last_timestamp_ms: meta.timestamp_ms,
            history,
            limits: env.limits.clone(),
            metrics: TenantMetrics::new(name),
        };
        let written = if store_model {
            // Clears whatever a deleted tenant of the same name left.
            tenant.commit_store(env, at, true, &WriteSet::new(), true, Some(wasm))
        } else {
            tenant.write_checkpoint(env, at, None, Some(wasm), false)
        };
        written.map_err(|e| OpOutcome::failed(Kind::Rejected, e.to_string()))?;
        Ok(tenant)
    }

    fn is_store(&self) -> bool {
        self.module.model() == Model::Store
    }

    /// The context of the op at `at`; advances the tenant's clock.
    fn apply_context(&mut self, at: OpPos, meta: EntryMeta) -> CallContext {
        self.last_timestamp_ms = self.last_timestamp_ms.max(meta.timestamp_ms);
        CallContext {
            index: at.0,
            term: meta.term,
            timestamp_ms: self.last_timestamp_ms,
            position: at.1,
            in_apply: true,
            seed: seed(at),
        }
    }

    /// The context of a query or snapshot at applied index `applied`.
    fn read_context(&self, applied: u64) -> CallContext {
        CallContext {
            index: applied,
            timestamp_ms: self.last_timestamp_ms,
            ..CallContext::default()
        }
    }

    /// A fresh instance of a store-model module over the tenant's committed storage.
    fn store_instance(&self, env: &Env, context: CallContext) -> Result<Instance, CallError> {
        let mut instance = env
            .runtime
            .instantiate(&self.module, &self.limits)
            .map_err(|e| CallError::Trap(format!("cannot instantiate the module: {e}")))?;
        instance.set_storage(Some(env.store.tenant_view(&self.name)));
        instance.set_context(context);
        Ok(instance)
    }

    /// Commits a store-model op: `writes`, the sessions (all of them, or only `client`'s),
    /// and the checkpoint record at `at`, in one batch. `clear`: drop the keyspace first.
    fn commit_store(
        &mut self,
        env: &Env,
        at: OpPos,
        clear: bool,
        writes: &WriteSet,
        all_sessions: bool,
        wasm: Option<&[u8]>,
    ) -> Result<(), crate::storage::StorageError> {
        self.commit_store_session(env, at, clear, writes, None, all_sessions, wasm)
    }

    #[allow(clippy::too_many_arguments)]
    fn commit_store_session(
        &mut self,
        env: &Env,
        at: OpPos,
        clear: bool,
        writes: &WriteSet,
        client: Option<&str>,
        all_sessions: bool,
        wasm: Option<&[u8]>,
    ) -> Result<(), crate::storage::StorageError> {
        // Per op only the caller's session changed: encode that one, not every session.
        let sessions: Vec<(String, Vec<u8>)> = if all_sessions {
            self.sessions_to_proto()
                .into_iter()
                .map(|s| (s.client_id.clone(), s.encode_to_vec()))
                .collect()
        } else {
            client
                .and_then(|id| self.sessions.get(id).map(|s| (id, s)))
                .map(|(id, s)| (id.to_string(), s.to_proto(id).encode_to_vec()))
                .into_iter()
                .collect()
        };
        let cp = self.checkpoint_record(at, None, false);
        let hash = self.module.hash_hex();
        env.store.commit_tenant_op(
            &self.name,
            clear,
            writes,
            &sessions,
            &cp.encode_to_vec(),
            wasm.map(|w| (hash.as_str(), w)),
        )?;
        self.checkpoint = at;
        self.ops_since_checkpoint = 0;
        self.bytes_since_checkpoint = 0;
        self.rebuild_base = None;
        self.traps_since_checkpoint = 0;
        Ok(())
    }

    /// Switches to `module` at `at`. The new version receives the old one's state: a memory
    /// model's `snapshot` handed to the new `restore` (a store model keeps its keyspace, and a
    /// change of model goes through snapshot/restore too), then the new `wraft_migrate` with
    /// the old version number. If any step fails, the tenant stays on the old version.
    pub fn upgrade(
        &mut self,
        env: &Env,
        module: Module,
        wasm: &[u8],
        at: OpPos,
        meta: EntryMeta,
    ) -> OpOutcome {
        let name = self.name.clone();
        let failed = |kind: Kind, what: &str, err: &dyn std::fmt::Display| {
            OpOutcome::failed(
                kind,
                format!("upgrade tenant {name}: {what}, staying on the old version: {err}"),
            )
        };
        let (old_model, new_model) = (self.module.model(), module.model());
        let clock = self.last_timestamp_ms;
        let context = self.apply_context(at, meta);
        // 1. The state to hand over, as the old version serializes it.
        let handed: Option<Vec<u8>> = match (old_model, new_model) {
            (Model::Store, Model::Store) => None,
            (Model::Memory, _) => {
                match self
                    .live(env, at)
                    .and_then(|inst| inst.snapshot().map_err(|e| (e, true)))
                {
                    Ok(s) => Some(s),
                    Err((err, poisoned)) => {
                        if poisoned {
                            self.instance = None;
                        }
                        self.last_timestamp_ms = clock;
                        return failed(Kind::Trap, "the running version's snapshot failed", &err);
                    }
                }
            }
            (Model::Store, Model::Memory) => {
                match self
                    .store_instance(env, self.read_context(at.0))
                    .and_then(|mut inst| inst.snapshot())
                {
                    Ok(s) => Some(s),
                    Err(err) => {
                        self.last_timestamp_ms = clock;
                        return failed(Kind::Trap, "the running version's snapshot failed", &err);
                    }
                }
            }
        };
        // 2. The new version takes it over.
        let mut next = match env.runtime.instantiate(&module, &self.limits) {
            Ok(i) => i,
            Err(err) => {
                self.last_timestamp_ms = clock;
                return failed(
                    Kind::Rejected,
                    "the new version cannot be instantiated",
                    &err,
                );
            }
        };
        if new_model == Model::Store {
            next.set_storage(Some(env.store.tenant_view(&self.name)));
        }
        next.set_context(context);
        let mut state_out = None;
        let took_over = (|| {
            if let Some(snapshot) = &handed {
                next.restore(snapshot)
                    .map_err(|e| ("the new version's restore failed", e))?;
            }
            next.migrate(self.version)
                .map_err(|e| ("the new version's migrate failed", e))?;
            if new_model == Model::Memory {
                // The checkpoint holds the migrated state, so a restart restores exactly it.
                state_out = Some(
                    next.snapshot()
                        .map_err(|e| ("the new version's snapshot failed", e))?,
                );
            }
            Ok::<_, (&str, CallError)>(())
        })();
        if let Err((what, err)) = took_over {
            self.last_timestamp_ms = clock;
            let kind = match OpOutcome::from_call_error(&err) {
                OpOutcome::Failed { kind, .. } => kind,
                OpOutcome::Output(_) => Kind::Trap,
            };
            return failed(kind, what, &err);
        }
        let writes = next.take_writes();
        // A checkpoint in memory is the old module's state: never a base for the new one.
        self.rebuild_base = None;
        self.module = module;
        self.version += 1;
        self.history.push(ModuleVersion {
            version: self.version,
            module_hash: self.module.hash().to_vec(),
            index: at.0,
        });
        self.last_index = at.0;
        let written = match new_model {
            Model::Store => {
                self.instance = None;
                self.commit_store(
                    env,
                    at,
                    false,
                    &writes,
                    old_model == Model::Memory,
                    Some(wasm),
                )
            }
            Model::Memory => {
                self.instance = Some(next);
                let written = self.write_checkpoint(env, at, state_out, Some(wasm), false);
                if old_model == Model::Store && written.is_ok() {
                    env.store.delete_tenant_data(&self.name)
                } else {
                    written
                }
            }
        };
        if let Err(err) = written {
            tracing::error!(tenant = %self.name, %err, "checkpoint after upgrade failed");
        }
        OpOutcome::Output(self.module.hash_hex().into_bytes())
    }

    /// Loads a tenant from its stored checkpoint.
    pub fn load(env: &Env, cp: TenantCheckpoint) -> Result<Self, TenantError> {
        let checkpoint_bytes = cp.encoded_len() as u64;
        let broken = |message: String| TenantError::Broken {
            tenant: cp.tenant.clone(),
            message,
        };
        if cp.engine != ENGINE {
            return Err(broken(format!(
                "it runs under the Wasm engine `{}` but this node has `{ENGINE}`; every node must run the same wraft build",
                cp.engine
            )));
        }
        let hash = hex::encode(&cp.module_hash);
        let wasm = env
            .store
            .module(&hash)
            .map_err(|e| broken(e.to_string()))?
            .ok_or_else(|| broken(format!("module {hash} is missing from storage")))?;
        let limits = crate::limits::from_stored(cp.limits.as_ref());
        let module = env
            .runtime
            .compile(&wasm, &limits)
            .map_err(|e| broken(e.to_string()))?;
        let (instance, sessions) = if module.model() == Model::Store {
            let mut sessions = Vec::new();
            for (client, bytes) in env
                .store
                .sessions(&cp.tenant)
                .map_err(|e| broken(e.to_string()))?
            {
                let session = Session::decode(bytes.as_slice())
                    .map_err(|e| broken(format!("session of client {client} undecodable: {e}")))?;
                sessions.push(session);
            }
            (None, sessions_from(sessions))
        } else {
            let mut instance = env
                .runtime
                .instantiate(&module, &limits)
                .map_err(|e| broken(e.to_string()))?;
            instance.set_context(CallContext {
                index: cp.index,
                timestamp_ms: cp.last_timestamp_ms,
                ..CallContext::default()
            });
            if cp.has_snapshot {
                instance
                    .restore(&cp.snapshot)
                    .map_err(|e| broken(format!("restoring the checkpoint failed: {e}")))?;
            }
            (Some(instance), sessions_from(cp.sessions))
        };
        let metrics = TenantMetrics::new(&cp.tenant);
        Ok(Tenant {
            name: cp.tenant,
            module,
            instance,
            sessions,
            checkpoint: (cp.index, cp.position),
            last_index: cp.last_index,
            ops_since_checkpoint: 0,
            bytes_since_checkpoint: 0,
            checkpoint_bytes,
            rebuild_base: None,
            traps_since_checkpoint: 0,
            rebuilt_state_is_base: false,
            queries_paused_until: None,
            trap_budget: TrapBudget::default(),
            version: cp.version,
            last_timestamp_ms: cp.last_timestamp_ms,
            history: cp.history,
            limits,
            metrics,
        })
    }

    pub fn module_hash_hex(&self) -> String {
        self.module.hash_hex()
    }

    pub fn version(&self) -> u64 {
        self.version
    }

    /// Every version the tenant ran, oldest first.
    pub fn history(&self) -> &[ModuleVersion] {
        &self.history
    }

    /// Where the tenant keeps its state.
    pub fn model(&self) -> Model {
        self.module.model()
    }

    /// The limits its calls run under.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Replaces the tenant's limits at `at`; the output is the limits now in force
    /// (`TenantLimits` bytes). A memory-model state moves to a fresh instance
    /// under the new limits through snapshot and restore, and is checkpointed there, so no
    /// replay ever runs an op under other limits than it first ran under; a state that does not
    /// fit the new limits keeps the old ones.
    pub fn set_limits(
        &mut self,
        env: &Env,
        at: OpPos,
        change: &wraft_proto::log::TenantLimits,
    ) -> OpOutcome {
        let next = match crate::limits::merge_tenant_limits(&self.limits, change) {
            Ok(next) => next,
            Err(message) => {
                return OpOutcome::failed(
                    Kind::Rejected,
                    format!("set limits of tenant {}: {message}", self.name),
                )
            }
        };
        if self.is_store() {
            self.limits = next;
            self.last_index = at.0;
            if let Err(err) = self.commit_store(env, at, false, &WriteSet::new(), false, None) {
                tracing::error!(tenant = %self.name, %err, "checkpoint after new limits failed");
            }
            return OpOutcome::Output(crate::limits::to_stored(&self.limits).encode_to_vec());
        }
        let snapshot = match self
            .live(env, at)
            .and_then(|inst| inst.snapshot().map_err(|e| (e, true)))
        {
            Ok(s) => s,
            Err((err, poisoned)) => {
                if poisoned {
                    self.instance = None;
                }
                return OpOutcome::failed(
                    Kind::Trap,
                    format!(
                        "set limits of tenant {}: its snapshot failed: {err}",
                        self.name
                    ),
                );
            }
        };
        let moved = env
            .runtime
            .instantiate(&self.module, &next)
            .map_err(|e| e.to_string())
            .and_then(|mut inst| {
                inst.set_context(self.read_context(at.0));
                inst.restore(&snapshot).map_err(|e| e.to_string())?;
                Ok(inst)
            });
        match moved {
            Ok(instance) => {
                self.instance = Some(instance);
                self.rebuild_base = None;
                self.limits = next;
                self.last_index = at.0;
                if let Err(err) = self.write_checkpoint(env, at, Some(snapshot), None, false) {
                    tracing::error!(tenant = %self.name, %err, "checkpoint after new limits failed");
                }
                OpOutcome::Output(crate::limits::to_stored(&self.limits).encode_to_vec())
            }
            Err(err) => OpOutcome::failed(
                Kind::Rejected,
                format!(
                    "set limits of tenant {}: the state does not fit the new limits, keeping the old ones: {err}",
                    self.name
                ),
            ),
        }
    }

    /// The live instance's memory size (0 while it waits to be rebuilt after a trap).
    pub fn memory_bytes(&self) -> u64 {
        self.instance.as_ref().map_or(0, Instance::memory_bytes)
    }

    pub fn last_index(&self) -> u64 {
        self.last_index
    }

    pub fn checkpoint_pos(&self) -> OpPos {
        self.checkpoint
    }

    /// Whether ops after the checkpoint were applied (a failed checkpoint leaves it so).
    pub fn is_dirty(&self) -> bool {
        self.ops_since_checkpoint > 0
    }

    /// Applies a command at `at`, exactly once per session sequence.
    pub fn exec(&mut self, env: &Env, at: OpPos, meta: EntryMeta, cmd: &Command) -> OpOutcome {
        if let Some(done) = self.session_answer(cmd) {
            return done;
        }
        if self.is_store() {
            return self.exec_store(env, at, meta, cmd);
        }
        let started = std::time::Instant::now();
        let metrics = self.metrics.clone();
        let live = self.live(env, at).map(|_| ());
        let context = self.apply_context(at, meta);
        let outcome = match live.and_then(|()| self.live(env, at)) {
            Ok(instance) => {
                instance.set_context(context.clone());
                match Self::measured_apply(&metrics, instance, &cmd.payload, started) {
                    Ok(out) => OpOutcome::Output(out),
                    Err(err) => {
                        let outcome = OpOutcome::from_call_error(&err);
                        if err.poisons_instance() {
                            tracing::warn!(tenant = %self.name, index = at.0, %err, "apply trapped; rebuilding the tenant from its checkpoint");
                            let recovery = std::time::Instant::now();
                            self.instance = None;
                            let rebuilt = self.live(env, at).is_ok();
                            if rebuilt {
                                // The trapped op counts as applied (with its error), clock
                                // included, as replay will count it.
                                self.last_timestamp_ms = context.timestamp_ms;
                                self.record_session(cmd, &outcome, at.0);
                                self.after_trap(env, at, cmd, &outcome);
                            }
                            let now = std::time::Instant::now();
                            METRICS
                                .trap_recovery_seconds
                                .with_label_values::<&str>(&[])
                                .observe((now - recovery).as_secs_f64());
                            self.trap_budget.charge(now - recovery, now);
                            if rebuilt {
                                return outcome;
                            }
                        }
                        outcome
                    }
                }
            }
            Err((err, _)) => OpOutcome::from_call_error(&err),
        };
        self.record_session(cmd, &outcome, at.0);
        self.count_outcome(at, &outcome);
        if self.count_op(cmd) {
            self.checkpoint_now(env, at);
        }
        outcome
    }

    /// Counts a failed op in the metrics; a successful one marks the tenant changed at `at`.
    fn count_outcome(&mut self, at: OpPos, outcome: &OpOutcome) {
        match outcome {
            OpOutcome::Output(_) => self.last_index = at.0,
            OpOutcome::Failed { kind, .. } => METRICS
                .traps
                .with_label_values(&[self.name.as_str(), kind.as_str_name()])
                .inc(),
        }
    }

    /// Counts an applied memory-model op since the checkpoint; true when a checkpoint is due.
    fn count_op(&mut self, cmd: &Command) -> bool {
        self.ops_since_checkpoint += 1;
        self.bytes_since_checkpoint += cmd.encoded_len() as u64;
        checkpoint_due(
            self.ops_since_checkpoint,
            self.bytes_since_checkpoint,
            self.checkpoint_bytes,
        )
    }

    /// After a trap at `at`, once the state is rebuilt up to it: the next rebuild starts
    /// here, from a checkpoint kept in memory, also stored when one is due anyway or after
    /// [`TRAPS_PER_STORED_CHECKPOINT`] traps.
    ///
    /// Traps back to back leave the state where the rebuild's checkpoint had it (the rebuild
    /// replayed nothing onto it), so its bytes are the state at `at` too: they are reused
    /// rather than asking the module to copy out the whole state again.
    fn after_trap(&mut self, env: &Env, at: OpPos, cmd: &Command, outcome: &OpOutcome) {
        self.count_outcome(at, outcome);
        self.traps_since_checkpoint += 1;
        let store =
            self.count_op(cmd) || self.traps_since_checkpoint >= TRAPS_PER_STORED_CHECKPOINT;
        let unchanged = std::mem::take(&mut self.rebuilt_state_is_base)
            .then(|| self.rebuild_base.take())
            .flatten()
            .filter(|base| base.has_snapshot)
            .map(|base| base.snapshot);
        let snapshot = match unchanged {
            Some(bytes) => Some(bytes),
            None => self.snapshot_at(env, at, "a checkpoint after a trap"),
        };
        let Some(snapshot) = snapshot else {
            return;
        };
        if !store {
            self.rebuild_base = Some(self.checkpoint_record(at, Some(snapshot), true));
        } else if let Err(err) = self.write_checkpoint(env, at, Some(snapshot), None, true) {
            tracing::error!(tenant = %self.name, %err, "writing a checkpoint failed; keeping the previous one");
        }
    }

    /// A store-model op: a fresh instance, its writes committed with its session and position
    /// in one batch (dropped if it trapped).
    fn exec_store(&mut self, env: &Env, at: OpPos, meta: EntryMeta, cmd: &Command) -> OpOutcome {
        let started = std::time::Instant::now();
        let context = self.apply_context(at, meta);
        let (outcome, writes) = match self.store_instance(env, context) {
            Ok(mut instance) => {
                let result =
                    Self::measured_apply(&self.metrics, &mut instance, &cmd.payload, started);
                match result {
                    Ok(out) => (OpOutcome::Output(out), instance.take_writes()),
                    // The module's own error: its writes stand, as they would natively.
                    Err(err @ CallError::Rejected(_)) => {
                        (OpOutcome::from_call_error(&err), instance.take_writes())
                    }
                    Err(err) => (OpOutcome::from_call_error(&err), WriteSet::new()),
                }
            }
            Err(err) => (OpOutcome::from_call_error(&err), WriteSet::new()),
        };
        self.record_session(cmd, &outcome, at.0);
        self.count_outcome(at, &outcome);
        let client = (!cmd.client_id.is_empty()).then_some(cmd.client_id.as_str());
        if let Err(err) = self.commit_store_session(env, at, false, &writes, client, false, None) {
            tracing::error!(tenant = %self.name, index = at.0, %err, "committing a store-model op failed");
        }
        outcome
    }

    /// Calls `apply` and records its count, latency, fuel and the instance's memory.
    fn measured_apply(
        metrics: &TenantMetrics,
        instance: &mut Instance,
        payload: &[u8],
        started: std::time::Instant,
    ) -> Result<Vec<u8>, CallError> {
        let result = instance.apply(payload);
        metrics.applies.inc();
        metrics
            .apply_seconds
            .observe(started.elapsed().as_secs_f64());
        metrics.fuel_used.inc_by(instance.fuel_used());
        metrics.memory_bytes.set(instance.memory_bytes() as i64);
        result
    }

    /// Runs a read-only query. A trap repairs the instance locally (rebuild up to `applied`).
    pub fn query(&mut self, env: &Env, applied: u64, query: &[u8]) -> OpOutcome {
        let context = self.read_context(applied);
        if self.is_store() {
            return match self
                .store_instance(env, context)
                .and_then(|mut i| i.query(query))
            {
                Ok(out) => OpOutcome::Output(out),
                Err(err) => OpOutcome::from_call_error(&err),
            };
        }
        // Every op up to and including entry `applied`, and nothing the log does not hold yet.
        let upto = (applied, u32::MAX);
        match self.live(env, upto) {
            Ok(instance) => match instance.query_in(context, query) {
                Ok(out) => OpOutcome::Output(out),
                Err(err) => {
                    if err.poisons_instance() {
                        let bytes = instance.memory_bytes();
                        let until = std::time::Instant::now() + query_pause(bytes);
                        self.queries_paused_until = Some((until, bytes));
                        self.instance = None;
                    }
                    OpOutcome::from_call_error(&err)
                }
            },
            Err((err, _)) => OpOutcome::from_call_error(&err),
        }
    }

    /// Until when this node refuses the tenant's new commands (see [`TrapBudget`]), if it
    /// does or did.
    pub fn commands_refused_until(&self) -> Option<std::time::Instant> {
        self.trap_budget.refuse_until()
    }

    /// While a trapped query's pause lasts: how much of it is left, and the instance's memory
    /// size at the trap.
    pub fn queries_paused_for(&self) -> Option<(std::time::Duration, u64)> {
        let (until, bytes) = self.queries_paused_until?;
        let left = until.saturating_duration_since(std::time::Instant::now());
        (!left.is_zero()).then_some((left, bytes))
    }

    /// The module's snapshot of the current state.
    pub fn snapshot(&mut self, env: &Env, applied: u64) -> Result<Vec<u8>, CallError> {
        if self.is_store() {
            // The keyspace is the state: hashed by the host, no module call.
            return env
                .store
                .data_digest(&self.name)
                .map(|d| d.to_vec())
                .map_err(|e| CallError::Trap(format!("reading the tenant's storage: {e}")));
        }
        // Every op up to and including entry `applied`, and nothing the log does not hold yet.
        let upto = (applied, u32::MAX);
        let instance = self.live(env, upto).map_err(|(e, _)| e)?;
        let result = instance.snapshot();
        if matches!(&result, Err(e) if e.poisons_instance()) {
            self.instance = None;
        }
        result
    }

    /// Checkpoints at `at` if anything changed since the last checkpoint.
    pub fn checkpoint_if_dirty(&mut self, env: &Env, at: OpPos) {
        if self.ops_since_checkpoint > 0 {
            self.checkpoint_now(env, at);
        }
    }

    /// The module's snapshot of the state up to `at`, for `purpose`; `None` (logged) if the
    /// module failed to give one, which keeps the previous checkpoint.
    fn snapshot_at(&mut self, env: &Env, at: OpPos, purpose: &str) -> Option<Vec<u8>> {
        match self
            .live(env, at)
            .and_then(|i| i.snapshot().map_err(|e| (e, true)))
        {
            Ok(snapshot) => Some(snapshot),
            Err((err, poisoned)) => {
                if poisoned {
                    self.instance = None;
                }
                tracing::warn!(tenant = %self.name, %err, "snapshot for {purpose} failed; keeping the previous checkpoint");
                None
            }
        }
    }

    fn checkpoint_now(&mut self, env: &Env, at: OpPos) {
        let started = std::time::Instant::now();
        let Some(snapshot) = self.snapshot_at(env, at, "a checkpoint") else {
            return;
        };
        METRICS
            .checkpoint_seconds
            .with_label_values(&["snapshot"])
            .observe(started.elapsed().as_secs_f64());
        // A tenant that trapped since its last stored checkpoint keeps this one in memory
        // too, so its next rebuild need not read it back; one that stopped trapping lets go.
        let keep = self.rebuild_base.is_some() && self.traps_since_checkpoint > 0;
        if let Err(err) = self.write_checkpoint(env, at, Some(snapshot), None, keep) {
            tracing::error!(tenant = %self.name, %err, "writing a checkpoint failed; keeping the previous one");
        }
    }

    /// Stores the tenant's checkpoint at `at` (with the module's bytes, for a new module).
    /// `keep_in_memory` also makes it the next rebuild's base: reading back and decoding a
    /// stored 40 MB checkpoint took 0.7 s of the apply thread.
    fn write_checkpoint(
        &mut self,
        env: &Env,
        at: OpPos,
        snapshot: Option<Vec<u8>>,
        wasm: Option<&[u8]>,
        keep_in_memory: bool,
    ) -> Result<(), crate::storage::StorageError> {
        let started = std::time::Instant::now();
        let checkpoint = self.checkpoint_record(at, snapshot, true);
        let record = checkpoint.encode_to_vec();
        let hash = self.module.hash_hex();
        env.store
            .put_checkpoint(&self.name, &record, wasm.map(|w| (hash.as_str(), w)))?;
        METRICS
            .checkpoint_seconds
            .with_label_values(&["write"])
            .observe(started.elapsed().as_secs_f64());
        self.checkpoint = at;
        self.ops_since_checkpoint = 0;
        self.bytes_since_checkpoint = 0;
        self.checkpoint_bytes = record.len() as u64;
        self.rebuild_base = keep_in_memory.then_some(checkpoint);
        self.traps_since_checkpoint = 0;
        self.metrics.checkpoints.inc();
        self.metrics.checkpoint_bytes.inc_by(self.checkpoint_bytes);
        Ok(())
    }

    /// The tenant's checkpoint record at `at`: a memory model's holds the snapshot and the
    /// sessions, a store model's neither (its sessions are records of their own).
    fn checkpoint_record(
        &self,
        at: OpPos,
        snapshot: Option<Vec<u8>>,
        with_sessions: bool,
    ) -> TenantCheckpoint {
        TenantCheckpoint {
            tenant: self.name.clone(),
            index: at.0,
            position: at.1,
            module_hash: self.module.hash().to_vec(),
            has_snapshot: snapshot.is_some(),
            snapshot: snapshot.unwrap_or_default(),
            sessions: if with_sessions {
                self.sessions_to_proto()
            } else {
                Vec::new()
            },
            last_index: self.last_index,
            engine: ENGINE.to_string(),
            version: self.version,
            last_timestamp_ms: self.last_timestamp_ms,
            history: self.history.clone(),
            limits: Some(crate::limits::to_stored(&self.limits)),
        }
    }

    /// The live instance, rebuilt first if a trap dropped it. `upto` is the first op position
    /// the rebuilt state must NOT include.
    fn live(&mut self, env: &Env, upto: OpPos) -> Result<&mut Instance, (CallError, bool)> {
        if self.is_store() {
            return Err((
                CallError::Trap("a store-model tenant has no live instance".into()),
                false,
            ));
        }
        if self.instance.is_none() {
            self.rebuild(env, upto)
                .map_err(|e| (CallError::Trap(e.to_string()), false))?;
        }
        self.instance.as_mut().ok_or_else(|| {
            (
                CallError::Trap("the instance could not be rebuilt".into()),
                false,
            )
        })
    }

    /// Restores the checkpoint into a fresh instance and replays this tenant's ops from the log
    /// up to (not including) `upto`. An op that traps again during replay trapped the first
    /// time too; it is skipped (it was applied-with-error) and the replay starts over.
    fn rebuild(&mut self, env: &Env, upto: OpPos) -> Result<(), TenantError> {
        let name = self.name.clone();
        let broken = |message: String| TenantError::Broken {
            tenant: name.clone(),
            message,
        };
        self.rebuilt_state_is_base = false;
        let cp = match self.rebuild_base.take() {
            Some(base) => base,
            None => {
                let cp_bytes = env
                    .store
                    .checkpoint(&self.name)
                    .map_err(|e| broken(e.to_string()))?
                    .ok_or_else(|| broken("no checkpoint is stored".into()))?;
                TenantCheckpoint::decode(cp_bytes.as_slice())
                    .map_err(|e| broken(format!("checkpoint undecodable: {e}")))?
            }
        };
        let cp_at = (cp.index, cp.position);
        // Ops at or below the floor are covered by the checkpoint (compaction waits for every
        // tenant to be checkpointed past them), and the log no longer holds them.
        let entries = env
            .store
            .entries(cp.index.max(env.log_floor + 1), upto.0 + 1)
            .map_err(|e| broken(format!("reading the log for replay: {e}")))?;
        // Ops that trapped during replay, with the error they were answered with.
        let mut skip: HashMap<OpPos, OpOutcome> = HashMap::new();
        loop {
            // Ops the module ran in this pass (skipped and session-answered ones change
            // nothing).
            let mut replayed = 0u64;
            let mut instance = env
                .runtime
                .instantiate(&self.module, &self.limits)
                .map_err(|e| broken(e.to_string()))?;
            if cp.has_snapshot {
                instance
                    .restore(&cp.snapshot)
                    .map_err(|e| broken(format!("restoring the checkpoint failed: {e}")))?;
            }
            self.sessions = sessions_from(cp.sessions.clone());
            self.last_timestamp_ms = cp.last_timestamp_ms;
            self.instance = Some(instance);
            let mut trapped = None;
            'replay: for entry in &entries {
                if entry.get_entry_type() != EntryType::EntryNormal || entry.data.is_empty() {
                    continue;
                }
                let Ok(log_entry) = envelope::decode(&entry.data) else {
                    continue;
                };
                let meta = EntryMeta {
                    term: entry.term,
                    timestamp_ms: log_entry.timestamp_ms,
                };
                for (pos, op) in log_entry.ops.iter().enumerate() {
                    let at = (entry.index, pos as u32);
                    if op.tenant != self.name || at <= cp_at || at >= upto {
                        continue;
                    }
                    let Some(op::Kind::Command(cmd)) = &op.kind else {
                        continue;
                    };
                    if self.session_answer(cmd).is_some() {
                        continue;
                    }
                    let context = self.apply_context(at, meta);
                    if let Some(outcome) = skip.get(&at) {
                        let outcome = outcome.clone();
                        self.record_session(cmd, &outcome, at.0);
                        continue;
                    }
                    let Some(instance) = self.instance.as_mut() else {
                        break 'replay;
                    };
                    instance.set_context(context);
                    replayed += 1;
                    let outcome = match instance.apply(&cmd.payload) {
                        Ok(out) => OpOutcome::Output(out),
                        Err(err) if err.poisons_instance() => {
                            trapped = Some((at, OpOutcome::from_call_error(&err)));
                            break 'replay;
                        }
                        Err(err) => OpOutcome::from_call_error(&err),
                    };
                    self.record_session(cmd, &outcome, at.0);
                }
            }
            match trapped {
                None => {
                    self.rebuild_base = Some(cp);
                    self.rebuilt_state_is_base = replayed == 0;
                    return Ok(());
                }
                Some((at, outcome)) => {
                    skip.insert(at, outcome);
                }
            }
        }
    }

    /// The stored answer when this command's session has seen its sequence number already.
    fn session_answer(&self, cmd: &Command) -> Option<OpOutcome> {
        if cmd.client_id.is_empty() {
            return None;
        }
        let session = self.sessions.get(&cmd.client_id)?;
        if cmd.seq == session.seq {
            Some(session.outcome.clone())
        } else if cmd.seq < session.seq {
            Some(OpOutcome::failed(
                Kind::StaleSequence,
                format!(
                    "client `{}` sent seq {} after seq {}: a session's sequence numbers must increase",
                    cmd.client_id, cmd.seq, session.seq
                ),
            ))
        } else {
            None
        }
    }

    fn record_session(&mut self, cmd: &Command, outcome: &OpOutcome, index: u64) {
        if cmd.client_id.is_empty() {
            return;
        }
        self.sessions.insert(
            cmd.client_id.clone(),
            SessionEntry {
                seq: cmd.seq,
                outcome: outcome.clone(),
                index,
            },
        );
    }

    fn sessions_to_proto(&self) -> Vec<Session> {
        let mut out: Vec<Session> = self.sessions.iter().map(|(id, s)| s.to_proto(id)).collect();
        // Sorted so that every replica writes the same bytes.
        out.sort_by(|a, b| a.client_id.cmp(&b.client_id));
        out
    }
}

fn sessions_from(sessions: Vec<Session>) -> HashMap<String, SessionEntry> {
    sessions
        .into_iter()
        .map(|s| {
            (
                s.client_id,
                SessionEntry {
                    seq: s.seq,
                    outcome: OpOutcome::from_stored(s.outcome),
                    index: s.index,
                },
            )
        })
        .collect()
}
