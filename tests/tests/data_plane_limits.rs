//! The data plane under a client that tries to hold its memory or its
//! connection slots (issue 17, items 6 and 8), part of the hostile-input
//! matrix: request bodies buffered at once have a budget, one client
//! address cannot take every slot, and at the cap idle keep-alive
//! connections make room for newcomers — while requests already admitted
//! complete, the release keeps serving with its state exact, and the
//! worker is the same process throughout.

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::Duration;

use nine9s_tests::{eventually, on_0_2_0, Agent};

/// `/` requests counted by 0.2.0 before each case.
const HELLOS: usize = 3;

/// A response as a client reads it off the socket.
#[derive(Debug)]
struct Answer {
    status: u16,
    /// Header lines, lower-cased.
    headers: String,
}

/// A connection read without blocking: what has come so far.
struct Conn {
    stream: TcpStream,
    received: Vec<u8>,
    /// The agent closed it (end of file or a reset).
    closed: bool,
}

impl Conn {
    fn new(stream: TcpStream) -> Conn {
        stream.set_nodelay(true).unwrap();
        Conn {
            stream,
            received: Vec::new(),
            closed: false,
        }
    }

    /// A connection to `agent` from the loopback address `from` (the whole
    /// of 127/8 is loopback on Linux: another client address on this host).
    fn from(from: [u8; 4], agent: SocketAddr) -> Conn {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let stream = runtime.block_on(async {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.bind(SocketAddr::new(IpAddr::from(from), 0)).unwrap();
            socket.connect(agent).await.unwrap()
        });
        let stream = stream.into_std().unwrap();
        stream.set_nonblocking(false).unwrap();
        Conn::new(stream)
    }

    fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    /// Reads what is there, waiting at most a moment.
    fn poll(&mut self) {
        self.stream
            .set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        let mut buf = [0u8; 4096];
        while !self.closed {
            match self.stream.read(&mut buf) {
                Ok(0) => self.closed = true,
                Ok(n) => self.received.extend_from_slice(&buf[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => return,
                Err(_) => self.closed = true,
            }
        }
    }

    /// The response's status line and headers, once they have come.
    fn answer(&mut self) -> Option<Answer> {
        self.poll();
        let text = String::from_utf8_lossy(&self.received);
        let (head, _) = text.split_once("\r\n\r\n")?;
        let (status_line, headers) = head.split_once("\r\n").unwrap_or((head, ""));
        Some(Answer {
            status: status_line.split_whitespace().nth(1)?.parse().ok()?,
            headers: headers.to_ascii_lowercase(),
        })
    }

    /// Waits up to `within` for the response (its body included) and takes
    /// it off the connection, which stays usable.
    fn exchange(&mut self, request: &[u8], within: Duration) -> Option<Answer> {
        self.send(request);
        let mut answer = None;
        eventually(within, || {
            answer = self.answer().filter(|_| self.complete());
            answer.is_some() || self.closed
        });
        self.received.clear();
        answer
    }

    /// The response received is whole (its `content-length` of body).
    fn complete(&self) -> bool {
        let text = String::from_utf8_lossy(&self.received);
        let Some((head, body)) = text.split_once("\r\n\r\n") else {
            return false;
        };
        let length = head
            .to_ascii_lowercase()
            .lines()
            .find_map(|l| {
                l.strip_prefix("content-length:")
                    .map(|v| v.trim().parse().unwrap())
            })
            .unwrap_or(0usize);
        body.len() >= length
    }
}

const COUNT: &[u8] = b"GET /count HTTP/1.1\r\nhost: x\r\n\r\n";

fn count(agent: &Agent) -> String {
    agent.get("/count").body.trim().to_owned()
}

#[test]
fn request_bodies_beyond_the_memory_budget_are_answered_503_while_the_admitted_complete() {
    const MIB: usize = 1024 * 1024;
    let dir = tempfile::tempdir().unwrap();
    let agent = on_0_2_0(
        &dir.path().join("data"),
        &[
            "--max-body",
            "1048576",
            "--max-buffered-bodies",
            "4MiB",
            "--http-idle-timeout",
            "1h",
        ],
        HELLOS,
    );
    let worker = agent.worker_pid();
    // Ten large uploads at once, each announcing 1 MiB and sending it
    // slowly: four fit in the budget.
    let upload = format!("POST /upload HTTP/1.1\r\nhost: x\r\ncontent-length: {MIB}\r\n\r\n");
    let mut uploads: Vec<Conn> = (0..10)
        .map(|_| {
            let mut c = Conn::new(TcpStream::connect(agent.http).unwrap());
            c.send(upload.as_bytes());
            c
        })
        .collect();
    let refused = |uploads: &mut Vec<Conn>| {
        uploads
            .iter_mut()
            .filter_map(Conn::answer)
            .filter(|a| a.status == 503 && a.headers.contains("retry-after: 1"))
            .count()
    };
    assert!(
        eventually(Duration::from_secs(20), || refused(&mut uploads) == 6),
        "uploads beyond the budget were not answered 503 with Retry-After: {} were",
        refused(&mut uploads)
    );
    let (mut admitted, _): (Vec<Conn>, Vec<Conn>) = uploads
        .into_iter()
        .partition(|c| c.received.is_empty() && !c.closed);
    assert_eq!(admitted.len(), 4);
    // With the budget taken, the service still answers requests without
    // bodies, and counts them.
    for _ in 0..5 {
        assert_eq!(agent.get("/").status, 200);
    }
    assert_eq!(count(&agent), (HELLOS + 5).to_string());
    // A body that does not say its length is refused as its bytes come.
    let mut chunked = Conn::new(TcpStream::connect(agent.http).unwrap());
    let mut request =
        b"POST /upload HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n3e8\r\n".to_vec();
    request.extend_from_slice(&[b'x'; 1000]);
    request.extend_from_slice(b"\r\n");
    chunked.send(&request);
    assert!(eventually(Duration::from_secs(10), || chunked
        .answer()
        .is_some_and(|a| a.status == 503)));
    // The admitted uploads were not disturbed: their bodies reach the
    // release, which answers them (it has no such route).
    for c in &mut admitted {
        for _ in 0..16 {
            c.send(&[b'x'; MIB / 16]);
        }
    }
    for c in &mut admitted {
        assert!(eventually(Duration::from_secs(20), || c.answer().is_some()));
        let answer = c.answer().unwrap();
        assert_eq!(answer.status, 404, "{answer:?}");
        assert!(
            answer.headers.contains("x-nine9s-release: 0.2.0"),
            "{answer:?}"
        );
    }
    drop(admitted);
    // Their budget came back: a new upload is taken.
    let mut later = Conn::new(TcpStream::connect(agent.http).unwrap());
    later.send(upload.as_bytes());
    later.send(&vec![b'x'; MIB]);
    assert!(eventually(Duration::from_secs(20), || later
        .answer()
        .is_some()));
    assert_eq!(later.answer().unwrap().status, 404);
    assert_eq!(count(&agent), (HELLOS + 5).to_string());
    assert_eq!(agent.worker_pid(), worker, "the worker was replaced");
    assert!(agent.logged("--max-buffered-bodies"), "{}", agent.log());
    assert_eq!(agent.terminate(), 0);
}

#[test]
fn one_client_address_cannot_take_every_slot_and_idle_connections_make_room() {
    let dir = tempfile::tempdir().unwrap();
    let agent = on_0_2_0(
        &dir.path().join("data"),
        &[
            "--max-connections",
            "8",
            "--max-connections-per-client",
            "4",
            "--http-idle-timeout",
            "1h",
        ],
        HELLOS,
    );
    let worker = agent.worker_pid();
    let served = |c: &mut Conn| {
        c.exchange(COUNT, Duration::from_secs(10))
            .is_some_and(|a| a.status == 200)
    };
    // One address opens its four keep-alive connections (those of the
    // setup may take a moment to be counted out).
    let mut idle: Vec<Conn> = Vec::new();
    while idle.len() < 4 {
        let mut c = Conn::from([127, 0, 0, 1], agent.http);
        if served(&mut c) {
            idle.push(c);
        }
    }
    // A fifth from it is answered 503 and closed, not served...
    let mut fifth = Conn::from([127, 0, 0, 1], agent.http);
    let answer = fifth.exchange(COUNT, Duration::from_secs(10));
    assert!(
        answer.as_ref().is_some_and(|a| a.status == 503) || fifth.closed,
        "a fifth connection from one address: {answer:?}"
    );
    assert!(eventually(Duration::from_secs(10), || {
        fifth.poll();
        fifth.closed
    }));
    // ...while another address is.
    let mut other = Conn::from([127, 0, 0, 2], agent.http);
    assert!(served(&mut other));
    idle.push(other);
    // A request in flight (its body half sent), then the cap filled with
    // idle connections.
    let mut in_flight = Conn::from([127, 0, 0, 3], agent.http);
    in_flight.send(b"POST /upload HTTP/1.1\r\nhost: x\r\ncontent-length: 10\r\n\r\n12345");
    for _ in 0..2 {
        let mut c = Conn::from([127, 0, 0, 2], agent.http);
        assert!(served(&mut c));
        idle.push(c);
    }
    // A newcomer is served: an idle connection made room for it.
    let mut newcomer = Conn::from([127, 0, 0, 4], agent.http);
    assert!(
        served(&mut newcomer),
        "a newcomer waited while idle connections held every slot"
    );
    assert!(eventually(Duration::from_secs(10), || {
        idle.iter_mut().any(|c| {
            c.poll();
            c.closed
        })
    }));
    // The request in flight completes.
    in_flight.send(b"67890");
    assert!(eventually(Duration::from_secs(10), || in_flight
        .answer()
        .is_some()));
    let answer = in_flight.answer().unwrap();
    assert_eq!(answer.status, 404, "{answer:?}");
    assert!(answer.headers.contains("x-nine9s-release: 0.2.0"));
    drop(idle);
    assert!(eventually(Duration::from_secs(10), || count(&agent)
        == HELLOS.to_string()));
    assert_eq!(agent.worker_pid(), worker);
    assert!(
        agent.logged("--max-connections-per-client"),
        "{}",
        agent.log()
    );
    assert_eq!(agent.terminate(), 0);
}

#[test]
fn a_body_budget_that_cannot_hold_one_body_or_is_no_size_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    for (flags, says) in [
        (
            &["--max-buffered-bodies", "1MiB"][..],
            "is below --max-body",
        ),
        (&["--max-buffered-bodies", "12XB"][..], "no size unit"),
        (&["--max-buffered-bodies", "65GiB"][..], "over 64GiB"),
        (&["--max-connections-per-client", "0"][..], "0"),
    ] {
        let output = std::process::Command::new(nine9s_tests::bin_dir().join("agent"))
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(flags)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{flags:?}: {stderr}");
        assert!(stderr.contains(says), "{flags:?}: {stderr}");
    }
    assert!(!dir.path().join("data").exists(), "started anyway");
}

#[test]
fn a_burst_of_connections_while_the_worker_takes_none_waits_in_the_backlog() {
    const BURST: usize = 600;
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(
        &dir.path().join("data"),
        &["--max-connections-per-client", "1000"],
    );
    let worker = agent.worker_pid();
    // While the worker accepts nothing, as while it is replaced, the
    // handshakes complete in the kernel, up to the listen backlog.
    nine9s_tests::kill("STOP", worker);
    let mut connected = Vec::new();
    let mut failed = None;
    for _ in 0..BURST {
        match TcpStream::connect_timeout(&agent.http, Duration::from_secs(2)) {
            Ok(stream) => connected.push(stream),
            Err(e) => {
                failed = Some(e);
                break;
            }
        }
    }
    nine9s_tests::kill("CONT", worker);
    assert!(
        failed.is_none(),
        "connection {} of {BURST} did not complete: {failed:?}",
        connected.len() + 1
    );
    // Once it accepts again, every one of them is served.
    for mut stream in connected {
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        stream
            .write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }
}
