//! The node's durable storage: one RocksDB database per node, in its data directory. This module
//! is the only place in wraft that touches RocksDB.
//!
//! Column families (layout in [`keys`]):
//! - `meta`: node identity (cluster id, node id, format version), raft hard state, conf state and
//!   the compaction point (index/term of the last entry removed from the log; 0/0 initially).
//! - `log`: raft entries, key = big-endian u64 index, value = `eraftpb::Entry` protobuf bytes.
//! - `state`: the apply stage's records: `cp/{tenant}` → checkpoint bytes, `mod/{sha256 hex}` →
//!   module bytes.
//!
//! [`open`] hands out two handles on the same database:
//! - [`RaftStorage`], raft-rs's view of the log, owned by the raft thread (`RawNode<RaftStorage>`);
//!   it is the only writer of `meta` and `log`.
//! - [`StateStore`], the apply stage's handle: it writes `state` and only reads `log`.
//!
//! Invariants kept here:
//! - A data directory belongs to one (cluster id, node id) forever: it is recorded on first open and
//!   every later open with another identity is refused.
//! - Everything raft needs persisted before messages leave (entries, hard state) is written in one
//!   `WriteBatch`, fsync'd when asked.
//! - Only a large checkpoint is written past the WAL, and it is flushed before the log it
//!   would replay may be dropped ([`StateStore::make_checkpoints_durable`]).
//! - No stored entry lies above the cached last index: appending at index i removes every stored
//!   entry at index >= i first (a conflicting suffix must go).

mod keys;
mod raft_log;
mod state;
mod tenant_data;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use protobuf::Message as _;
use raft::eraftpb::{
    ConfChangeSingle, ConfChangeType, ConfChangeV2, ConfState, Entry, EntryType, HardState,
};
use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamily, ColumnFamilyDescriptor, DBCompressionType, Options,
    WriteBatch, WriteOptions, DB,
};

pub use raft_log::{decode_descriptor, RaftStorage};
pub use state::StateStore;

use keys::{
    CF_LOG, CF_META, CF_STATE, FORMAT_VERSION, META_CONF_APPLIED, META_CONF_STATE,
    META_FORMAT_VERSION, META_HARD_STATE, META_IDENTITY, META_INCARNATION, META_SNAPSHOT,
    META_STATE_GEN,
};

/// Who a data directory belongs to. Recorded on first open; a later open with another identity is
/// refused, so a directory copied to or mounted on the wrong node cannot join the wrong group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeIdentity {
    /// Chosen when the cluster is created; shared by all its members.
    pub cluster_id: u64,
    /// The raft id of this node; never 0 (raft-rs reserves it for "none").
    pub node_id: u64,
}

/// Everything that can go wrong in storage. Raft-rs sees these through `From<StorageError> for
/// raft::Error`; the contract's own conditions (compacted, unavailable) are raised directly as
/// `raft::StorageError` by the `raft::Storage` impl and never pass through here.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("opening the node database in {dir}: {source}")]
    Open {
        dir: PathBuf,
        #[source]
        source: rocksdb::Error,
    },
    #[error("rocksdb: {0}")]
    Rocks(#[from] rocksdb::Error),
    #[error("corrupt node database: {0}")]
    Corrupt(String),
    /// Stored state this build cannot use (e.g. written under another Wasm engine).
    #[error("cannot load the node's state: {0}")]
    Unloadable(String),
    #[error(
        "data directory {dir} belongs to cluster {stored_cluster:#x} node {stored_node}, but this \
         node was started as cluster {cluster:#x} node {node}: refusing to start"
    )]
    IdentityMismatch {
        dir: PathBuf,
        stored_cluster: u64,
        stored_node: u64,
        cluster: u64,
        node: u64,
    },
    #[error(
        "data directory {dir} has on-disk format version {found}, this binary reads version \
         {supported}: refusing to start"
    )]
    UnsupportedFormat {
        dir: PathBuf,
        found: u32,
        supported: u32,
    },
    #[error("invalid storage request: {0}")]
    Invalid(String),
    #[error("protobuf codec: {0}")]
    Codec(#[from] protobuf::ProtobufError),
}

impl From<StorageError> for raft::Error {
    fn from(e: StorageError) -> Self {
        raft::Error::Store(raft::StorageError::Other(Box::new(e)))
    }
}

/// Block cache shared by all column families. Reads are rare: the raft thread serves recent terms
/// from its own cache and recent entries from the memtable; older entries are read only when a
/// follower catches up or the apply stage replays at startup, and `state` is read only at startup.
/// So a modest cache is enough, and memory is left for the Wasm instances.
const BLOCK_CACHE_BYTES: usize = 32 << 20;
/// Per-column-family memtable size. Entries are small and flushed sequentially; 16 MiB batches
/// several seconds of proposals into one L0 file without holding much memory.
const WRITE_BUFFER_BYTES: usize = 16 << 20;
/// Cap on all memtables together (3 CFs x 2 buffers would otherwise allow 96 MiB).
const DB_WRITE_BUFFER_BYTES: usize = 64 << 20;
/// `meta` is written rarely, and a column family that is never flushed pins every WAL file
/// written since; capping the WAL makes RocksDB flush such families so old WAL files are freed.
const MAX_TOTAL_WAL_BYTES: u64 = 128 << 20;

/// Memtables the `state` family may hold (one being written, the rest waiting for a flush).
/// More than the other families: the apply stage writes tenant checkpoints of up to a tenant's
/// whole memory in bursts, and RocksDB stops *every* write to the database, raft's log
/// included, once a family has this many memtables waiting (see [`StateStore::make_room`]).
const STATE_WRITE_BUFFERS: i32 = 4;

fn db_options(cache: &Cache) -> Options {
    let mut block = BlockBasedOptions::default();
    block.set_block_cache(cache);
    let mut opts = Options::default();
    opts.set_block_based_table_factory(&block);
    opts.create_if_missing(true);
    opts.create_missing_column_families(true);
    opts.set_write_buffer_size(WRITE_BUFFER_BYTES);
    opts.set_max_write_buffer_number(2);
    opts.set_db_write_buffer_size(DB_WRITE_BUFFER_BYTES);
    opts.set_max_total_wal_size(MAX_TOTAL_WAL_BYTES);
    // LZ4 is the only codec compiled in; set it explicitly rather than rely on RocksDB's default
    // (snappy when available, else none).
    opts.set_compression_type(DBCompressionType::Lz4);
    // RocksDB's own info LOG files: a few are enough to debug, the default keeps 1000.
    opts.set_keep_log_file_num(4);
    // The WAL stays on (RocksDB's default): durability of raft writes depends on it.
    opts
}

/// A column family handle; every family is created by [`open`], so a missing one means the
/// database was tampered with.
pub(crate) fn cf<'a>(db: &'a DB, name: &str) -> Result<&'a ColumnFamily, StorageError> {
    db.cf_handle(name)
        .ok_or_else(|| StorageError::Corrupt(format!("column family {name} is missing")))
}

/// Opens (creating if absent) the node database in `dir`.
///
/// On first open it records the identity and bootstraps the initial configuration, all in one
/// synced batch: with `initial_voters`, the log starts with one committed conf change per voter
/// (see [`bootstrap_entries`]), already applied to the stored conf state; without, the log and
/// the conf state stay empty, for a node that will learn both from the leader. On later opens it
/// verifies the format version and the identity and ignores `initial_voters`.
pub fn open(
    dir: &Path,
    identity: NodeIdentity,
    initial_voters: &[u64],
) -> Result<(RaftStorage, StateStore), StorageError> {
    // raft-rs reserves id 0 for "none"; a node or voter with id 0 would be silently ignored.
    if identity.node_id == 0 {
        return Err(StorageError::Invalid(format!(
            "node id 0 is reserved by raft (opening {})",
            dir.display()
        )));
    }
    if initial_voters.contains(&0) {
        return Err(StorageError::Invalid(format!(
            "initial voters {initial_voters:?} contain the reserved id 0 (opening {})",
            dir.display()
        )));
    }

    let cache = Cache::new_lru_cache(BLOCK_CACHE_BYTES);
    let opts = db_options(&cache);
    let cfs = [CF_META, CF_LOG, CF_STATE].into_iter().map(|name| {
        let mut opts = db_options(&cache);
        if name == CF_STATE {
            opts.set_max_write_buffer_number(STATE_WRITE_BUFFERS);
        }
        ColumnFamilyDescriptor::new(name, opts)
    });
    let db = DB::open_cf_descriptors(&opts, dir, cfs).map_err(|source| StorageError::Open {
        dir: dir.to_path_buf(),
        source,
    })?;

    let meta = cf(&db, CF_META)?;
    match db.get_cf(meta, META_IDENTITY)? {
        None => bootstrap(&db, identity, initial_voters)?,
        Some(stored) => {
            // Check the format before reading anything else in a layout it may not share.
            let version = match db.get_cf(meta, META_FORMAT_VERSION)? {
                Some(v) => keys::decode_u32("format_version", &v)?,
                None => {
                    return Err(StorageError::Corrupt(format!(
                        "{} has an identity but no format version",
                        dir.display()
                    )))
                }
            };
            if version != FORMAT_VERSION {
                return Err(StorageError::UnsupportedFormat {
                    dir: dir.to_path_buf(),
                    found: version,
                    supported: FORMAT_VERSION,
                });
            }
            let (stored_cluster, stored_node) = keys::decode_u64_pair("identity", &stored)?;
            if (stored_cluster, stored_node) != (identity.cluster_id, identity.node_id) {
                return Err(StorageError::IdentityMismatch {
                    dir: dir.to_path_buf(),
                    stored_cluster,
                    stored_node,
                    cluster: identity.cluster_id,
                    node: identity.node_id,
                });
            }
        }
    }

    let db = Arc::new(db);
    let raft = RaftStorage::load(Arc::clone(&db), dir.to_path_buf(), identity)?;
    let state = StateStore::new(db, raft.generation());
    // A download that never completed, or a state replaced by a snapshot whose cleanup a crash
    // interrupted, leaves records under other generations.
    state.drop_other_generations()?;
    Ok((raft, state))
}

/// The identity recorded in `dir`, if it holds a node database (read-only; for a node that
/// joined a cluster and restarts, whose cluster id is not derived from `--peers`).
pub fn recorded_identity(dir: &Path) -> Result<Option<NodeIdentity>, StorageError> {
    if !dir.join("CURRENT").exists() {
        return Ok(None);
    }
    let opts = Options::default();
    let db = DB::open_cf_for_read_only(&opts, dir, [CF_META, CF_LOG, CF_STATE], false).map_err(
        |source| StorageError::Open {
            dir: dir.to_path_buf(),
            source,
        },
    )?;
    let meta = cf(&db, CF_META)?;
    match db.get_cf(meta, META_IDENTITY)? {
        None => Ok(None),
        Some(bytes) => {
            let (cluster_id, node_id) = keys::decode_u64_pair("identity", &bytes)?;
            Ok(Some(NodeIdentity {
                cluster_id,
                node_id,
            }))
        }
    }
}

/// First open: every record [`RaftStorage::load`] expects, in one synced batch, so a crash leaves
/// either a fully bootstrapped directory or one that bootstraps again.
fn bootstrap(db: &DB, identity: NodeIdentity, initial_voters: &[u64]) -> Result<(), StorageError> {
    // A directory with entries but no identity was not written by this module.
    let log = cf(db, CF_LOG)?;
    if db
        .iterator_cf(log, rocksdb::IteratorMode::Start)
        .next()
        .is_some()
    {
        return Err(StorageError::Corrupt(
            "the log holds entries but no node identity is recorded".to_string(),
        ));
    }
    let meta = cf(db, CF_META)?;
    let entries = bootstrap_entries(initial_voters)?;
    let mut voters = initial_voters.to_vec();
    voters.sort_unstable();
    voters.dedup();
    let conf_state = ConfState {
        voters,
        ..Default::default()
    };
    let last = entries.last().map_or(0, |e| e.index);
    let hard_state = HardState {
        term: entries.last().map_or(0, |e| e.term),
        commit: last,
        ..Default::default()
    };
    let mut batch = WriteBatch::default();
    for entry in &entries {
        batch.put_cf(log, keys::log_key(entry.index), entry.write_to_bytes()?);
    }
    batch.put_cf(meta, META_CONF_APPLIED, last.to_be_bytes());
    batch.put_cf(meta, META_FORMAT_VERSION, FORMAT_VERSION.to_be_bytes());
    batch.put_cf(
        meta,
        META_IDENTITY,
        keys::encode_u64_pair(identity.cluster_id, identity.node_id),
    );
    batch.put_cf(meta, META_HARD_STATE, hard_state.write_to_bytes()?);
    batch.put_cf(meta, META_CONF_STATE, conf_state.write_to_bytes()?);
    batch.put_cf(meta, META_SNAPSHOT, keys::encode_u64_pair(0, 0));
    batch.put_cf(meta, META_STATE_GEN, 0u64.to_be_bytes());
    // Never 0, so 0 can mean "unknown" on the wire.
    let incarnation = rand::random::<u64>().max(1);
    batch.put_cf(meta, META_INCARNATION, incarnation.to_be_bytes());
    db.write_opt(batch, &synced())?;
    Ok(())
}

/// The log every initial member starts with: entry `i` (term 1) adds the `i`-th voter in id
/// order, one simple conf change each, all committed. Every initial member writes the same
/// bytes (the voters come from the `--peers` list, which the cluster id also covers), so the
/// logs agree from the start.
///
/// Why the configuration is in the log and not only in the conf state: a node that joins later
/// replays the log from index 1 when it has not been compacted yet, and must meet the initial
/// voters there before the conf change that adds it (raft-rs refuses to add a learner to a
/// configuration without voters, and that node would never become a member). The entries carry
/// no addresses: a joining node has the current ones from the cluster, which replaying
/// `--peers` from the first start could overwrite with stale ones.
pub(crate) fn bootstrap_entries(initial_voters: &[u64]) -> Result<Vec<Entry>, StorageError> {
    let mut voters = initial_voters.to_vec();
    voters.sort_unstable();
    voters.dedup();
    voters
        .iter()
        .zip(1u64..)
        .map(|(&id, index)| {
            let mut change = ConfChangeSingle::default();
            change.set_change_type(ConfChangeType::AddNode);
            change.node_id = id;
            let mut cc = ConfChangeV2::default();
            cc.set_changes(vec![change].into());
            let mut entry = Entry::default();
            entry.set_entry_type(EntryType::EntryConfChangeV2);
            entry.term = 1;
            entry.index = index;
            entry.set_data(cc.write_to_bytes()?.into());
            Ok(entry)
        })
        .collect()
}

/// Write options for records raft relies on after a crash.
pub(crate) fn synced() -> WriteOptions {
    let mut w = WriteOptions::default();
    w.set_sync(true);
    w
}

#[cfg(test)]
mod tests;
