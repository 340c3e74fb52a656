//! `--service`: what nine9s costs an async release. The README's axum
//! release myservice 0.1.0 is the agent's bootstrap; the same router,
//! from the same source file, is served bare by hyper in a child
//! (`--bare-server myservice`). Keep-alive connections load `GET /` on
//! each in turn, in slices as the default run does ([`run::in_turns`]);
//! the figures are CPU per request of the serving process (the agent's
//! worker, which runs the release's runtime too; the bare server) and
//! throughput. The agent's `/count` must then equal the 200s it sent.

use std::time::Duration;

use anyhow::bail;
use serde_json::json;

use crate::bare::Baseline;
use crate::load;
use crate::procs::{self, BareServer, Layout};
use crate::report::{latency, round, Outcome};
use crate::run::{self, progress, Turns};

/// CPU per request through the agent over bare, at most.
const CPU_TARGET: f64 = 1.15;
/// Throughput through the agent over bare, at least.
const THROUGHPUT_TARGET: f64 = 0.90;
const PATH: &str = "/";
/// Error samples in the report.
const ERRORS_SHOWN: usize = 10;

pub struct Options {
    pub connections: usize,
    /// Load on each server, all its slices together.
    pub phase: Duration,
}

pub async fn service(options: Options) -> anyhow::Result<Outcome> {
    let layout = Layout::find()?;
    let release = layout.myservice_release()?;
    let (_temp, agent) = procs::start_bootstrapped(&layout, "service", &release, &[]).await?;
    let measured = async {
        let bare = BareServer::start_as(&layout.bench, Baseline::MyService).await?;
        progress(format_args!(
            "bare myservice {} and the agent in turns, {} connections on GET {PATH}, {:?} each",
            bare.addr, options.connections, options.phase
        ));
        let turns = run::in_turns(&bare, &agent, options.connections, options.phase, PATH).await;
        bare.stop().await?;
        let turns = turns?;
        run::log_phase("bare", &turns.bare);
        run::log_phase("agent", &turns.agent);
        let count = load::get(agent.http, "/count").await?;
        let Ok(count) = count.trim().parse::<u64>() else {
            bail!("GET /count answered {count:?}, not a number");
        };
        Ok((turns, count))
    }
    .await;
    let ((turns, count), agent_exit) = agent.finish(measured).await?;
    Ok(report(&options, &turns, count, agent_exit))
}

fn report(options: &Options, turns: &Turns, count: u64, agent_exit: String) -> Outcome {
    let Turns {
        bare,
        agent,
        bare_cpu,
        agent_cpu,
    } = turns;
    let per_request = |cpu: &Duration, tally: &load::Tally| {
        (tally.ok > 0).then(|| cpu.as_secs_f64() * 1e6 / tally.ok as f64)
    };
    let bare_us = per_request(bare_cpu, bare);
    let agent_us = per_request(agent_cpu, agent);
    let cpu_over_bare = bare_us.zip(agent_us).map(|(b, a)| a / b);
    let throughput = agent.rps() / bare.rps();
    // Every request sent to the agent is `GET /`, which counts.
    let counts_exact = count == agent.ok;
    let errors: Vec<String> = [("bare", bare), ("agent", agent)]
        .iter()
        .flat_map(|(server, tally)| tally.errors.iter().map(move |e| format!("{server}: {e}")))
        .take(ERRORS_SHOWN)
        .collect();
    let json = json!({
        "mode": "service",
        "release": "myservice 0.1.0",
        "path": PATH,
        "connections": options.connections,
        "phase_seconds": options.phase.as_secs_f64(),
        "bare_rps": round(bare.rps(), 0),
        "agent_rps": round(agent.rps(), 0),
        "agent_over_bare": round(throughput, 3),
        "bare_cpu_us_per_request": bare_us.map(|v| round(v, 2)),
        "agent_cpu_us_per_request": agent_us.map(|v| round(v, 2)),
        "cpu_over_bare": cpu_over_bare.map(|v| round(v, 3)),
        "bare": latency(&bare.latencies_us),
        "agent": latency(&agent.latencies_us),
        "served": agent.ok,
        "failed": agent.failed,
        "refused": agent.refused,
        "bare_failed": bare.failed,
        "bare_refused": bare.refused,
        "count_reported": count,
        "counts_exact": counts_exact,
        "agent_exit": agent_exit,
        "errors": errors,
        "targets": {
            "zero_failed": agent.failed == 0,
            "zero_refused": agent.refused == 0,
            "counts_exact": counts_exact,
            "cpu": cpu_over_bare.is_some_and(|r| r <= CPU_TARGET),
            "throughput": throughput >= THROUGHPUT_TARGET,
        },
        "target_values": { "cpu_over_bare_max": CPU_TARGET, "agent_over_bare_min": THROUGHPUT_TARGET },
    });
    Outcome {
        json: json.to_string(),
        passed: agent.failed == 0 && agent.refused == 0 && counts_exact,
    }
}
