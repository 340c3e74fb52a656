//! Everything the agent persists, in one sled database: the releases it
//! knows, the history of transitions, and state snapshots. The only module
//! that knows about sled; the rest of the agent sees domain types.
//!
//! Durability: sled flushes on its own only every 500 ms, so every write
//! that must survive a crash is followed by [`Store::flush`] before the
//! agent acknowledges it. A transition's release states and its history
//! entry are written in one sled transaction.

use std::path::Path;

use nine9s_manifest::Version;
use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional;

use crate::model::{Outcome, Release, Snapshot, Transition, TransitionKind};

/// sled keeps up to this much of the database in memory (its default is
/// 1 GiB); history grows with every transition, and memory must not.
const CACHE_BYTES: u64 = 2 * 1024 * 1024;

/// Snapshots kept per release version; older ones are pruned.
const SNAPSHOTS_KEPT: usize = 8;

#[derive(Debug, thiserror::Error)]
#[error("state store: {0}")]
pub struct StoreError(String);

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        StoreError(e.to_string())
    }
}

impl From<serde_json::Error> for StoreError {
    fn from(e: serde_json::Error) -> Self {
        StoreError(format!("corrupt record: {e}"))
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

pub struct Store {
    db: sled::Db,
    releases: sled::Tree,
    history: sled::Tree,
    snapshots: sled::Tree,
    /// Transitions kept in the history; older ones are dropped.
    history_kept: u64,
}

impl Store {
    pub fn open(dir: &Path, history_kept: usize) -> Result<Store> {
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(CACHE_BYTES)
            .open()
            .map_err(|e| {
                StoreError(format!(
                    "cannot open {}: {e} (is another agent using this data dir?)",
                    dir.display()
                ))
            })?;
        Ok(Store {
            releases: db.open_tree("releases")?,
            history: db.open_tree("history")?,
            snapshots: db.open_tree("snapshots")?,
            db,
            history_kept: history_kept.max(1) as u64,
        })
    }

    /// Makes every write so far durable.
    pub fn flush(&self) -> Result<()> {
        self.db.flush()?;
        Ok(())
    }

    /// All releases, lowest version first.
    pub fn releases(&self) -> Result<Vec<Release>> {
        let mut all = self
            .releases
            .iter()
            .values()
            .map(|v| Ok(serde_json::from_slice::<Release>(&v?)?))
            .collect::<Result<Vec<_>>>()?;
        all.sort_by(|a, b| a.version.cmp(&b.version));
        Ok(all)
    }

    pub fn release(&self, version: &Version) -> Result<Option<Release>> {
        self.releases
            .get(version.to_string())?
            .map(|v| Ok(serde_json::from_slice(&v)?))
            .transpose()
    }

    pub fn remove_release(&self, version: &Version) -> Result<()> {
        self.releases.remove(version.to_string())?;
        Ok(())
    }

    /// Journals the start of a transition, durably, and returns it.
    pub fn begin(
        &self,
        kind: TransitionKind,
        from: Option<&Version>,
        to: Option<&Version>,
        automatic: bool,
    ) -> Result<Transition> {
        // Ids count up from the last entry; one transition begins at a time.
        let id = match self.history.last()? {
            Some((key, _)) => {
                u64::from_be_bytes(
                    key.as_ref()
                        .try_into()
                        .map_err(|_| StoreError("corrupt history key".into()))?,
                ) + 1
            }
            None => 1,
        };
        let transition = Transition {
            id,
            started_at_ms: crate::model::now_ms(),
            kind,
            from: from.cloned(),
            to: to.cloned(),
            outcome: Outcome::Running,
            duration_us: 0,
            switch_wait_us: 0,
            error: None,
            automatic,
            reason: None,
        };
        self.history.insert(
            transition.id.to_be_bytes(),
            serde_json::to_vec(&transition)?,
        )?;
        self.flush()?;
        Ok(transition)
    }

    /// Writes the end of a transition together with the release records it
    /// changed, atomically, and flushes.
    pub fn commit(&self, transition: &Transition, releases: &[Release]) -> Result<()> {
        let entry = serde_json::to_vec(transition)?;
        let records = releases
            .iter()
            .map(|r| Ok((r.version.to_string(), serde_json::to_vec(r)?)))
            .collect::<Result<Vec<_>>>()?;
        (&self.releases, &self.history)
            .transaction(|(rel, hist)| {
                for (key, value) in &records {
                    rel.insert(key.as_bytes(), value.as_slice())?;
                }
                hist.insert(&transition.id.to_be_bytes(), entry.as_slice())?;
                Ok::<_, ConflictableTransactionError<()>>(())
            })
            .map_err(|e| match e {
                TransactionError::Storage(e) => StoreError::from(e),
                TransactionError::Abort(()) => StoreError("transaction aborted".into()),
            })?;
        self.trim_history()?;
        self.flush()
    }

    /// Drops the oldest transitions beyond the number kept. Ids are
    /// consecutive and only the oldest are ever removed, so the count is
    /// the span of ids (sled's `len` would walk the whole tree).
    fn trim_history(&self) -> Result<()> {
        let id = |entry: Option<(sled::IVec, sled::IVec)>| -> Result<Option<u64>> {
            entry
                .map(|(key, _)| {
                    key.as_ref()
                        .try_into()
                        .map(u64::from_be_bytes)
                        .map_err(|_| StoreError("corrupt history key".into()))
                })
                .transpose()
        };
        let (Some(first), Some(last)) = (id(self.history.first()?)?, id(self.history.last()?)?)
        else {
            return Ok(());
        };
        for old in first..(last + 1).saturating_sub(self.history_kept) {
            self.history.remove(old.to_be_bytes())?;
        }
        Ok(())
    }

    /// The last `limit` transitions (all when 0), oldest first.
    pub fn history(&self, limit: usize) -> Result<Vec<Transition>> {
        let take = if limit == 0 { usize::MAX } else { limit };
        let mut entries = self
            .history
            .iter()
            .values()
            .rev()
            .take(take)
            .map(|v| Ok(serde_json::from_slice::<Transition>(&v?)?))
            .collect::<Result<Vec<_>>>()?;
        entries.reverse();
        Ok(entries)
    }

    /// Marks every transition still `running` as `aborted`: the agent died
    /// during it. Returns them.
    pub fn abort_running(&self) -> Result<Vec<Transition>> {
        let mut aborted = Vec::new();
        for entry in self.history.iter().values() {
            let mut t: Transition = serde_json::from_slice(&entry?)?;
            if t.outcome == Outcome::Running {
                t.outcome = Outcome::Aborted;
                t.error = Some("the agent stopped before this transition finished".into());
                self.history
                    .insert(t.id.to_be_bytes(), serde_json::to_vec(&t)?)?;
                aborted.push(t);
            }
        }
        self.flush()?;
        Ok(aborted)
    }

    /// Records a snapshot (not flushed: the caller flushes when it must be
    /// durable). Keeps the last few per version.
    pub fn put_snapshot(&self, snapshot: &Snapshot) -> Result<()> {
        let prefix = snapshot_prefix(&snapshot.version);
        let mut key = prefix.clone();
        key.extend_from_slice(&self.db.generate_id()?.to_be_bytes());
        let mut value = Vec::with_capacity(12 + snapshot.bytes.len());
        value.extend_from_slice(&snapshot.state_version.to_be_bytes());
        value.extend_from_slice(&snapshot.taken_at_ms.to_be_bytes());
        value.extend_from_slice(&snapshot.bytes);
        self.snapshots.insert(key, value)?;
        let keys: Vec<_> = self
            .snapshots
            .scan_prefix(&prefix)
            .keys()
            .collect::<Result<_, _>>()?;
        for old in keys.iter().take(keys.len().saturating_sub(SNAPSHOTS_KEPT)) {
            self.snapshots.remove(old)?;
        }
        Ok(())
    }

    /// The most recent snapshot of a release.
    pub fn last_snapshot(&self, version: &Version) -> Result<Option<Snapshot>> {
        let Some((_, value)) = self
            .snapshots
            .scan_prefix(snapshot_prefix(version))
            .last()
            .transpose()?
        else {
            return Ok(None);
        };
        if value.len() < 12 {
            return Err(StoreError(format!("corrupt snapshot of {version}")));
        }
        let (state_version, rest) = value.split_at(4);
        let (taken_at, bytes) = rest.split_at(8);
        Ok(Some(Snapshot {
            version: version.clone(),
            state_version: u32::from_be_bytes(state_version.try_into().expect("4 bytes")),
            taken_at_ms: i64::from_be_bytes(taken_at.try_into().expect("8 bytes")),
            bytes: bytes.to_vec(),
        }))
    }

    pub fn remove_snapshots(&self, version: &Version) -> Result<()> {
        for key in self.snapshots.scan_prefix(snapshot_prefix(version)).keys() {
            self.snapshots.remove(key?)?;
        }
        Ok(())
    }
}

fn snapshot_prefix(version: &Version) -> Vec<u8> {
    let mut prefix = version.to_string().into_bytes();
    prefix.push(0);
    prefix
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ReleaseState;

    fn release(version: &str, state: ReleaseState) -> Release {
        Release {
            name: "nine9s".into(),
            version: Version::parse(version).unwrap(),
            state,
            sha256: "00".into(),
            size: 1,
            staged_at_ms: 0,
            state_version: 1,
            routes: vec![],
            blocking: false,
            permanent_since_ms: None,
            manifest: String::new(),
        }
    }

    fn reopen(dir: &Path) -> Store {
        for _ in 0..100 {
            if let Ok(store) = Store::open(dir, 100) {
                return store;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        Store::open(dir, 100).unwrap()
    }

    #[test]
    fn a_committed_transition_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let v2 = Version::new(0, 2, 0);
        {
            let store = Store::open(dir.path(), 100).unwrap();
            let mut t = store
                .begin(TransitionKind::Upgrade, None, Some(&v2), false)
                .unwrap();
            t.outcome = Outcome::Ok;
            store
                .commit(&t, &[release("0.2.0", ReleaseState::Permanent)])
                .unwrap();
            store
                .begin(TransitionKind::Downgrade, Some(&v2), None, false)
                .unwrap();
        }
        // sled's flusher thread lets go of the file lock a moment after the drop.
        let store = reopen(dir.path());
        assert_eq!(
            store.release(&v2).unwrap().unwrap().state,
            ReleaseState::Permanent
        );
        let aborted = store.abort_running().unwrap();
        assert_eq!(aborted.len(), 1);
        let history = store.history(0).unwrap();
        assert_eq!(
            history.iter().map(|t| t.outcome).collect::<Vec<_>>(),
            [Outcome::Ok, Outcome::Aborted]
        );
        assert!(history[0].id < history[1].id);
    }

    #[test]
    fn only_the_newest_transitions_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 5).unwrap();
        for _ in 0..12 {
            let mut t = store
                .begin(TransitionKind::Stage, None, None, false)
                .unwrap();
            t.outcome = Outcome::Ok;
            store.commit(&t, &[]).unwrap();
        }
        let ids: Vec<u64> = store.history(0).unwrap().iter().map(|t| t.id).collect();
        assert_eq!(ids, [8, 9, 10, 11, 12]);
    }

    #[test]
    fn last_snapshot_is_the_newest_and_old_ones_are_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 100).unwrap();
        let v = Version::new(0, 2, 0);
        for n in 0..20u64 {
            let snapshot = Snapshot {
                version: v.clone(),
                state_version: 1,
                taken_at_ms: n as i64,
                bytes: n.to_le_bytes().to_vec(),
            };
            store.put_snapshot(&snapshot).unwrap();
        }
        let last = store.last_snapshot(&v).unwrap().unwrap();
        assert_eq!(last.bytes, 19u64.to_le_bytes());
        assert_eq!(store.snapshots.len(), SNAPSHOTS_KEPT);
        assert!(store
            .last_snapshot(&Version::new(0, 3, 0))
            .unwrap()
            .is_none());
    }
}
