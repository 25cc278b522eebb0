//! What the fuzz targets share: the runtime, running guest code on a thread with enough stack,
//! and the checks every call into a module must pass.
//!
//! The checks are the sandbox's promises: a call returns `Ok` or a [`CallError`] (never a
//! panic), the limit an error names is the one the call ran under, a result never exceeds its
//! cap, memory never grows past [`Limits::memory_bytes`], and two instances of one module fed
//! the same calls give the same results (replicas must agree).

use std::sync::OnceLock;

use arbitrary::Arbitrary;
use wraft_sandbox::{
    CallError, Instance, Limits, Module, Runtime, WasmError, GUEST_THREAD_STACK_BYTES,
};

/// One runtime per process: creating the engine is the expensive part.
pub fn runtime() -> &'static Runtime {
    static RUNTIME: OnceLock<Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| match Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => panic!("cannot create the Wasm runtime: {e}"),
    })
}

/// Runs `f` on a thread with [`GUEST_THREAD_STACK_BYTES`] of stack, as the node runs guest
/// code; a panic in it is a panic here (libFuzzer's hook aborts on it anyway).
pub fn on_guest_thread<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|scope| {
        let thread = std::thread::Builder::new()
            .name("guest".into())
            .stack_size(GUEST_THREAD_STACK_BYTES)
            .spawn_scoped(scope, f);
        match thread {
            Ok(handle) => match handle.join() {
                Ok(value) => value,
                Err(panic) => std::panic::resume_unwind(panic),
            },
            Err(e) => panic!("cannot spawn the guest thread: {e}"),
        }
    })
}

/// One call into an instance.
#[derive(Arbitrary, Clone, Debug)]
pub enum Call {
    Apply(Input),
    Query(Input),
    Snapshot,
    Restore(Input),
}

/// A call's input: a few bytes, or a long run of them (past the memory the module has, or
/// past the memory limit).
#[derive(Arbitrary, Clone, Debug)]
pub enum Input {
    Bytes(Vec<u8>),
    Long { len: u32, byte: u8 },
}

impl Input {
    pub fn bytes(&self) -> Vec<u8> {
        match self {
            Input::Bytes(bytes) => bytes.clone(),
            // Up to 2 MiB: past every memory limit the targets use.
            Input::Long { len, byte } => vec![*byte; (*len % (2 << 20)) as usize],
        }
    }
}

/// What one call did: its result and the instance's memory size after it.
pub type Outcome = (Result<Vec<u8>, CallError>, u64);

/// Makes `call`, checks its result against `limits` and returns it.
pub fn call(instance: &mut Instance, call: &Call, limits: &Limits) -> Outcome {
    let (result, fuel, max_result) = match call {
        Call::Apply(input) => (
            instance.apply(&input.bytes()),
            limits.fuel_per_call,
            limits.max_result_bytes,
        ),
        Call::Query(input) => (
            instance.query(&input.bytes()),
            limits.fuel_per_call,
            limits.max_result_bytes,
        ),
        Call::Snapshot => (
            instance.snapshot(),
            limits.fuel_per_snapshot,
            limits.memory_bytes,
        ),
        Call::Restore(input) => (
            instance.restore(&input.bytes()).map(|()| Vec::new()),
            limits.fuel_per_snapshot,
            limits.max_result_bytes,
        ),
    };
    match &result {
        Ok(payload) => assert!(
            payload.len() as u64 <= max_result,
            "{call:?} returned {} bytes, over its cap of {max_result}",
            payload.len()
        ),
        Err(CallError::OutOfFuel { limit }) => assert_eq!(*limit, fuel, "{call:?}"),
        Err(CallError::MemoryLimit { limit }) => {
            assert_eq!(*limit, limits.memory_bytes, "{call:?}")
        }
        Err(CallError::ResultTooLarge { len, limit }) => {
            assert_eq!(*limit, max_result, "{call:?}");
            assert!(len > limit, "{call:?}: {len} bytes is within {limit}");
        }
        Err(CallError::StackLimit { limit }) => assert_eq!(*limit, limits.stack_units, "{call:?}"),
        Err(CallError::Rejected(_) | CallError::Trap(_) | CallError::BadAbi(_)) => {}
    }
    let memory = instance.memory_bytes();
    assert!(
        memory <= limits.memory_bytes,
        "{call:?} left {memory} bytes of memory, over the limit of {}",
        limits.memory_bytes
    );
    (result, memory)
}

/// Instantiates `module` twice and makes every call on both instances (going on after errors,
/// as a careless host would), checking each result and that both instances agree.
pub fn exercise(module: &Module, limits: &Limits, calls: &[Call]) {
    let rt = runtime();
    let (a, b) = (
        rt.instantiate(module, limits),
        rt.instantiate(module, limits),
    );
    let (mut a, mut b) = match (a, b) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(a), Err(b)) => {
            assert_eq!(
                a.to_string(),
                b.to_string(),
                "instantiation is not deterministic"
            );
            return;
        }
        (a, b) => panic!(
            "instantiation is not deterministic: {:?} then {:?}",
            a.err().map(|e| e.to_string()),
            b.err().map(|e| e.to_string())
        ),
    };
    for instance in [&a, &b] {
        assert!(
            instance.memory_bytes() <= limits.memory_bytes,
            "a fresh instance has {} bytes of memory, over the limit of {}",
            instance.memory_bytes(),
            limits.memory_bytes
        );
    }
    for c in calls {
        let first = call(&mut a, c, limits);
        let second = call(&mut b, c, limits);
        assert_eq!(first, second, "{c:?} is not deterministic");
    }
}

/// A compile error that is a bug in the sandbox rather than in the module: the engine accepted
/// the module and then the stack-bound rewrite failed on it (or produced an invalid module).
pub fn check_compile_error(error: &WasmError) {
    if let WasmError::Invalid(message) = error {
        assert!(
            !message.starts_with("cannot add the stack bound")
                && !message.starts_with("module is invalid once the stack bound is added"),
            "the engine accepted the module but the stack-bound rewrite broke it: {message}"
        );
    }
}

/// Valid modules with the ABI's exports, generated by wasm-smith.
pub mod smith {
    use std::sync::OnceLock;

    use arbitrary::Unstructured;

    /// The ABI's exports (names and types, as `Runtime::compile` checks them), for wasm-smith
    /// to give every generated module.
    const ABI_EXPORTS: &str = r#"(module
        (memory (export "memory") 1)
        (func (export "wraft_abi_v1"))
        (func (export "wraft_alloc") (param i32) (result i32) unreachable)
        (func (export "wraft_apply") (param i32 i32) (result i64) unreachable)
        (func (export "wraft_query") (param i32 i32) (result i64) unreachable)
        (func (export "wraft_snapshot") (result i64) unreachable)
        (func (export "wraft_restore") (param i32 i32) (result i64) unreachable)
        (func (export "wraft_panic_message") (result i64) unreachable))"#;

    fn abi_exports() -> &'static [u8] {
        static EXPORTS: OnceLock<Vec<u8>> = OnceLock::new();
        EXPORTS.get_or_init(|| match wat::parse_str(ABI_EXPORTS) {
            Ok(wasm) => wasm,
            Err(e) => panic!("the ABI exports module does not parse: {e}"),
        })
    }

    /// A valid module using only the features the engine accepts (see the sandbox's crate
    /// docs), exporting the ABI, with random code; `None` when the bytes run out first.
    pub fn abi_module(seed: &[u8]) -> Option<Vec<u8>> {
        let mut u = Unstructured::new(seed);
        let config = wasm_smith::Config {
            exports: Some(abi_exports().to_vec()),
            max_imports: 0,
            max_memories: 1,
            max_memory32_bytes: 4 << 20,
            max_tables: 2,
            max_funcs: 20,
            max_instructions: 200,
            max_table_elements: 1000,
            max_data_segments: 4,
            max_element_segments: 4,
            // What the engine accepts: the MVP, mutable globals, sign extension, saturating
            // conversions, bulk memory, multi-value, reference types and SIMD.
            bulk_memory_enabled: true,
            multi_value_enabled: true,
            reference_types_enabled: true,
            saturating_float_to_int_enabled: true,
            sign_extension_ops_enabled: true,
            simd_enabled: u.arbitrary().ok()?,
            relaxed_simd_enabled: false,
            threads_enabled: false,
            shared_everything_threads_enabled: false,
            memory64_enabled: false,
            custom_page_sizes_enabled: false,
            wide_arithmetic_enabled: false,
            tail_call_enabled: false,
            extended_const_enabled: false,
            gc_enabled: false,
            custom_descriptors_enabled: false,
            exceptions_enabled: false,
            ..wasm_smith::Config::default()
        };
        wasm_smith::Module::new(config, &mut u)
            .ok()
            .map(|module| module.to_bytes())
    }
}
