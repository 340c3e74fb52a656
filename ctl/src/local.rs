//! The agent's local control socket (`--agent unix:PATH`, by default
//! `unix:nine9s-data/control.sock` in the working directory, where the
//! agent makes it with its default data dir): connecting to it, and
//! checking before anything is sent that the process serving it runs as
//! this user or root (`SO_PEERCRED`) — a socket another user made is not
//! this user's agent. The agent knows the caller by its uid the same way,
//! so no token goes over it.

use std::future::Future;
use std::io::{Error, ErrorKind};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::Uri;

/// The socket ctl uses when no agent is named, relative to the working
/// directory: the agent's default data dir's.
pub const DEFAULT_SOCKET: &str = "nine9s-data/control.sock";

/// The local socket of the agent whose data dir is `data_dir`.
pub fn path(data_dir: &Path) -> PathBuf {
    data_dir.join("control.sock")
}

/// The prefix of a local socket's address.
const SCHEME: &str = "unix:";

/// The socket's path, if `address` names one (`unix:PATH`).
pub fn socket_path(address: &str) -> Option<PathBuf> {
    address
        .strip_prefix(SCHEME)
        .filter(|path| !path.is_empty())
        .map(PathBuf::from)
}

/// Why there is nothing to talk to at `path`, and what to do.
pub fn not_running(path: &Path) -> String {
    format!(
        "no agent is running with its data dir here: {} does not exist (the agent makes DATA/control.sock in its data dir). For an agent with another --data-dir give ctl --data-dir DIR (or NINE9S_DATA_DIR); for one on another machine, --agent https://HOST:PORT with --ca and a token",
        path.display()
    )
}

/// Connects tonic's channel to the socket.
#[derive(Clone)]
pub struct Connector {
    path: PathBuf,
}

impl Connector {
    pub fn new(path: PathBuf) -> Connector {
        Connector { path }
    }
}

impl tower_service::Service<Uri> for Connector {
    type Response = TokioIo<UnixStream>;
    type Error = Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let path = self.path.clone();
        Box::pin(async move { connect(&path).await.map(TokioIo::new) })
    }
}

/// A connection to the socket at `path`, once its server is seen to run
/// as this user or root.
async fn connect(path: &Path) -> Result<UnixStream, Error> {
    let stream = UnixStream::connect(path)
        .await
        .map_err(|e| match e.kind() {
            ErrorKind::NotFound => Error::new(ErrorKind::NotFound, not_running(path)),
            _ => Error::new(e.kind(), format!("{}: {e}", path.display())),
        })?;
    let server = stream.peer_cred()?.uid();
    server_trusted(server, rustix::process::geteuid().as_raw()).map_err(|why| {
        Error::new(
            ErrorKind::PermissionDenied,
            format!("{}: {why}", path.display()),
        )
    })?;
    Ok(stream)
}

/// Whether a socket served by uid `server` may be this user's (`me`)
/// agent: the same user, or root.
fn server_trusted(server: u32, me: u32) -> Result<(), String> {
    if server == me || server == 0 {
        Ok(())
    } else {
        Err(format!(
            "it is served by uid {server}, neither you (uid {me}) nor root: not your agent, so ctl sends it nothing"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(
            socket_path("unix:nine9s-data/control.sock"),
            Some(PathBuf::from("nine9s-data/control.sock"))
        );
        assert_eq!(
            socket_path("unix:/run/a.sock"),
            Some(PathBuf::from("/run/a.sock"))
        );
        assert_eq!(socket_path("unix:"), None);
        assert_eq!(socket_path("http://127.0.0.1:1"), None);
    }

    #[test]
    fn only_this_user_or_root_is_trusted_to_serve() {
        assert!(server_trusted(1000, 1000).is_ok());
        assert!(server_trusted(0, 1000).is_ok());
        assert!(server_trusted(0, 0).is_ok());
        let err = server_trusted(1001, 1000).unwrap_err();
        assert!(err.contains("uid 1001"), "{err}");
        assert!(server_trusted(65534, 0).is_err());
    }

    #[tokio::test]
    async fn a_missing_socket_says_the_agent_is_not_running_here() {
        let dir = tempfile::tempdir().unwrap();
        let err = connect(&dir.path().join("control.sock")).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotFound);
        assert!(err.to_string().contains("no agent is running"), "{err}");
    }
}
