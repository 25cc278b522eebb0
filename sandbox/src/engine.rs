//! The deterministic engine and module validation against the wraft ABI v1.
//!
//! Owns the one place where wasmtime is configured and the checks a module must pass before it
//! can be instantiated. Keeps true: a [`Module`] that exists was rewritten with the stack bound
//! (its only import is the stack counter), has a 32-bit non-shared `memory` that fits the
//! memory limit, and every ABI export with its exact signature, so instantiation and calls
//! never meet a missing or mistyped function.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use sha2::{Digest, Sha256};
use wasmtime::{Config, Engine, ExternType, FuncType, ValType};

use crate::cache::{Cache, CompileStats, Counters};
use crate::{host_api, stack, Instance, Limits, WasmError};

/// Wasm page size; custom page sizes are disabled, so it is always 64 KiB.
const PAGE_BYTES: u64 = 65536;

/// Native stack bytes budgeted for one stack unit (see [`crate::stack`] for what a unit
/// counts). A unit stands for one Wasm value, at most 16 bytes (a `v128`). On x86-64 the worst
/// frames measured by `stack::tests::frames_stay_within_half_the_budget` use 16 bytes per unit
/// (`v128` values everywhere), typical ones 8; the budget keeps a factor of four over the worst
/// (the test fails below two), for other CPUs' frame layouts and compiler changes.
pub const STACK_UNIT_BYTES: usize = 64;

/// The largest [`Limits::stack_units`] the engine accepts, and the default. Rust functions
/// cost 10 to 50 units (the example plugins: median 13, largest 48), so this allows a few
/// thousand nested calls.
pub const MAX_STACK_UNITS: u32 = 64 * 1024;

/// Native stack wasmtime lets Wasm frames use: the unit bound in bytes
/// ([`MAX_STACK_UNITS`] × [`STACK_UNIT_BYTES`] = 4 MiB) plus slack for the entry trampoline.
/// Frames within budget never reach it while units remain, so wasmtime's own guard, whose
/// depth depends on the CPU and the compiler, can only trip on entry to a function that costs
/// more units than remain: exactly where the unit bound trips too, and it is reported the same
/// way ([`crate::CallError::StackLimit`]). Set explicitly so that a wasmtime upgrade cannot
/// move it unnoticed.
const MAX_WASM_STACK: usize = MAX_STACK_UNITS as usize * STACK_UNIT_BYTES + 256 * 1024;

/// Native stack for host frames around guest code: the caller's own frames above the first
/// Wasm frame and wasmtime's libcalls (memory growth, the resource limiter, table
/// initialisation) below the last one, which wasmtime does not count in [`MAX_WASM_STACK`].
const HOST_STACK_RESERVE: usize = 2 << 20;

/// The stack a thread needs to run guest code (instantiate a module, or call into an
/// [`Instance`]): [`MAX_WASM_STACK`] plus room for host frames, 6.25 MiB. On a thread with less,
/// a hostile module can overflow the thread's stack and abort the process before any bound
/// trips.
pub const GUEST_THREAD_STACK_BYTES: usize = MAX_WASM_STACK + HOST_STACK_RESERVE;

/// A wasmtime engine configured for deterministic execution, optionally with an on-disk
/// cache of compiled modules. Cheap to clone; clones share the cache and the counters.
#[derive(Clone)]
pub struct Runtime {
    engine: Engine,
    cache: Option<Arc<Cache>>,
    counters: Arc<Counters>,
}

/// A validated, compiled module. Cheap to clone (wasmtime's module is reference-counted).
#[derive(Clone)]
pub struct Module {
    pub(super) inner: wasmtime::Module,
    pub(super) has_panic_message: bool,
    pub(super) has_migrate: bool,
    model: Model,
    hash: [u8; 32],
}

/// Where a module keeps its state (declared by the module; see the crate docs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Model {
    /// In linear memory: durable as `snapshot` checkpoints plus the log.
    #[default]
    Memory,
    /// In host storage only (the module exports `wraft_model_store`); every call runs on a
    /// fresh instance.
    Store,
}

/// How a function export must look.
struct FuncSig {
    name: &'static str,
    params: &'static [ValType],
    results: &'static [ValType],
    text: &'static str,
}

const REQUIRED: &[FuncSig] = &[
    FuncSig {
        name: "wraft_abi_v1",
        params: &[],
        results: &[],
        text: "() -> ()",
    },
    FuncSig {
        name: "wraft_alloc",
        params: &[ValType::I32],
        results: &[ValType::I32],
        text: "(i32) -> i32",
    },
    FuncSig {
        name: "wraft_apply",
        params: &[ValType::I32, ValType::I32],
        results: &[ValType::I64],
        text: "(i32, i32) -> i64",
    },
    FuncSig {
        name: "wraft_query",
        params: &[ValType::I32, ValType::I32],
        results: &[ValType::I64],
        text: "(i32, i32) -> i64",
    },
    FuncSig {
        name: "wraft_snapshot",
        params: &[],
        results: &[ValType::I64],
        text: "() -> i64",
    },
    FuncSig {
        name: "wraft_restore",
        params: &[ValType::I32, ValType::I32],
        results: &[ValType::I64],
        text: "(i32, i32) -> i64",
    },
];

const MODEL_STORE: FuncSig = FuncSig {
    name: "wraft_model_store",
    params: &[],
    results: &[],
    text: "() -> ()",
};

const MIGRATE: FuncSig = FuncSig {
    name: "wraft_migrate",
    params: &[ValType::I64],
    results: &[ValType::I64],
    text: "(i64) -> i64",
};

const PANIC_MESSAGE: FuncSig = FuncSig {
    name: "wraft_panic_message",
    params: &[],
    results: &[ValType::I64],
    text: "() -> i64",
};

impl Runtime {
    /// Creates the engine with the deterministic configuration (see the crate docs for the
    /// accepted Wasm features), without a compile cache.
    pub fn new() -> Result<Runtime, WasmError> {
        Ok(Runtime {
            engine: engine()?,
            cache: None,
            counters: Arc::default(),
        })
    }

    /// Like [`Runtime::new`], keeping compiled modules in `dir` (created if missing) so that
    /// a module compiled once, by this process or an earlier one, is loaded instead of
    /// compiled again. One runtime per directory.
    pub fn with_cache_dir(dir: impl Into<PathBuf>) -> Result<Runtime, WasmError> {
        Runtime::with_cache_dir_salted(dir.into(), "")
    }

    /// [`Runtime::with_cache_dir`] with `salt` mixed into the engine key; tests use it to play
    /// an engine whose artifacts this one must not load.
    pub(super) fn with_cache_dir_salted(dir: PathBuf, salt: &str) -> Result<Runtime, WasmError> {
        let engine = engine()?;
        let cache = Cache::open(dir, &engine, salt)?;
        Ok(Runtime {
            engine,
            cache: Some(Arc::new(cache)),
            counters: Arc::default(),
        })
    }

    /// A runtime whose native stack guard sits at `bytes`, below the unit bound: tests only,
    /// to make wasmtime's own guard trip first.
    #[cfg(test)]
    pub(super) fn with_max_wasm_stack(bytes: usize) -> Result<Runtime, WasmError> {
        let mut config = config();
        config.max_wasm_stack(bytes);
        Ok(Runtime {
            engine: Engine::new(&config).map_err(|e| WasmError::Engine(format!("{e:#}")))?,
            cache: None,
            counters: Arc::default(),
        })
    }

    /// Compilations and cache activity since this runtime (or the one it was cloned from) was
    /// created.
    pub fn stats(&self) -> CompileStats {
        self.counters.snapshot()
    }

    /// Validates and compiles a Wasm binary: size cap, parse and validate, no imports, the ABI
    /// exports with their exact signatures, and an initial memory within the limit. The module
    /// is compiled with the stack bound added (see [`crate::stack`]), or loaded from the cache
    /// when it was compiled before by the same engine.
    pub fn compile(&self, wasm: &[u8], limits: &Limits) -> Result<Module, WasmError> {
        check_size(wasm, limits)?;
        let hash: [u8; 32] = Sha256::digest(wasm).into();
        if let Some(cache) = &self.cache {
            if let Some(inner) = cache.load(&self.engine, &hash, &self.counters) {
                self.counters.cache_hits.fetch_add(1, Ordering::Relaxed);
                return Module::checked(inner, hash, limits);
            }
        }
        // `validate`, not the text-accepting `Module::new`: a deployed module must be exactly
        // the bytes its hash names. It runs before the rewrite so that the engine alone
        // decides which features are accepted.
        wasmtime::Module::validate(&self.engine, wasm)
            .map_err(|e| WasmError::Invalid(format!("{e:#}")))?;
        let instrumented = stack::instrument(wasm)?;
        self.counters.compilations.fetch_add(1, Ordering::Relaxed);
        let inner = wasmtime::Module::from_binary(&self.engine, &instrumented).map_err(|e| {
            WasmError::Invalid(format!(
                "module is invalid once the stack bound is added: {e:#}"
            ))
        })?;
        let module = Module::checked(inner, hash, limits)?;
        if let Some(cache) = &self.cache {
            cache.store(&hash, &module.inner, &self.counters);
        }
        Ok(module)
    }

    /// Like [`Runtime::compile`] but accepting WAT text; tests only.
    #[cfg(test)]
    pub(super) fn compile_wat(&self, wat: &str, limits: &Limits) -> Result<Module, WasmError> {
        let wasm = wat::parse_str(wat).map_err(|e| WasmError::Invalid(format!("{e:#}")))?;
        self.compile(&wasm, limits)
    }

    /// Creates a fresh instance of `module` with its own store, memory and limits. Runs the
    /// module's start function, if any: call it on a thread with
    /// [`GUEST_THREAD_STACK_BYTES`] of stack.
    pub fn instantiate(&self, module: &Module, limits: &Limits) -> Result<Instance, WasmError> {
        if limits.stack_units > MAX_STACK_UNITS {
            return Err(WasmError::Engine(format!(
                "a stack limit of {} units is more than the engine's native stack covers \
                 ({MAX_STACK_UNITS} units)",
                limits.stack_units
            )));
        }
        Instance::new(&self.engine, module, limits)
    }
}

/// The one place where wasmtime is configured.
fn engine() -> Result<Engine, WasmError> {
    Engine::new(&config()).map_err(|e| WasmError::Engine(format!("{e:#}")))
}

pub(super) fn config() -> Config {
    let mut config = Config::new();
    config
        // Determinism: fuel bounds calls (never epochs: they are wall-clock), NaNs are
        // canonical, the stack bound is ours (`stack.rs`), and only deterministic proposals
        // are on.
        .consume_fuel(true)
        .cranelift_nan_canonicalization(true)
        .max_wasm_stack(MAX_WASM_STACK)
        // Unused (no async calls), but wasmtime requires it to be at least `max_wasm_stack`.
        .async_stack_size(GUEST_THREAD_STACK_BYTES)
        .wasm_relaxed_simd(false)
        .relaxed_simd_deterministic(true)
        .wasm_shared_everything_threads(false)
        .wasm_memory64(false)
        .wasm_multi_memory(false)
        .wasm_custom_page_sizes(false)
        .wasm_wide_arithmetic(false)
        .wasm_stack_switching(false)
        // Also required by the stack bound: a tail call would leave a frame without its
        // epilogue.
        .wasm_tail_call(false)
        .wasm_extended_const(false)
        .wasm_gc(false)
        .wasm_function_references(false)
        .wasm_exceptions(false)
        // What rustc emits by default for wasm32-unknown-unknown, plus fixed-width SIMD.
        .wasm_bulk_memory(true)
        .wasm_multi_value(true)
        .wasm_reference_types(true)
        .wasm_simd(true)
        // Trap messages stay short and identical on every node; backtraces also cost time
        // on every trap.
        .wasm_backtrace_max_frames(None);
    config
}

fn check_size(wasm: &[u8], limits: &Limits) -> Result<(), WasmError> {
    let len = wasm.len() as u64;
    if len > limits.max_module_bytes {
        return Err(WasmError::ModuleTooLarge {
            len,
            limit: limits.max_module_bytes,
        });
    }
    Ok(())
}

impl Module {
    fn checked(
        inner: wasmtime::Module,
        hash: [u8; 32],
        limits: &Limits,
    ) -> Result<Module, WasmError> {
        // The stack counter is always there (`Instance::new` provides it); every other import
        // is a host function from the allow-list (`host_api.rs`).
        let store_model = match inner.get_export(MODEL_STORE.name) {
            None => false,
            Some(ty) => {
                check_func(&MODEL_STORE, &ty)?;
                true
            }
        };
        let mut has_counter = false;
        for import in inner.imports() {
            match import.ty() {
                ExternType::Global(g)
                    if import.module() == stack::IMPORT_MODULE
                        && import.name() == stack::IMPORT_NAME
                        && g.content().is_i32()
                        && g.mutability() == wasmtime::Mutability::Var =>
                {
                    has_counter = true;
                }
                ExternType::Func(func) => {
                    host_api::check_import(import.module(), import.name(), &func, store_model)?
                }
                _ => {
                    return Err(WasmError::ImportNotAllowed {
                        module: import.module().to_string(),
                        name: import.name().to_string(),
                    })
                }
            }
        }
        if !has_counter {
            return Err(WasmError::Invalid(
                "compiled module lacks the stack counter".to_string(),
            ));
        }
        check_memory(&inner, limits)?;
        for sig in REQUIRED {
            match inner.get_export(sig.name) {
                None => {
                    return Err(WasmError::MissingExport {
                        name: sig.name,
                        signature: sig.text,
                    })
                }
                Some(ty) => check_func(sig, &ty)?,
            }
        }
        let has_panic_message = match inner.get_export(PANIC_MESSAGE.name) {
            None => false,
            Some(ty) => {
                check_func(&PANIC_MESSAGE, &ty)?;
                true
            }
        };
        let has_migrate = match inner.get_export(MIGRATE.name) {
            None => false,
            Some(ty) => {
                check_func(&MIGRATE, &ty)?;
                true
            }
        };
        Ok(Module {
            inner,
            has_panic_message,
            has_migrate,
            model: if store_model {
                Model::Store
            } else {
                Model::Memory
            },
            hash,
        })
    }

    /// SHA-256 of the module's bytes, as deployed.
    pub fn hash(&self) -> [u8; 32] {
        self.hash
    }

    /// Where the module keeps its state.
    pub fn model(&self) -> Model {
        self.model
    }

    /// Whether the module exports `wraft_migrate`.
    pub fn has_migrate(&self) -> bool {
        self.has_migrate
    }

    /// [`Module::hash`] as lowercase hex.
    pub fn hash_hex(&self) -> String {
        hex::encode(self.hash)
    }
}

fn check_memory(module: &wasmtime::Module, limits: &Limits) -> Result<(), WasmError> {
    const EXPECTED: &str = "a 32-bit, non-shared memory";
    let memory = match module.get_export("memory") {
        None => {
            return Err(WasmError::MissingExport {
                name: "memory",
                signature: EXPECTED,
            })
        }
        Some(ExternType::Memory(memory)) => memory,
        Some(other) => {
            return Err(WasmError::WrongSignature {
                name: "memory",
                expected: EXPECTED,
                found: describe(&other),
            })
        }
    };
    if memory.is_64() || memory.is_shared() {
        return Err(WasmError::WrongSignature {
            name: "memory",
            expected: EXPECTED,
            found: format!("{memory:?}"),
        });
    }
    let initial = memory.minimum().saturating_mul(PAGE_BYTES);
    if initial > limits.memory_bytes {
        return Err(WasmError::Invalid(format!(
            "module's memory starts at {initial} bytes; the memory limit is {} bytes",
            limits.memory_bytes
        )));
    }
    Ok(())
}

fn check_func(sig: &FuncSig, ty: &ExternType) -> Result<(), WasmError> {
    let wrong = |found: String| WasmError::WrongSignature {
        name: sig.name,
        expected: sig.text,
        found,
    };
    let func = match ty {
        ExternType::Func(func) => func,
        other => return Err(wrong(describe(other))),
    };
    let same = |want: &[ValType], got: &mut dyn ExactSizeIterator<Item = ValType>| {
        want.len() == got.len() && want.iter().zip(got).all(|(w, g)| ValType::eq(w, &g))
    };
    if same(sig.params, &mut func.params()) && same(sig.results, &mut func.results()) {
        Ok(())
    } else {
        Err(wrong(signature(func)))
    }
}

fn describe(ty: &ExternType) -> String {
    match ty {
        ExternType::Func(func) => format!("function {}", signature(func)),
        ExternType::Global(_) => "a global".to_string(),
        ExternType::Table(_) => "a table".to_string(),
        ExternType::Memory(_) => "a memory".to_string(),
        ExternType::Tag(_) => "a tag".to_string(),
    }
}

/// Renders a function type the way the ABI docs write it: `(i32, i32) -> i64`.
pub(crate) fn signature(func: &FuncType) -> String {
    let list = |types: &mut dyn Iterator<Item = ValType>| {
        types.map(|t| t.to_string()).collect::<Vec<_>>().join(", ")
    };
    let params = list(&mut func.params());
    let results: Vec<String> = func.results().map(|t| t.to_string()).collect();
    match results.len() {
        0 => format!("({params}) -> ()"),
        1 => format!("({params}) -> {}", results.join("")),
        _ => format!("({params}) -> ({})", results.join(", ")),
    }
}
