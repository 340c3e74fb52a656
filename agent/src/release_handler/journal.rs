//! The journal: every transition is written `running` (flushed) before it
//! starts and committed with its outcome and the release states it changed
//! (one sled transaction, flushed) before it is acknowledged; every
//! lifecycle event is recorded beside it and broadcast to watchers.
//!
//! [`Journal::begin`] returns a [`Guard`]; a transition ends only through
//! the guard (`succeed` or `fail`), so no code path can forget to commit.
//! A guard dropped without either (an early `?`) commits the transition as
//! failed with the running view cleared.
//!
//! Every command with a request id is answered once: its outcome is
//! recorded under the id ([`Journal::record_request`]), and a retry gets
//! that answer back instead of running again ([`Journal::answered`]).
//!
//! Committed transitions are counted here too (`nine9s_transitions_total`
//! and the duration and switch-wait histograms, see `metrics`), so the
//! metrics say what the history says.

use std::sync::Arc;

use parking_lot::Mutex;
use std::time::Instant;

use nine9s_manifest::Version;
use tokio::sync::broadcast;

use super::Reply;
use crate::error::{Error, Reason, Result};
use crate::metrics::Transitions;
use crate::model::{
    now_ms, Event, EventKind, Outcome, Recorded, RecordedOutcome, Release, Transition,
    TransitionKind,
};
use crate::store::Store;

/// The release records a transition changed: all of them are committed
/// with it; those whose state moved are announced. `removed`: releases it
/// forgot, whose records and snapshots go in the same commit.
#[derive(Debug, Clone, Default)]
pub struct Changes {
    pub records: Vec<Release>,
    pub moved: Vec<Release>,
    pub removed: Vec<Version>,
}

/// Who asked for a transition and why.
#[derive(Debug, Clone, Default)]
pub struct Origin {
    pub automatic: bool,
    pub reason: Option<String>,
    /// The command's request id and fingerprint: the transition is
    /// recorded under the id as it begins, durably with it, so a retry
    /// after a crash finds it instead of running again.
    pub request: Option<(String, String)>,
    /// Who asked: the token's or certificate's name; `None` for the agent.
    pub identity: Option<String>,
}

impl Origin {
    /// The agent acting on its own, for `reason`.
    pub fn automatic(reason: impl Into<String>) -> Origin {
        Origin {
            automatic: true,
            reason: Some(reason.into()),
            request: None,
            identity: None,
        }
    }
}

/// The store plus the live side of the journal: the event broadcast and
/// the transition under way, for `status`.
pub struct Journal {
    pub store: Arc<Store>,
    events: broadcast::Sender<Event>,
    running: Mutex<Option<Transition>>,
    transitions: Transitions,
}

impl Journal {
    pub fn new(store: Arc<Store>) -> Journal {
        Journal {
            store,
            events: broadcast::channel(1024).0,
            running: Mutex::new(None),
            transitions: Transitions::default(),
        }
    }

    /// The transitions' metrics.
    pub fn transitions(&self) -> &Transitions {
        &self.transitions
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// The transition under way, if any.
    pub fn running(&self) -> Option<Transition> {
        self.running.lock().clone()
    }

    /// Records an event, durably, then tells watchers: a watcher never
    /// sees an event that a crash could take back (sled writes to disk
    /// every 500 ms unless flushed, and a follower that resumes after an id
    /// it saw must find the same events there). An event that cannot be
    /// recorded is logged and still broadcast: watching must not fail a
    /// transition.
    pub fn emit(&self, event: Event) {
        let recorded = self
            .store
            .record_event(event.clone())
            .and_then(|recorded| self.store.flush().map(|()| recorded));
        let event = match recorded {
            Ok(recorded) => recorded,
            Err(e) => {
                tracing::warn!(error = %e, kind = ?event.kind, "cannot record an event");
                event
            }
        };
        let _ = self.events.send(event);
    }

    /// Journals a transition as running (durably) and announces it.
    pub fn begin(
        &self,
        kind: TransitionKind,
        from: Option<&Version>,
        to: Option<&Version>,
        origin: &Origin,
    ) -> Result<Guard<'_>> {
        let request = origin
            .request
            .as_ref()
            .map(|(id, fingerprint)| (id.as_str(), fingerprint.as_str()));
        let transition = self.store.begin(
            Transition {
                id: 0,
                started_at_ms: 0,
                kind,
                from: from.cloned(),
                to: to.cloned(),
                outcome: Outcome::Running,
                duration_us: 0,
                switch_wait_us: 0,
                error: None,
                automatic: origin.automatic,
                reason: origin.reason.clone(),
                request_id: origin.request.as_ref().map(|(id, _)| id.clone()),
                error_reason: None,
                identity: origin.identity.clone(),
            },
            request,
        )?;
        *self.running.lock() = Some(transition.clone());
        let mut started = Event::new(EventKind::TransitionStarted);
        started.transition = Some(transition.clone());
        self.emit(started);
        let span = tracing::info_span!("transition", id = transition.id, kind = %transition.kind)
            .entered();
        Ok(Guard {
            journal: self,
            transition: Some(transition),
            started: Instant::now(),
            switched: false,
            _span: span,
        })
    }

    /// The answer to a command whose request id was seen before: its
    /// recorded outcome if it is the same command (a retry), a refusal if
    /// the id was used for another; `None` for a new id.
    pub fn answered(&self, id: &str, fingerprint: &str) -> Result<Option<Result<Reply>>> {
        let Some(recorded) = self.store.request(id)? else {
            return Ok(None);
        };
        if recorded.fingerprint != fingerprint {
            // The first command may be another identity's: what it was
            // stays in the log.
            tracing::warn!(request_id = %id, recorded = %recorded.fingerprint, this = %fingerprint, "a request id reused for another command: refused");
            return Ok(Some(Err(Error::refused(
                Reason::RequestIdReused,
                format!("request id {id:?} was already used for another command; use a new id for a new command"),
            ))));
        }
        tracing::info!(request_id = %id, "a retried command: answering with its recorded outcome");
        Ok(Some(self.replay(recorded.outcome)))
    }

    /// Records a command's outcome under its request id. A transition's
    /// begin already recorded it (durably, with the journal entry); what
    /// ended without one, or otherwise, is recorded here. A transient
    /// refusal that changed nothing is forgotten, so a retry runs again.
    pub fn record_request(
        &self,
        id: &str,
        fingerprint: String,
        outcome: &Result<Reply>,
        changed: bool,
    ) {
        let store = &self.store;
        let outcome = match outcome {
            Ok(Reply::Staged {
                release,
                already_staged,
            }) => RecordedOutcome::Staged {
                version: release.version.clone(),
                already_staged: *already_staged,
            },
            // Recorded when it began.
            Ok(Reply::Switched {
                transition: Some(_),
                ..
            }) => return,
            Ok(Reply::Switched { .. }) => RecordedOutcome::Unchanged,
            Ok(Reply::Removed {
                release: Some(release),
                collected,
            }) => RecordedOutcome::Removed {
                release: Box::new(release.clone()),
                collected: collected.clone(),
            },
            Ok(Reply::Removed { release: None, .. }) => return,
            // Transient refusals are not final: a retry should try again —
            // unless the command did change the lifecycle (a switch the
            // store could not record), which its begin record stands for.
            Err(e) if is_transient(e) => {
                if !changed {
                    if let Err(e) = store.forget_request(id) {
                        tracing::warn!(error = %e, request_id = %id, "cannot forget the request id");
                    }
                }
                return;
            }
            Err(e) => RecordedOutcome::Refused {
                reason: e.reason(),
                message: e.to_string(),
            },
        };
        let recorded = Recorded {
            at_ms: now_ms(),
            fingerprint,
            outcome,
        };
        if let Err(e) = store
            .record_request(id, &recorded)
            .and_then(|()| store.flush())
        {
            tracing::warn!(error = %e, request_id = %id, "cannot record the request's outcome");
        }
    }

    /// The answer recorded for a request id. A command never runs twice:
    /// a transition without a recorded end is answered as such.
    fn replay(&self, outcome: RecordedOutcome) -> Result<Reply> {
        let store = &self.store;
        Ok(match outcome {
            RecordedOutcome::Transition { id, finished } => {
                // Its end as recorded under the id, else the history's
                // entry (records from before the end was kept there).
                let t = match finished {
                    Some(t) => Some(*t),
                    None => store.transition(id)?,
                };
                let t = match t {
                    Some(t) if t.outcome != Outcome::Running => t,
                    _ => {
                        return Err(Error::refused(
                            Reason::OutcomeUnknown,
                            format!("this request id started transition #{id}, whose end was never recorded (the store failed it); it is not run again: see `ctl status` and `ctl history`, and use a new request id to act"),
                        ))
                    }
                };
                match t.outcome {
                    Outcome::Aborted => {
                        return Err(Error::refused(
                            Reason::TransitionAborted,
                            format!("this request id started transition #{id}, which the agent's stop cut short before it took effect; it is not run again: use a new request id to run it"),
                        ))
                    }
                    Outcome::Failed => {
                        return Err(Error::Recorded {
                            reason: t.error_reason.unwrap_or(Reason::Internal),
                            message: t.error.unwrap_or_default(),
                        })
                    }
                    Outcome::Ok | Outcome::Running => {}
                }
                match (t.kind, &t.to, &t.from) {
                    (TransitionKind::Stage, Some(version), _) => Reply::Staged {
                        release: store
                            .release(version)?
                            .ok_or_else(|| Error::UnknownVersion(version.clone()))?,
                        already_staged: false,
                    },
                    // Answered before the removal was recorded: the record
                    // is gone with it.
                    (TransitionKind::Remove, _, Some(_)) => Reply::Removed {
                        release: None,
                        collected: Vec::new(),
                    },
                    _ => Reply::Switched {
                        transition: Some(t),
                        plan: None,
                        unchanged: false,
                    },
                }
            }
            RecordedOutcome::Unchanged => Reply::Switched {
                transition: None,
                plan: None,
                unchanged: true,
            },
            RecordedOutcome::Staged {
                version,
                already_staged,
            } => Reply::Staged {
                release: store
                    .release(&version)?
                    .ok_or(Error::UnknownVersion(version))?,
                already_staged,
            },
            RecordedOutcome::Removed { release, collected } => Reply::Removed {
                release: Some(*release),
                collected,
            },
            RecordedOutcome::Refused { reason, message } => {
                return Err(Error::Recorded { reason, message })
            }
        })
    }

    /// Announces release state changes (after they were committed).
    pub fn announce(&self, changed: &[Release]) {
        for release in changed {
            let mut event = Event::new(EventKind::ReleaseStateChanged).version(&release.version);
            event.state = Some(release.state);
            event.message = release.failure.clone();
            self.emit(event);
        }
    }
}

/// A transition under way; ends with [`Guard::succeed`] or [`Guard::fail`].
pub struct Guard<'a> {
    journal: &'a Journal,
    transition: Option<Transition>,
    started: Instant,
    /// The runtime switched: requests were held (`switch_wait_us`).
    switched: bool,
    /// Every log line while the transition runs carries its id and kind.
    _span: tracing::span::EnteredSpan,
}

impl Guard<'_> {
    /// Adds to the transition's reason (what the engine did on its own).
    pub fn note(&mut self, note: impl Into<String>) {
        if let Some(t) = self.transition.as_mut() {
            let note = note.into();
            t.reason = Some(match t.reason.take() {
                Some(reason) => format!("{reason}; {note}"),
                None => note,
            });
        }
    }

    pub fn set_switch_wait(&mut self, wait: std::time::Duration) {
        if let Some(t) = self.transition.as_mut() {
            t.switch_wait_us = wait.as_micros() as u64;
            self.switched = true;
        }
    }

    /// Commits the transition as done, with the release states it changed.
    pub fn succeed(mut self, changed: &Changes) -> Result<Transition> {
        self.end(None, changed)
    }

    /// Commits the transition as failed with `error`, with the release
    /// states the failure changed, and returns the error.
    pub fn fail(mut self, error: Error, changed: &Changes) -> Error {
        match self.end(Some(&error), changed) {
            Ok(_) => error,
            Err(commit) => {
                tracing::error!(error = %commit, "cannot record a failed transition");
                error
            }
        }
    }

    fn end(&mut self, error: Option<&Error>, changed: &Changes) -> Result<Transition> {
        let mut t = self.transition.take().expect("a guard ends once");
        t.duration_us = self.started.elapsed().as_micros() as u64;
        match error {
            None => t.outcome = Outcome::Ok,
            Some(e) => {
                t.outcome = Outcome::Failed;
                t.error = Some(e.to_string());
                t.error_reason = Some(e.reason());
            }
        }
        *self.journal.running.lock() = None;
        self.journal
            .store
            .commit(&t, &changed.records, &changed.removed)?;
        self.journal.transitions.finished(&t, self.switched);
        let mut finished = Event::new(EventKind::TransitionFinished);
        finished.transition = Some(t.clone());
        self.journal.emit(finished);
        self.journal.announce(&changed.moved);
        Ok(t)
    }
}

impl Drop for Guard<'_> {
    fn drop(&mut self) {
        if self.transition.is_some() {
            let error = Error::refused(
                crate::error::Reason::Internal,
                "the transition ended without an outcome",
            );
            if let Err(e) = self.end(Some(&error), &Changes::default()) {
                tracing::error!(error = %e, "cannot record an abandoned transition");
            }
        }
    }
}

/// Refusals a retry may well not meet: not recorded under the request id.
fn is_transient(e: &Error) -> bool {
    matches!(
        e.reason(),
        Reason::QuiesceTimeout
            | Reason::StoreUnavailable
            | Reason::DiskFull
            | Reason::ShuttingDown
            | Reason::RollbackPending
            | Reason::Internal
    )
}
