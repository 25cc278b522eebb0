//! Runs tenants' state machines: WebAssembly modules executed deterministically by wasmtime.
//!
//! Owns the engine configuration, module validation against the wraft ABI, the host functions
//! a module may import, and every call into a guest. Keeps true: **the same module, limits and
//! inputs give the same result on every replica** — the only imports are wraft's own host
//! functions, whose values come from the log or from storage every replica holds identically
//! (so no clock, randomness or ambient I/O), floats produce
//! canonical NaNs, fuel (never wall-clock time) bounds each call, stack depth is counted in
//! units fixed by the code (never native bytes), and memory growth beyond
//! [`Limits::memory_bytes`] is refused the same way everywhere. Nothing a module does can
//! panic the host: hostile results are bounds-checked and size-capped before they are copied.
//!
//! # Cost and lifetime of the types
//!
//! - [`Runtime`]: one per process; wraps the `wasmtime::Engine` and the compile cache (cheap
//!   to clone; clones share the cache and [`Runtime::stats`]).
//! - [`Module`]: compiled code, expensive to make (Cranelift; the cache makes it a file read
//!   after the first time), cheap to clone; keyed by [`Module::hash`], the SHA-256 of the
//!   deployed bytes (not of the rewritten module that is actually compiled).
//! - [`Instance`]: one tenant's live state (its own store and linear memory); cheap to create.
//!   After an error whose [`CallError::poisons_instance`] is true its memory may be half
//!   changed: discard it and rebuild from a snapshot plus the log.
//!
//! # The ABI (v1)
//!
//! A module exports (names and signatures exact):
//!
//! | export | signature | meaning |
//! |---|---|---|
//! | `memory` | 32-bit memory | the linear memory the host reads and writes |
//! | `wraft_abi_v1` | `() -> ()` | marker: declares ABI version 1 |
//! | `wraft_alloc` | `(len: i32) -> i32` | allocate `len` bytes for the next input; ownership passes to the guest, which frees it during the following call |
//! | `wraft_apply` | `(ptr: i32, len: i32) -> i64` | apply a committed command |
//! | `wraft_query` | `(ptr: i32, len: i32) -> i64` | answer a read-only query |
//! | `wraft_snapshot` | `() -> i64` | serialize the whole state |
//! | `wraft_restore` | `(ptr: i32, len: i32) -> i64` | replace the whole state |
//! | `wraft_panic_message` | `() -> i64` | optional: the last recorded panic message |
//! | `wraft_migrate` | `(from_version: i64) -> i64` | optional: runs on the new version at an upgrade, after `restore` |
//! | `wraft_model_store` | `() -> ()` | optional marker: the store model (below) |
//!
//! Every call with input goes `wraft_alloc(len)` (even for `len == 0`), the host writes the
//! input at the returned pointer, then `wraft_apply(ptr, len)` (or query/restore). An `i64`
//! result packs `(result_ptr << 32) | result_len` (both u32) and points at a guest buffer,
//! valid until the next call, whose first byte is a status: `0` = ok and the rest is the
//! payload, `1` = the module's own error and the rest is a UTF-8 message. Any other status, an
//! empty buffer or one outside memory is [`CallError::BadAbi`].
//!
//! # Host functions (imports from `wraft`, all optional)
//!
//! Checked at deploy against an allow-list with exact signatures; anything else (WASI clocks
//! and random among them) is [`WasmError::ImportNotAllowed`]. Each call costs
//! [`HOST_CALL_FUEL`] plus one unit per byte it moves, and every pointer and length is
//! bounds-checked (a bad one traps with a message).
//!
//! | import | signature | meaning |
//! |---|---|---|
//! | `context` | `(out: i32) -> ()` | writes the [`CallContext`] record: 64 bytes, index u64, term u64, timestamp_ms u64, position u32, flags u32 (bit 0: in apply), seed [u8; 32], all little-endian |
//! | `storage_get` | `(key_ptr, key_len) -> i64` | -1 if absent, else the value's length; the value is pending output |
//! | `storage_put` | `(key_ptr, key_len, val_ptr, val_len) -> ()` | buffered; traps in a read-only call |
//! | `storage_delete` | `(key_ptr, key_len) -> ()` | buffered; traps in a read-only call |
//! | `storage_scan` | `(start_ptr, start_len, end_ptr, end_len, limit) -> i64` | pairs in [start, end) (end_len 0: unbounded), at most `limit` and [`MAX_SCAN_BYTES`]; the length of their encoding (u32 LE key length, key, u32 LE value length, value) is returned and the encoding is pending output |
//! | `take_output` | `(dst: i32) -> ()` | copies the pending output to `dst` |
//!
//! Storage is only for **store-model** modules (they export `wraft_model_store`): their state
//! lives in host storage, a call sees its own writes, and the host commits a call's writes
//! after its output or its own error and drops them after a trap ([`Instance::take_writes`]).
//! The host runs every call of a store-model module on a fresh instance. Keys are at most
//! [`MAX_KEY_BYTES`], values [`MAX_VALUE_BYTES`], one call's writes [`MAX_WRITE_BYTES`].
//!
//! # Accepted Wasm features
//!
//! The MVP plus what rustc 1.95 emits by default for `wasm32-unknown-unknown`: mutable
//! globals, sign extension, non-trapping float-to-int, bulk memory, multi-value and reference
//! types; fixed-width SIMD (`simd128`) is accepted too. Rejected at compile time: threads and
//! shared memory, memory64, multi-memory, relaxed SIMD, tail calls, exceptions, GC and typed
//! function references, custom page sizes, wide arithmetic, stack switching.
//!
//! # Limits and determinism
//!
//! Fuel is reset before every call: [`Limits::fuel_per_call`] for `apply`/`query` (covering
//! the `wraft_alloc` call too), [`Limits::fuel_per_snapshot`] for `snapshot`/`restore`.
//! Results of `apply`/`query` are capped at [`Limits::max_result_bytes`]; snapshots only by
//! the memory limit.
//!
//! Stack depth is bounded in *stack units*, not native bytes: before compiling, every module
//! is rewritten so that each function charges a cost fixed by its own code (1 unit per
//! parameter, declared local, result and value of its deepest operand stack, plus 4 per frame)
//! on entry and gives it back on return. A call whose frames would need more than
//! [`Limits::stack_units`] traps with [`CallError::StackLimit`] at the same depth on every
//! machine (see `stack.rs`). wasmtime's own native guard, whose depth depends on the CPU and
//! the compiler's frame layout, sits above the unit bound: [`MAX_STACK_UNITS`] units ×
//! [`STACK_UNIT_BYTES`] bytes, at least twice what the largest frames measured per unit need.
//! It can therefore only trip on entry to a function that costs more units than remain, where
//! the unit bound trips too, and it is reported as the same [`CallError::StackLimit`]. For that
//! to hold, every thread that runs guest code needs [`GUEST_THREAD_STACK_BYTES`] of stack.
//! The rewrite's extra instructions burn fuel like any other; the rewrite is part of the
//! engine ([`ENGINE`]).
//!
//! # Compile cache
//!
//! [`Runtime::with_cache_dir`] keeps compiled modules on disk, keyed by the module's hash and
//! the engine (see `cache.rs`); a file that fails its checksum is recompiled, never loaded.

mod cache;
mod engine;
mod host_api;
mod instance;
mod stack;
#[cfg(test)]
mod tests;

pub use cache::CompileStats;
pub use engine::{
    Model, Module, Runtime, GUEST_THREAD_STACK_BYTES, MAX_STACK_UNITS, STACK_UNIT_BYTES,
};

/// The engine every replica of a tenant must run: fuel accounting and trap behaviour may change
/// between wasmtime releases, so this is recorded with every deploy and checkpoint and a node
/// with another engine refuses to apply (see the apply stage). Change it whenever the wasmtime
/// pin or the engine configuration changes (a test checks the pin).
pub const ENGINE: &str =
    "wasmtime 48.0.8; fuel; nan-canonical; stack-units v1; abi v1; host-fns v1";
pub use host_api::{
    CallContext, Pairs, StorageView, WriteSet, CONTEXT_BYTES, HOST_CALL_FUEL, HOST_MODULE,
    MAX_KEY_BYTES, MAX_SCAN_BYTES, MAX_VALUE_BYTES, MAX_WRITE_BYTES,
};
pub use instance::Instance;

/// A tenant's limits: replicated configuration (the host keeps them per tenant in its log and
/// checkpoints; a plain struct here).
///
/// Every replica must use the same values, since they decide where a call fails.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Fuel for one `apply` or `query` (including its `wraft_alloc`).
    pub fuel_per_call: u64,
    /// Fuel for one `snapshot` or `restore` (including its `wraft_alloc`).
    pub fuel_per_snapshot: u64,
    /// Maximum size of the linear memory, in bytes.
    pub memory_bytes: u64,
    /// Maximum payload of an `apply` or `query` result, in bytes.
    pub max_result_bytes: u64,
    /// Maximum size of a module's Wasm binary, in bytes.
    pub max_module_bytes: u64,
    /// Stack units one call may use (see "Limits and determinism"); at most
    /// [`MAX_STACK_UNITS`].
    pub stack_units: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            fuel_per_call: 200_000_000,
            fuel_per_snapshot: 5_000_000_000,
            memory_bytes: 256 << 20,
            max_result_bytes: 4 << 20,
            max_module_bytes: 8 << 20,
            stack_units: MAX_STACK_UNITS,
        }
    }
}

/// Why a call into a module failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// The module's own error (status 1): a bad request. The instance stays usable.
    #[error("module rejected the request: {0}")]
    Rejected(String),
    /// The module trapped; includes the guest's panic message when it recorded one.
    #[error("module trapped: {0}")]
    Trap(String),
    /// The call used up its fuel.
    #[error("module ran out of fuel (limit {limit})")]
    OutOfFuel {
        /// The fuel the call started with.
        limit: u64,
    },
    /// The module tried to grow its memory beyond the limit and then failed.
    #[error("module exceeded its memory limit of {limit} bytes")]
    MemoryLimit {
        /// The memory limit in bytes.
        limit: u64,
    },
    /// The result is larger than allowed; it was not copied.
    #[error("module returned {len} bytes; the limit is {limit}")]
    ResultTooLarge {
        /// The payload length the module claimed.
        len: u64,
        /// The result limit in bytes.
        limit: u64,
    },
    /// The call nested deeper than [`Limits::stack_units`] allows (typically unbounded
    /// recursion); the same depth on every replica.
    #[error("recursion too deep: the module exceeded its stack limit of {limit} units")]
    StackLimit {
        /// The stack units the call started with.
        limit: u32,
    },
    /// The module broke the ABI (e.g. a result pointer out of bounds).
    #[error("module broke the wraft ABI: {0}")]
    BadAbi(String),
}

impl CallError {
    /// Whether the instance must be discarded: true for everything but [`CallError::Rejected`],
    /// because the call may have stopped half-way through changing memory.
    pub fn poisons_instance(&self) -> bool {
        !matches!(self, CallError::Rejected(_))
    }
}

/// Why a module could not be compiled or instantiated.
#[derive(Debug, thiserror::Error)]
pub enum WasmError {
    /// The binary is larger than [`Limits::max_module_bytes`].
    #[error("module is {len} bytes; the limit is {limit}")]
    ModuleTooLarge {
        /// Size of the binary.
        len: u64,
        /// The limit.
        limit: u64,
    },
    /// Not valid Wasm, or uses a feature wraft does not accept.
    #[error("invalid module: {0}")]
    Invalid(String),
    /// A required export is missing.
    #[error("module exports no `{name}` (expected {signature})")]
    MissingExport {
        /// The export's name.
        name: &'static str,
        /// What it should be.
        signature: &'static str,
    },
    /// An ABI export has the wrong type.
    #[error("module export `{name}` has the wrong type: expected {expected}, found {found}")]
    WrongSignature {
        /// The export's name.
        name: &'static str,
        /// What it should be.
        expected: &'static str,
        /// What it is.
        found: String,
    },
    /// The module imports something that is not one of wraft's host functions.
    #[error("module imports `{module}::{name}`; wraft modules may import only wraft's host functions (`wraft::context`, `wraft::storage_*`, `wraft::take_output`): no WASI, clocks or randomness")]
    ImportNotAllowed {
        /// The import's module name.
        module: String,
        /// The import's field name.
        name: String,
    },
    /// A host function is imported with the wrong type.
    #[error(
        "module imports `wraft::{name}` with the wrong type: expected {expected}, found {found}"
    )]
    WrongImport {
        /// The host function.
        name: &'static str,
        /// Its type.
        expected: &'static str,
        /// The imported type.
        found: String,
    },
    /// A memory-model module imports a storage function.
    #[error("module imports `wraft::{name}`, but only store-model modules may use host storage: export `wraft_model_store` to declare the store model")]
    StorageNeedsStoreModel {
        /// The storage function.
        name: String,
    },
    /// Instantiation failed (e.g. its initial memory exceeds the limit, or its start function
    /// trapped).
    #[error("cannot instantiate module: {0}")]
    Instantiate(String),
    /// The engine could not be configured.
    #[error("cannot configure the Wasm engine: {0}")]
    Engine(String),
}
