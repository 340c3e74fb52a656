//! The generated types and stubs of the nine9s control plane
//! (`proto/nine9s/control/v1/control.proto`). Only the agent's `control` module and `ctl` use
//! them; everything else works with domain types.
#![forbid(unsafe_code)]
#![allow(clippy::all, missing_docs)]

tonic::include_proto!("nine9s.control.v1");

/// The encoded `FileDescriptorSet` of the API, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/control_descriptor.bin"));
