//! Linearizability of the kv plugin's registers under faults, checked from client histories.
//!
//! Clients run `put` / `get` (LINEARIZABLE) / `cas` on a few hot keys through random nodes (every
//! other client on `Pipeline` streams, the rest with unary calls) while
//! a seeded scheduler injects faults: SIGKILL and restart, SIGSTOP/SIGCONT, cut and blackholed
//! peer links (proxies on every directed link), delays, flaky links. Every call is recorded with
//! its outcome (ok / fail when `wraft-outcome: definite` / unknown otherwise) and the history is
//! checked by `wraft_tests::linearizability`. The second test proves the checker is not blind: a
//! node deliberately serving linearizable reads from its own state behind a partition must be
//! caught.
//!
//! Each run prints its seed; `WRAFT_SEED=N` replays the same choices (the cluster's timing is
//! not replayable, so a replay explores the same faults, not the same interleaving). Histories
//! are written under the cargo target tmp dir, path printed, with node logs on failure.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use tokio::task::JoinSet;
use wraft_tests::api::{Consistency, QueryRequest};
use wraft_tests::cluster::{Client, ClusterOptions};
use wraft_tests::history::History;
use wraft_tests::linearizability::{check, CheckError, Op, Outcome, Ret};
use wraft_tests::pipeline::PipelineCaller;
use wraft_tests::{faults, register};
use wraft_tests::{wait_until, within, Cluster, NodeId, QueryOutcome};

const TENANT: &str = "kv";
const HOT_KEYS: [&str; 3] = ["x", "y", "z"];
/// The node's own switch for the deliberately broken read path.
const STALE_READS_ENV: &str = "WRAFT_TEST_STALE_LINEARIZABLE_READS";

/// The gRPC deadline of one client call (`grpc-timeout`); past it the call is unknown.
const CALL_TIMEOUT: Duration = Duration::from_secs(4);
/// A backstop over the gRPC deadline: a call still open then is recorded as unknown.
const CALL_BACKSTOP: Duration = Duration::from_secs(15);
/// Pause after a failed call, so that clients of a dead node do not spin.
const ERROR_BACKOFF: Duration = Duration::from_millis(30);
/// How long clients run under faults in the main test.
const FAULT_PHASE: Duration = Duration::from_secs(16);

/// How long faults are injected: [`FAULT_PHASE`] in CI, longer for a soak (`WRAFT_FAULT_SECS`).
fn fault_phase() -> Duration {
    std::env::var("WRAFT_FAULT_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .map(Duration::from_secs)
        .unwrap_or(FAULT_PHASE)
}
/// Upper bound on operations per client, whatever the speed of the machine.
const MAX_OPS_PER_CLIENT: u64 = 20_000;
/// How long every background task gets to notice the stop flag and return.
const JOIN_TIMEOUT: Duration = Duration::from_secs(60);
/// Process ids of the harness's own (not the workload's) calls start here.
const PROBE_PROCESS: u64 = 1_000_000_000;

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

/// Where a test's history goes.
fn history_path(test: &str, seed: u64) -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join("linearizability")
        .join(format!("{test}-seed{seed}-pid{}.jsonl", std::process::id()))
}

/// Writes the history (always) and returns its path.
fn save(history: &History, test: &str, seed: u64) -> PathBuf {
    let path = history_path(test, seed);
    history
        .write(&path, json!({"test": test, "seed": seed}))
        .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    println!("history: {}", path.display());
    path
}

/// Copies every node's log next to the history, for a failed run.
fn save_logs(cluster: &Cluster, history_file: &std::path::Path) {
    for id in cluster.ids() {
        let path = history_file.with_extension(format!("node-{id}.log"));
        if std::fs::write(&path, cluster.log(id)).is_ok() {
            eprintln!("node {id} log: {}", path.display());
        }
    }
}

/// Runs one `Exec` of a kv command and records it. Returns the outcome and the applied index.
async fn exec_recorded(
    history: &History,
    process: u64,
    caller: &mut Caller,
    node: NodeId,
    key: &str,
    op: Op,
) -> (Outcome, Option<u64>) {
    let deadlines = register::Deadlines {
        timeout: CALL_TIMEOUT,
        backstop: CALL_BACKSTOP,
    };
    let via = match caller {
        Caller::Unary(client) => register::Via::Unary(client),
        Caller::Pipeline(pipe) => register::Via::Pipeline(pipe),
    };
    register::write(history, process, via, node, TENANT, key, op, deadlines)
        .await
        .unwrap_or_else(|broken| panic!("{broken}"))
}

/// Runs one LINEARIZABLE `get` and records it (any error: a read that did nothing, a fail).
async fn get_recorded(
    history: &History,
    process: u64,
    caller: &mut Caller,
    node: NodeId,
    key: &str,
) -> Outcome {
    let query = QueryRequest {
        tenant: TENANT.into(),
        query: json!({"op": "get", "key": key}).to_string().into_bytes(),
        consistency: Consistency::Linearizable as i32,
    };
    let inv = history.invoke(process, key, Op::Get);
    let result = match caller {
        Caller::Unary(client) => {
            let mut request = tonic::Request::new(query);
            request.set_timeout(CALL_TIMEOUT);
            tokio::time::timeout(CALL_BACKSTOP, client.query(request)).await
        }
        Caller::Pipeline(pipe) => Ok(pipe.query(query, CALL_BACKSTOP).await),
    };
    let (outcome, note) = match result {
        Err(_) => (Outcome::Fail, format!("node {node}: no answer")),
        Ok(result) => match QueryOutcome::from_result(result) {
            QueryOutcome::Ok { index, output } => {
                let out = wraft_tests::json(&output);
                let value = out["value"].as_str().map(String::from);
                (
                    Outcome::Ok(Ret::Get { value }),
                    format!("node {node} index {index}"),
                )
            }
            other => (Outcome::Fail, format!("node {node}: {other}")),
        },
    };
    history.complete(inv, outcome.clone(), note);
    outcome
}

/// How a workload client reaches a node: unary calls, or calls on a `Pipeline` stream (each
/// answered as its unary call would be, so both are recorded alike).
enum Caller {
    Unary(Client),
    Pipeline(Box<PipelineCaller>),
}

/// Which nodes a workload client may use for which calls.
#[derive(Clone)]
struct Targets {
    writes: Vec<(NodeId, Client)>,
    reads: Vec<(NodeId, Client)>,
}

/// A workload client: random put / get / cas on the hot keys until `stop`. Written values are
/// unique (`c{client}-{n}`), which the checker's pruning of unknown writes relies on.
async fn client_loop(
    id: u64,
    seed: u64,
    targets: Targets,
    history: Arc<History>,
    stop: Arc<AtomicBool>,
) -> u64 {
    let mut rng = StdRng::seed_from_u64(seed ^ (id + 1).wrapping_mul(0x2545_f491_4f6c_dd1d));
    // Every other client speaks through `Pipeline` streams (one per node), the rest unary.
    let callers = |targets: Vec<(NodeId, Client)>| -> Vec<(NodeId, Caller)> {
        targets
            .into_iter()
            .map(|(node, client)| match id % 2 {
                1 => (
                    node,
                    Caller::Pipeline(Box::new(PipelineCaller::new(client))),
                ),
                _ => (node, Caller::Unary(client)),
            })
            .collect()
    };
    let mut writes = callers(targets.writes);
    let mut reads = callers(targets.reads);
    // A process that saw an unknown outcome is retired (Jepsen style): the next calls are a new
    // process, since the old one's call may still be in flight.
    let mut generation = 0u64;
    let mut last_seen: [Option<String>; HOT_KEYS.len()] = Default::default();
    let mut n = 0u64;
    while !stop.load(Ordering::SeqCst) && n < MAX_OPS_PER_CLIENT {
        n += 1;
        let process = id * 10_000 + generation;
        let k = rng.random_range(0..HOT_KEYS.len());
        let key = HOT_KEYS[k];
        let value = format!("c{id}-{n}");
        let roll = rng.random_range(0..10);
        let outcome = if roll < 4 {
            let i = rng.random_range(0..reads.len());
            let (node, caller) = &mut reads[i];
            get_recorded(&history, process, caller, *node, key).await
        } else {
            let op = if roll < 7 {
                Op::Put { value }
            } else {
                // Mostly the value last seen (a likely success), sometimes absent.
                let expect = if rng.random_bool(0.8) {
                    last_seen[k].clone()
                } else {
                    None
                };
                Op::Cas { expect, value }
            };
            let i = rng.random_range(0..writes.len());
            let (node, caller) = &mut writes[i];
            exec_recorded(&history, process, caller, *node, key, op)
                .await
                .0
        };
        match outcome {
            Outcome::Ok(Ret::Get { value }) => last_seen[k] = value,
            Outcome::Ok(Ret::Cas { current, .. }) => last_seen[k] = current,
            Outcome::Ok(Ret::Put { .. }) => {}
            Outcome::Unknown => {
                generation += 1;
                tokio::time::sleep(ERROR_BACKOFF).await;
            }
            Outcome::Fail => tokio::time::sleep(ERROR_BACKOFF).await,
        }
    }
    n
}

/// Waits until a LINEARIZABLE read of `key` through `node` succeeds, recording every attempt.
async fn final_read(history: &History, cluster: &Cluster, process: u64, node: NodeId, key: &str) {
    let client = cluster.client(node);
    wait_until(
        Duration::from_secs(60),
        &format!("a linearizable read of {key} through node {node} after healing"),
        || {
            let mut caller = Caller::Unary(client.clone());
            async move {
                match get_recorded(history, process, &mut caller, node, key).await {
                    Outcome::Ok(_) => Ok(()),
                    other => Err(format!("{other:?}")),
                }
            }
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn register_linearizable_under_faults() {
    const TEST: &str = "register_linearizable_under_faults";
    const CLIENTS: u64 = 5;
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
    cluster.deploy(leader, TENANT, "kv").await;
    let ids = cluster.ids();
    let history = Arc::new(History::new());
    let stop = Arc::new(AtomicBool::new(false));

    let all: Vec<(NodeId, Client)> = ids.iter().map(|&id| (id, cluster.client(id))).collect();
    let mut clients = JoinSet::new();
    for c in 0..CLIENTS {
        let targets = Targets {
            writes: all.clone(),
            reads: all.clone(),
        };
        clients.spawn(client_loop(c, seed, targets, history.clone(), stop.clone()));
    }

    let injected = faults::run(&cluster, seed, fault_phase(), 1, |event| {
        history.fault(event)
    })
    .await;
    cluster.net().heal_all();
    for id in cluster.ids() {
        if cluster.is_paused(id) {
            cluster.resume(id);
        }
    }
    history.fault("healed everything");
    stop.store(true, Ordering::SeqCst);
    let ops = within(JOIN_TIMEOUT, "workload clients to stop", async {
        let mut ops = 0;
        while let Some(done) = clients.join_next().await {
            ops += done.expect("a workload client panicked");
        }
        ops
    })
    .await;

    // Recovery: one leader, every node answers a linearizable read of every key (these reads
    // join the history: they pin down what the unknown writes did), replicas agree.
    let leader = cluster.leader().await;
    for (i, &id) in ids.iter().enumerate() {
        for key in HOT_KEYS {
            final_read(&history, &cluster, PROBE_PROCESS + i as u64, id, key).await;
        }
    }
    let max_index = cluster
        .status(leader)
        .await
        .expect("leader status")
        .applied_index;
    for &id in &ids {
        cluster.wait_applied(id, max_index).await;
    }
    let digest = cluster.wait_digests_agree(&ids, TENANT, 0).await;

    let counts = history.counts();
    let path = save(&history, TEST, seed);
    println!(
        "summary: {ops} workload ops, {injected} faults injected, ok {} / fail {} / unknown {}; \
         replicas agree at tenant index {} (state {})",
        counts.ok, counts.fail, counts.unknown, digest.index, digest.state_hash
    );
    println!("fault schedule:\n{}", history.fault_schedule());
    // A run in which (almost) nothing succeeded proves nothing, for either kind of client.
    assert!(
        counts.ok >= 100,
        "only {} operations succeeded (seed {seed}); the workload did not exercise the cluster",
        counts.ok
    );
    let pipelined_ok = history
        .operations()
        .iter()
        .filter(|o| (o.process / 10_000) % 2 == 1 && matches!(o.outcome, Outcome::Ok(_)))
        .count();
    println!("of them through Pipeline streams: {pipelined_ok}");
    assert!(
        pipelined_ok >= 50,
        "only {pipelined_ok} operations succeeded through Pipeline streams (seed {seed})"
    );
    // Raft's own invariants, from every role change the nodes logged during the run.
    let logs: Vec<(u64, String)> = ids.iter().map(|&id| (id, cluster.log(id))).collect();
    match wraft_tests::invariants::check(&logs) {
        Ok(raft) => println!(
            "raft invariants hold: {} role changes, {} terms with a leader",
            raft.role_changes, raft.terms_with_a_leader
        ),
        Err(e) => {
            save_logs(&cluster, &path);
            panic!(
                "seed {seed}: raft invariant broken: {e}\nfault schedule:\n{}",
                history.fault_schedule()
            );
        }
    }
    match check(&history.operations()) {
        Ok(stats) => println!("linearizable: {stats:?}"),
        Err(e) => {
            save_logs(&cluster, &path);
            panic!(
                "seed {seed}: {e}\nfault schedule:\n{}\nhistory: {}",
                history.fault_schedule(),
                path.display()
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn checker_catches_stale_reads() {
    const TEST: &str = "checker_catches_stale_reads";
    let seed = seed();
    let cluster = Cluster::start_with(
        3,
        ClusterOptions {
            proxies: true,
            seed,
            env: vec![(STALE_READS_ENV.into(), "1".into())],
            ..Default::default()
        },
    )
    .await;
    let leader = cluster.leader().await;
    cluster.deploy(leader, TENANT, "kv").await;
    let ids = cluster.ids();
    let mut rng = StdRng::seed_from_u64(seed);
    let followers: Vec<NodeId> = ids.iter().copied().filter(|&id| id != leader).collect();
    let victim = followers[rng.random_range(0..followers.len())];
    let majority: Vec<NodeId> = ids.iter().copied().filter(|&id| id != victim).collect();
    let history = Arc::new(History::new());
    let process = PROBE_PROCESS;

    // 1. An acknowledged write that the victim has applied.
    let writer = cluster.client(leader);
    // The probe key must have exactly one write before the partition, and that one
    // acknowledged: an attempt with an unknown outcome could take effect later (and then explain
    // a stale read), so after one the probe moves to a fresh key.
    let mut probe_key = String::new();
    let mut first = None;
    for attempt in 0..100 {
        probe_key = format!("probe{attempt}");
        let op = Op::Put { value: "p0".into() };
        match exec_recorded(
            &history,
            process,
            &mut Caller::Unary(writer.clone()),
            leader,
            &probe_key,
            op,
        )
        .await
        {
            (Outcome::Ok(_), Some(index)) => {
                first = Some(index);
                break;
            }
            _ => tokio::time::sleep(ERROR_BACKOFF).await,
        }
    }
    let first = first.expect("no put acknowledged in 100 attempts on a healthy cluster");
    let probe_key = probe_key.as_str();
    cluster.wait_applied(victim, first).await;

    // 2. The victim is cut off from both other nodes, both directions.
    history.fault(format!("isolate node {victim}"));
    cluster.net().isolate(victim);

    // Background load: writes through the majority, reads through the victim.
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = JoinSet::new();
    for c in 0..3u64 {
        let targets = Targets {
            writes: majority
                .iter()
                .map(|&id| (id, cluster.client(id)))
                .collect(),
            reads: vec![(victim, cluster.client(victim))],
        };
        clients.spawn(client_loop(c, seed, targets, history.clone(), stop.clone()));
    }

    // 3. A newer value acknowledged through the majority, then read through the victim: the
    // victim cannot have it (it was isolated before the write was sent), so its answer is stale
    // and the history cannot be linearizable.
    let majority_client = cluster.client(majority[0]);
    put_until_ok(
        &history,
        process,
        &majority_client,
        majority[0],
        probe_key,
        "p1",
    )
    .await;
    let reader = cluster.client(victim);
    let stale = wait_until(
        Duration::from_secs(60),
        &format!("a read of {probe_key} through isolated node {victim}"),
        || {
            let mut reader = Caller::Unary(reader.clone());
            let history = &history;
            async move {
                match get_recorded(history, process, &mut reader, victim, probe_key).await {
                    Outcome::Ok(Ret::Get { value }) => Ok(value),
                    other => Err(format!("{other:?}")),
                }
            }
        },
    )
    .await;
    assert_eq!(
        stale.as_deref(),
        Some("p0"),
        "the isolated node in stale-read mode should answer from its own state"
    );

    // Some more background traffic through the partition, then heal.
    let background_ops = Arc::new(AtomicU64::new(0));
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::SeqCst);
    within(JOIN_TIMEOUT, "workload clients to stop", async {
        while let Some(done) = clients.join_next().await {
            background_ops.fetch_add(done.expect("a workload client panicked"), Ordering::SeqCst);
        }
    })
    .await;
    cluster.net().heal_all();
    history.fault("healed");

    let counts = history.counts();
    let path = save(&history, TEST, seed);
    println!(
        "summary: {} background ops, 1 fault (isolate node {victim}), ok {} / fail {} / unknown {}",
        background_ops.load(Ordering::SeqCst),
        counts.ok,
        counts.fail,
        counts.unknown
    );
    let ops = history.operations();
    match check(&ops) {
        Err(CheckError::Violation { key, explanation }) => {
            println!("caught, as it must be: key {key}: {explanation}")
        }
        other => panic!(
            "seed {seed}: the checker missed stale reads: {other:?}\nhistory: {}",
            path.display()
        ),
    }
    // The probe key alone, whose staleness is certain, must be caught too.
    let probe: Vec<_> = ops.into_iter().filter(|o| o.key == probe_key).collect();
    assert!(
        matches!(check(&probe), Err(CheckError::Violation { .. })),
        "seed {seed}: the checker missed the certain stale read of {probe_key}"
    );
}

/// Puts `value` (with a suffix per attempt, keeping values unique) until one attempt is
/// acknowledged; returns its index. Every attempt is recorded.
async fn put_until_ok(
    history: &History,
    process: u64,
    client: &Client,
    node: NodeId,
    key: &str,
    value: &str,
) -> u64 {
    let attempt = AtomicU64::new(0);
    wait_until(
        Duration::from_secs(60),
        &format!("an acknowledged put of {key} through node {node}"),
        || {
            let n = attempt.fetch_add(1, Ordering::SeqCst);
            let value = if n == 0 {
                value.to_string()
            } else {
                format!("{value}-retry{n}")
            };
            let mut client = Caller::Unary(client.clone());
            async move {
                let op = Op::Put { value };
                match exec_recorded(history, process + n, &mut client, node, key, op).await {
                    (Outcome::Ok(_), Some(index)) => Ok(index),
                    other => Err(format!("{other:?}")),
                }
            }
        },
    )
    .await
}
