//! `wraft serve`: run a node until SIGINT or SIGTERM.
//!
//! Every setting comes from, in order of precedence: a flag, an environment variable
//! (`WRAFT_` + the flag name, e.g. `WRAFT_DATA_DIR`), the `--config` file (see [`super::config`]),
//! the default. Hence every flag is an `Option` here and defaults are applied in [`Args::resolve`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use super::config::FileConfig;
use crate::auth::{Auth, Secret};
use crate::node::{self, NodeConfig};
use crate::tls::{NodeTls, NodeTlsFiles};

const DEFAULT_LISTEN: &str = "127.0.0.1:7001";
const DEFAULT_DATA_DIR: &str = "./wraft-data";
const DEFAULT_REQUEST_TIMEOUT_MS: u64 = 5000;

#[derive(clap::Args, Debug, Default)]
pub struct Args {
    /// Read settings from this TOML file (keys are the flag names: `listen`, `data-dir`, ...).
    /// Flags and environment variables override it.
    #[arg(long, env = "WRAFT_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// This node's id (a positive integer, unique in the cluster forever). [default: 1]
    #[arg(long, env = "WRAFT_ID")]
    id: Option<u64>,
    /// Address for the client API and peer traffic. [default: 127.0.0.1:7001]
    #[arg(long, env = "WRAFT_LISTEN", value_name = "HOST:PORT")]
    listen: Option<SocketAddr>,
    /// Where the node keeps its log, checkpoints and modules. [default: ./wraft-data]
    #[arg(long, env = "WRAFT_DATA_DIR", value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Initial members, `ID=HOST:PORT,...`, the same on every initial member. Defaults to a
    /// one-node cluster of this node.
    #[arg(long, env = "WRAFT_PEERS", value_delimiter = ',')]
    peers: Vec<String>,
    /// Connect to these nodes at another address than they advertise (`ID=HOST:PORT,...`), e.g.
    /// through a proxy; may name nodes that join later. Membership and the cluster id still
    /// come from --peers.
    #[arg(long, env = "WRAFT_DIAL", value_delimiter = ',')]
    dial: Vec<String>,
    /// How long a write may wait to be applied before its client gets an indeterminate error.
    /// [default: 5000]
    #[arg(long, env = "WRAFT_REQUEST_TIMEOUT_MS")]
    request_timeout_ms: Option<u64>,
    /// Serve Prometheus metrics over HTTP at this address (off unless given).
    #[arg(long, env = "WRAFT_METRICS_LISTEN", value_name = "HOST:PORT")]
    metrics_listen: Option<SocketAddr>,
    /// This node's certificate (PEM). With --tls-key and --tls-ca: serve TLS, and accept raft
    /// traffic only from node certificates signed by the cluster CA.
    #[arg(long, env = "WRAFT_TLS_CERT", value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, env = "WRAFT_TLS_KEY", value_name = "FILE")]
    tls_key: Option<PathBuf>,
    /// The cluster CA (PEM): peers' and clients' certificates must be signed by it.
    #[arg(long, env = "WRAFT_TLS_CA", value_name = "FILE")]
    tls_ca: Option<PathBuf>,
    /// Clients of the client API must present a certificate signed by the cluster CA too (by
    /// default, with TLS on, clients need none; peers always do).
    #[arg(long, env = "WRAFT_CLIENT_CERT_REQUIRED", num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL")]
    client_cert_required: Option<bool>,
    /// The cluster auth secret (`wraft auth secret` makes one; every node gets the same file).
    /// With it, every client request needs a token minted from it (`wraft auth token`);
    /// without it, access control is off.
    #[arg(long, env = "WRAFT_AUTH_SECRET_FILE", value_name = "FILE")]
    auth_secret_file: Option<PathBuf>,
    /// Join an existing cluster through these members (`HOST:PORT,...`) instead of starting one
    /// from --peers: the node registers as a learner, catches up, and (with --auto-promote)
    /// becomes a voter. Needed only on the first start; a restart uses the data directory.
    #[arg(
        long,
        env = "WRAFT_JOIN",
        value_delimiter = ',',
        value_name = "HOST:PORT"
    )]
    join: Vec<String>,
    /// With --join: ask to become a voter once caught up (default true).
    #[arg(long, env = "WRAFT_AUTO_PROMOTE", num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL")]
    auto_promote: Option<bool>,
    /// The token --join presents to the cluster (an admin token when it has auth on).
    #[arg(long, env = "WRAFT_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Compact the log every this many applied entries; a follower further behind receives a
    /// snapshot (0: never compact).
    #[arg(long, env = "WRAFT_SNAPSHOT_ENTRIES")]
    snapshot_entries: Option<u64>,
    /// Bytes of state per snapshot chunk sent to a follower.
    #[arg(long, env = "WRAFT_SNAPSHOT_CHUNK_BYTES")]
    snapshot_chunk_bytes: Option<usize>,
    /// Log as JSON lines.
    #[arg(long, env = "WRAFT_LOG_JSON", num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL")]
    log_json: Option<bool>,
}

impl Args {
    /// Whether to log as JSON, known before logging starts (and so before [`Args::resolve`]
    /// reports a bad config file, which it does on stderr either way).
    pub fn log_json(&self) -> bool {
        self.log_json
            .or_else(|| {
                let file = FileConfig::load(self.config.as_deref()?).ok()?;
                file.log_json
            })
            .unwrap_or(false)
    }

    /// Merges flags (and their environment variables, which clap has already read) over the
    /// config file over the defaults, checks the result, and loads the TLS files.
    pub fn resolve(self) -> Result<NodeConfig, String> {
        let file = match &self.config {
            Some(path) => FileConfig::load(path).map_err(|e| e.to_string())?,
            None => FileConfig::default(),
        };
        let id = self.id.or(file.id).unwrap_or(1);
        let listen = match self.listen.or(file.listen) {
            Some(l) => l,
            None => DEFAULT_LISTEN
                .parse()
                .map_err(|e| format!("default listen address: {e}"))?,
        };
        let data_dir = self
            .data_dir
            .or(file.data_dir)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
        let peers = or_file(self.peers, file.peers);
        let dial = or_file(self.dial, file.dial);
        let peers = parse_peers(&peers, id, listen)?;
        let dial = parse_id_addrs(&dial, "--dial")?;
        // Any node may be named, members that join later included; only the node itself may not.
        if dial.contains_key(&id) {
            return Err(format!(
                "--dial names this node ({id}): it never dials itself"
            ));
        }
        let request_timeout_ms = self
            .request_timeout_ms
            .or(file.request_timeout_ms)
            .unwrap_or(DEFAULT_REQUEST_TIMEOUT_MS);
        let client_cert_required = self
            .client_cert_required
            .or(file.client_cert_required)
            .unwrap_or(false);
        let tls = match (
            self.tls_cert.or(file.tls_cert),
            self.tls_key.or(file.tls_key),
            self.tls_ca.or(file.tls_ca),
        ) {
            (Some(cert), Some(key), Some(ca)) => Some(
                NodeTls::load(&NodeTlsFiles { cert, key, ca }, client_cert_required)
                    .map_err(|e| e.to_string())?,
            ),
            (None, None, None) if client_cert_required => {
                return Err(
                    "--client-cert-required needs TLS: --tls-cert, --tls-key and --tls-ca".into(),
                )
            }
            (None, None, None) => None,
            _ => return Err(
                "TLS needs all three of --tls-cert, --tls-key and --tls-ca (one or two are set)"
                    .into(),
            ),
        };
        let auth = match self.auth_secret_file.or(file.auth_secret_file) {
            Some(path) => {
                warn_if_readable_by_others(&path);
                Auth::on(Secret::load(&path).map_err(|e| e.to_string())?)
            }
            None => Auth::off(),
        };
        Ok(NodeConfig {
            id,
            listen,
            data_dir,
            peers,
            dial,
            request_timeout: Duration::from_millis(request_timeout_ms),
            metrics_listen: self.metrics_listen.or(file.metrics_listen),
            tls,
            auth,
            join: or_file(self.join, file.join),
            auto_promote: self.auto_promote.or(file.auto_promote).unwrap_or(true),
            token: self.token,
            snapshot_entries: self
                .snapshot_entries
                .or(file.snapshot_entries)
                .unwrap_or(crate::node::DEFAULT_SNAPSHOT_ENTRIES),
            snapshot_chunk_bytes: self
                .snapshot_chunk_bytes
                .or(file.snapshot_chunk_bytes)
                .unwrap_or(crate::snapshot::DEFAULT_CHUNK_BYTES)
                .clamp(1, crate::limits::PEER_BATCH_BYTES),
        })
    }
}

/// Whoever can read the secret can mint any token, the admin's included: say so when the file
/// is open to other users (as `wraft auth secret` never makes it), but start anyway, as a
/// deployment may grant access through a group on purpose.
fn warn_if_readable_by_others(path: &std::path::Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = std::fs::metadata(path) {
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                tracing::warn!(
                    file = %path.display(),
                    mode = format!("{mode:o}"),
                    "the auth secret file is readable by other users; it grants admin access (chmod 600)"
                );
            }
        }
    }
    #[cfg(not(unix))]
    let _ = path;
}

/// A list flag replaces the file's list; an empty one (not given) leaves the file's.
fn or_file(flag: Vec<String>, file: Option<Vec<String>>) -> Vec<String> {
    if flag.is_empty() {
        file.unwrap_or_default()
    } else {
        flag
    }
}

pub async fn run(args: Args) -> ExitCode {
    let config = match args.resolve() {
        Ok(c) => c,
        Err(err) => {
            eprintln!("error: {err}");
            return ExitCode::from(2);
        }
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

    /// `wraft serve ARGS` parsed as the CLI parses it.
    fn serve(args: &[&str]) -> Args {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            serve: Args,
        }
        let argv = std::iter::once("serve").chain(args.iter().copied());
        <Cli as clap::Parser>::try_parse_from(argv).unwrap().serve
    }

    #[test]
    fn a_flag_beats_the_file_which_beats_the_default() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wraft.toml");
        std::fs::write(
            &path,
            "listen = \"127.0.0.1:7102\"\ndata-dir = \"/from/file\"\nid = 2\n\
             peers = [\"1=127.0.0.1:7101\", \"2=127.0.0.1:7102\"]\n",
        )
        .unwrap();
        let file = path.to_str().unwrap();
        let c = serve(&["--config", file]).resolve().unwrap();
        assert_eq!(c.listen, "127.0.0.1:7102".parse().unwrap());
        assert_eq!(c.data_dir, PathBuf::from("/from/file"));
        assert_eq!((c.id, c.peers.len()), (2, 2));
        assert_eq!(c.request_timeout, Duration::from_millis(5000), "default");
        assert!(c.tls.is_none() && c.metrics_listen.is_none());
        assert!(!c.auth.is_on(), "auth is off unless a secret is given");
        let c = serve(&[
            "--config",
            file,
            "--data-dir",
            "/from/flag",
            "--peers",
            "2=h:1",
        ])
        .resolve()
        .unwrap();
        assert_eq!(c.data_dir, PathBuf::from("/from/flag"));
        assert_eq!(c.peers.len(), 1, "a list flag replaces the file's list");
        let c = serve(&["--metrics-listen", "127.0.0.1:9100"])
            .resolve()
            .unwrap();
        assert_eq!(c.metrics_listen, Some("127.0.0.1:9100".parse().unwrap()));
    }

    #[test]
    fn boolean_flags_override_the_file_both_ways() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wraft.toml");
        std::fs::write(&path, "log-json = true\n").unwrap();
        let file = path.to_str().unwrap();
        assert!(serve(&["--config", file]).log_json());
        assert!(!serve(&["--config", file, "--log-json=false"]).log_json());
        assert!(serve(&["--log-json"]).log_json());
        assert!(!serve(&[]).log_json());
    }

    #[test]
    fn half_a_tls_setup_is_refused() {
        let err = serve(&["--tls-cert", "/x.pem"]).resolve().unwrap_err();
        assert!(err.contains("all three"), "{err}");
        let err = serve(&["--client-cert-required"]).resolve().unwrap_err();
        assert!(err.contains("needs TLS"), "{err}");
        let err = serve(&[
            "--tls-cert",
            "/no/cert.pem",
            "--tls-key",
            "/k",
            "--tls-ca",
            "/c",
        ])
        .resolve()
        .unwrap_err();
        assert!(err.starts_with("read --tls-cert /no/cert.pem: "), "{err}");
    }

    #[test]
    fn an_auth_secret_file_turns_auth_on() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("auth.secret");
        std::fs::write(&secret, Secret::generate().unwrap().to_hex()).unwrap();
        let path = secret.to_str().unwrap();
        assert!(serve(&["--auth-secret-file", path])
            .resolve()
            .unwrap()
            .auth
            .is_on());
        let config = dir.path().join("wraft.toml");
        std::fs::write(&config, format!("auth-secret-file = {path:?}\n")).unwrap();
        assert!(serve(&["--config", config.to_str().unwrap()])
            .resolve()
            .unwrap()
            .auth
            .is_on());
        std::fs::write(&secret, "not hex\n").unwrap();
        let err = serve(&["--auth-secret-file", path]).resolve().unwrap_err();
        assert!(err.starts_with(&format!("auth secret {path}: ")), "{err}");
        let err = serve(&["--auth-secret-file", "/no/secret"])
            .resolve()
            .unwrap_err();
        assert!(err.starts_with("read auth secret /no/secret: "), "{err}");
    }

    #[test]
    fn a_bad_config_file_is_an_error_naming_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wraft.toml");
        std::fs::write(&path, "lisen = \"127.0.0.1:1\"\n").unwrap();
        let err = serve(&["--config", path.to_str().unwrap()])
            .resolve()
            .unwrap_err();
        assert!(
            err.starts_with(&format!("config {}: ", path.display())),
            "{err}"
        );
        assert!(err.contains("unknown field `lisen`"), "{err}");
    }
}
