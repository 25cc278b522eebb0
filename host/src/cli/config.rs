//! The `wraft serve --config FILE` format: a TOML file that can set every `serve` flag.
//!
//! Keys are the flag names without the leading `--` (`data-dir`, `request-timeout-ms`).
//! A key the node does not know, or a value of the wrong type, is an error that names it: a typo
//! must not silently leave a setting at its default. Precedence (applied in `serve`):
//! flag > environment (`WRAFT_` + the flag name upper-cased, `-` as `_`) > file > default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// What a config file may set. Every field is optional: absent means "not set here".
#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FileConfig {
    pub id: Option<u64>,
    pub listen: Option<SocketAddr>,
    pub data_dir: Option<PathBuf>,
    /// `["ID=HOST:PORT", ...]`, as `--peers`.
    pub peers: Option<Vec<String>>,
    /// `["ID=HOST:PORT", ...]`, as `--dial`.
    pub dial: Option<Vec<String>>,
    pub request_timeout_ms: Option<u64>,
    pub metrics_listen: Option<SocketAddr>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub tls_ca: Option<PathBuf>,
    pub client_cert_required: Option<bool>,
    pub auth_secret_file: Option<PathBuf>,
    /// `["HOST:PORT", ...]`, as `--join`.
    pub join: Option<Vec<String>>,
    pub auto_promote: Option<bool>,
    pub snapshot_entries: Option<u64>,
    pub snapshot_chunk_bytes: Option<usize>,
    pub log_json: Option<bool>,
}

/// Why a config file could not be used; the message starts with the file's path.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("read config {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config {}: {message}", path.display())]
    Parse { path: PathBuf, message: String },
}

impl FileConfig {
    /// Reads and parses a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text).map_err(|message| ConfigError::Parse {
            path: path.to_path_buf(),
            message,
        })
    }

    /// Parses config text. The error is toml's, which names the key, line and column, on one
    /// line so that it reads well after "config PATH: ".
    pub fn parse(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e: toml::de::Error| {
            let position = e
                .span()
                .map(|span| {
                    let line = text.get(..span.start).unwrap_or(text).matches('\n').count() + 1;
                    format!("line {line}: ")
                })
                .unwrap_or_default();
            format!("{position}{}", e.message().trim())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_parses() {
        let c = FileConfig::parse(
            r#"
            id = 2
            listen = "127.0.0.1:7002"
            data-dir = "/var/lib/wraft"
            peers = ["1=127.0.0.1:7001", "2=127.0.0.1:7002"]
            dial = ["1=127.0.0.1:9001"]
            request-timeout-ms = 3000
            metrics-listen = "127.0.0.1:9102"
            tls-cert = "node-2.pem"
            tls-key = "node-2-key.pem"
            tls-ca = "ca.pem"
            client-cert-required = true
            auth-secret-file = "auth.secret"
            log-json = true
            "#,
        )
        .unwrap();
        assert_eq!(c.id, Some(2));
        assert_eq!(c.data_dir, Some(PathBuf::from("/var/lib/wraft")));
        assert_eq!(c.peers.as_ref().map(Vec::len), Some(2));
        assert_eq!(c.metrics_listen, Some("127.0.0.1:9102".parse().unwrap()));
        assert_eq!(c.client_cert_required, Some(true));
        assert_eq!(c.auth_secret_file, Some(PathBuf::from("auth.secret")));
        // Keys are spelled as the flags are, not as the fields of NodeConfig.
        assert!(FileConfig::parse("data_dir = \"/d\"").is_err());
        assert_eq!(FileConfig::parse("").unwrap(), FileConfig::default());
    }

    #[test]
    fn an_unknown_key_is_named() {
        let err = FileConfig::parse("id = 1\nlisen = \"127.0.0.1:7001\"").unwrap_err();
        assert!(err.contains("unknown field `lisen`"), "{err}");
        assert!(err.contains("expected one of"), "{err}");
        assert!(err.starts_with("line 2: "), "{err}");
    }

    #[test]
    fn a_bad_value_is_refused() {
        let err = FileConfig::parse("listen = \"nowhere\"").unwrap_err();
        assert!(err.contains("socket address"), "{err}");
        let err = FileConfig::parse("id = \"one\"").unwrap_err();
        assert!(err.contains("u64") || err.contains("integer"), "{err}");
        assert!(FileConfig::parse("peers = \"1=a:1\"").is_err());
    }

    #[test]
    fn a_missing_file_names_its_path() {
        let err = FileConfig::load(Path::new("/nonexistent/wraft.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("read config /nonexistent/wraft.toml: "),
            "{err}"
        );
    }
}
