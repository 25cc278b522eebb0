//! Membership, snapshots and recovery with real processes: a cluster grows from 3 to 5 voters
//! and back under writes; a learner with an empty disk catches up from a snapshot of 100,000
//! keys sent in many small chunks; the leader is removed; a wiped member is refused; and
//! `kill -9` (crash points armed by `WRAFT_CRASH_AT`, so each phase is hit for sure) during a
//! snapshot transfer, a snapshot install, a compaction (with a state small enough for the WAL,
//! and one checkpointed past it) and a conf change loses nothing.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::task::JoinSet;
use wraft_tests::api::member_change::Kind;
use wraft_tests::api::{Consistency, MemberChange};
use wraft_tests::cluster::ClusterOptions;
use wraft_tests::wait::wait_until;
use wraft_tests::{json, Cluster, ExecOutcome, QueryOutcome};

const SLOW: Duration = Duration::from_secs(90);

/// A cluster that compacts its log every `every` entries and sends snapshots in small chunks.
async fn compacting_cluster(n: usize, every: u64) -> Cluster {
    compacting_cluster_chunks(n, every, 16384).await
}

async fn compacting_cluster_chunks(n: usize, every: u64, chunk: usize) -> Cluster {
    Cluster::start_with(
        n,
        ClusterOptions {
            args: vec![
                "--snapshot-entries".into(),
                every.to_string(),
                "--snapshot-chunk-bytes".into(),
                chunk.to_string(),
            ],
            ..Default::default()
        },
    )
    .await
}

/// Puts `count` distinct keys with `workers` concurrent writers through the given nodes;
/// returns every acknowledged key with its value.
async fn put_many(
    cluster: &Cluster,
    via: &[u64],
    prefix: &str,
    count: usize,
    workers: usize,
) -> BTreeMap<String, String> {
    put_many_padded(cluster, via, prefix, count, workers, "").await
}

/// [`put_many`] with `pad` appended to every value, to make a large state quickly.
async fn put_many_padded(
    cluster: &Cluster,
    via: &[u64],
    prefix: &str,
    count: usize,
    workers: usize,
    pad: &str,
) -> BTreeMap<String, String> {
    let mut tasks = JoinSet::new();
    for w in 0..workers {
        let mut client = cluster.client(via[w % via.len()]);
        let prefix = prefix.to_string();
        let pad = pad.to_string();
        tasks.spawn(async move {
            let mut acked = Vec::new();
            for i in (w..count).step_by(workers) {
                let key = format!("{prefix}{i:06}");
                let value = format!("v{i}{pad}");
                let cmd = json!({"op":"put","key":key,"value":value});
                let request =
                    wraft_tests::cluster::exec_request("kv", cmd.to_string().into_bytes(), "", 0);
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

/// Checks that every acknowledged put reads back through a linearizable query on `via`.
async fn assert_all_present(cluster: &Cluster, via: u64, acked: &BTreeMap<String, String>) {
    for (key, value) in acked {
        let out = cluster
            .query(
                via,
                "kv",
                &json!({"op":"get","key":key}),
                Consistency::Linearizable,
            )
            .await;
        match out {
            QueryOutcome::Ok { output, .. } => assert_eq!(
                json(&output)["value"],
                json!(value),
                "acknowledged put of {key} lost"
            ),
            other => panic!("get {key} through node {via}: {other:?}"),
        }
    }
}

fn change(kind: Kind, id: u64) -> MemberChange {
    MemberChange {
        kind: kind as i32,
        id,
        ..Default::default()
    }
}

/// The voters (or the learners) a node's status lists, sorted.
fn members(status: &wraft_tests::api::StatusResponse, voters: bool) -> Vec<u64> {
    let mut ids: Vec<u64> = status
        .members
        .iter()
        .filter(|m| m.voter == voters)
        .map(|m| m.id)
        .collect();
    ids.sort();
    ids
}

/// Waits until the leader reports exactly these voters and learners.
async fn wait_members(cluster: &Cluster, voters: &[u64], learners: &[u64]) {
    wait_until(
        SLOW,
        &format!("voters {voters:?} learners {learners:?}"),
        || async {
            let leader = cluster.leader().await;
            let status = cluster.status(leader).await?;
            let (v, l) = (members(&status, true), members(&status, false));
            if v == voters && l == learners {
                Ok(())
            } else {
                Err(format!("voters {v:?} learners {l:?}"))
            }
        },
    )
    .await
}

/// The leader's commit index now.
async fn commit_now(cluster: &Cluster) -> u64 {
    let leader = cluster.leader().await;
    cluster
        .status(leader)
        .await
        .map(|s| s.commit_index)
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn grows_to_five_and_back_to_three_under_writes() {
    let mut cluster = compacting_cluster(3, 200).await;
    cluster.deploy(1, "kv", "kv").await;
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = JoinSet::new();
    for w in 0..4u64 {
        let mut client = cluster.client(1 + w % 3);
        let stop = stop.clone();
        writers.spawn(async move {
            let mut acked = BTreeMap::new();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let key = format!("w{w}-{i:06}");
                let cmd = json!({"op":"put","key":key,"value":i.to_string()});
                let request =
                    wraft_tests::cluster::exec_request("kv", cmd.to_string().into_bytes(), "", 0);
                if let ExecOutcome::Ok { .. } =
                    wraft_tests::cluster::exec_on(&mut client, request, "put").await
                {
                    acked.insert(key, i.to_string());
                }
                i += 1;
            }
            acked
        });
    }

    // Two nodes join as learners and promote themselves once caught up.
    let four = cluster.add_joining_node(&[]);
    let five = cluster.add_joining_node(&[]);
    wait_members(&cluster, &[1, 2, 3, four, five], &[]).await;
    let commit = commit_now(&cluster).await;
    for id in [four, five] {
        cluster.wait_applied(id, commit).await;
    }

    // Both leave at once: joint consensus, left automatically.
    let leader = cluster.leader().await;
    let removed = cluster
        .change_members(
            leader,
            vec![change(Kind::Remove, four), change(Kind::Remove, five)],
        )
        .await
        .expect("removing nodes 4 and 5");
    assert!(removed.index > 0);
    wait_members(&cluster, &[1, 2, 3], &[]).await;
    cluster.forget(four).await;
    cluster.forget(five).await;

    stop.store(true, Ordering::Relaxed);
    let mut acked = BTreeMap::new();
    while let Some(done) = writers.join_next().await {
        acked.extend(done.expect("a writer panicked"));
    }
    assert!(
        acked.len() > 50,
        "the writers made progress: {}",
        acked.len()
    );
    let leader = cluster.leader().await;
    assert_all_present(&cluster, leader, &acked).await;
    let commit = commit_now(&cluster).await;
    cluster.wait_digests_agree(&[1, 2, 3], "kv", 0).await;
    for id in [1, 2, 3] {
        cluster.wait_applied(id, commit).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_empty_learner_catches_up_from_a_snapshot_of_100k_keys() {
    let mut cluster = compacting_cluster(3, 2000).await;
    cluster.deploy(1, "kv", "kv").await;
    let acked = put_many(&cluster, &[1, 2, 3], "k", 100_000, 96).await;
    assert_eq!(
        acked.len(),
        100_000,
        "every put is acknowledged on a healthy cluster"
    );
    let leader = cluster.leader().await;
    let compacted = cluster.status(leader).await.unwrap().snapshot_index;
    assert!(compacted > 0, "the leader compacted its log");

    let four = cluster.add_joining_node(&[]);
    wait_members(&cluster, &[1, 2, 3, four], &[]).await;
    let commit = commit_now(&cluster).await;
    let status = cluster.wait_applied(four, commit).await;
    assert!(
        status.snapshot_index >= compacted,
        "node {four} started from a snapshot: {status:?}"
    );
    assert!(
        cluster.log(four).contains("installed a snapshot"),
        "node {four} installed a snapshot"
    );
    cluster.wait_digests_agree(&[1, 2, 3, four], "kv", 0).await;
    // Spot-check reads served by the new member itself.
    for key in ["k000000", "k050000", "k099999"] {
        let out = cluster
            .query(
                four,
                "kv",
                &json!({"op":"get","key":key}),
                Consistency::Stale,
            )
            .await;
        match out {
            QueryOutcome::Ok { output, .. } => {
                assert_eq!(json(&output)["value"], json!(acked[key]))
            }
            other => panic!("{key} on node {four}: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_during_snapshot_transfer_and_install_loses_nothing() {
    // Chunks of 512 bytes: the snapshot travels in many of them.
    let mut cluster = compacting_cluster_chunks(3, 300, 512).await;
    cluster.deploy(1, "kv", "kv").await;
    let acked = put_many(&cluster, &[1, 2, 3], "s", 3000, 32).await;

    // Killed after the first of many chunks arrived, then after the whole snapshot is staged,
    // then half-way through installing (after the synced switch): each boot resumes cleanly.
    let four = cluster.add_joining_node(&[("WRAFT_CRASH_AT", "snapshot-receiving")]);
    for (point, next) in [
        ("snapshot-receiving", Some("snapshot-staged")),
        ("snapshot-staged", Some("snapshot-installing")),
        ("snapshot-installing", Some("snapshot-installed")),
        ("snapshot-installed", None),
    ] {
        let status = cluster.wait_exit(four, SLOW).await;
        assert!(!status.success(), "node {four} should abort at {point}");
        let log = cluster.log(four);
        assert!(
            log.contains(&format!("crash point `{point}` reached")),
            "node {four} stopped at {point}: {}",
            cluster.log_tail(four, 20)
        );
        match next {
            Some(next) => cluster.restart_with_env(four, &[("WRAFT_CRASH_AT", next)]),
            None => cluster.restart(four),
        }
    }
    wait_members(&cluster, &[1, 2, 3, four], &[]).await;
    let commit = commit_now(&cluster).await;
    cluster.wait_applied(four, commit).await;
    cluster.wait_digests_agree(&[1, 2, 3, four], "kv", 0).await;
    assert_all_present(&cluster, four, &acked).await;
}

/// A state over a MiB is checkpointed past RocksDB's WAL: `kill -9` right after such a
/// checkpoint is written loses it (the node replays from the one before), and `kill -9` right
/// after the compaction it allowed must find it on disk (the log it would replay is gone). One
/// node, so no peer can hide a loss by sending a snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kills_around_checkpoints_past_the_wal_lose_nothing() {
    let cluster = compacting_cluster(1, 50).await;
    cluster.deploy(1, "kv", "kv").await;
    // 1,500 values of 1 KiB: about 1.5 MB of state, over the storage's 1 MiB threshold.
    let pad = "p".repeat(1024);
    let mut acked = put_many_padded(&cluster, &[1], "big", 1500, 16, &pad).await;
    assert_eq!(
        acked.len(),
        1500,
        "every put is acknowledged on a healthy node"
    );

    let mut next = 0u64;
    for point in [
        "checkpoint-unlogged",
        "compaction-checkpointed",
        "compacted",
    ] {
        cluster.kill(1).await;
        cluster.restart_with_env(1, &[("WRAFT_CRASH_AT", point)]);
        // Replay at startup may reach the point before there is a leader to write to.
        wait_until(SLOW, "node 1 to lead or to crash", || async {
            match cluster.status(1).await {
                Ok(status) if status.leader_id == 1 => Ok(()),
                _ if !cluster.is_running(1) => Ok(()),
                _ => Err("node 1 runs without leading".to_string()),
            }
        })
        .await;
        // Write until the node reaches the crash point (it compacts every 50 entries, and
        // every compaction checkpoints the large tenant). The put the crash interrupts has
        // no answer and is not counted.
        let deadline = tokio::time::Instant::now() + SLOW;
        while cluster.is_running(1) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the node never reached {point}"
            );
            let key = format!("after{next:06}");
            let value = format!("a{next}{pad}");
            next += 1;
            let put = json!({"op":"put","key":key,"value":value});
            if let ExecOutcome::Ok { .. } = cluster.exec(1, "kv", &put).await {
                acked.insert(key, value);
            }
        }
        assert!(
            cluster
                .log(1)
                .contains(&format!("crash point `{point}` reached")),
            "the node stopped at {point}"
        );
        cluster.restart(1);
    }

    cluster.leader().await;
    assert_all_present(&cluster, 1, &acked).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_during_compaction_and_conf_change_loses_nothing() {
    let mut cluster = compacting_cluster(3, 50).await;
    cluster.deploy(1, "counter", "counter").await;
    let leader = cluster.leader().await;
    let victim = if leader == 2 { 3 } else { 2 };
    let mut expected = 0i64;

    for point in ["compaction-checkpointed", "compacted"] {
        cluster.kill(victim).await;
        cluster.restart_with_env(victim, &[("WRAFT_CRASH_AT", point)]);
        // Write until the victim reaches the crash point (it compacts every 50 entries).
        let deadline = tokio::time::Instant::now() + SLOW;
        while cluster.is_running(victim) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "node {victim} never reached {point}"
            );
            let via = if victim == 1 { 2 } else { 1 };
            let (_, out) = cluster
                .exec_ok(via, "counter", &json!({"op":"add","n":1}))
                .await;
            expected = out["value"].as_i64().unwrap_or(expected);
        }
        assert!(
            cluster
                .log(victim)
                .contains(&format!("crash point `{point}` reached")),
            "node {victim} stopped at {point}"
        );
        cluster.restart(victim);
    }

    // A conf change: the victim dies right after applying it to raft, before persisting it.
    cluster.kill(victim).await;
    cluster.restart_with_env(victim, &[("WRAFT_CRASH_AT", "conf-change-applied")]);
    cluster
        .wait_applied(victim, commit_now(&cluster).await)
        .await;
    let four = cluster.add_joining_node(&[]);
    let exited = cluster.wait_exit(victim, SLOW).await;
    assert!(!exited.success());
    cluster.restart(victim);
    wait_members(&cluster, &[1, 2, 3, four], &[]).await;
    let (_, out) = cluster
        .exec_ok(victim, "counter", &json!({"op":"add","n":1}))
        .await;
    expected += 1;
    assert_eq!(
        out["value"],
        json!(expected),
        "no add lost or applied twice"
    );
    let commit = commit_now(&cluster).await;
    for id in [1, 2, 3, four] {
        cluster.wait_applied(id, commit).await;
    }
    cluster
        .wait_digests_agree(&[1, 2, 3, four], "counter", 0)
        .await;
    let status = cluster.status(victim).await.unwrap();
    assert!(
        status.members.iter().any(|m| m.id == four),
        "node {victim} knows the new member after its crash: {status:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_leader_is_removed_and_the_cluster_continues() {
    let mut cluster = compacting_cluster(3, 100).await;
    cluster.deploy(1, "counter", "counter").await;
    cluster
        .exec_ok(1, "counter", &json!({"op":"add","n":5}))
        .await;
    let leader = cluster.leader().await;
    let others: Vec<u64> = cluster
        .ids()
        .into_iter()
        .filter(|&id| id != leader)
        .collect();
    cluster
        .change_members(leader, vec![change(Kind::Remove, leader)])
        .await
        .expect("removing the leader");
    cluster.forget(leader).await;
    wait_members(&cluster, &others, &[]).await;
    let (_, out) = cluster
        .exec_ok(others[0], "counter", &json!({"op":"add","n":1}))
        .await;
    assert_eq!(out["value"], json!(6));

    // A change while another is pending, and nonsense, get clear errors.
    let err = cluster
        .change_members(others[0], vec![change(Kind::Promote, 42)])
        .await
        .expect_err("promoting an unknown node");
    assert!(err.message().contains("not a learner"), "{err:?}");
    let err = cluster
        .change_members(
            others[0],
            others.iter().map(|&id| change(Kind::Remove, id)).collect(),
        )
        .await
        .expect_err("removing every voter");
    assert!(err.message().contains("without voters"), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_wiped_member_is_refused_and_rejoins_as_a_new_member() {
    let mut cluster = compacting_cluster(3, 100).await;
    cluster.deploy(1, "counter", "counter").await;
    cluster
        .exec_ok(1, "counter", &json!({"op":"add","n":1}))
        .await;
    let leader = cluster.leader().await;
    let wiped = if leader == 3 { 2 } else { 3 };
    cluster.kill(wiped).await;
    std::fs::remove_dir_all(cluster.data_dir(wiped)).expect("wiping the data directory");
    cluster.restart(wiped);
    wait_until(SLOW, "the wiped member's peers to refuse it", || async {
        let log = cluster.log(wiped);
        if log.contains("comes back with a new data directory") {
            Ok(())
        } else {
            Err(cluster.log_tail(wiped, 5))
        }
    })
    .await;
    // The cluster keeps serving with the other two.
    let live: Vec<u64> = cluster
        .ids()
        .into_iter()
        .filter(|&id| id != wiped)
        .collect();
    cluster
        .exec_ok(live[0], "counter", &json!({"op":"add","n":1}))
        .await;
    // It applied its own bootstrap (one entry per initial voter) and nothing of the cluster's.
    let status = cluster.status(wiped).await.unwrap();
    assert!(
        status.applied_index <= 3,
        "the wiped member applied nothing from the cluster: {status:?}"
    );

    // The operator's way back: remove it, add the machine again under a new id.
    cluster.forget(wiped).await;
    cluster
        .change_members(live[0], vec![change(Kind::Remove, wiped)])
        .await
        .expect("removing the wiped member");
    let new = cluster.add_joining_node(&[]);
    let mut voters = live.clone();
    voters.push(new);
    wait_members(&cluster, &voters, &[]).await;
    cluster.wait_digests_agree(&voters, "counter", 0).await;
}

/// A node killed after recording its identity but before the cluster was asked to add it (the
/// first start's join never happened) joins on its next start, instead of taking the recorded
/// identity for a completed join and waiting forever outside the cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_interrupted_join_completes_on_the_next_start() {
    let mut cluster = compacting_cluster(3, 50).await;
    cluster.deploy(1, "kv", "kv").await;
    let acked = put_many(&cluster, &[1, 2, 3], "j", 120, 8).await;

    let four = cluster.add_joining_node(&[("WRAFT_CRASH_AT", "join-asking")]);
    let status = cluster.wait_exit(four, SLOW).await;
    assert!(
        !status.success(),
        "node {four} should abort before asking to join"
    );
    assert!(
        cluster
            .log(four)
            .contains("crash point `join-asking` reached"),
        "node {four} stopped elsewhere: {}",
        cluster.log_tail(four, 20)
    );
    cluster.restart(four);
    wait_members(&cluster, &[1, 2, 3, four], &[]).await;
    let commit = commit_now(&cluster).await;
    cluster.wait_applied(four, commit).await;
    assert_all_present(&cluster, four, &acked).await;
}

/// A node joins a cluster whose log was never compacted, so it replays the log from index 1
/// rather than install a snapshot: it must meet the initial voters there (the bootstrap
/// entries), see itself added and promoted, and count as a voter. It used to learn no
/// configuration at all (raft refuses to add a learner to one without voters) and stay
/// outside the cluster for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_joins_a_never_compacted_cluster_and_counts_as_a_voter() {
    let mut cluster = Cluster::start_with(
        3,
        ClusterOptions {
            // 0: never compact, so the log from index 1 is the only way to catch up.
            args: vec!["--snapshot-entries".into(), "0".into()],
            // Node 4 joins behind proxies, so it can be cut off below.
            proxies: true,
            spare_ids: 1,
            ..Default::default()
        },
    )
    .await;
    cluster.deploy(1, "kv", "kv").await;
    let mut acked = put_many(&cluster, &[1, 2, 3], "f", 40, 4).await;

    let four = cluster.add_joining_node(&[]);
    wait_members(&cluster, &[1, 2, 3, four], &[]).await;
    // Its own configuration, not only the leader's.
    wait_until(
        SLOW,
        &format!("node {four} to see voters 1, 2, 3 and itself"),
        || async {
            let voters = members(&cluster.status(four).await?, true);
            if voters == [1, 2, 3, four] {
                Ok(())
            } else {
                Err(format!("node {four} sees voters {voters:?}"))
            }
        },
    )
    .await;
    let leader = cluster.leader().await;
    assert_eq!(
        cluster.status(leader).await.unwrap().snapshot_index,
        0,
        "the leader never compacted: node {four} caught up from the log"
    );
    let commit = commit_now(&cluster).await;
    cluster.wait_applied(four, commit).await;
    assert_all_present(&cluster, four, &acked).await;

    // Cut off (its links are proxied like the initial nodes'), it misses a write the other
    // three commit, and catches up once healed.
    let down = [1, 2, 3]
        .into_iter()
        .find(|&id| id != leader)
        .expect("a follower among the first three");
    cluster.net().isolate(four);
    let (cut_write, _) = cluster
        .exec_ok(
            down,
            "kv",
            &json!({"op": "put", "key": "cut", "value": "off"}),
        )
        .await;
    acked.insert("cut".to_string(), "off".to_string());
    let status = cluster.status(four).await.unwrap();
    assert!(
        status.applied_index < cut_write,
        "isolated node {four} applied the write at {cut_write}: {status:?}"
    );
    cluster.net().heal_all();
    cluster.wait_applied(four, cut_write).await;

    // It counts: with one original voter down, a write needs the newcomer's acknowledgement
    // (3 of 4) to commit.
    cluster.kill(down).await;
    let (index, _) = cluster
        .exec_ok(
            leader,
            "kv",
            &json!({"op": "put", "key": "after", "value": "down"}),
        )
        .await;
    acked.insert("after".to_string(), "down".to_string());
    let live: Vec<u64> = [1, 2, 3, four]
        .into_iter()
        .filter(|&id| id != down)
        .collect();
    cluster.wait_digests_agree(&live, "kv", index).await;
    assert_all_present(&cluster, four, &acked).await;
}
