//! The load generator: C keep-alive connections, each looping `GET /` (or
//! another path) over a raw `TcpStream` with its own minimal HTTP/1.1
//! framing (status line, headers, `Content-Length` body), and the tally of
//! what came back.
//!
//! A request already sent is always waited for (up to [`REQUEST_TIMEOUT`]),
//! never abandoned at the deadline: the server may have counted it, and the
//! bench compares its own count of 200s with the server's.
//!
//! A response with `Connection: close` (what a draining agent worker
//! sends) is a response like any other: the connection is dropped and the
//! next request goes on a new one. A connection the server ends with no
//! response byte at all counts as *refused*, like a refused connect; the
//! tally keeps the two apart (`closed_unanswered`, `connect_refused`), for
//! a worker that dies mid-request closes its connections too.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

/// Longer than any switch should make a request wait; a request past it is
/// counted as failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// A response head larger than this is not what the server sends.
const MAX_HEAD: usize = 64 * 1024;
/// Error messages kept for the report, per connection and in all.
const ERROR_SAMPLES: usize = 5;
/// Names the release that answered, on every response of the agent.
const RELEASE_HEADER: &str = "x-nine9s-release";

/// What the connections saw in one phase.
#[derive(Debug, Default)]
pub struct Tally {
    /// Responses with status 200.
    pub ok: u64,
    /// Other statuses, resets, malformed responses, timeouts.
    pub failed: u64,
    /// Connections refused, or closed by the server before any response
    /// byte: `connect_refused + closed_unanswered`.
    pub refused: u64,
    /// Connects refused (`ECONNREFUSED`): nothing listened.
    pub connect_refused: u64,
    /// Connections the server closed (FIN) with a request sent and no
    /// response byte back.
    pub closed_unanswered: u64,
    /// The longest wait on one connection between two responses (or from
    /// the start to its first), reconnects included: the worst stall a
    /// client saw.
    pub max_gap: Duration,
    /// Latency of each 200, from the request's write to its body's end.
    pub latencies_us: Vec<u32>,
    /// The first few failures and refusals, as text.
    pub errors: Vec<String>,
    pub elapsed: Duration,
}

impl Tally {
    pub fn rps(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64()
    }

    fn note(&mut self, error: String) {
        if self.errors.len() < ERROR_SAMPLES {
            self.errors.push(error);
        }
    }

    /// Adds another phase's tally to this one (their times too).
    pub fn absorb(&mut self, other: Tally) {
        self.elapsed += other.elapsed;
        self.merge(other);
    }

    fn merge(&mut self, other: Tally) {
        self.ok += other.ok;
        self.failed += other.failed;
        self.refused += other.refused;
        self.connect_refused += other.connect_refused;
        self.closed_unanswered += other.closed_unanswered;
        self.max_gap = self.max_gap.max(other.max_gap);
        self.latencies_us.extend(other.latencies_us);
        for error in other.errors {
            self.note(error);
        }
    }
}

/// Load running against one server.
pub struct Load {
    stop: Arc<AtomicBool>,
    /// Failed and refused requests so far, all connections together.
    unsuccessful: Arc<AtomicU64>,
    /// The longest wait between two responses of one connection since
    /// [`Load::take_worst_wait`] last read it, in µs.
    worst_wait_us: Arc<AtomicU64>,
    connections: JoinSet<Tally>,
    started: Instant,
}

impl Load {
    /// `GET /` on `connections` keep-alive connections.
    pub fn start(addr: SocketAddr, connections: usize) -> Load {
        Load::start_on(addr, connections, "/")
    }

    /// `GET path` on `connections` keep-alive connections.
    pub fn start_on(addr: SocketAddr, connections: usize, path: &str) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let unsuccessful = Arc::new(AtomicU64::new(0));
        let worst_wait_us = Arc::new(AtomicU64::new(0));
        let request: Arc<[u8]> = request_bytes(addr, path).into();
        let mut set = JoinSet::new();
        for _ in 0..connections {
            set.spawn(connection_loop(
                addr,
                Arc::clone(&request),
                Arc::clone(&stop),
                Shared {
                    unsuccessful: Arc::clone(&unsuccessful),
                    worst_wait_us: Arc::clone(&worst_wait_us),
                },
            ));
        }
        Load {
            stop,
            unsuccessful,
            worst_wait_us,
            connections: set,
            started: Instant::now(),
        }
    }

    /// Failed plus refused requests so far (the tally has them apart).
    pub fn unsuccessful(&self) -> u64 {
        self.unsuccessful.load(Ordering::Relaxed)
    }

    /// The longest wait between two responses (or from the start to the
    /// first) any connection saw since the last call, reconnects included;
    /// starts the next window.
    pub fn take_worst_wait(&self) -> Duration {
        Duration::from_micros(self.worst_wait_us.swap(0, Ordering::Relaxed))
    }

    /// Lets each connection finish its request in flight, then adds up.
    pub async fn stop(mut self) -> Tally {
        self.stop.store(true, Ordering::Relaxed);
        let mut total = Tally::default();
        while let Some(joined) = self.connections.join_next().await {
            match joined {
                Ok(tally) => total.merge(tally),
                Err(e) => std::panic::resume_unwind(e.into_panic()),
            }
        }
        total.elapsed = self.started.elapsed();
        total
    }
}

/// What the connections of one load add up as they go.
struct Shared {
    unsuccessful: Arc<AtomicU64>,
    worst_wait_us: Arc<AtomicU64>,
}

async fn connection_loop(
    addr: SocketAddr,
    request: Arc<[u8]>,
    stop: Arc<AtomicBool>,
    shared: Shared,
) -> Tally {
    let mut tally = Tally::default();
    let mut open: Option<Connection> = None;
    let mut last_response = Instant::now();
    let count = |tally: &mut Tally, error: Exchange| {
        shared.unsuccessful.fetch_add(1, Ordering::Relaxed);
        tally.count(error);
    };
    while !stop.load(Ordering::Relaxed) {
        let mut connection = match open.take() {
            Some(connection) => connection,
            None => match Connection::open(addr).await {
                Ok(connection) => connection,
                Err(error) => {
                    count(&mut tally, error);
                    // The server is not there; do not spin on it.
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    continue;
                }
            },
        };
        let sent = Instant::now();
        match connection.exchange(&request).await {
            Ok(response) => {
                let now = Instant::now();
                let gap = now - last_response;
                tally.max_gap = tally.max_gap.max(gap);
                shared.worst_wait_us.fetch_max(
                    u64::try_from(gap.as_micros()).unwrap_or(u64::MAX),
                    Ordering::Relaxed,
                );
                last_response = now;
                if response.status == 200 {
                    tally.ok += 1;
                    let us = sent.elapsed().as_micros();
                    tally
                        .latencies_us
                        .push(u32::try_from(us).unwrap_or(u32::MAX));
                } else {
                    count(
                        &mut tally,
                        Exchange::Failed(format!(
                            "status {}: {}",
                            response.status,
                            String::from_utf8_lossy(&response.body).trim_end()
                        )),
                    );
                }
                // `Connection: close` (a draining worker says it): the next
                // request goes on a new connection; nothing failed.
                if !response.close {
                    open = Some(connection);
                }
            }
            Err(error) => count(&mut tally, error),
        }
    }
    tally
}

impl Tally {
    /// Adds one request that got no good response.
    fn count(&mut self, error: Exchange) {
        let why = match error {
            Exchange::Refused(why) => {
                self.refused += 1;
                self.connect_refused += 1;
                why
            }
            Exchange::Closed(why) => {
                self.refused += 1;
                self.closed_unanswered += 1;
                why
            }
            Exchange::TimedOut(why) | Exchange::Failed(why) => {
                self.failed += 1;
                why
            }
        };
        self.note(why);
    }
}

/// One `GET` on a fresh connection, for reading `/count`; anything but a
/// 200 is an error.
pub async fn get(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    let fetched = fetch(addr, path).await?;
    if fetched.status != 200 {
        bail!(
            "GET {path}: status {}: {}",
            fetched.status,
            fetched.body.trim_end()
        );
    }
    Ok(fetched.body)
}

/// A response to [`fetch`].
#[derive(Debug)]
pub struct Fetched {
    pub status: u16,
    pub body: String,
    /// The `x-nine9s-release` header: which release answered.
    pub release: Option<String>,
}

/// One `GET` on a fresh connection, whatever the status.
pub async fn fetch(addr: SocketAddr, path: &str) -> anyhow::Result<Fetched> {
    let mut connection = Connection::open(addr)
        .await
        .map_err(|e| anyhow::anyhow!("GET {path}: {e:?}"))?;
    connection.keep_release = true;
    let response = connection
        .exchange(&request_bytes(addr, path))
        .await
        .map_err(|e| anyhow::anyhow!("GET {path}: {e:?}"))?;
    Ok(Fetched {
        status: response.status,
        body: String::from_utf8(response.body).context("response body is not UTF-8")?,
        release: response.release,
    })
}

/// A connection opened ahead of its requests: `--sleepers` opens all of
/// its connections before any sends.
pub struct Held(Connection);

impl Held {
    pub async fn open(addr: SocketAddr) -> anyhow::Result<Held> {
        Connection::open(addr)
            .await
            .map(Held)
            .map_err(|e| anyhow::anyhow!("connect: {e:?}"))
    }

    /// `GET path` on it, whatever the status: the status and the body.
    pub async fn get(&mut self, addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
        let response = self
            .0
            .exchange(&request_bytes(addr, path))
            .await
            .map_err(|e| anyhow::anyhow!("GET {path}: {e:?}"))?;
        let body = String::from_utf8(response.body).context("response body is not UTF-8")?;
        Ok((response.status, body))
    }
}

/// One `GET` on a fresh connection that the server must end without a
/// response (closed or reset: the process serving it died); an error if
/// it answers, or neither answers nor closes within [`REQUEST_TIMEOUT`].
pub async fn unanswered(addr: SocketAddr, path: &str) -> anyhow::Result<()> {
    let mut connection = Connection::open(addr)
        .await
        .map_err(|e| anyhow::anyhow!("GET {path}: {e:?}"))?;
    match connection.exchange(&request_bytes(addr, path)).await {
        Ok(response) => bail!(
            "GET {path} was answered: status {}: {}",
            response.status,
            String::from_utf8_lossy(&response.body).trim_end()
        ),
        Err(Exchange::Closed(_) | Exchange::Failed(_)) => Ok(()),
        Err(e @ (Exchange::Refused(_) | Exchange::TimedOut(_))) => bail!("GET {path}: {e:?}"),
    }
}

fn request_bytes(addr: SocketAddr, path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").into_bytes()
}

/// How an exchange went wrong. The first two are the bench's *refused*:
/// no response byte came back.
#[derive(Debug)]
enum Exchange {
    /// Connection refused.
    Refused(String),
    /// Closed by the server (FIN) before a response began.
    Closed(String),
    /// No response (or connection) within [`REQUEST_TIMEOUT`].
    TimedOut(String),
    /// Anything else: reset, malformed response, a status other than 200.
    Failed(String),
}

struct Response {
    status: u16,
    body: Vec<u8>,
    /// The server will close the connection after this response.
    close: bool,
    /// Only when the connection keeps it.
    release: Option<String>,
}

struct Connection {
    stream: TcpStream,
    /// Bytes read but not consumed yet.
    buffer: Vec<u8>,
    /// Copy out the release header; off under load, where the copy would
    /// cost the agent's phases a little and the bare server's nothing.
    keep_release: bool,
}

impl Connection {
    async fn open(addr: SocketAddr) -> Result<Connection, Exchange> {
        let stream = match tokio::time::timeout(REQUEST_TIMEOUT, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                return Err(Exchange::Refused(format!("connect: {e}")))
            }
            Ok(Err(e)) => return Err(Exchange::Failed(format!("connect: {e}"))),
            Err(_) => return Err(Exchange::TimedOut("connect: timed out".into())),
        };
        // The agent sets it too; without it small writes wait on Nagle.
        let _ = stream.set_nodelay(true);
        Ok(Connection {
            stream,
            buffer: Vec::with_capacity(4096),
            keep_release: false,
        })
    }

    async fn exchange(&mut self, request: &[u8]) -> Result<Response, Exchange> {
        match tokio::time::timeout(REQUEST_TIMEOUT, self.exchange_untimed(request)).await {
            Ok(result) => result,
            Err(_) => Err(Exchange::TimedOut(format!(
                "no response within {REQUEST_TIMEOUT:?}"
            ))),
        }
    }

    async fn exchange_untimed(&mut self, request: &[u8]) -> Result<Response, Exchange> {
        let io = |what: &str, e: std::io::Error| Exchange::Failed(format!("{what}: {e}"));
        self.stream
            .write_all(request)
            .await
            .map_err(|e| io("write", e))?;
        let head_len = loop {
            if let Some(at) = find(&self.buffer, b"\r\n\r\n") {
                break at + 4;
            }
            if self.buffer.len() > MAX_HEAD {
                return Err(Exchange::Failed("response head too long".into()));
            }
            if self.read("head").await? == 0 {
                return Err(if self.buffer.is_empty() {
                    Exchange::Closed("connection closed before a response".into())
                } else {
                    Exchange::Failed("connection closed inside a response head".into())
                });
            }
        };
        let head =
            parse_head(&self.buffer[..head_len], self.keep_release).map_err(Exchange::Failed)?;
        let end = head_len + head.content_length;
        while self.buffer.len() < end {
            if self.read("body").await? == 0 {
                return Err(Exchange::Failed(
                    "connection closed inside a response body".into(),
                ));
            }
        }
        let body = self.buffer[head_len..end].to_vec();
        self.buffer.drain(..end);
        Ok(Response {
            status: head.status,
            body,
            close: head.close,
            release: head.release,
        })
    }

    async fn read(&mut self, what: &str) -> Result<usize, Exchange> {
        self.stream
            .read_buf(&mut self.buffer)
            .await
            .map_err(|e| Exchange::Failed(format!("read {what}: {e}")))
    }
}

struct Head {
    status: u16,
    content_length: usize,
    close: bool,
    /// The `x-nine9s-release` value, when asked for.
    release: Option<String>,
}

/// Parses a response head, blank line included. Only what the agent and
/// the bare server send is accepted: a `Content-Length` body, no chunking.
fn parse_head(bytes: &[u8], keep_release: bool) -> Result<Head, String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "response head is not UTF-8")?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut words = status_line.splitn(3, ' ');
    let version = words.next().unwrap_or_default();
    let status = words
        .next()
        .filter(|code| code.len() == 3)
        .and_then(|code| code.parse::<u16>().ok());
    let (Some(status), true) = (status, version.starts_with("HTTP/1.")) else {
        return Err(format!("bad status line {status_line:?}"));
    };
    // HTTP/1.0 closes unless told otherwise; HTTP/1.1 keeps alive.
    let mut close = version == "HTTP/1.0";
    let mut content_length = None;
    let mut release = None;
    for line in lines.filter(|l| !l.is_empty()) {
        let Some((name, value)) = line.split_once(':') else {
            return Err(format!("bad header line {line:?}"));
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            let length = value
                .parse::<usize>()
                .map_err(|_| format!("bad content-length {value:?}"))?;
            if content_length.is_some_and(|l| l != length) {
                return Err("conflicting content-length headers".into());
            }
            content_length = Some(length);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(format!("unsupported transfer-encoding {value:?}"));
        } else if name.eq_ignore_ascii_case("connection") {
            close = value
                .split(',')
                .any(|token| token.trim().eq_ignore_ascii_case("close"));
        } else if keep_release && name.eq_ignore_ascii_case(RELEASE_HEADER) {
            release = Some(value.to_owned());
        }
    }
    let content_length = match (content_length, status) {
        (Some(length), _) => length,
        (None, 204 | 304) => 0,
        (None, _) => return Err(format!("status {status} without content-length")),
    };
    Ok(Head {
        status,
        content_length,
        close,
        release,
    })
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_keep_alive_response_head() {
        let bytes = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\nContent-Length: 15\r\nx-nine9s-release: 0.3.0\r\n\r\n";
        let head = parse_head(bytes, false).unwrap();
        assert_eq!(
            (head.status, head.content_length, head.close, head.release),
            (200, 15, false, None)
        );
        let head = parse_head(bytes, true).unwrap();
        assert_eq!(head.release.as_deref(), Some("0.3.0"));
    }

    #[test]
    fn connection_close_and_http_1_0() {
        let head = parse_head(
            b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\ncontent-length: 0\r\n\r\n",
            false,
        )
        .unwrap();
        assert_eq!((head.status, head.close), (503, true));
        let head = parse_head(b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\n", false).unwrap();
        assert!(head.close);
    }

    #[test]
    fn framing_the_bench_cannot_follow_is_an_error() {
        assert!(parse_head(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
            false
        )
        .is_err());
        assert!(parse_head(b"HTTP/1.1 200 OK\r\n\r\n", false).is_err());
        assert!(parse_head(b"HTTP/1.1 20 OK\r\ncontent-length: 0\r\n\r\n", false).is_err());
        assert!(parse_head(b"SSH-2.0\r\n\r\n", false).is_err());
    }
}
