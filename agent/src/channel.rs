//! The channel between the supervisor and each of its workers: a
//! `SOCK_SEQPACKET` socketpair made when the worker is started (one
//! message per send; the other side's end read as the end of the stream),
//! handed to the worker beside its listeners. It carries what a signal
//! cannot: which worker is ready to take over, the socket a serving worker
//! hands its state over on (passed as `SCM_RIGHTS`), and how a
//! self-upgrade failed. What a worker is told once, as it starts, comes on
//! a socket of its own (`birth.rs`).
//!
//! The sockets a process inherits are named in `LISTEN_FDNAMES` and come
//! after its listeners in `LISTEN_FDS`; [`Inherited::take`] picks them out.

use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};

use listenfd::ListenFd;
use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags, SocketFlags, SocketType,
};
use tokio::io::Interest;

use crate::process::FailedRestart;

/// A worker's end of its channel.
pub const CHANNEL: &str = "nine9s-channel";
/// A worker started for a self-upgrade: its end of the socket the serving
/// worker hands its state over on.
pub const STATE: &str = "nine9s-state";
/// Across the supervisor's re-execution: its end of the serving worker's
/// channel, and of the socket the worker's stderr comes through.
pub const ADOPTED_CHANNEL: &str = "nine9s-adopted-channel";
/// The local control socket (`local.rs`), a listening Unix stream socket
/// the supervisor bound: passed to every worker, and to the supervisor's
/// next image across a re-execution.
pub const CONTROL: &str = "nine9s-control";
pub const ADOPTED_STDERR: &str = "nine9s-adopted-stderr";
/// A worker's end of the socket its supervisor writes its start message
/// on, or the supervisor's next image's end of the one its previous image
/// wrote its adoption on (`birth.rs`).
pub const BIRTH: &str = "nine9s-birth";

/// The largest message: a failed restart with its stderr lines.
const MAX_MESSAGE: usize = 64 * 1024;

/// What goes through a channel.
#[derive(Debug)]
pub enum Message {
    /// Worker to supervisor: started for a self-upgrade, it is ready to
    /// take over (its flags, runtime and the permanent release's library
    /// are loaded).
    Standby,
    /// Supervisor to the serving worker: stop, and hand the state over on
    /// this socket to the worker that said `Standby`.
    HandOver(OwnedFd),
    /// Supervisor to the serving worker: a self-upgrade failed.
    RestartFailed(FailedRestart),
}

/// A socketpair for a channel (close-on-exec: only the fd the worker is
/// given is inherited).
pub fn pair() -> std::io::Result<(OwnedFd, OwnedFd)> {
    Ok(rustix::net::socketpair(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )?)
}

/// Sends `message` on a channel's end: at once, or an error (a message
/// never waits for a peer that does not read).
pub fn send(socket: impl AsFd, message: &Message) -> std::io::Result<()> {
    let (body, fd) = match message {
        Message::Standby => ("standby".to_owned(), None),
        Message::HandOver(fd) => ("handover".to_owned(), Some(fd.as_fd())),
        Message::RestartFailed(failed) => (
            format!(
                "restart-failed\n{}",
                serde_json::to_string(failed).map_err(std::io::Error::other)?
            ),
            None,
        ),
    };
    if body.len() > MAX_MESSAGE {
        return Err(std::io::Error::other("the message is too large"));
    }
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    let fds = fd.map(|fd| [fd]);
    if let Some(fds) = &fds {
        control.push(SendAncillaryMessage::ScmRights(fds));
    }
    rustix::net::sendmsg(
        socket,
        &[IoSlice::new(body.as_bytes())],
        &mut control,
        SendFlags::DONTWAIT | SendFlags::NOSIGNAL,
    )?;
    Ok(())
}

/// A channel's end, read asynchronously. (Held as tokio's datagram
/// socket, whose readiness works for any socket: only `recvmsg` and
/// `sendmsg` touch it.)
pub struct Channel(tokio::net::UnixDatagram);

impl Channel {
    /// Must be called on the runtime that reads it.
    pub fn new(socket: OwnedFd) -> std::io::Result<Channel> {
        let socket = std::os::unix::net::UnixDatagram::from(socket);
        socket.set_nonblocking(true)?;
        Ok(Channel(tokio::net::UnixDatagram::from_std(socket)?))
    }

    pub fn send(&self, message: &Message) -> std::io::Result<()> {
        send(&self.0, message)
    }

    /// The next message; `None` once the other end is closed.
    pub async fn recv(&self) -> std::io::Result<Option<Message>> {
        self.0
            .async_io(Interest::READABLE, || receive(self.0.as_fd()))
            .await
    }

    pub fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.0.as_fd()
    }
}

fn receive(socket: std::os::fd::BorrowedFd<'_>) -> std::io::Result<Option<Message>> {
    let mut body = vec![0u8; MAX_MESSAGE];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let received = rustix::net::recvmsg(
        socket,
        &mut [IoSliceMut::new(&mut body)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC | RecvFlags::DONTWAIT,
    )?;
    let mut fds: Vec<OwnedFd> = Vec::new();
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(passed) = message {
            fds.extend(passed);
        }
    }
    if received.bytes == 0 && fds.is_empty() {
        return Ok(None);
    }
    let text = String::from_utf8_lossy(&body[..received.bytes.min(body.len())]);
    let (kind, rest) = text.split_once('\n').unwrap_or((&text, ""));
    let malformed = |why: String| std::io::Error::new(std::io::ErrorKind::InvalidData, why);
    match kind {
        "standby" => Ok(Some(Message::Standby)),
        "handover" => fds
            .pop()
            .map(|fd| Some(Message::HandOver(fd)))
            .ok_or_else(|| malformed("a handover without its socket".to_owned())),
        "restart-failed" => serde_json::from_str(rest)
            .map(|failed| Some(Message::RestartFailed(failed)))
            .map_err(|e| malformed(format!("a malformed restart failure: {e}"))),
        other => Err(malformed(format!("an unknown message {other:?}"))),
    }
}

/// The sockets of [`CHANNEL`], [`STATE`], [`ADOPTED_CHANNEL`],
/// [`ADOPTED_STDERR`], [`CONTROL`] and [`BIRTH`] this process was given,
/// if any.
#[derive(Default)]
pub struct Inherited {
    pub channel: Option<OwnedFd>,
    pub control: Option<OwnedFd>,
    pub state: Option<OwnedFd>,
    pub adopted_channel: Option<OwnedFd>,
    pub adopted_stderr: Option<OwnedFd>,
    pub birth: Option<OwnedFd>,
    /// How many of the passed fds were these.
    pub count: usize,
}

impl Inherited {
    /// Takes them out of `fds` by their names in `LISTEN_FDNAMES` (made
    /// close-on-exec); they come after the listeners.
    pub fn take(fds: &mut ListenFd, names: &str) -> Result<Inherited, String> {
        let mut inherited = Inherited::default();
        for (index, name) in names.split(':').enumerate() {
            let (slot, kind) = match name {
                CHANNEL => (&mut inherited.channel, SocketType::SEQPACKET),
                STATE => (&mut inherited.state, SocketType::STREAM),
                ADOPTED_CHANNEL => (&mut inherited.adopted_channel, SocketType::SEQPACKET),
                ADOPTED_STDERR => (&mut inherited.adopted_stderr, SocketType::STREAM),
                CONTROL => (&mut inherited.control, SocketType::STREAM),
                BIRTH => (&mut inherited.birth, SocketType::STREAM),
                _ => continue,
            };
            let fd = fds
                .take_custom::<OwnedFd>(
                    index,
                    i32::from(AddressFamily::UNIX.as_raw()),
                    kind.as_raw() as i32,
                    name,
                )
                .map_err(|e| format!("LISTEN_FDS: fd {} ({name}): {e}", 3 + index))?;
            *slot = fd;
            inherited.count += 1;
        }
        Ok(inherited)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn messages_and_a_socket_go_through_and_the_end_is_seen() {
        let (here, there) = pair().unwrap();
        let there = Channel::new(there).unwrap();
        send(&here, &Message::Standby).unwrap();
        let failed = FailedRestart {
            pid: 42,
            exit: "exited with code 3".into(),
            stderr: vec!["agent: error: broken".into()],
            at_ms: 7,
            supervisor: false,
        };
        send(&here, &Message::RestartFailed(failed.clone())).unwrap();
        let (mine, passed) = std::os::unix::net::UnixStream::pair().unwrap();
        send(&here, &Message::HandOver(OwnedFd::from(passed))).unwrap();
        drop(here);
        assert!(matches!(there.recv().await, Ok(Some(Message::Standby))));
        match there.recv().await {
            Ok(Some(Message::RestartFailed(got))) => assert_eq!(got, failed),
            other => panic!("{other:?}"),
        }
        let Ok(Some(Message::HandOver(fd))) = there.recv().await else {
            panic!("no handover");
        };
        // The socket passed is the other end of `mine`.
        use std::io::{Read, Write};
        std::os::unix::net::UnixStream::from(fd)
            .write_all(b"state")
            .unwrap();
        let mut got = [0u8; 5];
        (&mine).read_exact(&mut got).unwrap();
        assert_eq!(&got, b"state");
        assert!(matches!(there.recv().await, Ok(None)));
    }
}
