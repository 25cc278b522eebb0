//! Access control: the cluster auth secret, the tokens derived from it, and the check every
//! client RPC makes.
//!
//! Stateless and the same on every node: a token is an HMAC-SHA256 of what it grants, keyed by
//! the cluster secret (32 random bytes, hex in a file every node is given, like a TLS key).
//! A node stores no token and no user list; it recomputes the MAC and compares in constant time.
//!
//! - tenant token: `wraft-t1.<tenant>.<hex HMAC(secret, "tenant\0" + tenant)>`: exec, query,
//!   digest and deploy (create or upgrade) of that one tenant; status, listing only that tenant.
//! - admin token: `wraft-a1.<hex HMAC(secret, "admin")>`: everything, including delete,
//!   leadership transfer and membership, and status listing every tenant.
//!
//! Clients send `authorization: Bearer <token>`. Revocation is by rotation: a new secret on
//! every node invalidates every token minted from the old one.
//!
//! Keeps true: with auth on, no RPC does any work (validation, forwarding, proposing) before
//! [`Auth::check`] has accepted its token; every refusal is a definite failure (nothing ran).

use std::path::Path;
use std::sync::Arc;

use hmac::{Hmac, Mac};
use sha2::Sha256;
use tonic::metadata::{Ascii, MetadataMap, MetadataValue};

use crate::error::{with_outcome, Outcome};

/// The gRPC metadata key that carries the token (`Bearer <token>`), as HTTP does.
pub const AUTHORIZATION_KEY: &str = "authorization";
/// The prefix of a tenant token; the version lets the format change without ambiguity.
pub const TENANT_PREFIX: &str = "wraft-t1.";
/// The prefix of the admin token.
pub const ADMIN_PREFIX: &str = "wraft-a1.";
/// Bytes of randomness in a cluster secret.
pub const SECRET_BYTES: usize = 32;
/// What a client is told when it sent no token to a node that requires one.
pub const MISSING_TOKEN: &str = "this cluster requires a token: pass --token or WRAFT_TOKEN";

type HmacSha256 = Hmac<Sha256>;

/// The cluster auth secret. Its bytes never reach logs or debug output.
#[derive(Clone)]
pub struct Secret {
    bytes: [u8; SECRET_BYTES],
    /// HMAC keyed once with `bytes` (its inner and outer pads computed), cloned per token.
    keyed: HmacSha256,
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// Why a secret file could not be used (by `serve` at startup, or by `wraft auth token`).
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("read auth secret {}: {source}", path.display())]
    Read {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("auth secret {}: {message}", path.display())]
    Invalid {
        path: std::path::PathBuf,
        message: String,
    },
}

impl Secret {
    /// A new random secret. `rand::rng()` is a CSPRNG seeded from the operating system.
    pub fn generate() -> Result<Self, String> {
        Self::from_bytes(rand::random())
    }

    fn from_bytes(bytes: [u8; SECRET_BYTES]) -> Result<Self, String> {
        // HMAC accepts keys of any length, so this does not fail; it is checked once here, at
        // startup, so that no request path has a failure to handle.
        let keyed = HmacSha256::new_from_slice(&bytes).map_err(|e| format!("HMAC key: {e}"))?;
        Ok(Self { bytes, keyed })
    }

    /// Parses the file format: 64 hex digits, surrounding whitespace ignored.
    pub fn from_hex(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let bytes = hex::decode(text).map_err(|_| {
            format!(
                "expected {} hex digits (as `wraft auth secret` writes)",
                SECRET_BYTES * 2
            )
        })?;
        let bytes: [u8; SECRET_BYTES] = bytes.try_into().map_err(|b: Vec<u8>| {
            format!(
                "expected {} hex digits, found {}",
                SECRET_BYTES * 2,
                b.len() * 2
            )
        })?;
        Self::from_bytes(bytes)
    }

    /// The file format: hex and a newline.
    pub fn to_hex(&self) -> String {
        format!("{}\n", hex::encode(self.bytes))
    }

    /// Reads a secret file.
    pub fn load(path: &Path) -> Result<Self, SecretError> {
        let text = std::fs::read_to_string(path).map_err(|source| SecretError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_hex(&text).map_err(|message| SecretError::Invalid {
            path: path.to_path_buf(),
            message,
        })
    }

    fn tenant_mac(&self, tenant: &str) -> HmacSha256 {
        let mut mac = self.keyed.clone();
        mac.update(b"tenant\0");
        mac.update(tenant.as_bytes());
        mac
    }

    fn admin_mac(&self) -> HmacSha256 {
        let mut mac = self.keyed.clone();
        mac.update(b"admin");
        mac
    }

    /// The token of one tenant. The caller checks the name (`limits::check_tenant_name`).
    pub fn tenant_token(&self, tenant: &str) -> String {
        let tag = self.tenant_mac(tenant).finalize().into_bytes();
        format!("{TENANT_PREFIX}{tenant}.{}", hex::encode(tag))
    }

    /// The admin token.
    pub fn admin_token(&self) -> String {
        let tag = self.admin_mac().finalize().into_bytes();
        format!("{ADMIN_PREFIX}{}", hex::encode(tag))
    }

    /// Who a token speaks for, or `None` when it was not minted from this secret. The MAC is
    /// compared in constant time (`verify_slice`), so timing tells nothing about its bytes.
    pub fn verify(&self, token: &str) -> Option<Principal> {
        if let Some(rest) = token.strip_prefix(ADMIN_PREFIX) {
            let tag = hex::decode(rest).ok()?;
            return self
                .admin_mac()
                .verify_slice(&tag)
                .ok()
                .map(|()| Principal::Admin);
        }
        let rest = token.strip_prefix(TENANT_PREFIX)?;
        // Tenant names may contain `.`, hex never does: the tag follows the last dot.
        let (tenant, tag) = rest.rsplit_once('.')?;
        let tag = hex::decode(tag).ok()?;
        self.tenant_mac(tenant)
            .verify_slice(&tag)
            .ok()
            .map(|()| Principal::Tenant(tenant.to_string()))
    }
}

/// Whom a valid token speaks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// The admin token, or any caller when auth is off.
    Admin,
    /// One tenant's token.
    Tenant(String),
}

impl Principal {
    /// Whether this principal may see `tenant` (in a status listing, say).
    pub fn may_see(&self, tenant: &str) -> bool {
        match self {
            Principal::Admin => true,
            Principal::Tenant(own) => own == tenant,
        }
    }
}

/// What an RPC needs.
#[derive(Debug, Clone, Copy)]
pub enum Access<'a> {
    /// Any valid token (status).
    Any,
    /// This tenant's token or the admin token (exec, query, digest, deploy).
    Tenant(&'a str),
    /// The admin token; the text names the action, for the error message.
    Admin(&'static str),
}

/// Why a request was refused. Both are definite: nothing was done.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Denied {
    #[error("{MISSING_TOKEN}")]
    Missing,
    #[error("the token is not valid for this cluster (malformed, or not minted from this cluster's secret: was it rotated?)")]
    Invalid,
    #[error("a token for tenant `{own}` may not use tenant `{tenant}`")]
    OtherTenant { own: String, tenant: String },
    #[error("{action} needs the admin token (this is a token for tenant `{own}`)")]
    NotAdmin { action: &'static str, own: String },
}

impl From<Denied> for tonic::Status {
    fn from(denied: Denied) -> Self {
        let code = match denied {
            Denied::Missing | Denied::Invalid => tonic::Code::Unauthenticated,
            Denied::OtherTenant { .. } | Denied::NotAdmin { .. } => tonic::Code::PermissionDenied,
        };
        with_outcome(
            tonic::Status::new(code, denied.to_string()),
            Outcome::Definite,
        )
    }
}

/// A node's access control: off, or on with the cluster secret. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Auth {
    secret: Option<Arc<Secret>>,
}

impl Auth {
    /// Every request is allowed, as [`Principal::Admin`].
    pub fn off() -> Self {
        Self { secret: None }
    }

    /// Requests need a token minted from `secret`.
    pub fn on(secret: Secret) -> Self {
        Self {
            secret: Some(Arc::new(secret)),
        }
    }

    pub fn is_on(&self) -> bool {
        self.secret.is_some()
    }

    /// One phrase for the startup log line.
    pub fn describe(&self) -> &'static str {
        if self.is_on() {
            "tokens required (cluster auth secret loaded)"
        } else {
            "off: no token needed (start with --auth-secret-file to require tokens)"
        }
    }

    /// Checks a request's token against what the RPC needs; returns whom it speaks for.
    pub fn check(&self, metadata: &MetadataMap, access: Access<'_>) -> Result<Principal, Denied> {
        let Some(secret) = &self.secret else {
            return Ok(Principal::Admin);
        };
        let token = bearer_token(metadata)?;
        let principal = secret.verify(token).ok_or(Denied::Invalid)?;
        match (access, &principal) {
            (_, Principal::Admin) | (Access::Any, _) => Ok(principal),
            (Access::Tenant(tenant), Principal::Tenant(own)) if own == tenant => Ok(principal),
            (Access::Tenant(tenant), Principal::Tenant(own)) => Err(Denied::OtherTenant {
                own: own.clone(),
                tenant: shown(tenant),
            }),
            (Access::Admin(action), Principal::Tenant(own)) => Err(Denied::NotAdmin {
                action,
                own: own.clone(),
            }),
        }
    }
}

/// A requested tenant name as an error message may show it. The check runs before the name
/// is validated, so a name that is not one (a megabyte of it, say) is not echoed back.
fn shown(tenant: &str) -> String {
    match crate::limits::check_tenant_name(tenant) {
        Ok(()) => tenant.to_string(),
        Err(_) => "(an invalid tenant name)".to_string(),
    }
}

/// The token of an `authorization: Bearer <token>` entry. An entry that is there but not a
/// bearer token (or not text) is an invalid token, not a missing one.
fn bearer_token(metadata: &MetadataMap) -> Result<&str, Denied> {
    let value = metadata.get(AUTHORIZATION_KEY).ok_or(Denied::Missing)?;
    let value = value.to_str().map_err(|_| Denied::Invalid)?.trim();
    let (scheme, token) = value.split_once(' ').ok_or(Denied::Invalid)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(Denied::Invalid);
    }
    Ok(token.trim())
}

/// The metadata value a client sends for `token`. A token that cannot travel as an ASCII header
/// value (a stray newline, say) is refused here, before anything is sent.
pub fn bearer(token: &str) -> Result<MetadataValue<Ascii>, String> {
    let token = token.trim();
    if token.is_empty() {
        return Err("the token is empty".into());
    }
    MetadataValue::try_from(format!("Bearer {token}"))
        .map_err(|_| "the token has characters that cannot be sent (only printable ASCII)".into())
}

/// The caller's `authorization` entry, as it came: a follower forwards it to the leader.
pub fn authorization_of(metadata: &MetadataMap) -> Option<MetadataValue<Ascii>> {
    metadata.get(AUTHORIZATION_KEY).cloned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(byte: u8) -> Secret {
        Secret::from_bytes([byte; SECRET_BYTES]).unwrap()
    }

    fn with_token(token: &str) -> MetadataMap {
        let mut m = MetadataMap::new();
        m.insert(AUTHORIZATION_KEY, bearer(token).unwrap());
        m
    }

    #[test]
    fn tokens_have_the_documented_form() {
        let s = secret(7);
        let t = s.tenant_token("shop");
        assert!(t.starts_with("wraft-t1.shop."), "{t}");
        assert_eq!(t.len(), "wraft-t1.shop.".len() + 64);
        let a = s.admin_token();
        assert!(a.starts_with("wraft-a1."), "{a}");
        assert_eq!(a.len(), "wraft-a1.".len() + 64);
        // Deterministic: every node derives the same token from the same secret.
        assert_eq!(t, secret(7).tenant_token("shop"));
        // And the tag is HMAC-SHA256(secret, "tenant\0" + tenant), checked independently.
        let mut mac = HmacSha256::new_from_slice(&[7u8; 32]).unwrap();
        mac.update(b"tenant\0shop");
        assert!(t.ends_with(&hex::encode(mac.finalize().into_bytes())));
    }

    #[test]
    fn verify_accepts_its_own_tokens_only() {
        let s = secret(1);
        assert_eq!(s.verify(&s.admin_token()), Some(Principal::Admin));
        assert_eq!(
            s.verify(&s.tenant_token("a.b-c")),
            Some(Principal::Tenant("a.b-c".into())),
            "tenant names with dots parse"
        );
        let other = secret(2);
        assert_eq!(s.verify(&other.admin_token()), None, "another secret");
        assert_eq!(s.verify(&other.tenant_token("a")), None);
        // A tenant's tag does not work for another name, nor as the admin tag.
        let t = s.tenant_token("a");
        let tag = t.rsplit_once('.').unwrap().1;
        assert_eq!(s.verify(&format!("wraft-t1.b.{tag}")), None);
        assert_eq!(s.verify(&format!("wraft-a1.{tag}")), None);
        for junk in [
            "",
            "wraft-t1.",
            "wraft-t1.a",
            "wraft-t1.a.zz",
            "wraft-a1.",
            "wraft-a1.00",
            "nonsense",
        ] {
            assert_eq!(s.verify(junk), None, "{junk:?}");
        }
        // A truncated tag is refused (verify_slice checks the length).
        assert_eq!(s.verify(&t[..t.len() - 2]), None);
    }

    #[test]
    fn check_grants_what_each_token_may_do() {
        let s = secret(3);
        let auth = Auth::on(s.clone());
        let a = with_token(&s.tenant_token("a"));
        let admin = with_token(&s.admin_token());

        assert_eq!(
            auth.check(&a, Access::Tenant("a")),
            Ok(Principal::Tenant("a".into()))
        );
        assert_eq!(
            auth.check(&a, Access::Tenant("b")),
            Err(Denied::OtherTenant {
                own: "a".into(),
                tenant: "b".into()
            })
        );
        let huge = "x/".repeat(100_000);
        assert_eq!(
            auth.check(&a, Access::Tenant(&huge)),
            Err(Denied::OtherTenant {
                own: "a".into(),
                tenant: "(an invalid tenant name)".into()
            }),
            "an invalid name is not echoed"
        );
        assert!(matches!(
            auth.check(&a, Access::Admin("deleting a tenant")),
            Err(Denied::NotAdmin { .. })
        ));
        assert_eq!(
            auth.check(&a, Access::Any),
            Ok(Principal::Tenant("a".into()))
        );
        for access in [
            Access::Any,
            Access::Tenant("b"),
            Access::Admin("deleting a tenant"),
        ] {
            assert_eq!(auth.check(&admin, access), Ok(Principal::Admin));
        }
    }

    #[test]
    fn missing_and_malformed_tokens_are_unauthenticated() {
        let s = secret(4);
        let auth = Auth::on(s.clone());
        assert_eq!(
            auth.check(&MetadataMap::new(), Access::Any),
            Err(Denied::Missing)
        );
        assert_eq!(
            auth.check(&with_token("garbage"), Access::Any),
            Err(Denied::Invalid)
        );
        let mut basic = MetadataMap::new();
        basic.insert(
            AUTHORIZATION_KEY,
            MetadataValue::from_static("Basic dXNlcjpwYXNz"),
        );
        assert_eq!(auth.check(&basic, Access::Any), Err(Denied::Invalid));
        let mut bare = MetadataMap::new();
        bare.insert(
            AUTHORIZATION_KEY,
            MetadataValue::try_from(s.admin_token()).unwrap(),
        );
        assert_eq!(
            auth.check(&bare, Access::Any),
            Err(Denied::Invalid),
            "no scheme"
        );
        let mut lower = MetadataMap::new();
        lower.insert(
            AUTHORIZATION_KEY,
            MetadataValue::try_from(format!("bearer {}", s.admin_token())).unwrap(),
        );
        assert_eq!(auth.check(&lower, Access::Any), Ok(Principal::Admin));
    }

    #[test]
    fn refusals_are_definite_statuses_with_the_right_codes() {
        let status = tonic::Status::from(Denied::Missing);
        assert_eq!(status.code(), tonic::Code::Unauthenticated);
        assert_eq!(status.message(), MISSING_TOKEN);
        assert_eq!(Outcome::of_status(&status), Some(Outcome::Definite));
        let status = tonic::Status::from(Denied::OtherTenant {
            own: "a".into(),
            tenant: "b".into(),
        });
        assert_eq!(status.code(), tonic::Code::PermissionDenied);
        assert!(status.message().contains("`b`"), "{}", status.message());
        assert_eq!(Outcome::of_status(&status), Some(Outcome::Definite));
    }

    #[test]
    fn auth_off_allows_everything() {
        let auth = Auth::off();
        assert!(!auth.is_on());
        assert_eq!(
            auth.check(&MetadataMap::new(), Access::Admin("deleting a tenant")),
            Ok(Principal::Admin)
        );
        assert_eq!(
            auth.check(&with_token("garbage"), Access::Tenant("x")),
            Ok(Principal::Admin),
            "a token sent to a node without auth is ignored"
        );
    }

    #[test]
    fn the_secret_file_format_round_trips_and_refuses_nonsense() {
        let s = Secret::generate().unwrap();
        let back = Secret::from_hex(&s.to_hex()).unwrap();
        assert_eq!(back.admin_token(), s.admin_token());
        assert_ne!(Secret::generate().unwrap().admin_token(), s.admin_token());
        assert!(Secret::from_hex("abcd").unwrap_err().contains("found 4"));
        assert!(Secret::from_hex("not hex").is_err());
        assert!(Secret::from_hex("").is_err());
        assert_eq!(
            format!("{s:?}"),
            "Secret(..)",
            "no key bytes in debug output"
        );
        let err = Secret::load(Path::new("/nonexistent/secret"))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("read auth secret /nonexistent/secret: "),
            "{err}"
        );
    }

    #[test]
    fn bearer_refuses_tokens_that_cannot_travel() {
        assert!(bearer("").is_err());
        assert!(bearer("a\nb").is_err());
        assert_eq!(bearer(" t ").unwrap().to_str().unwrap(), "Bearer t");
    }
}
