//! The hostile matrix's strangers who hold slots and memory (issue 17,
//! items 4, 5 and 7): connections that send a byte and nothing more on the
//! control plane, the health and the metrics listeners; calls that hold a
//! message one byte short, or send one that does not decode, without a
//! token; oversized messages; too many `Watch` streams for one identity.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use nine9s_proto::{StatusRequest, WatchRequest};
use nine9s_tests::{bin_dir, eventually, reason, Agent};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::Code;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

fn block_on<T>(future: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(future)
}

/// Raises this process's open-file limit as far as it may go (the test
/// holds thousands of sockets); returns the limit.
fn raise_open_files() -> u64 {
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    let hard = limit.maximum.unwrap_or(u64::MAX);
    let wanted = hard.min(8192);
    if limit.current.is_some_and(|c| c < wanted) {
        let _ = rustix::process::setrlimit(
            rustix::process::Resource::Nofile,
            rustix::process::Rlimit {
                current: Some(wanted),
                maximum: limit.maximum,
            },
        );
    }
    rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .current
        .unwrap_or(u64::MAX)
}

/// Up to `n` connections to `addr`, each having sent `first`: those the
/// kernel takes within a moment (beyond the listen backlog they are not).
fn silent(addr: SocketAddr, n: usize, first: &[u8]) -> Vec<TcpStream> {
    (0..n)
        .filter_map(|_| TcpStream::connect_timeout(&addr, Duration::from_millis(100)).ok())
        .filter_map(|mut s| s.write_all(first).ok().map(|()| s))
        .collect()
}

/// `ctl ARGS` on `agent`, killed if it has not ended within `within`.
fn ctl_within(agent: &Agent, args: &[&str], within: Duration) -> Option<(i32, String)> {
    let mut child = Command::new(bin_dir().join("ctl"))
        .args(["--agent", &agent.local()])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut out = String::new();
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut out)
                .unwrap();
            return Some((status.code().unwrap_or(-1), out));
        }
        if start.elapsed() > within {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `GET /metrics` on a new connection, within `within`.
fn scrape(addr: SocketAddr, within: Duration) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, within)?;
    s.set_read_timeout(Some(within))?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")?;
    let mut reply = String::new();
    s.read_to_string(&mut reply)?;
    Ok(reply)
}

#[test]
fn a_thousand_connections_that_send_a_byte_lock_out_neither_the_owner_nor_probes() {
    let limit = raise_open_files();
    // Three listeners' worth of sockets, and room for the rest.
    let n = if limit >= 3 * 1000 + 200 {
        1000
    } else {
        eprintln!("open-file limit {limit}: fewer connections per listener");
        (limit.saturating_sub(200) / 3) as usize
    };
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(
        &dir.path().join("data"),
        &["--health", "127.0.0.1:0", "--metrics", "127.0.0.1:0"],
    );
    let health = agent.ready_address("health").unwrap();
    let metrics = agent.ready_address("metrics").unwrap();
    let control = silent(agent.grpc, n, b"PRI * HTTP/2.0\r\n");
    let probes = silent(health, n, b"P");
    let scrapers = silent(metrics, n, b"G");
    eprintln!(
        "held: {} control, {} health, {} metrics connections",
        control.len(),
        probes.len(),
        scrapers.len()
    );
    assert!(control.len() > 128 && probes.len() > 16 && scrapers.len() > 16);

    let start = Instant::now();
    let status = ctl_within(
        &agent,
        &["--output", "json", "status"],
        Duration::from_secs(30),
    );
    let took = start.elapsed();
    eprintln!("ctl status with the connections held: {took:?}");
    let (code, stderr) = status.expect("ctl status did not answer within 30 s");
    assert_eq!(code, 0, "{stderr}");
    // The TCP control plane too: an orchestrator's call with its token.
    let start = Instant::now();
    let answered = block_on(async {
        tokio::time::timeout(Duration::from_secs(30), async {
            agent.api().await.status(StatusRequest::default()).await
        })
        .await
    });
    eprintln!(
        "Status over TCP with the connections held: {:?}",
        start.elapsed()
    );
    answered
        .expect("Status over TCP did not answer within 30 s")
        .expect("Status over TCP");

    let start = Instant::now();
    let probed = block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{health}"))
            .unwrap()
            .connect_timeout(Duration::from_secs(20));
        tokio::time::timeout(Duration::from_secs(20), async {
            let mut client = HealthClient::new(channel.connect().await?);
            let reply = client
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await?;
            Ok::<_, Box<dyn std::error::Error>>(reply.into_inner().status)
        })
        .await
    });
    eprintln!(
        "health check with the connections held: {:?}",
        start.elapsed()
    );
    assert_eq!(
        probed
            .expect("the health check did not answer within 20 s")
            .unwrap(),
        1, /* SERVING */
    );

    let start = Instant::now();
    let scraped = scrape(metrics, Duration::from_secs(20)).expect("no answer on /metrics");
    eprintln!("scrape with the connections held: {:?}", start.elapsed());
    assert!(scraped.starts_with("HTTP/1.1 200"), "{scraped}");
    drop((control, probes, scrapers));
}

#[test]
fn a_connection_that_never_completes_a_request_is_closed() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&dir.path().join("data"), &[]);
    // Half a preface, then nothing: never a request.
    let mut slow = TcpStream::connect(agent.grpc).unwrap();
    slow.write_all(b"PRI * HTTP/2.0\r\n").unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let start = Instant::now();
    let mut buf = [0u8; 64];
    // The agent's SETTINGS may come first: read on to the close.
    let closed = loop {
        match slow.read(&mut buf) {
            Ok(0) => break true,
            Ok(_) => continue,
            Err(e) => break e.kind() == std::io::ErrorKind::ConnectionReset,
        }
    };
    eprintln!("closed: {closed} after {:?}", start.elapsed());
    assert!(closed, "a connection with no request was kept for 30 s");
}

/// Sends and receives raw message bytes: what a broken or hostile client
/// puts in a message.
#[derive(Clone, Default)]
struct Raw;

impl Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl Encoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        use bytes::Buf;
        let mut out = vec![0; src.remaining()];
        src.copy_to_slice(&mut out);
        Ok(Some(out))
    }
}

/// Calls `method` of the control service with `message` as it is.
async fn raw_call(
    agent: &Agent,
    token: Option<&str>,
    method: &str,
    message: Vec<u8>,
) -> tonic::Status {
    let channel = tonic::transport::Endpoint::from_shared(agent.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel).max_encoding_message_size(usize::MAX);
    grpc.ready().await.unwrap();
    let mut request = tonic::Request::new(message);
    if let Some(token) = token {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    let path = format!("/nine9s.control.v1.Control/{method}")
        .parse()
        .unwrap();
    grpc.unary(request, path, Raw)
        .await
        .expect_err("the call must be refused")
}

#[test]
fn a_malformed_message_without_a_token_is_unauthenticated() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&dir.path().join("data"), &[]);
    block_on(async {
        let refused = raw_call(&agent, None, "Upgrade", vec![0xff; 64]).await;
        assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
        assert_eq!(reason(&refused), "UNAUTHENTICATED");
    });
}

#[test]
fn an_oversized_message_says_what_the_limit_is() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&dir.path().join("data"), &[]);
    let token = std::fs::read_to_string(agent.token_file()).unwrap();
    block_on(async {
        let refused = raw_call(&agent, Some(token.trim()), "Status", vec![0x0a; 100_000]).await;
        assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
        assert_eq!(reason(&refused), "TOO_LARGE");
        assert!(
            refused.message().contains("limit of 65536 bytes"),
            "{refused:?}"
        );
        let refused = raw_call(&agent, Some(token.trim()), "Stage", vec![0x0a; 9 << 20]).await;
        assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
        assert_eq!(reason(&refused), "TOO_LARGE");
        assert!(refused.message().contains("chunks of 1 MiB"), "{refused:?}");
    });
    assert_eq!(agent.status()["active_version"], "0.1.0");
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

#[test]
fn messages_held_one_byte_short_without_a_token_hold_no_memory() {
    const CONNECTIONS: usize = 4;
    const STREAMS: usize = 8;
    const DECLARED: usize = 8 * 1024 * 1024 - 1;
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&dir.path().join("data"), &[]);
    let worker = agent.worker_pid();
    let before = rss_kib(worker);
    // One message body, shared by every stream: all but its last byte.
    let mut body = BytesMut::with_capacity(DECLARED + 4);
    body.put_u8(0);
    body.put_u32(DECLARED as u32);
    body.put_bytes(0x0a, DECLARED - 1);
    let body: Bytes = body.freeze();
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(before));
    let answered = block_on(async {
        let mut answers = Vec::new();
        let mut keep = Vec::new();
        for _ in 0..CONNECTIONS {
            let tcp = tokio::net::TcpStream::connect(agent.grpc).await.unwrap();
            let (client, connection) = h2::client::handshake(tcp).await.unwrap();
            tokio::spawn(connection);
            for _ in 0..STREAMS {
                let mut client = client.clone().ready().await.unwrap();
                let request = http::Request::post(format!(
                    "http://{}/nine9s.control.v1.Control/Upgrade",
                    agent.grpc
                ))
                .header("content-type", "application/grpc")
                .header("te", "trailers")
                .body(())
                .unwrap();
                let (response, mut send) = client.send_request(request, false).unwrap();
                // The agent may have answered (and reset the stream) already.
                let _ = send.send_data(body.clone(), false);
                keep.push(send);
                answers.push(response);
            }
        }
        let peak = std::sync::Arc::clone(&peak);
        let sampler = tokio::spawn(async move {
            loop {
                peak.fetch_max(rss_kib(worker), std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        let all = tokio::time::timeout(Duration::from_secs(20), futures_all(answers)).await;
        // What the agent holds once every stream has sent what it could.
        tokio::time::sleep(Duration::from_millis(500)).await;
        sampler.abort();
        drop(keep);
        all
    });
    let peak_kib = peak.load(std::sync::atomic::Ordering::Relaxed);
    eprintln!(
        "worker RSS: {before} kB before, {peak_kib} kB at most with {} streams each holding {DECLARED} bytes but one",
        CONNECTIONS * STREAMS
    );
    let statuses = answered.expect("the calls were not answered within 20 s");
    for status in statuses {
        assert_eq!(
            status.as_deref(),
            Some("16"),
            "grpc-status (UNAUTHENTICATED)"
        );
    }
    assert!(
        peak_kib < before + 48 * 1024,
        "the worker grew from {before} kB to {peak_kib} kB"
    );
    assert_eq!(agent.status()["active_version"], "0.1.0");
}

/// Every response's `grpc-status` header (a trailers-only answer).
async fn futures_all(answers: Vec<h2::client::ResponseFuture>) -> Vec<Option<String>> {
    let mut statuses = Vec::new();
    for answer in answers {
        let status = match answer.await {
            Ok(response) => response
                .headers()
                .get("grpc-status")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
            Err(e) => Some(format!("{e}")),
        };
        statuses.push(status);
    }
    statuses
}

#[test]
fn watch_streams_are_capped_per_identity() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&dir.path().join("data"), &[]);
    block_on(async {
        let mut api = agent.api().await;
        let mut open = Vec::new();
        for _ in 0..32 {
            let stream = api
                .watch(WatchRequest { after_id: 0 })
                .await
                .expect("a Watch within the cap")
                .into_inner();
            open.push(stream);
        }
        let refused = api
            .watch(WatchRequest { after_id: 0 })
            .await
            .expect_err("a 33rd Watch stream of one identity");
        assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
        assert_eq!(reason(&refused), "TOO_MANY_WATCHES");
        assert!(
            refused
                .message()
                .contains("admin has 32 Watch streams open"),
            "{refused:?}"
        );
        // Other calls go on.
        api.status(StatusRequest {}).await.unwrap();
        // One ends: another may start.
        open.pop();
        let mut again = None;
        for _ in 0..100 {
            if let Ok(stream) = api.watch(WatchRequest { after_id: 0 }).await {
                again = Some(stream);
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(again.is_some(), "no Watch after one ended");
    });
    // ctl watch still follows from the start.
    let mut watch = agent.watch_json();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(watch.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert!(line.contains("\"id\""), "{line}");
    let _ = watch.kill();
    let _ = watch.wait();
    assert!(eventually(Duration::from_secs(5), || agent.status()
        ["active_version"]
        == "0.1.0"));
}
