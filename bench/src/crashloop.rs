//! The crash-loop mode (`--crash-loop N`): N times, start the real agent
//! on one data dir, fire a random transition at it and SIGKILL it a random
//! number of microseconds later, then restart it and check that the node
//! is consistent. `tests/tests/crash_safety.rs` crashes at named points;
//! this lands anywhere, timed by the clock. This file owns the setup, the
//! loop, the checks and the mode's JSON line.
//!
//! The node only ever moves between 0.2.0 and 0.3.0, which both carry the
//! count of `GET /` exactly, and the loop sends no `/`: `/count` must
//! answer the setup's count after every crash.
//!
//! The kill goes to the agent's supervisor (the pid the bench started);
//! its worker dies with it, and the restart waits until that worker is
//! gone, so that it does not race the dying worker for the store's lock.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context};
use nine9s_proto::stage_chunk::Part;
use nine9s_proto::{
    HistoryRequest, ListReleasesRequest, MakePermanentRequest, Permanence, RollbackRequest,
    StageChunk, StageHeader, StateSource, StatusReply, StatusRequest, Transition,
    TransitionRequest, TransitionResult,
};
use serde_json::json;
use tonic::{Code, Status};

use crate::control::{Control, Direction};
use crate::load;
use crate::procs::{self, AgentProcess, Client, Layout};
use crate::run::progress;

/// `GET /` requests the setup sends; `/count` answers this ever after.
const COUNT: u64 = 25;
/// The kill lands 0..=this many µs after the transition is fired. A
/// transition takes ~0.5-3 ms, so kills land before, during and after.
const MAX_KILL_DELAY_US: u64 = 3000;
/// Check (a): a restarted agent is ready within this.
const READY_WITHIN: Duration = Duration::from_secs(10);
/// Any one RPC of the loop; the reply to a killed agent's is never waited
/// for longer either.
const RPC_TIMEOUT: Duration = Duration::from_secs(10);
/// Soak periods drawn for `Permanence::Soak`, in ms: longer than any kill
/// delay, so a soak never ends before its kill.
const SOAK_MS: (u64, u64) = (50, 300);
const REASONS_KEPT: usize = 10;
/// Bytes per Stage message, as ctl sends them.
const CHUNK: usize = 1024 * 1024;
const LOWER: &str = "0.2.0";
const HIGHER: &str = "0.3.0";

#[derive(Debug, Clone)]
pub struct Options {
    pub iterations: u32,
    /// Replays a run's random choices (the timings cannot be replayed).
    pub seed: Option<u64>,
}

pub struct Outcome {
    pub json: String,
    /// No iteration ended inconsistent.
    pub consistent: bool,
}

pub async fn crash_loop(options: Options) -> anyhow::Result<Outcome> {
    let started = Instant::now();
    let layout = Layout::find()?;
    let seed = options.seed.unwrap_or_else(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    progress(format_args!(
        "crash loop: {} iterations, seed {seed} (replay the choices with --seed {seed})",
        options.iterations
    ));
    let temp = tempfile::Builder::new()
        .prefix("nine9s-crash-loop-")
        .tempdir()
        .context("cannot create a temporary directory")?;
    let dir = temp.path();
    setup(&layout, dir).await.context("setup")?;
    copy_dir(&dir.join("data"), &dir.join("golden")).context("saving the set-up data dir")?;
    let uploads = [Upload::read(&layout, 0)?, Upload::read(&layout, 1)?];

    let mut rng = Rng::new(seed);
    let mut tally = Tally::default();
    let every = (options.iterations / 20).max(1);
    for i in 1..=options.iterations {
        let iteration = iteration(&layout, dir, &uploads, &mut rng, i).await?;
        tally.add(&iteration);
        if !iteration.problems.is_empty() {
            let reason = format!(
                "iteration {i}: {}: {}",
                iteration.what,
                iteration.problems.join("; ")
            );
            progress(format_args!(
                "INCONSISTENT {reason}\n{}",
                procs::log_tail(&dir.join("agent.log"))
            ));
            tally.inconsistent += 1;
            if tally.reasons.len() < REASONS_KEPT {
                tally.reasons.push(reason);
            }
            // Each failure stands on its own: a node left wrong would fail
            // every later iteration for the same cause.
            std::fs::remove_dir_all(dir.join("data"))?;
            copy_dir(&dir.join("golden"), &dir.join("data"))
                .context("restoring the set-up data dir")?;
        }
        if i % every == 0 {
            progress(format_args!(
                "{i}/{} done, {} inconsistent",
                options.iterations, tally.inconsistent
            ));
        }
    }
    let inconsistent = tally.inconsistent;
    let report = json!({
        "mode": "crash-loop",
        "iterations": options.iterations,
        "inconsistent": inconsistent,
        "seed": seed,
        "killed_before_reply": tally.before_reply,
        "killed_after_reply": tally.after_reply,
        "transitions_by_kind": tally.by_kind,
        "refused": tally.refused,
        "count": COUNT,
        "max_kill_delay_us": MAX_KILL_DELAY_US,
        "reasons": tally.reasons,
        "seconds": (started.elapsed().as_secs_f64() * 10.0).round() / 10.0,
    });
    Ok(Outcome {
        json: report.to_string(),
        consistent: inconsistent == 0,
    })
}

/// Leaves `dir/data` with 0.2.0 permanent and its count at [`COUNT`],
/// 0.3.0 staged, and 0.1.0 gone: a rollback could reach it, and it keeps
/// no count.
async fn setup(layout: &Layout, dir: &Path) -> anyhow::Result<()> {
    let agent = AgentProcess::start(&layout.agent, dir, procs::READY_TIMEOUT).await?;
    let prepared = async {
        for (release, library) in &layout.releases {
            let release = release.to_string_lossy();
            let library = library.to_string_lossy();
            procs::ctl(
                &layout.ctl,
                &agent,
                &["stage", &release, "--library", &library],
            )
            .await?;
        }
        let mut control = Control::connect(&agent).await?;
        control.switch(Direction::Upgrade, LOWER).await?;
        control.remove("0.1.0").await?;
        for _ in 0..COUNT {
            load::get(agent.http, "/").await?;
        }
        anyhow::Ok(())
    }
    .await;
    if prepared.is_err() {
        eprintln!("{}", agent.log_tail());
    }
    let stopped = agent.stop().await;
    prepared?;
    let status = stopped?;
    if !status.success() {
        bail!("the agent's clean stop ended with {status}");
    }
    progress(format_args!(
        "set up: {LOWER} permanent with /count {COUNT}, {HIGHER} staged"
    ));
    Ok(())
}

/// What a release's Stage call sends.
struct Upload {
    version: &'static str,
    manifest_toml: String,
    library: Vec<u8>,
}

impl Upload {
    fn read(layout: &Layout, index: usize) -> anyhow::Result<Upload> {
        let (dir, library) = &layout.releases[index];
        let manifest = dir.join("release.toml");
        Ok(Upload {
            version: [LOWER, HIGHER][index],
            manifest_toml: std::fs::read_to_string(&manifest)
                .with_context(|| format!("reading {}", manifest.display()))?,
            library: std::fs::read(library)
                .with_context(|| format!("reading {}", library.display()))?,
        })
    }

    /// The digest is the agent's own record of the release: restaging
    /// sends back the bytes it has.
    fn chunks(&self, sha256: String) -> Vec<StageChunk> {
        let header = StageChunk {
            part: Some(Part::Header(StageHeader {
                manifest_toml: self.manifest_toml.clone(),
                sha256,
                size: self.library.len() as u64,
                ..Default::default()
            })),
        };
        std::iter::once(header)
            .chain(self.library.chunks(CHUNK).map(|c| StageChunk {
                part: Some(Part::Data(c.to_vec())),
            }))
            .collect()
    }
}

/// The transition an iteration interrupts.
#[derive(Debug, Clone)]
enum Move {
    /// Upgrade or downgrade to the other release.
    Switch {
        to: &'static str,
        permanence: Permanence,
        soak_ms: u64,
    },
    /// With the state migrated; refused while there is nothing to roll
    /// back to.
    Rollback,
    /// Of the other release, installed first (and not interrupted) with
    /// `Permanence::Never`: after a restart no release is current.
    MakePermanent { version: &'static str },
    /// Of a release already staged: a no-op for the agent.
    Restage { version: &'static str },
}

impl Move {
    fn pick(rng: &mut Rng, active: &str) -> Move {
        let other = if active == LOWER { HIGHER } else { LOWER };
        match rng.below(5) {
            // The switches are what the agent is for: twice the weight.
            0 | 1 => {
                let (permanence, soak_ms) = match rng.below(3) {
                    0 => (Permanence::Immediate, 0),
                    1 => (
                        Permanence::Soak,
                        SOAK_MS.0 + rng.below(SOAK_MS.1 - SOAK_MS.0 + 1),
                    ),
                    _ => (Permanence::Never, 0),
                };
                Move::Switch {
                    to: other,
                    permanence,
                    soak_ms,
                }
            }
            2 => Move::Rollback,
            3 => Move::MakePermanent { version: other },
            _ => Move::Restage {
                version: [LOWER, HIGHER][rng.below(2) as usize],
            },
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Move::Switch { to: HIGHER, .. } => "upgrade",
            Move::Switch { .. } => "downgrade",
            Move::Rollback => "rollback",
            Move::MakePermanent { .. } => "make_permanent",
            Move::Restage { .. } => "restage",
        }
    }

    fn describe(&self) -> String {
        match self {
            Move::Switch {
                to,
                permanence,
                soak_ms,
            } => {
                let permanence = match permanence {
                    Permanence::Immediate => "immediate".to_owned(),
                    Permanence::Soak | Permanence::Unspecified => format!("soak {soak_ms} ms"),
                    Permanence::Never => "never".to_owned(),
                };
                format!("{} to {to} ({permanence})", self.kind())
            }
            Move::Rollback => "rollback".into(),
            Move::MakePermanent { version } => format!("make-permanent {version}"),
            Move::Restage { version } => format!("restage {version}"),
        }
    }

    /// A switch to `to`, for Upgrade or Downgrade alike.
    fn switch_request(to: &str, permanence: Permanence, soak_ms: u64) -> TransitionRequest {
        TransitionRequest {
            version: to.to_owned(),
            permanence: permanence as i32,
            soak_ms,
            ..Default::default()
        }
    }

    /// What a restart must come back on after the agent answered OK: an
    /// acknowledged transition is committed.
    fn permanent_after_ack(&self, previous: &str, transition: Option<&Transition>) -> String {
        match self {
            Move::Switch {
                to,
                permanence: Permanence::Immediate,
                ..
            } => (*to).to_owned(),
            Move::Rollback => transition.map_or_else(String::new, |t| t.to_version.clone()),
            Move::MakePermanent { version } => (*version).to_owned(),
            Move::Switch { .. } | Move::Restage { .. } => previous.to_owned(),
        }
    }
}

/// Calls `client` with `transition`'s RPC; the transition the agent
/// committed, if the call has one.
async fn call(
    mut client: Client,
    transition: Move,
    stage: Option<Vec<StageChunk>>,
) -> Result<Option<Transition>, Status> {
    Ok(match transition {
        Move::Switch {
            to,
            permanence,
            soak_ms,
        } => {
            let request = Move::switch_request(to, permanence, soak_ms);
            let reply = if to == HIGHER {
                client.upgrade(request).await?
            } else {
                client.downgrade(request).await?
            };
            reply.into_inner().transition
        }
        Move::Rollback => {
            let request = RollbackRequest {
                state: StateSource::Migrate as i32,
                ..Default::default()
            };
            client.rollback(request).await?.into_inner().transition
        }
        Move::MakePermanent { version } => {
            let request = MakePermanentRequest {
                version: version.to_owned(),
                ..Default::default()
            };
            client
                .make_permanent(request)
                .await?
                .into_inner()
                .transition
        }
        Move::Restage { .. } => {
            let chunks = stage.unwrap_or_default();
            client
                .stage(tonic::codegen::tokio_stream::iter(chunks))
                .await?;
            None
        }
    })
}

/// How the fired call ended.
enum Reply {
    /// The agent answered OK.
    Acked(Option<Box<Transition>>),
    /// The agent answered with an error, before the kill.
    Refused(Status),
    /// No answer: the kill came first.
    Lost,
}

/// One iteration, as the loop sums it up.
struct Iteration {
    /// `None` when the transition was not fired.
    kind: Option<&'static str>,
    /// The move, from where, and when the kill landed.
    what: String,
    after_reply: Option<bool>,
    refused: bool,
    problems: Vec<String>,
}

impl Iteration {
    fn broken(what: String, problem: String) -> Iteration {
        Iteration {
            kind: None,
            what,
            after_reply: None,
            refused: false,
            problems: vec![problem],
        }
    }
}

/// Start, fire, kill, restart, check, stop. `Err` only when the bench
/// itself cannot go on.
async fn iteration(
    layout: &Layout,
    dir: &Path,
    uploads: &[Upload; 2],
    rng: &mut Rng,
    i: u32,
) -> anyhow::Result<Iteration> {
    let mut agent = match AgentProcess::start(&layout.agent, dir, READY_WITHIN).await {
        Ok(agent) => agent,
        Err(e) => {
            return Ok(Iteration::broken(
                "start".into(),
                format!("the agent did not come up before the transition: {e:#}"),
            ))
        }
    };
    let prepared = prepare(&agent, uploads, rng).await;
    let (client, transition, previous, stage) = match prepared {
        Ok(prepared) => prepared,
        Err(e) => {
            agent.kill()?;
            agent.wait().await?;
            return Ok(Iteration::broken(
                "prepare".into(),
                format!("before the transition: {e:#}"),
            ));
        }
    };
    let delay = Duration::from_micros(rng.below(MAX_KILL_DELAY_US + 1));
    // The SIGKILL goes to the supervisor; its worker, noted now rather
    // than in the kill's microseconds, dies with it and is waited for.
    agent.note_workers();

    let fired = Instant::now();
    let mut rpc = tokio::spawn({
        let (client, transition) = (client.clone(), transition.clone());
        async move {
            let reply = call(client, transition, stage).await;
            (reply, Instant::now())
        }
    });
    // A plain thread: tokio's timers tick in milliseconds.
    let killer = tokio::task::spawn_blocking(move || {
        std::thread::sleep(delay.saturating_sub(fired.elapsed()));
        let killed_at = Instant::now();
        let killed = agent.kill();
        (agent, killed_at, killed)
    });
    let (agent, killed_at, killed) = killer.await.context("the killer thread")?;
    killed.context("SIGKILL")?;
    agent.wait().await?;
    let (result, replied_at) = match tokio::time::timeout(RPC_TIMEOUT, &mut rpc).await {
        Ok(joined) => joined.context("the RPC task")?,
        Err(_) => {
            rpc.abort();
            (Err(Status::deadline_exceeded("no reply")), killed_at)
        }
    };
    drop(client);
    let after_reply = replied_at <= killed_at;
    let reply = match result {
        Ok(transition) => Reply::Acked(transition.map(Box::new)),
        Err(status) if after_reply => Reply::Refused(status),
        Err(_) => Reply::Lost,
    };
    let what = format!(
        "{} from {previous}, SIGKILL {} us after firing, {} the reply",
        transition.describe(),
        delay.as_micros(),
        if after_reply { "after" } else { "before" }
    );

    let mut problems = Vec::new();
    let expected = match &reply {
        Reply::Acked(t) => {
            if let Some(t) = t.as_ref().filter(|t| t.result() != TransitionResult::Ok) {
                problems.push(format!(
                    "(g) acknowledged with result {:?}: {}",
                    t.result(),
                    t.error
                ));
            }
            Some(transition.permanent_after_ack(&previous, t.as_deref()))
        }
        Reply::Refused(status)
            if matches!(transition, Move::Rollback)
                && status.code() == Code::FailedPrecondition =>
        {
            Some(previous.clone())
        }
        Reply::Refused(status) => {
            problems.push(format!(
                "(g) refused: {:?}: {}",
                status.code(),
                status.message()
            ));
            None
        }
        Reply::Lost => None,
    };

    match AgentProcess::start(&layout.agent, dir, READY_WITHIN).await {
        Err(e) => problems.push(format!("(a) {e:#}")),
        Ok(checker) => {
            problems.extend(check(&checker, &dir.join("data"), expected.as_deref()).await);
            // Both ways out must leave a node the next iteration can start.
            if i % 2 == 1 {
                let mut checker = checker;
                checker.kill()?;
                checker.wait().await?;
            } else {
                match checker.stop().await {
                    Ok(status) if status.success() => {}
                    Ok(status) => problems.push(format!("(stop) SIGTERM: {status}")),
                    Err(e) => problems.push(format!("(stop) SIGTERM: {e:#}")),
                }
            }
        }
    }
    Ok(Iteration {
        kind: Some(transition.kind()),
        what,
        after_reply: Some(after_reply),
        refused: matches!(reply, Reply::Refused(_)),
        problems,
    })
}

/// Connects, reads the active release, picks the move and does what must
/// come before it. Returns the client, the move, the permanent release
/// before it and the Stage upload if the move is one.
async fn prepare(
    agent: &AgentProcess,
    uploads: &[Upload; 2],
    rng: &mut Rng,
) -> anyhow::Result<(Client, Move, String, Option<Vec<StageChunk>>)> {
    let mut client = agent.client().await?;
    let status = status(&mut client).await?;
    if status.active_version != status.permanent_version
        || ![LOWER, HIGHER].contains(&status.active_version.as_str())
    {
        bail!(
            "started on {:?} with {:?} permanent",
            status.active_version,
            status.permanent_version
        );
    }
    let transition = Move::pick(rng, &status.active_version);
    let mut stage = None;
    match &transition {
        Move::MakePermanent { version } => {
            let request = Move::switch_request(version, Permanence::Never, 0);
            let reply = if *version == HIGHER {
                rpc(client.upgrade(request)).await
            } else {
                rpc(client.downgrade(request)).await
            };
            reply.with_context(|| format!("switching to {version}, not permanent"))?;
        }
        Move::Restage { version } => {
            let upload = uploads
                .iter()
                .find(|u| u.version == *version)
                .expect("one upload per version");
            let release = status
                .releases
                .iter()
                .find(|r| r.version == *version)
                .ok_or_else(|| anyhow!("{version} is not listed"))?;
            stage = Some(upload.chunks(release.sha256.clone()));
        }
        Move::Switch { .. } | Move::Rollback => {}
    }
    Ok((client, transition, status.permanent_version, stage))
}

/// The checks after a restart, (b) to (g); what failed, one line each.
/// `expected` is the permanent release an answered transition implies.
async fn check(agent: &AgentProcess, data: &Path, expected: Option<&str>) -> Vec<String> {
    let mut problems = Vec::new();
    let mut client = match agent.client().await {
        Ok(client) => client,
        Err(e) => return vec![format!("gRPC: {e}")],
    };
    let status = match status(&mut client).await {
        Ok(status) => status,
        Err(e) => return vec![format!("(b) {e:#}")],
    };
    let (active, permanent) = (&status.active_version, &status.permanent_version);
    if active != permanent || !status.current_version.is_empty() {
        problems.push(format!(
            "(b) active {active:?}, permanent {permanent:?}, current {:?}",
            status.current_version
        ));
    }
    if let Some(expected) = expected.filter(|e| e != permanent) {
        problems.push(format!(
            "(g) an answered transition left {expected} permanent, but {permanent} is"
        ));
    }

    match rpc(client.history(HistoryRequest::default())).await {
        Err(e) => problems.push(format!("(c) {e:#}")),
        Ok(reply) => {
            let history = reply.transitions;
            if let Some(t) = history
                .iter()
                .find(|t| t.result() == TransitionResult::Running)
            {
                problems.push(format!(
                    "(c) transition {} ({:?}) is still running",
                    t.id,
                    t.kind()
                ));
            }
            match history.iter().max_by_key(|t| t.id) {
                None => problems.push("(c) no history".into()),
                Some(t)
                    if !matches!(
                        t.result(),
                        TransitionResult::Ok | TransitionResult::Failed | TransitionResult::Aborted
                    ) =>
                {
                    problems.push(format!(
                        "(c) the last transition {} ({:?}) is {:?}",
                        t.id,
                        t.kind(),
                        t.result()
                    ))
                }
                Some(_) => {}
            }
        }
    }

    match load::fetch(agent.http, "/count").await {
        Err(e) => problems.push(format!("(d) {e:#}")),
        Ok(count) => {
            let expected_body = COUNT.to_string();
            if count.status != 200
                || count.body != expected_body
                || count.release.as_deref() != Some(permanent.as_str())
            {
                problems.push(format!(
                    "(d) GET /count answered {} {:?} from release {:?}; expected 200 {expected_body:?} from {permanent}",
                    count.status, count.body, count.release
                ));
            }
        }
    }

    match rpc(client.list_releases(ListReleasesRequest {})).await {
        Err(e) => problems.push(format!("(e) {e:#}")),
        Ok(reply) => {
            let releases = reply.releases;
            for version in [LOWER, HIGHER] {
                if !releases.iter().any(|r| r.version == version) {
                    problems.push(format!("(e) {version} is not listed"));
                }
            }
            for release in releases.iter().filter(|r| &r.version != active) {
                let version = &release.version;
                let request = TransitionRequest {
                    version: version.clone(),
                    dry_run: true,
                    ..Default::default()
                };
                let dry_run = if numbers(version) > numbers(active) {
                    rpc(client.upgrade(request)).await
                } else {
                    rpc(client.downgrade(request)).await
                };
                if let Err(e) = dry_run {
                    problems.push(format!(
                        "(e) {version} is listed but its dry run fails: {e:#}"
                    ));
                }
            }
            match std::fs::read_dir(data.join("artifacts")) {
                Err(e) => problems.push(format!("(f) reading the artifacts: {e}")),
                Ok(entries) => {
                    let files = entries.count();
                    if files != releases.len() {
                        problems.push(format!(
                            "(f) {files} files in artifacts/ for {} releases",
                            releases.len()
                        ));
                    }
                }
            }
        }
    }
    problems
}

async fn status(client: &mut Client) -> anyhow::Result<StatusReply> {
    rpc(client.status(StatusRequest {})).await
}

/// An RPC's reply, within [`RPC_TIMEOUT`].
pub async fn rpc<T>(
    call: impl std::future::Future<Output = Result<tonic::Response<T>, Status>>,
) -> anyhow::Result<T> {
    match tokio::time::timeout(RPC_TIMEOUT, call).await {
        Err(_) => Err(anyhow!("no reply within {RPC_TIMEOUT:?}")),
        Ok(Err(status)) => Err(anyhow!("{:?}: {}", status.code(), status.message())),
        Ok(Ok(reply)) => Ok(reply.into_inner()),
    }
}

/// `x.y.z` as numbers, for ordering versions.
fn numbers(version: &str) -> Vec<u64> {
    version.split('.').filter_map(|p| p.parse().ok()).collect()
}

/// The loop's sums.
#[derive(Default)]
struct Tally {
    before_reply: u32,
    after_reply: u32,
    refused: u32,
    by_kind: BTreeMap<&'static str, u32>,
    inconsistent: u32,
    /// Why, for the first few inconsistent iterations.
    reasons: Vec<String>,
}

impl Tally {
    fn add(&mut self, iteration: &Iteration) {
        if let Some(kind) = iteration.kind {
            *self.by_kind.entry(kind).or_default() += 1;
        }
        match iteration.after_reply {
            Some(true) => self.after_reply += 1,
            Some(false) => self.before_reply += 1,
            None => {}
        }
        self.refused += u32::from(iteration.refused);
    }
}

/// xorshift64*: plenty for picking moves and delays, and replayable from
/// its seed.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        // The one state xorshift never leaves.
        Rng(if seed == 0 {
            0x9e37_79b9_7f4a_7c15
        } else {
            seed
        })
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform enough in `0..n` for small `n`.
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Copies a directory tree of plain files (the agent's data dir).
/// Copies the directories and files below `from`; not the control
/// socket, which only the agent that bound it can serve (the next agent
/// binds its own).
fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        let kind = entry.file_type()?;
        if kind.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else if kind.is_file() {
            std::fs::copy(entry.path(), target)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_replays_the_same_moves() {
        let picks = |seed| {
            let mut rng = Rng::new(seed);
            (0..50)
                .map(|_| Move::pick(&mut rng, LOWER).describe())
                .collect::<Vec<_>>()
        };
        assert_eq!(picks(7), picks(7));
        assert_ne!(picks(7), picks(8));
        assert!(picks(0).iter().any(|m| m.starts_with("upgrade")));
    }

    #[test]
    fn versions_order_by_number() {
        assert!(numbers("0.10.0") > numbers("0.3.0"));
        assert!(numbers("0.2.0") < numbers("0.3.0"));
    }
}
