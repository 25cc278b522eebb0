//! Native test harnesses: drive a state machine under `cargo test`, no cluster and no Wasm.
//!
//! [`Harness`] owns one [`StateMachine`] value, [`StoreHarness`] one tenant's storage for a
//! [`StoreStateMachine`]. Both call it the way the host does, including the host's restore
//! semantics (a memory-model restore goes into a fresh `T::default()`), its upgrades (state
//! handed over, then the new version's `migrate` with the previous version number) and its
//! storage rules (a call reads its own writes; they are committed when it returns, also with
//! `Err`, and dropped if it panics), so a test that passes here exercises the same contract the
//! cluster relies on.
//!
//! Each harness also plays the log: every `apply` is a new entry (index 1, 2, ...) in term 1,
//! with a timestamp you control ([`Harness::set_timestamp_ms`], never going back, as the
//! leader's) and a seed derived from (index, position), so [`crate::context()`] returns in a
//! test what it would in the cluster, except for the seed's exact bytes: the harness derives
//! it with a function of its own, so assert on properties of random choices, not on values.
//! A panic in the state machine propagates out of the harness call (as a trap would end the
//! call), after the harness dropped that call's storage writes.
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
//! [`Harness::upgrade_to`] does what `wraft deploy` of a new version does to a running tenant:
//! the running version's `snapshot` goes to a fresh new version's `restore`, then the new
//! version's `migrate` runs with the previous version number. Here version 1 keeps a count and
//! version 2 a count and a name; version 2's `restore` recognises both snapshot formats
//! (version 1's is exactly 8 bytes, version 2's starts with a tag byte and is longer):
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

use std::cell::Ref;
use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::rc::Rc;

use crate::context::{splitmix64, Context, FLAG_IN_APPLY};
use crate::host::fake::{self, Call};
use crate::host::Mode;
use crate::{StateMachine, StoreStateMachine};

/// The simulated log behind a harness: where it is, and what the next call's context is.
#[derive(Clone, Debug)]
struct Log {
    /// The last applied index (0: nothing yet).
    index: u64,
    term: u64,
    timestamp_ms: u64,
    /// The tenant's version number: 1 for the first deploy, one more per upgrade.
    version: u64,
}

impl Default for Log {
    fn default() -> Self {
        Log {
            index: 0,
            term: 1,
            timestamp_ms: 0,
            version: 1,
        }
    }
}

impl Log {
    /// Appends an entry and returns its index.
    fn next_entry(&mut self) -> u64 {
        self.index += 1;
        self.index
    }

    /// The context of command `position` of entry `index` (also of the deploy entry's
    /// `migrate`).
    fn apply_context(&self, index: u64, position: u32) -> Context {
        Context {
            index,
            term: self.term,
            timestamp_ms: self.timestamp_ms,
            position,
            flags: FLAG_IN_APPLY,
            seed: harness_seed(index, position),
        }
    }

    /// The context of a `query` or `snapshot`.
    fn read_context(&self) -> Context {
        Context {
            index: self.index,
            term: 0,
            timestamp_ms: self.timestamp_ms,
            ..Context::default()
        }
    }

    /// The context of a `restore` outside an upgrade (a restart).
    fn restore_context(&self) -> Context {
        Context {
            flags: FLAG_IN_APPLY,
            ..self.read_context()
        }
    }

    /// The log after a deploy entry that upgraded the tenant.
    fn upgraded(&self) -> Log {
        Log {
            index: self.index + 1,
            version: self.version + 1,
            ..self.clone()
        }
    }

    fn set_timestamp_ms(&mut self, ms: u64) {
        self.timestamp_ms = self.timestamp_ms.max(ms);
    }
}

/// The harness's seed for (index, position): deterministic and different per command, like
/// the cluster's, but not the same function.
fn harness_seed(index: u64, position: u32) -> [u8; 32] {
    let mut seed = [0u8; 32];
    let base = splitmix64(index ^ 0x5eed_5eed_5eed_5eed);
    for (i, chunk) in seed.chunks_exact_mut(8).enumerate() {
        let word = splitmix64(base ^ (u64::from(position) << 8) ^ i as u64);
        chunk.copy_from_slice(&word.to_le_bytes());
    }
    seed
}

/// Runs `f` as one call; a panic propagates after the call's writes were dropped.
fn call<R>(
    mode: Mode,
    context: Context,
    store: Option<Call>,
    f: impl FnOnce() -> R,
) -> (R, Option<Call>) {
    let (result, store) = fake::run(mode, context, store, f);
    match result {
        Ok(r) => (r, store),
        Err(panic) => {
            drop(store);
            std::panic::resume_unwind(panic)
        }
    }
}

/// The log clock and position accessors, the same on both harnesses.
macro_rules! log_methods {
    () => {
        /// Sets the leader timestamp of the following entries, in milliseconds since the Unix
        /// epoch (it starts at 0). Like the leader's, it never goes back: a value below the
        /// current one leaves it unchanged.
        pub fn set_timestamp_ms(&mut self, ms: u64) {
            self.log.set_timestamp_ms(ms);
        }

        /// Moves the timestamp of the following entries forward by `ms`.
        pub fn advance_ms(&mut self, ms: u64) {
            self.log.timestamp_ms = self.log.timestamp_ms.saturating_add(ms);
        }

        /// Sets the term of the following entries (it starts at 1), as after an election.
        pub fn set_term(&mut self, term: u64) {
            self.log.term = term;
        }

        /// The index of the last applied entry (0 before the first `apply`).
        pub fn index(&self) -> u64 {
            self.log.index
        }

        /// The current leader timestamp, in milliseconds.
        pub fn timestamp_ms(&self) -> u64 {
            self.log.timestamp_ms
        }

        /// The tenant's version number: 1 for a fresh harness, one more per upgrade.
        pub fn version(&self) -> u64 {
            self.log.version
        }

        /// The context the next `apply` will see (its seed included).
        pub fn next_context(&self) -> Context {
            self.log.apply_context(self.log.index + 1, 0)
        }
    };
}

/// Holds a memory-model state machine and calls it like the host would.
pub struct Harness<T: StateMachine> {
    state: T,
    log: Log,
}

impl<T: StateMachine> Default for Harness<T> {
    fn default() -> Self {
        Harness::new()
    }
}

impl<T: StateMachine> Harness<T> {
    /// A harness around `T::default()`, the state a fresh instance starts with.
    pub fn new() -> Self {
        Harness {
            state: T::default(),
            log: Log::default(),
        }
    }

    /// Applies a command, as a committed log entry would (a new index, one command).
    pub fn apply(&mut self, command: &[u8]) -> Result<Vec<u8>, String> {
        let index = self.log.next_entry();
        let context = self.log.apply_context(index, 0);
        call(Mode::Memory, context, None, || self.state.apply(command)).0
    }

    /// Applies the commands of one log entry: one index, positions 0, 1, ... (and so a
    /// different seed for each).
    pub fn apply_entry(&mut self, commands: &[&[u8]]) -> Vec<Result<Vec<u8>, String>> {
        let index = self.log.next_entry();
        let mut replies = Vec::with_capacity(commands.len());
        for (position, command) in commands.iter().enumerate() {
            let context = self.log.apply_context(index, position as u32);
            replies.push(call(Mode::Memory, context, None, || self.state.apply(command)).0);
        }
        replies
    }

    /// Runs a read-only query.
    pub fn query(&self, query: &[u8]) -> Result<Vec<u8>, String> {
        call(Mode::Memory, self.log.read_context(), None, || {
            self.state.query(query)
        })
        .0
    }

    /// Serializes the current state.
    pub fn snapshot(&self) -> Vec<u8> {
        call(Mode::Memory, self.log.read_context(), None, || {
            self.state.snapshot()
        })
        .0
    }

    /// Replaces the state with `snapshot`, restoring into a fresh `T::default()` as the SDK's
    /// exports do. On `Err` the current state is kept.
    pub fn restore(&mut self, snapshot: &[u8]) -> Result<(), String> {
        self.state = restored::<T>(self.log.restore_context(), snapshot)?;
        Ok(())
    }

    /// A harness around a state restored from `snapshot`, as the host starts an instance from
    /// a checkpoint (no `migrate`: a restart is not an upgrade).
    pub fn from_snapshot(snapshot: &[u8]) -> Result<Self, String> {
        let mut harness = Harness::new();
        harness.restore(snapshot)?;
        Ok(harness)
    }

    /// A harness as after deploying `T` over a tenant of version `from_version` whose
    /// snapshot is `snapshot`: `restore`, then `migrate(from_version)`. With a snapshot saved
    /// from an old version (a test fixture), this tests an upgrade after that version's code is
    /// gone.
    pub fn upgraded_from(snapshot: &[u8], from_version: u64) -> Result<Self, String> {
        let log = Log {
            version: from_version,
            ..Log::default()
        };
        Self::upgrade_with(&log, snapshot)
    }

    fn upgrade_with(old: &Log, snapshot: &[u8]) -> Result<Self, String> {
        let log = old.upgraded();
        let context = log.apply_context(log.index, 0);
        let mut state = restored::<T>(context, snapshot)?;
        call(Mode::Memory, context, None, || state.migrate(old.version)).0?;
        Ok(Harness { state, log })
    }

    /// Upgrades to the version `U`, as deploying `U`'s module over this tenant does: this
    /// state's `snapshot` is restored into a fresh `U::default()`, then `U::migrate` runs with
    /// this harness's [`version`](Self::version). On `Err` (the new version's restore or
    /// migrate refused) the cluster keeps running the old version; so does this harness, which
    /// is left untouched.
    pub fn upgrade_to<U: StateMachine>(&self) -> Result<Harness<U>, String> {
        Harness::<U>::upgrade_with(&self.log, &self.snapshot())
    }

    /// Upgrades to the store-model version `U`: this state's `snapshot` goes to `U`'s
    /// generated restore (so it must be in the format of [`crate::storage::encode_snapshot`]),
    /// then `U::migrate` runs. On `Err` this harness is left untouched.
    pub fn upgrade_to_store<U: StoreStateMachine>(&self) -> Result<StoreHarness<U>, String> {
        StoreHarness::<U>::upgrade_with(&self.log, &self.snapshot())
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

    log_methods!();
}

/// `T::default()` restored from `snapshot`, as the SDK's `wraft_restore` does.
fn restored<T: StateMachine>(context: Context, snapshot: &[u8]) -> Result<T, String> {
    call(Mode::Memory, context, None, || {
        let mut fresh = T::default();
        fresh.restore(snapshot).map(|()| fresh)
    })
    .0
}

/// Typed calls, for machines written with [`crate::TypedStateMachine`]: values in, values out,
/// with the output also put through the codec, so that an output the cluster could not
/// encode fails here with the cluster's error. (To test decoding, call
/// [`Harness::apply`] with the bytes a client would send.)
#[cfg(feature = "serde")]
impl<T: crate::TypedStateMachine> Harness<T> {
    /// Applies a typed command.
    pub fn apply_typed(&mut self, command: T::Command) -> Result<T::Output, String> {
        let index = self.log.next_entry();
        let context = self.log.apply_context(index, 0);
        let output = call(Mode::Memory, context, None, || {
            crate::TypedStateMachine::apply(&mut self.state, command)
        })
        .0?;
        crate::typed::encode_output::<T::Codec, _>(&output)?;
        Ok(output)
    }

    /// Runs a typed query.
    pub fn query_typed(&self, query: T::Query) -> Result<T::QueryOutput, String> {
        let output = call(Mode::Memory, self.log.read_context(), None, || {
            crate::TypedStateMachine::query(&self.state, query)
        })
        .0?;
        crate::typed::encode_output::<T::Codec, _>(&output)?;
        Ok(output)
    }
}

/// Holds one tenant's storage and calls a store-model state machine on it like the host
/// would.
///
/// Every call sees the committed store plus its own writes; the writes are committed when it
/// returns (`Ok` or `Err`, as in the cluster) and dropped if it panics. `query` and `snapshot`
/// get read-only storage. A `restore` or `migrate` that fails commits nothing, since the
/// cluster then stays on the old version.
///
/// ```
/// use wraft_guest_sdk::{storage, testing::StoreHarness, StoreStateMachine};
///
/// /// Version 1 stores names under `user/`.
/// struct V1;
/// impl StoreStateMachine for V1 {
///     fn apply(name: &[u8]) -> Result<Vec<u8>, String> {
///         storage::put(&[b"user/", name].concat(), b"")?;
///         Ok(vec![])
///     }
///     fn query(_: &[u8]) -> Result<Vec<u8>, String> {
///         Ok(vec![])
///     }
/// }
///
/// /// Version 2 keeps them under `u/`: its `migrate` moves version 1's keys.
/// struct V2;
/// impl StoreStateMachine for V2 {
///     fn apply(name: &[u8]) -> Result<Vec<u8>, String> {
///         storage::put(&[b"u/", name].concat(), b"")?;
///         Ok(vec![])
///     }
///     fn query(name: &[u8]) -> Result<Vec<u8>, String> {
///         let known = storage::get(&[b"u/", name].concat())?.is_some();
///         Ok(vec![u8::from(known)])
///     }
///     fn migrate(from_version: u64) -> Result<(), String> {
///         if from_version < 2 {
///             for pair in storage::scan_prefix(b"user/") {
///                 let (key, value) = pair?;
///                 storage::delete(&key)?;
///                 storage::put(&[b"u/", &key[5..]].concat(), &value)?;
///             }
///         }
///         Ok(())
///     }
/// }
///
/// let mut v1 = StoreHarness::<V1>::new();
/// v1.apply(b"ann").unwrap();
/// let v2 = v1.upgrade_to::<V2>().expect("migrate succeeds");
/// assert_eq!(v2.version(), 2);
/// assert_eq!(v2.query(b"ann"), Ok(vec![1]));
/// assert_eq!(v2.get(b"user/ann"), None);
/// // The old harness is untouched: the upgrade worked on a copy.
/// assert!(v1.get(b"user/ann").is_some());
/// ```
pub struct StoreHarness<T: StoreStateMachine> {
    store: fake::Store,
    log: Log,
    machine: PhantomData<fn() -> T>,
}

impl<T: StoreStateMachine> Default for StoreHarness<T> {
    fn default() -> Self {
        StoreHarness::new()
    }
}

impl<T: StoreStateMachine> StoreHarness<T> {
    /// A harness with empty storage, as a freshly deployed tenant.
    pub fn new() -> Self {
        Self::with_log(BTreeMap::new(), Log::default())
    }

    /// A harness whose storage starts with these pairs: a fixture, e.g. what an old version
    /// left behind. The pairs are not checked against the key and value caps.
    pub fn with_entries<K, V>(entries: impl IntoIterator<Item = (K, V)>) -> Self
    where
        K: Into<Vec<u8>>,
        V: Into<Vec<u8>>,
    {
        let store = entries
            .into_iter()
            .map(|(k, v)| (k.into(), v.into()))
            .collect();
        Self::with_log(store, Log::default())
    }

    fn with_log(store: BTreeMap<Vec<u8>, Vec<u8>>, log: Log) -> Self {
        StoreHarness {
            store: Rc::new(std::cell::RefCell::new(store)),
            log,
            machine: PhantomData,
        }
    }

    /// Runs `f` as one call on this storage. `commit_errors`: whether an `Err` commits the
    /// writes (an `apply`), or only `Ok` does (a restore or migrate, whose failure fails the
    /// upgrade).
    fn run<R>(
        &self,
        mode: Mode,
        context: Context,
        commit_errors: bool,
        f: impl FnOnce() -> Result<R, String>,
    ) -> Result<R, String> {
        let (result, store) = call(mode, context, Some(Call::new(self.store.clone())), f);
        if let Some(store) = store {
            if result.is_ok() || commit_errors {
                store.commit();
            }
        }
        result
    }

    /// Applies a command, as a committed log entry would (a new index, one command).
    pub fn apply(&mut self, command: &[u8]) -> Result<Vec<u8>, String> {
        let index = self.log.next_entry();
        let context = self.log.apply_context(index, 0);
        self.run(Mode::Write, context, true, || T::apply(command))
    }

    /// Applies the commands of one log entry: one index, positions 0, 1, ...; each command
    /// sees the writes of those before it.
    pub fn apply_entry(&mut self, commands: &[&[u8]]) -> Vec<Result<Vec<u8>, String>> {
        let index = self.log.next_entry();
        let mut replies = Vec::with_capacity(commands.len());
        for (position, command) in commands.iter().enumerate() {
            let context = self.log.apply_context(index, position as u32);
            replies.push(self.run(Mode::Write, context, true, || T::apply(command)));
        }
        replies
    }

    /// Runs a read-only query.
    pub fn query(&self, query: &[u8]) -> Result<Vec<u8>, String> {
        self.run(Mode::Read, self.log.read_context(), true, || {
            T::query(query)
        })
    }

    /// The generated `wraft_snapshot`: every pair, in the format of
    /// [`crate::storage::encode_snapshot`].
    pub fn snapshot(&self) -> Result<Vec<u8>, String> {
        self.run(
            Mode::Read,
            self.log.read_context(),
            true,
            crate::storage::snapshot_store,
        )
    }

    /// The generated `wraft_restore`: afterwards the storage holds exactly the snapshot's
    /// pairs. On `Err` it is unchanged.
    pub fn restore(&mut self, snapshot: &[u8]) -> Result<(), String> {
        self.run(Mode::Write, self.log.restore_context(), false, || {
            crate::storage::restore_store(snapshot)
        })
    }

    /// A harness whose storage was restored from `snapshot` (no `migrate`).
    pub fn from_snapshot(snapshot: &[u8]) -> Result<Self, String> {
        let mut harness = StoreHarness::new();
        harness.restore(snapshot)?;
        Ok(harness)
    }

    fn upgrade_with(old: &Log, snapshot: &[u8]) -> Result<Self, String> {
        let harness = Self::with_log(BTreeMap::new(), old.upgraded());
        let context = harness.log.apply_context(harness.log.index, 0);
        harness.run(Mode::Write, context, false, || {
            crate::storage::restore_store(snapshot)
        })?;
        harness.run(Mode::Write, context, false, || T::migrate(old.version))?;
        Ok(harness)
    }

    /// Upgrades to the store-model version `U`, as deploying `U`'s module over this tenant
    /// does: `U` finds this storage as it is and its `migrate` runs with this harness's
    /// [`version`](Self::version). Works on a copy: on `Err` (the cluster would stay on the old
    /// version) this harness is untouched, and on success it still holds the old storage.
    pub fn upgrade_to<U: StoreStateMachine>(&self) -> Result<StoreHarness<U>, String> {
        let log = self.log.upgraded();
        let context = log.apply_context(log.index, 0);
        let harness = StoreHarness::<U>::with_log(self.store.borrow().clone(), log);
        harness.run(Mode::Write, context, false, || U::migrate(self.log.version))?;
        Ok(harness)
    }

    /// Upgrades to the memory-model version `U`: the generated snapshot (format on
    /// [`crate::storage::encode_snapshot`]) goes to a fresh `U::default()`'s `restore`, then
    /// `U::migrate` runs.
    pub fn upgrade_to_memory<U: StateMachine>(&self) -> Result<Harness<U>, String> {
        Harness::<U>::upgrade_with(&self.log, &self.snapshot()?)
    }

    /// The committed storage, for assertions. Release the borrow before the next call.
    pub fn store(&self) -> Ref<'_, BTreeMap<Vec<u8>, Vec<u8>>> {
        self.store.borrow()
    }

    /// The committed value under `key`.
    pub fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.store.borrow().get(key).cloned()
    }

    /// Checks the generated snapshot and restore: snapshot, restore into empty storage,
    /// compare the storage and snapshot again. Returns the snapshot.
    ///
    /// # Panics
    ///
    /// If either fails or the storage differs (this is a test helper).
    pub fn round_trip(&self) -> Vec<u8> {
        let first = match self.snapshot() {
            Ok(snapshot) => snapshot,
            Err(e) => panic!("snapshot failed: {e}"),
        };
        let other = match StoreHarness::<T>::from_snapshot(&first) {
            Ok(other) => other,
            Err(e) => panic!("restore of a fresh snapshot failed: {e}"),
        };
        assert!(
            *other.store() == *self.store(),
            "storage changed across snapshot and restore"
        );
        assert_eq!(other.snapshot().as_ref(), Ok(&first));
        first
    }

    log_methods!();
}

/// Typed calls for [`crate::TypedStoreStateMachine`], as [`Harness::apply_typed`].
#[cfg(feature = "serde")]
impl<T: crate::TypedStoreStateMachine> StoreHarness<T> {
    /// Applies a typed command (its writes are committed, as in the cluster, even if the
    /// output then fails to encode).
    pub fn apply_typed(&mut self, command: T::Command) -> Result<T::Output, String> {
        let index = self.log.next_entry();
        let context = self.log.apply_context(index, 0);
        let output = self.run(Mode::Write, context, true, || {
            <T as crate::TypedStoreStateMachine>::apply(command)
        })?;
        crate::typed::encode_output::<T::Codec, _>(&output)?;
        Ok(output)
    }

    /// Runs a typed query.
    pub fn query_typed(&self, query: T::Query) -> Result<T::QueryOutput, String> {
        let output = self.run(Mode::Read, self.log.read_context(), true, || {
            <T as crate::TypedStoreStateMachine>::query(query)
        })?;
        crate::typed::encode_output::<T::Codec, _>(&output)?;
        Ok(output)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{context, storage};

    /// Records every context it sees; `migrate` records its version and fails on request.
    #[derive(Default)]
    struct Clocked {
        seen: Vec<Context>,
        migrated_from: Option<u64>,
    }

    impl StateMachine for Clocked {
        fn apply(&mut self, command: &[u8]) -> Result<Vec<u8>, String> {
            self.seen.push(context());
            if command == b"store" {
                // A memory-model machine has no storage: an error, not a trap.
                storage::put(b"k", b"v")?;
            }
            Ok(vec![])
        }
        fn query(&self, _: &[u8]) -> Result<Vec<u8>, String> {
            Ok(context().to_bytes().to_vec())
        }
        fn snapshot(&self) -> Vec<u8> {
            vec![self.seen.len() as u8]
        }
        fn restore(&mut self, _: &[u8]) -> Result<(), String> {
            Ok(())
        }
        fn migrate(&mut self, from_version: u64) -> Result<(), String> {
            let ctx = context();
            if !ctx.in_apply() {
                return Err("migrate runs outside apply".into());
            }
            self.migrated_from = Some(from_version);
            Ok(())
        }
    }

    /// Refuses every upgrade in `migrate`.
    #[derive(Default)]
    struct Refuses;

    impl StateMachine for Refuses {
        fn apply(&mut self, _: &[u8]) -> Result<Vec<u8>, String> {
            Ok(vec![])
        }
        fn query(&self, _: &[u8]) -> Result<Vec<u8>, String> {
            Ok(vec![])
        }
        fn snapshot(&self) -> Vec<u8> {
            vec![]
        }
        fn restore(&mut self, _: &[u8]) -> Result<(), String> {
            Ok(())
        }
        fn migrate(&mut self, from_version: u64) -> Result<(), String> {
            Err(format!("cannot upgrade from version {from_version}"))
        }
    }

    #[test]
    fn harness_plays_the_log() {
        let mut sm = Harness::<Clocked>::new();
        sm.set_timestamp_ms(1_000);
        sm.apply(b"").unwrap();
        sm.set_timestamp_ms(500); // never goes back
        sm.advance_ms(10);
        sm.set_term(3);
        let replies = sm.apply_entry(&[b"", b""]);
        assert_eq!(replies, [Ok(vec![]), Ok(vec![])]);
        let seen = &sm.state().seen;
        assert_eq!(
            seen.iter()
                .map(|c| (c.index, c.term, c.timestamp_ms, c.position))
                .collect::<Vec<_>>(),
            [(1, 1, 1_000, 0), (2, 3, 1_010, 0), (2, 3, 1_010, 1)]
        );
        assert!(seen.iter().all(Context::in_apply));
        assert_ne!(seen[1].seed, seen[2].seed, "a seed per command");
        assert_ne!(seen[0].seed, seen[1].seed);
        assert_eq!(sm.next_context().index, 3);
        // A query sees the applied index, term 0, the last timestamp, no seed.
        let query = sm.query(b"").unwrap();
        let ctx = Context::from_bytes(&query.try_into().unwrap());
        assert_eq!((ctx.index, ctx.term, ctx.timestamp_ms), (2, 0, 1_010));
        assert!(!ctx.in_apply());
        assert_eq!(ctx.seed, [0; 32]);
        // Two harnesses replaying the same log see the same seeds.
        let mut other = Harness::<Clocked>::new();
        other.apply(b"").unwrap();
        assert_eq!(other.state().seen[0].seed, seen[0].seed);
        // Outside a call the context is zero again.
        assert_eq!(context(), Context::default());
    }

    #[test]
    fn memory_model_storage_is_an_error() {
        let mut sm = Harness::<Clocked>::new();
        let err = sm.apply(b"store").unwrap_err();
        assert!(err.contains("only for store-model"), "{err}");
    }

    #[test]
    fn upgrades_run_migrate_with_the_previous_version() {
        let mut v1 = Harness::<Clocked>::new();
        v1.apply(b"").unwrap();
        let v2 = v1.upgrade_to::<Clocked>().unwrap();
        assert_eq!(v2.state().migrated_from, Some(1));
        assert_eq!((v2.version(), v2.index()), (2, 2));
        let v3 = v2.upgrade_to::<Clocked>().unwrap();
        assert_eq!(v3.state().migrated_from, Some(2));
        assert_eq!(
            v3.upgrade_to::<Refuses>().err(),
            Some("cannot upgrade from version 3".to_string())
        );
        let fixture = Harness::<Clocked>::upgraded_from(&[7], 5).unwrap();
        assert_eq!(fixture.state().migrated_from, Some(5));
        assert_eq!(fixture.version(), 6);
        // A restart is not an upgrade.
        assert_eq!(
            Harness::<Clocked>::from_snapshot(&[7])
                .unwrap()
                .state()
                .migrated_from,
            None
        );
    }

    /// A store-model machine: `apply` writes `key=value`, fails after writing on `fail:`,
    /// panics after writing on `panic:`; `query` tries to write on `write`.
    struct Writer;

    impl StoreStateMachine for Writer {
        fn apply(command: &[u8]) -> Result<Vec<u8>, String> {
            let text = String::from_utf8_lossy(command).into_owned();
            let (key, value) = text.split_once('=').ok_or("no =")?;
            storage::put(key.as_bytes(), value.as_bytes())?;
            if let Some(why) = key.strip_prefix("fail:") {
                return Err(why.to_string());
            }
            if key.starts_with("panic:") {
                panic!("asked to");
            }
            let ctx = context();
            Ok(format!("{}.{}", ctx.index, ctx.position).into_bytes())
        }
        fn query(query: &[u8]) -> Result<Vec<u8>, String> {
            if query == b"write" {
                storage::put(b"q", b"")?;
            }
            Ok(storage::get(query)?.unwrap_or_default())
        }
        fn migrate(from_version: u64) -> Result<(), String> {
            storage::put(b"migrated", from_version.to_string().as_bytes())?;
            if storage::get(b"refuse")?.is_some() {
                return Err("refused".into());
            }
            Ok(())
        }
    }

    #[test]
    fn store_harness_commits_like_the_host() {
        let mut sm = StoreHarness::<Writer>::new();
        assert_eq!(sm.apply(b"a=1"), Ok(b"1.0".to_vec()));
        assert_eq!(sm.query(b"a"), Ok(b"1".to_vec()));
        // The module's own error: its writes are committed, as the host does.
        assert_eq!(sm.apply(b"fail:x=2"), Err("x".to_string()));
        assert_eq!(sm.get(b"fail:x"), Some(b"2".to_vec()));
        // A panic is a trap: its writes are dropped, and the panic reaches the test.
        let panicked =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| sm.apply(b"panic:y=3")));
        assert!(panicked.is_err());
        assert_eq!(sm.get(b"panic:y"), None);
        // The harness is still usable and its log moved on.
        assert_eq!(sm.apply(b"b=4"), Ok(b"4.0".to_vec()));
        // Queries are read-only.
        let err = sm.query(b"write").unwrap_err();
        assert!(err.contains("read-only"), "{err}");
        // An entry of several commands: one index, each sees the ones before.
        assert_eq!(
            sm.apply_entry(&[b"c=5", b"d=6"]),
            [Ok(b"5.0".to_vec()), Ok(b"5.1".to_vec())]
        );
        assert_eq!(sm.store().len(), 5);
        sm.round_trip();
    }

    #[test]
    fn store_upgrades_migrate_on_a_copy() {
        let mut v1 = StoreHarness::<Writer>::new();
        v1.apply(b"a=1").unwrap();
        let v2 = v1.upgrade_to::<Writer>().unwrap();
        assert_eq!(v2.get(b"migrated"), Some(b"1".to_vec()));
        assert_eq!(v1.get(b"migrated"), None, "the old harness is untouched");
        assert_eq!(v2.version(), 2);
        // A failing migrate commits nothing and fails the upgrade.
        v1.apply(b"refuse=yes").unwrap();
        assert_eq!(v1.upgrade_to::<Writer>().err(), Some("refused".to_string()));
        // Memory to store and back, through the store snapshot format.
        let fixture = StoreHarness::<Writer>::with_entries([(b"x".to_vec(), b"1".to_vec())]);
        let memory = fixture.upgrade_to_memory::<Clocked>().unwrap();
        assert_eq!(memory.state().migrated_from, Some(1));
        let err = memory.upgrade_to_store::<Writer>().err().unwrap();
        assert!(
            err.contains("store snapshot"),
            "Clocked's snapshot is not one: {err}"
        );
    }

    #[cfg(feature = "serde")]
    mod typed {
        use serde::{Deserialize, Serialize};

        use super::*;
        use crate::{Json, TypedStoreStateMachine};

        struct Counter;

        #[derive(Deserialize)]
        struct Add {
            n: u64,
        }

        #[derive(Serialize, Debug, PartialEq)]
        struct Total {
            total: u64,
        }

        fn total() -> Result<u64, String> {
            Ok(match storage::get(b"total")? {
                Some(b) => u64::from_le_bytes(b.try_into().map_err(|_| "bad total")?),
                None => 0,
            })
        }

        impl TypedStoreStateMachine for Counter {
            type Codec = Json;
            type Command = Add;
            type Output = Total;
            type Query = ();
            type QueryOutput = Total;

            fn apply(Add { n }: Add) -> Result<Total, String> {
                let total = total()?.checked_add(n).ok_or("overflow")?;
                storage::put(b"total", &total.to_le_bytes())?;
                Ok(Total { total })
            }
            fn query((): ()) -> Result<Total, String> {
                Ok(Total { total: total()? })
            }
        }

        #[test]
        fn typed_store_machines() {
            let mut sm = StoreHarness::<Counter>::new();
            assert_eq!(sm.apply_typed(Add { n: 2 }), Ok(Total { total: 2 }));
            assert_eq!(sm.apply(br#"{"n":3}"#), Ok(br#"{"total":5}"#.to_vec()));
            assert_eq!(sm.query_typed(()), Ok(Total { total: 5 }));
            assert_eq!(sm.query(b"null"), Ok(br#"{"total":5}"#.to_vec()));
            let err = sm.apply(br#"{"n":-1}"#).unwrap_err();
            assert!(err.starts_with("bad command: json: "), "{err}");
            assert!(sm.query(b"1").unwrap_err().starts_with("bad query: "));
        }
    }
}
