//! `--sleepers N`: many requests waiting at once in an async release. The
//! agent serves myservice 0.1.0 with room for N connections from one
//! client; the bench opens N connections first, waits until the agent's
//! worker has accepted them all (`/proc`), then sends `GET /sleep/1000` on every one at
//! once. The figures: whether all were answered (the exit code's), the
//! wall time from the send to the last answer (target 1.5 s: the handlers
//! sleep together, not one after another) and the worker's resident
//! memory before and after, its connections still open.

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use serde_json::json;
use tokio::task::JoinSet;

use crate::load::Held;
use crate::procs::{self, AgentProcess, Layout};
use crate::report::{percentile, round, Outcome};
use crate::run::progress;

const SLEEP_MS: u64 = 1000;
const WALL_TARGET: Duration = Duration::from_millis(1500);
/// Connections opened at once, each batch accepted by the worker before
/// the next: fewer than the agent's listen backlog (128), beyond which a
/// handshake the client sees complete can be dropped by the server.
const CONNECT_BATCH: usize = 100;
/// How long opening them all may take: well within the agent's idle
/// timeout (60 s), after which it would close the first.
const OPEN_WITHIN: Duration = Duration::from_secs(30);
/// Open files beside the connections, for the agent and the bench.
const SPARE_FILES: u64 = 4096;
/// Error samples in the report.
const ERRORS_SHOWN: usize = 10;

pub struct Options {
    pub sleepers: usize,
}

struct Figures {
    /// Opening the connections until the worker had accepted all.
    open: Duration,
    answered: usize,
    failed: usize,
    errors: Vec<String>,
    wall: Duration,
    latencies_us: Vec<u64>,
    rss_kib: (u64, u64),
}

pub async fn sleepers(options: Options) -> anyhow::Result<Outcome> {
    let n = options.sleepers;
    // The agent's worker holds each connection twice (the watchdog's
    // duplicate, with a request time limit) and the bench once, beside
    // what else each has open.
    let wanted = |per_connection: u64| per_connection * n as u64 + SPARE_FILES;
    let files = procs::raise_open_files(wanted(2));
    let time_limit = files >= wanted(2);
    if !time_limit && files < wanted(1) {
        bail!(
            "{n} sleepers need {} open files, and the limit is {files}: raise the hard limit (ulimit -Hn) or run fewer",
            wanted(1)
        );
    }
    let cap = (n + 64).to_string();
    let layout = Layout::find()?;
    let release = layout.myservice_release()?;
    let mut flags = vec![
        "--max-connections",
        cap.as_str(),
        "--max-connections-per-client",
        cap.as_str(),
    ];
    if !time_limit {
        progress(format_args!(
            "the open-file limit {files} holds one descriptor per connection, not two: the agent runs with --request-timeout 0"
        ));
        flags.extend(["--request-timeout", "0"]);
    }
    let (_temp, agent) = procs::start_bootstrapped(&layout, "sleepers", &release, &flags).await?;
    let measured = measure(&agent, n).await;
    let (figures, agent_exit) = agent.finish(measured).await?;
    Ok(report(n, time_limit, figures, agent_exit))
}

async fn measure(agent: &AgentProcess, n: usize) -> anyhow::Result<Figures> {
    let rss_before = agent.rss_kib()?;
    progress(format_args!("opening {n} connections"));
    let started = Instant::now();
    let addr = agent.http;
    let mut held = Vec::with_capacity(n);
    while held.len() < n {
        let batch = CONNECT_BATCH.min(n - held.len());
        let opened = futures_util::future::try_join_all((0..batch).map(|_| Held::open(addr)));
        held.extend(opened.await?);
        loop {
            let accepted = agent.http_connections()?;
            if accepted >= held.len() {
                break;
            }
            if started.elapsed() > OPEN_WITHIN {
                bail!(
                    "the worker accepted {accepted} of {} connections within {OPEN_WITHIN:?}",
                    held.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    let open = started.elapsed();
    progress(format_args!(
        "{n} connections open and accepted by the worker in {open:?}; GET /sleep/{SLEEP_MS} on each"
    ));

    let (go, ready) = tokio::sync::watch::channel(false);
    let mut calls = JoinSet::new();
    let path = format!("/sleep/{SLEEP_MS}");
    for mut connection in held {
        let (mut ready, path) = (ready.clone(), path.clone());
        calls.spawn(async move {
            ready
                .wait_for(|&go| go)
                .await
                .map_err(|_| anyhow!("the bench stopped before the send"))?;
            let answer = connection.get(addr, &path).await;
            // The connection stays open until every answer is in.
            Ok::<_, anyhow::Error>((answer, Instant::now(), connection))
        });
    }
    let sent = Instant::now();
    go.send_replace(true);
    let expected = format!("slept {SLEEP_MS} ms\n");
    let (mut answered, mut failed, mut errors) = (0, 0, Vec::new());
    let mut latencies_us = Vec::with_capacity(n);
    let mut last = sent;
    let mut kept = Vec::with_capacity(n);
    while let Some(joined) = calls.join_next().await {
        let (answer, at, connection) = match joined {
            Ok(result) => result?,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        };
        kept.push(connection);
        last = last.max(at);
        match answer {
            Ok((200, body)) if body == expected => {
                answered += 1;
                latencies_us.push(u64::try_from((at - sent).as_micros()).unwrap_or(u64::MAX));
            }
            Ok((status, body)) => {
                failed += 1;
                errors.push(format!("status {status}: {}", body.trim_end()));
            }
            Err(e) => {
                failed += 1;
                errors.push(format!("{e:#}"));
            }
        }
    }
    let wall = last - sent;
    let rss_after = agent.rss_kib()?;
    drop(kept);
    if answered + failed != n {
        bail!("{} of {n} requests went missing", n - answered - failed);
    }
    errors.truncate(ERRORS_SHOWN);
    progress(format_args!(
        "{answered} of {n} answered, the last {wall:?} after the send"
    ));
    Ok(Figures {
        open,
        answered,
        failed,
        errors,
        wall,
        latencies_us,
        rss_kib: (rss_before, rss_after),
    })
}

fn report(n: usize, time_limit: bool, figures: Figures, agent_exit: String) -> Outcome {
    let Figures {
        open,
        answered,
        failed,
        errors,
        wall,
        mut latencies_us,
        rss_kib,
    } = figures;
    let all_answered = answered == n;
    let ms = |us: Option<u64>| us.map(|us| round(us as f64 / 1000.0, 1));
    let json = json!({
        "mode": "sleepers",
        "sleepers": n,
        "path": format!("/sleep/{SLEEP_MS}"),
        // Off when the open-file limit could not hold the watchdog's
        // duplicate of every connection.
        "request_timeout": time_limit,
        "open_seconds": round(open.as_secs_f64(), 3),
        "answered": answered,
        "failed": failed,
        "all_answered": all_answered,
        "wall_seconds": round(wall.as_secs_f64(), 3),
        "latency_ms": {
            "p50": ms(percentile(&mut latencies_us, 0.5)),
            "p99": ms(percentile(&mut latencies_us, 0.99)),
            "max": ms(latencies_us.last().copied()),
        },
        "rss_kib_before": rss_kib.0,
        "rss_kib_after": rss_kib.1,
        "agent_exit": agent_exit,
        "errors": errors,
        "targets": {
            "all_answered": all_answered,
            "wall": all_answered && wall <= WALL_TARGET,
        },
        "target_values": { "wall_seconds_max": WALL_TARGET.as_secs_f64() },
    });
    Outcome {
        json: json.to_string(),
        passed: all_answered,
    }
}
