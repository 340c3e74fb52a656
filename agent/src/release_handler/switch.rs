//! The switch executor: walks a plan's steps in order.
//!
//! `load` opens and checks the target library, then rehearses on a trial
//! instance — the state migrated from a copy of the live state, `init`,
//! every hook placed before `switch`, the health check — on a thread of its
//! own with a time limit, so nothing about the switch is tried for the
//! first time while requests are held. `switch` holds new requests only for
//! snapshot → migrate → restore → swap, and that plugin code gets
//! `--gate-timeout` at most: past it the switch is abandoned and the gate
//! reopens on the instance that served. Hooks after `switch` run on the
//! serving instance; `drain` waits for the old instance to be released and
//! `unload` drops it (its `stop`, `destroy` and `dlclose`, within
//! [`super::calls::STOP_TIMEOUT`]; the host checks its library is unmapped). A dry run
//! is the disposable rehearsal alone, with every hook of the plan tried on
//! its trial instance: the serving worker never maps the target.
//!
//! Every call into a release's code runs on the engine's plugin-call lane
//! with a deadline ([`super::calls`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use sha2::Digest as _;
use std::time::Duration;

use nine9s_host::{CallError, Library};
use nine9s_manifest::{Step, Version};

use super::actor::Actor;
use super::calls::{watch_wedged, Called, REHEARSAL_TIMEOUT};
use super::handoff::{carry_between, restore_carry, unrestorable, Carry};
use super::{CarriedState, PlanReport, StateSource};
use crate::error::{Error, Reason, Result};
use crate::failpoint::crash_point;
use crate::model::{now_ms, Release, Snapshot};
use crate::probe::{Carried, Failure, Rehearsal, Report, Stage};
use crate::runtime::{drain, Loaded, SwitchError};

/// A switch that happened.
pub(super) struct Executed {
    /// How long new requests were held at the switch.
    pub wait: Duration,
    /// The snapshots could not be stored: the switch stands, but the store
    /// is failing.
    pub unrecorded: Option<crate::store::StoreError>,
    /// Calls into the old instance stuck past the request timeout: not
    /// waited for, still holding their threads.
    pub abandoned: u64,
    /// The instance that served before, to drain and unload.
    old: Arc<Loaded>,
    /// The sha256 of the old instance's state as the switch took it, for
    /// a service whose requests under way may still change it (see
    /// `PluginCalls::retire`).
    left: Option<[u8; 32]>,
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
    /// A dry run: every check that needs no traffic, all in the disposable
    /// process. A dry run changes nothing, so the serving worker never maps
    /// the target nor runs its code: the rehearsal's report is the dry
    /// run's, and a step the release fails there fails the dry run as the
    /// same step of the trial here fails a switch.
    pub(super) fn rehearse(
        &self,
        target: &Release,
        source: StateSource,
        mut report: PlanReport,
    ) -> Result<PlanReport> {
        let active = self.shared.runtime.active();
        let hooks = hooks(&report.plan.steps, ..);
        let (restored, rehearsal) = self.disposable(&active, target, source, &report, &hooks)?;
        let rehearsed = match rehearsal {
            Rehearsal::Passed(rehearsed) => rehearsed,
            Rehearsal::Failed(failure) => {
                return Err(failed(&active, target, restored.as_ref(), failure))
            }
            Rehearsal::Hung(why) => return Err(hung(target, why)),
            Rehearsal::Inconclusive(why) => {
                return Err(Error::refused(
                    Reason::Internal,
                    format!("cannot rehearse {}: {why}", target.version),
                ))
            }
        };
        let library = &rehearsed.library;
        super::catalog::recorded_as(target, &library.name, &library.version)?;
        report.checks.push(disposable_check(library));
        let restored = restored.as_ref();
        describe(library, restored, &rehearsed.carried, &mut report);
        let check = trial_check(restored, &rehearsed.carried, &hooks);
        report.checks.push(check);
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
        let before = hooks(&steps, ..switch_at);
        let rehearsed = self.rehearse_disposable(&active, target, source, report, &before)?;
        report.checks.extend(rehearsed);
        let loaded = self.load(&active, target, source, report)?;
        let library = Report {
            abi: loaded.library.abi_version(),
            name: loaded.library.name().to_owned(),
            version: loaded.library.version().to_owned(),
            state_version: loaded.library.state_version(),
        };
        let (restored, carried) = (loaded.snapshot.as_ref(), loaded.carry.carried());
        describe(&library, restored, &carried, report);
        self.trial(&active, target, &loaded, &before)?;
        report.checks.push(trial_check(restored, &carried, &before));
        crash_point("switch:loaded");

        let carry = loaded.carry;
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
            let fresh = Arc::clone(&library);
            let instance = match self
                .calls
                .call(REHEARSAL_TIMEOUT, move || fresh.instantiate(None))?
            {
                Called::Done(made) => made.map_err(|e| plugin_error(&target.version, "init", e))?,
                Called::Expired(_) => {
                    return Err(plugin_error(
                        &target.version,
                        "init",
                        CallError::Failed(format!(
                            "did not return within {} s",
                            REHEARSAL_TIMEOUT.as_secs()
                        )),
                    ))
                }
            };
            let next = Loaded::new(target.version.clone(), target.blocking, instance);
            Ok(self.tokio.block_on(
                self.shared
                    .runtime
                    .replace(next, self.shared.config.quiesce_timeout),
            ))
        } else {
            let gate_timeout = self.shared.config.gate_timeout;
            self.tokio.block_on(self.shared.runtime.switch(
                self.shared.config.quiesce_timeout,
                |old| {
                    let closed_at = std::time::Instant::now();
                    // First the old instance's snapshot, on its own: if it
                    // overruns, the serving instance is the one watched.
                    let left = if old.snapshotting() {
                        // An earlier snapshot of it never came back.
                        Err(plugin_error(
                            &old.version,
                            "snapshot",
                            CallError::Failed("an earlier snapshot of it has not returned".into()),
                        ))
                    } else {
                        let serving = Arc::clone(old);
                        match self.calls.call(gate_timeout, move || serving.take_snapshot())? {
                            Called::Done(left) => {
                                left.map_err(|e| plugin_error(&old.version, "snapshot", e))
                            }
                            Called::Expired(late) => {
                                watch_wedged(old, late);
                                Err(plugin_error(
                                    &old.version,
                                    "snapshot",
                                    CallError::Failed(overran(gate_timeout, &old.version)),
                                ))
                            }
                        }
                    };
                    // Restoring the stored snapshot needs nothing of the
                    // release being left: a failing snapshot of it is only
                    // not kept.
                    let left = match (&snapshot_source, left) {
                        (_, Ok(left)) => Some(left),
                        (Some(_), Err(e)) => {
                            tracing::warn!(error = %e, "the release being left cannot be snapshotted; restoring the stored snapshot anyway");
                            None
                        }
                        (None, Err(e)) => return Err(e),
                    };
                    let left_at = now_ms();
                    let old_snapshot = |bytes| Snapshot {
                        version: old.version.clone(),
                        state_version: old.instance.library().state_version(),
                        taken_at_ms: left_at,
                        bytes,
                    };
                    // The state that crosses; without a stored one, it is
                    // the old snapshot itself, lent to the migration and
                    // kept once it comes back (no copy behind the gate).
                    let (state, state_is_left) = match snapshot_source {
                        Some(stored) => {
                            taken.extend(left.map(old_snapshot));
                            (stored.bytes, false)
                        }
                        None => (left.unwrap_or_default(), true),
                    };
                    // Then the migration and the new instance, within what
                    // is left of the gate's time.
                    let (carry, library, target) =
                        (carry.clone(), Arc::clone(&library), target.clone());
                    let to = target.version.clone();
                    let migrator = carry.migrator(&to);
                    let migrated_yet = Arc::new(AtomicBool::new(false));
                    let migrated_flag = Arc::clone(&migrated_yet);
                    let restore = move || -> Result<(Loaded, Option<Snapshot>, Vec<u8>)> {
                        let migrated = carry.apply(&state).map_err(|e| {
                            plugin_error(&carry.migrator(&target.version), "state migration", e)
                        })?;
                        migrated_flag.store(true, Ordering::SeqCst);
                        crash_point("switch:quiesced");
                        let instance = library
                            .instantiate(migrated.as_deref())
                            .map_err(|e| plugin_error(&target.version, "init", e))?;
                        // The new release's starting state is durable with the
                        // transition too: should it be permanent when the agent
                        // dies, a restart restores this, not nothing.
                        let start = migrated.filter(|_| library.state_version() != 0).map(|bytes| {
                            Snapshot {
                                version: target.version.clone(),
                                state_version: library.state_version(),
                                taken_at_ms: now_ms(),
                                bytes,
                            }
                        });
                        let next = Loaded::new(target.version.clone(), target.blocking, instance);
                        Ok((next, start, state))
                    };
                    let left_time = gate_timeout.saturating_sub(closed_at.elapsed());
                    match self.calls.call(left_time, restore)? {
                        Called::Done(restored) => {
                            let (next, start, state) = restored?;
                            if state_is_left {
                                taken.push(old_snapshot(state));
                            }
                            taken.extend(start);
                            Ok(next)
                        }
                        // Not the serving instance's code: nothing to watch.
                        Called::Expired(_) => {
                            let (whose, during) = if migrated_yet.load(Ordering::SeqCst) {
                                (&to, "init")
                            } else {
                                (&migrator, "state migration")
                            };
                            Err(plugin_error(
                                whose,
                                during,
                                CallError::Failed(overran(gate_timeout, &old.version)),
                            ))
                        }
                    }
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
        let left = taken
            .iter()
            .find(|s| s.version == switched.old.version)
            .filter(|_| switched.old.is_service())
            .map(|s| sha2::Sha256::digest(&s.bytes).into());
        Ok(Executed {
            left,
            wait: switched.wait,
            unrecorded: stored.err(),
            abandoned: switched.old.stuck(),
            old: switched.old,
            rest: steps[switch_at + 1..].to_vec(),
        })
    }

    /// The steps after `switch`, once the switch is committed: hooks on the
    /// serving instance, `drain` and `unload` of the old one.
    pub(super) fn finish_plan(&self, executed: Executed, report: &mut PlanReport) {
        // A service's old instance drains and unloads in the background:
        // its streams may run for --drain-timeout.
        let service = executed.old.is_service();
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
                Step::Drain | Step::Unload if service => {}
                Step::Drain => {
                    if let Some(old) = &old {
                        self.tokio
                            .block_on(drain(old, self.shared.config.drain_grace));
                    }
                }
                Step::Unload => self.calls.unload(old.take()),
                // Never after `switch` (the manifest refuses such a plan).
                Step::Load | Step::Migrate | Step::Switch => {}
            }
        }
        match old {
            // Its requests and streams under way finish on the old code up
            // to --drain-timeout whatever the plan says: a plan without
            // `drain` must not cut a client off mid-response.
            Some(old) if service => {
                let config = &self.shared.config;
                self.calls.retire(
                    &self.tokio,
                    old,
                    executed.left,
                    config.drain_timeout,
                    config.drain_grace,
                );
            }
            // A plan without `unload` still lets the old release go.
            old => self.calls.unload(old),
        }
    }

    /// Runs a hook on the serving instance, on the plugin thread with the
    /// rehearsal's time limit: the switch is done, a hook that hangs must
    /// not hold the engine.
    fn hook_after_switch(&self, name: &str) -> Result<()> {
        let serving = self.shared.runtime.active();
        let hook = name.to_owned();
        let called = self.calls.call(REHEARSAL_TIMEOUT, move || {
            serving
                .instance
                .hook(&hook)
                .map_err(|e| plugin_error(&serving.version, "hook", e))
        })?;
        match called {
            Called::Done(done) => done,
            Called::Expired(_) => Err(Error::refused(
                Reason::Internal,
                format!("it did not finish within {} s", REHEARSAL_TIMEOUT.as_secs()),
            )),
        }
    }

    /// The rehearsal in a disposable process before a switch maps the
    /// target: a crash or a hang there fails the switch, the serving worker
    /// untouched; an error the release returns is left for the trial here
    /// to report as it always has.
    fn rehearse_disposable(
        &self,
        active: &Arc<Loaded>,
        target: &Release,
        source: StateSource,
        report: &PlanReport,
        hooks: &[String],
    ) -> Result<Vec<String>> {
        match self.disposable(active, target, source, report, hooks)?.1 {
            Rehearsal::Passed(rehearsed) => Ok(vec![disposable_check(&rehearsed.library)]),
            Rehearsal::Failed(failure) => {
                tracing::info!(%failure, "the release failed its disposable rehearsal");
                Ok(Vec::new())
            }
            Rehearsal::Inconclusive(why) => {
                tracing::info!(%why, "the disposable rehearsal could not try the release");
                Ok(Vec::new())
            }
            Rehearsal::Hung(why) => Err(hung(target, why)),
        }
    }

    /// Runs the rehearsal in a disposable process (`probe::rehearse`): what
    /// the trial below does, with a copy of the state the switch would
    /// carry. Returns the stored snapshot it restored (when the switch
    /// restores one, its bytes taken) and how it went; `Err` for a crash
    /// there, or what the `load` step would refuse before it (an artifact
    /// changed on disk, no snapshot to restore).
    fn disposable(
        &self,
        active: &Arc<Loaded>,
        target: &Release,
        source: StateSource,
        report: &PlanReport,
        hooks: &[String],
    ) -> Result<(Option<Snapshot>, Rehearsal)> {
        // The disposable process opens it by path: whatever it runs, the
        // serving worker loads only the descriptor it hashes itself.
        let path = self.catalog.verified(target)?;
        let (restored, state) = match source {
            StateSource::Snapshot => {
                let mut snapshot = self.stored_snapshot(target)?;
                let bytes = std::mem::take(&mut snapshot.bytes);
                let state = Some((snapshot.state_version, bytes));
                (Some(snapshot), state)
            }
            StateSource::Migrate if report.plan.steps.contains(&Step::Migrate) => {
                let serving = Arc::clone(active);
                let taken = match self
                    .calls
                    .call(REHEARSAL_TIMEOUT, move || serving.take_snapshot())?
                {
                    Called::Done(taken) => taken,
                    Called::Expired(_) => Err(CallError::Failed(format!(
                        "its snapshot did not finish within {} s",
                        REHEARSAL_TIMEOUT.as_secs()
                    ))),
                };
                let bytes = taken.map_err(|e| plugin_error(&active.version, "snapshot", e))?;
                (
                    None,
                    Some((active.instance.library().state_version(), bytes)),
                )
            }
            StateSource::Migrate => (None, None),
        };
        // Only the target migrates a snapshot of its own (`restore_carry`).
        let active_library = match restored {
            Some(_) => None,
            None => Some(active.instance.library().path().to_owned()),
        };
        let rehearsed = crate::probe::rehearse(
            &path,
            active_library.as_deref(),
            state,
            hooks,
            &crate::datadir::secrets(&self.shared.config),
            REHEARSAL_TIMEOUT,
        );
        match rehearsed {
            Ok(rehearsal) => Ok((restored, rehearsal)),
            Err(crate::probe::ProbeError::Refused(why)) => Err(plugin_error(
                &target.version,
                "disposable rehearsal",
                CallError::Failed(format!("{why}; the serving worker never loaded it")),
            )),
            Err(crate::probe::ProbeError::Failed(why)) => Err(Error::refused(
                Reason::Internal,
                format!("cannot rehearse {}: {why}", target.version),
            )),
        }
    }

    /// The stored snapshot of `target` a switch restores.
    fn stored_snapshot(&self, target: &Release) -> Result<Snapshot> {
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
        let library = self.catalog.open(target)?;
        let snapshot = match source {
            StateSource::Snapshot => Some(self.stored_snapshot(target)?),
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
        let called = self.calls.call(REHEARSAL_TIMEOUT, move || -> Result<()> {
            let plugin = plugin_error;
            let run = || -> Result<()> {
                let state = match stored {
                    Some(bytes) => bytes,
                    None => active
                        .take_snapshot()
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
            run()
        })?;
        match called {
            Called::Done(done) => done,
            Called::Expired(_) => Err(hung(
                target,
                format!(
                    "the trial instance did not finish migrating, starting and checking its health within {} s",
                    REHEARSAL_TIMEOUT.as_secs()
                ),
            )),
        }
    }
}

/// What a call that overran the gate's time says.
fn overran(gate_timeout: Duration, serving: &Version) -> String {
    format!(
        "did not return within the gate's {} ms (--gate-timeout): the switch was abandoned and the gate reopened on {serving}",
        gate_timeout.as_millis()
    )
}

/// A release's code failed (or did not return) during `during`.
fn plugin_error(version: &Version, during: &'static str, source: CallError) -> Error {
    Error::Plugin {
        version: version.clone(),
        during,
        source,
    }
}

/// A rehearsal that did not finish in time: stuck in either release's code.
fn hung(target: &Release, why: String) -> Error {
    plugin_error(&target.version, "rehearsal", CallError::Failed(why))
}

/// A step the release failed in the disposable rehearsal, as the same step
/// of the trial here (or the `load` step before it) says it: the same
/// reason, and the same words.
fn failed(
    active: &Loaded,
    target: &Release,
    restored: Option<&Snapshot>,
    failure: Failure,
) -> Error {
    let during = match failure.during {
        Stage::Open => {
            return Error::refused(
                Reason::LoadFailed,
                format!("cannot load release {}: {}", target.version, failure.error),
            )
        }
        Stage::NoMigration { from, to } => {
            return match restored {
                Some(snapshot) => unrestorable(snapshot, from, to),
                None => Error::NoMigrationPath {
                    from: active.version.clone(),
                    from_state: from,
                    to: target.version.clone(),
                    to_state: to,
                },
            }
        }
        Stage::Migration { by } => {
            let migrator = by.parse().unwrap_or_else(|_| target.version.clone());
            return plugin_error(
                &migrator,
                "state migration",
                CallError::Failed(failure.error),
            );
        }
        Stage::Init => "init",
        Stage::Hook => "hook",
        Stage::Health => "health check",
        Stage::Snapshot => "snapshot",
    };
    plugin_error(&target.version, during, CallError::Failed(failure.error))
}

/// What the rehearsal found the library to be, for the report.
fn disposable_check(library: &Report) -> String {
    format!(
        "rehearsal: {} {} opened, started and checked in a disposable process first",
        library.name, library.version
    )
}

/// What `load` (or, for a dry run, the disposable rehearsal) found, for
/// the report: the library, how the state crosses, and how it is made.
fn describe(
    library: &Report,
    restored: Option<&Snapshot>,
    carried: &Carried,
    report: &mut PlanReport,
) {
    report.state = Some(match (restored, carried) {
        (Some(s), _) => CarriedState::Snapshot {
            taken_at_ms: s.taken_at_ms,
            fallback: None,
        },
        (None, Carried::Fresh) => CarriedState::Fresh,
        (None, Carried::Same | Carried::Migrated { .. }) => CarriedState::Running,
    });
    let checks = &mut report.checks;
    checks.push(format!(
        "library: {} {} loads, ABI v{}",
        library.name, library.version, library.abi
    ));
    checks.push(match restored {
        Some(s) => format!(
            "state: restored from the snapshot of {} taken at {} ms",
            s.version, s.taken_at_ms
        ),
        None => super::handoff::describe(carried),
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

/// The trial's check, saying with what state the trial instance started,
/// in the words of the `state:` check before it.
fn trial_check(restored: Option<&Snapshot>, carried: &Carried, hooks: &[String]) -> String {
    let instance = match (restored, carried) {
        (Some(_), _) => "a trial instance with the restored snapshot",
        (None, Carried::Fresh) => "a trial instance without state",
        (None, Carried::Same) => "a trial instance with a copy of the running state",
        (None, Carried::Migrated { .. }) => "a trial instance with the running state migrated",
    };
    if hooks.is_empty() {
        format!("health: {instance} is healthy")
    } else {
        format!(
            "health: {instance} ran {} and is healthy",
            hooks
                .iter()
                .map(|h| format!("hook:{h}"))
                .collect::<Vec<_>>()
                .join(", ")
        )
    }
}
