//! The harness for wraft's multi-node tests: real `wraft` processes on loopback, talking real
//! gRPC and writing real RocksDB directories; crashes are real `SIGKILL`s.
//!
//! Layout:
//! - [`paths`]: where the `wraft` binary and the plugin `.wasm` files are, and what to run when
//!   they are missing.
//! - [`wait`]: [`wait_until`] (poll a condition until a deadline, then fail saying what was
//!   awaited and the last state seen) and [`within`] (a call must return before a deadline).
//! - [`cluster`]: [`Cluster`], a set of nodes in one temporary directory: start, kill, restart,
//!   find the leader, and print every node's log tail when a test fails.
//! - [`outcome`]: an `Exec`/`Query` result classified by the `wraft-outcome` metadata into
//!   ok / module error / definite / indeterminate.
//! - [`cli`]: runs the `wraft` CLI and captures exit code, stdout and stderr.
//!
//! Everything here panics on failure (with a message that says what was expected and what was
//! seen) instead of returning errors: a panic is what makes [`Cluster`]'s `Drop` print the logs.

pub mod cli;
pub mod cluster;
pub mod faults;
pub mod history;
pub mod invariants;
pub mod linearizability;
pub mod outcome;
pub mod paths;
pub mod pipeline;
pub mod proxy;
pub mod register;
pub mod wait;

pub use cli::{run_cli, run_cli_with_input, CliOutput};
pub use cluster::{Cluster, NodeId};
pub use outcome::{Certainty, ExecOutcome, QueryOutcome};
pub use paths::{plugin_bytes, plugin_path, sha256_hex, wraft_bin};
pub use wait::{wait_until, within};

pub use wraft_proto::client as api;

use std::time::Duration;

/// How long a cluster may take to agree on one leader (also after a crash). Generous: tests run
/// in parallel on a 2-core machine.
pub const LEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a replica may take to apply an index it is known to be behind on.
pub const APPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// The longest any single RPC made by the harness may take before the test fails as a hang.
pub const RPC_TIMEOUT: Duration = Duration::from_secs(30);

/// Parses a module's output (JSON bytes), failing with the raw bytes when they are not JSON.
pub fn json(bytes: &[u8]) -> serde_json::Value {
    serde_json::from_slice(bytes).unwrap_or_else(|e| {
        panic!(
            "module output is not JSON ({e}): {:?}",
            String::from_utf8_lossy(bytes)
        )
    })
}

/// `GET /metrics` from a node's metrics port over plain HTTP/1.1: the body, or why not.
pub async fn scrape_metrics(port: u16) -> Result<String, String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| format!("connect to metrics port {port}: {e}"))?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .map_err(|e| e.to_string())?;
    let mut raw = String::new();
    stream
        .read_to_string(&mut raw)
        .await
        .map_err(|e| e.to_string())?;
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no HTTP header in {raw:?}"))?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(format!("metrics answered {head:?}"));
    }
    Ok(body.to_string())
}

/// One sample of a node's metrics, e.g. `wraft_lease_reads_total{result="served"}`, as an
/// integer: 0 if the series is not exported yet. Panics if the node has no metrics port or
/// does not answer.
pub async fn metric(cluster: &Cluster, id: NodeId, series: &str) -> u64 {
    let port = cluster
        .metrics_port(id)
        .unwrap_or_else(|| panic!("node {id} has no metrics port"));
    let text = scrape_metrics(port)
        .await
        .unwrap_or_else(|e| panic!("scraping node {id}'s metrics: {e}"));
    let prefix = format!("{series} ");
    text.lines()
        .find_map(|line| line.strip_prefix(prefix.as_str()))
        .map(|v| {
            v.trim()
                .parse::<f64>()
                .unwrap_or_else(|e| panic!("{series} {v}: {e}")) as u64
        })
        .unwrap_or(0)
}
