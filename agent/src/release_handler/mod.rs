//! The release handler (named after OTP's): the one owner of the release
//! lifecycle. It stages releases, moves them through staged → current →
//! permanent → old (or failed), and drives every switch.
//!
//! Shape: an actor. [`Engine`] is the handle the rest of the agent holds;
//! commands go over a channel to one thread ([`actor`]) that applies them
//! one at a time, asking the pure state machine ([`machine`]) what each may
//! do, doing the work (the [`switch`] executor, the [`catalog`] of staged
//! releases and their artifacts, the [`canary`], [`checkpoint`]s, every
//! call into a release on a lane of [`calls`]), journalling it
//! ([`journal`], which also answers a retried request id) and applying the
//! outcome back to the machine. Events leave on a broadcast. Reads
//! (`status`, `history`, `watch`) never wait for the actor: they read the
//! store and the published [`View`]. The [`soak`] watcher calls plugin
//! health checks outside the actor, with a timeout, and sends verdicts in;
//! the actor acts on them ([`soaking`]). Beside the actor, the engine
//! holds the rollout lease ([`leases`]), which switches nothing.

use std::sync::{mpsc, Arc};

use parking_lot::Mutex;
use std::time::{Duration, Instant};

use nine9s_manifest::{Plan, Version};
use tokio::sync::{broadcast, oneshot};

use crate::config::Config;
use crate::error::{Error, Reason, Result};
use crate::handover::{Outgoing, Preloaded};
use crate::model::{Event, Release, Transition};
use crate::process::FailedRestart;
use crate::runtime::{Counters, Runtime, Split};
use crate::store::Store;

mod actor;
mod boot;
mod calls;
mod canary;
mod catalog;
mod checkpoint;
mod handoff;
mod journal;
mod leases;
mod machine;
mod soak;
mod soaking;
mod switch;

pub(crate) use boot::embedded_sha256;
pub(crate) use catalog::open as open_release;
pub use catalog::{check_service, inspect, Signed, Staging, FREE_SPACE_MARGIN};
pub use machine::{check_states, Direction, Soak};
pub use soak::watch as watch_soaks;

/// When a release installed by a switch becomes permanent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permanence {
    /// After staying healthy for the soak period (`None`: the configured one).
    Soak(Option<Duration>),
    Immediate,
    /// Only by `make_permanent`.
    Never,
}

/// Where the state of a switch's target comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateSource {
    /// Migrated from the running state (a rollback: the snapshot if that
    /// fails).
    Migrate,
    /// The target's own last snapshot.
    Snapshot,
}

/// A command for the engine.
#[derive(Debug)]
pub enum Command {
    /// An upload that passed its checks (`catalog::inspect`).
    Stage(Box<Staging>),
    Switch {
        direction: Direction,
        version: Version,
        permanence: Permanence,
        /// Where the target's state comes from.
        source: StateSource,
        dry_run: bool,
        /// Refused unless this version is the canary (a promotion).
        expected_canary: Option<Version>,
    },
    Rollback {
        source: StateSource,
        dry_run: bool,
        /// Refused unless this version is the canary (a drop of it).
        expected_canary: Option<Version>,
    },
    MakePermanent {
        version: Version,
    },
    Remove {
        version: Version,
    },
    /// Serve `split` of the requests with `version` beside the active
    /// release.
    Canary {
        version: Version,
        split: Split,
    },
}

impl Command {
    /// What it is called, as ctl says it, for messages.
    pub fn name(&self) -> &'static str {
        match self {
            Command::Stage(_) => "stage",
            Command::Switch {
                direction: Direction::Up,
                ..
            } => "upgrade",
            Command::Switch {
                direction: Direction::Down,
                ..
            } => "downgrade",
            Command::Rollback { .. } => "rollback",
            Command::MakePermanent { .. } => "make-permanent",
            Command::Remove { .. } => "remove",
            Command::Canary { .. } => "canary",
        }
    }

    pub fn dry_run(&self) -> bool {
        matches!(
            self,
            Command::Switch { dry_run: true, .. } | Command::Rollback { dry_run: true, .. }
        )
    }

    /// What the command asks for, to tell a retry from another command
    /// reusing its request id.
    fn fingerprint(&self, meta: &Meta) -> String {
        let expected = meta.expected_active.as_ref().map(ToString::to_string);
        let who = meta.identity.as_deref().unwrap_or("-");
        let what = match self {
            Command::Stage(staging) => format!("stage {}", staging.upload.sha256),
            Command::Switch {
                direction,
                version,
                permanence,
                source,
                expected_canary,
                ..
            } => format!(
                "{direction} {version} {permanence:?} {source:?} {expected:?} {expected_canary:?}"
            ),
            Command::Rollback {
                source,
                expected_canary,
                ..
            } => format!("rollback {source:?} {expected:?} {expected_canary:?}"),
            Command::MakePermanent { version } => format!("make-permanent {version} {expected:?}"),
            Command::Remove { version } => format!("remove {version} {expected:?}"),
            Command::Canary { version, split } => format!("canary {version} {split} {expected:?}"),
        };
        // A dry run is another command than the real one: they never share
        // an outcome.
        let what = if self.dry_run() {
            format!("dry run of {what}")
        } else {
            what
        };
        // A request id belongs to its caller: another identity reusing it
        // is refused, never handed the first caller's outcome.
        format!("{what} by {who}")
    }
}

/// What comes with every command.
#[derive(Debug, Clone, Default)]
pub struct Meta {
    /// A retry with the same id gets the recorded outcome.
    pub request_id: Option<String>,
    /// Refuse unless this release is active.
    pub expected_active: Option<Version>,
    /// Recorded in the history.
    pub reason: Option<String>,
    /// After this the client has given up: don't start.
    pub deadline: Option<Instant>,
    /// Who asked; recorded in the history.
    pub identity: Option<String>,
}

/// A plan and what the checks before a switch found.
#[derive(Debug, Clone)]
pub struct PlanReport {
    pub from: Version,
    pub to: Version,
    pub plan: Plan,
    pub checks: Vec<String>,
    /// How the target's state is made, once `load` has decided.
    pub state: Option<CarriedState>,
}

/// Where a switch's target got its state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CarriedState {
    /// None: the target starts fresh.
    Fresh,
    /// The running state, as it is or migrated.
    Running,
    /// The snapshot stored when the target was left; requests served
    /// since are not in it.
    Snapshot {
        taken_at_ms: i64,
        /// Why, when the running state was asked for: a rollback whose
        /// migration down failed.
        fallback: Option<String>,
    },
}

/// What a command did.
#[derive(Debug, Clone)]
pub enum Reply {
    Staged {
        release: Release,
        already_staged: bool,
    },
    /// A switch, a dry run (no transition), make-permanent (no plan), or
    /// nothing at all (`unchanged`).
    Switched {
        transition: Option<Transition>,
        plan: Option<PlanReport>,
        unchanged: bool,
    },
    Removed {
        /// `None` when a retry is answered after the record went.
        release: Option<Release>,
        collected: Vec<String>,
    },
}

/// A library the process holds, for `status`.
#[derive(Debug, Clone)]
pub struct ResidentLibrary {
    pub version: Option<Version>,
    pub path: String,
    pub active: bool,
    pub counters: Counters,
    /// Released, but the process still maps it.
    pub lingering: bool,
}

#[derive(Debug, Clone)]
pub struct Status {
    pub active: Version,
    pub permanent: Option<Version>,
    pub current: Option<Version>,
    pub releases: Vec<Release>,
    pub libraries: Vec<ResidentLibrary>,
    pub uptime: Duration,
    pub soak: Soak,
    pub soak_remaining: Duration,
    pub running: Option<Transition>,
    pub last_event_id: u64,
    pub store_error: Option<String>,
    pub last_checkpoint_ms: Option<i64>,
}

/// What the actor publishes for readers after every change.
#[derive(Debug, Clone)]
struct View {
    soak: Soak,
    store_error: Option<String>,
    /// When the last checkpoint was written (epoch ms).
    last_checkpoint_ms: Option<i64>,
}

/// What the actor and the readers share.
struct Shared {
    config: Config,
    journal: journal::Journal,
    runtime: Arc<Runtime>,
    service: String,
    started: Instant,
    started_at_ms: i64,
    view: Mutex<View>,
    leases: leases::Leases,
}

impl Shared {
    fn view(&self) -> View {
        self.view.lock().clone()
    }

    fn store(&self) -> &Store {
        &self.journal.store
    }
}

/// A job for the actor.
enum Job {
    Command {
        command: Command,
        meta: Meta,
        reply: oneshot::Sender<Result<Reply>>,
    },
    /// The soak watcher's look at the soaking release.
    Soak(soak::Verdict),
    /// The soak watcher found the canary unhealthy.
    CanaryFailed(soak::CanaryFailure),
    Checkpoint,
    /// Final checkpoint, clean-stop mark, and the actor ends; with a
    /// socket, the state is handed over on it first (a self-upgrade).
    Stop {
        done: oneshot::Sender<Result<(), FinalCheckpoint>>,
        handover: Option<Outgoing>,
    },
}

/// Why the final checkpoint of a stop was not taken.
#[derive(Debug)]
pub enum FinalCheckpoint {
    /// Requests were still in flight: the last periodic checkpoint stands.
    Busy,
    /// The snapshot or the store failed: what was served since the last
    /// checkpoint is lost.
    Failed(String),
}

/// The handle on the engine: cheap to clone, usable from any thread.
#[derive(Clone)]
pub struct Engine {
    jobs: mpsc::Sender<Job>,
    shared: Arc<Shared>,
}

impl Engine {
    /// Opens the data directory, starts the release the node should run
    /// (or adopts `preloaded`, the instance a self-upgrade's new worker
    /// already serves, if that is it), and starts the actor thread.
    /// Blocking: run it off the async threads.
    pub fn start(
        config: Config,
        tokio: tokio::runtime::Handle,
        preloaded: Option<Preloaded>,
    ) -> Result<Engine> {
        let booted = boot::boot(config, preloaded)?;
        let failed_restart = booted.config.failed_restart.clone();
        let leases = leases::Leases::load(&booted.journal.store)?;
        let shared = Arc::new(Shared {
            config: booted.config,
            journal: booted.journal,
            runtime: booted.runtime,
            service: booted.service,
            started: Instant::now(),
            started_at_ms: crate::model::now_ms(),
            view: Mutex::new(View {
                soak: Soak::Idle,
                store_error: None,
                last_checkpoint_ms: None,
            }),
            leases,
        });
        let (jobs, inbox) = mpsc::channel();
        let actor = actor::Actor::new(
            Arc::clone(&shared),
            booted.artifacts,
            booted.lifecycle,
            tokio,
        );
        actor.collect_garbage()?;
        actor.write_hint();
        std::thread::Builder::new()
            .name("nine9s-engine".into())
            .spawn(move || actor.run(inbox))
            .map_err(Error::io("cannot start the engine thread"))?;
        let engine = Engine { jobs, shared };
        if let Some(failed) = failed_restart {
            engine.restart_failed(failed);
        }
        Ok(engine)
    }

    /// A self-upgrade failed (the supervisor says so): remembered for
    /// `AgentInfo`, logged, and recorded as an event.
    pub fn restart_failed(&self, failed: FailedRestart) {
        let message = failed.message();
        tracing::error!(pid = failed.pid, "{message}; this worker goes on serving");
        crate::process::set_failed_restart(failed);
        self.shared
            .journal
            .emit(Event::new(crate::model::EventKind::AgentRestartFailed).message(message));
    }

    pub fn runtime(&self) -> &Arc<Runtime> {
        &self.shared.runtime
    }

    pub fn config(&self) -> &Config {
        &self.shared.config
    }

    /// The transitions' metrics, counted as they are committed.
    pub fn transitions(&self) -> &crate::metrics::Transitions {
        self.shared.journal.transitions()
    }

    pub fn service(&self) -> &str {
        &self.shared.service
    }

    pub fn started_at_ms(&self) -> i64 {
        self.shared.started_at_ms
    }

    /// Runs a command on the actor and waits for its outcome. If the
    /// caller stops waiting (its client went away), a command not yet
    /// started never starts.
    pub async fn command(&self, command: Command, meta: Meta) -> Result<Reply> {
        let (reply, outcome) = oneshot::channel();
        self.send(Job::Command {
            command,
            meta,
            reply,
        })?;
        outcome.await.map_err(|_| stopped())?
    }

    fn send(&self, job: Job) -> Result<()> {
        self.jobs.send(job).map_err(|_| stopped())
    }

    /// Asks for a checkpoint of the active state (skipped, with a warning
    /// and an event, if requests do not quiesce in time).
    pub fn checkpoint(&self) {
        let _ = self.send(Job::Checkpoint);
    }

    /// Stops the engine: a final checkpoint (the last one stands if it
    /// cannot be taken), the store marked as stopped cleanly. With
    /// `handover`, the state checkpointed goes to the new worker on it
    /// first, if this worker serves the permanent release. Waits at most
    /// `within` for the actor (it may be in a transition): `None` if it
    /// did not stop in time, else how the final checkpoint went.
    pub async fn stop(
        &self,
        within: Duration,
        handover: Option<Outgoing>,
    ) -> Option<Result<(), FinalCheckpoint>> {
        let (done, finished) = oneshot::channel();
        self.send(Job::Stop { done, handover }).ok()?;
        tokio::time::timeout(within, finished).await.ok()?.ok()
    }

    pub fn releases(&self) -> Result<Vec<Release>> {
        Ok(self.shared.store().releases()?)
    }

    /// Without `after_id`: the last `limit` transitions (0: all). With it:
    /// up to `limit` after it, and whether more follow.
    pub fn history(&self, after_id: Option<u64>, limit: usize) -> Result<(Vec<Transition>, bool)> {
        let store = self.shared.store();
        Ok(match after_id {
            Some(after) => store.history_after(after, limit)?,
            None => (store.history(limit)?, false),
        })
    }

    /// Subscribes to new events; `events_after` gives the ones before.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.shared.journal.subscribe()
    }

    pub fn events_after(&self, after_id: u64, limit: usize) -> Result<Vec<Event>> {
        Ok(self.shared.store().events_after(after_id, limit)?)
    }

    pub fn status(&self) -> Result<Status> {
        let store = self.shared.store();
        let releases = store.releases()?;
        let resident = self.shared.runtime.resident();
        let active = resident
            .first()
            .map(|l| l.version.clone())
            .unwrap_or_else(|| Version::new(0, 0, 0));
        let mut libraries: Vec<ResidentLibrary> = resident
            .iter()
            .enumerate()
            .map(|(i, l)| ResidentLibrary {
                version: Some(l.version.clone()),
                path: l.instance.library().path().display().to_string(),
                active: i == 0,
                counters: l.counters(),
                lingering: false,
            })
            .collect();
        for path in nine9s_host::lingering() {
            let sha = path
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or_default();
            libraries.push(ResidentLibrary {
                version: releases
                    .iter()
                    .find(|r| r.sha256 == sha)
                    .map(|r| r.version.clone()),
                path: path.display().to_string(),
                active: false,
                counters: Counters::default(),
                lingering: true,
            });
        }
        let view = self.shared.view();
        let soak_remaining = match &view.soak {
            Soak::Soaking { until_ms, .. } => {
                Duration::from_millis((until_ms - crate::model::now_ms()).max(0) as u64)
            }
            _ => Duration::ZERO,
        };
        let find = |state| {
            releases
                .iter()
                .find(|r| r.state == state)
                .map(|r| r.version.clone())
        };
        Ok(Status {
            active,
            permanent: find(crate::model::ReleaseState::Permanent),
            current: find(crate::model::ReleaseState::Current),
            libraries,
            uptime: self.shared.started.elapsed(),
            soak: view.soak,
            soak_remaining,
            running: self.shared.journal.running(),
            last_event_id: store.last_event_id()?,
            store_error: view.store_error,
            last_checkpoint_ms: view.last_checkpoint_ms,
            releases,
        })
    }
}

fn stopped() -> Error {
    Error::refused(Reason::ShuttingDown, "the agent is shutting down")
}
