//! The data plane: HTTP/1.1 and HTTP/2 on hyper, every request answered
//! by the active release through the [`Runtime`]. The listener is never
//! closed by an upgrade; only shutdown stops it, and then in-flight
//! requests get a grace period to finish.
//!
//! Both protocols share the port: HTTP/2 in cleartext with prior
//! knowledge (a client that opens with the HTTP/2 preface), or over TLS
//! (`--http-tls-cert`, `http_tls.rs`) as ALPN picks. An HTTP/2 connection
//! carries at most `--http2-max-streams` requests at once (the client is
//! told in its settings); clients that reset streams as fast as they open
//! them, or that send more than [`H2_MAX_HEADER_LIST`] bytes of headers,
//! are refused by hyper's limits set here. The connection limits, the
//! header and idle timeouts, and the body limits below hold for both; on
//! HTTP/2 the header clock runs until the preface is in, and the idle
//! clock whenever no request is under way (frames such as pings do not
//! restart it).
//!
//! What a client can hold is bounded: at most `--max-connections` open
//! connections (so the data plane never takes the file descriptors the
//! control plane needs), of which at most `--max-connections-per-client`
//! from one IP address (beyond, a newcomer from it is answered 503 and
//! closed). At the cap, a newcomer is taken from the backlog and held
//! while the connection idle longest is closed between requests for it
//! ([`Board::shed_idle`]); with none idle, newcomers wait in the backlog.
//! The accept loop is the one every listener shares ([`incoming::accept`]);
//! [`Admission`] is what the data plane tells it.
//! A request's headers must arrive within `--http-header-timeout` of its
//! first byte (slowloris), and a connection with no request under way and
//! no byte of a new one is closed after `--http-idle-timeout` (counted from
//! the last byte of the previous response); a request's body must arrive
//! within `--http-body-timeout`. hyper has a single timer for the first
//! two waits, so each connection's [`Watchdog`] keeps them apart.
//!
//! A release that is a service (ABI v3) gets its requests with their
//! bodies streaming, and streams its responses (`streaming.rs`). For any
//! other release, bodies are buffered whole before it sees them (its ABI
//! takes a slice), so what they may take together is bounded too: the [`Budget`] (`--max-buffered-bodies`) is
//! reserved as a body's buffer grows (all of it up front when the request
//! says its `Content-Length`) and given back when the request ends. A
//! request whose body would go beyond it is answered 503 with
//! `Retry-After`; requests already reading theirs are not disturbed.
//!
//! A request whose client has closed its connection (a FIN after the
//! request: it gave up while the request waited in the backlog, or sent
//! it and half-closed) is not handed to the release: the connection is
//! closed unanswered. hyper does so itself when it knows of that EOF
//! before it calls the service (without `half_close`); on a connection
//! just taken from the backlog it does not yet, and a peek tells. Each
//! connection is on the [`Board`] with its call, for the request time
//! limit (`stuck.rs`).

use std::future::{poll_fn, Future};
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Either, Full};
use hyper::body::{Body, Incoming};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use nine9s_host::{CallError, ConnectionLimits, Returned};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify, OwnedSemaphorePermit};

use crate::config::Limits;
use crate::http_tls::HttpTls;
use crate::incoming::{self, Seats};
use crate::runtime::Runtime;
use crate::streaming::Body as ResponseBody;
use crate::stuck::{Board, Call, Client, Throttled};

/// While draining, how long a connection may sit idle before it is closed:
/// a keep-alive client about to send on it does so well within this, and
/// gets `Connection: close` with its answer instead.
const DRAIN_LINGER: Duration = Duration::from_millis(250);
const DRAIN_CHECK: Duration = Duration::from_millis(25);

/// At the cap, how often another idle connection is told to close while a
/// newcomer still has no slot (the one told before may have taken a
/// request meanwhile, and finishes it first).
const SHED_RETRY: Duration = Duration::from_millis(250);

/// What a newcomer beyond `--max-connections-per-client` is told before its
/// connection is closed.
const TOO_MANY_CONNECTIONS: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\ncontent-length: 46\r\nretry-after: 1\r\nconnection: close\r\n\r\ntoo many connections from this client address\n";

/// How an HTTP/2 connection opens (RFC 9113 §3.4): what tells it from
/// HTTP/1.1 on a cleartext connection.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n";

/// Bytes of one request's header list on HTTP/2 (HPACK-decoded); a
/// request with more is refused with 431.
const H2_MAX_HEADER_LIST: u32 = 64 * 1024;

/// Streams an HTTP/2 client may reset before the agent has even taken
/// them, at once; beyond, the connection is closed with `ENHANCE_YOUR_CALM`
/// (the "rapid reset" attack, CVE-2023-44487).
const H2_MAX_PENDING_RESETS: usize = 20;

/// Streams the agent may have to reset for a client's protocol errors on
/// one connection; beyond, the connection is closed (CVE-2025-8671).
const H2_MAX_ERROR_RESETS: usize = 256;

/// Header naming the release that answered.
pub const RELEASE_HEADER: &str = "x-nine9s-release";

/// [`RELEASE_HEADER`] parsed once: a name given as text is checked again
/// on every insert.
pub(crate) const RELEASE: hyper::header::HeaderName =
    hyper::header::HeaderName::from_static(RELEASE_HEADER);

/// Headers a release's response may not set: the agent frames the
/// response and manages the connection (RFC 9110 §7.6.1, RFC 9112 §6).
const CONNECTION_HEADERS: [hyper::header::HeaderName; 7] = [
    hyper::header::CONNECTION,
    hyper::header::CONTENT_LENGTH,
    hyper::header::TRANSFER_ENCODING,
    hyper::header::TE,
    hyper::header::TRAILER,
    hyper::header::UPGRADE,
    hyper::header::HeaderName::from_static("keep-alive"),
];

/// Accepts connections until `shutdown` resolves, then waits up to `grace`
/// for open connections to finish their requests (each is closed at a
/// request boundary, or once it has been idle for a moment). A connection
/// whose call was abandoned past the request timeout gave its slot back
/// then: it is not waited for.
pub async fn serve(
    listener: TcpListener,
    runtime: Arc<Runtime>,
    board: Arc<Board>,
    tls: Option<Arc<HttpTls>>,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) {
    let slots = Arc::clone(&board.slots);
    let budget = Arc::new(Budget::new(limits.max_buffered_bodies));
    let protocols = Arc::new(protocols(&limits));
    let (stop, stopping) = watch::channel(false);
    if let Some(tls) = &tls {
        let mut stopping = stopping.clone();
        tokio::spawn(Arc::clone(tls).watch(async move {
            let _ = stopping.wait_for(|stop| *stop).await;
        }));
    }
    tokio::pin!(shutdown);
    while let Some((stream, client, permit)) =
        incoming::accept("HTTP", &listener, &Admission(&board), shutdown.as_mut()).await
    {
        let limits = limits.clone();
        let stopping = stopping.clone();
        let watchdog = Arc::new(Watchdog::new());
        let registered = board.register(&stream, client, Arc::clone(&watchdog));
        let served = Arc::new(Served {
            runtime: Arc::clone(&runtime),
            board: Arc::clone(&board),
            watchdog,
            call: Arc::clone(&registered.call),
            budget: Arc::clone(&budget),
        });
        let tls = tls.clone();
        let protocols = Arc::clone(&protocols);
        tokio::spawn(async move {
            connection(stream, tls, &protocols, served, &limits, stopping).await;
            if registered.call.rescued() {
                // Given back when its call was abandoned.
                permit.forget();
            } else {
                drop(permit);
            }
        });
    }
    drop(listener);
    tracing::info!("HTTP listener closed; draining open connections");
    let _ = stop.send(true);
    let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    if tokio::time::timeout(grace, slots.acquire_many(all))
        .await
        .is_err()
    {
        tracing::warn!(
            grace_ms = grace.as_millis() as u64,
            "grace period over with requests still open"
        );
    }
}

/// The data plane's slots as its accept loop ([`incoming::accept`]) sees
/// them. Below the cap, a newcomer takes a slot at once. At the cap, it is
/// accepted all the same and held (one connection beyond the cap at most:
/// the loop takes no other meanwhile) while an idle connection is told to
/// close for it, until a slot frees. A newcomer from an address that holds
/// `--max-connections-per-client` already is answered 503 and closed.
struct Admission<'a>(&'a Arc<Board>);

impl Seats for Admission<'_> {
    /// The connection, counted for its client address, with its slot.
    type Seated = (TcpStream, Client, OwnedSemaphorePermit);

    /// Always: at the cap, the newcomer is held rather than left in the
    /// backlog.
    async fn room(&self) {}

    async fn seat(&self, stream: TcpStream, peer: SocketAddr) -> Option<Self::Seated> {
        let board = self.0;
        let Some(client) = board.client(peer.ip()) else {
            // Nothing is read: the answer goes out at once, and the close.
            let _ = stream.try_write(TOO_MANY_CONNECTIONS);
            if let Some(refused) = board.crowded.note() {
                tracing::warn!(
                    client = %peer.ip(),
                    refused,
                    "a client address already holds --max-connections-per-client connections: a new one from it was answered 503 and closed ({refused} so far)"
                );
            }
            return None;
        };
        if let Ok(permit) = Arc::clone(&board.slots).try_acquire_owned() {
            return Some((stream, client, permit));
        }
        loop {
            if board.shed_idle() {
                tracing::debug!(
                    "at --max-connections: an idle connection is closed for a newcomer"
                );
            }
            tokio::select! {
                biased;
                permit = Arc::clone(&board.slots).acquire_owned() => {
                    return Some((stream, client, permit.expect("never closed")));
                }
                () = tokio::time::sleep(SHED_RETRY) => {}
            }
        }
    }
}

/// HTTP/1.1 and HTTP/2 as every connection speaks them.
type Protocols = auto::Builder<TokioExecutor>;

/// The protocols' settings, made once: HTTP/2's limits.
fn protocols(limits: &Limits) -> Protocols {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.http2_max_streams)
        .max_header_list_size(H2_MAX_HEADER_LIST)
        .max_pending_accept_reset_streams(H2_MAX_PENDING_RESETS)
        .max_local_error_reset_streams(H2_MAX_ERROR_RESETS);
    builder
}

/// What a connection's requests are served with. One reference per
/// connection, cloned per request: the runtime's own count is shared by
/// every thread, this one by this connection.
struct Served {
    runtime: Arc<Runtime>,
    board: Arc<Board>,
    watchdog: Arc<Watchdog>,
    /// The connection's call on the board (an HTTP/1.1 request's).
    call: Arc<Call>,
    budget: Arc<Budget>,
}

/// Serves one connection (after its TLS handshake, with `tls`) until it
/// ends, times out, is told to make room for a newcomer, or shutdown lets
/// its last request finish.
async fn connection(
    stream: TcpStream,
    tls: Option<Arc<HttpTls>>,
    protocols: &Protocols,
    served: Arc<Served>,
    limits: &Limits,
    stopping: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    let remote = stream.peer_addr().ok();
    let (stream, unread) = match tls {
        Some(_) => (stream, Bytes::new()),
        None => match release_serves(stream, remote, &served, limits, &stopping).await {
            Some(agent_serves) => agent_serves,
            None => return,
        },
    };
    let io = Watched {
        inner: stream,
        unread,
        watchdog: Arc::clone(&served.watchdog),
        call: Arc::clone(&served.call),
        fresh: true,
    };
    let Some(tls) = tls else {
        return drive(io, remote, protocols, served, limits, stopping).await;
    };
    // The handshake is the first thing a client sends: it has the header
    // timeout, as a request's first line would.
    match tokio::time::timeout(limits.http_header_timeout, tls.acceptor().accept(io)).await {
        Ok(Ok(io)) => {
            if io.get_ref().1.alpn_protocol() == Some(b"h2") {
                served.watchdog.multiplexed();
            }
            drive(io, remote, protocols, served, limits, stopping).await;
        }
        Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
        Err(_) => tracing::debug!("TLS handshake too slow"),
    }
}

/// While the active release serves its connections itself, a plain
/// HTTP/1.1 connection is the release's: handed over, given back at each
/// switch and handed to whichever release serves then. Its first bytes
/// tell HTTP/1.1 from HTTP/2's preface (which the agent serves). The socket comes back here, with what was
/// read of it and not served, once the agent is to serve it (HTTP/2, a
/// release that does not serve connections, a canary, the agent
/// stopping); `None` once the connection has ended.
async fn release_serves(
    mut stream: TcpStream,
    remote: Option<SocketAddr>,
    served: &Served,
    limits: &Limits,
    stopping: &watch::Receiver<bool>,
) -> Option<(TcpStream, Bytes)> {
    use tokio::io::AsyncReadExt;
    if !served.runtime.release_serves_connections() {
        return Some((stream, Bytes::new()));
    }
    // Until its first byte, a new connection is idle, as the agent holds
    // its own.
    let mut first = bytes::BytesMut::with_capacity(4096);
    match tokio::time::timeout(limits.http_idle_timeout, stream.read_buf(&mut first)).await {
        Ok(Ok(n)) if n > 0 => {}
        _ => return None,
    }
    let mut unread = first.freeze();
    let preface = &H2_PREFACE[..unread.len().min(H2_PREFACE.len())];
    if unread.starts_with(preface) || peer_closed(&stream) {
        // The agent serves HTTP/2, and does not answer a client that has
        // gone already.
        return Some((stream, unread));
    }
    // Never shed for a newcomer while the release holds it: the agent
    // could not close it between requests.
    let _held = served.watchdog.request();
    let remote = remote.map(|r| r.to_string()).unwrap_or_default();
    let connection_limits = ConnectionLimits {
        header_timeout: limits.http_header_timeout,
        idle_timeout: limits.http_idle_timeout,
        body_timeout: limits.http_body_timeout,
        request_timeout: limits.request_timeout,
        max_body: limits.max_body as u64,
    };
    let mut stopping = stopping.clone();
    loop {
        if *stopping.borrow_and_update() {
            return Some((stream, unread));
        }
        let socket = OwnedFd::from(stream.into_std().ok()?);
        let handed = match served
            .runtime
            .hand_connection(socket, unread, remote.clone(), connection_limits)
            .await
        {
            Ok(handed) => handed,
            Err((socket, unread)) => return Some((tokio_stream(socket)?, unread)),
        };
        let back = tokio::select! {
            back = poll_fn(|cx| handed.poll_back(cx)) => back,
            () = async { let _ = stopping.wait_for(|stop| *stop).await; } => {
                // Back at their request boundaries, for the agent to drain.
                served.runtime.take_connections_back();
                poll_fn(|cx| handed.poll_back(cx)).await
            }
        };
        match back {
            Returned::Closed => return None,
            Returned::Back { fd, unread: rest } => {
                stream = tokio_stream(fd)?;
                unread = rest;
            }
        }
    }
}

/// A socket back on the agent's runtime.
fn tokio_stream(socket: OwnedFd) -> Option<TcpStream> {
    let socket = std::net::TcpStream::from(socket);
    socket.set_nonblocking(true).ok()?;
    TcpStream::from_std(socket).ok()
}

/// Whether the client has closed its side (a FIN waits to be read).
fn peer_closed(stream: &TcpStream) -> bool {
    let mut byte = [0u8; 1];
    let flags = rustix::net::RecvFlags::PEEK | rustix::net::RecvFlags::DONTWAIT;
    matches!(rustix::net::recv(stream, &mut byte, flags), Ok((_, 0)))
}

/// Serves HTTP/1.1 or HTTP/2 (as the client opens) on `io`.
async fn drive<I>(
    io: I,
    remote: Option<SocketAddr>,
    protocols: &Protocols,
    served: Arc<Served>,
    limits: &Limits,
    mut stopping: watch::Receiver<bool>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let watchdog = Arc::clone(&served.watchdog);
    let service = {
        let body_limits = (limits.max_body, limits.http_body_timeout);
        let streaming = crate::streaming::Limits {
            max_body: limits.max_body,
            body_timeout: limits.http_body_timeout,
            request_timeout: limits.request_timeout,
        };
        service_fn(move |request: Request<Incoming>| {
            let served = Arc::clone(&served);
            async move {
                let Served {
                    runtime,
                    board,
                    watchdog,
                    call,
                    budget,
                } = &*served;
                if request.version() == hyper::Version::HTTP_2 && !watchdog.is_multiplexed() {
                    // Its preface came in pieces, or over TLS without ALPN.
                    watchdog.multiplexed();
                }
                let busy = watchdog.request();
                let request = if runtime.serves_services() {
                    // As in `answer`: a request whose client has gone is not handed on.
                    if watchdog.peer_closed.load(Ordering::Relaxed) {
                        return Err(Unanswered::ClientGone);
                    }
                    match crate::streaming::offer(runtime, request, remote, streaming).await {
                        Ok(response) => return Ok(drained(watchdog, hold(response, busy))),
                        Err(request) => request,
                    }
                } else {
                    request
                };
                // An HTTP/2 request is a call of its own on the board: the
                // connection has others under way.
                let stream = (request.version() == hyper::Version::HTTP_2)
                    .then(|| board.register_stream(call));
                let call = stream.as_ref().map_or(&**call, |s| &*s.call);
                let response =
                    answer(runtime, request, body_limits, budget, watchdog, call).await?;
                drop(busy);
                Ok::<_, Unanswered>(drained(watchdog, response.map(Either::Left)))
            }
        })
    };

    let conn = protocols.serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    // Tells whether the agent began to stop without registering a waker:
    // `stopping` is the one that does.
    let stop_seen = stopping.clone();
    let mut draining = false;
    let mut closing = false;
    loop {
        let wait = if draining {
            DRAIN_CHECK
        } else {
            watchdog.next_check(limits)
        };
        let sleep = tokio::time::sleep(wait);
        tokio::pin!(sleep);
        let changed = stopping.changed();
        tokio::pin!(changed);
        let shed = watchdog.shed_signal.notified();
        tokio::pin!(shed);
        let mut registered = false;
        // The connection is polled on every wake-up; the timer and the stop
        // signal only once, to register this task's waker, and then only
        // looked at (two atomic loads). Polling them on every wake-up, as
        // `select!` does, costs a lock per poll of the stop signal.
        let event = std::future::poll_fn(|cx| {
            if let Poll::Ready(ended) = conn.as_mut().poll(cx) {
                return Poll::Ready(Wake::Ended(ended));
            }
            if !registered {
                registered = true;
                // Outside tokio's cooperative budget: a poll the budget
                // refused would register nothing, and this task would then
                // hear neither its timer nor the stop again.
                let _ = std::pin::pin!(tokio::task::unconstrained(sleep.as_mut())).poll(cx);
                if !draining {
                    let _ = std::pin::pin!(tokio::task::unconstrained(changed.as_mut())).poll(cx);
                }
                if !closing {
                    let _ = std::pin::pin!(tokio::task::unconstrained(shed.as_mut())).poll(cx);
                }
            }
            if !draining && stop_seen.has_changed().unwrap_or(true) {
                return Poll::Ready(Wake::Stopping);
            }
            if !closing && watchdog.shed.load(Ordering::Relaxed) {
                return Poll::Ready(Wake::Shed);
            }
            if sleep.is_elapsed() {
                return Poll::Ready(Wake::Tick);
            }
            Poll::Pending
        })
        .await;
        match event {
            Wake::Ended(ended) => {
                if let Err(e) = ended {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                return;
            }
            Wake::Stopping => {
                // Not closed under a client that may be sending on it right
                // now: a request in flight or arriving soon is answered with
                // `Connection: close`; one that stays idle is closed below.
                draining = true;
                watchdog.draining.store(true, Ordering::Relaxed);
                if watchdog.is_multiplexed() {
                    // HTTP/2 says so itself (GOAWAY): the requests under
                    // way finish, the client opens no more on it.
                    closing = true;
                    conn.as_mut().graceful_shutdown();
                }
            }
            Wake::Shed => {
                // Told between requests, or just as one began: hyper
                // closes at once when idle, else after that response.
                closing = true;
                conn.as_mut().graceful_shutdown();
            }
            Wake::Tick => {
                if draining && !closing && watchdog.idle_for() >= DRAIN_LINGER {
                    closing = true;
                    conn.as_mut().graceful_shutdown();
                } else if let Some(why) = watchdog.expired(limits) {
                    tracing::debug!(why, "closing an HTTP connection");
                    return;
                }
            }
        }
    }
}

/// Why a request gets no response: hyper closes its connection.
#[derive(Debug, thiserror::Error)]
enum Unanswered {
    #[error("the client closed its connection before its request was handled")]
    ClientGone,
    #[error("the call ran past the request timeout: the client was answered 504")]
    Abandoned,
}

/// What woke a connection's task.
enum Wake {
    Ended(Result<(), Box<dyn std::error::Error + Send + Sync>>),
    Stopping,
    /// Its slot is wanted for a newcomer.
    Shed,
    Tick,
}

/// What a connection is doing, for its timeouts and for the board (is it
/// idle?): when it last changed phase, whether a request is under way,
/// whether bytes of the next request have come.
pub(crate) struct Watchdog {
    started: Instant,
    /// Milliseconds after `started` of the last phase change.
    since_ms: AtomicU64,
    /// Requests under way (0 or 1 on HTTP/1.1).
    busy: AtomicUsize,
    /// Bytes read since the last request was answered.
    pending: AtomicU64,
    /// The agent is stopping: responses say `Connection: close`.
    draining: AtomicBool,
    /// The client closed its side before its first request was handled:
    /// it sends nothing more, and reads no answer either, as far as anyone
    /// can tell.
    peer_closed: AtomicBool,
    /// The board wants this connection's slot for a newcomer: it closes
    /// between requests ([`Watchdog::shed`]).
    shed: AtomicBool,
    /// Wakes the connection's task once `shed` is set.
    shed_signal: Notify,
    /// The connection speaks HTTP/2: bytes read are frames of any kind,
    /// not the start of a request.
    multiplexed: AtomicBool,
}

impl Watchdog {
    fn new() -> Watchdog {
        Watchdog {
            started: Instant::now(),
            since_ms: AtomicU64::new(0),
            busy: AtomicUsize::new(0),
            pending: AtomicU64::new(0),
            draining: AtomicBool::new(false),
            peer_closed: AtomicBool::new(false),
            shed: AtomicBool::new(false),
            shed_signal: Notify::new(),
            multiplexed: AtomicBool::new(false),
        }
    }

    /// The connection turned out to be HTTP/2: its preface is in.
    fn multiplexed(&self) {
        self.multiplexed.store(true, Ordering::Relaxed);
        self.pending.store(0, Ordering::Relaxed);
        self.mark();
    }

    fn is_multiplexed(&self) -> bool {
        self.multiplexed.load(Ordering::Relaxed)
    }

    /// How long the connection has been idle, if it is and has not been
    /// told to close yet.
    pub(crate) fn sheddable(&self) -> Option<Duration> {
        let idle = self.busy.load(Ordering::Relaxed) == 0
            && self.pending.load(Ordering::Relaxed) == 0
            && !self.shed.load(Ordering::Relaxed);
        idle.then(|| self.in_phase())
    }

    /// Tells the connection to close between requests.
    pub(crate) fn shed(&self) {
        self.shed.store(true, Ordering::Relaxed);
        self.shed_signal.notify_one();
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    fn mark(&self) {
        self.since_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    fn read(&self, bytes: usize) {
        if self.is_multiplexed() {
            return;
        }
        if bytes > 0 && self.pending.fetch_add(bytes as u64, Ordering::Relaxed) == 0 {
            // The first byte of a request: its header clock starts.
            self.mark();
        }
    }

    /// A response still going out keeps the connection from counting as
    /// idle: the idle clock starts from the last byte written.
    fn wrote(&self, polled: &Poll<std::io::Result<usize>>) {
        if matches!(polled, Poll::Ready(Ok(n)) if *n > 0)
            && self.busy.load(Ordering::Relaxed) == 0
            && self.pending.load(Ordering::Relaxed) == 0
        {
            self.mark();
        }
    }

    fn request(self: &Arc<Self>) -> Busy {
        self.busy.fetch_add(1, Ordering::Relaxed);
        Busy(Arc::clone(self))
    }

    /// How long the current phase may last, if it is bounded.
    fn limit(&self, limits: &Limits) -> Option<(Duration, &'static str)> {
        if self.busy.load(Ordering::Relaxed) > 0 {
            None
        } else if self.pending.load(Ordering::Relaxed) > 0 {
            Some((limits.http_header_timeout, "request headers too slow"))
        } else {
            Some((limits.http_idle_timeout, "idle"))
        }
    }

    /// How long the connection has had no request under way and no byte
    /// of a new one.
    fn idle_for(&self) -> Duration {
        if self.busy.load(Ordering::Relaxed) > 0 || self.pending.load(Ordering::Relaxed) > 0 {
            return Duration::ZERO;
        }
        self.in_phase()
    }

    /// Time since the last phase change.
    fn in_phase(&self) -> Duration {
        let since = self.since_ms.load(Ordering::Relaxed);
        Duration::from_millis(self.now_ms().saturating_sub(since))
    }

    fn expired(&self, limits: &Limits) -> Option<&'static str> {
        let (limit, why) = self.limit(limits)?;
        (self.in_phase() >= limit).then_some(why)
    }

    fn next_check(&self, limits: &Limits) -> Duration {
        // Phases change without waking the connection task; a check at
        // least every second keeps a new phase's deadline within a second.
        let second = Duration::from_secs(1);
        match self.limit(limits) {
            Some((limit, _)) => limit
                .saturating_sub(self.in_phase())
                .clamp(Duration::from_millis(10), second),
            None => second,
        }
    }
}

/// Tells the client at a request boundary that this connection ends if
/// the agent is stopping: it opens another for its next request.
fn drained(watchdog: &Watchdog, mut response: Response<ResponseBody>) -> Response<ResponseBody> {
    // On HTTP/2, GOAWAY says it (see `Wake::Stopping`).
    if watchdog.draining.load(Ordering::Relaxed) && !watchdog.is_multiplexed() {
        response
            .headers_mut()
            .insert(hyper::header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// A streamed response keeps its request under way until it is sent.
fn hold(mut response: Response<ResponseBody>, busy: Busy) -> Response<ResponseBody> {
    if let Either::Right(streamed) = response.body_mut() {
        streamed.hold(busy);
    }
    response
}

/// A request under way; when it ends, the connection is idle again.
struct Busy(Arc<Watchdog>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.pending.store(0, Ordering::Relaxed);
        self.0.busy.fetch_sub(1, Ordering::Relaxed);
        self.0.mark();
    }
}

/// The socket, telling the watchdog about every read, and the call record
/// whether every write went out. What was read of it before it came here
/// (`unread`) is read first.
struct Watched {
    inner: TcpStream,
    unread: Bytes,
    watchdog: Arc<Watchdog>,
    call: Arc<Call>,
    /// What the client sent before the first read has not all been read.
    fresh: bool,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = if self.unread.is_empty() {
            Pin::new(&mut self.inner).poll_read(cx, buf)
        } else {
            let n = self.unread.len().min(buf.remaining());
            buf.put_slice(&self.unread.split_to(n));
            Poll::Ready(Ok(()))
        };
        let read = buf.filled().len() - before;
        if self.fresh
            && !self.watchdog.is_multiplexed()
            && buf.filled()[before..].starts_with(H2_PREFACE)
        {
            self.watchdog.multiplexed();
        }
        self.watchdog.read(read);
        if read > 0 && self.fresh {
            // A connection taken from the backlog is read before the driver
            // has heard of it, so a FIN that came after the request is not
            // known yet (once it is, hyper sees the EOF itself before it
            // calls the service): a peek tells, once what the client sent
            // has been read (the first read, which tells HTTP/1.1 from
            // HTTP/2, takes only the preface's length).
            let mut byte = [0u8; 1];
            let flags = rustix::net::RecvFlags::PEEK | rustix::net::RecvFlags::DONTWAIT;
            match rustix::net::recv(&self.inner, &mut byte, flags) {
                Ok((_, 0)) => {
                    self.watchdog.peer_closed.store(true, Ordering::Relaxed);
                    self.fresh = false;
                }
                Ok(_) => {}
                Err(_) => self.fresh = false,
            }
        }
        polled
    }
}

impl tokio::io::AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.watchdog.wrote(&polled);
        self.call
            .wrote(matches!(polled, Poll::Ready(Ok(n)) if n == buf.len()));
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.watchdog.wrote(&polled);
        let all: usize = bufs.iter().map(|b| b.len()).sum();
        self.call
            .wrote(matches!(polled, Poll::Ready(Ok(n)) if n == all));
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

async fn answer(
    runtime: &Runtime,
    request: Request<Incoming>,
    (max_body, body_timeout): (usize, Duration),
    budget: &Arc<Budget>,
    watchdog: &Watchdog,
    call: &Call,
) -> Result<Response<Full<Bytes>>, Unanswered> {
    let (parts, body) = request.into_parts();
    // Held until the request ends: the body's bytes stay reserved while
    // the release reads them.
    let (body, _reserved) = if body.is_end_stream() {
        (Vec::new(), None)
    } else {
        match tokio::time::timeout(body_timeout, read_body(body, max_body, budget)).await {
            Ok(Ok((body, reserved))) => (body, Some(reserved)),
            Err(_) => {
                let mut response = plain(
                    StatusCode::REQUEST_TIMEOUT,
                    format!(
                        "the request body did not arrive within {} ms\n",
                        body_timeout.as_millis()
                    ),
                );
                response
                    .headers_mut()
                    .insert(hyper::header::CONNECTION, HeaderValue::from_static("close"));
                return Ok(response);
            }
            Ok(Err(BodyError::TooLarge)) => {
                let mut response = plain(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("the request body is over {max_body} bytes\n"),
                );
                // The rest of the body is not read.
                response
                    .headers_mut()
                    .insert(hyper::header::CONNECTION, HeaderValue::from_static("close"));
                return Ok(response);
            }
            Ok(Err(BodyError::OverBudget)) => {
                if let Some(refused) = budget.refused.note() {
                    tracing::warn!(
                        path = parts.uri.path(),
                        budget = budget.max,
                        refused,
                        "request bodies buffered would go over --max-buffered-bodies: a request was answered 503 ({refused} so far)"
                    );
                }
                let mut response = plain(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "too many request bodies are being received: retry shortly\n".to_owned(),
                );
                let headers = response.headers_mut();
                headers.insert(hyper::header::RETRY_AFTER, HeaderValue::from_static("1"));
                headers.insert(hyper::header::CONNECTION, HeaderValue::from_static("close"));
                return Ok(response);
            }
            Ok(Err(BodyError::Read(e))) => {
                return Ok(plain(
                    StatusCode::BAD_REQUEST,
                    format!("cannot read the request body: {e}\n"),
                ));
            }
        }
    };
    if watchdog.peer_closed.load(Ordering::Relaxed) {
        tracing::debug!(
            path = parts.uri.path(),
            "{}: not handled",
            Unanswered::ClientGone
        );
        return Err(Unanswered::ClientGone);
    }
    let plugin_request = nine9s_host::Request {
        method: parts.method.as_str(),
        path: parts.uri.path(),
        query: parts.uri.query().unwrap_or(""),
        headers: &parts.headers,
        body: &body,
    };
    let handled = runtime
        .handle(&plugin_request, call)
        .await
        .ok_or(Unanswered::Abandoned)?;
    let version = handled.version;
    let mut response = match handled.result {
        Ok(reply) if !crate::runtime::answerable(reply.status) => {
            tracing::error!(%version, path = parts.uri.path(), status = reply.status, "release answered a status that is no final HTTP status (200 to 599); the client gets 502");
            plain(
                StatusCode::BAD_GATEWAY,
                format!(
                    "release {version} answered status {}, which is no final HTTP status\n",
                    reply.status
                ),
            )
        }
        Ok(reply) => {
            let status =
                StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let mut headers = reply.headers;
            // The framing and the connection are the agent's: a release
            // that set them could desynchronise the client's connection.
            strip_connection_headers(&mut headers);
            let mut response = Response::new(Full::new(reply.body));
            *response.status_mut() = status;
            *response.headers_mut() = headers;
            response
        }
        Err(e) => {
            match &e {
                CallError::Panicked(message) => {
                    tracing::error!(%version, path = parts.uri.path(), %message, "release panicked handling a request")
                }
                other => {
                    tracing::error!(%version, path = parts.uri.path(), error = %other, "release failed a request")
                }
            }
            plain(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("release {version} failed this request: {e}\n"),
            )
        }
    };
    response
        .headers_mut()
        .insert(RELEASE, HeaderValue::from_static(version));
    Ok(response)
}

/// Why a request body was not read whole.
#[derive(Debug, thiserror::Error)]
enum BodyError {
    #[error("the body is over --max-body")]
    TooLarge,
    #[error("the body would take the buffered bodies over --max-buffered-bodies")]
    OverBudget,
    #[error(transparent)]
    Read(hyper::Error),
}

/// Reads a request body whole into one buffer, reserving its capacity in
/// `budget` before it is allocated: all of it up front for a body that
/// says its length, as the buffer grows for one that does not.
async fn read_body(
    mut body: Incoming,
    max_body: usize,
    budget: &Arc<Budget>,
) -> Result<(Vec<u8>, Reserved), BodyError> {
    let announced = body.size_hint().exact();
    let first = match announced {
        Some(n) if n > max_body as u64 => return Err(BodyError::TooLarge),
        Some(n) => n as usize,
        None => 0,
    };
    let mut reserved = budget.reserve(first).ok_or(BodyError::OverBudget)?;
    let mut buffer = Vec::with_capacity(first);
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame.map_err(BodyError::Read)?.into_data() else {
            continue; // trailers: not handed on
        };
        let needed = buffer.len() + data.len();
        if needed > max_body {
            return Err(BodyError::TooLarge);
        }
        if needed > buffer.capacity() {
            // Doubling, as a Vec would, within the body limit.
            let capacity = needed.max(buffer.capacity() * 2).min(max_body);
            if !reserved.grow(capacity - buffer.capacity()) {
                return Err(BodyError::OverBudget);
            }
            buffer.reserve_exact(capacity - buffer.len());
        }
        buffer.extend_from_slice(&data);
    }
    Ok((buffer, reserved))
}

/// The bytes request bodies may take in memory at once, all connections
/// together (`--max-buffered-bodies`).
struct Budget {
    max: usize,
    used: AtomicUsize,
    /// Requests answered 503 for it.
    refused: Throttled,
}

impl Budget {
    fn new(max: usize) -> Budget {
        Budget {
            max,
            used: AtomicUsize::new(0),
            refused: Throttled::default(),
        }
    }

    /// `bytes` of the budget, given back when the reservation is dropped;
    /// `None` if they are not left.
    fn reserve(self: &Arc<Self>, bytes: usize) -> Option<Reserved> {
        let mut reserved = Reserved {
            budget: Arc::clone(self),
            bytes: 0,
        };
        reserved.grow(bytes).then_some(reserved)
    }
}

/// Bytes of the [`Budget`] a request holds.
struct Reserved {
    budget: Arc<Budget>,
    bytes: usize,
}

impl Reserved {
    /// Takes `more` bytes of the budget, if they are left.
    fn grow(&mut self, more: usize) -> bool {
        let max = self.budget.max;
        let taken = self
            .budget
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(more).filter(|total| *total <= max)
            })
            .is_ok();
        if taken {
            self.bytes += more;
        }
        taken
    }
}

impl Drop for Reserved {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

/// Removes the headers a release may not set (see [`CONNECTION_HEADERS`]).
pub(crate) fn strip_connection_headers(headers: &mut hyper::HeaderMap) {
    if headers.keys().any(|name| CONNECTION_HEADERS.contains(name)) {
        for name in CONNECTION_HEADERS {
            headers.remove(name);
        }
    }
}

pub(crate) fn plain(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    response
}
