//! The run, step by step: start the agent, stage 0.2.0 and 0.3.0 with
//! `ctl`, upgrade to 0.2.0, then the three load phases (bare server and
//! agent steady, in turns; agent while cycling), the `ctl` cycles and the final `/count`.
//! The agent is stopped on every path out of here. The load in turns
//! ([`in_turns`]) is `--service`'s too.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context};

use crate::control::{micros, Control, Direction};
use crate::load::{self, Load};
use crate::procs::{self, AgentProcess, BareServer, Layout};
use crate::report::{Figures, Report};
use crate::Options;

/// Turns each of the bare server and the agent gets in phases a and b.
const SLICES: u32 = 6;

/// Cycles done with the real `ctl`, one process per switch, without load.
const CTL_CYCLES: usize = 10;

pub async fn bench(options: Options) -> anyhow::Result<Report> {
    let layout = Layout::find()?;
    let temp = tempfile::Builder::new()
        .prefix("nine9s-bench-")
        .tempdir()
        .context("cannot create a temporary directory")?;
    progress(format_args!("starting {}", layout.agent.display()));
    let agent = AgentProcess::start(&layout.agent, temp.path(), procs::READY_TIMEOUT).await?;
    progress(format_args!(
        "agent ready: http={} grpc={}",
        agent.http, agent.grpc
    ));
    let measured = measure(&layout, &agent, &options).await;
    let (figures, agent_exit) = agent.finish(measured).await?;
    Ok(Report::new(&options, &figures, agent_exit))
}

async fn measure(
    layout: &Layout,
    agent: &AgentProcess,
    options: &Options,
) -> anyhow::Result<Figures> {
    for (dir, library) in &layout.releases {
        progress(format_args!("staging {}", dir.display()));
        let dir = dir.to_string_lossy();
        let library = library.to_string_lossy();
        procs::ctl(&layout.ctl, agent, &["stage", &dir, "--library", &library]).await?;
    }
    let mut control = Control::connect(agent).await?;
    // 0.1.0 keeps no state, so 0.2.0 starts counting `/` from 0 here, and
    // every `/` the bench sends from now on is one it counts.
    control.switch(Direction::Upgrade, "0.2.0").await?;
    progress(format_args!("upgraded to 0.2.0"));

    let bare = BareServer::start(&layout.bench).await?;
    progress(format_args!(
        "phases a and b: bare server {} and agent on 0.2.0 in turns of {:?}, {} connections, {:?} each",
        bare.addr,
        options.phase / SLICES,
        options.connections,
        options.phase
    ));
    let turns = in_turns(&bare, agent, options.connections, options.phase, "/").await?;
    bare.stop().await?;
    let Turns {
        bare: bare_load,
        agent: steady_load,
        bare_cpu,
        agent_cpu,
    } = turns;
    log_phase("a", &bare_load);
    log_phase("b", &steady_load);
    let rss_before = agent.rss_kib()?;
    let mapped_before = agent.mapped_artifacts()?;
    let store_before = agent.store_kib()?;
    let last_id = control.last_transition_id().await?;
    progress(format_args!(
        "phase c: agent under load, {} cycles 0.2.0 -> 0.3.0 -> 0.2.0",
        options.cycles
    ));
    let load = Load::start(agent.http, options.connections);
    let cycling = control.cycle(options.cycles, || agent.rss_kib().ok()).await;
    let cycling_load = load.stop().await;
    let rss_after = agent.rss_kib()?;
    let mapped_after = agent.mapped_artifacts()?;
    let store_after = agent.store_kib()?;
    let transitions = control.transitions_after(last_id).await?;
    log_phase("c", &cycling_load);
    if let Some(error) = &cycling.error {
        progress(format_args!("cycling stopped: {error}"));
    }

    // After a failed cycle the active release is not known; no point.
    let mut ctl_us = Vec::new();
    if cycling.error.is_none() {
        progress(format_args!("{CTL_CYCLES} cycles with ctl, no load"));
        for _ in 0..CTL_CYCLES {
            for (verb, version) in [("upgrade", "0.3.0"), ("downgrade", "0.2.0")] {
                let args = [verb, "--to", version, "--permanent"];
                ctl_us.push(micros(procs::ctl(&layout.ctl, agent, &args).await?));
            }
        }
    }

    let count = load::get(agent.http, "/count").await?;
    let count_reported = match count.trim().parse() {
        Ok(count) => count,
        Err(_) => bail!("GET /count answered {count:?}, not a number"),
    };
    Ok(Figures {
        bare: bare_load,
        steady: steady_load,
        cycling_load,
        cycling,
        transitions,
        ctl_us,
        count_reported,
        cpu: (bare_cpu, agent_cpu),
        rss_kib: (rss_before, rss_after),
        mapped: (mapped_before, mapped_after),
        store_kib: (store_before, store_after),
    })
}

/// What the bare server and the agent did under the same load in turns.
pub struct Turns {
    pub bare: load::Tally,
    pub agent: load::Tally,
    /// CPU time of the bare server and of the agent's worker during their
    /// turns.
    pub bare_cpu: Duration,
    pub agent_cpu: Duration,
}

/// `GET path` on `connections` keep-alive connections for `phase` on each
/// of the bare server and the agent, in turns of [`SLICES`] slices: the
/// machine's speed drifts over seconds (other tenants, frequency), and a
/// ratio of two phases run one after the other measures the drift too.
pub async fn in_turns(
    bare: &BareServer,
    agent: &AgentProcess,
    connections: usize,
    phase: Duration,
    path: &str,
) -> anyhow::Result<Turns> {
    let slice = phase / SLICES;
    let (mut bare_load, mut agent_load) = (load::Tally::default(), load::Tally::default());
    let (mut bare_cpu, mut agent_cpu) = (Duration::ZERO, Duration::ZERO);
    for _ in 0..SLICES {
        let before = bare.cpu()?;
        bare_load.absorb(steady(bare.addr, connections, slice, path).await);
        bare_cpu += bare.cpu()? - before;
        let before = agent.cpu()?;
        agent_load.absorb(steady(agent.http, connections, slice, path).await);
        agent_cpu += agent.cpu()? - before;
    }
    Ok(Turns {
        bare: bare_load,
        agent: agent_load,
        bare_cpu,
        agent_cpu,
    })
}

/// Load on `addr` for `length`.
async fn steady(addr: SocketAddr, connections: usize, length: Duration, path: &str) -> load::Tally {
    let load = Load::start_on(addr, connections, path);
    tokio::time::sleep(length).await;
    load.stop().await
}

pub fn log_phase(name: &str, tally: &load::Tally) {
    progress(format_args!(
        "phase {name} done: {:.0} req/s, {} ok, {} failed, {} refused in {:.1} s",
        tally.rps(),
        tally.ok,
        tally.failed,
        tally.refused,
        tally.elapsed.as_secs_f64()
    ));
}

pub fn progress(message: std::fmt::Arguments<'_>) {
    eprintln!("nine9s-bench: {message}");
}
