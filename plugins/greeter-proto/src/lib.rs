//! The `greeter.v1` gRPC API of the sample releases greeter 0.1.0 and
//! 0.2.0: the messages, the server they implement and a client, generated
//! from `greeter.proto` at build time.

tonic::include_proto!("greeter.v1");
