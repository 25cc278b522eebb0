//! The `wraft` binary: see [`wraft::cli`].

fn main() -> std::process::ExitCode {
    wraft::cli::main()
}
