//! The ABI v1 machinery behind [`crate::export_state_machine!`] and
//! [`crate::export_store_state_machine!`]; not a public API.
//!
//! Owns the three guest-side buffers of the ABI: the pending input (handed out by
//! `wraft_alloc`, taken back and freed by the following call), the result (valid until the next
//! call) and the last panic message. Sets the call mode for [`crate::storage`] around every
//! call. Keeps true: nothing here panics on anything the host passes, so a hostile or buggy
//! host gets an error status, never a trap from the SDK.

use std::cell::RefCell;
use std::sync::Once;
use std::thread::LocalKey;

use crate::host::{self, Mode};
use crate::{StateMachine, StoreStateMachine};

/// The status byte that opens every result buffer.
const STATUS_OK: u8 = 0;
const STATUS_ERR: u8 = 1;

/// The global that holds a plugin's state; declared by the macro, since statics cannot be
/// generic.
pub type StateCell<T> = LocalKey<RefCell<Option<T>>>;

thread_local! {
    static INPUT: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    static RESULT: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    static PANIC_MESSAGE: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

static HOOK: Once = Once::new();

/// Installs (once) the hook that records panic messages for `wraft_panic_message`.
fn install_panic_hook() {
    HOOK.call_once(|| {
        // Natively the previous hook still prints, so failing tests stay readable; on wasm32
        // there is nowhere to print to.
        #[cfg(not(target_arch = "wasm32"))]
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let message = info.to_string();
            // `try_with`/`try_borrow_mut`: a panic while the message is being written (or during
            // thread teardown natively) must not turn into a double panic.
            let _ = PANIC_MESSAGE.try_with(|cell| {
                if let Ok(mut buf) = cell.try_borrow_mut() {
                    buf.clear();
                    buf.extend_from_slice(message.as_bytes());
                }
            });
            #[cfg(not(target_arch = "wasm32"))]
            previous(info);
        }));
    });
}

/// Packs a guest buffer as `(ptr << 32) | len`, the ABI's return value.
fn pack(ptr: *const u8, len: usize) -> i64 {
    // Wasm32 addresses and lengths fit in u32; natively the truncation only affects tests that
    // never dereference the pointer.
    (((ptr as usize as u64 & 0xffff_ffff) << 32) | (len as u64 & 0xffff_ffff)) as i64
}

/// Stores `status` + `payload` in the result buffer and returns it packed.
fn respond(status: u8, payload: &[u8]) -> i64 {
    RESULT.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buf) => {
            buf.clear();
            buf.push(status);
            buf.extend_from_slice(payload);
            pack(buf.as_ptr(), buf.len())
        }
        // Only reachable if an earlier call trapped half-way; the host discards the instance
        // after a trap, so a null result (which it rejects as a bad ABI) is enough.
        Err(_) => 0,
    })
}

fn reply(result: Result<Vec<u8>, String>) -> i64 {
    match result {
        Ok(payload) => respond(STATUS_OK, &payload),
        Err(message) => respond(STATUS_ERR, message.as_bytes()),
    }
}

/// `wraft_alloc`: hands out a fresh zeroed input buffer of `len` bytes.
pub fn alloc(len: i32) -> i32 {
    install_panic_hook();
    let len = len as u32 as usize;
    INPUT.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buf) => {
            // A fresh Vec (not a resize) so that a large earlier input is freed now.
            *buf = vec![0; len];
            buf.as_mut_ptr() as usize as i32
        }
        Err(_) => 0,
    })
}

/// Takes back the input buffer the host filled, checking it is the one `alloc` handed out.
fn take_input(ptr: i32, len: i32) -> Result<Vec<u8>, String> {
    let buf = INPUT
        .with(|cell| cell.try_borrow_mut().map(|mut b| std::mem::take(&mut *b)))
        .map_err(|_| "wraft SDK: input buffer is in use (an earlier call trapped)".to_string())?;
    let expected_ptr = buf.as_ptr() as usize as i32;
    let expected_len = buf.len() as u32 as i32;
    if ptr != expected_ptr || len != expected_len {
        return Err(format!(
            "wraft SDK: input ({ptr:#x}, {len}) is not the buffer `wraft_alloc` returned \
             ({expected_ptr:#x}, {expected_len})"
        ));
    }
    Ok(buf)
}

/// Runs `f` on the state, creating it with `T::default()` on first use.
fn with_state<T: StateMachine, R>(
    state: &'static StateCell<T>,
    f: impl FnOnce(&mut T) -> Result<R, String>,
) -> Result<R, String> {
    state.with(|cell| {
        let mut guard = cell
            .try_borrow_mut()
            .map_err(|_| "wraft SDK: state is in use (an earlier call trapped)".to_string())?;
        f(guard.get_or_insert_with(T::default))
    })
}

/// `wraft_apply`.
pub fn apply<T: StateMachine>(state: &'static StateCell<T>, ptr: i32, len: i32) -> i64 {
    install_panic_hook();
    let _call = host::enter(Mode::Memory);
    reply(take_input(ptr, len).and_then(|input| with_state(state, |sm| sm.apply(&input))))
}

/// `wraft_query`.
pub fn query<T: StateMachine>(state: &'static StateCell<T>, ptr: i32, len: i32) -> i64 {
    install_panic_hook();
    let _call = host::enter(Mode::Memory);
    reply(take_input(ptr, len).and_then(|input| with_state(state, |sm| sm.query(&input))))
}

/// `wraft_snapshot`.
pub fn snapshot<T: StateMachine>(state: &'static StateCell<T>) -> i64 {
    install_panic_hook();
    let _call = host::enter(Mode::Memory);
    reply(with_state(state, |sm| Ok(sm.snapshot())))
}

/// `wraft_restore`: restores into a fresh `T::default()`, so nothing of the old state survives
/// even if the implementation only fills in what the snapshot mentions.
pub fn restore<T: StateMachine>(state: &'static StateCell<T>, ptr: i32, len: i32) -> i64 {
    install_panic_hook();
    let _call = host::enter(Mode::Memory);
    reply(take_input(ptr, len).and_then(|input| {
        with_state(state, |sm| {
            let mut fresh = T::default();
            fresh.restore(&input)?;
            *sm = fresh;
            Ok(Vec::new())
        })
    }))
}

/// The version number `wraft_migrate` receives, which the host counts from 1.
fn from_version(raw: i64) -> Result<u64, String> {
    u64::try_from(raw).map_err(|_| format!("wraft SDK: wraft_migrate got version {raw}"))
}

/// `wraft_migrate` of a memory-model module: called on the new version after `restore`.
pub fn migrate<T: StateMachine>(state: &'static StateCell<T>, version: i64) -> i64 {
    install_panic_hook();
    let _call = host::enter(Mode::Memory);
    reply(from_version(version).and_then(|v| {
        with_state(state, |sm| sm.migrate(v))?;
        Ok(Vec::new())
    }))
}

/// `wraft_apply` of a store-model module.
pub fn store_apply<T: StoreStateMachine>(ptr: i32, len: i32) -> i64 {
    install_panic_hook();
    let input = take_input(ptr, len);
    let _call = host::enter(Mode::Write);
    reply(input.and_then(|input| T::apply(&input)))
}

/// `wraft_query` of a store-model module: storage is read-only.
pub fn store_query<T: StoreStateMachine>(ptr: i32, len: i32) -> i64 {
    install_panic_hook();
    let input = take_input(ptr, len);
    let _call = host::enter(Mode::Read);
    reply(input.and_then(|input| T::query(&input)))
}

/// `wraft_snapshot` of a store-model module (generated: every pair, see
/// [`crate::storage::encode_snapshot`]).
pub fn store_snapshot() -> i64 {
    install_panic_hook();
    let _call = host::enter(Mode::Read);
    reply(crate::storage::snapshot_store())
}

/// `wraft_restore` of a store-model module (generated: the store becomes the snapshot's
/// pairs).
pub fn store_restore(ptr: i32, len: i32) -> i64 {
    install_panic_hook();
    let input = take_input(ptr, len);
    let _call = host::enter(Mode::Write);
    reply(input.and_then(|input| crate::storage::restore_store(&input).map(|()| Vec::new())))
}

/// `wraft_migrate` of a store-model module.
pub fn store_migrate<T: StoreStateMachine>(version: i64) -> i64 {
    install_panic_hook();
    let _call = host::enter(Mode::Write);
    reply(from_version(version).and_then(|v| T::migrate(v).map(|()| Vec::new())))
}

/// `wraft_panic_message`: the last recorded panic message (empty if none), status 0.
pub fn panic_message() -> i64 {
    let message = PANIC_MESSAGE
        .try_with(|cell| cell.try_borrow().map(|m| m.clone()).unwrap_or_default())
        .unwrap_or_default();
    respond(STATUS_OK, &message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Echo(Vec<u8>);

    impl StateMachine for Echo {
        fn apply(&mut self, command: &[u8]) -> Result<Vec<u8>, String> {
            if command == b"boom" {
                panic!("boom requested");
            }
            if command == b"bad" {
                return Err("bad command".into());
            }
            self.0 = command.to_vec();
            Ok(command.to_vec())
        }
        fn query(&self, _: &[u8]) -> Result<Vec<u8>, String> {
            Ok(self.0.clone())
        }
        fn snapshot(&self) -> Vec<u8> {
            self.0.clone()
        }
        fn restore(&mut self, snapshot: &[u8]) -> Result<(), String> {
            self.0 = snapshot.to_vec();
            Ok(())
        }
    }

    thread_local! {
        static STATE: RefCell<Option<Echo>> = const { RefCell::new(None) };
    }

    /// Natively the packed pointer is truncated, so read the result buffer directly.
    fn last_result() -> (u8, Vec<u8>) {
        RESULT.with(|r| {
            let r = r.borrow();
            (r[0], r[1..].to_vec())
        })
    }

    fn call(f: fn(&'static StateCell<Echo>, i32, i32) -> i64, input: &[u8]) -> (u8, Vec<u8>) {
        let ptr = alloc(input.len() as i32);
        INPUT.with(|b| b.borrow_mut().copy_from_slice(input));
        let packed = f(&STATE, ptr, input.len() as i32);
        let (status, payload) = last_result();
        assert_eq!(packed as u64 & 0xffff_ffff, payload.len() as u64 + 1);
        (status, payload)
    }

    #[test]
    fn envelope_carries_status_and_payload() {
        assert_eq!(call(apply::<Echo>, b"hi"), (0, b"hi".to_vec()));
        assert_eq!(call(apply::<Echo>, b"bad"), (1, b"bad command".to_vec()));
        assert_eq!(call(query::<Echo>, b""), (0, b"hi".to_vec()));
        snapshot::<Echo>(&STATE);
        assert_eq!(last_result(), (0, b"hi".to_vec()));
        assert_eq!(call(restore::<Echo>, b"zz"), (0, Vec::new()));
        assert_eq!(call(query::<Echo>, b""), (0, b"zz".to_vec()));
    }

    #[test]
    fn zero_length_input_is_fine() {
        assert_eq!(call(apply::<Echo>, b""), (0, Vec::new()));
    }

    #[test]
    fn foreign_input_pointer_is_an_error_not_a_crash() {
        alloc(4);
        apply::<Echo>(&STATE, 12345, 4);
        let (status, message) = last_result();
        assert_eq!(status, 1);
        assert!(String::from_utf8_lossy(&message).contains("not the buffer"));
        // The buffer was consumed; a call without `alloc` is refused too.
        apply::<Echo>(&STATE, 0, 0);
        assert_eq!(last_result().0, 1);
    }

    #[test]
    fn migrate_export() {
        assert_eq!(
            {
                migrate::<Echo>(&STATE, 1);
                last_result()
            },
            (0, Vec::new())
        );
        migrate::<Echo>(&STATE, -1);
        let (status, message) = last_result();
        assert_eq!(status, 1);
        assert!(String::from_utf8_lossy(&message).contains("version -1"));
    }

    /// Writes `key=value` in apply and in query (where it must fail).
    struct Store;

    impl StoreStateMachine for Store {
        fn apply(command: &[u8]) -> Result<Vec<u8>, String> {
            crate::storage::put(command, b"v")?;
            Ok(b"ok".to_vec())
        }
        fn query(query: &[u8]) -> Result<Vec<u8>, String> {
            crate::storage::put(query, b"v")?;
            Ok(Vec::new())
        }
        fn migrate(from_version: u64) -> Result<(), String> {
            crate::storage::put(b"from", &from_version.to_le_bytes())
        }
    }

    /// Runs a store-model export natively against the fake host.
    fn store_call(f: impl FnOnce() -> i64) -> ((u8, Vec<u8>), crate::host::fake::Store) {
        use crate::host::fake::{self, Call};
        let store = crate::host::fake::Store::default();
        // The export sets its own mode; the fake only needs the storage.
        let (result, call) = fake::run(
            Mode::Idle,
            crate::Context::default(),
            Some(Call::new(store.clone())),
            f,
        );
        result.unwrap();
        call.unwrap().commit();
        (last_result(), store)
    }

    fn with_input(input: &[u8]) -> i32 {
        let ptr = alloc(input.len() as i32);
        INPUT.with(|b| b.borrow_mut().copy_from_slice(input));
        ptr
    }

    #[test]
    fn store_exports() {
        let (result, store) = store_call(|| {
            let ptr = with_input(b"k");
            store_apply::<Store>(ptr, 1)
        });
        assert_eq!(result, (0, b"ok".to_vec()));
        assert_eq!(store.borrow().get(&b"k"[..]), Some(&b"v".to_vec()));

        let (result, store) = store_call(|| {
            let ptr = with_input(b"k");
            store_query::<Store>(ptr, 1)
        });
        assert_eq!(result.0, 1);
        assert!(String::from_utf8_lossy(&result.1).contains("read-only"));
        assert!(store.borrow().is_empty());

        let (result, store) = store_call(|| store_migrate::<Store>(3));
        assert_eq!(result, (0, Vec::new()));
        assert_eq!(
            store.borrow().get(&b"from"[..]),
            Some(&3u64.to_le_bytes().to_vec())
        );
        assert_eq!(store_call(|| store_migrate::<Store>(-5)).0 .0, 1);

        // The generated snapshot of an empty store is the version byte; restore reads it.
        assert_eq!(
            store_call(store_snapshot).0,
            (0, vec![crate::storage::SNAPSHOT_V1])
        );
        let (result, _) = store_call(|| {
            let ptr = with_input(&[1]);
            store_restore(ptr, 1)
        });
        assert_eq!(result, (0, Vec::new()));
        let (result, _) = store_call(|| {
            let ptr = with_input(&[9]);
            store_restore(ptr, 1)
        });
        assert_eq!(result.0, 1);
    }

    #[test]
    fn panic_message_is_recorded() {
        install_panic_hook();
        let result = std::panic::catch_unwind(|| call(apply::<Echo>, b"boom"));
        assert!(result.is_err());
        panic_message();
        let (status, message) = last_result();
        assert_eq!(status, 0);
        assert!(String::from_utf8_lossy(&message).contains("boom requested"));
    }
}
