//! The stack bound: where it trips (the same depth every time, before wasmtime's native
//! guard for every frame shape), that it changes nothing else a module computes, and that
//! every way out of a function gives its units back.

use crate::tests::{abi_module, built_plugin, instance_of, small_limits, ECHO};
use crate::{
    CallError, Limits, Runtime, WasmError, GUEST_THREAD_STACK_BYTES, MAX_STACK_UNITS,
    STACK_UNIT_BYTES,
};

use super::{costs, EXHAUSTED};

/// Runs `f` on a thread with the stack the crate docs require of guest threads.
fn on_guest_thread<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::Builder::new()
        .stack_size(GUEST_THREAD_STACK_BYTES)
        .spawn(f)
        .unwrap()
        .join()
        .unwrap()
}

/// Counts frames in the `i32` at address 0.
const COUNT_FRAME: &str =
    "(i32.store (i32.const 0) (i32.add (i32.load (i32.const 0)) (i32.const 1)))";

/// An apply that recurses forever when its input is empty and otherwise returns the frame
/// count the last recursion reached (4 bytes, little-endian).
fn recursion_module() -> String {
    abi_module(
        "(if (i32.eqz (local.get $len)) (then (call $rec))) \
         (i32.store (i32.const 1024) (i32.load (i32.const 0))) \
         (call $echo (i32.const 0) (i32.const 4))",
        &format!("(func $rec {COUNT_FRAME} (call $rec))"),
    )
}

/// Frames of `$rec` that fit: `wraft_apply` (function 3 of `abi_module`) is on the stack
/// below them, and `$rec` is the module's last function.
fn expected_depth(wat: &str, limit: u32) -> u32 {
    let costs = costs(&wat::parse_str(wat).unwrap()).unwrap();
    (limit - costs[3]) / costs[costs.len() - 1]
}

#[test]
fn unbounded_recursion_hits_the_stack_limit_at_the_same_depth() {
    let wat = recursion_module();
    for limit in [MAX_STACK_UNITS, 1000] {
        let limits = Limits {
            stack_units: limit,
            ..small_limits()
        };
        let expected = expected_depth(&wat, limit);
        for _ in 0..3 {
            let (err, left, depth) = on_guest_thread({
                let (wat, limits) = (wat.clone(), limits.clone());
                move || {
                    let mut inst = instance_of(&wat, &limits);
                    let err = inst.apply(b"").unwrap_err();
                    let left = inst.stack_units_left();
                    // The host resets the counter, so the poisoned instance can still report.
                    let depth = inst.apply(b"?").unwrap();
                    (err, left, depth)
                }
            });
            assert_eq!(err, CallError::StackLimit { limit });
            assert!(err.poisons_instance());
            assert!(err.to_string().contains("recursion too deep"), "{err}");
            assert_eq!(left, EXHAUSTED, "the bound tripped, not the native guard");
            let depth = u32::from_le_bytes(depth.try_into().unwrap());
            assert_eq!(depth, expected, "limit {limit}");
        }
    }
    // Pinned: a change here changes where replicas trap, and must come with a new ENGINE.
    assert_eq!(expected_depth(&wat, MAX_STACK_UNITS), 9361);
}

/// Recursive functions whose frames are as large as a unit of cost allows, in every way we
/// know: many values live across a call (locals, operand stack, i64, v128, references), many
/// parameters and results (stack arguments and return areas), long chains of spilled values,
/// and a huge count of declared locals. In each, `$entry` starts it and the module's last
/// function is the one that recurses; `$d` counts frames.
fn frame_shapes() -> Vec<(String, String)> {
    const DEPTH: &str = "(global.set $d (i32.add (global.get $d) (i32.const 1)))";
    let simple_entry = "(func $entry (call $rec))";
    let mut shapes = vec![(
        "minimal".to_string(),
        format!("{simple_entry} (func $rec {DEPTH} (call $rec))"),
    )];
    // Loads cannot move across a call, so their values are live across it.
    for (ty, n, size) in [("i64", 1000, 8), ("v128", 500, 16)] {
        let load = |i: usize| format!("({ty}.load offset={} (i32.const 0))", size * i);
        let locals: String = (0..n)
            .map(|i| format!("(local.set {i} {})", load(i)))
            .collect();
        let keep: String = (0..n)
            .map(|i| {
                format!(
                    "({ty}.store offset={} (i32.const 0) (local.get {i}))",
                    size * i
                )
            })
            .collect();
        shapes.push((
            format!("{n} {ty} locals live across a call"),
            format!(
                "{simple_entry} (func $rec (local {}) {DEPTH} {locals} (call $rec) {keep})",
                format!("{ty} ").repeat(n)
            ),
        ));
        let push: String = (0..n).map(|i| format!(" {}", load(i))).collect();
        let pop: String = (0..n)
            .map(|i| format!(" local.set 0 i32.const {} local.get 0 {ty}.store", size * i))
            .collect();
        shapes.push((
            format!("{n} {ty} operands live across a call"),
            format!("{simple_entry} (func $rec (local {ty}) {DEPTH} {push} call $rec {pop})"),
        ));
    }
    for ty in ["externref", "funcref"] {
        let n = 1000;
        let get: String = (0..n)
            .map(|i| format!("(local.set {i} (table.get $t (i32.const {})))", i % 10))
            .collect();
        let set: String = (0..n)
            .map(|i| format!("(table.set $t (i32.const {}) (local.get {i}))", i % 10))
            .collect();
        shapes.push((
            format!("{n} {ty} locals live across a call"),
            format!(
                "(table $t 10 {ty}) {simple_entry} \
                 (func $rec (local {}) {DEPTH} {get} (call $rec) {set})",
                format!("{ty} ").repeat(n)
            ),
        ));
    }
    for (ty, value) in [("i64", "i64.const 7"), ("v128", "v128.const i64x2 7 7")] {
        let n = 1000;
        let types = format!("{ty} ").repeat(n);
        let args: String = (0..n).map(|i| format!(" local.get {i}")).collect();
        let consts = format!(" {value}").repeat(n);
        shapes.push((
            format!("{n} {ty} parameters"),
            format!(
                "(func $entry {consts} call $rec) (func $rec (param {types}) {DEPTH} {args} call $rec)"
            ),
        ));
    }
    let n = 1000;
    let v128s = "v128 ".repeat(n);
    let drops = "drop ".repeat(n);
    let consts = " v128.const i64x2 7 7".repeat(n);
    let args: String = (0..n).map(|i| format!(" local.get {i}")).collect();
    shapes.push((
        format!("{n} v128 results"),
        format!("(func $entry call $rec {drops}) (func $rec (result {v128s}) {DEPTH} call $rec)"),
    ));
    shapes.push((
        format!("{n} v128 parameters passed on as results"),
        format!(
            "(func $entry {consts} call $rec {drops}) \
             (func $rec (param {v128s}) (result {v128s}) {DEPTH} {args} call $rec)"
        ),
    ));
    // Values each live across two calls, overlapping their neighbours, beside long-lived ones:
    // the pattern that could make the register allocator use more spill slots than values.
    let (k, w, steps) = (10, 16, 200);
    let mut body = String::new();
    for i in 0..k + w {
        body += &format!("(local.set {i} (i64.load offset={} (i32.const 0)))", 8 * i);
    }
    for step in 0..steps {
        for j in 0..w {
            let at = 8 * ((step * w + j) % 1000);
            body += &format!(
                "(local.set {} (i64.load offset={at} (i32.const 0)))",
                k + w + j
            );
        }
        body += "(call $nop)";
        for j in 0..w {
            let at = 32000 + 8 * ((step * w + j) % 1000);
            body += &format!(
                "(i64.store offset={at} (i32.const 0) (local.get {}))",
                k + j
            );
            body += &format!("(local.set {} (local.get {}))", k + j, k + w + j);
        }
    }
    let keep: String = (0..k)
        .map(|i| {
            format!(
                "(i64.store offset={} (i32.const 0) (local.get {i}))",
                16000 + 8 * i
            )
        })
        .collect();
    shapes.push((
        "chains of spilled values".to_string(),
        format!(
            "(func $nop) {simple_entry} (func $rec (local {}) {DEPTH} {body} (call $rec) {keep})",
            "i64 ".repeat(k + 2 * w)
        ),
    ));
    // The most locals a function may declare (wasmparser's limit is 50 000).
    shapes.push((
        "49 000 declared locals".to_string(),
        format!(
            "{simple_entry} (func $rec (local {}) {DEPTH} (call $rec))",
            "v128 ".repeat(49_000)
        ),
    ));
    shapes
}

/// The native bytes each frame of a shape's recursion takes, measured with wasmtime alone (no
/// rewrite) as its native guard (8 MiB: run it on a 16 MiB thread) divided by the depth where
/// it trips; and the shape's cost.
fn measure(shape: &str) -> (f64, u32) {
    let wat = format!(
        "(module (memory 2) (global $d (export \"depth\") (mut i32) (i32.const 0)) {shape} \
         (export \"entry\" (func $entry)))"
    );
    let wasm = wat::parse_str(&wat).unwrap();
    let cost = *costs(&wasm).unwrap().last().unwrap();
    let native = 8 << 20;
    let mut config = crate::engine::config();
    config.max_wasm_stack(native).async_stack_size(native);
    let engine = wasmtime::Engine::new(&config).unwrap();
    let module = wasmtime::Module::new(&engine, &wasm).unwrap();
    let mut store = wasmtime::Store::new(&engine, ());
    store.set_fuel(u64::MAX).unwrap();
    let instance = wasmtime::Instance::new(&mut store, &module, &[]).unwrap();
    let entry = instance
        .get_typed_func::<(), ()>(&mut store, "entry")
        .unwrap();
    let trap = entry.call(&mut store, ()).unwrap_err();
    assert!(
        matches!(
            trap.downcast_ref::<wasmtime::Trap>(),
            Some(wasmtime::Trap::StackOverflow)
        ),
        "{trap:?}"
    );
    let depth = instance
        .get_global(&mut store, "depth")
        .unwrap()
        .get(&mut store)
        .i32()
        .unwrap();
    (native as f64 / f64::from(depth), cost)
}

#[test]
fn frames_stay_within_half_the_budget() {
    // The margin that makes the unit bound trip before wasmtime's native guard; see
    // STACK_UNIT_BYTES. A wasmtime upgrade that grows frames fails here first.
    let measured = std::thread::Builder::new()
        .stack_size(16 << 20)
        .spawn(|| {
            let mut report = Vec::new();
            for (name, shape) in frame_shapes() {
                let (bytes, cost) = measure(&shape);
                report.push((name, bytes, cost));
            }
            report
        })
        .unwrap()
        .join()
        .unwrap();
    for (name, bytes, cost) in &measured {
        let per_unit = bytes / f64::from(*cost);
        println!("{name}: {bytes:.0} bytes per frame, cost {cost}, {per_unit:.2} bytes per unit");
        assert!(
            per_unit <= (STACK_UNIT_BYTES / 2) as f64,
            "{name}: {per_unit:.2} bytes per unit, over half the budget of {STACK_UNIT_BYTES}"
        );
    }
}

#[test]
fn every_frame_shape_hits_the_stack_limit_not_the_native_guard() {
    on_guest_thread(|| {
        for (name, shape) in frame_shapes() {
            let wat = abi_module(
                "(call $entry) (i64.const 0)",
                &format!("(global $d (mut i32) (i32.const 0)) {shape}"),
            );
            let limits = Limits {
                fuel_per_call: u64::MAX,
                ..Limits::default()
            };
            let mut inst = instance_of(&wat, &limits);
            let err = inst.apply(b"").unwrap_err();
            assert_eq!(
                err,
                CallError::StackLimit {
                    limit: MAX_STACK_UNITS
                },
                "{name}"
            );
            assert_eq!(inst.stack_units_left(), EXHAUSTED, "{name}");
        }
    });
}

#[test]
fn a_native_overflow_is_reported_as_the_stack_limit() {
    // Only a misconfigured engine lets the native guard trip first, and then only where the
    // bound would trip anyway; either way the error is the same.
    let limits = small_limits();
    let rt = Runtime::with_max_wasm_stack(64 * 1024).unwrap();
    let module = rt.compile_wat(&recursion_module(), &limits).unwrap();
    let mut inst = rt.instantiate(&module, &limits).unwrap();
    let err = inst.apply(b"").unwrap_err();
    assert_eq!(
        err,
        CallError::StackLimit {
            limit: limits.stack_units
        }
    );
    assert_ne!(inst.stack_units_left(), EXHAUSTED);
}

#[test]
fn recursion_in_the_start_function_is_the_stack_limit() {
    let wat = abi_module(
        ECHO,
        &format!("(func $rec {COUNT_FRAME} (call $rec)) (start $rec)"),
    );
    let limits = small_limits();
    let rt = Runtime::new().unwrap();
    let module = rt.compile_wat(&wat, &limits).unwrap();
    let err = on_guest_thread(move || rt.instantiate(&module, &limits).err().unwrap());
    assert!(
        matches!(&err, WasmError::Instantiate(m) if m.contains("recursion too deep")),
        "{err}"
    );
}

#[test]
fn a_limit_beyond_the_native_stack_is_refused() {
    let limits = Limits {
        stack_units: MAX_STACK_UNITS + 1,
        ..small_limits()
    };
    let rt = Runtime::new().unwrap();
    let module = rt.compile_wat(&abi_module(ECHO, ""), &limits).unwrap();
    let err = rt.instantiate(&module, &limits).err().unwrap();
    assert!(matches!(err, WasmError::Engine(_)), "{err}");
}

/// Every way out of a function: falling off the end, `return` from nested blocks, `br`,
/// `br_if` and `br_table` to the function's own label, each with several results.
const EXITS: &str = r#"
  (func $fall (param $k i32) (result i32 i64) (local.get $k) (i64.const 1))
  (func $ret (param $k i32) (result i32 i64)
    (block (block (if (local.get $k) (then (return (i32.const 2) (i64.const 3))))))
    (i32.const 4) (i64.const 5))
  (func $br (param $k i32) (result i32 i64)
    (block (br_if 1 (i32.const 6) (i64.const 7) (local.get $k)) (drop) (drop))
    (i32.const 8) (i64.const 9))
  (func $top (result i32 i64) (i32.const 10) (i64.const 11) (br 0))
  (func $table (param $k i32) (result i32)
    (block $x (result i32) (br_table $x 1 $x (i32.const 12) (local.get $k)))
    (i32.const 100) (i32.add))
  (func $sum (param $n i32) (result i32)
    (if (result i32) (local.get $n)
      (then (i32.add (local.get $n) (call $sum (i32.sub (local.get $n) (i32.const 1)))))
      (else (return (i32.const 0)))))
  (func $fold (param i32 i64)
    (global.set $acc (i64.add (i64.mul (global.get $acc) (i64.const 31))
      (i64.add (i64.extend_i32_u (local.get 0)) (local.get 1)))))
  (func $all (param $k i32)
    (call $fold (call $fall (local.get $k)))
    (call $fold (call $ret (local.get $k)))
    (call $fold (call $br (local.get $k)))
    (call $fold (call $top))
    (call $fold (call $table (local.get $k)) (i64.const 0))
    (call $fold (call $sum (i32.const 50)) (i64.const 0)))
  (global $acc (mut i64) (i64.const 0))
"#;

#[test]
fn every_exit_gives_its_units_back() {
    // 10 000 rounds of every exit on a budget that fits one call chain: a single leaked unit
    // per call would run it dry.
    let apply = "(local $i i32) \
        (loop $l (call $all (i32.rem_u (local.get $i) (i32.const 3))) \
          (br_if $l (i32.lt_u (local.tee $i (i32.add (local.get $i) (i32.const 1))) \
                              (i32.const 10000)))) \
        (i64.store (i32.const 1024) (global.get $acc)) \
        (call $echo (i32.const 0) (i32.const 8))";
    let wat = abi_module(apply, EXITS);
    let wasm = wat::parse_str(&wat).unwrap();
    let deepest: u32 = costs(&wasm).unwrap().iter().max().copied().unwrap();
    let limits = Limits {
        stack_units: 60 * deepest,
        fuel_per_call: u64::MAX,
        ..small_limits()
    };
    let mut inst = instance_of(&wat, &limits);
    let out = inst.apply(b"").unwrap();
    assert_eq!(inst.stack_units_left(), limits.stack_units as i32);
    assert_eq!(out, run_uninstrumented(&wat, 1));
}

/// A module using what rustc emits for wasm32-unknown-unknown besides the MVP: multi-value
/// (functions, blocks with parameters), reference types (funcref and externref tables,
/// `call_indirect` through several tables, `table.grow`, element segments), bulk memory
/// (passive segments, `memory.init/copy/fill`, `data.drop`), sign extension, saturating
/// float-to-int, mutable and exported globals, SIMD, a name section and a start function.
/// `wraft_apply` folds one result of each into the output.
fn features_module() -> String {
    let apply = r#"
      (local $v v128)
      (call $all (i32.const 1))
      (call $all (i32.const 0))
      (call $fold (call_indirect $funcs (type $i_i) (i32.const 21) (i32.const 0)) (i64.const 0))
      (call $fold (call_indirect $funcs (type $pair) (i32.const -3) (i32.const 1)))
      (call $fold (table.grow $funcs (ref.func $double) (i32.const 2)) (i64.const 0))
      (call $fold (table.size $funcs) (i64.const 0))
      (call $fold (call_indirect $funcs (type $i_i) (i32.const 5) (i32.const 3)) (i64.const 0))
      (call $fold (call_indirect $funcs (type $i_i) (i32.const 5) (i32.const 5)) (i64.const 0))
      (call $fold (call_indirect $more (type $i_i) (i32.const 4) (i32.const 0)) (i64.const 0))
      (table.set $ext (i32.const 1) (ref.null extern))
      (call $fold (ref.is_null (table.get $ext (i32.const 1))) (i64.const 0))
      (call $fold (table.size $ext) (i64.extend_i32_s (ref.is_null (ref.func $double))))
      (memory.copy (i32.const 2056) (i32.const 2048) (i32.const 8))
      (memory.fill (i32.const 2064) (i32.const 0xab) (i32.const 4))
      (call $fold (i32.load (i32.const 2064)) (i64.load (i32.const 2052)))
      (call $fold (i32.extend8_s (i32.const 0x80)) (i64.extend32_s (i64.const 0x80000000)))
      (call $fold (i32.trunc_sat_f64_s (f64.const 1e20)) (i64.trunc_sat_f32_u (f32.const -5)))
      (local.set $v (i32x4.add (v128.const i32x4 1 2 3 4) (i32x4.splat (global.get $base))))
      (call $fold (i32x4.extract_lane 2 (local.get $v)) (i64x2.extract_lane 1 (local.get $v)))
      i32.const 41 (block (param i32) (result i32) (i32.add (i32.const 1))) i64.const 0 call $fold
      (call $fold (global.get $started) (select (result i64) (i64.const 1) (i64.const 2) (local.get $len)))
      (global.set $exported (i64.add (global.get $exported) (global.get $acc)))
      (call $fold (i32.const 0) (global.get $exported))
      (i64.store (i32.const 1024) (global.get $acc))
      (call $echo (i32.const 0) (i32.const 8))
    "#;
    let extra = format!(
        r#"
      (type $i_i (func (param i32) (result i32)))
      (type $pair (func (param i32) (result i32 i64)))
      (table $funcs 4 funcref)
      (table $ext 2 externref)
      (table $more 1 funcref)
      (elem (table $funcs) (i32.const 0) func $double $pair_of)
      (elem (table $more) (i32.const 0) func $double)
      (elem $passive func $double)
      (data $bytes "\01\02\03\04\05\06\07\08")
      (global $base i32 (i32.const 7))
      (global $exported (export "exported") (mut i64) (i64.const 5))
      (global $started (mut i32) (i32.const 0))
      (func $double (type $i_i) (i32.shl (local.get 0) (i32.const 1)))
      (func $pair_of (type $pair) (local.get 0) (i64.extend_i32_s (local.get 0)))
      (func $init
        (global.set $started (i32.const 1))
        (table.init $funcs $passive (i32.const 3) (i32.const 0) (i32.const 1))
        (elem.drop $passive)
        (memory.init $bytes (i32.const 2048) (i32.const 0) (i32.const 8))
        (data.drop $bytes))
      (start $init)
      {EXITS}"#
    );
    abi_module(apply, &extra)
}

/// Runs `wraft_apply` of `wat` `calls` times with empty input on wasmtime alone, with the
/// engine's configuration but without the rewrite; returns the last payload.
fn run_uninstrumented(wat: &str, calls: usize) -> Vec<u8> {
    let engine = wasmtime::Engine::new(&crate::engine::config()).unwrap();
    let module = wasmtime::Module::new(&engine, wat).unwrap();
    let mut store = wasmtime::Store::new(&engine, ());
    store.set_fuel(u64::MAX).unwrap();
    let instance = wasmtime::Instance::new(&mut store, &module, &[]).unwrap();
    let apply = instance
        .get_typed_func::<(i32, i32), i64>(&mut store, "wraft_apply")
        .unwrap();
    let mut packed = 0;
    for _ in 0..calls {
        packed = apply.call(&mut store, (1024, 0)).unwrap() as u64;
    }
    let (ptr, len) = ((packed >> 32) as usize, (packed & 0xffff_ffff) as usize);
    let memory = instance.get_memory(&mut store, "memory").unwrap();
    let result = memory.data(&store)[ptr..ptr + len].to_vec();
    assert_eq!(result[0], 0, "status");
    result[1..].to_vec()
}

#[test]
fn features_rustc_emits_survive_the_rewrite() {
    let wat = features_module();
    let limits = Limits {
        fuel_per_call: u64::MAX,
        ..small_limits()
    };
    let mut inst = instance_of(&wat, &limits);
    let out = inst.apply(b"").unwrap();
    assert_eq!(out, run_uninstrumented(&wat, 1));
    assert_ne!(out, [0; 8]);
    // Again: the module's state (globals, tables) moved on identically.
    assert_eq!(inst.apply(b"").unwrap(), run_uninstrumented(&wat, 2));
}

#[test]
fn rewritten_module_keeps_exports_and_names() {
    let mut wasm = wat::parse_str(features_module()).unwrap();
    // A custom section that is not a name section, and one that claims to be but is garbage.
    wasm.extend_from_slice(&[0, 8, 7]);
    wasm.extend_from_slice(b"wraft-x");
    wasm.extend_from_slice(&[0, 7, 4]);
    wasm.extend_from_slice(b"name");
    wasm.extend_from_slice(&[0xff, 0xff]);
    let out = super::instrument(&wasm).unwrap();
    wasmparser::Validator::new().validate_all(&out).unwrap();
    let mut customs = Vec::new();
    let mut global_names = Vec::new();
    for payload in wasmparser::Parser::new(0).parse_all(&out) {
        match payload.unwrap() {
            wasmparser::Payload::ExportSection(exports) => {
                let exported = exports
                    .into_iter()
                    .map(|e| e.unwrap())
                    .find(|e| e.name == "exported")
                    .unwrap();
                // Globals shift by one behind the imported counter: `$exported` was global 1.
                assert_eq!(exported.kind, wasmparser::ExternalKind::Global);
                assert_eq!(exported.index, 2);
            }
            wasmparser::Payload::CustomSection(section) => {
                customs.push(section.name().to_string());
                if let wasmparser::KnownCustom::Name(names) = section.as_known() {
                    for name in names {
                        if let wasmparser::Name::Global(map) = name.unwrap() {
                            for naming in map {
                                let naming = naming.unwrap();
                                global_names.push((naming.index, naming.name.to_string()));
                            }
                        }
                    }
                }
            }
            _ => {}
        }
    }
    // The good name section survives (with shifted global indices); the garbage one and
    // other custom sections go.
    assert_eq!(customs, ["name"]);
    assert!(
        global_names.contains(&(2, "exported".to_string())),
        "{global_names:?}"
    );
}

#[test]
fn real_plugins_run_rewritten_and_balance_the_counter() {
    for name in ["kv", "counter", "bank"] {
        let Some(wasm) = built_plugin(name) else {
            continue;
        };
        let limits = Limits::default();
        let rt = Runtime::new().unwrap();
        let module = rt.compile(&wasm, &limits).unwrap();
        let mut inst = rt.instantiate(&module, &limits).unwrap();
        // Whatever the command means to this plugin, the call returns normally (an answer
        // or the plugin's own rejection) and gives every unit back.
        for command in [&br#"{"op":"get","key":"a"}"#[..], b"{", b""] {
            match inst.apply(command) {
                Ok(_) | Err(CallError::Rejected(_)) => {}
                Err(other) => panic!("{name}: {other:?}"),
            }
            assert_eq!(inst.stack_units_left(), MAX_STACK_UNITS as i32, "{name}");
        }
        let snapshot = inst.snapshot().unwrap();
        inst.restore(&snapshot).unwrap();
        assert_eq!(inst.stack_units_left(), MAX_STACK_UNITS as i32, "{name}");
    }
}

#[test]
fn engine_names_the_rewrite_version() {
    // The rewrite decides where calls trap and how much fuel they burn: replicas must agree.
    assert!(
        crate::ENGINE.contains(&format!("; stack-units v{};", super::VERSION)),
        "{}",
        crate::ENGINE
    );
}
