//! `--stalled-uploads N`: what uploads that stop half-way cost the agent.
//! N Stage calls each announce a library of `--upload-mib` MiB, send all
//! but its last MiB, and stall; the figure is the agent's resident memory
//! before and with all N stalled (uploads stream to disk, so it should
//! not grow with their size), and that it still answers HTTP and gRPC.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use nine9s_proto::stage_chunk::Part;
use nine9s_proto::{StageChunk, StageHeader, StatusRequest};
use serde_json::json;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::load;
use crate::procs::{self, AgentProcess, Layout};
use crate::run::progress;

const MIB: usize = 1024 * 1024;

pub struct Options {
    pub uploads: usize,
    pub mib: usize,
}

pub async fn stalled_uploads(options: Options) -> anyhow::Result<String> {
    let layout = Layout::find()?;
    let temp = tempfile::Builder::new()
        .prefix("nine9s-uploads-")
        .tempdir()
        .context("cannot create a temporary directory")?;
    let max = options.uploads.to_string();
    let agent = AgentProcess::start_with(
        &layout.agent,
        temp.path(),
        procs::READY_TIMEOUT,
        &["--max-uploads", &max, "--upload-idle-timeout", "10m"],
    )
    .await?;
    let manifest = std::fs::read_to_string(layout.releases[1].0.join("release.toml"))?;
    let before = agent.rss_kib()?;
    let chunk = vec![0x5a_u8; MIB];
    let mut calls = Vec::new();
    let mut senders = Vec::new();
    let started = Instant::now();
    for n in 0..options.uploads {
        let (tx, rx) = mpsc::channel(4);
        let mut client = agent.client().await?;
        calls.push(tokio::spawn(async move {
            client.stage(ReceiverStream::new(rx)).await
        }));
        tx.send(StageChunk {
            part: Some(Part::Header(StageHeader {
                manifest_toml: manifest.clone(),
                sha256: "0".repeat(64),
                size: (options.mib * MIB) as u64,
                ..Default::default()
            })),
        })
        .await?;
        for _ in 1..options.mib {
            tx.send(StageChunk {
                part: Some(Part::Data(chunk.clone())),
            })
            .await
            .with_context(|| format!("upload {n} was cut"))?;
        }
        senders.push(tx);
        progress(format_args!(
            "upload {n} stalled after {} MiB",
            options.mib - 1
        ));
    }
    // The last chunks are in the agent once its disk holds them.
    let artifacts = temp.path().join("data/artifacts");
    let expected = ((options.mib - 1) * MIB * options.uploads) as u64;
    let deadline = Instant::now() + Duration::from_secs(120);
    while on_disk(&artifacts)? < expected {
        if Instant::now() > deadline {
            bail!(
                "the uploads never reached the disk: {} of {expected} bytes",
                on_disk(&artifacts)?
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let during = agent.rss_kib()?;
    let http = load::get(agent.http, "/").await.is_ok();
    let grpc = agent.client().await?.status(StatusRequest {}).await.is_ok();
    drop(senders);
    for call in calls {
        let _ = call.await;
    }
    Ok(json!({
        "stalled_uploads": options.uploads,
        "upload_mib": options.mib,
        "sent_mib_each": options.mib - 1,
        "seconds_to_send": started.elapsed().as_secs_f64(),
        "rss_kib_before": before,
        "rss_kib_with_all_stalled": during,
        "bytes_on_disk": expected,
        "http_answered": http,
        "grpc_answered": grpc,
    })
    .to_string())
}

/// Bytes in the uploads' partial files.
fn on_disk(dir: &std::path::Path) -> anyhow::Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_name().to_string_lossy().ends_with(".partial") {
            total += entry.metadata()?.len();
        }
    }
    Ok(total)
}
