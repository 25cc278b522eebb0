//! Conservation of money in the bank plugin under faults: transfers through random nodes while
//! a seeded scheduler kills, pauses, isolates and slows nodes, and readers check the invariant.
//!
//! Five accounts are opened with 100 each, so the total is 500 forever after. Transfer clients
//! move random amounts between random accounts (some of them deliberately refusable: the same
//! account twice, an account that does not exist), through random nodes. Reader clients check,
//! while the faults run, that:
//! - every successful LINEARIZABLE `total` is exactly 500;
//! - every successful LINEARIZABLE `balance` is an integer between 0 and 500;
//! - every successful STALE `total` is 100 × k for some k ≤ 5 (a lagging replica shows a prefix
//!   of the log, and the only prefixes are "after k opens").
//!
//! A transfer that must be refused (`from == to`, a missing account) and comes back `ok: true`
//! is a violation as well. After healing, the replicas must converge (equal applied indexes and
//! digests) and every node must report, from its own state, a total of 500 and balances that
//! sum to 500. A minimum of successful transfers and reads keeps the test from passing vacuously.
//!
//! Each run prints its seed; `WRAFT_SEED=N` replays the same choices (not the same timing). The
//! journal of every call and fault is written under the cargo target tmp dir (path printed),
//! with the node logs next to it when the run fails.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use tokio::task::JoinSet;
use tokio::time::Instant;
use wraft_tests::api::{Consistency, QueryRequest};
use wraft_tests::cluster::{describe_statuses, exec_request, Client, ClusterOptions};
use wraft_tests::faults;
use wraft_tests::{wait_until, within, Cluster, ExecOutcome, NodeId, QueryOutcome};

const TENANT: &str = "bank";
const ACCOUNTS: usize = 5;
const OPENING_BALANCE: u64 = 100;
const TOTAL: u64 = ACCOUNTS as u64 * OPENING_BALANCE;
/// An account that is never opened: transfers naming it must be refused.
const GHOST: &str = "ghost";

const TRANSFER_CLIENTS: u64 = 4;
const READER_CLIENTS: u64 = 2;
/// How long clients run under faults.
const FAULT_PHASE: Duration = Duration::from_secs(11);
/// The gRPC deadline of one client call (`grpc-timeout`); past it the call is unknown.
const CALL_TIMEOUT: Duration = Duration::from_secs(3);
/// A backstop over the gRPC deadline, for a node that is paused and cannot even time out.
const CALL_BACKSTOP: Duration = Duration::from_secs(5);
/// Pause after a failed call, so that clients of a dead node do not spin.
const ERROR_BACKOFF: Duration = Duration::from_millis(30);
/// Upper bound on calls per client, whatever the speed of the machine.
const MAX_OPS_PER_CLIENT: u64 = 20_000;
/// How long every client task gets to notice the stop flag and return.
const JOIN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the healed cluster gets to serve a read, converge, or accept the opens.
const RECOVERY_TIMEOUT: Duration = Duration::from_secs(60);
/// Below this many acknowledged transfers the run proves nothing.
const MIN_OK_TRANSFERS: u64 = 50;
/// Below this many successful linearizable totals the invariant was hardly checked.
const MIN_OK_TOTAL_READS: u64 = 10;

fn seed() -> u64 {
    let seed = match std::env::var("WRAFT_SEED") {
        Ok(s) => s
            .parse()
            .unwrap_or_else(|e| panic!("WRAFT_SEED={s:?} is not a u64: {e}")),
        Err(_) => rand::random(),
    };
    println!("seed: {seed} (replay with WRAFT_SEED={seed})");
    seed
}

fn account(i: usize) -> String {
    format!("acct-{i}")
}

/// Every call and fault of a run, on one clock, as text lines; and the broken invariants.
struct Journal {
    start: Instant,
    /// A std mutex: held only to push, never across an await.
    lines: Mutex<Vec<String>>,
    violations: Mutex<Vec<String>>,
}

impl Journal {
    fn new() -> Journal {
        Journal {
            start: Instant::now(),
            lines: Mutex::new(Vec::new()),
            violations: Mutex::new(Vec::new()),
        }
    }

    fn stamp(&self) -> String {
        format!("{:>8.3}s", self.start.elapsed().as_secs_f64())
    }

    fn log(&self, line: impl AsRef<str>) {
        let line = format!("{} {}", self.stamp(), line.as_ref());
        self.lines.lock().unwrap().push(line);
    }

    fn fault(&self, line: impl AsRef<str>) {
        self.log(format!("FAULT {}", line.as_ref()));
    }

    fn violation(&self, line: impl AsRef<str>) {
        let line = format!("{} VIOLATION {}", self.stamp(), line.as_ref());
        self.lines.lock().unwrap().push(line.clone());
        self.violations.lock().unwrap().push(line);
    }

    fn faults(&self) -> String {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(" FAULT "))
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn violations(&self) -> Vec<String> {
        self.violations.lock().unwrap().clone()
    }

    /// Writes the journal under the cargo target tmp dir; returns the path.
    fn save(&self, seed: u64) -> PathBuf {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("bank");
        let path = dir.join(format!("seed{seed}-pid{}.log", std::process::id()));
        let text = self.lines.lock().unwrap().join("\n");
        std::fs::create_dir_all(&dir)
            .and_then(|()| std::fs::write(&path, text + "\n"))
            .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        println!("journal: {}", path.display());
        path
    }
}

/// Copies every node's log next to the journal, for a failed run.
fn save_logs(cluster: &Cluster, journal_file: &Path) {
    for id in cluster.ids() {
        let path = journal_file.with_extension(format!("node-{id}.log"));
        if std::fs::write(&path, cluster.log(id)).is_ok() {
            eprintln!("node {id} log: {}", path.display());
        }
    }
}

/// What the clients saw, summed over all of them.
#[derive(Debug, Default, Clone, Copy)]
struct Tally {
    /// Transfers applied with `ok: true`.
    transfers_ok: u64,
    /// Transfers applied with `ok: false` (refused by the module's rules).
    transfers_refused: u64,
    /// Errors marked `wraft-outcome: definite` (nothing applied).
    definite: u64,
    /// Errors marked `indeterminate`.
    indeterminate: u64,
    /// No answer in time, or an error without `wraft-outcome` (a transport failure): unknown.
    unknown: u64,
    total_reads_ok: u64,
    stale_total_reads_ok: u64,
    balance_reads_ok: u64,
    reads_failed: u64,
}

impl Tally {
    fn add(&mut self, o: &Tally) {
        self.transfers_ok += o.transfers_ok;
        self.transfers_refused += o.transfers_refused;
        self.definite += o.definite;
        self.indeterminate += o.indeterminate;
        self.unknown += o.unknown;
        self.total_reads_ok += o.total_reads_ok;
        self.stale_total_reads_ok += o.stale_total_reads_ok;
        self.balance_reads_ok += o.balance_reads_ok;
        self.reads_failed += o.reads_failed;
    }
}

/// A random transfer; `must_refuse` when the contract says it cannot succeed.
fn pick_transfer(rng: &mut StdRng) -> (String, String, u64, bool) {
    let from = rng.random_range(0..ACCOUNTS);
    let amount = rng.random_range(1..=60);
    match rng.random_range(0..20) {
        0 => (account(from), account(from), amount, true),
        1 => (account(from), GHOST.to_string(), amount, true),
        2 => (GHOST.to_string(), account(from), amount, true),
        _ => {
            let to = (from + rng.random_range(1..ACCOUNTS)) % ACCOUNTS;
            (account(from), account(to), amount, false)
        }
    }
}

/// Random transfers through random nodes until `stop`.
async fn transfer_loop(
    id: u64,
    seed: u64,
    mut nodes: Vec<(NodeId, Client)>,
    journal: Arc<Journal>,
    stop: Arc<AtomicBool>,
) -> Tally {
    let mut rng = StdRng::seed_from_u64(seed ^ (id + 1).wrapping_mul(0x2545_f491_4f6c_dd1d));
    let mut tally = Tally::default();
    for _ in 0..MAX_OPS_PER_CLIENT {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let (from, to, amount, must_refuse) = pick_transfer(&mut rng);
        let pick = rng.random_range(0..nodes.len());
        let (node, client) = &mut nodes[pick];
        let command = json!({"op": "transfer", "from": from, "to": to, "amount": amount});
        let mut request = tonic::Request::new(exec_request(
            TENANT,
            command.to_string().into_bytes(),
            "",
            0,
        ));
        request.set_timeout(CALL_TIMEOUT);
        let what = format!("client {id} node {node} {command}");
        let failed = match tokio::time::timeout(CALL_BACKSTOP, client.exec(request)).await {
            Err(_) => {
                tally.unknown += 1;
                journal.log(format!("{what} -> no answer"));
                true
            }
            Ok(result) => match ExecOutcome::from_result(result) {
                ExecOutcome::Ok { index, output } => {
                    let out: Option<bool> = serde_json::from_slice::<serde_json::Value>(&output)
                        .ok()
                        .and_then(|v| v["ok"].as_bool());
                    let text = String::from_utf8_lossy(&output);
                    journal.log(format!("{what} -> index {index} {text}"));
                    match out {
                        Some(true) if must_refuse => {
                            journal.violation(format!("{what}: a refusable transfer succeeded"));
                        }
                        Some(true) => tally.transfers_ok += 1,
                        Some(false) => tally.transfers_refused += 1,
                        None => journal.violation(format!("{what}: reply {text} has no ok")),
                    }
                    false
                }
                other @ ExecOutcome::ModuleError { .. } => {
                    journal.violation(format!("{what}: the module failed a transfer: {other}"));
                    false
                }
                other @ ExecOutcome::Definite(_) => {
                    tally.definite += 1;
                    journal.log(format!("{what} -> {other}"));
                    true
                }
                other @ ExecOutcome::Indeterminate(_) => {
                    tally.indeterminate += 1;
                    journal.log(format!("{what} -> {other}"));
                    true
                }
                other @ ExecOutcome::Unclassified(_) => {
                    tally.unknown += 1;
                    journal.log(format!("{what} -> {other}"));
                    true
                }
            },
        };
        if failed {
            tokio::time::sleep(ERROR_BACKOFF).await;
        }
    }
    tally
}

/// One query through `client`; `None` (after journaling why) unless it returned output.
async fn read(
    journal: &Journal,
    what: &str,
    client: &mut Client,
    query: &serde_json::Value,
    consistency: Consistency,
) -> Option<(u64, serde_json::Value)> {
    let mut request = tonic::Request::new(QueryRequest {
        tenant: TENANT.into(),
        query: query.to_string().into_bytes(),
        consistency: consistency as i32,
    });
    request.set_timeout(CALL_TIMEOUT);
    match tokio::time::timeout(CALL_BACKSTOP, client.query(request)).await {
        Err(_) => {
            journal.log(format!("{what} -> no answer"));
            None
        }
        Ok(result) => match QueryOutcome::from_result(result) {
            QueryOutcome::Ok { index, output } => {
                let text = String::from_utf8_lossy(&output).into_owned();
                journal.log(format!("{what} -> index {index} {text}"));
                match serde_json::from_slice(&output) {
                    Ok(value) => Some((index, value)),
                    Err(e) => {
                        journal.violation(format!("{what}: output {text:?} is not JSON: {e}"));
                        None
                    }
                }
            }
            other @ QueryOutcome::ModuleError { .. } => {
                journal.violation(format!("{what}: the module failed a valid query: {other}"));
                None
            }
            other @ QueryOutcome::Error(_) => {
                journal.log(format!("{what} -> {other}"));
                None
            }
        },
    }
}

/// Reads `total` (linearizable and stale) and balances through random nodes until `stop`,
/// checking each successful answer against the invariant.
async fn reader_loop(
    id: u64,
    seed: u64,
    mut nodes: Vec<(NodeId, Client)>,
    journal: Arc<Journal>,
    stop: Arc<AtomicBool>,
) -> Tally {
    let mut rng = StdRng::seed_from_u64(seed ^ (id + 101).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let mut tally = Tally::default();
    for _ in 0..MAX_OPS_PER_CLIENT {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let pick = rng.random_range(0..nodes.len());
        let (node, client) = &mut nodes[pick];
        let roll = rng.random_range(0..10);
        let (query, consistency) = match roll {
            0..5 => (json!({"op": "total"}), Consistency::Linearizable),
            5..8 => {
                let a = account(rng.random_range(0..ACCOUNTS));
                (
                    json!({"op": "balance", "account": a}),
                    Consistency::Linearizable,
                )
            }
            _ => (json!({"op": "total"}), Consistency::Stale),
        };
        let what = format!("reader {id} node {node} {consistency:?} {query}");
        let Some((index, out)) = read(&journal, &what, client, &query, consistency).await else {
            tally.reads_failed += 1;
            tokio::time::sleep(ERROR_BACKOFF).await;
            continue;
        };
        match roll {
            0..5 => {
                tally.total_reads_ok += 1;
                if out["total"].as_u64() != Some(TOTAL) {
                    journal.violation(format!(
                        "{what}: linearizable total at index {index} is {out}, expected {TOTAL}"
                    ));
                }
            }
            5..8 => {
                tally.balance_reads_ok += 1;
                match out["balance"].as_u64() {
                    Some(b) if b <= TOTAL => {}
                    _ => journal.violation(format!(
                        "{what}: balance at index {index} is {out}, expected 0..={TOTAL}"
                    )),
                }
            }
            _ => {
                tally.stale_total_reads_ok += 1;
                match out["total"].as_u64() {
                    Some(t) if t <= TOTAL && t % OPENING_BALANCE == 0 => {}
                    _ => journal.violation(format!(
                        "{what}: stale total at index {index} is {out}, which no prefix of the \
                         log can give (multiples of {OPENING_BALANCE} up to {TOTAL})"
                    )),
                }
            }
        }
    }
    tally
}

/// Opens every account with [`OPENING_BALANCE`], retrying any error: a retried open that was
/// applied before only answers `ok: false`, so a retry can never add money.
async fn open_accounts(cluster: &Cluster, via: NodeId) {
    for i in 0..ACCOUNTS {
        let command = json!({"op": "open", "account": account(i), "balance": OPENING_BALANCE});
        let command = &command;
        wait_until(
            RECOVERY_TIMEOUT,
            &format!("{command} through node {via}"),
            move || async move {
                match cluster.exec(via, TENANT, command).await {
                    ExecOutcome::Ok { output, .. } => {
                        let out = wraft_tests::json(&output);
                        assert!(out["ok"].is_boolean(), "open replied {out}");
                        Ok(())
                    }
                    other @ ExecOutcome::ModuleError { .. } => panic!("{command}: {other}"),
                    other => Err(other.to_string()),
                }
            },
        )
        .await;
    }
}

/// A read that must succeed on the healed cluster (retried until [`RECOVERY_TIMEOUT`]).
async fn read_until_ok(
    cluster: &Cluster,
    via: NodeId,
    query: serde_json::Value,
    consistency: Consistency,
) -> serde_json::Value {
    let query = &query;
    wait_until(
        RECOVERY_TIMEOUT,
        &format!("{query} ({consistency:?}) through node {via}"),
        move || async move { cluster.query(via, TENANT, query, consistency).await.json() },
    )
    .await
}

/// Waits until every node reports the same applied index, equal to its commit index.
async fn wait_applied_indexes_equal(cluster: &Cluster) -> u64 {
    wait_until(
        RECOVERY_TIMEOUT,
        "every node to apply the same index, its commit index",
        move || async move {
            let mut statuses = Vec::new();
            for id in cluster.ids() {
                statuses.push(cluster.status(id).await?);
            }
            let applied = statuses[0].applied_index;
            let settled = statuses
                .iter()
                .all(|s| s.applied_index == applied && s.commit_index == applied);
            if settled {
                Ok(applied)
            } else {
                Err(describe_statuses(&statuses))
            }
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn money_is_conserved_under_faults() {
    let started = Instant::now();
    let seed = seed();
    let cluster = Cluster::start_with(
        3,
        ClusterOptions {
            proxies: true,
            seed,
            ..Default::default()
        },
    )
    .await;
    let leader = cluster.leader().await;
    cluster.deploy(leader, TENANT, "bank").await;
    open_accounts(&cluster, leader).await;
    let opened = read_until_ok(
        &cluster,
        leader,
        json!({"op": "total"}),
        Consistency::Linearizable,
    )
    .await;
    assert_eq!(opened, json!({ "total": TOTAL }), "after the opens");

    let ids = cluster.ids();
    let nodes: Vec<(NodeId, Client)> = ids.iter().map(|&id| (id, cluster.client(id))).collect();
    let journal = Arc::new(Journal::new());
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = JoinSet::new();
    for c in 0..TRANSFER_CLIENTS {
        let (nodes, journal, stop) = (nodes.clone(), journal.clone(), stop.clone());
        clients.spawn(transfer_loop(c, seed, nodes, journal, stop));
    }
    for r in 0..READER_CLIENTS {
        let (nodes, journal, stop) = (nodes.clone(), journal.clone(), stop.clone());
        clients.spawn(reader_loop(r, seed, nodes, journal, stop));
    }

    let injected = faults::run(&cluster, seed, FAULT_PHASE, 2, |event| journal.fault(event)).await;
    cluster.net().heal_all();
    for &id in &ids {
        if cluster.is_paused(id) {
            cluster.resume(id);
        }
        assert!(
            cluster.is_running(id),
            "seed {seed}: node {id} exited on its own during the fault phase"
        );
    }
    journal.fault("healed everything");
    stop.store(true, Ordering::SeqCst);
    let tally = within(JOIN_TIMEOUT, "bank clients to stop", async {
        let mut tally = Tally::default();
        while let Some(done) = clients.join_next().await {
            tally.add(&done.expect("a bank client panicked"));
        }
        tally
    })
    .await;

    // Recovery: one leader, a linearizable total through it, then every replica settles on the
    // same applied index and the same state, and each one's own state conserves the money.
    let leader = cluster.leader().await;
    let total = read_until_ok(
        &cluster,
        leader,
        json!({"op": "total"}),
        Consistency::Linearizable,
    )
    .await;
    journal.log(format!(
        "final linearizable total via leader {leader}: {total}"
    ));
    let applied = wait_applied_indexes_equal(&cluster).await;
    let digest = cluster.wait_digests_agree(&ids, TENANT, 0).await;
    let mut finals = Vec::new();
    for &id in &ids {
        let total = read_until_ok(&cluster, id, json!({"op": "total"}), Consistency::Stale).await;
        let mut balances = Vec::new();
        for i in 0..ACCOUNTS {
            let query = json!({"op": "balance", "account": account(i)});
            let out = read_until_ok(&cluster, id, query, Consistency::Stale).await;
            balances.push(out["balance"].as_u64().unwrap_or_else(|| {
                panic!("seed {seed}: node {id}: balance of {} is {out}", account(i))
            }));
        }
        journal.log(format!("final node {id}: {total}, balances {balances:?}"));
        finals.push((id, total, balances));
    }

    let path = journal.save(seed);
    println!(
        "summary: {} transfers ok, {} refused, {} definite, {} indeterminate, {} unknown; \
         reads: {} linearizable totals, {} stale totals, {} balances ok, {} failed; \
         {injected} faults; replicas agree at applied index {applied} (tenant index {}, \
         state {}); {:.1}s",
        tally.transfers_ok,
        tally.transfers_refused,
        tally.definite,
        tally.indeterminate,
        tally.unknown,
        tally.total_reads_ok,
        tally.stale_total_reads_ok,
        tally.balance_reads_ok,
        tally.reads_failed,
        digest.index,
        digest.state_hash,
        started.elapsed().as_secs_f64()
    );
    println!("fault schedule:\n{}", journal.faults());

    let mut broken = journal.violations();
    if total != json!({ "total": TOTAL }) {
        broken.push(format!("final linearizable total is {total}"));
    }
    for (id, total, balances) in &finals {
        if *total != json!({ "total": TOTAL }) {
            broken.push(format!("node {id}: final total is {total}"));
        }
        let sum: u64 = balances.iter().sum();
        if sum != TOTAL {
            broken.push(format!(
                "node {id}: final balances {balances:?} sum to {sum}"
            ));
        }
    }
    if !broken.is_empty() {
        save_logs(&cluster, &path);
        const SHOWN: usize = 20;
        panic!(
            "seed {seed}: money was not conserved ({} violations, the first {} here):\n{}\n\
             fault schedule:\n{}\njournal: {}",
            broken.len(),
            broken.len().min(SHOWN),
            broken[..broken.len().min(SHOWN)].join("\n"),
            journal.faults(),
            path.display()
        );
    }
    // A run in which (almost) nothing succeeded proves nothing.
    assert!(
        tally.transfers_ok >= MIN_OK_TRANSFERS,
        "seed {seed}: only {} transfers succeeded; the workload did not exercise the cluster",
        tally.transfers_ok
    );
    assert!(
        tally.total_reads_ok >= MIN_OK_TOTAL_READS,
        "seed {seed}: only {} linearizable totals succeeded; the invariant was hardly checked",
        tally.total_reads_ok
    );
}
