//! Calls that do not come back: the request time limit
//! (`--request-timeout`) and what keeps a stuck call from taking the data
//! plane with it.
//!
//! A plugin's `handle` is a synchronous call into foreign code: nothing can
//! cancel it, and it runs inline on the thread that serves its connection
//! (a hand-off per request would cost more than the request). So the
//! answer to a call that runs past the limit comes from elsewhere: every
//! data-plane connection is on the [`Board`] with its [`Call`] (when the
//! call under way began, into which instance) and a duplicate of its
//! socket, and the watchdog ([`watch`], on the control plane's runtime, so
//! it ticks whatever the data plane is doing) claims a call past the limit,
//! writes the client a 504 on that socket and shuts it, counts the call as
//! failed and abandons it: it no longer counts in flight (a switch does not
//! wait for it, a checkpoint is not skipped for it) but as *stuck*, which
//! fails a soak or a canary, until it returns — if ever. Its thread stays
//! held; the engine replaces the worker once it has switched away from an
//! instance with stuck calls and the active release is permanent with no
//! canary (a new worker comes back on the permanent release).
//!
//! A call that has run long on a data-plane thread also hands its
//! instance's later calls off those threads (`block_in_place`, as for a
//! release that says `blocking = true`): a handler that loops takes one of
//! them (those that began before the first was seen running long), not one
//! per request. And while a call holds a data-plane thread, the watchdog
//! wakes an idle one every tick: tokio leaves the I/O driver to whichever
//! worker parks next, which a thread inside a call never does.
//!
//! On HTTP/2 a connection carries many requests at once, each a call of
//! its own on the board. The 504 cannot go on the stream of a call past
//! the limit (the task that would send it is the one the call holds), nor
//! on the socket under the other streams: the connection is shut instead,
//! and its clients retry its other requests on a new one. A service's
//! requests (ABI v3) never hold a thread and are not on the board: the
//! request time limit answers them on their own stream (`streaming.rs`).
//!
//! The claim is one compare-and-swap on the call's state word, against the
//! one the call makes when it returns: exactly one of the two counts the
//! call out.
//!
//! The board is also where the data plane's connection slots are shared
//! out: the global cap (`--max-connections`), the open connections of each
//! client address (`--max-connections-per-client`), and, at the cap, which
//! idle connection gives its slot to a newcomer (the one idle longest).

use std::collections::HashMap;
use std::future::Future;
use std::io::Write;
use std::net::IpAddr;
use std::os::fd::AsFd;
use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use std::time::Duration;

use slab::Slab;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

use crate::http::Watchdog;
use crate::runtime::Runtime;

/// How often the watchdog looks at the calls under way: a call past the
/// limit is answered within this after it.
const TICK: Duration = Duration::from_millis(25);

/// A call on a data-plane thread that has run this long (or the request
/// time limit, if shorter) hands its instance's later calls off those
/// threads. Long enough that a thread merely descheduled on a busy machine
/// does not trip it.
const LONG_CALL: Duration = Duration::from_secs(1);

/// [`Call::state`] with no call under way.
const IDLE: u64 = 0;
/// [`Call::state`] of a call the watchdog claimed.
const ABANDONED: u64 = u64::MAX;

/// [`Call::target`]: the instance id in the low bits, the counter shard
/// above it, and whether the call was handed off the data-plane thread.
const SHARD_SHIFT: u32 = 56;
const OFFLOADED: u64 = 1 << 63;
const ID_MASK: u64 = (1 << SHARD_SHIFT) - 1;

/// A connection idle for less than this is not closed for a newcomer: a
/// client that has just connected, or just had its answer, may be sending
/// its next request right now (the drain's linger, for the same reason).
const SHED_AFTER: Duration = Duration::from_millis(250);

/// The data plane's open connections: their slots (`--max-connections`),
/// how many each client address holds, and their calls, for the watchdog.
pub struct Board {
    /// One per open connection; beyond, connections wait in the backlog.
    pub slots: Arc<Semaphore>,
    calls: Mutex<Slab<Entry>>,
    /// `--request-timeout`; `None`: calls run as long as they take.
    limit: Option<Duration>,
    /// Open connections by client address; an address with none is removed.
    clients: Mutex<HashMap<IpAddr, usize>>,
    /// `--max-connections-per-client`.
    per_client: usize,
    /// Newcomers refused for their address's connections.
    pub crowded: Throttled,
}

/// A count of refusals, and when one was last logged: a flood of them
/// makes one log line a second, with the count so far, not one each.
#[derive(Default)]
pub struct Throttled {
    count: AtomicU64,
    logged_ms: AtomicU64,
}

impl Throttled {
    /// Counts one; `Some(the count so far)` when a log line is due.
    pub fn note(&self) -> Option<u64> {
        let count = self.count.fetch_add(1, Ordering::Relaxed) + 1;
        let now = now_ms();
        let last = self.logged_ms.load(Ordering::Relaxed);
        let due = last == 0 || now.saturating_sub(last) >= 1000;
        (due && self
            .logged_ms
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok())
        .then_some(count)
    }
}

/// A connection on the board: its call, and its watchdog, which says
/// whether it is idle and closes it when told to.
struct Entry {
    call: Arc<Call>,
    /// `None` for a request of an HTTP/2 connection, which is on the
    /// board itself.
    watchdog: Option<Arc<Watchdog>>,
}

/// A connection's call under way, as the watchdog sees it.
pub struct Call {
    /// [`IDLE`], [`ABANDONED`], or 1 + the [`now_ms`] the call began.
    state: AtomicU64,
    /// Which instance the call is in (see [`SHARD_SHIFT`]); written before
    /// `state`, read after it.
    target: AtomicU64,
    /// The connection's socket, duplicated, for the watchdog's answer
    /// (only with a time limit).
    socket: Option<Arc<std::net::TcpStream>>,
    /// A request of an HTTP/2 connection: past the limit, its connection
    /// is shut (see the module's doc), and keeps its slot until it ends.
    stream: bool,
    /// The last write to the socket left bytes unsent: a 504 written now
    /// would land in the middle of the response before.
    unflushed: AtomicBool,
    /// The watchdog answered this connection: its slot was given back.
    rescued: AtomicBool,
}

/// A connection's place on the board; leaves it when dropped.
pub struct Registered {
    board: Arc<Board>,
    key: usize,
    pub call: Arc<Call>,
    /// `None` for a request of an HTTP/2 connection.
    _client: Option<Client>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        let mut calls = self.board.calls.lock();
        calls.try_remove(self.key);
    }
}

/// One of a client address's connections, counted until dropped.
pub struct Client {
    board: Arc<Board>,
    address: IpAddr,
}

impl Drop for Client {
    fn drop(&mut self) {
        let mut clients = self.board.clients.lock();
        if let Some(open) = clients.get_mut(&self.address) {
            *open -= 1;
            if *open == 0 {
                clients.remove(&self.address);
            }
        }
    }
}

impl Board {
    pub fn new(max_connections: usize, per_client: usize, limit: Option<Duration>) -> Board {
        Board {
            slots: Arc::new(Semaphore::new(max_connections)),
            calls: Mutex::new(Slab::with_capacity(max_connections.min(1024))),
            limit,
            clients: Mutex::new(HashMap::new()),
            per_client,
            crowded: Throttled::default(),
        }
    }

    /// Counts a new connection from `address`, unless that address already
    /// holds `--max-connections-per-client`. An IPv4 address mapped into
    /// IPv6 counts as itself.
    pub fn client(self: &Arc<Self>, address: IpAddr) -> Option<Client> {
        let address = address.to_canonical();
        let mut clients = self.clients.lock();
        let open = clients.entry(address).or_insert(0);
        if *open >= self.per_client {
            return None;
        }
        *open += 1;
        Some(Client {
            board: Arc::clone(self),
            address,
        })
    }

    /// Tells the connection idle longest (at least [`SHED_AFTER`], and not
    /// told already) to close, between requests, so that its slot goes to a
    /// newcomer; `false` if none is idle.
    pub fn shed_idle(&self) -> bool {
        let calls = self.calls.lock();
        let idlest = calls
            .iter()
            .filter_map(|(_, entry)| {
                let watchdog = entry.watchdog.as_ref()?;
                Some((watchdog.sheddable()?, watchdog))
            })
            .filter(|(idle, _)| *idle >= SHED_AFTER)
            .max_by_key(|(idle, _)| *idle);
        match idlest {
            Some((_, watchdog)) => {
                watchdog.shed();
                true
            }
            None => false,
        }
    }

    /// Puts a new connection on the board.
    pub fn register(
        self: &Arc<Self>,
        stream: &TcpStream,
        client: Client,
        watchdog: Arc<Watchdog>,
    ) -> Registered {
        let socket = self.limit.and_then(|_| {
            stream
                .as_fd()
                .try_clone_to_owned()
                .map_err(|e| tracing::debug!(error = %e, "cannot duplicate a connection's socket: a call past the time limit on it goes unanswered"))
                .ok()
                .map(|socket| Arc::new(std::net::TcpStream::from(socket)))
        });
        self.enter(Call::new(socket, false), Some(watchdog), Some(client))
    }

    /// Puts a request of the HTTP/2 connection whose call is `connection`
    /// on the board, until it is answered.
    pub fn register_stream(self: &Arc<Self>, connection: &Call) -> Registered {
        self.enter(Call::new(connection.socket.clone(), true), None, None)
    }

    fn enter(
        self: &Arc<Self>,
        call: Call,
        watchdog: Option<Arc<Watchdog>>,
        client: Option<Client>,
    ) -> Registered {
        let call = Arc::new(call);
        let key = self.calls.lock().insert(Entry {
            call: Arc::clone(&call),
            watchdog,
        });
        Registered {
            board: Arc::clone(self),
            key,
            call,
            _client: client,
        }
    }
}

impl Call {
    fn new(socket: Option<Arc<std::net::TcpStream>>, stream: bool) -> Call {
        Call {
            state: AtomicU64::new(IDLE),
            target: AtomicU64::new(0),
            socket,
            stream,
            unflushed: AtomicBool::new(false),
            rescued: AtomicBool::new(false),
        }
    }

    /// A call into instance `id`, counted in flight on its `shard`, begins.
    pub fn begin(&self, id: u64, shard: usize, offloaded: bool) {
        let target = (id & ID_MASK)
            | ((shard as u64) << SHARD_SHIFT)
            | if offloaded { OFFLOADED } else { 0 };
        self.target.store(target, Ordering::Relaxed);
        self.state.store(now_ms() + 1, Ordering::Release);
    }

    /// The call returned: `false` if the watchdog had abandoned it (counted
    /// it out and answered its client).
    pub fn end(&self) -> bool {
        self.state.swap(IDLE, Ordering::AcqRel) != ABANDONED
    }

    /// Claims the call seen with `state` for the watchdog, unless it has
    /// returned since. A later call on the connection began at least the
    /// time limit after it (it was seen past the limit): its state
    /// differs, so this claims that call or none.
    fn claim(&self, state: u64) -> bool {
        self.state
            .compare_exchange(state, ABANDONED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// Whether the watchdog answered this connection's client.
    pub fn rescued(&self) -> bool {
        self.rescued.load(Ordering::Relaxed)
    }

    /// Notes whether the last write to the socket sent all it was given.
    pub fn wrote(&self, complete: bool) {
        self.unflushed.store(!complete, Ordering::Relaxed);
    }

    /// Answers the client of an abandoned call, and closes the connection
    /// for writing: whatever the call returns later goes nowhere. Never
    /// blocks: the socket is non-blocking, and a 504 that does not fit in
    /// its buffer is not written.
    fn answer(&self, label: &str, limit: Duration) {
        let Some(socket) = &self.socket else { return };
        if self.stream {
            let _ = socket.shutdown(std::net::Shutdown::Both);
            return;
        }
        if !self.unflushed.load(Ordering::Relaxed) {
            let body = format!(
                "release {label} did not answer within {} ms\n",
                limit.as_millis()
            );
            let response = format!(
                "HTTP/1.1 504 Gateway Timeout\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n{}: {label}\r\n\r\n{body}",
                body.len(),
                crate::http::RELEASE_HEADER,
            );
            if let Err(e) = (&**socket).write_all(response.as_bytes()) {
                tracing::debug!(error = %e, "cannot answer a call past the time limit");
            }
        }
        let _ = socket.shutdown(std::net::Shutdown::Write);
    }
}

/// Milliseconds on the coarse monotonic clock (a few ms of resolution, and
/// no system call to read it): when calls began.
fn now_ms() -> u64 {
    let now = rustix::time::clock_gettime(rustix::time::ClockId::MonotonicCoarse);
    (now.tv_sec as u64) * 1000 + (now.tv_nsec as u64) / 1_000_000
}

/// Watches the calls under way until `stopped` resolves: answers and
/// abandons those past the limit, hands off the data-plane threads the
/// instances whose calls run long there, and keeps the data plane's
/// (`data_plane`) I/O driven meanwhile.
pub async fn watch(
    board: Arc<Board>,
    runtime: Arc<Runtime>,
    data_plane: tokio::runtime::Handle,
    stopped: impl Future<Output = ()>,
) {
    tokio::pin!(stopped);
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let long = board.limit.map_or(LONG_CALL, |limit| limit.min(LONG_CALL));
    let ms = |d: Duration| d.as_millis() as u64;
    loop {
        tokio::select! {
            () = &mut stopped => return,
            _ = tick.tick() => {}
        }
        // Read before any call's state: a call seen under way began before it.
        let now = now_ms();
        let mut past_limit = Vec::new();
        let mut running_long = Vec::new();
        let mut nudge = false;
        {
            let calls = board.calls.lock();
            for (_, Entry { call, .. }) in calls.iter() {
                let state = call.state.load(Ordering::Acquire);
                if state == IDLE || state == ABANDONED {
                    continue;
                }
                let ran = now.saturating_sub(state - 1);
                if ran < ms(TICK) {
                    continue;
                }
                let target = call.target.load(Ordering::Relaxed);
                // The target read belongs to this call only if the state
                // did not change meanwhile.
                fence(Ordering::Acquire);
                if target & OFFLOADED == 0 && call.state.load(Ordering::Relaxed) == state {
                    nudge = true;
                    if ran >= ms(long) {
                        running_long.push((target & ID_MASK, ran));
                    }
                }
                if board.limit.is_some_and(|limit| ran >= ms(limit)) {
                    past_limit.push((Arc::clone(call), state));
                }
            }
        }
        if nudge {
            // A data-plane thread is inside a call, and the others may all
            // be asleep: the one that left the I/O driver to run it wakes
            // none of them (tokio expects it back soon), so nobody would
            // accept or read. A task from outside wakes one, which then
            // drives I/O while it has nothing else to do.
            data_plane.spawn(async {});
        }
        for (id, ran) in running_long {
            runtime.hand_off(id, Duration::from_millis(ran));
        }
        let Some(limit) = board.limit else { continue };
        for (call, state) in past_limit {
            if !call.claim(state) {
                continue;
            }
            let target = call.target.load(Ordering::Relaxed);
            let shard = ((target >> SHARD_SHIFT) & 0x7f) as usize;
            let label = runtime.abandon(target & ID_MASK, shard);
            call.answer(label.unwrap_or("unknown"), limit);
            if call.stream {
                tracing::warn!(
                    version = label.unwrap_or("unknown"),
                    timeout_ms = ms(limit),
                    "a call ran past the request timeout on an HTTP/2 connection: the connection was shut (its other requests with it), and the call abandoned (its thread stays held until it returns or the worker is replaced)"
                );
                continue;
            }
            call.rescued.store(true, Ordering::Relaxed);
            // The connection keeps its slot until the call returns, if it
            // does: the slot is given back now, and forgotten then.
            board.slots.add_permits(1);
            tracing::warn!(
                version = label.unwrap_or("unknown"),
                timeout_ms = ms(limit),
                "a call ran past the request timeout: its client was answered 504, and the call abandoned (its thread stays held until it returns or the worker is replaced)"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call() -> Call {
        Call::new(None, false)
    }

    #[test]
    fn a_call_is_counted_out_once_by_its_return_or_by_the_watchdog() {
        let call = call();
        // Returns before the watchdog looks: it counts itself out.
        call.begin(7, 3, false);
        let seen = call.state.load(Ordering::Acquire);
        assert!(call.end());
        assert!(!call.claim(seen), "a call that returned is not claimed");
        // Claimed first: its return finds it abandoned.
        call.begin(7, 3, true);
        let seen = call.state.load(Ordering::Acquire);
        assert!(call.claim(seen));
        assert!(!call.claim(seen), "claimed once");
        assert!(!call.end());
        // The connection's next call is its own again.
        call.begin(8, 0, false);
        assert!(call.end());
    }

    #[test]
    fn the_target_packs_the_instance_the_shard_and_the_hand_off() {
        let call = call();
        call.begin(42, 5, true);
        let target = call.target.load(Ordering::Relaxed);
        assert_eq!(target & ID_MASK, 42);
        assert_eq!((target >> SHARD_SHIFT) & 0x7f, 5);
        assert_ne!(target & OFFLOADED, 0);
        call.begin(42, 5, false);
        assert_eq!(call.target.load(Ordering::Relaxed) & OFFLOADED, 0);
    }
}
