//! Tests of the storage module against a real RocksDB in a temporary directory: raft-rs's
//! `Storage` contract, suffix truncation, persistence across reopen, identity checks, the apply
//! stage's records, and a single-node `RawNode` driven over `RaftStorage`.

use std::path::Path;

use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, HardState};
use raft::{GetEntriesContext, Storage as _};

use super::*;

const ID: NodeIdentity = NodeIdentity {
    cluster_id: 0xc1u64,
    node_id: 1,
};

fn entry(index: u64, term: u64) -> Entry {
    Entry {
        index,
        term,
        data: format!("entry {index} term {term}").into_bytes().into(),
        ..Default::default()
    }
}

fn entries(range: std::ops::RangeInclusive<u64>, term: u64) -> Vec<Entry> {
    range.map(|i| entry(i, term)).collect()
}

fn open_at(dir: &Path) -> (RaftStorage, StateStore) {
    match open(dir, ID, &[1, 2, 3]) {
        Ok(s) => s,
        Err(e) => panic!("open {}: {e}", dir.display()),
    }
}

fn ctx() -> GetEntriesContext {
    GetEntriesContext::empty(false)
}

fn store_err(r: raft::Result<impl std::fmt::Debug>) -> raft::StorageError {
    match r {
        Err(raft::Error::Store(e)) => e,
        other => panic!("expected a storage error, got {other:?}"),
    }
}

#[test]
fn fresh_node_is_bootstrapped_with_initial_voters() {
    let dir = tempfile::tempdir().unwrap();
    let (raft, _) = open_at(dir.path());
    assert_eq!(raft.first_index().unwrap(), 1);
    assert_eq!(raft.last_index().unwrap(), 3, "one entry per initial voter");
    assert_eq!(raft.term(0).unwrap(), 0);
    let state = raft.initial_state().unwrap();
    assert_eq!(state.hard_state.term, 1);
    assert_eq!(
        state.hard_state.commit, 3,
        "the bootstrap entries are committed"
    );
    assert_eq!(state.hard_state.vote, 0);
    assert_eq!(state.conf_state.voters, vec![1, 2, 3]);
    assert_eq!(
        raft.conf_applied(),
        3,
        "and already applied to the conf state"
    );
    assert!(state.initialized());
    assert_eq!(raft.identity(), ID);
    // The log says what the conf state says: a node replaying it from index 1 (one that joins
    // before any compaction) builds the same configuration.
    let added: Vec<u64> = raft
        .entries(1, 4, None, ctx())
        .unwrap()
        .iter()
        .flat_map(|e| {
            assert_eq!(
                e.get_entry_type(),
                raft::eraftpb::EntryType::EntryConfChangeV2
            );
            assert_eq!(e.term, 1);
            let cc = raft::eraftpb::ConfChangeV2::parse_from_bytes(&e.data).unwrap();
            assert_eq!(cc.get_changes().len(), 1, "one simple change per entry");
            let change = &cc.get_changes()[0];
            assert_eq!(
                change.get_change_type(),
                raft::eraftpb::ConfChangeType::AddNode
            );
            Some(change.node_id)
        })
        .collect();
    assert_eq!(added, vec![1, 2, 3]);
}

/// Every initial member writes the same log whatever order `--peers` listed them in: raft
/// assumes entries with the same index and term are the same entry.
#[test]
fn bootstrap_entries_do_not_depend_on_the_order_of_the_voters() {
    let bytes = |voters: &[u64]| -> Vec<Vec<u8>> {
        bootstrap_entries(voters)
            .unwrap()
            .iter()
            .map(|e| e.write_to_bytes().unwrap())
            .collect()
    };
    assert_eq!(bytes(&[3, 1, 2]), bytes(&[1, 2, 3]));
    assert_eq!(
        bytes(&[1, 1, 2, 3]),
        bytes(&[1, 2, 3]),
        "a repeated id adds once"
    );
    assert!(
        bytes(&[]).is_empty(),
        "a joining node starts with an empty log"
    );
}

#[test]
fn storage_contract_bounds_and_terms() {
    let dir = tempfile::tempdir().unwrap();
    let (mut raft, _) = open_at(dir.path());
    let mut ents = entries(1..=3, 1);
    ents.extend(entries(4..=6, 2));
    raft.append(&ents, None, true).unwrap();

    assert_eq!(raft.first_index().unwrap(), 1);
    assert_eq!(raft.last_index().unwrap(), 6);
    // Full range, sub ranges, empty range.
    assert_eq!(raft.entries(1, 7, None, ctx()).unwrap(), ents);
    assert_eq!(
        raft.entries(3, 5, None, ctx()).unwrap(),
        ents[2..4].to_vec()
    );
    assert!(raft.entries(4, 4, None, ctx()).unwrap().is_empty());
    // Below first index: compacted. Beyond last index + 1: unavailable.
    assert_eq!(
        store_err(raft.entries(0, 3, None, ctx())),
        raft::StorageError::Compacted
    );
    assert_eq!(
        store_err(raft.entries(2, 8, None, ctx())),
        raft::StorageError::Unavailable
    );

    // term: the compaction point (0) has term 0, entries their own, above last unavailable.
    assert_eq!(raft.term(0).unwrap(), 0);
    assert_eq!(raft.term(3).unwrap(), 1);
    assert_eq!(raft.term(4).unwrap(), 2);
    assert_eq!(raft.term(6).unwrap(), 2);
    assert_eq!(store_err(raft.term(7)), raft::StorageError::Unavailable);

    // Same answers from disk after a reopen (empty term cache).
    drop(raft);
    let (raft, _) = open_at(dir.path());
    assert_eq!(raft.last_index().unwrap(), 6);
    assert_eq!(raft.term(3).unwrap(), 1);
    assert_eq!(raft.term(6).unwrap(), 2);
    assert_eq!(store_err(raft.term(7)), raft::StorageError::Unavailable);
    assert_eq!(raft.entries(1, 7, None, ctx()).unwrap(), ents);

    // Snapshots are not supported yet.
    assert_eq!(
        store_err(raft.snapshot(1, 2)),
        raft::StorageError::SnapshotTemporarilyUnavailable
    );
}

#[test]
fn entries_honour_max_size_like_limit_size() {
    let dir = tempfile::tempdir().unwrap();
    let (mut raft, _) = open_at(dir.path());
    let ents = entries(1..=5, 1);
    raft.append(&ents, None, true).unwrap();
    let size = |e: &Entry| u64::from(e.compute_size());

    for max in [
        0,
        1,
        size(&ents[0]),
        size(&ents[0]) + size(&ents[1]),
        1 << 20,
    ] {
        let mut want = ents.clone();
        raft::util::limit_size(&mut want, Some(max));
        let got = raft.entries(1, 6, max, ctx()).unwrap();
        assert_eq!(got, want, "max_size {max}");
    }
    // Always at least one entry, and exactly the two that fit.
    assert_eq!(raft.entries(2, 6, 0, ctx()).unwrap().len(), 1);
    let two = size(&ents[0]) + size(&ents[1]);
    assert_eq!(raft.entries(1, 6, two, ctx()).unwrap().len(), 2);
    assert_eq!(raft.entries(1, 6, two - 1, ctx()).unwrap().len(), 1);
    assert_eq!(raft.entries(1, 6, raft::NO_LIMIT, ctx()).unwrap().len(), 5);
}

#[test]
fn term_of_compaction_point_and_compacted_below_it() {
    // Compaction is not implemented yet; write the compaction point as a later compaction will
    // (meta record, then the log from first_index on) and check how the contract reads it.
    let dir = tempfile::tempdir().unwrap();
    {
        let (_, _) = open_at(dir.path());
    }
    {
        let db = DB::open_cf_descriptors(
            &Options::default(),
            dir.path(),
            [CF_META, CF_LOG, CF_STATE]
                .into_iter()
                .map(|n| ColumnFamilyDescriptor::new(n, Options::default())),
        )
        .unwrap();
        let meta = db.cf_handle(CF_META).unwrap();
        let log = db.cf_handle(CF_LOG).unwrap();
        db.put_cf(meta, META_SNAPSHOT, keys::encode_u64_pair(5, 3))
            .unwrap();
        for e in entries(6..=8, 4) {
            db.put_cf(log, keys::log_key(e.index), e.write_to_bytes().unwrap())
                .unwrap();
        }
    }
    let (raft, _) = open_at(dir.path());
    assert_eq!(raft.first_index().unwrap(), 6);
    assert_eq!(raft.last_index().unwrap(), 8);
    assert_eq!(raft.term(5).unwrap(), 3);
    assert_eq!(raft.term(6).unwrap(), 4);
    assert_eq!(store_err(raft.term(4)), raft::StorageError::Compacted);
    assert_eq!(
        store_err(raft.entries(5, 7, None, ctx())),
        raft::StorageError::Compacted
    );
    assert_eq!(raft.entries(6, 9, None, ctx()).unwrap(), entries(6..=8, 4));
}

#[test]
fn append_truncates_a_conflicting_suffix() {
    let dir = tempfile::tempdir().unwrap();
    let (mut raft, state) = open_at(dir.path());
    raft.append(&entries(1..=10, 1), None, true).unwrap();
    let replacement = entries(5..=6, 2);
    raft.append(&replacement, None, true).unwrap();

    let check = |raft: &RaftStorage, state: &StateStore| {
        assert_eq!(raft.last_index().unwrap(), 6);
        let mut want = entries(1..=4, 1);
        want.extend(replacement.clone());
        assert_eq!(raft.entries(1, 7, None, ctx()).unwrap(), want);
        assert_eq!(raft.term(5).unwrap(), 2);
        assert_eq!(store_err(raft.term(7)), raft::StorageError::Unavailable);
        assert_eq!(
            store_err(raft.entries(1, 11, None, ctx())),
            raft::StorageError::Unavailable
        );
        // 7..=10 are gone from disk, not only hidden by the cached last index.
        assert!(state.entries(7, 8).is_err());
    };
    check(&raft, &state);
    drop((raft, state));
    let (mut raft, state) = open_at(dir.path());
    check(&raft, &state);

    // Appending again after the truncation extends the new tail.
    raft.append(&entries(7..=8, 2), None, true).unwrap();
    assert_eq!(raft.last_index().unwrap(), 8);
    assert_eq!(raft.term(8).unwrap(), 2);
    assert_eq!(state.entries(6, 9).unwrap(), entries(6..=8, 2));
}

#[test]
fn append_rejects_gaps_and_compacted_indices() {
    let dir = tempfile::tempdir().unwrap();
    let (mut raft, _) = open_at(dir.path());
    raft.append(&entries(1..=3, 1), None, true).unwrap();
    assert!(matches!(
        raft.append(&entries(5..=6, 1), None, true),
        Err(StorageError::Invalid(_))
    ));
    assert!(matches!(
        raft.append(&entries(0..=1, 1), None, true),
        Err(StorageError::Invalid(_))
    ));
    let mut gappy = entries(4..=4, 1);
    gappy.push(entry(6, 1));
    assert!(matches!(
        raft.append(&gappy, None, true),
        Err(StorageError::Invalid(_))
    ));
    assert_eq!(raft.last_index().unwrap(), 3);
}

#[test]
fn hard_state_and_conf_state_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let hs = HardState {
        term: 4,
        vote: 2,
        commit: 2,
        ..Default::default()
    };
    let cs = ConfState {
        voters: vec![1, 2, 3, 4],
        learners: vec![5],
        ..Default::default()
    };
    {
        let (mut raft, _) = open_at(dir.path());
        raft.append(&entries(1..=3, 4), Some(&hs), true).unwrap();
        raft.set_commit(3).unwrap();
        let book = wraft_proto::peer::PeerBook {
            peers: vec![wraft_proto::peer::PeerRecord {
                id: 5,
                addr: "h:5".into(),
                incarnation: 7,
            }],
        };
        raft.set_conf_state(&cs, 3, &book).unwrap();
        assert_eq!(raft.hard_state().commit, 3);
        assert!(raft.set_commit(4).is_err(), "commit beyond the log");
    }
    // Reopen with other initial voters: they are ignored.
    let (raft, _) = match open(dir.path(), ID, &[9]) {
        Ok(s) => s,
        Err(e) => panic!("{e}"),
    };
    let state = raft.initial_state().unwrap();
    let mut want = hs.clone();
    want.commit = 3;
    assert_eq!(state.hard_state, want);
    assert_eq!(state.conf_state, cs);
    assert_eq!(raft.hard_state(), want);
    assert_eq!(raft.conf_state(), cs);
    assert_eq!(
        raft.conf_applied(),
        3,
        "a restart must not apply the change again"
    );
    assert_eq!(raft.peers().map(|b| b.peers[0].incarnation), Some(7));
}

#[test]
fn compaction_drops_the_log_and_serves_a_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let cs = ConfState {
        voters: vec![1, 2, 3],
        ..Default::default()
    };
    {
        let (mut raft, _) = open_at(dir.path());
        assert!(raft.snapshot(0, 2).is_err(), "nothing compacted yet");
        let hs = HardState {
            term: 2,
            commit: 8,
            ..Default::default()
        };
        raft.append(&entries(1..=10, 2), Some(&hs), true).unwrap();
        assert!(raft.compact(9, &cs).is_err(), "beyond the commit index");
        raft.compact(5, &cs).unwrap();
        assert_eq!(raft.first_index().unwrap(), 6);
        assert_eq!(raft.term(5).unwrap(), 2);
        assert!(raft.entries(4, 7, None, ctx()).is_err(), "compacted");
        assert_eq!(raft.entries(6, 11, None, ctx()).unwrap().len(), 5);
        let snap = raft.snapshot(0, 2).unwrap();
        assert_eq!(snap.get_metadata().index, 5);
        assert_eq!(snap.get_metadata().get_conf_state(), &cs);
        assert!(decode_descriptor(snap.get_data()).is_ok());
    }
    // The compaction point survives a restart.
    let (raft, _) = open_at(dir.path());
    assert_eq!(
        (raft.first_index().unwrap(), raft.last_index().unwrap()),
        (6, 10)
    );
    assert_eq!(raft.snapshot_index(), 5);
}

#[test]
fn an_installed_snapshot_replaces_log_and_state_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let (mut raft, state) = open_at(dir.path());
    raft.append(&entries(1..=3, 1), None, true).unwrap();
    state.put_checkpoint("old", b"old state", None).unwrap();
    // Stage the leader's state under the next generation, then install.
    let next = raft.generation() + 1;
    state.stage_begin(next).unwrap();
    state
        .stage_put(
            next,
            &[(keys::checkpoint_key("new"), b"new state".to_vec())],
        )
        .unwrap();
    assert_eq!(
        state.checkpoints().unwrap().len(),
        1,
        "staging is invisible"
    );
    let mut snap = raft::eraftpb::Snapshot::default();
    let descriptor = wraft_proto::peer::SnapshotDescriptor {
        cluster_id: ID.cluster_id,
        peers: vec![],
    };
    snap.set_data(prost::Message::encode_to_vec(&descriptor).into());
    snap.mut_metadata().index = 50;
    snap.mut_metadata().term = 4;
    snap.mut_metadata().mut_conf_state().voters = vec![1, 2, 3];
    let hs = HardState {
        term: 4,
        commit: 20,
        ..Default::default()
    };
    raft.apply_snapshot(&snap, Some(&hs), next).unwrap();
    assert_eq!(
        (raft.first_index().unwrap(), raft.last_index().unwrap()),
        (51, 50)
    );
    assert_eq!(
        raft.hard_state().commit,
        50,
        "commit raised to the snapshot"
    );
    drop((raft, state));
    // After a restart (the apply stage never switched): the new generation is in force.
    let (raft, state) = open_at(dir.path());
    assert_eq!(raft.generation(), next);
    let cps = state.checkpoints().unwrap();
    assert_eq!(cps, vec![("new".to_string(), b"new state".to_vec())]);
    let mut seen = Vec::new();
    state
        .for_each_record(|k, _| {
            seen.push(k.to_vec());
            true
        })
        .unwrap();
    assert_eq!(seen, vec![keys::checkpoint_key("new")]);
}

#[test]
fn identity_mismatch_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    drop(open_at(dir.path()));

    let other_cluster = NodeIdentity {
        cluster_id: 0xc2,
        node_id: 1,
    };
    let err = match open(dir.path(), other_cluster, &[1]) {
        Err(e) => e,
        Ok(_) => panic!("opened another cluster's directory"),
    };
    assert!(matches!(err, StorageError::IdentityMismatch { .. }));
    let msg = err.to_string();
    assert!(msg.contains(&dir.path().display().to_string()), "{msg}");
    assert!(
        msg.contains("belongs to cluster 0xc1 node 1, but this node was started as cluster 0xc2 node 1: refusing to start"),
        "{msg}"
    );

    let other_node = NodeIdentity {
        cluster_id: 0xc1,
        node_id: 3,
    };
    let err = match open(dir.path(), other_node, &[1]) {
        Err(e) => e,
        Ok(_) => panic!("opened another node's directory"),
    };
    assert!(
        err.to_string()
            .contains("cluster 0xc1 node 1, but this node was started as cluster 0xc1 node 3"),
        "{err}"
    );

    // The right identity still opens.
    drop(open_at(dir.path()));
}

#[test]
fn reserved_id_zero_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let zero = NodeIdentity {
        cluster_id: 1,
        node_id: 0,
    };
    assert!(matches!(
        open(dir.path(), zero, &[1]),
        Err(StorageError::Invalid(_))
    ));
    assert!(matches!(
        open(dir.path(), ID, &[1, 0]),
        Err(StorageError::Invalid(_))
    ));
}

#[test]
fn checkpoints_and_modules_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let hash = "ab".repeat(32);
    {
        let (_, state) = open_at(dir.path());
        assert!(state.checkpoints().unwrap().is_empty());
        assert_eq!(state.module(&hash).unwrap(), None);
        state
            .put_checkpoint("kv", b"cp-kv-1", Some((&hash, b"\0asm module")))
            .unwrap();
        state
            .put_checkpoint("counter", b"cp-counter", None)
            .unwrap();
        state.put_checkpoint("kv", b"cp-kv-2", None).unwrap();
        state.put_checkpoint("gone", b"x", None).unwrap();
        state.delete_checkpoint("gone").unwrap();
        assert!(state.put_checkpoint("t", b"", Some(("ABC", b""))).is_err());
        assert!(state.module("not-a-hash").is_err());
        state.flush().unwrap();
    }
    let (_, state) = open_at(dir.path());
    assert_eq!(
        state.checkpoints().unwrap(),
        vec![
            ("counter".to_string(), b"cp-counter".to_vec()),
            ("kv".to_string(), b"cp-kv-2".to_vec()),
        ]
    );
    assert_eq!(state.module(&hash).unwrap(), Some(b"\0asm module".to_vec()));
    assert_eq!(state.checkpoint("kv").unwrap(), Some(b"cp-kv-2".to_vec()));
    assert_eq!(state.checkpoint("gone").unwrap(), None);
}

#[test]
fn entries_for_replay() {
    let dir = tempfile::tempdir().unwrap();
    let (mut raft, state) = open_at(dir.path());
    raft.append(&entries(1..=20, 1), None, true).unwrap();
    assert_eq!(state.entries(1, 21).unwrap(), entries(1..=20, 1));
    assert_eq!(state.entries(5, 8).unwrap(), entries(5..=7, 1));
    assert!(state.entries(3, 3).unwrap().is_empty());
    // Asking beyond what is stored is an error, not a silently short result.
    assert!(matches!(
        state.entries(15, 25),
        Err(StorageError::Corrupt(_))
    ));
}

#[test]
fn term_cache_follows_truncation_and_stays_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let (mut raft, _) = open_at(dir.path());
    // Appended in batches, more than the cache holds.
    let total = super::raft_log::TERM_CACHE_LEN as u64 + 1000;
    let mut next = 1;
    while next <= total {
        let end = (next + 4999).min(total);
        raft.append(&entries(next..=end, 1 + next / 5000), None, false)
            .unwrap();
        next = end + 1;
    }
    assert_eq!(raft.last_index().unwrap(), total);
    // Old index (not cached) and recent index (cached) give the stored term.
    assert_eq!(raft.term(1).unwrap(), 1);
    assert_eq!(raft.term(total).unwrap(), 1 + (total - 999) / 5000);
    // Overwrite from below the cached range: the cache must not keep stale terms.
    raft.append(&entries(10..=12, 99), None, true).unwrap();
    assert_eq!(raft.last_index().unwrap(), 12);
    assert_eq!(raft.term(11).unwrap(), 99);
    assert_eq!(raft.term(9).unwrap(), 1);
    assert_eq!(store_err(raft.term(13)), raft::StorageError::Unavailable);
}

/// A normal entry with data: a proposal (not a new leader's empty entry, not a conf change).
fn is_proposal(e: &Entry) -> bool {
    e.get_entry_type() == raft::eraftpb::EntryType::EntryNormal && !e.data.is_empty()
}

/// Drives a real single-node raft over RaftStorage: elect, propose, persist each Ready, restart.
#[test]
fn single_node_raw_node_over_raft_storage() {
    use raft::{Config, RawNode};

    let logger = slog::Logger::root(slog::Discard, slog::o!());
    let config = Config {
        id: 1,
        election_tick: 10,
        heartbeat_tick: 3,
        ..Default::default()
    };
    let dir = tempfile::tempdir().unwrap();
    let single = |dir: &Path| match open(dir, ID, &[1]) {
        Ok(s) => s,
        Err(e) => panic!("{e}"),
    };

    // Persist, then advance; returns the data of committed normal entries.
    fn on_ready(node: &mut RawNode<RaftStorage>, applied: &mut Vec<Vec<u8>>) {
        if !node.has_ready() {
            return;
        }
        let mut ready = node.ready();
        assert!(ready.snapshot().is_empty());
        take_committed(ready.take_committed_entries(), applied);
        let hs = ready.hs().cloned();
        let must_sync = ready.must_sync();
        node.mut_store()
            .append(ready.entries(), hs.as_ref(), must_sync)
            .unwrap();
        let mut light = node.advance(ready);
        if let Some(commit) = light.commit_index() {
            node.mut_store().set_commit(commit).unwrap();
        }
        take_committed(light.take_committed_entries(), applied);
        node.advance_apply();
    }
    fn take_committed(entries: Vec<Entry>, applied: &mut Vec<Vec<u8>>) {
        applied.extend(
            entries
                .into_iter()
                .filter(is_proposal)
                .map(|e| e.data.to_vec()),
        );
    }

    let (storage, _) = single(dir.path());
    let mut node = RawNode::new(&config, storage, &logger).unwrap();
    let mut applied = Vec::new();
    // The bootstrap conf change is delivered first: raft-rs does not campaign while a
    // committed conf change is unapplied.
    on_ready(&mut node, &mut applied);
    node.campaign().unwrap();
    on_ready(&mut node, &mut applied);
    assert_eq!(node.raft.state, raft::StateRole::Leader);
    for i in 0..5 {
        node.propose(vec![], format!("p{i}").into_bytes()).unwrap();
        on_ready(&mut node, &mut applied);
    }
    // One more round so any LightReady commit is handled.
    on_ready(&mut node, &mut applied);
    let want: Vec<Vec<u8>> = (0..5).map(|i| format!("p{i}").into_bytes()).collect();
    assert_eq!(applied, want);
    let hs = node.store().hard_state();
    let last = node.store().last_index().unwrap();
    assert_eq!(hs.commit, last, "single node commits everything");
    assert_eq!(
        last, 7,
        "bootstrap entry + empty leader entry + 5 proposals"
    );
    drop(node);

    // Restart: the log and hard state come back; raft replays committed entries from applied 0.
    let (storage, state) = single(dir.path());
    assert_eq!(storage.hard_state(), hs);
    let replay: Vec<Vec<u8>> = state
        .entries(1, last + 1)
        .unwrap()
        .into_iter()
        .filter(is_proposal)
        .map(|e| e.data.to_vec())
        .collect();
    assert_eq!(replay, want);
    let mut node = RawNode::new(&config, storage, &logger).unwrap();
    let mut reapplied = Vec::new();
    on_ready(&mut node, &mut reapplied);
    assert_eq!(
        reapplied, want,
        "committed entries are redelivered after restart"
    );
    node.campaign().unwrap();
    on_ready(&mut node, &mut reapplied);
    assert_eq!(node.raft.state, raft::StateRole::Leader);
    node.propose(vec![], b"after restart".to_vec()).unwrap();
    on_ready(&mut node, &mut reapplied);
    on_ready(&mut node, &mut reapplied);
    assert_eq!(
        reapplied.last().map(Vec::as_slice),
        Some(&b"after restart"[..])
    );
    assert!(node.store().hard_state().term > hs.term);
}

/// A burst of checkpoints larger than a memtable (a join checkpoints every tenant at once) must
/// not pile up `state` memtables until RocksDB stops every write, the Raft thread's included:
/// each checkpoint write first waits for a flush while a memtable is waiting.
#[test]
fn checkpoint_bursts_never_stop_the_database() {
    let dir = tempfile::tempdir().unwrap();
    let (_raft, state) = open_at(dir.path());
    // Larger than the 16 MiB write buffer (one memtable each), and incompressible, so that a
    // flush takes real time.
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let big: Vec<u8> = (0..20 << 20)
        .map(|_| {
            seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            (seed >> 56) as u8
        })
        .collect();
    let state_cf = cf(&state.db, CF_STATE).unwrap();
    for i in 0..5 {
        state
            .put_checkpoint(&format!("tenant{i}"), &big, None)
            .unwrap();
        let waiting = state
            .db
            .property_int_value_cf(state_cf, "rocksdb.num-immutable-mem-table")
            .unwrap()
            .unwrap_or(0);
        assert!(
            waiting <= 1 && waiting < STATE_WRITE_BUFFERS as u64,
            "after checkpoint {i}: {waiting} state memtables wait for a flush"
        );
        let stopped = state
            .db
            .property_int_value("rocksdb.is-write-stopped")
            .unwrap()
            .unwrap_or(0);
        assert_eq!(stopped, 0, "after checkpoint {i}: RocksDB stopped writes");
    }
}
