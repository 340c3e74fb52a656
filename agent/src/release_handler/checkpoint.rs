//! Checkpoints: the active state, snapshotted with no request in flight,
//! written to the store and flushed — periodically (`--checkpoint-every`),
//! when a release becomes permanent, and as the last act of a clean stop
//! (in a self-upgrade, the state handed to the new worker).
//!
//! A checkpoint never stalls traffic: it waits for a moment with no call
//! in flight without holding new requests back, and only for a bounded
//! time; if none comes (a slow request), it is skipped with a warning and
//! an event, and the previous checkpoint stands.
//!
//! A snapshot that fails is the release's fault, not a passing moment:
//! the caller is told which (a soaking release fails its soak for it, a
//! release cannot be made permanent with it, and a stop says so).

use std::sync::Arc;
use std::time::Duration;

use nine9s_host::CallError;
use nine9s_manifest::Version;

use super::actor::Actor;
use super::calls::{watch_wedged, Called};
use crate::error::Error;
use crate::model::{now_ms, Event, EventKind, Snapshot};

/// Why a checkpoint was not taken (the previous one stands).
#[derive(Debug)]
pub(super) enum Skipped {
    /// Requests stayed in flight: no consistent moment came.
    Busy(String),
    /// The release's `snapshot` failed: its fault.
    Snapshot(Error),
    /// The store could not take it.
    Store(String),
}

impl Skipped {
    /// The release whose snapshot failed, if that was why.
    pub(super) fn blames(&self) -> Option<&Version> {
        match self {
            Skipped::Snapshot(e) => e.blames(),
            Skipped::Busy(_) | Skipped::Store(_) => None,
        }
    }
}

impl std::fmt::Display for Skipped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Skipped::Busy(why) | Skipped::Store(why) => f.write_str(why),
            Skipped::Snapshot(e) => write!(f, "{e}"),
        }
    }
}

/// How long a checkpoint looks for a moment with no request in flight.
const CHECKPOINT_QUIESCE: Duration = Duration::from_millis(500);

/// The active state, taken with no request in flight.
pub(super) struct Taken {
    pub version: Version,
    pub state_version: u32,
    pub bytes: Vec<u8>,
}

impl Actor {
    /// Takes a checkpoint; logs (and announces) why if it cannot.
    pub(super) fn checkpoint(&self) -> Result<(), Skipped> {
        let taken = self.snapshot_active();
        self.store_checkpoint(taken)
    }

    /// Snapshots the active instance at a moment with no call in flight.
    pub(super) fn snapshot_active(&self) -> Result<Taken, Skipped> {
        let runtime = &self.shared.runtime;
        let limit = self.shared.config.gate_timeout;
        let active = runtime.active();
        if active.snapshotting() {
            // Not a second one beside it: the one that overran may still
            // come back (or the worker is replaced as wedged).
            return Err(Skipped::Busy(format!(
                "an earlier snapshot of {} has not returned yet",
                active.version
            )));
        }
        drop(active);
        let taken = self
            .tokio
            .block_on(runtime.try_quiesced(CHECKPOINT_QUIESCE, |loaded| {
                // Behind the closed gate: on the plugin thread, within
                // --gate-timeout.
                let serving = Arc::clone(loaded);
                let snapshot = match self.calls.call(limit, move || serving.take_snapshot()) {
                    Ok(Called::Done(snapshot)) => snapshot,
                    Ok(Called::Expired(late)) => {
                        watch_wedged(loaded, late);
                        Err(CallError::Failed(format!(
                            "did not return within the gate's {} ms (--gate-timeout): the checkpoint was abandoned and the gate reopened",
                            limit.as_millis()
                        )))
                    }
                    Err(e) => Err(CallError::Failed(e.to_string())),
                };
                (
                    loaded.version.clone(),
                    loaded.instance.library().state_version(),
                    snapshot,
                )
            }));
        match taken {
            None => Err(Skipped::Busy(format!(
                "requests were still in flight after {} ms",
                CHECKPOINT_QUIESCE.as_millis()
            ))),
            Some((version, _, Err(e))) => Err(Skipped::Snapshot(Error::Plugin {
                version,
                during: "snapshot",
                source: e,
            })),
            Some((version, state_version, Ok(bytes))) => Ok(Taken {
                version,
                state_version,
                bytes,
            }),
        }
    }

    /// Writes a snapshot taken by [`Actor::snapshot_active`] to the store
    /// and flushes it; logs (and announces) why if there is none.
    pub(super) fn store_checkpoint(&self, taken: Result<Taken, Skipped>) -> Result<(), Skipped> {
        let skipped = |skipped: Skipped| {
            let why = skipped.to_string();
            tracing::warn!(%why, "checkpoint skipped; the previous one stands");
            self.shared
                .journal
                .emit(Event::new(EventKind::CheckpointSkipped).message(why));
            Err(skipped)
        };
        let Taken {
            version,
            state_version,
            bytes,
        } = match taken {
            Ok(taken) => taken,
            Err(why) => return skipped(why),
        };
        let store = self.shared.store();
        let taken_at_ms = now_ms();
        let stored = store
            .put_snapshot(&Snapshot {
                version: version.clone(),
                state_version,
                taken_at_ms,
                bytes,
            })
            .and_then(|()| store.flush());
        match stored {
            Ok(()) => {
                tracing::debug!(%version, "checkpoint taken");
                self.shared.view.lock().last_checkpoint_ms = Some(taken_at_ms);
                Ok(())
            }
            Err(e) => {
                self.store_failed(e.to_string());
                skipped(Skipped::Store(format!("the store cannot be written: {e}")))
            }
        }
    }
}
