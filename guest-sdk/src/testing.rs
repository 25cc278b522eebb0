//! A native test harness: drive a [`StateMachine`] under `cargo test`, no cluster and no Wasm.
//!
//! Owns one state machine value and calls it the way the host does, including the host's
//! restore semantics (restore into a fresh `T::default()`), so a test that passes here exercises
//! the same contract the cluster relies on.
//!
//! ```
//! # use wraft_guest_sdk::StateMachine;
//! # #[derive(Default)] struct Noop;
//! # impl StateMachine for Noop {
//! #     fn apply(&mut self, _: &[u8]) -> Result<Vec<u8>, String> { Ok(vec![]) }
//! #     fn query(&self, _: &[u8]) -> Result<Vec<u8>, String> { Ok(vec![]) }
//! #     fn snapshot(&self) -> Vec<u8> { vec![] }
//! #     fn restore(&mut self, _: &[u8]) -> Result<(), String> { Ok(()) }
//! # }
//! use wraft_guest_sdk::testing::Harness;
//!
//! let mut sm = Harness::<Noop>::new();
//! assert_eq!(sm.apply(b"anything"), Ok(vec![]));
//! sm.round_trip();
//! ```

use crate::StateMachine;

/// Holds a state machine and calls it like the host would.
#[derive(Default)]
pub struct Harness<T: StateMachine> {
    state: T,
}

impl<T: StateMachine> Harness<T> {
    /// A harness around `T::default()`, the state a fresh instance starts with.
    pub fn new() -> Self {
        Harness {
            state: T::default(),
        }
    }

    /// Applies a command, as a committed log entry would.
    pub fn apply(&mut self, command: &[u8]) -> Result<Vec<u8>, String> {
        self.state.apply(command)
    }

    /// Runs a read-only query.
    pub fn query(&self, query: &[u8]) -> Result<Vec<u8>, String> {
        self.state.query(query)
    }

    /// Serializes the current state.
    pub fn snapshot(&self) -> Vec<u8> {
        self.state.snapshot()
    }

    /// Replaces the state with `snapshot`, restoring into a fresh `T::default()` as the SDK's
    /// exports do. On `Err` the current state is kept.
    pub fn restore(&mut self, snapshot: &[u8]) -> Result<(), String> {
        let mut fresh = T::default();
        fresh.restore(snapshot)?;
        self.state = fresh;
        Ok(())
    }

    /// The state machine itself, for assertions on its fields.
    pub fn state(&self) -> &T {
        &self.state
    }

    /// Checks that a snapshot restores to an equal state: snapshot, restore it into a fresh
    /// instance, snapshot again, and compare the bytes. Returns the snapshot.
    ///
    /// # Panics
    ///
    /// If restore fails or the two snapshots differ (this is a test helper).
    pub fn round_trip(&self) -> Vec<u8> {
        let first = self.snapshot();
        let mut other = Harness::<T>::new();
        if let Err(e) = other.restore(&first) {
            panic!("restore of a fresh snapshot failed: {e}");
        }
        let second = other.snapshot();
        assert!(
            first == second,
            "snapshot changed across restore: {} bytes before, {} bytes after",
            first.len(),
            second.len()
        );
        first
    }
}
