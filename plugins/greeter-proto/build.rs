//! Compiles `greeter.proto` with `protox`, a pure-Rust protobuf compiler
//! (no system `protoc`), into the server the greeter releases serve and
//! the client the tests call them with. The client is generic over its
//! channel (no `connect`): the release needs no tonic transport.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=greeter.proto");
    let descriptors = protox::compile(["greeter.proto"], ["."])?;
    tonic_prost_build::configure()
        .build_transport(false)
        .compile_fds(descriptors)?;
    Ok(())
}
