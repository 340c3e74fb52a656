//! Builds the sample release nine9s 0.1.0 and embeds it in the agent, so
//! that `agent` with no flags and no setup serves it.
//!
//! The plugin and the SDK have no dependencies, so a bare `rustc` builds
//! them in a couple of seconds; a nested `cargo` would fight the outer one
//! for the target directory's lock.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let sdk = root.join("plugins/sdk");
    let sample = root.join("plugins/nine9s-0.1.0");
    for watched in [
        sdk.join("src"),
        sample.join("src"),
        sample.join("release.toml"),
    ] {
        println!("cargo:rerun-if-changed={}", watched.display());
    }
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let target = std::env::var("TARGET").expect("cargo sets TARGET");

    let manifest =
        std::fs::read_to_string(sample.join("release.toml")).expect("sample release.toml");
    let version = manifest
        .lines()
        .find_map(|l| l.trim().strip_prefix("version = "))
        .map(|v| v.trim_matches('"').to_owned())
        .expect("sample release.toml has a version");

    let compile = |args: &[&std::ffi::OsStr]| {
        let status = Command::new(&rustc)
            .args([
                "--edition",
                "2021",
                "-C",
                "opt-level=2",
                "--target",
                &target,
            ])
            .args(args)
            .env("CARGO_PKG_VERSION", &version)
            .status()
            .expect("run rustc");
        assert!(
            status.success(),
            "building the embedded sample release failed"
        );
    };
    let sdk_rlib = out.join("libnine9s_sdk.rlib");
    compile(&[
        "--crate-type".as_ref(),
        "rlib".as_ref(),
        "--crate-name".as_ref(),
        "nine9s_sdk".as_ref(),
        sdk.join("src/lib.rs").as_os_str(),
        "-o".as_ref(),
        sdk_rlib.as_os_str(),
    ]);
    let extern_sdk = format!("nine9s_sdk={}", sdk_rlib.display());
    let library = out.join("libnine9s_0_1_0.so");
    compile(&[
        "--crate-type".as_ref(),
        "cdylib".as_ref(),
        "--crate-name".as_ref(),
        "nine9s_0_1_0".as_ref(),
        sample.join("src/lib.rs").as_os_str(),
        "--extern".as_ref(),
        extern_sdk.as_ref(),
        "-L".as_ref(),
        out.as_os_str(),
        "-o".as_ref(),
        library.as_os_str(),
    ]);
}
