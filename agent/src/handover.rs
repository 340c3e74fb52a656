//! A self-upgrade's handover, the workers' side. The serving worker keeps
//! a hint in the data dir (`standby.json`: the permanent release's record,
//! written atomically at boot and whenever the permanent release changes;
//! under `--worker-user`, in the artifacts dir: `Config::hint_dir`).
//! A worker started for a self-upgrade (it was given a [`STATE`] socket)
//! gets ready before it touches the store, which the serving worker still
//! holds: it re-hashes and opens the library the hint names ([`Standby`];
//! it was probed when it was staged), then tells the supervisor it is
//! ready to take over. The serving worker then stops taking connections,
//! finishes its requests and — if it serves the permanent release — sends
//! its state over ([`send_state`]): the new worker builds its instance
//! from it and serves at once, while the old one checkpoints the same
//! state and lets go of the store, which the new one then opens.
//!
//! Without a hint, or with no state sent (the serving worker runs a
//! release that is not permanent yet, or died), the new worker starts from
//! the store as after any restart: the handover is only faster this way,
//! never different.
//!
//! [`STATE`]: crate::channel::STATE

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use nine9s_host::Library;
use nine9s_manifest::Version;
use serde::{Deserialize, Serialize};

use crate::artifacts::{self, Artifacts};
use crate::error::{Error, Result};
use crate::failpoint::crash_point;
use crate::model::Release;
use crate::runtime::{Loaded, Runtime};

/// The hint, in the data dir.
const HINT: &str = "standby.json";

/// How long the serving worker may take to write its state out to a new
/// worker that does not read it.
const SEND_LIMIT: Duration = Duration::from_secs(5);

/// The line before the state's bytes.
const MAX_HEADER: u64 = 4096;

/// Writes the hint naming `release` as the permanent one: written aside,
/// owner-only, then renamed over the last one.
pub(crate) fn write_hint(dir: &Path, release: &Release) -> std::io::Result<()> {
    let path = dir.join(HINT);
    let staged = dir.join(format!("{HINT}.tmp"));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&staged)?;
    file.write_all(&serde_json::to_vec(release).map_err(std::io::Error::other)?)?;
    drop(file);
    std::fs::rename(&staged, &path)
}

fn read_hint(dir: &Path) -> std::io::Result<Option<Release>> {
    match std::fs::read(dir.join(HINT)) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// What precedes the state's bytes on the socket.
#[derive(Debug, Serialize, Deserialize)]
struct Header {
    version: Version,
    sha256: String,
    state_version: u32,
    bytes: usize,
    /// When the serving worker stopped accepting connections (µs since the
    /// epoch): the new worker logs how long after it began to.
    stopped_accepting_us: i64,
}

/// Microseconds since the epoch: comparable between two processes of one
/// machine.
pub(crate) fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

/// The serving worker's side of a handover: the socket to the new worker,
/// and when it stopped accepting connections.
pub struct Outgoing {
    pub socket: OwnedFd,
    pub stopped_accepting_us: i64,
}

/// The serving worker's side: sends the state of `release` (taken with no
/// request in flight, none to follow) to the new worker, and closes.
pub(crate) fn send_state(
    outgoing: Outgoing,
    release: &Release,
    state_version: u32,
    bytes: &[u8],
) -> std::io::Result<()> {
    let mut stream = UnixStream::from(outgoing.socket);
    stream.set_write_timeout(Some(SEND_LIMIT))?;
    let header = Header {
        version: release.version.clone(),
        sha256: release.sha256.clone(),
        state_version,
        bytes: bytes.len(),
        stopped_accepting_us: outgoing.stopped_accepting_us,
    };
    let mut line = serde_json::to_vec(&header).map_err(std::io::Error::other)?;
    line.push(b'\n');
    stream.write_all(&line)?;
    stream.write_all(bytes)
}

/// The state on `socket`, once the serving worker sent it; `None` if it
/// closed the socket without.
fn receive(socket: OwnedFd) -> std::io::Result<Option<(Header, Vec<u8>)>> {
    let mut reader = BufReader::new(UnixStream::from(socket));
    let mut line = String::new();
    if reader.by_ref().take(MAX_HEADER).read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let header: Header = serde_json::from_str(&line)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    let mut bytes = Vec::new();
    reader.take(header.bytes as u64).read_to_end(&mut bytes)?;
    if bytes.len() != header.bytes {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("{} of {} bytes of state", bytes.len(), header.bytes),
        ));
    }
    Ok(Some((header, bytes)))
}

/// A worker started for a self-upgrade, ready to take over: the permanent
/// release's library re-hashed and opened, before the store.
pub struct Standby {
    /// `None` without a hint: the new worker starts from the store.
    permanent: Option<(Release, Arc<Library>)>,
}

/// The instance a new worker built from the state handed over, serving
/// before the store is open.
pub struct Preloaded {
    pub(crate) runtime: Arc<Runtime>,
    pub(crate) sha256: String,
    /// When the old worker stopped accepting (µs since the epoch).
    pub(crate) stopped_accepting_us: i64,
}

impl Standby {
    /// Opens the library of the permanent release the hint names. Fails if
    /// it is there and cannot be opened (changed on disk, or this binary
    /// cannot load it): this binary could not serve it.
    pub fn prepare(config: &crate::config::Config) -> Result<Standby> {
        let release = match read_hint(&config.hint_dir()) {
            Ok(Some(release)) => release,
            Ok(None) => {
                tracing::info!(
                    "no standby hint in the data dir: this worker starts from the store"
                );
                return Ok(Standby { permanent: None });
            }
            Err(e) => {
                tracing::warn!(error = %e, "the standby hint cannot be read: this worker starts from the store");
                return Ok(Standby { permanent: None });
            }
        };
        let dir = artifacts::dir(&config.data_dir);
        if !dir.join(format!("{}.so", release.sha256)).exists() {
            // A stale hint (its last write failed, and that release has
            // been removed since): the store knows better.
            tracing::warn!(version = %release.version, "the standby hint names a release whose artifact is gone: this worker starts from the store");
            return Ok(Standby { permanent: None });
        }
        let artifacts = Artifacts::existing(dir);
        let library = crate::release_handler::open_release(&artifacts, &release)?;
        tracing::info!(version = %release.version, "ready to take over: the permanent release's library is open");
        Ok(Standby {
            permanent: Some((release, library)),
        })
    }

    /// Waits for the serving worker's state on `socket` and builds the
    /// instance from it; `None` (start from the store) if none came or it
    /// is not the state of the library prepared.
    pub async fn take_over(self, socket: OwnedFd) -> Result<Option<Preloaded>> {
        // Blocking: the read waits for the old worker's drain, and `init`
        // is plugin code.
        tokio::task::spawn_blocking(move || self.restore(socket))
            .await
            .map_err(|e| Error::io("the handover failed")(std::io::Error::other(e)))?
    }

    fn restore(self, socket: OwnedFd) -> Result<Option<Preloaded>> {
        let received = receive(socket);
        crash_point("handover:received");
        let (header, bytes) = match received {
            Ok(Some(received)) => received,
            Ok(None) => {
                tracing::info!("no state handed over: this worker starts from the store");
                return Ok(None);
            }
            Err(e) => {
                tracing::warn!(error = %e, "the state handed over could not be read: this worker starts from the store");
                return Ok(None);
            }
        };
        let Some((release, library)) = self.permanent else {
            return Ok(None);
        };
        if header.version != release.version
            || header.sha256 != release.sha256
            || header.state_version != library.state_version()
        {
            tracing::warn!(
                handed = %header.version,
                prepared = %release.version,
                "the state handed over is not that of the release prepared: this worker starts from the store"
            );
            return Ok(None);
        }
        // A release that keeps no state starts fresh, as at boot.
        let state = (library.state_version() != 0).then_some(bytes.as_slice());
        let instance = library.instantiate(state).map_err(|e| Error::Plugin {
            version: release.version.clone(),
            during: "init",
            source: e,
        })?;
        tracing::info!(version = %release.version, bytes = bytes.len(), "took over the serving worker's state");
        Ok(Some(Preloaded {
            runtime: Arc::new(Runtime::new(Loaded::new(
                release.version,
                release.blocking,
                instance,
            ))),
            sha256: release.sha256,
            stopped_accepting_us: header.stopped_accepting_us,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn permanent(sha: &str) -> Release {
        Release {
            name: "nine9s".into(),
            version: Version::new(0, 2, 0),
            state: crate::model::ReleaseState::Permanent,
            sha256: sha.repeat(32),
            size: 1,
            staged_at_ms: 0,
            state_version: 1,
            routes: vec![],
            blocking: false,
            permanent_since_ms: Some(1),
            manifest: String::new(),
            failure: None,
            signed_by: None,
            signature: String::new(),
        }
    }

    #[test]
    fn the_state_sent_is_the_state_received_and_a_closed_socket_is_none() {
        let release = permanent("ab");
        let (old, new) = UnixStream::pair().unwrap();
        let sender = std::thread::spawn({
            let release = release.clone();
            move || {
                let outgoing = Outgoing {
                    socket: old.into(),
                    stopped_accepting_us: 7,
                };
                send_state(outgoing, &release, 1, b"counted: 42")
            }
        });
        let (header, bytes) = receive(new.into()).unwrap().unwrap();
        sender.join().unwrap().unwrap();
        assert_eq!(
            (header.version, header.sha256, header.state_version),
            (release.version, release.sha256, 1)
        );
        assert_eq!(header.stopped_accepting_us, 7);
        assert_eq!(bytes, b"counted: 42");
        let (old, new) = UnixStream::pair().unwrap();
        drop(old);
        assert!(receive(new.into()).unwrap().is_none());
    }

    #[test]
    fn the_hint_is_owner_only_and_read_back() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        assert!(read_hint(dir.path()).unwrap().is_none());
        let release = permanent("cd");
        write_hint(dir.path(), &release).unwrap();
        assert_eq!(read_hint(dir.path()).unwrap(), Some(release));
        let mode = std::fs::metadata(dir.path().join(HINT))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
