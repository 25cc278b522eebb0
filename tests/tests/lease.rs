//! Lease reads (`Consistency::LEASE`): the leader answers without a quorum round while it holds
//! a lease, and they must still never be stale.
//!
//! - Read-your-writes: every acknowledged write is seen by a lease read through the leader and
//!   through a follower (which forwards), also while leadership moves on purpose.
//! - An isolated old leader stops serving lease reads within the lease: once the new leader has
//!   acknowledged a newer write, the old one answers with an error, a timeout, or the newer
//!   value, never the older one; and no lease read succeeds on it past the lease.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use tokio::task::JoinSet;
use tokio::time::Instant;
use wraft_tests::api::{Consistency, QueryRequest, Role, TransferLeaderRequest};
use wraft_tests::cluster::{exec_on, exec_request, Client, ClusterOptions};
use wraft_tests::{wait_until, Cluster, ExecOutcome, NodeId, QueryOutcome, LEADER_TIMEOUT};

const TENANT: &str = "kv";
/// The node's lease (`raft_loop::LEASE`: election timeout 1 s less a 300 ms margin).
const LEASE: Duration = Duration::from_millis(700);
/// Slack for the proxies to close their connections after a cut and for scheduling on a loaded
/// test machine: a lease read that started this long after the lease ended must not succeed.
const SLACK: Duration = Duration::from_millis(300);
/// Client-side bound of one read in the loops below.
const READ_TIMEOUT: Duration = Duration::from_secs(8);

fn cluster_options(proxies: bool) -> ClusterOptions {
    ClusterOptions {
        proxies,
        metrics: true,
        seed: 1,
        ..Default::default()
    }
}

/// One lease read of `key` on a client the caller holds, bounded by [`READ_TIMEOUT`].
async fn lease_get(client: &mut Client, key: &str) -> Result<Option<String>, String> {
    let request = QueryRequest {
        tenant: TENANT.into(),
        query: json!({"op": "get", "key": key}).to_string().into_bytes(),
        consistency: Consistency::Lease as i32,
    };
    match tokio::time::timeout(READ_TIMEOUT, client.query(request)).await {
        Err(_) => Err(format!("no answer within {READ_TIMEOUT:?}")),
        Ok(result) => {
            let outcome = QueryOutcome::from_result(result);
            let value = outcome.json()?;
            Ok(value["value"].as_str().map(str::to_string))
        }
    }
}

/// `v17` → 17.
fn seq_of(value: &str) -> u64 {
    value
        .strip_prefix('v')
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("value {value:?} is not v<number>"))
}

/// `wraft_lease_reads_total{result="..."}` on a node (0 if not yet exported).
async fn lease_reads(cluster: &Cluster, id: NodeId, result: &str) -> u64 {
    let series = format!("wraft_lease_reads_total{{result=\"{result}\"}}");
    wraft_tests::metric(cluster, id, &series).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lease_reads_see_every_acknowledged_write() {
    let cluster = Cluster::start_with(3, cluster_options(false)).await;
    let leader = cluster.leader().await;
    cluster.deploy(leader, TENANT, "kv").await;
    let ids = cluster.ids();

    // One writer: write through each node in turn, then read through every node.
    for i in 0..60u64 {
        let via = ids[(i % 3) as usize];
        let key = format!("k{}", i % 5);
        let value = format!("v{i}");
        cluster
            .exec_ok(
                via,
                TENANT,
                &json!({"op": "put", "key": key, "value": value}),
            )
            .await;
        for &id in &ids {
            let got = lease_get(&mut cluster.client(id), &key)
                .await
                .unwrap_or_else(|e| panic!("lease get of {key} through node {id}: {e}"));
            assert_eq!(
                got.as_deref(),
                Some(value.as_str()),
                "lease read of {key} through node {id} after the put of {value} through node {via} was acknowledged"
            );
        }
    }
    let (mut served, mut fallback) = (0, 0);
    for &id in &ids {
        served += lease_reads(&cluster, id, "served").await;
        fallback += lease_reads(&cluster, id, "fallback").await;
    }
    eprintln!("{served} lease reads served, {fallback} fell back to ReadIndex");
    assert!(
        served > 0,
        "the leader served no read from its lease ({fallback} fell back): the lease is never granted"
    );

    // Writers and readers on their own keys while leadership moves: a read may see a newer
    // value (a write whose answer was lost may apply later), never an older one.
    const TASKS: u64 = 6;
    let stop = Arc::new(AtomicBool::new(false));
    let reads_checked = Arc::new(AtomicU64::new(0));
    let mut tasks = JoinSet::new();
    for t in 0..TASKS {
        let clients: Vec<(NodeId, Client)> =
            ids.iter().map(|&id| (id, cluster.client(id))).collect();
        let stop = stop.clone();
        let reads_checked = reads_checked.clone();
        tasks.spawn(async move {
            let key = format!("task{t}");
            let mut tried = 0u64;
            let mut i = t as usize;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                tried += 1;
                let (write_via, mut write_client) = clients[i % clients.len()].clone();
                let value = format!("v{tried}");
                let outcome = exec_on(
                    &mut write_client,
                    exec_request(
                        TENANT,
                        json!({"op": "put", "key": key, "value": value})
                            .to_string()
                            .into_bytes(),
                        "",
                        0,
                    ),
                    &format!("put of {key} through node {write_via}"),
                )
                .await;
                let acked = match outcome {
                    ExecOutcome::Ok { .. } => tried,
                    // Not applied, or perhaps applied: either way no promise to check.
                    ExecOutcome::Definite(_)
                    | ExecOutcome::Indeterminate(_)
                    | ExecOutcome::Unclassified(_) => {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                    other => panic!("put of {key} through node {write_via}: {other}"),
                };
                let (read_via, mut read_client) = clients[(i + 1 + t as usize) % clients.len()].clone();
                match lease_get(&mut read_client, &key).await {
                    Ok(Some(got)) => {
                        let seen = seq_of(&got);
                        assert!(
                            (acked..=tried).contains(&seen),
                            "stale lease read of {key} through node {read_via}: got {got} after v{acked} was acknowledged"
                        );
                        reads_checked.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(None) => panic!(
                        "lease read of {key} through node {read_via} found nothing after v{acked} was acknowledged"
                    ),
                    // An error or a timeout while leadership moves is allowed.
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
    }
    for round in 0..4 {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let via = ids[round % ids.len()];
        let mut request = tonic::Request::new(TransferLeaderRequest { to: 0 });
        request.set_timeout(Duration::from_secs(5));
        // The transfer is the disturbance; whether it completes does not matter here.
        let _ = tokio::time::timeout(
            Duration::from_secs(8),
            cluster.client(via).transfer_leader(request),
        )
        .await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);
    while let Some(done) = tasks.join_next().await {
        done.expect("a writer/reader task failed");
    }
    let checked = reads_checked.load(Ordering::Relaxed);
    eprintln!("{checked} lease reads checked against acknowledged writes during transfers");
    assert!(
        checked >= 20,
        "only {checked} lease reads succeeded while leadership moved"
    );
}

/// What one lease read against the old leader did, on the test's clock.
#[derive(Debug)]
struct Read {
    started: Instant,
    ended: Instant,
    result: Result<Option<String>, String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn isolated_old_leader_stops_serving_lease_reads() {
    let cluster = Cluster::start_with(3, cluster_options(true)).await;
    let old = cluster.leader().await;
    cluster.deploy(old, TENANT, "kv").await;
    cluster
        .exec_ok(
            old,
            TENANT,
            &json!({"op": "put", "key": "x", "value": "v1"}),
        )
        .await;

    // The old leader serves lease reads before the cut.
    let mut client = cluster.client(old);
    for _ in 0..20 {
        let got = lease_get(&mut client, "x").await;
        assert_eq!(
            got,
            Ok(Some("v1".to_string())),
            "lease read of x on leader {old}"
        );
    }
    assert!(
        lease_reads(&cluster, old, "served").await > 0,
        "leader {old} served no lease read before the cut"
    );

    // Lease reads hammer the old leader, from before the cut until well after the new leader
    // acknowledged a newer write.
    let reads = Arc::new(Mutex::new(Vec::<Read>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut readers = JoinSet::new();
    for _ in 0..4 {
        let mut client = cluster.client(old);
        let reads = reads.clone();
        let stop = stop.clone();
        readers.spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                let result = lease_get(&mut client, "x").await;
                let ended = Instant::now();
                let failed = result.is_err();
                reads.lock().unwrap().push(Read {
                    started,
                    ended,
                    result,
                });
                if failed {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        });
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let cut = Instant::now();
    cluster.net().isolate(old);

    // The other two elect a leader and acknowledge a newer write.
    let others: Vec<NodeId> = cluster.ids().into_iter().filter(|&id| id != old).collect();
    let new = wait_until(
        LEADER_TIMEOUT,
        &format!("a new leader among {others:?}"),
        || {
            let cluster = &cluster;
            let others = &others;
            async move {
                for &id in others {
                    let status = cluster.status(id).await?;
                    if status.role == Role::Leader as i32 {
                        return Ok(id);
                    }
                }
                Err("no leader yet".to_string())
            }
        },
    )
    .await;
    cluster
        .exec_ok(
            new,
            TENANT,
            &json!({"op": "put", "key": "x", "value": "v2"}),
        )
        .await;
    let acked = Instant::now();
    eprintln!(
        "node {new} leads after the cut of node {old}; v2 acknowledged {:?} after the cut",
        acked - cut
    );
    // Keep reading the old leader for a while: past its step-down and its request timeout.
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop.store(true, Ordering::Relaxed);
    while let Some(done) = readers.join_next().await {
        done.expect("a reader task failed");
    }

    let reads = std::mem::take(&mut *reads.lock().unwrap());
    let lease_end = cut + LEASE + SLACK;
    let (mut before_ok, mut after_errors) = (0, 0);
    for read in &reads {
        match &read.result {
            Ok(value) => {
                assert!(
                    read.started < lease_end,
                    "the isolated old leader {old} answered a lease read {:?} after the cut (lease {LEASE:?}): {read:?}",
                    read.started - cut
                );
                if read.started >= acked {
                    assert_eq!(
                        value.as_deref(),
                        Some("v2"),
                        "stale lease read on the old leader {old} after node {new} acknowledged v2: {read:?}"
                    );
                }
                if read.started < cut {
                    before_ok += 1;
                }
            }
            Err(_) if read.started >= lease_end => after_errors += 1,
            Err(_) => {}
        }
    }
    let last_ok = reads
        .iter()
        .filter(|r| r.result.is_ok())
        .map(|r| r.ended)
        .max();
    eprintln!(
        "{} reads on node {old}: {before_ok} ok before the cut, last ok answer {:?} after the cut, {after_errors} failed after the lease",
        reads.len(),
        last_ok.map(|t| t.saturating_duration_since(cut)),
    );
    assert!(
        before_ok > 0,
        "no lease read succeeded on {old} before the cut"
    );
    assert!(
        after_errors > 0,
        "no lease read was tried on the old leader {old} after its lease ended"
    );
    // A round the old leader started as leader fails when it steps down, and a read that finds
    // no leader fails after the node's leader wait: none waits out the request timeout for a
    // quorum it cannot reach.
    let waited_out: Vec<&Read> = reads
        .iter()
        .filter(|r| matches!(&r.result, Err(e) if e.contains("waiting to confirm leadership")))
        .collect();
    assert!(
        waited_out.is_empty(),
        "{} reads on the isolated old leader {old} waited out the request timeout, e.g. {:?} after the cut: {:?}",
        waited_out.len(),
        waited_out[0].started.saturating_duration_since(cut),
        waited_out[0]
    );

    // Healed, the old leader rejoins as a follower and forwards: it sees v2.
    cluster.net().heal_all();
    wait_until(
        LEADER_TIMEOUT,
        &format!("a lease read of x through node {old} to see v2 after healing"),
        || {
            let mut client = cluster.client(old);
            async move {
                match lease_get(&mut client, "x").await {
                    Ok(Some(v)) if v == "v2" => Ok(()),
                    Ok(other) => panic!("stale lease read through healed node {old}: {other:?}"),
                    Err(e) => Err(e),
                }
            }
        },
    )
    .await;
}
