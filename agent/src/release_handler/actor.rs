//! The actor: one thread that owns the lifecycle and applies commands,
//! soak verdicts and checkpoints one at a time. Every command is checked
//! the same way before it runs — its client still there, its request id
//! not already answered, the store writable, the expected release active —
//! and its outcome is recorded under its request id (by the journal).
//!
//! The actor holds the pure lifecycle machine and one part per concern,
//! each owning its state: the [`Catalog`](super::catalog::Catalog) the
//! artifacts, [`PluginCalls`](super::calls::PluginCalls) the lanes calls
//! into releases run on, [`Pacing`](super::soaking::Pacing) the automatic
//! rollback's back-off; the journal, the runtime and the store are shared
//! with readers ([`Shared`]). What it does is split by concern too: a
//! canary in `canary.rs`, soak verdicts in `soaking.rs`, staging and
//! removing in `catalog.rs`, checkpoints in `checkpoint.rs`, the switch
//! executor in `switch.rs`; here, the loop, the command checks, and how
//! an event moves the machine and is committed.

use std::sync::{mpsc, Arc};
use std::time::Instant;

use nine9s_manifest::Version;
use tokio::sync::oneshot;

use super::checkpoint::{Skipped, Taken};
use super::journal::{Changes, Origin};
use super::machine::{self, Decision, Lifecycle, Settle, Soak};
use super::{
    CarriedState, Command, Job, Meta, Permanence, PlanReport, Reply, Shared, StateSource, View,
};
use crate::artifacts::Artifacts;
use crate::error::{Error, Reason, Result};
use crate::failpoint::crash_point;
use crate::model::{now_ms, Release, TransitionKind};
use crate::store::REQUEST_IDS_KEPT_MS;

pub(super) struct Actor {
    pub(super) shared: Arc<Shared>,
    pub(super) catalog: super::catalog::Catalog,
    pub(super) lifecycle: Lifecycle,
    pub(super) tokio: tokio::runtime::Handle,
    /// When the automatic rollback is retried, soak progress announced.
    pub(super) pacing: super::soaking::Pacing,
    /// Every call the engine makes into a release, and the threads
    /// abandoned request calls hold until a new worker reclaims them.
    pub(super) calls: super::calls::PluginCalls,
}

impl Actor {
    pub(super) fn new(
        shared: Arc<Shared>,
        artifacts: Artifacts,
        lifecycle: Lifecycle,
        tokio: tokio::runtime::Handle,
    ) -> Actor {
        Actor {
            shared,
            catalog: super::catalog::Catalog::new(artifacts),
            lifecycle,
            tokio,
            pacing: super::soaking::Pacing::new(),
            calls: super::calls::PluginCalls::new(),
        }
    }

    /// Applies jobs until the engine is stopped or every handle is gone.
    pub(super) fn run(mut self, inbox: mpsc::Receiver<Job>) {
        while let Ok(job) = inbox.recv() {
            match job {
                Job::Command {
                    command,
                    meta,
                    reply,
                } => {
                    if let Some(gone) = client_gone(&reply, &meta) {
                        tracing::warn!(?command, request_id = ?meta.request_id, "{gone}: the command was not run");
                        continue;
                    }
                    let outcome = self.command(command, meta);
                    let _ = reply.send(outcome);
                    self.reclaim_stuck();
                }
                Job::Soak(verdict) => {
                    self.soak(verdict);
                    self.reclaim_stuck();
                }
                Job::CanaryFailed(failure) => {
                    self.canary_failed(failure);
                    self.reclaim_stuck();
                }
                Job::Checkpoint => {
                    if let Err(skipped) = self.checkpoint() {
                        self.fail_soak_for(&skipped);
                    }
                    self.maintain();
                }
                Job::Stop { done, handover } => {
                    let taken = self.snapshot_active();
                    if let Some(outgoing) = handover {
                        self.hand_over(outgoing, &taken);
                    }
                    let last = self.store_checkpoint(taken);
                    if let Soak::RollingBack { version, .. } = self.lifecycle.soak() {
                        // Not a clean stop for it: the next start counts the
                        // release that failed its soak as failed, not old.
                        tracing::warn!(%version, "stopping with its automatic rollback pending; the next start marks it failed");
                    } else if let Err(e) = self.shared.store().mark_stopped() {
                        tracing::error!(error = %e, "cannot record the clean stop");
                    }
                    let _ = done.send(last.map_err(|skipped| match skipped {
                        Skipped::Busy(_) => super::FinalCheckpoint::Busy,
                        lost => super::FinalCheckpoint::Failed(lost.to_string()),
                    }));
                    return;
                }
            }
        }
    }

    /// A self-upgrade: sends the state just taken to the new worker, if
    /// this worker serves the permanent release (the new one prepared it).
    /// Otherwise the socket closes with nothing on it, and the new worker
    /// starts from the store.
    fn hand_over(&self, outgoing: crate::handover::Outgoing, taken: &Result<Taken, Skipped>) {
        let started = Instant::now();
        let why_not = match taken {
            Err(why) => Some(format!("no state to hand over ({why})")),
            Ok(_) if self.lifecycle.current().is_some() => Some(format!(
                "{} is current, not permanent: the new worker comes back on the permanent release from the store",
                self.lifecycle.active()
            )),
            Ok(taken) if self.lifecycle.permanent() != Some(&taken.version) => Some(format!(
                "{} is not the permanent release",
                taken.version
            )),
            Ok(_) => None,
        };
        if let Some(why) = why_not {
            tracing::info!("{why}");
            return;
        }
        let Ok(taken) = taken else { return };
        let sent = self
            .shared
            .store()
            .release(&taken.version)
            .map_err(|e| e.to_string())
            .and_then(|release| {
                release.ok_or_else(|| format!("{} is not in the store", taken.version))
            })
            .and_then(|release| {
                crate::handover::send_state(outgoing, &release, taken.state_version, &taken.bytes)
                    .map_err(|e| e.to_string())
            });
        match sent {
            Ok(()) => tracing::info!(
                version = %taken.version,
                bytes = taken.bytes.len(),
                took_us = started.elapsed().as_micros() as u64,
                "state handed over to the new worker"
            ),
            Err(e) => {
                tracing::warn!(error = %e, "the state could not be handed over: the new worker starts from the store")
            }
        }
    }

    /// Keeps the hint a self-upgrade's new worker reads (the permanent
    /// release) true; a hint that cannot be written only makes the next
    /// self-upgrade slower.
    pub(super) fn write_hint(&self) {
        let Some(version) = self.lifecycle.permanent() else {
            return;
        };
        let written = match self.shared.store().release(version) {
            Ok(Some(release)) => {
                crate::handover::write_hint(&self.shared.config.hint_dir(), &release)
                    .map_err(|e| e.to_string())
            }
            Ok(None) => Err(format!("{version} is not in the store")),
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = written {
            tracing::warn!(error = %e, "cannot write the standby hint: the next self-upgrade starts its worker from the store");
        }
    }

    /// Housekeeping with the periodic checkpoint: forget old request ids,
    /// and see whether a failed store works again.
    fn maintain(&mut self) {
        let store = self.shared.store();
        if let Err(e) = store.prune_requests(now_ms() - REQUEST_IDS_KEPT_MS) {
            tracing::warn!(error = %e, "cannot prune old request ids");
        }
        if self.shared.view().store_error.is_some() {
            self.recover_store();
        }
    }

    fn command(&mut self, command: Command, meta: Meta) -> Result<Reply> {
        let fingerprint = command.fingerprint(&meta);
        if let Some(id) = &meta.request_id {
            if let Some(answer) = self.shared.journal.answered(id, &fingerprint)? {
                return answer;
            }
        }
        if let Some(error) = self.shared.view().store_error {
            self.recover_store();
            if self.shared.view().store_error.is_some() {
                return Err(Error::refused(
                    Reason::StoreUnavailable,
                    format!("the store cannot be written ({error}); the agent keeps serving {}, and takes transitions again once the store works", self.lifecycle.active()),
                ));
            }
        }
        if let Some(expected) = &meta.expected_active {
            if expected != self.lifecycle.active() {
                return Err(Error::ExpectedActive {
                    expected: expected.clone(),
                    active: self.lifecycle.active().clone(),
                });
            }
        }
        let dry_run = command.dry_run();
        let origin = Origin {
            automatic: false,
            reason: meta.reason.clone(),
            request: meta.request_id.clone().map(|id| (id, fingerprint.clone())),
            identity: meta.identity.clone(),
        };
        let before = self.lifecycle.clone();
        let outcome = match command {
            Command::Stage(staging) => self.stage(*staging, &origin),
            Command::Switch {
                direction,
                version,
                permanence,
                source,
                dry_run,
                expected_canary,
            } => match expected_canary {
                // Checked here, in the actor: the health gate drops a
                // canary here too, so nothing comes between.
                Some(expected) if self.shared.runtime.canary().is_none_or(|c| c.loaded.version != expected) => {
                    Err(Error::refused(
                        Reason::ExpectedCanaryMismatch,
                        format!("{expected} is not the canary (any more): it may have been dropped, by `ctl rollback` or by the health gate; nothing was switched"),
                    ))
                }
                _ => self.switch_to(direction, &version, permanence, source, dry_run, &origin),
            },
            Command::Rollback {
                expected_canary: Some(expected),
                dry_run,
                ..
            } => match self.shared.runtime.canary() {
                Some(canary) if canary.loaded.version == expected => {
                    self.drop_canary(dry_run, None, &origin)
                }
                _ => Err(Error::refused(
                    Reason::ExpectedCanaryMismatch,
                    format!("{expected} is not the canary (any more): it may have been dropped already, by `ctl rollback` or by the health gate; nothing was rolled back"),
                )),
            },
            // With a canary, a rollback drops it and does no more: a
            // canary runs only beside the permanent release, so the active
            // release was never left, and no state crossed to come back.
            Command::Rollback { dry_run, .. } if self.shared.runtime.canary().is_some() => {
                self.drop_canary(dry_run, None, &origin)
            }
            Command::Canary { version, split } => self.start_canary(&version, split, &origin),
            Command::Rollback {
                source, dry_run, ..
            } => {
                self.lifecycle.rollback_target().and_then(|target| {
                    self.switch_kind(
                        TransitionKind::Rollback,
                        &target,
                        source,
                        Settle::Immediate,
                        dry_run,
                        &origin,
                    )
                })
            }
            Command::MakePermanent { version } => self.make_permanent(&version, &origin),
            Command::Remove { version } => self.remove(&version, &origin),
        };
        match &outcome {
            Err(e @ Error::Store(_)) => self.store_failed(e.to_string()),
            Err(
                e @ Error::Refused {
                    reason: Reason::StoreUnavailable,
                    ..
                },
            ) => self.store_failed(e.to_string()),
            _ => {}
        }
        if let (Some(id), false) = (&meta.request_id, dry_run) {
            self.shared
                .journal
                .record_request(id, fingerprint, &outcome, self.lifecycle != before);
        }
        outcome
    }

    fn switch_to(
        &mut self,
        direction: machine::Direction,
        version: &Version,
        permanence: Permanence,
        source: StateSource,
        dry_run: bool,
        origin: &Origin,
    ) -> Result<Reply> {
        if self.lifecycle.check_switch(direction, version)? == Decision::Unchanged {
            return Ok(Reply::Switched {
                transition: None,
                plan: None,
                unchanged: true,
            });
        }
        let settle = match permanence {
            Permanence::Immediate => Settle::Immediate,
            Permanence::Never => Settle::Held,
            Permanence::Soak(period) => Settle::Soak {
                until_ms: now_ms() + period.unwrap_or(self.shared.config.soak).as_millis() as i64,
            },
        };
        let kind = match direction {
            machine::Direction::Up => TransitionKind::Upgrade,
            machine::Direction::Down => TransitionKind::Downgrade,
        };
        self.switch_kind(kind, version, source, settle, dry_run, origin)
    }

    /// Journals and runs a switch (or only its checks, for a dry run), then
    /// settles the lifecycle. A rollback whose state migration fails falls
    /// back to the target's snapshot.
    pub(super) fn switch_kind(
        &mut self,
        kind: TransitionKind,
        version: &Version,
        source: StateSource,
        settle: Settle,
        dry_run: bool,
        origin: &Origin,
    ) -> Result<Reply> {
        let store = Arc::clone(&self.shared.journal.store);
        let target = store
            .release(version)?
            .ok_or_else(|| Error::UnknownVersion(version.clone()))?;
        let from = self.lifecycle.active().clone();
        let from_release = store
            .release(&from)?
            .ok_or_else(|| Error::UnknownVersion(from.clone()))?;
        if dry_run {
            let report = self.prepare_report(&from_release, &target)?;
            let report = self.rehearse(&target, source, report)?;
            return Ok(Reply::Switched {
                transition: None,
                plan: Some(report),
                unchanged: false,
            });
        }
        let shared = Arc::clone(&self.shared);
        let mut guard = shared
            .journal
            .begin(kind, Some(&from), Some(version), origin)?;
        // A switch finishes a canary (to its release) or ends it (to any
        // other): the canary served beside the release being left.
        let mut abandoned = 0;
        if let Some(canary) = self.shared.runtime.clear_canary() {
            guard.note(format!("the canary of {} ended", canary.loaded.version));
            abandoned += note_abandoned(&mut guard, &canary.loaded);
            self.let_go_of(Some(canary));
            self.forget_canary(None);
        }
        crash_point("switch:begun");
        let span = tracing::info_span!("switch", %from, to = %version);
        let _entered = span.enter();
        let mut report = match self.prepare_report(&from_release, &target) {
            Ok(report) => report,
            Err(e) => return Err(guard.fail(e, &Changes::default())),
        };
        // A rollback never starts its target empty: without a migrate step
        // in the plan, it restores the snapshot taken when it was left.
        let source = if kind == TransitionKind::Rollback
            && !report.plan.steps.contains(&nine9s_manifest::Step::Migrate)
        {
            StateSource::Snapshot
        } else {
            source
        };
        let mut outcome = self.execute(&target, source, &mut report);
        let mut fell_back = None;
        if kind == TransitionKind::Rollback && source == StateSource::Migrate {
            if let Err(e) = &outcome {
                if is_migration_failure(e) {
                    fell_back = Some(format!("the state migration failed: {e}"));
                    tracing::warn!(error = %e, "the rollback's state migration failed; restoring the target's snapshot instead");
                    guard.note(format!(
                        "state migration failed ({e}); restored the snapshot taken when {version} was left"
                    ));
                    report.checks.push(format!(
                        "state: migration failed ({e}); falling back to the snapshot"
                    ));
                    outcome = self.execute(&target, StateSource::Snapshot, &mut report);
                }
            }
        }
        if let Some(CarriedState::Snapshot { fallback, .. }) = &mut report.state {
            *fallback = fell_back;
        }
        match outcome {
            Ok(mut executed) => {
                guard.set_switch_wait(executed.wait);
                if executed.abandoned > 0 {
                    abandoned += executed.abandoned;
                    guard.note(abandoned_note(executed.abandoned, &from));
                }
                let at_ms = now_ms();
                let event = if kind == TransitionKind::Rollback {
                    machine::Event::RolledBack {
                        to: version.clone(),
                        at_ms,
                    }
                } else {
                    machine::Event::Switched {
                        to: version.clone(),
                        settle,
                        at_ms,
                    }
                };
                let changes = self.advance(event, &[])?;
                let committed = match executed.unrecorded.take() {
                    None => guard.succeed(&changes),
                    Some(e) => Err(guard.fail(e.into(), &changes)),
                };
                let transition = committed.map_err(|e| {
                    Error::refused(
                        Reason::StoreUnavailable,
                        format!("switched to {version}, but the store cannot record it ({e}); a restart before the store works again would come back on the permanent release"),
                    )
                })?;
                crash_point("switch:committed");
                tracing::info!(
                    duration_us = transition.duration_us,
                    switch_wait_us = transition.switch_wait_us,
                    "switched"
                );
                self.announce_soak();
                self.finish_plan(executed, &mut report);
                // Done and recorded: housekeeping cannot fail the command.
                if let Err(e) = self.prune_old() {
                    tracing::warn!(error = %e, "cannot prune old releases");
                }
                self.calls.abandoned(abandoned);
                Ok(Reply::Switched {
                    transition: Some(transition),
                    plan: Some(report),
                    unchanged: false,
                })
            }
            Err(e) => {
                // A downgrade's plan is written by the release being left:
                // a hook it names that the target lacks is not the target's
                // fault.
                let foreign_hook = matches!(e, Error::Plugin { during: "hook", .. })
                    && report.plan.origin == nine9s_manifest::PlanOrigin::Written
                    && *version < from;
                let fault = (e.blames() == Some(version) && !foreign_hook).then(|| e.to_string());
                let changes = match self.advance(
                    machine::Event::SwitchFailed {
                        to: version.clone(),
                        fault,
                    },
                    &[],
                ) {
                    Ok(changes) => changes,
                    Err(bug) => {
                        tracing::error!(error = %bug, "cannot settle a failed switch");
                        Changes::default()
                    }
                };
                tracing::error!(error = %e, "switch failed; the previous release keeps serving");
                Err(guard.fail(e, &changes))
            }
        }
    }

    fn make_permanent(&mut self, version: &Version, origin: &Origin) -> Result<Reply> {
        self.lifecycle.check_make_permanent(version)?;
        let transition = self.promote(version, origin)?;
        Ok(Reply::Switched {
            transition: Some(transition),
            plan: None,
            unchanged: false,
        })
    }

    /// Makes the current release permanent (a command, or the end of a
    /// healthy soak), with a checkpoint of what it served while current.
    pub(super) fn promote(
        &mut self,
        version: &Version,
        origin: &Origin,
    ) -> Result<crate::model::Transition> {
        let previous = self.lifecycle.permanent().cloned();
        let shared = Arc::clone(&self.shared);
        let guard = shared.journal.begin(
            TransitionKind::MakePermanent,
            previous.as_ref(),
            Some(version),
            origin,
        )?;
        crash_point("permanent:begun");
        // What the release served while current belongs to it now; a
        // release that cannot save its state cannot be the one a restart
        // comes back on.
        if let Err(skipped) = self.checkpoint() {
            if skipped.blames() == Some(version) {
                let Skipped::Snapshot(e) = skipped else {
                    unreachable!("only a failed snapshot blames a release")
                };
                return Err(guard.fail(e, &Changes::default()));
            }
        }
        let event = match self.lifecycle.soak() {
            Soak::Soaking {
                version: soaking, ..
            } if soaking == version && origin.automatic => {
                machine::Event::SoakPassed { at_ms: now_ms() }
            }
            _ => machine::Event::MadePermanent {
                version: version.clone(),
                at_ms: now_ms(),
            },
        };
        let transition = self.commit_event(guard, event, &[])?;
        tracing::info!(%version, automatic = origin.automatic, "release made permanent");
        self.prune_old()?;
        Ok(transition)
    }

    /// Applies an event to the lifecycle at once and returns the release
    /// records it changed (`fresh`: records not in the store yet), to
    /// commit: for what has already happened whatever the store says (a
    /// switch the runtime made, a soak verdict).
    pub(super) fn advance(&mut self, event: machine::Event, fresh: &[Release]) -> Result<Changes> {
        let (next, effects, changes) = self.prepare(event, fresh)?;
        self.adopt(next, &effects);
        Ok(changes)
    }

    /// Commits `guard` with what `event` changes, and only then applies the
    /// event to the lifecycle: if the store refuses the commit, the
    /// lifecycle stays as the store has it.
    pub(super) fn commit_event(
        &mut self,
        guard: super::journal::Guard<'_>,
        event: machine::Event,
        fresh: &[Release],
    ) -> Result<crate::model::Transition> {
        let (next, effects, changes) = match self.prepare(event, fresh) {
            Ok(prepared) => prepared,
            Err(e) => return Err(guard.fail(e, &Changes::default())),
        };
        let transition = guard.succeed(&changes)?;
        self.adopt(next, &effects);
        Ok(transition)
    }

    fn adopt(&mut self, next: Lifecycle, effects: &[machine::Effect]) {
        for effect in effects {
            let machine::Effect::RollBack { reason } = effect;
            tracing::error!(%reason, "release failed its soak; rolling back");
            self.pacing.roll_back_now();
        }
        let permanent_changed = next.permanent() != self.lifecycle.permanent();
        self.lifecycle = next;
        self.publish();
        if permanent_changed {
            self.write_hint();
        }
    }

    /// What an event would make of the lifecycle, and the records to commit:
    /// every entry the event changed (its state, when it was last permanent,
    /// why it failed) and every release it forgot — the difference between
    /// the two lifecycles is the one account of what changed.
    fn prepare(
        &self,
        event: machine::Event,
        fresh: &[Release],
    ) -> Result<(Lifecycle, Vec<machine::Effect>, Changes)> {
        let (next, effects) = self.lifecycle.apply(event)?;
        let store = self.shared.store();
        let mut changes = Changes {
            removed: self
                .lifecycle
                .versions()
                .filter(|v| next.entry(v).is_none())
                .cloned()
                .collect(),
            ..Changes::default()
        };
        let versions: Vec<Version> = next
            .versions()
            .filter(|v| next.entry(v) != self.lifecycle.entry(v))
            .cloned()
            .collect();
        for version in versions {
            let entry = next.entry(&version).expect("listed by the machine");
            let mut record = match fresh.iter().find(|r| r.version == version) {
                Some(r) => r.clone(),
                None => store
                    .release(&version)?
                    .ok_or_else(|| Error::UnknownVersion(version.clone()))?,
            };
            let moved = record.state != entry.state;
            record.state = entry.state;
            record.permanent_since_ms = entry.permanent_since_ms;
            record.failure = entry.failure.clone();
            if moved {
                changes.moved.push(record.clone());
            }
            changes.records.push(record);
        }
        Ok((next, effects, changes))
    }

    /// Publishes the lifecycle's soak to readers.
    fn publish(&self) {
        let mut view = self.shared.view.lock();
        view.soak = self.lifecycle.soak().clone();
    }

    fn set_view(&self, update: impl FnOnce(&mut View)) {
        update(&mut self.shared.view.lock());
    }

    /// After a switch: tells watchers a soak started.
    fn announce_soak(&self) {
        if let Soak::Soaking { version, until_ms } = self.lifecycle.soak() {
            let mut event =
                crate::model::Event::new(crate::model::EventKind::SoakStarted).version(version);
            event.soak_remaining_ms = (until_ms - now_ms()).max(0) as u64;
            self.shared.journal.emit(event);
        }
    }

    /// The store failed a write: serve on, refuse transitions until it works.
    pub(super) fn store_failed(&self, error: String) {
        tracing::error!(%error, "the store cannot be written: transitions are refused until it works again; serving goes on");
        // Clients (Status, refusals) are told that it fails, not the
        // store's own words, which name the server's paths: the log has them.
        let summary = if error.contains("No space left") || error.contains("quota") {
            "a write failed: the disk is full (the agent's log has the error)"
        } else {
            "a write failed (the agent's log has the error)"
        };
        self.set_view(|view| view.store_error = Some(summary.to_owned()));
    }

    /// Tries the store again; once it takes writes, the lifecycle as the
    /// agent runs it is written back whole, and transitions resume.
    fn recover_store(&mut self) {
        // Until there is room again, a fresh handle would fail as well.
        match self.catalog.free_space() {
            Ok(free) if free >= super::catalog::FREE_SPACE_MARGIN => {}
            _ => return,
        }
        let store = self.shared.store();
        let records = self.lifecycle.versions().cloned().collect::<Vec<_>>();
        let result = (|| -> Result<()> {
            // sled refuses writes for good after one failed: a fresh handle.
            store.reopen()?;
            store.probe()?;
            let mut changed = Vec::new();
            for version in records {
                let entry = self.lifecycle.entry(&version).expect("listed");
                if let Some(mut record) = store.release(&version)? {
                    if record.state != entry.state
                        || record.permanent_since_ms != entry.permanent_since_ms
                    {
                        record.state = entry.state;
                        record.permanent_since_ms = entry.permanent_since_ms;
                        record.failure = entry.failure.clone();
                        changed.push(record);
                    }
                }
            }
            if !changed.is_empty() {
                store.write_releases(&changed)?;
            }
            Ok(())
        })();
        match result {
            Ok(()) => {
                tracing::info!("the store takes writes again; transitions resume");
                self.set_view(|view| view.store_error = None);
            }
            Err(e) => tracing::debug!(error = %e, "the store still cannot be written"),
        }
    }

    /// Calls stuck past the request timeout hold their threads (and their
    /// instance) for as long as they run, maybe for ever. Once the engine
    /// has let go of their instance — switched away, recorded — and a
    /// checkpoint is written, a new worker takes over from this one (the
    /// supervisor's self-upgrade handover, as `ctl agent restart`:
    /// connections wait in the backlog, none is refused), and the threads
    /// end with this process.
    /// Asks for a new worker if abandoned stuck calls hold threads, once
    /// the active release is the permanent one with no canary: a new worker
    /// comes back on the permanent release, so a switch still soaking (or
    /// held) would be undone by it.
    fn reclaim_stuck(&mut self) {
        if self.calls.any_abandoned()
            && matches!(self.lifecycle.soak(), Soak::Idle)
            && self.shared.runtime.canary().is_none()
        {
            let stuck = self.calls.take_abandoned();
            self.replace_worker(stuck);
        }
    }

    fn replace_worker(&self, stuck: u64) {
        // A checkpoint skipped said why; the handover carries the state
        // all the same.
        let _ = self.checkpoint();
        match crate::process::ask_for_new_worker(self.shared.config.supervisor_pid, true) {
            Ok(true) => tracing::warn!(
                stuck,
                "calls stuck past the request timeout were abandoned: a new worker takes over from this one to reclaim their threads"
            ),
            Ok(false) => tracing::warn!(
                stuck,
                "calls stuck past the request timeout were abandoned, and hold their threads: with no supervisor to start a new worker, restart the agent to reclaim them"
            ),
            Err(e) => tracing::error!(
                stuck,
                error = %e,
                "calls stuck past the request timeout were abandoned, and the supervisor cannot be asked for a new worker: restart the agent to reclaim their threads"
            ),
        }
    }

    pub(super) fn prepare_report(&self, from: &Release, to: &Release) -> Result<PlanReport> {
        let plan = super::handoff::plan_for(from, to)?;
        Ok(PlanReport {
            from: from.version.clone(),
            to: to.version.clone(),
            plan,
            checks: vec![super::handoff::route_changes(&from.routes, &to.routes)],
            state: None,
        })
    }
}

/// What the history says of `stuck` calls into `version` abandoned past
/// the request timeout.
fn abandoned_note(stuck: u64, version: &Version) -> String {
    format!(
        "{stuck} call(s) into {version} stuck past the request timeout were abandoned, not waited for (a snapshot taken meanwhile does not hold what they may still do); the worker is replaced to reclaim their threads"
    )
}

/// Notes the calls into `loaded` abandoned past the request timeout, if
/// any; how many.
pub(super) fn note_abandoned(
    guard: &mut super::journal::Guard<'_>,
    loaded: &crate::runtime::Loaded,
) -> u64 {
    let stuck = loaded.stuck();
    if stuck > 0 {
        guard.note(abandoned_note(stuck, &loaded.version));
    }
    stuck
}

/// Why a command should not start: its client stopped waiting.
fn client_gone(reply: &oneshot::Sender<Result<Reply>>, meta: &Meta) -> Option<&'static str> {
    if reply.is_closed() {
        Some("the client cancelled the call")
    } else if meta.deadline.is_some_and(|d| Instant::now() >= d) {
        Some("the client's deadline passed while the command was queued")
    } else {
        None
    }
}

/// The running state could not be carried down (migrated, snapshotted,
/// or accepted by the target): a rollback restores the stored snapshot.
fn is_migration_failure(e: &Error) -> bool {
    matches!(e, Error::Plugin { .. } | Error::NoMigrationPath { .. })
}
