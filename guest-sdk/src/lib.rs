//! Write a wraft replicated state machine in plain Rust.
//!
//! A state machine keeps its state in one of two places, its *model*:
//!
//! - **Memory** ([`StateMachine`], exported with [`export_state_machine!`]): a Rust value in the
//!   module's linear memory, made durable by your `snapshot`/`restore`. Fastest: no host calls.
//! - **Store** ([`StoreStateMachine`], exported with [`export_store_state_machine!`]): the
//!   tenant's ordered key-value storage on the host, reached through [`storage`]. The module
//!   keeps nothing in memory between calls (each runs on a fresh instance), writes no snapshot
//!   code, and its state may be far larger than the memory limit.
//!
//! Either way the macro generates every function of wraft's Wasm ABI (v1), so your crate
//! contains no `unsafe` and no ABI code, and [`testing`] runs the same type natively under
//! `cargo test`, without a cluster, including upgrades from one version to the next
//! ([`testing::Harness::upgrade_to`], [`testing::StoreHarness::upgrade_to`]) and their
//! [`StateMachine::migrate`] / [`StoreStateMachine::migrate`] step.
//!
//! Commands, queries and outputs are bytes; the typed variants [`TypedStateMachine`] and
//! [`TypedStoreStateMachine`] (cargo feature `serde`, on by default) make them your serde types
//! instead, decoded and encoded with [`Json`] or [`Postcard`]; input that does not decode is
//! answered with `bad command: ...`. See [`typed`] for an example.
//!
//! A call may ask the host for its [`context()`]: the log index, term and leader timestamp of
//! the command and a per-command random seed, the same on every replica.
//!
//! # Example
//!
//! ```
//! use wraft_guest_sdk::StateMachine;
//!
//! /// Counts how many bytes were ever applied.
//! #[derive(Default)]
//! pub struct ByteCounter {
//!     total: u64,
//! }
//!
//! impl StateMachine for ByteCounter {
//!     fn apply(&mut self, command: &[u8]) -> Result<Vec<u8>, String> {
//!         if command.is_empty() {
//!             return Err("empty command".to_string());
//!         }
//!         self.total += command.len() as u64;
//!         Ok(self.total.to_string().into_bytes())
//!     }
//!
//!     fn query(&self, _query: &[u8]) -> Result<Vec<u8>, String> {
//!         Ok(self.total.to_string().into_bytes())
//!     }
//!
//!     fn snapshot(&self) -> Vec<u8> {
//!         self.total.to_le_bytes().to_vec()
//!     }
//!
//!     fn restore(&mut self, snapshot: &[u8]) -> Result<(), String> {
//!         let bytes: [u8; 8] = snapshot
//!             .try_into()
//!             .map_err(|_| format!("snapshot is {} bytes, expected 8", snapshot.len()))?;
//!         self.total = u64::from_le_bytes(bytes);
//!         Ok(())
//!     }
//! }
//!
//! // Generates `wraft_apply`, `wraft_query`, ... (exported by name only on wasm32).
//! wraft_guest_sdk::export_state_machine!(ByteCounter);
//!
//! fn main() {
//!     // Test natively, no cluster needed.
//!     let mut sm = wraft_guest_sdk::testing::Harness::<ByteCounter>::new();
//!     assert_eq!(sm.apply(b"abc"), Ok(b"3".to_vec()));
//!     assert_eq!(sm.apply(b""), Err("empty command".to_string()));
//!     assert_eq!(sm.query(b""), Ok(b"3".to_vec()));
//!     sm.round_trip();
//! }
//! ```
//!
//! The same in the store model, with the time of the last command from the [`context()`]:
//!
//! ```
//! use wraft_guest_sdk::{context, storage, StoreStateMachine};
//!
//! pub struct ByteCounter;
//!
//! /// The stored total (0 if there is none yet).
//! fn total() -> Result<u64, String> {
//!     match storage::get(b"total")? {
//!         Some(bytes) => Ok(u64::from_le_bytes(bytes.try_into().map_err(|_| "bad total")?)),
//!         None => Ok(0),
//!     }
//! }
//!
//! impl StoreStateMachine for ByteCounter {
//!     fn apply(command: &[u8]) -> Result<Vec<u8>, String> {
//!         if command.is_empty() {
//!             return Err("empty command".to_string());
//!         }
//!         let total = total()? + command.len() as u64;
//!         storage::put(b"total", &total.to_le_bytes())?;
//!         // The leader's clock, stamped into the log entry: every replica stores the same.
//!         storage::put(b"last_ms", &context().timestamp_ms.to_le_bytes())?;
//!         Ok(total.to_string().into_bytes())
//!     }
//!
//!     fn query(_query: &[u8]) -> Result<Vec<u8>, String> {
//!         Ok(total()?.to_string().into_bytes())
//!     }
//! }
//!
//! // Also generates `wraft_model_store` and the snapshot/restore used on a change of model.
//! wraft_guest_sdk::export_store_state_machine!(ByteCounter);
//!
//! fn main() {
//!     let mut sm = wraft_guest_sdk::testing::StoreHarness::<ByteCounter>::new();
//!     sm.set_timestamp_ms(1_767_225_600_000);
//!     assert_eq!(sm.apply(b"abc"), Ok(b"3".to_vec()));
//!     assert_eq!(sm.query(b""), Ok(b"3".to_vec()));
//!     assert_eq!(sm.get(b"last_ms"), Some(1_767_225_600_000u64.to_le_bytes().to_vec()));
//! }
//! ```
//!
//! Build the plugin with `cargo build --release --target wasm32-unknown-unknown` (crate type
//! `cdylib`); the README of this crate has a step-by-step guide and describes the ABI byte by
//! byte.
//!
//! # What this crate keeps true
//!
//! - A request can never make the SDK itself panic or trap: every ABI misuse (an input buffer
//!   the host did not allocate, a state left borrowed by an earlier trap, a storage key over
//!   the cap, a write in a query) becomes an error status the host reads as the module's own
//!   error.
//! - A memory-model state is created with `T::default()` on first use and lives in one global;
//!   wasm32 without threads makes that global single-threaded. Natively it is per thread, so
//!   parallel `cargo test` threads never share state.
//! - A module imports only the host functions it calls: a memory-model module that never
//!   calls [`context()`] imports nothing.
//! - A panic in your code is recorded (once the first ABI call installed the hook) so the host
//!   can report its message after the trap, through `wraft_panic_message`.
#![deny(missing_docs)]

pub mod context;
mod host;
pub mod storage;
// The harnesses stand in for the host, so they exist natively only (tests run natively).
#[cfg(not(target_arch = "wasm32"))]
pub mod testing;
#[cfg(feature = "serde")]
pub mod typed;

pub use context::{context, Context};
#[cfg(feature = "serde")]
pub use typed::{Codec, Json, Postcard, TypedStateMachine, TypedStoreStateMachine};

#[doc(hidden)]
pub mod __private;

/// A deterministic replicated state machine.
///
/// Every replica applies the same commands in the same order and must reach the same state, so
/// an implementation must not depend on anything but its inputs: no clock, no randomness, no
/// iteration order of a `HashMap` (use a `BTreeMap`), no addresses. The host offers no clock
/// or randomness; use [`context()`] for a timestamp and a seed that every replica shares.
///
/// Return `Err` for a bad request (malformed input, unknown operation, a failed precondition);
/// that error reaches the client and leaves the replica usable. Never panic on input: a panic
/// traps the module, and the host then throws the instance away.
pub trait StateMachine: Default + 'static {
    /// Applies one committed command and returns its reply.
    ///
    /// If it returns `Err`, it should leave the state unchanged, because the host keeps using
    /// this instance.
    fn apply(&mut self, command: &[u8]) -> Result<Vec<u8>, String>;

    /// Answers a read-only query. It must not change state (it takes `&self`, and the host
    /// may serve queries on any replica).
    fn query(&self, query: &[u8]) -> Result<Vec<u8>, String>;

    /// Serializes the whole state deterministically: equal states give equal bytes.
    fn snapshot(&self) -> Vec<u8>;

    /// Replaces the whole state with the one `snapshot` describes (nothing of the current state
    /// may survive). On `Err` the state is unspecified; the host discards the instance.
    fn restore(&mut self, snapshot: &[u8]) -> Result<(), String>;

    /// Runs once when this version is deployed over a running tenant, right after `restore`
    /// gave it the previous version's state. `from_version` is the tenant's previous version
    /// number: 1 for the first deploy, one more per upgrade.
    ///
    /// Convert what `restore` could not (or check invariants); an `Err` (or a trap) fails the
    /// upgrade on every replica and the tenant stays on the old version. The default does
    /// nothing. Not called on restarts: `restore` alone must read every format it may find.
    fn migrate(&mut self, from_version: u64) -> Result<(), String> {
        let _ = from_version;
        Ok(())
    }
}

/// A deterministic replicated state machine whose state lives in host [`storage`] (the store
/// model).
///
/// Stateless on purpose: its functions take no `self`, because the host runs every call on a
/// fresh instance, so nothing in memory outlives a call. Implement it on a unit struct. There
/// is no `snapshot`/`restore` to write: the host keeps the storage durable, and
/// [`export_store_state_machine!`] generates the two functions the host needs when an upgrade
/// changes the model (format on [`storage::encode_snapshot`]).
///
/// The rules of [`StateMachine`] hold: deterministic, `Err` rather than panic. Writes are
/// committed when the call returns, **also when it returns `Err`**, and discarded only on a
/// trap: validate before you write (see [`storage`]).
pub trait StoreStateMachine: 'static {
    /// Applies one committed command and returns its reply; reads and writes [`storage`].
    fn apply(command: &[u8]) -> Result<Vec<u8>, String>;

    /// Answers a read-only query: [`storage::put`] and [`storage::delete`] fail here.
    fn query(query: &[u8]) -> Result<Vec<u8>, String>;

    /// Runs once when this version is deployed over a running tenant (after the generated
    /// `restore` if the previous version was a memory-model one), with the tenant's previous
    /// version number (1 for the first deploy, one more per upgrade); may read and write
    /// storage, e.g. to rewrite keys into a new layout. An `Err` (or a trap) fails the
    /// upgrade, its writes are dropped, and the tenant stays on the old version. The default
    /// does nothing.
    ///
    /// It is one call with one call's fuel and write limits: for a large store, prefer a
    /// format that new code reads lazily (converting on access).
    fn migrate(from_version: u64) -> Result<(), String> {
        let _ = from_version;
        Ok(())
    }
}

/// Generates the wraft ABI v1 exports for a [`StateMachine`] type.
///
/// Use it once per crate, at module level: `wraft_guest_sdk::export_state_machine!(MyType);`.
///
/// On wasm32 the generated functions are exported under their ABI names (`wraft_abi_v1`,
/// `wraft_alloc`, `wraft_apply`, `wraft_query`, `wraft_snapshot`, `wraft_restore`,
/// `wraft_migrate`, `wraft_panic_message`). On other targets they exist, unmangled names
/// withheld, so that several plugins can be linked into one native test binary without symbol
/// clashes.
#[macro_export]
macro_rules! export_state_machine {
    ($ty:ty) => {
        #[doc(hidden)]
        #[allow(dead_code)]
        pub mod __wraft_exports {
            use super::*;

            ::std::thread_local! {
                static STATE: ::std::cell::RefCell<::std::option::Option<$ty>> =
                    const { ::std::cell::RefCell::new(::std::option::Option::None) };
            }

            /// ABI version marker: its presence declares ABI v1.
            #[cfg_attr(target_arch = "wasm32", unsafe(no_mangle))]
            pub extern "C" fn wraft_abi_v1() {}

            /// Allocates the input buffer for the next call.
            #[cfg_attr(target_arch = "wasm32", unsafe(no_mangle))]
            pub extern "C" fn wraft_alloc(len: i32) -> i32 {
                $crate::__private::alloc(len)
            }

            /// Applies the command in the input buffer.
            #[cfg_attr(target_arch = "wasm32", unsafe(no_mangle))]
            pub extern "C" fn wraft_apply(ptr: i32, len: i32) -> i64 {
                $crate::__private::apply::<$ty>(&STATE, ptr, len)
            }

            /// Answers the query in the input buffer.
            #[cfg_attr(target_arch = "wasm32", unsafe(no_mangle))]
            pub extern "C" fn wraft_query(ptr: i32, len: i32) -> i64 {
                $crate::__private::query::<$ty>(&STATE, ptr, len)
            }

            /// Serializes the state.
            #[cfg_attr(target_arch = "wasm32", unsafe(no_mangle))]
            pub extern "C" fn wraft_snapshot() -> i64 {
                $crate::__private::snapshot::<$ty>(&STATE)
            }

            /// Replaces the state with the snapshot in the input buffer.
            #[cfg_attr(target_arch = "wasm32", unsafe(no_mangle))]
            pub extern "C" fn wraft_restore(ptr: i32, len: i32) -> i64 {
                $crate::__private::restore::<$ty>(&STATE, ptr, len)
            }

            /// Runs the upgrade step after `restore`.
            #[cfg_attr(target_arch = "wasm32", unsafe(no_mangle))]
            pub extern "C" fn wraft_migrate(from_version: i64) -> i64 {
                $crate::__private::migrate::<$ty>(&STATE, from_version)
            }

            /// Returns the message of the last panic.
            #[cfg_attr(target_arch = "wasm32", unsafe(no_mangle))]
            pub extern "C" fn wraft_panic_message() -> i64 {
                $crate::__private::panic_message()
            }
        }
    };
}

/// Generates the wraft ABI v1 exports of a store-model module for a [`StoreStateMachine`]
/// type.
///
/// Use it once per crate, at module level: `wraft_guest_sdk::export_store_state_machine!(MyType);`.
///
/// Exports (on wasm32, by name) `wraft_model_store` (the model declaration), `wraft_abi_v1`,
/// `wraft_alloc`, `wraft_apply`, `wraft_query`, `wraft_migrate`, `wraft_panic_message`, and a
/// generated `wraft_snapshot` (every stored pair, format on [`storage::encode_snapshot`]) and
/// `wraft_restore` (the store becomes the snapshot's pairs), which the host calls only when an
/// upgrade changes the model. On other targets the functions exist without their export names,
/// as with [`export_state_machine!`].
#[macro_export]
macro_rules! export_store_state_machine {
    ($ty:ty) => {
        #[doc(hidden)]
        #[allow(dead_code)]
        pub mod __wraft_exports {
            use super::*;

            /// Model marker: this module keeps its state in host storage.
            #[cfg_attr(target_arch = "wasm32", unsafe(no_mangle))]
            pub extern "C" fn wraft_model_store() {}

            /// ABI version marker: its presence declares ABI v1.
            #[cfg_attr(target_arch = "wasm32", unsafe(no_mangle))]
            pub extern "C" fn wraft_abi_v1() {}

            /// Allocates the input buffer for the next call.
            #[cfg_attr(target_arch = "wasm32", unsafe(no_mangle))]
            pub extern "C" fn wraft_alloc(len: i32) -> i32 {
                $crate::__private::alloc(len)
            }

            /// Applies the command in the input buffer.
            #[cfg_attr(target_arch = "wasm32", unsafe(no_mangle))]
            pub extern "C" fn wraft_apply(ptr: i32, len: i32) -> i64 {
                $crate::__private::store_apply::<$ty>(ptr, len)
            }

            /// Answers the query in the input buffer.
            #[cfg_attr(target_arch = "wasm32", unsafe(no_mangle))]
            pub extern "C" fn wraft_query(ptr: i32, len: i32) -> i64 {
                $crate::__private::store_query::<$ty>(ptr, len)
            }

            /// Encodes every stored pair (used when an upgrade changes the model).
            #[cfg_attr(target_arch = "wasm32", unsafe(no_mangle))]
            pub extern "C" fn wraft_snapshot() -> i64 {
                $crate::__private::store_snapshot()
            }

            /// Makes the store hold exactly the snapshot's pairs.
            #[cfg_attr(target_arch = "wasm32", unsafe(no_mangle))]
            pub extern "C" fn wraft_restore(ptr: i32, len: i32) -> i64 {
                $crate::__private::store_restore(ptr, len)
            }

            /// Runs the upgrade step.
            #[cfg_attr(target_arch = "wasm32", unsafe(no_mangle))]
            pub extern "C" fn wraft_migrate(from_version: i64) -> i64 {
                $crate::__private::store_migrate::<$ty>(from_version)
            }

            /// Returns the message of the last panic.
            #[cfg_attr(target_arch = "wasm32", unsafe(no_mangle))]
            pub extern "C" fn wraft_panic_message() -> i64 {
                $crate::__private::panic_message()
            }
        }
    };
}
