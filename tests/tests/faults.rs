//! Crashes (SIGKILL) and restarts: the leader dies under load, the whole cluster dies, and a
//! node is pointed at a data directory that is not its own. And membership changes mixed into
//! the seeded fault schedule ([`membership_faults`]): nodes join, leave, rejoin under new ids
//! and the leader is removed while linearizable registers, a bank and acknowledged writes are
//! checked.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::task::JoinSet;
use wraft_tests::api::Consistency;
use wraft_tests::cluster::exec_request;
use wraft_tests::{json, wait_until, within, Cluster, ExecOutcome, NodeId};

/// The longest one client call may take, even while the leader is dying.
const CALL_DEADLINE: Duration = Duration::from_secs(30);
/// Pause after an error before the next call, so that clients of a dead node do not spin.
const ERROR_BACKOFF: Duration = Duration::from_millis(50);

/// What one client task saw.
#[derive(Default, Debug)]
struct Tally {
    acked: u64,
    acked_calls: u64,
    definite: u64,
    /// Sum of the adds whose outcome is unknown (indeterminate, or the node died mid-call).
    unknown: u64,
    indeterminate: u64,
    transport_failures: u64,
    /// Broken promises: a hang, an error without `wraft-outcome` from a live node, a module error.
    violations: Vec<String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leader_crash_with_proposals_in_flight() {
    let cluster = Cluster::start(3).await;
    let old_leader = cluster.leader().await;
    cluster.deploy(old_leader, "counter", "counter").await;
    let ids = cluster.ids();

    let stop = Arc::new(AtomicBool::new(false));
    let victim = Arc::new(AtomicU64::new(0));
    let acks = Arc::new(AtomicU64::new(0));
    let acks_after_kill = Arc::new(AtomicU64::new(0));
    let mut tasks = JoinSet::new();
    for t in 0..6usize {
        let node: NodeId = ids[t % ids.len()];
        let mut client = cluster.client(node);
        let (stop, victim, acks, acks_after_kill) = (
            stop.clone(),
            victim.clone(),
            acks.clone(),
            acks_after_kill.clone(),
        );
        tasks.spawn(async move {
            let mut tally = Tally::default();
            let mut j = 0u64;
            while !stop.load(Ordering::SeqCst) {
                j += 1;
                let n = (t as u64 + j) % 5 + 1;
                let sent_after_kill = victim.load(Ordering::SeqCst) != 0;
                let request = exec_request("counter", json!({"op": "add", "n": n}).to_string().into_bytes(), "", 0);
                let result = match tokio::time::timeout(CALL_DEADLINE, client.exec(request)).await {
                    Ok(result) => result,
                    Err(_) => {
                        tally.violations.push(format!("task {t}: add {n} through node {node} hung for {CALL_DEADLINE:?}"));
                        break;
                    }
                };
                match ExecOutcome::from_result(result) {
                    ExecOutcome::Ok { .. } => {
                        tally.acked += n;
                        tally.acked_calls += 1;
                        acks.fetch_add(1, Ordering::SeqCst);
                        if sent_after_kill {
                            acks_after_kill.fetch_add(1, Ordering::SeqCst);
                        }
                        continue;
                    }
                    ExecOutcome::Definite(_) => tally.definite += 1,
                    ExecOutcome::Indeterminate(_) => {
                        tally.unknown += n;
                        tally.indeterminate += 1;
                    }
                    // A transport failure: expected only from the node that was killed.
                    // A transport failure: expected only from the node that was killed. The
                    // call in flight when it died may have been applied; the node is gone, so
                    // this client stops (later calls could not reach it, and would only widen
                    // the bound below).
                    ExecOutcome::Unclassified(s) => {
                        tally.unknown += n;
                        tally.transport_failures += 1;
                        if victim.load(Ordering::SeqCst) == node {
                            break;
                        }
                        tally.violations.push(format!(
                            "task {t}: add {n} through live node {node}: error without wraft-outcome: {:?} {}",
                            s.code(),
                            s.message()
                        ));
                    }
                    other => tally.violations.push(format!("task {t}: add {n} through node {node}: {other}")),
                }
                tokio::time::sleep(ERROR_BACKOFF).await;
            }
            tally
        });
    }

    {
        let acks = acks.clone();
        wait_until(
            Duration::from_secs(60),
            "20 adds acknowledged before the crash",
            move || {
                let acks = acks.clone();
                async move {
                    let n = acks.load(Ordering::SeqCst);
                    if n >= 20 {
                        Ok(())
                    } else {
                        Err(format!("{n} acknowledged"))
                    }
                }
            },
        )
        .await;
    }
    victim.store(old_leader, Ordering::SeqCst);
    cluster.kill(old_leader).await;
    eprintln!(
        "killed leader {old_leader} after {} acknowledged adds",
        acks.load(Ordering::SeqCst)
    );

    let new_leader = cluster.leader().await;
    assert_ne!(new_leader, old_leader, "the killed node cannot lead");
    {
        let acks_after_kill = acks_after_kill.clone();
        wait_until(
            Duration::from_secs(60),
            "20 adds acknowledged after the crash",
            move || {
                let acks_after_kill = acks_after_kill.clone();
                async move {
                    let n = acks_after_kill.load(Ordering::SeqCst);
                    if n >= 20 {
                        Ok(())
                    } else {
                        Err(format!("{n} acknowledged since the crash"))
                    }
                }
            },
        )
        .await;
    }
    stop.store(true, Ordering::SeqCst);
    let mut total = Tally::default();
    within(
        CALL_DEADLINE + Duration::from_secs(10),
        "the client tasks to finish",
        async {
            while let Some(result) = tasks.join_next().await {
                let tally = result.expect("a client task failed");
                total.acked += tally.acked;
                total.acked_calls += tally.acked_calls;
                total.definite += tally.definite;
                total.unknown += tally.unknown;
                total.indeterminate += tally.indeterminate;
                total.transport_failures += tally.transport_failures;
                total.violations.extend(tally.violations);
            }
        },
    )
    .await;
    eprintln!("clients: {total:?}");
    assert!(
        total.violations.is_empty(),
        "broken promises: {:#?}",
        total.violations
    );

    // A write through the new leader, in a session so that retrying an unknown outcome is safe.
    let after = json!({"op": "add", "n": 1000});
    let (c, after) = (&cluster, &after);
    let (after_index, after_value) = wait_until(
        Duration::from_secs(30),
        "a session write through the new leader",
        move || async move {
            match c
                .exec_session(new_leader, "counter", after, "after-crash", 1)
                .await
            {
                ExecOutcome::Ok { index, output } => Ok((
                    index,
                    json(&output)["value"].as_u64().expect("a counter value"),
                )),
                other => Err(other.to_string()),
            }
        },
    )
    .await;

    let lo = total.acked + 1000;
    let hi = total.acked + total.unknown + 1000;
    assert!(
        (lo..=hi).contains(&after_value),
        "counter {after_value} outside [acked {lo}, acked + unknown {hi}]: {total:?}"
    );
    let got = cluster
        .query(
            new_leader,
            "counter",
            &json!({"op": "get"}),
            Consistency::Linearizable,
        )
        .await
        .expect_json("linearizable get after the crash");
    assert_eq!(
        got,
        json!({"value": after_value}),
        "the counter moved after every client stopped"
    );

    cluster.restart(old_leader);
    cluster.wait_applied(old_leader, after_index).await;
    let got = cluster
        .query(
            old_leader,
            "counter",
            &json!({"op": "get"}),
            Consistency::Stale,
        )
        .await
        .expect_json("stale get on the restarted node");
    assert_eq!(
        got,
        json!({"value": after_value}),
        "restarted node {old_leader}'s counter"
    );
    cluster
        .wait_digests_agree(&ids, "counter", after_index)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn whole_cluster_restart_keeps_acknowledged_writes() {
    const KEYS: usize = 30;
    const ADDS: u64 = 20;
    let cluster = Cluster::start(3).await;
    let leader = cluster.leader().await;
    let ids = cluster.ids();
    cluster.deploy(leader, "kv", "kv").await;
    cluster.deploy(leader, "counter", "counter").await;

    let mut last_index = 0;
    for i in 0..KEYS {
        let via = ids[i % ids.len()];
        let (index, _) = cluster
            .exec_ok(
                via,
                "kv",
                &json!({"op": "put", "key": format!("key-{i:02}"), "value": format!("value-{i}")}),
            )
            .await;
        last_index = last_index.max(index);
    }
    for i in 0..ADDS {
        let via = ids[i as usize % ids.len()];
        let (index, out) = cluster
            .exec_ok(via, "counter", &json!({"op": "add", "n": 1}))
            .await;
        assert_eq!(out, json!({"value": i + 1}), "add #{i}");
        last_index = last_index.max(index);
    }

    for &id in &ids {
        cluster.kill(id).await;
    }
    for &id in &ids {
        cluster.restart(id);
    }
    let leader = cluster.leader().await;

    // Every acknowledged write is on every node, and none was applied twice.
    for &id in &ids {
        cluster.wait_applied(id, last_index).await;
        let out = cluster
            .query(
                id,
                "kv",
                &json!({"op": "scan", "prefix": "key-", "limit": 100}),
                Consistency::Stale,
            )
            .await
            .expect_json(&format!("stale scan on node {id}"));
        let expected: Vec<serde_json::Value> = (0..KEYS)
            .map(|i| json!([format!("key-{i:02}"), format!("value-{i}")]))
            .collect();
        assert_eq!(
            out,
            json!({"items": expected}),
            "node {id}'s keys after the restart"
        );
        let got = cluster
            .query(id, "counter", &json!({"op": "get"}), Consistency::Stale)
            .await
            .expect_json(&format!("stale counter get on node {id}"));
        assert_eq!(
            got,
            json!({"value": ADDS}),
            "node {id}'s counter after the restart"
        );
    }
    cluster.wait_digests_agree(&ids, "kv", 0).await;
    cluster.wait_digests_agree(&ids, "counter", 0).await;

    // The cluster takes writes again, on top of the recovered state.
    let follower = ids.iter().copied().find(|&id| id != leader).unwrap();
    let (_, out) = cluster
        .exec_ok(
            follower,
            "kv",
            &json!({"op": "put", "key": "key-00", "value": "new"}),
        )
        .await;
    assert_eq!(out, json!({"prev": "value-0"}), "put over a recovered key");
}

/// Starts `args` and waits for the process to exit; it must, within the deadline, with a
/// non-zero code. Returns what it printed.
async fn expect_refusal(cluster: &Cluster, args: &[String], label: &str) -> String {
    let log = cluster.dir().join(format!("{label}.log"));
    let mut child = Cluster::spawn_wraft(args, &log, label);
    let status = match tokio::time::timeout(Duration::from_secs(30), child.wait()).await {
        Ok(status) => status.expect("waiting for wraft serve"),
        Err(_) => {
            let _ = child.start_kill();
            panic!(
                "{label}: `wraft {}` was still running after 30 s instead of refusing to start; log:\n{}",
                args.join(" "),
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
    };
    let output = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        !status.success(),
        "{label}: exited with success; log:\n{output}"
    );
    eprintln!("{label}: refused with {status}:\n{output}");
    output
}

fn with_data_dir(mut args: Vec<String>, dir: &std::path::Path) -> Vec<String> {
    let i = args
        .iter()
        .position(|a| a == "--data-dir")
        .expect("--data-dir in serve args");
    args[i + 1] = dir.display().to_string();
    args
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refuses_a_data_dir_of_another_node_or_cluster() {
    let a = Cluster::launch(3);
    let b = Cluster::launch(3);
    a.leader().await;
    b.leader().await;
    for id in a.ids() {
        a.kill(id).await;
    }
    b.kill(1).await;

    // Node 2's exact arguments, but node 1's data directory.
    let args = with_data_dir(a.serve_args(2), &a.data_dir(1));
    let output = expect_refusal(&a, &args, "node-2-on-node-1-dir")
        .await
        .to_lowercase();
    assert!(
        output.contains("id") || output.contains("node"),
        "the refusal should say the directory belongs to another node: {output}"
    );

    // Node 1 of cluster a, but node 1 of cluster b's data directory.
    let args = with_data_dir(a.serve_args(1), &b.data_dir(1));
    let output = expect_refusal(&a, &args, "a-node-1-on-b-node-1-dir")
        .await
        .to_lowercase();
    assert!(
        output.contains("cluster"),
        "the refusal should say the directory belongs to another cluster: {output}"
    );

    // Neither directory was harmed: their own nodes start on them.
    a.restart(1);
    let a_ref = &a;
    wait_until(
        Duration::from_secs(30),
        "node 1 of a to serve Status on its own directory",
        move || async move {
            let status = a_ref.status(1).await?;
            if status.node_id == 1 {
                Ok(())
            } else {
                Err(format!("{status:?}"))
            }
        },
    )
    .await;
    b.restart(1);
    b.leader().await;
}

/// Membership changes as faults, mixed into the seeded schedule of `wraft_tests::faults`
/// (`run_with_membership`): a node joins with a fresh id (learner, then voter) and later an old
/// one is removed; a follower is removed and its machine joins again under a new id; the
/// leader is removed; the cluster grows to 5 voters and shrinks to 3; some of these happen while
/// a node is killed, paused or cut off. Meanwhile the workload runs through whichever nodes are
/// members:
/// - registers (kv: put, cas, LINEARIZABLE and LEASE get on hot keys), every call recorded and
///   the history checked for linearizability;
/// - a bank (transfers, with readers checking that the money is conserved);
/// - acknowledged writes of unique keys, each of which every member must hold at the end.
///
/// At the end every member (exactly the nodes the harness runs, all voters) has the same digest
/// of every tenant, and Raft's invariants hold over the logs of every node that ever ran.
/// Each run prints its seed (`WRAFT_SEED=N` replays the choices, not the timing);
/// `WRAFT_FAULT_SECS` lengthens the fault phase (scripts/soak.sh with `MEMBERSHIP=1`). The
/// history is written under the cargo target tmp dir, with every node's log next to it when the
/// run fails.
mod membership_faults {
    use std::collections::{BTreeMap, BTreeSet, HashMap};
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
    use wraft_tests::cluster::{connect, exec_request, Client, ClusterOptions};
    use wraft_tests::faults::{self, Targets};
    use wraft_tests::history::History;
    use wraft_tests::linearizability::{check, Op, Outcome, Ret};
    use wraft_tests::{wait_until, within, Cluster, ExecOutcome, NodeId, QueryOutcome};

    const REGISTERS: &str = "kv";
    const BANK: &str = "bank";
    const DURABLE: &str = "durable";
    const HOT_KEYS: [&str; 3] = ["x", "y", "z"];
    const ACCOUNTS: usize = 5;
    const OPENING_BALANCE: u64 = 100;
    const TOTAL: u64 = ACCOUNTS as u64 * OPENING_BALANCE;

    /// How long faults are injected in CI: a few membership changes among ~10 faults.
    const FAULT_PHASE: Duration = Duration::from_secs(25);
    /// Compaction every this many entries: joining nodes start from a snapshot or, before the
    /// first compaction, from the log.
    const SNAPSHOT_ENTRIES: u64 = 300;
    /// Ids given proxies up front for the nodes the run adds (`WRAFT_SPARE_IDS`, default 8), so
    /// network faults reach joined nodes too; 0 keeps them to the initial nodes. One soak once saw
    /// a stall with spare ids (a joined voter stopped hearing from the leader after the faults
    /// healed, seed 234964752014739046). It has not come back in the three spare-id soaks since
    /// (the last two: 21 membership rounds in 24 minutes) nor in three reruns of that seed, so CI
    /// runs with them: if it comes back, the failure names its seed.
    fn spare_ids() -> usize {
        std::env::var("WRAFT_SPARE_IDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(8)
    }
    /// The gRPC deadline of one client call; past it the call is unknown.
    const CALL_TIMEOUT: Duration = Duration::from_secs(4);
    /// A backstop over the gRPC deadline, for a paused node that cannot even time out.
    const CALL_BACKSTOP: Duration = Duration::from_secs(8);
    const ERROR_BACKOFF: Duration = Duration::from_millis(30);
    const MAX_OPS_PER_CLIENT: u64 = 20_000;
    const JOIN_TIMEOUT: Duration = Duration::from_secs(60);
    const RECOVERY_TIMEOUT: Duration = Duration::from_secs(60);
    /// Process ids of the final reads (not the workload's).
    const PROBE_PROCESS: u64 = 1_000_000_000;
    const REGISTER_CLIENTS: u64 = 4;
    const TRANSFER_CLIENTS: u64 = 2;
    const DURABLE_CLIENTS: u64 = 2;

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

    fn fault_phase() -> Duration {
        std::env::var("WRAFT_FAULT_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .map(Duration::from_secs)
            .unwrap_or(FAULT_PHASE)
    }

    fn account(i: usize) -> String {
        format!("acct-{i}")
    }

    /// Clients of the current members, one per node id, made on first use.
    struct Pool {
        targets: Targets,
        clients: HashMap<NodeId, Client>,
    }

    impl Pool {
        fn new(targets: &Targets) -> Pool {
            Pool {
                targets: targets.clone(),
                clients: HashMap::new(),
            }
        }

        fn pick(&mut self, rng: &mut StdRng) -> (NodeId, Client) {
            let (id, port) = self.targets.pick(rng);
            let client = self
                .clients
                .entry(id)
                .or_insert_with(|| connect(port))
                .clone();
            (id, client)
        }
    }

    /// What the workload's clients saw, beyond the register history.
    #[derive(Default)]
    struct Seen {
        /// Broken promises (bank invariant, refusable transfer accepted, module errors).
        violations: Mutex<Vec<String>>,
        transfers_ok: Mutex<u64>,
        total_reads_ok: Mutex<u64>,
        /// Acknowledged durable writes: key → value.
        durable: Mutex<BTreeMap<String, String>>,
    }

    impl Seen {
        fn violation(&self, what: String) {
            self.violations.lock().unwrap().push(what);
        }
    }

    /// One kv `Exec` (put or cas on a hot key), recorded in the history.
    async fn register_write(
        history: &History,
        process: u64,
        mut client: Client,
        node: NodeId,
        key: &str,
        op: Op,
        seen: &Seen,
    ) -> Outcome {
        let deadlines = wraft_tests::register::Deadlines {
            timeout: CALL_TIMEOUT,
            backstop: CALL_BACKSTOP,
        };
        match wraft_tests::register::write(
            history,
            process,
            wraft_tests::register::Via::Unary(&mut client),
            node,
            REGISTERS,
            key,
            op,
            deadlines,
        )
        .await
        {
            Ok((outcome, _)) => outcome,
            Err(broken) => {
                seen.violation(broken);
                Outcome::Unknown
            }
        }
    }

    /// One kv `get` (LINEARIZABLE or LEASE), recorded; any error is a read that did nothing.
    async fn register_read(
        history: &History,
        process: u64,
        mut client: Client,
        node: NodeId,
        key: &str,
        consistency: Consistency,
    ) -> Outcome {
        let mut request = tonic::Request::new(QueryRequest {
            tenant: REGISTERS.into(),
            query: json!({"op": "get", "key": key}).to_string().into_bytes(),
            consistency: consistency as i32,
        });
        request.set_timeout(CALL_TIMEOUT);
        let inv = history.invoke(process, key, Op::Get);
        let result = tokio::time::timeout(CALL_BACKSTOP, client.query(request)).await;
        let (outcome, note) = match result {
            Err(_) => (Outcome::Fail, format!("node {node}: no answer")),
            Ok(result) => match QueryOutcome::from_result(result) {
                QueryOutcome::Ok { index, output } => {
                    let out = wraft_tests::json(&output);
                    let value = out["value"].as_str().map(String::from);
                    (
                        Outcome::Ok(Ret::Get { value }),
                        format!("node {node} {consistency:?} index {index}"),
                    )
                }
                other => (
                    Outcome::Fail,
                    format!("node {node} {consistency:?}: {other}"),
                ),
            },
        };
        history.complete(inv, outcome.clone(), note);
        outcome
    }

    /// Random put / cas / get on the hot keys through random members until `stop`; values
    /// are unique (`c{id}-{n}`), as the checker's pruning needs.
    async fn register_client(
        id: u64,
        seed: u64,
        targets: Targets,
        history: Arc<History>,
        seen: Arc<Seen>,
        stop: Arc<AtomicBool>,
    ) -> u64 {
        let mut rng = StdRng::seed_from_u64(seed ^ (id + 1).wrapping_mul(0x2545_f491_4f6c_dd1d));
        let mut pool = Pool::new(&targets);
        let mut generation = 0u64;
        let mut last_seen: [Option<String>; HOT_KEYS.len()] = Default::default();
        let mut n = 0u64;
        while !stop.load(Ordering::SeqCst) && n < MAX_OPS_PER_CLIENT {
            n += 1;
            let process = id * 10_000 + generation;
            let k = rng.random_range(0..HOT_KEYS.len());
            let key = HOT_KEYS[k];
            let (node, client) = pool.pick(&mut rng);
            let outcome = match rng.random_range(0..10) {
                0..2 => {
                    let c = Consistency::Linearizable;
                    register_read(&history, process, client, node, key, c).await
                }
                2..4 => {
                    let c = Consistency::Lease;
                    register_read(&history, process, client, node, key, c).await
                }
                roll => {
                    let value = format!("c{id}-{n}");
                    let op = if roll < 7 {
                        Op::Put { value }
                    } else {
                        let expect = if rng.random_bool(0.8) {
                            last_seen[k].clone()
                        } else {
                            None
                        };
                        Op::Cas { expect, value }
                    };
                    register_write(&history, process, client, node, key, op, &seen).await
                }
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

    /// Transfers between random accounts through random members until `stop`; one in ten is
    /// refusable (the same account, or one never opened) and must come back `ok: false`.
    async fn transfer_client(
        id: u64,
        seed: u64,
        targets: Targets,
        seen: Arc<Seen>,
        stop: Arc<AtomicBool>,
    ) -> u64 {
        let mut rng = StdRng::seed_from_u64(seed ^ (id + 51).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let mut pool = Pool::new(&targets);
        let mut n = 0u64;
        while !stop.load(Ordering::SeqCst) && n < MAX_OPS_PER_CLIENT {
            n += 1;
            let from = rng.random_range(0..ACCOUNTS);
            let amount = rng.random_range(1..=60u64);
            let (to, must_refuse) = match rng.random_range(0..10) {
                0 => (account(from), true),
                1 => ("ghost".to_string(), true),
                _ => (
                    account((from + rng.random_range(1..ACCOUNTS)) % ACCOUNTS),
                    false,
                ),
            };
            let command =
                json!({"op": "transfer", "from": account(from), "to": to, "amount": amount});
            let (node, mut client) = pool.pick(&mut rng);
            let mut request =
                tonic::Request::new(exec_request(BANK, command.to_string().into_bytes(), "", 0));
            request.set_timeout(CALL_TIMEOUT);
            let result = tokio::time::timeout(CALL_BACKSTOP, client.exec(request)).await;
            let ok = match result.map(ExecOutcome::from_result) {
                Ok(ExecOutcome::Ok { index, output }) => {
                    match wraft_tests::json(&output)["ok"].as_bool() {
                        Some(true) if must_refuse => seen.violation(format!(
                            "{command} through node {node} (index {index}): a refusable \
                             transfer succeeded"
                        )),
                        Some(true) => *seen.transfers_ok.lock().unwrap() += 1,
                        Some(false) => {}
                        None => seen.violation(format!(
                            "{command} through node {node}: reply {} has no ok",
                            String::from_utf8_lossy(&output)
                        )),
                    }
                    true
                }
                Ok(other @ ExecOutcome::ModuleError { .. }) => {
                    seen.violation(format!("{command} through node {node}: {other}"));
                    true
                }
                _ => false,
            };
            if !ok {
                tokio::time::sleep(ERROR_BACKOFF).await;
            }
        }
        n
    }

    /// Reads the bank's total (LINEARIZABLE: exactly the opening total; STALE: a multiple of
    /// the opening balance up to it, as every prefix of the log gives) until `stop`.
    async fn bank_reader(
        seed: u64,
        targets: Targets,
        seen: Arc<Seen>,
        stop: Arc<AtomicBool>,
    ) -> u64 {
        let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed_ba4c);
        let mut pool = Pool::new(&targets);
        let mut n = 0u64;
        while !stop.load(Ordering::SeqCst) && n < MAX_OPS_PER_CLIENT {
            n += 1;
            let stale = rng.random_bool(0.3);
            let consistency = if stale {
                Consistency::Stale
            } else {
                Consistency::Linearizable
            };
            let (node, mut client) = pool.pick(&mut rng);
            let mut request = tonic::Request::new(QueryRequest {
                tenant: BANK.into(),
                query: json!({"op": "total"}).to_string().into_bytes(),
                consistency: consistency as i32,
            });
            request.set_timeout(CALL_TIMEOUT);
            let result = tokio::time::timeout(CALL_BACKSTOP, client.query(request)).await;
            match result.map(QueryOutcome::from_result) {
                Ok(QueryOutcome::Ok { index, output }) => {
                    let total = wraft_tests::json(&output)["total"].as_u64();
                    let fine = match total {
                        Some(t) if stale => t <= TOTAL && t % OPENING_BALANCE == 0,
                        Some(t) => t == TOTAL,
                        None => false,
                    };
                    if !fine {
                        seen.violation(format!(
                            "{consistency:?} total through node {node} at index {index}: {}",
                            String::from_utf8_lossy(&output)
                        ));
                    }
                    if !stale {
                        *seen.total_reads_ok.lock().unwrap() += 1;
                    }
                }
                _ => tokio::time::sleep(ERROR_BACKOFF).await,
            }
        }
        n
    }

    /// Puts unique keys (`d{id}-{n}`) through random members until `stop`, remembering every
    /// acknowledged one.
    async fn durable_client(
        id: u64,
        seed: u64,
        targets: Targets,
        seen: Arc<Seen>,
        stop: Arc<AtomicBool>,
    ) -> u64 {
        let mut rng = StdRng::seed_from_u64(seed ^ (id + 77).wrapping_mul(0x2545_f491_4f6c_dd1d));
        let mut pool = Pool::new(&targets);
        let mut n = 0u64;
        while !stop.load(Ordering::SeqCst) && n < MAX_OPS_PER_CLIENT {
            n += 1;
            let (key, value) = (format!("d{id}-{n:06}"), format!("v{n}"));
            let command = json!({"op": "put", "key": key, "value": value});
            let (node, mut client) = pool.pick(&mut rng);
            let mut request = tonic::Request::new(exec_request(
                DURABLE,
                command.to_string().into_bytes(),
                "",
                0,
            ));
            request.set_timeout(CALL_TIMEOUT);
            let result = tokio::time::timeout(CALL_BACKSTOP, client.exec(request)).await;
            match result.map(ExecOutcome::from_result) {
                Ok(ExecOutcome::Ok { .. }) => {
                    seen.durable.lock().unwrap().insert(key, value);
                }
                Ok(other @ ExecOutcome::ModuleError { .. }) => {
                    seen.violation(format!("{command} through node {node}: {other}"))
                }
                _ => tokio::time::sleep(ERROR_BACKOFF).await,
            }
        }
        n
    }

    /// Retries a query on the healed cluster until it answers.
    async fn query_until_ok(
        cluster: &Cluster,
        via: NodeId,
        tenant: &str,
        query: serde_json::Value,
        consistency: Consistency,
    ) -> serde_json::Value {
        let query = &query;
        wait_until(
            RECOVERY_TIMEOUT,
            &format!("{query} on {tenant} ({consistency:?}) through node {via}"),
            move || async move { cluster.query(via, tenant, query, consistency).await.json() },
        )
        .await
    }

    /// A LINEARIZABLE read of `key` through `node` that must succeed (recorded in the history).
    async fn final_read(
        history: &History,
        cluster: &Cluster,
        process: u64,
        node: NodeId,
        key: &str,
    ) {
        let client = cluster.client(node);
        wait_until(
            RECOVERY_TIMEOUT,
            &format!("a linearizable read of {key} through node {node} after healing"),
            || {
                let client = client.clone();
                async move {
                    let c = Consistency::Linearizable;
                    match register_read(history, process, client, node, key, c).await {
                        Outcome::Ok(_) => Ok(()),
                        other => Err(format!("{other:?}")),
                    }
                }
            },
        )
        .await
    }

    /// The log of every node that ever ran (removed ones are no longer in the harness, their
    /// logs are still in the cluster's directory).
    fn all_logs(cluster: &Cluster, ever: &[NodeId]) -> Vec<(NodeId, String)> {
        ever.iter()
            .map(|&id| {
                let path = cluster.dir().join(format!("node-{id}.log"));
                let log = std::fs::read(&path)
                    .map(|b| String::from_utf8_lossy(&b).into_owned())
                    .unwrap_or_default();
                (id, log)
            })
            .collect()
    }

    /// Writes the history, and on failure every node's log next to it; returns its path.
    fn save(history: &History, seed: u64, logs: Option<&[(NodeId, String)]>) -> PathBuf {
        let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join("membership")
            .join(format!("seed{seed}-pid{}.jsonl", std::process::id()));
        history
            .write(
                &path,
                json!({"test": "membership_changes_under_faults", "seed": seed}),
            )
            .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        println!("history: {}", path.display());
        for (id, log) in logs.unwrap_or_default() {
            let log_path: &Path = &path.with_extension(format!("node-{id}.log"));
            if std::fs::write(log_path, log).is_ok() {
                eprintln!("node {id} log: {}", log_path.display());
            }
        }
        path
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn membership_changes_under_faults() {
        let started = Instant::now();
        let seed = seed();
        let mut cluster = Cluster::start_with(
            3,
            ClusterOptions {
                proxies: true,
                // With spare ids, joined nodes are behind proxies too and partitions reach them.
                spare_ids: spare_ids(),
                seed,
                args: vec![
                    "--snapshot-entries".into(),
                    SNAPSHOT_ENTRIES.to_string(),
                    "--snapshot-chunk-bytes".into(),
                    "4096".into(),
                ],
                ..Default::default()
            },
        )
        .await;
        let leader = cluster.leader().await;
        cluster.deploy(leader, REGISTERS, "kv").await;
        cluster.deploy(leader, BANK, "bank").await;
        cluster.deploy(leader, DURABLE, "kv").await;
        for i in 0..ACCOUNTS {
            let open = json!({"op": "open", "account": account(i), "balance": OPENING_BALANCE});
            let (_, out) = cluster.exec_ok(leader, BANK, &open).await;
            assert_eq!(out, json!({"ok": true}), "{open}");
        }

        let targets = Targets::of(&cluster);
        let history = Arc::new(History::new());
        let seen = Arc::new(Seen::default());
        let stop = Arc::new(AtomicBool::new(false));
        let mut clients = JoinSet::new();
        for c in 0..REGISTER_CLIENTS {
            let (t, h, s, st) = (targets.clone(), history.clone(), seen.clone(), stop.clone());
            clients.spawn(register_client(c, seed, t, h, s, st));
        }
        for c in 0..TRANSFER_CLIENTS {
            let (t, s, st) = (targets.clone(), seen.clone(), stop.clone());
            clients.spawn(transfer_client(c, seed, t, s, st));
        }
        clients.spawn(bank_reader(
            seed,
            targets.clone(),
            seen.clone(),
            stop.clone(),
        ));
        for c in 0..DURABLE_CLIENTS {
            let (t, s, st) = (targets.clone(), seen.clone(), stop.clone());
            clients.spawn(durable_client(c, seed, t, s, st));
        }

        let run =
            faults::run_with_membership(&mut cluster, seed, fault_phase(), 1, &targets, |e| {
                history.fault(e)
            })
            .await;
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
        let report = match run {
            Ok(report) => report,
            Err(e) => {
                let ever: Vec<NodeId> = (1..=64)
                    .filter(|id| cluster.dir().join(format!("node-{id}.log")).exists())
                    .collect();
                let path = save(&history, seed, Some(&all_logs(&cluster, &ever)));
                panic!(
                    "seed {seed}: the fault scheduler failed: {e}\nfault schedule:\n{}\nhistory: {}",
                    history.fault_schedule(),
                    path.display()
                );
            }
        };
        let members = cluster.ids();
        assert_eq!(
            report.voters, members,
            "seed {seed}: the voters are the nodes the harness runs"
        );

        // Recovery: every member answers a linearizable read of every key (pinning down the
        // unknown writes), applies everything, and holds the same state of every tenant.
        let leader = cluster.leader().await;
        for (i, &id) in members.iter().enumerate() {
            for key in HOT_KEYS {
                final_read(&history, &cluster, PROBE_PROCESS + i as u64, id, key).await;
            }
        }
        let applied = cluster
            .status(leader)
            .await
            .expect("leader status")
            .applied_index;
        for &id in &members {
            cluster.wait_applied(id, applied).await;
        }
        let mut digests = Vec::new();
        for tenant in [REGISTERS, BANK, DURABLE] {
            let d = cluster.wait_digests_agree(&members, tenant, 0).await;
            digests.push(format!("{tenant} at {} ({:.12})", d.index, d.state_hash));
        }

        // Every member's own state: the money is all there, every acknowledged write too.
        let mut broken: Vec<String> = seen.violations.lock().unwrap().clone();
        let durable = seen.durable.lock().unwrap().clone();
        for &id in &members {
            let total = query_until_ok(
                &cluster,
                id,
                BANK,
                json!({"op": "total"}),
                Consistency::Stale,
            )
            .await;
            if total != json!({ "total": TOTAL }) {
                broken.push(format!("node {id}: final bank total {total}"));
            }
            // In pages of at most 1000 keys (`d{client}-{n / 1000:03}`), to stay far below the
            // query result limit however long the run.
            let mut held: BTreeMap<String, String> = BTreeMap::new();
            let pages: BTreeSet<&str> = durable.keys().map(|k| &k[..k.len() - 3]).collect();
            for page in pages {
                let scan = json!({"op": "scan", "prefix": page, "limit": 1000});
                let out = query_until_ok(&cluster, id, DURABLE, scan, Consistency::Stale).await;
                let items = out["items"]
                    .as_array()
                    .unwrap_or_else(|| panic!("node {id}: scan answered {out}"));
                for kv in items {
                    let text = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_string();
                    held.insert(text(&kv[0]), text(&kv[1]));
                }
            }
            let lost: Vec<&String> = durable
                .iter()
                .filter(|(k, v)| held.get(*k) != Some(v))
                .map(|(k, _)| k)
                .collect();
            if !lost.is_empty() {
                broken.push(format!(
                    "node {id}: {} of {} acknowledged writes missing or changed, e.g. {:?}",
                    lost.len(),
                    durable.len(),
                    &lost[..lost.len().min(5)]
                ));
            }
        }

        let counts = history.counts();
        let logs = all_logs(&cluster, &report.ever);
        let raft = wraft_tests::invariants::check(&logs);
        if let Err(e) = &raft {
            broken.push(format!("raft invariant broken: {e}"));
        }
        let linear = check(&history.operations());
        if let Err(e) = &linear {
            broken.push(format!("registers: {e}"));
        }
        let path = save(&history, seed, (!broken.is_empty()).then_some(&logs[..]));
        println!(
            "summary: {ops} workload ops, {} faults injected ({} membership faults, {} conf \
             changes, {} joins given up), ok {} / fail {} / unknown {}, {} transfers, {} \
             linearizable totals, {} acknowledged durable writes; nodes ever {:?}, voters now \
             {members:?}; digests {}; {:.1}s",
            report.injected,
            report.member_faults,
            report.conf_changes,
            report.failed_joins,
            counts.ok,
            counts.fail,
            counts.unknown,
            seen.transfers_ok.lock().unwrap(),
            seen.total_reads_ok.lock().unwrap(),
            durable.len(),
            report.ever,
            digests.join(", "),
            started.elapsed().as_secs_f64()
        );
        println!("fault schedule:\n{}", history.fault_schedule());
        if let Ok(raft) = &raft {
            println!(
                "raft invariants hold: {} role changes, {} terms with a leader",
                raft.role_changes, raft.terms_with_a_leader
            );
        }
        if let Ok(stats) = &linear {
            println!("linearizable: {stats:?}");
        }
        assert!(
            broken.is_empty(),
            "seed {seed}: {} violations:\n{}\nfault schedule:\n{}\nhistory: {}",
            broken.len(),
            broken.join("\n"),
            history.fault_schedule(),
            path.display()
        );
        assert!(
            report.member_faults >= 1 && report.conf_changes >= 1,
            "seed {seed}: no membership change was made: {report:?}"
        );
        // A run in which (almost) nothing succeeded proves nothing.
        assert!(
            counts.ok >= 100 && durable.len() >= 50 && *seen.transfers_ok.lock().unwrap() >= 20,
            "seed {seed}: the workload hardly ran: {counts:?}, {} durable writes, {} transfers",
            durable.len(),
            seen.transfers_ok.lock().unwrap()
        );
    }
}
