//! The module cache across a restart: a node that comes back serves its tenants from modules
//! it compiled in its previous life (its `/metrics` shows cache hits and no compilation).
//! Nodes are started by hand, as in `ops.rs`, for their metrics ports.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::time::Duration;

use tokio::process::Child;
use wraft_proto::client::{
    query_response, Consistency, DeployRequest, QueryRequest, Role, StatusRequest,
};
use wraft_tests::cluster::{connect, exec_on, exec_request, Cluster};
use wraft_tests::paths::plugin_bytes;
use wraft_tests::wait::{wait_until, within};

const COMPILATIONS: &str = "wraft_wasm_compilations_total";
const CACHE_HITS: &str = "wraft_wasm_compile_cache_hits_total";

/// Nodes with a client port and a metrics port each.
struct Nodes {
    dir: tempfile::TempDir,
    peers: String,
    /// id → (client port, metrics port).
    ports: BTreeMap<u64, (u16, u16)>,
    procs: BTreeMap<u64, Child>,
}

impl Nodes {
    fn start(n: u64) -> Nodes {
        let dir = tempfile::tempdir().expect("temp dir");
        let held: Vec<TcpListener> = (0..2 * n)
            .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind a free port"))
            .collect();
        let free: Vec<u16> = held
            .iter()
            .map(|l| l.local_addr().expect("local addr").port())
            .collect();
        drop(held);
        let ports: BTreeMap<u64, (u16, u16)> = (1..=n)
            .map(|id| {
                let i = (id - 1) as usize * 2;
                (id, (free[i], free[i + 1]))
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
        };
        for id in 1..=n {
            nodes.spawn(id);
        }
        nodes
    }

    fn spawn(&mut self, id: u64) {
        let (port, metrics) = self.ports[&id];
        let data_dir = self.dir.path().join(format!("node-{id}"));
        let args: Vec<String> = vec![
            "serve".into(),
            "--id".into(),
            id.to_string(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
            "--data-dir".into(),
            data_dir.display().to_string(),
            "--peers".into(),
            self.peers.clone(),
            "--metrics-listen".into(),
            format!("127.0.0.1:{metrics}"),
        ];
        let log = self.log_path(id);
        let child = Cluster::spawn_wraft_env(&args, &log, &format!("node {id}"), &[]);
        self.procs.insert(id, child);
    }

    /// SIGKILL, and wait for the process to be gone.
    async fn kill(&mut self, id: u64) {
        let mut child = self.procs.remove(&id).expect("a running node");
        child.start_kill().expect("kill a node");
        within(
            Duration::from_secs(20),
            "a killed node exiting",
            child.wait(),
        )
        .await
        .expect("wait for the node");
    }

    fn log_path(&self, id: u64) -> std::path::PathBuf {
        self.dir.path().join(format!("node-{id}.log"))
    }

    async fn leader(&self) -> u64 {
        let ports = self.ports.clone();
        wait_until(Duration::from_secs(30), "a leader", || {
            let ports = ports.clone();
            async move {
                for (id, (port, _)) in &ports {
                    if let Ok(status) = connect(*port).status(StatusRequest {}).await {
                        if status.get_ref().role == Role::Leader as i32 {
                            return Ok(*id);
                        }
                    }
                }
                Err("no node leads".to_string())
            }
        })
        .await
    }
}

impl Drop for Nodes {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for id in self.ports.keys() {
                let log = std::fs::read_to_string(self.log_path(*id)).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(40).collect();
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

/// The value of an unlabelled sample, if the text has it.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .find_map(|value| value.trim().parse().ok())
}

/// Reads `key` from the kv tenant on the node at `port`, from that node's own state.
async fn local_get(port: u16, key: &str) -> Result<serde_json::Value, String> {
    let response = connect(port)
        .query(QueryRequest {
            tenant: "kv".into(),
            query: serde_json::json!({"op": "get", "key": key})
                .to_string()
                .into_bytes(),
            consistency: Consistency::Stale as i32,
        })
        .await
        .map_err(|e| e.message().to_string())?
        .into_inner();
    match response.outcome {
        Some(query_response::Outcome::Output(out)) => {
            serde_json::from_slice(&out).map_err(|e| e.to_string())
        }
        other => Err(format!("query answered {other:?}")),
    }
}

#[tokio::test]
async fn a_restarted_node_loads_its_modules_instead_of_compiling() {
    let mut nodes = Nodes::start(3);
    let leader = nodes.leader().await;
    let leader_port = nodes.ports[&leader].0;
    connect(leader_port)
        .deploy(DeployRequest {
            tenant: "kv".into(),
            wasm: plugin_bytes("kv"),
            rollback_to_version: 0,
        })
        .await
        .expect("deploy kv");
    let put = serde_json::json!({"op": "put", "key": "k", "value": "v"});
    exec_on(
        &mut connect(leader_port),
        exec_request("kv", put.to_string().into_bytes(), "", 0),
        "put",
    )
    .await
    .expect_ok("put");

    // A follower, once it has applied the put: it compiled the module in this life.
    let follower = *nodes.ports.keys().find(|&&id| id != leader).unwrap();
    let (port, metrics) = nodes.ports[&follower];
    wait_until(
        Duration::from_secs(30),
        "the follower applying the put",
        || async move {
            match local_get(port, "k").await? {
                v if v["value"] == "v" => Ok(()),
                v => Err(format!("read {v}")),
            }
        },
    )
    .await;
    let before = wraft_tests::scrape_metrics(metrics)
        .await
        .expect("scrape before the restart");
    assert!(
        sample(&before, COMPILATIONS).unwrap_or(0.0) >= 1.0,
        "a first life compiles: {before}"
    );
    let cache = nodes
        .dir
        .path()
        .join(format!("node-{follower}"))
        .join("module-cache");
    assert!(
        std::fs::read_dir(&cache)
            .map(|d| d.count() > 0)
            .unwrap_or(false),
        "no compiled module in {}",
        cache.display()
    );

    nodes.kill(follower).await;
    nodes.spawn(follower);
    wait_until(
        Duration::from_secs(30),
        "the restarted follower serving the tenant",
        || async move {
            match local_get(port, "k").await? {
                v if v["value"] == "v" => Ok(()),
                v => Err(format!("read {v}")),
            }
        },
    )
    .await;
    let after = wait_until(
        Duration::from_secs(10),
        "the restarted follower's metrics",
        || wraft_tests::scrape_metrics(metrics),
    )
    .await;
    assert_eq!(
        sample(&after, COMPILATIONS),
        Some(0.0),
        "a restart loads modules instead of compiling: {after}"
    );
    assert!(
        sample(&after, CACHE_HITS).unwrap_or(0.0) >= 1.0,
        "a restart loads modules from the cache: {after}"
    );
}
