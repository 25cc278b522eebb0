//! [`StateStore`]: the apply stage's handle on the node database. It owns the `state` column family
//! (tenant checkpoints and module bytes) and reads, never writes, the `log` family to replay
//! committed entries at startup.
//!
//! Invariant: a checkpoint that names a module is written in the same batch as that module's bytes
//! (or after them), so a stored checkpoint never refers to a module the store lacks.
//! Modules are never deleted here: several tenants may share one, and which are unused is only
//! known to the apply stage.

use std::sync::Arc;

use raft::eraftpb::Entry;
use rocksdb::{Direction, IteratorMode, WriteBatch, DB};

use super::keys::{self, CF_LOG, CF_META, CF_STATE, CHECKPOINT_PREFIX};
use super::raft_log::read_entries;
use super::{cf, StorageError};

/// The apply stage's handle: checkpoints, modules, and read-only access to the log for replay.
/// Cheap to clone; all clones share the database.
#[derive(Clone)]
pub struct StateStore {
    db: Arc<DB>,
}

impl StateStore {
    pub(super) fn new(db: Arc<DB>) -> Self {
        StateStore { db }
    }

    /// Writes the tenant's checkpoint bytes, plus the module bytes if given, in one `WriteBatch`.
    /// Not fsync'd: a lost checkpoint falls back to the previous one plus the log, which is
    /// synced. `module` is `(sha256 hex, bytes)`; the hash must be 64 lowercase hex digits, the
    /// form `hex::encode` gives, so one module has one key.
    pub fn put_checkpoint(
        &self,
        tenant: &str,
        checkpoint: &[u8],
        module: Option<(&str, &[u8])>,
    ) -> Result<(), StorageError> {
        let state = cf(&self.db, CF_STATE)?;
        let mut batch = WriteBatch::default();
        if let Some((hash_hex, bytes)) = module {
            check_hash(hash_hex)?;
            batch.put_cf(state, keys::module_key(hash_hex), bytes);
        }
        batch.put_cf(state, keys::checkpoint_key(tenant), checkpoint);
        self.db.write(batch)?;
        Ok(())
    }

    /// Removes the tenant's checkpoint (its module stays, see the module doc).
    pub fn delete_checkpoint(&self, tenant: &str) -> Result<(), StorageError> {
        let state = cf(&self.db, CF_STATE)?;
        self.db.delete_cf(state, keys::checkpoint_key(tenant))?;
        Ok(())
    }

    /// The tenant's checkpoint bytes, if one is stored.
    pub fn checkpoint(&self, tenant: &str) -> Result<Option<Vec<u8>>, StorageError> {
        let state = cf(&self.db, CF_STATE)?;
        Ok(self.db.get_cf(state, keys::checkpoint_key(tenant))?)
    }

    /// Every stored checkpoint as (tenant, checkpoint bytes), in tenant byte order.
    pub fn checkpoints(&self) -> Result<Vec<(String, Vec<u8>)>, StorageError> {
        let state = cf(&self.db, CF_STATE)?;
        let mut out = Vec::new();
        let iter = self.db.iterator_cf(
            state,
            IteratorMode::From(CHECKPOINT_PREFIX, Direction::Forward),
        );
        for item in iter {
            let (key, value) = item?;
            let Some(tenant) = key.strip_prefix(CHECKPOINT_PREFIX) else {
                break;
            };
            let tenant = String::from_utf8(tenant.to_vec()).map_err(|_| {
                StorageError::Corrupt(format!("checkpoint key {key:02x?} is not UTF-8"))
            })?;
            out.push((tenant, value.into_vec()));
        }
        Ok(out)
    }

    /// The module with this sha256 (lowercase hex), if stored.
    pub fn module(&self, hash_hex: &str) -> Result<Option<Vec<u8>>, StorageError> {
        check_hash(hash_hex)?;
        let state = cf(&self.db, CF_STATE)?;
        Ok(self.db.get_cf(state, keys::module_key(hash_hex))?)
    }

    /// Committed entries in [low, high) for replay; the caller knows they are committed, hence
    /// stored. A missing entry (compacted, or never written) is an error, not a short result.
    pub fn entries(&self, low: u64, high: u64) -> Result<Vec<Entry>, StorageError> {
        read_entries(&self.db, low, high, None)
    }

    /// Makes every write so far durable and flushes the memtables, for a clean shutdown: the
    /// unsynced checkpoints reach disk and the next open has no WAL to replay.
    pub fn flush(&self) -> Result<(), StorageError> {
        self.db.flush_wal(true)?;
        for name in [CF_META, CF_LOG, CF_STATE] {
            self.db.flush_cf(cf(&self.db, name)?)?;
        }
        Ok(())
    }
}

fn check_hash(hash_hex: &str) -> Result<(), StorageError> {
    let ok = hash_hex.len() == 64
        && hash_hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if ok {
        Ok(())
    } else {
        Err(StorageError::Invalid(format!(
            "module hash {hash_hex:?} is not 64 lowercase hex digits (sha256)"
        )))
    }
}
