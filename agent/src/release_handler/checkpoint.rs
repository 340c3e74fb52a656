//! Checkpoints: the active state, snapshotted with no request in flight,
//! written to the store and flushed — periodically (`--checkpoint-every`),
//! when a release becomes permanent, and as the last act of a clean stop.
//!
//! A checkpoint never stalls traffic: it waits for a moment with no call
//! in flight without holding new requests back, and only for a bounded
//! time; if none comes (a slow request), it is skipped with a warning and
//! an event, and the previous checkpoint stands.

use std::time::Duration;

use super::actor::Actor;
use crate::model::{now_ms, Event, EventKind, Snapshot};

/// How long a checkpoint looks for a moment with no request in flight.
const CHECKPOINT_QUIESCE: Duration = Duration::from_millis(500);

impl Actor {
    /// Takes a checkpoint; logs (and announces) why if it cannot.
    pub(super) fn checkpoint(&self) {
        let runtime = &self.shared.runtime;
        let taken = self
            .tokio
            .block_on(runtime.try_quiesced(CHECKPOINT_QUIESCE, |loaded| {
                (
                    loaded.version.clone(),
                    loaded.instance.library().state_version(),
                    loaded.instance.snapshot(),
                )
            }));
        let skipped = |why: String| {
            tracing::warn!(%why, "checkpoint skipped; the previous one stands");
            self.shared
                .journal
                .emit(Event::new(EventKind::CheckpointSkipped).message(why));
        };
        let (version, state_version, bytes) = match taken {
            None => {
                return skipped(format!(
                    "requests were still in flight after {} ms",
                    CHECKPOINT_QUIESCE.as_millis()
                ))
            }
            Some((version, _, Err(e))) => {
                return skipped(format!("the snapshot of {version} failed: {e}"))
            }
            Some((version, state_version, Ok(bytes))) => (version, state_version, bytes),
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
                self.shared
                    .view
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .last_checkpoint_ms = Some(taken_at_ms);
            }
            Err(e) => {
                skipped(format!("the store cannot be written: {e}"));
                self.store_failed(e.to_string());
            }
        }
    }
}
