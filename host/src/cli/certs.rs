//! `wraft certs`: a certificate authority and certificates for a local cluster, for trying TLS
//! and for tests. Production clusters should use certificates from their own CA; what matters
//! to wraft is that node certificates carry the name [`PEER_NAME`] (see [`crate::tls`]).
//!
//! Writes into `--out`: `ca.pem`, `ca-key.pem`, `node-N.pem` + `node-N-key.pem` for N in
//! 1..=--nodes, and `client.pem` + `client-key.pem`. Keys are written readable by the owner only.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use rcgen::{
    date_time_ymd, BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};

use crate::tls::PEER_NAME;

/// How many years the certificates are valid for.
const VALID_YEARS: i32 = 5;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Directory to write the files into (created if missing).
    #[arg(long)]
    out: PathBuf,
    /// How many node certificates to make (node-1 .. node-N).
    #[arg(long, default_value_t = 3)]
    nodes: u32,
    /// Host names and IP addresses the nodes are reached at, comma-separated; every node
    /// certificate names all of them.
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1,localhost")]
    hosts: Vec<String>,
    /// Replace files that already exist.
    #[arg(long)]
    force: bool,
}

/// Why certificates could not be made.
#[derive(Debug, thiserror::Error)]
enum CertsError {
    #[error("{0}")]
    Usage(String),
    #[error("make {what}: {source}")]
    Generate { what: String, source: rcgen::Error },
    #[error("write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

pub async fn run(args: Args) -> ExitCode {
    match make(&args) {
        Ok(written) => {
            for path in written {
                println!("{}", path.display());
            }
            ExitCode::SUCCESS
        }
        Err(err @ CertsError::Usage(_)) => {
            eprintln!("error: {err}");
            ExitCode::from(2)
        }
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::from(1)
        }
    }
}

/// Makes every certificate first, then writes the files: a failure writes nothing.
fn make(args: &Args) -> Result<Vec<PathBuf>, CertsError> {
    if args.nodes == 0 {
        return Err(CertsError::Usage("--nodes must be at least 1".into()));
    }
    let hosts: Vec<String> = args
        .hosts
        .iter()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .collect();
    if hosts.is_empty() {
        return Err(CertsError::Usage("--hosts names no host".into()));
    }
    let ca_key = generate_key("the CA key")?;
    let mut ca_params = CertificateParams::default();
    ca_params.distinguished_name = rcgen::DistinguishedName::new();
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "wraft cluster CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    set_validity(&mut ca_params);
    let ca_cert = ca_params
        .self_signed(&ca_key)
        .map_err(|source| CertsError::Generate {
            what: "the CA certificate".into(),
            source,
        })?;
    let mut files = vec![
        ("ca.pem".to_string(), ca_cert.pem()),
        ("ca-key.pem".to_string(), ca_key.serialize_pem()),
    ];
    let issuer = Issuer::new(ca_params, ca_key);

    for n in 1..=args.nodes {
        // The node's hosts (checked by whoever dials it) plus the peer marker (checked by the
        // peers it dials). Both uses: it serves and it dials.
        let mut names = hosts.clone();
        names.push(PEER_NAME.to_string());
        let what = format!("the certificate of node {n}");
        let (cert, key) = leaf(
            &issuer,
            names,
            &format!("wraft node {n}"),
            &[
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
            &what,
        )?;
        files.push((format!("node-{n}.pem"), cert));
        files.push((format!("node-{n}-key.pem"), key));
    }
    // No peer marker: a client may use the client API but not speak raft.
    let (cert, key) = leaf(
        &issuer,
        Vec::new(),
        "wraft client",
        &[ExtendedKeyUsagePurpose::ClientAuth],
        "the client certificate",
    )?;
    files.push(("client.pem".to_string(), cert));
    files.push(("client-key.pem".to_string(), key));

    std::fs::create_dir_all(&args.out).map_err(|source| CertsError::Write {
        path: args.out.clone(),
        source,
    })?;
    if !args.force {
        if let Some((name, _)) = files.iter().find(|(name, _)| args.out.join(name).exists()) {
            return Err(CertsError::Usage(format!(
                "{} exists; pass --force to replace it",
                args.out.join(name).display()
            )));
        }
    }
    let mut written = Vec::new();
    for (name, pem) in files {
        let path = args.out.join(&name);
        write_file(&path, pem.as_bytes(), name.ends_with("-key.pem"))?;
        written.push(path);
    }
    Ok(written)
}

fn generate_key(what: &str) -> Result<KeyPair, CertsError> {
    KeyPair::generate().map_err(|source| CertsError::Generate {
        what: what.into(),
        source,
    })
}

/// An end-entity certificate signed by the CA, and its key, as PEM.
fn leaf(
    issuer: &Issuer<'_, KeyPair>,
    names: Vec<String>,
    common_name: &str,
    usages: &[ExtendedKeyUsagePurpose],
    what: &str,
) -> Result<(String, String), CertsError> {
    let generate = |source| CertsError::Generate {
        what: what.into(),
        source,
    };
    let key = generate_key(what)?;
    let mut params = CertificateParams::new(names).map_err(generate)?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = usages.to_vec();
    params.use_authority_key_identifier_extension = true;
    set_validity(&mut params);
    let cert = params.signed_by(&key, issuer).map_err(generate)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// From the start of last year (so that a clock a little behind still accepts them) to
/// [`VALID_YEARS`] later.
fn set_validity(params: &mut CertificateParams) {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    // Average Gregorian year; off by at most a day, which the margin absorbs.
    let year = 1970 + (secs / 31_556_952) as i32;
    params.not_before = date_time_ymd(year - 1, 1, 1);
    params.not_after = date_time_ymd(year + VALID_YEARS, 1, 1);
}

fn write_file(path: &Path, bytes: &[u8], secret: bool) -> Result<(), CertsError> {
    let fail = |source| CertsError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = secret;
    let mut file = options.open(path).map_err(fail)?;
    file.write_all(bytes).map_err(fail)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::CertificateDer;

    fn cert(path: &Path) -> CertificateDer<'static> {
        CertificateDer::from_pem_file(path).unwrap()
    }

    #[test]
    fn node_certificates_are_peers_and_the_client_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let args = Args {
            out: dir.path().join("certs"),
            nodes: 2,
            hosts: vec!["127.0.0.1".into(), "localhost".into()],
            force: false,
        };
        let written = make(&args).unwrap();
        assert_eq!(written.len(), 2 + 2 * 2 + 2);
        assert!(crate::tls::is_peer_certificate(&cert(
            &args.out.join("node-2.pem")
        )));
        assert!(!crate::tls::is_peer_certificate(&cert(
            &args.out.join("client.pem")
        )));
        // A second run does not overwrite without --force.
        assert!(matches!(make(&args), Err(CertsError::Usage(_))));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(args.out.join("ca-key.pem"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "keys are private");
        }
    }
}
