//! The artifact store: release libraries under `DATA/artifacts`, each named
//! by the sha256 of its bytes. A unique path per content matters: `dlopen`
//! of a path already loaded returns the code loaded first.
//!
//! A library arrives as an [`Upload`]: streamed to a `.partial` file beside
//! the artifacts (owner-only) and hashed as it comes, synced, probed, then
//! renamed under its digest — so a crash never leaves a truncated artifact
//! under its final name, and an upload is never held in memory. Partial
//! files are swept at start-up, and an upload dropped before it was adopted
//! deletes its file.
//!
//! Every load re-hashes the artifact against the digest it was staged with
//! ([`Artifacts::verified`]): bytes changed on disk are never loaded. The
//! file is opened once; the descriptor hashed is the one loaded
//! (`nine9s_host::Library::open_file`), so a file renamed over the path
//! after the check is not what runs. That read is bounded — a regular file of the size staged, opened without
//! blocking (a FIFO planted there is refused, not waited on), hashed on a
//! thread of its own within [`VERIFY_TIMEOUT`] (hung storage fails the
//! load instead of holding the engine).

use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use sha2::{Digest, Sha256};

/// Longest the re-hash of an artifact before a load may take.
pub const VERIFY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// The artifacts' directory in a data dir.
pub fn dir(data_dir: &Path) -> PathBuf {
    data_dir.join("artifacts")
}

/// Disk space promised to uploads in progress, so that parallel uploads
/// cannot together eat the room kept free for the store.
#[derive(Debug, Clone, Default)]
pub struct Reservations(Arc<AtomicU64>);

impl Reservations {
    /// Promises `bytes` if `free`, less what is promised already, leaves
    /// `margin` beside them; `Err` is what is left to promise.
    pub fn reserve(&self, free: u64, bytes: u64, margin: u64) -> Result<Reservation, u64> {
        let mut promised = self.0.load(Ordering::Acquire);
        loop {
            let left = free.saturating_sub(promised);
            if left < bytes.saturating_add(margin) {
                return Err(left);
            }
            match self.0.compare_exchange(
                promised,
                promised + bytes,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    return Ok(Reservation {
                        all: self.clone(),
                        bytes,
                    })
                }
                Err(now) => promised = now,
            }
        }
    }
}

/// Space promised to one upload, until it is adopted or dropped.
#[derive(Debug)]
pub struct Reservation {
    all: Reservations,
    bytes: u64,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.all.0.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

/// An upload on its way to becoming an artifact; its file is deleted (and
/// its space reservation returned) if it is dropped before
/// [`Artifacts::adopt`] took it.
pub struct Upload {
    file: std::fs::File,
    hasher: Sha256,
    size: u64,
    guard: Guard,
    reservation: Option<Reservation>,
}

impl Upload {
    /// A new, empty, owner-only upload file in `dir`.
    pub fn create(dir: &Path, reservation: Option<Reservation>) -> std::io::Result<Upload> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let path = dir.join(format!(
            "upload-{}-{}.partial",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        Ok(Upload {
            file,
            hasher: Sha256::new(),
            size: 0,
            guard: Guard(Some(path)),
            reservation,
        })
    }

    pub fn write(&mut self, data: &[u8]) -> std::io::Result<()> {
        self.file.write_all(data)?;
        self.hasher.update(data);
        self.size += data.len() as u64;
        Ok(())
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Syncs the file and returns it with its digest.
    pub fn finish(self) -> std::io::Result<Uploaded> {
        crate::failpoint::crash_point("stage:half-written");
        self.file.sync_all()?;
        Ok(Uploaded {
            sha256: hex::encode(self.hasher.finalize()),
            size: self.size,
            guard: self.guard,
            _reservation: self.reservation,
        })
    }
}

/// A complete upload, synced, not adopted yet; deleted if dropped.
#[derive(Debug)]
pub struct Uploaded {
    pub sha256: String,
    pub size: u64,
    guard: Guard,
    _reservation: Option<Reservation>,
}

impl Uploaded {
    pub fn path(&self) -> &Path {
        self.guard.0.as_deref().expect("armed until adopted")
    }
}

/// Deletes its file when dropped, unless disarmed.
#[derive(Debug)]
struct Guard(Option<PathBuf>);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

pub struct Artifacts {
    dir: PathBuf,
}

impl Artifacts {
    pub fn open(dir: PathBuf) -> std::io::Result<Artifacts> {
        std::fs::create_dir_all(&dir)?;
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "partial") {
                tracing::info!(path = %path.display(), "removing an upload left unfinished by a crash");
                std::fs::remove_file(&path)?;
            }
        }
        Ok(Artifacts { dir })
    }

    /// The artifacts of a data dir another worker serves from: nothing is
    /// swept (its uploads in progress are its own).
    pub fn existing(dir: PathBuf) -> Artifacts {
        Artifacts { dir }
    }

    pub fn path(&self, sha256: &str) -> PathBuf {
        self.dir.join(format!("{sha256}.so"))
    }

    /// Moves a complete upload under its digest (synced, directory
    /// included) and returns the path. Adopting bytes already stored just
    /// drops the upload.
    pub fn adopt(&self, upload: Uploaded) -> std::io::Result<PathBuf> {
        let path = self.path(&upload.sha256);
        if path.is_file() {
            return Ok(path);
        }
        self.repair(upload)
    }

    /// Puts `upload` in place of a damaged artifact with its digest.
    pub fn repair(&self, mut upload: Uploaded) -> std::io::Result<PathBuf> {
        let path = self.path(&upload.sha256);
        std::fs::rename(upload.path(), &path)?;
        upload.guard.0 = None;
        std::fs::File::open(&self.dir)?.sync_all()?;
        Ok(path)
    }

    /// The artifact with this digest and `size`, open, after checking that
    /// the bytes read from that descriptor still have it; `Err` carries the
    /// digest they have now. Bounded: see the module's doc.
    pub fn verified(
        &self,
        sha256: &str,
        size: u64,
    ) -> std::io::Result<Result<std::fs::File, String>> {
        let path = self.path(sha256);
        let (tx, rx) = std::sync::mpsc::channel();
        let reading = path.clone();
        std::thread::Builder::new()
            .name("nine9s-verify".into())
            .spawn(move || {
                let _ = tx.send(digest_of(&reading, size));
            })?;
        let actual = rx.recv_timeout(VERIFY_TIMEOUT).map_err(|_| {
            // The thread is left to its read; it holds nothing of ours.
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "reading it did not finish within {} s (hung storage?)",
                    VERIFY_TIMEOUT.as_secs()
                ),
            )
        })??;
        let (file, actual) = actual;
        Ok(if actual == sha256 {
            Ok(file)
        } else {
            Err(actual)
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Bytes free for an unprivileged writer on the artifacts' filesystem.
    pub fn free_space(&self) -> std::io::Result<u64> {
        free_space(&self.dir)
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

/// Bytes free for an unprivileged writer on `dir`'s filesystem.
pub fn free_space(dir: &Path) -> std::io::Result<u64> {
    let stats = rustix::fs::statvfs(dir)?;
    Ok(stats.f_bavail.saturating_mul(stats.f_frsize))
}

fn stem_if_artifact(path: &Path) -> Option<String> {
    (path.extension()? == "so").then(|| path.file_stem()?.to_str().map(str::to_owned))?
}

/// The regular file at `path`, open, and the sha256 of its bytes read up to
/// one byte past `size` (more can only be another digest). Opened without
/// blocking and without following a symlink: a FIFO or a device there is
/// refused.
fn digest_of(path: &Path, size: u64) -> std::io::Result<(std::fs::File, String)> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags((rustix::fs::OFlags::NONBLOCK | rustix::fs::OFlags::NOFOLLOW).bits() as i32)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "not a regular file",
        ));
    }
    let mut limited = (&file).take(size.saturating_add(1));
    let mut hasher = Sha256::new();
    let mut buffer = vec![0; 256 * 1024];
    loop {
        match limited.read(&mut buffer)? {
            0 => break,
            n => hasher.update(&buffer[..n]),
        }
    }
    Ok((file, hex::encode(hasher.finalize())))
}
