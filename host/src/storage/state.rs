//! [`StateStore`]: the apply stage's handle on the node database. It owns the `state` column family
//! (tenant checkpoints and module bytes) and reads, never writes, the `log` family to replay
//! committed entries at startup.
//!
//! Every `state` key lives under a generation (see [`keys::META_STATE_GEN`]): this handle reads
//! and writes its own generation, which the apply stage switches when it installs a snapshot
//! (in log order, so no checkpoint of an older entry can land in the new generation).
//!
//! Invariant: a checkpoint that names a module is written in the same batch as that module's bytes
//! (or after them), so a stored checkpoint never refers to a module the store lacks.
//! Modules are never deleted here: several tenants may share one, and which are unused is only
//! known to the apply stage.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use raft::eraftpb::Entry;
use rocksdb::{ColumnFamily, Direction, FlushOptions, IteratorMode, WriteBatch, WriteOptions, DB};

use super::keys::{self, CF_LOG, CF_META, CF_STATE, CHECKPOINT_PREFIX, META_STATE_GEN};
use super::raft_log::read_entries;
use super::{cf, StorageError};

/// A checkpoint at least this large, written without a module, bypasses RocksDB's WAL (see
/// [`StateStore::put_checkpoint`]). Below it the WAL costs next to nothing and keeps a
/// checkpoint across `kill -9`; above it, writing the state a second time into the WAL held the
/// apply thread (a 40 MB state: 76-97 ms a checkpoint, against 28-60 ms without) and made the Raft
/// thread's next synced write flush the whole state (BENCHMARKS.md, "Large checkpoints past
/// the WAL").
pub const UNLOGGED_CHECKPOINT_BYTES: usize = 1 << 20;

/// The apply stage's handle: checkpoints, modules, and read-only access to the log for replay.
/// Cheap to clone; all clones share the database.
#[derive(Clone)]
pub struct StateStore {
    pub(super) db: Arc<DB>,
    generation: u64,
    /// Set by a checkpoint written past the WAL, cleared once a flush has made it durable.
    unlogged: Arc<AtomicBool>,
}

impl StateStore {
    pub(super) fn new(db: Arc<DB>, generation: u64) -> Self {
        StateStore {
            db,
            generation,
            unlogged: Arc::new(AtomicBool::new(false)),
        }
    }

    pub(super) fn key(&self, key: &[u8]) -> Vec<u8> {
        keys::in_generation(self.generation, key)
    }

    /// The generation this handle reads and writes.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Moves to `generation` (an installed snapshot's) and deletes every other generation's
    /// records. The switch itself was made durable by the raft side's install write.
    pub fn switch_generation(&mut self, generation: u64) -> Result<(), StorageError> {
        self.generation = generation;
        self.drop_other_generations()
    }

    /// Deletes the records of every generation but this one: leftovers of a replaced state or
    /// of a download that never completed.
    pub fn drop_other_generations(&self) -> Result<(), StorageError> {
        let state = cf(&self.db, CF_STATE)?;
        let mut batch = WriteBatch::default();
        if self.generation > 0 {
            batch.delete_range_cf(
                state,
                keys::generation_prefix(0),
                keys::generation_prefix(self.generation),
            );
        }
        if let Some(next) = self.generation.checked_add(1) {
            batch.delete_range_cf(state, keys::generation_prefix(next), [0xffu8; 8]);
        }
        self.db.write(batch)?;
        Ok(())
    }

    /// Empties `generation` so a snapshot can be staged into it.
    pub fn stage_begin(&self, generation: u64) -> Result<(), StorageError> {
        if generation == self.generation {
            return Err(StorageError::Invalid(format!(
                "cannot stage a snapshot into the generation in use ({generation})"
            )));
        }
        let state = cf(&self.db, CF_STATE)?;
        let end = keys::generation_prefix(generation.saturating_add(1));
        self.db
            .delete_range_cf(state, keys::generation_prefix(generation), end)?;
        Ok(())
    }

    /// Writes staged records (keys relative to a generation) into `generation`. Not synced: the
    /// install's synced write makes them durable (RocksDB's log is ordered).
    pub fn stage_put(
        &self,
        generation: u64,
        records: &[(Vec<u8>, Vec<u8>)],
    ) -> Result<(), StorageError> {
        if generation == self.generation {
            return Err(StorageError::Invalid(format!(
                "cannot stage a snapshot into the generation in use ({generation})"
            )));
        }
        let state = cf(&self.db, CF_STATE)?;
        let mut batch = WriteBatch::default();
        for (key, value) in records {
            batch.put_cf(state, keys::in_generation(generation, key), value);
        }
        self.make_room(state)?;
        self.db.write(batch)?;
        Ok(())
    }

    /// Calls `each` with every record of the state (keys relative to the generation) as of one
    /// instant: a RocksDB snapshot pins it, so the apply stage may go on meanwhile. Reads the
    /// generation the node's meta records name at that instant, whose records are complete.
    /// Stops early, without error, when `each` returns false.
    pub fn for_each_record(
        &self,
        mut each: impl FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), StorageError> {
        let snapshot = self.db.snapshot();
        let meta = cf(&self.db, CF_META)?;
        let generation = match snapshot.get_cf(meta, META_STATE_GEN)? {
            Some(bytes) => keys::decode_u64("state_generation", &bytes)?,
            None => 0,
        };
        let state = cf(&self.db, CF_STATE)?;
        let prefix = keys::generation_prefix(generation);
        let mut opts = rocksdb::ReadOptions::default();
        opts.set_iterate_upper_bound(keys::generation_prefix(generation.saturating_add(1)));
        opts.set_snapshot(&snapshot);
        let iter =
            self.db
                .iterator_cf_opt(state, opts, IteratorMode::From(&prefix, Direction::Forward));
        for item in iter {
            let (key, value) = item?;
            let Some(relative) = key.strip_prefix(&prefix[..]) else {
                break;
            };
            if !each(relative, &value) {
                break;
            }
        }
        Ok(())
    }

    /// Writes the tenant's checkpoint bytes, plus the module bytes if given, in one `WriteBatch`.
    /// Not fsync'd: a lost checkpoint falls back to the previous one plus the log, which is
    /// synced. `module` is `(sha256 hex, bytes)`; the hash must be 64 lowercase hex digits, the
    /// form `hex::encode` gives, so one module has one key.
    ///
    /// A checkpoint of [`UNLOGGED_CHECKPOINT_BYTES`] or more without a module skips the WAL:
    /// until RocksDB flushes the `state` family (when its memtable fills, or when a compaction
    /// asks, see [`StateStore::make_checkpoints_durable`]) a crash loses it, and the previous
    /// checkpoint and the log replay to the same state. Nothing may rely on it surviving
    /// before that. A write with a module
    /// (a deploy, an upgrade) always goes through the WAL: the tenant's version is in it.
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
            batch.put_cf(state, self.key(&keys::module_key(hash_hex)), bytes);
        }
        batch.put_cf(state, self.key(&keys::checkpoint_key(tenant)), checkpoint);
        self.make_room(state)?;
        if module.is_some() || checkpoint.len() < UNLOGGED_CHECKPOINT_BYTES {
            self.db.write(batch)?;
            return Ok(());
        }
        let mut unlogged = WriteOptions::default();
        unlogged.disable_wal(true);
        self.unlogged.store(true, Ordering::Release);
        self.db.write_opt(batch, &unlogged)?;
        crate::crashpoint::hit("checkpoint-unlogged");
        Ok(())
    }

    /// Returns once every checkpoint written past the WAL is on disk (flushing `state` and
    /// waiting, if one may not be yet): what must precede dropping the log it would replay.
    pub fn make_checkpoints_durable(&self) -> Result<(), StorageError> {
        if !self.unlogged.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        let mut flush = FlushOptions::default();
        flush.set_wait(true);
        let flushed = cf(&self.db, CF_STATE).and_then(|state| {
            self.db
                .flush_cf_opt(state, &flush)
                .map_err(StorageError::from)
        });
        if flushed.is_err() {
            self.unlogged.store(true, Ordering::Release);
        }
        flushed
    }

    /// Waits, before a write to `state`, until no memtable of the family waits for a flush.
    /// RocksDB stops every write to the database (the Raft thread's synced log writes too)
    /// once a family has too many memtables waiting; checkpoints come in bursts of up to a
    /// tenant's whole memory and could get there faster than flushes drain them, and a stalled
    /// Raft thread misses its heartbeats (the 1 GiB catch-up in BENCHMARKS.md saw elections
    /// at each "Stopping writes" in RocksDB's log). Waiting here slows the apply stage, not
    /// consensus. Cheap when there is room: one property read.
    fn make_room(&self, state: &ColumnFamily) -> Result<(), StorageError> {
        let waiting = self
            .db
            .property_int_value_cf(state, "rocksdb.num-immutable-mem-table")?
            .unwrap_or(0);
        if waiting > 0 {
            let mut flush = FlushOptions::default();
            flush.set_wait(true);
            self.db.flush_cf_opt(state, &flush)?;
        }
        Ok(())
    }

    /// Removes the tenant's checkpoint (its module stays, see the module doc).
    pub fn delete_checkpoint(&self, tenant: &str) -> Result<(), StorageError> {
        let state = cf(&self.db, CF_STATE)?;
        self.db
            .delete_cf(state, self.key(&keys::checkpoint_key(tenant)))?;
        Ok(())
    }

    /// The tenant's checkpoint bytes, if one is stored.
    pub fn checkpoint(&self, tenant: &str) -> Result<Option<Vec<u8>>, StorageError> {
        let state = cf(&self.db, CF_STATE)?;
        Ok(self
            .db
            .get_cf(state, self.key(&keys::checkpoint_key(tenant)))?)
    }

    /// Every stored checkpoint as (tenant, checkpoint bytes), in tenant byte order.
    pub fn checkpoints(&self) -> Result<Vec<(String, Vec<u8>)>, StorageError> {
        let state = cf(&self.db, CF_STATE)?;
        let mut out = Vec::new();
        let prefix = self.key(CHECKPOINT_PREFIX);
        let iter = self
            .db
            .iterator_cf(state, IteratorMode::From(&prefix, Direction::Forward));
        for item in iter {
            let (key, value) = item?;
            let Some(tenant) = key.strip_prefix(prefix.as_slice()) else {
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
        Ok(self
            .db
            .get_cf(state, self.key(&keys::module_key(hash_hex)))?)
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

pub(super) fn check_hash(hash_hex: &str) -> Result<(), StorageError> {
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
