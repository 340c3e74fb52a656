//! The start message: what a process of the agent is told by the one that
//! started it, and how it checks it. A worker is told by its supervisor
//! who that supervisor is, how many workers were replaced before it, how
//! the last one ended, whether another worker may still hold the store, a
//! self-upgrade that failed after a handover, and under `--worker-user`
//! its secrets (`worker_user.rs`); a supervisor re-executed from a new
//! binary (SIGUSR2) is told by its previous image which worker to adopt
//! and the restarts counted so far.
//!
//! It comes on a socket the process inherits (`nine9s-birth` in
//! `LISTEN_FDNAMES`), never in the environment: any parent can set a
//! variable, and a release's children would inherit it. The parent writes
//! one JSON document on its end and closes it; the child reads it to the
//! end once, at start, and closes its own (close-on-exec before that, like
//! every inherited socket, so nothing the child starts sees it). The
//! child believes only what it can check: the supervisor a worker is told
//! of is its parent and made the socket (`SO_PEERCRED`); a worker to
//! adopt is the process's own child. Without the socket, a process starts
//! as the first of its agent, whatever its environment says.

use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;

use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;

use crate::process::FailedRestart;
use crate::worker_user::Handed;

/// The most read of a start message (TLS files included).
const MAX_BIRTH: u64 = 4 * 1024 * 1024;

/// How long a supervisor waits for a worker to take its start message.
const HAND_LIMIT: std::time::Duration = std::time::Duration::from_secs(30);

/// The start message.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "to", rename_all = "kebab-case")]
pub enum Birth {
    /// From a supervisor to the worker it started (boxed: the secrets
    /// make it the larger by far).
    Worker(Box<WorkerBirth>),
    /// From a supervisor to its own next image, across a re-execution.
    Supervisor(Adoption),
}

/// What a worker is told by its supervisor.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct WorkerBirth {
    /// The supervisor's pid: the worker's parent, which made the socket.
    pub supervisor: u32,
    /// Workers the supervisor started because the one before died (this
    /// one included, if it is one of them).
    pub restarts: u64,
    /// How the worker before this one ended, when it died.
    pub previous_exit: Option<String>,
    /// A self-upgrade that failed after the worker before this one handed
    /// over, to be recorded.
    pub failed_restart: Option<FailedRestart>,
    /// Another worker may still hold the store (it is handing over or
    /// retiring): wait for it.
    pub store_wait: bool,
    /// Under `--worker-user`: the tokens' digests and the TLS files.
    pub secrets: Option<Handed>,
}

/// What a re-executed supervisor is told by its previous image.
#[derive(Debug, Serialize, Deserialize)]
pub struct Adoption {
    /// The serving worker, still this process's child.
    pub worker: u32,
    /// Workers replaced so far.
    pub restarts: u64,
}

/// Why a start message is not believed.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("cannot read the start message on its inherited socket: {0}")]
    Read(#[source] std::io::Error),
    #[error("the start message is malformed: {0}")]
    Malformed(#[source] serde_json::Error),
    #[error("the start message is meant for a {0}, not for this process")]
    NotMine(&'static str),
    #[error("the start message names supervisor {claimed}, but {what} is {actual}")]
    NotTheSupervisor {
        claimed: u32,
        what: &'static str,
        actual: u32,
    },
    #[error("the start message to adopt a worker was not written by this process's previous image: the socket's maker is {0}")]
    NotMyOwn(u32),
    #[error("the start message says to adopt worker {0}, which is not this process's child")]
    NotAChild(u32),
}

/// A socketpair for a start message: the parent's end, then the child's
/// (both close-on-exec: only the end mapped into the child is inherited).
pub fn pair() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let (here, there) = UnixStream::pair()?;
    Ok((here.into(), there.into()))
}

/// Writes `birth` on the parent's end in the background (the worker reads
/// it as it starts; under `--worker-user` it holds the TLS files, more
/// than a socket's buffer), then closes it.
pub fn hand(birth: &Birth, socket: OwnedFd) -> std::io::Result<()> {
    let bytes = serde_json::to_vec(birth).map_err(std::io::Error::other)?;
    let socket = UnixStream::from(socket);
    socket.set_nonblocking(true)?;
    let mut socket = tokio::net::UnixStream::from_std(socket)?;
    tokio::spawn(async move {
        let written = tokio::time::timeout(HAND_LIMIT, socket.write_all(&bytes)).await;
        if !matches!(written, Ok(Ok(()))) {
            tracing::warn!("a worker did not take its start message; it will not start");
        }
    });
    Ok(())
}

/// Writes `birth` on the parent's end at once, then closes it: before an
/// exec, which nothing runs after. Only for a message well within a
/// socket's buffer (an [`Adoption`]), which never waits for the reader.
pub fn write_now(birth: &Birth, socket: OwnedFd) -> std::io::Result<()> {
    let bytes = serde_json::to_vec(birth).map_err(std::io::Error::other)?;
    UnixStream::from(socket).write_all(&bytes)
}

/// Reads the start message to the socket's end; also who made the socket.
fn read(socket: OwnedFd) -> Result<(Birth, Option<u32>), Refusal> {
    let maker = rustix::net::sockopt::socket_peercred(socket.as_fd())
        .ok()
        .and_then(|cred| u32::try_from(cred.pid.as_raw_nonzero().get()).ok());
    let mut bytes = Vec::new();
    UnixStream::from(socket)
        .take(MAX_BIRTH)
        .read_to_end(&mut bytes)
        .map_err(Refusal::Read)?;
    let birth = serde_json::from_slice(&bytes).map_err(Refusal::Malformed)?;
    Ok((birth, maker))
}

/// A worker's start message, once it is seen to come from its parent.
/// The worker must already die with its parent (`PR_SET_PDEATHSIG`): a
/// supervisor that died before that is no longer the parent here.
pub fn worker(socket: OwnedFd) -> Result<WorkerBirth, Refusal> {
    let (birth, maker) = read(socket)?;
    let Birth::Worker(birth) = birth else {
        return Err(Refusal::NotMine("supervisor"));
    };
    let parent = pid(rustix::process::getppid());
    for (what, actual) in [
        ("this worker's parent", parent),
        ("the socket's maker", maker),
    ] {
        if actual != Some(birth.supervisor) {
            return Err(Refusal::NotTheSupervisor {
                claimed: birth.supervisor,
                what,
                actual: actual.unwrap_or(0),
            });
        }
    }
    Ok(*birth)
}

/// A re-executed supervisor's start message, once the worker it names is
/// seen to be this process's child (made, as the socket was, by its
/// previous image: the pid is the same).
pub fn adoption(socket: OwnedFd) -> Result<Adoption, Refusal> {
    let (birth, maker) = read(socket)?;
    let Birth::Supervisor(adoption) = birth else {
        return Err(Refusal::NotMine("worker"));
    };
    if maker != Some(std::process::id()) {
        return Err(Refusal::NotMyOwn(maker.unwrap_or(0)));
    }
    if !is_child(adoption.worker) {
        return Err(Refusal::NotAChild(adoption.worker));
    }
    Ok(adoption)
}

/// Whether `pid` is a child of this process, running or not yet reaped:
/// `waitid` on anything else is `ECHILD`. Nothing is reaped (`WNOWAIT`).
fn is_child(pid: u32) -> bool {
    use rustix::process::{waitid, Pid, WaitId, WaitIdOptions};
    let Some(pid) = i32::try_from(pid).ok().and_then(Pid::from_raw) else {
        return false;
    };
    let options = WaitIdOptions::EXITED | WaitIdOptions::NOHANG | WaitIdOptions::NOWAIT;
    waitid(WaitId::Pid(pid), options).is_ok()
}

fn pid(pid: Option<rustix::process::Pid>) -> Option<u32> {
    pid.and_then(|p| u32::try_from(p.as_raw_nonzero().get()).ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::worker_user::TlsPem;

    #[tokio::test]
    async fn a_start_message_arrives_whole_and_its_maker_is_known() {
        let (here, there) = pair().unwrap();
        let birth = Birth::Worker(Box::new(WorkerBirth {
            supervisor: 7,
            restarts: 3,
            previous_exit: Some("was killed by SIGSEGV".into()),
            store_wait: true,
            secrets: Some(Handed {
                tokens: "ci deploy sha256:00\n".into(),
                source: "tokens".into(),
                tls: Some(TlsPem {
                    cert: "CERT".into(),
                    key: "KEY".repeat(100_000),
                    client_ca: None,
                }),
            }),
            ..WorkerBirth::default()
        }));
        assert!(!format!("{birth:?}").contains("KEY"));
        hand(&birth, here).unwrap();
        let (got, maker) = tokio::task::spawn_blocking(move || read(there))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(maker, Some(std::process::id()));
        let Birth::Worker(got) = got else {
            panic!("{got:?}")
        };
        assert_eq!((got.supervisor, got.restarts, got.store_wait), (7, 3, true));
        assert_eq!(got.previous_exit.as_deref(), Some("was killed by SIGSEGV"));
        assert_eq!(got.secrets.unwrap().tls.unwrap().key.len(), 300_000);
    }

    #[test]
    fn a_worker_believes_only_its_parent() {
        // This process's parent made no socket here: whoever the message
        // names, the maker (this process) or the parent disagrees.
        for supervisor in [std::process::id(), pid(rustix::process::getppid()).unwrap()] {
            let (here, there) = pair().unwrap();
            let birth = Birth::Worker(Box::new(WorkerBirth {
                supervisor,
                ..WorkerBirth::default()
            }));
            write_now(&birth, here).unwrap();
            assert!(
                matches!(worker(there), Err(Refusal::NotTheSupervisor { .. })),
                "{supervisor}"
            );
        }
    }

    #[test]
    fn only_a_child_is_adopted() {
        let adopt = |worker: u32| {
            let (here, there) = pair().unwrap();
            write_now(
                &Birth::Supervisor(Adoption {
                    worker,
                    restarts: 2,
                }),
                here,
            )
            .unwrap();
            adoption(there)
        };
        let parent = pid(rustix::process::getppid()).unwrap();
        assert!(matches!(adopt(parent), Err(Refusal::NotAChild(p)) if p == parent));
        assert!(matches!(adopt(0), Err(Refusal::NotAChild(0))));
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let adopted = adopt(child.id()).unwrap();
        assert_eq!((adopted.worker, adopted.restarts), (child.id(), 2));
        child.kill().unwrap();
        child.wait().unwrap();
        // A worker's message is not a supervisor's.
        let (here, there) = pair().unwrap();
        write_now(&Birth::Worker(Box::default()), here).unwrap();
        assert!(matches!(adoption(there), Err(Refusal::NotMine(_))));
    }
}
