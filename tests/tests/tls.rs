//! TLS and configuration, end to end: a 3-node cluster with certificates from `wraft certs`
//! serves the CLI over TLS and forwards through followers; a node with a certificate from
//! another CA never joins; a plain-text client gets a clear error; `serve --config` files are
//! checked (unknown keys refused) and overridden by environment variables and flags.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use wraft_proto::client::wraft_client::WraftClient;
use wraft_tests::api::{Role, StatusRequest, StatusResponse};
use wraft_tests::cluster::ClusterOptions;
use wraft_tests::{
    plugin_path, run_cli, run_cli_with_input, wait_until, Cluster, NodeId, LEADER_TIMEOUT,
};

/// Runs `wraft certs --out DIR --nodes N` and returns DIR.
async fn make_certs(dir: &Path, name: &str, nodes: u32) -> PathBuf {
    let out = dir.join(name);
    let out_str = out.display().to_string();
    let nodes = nodes.to_string();
    run_cli(&["certs", "--out", &out_str, "--nodes", &nodes], &[])
        .await
        .expect_code(0, "wraft certs");
    out
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// A client TLS configuration trusting `certs/ca.pem`, presenting `certs/client.pem`.
fn client_tls(certs: &Path) -> ClientTlsConfig {
    ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read(&certs.join("ca.pem"))))
        .identity(Identity::from_pem(
            read(&certs.join("client.pem")),
            read(&certs.join("client-key.pem")),
        ))
}

/// A lazily connected TLS client of a node's API.
fn connect_tls(port: u16, tls: &ClientTlsConfig) -> WraftClient<Channel> {
    let channel = Endpoint::from_shared(format!("https://127.0.0.1:{port}"))
        .expect("a valid endpoint URI")
        .tls_config(tls.clone())
        .expect("a valid TLS configuration")
        .connect_timeout(Duration::from_secs(2))
        .connect_lazy();
    WraftClient::new(channel)
}

async fn status_tls(port: u16, tls: &ClientTlsConfig) -> Result<StatusResponse, String> {
    let mut client = connect_tls(port, tls);
    let call = client.status(StatusRequest {});
    match tokio::time::timeout(Duration::from_secs(5), call).await {
        Ok(Ok(r)) => Ok(r.into_inner()),
        Ok(Err(s)) => Err(format!("127.0.0.1:{port}: {:?} {}", s.code(), s.message())),
        Err(_) => Err(format!("127.0.0.1:{port}: Status did not answer")),
    }
}

/// Waits until the nodes `ids` all name the same leader, which is one of them; returns it.
async fn leader_tls(cluster: &Cluster, ids: &[NodeId], tls: &ClientTlsConfig) -> NodeId {
    wait_until(
        LEADER_TIMEOUT,
        &format!("one leader known by nodes {ids:?} over TLS"),
        || async {
            let mut leaders = Vec::new();
            for &id in ids {
                let s = status_tls(cluster.port(id), tls).await?;
                if s.leader_id == 0 || !ids.contains(&s.leader_id) {
                    return Err(format!("node {id} knows no leader among {ids:?}"));
                }
                leaders.push(s.leader_id);
            }
            leaders.dedup();
            match leaders[..] {
                [leader] => Ok(leader),
                _ => Err(format!("nodes disagree on the leader: {leaders:?}")),
            }
        },
    )
    .await
}

/// The environment that turns TLS on for every node: one node certificate shared by all
/// (it names 127.0.0.1 and the peer marker, which is all a node certificate must do).
fn tls_env(certs: &Path) -> Vec<(String, String)> {
    let path = |name: &str| certs.join(name).display().to_string();
    vec![
        ("WRAFT_TLS_CERT".into(), path("node-1.pem")),
        ("WRAFT_TLS_KEY".into(), path("node-1-key.pem")),
        ("WRAFT_TLS_CA".into(), path("ca.pem")),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tls_cluster_end_to_end() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let certs = make_certs(dir.path(), "certs", 1).await;
    let mut env = tls_env(&certs);
    // Clients must present a certificate too: the CLI below does.
    env.push(("WRAFT_CLIENT_CERT_REQUIRED".into(), "true".into()));
    let cluster = Cluster::launch_with(
        3,
        ClusterOptions {
            env,
            ..Default::default()
        },
    );
    let tls = client_tls(&certs);
    let leader = leader_tls(&cluster, &cluster.ids(), &tls).await;
    let follower = cluster
        .ids()
        .into_iter()
        .find(|&id| id != leader)
        .expect("a follower");
    let via = cluster.endpoint(follower);

    let ca = certs.join("ca.pem").display().to_string();
    let cert = certs.join("client.pem").display().to_string();
    let key = certs.join("client-key.pem").display().to_string();
    let tls_args = [
        "--ca",
        ca.as_str(),
        "--cert",
        cert.as_str(),
        "--key",
        key.as_str(),
    ];
    let cli = |args: &[&str]| {
        let mut all: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        all.extend(["--endpoints".to_string(), via.clone()]);
        all.extend(tls_args.iter().map(|a| a.to_string()));
        all
    };

    // Every write goes through the follower, which forwards to the leader over mutual TLS.
    let kv = plugin_path("kv").display().to_string();
    let args = cli(&["deploy", "--tenant", "kv", &kv]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run_cli(&args, &[]).await.expect_code(0, "deploy over TLS");
    let args = cli(&[
        "exec",
        "--tenant",
        "kv",
        r#"{"op":"put","key":"k","value":"v"}"#,
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run_cli(&args, &[]).await;
    out.expect_code(0, "exec over TLS");
    assert_eq!(out.json(), json!({"prev": null}), "{out}");
    let args = cli(&["query", "--tenant", "kv", r#"{"op":"get","key":"k"}"#]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run_cli(&args, &[]).await;
    out.expect_code(0, "linearizable query over TLS through a follower");
    assert_eq!(out.json(), json!({"value": "v"}), "{out}");
    // Many commands on one `Pipeline` stream, over the same mutual TLS.
    let args = cli(&["exec", "--tenant", "kv", "--stdin"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let input = "{\"op\":\"put\",\"key\":\"p1\",\"value\":\"1\"}\n{\"op\":\"put\",\"key\":\"k\",\"value\":\"w\"}\n";
    let out = run_cli_with_input(&args, &[], input.as_bytes()).await;
    out.expect_code(0, "exec --stdin over TLS");
    assert_eq!(out.stdout, "{\"prev\":null}\n{\"prev\":\"v\"}\n", "{out}");

    // The same options from the environment.
    let env = [
        ("WRAFT_CA", ca.as_str()),
        ("WRAFT_CERT", cert.as_str()),
        ("WRAFT_KEY", key.as_str()),
    ];
    let out = run_cli(&["status", "--json", "--endpoints", &via], &env).await;
    out.expect_code(0, "status with TLS from the environment");
    assert_eq!(out.json()["leader"], json!(leader), "{out}");

    // A client that trusts the CA but shows no certificate is refused (client certs required).
    let out = run_cli(
        &[
            "query",
            "--endpoints",
            &via,
            "--ca",
            &ca,
            "--tenant",
            "kv",
            "{}",
        ],
        &[],
    )
    .await;
    assert_ne!(
        out.code, 0,
        "a client without a certificate must fail: {out}"
    );

    // A plain-text client gets an error that points at TLS.
    let out = run_cli(&["query", "--endpoints", &via, "--tenant", "kv", "{}"], &[]).await;
    assert_ne!(
        out.code, 0,
        "plain text against a TLS node must fail: {out}"
    );
    assert!(
        out.stderr.contains("TLS") || out.stderr.contains("connect"),
        "the error should point at TLS or the connection: {out}"
    );
    assert!(
        cluster.log(leader).contains("security=\"TLS;"),
        "the node logs that it serves TLS"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_with_a_foreign_certificate_never_joins() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let certs = make_certs(dir.path(), "cluster", 1).await;
    let foreign = make_certs(dir.path(), "foreign", 1).await;
    let cluster = Cluster::launch_with(
        3,
        ClusterOptions {
            env: tls_env(&certs),
            ..Default::default()
        },
    );
    // Node 3 comes back with a certificate of another CA (flags beat the environment), while
    // trusting the cluster's CA: it can verify the others, they must refuse it.
    cluster.kill(3).await;
    // Whatever node 3 learned while it had the right certificate is wiped: it starts anew.
    match std::fs::remove_dir_all(cluster.data_dir(3)) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => panic!("wiping node 3's data: {e}"),
    }
    let mut args = cluster.serve_args(3);
    for (flag, file) in [
        ("--tls-cert", foreign.join("node-1.pem")),
        ("--tls-key", foreign.join("node-1-key.pem")),
        ("--tls-ca", certs.join("ca.pem")),
    ] {
        args.push(flag.into());
        args.push(file.display().to_string());
    }
    let log3 = cluster.dir().join("node-3-foreign.log");
    let _node3 = Cluster::spawn_wraft_env(&args, &log3, "node 3, foreign CA", &tls_env(&certs));

    let tls = client_tls(&certs);
    let leader = leader_tls(&cluster, &[1, 2], &tls).await;
    // The leader's heartbeats to node 3 are refused at the TLS handshake, and says so.
    wait_until(
        LEADER_TIMEOUT,
        "the leader to log that node 3's certificate was refused",
        || async {
            let log = cluster.log(leader);
            if log
                .lines()
                .any(|l| l.contains("TLS refused") && l.contains("peer=3"))
            {
                Ok(())
            } else {
                Err("no refusal logged yet".to_string())
            }
        },
    )
    .await;
    // Nodes 1 and 2 commit without node 3, which never hears of a leader.
    deploy_and_wait(&cluster, leader, &tls).await;
    let foreign_tls =
        ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(&foreign.join("ca.pem"))));
    let s3 = status_tls(cluster.port(3), &foreign_tls)
        .await
        .unwrap_or_else(|e| panic!("node 3's status: {e}"));
    assert_eq!(
        s3.leader_id, 0,
        "node 3 must never learn the leader: {s3:?}"
    );
    assert_ne!(s3.role, Role::Leader as i32, "{s3:?}");
    assert!(
        s3.commit_index <= 3,
        "node 3 must commit nothing beyond its bootstrap entries (one per initial voter): {s3:?}"
    );
}

/// Deploys kv through `via` over TLS and waits until nodes 1 and 2 have applied it.
async fn deploy_and_wait(cluster: &Cluster, via: NodeId, tls: &ClientTlsConfig) {
    {
        let request = wraft_tests::api::DeployRequest {
            tenant: "kv".into(),
            wasm: wraft_tests::plugin_bytes("kv"),
            rollback_to_version: 0,
        };
        let index = connect_tls(cluster.port(via), tls)
            .max_encoding_message_size(64 << 20)
            .deploy(request)
            .await
            .unwrap_or_else(|s| panic!("deploy over TLS: {:?} {}", s.code(), s.message()))
            .into_inner()
            .index;
        for id in [1, 2] {
            wait_until(
                LEADER_TIMEOUT,
                &format!("node {id} to apply index {index}"),
                || async {
                    let s = status_tls(cluster.port(id), tls).await?;
                    if s.applied_index >= index {
                        Ok(())
                    } else {
                        Err(format!("node {id} applied {}", s.applied_index))
                    }
                },
            )
            .await;
        }
    }
}

/// A free loopback port (released before the node binds it).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

#[tokio::test]
async fn a_config_file_with_an_unknown_key_is_refused() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let file = dir.path().join("wraft.toml");
    std::fs::write(&file, "id = 1\nlisen = \"127.0.0.1:7001\"\n").expect("writing the config");
    let file = file.display().to_string();
    let out = run_cli(&["serve", "--config", &file], &[]).await;
    out.expect_code(2, "serve with an unknown config key");
    assert!(
        out.stderr.contains(&format!("config {file}"))
            && out.stderr.contains("unknown field `lisen`"),
        "the error names the file and the key: {out}"
    );
    let out = run_cli(&["serve", "--config", "/nonexistent/wraft.toml"], &[]).await;
    out.expect_code(2, "serve with a missing config file");
    assert!(out.stderr.contains("/nonexistent/wraft.toml"), "{out}");
}

/// Starts `wraft serve ARGS` (with `env`) and waits until it answers `Status` on `port`.
async fn serve_until_up(
    args: &[String],
    env: &[(String, String)],
    log: &Path,
    port: u16,
) -> (tokio::process::Child, StatusResponse) {
    let child = Cluster::spawn_wraft_env(args, log, "config test", env);
    let status = wait_until(
        LEADER_TIMEOUT,
        &format!("the node to answer on port {port}"),
        || async {
            let mut client = wraft_tests::cluster::connect(port);
            let call = client.status(StatusRequest {});
            match tokio::time::timeout(Duration::from_secs(5), call).await {
                Ok(Ok(r)) => Ok(r.into_inner()),
                Ok(Err(s)) => Err(format!("{:?} {}", s.code(), s.message())),
                Err(_) => Err("no answer".to_string()),
            }
        },
    )
    .await;
    (child, status)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_file_sets_the_node_and_env_and_flags_override_it() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let (file_port, env_port, flag_port) = (free_port(), free_port(), free_port());
    let data = dir.path().join("from-file");
    let file = dir.path().join("wraft.toml");
    std::fs::write(
        &file,
        format!(
            "id = 7\nlisten = \"127.0.0.1:{file_port}\"\ndata-dir = \"{}\"\n\
             peers = [\"7=127.0.0.1:{file_port}\"]\n",
            data.display()
        ),
    )
    .expect("writing the config");
    let log = dir.path().join("node.log");
    let args = vec![
        "serve".to_string(),
        "--config".into(),
        file.display().to_string(),
    ];

    // The file alone: its id, address, data directory and peers.
    let (mut child, status) = serve_until_up(&args, &[], &log, file_port).await;
    assert_eq!(status.node_id, 7, "{status:?}");
    let addrs: Vec<Value> = status.members.iter().map(|m| json!(m.addr)).collect();
    assert_eq!(addrs, vec![json!(format!("127.0.0.1:{file_port}"))]);
    assert!(data.is_dir(), "the node uses the file's data directory");
    child.kill().await.expect("stopping the node");

    // The environment beats the file.
    let env = vec![("WRAFT_LISTEN".to_string(), format!("127.0.0.1:{env_port}"))];
    let (mut child, status) = serve_until_up(&args, &env, &log, env_port).await;
    assert_eq!(status.node_id, 7, "the rest still comes from the file");
    child.kill().await.expect("stopping the node");

    // A flag beats both.
    let mut with_flag = args.clone();
    with_flag.extend(["--listen".to_string(), format!("127.0.0.1:{flag_port}")]);
    let (mut child, _) = serve_until_up(&with_flag, &env, &log, flag_port).await;
    child.kill().await.expect("stopping the node");
}
