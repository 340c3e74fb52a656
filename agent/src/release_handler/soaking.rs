//! What the actor does with a soak: the watcher's verdicts ([`super::soak`]
//! looks, the actor decides here), the soak passed (made permanent) or
//! failed (announced, then rolled back automatically), and the automatic
//! rollback retried with back-off while it fails. [`Pacing`] owns the
//! timing: when the next rollback attempt is due, and when soak progress
//! was last announced.

use std::time::{Duration, Instant};

use nine9s_manifest::Version;

use super::actor::Actor;
use super::checkpoint::Skipped;
use super::journal::Origin;
use super::machine::{self, Settle, Soak};
use super::soak::Verdict;
use super::StateSource;
use crate::error::Reason;
use crate::model::{now_ms, TransitionKind};

/// Longest wait between two attempts of a failing automatic rollback.
const MAX_ROLLBACK_BACKOFF: Duration = Duration::from_secs(5);

/// How often a soak's progress is announced.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// When the automatic rollback is tried next, and when soak progress went
/// out last.
pub(super) struct Pacing {
    next_rollback: Instant,
    last_progress: Instant,
}

impl Pacing {
    pub(super) fn new() -> Pacing {
        Pacing {
            next_rollback: Instant::now(),
            last_progress: Instant::now(),
        }
    }

    /// A soak just failed: its rollback is tried at once.
    pub(super) fn roll_back_now(&mut self) {
        self.next_rollback = Instant::now();
    }

    fn rollback_due(&self) -> bool {
        Instant::now() >= self.next_rollback
    }

    /// After failed attempt number `attempts` (from 0): the wait before
    /// the next, doubling up to [`MAX_ROLLBACK_BACKOFF`].
    fn back_off(&mut self, attempts: u32) -> Duration {
        let backoff =
            Duration::from_millis(200 * 2u64.pow(attempts.min(5))).min(MAX_ROLLBACK_BACKOFF);
        self.next_rollback = Instant::now() + backoff;
        backoff
    }

    /// Whether soak progress is due for announcing (and, if so, counts it
    /// as announced).
    fn progress_due(&mut self) -> bool {
        if self.last_progress.elapsed() < PROGRESS_EVERY {
            return false;
        }
        self.last_progress = Instant::now();
        true
    }
}

impl Actor {
    /// A soak verdict from the watcher.
    pub(super) fn soak(&mut self, verdict: Verdict) {
        match self.lifecycle.soak().clone() {
            Soak::Soaking { version, until_ms }
                if verdict.version == version && verdict.until_ms == until_ms =>
            {
                match verdict.health {
                    Err(reason) => self.fail_soak(&version, reason),
                    Ok(()) if now_ms() >= until_ms => {
                        let origin = Origin::automatic("healthy through its soak period");
                        match self.promote(&version, &origin) {
                            Ok(_) => {
                                let event =
                                    crate::model::Event::new(crate::model::EventKind::SoakPassed)
                                        .version(&version);
                                self.shared.journal.emit(event);
                            }
                            // Its state cannot be saved: that fails it.
                            Err(e) if e.blames() == Some(&version) => {
                                self.fail_soak(&version, e.to_string())
                            }
                            Err(e) => {
                                tracing::error!(error = %e, %version, "cannot make the soaked release permanent");
                                if e.reason() == Reason::StoreUnavailable {
                                    self.store_failed(e.to_string());
                                }
                            }
                        }
                    }
                    Ok(()) => {
                        if self.pacing.progress_due() {
                            let mut event =
                                crate::model::Event::new(crate::model::EventKind::SoakProgress)
                                    .version(&version);
                            event.soak_remaining_ms = (until_ms - now_ms()).max(0) as u64;
                            self.shared.journal.emit(event);
                        }
                    }
                }
            }
            Soak::RollingBack { .. } if self.pacing.rollback_due() => {
                self.roll_back_automatically();
            }
            _ => {}
        }
    }

    /// The soaking `version` failed its soak: announced, the lifecycle
    /// told, and the automatic rollback started.
    pub(super) fn fail_soak(&mut self, version: &Version, reason: String) {
        let event = crate::model::Event::new(crate::model::EventKind::SoakFailed)
            .version(version)
            .message(reason.clone());
        self.shared.journal.emit(event);
        match self.advance(machine::Event::SoakFailed { reason }, &[]) {
            Ok(_) => self.roll_back_automatically(),
            Err(e) => tracing::error!(error = %e, "cannot fail the soak"),
        }
    }

    /// A checkpoint failed because the soaking release's snapshot did: it
    /// fails its soak (a release whose state cannot be saved must not
    /// become permanent).
    pub(super) fn fail_soak_for(&mut self, skipped: &Skipped) {
        if let Soak::Soaking { version, .. } = self.lifecycle.soak().clone() {
            if skipped.blames() == Some(&version) {
                self.fail_soak(&version, skipped.to_string());
            }
        }
    }

    /// Rolls the release that failed its soak back to the permanent one.
    /// A failed attempt stays pending (visible in status) and is retried
    /// with back-off.
    pub(super) fn roll_back_automatically(&mut self) {
        let Soak::RollingBack {
            version,
            reason,
            attempts,
            ..
        } = self.lifecycle.soak().clone()
        else {
            return;
        };
        let origin = Origin::automatic(format!("{version} failed its soak: {reason}"));
        let outcome = self.lifecycle.rollback_target().and_then(|target| {
            self.switch_kind(
                TransitionKind::Rollback,
                &target,
                StateSource::Migrate,
                Settle::Immediate,
                false,
                &origin,
            )
        });
        if let Err(e) = outcome {
            if e.reason() == Reason::StoreUnavailable {
                self.store_failed(e.to_string());
            }
            if !matches!(self.lifecycle.soak(), Soak::RollingBack { .. }) {
                // It did switch back; only the store could not record it.
                return;
            }
            let backoff = self.pacing.back_off(attempts);
            tracing::error!(error = %e, attempt = attempts + 1, retry_in_ms = backoff.as_millis() as u64, "automatic rollback failed; it will be retried");
            let event = crate::model::Event::new(crate::model::EventKind::RollbackRetry)
                .version(&version)
                .message(e.to_string());
            self.shared.journal.emit(event);
            if let Err(bug) = self.advance(
                machine::Event::RollbackFailed {
                    error: e.to_string(),
                },
                &[],
            ) {
                tracing::error!(error = %bug, "cannot record the failed rollback");
            }
        }
    }
}
