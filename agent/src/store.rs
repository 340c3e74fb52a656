//! Everything the agent persists, in one sled database: the releases it
//! knows, the history of transitions, state snapshots, the events `Watch`
//! replays, the outcomes of request ids, the rollout lease and the
//! rollouts that held it, and a few facts about the store itself (the
//! clean-stop mark, boot attempts, the canary serving). The
//! only module that knows about sled; the rest of the agent sees domain
//! types.
//!
//! Durability: sled flushes on its own only every 500 ms, so every write
//! that must survive a crash is followed by [`Store::flush`] before the
//! agent acknowledges it. A transition's release states and its history
//! entry are written in one sled transaction.

use std::ops::Bound;
use std::path::Path;
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};

use nine9s_manifest::Version;
use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional;

use crate::lease::{Rollout, ENDED_KEPT};
use crate::model::{
    Event, EventKind, Outcome, Recorded, RecordedOutcome, Release, Snapshot, Transition,
};
use crate::release_handler::check_states;

/// sled keeps up to this much of the database in memory (its default is
/// 1 GiB); history grows with every transition, and memory must not.
const CACHE_BYTES: u64 = 2 * 1024 * 1024;

/// Snapshots kept per release version; older ones are pruned.
const SNAPSHOTS_KEPT: usize = 8;

/// How long a request id is remembered for retries.
pub const REQUEST_IDS_KEPT_MS: i64 = 24 * 3600 * 1000;

#[derive(Debug, thiserror::Error)]
#[error("state store: {message}")]
pub struct StoreError {
    message: String,
}

impl StoreError {
    fn new(message: impl Into<String>) -> StoreError {
        StoreError {
            message: message.into(),
        }
    }
}

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        StoreError::new(e.to_string())
    }
}

impl From<serde_json::Error> for StoreError {
    fn from(e: serde_json::Error) -> Self {
        StoreError::new(format!("corrupt record: {e}"))
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

pub struct Store {
    dir: std::path::PathBuf,
    /// How the next event is numbered, and how many are kept.
    events: Mutex<EventIds>,
    /// The open database; swapped for a fresh one by [`Store::reopen`]
    /// (`None` only while that runs).
    trees: RwLock<Option<Arc<Trees>>>,
    /// Transitions (and events) kept; older ones are dropped.
    history_kept: u64,
}

/// The database and its trees.
struct Trees {
    db: sled::Db,
    releases: sled::Tree,
    history: sled::Tree,
    snapshots: sled::Tree,
    /// Lifecycle events for `Watch`, by id.
    events: sled::Tree,
    /// Outcomes of commands by request id, for retries.
    requests: sled::Tree,
    /// Small facts about the store itself (whether the last stop was clean).
    meta: sled::Tree,
    /// The rollout holding the lease ([`LEASE_HOLDER`]) and the ended
    /// ones ([`ENDED_ROLLOUTS`]).
    rollouts: sled::Tree,
}

impl Trees {
    fn open(dir: &Path) -> Result<Trees> {
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(CACHE_BYTES)
            .open()
            .map_err(|e| {
                StoreError::new(format!(
                    "cannot open {}: {e} (is another agent using this data dir?)",
                    dir.display()
                ))
            })?;
        Ok(Trees {
            releases: db.open_tree("releases")?,
            history: db.open_tree("history")?,
            snapshots: db.open_tree("snapshots")?,
            events: db.open_tree("events")?,
            requests: db.open_tree("requests")?,
            meta: db.open_tree("meta")?,
            rollouts: db.open_tree("rollouts")?,
            db,
        })
    }
}

/// `meta` key of a release's unfinished boot attempts.
fn boot_attempts_key(version: &Version) -> Vec<u8> {
    format!("boot-attempts/{version}").into_bytes()
}

/// `meta` key: present while an agent runs on the store, removed by a clean stop.
const RUNNING: &[u8] = b"running";

/// `meta` key: the version whose boot attempt is under way (its start has
/// not finished).
const BOOTING: &[u8] = b"booting";

/// `meta` key: the version of the canary serving, while one does.
const CANARY: &[u8] = b"canary";

/// `rollouts` key of the rollout holding the lease, while one does.
const LEASE_HOLDER: &[u8] = b"holder";

/// `rollouts` key prefix of ended rollouts, each under a big-endian
/// number that grows: oldest first.
const ENDED_ROLLOUTS: &[u8] = b"ended/";

fn ended_key(n: u64) -> Vec<u8> {
    [ENDED_ROLLOUTS, &n.to_be_bytes()].concat()
}

impl Store {
    pub fn open(dir: &Path, history_kept: usize) -> Result<Store> {
        let trees = Trees::open(dir)?;
        Ok(Store {
            dir: dir.to_owned(),
            events: Mutex::new(EventIds::read(&trees)?),
            trees: RwLock::new(Some(Arc::new(trees))),
            history_kept: history_kept.max(1) as u64,
        })
    }

    fn trees(&self) -> Result<Arc<Trees>> {
        self.trees
            .read()
            .clone()
            .ok_or_else(|| StoreError::new("the store is being reopened"))
    }

    /// Closes and reopens the database. sled refuses every write for the
    /// rest of the process once one failed (a full disk); a fresh handle
    /// works again once the cause is gone, with everything flushed before
    /// intact.
    pub fn reopen(&self) -> Result<()> {
        let mut slot = self.trees.write();
        drop(slot.take());
        // sled's flusher thread lets go of the directory's lock a moment
        // after the last handle is dropped.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        let trees = loop {
            match Trees::open(&self.dir) {
                Ok(trees) => break trees,
                Err(e) if std::time::Instant::now() >= deadline => return Err(e),
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(10)),
            }
        };
        // This process numbered events the store may not have kept: go on
        // from whichever is further.
        let read = EventIds::read(&trees)?;
        let mut ids = self.events.lock();
        ids.next = ids.next.max(read.next);
        ids.reserved = ids.next - 1;
        ids.count = read.count;
        drop(ids);
        *slot = Some(Arc::new(trees));
        Ok(())
    }

    /// Where the database lives.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Whether the store takes writes (after a failed one): writes, flushes
    /// and removes a small record.
    pub fn probe(&self) -> Result<()> {
        let t = self.trees()?;
        t.meta.insert(b"probe", &[0u8; 64][..])?;
        t.meta.remove(b"probe")?;
        self.flush()
    }

    /// Writes release records as they are (resynchronising after the store
    /// failed a commit), checked against the invariants, and flushes.
    pub fn write_releases(&self, releases: &[Release]) -> Result<()> {
        let t = self.trees()?;
        self.check_invariants_after(releases, &[])?;
        for release in releases {
            t.releases
                .insert(release.version.to_string(), serde_json::to_vec(release)?)?;
        }
        self.flush()
    }

    /// Refuses `releases` if writing them would break the lifecycle's
    /// invariants (exactly one permanent, at most one current).
    fn check_invariants_after(&self, releases: &[Release], removed: &[Version]) -> Result<()> {
        let mut after = self.releases()?;
        after.retain(|r| !removed.contains(&r.version));
        for changed in releases {
            match after.iter_mut().find(|r| r.version == changed.version) {
                Some(r) => *r = changed.clone(),
                None => after.push(changed.clone()),
            }
        }
        check_states(after.iter().map(|r| (&r.version, r.state))).map_err(|broken| {
            StoreError::new(format!(
                "write refused, it would break an invariant: {broken}"
            ))
        })
    }

    /// Makes every write so far durable.
    pub fn flush(&self) -> Result<()> {
        let t = self.trees()?;
        t.db.flush()?;
        Ok(())
    }

    /// All releases, lowest version first.
    pub fn releases(&self) -> Result<Vec<Release>> {
        let t = self.trees()?;
        let mut all = t
            .releases
            .iter()
            .values()
            .map(|v| Ok(serde_json::from_slice::<Release>(&v?)?))
            .collect::<Result<Vec<_>>>()?;
        all.sort_by(|a, b| a.version.cmp(&b.version));
        Ok(all)
    }

    pub fn release(&self, version: &Version) -> Result<Option<Release>> {
        let t = self.trees()?;
        t.releases
            .get(version.to_string())?
            .map(|v| Ok(serde_json::from_slice(&v)?))
            .transpose()
    }

    /// Journals the start of a transition, durably: numbers it, marks it
    /// running, and returns it. `request` (id, fingerprint): the command's
    /// request id, recorded as answered by this transition in the same
    /// flush.
    pub fn begin(
        &self,
        mut transition: Transition,
        request: Option<(&str, &str)>,
    ) -> Result<Transition> {
        let t = self.trees()?;
        // Ids count up from the last entry; one transition begins at a time.
        transition.id = last_id(&t.history)? + 1;
        transition.started_at_ms = crate::model::now_ms();
        transition.outcome = Outcome::Running;
        let entry = serde_json::to_vec(&transition)?;
        let recorded = request
            .map(|(id, fingerprint)| {
                let recorded = Recorded {
                    at_ms: transition.started_at_ms,
                    fingerprint: fingerprint.to_owned(),
                    outcome: RecordedOutcome::Transition {
                        id: transition.id,
                        finished: None,
                    },
                };
                Ok::<_, StoreError>((id.as_bytes(), serde_json::to_vec(&recorded)?))
            })
            .transpose()?;
        // One transaction: a crash never leaves the entry without its
        // request id, or the id without its entry.
        (&t.history, &t.requests)
            .transaction(|(history, requests)| {
                history.insert(&transition.id.to_be_bytes(), entry.as_slice())?;
                if let Some((id, recorded)) = &recorded {
                    requests.insert(*id, recorded.as_slice())?;
                }
                Ok::<_, ConflictableTransactionError<()>>(())
            })
            .map_err(transaction_error)?;
        self.flush()?;
        Ok(transition)
    }

    /// Forgets a request id (its command failed in a way a retry may not).
    pub fn forget_request(&self, id: &str) -> Result<()> {
        let t = self.trees()?;
        t.requests.remove(id.as_bytes())?;
        self.flush()
    }

    /// Writes the end of a transition together with the release records it
    /// changed and the removal of the releases it forgot (their records and
    /// snapshots), atomically, and flushes: a crash before leaves every
    /// release as it was.
    /// Refuses a commit that would break the lifecycle's invariants
    /// (exactly one permanent release, at most one current), whatever the
    /// caller computed.
    pub fn commit(
        &self,
        transition: &Transition,
        releases: &[Release],
        removed: &[Version],
    ) -> Result<()> {
        let t = self.trees()?;
        if !releases.is_empty() || !removed.is_empty() {
            self.check_invariants_after(releases, removed)?;
        }
        // Snapshots are written by the actor alone, which is here: the keys
        // read now are the keys there are.
        let mut doomed = removed
            .iter()
            .map(|v| v.to_string().into_bytes())
            .collect::<Vec<_>>();
        let first_snapshot = doomed.len();
        for version in removed {
            for key in t.snapshots.scan_prefix(snapshot_prefix(version)).keys() {
                doomed.push(key?.to_vec());
            }
        }
        let (doomed_releases, doomed_snapshots) = doomed.split_at(first_snapshot);
        let entry = serde_json::to_vec(transition)?;
        let records = releases
            .iter()
            .map(|r| Ok((r.version.to_string(), serde_json::to_vec(r)?)))
            .collect::<Result<Vec<_>>>()?;
        // The request id's record gets the end too: a retry is answered
        // with it once the history entry is trimmed.
        let request = match &transition.request_id {
            Some(id) => self
                .request(id)?
                .filter(|r| {
                    matches!(r.outcome, RecordedOutcome::Transition { id, .. } if id == transition.id)
                })
                .map(|mut recorded| {
                    recorded.outcome = RecordedOutcome::Transition {
                        id: transition.id,
                        finished: Some(Box::new(transition.clone())),
                    };
                    Ok::<_, StoreError>((id.as_bytes(), serde_json::to_vec(&recorded)?))
                })
                .transpose()?,
            None => None,
        };
        (&t.releases, &t.history, &t.requests, &t.snapshots)
            .transaction(|(rel, hist, requests, snapshots)| {
                for (key, value) in &records {
                    rel.insert(key.as_bytes(), value.as_slice())?;
                }
                for key in doomed_releases {
                    rel.remove(key.as_slice())?;
                }
                for key in doomed_snapshots {
                    snapshots.remove(key.as_slice())?;
                }
                hist.insert(&transition.id.to_be_bytes(), entry.as_slice())?;
                if let Some((id, recorded)) = &request {
                    requests.insert(*id, recorded.as_slice())?;
                }
                Ok::<_, ConflictableTransactionError<()>>(())
            })
            .map_err(transaction_error)?;
        self.trim_history()?;
        self.flush()
    }

    /// Drops the oldest transitions beyond the number kept. Ids are
    /// consecutive (each is the last one's plus one, and the last is never
    /// dropped) and only the oldest are ever removed, so the count is the
    /// span of ids (sled's `len` would walk the whole tree).
    fn trim_history(&self) -> Result<()> {
        let t = self.trees()?;
        let Some((first, _)) = t.history.first()? else {
            return Ok(());
        };
        let (first, last) = (key_id(&first)?, last_id(&t.history)?);
        for old in first..(last + 1).saturating_sub(self.history_kept) {
            t.history.remove(old.to_be_bytes())?;
        }
        Ok(())
    }

    /// One transition of the history.
    pub fn transition(&self, id: u64) -> Result<Option<Transition>> {
        let t = self.trees()?;
        t.history
            .get(id.to_be_bytes())?
            .map(|v| Ok(serde_json::from_slice(&v)?))
            .transpose()
    }

    /// Up to `limit` transitions after `after_id`, oldest first, and
    /// whether more follow.
    pub fn history_after(&self, after_id: u64, limit: usize) -> Result<(Vec<Transition>, bool)> {
        let t = self.trees()?;
        // Excluded, not `after_id + 1..`: the last id has no next.
        let after = (Bound::Excluded(after_id.to_be_bytes()), Bound::Unbounded);
        let mut page = t
            .history
            .range(after)
            .values()
            .take(limit + 1)
            .map(|v| Ok(serde_json::from_slice::<Transition>(&v?)?))
            .collect::<Result<Vec<_>>>()?;
        let more = page.len() > limit;
        page.truncate(limit);
        Ok((page, more))
    }

    /// Records an event (numbering it) and drops the oldest beyond the
    /// number kept. Durable with the next flush; its id never is given
    /// to another event, even if the agent dies before that flush.
    pub fn record_event(&self, mut event: Event) -> Result<Event> {
        let t = self.trees()?;
        let mut ids = self.events.lock();
        if ids.next > ids.reserved {
            // Reserve the next block of ids durably before handing any out.
            let reserved = ids.next + EVENT_ID_BLOCK - 1;
            t.meta
                .insert(EVENT_IDS_RESERVED, &reserved.to_be_bytes()[..])?;
            t.db.flush()?;
            ids.reserved = reserved;
        }
        event.id = ids.next;
        // A transition is kept once, in the history; its events name it.
        let stored = StoredEvent {
            transition_id: event.transition.as_ref().map(|t| t.id),
            event: Event {
                transition: None,
                ..event.clone()
            },
        };
        t.events
            .insert(event.id.to_be_bytes(), serde_json::to_vec(&stored)?)?;
        ids.next += 1;
        ids.count += 1;
        // Trimmed by count: ids have gaps (after a crash), counts do not.
        while ids.count > self.history_kept {
            if t.events.pop_min()?.is_none() {
                break;
            }
            ids.count -= 1;
        }
        Ok(event)
    }

    /// Up to `limit` events after `after_id`, oldest first.
    pub fn events_after(&self, after_id: u64, limit: usize) -> Result<Vec<Event>> {
        let Some(first) = after_id.checked_add(1) else {
            return Ok(Vec::new());
        };
        let t = self.trees()?;
        t.events
            .range(first.to_be_bytes()..)
            .values()
            .take(limit)
            .map(|v| {
                let stored: StoredEvent = serde_json::from_slice(&v?)?;
                let mut event = stored.event;
                if let Some(id) = stored.transition_id {
                    event.transition = self.transition(id)?.map(|mut t| {
                        // As it was when it started, not as it ended.
                        if event.kind == EventKind::TransitionStarted {
                            t.outcome = Outcome::Running;
                            (t.duration_us, t.switch_wait_us) = (0, 0);
                            (t.error, t.error_reason) = (None, None);
                        }
                        t
                    });
                }
                Ok(event)
            })
            .collect()
    }

    pub fn last_event_id(&self) -> Result<u64> {
        let t = self.trees()?;
        last_id(&t.events)
    }

    /// The outcome recorded for a request id.
    pub fn request(&self, id: &str) -> Result<Option<Recorded>> {
        let t = self.trees()?;
        t.requests
            .get(id.as_bytes())?
            .map(|v| Ok(serde_json::from_slice(&v)?))
            .transpose()
    }

    /// Records a command's outcome under its request id (durable with the
    /// transition's commit, or the next flush).
    pub fn record_request(&self, id: &str, recorded: &Recorded) -> Result<()> {
        let t = self.trees()?;
        t.requests
            .insert(id.as_bytes(), serde_json::to_vec(recorded)?)?;
        Ok(())
    }

    /// Forgets request ids recorded before `before_ms`.
    pub fn prune_requests(&self, before_ms: i64) -> Result<usize> {
        let t = self.trees()?;
        let mut pruned = 0;
        for entry in t.requests.iter() {
            let (key, value) = entry?;
            let recorded: Recorded = serde_json::from_slice(&value)?;
            if recorded.at_ms < before_ms {
                t.requests.remove(key)?;
                pruned += 1;
            }
        }
        Ok(pruned)
    }

    /// Opens the store at `dir`, waiting up to `wait` for another process
    /// (the worker handing over to this one) to let go of it.
    pub fn open_waiting(
        dir: &Path,
        history_kept: usize,
        wait: std::time::Duration,
    ) -> Result<Store> {
        let deadline = std::time::Instant::now() + wait;
        loop {
            match Store::open(dir, history_kept) {
                Err(e) if std::time::Instant::now() < deadline => {
                    tracing::debug!(error = %e, "the store is still held; waiting");
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                opened => return opened,
            }
        }
    }

    /// Marks the store in use by a running agent, durably; returns whether
    /// the previous agent stopped cleanly (true for a new store).
    pub fn mark_running(&self) -> Result<bool> {
        let t = self.trees()?;
        let was_clean = t.meta.get(RUNNING)?.is_none();
        t.meta.insert(RUNNING, &[1u8][..])?;
        self.flush()?;
        Ok(was_clean)
    }

    /// Counts, durably, one more attempt to start `version` at boot, and
    /// returns how many attempts before this one never finished: an
    /// attempt ends with [`Store::boot_started`], or not at all if starting
    /// the release killed the process. `last_counts`: whether the last
    /// worker's end was its own doing; if not, and that worker was starting
    /// this very release, its unfinished attempt is forgotten.
    pub fn boot_attempt(&self, version: &Version, last_counts: bool) -> Result<u32> {
        let t = self.trees()?;
        let key = boot_attempts_key(version);
        let mut before = t
            .meta
            .get(&key)?
            .and_then(|v| <[u8; 4]>::try_from(v.as_ref()).ok())
            .map_or(0, u32::from_le_bytes);
        let was_starting_it =
            t.meta.get(BOOTING)?.as_deref() == Some(version.to_string().as_bytes());
        if !last_counts && was_starting_it {
            before = before.saturating_sub(1);
        }
        t.meta.insert(BOOTING, version.to_string().as_bytes())?;
        t.meta.insert(key, &(before + 1).to_le_bytes()[..])?;
        self.flush()?;
        Ok(before)
    }

    /// `version` started: its boot attempts are forgotten.
    pub fn boot_started(&self, version: &Version) -> Result<()> {
        let t = self.trees()?;
        t.meta.remove(boot_attempts_key(version))?;
        t.meta.remove(BOOTING)?;
        self.flush()
    }

    /// Records, durably, which release serves as the canary (`None`: none
    /// does any more), so that a canary the process took with it when it
    /// died still gets its end recorded.
    pub fn set_canary(&self, version: Option<&Version>) -> Result<()> {
        let t = self.trees()?;
        match version {
            Some(version) => t.meta.insert(CANARY, version.to_string().as_bytes())?,
            None => t.meta.remove(CANARY)?,
        };
        self.flush()
    }

    /// The canary recorded by [`Store::set_canary`].
    pub fn canary(&self) -> Result<Option<Version>> {
        let t = self.trees()?;
        t.meta
            .get(CANARY)?
            .map(|v| {
                std::str::from_utf8(&v)
                    .ok()
                    .and_then(|v| Version::parse(v).ok())
                    .ok_or_else(|| StoreError::new("corrupt canary record"))
            })
            .transpose()
    }

    /// The rollout holding the lease, and the ended ones, newest first.
    pub fn rollouts(&self) -> Result<(Option<Rollout>, Vec<Rollout>)> {
        let t = self.trees()?;
        let holder = t
            .rollouts
            .get(LEASE_HOLDER)?
            .map(|v| Ok::<_, StoreError>(serde_json::from_slice(&v)?))
            .transpose()?;
        let ended = t
            .rollouts
            .scan_prefix(ENDED_ROLLOUTS)
            .values()
            .rev()
            .map(|v| Ok(serde_json::from_slice(&v?)?))
            .collect::<Result<_>>()?;
        Ok((holder, ended))
    }

    /// Writes the lease's holder (`None`: nobody holds it) and the
    /// rollouts that just ended (oldest first) in one transaction, keeps
    /// the last [`ENDED_KEPT`] ended ones, and flushes: a lease outlives
    /// any crash after it was answered.
    pub fn write_rollouts(&self, holder: Option<&Rollout>, ended: &[Rollout]) -> Result<()> {
        let t = self.trees()?;
        let holder = holder.map(serde_json::to_vec).transpose()?;
        // One writer at a time (the engine's lease lock): the last number
        // read now is the last there is.
        let last = match t.rollouts.scan_prefix(ENDED_ROLLOUTS).keys().next_back() {
            Some(key) => key_id(&key?[ENDED_ROLLOUTS.len()..])?,
            None => 0,
        };
        let ended = (last + 1..)
            .zip(ended)
            .map(|(n, r)| Ok((ended_key(n), serde_json::to_vec(r)?)))
            .collect::<Result<Vec<_>>>()?;
        t.rollouts
            .transaction(|tree| {
                match &holder {
                    Some(record) => tree.insert(LEASE_HOLDER, record.as_slice())?,
                    None => tree.remove(LEASE_HOLDER)?,
                };
                for (key, record) in &ended {
                    tree.insert(key.as_slice(), record.as_slice())?;
                }
                Ok::<_, ConflictableTransactionError<()>>(())
            })
            .map_err(transaction_error)?;
        let kept: Vec<_> = t
            .rollouts
            .scan_prefix(ENDED_ROLLOUTS)
            .keys()
            .collect::<Result<_, _>>()?;
        for old in kept.iter().take(kept.len().saturating_sub(ENDED_KEPT)) {
            t.rollouts.remove(old)?;
        }
        self.flush()
    }

    /// Records a clean stop, durably.
    pub fn mark_stopped(&self) -> Result<()> {
        let t = self.trees()?;
        t.meta.remove(RUNNING)?;
        self.flush()
    }

    /// The last `limit` transitions (all when 0), oldest first.
    pub fn history(&self, limit: usize) -> Result<Vec<Transition>> {
        let t = self.trees()?;
        let take = if limit == 0 { usize::MAX } else { limit };
        let mut entries = t
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
        let trees = self.trees()?;
        let mut aborted = Vec::new();
        for entry in trees.history.iter().values() {
            let mut t: Transition = serde_json::from_slice(&entry?)?;
            if t.outcome == Outcome::Running {
                t.outcome = Outcome::Aborted;
                t.error = Some("the agent stopped before this transition finished".into());
                t.error_reason = Some(crate::reason::Reason::Internal);
                trees
                    .history
                    .insert(t.id.to_be_bytes(), serde_json::to_vec(&t)?)?;
                // Its request id answers "aborted" after the entry is trimmed.
                if let Some(id) = t.request_id.clone() {
                    if let Some(mut recorded) = self.request(&id)? {
                        if matches!(recorded.outcome, RecordedOutcome::Transition { id, .. } if id == t.id)
                        {
                            recorded.outcome = RecordedOutcome::Transition {
                                id: t.id,
                                finished: Some(Box::new(t.clone())),
                            };
                            self.record_request(&id, &recorded)?;
                        }
                    }
                }
                aborted.push(t);
            }
        }
        self.flush()?;
        Ok(aborted)
    }

    /// Records a snapshot (not flushed: the caller flushes when it must be
    /// durable). Keeps the last few per version.
    pub fn put_snapshot(&self, snapshot: &Snapshot) -> Result<()> {
        let t = self.trees()?;
        let prefix = snapshot_prefix(&snapshot.version);
        let mut key = prefix.clone();
        key.extend_from_slice(&t.db.generate_id()?.to_be_bytes());
        let mut value = Vec::with_capacity(12 + snapshot.bytes.len());
        value.extend_from_slice(&snapshot.state_version.to_be_bytes());
        value.extend_from_slice(&snapshot.taken_at_ms.to_be_bytes());
        value.extend_from_slice(&snapshot.bytes);
        t.snapshots.insert(key, value)?;
        let keys: Vec<_> = t
            .snapshots
            .scan_prefix(&prefix)
            .keys()
            .collect::<Result<_, _>>()?;
        for old in keys.iter().take(keys.len().saturating_sub(SNAPSHOTS_KEPT)) {
            t.snapshots.remove(old)?;
        }
        Ok(())
    }

    /// The most recent snapshot of a release.
    pub fn last_snapshot(&self, version: &Version) -> Result<Option<Snapshot>> {
        let t = self.trees()?;
        let Some((_, value)) = t
            .snapshots
            .scan_prefix(snapshot_prefix(version))
            .last()
            .transpose()?
        else {
            return Ok(None);
        };
        if value.len() < 12 {
            return Err(StoreError::new(format!("corrupt snapshot of {version}")));
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
}

/// An event as kept in the store: its transition by id only.
#[derive(serde::Serialize, serde::Deserialize)]
struct StoredEvent {
    #[serde(flatten)]
    event: Event,
    #[serde(default)]
    transition_id: Option<u64>,
}

/// Event ids reserved at a time. Events are broadcast before sled's next
/// flush makes them durable; if the agent dies in between they are gone,
/// and new events must not take their ids (a watcher resuming after an id
/// it saw would skip them). So ids are handed out only from a block whose
/// end is flushed first; after a crash, numbering resumes past it. A clean
/// stop flushes every event, and numbering resumes right after the last.
const EVENT_ID_BLOCK: u64 = 1024;

/// `meta` key: the last event id reserved (big-endian u64).
const EVENT_IDS_RESERVED: &[u8] = b"event-ids-reserved";

/// How events are numbered and how many the store holds.
struct EventIds {
    /// The id of the next event.
    next: u64,
    /// Ids up to this one may be handed out without another flush.
    reserved: u64,
    /// Events in the store (counted once at open).
    count: u64,
}

impl EventIds {
    fn read(trees: &Trees) -> Result<EventIds> {
        let last = last_id(&trees.events)?;
        let reserved = trees
            .meta
            .get(EVENT_IDS_RESERVED)?
            .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
            .map_or(0, u64::from_be_bytes);
        // Still marked running: the last agent died, and may have handed
        // out ids up to its reservation that never became durable.
        let crashed = trees.meta.get(RUNNING)?.is_some();
        let next = if crashed { last.max(reserved) } else { last } + 1;
        Ok(EventIds {
            next,
            // A block is reserved afresh before the next event.
            reserved: next - 1,
            count: trees.events.len() as u64,
        })
    }
}

fn transaction_error(e: TransactionError<()>) -> StoreError {
    match e {
        TransactionError::Storage(e) => StoreError::from(e),
        TransactionError::Abort(()) => StoreError::new("transaction aborted"),
    }
}

fn key_id(key: &[u8]) -> Result<u64> {
    key.try_into()
        .map(u64::from_be_bytes)
        .map_err(|_| StoreError::new("corrupt key"))
}

/// The id of the last entry of a tree keyed by big-endian ids (0: empty).
fn last_id(tree: &sled::Tree) -> Result<u64> {
    tree.last()?.map_or(Ok(0), |(key, _)| key_id(&key))
}

fn snapshot_prefix(version: &Version) -> Vec<u8> {
    let mut prefix = version.to_string().into_bytes();
    prefix.push(0);
    prefix
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ReleaseState, TransitionKind};

    fn draft(kind: TransitionKind, to: Option<&Version>) -> Transition {
        Transition {
            id: 0,
            started_at_ms: 0,
            kind,
            from: None,
            to: to.cloned(),
            outcome: Outcome::Running,
            duration_us: 0,
            switch_wait_us: 0,
            error: None,
            automatic: false,
            reason: None,
            request_id: None,
            error_reason: None,
            identity: None,
        }
    }

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
            failure: None,
            signed_by: None,
            signature: String::new(),
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
                .begin(draft(TransitionKind::Upgrade, Some(&v2)), None)
                .unwrap();
            t.outcome = Outcome::Ok;
            store
                .commit(&t, &[release("0.2.0", ReleaseState::Permanent)], &[])
                .unwrap();
            store
                .begin(draft(TransitionKind::Downgrade, None), None)
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
                .begin(draft(TransitionKind::Stage, None), None)
                .unwrap();
            t.outcome = Outcome::Ok;
            store.commit(&t, &[], &[]).unwrap();
        }
        let ids: Vec<u64> = store.history(0).unwrap().iter().map(|t| t.id).collect();
        assert_eq!(ids, [8, 9, 10, 11, 12]);
    }

    fn event_ids(store: &Store) -> Vec<u64> {
        let events = store.events_after(0, usize::MAX).unwrap();
        events.iter().map(|e| e.id).collect()
    }

    fn record(store: &Store, n: usize) -> Vec<u64> {
        (0..n)
            .map(|_| {
                let event = Event::new(crate::model::EventKind::CheckpointSkipped);
                store.record_event(event).unwrap().id
            })
            .collect()
    }

    #[test]
    fn events_survive_a_clean_stop_numbered_on_without_a_gap() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path(), 100).unwrap();
            store.mark_running().unwrap();
            assert_eq!(record(&store, 3), [1, 2, 3]);
            store.mark_stopped().unwrap();
        }
        let store = reopen(dir.path());
        store.mark_running().unwrap();
        assert_eq!(record(&store, 1), [4]);
        assert_eq!(event_ids(&store), [1, 2, 3, 4]);
    }

    #[test]
    fn after_a_crash_events_are_kept_and_no_id_is_given_twice() {
        let dir = tempfile::tempdir().unwrap();
        let before = {
            let store = Store::open(dir.path(), 100).unwrap();
            store.mark_running().unwrap();
            let ids = record(&store, 3);
            store.flush().unwrap();
            // Handed out (a watcher may have seen them), never flushed
            // by the agent: no clean stop follows.
            ids.into_iter().chain(record(&store, 2)).collect::<Vec<_>>()
        };
        let store = reopen(dir.path());
        store.mark_running().unwrap();
        let after = record(&store, 1)[0];
        assert!(
            before.iter().all(|&id| id < after),
            "{after} after {before:?}"
        );
        // What was durable is all still there.
        assert_eq!(event_ids(&store)[..3], [1, 2, 3]);
        assert_eq!(*event_ids(&store).last().unwrap(), after);
    }

    #[test]
    fn events_are_trimmed_by_count_across_reopening() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path(), 5).unwrap();
            record(&store, 4);
            store.mark_stopped().unwrap();
        }
        let store = Store::open_waiting(dir.path(), 5, std::time::Duration::from_secs(2)).unwrap();
        assert_eq!(record(&store, 3), [5, 6, 7]);
        assert_eq!(event_ids(&store), [3, 4, 5, 6, 7]);
    }

    fn rollout(id: &str, ended_at_ms: Option<i64>) -> Rollout {
        Rollout {
            report: crate::lease::Report {
                id: id.into(),
                attempt: 1,
                version: Version::new(0, 2, 0),
                step: "wave 1 of 2".into(),
                outcome: String::new(),
                agents: crate::lease::Agents::default(),
                soak_until_ms: 0,
                command: String::new(),
            },
            owner: "ci".into(),
            started_at_ms: 1,
            updated_at_ms: 2,
            expires_at_ms: 3,
            ended_at_ms,
            taken_from: None,
        }
    }

    #[test]
    fn the_lease_and_the_last_ended_rollouts_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let holder = rollout("b", None);
        {
            let store = Store::open(dir.path(), 100).unwrap();
            for n in 0..(ENDED_KEPT as i64 + 5) {
                store
                    .write_rollouts(None, &[rollout(&format!("r{n}"), Some(n))])
                    .unwrap();
            }
            store
                .write_rollouts(Some(&holder), &[rollout("a", Some(1000))])
                .unwrap();
        }
        let store = reopen(dir.path());
        let (kept, ended) = store.rollouts().unwrap();
        assert_eq!(kept, Some(holder));
        assert_eq!(ended.len(), ENDED_KEPT);
        assert_eq!(ended[0].report.id, "a");
        assert_eq!(ended[1].report.id, format!("r{}", ENDED_KEPT + 4));
        store.write_rollouts(None, &[]).unwrap();
        assert_eq!(store.rollouts().unwrap().0, None);
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
        assert_eq!(store.trees().unwrap().snapshots.len(), SNAPSHOTS_KEPT);
        assert!(store
            .last_snapshot(&Version::new(0, 3, 0))
            .unwrap()
            .is_none());
    }
}
