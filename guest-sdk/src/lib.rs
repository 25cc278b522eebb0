//! Write a wraft replicated state machine in plain Rust.
//!
//! You implement [`StateMachine`] for a type and export it with
//! [`export_state_machine!`]; the macro generates every function of wraft's Wasm ABI (v1), so
//! your crate contains no `unsafe` and no ABI code. [`testing::Harness`] runs the same type
//! natively under `cargo test`, without a cluster, and tests upgrades from one version of your
//! state machine to the next ([`testing::Harness::upgrade_to`]).
//!
//! Two ways to write one:
//! - [`StateMachine`]: commands, queries, outputs and snapshots are bytes; you parse them.
//! - [`TypedStateMachine`] (cargo feature `serde`, on by default): commands, queries and outputs
//!   are your serde types and the SDK decodes and encodes them with a codec, [`Json`] or
//!   [`Postcard`]; input that does not decode is answered with `bad command: ...`. See
//!   [`typed`] for an example.
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
//! Build the plugin with `cargo build --release --target wasm32-unknown-unknown` (crate type
//! `cdylib`); the README of this crate describes the ABI byte by byte.
//!
//! # What this crate keeps true
//!
//! - A request can never make the SDK itself panic or trap: every ABI misuse (an input buffer
//!   the host did not allocate, a state left borrowed by an earlier trap) becomes an error
//!   status the host reads as the module's own error.
//! - The state is created with `T::default()` on first use and lives in one global; wasm32
//!   without threads makes that global single-threaded. Natively it is per thread, so parallel
//!   `cargo test` threads never share state.
//! - A panic in your code is recorded (once the first ABI call installed the hook) so the host
//!   can report its message after the trap, through `wraft_panic_message`.
#![deny(missing_docs)]

pub mod testing;
#[cfg(feature = "serde")]
pub mod typed;

#[cfg(feature = "serde")]
pub use typed::{Codec, Json, Postcard, TypedStateMachine};

#[doc(hidden)]
pub mod __private;

/// A deterministic replicated state machine.
///
/// Every replica applies the same commands in the same order and must reach the same state, so
/// an implementation must not depend on anything but its inputs: no clock, no randomness, no
/// iteration order of a `HashMap` (use a `BTreeMap`), no addresses. On wasm32 the host offers
/// no imports, so most of these are impossible anyway.
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
}

/// Generates the wraft ABI v1 exports for a [`StateMachine`] type.
///
/// Use it once per crate, at module level: `wraft_guest_sdk::export_state_machine!(MyType);`.
///
/// On wasm32 the generated functions are exported under their ABI names (`wraft_abi_v1`,
/// `wraft_alloc`, `wraft_apply`, `wraft_query`, `wraft_snapshot`, `wraft_restore`,
/// `wraft_panic_message`). On other targets they exist, unmangled names withheld, so that
/// several plugins can be linked into one native test binary without symbol clashes.
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

            /// Returns the message of the last panic.
            #[cfg_attr(target_arch = "wasm32", unsafe(no_mangle))]
            pub extern "C" fn wraft_panic_message() -> i64 {
                $crate::__private::panic_message()
            }
        }
    };
}
