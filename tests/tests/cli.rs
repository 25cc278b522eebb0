//! The `wraft` CLI end to end against a real cluster: deploy, exec, query, status --json and
//! digest, their exit codes, endpoints tried in order, and a dead endpoint in `status`.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{json, Value};
use wraft_tests::{
    plugin_bytes, plugin_path, run_cli, run_cli_with_input, sha256_hex, wait_until, Cluster,
};

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

/// `wraft exec --stdin`: a command per line, pipelined; the outputs come back one line each in
/// input order (a failed command's line empty, its error on stderr with its line number), and
/// the exit code says whether everything was applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exec_from_stdin_answers_every_line_in_order() {
    let cluster = Cluster::start(3).await;
    let leader = cluster.leader().await;
    cluster.deploy(leader, "lines", "kv").await;
    let endpoints = cluster.endpoints();
    let put = |i: usize, v: &str| format!(r#"{{"op":"put","key":"k{i}","value":"{v}{i}"}}"#);

    // 300 puts, the 150th of which the module rejects (no value).
    let mut input = String::new();
    for i in 1..=300 {
        if i == 150 {
            input.push_str("{\"op\":\"put\",\"key\":\"bad\"}\n");
        } else {
            input.push_str(&put(i, "a"));
            input.push('\n');
        }
    }
    let args = [
        "exec",
        "--endpoints",
        &endpoints,
        "--tenant",
        "lines",
        "--stdin",
    ];
    let out = run_cli_with_input(&args, &[], input.as_bytes()).await;
    out.expect_code(3, "exec --stdin with one rejected line");
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 300, "one output line per input line: {out}");
    for (n, line) in lines.iter().enumerate() {
        let expected = if n + 1 == 150 { "" } else { r#"{"prev":null}"# };
        assert_eq!(*line, expected, "output line {}: {out}", n + 1);
    }
    assert!(out.stderr.contains("line 150: error (rejected)"), "{out}");
    assert_eq!(out.stderr.lines().count(), 1, "only line 150 failed: {out}");

    // Again over the same keys, 64 at a time: each answer shows the value before it, so every
    // output line differs and must be its input line's, whatever order the answers came in.
    let mut again = String::new();
    for i in 1..=40 {
        again.push_str(&put(i, "b"));
        again.push('\n');
    }
    let out = run_cli_with_input(&args, &[], again.as_bytes()).await;
    out.expect_code(0, "exec --stdin over written keys");
    let lines: Vec<String> = out.stdout.lines().map(str::to_string).collect();
    let expected: Vec<String> = (1..=40).map(|i| format!(r#"{{"prev":"a{i}"}}"#)).collect();
    assert_eq!(lines, expected, "{out}");

    // One at a time, commands apply in input order: puts to one key each see the one before.
    let serial: String = (1..=20)
        .map(|i| format!("{{\"op\":\"put\",\"key\":\"one\",\"value\":\"c{i}\"}}\n"))
        .collect();
    let mut one_at_a_time = args.to_vec();
    one_at_a_time.extend(["--in-flight", "1"]);
    let out = run_cli_with_input(&one_at_a_time, &[], serial.as_bytes()).await;
    out.expect_code(0, "exec --stdin --in-flight 1");
    let lines: Vec<String> = out.stdout.lines().map(str::to_string).collect();
    let expected: Vec<String> = (1..=20)
        .map(|i| match i {
            1 => r#"{"prev":null}"#.to_string(),
            i => format!(r#"{{"prev":"c{}"}}"#, i - 1),
        })
        .collect();
    assert_eq!(lines, expected, "{out}");

    // A tenant that does not exist: every line is refused, nothing applied.
    let args = [
        "exec",
        "--endpoints",
        &endpoints,
        "--tenant",
        "ghost",
        "--stdin",
    ];
    let out = run_cli_with_input(&args, &[], again.as_bytes()).await;
    out.expect_code(3, "exec --stdin to an unknown tenant");
    assert_eq!(out.stdout.lines().count(), 40, "{out}");
    assert!(
        out.stderr
            .contains("line 40: error (NotFound, not applied)"),
        "{out}"
    );
}
