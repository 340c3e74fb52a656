//! Compiles `proto/nine9s/control/v1/control.proto` with `protox`, a
//! pure-Rust protobuf compiler, so that building nine9s needs no system
//! `protoc`. The path matches the package (`nine9s.control.v1`), so stubs
//! generated for Python, Go or Java import under the same name.
//!
//! Every message also derives `serde::Serialize`, for `ctl --output json`:
//! fields keep their proto names, numbers stay numbers, and an enum field
//! is its value's name without the enum's prefix, in lower case
//! (`RELEASE_STATE_PERMANENT` is `"permanent"`). The serializer of each
//! enum field is generated here from the descriptors, so a field added to
//! the proto is in the JSON with nothing written by hand. A time — an
//! `int64` field named `*_ms`, milliseconds since the epoch (durations are
//! `uint64`) — is an RFC 3339 UTC string with milliseconds under the name
//! without `_ms` (`staged_at_ms` is `"staged_at": "2026-11-18T11:06:40.123Z"`),
//! `null` when it is 0 (none).

use std::fmt::Write as _;

const PACKAGE: &str = "nine9s.control.v1";

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

    let mut builder = tonic_prost_build::configure()
        .message_attribute(format!(".{PACKAGE}"), "#[derive(serde::Serialize)]")
        .enum_attribute(format!(".{PACKAGE}"), "#[derive(serde::Serialize)]");
    let mut serializers = String::new();
    for file in &descriptors.file {
        let enums: Vec<&str> = file.enum_type.iter().map(|e| e.name()).collect();
        for name in &enums {
            let function = snake(name);
            writeln!(
                serializers,
                "/// `{name}` as its value's lower-case name.\n\
                 pub fn {function}<S: serde::Serializer>(value: &i32, serializer: S) -> Result<S::Ok, S::Error> {{\n\
                 \x20   name(super::{name}::try_from(*value).ok().map(|v| v.as_str_name()), \"{prefix}_\", serializer)\n\
                 }}",
                prefix = snake(name).to_uppercase(),
            )?;
        }
        for message in &file.message_type {
            for field in &message.field {
                if let Some(name) = field
                    .name()
                    .strip_suffix("_ms")
                    .filter(|_| field.r#type() == prost_types::field_descriptor_proto::Type::Int64)
                {
                    builder = builder.field_attribute(
                        format!(".{PACKAGE}.{}.{}", message.name(), field.name()),
                        format!(
                            "#[serde(rename = \"{name}\", serialize_with = \"crate::json::time\")]"
                        ),
                    );
                    continue;
                }
                let Some(enum_name) = field
                    .type_name()
                    .strip_prefix(&format!(".{PACKAGE}."))
                    .filter(|t| enums.contains(t))
                else {
                    continue;
                };
                builder = builder.field_attribute(
                    format!(".{PACKAGE}.{}.{}", message.name(), field.name()),
                    format!(
                        "#[serde(serialize_with = \"crate::json::{}\")]",
                        snake(enum_name)
                    ),
                );
            }
        }
    }
    std::fs::write(out.join("json_enums.rs"), serializers)?;
    builder.compile_fds(descriptors)?;
    Ok(())
}

/// `ReleaseState` as `release_state`.
fn snake(name: &str) -> String {
    let mut snake = String::new();
    for (i, c) in name.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            snake.push('_');
        }
        snake.push(c.to_ascii_lowercase());
    }
    snake
}
