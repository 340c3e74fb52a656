//! The switch executor: walks a plan's steps in order.
//!
//! `load` opens and checks the target library, then rehearses on a trial
//! instance — the state migrated from a copy of the live state, `init`,
//! every hook placed before `switch`, the health check — on a thread of its
//! own with a time limit, so nothing about the switch is tried for the
//! first time while requests are held. `switch` holds new requests only for
//! snapshot → migrate → restore → swap. Hooks after `switch` run on the
//! serving instance; `drain` waits for the old instance to be released and
//! `unload` drops it (the host checks its library is unmapped). A dry run
//! stops after the rehearsal, with every hook of the plan tried on the
//! trial instance.

use std::sync::Arc;
use std::time::Duration;

use nine9s_host::{CallError, Library};
use nine9s_manifest::{Step, Version};

use super::actor::Actor;
use super::handoff::{carry_between, restore_carry, Carry};
use super::{PlanReport, StateSource};
use crate::error::{Error, Reason, Result};
use crate::failpoint::crash_point;
use crate::model::{now_ms, Release, Snapshot};
use crate::runtime::{drain, Loaded, SwitchError};

/// Longest a rehearsal (migration, init, hooks and health check on the
/// trial instance) may take before the switch is refused.
pub const REHEARSAL_TIMEOUT: Duration = Duration::from_secs(30);

/// A switch that happened.
pub(super) struct Executed {
    /// How long new requests were held at the switch.
    pub wait: Duration,
    /// The snapshots could not be stored: the switch stands, but the store
    /// is failing.
    pub unrecorded: Option<crate::store::StoreError>,
    /// The instance that served before, to drain and unload.
    old: Arc<Loaded>,
    /// The plan's steps after `switch`.
    rest: Vec<Step>,
}

/// What `load` found: the library and how state will cross.
struct Prepared {
    library: Arc<Library>,
    carry: Carry,
    snapshot: Option<Snapshot>,
}

impl Actor {
    /// A dry run: every check that needs no traffic.
    pub(super) fn rehearse(
        &self,
        target: &Release,
        source: StateSource,
        mut report: PlanReport,
    ) -> Result<PlanReport> {
        let active = self.shared.runtime.active();
        let loaded = self.load(&active, target, source, &report)?;
        describe(&loaded, &mut report.checks);
        let hooks = hooks(&report.plan.steps, ..);
        self.trial(&active, target, &loaded, &hooks)?;
        report.checks.push(trial_check(&hooks));
        Ok(report)
    }

    /// Runs a plan. `Err` means nothing was switched.
    pub(super) fn execute(
        &self,
        target: &Release,
        source: StateSource,
        report: &mut PlanReport,
    ) -> Result<Executed> {
        let active = self.shared.runtime.active();
        let steps = report.plan.steps.clone();
        let switch_at = steps
            .iter()
            .position(|s| *s == Step::Switch)
            .expect("a validated plan has a switch");
        let loaded = self.load(&active, target, source, report)?;
        describe(&loaded, &mut report.checks);
        let before = hooks(&steps, ..switch_at);
        self.trial(&active, target, &loaded, &before)?;
        report.checks.push(trial_check(&before));
        crash_point("switch:loaded");

        let carry = loaded.carry;
        let plugin_error = |version: &Version, during, source| Error::Plugin {
            version: version.clone(),
            during,
            source,
        };
        // The gate: snapshot → migrate → restore → swap. Snapshots are
        // taken under it and stored once it is open again.
        let mut taken = Vec::new();
        let library = Arc::clone(&loaded.library);
        let snapshot_source = loaded.snapshot;
        // A switch from a release that keeps no state, carrying none,
        // holds no request: the new instance is made first and takes new
        // requests at once, and the old one finishes its own calls. (From
        // a release that keeps state, its snapshot must see every call, so
        // that switch closes the gate.)
        let stateless = matches!(carry, Carry::Fresh)
            && snapshot_source.is_none()
            && active.instance.library().state_version() == 0;
        let switched = if stateless {
            crash_point("switch:quiesced");
            let instance = library
                .instantiate(None)
                .map_err(|e| plugin_error(&target.version, "init", e))?;
            let next = Loaded::new(target.version.clone(), target.blocking, instance);
            Ok(self.tokio.block_on(
                self.shared
                    .runtime
                    .replace(next, self.shared.config.quiesce_timeout),
            ))
        } else {
            self.tokio.block_on(self.shared.runtime.switch(
                self.shared.config.quiesce_timeout,
                |old| {
                    let left = old
                        .instance
                        .snapshot()
                        .map_err(|e| plugin_error(&old.version, "snapshot", e));
                    // Restoring the stored snapshot needs nothing of the release
                    // being left: a failing snapshot of it is only not kept.
                    let left = match (&snapshot_source, left) {
                        (_, Ok(left)) => Some(left),
                        (Some(_), Err(e)) => {
                            tracing::warn!(error = %e, "the release being left cannot be snapshotted; restoring the stored snapshot anyway");
                            None
                        }
                        (None, Err(e)) => return Err(e),
                    };
                    let state = match &snapshot_source {
                        Some(stored) => stored.bytes.as_slice(),
                        None => left.as_deref().unwrap_or_default(),
                    };
                    let migrated = carry.apply(state).map_err(|e| {
                        plugin_error(&carry.migrator(&target.version), "state migration", e)
                    })?;
                    if let Some(left) = left {
                        taken.push(Snapshot {
                            version: old.version.clone(),
                            state_version: old.instance.library().state_version(),
                            taken_at_ms: now_ms(),
                            bytes: left,
                        });
                    }
                    crash_point("switch:quiesced");
                    let instance = library
                        .instantiate(migrated.as_deref())
                        .map_err(|e| plugin_error(&target.version, "init", e))?;
                    // The new release's starting state is durable with the
                    // transition too: should it be permanent when the agent
                    // dies, a restart restores this, not nothing.
                    if library.state_version() != 0 {
                        if let Some(start) = migrated {
                            taken.push(Snapshot {
                                version: target.version.clone(),
                                state_version: library.state_version(),
                                taken_at_ms: now_ms(),
                                bytes: start,
                            });
                        }
                    }
                    Ok(Loaded::new(
                        target.version.clone(),
                        target.blocking,
                        instance,
                    ))
                },
            ))
        };
        let switched = switched.map_err(|e| match e {
            SwitchError::Quiesce => Error::QuiesceTimeout {
                version: active.version.clone(),
                timeout_ms: self.shared.config.quiesce_timeout.as_millis() as u64,
            },
            SwitchError::Prepare(e) => e,
        })?;
        // From here on the switch has happened: a store that cannot take
        // the snapshots does not undo it, it is reported with it.
        let store = self.shared.store();
        let stored = taken
            .iter()
            .try_for_each(|snapshot| store.put_snapshot(snapshot));
        // Nothing of the old release may be held here, or it never drains.
        drop((active, carry, library));
        crash_point("switch:switched");
        // The snapshot of the release just left must be durable before the
        // transition is acknowledged.
        let stored = stored.and_then(|()| store.flush());
        Ok(Executed {
            wait: switched.wait,
            unrecorded: stored.err(),
            old: switched.old,
            rest: steps[switch_at + 1..].to_vec(),
        })
    }

    /// The steps after `switch`, once the switch is committed: hooks on the
    /// serving instance, `drain` and `unload` of the old one.
    pub(super) fn finish_plan(&self, executed: Executed, report: &mut PlanReport) {
        let mut old = Some(executed.old);
        for step in &executed.rest {
            match step {
                Step::Hook(name) => {
                    if let Err(e) = self.hook_after_switch(name) {
                        tracing::warn!(hook = %name, error = %e, "hook after the switch failed");
                        report
                            .checks
                            .push(format!("hook {name} after the switch failed: {e}"));
                    }
                }
                Step::Drain => {
                    if let Some(old) = &old {
                        self.tokio
                            .block_on(drain(old, self.shared.config.drain_grace));
                    }
                }
                Step::Unload => drop(old.take()),
                Step::Load | Step::Migrate | Step::Switch => {}
            }
        }
        // A plan without `unload` still lets the old release go.
        drop(old);
    }

    /// Runs a hook on the serving instance, on the plugin thread with the
    /// rehearsal's time limit: the switch is done, a hook that hangs must
    /// not hold the engine.
    fn hook_after_switch(&self, name: &str) -> Result<()> {
        let serving = self.shared.runtime.active();
        let (tx, rx) = std::sync::mpsc::channel();
        let hook = name.to_owned();
        self.plugin_thread.run(Box::new(move || {
            let _ = tx.send(serving.instance.hook(&hook).map_err(|e| Error::Plugin {
                version: serving.version.clone(),
                during: "hook",
                source: e,
            }));
        }))?;
        rx.recv_timeout(REHEARSAL_TIMEOUT).unwrap_or_else(|_| {
            self.plugin_thread.abandon();
            Err(Error::refused(
                Reason::Internal,
                format!("it did not finish within {} s", REHEARSAL_TIMEOUT.as_secs()),
            ))
        })
    }

    /// The `load` step: opens the target library, checks it is the release
    /// recorded, and decides how state crosses.
    fn load(
        &self,
        active: &Arc<Loaded>,
        target: &Release,
        source: StateSource,
        report: &PlanReport,
    ) -> Result<Prepared> {
        let library = super::catalog::open(&self.artifacts, target)?;
        let snapshot = match source {
            StateSource::Snapshot => Some(
                self.shared
                    .store()
                    .last_snapshot(&target.version)?
                    .ok_or_else(|| {
                        Error::refused(
                            Reason::NoSnapshot,
                            format!(
                                "no snapshot of {} to restore; switch with the state migrated instead",
                                target.version
                            ),
                        )
                    })?,
            ),
            StateSource::Migrate => None,
        };
        let carry = match &snapshot {
            Some(s) => restore_carry(&library, s)?,
            None if !report.plan.steps.contains(&Step::Migrate) => Carry::Fresh,
            None => carry_between(active, &library)?,
        };
        Ok(Prepared {
            library,
            carry,
            snapshot,
        })
    }

    /// The rehearsal, on a thread of its own with a time limit: a copy of
    /// the live state migrated, a trial instance started with it, `hooks`
    /// run on it, its health checked. Nothing serving is touched.
    fn trial(
        &self,
        active: &Arc<Loaded>,
        target: &Release,
        loaded: &Prepared,
        hooks: &[String],
    ) -> Result<()> {
        // The live state's copy is taken in the rehearsal too: a snapshot
        // call that hangs must not hold the engine.
        let stored = loaded.snapshot.as_ref().map(|s| s.bytes.clone());
        let active = Arc::clone(active);
        let carry = loaded.carry.clone();
        let library = Arc::clone(&loaded.library);
        let version = target.version.clone();
        let hooks = hooks.to_vec();
        let (tx, rx) = std::sync::mpsc::channel();
        self.plugin_thread.run(Box::new(move || {
            let plugin = |version: &Version, during, source| Error::Plugin {
                version: version.clone(),
                during,
                source,
            };
            let run = || -> Result<()> {
                let state = match stored {
                    Some(bytes) => bytes,
                    None => active
                        .instance
                        .snapshot()
                        .map_err(|e| plugin(&active.version, "snapshot", e))?,
                };
                drop(active);
                let migrated = carry
                    .apply(&state)
                    .map_err(|e| plugin(&carry.migrator(&version), "state migration", e))?;
                let trial = library
                    .instantiate(migrated.as_deref())
                    .map_err(|e| plugin(&version, "init", e))?;
                for hook in &hooks {
                    trial.hook(hook).map_err(|e| plugin(&version, "hook", e))?;
                }
                trial
                    .health()
                    .map_err(|e| plugin(&version, "health check", e))?;
                // A release that cannot save its state could never be
                // checkpointed, nor made permanent.
                if library.state_version() != 0 {
                    trial
                        .snapshot()
                        .map_err(|e| plugin(&version, "snapshot", e))?;
                }
                Ok(())
            };
            let _ = tx.send(run());
        }))?;
        rx.recv_timeout(REHEARSAL_TIMEOUT).unwrap_or_else(|_| {
            // That thread is stuck in plugin code: the next rehearsal gets
            // a new one.
            self.plugin_thread.abandon();
            Err(Error::Plugin {
                version: target.version.clone(),
                during: "rehearsal",
                source: CallError::Failed(format!(
                    "the trial instance did not finish migrating, starting and checking its health within {} s",
                    REHEARSAL_TIMEOUT.as_secs()
                )),
            })
        })
    }
}

/// The thread the engine's own plugin calls (rehearsals, hooks after a
/// switch) run on, with a time limit, kept from one switch to the next (a
/// thread per switch would come and go thousands of times); replaced when
/// a call hangs in plugin code.
#[derive(Default)]
pub(super) struct PluginThread {
    worker: std::cell::RefCell<Option<std::sync::mpsc::Sender<Job>>>,
}

/// One rehearsal, as the thread runs it.
type Job = Box<dyn FnOnce() + Send>;

impl PluginThread {
    pub(super) fn run(&self, job: Job) -> Result<()> {
        let mut worker = self.worker.borrow_mut();
        if worker.is_none() {
            let (tx, rx) = std::sync::mpsc::channel::<Job>();
            std::thread::Builder::new()
                .name("nine9s-plugin-calls".into())
                .spawn(move || {
                    // Ends when the engine lets go of the sender.
                    while let Ok(job) = rx.recv() {
                        job();
                    }
                })
                .map_err(Error::io("cannot start the rehearsal thread"))?;
            *worker = Some(tx);
        }
        let sent = worker.as_ref().map(|tx| tx.send(job));
        if !matches!(sent, Some(Ok(()))) {
            *worker = None;
            return Err(Error::refused(
                Reason::Internal,
                "the rehearsal thread is gone; the next switch starts a new one",
            ));
        }
        Ok(())
    }

    pub(super) fn abandon(&self) {
        self.worker.borrow_mut().take();
    }
}

/// What `load` found, for the report.
fn describe(loaded: &Prepared, checks: &mut Vec<String>) {
    checks.push(format!(
        "library: {} {} loads, ABI v{}",
        loaded.library.name(),
        loaded.library.version(),
        loaded.library.abi_version()
    ));
    checks.push(match &loaded.snapshot {
        Some(s) => format!(
            "state: restored from the snapshot of {} taken at {} ms",
            s.version, s.taken_at_ms
        ),
        None => loaded.carry.describe(),
    });
}

/// The hooks among `steps[range]`, in order.
fn hooks(
    steps: &[Step],
    range: impl std::slice::SliceIndex<[Step], Output = [Step]>,
) -> Vec<String> {
    steps[range]
        .iter()
        .filter_map(|s| match s {
            Step::Hook(name) => Some(name.clone()),
            _ => None,
        })
        .collect()
}

fn trial_check(hooks: &[String]) -> String {
    if hooks.is_empty() {
        "health: a fresh instance with the migrated state is healthy".into()
    } else {
        format!(
            "health: a fresh instance with the migrated state ran {} and is healthy",
            hooks
                .iter()
                .map(|h| format!("hook:{h}"))
                .collect::<Vec<_>>()
                .join(", ")
        )
    }
}
