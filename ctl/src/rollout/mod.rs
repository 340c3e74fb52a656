//! `ctl rollout`: one release onto a fleet of agents, the way a careful
//! person would do it by hand, and resumable.
//!
//! 1. *Survey*: every agent's status. One that cannot be reached stops the
//!    rollout before anything is changed anywhere (exit 3).
//! 2. *Stage* the release on every agent that does not run it yet, all of
//!    them before any upgrade: a release one agent refuses (a signature it
//!    does not trust, a full disk) stops the rollout with nothing switched.
//! 3. *Canary*: upgrade one agent and wait for the soak's verdict.
//! 4. *Waves* of `--max-parallel` agents, each upgraded and awaited.
//! 5. On the first failure (a refused upgrade, a failed soak, an agent
//!    lost, a verdict that does not come within `--timeout`): *halt*, and
//!    roll back every agent this rollout switched, in waves of the same
//!    width (exit 4; 3 if some agent could not be reached).
//!
//! Every upgrade is conditional (`expected_active`: the release the survey
//! found) and every command carries a request id derived from the rollout
//! id (`plan::request_id`). The rollout id is derived from the release,
//! the target version and the set of agents, so running the same command
//! again after an interruption resumes it: agents on the target are
//! skipped or awaited, and a command that did reach an agent is answered
//! with its recorded outcome instead of being run twice. `--rollout-id`
//! starts a new rollout of the same release (after a halt, say).

pub mod fleet;
mod plan;
mod progress;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::anyhow;
use futures_util::future::join_all;
use futures_util::stream::{self, StreamExt};
use nine9s_proto as pb;
use serde::Serialize;
use tokio::sync::watch;

use crate::commands::{self, status, Release};
use crate::rpc::Agent;
use crate::{follow, json, render, Failure, Output};
use plan::{Found, Step};
use progress::Progress;

pub use plan::MAX_ROLLOUT_ID;

/// Uploads at once while staging: they are the heavy part of a rollout
/// (a few MB to each agent), and staging changes nothing that serves.
const STAGE_PARALLEL: usize = 8;

/// The reason code of a conditional command whose condition failed.
const EXPECTED_ACTIVE_MISMATCH: &str = "EXPECTED_ACTIVE_MISMATCH";

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
    pub soak: Option<Duration>,
    /// How long one agent's verdict may take.
    pub timeout: Duration,
    pub rollout_id: Option<String>,
    pub reason: Option<String>,
    pub dry_run: bool,
}

/// How the rollout ended for one agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
enum Outcome {
    /// Nothing done yet (and with `--dry-run`, nothing done at all).
    Pending,
    /// The target was already permanent there.
    AlreadyThere,
    /// Upgraded, and permanent after its soak.
    Upgraded,
    /// Its upgrade was refused, or it did not become permanent.
    Failed,
    /// The health gate rolled the target back during its soak.
    FailedSoak,
    /// Upgraded, then rolled back by the halt.
    RolledBack,
    /// The rollout halted before its turn.
    NotReached,
    /// It could not be reached.
    Unreachable,
    /// The halt's rollback of it failed: it may still run the target.
    RollbackFailed,
}

/// One agent in the summary (and the JSON document).
#[derive(Debug, Clone, Serialize)]
struct Track {
    name: String,
    address: String,
    /// The active release when the rollout found it.
    before: Option<String>,
    /// The active release when the rollout ended.
    after: Option<String>,
    outcome: Outcome,
    /// Why it failed, was not reached or was rolled back.
    error: Option<String>,
    /// The agent's reason code with `error`, when it sent one.
    reason: Option<String>,
    /// The request id of its upgrade.
    request_id: String,
    /// This rollout made the target active there (now or in an earlier
    /// run): a halt rolls it back.
    #[serde(skip)]
    ours: bool,
    #[serde(skip)]
    found: Option<Found>,
    /// The last event id when the agent was surveyed.
    #[serde(skip)]
    last_event: u64,
}

/// The document `--output json` prints, and what the summary shows.
#[derive(Debug, Serialize)]
struct Report {
    rollout_id: String,
    version: String,
    sha256: String,
    /// `converged`, `planned` (`--dry-run`), `halted` (and rolled back),
    /// `unreachable` (some agent could not be reached), or `failed` (a
    /// stage was refused, or a rollback failed).
    outcome: &'static str,
    /// The failure that stopped the rollout.
    halted_by: Option<String>,
    /// Indexes into `agents`: the canary, then the waves.
    canary: Option<usize>,
    waves: Vec<Vec<usize>>,
    elapsed_ms: u64,
    /// Where the time went.
    phases: Phases,
    agents: Vec<Track>,
}

/// Milliseconds spent in each phase (0: not reached).
#[derive(Debug, Default, Serialize)]
struct Phases {
    survey_ms: u64,
    stage_ms: u64,
    canary_ms: u64,
    waves_ms: u64,
    rollback_ms: u64,
}

/// The milliseconds since `*since`, which becomes now.
fn lap(since: &mut Instant) -> u64 {
    let ms = u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX);
    *since = Instant::now();
    ms
}

/// A failure of one agent's step.
struct StepError {
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
    let addresses: Vec<&str> = nodes.iter().map(|n| n.address.as_str()).collect();
    let rollout_id = settings
        .rollout_id
        .clone()
        .unwrap_or_else(|| plan::default_rollout_id(&target, &release.sha256, &addresses));
    let progress = Progress::new(nodes.iter().map(|n| n.name.clone()).collect());
    progress.note(&format!(
        "rollout {rollout_id}: {} {target} (sha256 {}) to {} agent(s), waves of {}",
        release.manifest.name,
        render::short_sha(&release.sha256),
        nodes.len(),
        settings.max_parallel
    ));
    let rollout = Rollout {
        nodes: &nodes,
        settings: &settings,
        release: &release,
        signature,
        target,
        rollout_id,
        progress: &progress,
    };
    let mut tracks: Vec<Track> = nodes
        .iter()
        .map(|n| Track {
            name: n.name.clone(),
            address: n.address.clone(),
            before: None,
            after: None,
            outcome: Outcome::Pending,
            error: None,
            reason: None,
            request_id: plan::request_id(&rollout.rollout_id, Step::Upgrade, &n.address),
            ours: false,
            found: None,
            last_event: 0,
        })
        .collect();
    let mut phases = Phases::default();
    let ended = rollout.drive(&mut tracks, &mut phases).await;
    if !settings.dry_run {
        rollout.read_after(&mut tracks).await;
    }
    progress.finish();
    let plan = plan::plan(
        &tracks
            .iter()
            .map(|t| t.found.unwrap_or(Found::Elsewhere))
            .collect::<Vec<_>>(),
        &tracks.iter().map(|t| t.ours).collect::<Vec<_>>(),
        settings.max_parallel,
    );
    let report = Report {
        rollout_id: rollout.rollout_id.clone(),
        version: rollout.target.clone(),
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
        Output::Table => summary(&report),
    }
    ended.into_result(&report)
}

/// How the rollout as a whole ended.
enum Ended {
    Converged,
    Planned,
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
}

impl Ended {
    fn word(&self) -> &'static str {
        match self {
            Ended::Converged => "converged",
            Ended::Planned => "planned",
            Ended::Stopped {
                unreachable: true, ..
            }
            | Ended::Halted {
                unreachable: true, ..
            } => "unreachable",
            Ended::Halted { clean: false, .. } | Ended::Stopped { .. } => "failed",
            Ended::Halted { .. } => "halted",
        }
    }

    fn why(&self) -> Option<&str> {
        match self {
            Ended::Converged | Ended::Planned => None,
            Ended::Stopped { why, .. } | Ended::Halted { why, .. } => Some(why),
        }
    }

    /// The exit: 0 converged, 3 some agent could not be reached, 4 halted
    /// and rolled back, 1 otherwise.
    fn into_result(self, report: &Report) -> Result<(), Failure> {
        let id = &report.rollout_id;
        match self {
            Ended::Converged | Ended::Planned => Ok(()),
            Ended::Stopped {
                why,
                unreachable: true,
            } => Err(Failure::Unreachable(anyhow!(
                "rollout {id} stopped before switching any agent: {why}"
            ))),
            Ended::Stopped { why, .. } => {
                Err(anyhow!("rollout {id} stopped before switching any agent: {why}").into())
            }
            Ended::Halted {
                why,
                unreachable: true,
                ..
            } => Err(Failure::Unreachable(anyhow!(
                "rollout {id} halted: {why}; see the summary for each agent"
            ))),
            Ended::Halted {
                why, clean: true, ..
            } => Err(Failure::RolledBack(anyhow!(
                "rollout {id} halted and rolled back: {why}"
            ))),
            Ended::Halted { why, .. } => Err(anyhow!(
                "rollout {id} halted, and some rollbacks failed: {why}; see the summary"
            )
            .into()),
        }
    }
}

struct Rollout<'a> {
    nodes: &'a [Node],
    settings: &'a Settings,
    release: &'a Release,
    signature: Option<String>,
    target: String,
    rollout_id: String,
    progress: &'a Progress,
}

impl Rollout<'_> {
    async fn drive(&self, tracks: &mut [Track], phases: &mut Phases) -> Ended {
        let mut clock = Instant::now();
        // 1. Survey.
        let surveys = join_all((0..self.nodes.len()).map(|i| self.survey(i))).await;
        let mut lost = Vec::new();
        let mut refused = Vec::new();
        for (track, survey) in tracks.iter_mut().zip(surveys) {
            match survey {
                Ok(found) => {
                    track.before = Some(found.active);
                    track.ours = found.ours;
                    track.last_event = found.last_event;
                    if found.found == Found::Permanent {
                        track.outcome = Outcome::AlreadyThere;
                    }
                    track.found = Some(found.found);
                }
                Err(e) => {
                    let list = if e.unreachable {
                        &mut lost
                    } else {
                        &mut refused
                    };
                    list.push(format!("{}: {}", track.name, e.error));
                    fail(track, e);
                }
            }
        }
        if !lost.is_empty() || !refused.is_empty() {
            let unreachable = !lost.is_empty();
            lost.extend(refused);
            not_reached(
                tracks,
                "the rollout stopped: not every agent could be surveyed",
            );
            return Ended::Stopped {
                why: format!("the survey failed on {}", lost.join("; ")),
                unreachable,
            };
        }
        phases.survey_ms = lap(&mut clock);
        let found: Vec<Found> = tracks.iter().filter_map(|t| t.found).collect();
        let ours: Vec<bool> = tracks.iter().map(|t| t.ours).collect();
        let plan = plan::plan(&found, &ours, self.settings.max_parallel);
        if self.settings.dry_run {
            for (i, track) in tracks.iter().enumerate() {
                self.progress.done(
                    i,
                    format!("found {}", track.before.as_deref().unwrap_or("?")),
                );
            }
            return Ended::Planned;
        }

        // 2. Stage everywhere the target is not active.
        let to_stage: Vec<usize> = (0..tracks.len())
            .filter(|&i| tracks[i].found == Some(Found::Elsewhere))
            .collect();
        let staged: Vec<(usize, Result<(), StepError>)> = stream::iter(to_stage)
            .map(|i| async move { (i, self.stage(i).await) })
            .buffer_unordered(STAGE_PARALLEL)
            .collect()
            .await;
        phases.stage_ms = lap(&mut clock);
        let mut stopped = None;
        for (i, result) in staged {
            if let Err(e) = result {
                let unreachable = e.unreachable;
                let why = format!("staging on {}: {}", tracks[i].name, e.error);
                fail(&mut tracks[i], e);
                let first = stopped.get_or_insert((why, unreachable));
                first.1 |= unreachable;
            }
        }
        if let Some((why, unreachable)) = stopped {
            not_reached(tracks, "the rollout stopped while staging");
            return Ended::Stopped { why, unreachable };
        }

        // 3 and 4. The canary, then the waves, while nothing failed.
        let (halt, _) = watch::channel(false);
        let mut failure: Option<(String, bool)> = None;
        let order = plan.canary.map(|c| vec![c]).into_iter().chain(plan.waves);
        for (n, wave) in order.enumerate() {
            if n == 0 && plan.canary.is_some() {
                self.progress
                    .note(&format!("canary: {}", tracks[wave[0]].name));
            }
            let results = join_all(wave.iter().map(|&i| {
                let track = &tracks[i];
                let (found, last_event, before, ours) = (
                    track.found,
                    track.last_event,
                    track.before.clone(),
                    track.ours,
                );
                let halt = &halt;
                async move {
                    let result = self.switch(i, found, ours, last_event, before, halt).await;
                    if let Err(e) = &result {
                        if !e.1.halted {
                            halt.send_replace(true);
                        }
                    }
                    (i, result)
                }
            }))
            .await;
            for (i, result) in results {
                let track = &mut tracks[i];
                match result {
                    Ok(()) => {
                        track.ours = true;
                        track.outcome = Outcome::Upgraded;
                        self.progress
                            .done(i, format!("{} is permanent", self.target));
                    }
                    Err((ours, e)) => {
                        track.ours |= ours;
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
            if n == 0 && plan.canary.is_some() {
                phases.canary_ms = lap(&mut clock);
            }
            if failure.is_some() {
                break;
            }
        }
        phases.waves_ms = lap(&mut clock);
        let Some((why, unreachable)) = failure else {
            return Ended::Converged;
        };

        // 5. Halt: everyone this rollout switched goes back.
        self.progress
            .note(&format!("rollout: halted: {why}; rolling back"));
        not_reached(tracks, "the rollout halted before its turn");
        let back: Vec<usize> = (0..tracks.len()).filter(|&i| tracks[i].ours).collect();
        let mut clean = true;
        for wave in back.chunks(self.settings.max_parallel.max(1)) {
            let why = why.as_str();
            let results = join_all(
                wave.iter()
                    .map(|&i| async move { (i, self.roll_back(i, why).await) }),
            )
            .await;
            for (i, result) in results {
                let track = &mut tracks[i];
                match result {
                    Ok(Some(to)) => {
                        track.outcome = Outcome::RolledBack;
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
        phases.rollback_ms = lap(&mut clock);
        Ended::Halted {
            why,
            unreachable,
            clean,
        }
    }

    /// Where agent `i` stands.
    async fn survey(&self, i: usize) -> Result<Survey, StepError> {
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
        // Whether this rollout switched it, in a run that was interrupted:
        // then a halt must roll it back too.
        let ours = found != Found::Elsewhere && {
            let id = plan::request_id(&self.rollout_id, Step::Upgrade, &node.address);
            last_transitions(node, 100)
                .await?
                .iter()
                .any(|t| t.request_id == id)
        };
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
            last_event: status.last_event_id,
        })
    }

    async fn stage(&self, i: usize) -> Result<(), StepError> {
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
            plan::request_id(&self.rollout_id, Step::Stage, &node.address),
            self.reason(),
        );
        commands::stage(&node.agent, self.release, chunks, None)
            .await
            .map_err(StepError::from_failure)?;
        self.progress.say(i, format!("staged {}", self.target));
        Ok(())
    }

    /// Upgrades agent `i` (unless it is soaking already) and waits for the
    /// verdict. `Err` says whether the target was made active there.
    async fn switch(
        &self,
        i: usize,
        found: Option<Found>,
        ours_before: bool,
        mut after: u64,
        before: Option<String>,
        halt: &watch::Sender<bool>,
    ) -> Result<(), (bool, SwitchError)> {
        let node = &self.nodes[i];
        let mut halted = halt.subscribe();
        // An agent found soaking was switched by whoever switched it: this
        // rollout if the survey says so.
        let soaking = found == Some(Found::Soaking);
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
            self.progress
                .say(i, format!("upgrading to {}", self.target));
            let request = pb::TransitionRequest {
                version: self.target.clone(),
                permanence: pb::Permanence::Soak.into(),
                soak_ms: self.settings.soak.map_or(0, |d| d.as_millis() as u64),
                dry_run: false,
                request_id: plan::request_id(&self.rollout_id, Step::Upgrade, &node.address),
                expected_active: before.unwrap_or_default(),
                reason: self.reason(),
                ..Default::default()
            };
            let what = format!("upgrade to {}", self.target);
            let reply = node
                .agent
                .call(&what, request, |mut c, r| async move { c.upgrade(r).await })
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
                            "this rollout upgraded it once already (transition #{}), and {} has been left since; \
                             give a new --rollout-id to roll it out again",
                            t.id, self.target
                        )),
                    ));
                }
            }
        }
        self.progress.say(i, format!("{} soaking", self.target));
        // Switched here now, or found soaking: then ours if the survey says.
        let ours = !soaking || ours_before;
        let verdict = follow::until_permanent(
            &node.agent,
            &self.target,
            after,
            Some(self.settings.timeout),
        );
        tokio::select! {
            verdict = verdict => match verdict {
                Ok(_) => Ok(()),
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

    /// The id of the newest transition, to tell a replayed upgrade (an
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
            dry_run: false,
            request_id: plan::request_id(&self.rollout_id, Step::Rollback, &node.address),
            expected_active: self.target.clone(),
            reason: format!("rollout {} halted: {why}", self.rollout_id),
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

/// The agent's `limit` newest transitions, oldest first.
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
    last_event: u64,
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

/// The table at the end, on stdout.
fn summary(report: &Report) {
    let rows: Vec<[String; 5]> = report
        .agents
        .iter()
        .map(|t| {
            [
                t.name.clone(),
                t.before.clone().unwrap_or_else(|| "?".into()),
                match (&t.after, report.outcome) {
                    (_, "planned") => "-".into(),
                    (Some(after), _) => after.clone(),
                    (None, _) => "?".into(),
                },
                serde_json::to_value(t.outcome)
                    .ok()
                    .and_then(|v| v.as_str().map(|s| s.replace('_', " ")))
                    .unwrap_or_default(),
                t.error.clone().unwrap_or_default(),
            ]
        })
        .collect();
    let header = ["AGENT", "BEFORE", "AFTER", "OUTCOME", "NOTE"];
    let width = |c: usize| {
        rows.iter()
            .map(|r| r[c].chars().count())
            .chain([header[c].len()])
            .max()
            .unwrap_or(0)
    };
    let widths = [width(0), width(1), width(2), width(3)];
    let line = |r: [&str; 5]| {
        let text = format!(
            "{:<w0$}  {:<w1$}  {:<w2$}  {:<w3$}  {}",
            r[0],
            r[1],
            r[2],
            r[3],
            r[4],
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2],
            w3 = widths[3]
        );
        outln!("{}", text.trim_end());
    };
    if report.outcome == "planned" {
        let name = |i: usize| report.agents[i].name.as_str();
        match report.canary {
            Some(c) => outln!("canary: {}", name(c)),
            None => outln!("canary: done in an earlier run"),
        }
        for (n, wave) in report.waves.iter().enumerate() {
            let names: Vec<&str> = wave.iter().map(|&i| name(i)).collect();
            outln!("wave {}: {}", n + 1, names.join(", "));
        }
    }
    line(header);
    for row in &rows {
        line([&row[0], &row[1], &row[2], &row[3], &row[4]]);
    }
    let on_target = report
        .agents
        .iter()
        .filter(|t| t.after.as_deref() == Some(report.version.as_str()))
        .count();
    let took = render::seconds(report.elapsed_ms);
    match report.outcome {
        "converged" => outln!(
            "rollout {}: converged: {} of {} agents run {} (permanent), in {took}",
            report.rollout_id,
            on_target,
            report.agents.len(),
            report.version
        ),
        "planned" => outln!(
            "rollout {}: dry run: nothing was changed",
            report.rollout_id
        ),
        outcome => outln!(
            "rollout {}: {outcome}: {}; {} of {} agents run {}, after {took}",
            report.rollout_id,
            report.halted_by.as_deref().unwrap_or(""),
            on_target,
            report.agents.len(),
            report.version
        ),
    }
}
