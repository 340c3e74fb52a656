//! HTTP/2 and TLS on the data plane (issue 19): HTTP/2 with prior
//! knowledge beside HTTP/1.1 on the one port, for a synchronous release and
//! for a service, across an upgrade on one open connection; the limits an
//! HTTP/2 client is told and held to (streams, header lists, rapid resets,
//! idle connections); TLS with ALPN, and a certificate replaced while a
//! connection opened with the old one keeps serving.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use nine9s_tests::{eventually, release_dir, self_signed_localhost, stage_myservice, Agent};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio_rustls::rustls;

fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(future)
}

/// An agent on myservice 0.1.0 (a service: ABI v3).
fn service_agent(dir: &Path, extra: &[&str]) -> Agent {
    let bootstrap = release_dir("myservice-0.1.0");
    let mut args = vec!["--bootstrap", bootstrap.to_str().unwrap()];
    args.extend_from_slice(extra);
    Agent::start(&dir.join("data"), &args)
}

/// An HTTP/2 connection over `io`; the task driving it ends with it.
async fn handshake<T>(
    io: T,
) -> (
    h2::client::SendRequest<Bytes>,
    tokio::task::JoinHandle<Result<(), h2::Error>>,
)
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (client, connection) = h2::client::handshake(io).await.unwrap();
    (client, tokio::spawn(connection))
}

/// HTTP/2 in cleartext with prior knowledge.
async fn h2c(
    addr: SocketAddr,
) -> (
    h2::client::SendRequest<Bytes>,
    tokio::task::JoinHandle<Result<(), h2::Error>>,
) {
    handshake(tokio::net::TcpStream::connect(addr).await.unwrap()).await
}

/// What came back for a request.
#[derive(Debug)]
struct Answer {
    status: u16,
    release: String,
    body: Vec<u8>,
    /// The body's chunks, as they arrived.
    chunks: usize,
}

async fn send(
    client: &h2::client::SendRequest<Bytes>,
    request: http::Request<()>,
    body: &[&[u8]],
) -> Result<Answer, h2::Error> {
    let mut client = client.clone().ready().await?;
    let (response, mut stream) = client.send_request(request, body.is_empty())?;
    for (i, chunk) in body.iter().enumerate() {
        stream.send_data(Bytes::copy_from_slice(chunk), i + 1 == body.len())?;
    }
    let response = response.await?;
    let status = response.status().as_u16();
    let release = response
        .headers()
        .get("x-nine9s-release")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let mut recv = response.into_body();
    let (mut body, mut chunks) = (Vec::new(), 0);
    while let Some(data) = recv.data().await {
        let data = data?;
        let _ = recv.flow_control().release_capacity(data.len());
        body.extend_from_slice(&data);
        chunks += 1;
    }
    Ok(Answer {
        status,
        release,
        body,
        chunks,
    })
}

fn get(addr: SocketAddr, path: &str) -> http::Request<()> {
    http::Request::get(format!("http://{addr}{path}"))
        .body(())
        .unwrap()
}

fn text(answer: &Answer) -> String {
    String::from_utf8_lossy(&answer.body).into_owned()
}

#[test]
fn http2_and_http1_share_the_port_for_a_synchronous_release() {
    let dir = tempfile::tempdir().unwrap();
    // The embedded sample, nine9s 0.1.0: a synchronous release (ABI v2).
    let agent = Agent::start(&dir.path().join("data"), &[]);
    let addr = agent.http;
    block_on(async {
        let (client, _connection) = h2c(addr).await;
        // Many requests at once on the one connection, each a call of its
        // own into the release.
        let answers: Vec<_> = (0..20)
            .map(|_| {
                let client = client.clone();
                tokio::spawn(async move { send(&client, get(addr, "/"), &[]).await })
            })
            .collect();
        for answer in answers {
            let answer = answer.await.unwrap().unwrap();
            assert_eq!(answer.status, 200, "{answer:?}");
            assert_eq!(
                (answer.release.as_str(), text(&answer).as_str()),
                ("0.1.0", "Hello world!")
            );
        }
    });
    let http1 = nine9s_tests::get(addr, "/");
    assert_eq!(
        (http1.status, http1.body.as_str()),
        (200, "Hello world!"),
        "HTTP/1.1 on the same port"
    );
}

#[test]
fn a_service_streams_over_http2_and_one_connection_crosses_an_upgrade() {
    let dir = tempfile::tempdir().unwrap();
    let agent = service_agent(dir.path(), &[]);
    let addr = agent.http;
    block_on(async {
        let (client, connection) = h2c(addr).await;
        let stream = send(&client, get(addr, "/stream/5"), &[]).await.unwrap();
        assert_eq!(stream.status, 200);
        assert_eq!(stream.release, "0.1.0");
        assert_eq!(text(&stream).lines().count(), 5, "{}", text(&stream));
        assert!(
            stream.chunks >= 2,
            "lines produced 10 ms apart came in {} chunk(s)",
            stream.chunks
        );
        // A body sent in pieces comes back whole.
        let echo = http::Request::post(format!("http://{addr}/echo"))
            .body(())
            .unwrap();
        let echoed = send(&client, echo, &[b"one ", b"two ", b"three"])
            .await
            .unwrap();
        assert_eq!(
            (echoed.status, text(&echoed).as_str()),
            (200, "one two three")
        );
        for _ in 0..3 {
            assert_eq!(
                send(&client, get(addr, "/"), &[]).await.unwrap().status,
                200
            );
        }

        // An upgrade while the connection is open: its next requests go to
        // the new release, with the count carried.
        tokio::task::block_in_place(|| {
            stage_myservice(&agent, "0.2.0");
            agent.ctl(&["upgrade", "--to", "0.2.0"]).ok();
        });
        let after = send(&client, get(addr, "/"), &[]).await.unwrap();
        assert_eq!((after.status, after.release.as_str()), (200, "0.2.0"));
        let count = send(&client, get(addr, "/count"), &[]).await.unwrap();
        assert_eq!(text(&count).trim(), "4", "the count crossed the upgrade");
        assert!(!connection.is_finished(), "the connection stayed open");
    });
}

#[test]
fn an_http2_client_is_told_its_limits_and_held_to_them() {
    let dir = tempfile::tempdir().unwrap();
    let agent = service_agent(
        dir.path(),
        &["--http2-max-streams", "3", "--http-idle-timeout", "1s"],
    );
    let addr = agent.http;
    block_on(async {
        let (client, connection) = h2c(addr).await;
        let first = send(&client, get(addr, "/"), &[]).await.unwrap();
        assert_eq!(first.status, 200);
        // Told in its settings: at most 3 requests at once.
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (probe, mut probing) = h2::client::handshake(tcp).await.unwrap();
        let answer = tokio::select! {
            answer = send(&probe, get(addr, "/"), &[]) => answer,
            ended = &mut probing => panic!("the connection ended: {ended:?}"),
        };
        assert_eq!(answer.unwrap().status, 200);
        assert_eq!(probing.max_concurrent_send_streams(), 3);
        drop(probe);

        // A header list beyond the limit is answered 431, and the
        // connection goes on.
        let huge = http::Request::get(format!("http://{addr}/"))
            .header("x-huge", "a".repeat(100 * 1024))
            .body(())
            .unwrap();
        let refused = send(&client, huge, &[]).await.unwrap();
        assert_eq!(refused.status, 431);
        assert_eq!(
            send(&client, get(addr, "/"), &[]).await.unwrap().status,
            200
        );

        // Idle past --http-idle-timeout: the agent closes the connection.
        let closed = tokio::time::timeout(Duration::from_secs(30), connection).await;
        assert!(
            closed.is_ok(),
            "an idle HTTP/2 connection was still open 30 s after a 1 s idle timeout"
        );
    });
}

#[test]
fn a_client_resetting_streams_as_fast_as_it_opens_them_is_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let agent = service_agent(dir.path(), &[]);
    let addr = agent.http;
    block_on(async {
        let (client, connection) = h2c(addr).await;
        let mut opened = 0;
        let mut cut = None;
        // Each stream asks for a second's work and is reset at once.
        for _ in 0..20_000 {
            let mut ready = match client.clone().ready().await {
                Ok(ready) => ready,
                Err(e) => {
                    cut = Some(e);
                    break;
                }
            };
            match ready.send_request(get(addr, "/sleep/1000"), false) {
                Ok((_, mut stream)) => {
                    stream.send_reset(h2::Reason::CANCEL);
                    opened += 1;
                }
                Err(e) => {
                    cut = Some(e);
                    break;
                }
            }
        }
        let ended = tokio::time::timeout(Duration::from_secs(30), connection)
            .await
            .expect("the connection was still open 30 s after the flood");
        let why = cut
            .map(|e| e.to_string())
            .or_else(|| ended.unwrap().err().map(|e| e.to_string()))
            .unwrap_or_default();
        eprintln!("cut off after {opened} streams: {why}");
        assert!(opened < 20_000, "never cut off: {why:?}");
        // The agent says why in a GOAWAY, then closes; a client still
        // writing may hear of the close first (its unread GOAWAY goes with
        // the reset).
        assert!(
            ["excessive load", "too_many_resets", "broken pipe", "reset"]
                .iter()
                .any(|said| why.contains(said)),
            "the connection ended otherwise: {why:?}"
        );
        // Others are served meanwhile.
        let (other, _connection) = h2c(addr).await;
        assert_eq!(send(&other, get(addr, "/"), &[]).await.unwrap().status, 200);
    });
}

/// A TLS client that trusts `roots` and offers `alpn`.
fn connector(roots: &[&Path], alpn: &[u8]) -> tokio_rustls::TlsConnector {
    use rustls::pki_types::pem::PemObject;
    let mut store = rustls::RootCertStore::empty();
    for root in roots {
        let der = rustls::pki_types::CertificateDer::from_pem_file(root).unwrap();
        store.add(der).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(store)
        .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

type Tls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

async fn tls(connector: &tokio_rustls::TlsConnector, addr: SocketAddr) -> std::io::Result<Tls> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    connector.connect(name, tcp).await
}

/// The certificate a TLS connection was served.
fn served(stream: &Tls) -> Vec<u8> {
    stream.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

fn der(pem: &Path) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::from_pem_file(pem)
        .unwrap()
        .to_vec()
}

/// An HTTP/1.1 keep-alive request on `stream`: the status and body.
async fn http1(stream: &mut BufReader<Tls>, path: &str) -> (u16, String) {
    stream
        .get_mut()
        .write_all(format!("GET {path} HTTP/1.1\r\nhost: localhost\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut line = String::new();
    stream.read_line(&mut line).await.unwrap();
    let status = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    let mut length = 0;
    loop {
        let mut line = String::new();
        stream.read_line(&mut line).await.unwrap();
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse().unwrap();
            }
        }
    }
    let mut body = vec![0; length];
    stream.read_exact(&mut body).await.unwrap();
    (status, String::from_utf8(body).unwrap())
}

/// Replaces `to` by `from`'s contents in one step, as a deployment tool
/// would.
fn replace(from: &Path, to: &Path) {
    let staged = to.with_extension("new");
    std::fs::copy(from, &staged).unwrap();
    std::fs::rename(&staged, to).unwrap();
}

#[test]
fn the_data_plane_serves_tls_and_takes_a_new_certificate_without_dropping_a_connection() {
    let dir = tempfile::tempdir().unwrap();
    let (first, second) = (dir.path().join("first"), dir.path().join("second"));
    std::fs::create_dir_all(&first).unwrap();
    std::fs::create_dir_all(&second).unwrap();
    let (cert, key) = self_signed_localhost(&first);
    let (new_cert, new_key) = self_signed_localhost(&second);
    let (live_cert, live_key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::copy(&cert, &live_cert).unwrap();
    std::fs::copy(&key, &live_key).unwrap();
    let agent = service_agent(
        dir.path(),
        &[
            "--http-tls-cert",
            live_cert.to_str().unwrap(),
            "--http-tls-key",
            live_key.to_str().unwrap(),
        ],
    );
    let addr = agent.http;
    block_on(async {
        // HTTP/2 by ALPN.
        let h2 = connector(&[&cert], b"h2");
        let (client, _connection) = handshake(tls(&h2, addr).await.unwrap()).await;
        let answer = send(&client, get(addr, "/"), &[]).await.unwrap();
        assert_eq!((answer.status, answer.release.as_str()), (200, "0.1.0"));
        // HTTP/1.1 by ALPN, on a connection kept open.
        let both = connector(&[&cert, &new_cert], b"http/1.1");
        let old = tls(&both, addr).await.unwrap();
        assert_eq!(served(&old), der(&cert));
        let mut old = BufReader::new(old);
        assert_eq!(http1(&mut old, "/").await.0, 200);
        // Plain HTTP on a TLS port is no request.
        let mut plain = tokio::net::TcpStream::connect(addr).await.unwrap();
        plain
            .write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let mut reply = Vec::new();
        let _ = plain.read_to_end(&mut reply).await;
        assert!(!reply.starts_with(b"HTTP/1.1 200"), "served in cleartext");

        // The files are replaced: new connections get the new certificate.
        replace(&new_key, &live_key);
        replace(&new_cert, &live_cert);
        let mut taken = false;
        for _ in 0..300 {
            if served(&tls(&both, addr).await.unwrap()) == der(&new_cert) {
                taken = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(taken, "the new certificate was not served within 30 s");
        // The connection opened before keeps serving.
        assert_eq!(http1(&mut old, "/count").await, (200, "2\n".to_owned()));
        // A client that trusts only the new certificate connects.
        let only_new = connector(&[&new_cert], b"h2");
        let (client, _connection) = handshake(tls(&only_new, addr).await.unwrap()).await;
        assert_eq!(
            send(&client, get(addr, "/"), &[]).await.unwrap().status,
            200
        );

        // A key that is no key: logged, and the certificate in use stays.
        std::fs::write(&live_key, "not a key").unwrap();
        let said = tokio::task::block_in_place(|| {
            eventually(Duration::from_secs(30), || {
                agent.log().contains("do not load")
            })
        });
        assert!(said, "the agent did not say the files do not load");
        assert_eq!(served(&tls(&both, addr).await.unwrap()), der(&new_cert));
    });
}

#[test]
fn a_certificate_that_does_not_load_stops_the_agent_before_it_serves() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, _) = self_signed_localhost(dir.path());
    let other = dir.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    let (_, wrong_key) = self_signed_localhost(&other);
    let log = dir.path().join("agent.log");
    let mut agent = std::process::Command::new(nine9s_tests::bin_dir().join("agent"));
    agent
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args(["--http", "127.0.0.1:0", "--grpc", "127.0.0.1:0"])
        .arg("--http-tls-cert")
        .arg(&cert)
        .arg("--http-tls-key")
        .arg(&wrong_key);
    let (code, stderr) = nine9s_tests::refusal(agent, &log);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("--http-tls-cert") && stderr.contains("no usable pair"),
        "{stderr}"
    );
}

#[test]
fn a_stuck_call_on_http2_shuts_its_connection_and_others_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let agent =
        nine9s_tests::on_0_2_0(&dir.path().join("data"), &["--request-timeout", "500ms"], 2);
    nine9s_tests::stage_fixture(&agent, "stuck").ok();
    agent.ctl(&["upgrade", "--to", "0.2.9", "--permanent"]).ok();
    let addr = agent.http;
    block_on(async {
        let (client, connection) = h2c(addr).await;
        assert_eq!(
            send(&client, get(addr, "/"), &[]).await.unwrap().status,
            200
        );
        // The 504 cannot go on the stream whose task the call holds: the
        // connection is shut, and its client hears of it at once.
        let stuck = tokio::time::timeout(
            Duration::from_secs(30),
            send(&client, get(addr, "/stuck"), &[]),
        )
        .await
        .expect("a stuck call's stream was still open 30 s after a 500 ms request timeout");
        assert!(stuck.is_err(), "{stuck:?}");
        let ended = tokio::time::timeout(Duration::from_secs(30), connection).await;
        assert!(ended.is_ok(), "the connection was still open");
        // Another connection is served, by either protocol.
        let (other, _connection) = h2c(addr).await;
        let answer = send(&other, get(addr, "/"), &[]).await.unwrap();
        assert_eq!((answer.status, answer.release.as_str()), (200, "0.2.9"));
    });
    assert_eq!(agent.get("/").status, 200);
    // Counted as the call it is: stuck in its release.
    assert_eq!(agent.active_library()["stuck"], 1, "{}", agent.status());
}

/// One HTTP/2 frame (RFC 9113 §4.1).
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut frame = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    frame.extend_from_slice(&[kind, flags]);
    frame.extend_from_slice(&stream.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// A GET of `path`'s header block: indexed `:method GET` and `:scheme
/// http`, then `:authority` and `:path` as literals without indexing
/// (RFC 7541), so that no block depends on another.
fn get_block(path: &str) -> Vec<u8> {
    let mut block = vec![0x82, 0x86];
    for (index, value) in [(0x01, "localhost"), (0x04, path)] {
        block.push(index);
        block.push(value.len() as u8);
        block.extend_from_slice(value.as_bytes());
    }
    block
}

#[test]
fn a_client_that_opens_more_streams_than_it_was_told_has_them_refused() {
    use std::io::{Read, Write};
    const HEADERS: u8 = 1;
    const RST_STREAM: u8 = 3;
    const SETTINGS: u8 = 4;
    const GOAWAY: u8 = 7;
    const END_STREAM_AND_HEADERS: u8 = 0x5;
    const REFUSED_STREAM: u32 = 0x7;
    let dir = tempfile::tempdir().unwrap();
    let agent = service_agent(dir.path(), &["--http2-max-streams", "3"]);
    let mut tcp = std::net::TcpStream::connect(agent.http).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    // A client that ignores the limit: four requests at once, each asking
    // for a minute's wait, without reading the agent's settings first.
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(frame(SETTINGS, 0, 0, &[]));
    for stream in [1, 3, 5, 7] {
        out.extend(frame(
            HEADERS,
            END_STREAM_AND_HEADERS,
            stream,
            &get_block("/sleep/60000"),
        ));
    }
    tcp.write_all(&out).unwrap();
    // The agent's answer: frame by frame, until the fourth stream's fate.
    let mut refused = None;
    while refused.is_none() {
        let mut head = [0u8; 9];
        tcp.read_exact(&mut head)
            .expect("the agent said nothing of stream 7");
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        let mut payload = vec![0; len];
        tcp.read_exact(&mut payload).unwrap();
        match head[3] {
            SETTINGS if head[4] & 1 == 0 => tcp.write_all(&frame(SETTINGS, 1, 0, &[])).unwrap(),
            RST_STREAM => {
                let code = u32::from_be_bytes(payload[..4].try_into().unwrap());
                assert_eq!(stream, 7, "stream {stream} reset with code {code}");
                refused = Some(code);
            }
            GOAWAY => panic!("the agent closed the connection instead: {payload:?}"),
            _ => {}
        }
    }
    assert_eq!(refused, Some(REFUSED_STREAM));
    // The three within the limit are under way on the release.
    let in_flight = || agent.active_library()["in_flight"].clone();
    assert!(
        eventually(Duration::from_secs(30), || in_flight() == 3),
        "{:?}",
        in_flight()
    );
}
