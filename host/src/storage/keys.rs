//! Key layout and fixed-width record encodings of the node database: the column family names, the
//! keys of the `meta` records, the big-endian log keys and the `state` prefixes.
//!
//! Everything that decides how bytes sit on disk lives here, so a format change is one file and a
//! bump of [`FORMAT_VERSION`].
//!
//! Invariant: a log key is exactly 8 bytes, the big-endian entry index, so RocksDB's bytewise key
//! order is index order and "the last key" is the last entry.

use super::StorageError;

/// Node identity, hard state, conf state and compaction point.
pub(crate) const CF_META: &str = "meta";
/// Raft entries, keyed by [`log_key`].
pub(crate) const CF_LOG: &str = "log";
/// Records of the apply stage: tenant checkpoints and module bytes.
pub(crate) const CF_STATE: &str = "state";

/// Version of the on-disk layout described in this file. Written on first open and checked on
/// every later open, so a binary never misreads a directory written in another layout.
pub(crate) const FORMAT_VERSION: u32 = 2;

/// `meta` key of the format version, a big-endian u32.
pub(crate) const META_FORMAT_VERSION: &[u8] = b"format_version";
/// `meta` key of the node identity: cluster id then node id, both big-endian u64.
pub(crate) const META_IDENTITY: &[u8] = b"identity";
/// `meta` key of the raft `HardState`, protobuf bytes.
pub(crate) const META_HARD_STATE: &[u8] = b"hard_state";
/// `meta` key of the raft `ConfState`, protobuf bytes.
pub(crate) const META_CONF_STATE: &[u8] = b"conf_state";
/// `meta` key of the compaction point: index then term of the last entry removed from the log,
/// both big-endian u64 (0/0 until the log is first compacted).
pub(crate) const META_SNAPSHOT: &[u8] = b"snapshot_meta";

/// `meta` key of the conf state at the compaction point (what a snapshot's metadata carries),
/// protobuf bytes; absent until the first compaction.
pub(crate) const META_SNAPSHOT_CONF: &[u8] = b"snapshot_conf";
/// `meta` key of the index of the last conf change applied to raft, a big-endian u64: a restart
/// delivers committed entries again, and a conf change must not be applied twice.
pub(crate) const META_CONF_APPLIED: &[u8] = b"conf_applied";
/// `meta` key of the address book (`peer::PeerBook` protobuf): every member's address and
/// incarnation, replicated through conf changes and snapshots.
pub(crate) const META_PEERS: &[u8] = b"peers";
/// `meta` key of the generation of the `state` records in use, a big-endian u64. A snapshot is
/// staged under the next generation and switched to in the same synced write as its raft
/// metadata, so an install is atomic without copying the state.
pub(crate) const META_STATE_GEN: &[u8] = b"state_generation";
/// `meta` key of this data directory's incarnation, a random big-endian u64 drawn when it was
/// created: peers refuse a member whose incarnation changed (its directory was wiped).
pub(crate) const META_INCARNATION: &[u8] = b"incarnation";

/// Every `state` key starts with the generation it belongs to: 8 bytes, big-endian.
pub(crate) fn generation_prefix(generation: u64) -> [u8; 8] {
    generation.to_be_bytes()
}

/// A `state` key within a generation.
pub(crate) fn in_generation(generation: u64, key: &[u8]) -> Vec<u8> {
    [&generation_prefix(generation)[..], key].concat()
}

/// Prefix of the tenant checkpoint records in `state`: `cp/{tenant}`.
pub(crate) const CHECKPOINT_PREFIX: &[u8] = b"cp/";
/// Prefix of the module records in `state`: `mod/{sha256 hex}`.
pub(crate) const MODULE_PREFIX: &[u8] = b"mod/";

/// The `log` key of entry `index`.
pub(crate) fn log_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

/// The entry index a `log` key names; any other length means the column family was written by
/// something else.
pub(crate) fn parse_log_key(key: &[u8]) -> Result<u64, StorageError> {
    let bytes: [u8; 8] = key.try_into().map_err(|_| {
        StorageError::Corrupt(format!(
            "log key {key:02x?} is {} bytes, expected an 8-byte big-endian index",
            key.len()
        ))
    })?;
    Ok(u64::from_be_bytes(bytes))
}

pub(crate) fn checkpoint_key(tenant: &str) -> Vec<u8> {
    [CHECKPOINT_PREFIX, tenant.as_bytes()].concat()
}

/// Prefix of a store-model tenant's own keys in `state`: `dat/{tenant}/{key}` (tenant names
/// hold no `/`, see `limits::check_tenant_name`).
pub(crate) fn data_prefix(tenant: &str) -> Vec<u8> {
    [b"dat/", tenant.as_bytes(), b"/"].concat()
}

/// Prefix of a store-model tenant's session records: `ses/{tenant}/{client id}`.
pub(crate) fn session_prefix(tenant: &str) -> Vec<u8> {
    [b"ses/", tenant.as_bytes(), b"/"].concat()
}

pub(crate) fn module_key(hash_hex: &str) -> Vec<u8> {
    [MODULE_PREFIX, hash_hex.as_bytes()].concat()
}

/// Two big-endian u64s in 16 bytes (identity, compaction point).
pub(crate) fn encode_u64_pair(a: u64, b: u64) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&a.to_be_bytes());
    out[8..].copy_from_slice(&b.to_be_bytes());
    out
}

/// Inverse of [`encode_u64_pair`]; `what` names the record for the error message.
pub(crate) fn decode_u64_pair(what: &str, bytes: &[u8]) -> Result<(u64, u64), StorageError> {
    if bytes.len() != 16 {
        return Err(StorageError::Corrupt(format!(
            "meta record {what} is {} bytes, expected 16",
            bytes.len()
        )));
    }
    let mut a = [0u8; 8];
    let mut b = [0u8; 8];
    a.copy_from_slice(&bytes[..8]);
    b.copy_from_slice(&bytes[8..]);
    Ok((u64::from_be_bytes(a), u64::from_be_bytes(b)))
}

pub(crate) fn decode_u64(what: &str, bytes: &[u8]) -> Result<u64, StorageError> {
    let arr: [u8; 8] = bytes.try_into().map_err(|_| {
        StorageError::Corrupt(format!(
            "meta record {what} is {} bytes, expected 8",
            bytes.len()
        ))
    })?;
    Ok(u64::from_be_bytes(arr))
}

pub(crate) fn decode_u32(what: &str, bytes: &[u8]) -> Result<u32, StorageError> {
    let arr: [u8; 4] = bytes.try_into().map_err(|_| {
        StorageError::Corrupt(format!(
            "meta record {what} is {} bytes, expected 4",
            bytes.len()
        ))
    })?;
    Ok(u32::from_be_bytes(arr))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_keys_sort_in_index_order() {
        // Bytewise order must match numeric order across byte boundaries.
        assert!(log_key(255) < log_key(256));
        assert!(log_key(1 << 32) > log_key((1 << 32) - 1));
        assert_eq!(
            parse_log_key(&log_key(u64::MAX - 3)).ok(),
            Some(u64::MAX - 3)
        );
        assert!(parse_log_key(b"short").is_err());
    }

    #[test]
    fn u64_pair_round_trips() {
        let bytes = encode_u64_pair(0xdead_beef, 7);
        assert_eq!(decode_u64_pair("x", &bytes).ok(), Some((0xdead_beef, 7)));
        assert!(decode_u64_pair("x", &bytes[..15]).is_err());
    }
}
