//! The deterministic engine and module validation against the wraft ABI v1.
//!
//! Owns the one place where wasmtime is configured and the checks a module must pass before it
//! can be instantiated. Keeps true: a [`Module`] that exists has no imports, a 32-bit
//! non-shared `memory` that fits the memory limit, and every ABI export with its exact
//! signature, so instantiation and calls never meet a missing or mistyped function.

use sha2::{Digest, Sha256};
use wasmtime::{Config, Engine, ExternType, FuncType, ValType};

use crate::{Instance, Limits, WasmError};

/// Wasm page size; custom page sizes are disabled, so it is always 64 KiB.
const PAGE_BYTES: u64 = 65536;

/// Stack for Wasm frames. Set explicitly so that a wasmtime upgrade cannot move the depth at
/// which recursion traps without us noticing.
const MAX_WASM_STACK: usize = 512 * 1024;

/// A wasmtime engine configured for deterministic execution. Cheap to clone.
#[derive(Clone)]
pub struct Runtime {
    engine: Engine,
}

/// A validated, compiled module. Cheap to clone (wasmtime's module is reference-counted).
#[derive(Clone)]
pub struct Module {
    pub(super) inner: wasmtime::Module,
    pub(super) has_panic_message: bool,
    hash: [u8; 32],
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

const PANIC_MESSAGE: FuncSig = FuncSig {
    name: "wraft_panic_message",
    params: &[],
    results: &[ValType::I64],
    text: "() -> i64",
};

impl Runtime {
    /// Creates the engine with the deterministic configuration (see the module docs for the
    /// accepted Wasm features).
    pub fn new() -> Result<Runtime, WasmError> {
        let mut config = Config::new();
        config
            // Determinism: fuel bounds calls (never epochs: they are wall-clock), NaNs are
            // canonical, and only deterministic proposals are on.
            .consume_fuel(true)
            .cranelift_nan_canonicalization(true)
            .max_wasm_stack(MAX_WASM_STACK)
            .wasm_relaxed_simd(false)
            .relaxed_simd_deterministic(true)
            .wasm_shared_everything_threads(false)
            .wasm_memory64(false)
            .wasm_multi_memory(false)
            .wasm_custom_page_sizes(false)
            .wasm_wide_arithmetic(false)
            .wasm_stack_switching(false)
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
        let engine = Engine::new(&config).map_err(|e| WasmError::Engine(format!("{e:#}")))?;
        Ok(Runtime { engine })
    }

    /// Validates and compiles a Wasm binary: size cap, parse and validate, no imports, the ABI
    /// exports with their exact signatures, and an initial memory within the limit.
    pub fn compile(&self, wasm: &[u8], limits: &Limits) -> Result<Module, WasmError> {
        check_size(wasm, limits)?;
        // `from_binary`, not `new`: the `wat` feature would otherwise accept text too, and a
        // deployed module must be exactly the bytes its hash names.
        let inner = wasmtime::Module::from_binary(&self.engine, wasm)
            .map_err(|e| WasmError::Invalid(format!("{e:#}")))?;
        Module::checked(inner, wasm, limits)
    }

    /// Like [`Runtime::compile`] but accepting WAT text; tests only.
    #[cfg(test)]
    pub(super) fn compile_wat(&self, wat: &str, limits: &Limits) -> Result<Module, WasmError> {
        check_size(wat.as_bytes(), limits)?;
        let inner = wasmtime::Module::new(&self.engine, wat)
            .map_err(|e| WasmError::Invalid(format!("{e:#}")))?;
        Module::checked(inner, wat.as_bytes(), limits)
    }

    /// Creates a fresh instance of `module` with its own store, memory and limits.
    pub fn instantiate(&self, module: &Module, limits: &Limits) -> Result<Instance, WasmError> {
        Instance::new(&self.engine, module, limits)
    }
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
        bytes: &[u8],
        limits: &Limits,
    ) -> Result<Module, WasmError> {
        if let Some(import) = inner.imports().next() {
            return Err(WasmError::ImportNotAllowed {
                module: import.module().to_string(),
                name: import.name().to_string(),
            });
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
        Ok(Module {
            inner,
            has_panic_message,
            hash: Sha256::digest(bytes).into(),
        })
    }

    /// SHA-256 of the module's bytes, as deployed.
    pub fn hash(&self) -> [u8; 32] {
        self.hash
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
fn signature(func: &FuncType) -> String {
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
