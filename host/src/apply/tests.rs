//! The apply stage on real RocksDB with a module that changes its memory and then traps: the
//! trapped op must leave no trace, on this run and after a restart that replays the log.

use std::sync::{Arc, Mutex, RwLock};

use crossbeam_channel::Sender;
use raft::eraftpb::Entry;
use tokio::sync::oneshot;
use wraft_proto::client::module_error::Kind;
use wraft_proto::log::{op, Command, Deploy, LogEntry, Op};
use wraft_proto::ENVELOPE_VERSION;

use super::*;
use crate::envelope::ProposalIds;
use crate::storage::{self, NodeIdentity, RaftStorage};

/// A counter in linear memory at address 0. `apply` increments it FIRST and then traps when
/// the command starts with `t`, so a trap leaves memory half-changed unless the host repairs it.
const TRAPPY: &str = r#"(module
  (memory (export "memory") 1)
  (func (export "wraft_abi_v1"))
  (func (export "wraft_alloc") (param i32) (result i32) (i32.const 1024))
  (func $counter (result i64)
    (i32.store8 (i32.const 2000) (i32.const 0))
    (i64.store (i32.const 2001) (i64.load (i32.const 0)))
    (i64.or (i64.shl (i64.const 2000) (i64.const 32)) (i64.const 9)))
  (func (export "wraft_apply") (param $ptr i32) (param $len i32) (result i64)
    (i64.store (i32.const 0) (i64.add (i64.load (i32.const 0)) (i64.const 1)))
    (if (i32.eq (i32.load8_u (local.get $ptr)) (i32.const 116)) (then unreachable))
    (call $counter))
  (func (export "wraft_query") (param $ptr i32) (param $len i32) (result i64)
    ;; A hostile query: it changes memory, then traps when the query starts with `t`.
    (if (i32.eq (i32.load8_u (local.get $ptr)) (i32.const 116))
      (then
        (i64.store (i32.const 0) (i64.const 999))
        unreachable))
    (call $counter))
  (func (export "wraft_snapshot") (result i64)
    (i64.store (i32.const 3001) (i64.load (i32.const 0)))
    (i32.store8 (i32.const 3000) (i32.const 0))
    (i64.or (i64.shl (i64.const 3000) (i64.const 32)) (i64.const 9)))
  (func (export "wraft_restore") (param $ptr i32) (param $len i32) (result i64)
    (i64.store (i32.const 0) (i64.load (local.get $ptr)))
    (i32.store8 (i32.const 2000) (i32.const 0))
    (i64.or (i64.shl (i64.const 2000) (i64.const 32)) (i64.const 1)))
)"#;

struct Harness {
    ids: ProposalIds,
    raft: RaftStorage,
    inbox: Sender<ApplyInput>,
    thread: Option<std::thread::JoinHandle<()>>,
    replay_from: u64,
    view: SharedView,
    /// The leader timestamp the next entries carry.
    timestamp_ms: u64,
}

fn start(dir: &std::path::Path) -> Harness {
    let (raft, state) = storage::open(
        dir,
        NodeIdentity {
            cluster_id: 7,
            node_id: 1,
        },
        &[1],
    )
    .unwrap();
    let view: SharedView = Arc::new(RwLock::new(AppliedView::default()));
    let (stage, replay_from) = ApplyStage::open(
        Runtime::new().unwrap(),
        Limits::default(),
        state,
        Arc::new(Mutex::new(Default::default())),
        view.clone(),
    )
    .unwrap();
    let (tx, rx) = crossbeam_channel::unbounded();
    let thread = std::thread::spawn(move || stage.run(rx));
    Harness {
        ids: ProposalIds::new(1),
        raft,
        inbox: tx,
        thread: Some(thread),
        replay_from,
        view,
        timestamp_ms: 0,
    }
}

impl Harness {
    /// Appends an entry with `ops` to the log (as the raft loop would), commits it to the stage
    /// and returns each op's outcome.
    fn commit(&mut self, ops: Vec<op::Kind>) -> Vec<OpOutcome> {
        self.commit_raw(ops)
            .into_iter()
            .map(|answer| answer.unwrap().outcome)
            .collect()
    }

    /// Like [`Harness::commit`], but returns what each waiter got, errors included.
    fn commit_raw(&mut self, ops: Vec<op::Kind>) -> Vec<Result<Applied, Error>> {
        self.commit_batch(vec![ops])
            .remove(0)
            .into_iter()
            .map(|a| a.blocking_recv().unwrap())
            .collect()
    }

    /// Appends one entry per element of `entries` and hands them to the stage as ONE batch, as
    /// the Raft loop does; returns the waiters' receivers, entry by entry, without waiting.
    fn commit_batch(
        &mut self,
        entries: Vec<Vec<op::Kind>>,
    ) -> Vec<Vec<oneshot::Receiver<Result<Applied, Error>>>> {
        let mut hs = self.raft.hard_state();
        let mut batch = Vec::new();
        let mut waiters = Vec::new();
        let mut answers = Vec::new();
        for ops in entries {
            let index = hs.commit + 1 + batch.len() as u64;
            let ops: Vec<Op> = ops
                .into_iter()
                .map(|kind| Op {
                    id: Some(self.ids.next_id()),
                    tenant: "t".into(),
                    kind: Some(kind),
                    request_id: String::new(),
                })
                .collect();
            let data = crate::envelope::encode(&LogEntry {
                version: ENVELOPE_VERSION,
                timestamp_ms: self.timestamp_ms,
                ops: ops.clone(),
            });
            batch.push(Entry {
                index,
                term: 1,
                data: data.into(),
                ..Default::default()
            });
            let mut entry_answers = Vec::new();
            for (position, op) in ops.iter().enumerate() {
                let (reply, answer) = oneshot::channel();
                entry_answers.push(answer);
                waiters.push(Waiter {
                    index,
                    position: position as u32,
                    id: op.id.unwrap(),
                    reply,
                });
            }
            answers.push(entry_answers);
        }
        hs.commit += batch.len() as u64;
        hs.term = 1;
        self.raft.append(&batch, Some(&hs), true).unwrap();
        self.inbox.send(ApplyInput::Track(waiters)).unwrap();
        self.inbox.send(ApplyInput::Committed(batch)).unwrap();
        answers
    }

    /// Hands the stage the committed log after its replay point, as raft does on restart.
    fn replay(&self) {
        let commit = self.raft.hard_state().commit;
        let mut entries = Vec::new();
        for index in self.replay_from + 1..=commit {
            entries.push(
                raft::Storage::entries(
                    &self.raft,
                    index,
                    index + 1,
                    None,
                    raft::GetEntriesContext::empty(false),
                )
                .unwrap()
                .remove(0),
            );
        }
        self.inbox.send(ApplyInput::Committed(entries)).unwrap();
    }

    fn counter(&self) -> u64 {
        match self.query(b"get") {
            OpOutcome::Output(bytes) => u64::from_le_bytes(bytes.try_into().unwrap()),
            other => panic!("query failed: {other:?}"),
        }
    }

    fn query(&self, query: &[u8]) -> OpOutcome {
        self.query_raw(query).unwrap().outcome
    }

    /// Like [`Harness::query`], but returns what the stage answered, errors included.
    fn query_raw(&self, query: &[u8]) -> Result<Applied, Error> {
        let (reply, answer) = oneshot::channel();
        self.inbox
            .send(ApplyInput::Query(QueryTask {
                tenant: "t".into(),
                query: query.to_vec(),
                min_index: self.raft.hard_state().commit,
                reply,
            }))
            .unwrap();
        answer.blocking_recv().unwrap()
    }

    fn digest(&self) -> String {
        let (reply, answer) = oneshot::channel();
        self.inbox
            .send(ApplyInput::Digest(DigestTask {
                tenant: "t".into(),
                reply,
            }))
            .unwrap();
        answer.blocking_recv().unwrap().unwrap().state_hash
    }

    fn stop(mut self) {
        self.inbox.send(ApplyInput::Shutdown).unwrap();
        self.thread.take().unwrap().join().unwrap();
    }

    /// Stops without the shutdown checkpoint, as a crash would.
    fn crash(mut self) {
        self.inbox.send(ApplyInput::Abort).unwrap();
        self.thread.take().unwrap().join().unwrap();
    }
}

fn cmd(text: &str) -> op::Kind {
    op::Kind::Command(Command {
        payload: text.as_bytes().to_vec(),
        client_id: String::new(),
        seq: 0,
    })
}

fn output(n: u64) -> OpOutcome {
    OpOutcome::Output(n.to_le_bytes().to_vec())
}

fn is_trap(o: &OpOutcome) -> bool {
    matches!(
        o,
        OpOutcome::Failed {
            kind: Kind::Trap,
            ..
        }
    )
}

/// A deploy op of the TRAPPY module under `engine`, and the module's hash.
fn trappy_deploy(engine: &str) -> (op::Kind, [u8; 32]) {
    let wasm = wat::parse_str(TRAPPY).unwrap();
    let hash: [u8; 32] = Sha256::digest(&wasm).into();
    let deploy = op::Kind::Deploy(Deploy {
        wasm,
        module_hash: hash.to_vec(),
        engine: engine.to_string(),
    });
    (deploy, hash)
}

#[test]
fn a_trap_leaves_no_trace_now_and_after_replay() {
    let dir = tempfile::tempdir().unwrap();
    let (deploy, hash) = trappy_deploy(crate::wasm::ENGINE);
    let mut h = start(dir.path());
    let deployed = h.commit(vec![deploy]);
    assert_eq!(
        deployed,
        vec![OpOutcome::Output(hex::encode(hash).into_bytes())]
    );

    assert_eq!(h.commit(vec![cmd("a")]), vec![output(1)]);
    let trapped = h.commit(vec![cmd("t")]);
    assert!(is_trap(&trapped[0]), "{trapped:?}");
    // Without repair the counter would now be 2 (incremented before the trap).
    assert_eq!(h.commit(vec![cmd("a")]), vec![output(2)]);
    // A trap in the middle of a multi-op entry: the ops around it apply, it leaves nothing.
    let mixed = h.commit(vec![cmd("a"), cmd("t"), cmd("a")]);
    assert_eq!(mixed[0], output(3));
    assert!(is_trap(&mixed[1]), "{mixed:?}");
    assert_eq!(mixed[2], output(4));
    assert_eq!(h.counter(), 4);
    let digest = h.digest();
    // A crash: no shutdown checkpoint. The restart restores the stored checkpoint (a trap keeps
    // its checkpoint in memory) and replays the log after it, meeting the traps again.
    h.crash();

    let h = start(dir.path());
    assert!(
        h.replay_from < h.raft.hard_state().commit,
        "something must be replayed"
    );
    h.replay();
    assert_eq!(
        h.counter(),
        4,
        "replay after restart must give the same state"
    );
    assert_eq!(h.digest(), digest);
    h.stop();

    // After a clean stop nothing needs replaying, and the state is the same.
    let h = start(dir.path());
    h.replay();
    assert_eq!(h.counter(), 4);
    h.stop();
}

#[test]
fn sessions_answer_a_retry_without_applying_it_again() {
    let dir = tempfile::tempdir().unwrap();
    let (deploy, _) = trappy_deploy(crate::wasm::ENGINE);
    let mut h = start(dir.path());
    h.commit(vec![deploy]);
    let with_session = |seq: u64| {
        op::Kind::Command(Command {
            payload: b"a".to_vec(),
            client_id: "c1".into(),
            seq,
        })
    };
    assert_eq!(h.commit(vec![with_session(1)]), vec![output(1)]);
    assert_eq!(
        h.commit(vec![with_session(1)]),
        vec![output(1)],
        "a retry returns the first result"
    );
    assert_eq!(h.commit(vec![with_session(2)]), vec![output(2)]);
    let stale = h.commit(vec![with_session(1)]);
    assert!(
        matches!(
            stale[0],
            OpOutcome::Failed {
                kind: Kind::StaleSequence,
                ..
            }
        ),
        "{stale:?}"
    );
    assert_eq!(h.counter(), 2);
    h.stop();
}

#[test]
fn a_trapping_query_is_repaired_locally_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (deploy, _) = trappy_deploy(crate::wasm::ENGINE);
    let mut h = start(dir.path());
    h.commit(vec![deploy]);
    assert_eq!(h.commit(vec![cmd("a")]), vec![output(1)]);
    assert_eq!(h.commit(vec![cmd("a")]), vec![output(2)]);
    let digest = h.digest();
    assert!(is_trap(&h.query(b"t")), "the hostile query traps");
    // This node now holds the tenant's queries off for a while (at least 250 ms), so that
    // trapping queries cannot keep the apply thread rebuilding.
    match h.query_raw(b"get") {
        Err(Error::Paused(message)) => assert!(
            message.contains("tenant `t`") && message.contains("paused"),
            "{message}"
        ),
        other => panic!("expected the tenant's queries paused, got {other:?}"),
    }
    // Memory was set to 999 before the trap; the repair rebuilt the state from the checkpoint
    // and the log, so the state is as before and the next apply sees 2. Commands are never
    // paused.
    assert_eq!(h.digest(), digest);
    assert_eq!(h.commit(vec![cmd("a")]), vec![output(3)]);
    h.stop();
}

#[test]
fn a_deploy_from_another_engine_stops_this_replica_rather_than_diverge() {
    let dir = tempfile::tempdir().unwrap();
    let (deploy, _) = trappy_deploy("wasmtime 1.0.0; some other accounting");
    let mut h = start(dir.path());
    let answers = h.commit_raw(vec![deploy]);
    match &answers[0] {
        Err(Error::Internal(why)) => assert!(why.contains("Wasm engine"), "{why}"),
        other => panic!("expected the replica to refuse, got {other:?}"),
    }
    h.stop();
}

#[test]
fn a_checkpoint_from_another_engine_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let (deploy, _) = trappy_deploy(crate::wasm::ENGINE);
    let mut h = start(dir.path());
    h.commit(vec![deploy]);
    h.stop();
    // Rewrite the stored checkpoint as if another build had written it.
    let (_raft, state) = storage::open(
        dir.path(),
        NodeIdentity {
            cluster_id: 7,
            node_id: 1,
        },
        &[1],
    )
    .unwrap();
    let mut cp =
        TenantCheckpoint::decode(state.checkpoint("t").unwrap().unwrap().as_slice()).unwrap();
    cp.engine = "wasmtime 99.0.0".into();
    state
        .put_checkpoint("t", &cp.encode_to_vec(), None)
        .unwrap();
    let refused = ApplyStage::open(
        Runtime::new().unwrap(),
        Limits::default(),
        state,
        Arc::new(Mutex::new(Default::default())),
        Arc::new(RwLock::new(AppliedView::default())),
    );
    match refused {
        Err(err) => assert!(err.to_string().contains("wasmtime 99.0.0"), "{err}"),
        Ok(_) => panic!("a checkpoint from another engine must not load"),
    }
}

#[test]
fn a_deployed_tenant_is_visible_as_soon_as_the_deploy_is_answered() {
    // The client API refuses commands for tenants missing from the view: a client that got its
    // deploy's answer must find the tenant there at once, even while the rest of the batch (here
    // 2,000 commands after the deploy) is still being applied; likewise for a delete.
    let dir = tempfile::tempdir().unwrap();
    let mut h = start(dir.path());
    let (deploy, _) = trappy_deploy(crate::wasm::ENGINE);
    let mut entries = vec![vec![deploy]];
    entries.extend((0..2000).map(|_| vec![cmd("a")]));
    let mut answers = h.commit_batch(entries);
    answers
        .remove(0)
        .remove(0)
        .blocking_recv()
        .unwrap()
        .unwrap();
    assert!(
        h.view.read().unwrap().tenants.contains_key("t"),
        "deploy answered before the view showed the tenant"
    );
    for entry in answers {
        for a in entry {
            a.blocking_recv().unwrap().unwrap();
        }
    }
    let mut entries = vec![vec![op::Kind::Delete(wraft_proto::log::Delete {})]];
    entries.extend((0..2000).map(|_| vec![cmd("a")]));
    let mut answers = h.commit_batch(entries);
    answers
        .remove(0)
        .remove(0)
        .blocking_recv()
        .unwrap()
        .unwrap();
    assert!(
        !h.view.read().unwrap().tenants.contains_key("t"),
        "delete answered before the view dropped the tenant"
    );
    h.stop();
}

/// A store-model counter: the count lives in host storage under key `n`. `apply` writes the
/// new count FIRST and then traps when the command starts with `t`, so a trap's write must be
/// dropped; `c` returns the 64-byte context record instead.
const STORE_COUNTER: &str = r#"(module
  (import "wraft" "context" (func $context (param i32)))
  (import "wraft" "take_output" (func $take (param i32)))
  (import "wraft" "storage_get" (func $get (param i32 i32) (result i64)))
  (import "wraft" "storage_put" (func $put (param i32 i32 i32 i32)))
  (memory (export "memory") 1)
  (data (i32.const 100) "n")
  (func (export "wraft_abi_v1"))
  (func (export "wraft_model_store"))
  (func (export "wraft_alloc") (param i32) (result i32) (i32.const 1024))
  (func $load (result i64)
    (if (result i64) (i64.lt_s (call $get (i32.const 100) (i32.const 1)) (i64.const 0))
      (then (i64.const 0))
      (else (call $take (i32.const 200)) (i64.load (i32.const 200)))))
  (func $out (param $v i64) (result i64)
    (i32.store8 (i32.const 2000) (i32.const 0))
    (i64.store (i32.const 2001) (local.get $v))
    (i64.or (i64.shl (i64.const 2000) (i64.const 32)) (i64.const 9)))
  (func (export "wraft_apply") (param $ptr i32) (param $len i32) (result i64)
    (local $v i64)
    (if (i32.eq (i32.load8_u (local.get $ptr)) (i32.const 99))
      (then
        (call $context (i32.const 3001))
        (i32.store8 (i32.const 3000) (i32.const 0))
        (return (i64.or (i64.shl (i64.const 3000) (i64.const 32)) (i64.const 65)))))
    (local.set $v (i64.add (call $load) (i64.const 1)))
    (i64.store (i32.const 300) (local.get $v))
    (call $put (i32.const 100) (i32.const 1) (i32.const 300) (i32.const 8))
    (if (i32.eq (i32.load8_u (local.get $ptr)) (i32.const 116)) (then unreachable))
    (call $out (local.get $v)))
  (func (export "wraft_query") (param $ptr i32) (param $len i32) (result i64)
    (call $out (call $load)))
  (func (export "wraft_snapshot") (result i64) (call $out (call $load)))
  (func (export "wraft_restore") (param $ptr i32) (param $len i32) (result i64)
    (call $put (i32.const 100) (i32.const 1) (local.get $ptr) (i32.const 8))
    (i32.store8 (i32.const 2000) (i32.const 0))
    (i64.or (i64.shl (i64.const 2000) (i64.const 32)) (i64.const 1)))
)"#;

fn deploy_wat(wat: &str) -> op::Kind {
    let wasm = wat::parse_str(wat).unwrap();
    let hash: [u8; 32] = Sha256::digest(&wasm).into();
    op::Kind::Deploy(Deploy {
        wasm,
        module_hash: hash.to_vec(),
        engine: crate::wasm::ENGINE.to_string(),
    })
}

fn context_of(outcome: &OpOutcome) -> (u64, u64, u64, u32, bool, [u8; 32]) {
    let OpOutcome::Output(b) = outcome else {
        panic!("expected the context, got {outcome:?}")
    };
    assert_eq!(b.len(), 64);
    let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap());
    let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap());
    (
        u64_at(0),
        u64_at(8),
        u64_at(16),
        u32_at(24),
        u32_at(28) == 1,
        b[32..64].try_into().unwrap(),
    )
}

#[test]
fn store_model_writes_commit_with_the_op_and_a_trap_drops_them() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = start(dir.path());
    h.commit(vec![deploy_wat(STORE_COUNTER)]);
    assert_eq!(h.commit(vec![cmd("a")]), vec![output(1)]);
    let trapped = h.commit(vec![cmd("t")]);
    assert!(is_trap(&trapped[0]), "{trapped:?}");
    assert_eq!(h.commit(vec![cmd("a")]), vec![output(2)]);
    let mixed = h.commit(vec![cmd("a"), cmd("t"), cmd("a")]);
    assert_eq!(mixed[0], output(3));
    assert!(is_trap(&mixed[1]), "{mixed:?}");
    assert_eq!(mixed[2], output(4));
    assert_eq!(h.counter(), 4);
    let digest = h.digest();
    h.crash();

    // Every op was committed with its position: nothing to replay twice, nothing lost.
    let h = start(dir.path());
    h.replay();
    assert_eq!(h.counter(), 4);
    assert_eq!(h.digest(), digest);
    h.stop();
}

#[test]
fn the_context_comes_from_the_log_and_its_clock_never_goes_back() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = start(dir.path());
    h.commit(vec![deploy_wat(STORE_COUNTER)]);
    h.timestamp_ms = 5_000;
    let first = h.commit(vec![cmd("c"), cmd("c")]);
    let (index, term, ts, pos, in_apply, seed0) = context_of(&first[0]);
    assert_eq!((term, ts, pos, in_apply), (1, 5_000, 0, true));
    assert_eq!(index, h.raft.hard_state().commit);
    let (_, _, _, pos1, _, seed1) = context_of(&first[1]);
    assert_eq!(pos1, 1);
    assert_ne!(seed0, seed1, "each op gets its own seed");
    assert_ne!(seed0, [0; 32]);
    // A new leader whose clock is behind: the tenant's clock stays where it was.
    h.timestamp_ms = 4_000;
    let (_, _, ts, _, _, _) = context_of(&h.commit(vec![cmd("c")])[0]);
    assert_eq!(ts, 5_000);
    h.timestamp_ms = 6_000;
    let (_, _, ts, _, _, _) = context_of(&h.commit(vec![cmd("c")])[0]);
    assert_eq!(ts, 6_000);
    h.stop();
}

#[test]
fn an_upgrade_moves_the_state_between_models_and_back() {
    let dir = tempfile::tempdir().unwrap();
    let (memory, _) = trappy_deploy(crate::wasm::ENGINE);
    let mut h = start(dir.path());
    h.commit(vec![memory.clone()]);
    h.commit(vec![cmd("a"), cmd("a"), cmd("a")]);
    // Memory -> store: TRAPPY's snapshot (the count) goes through the store module's restore.
    let upgraded = h.commit(vec![deploy_wat(STORE_COUNTER)]);
    assert!(matches!(upgraded[0], OpOutcome::Output(_)), "{upgraded:?}");
    assert_eq!(h.counter(), 3);
    assert_eq!(h.commit(vec![cmd("a")]), vec![output(4)]);
    // Store -> memory: the store module's snapshot goes through TRAPPY's restore.
    let back = h.commit(vec![memory]);
    assert!(matches!(back[0], OpOutcome::Output(_)), "{back:?}");
    assert_eq!(h.commit(vec![cmd("a")]), vec![output(5)]);
    let view = h.view.read().unwrap().tenants.get("t").cloned().unwrap();
    assert_eq!(view.version, 3);
    assert_eq!(
        view.history.iter().map(|v| v.0).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    h.crash();
    let h = start(dir.path());
    h.replay();
    assert_eq!(h.counter(), 5);
    h.stop();
}

#[test]
fn a_failing_migrate_leaves_the_tenant_on_the_old_version() {
    let dir = tempfile::tempdir().unwrap();
    let (memory, hash) = trappy_deploy(crate::wasm::ENGINE);
    let mut h = start(dir.path());
    h.commit(vec![memory]);
    h.commit(vec![cmd("a")]);
    let refusing = TRAPPY.replace(
        "(func (export \"wraft_abi_v1\"))",
        "(func (export \"wraft_abi_v1\"))\n  (func (export \"wraft_migrate\") (param i64) (result i64) unreachable)",
    );
    let refused = h.commit(vec![deploy_wat(&refusing)]);
    match &refused[0] {
        OpOutcome::Failed { kind, message } => {
            assert_eq!(*kind, Kind::Trap);
            assert!(
                message.contains("migrate failed, staying on the old version"),
                "{message}"
            );
        }
        other => panic!("expected the upgrade to fail, got {other:?}"),
    }
    let view = h.view.read().unwrap().tenants.get("t").cloned().unwrap();
    assert_eq!((view.version, view.module_hash), (1, hex::encode(hash)));
    assert_eq!(h.commit(vec![cmd("a")]), vec![output(2)]);
    h.stop();
}

fn set_limits(fuel_per_call: u64) -> op::Kind {
    op::Kind::SetLimits(wraft_proto::log::SetLimits {
        limits: Some(wraft_proto::log::TenantLimits {
            fuel_per_call,
            ..Default::default()
        }),
    })
}

#[test]
fn limits_are_replicated_config_that_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (deploy, _) = trappy_deploy(crate::wasm::ENGINE);
    let mut h = start(dir.path());
    h.commit(vec![deploy]);
    assert_eq!(h.commit(vec![cmd("a")]), vec![output(1)]);
    // Too little fuel for any apply: the op fails, the state stays.
    assert!(matches!(
        h.commit(vec![set_limits(20)])[0],
        OpOutcome::Output(_)
    ));
    let starved = h.commit(vec![cmd("a")]);
    assert!(
        matches!(
            &starved[0],
            OpOutcome::Failed {
                kind: Kind::OutOfFuel,
                ..
            }
        ),
        "{starved:?}"
    );
    // Over the cap: refused, the limits stay.
    match &h.commit(vec![set_limits(u64::MAX)])[0] {
        OpOutcome::Failed { kind, message } => {
            assert_eq!(*kind, Kind::Rejected);
            assert!(message.contains("over the cap"), "{message}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    h.crash();
    // The limits are in the checkpoint: still starved after a restart and replay.
    let mut h = start(dir.path());
    h.replay();
    let starved = h.commit(vec![cmd("a")]);
    assert!(
        matches!(
            &starved[0],
            OpOutcome::Failed {
                kind: Kind::OutOfFuel,
                ..
            }
        ),
        "{starved:?}"
    );
    assert!(matches!(
        h.commit(vec![set_limits(1_000_000)])[0],
        OpOutcome::Output(_)
    ));
    assert_eq!(h.commit(vec![cmd("a")]), vec![output(2)]);
    let view = h.view.read().unwrap().tenants.get("t").cloned().unwrap();
    assert_eq!(view.limits.fuel_per_call, 1_000_000);
    h.stop();
}

/// TRAPPY with a 128 KiB snapshot (the counter, then zeros): a state large enough that its
/// checkpoints wait for more commands than the 10,000 ops a small state waits for.
fn large_state_wat() -> String {
    let small = r#"(func (export "wraft_snapshot") (result i64)
    (i64.store (i32.const 3001) (i64.load (i32.const 0)))
    (i32.store8 (i32.const 3000) (i32.const 0))
    (i64.or (i64.shl (i64.const 3000) (i64.const 32)) (i64.const 9)))"#;
    let large = r#"(func (export "wraft_snapshot") (result i64)
    (i64.store (i32.const 4097) (i64.load (i32.const 0)))
    (i32.store8 (i32.const 4096) (i32.const 0))
    (i64.or (i64.shl (i64.const 4096) (i64.const 32)) (i64.const 131073)))"#;
    assert!(TRAPPY.contains(small));
    TRAPPY.replace(small, large).replace(
        r#"(memory (export "memory") 1)"#,
        r#"(memory (export "memory") 3)"#,
    )
}

#[test]
fn a_large_state_is_checkpointed_by_size_and_replays_to_the_same_state() {
    let large = large_state_wat();
    for (wat, checkpoints) in [(TRAPPY, 2), (large.as_str(), 1)] {
        let dir = tempfile::tempdir().unwrap();
        let mut h = start(dir.path());
        h.commit(vec![deploy_wat(wat)]);
        let deployed_at = h.raft.hard_state().commit;
        // 24,000 one-op entries of 1-byte commands (3 bytes encoded): about 70 KB in all.
        let answers = h.commit_batch(vec![vec![cmd("a")]; 24_000]);
        let last = answers.into_iter().flatten().last().unwrap();
        assert_eq!(
            last.blocking_recv().unwrap().unwrap().outcome,
            output(24_000)
        );
        h.crash();

        let mut h = start(dir.path());
        // The first checkpoint comes after 10,000 ops whatever the size (the size is not known
        // before it). After it a 9-byte state is checkpointed every 10,000 ops, and a 128 KiB
        // one waits for 64 KiB of commands (21,846 ops). Replay starts at the last
        // checkpoint's entry (`replay_from` is the entry before it).
        assert_eq!(
            h.replay_from,
            deployed_at + checkpoints * 10_000 - 1,
            "checkpoints expected: {checkpoints}"
        );
        h.replay();
        assert_eq!(
            h.counter(),
            24_000,
            "replay after a crash gives the same state"
        );
        // A trap rebuilds from the checkpoint through every op since: none may be lost.
        assert!(is_trap(&h.commit(vec![cmd("t")])[0]));
        assert_eq!(h.commit(vec![cmd("a")]), vec![output(24_001)]);
        h.stop();
    }
}

#[test]
fn tiny_commands_on_a_large_state_still_checkpoint_within_a_bounded_replay() {
    use super::tenant::checkpoint_due;
    let huge = 1 << 40;
    assert!(!checkpoint_due(9_999, huge, 0), "never before 10,000 ops");
    assert!(
        checkpoint_due(10_000, 5, 10),
        "commands of half the state's size"
    );
    assert!(!checkpoint_due(10_000, 4, 10));
    assert!(!checkpoint_due(99_999, 1, huge));
    assert!(
        checkpoint_due(100_000, 1, huge),
        "replay never exceeds 100,000 ops"
    );
}

#[test]
fn traps_keep_their_checkpoints_in_memory_and_store_every_eighth() {
    let dir = tempfile::tempdir().unwrap();
    let (deploy, _) = trappy_deploy(crate::wasm::ENGINE);
    let mut h = start(dir.path());
    h.commit(vec![deploy]);
    let deployed_at = h.raft.hard_state().commit;
    for n in 1..=7 {
        assert_eq!(h.commit(vec![cmd("a")]), vec![output(n)]);
        assert!(is_trap(&h.commit(vec![cmd("t")])[0]));
    }
    assert_eq!(h.counter(), 7);
    h.crash();

    let mut h = start(dir.path());
    assert_eq!(
        h.replay_from,
        deployed_at - 1,
        "seven traps store no checkpoint"
    );
    h.replay();
    assert_eq!(
        h.counter(),
        7,
        "the replay meets the seven traps again, to the same state"
    );
    // The eighth trap since the stored checkpoint stores one at the trapped op.
    assert!(is_trap(&h.commit(vec![cmd("t")])[0]));
    let eighth = h.raft.hard_state().commit;
    assert_eq!(h.commit(vec![cmd("a")]), vec![output(8)]);
    h.crash();

    let h = start(dir.path());
    assert_eq!(
        h.replay_from,
        eighth - 1,
        "replay starts at the eighth trap"
    );
    h.replay();
    assert_eq!(h.counter(), 8);
    h.stop();
}

#[test]
fn a_trapped_query_pauses_queries_for_nine_times_the_rebuild() {
    use super::tenant::query_pause;
    use std::time::Duration;
    assert_eq!(
        query_pause(0),
        Duration::from_millis(250),
        "at least a quarter second"
    );
    assert_eq!(query_pause(1 << 20), Duration::from_millis(250));
    // 40 MB rebuilds in about 0.2 s at 200 MB/s: paused for 1.8 s.
    assert_eq!(query_pause(40_000_000), Duration::from_millis(1800));
}

#[test]
fn trap_recoveries_past_their_share_refuse_commands_until_paid_back() {
    use super::tenant::TrapBudget;
    use std::time::{Duration, Instant};
    let t0 = Instant::now();
    let mut budget = TrapBudget::default();
    assert_eq!(budget.refuse_until(), None, "no trap, no refusal");
    // A 100 ms recovery: 900 ms of debt, inside the burst.
    budget.charge(Duration::from_millis(100), t0);
    assert_eq!(budget.refuse_until(), None);
    // 10 ms later a 50 ms one: 890 + 450 = 1,340 ms, 340 over the burst.
    let t1 = t0 + Duration::from_millis(10);
    budget.charge(Duration::from_millis(50), t1);
    assert_eq!(budget.refuse_until(), Some(t1 + Duration::from_millis(340)));
    // Wall time pays it back: a second later a 1 ms recovery leaves 349 ms, inside again.
    let t2 = t1 + Duration::from_secs(1);
    budget.charge(Duration::from_millis(1), t2);
    assert_eq!(budget.refuse_until(), None);
    // Cheap traps back to back, each under a ninth of the time between them, never add up.
    let mut cheap = TrapBudget::default();
    for i in 0..10_000u64 {
        cheap.charge(Duration::from_micros(100), t0 + Duration::from_millis(i));
    }
    assert_eq!(cheap.refuse_until(), None);
}

#[test]
fn traps_back_to_back_reuse_their_checkpoint_and_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (deploy, _) = trappy_deploy(crate::wasm::ENGINE);
    let mut h = start(dir.path());
    h.commit(vec![deploy]);
    let mut n = 0;
    // Runs of traps between successful commands: a run's first trap rebuilds over the command
    // before it, the others over nothing (their state is their checkpoint's, reused as is).
    // Reusing it after the first would lose that command.
    for run in 1..=6 {
        n += 1;
        assert_eq!(h.commit(vec![cmd("a")]), vec![output(n)]);
        for _ in 0..run {
            assert!(is_trap(&h.commit(vec![cmd("t")])[0]));
        }
        n += 1;
        assert_eq!(
            h.commit(vec![cmd("a")]),
            vec![output(n)],
            "after {run} traps in a row"
        );
    }
    // The same within one entry.
    let out = h.commit(vec![cmd("t"), cmd("t"), cmd("a"), cmd("t"), cmd("a")]);
    assert!(
        is_trap(&out[0]) && is_trap(&out[1]) && is_trap(&out[3]),
        "{out:?}"
    );
    assert_eq!((&out[2], &out[4]), (&output(n + 1), &output(n + 2)));
    n += 2;
    // 24 traps: three of them stored a checkpoint (every eighth), kept in memory as well.
    h.crash();
    let h = start(dir.path());
    h.replay();
    assert_eq!(h.counter(), n, "replay reaches the same state");
    h.stop();
}
