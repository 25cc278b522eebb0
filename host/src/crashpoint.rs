//! Crash points for recovery tests: `WRAFT_CRASH_AT=name[,name...]` makes the process abort
//! (no destructor runs, nothing is flushed: the disk is left as `kill -9` would leave it) the
//! first time execution reaches a named point. Tests use it to hit a phase for sure instead
//! of hoping a timed kill lands inside it.
//!
//! The points, in the order a node meets them:
//! - `join-asking`: a node started with `--join` recorded its identity and is about to ask the
//!   cluster to add it.
//! - `checkpoint-unlogged`: a checkpoint too large for the WAL is in RocksDB's memtable and
//!   nowhere else (lost by a crash here).
//! - `compaction-checkpointed`: the apply stage checkpointed every tenant for a compaction,
//!   before it waits for them to be durable and the Raft loop drops the log.
//! - `compacted`: the Raft loop dropped the log up to the compaction point.
//! - `snapshot-sending`: a leader is half-way through streaming a snapshot.
//! - `snapshot-receiving`: a follower has received the first chunk of a snapshot (of several).
//! - `snapshot-staged`: a follower has staged a whole snapshot, before raft installs it.
//! - `snapshot-installing`: just before the install's synced write.
//! - `snapshot-installed`: the install's write is durable; the apply stage has not switched.
//! - `conf-change-applied`: a conf change was applied to raft, before it is persisted.

use std::sync::OnceLock;

/// The variable that arms crash points.
pub const ENV: &str = "WRAFT_CRASH_AT";

fn armed() -> &'static Vec<String> {
    static ARMED: OnceLock<Vec<String>> = OnceLock::new();
    ARMED.get_or_init(|| {
        std::env::var(ENV)
            .map(|v| {
                v.split(',')
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .collect()
            })
            .unwrap_or_default()
    })
}

/// Aborts the process if `name` is armed. Costs one comparison per armed point otherwise.
pub fn hit(name: &str) {
    if armed().iter().any(|a| a == name) {
        // Printed to stderr so the test can tell a crash point from an accidental abort.
        eprintln!("wraft: crash point `{name}` reached ({ENV}); aborting");
        std::process::abort();
    }
}
