//! Crashes (SIGKILL) and restarts: the leader dies under load, the whole cluster dies, and a
//! node is pointed at a data directory that is not its own.

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
