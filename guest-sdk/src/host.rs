//! The host functions behind [`crate::context()`] and [`crate::storage`]: the `wraft` imports on
//! wasm32, a thread-local fake host natively (driven by [`crate::testing`]).
//!
//! Owns the call mode (which kind of call is in progress, set by the generated exports and by
//! the harnesses) and, natively, the fake host's state. Keeps true: nothing here panics on what
//! the host returns; the checks that would make the real host trap (sizes, read-only calls)
//! are made by [`crate::storage`] before a host function is called, so they become errors.

use std::cell::Cell;

use crate::context::CONTEXT_BYTES;

/// Which kind of call is in progress on this thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    /// No call: natively, a test that calls the SDK directly.
    Idle,
    /// A call into a memory-model module: no storage.
    Memory,
    /// A store-model `query` or `snapshot`: storage is read-only.
    Read,
    /// A store-model `apply`, `restore` or `migrate`.
    Write,
}

thread_local! {
    static MODE: Cell<Mode> = const { Cell::new(Mode::Idle) };
}

/// The mode of the call in progress.
pub(crate) fn mode() -> Mode {
    MODE.try_with(Cell::get).unwrap_or(Mode::Idle)
}

/// Sets the mode until dropped, then restores the previous one (also when unwinding).
pub(crate) struct ModeGuard {
    previous: Mode,
}

/// Enters a call of the given mode.
pub(crate) fn enter(mode: Mode) -> ModeGuard {
    let previous = MODE.try_with(|m| m.replace(mode)).unwrap_or(Mode::Idle);
    ModeGuard { previous }
}

impl Drop for ModeGuard {
    fn drop(&mut self) {
        let _ = MODE.try_with(|m| m.set(self.previous));
    }
}

/// What `storage_get` and `storage_scan` return: -1 (only `get`: absent) or a length.
fn output_len(raw: i64, max: usize, function: &str) -> Result<Option<usize>, String> {
    match raw {
        -1 => Ok(None),
        n if n >= 0 && (n as u64) <= max as u64 => Ok(Some(n as usize)),
        n => Err(format!(
            "wraft SDK: the host's {function} returned {n}, not -1 or a length up to {max}"
        )),
    }
}

#[cfg(target_arch = "wasm32")]
mod imports {
    #[link(wasm_import_module = "wraft")]
    unsafe extern "C" {
        pub fn context(out: i32);
        pub fn storage_get(key_ptr: i32, key_len: i32) -> i64;
        pub fn storage_put(key_ptr: i32, key_len: i32, val_ptr: i32, val_len: i32);
        pub fn storage_delete(key_ptr: i32, key_len: i32);
        pub fn storage_scan(
            start_ptr: i32,
            start_len: i32,
            end_ptr: i32,
            end_len: i32,
            limit: i32,
        ) -> i64;
        pub fn take_output(dst: i32);
    }
}

#[cfg(target_arch = "wasm32")]
fn ptr(bytes: &[u8]) -> i32 {
    bytes.as_ptr() as usize as i32
}

#[cfg(target_arch = "wasm32")]
fn len(bytes: &[u8]) -> i32 {
    // Callers checked the length against the caps (4 KiB keys, 1 MiB values).
    bytes.len() as i32
}

/// Copies the host's pending output of `len` bytes into a fresh buffer.
#[cfg(target_arch = "wasm32")]
fn take_output(len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    if len > 0 {
        // SAFETY: `out` is `len` writable bytes of our memory; the host writes exactly the
        // pending output's length, which it reported as `len`.
        unsafe { imports::take_output(out.as_mut_ptr() as usize as i32) };
    }
    out
}

/// The 64-byte context record.
#[cfg(target_arch = "wasm32")]
pub(crate) fn raw_context() -> [u8; CONTEXT_BYTES] {
    let mut out = [0u8; CONTEXT_BYTES];
    // SAFETY: the host writes exactly 64 bytes at `out`, which has 64.
    unsafe { imports::context(out.as_mut_ptr() as usize as i32) };
    out
}

/// `storage_get`.
#[cfg(target_arch = "wasm32")]
pub(crate) fn get(key: &[u8]) -> Result<Option<Vec<u8>>, String> {
    // SAFETY: the host only reads `key`.
    let raw = unsafe { imports::storage_get(ptr(key), len(key)) };
    Ok(output_len(raw, crate::storage::MAX_VALUE_BYTES, "storage_get")?.map(take_output))
}

/// `storage_put`.
#[cfg(target_arch = "wasm32")]
pub(crate) fn put(key: &[u8], value: &[u8]) -> Result<(), String> {
    // SAFETY: the host only reads `key` and `value`.
    unsafe { imports::storage_put(ptr(key), len(key), ptr(value), len(value)) };
    Ok(())
}

/// `storage_delete`.
#[cfg(target_arch = "wasm32")]
pub(crate) fn delete(key: &[u8]) -> Result<(), String> {
    // SAFETY: the host only reads `key`.
    unsafe { imports::storage_delete(ptr(key), len(key)) };
    Ok(())
}

/// `storage_scan`: the encoded page. `end`: `None` is unbounded (never `Some(empty)`);
/// `limit` is at least 1 and at most `i32::MAX`.
#[cfg(target_arch = "wasm32")]
pub(crate) fn scan(start: &[u8], end: Option<&[u8]>, limit: u32) -> Result<Vec<u8>, String> {
    let end = end.unwrap_or(&[]);
    // SAFETY: the host only reads `start` and `end`.
    let raw =
        unsafe { imports::storage_scan(ptr(start), len(start), ptr(end), len(end), limit as i32) };
    match output_len(raw, crate::storage::MAX_SCAN_BYTES, "storage_scan")? {
        Some(n) => Ok(take_output(n)),
        None => Err("wraft SDK: the host's storage_scan returned -1".to_string()),
    }
}

#[cfg(not(target_arch = "wasm32"))]
pub(crate) use fake::{delete, get, put, raw_context, scan};

/// The native stand-in for the host: a committed store shared with the harness that owns it,
/// this call's buffered writes (read back by this call, committed by the harness when the
/// call returns, dropped if it panics), and the context.
#[cfg(not(target_arch = "wasm32"))]
pub(crate) mod fake {
    use std::cell::{Cell, RefCell};
    use std::collections::BTreeMap;
    use std::ops::Bound;
    use std::rc::Rc;

    use super::{output_len, Mode, CONTEXT_BYTES};
    use crate::context::Context;
    use crate::storage::{MAX_SCAN_BYTES, MAX_VALUE_BYTES};

    /// A tenant's committed storage.
    pub(crate) type Store = Rc<RefCell<BTreeMap<Vec<u8>, Vec<u8>>>>;

    /// One call's view: the committed store and this call's writes (`None`: a delete).
    #[derive(Default)]
    pub(crate) struct Call {
        pub(crate) store: Store,
        pub(crate) writes: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
        pending: Option<Vec<u8>>,
    }

    impl Call {
        pub(crate) fn new(store: Store) -> Call {
            Call {
                store,
                writes: BTreeMap::new(),
                pending: None,
            }
        }

        /// Applies the buffered writes to the committed store.
        pub(crate) fn commit(self) {
            let mut store = self.store.borrow_mut();
            for (key, value) in self.writes {
                match value {
                    Some(value) => store.insert(key, value),
                    None => store.remove(&key),
                };
            }
        }
    }

    thread_local! {
        static CONTEXT: Cell<Context> = Cell::new(Context::default());
        static CALL: RefCell<Option<Call>> = const { RefCell::new(None) };
    }

    /// Runs `f` as one call of `mode` with `context` and (store model) `call`, restoring what
    /// was installed before afterwards. Returns `f`'s result or its panic, and the call's state.
    pub(crate) fn run<R>(
        mode: Mode,
        context: Context,
        call: Option<Call>,
        f: impl FnOnce() -> R,
    ) -> (std::thread::Result<R>, Option<Call>) {
        let _mode = super::enter(mode);
        let previous_context = CONTEXT.with(|c| c.replace(context));
        let previous_call = CALL.with(|c| c.replace(call));
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
        let call = CALL.with(|c| c.replace(previous_call));
        CONTEXT.with(|c| c.set(previous_context));
        (result, call)
    }

    pub(crate) fn raw_context() -> [u8; CONTEXT_BYTES] {
        CONTEXT.try_with(Cell::get).unwrap_or_default().to_bytes()
    }

    fn with_call<R>(f: impl FnOnce(&mut Call) -> Result<R, String>) -> Result<R, String> {
        CALL.try_with(|cell| match cell.try_borrow_mut() {
            Ok(mut call) => match call.as_mut() {
                Some(call) => f(call),
                None => Err(
                    "wraft SDK: storage used outside a call: drive a store-model \
                             state machine with testing::StoreHarness"
                        .to_string(),
                ),
            },
            Err(_) => Err("wraft SDK: storage is in use".to_string()),
        })
        .unwrap_or_else(|_| Err("wraft SDK: storage used during thread teardown".to_string()))
    }

    /// Takes the pending output, as the host's `take_output` does after a length was returned.
    fn take_output(
        call: &mut Call,
        raw: i64,
        max: usize,
        function: &str,
    ) -> Result<Option<Vec<u8>>, String> {
        match output_len(raw, max, function)? {
            None => Ok(None),
            Some(n) => match call.pending.take() {
                Some(out) if out.len() == n => Ok(Some(out)),
                _ => Err(format!(
                    "wraft SDK: {function}: no pending output of {n} bytes"
                )),
            },
        }
    }

    pub(crate) fn get(key: &[u8]) -> Result<Option<Vec<u8>>, String> {
        with_call(|call| {
            let value = match call.writes.get(key) {
                Some(buffered) => buffered.clone(),
                None => call.store.borrow().get(key).cloned(),
            };
            let raw = match value {
                None => {
                    call.pending = None;
                    -1
                }
                Some(value) => {
                    let n = value.len() as i64;
                    call.pending = Some(value);
                    n
                }
            };
            take_output(call, raw, MAX_VALUE_BYTES, "storage_get")
        })
    }

    pub(crate) fn put(key: &[u8], value: &[u8]) -> Result<(), String> {
        with_call(|call| {
            call.writes.insert(key.to_vec(), Some(value.to_vec()));
            Ok(())
        })
    }

    pub(crate) fn delete(key: &[u8]) -> Result<(), String> {
        with_call(|call| {
            call.writes.insert(key.to_vec(), None);
            Ok(())
        })
    }

    /// The host's algorithm, on purpose including its short pages: committed pairs merged with
    /// this call's writes, at most `limit` pairs and `MAX_SCAN_BYTES` (at least one pair).
    pub(crate) fn scan(start: &[u8], end: Option<&[u8]>, limit: u32) -> Result<Vec<u8>, String> {
        with_call(|call| {
            // `BTreeMap::range` panics on an inverted range; the SDK never asks for one.
            if end.is_some_and(|end| end <= start) {
                call.pending = Some(Vec::new());
                return Ok(
                    take_output(call, 0, MAX_SCAN_BYTES, "storage_scan")?.unwrap_or_default()
                );
            }
            let limit = limit as usize;
            let upper = match end {
                Some(end) => Bound::Excluded(end),
                None => Bound::Unbounded,
            };
            let range = (Bound::Included(start), upper);
            let buffered: Vec<(Vec<u8>, Option<Vec<u8>>)> = call
                .writes
                .range::<[u8], _>(range)
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            let deletes = buffered.iter().filter(|(_, v)| v.is_none()).count();
            let want = limit.saturating_add(deletes);
            let committed: Vec<(Vec<u8>, Vec<u8>)> = call
                .store
                .borrow()
                .range::<[u8], _>(range)
                .take(want)
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
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
            let raw = out.len() as i64;
            call.pending = Some(out);
            Ok(take_output(call, raw, MAX_SCAN_BYTES, "storage_scan")?.unwrap_or_default())
        })
    }
}
