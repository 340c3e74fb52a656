//! The canary: another release serving a share of the requests beside the
//! active one (`ctl upgrade --canary`), started on the plugin-call lane,
//! dropped by `ctl rollback` or by the health gate (its release failed),
//! finished by a switch to its release. The runtime holds the instance
//! and routes the split; the store records which canary serves, so a
//! start after a crash closes its history row. However it ends (dropped,
//! replaced, or by a switch, its promotion too: the switch starts an
//! instance of its own), a canary that is a service lets its requests and
//! streams under way finish as an old active instance does
//! (`let_go_of`).

use std::sync::Arc;

use nine9s_manifest::Version;

use super::actor::{note_abandoned, Actor};
use super::calls::{Called, REHEARSAL_TIMEOUT};
use super::journal::{Changes, Origin};
use super::machine::{self, Soak};
use super::Reply;
use crate::error::{Error, Reason, Result};
use crate::model::TransitionKind;
use crate::runtime::Split;

impl Actor {
    /// Starts serving `split` of the requests with `version` beside the
    /// active release, replacing a canary there may be. Refused for a
    /// release that keeps state, or beside one: each instance would hold
    /// its own copy of the state, and one copy would be lost.
    pub(super) fn start_canary(
        &mut self,
        version: &Version,
        split: Split,
        origin: &Origin,
    ) -> Result<Reply> {
        let store = self.shared.store();
        let target = store
            .release(version)?
            .ok_or_else(|| Error::UnknownVersion(version.clone()))?;
        let active = self.lifecycle.active().clone();
        if *version == active {
            return Err(Error::refused(
                Reason::InvalidArgument,
                format!(
                    "{version} is the active release: a canary serves another release beside it"
                ),
            ));
        }
        if !matches!(self.lifecycle.soak(), Soak::Idle) {
            return Err(Error::refused(
                Reason::CanaryWhileCurrent,
                format!("{active} is current, not permanent: let its soak finish, or make it permanent or roll it back, before a canary"),
            ));
        }
        let active_release = store
            .release(&active)?
            .ok_or_else(|| Error::UnknownVersion(active.clone()))?;
        for release in [&target, &active_release] {
            if release.state_version != 0 {
                return Err(Error::refused(
                    Reason::CanaryWithState,
                    format!(
                        "{} keeps state (state version {}): a canary would serve with a copy of the state of its own, and one of the two copies would be lost; upgrade to {version} without --canary",
                        release.version, release.state_version
                    ),
                ));
            }
        }
        let shared = Arc::clone(&self.shared);
        let mut guard =
            shared
                .journal
                .begin(TransitionKind::Canary, Some(&active), Some(version), origin)?;
        guard.note(format!("canary: {split}"));
        // Recorded before it can serve: whatever ends the process, the next
        // start closes its history row.
        if let Err(e) = store.set_canary(Some(version)) {
            return Err(guard.fail(e.into(), &Changes::default()));
        }
        // On the plugin thread, with the rehearsal's time limit: an `init`
        // or a health check that hangs must not hold the engine.
        let started = self.catalog.open(&target).and_then(|library| {
            let of = version.clone();
            let called = self.calls.call(REHEARSAL_TIMEOUT, move || {
                let plugin = |during| {
                    let version = of.clone();
                    move |source| Error::Plugin {
                        version,
                        during,
                        source,
                    }
                };
                library
                    .instantiate(None)
                    .map_err(plugin("init"))
                    .and_then(|instance| {
                        instance.health().map_err(plugin("health check"))?;
                        Ok(instance)
                    })
            })?;
            match called {
                Called::Done(made) => made,
                Called::Expired(_) => Err(Error::refused(
                    Reason::Internal,
                    format!(
                        "starting the canary did not finish within {} s",
                        REHEARSAL_TIMEOUT.as_secs()
                    ),
                )),
            }
        });
        let instance = match started {
            Ok(instance) => instance,
            Err(e) => {
                let e = guard.fail(e, &Changes::default());
                self.forget_canary(
                    self.shared
                        .runtime
                        .canary()
                        .map(|c| c.loaded.version.clone()),
                );
                return Err(e);
            }
        };
        let loaded = crate::runtime::Loaded::new(version.clone(), target.blocking, instance);
        let before = self.shared.runtime.set_canary(loaded, split);
        if let Some(before) = &before {
            guard.note(format!("replacing the canary of {}", before.loaded.version));
        }
        let transition = guard.succeed(&Changes::default());
        self.let_go_of(before);
        let transition = transition?;
        tracing::info!(%version, "canary started");
        Ok(Reply::Switched {
            transition: Some(transition),
            plan: None,
            unchanged: false,
        })
    }

    /// Records which canary serves now (`None`: none), after a canary
    /// ended or failed to start; a store that cannot take it only means a
    /// later start records the end of a canary that is gone already.
    pub(super) fn forget_canary(&self, serving: Option<Version>) {
        if let Err(e) = self.shared.store().set_canary(serving.as_ref()) {
            tracing::warn!(error = %e, "cannot record that the canary ended");
        }
    }

    /// Drops a canary taken out of the runtime here, once its calls in
    /// flight are done (within the drain grace): its instance's `stop` and
    /// its library's unload run on the plugin thread, with a deadline,
    /// never on a request's. A service is retired in the background like
    /// an old active instance (`PluginCalls::retire`): its requests and
    /// streams under way finish on it up to `--drain-timeout`.
    pub(super) fn let_go_of(&self, canary: Option<Arc<crate::runtime::Canary>>) {
        if let Some(canary) = canary {
            let config = &self.shared.config;
            if canary.loaded.is_service() {
                // A canary keeps no state: nothing to check after its
                // requests end.
                let loaded = Arc::clone(&canary.loaded);
                drop(canary);
                self.calls.retire(
                    &self.tokio,
                    loaded,
                    None,
                    config.drain_timeout,
                    config.drain_grace,
                );
                return;
            }
            let grace = config.drain_grace;
            // Calls stuck past the request timeout hold it for as long as
            // they run: no wait ends sooner, and the last of them lets go.
            if canary.loaded.stuck() == 0
                && !self
                    .tokio
                    .block_on(crate::runtime::released(&canary.loaded, grace))
            {
                tracing::warn!(version = %canary.loaded.version, "drain grace over with the canary still serving a call");
            }
            // Its instance's stop and unload, if this is the last reference.
            if let Ok(canary) = Arc::try_unwrap(canary) {
                self.calls.unload(Some(canary.loaded));
            }
        }
    }

    /// Drops the canary (a rollback while there is one): every request
    /// goes to the active release again. With a `fault`, its release is
    /// failed for it, in the same commit.
    pub(super) fn drop_canary(
        &mut self,
        dry_run: bool,
        fault: Option<String>,
        origin: &Origin,
    ) -> Result<Reply> {
        let Some(canary) = self.shared.runtime.canary() else {
            return Err(Error::refused(
                Reason::InvalidArgument,
                "there is no canary",
            ));
        };
        if dry_run {
            return Ok(Reply::Switched {
                transition: None,
                plan: None,
                unchanged: false,
            });
        }
        let active = self.lifecycle.active().clone();
        let shared = Arc::clone(&self.shared);
        let mut guard = shared.journal.begin(
            TransitionKind::Rollback,
            Some(&canary.loaded.version),
            Some(&active),
            origin,
        )?;
        guard.note(format!(
            "the canary of {} ({}) was dropped",
            canary.loaded.version, canary.split
        ));
        let abandoned = note_abandoned(&mut guard, &canary.loaded);
        let version = canary.loaded.version.clone();
        drop(canary);
        let cleared = self.shared.runtime.clear_canary();
        let transition = match fault {
            Some(fault) => self.commit_event(
                guard,
                machine::Event::SwitchFailed {
                    to: version.clone(),
                    fault: Some(fault),
                },
                &[],
            ),
            None => guard.succeed(&Changes::default()),
        };
        // Dropped whether or not the store took the record of it.
        self.forget_canary(None);
        self.let_go_of(cleared);
        tracing::info!(%version, "canary dropped");
        self.calls.abandoned(abandoned);
        Ok(Reply::Switched {
            transition: Some(transition?),
            plan: None,
            unchanged: false,
        })
    }

    /// The canary failed its health check or its error rate: dropped, and
    /// its release failed.
    pub(super) fn canary_failed(&mut self, failure: super::soak::CanaryFailure) {
        let Some(canary) = self.shared.runtime.canary() else {
            return;
        };
        if canary.loaded.id() != failure.instance {
            return;
        }
        let version = canary.loaded.version.clone();
        drop(canary);
        let event = crate::model::Event::new(crate::model::EventKind::SoakFailed)
            .version(&version)
            .message(failure.reason.clone());
        self.shared.journal.emit(event);
        let origin = Origin::automatic(format!("the canary {version} failed: {}", failure.reason));
        if let Err(e) = self.drop_canary(false, Some(failure.reason), &origin) {
            tracing::error!(error = %e, "cannot record the dropped canary");
        }
    }
}
