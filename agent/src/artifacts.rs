//! The artifact store: release libraries under `DATA/artifacts`, each named
//! by the sha256 of its bytes. A unique path per content matters: `dlopen`
//! of a path already loaded returns the code loaded first.
//!
//! A library is written to a `.partial` file, synced, then renamed, so a
//! crash never leaves a truncated artifact under its final name; partial
//! files are swept at start-up.

use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

pub struct Artifacts {
    dir: PathBuf,
}

impl Artifacts {
    pub fn open(dir: PathBuf) -> std::io::Result<Artifacts> {
        std::fs::create_dir_all(&dir)?;
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "partial") {
                tracing::info!(path = %path.display(), "removing an artifact left half-written by a crash");
                std::fs::remove_file(&path)?;
            }
        }
        Ok(Artifacts { dir })
    }

    pub fn path(&self, sha256: &str) -> PathBuf {
        self.dir.join(format!("{sha256}.so"))
    }

    /// Stores `bytes` under their digest and returns the path. Writing the
    /// same bytes twice is harmless; a write that fails (a full disk)
    /// leaves no partial file behind.
    pub fn put(&self, sha256: &str, bytes: &[u8]) -> std::io::Result<PathBuf> {
        let path = self.path(sha256);
        if path.is_file() {
            return Ok(path);
        }
        let partial = path.with_extension("so.partial");
        let written = (|| {
            let mut file = std::fs::File::create(&partial)?;
            let (first, second) = bytes.split_at(bytes.len() / 2);
            file.write_all(first)?;
            crate::failpoint::crash_point("stage:half-written");
            file.write_all(second)?;
            file.sync_all()?;
            std::fs::rename(&partial, &path)?;
            std::fs::File::open(&self.dir)?.sync_all()
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_file(&partial);
            return Err(e);
        }
        Ok(path)
    }

    /// Bytes free for an unprivileged writer on the artifacts' filesystem.
    pub fn free_space(&self) -> std::io::Result<u64> {
        let stats = rustix::fs::statvfs(&self.dir)?;
        Ok(stats.f_bavail.saturating_mul(stats.f_frsize))
    }

    pub fn remove(&self, sha256: &str) -> std::io::Result<()> {
        match std::fs::remove_file(self.path(sha256)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Deletes every artifact whose digest is not in `keep`; returns the
    /// digests deleted.
    pub fn collect_garbage(&self, keep: &[&str]) -> std::io::Result<Vec<String>> {
        let mut removed = Vec::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let path = entry?.path();
            let Some(sha) = stem_if_artifact(&path) else {
                continue;
            };
            if !keep.contains(&sha.as_str()) {
                std::fs::remove_file(&path)?;
                removed.push(sha);
            }
        }
        Ok(removed)
    }
}

fn stem_if_artifact(path: &Path) -> Option<String> {
    (path.extension()? == "so").then(|| path.file_stem()?.to_str().map(str::to_owned))?
}

/// Lower-case hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
