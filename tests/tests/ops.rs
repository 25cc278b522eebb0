//! Operating a node: `/metrics` is valid Prometheus text whose counters move with traffic, and
//! SIGTERM under load answers every pending request, loses no acknowledged write and hands
//! leadership over. Nodes here are started with their own arguments (metrics ports), as real
//! processes.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::process::Child;
use wraft_proto::client::exec_response;
use wraft_proto::client::pipeline_request::Call;
use wraft_proto::client::pipeline_response::Answer;
use wraft_proto::client::{Consistency, QueryRequest, Role, StatusRequest};
use wraft_tests::cluster::{connect, exec_on, exec_request, Cluster};
use wraft_tests::outcome::ExecOutcome;
use wraft_tests::paths::plugin_bytes;
use wraft_tests::pipeline::Pipeline;
use wraft_tests::wait::{wait_until, within};

fn free_ports(n: usize) -> Vec<u16> {
    let held: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind a free port"))
        .collect();
    held.iter()
        .map(|l| l.local_addr().expect("local addr").port())
        .collect()
}

/// Nodes started by hand: id → (client port, metrics port, process).
struct Nodes {
    dir: tempfile::TempDir,
    peers: String,
    ports: BTreeMap<u64, (u16, u16)>,
    procs: BTreeMap<u64, Child>,
    env: Vec<(String, String)>,
}

impl Nodes {
    fn start(n: u64) -> Nodes {
        Nodes::start_env(n, Vec::new())
    }

    fn start_env(n: u64, env: Vec<(String, String)>) -> Nodes {
        let dir = tempfile::tempdir().expect("temp dir");
        let ports = free_ports(2 * n as usize);
        let ports: BTreeMap<u64, (u16, u16)> = (1..=n)
            .map(|id| {
                let i = (id - 1) as usize * 2;
                (id, (ports[i], ports[i + 1]))
            })
            .collect();
        let peers = ports
            .iter()
            .map(|(id, (p, _))| format!("{id}=127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut nodes = Nodes {
            dir,
            peers,
            ports,
            procs: BTreeMap::new(),
            env,
        };
        for id in 1..=n {
            nodes.spawn(id);
        }
        nodes
    }

    fn spawn(&mut self, id: u64) {
        let (port, metrics) = self.ports[&id];
        let args: Vec<String> = [
            "serve",
            "--id",
            &id.to_string(),
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--data-dir",
            &self
                .dir
                .path()
                .join(format!("node-{id}"))
                .display()
                .to_string(),
            "--peers",
            &self.peers,
            "--metrics-listen",
            &format!("127.0.0.1:{metrics}"),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let log = self.log_path(id);
        let child = Cluster::spawn_wraft_env(&args, &log, &format!("node {id}"), &self.env);
        self.procs.insert(id, child);
    }

    fn log_path(&self, id: u64) -> std::path::PathBuf {
        self.dir.path().join(format!("node-{id}.log"))
    }

    fn log(&self, id: u64) -> String {
        std::fs::read_to_string(self.log_path(id)).unwrap_or_default()
    }

    async fn leader(&self) -> u64 {
        let ids: Vec<u64> = self.procs.keys().copied().collect();
        let ports = self.ports.clone();
        wait_until(
            Duration::from_secs(30),
            "one leader known by every node",
            || {
                let ids = ids.clone();
                let ports = ports.clone();
                async move {
                    let mut leaders = Vec::new();
                    for id in &ids {
                        let status = connect(ports[id].0)
                            .status(StatusRequest {})
                            .await
                            .map_err(|e| format!("node {id}: {}", e.message()))?
                            .into_inner();
                        leaders.push(status.leader_id);
                        if status.role == Role::Leader as i32 && status.leader_id != *id {
                            return Err(format!("node {id} leads but names {}", status.leader_id));
                        }
                    }
                    match leaders.first() {
                        Some(&l) if l != 0 && leaders.iter().all(|x| *x == l) => Ok(l),
                        _ => Err(format!("leaders seen: {leaders:?}")),
                    }
                }
            },
        )
        .await
    }

    /// Sends SIGTERM and waits for the process to exit; returns its exit code.
    async fn terminate(&mut self, id: u64) -> Option<i32> {
        let child = self.procs.get_mut(&id).expect("a running node");
        let pid = child.id().expect("a live pid");
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(sent.success(), "kill -TERM {pid} failed");
        let status = within(
            Duration::from_secs(20),
            "a node stopping after SIGTERM",
            child.wait(),
        )
        .await
        .expect("wait for the node");
        self.procs.remove(&id);
        status.code()
    }
}

impl Drop for Nodes {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for id in self.ports.keys() {
                let log = self.log(*id);
                let tail: Vec<&str> = log.lines().rev().take(60).collect();
                eprintln!("---- node {id} log (last lines) ----");
                for line in tail.iter().rev() {
                    eprintln!("{line}");
                }
            }
        }
        for child in self.procs.values_mut() {
            let _ = child.start_kill();
        }
    }
}

/// Parses the Prometheus text format strictly enough to catch malformed output: every sample
/// line is `name{labels} value` with a float value, and every family has HELP and TYPE.
fn parse_prometheus(text: &str) -> BTreeMap<String, f64> {
    let mut samples = BTreeMap::new();
    let mut typed = std::collections::BTreeSet::new();
    for line in text.lines() {
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            let name = parts.next().expect("a TYPE line names a metric");
            let kind = parts.next().expect("a TYPE line has a type");
            assert!(
                ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                "bad type in {line:?}"
            );
            typed.insert(name.to_string());
            continue;
        }
        if line.starts_with("# HELP ") {
            continue;
        }
        assert!(!line.starts_with('#'), "unknown comment line {line:?}");
        let (series, value) = line.rsplit_once(' ').expect("a sample has a value");
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("sample value not a number in {line:?}"));
        let name = series.split('{').next().expect("a metric name");
        assert!(
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name in {line:?}"
        );
        if let Some(labels) = series.strip_prefix(name) {
            if !labels.is_empty() {
                assert!(
                    labels.starts_with('{') && labels.ends_with('}'),
                    "bad labels in {line:?}"
                );
            }
        }
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|f| typed.contains(*f)))
            .unwrap_or(name);
        assert!(typed.contains(family), "sample {line:?} has no TYPE line");
        samples.insert(series.to_string(), value);
    }
    samples
}

fn sample(samples: &BTreeMap<String, f64>, series: &str) -> f64 {
    samples.get(series).copied().unwrap_or(0.0)
}

async fn put(port: u16, tenant: &str, key: &str, value: &str) {
    let cmd = serde_json::json!({"op": "put", "key": key, "value": value});
    let request = exec_request(tenant, cmd.to_string().into_bytes(), "", 0);
    exec_on(&mut connect(port), request, "put")
        .await
        .expect_ok("put");
}

#[tokio::test]
async fn metrics_parse_and_counters_move_with_traffic() {
    let nodes = Nodes::start(1);
    nodes.leader().await;
    let (port, metrics) = nodes.ports[&1];
    let mut client = connect(port);
    client
        .deploy(wraft_proto::client::DeployRequest {
            tenant: "m".into(),
            wasm: plugin_bytes("kv"),
            rollback_to_version: 0,
        })
        .await
        .expect("deploy kv");
    for i in 0..5 {
        put(port, "m", &format!("k{i}"), "v").await;
    }
    let before = parse_prometheus(&wraft_tests::scrape_metrics(metrics).await.expect("scrape"));
    let applies = "wraft_wasm_applies_total{tenant=\"m\"}";
    let execs = "wraft_grpc_requests_total{code=\"Ok\",method=\"exec\"}";
    assert!(
        sample(&before, applies) >= 5.0,
        "applies after 5 puts: {before:?}"
    );
    assert!(
        sample(&before, execs) >= 5.0,
        "exec requests after 5 puts: {before:?}"
    );
    assert_eq!(sample(&before, "wraft_raft_is_leader"), 1.0);
    assert!(
        sample(
            &before,
            "wraft_storage_write_seconds_count{synced=\"true\"}"
        ) >= 1.0
    );

    for i in 0..7 {
        put(port, "m", &format!("k{i}"), "w").await;
    }
    let after = parse_prometheus(&wraft_tests::scrape_metrics(metrics).await.expect("scrape"));
    assert_eq!(sample(&after, applies) - sample(&before, applies), 7.0);
    assert_eq!(sample(&after, execs) - sample(&before, execs), 7.0);
    assert!(
        sample(&after, "wraft_raft_applied_index") > sample(&before, "wraft_raft_applied_index")
    );
}

#[tokio::test]
async fn sigterm_under_load_answers_everything_and_loses_nothing() {
    let mut nodes = Nodes::start(3);
    let leader = nodes.leader().await;
    let ports: Vec<u16> = nodes.ports.values().map(|(p, _)| *p).collect();
    let first = nodes.ports[&leader].0;
    connect(first)
        .deploy(wraft_proto::client::DeployRequest {
            tenant: "c".into(),
            wasm: plugin_bytes("counter"),
            rollback_to_version: 0,
        })
        .await
        .expect("deploy counter");

    let acked = Arc::new(AtomicU64::new(0));
    let unknown = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut clients = Vec::new();
    for c in 0..6usize {
        let (acked, unknown, stop, ports) =
            (acked.clone(), unknown.clone(), stop.clone(), ports.clone());
        clients.push(tokio::spawn(async move {
            let mut n = 0usize;
            while !stop.load(Ordering::Relaxed) && n < 2000 {
                let port = ports[(c + n) % ports.len()];
                n += 1;
                let cmd = serde_json::json!({"op": "add", "n": 1});
                let mut request =
                    tonic::Request::new(exec_request("c", cmd.to_string().into_bytes(), "", 0));
                request.set_timeout(Duration::from_secs(10));
                // Every call must come back: the test fails if one hangs past its deadline.
                let result = within(
                    Duration::from_secs(20),
                    "an exec during SIGTERM",
                    connect(port).exec(request),
                )
                .await;
                match ExecOutcome::from_result(result) {
                    ExecOutcome::Ok { .. } => {
                        acked.fetch_add(1, Ordering::Relaxed);
                    }
                    ExecOutcome::Definite(_) => {}
                    ExecOutcome::ModuleError { message, .. } => panic!("add rejected: {message}"),
                    ExecOutcome::Indeterminate(_) | ExecOutcome::Unclassified(_) => {
                        unknown.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    // And one client on a `Pipeline` stream, which the stopping node must end (answering
    // what is in flight) rather than hold its shutdown open for; the client then goes on
    // through the next node.
    {
        let (acked, unknown, stop, ports) =
            (acked.clone(), unknown.clone(), stop.clone(), ports.clone());
        let first = ports.iter().position(|&p| p == first).unwrap_or(0);
        clients.push(tokio::spawn(async move {
            let mut n = first;
            let mut id = 0u64;
            while !stop.load(Ordering::Relaxed) && id < 4000 {
                let port = ports[n % ports.len()];
                n += 1;
                let what = format!("a pipeline to port {port} during SIGTERM");
                let Ok(mut pipe) = Pipeline::open(&mut connect(port), None, &what).await else {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                };
                while !stop.load(Ordering::Relaxed) && id < 4000 {
                    id += 1;
                    let cmd = serde_json::json!({"op": "add", "n": 1});
                    pipe.send(
                        id,
                        Some(Call::Exec(exec_request(
                            "c",
                            cmd.to_string().into_bytes(),
                            "",
                            0,
                        ))),
                    );
                    match pipe.next().await {
                        Ok(Some((got, Answer::Exec(resp)))) if got == id => match resp.outcome {
                            Some(exec_response::Outcome::Output(_)) => {
                                acked.fetch_add(1, Ordering::Relaxed);
                            }
                            other => panic!("{what}: add {id} gave {other:?}"),
                        },
                        Ok(Some((got, Answer::Failure(f)))) if got == id => {
                            if f.outcome != "definite" {
                                unknown.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Ok(Some(other)) => panic!("{what}: add {id} was answered {other:?}"),
                        // The stream ended (the node is stopping) or broke with the call
                        // in flight: it may have been applied.
                        Ok(None) | Err(_) => {
                            unknown.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                    }
                }
            }
        }));
    }
    wait_until(
        Duration::from_secs(30),
        "some acknowledged adds before the SIGTERM",
        || {
            let acked = acked.clone();
            async move {
                match acked.load(Ordering::Relaxed) {
                    n if n >= 50 => Ok(()),
                    n => Err(format!("{n} acknowledged")),
                }
            }
        },
    )
    .await;
    let code = nodes.terminate(leader).await;
    assert_eq!(code, Some(0), "a node stopped by SIGTERM exits 0");
    assert!(
        nodes.log(leader).contains("transferring leadership"),
        "the stopping leader hands leadership over"
    );
    assert!(
        !nodes.log(leader).contains("shutdown grace period"),
        "nothing held the stop open past its grace period (an open pipeline must end)"
    );
    // The survivors keep taking writes while the stopped node is down.
    let survivors: Vec<u64> = nodes.procs.keys().copied().collect();
    let before = acked.load(Ordering::Relaxed);
    wait_until(
        Duration::from_secs(30),
        "writes acknowledged after the SIGTERM",
        || {
            let acked = acked.clone();
            async move {
                match acked.load(Ordering::Relaxed) {
                    n if n >= before + 20 => Ok(()),
                    n => Err(format!("{n} acknowledged, {before} before the stop")),
                }
            }
        },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.expect("a client task");
    }
    nodes.spawn(leader);
    let new_leader = nodes.leader().await;
    assert!(survivors.contains(&new_leader) || new_leader == leader);

    let acked = acked.load(Ordering::Relaxed);
    let unknown = unknown.load(Ordering::Relaxed);
    let read = connect(nodes.ports[&new_leader].0)
        .query(QueryRequest {
            tenant: "c".into(),
            query: br#"{"op":"get"}"#.to_vec(),
            consistency: Consistency::Linearizable as i32,
        })
        .await
        .expect("read the counter")
        .into_inner();
    let value = match read.outcome {
        Some(wraft_proto::client::query_response::Outcome::Output(out)) => {
            serde_json::from_slice::<serde_json::Value>(&out).expect("json")["value"]
                .as_u64()
                .expect("a number")
        }
        other => panic!("query failed: {other:?}"),
    };
    assert!(
        value >= acked && value <= acked + unknown,
        "counter {value}: acknowledged {acked}, indeterminate {unknown}"
    );
    // The restarted node catches up to the same value.
    let port = nodes.ports[&leader].0;
    wait_until(
        Duration::from_secs(30),
        "the restarted node to catch up",
        || async move {
            let r = connect(port)
                .query(QueryRequest {
                    tenant: "c".into(),
                    query: br#"{"op":"get"}"#.to_vec(),
                    consistency: Consistency::Stale as i32,
                })
                .await
                .map_err(|e| e.message().to_string())?
                .into_inner();
            match r.outcome {
                Some(wraft_proto::client::query_response::Outcome::Output(out))
                    if out == format!("{{\"value\":{value}}}").into_bytes() =>
                {
                    Ok(())
                }
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
}

#[tokio::test]
async fn a_request_id_follows_a_request_across_nodes() {
    let nodes = Nodes::start_env(3, vec![("RUST_LOG".into(), "info,wraft=debug".into())]);
    let leader = nodes.leader().await;
    let follower = nodes
        .ports
        .keys()
        .copied()
        .find(|id| *id != leader)
        .expect("a follower");
    let port = nodes.ports[&follower].0;
    connect(port)
        .deploy(wraft_proto::client::DeployRequest {
            tenant: "r".into(),
            wasm: plugin_bytes("kv"),
            rollback_to_version: 0,
        })
        .await
        .expect("deploy kv");
    // A malformed command: the module rejects it, which every replica logs at debug level with
    // the request id, so the id must reach every node through the log entry.
    let mut request = tonic::Request::new(exec_request("r", b"not json".to_vec(), "", 0));
    request
        .metadata_mut()
        .insert("wraft-request-id", "trace-me-42".parse().expect("metadata"));
    let outcome = ExecOutcome::from_result(connect(port).exec(request).await);
    assert!(
        matches!(outcome, ExecOutcome::ModuleError { .. }),
        "{outcome:?}"
    );
    let ids: Vec<u64> = nodes.ports.keys().copied().collect();
    for id in ids {
        let what = format!("node {id}'s log to mention the request id");
        wait_until(Duration::from_secs(15), &what, || {
            let log = nodes.log(id);
            async move {
                if log.contains("trace-me-42") {
                    Ok(())
                } else {
                    Err("not yet".to_string())
                }
            }
        })
        .await;
    }
    assert!(
        nodes.log(follower).contains("request_id=trace-me-42"),
        "the follower's request span carries the id"
    );
}

#[tokio::test]
async fn tenant_lifecycle_list_upgrade_delete() {
    let nodes = Nodes::start(1);
    nodes.leader().await;
    let (port, _) = nodes.ports[&1];
    let endpoint = format!("127.0.0.1:{port}");
    let kv = wraft_tests::paths::plugin_path("kv");
    let kv = kv.display().to_string();
    let list = || async {
        let out = wraft_tests::run_cli(&["tenants", "--endpoints", &endpoint, "--json"], &[]).await;
        out.expect_code(0, "wraft tenants");
        out.stdout
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("a JSON line"))
            .collect::<Vec<_>>()
    };
    let get_a = || async {
        let args = [
            "query",
            "--endpoints",
            &endpoint,
            "--tenant",
            "shop",
            r#"{"op":"get","key":"a"}"#,
        ];
        wraft_tests::run_cli(&args, &[]).await
    };
    assert!(list().await.is_empty(), "no tenants before a deploy");
    wraft_tests::run_cli(
        &["deploy", "--endpoints", &endpoint, "--tenant", "shop", &kv],
        &[],
    )
    .await
    .expect_code(0, "deploy");
    put(port, "shop", "a", "1").await;
    let first = list().await;
    assert_eq!(first.len(), 1, "{first:?}");
    assert_eq!(first[0]["name"], "shop");
    assert_eq!(first[0]["version"], 1);
    assert!(
        first[0]["state_bytes"].as_u64().unwrap_or(0) > 0,
        "{first:?}"
    );
    // Deploying the same tenant again is an upgrade: the state flows through snapshot/restore.
    wraft_tests::run_cli(
        &["deploy", "--endpoints", &endpoint, "--tenant", "shop", &kv],
        &[],
    )
    .await
    .expect_code(0, "upgrade");
    let second = list().await;
    assert_eq!(second[0]["version"], 2, "{second:?}");
    let read = get_a().await;
    read.expect_code(0, "query after the upgrade");
    assert_eq!(read.stdout.trim(), r#"{"value":"1"}"#);

    // Delete: gone from the list, commands are refused, and it stays gone after a restart.
    wraft_tests::run_cli(
        &["delete", "--endpoints", &endpoint, "--tenant", "shop"],
        &[],
    )
    .await
    .expect_code(0, "delete");
    assert!(list().await.is_empty(), "no tenants after the delete");
    let exec = wraft_tests::run_cli(
        &[
            "exec",
            "--endpoints",
            &endpoint,
            "--tenant",
            "shop",
            r#"{"op":"get","key":"a"}"#,
        ],
        &[],
    )
    .await;
    exec.expect_code(3, "exec on a deleted tenant");
    assert!(exec.stderr.contains("does not exist"), "{}", exec.stderr);
    let mut nodes = nodes;
    assert_eq!(nodes.terminate(1).await, Some(0));
    nodes.spawn(1);
    nodes.leader().await;
    assert!(list().await.is_empty(), "still deleted after a restart");
    // A new tenant of the same name starts from scratch.
    wraft_tests::run_cli(
        &["deploy", "--endpoints", &endpoint, "--tenant", "shop", &kv],
        &[],
    )
    .await
    .expect_code(0, "deploy again");
    let read = get_a().await;
    read.expect_code(0, "query the new tenant");
    assert_eq!(read.stdout.trim(), r#"{"value":null}"#);
}

#[tokio::test]
async fn leader_transfer_moves_leadership_and_refuses_a_non_voter() {
    let nodes = Nodes::start(3);
    let leader = nodes.leader().await;
    let others: Vec<u64> = nodes
        .ports
        .keys()
        .copied()
        .filter(|id| *id != leader)
        .collect();
    let (via, target) = (others[0], others[1]);
    let via_endpoint = format!("127.0.0.1:{}", nodes.ports[&via].0);
    // Asked through a follower, which forwards to the leader.
    let out = wraft_tests::run_cli(
        &[
            "leader",
            "transfer",
            "--endpoints",
            &via_endpoint,
            "--to",
            &target.to_string(),
        ],
        &[],
    )
    .await;
    out.expect_code(0, "leader transfer --to");
    assert!(
        out.stdout.starts_with(&format!("leader {target} ")),
        "{}",
        out.stdout
    );
    assert_eq!(
        nodes.leader().await,
        target,
        "every node follows the new leader"
    );

    // Without --to, leadership moves to some other voter.
    let out =
        wraft_tests::run_cli(&["leader", "transfer", "--endpoints", &via_endpoint], &[]).await;
    out.expect_code(0, "leader transfer");
    assert_ne!(nodes.leader().await, target);

    let out = wraft_tests::run_cli(
        &[
            "leader",
            "transfer",
            "--endpoints",
            &via_endpoint,
            "--to",
            "99",
        ],
        &[],
    )
    .await;
    out.expect_code(3, "a transfer to a non-member");
    assert!(out.stderr.contains("not a voter"), "{}", out.stderr);
}
