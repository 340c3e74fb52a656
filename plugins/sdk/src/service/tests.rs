//! The service exports driven through their table, as the host drives
//! them, against a fake host port in this process: requests in, responses
//! out, both bodies streamed with backpressure, cancellation, panics,
//! stop. And the pieces alone: request heads, header blocks, the registry.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::ffi::c_void;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body::Frame;

use super::call::{build_request, header_block, CallCell, Registry};
use super::instance::{service_api, Release};
use super::{AsyncPlugin, Body, BodyError, HttpService, Peer};
use crate::abi::{
    decode_headers, Buffer, Header, Port, PortApi, PortEvent, RawConnection, RawRequestHead,
    ServiceApi, Slice, ABI_VERSION_SERVICE, BODY_LEN_UNKNOWN, EVENT_CANCELLED, EVENT_READABLE,
    EVENT_REQUEST, EVENT_WRITABLE, FEATURE_STOP, STATUS_END, STATUS_ERROR, STATUS_GONE, STATUS_OK,
    STATUS_PENDING,
};

/// An upper bound for anything awaited here, never an expected duration.
const PATIENCE: Duration = Duration::from_secs(20);

// ---- the fake host ----

/// One call as the fake host keeps it.
#[derive(Default)]
struct FakeCall {
    // The head, lent to the release until `request_done`.
    method: Vec<u8>,
    path: Vec<u8>,
    query: Vec<u8>,
    remote: Vec<u8>,
    header_bytes: Vec<(Vec<u8>, Vec<u8>)>,
    headers: Vec<Header>,
    body_len: u64,
    // The request body not yet read, and whether more may come.
    body: VecDeque<u8>,
    body_over: bool,
    reader_waiting: bool,
    // The response.
    status: Option<u16>,
    head_block: Vec<u8>,
    sent_len: Option<u64>,
    data: Vec<u8>,
    /// Bytes sent and not yet taken by the "client".
    queued: usize,
    writer_waiting: bool,
    ended: Option<Vec<u8>>,
    aborted: Option<String>,
    done: bool,
    cancelled: bool,
    /// How many `send_data` answered PENDING.
    pendings: usize,
}

// SAFETY: `headers` point into the call's own `header_bytes`, which move
// with it and are never changed.
unsafe impl Send for FakeCall {}

#[derive(Default)]
struct Queue {
    events: VecDeque<PortEvent>,
    closed: bool,
}

/// A host port in this process.
struct FakeHost {
    queue: Mutex<Queue>,
    queue_changed: Condvar,
    calls: Mutex<HashMap<u64, FakeCall>>,
    calls_changed: Condvar,
    /// Response bytes queued before `send_data` says PENDING.
    window: usize,
}

fn fake(host: *const c_void) -> &'static FakeHost {
    // SAFETY: the context of every port is an `Arc<FakeHost>` that the
    // test keeps alive past `stop`.
    unsafe { &*host.cast::<FakeHost>() }
}

impl FakeHost {
    fn new(window: usize) -> Arc<FakeHost> {
        Arc::new(FakeHost {
            queue: Mutex::new(Queue::default()),
            queue_changed: Condvar::new(),
            calls: Mutex::new(HashMap::new()),
            calls_changed: Condvar::new(),
            window,
        })
    }

    fn raise(&self, call: u64, events: u32) {
        let mut queue = self.queue.lock().unwrap();
        match queue.events.iter_mut().find(|e| e.call == call) {
            Some(pending) => pending.events |= events,
            None => queue.events.push_back(PortEvent { call, events }),
        }
        self.queue_changed.notify_all();
    }

    fn close(&self) {
        self.queue.lock().unwrap().closed = true;
        self.queue_changed.notify_all();
    }

    fn calls(&self) -> MutexGuard<'_, HashMap<u64, FakeCall>> {
        self.calls.lock().unwrap()
    }

    /// A new call: `GET`-like with no body unless `body_len` says so.
    fn submit(&self, id: u64, method: &str, target: &str, headers: &[(&str, &str)], body_len: u64) {
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        let mut call = FakeCall {
            method: method.into(),
            path: path.into(),
            query: query.into(),
            remote: b"192.0.2.7:4321".to_vec(),
            header_bytes: headers
                .iter()
                .map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec()))
                .collect(),
            body_len,
            body_over: body_len == 0,
            ..FakeCall::default()
        };
        call.headers = call
            .header_bytes
            .iter()
            .map(|(n, v)| Header {
                name: Slice::new(n),
                value: Slice::new(v),
            })
            .collect();
        self.calls().insert(id, call);
        self.raise(id, EVENT_REQUEST);
    }

    /// The client sends more of its body (`over`: and ends it).
    fn feed(&self, id: u64, bytes: &[u8], over: bool) {
        let mut calls = self.calls();
        let call = calls.get_mut(&id).unwrap();
        call.body.extend(bytes);
        call.body_over |= over;
        if std::mem::take(&mut call.reader_waiting) {
            self.raise(id, EVENT_READABLE);
        }
    }

    /// The client takes everything sent so far.
    fn drain(&self, id: u64) -> usize {
        let mut calls = self.calls();
        let call = calls.get_mut(&id).unwrap();
        let taken = std::mem::take(&mut call.queued);
        if std::mem::take(&mut call.writer_waiting) {
            self.raise(id, EVENT_WRITABLE);
        }
        taken
    }

    fn cancel(&self, id: u64) {
        self.calls().get_mut(&id).unwrap().cancelled = true;
        self.raise(id, EVENT_CANCELLED);
    }

    /// Waits until `ready` holds of the calls, then gives what `ready` gave.
    fn wait_for<R>(
        &self,
        what: &str,
        mut ready: impl FnMut(&HashMap<u64, FakeCall>) -> Option<R>,
    ) -> R {
        let deadline = Instant::now() + PATIENCE;
        let mut calls = self.calls();
        loop {
            if let Some(found) = ready(&calls) {
                return found;
            }
            let left = deadline
                .checked_duration_since(Instant::now())
                .unwrap_or_else(|| panic!("timed out waiting for {what}"));
            calls = self.calls_changed.wait_timeout(calls, left).unwrap().0;
        }
    }

    fn wait_done(&self, id: u64) {
        self.wait_for("request_done", |calls| calls[&id].done.then_some(()));
    }

    /// Changes a call and tells the waiters, answering what `f` gives.
    fn change<R>(
        context: *const c_void,
        id: u64,
        absent: R,
        f: impl FnOnce(&mut FakeCall) -> R,
    ) -> R {
        let host = fake(context);
        let mut calls = host.calls();
        let answer = match calls.get_mut(&id) {
            Some(call) if !call.done => f(call),
            _ => absent,
        };
        host.calls_changed.notify_all();
        answer
    }
}

unsafe extern "C" fn wait_events(context: *const c_void, out: *mut PortEvent, max: usize) -> usize {
    let host = fake(context);
    let mut queue = host.queue.lock().unwrap();
    loop {
        if queue.closed {
            return 0;
        }
        if !queue.events.is_empty() {
            let n = queue.events.len().min(max);
            for (i, event) in queue.events.drain(..n).enumerate() {
                // SAFETY: `out` has room for `max` events.
                unsafe { out.add(i).write(event) };
            }
            return n;
        }
        queue = host.queue_changed.wait(queue).unwrap();
    }
}

unsafe extern "C" fn request_head(
    context: *const c_void,
    id: u64,
    out: *mut RawRequestHead,
) -> i32 {
    FakeHost::change(context, id, STATUS_GONE, |call| {
        if call.cancelled {
            return STATUS_GONE;
        }
        let head = RawRequestHead {
            method: Slice::new(&call.method),
            path: Slice::new(&call.path),
            query: Slice::new(&call.query),
            headers: call.headers.as_ptr(),
            header_count: call.headers.len(),
            version: 11,
            remote: Slice::new(&call.remote),
            body_len: call.body_len,
        };
        // SAFETY: `out` is writable (the release's contract).
        unsafe { out.write(head) };
        STATUS_OK
    })
}

unsafe extern "C" fn read_body(
    context: *const c_void,
    id: u64,
    dst: *mut u8,
    cap: usize,
    read: *mut usize,
) -> i32 {
    FakeHost::change(context, id, STATUS_GONE, |call| {
        if call.cancelled {
            return STATUS_GONE;
        }
        if call.body.is_empty() {
            if call.body_over {
                return STATUS_END;
            }
            call.reader_waiting = true;
            return STATUS_PENDING;
        }
        let n = call.body.len().min(cap);
        for (i, byte) in call.body.drain(..n).enumerate() {
            // SAFETY: `dst` has room for `cap` bytes, `read` is writable.
            unsafe { dst.add(i).write(byte) };
        }
        // SAFETY: as above.
        unsafe { read.write(n) };
        STATUS_OK
    })
}

unsafe extern "C" fn send_head(
    context: *const c_void,
    id: u64,
    status: u16,
    headers: Slice,
    body_len: u64,
) -> i32 {
    FakeHost::change(context, id, STATUS_GONE, |call| {
        if call.cancelled {
            return STATUS_GONE;
        }
        if call.status.is_some() {
            return STATUS_ERROR;
        }
        call.status = Some(status);
        // SAFETY: the block is lent for this call.
        call.head_block = unsafe { headers.as_bytes() }.to_vec();
        call.sent_len = Some(body_len);
        STATUS_OK
    })
}

unsafe extern "C" fn send_data(context: *const c_void, id: u64, data: Slice) -> i32 {
    let window = fake(context).window;
    FakeHost::change(context, id, STATUS_GONE, |call| {
        if call.cancelled {
            return STATUS_GONE;
        }
        if call.queued >= window {
            call.writer_waiting = true;
            call.pendings += 1;
            return STATUS_PENDING;
        }
        // SAFETY: the data is lent for this call.
        let data = unsafe { data.as_bytes() };
        call.data.extend_from_slice(data);
        call.queued += data.len();
        STATUS_OK
    })
}

unsafe extern "C" fn send_end(context: *const c_void, id: u64, trailers: Slice) -> i32 {
    FakeHost::change(context, id, STATUS_GONE, |call| {
        if call.cancelled {
            return STATUS_GONE;
        }
        // SAFETY: the block is lent for this call.
        call.ended = Some(unsafe { trailers.as_bytes() }.to_vec());
        STATUS_OK
    })
}

unsafe extern "C" fn abort(context: *const c_void, id: u64, reason: Slice) {
    FakeHost::change(context, id, (), |call| {
        // SAFETY: the reason is lent for this call.
        call.aborted = Some(String::from_utf8_lossy(unsafe { reason.as_bytes() }).into_owned());
    })
}

unsafe extern "C" fn request_done(context: *const c_void, id: u64) {
    FakeHost::change(context, id, (), |call| call.done = true)
}

// This host hands no connection over (the agent's tests serve those).
unsafe extern "C" fn take_connection(_: *const c_void, _: u64, _: *mut RawConnection) -> i32 {
    STATUS_GONE
}

unsafe extern "C" fn connection_yielded(_: *const c_void, _: u64) {}

unsafe extern "C" fn connection_done(_: *const c_void, _: u64, _: i32, _: Slice) {}

unsafe extern "C" fn request_begun(_: *const c_void) {}

unsafe extern "C" fn request_ended(_: *const c_void, _: u16, _: u64) {}

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

// ---- a service to drive ----

/// Handlers of `/forever?N` started, by N (one N per test).
static FOREVER_STARTED: [AtomicUsize; 2] = [AtomicUsize::new(0), AtomicUsize::new(0)];
/// The blocking task of `/blocking` ended.
static BLOCKING_DONE: AtomicBool = AtomicBool::new(false);
/// Handlers of `/forever?N` dropped, by N.
static FOREVER_DROPPED: [AtomicUsize; 2] = [AtomicUsize::new(0), AtomicUsize::new(0)];

/// A response body of the tests.
enum TestBody {
    Full(Option<Bytes>),
    Echo(Body),
    /// Some data, then trailers.
    Trailed(u8),
    Fails,
}

impl http_body::Body for TestBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            TestBody::Full(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            TestBody::Echo(body) => Pin::new(body).poll_frame(cx),
            TestBody::Trailed(step) => {
                *step += 1;
                Poll::Ready(match step {
                    1 => Some(Ok(Frame::data(Bytes::from_static(b"sum")))),
                    2 => {
                        let mut trailers = HeaderMap::new();
                        trailers.insert("x-checksum", "42".parse().unwrap());
                        Some(Ok(Frame::trailers(trailers)))
                    }
                    _ => None,
                })
            }
            TestBody::Fails => Poll::Ready(Some(Err(BodyError::BrokenOff))),
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self {
            TestBody::Full(Some(data)) => http_body::SizeHint::with_exact(data.len() as u64),
            TestBody::Echo(body) => body.size_hint(),
            _ => http_body::SizeHint::default(),
        }
    }
}

struct CountDrop(usize);
impl Drop for CountDrop {
    fn drop(&mut self) {
        FOREVER_DROPPED[self.0].fetch_add(1, Ordering::SeqCst);
    }
}

#[derive(Clone)]
struct TestService;

impl tower_service::Service<Request<Body>> for TestService {
    type Response = Response<TestBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<TestBody>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        Box::pin(async move {
            let full = |text: String| Response::new(TestBody::Full(Some(Bytes::from(text))));
            Ok(match request.uri().path() {
                "/hello" => full("hello".into()),
                "/head" => {
                    let values: Vec<_> = request
                        .headers()
                        .get_all("x-a")
                        .iter()
                        .map(|v| v.to_str().unwrap())
                        .collect();
                    let peer = request.extensions().get::<Peer>().map(|p| p.0.to_string());
                    full(format!(
                        "{} {} {:?} {:?} {:?}",
                        request.method(),
                        request.uri(),
                        request.version(),
                        values,
                        peer
                    ))
                }
                "/echo" => Response::new(TestBody::Echo(request.into_body())),
                "/trailers" => Response::new(TestBody::Trailed(0)),
                "/fails" => Response::new(TestBody::Fails),
                "/panic" => panic!("boom in the handler"),
                "/blocking" => {
                    tokio::task::spawn_blocking(|| {
                        // Work that outlasts its request: `stop` waits for it.
                        std::thread::sleep(Duration::from_millis(200));
                        BLOCKING_DONE.store(true, Ordering::SeqCst);
                    });
                    full("spawned".into())
                }
                "/forever" => {
                    let slot = request.uri().query().unwrap().parse().unwrap();
                    let _counted = CountDrop(slot);
                    FOREVER_STARTED[slot].fetch_add(1, Ordering::SeqCst);
                    std::future::pending().await
                }
                _ => {
                    let mut response = full("none".into());
                    *response.status_mut() = http::StatusCode::NOT_FOUND;
                    response
                }
            })
        })
    }
}

struct TestPlugin;

impl AsyncPlugin for TestPlugin {
    const STATE_VERSION: u32 = 3;
    type State = String;

    fn restore(state: Option<&[u8]>) -> Result<String, String> {
        match state {
            Some(b"refuse") => Err("refused by restore".into()),
            Some(bytes) => Ok(String::from_utf8_lossy(bytes).into_owned()),
            None => Ok("fresh".into()),
        }
    }

    fn service(_: Arc<String>) -> HttpService {
        HttpService::new(TestService)
    }

    fn snapshot(state: &String) -> Vec<u8> {
        state.as_bytes().to_vec()
    }

    fn health(state: &String) -> Result<(), String> {
        match state.as_str() {
            "sick" => Err("sick".into()),
            _ => Ok(()),
        }
    }
}

enum TestRelease {}
impl Release for TestRelease {
    type Plugin = TestPlugin;
    const NAME: &'static str = "svctest";
    const VERSION: &'static str = "0.0.1";
}
static API: ServiceApi = service_api::<TestRelease>();

/// The same code under another name, for the test that counts its threads.
enum StopRelease {}
impl Release for StopRelease {
    type Plugin = TestPlugin;
    const NAME: &'static str = "svcstop";
    const VERSION: &'static str = "0.0.1";
}
static STOP_API: ServiceApi = service_api::<StopRelease>();

// ---- driving it ----

/// An instance attached to a fake host.
struct Running {
    api: &'static ServiceApi,
    host: Arc<FakeHost>,
    _port: Box<Port>,
    instance: *mut c_void,
    stopped: bool,
}

fn taken(err: Buffer) -> String {
    // SAFETY: a buffer the library just filled, freed once here.
    String::from_utf8_lossy(&unsafe { err.into_vec() }).into_owned()
}

fn create(api: &'static ServiceApi, state: Option<&[u8]>) -> Result<*mut c_void, (i32, String)> {
    let slice = state.map(Slice::new);
    let state = slice
        .as_ref()
        .map_or(std::ptr::null(), |s| s as *const Slice);
    let (mut out, mut err) = (std::ptr::null_mut(), Buffer::EMPTY);
    // SAFETY: valid pointers for the call; no host table (logging off).
    let status = unsafe { (api.plugin.create)(std::ptr::null(), state, &mut out, &mut err) };
    match status {
        STATUS_OK => Ok(out),
        status => Err((status, taken(err))),
    }
}

fn start_with(api: &'static ServiceApi, window: usize) -> Running {
    let host = FakeHost::new(window);
    let port = Box::new(Port {
        size: std::mem::size_of::<Port>() as u32,
        context: Arc::as_ptr(&host).cast(),
        api: &PORT_API,
    });
    let instance = create(api, None).unwrap();
    let mut err = Buffer::EMPTY;
    // SAFETY: a live instance, a port that outlives it.
    let status = unsafe { (api.attach)(instance, &*port, &mut err) };
    assert_eq!(status, STATUS_OK, "{}", taken(err));
    Running {
        api,
        host,
        _port: port,
        instance,
        stopped: false,
    }
}

fn start() -> Running {
    start_with(&API, 1 << 20)
}

impl Running {
    /// Closes the port and stops the instance, as the host does.
    fn stop(&mut self) -> (i32, String) {
        self.host.close();
        let mut err = Buffer::EMPTY;
        // SAFETY: a live instance whose port is closed.
        let status = unsafe { (self.api.plugin.stop)(self.instance, &mut err) };
        self.stopped = true;
        (
            status,
            if status == STATUS_OK {
                String::new()
            } else {
                taken(err)
            },
        )
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if !self.stopped {
            self.stop();
        }
        // SAFETY: the instance made by `create`, destroyed once.
        unsafe { (self.api.plugin.destroy)(self.instance) };
    }
}

fn headers_of(block: &[u8]) -> Vec<(String, String)> {
    let mut seen = Vec::new();
    assert!(decode_headers(block, |n, v| seen.push((
        String::from_utf8_lossy(n).into_owned(),
        String::from_utf8_lossy(v).into_owned()
    ))));
    seen
}

// ---- the tests ----

#[test]
fn the_table_says_abi_3_with_stop_and_refuses_handle() {
    assert_eq!(API.plugin.abi_version, ABI_VERSION_SERVICE);
    assert_eq!(API.plugin.size as usize, std::mem::size_of::<ServiceApi>());
    assert_eq!(API.plugin.features, FEATURE_STOP);
    assert_eq!(API.plugin.state_version, 3);
    // SAFETY: static string literals.
    assert_eq!(unsafe { API.plugin.name.as_bytes() }, b"svctest");
    let mut err = Buffer::EMPTY;
    // SAFETY: `handle` of a service touches nothing but `err`.
    let status = unsafe {
        (API.plugin.handle)(
            std::ptr::null(),
            std::ptr::null(),
            std::ptr::null_mut(),
            &mut err,
        )
    };
    assert_eq!(status, STATUS_ERROR);
    assert!(taken(err).contains("this release is a service"));
}

#[test]
fn state_goes_through_restore_snapshot_and_health() {
    assert_eq!(
        create(&API, Some(b"refuse")).unwrap_err(),
        (STATUS_ERROR, "refused by restore".to_owned())
    );
    let running = start();
    let (mut out, mut err) = (Buffer::EMPTY, Buffer::EMPTY);
    // SAFETY: a live instance, writable buffers.
    let status = unsafe { (API.plugin.snapshot)(running.instance, &mut out, &mut err) };
    assert_eq!(status, STATUS_OK);
    assert_eq!(taken(out), "fresh");
    let sick = create(&API, Some(b"sick")).unwrap();
    // SAFETY: a live instance (never attached), then stopped and destroyed once.
    unsafe {
        assert_eq!((API.plugin.health)(running.instance, &mut err), STATUS_OK);
        assert_eq!((API.plugin.health)(sick, &mut err), STATUS_ERROR);
        assert_eq!(taken(err), "sick");
        let mut err = Buffer::EMPTY;
        assert_eq!((API.plugin.stop)(sick, &mut err), STATUS_OK);
        (API.plugin.destroy)(sick);
    }
}

#[test]
fn a_request_is_answered_through_the_port() {
    let running = start();
    running.host.submit(1, "GET", "/hello", &[], 0);
    running.host.wait_done(1);
    let calls = running.host.calls();
    let call = &calls[&1];
    assert_eq!(call.status, Some(200));
    assert_eq!(call.data, b"hello");
    assert_eq!(call.sent_len, Some(5), "an exact length is announced");
    assert_eq!(call.ended.as_deref(), Some(&[][..]));
    assert_eq!(call.aborted, None);
}

#[test]
fn the_request_head_reaches_the_service() {
    let running = start();
    running.host.submit(
        1,
        "PUT",
        "/head?x=1&y",
        &[("X-A", "1"), ("x-b", "2"), ("x-a", "3")],
        0,
    );
    running.host.wait_done(1);
    let calls = running.host.calls();
    assert_eq!(
        String::from_utf8_lossy(&calls[&1].data),
        r#"PUT /head?x=1&y HTTP/1.1 ["1", "3"] Some("192.0.2.7:4321")"#
    );
}

#[test]
fn bodies_stream_both_ways_with_backpressure() {
    // A window of 1 KiB: the response waits for the client at every chunk.
    let running = start_with(&API, 1024);
    let host = running.host.clone();
    host.submit(1, "POST", "/echo", &[], BODY_LEN_UNKNOWN);
    // Nothing to read yet: the reader waits for READABLE.
    host.wait_for("the reader to wait", |calls| {
        calls[&1].reader_waiting.then_some(())
    });
    let sent: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    // The first piece comes back before the body is over.
    host.feed(1, &sent[..1000], false);
    host.wait_for("the first piece echoed", |calls| {
        (calls[&1].data.len() == 1000).then_some(())
    });
    // Two more pieces, not taken: the second finds the window full.
    host.feed(1, &sent[1000..8000], false);
    host.wait_for("the second piece echoed", |calls| {
        (calls[&1].data.len() == 8000).then_some(())
    });
    host.feed(1, &sent[8000..15000], false);
    host.wait_for("the window to fill", |calls| {
        calls[&1].writer_waiting.then_some(())
    });
    let client = std::thread::spawn({
        let host = host.clone();
        move || loop {
            host.drain(1);
            if host.wait_for("more echo", |calls| {
                (calls[&1].queued > 0 || calls[&1].done).then_some(calls[&1].done)
            }) {
                return;
            }
        }
    });
    for piece in sent[15000..].chunks(7_000) {
        host.feed(1, piece, false);
    }
    host.feed(1, &[], true);
    client.join().unwrap();
    let calls = host.calls();
    let call = &calls[&1];
    assert_eq!(call.sent_len, Some(BODY_LEN_UNKNOWN));
    assert!(
        call.data == sent,
        "the echo differs: {} bytes of {}",
        call.data.len(),
        sent.len()
    );
    assert!(call.pendings > 0, "the window never filled");
    assert_eq!(call.ended.as_deref(), Some(&[][..]));
    assert_eq!(call.aborted, None);
}

#[test]
fn response_trailers_end_the_call() {
    let running = start();
    running.host.submit(1, "GET", "/trailers", &[], 0);
    running.host.wait_done(1);
    let calls = running.host.calls();
    assert_eq!(calls[&1].data, b"sum");
    assert_eq!(
        headers_of(calls[&1].ended.as_ref().unwrap()),
        [("x-checksum".to_owned(), "42".to_owned())]
    );
}

#[test]
fn a_panic_or_a_failing_body_aborts_the_call() {
    let running = start();
    running.host.submit(1, "GET", "/panic", &[], 0);
    running.host.submit(2, "GET", "/fails", &[], 0);
    running.host.wait_done(1);
    running.host.wait_done(2);
    let calls = running.host.calls();
    let reason = calls[&1].aborted.clone().unwrap();
    assert!(
        reason.starts_with("panicked at ")
            && reason.contains("tests.rs")
            && reason.ends_with(": boom in the handler"),
        "{reason}"
    );
    assert_eq!(calls[&1].status, None);
    assert_eq!(calls[&2].status, Some(200));
    assert_eq!(
        calls[&2].aborted.as_deref(),
        Some("the response body failed: the client's request body broke off")
    );
    assert_eq!(calls[&2].ended, None);
}

#[test]
fn a_cancelled_call_drops_its_handler_then_is_done() {
    let running = start();
    running.host.submit(1, "GET", "/forever?0", &[], 0);
    let deadline = Instant::now() + PATIENCE;
    while FOREVER_STARTED[0].load(Ordering::SeqCst) == 0 {
        assert!(Instant::now() < deadline, "the handler never started");
        std::thread::yield_now();
    }
    assert_eq!(FOREVER_DROPPED[0].load(Ordering::SeqCst), 0);
    running.host.cancel(1);
    running.host.wait_done(1);
    assert_eq!(
        FOREVER_DROPPED[0].load(Ordering::SeqCst),
        1,
        "the handler was not dropped first"
    );
    assert_eq!(
        running.host.calls()[&1].aborted,
        None,
        "a cancelled call needs no abort"
    );
}

#[test]
fn events_for_unknown_calls_are_ignored() {
    let running = start();
    running
        .host
        .raise(99, EVENT_READABLE | EVENT_WRITABLE | EVENT_CANCELLED);
    running.host.submit(1, "GET", "/hello", &[], 0);
    running.host.wait_done(1);
    assert_eq!(running.host.calls()[&1].data, b"hello");

    let registry = Registry::default();
    assert!(!registry.deliver(7, EVENT_CANCELLED));
    registry.insert(Arc::new(CallCell::new(7)));
    assert!(registry.deliver(7, EVENT_READABLE));
    assert_eq!(registry.all().len(), 1);
}

#[test]
fn stop_aborts_the_calls_left_and_ends_every_thread() {
    let threads = || {
        std::fs::read_dir("/proc/self/task")
            .unwrap()
            .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
            .filter(|name| name.starts_with("svcstop"))
            .count()
    };
    let mut running = start_with(&STOP_API, 1 << 20);
    running.host.submit(1, "GET", "/forever?1", &[], 0);
    running.host.submit(2, "POST", "/echo", &[], 10);
    running.host.submit(3, "GET", "/blocking", &[], 0);
    running.host.wait_done(3);
    running
        .host
        .wait_for("the echo to wait for its body", |calls| {
            calls[&2].reader_waiting.then_some(())
        });
    // Two workers and the dispatcher, at least.
    assert!(threads() >= 3, "{} threads", threads());
    assert_eq!(running.stop(), (STATUS_OK, String::new()));
    assert!(
        BLOCKING_DONE.load(Ordering::SeqCst),
        "stop returned before a blocking task ended"
    );
    // A thread joined may linger in /proc for a moment as it exits.
    let deadline = Instant::now() + PATIENCE;
    while threads() > 0 {
        assert!(
            Instant::now() < deadline,
            "{} threads of the release outlived stop",
            threads()
        );
        std::thread::yield_now();
    }
    assert_eq!(FOREVER_DROPPED[1].load(Ordering::SeqCst), 1);
    let calls = running.host.calls();
    for id in [1, 2] {
        assert!(calls[&id].done, "call {id} not done");
        assert_eq!(
            calls[&id].aborted.as_deref(),
            Some("the release stopped before it answered")
        );
    }
}

#[test]
fn a_request_head_becomes_an_http_request() {
    let header_bytes = [
        (&b"Content-Type"[..], &b"text/plain"[..]),
        (b"x-bin", b"\xff ok"),
    ];
    let headers: Vec<Header> = header_bytes
        .iter()
        .map(|(n, v)| Header {
            name: Slice::new(n),
            value: Slice::new(v),
        })
        .collect();
    let head = |method: &'static str, query: &'static str, version: u32, remote: &'static str| {
        RawRequestHead {
            method: Slice::from_static(method),
            path: Slice::from_static("/a%20b/c"),
            query: Slice::from_static(query),
            headers: headers.as_ptr(),
            header_count: headers.len(),
            version,
            remote: Slice::from_static(remote),
            body_len: 0,
        }
    };
    // SAFETY: every slice above outlives these calls.
    unsafe {
        let request = build_request(&head("PATCH", "q=1", 20, "[::1]:80"), ()).unwrap();
        assert_eq!(request.method(), "PATCH");
        assert_eq!(request.uri(), "/a%20b/c?q=1");
        assert_eq!(request.version(), http::Version::HTTP_2);
        assert_eq!(request.headers()["content-type"], "text/plain");
        assert_eq!(request.headers()["x-bin"].as_bytes(), b"\xff ok");
        assert_eq!(
            request.extensions().get::<Peer>(),
            Some(&Peer("[::1]:80".parse().unwrap()))
        );

        let request = build_request(&head("GET", "", 10, "not an address"), ()).unwrap();
        assert_eq!(request.uri(), "/a%20b/c");
        assert_eq!(request.version(), http::Version::HTTP_10);
        assert_eq!(request.extensions().get::<Peer>(), None);

        assert_eq!(
            build_request(&head("G T", "", 11, ""), ()).unwrap_err(),
            r#"bad method "G T""#
        );
        assert_eq!(
            build_request(&head("GET", "", 30, ""), ()).unwrap_err(),
            "unknown HTTP version 30"
        );
    }
}

#[test]
fn response_headers_become_a_block_in_order() {
    let mut headers = HeaderMap::new();
    headers.append("set-cookie", "a=1".parse().unwrap());
    headers.append("content-type", "text/plain".parse().unwrap());
    headers.append("set-cookie", "b=2".parse().unwrap());
    let pairs = headers_of(&header_block(&headers));
    let pairs: Vec<_> = pairs
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .collect();
    assert_eq!(pairs.len(), 3);
    assert!(pairs.contains(&("content-type", "text/plain")));
    let cookies: Vec<_> = pairs
        .iter()
        .filter(|(n, _)| *n == "set-cookie")
        .map(|(_, v)| *v)
        .collect();
    assert_eq!(cookies, ["a=1", "b=2"], "repeated names keep their order");
    assert!(header_block(&HeaderMap::new()).is_empty());
}
