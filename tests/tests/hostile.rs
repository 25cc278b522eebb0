//! Hostile modules on a live 3-node cluster (issue 3): each one gets a clear, specific error
//! while the nodes and a healthy tenant keep serving.
//!
//! One cluster, compacting every [`SNAPSHOT_ENTRIES`] entries so that checkpoints (and with them
//! the modules' `snapshot`) run all the time. The kv plugin runs as tenant [`GOOD`], written to
//! by a background task for the whole test (every write acknowledged, or retried after a clear,
//! retryable error that is recorded). Then, one hostile tenant at a time:
//!
//! - refused at deploy (INVALID_ARGUMENT, definite, naming the problem): bytes that are not a
//!   module, a missing export, WASI imports (`clock_time_get`, `random_get`) and an import of
//!   the host's own stack counter;
//! - refused per call (a module error of the right kind and message; the tenant's state is as
//!   before the op on every replica and the tenant keeps working): an infinite loop (fuel), a
//!   memory bomb (memory limit), unbounded recursion (stack limit), a giant result, a trap in
//!   `apply`, a guest panic with its message, a trap in `query` on every node;
//! - float code producing NaNs: the same canonical bytes on every replica;
//! - a trap in `snapshot` (an upgrade must take the running version's snapshot) and a trap in
//!   the new version's `restore`: the upgrade fails (FAILED_PRECONDITION) and the tenant stays on
//!   its version with its state; so does a migration (`wraft_migrate`) that traps;
//! - a trap in `snapshot` at compaction: every acknowledged op of the tenant survives;
//! - (a test of its own) a tenant with 8 MB of state whose commands trap in a loop: the nodes
//!   take no new commands for it once recovering from its traps passes its share of the apply
//!   thread, a neighbour goes on being served, and then it is served again.
//!
//! After each case a write to the healthy tenant through a follower and through the leader
//! succeeds, the background writer has made progress and no node process exited. At the end
//! every acknowledged write is readable on every node and, for every tenant, every replica's
//! digest is the same.
//!
//! The hostile modules are WAT, built on one template ([`Wat`]) whose healthy behaviour is a
//! counter: any command but one starting with `!` adds 1 to `n` and returns `n` (8 bytes, little
//! endian); a query returns `n`. A command or query starting with `!` runs the hostile code.
//!
//! Needs the `wraft` binary and the kv plugin (`scripts/build-plugins.sh`); see `paths`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::task::JoinHandle;
use tonic::{Code, Status};
use wraft_tests::api::module_error::Kind;
use wraft_tests::api::{Consistency, DigestResponse, QueryRequest};
use wraft_tests::cluster::{exec_on, exec_request, Client, ClusterOptions};
use wraft_tests::{
    json, plugin_bytes, sha256_hex, wait_until, within, Certainty, Cluster, ExecOutcome, NodeId,
    QueryOutcome, APPLY_TIMEOUT, RPC_TIMEOUT,
};

/// The healthy tenant (the kv plugin).
const GOOD: &str = "good";
/// Compaction (a checkpoint of every changed tenant, hence its `snapshot`) every this many
/// applied entries.
const SNAPSHOT_ENTRIES: u64 = 40;
/// How long one write to the healthy tenant may keep failing with retryable errors.
const WRITE_PATIENCE: Duration = Duration::from_secs(30);
/// Pause before retrying a write that failed with a retryable error.
const RETRY_PAUSE: Duration = Duration::from_millis(20);
/// Writes the background writer must get acknowledged during each case.
const ACKS_PER_CASE: usize = 3;
/// The size of the giant result: over the 4 MiB result limit, inside the module's memory.
const GIANT_RESULT: u64 = 5 << 20;
/// The message the panicking module records before it traps.
const PANIC_MESSAGE: &str = "boom: hostile guest panicked at src/lib.rs:7:5";

/// A module built on the counter template; every field is WAT spliced into it.
#[derive(Clone, Copy)]
struct Wat<'a> {
    /// Wasm pages of the initial memory.
    pages: u32,
    /// Runs for a command starting with `!` (locals `$ptr`, `$len`); falling off its end
    /// counts the command like any other.
    apply: &'a str,
    /// Runs for a query starting with `!`; falling off its end answers `n`.
    query: &'a str,
    /// Runs first in `wraft_snapshot`.
    snapshot: &'a str,
    /// Runs first in `wraft_restore`.
    restore: &'a str,
    /// Placed right after `(module`: imports.
    imports: &'a str,
    /// More module fields.
    extra: &'a str,
}

const HEALTHY: Wat<'static> = Wat {
    pages: 1,
    apply: "",
    query: "",
    snapshot: "",
    restore: "",
    imports: "",
    extra: "",
};

/// The message of a restore that is given a snapshot of the wrong size.
const BAD_SNAPSHOT: &str = "snapshot is not 48 bytes";

impl Wat<'_> {
    /// The module's text. Memory layout: the status byte of a reply at 15; the state (48
    /// bytes) at 16: `n` (i64) at 16, the armed flag (i32) at 24, NaN results at 32..64; the
    /// restore error at 64; the NaN reply at 199; the panic message at 300; inputs at 1024.
    fn text(&self) -> String {
        let Wat {
            pages,
            apply,
            query,
            snapshot,
            restore,
            imports,
            extra,
        } = self;
        let reply_n = (15u64 << 32) | 9;
        let reply_state = (15u64 << 32) | 49;
        let reply_empty = (15u64 << 32) | 1;
        let reject = (64u64 << 32) | (BAD_SNAPSHOT.len() as u64 + 1);
        format!(
            r#"(module
  {imports}
  (memory (export "memory") {pages})
  (data (i32.const 64) "\01{BAD_SNAPSHOT}")
  (func (export "wraft_abi_v1"))
  (func (export "wraft_alloc") (param $len i32) (result i32) (i32.const 1024))
  (func $reply_n (result i64)
    (i32.store8 (i32.const 15) (i32.const 0))
    (i64.const {reply_n}))
  (func $hostile (param $ptr i32) (param $len i32) (result i32)
    (if (result i32) (local.get $len)
      (then (i32.eq (i32.load8_u (local.get $ptr)) (i32.const 33)))
      (else (i32.const 0))))
  (func (export "wraft_apply") (param $ptr i32) (param $len i32) (result i64)
    (if (call $hostile (local.get $ptr) (local.get $len)) (then {apply}))
    (i64.store (i32.const 16) (i64.add (i64.load (i32.const 16)) (i64.const 1)))
    (call $reply_n))
  (func (export "wraft_query") (param $ptr i32) (param $len i32) (result i64)
    (if (call $hostile (local.get $ptr) (local.get $len)) (then {query}))
    (call $reply_n))
  (func (export "wraft_snapshot") (result i64)
    {snapshot}
    (i32.store8 (i32.const 15) (i32.const 0))
    (i64.const {reply_state}))
  (func (export "wraft_restore") (param $ptr i32) (param $len i32) (result i64)
    {restore}
    (if (i32.ne (local.get $len) (i32.const 48)) (then (return (i64.const {reject}))))
    (memory.copy (i32.const 16) (local.get $ptr) (i32.const 48))
    (i32.store8 (i32.const 15) (i32.const 0))
    (i64.const {reply_empty}))
  {extra}
)"#
        )
    }

    fn wasm(&self) -> Vec<u8> {
        let text = self.text();
        wat::parse_str(&text)
            .unwrap_or_else(|e| panic!("hostile module does not assemble: {e}\n{text}"))
    }
}

/// `apply` of the NaN module: float operations on NaNs with payloads (and on -1 and 0/0),
/// read from the command so nothing is folded at compile time. The command is `!`, then an f64
/// NaN with a payload (offset 1), -1.0 (offset 9), an f32 NaN with a payload (offset 17) and
/// 0.0f32 (offset 21). The results are kept in the state (32..64) and returned.
const NAN_APPLY: &str = "
    (f64.store (i32.const 32) (f64.add (f64.load offset=1 (local.get $ptr)) (f64.const 1)))
    (f64.store (i32.const 40) (f64.sqrt (f64.load offset=9 (local.get $ptr))))
    (f64.store (i32.const 48) (f64.min (f64.load offset=1 (local.get $ptr)) (f64.const 0)))
    (f32.store (i32.const 56)
      (f32.div (f32.load offset=21 (local.get $ptr)) (f32.load offset=21 (local.get $ptr))))
    (f32.store (i32.const 60) (f32.mul (f32.load offset=17 (local.get $ptr)) (f32.const 2)))
    (return (call $reply_nans))";

/// The NaN reply: status 0 at 199, the 32 result bytes after it.
const NAN_EXTRA: &str = "
  (func $reply_nans (result i64)
    (i32.store8 (i32.const 199) (i32.const 0))
    (memory.copy (i32.const 200) (i32.const 32) (i32.const 32))
    (i64.const 0xc700000021))";

fn nan_command() -> Vec<u8> {
    let mut command = vec![b'!'];
    // Negative, signalling, with a payload: hardware would propagate some of it.
    command.extend(0xfff4_0000_0000_0001u64.to_le_bytes());
    command.extend((-1.0f64).to_le_bytes());
    command.extend(0xffa0_0001u32.to_le_bytes());
    command.extend(0f32.to_le_bytes());
    command
}

/// What [`NAN_APPLY`] must produce everywhere: canonical NaNs only.
fn canonical_nans() -> Vec<u8> {
    let mut bytes = Vec::new();
    for _ in 0..3 {
        bytes.extend(0x7ff8_0000_0000_0000u64.to_le_bytes());
    }
    for _ in 0..2 {
        bytes.extend(0x7fc0_0000u32.to_le_bytes());
    }
    bytes
}

/// What the background writer and the test share.
#[derive(Default)]
struct Progress {
    stop: AtomicBool,
    acks: AtomicUsize,
    /// Why the writer stopped on its own: an error that is not a clear, retryable one.
    fatal: std::sync::Mutex<Option<String>>,
}

/// What the background writer did.
#[derive(Default)]
struct WriterReport {
    /// key → (value, index of the acknowledgement).
    acks: BTreeMap<String, (String, u64)>,
    /// Every retryable error a write got before it was acknowledged.
    retried: Vec<String>,
    /// The longest time from a write's first attempt to its acknowledgement.
    slowest: Duration,
}

/// A retryable error with the `wraft-outcome` contract: definite (not applied, retry) or
/// indeterminate (maybe applied; the retry of the same put is harmless).
fn retryable(out: &ExecOutcome) -> bool {
    let clear = |s: &Status| !s.message().trim().is_empty();
    match out {
        ExecOutcome::Definite(s) => {
            clear(s)
                && matches!(
                    s.code(),
                    Code::Unavailable | Code::Aborted | Code::ResourceExhausted
                )
        }
        ExecOutcome::Indeterminate(s) => {
            clear(s)
                && matches!(
                    s.code(),
                    Code::DeadlineExceeded | Code::Unavailable | Code::Unknown
                )
        }
        _ => false,
    }
}

/// Puts distinct keys into [`GOOD`] until told to stop, one node after the other (so followers
/// forward). Stops with `progress.fatal` set on any outcome that is not an acknowledgement or a
/// retryable error.
async fn good_writer(mut clients: Vec<(NodeId, Client)>, progress: Arc<Progress>) -> WriterReport {
    let mut report = WriterReport::default();
    let mut turn = 0usize;
    for n in 0.. {
        if progress.stop.load(Ordering::SeqCst) {
            break;
        }
        let (key, value) = (format!("w-{n:06}"), format!("v{n}"));
        let command = json!({"op": "put", "key": key, "value": value})
            .to_string()
            .into_bytes();
        let started = Instant::now();
        let mut maybe_applied = false;
        let index = loop {
            let count = clients.len();
            let (node, client) = &mut clients[turn % count];
            turn += 1;
            let what = format!("good writer: put {key} through node {node}");
            let request = exec_request(GOOD, command.clone(), "", 0);
            let out = exec_on(client, request, &what).await;
            match &out {
                ExecOutcome::Ok { index, output } => {
                    let prev = json(output);
                    if prev == json!({"prev": null})
                        || (maybe_applied && prev == json!({ "prev": value }))
                    {
                        break *index;
                    }
                    *progress.fatal.lock().unwrap() = Some(format!(
                        "{what}: prev {prev} (an earlier attempt may have applied: {maybe_applied})"
                    ));
                    return report;
                }
                _ if retryable(&out) && started.elapsed() < WRITE_PATIENCE => {
                    maybe_applied |= matches!(out, ExecOutcome::Indeterminate(_));
                    report
                        .retried
                        .push(format!("{what} after {:?}: {out}", started.elapsed()));
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
                _ => {
                    *progress.fatal.lock().unwrap() = Some(format!(
                        "{what} after {:?}: {out} (not a clear, retryable error)",
                        started.elapsed()
                    ));
                    return report;
                }
            }
        };
        report.slowest = report.slowest.max(started.elapsed());
        report.acks.insert(key, (value, index));
        progress.acks.fetch_add(1, Ordering::SeqCst);
    }
    report
}

/// Execs raw bytes through `via` until they are applied: definite errors (nothing applied) are
/// retried until [`APPLY_TIMEOUT`]; returns the result or the module error.
async fn exec_applied(cluster: &Cluster, via: NodeId, tenant: &str, command: &[u8]) -> ExecOutcome {
    let what = format!(
        "{:?} on {tenant} through node {via} to be applied",
        String::from_utf8_lossy(command)
    );
    let what = &what;
    wait_until(APPLY_TIMEOUT, what, move || async move {
        let request = exec_request(tenant, command.to_vec(), "", 0);
        let out = exec_on(&mut cluster.client(via), request, what).await;
        match out {
            ExecOutcome::Ok { .. } | ExecOutcome::ModuleError { .. } => Ok(out),
            ExecOutcome::Definite(s) => {
                Err(format!("definite error {:?}: {}", s.code(), s.message()))
            }
            other => panic!("{what}: {other}"),
        }
    })
    .await
}

/// A module error of `kind` whose message holds every needle; returns its index.
fn expect_module_error(out: &ExecOutcome, kind: Kind, needles: &[&str], what: &str) -> u64 {
    match out {
        ExecOutcome::ModuleError {
            index,
            kind: got,
            message,
        } if *got == kind => {
            for needle in needles {
                assert!(
                    message.contains(needle),
                    "{what}: the {kind:?} error should say {needle:?}: {message:?}"
                );
            }
            *index
        }
        other => panic!("{what}: expected a {kind:?} module error, got {other}"),
    }
}

/// The counter a template module returned.
fn counter(bytes: &[u8], what: &str) -> i64 {
    let bytes: [u8; 8] = bytes
        .try_into()
        .unwrap_or_else(|_| panic!("{what}: expected 8 bytes of counter, got {bytes:?}"));
    i64::from_le_bytes(bytes)
}

/// A healthy command on a template module: (index, n after it).
async fn inc(cluster: &Cluster, via: NodeId, tenant: &str) -> (u64, i64) {
    let what = format!("inc on {tenant} through node {via}");
    match exec_applied(cluster, via, tenant, b"inc").await {
        ExecOutcome::Ok { index, output } => (index, counter(&output, &what)),
        other => panic!("{what}: {other}"),
    }
}

async fn query_raw(
    cluster: &Cluster,
    via: NodeId,
    tenant: &str,
    query: &[u8],
    consistency: Consistency,
) -> QueryOutcome {
    let request = QueryRequest {
        tenant: tenant.into(),
        query: query.to_vec(),
        consistency: consistency as i32,
    };
    let what = format!("{consistency:?} query of {tenant} through node {via}");
    QueryOutcome::from_result(within(RPC_TIMEOUT, &what, cluster.client(via).query(request)).await)
}

/// Every node, once it applied `index`, answers `n` for a template tenant from its own state.
async fn expect_n_everywhere(cluster: &Cluster, tenant: &str, index: u64, n: i64) {
    for id in cluster.ids() {
        cluster.wait_applied(id, index).await;
        let what = format!("n of {tenant} on node {id} (stale, applied >= {index})");
        match query_raw(cluster, id, tenant, b"n", Consistency::Stale).await {
            QueryOutcome::Ok { output, .. } => assert_eq!(counter(&output, &what), n, "{what}"),
            other => panic!("{what}: {other}"),
        }
    }
}

/// A refused deploy: `code`, definite, and a message holding every needle.
fn expect_refusal(
    result: Result<impl std::fmt::Debug, Status>,
    code: Code,
    needles: &[&str],
    what: &str,
) {
    let status = match result {
        Ok(response) => panic!("{what}: the deploy should have been refused, got {response:?}"),
        Err(status) => status,
    };
    assert_eq!(status.code(), code, "{what}: {status:?}");
    assert_eq!(
        Certainty::of(&status),
        Certainty::Definite,
        "{what}: wraft-outcome of {status:?}"
    );
    for needle in needles {
        assert!(
            status.message().contains(needle),
            "{what}: the message should say {needle:?}: {:?}",
            status.message()
        );
    }
}

/// Every node, once it applied `index`, reports `tenant` at `version` running `module_hash`.
async fn expect_version(
    cluster: &Cluster,
    tenant: &str,
    index: u64,
    version: u64,
    module_hash: &str,
) {
    for id in cluster.ids() {
        let status = cluster.wait_applied(id, index).await;
        let found = status.tenants.iter().find(|t| t.name == tenant);
        assert!(
            matches!(found, Some(t) if t.version == version && t.module_hash == module_hash),
            "node {id} at applied index {}: {tenant} should be version {version} running \
             {module_hash}, found {found:?}",
            status.applied_index
        );
    }
}

/// Every node's digest of `tenant`, once every node applied `index`, compared once: after
/// that index nothing changes the tenant, so digests that differ then never agree.
async fn digests_agree(
    cluster: &Cluster,
    tenant: &str,
    index: u64,
) -> Result<DigestResponse, String> {
    let mut digests = Vec::new();
    for id in cluster.ids() {
        cluster.wait_applied(id, index).await;
        digests.push((id, cluster.digest(id, tenant).await?));
    }
    let first = digests[0].1.clone();
    let agree = digests.iter().all(|(_, d)| {
        d.index == first.index
            && d.state_hash == first.state_hash
            && d.module_hash == first.module_hash
    });
    if agree {
        Ok(first)
    } else {
        Err(digests
            .iter()
            .map(|(id, d)| {
                format!(
                    "node {id}: index {} state {} module {}",
                    d.index, d.state_hash, d.module_hash
                )
            })
            .collect::<Vec<_>>()
            .join("; "))
    }
}

/// Every key of [`GOOD`] and its value, read from one node with one scan.
async fn scan_good(
    cluster: &Cluster,
    via: NodeId,
    consistency: Consistency,
) -> BTreeMap<String, String> {
    let out = cluster
        .query(
            via,
            GOOD,
            &json!({"op": "scan", "prefix": "", "limit": 10_000_000}),
            consistency,
        )
        .await
        .expect_json(&format!(
            "scan of {GOOD} ({consistency:?}) through node {via}"
        ));
    out["items"]
        .as_array()
        .unwrap_or_else(|| panic!("scan through node {via}: no items: {out}"))
        .iter()
        .map(|item| match (item[0].as_str(), item[1].as_str()) {
            (Some(k), Some(v)) => (k.to_string(), v.to_string()),
            _ => panic!("scan item through node {via} is not [key, value]: {item}"),
        })
        .collect()
}

/// The test's state between cases.
struct Ctx<'a> {
    cluster: &'a Cluster,
    ids: Vec<NodeId>,
    progress: Arc<Progress>,
    /// The background writer, until the end takes it.
    writer: Option<JoinHandle<WriterReport>>,
    /// Puts on [`GOOD`] made after each case: key → (value, index).
    checks: BTreeMap<String, (String, u64)>,
    /// Tenants that exist: every replica's digest must agree at the end.
    tenants: Vec<String>,
    /// Names whose deploy was refused: no node may know them.
    refused: Vec<String>,
    /// The current case: name, start, the writer's acknowledgements then.
    case: (String, Instant, usize),
    timings: Vec<(String, Duration)>,
}

impl Ctx<'_> {
    async fn leader(&self) -> NodeId {
        self.cluster.leader().await
    }

    /// A node that is not the leader (the leader is looked up afresh).
    async fn follower(&self) -> NodeId {
        let leader = self.leader().await;
        self.ids.iter().copied().find(|&id| id != leader).unwrap()
    }

    fn begin(&mut self, case: &str) {
        eprintln!("---- case {case} ----");
        self.case = (
            case.to_string(),
            Instant::now(),
            self.progress.acks.load(Ordering::SeqCst),
        );
    }

    /// After a hostile case: no node exited, a write to [`GOOD`] through a follower and through
    /// the leader is applied, and the background writer got more writes acknowledged.
    async fn end(&mut self) {
        let (case, started, acks_before) = self.case.clone();
        for &id in &self.ids {
            assert!(
                self.cluster.is_running(id),
                "node {id} exited during case {case}: {:?}",
                self.cluster.status(id).await
            );
        }
        let leader = self.leader().await;
        let follower = self.ids.iter().copied().find(|&id| id != leader).unwrap();
        for (via, role) in [(follower, "follower"), (leader, "leader")] {
            let (key, value) = (format!("check-{case}-{role}"), format!("after {case}"));
            let (index, prev) = self
                .cluster
                .exec_ok(via, GOOD, &json!({"op": "put", "key": key, "value": value}))
                .await;
            assert_eq!(
                prev,
                json!({"prev": null}),
                "put of {key} through the {role} (node {via}) after case {case}"
            );
            self.checks.insert(key, (value, index));
        }
        let progress = &self.progress;
        let writer = self.writer.as_ref().expect("the background writer runs");
        let case = &case;
        wait_until(
            APPLY_TIMEOUT,
            &format!("the background writer to get {ACKS_PER_CASE} writes acknowledged during case {case}"),
            || async move {
                if let Some(fatal) = progress.fatal.lock().unwrap().clone() {
                    panic!("the background writer stopped during case {case}: {fatal}");
                }
                assert!(!writer.is_finished(), "the background writer ended during case {case}");
                let acks = progress.acks.load(Ordering::SeqCst);
                if acks >= acks_before + ACKS_PER_CASE {
                    Ok(())
                } else {
                    Err(format!("{} acknowledged since the case began", acks - acks_before))
                }
            },
        )
        .await;
        eprintln!("---- case {case}: {:?} ----", started.elapsed());
        self.timings.push((case.clone(), started.elapsed()));
    }

    /// Deploys `wasm` as `tenant` through `via`, which must succeed.
    async fn deploy(&mut self, via: NodeId, tenant: &str, wasm: Vec<u8>) -> u64 {
        let hash = sha256_hex(&wasm);
        let deployed = self
            .cluster
            .deploy_bytes(via, tenant, wasm)
            .await
            .unwrap_or_else(|s| {
                panic!(
                    "deploying {tenant} through node {via}: {:?} {}",
                    s.code(),
                    s.message()
                )
            });
        assert_eq!(deployed.module_hash, hash, "module hash of {tenant}");
        self.tenants.push(tenant.to_string());
        deployed.index
    }

    /// A deploy refused by validation: INVALID_ARGUMENT naming the problem.
    async fn refused_deploy(&mut self, tenant: &str, wasm: Vec<u8>, needles: &[&str]) {
        self.begin(tenant);
        let via = if self.refused.len().is_multiple_of(2) {
            self.follower().await
        } else {
            self.leader().await
        };
        let result = self.cluster.deploy_bytes(via, tenant, wasm).await;
        expect_refusal(
            result,
            Code::InvalidArgument,
            needles,
            &format!("deploy of {tenant} through node {via}"),
        );
        self.refused.push(tenant.to_string());
        self.end().await;
    }

    /// A module whose `apply` misbehaves on `!`: the call fails with `kind` and a message
    /// holding the needles; the tenant's state is as before on every replica and it keeps
    /// working.
    async fn apply_case(&mut self, tenant: &str, module: Wat<'_>, kind: Kind, needles: &[&str]) {
        self.begin(tenant);
        let leader = self.leader().await;
        let follower = self.follower().await;
        // Alternate the entry point: half the hostile calls are forwarded by a follower.
        let (deploy_via, hostile_via) = if self.tenants.len().is_multiple_of(2) {
            (leader, follower)
        } else {
            (follower, leader)
        };
        self.deploy(deploy_via, tenant, module.wasm()).await;
        let (_, n) = inc(self.cluster, follower, tenant).await;
        assert_eq!(n, 1, "first inc on {tenant}");
        let started = Instant::now();
        let out = exec_applied(self.cluster, hostile_via, tenant, b"!").await;
        let what = format!("hostile apply on {tenant} through node {hostile_via}");
        expect_module_error(&out, kind, needles, &what);
        eprintln!("{what}: answered after {:?}: {out}", started.elapsed());
        // The trapped op changed nothing; the rebuilt instance goes on from there.
        let (index, n) = inc(self.cluster, leader, tenant).await;
        assert_eq!(n, 2, "inc on {tenant} after the hostile op");
        expect_n_everywhere(self.cluster, tenant, index, 2).await;
        self.end().await;
    }
}

/// A module whose state is 8 MB, so that recovering from a trap (a restore of the whole state)
/// costs the apply thread milliseconds. The state is at 65537.. (its first 8 bytes a counter);
/// replies at 2000. Command `f` fills the state, `t` traps, anything else adds 1 to the
/// counter; every reply but the trap's is the counter.
const LARGE_TRAPPING: &str = r#"(module
  (memory (export "memory") 300)
  (func (export "wraft_abi_v1"))
  (func (export "wraft_alloc") (param i32) (result i32) (i32.const 9000000))
  (func $counter (result i64)
    (i32.store8 (i32.const 2000) (i32.const 0))
    (i64.store (i32.const 2001) (i64.load (i32.const 65537)))
    (i64.const 0x7d000000009))
  (func $fill (local $p i32) (local $x i64)
    (local.set $p (i32.const 65545))
    (local.set $x (i64.const 88172645463325252))
    (block $done (loop $next
      (br_if $done (i32.ge_u (local.get $p) (i32.const 8065537)))
      (local.set $x (i64.add (i64.mul (local.get $x) (i64.const 6364136223846793005))
                             (i64.const 1442695040888963407)))
      (i64.store (local.get $p) (local.get $x))
      (local.set $p (i32.add (local.get $p) (i32.const 8)))
      (br $next))))
  (func (export "wraft_apply") (param $ptr i32) (param $len i32) (result i64)
    (i64.store (i32.const 65537) (i64.add (i64.load (i32.const 65537)) (i64.const 1)))
    (if (i32.eq (i32.load8_u (local.get $ptr)) (i32.const 116)) (then unreachable))
    (if (i32.eq (i32.load8_u (local.get $ptr)) (i32.const 102)) (then (call $fill)))
    (call $counter))
  (func (export "wraft_query") (param $ptr i32) (param $len i32) (result i64)
    (call $counter))
  (func (export "wraft_snapshot") (result i64)
    (i32.store8 (i32.const 65536) (i32.const 0))
    (i64.const 0x10000007a1201))
  (func (export "wraft_restore") (param $ptr i32) (param $len i32) (result i64)
    (memory.copy (i32.const 65537) (local.get $ptr) (local.get $len))
    (i32.store8 (i32.const 2000) (i32.const 0))
    (i64.const 0x7d000000001))
)"#;

/// A client looping on a command that traps makes every node restore the tenant's whole state
/// each time, on the apply thread all tenants share. Once those recoveries pass their share of
/// the thread, a node takes no new commands for that tenant for a while (a definite
/// RESOURCE_EXHAUSTED naming it), while a neighbour's commands go on; then it takes them again,
/// and the replicas agree on its state (the refusals changed nothing in the log).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tenant_trapping_past_its_share_is_refused_commands_and_its_neighbour_is_not() {
    let cluster = Cluster::start(3).await;
    let leader = cluster.leader().await;
    cluster.deploy(leader, GOOD, "kv").await;
    let wasm = wat::parse_str(LARGE_TRAPPING).expect("the large trapping module assembles");
    if let Err(s) = cluster.deploy_bytes(leader, "big", wasm).await {
        panic!("deploying the large trapping module: {s:?}");
    }
    match exec_applied(&cluster, leader, "big", b"f").await {
        ExecOutcome::Ok { output, .. } => assert_eq!(counter(&output, "fill"), 1),
        other => panic!("filling big: {other}"),
    }

    // Each trap costs a restore of 8 MB, so looping on it passes the share in well under a
    // thousand traps (about ten on this machine's 2 cores).
    let mut client = cluster.client(leader);
    let mut traps = 0;
    let refusal = loop {
        assert!(traps < 1000, "{traps} traps in a row were all taken");
        let request = exec_request("big", b"t".to_vec(), "", 0);
        match exec_on(&mut client, request, "trapping command").await {
            out @ ExecOutcome::ModuleError { .. } => {
                expect_module_error(&out, Kind::Trap, &["unreachable"], "trapping command");
                traps += 1;
            }
            ExecOutcome::Definite(status) => break status,
            other => panic!("trapping command {traps}: {other}"),
        }
    };
    assert_eq!(refusal.code(), Code::ResourceExhausted, "{refusal:?}");
    assert!(
        refusal.message().contains("tenant `big`") && refusal.message().contains("no new commands"),
        "the refusal should name the tenant and say why: {:?}",
        refusal.message()
    );

    // The neighbour is served while big is refused.
    cluster
        .exec_ok(
            leader,
            GOOD,
            &json!({"op":"put","key":"beside","value":"traps"}),
        )
        .await;

    // big is served again once its recoveries are paid back, with every trap undone.
    let what = "big to take a command again";
    let output = wait_until(APPLY_TIMEOUT, what, || async {
        let request = exec_request("big", b"n".to_vec(), "", 0);
        match exec_on(&mut cluster.client(leader), request, what).await {
            ExecOutcome::Ok { output, .. } => Ok(output),
            ExecOutcome::Definite(s) if s.code() == Code::ResourceExhausted => {
                Err(s.message().to_string())
            }
            other => panic!("{what}: {other}"),
        }
    })
    .await;
    assert_eq!(
        counter(&output, "n after the traps"),
        2,
        "after {traps} traps"
    );
    let (index, _) = cluster
        .exec_ok(
            leader,
            GOOD,
            &json!({"op":"put","key":"after","value":"traps"}),
        )
        .await;
    if let Err(e) = digests_agree(&cluster, "big", index).await {
        panic!("the replicas of big differ after the traps: {e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_modules_get_precise_errors_while_a_healthy_tenant_keeps_serving() {
    let test_started = Instant::now();
    let cluster = Cluster::start_with(
        3,
        ClusterOptions {
            args: vec!["--snapshot-entries".into(), SNAPSHOT_ENTRIES.to_string()],
            ..Default::default()
        },
    )
    .await;
    let ids = cluster.ids();
    let leader = cluster.leader().await;
    cluster.deploy(leader, GOOD, "kv").await;

    let progress = Arc::new(Progress::default());
    let clients = ids.iter().map(|&id| (id, cluster.client(id))).collect();
    let writer = tokio::spawn(good_writer(clients, progress.clone()));
    let mut ctx = Ctx {
        cluster: &cluster,
        ids: ids.clone(),
        progress: progress.clone(),
        writer: Some(writer),
        checks: BTreeMap::new(),
        tenants: vec![GOOD.to_string()],
        refused: Vec::new(),
        case: ("start".into(), Instant::now(), 0),
        timings: Vec::new(),
    };
    ctx.begin("warm-up");
    ctx.end().await;

    // ---- Refused at deploy: INVALID_ARGUMENT, definite, naming the problem. ----
    let mut truncated = b"\0asm\x01\0\0\0".to_vec();
    truncated.extend([0x01, 0xff, 0xff, 0xff, 0x7f, 0x60]); // a type section that claims 256 MiB
    ctx.refused_deploy("invalid-bytes", truncated, &["invalid module"])
        .await;
    let no_apply = HEALTHY
        .text()
        .replace(r#"(export "wraft_apply")"#, r#"(export "wraft_apply_v2")"#);
    ctx.refused_deploy(
        "missing-export",
        wat::parse_str(&no_apply).expect("the module without wraft_apply assembles"),
        &["module exports no `wraft_apply` (expected (i32, i32) -> i64)"],
    )
    .await;
    for (tenant, imports, name) in [
        (
            "wasi-clock",
            r#"(import "wasi_snapshot_preview1" "clock_time_get" (func (param i32 i64 i32) (result i32)))"#,
            "wasi_snapshot_preview1::clock_time_get",
        ),
        (
            "wasi-random",
            r#"(import "wasi_snapshot_preview1" "random_get" (func (param i32 i32) (result i32)))"#,
            "wasi_snapshot_preview1::random_get",
        ),
        // The host's own stack counter: a module that could write it would escape the bound.
        (
            "stack-counter",
            r#"(import "wraft" "stack_units" (global (mut i32)))"#,
            "wraft::stack_units",
        ),
    ] {
        let wasm = Wat { imports, ..HEALTHY }.wasm();
        ctx.refused_deploy(
            tenant,
            wasm,
            &[&format!("deploy tenant {tenant}: module imports `{name}`")],
        )
        .await;
    }

    // ---- Misbehaving apply: a module error of the right kind, nothing changed. ----
    ctx.apply_case(
        "fuel-loop",
        Wat {
            apply: "(loop $forever (br $forever))",
            ..HEALTHY
        },
        Kind::OutOfFuel,
        &["module ran out of fuel (limit "],
    )
    .await;
    ctx.apply_case(
        "memory-bomb",
        Wat {
            apply: "(loop $grow (br_if $grow (i32.ne (memory.grow (i32.const 1)) (i32.const -1))))
                    unreachable",
            ..HEALTHY
        },
        Kind::MemoryLimit,
        &["module exceeded its memory limit of ", " bytes"],
    )
    .await;
    ctx.apply_case(
        "deep-recursion",
        Wat {
            apply: "(return (call $deep (i64.const 0)))",
            extra: "(func $deep (param $x i64) (result i64)
                      (i64.add (call $deep (i64.add (local.get $x) (i64.const 1))) (i64.const 1)))",
            ..HEALTHY
        },
        Kind::Trap,
        &["recursion too deep", "exceeded its stack limit of "],
    )
    .await;
    let giant_apply = format!(
        "(i32.store8 (i32.const 0) (i32.const 0)) (return (i64.const {}))",
        GIANT_RESULT + 1
    );
    ctx.apply_case(
        "giant-result",
        Wat {
            // 6 MiB: the whole result lies inside memory.
            pages: 96,
            apply: &giant_apply,
            ..HEALTHY
        },
        Kind::ResultTooLarge,
        &[&format!(
            "module returned {GIANT_RESULT} bytes; the limit is "
        )],
    )
    .await;
    ctx.apply_case(
        "trap-apply",
        Wat {
            apply: "unreachable",
            ..HEALTHY
        },
        Kind::Trap,
        &["module trapped", "unreachable"],
    )
    .await;
    let panic_extra = format!(
        r#"(data (i32.const 300) "\00{PANIC_MESSAGE}")
           (func (export "wraft_panic_message") (result i64) (i64.const {}))"#,
        (300u64 << 32) | (PANIC_MESSAGE.len() as u64 + 1)
    );
    ctx.apply_case(
        "guest-panic",
        Wat {
            apply: "unreachable",
            extra: &panic_extra,
            ..HEALTHY
        },
        Kind::Trap,
        &[
            "module trapped",
            "unreachable",
            &format!("guest panicked: {PANIC_MESSAGE}"),
        ],
    )
    .await;

    // ---- A trap in query, on every node: the error, then the node holds the tenant's queries
    // off for a while (a rebuild per trapping query would take the apply thread from every
    // tenant), then answers again. ----
    ctx.begin("trap-query");
    let leader = ctx.leader().await;
    ctx.deploy(
        leader,
        "trap-query",
        Wat {
            query: "unreachable",
            ..HEALTHY
        }
        .wasm(),
    )
    .await;
    let (index, _) = inc(&cluster, leader, "trap-query").await;
    for (i, &id) in ids.iter().enumerate() {
        cluster.wait_applied(id, index).await;
        // Each level traps on some node; the other level, right after, finds the pause.
        let (traps, paused) = if i % 2 == 0 {
            (Consistency::Stale, Consistency::Linearizable)
        } else {
            (Consistency::Linearizable, Consistency::Stale)
        };
        let what = format!("hostile {traps:?} query of trap-query on node {id}");
        match query_raw(&cluster, id, "trap-query", b"!", traps).await {
            QueryOutcome::ModuleError {
                kind: Kind::Trap,
                message,
                ..
            } => assert!(
                message.contains("module trapped") && message.contains("unreachable"),
                "{what}: the trap should be named: {message:?}"
            ),
            other => panic!("{what}: expected a TRAP module error, got {other}"),
        }
        let what = format!("{paused:?} query of trap-query on node {id} right after the trap");
        match query_raw(&cluster, id, "trap-query", b"n", paused).await {
            QueryOutcome::Error(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{what}: {status:?}");
                assert!(
                    status.message().contains("tenant `trap-query`")
                        && status.message().contains("paused"),
                    "{what}: the pause should be named: {status:?}"
                );
            }
            other => panic!("{what}: expected RESOURCE_EXHAUSTED (paused), got {other}"),
        }
    }
    // Commands are never paused; queries answer again once the pause (250 ms for this small
    // state) is over.
    let (index, n) = inc(&cluster, ctx.follower().await, "trap-query").await;
    assert_eq!(n, 2, "inc on trap-query after the trapped queries");
    for id in cluster.ids() {
        cluster.wait_applied(id, index).await;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let what = format!("n of trap-query on node {id} after the pause");
            match query_raw(&cluster, id, "trap-query", b"n", Consistency::Stale).await {
                QueryOutcome::Ok { output, .. } => {
                    assert_eq!(counter(&output, &what), 2, "{what}");
                    break;
                }
                QueryOutcome::Error(status)
                    if status.code() == Code::ResourceExhausted && Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                other => panic!("{what}: {other}"),
            }
        }
    }
    ctx.end().await;

    // ---- NaNs: the same canonical bytes on every replica. ----
    ctx.begin("nan");
    let follower = ctx.follower().await;
    ctx.deploy(
        follower,
        "nan",
        Wat {
            apply: NAN_APPLY,
            query: "(return (call $reply_nans))",
            extra: NAN_EXTRA,
            ..HEALTHY
        }
        .wasm(),
    )
    .await;
    let (index, applied) = match exec_applied(&cluster, follower, "nan", &nan_command()).await {
        ExecOutcome::Ok { index, output } => (index, output),
        other => panic!("NaN apply: {other}"),
    };
    assert_eq!(
        applied,
        canonical_nans(),
        "NaN results as the leader's apply returned them (canonical NaNs expected)"
    );
    for &id in &ids {
        cluster.wait_applied(id, index).await;
        match query_raw(&cluster, id, "nan", b"!", Consistency::Stale).await {
            QueryOutcome::Ok { output, .. } => assert_eq!(
                output, applied,
                "node {id}'s stored NaN results differ from the leader's apply result"
            ),
            other => panic!("stale query of the NaN results on node {id}: {other}"),
        }
    }
    ctx.end().await;

    // ---- A trap in snapshot: an upgrade needs the running version's snapshot. ----
    // The snapshot traps while n is 0 (no command yet), so compaction never meets it.
    ctx.begin("snapshot-trap-upgrade");
    let leader = ctx.leader().await;
    let snapshot_trap = Wat {
        snapshot: "(if (i64.eqz (i64.load (i32.const 16))) (then unreachable))",
        ..HEALTHY
    }
    .wasm();
    let snapshot_trap_hash = sha256_hex(&snapshot_trap);
    ctx.deploy(leader, "snapshot-trap", snapshot_trap).await;
    let via = ctx.follower().await;
    let result = cluster
        .deploy_bytes(via, "snapshot-trap", plugin_bytes("kv"))
        .await;
    expect_refusal(
        result,
        Code::FailedPrecondition,
        &[
            "upgrade tenant snapshot-trap: the running version's snapshot failed",
            "unreachable",
        ],
        &format!("upgrade of snapshot-trap (its snapshot traps) to kv through node {via}"),
    );
    let (index, n) = inc(&cluster, leader, "snapshot-trap").await;
    assert_eq!(n, 1, "inc on snapshot-trap after the failed upgrade");
    expect_version(&cluster, "snapshot-trap", index, 1, &snapshot_trap_hash).await;
    expect_n_everywhere(&cluster, "snapshot-trap", index, 1).await;
    ctx.end().await;

    // ---- A trap in restore: kv v1, then an upgrade whose restore traps. ----
    ctx.begin("restore-trap");
    let leader = ctx.leader().await;
    let kv_hash = sha256_hex(&plugin_bytes("kv"));
    ctx.deploy(leader, "restore-trap", plugin_bytes("kv")).await;
    let mut v1_keys = BTreeMap::new();
    for i in 0..5 {
        let (key, value) = (format!("k{i}"), format!("v1-{i}"));
        cluster
            .exec_ok(
                leader,
                "restore-trap",
                &json!({"op": "put", "key": key, "value": value}),
            )
            .await;
        v1_keys.insert(key, value);
    }
    let via = ctx.follower().await;
    let result = cluster
        .deploy_bytes(
            via,
            "restore-trap",
            Wat {
                restore: "unreachable",
                ..HEALTHY
            }
            .wasm(),
        )
        .await;
    expect_refusal(
        result,
        Code::FailedPrecondition,
        &[
            "upgrade tenant restore-trap: the new version's restore failed",
            "staying on the old",
            "unreachable",
        ],
        &format!(
            "upgrade of restore-trap (kv) to a module whose restore traps, through node {via}"
        ),
    );
    let (index, prev) = cluster
        .exec_ok(
            via,
            "restore-trap",
            &json!({"op": "put", "key": "k0", "value": "after"}),
        )
        .await;
    assert_eq!(
        prev,
        json!({"prev": "v1-0"}),
        "kv v1 still serves restore-trap"
    );
    v1_keys.insert("k0".into(), "after".into());
    expect_version(&cluster, "restore-trap", index, 1, &kv_hash).await;
    for &id in &ids {
        cluster.wait_applied(id, index).await;
        let got = cluster
            .query(
                id,
                "restore-trap",
                &json!({"op": "scan", "prefix": ""}),
                Consistency::Stale,
            )
            .await
            .expect_json(&format!("scan of restore-trap on node {id}"));
        let want: Vec<Value> = v1_keys.iter().map(|(k, v)| json!([k, v])).collect();
        assert_eq!(
            got,
            json!({ "items": want }),
            "restore-trap's keys on node {id}"
        );
    }
    ctx.end().await;

    // ---- A trap in a migration: the new version restores fine, then its migrate traps. ----
    ctx.begin("migrate-trap");
    let leader = ctx.leader().await;
    let healthy = HEALTHY.wasm();
    let healthy_hash = sha256_hex(&healthy);
    ctx.deploy(leader, "migrate-trap", healthy).await;
    let (_, n) = inc(&cluster, leader, "migrate-trap").await;
    assert_eq!(n, 1, "first inc on migrate-trap");
    let via = ctx.follower().await;
    let result = cluster
        .deploy_bytes(
            via,
            "migrate-trap",
            Wat {
                extra: r#"(func (export "wraft_migrate") (param i64) (result i64) unreachable)"#,
                ..HEALTHY
            }
            .wasm(),
        )
        .await;
    expect_refusal(
        result,
        Code::FailedPrecondition,
        &[
            "upgrade tenant migrate-trap: the new version's migrate failed",
            "staying on the old",
            "unreachable",
        ],
        &format!("upgrade of migrate-trap to a module whose migrate traps, through node {via}"),
    );
    let (index, n) = inc(&cluster, leader, "migrate-trap").await;
    assert_eq!(n, 2, "inc on migrate-trap after the failed migration");
    expect_version(&cluster, "migrate-trap", index, 1, &healthy_hash).await;
    expect_n_everywhere(&cluster, "migrate-trap", index, 2).await;
    ctx.end().await;

    // ---- A trap in snapshot at compaction (see the check at the end). ----
    ctx.begin("snapshot-trap-compaction");
    let compaction_bug = snapshot_trap_at_compaction(&mut ctx).await;
    ctx.end().await;

    // ---- The end: stop the writer, then check everything that was acknowledged. ----
    progress.stop.store(true, Ordering::SeqCst);
    let writer = ctx.writer.take().expect("the background writer runs");
    let report = within(RPC_TIMEOUT * 2, "the background writer to stop", writer)
        .await
        .expect("the background writer panicked");
    if let Some(fatal) = progress.fatal.lock().unwrap().clone() {
        panic!("the background writer stopped on an error: {fatal}");
    }
    eprintln!(
        "good: {} writes acknowledged, {} retried errors, slowest write {:?}",
        report.acks.len(),
        report.retried.len(),
        report.slowest
    );
    for error in &report.retried {
        eprintln!("  retried: {error}");
    }
    let leader = cluster.leader().await;
    let last = cluster
        .status(leader)
        .await
        .unwrap_or_else(|e| panic!("status of the leader: {e}"))
        .commit_index;
    let expected: BTreeMap<String, String> = report
        .acks
        .iter()
        .chain(ctx.checks.iter())
        .map(|(k, (v, _))| (k.clone(), v.clone()))
        .collect();
    assert!(
        report.acks.len() >= ACKS_PER_CASE * ctx.timings.len(),
        "only {} writes acknowledged",
        report.acks.len()
    );
    for &id in &ids {
        let status = cluster.wait_applied(id, last).await;
        let seen = scan_good(&cluster, id, Consistency::Stale).await;
        let missing: Vec<&String> = expected.keys().filter(|k| !seen.contains_key(*k)).collect();
        assert!(
            missing.is_empty(),
            "node {id} misses {} of {} acknowledged writes, e.g. {:?}",
            missing.len(),
            expected.len(),
            &missing[..missing.len().min(10)]
        );
        assert_eq!(seen, expected, "node {id}'s keys and values of {GOOD}");
        let names: BTreeSet<&str> = status.tenants.iter().map(|t| t.name.as_str()).collect();
        let want: BTreeSet<&str> = ctx.tenants.iter().map(String::as_str).collect();
        assert_eq!(
            names, want,
            "node {id}'s tenants (refused deploys: {:?})",
            ctx.refused
        );
    }
    let seen = scan_good(&cluster, leader, Consistency::Linearizable).await;
    assert_eq!(
        seen, expected,
        "linearizable scan of {GOOD} through the leader"
    );

    for tenant in ctx
        .tenants
        .iter()
        .filter(|t| *t != "snapshot-trap-compaction")
    {
        let digest = digests_agree(&cluster, tenant, last)
            .await
            .unwrap_or_else(|e| panic!("digests of {tenant} differ: {e}"));
        eprintln!(
            "digest of {tenant}: index {} state {}",
            digest.index, digest.state_hash
        );
    }
    for tenant in &ctx.refused {
        let out = cluster
            .exec(
                leader,
                tenant,
                &json!({"op": "put", "key": "k", "value": "v"}),
            )
            .await;
        assert_eq!(
            out.code(),
            Some(Code::NotFound),
            "exec on {tenant}, whose deploy was refused: {out}"
        );
    }
    for &id in &ids {
        assert!(
            cluster.is_running(id),
            "node {id} exited: {:?}",
            cluster.status(id).await
        );
    }
    eprintln!("case timings: {:?}", ctx.timings);
    eprintln!("hostile test ran for {:?}", test_started.elapsed());

    // A trap in snapshot at compaction. It runs last because it keeps the log from being
    // compacted while the tenant is armed. (It found a bug: the log used to be compacted past a
    // tenant whose checkpoint had failed, losing its ops.)
    if let Err(lost) = compaction_bug {
        panic!("a tenant whose snapshot traps at a compaction lost acknowledged ops: {lost}");
    }
}

/// A tenant whose snapshot traps while it is armed (`!a`; `!d` disarms; both count like any
/// command): armed, it goes through compactions, which checkpoint every changed tenant (hence
/// call its snapshot), then it is disarmed. Every acknowledged op must still count, on every
/// replica, and the replicas' digests must agree.
///
/// Returns `Err` with what was seen when ops were lost; everything else fails the test at once.
async fn snapshot_trap_at_compaction(ctx: &mut Ctx<'_>) -> Result<(), String> {
    const TENANT: &str = "snapshot-trap-compaction";
    let cluster = ctx.cluster;
    let leader = ctx.leader().await;
    ctx.deploy(
        leader,
        TENANT,
        Wat {
            apply: "(i32.store (i32.const 24)
                      (i32.eq (i32.load8_u offset=1 (local.get $ptr)) (i32.const 97)))",
            snapshot: "(if (i32.load (i32.const 24)) (then unreachable))",
            ..HEALTHY
        }
        .wasm(),
    )
    .await;
    assert_eq!(
        inc(cluster, leader, TENANT).await.1,
        1,
        "first inc on {TENANT}"
    );
    assert_eq!(
        inc(cluster, leader, TENANT).await.1,
        2,
        "second inc on {TENANT}"
    );
    let (armed_at, n) = match exec_applied(cluster, leader, TENANT, b"!a").await {
        ExecOutcome::Ok { index, output } => (index, counter(&output, "arm")),
        other => panic!("arming {TENANT}: {other}"),
    };
    assert_eq!(n, 3, "arming {TENANT} counts like any command");
    // Every node checkpoints every changed tenant each SNAPSHOT_ENTRIES applied entries (the
    // healthy writer keeps them coming): past this index every node has tried at least once
    // since the arming.
    let target = armed_at + 3 * SNAPSHOT_ENTRIES;
    for &id in &ctx.ids {
        let status = cluster.wait_applied(id, target).await;
        let trapped = cluster.log(id).contains("snapshot for a checkpoint failed");
        eprintln!(
            "node {id}: applied {} (armed at {armed_at}), log compacted up to {}, a failed \
             checkpoint snapshot in its log: {trapped}",
            status.applied_index, status.snapshot_index
        );
    }
    let mut seen = Vec::new();
    let disarm = match exec_applied(cluster, leader, TENANT, b"!d").await {
        ExecOutcome::Ok { output, .. } => counter(&output, "disarm"),
        other => panic!("disarming {TENANT}: {other}"),
    };
    if disarm != 4 {
        seen.push(format!(
            "disarming returned n = {disarm}, expected 4 (inc, inc, arm acknowledged n = 1, 2, 3)"
        ));
    }
    let (last, n) = inc(cluster, leader, TENANT).await;
    if n != 5 {
        seen.push(format!(
            "the inc after disarming returned n = {n}, expected 5"
        ));
    }
    for &id in &ctx.ids {
        cluster.wait_applied(id, last).await;
        match query_raw(cluster, id, TENANT, b"n", Consistency::Stale).await {
            QueryOutcome::Ok { output, .. } => {
                let n = counter(&output, "n");
                if n != 5 {
                    seen.push(format!("node {id} holds n = {n}, expected 5"));
                }
            }
            other => seen.push(format!("stale query on node {id}: {other}")),
        }
    }
    if let Err(e) = digests_agree(cluster, TENANT, last).await {
        seen.push(format!("the replicas' digests differ: {e}"));
    }
    if seen.is_empty() {
        return Ok(());
    }
    let logs: Vec<String> = ctx
        .ids
        .iter()
        .flat_map(|&id| {
            cluster
                .log(id)
                .lines()
                .filter(|l| l.contains(TENANT))
                .map(|l| format!("node {id}: {l}"))
                .collect::<Vec<_>>()
        })
        .take(12)
        .collect();
    Err(format!(
        "{} (armed at index {armed_at}); node log lines naming {TENANT}:\n{}",
        seen.join("; "),
        logs.join("\n")
    ))
}
