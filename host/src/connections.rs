//! Connections a service release serves itself (`FEATURE_CONNECTIONS`):
//! the port's table of them, and the C functions the release calls on it.
//!
//! The agent hands a plain HTTP/1.1 connection over with [`Port::hand`]
//! and keeps a [`Handed`] that it awaits: the connection comes back at a
//! request boundary (after [`Port::yield_connections`], which a switch
//! asks for), or ends. The release takes it when it sees the
//! `EVENT_CONNECTION` ([`take_connection`]), serves its requests on its
//! own threads with no call crossing the port, and counts each request
//! through `request_begun`/`request_ended`, which reach the agent's
//! [`Meter`].
//!
//! A yield is a barrier: once [`Port::poll_yielded`] is ready, no request
//! starts any more on a connection this instance took (each says so with
//! `connection_yielded`, which the release calls once it has stopped
//! reading new requests). Requests under way finish on this instance, as
//! calls through the port do after a switch.
//!
//! Everything here is under the port's lock, in the port's order (the
//! port's state, then nothing); nothing is woken under it.

use std::collections::{HashMap, VecDeque};
use std::ffi::c_void;
use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;

use nine9s_sdk::abi::{RawConnection, Slice, STATUS_GONE, STATUS_OK};

use crate::port::{on_port, Port};

/// The limits a handed connection's requests are held to (the agent's
/// own, as it holds the connections it serves).
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    pub body_timeout: Duration,
    pub request_timeout: Option<Duration>,
    pub max_body: u64,
}

/// How a handed connection came back.
#[derive(Debug)]
pub enum Returned {
    /// The release closed it (or its instance stopped with it).
    Closed,
    /// Given back at a request boundary, with the bytes read from it and
    /// not served yet.
    Back { fd: OwnedFd, unread: Bytes },
}

/// Counts the requests a release serves on its connections (the agent's
/// counters of that instance).
pub trait Meter: Send + Sync {
    fn request_ended(&self, status: u16, took: Duration);
}

/// The connections of a port.
#[derive(Default)]
pub(crate) struct Table {
    next: u64,
    entries: HashMap<u64, Entry>,
    /// Handed over, their `EVENT_CONNECTION` not delivered yet.
    pub(crate) queue: VecDeque<u64>,
    /// An `EVENT_YIELD` to deliver.
    pub(crate) yield_pending: bool,
    /// Yielded: no connection is taken any more.
    yielded: bool,
    /// Waits for every taken connection to stop starting requests.
    yield_waker: Option<Waker>,
}

struct Entry {
    /// Until the release takes it.
    fd: Option<OwnedFd>,
    /// Lent to the release until `connection_done`.
    unread: Bytes,
    remote: String,
    limits: ConnectionLimits,
    /// Stops starting requests (after a yield).
    quiet: bool,
    back: Arc<Slot>,
}

/// Where a handed connection's end is left for the agent.
#[derive(Default)]
pub(crate) struct Slot(Mutex<(Option<Returned>, Option<Waker>)>);

impl Slot {
    fn fill(&self, returned: Returned) {
        let waker = {
            let mut slot = self.0.lock();
            slot.0 = Some(returned);
            slot.1.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

/// A connection the release serves, as the agent keeps it: ready with
/// how it came back.
pub struct Handed(Arc<Slot>);

impl Handed {
    pub fn poll_back(&self, cx: &mut Context<'_>) -> Poll<Returned> {
        let mut slot = (self.0).0.lock();
        match slot.0.take() {
            Some(returned) => Poll::Ready(returned),
            None => {
                slot.1 = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

/// The requests under way on a port's connections, and their meter.
#[derive(Default)]
pub(crate) struct Requests {
    pub(crate) in_progress: AtomicU64,
    /// Set once, before the port takes a connection.
    pub(crate) meter: std::sync::OnceLock<Arc<dyn Meter>>,
}

impl Table {
    /// Connections the release holds (taken or not).
    pub(crate) fn held(&self) -> usize {
        self.entries.len()
    }

    /// Whether every connection taken has stopped starting requests.
    fn quiet(&self) -> bool {
        self.entries.values().all(|e| e.fd.is_some() || e.quiet)
    }

    /// Ends every connection: those not taken come back as they were,
    /// those taken as closed (the release's `stop` closes them).
    pub(crate) fn close_all(&mut self) -> Vec<(Arc<Slot>, Returned)> {
        self.yielded = true;
        self.entries
            .drain()
            .map(|(_, entry)| {
                let returned = match entry.fd {
                    Some(fd) => Returned::Back {
                        fd,
                        unread: entry.unread,
                    },
                    None => Returned::Closed,
                };
                (entry.back, returned)
            })
            .collect()
    }
}

impl Port {
    /// Hands `fd` (a connected TCP socket, `unread` read from it already)
    /// to the release; the socket again if the port takes no connection
    /// (closed, yielded, or its release does not serve connections).
    pub fn hand(
        &self,
        fd: OwnedFd,
        unread: Bytes,
        remote: String,
        limits: ConnectionLimits,
    ) -> Result<Handed, (OwnedFd, Bytes)> {
        let mut state = self.state.lock();
        if state.closed || !self.serves_connections || state.connections.yielded {
            return Err((fd, unread));
        }
        let table = &mut state.connections;
        table.next += 1;
        let id = table.next;
        let back = Arc::new(Slot::default());
        table.entries.insert(
            id,
            Entry {
                fd: Some(fd),
                unread,
                remote,
                limits,
                quiet: false,
                back: Arc::clone(&back),
            },
        );
        table.queue.push_back(id);
        drop(state);
        self.ready.notify_one();
        Ok(Handed(back))
    }

    /// Asks the release to give every connection back at its next request
    /// boundary and to take no new one; those it has not taken yet come
    /// back at once. [`Port::poll_yielded`] tells when no request starts
    /// on them any more.
    pub fn yield_connections(&self) {
        let untaken = {
            let mut state = self.state.lock();
            let table = &mut state.connections;
            if table.yielded {
                return;
            }
            table.yielded = true;
            table.yield_pending = !table.entries.is_empty();
            table.queue.clear();
            let untaken: Vec<u64> = table
                .entries
                .iter()
                .filter(|(_, e)| e.fd.is_some())
                .map(|(id, _)| *id)
                .collect();
            untaken
                .into_iter()
                .filter_map(|id| table.entries.remove(&id))
                .collect::<Vec<_>>()
        };
        self.ready.notify_one();
        self.idle.notify_all();
        for entry in untaken {
            let fd = entry.fd.expect("untaken");
            entry.back.fill(Returned::Back {
                fd,
                unread: entry.unread,
            });
        }
    }

    /// Ready once no request starts any more on a connection this port's
    /// release took (after [`Port::yield_connections`]).
    pub fn poll_yielded(&self, cx: &mut Context<'_>) -> Poll<()> {
        let mut state = self.state.lock();
        let table = &mut state.connections;
        if table.quiet() {
            return Poll::Ready(());
        }
        table.yield_waker = Some(cx.waker().clone());
        Poll::Pending
    }

    /// Connections the release holds.
    pub fn connections(&self) -> usize {
        self.state.lock().connections.held()
    }

    /// Requests under way on the connections the release serves.
    pub fn connection_requests(&self) -> u64 {
        self.requests.in_progress.load(Ordering::SeqCst)
    }

    /// Where the requests served on connections are counted (once).
    pub fn set_meter(&self, meter: Arc<dyn Meter>) {
        let _ = self.requests.meter.set(meter);
    }

    /// Forgets connection `id` and tells the agent how it ended.
    fn done(&self, id: u64, returned: Returned) {
        let (entry, waker, idle) = {
            let mut state = self.state.lock();
            let Some(entry) = state.connections.entries.remove(&id) else {
                return;
            };
            let table = &mut state.connections;
            let waker = table.quiet().then(|| table.yield_waker.take()).flatten();
            let idle = state.calls.is_empty() && state.connections.entries.is_empty();
            (entry, waker, idle)
        };
        if idle {
            self.idle.notify_all();
        }
        if let Some(waker) = waker {
            waker.wake();
        }
        entry.back.fill(returned);
    }
}

/// The slots of every connection ended by `close_all`, filled outside the
/// port's lock.
pub(crate) fn settle(ended: Vec<(Arc<Slot>, Returned)>) {
    for (slot, returned) in ended {
        slot.fill(returned);
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

pub(crate) unsafe extern "C" fn take_connection(
    context: *const c_void,
    id: u64,
    out: *mut RawConnection,
) -> i32 {
    // SAFETY: the release passes its port's context, and `out` writable.
    unsafe {
        on_port(context, STATUS_GONE, |port| {
            if out.is_null() {
                return STATUS_GONE;
            }
            let mut state = port.state.lock();
            let Some(entry) = state.connections.entries.get_mut(&id) else {
                return STATUS_GONE;
            };
            let Some(fd) = entry.fd.take() else {
                return STATUS_GONE;
            };
            let limits = entry.limits;
            // SAFETY: `out` is writable (the release's contract); `unread`
            // and `remote` live in the entry until `connection_done`.
            out.write(RawConnection {
                fd: fd.into_raw_fd(),
                unread: Slice::new(&entry.unread),
                remote: Slice::new(entry.remote.as_bytes()),
                header_timeout_ms: millis(limits.header_timeout),
                idle_timeout_ms: millis(limits.idle_timeout),
                body_timeout_ms: millis(limits.body_timeout),
                request_timeout_ms: limits.request_timeout.map_or(0, millis),
                max_body: limits.max_body,
            });
            STATUS_OK
        })
    }
}

pub(crate) unsafe extern "C" fn connection_yielded(context: *const c_void, id: u64) {
    // SAFETY: the release passes its port's context.
    unsafe {
        on_port(context, (), |port| {
            let waker = {
                let mut state = port.state.lock();
                let table = &mut state.connections;
                let Some(entry) = table.entries.get_mut(&id) else {
                    return;
                };
                entry.quiet = true;
                table.quiet().then(|| table.yield_waker.take()).flatten()
            };
            if let Some(waker) = waker {
                waker.wake();
            }
        });
    }
}

pub(crate) unsafe extern "C" fn connection_done(
    context: *const c_void,
    id: u64,
    fd: i32,
    unread: Slice,
) {
    // SAFETY: the release passes its port's context; `unread` is borrowed
    // for the call; `fd`, if not -1, is a socket the release gives up.
    unsafe {
        on_port(context, (), |port| {
            let returned = if fd < 0 {
                Returned::Closed
            } else {
                Returned::Back {
                    // SAFETY: the release's contract: it owned `fd` and
                    // gives it up here.
                    fd: OwnedFd::from_raw_fd(fd),
                    unread: Bytes::copy_from_slice(unread.as_bytes()),
                }
            };
            port.done(id, returned);
        });
    }
}

pub(crate) unsafe extern "C" fn request_begun(context: *const c_void) {
    // SAFETY: the release passes its port's context.
    unsafe {
        on_port(context, (), |port| {
            port.requests.in_progress.fetch_add(1, Ordering::SeqCst);
        });
    }
}

pub(crate) unsafe extern "C" fn request_ended(context: *const c_void, status: u16, micros: u64) {
    // SAFETY: the release passes its port's context.
    unsafe {
        on_port(context, (), |port| {
            port.requests.in_progress.fetch_sub(1, Ordering::SeqCst);
            if let Some(meter) = port.requests.meter.get() {
                meter.request_ended(status, Duration::from_micros(micros));
            }
        });
    }
}
