//! The port of an instance of a release that serves as a service (ABI v3,
//! `nine9s_sdk::abi::Port`): requests go in with [`Port::submit`], and
//! each comes back as a [`Call`] the agent polls for the response's head
//! and body while it feeds the request body in. The release's threads
//! take the other end through the C functions below: they wait for events
//! and read and answer calls, whenever they like.
//!
//! The data plane never runs release code here: it only changes a call's
//! state and wakes whoever waits (a release thread blocked in
//! `wait_events`, or the agent task polling the call). So the release's
//! code, its runtime and its thread-locals stay on the release's threads.
//!
//! Flow control both ways, by bytes held here: the request body moves one
//! frame at a time, when the release has asked for more (`read_body`
//! answered `PENDING`), so an upload waits in the client's socket, not in
//! memory; the response body may hold [`WINDOW`] bytes not yet sent, past
//! which `send_data` answers `PENDING` until the client has taken half.
//!
//! Locks: the port's, then a call's, never the other way round; nothing
//! is woken and no release code runs under either.

use std::collections::{HashMap, VecDeque};
use std::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use bytes::{Buf, Bytes};
use http::HeaderMap;
use parking_lot::{Condvar, Mutex};

use nine9s_sdk::abi::{
    self, Header, PortApi, PortEvent, RawRequestHead, Slice, BODY_LEN_UNKNOWN, EVENT_CANCELLED,
    EVENT_CONNECTION, EVENT_READABLE, EVENT_REQUEST, EVENT_WRITABLE, EVENT_YIELD, STATUS_END,
    STATUS_ERROR, STATUS_GONE, STATUS_OK, STATUS_PENDING,
};

use crate::connections::{
    connection_done, connection_yielded, request_begun, request_ended, settle, take_connection,
    Requests, Table,
};

use crate::library::response_headers;

/// Response bytes a call may hold that the client has not taken yet.
pub const WINDOW: usize = 64 * 1024;

/// A request for a service, owned: the port lends it to the release until
/// the call's `request_done`.
#[derive(Debug)]
pub struct RequestHead {
    pub method: String,
    pub path: String,
    pub query: String,
    pub headers: HeaderMap,
    /// 10, 11 or 20.
    pub version: u32,
    /// The client's `ip:port`.
    pub remote: String,
    /// The body's length if known (`Some(0)`: none).
    pub body_len: Option<u64>,
}

/// A response's head, as the release sent it.
#[derive(Debug)]
pub struct ResponseHead {
    pub status: u16,
    pub headers: HeaderMap,
    /// The body's length, if the release said it.
    pub body_len: Option<u64>,
}

/// A piece of a response's body.
#[derive(Debug)]
pub enum Frame {
    Data(Bytes),
    Trailers(HeaderMap),
}

/// Why a call has no (more) response.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Broken {
    /// The release aborted it, or ended it without a response.
    #[error("{0}")]
    Aborted(String),
    /// The agent cancelled it (the port closed, the client went away).
    #[error("the call was cancelled: {0}")]
    Cancelled(&'static str),
}

/// The port is closed: its instance is stopping.
#[derive(Debug, thiserror::Error)]
#[error("the release's instance is stopping")]
pub struct Closed;

/// One instance's port.
pub struct Port {
    pub(crate) state: Mutex<PortState>,
    /// Signalled when events are queued or the port closes.
    pub(crate) ready: Condvar,
    /// Signalled when the last open call or connection is done.
    pub(crate) idle: Condvar,
    /// Its release serves connections (`FEATURE_CONNECTIONS`).
    pub(crate) serves_connections: bool,
    /// The requests under way on those connections.
    pub(crate) requests: Requests,
    /// What the release is handed: points at `self` and the C functions.
    raw: abi::Port,
}

// SAFETY: `raw` holds a pointer to this port (pinned in its Arc) and one
// to the static function table; the rest is behind locks.
unsafe impl Send for Port {}
// SAFETY: as above.
unsafe impl Sync for Port {}

#[derive(Default)]
pub(crate) struct PortState {
    pub(crate) closed: bool,
    next: u64,
    /// Calls the release has not said `request_done` of.
    pub(crate) calls: HashMap<u64, Arc<Shared>>,
    /// Calls with events the release has not taken, in order.
    queue: VecDeque<u64>,
    /// The connections handed to the release.
    pub(crate) connections: Table,
}

/// A call, as both sides see it.
pub(crate) struct Shared {
    id: u64,
    head: LentHead,
    state: Mutex<CallState>,
}

/// The request head and the `Header`s pointing into it, which the release
/// borrows: immutable once made, and alive as long as the call.
struct LentHead {
    owned: RequestHead,
    /// Only pointed into, by `headers`.
    _names: Vec<Bytes>,
    headers: Vec<Header>,
}

// SAFETY: `headers` points into `names` and `owned`'s header values, which
// are never changed or moved (heap data) while `LentHead` lives.
unsafe impl Send for LentHead {}
// SAFETY: as above; read only.
unsafe impl Sync for LentHead {}

#[derive(Default)]
struct CallState {
    /// Event bits the release has not taken.
    pending: u32,
    /// In the port's queue.
    queued: bool,
    /// Request body frames received and not read yet.
    body: VecDeque<Bytes>,
    body_end: bool,
    body_broken: bool,
    /// The release waits for more of the body.
    wants_body: bool,
    body_waker: Option<Waker>,
    head: Option<ResponseHead>,
    head_sent: bool,
    out: VecDeque<Frame>,
    out_bytes: usize,
    out_end: bool,
    writer_waiting: bool,
    out_waker: Option<Waker>,
    broken: Option<Broken>,
    cancelled: Option<&'static str>,
    done: bool,
}

impl CallState {
    fn wake_host(&mut self) {
        for waker in [self.out_waker.take(), self.body_waker.take()]
            .into_iter()
            .flatten()
        {
            waker.wake();
        }
    }
}

static PORT_API: PortApi = PortApi {
    size: std::mem::size_of::<PortApi>() as u32,
    wait_events,
    request_head,
    read_body,
    send_head,
    send_data,
    send_end,
    abort,
    request_done,
    take_connection,
    connection_yielded,
    connection_done,
    request_begun,
    request_ended,
};

impl Port {
    /// A port; `serves_connections`: its release takes connections
    /// ([`Port::hand`]).
    pub fn new(serves_connections: bool) -> Arc<Port> {
        Arc::new_cyclic(|me: &std::sync::Weak<Port>| Port {
            state: Mutex::new(PortState::default()),
            ready: Condvar::new(),
            idle: Condvar::new(),
            serves_connections,
            requests: Requests::default(),
            raw: abi::Port {
                size: std::mem::size_of::<abi::Port>() as u32,
                context: me.as_ptr().cast(),
                api: &PORT_API,
            },
        })
    }

    /// What the release is handed in `attach`.
    pub(crate) fn raw(&self) -> *const abi::Port {
        &self.raw
    }

    /// Hands a request to the release.
    pub fn submit(self: &Arc<Self>, head: RequestHead) -> Result<Call, Closed> {
        let head = LentHead::new(head);
        let mut state = self.state.lock();
        if state.closed {
            return Err(Closed);
        }
        state.next += 1;
        let shared = Arc::new(Shared {
            id: state.next,
            head,
            state: Mutex::new(CallState {
                pending: EVENT_REQUEST,
                queued: true,
                ..CallState::default()
            }),
        });
        state.calls.insert(shared.id, Arc::clone(&shared));
        state.queue.push_back(shared.id);
        drop(state);
        self.ready.notify_one();
        Ok(Call {
            shared,
            port: Arc::clone(self),
        })
    }

    /// Calls the release has not finished.
    pub fn open_calls(&self) -> usize {
        self.state.lock().calls.len()
    }

    /// Waits up to `timeout` until no call is open and the release holds
    /// no connection; whether that came.
    pub fn wait_idle(&self, timeout: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        let idle = |state: &PortState| state.calls.is_empty() && state.connections.held() == 0;
        let mut state = self.state.lock();
        while !idle(&state) {
            if self.idle.wait_until(&mut state, deadline).timed_out() {
                return idle(&state);
            }
        }
        true
    }

    /// Cancels every call still open, for `why`; how many.
    pub fn cancel_all(&self, why: &'static str) -> usize {
        let calls: Vec<Arc<Shared>> = self.state.lock().calls.values().cloned().collect();
        calls.iter().filter(|c| self.cancel(c, why)).count()
    }

    /// Closes the port: no request is taken any more, the release's
    /// `wait_events` returns 0, and every call still open ends for the
    /// agent (a response under way breaks off).
    pub fn close(&self) {
        let ended = {
            let mut state = self.state.lock();
            state.closed = true;
            state.connections.close_all()
        };
        self.ready.notify_all();
        self.idle.notify_all();
        settle(ended);
        self.cancel_all("the release's instance stopped");
    }

    /// Marks `call` cancelled and tells both sides; false if it was over.
    fn cancel(&self, call: &Shared, why: &'static str) -> bool {
        let mut state = call.state.lock();
        if state.cancelled.is_some() || state.done || (state.out_end && state.out.is_empty()) {
            return false;
        }
        state.cancelled = Some(why);
        state.wake_host();
        drop(state);
        self.raise(call, EVENT_CANCELLED);
        true
    }

    /// Queues `events` of `call` for the release.
    fn raise(&self, call: &Shared, events: u32) {
        let mut state = call.state.lock();
        state.pending |= events;
        let queue = !std::mem::replace(&mut state.queued, true);
        drop(state);
        if queue {
            self.state.lock().queue.push_back(call.id);
            self.ready.notify_one();
        }
    }

    fn call(&self, id: u64) -> Option<Arc<Shared>> {
        self.state.lock().calls.get(&id).cloned()
    }
}

impl LentHead {
    fn new(owned: RequestHead) -> LentHead {
        let names: Vec<Bytes> = owned
            .headers
            .keys()
            .flat_map(|name| {
                let bytes = Bytes::copy_from_slice(name.as_str().as_bytes());
                std::iter::repeat_n(bytes, owned.headers.get_all(name).iter().count())
            })
            .collect();
        let values = owned.headers.keys().flat_map(|n| owned.headers.get_all(n));
        let headers = names
            .iter()
            .zip(values)
            .map(|(name, value)| Header {
                name: Slice::new(name),
                value: Slice::new(value.as_bytes()),
            })
            .collect();
        LentHead {
            owned,
            _names: names,
            headers,
        }
    }

    fn raw(&self) -> RawRequestHead {
        let owned = &self.owned;
        RawRequestHead {
            method: Slice::new(owned.method.as_bytes()),
            path: Slice::new(owned.path.as_bytes()),
            query: Slice::new(owned.query.as_bytes()),
            headers: self.headers.as_ptr(),
            header_count: self.headers.len(),
            version: owned.version,
            remote: Slice::new(owned.remote.as_bytes()),
            body_len: owned.body_len.unwrap_or(BODY_LEN_UNKNOWN),
        }
    }
}

/// A request handed to a release, as the agent sees it. Dropping it
/// before the response ended cancels the call (the client went away).
pub struct Call {
    shared: Arc<Shared>,
    port: Arc<Port>,
}

impl std::fmt::Debug for Call {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Call").field("id", &self.shared.id).finish()
    }
}

impl Call {
    /// Ready with `true` once the release waits for more of the request
    /// body (feed one frame, or its end); `false` if it never will.
    pub fn poll_wants_body(&self, cx: &mut Context<'_>) -> Poll<bool> {
        let mut state = self.shared.state.lock();
        if state.cancelled.is_some() || state.done || state.body_end {
            return Poll::Ready(false);
        }
        if std::mem::take(&mut state.wants_body) {
            return Poll::Ready(true);
        }
        state.body_waker = Some(cx.waker().clone());
        Poll::Pending
    }

    /// One more frame of the request body.
    pub fn feed_body(&self, data: Bytes) {
        self.shared.state.lock().body.push_back(data);
        self.port.raise(&self.shared, EVENT_READABLE);
    }

    /// The request body is over (`broken`: the client's broke off).
    pub fn end_body(&self, broken: bool) {
        {
            let mut state = self.shared.state.lock();
            state.body_end = true;
            state.body_broken = broken;
        }
        self.port.raise(&self.shared, EVENT_READABLE);
    }

    /// The response's head, once the release sent it.
    pub fn poll_head(&self, cx: &mut Context<'_>) -> Poll<Result<ResponseHead, Broken>> {
        let mut state = self.shared.state.lock();
        if let Some(head) = state.head.take() {
            return Poll::Ready(Ok(head));
        }
        if let Some(broken) = state.ended() {
            return Poll::Ready(Err(broken));
        }
        state.out_waker = Some(cx.waker().clone());
        Poll::Pending
    }

    /// The next piece of the response's body; `None` once it ended.
    pub fn poll_frame(&self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame, Broken>>> {
        let mut state = self.shared.state.lock();
        if let Some(frame) = state.out.pop_front() {
            if let Frame::Data(data) = &frame {
                state.out_bytes -= data.len();
            }
            let room = state.writer_waiting && state.out_bytes <= WINDOW / 2;
            if room {
                state.writer_waiting = false;
            }
            drop(state);
            if room {
                self.port.raise(&self.shared, EVENT_WRITABLE);
            }
            return Poll::Ready(Some(Ok(frame)));
        }
        if state.out_end {
            return Poll::Ready(None);
        }
        if let Some(broken) = state.ended() {
            return Poll::Ready(Some(Err(broken)));
        }
        state.out_waker = Some(cx.waker().clone());
        Poll::Pending
    }

    /// Whether the response has ended, whole.
    pub fn is_complete(&self) -> bool {
        let state = self.shared.state.lock();
        state.out_end && state.out.is_empty()
    }

    /// Cancels the call (the client went away, its time ran out).
    pub fn cancel(&self, why: &'static str) {
        self.port.cancel(&self.shared, why);
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        self.cancel("the client went away");
    }
}

impl CallState {
    /// Why no more response will come, if none will.
    fn ended(&self) -> Option<Broken> {
        if let Some(broken) = &self.broken {
            return Some(broken.clone());
        }
        if let Some(why) = self.cancelled {
            return Some(Broken::Cancelled(why));
        }
        self.done
            .then(|| Broken::Aborted("the release ended the call without a response".into()))
    }
}

/// Runs the body of one C function of the port: `f` with the port, or
/// `fallback` if the host panicked (a bug; nothing may unwind into the
/// release).
///
/// # Safety
/// `context` must be the `context` of a live port's `abi::Port`.
pub(crate) unsafe fn on_port<T>(
    context: *const c_void,
    fallback: T,
    f: impl FnOnce(&Port) -> T,
) -> T {
    // SAFETY: the caller's contract: the port outlives every call the
    // release makes (until its `stop` returns, and the instance holds it).
    let port = unsafe { &*context.cast::<Port>() };
    catch_unwind(AssertUnwindSafe(|| f(port))).unwrap_or(fallback)
}

/// As [`on_port`], with the call `id` (`STATUS_GONE` if unknown).
///
/// # Safety
/// As [`on_port`].
unsafe fn on_call(context: *const c_void, id: u64, f: impl FnOnce(&Port, &Shared) -> i32) -> i32 {
    // SAFETY: the caller's contract.
    unsafe {
        on_port(context, STATUS_ERROR, |port| match port.call(id) {
            Some(call) => f(port, &call),
            None => STATUS_GONE,
        })
    }
}

unsafe extern "C" fn wait_events(context: *const c_void, out: *mut PortEvent, max: usize) -> usize {
    // SAFETY: the release passes its port's context.
    unsafe {
        on_port(context, 0, |port| {
            if out.is_null() || max == 0 {
                return 0;
            }
            let mut state = port.state.lock();
            loop {
                if state.closed {
                    return 0;
                }
                let mut n = 0;
                while n < max {
                    let Some(id) = state.queue.pop_front() else {
                        break;
                    };
                    let Some(call) = state.calls.get(&id) else {
                        continue;
                    };
                    let mut call = call.state.lock();
                    call.queued = false;
                    let events = std::mem::take(&mut call.pending);
                    if events != 0 {
                        // SAFETY: `out` has room for `max` events (the
                        // release's contract) and `n < max`.
                        out.add(n).write(PortEvent { call: id, events });
                        n += 1;
                    }
                }
                let table = &mut state.connections;
                while n < max {
                    let events = if std::mem::take(&mut table.yield_pending) {
                        PortEvent {
                            call: 0,
                            events: EVENT_YIELD,
                        }
                    } else if let Some(id) = table.queue.pop_front() {
                        PortEvent {
                            call: id,
                            events: EVENT_CONNECTION,
                        }
                    } else {
                        break;
                    };
                    // SAFETY: as above.
                    out.add(n).write(events);
                    n += 1;
                }
                if n > 0 {
                    return n;
                }
                port.ready.wait(&mut state);
            }
        })
    }
}

unsafe extern "C" fn request_head(
    context: *const c_void,
    id: u64,
    out: *mut RawRequestHead,
) -> i32 {
    // SAFETY: the release passes its port's context, and `out` writable.
    unsafe {
        on_call(context, id, |_, call| {
            if out.is_null() {
                return STATUS_ERROR;
            }
            // The head lives as long as the call: the release's
            // `request_done` comes first.
            out.write(call.head.raw());
            STATUS_OK
        })
    }
}

unsafe extern "C" fn read_body(
    context: *const c_void,
    id: u64,
    dst: *mut u8,
    cap: usize,
    read: *mut usize,
) -> i32 {
    // SAFETY: the release passes its port's context, `dst` with `cap`
    // writable bytes and `read` writable.
    unsafe {
        on_call(context, id, |_, call| {
            if read.is_null() || (dst.is_null() && cap > 0) {
                return STATUS_ERROR;
            }
            read.write(0);
            let mut state = call.state.lock();
            if state.cancelled.is_some() {
                return STATUS_GONE;
            }
            if let Some(front) = state.body.front_mut() {
                let n = front.len().min(cap);
                std::ptr::copy_nonoverlapping(front.as_ptr(), dst, n);
                front.advance(n);
                if front.is_empty() {
                    state.body.pop_front();
                }
                read.write(n);
                return STATUS_OK;
            }
            if state.body_end {
                return if state.body_broken {
                    STATUS_ERROR
                } else {
                    STATUS_END
                };
            }
            state.wants_body = true;
            if let Some(waker) = state.body_waker.take() {
                waker.wake();
            }
            STATUS_PENDING
        })
    }
}

unsafe extern "C" fn send_head(
    context: *const c_void,
    id: u64,
    status: u16,
    headers: Slice,
    body_len: u64,
) -> i32 {
    // SAFETY: the release passes its port's context; `headers` is
    // borrowed for the call.
    unsafe {
        on_call(context, id, |_, call| {
            let parsed = response_headers(headers.as_bytes());
            let mut state = call.state.lock();
            if state.cancelled.is_some() {
                return STATUS_GONE;
            }
            if state.head_sent || state.broken.is_some() {
                return STATUS_ERROR;
            }
            state.head_sent = true;
            match parsed {
                Ok(headers) => {
                    state.head = Some(ResponseHead {
                        status,
                        headers,
                        body_len: (body_len != BODY_LEN_UNKNOWN).then_some(body_len),
                    })
                }
                Err(e) => state.broken = Some(Broken::Aborted(e.to_string())),
            }
            state.wake_host();
            if state.broken.is_some() {
                STATUS_ERROR
            } else {
                STATUS_OK
            }
        })
    }
}

unsafe extern "C" fn send_data(context: *const c_void, id: u64, data: Slice) -> i32 {
    // SAFETY: the release passes its port's context; `data` is borrowed
    // for the call.
    unsafe {
        on_call(context, id, |_, call| {
            let mut state = call.state.lock();
            if state.cancelled.is_some() {
                return STATUS_GONE;
            }
            if !state.head_sent || state.out_end || state.broken.is_some() {
                return STATUS_ERROR;
            }
            if state.out_bytes >= WINDOW {
                state.writer_waiting = true;
                return STATUS_PENDING;
            }
            let bytes = data.as_bytes();
            if bytes.is_empty() {
                return STATUS_OK;
            }
            state.out_bytes += bytes.len();
            state
                .out
                .push_back(Frame::Data(Bytes::copy_from_slice(bytes)));
            state.wake_host();
            STATUS_OK
        })
    }
}

unsafe extern "C" fn send_end(context: *const c_void, id: u64, trailers: Slice) -> i32 {
    // SAFETY: the release passes its port's context; `trailers` is
    // borrowed for the call.
    unsafe {
        on_call(context, id, |_, call| {
            let block = trailers.as_bytes();
            let trailers = (!block.is_empty()).then(|| response_headers(block));
            let mut state = call.state.lock();
            if state.cancelled.is_some() {
                return STATUS_GONE;
            }
            if !state.head_sent || state.out_end || state.broken.is_some() {
                return STATUS_ERROR;
            }
            let status = match trailers {
                Some(Ok(trailers)) => {
                    state.out.push_back(Frame::Trailers(trailers));
                    state.out_end = true;
                    STATUS_OK
                }
                Some(Err(e)) => {
                    state.broken = Some(Broken::Aborted(format!("its trailers: {e}")));
                    STATUS_ERROR
                }
                None => {
                    state.out_end = true;
                    STATUS_OK
                }
            };
            state.wake_host();
            status
        })
    }
}

unsafe extern "C" fn abort(context: *const c_void, id: u64, reason: Slice) {
    // SAFETY: the release passes its port's context; `reason` is borrowed
    // for the call.
    unsafe {
        on_call(context, id, |_, call| {
            let reason = String::from_utf8_lossy(reason.as_bytes()).into_owned();
            let mut state = call.state.lock();
            if !state.out_end && state.broken.is_none() {
                state.broken = Some(Broken::Aborted(reason));
                state.wake_host();
            }
            STATUS_OK
        });
    }
}

unsafe extern "C" fn request_done(context: *const c_void, id: u64) {
    // SAFETY: the release passes its port's context.
    unsafe {
        on_port(context, (), |port| {
            let mut calls = port.state.lock();
            let Some(call) = calls.calls.remove(&id) else {
                return;
            };
            if calls.calls.is_empty() {
                port.idle.notify_all();
            }
            drop(calls);
            let mut state = call.state.lock();
            state.done = true;
            state.wake_host();
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head() -> RequestHead {
        let mut headers = HeaderMap::new();
        headers.append("x-a", "1".parse().unwrap());
        headers.append("x-a", "2".parse().unwrap());
        headers.append("host", "h".parse().unwrap());
        RequestHead {
            method: "POST".into(),
            path: "/echo".into(),
            query: "q=1".into(),
            headers,
            version: 11,
            remote: "127.0.0.1:5".into(),
            body_len: None,
        }
    }

    fn context(port: &Arc<Port>) -> *const c_void {
        port.raw.context
    }

    fn events(port: &Arc<Port>) -> Vec<PortEvent> {
        let mut out = [PortEvent::default(); 8];
        // SAFETY: a live port's context and room for 8 events.
        let n = unsafe { wait_events(context(port), out.as_mut_ptr(), out.len()) };
        out[..n].to_vec()
    }

    fn noop() -> Context<'static> {
        Context::from_waker(Waker::noop())
    }

    #[test]
    fn a_call_goes_round_with_its_head_body_and_streamed_response() {
        let port = Port::new(false);
        let call = port.submit(head()).unwrap();
        let got = events(&port);
        assert_eq!((got.len(), got[0].events), (1, EVENT_REQUEST));
        let id = got[0].call;
        let ctx = context(&port);
        // SAFETY: a live port; `raw` is written by request_head.
        let raw = unsafe {
            let mut raw = std::mem::MaybeUninit::<RawRequestHead>::uninit();
            assert_eq!(request_head(ctx, id, raw.as_mut_ptr()), STATUS_OK);
            raw.assume_init()
        };
        // SAFETY: lent until request_done.
        let (method, headers) = unsafe {
            (
                raw.method.as_bytes(),
                std::slice::from_raw_parts(raw.headers, raw.header_count),
            )
        };
        assert_eq!(
            (method, raw.header_count, raw.body_len),
            (&b"POST"[..], 3, BODY_LEN_UNKNOWN)
        );
        // SAFETY: as above.
        let names: Vec<_> = headers
            .iter()
            .map(|h| unsafe { h.name.as_bytes() })
            .collect();
        assert_eq!(names, [&b"x-a"[..], b"x-a", b"host"]);

        // The body moves only when asked for.
        let mut buf = [0u8; 4];
        let mut read = 0;
        // SAFETY: `buf` and `read` are writable.
        let status = unsafe { read_body(ctx, id, buf.as_mut_ptr(), buf.len(), &mut read) };
        assert_eq!(status, STATUS_PENDING);
        assert_eq!(call.poll_wants_body(&mut noop()), Poll::Ready(true));
        call.feed_body(Bytes::from_static(b"hello"));
        assert_eq!(events(&port)[0].events, EVENT_READABLE);
        // SAFETY: as above.
        let status = unsafe { read_body(ctx, id, buf.as_mut_ptr(), buf.len(), &mut read) };
        assert_eq!((status, &buf[..read]), (STATUS_OK, &b"hell"[..]));
        call.end_body(false);
        // SAFETY: as above.
        let status = unsafe { read_body(ctx, id, buf.as_mut_ptr(), buf.len(), &mut read) };
        assert_eq!((status, &buf[..read]), (STATUS_OK, &b"o"[..]));
        // SAFETY: as above.
        let status = unsafe { read_body(ctx, id, buf.as_mut_ptr(), buf.len(), &mut read) };
        assert_eq!(status, STATUS_END);

        // The response: a head, the window, trailers.
        assert!(call.poll_head(&mut noop()).is_pending());
        let mut block = Vec::new();
        abi::encode_header(&mut block, b"content-type", b"text/plain");
        // SAFETY: borrowed slices for the calls.
        unsafe {
            assert_eq!(
                send_head(ctx, id, 200, Slice::new(&block), BODY_LEN_UNKNOWN),
                STATUS_OK
            );
            let chunk = vec![7u8; WINDOW];
            assert_eq!(send_data(ctx, id, Slice::new(&chunk)), STATUS_OK);
            assert_eq!(send_data(ctx, id, Slice::new(b"more")), STATUS_PENDING);
        }
        let Poll::Ready(Ok(head)) = call.poll_head(&mut noop()) else {
            panic!("no head")
        };
        assert_eq!(
            (head.status, head.headers["content-type"].as_bytes()),
            (200, &b"text/plain"[..])
        );
        let Poll::Ready(Some(Ok(Frame::Data(data)))) = call.poll_frame(&mut noop()) else {
            panic!("no data")
        };
        assert_eq!(data.len(), WINDOW);
        // With the READABLE of the body's end, not taken yet.
        assert_eq!(events(&port)[0].events, EVENT_WRITABLE | EVENT_READABLE);
        let mut trailers = Vec::new();
        abi::encode_header(&mut trailers, b"x-checksum", b"42");
        // SAFETY: borrowed slices for the calls.
        unsafe {
            assert_eq!(send_data(ctx, id, Slice::new(b"more")), STATUS_OK);
            assert_eq!(send_end(ctx, id, Slice::new(&trailers)), STATUS_OK);
            request_done(ctx, id);
        }
        assert!(
            matches!(call.poll_frame(&mut noop()), Poll::Ready(Some(Ok(Frame::Data(d)))) if d == "more")
        );
        assert!(
            matches!(call.poll_frame(&mut noop()), Poll::Ready(Some(Ok(Frame::Trailers(t)))) if t["x-checksum"] == "42")
        );
        assert!(matches!(call.poll_frame(&mut noop()), Poll::Ready(None)));
        assert!(call.is_complete());
        assert_eq!(port.open_calls(), 0);
    }

    #[test]
    fn a_dropped_call_is_cancelled_and_a_closed_port_takes_nothing() {
        let port = Port::new(false);
        let call = port.submit(head()).unwrap();
        let id = events(&port)[0].call;
        drop(call);
        let got = events(&port);
        assert_eq!((got[0].call, got[0].events), (id, EVENT_CANCELLED));
        let mut buf = [0u8; 4];
        let mut read = 0;
        // SAFETY: a live port; writable buffers.
        let status = unsafe { read_body(context(&port), id, buf.as_mut_ptr(), 4, &mut read) };
        assert_eq!(status, STATUS_GONE);
        // SAFETY: as above.
        unsafe { request_done(context(&port), id) };
        // SAFETY: as above: an unknown call is gone.
        let status = unsafe { read_body(context(&port), id, buf.as_mut_ptr(), 4, &mut read) };
        assert_eq!(status, STATUS_GONE);

        let open = port.submit(head()).unwrap();
        port.close();
        assert!(events(&port).is_empty(), "a closed port has no events");
        assert!(matches!(
            open.poll_head(&mut noop()),
            Poll::Ready(Err(Broken::Cancelled(_)))
        ));
        assert!(port.submit(head()).is_err());
    }

    #[test]
    fn a_waiting_release_thread_wakes_for_a_request() {
        let port = Port::new(false);
        let waiter = {
            let port = Arc::clone(&port);
            std::thread::spawn(move || events(&port))
        };
        let _call = port.submit(head()).unwrap();
        let got = waiter.join().unwrap();
        assert_eq!(got[0].events, EVENT_REQUEST);
    }
}
