//! A native test harness: drive a [`StateMachine`] under `cargo test`, no cluster and no Wasm.
//!
//! Owns one state machine value and calls it the way the host does, including the host's
//! restore semantics (restore into a fresh `T::default()`) and its upgrade (the running
//! version's `snapshot` goes to a fresh new version's `restore`), so a test that passes here
//! exercises the same contract the cluster relies on.
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
//!
//! # Testing an upgrade
//!
//! [`Harness::upgrade_to`] does what `wraft deploy` of a new version does to a running tenant.
//! Here version 1 keeps a count and version 2 a count and a name; version 2's `restore`
//! recognises both snapshot formats (version 1's is exactly 8 bytes, version 2's starts with a
//! tag byte and is longer):
//!
//! ```
//! use wraft_guest_sdk::{testing::Harness, StateMachine};
//!
//! #[derive(Default)]
//! struct V1 { n: u64 }
//! impl StateMachine for V1 {
//!     fn apply(&mut self, _: &[u8]) -> Result<Vec<u8>, String> { self.n += 1; Ok(vec![]) }
//!     fn query(&self, _: &[u8]) -> Result<Vec<u8>, String> { Ok(self.n.to_string().into()) }
//!     fn snapshot(&self) -> Vec<u8> { self.n.to_le_bytes().to_vec() }
//!     fn restore(&mut self, s: &[u8]) -> Result<(), String> {
//!         self.n = u64::from_le_bytes(s.try_into().map_err(|_| "not 8 bytes")?);
//!         Ok(())
//!     }
//! }
//!
//! #[derive(Default)]
//! struct V2 { n: u64, name: String }
//! const V2_TAG: u8 = 0xf2;
//! impl StateMachine for V2 {
//!     fn apply(&mut self, c: &[u8]) -> Result<Vec<u8>, String> {
//!         self.n += 1;
//!         self.name = String::from_utf8(c.to_vec()).map_err(|e| e.to_string())?;
//!         Ok(vec![])
//!     }
//!     fn query(&self, _: &[u8]) -> Result<Vec<u8>, String> {
//!         Ok(format!("{} {}", self.n, self.name).into())
//!     }
//!     fn snapshot(&self) -> Vec<u8> {
//!         let mut out = vec![V2_TAG];
//!         out.extend_from_slice(&self.n.to_le_bytes());
//!         out.extend_from_slice(self.name.as_bytes());
//!         out
//!     }
//!     fn restore(&mut self, s: &[u8]) -> Result<(), String> {
//!         let (n, name) = match s {
//!             // Version 1: exactly the 8 bytes of the count; it had no name.
//!             [..] if s.len() == 8 => (s, &b"?"[..]),
//!             // Version 2: the tag, the count, the name.
//!             [V2_TAG, rest @ ..] if rest.len() >= 8 => rest.split_at(8),
//!             _ => return Err(format!("unknown snapshot format ({} bytes)", s.len())),
//!         };
//!         self.n = u64::from_le_bytes(n.try_into().map_err(|_| "count is not 8 bytes")?);
//!         self.name = String::from_utf8(name.to_vec()).map_err(|e| e.to_string())?;
//!         Ok(())
//!     }
//! }
//!
//! let mut v1 = Harness::<V1>::new();
//! v1.apply(b"").unwrap();
//! v1.apply(b"").unwrap();
//! let mut v2 = v1.upgrade_to::<V2>().expect("V2 restores V1's snapshot");
//! assert_eq!(v2.query(b""), Ok(b"2 ?".to_vec()));
//! v2.apply(b"ann").unwrap();
//! // A later redeploy of the same version (or a restart) restores V2's own format.
//! let v2_again = v2.upgrade_to::<V2>().expect("V2 restores its own snapshot");
//! assert_eq!(v2_again.query(b""), Ok(b"3 ann".to_vec()));
//! // Going back fails, and the cluster would stay on V2: test that too if you rely on it.
//! assert!(v2.upgrade_to::<V1>().is_err());
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

    /// A harness around a state restored from `snapshot`, as the host starts an instance from
    /// a checkpoint. With a snapshot saved from an old version (a test fixture), this tests a
    /// migration after that version's code is gone.
    pub fn from_snapshot(snapshot: &[u8]) -> Result<Self, String> {
        let mut harness = Harness::new();
        harness.restore(snapshot)?;
        Ok(harness)
    }

    /// Upgrades to the version `U`, as deploying `U`'s module over this tenant does: this
    /// state's `snapshot` is restored into a fresh `U::default()`. On `Err` (the new version's
    /// restore refused the snapshot) the cluster keeps running the old version; so does this
    /// harness, which is left untouched.
    pub fn upgrade_to<U: StateMachine>(&self) -> Result<Harness<U>, String> {
        Harness::<U>::from_snapshot(&self.snapshot())
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

/// Typed calls, for machines written with [`crate::TypedStateMachine`]: values in, values out,
/// with the output also put through the codec, so that an output the cluster could not
/// encode fails here with the cluster's error. (To test decoding, call
/// [`Harness::apply`] with the bytes a client would send.)
#[cfg(feature = "serde")]
impl<T: crate::TypedStateMachine> Harness<T> {
    /// Applies a typed command.
    pub fn apply_typed(&mut self, command: T::Command) -> Result<T::Output, String> {
        let output = crate::TypedStateMachine::apply(&mut self.state, command)?;
        crate::typed::encode_output::<T::Codec, _>(&output)?;
        Ok(output)
    }

    /// Runs a typed query.
    pub fn query_typed(&self, query: T::Query) -> Result<T::QueryOutput, String> {
        let output = crate::TypedStateMachine::query(&self.state, query)?;
        crate::typed::encode_output::<T::Codec, _>(&output)?;
        Ok(output)
    }
}
