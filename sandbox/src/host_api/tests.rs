//! The host functions against hand-written WAT modules and an in-memory storage.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use crate::tests::small_limits;
use crate::{CallContext, CallError, Model, Runtime, StorageView, WasmError};

/// Committed storage for the tests: a map behind a lock.
#[derive(Default)]
struct MapStorage(Mutex<BTreeMap<Vec<u8>, Vec<u8>>>);

impl StorageView for MapStorage {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, String> {
        Ok(self.0.lock().map_err(|e| e.to_string())?.get(key).cloned())
    }
    fn scan(&self, start: &[u8], end: Option<&[u8]>, limit: usize) -> Result<crate::Pairs, String> {
        let map = self.0.lock().map_err(|e| e.to_string())?;
        Ok(map
            .range(start.to_vec()..)
            .take_while(|(k, _)| end.is_none_or(|end| k.as_slice() < end))
            .take(limit)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }
}

/// A store-model module. `wraft_apply`: input "P<k>=<v>" puts, "D<k>" deletes, "G<k>" gets
/// (returns the value), "S<start>" scans from start (returns the encoding), "C" returns the
/// context record; input is at 1024, results are built at 8191 (status) + after.
fn store_module(extra_exports: &str) -> String {
    format!(
        r#"(module
  (import "wraft" "context" (func $context (param i32)))
  (import "wraft" "take_output" (func $take (param i32)))
  (import "wraft" "storage_get" (func $get (param i32 i32) (result i64)))
  (import "wraft" "storage_put" (func $put (param i32 i32 i32 i32)))
  (import "wraft" "storage_delete" (func $delete (param i32 i32)))
  (import "wraft" "storage_scan" (func $scan (param i32 i32 i32 i32 i32) (result i64)))
  (memory (export "memory") 2)
  (func (export "wraft_abi_v1"))
  (func (export "wraft_model_store"))
  (func (export "wraft_alloc") (param i32) (result i32) (i32.const 1024))
  (func $ok (param $len i32) (result i64)
    (i32.store8 (i32.const 8191) (i32.const 0))
    (i64.or (i64.shl (i64.const 8191) (i64.const 32))
            (i64.extend_i32_u (i32.add (local.get $len) (i32.const 1)))))
  (func $eq (param $ptr i32) (param $len i32) (result i32)
    ;; offset of '=' within [ptr+1, ptr+len), or len when absent
    (local $i i32)
    (local.set $i (i32.const 1))
    (block $done (loop $next
      (br_if $done (i32.ge_u (local.get $i) (local.get $len)))
      (br_if $done (i32.eq (i32.load8_u (i32.add (local.get $ptr) (local.get $i))) (i32.const 61)))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br $next)))
    (local.get $i))
  (func $run (param $ptr i32) (param $len i32) (result i64)
    (local $op i32) (local $e i32) (local $n i64)
    (local.set $op (i32.load8_u (local.get $ptr)))
    (if (i32.eq (local.get $op) (i32.const 80)) (then ;; P
      (local.set $e (call $eq (local.get $ptr) (local.get $len)))
      (call $put (i32.add (local.get $ptr) (i32.const 1)) (i32.sub (local.get $e) (i32.const 1))
                 (i32.add (i32.add (local.get $ptr) (local.get $e)) (i32.const 1))
                 (i32.sub (i32.sub (local.get $len) (local.get $e)) (i32.const 1)))
      (return (call $ok (i32.const 0)))))
    (if (i32.eq (local.get $op) (i32.const 68)) (then ;; D
      (call $delete (i32.add (local.get $ptr) (i32.const 1)) (i32.sub (local.get $len) (i32.const 1)))
      (return (call $ok (i32.const 0)))))
    (if (i32.eq (local.get $op) (i32.const 71)) (then ;; G
      (local.set $n (call $get (i32.add (local.get $ptr) (i32.const 1)) (i32.sub (local.get $len) (i32.const 1))))
      (if (i64.lt_s (local.get $n) (i64.const 0)) (then (return (call $ok (i32.const 0)))))
      (call $take (i32.const 8192))
      (return (call $ok (i32.wrap_i64 (local.get $n))))))
    (if (i32.eq (local.get $op) (i32.const 83)) (then ;; S
      (local.set $n (call $scan (i32.add (local.get $ptr) (i32.const 1)) (i32.sub (local.get $len) (i32.const 1))
                                (i32.const 0) (i32.const 0) (i32.const 100)))
      (call $take (i32.const 8192))
      (return (call $ok (i32.wrap_i64 (local.get $n))))))
    (if (i32.eq (local.get $op) (i32.const 67)) (then ;; C
      (call $context (i32.const 8192))
      (return (call $ok (i32.const 64)))))
    (if (i32.eq (local.get $op) (i32.const 84)) (then ;; T: put then trap
      (call $put (i32.const 0) (i32.const 1) (i32.const 0) (i32.const 1))
      (unreachable)))
    (call $ok (i32.const 0)))
  (func (export "wraft_apply") (param $ptr i32) (param $len i32) (result i64)
    (call $run (local.get $ptr) (local.get $len)))
  (func (export "wraft_query") (param $ptr i32) (param $len i32) (result i64)
    (call $run (local.get $ptr) (local.get $len)))
  (func (export "wraft_snapshot") (result i64) (call $ok (i32.const 0)))
  (func (export "wraft_restore") (param i32 i32) (result i64) (call $ok (i32.const 0)))
  {extra_exports}
)"#
    )
}

fn store_instance(extra: &str) -> (crate::Instance, Arc<MapStorage>) {
    let rt = Runtime::new().unwrap();
    let limits = small_limits();
    let module = rt.compile_wat(&store_module(extra), &limits).unwrap();
    assert_eq!(module.model(), Model::Store);
    let mut instance = rt.instantiate(&module, &limits).unwrap();
    let storage = Arc::new(MapStorage::default());
    instance.set_storage(Some(storage.clone()));
    (instance, storage)
}

fn commit(storage: &MapStorage, instance: &mut crate::Instance) {
    let mut map = storage.0.lock().unwrap();
    for (k, v) in instance.take_writes() {
        match v {
            Some(v) => map.insert(k, v),
            None => map.remove(&k),
        };
    }
}

#[test]
fn writes_are_buffered_visible_to_the_call_and_committed_by_the_host() {
    let (mut inst, storage) = store_instance("");
    assert_eq!(inst.apply(b"Pa=1").unwrap(), b"");
    assert!(
        storage.0.lock().unwrap().is_empty(),
        "nothing committed yet"
    );
    // Not committed: a later call does not see it.
    assert_eq!(inst.take_writes().len(), 1);
    inst.apply(b"Pa=1").unwrap();
    commit(&storage, &mut inst);
    inst.apply(b"Pb=22").unwrap();
    commit(&storage, &mut inst);
    assert_eq!(inst.apply(b"Ga").unwrap(), b"1");
    assert_eq!(inst.query(b"Gb").unwrap(), b"22");
    assert_eq!(inst.query(b"Gzz").unwrap(), b"");
    let scan = inst.query(b"S").unwrap();
    let mut expected = Vec::new();
    for (k, v) in [(b"a".as_slice(), b"1".as_slice()), (b"b", b"22")] {
        expected.extend_from_slice(&(k.len() as u32).to_le_bytes());
        expected.extend_from_slice(k);
        expected.extend_from_slice(&(v.len() as u32).to_le_bytes());
        expected.extend_from_slice(v);
    }
    assert_eq!(scan, expected);
    inst.apply(b"Da").unwrap();
    commit(&storage, &mut inst);
    assert_eq!(inst.query(b"Ga").unwrap(), b"");
    assert_eq!(inst.query(b"Sa").unwrap().len(), 4 + 1 + 4 + 2);
}

#[test]
fn a_trap_drops_the_calls_writes_and_a_query_cannot_write() {
    let (mut inst, storage) = store_instance("");
    let err = inst.apply(b"T").unwrap_err();
    assert!(matches!(err, CallError::Trap(_)), "{err:?}");
    assert!(inst.take_writes().is_empty());
    let err = inst.query(b"Pk=v").unwrap_err();
    assert!(err.to_string().contains("storage is read-only"), "{err}");
    assert!(storage.0.lock().unwrap().is_empty());
}

#[test]
fn context_is_what_the_host_set() {
    let (mut inst, _) = store_instance("");
    let ctx = CallContext {
        index: 7,
        term: 3,
        timestamp_ms: 1_700_000_000_000,
        position: 2,
        in_apply: true,
        seed: [9; 32],
    };
    inst.set_context(ctx.clone());
    assert_eq!(inst.apply(b"C").unwrap(), ctx.encode().to_vec());
}

#[test]
fn hostile_arguments_trap_with_a_message() {
    let wat = store_module("").replace(
        "(func (export \"wraft_apply\") (param $ptr i32) (param $len i32) (result i64)\n    (call $run (local.get $ptr) (local.get $len)))",
        "(func (export \"wraft_apply\") (param $ptr i32) (param $len i32) (result i64)\n    (call $put (i32.const -8) (i32.const 100) (i32.const 0) (i32.const 1)) (i64.const 0))",
    );
    let rt = Runtime::new().unwrap();
    let module = rt.compile_wat(&wat, &small_limits()).unwrap();
    let mut inst = rt.instantiate(&module, &small_limits()).unwrap();
    inst.set_storage(Some(Arc::new(MapStorage::default())));
    let err = inst.apply(b"").unwrap_err();
    assert!(err.to_string().contains("outside the module's"), "{err}");
    // A key over the limit.
    let (mut inst, _) = store_instance("");
    let mut put = b"P".to_vec();
    put.extend(std::iter::repeat_n(b'k', crate::MAX_KEY_BYTES + 1));
    put.extend_from_slice(b"=v");
    let err = inst.apply(&put).unwrap_err();
    assert!(err.to_string().contains("the limit is 4096"), "{err}");
}

#[test]
fn host_calls_cost_fuel() {
    let (mut inst, _) = store_instance("");
    inst.apply(b"X").unwrap();
    let plain = inst.fuel_used();
    inst.apply(b"Pa=1").unwrap();
    assert!(
        inst.fuel_used() >= plain + crate::HOST_CALL_FUEL,
        "{} vs {plain}",
        inst.fuel_used()
    );
}

#[test]
fn storage_needs_the_store_model_and_wasi_is_refused() {
    let memory_model = store_module("").replace("(func (export \"wraft_model_store\"))", "");
    let rt = Runtime::new().unwrap();
    match rt.compile_wat(&memory_model, &small_limits()) {
        Err(WasmError::StorageNeedsStoreModel { name }) => assert_eq!(name, "take_output"),
        other => panic!("expected a refusal, got {:?}", other.map(|_| ())),
    }
    let wasi = store_module("").replace(
        "(import \"wraft\" \"context\" (func $context (param i32)))",
        "(import \"wraft\" \"context\" (func $context (param i32)))\n  (import \"wasi_snapshot_preview1\" \"clock_time_get\" (func (param i32 i64 i32) (result i32)))",
    );
    match rt.compile_wat(&wasi, &small_limits()) {
        Err(e @ WasmError::ImportNotAllowed { .. }) => {
            assert!(e.to_string().contains("clock_time_get"), "{e}")
        }
        other => panic!("expected a refusal, got {:?}", other.map(|_| ())),
    }
    let wrong = store_module("")
        .replace(
            "(import \"wraft\" \"context\" (func $context (param i32)))",
            "(import \"wraft\" \"context\" (func $context (param i64)))",
        )
        .replace(
            "(call $context (i32.const 8192))",
            "(call $context (i64.const 8192))",
        );
    assert!(matches!(
        rt.compile_wat(&wrong, &small_limits()),
        Err(WasmError::WrongImport {
            name: "context",
            ..
        })
    ));
}

#[test]
fn migrate_is_called_with_the_old_version() {
    let migrate = r#"(func (export "wraft_migrate") (param $from i64) (result i64)
    (if (i64.eq (local.get $from) (i64.const 1)) (then (return (call $ok (i32.const 0)))))
    (unreachable))"#;
    let (mut inst, _) = store_instance(migrate);
    inst.migrate(1).unwrap();
    assert!(matches!(inst.migrate(2), Err(CallError::Trap(_))));
}

#[test]
fn a_reversed_scan_range_is_empty_not_a_host_panic() {
    // `S` scans from the input's key with no end; this module scans [input, "a"), which is
    // reversed for any key above "a".
    let wat = store_module("").replace(
        "(i32.const 0) (i32.const 0) (i32.const 100)))",
        "(i32.const 8190) (i32.const 1) (i32.const 100)))",
    );
    let rt = Runtime::new().unwrap();
    let module = rt.compile_wat(&wat, &small_limits()).unwrap();
    let mut inst = rt.instantiate(&module, &small_limits()).unwrap();
    let storage = Arc::new(MapStorage::default());
    storage
        .0
        .lock()
        .unwrap()
        .insert(b"z".to_vec(), b"1".to_vec());
    inst.set_storage(Some(storage));
    // Byte 8190 of memory is 0: the end key "\0" is below "z".
    assert_eq!(inst.query(b"Sz").unwrap(), b"");
}
