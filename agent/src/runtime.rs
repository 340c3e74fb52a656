//! The running release: the one instance that serves new requests, the
//! instances still finishing requests, and the switch between them.
//!
//! Every request calls the plugin while holding a read lock on the slot;
//! a switch takes the write lock. Taking it *is* the quiesce: it waits for
//! the calls in flight on the old code and holds new requests back (they
//! wait, none is refused). Under the write lock the old state is
//! snapshotted, migrated and restored into the new instance, and the slot
//! is swapped; releasing the lock lets the held requests through, onto the
//! new code. Since no call into the old instance can run after the
//! snapshot, no state change is lost or counted twice.
//!
//! Counting is lock-free on the request path: each instance's counters
//! (what the soak watcher and `status` read) and each version's
//! [`Totals`] by status code (what `/metrics` reads) are atomics sharded
//! by thread.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use nine9s_host::{CallError, Instance, Request, Response};
use nine9s_manifest::Version;
use tokio::sync::RwLock;

/// One instance of a release, with its request counters.
#[derive(Debug)]
pub struct Loaded {
    pub version: Version,
    /// The version as text: every response carries it.
    pub label: &'static str,
    /// The version's responses by status code, across all its instances.
    totals: &'static Totals,
    pub instance: Instance,
    /// The handler may block: calls hand the thread's other work elsewhere.
    blocking: bool,
    shards: [Shard; SHARDS],
}

/// Counter shards per instance. Every request bumps counters; threads that
/// shared one cache line for them would queue on it.
const SHARDS: usize = 8;

/// One thread's share of an instance's counters, on a cache line of its own.
#[derive(Debug, Default)]
#[repr(align(64))]
struct Shard {
    in_flight: AtomicU64,
    served: AtomicU64,
    errors: AtomicU64,
    panics: AtomicU64,
}

/// The shard this thread counts in.
fn my_shard() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static MINE: usize = NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS;
    }
    MINE.with(|mine| *mine)
}

/// Status codes counted one by one: the range RFC 9110 defines.
const FIRST_CODE: u16 = 100;
const LAST_CODE: u16 = 599;
/// One slot per code of the range, and a last one for anything else.
const CODES: usize = (LAST_CODE - FIRST_CODE) as usize + 2;

/// A version's responses by status code, for the whole life of the
/// process: kept after its instances are unloaded, since a counter that
/// went down would read as a restart to Prometheus. One per version ever
/// loaded (32 KiB each), like its label.
pub struct Totals {
    /// The version as text.
    pub label: &'static str,
    shards: [CodeShard; SHARDS],
}

impl std::fmt::Debug for Totals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Totals")
            .field("label", &self.label)
            .finish_non_exhaustive()
    }
}

/// One thread's share of a version's counts, on cache lines of its own.
#[repr(align(64))]
struct CodeShard([AtomicU64; CODES]);

impl Totals {
    fn count(&self, shard: usize, status: u16) {
        let slot = if (FIRST_CODE..=LAST_CODE).contains(&status) {
            usize::from(status - FIRST_CODE)
        } else {
            CODES - 1
        };
        self.shards[shard].0[slot].fetch_add(1, Ordering::Relaxed);
    }

    /// The status codes answered at least once and how often; `None`
    /// stands for every status outside 100–599.
    pub fn responses(&self) -> Vec<(Option<u16>, u64)> {
        (0..CODES)
            .filter_map(|slot| {
                let n: u64 = self
                    .shards
                    .iter()
                    .map(|s| s.0[slot].load(Ordering::Relaxed))
                    .sum();
                let code = (slot < CODES - 1).then(|| FIRST_CODE + slot as u16);
                (n > 0).then_some((code, n))
            })
            .collect()
    }
}

static TOTALS: Mutex<Vec<&'static Totals>> = Mutex::new(Vec::new());

/// The version's label and totals for the whole life of the process, so
/// responses carry the label without touching shared reference counts and
/// the totals outlive every instance.
fn totals(version: &Version) -> &'static Totals {
    let text = version.to_string();
    let mut all = TOTALS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(known) = all.iter().find(|known| known.label == text) {
        return known;
    }
    let leaked: &'static Totals = Box::leak(Box::new(Totals {
        label: Box::leak(text.into_boxed_str()),
        shards: std::array::from_fn(|_| CodeShard(std::array::from_fn(|_| AtomicU64::new(0)))),
    }));
    all.push(leaked);
    leaked
}

/// The totals of every version loaded since the process started.
pub fn all_totals() -> Vec<&'static Totals> {
    TOTALS.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// Counters of one instance at a moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub in_flight: u64,
    pub served: u64,
    /// 5xx responses, panics included.
    pub errors: u64,
    pub panics: u64,
}

impl Loaded {
    pub fn new(version: Version, blocking: bool, instance: Instance) -> Loaded {
        let totals = totals(&version);
        Loaded {
            label: totals.label,
            totals,
            version,
            instance,
            blocking,
            shards: Default::default(),
        }
    }

    pub fn counters(&self) -> Counters {
        let sum = |field: fn(&Shard) -> &AtomicU64| -> u64 {
            self.shards
                .iter()
                .map(|s| field(s).load(Ordering::Relaxed))
                .sum()
        };
        Counters {
            in_flight: sum(|s| &s.in_flight),
            served: sum(|s| &s.served),
            errors: sum(|s| &s.errors),
            panics: sum(|s| &s.panics),
        }
    }
}

/// What serving one request produced, and on which release.
pub struct Handled {
    pub version: &'static str,
    pub result: Result<Response, CallError>,
}

/// What a switch did.
pub struct Switched {
    /// The instance that served before; the caller drains and drops it.
    pub old: Arc<Loaded>,
    /// From asking for the switch until new requests flowed again.
    pub wait: Duration,
}

#[derive(Debug)]
pub enum SwitchError<E> {
    /// In-flight calls did not finish in time; nothing changed.
    Quiesce,
    /// Preparing the new instance failed; nothing changed.
    Prepare(E),
}

pub struct Runtime {
    slot: RwLock<Arc<Loaded>>,
    /// Every instance still alive, serving or draining (for `status`).
    resident: Mutex<Vec<Weak<Loaded>>>,
}

impl Runtime {
    pub fn new(first: Loaded) -> Runtime {
        let first = Arc::new(first);
        Runtime {
            resident: Mutex::new(vec![Arc::downgrade(&first)]),
            slot: RwLock::new(first),
        }
    }

    /// Serves one request on the active release.
    pub async fn handle(&self, request: &Request<'_>) -> Handled {
        let slot = self.slot.read().await;
        let loaded = &**slot;
        let mine = my_shard();
        let shard = &loaded.shards[mine];
        shard.in_flight.fetch_add(1, Ordering::Relaxed);
        let result = if loaded.blocking {
            // The read lock stays held, so a switch still waits for this call.
            tokio::task::block_in_place(|| loaded.instance.handle(request))
        } else {
            loaded.instance.handle(request)
        };
        shard.in_flight.fetch_sub(1, Ordering::Relaxed);
        shard.served.fetch_add(1, Ordering::Relaxed);
        match &result {
            Ok(response) if response.status < 500 => {}
            Ok(_) | Err(CallError::Failed(_) | CallError::BadStatus(_)) => {
                shard.errors.fetch_add(1, Ordering::Relaxed);
            }
            Err(CallError::Panicked(_)) => {
                shard.errors.fetch_add(1, Ordering::Relaxed);
                shard.panics.fetch_add(1, Ordering::Relaxed);
            }
        }
        // The status the client gets: `http` answers 500 for a failed call
        // and for what hyper cannot send (outside 100–999).
        let status = match &result {
            Ok(response) if (100..=999).contains(&response.status) => response.status,
            _ => 500,
        };
        loaded.totals.count(mine, status);
        Handled {
            version: loaded.label,
            result,
        }
    }

    /// The instance serving new requests.
    pub async fn active(&self) -> Arc<Loaded> {
        Arc::clone(&*self.slot.read().await)
    }

    /// Runs `f` on the active instance at a moment with no request in
    /// flight on it (a consistent snapshot), looking for one for at most
    /// `within`. It never queues as a writer, so new requests are never
    /// held back; `None` if no such moment came.
    pub async fn try_quiesced<T>(
        &self,
        within: Duration,
        f: impl FnOnce(&Loaded) -> T,
    ) -> Option<T> {
        let deadline = Instant::now() + within;
        loop {
            if let Ok(slot) = self.slot.try_write() {
                return Some(f(&slot));
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Switches to the instance `prepare` builds from the quiesced old one.
    /// If `prepare` fails, or the old instance does not quiesce within
    /// `timeout`, the old instance keeps serving.
    pub async fn switch<E>(
        &self,
        timeout: Duration,
        prepare: impl FnOnce(&Loaded) -> Result<Loaded, E>,
    ) -> Result<Switched, SwitchError<E>> {
        let asked = Instant::now();
        let mut slot = tokio::time::timeout(timeout, self.slot.write())
            .await
            .map_err(|_| SwitchError::Quiesce)?;
        let next = Arc::new(prepare(&slot).map_err(SwitchError::Prepare)?);
        self.remember(&next);
        let old = std::mem::replace(&mut *slot, next);
        drop(slot);
        Ok(Switched {
            old,
            wait: asked.elapsed(),
        })
    }

    /// Every instance still alive: the active one first, then the draining ones.
    pub fn resident(&self) -> Vec<Arc<Loaded>> {
        let mut list = self.resident.lock().unwrap_or_else(|e| e.into_inner());
        list.retain(|w| w.strong_count() > 0);
        list.iter().rev().filter_map(Weak::upgrade).collect()
    }

    fn remember(&self, loaded: &Arc<Loaded>) {
        let mut list = self.resident.lock().unwrap_or_else(|e| e.into_inner());
        list.retain(|w| w.strong_count() > 0);
        list.push(Arc::downgrade(loaded));
    }
}

/// Waits, up to `grace`, until nobody but the caller holds `old`; the
/// caller then drops it, which releases its library. Requests never hold it
/// past their call (responses are copied out of the plugin under the read
/// lock), so what this waits for is a `status` call looking at it.
pub async fn drain(old: &Arc<Loaded>, grace: Duration) {
    let deadline = Instant::now() + grace;
    while Arc::strong_count(old) > 1 {
        if Instant::now() >= deadline {
            tracing::warn!(version = %old.version, "drain grace over with the old instance still held");
            return;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_count_each_code_and_lump_the_rest_as_other() {
        let version: Version = "0.0.1-totals-test".parse().unwrap();
        let totals = totals(&version);
        for (shard, status) in [(0, 200), (5, 200), (1, 404), (2, 599), (3, 600), (4, 999)] {
            totals.count(shard, status);
        }
        assert_eq!(
            totals.responses(),
            [(Some(200), 2), (Some(404), 1), (Some(599), 1), (None, 2)]
        );
        // One block per version, found again.
        assert!(std::ptr::eq(totals, super::totals(&version)));
        assert!(all_totals().iter().any(|t| std::ptr::eq(*t, totals)));
    }
}
