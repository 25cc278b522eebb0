//! The `wraft` CLI end to end against a real cluster: deploy, exec, query, status --json and
//! digest, their exit codes, endpoints tried in order, and a dead endpoint in `status`.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{json, Value};
use wraft_tests::{plugin_bytes, plugin_path, run_cli, sha256_hex, wait_until, Cluster};

/// Parses `status --json` output: one JSON object per line.
fn status_lines(stdout: &str) -> Vec<Value> {
    stdout
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("status --json line is not JSON ({e}): {l:?}"))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cli_smoke() {
    let cluster = Cluster::start(3).await;
    let endpoints = cluster.endpoints();
    let e = endpoints.as_str();

    // deploy prints the module hash.
    let kv = plugin_path("kv");
    let out = run_cli(
        &[
            "deploy",
            "--endpoints",
            e,
            "--tenant",
            "kv",
            kv.to_str().unwrap(),
        ],
        &[],
    )
    .await;
    out.expect_code(0, "CLI deploy");
    let hash = sha256_hex(&plugin_bytes("kv"));
    assert!(
        out.stdout.contains(&hash),
        "CLI deploy should print the module hash {hash}: {out}"
    );

    // exec and query print the module's output.
    let out = run_cli(
        &[
            "exec",
            "--endpoints",
            e,
            "--tenant",
            "kv",
            r#"{"op":"put","key":"k","value":"v1"}"#,
        ],
        &[],
    )
    .await;
    out.expect_code(0, "CLI exec");
    assert_eq!(out.json(), json!({"prev": null}), "CLI exec output: {out}");
    let out = run_cli(
        &[
            "query",
            "--endpoints",
            e,
            "--tenant",
            "kv",
            r#"{"op":"get","key":"k"}"#,
        ],
        &[],
    )
    .await;
    out.expect_code(0, "CLI query");
    assert_eq!(
        out.json(),
        json!({"value": "v1"}),
        "CLI query output: {out}"
    );

    // A stale query on each node alone sees the write once that node has applied it.
    for id in cluster.ids() {
        let endpoint = cluster.endpoint(id);
        wait_until(
            Duration::from_secs(30),
            &format!("a stale CLI query on node {id} to see k"),
            || {
                let endpoint = endpoint.clone();
                async move {
                    let args = [
                        "query",
                        "--endpoints",
                        endpoint.as_str(),
                        "--tenant",
                        "kv",
                        "--consistency",
                        "stale",
                        r#"{"op":"get","key":"k"}"#,
                    ];
                    let out = run_cli(&args, &[]).await;
                    if out.code == 0 && out.json() == json!({"value": "v1"}) {
                        Ok(())
                    } else {
                        Err(out.to_string())
                    }
                }
            },
        )
        .await;
    }

    // status --json: one object per endpoint, one leader that everyone names.
    let out = run_cli(&["status", "--endpoints", e, "--json"], &[]).await;
    out.expect_code(0, "CLI status --json");
    let lines = status_lines(&out.stdout);
    assert_eq!(
        lines.len(),
        3,
        "status --json should print one line per endpoint: {out}"
    );
    for line in &lines {
        for field in [
            "id",
            "role",
            "leader",
            "term",
            "commit_index",
            "applied_index",
        ] {
            assert!(
                line.get(field).is_some(),
                "status --json line without {field}: {line}"
            );
        }
    }
    let ids: BTreeSet<u64> = lines
        .iter()
        .map(|l| l["id"].as_u64().expect("a numeric id"))
        .collect();
    assert_eq!(ids, BTreeSet::from([1, 2, 3]), "status --json ids: {out}");
    let leaders: Vec<u64> = lines
        .iter()
        .filter(|l| l["role"] == "leader")
        .map(|l| l["id"].as_u64().unwrap())
        .collect();
    let leader = cluster.leader().await;
    assert_eq!(leaders, vec![leader], "status --json leaders: {out}");
    for line in &lines {
        assert_eq!(
            line["leader"].as_u64(),
            Some(leader),
            "status --json line names another leader: {line}"
        );
    }

    // digest prints, for each endpoint, the same state hash the Digest RPC gives.
    let digest = cluster.wait_digests_agree(&cluster.ids(), "kv", 0).await;
    let out = run_cli(&["digest", "--endpoints", e, "--tenant", "kv"], &[]).await;
    out.expect_code(0, "CLI digest");
    assert_eq!(
        out.stdout.matches(&digest.state_hash).count(),
        3,
        "CLI digest should print {} once per endpoint: {out}",
        digest.state_hash
    );

    // Definite failures exit 3; usage errors exit 2.
    let out = run_cli(
        &[
            "exec",
            "--endpoints",
            e,
            "--tenant",
            "nope",
            r#"{"op":"get","key":"k"}"#,
        ],
        &[],
    )
    .await;
    out.expect_code(3, "CLI exec on an unknown tenant");
    assert!(
        !out.stderr.trim().is_empty(),
        "CLI exec on an unknown tenant should explain on stderr: {out}"
    );
    let out = run_cli(&["exec", "--no-such-flag"], &[]).await;
    out.expect_code(2, "CLI exec with an unknown flag");

    // A dead endpoint: listed by status with an error, skipped by exec (WRAFT_ENDPOINTS, in order).
    let dead = cluster.ids().into_iter().find(|&id| id != leader).unwrap();
    cluster.kill(dead).await;
    let out = run_cli(&["status", "--endpoints", e, "--json"], &[]).await;
    let lines = status_lines(&out.stdout);
    assert_eq!(
        lines.len(),
        3,
        "status --json with a dead endpoint should still print 3 lines: {out}"
    );
    let dead_endpoint = cluster.endpoint(dead);
    let dead_line = lines
        .iter()
        .find(|l| l["endpoint"] == dead_endpoint.as_str())
        .unwrap_or_else(|| {
            panic!("status --json has no line for dead endpoint {dead_endpoint}: {out}")
        });
    assert!(
        dead_line.get("error").is_some(),
        "the dead endpoint's line has no error: {dead_line}"
    );
    assert_eq!(
        lines.iter().filter(|l| l.get("id").is_some()).count(),
        2,
        "live endpoints in status --json: {out}"
    );

    let live: Vec<String> = cluster
        .live_ids()
        .into_iter()
        .map(|id| cluster.endpoint(id))
        .collect();
    let dead_first = format!("{dead_endpoint},{}", live.join(","));
    let out = run_cli(
        &[
            "exec",
            "--tenant",
            "kv",
            r#"{"op":"put","key":"k","value":"v2"}"#,
        ],
        &[("WRAFT_ENDPOINTS", dead_first.as_str())],
    )
    .await;
    out.expect_code(0, "CLI exec with a dead first endpoint (WRAFT_ENDPOINTS)");
    assert_eq!(out.json(), json!({"prev": "v1"}), "CLI exec output: {out}");
}

/// `wraft status | head -1`: a reader that stops reading ends the CLI quietly (141, as for a
/// tool killed by SIGPIPE), never with a panic and a backtrace.
#[test]
fn a_closed_stdout_ends_the_cli_quietly() {
    use std::process::{Command, Stdio};
    // No node listens there: status still prints its header and a line for the endpoint.
    let mut child = Command::new(wraft_tests::wraft_bin())
        .args(["status", "--endpoints", "127.0.0.1:1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start wraft");
    // Close the reading end before the CLI has printed anything (it connects first).
    drop(child.stdout.take());
    let out = child.wait_with_output().expect("wait for wraft");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("panicked"),
        "wraft panicked on a closed stdout: {stderr}"
    );
    assert_ne!(
        out.status.code(),
        Some(101),
        "wraft ended as a panicking Rust program does: {stderr}"
    );
}

/// `wraft bench` drives a real cluster through either API and accounts for every request: with
/// `--ops N` exactly N are sent, all succeed on a healthy cluster, and the writes are really
/// applied (the last sequential key reads back).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bench_runs_its_ops_through_either_api() {
    let cluster = Cluster::start(3).await;
    let endpoints = cluster.endpoints();
    let kv = plugin_path("kv");
    let kv = kv.to_str().expect("a UTF-8 plugin path");
    for (api, tenant) in [("unary", "b1"), ("pipeline", "b2")] {
        // Every key written once, in order, by 8 loops: then a mix of reads and writes.
        let load = run_cli(
            &[
                "bench",
                "--endpoints",
                &endpoints,
                "--tenant",
                tenant,
                "--deploy",
                kv,
                "--api",
                api,
                "--clients",
                "8",
                "--ops",
                "400",
                "--keys",
                "400",
                "--sequential-keys",
                "--json",
            ],
            &[],
        )
        .await;
        load.expect_code(0, &format!("bench --api {api} (load)"));
        let report = load.json();
        assert_eq!(report["config"]["api"], json!(api), "{report}");
        assert_eq!(report["ops"], json!(400), "{report}");
        assert_eq!(report["ok"], json!(400), "{report}");
        assert_eq!(report["writes"]["ok"], json!(400), "{report}");

        let mixed = run_cli(
            &[
                "bench",
                "--endpoints",
                &endpoints,
                "--tenant",
                tenant,
                "--api",
                api,
                "--clients",
                "16",
                "--ops",
                "600",
                "--keys",
                "400",
                "--read-ratio",
                "0.5",
                "--json",
            ],
            &[],
        )
        .await;
        mixed.expect_code(0, &format!("bench --api {api} (mixed)"));
        let report = mixed.json();
        assert_eq!(report["ok"], json!(600), "{report}");
        let reads = report["reads"]["ok"].as_u64().expect("a read count");
        let writes = report["writes"]["ok"].as_u64().expect("a write count");
        assert_eq!(reads + writes, 600, "{report}");
        assert!(reads > 0 && writes > 0, "a 50% mix did both: {report}");

        let got = cluster
            .query(
                cluster.leader().await,
                tenant,
                &json!({"op": "get", "key": "k399"}),
                wraft_tests::api::Consistency::Linearizable,
            )
            .await;
        match got {
            wraft_tests::QueryOutcome::Ok { output, .. } => {
                let value = wraft_tests::json(&output);
                assert!(
                    value["value"].is_string(),
                    "{tenant}: k399 was written: {value}"
                );
            }
            other => panic!("{tenant}: reading k399 back gave {other}"),
        }
    }
}
