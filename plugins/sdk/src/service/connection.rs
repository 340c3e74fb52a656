//! A connection the release serves itself (`FEATURE_CONNECTIONS`): hyper's
//! HTTP/1.1 on the release's runtime, each request straight to the
//! service — no call crosses the port, no thread is woken between the
//! socket and the handler. The host's limits come with the connection and
//! hold as the host holds them on its own connections: headers within
//! the header timeout of their first byte, an idle connection closed after
//! the idle timeout, a body's pieces within the body timeout and its
//! length within `max_body` (413 up front when announced), a response's
//! head within the request timeout (504). Every request is counted by the
//! host (`request_begun`/`request_ended`) and its response names the
//! release (`x-nine9s-release`).
//!
//! A yield (a switch is coming) is answered at once: hyper reads no new
//! request on the connection any more (`graceful_shutdown`), and the host
//! is told so (`connection_yielded`), so nothing that starts after the
//! switch's snapshot runs on this instance. An idle connection goes back
//! to the host with the bytes read and not served; one with a request
//! under way answers it with `Connection: close` and is closed after it.

use std::convert::Infallible;
use std::future::{poll_fn, Future};
use std::net::SocketAddr;
use std::os::fd::{FromRawFd, IntoRawFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_LENGTH, RETRY_AFTER};
use http::{Request, Response, StatusCode};
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;

use super::port::PortLink;
use super::{Body, BoxError, HttpService, Peer, ResponseBody};
use crate::abi::RawConnection;
use crate::host::{log, Level};

/// The response header naming the release that answered (the agent's).
const RELEASE: &str = "x-nine9s-release";

/// What a connection serves with, shared by its requests.
#[derive(Clone)]
pub(crate) struct Serving {
    pub(crate) port: Arc<PortLink>,
    pub(crate) service: HttpService,
    pub(crate) release: HeaderValue,
}

/// The limits the host gave with a connection.
#[derive(Debug, Clone, Copy)]
struct Limits {
    header: Duration,
    idle: Duration,
    body: Duration,
    request: Option<Duration>,
    max_body: u64,
}

impl Limits {
    fn of(taken: &RawConnection) -> Limits {
        Limits {
            header: Duration::from_millis(taken.header_timeout_ms),
            idle: Duration::from_millis(taken.idle_timeout_ms),
            body: Duration::from_millis(taken.body_timeout_ms),
            request: (taken.request_timeout_ms > 0)
                .then(|| Duration::from_millis(taken.request_timeout_ms)),
            max_body: taken.max_body,
        }
    }
}

/// A connection as the release took it, its lent parts copied.
pub(crate) struct Taken {
    fd: i32,
    unread: Bytes,
    remote: String,
    limits: Limits,
}

impl Taken {
    /// # Safety
    /// `raw` is what `take_connection` wrote, its slices still lent.
    pub(crate) unsafe fn copied(raw: &RawConnection) -> Taken {
        // SAFETY: the caller's contract.
        let (unread, remote) = unsafe { (raw.unread.as_bytes(), raw.remote.as_bytes()) };
        Taken {
            fd: raw.fd,
            unread: Bytes::copy_from_slice(unread),
            remote: String::from_utf8_lossy(remote).into_owned(),
            limits: Limits::of(raw),
        }
    }
}

/// Serves connection `id` until it ends or a yield gives it back.
pub(crate) async fn serve(
    id: u64,
    taken: Taken,
    serving: Serving,
    mut yielded: watch::Receiver<bool>,
) {
    let Taken {
        fd,
        unread,
        remote,
        limits,
    } = taken;
    // SAFETY: the host gave the socket up to this release (`take_connection`).
    let socket = unsafe { std::net::TcpStream::from_raw_fd(fd) };
    let stream = match socket
        .set_nonblocking(true)
        .and_then(|()| TcpStream::from_std(socket))
    {
        Ok(stream) => stream,
        Err(e) => {
            log(
                Level::Warn,
                &format!("cannot serve a connection handed over: {e}"),
            );
            serving.port.connection_done(id, -1, &[]);
            return;
        }
    };
    let peer = remote.parse::<SocketAddr>().ok();
    let clock = Arc::new(Clock::new());
    let io = Watched {
        unread,
        stream,
        clock: Arc::clone(&clock),
    };
    let requests = {
        let clock = Arc::clone(&clock);
        let serving = serving.clone();
        hyper::service::service_fn(move |request: Request<Incoming>| {
            let counted = Counted::begin(&serving.port, &clock);
            let (service, release) = (serving.service.clone(), serving.release.clone());
            Box::pin(respond(request, service, release, peer, limits, counted))
                as Pin<Box<dyn Future<Output = Result<Response<Counted>, Infallible>> + Send>>
        })
    };
    let mut connection = http1::Builder::new()
        .keep_alive(true)
        .serve_connection(TokioIo::new(io), requests);
    let mut asked = false;
    // A response not begun when the yield came says `Connection: close`:
    // the connection ends with it.
    let mut closing = false;
    let mut yield_now = *yielded.borrow_and_update();
    // hyper ended it cleanly: its last writes may still be buffered.
    let mut flush = false;
    let ended = loop {
        if yield_now {
            yield_now = false;
            asked = true;
            let busy = clock.busy();
            let fresh = !busy && clock.answered() == 0;
            if !fresh {
                Pin::new(&mut connection).graceful_shutdown();
            }
            serving.port.connection_yielded(id);
            if fresh {
                // No request begun, nothing written: hyper is polled no
                // more (it would serve a first request it has only in part
                // with `Connection: close`), and gives back what it read.
                break End::GiveBack;
            }
            closing = clock.unheaded();
        }
        let check = clock.next_check(&limits);
        tokio::select! {
            ended = poll_fn(|cx| connection.poll_without_shutdown(cx)) => {
                flush = ended.is_ok();
                break match ended {
                    Ok(()) if asked && !closing => End::GiveBack,
                    _ => End::Closed,
                };
            }
            changed = yielded.changed(), if !asked => {
                if changed.is_err() {
                    // The instance is stopping: it closes everything.
                    break End::Closed;
                }
                yield_now = true;
            }
            () = tokio::time::sleep(check) => {
                if clock.expired(&limits) {
                    break End::Closed;
                }
            }
        }
    };
    // hyper's `poll_without_shutdown` may end before its last write is
    // flushed: polled as a future, it flushes, then shuts the socket down
    // (which `Watched` skips for a socket that goes back). Not if it ended
    // fresh (nothing written, and it would read on) or in error.
    if flush {
        clock.keep_open(ended == End::GiveBack);
        let flushed = tokio::time::timeout(limits.idle, &mut connection).await;
        if !matches!(flushed, Ok(Ok(()))) && ended == End::GiveBack {
            drop(connection);
            serving.port.connection_done(id, -1, &[]);
            return;
        }
    }
    if ended == End::Closed {
        drop(connection);
        serving.port.connection_done(id, -1, &[]);
        return;
    }
    let parts = connection.into_parts();
    let io = parts.io.into_inner();
    let mut unread = Vec::with_capacity(io.unread.len() + parts.read_buf.len());
    unread.extend_from_slice(&io.unread);
    unread.extend_from_slice(&parts.read_buf);
    match io.stream.into_std() {
        Ok(socket) => {
            let fd = socket.into_raw_fd();
            if !serving.port.connection_done(id, fd, &unread) {
                // SAFETY: the host did not take it: still this release's.
                drop(unsafe { std::net::TcpStream::from_raw_fd(fd) });
            }
        }
        Err(_) => {
            serving.port.connection_done(id, -1, &[]);
        }
    }
}

/// How a connection ends for the release.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// Closed: the client left, a limit, or the end of the response under
    /// way when the yield came (which said `Connection: close`).
    Closed,
    /// Given back to the host at a request boundary.
    GiveBack,
}

/// One request: checked against the limits, handed to the service, its
/// response labelled and counted until its body is over.
async fn respond(
    request: Request<Incoming>,
    service: HttpService,
    release: HeaderValue,
    peer: Option<SocketAddr>,
    limits: Limits,
    mut counted: Counted,
) -> Result<Response<Counted>, Infallible> {
    let announced = request
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|n| n > limits.max_body) {
        let text = format!("the request body is over {} bytes\n", limits.max_body);
        return Ok(counted.answer(StatusCode::PAYLOAD_TOO_LARGE, text, &release));
    }
    let (mut parts, body) = request.into_parts();
    if let Some(peer) = peer {
        parts.extensions.insert(Peer(peer));
    }
    let request = Request::from_parts(parts, Body::incoming(body, limits.max_body, limits.body));
    let answer = service.respond(request);
    let answer = match limits.request {
        Some(limit) => match tokio::time::timeout(limit, answer).await {
            Ok(answer) => answer,
            Err(_) => {
                let text = format!(
                    "release {} did not answer within {} ms\n",
                    release.to_str().unwrap_or("?"),
                    limit.as_millis()
                );
                log(
                    Level::Warn,
                    "a request did not begin its response within the request timeout: answered 504",
                );
                return Ok(counted.answer(StatusCode::GATEWAY_TIMEOUT, text, &release));
            }
        },
        None => answer.await,
    };
    match answer {
        Ok(response) => {
            let (mut parts, body) = response.into_parts();
            parts.headers.insert(RELEASE, release);
            counted.status = parts.status.as_u16();
            counted.body = Some(body);
            Ok(Response::from_parts(parts, counted.headed()))
        }
        Err(e) => {
            log(Level::Error, &format!("the service failed a request: {e}"));
            let mut response = counted.answer(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the release failed this request\n".to_owned(),
                &release,
            );
            response
                .headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from_static("0"));
            Ok(response)
        }
    }
}

/// A response body, counted as one request by the host from the moment
/// hyper took the request until the body is over or dropped.
pub(crate) struct Counted {
    port: Arc<PortLink>,
    clock: Arc<Clock>,
    started: Instant,
    /// What the client gets: 499 until a response is made (the client
    /// went away first).
    status: u16,
    body: Option<ResponseBody>,
    /// Its head is made.
    headed: bool,
}

impl Counted {
    fn begin(port: &Arc<PortLink>, clock: &Arc<Clock>) -> Counted {
        port.request_begun();
        clock.begin();
        Counted {
            port: Arc::clone(port),
            clock: Arc::clone(clock),
            started: Instant::now(),
            status: 499,
            body: None,
            headed: false,
        }
    }

    /// The response's head is made: hyper writes it next.
    fn headed(mut self) -> Counted {
        self.headed = true;
        self.clock.headed.fetch_add(1, Ordering::Relaxed);
        self
    }

    /// A response of the connection's own, as text.
    fn answer(
        mut self,
        status: StatusCode,
        text: String,
        release: &HeaderValue,
    ) -> Response<Counted> {
        self.status = status.as_u16();
        self.body = Some(Box::pin(Text(Some(Bytes::from(text)))));
        let mut response = Response::new(self.headed());
        *response.status_mut() = status;
        response.headers_mut().insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain"),
        );
        response.headers_mut().insert(RELEASE, release.clone());
        response
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        let micros = u64::try_from(self.started.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.port.request_ended(self.status, micros);
        if self.headed {
            self.clock.headed.fetch_sub(1, Ordering::Relaxed);
        }
        self.clock.end();
    }
}

impl http_body::Body for Counted {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut self.get_mut().body {
            Some(body) => body.as_mut().poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.body
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), |b| b.size_hint())
    }
}

/// A whole text body.
struct Text(Option<Bytes>);

impl http_body::Body for Text {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Poll::Ready(self.get_mut().0.take().map(|b| Ok(Frame::data(b))))
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.0.as_ref().map_or(0, |b| b.len() as u64))
    }
}

/// What a connection is doing, for its header and idle timeouts: requests
/// under way, bytes read since the last one was answered, and when the
/// phase last changed.
struct Clock {
    born: Instant,
    busy: AtomicU64,
    /// Requests answered (their response over or given up).
    answered: AtomicU64,
    /// Requests under way whose response's head is made (hyper writes it
    /// as it comes).
    headed: AtomicU64,
    /// The socket goes back to the host: hyper's shutdown of it only
    /// flushes.
    keep_open: std::sync::atomic::AtomicBool,
    pending: AtomicU64,
    since_ms: AtomicU64,
}

impl Clock {
    fn new() -> Clock {
        Clock {
            born: Instant::now(),
            busy: AtomicU64::new(0),
            answered: AtomicU64::new(0),
            headed: AtomicU64::new(0),
            keep_open: std::sync::atomic::AtomicBool::new(false),
            pending: AtomicU64::new(0),
            since_ms: AtomicU64::new(0),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.born.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn mark(&self) {
        self.since_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    fn busy(&self) -> bool {
        self.busy.load(Ordering::Relaxed) > 0
    }

    fn keep_open(&self, keep: bool) {
        self.keep_open.store(keep, Ordering::Relaxed);
    }

    fn answered(&self) -> u64 {
        self.answered.load(Ordering::Relaxed)
    }

    /// Whether a request under way has no response head yet: hyper will
    /// write it with `Connection: close` once keep-alive is off.
    fn unheaded(&self) -> bool {
        self.busy.load(Ordering::Relaxed) > self.headed.load(Ordering::Relaxed)
    }

    fn read(&self, bytes: usize) {
        if bytes > 0 && self.pending.fetch_add(bytes as u64, Ordering::Relaxed) == 0 {
            // The first byte of a request: its header clock starts.
            self.mark();
        }
    }

    fn begin(&self) {
        self.busy.fetch_add(1, Ordering::Relaxed);
    }

    fn end(&self) {
        self.answered.fetch_add(1, Ordering::Relaxed);
        self.busy.fetch_sub(1, Ordering::Relaxed);
        self.pending.store(0, Ordering::Relaxed);
        self.mark();
    }

    /// The phase's limit, if it has one (none while a request is under
    /// way: the request and body timeouts hold then).
    fn limit(&self, limits: &Limits) -> Option<Duration> {
        if self.busy() {
            None
        } else if self.pending.load(Ordering::Relaxed) > 0 {
            Some(limits.header)
        } else {
            Some(limits.idle)
        }
    }

    fn in_phase(&self) -> Duration {
        Duration::from_millis(
            self.now_ms()
                .saturating_sub(self.since_ms.load(Ordering::Relaxed)),
        )
    }

    fn expired(&self, limits: &Limits) -> bool {
        self.limit(limits)
            .is_some_and(|limit| self.in_phase() >= limit)
    }

    fn next_check(&self, limits: &Limits) -> Duration {
        // Phases change without waking the task: a look at least every
        // second keeps a new phase's deadline within a second.
        let second = Duration::from_secs(1);
        self.limit(limits).map_or(second, |limit| {
            limit
                .saturating_sub(self.in_phase())
                .clamp(Duration::from_millis(10), second)
        })
    }
}

/// The socket, with the bytes read before it was handed over served
/// first, and its reads on the clock.
struct Watched {
    unread: Bytes,
    stream: TcpStream,
    clock: Arc<Clock>,
}

impl AsyncRead for Watched {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let me = self.get_mut();
        if !me.unread.is_empty() {
            let n = me.unread.len().min(buf.remaining());
            buf.put_slice(&me.unread.split_to(n));
            me.clock.read(n);
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut me.stream).poll_read(cx, buf);
        me.clock.read(buf.filled().len() - before);
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, data)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, data)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let me = self.get_mut();
        if me.clock.keep_open.load(Ordering::Relaxed) {
            return Pin::new(&mut me.stream).poll_flush(cx);
        }
        Pin::new(&mut me.stream).poll_shutdown(cx)
    }
}
