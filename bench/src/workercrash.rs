//! `--worker-crashes N`: what a worker that dies costs the clients. The
//! agent runs the test fixture nine9s 0.2.8 (`tests/plugins/segfault`),
//! permanent, whose `GET /crash` segfaults the worker serving it; keep-alive
//! connections load `GET /count` (which counts nothing) while the bench
//! sends `/crash` N times, one at a time. Each time it measures how long
//! from sending `/crash` until a new worker answers `/count` on a fresh
//! connection (which waits in the kernel's backlog meanwhile), and how many
//! of the load's requests were lost (only those in flight on the dying
//! worker should be). No connection may be refused: the supervisor holds
//! the sockets throughout.
//!
//! The state a new worker starts from is the last checkpoint, so the load
//! counts nothing; instead 0.2.0 counts [`COUNT`] `/` before the switch to
//! 0.2.8, whose snapshot carries them, and every worker must answer that.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use nine9s_proto::StatusRequest;
use serde_json::json;

use crate::control::{micros, Control, Direction};
use crate::crashloop::rpc;
use crate::load::{self, Load};
use crate::procs::{self, AgentProcess, Layout};
use crate::report::{ms, percentile, round, Outcome};
use crate::run::progress;

/// `GET /` sent on 0.2.0 before the switch: `/count` answers this after.
const COUNT: u64 = 25;
const FIXTURE: &str = "0.2.8";
/// A new worker must serve within this of the crash.
const RECOVERY_LIMIT: Duration = Duration::from_secs(10);
/// Target for the recovery's median.
const RECOVERY_P50_TARGET_MS: f64 = 50.0;
/// Load before the first crash, and after each recovery before the next:
/// the failures of one crash are all counted before the next.
const SETTLE: Duration = Duration::from_millis(100);
/// Problems kept for the report.
const PROBLEMS_KEPT: usize = 10;

pub struct Options {
    pub crashes: u32,
    pub connections: usize,
}

/// What the crashes measured.
#[derive(Default)]
struct Crashes {
    done: u32,
    /// From sending `/crash` to its connection's end: the worker died.
    death_us: Vec<u64>,
    /// From sending `/crash` to a new worker's answer to `/count`.
    recovery_us: Vec<u64>,
    /// Failed and refused requests of the load, per crash.
    lost: Vec<u64>,
    /// Distinct worker pids seen.
    workers: BTreeSet<u32>,
    /// What did not go as it should, a line each.
    problems: Vec<String>,
    problem_count: usize,
}

impl Crashes {
    fn problem(&mut self, problem: String) {
        self.problem_count += 1;
        if self.problems.len() < PROBLEMS_KEPT {
            self.problems.push(problem);
        }
    }
}

pub async fn worker_crashes(options: Options) -> anyhow::Result<Outcome> {
    let started = Instant::now();
    let layout = Layout::find()?;
    let segfault = layout.segfault_release()?;
    // The directory lives until the agent has stopped.
    let (_temp, agent) = procs::start_in_temp(&layout, "worker-crashes").await?;
    let measured = measure(&layout, &agent, &segfault, &options).await;
    let ((mut crashes, tally, status), agent_exit) = agent.finish(measured).await?;

    let previous_exit = status.agent.map(|a| a.previous_exit).unwrap_or_default();
    if crashes.done > 0 && !previous_exit.contains("SIGSEGV") {
        crashes.problem(format!(
            "the last worker was told its predecessor {previous_exit:?}, not killed by SIGSEGV"
        ));
    }
    if status.active_version != FIXTURE || status.permanent_version != FIXTURE {
        crashes.problem(format!(
            "after the crashes {} is active and {} permanent, not {FIXTURE}",
            status.active_version, status.permanent_version
        ));
    }
    let refused = tally.connect_refused;
    let failed = tally.failed + tally.closed_unanswered;
    let recovery_p50 = percentile(&mut crashes.recovery_us, 0.5);
    let lost_max = crashes.lost.iter().max().copied();
    let targets = json!({
        "zero_refused": refused == 0,
        "recovery_p50": recovery_p50.is_some_and(|p| ms(p) <= RECOVERY_P50_TARGET_MS),
        "failed_only_in_flight": lost_max.is_some_and(|m| m <= options.connections as u64),
        "no_problems": crashes.problem_count == 0,
    });
    let passed = refused == 0 && crashes.problem_count == 0;
    let json = json!({
        "mode": "worker-crashes",
        "crashes": options.crashes,
        "crashes_done": crashes.done,
        "connections": options.connections,
        "recovery_ms": {
            "p50": recovery_p50.map(ms),
            "p99": percentile(&mut crashes.recovery_us, 0.99).map(ms),
            "max": crashes.recovery_us.iter().max().copied().map(ms),
        },
        "recovery_p50_target_ms": RECOVERY_P50_TARGET_MS,
        "death_ms": {
            "p50": percentile(&mut crashes.death_us, 0.5).map(ms),
            "max": crashes.death_us.iter().max().copied().map(ms),
        },
        "load_path": "/count",
        "served": tally.ok,
        "rps": round(tally.rps(), 0),
        "refused": refused,
        "failed": failed,
        "failed_closed_unanswered": tally.closed_unanswered,
        "failed_other": tally.failed,
        "failed_per_crash": {
            "p50": percentile(&mut crashes.lost, 0.5),
            "max": lost_max,
        },
        "worst_stall_ms": round(tally.max_gap.as_secs_f64() * 1000.0, 3),
        "count": COUNT,
        "workers_seen": crashes.workers.len(),
        "previous_exit": previous_exit,
        "active_version": status.active_version,
        "problems": crashes.problem_count,
        "problem_samples": crashes.problems,
        "errors": tally.errors,
        "agent_exit": agent_exit,
        "targets": targets,
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
    segfault: &(std::path::PathBuf, std::path::PathBuf),
    options: &Options,
) -> anyhow::Result<(Crashes, load::Tally, nine9s_proto::StatusReply)> {
    let (dir, library) = &layout.releases[0];
    stage(layout, agent, dir, library).await?;
    let mut control = Control::connect(agent).await?;
    control.switch(Direction::Upgrade, "0.2.0").await?;
    for _ in 0..COUNT {
        load::get(agent.http, "/").await?;
    }
    stage(layout, agent, &segfault.0, &segfault.1).await?;
    // Permanent: a new worker comes back on the permanent release.
    control.switch(Direction::Upgrade, FIXTURE).await?;
    drop(control);
    let count = load::get(agent.http, "/count").await?;
    if count != COUNT.to_string() {
        bail!("{FIXTURE} answers /count {count:?} after the switch, not {COUNT}");
    }
    progress(format_args!(
        "{FIXTURE} permanent with /count {COUNT}; {} connections load /count, {} crashes",
        options.connections, options.crashes
    ));

    let mut crashes = Crashes::default();
    crashes.workers.insert(agent.worker_pid()?);
    let load = Load::start_on(agent.http, options.connections, "/count");
    tokio::time::sleep(SETTLE).await;
    let every = (options.crashes / 10).max(1);
    for i in 1..=options.crashes {
        if let Err(e) = crash(agent, &load, &mut crashes).await {
            crashes.problem(format!("crash {i}: {e:#}"));
            break;
        }
        if i % every == 0 {
            progress(format_args!(
                "{i}/{} crashes, last recovery {:.1} ms",
                options.crashes,
                crashes.recovery_us.last().map_or(0.0, |&us| ms(us))
            ));
        }
    }
    let tally = load.stop().await;
    let mut client = agent.client().await?;
    let status = rpc(client.status(StatusRequest {})).await?;
    Ok((crashes, tally, status))
}

async fn stage(
    layout: &Layout,
    agent: &AgentProcess,
    dir: &std::path::Path,
    library: &std::path::Path,
) -> anyhow::Result<()> {
    progress(format_args!("staging {}", dir.display()));
    let (dir, library) = (dir.to_string_lossy(), library.to_string_lossy());
    procs::ctl(&layout.ctl, agent, &["stage", &dir, "--library", &library]).await?;
    Ok(())
}

/// One crash: `/crash`, then `/count` until a new worker answers it.
/// `Err` when the agent did not come back; lesser faults are problems.
async fn crash(agent: &AgentProcess, load: &Load, crashes: &mut Crashes) -> anyhow::Result<()> {
    let old = agent.worker()?;
    let lost_before = load.unsuccessful();
    let sent = Instant::now();
    load::unanswered(agent.http, "/crash")
        .await
        .context("the worker did not die")?;
    crashes.death_us.push(micros(sent.elapsed()));
    // The connection ended as the worker's files were closed: it is dead,
    // and what answers from now on is a new worker.
    let answer = loop {
        let left = RECOVERY_LIMIT.saturating_sub(sent.elapsed());
        if left.is_zero() {
            bail!("no worker answered /count within {RECOVERY_LIMIT:?} of /crash");
        }
        match tokio::time::timeout(left, load::fetch(agent.http, "/count")).await {
            Ok(Ok(fetched)) if fetched.status == 200 => break fetched,
            Ok(Ok(_)) | Ok(Err(_)) => tokio::time::sleep(Duration::from_millis(1)).await,
            Err(_) => continue,
        }
    };
    crashes.recovery_us.push(micros(sent.elapsed()));
    crashes.done += 1;
    if answer.body != COUNT.to_string() || answer.release.as_deref() != Some(FIXTURE) {
        crashes.problem(format!(
            "after a crash /count answered {:?} from release {:?}, not {COUNT:?} from {FIXTURE}",
            answer.body, answer.release
        ));
    }
    if !old.gone() {
        crashes.problem(format!("the worker {} survived /crash", old.pid));
    }
    match agent.worker() {
        Ok(new) if new != old => {
            crashes.workers.insert(new.pid);
        }
        Ok(_) => crashes.problem(format!("the worker {} is still the worker", old.pid)),
        Err(e) => crashes.problem(format!("{e:#}")),
    }
    // The load's connections on the dead worker have all seen their end.
    tokio::time::sleep(SETTLE).await;
    crashes.lost.push(load.unsuccessful() - lost_before);
    Ok(())
}
