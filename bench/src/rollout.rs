//! `--rollout N`: a fleet rollout as an operator runs it. N agents on
//! 127.0.0.1 (each a supervisor and a worker, on the embedded 0.1.0), a
//! light load spread over them, and the real `ctl rollout` of 0.2.0 with
//! `--soak 1s --max-parallel 10`: stage everywhere, a canary, then waves.
//! The figures are ctl's wall time and its phases, and the load's failed
//! and refused requests (must be 0); the target is the whole rollout in
//! 10 s for 50 agents. `--rollout-steps STEPS` gives ctl `--steps`;
//! `--rollout-down K` lists K more agents in the fleet that are not
//! running, with `--max-unavailable K`: they are skipped (ctl exits 6)
//! and every other agent converges.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures_util::future::try_join_all;
use serde_json::{json, Value};

use crate::load::Load;
use crate::procs::{self, AgentProcess, Layout};
use crate::report::{round, Outcome};
use crate::run::progress;

/// The target wall time of the rollout (stage, canary and waves).
const TARGET: Duration = Duration::from_secs(10);
/// Agents upgraded at once after the canary.
const MAX_PARALLEL: &str = "10";
/// Every agent's soak.
const SOAK: &str = "1s";
/// The light load: this many agents get one keep-alive connection each.
const LOADED_AGENTS: usize = 10;

pub struct Options {
    pub agents: usize,
    /// ctl's `--steps`.
    pub steps: Option<String>,
    /// Agents in the fleet file that do not run.
    pub down: usize,
}

pub async fn rollout(options: Options) -> anyhow::Result<Outcome> {
    let layout = Layout::find()?;
    let temp = tempfile::Builder::new()
        .prefix("nine9s-rollout-")
        .tempdir()
        .context("cannot create a temporary directory")?;
    progress(format_args!("starting {} agents", options.agents));
    let started = Instant::now();
    let agents = try_join_all((0..options.agents).map(|i| {
        let dir = temp.path().join(format!("agent-{i}"));
        let agent = layout.agent.clone();
        async move {
            std::fs::create_dir_all(&dir)?;
            AgentProcess::start(&agent, &dir, procs::READY_TIMEOUT).await
        }
    }))
    .await?;
    progress(format_args!(
        "{} agents ready in {:.1} s",
        agents.len(),
        started.elapsed().as_secs_f64()
    ));
    let fleet = temp.path().join("fleet.toml");
    let mut toml = String::new();
    for (i, agent) in agents.iter().enumerate() {
        toml.push_str(&format!(
            "[[agent]]\nname = \"agent-{i}\"\naddress = \"{}\"\n",
            agent.local(),
        ));
        // The agents that are down sit among the others, spread evenly.
        if options.down > 0 && i % (agents.len() / options.down).max(1) == 0 {
            let gone = toml.matches("name = \"down-").count();
            if gone < options.down {
                toml.push_str(&format!(
                    "[[agent]]\nname = \"down-{gone}\"\naddress = \"unix:{}\"\n",
                    temp.path()
                        .join(format!("down-{gone}/control.sock"))
                        .display()
                ));
            }
        }
    }
    std::fs::write(&fleet, toml)?;

    let loads: Vec<Load> = agents
        .iter()
        .step_by((agents.len() / LOADED_AGENTS).max(1))
        .map(|agent| Load::start(agent.http, 1))
        .collect();
    let (release_dir, library) = &layout.releases[0];
    let mut extra: Vec<String> = Vec::new();
    if let Some(steps) = &options.steps {
        extra.extend(["--steps".into(), steps.clone()]);
    }
    if options.down > 0 {
        extra.extend(["--max-unavailable".into(), options.down.to_string()]);
    }
    progress(format_args!(
        "ctl rollout --to 0.2.0 --soak {SOAK} --max-parallel {MAX_PARALLEL} {}",
        extra.join(" ")
    ));
    let wall = Instant::now();
    let ctl = tokio::process::Command::new(&layout.ctl)
        .args(["--output", "json", "rollout", "--to", "0.2.0"])
        .arg("--release-dir")
        .arg(release_dir)
        .arg("--library")
        .arg(library)
        .arg("--fleet")
        .arg(&fleet)
        .args(["--soak", SOAK, "--max-parallel", MAX_PARALLEL])
        .args(&extra)
        .env_remove("NINE9S_AGENT")
        .stderr(std::process::Stdio::inherit())
        .output()
        .await
        .context("cannot run ctl rollout")?;
    let wall = wall.elapsed();
    let mut ok = 0;
    let mut unsuccessful = 0;
    for load in loads {
        let tally = load.stop().await;
        ok += tally.ok;
        unsuccessful += tally.failed + tally.refused;
    }
    let report: Value = serde_json::from_slice(&ctl.stdout).with_context(|| {
        format!(
            "ctl rollout printed no JSON (exit {:?}): {}",
            ctl.status.code(),
            String::from_utf8_lossy(&ctl.stdout)
        )
    })?;
    let on_target = report["agents"]
        .as_array()
        .map_or(0, |a| a.iter().filter(|a| a["after"] == "0.2.0").count());
    let skipped = report["agents"].as_array().map_or(0, |a| {
        a.iter().filter(|a| a["outcome"] == "skipped").count()
    });
    // With agents down, ctl says it skipped them: exit 6.
    let expected = if options.down > 0 { 6 } else { 0 };
    if ctl.status.code() != Some(expected) {
        bail!(
            "ctl rollout exited {:?}: {}",
            ctl.status.code(),
            report["halted_by"]
        );
    }
    let converged =
        report["outcome"] == "converged" && on_target == agents.len() && skipped == options.down;
    let json = json!({
        "mode": "rollout",
        "agents": agents.len(),
        "soak": SOAK,
        "max_parallel": MAX_PARALLEL.parse::<u32>().unwrap_or(0),
        "steps": options.steps,
        "down": options.down,
        "skipped": skipped,
        "wall_s": round(wall.as_secs_f64(), 2),
        "target_wall_s": TARGET.as_secs(),
        "within_target": wall <= TARGET,
        "phases_ms": report["phases"],
        "outcome": report["outcome"],
        "on_target": on_target,
        "load": { "ok": ok, "failed_or_refused": unsuccessful },
    });
    progress(format_args!(
        "rollout over {} agents: {:.2} s wall ({}), {ok} requests served, {unsuccessful} failed or refused",
        agents.len(),
        wall.as_secs_f64(),
        report["outcome"]
    ));
    Ok(Outcome {
        json: json.to_string(),
        passed: converged && unsuccessful == 0,
    })
}
