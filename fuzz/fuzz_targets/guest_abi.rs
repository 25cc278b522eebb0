//! Hostile results from a valid module: the input describes a module that passes every ABI
//! check but whose `wraft_alloc`, `wraft_apply`, `wraft_query`, `wraft_snapshot`,
//! `wraft_restore` and `wraft_panic_message` return chosen pointers and lengths (in bounds, out
//! of bounds, straddling the end of memory, relative to the input or to the memory's end),
//! write chosen status bytes at chosen offsets, grow memory, trap, spin until the fuel runs out
//! or recurse until the stack bound trips. Under chosen limits, two instances get the same
//! calls: no panic, every result `Ok` or a `CallError` naming the limit the call ran under, no
//! result over its cap, memory never over its limit, both instances agreeing.

#![no_main]

use std::fmt::Write as _;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use wraft_fuzz::{check_compile_error, exercise, on_guest_thread, runtime, Call};
use wraft_sandbox::{Limits, MAX_STACK_UNITS};

/// Where a pointer points.
#[derive(Arbitrary, Debug)]
enum Ptr {
    Const(u32),
    /// The call's input pointer plus a delta (0 in functions without input).
    Input(i16),
    /// The end of memory plus a delta.
    End(i16),
}

/// How long a result claims to be.
#[derive(Arbitrary, Debug)]
enum Len {
    Const(u32),
    /// The call's input length plus a delta (0 in functions without input).
    Input(i16),
}

/// What an i64-returning export returns.
#[derive(Arbitrary, Debug)]
enum Ret {
    Raw(i64),
    Packed(Ptr, Len),
}

/// Something a function does before it returns.
#[derive(Arbitrary, Debug)]
enum Effect {
    /// Writes bytes at a place (the status byte of a result, or anywhere; out of bounds traps).
    Store(Ptr, Vec<u8>),
    /// `memory.grow` by this many pages (refused past the memory limit).
    Grow(u8),
    /// `memory.fill` from a place.
    Fill(Ptr, u8, u16),
    Trap,
    /// Loops until the fuel runs out.
    Spin,
    /// Recurses until the stack bound trips.
    Recurse,
}

/// One way a function behaves.
#[derive(Arbitrary, Debug)]
struct Behaviour<R> {
    effects: Vec<Effect>,
    ret: R,
}

/// What `wraft_alloc` returns.
#[derive(Arbitrary, Debug)]
enum AllocRet {
    Const(i32),
    /// The end of memory plus a delta (straddling it, or just inside).
    End(i16),
    /// The requested length as a pointer.
    Len,
}

/// An export: behaviours taken in turn, one per call (a counter global shared by every
/// export picks the next).
#[derive(Arbitrary, Debug)]
struct Export<R> {
    first: Behaviour<R>,
    more: Vec<Behaviour<R>>,
}

#[derive(Arbitrary, Debug)]
struct Spec {
    initial_pages: u8,
    max_pages: Option<u8>,
    start: Option<Vec<Effect>>,
    alloc: Export<AllocRet>,
    apply: Export<Ret>,
    query: Export<Ret>,
    snapshot: Export<Ret>,
    restore: Export<Ret>,
    panic_message: Option<Export<Ret>>,
    limits: LimitsChoice,
    calls: Vec<Call>,
}

#[derive(Arbitrary, Debug)]
struct LimitsChoice {
    fuel_per_call: u8,
    fuel_per_snapshot: u8,
    memory_pages: u8,
    max_result_bytes: u8,
    stack_units: u8,
}

impl LimitsChoice {
    fn limits(&self) -> Limits {
        let fuel = |f: u8| [0, 1, 50, 1_000, 100_000, 2_000_000][f as usize % 6];
        Limits {
            fuel_per_call: fuel(self.fuel_per_call),
            fuel_per_snapshot: fuel(self.fuel_per_snapshot),
            // Whole pages, and one limit that falls inside a page.
            memory_bytes: [0, 65536, 100_000, 131_072, 262_144][self.memory_pages as usize % 5],
            max_result_bytes: [0, 1, 16, 65536, u64::MAX][self.max_result_bytes as usize % 5],
            max_module_bytes: 1 << 20,
            stack_units: [0, 1, 8, 100, 4096, MAX_STACK_UNITS][self.stack_units as usize % 6],
        }
    }
}

/// The WAT of an i32 pointer expression. `input` is whether `$ptr`/`$len` exist.
fn ptr(p: &Ptr, input: bool) -> String {
    match p {
        Ptr::Const(c) => format!("(i32.const {})", *c as i32),
        Ptr::Input(d) if input => format!("(i32.add (local.get $ptr) (i32.const {d}))"),
        Ptr::Input(d) => format!("(i32.const {d})"),
        Ptr::End(d) => {
            format!("(i32.add (i32.mul (memory.size) (i32.const 65536)) (i32.const {d}))")
        }
    }
}

fn len(l: &Len, input: bool) -> String {
    match l {
        Len::Const(c) => format!("(i32.const {})", *c as i32),
        Len::Input(d) if input => format!("(i32.add (local.get $len) (i32.const {d}))"),
        Len::Input(d) => format!("(i32.const {d})"),
    }
}

fn ret(r: &Ret, input: bool) -> String {
    match r {
        Ret::Raw(v) => format!("(i64.const {v})"),
        Ret::Packed(p, l) => format!(
            "(i64.or (i64.shl (i64.extend_i32_u {}) (i64.const 32)) (i64.extend_i32_u {}))",
            ptr(p, input),
            len(l, input)
        ),
    }
}

fn alloc_ret(r: &AllocRet) -> String {
    match r {
        AllocRet::Const(c) => format!("(i32.const {c})"),
        AllocRet::End(d) => {
            format!("(i32.add (i32.mul (memory.size) (i32.const 65536)) (i32.const {d}))")
        }
        AllocRet::Len => "(local.get $len)".to_string(),
    }
}

fn effects(out: &mut String, effects: &[Effect], input: bool) {
    for e in effects.iter().take(6) {
        match e {
            Effect::Store(p, bytes) => {
                for (i, b) in bytes.iter().take(8).enumerate() {
                    let _ = write!(
                        out,
                        " (i32.store8 offset={i} {} (i32.const {b}))",
                        ptr(p, input)
                    );
                }
            }
            Effect::Grow(pages) => {
                let _ = write!(out, " (drop (memory.grow (i32.const {})))", pages % 8);
            }
            Effect::Fill(p, byte, n) => {
                let _ = write!(
                    out,
                    " (memory.fill {} (i32.const {byte}) (i32.const {n}))",
                    ptr(p, input)
                );
            }
            Effect::Trap => out.push_str(" (unreachable)"),
            Effect::Spin => out.push_str(" (call $spin)"),
            Effect::Recurse => out.push_str(" (drop (call $deep (i32.const 0)))"),
        }
    }
}

/// The body of an export: bump the shared counter, then the behaviour it selects.
fn body<R>(export: &Export<R>, input: bool, ret: impl Fn(&R) -> String) -> String {
    let all: Vec<&Behaviour<R>> = std::iter::once(&export.first)
        .chain(export.more.iter().take(3))
        .collect();
    let mut out = String::from("(global.set $calls (i32.add (global.get $calls) (i32.const 1)))");
    let (last, rest) = match all.split_last() {
        Some(split) => split,
        None => return out,
    };
    for (i, b) in rest.iter().enumerate() {
        let _ = write!(
            out,
            " (if (i32.eq (i32.rem_u (global.get $calls) (i32.const {})) (i32.const {i})) (then",
            all.len()
        );
        effects(&mut out, &b.effects, input);
        let _ = write!(out, " (return {})))", ret(&b.ret));
    }
    effects(&mut out, &last.effects, input);
    let _ = write!(out, " {}", ret(&last.ret));
    out
}

fn wat(spec: &Spec) -> String {
    let initial = spec.initial_pages % 6;
    let memory = match spec.max_pages {
        Some(max) => format!("{initial} {}", initial + max % 6),
        None => initial.to_string(),
    };
    let mut out = format!(
        r#"(module
  (memory (export "memory") {memory})
  (global $calls (mut i32) (i32.const 0))
  (func (export "wraft_abi_v1"))
  (func $spin (loop $l (br $l)))
  (func $deep (param $n i32) (result i32)
    (i32.add (call $deep (i32.add (local.get $n) (i32.const 1))) (i32.const 1)))
  (func (export "wraft_alloc") (param $len i32) (result i32) {})
  (func (export "wraft_apply") (param $ptr i32) (param $len i32) (result i64) {})
  (func (export "wraft_query") (param $ptr i32) (param $len i32) (result i64) {})
  (func (export "wraft_snapshot") (result i64) {})
  (func (export "wraft_restore") (param $ptr i32) (param $len i32) (result i64) {})
"#,
        body(&spec.alloc, false, alloc_ret),
        body(&spec.apply, true, |r| ret(r, true)),
        body(&spec.query, true, |r| ret(r, true)),
        body(&spec.snapshot, false, |r| ret(r, false)),
        body(&spec.restore, true, |r| ret(r, true)),
    );
    if let Some(export) = &spec.panic_message {
        let _ = writeln!(
            out,
            r#"  (func (export "wraft_panic_message") (result i64) {})"#,
            body(export, false, |r| ret(r, false))
        );
    }
    if let Some(start) = &spec.start {
        let mut code = String::new();
        effects(&mut code, start, false);
        let _ = writeln!(out, "  (func $start {code})\n  (start $start)");
    }
    out.push(')');
    out
}

fuzz_target!(|spec: Spec| {
    let source = wat(&spec);
    let wasm = match wat::parse_str(&source) {
        Ok(wasm) => wasm,
        Err(e) => panic!("the generator wrote invalid WAT: {e}\n{source}"),
    };
    let limits = spec.limits.limits();
    let calls: Vec<Call> = spec.calls.iter().take(8).cloned().collect();
    on_guest_thread(|| match runtime().compile(&wasm, &limits) {
        Ok(module) => exercise(&module, &limits, &calls),
        Err(e) => {
            check_compile_error(&e);
            // Every module generated here is valid and exports the ABI: only its initial
            // memory may be refused (over the limit).
            assert!(
                u64::from(spec.initial_pages % 6) * 65536 > limits.memory_bytes,
                "a valid ABI module was refused: {e}\n{source}"
            );
        }
    });
});
