//! Connection slots of the listeners only the operator's tools use: the
//! control plane, the plaintext health listener and the metrics listener.
//! Each has a fixed number of slots. A connection must have a request
//! reach the service within [`FIRST_REQUEST_TIMEOUT`] of its accept — TLS
//! handshake, HTTP/2 preface and request headers included — or it is
//! closed. It is *proven* (it keeps its slot when they are full) on the
//! control plane only once a request passed authentication (the gate,
//! `gate.rs`, calls `Slots::prove` before reading the message), on the
//! open listeners (health, metrics: anyone may ask them) by any request.
//! When every slot is taken, the oldest unproven connection gives way to
//! the newcomer, so strangers that trickle bytes or never finish a
//! handshake cannot hold the owner out; on the open listeners the oldest
//! proven one gives way too. Only when every slot is held by a proven
//! connection of the control plane do new ones wait in the listen backlog.
//!
//! The accept loop itself ([`accept`]) is every listener's, the data
//! plane's too (`http.rs`): wait until a newcomer may be taken from the
//! backlog, take it, give it a slot (or turn it away) as its listener's
//! [`Seats`] say, hear the stop throughout, and retry an accept that fails
//! after a pause.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::time::Sleep;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::{Connected, TcpConnectInfo, TlsConnectInfo};

/// From accept to the end of the first request's headers.
pub const FIRST_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// A listener's slots as its accept loop ([`accept`]) sees them.
pub trait Seats {
    /// A connection with its slot.
    type Seated;

    /// Returns once a newcomer may be taken from the backlog (until then
    /// it waits there).
    async fn room(&self);

    /// Gives `stream`, just accepted, its slot, waiting for one if need
    /// be; `None` if it was turned away.
    async fn seat(&self, stream: TcpStream, peer: SocketAddr) -> Option<Self::Seated>;
}

/// The next connection on `listener` (`what` in the log) with its slot;
/// `None` once `stop` resolves. Nothing is accepted before `seats` have
/// room. An accept that fails (out of file descriptors, say) is logged and
/// retried after a pause.
pub async fn accept<S: Seats>(
    what: &str,
    listener: &TcpListener,
    seats: &S,
    mut stop: Pin<&mut impl Future<Output = ()>>,
) -> Option<S::Seated> {
    loop {
        tokio::select! {
            biased;
            () = stop.as_mut() => return None,
            () = seats.room() => {}
        }
        let (stream, peer) = tokio::select! {
            biased;
            () = stop.as_mut() => return None,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "{what} accept failed");
                    tokio::time::sleep(ACCEPT_RETRY).await;
                    continue;
                }
            },
        };
        tokio::select! {
            biased;
            () = stop.as_mut() => return None,
            seated = seats.seat(stream, peer) => {
                if seated.is_some() {
                    return seated;
                }
            }
        }
    }
}

/// The pause after an accept that failed.
const ACCEPT_RETRY: Duration = Duration::from_millis(10);

/// The slots of one listener.
pub struct Slots {
    /// Names the listener in the log.
    what: &'static str,
    max: usize,
    /// Proven connections give way too when every slot is taken.
    open: bool,
    held: Mutex<Held>,
    /// A slot was given back.
    freed: Notify,
}

#[derive(Default)]
struct Held {
    next: u64,
    /// By accept order: the first unproven one is the oldest.
    slots: BTreeMap<u64, Entry>,
    /// How a request finds its connection's slot.
    by_peer: HashMap<SocketAddr, u64>,
}

struct Entry {
    peer: Option<SocketAddr>,
    /// Completed a request: the deadline no longer applies.
    answered: Arc<AtomicBool>,
    /// Completed an authenticated request (on an open listener: any).
    proven: Arc<AtomicBool>,
    /// Taken (and fired) when the connection is told to give way.
    evict: Option<oneshot::Sender<()>>,
}

impl Held {
    /// The connection to evict for a newcomer, if any may be.
    fn victim(&self, open: bool) -> Option<u64> {
        let unproven = self
            .slots
            .iter()
            .find(|(_, e)| !e.proven.load(Ordering::Acquire))
            .map(|(id, _)| *id);
        unproven.or_else(|| open.then(|| self.slots.keys().next().copied()).flatten())
    }

    fn evicting(&self) -> bool {
        self.slots.values().any(|e| e.evict.is_none())
    }
}

impl Slots {
    pub fn new(what: &'static str, max: usize, open: bool) -> Arc<Slots> {
        Arc::new(Slots {
            what,
            max: max.max(1),
            open,
            held: Mutex::new(Held::default()),
            freed: Notify::new(),
        })
    }

    fn held(&self) -> parking_lot::MutexGuard<'_, Held> {
        self.held.lock()
    }

    /// Marks the connection from `peer` proven: it keeps its slot.
    pub fn prove(&self, peer: Option<SocketAddr>) {
        self.mark(peer, true);
    }

    /// Marks the connection from `peer` as having completed a request
    /// (one that anyone may make): it is not closed at the deadline, but
    /// still gives way to a newcomer when the slots are full.
    pub fn answered(&self, peer: Option<SocketAddr>) {
        self.mark(peer, self.open);
    }

    fn mark(&self, peer: Option<SocketAddr>, proven: bool) {
        let Some(peer) = peer else { return };
        let held = self.held();
        if let Some(entry) = held.by_peer.get(&peer).and_then(|id| held.slots.get(id)) {
            entry.answered.store(true, Ordering::Release);
            if proven {
                entry.proven.store(true, Ordering::Release);
            }
        }
    }

    /// Whether a new connection could have a slot now or once one gives way.
    fn admissible(&self) -> bool {
        let held = self.held();
        held.slots.len() < self.max || held.evicting() || held.victim(self.open).is_some()
    }

    /// Whether a slot is free; if not, tells the oldest connection that
    /// may give way to do so (once: until it has gone).
    fn make_room(&self) -> bool {
        let mut held = self.held();
        if held.slots.len() < self.max {
            return true;
        }
        if held.evicting() {
            return false;
        }
        if let Some(id) = held.victim(self.open) {
            let entry = held.slots.get_mut(&id).expect("a victim is held");
            if let Some(evict) = entry.evict.take() {
                let _ = evict.send(());
            }
            tracing::debug!(listener = self.what, peer = ?entry.peer, "a connection gives way to a new one");
        }
        false
    }

    /// Returns once `ready` says yes; woken each time a slot is given back.
    async fn until(&self, ready: impl Fn(&Slots) -> bool) {
        loop {
            // Created before the look: a slot given back after it wakes it.
            let freed = self.freed.notified();
            if ready(self) {
                return;
            }
            freed.await;
        }
    }

    /// The next connection on `listener`, in a slot of its own; `None` once
    /// `stop` resolves. Nothing is accepted while no slot can be had: the
    /// connection waits in the listen backlog.
    pub async fn accept(
        self: &Arc<Self>,
        listener: &TcpListener,
        stop: Pin<&mut impl Future<Output = ()>>,
    ) -> Option<Connection> {
        accept(self.what, listener, self, stop).await
    }

    fn admit(self: &Arc<Self>, inner: TcpStream, peer: SocketAddr) -> Connection {
        let (evict, evicted) = oneshot::channel();
        let answered = Arc::new(AtomicBool::new(false));
        let proven = Arc::new(AtomicBool::new(false));
        let mut held = self.held();
        let id = held.next;
        held.next += 1;
        held.slots.insert(
            id,
            Entry {
                peer: Some(peer),
                answered: Arc::clone(&answered),
                proven,
                evict: Some(evict),
            },
        );
        held.by_peer.insert(peer, id);
        drop(held);
        Connection {
            inner,
            slot: Slot {
                slots: Arc::clone(self),
                id,
                peer,
                answered,
                evicted,
                deadline: Some(Box::pin(tokio::time::sleep(FIRST_REQUEST_TIMEOUT))),
                closed: false,
            },
        }
    }

    /// Waits up to `within` for every connection to be gone.
    pub async fn drained(&self, within: Duration) {
        let empty = |slots: &Slots| slots.held().slots.is_empty();
        let _ = tokio::time::timeout(within, self.until(empty)).await;
    }
}

impl Seats for Arc<Slots> {
    type Seated = Connection;

    /// A slot free, or one that may be made by eviction.
    async fn room(&self) {
        self.until(Slots::admissible).await;
    }

    /// Once a slot is free (the connection told to give way has gone).
    async fn seat(&self, stream: TcpStream, peer: SocketAddr) -> Option<Connection> {
        self.until(Slots::make_room).await;
        // Without TCP_NODELAY a gRPC reply's trailers wait ~40 ms for
        // the client's delayed ACK.
        let _ = stream.set_nodelay(true);
        Some(self.admit(stream, peer))
    }
}

/// The accepted connections of `slots`, for tonic's
/// `serve_with_incoming_shutdown`.
pub fn stream(listener: TcpListener, slots: Arc<Slots>) -> ReceiverStream<io::Result<Connection>> {
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(async move {
        let closed = tx.clone();
        let mut stop = std::pin::pin!(async move { closed.closed().await });
        while let Some(connection) = slots.accept(&listener, stop.as_mut()).await {
            if tx.send(Ok(connection)).await.is_err() {
                return;
            }
        }
    });
    ReceiverStream::new(rx)
}

/// The client's address of a request, as tonic records its connection.
pub fn peer(extensions: &tonic::codegen::http::Extensions) -> Option<SocketAddr> {
    extensions
        .get::<TcpConnectInfo>()
        .and_then(TcpConnectInfo::remote_addr)
        .or_else(|| {
            extensions
                .get::<TlsConnectInfo<TcpConnectInfo>>()
                .and_then(|info| info.get_ref().remote_addr())
        })
}

struct Slot {
    slots: Arc<Slots>,
    id: u64,
    peer: SocketAddr,
    answered: Arc<AtomicBool>,
    evicted: oneshot::Receiver<()>,
    /// Until the connection has completed a request.
    deadline: Option<Pin<Box<Sleep>>>,
    /// Told to close: every read and write fails from then on.
    closed: bool,
}

impl Slot {
    /// Whether the connection must close: evicted, or not proven in time.
    fn check(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        if !self.closed {
            if Pin::new(&mut self.evicted).poll(cx).is_ready() {
                self.closed = true;
            } else if let Some(deadline) = &mut self.deadline {
                if self.answered.load(Ordering::Acquire) {
                    self.deadline = None;
                } else if deadline.as_mut().poll(cx).is_ready() {
                    tracing::debug!(listener = self.slots.what, peer = %self.peer, "no complete request in time: closed");
                    self.closed = true;
                }
            }
        }
        if self.closed {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "closed: no complete request in time, or gave way to a new connection",
            ));
        }
        Ok(())
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut held = self.slots.held();
        held.slots.remove(&self.id);
        if held.by_peer.get(&self.peer) == Some(&self.id) {
            held.by_peer.remove(&self.peer);
        }
        drop(held);
        self.slots.freed.notify_waiters();
    }
}

/// A connection holding its slot.
pub struct Connection {
    inner: TcpStream,
    slot: Slot,
}

impl Connection {
    /// Its client's address, by which `Slots::prove` finds it.
    pub fn peer(&self) -> SocketAddr {
        self.slot.peer
    }
}

impl Connected for Connection {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.inner.connect_info()
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.slot.check(cx)?;
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.slot.check(cx)?;
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.slot.check(cx)?;
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// A service wrapper that marks the connection of every request it is
/// given as answered (`Slots::answered`): for services that answer
/// anyone (health, reflection).
#[derive(Clone)]
pub struct Proving<S> {
    inner: S,
    slots: Arc<Slots>,
}

impl<S> Proving<S> {
    pub fn new(inner: S, slots: Arc<Slots>) -> Proving<S> {
        Proving { inner, slots }
    }
}

impl<S: tonic::server::NamedService> tonic::server::NamedService for Proving<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> tonic::codegen::Service<tonic::codegen::http::Request<B>> for Proving<S>
where
    S: tonic::codegen::Service<tonic::codegen::http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: tonic::codegen::http::Request<B>) -> S::Future {
        self.slots.answered(peer(request.extensions()));
        self.inner.call(request)
    }
}
