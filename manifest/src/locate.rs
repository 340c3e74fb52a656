//! Finding a release's library file from its directory, so that
//! `ctl stage plugins/nine9s-0.2.0` works straight after `cargo build`.
//!
//! It never looks anywhere else: `Manifest::parse` only accepts a bare
//! file name as `library` (no `/`, not `.` or `..`), so joining it to the
//! release directory or to a target directory's `release`/`debug` names a
//! file directly inside that directory; a manifest built by hand with a
//! path is refused here too.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::Manifest;

/// The library of the release in `dir`: `DIR/<library>` if it exists;
/// otherwise the most recently built `<library>` in `target/release` or
/// `target/debug` of the nearest enclosing directory that has a `target/`
/// (or in `$CARGO_TARGET_DIR`).
pub fn locate_library(dir: &Path, manifest: &Manifest) -> Result<PathBuf, String> {
    let name = Path::new(&manifest.library);
    if name.file_name() != Some(name.as_os_str()) {
        return Err(format!(
            "library {:?} of {} {} is not a bare file name",
            manifest.library, manifest.name, manifest.version
        ));
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_bare_names_are_looked_up() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("l.so"), b"x").unwrap();
        let mut manifest =
            Manifest::parse("name = \"a\"\nversion = \"0.1.0\"\nlibrary = \"l.so\"\n").unwrap();
        assert_eq!(
            locate_library(dir.path(), &manifest).unwrap(),
            dir.path().join("l.so")
        );
        for path in ["../l.so", "/etc/l.so", "sub/l.so", "..", "."] {
            manifest.library = path.into();
            let err = locate_library(dir.path(), &manifest).unwrap_err();
            assert!(err.contains("bare file name"), "{err}");
        }
    }
}
