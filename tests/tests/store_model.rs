//! The store model end to end: a kv tenant upgraded to kvstore (the same contract, its state
//! only in host storage) keeps every acknowledged write through the upgrade, a follower's
//! `kill -9` and restart, and reaches a new member inside a snapshot (its keyspace travels
//! with the other state records); every replica's digest of its keyspace agrees.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::json;
use tokio::task::JoinSet;
use wraft_tests::api::Consistency;
use wraft_tests::cluster::ClusterOptions;
use wraft_tests::wait::wait_until;
use wraft_tests::{json, Cluster, ExecOutcome, QueryOutcome};

const TENANT: &str = "kvs";
const SLOW: Duration = Duration::from_secs(90);

/// Puts keys `[from, to)` with `workers` concurrent writers spread over `via`; returns every
/// acknowledged key with its value.
async fn put_range(
    cluster: &Cluster,
    via: &[u64],
    from: usize,
    to: usize,
    workers: usize,
) -> BTreeMap<String, String> {
    let mut tasks = JoinSet::new();
    for w in 0..workers {
        let mut client = cluster.client(via[w % via.len()]);
        tasks.spawn(async move {
            let mut acked = Vec::new();
            for i in (from + w..to).step_by(workers) {
                let key = format!("k{i:05}");
                let value = format!("v{i}");
                let cmd = json!({"op":"put","key":key,"value":value});
                let request =
                    wraft_tests::cluster::exec_request(TENANT, cmd.to_string().into_bytes(), "", 0);
                if let ExecOutcome::Ok { .. } =
                    wraft_tests::cluster::exec_on(&mut client, request, "put").await
                {
                    acked.push((key, value));
                }
            }
            acked
        });
    }
    let mut all = BTreeMap::new();
    while let Some(done) = tasks.join_next().await {
        all.extend(done.expect("a writer task panicked"));
    }
    all
}

async fn assert_all_present(
    cluster: &Cluster,
    via: u64,
    acked: &BTreeMap<String, String>,
    consistency: Consistency,
) {
    for (key, value) in acked {
        match cluster
            .query(via, TENANT, &json!({"op":"get","key":key}), consistency)
            .await
        {
            QueryOutcome::Ok { output, .. } => assert_eq!(
                json(&output)["value"],
                json!(value),
                "acknowledged put of {key} lost on node {via}"
            ),
            other => panic!("get {key} through node {via}: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_store_model_tenant_survives_a_crash_and_reaches_a_new_member_by_snapshot() {
    let mut cluster = Cluster::start_with(
        3,
        ClusterOptions {
            args: vec![
                "--snapshot-entries".into(),
                "50".into(),
                "--snapshot-chunk-bytes".into(),
                "4096".into(),
            ],
            ..Default::default()
        },
    )
    .await;
    // The tenant starts on kv (memory model) and moves to kvstore (store model): kv's
    // snapshot is exactly the SDK's store snapshot format, restored into host storage.
    cluster.deploy(1, TENANT, "kv").await;
    let mut acked = put_range(&cluster, &[1, 2, 3], 0, 100, 4).await;
    cluster.deploy(1, TENANT, "kvstore").await;
    let deployed = cluster.leader().await;
    let status = cluster.status(deployed).await.expect("status");
    let tenant = status.tenants.iter().find(|t| t.name == TENANT);
    assert_eq!(
        tenant.map(|t| (t.model.as_str(), t.version)),
        Some(("store", 2)),
        "{status:?}"
    );
    acked.extend(put_range(&cluster, &[1, 2, 3], 100, 150, 4).await);
    let leader = cluster.leader().await;
    let victim = if leader == 3 { 2 } else { 3 };
    let others: Vec<u64> = cluster
        .ids()
        .into_iter()
        .filter(|&id| id != victim)
        .collect();
    cluster.kill(victim).await;
    acked.extend(put_range(&cluster, &others, 150, 300, 4).await);
    cluster.restart(victim);
    acked.extend(put_range(&cluster, &[1, 2, 3], 300, 350, 4).await);
    assert!(
        acked.len() >= 300,
        "most puts are acknowledged: {}",
        acked.len()
    );

    // The log is compacted every 50 entries: the new member gets the keyspace in a snapshot.
    let four = cluster.add_joining_node(&[]);
    let commit = cluster
        .status(cluster.leader().await)
        .await
        .map(|s| s.commit_index)
        .unwrap_or(0);
    cluster.wait_applied(four, commit).await;
    wait_until(SLOW, "node 4 to have received a snapshot", || async {
        let log = cluster.log(four);
        if log.contains("installed a snapshot") {
            Ok(())
        } else {
            Err("no snapshot installed yet".to_string())
        }
    })
    .await;
    let ids = cluster.ids();
    cluster.wait_digests_agree(&ids, TENANT, 0).await;
    assert_all_present(&cluster, four, &acked, Consistency::Stale).await;
    assert_all_present(&cluster, victim, &acked, Consistency::Linearizable).await;
    // A scan through a follower: exactly the acknowledged keys (no put applied twice, none
    // out of nowhere), in key order.
    let scan = cluster
        .query(
            victim,
            TENANT,
            &json!({"op":"scan","prefix":"k","limit":1000}),
            Consistency::Linearizable,
        )
        .await;
    let expected: Vec<serde_json::Value> = acked.iter().map(|(k, v)| json!([k, v])).collect();
    match scan {
        QueryOutcome::Ok { output, .. } => {
            assert_eq!(json(&output)["items"], json!(expected), "scan of every key")
        }
        other => panic!("scan: {other:?}"),
    }
}
