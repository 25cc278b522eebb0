//! A cluster of real `wraft serve` processes on loopback, in one temporary directory.
//!
//! Node `i` (ids start at 1) has its data in `<dir>/node-i` and its stdout and stderr appended
//! to `<dir>/node-i.log` (one header line per boot). Every process is killed when the
//! [`Cluster`] is dropped; when that drop happens during a panic (a failed test), the tail of
//! every node's log is printed first. Set `WRAFT_KEEP_TEST_DIRS=1` to keep the directory.
//!
//! Methods that talk to nodes panic with what they saw, like assertions; `status` and the
//! `exec`/`query` wrappers return results so that tests can assert on errors.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use tempfile::TempDir;
use tokio::process::{Child, Command};
use tonic::transport::{Channel, Endpoint};
use wraft_proto::client::wraft_client::WraftClient;

use crate::api::{
    Consistency, DeployRequest, DeployResponse, DigestRequest, DigestResponse, ExecRequest,
    QueryRequest, Role, StatusRequest, StatusResponse,
};
use crate::outcome::{ExecOutcome, QueryOutcome};
use crate::paths::{plugin_bytes, wraft_bin};
use crate::proxy::Network;
use crate::wait::wait_until;
use crate::{APPLY_TIMEOUT, LEADER_TIMEOUT, RPC_TIMEOUT};

/// A node id, as given to `wraft serve --id`.
pub type NodeId = u64;

/// A gRPC client of one node.
pub type Client = WraftClient<Channel>;

/// How long a `Status` probe may take: a live node answers it from memory.
const STATUS_TIMEOUT: Duration = Duration::from_secs(5);

/// How many lines of each node's log a failed test prints.
const LOG_TAIL_LINES: usize = 80;

/// Connects (lazily: a dead node makes calls fail, not this) to a node's client API, with
/// message limits raised so that tests can send oversized payloads and see the node's answer.
pub fn connect(port: u16) -> Client {
    let channel = Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
        .expect("a valid endpoint URI")
        .connect_timeout(Duration::from_secs(2))
        .connect_lazy();
    WraftClient::new(channel)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20)
}

/// Free loopback ports, all held until every one is chosen so that they are distinct.
/// Ports to listen on, drawn at random from 10000..32768 and checked free. Below Linux's
/// ephemeral range (32768 and up) on purpose: a node restarted on its port after a kill must
/// find it still free, and an ephemeral port may meanwhile have become the local end of any
/// outgoing connection, or another test's `bind(0)`.
pub fn free_ports(n: usize) -> Vec<u16> {
    use rand::Rng as _;
    let mut rng = rand::rng();
    let mut ports: Vec<u16> = Vec::with_capacity(n);
    while ports.len() < n {
        let port = rng.random_range(10_000..32_768u16);
        if !ports.contains(&port) && TcpListener::bind(("127.0.0.1", port)).is_ok() {
            ports.push(port);
        }
    }
    ports
}

fn owned_env(env: &[(&str, &str)]) -> Vec<(String, String)> {
    env.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// One member's process and files.
struct Node {
    id: NodeId,
    port: u16,
    /// `--metrics-listen` port, when the cluster was started with [`ClusterOptions::metrics`].
    metrics_port: Option<u16>,
    data_dir: PathBuf,
    log_path: PathBuf,
    /// For a node added after the start: the members it joins through (`--join`).
    join: Option<String>,
    /// Environment of the next boot only (crash points), taken by it.
    next_env: Mutex<Vec<(String, String)>>,
    /// The running process. A std mutex: it is never held across an await.
    proc: Mutex<Proc>,
}

#[derive(Default)]
struct Proc {
    child: Option<Child>,
    /// How the last process ended on its own, if it did (a crash, a refusal to start).
    exited: Option<ExitStatus>,
    boots: u32,
    /// Stopped with SIGSTOP and not yet continued.
    paused: bool,
}

/// How [`Cluster::start_with`] starts its nodes; the default is what [`Cluster::start`] does.
#[derive(Debug, Clone, Default)]
pub struct ClusterOptions {
    /// Put a fault proxy ([`Network`]) on every directed peer link (`--dial`).
    pub proxies: bool,
    /// Seeds the proxies' random choices (flaky links).
    pub seed: u64,
    /// Extra environment variables of every node process.
    pub env: Vec<(String, String)>,
    /// Extra `wraft serve` arguments of every node (e.g. `--snapshot-entries 100`).
    pub args: Vec<String>,
    /// Give every initial node a `/metrics` port of its own ([`Cluster::metrics_port`]).
    pub metrics: bool,
    /// With `proxies`: this many ids after the initial nodes' are given a port and proxies on
    /// every link to and from them now, so that nodes that join later
    /// ([`Cluster::add_joining_node`]) are behind proxies too and network faults reach them.
    pub spare_ids: usize,
}

/// A set of `wraft` nodes that were started together with the same `--peers`.
pub struct Cluster {
    /// Dropped last (field order), after the processes are killed.
    nodes: Vec<Node>,
    peers: String,
    dir: Option<TempDir>,
    /// The proxies on the peer links, if the cluster was started with them.
    net: Option<Network>,
    /// The ports of the spare ids ([`ClusterOptions::spare_ids`]), taken by joining nodes.
    spare_ports: BTreeMap<NodeId, u16>,
    /// Extra environment of every node process (every boot).
    env: Vec<(String, String)>,
    /// Extra `wraft serve` arguments of every node.
    args: Vec<String>,
    /// The highest node id ever used.
    highest_id: NodeId,
    /// The token of the harness's own calls ([`Cluster::with_token`]).
    token: Option<String>,
}

impl Cluster {
    /// Starts `n` nodes and waits until exactly one leader is known by all of them.
    pub async fn start(n: usize) -> Cluster {
        let cluster = Cluster::launch(n);
        cluster.leader().await;
        cluster
    }

    /// Starts `n` nodes as `opts` says and waits until exactly one leader is known by all.
    /// Must be called inside a tokio runtime (the proxies are tasks).
    pub async fn start_with(n: usize, opts: ClusterOptions) -> Cluster {
        let cluster = Cluster::launch_with(n, opts);
        cluster.leader().await;
        cluster
    }

    /// Starts `n` nodes without waiting for anything.
    pub fn launch(n: usize) -> Cluster {
        Cluster::launch_with(n, ClusterOptions::default())
    }

    /// Starts `n` nodes as `opts` says, without waiting for anything.
    pub fn launch_with(n: usize, opts: ClusterOptions) -> Cluster {
        assert!(n > 0, "a cluster needs a node");
        let dir = tempfile::Builder::new()
            .prefix("wraft-test-")
            .tempdir()
            .expect("creating a temporary directory");
        // Chosen in one call, so that client and metrics ports are all distinct.
        let spare = if opts.proxies { opts.spare_ids } else { 0 };
        let all_ports = free_ports(if opts.metrics { 2 * n } else { n } + spare);
        let (all_ports, spare_ports) = all_ports.split_at(all_ports.len() - spare);
        let (ports, metrics_ports) = all_ports.split_at(n);
        let spare_ports: BTreeMap<NodeId, u16> = spare_ports
            .iter()
            .enumerate()
            .map(|(i, &port)| ((n + 1 + i) as NodeId, port))
            .collect();
        let nodes: Vec<Node> = ports
            .iter()
            .enumerate()
            .map(|(i, &port)| {
                let id = i as NodeId + 1;
                Node {
                    id,
                    port,
                    metrics_port: metrics_ports.get(i).copied(),
                    data_dir: dir.path().join(format!("node-{id}")),
                    log_path: dir.path().join(format!("node-{id}.log")),
                    join: None,
                    next_env: Mutex::new(Vec::new()),
                    proc: Mutex::new(Proc::default()),
                }
            })
            .collect();
        let peers = nodes
            .iter()
            .map(|n| format!("{}=127.0.0.1:{}", n.id, n.port))
            .collect::<Vec<_>>()
            .join(",");
        let net = opts.proxies.then(|| {
            let targets: Vec<(NodeId, u16)> = nodes
                .iter()
                .map(|n| (n.id, n.port))
                .chain(spare_ports.iter().map(|(&id, &port)| (id, port)))
                .collect();
            Network::start(&targets, opts.seed)
        });
        let cluster = Cluster {
            nodes,
            peers,
            dir: Some(dir),
            net,
            spare_ports,
            env: opts.env,
            args: opts.args,
            highest_id: 0,
            token: None,
        };
        for id in cluster.ids() {
            cluster.spawn(id);
        }
        cluster
    }

    fn node(&self, id: NodeId) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.id == id)
            .unwrap_or_else(|| panic!("no node {id} in a cluster of {}", self.nodes.len()))
    }

    /// The cluster's temporary directory.
    pub fn dir(&self) -> &Path {
        self.dir
            .as_ref()
            .expect("the directory lives as long as the cluster")
            .path()
    }

    /// Every member's id, in order.
    pub fn ids(&self) -> Vec<NodeId> {
        self.nodes.iter().map(|n| n.id).collect()
    }

    /// The `--peers` value every member was started with.
    pub fn peers(&self) -> &str {
        &self.peers
    }

    pub fn port(&self, id: NodeId) -> u16 {
        self.node(id).port
    }

    /// A node's `/metrics` port, if the cluster was started with [`ClusterOptions::metrics`].
    pub fn metrics_port(&self, id: NodeId) -> Option<u16> {
        self.node(id).metrics_port
    }

    pub fn data_dir(&self, id: NodeId) -> PathBuf {
        self.node(id).data_dir.clone()
    }

    /// `127.0.0.1:PORT` of a node.
    pub fn endpoint(&self, id: NodeId) -> String {
        format!("127.0.0.1:{}", self.port(id))
    }

    /// Every member's endpoint, comma-separated, for the CLI's `--endpoints`.
    pub fn endpoints(&self) -> String {
        self.ids()
            .iter()
            .map(|&id| self.endpoint(id))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The `wraft serve` arguments of a node (the same at every boot).
    pub fn serve_args(&self, id: NodeId) -> Vec<String> {
        let node = self.node(id);
        let mut args: Vec<String> = vec![
            "serve".into(),
            "--id".into(),
            id.to_string(),
            "--listen".into(),
            format!("127.0.0.1:{}", node.port),
            "--data-dir".into(),
            node.data_dir.display().to_string(),
        ];
        match &node.join {
            Some(join) => args.extend(["--join".into(), join.clone()]),
            None => args.extend(["--peers".into(), self.peers.clone()]),
        }
        if let Some(metrics) = node.metrics_port {
            args.extend(["--metrics-listen".into(), format!("127.0.0.1:{metrics}")]);
        }
        args.extend(self.args.iter().cloned());
        args
    }

    /// Starts a new node that joins through the current members (`wraft serve --join`), with
    /// `env` for its first boot only; returns its id (one above the highest so far).
    pub fn add_joining_node(&mut self, env: &[(&str, &str)]) -> NodeId {
        let via = self.ids();
        self.add_joining_node_via(env, None, &via)
    }

    /// [`Cluster::add_joining_node`] listening on `port` (`None`: a free one; e.g. the port of
    /// a member that was removed, for a machine that comes back under a new id) and joining
    /// through the members `via`, asked in that order.
    pub fn add_joining_node_via(
        &mut self,
        env: &[(&str, &str)],
        port: Option<u16>,
        via: &[NodeId],
    ) -> NodeId {
        // Never reuse an id, not even one whose node was forgotten: raft ids are forever.
        self.highest_id = self
            .highest_id
            .max(self.nodes.iter().map(|n| n.id).max().unwrap_or(0));
        self.highest_id += 1;
        let id = self.highest_id;
        let spare_port = self.spare_ports.remove(&id);
        let port = port.or(spare_port).unwrap_or_else(|| free_ports(1)[0]);
        if let (Some(net), true) = (&self.net, spare_port.is_some_and(|p| p != port)) {
            net.retarget(id, port);
        }
        let join = via
            .iter()
            .map(|&id| self.endpoint(id))
            .collect::<Vec<_>>()
            .join(",");
        self.nodes.push(Node {
            id,
            port,
            metrics_port: None,
            data_dir: self.dir().join(format!("node-{id}")),
            log_path: self.dir().join(format!("node-{id}.log")),
            join: Some(join),
            next_env: Mutex::new(owned_env(env)),
            proc: Mutex::new(Proc::default()),
        });
        self.spawn(id);
        id
    }

    /// Kills a node (if running) and drops it from the harness: for a member that was removed
    /// from the cluster, so that waits on "every live node" no longer include it.
    pub async fn forget(&mut self, id: NodeId) {
        if self.is_running(id) {
            self.kill(id).await;
        }
        self.highest_id = self.highest_id.max(id);
        self.nodes.retain(|n| n.id != id);
    }

    /// Starts a stopped node again with `env` added for this boot only.
    pub fn restart_with_env(&self, id: NodeId, env: &[(&str, &str)]) {
        *self.node(id).next_env.lock().unwrap() = owned_env(env);
        self.restart(id);
    }

    /// Waits (bounded) for a node's process to end on its own, e.g. at a crash point.
    pub async fn wait_exit(&self, id: NodeId, timeout: Duration) -> ExitStatus {
        wait_until(timeout, &format!("node {id} to exit"), move || async move {
            if self.is_running(id) {
                return Err(format!("node {id} still runs"));
            }
            let proc = self.node(id).proc.lock().unwrap();
            proc.exited
                .ok_or_else(|| format!("node {id} was not started"))
        })
        .await
    }

    /// Changes membership through node `via`.
    pub async fn change_members(
        &self,
        via: NodeId,
        changes: Vec<wraft_proto::client::MemberChange>,
    ) -> Result<wraft_proto::client::ChangeMembersResponse, tonic::Status> {
        let request = self.request(wraft_proto::client::ChangeMembersRequest { changes });
        self.client(via)
            .change_members(request)
            .await
            .map(|r| r.into_inner())
    }

    /// Spawns `wraft ARGS` with stdout and stderr appended to `log`, after a header line.
    /// The child is killed if it is dropped.
    pub fn spawn_wraft(args: &[String], log: &Path, header: &str) -> Child {
        Cluster::spawn_wraft_env(args, log, header, &[])
    }

    /// [`Cluster::spawn_wraft`] with extra environment variables.
    pub fn spawn_wraft_env(
        args: &[String],
        log: &Path,
        header: &str,
        env: &[(String, String)],
    ) -> Child {
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap_or_else(|e| panic!("opening {}: {e}", log.display()));
        writeln!(file, "==== {header}: wraft {} ====", args.join(" "))
            .expect("writing a log header");
        let stderr = file.try_clone().expect("cloning a log file handle");
        Command::new(wraft_bin())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(file))
            .stderr(Stdio::from(stderr))
            .env("RUST_BACKTRACE", "1")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("spawning wraft {}: {e}", args.join(" ")))
    }

    fn spawn(&self, id: NodeId) {
        let node = self.node(id);
        let mut args = self.serve_args(id);
        // A node added after the start has proxies only on a spare id
        // ([`ClusterOptions::spare_ids`]); `wraft serve` refuses an empty `--dial`.
        if let Some(dial) = self.net.as_ref().map(|net| net.dial_arg(id)) {
            if !dial.is_empty() {
                args.push("--dial".into());
                args.push(dial);
            }
        }
        let mut env = self.env.clone();
        env.extend(std::mem::take(&mut *node.next_env.lock().unwrap()));
        let mut proc = node.proc.lock().unwrap();
        assert!(proc.child.is_none(), "node {id} is already running");
        proc.boots += 1;
        let header = format!("node {id} boot {}", proc.boots);
        proc.child = Some(Cluster::spawn_wraft_env(
            &args,
            &node.log_path,
            &header,
            &env,
        ));
        proc.exited = None;
        proc.paused = false;
    }

    /// Whether a node's process is running (noting how it ended if it ended on its own).
    pub fn is_running(&self, id: NodeId) -> bool {
        let mut proc = self.node(id).proc.lock().unwrap();
        let exited = match proc.child.as_mut() {
            None => return false,
            Some(child) => child.try_wait().expect("polling a child process"),
        };
        match exited {
            None => true,
            Some(status) => {
                proc.child = None;
                proc.exited = Some(status);
                false
            }
        }
    }

    /// Ids of the nodes whose process is running.
    pub fn live_ids(&self) -> Vec<NodeId> {
        self.ids()
            .into_iter()
            .filter(|&id| self.is_running(id))
            .collect()
    }

    /// Kills a node with SIGKILL and reaps it.
    pub async fn kill(&self, id: NodeId) {
        let child = self.node(id).proc.lock().unwrap().child.take();
        let mut child = child.unwrap_or_else(|| panic!("node {id} is not running: cannot kill it"));
        child
            .start_kill()
            .unwrap_or_else(|e| panic!("killing node {id}: {e}"));
        crate::within(
            Duration::from_secs(10),
            &format!("reaping killed node {id}"),
            child.wait(),
        )
        .await
        .unwrap_or_else(|e| panic!("waiting for killed node {id}: {e}"));
    }

    /// The proxies on the peer links; panics if the cluster was started without them.
    pub fn net(&self) -> &Network {
        self.net
            .as_ref()
            .expect("the cluster was started without proxies (ClusterOptions::proxies)")
    }

    /// Stops a running node's process with SIGSTOP: it keeps its sockets but does nothing.
    pub fn pause(&self, id: NodeId) {
        self.signal(id, "STOP");
        self.node(id).proc.lock().unwrap().paused = true;
    }

    /// Continues a node stopped by [`Cluster::pause`] (SIGCONT).
    pub fn resume(&self, id: NodeId) {
        self.signal(id, "CONT");
        self.node(id).proc.lock().unwrap().paused = false;
    }

    /// Whether a node is stopped by [`Cluster::pause`].
    pub fn is_paused(&self, id: NodeId) -> bool {
        self.node(id).proc.lock().unwrap().paused
    }

    fn signal(&self, id: NodeId, signal: &str) {
        let pid = {
            let proc = self.node(id).proc.lock().unwrap();
            let child = proc
                .child
                .as_ref()
                .unwrap_or_else(|| panic!("node {id} is not running: cannot SIG{signal} it"));
            child
                .id()
                .unwrap_or_else(|| panic!("node {id} has exited: cannot SIG{signal} it"))
        };
        let status = std::process::Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status()
            .unwrap_or_else(|e| panic!("running kill -{signal} {pid}: {e}"));
        assert!(
            status.success(),
            "kill -{signal} {pid} (node {id}): {status}"
        );
    }

    /// Starts a stopped node again with the same arguments and data directory.
    pub fn restart(&self, id: NodeId) {
        assert!(
            !self.is_running(id),
            "node {id} is running: kill it before restarting it"
        );
        self.spawn(id);
    }

    /// A client of a node's API.
    pub fn client(&self, id: NodeId) -> Client {
        connect(self.port(id))
    }

    /// Makes the harness's own `Status`, `Digest` and `Deploy` calls carry `token` (an admin
    /// token from `wraft auth token`), for nodes started with an auth secret: call it right
    /// after [`Cluster::launch_with`], before waiting for a leader.
    pub fn with_token(mut self, token: &str) -> Cluster {
        self.token = Some(token.to_string());
        self
    }

    /// A request carrying the cluster's token ([`Cluster::with_token`]), if it has one.
    pub fn request<T>(&self, body: T) -> tonic::Request<T> {
        with_token(body, self.token.as_deref())
    }

    /// A node's `Status`, or a description of why there is none (including a process exit).
    pub async fn status(&self, id: NodeId) -> Result<StatusResponse, String> {
        if !self.is_running(id) {
            let proc = self.node(id).proc.lock().unwrap();
            return Err(match proc.exited {
                Some(status) => format!("node {id} exited on its own: {status}"),
                None => format!("node {id} is not running"),
            });
        }
        let request = self.request(StatusRequest {});
        match tokio::time::timeout(STATUS_TIMEOUT, self.client(id).status(request)).await {
            Ok(Ok(response)) => Ok(response.into_inner()),
            Ok(Err(status)) => Err(format!(
                "node {id}: Status failed: {:?} {}",
                status.code(),
                status.message()
            )),
            Err(_) => Err(format!(
                "node {id}: Status did not answer within {STATUS_TIMEOUT:?}"
            )),
        }
    }

    /// Waits (up to [`LEADER_TIMEOUT`]) until every running node answers `Status`, exactly one
    /// of them says it is the leader, and every one names it as the leader; returns its id.
    pub async fn leader(&self) -> NodeId {
        wait_until(
            LEADER_TIMEOUT,
            "exactly one leader known by every live node",
            move || async move {
                let live = self.live_ids();
                if live.is_empty() {
                    return Err(self.describe_dead());
                }
                let mut statuses = Vec::new();
                for id in live {
                    statuses.push(self.status(id).await?);
                }
                let leaders: Vec<NodeId> = statuses
                    .iter()
                    .filter(|s| s.role == Role::Leader as i32)
                    .map(|s| s.node_id)
                    .collect();
                match leaders[..] {
                    [leader] if statuses.iter().all(|s| s.leader_id == leader) => Ok(leader),
                    _ => Err(describe_statuses(&statuses)),
                }
            },
        )
        .await
    }

    fn describe_dead(&self) -> String {
        self.ids()
            .iter()
            .map(|&id| {
                let proc = self.node(id).proc.lock().unwrap();
                match proc.exited {
                    Some(status) => format!("node {id} exited: {status}"),
                    None => format!("node {id} not running"),
                }
            })
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// Waits until a node has applied at least `index`; returns its status then.
    pub async fn wait_applied(&self, id: NodeId, index: u64) -> StatusResponse {
        wait_until(
            APPLY_TIMEOUT,
            &format!("node {id} to apply index {index}"),
            move || async move {
                let status = self.status(id).await?;
                if status.applied_index >= index {
                    Ok(status)
                } else {
                    Err(describe_statuses(std::slice::from_ref(&status)))
                }
            },
        )
        .await
    }

    /// Deploys a plugin (`"kv"`, `"counter"`) as `tenant` through node `via`.
    pub async fn deploy(&self, via: NodeId, tenant: &str, plugin: &str) -> DeployResponse {
        let wasm = plugin_bytes(plugin);
        self.deploy_bytes(via, tenant, wasm)
            .await
            .unwrap_or_else(|s| {
                panic!(
                    "deploying {plugin} as {tenant} through node {via}: {:?} {} (metadata {:?})",
                    s.code(),
                    s.message(),
                    s.metadata()
                )
            })
    }

    /// Deploys raw module bytes as `tenant` through node `via`.
    pub async fn deploy_bytes(
        &self,
        via: NodeId,
        tenant: &str,
        wasm: Vec<u8>,
    ) -> Result<DeployResponse, tonic::Status> {
        let request = self.request(DeployRequest {
            tenant: tenant.into(),
            wasm,
            rollback_to_version: 0,
        });
        crate::within(
            RPC_TIMEOUT,
            &format!("Deploy of {tenant} through node {via}"),
            self.client(via).deploy(request),
        )
        .await
        .map(tonic::Response::into_inner)
    }

    /// Rolls `tenant` back to the module it ran as `version`, through node `via`.
    pub async fn rollback(
        &self,
        via: NodeId,
        tenant: &str,
        version: u64,
    ) -> Result<DeployResponse, tonic::Status> {
        let request = self.request(DeployRequest {
            tenant: tenant.into(),
            wasm: Vec::new(),
            rollback_to_version: version,
        });
        crate::within(
            RPC_TIMEOUT,
            &format!("Rollback of {tenant} to version {version} through node {via}"),
            self.client(via).deploy(request),
        )
        .await
        .map(tonic::Response::into_inner)
    }

    /// Execs a JSON command without a session through node `via`.
    pub async fn exec(
        &self,
        via: NodeId,
        tenant: &str,
        command: &serde_json::Value,
    ) -> ExecOutcome {
        self.exec_session(via, tenant, command, "", 0).await
    }

    /// Execs a JSON command with a session (`client_id` empty: none) through node `via`.
    pub async fn exec_session(
        &self,
        via: NodeId,
        tenant: &str,
        command: &serde_json::Value,
        client_id: &str,
        seq: u64,
    ) -> ExecOutcome {
        let request = exec_request(tenant, command.to_string().into_bytes(), client_id, seq);
        exec_on(
            &mut self.client(via),
            request,
            &format!("Exec through node {via}"),
        )
        .await
    }

    /// Execs a command that must be applied, retrying only definite errors (nothing was
    /// applied, so a retry cannot apply it twice) until [`APPLY_TIMEOUT`]; any other outcome
    /// fails the test. Returns the index and the output as JSON.
    pub async fn exec_ok(
        &self,
        via: NodeId,
        tenant: &str,
        command: &serde_json::Value,
    ) -> (u64, serde_json::Value) {
        wait_until(
            APPLY_TIMEOUT,
            &format!("{command} on {tenant} through node {via} to be applied"),
            move || async move {
                match self.exec(via, tenant, command).await {
                    ExecOutcome::Ok { index, output } => Ok((index, crate::json(&output))),
                    ExecOutcome::Definite(s) => {
                        Err(format!("definite error {:?}: {}", s.code(), s.message()))
                    }
                    other => panic!("{command} on {tenant} through node {via}: {other}"),
                }
            },
        )
        .await
    }

    /// Runs a JSON query through node `via`.
    pub async fn query(
        &self,
        via: NodeId,
        tenant: &str,
        query: &serde_json::Value,
        consistency: Consistency,
    ) -> QueryOutcome {
        let request = QueryRequest {
            tenant: tenant.into(),
            query: query.to_string().into_bytes(),
            consistency: consistency as i32,
        };
        let result = crate::within(
            RPC_TIMEOUT,
            &format!("Query ({consistency:?}) through node {via}"),
            self.client(via).query(request),
        )
        .await;
        QueryOutcome::from_result(result)
    }

    /// A node's `Digest` of a tenant.
    pub async fn digest(&self, id: NodeId, tenant: &str) -> Result<DigestResponse, String> {
        let request = self.request(DigestRequest {
            tenant: tenant.into(),
        });
        match tokio::time::timeout(STATUS_TIMEOUT, self.client(id).digest(request)).await {
            Ok(Ok(response)) => Ok(response.into_inner()),
            Ok(Err(s)) => Err(format!(
                "node {id}: Digest failed: {:?} {}",
                s.code(),
                s.message()
            )),
            Err(_) => Err(format!(
                "node {id}: Digest did not answer within {STATUS_TIMEOUT:?}"
            )),
        }
    }

    /// Waits until the nodes `ids` report the same `Digest` (index and state hash) of a tenant,
    /// at an index of at least `min_index`; returns it.
    pub async fn wait_digests_agree(
        &self,
        ids: &[NodeId],
        tenant: &str,
        min_index: u64,
    ) -> DigestResponse {
        wait_until(
            APPLY_TIMEOUT,
            &format!("equal digests of {tenant} at index >= {min_index} on nodes {ids:?}"),
            move || async move {
                let mut digests = Vec::new();
                for &id in ids {
                    digests.push((id, self.digest(id, tenant).await?));
                }
                let first = &digests[0].1;
                let agree = digests.iter().all(|(_, d)| {
                    d.index == first.index
                        && d.state_hash == first.state_hash
                        && d.module_hash == first.module_hash
                });
                if agree && first.index >= min_index {
                    Ok(first.clone())
                } else {
                    Err(digests
                        .iter()
                        .map(|(id, d)| {
                            format!(
                                "node {id}: index {} state {} module {}",
                                d.index, d.state_hash, d.module_hash
                            )
                        })
                        .collect::<Vec<_>>()
                        .join("; "))
                }
            },
        )
        .await
    }

    /// The last `lines` lines of a node's log (every boot).
    pub fn log_tail(&self, id: NodeId, lines: usize) -> String {
        tail(&self.node(id).log_path, lines)
    }

    /// The whole log of a node (every boot).
    pub fn log(&self, id: NodeId) -> String {
        std::fs::read(&self.node(id).log_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }
}

/// A request with `authorization: Bearer <token>` when a token is given.
pub fn with_token<T>(body: T, token: Option<&str>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(body);
    if let Some(token) = token {
        let value = format!("Bearer {token}")
            .parse()
            .unwrap_or_else(|e| panic!("token {token:?} is not a header value: {e}"));
        request.metadata_mut().insert("authorization", value);
    }
    request
}

/// Builds an `ExecRequest` from raw command bytes.
pub fn exec_request(tenant: &str, command: Vec<u8>, client_id: &str, seq: u64) -> ExecRequest {
    ExecRequest {
        tenant: tenant.into(),
        command,
        client_id: client_id.into(),
        seq,
    }
}

/// Sends an `Exec` on a client the caller holds, failing the test if it does not return within
/// [`RPC_TIMEOUT`].
pub async fn exec_on(client: &mut Client, request: ExecRequest, what: &str) -> ExecOutcome {
    let result = crate::within(RPC_TIMEOUT, what, client.exec(request)).await;
    ExecOutcome::from_result(result)
}

/// One line per status: id, role, leader, term and indexes.
pub fn describe_statuses(statuses: &[StatusResponse]) -> String {
    statuses
        .iter()
        .map(|s| {
            let role = Role::try_from(s.role)
                .map(|r| format!("{r:?}"))
                .unwrap_or_else(|_| format!("role#{}", s.role));
            format!(
                "node {}: {role} leader={} term={} commit={} applied={}",
                s.node_id, s.leader_id, s.term, s.commit_index, s.applied_index
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

fn tail(path: &Path, lines: usize) -> String {
    let text = match std::fs::read(path) {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(e) => return format!("(cannot read {}: {e})", path.display()),
    };
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in &self.nodes {
            if let Some(child) = node
                .proc
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .child
                .as_mut()
            {
                // SIGKILL; the runtime reaps it (kill_on_drop is set as well).
                let _ = child.start_kill();
            }
        }
        if std::thread::panicking() {
            for node in &self.nodes {
                eprintln!(
                    "---- node {} (127.0.0.1:{}) log tail, {} ----\n{}",
                    node.id,
                    node.port,
                    node.log_path.display(),
                    tail(&node.log_path, LOG_TAIL_LINES)
                );
            }
        }
        if std::env::var_os("WRAFT_KEEP_TEST_DIRS").is_some() {
            if let Some(dir) = self.dir.take() {
                eprintln!("keeping {}", dir.keep().display());
            }
        }
    }
}
