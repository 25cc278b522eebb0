//! Generates the Rust code for wraft's .proto files, using a vendored `protoc` so that a fresh
//! machine needs no system protobuf compiler.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // Safety of set_var: build scripts are single-threaded.
    unsafe { std::env::set_var("PROTOC", protoc) };
    tonic_prost_build::configure().compile_protos(
        &["proto/wraft.proto", "proto/peer.proto", "proto/log.proto"],
        &["proto"],
    )?;
    Ok(())
}
