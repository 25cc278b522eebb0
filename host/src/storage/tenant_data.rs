//! Store-model tenants' own keyspaces (`dat/{tenant}/…`) and session records
//! (`ses/{tenant}/…`) in the `state` column family, under the store's generation, so snapshots
//! carry them like every other state record.
//!
//! Invariant: an op's storage writes, its session record and the tenant's checkpoint record
//! (its applied position) land in ONE `WriteBatch`, so after a crash the keyspace is exactly the
//! state at the checkpoint's position and replay continues from there.

use std::sync::Arc;

use rocksdb::{Direction, IteratorMode, ReadOptions, WriteBatch};
use sha2::{Digest as _, Sha256};

use super::keys::{self, CF_STATE};
use super::{cf, StateStore, StorageError};
use crate::wasm::{StorageView, WriteSet};

/// The exclusive upper bound of every key starting with `prefix` (`None`: unbounded).
fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

impl StateStore {
    fn scan_prefixed(
        &self,
        prefix: &[u8],
        start: &[u8],
        end: Option<&[u8]>,
        limit: usize,
    ) -> Result<crate::wasm::Pairs, StorageError> {
        let state = cf(&self.db, CF_STATE)?;
        let full_prefix = self.key(prefix);
        let from = [full_prefix.as_slice(), start].concat();
        let upper = match end {
            Some(end) => Some([full_prefix.as_slice(), end].concat()),
            None => prefix_end(&full_prefix),
        };
        let mut opts = ReadOptions::default();
        if let Some(upper) = upper {
            opts.set_iterate_upper_bound(upper);
        }
        let iter =
            self.db
                .iterator_cf_opt(state, opts, IteratorMode::From(&from, Direction::Forward));
        let mut out = Vec::new();
        for item in iter {
            if out.len() >= limit {
                break;
            }
            let (key, value) = item?;
            let Some(relative) = key.strip_prefix(full_prefix.as_slice()) else {
                break;
            };
            out.push((relative.to_vec(), value.into_vec()));
        }
        Ok(out)
    }

    /// The value of `key` in the tenant's keyspace.
    pub fn data_get(&self, tenant: &str, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        let state = cf(&self.db, CF_STATE)?;
        let full = self.key(&[keys::data_prefix(tenant).as_slice(), key].concat());
        Ok(self.db.get_cf(state, full)?)
    }

    /// Up to `limit` pairs of the tenant's keyspace with `start <= key < end`, ascending.
    pub fn data_scan(
        &self,
        tenant: &str,
        start: &[u8],
        end: Option<&[u8]>,
        limit: usize,
    ) -> Result<crate::wasm::Pairs, StorageError> {
        self.scan_prefixed(&keys::data_prefix(tenant), start, end, limit)
    }

    /// SHA-256 over the tenant's keyspace (each pair as key length, key, value length, value):
    /// equal on every replica that applied the same ops.
    pub fn data_digest(&self, tenant: &str) -> Result<[u8; 32], StorageError> {
        let mut hash = Sha256::new();
        let mut start = Vec::new();
        loop {
            let page = self.data_scan(tenant, &start, None, 1024)?;
            for (key, value) in &page {
                hash.update((key.len() as u64).to_le_bytes());
                hash.update(key);
                hash.update((value.len() as u64).to_le_bytes());
                hash.update(value);
            }
            match page.last() {
                Some((last, _)) if page.len() == 1024 => {
                    start = [last.as_slice(), &[0]].concat();
                }
                _ => return Ok(hash.finalize().into()),
            }
        }
    }

    /// The tenant's session records as (client id, bytes).
    pub fn sessions(&self, tenant: &str) -> Result<Vec<(String, Vec<u8>)>, StorageError> {
        self.scan_prefixed(&keys::session_prefix(tenant), b"", None, usize::MAX)?
            .into_iter()
            .map(|(client, bytes)| {
                String::from_utf8(client).map(|c| (c, bytes)).map_err(|_| {
                    StorageError::Corrupt(format!("a session key of tenant {tenant} is not UTF-8"))
                })
            })
            .collect()
    }

    /// Commits one op of a store-model tenant: its writes, session records (client id, bytes)
    /// and the tenant's checkpoint record, in one batch. `clear` first removes the keyspace and
    /// the sessions (a new tenant where a deleted one was). `module` as in
    /// [`StateStore::put_checkpoint`].
    pub fn commit_tenant_op(
        &self,
        tenant: &str,
        clear: bool,
        writes: &WriteSet,
        sessions: &[(String, Vec<u8>)],
        checkpoint: &[u8],
        module: Option<(&str, &[u8])>,
    ) -> Result<(), StorageError> {
        let state = cf(&self.db, CF_STATE)?;
        let mut batch = WriteBatch::default();
        let data = self.key(&keys::data_prefix(tenant));
        if clear {
            for prefix in [data.clone(), self.key(&keys::session_prefix(tenant))] {
                if let Some(end) = prefix_end(&prefix) {
                    batch.delete_range_cf(state, &prefix, &end);
                }
            }
        }
        for (key, value) in writes {
            let full = [data.as_slice(), key].concat();
            match value {
                Some(value) => batch.put_cf(state, full, value),
                None => batch.delete_cf(state, full),
            }
        }
        let session_prefix = keys::session_prefix(tenant);
        for (client, bytes) in sessions {
            let key = self.key(&[session_prefix.as_slice(), client.as_bytes()].concat());
            batch.put_cf(state, key, bytes);
        }
        if let Some((hash_hex, bytes)) = module {
            super::state::check_hash(hash_hex)?;
            batch.put_cf(state, self.key(&keys::module_key(hash_hex)), bytes);
        }
        batch.put_cf(state, self.key(&keys::checkpoint_key(tenant)), checkpoint);
        self.db.write(batch)?;
        Ok(())
    }

    /// Removes a tenant's keyspace and session records (a delete, or the move to the memory
    /// model).
    pub fn delete_tenant_data(&self, tenant: &str) -> Result<(), StorageError> {
        let state = cf(&self.db, CF_STATE)?;
        let mut batch = WriteBatch::default();
        for prefix in [keys::data_prefix(tenant), keys::session_prefix(tenant)] {
            let full = self.key(&prefix);
            if let Some(end) = prefix_end(&full) {
                batch.delete_range_cf(state, &full, &end);
            }
        }
        self.db.write(batch)?;
        Ok(())
    }

    /// A [`StorageView`] of the tenant's committed keyspace, for one call into its module.
    pub fn tenant_view(&self, tenant: &str) -> Arc<dyn StorageView> {
        Arc::new(TenantView {
            store: self.clone(),
            tenant: tenant.to_string(),
        })
    }
}

/// One tenant's keyspace as its module sees it. The apply stage is the only writer and runs
/// one call at a time, so a call reads a consistent state without a RocksDB snapshot.
struct TenantView {
    store: StateStore,
    tenant: String,
}

impl StorageView for TenantView {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, String> {
        self.store
            .data_get(&self.tenant, key)
            .map_err(|e| e.to_string())
    }

    fn scan(
        &self,
        start: &[u8],
        end: Option<&[u8]>,
        limit: usize,
    ) -> Result<crate::wasm::Pairs, String> {
        self.store
            .data_scan(&self.tenant, start, end, limit)
            .map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::prefix_end;

    #[test]
    fn prefix_end_is_the_next_prefix() {
        assert_eq!(prefix_end(b"dat/a/"), Some(b"dat/a0".to_vec()));
        assert_eq!(prefix_end(&[1, 0xff]), Some(vec![2]));
        assert_eq!(prefix_end(&[0xff, 0xff]), None);
    }
}
