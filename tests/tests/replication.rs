//! A healthy 3-node cluster: one leader, a deploy through a follower, concurrent writes that
//! reach every replica, exact sums under concurrency, and exactly-once sessions.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use serde_json::json;
use tokio::task::JoinSet;
use wraft_tests::api::module_error::Kind;
use wraft_tests::api::{Consistency, Role};
use wraft_tests::cluster::{exec_on, exec_request};
use wraft_tests::{
    json, plugin_bytes, run_cli, sha256_hex, within, Cluster, ExecOutcome, QueryOutcome,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn elects_one_leader_and_deploys_through_a_follower() {
    let cluster = Cluster::start(3).await;
    let leader = cluster.leader().await;
    let followers: Vec<u64> = cluster
        .ids()
        .into_iter()
        .filter(|&id| id != leader)
        .collect();
    let follower = followers[0];

    let mut cluster_ids = HashSet::new();
    for &id in &followers {
        let status = cluster.status(id).await.unwrap();
        assert_eq!(
            status.role,
            Role::Follower as i32,
            "node {id} should follow {leader}: {status:?}"
        );
        let mut members: Vec<u64> = status.members.iter().map(|m| m.id).collect();
        members.sort();
        assert_eq!(members, vec![1, 2, 3], "node {id}'s members: {status:?}");
        cluster_ids.insert(status.cluster_id);
    }
    cluster_ids.insert(cluster.status(leader).await.unwrap().cluster_id);
    assert_eq!(
        cluster_ids.len(),
        1,
        "the nodes disagree on the cluster id: {cluster_ids:?}"
    );
    assert!(!cluster_ids.contains(""), "a node reports no cluster id");

    let deployed = cluster.deploy(follower, "kv", "kv").await;
    assert_eq!(
        deployed.module_hash,
        sha256_hex(&plugin_bytes("kv")),
        "module hash of kv"
    );
    for id in cluster.ids() {
        let status = cluster.wait_applied(id, deployed.index).await;
        let tenant = status
            .tenants
            .iter()
            .find(|t| t.name == "kv")
            .unwrap_or_else(|| {
                panic!("node {id} applied the deploy but lists no tenant kv: {status:?}")
            });
        assert_eq!(
            tenant.module_hash, deployed.module_hash,
            "node {id}'s module hash of kv"
        );
    }

    // The tenant works: a write through the follower, linearizable reads through every node.
    let (_, out) = cluster
        .exec_ok(
            follower,
            "kv",
            &json!({"op": "put", "key": "a", "value": "1"}),
        )
        .await;
    assert_eq!(out, json!({"prev": null}), "first put of a");
    for id in cluster.ids() {
        let got = cluster
            .query(
                id,
                "kv",
                &json!({"op": "get", "key": "a"}),
                Consistency::Linearizable,
            )
            .await
            .expect_json(&format!("linearizable get through node {id}"));
        assert_eq!(
            got,
            json!({"value": "1"}),
            "linearizable get of a through node {id}"
        );
    }
}

/// `wraft_requests_forwarded_total{method="..."}` on a node (0 if not yet exported).
async fn forwarded(cluster: &Cluster, id: u64, method: &str) -> u64 {
    let series = format!("wraft_requests_forwarded_total{{method=\"{method}\"}}");
    wraft_tests::metric(cluster, id, &series).await
}

/// A follower serves a known tenant's commands and linearizable reads through raft (the
/// command travels to the leader as a raft proposal, the read as a ReadIndex), not by
/// forwarding the request over gRPC; its client gets the module's own output, at the index
/// every replica applied it at, and read-your-writes holds across nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn followers_serve_commands_and_reads_through_raft() {
    let options = wraft_tests::cluster::ClusterOptions {
        metrics: true,
        ..Default::default()
    };
    let cluster = Cluster::start_with(3, options).await;
    let leader = cluster.leader().await;
    let deployed = cluster.deploy(leader, "kv", "kv").await;
    let followers: Vec<u64> = cluster
        .ids()
        .into_iter()
        .filter(|&id| id != leader)
        .collect();
    for &id in &followers {
        cluster.wait_applied(id, deployed.index).await;
    }
    let mut last_index = deployed.index;
    for i in 0..20u64 {
        let via = followers[(i % 2) as usize];
        let reader = followers[((i + 1) % 2) as usize];
        let value = format!("v{i}");
        let (index, out) = cluster
            .exec_ok(via, "kv", &json!({"op": "put", "key": "k", "value": value}))
            .await;
        let prev = if i == 0 {
            json!(null)
        } else {
            json!(format!("v{}", i - 1))
        };
        assert_eq!(out, json!({"prev": prev}), "put {i} through follower {via}");
        assert!(
            index > last_index,
            "put {i} at index {index}, not after {last_index}"
        );
        last_index = index;
        // Read through the other follower: it must see the write its peer acknowledged.
        let got = cluster
            .query(
                reader,
                "kv",
                &json!({"op": "get", "key": "k"}),
                Consistency::Linearizable,
            )
            .await
            .expect_json(&format!("linearizable get through follower {reader}"));
        assert_eq!(
            got,
            json!({"value": value}),
            "read after put {i}, through node {reader}"
        );
    }
    for &id in &followers {
        assert!(
            forwarded(&cluster, id, "propose").await >= 10,
            "follower {id} proposed no commands through raft"
        );
        assert!(
            forwarded(&cluster, id, "read_index").await >= 10,
            "follower {id} asked the leader for no ReadIndex"
        );
        assert_eq!(
            forwarded(&cluster, id, "exec").await,
            0,
            "follower {id} forwarded a command over gRPC for a tenant it knows"
        );
    }
    // Every replica applied the same puts at the same indexes.
    cluster
        .wait_digests_agree(&cluster.ids(), "kv", last_index)
        .await;
}

const PUTS: usize = 1000;
const PUT_TASKS: usize = 16;
/// How often a put may be retried after an error, e.g. during an election that CPU starvation
/// on a loaded test machine provoked. A put is idempotent, so retrying even an indeterminate
/// one is safe: it can only find its own value as `prev`.
const PUT_RETRIES: u32 = 10;

fn put_key(i: usize) -> String {
    format!("key-{i:04}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_puts_reach_every_replica() {
    let cluster = Cluster::start(3).await;
    let leader = cluster.leader().await;
    let deployed = cluster.deploy(leader, "kv", "kv").await;
    let ids = cluster.ids();

    let mut tasks = JoinSet::new();
    for t in 0..PUT_TASKS {
        let node = ids[t % ids.len()];
        let mut client = cluster.client(node);
        tasks.spawn(async move {
            let (mut max_index, mut retries) = (0, 0);
            for i in (t..PUTS).step_by(PUT_TASKS) {
                let key = put_key(i);
                let command = json!({"op": "put", "key": key, "value": format!("value-{i}")});
                let (mut attempt, mut maybe_applied) = (0, false);
                loop {
                    let request = exec_request("kv", command.to_string().into_bytes(), "", 0);
                    let what = format!("put {key} through node {node}");
                    match exec_on(&mut client, request, &what).await {
                        ExecOutcome::Ok { index, output } => {
                            let prev = json(&output);
                            let own = json!({"prev": format!("value-{i}")});
                            assert!(
                                prev == json!({"prev": null}) || (maybe_applied && prev == own),
                                "{what} (attempt {attempt}, an earlier attempt may have been \
                                 applied: {maybe_applied}): prev {prev}"
                            );
                            max_index = max_index.max(index);
                            break;
                        }
                        out @ (ExecOutcome::Definite(_) | ExecOutcome::Indeterminate(_))
                            if attempt < PUT_RETRIES =>
                        {
                            eprintln!("{what} (attempt {attempt}): {out}; retrying");
                            maybe_applied |= matches!(out, ExecOutcome::Indeterminate(_));
                            attempt += 1;
                            retries += 1;
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        other => panic!("{what} (attempt {attempt}): {other}"),
                    }
                }
            }
            (max_index, retries)
        });
    }
    let (mut last_index, mut retries) = (0, 0);
    within(Duration::from_secs(300), "1000 concurrent puts", async {
        while let Some(result) = tasks.join_next().await {
            let (max_index, task_retries) = result.expect("a put task failed");
            last_index = last_index.max(max_index);
            retries += task_retries;
        }
    })
    .await;
    eprintln!("{PUTS} puts acknowledged; last index {last_index}; {retries} retries after errors");

    // Every replica holds every put, read from its own state.
    for &id in &ids {
        cluster.wait_applied(id, last_index).await;
        let mut seen = BTreeMap::new();
        for d in 0..10 {
            let prefix = format!("key-0{d}");
            let out = cluster
                .query(
                    id,
                    "kv",
                    &json!({"op": "scan", "prefix": prefix, "limit": 200}),
                    Consistency::Stale,
                )
                .await
                .expect_json(&format!("stale scan of {prefix} on node {id}"));
            let items = out["items"]
                .as_array()
                .unwrap_or_else(|| panic!("scan of {prefix} on node {id}: no items array: {out}"));
            for item in items {
                let (k, v) = (item[0].as_str(), item[1].clone());
                let k = k.unwrap_or_else(|| {
                    panic!("scan item on node {id} is not [key, value]: {item}")
                });
                seen.insert(k.to_string(), v);
            }
        }
        let missing: Vec<String> = (0..PUTS)
            .map(put_key)
            .filter(|k| !seen.contains_key(k))
            .collect();
        assert!(
            missing.is_empty(),
            "node {id} misses {} puts, e.g. {:?}",
            missing.len(),
            &missing[..missing.len().min(10)]
        );
        assert_eq!(seen.len(), PUTS, "node {id} holds keys nobody put");
        for i in 0..PUTS {
            assert_eq!(
                seen[&put_key(i)],
                json!(format!("value-{i}")),
                "node {id}: value of {}",
                put_key(i)
            );
        }
        let got = cluster
            .query(
                id,
                "kv",
                &json!({"op": "get", "key": put_key(PUTS - 1)}),
                Consistency::Stale,
            )
            .await
            .expect_json(&format!("stale get on node {id}"));
        assert_eq!(
            got,
            json!({"value": format!("value-{}", PUTS - 1)}),
            "stale get on node {id}"
        );
    }
    let digest = cluster
        .wait_digests_agree(&ids, "kv", last_index.max(deployed.index))
        .await;
    assert_eq!(
        digest.module_hash, deployed.module_hash,
        "digest's module hash"
    );
}

const ADD_TASKS: usize = 12;
const ADDS_PER_TASK: usize = 25;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_adds_sum_exactly() {
    let cluster = Cluster::start(3).await;
    let leader = cluster.leader().await;
    cluster.deploy(leader, "counter", "counter").await;
    let ids = cluster.ids();

    let mut tasks = JoinSet::new();
    for t in 0..ADD_TASKS {
        let node = ids[t % ids.len()];
        let mut client = cluster.client(node);
        tasks.spawn(async move {
            let (mut acked, mut values, mut definite, mut unknown, mut max_index) =
                (0u64, Vec::new(), 0, 0u64, 0);
            for j in 0..ADDS_PER_TASK {
                let n = ((t * 31 + j * 7) % 100 + 1) as u64;
                let request = exec_request(
                    "counter",
                    json!({"op": "add", "n": n}).to_string().into_bytes(),
                    "",
                    0,
                );
                let what = format!("add {n} through node {node}");
                match exec_on(&mut client, request, &what).await {
                    ExecOutcome::Ok { index, output } => {
                        let value = json(&output)["value"].as_u64().unwrap_or_else(|| {
                            panic!("{what}: no value in {}", String::from_utf8_lossy(&output))
                        });
                        acked += n;
                        values.push(value);
                        max_index = max_index.max(index);
                    }
                    // Not applied: left out of the sum, and not retried.
                    ExecOutcome::Definite(_) => definite += 1,
                    // Perhaps applied (e.g. an election provoked by a starved test machine):
                    // not retried either, and the final value is then only bounded.
                    ExecOutcome::Indeterminate(s) => {
                        eprintln!("{what}: indeterminate {:?} {}", s.code(), s.message());
                        unknown += n;
                    }
                    other => panic!("{what}: {other}"),
                }
            }
            (acked, values, definite, unknown, max_index)
        });
    }
    let (mut acked, mut values, mut definite, mut unknown, mut last_index) =
        (0, Vec::new(), 0, 0, 0);
    within(Duration::from_secs(300), "concurrent adds", async {
        while let Some(result) = tasks.join_next().await {
            let (a, v, d, u, m) = result.expect("an add task failed");
            acked += a;
            values.extend(v);
            definite += d;
            unknown += u;
            last_index = last_index.max(m);
        }
    })
    .await;
    eprintln!(
        "{} adds acknowledged summing to {acked}; {definite} definite errors; \
         indeterminate adds summing to {unknown}",
        values.len()
    );

    let query = cluster
        .query(
            leader,
            "counter",
            &json!({"op": "get"}),
            Consistency::Linearizable,
        )
        .await;
    let got = query.expect_json("linearizable get")["value"]
        .as_u64()
        .unwrap_or_else(|| panic!("counter get without a value: {query}"));
    // Each acknowledged add saw a distinct running total (every n > 0).
    let distinct: HashSet<u64> = values.iter().copied().collect();
    assert_eq!(
        distinct.len(),
        values.len(),
        "two adds returned the same running total"
    );
    if unknown == 0 {
        assert_eq!(got, acked, "final counter vs the sum of acknowledged adds");
        assert_eq!(
            values.iter().max().copied(),
            Some(acked),
            "the largest running total is not the sum of the adds"
        );
    } else {
        assert!(
            (acked..=acked + unknown).contains(&got),
            "final counter {got} outside [acked {acked}, acked + indeterminate {}]",
            acked + unknown
        );
    }
    let QueryOutcome::Ok { index, .. } = query else {
        unreachable!("checked by expect_json")
    };
    for &id in &ids {
        cluster.wait_applied(id, last_index.max(index)).await;
        let got_here = cluster
            .query(id, "counter", &json!({"op": "get"}), Consistency::Stale)
            .await
            .expect_json(&format!("stale get on node {id}"));
        assert_eq!(got_here, json!({"value": got}), "node {id}'s counter");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn session_retries_apply_once() {
    let cluster = Cluster::start(3).await;
    let leader = cluster.leader().await;
    let follower = cluster.ids().into_iter().find(|&id| id != leader).unwrap();
    cluster.deploy(leader, "counter", "counter").await;
    let c = &cluster;
    let get = move || async move {
        c.query(
            leader,
            "counter",
            &json!({"op": "get"}),
            Consistency::Linearizable,
        )
        .await
        .expect_json("linearizable get")
    };

    let add5 = json!({"op": "add", "n": 5});
    let (_, first) = cluster
        .exec_session(follower, "counter", &add5, "client-a", 1)
        .await
        .expect_ok("add 5 as (client-a, 1)");
    assert_eq!(first, json!({"value": 5}));
    for via in [follower, leader] {
        let (_, again) = cluster
            .exec_session(via, "counter", &add5, "client-a", 1)
            .await
            .expect_ok(&format!("retry of (client-a, 1) through node {via}"));
        assert_eq!(
            again, first,
            "a retry of (client-a, 1) through node {via} must return the first result"
        );
    }
    assert_eq!(
        get().await,
        json!({"value": 5}),
        "counter after three sends of (client-a, 1)"
    );

    let (_, second) = cluster
        .exec_session(
            follower,
            "counter",
            &json!({"op": "add", "n": 7}),
            "client-a",
            2,
        )
        .await
        .expect_ok("add 7 as (client-a, 2)");
    assert_eq!(second, json!({"value": 12}));

    // An older sequence number after a newer one: the first result again, or STALE_SEQUENCE;
    // never applied.
    match cluster
        .exec_session(leader, "counter", &add5, "client-a", 1)
        .await
    {
        ExecOutcome::Ok { output, .. } => {
            assert_eq!(json(&output), first, "late retry of (client-a, 1)")
        }
        ExecOutcome::ModuleError {
            kind: Kind::StaleSequence,
            ..
        } => {}
        other => panic!(
            "late retry of (client-a, 1): expected its first result or STALE_SEQUENCE, got {other}"
        ),
    }
    assert_eq!(
        get().await,
        json!({"value": 12}),
        "counter after a late retry of (client-a, 1)"
    );

    // Sessions are per client: another client's seq 1 is new.
    let (_, other) = cluster
        .exec_session(
            follower,
            "counter",
            &json!({"op": "add", "n": 1}),
            "client-b",
            1,
        )
        .await
        .expect_ok("add 1 as (client-b, 1)");
    assert_eq!(other, json!({"value": 13}));

    // The same through the CLI.
    let endpoints = cluster.endpoints();
    let args = [
        "exec",
        "--endpoints",
        endpoints.as_str(),
        "--tenant",
        "counter",
        "--client-id",
        "cli",
        "--seq",
        "1",
        r#"{"op":"add","n":100}"#,
    ];
    let first_cli = run_cli(&args, &[]).await;
    first_cli.expect_code(0, "CLI exec with a session");
    assert_eq!(
        first_cli.json(),
        json!({"value": 113}),
        "CLI exec output: {first_cli}"
    );
    let again_cli = run_cli(&args, &[]).await;
    again_cli.expect_code(0, "CLI retry with the same session");
    assert_eq!(
        again_cli.json(),
        json!({"value": 113}),
        "CLI retry output: {again_cli}"
    );
    let query = run_cli(
        &[
            "query",
            "--endpoints",
            endpoints.as_str(),
            "--tenant",
            "counter",
            r#"{"op":"get"}"#,
        ],
        &[],
    )
    .await;
    query.expect_code(0, "CLI query");
    assert_eq!(
        query.json(),
        json!({"value": 113}),
        "counter after two CLI sends of (cli, 1): {query}"
    );
}
