//! The compile cache: a restart loads instead of compiling, and a file that is not exactly what
//! this engine wrote for this module is never loaded.

use std::path::{Path, PathBuf};

use crate::tests::{abi_module, small_limits, ECHO};
use crate::{CompileStats, Limits, Runtime, WasmError};

fn echo_wasm() -> Vec<u8> {
    wat::parse_str(abi_module(ECHO, "")).unwrap()
}

/// Compiles `wasm` with a fresh runtime on `dir` (a restarted node), checks that the module
/// works, and returns the runtime's counters.
fn compile_fresh(dir: &Path, wasm: &[u8]) -> CompileStats {
    let rt = Runtime::with_cache_dir(dir).unwrap();
    let limits = small_limits();
    let module = rt.compile(wasm, &limits).unwrap();
    let mut inst = rt.instantiate(&module, &limits).unwrap();
    assert_eq!(inst.apply(b"still works").unwrap(), b"still works");
    rt.stats()
}

/// The one finished cache file in `dir`.
fn cache_file(dir: &Path) -> PathBuf {
    let files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    assert!(
        files[0].extension().is_some_and(|e| e == "cwasm"),
        "{files:?}"
    );
    files[0].clone()
}

#[test]
fn a_restart_loads_instead_of_compiling() {
    let dir = tempfile::tempdir().unwrap();
    let wasm = echo_wasm();
    let first = compile_fresh(dir.path(), &wasm);
    assert_eq!((first.compilations, first.cache_hits), (1, 0));
    let second = compile_fresh(dir.path(), &wasm);
    assert_eq!(
        second,
        CompileStats {
            compilations: 0,
            cache_hits: 1,
            ..CompileStats::default()
        }
    );
    // The identity is still the deployed bytes, not what was compiled or cached.
    let rt = Runtime::with_cache_dir(dir.path()).unwrap();
    let module = rt.compile(&wasm, &small_limits()).unwrap();
    assert_eq!(
        module.hash_hex(),
        crate::Module::hash_hex(
            &Runtime::new()
                .unwrap()
                .compile(&wasm, &small_limits())
                .unwrap()
        )
    );
    // Clones share the counters.
    let clone = rt.clone();
    clone.compile(&wasm, &small_limits()).unwrap();
    assert_eq!(rt.stats().cache_hits, 2);
}

#[test]
fn a_hit_still_checks_the_limits() {
    let dir = tempfile::tempdir().unwrap();
    let wasm = echo_wasm();
    compile_fresh(dir.path(), &wasm);
    let rt = Runtime::with_cache_dir(dir.path()).unwrap();
    let limits = Limits {
        memory_bytes: 64 * 1024,
        ..small_limits()
    };
    let err = rt.compile(&wasm, &limits).err().unwrap();
    assert!(err.to_string().contains("memory limit"), "{err}");
    assert_eq!(rt.stats().cache_hits, 1);
}

#[test]
fn corrupt_or_truncated_files_are_recompiled_and_rewritten() {
    let wasm = echo_wasm();
    type Damage = fn(&mut Vec<u8>);
    let damages: [(&str, Damage); 5] = [
        ("a flipped artifact byte", |f| {
            let last = f.len() - 1;
            f[last] ^= 0x40;
        }),
        ("a flipped checksum byte", |f| f[50] ^= 1),
        ("a truncated artifact", |f| f.truncate(f.len() - 100)),
        ("a truncated header", |f| f.truncate(20)),
        ("an empty file", |f| f.clear()),
    ];
    for (what, damage) in damages {
        let dir = tempfile::tempdir().unwrap();
        compile_fresh(dir.path(), &wasm);
        let file = cache_file(dir.path());
        let mut bytes = std::fs::read(&file).unwrap();
        damage(&mut bytes);
        std::fs::write(&file, &bytes).unwrap();

        let stats = compile_fresh(dir.path(), &wasm);
        assert_eq!(
            (stats.compilations, stats.cache_hits, stats.cache_rejected),
            (1, 0, 1),
            "{what}"
        );
        let problem = stats.last_cache_problem.unwrap();
        assert!(
            problem.contains(&*file.to_string_lossy()),
            "{what}: {problem}"
        );
        // Rewritten: the next restart loads it.
        let stats = compile_fresh(dir.path(), &wasm);
        assert_eq!((stats.compilations, stats.cache_hits), (0, 1), "{what}");
    }
}

#[test]
fn another_engines_cache_is_not_used() {
    let dir = tempfile::tempdir().unwrap();
    let wasm = echo_wasm();
    compile_fresh(dir.path(), &wasm);
    let ours = cache_file(dir.path());

    // Another engine key: another file name, so a miss, and its own file next to ours.
    let other = Runtime::with_cache_dir_salted(dir.path().to_path_buf(), "other engine").unwrap();
    other.compile(&wasm, &small_limits()).unwrap();
    assert_eq!(
        (other.stats().compilations, other.stats().cache_hits),
        (1, 0)
    );
    let files = std::fs::read_dir(dir.path()).unwrap().count();
    assert_eq!(files, 2);

    // Our file under the other engine's name (copied by hand, say): its header names our key,
    // so the other engine refuses it.
    let theirs = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| *p != ours)
        .unwrap();
    std::fs::copy(&ours, &theirs).unwrap();
    let other = Runtime::with_cache_dir_salted(dir.path().to_path_buf(), "other engine").unwrap();
    other.compile(&wasm, &small_limits()).unwrap();
    let stats = other.stats();
    assert_eq!(
        (stats.compilations, stats.cache_hits, stats.cache_rejected),
        (1, 0, 1)
    );
    assert!(
        stats.last_cache_problem.unwrap().contains("another engine"),
        "{:?}",
        other.stats()
    );
}

#[test]
fn rejected_modules_and_text_are_not_cached() {
    let dir = tempfile::tempdir().unwrap();
    let rt = Runtime::with_cache_dir(dir.path()).unwrap();
    let missing_export = abi_module(ECHO, "").replace("\"wraft_apply\"", "\"other\"");
    let err = rt
        .compile_wat(&missing_export, &small_limits())
        .err()
        .unwrap();
    assert!(matches!(err, WasmError::MissingExport { .. }), "{err}");
    assert!(rt.compile(b"not wasm", &small_limits()).is_err());
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn leftover_temporary_files_are_removed() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("abc.cwasm.123-0.tmp"), b"half a file").unwrap();
    Runtime::with_cache_dir(dir.path()).unwrap();
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn an_unwritable_cache_only_counts_failures() {
    let dir = tempfile::tempdir().unwrap();
    let rt = Runtime::with_cache_dir(dir.path().join("cache")).unwrap();
    // The directory disappears under the runtime: compiling still works.
    std::fs::remove_dir_all(dir.path().join("cache")).unwrap();
    let limits = small_limits();
    let module = rt.compile(&echo_wasm(), &limits).unwrap();
    rt.instantiate(&module, &limits).unwrap();
    let stats = rt.stats();
    assert_eq!((stats.compilations, stats.cache_write_failures), (1, 1));
}
