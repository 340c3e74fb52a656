//! `--self-upgrades N`: the agent upgrading itself under load. The agent
//! runs from a copy of its binary; with 0.2.0 permanent and keep-alive
//! connections loading `GET /` (counted), the bench asks for N
//! self-upgrades one after the other (`RestartAgent`, what `ctl agent
//! restart` sends): the supervisor starts a new worker from the binary on
//! disk, which gets ready to take over; the old one drains (answering with
//! `Connection: close`, which the load follows by reconnecting) and hands
//! its state straight over. Each restart is timed until `AgentInfo` names
//! a new worker, and until the old worker is gone, and gives the worst
//! wait any connection saw while it happened (between two responses,
//! reconnect included) — beside the same figure over windows of load with
//! no restart, the floor the machine's scheduling sets, and the agent's
//! own account of each handover (its log's `gap_us`: from the old
//! worker's last accept to the new one's first); one more goes through
//! the real `ctl agent restart --wait`.
//!
//! With `--bad-binary` the copy is replaced by a binary that cannot start
//! (a script that says so on stderr and exits 1) first: each restart must
//! be reported failed (`AgentInfo`'s `last_failed_restart`) with the same
//! worker serving; then the good binary goes back and one `ctl agent
//! restart --wait` must go through.
//!
//! Either way, at the end nothing may have failed or been refused, and
//! `/count` must equal the 200s the load counted: no request lost, none
//! counted twice.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use nine9s_proto::{AgentInfoRequest, FailedRestart, RestartAgentRequest};
use serde_json::{json, Value};

use crate::control::{micros, Control, Direction};
use crate::crashloop::rpc;
use crate::load::{self, Load};
use crate::procs::{self, AgentProcess, Client, Layout, ProcId};
use crate::report::{latency, ms, percentile, round, Outcome};
use crate::run::progress;

/// One restart, until the old worker is gone; the agent's shutdown grace
/// is 10 s.
const RESTART_LIMIT: Duration = Duration::from_secs(60);
/// One `AgentInfo` call while the workers change hands.
const CALL_LIMIT: Duration = Duration::from_secs(5);
/// Load before the first restart and after the last.
const SETTLE: Duration = Duration::from_millis(300);
/// After a restart, before its worst wait is read: every connection has
/// had a response from the new worker by then.
const AFTER: Duration = Duration::from_millis(50);
/// Windows of load with no restart, for the worst wait the machine's
/// scheduling alone makes (the floor under the restarts' figure).
const STEADY_WINDOWS: u32 = 50;
const STEADY_WINDOW: Duration = Duration::from_millis(100);
/// What replaces the binary with `--bad-binary`.
const BAD_BINARY: &str =
    "#!/bin/sh\necho 'agent: error: this build cannot start (nine9s-bench --bad-binary)' >&2\nexit 1\n";

pub struct Options {
    pub restarts: u32,
    pub connections: usize,
    pub bad_binary: bool,
}

/// What the restarts measured.
#[derive(Default)]
struct Restarts {
    done: u32,
    /// From the call to the first `AgentInfo` answered by a new worker
    /// (with `--bad-binary`: that reported the restart failed).
    restart_us: Vec<u64>,
    /// From the call until the old worker was gone.
    handover_us: Vec<u64>,
    /// The worst wait of a connection during each restart.
    worst_wait_us: Vec<u64>,
    /// The same in windows of [`STEADY_WINDOW`] with no restart.
    steady_wait_us: Vec<u64>,
    /// The agent's own account of each handover: from the old worker's
    /// last accept to the new worker's first (its log's `gap_us`).
    gap_us: Vec<u64>,
    /// `ctl agent restart --wait`, as a process.
    ctl_us: Option<u64>,
    /// Why the restarts stopped early.
    error: Option<String>,
}

impl Restarts {
    fn stopped(&mut self, why: String) {
        self.error.get_or_insert(why);
    }
}

/// Three figures of a sample, in ms.
fn spread(samples: &mut [u64]) -> Value {
    json!({
        "p50": percentile(samples, 0.5).map(ms),
        "p99": percentile(samples, 0.99).map(ms),
        "max": samples.iter().max().copied().map(ms),
    })
}

pub async fn self_upgrades(options: Options) -> anyhow::Result<Outcome> {
    let started = Instant::now();
    let layout = Layout::find()?;
    // The directory lives until the agent has stopped.
    let (_temp, agent, binary) = procs::start_copy_in_temp(&layout, "self-upgrades").await?;
    let measured = measure(&layout, &agent, &binary, &options).await;
    let ((mut restarts, tally, count_reported), agent_exit) = agent.finish(measured).await?;

    let counts_exact = count_reported == Some(tally.ok);
    let all_restarts = restarts.error.is_none() && restarts.done == options.restarts;
    let passed = tally.failed == 0 && tally.refused == 0 && counts_exact && all_restarts;
    let stall_ms = round(tally.max_gap.as_secs_f64() * 1000.0, 3);
    let json = json!({
        "mode": if options.bad_binary { "self-upgrades-bad-binary" } else { "self-upgrades" },
        "restarts": options.restarts,
        "restarts_done": restarts.done,
        "connections": options.connections,
        "restart_ms": spread(&mut restarts.restart_us),
        "handover_ms": spread(&mut restarts.handover_us),
        "worst_wait_ms": spread(&mut restarts.worst_wait_us),
        "steady_worst_wait_ms": spread(&mut restarts.steady_wait_us),
        "handed_over": restarts.gap_us.len(),
        "accept_gap_ms": spread(&mut restarts.gap_us),
        "ctl_restart_ms": restarts.ctl_us.map(ms),
        "worst_stall_ms": stall_ms,
        "served": tally.ok,
        "rps": round(tally.rps(), 0),
        "latency": latency(&tally.latencies_us),
        "failed": tally.failed,
        "refused": tally.refused,
        "connect_refused": tally.connect_refused,
        "closed_unanswered": tally.closed_unanswered,
        "hello_200": tally.ok,
        "count_reported": count_reported,
        "counts_exact": counts_exact,
        "errors": tally.errors.iter().cloned().chain(restarts.error.clone()).collect::<Vec<_>>(),
        "agent_exit": agent_exit,
        "targets": {
            "zero_failed": tally.failed == 0,
            "zero_refused": tally.refused == 0,
            "counts_exact": counts_exact,
            "all_restarts": all_restarts,
        },
        "seconds": round(started.elapsed().as_secs_f64(), 1),
    });
    Ok(Outcome {
        json: json.to_string(),
        passed,
    })
}

async fn measure(
    layout: &Layout,
    agent: &AgentProcess,
    binary: &Path,
    options: &Options,
) -> anyhow::Result<(Restarts, load::Tally, Option<u64>)> {
    let (dir, library) = &layout.releases[0];
    progress(format_args!("staging {}", dir.display()));
    let (dir, library) = (dir.to_string_lossy(), library.to_string_lossy());
    procs::ctl(&layout.ctl, agent, &["stage", &dir, "--library", &library]).await?;
    // 0.1.0 keeps no state, so 0.2.0 counts `/` from 0 here.
    Control::connect(agent)
        .await?
        .switch(Direction::Upgrade, "0.2.0")
        .await?;
    let good = std::fs::read(binary).context("cannot read the agent's binary")?;
    if options.bad_binary {
        install(binary, BAD_BINARY.as_bytes())?;
    }
    progress(format_args!(
        "0.2.0 permanent; {} connections load /, {} self-upgrades{}",
        options.connections,
        options.restarts,
        if options.bad_binary {
            " to a binary that cannot start"
        } else {
            ""
        }
    ));

    let load = Load::start(agent.http, options.connections);
    tokio::time::sleep(SETTLE).await;
    let mut restarts = Restarts::default();
    load.take_worst_wait();
    for _ in 0..STEADY_WINDOWS {
        tokio::time::sleep(STEADY_WINDOW).await;
        restarts.steady_wait_us.push(micros(load.take_worst_wait()));
    }
    let mut client = agent.client().await?;
    let every = (options.restarts / 10).max(1);
    for i in 1..=options.restarts {
        load.take_worst_wait();
        let restarted = if options.bad_binary {
            refused(agent, &mut client, i)
                .await
                .map(|took| (took, None))
        } else {
            restart(agent, &mut client, i)
                .await
                .map(|(took, handover)| (took, Some(handover)))
        };
        match restarted {
            Ok((restart, handover)) => {
                tokio::time::sleep(AFTER).await;
                restarts.worst_wait_us.push(micros(load.take_worst_wait()));
                restarts.restart_us.push(micros(restart));
                restarts.handover_us.extend(handover.map(micros));
                restarts.done += 1;
            }
            Err(e) => {
                restarts.stopped(format!("restart {i}: {e:#}"));
                break;
            }
        }
        if i % every == 0 {
            progress(format_args!(
                "{i}/{} self-upgrades, last {:.1} ms, worst wait {:.1} ms, {} failed or refused so far",
                options.restarts,
                restarts.restart_us.last().map_or(0.0, |&us| ms(us)),
                restarts.worst_wait_us.last().map_or(0.0, |&us| ms(us)),
                load.unsuccessful()
            ));
        }
    }
    if options.bad_binary {
        install(binary, &good)?;
    }
    if restarts.error.is_none() {
        // The real CLI once, as an operator runs it (with the good binary).
        let ctl_restart = async {
            let old = agent.worker()?;
            let elapsed = procs::ctl(&layout.ctl, agent, &["agent", "restart", "--wait"]).await?;
            old.wait_gone(RESTART_LIMIT).await?;
            anyhow::Ok(elapsed)
        };
        match ctl_restart.await {
            Ok(elapsed) => restarts.ctl_us = Some(micros(elapsed)),
            Err(e) => restarts.stopped(format!("ctl agent restart --wait: {e:#}")),
        }
    }
    tokio::time::sleep(SETTLE).await;
    let tally = load.stop().await;
    restarts.gap_us = accept_gaps(&agent.log());
    let count = load::get(agent.http, "/count").await?;
    let count_reported = count.trim().parse().ok();
    if count_reported.is_none() {
        bail!("GET /count answered {count:?}, not a number");
    }
    Ok((restarts, tally, count_reported))
}

/// The `gap_us` of every handover the agent logged ("serving with the
/// state handed over").
fn accept_gaps(log: &str) -> Vec<u64> {
    log.lines()
        .filter(|line| line.contains("serving with the state handed over"))
        .filter_map(|line| {
            let (_, after) = line.split_once("gap_us=")?;
            after.split_whitespace().next()?.parse().ok()
        })
        .collect()
}

/// Puts `bytes` in place of the binary at `path`: written aside, made
/// executable, renamed over it.
fn install(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let staged = path.with_extension("new");
    std::fs::write(&staged, bytes)
        .and_then(|()| std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o755)))
        .and_then(|()| std::fs::rename(&staged, path))
        .with_context(|| format!("cannot install {}", path.display()))
}

/// `AgentInfo` within [`CALL_LIMIT`], on a new connection if the last one
/// broke.
async fn agent_info(
    agent: &AgentProcess,
    client: &mut Client,
) -> Option<nine9s_proto::AgentProcess> {
    match tokio::time::timeout(CALL_LIMIT, client.agent_info(AgentInfoRequest {})).await {
        Ok(Ok(reply)) => Some(reply.into_inner().process.unwrap_or_default()),
        // The old worker closed its connection: a new one waits in the
        // backlog for the new worker.
        Ok(Err(_)) | Err(_) => {
            if let Ok(Ok(fresh)) = tokio::time::timeout(CALL_LIMIT, agent.client()).await {
                *client = fresh;
            }
            None
        }
    }
}

/// Asks for a self-upgrade; checks the worker asked is the one serving.
async fn ask(agent: &AgentProcess, client: &mut Client, i: u32, old: ProcId) -> anyhow::Result<()> {
    let reply = rpc(client.restart_agent(RestartAgentRequest {
        reason: format!("nine9s-bench self-upgrade {i}"),
    }))
    .await
    .context("RestartAgent")?;
    if reply.worker_pid != old.pid || reply.supervisor_pid != agent.supervisor_pid() {
        bail!(
            "RestartAgent answered worker {} of supervisor {}; the bench sees worker {} of {}",
            reply.worker_pid,
            reply.supervisor_pid,
            old.pid,
            agent.supervisor_pid()
        );
    }
    Ok(())
}

/// One self-upgrade: how long until a new worker answers `AgentInfo`, and
/// until the old one is gone.
async fn restart(
    agent: &AgentProcess,
    client: &mut Client,
    i: u32,
) -> anyhow::Result<(Duration, Duration)> {
    let old = agent.worker()?;
    let asked = Instant::now();
    ask(agent, client, i, old).await?;
    let process = loop {
        if asked.elapsed() > RESTART_LIMIT {
            bail!("no new worker answered AgentInfo within {RESTART_LIMIT:?}");
        }
        match agent_info(agent, client).await {
            Some(process) if process.worker_pid != 0 && process.worker_pid != old.pid => {
                break process
            }
            _ => tokio::time::sleep(Duration::from_millis(1)).await,
        }
    };
    let restarted = asked.elapsed();
    if !process.previous_exit.is_empty() {
        bail!(
            "the new worker {} was told its predecessor {:?}: a self-upgrade is no crash",
            process.worker_pid,
            process.previous_exit
        );
    }
    if let Some(failed) = &process.last_failed_restart {
        bail!("a restart failed: {failed:?}");
    }
    if ProcId::of(process.worker_pid).is_none() {
        return Err(anyhow!(
            "AgentInfo names worker {}, which the bench cannot see",
            process.worker_pid
        ));
    }
    old.wait_gone(RESTART_LIMIT.saturating_sub(asked.elapsed()))
        .await
        .context("the old worker")?;
    Ok((restarted, asked.elapsed()))
}

/// One self-upgrade to the binary that cannot start: how long until the
/// serving worker reports it failed; the same worker must go on serving.
async fn refused(agent: &AgentProcess, client: &mut Client, i: u32) -> anyhow::Result<Duration> {
    let old = agent.worker()?;
    let before: Option<FailedRestart> = rpc(client.agent_info(AgentInfoRequest {}))
        .await?
        .process
        .and_then(|p| p.last_failed_restart);
    let asked = Instant::now();
    ask(agent, client, i, old).await?;
    loop {
        if asked.elapsed() > RESTART_LIMIT {
            bail!("no failed restart reported within {RESTART_LIMIT:?}");
        }
        let Some(process) = agent_info(agent, client).await else {
            continue;
        };
        if process.worker_pid != old.pid {
            bail!(
                "worker {} serves instead of {}: the bad binary replaced it",
                process.worker_pid,
                old.pid
            );
        }
        match process.last_failed_restart {
            Some(failed) if Some(&failed) != before.as_ref() => {
                if !failed.exit.contains("exited with code 1") {
                    bail!("the restart failed otherwise than the bad binary does: {failed:?}");
                }
                return Ok(asked.elapsed());
            }
            _ => tokio::time::sleep(Duration::from_millis(1)).await,
        }
    }
}
