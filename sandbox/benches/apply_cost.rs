//! Cost of one applied entry: the kv plugin in Wasm through the sandbox against the same kv
//! code called natively (issue 3 "Measure", issue 6 "apply cost Wasm vs native").
//!
//! Both sides run the same `Kv` (`plugins/kv`): in Wasm, the release `kv.wasm` that
//! `scripts/build-plugins.sh` builds, called through [`Instance`] exactly as the apply stage
//! calls it (one instance kept across calls, fresh fuel and stack units per call, `alloc` +
//! input copy + `apply` + result copy), under [`Limits::default`], the limits the node uses;
//! natively, `<Kv as StateMachine>::apply`/`query` on a `Kv` value.
//!
//! The workload is the one of `wraft bench` and BENCHMARKS.md: `put`s of 256-byte values to
//! keys drawn at random among `k0`..`k999` (all present beforehand, so each put replaces a value
//! and its reply carries the previous 256 bytes), and `get`s of the same keys. Groups
//! `put/{wasm,native}/N` and `get/{wasm,native}/N` apply N commands back to back per
//! iteration; criterion's throughput line gives the per-entry figure (time / N). Two
//! diagnostics say where the Wasm time goes: `overhead/wasm_echo` is a hand-written module that
//! only echoes its input (the fixed cost of one call across the boundary: fuel, stack counter,
//! alloc call, input copy, result check and copy), and `overhead/instantiate` is a fresh
//! instance of kv (which the host does at deploy and recovery, never per entry). Fuel per entry
//! is printed before the timings.
//!
//! Run: `bash scripts/build-plugins.sh && cargo bench -p wraft-sandbox --bench apply_cost
//! --profile dev` (criterion options after `--`, e.g. `-- --measurement-time 20 put`).
//!
//! The clock is wall time, criterion's default. On a machine shared with other work, set
//! `APPLY_COST_CLOCK=cpu` to measure the bench thread's CPU time instead
//! (`CLOCK_THREAD_CPUTIME_ID`): time spent waiting for a core no longer counts, though caches
//! and the CPU's frequency still feel the neighbours. Those groups are named `cpu-put`,
//! `cpu-get` and `cpu-overhead`, so criterion never compares one clock with the other.
//! `APPLY_COST_KV_WASM=FILE` benches another build of kv.wasm (to compare builds, or to pin one
//! while others rebuild the plugins).

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::time::Duration;

use criterion::measurement::{Measurement, ValueFormatter, WallTime};
use criterion::{BenchmarkId, Criterion, Throughput};
use kv::Kv;
use wraft_guest_sdk::StateMachine;
use wraft_sandbox::{Instance, Limits, Module, Runtime, GUEST_THREAD_STACK_BYTES};

/// Keys `k0`..`k999`, as `wraft bench --keys 1000` (its default).
const KEYS: usize = 1000;
/// Value size, as `wraft bench --value-size 256` (its default).
const VALUE_BYTES: usize = 256;
/// Commands prepared per workload; iterations walk through them in a ring.
const RING: usize = 4096;
/// Commands applied back to back per iteration.
const BATCHES: [usize; 3] = [1, 16, 256];

/// The built kv module, found as `sandbox/src/tests.rs`'s `built_plugin` finds it, unless
/// `APPLY_COST_KV_WASM` names another file (to compare builds, or pin one while others rebuild).
fn kv_wasm() -> Vec<u8> {
    let rel = "wasm32-unknown-unknown/release/kv.wasm";
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(path) = std::env::var_os("APPLY_COST_KV_WASM") {
        candidates.push(path.into());
    }
    if let Ok(dir) = std::env::var("CARGO_TARGET_DIR") {
        candidates.push(Path::new(&dir).join(rel));
    }
    candidates.push(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../target")
            .join(rel),
    );
    candidates
        .iter()
        .find_map(|p| std::fs::read(p).ok())
        .unwrap_or_else(|| {
            panic!(
                "kv.wasm not built: run scripts/build-plugins.sh first (looked in {candidates:?})"
            )
        })
}

/// A deterministic xorshift, so every run (and both sides) sees the same key sequence.
struct Keys(u64);

impl Keys {
    fn next(&mut self) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % KEYS as u64) as usize
    }
}

/// A 256-byte value that differs with `n` (all printable ASCII, so JSON needs no escapes).
fn value(n: usize) -> String {
    let tag = format!("v{n}-");
    tag.chars()
        .chain(std::iter::repeat('x'))
        .take(VALUE_BYTES)
        .collect()
}

fn put(key: usize, n: usize) -> Vec<u8> {
    format!(r#"{{"op":"put","key":"k{key}","value":"{}"}}"#, value(n)).into_bytes()
}

fn get(key: usize) -> Vec<u8> {
    format!(r#"{{"op":"get","key":"k{key}"}}"#).into_bytes()
}

/// Every key written once, in order: the state both sides start from.
fn preload() -> Vec<Vec<u8>> {
    (0..KEYS).map(|k| put(k, k)).collect()
}

/// The commands the timed loops walk through.
fn workloads() -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
    let mut keys = Keys(0x9e37_79b9_7f4a_7c15);
    let puts = (0..RING).map(|n| put(keys.next(), KEYS + n)).collect();
    let gets = (0..RING).map(|_| get(keys.next())).collect();
    (puts, gets)
}

/// The kv module in the sandbox, preloaded.
fn wasm_kv(rt: &Runtime, module: &Module, limits: &Limits) -> Instance {
    let mut inst = rt.instantiate(module, limits).expect("instantiate kv");
    for cmd in preload() {
        inst.apply(&cmd).expect("preload (wasm)");
    }
    inst
}

/// The same kv code as a native value, preloaded.
fn native_kv() -> Kv {
    let mut kv = Kv::default();
    for cmd in preload() {
        kv.apply(&cmd).expect("preload (native)");
    }
    kv
}

/// A module that answers every call with its own input: the boundary cost alone.
fn echo_module(rt: &Runtime, limits: &Limits) -> Module {
    let wat = r#"(module
  (memory (export "memory") 2)
  (func (export "wraft_abi_v1"))
  (func (export "wraft_alloc") (param $len i32) (result i32) (i32.const 1024))
  (func $echo (param $len i32) (result i64)
    (i32.store8 (i32.const 1023) (i32.const 0))
    (i64.or (i64.shl (i64.const 1023) (i64.const 32))
            (i64.extend_i32_u (i32.add (local.get $len) (i32.const 1)))))
  (func (export "wraft_apply") (param $ptr i32) (param $len i32) (result i64)
    (call $echo (local.get $len)))
  (func (export "wraft_query") (param $ptr i32) (param $len i32) (result i64)
    (call $echo (local.get $len)))
  (func (export "wraft_snapshot") (result i64) (call $echo (i32.const 0)))
  (func (export "wraft_restore") (param $ptr i32) (param $len i32) (result i64)
    (call $echo (i32.const 0))))"#;
    let wasm = wat::parse_str(wat).expect("echo module parses");
    rt.compile(&wasm, limits).expect("echo module compiles")
}

/// Checks that both sides give the same replies to the workload, and prints the fuel one put
/// and one get cost in Wasm (min / mean / max over the ring).
fn check_and_report_fuel(rt: &Runtime, module: &Module, limits: &Limits, wasm: &[u8]) {
    let (puts, gets) = workloads();
    let mut inst = wasm_kv(rt, module, limits);
    let mut native = native_kv();
    println!(
        "kv.wasm: {} bytes, sha256 {}; limits: fuel_per_call {}, memory {} MiB",
        wasm.len(),
        module.hash_hex(),
        limits.fuel_per_call,
        limits.memory_bytes >> 20
    );
    for (what, cmds) in [("put", &puts), ("get", &gets)] {
        let (mut min, mut max, mut sum) = (u64::MAX, 0u64, 0u64);
        for cmd in cmds {
            let (w, n) = if what == "put" {
                (inst.apply(cmd), native.apply(cmd))
            } else {
                (inst.query(cmd), native.query(cmd))
            };
            assert_eq!(w.expect("wasm call"), n.expect("native call"), "{what}");
            let fuel = inst.fuel_used();
            (min, max, sum) = (min.min(fuel), max.max(fuel), sum + fuel);
        }
        let reply = cmds[0].len();
        println!(
            "fuel per {what} (command {reply} bytes): min {min}, mean {}, max {} over {} commands",
            sum / cmds.len() as u64,
            max,
            cmds.len()
        );
    }
    let mut echo = rt
        .instantiate(&echo_module(rt, limits), limits)
        .expect("instantiate echo");
    echo.apply(&puts[0]).expect("echo");
    println!("fuel per echo call: {}", echo.fuel_used());
}

/// The calling thread's CPU time: criterion runs every iteration on the thread that called it.
struct ThreadCpuTime;

fn thread_cpu_now() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; the call only writes it.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID) failed");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

impl Measurement for ThreadCpuTime {
    type Intermediate = Duration;
    type Value = Duration;

    fn start(&self) -> Duration {
        thread_cpu_now()
    }

    fn end(&self, started: Duration) -> Duration {
        thread_cpu_now().saturating_sub(started)
    }

    fn add(&self, a: &Duration, b: &Duration) -> Duration {
        *a + *b
    }

    fn zero(&self) -> Duration {
        Duration::ZERO
    }

    fn to_f64(&self, value: &Duration) -> f64 {
        value.as_nanos() as f64
    }

    fn formatter(&self) -> &dyn ValueFormatter {
        // Nanoseconds either way, so wall time's formatter prints them.
        static WALL: WallTime = WallTime;
        WALL.formatter()
    }
}

fn bench<M: Measurement>(c: &mut Criterion<M>, prefix: &str) {
    let limits = Limits::default();
    let rt = Runtime::new().expect("engine");
    let wasm = kv_wasm();
    let module = rt.compile(&wasm, &limits).expect("compile kv.wasm");
    check_and_report_fuel(&rt, &module, &limits, &wasm);
    let (puts, gets) = workloads();

    let mut group = c.benchmark_group(format!("{prefix}put"));
    for n in BATCHES {
        group.throughput(Throughput::Elements(n as u64));
        let mut inst = wasm_kv(&rt, &module, &limits);
        let mut at = 0;
        group.bench_with_input(BenchmarkId::new("wasm", n), &n, |b, &n| {
            b.iter(|| {
                for _ in 0..n {
                    black_box(inst.apply(&puts[at % RING]).expect("put (wasm)"));
                    at += 1;
                }
            })
        });
        let mut kv = native_kv();
        let mut at = 0;
        group.bench_with_input(BenchmarkId::new("native", n), &n, |b, &n| {
            b.iter(|| {
                for _ in 0..n {
                    black_box(kv.apply(black_box(&puts[at % RING])).expect("put (native)"));
                    at += 1;
                }
            })
        });
    }
    group.finish();

    let mut group = c.benchmark_group(format!("{prefix}get"));
    for n in [1, 256] {
        group.throughput(Throughput::Elements(n as u64));
        let mut inst = wasm_kv(&rt, &module, &limits);
        let mut at = 0;
        group.bench_with_input(BenchmarkId::new("wasm", n), &n, |b, &n| {
            b.iter(|| {
                for _ in 0..n {
                    black_box(inst.query(&gets[at % RING]).expect("get (wasm)"));
                    at += 1;
                }
            })
        });
        let kv = native_kv();
        let mut at = 0;
        group.bench_with_input(BenchmarkId::new("native", n), &n, |b, &n| {
            b.iter(|| {
                for _ in 0..n {
                    black_box(kv.query(black_box(&gets[at % RING])).expect("get (native)"));
                    at += 1;
                }
            })
        });
    }
    group.finish();

    let mut group = c.benchmark_group(format!("{prefix}overhead"));
    group.throughput(Throughput::Elements(1));
    let mut echo = rt
        .instantiate(&echo_module(&rt, &limits), &limits)
        .expect("instantiate echo");
    let mut at = 0;
    group.bench_function("wasm_echo", |b| {
        b.iter(|| {
            black_box(echo.apply(&puts[at % RING]).expect("echo"));
            at += 1;
        })
    });
    group.bench_function("instantiate", |b| {
        b.iter_with_large_drop(|| rt.instantiate(&module, &limits).expect("instantiate kv"))
    });
    group.finish();
}

fn main() {
    // Guest code needs its documented stack (see `GUEST_THREAD_STACK_BYTES`), as on the node's
    // apply thread; criterion runs on that thread too.
    let runner = std::thread::Builder::new()
        .name("apply-cost".into())
        .stack_size(GUEST_THREAD_STACK_BYTES)
        .spawn(|| {
            let clock = std::env::var("APPLY_COST_CLOCK").unwrap_or_default();
            let base = Criterion::default()
                .warm_up_time(Duration::from_secs(3))
                .measurement_time(Duration::from_secs(10));
            match clock.as_str() {
                "" | "wall" => {
                    let mut c = base.configure_from_args();
                    bench(&mut c, "");
                    c.final_summary();
                }
                "cpu" => {
                    let mut c = base.with_measurement(ThreadCpuTime).configure_from_args();
                    bench(&mut c, "cpu-");
                    c.final_summary();
                }
                other => panic!("APPLY_COST_CLOCK={other}: expected `wall` or `cpu`"),
            }
        })
        .expect("spawn the bench thread");
    runner.join().expect("bench thread panicked");
}
