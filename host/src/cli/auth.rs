//! `wraft auth secret` and `wraft auth token`: make the cluster auth secret, mint tokens from it.
//!
//! Both run offline: tokens are derived from the secret (see [`crate::auth`]), so minting one
//! needs the secret file and no node. Whoever holds the secret can mint any token, the admin's
//! included: it is as sensitive as a TLS private key.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use crate::auth::Secret;

#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Write a new cluster auth secret (32 random bytes, hex) to a file readable only by its
    /// owner. Give every node the same file (`serve --auth-secret-file`). A new secret is how
    /// tokens are revoked: every token minted from the old one stops working.
    Secret(SecretArgs),
    /// Print a token minted from the secret: a tenant's (that tenant only) or the admin's.
    Token(TokenArgs),
}

#[derive(clap::Args, Debug)]
pub struct SecretArgs {
    /// The file to create; an existing file is never overwritten.
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
}

#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("who").required(true).args(["tenant", "admin"])))]
pub struct TokenArgs {
    /// The cluster auth secret file.
    #[arg(long, env = "WRAFT_AUTH_SECRET_FILE", value_name = "FILE")]
    secret_file: PathBuf,
    /// Mint a token for this tenant: exec, query, digest and deploy of it, nothing else.
    #[arg(long, value_name = "NAME")]
    tenant: Option<String>,
    /// Mint the admin token: every tenant, delete, leadership and membership.
    #[arg(long)]
    admin: bool,
}

pub fn run(command: Command) -> ExitCode {
    let result = match command {
        Command::Secret(args) => secret(&args.out),
        Command::Token(args) => token(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::from(2)
        }
    }
}

fn secret(out: &Path) -> Result<(), String> {
    let secret = Secret::generate()?;
    let mut options = std::fs::OpenOptions::new();
    // `create_new`: refusing to overwrite keeps a typo from replacing a live cluster's secret
    // (which would lock every client out). Mode 0600 from the start, never briefly wider.
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(out).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            format!(
                "{} exists; not overwriting a secret (remove it first to rotate)",
                out.display()
            )
        } else {
            format!("create {}: {e}", out.display())
        }
    })?;
    file.write_all(secret.to_hex().as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|e| format!("write {}: {e}", out.display()))?;
    eprintln!(
        "wrote {}: give every node this file (`wraft serve --auth-secret-file {}`), then mint \
         tokens with `wraft auth token --secret-file {} --tenant NAME` or `--admin`",
        out.display(),
        out.display(),
        out.display()
    );
    Ok(())
}

fn token(args: &TokenArgs) -> Result<(), String> {
    let secret = Secret::load(&args.secret_file).map_err(|e| e.to_string())?;
    let token = match (&args.tenant, args.admin) {
        (Some(tenant), false) => {
            crate::limits::check_tenant_name(tenant).map_err(|e| e.to_string())?;
            secret.tenant_token(tenant)
        }
        (None, true) => secret.admin_token(),
        // clap's group makes exactly one of them required; stay total anyway.
        _ => return Err("give exactly one of --tenant NAME and --admin".into()),
    };
    println!("{token}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_refuses_to_overwrite_and_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("auth.secret");
        secret(&path).unwrap();
        let first = std::fs::read_to_string(&path).unwrap();
        assert!(Secret::from_hex(&first).is_ok());
        let err = secret(&path).unwrap_err();
        assert!(err.contains("not overwriting"), "{err}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), first);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn token_checks_the_tenant_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("auth.secret");
        secret(&path).unwrap();
        let args = |tenant: &str| TokenArgs {
            secret_file: path.clone(),
            tenant: Some(tenant.into()),
            admin: false,
        };
        assert!(token(&args("shop")).is_ok());
        assert!(token(&args("no/slash")).is_err());
        let missing = TokenArgs {
            secret_file: dir.path().join("none"),
            tenant: None,
            admin: true,
        };
        assert!(token(&missing).unwrap_err().contains("read auth secret"));
    }
}
