//! `nine9s-bench`: runs the real agent and `ctl` built next to it, puts
//! HTTP load on the agent while it upgrades and downgrades in a loop, and
//! prints the figures as one JSON line on stdout (progress goes to stderr).
//! The agent runs as a supervisor (the process the bench starts, holding
//! the sockets) and a worker child that serves; everything measured of the
//! agent's process (memory, CPU time, mapped libraries) is the worker's.
//!
//! This file owns the command line, the choice between the bench, the
//! crash loop (`--crash-loop N`: kill -9 of the whole agent), the worker
//! crashes (`--worker-crashes N`: a worker segfaults under load and the
//! supervisor replaces it), the self-upgrades (`--self-upgrades N`: `ctl
//! agent restart` under load; with `--bad-binary`, to a binary that cannot
//! start), the stalled-upload measure
//! (`--stalled-uploads N`), the fleet rollout (`--rollout N`: `ctl rollout`
//! over N agents), the async release's figures (`--service`: CPU per
//! request and throughput against the same router bare; `--sleepers N`:
//! N requests sleeping at once; `--stream-gib X`: one large response
//! against bare) and the hidden `--bare-server` mode, and the
//! exit codes: 0 when the run completed, 1 when a correctness target
//! failed (in the crash loop: an iteration ended inconsistent; with worker
//! crashes: a connection refused or a crash not recovered from; with
//! self-upgrades: a request failed or refused, counts not exact, or a
//! restart not done — or, to a bad binary, not reported failed with the
//! same worker serving; with a rollout: it did not converge, or a request
//! failed or was refused; with `--service`: a request failed or refused,
//! or `/count` not exact; with `--sleepers`: a request not answered), 2 on
//! bad flags or when the run could not be set up or finished.
// serde_json::json! of the report nests deeper than the default allows.
#![recursion_limit = "256"]
#![forbid(unsafe_code)]

mod bare;
mod control;
mod crashloop;
mod load;
mod procs;
mod report;
mod rollout;
mod run;
mod selfupgrade;
mod service;
mod sleepers;
mod stream;
mod uploads;
mod workercrash;

use std::process::ExitCode;
use std::time::Duration;

const USAGE: &str = "usage: nine9s-bench [--short] [--connections N] [--seconds S] [--cycles N]
       nine9s-bench --crash-loop N [--seed S]
       nine9s-bench --worker-crashes N [--connections C]
       nine9s-bench --self-upgrades N [--connections C] [--bad-binary]
       nine9s-bench --stalled-uploads N [--upload-mib M]
       nine9s-bench --rollout N
       nine9s-bench --service [--connections N] [--seconds S]
       nine9s-bench --sleepers [N]
       nine9s-bench --stream-gib [X]

Build first: cargo build --release --workspace
  --short          CI smoke run: 16 connections, 3 s phases, 50 cycles
  --connections N  keep-alive connections of the load generator (default 32)
  --seconds S      length of the bare and steady phases (default 10)
  --cycles N       0.2.0 -> 0.3.0 -> 0.2.0 cycles under load (default 1000)
  --crash-loop N   instead of the bench: N random transitions, each cut short
                   by a kill -9 at a random moment, the node checked after
                   each restart
  --seed S         the crash loop's random choices, to replay a run
  --worker-crashes N
                   instead of the bench: the segfaulting fixture 0.2.8
                   permanent, C (default 16) connections loading /count,
                   N times GET /crash; recovery time until a new worker
                   serves, requests lost, connections refused (must be 0;
                   needs tests/plugins/segfault built)
  --self-upgrades N
                   instead of the bench: 0.2.0 permanent, C (default 32)
                   connections loading /, N self-upgrades (RestartAgent, as
                   `ctl agent restart`; 100 is a good run) and one
                   `ctl agent restart --wait`; restart times, the worst
                   wait of a connection in each (p50/p99/max), failed and
                   refused (must be 0), /count exact
  --bad-binary     with --self-upgrades: the agent's binary replaced by one
                   that cannot start; every restart must be reported failed
                   with the same worker serving, 0 failed, 0 refused; then
                   the good binary back and one `ctl agent restart --wait`
  --stalled-uploads N
                   instead of the bench: N uploads of --upload-mib MiB
                   (default 100) that stall before their last MiB; prints
                   the agent's resident memory before and with all stalled
  --rollout N      instead of the bench: N agents (50 is the target's), one
                   keep-alive connection on every fifth, and `ctl rollout`
                   of 0.2.0 with --soak 1s --max-parallel 10; wall time
                   (target: 10 s for 50), phases, failed and refused
                   requests (must be 0)
  --rollout-steps STEPS
                   with --rollout: ctl rollout --steps STEPS
  --rollout-down K with --rollout: K more agents in the fleet that are not
                   running, skipped under --max-unavailable K
  --service        instead of the bench: the README's async release
                   myservice 0.1.0 through the agent and the same router
                   served bare by hyper (a child), N (default 32)
                   connections loading GET / on each in turns, S (default
                   10) seconds each; CPU per request of the serving process
                   (target: at most 1.15x bare), throughput (target: at
                   least 0.90x bare), 0 failed, 0 refused, /count exact
  --sleepers [N]   instead of the bench: N (default 10000) connections to
                   the agent serving myservice 0.1.0, all opened first,
                   then GET /sleep/1000 on each at once; all answered (must
                   be), wall time to the last answer (target: 1.5 s), the
                   worker's memory before and after (raises the open-file
                   limit; below 2N + 4096 files, the agent runs with
                   --request-timeout 0: one descriptor per connection)
  --stream-gib [X] instead of the bench: X GiB (default 1) in one response
                   (GET /bytes/N of the fixture tests/plugins/bytes)
                   through the agent and from the same router bare, three
                   times each in turns; bytes per second of each (target:
                   the agent at least 0.8x bare) and CPU seconds per GiB";

/// `--sleepers` without a number.
const DEFAULT_SLEEPERS: usize = 10_000;
/// `--stream-gib` without a number.
const DEFAULT_STREAM_GIB: f64 = 1.0;

/// What one run measures.
#[derive(Debug, Clone)]
pub struct Options {
    pub short: bool,
    pub connections: usize,
    pub phase: Duration,
    pub cycles: u32,
}

enum Mode {
    Bench(Options),
    CrashLoop(crashloop::Options),
    WorkerCrashes(workercrash::Options),
    SelfUpgrades(selfupgrade::Options),
    StalledUploads(uploads::Options),
    Rollout(rollout::Options),
    Service(service::Options),
    Sleepers(sleepers::Options),
    Stream(stream::Options),
    /// A baseline server, run as a child of the bench so that the bare
    /// server and the agent both sit in a process of their own.
    BareServer(bare::Baseline),
    Help,
}

fn main() -> ExitCode {
    let mode = match parse(std::env::args().skip(1)) {
        Ok(mode) => mode,
        Err(message) => {
            eprintln!("nine9s-bench: {message}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("nine9s-bench: cannot start the tokio runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match mode {
        Mode::Help => {
            println!("{USAGE}");
            ExitCode::SUCCESS
        }
        Mode::BareServer(baseline) => match runtime.block_on(bare::serve(baseline)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("nine9s-bench --bare-server: {e:#}");
                ExitCode::from(2)
            }
        },
        Mode::CrashLoop(options) => {
            let outcome = runtime.block_on(interruptible(crashloop::crash_loop(options)));
            drop(runtime);
            match outcome {
                Ok(outcome) => {
                    println!("{}", outcome.json);
                    if outcome.consistent {
                        ExitCode::SUCCESS
                    } else {
                        eprintln!("nine9s-bench: some iterations ended inconsistent");
                        ExitCode::from(1)
                    }
                }
                Err(e) => {
                    eprintln!("nine9s-bench --crash-loop: error: {e:#}");
                    ExitCode::from(2)
                }
            }
        }
        Mode::WorkerCrashes(options) => {
            let outcome = runtime.block_on(interruptible(workercrash::worker_crashes(options)));
            drop(runtime);
            finish("--worker-crashes", outcome)
        }
        Mode::SelfUpgrades(options) => {
            let outcome = runtime.block_on(interruptible(selfupgrade::self_upgrades(options)));
            drop(runtime);
            finish("--self-upgrades", outcome)
        }
        Mode::Rollout(options) => {
            let outcome = runtime.block_on(interruptible(rollout::rollout(options)));
            drop(runtime);
            finish("--rollout", outcome)
        }
        Mode::Service(options) => {
            let outcome = runtime.block_on(interruptible(service::service(options)));
            drop(runtime);
            finish("--service", outcome)
        }
        Mode::Sleepers(options) => {
            let outcome = runtime.block_on(interruptible(sleepers::sleepers(options)));
            drop(runtime);
            finish("--sleepers", outcome)
        }
        Mode::Stream(options) => {
            let outcome = runtime.block_on(interruptible(stream::stream(options)));
            drop(runtime);
            figures("--stream-gib", outcome)
        }
        Mode::StalledUploads(options) => {
            let outcome = runtime.block_on(interruptible(uploads::stalled_uploads(options)));
            drop(runtime);
            figures("--stalled-uploads", outcome)
        }
        Mode::Bench(options) => {
            let outcome = runtime.block_on(interruptible(run::bench(options)));
            // Dropping the runtime before exiting lets the child processes'
            // kill-on-drop guards run on every path.
            drop(runtime);
            match outcome {
                Ok(report) => {
                    println!("{}", report.json);
                    if report.correct {
                        ExitCode::SUCCESS
                    } else {
                        eprintln!("nine9s-bench: correctness targets failed");
                        ExitCode::from(1)
                    }
                }
                Err(e) => {
                    eprintln!("nine9s-bench: error: {e:#}");
                    ExitCode::from(2)
                }
            }
        }
    }
}

/// Prints a mode's JSON line; the exit code of its outcome.
fn finish(mode: &str, outcome: anyhow::Result<report::Outcome>) -> ExitCode {
    match outcome {
        Ok(outcome) => {
            println!("{}", outcome.json);
            if outcome.passed {
                ExitCode::SUCCESS
            } else {
                eprintln!("nine9s-bench {mode}: correctness targets failed");
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("nine9s-bench {mode}: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Prints the JSON line of a mode that measures with no correctness
/// target of its own.
fn figures(mode: &str, outcome: anyhow::Result<String>) -> ExitCode {
    match outcome {
        Ok(json) => {
            println!("{json}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("nine9s-bench {mode}: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Runs `work` unless SIGINT or SIGTERM comes first; then `work` is
/// dropped, which kills the processes it started.
async fn interruptible<T>(
    work: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        result = work => result,
        _ = term.recv() => Err(anyhow::anyhow!("terminated")),
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    }
}

fn parse(args: impl Iterator<Item = String>) -> Result<Mode, String> {
    let mut short = false;
    let mut connections = None;
    let mut seconds = None;
    let mut cycles = None;
    let mut crash_loop = None;
    let mut worker_crashes = None;
    let mut self_upgrades = None;
    let mut seed = None;
    let mut stalled = None;
    let mut upload_mib = None;
    let mut rollout = None;
    let mut rollout_steps = None;
    let mut rollout_down = None;
    let mut bad_binary = false;
    let mut service = false;
    let mut sleepers = None;
    let mut stream_gib = None;
    // Every flag given, for the modes that take only a few.
    let mut given = Vec::new();
    let mut args = args.peekable();
    if args.peek().is_some_and(|a| a == "--bare-server") {
        args.next();
        let baseline = match args.next() {
            None => bare::Baseline::Hello,
            Some(name) => bare::Baseline::parse(&name)
                .ok_or_else(|| format!("--bare-server serves myservice or bytes, not {name:?}"))?,
        };
        return match args.next() {
            None => Ok(Mode::BareServer(baseline)),
            Some(extra) => Err(format!(
                "--bare-server takes one argument at most, got {extra:?}"
            )),
        };
    }
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => (flag.to_owned(), Some(value.into())),
            _ => (arg, None),
        };
        given.push(flag.clone());
        // The value of a flag whose value may be left out: inline, or the
        // next argument unless that is a flag.
        let optional = |args: &mut std::iter::Peekable<_>| {
            inline
                .clone()
                .or_else(|| args.next_if(|next: &String| !next.starts_with('-')))
        };
        if flag == "--sleepers" {
            sleepers = Some(match optional(&mut args) {
                Some(text) => number::<usize>(&flag, &text)?,
                None => DEFAULT_SLEEPERS,
            });
            continue;
        }
        if flag == "--stream-gib" {
            stream_gib = Some(match optional(&mut args) {
                Some(text) => number::<f64>(&flag, &text)?,
                None => DEFAULT_STREAM_GIB,
            });
            continue;
        }
        let mut value = || {
            inline
                .clone()
                .or_else(|| args.next())
                .ok_or_else(|| format!("{flag} needs a value"))
        };
        match flag.as_str() {
            "--short" => short = true,
            "--connections" => connections = Some(number::<usize>(&flag, &value()?)?),
            "--seconds" => seconds = Some(number::<f64>(&flag, &value()?)?),
            "--cycles" => cycles = Some(number::<u32>(&flag, &value()?)?),
            "--crash-loop" => crash_loop = Some(number::<u32>(&flag, &value()?)?),
            "--seed" => seed = Some(number::<u64>(&flag, &value()?)?),
            "--worker-crashes" => worker_crashes = Some(number::<u32>(&flag, &value()?)?),
            "--self-upgrades" => self_upgrades = Some(number::<u32>(&flag, &value()?)?),
            "--stalled-uploads" => stalled = Some(number::<usize>(&flag, &value()?)?),
            "--upload-mib" => upload_mib = Some(number::<usize>(&flag, &value()?)?),
            "--rollout" => rollout = Some(number::<usize>(&flag, &value()?)?),
            "--rollout-steps" => rollout_steps = Some(value()?),
            "--rollout-down" => rollout_down = Some(number::<usize>(&flag, &value()?)?),
            "--bad-binary" => bad_binary = true,
            "--service" => service = true,
            "-h" | "--help" => return Ok(Mode::Help),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    let only = |mode: &str, allowed: &[&str]| {
        if given
            .iter()
            .all(|f| f == mode || allowed.contains(&f.as_str()))
        {
            Ok(())
        } else if allowed.is_empty() {
            Err(format!("{mode} takes no other flag"))
        } else {
            Err(format!(
                "{mode} takes no other flag than {}",
                allowed.join(", ")
            ))
        }
    };
    if service {
        only("--service", &["--connections", "--seconds"])?;
        let connections = connections.unwrap_or(32);
        let seconds = seconds.unwrap_or(10.0);
        if connections == 0 || !(seconds > 0.0 && seconds.is_finite()) {
            return Err("--connections and --seconds must be above 0".into());
        }
        return Ok(Mode::Service(service::Options {
            connections,
            phase: Duration::from_secs_f64(seconds),
        }));
    }
    if let Some(sleepers) = sleepers {
        only("--sleepers", &[])?;
        if !(1..=100_000).contains(&sleepers) {
            return Err("--sleepers takes 1 to 100000".into());
        }
        return Ok(Mode::Sleepers(sleepers::Options { sleepers }));
    }
    if let Some(gib) = stream_gib {
        only("--stream-gib", &[])?;
        if !(gib > 0.0 && gib <= 64.0) {
            return Err("--stream-gib takes above 0 to 64".into());
        }
        return Ok(Mode::Stream(stream::Options { gib }));
    }
    if bad_binary && self_upgrades.is_none() {
        return Err("--bad-binary goes with --self-upgrades".into());
    }
    if rollout.is_none() && (rollout_steps.is_some() || rollout_down.is_some()) {
        return Err("--rollout-steps and --rollout-down go with --rollout".into());
    }
    if let Some(agents) = rollout {
        let others = [
            crash_loop.is_some(),
            worker_crashes.is_some(),
            self_upgrades.is_some(),
        ];
        if short
            || connections.is_some()
            || seconds.is_some()
            || cycles.is_some()
            || seed.is_some()
            || stalled.is_some()
            || upload_mib.is_some()
            || others.contains(&true)
        {
            return Err("--rollout takes no other flag".into());
        }
        if !(1..=500).contains(&agents) {
            return Err("--rollout takes 1 to 500 agents".into());
        }
        let down = rollout_down.unwrap_or(0);
        if down > agents {
            return Err("--rollout-down takes at most as many agents as --rollout".into());
        }
        return Ok(Mode::Rollout(rollout::Options {
            agents,
            steps: rollout_steps,
            down,
        }));
    }
    if let Some(uploads) = stalled {
        if short
            || connections.is_some()
            || seconds.is_some()
            || cycles.is_some()
            || crash_loop.is_some()
            || seed.is_some()
            || worker_crashes.is_some()
            || self_upgrades.is_some()
        {
            return Err("--stalled-uploads takes no other flag than --upload-mib".into());
        }
        let mib = upload_mib.unwrap_or(100);
        if !(1..=64).contains(&uploads) || !(2..=4096).contains(&mib) {
            return Err("--stalled-uploads takes 1 to 64, --upload-mib 2 to 4096".into());
        }
        return Ok(Mode::StalledUploads(uploads::Options { uploads, mib }));
    }
    if upload_mib.is_some() {
        return Err("--upload-mib goes with --stalled-uploads".into());
    }
    if worker_crashes.is_some() || self_upgrades.is_some() {
        if short || seconds.is_some() || cycles.is_some() || crash_loop.is_some() || seed.is_some()
        {
            return Err(
                "--worker-crashes and --self-upgrades take no other flag than --connections".into(),
            );
        }
        if connections == Some(0) {
            return Err("--connections must be above 0".into());
        }
        return match (worker_crashes, self_upgrades) {
            (Some(0), _) | (_, Some(0)) => {
                Err("--worker-crashes and --self-upgrades must be above 0".into())
            }
            (Some(crashes), None) => Ok(Mode::WorkerCrashes(workercrash::Options {
                crashes,
                connections: connections.unwrap_or(16),
            })),
            (None, Some(restarts)) => Ok(Mode::SelfUpgrades(selfupgrade::Options {
                restarts,
                connections: connections.unwrap_or(32),
                bad_binary,
            })),
            _ => Err("--worker-crashes and --self-upgrades are two runs: one at a time".into()),
        };
    }
    if let Some(iterations) = crash_loop {
        if short || connections.is_some() || seconds.is_some() || cycles.is_some() {
            return Err("--crash-loop takes no bench flags, only --seed".into());
        }
        if iterations == 0 {
            return Err("--crash-loop must be above 0".into());
        }
        return Ok(Mode::CrashLoop(crashloop::Options { iterations, seed }));
    }
    if seed.is_some() {
        return Err("--seed goes with --crash-loop".into());
    }
    let connections = connections.unwrap_or(if short { 16 } else { 32 });
    let seconds = seconds.unwrap_or(if short { 3.0 } else { 10.0 });
    let cycles = cycles.unwrap_or(if short { 50 } else { 1000 });
    if connections == 0 || !(seconds > 0.0 && seconds.is_finite()) {
        return Err("--connections and --seconds must be above 0".into());
    }
    Ok(Mode::Bench(Options {
        short,
        connections,
        phase: Duration::from_secs_f64(seconds),
        cycles,
    }))
}

fn number<T: std::str::FromStr>(flag: &str, text: &str) -> Result<T, String> {
    text.parse()
        .map_err(|_| format!("{flag}: {text:?} is not a valid number"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(args: &[&str]) -> Result<Mode, String> {
        parse(args.iter().map(|a| a.to_string()))
    }

    #[test]
    fn the_async_modes_take_their_number_or_the_default() {
        for (args, expected) in [
            (&["--sleepers"][..], 10_000),
            (&["--sleepers", "500"], 500),
            (&["--sleepers=7"], 7),
        ] {
            match parsed(args) {
                Ok(Mode::Sleepers(options)) => assert_eq!(options.sleepers, expected),
                _ => panic!("{args:?} is not --sleepers {expected}"),
            }
        }
        assert!(matches!(parsed(&["--stream-gib"]), Ok(Mode::Stream(o)) if o.gib == 1.0));
        assert!(matches!(parsed(&["--stream-gib", "0.5"]), Ok(Mode::Stream(o)) if o.gib == 0.5));
        assert!(matches!(
            parsed(&["--service", "--seconds", "3"]),
            Ok(Mode::Service(o)) if o.connections == 32 && o.phase == Duration::from_secs(3)
        ));
        assert!(matches!(
            parsed(&["--bare-server", "bytes"]),
            Ok(Mode::BareServer(bare::Baseline::Bytes))
        ));
        assert!(matches!(
            parsed(&["--bare-server"]),
            Ok(Mode::BareServer(bare::Baseline::Hello))
        ));
    }

    #[test]
    fn the_async_modes_refuse_other_flags_and_each_other() {
        for args in [
            &["--sleepers", "--seconds", "3"][..],
            &["--sleepers", "0"],
            &["--sleepers", "many"],
            &["--stream-gib", "0"],
            &["--stream-gib", "--connections", "3"],
            &["--service", "--cycles", "3"],
            &["--service", "--sleepers"],
            &["--rollout", "5", "--service"],
            &["--bare-server", "hello"],
            &["--bare-server", "bytes", "extra"],
        ] {
            assert!(parsed(args).is_err(), "{args:?} was taken");
        }
    }
}
