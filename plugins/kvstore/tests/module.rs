//! The built `kvstore.wasm` (scripts/build-plugins.sh) is a store-model module the host accepts:
//! it imports only host functions of the `wraft` allow-list, with their exact signatures, and
//! exports `wraft_model_store` and the whole ABI. Read with wasmparser, no host involved.

use std::collections::BTreeMap;
use std::path::PathBuf;

use wasmparser::{ExternalKind, FuncType, Parser, Payload, TypeRef, ValType};

const I32: ValType = ValType::I32;
const I64: ValType = ValType::I64;

/// The allow-list: name, parameters, results.
const HOST_FUNCTIONS: &[(&str, &[ValType], &[ValType])] = &[
    ("context", &[I32], &[]),
    ("storage_get", &[I32, I32], &[I64]),
    ("storage_put", &[I32, I32, I32, I32], &[]),
    ("storage_delete", &[I32, I32], &[]),
    ("storage_scan", &[I32, I32, I32, I32, I32], &[I64]),
    ("take_output", &[I32], &[]),
];

/// Every export of a store-model module built by the SDK, with its signature.
const EXPORTS: &[(&str, &[ValType], &[ValType])] = &[
    ("wraft_model_store", &[], &[]),
    ("wraft_abi_v1", &[], &[]),
    ("wraft_alloc", &[I32], &[I32]),
    ("wraft_apply", &[I32, I32], &[I64]),
    ("wraft_query", &[I32, I32], &[I64]),
    ("wraft_snapshot", &[], &[I64]),
    ("wraft_restore", &[I32, I32], &[I64]),
    ("wraft_migrate", &[I64], &[I64]),
    ("wraft_panic_message", &[], &[I64]),
];

/// A built plugin, if any. With `WRAFT_REQUIRE_PLUGINS` set (CI, scripts/test.sh) a missing one
/// is a failure, so this test cannot pass there without checking anything.
fn built_plugin(name: &str) -> Option<Vec<u8>> {
    let rel = format!("wasm32-unknown-unknown/release/{name}.wasm");
    let mut candidates = Vec::new();
    if let Ok(dir) = std::env::var("CARGO_TARGET_DIR") {
        candidates.push(PathBuf::from(dir).join(&rel));
    }
    candidates.push(
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../target")
            .join(&rel),
    );
    let found = candidates.iter().find_map(|p| std::fs::read(p).ok());
    if found.is_none() {
        assert!(
            std::env::var_os("WRAFT_REQUIRE_PLUGINS").is_none(),
            "{name}.wasm not built (run scripts/build-plugins.sh); looked in {candidates:?}"
        );
        println!("note: {name}.wasm not built (run scripts/build-plugins.sh); skipping");
    }
    found
}

/// The imports (module, name, type) and the exported functions' types of a module.
struct Interface {
    imports: Vec<(String, String, FuncType)>,
    exports: BTreeMap<String, FuncType>,
}

fn interface(wasm: &[u8]) -> Interface {
    let mut types = Vec::new();
    let mut functions = Vec::new(); // type index of every function, imports first
    let mut imports = Vec::new();
    let mut exported = Vec::new();
    for payload in Parser::new(0).parse_all(wasm) {
        match payload.expect("the module parses") {
            Payload::TypeSection(reader) => {
                for ty in reader.into_iter_err_on_gc_types() {
                    types.push(ty.expect("a function type"));
                }
            }
            Payload::ImportSection(reader) => {
                for import in reader.into_imports() {
                    let import = import.expect("an import");
                    let TypeRef::Func(index) = import.ty else {
                        panic!(
                            "{}::{} is not a function import",
                            import.module, import.name
                        );
                    };
                    functions.push(index);
                    let ty: FuncType = types[index as usize].clone();
                    imports.push((import.module.to_string(), import.name.to_string(), ty));
                }
            }
            Payload::FunctionSection(reader) => {
                for index in reader {
                    functions.push(index.expect("a function"));
                }
            }
            Payload::ExportSection(reader) => {
                for export in reader {
                    let export = export.expect("an export");
                    if export.kind == ExternalKind::Func {
                        exported.push((export.name.to_string(), export.index));
                    }
                }
            }
            _ => {}
        }
    }
    let exports = exported
        .into_iter()
        .map(|(name, func)| {
            let ty = types[functions[func as usize] as usize].clone();
            (name, ty)
        })
        .collect();
    Interface { imports, exports }
}

fn signature(params: &[ValType], results: &[ValType]) -> FuncType {
    FuncType::new(params.iter().copied(), results.iter().copied())
}

/// Checks a store-model module: every import on the allow-list with its exact signature, every
/// export of the ABI with its own. Returns the names it imports.
fn check_store_module(name: &str, wasm: &[u8]) -> Vec<String> {
    let module = interface(wasm);
    for (module_name, import, ty) in &module.imports {
        assert_eq!(
            module_name, "wraft",
            "{name} imports {module_name}::{import}"
        );
        let (_, params, results) = HOST_FUNCTIONS
            .iter()
            .find(|(allowed, _, _)| allowed == import)
            .unwrap_or_else(|| panic!("{name}: wraft::{import} is not on the allow-list"));
        assert_eq!(
            ty,
            &signature(params, results),
            "{name}: signature of wraft::{import}"
        );
    }
    for (export, params, results) in EXPORTS {
        let ty = module
            .exports
            .get(*export)
            .unwrap_or_else(|| panic!("{name} exports no {export}"));
        assert_eq!(
            ty,
            &signature(params, results),
            "{name}: signature of {export}"
        );
    }
    module.imports.into_iter().map(|(_, n, _)| n).collect()
}

#[test]
fn kvstore_wasm_imports_only_allowed_host_functions_and_declares_the_store_model() {
    let Some(wasm) = built_plugin("kvstore") else {
        return;
    };
    let names = check_store_module("kvstore", &wasm);
    // What kvstore actually calls: get, put, delete, and scan (queries and the generated
    // snapshot/restore), each result taken with take_output. It never asks for the context.
    for name in [
        "storage_get",
        "storage_put",
        "storage_delete",
        "storage_scan",
        "take_output",
    ] {
        assert!(
            names.iter().any(|n| n == name),
            "kvstore imports {name}: {names:?}"
        );
    }
    assert!(!names.iter().any(|n| n == "context"), "{names:?}");
}

/// The SDK guide's modules (guest-sdk/examples/guide) are store-model modules too, and they
/// read the context.
#[test]
fn guide_modules_import_the_context() {
    for example in ["hello", "hello2"] {
        let Some(wasm) = built_plugin(&format!("examples/{example}")) else {
            continue;
        };
        let names = check_store_module(example, &wasm);
        assert!(names.iter().any(|n| n == "context"), "{example}: {names:?}");
    }
}

/// The memory-model plugins import nothing (the SDK's storage and context code is linked only
/// where it is called) and now export `wraft_migrate`, but not the store-model marker.
#[test]
fn memory_model_plugins_import_nothing() {
    for plugin in ["kv", "counter", "bank", "kv2"] {
        let Some(wasm) = built_plugin(plugin) else {
            continue;
        };
        let module = interface(&wasm);
        assert!(
            module.imports.is_empty(),
            "{plugin} imports {:?}",
            module.imports
        );
        assert_eq!(
            module.exports.get("wraft_migrate"),
            Some(&signature(&[I64], &[I64])),
            "{plugin}"
        );
        assert!(
            !module.exports.contains_key("wraft_model_store"),
            "{plugin}"
        );
    }
}
