//! `wraft serve`: run a node until SIGINT or SIGTERM.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use crate::node::{self, NodeConfig};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// This node's id (a positive integer, unique in the cluster forever).
    #[arg(long, default_value_t = 1)]
    id: u64,
    /// Address for the client API and peer traffic.
    #[arg(long, default_value = "127.0.0.1:7001")]
    listen: SocketAddr,
    /// Where the node keeps its log, checkpoints and modules.
    #[arg(long, default_value = "./wraft-data")]
    data_dir: PathBuf,
    /// Initial members, `ID=HOST:PORT,...`, the same on every initial member. Defaults to a
    /// one-node cluster of this node.
    #[arg(long, value_delimiter = ',')]
    peers: Vec<String>,
    /// Connect to these peers at another address than --peers gives (`ID=HOST:PORT,...`), e.g.
    /// through a proxy. Membership and the cluster id still come from --peers.
    #[arg(long, value_delimiter = ',')]
    dial: Vec<String>,
    /// How long a write may wait to be applied before its client gets an indeterminate error.
    #[arg(long, default_value_t = 5000)]
    request_timeout_ms: u64,
    /// Log as JSON lines.
    #[arg(long)]
    pub log_json: bool,
}

pub async fn run(args: Args) -> ExitCode {
    let peers = match parse_peers(&args.peers, args.id, args.listen) {
        Ok(p) => p,
        Err(err) => {
            eprintln!("error: {err}");
            return ExitCode::from(2);
        }
    };
    let dial = match parse_id_addrs(&args.dial, "--dial") {
        Ok(d) => d,
        Err(err) => {
            eprintln!("error: {err}");
            return ExitCode::from(2);
        }
    };
    if let Some(id) = dial.keys().find(|id| !peers.contains_key(id)) {
        eprintln!("error: --dial names node {id}, which is not in --peers");
        return ExitCode::from(2);
    }
    let config = NodeConfig {
        id: args.id,
        listen: args.listen,
        data_dir: args.data_dir,
        peers,
        dial,
        request_timeout: Duration::from_millis(args.request_timeout_ms),
    };
    match node::run(config, shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(1)
        }
    }
}

fn parse_peers(
    list: &[String],
    id: u64,
    listen: SocketAddr,
) -> Result<BTreeMap<u64, String>, String> {
    if list.is_empty() {
        return Ok(BTreeMap::from([(id, listen.to_string())]));
    }
    parse_id_addrs(list, "--peers")
}

/// Parses `ID=HOST:PORT` items.
fn parse_id_addrs(list: &[String], flag: &str) -> Result<BTreeMap<u64, String>, String> {
    let mut out = BTreeMap::new();
    for item in list {
        let (pid, addr) = item
            .split_once('=')
            .ok_or_else(|| format!("{flag} entry `{item}` is not ID=HOST:PORT"))?;
        let pid: u64 = pid
            .trim()
            .parse()
            .map_err(|_| format!("{flag} entry `{item}`: `{pid}` is not a node id"))?;
        if pid == 0 {
            return Err(format!("{flag} entry `{item}`: node ids start at 1"));
        }
        if out.insert(pid, addr.trim().to_string()).is_some() {
            return Err(format!("{flag} names node {pid} twice"));
        }
    }
    Ok(out)
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
    tracing::info!("shutdown requested");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_parse_and_refuse_nonsense() {
        let listen: SocketAddr = "127.0.0.1:7001".parse().unwrap();
        let p = parse_peers(&["1=a:1".into(), "2=b:2".into()], 1, listen).unwrap();
        assert_eq!(p.get(&2).map(String::as_str), Some("b:2"));
        assert_eq!(
            parse_peers(&[], 3, listen)
                .unwrap()
                .get(&3)
                .map(String::as_str),
            Some("127.0.0.1:7001")
        );
        assert!(parse_peers(&["x=a:1".into()], 1, listen).is_err());
        assert!(parse_peers(&["0=a:1".into()], 1, listen).is_err());
        assert!(parse_peers(&["1=a:1".into(), "1=b:2".into()], 1, listen).is_err());
        assert!(parse_peers(&["1a:1".into()], 1, listen).is_err());
    }
}
