//! [`RaftStorage`]: raft-rs's view of the log, hard state and conf state, backed by the `log` and
//! `meta` column families. Owned by the raft thread; it is the only writer of those families, so
//! its in-memory mirrors (indices, hard state, conf state, term cache) are exact.
//!
//! The `raft::Storage` contract it implements (raft-rs 0.7, `MemStorage` is the reference):
//! - `entries(low, high)`: `Compacted` when `low < first_index`, `Unavailable` when
//!   `high > last_index + 1`, at least one entry whatever `max_size` says.
//! - `term(idx)`: the compaction point's term for `idx == first_index - 1`, `Compacted` below it,
//!   `Unavailable` above `last_index`.
//! - `snapshot()`: the compaction point's metadata (index, term, conf state) with a small
//!   descriptor (cluster id, address book) as data; the state itself is streamed separately
//!   (see `crate::snapshot`). `SnapshotTemporarilyUnavailable` before the first compaction.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;

use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use raft::{GetEntriesContext, RaftState};
use rocksdb::{Direction, IteratorMode, ReadOptions, WriteBatch, WriteOptions, DB};

use super::keys::{
    self, CF_LOG, CF_META, META_CONF_APPLIED, META_CONF_STATE, META_HARD_STATE, META_INCARNATION,
    META_PEERS, META_SNAPSHOT, META_SNAPSHOT_CONF, META_STATE_GEN,
};
use super::{cf, synced, NodeIdentity, StorageError};
use wraft_proto::peer::{PeerBook, SnapshotDescriptor};

/// How many recent terms [`RaftStorage`] keeps in memory. raft-rs asks for terms constantly (every
/// append it receives or sends, every vote) and almost always near the tail; 64k terms is 512 KiB
/// and covers any follower that is not far behind, which then needs a disk read anyway.
pub(super) const TERM_CACHE_LEN: usize = 64 * 1024;

/// raft-rs's view of the log. Owned by the raft thread (`RawNode<RaftStorage>`).
pub struct RaftStorage {
    db: Arc<DB>,
    /// For error messages.
    dir: PathBuf,
    identity: NodeIdentity,
    /// Index and term of the compaction point, the last entry removed from the log (0/0 until the
    /// first compaction).
    snapshot_index: u64,
    snapshot_term: u64,
    /// First index readable via `entries`.
    /// Invariant: first_index == snapshot_index + 1.
    first_index: u64,
    /// Index of the last stored entry.
    /// Invariant: first_index - 1 <= last_index; every index in [first_index, last_index] is
    /// stored in `log` and none above last_index is.
    last_index: u64,
    /// Mirror of the stored hard state.
    /// Invariant: hard_state.commit <= last_index.
    hard_state: HardState,
    /// Mirror of the stored conf state.
    conf_state: ConfState,
    /// The conf state at the compaction point (a snapshot's metadata).
    snapshot_conf: ConfState,
    /// Index of the last conf change applied to raft (0: none since bootstrap).
    conf_applied: u64,
    /// Mirror of the stored address book (None until the node records one).
    peers: Option<PeerBook>,
    /// The `state` generation the meta records name (see `keys::META_STATE_GEN`).
    generation: u64,
    /// This data directory's incarnation.
    incarnation: u64,
    /// Terms of the entries at indices [term_cache_start, term_cache_start + term_cache.len()).
    /// Invariant: that range lies within [first_index, last_index] (or is empty), and
    /// term_cache.len() <= TERM_CACHE_LEN.
    term_cache: VecDeque<u64>,
    term_cache_start: u64,
}

impl RaftStorage {
    /// Reads the meta records and the log bounds of a database [`super::open`] has bootstrapped
    /// and whose identity it has checked.
    pub(super) fn load(
        db: Arc<DB>,
        dir: PathBuf,
        identity: NodeIdentity,
    ) -> Result<Self, StorageError> {
        let meta = cf(&db, CF_META)?;
        let missing = |what: &str| {
            StorageError::Corrupt(format!("{}: meta record {what} is missing", dir.display()))
        };
        let hard_state = HardState::parse_from_bytes(
            &db.get_cf(meta, META_HARD_STATE)?
                .ok_or_else(|| missing("hard_state"))?,
        )?;
        let conf_state = ConfState::parse_from_bytes(
            &db.get_cf(meta, META_CONF_STATE)?
                .ok_or_else(|| missing("conf_state"))?,
        )?;
        let (snapshot_index, snapshot_term) = keys::decode_u64_pair(
            "snapshot_meta",
            &db.get_cf(meta, META_SNAPSHOT)?
                .ok_or_else(|| missing("snapshot_meta"))?,
        )?;
        let first_index = snapshot_index + 1;
        let snapshot_conf = match db.get_cf(meta, META_SNAPSHOT_CONF)? {
            Some(bytes) => ConfState::parse_from_bytes(&bytes)?,
            None => ConfState::default(),
        };
        let conf_applied = match db.get_cf(meta, META_CONF_APPLIED)? {
            Some(bytes) => keys::decode_u64("conf_applied", &bytes)?,
            None => 0,
        };
        let peers = match db.get_cf(meta, META_PEERS)? {
            Some(bytes) => Some(
                <PeerBook as prost::Message>::decode(bytes.as_slice())
                    .map_err(|e| StorageError::Corrupt(format!("meta record peers: {e}")))?,
            ),
            None => None,
        };
        let generation = match db.get_cf(meta, META_STATE_GEN)? {
            Some(bytes) => keys::decode_u64("state_generation", &bytes)?,
            None => 0,
        };
        let incarnation = keys::decode_u64(
            "incarnation",
            &db.get_cf(meta, META_INCARNATION)?
                .ok_or_else(|| missing("incarnation"))?,
        )?;

        let log = cf(&db, CF_LOG)?;
        let last_index = match db.iterator_cf(log, IteratorMode::End).next() {
            None => snapshot_index,
            Some(item) => {
                let (key, _) = item?;
                keys::parse_log_key(&key)?
            }
        };
        // A hole right after the compaction point would make every read of it fail later, far
        // from the cause; check the one place it can show up cheaply. (Entries below first_index
        // may legitimately linger until a compaction's range delete is flushed.)
        if last_index >= first_index && db.get_cf(log, keys::log_key(first_index))?.is_none() {
            return Err(StorageError::Corrupt(format!(
                "{}: log ends at {last_index} but has no entry at first index {first_index}",
                dir.display()
            )));
        }
        if last_index < snapshot_index {
            return Err(StorageError::Corrupt(format!(
                "{}: last log index {last_index} is below the compaction point {snapshot_index}",
                dir.display()
            )));
        }
        // raft-rs panics on a commit beyond the log; fail here with the directory instead.
        if hard_state.commit > last_index {
            return Err(StorageError::Corrupt(format!(
                "{}: hard state commit {} is beyond the last log index {last_index}",
                dir.display(),
                hard_state.commit
            )));
        }

        Ok(RaftStorage {
            db,
            dir,
            identity,
            snapshot_index,
            snapshot_term,
            first_index,
            last_index,
            hard_state,
            conf_state,
            snapshot_conf,
            conf_applied,
            peers,
            generation,
            incarnation,
            term_cache: VecDeque::new(),
            term_cache_start: last_index + 1,
        })
    }

    /// Persists `entries` and, if given, the hard state in ONE `WriteBatch`, fsync'd when `sync`
    /// (pass `Ready::must_sync()`). Every stored entry at index >= `entries[0].index` is replaced
    /// or removed: a conflicting suffix must go.
    ///
    /// `entries` must be contiguous, start at or after `first_index` and no later than
    /// `last_index + 1` (raft-rs guarantees this for `Ready::entries()`).
    pub fn append(
        &mut self,
        entries: &[Entry],
        hard_state: Option<&HardState>,
        sync: bool,
    ) -> Result<(), StorageError> {
        let mut batch = WriteBatch::default();
        let mut new_last = self.last_index;
        if let Some(first) = entries.first() {
            let start = first.index;
            if start < self.first_index || start > self.last_index + 1 {
                return Err(StorageError::Invalid(format!(
                    "append at index {start} outside [{}, {}] in {}",
                    self.first_index,
                    self.last_index + 1,
                    self.dir.display()
                )));
            }
            let log = cf(&self.db, CF_LOG)?;
            for (offset, entry) in entries.iter().enumerate() {
                if entry.index != start + offset as u64 {
                    return Err(StorageError::Invalid(format!(
                        "append of non-contiguous entries: index {} at position {offset} after \
                         start {start}",
                        entry.index
                    )));
                }
                batch.put_cf(log, keys::log_key(entry.index), entry.write_to_bytes()?);
            }
            new_last = start + entries.len() as u64 - 1;
            // Entries in [start, new_last] are overwritten by the puts above; only the old ones
            // beyond the new tail need deleting. Deleting just that range keeps the tombstone
            // from overlapping the new keys.
            if new_last < self.last_index {
                batch.delete_range_cf(
                    log,
                    keys::log_key(new_last + 1),
                    keys::log_key(self.last_index + 1),
                );
            }
        }
        if let Some(hs) = hard_state {
            if hs.commit > new_last {
                return Err(StorageError::Invalid(format!(
                    "hard state commit {} is beyond the last log index {new_last}",
                    hs.commit
                )));
            }
            let meta = cf(&self.db, CF_META)?;
            batch.put_cf(meta, META_HARD_STATE, hs.write_to_bytes()?);
        }
        if batch.is_empty() {
            return Ok(());
        }
        let mut opts = WriteOptions::default();
        opts.set_sync(sync);
        self.db.write_opt(batch, &opts)?;

        // Mirrors change only once the batch is durable (or at least written), so a failed write
        // leaves them describing what is on disk.
        if let Some(first) = entries.first() {
            self.last_index = new_last;
            self.cache_terms(first.index, entries);
        }
        if let Some(hs) = hard_state {
            self.hard_state = hs.clone();
        }
        Ok(())
    }

    /// Records the commit index of a `LightReady`. Not fsync'd: raft recomputes the commit index
    /// from its peers, and the WAL is ordered, so whatever survives a crash is never ahead of the
    /// synced entries it refers to.
    pub fn set_commit(&mut self, commit: u64) -> Result<(), StorageError> {
        if commit > self.last_index {
            return Err(StorageError::Invalid(format!(
                "commit index {commit} is beyond the last log index {}",
                self.last_index
            )));
        }
        let mut hs = self.hard_state.clone();
        hs.commit = commit;
        let meta = cf(&self.db, CF_META)?;
        self.db
            .put_cf(meta, META_HARD_STATE, hs.write_to_bytes()?)?;
        self.hard_state = hs;
        Ok(())
    }

    /// Records the conf state returned by `RawNode::apply_conf_change` for the entry at `index`,
    /// with the address book it implies, in one synced write: conf changes are rare, raft
    /// builds its progress tracker from this record on restart, and a restart must not apply
    /// the change again (see [`RaftStorage::conf_applied`]).
    pub fn set_conf_state(
        &mut self,
        cs: &ConfState,
        index: u64,
        peers: &PeerBook,
    ) -> Result<(), StorageError> {
        let meta = cf(&self.db, CF_META)?;
        let mut batch = WriteBatch::default();
        batch.put_cf(meta, META_CONF_STATE, cs.write_to_bytes()?);
        batch.put_cf(meta, META_CONF_APPLIED, index.to_be_bytes());
        batch.put_cf(meta, META_PEERS, prost::Message::encode_to_vec(peers));
        self.db.write_opt(batch, &synced())?;
        self.conf_state = cs.clone();
        self.conf_applied = index;
        self.peers = Some(peers.clone());
        Ok(())
    }

    /// Records the address book alone (first start, or an incarnation learnt from a peer).
    pub fn set_peers(&mut self, peers: &PeerBook) -> Result<(), StorageError> {
        let meta = cf(&self.db, CF_META)?;
        self.db.put_cf_opt(
            meta,
            META_PEERS,
            prost::Message::encode_to_vec(peers),
            &synced(),
        )?;
        self.peers = Some(peers.clone());
        Ok(())
    }

    /// The address book, if one was recorded.
    pub fn peers(&self) -> Option<&PeerBook> {
        self.peers.as_ref()
    }

    /// Index of the last conf change applied to raft: a restart delivers committed entries
    /// again, and those up to here must not be applied twice.
    pub fn conf_applied(&self) -> u64 {
        self.conf_applied
    }

    /// This data directory's incarnation (random, drawn when it was created).
    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }

    /// The `state` generation the meta records name.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The compaction point: entries up to it are gone from the log.
    pub fn snapshot_index(&self) -> u64 {
        self.snapshot_index
    }

    /// Removes the log up to and including `index`, which the apply stage has covered with
    /// checkpoints, recording `index`, its term and `conf` (the conf state at `index`) as the
    /// compaction point. Not synced: RocksDB's log is ordered, so it survives a crash only with
    /// the checkpoints written before it; lost, it is simply done again.
    pub fn compact(&mut self, index: u64, conf: &ConfState) -> Result<(), StorageError> {
        if index <= self.snapshot_index {
            return Ok(());
        }
        if index > self.last_index || index > self.hard_state.commit {
            return Err(StorageError::Invalid(format!(
                "compaction to {index} beyond the last index {} or commit {}",
                self.last_index, self.hard_state.commit
            )));
        }
        let term = raft::Storage::term(self, index)
            .map_err(|e| StorageError::Invalid(format!("term of entry {index}: {e}")))?;
        let log = cf(&self.db, CF_LOG)?;
        let meta = cf(&self.db, CF_META)?;
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(
            log,
            keys::log_key(self.first_index),
            keys::log_key(index + 1),
        );
        batch.put_cf(meta, META_SNAPSHOT, keys::encode_u64_pair(index, term));
        batch.put_cf(meta, META_SNAPSHOT_CONF, conf.write_to_bytes()?);
        self.db.write(batch)?;
        self.snapshot_index = index;
        self.snapshot_term = term;
        self.snapshot_conf = conf.clone();
        self.first_index = index + 1;
        if self.term_cache_start < self.first_index {
            let drop = (self.first_index - self.term_cache_start).min(self.term_cache.len() as u64);
            self.term_cache.drain(..drop as usize);
            self.term_cache_start = self.first_index;
        }
        Ok(())
    }

    /// Installs a snapshot received from the leader, whose state was staged under `generation`:
    /// the whole log goes, the compaction point, conf state, address book, hard state and the
    /// switch to `generation` are written in ONE synced batch, so a crash leaves the node either
    /// on its old state or on the new one. The hard state's commit is raised to the snapshot's
    /// index (raft-rs refuses a hard state whose commit is below it).
    pub fn apply_snapshot(
        &mut self,
        snapshot: &Snapshot,
        hard_state: Option<&HardState>,
        generation: u64,
    ) -> Result<(), StorageError> {
        let md = snapshot.get_metadata();
        let descriptor = decode_descriptor(snapshot.get_data())?;
        let peers = PeerBook {
            peers: descriptor.peers,
        };
        let mut hs = hard_state
            .cloned()
            .unwrap_or_else(|| self.hard_state.clone());
        hs.commit = hs.commit.max(md.index);
        hs.term = hs.term.max(md.term);
        let log = cf(&self.db, CF_LOG)?;
        let meta = cf(&self.db, CF_META)?;
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(
            log,
            keys::log_key(0),
            keys::log_key(self.last_index.max(md.index).saturating_add(1)),
        );
        batch.put_cf(
            meta,
            META_SNAPSHOT,
            keys::encode_u64_pair(md.index, md.term),
        );
        batch.put_cf(
            meta,
            META_SNAPSHOT_CONF,
            md.get_conf_state().write_to_bytes()?,
        );
        batch.put_cf(meta, META_CONF_STATE, md.get_conf_state().write_to_bytes()?);
        batch.put_cf(meta, META_CONF_APPLIED, md.index.to_be_bytes());
        batch.put_cf(meta, META_PEERS, prost::Message::encode_to_vec(&peers));
        batch.put_cf(meta, META_HARD_STATE, hs.write_to_bytes()?);
        batch.put_cf(meta, META_STATE_GEN, generation.to_be_bytes());
        self.db.write_opt(batch, &synced())?;
        self.snapshot_index = md.index;
        self.snapshot_term = md.term;
        self.snapshot_conf = md.get_conf_state().clone();
        self.conf_state = md.get_conf_state().clone();
        self.conf_applied = md.index;
        self.peers = Some(peers);
        self.hard_state = hs;
        self.generation = generation;
        self.first_index = md.index + 1;
        self.last_index = md.index;
        self.term_cache.clear();
        self.term_cache_start = self.last_index + 1;
        Ok(())
    }

    /// The hard state as last written (term, vote, commit).
    pub fn hard_state(&self) -> HardState {
        self.hard_state.clone()
    }

    /// The conf state as last written (bootstrap voters or the last `set_conf_state`).
    pub fn conf_state(&self) -> ConfState {
        self.conf_state.clone()
    }

    /// The identity this data directory was opened (and verified) with.
    pub fn identity(&self) -> NodeIdentity {
        self.identity
    }

    /// Replaces the cached terms from `start` on with those of `entries` (which begin at
    /// `start`), keeping at most the last TERM_CACHE_LEN.
    fn cache_terms(&mut self, start: u64, entries: &[Entry]) {
        let cache_end = self.term_cache_start + self.term_cache.len() as u64;
        if start <= self.term_cache_start || start > cache_end {
            // Either everything cached is overwritten, or there would be a gap: start afresh.
            self.term_cache.clear();
            self.term_cache_start = start;
        } else {
            self.term_cache
                .truncate((start - self.term_cache_start) as usize);
        }
        self.term_cache.extend(entries.iter().map(|e| e.term));
        let excess = self.term_cache.len().saturating_sub(TERM_CACHE_LEN);
        if excess > 0 {
            self.term_cache.drain(..excess);
            self.term_cache_start += excess as u64;
        }
    }

    fn cached_term(&self, idx: u64) -> Option<u64> {
        let offset = idx.checked_sub(self.term_cache_start)?;
        self.term_cache.get(usize::try_from(offset).ok()?).copied()
    }
}

impl raft::Storage for RaftStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState::new(
            self.hard_state.clone(),
            self.conf_state.clone(),
        ))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if low < self.first_index {
            return Err(raft::Error::Store(raft::StorageError::Compacted));
        }
        if high > self.last_index + 1 {
            return Err(raft::Error::Store(raft::StorageError::Unavailable));
        }
        Ok(read_entries(&self.db, low, high, max_size.into())?)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        if idx == self.snapshot_index {
            return Ok(self.snapshot_term);
        }
        if idx < self.first_index {
            return Err(raft::Error::Store(raft::StorageError::Compacted));
        }
        if idx > self.last_index {
            return Err(raft::Error::Store(raft::StorageError::Unavailable));
        }
        if let Some(term) = self.cached_term(idx) {
            return Ok(term);
        }
        // A point read, not an iterator: terms outside the cache are asked one at a time.
        let log = cf(&self.db, CF_LOG)?;
        match self
            .db
            .get_cf(log, keys::log_key(idx))
            .map_err(StorageError::from)?
        {
            Some(bytes) => Ok(Entry::parse_from_bytes(&bytes)
                .map_err(StorageError::from)?
                .term),
            None => Err(StorageError::Corrupt(format!(
                "log entry {idx} is missing from {} (last index {})",
                self.dir.display(),
                self.last_index
            ))
            .into()),
        }
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.first_index)
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last_index)
    }

    /// The compaction point as a snapshot: its data is only a descriptor (cluster id and
    /// address book); the follower downloads the state itself over `FetchSnapshot`, which
    /// serves this node's state as of the download (every checkpoint in it covers at least the
    /// compaction point, so entries after it replay correctly on top).
    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        // raft-rs on the receiver ignores a snapshot whose configuration does not name it: wait
        // for a compaction past the change that added `to` (one is asked for when it applies).
        let cs = &self.snapshot_conf;
        let names_to = cs.voters.contains(&to)
            || cs.learners.contains(&to)
            || cs.voters_outgoing.contains(&to)
            || cs.learners_next.contains(&to);
        if self.snapshot_index == 0 || self.snapshot_index < request_index || !names_to {
            return Err(raft::Error::Store(
                raft::StorageError::SnapshotTemporarilyUnavailable,
            ));
        }
        let descriptor = SnapshotDescriptor {
            cluster_id: self.identity.cluster_id,
            peers: self.peers.clone().unwrap_or_default().peers,
        };
        let mut snapshot = Snapshot::default();
        snapshot.set_data(prost::Message::encode_to_vec(&descriptor).into());
        let md = snapshot.mut_metadata();
        md.index = self.snapshot_index;
        md.term = self.snapshot_term;
        md.set_conf_state(self.snapshot_conf.clone());
        Ok(snapshot)
    }
}

/// Decodes a raft snapshot's data (see [`RaftStorage::snapshot`]).
pub fn decode_descriptor(data: &[u8]) -> Result<SnapshotDescriptor, StorageError> {
    <SnapshotDescriptor as prost::Message>::decode(data)
        .map_err(|e| StorageError::Invalid(format!("undecodable snapshot descriptor: {e}")))
}

/// Entries in [low, high), all of which the caller knows to be stored, cut by `max_size` as
/// `raft::util::limit_size` would (total encoded size <= max_size, but always the first entry).
/// `None` or `u64::MAX` (raft's NO_LIMIT) means no limit. A missing entry is `Corrupt`.
pub(crate) fn read_entries(
    db: &DB,
    low: u64,
    high: u64,
    max_size: Option<u64>,
) -> Result<Vec<Entry>, StorageError> {
    if low >= high {
        return Ok(Vec::new());
    }
    let log = cf(db, CF_LOG)?;
    let mut opts = ReadOptions::default();
    opts.set_iterate_upper_bound(keys::log_key(high).to_vec());
    let start = keys::log_key(low);
    let iter = db.iterator_cf_opt(log, opts, IteratorMode::From(&start, Direction::Forward));

    let mut entries = Vec::with_capacity((high - low).min(1024) as usize);
    let mut size: u64 = 0;
    let mut expected = low;
    for item in iter {
        let (key, value) = item?;
        let index = keys::parse_log_key(&key)?;
        if index != expected {
            break;
        }
        // The stored value is the entry's encoding, so its length is the `compute_size` that
        // limit_size would sum, and entries past the limit are never decoded.
        size = size.saturating_add(value.len() as u64);
        if let Some(max) = max_size {
            if !entries.is_empty() && size > max {
                return Ok(entries);
            }
        }
        let entry = Entry::parse_from_bytes(&value)?;
        if entry.index != index {
            return Err(StorageError::Corrupt(format!(
                "log key {index} holds an entry with index {}",
                entry.index
            )));
        }
        entries.push(entry);
        expected += 1;
        if expected == high {
            return Ok(entries);
        }
    }
    Err(StorageError::Corrupt(format!(
        "log entry {expected} is missing (reading [{low}, {high}))"
    )))
}
