//! One tenant on one replica: its module instance, its sessions and its durable checkpoint.
//!
//! The tenant's state lives in the module's linear memory. Its durable form is a checkpoint (the
//! module's `snapshot` at op position `(index, position)`, with the sessions) plus the log ops
//! after that position; on restart the checkpoint is restored and the log replayed from there.
//!
//! Invariant: the live instance's state equals the checkpoint plus every op of this tenant
//! after the checkpoint up to `last_applied`, each applied exactly once.
//!
//! A trap can leave memory half-changed, so after one the instance is dropped, rebuilt from the
//! checkpoint plus the log up to the trapped op (which then counts as applied-with-error), and
//! checkpointed afresh so that repeated traps stay cheap. Every replica does the same, so the
//! tenant's state is exactly as before the trapped op everywhere.

use std::collections::HashMap;

use prost::Message as _;
use raft::eraftpb::EntryType;
use wraft_proto::client::module_error::Kind;
use wraft_proto::log::{op, Command, Session, StoredError, StoredOutcome, TenantCheckpoint};

use crate::envelope;
use crate::metrics::METRICS;
use crate::storage::StateStore;
use crate::wasm::{CallError, Instance, Limits, Module, Runtime, ENGINE};

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

/// This tenant's metric series, looked up once: apply is a hot path, and a labelled lookup
/// hashes the label and takes a lock each time.
#[derive(Clone)]
struct TenantMetrics {
    applies: prometheus::IntCounter,
    apply_seconds: prometheus::Histogram,
    fuel_used: prometheus::IntCounter,
    memory_bytes: prometheus::IntGauge,
}

impl TenantMetrics {
    fn new(tenant: &str) -> Self {
        Self {
            applies: METRICS.applies.with_label_values(&[tenant]),
            apply_seconds: METRICS.apply_seconds.with_label_values(&[tenant]),
            fuel_used: METRICS.fuel_used.with_label_values(&[tenant]),
            memory_bytes: METRICS.tenant_memory_bytes.with_label_values(&[tenant]),
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
    /// 1 at the first deploy, +1 at every successful upgrade.
    version: u64,
    metrics: TenantMetrics,
}

/// Ops of one tenant applied between checkpoints. Bounds replay after a trap or a restart.
const CHECKPOINT_EVERY_OPS: u64 = 1000;

impl Tenant {
    /// A new tenant running a fresh instance of `module`, checkpointed at `at`.
    pub fn create(
        env: &Env,
        name: &str,
        module: Module,
        wasm: &[u8],
        at: OpPos,
    ) -> Result<Self, OpOutcome> {
        let instance = env
            .runtime
            .instantiate(&module, env.limits)
            .map_err(|e| OpOutcome::failed(Kind::Rejected, format!("deploy tenant {name}: {e}")))?;
        let mut tenant = Tenant {
            name: name.to_string(),
            module,
            instance: Some(instance),
            sessions: HashMap::new(),
            checkpoint: at,
            last_index: at.0,
            ops_since_checkpoint: 0,
            version: 1,
            metrics: TenantMetrics::new(name),
        };
        tenant
            .write_checkpoint(env, at, None, Some(wasm))
            .map_err(|e| OpOutcome::failed(Kind::Rejected, e.to_string()))?;
        Ok(tenant)
    }

    /// Switches to `module` at `at`: the old version's snapshot is restored into a fresh
    /// instance of the new one. If any step traps, the tenant stays on the old version.
    pub fn upgrade(&mut self, env: &Env, module: Module, wasm: &[u8], at: OpPos) -> OpOutcome {
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
                        "upgrade tenant {}: the running version's snapshot failed: {err}",
                        self.name
                    ),
                );
            }
        };
        let mut next = match env.runtime.instantiate(&module, env.limits) {
            Ok(i) => i,
            Err(err) => {
                return OpOutcome::failed(
                    Kind::Rejected,
                    format!("upgrade tenant {}: {err}", self.name),
                )
            }
        };
        if let Err(err) = next.restore(&snapshot) {
            let outcome = OpOutcome::from_call_error(&err);
            return match outcome {
                OpOutcome::Failed { kind, message } => OpOutcome::failed(
                    kind,
                    format!("upgrade tenant {}: the new version's restore failed, staying on the old one: {message}", self.name),
                ),
                other => other,
            };
        }
        self.module = module;
        self.version += 1;
        self.instance = Some(next);
        self.last_index = at.0;
        if let Err(err) = self.write_checkpoint(env, at, Some(snapshot), Some(wasm)) {
            tracing::error!(tenant = %self.name, %err, "checkpoint after upgrade failed");
        }
        OpOutcome::Output(self.module.hash_hex().into_bytes())
    }

    /// Loads a tenant from its stored checkpoint.
    pub fn load(env: &Env, cp: TenantCheckpoint) -> Result<Self, TenantError> {
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
        let module = env
            .runtime
            .compile(&wasm, env.limits)
            .map_err(|e| broken(e.to_string()))?;
        let mut instance = env
            .runtime
            .instantiate(&module, env.limits)
            .map_err(|e| broken(e.to_string()))?;
        if cp.has_snapshot {
            instance
                .restore(&cp.snapshot)
                .map_err(|e| broken(format!("restoring the checkpoint failed: {e}")))?;
        }
        let metrics = TenantMetrics::new(&cp.tenant);
        Ok(Tenant {
            name: cp.tenant,
            module,
            instance: Some(instance),
            sessions: sessions_from(cp.sessions),
            checkpoint: (cp.index, cp.position),
            last_index: cp.last_index,
            ops_since_checkpoint: 0,
            version: cp.version,
            metrics,
        })
    }

    pub fn module_hash_hex(&self) -> String {
        self.module.hash_hex()
    }

    pub fn version(&self) -> u64 {
        self.version
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

    /// Applies a command at `at`, exactly once per session sequence.
    pub fn exec(&mut self, env: &Env, at: OpPos, cmd: &Command) -> OpOutcome {
        if let Some(done) = self.session_answer(cmd) {
            return done;
        }
        let started = std::time::Instant::now();
        let metrics = self.metrics.clone();
        let outcome = match self.live(env, at) {
            Ok(instance) => match Self::measured_apply(&metrics, instance, &cmd.payload, started) {
                Ok(out) => OpOutcome::Output(out),
                Err(err) => {
                    let outcome = OpOutcome::from_call_error(&err);
                    if err.poisons_instance() {
                        tracing::warn!(tenant = %self.name, index = at.0, %err, "apply trapped; rebuilding the tenant from its checkpoint");
                        self.instance = None;
                        if self.live(env, at).is_ok() {
                            self.record_session(cmd, &outcome, at.0);
                            self.checkpoint_now(env, at);
                            return outcome;
                        }
                    }
                    outcome
                }
            },
            Err((err, _)) => OpOutcome::from_call_error(&err),
        };
        self.record_session(cmd, &outcome, at.0);
        match &outcome {
            OpOutcome::Output(_) => self.last_index = at.0,
            OpOutcome::Failed { kind, .. } => METRICS
                .traps
                .with_label_values(&[self.name.as_str(), kind.as_str_name()])
                .inc(),
        }
        self.ops_since_checkpoint += 1;
        if self.ops_since_checkpoint >= CHECKPOINT_EVERY_OPS {
            self.checkpoint_now(env, at);
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
        // Every op up to and including entry `applied`, and nothing the log does not hold yet.
        let upto = (applied, u32::MAX);
        match self.live(env, upto) {
            Ok(instance) => match instance.query(query) {
                Ok(out) => OpOutcome::Output(out),
                Err(err) => {
                    if err.poisons_instance() {
                        self.instance = None;
                    }
                    OpOutcome::from_call_error(&err)
                }
            },
            Err((err, _)) => OpOutcome::from_call_error(&err),
        }
    }

    /// The module's snapshot of the current state.
    pub fn snapshot(&mut self, env: &Env, applied: u64) -> Result<Vec<u8>, CallError> {
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

    fn checkpoint_now(&mut self, env: &Env, at: OpPos) {
        let snapshot = match self
            .live(env, at)
            .and_then(|i| i.snapshot().map_err(|e| (e, true)))
        {
            Ok(s) => s,
            Err((err, poisoned)) => {
                if poisoned {
                    self.instance = None;
                }
                tracing::warn!(tenant = %self.name, %err, "snapshot for a checkpoint failed; keeping the previous checkpoint");
                return;
            }
        };
        if let Err(err) = self.write_checkpoint(env, at, Some(snapshot), None) {
            tracing::error!(tenant = %self.name, %err, "writing a checkpoint failed; keeping the previous one");
        }
    }

    fn write_checkpoint(
        &mut self,
        env: &Env,
        at: OpPos,
        snapshot: Option<Vec<u8>>,
        wasm: Option<&[u8]>,
    ) -> Result<(), crate::storage::StorageError> {
        let cp = TenantCheckpoint {
            tenant: self.name.clone(),
            index: at.0,
            position: at.1,
            module_hash: self.module.hash().to_vec(),
            has_snapshot: snapshot.is_some(),
            snapshot: snapshot.unwrap_or_default(),
            sessions: self.sessions_to_proto(),
            last_index: self.last_index,
            engine: ENGINE.to_string(),
            version: self.version,
        };
        let hash = self.module.hash_hex();
        env.store.put_checkpoint(
            &self.name,
            &cp.encode_to_vec(),
            wasm.map(|w| (hash.as_str(), w)),
        )?;
        self.checkpoint = at;
        self.ops_since_checkpoint = 0;
        Ok(())
    }

    /// The live instance, rebuilt first if a trap dropped it. `upto` is the first op position
    /// the rebuilt state must NOT include.
    fn live(&mut self, env: &Env, upto: OpPos) -> Result<&mut Instance, (CallError, bool)> {
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
        let cp_bytes = env
            .store
            .checkpoint(&self.name)
            .map_err(|e| broken(e.to_string()))?
            .ok_or_else(|| broken("no checkpoint is stored".into()))?;
        let cp = TenantCheckpoint::decode(cp_bytes.as_slice())
            .map_err(|e| broken(format!("checkpoint undecodable: {e}")))?;
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
            let mut instance = env
                .runtime
                .instantiate(&self.module, env.limits)
                .map_err(|e| broken(e.to_string()))?;
            if cp.has_snapshot {
                instance
                    .restore(&cp.snapshot)
                    .map_err(|e| broken(format!("restoring the checkpoint failed: {e}")))?;
            }
            self.sessions = sessions_from(cp.sessions.clone());
            self.instance = Some(instance);
            let mut trapped = None;
            'replay: for entry in &entries {
                if entry.get_entry_type() != EntryType::EntryNormal || entry.data.is_empty() {
                    continue;
                }
                let Ok(log_entry) = envelope::decode(&entry.data) else {
                    continue;
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
                    if let Some(outcome) = skip.get(&at) {
                        let outcome = outcome.clone();
                        self.record_session(cmd, &outcome, at.0);
                        continue;
                    }
                    let Some(instance) = self.instance.as_mut() else {
                        break 'replay;
                    };
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
                None => return Ok(()),
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
        let mut out: Vec<Session> = self
            .sessions
            .iter()
            .map(|(id, s)| Session {
                client_id: id.clone(),
                seq: s.seq,
                outcome: Some(s.outcome.to_stored()),
                index: s.index,
            })
            .collect();
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
