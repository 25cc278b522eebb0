//! Upgrading a tenant's module on a live 3-node cluster (`wraft deploy` over a running tenant):
//! every replica switches at the same log index, the old version's snapshot goes to the new
//! version's `restore`, and nothing acknowledged is lost.
//!
//! - kv v1 → kv2 while writers run: every acknowledged put is readable through kv2 with its
//!   value, kv2's new `count` query answers (it did not under v1), and the replicas' digests
//!   agree.
//! - kv2 → kv2, with a follower restarted after each deploy: a restart right after the first
//!   upgrade restores kv2 from the checkpoint that still holds kv v1's snapshot, a redeploy or a
//!   restart after the second from kv2's own format; per-key versions (which kv v1's format
//!   cannot carry) survive the redeploy, so kv2's own format was read. Rolling back to kv v1 is
//!   refused (v1 cannot read kv2's format) and the tenant stays on kv2 with every key.
//!
//! Needs the `wraft` binary and the plugins (`scripts/build-plugins.sh`); see `paths`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::task::JoinSet;
use tonic::Code;
use wraft_tests::api::module_error::Kind;
use wraft_tests::api::Consistency;
use wraft_tests::cluster::{exec_on, exec_request, Client};
use wraft_tests::{
    json, plugin_bytes, sha256_hex, wait_until, within, Cluster, ExecOutcome, NodeId, QueryOutcome,
    APPLY_TIMEOUT,
};

const TENANT: &str = "shop";
const WRITERS: usize = 6;
/// Puts acknowledged by kv v1 before the redeploy starts, and by kv2 (at an index after the
/// switch) before the writers stop: enough that both versions served a real load.
const ACKS_BEFORE: usize = 150;
const ACKS_AFTER: usize = 150;
/// How often a put may be retried after a definite or indeterminate error (e.g. an election
/// that CPU starvation on a loaded machine provoked). Each writer's keys are its own, so a
/// retried put can only find its own value as `prev`.
const PUT_RETRIES: u32 = 10;
/// Far above the scan limit any writer needs: one scan returns a writer's every key.
const SCAN_LIMIT: usize = 100_000;

/// What a writer got acknowledged: key → (value, index of the acknowledgement).
type Acks = BTreeMap<String, (String, u64)>;

/// What the writers share with the test: when to stop, and how much they got done.
#[derive(Default)]
struct Progress {
    stop: AtomicBool,
    acks: AtomicUsize,
    /// The index at which the tenant switched to kv2; `u64::MAX` until the deploy returns.
    switch_index: AtomicU64,
    /// Acknowledged puts at an index after `switch_index`: applied by kv2.
    acks_after_switch: AtomicUsize,
}

/// Puts distinct keys `w{writer}-{n}` through one node until told to stop, retrying errors
/// (see [`PUT_RETRIES`]), and returns its number and every acknowledged put. Any module error
/// fails the test: a put is valid under both versions, also while the tenant switches.
async fn writer(
    writer: usize,
    node: NodeId,
    mut client: Client,
    progress: Arc<Progress>,
) -> (usize, Acks) {
    let mut acks = Acks::new();
    for n in 0.. {
        if progress.stop.load(Ordering::SeqCst) {
            break;
        }
        let (key, value) = (format!("w{writer}-{n:05}"), format!("v{writer}-{n}"));
        let command = json!({"op": "put", "key": key, "value": value});
        let (mut attempt, mut maybe_applied) = (0, false);
        let index = loop {
            let request = exec_request(TENANT, command.to_string().into_bytes(), "", 0);
            let what = format!("writer {writer}: put {key} through node {node}");
            match exec_on(&mut client, request, &what).await {
                ExecOutcome::Ok { index, output } => {
                    let prev = json(&output);
                    let own = json!({ "prev": value });
                    assert!(
                        prev == json!({"prev": null}) || (maybe_applied && prev == own),
                        "{what} (attempt {attempt}, an earlier attempt may have been applied: \
                         {maybe_applied}): prev {prev}"
                    );
                    break index;
                }
                out @ (ExecOutcome::Definite(_) | ExecOutcome::Indeterminate(_))
                    if attempt < PUT_RETRIES =>
                {
                    eprintln!("{what} (attempt {attempt}): {out}; retrying");
                    maybe_applied |= matches!(out, ExecOutcome::Indeterminate(_));
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                other => panic!("{what} (attempt {attempt}): {other}"),
            }
        };
        progress.acks.fetch_add(1, Ordering::SeqCst);
        if index > progress.switch_index.load(Ordering::SeqCst) {
            progress.acks_after_switch.fetch_add(1, Ordering::SeqCst);
        }
        acks.insert(key, (value, index));
    }
    (writer, acks)
}

/// Waits until `counter` reaches `target`, failing after [`APPLY_TIMEOUT`] with `what`.
async fn wait_count(counter: &AtomicUsize, target: usize, what: &str) {
    wait_until(APPLY_TIMEOUT, what, || async {
        let n = counter.load(Ordering::SeqCst);
        if n >= target {
            Ok(())
        } else {
            Err(format!("{n} of {target}"))
        }
    })
    .await;
}

/// A query that must succeed, as JSON.
async fn ask(cluster: &Cluster, via: NodeId, query: Value, consistency: Consistency) -> Value {
    cluster
        .query(via, TENANT, &query, consistency)
        .await
        .expect_json(&format!("{query} ({consistency:?}) through node {via}"))
}

/// Every key with `prefix` and its value, read from one node with one scan.
async fn scan(
    cluster: &Cluster,
    via: NodeId,
    prefix: &str,
    consistency: Consistency,
) -> BTreeMap<String, String> {
    let out = ask(
        cluster,
        via,
        json!({"op": "scan", "prefix": prefix, "limit": SCAN_LIMIT}),
        consistency,
    )
    .await;
    let items = out["items"]
        .as_array()
        .unwrap_or_else(|| panic!("scan of {prefix:?} through node {via}: no items: {out}"));
    items
        .iter()
        .map(|item| match (item[0].as_str(), item[1].as_str()) {
            (Some(k), Some(v)) => (k.to_string(), v.to_string()),
            _ => panic!("scan item through node {via} is not [key, value]: {item}"),
        })
        .collect()
}

/// Checks that `via` holds exactly the acknowledged puts of every writer.
async fn check_every_put(cluster: &Cluster, via: NodeId, acks: &[Acks], consistency: Consistency) {
    for (w, writer_acks) in acks.iter().enumerate() {
        let seen = scan(cluster, via, &format!("w{w}-"), consistency).await;
        let missing: Vec<&String> = writer_acks
            .keys()
            .filter(|k| !seen.contains_key(*k))
            .collect();
        assert!(
            missing.is_empty(),
            "node {via} ({consistency:?}) misses {} of writer {w}'s {} acknowledged puts, e.g. \
             {:?}",
            missing.len(),
            writer_acks.len(),
            &missing[..missing.len().min(10)]
        );
        for (key, (value, index)) in writer_acks {
            assert_eq!(
                &seen[key], value,
                "node {via} ({consistency:?}): value of {key}, acknowledged at index {index}"
            );
        }
        // Every put a writer started ended acknowledged (or failed the test), so nothing else
        // may be there.
        assert_eq!(
            seen.len(),
            writer_acks.len(),
            "node {via} ({consistency:?}) holds keys of writer {w} that were never put"
        );
    }
}

/// Every node reports the tenant at `version` (1 + successful upgrades) running `module_hash`.
async fn wait_tenant_version(cluster: &Cluster, version: u64, module_hash: &str) {
    for id in cluster.ids() {
        wait_until(
            APPLY_TIMEOUT,
            &format!("node {id} to run {TENANT} version {version}, module {module_hash}"),
            || async move {
                let status = cluster.status(id).await?;
                match status.tenants.iter().find(|t| t.name == TENANT) {
                    Some(t) if t.version == version && t.module_hash == module_hash => Ok(()),
                    other => Err(format!("{other:?}")),
                }
            },
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn upgrade_to_kv2_under_concurrent_writes_keeps_every_acknowledged_put() {
    let cluster = Cluster::start(3).await;
    let leader = cluster.leader().await;
    let ids = cluster.ids();
    let follower = ids.iter().copied().find(|&id| id != leader).unwrap();
    let kv1 = cluster.deploy(leader, TENANT, "kv").await;

    // kv v1 has no `count`: its answer after the switch is proof that kv2 took over.
    match cluster
        .query(
            leader,
            TENANT,
            &json!({"op": "count"}),
            Consistency::Linearizable,
        )
        .await
    {
        QueryOutcome::ModuleError {
            kind: Kind::Rejected,
            ..
        } => {}
        other => panic!("count under kv v1: expected a REJECTED module error, got {other}"),
    }

    let progress = Arc::new(Progress {
        switch_index: AtomicU64::new(u64::MAX),
        ..Default::default()
    });
    let mut writers = JoinSet::new();
    for w in 0..WRITERS {
        let node = ids[w % ids.len()];
        writers.spawn(writer(w, node, cluster.client(node), progress.clone()));
    }
    wait_count(&progress.acks, ACKS_BEFORE, "puts acknowledged by kv v1").await;

    // The redeploy, through a follower (forwarded to the leader) while the writers keep going.
    let kv2 = cluster.deploy(follower, TENANT, "kv2").await;
    assert_eq!(kv2.module_hash, sha256_hex(&plugin_bytes("kv2")));
    assert!(kv2.index > kv1.index);
    progress.switch_index.store(kv2.index, Ordering::SeqCst);
    wait_count(
        &progress.acks_after_switch,
        ACKS_AFTER,
        "puts acknowledged by kv2 (at an index after the switch)",
    )
    .await;
    progress.stop.store(true, Ordering::SeqCst);
    let mut acks = vec![Acks::new(); WRITERS];
    within(Duration::from_secs(120), "writers to stop", async {
        while let Some(done) = writers.join_next().await {
            let (w, writer_acks) = done.expect("a writer failed");
            acks[w] = writer_acks;
        }
    })
    .await;

    let all: Vec<(&String, u64)> = acks
        .iter()
        .flat_map(|a| a.iter().map(|(k, (_, index))| (k, *index)))
        .collect();
    let total = all.len();
    let before = all.iter().filter(|(_, i)| *i < kv2.index).count();
    let last_index = all.iter().map(|(_, i)| *i).max().unwrap_or(0);
    eprintln!(
        "{total} puts acknowledged: {before} by kv v1, {} by kv2 (switch at index {}); last \
         index {last_index}",
        total - before,
        kv2.index
    );
    assert!(
        before >= ACKS_BEFORE,
        "only {before} puts before the switch"
    );
    assert!(
        total - before >= ACKS_AFTER,
        "only {} puts after the switch",
        total - before
    );

    // Through kv2: linearizable reads through the leader and a follower, then every replica's
    // own state once it has applied the last acknowledged put.
    for via in [leader, follower] {
        check_every_put(&cluster, via, &acks, Consistency::Linearizable).await;
        let count = ask(
            &cluster,
            via,
            json!({"op": "count"}),
            Consistency::Linearizable,
        )
        .await;
        assert_eq!(
            count,
            json!({ "count": total }),
            "kv2's count through node {via}"
        );
    }
    for &id in &ids {
        cluster.wait_applied(id, last_index).await;
        check_every_put(&cluster, id, &acks, Consistency::Stale).await;
    }

    // Keys taken over from v1 start at version 1; a write on kv2 moves them on.
    let (old_key, _) = all
        .iter()
        .find(|(_, i)| *i < kv2.index)
        .expect("a put acknowledged by v1");
    let version = |key: &str| json!({"op": "version", "key": key});
    assert_eq!(
        ask(
            &cluster,
            leader,
            version(old_key),
            Consistency::Linearizable
        )
        .await,
        json!({"version": 1}),
        "version of {old_key}, written under kv v1"
    );
    let (index, _) = cluster
        .exec_ok(
            leader,
            TENANT,
            &json!({"op": "put", "key": old_key, "value": "again"}),
        )
        .await;
    assert_eq!(
        ask(
            &cluster,
            leader,
            version(old_key),
            Consistency::Linearizable
        )
        .await,
        json!({"version": 2}),
        "version of {old_key} after a put under kv2"
    );

    wait_tenant_version(&cluster, 2, &kv2.module_hash).await;
    let digest = cluster.wait_digests_agree(&ids, TENANT, index).await;
    assert_eq!(digest.module_hash, kv2.module_hash, "the digest's module");
}

/// Puts `keys` through `via`, each one `writes` times (so its kv2 version is `writes`).
async fn put_keys(cluster: &Cluster, via: NodeId, keys: &[String], writes: usize) -> u64 {
    let mut last = 0;
    for key in keys {
        for n in 0..writes {
            let put = json!({"op": "put", "key": key, "value": format!("{key}={n}")});
            last = cluster.exec_ok(via, TENANT, &put).await.0;
        }
    }
    last
}

/// Every key of `expected` has its value and version on every node (stale reads, after the
/// node applied `index`), and the replicas' digests agree.
async fn check_keys(cluster: &Cluster, expected: &BTreeMap<String, (String, u64)>, index: u64) {
    let ids = cluster.ids();
    for &id in &ids {
        cluster.wait_applied(id, index).await;
        let seen = scan(cluster, id, "", Consistency::Stale).await;
        let want: BTreeMap<String, String> = expected
            .iter()
            .map(|(k, (v, _))| (k.clone(), v.clone()))
            .collect();
        assert_eq!(seen, want, "node {id}'s keys and values");
        for (key, (_, version)) in expected {
            let got = ask(
                cluster,
                id,
                json!({"op": "version", "key": key}),
                Consistency::Stale,
            )
            .await;
            assert_eq!(
                got,
                json!({ "version": version }),
                "node {id}: version of {key}"
            );
        }
    }
    cluster.wait_digests_agree(&ids, TENANT, index).await;
}

/// Kills a node with SIGKILL and starts it again: it comes back from its checkpoint plus the
/// log.
async fn crash_and_restart(cluster: &Cluster, id: NodeId) {
    cluster.kill(id).await;
    cluster.restart(id);
    cluster.leader().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redeploying_kv2_keeps_every_key_and_rolling_back_to_kv_keeps_them_too() {
    let cluster = Cluster::start(3).await;
    let leader = cluster.leader().await;
    let followers: Vec<NodeId> = cluster
        .ids()
        .into_iter()
        .filter(|&id| id != leader)
        .collect();
    cluster.deploy(leader, TENANT, "kv").await;
    let v1_keys: Vec<String> = (0..40).map(|i| format!("old-{i:02}")).collect();
    put_keys(&cluster, leader, &v1_keys, 1).await;

    // v1 → kv2, then writes that only kv2 can record (versions above 1).
    let kv2 = cluster.deploy(leader, TENANT, "kv2").await;
    let v2_keys: Vec<String> = (0..20).map(|i| format!("new-{i:02}")).collect();
    put_keys(&cluster, leader, &v2_keys, 3).await;
    let mut expected: BTreeMap<String, (String, u64)> = v1_keys
        .iter()
        .map(|k| (k.clone(), (format!("{k}=0"), 1)))
        .chain(v2_keys.iter().map(|k| (k.clone(), (format!("{k}=2"), 3))))
        .collect();
    let index = put_keys(&cluster, leader, &v1_keys[..5], 2).await;
    for key in &v1_keys[..5] {
        // One write under v1 (version 1 once migrated), two more under kv2.
        expected.insert(key.clone(), (format!("{key}=1"), 3));
    }
    // This follower's newest checkpoint is the one written at the upgrade: kv v1's snapshot
    // under kv2's module. Its restart restores kv2 from v1's format, then replays the puts.
    crash_and_restart(&cluster, followers[0]).await;
    check_keys(&cluster, &expected, index).await;
    wait_tenant_version(&cluster, 2, &kv2.module_hash).await;

    // kv2 → kv2: the same module again. restore gets kv2's own format, so the versions survive
    // (migrating from v1's format would have reset them all to 1).
    let again = cluster.deploy(followers[1], TENANT, "kv2").await;
    assert_eq!(again.module_hash, kv2.module_hash);
    wait_tenant_version(&cluster, 3, &kv2.module_hash).await;
    check_keys(&cluster, &expected, again.index).await;
    let index = put_keys(&cluster, leader, &v2_keys[..1], 1).await;
    expected.insert(v2_keys[0].clone(), (format!("{}=0", v2_keys[0]), 4));
    crash_and_restart(&cluster, followers[1]).await;
    check_keys(&cluster, &expected, index).await;

    // A module that cannot read the state: counter's restore refuses kv2's snapshot, so the
    // deploy fails on every replica alike and the tenant stays on kv2, every key in place.
    let leader = cluster.leader().await;
    let refused = cluster
        .deploy_bytes(leader, TENANT, plugin_bytes("counter"))
        .await
        .expect_err("counter cannot restore kv2's snapshot: the upgrade must fail");
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(
        refused.message().contains("restore failed"),
        "the refusal should say the new version's restore failed: {refused:?}"
    );
    wait_tenant_version(&cluster, 3, &kv2.module_hash).await;
    let count = ask(
        &cluster,
        leader,
        json!({"op": "count"}),
        Consistency::Linearizable,
    )
    .await;
    assert_eq!(
        count,
        json!({ "count": expected.len() }),
        "count after the refused upgrade"
    );
    let index = cluster
        .exec_ok(leader, TENANT, &json!({"op": "delete", "key": "old-39"}))
        .await
        .0;
    expected.remove("old-39");
    check_keys(&cluster, &expected, index).await;

    // Rollback to version 1 (kv), asked of a follower: kv's restore reads kv2's snapshot, so
    // every key keeps its value (kv keeps no versions), and kv runs as version 4.
    let kv = cluster
        .rollback(followers[0], TENANT, 1)
        .await
        .expect("rolling back to kv");
    wait_tenant_version(&cluster, 4, &kv.module_hash).await;
    let unknown = cluster
        .rollback(leader, TENANT, 9)
        .await
        .expect_err("no version 9");
    assert!(
        unknown.message().contains("never ran a version 9"),
        "{unknown:?}"
    );
    for id in cluster.ids() {
        for (key, (value, _)) in &expected {
            let got = ask(
                &cluster,
                id,
                json!({"op": "get", "key": key}),
                Consistency::Linearizable,
            )
            .await;
            assert_eq!(
                got,
                json!({ "value": value }),
                "{key} on node {id} after the rollback"
            );
        }
    }
    cluster.wait_digests_agree(&cluster.ids(), TENANT, 0).await;
}
