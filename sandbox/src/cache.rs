//! The on-disk cache of compiled modules, so that a restarted node loads what it compiled
//! before instead of running Cranelift again.
//!
//! One file per module and engine, named by the SHA-256 of both: the module's hash (the
//! deployed bytes) and the engine key, which covers [`crate::ENGINE`], the stack rewrite's
//! version and wasmtime's own `precompile_compatibility_hash` (compiler settings, target CPU
//! features). A file is `MAGIC ‖ key ‖ sha256(artifact) ‖ len ‖ artifact`, written to a
//! temporary name and renamed into place, so a reader sees a whole file or none.
//!
//! Keeps true: nothing reaches wasmtime's `Module::deserialize` unless its header names this
//! very key and its checksum and length match; anything else (a truncated write, a flipped bit,
//! a file from another engine under this name) is counted, recompiled and rewritten. The
//! checksum guards against accidents, not attackers: whoever can write the node's data
//! directory can already change its state.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use sha2::{Digest, Sha256};
use wasmtime::Engine;

use crate::{stack, WasmError, ENGINE};

#[cfg(test)]
mod tests;

/// Identifies the file format; change it with the layout.
const MAGIC: &[u8; 8] = b"WRAFTMC1";
/// Magic, key, checksum, length.
const HEADER: usize = 8 + 32 + 32 + 8;
/// Suffix of finished files; temporary ones end in `.tmp`.
const SUFFIX: &str = "cwasm";

/// Compilations and cache activity of a [`crate::Runtime`] (and its clones) since it was
/// created. Counters only grow.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CompileStats {
    /// Modules compiled by Cranelift (cache misses, and every compile without a cache).
    pub compilations: u64,
    /// Modules loaded from the cache instead.
    pub cache_hits: u64,
    /// Cache files found but not trusted (truncated, corrupt, another engine's, unreadable);
    /// each was recompiled and rewritten.
    pub cache_rejected: u64,
    /// Compiled modules that could not be written to the cache (they still run).
    pub cache_write_failures: u64,
    /// What went wrong with the cache most recently, for the logs.
    pub last_cache_problem: Option<String>,
}

/// The live counters behind [`CompileStats`], shared by a runtime's clones.
#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) compilations: AtomicU64,
    pub(crate) cache_hits: AtomicU64,
    cache_rejected: AtomicU64,
    cache_write_failures: AtomicU64,
    last_problem: Mutex<Option<String>>,
}

impl Counters {
    pub(crate) fn snapshot(&self) -> CompileStats {
        CompileStats {
            compilations: self.compilations.load(Ordering::Relaxed),
            cache_hits: self.cache_hits.load(Ordering::Relaxed),
            cache_rejected: self.cache_rejected.load(Ordering::Relaxed),
            cache_write_failures: self.cache_write_failures.load(Ordering::Relaxed),
            last_cache_problem: self.last_problem.lock().map(|p| p.clone()).unwrap_or(None),
        }
    }

    fn rejected(&self, problem: String) {
        self.cache_rejected.fetch_add(1, Ordering::Relaxed);
        self.note(problem);
    }

    fn write_failed(&self, problem: String) {
        self.cache_write_failures.fetch_add(1, Ordering::Relaxed);
        self.note(problem);
    }

    fn note(&self, problem: String) {
        if let Ok(mut last) = self.last_problem.lock() {
            *last = Some(problem);
        }
    }
}

/// A cache directory and the key of the engine that reads and writes it.
pub(crate) struct Cache {
    dir: PathBuf,
    engine_key: [u8; 32],
}

impl Cache {
    /// Opens (creating) `dir` for `engine`. `salt` is mixed into the engine key (empty but in
    /// tests). Temporary files left by a process that died mid-write are removed.
    pub(crate) fn open(dir: PathBuf, engine: &Engine, salt: &str) -> Result<Cache, WasmError> {
        std::fs::create_dir_all(&dir).map_err(|e| {
            WasmError::Engine(format!(
                "cannot create the module cache {}: {e}",
                dir.display()
            ))
        })?;
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for entry in entries.flatten() {
                if entry.file_name().to_string_lossy().ends_with(".tmp") {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
        let mut key = ShaHasher(Sha256::new());
        key.write(b"wraft module cache\0");
        key.write(ENGINE.as_bytes());
        key.write(&stack::VERSION.to_le_bytes());
        engine.precompile_compatibility_hash().hash(&mut key);
        key.write(salt.as_bytes());
        Ok(Cache {
            dir,
            engine_key: key.0.finalize().into(),
        })
    }

    /// The compiled module for `hash`, if a trustworthy file holds it.
    pub(crate) fn load(
        &self,
        engine: &Engine,
        hash: &[u8; 32],
        counters: &Counters,
    ) -> Option<wasmtime::Module> {
        let key = self.key(hash);
        let path = self.path(&key);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => {
                counters.rejected(format!("cannot read {}: {e}", path.display()));
                return None;
            }
        };
        let artifact = match verify(&bytes, &key) {
            Ok(artifact) => artifact,
            Err(why) => {
                counters.rejected(format!("{}: {why}", path.display()));
                return None;
            }
        };
        // SAFETY: `deserialize` trusts its input to be an artifact this wasmtime produced. These
        // bytes are exactly what `Module::serialize` wrote under this engine key: the header
        // names the key and the checksum matches. wasmtime checks its own version and settings
        // again and refuses a mismatch.
        match unsafe { wasmtime::Module::deserialize(engine, artifact) } {
            Ok(module) => Some(module),
            Err(e) => {
                counters.rejected(format!("{}: wasmtime refused it: {e:#}", path.display()));
                None
            }
        }
    }

    /// Writes `module`, compiled from bytes with `hash`; failures are only counted.
    pub(crate) fn store(&self, hash: &[u8; 32], module: &wasmtime::Module, counters: &Counters) {
        let key = self.key(hash);
        let path = self.path(&key);
        let artifact = match module.serialize() {
            Ok(artifact) => artifact,
            Err(e) => {
                counters.write_failed(format!("cannot serialize a compiled module: {e:#}"));
                return;
            }
        };
        let mut file = Vec::with_capacity(HEADER + artifact.len());
        file.extend_from_slice(MAGIC);
        file.extend_from_slice(&key);
        file.extend_from_slice(&Sha256::digest(&artifact));
        file.extend_from_slice(&(artifact.len() as u64).to_le_bytes());
        file.extend_from_slice(&artifact);
        if let Err(e) = write_atomically(&path, &file) {
            counters.write_failed(format!("cannot write {}: {e}", path.display()));
        }
    }

    fn key(&self, hash: &[u8; 32]) -> [u8; 32] {
        let mut key = Sha256::new();
        key.update(self.engine_key);
        key.update(hash);
        key.finalize().into()
    }

    fn path(&self, key: &[u8; 32]) -> PathBuf {
        self.dir.join(format!("{}.{SUFFIX}", hex::encode(key)))
    }
}

/// The artifact inside a cache file, if the file is whole and meant for `key`.
fn verify<'a>(file: &'a [u8], key: &[u8; 32]) -> Result<&'a [u8], String> {
    if file.len() < HEADER {
        return Err(format!(
            "truncated: {} bytes, less than a header",
            file.len()
        ));
    }
    let (header, artifact) = file.split_at(HEADER);
    if &header[..8] != MAGIC {
        return Err("not a wraft module cache file".to_string());
    }
    if &header[8..40] != key {
        return Err("written for another engine or module".to_string());
    }
    let mut len = [0u8; 8];
    len.copy_from_slice(&header[72..80]);
    let len = u64::from_le_bytes(len);
    if len != artifact.len() as u64 {
        return Err(format!(
            "truncated or padded: the header says {len} bytes, the file holds {}",
            artifact.len()
        ));
    }
    if header[40..72] != Sha256::digest(artifact)[..] {
        return Err("checksum mismatch".to_string());
    }
    Ok(artifact)
}

/// Writes `path` through a temporary file in the same directory and a rename, so a reader
/// never sees half a file. No fsync: after a crash a torn file fails its checksum and is
/// rebuilt, which is all a cache needs.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{}-{n}.tmp", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let result = std::fs::write(&tmp, bytes).and_then(|()| std::fs::rename(&tmp, path));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Feeds a `Hash` value into SHA-256, so the engine key is the same in every process (std's
/// hashers promise no stability across builds, and 64 bits could collide).
struct ShaHasher(Sha256);

impl Hasher for ShaHasher {
    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    fn finish(&self) -> u64 {
        // Never used for the key; `Hasher` requires it.
        let digest = self.0.clone().finalize();
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest[..8]);
        u64::from_le_bytes(first)
    }
}
