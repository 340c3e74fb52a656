//! The engine's rollout lease: the table (`crate::lease`, which holds the
//! rules) behind a lock, read at start from the store, every change
//! written to the store and flushed before it is answered (a lease must
//! survive a crash, a restart and a self-upgrade), and announced as an
//! event. Not the actor's: taking a lease switches nothing, so it never
//! waits behind a transition. `control` asks [`Engine::admit_command`]
//! before it sends a switching command to the actor; a command already
//! queued when a lease is taken still runs (a rollout's commands are
//! compare-and-sets on the active release, `expected_active`).

use parking_lot::Mutex;

use super::Engine;
use crate::error::Result;
use crate::lease::{self, Admitted, GiveBack, Rollout, Table, Take, Taken};
use crate::model::{now_ms, Event, EventKind};
use crate::store::Store;

pub(super) struct Leases {
    table: Mutex<Table>,
    /// Held while a change is written: one writer at a time, and readers
    /// (`admit_command`, `rollouts`) never wait for the store's flush.
    writing: Mutex<()>,
}

impl Leases {
    pub(super) fn load(store: &Store) -> Result<Leases> {
        let (holder, ended) = store.rollouts()?;
        Ok(Leases {
            table: Mutex::new(Table::new(holder, ended)),
            writing: Mutex::new(()),
        })
    }
}

impl Engine {
    fn leases(&self) -> &Leases {
        &self.shared.leases
    }

    /// Takes or renews the lease (see [`Table::take`]), durably. Blocking
    /// (a flush).
    pub fn take_lease(&self, take: Take) -> Result<Rollout> {
        let _writing = self.leases().writing.lock();
        let mut next = self.leases().table.lock().clone();
        let (record, taken) = next.take(take, now_ms())?;
        let ended = match &taken {
            Taken::ByForce(old) => vec![(**old).clone()],
            _ => Vec::new(),
        };
        self.shared.store().write_rollouts(Some(&record), &ended)?;
        *self.leases().table.lock() = next;
        if taken != Taken::Renewed {
            let message = lease::taken_message(&record, &taken);
            tracing::info!("{message}");
            self.shared.journal.emit(
                Event::new(EventKind::LeaseTaken)
                    .version(&record.report.version)
                    .message(message),
            );
        }
        Ok(record)
    }

    /// Gives the lease back if `report`'s rollout holds it, durably; the
    /// record it ended, or else the last one of that rollout. Blocking.
    pub fn give_back_lease(&self, report: lease::Report) -> Result<Option<Rollout>> {
        let _writing = self.leases().writing.lock();
        let mut next = self.leases().table.lock().clone();
        let ended = match next.give_back(report, now_ms()) {
            GiveBack::Ended(ended) => *ended,
            GiveBack::NotHeld(last) => return Ok(last.map(|r| *r)),
        };
        self.shared
            .store()
            .write_rollouts(None, std::slice::from_ref(&ended))?;
        *self.leases().table.lock() = next;
        let message = lease::released_message(&ended);
        tracing::info!("{message}");
        self.shared.journal.emit(
            Event::new(EventKind::LeaseReleased)
                .version(&ended.report.version)
                .message(message),
        );
        Ok(Some(ended))
    }

    /// The rollout holding the lease, and the ended ones, newest first.
    pub fn rollouts(&self) -> (Option<Rollout>, Vec<Rollout>) {
        let table = self.leases().table.lock();
        (table.holder().cloned(), table.ended().cloned().collect())
    }

    /// Whether a switching command (`command`: "upgrade"...) may run
    /// under the lease as it is now (see [`Table::admits`]).
    pub fn admit_command(
        &self,
        lease: Option<&str>,
        force: bool,
        command: &'static str,
    ) -> Result<Admitted> {
        Ok(self
            .leases()
            .table
            .lock()
            .admits(now_ms(), lease, force, command)?)
    }
}
