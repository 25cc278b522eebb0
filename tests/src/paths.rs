//! Where the artifacts under test are: the `wraft` binary and the plugin `.wasm` files.
//!
//! Neither is built by `cargo test -p wraft-tests` (the binary belongs to another package, the
//! plugins to another target), so a missing one fails with the command that builds it.

use std::path::PathBuf;

use sha2::{Digest, Sha256};

/// The profile directory of the running test executable: `<target>/<profile>`, since a test
/// executable lives at `<target>/<profile>/deps/<name>-<hash>`.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the path of the test executable");
    exe.parent()
        .and_then(|deps| deps.parent())
        .unwrap_or_else(|| {
            panic!(
                "test executable {} has no <profile>/deps parent",
                exe.display()
            )
        })
        .to_path_buf()
}

/// The `wraft` binary: `$WRAFT_BIN`, else `<target>/<profile>/wraft`.
pub fn wraft_bin() -> PathBuf {
    let (bin, origin) = match std::env::var_os("WRAFT_BIN") {
        Some(p) => (PathBuf::from(p), "WRAFT_BIN"),
        None => (
            profile_dir().join("wraft"),
            "the test executable's profile directory",
        ),
    };
    assert!(
        bin.is_file(),
        "the wraft binary is not at {} (from {origin}): build it with \
         `cargo build -p wraft --bin wraft` or point WRAFT_BIN at it",
        bin.display()
    );
    bin
}

/// The directory of the plugin modules: `$WRAFT_PLUGIN_DIR`, else
/// `<target>/wasm32-unknown-unknown/release`.
pub fn plugin_dir() -> PathBuf {
    match std::env::var_os("WRAFT_PLUGIN_DIR") {
        Some(p) => PathBuf::from(p),
        None => {
            let profile = profile_dir();
            let target = profile
                .parent()
                .unwrap_or_else(|| panic!("{} has no parent", profile.display()));
            target.join("wasm32-unknown-unknown").join("release")
        }
    }
}

/// The path of a plugin module, e.g. `plugin_path("kv")` → `.../kv.wasm`.
pub fn plugin_path(name: &str) -> PathBuf {
    let path = plugin_dir().join(format!("{name}.wasm"));
    assert!(
        path.is_file(),
        "plugin {name} is not at {}: build the plugins with `scripts/build-plugins.sh` \
         or point WRAFT_PLUGIN_DIR at a directory holding {name}.wasm",
        path.display()
    );
    path
}

/// The bytes of a plugin module.
pub fn plugin_bytes(name: &str) -> Vec<u8> {
    let path = plugin_path(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// sha256 of `bytes`, lower-case hex: what a node reports as a module hash.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}
