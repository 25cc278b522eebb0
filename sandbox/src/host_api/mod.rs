//! The host functions a module may import from `wraft`: the deterministic call context and the
//! tenant's own storage.
//!
//! Owns the allow-list (names and exact signatures, checked at deploy by
//! [`check_imports`]), the per-call state those functions use ([`CallState`]) and their
//! implementations. Keeps true: every value a host function hands a module comes from the log
//! (the context) or from storage that every replica holds identically (committed writes plus
//! this call's own), each call charges fuel by a fixed formula, and every pointer and length a
//! module passes is bounds-checked before a byte is read or written. Nothing here panics on
//! what a module passes: a bad argument is a trap with a message naming it.
//!
//! Writes are buffered in a [`WriteSet`] until the host takes them; it commits them after the
//! call returns (its output or its own error), and a trap drops them, so a trap leaves storage
//! exactly as before.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::Arc;

use wasmtime::{Caller, Extern, FuncType, Store, Trap, ValType};

use crate::WasmError;

/// The Wasm module name of every host import.
pub const HOST_MODULE: &str = "wraft";

/// Longest storage key, in bytes.
pub const MAX_KEY_BYTES: usize = 4096;
/// Longest storage value, in bytes.
pub const MAX_VALUE_BYTES: usize = 1 << 20;
/// Most bytes (keys plus values) one call may write.
pub const MAX_WRITE_BYTES: u64 = 64 << 20;
/// Most bytes of encoded pairs one `storage_scan` returns.
pub const MAX_SCAN_BYTES: usize = 4 << 20;
/// Size of the record `context` writes.
pub const CONTEXT_BYTES: usize = 64;

/// Fuel every host call costs, plus one unit per byte it moves.
pub const HOST_CALL_FUEL: u64 = 1_000;

/// What a call may know about where it runs: all of it from the log, so the same on every
/// replica.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CallContext {
    /// The log index of the entry being applied (in a query: the replica's applied index).
    pub index: u64,
    /// The entry's term (0 in a query).
    pub term: u64,
    /// The leader's timestamp for the entry, never below the tenant's previous one.
    pub timestamp_ms: u64,
    /// The command's position within the entry.
    pub position: u32,
    /// True inside `apply`, `restore` and `migrate`; false in `query` and `snapshot`.
    pub in_apply: bool,
    /// Derived from (index, position); all zero outside `apply`.
    pub seed: [u8; 32],
}

impl CallContext {
    /// The 64-byte record `context` writes (layout in the crate docs).
    pub fn encode(&self) -> [u8; CONTEXT_BYTES] {
        let mut out = [0u8; CONTEXT_BYTES];
        out[0..8].copy_from_slice(&self.index.to_le_bytes());
        out[8..16].copy_from_slice(&self.term.to_le_bytes());
        out[16..24].copy_from_slice(&self.timestamp_ms.to_le_bytes());
        out[24..28].copy_from_slice(&self.position.to_le_bytes());
        out[28..32].copy_from_slice(&u32::from(self.in_apply).to_le_bytes());
        out[32..64].copy_from_slice(&self.seed);
        out
    }
}

/// Key-value pairs in key order, as a scan returns them.
pub type Pairs = Vec<(Vec<u8>, Vec<u8>)>;

/// Committed storage of one tenant, as the host provides it to a call. Implementations read a
/// consistent state: nothing another call writes may appear half-way through this one.
pub trait StorageView: Send + Sync {
    /// The value stored under `key`.
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, String>;
    /// Up to `limit` pairs with `start <= key` (and `key < end` when given), ascending.
    fn scan(&self, start: &[u8], end: Option<&[u8]>, limit: usize) -> Result<Pairs, String>;
}

/// The writes of one call: `Some(value)` puts, `None` deletes. Sorted, so applying it is
/// deterministic.
pub type WriteSet = BTreeMap<Vec<u8>, Option<Vec<u8>>>;

/// The host functions' state during one call.
#[derive(Default)]
pub(crate) struct CallState {
    pub(crate) context: CallContext,
    pub(crate) storage: Option<Arc<dyn StorageView>>,
    pub(crate) writable: bool,
    pub(crate) writes: WriteSet,
    pub(crate) write_bytes: u64,
    /// The result of the last `storage_get`/`storage_scan`, until `take_output` copies it.
    pub(crate) pending: Option<Vec<u8>>,
}

impl CallState {
    /// Starts a call. Buffered writes stay until the host takes them (so an upgrade's
    /// `restore` and `migrate` build one write set); a trap drops them all.
    pub(crate) fn begin(&mut self, writable: bool) {
        self.writable = writable;
        self.pending = None;
    }

    /// Takes the buffered writes.
    pub(crate) fn take_writes(&mut self) -> WriteSet {
        self.write_bytes = 0;
        std::mem::take(&mut self.writes)
    }
}

/// Implemented by the store's data so the host functions can reach their state.
pub(crate) trait HasCallState {
    fn call_state(&mut self) -> &mut CallState;
}

/// One allowed import.
struct HostFunc {
    name: &'static str,
    params: &'static [ValType],
    results: &'static [ValType],
    text: &'static str,
    /// Only store-model modules may import it.
    storage: bool,
}

const I32: ValType = ValType::I32;
const I64: ValType = ValType::I64;

const HOST_FUNCS: &[HostFunc] = &[
    HostFunc {
        name: "context",
        params: &[I32],
        results: &[],
        text: "(i32) -> ()",
        storage: false,
    },
    HostFunc {
        name: "take_output",
        params: &[I32],
        results: &[],
        text: "(i32) -> ()",
        storage: true,
    },
    HostFunc {
        name: "storage_get",
        params: &[I32, I32],
        results: &[I64],
        text: "(i32, i32) -> i64",
        storage: true,
    },
    HostFunc {
        name: "storage_put",
        params: &[I32, I32, I32, I32],
        results: &[],
        text: "(i32, i32, i32, i32) -> ()",
        storage: true,
    },
    HostFunc {
        name: "storage_delete",
        params: &[I32, I32],
        results: &[],
        text: "(i32, i32) -> ()",
        storage: true,
    },
    HostFunc {
        name: "storage_scan",
        params: &[I32, I32, I32, I32, I32],
        results: &[I64],
        text: "(i32, i32, i32, i32, i32) -> i64",
        storage: true,
    },
];

/// Checks a function import against the allow-list. `store_model`: whether the module declared
/// the store model (storage functions are refused otherwise).
pub(crate) fn check_import(
    module: &str,
    name: &str,
    ty: &FuncType,
    store_model: bool,
) -> Result<(), WasmError> {
    let not_allowed = || WasmError::ImportNotAllowed {
        module: module.to_string(),
        name: name.to_string(),
    };
    if module != HOST_MODULE {
        return Err(not_allowed());
    }
    let func = HOST_FUNCS
        .iter()
        .find(|f| f.name == name)
        .ok_or_else(not_allowed)?;
    let same = |want: &[ValType], got: &mut dyn ExactSizeIterator<Item = ValType>| {
        want.len() == got.len() && want.iter().zip(got).all(|(w, g)| ValType::eq(w, &g))
    };
    if !same(func.params, &mut ty.params()) || !same(func.results, &mut ty.results()) {
        return Err(WasmError::WrongImport {
            name: func.name,
            expected: func.text,
            found: crate::engine::signature(ty),
        });
    }
    if func.storage && !store_model {
        return Err(WasmError::StorageNeedsStoreModel {
            name: func.name.to_string(),
        });
    }
    Ok(())
}

/// The host functions for a module's imports, in import order. Every import was checked by
/// [`check_import`] at compile time; `counter` is the stack counter (see `stack.rs`).
pub(crate) fn resolve<T: HasCallState + Send + 'static>(
    store: &mut Store<T>,
    module: &wasmtime::Module,
    counter: Extern,
) -> Result<Vec<Extern>, WasmError> {
    let mut externs = Vec::new();
    for import in module.imports() {
        if import.module() == crate::stack::IMPORT_MODULE
            && import.name() == crate::stack::IMPORT_NAME
        {
            externs.push(counter.clone());
            continue;
        }
        let func = match import.name() {
            "context" => wasmtime::Func::wrap(&mut *store, context::<T>),
            "take_output" => wasmtime::Func::wrap(&mut *store, take_output::<T>),
            "storage_get" => wasmtime::Func::wrap(&mut *store, storage_get::<T>),
            "storage_put" => wasmtime::Func::wrap(&mut *store, storage_put::<T>),
            "storage_delete" => wasmtime::Func::wrap(&mut *store, storage_delete::<T>),
            "storage_scan" => wasmtime::Func::wrap(&mut *store, storage_scan::<T>),
            other => {
                return Err(WasmError::ImportNotAllowed {
                    module: import.module().to_string(),
                    name: other.to_string(),
                })
            }
        };
        externs.push(func.into());
    }
    Ok(externs)
}

fn trap(message: String) -> wasmtime::Error {
    wasmtime::Error::msg(message)
}

/// Takes `HOST_CALL_FUEL + bytes` from the call's fuel, or traps out of fuel.
fn charge<T>(caller: &mut Caller<'_, T>, bytes: usize) -> wasmtime::Result<()> {
    let cost = HOST_CALL_FUEL.saturating_add(bytes as u64);
    let fuel = caller.get_fuel()?;
    if fuel < cost {
        caller.set_fuel(0)?;
        return Err(Trap::OutOfFuel.into());
    }
    caller.set_fuel(fuel - cost)
}

fn memory<T>(caller: &mut Caller<'_, T>) -> wasmtime::Result<wasmtime::Memory> {
    match caller.get_export("memory") {
        Some(Extern::Memory(memory)) => Ok(memory),
        _ => Err(trap("the module exports no memory".to_string())),
    }
}

/// Copies `[ptr, ptr + len)` out of the module's memory.
fn read<T>(
    caller: &mut Caller<'_, T>,
    ptr: i32,
    len: i32,
    what: &str,
    max: usize,
) -> wasmtime::Result<Vec<u8>> {
    let (start, len) = (ptr as u32 as usize, len as u32 as usize);
    if len > max {
        return Err(trap(format!(
            "{what} is {len} bytes; the limit is {max} bytes"
        )));
    }
    let memory = memory(caller)?;
    let data = memory.data(&*caller);
    start
        .checked_add(len)
        .and_then(|end| data.get(start..end))
        .map(<[u8]>::to_vec)
        .ok_or_else(|| {
            trap(format!(
                "{what} [{start:#x}, +{len}) is outside the module's {} bytes of memory",
                data.len()
            ))
        })
}

/// Copies `bytes` into the module's memory at `ptr`.
fn write<T>(
    caller: &mut Caller<'_, T>,
    ptr: i32,
    bytes: &[u8],
    what: &str,
) -> wasmtime::Result<()> {
    let start = ptr as u32 as usize;
    let memory = memory(caller)?;
    let data = memory.data_mut(&mut *caller);
    let size = data.len();
    let target = start
        .checked_add(bytes.len())
        .and_then(|end| data.get_mut(start..end))
        .ok_or_else(|| {
            trap(format!(
                "{what} [{start:#x}, +{}) is outside the module's {size} bytes of memory",
                bytes.len()
            ))
        })?;
    target.copy_from_slice(bytes);
    Ok(())
}

fn storage_of<T: HasCallState>(
    caller: &mut Caller<'_, T>,
    function: &str,
) -> wasmtime::Result<Arc<dyn StorageView>> {
    caller
        .data_mut()
        .call_state()
        .storage
        .clone()
        .ok_or_else(|| trap(format!("{function}: this call has no storage")))
}

fn writable<T: HasCallState>(caller: &mut Caller<'_, T>, function: &str) -> wasmtime::Result<()> {
    if caller.data_mut().call_state().writable {
        Ok(())
    } else {
        Err(trap(format!(
            "{function}: storage is read-only in a query or snapshot"
        )))
    }
}

fn context<T: HasCallState>(mut caller: Caller<'_, T>, out: i32) -> wasmtime::Result<()> {
    charge(&mut caller, CONTEXT_BYTES)?;
    let record = caller.data_mut().call_state().context.encode();
    write(&mut caller, out, &record, "context: the output buffer")
}

fn take_output<T: HasCallState>(mut caller: Caller<'_, T>, dst: i32) -> wasmtime::Result<()> {
    let pending = caller
        .data_mut()
        .call_state()
        .pending
        .take()
        .ok_or_else(|| trap("take_output: no output is pending".to_string()))?;
    charge(&mut caller, pending.len())?;
    write(&mut caller, dst, &pending, "take_output: the destination")
}

fn storage_get<T: HasCallState>(
    mut caller: Caller<'_, T>,
    key_ptr: i32,
    key_len: i32,
) -> wasmtime::Result<i64> {
    let key = read(
        &mut caller,
        key_ptr,
        key_len,
        "storage_get: the key",
        MAX_KEY_BYTES,
    )?;
    let state = caller.data_mut().call_state();
    let value = match state.writes.get(&key) {
        Some(buffered) => buffered.clone(),
        None => {
            let storage = state
                .storage
                .clone()
                .ok_or_else(|| trap("storage_get: this call has no storage".to_string()))?;
            storage
                .get(&key)
                .map_err(|e| trap(format!("storage_get: host storage failed: {e}")))?
        }
    };
    charge(&mut caller, key.len() + value.as_ref().map_or(0, Vec::len))?;
    let state = caller.data_mut().call_state();
    match value {
        None => {
            state.pending = None;
            Ok(-1)
        }
        Some(value) => {
            let len = value.len() as i64;
            state.pending = Some(value);
            Ok(len)
        }
    }
}

fn buffer<T: HasCallState>(
    caller: &mut Caller<'_, T>,
    function: &str,
    key: Vec<u8>,
    value: Option<Vec<u8>>,
) -> wasmtime::Result<()> {
    let state = caller.data_mut().call_state();
    let bytes = (key.len() + value.as_ref().map_or(0, Vec::len)) as u64;
    state.write_bytes = state.write_bytes.saturating_add(bytes);
    if state.write_bytes > MAX_WRITE_BYTES {
        return Err(trap(format!(
            "{function}: one call may write at most {MAX_WRITE_BYTES} bytes"
        )));
    }
    state.writes.insert(key, value);
    Ok(())
}

fn storage_put<T: HasCallState>(
    mut caller: Caller<'_, T>,
    key_ptr: i32,
    key_len: i32,
    value_ptr: i32,
    value_len: i32,
) -> wasmtime::Result<()> {
    writable(&mut caller, "storage_put")?;
    storage_of(&mut caller, "storage_put")?;
    let key = read(
        &mut caller,
        key_ptr,
        key_len,
        "storage_put: the key",
        MAX_KEY_BYTES,
    )?;
    let value = read(
        &mut caller,
        value_ptr,
        value_len,
        "storage_put: the value",
        MAX_VALUE_BYTES,
    )?;
    charge(&mut caller, key.len() + value.len())?;
    buffer(&mut caller, "storage_put", key, Some(value))
}

fn storage_delete<T: HasCallState>(
    mut caller: Caller<'_, T>,
    key_ptr: i32,
    key_len: i32,
) -> wasmtime::Result<()> {
    writable(&mut caller, "storage_delete")?;
    storage_of(&mut caller, "storage_delete")?;
    let key = read(
        &mut caller,
        key_ptr,
        key_len,
        "storage_delete: the key",
        MAX_KEY_BYTES,
    )?;
    charge(&mut caller, key.len())?;
    buffer(&mut caller, "storage_delete", key, None)
}

fn storage_scan<T: HasCallState>(
    mut caller: Caller<'_, T>,
    start_ptr: i32,
    start_len: i32,
    end_ptr: i32,
    end_len: i32,
    limit: i32,
) -> wasmtime::Result<i64> {
    if limit < 1 {
        return Err(trap(format!(
            "storage_scan: limit is {limit}; it must be at least 1"
        )));
    }
    let limit = limit as usize;
    let start = read(
        &mut caller,
        start_ptr,
        start_len,
        "storage_scan: the start key",
        MAX_KEY_BYTES,
    )?;
    let end = if end_len == 0 {
        None
    } else {
        Some(read(
            &mut caller,
            end_ptr,
            end_len,
            "storage_scan: the end key",
            MAX_KEY_BYTES,
        )?)
    };
    let storage = storage_of(&mut caller, "storage_scan")?;
    if end.as_ref().is_some_and(|end| *end <= start) {
        // An empty range (BTreeMap::range would panic on a reversed one).
        charge(&mut caller, 0)?;
        caller.data_mut().call_state().pending = Some(Vec::new());
        return Ok(0);
    }
    let state = caller.data_mut().call_state();
    let upper = match &end {
        Some(end) => Bound::Excluded(end.clone()),
        None => Bound::Unbounded,
    };
    let buffered: Vec<(Vec<u8>, Option<Vec<u8>>)> = state
        .writes
        .range((Bound::Included(start.clone()), upper))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    // Each buffered delete may hide one committed pair: ask for that many more, so that the
    // first `limit` pairs of the merge are exact.
    let deletes = buffered.iter().filter(|(_, v)| v.is_none()).count();
    let want = limit.saturating_add(deletes);
    let committed = storage
        .scan(&start, end.as_deref(), want)
        .map_err(|e| trap(format!("storage_scan: host storage failed: {e}")))?;
    // When the committed scan was cut short, buffered keys past its last key may not be
    // interleaved correctly with committed ones the scan did not return: leave them out.
    let cut = (committed.len() >= want)
        .then(|| committed.last().map(|(k, _)| k.clone()))
        .flatten();
    let mut merged: BTreeMap<Vec<u8>, Vec<u8>> = committed.into_iter().collect();
    for (key, value) in buffered {
        if cut.as_ref().is_some_and(|cut| &key > cut) {
            continue;
        }
        match value {
            Some(value) => merged.insert(key, value),
            None => merged.remove(&key),
        };
    }
    let mut out = Vec::new();
    for (key, value) in merged.into_iter().take(limit) {
        let size = 8 + key.len() + value.len();
        if !out.is_empty() && out.len() + size > MAX_SCAN_BYTES {
            break;
        }
        out.extend_from_slice(&(key.len() as u32).to_le_bytes());
        out.extend_from_slice(&key);
        out.extend_from_slice(&(value.len() as u32).to_le_bytes());
        out.extend_from_slice(&value);
    }
    charge(&mut caller, out.len())?;
    let len = out.len() as i64;
    caller.data_mut().call_state().pending = Some(out);
    Ok(len)
}

#[cfg(test)]
mod tests;
