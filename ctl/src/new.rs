//! `ctl new DIR`: a release crate of one's own to start from — its
//! `Cargo.toml` (a `cdylib` on the SDK), `src/lib.rs` (a service that
//! counts its hellos and carries the count as state) and `release.toml` —
//! written from the templates in `ctl/template/`, so that `agent
//! --bootstrap DIR` serves it once built and `ctl stage DIR` ships its next
//! version.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context};

use crate::{json, Failure, Output};

const CARGO_TOML: &str = include_str!("../template/Cargo.toml.in");
const RELEASE_TOML: &str = include_str!("../template/release.toml.in");
const LIB_RS: &str = include_str!("../template/lib.rs");
/// The version a new crate starts at.
const FIRST_VERSION: &str = "0.1.0";

/// The SDK of the checkout ctl was built from, which a crate made here
/// depends on by path unless `--sdk` names another.
const BUILT_WITH_SDK: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../plugins/sdk");

/// A crate name cargo takes and a library file name the agent takes: a
/// lowercase letter, then lowercase letters, digits, `-` or `_`.
pub fn crate_name(dir: &str) -> Result<PathBuf, String> {
    let path = PathBuf::from(dir);
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or("the directory needs a last component, which names the crate")?;
    let mut chars = name.chars();
    let good = chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
        && name.len() <= 64;
    if !good {
        return Err(format!(
            "{name:?} cannot name a crate: use a lowercase letter, then lowercase letters, digits, - or _ (e.g. myservice)"
        ));
    }
    Ok(path)
}

/// Writes the crate into `dir`, which must not exist yet.
pub fn run(dir: &Path, sdk: Option<&Path>, output: Output) -> Result<(), Failure> {
    let name = dir
        .file_name()
        .and_then(|n| n.to_str())
        .expect("checked by crate_name");
    let sdk = sdk.map_or_else(|| PathBuf::from(BUILT_WITH_SDK), Path::to_owned);
    let sdk = sdk
        .canonicalize()
        .ok()
        .filter(|s| s.join("Cargo.toml").is_file())
        .ok_or_else(|| {
            anyhow!(
                "the nine9s SDK is not at {}: give --sdk PATH (the plugins/sdk directory of a nine9s checkout)",
                sdk.display()
            )
        })?;
    let sdk_text = sdk
        .to_str()
        .ok_or_else(|| anyhow!("the SDK's path {} is not UTF-8", sdk.display()))?;
    match std::fs::create_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::AlreadyExists => {
            return Err(anyhow!("{} exists; nothing was written", dir.display()).into())
        }
        Err(e) => {
            return Err(anyhow!(e)
                .context(format!("cannot create {}", dir.display()))
                .into())
        }
    }
    let fill = |template: &str| {
        template
            .replace("{name}", name)
            .replace("{version}", FIRST_VERSION)
            .replace("{library}", &name.replace('-', "_"))
            // TOML basic strings escape `\` and `"`.
            .replace(
                "{sdk}",
                &sdk_text.replace('\\', "\\\\").replace('"', "\\\""),
            )
    };
    let files = [
        ("Cargo.toml", fill(CARGO_TOML)),
        ("release.toml", fill(RELEASE_TOML)),
        ("src/lib.rs", LIB_RS.to_owned()),
        (".gitignore", "/target\n".to_owned()),
    ];
    for (file, text) in &files {
        let path = dir.join(file);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    let shown = dir.display();
    if output == Output::Json {
        json::print(&json::created(
            name,
            FIRST_VERSION,
            dir,
            &sdk,
            files.iter().map(|(file, _)| *file),
        ));
    } else {
        outln!(
            "created the release crate {name} {FIRST_VERSION} in {shown}, on the SDK at {}",
            sdk.display()
        );
        outln!("  build it:      cargo build --release --manifest-path {shown}/Cargo.toml");
        outln!("  serve it:      agent --bootstrap {shown} --data-dir DATA");
        outln!("  next version:  raise `version` in Cargo.toml and release.toml, build, then");
        outln!("                 ctl --data-dir DATA stage {shown} && ctl --data-dir DATA upgrade --to VERSION");
    }
    Ok(())
}
