//! `--stream-gib X`: one large response through nine9s against the same
//! router served bare. The agent serves the bench fixture `bytes`
//! (`tests/plugins/bytes`: `GET /bytes/{n}` streams n bytes in 64 KiB
//! chunks) and so does `--bare-server bytes`, from the same source file;
//! the bench downloads X GiB from each, in turns, [`ROUNDS`] times, and
//! reports the bytes per second of each, their ratio (target 0.8) and the
//! serving process's CPU time per GiB.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::header::HOST;
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::TcpStream;

use crate::bare::Baseline;
use crate::procs::{self, BareServer, Layout};
use crate::report::round;
use crate::run::progress;

const GIB: f64 = (1u64 << 30) as f64;
/// Downloads from each server, in turns.
const ROUNDS: u32 = 3;
/// Bytes per second through the agent over bare, at least.
const RATIO_TARGET: f64 = 0.8;

pub struct Options {
    pub gib: f64,
}

/// What the downloads from one server took, all rounds together.
#[derive(Default)]
struct Side {
    elapsed: Duration,
    cpu: Duration,
}

impl Side {
    fn bytes_per_second(&self, bytes: u64) -> f64 {
        (bytes * u64::from(ROUNDS)) as f64 / self.elapsed.as_secs_f64()
    }

    fn cpu_seconds_per_gib(&self, bytes: u64) -> f64 {
        self.cpu.as_secs_f64() / (bytes * u64::from(ROUNDS)) as f64 * GIB
    }
}

pub async fn stream(options: Options) -> anyhow::Result<String> {
    let bytes = (options.gib * GIB).round() as u64;
    let path = format!("/bytes/{bytes}");
    let layout = Layout::find()?;
    let release = layout.bytes_release()?;
    let (_temp, agent) = procs::start_bootstrapped(&layout, "stream", &release, &[]).await?;
    let measured = async {
        let bare = BareServer::start_as(&layout.bench, Baseline::Bytes).await?;
        let (mut bare_side, mut agent_side) = (Side::default(), Side::default());
        let downloads = async {
            for round in 1..=ROUNDS {
                let before = bare.cpu()?;
                bare_side.elapsed += download(bare.addr, &path, bytes).await?;
                bare_side.cpu += bare.cpu()? - before;
                let before = agent.cpu()?;
                agent_side.elapsed += download(agent.http, &path, bytes).await?;
                agent_side.cpu += agent.cpu()? - before;
                progress(format_args!("round {round} of {ROUNDS} done"));
            }
            anyhow::Ok(())
        }
        .await;
        bare.stop().await?;
        downloads?;
        anyhow::Ok((bare_side, agent_side))
    }
    .await;
    let ((bare, through), agent_exit) = agent.finish(measured).await?;
    let (bare_rate, agent_rate) = (
        bare.bytes_per_second(bytes),
        through.bytes_per_second(bytes),
    );
    let ratio = agent_rate / bare_rate;
    let mib = |rate: f64| round(rate / (1u64 << 20) as f64, 0);
    let json = json!({
        "mode": "stream",
        "gib": options.gib,
        "bytes": bytes,
        "rounds": ROUNDS,
        "bare_mib_per_second": mib(bare_rate),
        "agent_mib_per_second": mib(agent_rate),
        "agent_over_bare": round(ratio, 3),
        "bare_cpu_seconds_per_gib": round(bare.cpu_seconds_per_gib(bytes), 3),
        "agent_cpu_seconds_per_gib": round(through.cpu_seconds_per_gib(bytes), 3),
        "agent_exit": agent_exit,
        "targets": { "ratio": ratio >= RATIO_TARGET },
        "target_values": { "agent_over_bare_min": RATIO_TARGET },
    });
    Ok(json.to_string())
}

/// `GET path` on a new connection, its body counted as it comes and
/// dropped: the time from the request to the body's end. An error unless
/// the answer is a 200 of exactly `expected` bytes.
async fn download(addr: SocketAddr, path: &str, expected: u64) -> anyhow::Result<Duration> {
    let stream = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connect to {addr}"))?;
    stream.set_nodelay(true)?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    let driver = tokio::spawn(connection);
    let request = Request::get(path)
        .header(HOST, addr.to_string())
        .body(Empty::<Bytes>::new())?;
    let started = Instant::now();
    let response = sender.send_request(request).await?;
    if response.status() != 200 {
        bail!("GET {path} from {addr}: status {}", response.status());
    }
    let mut body = response.into_body();
    let mut received = 0u64;
    while let Some(frame) = body.frame().await {
        if let Some(data) = frame?.data_ref() {
            received += data.len() as u64;
        }
    }
    let elapsed = started.elapsed();
    drop(sender);
    driver.await??;
    if received != expected {
        bail!("GET {path} from {addr}: {received} bytes, not {expected}");
    }
    Ok(elapsed)
}
