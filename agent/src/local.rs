//! The local control socket, `DATA/control.sock`: the control plane (the
//! same gRPC services as on TCP) for callers on this machine, who are
//! known by their uid as the kernel tells it (`SO_PEERCRED`, decided in
//! `access.rs`) and need no token — so `ctl` on the agent's machine never
//! has to hand a credential to whatever listens on a port.
//!
//! The supervisor binds it (after preparing the data dir, whose 0700 mode
//! keeps other users from even reaching it; under `--worker-user`, 0711,
//! and the socket's own 0600 mode does) and passes it to every worker
//! beside the TCP listeners, so it survives worker replacements and
//! self-upgrades like they do.

use std::io::ErrorKind;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::error::{Error, Reason};

/// Its name in the data dir.
pub const SOCKET: &str = "control.sock";

/// Where the local control socket of the agent using `data_dir` is.
pub fn path(data_dir: &Path) -> PathBuf {
    data_dir.join(SOCKET)
}

/// Binds `DATA/control.sock` (owner-only, mode 0600) once the data dir is
/// prepared. A socket left there by an agent that is gone is replaced;
/// one that still answers after `wait` belongs to an agent serving this
/// data dir, and anything else there is not ours to remove: both are
/// refused. (The worker of an agent just killed keeps answering for a
/// moment: it dies with its supervisor, but a little later.)
pub fn bind(
    data_dir: &Path,
    worker: Option<&crate::worker_user::WorkerUser>,
    wait: Duration,
) -> Result<UnixListener, Error> {
    crate::datadir::prepare(data_dir, worker)?;
    let path = path(data_dir);
    let shown = path.display();
    match std::fs::symlink_metadata(&path) {
        Ok(meta) if meta.file_type().is_socket() => {
            let until = Instant::now() + wait;
            while UnixStream::connect(&path).is_ok() {
                if Instant::now() >= until {
                    return Err(Error::refused(
                        Reason::InvalidArgument,
                        format!("{shown} answers: there is another agent using this data dir"),
                    ));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            std::fs::remove_file(&path)
                .map_err(Error::io(format!("cannot remove the stale socket {shown}")))?
        }
        Ok(_) => {
            return Err(Error::refused(
                Reason::InvalidArgument,
                format!("{shown} exists and is not a socket: move it out of the data dir"),
            ))
        }
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io(format!("cannot look at {shown}"))(e)),
    }
    let listener =
        UnixListener::bind(&path).map_err(Error::io(format!("cannot listen on {shown}")))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .map_err(Error::io(format!("cannot make {shown} owner-only")))?;
    listener
        .set_nonblocking(true)
        .map_err(Error::io(format!("cannot listen on {shown}")))?;
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn a_stale_socket_is_replaced_a_live_one_or_a_file_refused() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let first = bind(&data, None, Duration::ZERO).unwrap();
        let mode = std::fs::metadata(path(&data)).unwrap().mode();
        assert_eq!(mode & 0o777, 0o600, "{mode:o}");
        let err = bind(&data, None, Duration::ZERO).unwrap_err();
        assert!(err.to_string().contains("another agent"), "{err}");
        drop(first);
        let again = bind(&data, None, Duration::ZERO).unwrap();
        drop(again);
        std::fs::remove_file(path(&data)).unwrap();
        std::fs::write(path(&data), "mine").unwrap();
        let err = bind(&data, None, Duration::ZERO).unwrap_err();
        assert!(err.to_string().contains("not a socket"), "{err}");
        assert_eq!(std::fs::read_to_string(path(&data)).unwrap(), "mine");
    }
}
