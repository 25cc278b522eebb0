//! One live module instance and the host side of every ABI call into it.
//!
//! Owns the wasmtime store (fuel, memory limiter) and the typed exports. Keeps true: fuel is
//! set fresh before every call, and so are the stack units; memory growth is decided only by the module and
//! [`Limits::memory_bytes`]; a result is bounds-checked against memory and size-capped before
//! a single byte is copied, so a hostile module can at worst fail its own call.

use wasmtime::{
    Engine, Global, GlobalType, Memory, Mutability, ResourceLimiter, Store, Trap, TypedFunc, Val,
    ValType,
};

use std::sync::Arc;

use crate::host_api::{self, CallContext, CallState, HasCallState, StorageView, WriteSet};
use crate::{stack, CallError, Limits, Module, WasmError};

/// Status byte of a successful result.
const STATUS_OK: u8 = 0;
/// Status byte of the module's own error.
const STATUS_ERR: u8 = 1;

/// Fuel for reading the panic message after a trap; small, since it only copies a string.
const PANIC_MESSAGE_FUEL: u64 = 10_000_000;
/// Longest panic message read back (bytes), and the length it is cut to for the error.
const PANIC_MESSAGE_MAX_READ: u64 = 64 * 1024;
const PANIC_MESSAGE_KEEP: usize = 2048;

/// Table elements a module may grow to. Tables cost host memory but sit outside linear memory,
/// so they need their own cap; Rust modules use a few hundred entries.
const MAX_TABLE_ELEMENTS: usize = 1 << 20;

/// The store's data: the memory limiter and what it observed during the current call.
struct HostState {
    memory_bytes: u64,
    /// Set when a growth was refused during the current call: a trap that follows is the
    /// guest's allocator aborting, reported as [`CallError::MemoryLimit`].
    denied_growth: bool,
    /// What the host functions see and buffer during the current call.
    call: CallState,
}

impl HasCallState for HostState {
    fn call_state(&mut self) -> &mut CallState {
        &mut self.call
    }
}

impl ResourceLimiter for HostState {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired as u64 > self.memory_bytes {
            self.denied_growth = true;
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }

    fn memories(&self) -> usize {
        1
    }
}

/// A live instance of a module: one tenant's state machine. Owns its store; `Send`.
pub struct Instance {
    store: Store<HostState>,
    memory: Memory,
    alloc: TypedFunc<i32, i32>,
    apply: TypedFunc<(i32, i32), i64>,
    query: TypedFunc<(i32, i32), i64>,
    restore: TypedFunc<(i32, i32), i64>,
    snapshot: TypedFunc<(), i64>,
    panic_message: Option<TypedFunc<(), i64>>,
    migrate: Option<TypedFunc<i64, i64>>,
    /// The stack units still available to the running call (see `stack.rs`).
    stack_units: Global,
    limits: Limits,
    /// The fuel the current (or last) call started with, to report what it used.
    budget: u64,
}

impl Instance {
    pub(super) fn new(
        engine: &Engine,
        module: &Module,
        limits: &Limits,
    ) -> Result<Self, WasmError> {
        let mut store = Store::new(
            engine,
            HostState {
                memory_bytes: limits.memory_bytes,
                denied_growth: false,
                call: CallState::default(),
            },
        );
        store.limiter(|state| state as &mut dyn ResourceLimiter);
        // A start function runs during instantiation and burns fuel and stack like any call.
        store
            .set_fuel(limits.fuel_per_call)
            .map_err(|e| WasmError::Engine(format!("cannot set fuel: {e:#}")))?;
        let stack_units = Global::new(
            &mut store,
            GlobalType::new(ValType::I32, Mutability::Var),
            Val::I32(stack_units(limits)),
        )
        .map_err(|e| WasmError::Engine(format!("cannot create the stack counter: {e:#}")))?;
        let imports = host_api::resolve(&mut store, &module.inner, stack_units.into())?;
        let instance = match wasmtime::Instance::new(&mut store, &module.inner, &imports) {
            Ok(instance) => instance,
            Err(e)
                if exhausted(&mut store, stack_units)
                    || matches!(e.downcast_ref::<Trap>(), Some(Trap::StackOverflow)) =>
            {
                let error = CallError::StackLimit {
                    limit: limits.stack_units,
                };
                return Err(WasmError::Instantiate(format!("start function: {error}")));
            }
            Err(e) => return Err(WasmError::Instantiate(format!("{e:#}"))),
        };
        let memory = instance
            .get_memory(&mut store, "memory")
            .ok_or(WasmError::MissingExport {
                name: "memory",
                signature: "a 32-bit, non-shared memory",
            })?;
        let typed = |e: wasmtime::Error| WasmError::Instantiate(format!("{e:#}"));
        let alloc = instance
            .get_typed_func(&mut store, "wraft_alloc")
            .map_err(typed)?;
        let apply = instance
            .get_typed_func(&mut store, "wraft_apply")
            .map_err(typed)?;
        let query = instance
            .get_typed_func(&mut store, "wraft_query")
            .map_err(typed)?;
        let restore = instance
            .get_typed_func(&mut store, "wraft_restore")
            .map_err(typed)?;
        let snapshot = instance
            .get_typed_func(&mut store, "wraft_snapshot")
            .map_err(typed)?;
        let panic_message = if module.has_panic_message {
            Some(
                instance
                    .get_typed_func(&mut store, "wraft_panic_message")
                    .map_err(typed)?,
            )
        } else {
            None
        };
        let migrate = if module.has_migrate {
            Some(
                instance
                    .get_typed_func(&mut store, "wraft_migrate")
                    .map_err(typed)?,
            )
        } else {
            None
        };
        Ok(Instance {
            store,
            memory,
            alloc,
            apply,
            query,
            restore,
            snapshot,
            panic_message,
            migrate,
            stack_units,
            limits: limits.clone(),
            budget: 0,
        })
    }

    /// Applies a committed command; returns the module's reply.
    pub fn apply(&mut self, command: &[u8]) -> Result<Vec<u8>, CallError> {
        let (fuel, max) = (self.limits.fuel_per_call, self.limits.max_result_bytes);
        self.call_with_input(self.apply.clone(), command, fuel, max, true)
    }

    /// Runs a read-only query; returns the module's reply.
    pub fn query(&mut self, query: &[u8]) -> Result<Vec<u8>, CallError> {
        let (fuel, max) = (self.limits.fuel_per_call, self.limits.max_result_bytes);
        self.call_with_input(self.query.clone(), query, fuel, max, false)
    }

    /// [`Instance::query`] with this context.
    pub fn query_in(&mut self, context: CallContext, query: &[u8]) -> Result<Vec<u8>, CallError> {
        self.set_context(context);
        self.query(query)
    }

    /// Serializes the module's whole state. Capped by the memory limit, not
    /// [`Limits::max_result_bytes`]: a snapshot is as large as the state.
    pub fn snapshot(&mut self) -> Result<Vec<u8>, CallError> {
        let (fuel, max) = (self.limits.fuel_per_snapshot, self.limits.memory_bytes);
        self.begin(fuel, false)?;
        let packed = self
            .snapshot
            .call(&mut self.store, ())
            .map_err(|e| self.trap(e, fuel))?;
        self.read_result(packed, max)
    }

    /// Replaces the module's whole state with `snapshot`.
    pub fn restore(&mut self, snapshot: &[u8]) -> Result<(), CallError> {
        let (fuel, max) = (self.limits.fuel_per_snapshot, self.limits.max_result_bytes);
        self.call_with_input(self.restore.clone(), snapshot, fuel, max, true)
            .map(drop)
    }

    /// Calls the module's `wraft_migrate(from_version)` if it has one (an upgrade, after
    /// `restore`); `Ok` without one.
    pub fn migrate(&mut self, from_version: u64) -> Result<(), CallError> {
        let Some(func) = self.migrate.clone() else {
            return Ok(());
        };
        let (fuel, max) = (self.limits.fuel_per_snapshot, self.limits.max_result_bytes);
        self.begin(fuel, true)?;
        let version = i64::try_from(from_version).unwrap_or(i64::MAX);
        let packed = func
            .call(&mut self.store, version)
            .map_err(|e| self.trap(e, fuel))?;
        self.read_result(packed, max).map(drop)
    }

    /// Sets what `wraft::context` returns from the next call on.
    pub fn set_context(&mut self, context: CallContext) {
        self.store.data_mut().call.context = context;
    }

    /// Gives the next calls this storage (store-model modules); `None` takes it away.
    pub fn set_storage(&mut self, storage: Option<Arc<dyn StorageView>>) {
        self.store.data_mut().call.storage = storage;
    }

    /// The writes buffered since the last time they were taken, for the host to commit (after
    /// a call's output or its own error; a trap drops them).
    pub fn take_writes(&mut self) -> WriteSet {
        self.store.data_mut().call.take_writes()
    }

    /// Fuel the last call used (all of it when it ran out). For metrics: the limit, not this
    /// figure, decides what a call may do.
    pub fn fuel_used(&self) -> u64 {
        self.budget
            .saturating_sub(self.store.get_fuel().unwrap_or(0))
    }

    /// The current size of the instance's linear memory.
    pub fn memory_bytes(&self) -> u64 {
        self.memory.data_size(&self.store) as u64
    }

    /// Resets the per-call state: fresh fuel and stack units, no refused growth yet, no
    /// buffered writes; `writable`: whether the call may write storage.
    fn begin(&mut self, fuel: u64, writable: bool) -> Result<(), CallError> {
        self.store.data_mut().denied_growth = false;
        self.store.data_mut().call.begin(writable);
        self.budget = fuel;
        self.reset_stack_units()?;
        self.store
            .set_fuel(fuel)
            .map_err(|e| CallError::Trap(format!("cannot set fuel: {e:#}")))
    }

    /// `wraft_alloc(len)`, write the input, then `func(ptr, len)`, all on one fuel budget.
    fn call_with_input(
        &mut self,
        func: TypedFunc<(i32, i32), i64>,
        input: &[u8],
        fuel: u64,
        max_result: u64,
        writable: bool,
    ) -> Result<Vec<u8>, CallError> {
        self.begin(fuel, writable)?;
        let memory_limit = self.limits.memory_bytes;
        // An input larger than the memory limit could never be allocated; refuse it up front
        // (as the guest's allocator would) instead of letting it wrap around in an i32.
        let len = i32::try_from(input.len())
            .ok()
            .filter(|&len| len as u64 <= memory_limit)
            .ok_or(CallError::MemoryLimit {
                limit: memory_limit,
            })?;
        let ptr = self
            .alloc
            .call(&mut self.store, len)
            .map_err(|e| self.trap(e, fuel))?;
        let start = ptr as u32 as usize;
        let size = self.memory.data_size(&self.store);
        if start.checked_add(input.len()).is_none_or(|end| end > size) {
            return Err(CallError::BadAbi(format!(
                "`wraft_alloc({len})` returned {start:#x}, which is outside the module's \
                 {size} bytes of memory"
            )));
        }
        self.memory
            .write(&mut self.store, start, input)
            .map_err(|e| CallError::BadAbi(format!("cannot write the input: {e}")))?;
        let packed = func
            .call(&mut self.store, (ptr, len))
            .map_err(|e| self.trap(e, fuel))?;
        self.read_result(packed, max_result)
    }

    /// Decodes a packed `(ptr << 32) | len` result, checking it before copying anything.
    fn read_result(&self, packed: i64, max_payload: u64) -> Result<Vec<u8>, CallError> {
        let packed = packed as u64;
        let ptr = (packed >> 32) as usize;
        let len = (packed & 0xffff_ffff) as usize;
        let Some(payload_len) = len.checked_sub(1) else {
            return Err(CallError::BadAbi(
                "result is empty (it needs at least the status byte)".to_string(),
            ));
        };
        if payload_len as u64 > max_payload {
            return Err(CallError::ResultTooLarge {
                len: payload_len as u64,
                limit: max_payload,
            });
        }
        let data = self.memory.data(&self.store);
        let buf = ptr
            .checked_add(len)
            .and_then(|end| data.get(ptr..end))
            .ok_or_else(|| {
                CallError::BadAbi(format!(
                    "result [{ptr:#x}, +{len}) is outside the module's {} bytes of memory",
                    data.len()
                ))
            })?;
        match buf.split_first() {
            Some((&STATUS_OK, payload)) => Ok(payload.to_vec()),
            Some((&STATUS_ERR, message)) => Err(CallError::Rejected(
                String::from_utf8_lossy(message).into_owned(),
            )),
            Some((status, _)) => Err(CallError::BadAbi(format!(
                "result status byte is {status}; expected 0 (ok) or 1 (error)"
            ))),
            None => Err(CallError::BadAbi("result is empty".to_string())),
        }
    }

    /// Classifies an error from a call into the guest.
    fn trap(&mut self, error: wasmtime::Error, fuel: u64) -> CallError {
        // A trapped call's writes never reach storage.
        self.store.data_mut().call.take_writes();
        let memory_limit = self.limits.memory_bytes;
        match error.downcast_ref::<Trap>() {
            Some(Trap::OutOfFuel) => CallError::OutOfFuel { limit: fuel },
            // The bound's own trap leaves `EXHAUSTED` behind. wasmtime's native guard trips
            // only on entry to a function costing more units than remain (see `engine.rs`):
            // where the bound trips on every machine, so it is the same error.
            Some(Trap::StackOverflow) => CallError::StackLimit {
                limit: self.limits.stack_units,
            },
            Some(_) if exhausted(&mut self.store, self.stack_units) => CallError::StackLimit {
                limit: self.limits.stack_units,
            },
            // The guest's allocator aborts when growth is refused; whatever trap follows a
            // refusal in the same call is that abort.
            Some(_) if self.store.data().denied_growth => CallError::MemoryLimit {
                limit: memory_limit,
            },
            Some(trap) => {
                let message = trap.to_string();
                match self.guest_panic_message() {
                    Some(panic) => CallError::Trap(format!("{message}; guest panicked: {panic}")),
                    None => CallError::Trap(message),
                }
            }
            None if self.store.data().denied_growth => CallError::MemoryLimit {
                limit: memory_limit,
            },
            None => CallError::Trap(format!("{error:#}")),
        }
    }

    /// The counter as the last call left it: [`stack::EXHAUSTED`] after the bound tripped.
    #[cfg(test)]
    pub(super) fn stack_units_left(&mut self) -> i32 {
        match self.stack_units.get(&mut self.store) {
            Val::I32(units) => units,
            _ => i32::MIN,
        }
    }

    /// Gives the next call the full stack limit; after a normal return the counter is back
    /// there anyway, after a trap it is not.
    fn reset_stack_units(&mut self) -> Result<(), CallError> {
        let units = stack_units(&self.limits);
        self.stack_units
            .set(&mut self.store, Val::I32(units))
            .map_err(|e| CallError::Trap(format!("cannot reset the stack counter: {e:#}")))
    }

    /// Asks the guest for its last panic message, on a small separate fuel budget. Any failure
    /// (no export, another trap, a bad result) just means "no message".
    fn guest_panic_message(&mut self) -> Option<String> {
        let func = self.panic_message.clone()?;
        self.store.set_fuel(PANIC_MESSAGE_FUEL).ok()?;
        self.reset_stack_units().ok()?;
        let packed = func.call(&mut self.store, ()).ok()?;
        let bytes = self.read_result(packed, PANIC_MESSAGE_MAX_READ).ok()?;
        if bytes.is_empty() {
            return None;
        }
        let mut message = String::from_utf8_lossy(&bytes).into_owned();
        if message.len() > PANIC_MESSAGE_KEEP {
            let mut cut = PANIC_MESSAGE_KEEP;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
            message.push('…');
        }
        Some(message)
    }
}

/// The counter's starting value. `Runtime::instantiate` refuses limits above
/// `MAX_STACK_UNITS`, far below `i32::MAX`; the clamp only keeps the conversion total.
fn stack_units(limits: &Limits) -> i32 {
    i32::try_from(limits.stack_units).unwrap_or(i32::MAX)
}

/// Whether the last trap was the stack bound's (see `stack::EXHAUSTED`).
fn exhausted(store: &mut Store<HostState>, counter: Global) -> bool {
    matches!(counter.get(store), Val::I32(stack::EXHAUSTED))
}
