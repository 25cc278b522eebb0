//! The README's "Write your first state machine" guide, compiled and run: its two crates are
//! `examples/guide/hello` (version 1) and `examples/guide/hello2` (version 2, with the
//! upgrade test of its `tests/upgrade.rs`). The README shows those files verbatim, which the
//! last test checks. scripts/build-plugins.sh builds both as Wasm modules.
#![cfg(feature = "serde")]

// In the guide `hello` and `hello2` are crates; here they are modules of this test crate.
#[allow(dead_code)]
#[path = "../examples/guide/hello/lib.rs"]
mod hello;
#[allow(dead_code)]
#[path = "../examples/guide/hello2/lib.rs"]
mod hello2;

// hello2's `tests/upgrade.rs`, at the crate root where `hello` and `hello2` resolve as they do
// in the guide.
include!("../examples/guide/hello2/upgrade.rs");

/// Every file of the guide appears in README.md exactly, as a `rust` code block.
#[test]
fn readme_shows_the_guide_files_verbatim() {
    let dir = env!("CARGO_MANIFEST_DIR");
    let readme = std::fs::read_to_string(format!("{dir}/README.md")).unwrap();
    for file in [
        "examples/guide/hello/lib.rs",
        "examples/guide/hello2/lib.rs",
        "examples/guide/hello2/upgrade.rs",
    ] {
        let code = std::fs::read_to_string(format!("{dir}/{file}")).unwrap();
        assert!(
            readme.contains(&format!("```rust\n{code}```\n")),
            "README.md does not show {file} as it is: copy the file into its code block"
        );
    }
}
