//! `ctl rollout`: one release onto a fleet of agents, the way a careful
//! person would do it by hand, resumable, and one rollout at a time.
//!
//! 1. *Records*: every agent's rollout records (`lease::records`) say
//!    which attempt of this rollout this run is — an interrupted one
//!    still holding some agent is resumed, else the next — and whether
//!    another rollout holds some agent: then nothing is done (exit 5).
//! 2. *Leases*: this attempt takes every agent's lease, renews it while it
//!    runs (with its progress, for `ctl rollout status` from anywhere) and
//!    gives it back at the end with its outcome (`ctl rollout history`).
//! 3. *Survey*: every agent's status.
//! 4. *Stage* the release on every agent that does not run it yet, all of
//!    them before any switch: a release one agent refuses (a signature it
//!    does not trust, a full disk) stops the rollout with nothing switched.
//! 5. *Canary*: switch one agent — an upgrade or a downgrade, whichever
//!    way the target lies from what it runs — and wait for the soak's
//!    verdict.
//! 6. *Waves* of `--max-parallel` agents, each switched and awaited.
//!    With `--steps`, the waves are cut into steps with pauses between
//!    them, each followed by an analysis; a `canary W%` step first runs
//!    the target as an in-process canary beside the active release on the
//!    next step's agents, through its pauses, judges it against the
//!    active release on each of them, and that step's switch promotes it
//!    (conditional on the canary still running: `expected_canary`).
//! 7. On the first failure (a refused switch, a failed soak or analysis,
//!    an agent lost, a verdict that does not come within `--timeout`):
//!    *halt*, drop the canaries it started, and roll back every agent
//!    this rollout switched, in waves of the same width (exit 4; 3 if
//!    some agent could not be reached), then remove the release it staged
//!    from the agents that never switched to it (unless `--keep-staged`).
//!
//! An agent found running a canary this rollout started, in any attempt
//! (a run killed during a canary step), takes it up where it stands: the
//! canary's request is answered with what the agent did (a new attempt
//! starts it anew), and its pauses are waited again; a run that stops
//! before any switch (a stage refused, an agent lost at the survey) drops
//! it. A canary step checks after staging that neither release keeps
//! state, and during its pauses that its canaries still serve.
//!
//! Up to `--max-unavailable` agents that cannot be reached, or refuse the
//! release, are *skipped* instead of stopping everything (exit 6 when the
//! rest converged); running the rollout again picks them up.
//!
//! Every switch is conditional (`expected_active`: the release the survey
//! found) and every command carries a request id derived from the rollout
//! id and the attempt (`plan::request_id`). The rollout id is derived from
//! the release, the target version and the agents' canonical addresses,
//! so running the same command again after an interruption resumes it:
//! agents on the target are skipped or awaited, and a command that did
//! reach an agent is answered with its recorded outcome instead of being
//! run twice. Running it again after it ended is a new attempt.

pub mod fleet;
mod lease;
mod plan;
mod progress;
mod report;
pub mod status;
pub mod undo;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::anyhow;
use futures_util::future::join_all;
use futures_util::stream::{self, StreamExt};
use nine9s_proto as pb;
use tokio::sync::watch;

use crate::commands::{self, status, Release};
use crate::rpc::Agent;
use crate::{follow, json, render, Failure, Output};
use lease::Leases;
use plan::{Attempt, Found, Step};
use progress::Progress;
use report::{Outcome, Phases, Report, Track};

pub use lease::resume;
pub use plan::{canary_weight, Budget, Gate, StepSpec, Steps, MAX_ROLLOUT_ID};

/// Uploads at once while staging: they are the heavy part of a rollout
/// (a few MB to each agent), and staging changes nothing that serves.
const STAGE_PARALLEL: usize = 8;

/// How often a canary step's pause looks whether its canaries still serve.
const CANARY_POLL: Duration = Duration::from_secs(1);

/// The reason code of a conditional command whose condition failed.
const EXPECTED_ACTIVE_MISMATCH: &str = "EXPECTED_ACTIVE_MISMATCH";
const EXPECTED_CANARY_MISMATCH: &str = "EXPECTED_CANARY_MISMATCH";
/// The reason code of a role too weak for the call.
const PERMISSION_DENIED: &str = "PERMISSION_DENIED";

/// One agent of the fleet.
pub struct Node {
    pub name: String,
    pub address: String,
    pub agent: Agent,
}

/// What `ctl rollout` was asked.
pub struct Settings {
    pub to: semver::Version,
    pub release_dir: PathBuf,
    pub library: Option<PathBuf>,
    pub max_parallel: usize,
    pub max_unavailable: Budget,
    /// `--steps`: the fleet cut into steps, with pauses.
    pub steps: Vec<StepSpec>,
    /// The analysis after each step (`None`: `--no-analysis`).
    pub gate: Option<plan::Gate>,
    pub soak: Option<Duration>,
    /// How long one agent's verdict may take.
    pub timeout: Duration,
    pub rollout_id: Option<String>,
    pub reason: Option<String>,
    pub dry_run: bool,
    /// Take the agents' leases from whichever rollout holds them.
    pub force: bool,
    /// After a halt, leave the release staged where it was never switched to.
    pub keep_staged: bool,
    /// The command line, recorded with the rollout for people.
    pub command: String,
}

/// The milliseconds since `*since`, which becomes now.
fn lap(since: &mut Instant) -> u64 {
    let ms = u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX);
    *since = Instant::now();
    ms
}

/// A failure of one agent's step.
pub struct StepError {
    error: String,
    reason: Option<String>,
    unreachable: bool,
    /// The health gate rolled the target back.
    soak: bool,
}

impl StepError {
    fn from_failure(failure: Failure) -> StepError {
        let (error, reason, unreachable, soak) = match failure {
            Failure::Failed { error, reason } => (error, reason, false, false),
            Failure::Unreachable(error) => (error, None, true, false),
            Failure::RolledBack(error) => (error, None, false, true),
            Failure::Leased(error) | Failure::Skipped(error) => (error, None, false, false),
        };
        StepError {
            error: format!("{error:#}"),
            reason,
            unreachable,
            soak,
        }
    }

    fn local(error: String) -> StepError {
        StepError {
            error,
            reason: None,
            unreachable: false,
            soak: false,
        }
    }

    fn is(&self, reason: &str) -> bool {
        self.reason.as_deref() == Some(reason)
    }
}

/// Each node's canonical address (`fleet::canonical`), or the two names
/// of one agent listed twice under different spellings.
pub async fn canonical_keys(nodes: &[Node]) -> Result<Vec<String>, String> {
    let keys = join_all(nodes.iter().map(|n| fleet::canonical(&n.address))).await;
    for (i, key) in keys.iter().enumerate() {
        if let Some(j) = keys[..i].iter().position(|k| k == key) {
            return Err(format!(
                "{} and {} are the same agent ({key}): list it once",
                nodes[j].name, nodes[i].name
            ));
        }
    }
    Ok(keys)
}

pub async fn run(nodes: Vec<Node>, settings: Settings, output: Output) -> Result<(), Failure> {
    let started = Instant::now();
    let release = commands::read_release(&settings.release_dir, settings.library.clone())?;
    if release.manifest.version != settings.to {
        return Err(anyhow!(
            "{} holds {} {}, not --to {}",
            settings.release_dir.display(),
            release.manifest.name,
            release.manifest.version,
            settings.to
        )
        .into());
    }
    let signature = commands::read_signature(&settings.release_dir)?.map(|(text, _)| text);
    let target = settings.to.to_string();
    let keys = canonical_keys(&nodes)
        .await
        .unwrap_or_else(|e| crate::usage_error(format!("the fleet: {e}")));
    let rollout_id = settings.rollout_id.clone().unwrap_or_else(|| {
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        plan::default_rollout_id(&target, &release.sha256, &keys)
    });
    let progress = Progress::new(nodes.iter().map(|n| n.name.clone()).collect());
    let mut tracks: Vec<Track> = nodes
        .iter()
        .map(|n| Track::new(&n.name, &n.address, String::new()))
        .collect();
    let mut run = Run {
        nodes: &nodes,
        keys: &keys,
        settings: &settings,
        release: &release,
        signature,
        target,
        rollout_id,
        attempt: Attempt {
            number: 1,
            resumed: false,
        },
        progress: &progress,
        budget: settings.max_unavailable.of(nodes.len()),
        skipped: 0,
        staged_here: vec![false; nodes.len()],
        ours: vec![false; nodes.len()],
        switched: vec![false; nodes.len()],
        canaried: vec![false; nodes.len()],
        canary_base: vec![plan::Sample::default(); nodes.len()],
        target_base: vec![plan::Sample::default(); nodes.len()],
        active_state: vec![0; nodes.len()],
        target_state: vec![0; nodes.len()],
        found: vec![None; nodes.len()],
        last_event: vec![0; nodes.len()],
    };
    let mut phases = Phases::default();
    let ended = run.drive(&mut tracks, &mut phases).await;
    if !settings.dry_run {
        run.read_after(&mut tracks).await;
    }
    progress.finish();
    let plan = run.plan(&tracks);
    let report = Report {
        rollout_id: run.rollout_id.clone(),
        attempt: run.attempt.number,
        resumed: run.attempt.resumed,
        action: "rollout",
        version: run.target.clone(),
        sha256: release.sha256.clone(),
        outcome: ended.word(),
        halted_by: ended.why().map(str::to_owned),
        canary: plan.canary,
        waves: plan.waves,
        elapsed_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        phases,
        agents: tracks,
    };
    match output {
        Output::Json => json::print(&report),
        Output::Table => report::summary(&report),
    }
    ended.into_result(&report)
}

/// How a run as a whole ended.
pub enum Ended {
    /// Every agent not skipped is on the target.
    Converged,
    Planned,
    /// Another rollout holds some agent: nothing was done.
    Leased {
        why: String,
    },
    /// Stopped before any switch: nothing to roll back (`unreachable`:
    /// because an agent could not be reached).
    Stopped {
        why: String,
        unreachable: bool,
    },
    /// Halted after switches began, and rolled back (`clean`: every
    /// rollback succeeded).
    Halted {
        why: String,
        unreachable: bool,
        clean: bool,
    },
    /// `undo`: every agent it switched is back.
    Undone,
}

impl Ended {
    pub fn word(&self) -> &'static str {
        match self {
            Ended::Converged => "converged",
            Ended::Planned => "planned",
            Ended::Undone => "undone",
            Ended::Leased { .. } => "leased",
            Ended::Stopped {
                unreachable: true, ..
            }
            | Ended::Halted {
                unreachable: true, ..
            } => "unreachable",
            Ended::Stopped { .. } => "stopped",
            Ended::Halted { clean: false, .. } => "failed",
            Ended::Halted { .. } => "halted",
        }
    }

    pub fn why(&self) -> Option<&str> {
        match self {
            Ended::Converged | Ended::Planned | Ended::Undone => None,
            Ended::Leased { why } | Ended::Stopped { why, .. } | Ended::Halted { why, .. } => {
                Some(why)
            }
        }
    }

    /// The exit: 0 converged (or undone); 6 converged but for skipped
    /// agents; 5 another rollout holds some agent; 3 some agent could not
    /// be reached; 4 halted and rolled back; 1 otherwise.
    pub fn into_result(self, report: &Report) -> Result<(), Failure> {
        let id = format!("rollout {} (attempt {})", report.rollout_id, report.attempt);
        let skipped: Vec<&str> = report
            .agents
            .iter()
            .filter(|t| t.outcome == Outcome::Skipped)
            .map(|t| t.name.as_str())
            .collect();
        match self {
            Ended::Converged if !skipped.is_empty() => Err(Failure::Skipped(anyhow!(
                "{id} converged but for {} skipped agent(s): {}; run it again to pick them up",
                skipped.len(),
                skipped.join(", ")
            ))),
            Ended::Converged | Ended::Planned | Ended::Undone => Ok(()),
            Ended::Leased { why } => Err(Failure::Leased(anyhow!("{id}: nothing done: {why}"))),
            Ended::Stopped {
                why,
                unreachable: true,
            } => Err(Failure::Unreachable(anyhow!(
                "{id} stopped before switching any agent: {why}"
            ))),
            Ended::Stopped { why, .. } => {
                Err(anyhow!("{id} stopped before switching any agent: {why}").into())
            }
            Ended::Halted {
                why,
                unreachable: true,
                ..
            } => Err(Failure::Unreachable(anyhow!(
                "{id} halted: {why}; see the summary for each agent"
            ))),
            Ended::Halted {
                why, clean: true, ..
            } => Err(Failure::RolledBack(anyhow!(
                "{id} halted and rolled back: {why}"
            ))),
            Ended::Halted { why, .. } => Err(anyhow!(
                "{id} halted, and some rollbacks failed: {why}; see the summary"
            )
            .into()),
        }
    }
}

/// One run of `ctl rollout`: what it was asked, and what it learnt of
/// each agent on the way.
struct Run<'a> {
    nodes: &'a [Node],
    /// Canonical addresses: the agents' keys in request ids.
    keys: &'a [String],
    settings: &'a Settings,
    release: &'a Release,
    signature: Option<String>,
    target: String,
    rollout_id: String,
    attempt: Attempt,
    progress: &'a Progress,
    /// Agents that may be skipped, and how many were.
    budget: usize,
    skipped: usize,
    /// This run's stage put the release there (not an earlier stage).
    staged_here: Vec<bool>,
    /// This rollout made the target active there (now or in an earlier
    /// run of this attempt): a halt rolls it back.
    ours: Vec<bool>,
    /// The target was made active there in this run (and may have been
    /// rolled back since, by the halt or the health gate).
    switched: Vec<bool>,
    /// This rollout started the target as a canary there (in this run, or
    /// in an earlier one, of any attempt) and has not dropped it: the
    /// next switch promotes it, a halt or an early stop drops it.
    canaried: Vec<bool>,
    /// What the active release had served when the canary beside it was
    /// started (or found running): its analysis counts from there.
    canary_base: Vec<plan::Sample>,
    /// What the target had served when this run switched to it there (an
    /// earlier canary of it, or an earlier attempt's switch, served under
    /// the same version): a step's analysis counts from there.
    target_base: Vec<plan::Sample>,
    /// The state version of the release active there (survey), and of the
    /// target (its stage): a canary needs both 0.
    active_state: Vec<u32>,
    target_state: Vec<u32>,
    found: Vec<Option<Found>>,
    /// The last event id when the agent was surveyed.
    last_event: Vec<u64>,
}

impl Run<'_> {
    fn request_id(&self, step: Step, i: usize) -> String {
        plan::request_id(&self.rollout_id, self.attempt.number, step, &self.keys[i])
    }

    fn plan(&self, tracks: &[Track]) -> plan::Plan {
        let found: Vec<Found> = (0..tracks.len())
            .filter(|&i| tracks[i].outcome != Outcome::Skipped)
            .map(|i| self.found[i].unwrap_or(Found::Elsewhere))
            .collect();
        let index: Vec<usize> = (0..tracks.len())
            .filter(|&i| tracks[i].outcome != Outcome::Skipped)
            .collect();
        let ours: Vec<bool> = index.iter().map(|&i| self.ours[i]).collect();
        let plan = plan::plan(&found, &ours, self.settings.max_parallel);
        plan::Plan {
            canary: plan.canary.map(|c| index[c]),
            waves: plan
                .waves
                .into_iter()
                .map(|w| w.into_iter().map(|i| index[i]).collect())
                .collect(),
        }
    }

    /// Skips agent `i` for `e` if the budget allows: `true` if it did.
    fn skip(&mut self, tracks: &mut [Track], i: usize, e: &StepError) -> bool {
        if self.skipped >= self.budget {
            return false;
        }
        self.skipped += 1;
        let track = &mut tracks[i];
        track.outcome = Outcome::Skipped;
        track.error = Some(e.error.clone());
        track.reason = e.reason.clone();
        self.progress.done(i, format!("skipped: {}", e.error));
        true
    }

    fn live(&self, tracks: &[Track]) -> Vec<usize> {
        (0..tracks.len())
            .filter(|&i| tracks[i].outcome != Outcome::Skipped)
            .collect()
    }

    async fn drive(&mut self, tracks: &mut [Track], phases: &mut Phases) -> Ended {
        let mut clock = Instant::now();
        // 1. The records: which attempt, and who holds the agents.
        let records = join_all(self.nodes.iter().map(lease::records)).await;
        let mut lost = Vec::new();
        let mut held_by_others = Vec::new();
        let mut seen = Vec::new();
        for (i, result) in records.into_iter().enumerate() {
            match result {
                Ok(reply) => {
                    if let Some(holder) = &reply.holder {
                        if holder.rollout_id != self.rollout_id {
                            held_by_others.push((i, holder.clone()));
                        }
                        seen.push((holder.rollout_id.clone(), holder.attempt, true));
                    }
                    seen.extend(
                        reply
                            .ended
                            .iter()
                            .map(|r| (r.rollout_id.clone(), r.attempt, false)),
                    );
                }
                Err(f) => {
                    let e = StepError::from_failure(f);
                    if e.unreachable && self.skip(tracks, i, &e) {
                        continue;
                    }
                    lost.push(format!("{}: {}", tracks[i].name, e.error));
                    fail(&mut tracks[i], e);
                }
            }
        }
        self.attempt = plan::attempt(
            &self.rollout_id,
            seen.iter().map(|(id, n, held)| (id.as_str(), *n, *held)),
        );
        for (i, track) in tracks.iter_mut().enumerate() {
            track.request_id = self.request_id(Step::Switch, i);
        }
        self.progress.note(&format!(
            "rollout {} (attempt {}{}): {} {} (sha256 {}) to {} agent(s), waves of {}",
            self.rollout_id,
            self.attempt.number,
            if self.attempt.resumed {
                ", resumed"
            } else {
                ""
            },
            self.release.manifest.name,
            self.target,
            render::short_sha(&self.release.sha256),
            self.nodes.len(),
            self.settings.max_parallel
        ));
        if !lost.is_empty() {
            not_reached(tracks, "the rollout stopped: not every agent could be read");
            return Ended::Stopped {
                why: format!("reading the rollout records failed on {}", lost.join("; ")),
                unreachable: true,
            };
        }
        if !held_by_others.is_empty() && !self.settings.force {
            let mut why = Vec::new();
            for (i, holder) in &held_by_others {
                tracks[*i].error = Some(format!("held by rollout {}", lease::holder(holder)));
                tracks[*i].reason = Some(lease::LEASE_HELD.into());
                why.push(format!(
                    "{} is held by rollout {}{}",
                    tracks[*i].name,
                    lease::holder(holder),
                    expiry(holder)
                ));
            }
            not_reached(tracks, "another rollout holds some agent");
            return Ended::Leased {
                why: format!(
                    "{}: wait for it to end, run it again to resume it, `ctl rollout undo --rollout-id {}` it, or take the agents over with --force",
                    why.join("; "),
                    held_by_others[0].1.rollout_id
                ),
            };
        }
        if self.settings.dry_run {
            return self.survey_and_plan(tracks, phases, &mut clock).await;
        }

        // 2. Leases, kept alive while the rest runs, then given back.
        let leases = Leases::new(
            self.nodes,
            pb::RolloutRecord {
                rollout_id: self.rollout_id.clone(),
                attempt: self.attempt.number,
                version: self.target.clone(),
                step: "taking the leases".into(),
                agents_total: self.nodes.len() as u32,
                command: self.settings.command.clone(),
                ..Default::default()
            },
        );
        let (stop, stopped) = watch::channel(false);
        let (ended, ()) = tokio::join!(
            async {
                let ended = self.held(tracks, phases, &mut clock, &leases).await;
                stop.send_replace(true);
                ended
            },
            leases.renew_until(stopped)
        );
        for (i, e) in leases.give_back(ended.word()).await {
            self.progress.note(&format!(
                "rollout: {} keeps this rollout's lease (it could not be given back: {}); running the rollout again, or undoing it, frees it",
                self.nodes[i].name, e.error
            ));
        }
        ended
    }

    /// The rollout under its leases.
    async fn held(
        &mut self,
        tracks: &mut [Track],
        phases: &mut Phases,
        clock: &mut Instant,
        leases: &Leases<'_>,
    ) -> Ended {
        let live = self.live(tracks);
        let force = self.settings.force;
        let taken = join_all(
            live.iter()
                .map(|&i| async move { (i, leases.take(i, force).await) }),
        )
        .await;
        let mut lost = Vec::new();
        for (i, result) in taken {
            let Err(e) = result else { continue };
            if e.is(lease::LEASE_HELD) {
                // Taken by another rollout since the records were read.
                let why = format!("{}: {}", tracks[i].name, e.error);
                fail(&mut tracks[i], e);
                not_reached(tracks, "another rollout holds some agent");
                return Ended::Leased { why };
            }
            if e.unreachable && self.skip(tracks, i, &e) {
                continue;
            }
            lost.push(format!("{}: {}", tracks[i].name, e.error));
            fail(&mut tracks[i], e);
        }
        if !lost.is_empty() {
            not_reached(tracks, "the rollout stopped: not every agent could be held");
            return Ended::Stopped {
                why: format!("taking the leases failed on {}", lost.join("; ")),
                unreachable: true,
            };
        }
        leases.update(|r| r.step = "surveying".into());
        if let Err((why, unreachable)) = self.survey(tracks).await {
            return self.stop(tracks, leases, why, unreachable).await;
        }
        phases.survey_ms = lap(clock);
        let plan = self.plan(tracks);

        // Stage everywhere the target is not active.
        leases.update(|r| r.step = "staging".into());
        let to_stage: Vec<usize> = (0..tracks.len())
            .filter(|&i| {
                tracks[i].outcome != Outcome::Skipped && self.found[i] == Some(Found::Elsewhere)
            })
            .collect();
        let this = &*self;
        let staged: Vec<(usize, Result<Staged, StepError>)> = stream::iter(to_stage)
            .map(|i| async move { (i, this.stage(i).await) })
            .buffer_unordered(STAGE_PARALLEL)
            .collect()
            .await;
        phases.stage_ms = lap(clock);
        let mut stopped = None;
        for (i, result) in staged {
            match result {
                Ok(staged) => {
                    self.staged_here[i] = staged.here;
                    self.target_state[i] = staged.state_version;
                }
                Err(e) => {
                    if self.skip(tracks, i, &e) {
                        continue;
                    }
                    let unreachable = e.unreachable;
                    let why = format!("staging on {}: {}", tracks[i].name, e.error);
                    fail(&mut tracks[i], e);
                    let first = stopped.get_or_insert((why, unreachable));
                    first.1 |= unreachable;
                }
            }
        }
        if let Some((why, unreachable)) = stopped {
            not_reached(tracks, "the rollout stopped while staging");
            return self.stop(tracks, leases, why, unreachable).await;
        }
        // Skipped while staging: out of the plan.
        let plan = if self.skipped > 0 {
            self.plan(tracks)
        } else {
            plan
        };

        // The stages — the canary, then the waves, cut into --steps with
        // their pauses — while nothing failed.
        let done = tracks
            .iter()
            .filter(|t| t.outcome == Outcome::AlreadyThere)
            .count();
        let stages = plan::stages(
            &plan,
            &self.settings.steps,
            tracks.len(),
            done,
            self.settings.max_parallel,
        );
        if let Some(why) = self.stateful_canaries(tracks, &stages) {
            not_reached(tracks, "the rollout stopped before its first switch");
            return self.stop(tracks, leases, why, false).await;
        }
        let failure = self
            .run_stages(tracks, phases, clock, leases, &plan, stages)
            .await;
        phases.waves_ms = lap(clock);
        let Some((why, unreachable)) = failure else {
            return Ended::Converged;
        };
        not_reached(tracks, "the rollout halted before its turn");
        // Nothing was switched (the canary's switch was refused) and no
        // canary started: nothing to roll back.
        if !self.switched.iter().any(|&s| s) && !self.canaried.iter().any(|&c| c) {
            return self.stop(tracks, leases, why, unreachable).await;
        }
        self.halt(tracks, phases, clock, leases, why, unreachable)
            .await
    }

    /// Stops the rollout before any switch: the canaries of this rollout
    /// found running (a run killed during a canary step) are dropped, and
    /// the release this run staged is removed where it never ran.
    async fn stop(
        &mut self,
        tracks: &mut [Track],
        leases: &Leases<'_>,
        why: String,
        unreachable: bool,
    ) -> Ended {
        let clean = !self.canaried.iter().any(|&c| c) || {
            leases.update(|r| r.step = "dropping the canaries".into());
            self.progress
                .note(&format!("rollout: stopped: {why}; dropping its canaries"));
            self.drop_canaries(tracks, &why).await
        };
        self.clean_up(tracks, leases).await;
        if clean {
            Ended::Stopped { why, unreachable }
        } else {
            Ended::Halted {
                why,
                unreachable,
                clean,
            }
        }
    }

    /// Why the canary steps of `stages` cannot run, if they cannot: the
    /// agent refuses a canary of a release that keeps state, or beside
    /// one (`CANARY_WITH_STATE`), and a rollout that found out at its
    /// canary step would have switched the agents before it.
    fn stateful_canaries(&self, tracks: &[Track], stages: &[plan::Stage]) -> Option<String> {
        let mut stateful = Vec::new();
        for stage in stages {
            let plan::Stage::Canary {
                waves, permille, ..
            } = stage
            else {
                continue;
            };
            for &i in waves.iter().flatten() {
                if self.found[i] != Some(Found::Elsewhere) {
                    continue;
                }
                let active = tracks[i].before.as_deref().unwrap_or("?");
                for (version, state) in [
                    (self.target.as_str(), self.target_state[i]),
                    (active, self.active_state[i]),
                ] {
                    if state != 0 {
                        stateful.push(format!(
                            "{} for its canary {}: {version} keeps state (state version {state})",
                            tracks[i].name,
                            plan::weight(*permille)
                        ));
                    }
                }
            }
        }
        (!stateful.is_empty()).then(|| {
            format!(
                "a canary step needs releases that keep no state on both sides (a canary would serve with a copy of the state of its own): {}; run it without its canary steps",
                stateful.join("; ")
            )
        })
    }

    /// The stages in order — switches, pauses, canaries and the analysis
    /// after each — until one fails: that failure, if any.
    async fn run_stages(
        &mut self,
        tracks: &mut [Track],
        phases: &mut Phases,
        clock: &mut Instant,
        leases: &Leases<'_>,
        plan: &plan::Plan,
        stages: Vec<plan::Stage>,
    ) -> Option<(String, bool)> {
        let (halt, _) = watch::channel(false);
        let switches = stages
            .iter()
            .filter(|s| matches!(s, plan::Stage::Switch(_)))
            .count();
        let mut k = 0;
        // The canary serving now (its agents, its weight): judged before
        // the next stage, once its pauses are over.
        let mut canary: Option<(Vec<usize>, u16)> = None;
        for stage in stages {
            let (waves, starts) = match stage {
                plan::Stage::Pause(pause) => {
                    let label = canary
                        .as_ref()
                        .map(|(_, permille)| format!("canary {}", plan::weight(*permille)));
                    let serving: Vec<usize> = canary
                        .iter()
                        .flat_map(|(agents, _)| agents)
                        .copied()
                        .filter(|&i| self.canaried[i])
                        .collect();
                    let gone = self.pause(pause, label.clone(), &serving, leases).await;
                    let label = label.unwrap_or_default();
                    let mut failure = None;
                    for i in gone {
                        let why = self.canary_gone(&mut tracks[i], i, &label);
                        failure.get_or_insert(why);
                    }
                    if failure.is_some() {
                        return failure;
                    }
                    continue;
                }
                plan::Stage::Switch(waves) => (waves, None),
                plan::Stage::Canary {
                    waves,
                    permille,
                    step,
                } => (waves, Some((permille, step))),
            };
            if let Some((agents, permille)) = canary.take() {
                let label = format!("canary {}", plan::weight(permille));
                if let Some(gate) = self.settings.gate {
                    leases.update(|r| r.step = format!("analysis of {label}"));
                    let failure = self.analyse_canary(tracks, &agents, gate, &label).await;
                    if failure.is_some() {
                        return failure;
                    }
                } else {
                    self.progress.note(&format!(
                        "rollout: {label} not judged (--no-analysis): the next step promotes it unjudged"
                    ));
                }
            }
            if let Some((permille, step)) = starts {
                let agents = waves.concat();
                let failure = self
                    .start_canaries(tracks, waves, permille, step, leases)
                    .await;
                if failure.is_some() {
                    return failure;
                }
                canary = Some((agents, permille));
                continue;
            }
            k += 1;
            let count = waves.len();
            let switching: Vec<usize> = waves.concat();
            for (n, wave) in waves.into_iter().enumerate() {
                let is_canary = k == 1 && wave.len() == 1 && plan.canary == Some(wave[0]);
                let step = if is_canary {
                    self.progress
                        .note(&format!("canary: {}", tracks[wave[0]].name));
                    format!("canary {}", tracks[wave[0]].name)
                } else if self.settings.steps.is_empty() {
                    format!("wave {} of {count}", n + 1)
                } else {
                    format!("step {k} of {switches}, wave {} of {count}", n + 1)
                };
                let failure = self.switch_wave(tracks, &wave, step, &halt, leases).await;
                if is_canary {
                    phases.canary_ms = lap(clock);
                }
                if failure.is_some() {
                    return failure;
                }
            }
            if let Some(gate) = self.settings.gate {
                leases.update(|r| r.step = format!("analysis of step {k} of {switches}"));
                let failure = self.analyse(tracks, &switching, gate).await;
                if failure.is_some() {
                    return failure;
                }
            }
        }
        None
    }

    /// Switches the agents of one wave at once (`step`: what the leases
    /// say meanwhile) and waits for their verdicts; the first failure, if
    /// any, which cuts its siblings' soaks short (`halt`).
    async fn switch_wave(
        &mut self,
        tracks: &mut [Track],
        wave: &[usize],
        step: String,
        halt: &watch::Sender<bool>,
        leases: &Leases<'_>,
    ) -> Option<(String, bool)> {
        let soak_until = self
            .settings
            .soak
            .map_or(0, |s| render::now_ms() + s.as_millis() as i64);
        leases.update(|r| {
            r.step = step;
            r.soak_until_ms = soak_until;
            self.count(tracks, r);
        });
        let this = &*self;
        let results = join_all(wave.iter().map(|&i| {
            let before = tracks[i].before.clone();
            async move {
                let result = this.switch(i, before, halt).await;
                if let Err(e) = &result {
                    if !e.1.halted {
                        halt.send_replace(true);
                    }
                }
                (i, result)
            }
        }))
        .await;
        let mut failure: Option<(String, bool)> = None;
        for (i, result) in results {
            match result {
                Ok(base) => {
                    self.target_base[i] = base;
                    self.ours[i] = true;
                    self.switched[i] = true;
                    tracks[i].outcome = Outcome::Upgraded;
                    self.progress
                        .done(i, format!("{} is permanent", self.target));
                }
                Err((ours, e)) => {
                    self.ours[i] |= ours;
                    self.switched[i] |= ours || e.error.soak;
                    let track = &mut tracks[i];
                    if e.halted {
                        track.outcome = Outcome::NotReached;
                        track.error = Some("the rollout halted during its soak".into());
                        continue;
                    }
                    let why = format!("{}: {}", track.name, e.error.error);
                    self.progress.say(i, format!("failed: {}", e.error.error));
                    let unreachable = e.error.unreachable;
                    let soak = e.error.soak;
                    fail(track, e.error);
                    if soak {
                        track.outcome = Outcome::FailedSoak;
                    }
                    let first = failure.get_or_insert((why, unreachable));
                    first.1 |= unreachable;
                }
            }
        }
        leases.update(|r| {
            r.soak_until_ms = 0;
            self.count(tracks, r);
        });
        failure
    }

    /// The halt: every canary this rollout started is dropped, everyone it
    /// switched goes back, in waves of `--max-parallel`.
    async fn halt(
        &mut self,
        tracks: &mut [Track],
        phases: &mut Phases,
        clock: &mut Instant,
        leases: &Leases<'_>,
        why: String,
        unreachable: bool,
    ) -> Ended {
        leases.update(|r| r.step = "rolling back".into());
        self.progress
            .note(&format!("rollout: halted: {why}; rolling back"));
        let mut clean = self.drop_canaries(tracks, &why).await;
        let back: Vec<usize> = (0..tracks.len()).filter(|&i| self.ours[i]).collect();
        let this = &*self;
        for wave in back.chunks(this.settings.max_parallel.max(1)) {
            let why = why.as_str();
            let results = join_all(
                wave.iter()
                    .map(|&i| async move { (i, this.roll_back(i, why).await) }),
            )
            .await;
            for (i, result) in results {
                let track = &mut tracks[i];
                match result {
                    Ok(Some(to)) => {
                        // One that failed its analysis keeps saying so.
                        if track.outcome != Outcome::FailedAnalysis {
                            track.outcome = Outcome::RolledBack;
                        }
                        self.progress.done(i, format!("rolled back to {to}"));
                    }
                    // Not on the target any more: the health gate was first.
                    Ok(None) => {
                        self.progress
                            .done(i, format!("{} is not active", self.target));
                    }
                    Err(e) => {
                        clean = false;
                        self.progress
                            .done(i, format!("rollback failed: {}", e.error));
                        fail(track, e);
                        track.outcome = Outcome::RollbackFailed;
                    }
                }
            }
        }
        phases.rollback_ms = lap(clock);
        self.clean_up(tracks, leases).await;
        Ended::Halted {
            why,
            unreachable,
            clean,
        }
    }

    /// The analysis after a step: on each agent it switched, the target
    /// since its switch against the release it replaced there
    /// (`Gate::judge`). The first failure, if any, halts the rollout.
    async fn analyse(
        &self,
        tracks: &mut [Track],
        agents: &[usize],
        gate: plan::Gate,
    ) -> Option<(String, bool)> {
        let mut failure = None;
        for (i, status) in self
            .read_for_analysis(tracks, agents, "the analysis", &mut failure)
            .await
        {
            let track = &mut tracks[i];
            let old = plan::Sample::of(&status, track.before.as_deref().unwrap_or_default());
            let new = plan::Sample::of(&status, &self.target).since(self.target_base[i]);
            let verdict = gate.judge(new, old);
            self.verdict(track, i, None, verdict, &mut failure);
        }
        failure
    }

    /// Each of `agents`' status, for an analysis (`of`: which, for
    /// people); an agent that cannot be read fails it, into `failure`.
    async fn read_for_analysis(
        &self,
        tracks: &mut [Track],
        agents: &[usize],
        of: &str,
        failure: &mut Option<(String, bool)>,
    ) -> Vec<(usize, pb::StatusReply)> {
        let read = join_all(agents.iter().map(|&i| status(&self.nodes[i].agent))).await;
        let mut statuses = Vec::new();
        for (&i, status) in agents.iter().zip(read) {
            match status {
                Ok(status) => statuses.push((i, status)),
                Err(f) => {
                    let track = &mut tracks[i];
                    let e = StepError::from_failure(f);
                    let why = format!("{}: {of} could not read it: {}", track.name, e.error);
                    let unreachable = e.unreachable;
                    fail(track, e);
                    failure.get_or_insert((why, unreachable));
                }
            }
        }
        statuses
    }

    /// Agent `i`'s verdict, in its track: the analysis of its step, or of
    /// the canary step `canary` (`canary 10%`); a failure goes into
    /// `failure` unless one is there already.
    fn verdict(
        &self,
        track: &mut Track,
        i: usize,
        canary: Option<&str>,
        verdict: Result<String, String>,
        failure: &mut Option<(String, bool)>,
    ) {
        let slot = match canary {
            Some(_) => &mut track.canary_analysis,
            None => &mut track.analysis,
        };
        match verdict {
            Ok(note) => *slot = Some(note),
            Err(why) => {
                *slot = Some(why.clone());
                let what =
                    canary.map_or_else(|| "analysis".to_owned(), |l| format!("{l} analysis"));
                self.progress.say(i, format!("failed its {what}: {why}"));
                track.outcome = Outcome::FailedAnalysis;
                track.error = Some(format!("{what}: {why}"));
                failure.get_or_insert((format!("{}: {what}: {why}", track.name), false));
            }
        }
    }

    /// Whether `status` shows the target serving as a canary.
    fn runs_canary(&self, status: &pb::StatusReply) -> bool {
        status
            .canary
            .as_ref()
            .is_some_and(|c| c.version == self.target)
    }

    /// Agent `i`'s canary of the step `label` runs no more (its health
    /// gate dropped it): in its track; the failure it is.
    fn canary_gone(&self, track: &mut Track, i: usize, label: &str) -> (String, bool) {
        let why = format!(
            "its {label} of {} runs no more: the agent's health gate dropped the canary (its history says why)",
            self.target
        );
        self.progress.say(i, format!("failed: {why}"));
        track.outcome = Outcome::FailedSoak;
        track.error = Some(why.clone());
        track.canary_analysis = Some(why.clone());
        (format!("{}: {why}", track.name), false)
    }

    /// A canary step: the target starts as a canary of `permille` beside
    /// the active release on `waves`' agents, wave after wave, where it
    /// is not active yet. The first failure, if any, halts the rollout.
    async fn start_canaries(
        &mut self,
        tracks: &mut [Track],
        waves: Vec<Vec<usize>>,
        permille: u16,
        step: usize,
        leases: &Leases<'_>,
    ) -> Option<(String, bool)> {
        let weight = plan::weight(permille);
        let label = format!("canary {weight}");
        let count = waves.iter().map(Vec::len).sum::<usize>();
        leases.update(|r| r.step = format!("{label} on {count} agent(s)"));
        self.progress
            .note(&format!("rollout: {label} on {count} agent(s)"));
        let mut failure = None;
        for wave in waves {
            let this = &*self;
            let results = join_all(
                wave.iter()
                    .filter(|&&i| this.found[i] == Some(Found::Elsewhere))
                    .map(|&i| {
                        let before = tracks[i].before.clone().unwrap_or_default();
                        async move { (i, this.start_canary(i, before, permille, step).await) }
                    }),
            )
            .await;
            for (i, result) in results {
                match result {
                    Ok(started) => {
                        self.canaried[i] = true;
                        match started {
                            Some(base) => {
                                self.canary_base[i] = base;
                                self.progress
                                    .say(i, format!("{} serves {weight} as a canary", self.target));
                            }
                            // Answered (a replayed start too), yet not
                            // serving: the health gate was first.
                            None => {
                                let why = self.canary_gone(&mut tracks[i], i, &label);
                                failure.get_or_insert(why);
                            }
                        }
                    }
                    Err(e) => {
                        let why = format!("{}: {label}: {}", tracks[i].name, e.error);
                        self.progress.say(i, format!("failed: {}", e.error));
                        let unreachable = e.unreachable;
                        // A transport failure after every retry: the agent
                        // may have started it, so a halt tries to drop it.
                        self.canaried[i] |= unreachable;
                        fail(&mut tracks[i], e);
                        let first = failure.get_or_insert((why, unreachable));
                        first.1 |= unreachable;
                    }
                }
            }
            if failure.is_some() {
                break;
            }
        }
        failure
    }

    /// Starts the target as a canary of `permille` on agent `i`, beside
    /// `before` (conditional on it being active still), and reads whether
    /// it serves: then what the active release had served (the analysis
    /// counts from there), `None` if it does not (the agent's health gate
    /// dropped it, or a start recorded in an earlier run was replayed).
    async fn start_canary(
        &self,
        i: usize,
        before: String,
        permille: u16,
        step: usize,
    ) -> Result<Option<plan::Sample>, StepError> {
        let what = format!("starting the canary of {}", self.target);
        self.progress.say(i, what.clone());
        let request = pb::TransitionRequest {
            version: self.target.clone(),
            canary: Some(pb::CanarySplit {
                permille: u32::from(permille),
                ..Default::default()
            }),
            request_id: self.request_id(Step::Canary(step), i),
            expected_active: before,
            reason: self.reason(),
            lease: self.rollout_id.clone(),
            ..Default::default()
        };
        let agent = &self.nodes[i].agent;
        agent
            .call(&what, request, |mut c, r| async move { c.upgrade(r).await })
            .await
            .map_err(StepError::from_failure)?;
        let now = status(agent).await.map_err(StepError::from_failure)?;
        Ok(self
            .runs_canary(&now)
            .then(|| plan::Sample::of(&now, &now.active_version)))
    }

    /// The analysis of a canary step once its pauses are over: on each
    /// agent running it, the canary against the active release beside it
    /// (`Gate::judge`), each from what it served since the canary started
    /// (the p99s since the worker started); a canary the agent's health
    /// gate dropped fails. The first failure, if any, halts the rollout.
    async fn analyse_canary(
        &self,
        tracks: &mut [Track],
        agents: &[usize],
        gate: plan::Gate,
        label: &str,
    ) -> Option<(String, bool)> {
        let agents: Vec<usize> = agents
            .iter()
            .copied()
            .filter(|&i| self.canaried[i])
            .collect();
        let mut failure = None;
        let of = format!("the analysis of its {label}");
        for (i, status) in self
            .read_for_analysis(tracks, &agents, &of, &mut failure)
            .await
        {
            let track = &mut tracks[i];
            let Some(canary) = status.canary.as_ref().filter(|_| self.runs_canary(&status)) else {
                let why = self.canary_gone(track, i, label);
                failure.get_or_insert(why);
                continue;
            };
            let new = plan::Sample {
                requests: canary.served,
                errors: canary.errors,
                p99_us: plan::Sample::of(&status, &self.target).p99_us,
            };
            let old = plan::Sample::of(&status, &status.active_version).since(self.canary_base[i]);
            if !new.enough() || !old.enough() {
                self.progress.note(&format!(
                    "rollout: {}: its {label} is not judged ({} requests on the canary, {} on {} beside it; at least {} each): the next step promotes it unjudged",
                    track.name,
                    new.requests,
                    old.requests,
                    status.active_version,
                    plan::MIN_REQUESTS
                ));
            }
            self.verdict(track, i, Some(label), gate.judge(new, old), &mut failure);
        }
        failure
    }

    /// After a halt or an early stop: drops the canary this rollout
    /// started wherever it was not promoted. `false` if some drop failed.
    async fn drop_canaries(&mut self, tracks: &mut [Track], why: &str) -> bool {
        let agents: Vec<usize> = (0..tracks.len())
            .filter(|&i| self.canaried[i] && !self.ours[i])
            .collect();
        let this = &*self;
        let results = join_all(agents.iter().map(|&i| async move {
            let reason = format!("rollout {} halted: {why}", this.rollout_id);
            let request_id = this.request_id(Step::DropCanary, i);
            let result = drop_canary(
                &this.nodes[i],
                &this.target,
                request_id,
                reason,
                &this.rollout_id,
            )
            .await;
            (i, result)
        }))
        .await;
        let mut clean = true;
        for (i, result) in results {
            let track = &mut tracks[i];
            match result {
                Ok(true) => {
                    self.canaried[i] = false;
                    if !matches!(track.outcome, Outcome::FailedAnalysis | Outcome::FailedSoak) {
                        track.outcome = Outcome::CanaryDropped;
                    }
                    self.progress
                        .done(i, format!("the canary of {} was dropped", self.target));
                }
                // Gone already (the health gate, or a promotion refused
                // for it): the track says what happened.
                Ok(false) => {
                    self.canaried[i] = false;
                    self.progress
                        .done(i, format!("no canary of {} runs", self.target));
                }
                Err(e) => {
                    clean = false;
                    self.progress
                        .done(i, format!("dropping the canary failed: {}", e.error));
                    fail(track, e);
                    track.outcome = Outcome::RollbackFailed;
                }
            }
        }
        clean
    }

    /// A pause between steps: `pause` long, or until `ctl rollout resume`;
    /// `label`: what runs meanwhile (a canary), for the step people see.
    /// Cut short when the canary stops serving on one of `canaries` (the
    /// agent's health gate dropped it): those agents, else none.
    async fn pause(
        &self,
        pause: Option<Duration>,
        label: Option<String>,
        canaries: &[usize],
        leases: &Leases<'_>,
    ) -> Vec<usize> {
        let label = label.map_or_else(String::new, |l| format!("{l}: "));
        let paused = async {
            match pause {
                Some(pause) => {
                    let until = render::now_ms() + pause.as_millis() as i64;
                    let step = format!("{label}paused for {}", humantime::format_duration(pause));
                    self.progress.note(&format!("rollout: {step}"));
                    leases.update(|r| {
                        r.step = step;
                        r.soak_until_ms = until;
                    });
                    tokio::time::sleep(pause).await;
                }
                None => {
                    self.progress.note(&format!(
                        "rollout: {label}paused; `ctl rollout resume` (with the same --fleet or --agent) goes on"
                    ));
                    leases.until_resumed(&label).await;
                    self.progress.note("rollout: resumed");
                }
            }
        };
        tokio::select! {
            () = paused => Vec::new(),
            gone = self.canaries_gone(canaries) => {
                leases.update(|r| r.soak_until_ms = 0);
                gone
            }
        }
    }

    /// Looks at the canaries of `agents` every `CANARY_POLL` until some
    /// stop serving: those agents. Never, with no agents; an agent that
    /// cannot be read is looked at again at the next poll.
    async fn canaries_gone(&self, agents: &[usize]) -> Vec<usize> {
        if agents.is_empty() {
            return std::future::pending().await;
        }
        loop {
            tokio::time::sleep(CANARY_POLL).await;
            let read = join_all(agents.iter().map(|&i| status(&self.nodes[i].agent))).await;
            let gone: Vec<usize> = agents
                .iter()
                .zip(read)
                .filter(|(_, now)| now.as_ref().is_ok_and(|now| !self.runs_canary(now)))
                .map(|(&i, _)| i)
                .collect();
            if !gone.is_empty() {
                return gone;
            }
        }
    }

    /// The progress counts of the record the leases carry.
    fn count(&self, tracks: &[Track], record: &mut pb::RolloutRecord) {
        let count =
            |f: &dyn Fn(Outcome) -> bool| tracks.iter().filter(|t| f(t.outcome)).count() as u32;
        record.agents_done = count(&|o| matches!(o, Outcome::Upgraded | Outcome::AlreadyThere));
        record.agents_skipped = count(&|o| o == Outcome::Skipped);
        record.agents_pending = record
            .agents_total
            .saturating_sub(record.agents_done + record.agents_skipped);
    }

    /// `--dry-run`: the survey, then the plan; nothing held or changed.
    async fn survey_and_plan(
        &mut self,
        tracks: &mut [Track],
        phases: &mut Phases,
        clock: &mut Instant,
    ) -> Ended {
        if let Err((why, unreachable)) = self.survey(tracks).await {
            return Ended::Stopped { why, unreachable };
        }
        phases.survey_ms = lap(clock);
        for (i, track) in tracks.iter().enumerate() {
            if track.outcome != Outcome::Skipped {
                self.progress.done(
                    i,
                    format!("found {}", track.before.as_deref().unwrap_or("?")),
                );
            }
        }
        Ended::Planned
    }

    /// Reads where every agent stands; `Err` when the rollout must stop:
    /// why, and whether because some agent could not be reached.
    async fn survey(&mut self, tracks: &mut [Track]) -> Result<(), (String, bool)> {
        let live = self.live(tracks);
        let this = &*self;
        let surveys = join_all(
            live.iter()
                .map(|&i| async move { (i, this.survey_one(i).await) }),
        )
        .await;
        let mut lost = Vec::new();
        let mut refused = Vec::new();
        for (i, survey) in surveys {
            match survey {
                Ok(found) => {
                    let track = &mut tracks[i];
                    track.before = Some(found.active);
                    self.ours[i] = found.ours;
                    self.canaried[i] = found.canary;
                    self.active_state[i] = found.state_version;
                    self.last_event[i] = found.last_event;
                    if found.found == Found::Permanent {
                        track.outcome = Outcome::AlreadyThere;
                    }
                    self.found[i] = Some(found.found);
                }
                Err(e) => {
                    if e.unreachable && self.skip(tracks, i, &e) {
                        continue;
                    }
                    let list = if e.unreachable {
                        &mut lost
                    } else {
                        &mut refused
                    };
                    list.push(format!("{}: {}", tracks[i].name, e.error));
                    fail(&mut tracks[i], e);
                }
            }
        }
        if lost.is_empty() && refused.is_empty() {
            return Ok(());
        }
        let unreachable = !lost.is_empty();
        lost.extend(refused);
        not_reached(
            tracks,
            "the rollout stopped: not every agent could be surveyed",
        );
        Err((
            format!("the survey failed on {}", lost.join("; ")),
            unreachable,
        ))
    }

    /// Where agent `i` stands.
    async fn survey_one(&self, i: usize) -> Result<Survey, StepError> {
        let node = &self.nodes[i];
        self.progress.say(i, "reading its status");
        let status = status(&node.agent).await.map_err(StepError::from_failure)?;
        let found = if status.active_version != self.target {
            Found::Elsewhere
        } else if status.permanent_version == self.target {
            Found::Permanent
        } else {
            Found::Soaking
        };
        // Whether this attempt switched it, in a run that was interrupted:
        // then a halt must roll it back too.
        let ours = found != Found::Elsewhere && self.attempt.resumed && {
            let id = self.request_id(Step::Switch, i);
            last_transitions(node, 100)
                .await?
                .iter()
                .any(|t| t.request_id == id)
        };
        // Whether it runs a canary this rollout started, in any attempt (a
        // run interrupted during a canary step, or stopped before it could
        // drop it): then the next switch promotes it (or the canary step
        // starts it anew), and a halt or an early stop drops it.
        let canary = found == Found::Elsewhere
            && self.runs_canary(&status)
            && last_transitions(node, 100).await?.iter().any(|t| {
                t.kind() == pb::TransitionKind::Canary
                    && t.to_version == self.target
                    && plan::canary_sent_by(&t.request_id, &self.rollout_id)
            });
        let state_version = status
            .releases
            .iter()
            .find(|r| r.version == status.active_version)
            .map_or(0, |r| r.state_version);
        self.progress.say(
            i,
            match found {
                Found::Permanent => format!("{} is permanent already", self.target),
                Found::Soaking => format!("{} is soaking", self.target),
                Found::Elsewhere => format!("runs {}", status.active_version),
            },
        );
        Ok(Survey {
            active: status.active_version,
            found,
            ours,
            canary,
            state_version,
            last_event: status.last_event_id,
        })
    }

    /// Stages the release on agent `i`.
    async fn stage(&self, i: usize) -> Result<Staged, StepError> {
        let node = &self.nodes[i];
        self.progress.say(
            i,
            format!(
                "staging {} ({} bytes)",
                self.target,
                self.release.bytes.len()
            ),
        );
        let chunks = commands::stage_chunks(
            self.release,
            self.signature.clone(),
            self.request_id(Step::Stage, i),
            self.reason(),
        );
        let reply = commands::stage(&node.agent, self.release, chunks, None)
            .await
            .map_err(StepError::from_failure)?;
        self.progress.say(i, format!("staged {}", self.target));
        Ok(Staged {
            here: !reply.already_staged,
            state_version: reply.release.map_or(0, |r| r.state_version),
        })
    }

    /// Switches agent `i` to the target (unless it is soaking there
    /// already) and waits for the verdict: `Ok` with what the target had
    /// served there before the switch (the step's analysis counts from
    /// there). `Err` says whether the target was made active there.
    async fn switch(
        &self,
        i: usize,
        before: Option<String>,
        halt: &watch::Sender<bool>,
    ) -> Result<plan::Sample, (bool, SwitchError)> {
        let node = &self.nodes[i];
        let mut halted = halt.subscribe();
        // An agent found soaking was switched by whoever switched it: this
        // rollout if the survey says so.
        let soaking = self.found[i] == Some(Found::Soaking);
        let mut after = self.last_event[i];
        let mut base = plan::Sample::default();
        let error = |ours, e: StepError| {
            (
                ours,
                SwitchError {
                    error: e,
                    halted: false,
                },
            )
        };
        if !soaking {
            let status = status(&node.agent)
                .await
                .map_err(|f| error(false, StepError::from_failure(f)))?;
            after = status.last_event_id;
            base = plan::Sample::of(&status, &self.target);
            let last_transition = self
                .last_transition(node)
                .await
                .map_err(|e| error(false, e))?;
            // A sibling of this wave may have failed meanwhile: then this
            // agent is not switched at all.
            if *halted.borrow() {
                return Err((
                    false,
                    SwitchError {
                        error: StepError::local("the rollout halted".into()),
                        halted: true,
                    },
                ));
            }
            let down = downward(before.as_deref().unwrap_or_default(), &self.target);
            let word = if down { "downgrade" } else { "upgrade" };
            self.progress.say(i, format!("{word} to {}", self.target));
            let request = pb::TransitionRequest {
                version: self.target.clone(),
                permanence: pb::Permanence::Soak.into(),
                soak_ms: self.settings.soak.map_or(0, |d| d.as_millis() as u64),
                request_id: self.request_id(Step::Switch, i),
                expected_active: before.unwrap_or_default(),
                // The promotion of the canary this rollout started: only
                // if it still runs (the agent's health gate may have
                // dropped it).
                expected_canary: if self.canaried[i] {
                    self.target.clone()
                } else {
                    String::new()
                },
                reason: self.reason(),
                lease: self.rollout_id.clone(),
                ..Default::default()
            };
            let reply = transition(node, down, &format!("{word} to {}", self.target), request)
                .await
                // A transport failure after every retry: the agent may have
                // acted, so a halt tries to roll it back.
                .map_err(|f| {
                    let e = StepError::from_failure(f);
                    let maybe = e.unreachable;
                    error(maybe, e)
                })?;
            if let Some(t) = &reply.transition {
                if t.id <= last_transition {
                    return Err(error(
                        false,
                        StepError::local(format!(
                            "this attempt of the rollout switched it once already (transition #{}), and {} has been left since; \
                             once this attempt ends, running the rollout again starts a new one",
                            t.id, self.target
                        )),
                    ));
                }
            }
        }
        self.progress.say(i, format!("{} soaking", self.target));
        // Switched here now, or found soaking: then ours if the survey says.
        let ours = !soaking || self.ours[i];
        let soaking = |left: Duration| {
            self.progress.soak(
                i,
                format!(
                    "{} soaking: {} left",
                    self.target,
                    render::seconds(left.as_millis() as u64)
                ),
            );
        };
        let verdict = follow::until_permanent(
            &node.agent,
            &self.target,
            after,
            Some(self.settings.timeout),
            &soaking,
        );
        tokio::select! {
            verdict = verdict => match verdict {
                Ok(_) => Ok(base),
                Err(f) => {
                    let e = StepError::from_failure(f);
                    // Rolled back by the health gate: not active any more.
                    Err(error(ours && !e.soak, e))
                }
            },
            _ = halted.wait_for(|h| *h) => Err((ours, SwitchError {
                error: StepError::local("the rollout halted".into()),
                halted: true,
            })),
        }
    }

    /// The id of the newest transition, to tell a replayed switch (an
    /// outcome recorded in an earlier run) from one done now.
    async fn last_transition(&self, node: &Node) -> Result<u64, StepError> {
        Ok(last_transitions(node, 1).await?.last().map_or(0, |t| t.id))
    }

    /// Rolls agent `i` back from the target: `Some(version)` it went back
    /// to, `None` if the target was not active any more.
    async fn roll_back(&self, i: usize, why: &str) -> Result<Option<String>, StepError> {
        let node = &self.nodes[i];
        self.progress.say(i, "rolling back");
        let request = pb::RollbackRequest {
            state: pb::StateSource::Migrate.into(),
            request_id: self.request_id(Step::Rollback, i),
            expected_active: self.target.clone(),
            reason: format!("rollout {} halted: {why}", self.rollout_id),
            lease: self.rollout_id.clone(),
            ..Default::default()
        };
        match node
            .agent
            .call("rollback", request, |mut c, r| async move {
                c.rollback(r).await
            })
            .await
        {
            Ok(reply) => Ok(reply.transition.map(|t| t.to_version)),
            Err(Failure::Failed {
                reason: Some(reason),
                ..
            }) if reason == EXPECTED_ACTIVE_MISMATCH => Ok(None),
            Err(f) => Err(StepError::from_failure(f)),
        }
    }

    /// After a halt or a stop: removes the release from the agents where
    /// this run staged it and that never switched to it, unless
    /// `--keep-staged`.
    async fn clean_up(&self, tracks: &mut [Track], leases: &Leases<'_>) {
        if self.settings.keep_staged {
            return;
        }
        let never: Vec<usize> = (0..tracks.len())
            .filter(|&i| {
                self.staged_here[i] && !self.ours[i] && !self.switched[i] && !self.canaried[i]
            })
            .collect();
        remove_staged(
            self.nodes,
            &never,
            &self.target,
            &self.rollout_id,
            |i| self.request_id(Step::Remove, i),
            tracks,
            leases,
        )
        .await;
    }

    /// Every agent's active release now, for the summary.
    async fn read_after(&self, tracks: &mut [Track]) {
        let now = join_all(self.nodes.iter().map(|n| status(&n.agent))).await;
        for (track, status) in tracks.iter_mut().zip(now) {
            track.after = status.ok().map(|s| s.active_version);
        }
    }

    fn reason(&self) -> String {
        self.settings
            .reason
            .clone()
            .unwrap_or_else(|| format!("rollout {}", self.rollout_id))
    }
}

/// Whether switching from `from` to `to` is a downgrade (else an
/// upgrade: the agent refuses it if it is not one).
fn downward(from: &str, to: &str) -> bool {
    match (semver::Version::parse(from), semver::Version::parse(to)) {
        (Ok(from), Ok(to)) => to < from,
        _ => false,
    }
}

/// `request` as an Upgrade, or a Downgrade if `down`.
async fn transition(
    node: &Node,
    down: bool,
    what: &str,
    request: pb::TransitionRequest,
) -> Result<pb::TransitionReply, Failure> {
    if down {
        node.agent
            .call(
                what,
                request,
                |mut c, r| async move { c.downgrade(r).await },
            )
            .await
    } else {
        node.agent
            .call(what, request, |mut c, r| async move { c.upgrade(r).await })
            .await
    }
}

/// Removes `version` from the agents `never` (where a rollout that halted
/// or was undone staged it and never switched to it), each track saying
/// what became of it there.
async fn remove_staged(
    nodes: &[Node],
    never: &[usize],
    version: &str,
    rollout: &str,
    request_id: impl Fn(usize) -> String,
    tracks: &mut [Track],
    leases: &Leases<'_>,
) {
    if never.is_empty() {
        return;
    }
    leases.update(|r| r.step = "removing the staged release".into());
    let results = join_all(never.iter().map(|&i| {
        let request = pb::RemoveRequest {
            version: version.to_owned(),
            request_id: request_id(i),
            reason: format!("rollout {rollout} did not switch this agent to it"),
            lease: rollout.to_owned(),
            ..Default::default()
        };
        nodes[i].agent.call(
            "removing the staged release",
            request,
            |mut c, r| async move { c.remove(r).await },
        )
    }))
    .await;
    for (&i, result) in never.iter().zip(results) {
        tracks[i].cleanup = Some(match result {
            Ok(_) => format!("removed the staged {version}"),
            Err(Failure::Failed {
                reason: Some(reason),
                ..
            }) if reason == PERMISSION_DENIED => {
                format!("{version} left staged: removing a release needs the admin role")
            }
            Err(f) => format!(
                "{version} left staged: {}",
                StepError::from_failure(f).error
            ),
        });
    }
}

/// Drops the canary of `version` on `node` if it still serves there: a
/// rollback, which with a canary drops it and does nothing else,
/// conditional on that canary still serving (`expected_canary`: never
/// the active release's rollback, if the canary went meanwhile) beside
/// the release active now (`expected_active`). `Ok(false)` if no canary
/// of `version` runs there (dropped already, by the health gate or by
/// hand): nothing was dropped.
async fn drop_canary(
    node: &Node,
    version: &str,
    request_id: String,
    reason: String,
    rollout: &str,
) -> Result<bool, StepError> {
    let now = status(&node.agent).await.map_err(StepError::from_failure)?;
    if now.canary.as_ref().map(|c| c.version.as_str()) != Some(version) {
        return Ok(false);
    }
    let request = pb::RollbackRequest {
        request_id,
        expected_active: now.active_version,
        reason,
        lease: rollout.to_owned(),
        expected_canary: version.to_owned(),
        ..Default::default()
    };
    match node
        .agent
        .call(
            &format!("dropping the canary of {version}"),
            request,
            |mut c, r| async move { c.rollback(r).await },
        )
        .await
    {
        Ok(_) => Ok(true),
        Err(Failure::Failed {
            reason: Some(reason),
            ..
        }) if reason == EXPECTED_ACTIVE_MISMATCH || reason == EXPECTED_CANARY_MISMATCH => Ok(false),
        // An agent older than `expected_canary` may have had its canary
        // dropped by its health gate between the two calls: the rollback
        // then had none to drop, and was refused as one of the active
        // release (when there is nothing to go back to).
        Err(f) => match status(&node.agent).await {
            Ok(now) if now.canary.as_ref().map(|c| c.version.as_str()) != Some(version) => {
                Ok(false)
            }
            _ => Err(StepError::from_failure(f)),
        },
    }
}

/// How long ago the holder last renewed its lease, or that it expired.
fn expiry(holder: &pb::RolloutRecord) -> String {
    let now = render::now_ms();
    if holder.expires_at_ms <= now {
        format!(
            ", whose lease expired {} ago (its ctl stopped renewing it)",
            render::seconds((now - holder.expires_at_ms) as u64)
        )
    } else {
        format!(", at its {}", or_unknown(&holder.step))
    }
}

fn or_unknown(text: &str) -> &str {
    if text.is_empty() {
        "start"
    } else {
        text
    }
}

/// The agent's `limit` newest transitions (0: all), oldest first.
async fn last_transitions(node: &Node, limit: u32) -> Result<Vec<pb::Transition>, StepError> {
    let history = node
        .agent
        .call(
            "reading the history",
            pb::HistoryRequest {
                limit,
                after_id: None,
            },
            |mut c, r| async move { c.history(r).await },
        )
        .await
        .map_err(StepError::from_failure)?;
    Ok(history.transitions)
}

/// What the survey found on one agent.
struct Survey {
    active: String,
    found: Found,
    ours: bool,
    /// It runs a canary of the target this rollout started.
    canary: bool,
    /// The state version of its active release.
    state_version: u32,
    last_event: u64,
}

/// The release staged on one agent.
struct Staged {
    /// This stage put it there (it was not staged before).
    here: bool,
    /// Its state version, as the agent read it.
    state_version: u32,
}

/// A failed switch, or one cut short by the halt.
struct SwitchError {
    error: StepError,
    halted: bool,
}

fn fail(track: &mut Track, e: StepError) {
    track.outcome = if e.unreachable {
        Outcome::Unreachable
    } else {
        Outcome::Failed
    };
    track.error = Some(e.error);
    track.reason = e.reason;
}

fn not_reached(tracks: &mut [Track], why: &str) {
    for track in tracks.iter_mut().filter(|t| t.outcome == Outcome::Pending) {
        track.outcome = Outcome::NotReached;
        track.error = Some(why.to_owned());
    }
}
