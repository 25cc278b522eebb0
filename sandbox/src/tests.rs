//! Tests of the runtime against hand-written (often hostile) WAT modules and, when built, the
//! real kv and counter plugins. The stack bound and the compile cache have their own tests
//! (`stack/tests.rs`, `cache/tests.rs`).

use super::*;

/// Input is always placed at 1024; results are built at 1023 (status) + the bytes after it.
const INPUT_AT: i32 = 1024;

/// A module implementing ABI v1 whose `wraft_apply` body is `apply` (locals `$ptr`, `$len`),
/// plus `extra` items. The default query echoes its input with status 0.
pub(crate) fn abi_module(apply: &str, extra: &str) -> String {
    format!(
        r#"(module
  (memory (export "memory") 2)
  (func (export "wraft_abi_v1"))
  (func (export "wraft_alloc") (param $len i32) (result i32) (i32.const {INPUT_AT}))
  (func $echo (param $status i32) (param $len i32) (result i64)
    (i32.store8 (i32.const 1023) (local.get $status))
    (i64.or (i64.shl (i64.const 1023) (i64.const 32))
            (i64.extend_i32_u (i32.add (local.get $len) (i32.const 1)))))
  (func (export "wraft_apply") (param $ptr i32) (param $len i32) (result i64) {apply})
  (func (export "wraft_query") (param $ptr i32) (param $len i32) (result i64)
    (call $echo (i32.const 0) (local.get $len)))
  (func (export "wraft_snapshot") (result i64) (call $echo (i32.const 0) (i32.const 0)))
  (func (export "wraft_restore") (param $ptr i32) (param $len i32) (result i64)
    (call $echo (i32.const 0) (i32.const 0)))
  {extra}
)"#
    )
}

pub(crate) const ECHO: &str = "(call $echo (i32.const 0) (local.get $len))";

pub(crate) fn small_limits() -> Limits {
    Limits {
        fuel_per_call: 1_000_000,
        fuel_per_snapshot: 1_000_000,
        memory_bytes: 1 << 20,
        ..Limits::default()
    }
}

pub(crate) fn instance_of(wat: &str, limits: &Limits) -> Instance {
    let rt = Runtime::new().unwrap();
    let module = rt.compile_wat(wat, limits).unwrap();
    rt.instantiate(&module, limits).unwrap()
}

fn compile_err(wat: &str) -> WasmError {
    match Runtime::new().unwrap().compile_wat(wat, &Limits::default()) {
        Ok(_) => panic!("module compiled but should not have"),
        Err(e) => e,
    }
}

#[test]
fn instance_is_send_and_module_cheap_to_clone() {
    fn assert_send<T: Send>() {}
    assert_send::<Instance>();
    assert_send::<Module>();
    assert_send::<Runtime>();
}

#[test]
fn echo_round_trip_and_hash() {
    let limits = small_limits();
    let rt = Runtime::new().unwrap();
    let wat = abi_module(ECHO, "");
    let module = rt.compile_wat(&wat, &limits).unwrap();
    assert_eq!(module.hash_hex().len(), 64);
    assert_eq!(module.hash(), module.clone().hash());
    let mut inst = rt.instantiate(&module, &limits).unwrap();
    assert_eq!(inst.apply(b"hello").unwrap(), b"hello");
    assert_eq!(inst.apply(b"").unwrap(), b"");
    assert_eq!(inst.query(b"q").unwrap(), b"q");
    assert_eq!(inst.snapshot().unwrap(), b"");
    inst.restore(b"anything").unwrap();
}

#[test]
fn invalid_bytes() {
    let rt = Runtime::new().unwrap();
    let err = rt
        .compile(b"definitely not wasm", &Limits::default())
        .err()
        .unwrap();
    assert!(matches!(err, WasmError::Invalid(_)), "{err}");
    // Text is accepted only by the test helper, never by `compile`.
    let err = rt
        .compile(abi_module(ECHO, "").as_bytes(), &Limits::default())
        .err()
        .unwrap();
    assert!(matches!(err, WasmError::Invalid(_)), "{err}");
}

#[test]
fn module_too_large() {
    let limits = Limits {
        max_module_bytes: 16,
        ..Limits::default()
    };
    let err = Runtime::new()
        .unwrap()
        .compile(&[0; 17], &limits)
        .err()
        .unwrap();
    assert!(
        matches!(err, WasmError::ModuleTooLarge { len: 17, limit: 16 }),
        "{err}"
    );
}

#[test]
fn missing_export() {
    let wat = abi_module(ECHO, "").replace("\"wraft_apply\"", "\"something_else\"");
    let err = compile_err(&wat);
    assert_eq!(
        err.to_string(),
        "module exports no `wraft_apply` (expected (i32, i32) -> i64)"
    );
    let wat = abi_module(ECHO, "").replace("(export \"wraft_abi_v1\")", "");
    assert!(matches!(
        compile_err(&wat),
        WasmError::MissingExport {
            name: "wraft_abi_v1",
            ..
        }
    ));
    let wat = abi_module(ECHO, "").replace("(export \"memory\")", "");
    assert!(matches!(
        compile_err(&wat),
        WasmError::MissingExport { name: "memory", .. }
    ));
}

#[test]
fn wrong_signature() {
    let wat = abi_module("(i64.const 0)", "").replace(
        "(func (export \"wraft_apply\") (param $ptr i32) (param $len i32)",
        "(func (export \"wraft_apply\") (param $ptr i32) (param $len i64)",
    );
    let err = compile_err(&wat);
    match &err {
        WasmError::WrongSignature { name, found, .. } => {
            assert_eq!(*name, "wraft_apply");
            assert_eq!(found, "(i32, i64) -> i64");
        }
        other => panic!("unexpected {other}"),
    }
    assert!(
        err.to_string().contains("expected (i32, i32) -> i64"),
        "{err}"
    );

    let wat = abi_module(
        ECHO,
        r#"(func (export "wraft_panic_message") (result i32) (i32.const 0))"#,
    );
    assert!(matches!(
        compile_err(&wat),
        WasmError::WrongSignature {
            name: "wraft_panic_message",
            ..
        }
    ));
}

#[test]
fn imports_other_than_host_functions_are_refused() {
    let wat = abi_module(ECHO, "").replacen(
        "(module",
        r#"(module (import "wasi_snapshot_preview1" "clock_time_get" (func (param i32 i64 i32) (result i32)))"#,
        1,
    );
    let err = compile_err(&wat);
    assert!(
        err.to_string().starts_with(
            "module imports `wasi_snapshot_preview1::clock_time_get`; wraft modules may import only wraft's host functions"
        ),
        "{err}"
    );
}

#[test]
fn disabled_proposals_are_invalid() {
    let shared = abi_module(ECHO, "").replace(
        "(memory (export \"memory\") 2)",
        "(memory (export \"memory\") 2 2 shared)",
    );
    assert!(matches!(compile_err(&shared), WasmError::Invalid(_)));
    let mem64 = abi_module(ECHO, "").replace(
        "(memory (export \"memory\") 2)",
        "(memory (export \"memory\") i64 2)",
    );
    assert!(matches!(compile_err(&mem64), WasmError::Invalid(_)));
}

#[test]
fn initial_memory_over_the_limit() {
    let wat = abi_module(ECHO, "").replace(
        "(memory (export \"memory\") 2)",
        "(memory (export \"memory\") 100)",
    );
    let err = Runtime::new()
        .unwrap()
        .compile_wat(&wat, &small_limits())
        .err()
        .unwrap();
    assert!(err.to_string().contains("memory limit"), "{err}");
}

#[test]
fn infinite_loop_runs_out_of_fuel_and_fuel_is_per_call() {
    let limits = small_limits();
    let wat = abi_module(
        "(if (i32.eqz (local.get $len)) (then (loop $l (br $l)))) (call $echo (i32.const 0) (local.get $len))",
        "",
    );
    let mut inst = instance_of(&wat, &limits);
    let err = inst.apply(b"").unwrap_err();
    assert_eq!(err, CallError::OutOfFuel { limit: 1_000_000 });
    assert!(err.poisons_instance());
    // Fuel is fresh for the next call.
    assert_eq!(inst.apply(b"x").unwrap(), b"x");
}

#[test]
fn memory_bomb_hits_memory_limit() {
    let limits = small_limits();
    let bomb =
        "(loop $l (br_if $l (i32.ne (memory.grow (i32.const 1)) (i32.const -1)))) unreachable";
    let extra = r#"(func (export "wraft_panic_message") (result i64) (i64.const 0))"#;
    let mut inst = instance_of(&abi_module(bomb, extra), &limits);
    assert_eq!(
        inst.apply(b"").unwrap_err(),
        CallError::MemoryLimit { limit: 1 << 20 }
    );
}

#[test]
fn refused_growth_without_a_trap_is_fine_and_flag_resets() {
    let limits = small_limits();
    // Asks for far too much, ignores the refusal, then echoes; a later trap is a plain trap.
    let apply = "(drop (memory.grow (i32.const 1000))) \
                 (if (i32.eqz (local.get $len)) (then unreachable)) \
                 (call $echo (i32.const 0) (local.get $len))";
    let mut inst = instance_of(&abi_module(apply, ""), &limits);
    assert_eq!(inst.apply(b"ok").unwrap(), b"ok");
    let wat = abi_module(ECHO, "").replace(
        "(call $echo (i32.const 0) (local.get $len)))\n  (func (export \"wraft_snapshot\")",
        "unreachable)\n  (func (export \"wraft_snapshot\")",
    );
    let mut inst2 = instance_of(&wat, &limits);
    assert!(matches!(inst2.query(b"").unwrap_err(), CallError::Trap(_)));
    // Growth refused in the same call as the trap: MemoryLimit.
    assert_eq!(
        inst.apply(b"").unwrap_err(),
        CallError::MemoryLimit { limit: 1 << 20 }
    );
}

#[test]
fn giant_result_is_refused_before_copying() {
    let limits = small_limits();
    let wat = abi_module("(i64.const 0xffffffff)", "");
    let err = instance_of(&wat, &limits).apply(b"").unwrap_err();
    assert_eq!(
        err,
        CallError::ResultTooLarge {
            len: 0xffff_fffe,
            limit: limits.max_result_bytes
        }
    );
}

#[test]
fn result_out_of_bounds_is_bad_abi() {
    let limits = small_limits();
    for packed in [
        "0xffff000000000010",
        "0x0001fffe00000004",
        "0",
        "0x0000000100000001",
    ] {
        let wat = abi_module(&format!("(i64.const {packed})"), "");
        let result = instance_of(&wat, &limits).apply(b"");
        match (packed, result) {
            // One byte inside memory: status byte 0 (zeroed memory), empty payload.
            ("0x0000000100000001", Ok(payload)) => assert!(payload.is_empty()),
            (_, Err(CallError::BadAbi(_))) => {}
            (p, other) => panic!("{p}: expected BadAbi, got {other:?}"),
        }
    }
    // A status byte other than 0 or 1.
    let wat = abi_module("(call $echo (i32.const 7) (local.get $len))", "");
    assert!(matches!(
        instance_of(&wat, &limits).apply(b"x"),
        Err(CallError::BadAbi(_))
    ));
    // An input pointer outside memory.
    let wat = abi_module(ECHO, "").replace("(i32.const 1024))", "(i32.const -8))");
    let err = instance_of(&wat, &limits).apply(b"0123456789").unwrap_err();
    assert!(matches!(err, CallError::BadAbi(_)), "{err:?}");
}

#[test]
fn rejection_keeps_the_instance_but_a_trap_poisons_it() {
    let limits = small_limits();
    let apply = "(if (i32.eqz (local.get $len)) (then unreachable)) \
                 (call $echo (i32.const 1) (local.get $len))";
    let mut inst = instance_of(&abi_module(apply, ""), &limits);
    let rejected = inst.apply(b"no such key").unwrap_err();
    assert_eq!(rejected, CallError::Rejected("no such key".to_string()));
    assert!(!rejected.poisons_instance());
    let trap = inst.apply(b"").unwrap_err();
    assert!(matches!(trap, CallError::Trap(_)), "{trap:?}");
    assert!(trap.poisons_instance());
}

#[test]
fn trap_reports_the_guest_panic_message() {
    let extra = r#"
      (data (i32.const 16) "\00boom at lib.rs:1")
      (func (export "wraft_panic_message") (result i64)
        (i64.or (i64.shl (i64.const 16) (i64.const 32)) (i64.const 17)))"#;
    let err = instance_of(&abi_module("unreachable", extra), &small_limits())
        .apply(b"")
        .unwrap_err();
    match err {
        CallError::Trap(message) => {
            assert!(message.contains("unreachable"), "{message}");
            assert!(
                message.contains("guest panicked: boom at lib.rs:1"),
                "{message}"
            );
        }
        other => panic!("expected Trap, got {other:?}"),
    }
}

#[test]
fn nan_results_are_canonical() {
    // Adds 1.0 to a NaN with a payload and a sign bit, both read from the input so nothing is
    // folded at compile time; hardware would propagate the payload, canonicalization must not.
    let apply = "(i32.store8 (i32.const 2000) (i32.const 0)) \
                 (i64.store (i32.const 2001) (i64.reinterpret_f64 \
                    (f64.add (f64.load (local.get $ptr)) (f64.const 1)))) \
                 (i32.store (i32.const 2009) (i32.reinterpret_f32 \
                    (f32.div (f32.load (i32.add (local.get $ptr) (i32.const 8))) \
                             (f32.load (i32.add (local.get $ptr) (i32.const 8)))))) \
                 (i64.or (i64.shl (i64.const 2000) (i64.const 32)) (i64.const 13))";
    let mut input = 0xfff4_0000_0000_0001u64.to_le_bytes().to_vec();
    input.extend_from_slice(&0f32.to_le_bytes());
    let out = instance_of(&abi_module(apply, ""), &small_limits())
        .apply(&input)
        .unwrap();
    let f64_bits = u64::from_le_bytes(out[0..8].try_into().unwrap());
    let f32_bits = u32::from_le_bytes(out[8..12].try_into().unwrap());
    assert_eq!(f64_bits, 0x7ff8_0000_0000_0000, "{f64_bits:#x}");
    assert_eq!(f32_bits, 0x7fc0_0000, "{f32_bits:#x}");
}

#[test]
fn oversized_input_is_a_memory_limit() {
    let limits = Limits {
        memory_bytes: 128 * 1024,
        ..small_limits()
    };
    let mut inst = instance_of(&abi_module(ECHO, ""), &limits);
    let err = inst.apply(&vec![0; 200 * 1024]).unwrap_err();
    assert_eq!(err, CallError::MemoryLimit { limit: 128 * 1024 });
}

/// Finds a plugin built by `scripts/build-plugins.sh`, if any.
pub(crate) fn built_plugin(name: &str) -> Option<Vec<u8>> {
    let rel = format!("wasm32-unknown-unknown/release/{name}.wasm");
    let mut candidates = Vec::new();
    if let Ok(dir) = std::env::var("CARGO_TARGET_DIR") {
        candidates.push(std::path::Path::new(&dir).join(&rel));
    }
    candidates.push(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../target")
            .join(&rel),
    );
    let found = candidates.iter().find_map(|p| std::fs::read(p).ok());
    // In CI (and scripts/test.sh) the plugins are built first: a missing one is a failure, not
    // a skip, so these tests cannot pass without checking anything there.
    if found.is_none() && std::env::var_os("WRAFT_REQUIRE_PLUGINS").is_some() {
        panic!("{name}.wasm not built (run scripts/build-plugins.sh); looked in {candidates:?}");
    }
    if found.is_none() {
        println!("note: {name}.wasm not built (run scripts/build-plugins.sh); skipping; looked in {candidates:?}");
    }
    found
}

#[test]
fn real_kv_plugin() {
    let Some(wasm) = built_plugin("kv") else {
        return;
    };
    let limits = Limits {
        memory_bytes: 4 << 20,
        ..Limits::default()
    };
    let rt = Runtime::new().unwrap();
    let module = rt.compile(&wasm, &limits).unwrap();
    let mut kv = rt.instantiate(&module, &limits).unwrap();
    let put = br#"{"op":"put","key":"a","value":"1"}"#;
    assert_eq!(kv.apply(put).unwrap(), br#"{"prev":null}"#);
    assert_eq!(kv.apply(put).unwrap(), br#"{"prev":"1"}"#);
    let cas = br#"{"op":"cas","key":"a","expect":"1","value":"2"}"#;
    assert_eq!(kv.apply(cas).unwrap(), br#"{"ok":true,"current":"2"}"#);
    assert_eq!(
        kv.query(br#"{"op":"scan","prefix":""}"#).unwrap(),
        br#"{"items":[["a","2"]]}"#
    );
    // Malformed input, including an empty one, is the module's own error, never a trap.
    for bad in [&b""[..], b"{", br#"{"op":"nope"}"#] {
        let err = kv.apply(bad).unwrap_err();
        assert!(
            matches!(err, CallError::Rejected(ref m) if m.starts_with("invalid kv command")),
            "{err:?}"
        );
    }
    let snap = kv.snapshot().unwrap();
    let mut other = rt.instantiate(&module, &limits).unwrap();
    other.restore(&snap).unwrap();
    assert_eq!(
        other.query(br#"{"op":"get","key":"a"}"#).unwrap(),
        br#"{"value":"2"}"#
    );
    assert_eq!(other.snapshot().unwrap(), snap);
    assert!(matches!(
        other.restore(b"\x09"),
        Err(CallError::Rejected(_))
    ));

    // A value that fits the input but not the parsed copy: the allocator aborts on refused
    // growth and that is reported as the memory limit.
    let big = format!(
        r#"{{"op":"put","key":"big","value":"{}"}}"#,
        "x".repeat(3 << 20)
    );
    assert_eq!(
        kv.apply(big.as_bytes()).unwrap_err(),
        CallError::MemoryLimit { limit: 4 << 20 }
    );
}

#[test]
fn real_counter_plugin() {
    let Some(wasm) = built_plugin("counter") else {
        return;
    };
    let limits = Limits::default();
    let rt = Runtime::new().unwrap();
    let mut counter = rt
        .instantiate(&rt.compile(&wasm, &limits).unwrap(), &limits)
        .unwrap();
    assert_eq!(
        counter.apply(br#"{"op":"add","n":40}"#).unwrap(),
        br#"{"value":40}"#
    );
    assert_eq!(
        counter.apply(br#"{"op":"add","n":2}"#).unwrap(),
        br#"{"value":42}"#
    );
    assert_eq!(
        counter.query(br#"{"op":"get"}"#).unwrap(),
        br#"{"value":42}"#
    );
    let max = format!(r#"{{"op":"add","n":{}}}"#, i64::MAX);
    assert!(
        matches!(counter.apply(max.as_bytes()), Err(CallError::Rejected(m)) if m.contains("overflow"))
    );
}

#[test]
fn engine_names_the_pinned_wasmtime() {
    // ENGINE must change with the wasmtime pin: replicas compare it to refuse mixed engines.
    let manifest =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.toml")).unwrap();
    let pin = manifest
        .lines()
        .find(|l| l.starts_with("wasmtime ="))
        .and_then(|l| l.split("\"=").nth(1))
        .and_then(|v| v.split('"').next())
        .expect("the workspace pins wasmtime with an exact version");
    assert!(
        ENGINE.contains(&format!("wasmtime {pin};")),
        "ENGINE {ENGINE:?} does not name the pinned wasmtime {pin}"
    );
}
