//! The release handler (named after OTP's): stages releases, moves them
//! through staged → current → permanent → old, and drives every switch.
//!
//! Each operation is a plain blocking function (run it on a blocking
//! thread): it journals the transition in the store before it starts,
//! does the work, and commits the outcome with the release states it
//! changed. One transition runs at a time.
//!
//! A switch follows the release's plan (written in release.toml or
//! derived): load and check the new library, try its `init` (and the state
//! migration) on a copy of the live state, then quiesce, snapshot, migrate,
//! restore, switch, drain and unload. Anything that fails before the switch
//! leaves the old release serving with its state untouched.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nine9s_host::Library;
use nine9s_manifest::{Manifest, Plan, Step, Version};
use tokio::runtime::Handle;

use crate::artifacts::{sha256_hex, Artifacts};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::failpoint::crash_point;
use crate::model::{now_ms, Outcome, Release, ReleaseState, Snapshot, Transition, TransitionKind};
use crate::runtime::{drain, Counters, Loaded, Runtime, SwitchError};
use crate::store::Store;

mod boot;
mod handoff;

use boot::{install, register, resume};
use handoff::{carry_between, plan_for, restore_carry, route_changes, Carry};

/// Fewest requests a soaking release must have served before its error
/// rate counts.
const MIN_REQUESTS_FOR_RATE: u64 = 10;

/// When a release installed by a switch becomes permanent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permanence {
    /// After staying healthy for the soak period (`None`: the configured one).
    Soak(Option<Duration>),
    Immediate,
    /// Only by `make_permanent`.
    Never,
}

/// Where the state of a rollback target comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateSource {
    Migrate,
    Snapshot,
}

/// A plan and what the checks before a switch found.
#[derive(Debug, Clone)]
pub struct PlanReport {
    pub from: Version,
    pub to: Version,
    pub plan: Plan,
    pub checks: Vec<String>,
}

/// The result of a switch (or of a dry run, with no transition).
#[derive(Debug, Clone)]
pub struct Switch {
    pub transition: Option<Transition>,
    pub plan: PlanReport,
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
    pub soak_remaining: Duration,
}

/// A release being soaked before it becomes permanent.
#[derive(Debug, Clone)]
struct Soak {
    version: Version,
    until: Instant,
}

pub struct ReleaseHandler {
    config: Config,
    store: Store,
    artifacts: Artifacts,
    runtime: Arc<Runtime>,
    service: String,
    tokio: Handle,
    started: Instant,
    /// Held for the whole of each transition.
    ops: Mutex<()>,
    soak: Mutex<Option<Soak>>,
}

impl ReleaseHandler {
    /// Opens the data directory and starts the release a node should run:
    /// the permanent one (with its last snapshot), or on an empty data
    /// directory the bootstrap release, installed as permanent. Any
    /// transition the previous run did not finish is recorded as aborted.
    pub fn boot(config: Config, tokio: Handle) -> Result<ReleaseHandler> {
        std::fs::create_dir_all(&config.data_dir).map_err(Error::io(format!(
            "cannot create {}",
            config.data_dir.display()
        )))?;
        let store = Store::open(&config.data_dir.join("db"), config.keep_history)?;
        let artifacts = Artifacts::open(config.data_dir.join("artifacts"))
            .map_err(Error::io("cannot open the artifact store"))?;
        for t in store.abort_running()? {
            tracing::warn!(id = t.id, kind = %t.kind, from = ?t.from, to = ?t.to, "transition interrupted by the previous stop, recorded as aborted");
        }
        let releases = store.releases()?;
        let (loaded, service) = match releases.iter().find(|r| r.state == ReleaseState::Permanent) {
            Some(permanent) => resume(&store, &artifacts, &releases, permanent)?,
            None => install(&store, &artifacts, &config.bootstrap)?,
        };
        let handler = ReleaseHandler {
            runtime: Arc::new(Runtime::new(loaded)),
            config,
            store,
            artifacts,
            service,
            tokio,
            started: Instant::now(),
            ops: Mutex::new(()),
            soak: Mutex::new(None),
        };
        handler.collect_garbage()?;
        Ok(handler)
    }

    pub fn runtime(&self) -> &Arc<Runtime> {
        &self.runtime
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    fn lock_ops(&self) -> MutexGuard<'_, ()> {
        self.ops.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Checks and records a release: the manifest, the digest, and that the
    /// library is a nine9s plugin of the right name and version. Staging the
    /// same version with the same bytes again is a no-op.
    pub fn stage(
        &self,
        manifest_toml: &str,
        sha256: &str,
        bytes: &[u8],
    ) -> Result<(Release, bool)> {
        let manifest = Manifest::parse(manifest_toml)?;
        if manifest.name != self.service {
            return Err(Error::InvalidArtifact(format!(
                "this agent runs the service {:?}; release.toml names {:?}",
                self.service, manifest.name
            )));
        }
        let actual = sha256_hex(bytes);
        if !actual.eq_ignore_ascii_case(sha256) {
            return Err(Error::InvalidArtifact(format!(
                "the upload is corrupt: sha256 {actual} ({} bytes), but the header says {sha256}",
                bytes.len()
            )));
        }
        let _ops = self.lock_ops();
        if let Some(existing) = self.store.release(&manifest.version)? {
            if existing.sha256 == actual && existing.manifest == manifest_toml {
                return Ok((existing, true));
            }
            return Err(Error::Precondition(format!(
                "{} {} is already staged with other contents (sha256 {}); remove it first or give the new build another version",
                manifest.name, manifest.version, existing.sha256
            )));
        }
        let mut t =
            self.store
                .begin(TransitionKind::Stage, None, Some(&manifest.version), false)?;
        crash_point("stage:begun");
        let started = Instant::now();
        match register(
            &self.store,
            &self.artifacts,
            &manifest,
            manifest_toml,
            bytes,
        ) {
            Ok((release, _library)) => {
                crash_point("stage:checked");
                finish(&mut t, started, None);
                self.store.commit(&t, std::slice::from_ref(&release))?;
                tracing::info!(version = %release.version, sha256 = %release.sha256, "release staged");
                Ok((release, false))
            }
            Err(e) => {
                finish(&mut t, started, Some(&e));
                self.store.commit(&t, &[])?;
                Err(e)
            }
        }
    }

    /// Switches to a higher version.
    pub fn upgrade(
        &self,
        version: &Version,
        permanence: Permanence,
        dry_run: bool,
    ) -> Result<Switch> {
        self.switch_to(TransitionKind::Upgrade, version, permanence, dry_run)
    }

    /// Switches to a lower version.
    pub fn downgrade(
        &self,
        version: &Version,
        permanence: Permanence,
        dry_run: bool,
    ) -> Result<Switch> {
        self.switch_to(TransitionKind::Downgrade, version, permanence, dry_run)
    }

    fn switch_to(
        &self,
        kind: TransitionKind,
        version: &Version,
        permanence: Permanence,
        dry_run: bool,
    ) -> Result<Switch> {
        let _ops = self.lock_ops();
        let target = self
            .store
            .release(version)?
            .ok_or_else(|| Error::UnknownVersion(version.clone()))?;
        // Only the version: holding the instance would keep it from draining.
        let active = self.tokio.block_on(self.runtime.active()).version.clone();
        let word = if kind == TransitionKind::Upgrade {
            "upgrade"
        } else {
            "downgrade"
        };
        if target.version == active {
            return Err(Error::Precondition(format!(
                "{} is already the active release",
                target.version
            )));
        }
        let wrong_way = match kind {
            TransitionKind::Upgrade => target.version < active,
            _ => target.version > active,
        };
        if wrong_way {
            let other = if kind == TransitionKind::Upgrade {
                "downgrade"
            } else {
                "upgrade"
            };
            return Err(Error::Precondition(format!(
                "cannot {word} from {} to {}: that is a{} {other}",
                active,
                target.version,
                if other == "upgrade" { "n" } else { "" },
            )));
        }
        self.switch_locked(
            kind,
            target,
            StateSource::Migrate,
            permanence,
            dry_run,
            None,
        )
    }

    /// The transition itself; the caller holds the ops lock.
    fn switch_locked(
        &self,
        kind: TransitionKind,
        target: Release,
        source: StateSource,
        permanence: Permanence,
        dry_run: bool,
        automatic: Option<String>,
    ) -> Result<Switch> {
        let active = self.tokio.block_on(self.runtime.active());
        let from_release = self
            .store
            .release(&active.version)?
            .ok_or_else(|| Error::UnknownVersion(active.version.clone()))?;
        let plan = plan_for(&from_release, &target)?;
        let mut report = PlanReport {
            from: active.version.clone(),
            to: target.version.clone(),
            plan: plan.clone(),
            checks: vec![route_changes(&from_release.routes, &target.routes)],
        };
        let mut transition = if dry_run {
            None
        } else {
            let mut t = self.store.begin(
                kind,
                Some(&active.version),
                Some(&target.version),
                automatic.is_some(),
            )?;
            t.reason = automatic;
            Some(t)
        };
        if !dry_run {
            crash_point("switch:begun");
        }
        let started = Instant::now();
        let span =
            tracing::info_span!("switch", %kind, from = %active.version, to = %target.version);
        let _entered = span.enter();
        let outcome = self.run_plan(active, &target, &plan, source, &mut report, dry_run);
        let Some(mut t) = transition.take() else {
            return outcome.map(|_| Switch {
                transition: None,
                plan: report,
            });
        };
        match outcome {
            Ok(switch_wait) => {
                t.switch_wait_us = switch_wait.as_micros() as u64;
                finish(&mut t, started, None);
                let changed = self.settle(&target.version, permanence)?;
                self.store.commit(&t, &changed)?;
                crash_point("switch:committed");
                self.prune_old()?;
                tracing::info!(
                    duration_us = t.duration_us,
                    switch_wait_us = t.switch_wait_us,
                    "switched"
                );
                Ok(Switch {
                    transition: Some(t),
                    plan: report,
                })
            }
            Err(e) => {
                finish(&mut t, started, Some(&e));
                let mut changed = Vec::new();
                if matches!(e, Error::Load { .. } | Error::Plugin { .. }) {
                    let mut failed = target.clone();
                    failed.state = ReleaseState::Failed;
                    changed.push(failed);
                }
                self.store.commit(&t, &changed)?;
                tracing::error!(error = %e, "switch failed; the previous release keeps serving");
                Err(e)
            }
        }
    }

    /// Runs a plan's steps; returns how long new requests waited on the switch.
    fn run_plan(
        &self,
        active: Arc<Loaded>,
        target: &Release,
        plan: &Plan,
        source: StateSource,
        report: &mut PlanReport,
        dry_run: bool,
    ) -> Result<Duration> {
        let load_error = |source| Error::Load {
            version: target.version.clone(),
            source,
        };
        let plugin_error = |during, source| Error::Plugin {
            version: target.version.clone(),
            during,
            source,
        };
        // Load: open and check the library before anything else.
        let library = Library::open(&self.artifacts.path(&target.sha256)).map_err(load_error)?;
        if library.version() != target.version.to_string() || library.name() != target.name {
            return Err(Error::InvalidArtifact(format!(
                "the library of {} {} says it is {} {}",
                target.name,
                target.version,
                library.name(),
                library.version()
            )));
        }
        report.checks.push(format!(
            "library: {} {} loads, ABI v{}",
            library.name(),
            library.version(),
            nine9s_host::ABI_VERSION
        ));
        let snapshot_source = match source {
            StateSource::Snapshot => {
                Some(self.store.last_snapshot(&target.version)?.ok_or_else(|| {
                    Error::Precondition(format!(
                        "no snapshot of {} to restore; roll back with the state migrated instead",
                        target.version
                    ))
                })?)
            }
            StateSource::Migrate => None,
        };
        let carry = match &snapshot_source {
            Some(s) => restore_carry(&library, s)?,
            None if !plan.steps.contains(&Step::Migrate) => Carry::Fresh,
            None => carry_between(&active, &library)?,
        };
        report.checks.push(match &snapshot_source {
            Some(s) => format!(
                "state: restored from the snapshot of {} taken at {} ms",
                s.version, s.taken_at_ms
            ),
            None => carry.describe(),
        });
        // Try init (and the migration) on a copy of the live state, so a
        // panic there aborts before the switch.
        let trial_state = match &snapshot_source {
            Some(s) => s.bytes.clone(),
            None => active.instance.snapshot().map_err(|e| Error::Plugin {
                version: active.version.clone(),
                during: "snapshot",
                source: e,
            })?,
        };
        let migrated = carry
            .apply(&trial_state)
            .map_err(|e| plugin_error("state migration", e))?;
        let trial = library
            .instantiate(migrated.as_deref())
            .map_err(|e| plugin_error("init", e))?;
        trial
            .health()
            .map_err(|e| plugin_error("health check", e))?;
        drop(trial);
        if !dry_run {
            crash_point("switch:loaded");
        }
        report
            .checks
            .push("health: a fresh instance with the migrated state is healthy".into());
        if dry_run {
            return Ok(Duration::ZERO);
        }

        let switch_at = plan
            .steps
            .iter()
            .position(|s| *s == Step::Switch)
            .expect("validated plan");
        let hooks = |steps: &[Step]| -> Vec<String> {
            steps
                .iter()
                .filter_map(|s| match s {
                    Step::Hook(name) => Some(name.clone()),
                    _ => None,
                })
                .collect()
        };
        let (before, after) = (
            hooks(&plan.steps[..switch_at]),
            hooks(&plan.steps[switch_at..]),
        );
        // Snapshots are taken under the gate, stored once it is open again.
        let mut taken = Vec::new();
        let switched =
            self.tokio
                .block_on(self.runtime.switch(self.config.quiesce_timeout, |old| {
                    let left = old.instance.snapshot().map_err(|e| Error::Plugin {
                        version: old.version.clone(),
                        during: "snapshot",
                        source: e,
                    })?;
                    let state = snapshot_source
                        .as_ref()
                        .map_or(left.as_slice(), |s| s.bytes.as_slice());
                    let migrated = carry
                        .apply(state)
                        .map_err(|e| plugin_error("state migration", e))?;
                    taken.push(Snapshot {
                        version: old.version.clone(),
                        state_version: old.instance.library().state_version(),
                        taken_at_ms: now_ms(),
                        bytes: left,
                    });
                    crash_point("switch:quiesced");
                    let instance = library
                        .instantiate(migrated.as_deref())
                        .map_err(|e| plugin_error("init", e))?;
                    for hook in &before {
                        instance.hook(hook).map_err(|e| plugin_error("hook", e))?;
                    }
                    // The new release's starting state is durable with the
                    // transition too: should it be permanent when the agent
                    // dies, a restart restores this, not nothing.
                    if library.state_version() != 0 {
                        let start = instance
                            .snapshot()
                            .map_err(|e| plugin_error("snapshot", e))?;
                        taken.push(Snapshot {
                            version: target.version.clone(),
                            state_version: library.state_version(),
                            taken_at_ms: now_ms(),
                            bytes: start,
                        });
                    }
                    Ok(Loaded::new(
                        target.version.clone(),
                        target.blocking,
                        instance,
                    ))
                }));
        let switched = switched.map_err(|e| match e {
            SwitchError::Quiesce => Error::QuiesceTimeout {
                version: active.version.clone(),
                timeout_ms: self.config.quiesce_timeout.as_millis() as u64,
            },
            SwitchError::Prepare(e) => e,
        })?;
        for snapshot in &taken {
            self.store.put_snapshot(snapshot)?;
        }
        // Nothing of the old release may be held here, or it never drains.
        drop((active, carry, library));
        crash_point("switch:switched");
        // The snapshot of the release just left must be durable before the
        // transition is acknowledged.
        self.store.flush()?;
        let new = self.tokio.block_on(self.runtime.active());
        for hook in &after {
            if let Err(e) = new.instance.hook(hook) {
                tracing::warn!(hook, error = %e, "hook after the switch failed");
            }
        }
        drop(new);
        // Dropping the last handle unloads the library; the host checks,
        // and says so, if it stays mapped.
        self.tokio
            .block_on(drain(switched.old, self.config.drain_grace));
        Ok(switched.wait)
    }

    /// The release states after a successful switch to `version`.
    fn settle(&self, version: &Version, permanence: Permanence) -> Result<Vec<Release>> {
        let mut releases = self.store.releases()?;
        let target_was_permanent = releases
            .iter()
            .any(|r| &r.version == version && r.state == ReleaseState::Permanent);
        let immediate = target_was_permanent || permanence == Permanence::Immediate;
        for r in releases.iter_mut() {
            if &r.version == version {
                r.state = if immediate {
                    ReleaseState::Permanent
                } else {
                    ReleaseState::Current
                };
                if immediate && !target_was_permanent {
                    r.permanent_since_ms = Some(now_ms());
                }
            } else if r.state == ReleaseState::Current
                || (immediate && r.state == ReleaseState::Permanent)
            {
                r.state = ReleaseState::Old;
            }
        }
        let mut soak = self.soak.lock().unwrap_or_else(|e| e.into_inner());
        *soak = match permanence {
            Permanence::Soak(period) if !immediate => Some(Soak {
                version: version.clone(),
                until: Instant::now() + period.unwrap_or(self.config.soak),
            }),
            _ => None,
        };
        Ok(releases)
    }

    /// Returns to the previous permanent release: the permanent one when a
    /// release is only current, otherwise the old release that was
    /// permanent most recently. The target becomes permanent.
    pub fn rollback(&self, source: StateSource, dry_run: bool) -> Result<Switch> {
        let _ops = self.lock_ops();
        let target = self.rollback_target()?;
        self.switch_locked(
            TransitionKind::Rollback,
            target,
            source,
            Permanence::Immediate,
            dry_run,
            None,
        )
    }

    fn rollback_target(&self) -> Result<Release> {
        let releases = self.store.releases()?;
        let active = self.tokio.block_on(self.runtime.active()).version.clone();
        let permanent = releases.iter().find(|r| r.state == ReleaseState::Permanent);
        if let Some(p) = permanent.filter(|p| p.version != active) {
            return Ok(p.clone());
        }
        releases
            .iter()
            .filter(|r| r.state == ReleaseState::Old && r.permanent_since_ms.is_some())
            .max_by_key(|r| r.permanent_since_ms)
            .cloned()
            .ok_or_else(|| {
                Error::Precondition(format!(
                    "{active} is permanent and no older release was permanent before it: nothing to roll back to"
                ))
            })
    }

    /// Whether a release is being soaked.
    pub fn soaking(&self) -> bool {
        self.soak
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// One look at the release being soaked: rolls it back if it is
    /// unhealthy or failing requests, makes it permanent once the soak is
    /// over. Called periodically; skips a beat when a transition is running.
    pub fn watch_soak(&self) -> Result<()> {
        let Some(soak) = self.soak.lock().unwrap_or_else(|e| e.into_inner()).clone() else {
            return Ok(());
        };
        let _ops = match self.ops.try_lock() {
            Ok(guard) => guard,
            Err(std::sync::TryLockError::WouldBlock) => return Ok(()),
            Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner(),
        };
        let active = self.tokio.block_on(self.runtime.active());
        let still_soaking = self
            .soak
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .is_some_and(|s| s.version == soak.version);
        if !still_soaking || active.version != soak.version {
            return Ok(());
        }
        let counters = active.counters();
        let failing = match active.instance.health() {
            Err(e) => Some(format!("health check failed: {e}")),
            Ok(()) if counters.served >= MIN_REQUESTS_FOR_RATE => {
                let rate = counters.errors as f64 / counters.served as f64;
                (rate > self.config.max_error_rate).then(|| {
                    format!(
                        "{} of {} requests failed ({} panics): {:.1}% is over the {:.1}% threshold",
                        counters.errors,
                        counters.served,
                        counters.panics,
                        rate * 100.0,
                        self.config.max_error_rate * 100.0
                    )
                })
            }
            Ok(()) => None,
        };
        drop(active);
        if let Some(reason) = failing {
            tracing::error!(version = %soak.version, %reason, "release failed its soak; rolling back");
            *self.soak.lock().unwrap_or_else(|e| e.into_inner()) = None;
            let target = self.rollback_target()?;
            self.switch_locked(
                TransitionKind::Rollback,
                target,
                StateSource::Migrate,
                Permanence::Immediate,
                false,
                Some(reason.clone()),
            )?;
            if let Some(mut failed) = self.store.release(&soak.version)? {
                failed.state = ReleaseState::Failed;
                let mut t =
                    self.store
                        .begin(TransitionKind::Rollback, Some(&soak.version), None, true)?;
                t.reason = Some(format!("{} marked failed: {reason}", soak.version));
                finish(&mut t, Instant::now(), None);
                self.store.commit(&t, &[failed])?;
            }
        } else if Instant::now() >= soak.until {
            self.make_permanent_locked(&soak.version, true)?;
        }
        Ok(())
    }

    /// Makes the current release permanent.
    pub fn make_permanent(&self, version: &Version) -> Result<Transition> {
        let _ops = self.lock_ops();
        self.make_permanent_locked(version, false)
    }

    fn make_permanent_locked(&self, version: &Version, automatic: bool) -> Result<Transition> {
        let release = self
            .store
            .release(version)?
            .ok_or_else(|| Error::UnknownVersion(version.clone()))?;
        if release.state != ReleaseState::Current {
            return Err(Error::Precondition(format!(
                "{version} is {}, not current; only the current release can be made permanent",
                release.state
            )));
        }
        let previous = self.permanent()?;
        let mut t = self.store.begin(
            TransitionKind::MakePermanent,
            previous.as_ref(),
            Some(version),
            automatic,
        )?;
        if automatic {
            t.reason = Some("healthy through its soak period".into());
        }
        crash_point("permanent:begun");
        // What the release served while current belongs to it now.
        self.checkpoint()?;
        let changed = self.settle(version, Permanence::Immediate)?;
        finish(&mut t, Instant::now(), None);
        self.store.commit(&t, &changed)?;
        tracing::info!(%version, automatic, "release made permanent");
        self.prune_old()?;
        Ok(t)
    }

    fn permanent(&self) -> Result<Option<Version>> {
        Ok(self
            .store
            .releases()?
            .into_iter()
            .find(|r| r.state == ReleaseState::Permanent)
            .map(|r| r.version))
    }

    /// Forgets a release (not the permanent, current or active one) and
    /// deletes artifacts no release references.
    pub fn remove(&self, version: &Version) -> Result<(Release, Vec<String>)> {
        let _ops = self.lock_ops();
        let release = self
            .store
            .release(version)?
            .ok_or_else(|| Error::UnknownVersion(version.clone()))?;
        let active = self.tokio.block_on(self.runtime.active()).version.clone();
        if matches!(
            release.state,
            ReleaseState::Permanent | ReleaseState::Current
        ) || release.version == active
        {
            return Err(Error::Precondition(format!(
                "{version} is {} and cannot be removed; switch away from it first",
                if release.version == active {
                    "active".to_owned()
                } else {
                    release.state.to_string()
                }
            )));
        }
        self.forget(version, false)?;
        let collected = self.collect_garbage()?;
        tracing::info!(%version, "release removed");
        Ok((release, collected))
    }

    /// Removes a release's record and snapshots, as a journalled transition.
    /// Its artifact goes with the next garbage collection.
    fn forget(&self, version: &Version, automatic: bool) -> Result<()> {
        let mut t = self
            .store
            .begin(TransitionKind::Remove, Some(version), None, automatic)?;
        crash_point("remove:begun");
        self.store.remove_release(version)?;
        self.store.remove_snapshots(version)?;
        crash_point("remove:forgotten");
        finish(&mut t, Instant::now(), None);
        self.store.commit(&t, &[])?;
        Ok(())
    }

    /// Removes the oldest `old` releases beyond the configured number.
    fn prune_old(&self) -> Result<()> {
        let old: Vec<Release> = self
            .store
            .releases()?
            .into_iter()
            .filter(|r| r.state == ReleaseState::Old)
            .collect();
        let excess = old.len().saturating_sub(self.config.keep_old);
        for release in old.iter().take(excess) {
            self.forget(&release.version, true)?;
            tracing::info!(version = %release.version, keep = self.config.keep_old, "old release pruned");
        }
        if excess > 0 {
            self.collect_garbage()?;
        }
        Ok(())
    }

    fn collect_garbage(&self) -> Result<Vec<String>> {
        let releases = self.store.releases()?;
        let keep: Vec<&str> = releases.iter().map(|r| r.sha256.as_str()).collect();
        let removed = self
            .artifacts
            .collect_garbage(&keep)
            .map_err(Error::io("cannot collect unreferenced artifacts"))?;
        for sha in &removed {
            tracing::info!(sha256 = %sha, "unreferenced artifact deleted");
        }
        Ok(removed)
    }

    pub fn releases(&self) -> Result<Vec<Release>> {
        Ok(self.store.releases()?)
    }

    pub fn history(&self, limit: usize) -> Result<Vec<Transition>> {
        Ok(self.store.history(limit)?)
    }

    pub fn status(&self) -> Result<Status> {
        let releases = self.store.releases()?;
        let resident = self.runtime.resident();
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
        let soak_remaining = self
            .soak
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map_or(Duration::ZERO, |s| {
                s.until.saturating_duration_since(Instant::now())
            });
        Ok(Status {
            active,
            permanent: releases
                .iter()
                .find(|r| r.state == ReleaseState::Permanent)
                .map(|r| r.version.clone()),
            current: releases
                .iter()
                .find(|r| r.state == ReleaseState::Current)
                .map(|r| r.version.clone()),
            releases,
            libraries,
            uptime: self.started.elapsed(),
            soak_remaining,
        })
    }

    /// Snapshots the active state (with no request in flight) into the
    /// store, durably: the periodic checkpoint and the last act on SIGTERM.
    pub fn checkpoint(&self) -> Result<Version> {
        let (version, state) = self.tokio.block_on(self.runtime.quiesced(|loaded| {
            (
                loaded.version.clone(),
                loaded
                    .instance
                    .snapshot()
                    .map(|bytes| (loaded.instance.library().state_version(), bytes)),
            )
        }));
        let (state_version, bytes) = state.map_err(|e| Error::Plugin {
            version: version.clone(),
            during: "snapshot",
            source: e,
        })?;
        self.store.put_snapshot(&Snapshot {
            version: version.clone(),
            state_version,
            taken_at_ms: now_ms(),
            bytes,
        })?;
        self.store.flush()?;
        Ok(version)
    }
}

/// Sets a transition's outcome and duration.
pub(super) fn finish(t: &mut Transition, started: Instant, error: Option<&Error>) {
    t.duration_us = started.elapsed().as_micros() as u64;
    match error {
        None => t.outcome = Outcome::Ok,
        Some(e) => {
            t.outcome = Outcome::Failed;
            t.error = Some(e.to_string());
        }
    }
}
