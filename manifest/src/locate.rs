//! Finding a release's library file from its directory, so that
//! `ctl stage plugins/nine9s-0.2.0` works straight after `cargo build`.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::Manifest;

/// The library of the release in `dir`: `DIR/<library>` if it exists;
/// otherwise the most recently built `<library>` in `target/release` or
/// `target/debug` of the nearest enclosing directory that has a `target/`
/// (or in `$CARGO_TARGET_DIR`).
pub fn locate_library(dir: &Path, manifest: &Manifest) -> Result<PathBuf, String> {
    let beside = dir.join(&manifest.library);
    if beside.is_file() {
        return Ok(beside);
    }
    let mut target_dirs = Vec::new();
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        target_dirs.push(PathBuf::from(dir));
    }
    let absolute = dir.canonicalize().unwrap_or_else(|_| dir.to_owned());
    if let Some(root) = absolute.ancestors().find(|a| a.join("target").is_dir()) {
        target_dirs.push(root.join("target"));
    }
    let newest = target_dirs
        .iter()
        .flat_map(|t| [t.join("release"), t.join("debug")])
        .map(|d| d.join(&manifest.library))
        .filter_map(|p| {
            let modified = p
                .metadata()
                .ok()?
                .modified()
                .unwrap_or(SystemTime::UNIX_EPOCH);
            Some((modified, p))
        })
        .max_by_key(|(modified, _)| *modified);
    match newest {
        Some((_, path)) => Ok(path),
        None => Err(format!(
            "library {:?} of {} {} not found beside {} nor in a cargo target directory; build it first (cargo build --release --workspace) or pass --library",
            manifest.library,
            manifest.name,
            manifest.version,
            dir.join("release.toml").display()
        )),
    }
}
