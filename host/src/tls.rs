//! TLS material: loads PEM files into tonic's server and client TLS configurations, and decides
//! which certificates may speak for a peer.
//!
//! The trust model, with `--tls-cert/--tls-key/--tls-ca` set on a node:
//! - Every connection to the node's one port is TLS. The node proves itself with its certificate;
//!   a client certificate, when one is presented, must chain to the cluster CA (`--tls-ca`), or
//!   the handshake fails. With `--client-cert-required` a connection without one fails too.
//! - Raft traffic is accepted only from a certificate that chains to the cluster CA **and** names
//!   [`PEER_NAME`] as a subject alternative name ([`is_peer_certificate`]). `wraft certs` puts
//!   that name in node certificates only, so a client certificate from the same CA can use the
//!   client API but can never pose as a node.
//! - A node dials its peers and the leader (forwarding) with its own certificate: mutual TLS.
//!
//! Without those flags everything is plain text, for local development.

use std::path::{Path, PathBuf};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// The subject alternative name (a DNS name) that marks a certificate as a node's. Peers accept
/// raft traffic only from certificates that carry it.
pub const PEER_NAME: &str = "wraft-peer";

/// Why TLS material could not be loaded. `flag` names the option the path came from, so that the
/// message tells the operator what to fix ("read --tls-cert /x/node.pem: No such file ...").
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("read {flag} {}: {source}", path.display())]
    Read {
        flag: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{flag} {}: no PEM certificate in the file", path.display())]
    NoCertificate { flag: &'static str, path: PathBuf },
    #[error("{flag} {}: no PEM private key in the file ({reason})", path.display())]
    NoKey {
        flag: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("{0} is given without {1}: both are needed")]
    Incomplete(&'static str, &'static str),
}

/// A node's TLS files (`wraft serve --tls-cert --tls-key --tls-ca`).
#[derive(Debug, Clone)]
pub struct NodeTlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

/// A node's loaded TLS configuration: how it serves and how it dials peers and the leader.
#[derive(Clone)]
pub struct NodeTls {
    pub server: ServerTlsConfig,
    pub client: ClientTlsConfig,
    /// Whether clients of the client API must present a CA-signed certificate as well.
    pub client_cert_required: bool,
}

impl std::fmt::Debug for NodeTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Key material stays out of logs and debug output.
        f.debug_struct("NodeTls")
            .field("client_cert_required", &self.client_cert_required)
            .finish_non_exhaustive()
    }
}

impl NodeTls {
    /// Reads and checks the node's certificate, key and the cluster CA.
    pub fn load(files: &NodeTlsFiles, client_cert_required: bool) -> Result<Self, TlsError> {
        let cert = read_certs("--tls-cert", &files.cert)?;
        let key = read_key("--tls-key", &files.key)?;
        let ca = read_certs("--tls-ca", &files.ca)?;
        let identity = Identity::from_pem(&cert, &key);
        let server = ServerTlsConfig::new()
            .identity(identity.clone())
            .client_ca_root(Certificate::from_pem(&ca))
            // Optional at the handshake so that certificate-less clients can reach the client
            // API; the peer service refuses any stream without a node certificate itself.
            .client_auth_optional(!client_cert_required);
        let client = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&ca))
            .identity(identity);
        Ok(Self {
            server,
            client,
            client_cert_required,
        })
    }

    /// One line for the startup log.
    pub fn describe(&self) -> &'static str {
        if self.client_cert_required {
            "TLS; peers and clients need a certificate from the cluster CA"
        } else {
            "TLS; peers need a node certificate from the cluster CA, clients may present none"
        }
    }
}

/// A client's TLS configuration from `--ca`, `--cert` and `--key` (all optional; `--cert` and
/// `--key` go together). `None` when none is given: plain text.
pub fn client_config(
    ca: Option<&Path>,
    cert: Option<&Path>,
    key: Option<&Path>,
) -> Result<Option<ClientTlsConfig>, TlsError> {
    let identity = match (cert, key) {
        (Some(cert), Some(key)) => Some(Identity::from_pem(
            read_certs("--cert", cert)?,
            read_key("--key", key)?,
        )),
        (Some(_), None) => return Err(TlsError::Incomplete("--cert", "--key")),
        (None, Some(_)) => return Err(TlsError::Incomplete("--key", "--cert")),
        (None, None) => None,
    };
    if ca.is_none() && identity.is_none() {
        return Ok(None);
    }
    let mut config = ClientTlsConfig::new();
    match ca {
        Some(ca) => config = config.ca_certificate(Certificate::from_pem(read_certs("--ca", ca)?)),
        // No private CA given: trust the system's roots (a node with a public certificate).
        None => config = config.with_enabled_roots(),
    }
    if let Some(identity) = identity {
        config = config.identity(identity);
    }
    Ok(Some(config))
}

/// The URL for `HOST:PORT` (kept as is when it already has a scheme).
pub fn url(endpoint: &str, tls: bool) -> String {
    if endpoint.starts_with("http://") || endpoint.starts_with("https://") {
        endpoint.to_string()
    } else if tls {
        format!("https://{endpoint}")
    } else {
        format!("http://{endpoint}")
    }
}

/// Whether a certificate (already verified against the cluster CA by the TLS handshake) is a
/// node's: it names [`PEER_NAME`].
pub fn is_peer_certificate(cert: &CertificateDer<'_>) -> bool {
    let Ok(name) = ServerName::try_from(PEER_NAME) else {
        return false;
    };
    webpki::EndEntityCert::try_from(cert)
        .and_then(|c| c.verify_is_valid_for_subject_name(&name))
        .is_ok()
}

/// Whether a connection error is a certificate problem: it will not go away by retrying, so it
/// deserves a warning rather than the debug line of an ordinary unreachable peer.
pub fn is_certificate_error(chain: &str) -> bool {
    let lower = chain.to_ascii_lowercase();
    lower.contains("certificate") || lower.contains("tls") || lower.contains("handshake")
}

/// An error and its sources on one line: tonic's own messages ("transport error") say little.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

fn read(flag: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        flag,
        path: path.to_path_buf(),
        source,
    })
}

/// Reads a PEM file and checks that it holds at least one certificate.
fn read_certs(flag: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    let pem = read(flag, path)?;
    let found = CertificateDer::pem_slice_iter(&pem).any(|c| c.is_ok());
    if !found {
        return Err(TlsError::NoCertificate {
            flag,
            path: path.to_path_buf(),
        });
    }
    Ok(pem)
}

/// Reads a PEM file and checks that it holds a private key.
fn read_key(flag: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    let pem = read(flag, path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| TlsError::NoKey {
        flag,
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    Ok(pem)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_files_name_the_flag_and_path() {
        let err = client_config(Some(Path::new("/nonexistent/ca.pem")), None, None)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.starts_with("read --ca /nonexistent/ca.pem: "), "{err}");
        assert!(matches!(
            client_config(None, Some(Path::new("/x")), None),
            Err(TlsError::Incomplete("--cert", "--key"))
        ));
        assert!(matches!(client_config(None, None, None), Ok(None)));
    }

    #[test]
    fn a_file_without_pem_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a certificate").unwrap();
        let err = read_certs("--tls-ca", &junk).unwrap_err().to_string();
        assert!(
            err.contains("--tls-ca") && err.contains("no PEM certificate"),
            "{err}"
        );
        let err = read_key("--tls-key", &junk).unwrap_err().to_string();
        assert!(
            err.contains("--tls-key") && err.contains("no PEM private key"),
            "{err}"
        );
    }

    #[test]
    fn urls_follow_the_tls_setting() {
        assert_eq!(url("a:1", false), "http://a:1");
        assert_eq!(url("a:1", true), "https://a:1");
        assert_eq!(url("http://a:1", true), "http://a:1");
    }
}
