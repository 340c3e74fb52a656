//! The running release: the one instance that serves new requests, the
//! instances still finishing requests, and the switch between them.
//!
//! The request path takes no lock and touches no shared cache line: it
//! reads the active instance from an `ArcSwap`, counts itself in flight on
//! that instance (a per-thread shard), and checks that the gate is open and
//! the instance is still the active one; otherwise it steps back and tries
//! again (waiting while the gate is closed).
//!
//! A switch that carries state closes the gate — new requests wait, none is
//! refused — and waits for the calls in flight on the old code: that *is*
//! the quiesce. Behind the closed gate the old state is snapshotted,
//! migrated and restored into the new instance, and the active instance is
//! swapped; opening the gate lets the held requests through, onto the new
//! code. All of it in sequentially consistent order (a request counts
//! itself, then reads the gate and the active id; a switch closes the gate,
//! then reads the counts; it changes the active id before it opens the
//! gate), so no call into the old instance can run after the snapshot, and
//! no state change is lost or counted twice.
//!
//! A switch from a release that keeps no state, carrying none, holds
//! nothing: the new instance is active at once, and the old one finishes
//! the calls it has. (From a release that keeps state the gate closes even
//! when none crosses: its snapshot must see every call.)
//!
//! A canary is a second instance beside the active one that serves a
//! [`Split`] of the requests (a share by weight, or those with a header).
//! Only releases that keep no state have one, so its requests never wait
//! at the gate.
//!
//! Counting is lock-free on the request path: each instance's counters
//! (what the soak watcher and `status` read) and each version's
//! [`Totals`] by status code (what `/metrics` reads) are atomics sharded
//! by thread.
//!
//! A release that serves as a service (ABI v3) is not called here: a
//! request is *handed* to its instance ([`Runtime::submit`]), counted in
//! flight only while it is handed over, and its response comes later
//! (`streaming.rs`). The gate and the quiesce above hold for the hand-over
//! alone: a switch never waits for a service's requests under way, which
//! finish on the old instance (its drain).
//!
//! Every wait here is woken by what it waits for — the last call in flight
//! on an instance ending, the last other handle to an instance let go —
//! never by polling, and each has a deadline.
//!
//! A call runs inline on the thread that serves its connection, and tells
//! the connection's [`Call`] record when it begins and ends: a call past
//! `--request-timeout` is abandoned by the watchdog (`stuck.rs`), which
//! counts it out of flight here ([`Runtime::abandon`]) and into the
//! instance's stuck calls. An abandoned call is the one exception to the
//! quiesce above: it may still be running in the old instance when a
//! switch snapshots it — it is not waited for, and the switch says so.

use std::future::poll_fn;
use std::ops::Deref;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};

use parking_lot::Mutex;
use std::time::{Duration, Instant};

use arc_swap::{ArcSwap, ArcSwapOption};
use bytes::Bytes;
use hyper::header::{HeaderName, HeaderValue};
use nine9s_host::{CallError, ConnectionLimits, Handed, Instance, Request, RequestHead, Response};
use nine9s_manifest::Version;
use tokio::sync::Notify;

use crate::stuck::Call;

/// A handle to one instance of a release: what the runtime hands out as
/// `Arc<Loaded>`, and derefs to the instance ([`Core`]). The runtime's
/// handle to the active instance (or the canary's) is shared by every
/// request and reader of it; [`Runtime::resident`] makes one for each
/// call; whoever takes an instance out of service gets one of its own
/// ([`Switched::old`], a canary replaced or cleared), and [`released`]
/// waits until that is the only one left. When the last clone of any other
/// handle goes, its drop says so.
#[derive(Debug)]
pub struct Loaded {
    // Declared first, so dropped first: the instance is let go of before
    // `let_go` tells the waiter, which then finds it let go of.
    core: Arc<Core>,
    let_go: LetGo,
}

/// Wakes [`released`] when the handle it is part of has let go.
#[derive(Debug)]
struct LetGo(Arc<Notify>);

impl Drop for LetGo {
    fn drop(&mut self) {
        self.0.notify_waiters();
    }
}

impl Loaded {
    pub fn new(version: Version, blocking: bool, instance: Instance) -> Loaded {
        Loaded::around(Arc::new(Core::new(version, blocking, instance)))
    }

    fn around(core: Arc<Core>) -> Loaded {
        let let_go = LetGo(Arc::clone(&core.let_go));
        Loaded { core, let_go }
    }

    /// Another handle to the same instance.
    fn another(&self) -> Loaded {
        Loaded::around(Arc::clone(&self.core))
    }
}

impl Deref for Loaded {
    type Target = Core;

    fn deref(&self) -> &Core {
        &self.core
    }
}

/// One instance of a release, with its request counters: what every
/// [`Loaded`] handle to it reaches.
#[derive(Debug)]
pub struct Core {
    /// Unique in the process: which instance is active, in one atomic.
    id: u64,
    pub version: Version,
    /// The version as text: every response carries it.
    pub label: &'static str,
    /// The version's responses by status code, across all its instances.
    totals: &'static Totals,
    pub instance: Instance,
    /// The handler may block: calls hand the thread's other work elsewhere.
    blocking: bool,
    /// A service (ABI v3): requests are handed to it ([`Runtime::submit`]).
    service: bool,
    /// One of its calls ran long on a data-plane thread: its calls are
    /// handed off those threads from then on, as if it were `blocking`.
    offload: AtomicBool,
    /// Calls abandoned past the request timeout that have not returned (a
    /// moment below zero when one returns as it is abandoned).
    stuck: AtomicI64,
    /// Calls abandoned past the request timeout, ever.
    timed_out: AtomicU64,
    /// A snapshot of it is running (one abandoned past its deadline may
    /// run on): no second one is started beside it.
    snapshotting: AtomicBool,
    calls: Calls,
    /// Told each time a handle to it lets go (the handles hold it).
    let_go: Arc<Notify>,
}

/// The calls in flight on an instance, counted by thread, and the waits
/// for them to end.
#[derive(Debug, Default)]
struct Calls {
    /// Shared with the requests handed to a service, which count their
    /// outcome when it comes ([`Tally`]) without holding the instance.
    shards: Arc<[Shard; SHARDS]>,
    /// Waits under way: while there is one, a call that ends looks whether
    /// it was the last, and if so tells them.
    watchers: AtomicUsize,
    /// Wakes those waits.
    ended: Notify,
}

impl Calls {
    /// Counts a call in flight on `shard`; [`InFlight`] counts it out.
    fn begin(&self, shard: usize) {
        self.shards[shard].in_flight.fetch_add(1, Ordering::SeqCst);
    }

    /// Calls in flight now.
    fn in_flight(&self) -> u64 {
        self.shards
            .iter()
            .map(|s| s.in_flight.load(Ordering::SeqCst))
            .sum()
    }

    /// Waits, up to `deadline`, until no call is in flight; whether that
    /// moment came. It holds no call back: calls may begin while it waits.
    async fn idle_by(&self, deadline: Instant) -> bool {
        // Counted before the count is read, so a call that ends after the
        // read sees the wait (all in sequentially consistent order).
        self.watchers.fetch_add(1, Ordering::SeqCst);
        let _watching = Watching(&self.watchers);
        until(&self.ended, deadline, || self.in_flight() == 0).await
    }
}

/// A wait for the calls to end, counted while it lasts (cancelled too).
struct Watching<'a>(&'a AtomicUsize);

impl Drop for Watching<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Waits, up to `deadline`, until `done` says yes, looking again each time
/// `notify` wakes it; whether it did.
async fn until(notify: &Notify, deadline: Instant, done: impl Fn() -> bool) -> bool {
    loop {
        let woken = notify.notified();
        tokio::pin!(woken);
        // Registered before the look: a change after it wakes this wait.
        woken.as_mut().enable();
        if done() {
            return true;
        }
        if tokio::time::timeout_at(deadline.into(), woken)
            .await
            .is_err()
        {
            return done();
        }
    }
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

/// Whether `http` passes a release's status on: a final status (200–599).
/// A 1xx would tell the client the response is yet to come (101: that the
/// connection now speaks another protocol), and beyond 599 is no status.
pub(crate) fn answerable(status: u16) -> bool {
    (200..=599).contains(&status)
}

/// The upper bounds of the latency buckets, in microseconds; a last
/// bucket takes what is slower (and calls abandoned past the request
/// timeout).
const LATENCY_BOUNDS_US: [u64; 16] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 5_000_000, 10_000_000,
];
const LATENCY_BUCKETS: usize = LATENCY_BOUNDS_US.len() + 1;

/// A version's responses by status code, and how long they took, for the
/// whole life of the process: kept after its instances are unloaded, since
/// a counter that went down would read as a restart to Prometheus, and a
/// rollout compares a new release's latency with the one it replaced. One
/// per version ever loaded (33 KiB each), like its label.
pub struct Totals {
    /// The version as text.
    pub label: &'static str,
    shards: [CodeShard; SHARDS],
    latency: [LatencyShard; SHARDS],
    /// Requests of a service still under way on an old instance of the
    /// version when its drain ended, cancelled.
    drain_cancelled: AtomicU64,
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

/// One thread's share of a version's latency buckets.
#[repr(align(64))]
struct LatencyShard([AtomicU64; LATENCY_BUCKETS]);

/// What a version served, for comparing two releases.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Served {
    pub requests: u64,
    /// Answered 5xx (panics and calls past the request timeout included).
    pub errors: u64,
    /// The 50th and 99th percentiles of the time to the response's head,
    /// as the upper bound of the bucket they fall in (`None`: beyond the
    /// last bound, 10 s); 0 when nothing was served.
    pub p50_us: Option<u64>,
    pub p99_us: Option<u64>,
}

impl Totals {
    /// Counts a response with `status`, whose head took `took` (`None`:
    /// a call abandoned past the request timeout).
    fn count(&self, shard: usize, status: u16, took: Option<Duration>) {
        let micros = took.map_or(u64::MAX, |t| {
            u64::try_from(t.as_micros()).unwrap_or(u64::MAX)
        });
        let bucket = LATENCY_BOUNDS_US.partition_point(|&bound| bound < micros);
        self.latency[shard].0[bucket].fetch_add(1, Ordering::Relaxed);
        self.count_status(shard, status);
    }

    /// What the version served: requests, errors and latency percentiles.
    pub fn served(&self) -> Served {
        let mut buckets = [0u64; LATENCY_BUCKETS];
        for shard in &self.latency {
            for (sum, n) in buckets.iter_mut().zip(&shard.0) {
                *sum += n.load(Ordering::Relaxed);
            }
        }
        let requests: u64 = buckets.iter().sum();
        let errors = self
            .responses()
            .iter()
            .filter(|(code, _)| code.is_none_or(|c| c >= 500))
            .map(|(_, n)| n)
            .sum();
        let quantile = |q: f64| -> Option<u64> {
            if requests == 0 {
                return Some(0);
            }
            let rank = (requests as f64 * q).ceil() as u64;
            let mut seen = 0;
            for (i, n) in buckets.iter().enumerate() {
                seen += n;
                if seen >= rank {
                    return LATENCY_BOUNDS_US.get(i).copied();
                }
            }
            None
        };
        Served {
            requests,
            errors,
            p50_us: quantile(0.50),
            p99_us: quantile(0.99),
        }
    }

    fn count_status(&self, shard: usize, status: u16) {
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
    let mut all = TOTALS.lock();
    if let Some(known) = all.iter().find(|known| known.label == text) {
        return known;
    }
    let leaked: &'static Totals = Box::leak(Box::new(Totals {
        label: Box::leak(text.into_boxed_str()),
        shards: std::array::from_fn(|_| CodeShard(std::array::from_fn(|_| AtomicU64::new(0)))),
        latency: std::array::from_fn(|_| LatencyShard(std::array::from_fn(|_| AtomicU64::new(0)))),
        drain_cancelled: AtomicU64::new(0),
    }));
    all.push(leaked);
    leaked
}

impl Totals {
    /// Requests cancelled when a drain of the version ended.
    pub fn drain_cancelled(&self) -> u64 {
        self.drain_cancelled.load(Ordering::Relaxed)
    }
}

/// The totals of every version loaded since the process started.
pub fn all_totals() -> Vec<&'static Totals> {
    TOTALS.lock().clone()
}

/// Counters of one instance at a moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub in_flight: u64,
    pub served: u64,
    /// 5xx responses, panics and calls past the request timeout included.
    pub errors: u64,
    pub panics: u64,
    /// Calls past the request timeout that have not returned: abandoned,
    /// each holding a thread.
    pub stuck: u64,
    /// Calls past the request timeout, answered 504.
    pub timed_out: u64,
    /// Connections the release serves itself.
    pub connections: u64,
}

impl Core {
    fn new(version: Version, blocking: bool, instance: Instance) -> Core {
        static IDS: AtomicU64 = AtomicU64::new(1);
        let totals = totals(&version);
        let service = instance.library().is_service();
        let calls = Calls::default();
        if let Some(port) = instance.connections_port() {
            port.set_meter(Arc::new(ConnectionMeter {
                shards: Arc::clone(&calls.shards),
                totals,
            }));
        }
        Core {
            id: IDS.fetch_add(1, Ordering::Relaxed),
            label: totals.label,
            totals,
            version,
            instance,
            blocking,
            service,
            offload: AtomicBool::new(false),
            stuck: AtomicI64::new(0),
            timed_out: AtomicU64::new(0),
            snapshotting: AtomicBool::new(false),
            calls,
            let_go: Arc::new(Notify::new()),
        }
    }

    pub fn counters(&self) -> Counters {
        let sum = |field: fn(&Shard) -> &AtomicU64| -> u64 {
            self.calls
                .shards
                .iter()
                .map(|s| field(s).load(Ordering::Relaxed))
                .sum()
        };
        Counters {
            // A service's requests are in flight only while handed over;
            // under way, they are its port's open calls, and the requests
            // on the connections it serves.
            in_flight: sum(|s| &s.in_flight) + self.instance.requests_under_way() as u64,
            served: sum(|s| &s.served),
            errors: sum(|s| &s.errors),
            panics: sum(|s| &s.panics),
            stuck: self.stuck(),
            timed_out: self.timed_out.load(Ordering::Relaxed),
            connections: self
                .instance
                .connections_port()
                .map_or(0, |port| port.connections() as u64),
        }
    }

    /// Calls abandoned past the request timeout that have not returned.
    pub fn stuck(&self) -> u64 {
        self.stuck.load(Ordering::SeqCst).max(0) as u64
    }

    /// Calls the release's `snapshot`, marked as running while it does.
    pub fn take_snapshot(&self) -> Result<Vec<u8>, CallError> {
        self.snapshotting.store(true, Ordering::SeqCst);
        let taken = self.instance.snapshot();
        self.snapshotting.store(false, Ordering::SeqCst);
        taken
    }

    /// Whether a snapshot of it is running (an earlier one that overran).
    pub fn snapshotting(&self) -> bool {
        self.snapshotting.load(Ordering::SeqCst)
    }

    /// Cancels a service's requests still under way as its drain ends;
    /// how many (counted for `/metrics`).
    pub fn cancel_at_drain_end(&self) -> usize {
        let cancelled = self
            .instance
            .cancel_calls("the old release's drain ended (--drain-timeout)");
        self.totals
            .drain_cancelled
            .fetch_add(cancelled as u64, Ordering::Relaxed);
        cancelled
    }

    /// Whether requests are handed to it rather than called.
    pub fn is_service(&self) -> bool {
        self.service
    }

    /// Unique in the process: tells two instances of one version apart.
    pub fn id(&self) -> u64 {
        self.id
    }
}

/// Where a request went in ([`Runtime::enter`]): a read of the canary or
/// of the active instance, which holds no count shared between threads.
enum Entered {
    Canary(arc_swap::Guard<Option<Arc<Canary>>>),
    Active(arc_swap::Guard<Arc<Loaded>>),
}

impl Entered {
    fn loaded(&self) -> &Loaded {
        match self {
            Entered::Canary(canary) => &canary.as_ref().expect("picked").loaded,
            Entered::Active(loaded) => loaded,
        }
    }
}

/// Counts the requests a service answers on the connections it serves
/// itself, as [`Tally`] counts those handed to it one by one.
struct ConnectionMeter {
    shards: Arc<[Shard; SHARDS]>,
    totals: &'static Totals,
}

impl nine9s_host::Meter for ConnectionMeter {
    fn request_ended(&self, status: u16, took: Duration) {
        // On one of the release's threads: its own shard, as any thread.
        count_served(&self.shards, my_shard(), self.totals, status, false, took);
    }
}

/// Counts a service's request as served with `status` (what the client
/// got) after `took`, on the instance's shard and its version's totals;
/// `panicked`: the release's handler panicked.
fn count_served(
    shards: &[Shard; SHARDS],
    shard: usize,
    totals: &Totals,
    status: u16,
    panicked: bool,
    took: Duration,
) {
    let counts = &shards[shard];
    counts.served.fetch_add(1, Ordering::Relaxed);
    if status >= 500 {
        counts.errors.fetch_add(1, Ordering::Relaxed);
    }
    if panicked {
        counts.panics.fetch_add(1, Ordering::Relaxed);
    }
    totals.count(shard, status, Some(took));
}

/// What handing a request to a service gave.
pub enum Submitted {
    /// Handed over: the call, and where its outcome is counted.
    Call(nine9s_host::Call, Tally),
    /// The release to serve it is not a service: it is served whole.
    NotAService,
    /// The instance was stopping (its port closed) as the request came.
    Closed(&'static str),
}

/// Where the outcome of a request handed to a service is counted: its
/// instance's counters and its version's totals, without the instance.
pub struct Tally {
    shards: Arc<[Shard; SHARDS]>,
    shard: usize,
    totals: &'static Totals,
    /// When the request was handed over.
    started: Instant,
    /// The version that serves it.
    pub label: &'static str,
}

impl Tally {
    /// Counts the request as served with `status` (what the client got);
    /// `panicked`: the release's handler panicked.
    pub fn count(&self, status: u16, panicked: bool) {
        let took = self.started.elapsed();
        count_served(
            &self.shards,
            self.shard,
            self.totals,
            status,
            panicked,
            took,
        );
    }
}

/// What serving one request produced, and on which release.
pub struct Handled {
    pub version: &'static str,
    pub result: Result<Response, CallError>,
}

/// What a switch did.
pub struct Switched {
    /// The instance that served before, in a handle of the caller's own:
    /// it drains it ([`drain`]) and drops it.
    pub old: Arc<Loaded>,
    /// How long new requests were held: from closing the gate until it
    /// opened again (zero for `replace`, which never closes it).
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
    /// The instance serving new requests.
    active: ArcSwap<Loaded>,
    /// Its `id`: what a request checks after counting itself in flight.
    active_id: AtomicU64,
    gate: Gate,
    /// The canary beside the active instance, if any.
    canary: ArcSwapOption<Canary>,
    /// Whether there is one: a load that spares requests reading `canary`.
    has_canary: AtomicBool,
    /// Every instance still alive, serving or draining (for `status`).
    resident: Mutex<Vec<Weak<Core>>>,
}

/// Which requests a canary serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Split {
    /// This many of every 1000 requests, at random.
    Weight(u16),
    /// The requests with this header (and this value, if given).
    Header {
        name: HeaderName,
        value: Option<HeaderValue>,
    },
}

impl Split {
    fn picks(&self, headers: &hyper::HeaderMap) -> bool {
        match self {
            Split::Weight(permille) => random_permille() < *permille,
            Split::Header { name, value } => headers
                .get_all(name)
                .iter()
                .any(|v| value.as_ref().is_none_or(|want| want == v)),
        }
    }
}

impl std::fmt::Display for Split {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Split::Weight(permille) if permille % 10 == 0 => {
                write!(f, "{}% of requests", permille / 10)
            }
            Split::Weight(permille) => {
                write!(f, "{}.{}% of requests", permille / 10, permille % 10)
            }
            Split::Header { name, value: None } => write!(f, "requests with header {name}"),
            Split::Header {
                name,
                value: Some(value),
            } => write!(
                f,
                "requests with header {name}: {}",
                String::from_utf8_lossy(value.as_bytes())
            ),
        }
    }
}

/// 0 to 999, from a per-thread xorshift: a canary's weight needs an even
/// spread, not secrecy, and no shared state on the request path.
fn random_permille() -> u16 {
    use std::cell::Cell;
    thread_local! {
        static STATE: Cell<u64> = Cell::new({
            let seed = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            (seed ^ (my_shard() as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)) | 1
        });
    }
    STATE.with(|state| {
        let mut x = state.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        state.set(x);
        (x % 1000) as u16
    })
}

/// A canary: its instance and which requests it serves.
#[derive(Debug)]
pub struct Canary {
    pub loaded: Arc<Loaded>,
    pub split: Split,
}

impl Canary {
    /// The canary with a handle of its own to its instance, for the caller
    /// that takes it out of service ([`released`] waits on that handle).
    fn taken_out(&self) -> Arc<Canary> {
        Arc::new(Canary {
            loaded: Arc::new(self.loaded.another()),
            split: self.split.clone(),
        })
    }
}

/// What holds new requests back while a switch carries state.
#[derive(Default)]
struct Gate {
    closed: AtomicBool,
    /// Wakes the requests held at the gate.
    opened: Notify,
}

impl Gate {
    /// Closes the gate until the returned guard is dropped: on every path
    /// out, a panic in the code behind it included, the gate opens again.
    fn close(&self) -> Closed<'_> {
        self.closed.store(true, Ordering::SeqCst);
        Closed(self)
    }

    fn open(&self) {
        self.closed.store(false, Ordering::SeqCst);
        self.opened.notify_waiters();
    }

    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// Returns once the gate is open.
    async fn wait_open(&self) {
        loop {
            let opened = self.opened.notified();
            tokio::pin!(opened);
            // Registered before the check: an `open` after it wakes us.
            opened.as_mut().enable();
            if !self.is_closed() {
                return;
            }
            opened.await;
        }
    }
}

/// The gate, closed while this lives.
struct Closed<'a>(&'a Gate);

impl Drop for Closed<'_> {
    fn drop(&mut self) {
        self.0.open();
    }
}

/// A call counted in flight on an instance; counted out when dropped.
struct InFlight<'a> {
    calls: &'a Calls,
    shard: usize,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let calls = self.calls;
        calls.shards[self.shard]
            .in_flight
            .fetch_sub(1, Ordering::SeqCst);
        // Summing the shards only while someone waits: the request path
        // reads no other thread's shard otherwise.
        if calls.watchers.load(Ordering::SeqCst) > 0 && calls.in_flight() == 0 {
            calls.ended.notify_waiters();
        }
    }
}

impl Runtime {
    pub fn new(first: Loaded) -> Runtime {
        let first = Arc::new(first);
        Runtime {
            resident: Mutex::new(vec![Arc::downgrade(&first.core)]),
            active_id: AtomicU64::new(first.id),
            active: ArcSwap::new(first),
            gate: Gate::default(),
            canary: ArcSwapOption::empty(),
            has_canary: AtomicBool::new(false),
        }
    }

    /// Serves one request on the active release, or on the canary if it
    /// picks the request; `None` if the call ran past the request timeout
    /// and was abandoned (the watchdog answered its client on `call`'s
    /// connection).
    pub async fn handle(&self, request: &Request<'_>, call: &Call) -> Option<Handled> {
        let mine = my_shard();
        let entered = self.enter(mine, request.headers).await;
        self.call(entered.loaded(), mine, request, call)
    }

    /// The instance a request with `headers` goes to, with the request
    /// counted in flight on its shard `mine`: the canary if it picks the
    /// request, else the active instance once the gate is open.
    async fn enter(&self, mine: usize, headers: &hyper::HeaderMap) -> Entered {
        if self.has_canary.load(Ordering::Relaxed) {
            let canary = self.canary.load();
            if canary.as_ref().is_some_and(|c| c.split.picks(headers)) {
                // A canary keeps no state: no switch waits for its calls.
                let entered = Entered::Canary(canary);
                entered.loaded().calls.begin(mine);
                return entered;
            }
        }
        loop {
            let loaded = self.active.load();
            loaded.calls.begin(mine);
            if !self.gate.is_closed() && self.active_id.load(Ordering::SeqCst) == loaded.id {
                return Entered::Active(loaded);
            }
            // A switch is under way or just happened: step back, wait for
            // it, and go to whatever is active then.
            drop(InFlight {
                calls: &loaded.calls,
                shard: mine,
            });
            drop(loaded);
            self.gate.wait_open().await;
        }
    }

    /// Whether a request may go to a service now (the active release or
    /// the canary is one): if so it is offered to [`Runtime::submit`]
    /// before its body is read.
    pub fn serves_services(&self) -> bool {
        self.active.load().service
            || (self.has_canary.load(Ordering::Relaxed)
                && self
                    .canary
                    .load()
                    .as_ref()
                    .is_some_and(|c| c.loaded.service))
    }

    /// Hands a request to the service that is to serve it (the canary if
    /// it picks the request, else the active instance, past the gate as
    /// [`Runtime::handle`] goes), counted in flight while it is handed
    /// over.
    pub async fn submit(&self, head: RequestHead) -> Submitted {
        let mine = my_shard();
        let entered = self.enter(mine, &head.headers).await;
        self.hand_over(entered.loaded(), mine, head)
    }

    /// Submits `head` to `loaded`, counted in flight on its shard `mine`
    /// until it is handed over.
    fn hand_over(&self, loaded: &Core, mine: usize, head: RequestHead) -> Submitted {
        let _counted = InFlight {
            calls: &loaded.calls,
            shard: mine,
        };
        if !loaded.service {
            return Submitted::NotAService;
        }
        let started = Instant::now();
        match loaded.instance.submit(head) {
            Some(Ok(call)) => Submitted::Call(
                call,
                Tally {
                    shards: Arc::clone(&loaded.calls.shards),
                    shard: mine,
                    totals: loaded.totals,
                    started,
                    label: loaded.label,
                },
            ),
            Some(Err(nine9s_host::Closed)) | None => Submitted::Closed(loaded.label),
        }
    }

    /// Calls `loaded` with a request already counted in flight on its
    /// shard `mine`, then counts it out and counts its outcome — unless the
    /// watchdog abandoned it meanwhile, and did both.
    fn call(
        &self,
        loaded: &Core,
        mine: usize,
        request: &Request<'_>,
        call: &Call,
    ) -> Option<Handled> {
        let shard = &loaded.calls.shards[mine];
        let counted = InFlight {
            calls: &loaded.calls,
            shard: mine,
        };
        let offloaded = loaded.blocking || loaded.offload.load(Ordering::Relaxed);
        call.begin(loaded.id, mine, offloaded);
        let started = Instant::now();
        let result = if offloaded {
            // Still counted in flight, so a switch still waits for this call.
            tokio::task::block_in_place(|| loaded.instance.handle(request))
        } else {
            loaded.instance.handle(request)
        };
        if !call.end() {
            // Counted out (and as a 504) by the watchdog, which answered
            // the client: only its return is left to count.
            std::mem::forget(counted);
            loaded.stuck.fetch_sub(1, Ordering::SeqCst);
            tracing::info!(version = %loaded.version, "an abandoned call returned");
            return None;
        }
        drop(counted);
        shard.served.fetch_add(1, Ordering::Relaxed);
        match &result {
            Ok(response) if response.status < 500 && answerable(response.status) => {}
            Ok(_) | Err(CallError::Failed(_) | CallError::BadStatus(_)) => {
                shard.errors.fetch_add(1, Ordering::Relaxed);
            }
            Err(CallError::Panicked(_)) => {
                shard.errors.fetch_add(1, Ordering::Relaxed);
                shard.panics.fetch_add(1, Ordering::Relaxed);
            }
        }
        // The status the client gets: `http` answers 500 for a failed call
        // and 502 for a status it does not pass on.
        let status = match &result {
            Ok(response) if answerable(response.status) => response.status,
            Ok(_) => 502,
            Err(_) => 500,
        };
        loaded.totals.count(mine, status, Some(started.elapsed()));
        Some(Handled {
            version: loaded.label,
            result,
        })
    }

    /// Abandons the call on instance `id` counted in flight on `shard`,
    /// which the watchdog claimed past the request timeout: out of flight
    /// (a switch waiting for it goes on), into the stuck calls, counted as
    /// served with a 504. Returns the instance's version label.
    pub fn abandon(&self, id: u64, shard: usize) -> Option<&'static str> {
        // The call holds its instance: it is resident.
        let loaded = self.resident().into_iter().find(|l| l.id == id)?;
        let shard = shard % SHARDS;
        let counts = &loaded.calls.shards[shard];
        // Stuck before out of flight: a switch that sees the call gone
        // sees it stuck.
        loaded.stuck.fetch_add(1, Ordering::SeqCst);
        loaded.timed_out.fetch_add(1, Ordering::Relaxed);
        counts.served.fetch_add(1, Ordering::Relaxed);
        counts.errors.fetch_add(1, Ordering::Relaxed);
        loaded.totals.count(shard, 504, None);
        drop(InFlight {
            calls: &loaded.calls,
            shard,
        });
        Some(loaded.label)
    }

    /// Hands instance `id`'s later calls off the data-plane threads: one of
    /// its calls has run `ran` on one of them.
    pub fn hand_off(&self, id: u64, ran: Duration) {
        let Some(loaded) = self.resident().into_iter().find(|l| l.id == id) else {
            return;
        };
        if !loaded.offload.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                version = %loaded.version,
                ran_ms = ran.as_millis() as u64,
                "a call of this release has been running on a data-plane thread for long: its calls are handed off those threads from now on (say `blocking = true` in its release.toml if its handler waits)"
            );
        }
    }

    /// Hands a plain HTTP/1.1 connection to the active release if it
    /// serves connections itself and no canary shares the traffic, past
    /// the gate as a request goes (counted in flight while it is handed
    /// over, so a switch's yield finds it on the port); the socket back
    /// otherwise.
    pub async fn hand_connection(
        &self,
        fd: OwnedFd,
        unread: Bytes,
        remote: String,
        limits: ConnectionLimits,
    ) -> Result<Handed, (OwnedFd, Bytes)> {
        let mine = my_shard();
        loop {
            if self.has_canary.load(Ordering::Relaxed) {
                return Err((fd, unread));
            }
            let loaded = self.active.load();
            let Some(port) = loaded.instance.connections_port() else {
                return Err((fd, unread));
            };
            loaded.calls.begin(mine);
            let _counted = InFlight {
                calls: &loaded.calls,
                shard: mine,
            };
            if !self.gate.is_closed() && self.active_id.load(Ordering::SeqCst) == loaded.id {
                return port.hand(fd, unread, remote, limits);
            }
            drop(_counted);
            drop(loaded);
            self.gate.wait_open().await;
        }
    }

    /// Whether a new connection goes to the active release: it serves
    /// connections itself, and no canary shares the traffic.
    pub fn release_serves_connections(&self) -> bool {
        !self.has_canary.load(Ordering::Relaxed)
            && self.active.load().instance.connections_port().is_some()
    }

    /// Asks the active release for the connections it serves back, for
    /// the agent to serve (a canary beside it, or the agent stopping).
    pub fn take_connections_back(&self) {
        if let Some(port) = self.active.load().instance.connections_port() {
            port.yield_connections();
        }
    }

    /// Starts serving `split` of the requests with `loaded`; the canary
    /// before it, if any, is returned (it finishes its calls in flight) in
    /// a handle of the caller's own.
    pub fn set_canary(&self, loaded: Loaded, split: Split) -> Option<Arc<Canary>> {
        let loaded = Arc::new(loaded);
        self.remember(&loaded);
        let before = self.canary.swap(Some(Arc::new(Canary { loaded, split })));
        self.has_canary.store(true, Ordering::Relaxed);
        // Each request of theirs is to be split from now on: the agent
        // serves them.
        self.take_connections_back();
        before.map(|before| before.taken_out())
    }

    /// Stops the canary: every request goes to the active instance again.
    /// The canary is returned in a handle of the caller's own.
    pub fn clear_canary(&self) -> Option<Arc<Canary>> {
        self.has_canary.store(false, Ordering::Relaxed);
        self.canary.swap(None).map(|before| before.taken_out())
    }

    /// The canary, if there is one.
    pub fn canary(&self) -> Option<Arc<Canary>> {
        self.canary.load_full()
    }

    /// The instance serving new requests.
    pub fn active(&self) -> Arc<Loaded> {
        self.active.load_full()
    }

    /// Closes the gate and waits, up to `deadline`, until no call is in
    /// flight on `loaded`; `None` (the gate open again) if that moment did
    /// not come.
    async fn quiesce(&self, loaded: &Core, deadline: Instant) -> Option<Closed<'_>> {
        let closed = self.gate.close();
        loaded.calls.idle_by(deadline).await.then_some(closed)
    }

    /// Runs `f` on the active instance at a moment with no request in
    /// flight on it (a consistent snapshot), looking for one for at most
    /// `within`. It holds new requests back only while `f` runs, never
    /// while waiting for that moment; `None` if no such moment came.
    pub async fn try_quiesced<T>(
        &self,
        within: Duration,
        f: impl FnOnce(&Arc<Loaded>) -> T,
    ) -> Option<T> {
        let deadline = Instant::now() + within;
        loop {
            let loaded = self.active.load_full();
            {
                let _closed = self.gate.close();
                if loaded.calls.in_flight() == 0 {
                    return Some(f(&loaded));
                }
            }
            // With the gate open again, until the calls of the moment have
            // ended; then a look behind the gate again (one may have begun
            // meanwhile).
            if Instant::now() >= deadline || !loaded.calls.idle_by(deadline).await {
                return None;
            }
        }
    }

    /// Switches to the instance `prepare` builds from the quiesced old one.
    /// If `prepare` fails, or the old instance does not quiesce within
    /// `timeout`, the old instance keeps serving.
    pub async fn switch<E>(
        &self,
        timeout: Duration,
        prepare: impl FnOnce(&Arc<Loaded>) -> Result<Loaded, E>,
    ) -> Result<Switched, SwitchError<E>> {
        let asked = Instant::now();
        let old = self.active.load_full();
        let Some(closed) = self.quiesce(&old, asked + timeout).await else {
            return Err(SwitchError::Quiesce);
        };
        // No request may start on the old instance's connections after
        // its snapshot: they stop reading new ones first.
        if let Some(port) = old.instance.connections_port() {
            port.yield_connections();
            let yielded = poll_fn(|cx| port.poll_yielded(cx));
            if tokio::time::timeout_at((asked + timeout).into(), yielded)
                .await
                .is_err()
            {
                return Err(SwitchError::Quiesce);
            }
        }
        let next = Arc::new(prepare(&old).map_err(SwitchError::Prepare)?);
        self.install(next);
        drop(closed);
        Ok(Switched {
            old: Arc::new(old.another()),
            wait: asked.elapsed(),
        })
    }

    /// Makes `next` active at once, holding no request: for a switch from
    /// an instance that keeps no state. The old instance finishes its calls
    /// in flight; it is returned once they are done (or `timeout` passed),
    /// for the plan's drain and unload. Its wait is zero: the gate never
    /// closes, so no request was held.
    pub async fn replace(&self, next: Loaded, timeout: Duration) -> Switched {
        let deadline = Instant::now() + timeout;
        let old = self.active.load_full();
        self.install(Arc::new(next));
        // Its connections come back, for the new instance.
        if let Some(port) = old.instance.connections_port() {
            port.yield_connections();
        }
        old.calls.idle_by(deadline).await;
        Switched {
            old: Arc::new(old.another()),
            wait: Duration::ZERO,
        }
    }

    /// Makes `next` the active instance (new requests go to it).
    fn install(&self, next: Arc<Loaded>) {
        self.remember(&next);
        let id = next.id;
        self.active.store(next);
        self.active_id.store(id, Ordering::SeqCst);
    }

    /// Every instance still alive: the active one first, then the draining ones.
    pub fn resident(&self) -> Vec<Arc<Loaded>> {
        let mut list = self.resident.lock();
        list.retain(|w| w.strong_count() > 0);
        let mut alive: Vec<Arc<Loaded>> = list
            .iter()
            .rev()
            .filter_map(Weak::upgrade)
            .map(|core| Arc::new(Loaded::around(core)))
            .collect();
        drop(list);
        // The active one first: a canary remembered since is not it.
        let active = self.active_id.load(Ordering::SeqCst);
        alive.sort_by_key(|l| l.id != active);
        alive
    }

    fn remember(&self, loaded: &Arc<Loaded>) {
        let mut list = self.resident.lock();
        list.retain(|w| w.strong_count() > 0);
        list.push(Arc::downgrade(&loaded.core));
    }
}

/// Waits, up to `grace`, until no handle to `old` is left but the caller's
/// own (what [`Runtime::switch`] and [`Runtime::replace`] return); the
/// caller then drops it, which releases its library. Requests never hold it
/// past their call (a response body still being sent holds the library,
/// not the instance), so what this waits for is a `status` call looking
/// at it.
pub async fn drain(old: &Arc<Loaded>, grace: Duration) {
    let stuck = old.stuck();
    if stuck > 0 {
        // Each holds the instance until it returns, if ever: no wait ends
        // sooner. The last of them lets go of it.
        tracing::warn!(version = %old.version, stuck, "the old instance is held by calls stuck past the request timeout; left to them");
        return;
    }
    if !released(old, grace).await {
        tracing::warn!(version = %old.version, "drain grace over with the old instance still held");
    }
}

/// Waits, up to `grace`, until `loaded` is the only handle left to its
/// instance — the caller's own, taken out of service (requests still in it
/// let go of it when their call ends; each other handle says so as it
/// goes); whether that came. Then the caller's drop is the last, on the
/// caller's thread: an instance's `stop` and its library's unload never
/// run on a request's.
pub async fn released(loaded: &Loaded, grace: Duration) -> bool {
    until(&loaded.let_go.0, Instant::now() + grace, || {
        Arc::strong_count(&loaded.core) == 1
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_percentiles_are_the_bounds_of_their_buckets() {
        let totals = totals(&"0.0.2-latency-test".parse().unwrap());
        assert_eq!(
            totals.served(),
            Served {
                p50_us: Some(0),
                p99_us: Some(0),
                ..Served::default()
            }
        );
        // 98 fast, one at 3 ms, one abandoned past the request timeout.
        for i in 0..98 {
            totals.count(i % SHARDS, 200, Some(Duration::from_micros(90)));
        }
        totals.count(0, 200, Some(Duration::from_millis(3)));
        let served = totals.served();
        assert_eq!((served.p50_us, served.p99_us), (Some(100), Some(5_000)));
        totals.count(1, 504, None);
        totals.count(1, 504, None);
        let served = totals.served();
        assert_eq!((served.requests, served.errors), (101, 2));
        assert_eq!(served.p99_us, None, "past the last bound");
    }

    #[test]
    fn totals_count_each_code_and_lump_the_rest_as_other() {
        let version: Version = "0.0.1-totals-test".parse().unwrap();
        let totals = totals(&version);
        for (shard, status) in [(0, 200), (5, 200), (1, 404), (2, 599), (3, 600), (4, 999)] {
            totals.count(shard, status, Some(Duration::from_micros(80)));
        }
        assert_eq!(
            totals.responses(),
            [(Some(200), 2), (Some(404), 1), (Some(599), 1), (None, 2)]
        );
        // 599 and the statuses out of range are errors.
        let served = totals.served();
        assert_eq!((served.requests, served.errors), (6, 3));
        assert_eq!((served.p50_us, served.p99_us), (Some(100), Some(100)));
        // One block per version, found again.
        assert!(std::ptr::eq(totals, super::totals(&version)));
        assert!(all_totals().iter().any(|t| std::ptr::eq(*t, totals)));
    }

    /// Ends the call counted on `shard`, as a request does.
    fn end(calls: &Calls, shard: usize) {
        drop(InFlight { calls, shard });
    }

    #[tokio::test]
    async fn a_wait_for_the_calls_is_woken_by_the_last_one_ending() {
        let calls = Arc::new(Calls::default());
        calls.begin(0);
        calls.begin(5);
        // A deadline no test waits for: only the last call's end wakes it.
        let deadline = Instant::now() + Duration::from_secs(3600);
        let waiting = tokio::spawn({
            let calls = Arc::clone(&calls);
            async move { calls.idle_by(deadline).await }
        });
        while calls.watchers.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        end(&calls, 0);
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "one call is still in flight");
        end(&calls, 5);
        let idle = tokio::time::timeout(Duration::from_secs(60), waiting)
            .await
            .expect("woken when the last call ended")
            .unwrap();
        assert!(idle);
        assert_eq!(calls.watchers.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn a_wait_for_the_calls_gives_up_at_its_deadline() {
        let calls = Calls::default();
        calls.begin(2);
        let asked = Instant::now();
        let within = Duration::from_millis(50);
        assert!(!calls.idle_by(asked + within).await);
        assert!(asked.elapsed() >= within);
        assert_eq!(calls.watchers.load(Ordering::SeqCst), 0);
        // With no call in flight it returns at once, deadline passed or not.
        end(&calls, 2);
        assert!(calls.idle_by(asked).await);
    }
}
