//! Compiles `proto/nine9s/control/v1/control.proto` with `protox`, a
//! pure-Rust protobuf compiler, so that building nine9s needs no system
//! `protoc`. The path matches the package (`nine9s.control.v1`), so stubs
//! generated for Python, Go or Java import under the same name.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/nine9s/control/v1/control.proto";
    println!("cargo:rerun-if-changed={proto}");
    let descriptors = protox::compile([proto], ["proto"])?;
    // For server reflection: the API described by itself.
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("control_descriptor.bin"),
        prost::Message::encode_to_vec(&descriptors),
    )?;
    tonic_prost_build::configure().compile_fds(descriptors)?;
    Ok(())
}
