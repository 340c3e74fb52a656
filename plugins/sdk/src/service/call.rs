//! One call from the host, from its `EVENT_REQUEST` to its `request_done`:
//! the cell its events reach (the [`Registry`] maps the host's ids to
//! cells; events for an id it does not know are ignored), and the task that
//! builds the request, calls the service and streams the response back.
//!
//! The task ends the call exactly once, whatever happens: the response
//! ended, or aborted (the service or its body failed, a panic, the release
//! stopping), or left (the host cancelled it); its handler future is
//! dropped first, then `request_done`, always last.

use std::collections::HashMap;
use std::future::{poll_fn, Future};
use std::net::SocketAddr;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Uri, Version};

use super::port::PortLink;
use super::{Body, BoxError, Exchange, HttpService, Peer};
use crate::abi::{
    encode_header, Header, RawRequestHead, BODY_LEN_UNKNOWN, EVENT_CANCELLED, EVENT_READABLE,
    EVENT_WRITABLE, STATUS_GONE, STATUS_OK, STATUS_PENDING,
};
use crate::export::panic_message;

/// The most one `send_data` passes: a large frame goes in pieces, so the
/// host's window bounds what it holds.
const SEND_CHUNK: usize = 64 * 1024;

/// One waker to call when an event comes.
#[derive(Default)]
pub(crate) struct WakerSlot(Mutex<Option<Waker>>);

impl WakerSlot {
    pub(crate) fn register(&self, waker: &Waker) {
        let mut slot = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        match &*slot {
            Some(known) if known.will_wake(waker) => {}
            _ => *slot = Some(waker.clone()),
        }
    }

    fn wake(&self) {
        let waker = self.0.lock().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

/// Where a call stands for the release.
const LIVE: u8 = 0;
/// The host cancelled it: drop the handler, then `request_done`.
const CANCELLED: u8 = 1;
/// The release is stopping: abort it, then `request_done`.
const STOPPING: u8 = 2;

/// What the host's events reach of a call.
pub(crate) struct CallCell {
    pub(crate) id: u64,
    phase: AtomicU8,
    /// The request body's reader: `EVENT_READABLE`.
    pub(crate) reader: WakerSlot,
    /// The call's task: `EVENT_WRITABLE`, and an end it must see.
    task: WakerSlot,
}

impl CallCell {
    pub(crate) fn new(id: u64) -> CallCell {
        CallCell {
            id,
            phase: AtomicU8::new(LIVE),
            reader: WakerSlot::default(),
            task: WakerSlot::default(),
        }
    }

    /// Ends a live call as `phase` and wakes whoever waits on it.
    fn end(&self, phase: u8) {
        if self
            .phase
            .compare_exchange(LIVE, phase, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            self.task.wake();
            self.reader.wake();
        }
    }

    /// Marks the call to be aborted: the release is stopping.
    pub(crate) fn stop(&self) {
        self.end(STOPPING);
    }

    /// Hands the call `events` (`EVENT_*` bits).
    fn deliver(&self, events: u32) {
        if events & EVENT_CANCELLED != 0 {
            self.end(CANCELLED);
        }
        if events & EVENT_READABLE != 0 {
            self.reader.wake();
        }
        if events & EVENT_WRITABLE != 0 {
            self.task.wake();
        }
    }
}

/// The calls in progress, by the host's id.
#[derive(Default)]
pub(crate) struct Registry(Mutex<HashMap<u64, Arc<CallCell>>>);

impl Registry {
    fn calls(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<CallCell>>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn insert(&self, cell: Arc<CallCell>) {
        self.calls().insert(cell.id, cell);
    }

    fn remove(&self, id: u64) {
        self.calls().remove(&id);
    }

    /// Hands `events` to the call `id`; false (and nothing done) if no
    /// such call is in progress: an event racing the call's end.
    pub(crate) fn deliver(&self, id: u64, events: u32) -> bool {
        let cell = self.calls().get(&id).cloned();
        match cell {
            Some(cell) => {
                cell.deliver(events);
                true
            }
            None => false,
        }
    }

    /// Every call in progress.
    pub(crate) fn all(&self) -> Vec<Arc<CallCell>> {
        self.calls().values().cloned().collect()
    }
}

/// Why an exchange ended without its response.
#[derive(Debug)]
pub(crate) enum Failure {
    /// The host no longer knows the call: nothing to tell it.
    Gone,
    /// Abort the call with this reason.
    Error(String),
}

/// What an exchange works with: its call and the port.
pub(crate) struct Call {
    cell: Arc<CallCell>,
    port: Arc<PortLink>,
}

impl Call {
    /// The request, built from the head the host lends.
    fn request(&self) -> Result<Request<Body>, Failure> {
        let head = self
            .port
            .request_head(self.cell.id)
            .map_err(|status| match status {
                STATUS_GONE => Failure::Gone,
                status => {
                    Failure::Error(format!("the host lent no request head (status {status})"))
                }
            })?;
        let body = Body::new(self.cell.clone(), self.port.clone(), head.body_len);
        // SAFETY: the host lends the head until `request_done`, which only
        // this call's task sends, after this exchange.
        unsafe { build_request(&head, body) }.map_err(Failure::Error)
    }

    /// Checks a `send_*` status.
    fn sent(&self, what: &str, status: i32) -> Result<(), Failure> {
        match status {
            STATUS_OK => Ok(()),
            STATUS_GONE => Err(Failure::Gone),
            status => Err(Failure::Error(format!(
                "the host refused the response's {what} (status {status})"
            ))),
        }
    }

    /// Sends one piece of the response body, waiting for room.
    async fn send_data(&self, data: &[u8]) -> Result<(), Failure> {
        poll_fn(|cx| {
            // Before the send: a WRITABLE raised after PENDING finds it.
            self.cell.task.register(cx.waker());
            match self.port.send_data(self.cell.id, data) {
                STATUS_PENDING => Poll::Pending,
                status => Poll::Ready(self.sent("data", status)),
            }
        })
        .await
    }
}

/// The request a head describes, with `body`.
///
/// # Safety
/// The head's slices and its header array are valid for this call.
pub(crate) unsafe fn build_request<B>(
    head: &RawRequestHead,
    body: B,
) -> Result<Request<B>, String> {
    // SAFETY: the caller's contract.
    let (method, path, query, remote) = unsafe {
        (
            head.method.as_bytes(),
            head.path.as_bytes(),
            head.query.as_bytes(),
            head.remote.as_bytes(),
        )
    };
    let headers: &[Header] = if head.header_count == 0 {
        &[]
    } else {
        // SAFETY: the caller's contract: `header_count` headers.
        unsafe { std::slice::from_raw_parts(head.headers, head.header_count) }
    };
    let mut request = Request::new(body);
    *request.method_mut() = Method::from_bytes(method)
        .map_err(|_| format!("bad method {:?}", String::from_utf8_lossy(method)))?;
    let mut target = Vec::with_capacity(path.len() + 1 + query.len());
    target.extend_from_slice(path);
    if !query.is_empty() {
        target.push(b'?');
        target.extend_from_slice(query);
    }
    *request.uri_mut() = Uri::from_maybe_shared(Bytes::from(target))
        .map_err(|e| format!("bad request target: {e}"))?;
    *request.version_mut() = match head.version {
        10 => Version::HTTP_10,
        11 => Version::HTTP_11,
        20 => Version::HTTP_2,
        other => return Err(format!("unknown HTTP version {other}")),
    };
    let map = request.headers_mut();
    map.reserve(headers.len());
    for header in headers {
        // SAFETY: the caller's contract: each header's slices are valid.
        let (name, value) = unsafe { (header.name.as_bytes(), header.value.as_bytes()) };
        let name = HeaderName::from_bytes(name)
            .map_err(|_| format!("bad header name {:?}", String::from_utf8_lossy(name)))?;
        let value =
            HeaderValue::from_bytes(value).map_err(|_| format!("bad value of header {name}"))?;
        map.append(name, value);
    }
    if let Some(peer) = std::str::from_utf8(remote)
        .ok()
        .and_then(|r| r.parse::<SocketAddr>().ok())
    {
        request.extensions_mut().insert(Peer(peer));
    }
    Ok(request)
}

/// `headers` as a block ([`encode_header`]), in order, repeated names kept.
pub(crate) fn header_block(headers: &HeaderMap) -> Vec<u8> {
    let size = headers
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + 8)
        .sum();
    let mut block = Vec::with_capacity(size);
    for (name, value) in headers {
        encode_header(&mut block, name.as_str().as_bytes(), value.as_bytes());
    }
    block
}

/// The whole exchange of a call: the request to the service, its response
/// to the host, the body streamed frame by frame as it is produced.
pub(crate) async fn exchange<S, B>(mut service: S, call: Call) -> Result<(), Failure>
where
    S: tower_service::Service<Request<Body>, Response = http::Response<B>>,
    S::Error: Into<BoxError>,
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let request = call.request()?;
    let failed = |what: &str, e: BoxError| Failure::Error(format!("{what}: {e}"));
    poll_fn(|cx| service.poll_ready(cx))
        .await
        .map_err(|e| failed("the service is not ready", e.into()))?;
    let response = service
        .call(request)
        .await
        .map_err(|e| failed("the service failed", e.into()))?;
    let (parts, body) = response.into_parts();
    let len = body.size_hint().exact().unwrap_or(BODY_LEN_UNKNOWN);
    let block = header_block(&parts.headers);
    call.sent(
        "head",
        call.port
            .send_head(call.cell.id, parts.status.as_u16(), &block, len),
    )?;
    let mut body = std::pin::pin!(body);
    let trailers = loop {
        let frame = match poll_fn(|cx| body.as_mut().poll_frame(cx)).await {
            None => break Vec::new(),
            Some(Err(e)) => return Err(failed("the response body failed", e.into())),
            Some(Ok(frame)) => frame,
        };
        match frame.into_data() {
            Ok(data) => {
                for piece in data.chunks(SEND_CHUNK) {
                    call.send_data(piece).await?;
                }
            }
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    break header_block(&trailers);
                }
            }
        }
    };
    call.sent("end", call.port.send_end(call.cell.id, &trailers))
}

/// A call's task on the runtime.
pub(crate) struct CallTask {
    call: Call,
    registry: Arc<Registry>,
    /// The exchange, until it ends or is dropped.
    exchange: Option<Exchange>,
    /// The host needs no abort: the response ended, was aborted, or the
    /// host gave the call up.
    settled: bool,
}

impl CallTask {
    /// The task of a call just registered.
    pub(crate) fn new(
        cell: Arc<CallCell>,
        port: Arc<PortLink>,
        registry: Arc<Registry>,
        service: HttpService,
    ) -> CallTask {
        let exchange = service.exchange(Call {
            cell: cell.clone(),
            port: port.clone(),
        });
        CallTask {
            call: Call { cell, port },
            registry,
            exchange: Some(exchange),
            settled: false,
        }
    }

    /// Drops the exchange (the handler and what it holds); a panic in a
    /// drop is the handler's own, and goes no further.
    fn drop_exchange(&mut self) {
        if let Some(exchange) = self.exchange.take() {
            let _ = catch_unwind(AssertUnwindSafe(move || drop(exchange)));
        }
    }
}

impl Future for CallTask {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let task = self.get_mut();
        task.call.cell.task.register(cx.waker());
        match task.call.cell.phase.load(Ordering::Acquire) {
            CANCELLED => task.settled = true,
            STOPPING => {}
            _ => {
                let Some(exchange) = task.exchange.as_mut() else {
                    return Poll::Ready(());
                };
                let outcome = match catch_unwind(AssertUnwindSafe(|| exchange.as_mut().poll(cx))) {
                    Ok(Poll::Pending) => return Poll::Pending,
                    Ok(Poll::Ready(outcome)) => outcome,
                    Err(payload) => Err(Failure::Error(panic_message(&*payload))),
                };
                task.drop_exchange();
                if let Err(Failure::Error(reason)) = outcome {
                    task.call.port.abort(task.call.cell.id, &reason);
                }
                task.settled = true;
            }
        }
        Poll::Ready(())
    }
}

impl Drop for CallTask {
    fn drop(&mut self) {
        self.drop_exchange();
        let id = self.call.cell.id;
        if !self.settled && self.call.cell.phase.load(Ordering::Acquire) != CANCELLED {
            self.call
                .port
                .abort(id, "the release stopped before it answered");
        }
        self.registry.remove(id);
        self.call.port.request_done(id);
    }
}
