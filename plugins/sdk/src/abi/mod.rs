//! The C ABI between the agent and a plugin library, version
//! [`ABI_VERSION`] (2). Version 1 is frozen in [`v1`]: the agent still
//! loads libraries built against it, so an agent upgrade never strands a
//! stored release.
//!
//! Version 2 can grow without a new version: the plugin's table starts
//! with its own size and feature bits, and entries added later go at its
//! end, where the host reads them only if the table's `size` covers
//! them; the host's table ([`HostApi`]) starts with its
//! size the same way. Changing or removing anything is still a new
//! version.
//!
//! Ownership: a [`Slice`] is borrowed for the duration of one call. A
//! [`Buffer`] is allocated by the plugin and must be given back to the
//! plugin's [`PluginApi::free`]; the host may keep it until then (a
//! response body over 16 KiB goes out without a copy). A buffer of
//! capacity 0 is lent ([`Buffer::from_static`]), never freed.

pub mod v1;

use std::ffi::c_void;

/// The version of this ABI.
pub const ABI_VERSION: u32 = 2;
/// The symbol of a `u32` holding the library's ABI version.
pub const ABI_VERSION_SYMBOL: &str = "NINE9S_ABI_VERSION";
/// The symbol of `extern "C" fn() -> *const PluginApi`.
pub const API_SYMBOL: &str = "nine9s_plugin_api";

/// The call succeeded.
pub const STATUS_OK: i32 = 0;
/// The plugin returned an error; its message is in the error buffer.
pub const STATUS_ERROR: i32 = 1;
/// The plugin panicked; the panic message is in the error buffer.
pub const STATUS_PANIC: i32 = 2;

/// Bytes borrowed from the caller for the duration of one call.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct Slice {
    pub ptr: *const u8,
    pub len: usize,
}

impl Slice {
    pub const EMPTY: Slice = Slice {
        ptr: std::ptr::null(),
        len: 0,
    };

    pub const fn from_static(s: &'static str) -> Slice {
        Slice {
            ptr: s.as_ptr(),
            len: s.len(),
        }
    }

    pub fn new(bytes: &[u8]) -> Slice {
        Slice {
            ptr: bytes.as_ptr(),
            len: bytes.len(),
        }
    }

    /// # Safety
    /// `ptr` must be null with `len == 0`, or point to `len` initialised
    /// bytes that stay valid and unmodified for `'a`.
    pub unsafe fn as_bytes<'a>(self) -> &'a [u8] {
        if self.len == 0 {
            &[]
        } else {
            // SAFETY: the caller guarantees `ptr` points to `len` bytes valid for 'a.
            unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
        }
    }
}

/// Bytes allocated by the plugin (a `Vec<u8>` taken apart), freed only by
/// the plugin's [`PluginApi::free`].
#[repr(C)]
#[derive(Debug)]
pub struct Buffer {
    pub ptr: *mut u8,
    pub len: usize,
    pub cap: usize,
}

impl Buffer {
    pub const EMPTY: Buffer = Buffer {
        ptr: std::ptr::null_mut(),
        len: 0,
        cap: 0,
    };

    /// Plugin side: hands a vector's allocation over to the host.
    pub fn from_vec(bytes: Vec<u8>) -> Buffer {
        let mut bytes = std::mem::ManuallyDrop::new(bytes);
        Buffer {
            ptr: bytes.as_mut_ptr(),
            len: bytes.len(),
            cap: bytes.capacity(),
        }
    }

    /// Plugin side (ABI v2): lends bytes of the library's own that live as
    /// long as it is loaded (a string literal): no allocation, and `free`
    /// leaves them be. A capacity of 0 marks them.
    pub fn from_static(bytes: &'static [u8]) -> Buffer {
        Buffer {
            ptr: bytes.as_ptr().cast_mut(),
            len: bytes.len(),
            cap: 0,
        }
    }

    /// Plugin side: takes back a buffer made by [`Buffer::from_vec`] (a
    /// lent one, from [`Buffer::from_static`], gives an empty vector).
    ///
    /// # Safety
    /// `self` must come from `Buffer::from_vec` or `Buffer::from_static` in
    /// this same library and not have been freed, or be [`Buffer::EMPTY`].
    pub unsafe fn into_vec(self) -> Vec<u8> {
        if self.ptr.is_null() || self.cap == 0 {
            Vec::new()
        } else {
            // SAFETY: ptr/len/cap are the parts of a Vec<u8> allocated by this
            // library's allocator (the caller's contract), rebuilt exactly once.
            unsafe { Vec::from_raw_parts(self.ptr, self.len, self.cap) }
        }
    }

    /// Host side: reads the bytes without taking ownership.
    ///
    /// # Safety
    /// The buffer must be [`Buffer::EMPTY`] or filled by the plugin and not yet freed.
    pub unsafe fn as_bytes(&self) -> &[u8] {
        if self.ptr.is_null() {
            &[]
        } else {
            // SAFETY: the plugin filled ptr/len from a live Vec (caller's contract).
            unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
        }
    }
}

/// One request header, borrowed from the host: its bytes as they came.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct Header {
    pub name: Slice,
    pub value: Slice,
}

impl Header {
    pub const EMPTY: Header = Header {
        name: Slice::EMPTY,
        value: Slice::EMPTY,
    };
}

/// One HTTP request, borrowed from the host for the duration of the call.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct RawRequest {
    pub method: Slice,
    pub path: Slice,
    pub query: Slice,
    /// `header_count` headers, in the order they came (a name may repeat).
    pub headers: *const Header,
    pub header_count: usize,
    pub body: Slice,
}

/// One HTTP response; its buffers belong to the plugin.
#[repr(C)]
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    /// The headers, each as a little-endian `u32` length and the name's
    /// bytes, then the same for its value ([`encode_headers`]).
    pub headers: Buffer,
    pub body: Buffer,
}

/// The header block of a response whose only header is `content-type:
/// text/plain` (most of them): a constant, so that neither side allocates
/// or parses it.
pub const TEXT_PLAIN_BLOCK: &[u8] = b"\x0c\x00\x00\x00content-type\x0a\x00\x00\x00text/plain";

/// Appends one header to a [`RawResponse::headers`] block.
pub fn encode_header(block: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    for part in [name, value] {
        let len = u32::try_from(part.len()).unwrap_or(u32::MAX);
        block.extend_from_slice(&len.to_le_bytes());
        block.extend_from_slice(&part[..len as usize]);
    }
}

/// Calls `each` with every `(name, value)` of a [`RawResponse::headers`]
/// block, in order; false if the block is malformed (then `each` may have
/// seen the headers before the fault).
pub fn decode_headers(mut block: &[u8], mut each: impl FnMut(&[u8], &[u8])) -> bool {
    fn take<'a>(block: &mut &'a [u8]) -> Option<&'a [u8]> {
        let (len, rest) = block.split_first_chunk::<4>()?;
        let len = u32::from_le_bytes(*len) as usize;
        let part = rest.get(..len)?;
        *block = &rest[len..];
        Some(part)
    }
    while !block.is_empty() {
        let (Some(name), Some(value)) = (take(&mut block), take(&mut block)) else {
            return false;
        };
        each(name, value);
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_plain_block_is_what_encoding_makes() {
        let mut block = Vec::new();
        encode_header(&mut block, b"content-type", b"text/plain");
        assert_eq!(block, TEXT_PLAIN_BLOCK);
    }

    #[test]
    fn header_blocks_round_trip_and_faults_are_caught() {
        let mut block = Vec::new();
        encode_header(&mut block, b"set-cookie", b"a=1");
        encode_header(&mut block, b"set-cookie", b"b=\xff");
        encode_header(&mut block, b"x-empty", b"");
        let mut seen = Vec::new();
        assert!(decode_headers(&block, |n, v| seen.push((n.to_vec(), v.to_vec()))));
        assert_eq!(
            seen,
            [
                (b"set-cookie".to_vec(), b"a=1".to_vec()),
                (b"set-cookie".to_vec(), b"b=\xff".to_vec()),
                (b"x-empty".to_vec(), Vec::new()),
            ]
        );
        for cut in 1..block.len() {
            let whole = decode_headers(&block[..cut], |_, _| {});
            let at_boundary = [21, 42].contains(&cut);
            assert_eq!(whole, at_boundary, "cut at {cut}");
        }
    }
}

/// Log levels of [`HostApi::log`].
pub const LOG_ERROR: u32 = 1;
pub const LOG_WARN: u32 = 2;
pub const LOG_INFO: u32 = 3;
pub const LOG_DEBUG: u32 = 4;

/// What the host offers a plugin, given to [`PluginApi::create`]. It lives
/// as long as the library stays loaded. Entries added later go at the end;
/// a plugin reads them only if `size` covers them.
#[repr(C)]
#[derive(Debug)]
pub struct HostApi {
    /// `size_of::<HostApi>()` of the host that made it.
    pub size: u32,
    /// Passed back to `log`: the host's note of which release logs.
    pub context: *const c_void,
    /// Logs `message` at `level` (`LOG_*`) through the agent's logging,
    /// with the release's version.
    pub log: unsafe extern "C" fn(context: *const c_void, level: u32, message: Slice),
    /// Nanoseconds on a monotonic clock (not wall time).
    pub monotonic_ns: unsafe extern "C" fn() -> u64,
}

// SAFETY: the host builds the table once per release and never changes it;
// its functions may be called from any thread.
unsafe impl Sync for HostApi {}
// SAFETY: as above.
unsafe impl Send for HostApi {}

/// Feature bit: the plugin has a [`PluginApi::stop`] entry that joins the
/// threads an instance started.
pub const FEATURE_STOP: u64 = 1;

/// Feature bit of an [`ABI_VERSION_SERVICE`] release: it serves the
/// HTTP/1.1 connections the host hands it ([`EVENT_CONNECTION`]) itself,
/// on its own runtime, instead of taking their requests one by one
/// through the port. Only with a host whose [`PortApi`] has
/// `take_connection`.
pub const FEATURE_CONNECTIONS: u64 = 2;

/// The table a plugin exports through [`API_SYMBOL`]. Every function
/// catches panics and reports them as [`STATUS_PANIC`]; every `err`
/// buffer is filled only when the status is not [`STATUS_OK`].
#[repr(C)]
#[derive(Debug)]
pub struct PluginApi {
    pub abi_version: u32,
    /// `size_of::<PluginApi>()` of the SDK that built the plugin: entries
    /// past it are absent.
    pub size: u32,
    /// `FEATURE_*` bits.
    pub features: u64,
    pub name: Slice,
    pub version: Slice,
    pub state_version: u32,
    /// Builds an instance from a state snapshot of `state_version`, or fresh
    /// when `state` is null. Writes the instance pointer to `out`.
    pub create: unsafe extern "C" fn(
        host: *const HostApi,
        state: *const Slice,
        out: *mut *mut c_void,
        err: *mut Buffer,
    ) -> i32,
    /// Drops an instance made by `create`.
    pub destroy: unsafe extern "C" fn(instance: *mut c_void),
    pub handle: unsafe extern "C" fn(
        instance: *const c_void,
        request: *const RawRequest,
        response: *mut RawResponse,
        err: *mut Buffer,
    ) -> i32,
    pub snapshot:
        unsafe extern "C" fn(instance: *const c_void, out: *mut Buffer, err: *mut Buffer) -> i32,
    /// Whether this library can migrate state from one version to another.
    pub can_migrate: unsafe extern "C" fn(from: u32, to: u32) -> bool,
    pub migrate: unsafe extern "C" fn(
        from: u32,
        to: u32,
        state: Slice,
        out: *mut Buffer,
        err: *mut Buffer,
    ) -> i32,
    pub health: unsafe extern "C" fn(instance: *const c_void, err: *mut Buffer) -> i32,
    pub hook: unsafe extern "C" fn(instance: *const c_void, name: Slice, err: *mut Buffer) -> i32,
    /// Frees a buffer this library allocated.
    pub free: unsafe extern "C" fn(buffer: Buffer),
    /// Stops an instance before it is destroyed: it joins the threads the
    /// instance started ([`FEATURE_STOP`]). Called once, with no request
    /// in flight.
    pub stop: unsafe extern "C" fn(instance: *const c_void, err: *mut Buffer) -> i32,
}

// SAFETY: the table is immutable after construction and its slices point
// to `'static` string literals, so sharing it between threads is sound.
unsafe impl Sync for PluginApi {}

/// The version of the ABI of a release that serves requests itself, as a
/// service: `handle` is never called; the host hands each request to the
/// instance's [`Port`] and the release answers it when it likes, from any
/// of its own threads, streaming both bodies. The table is a
/// [`ServiceApi`] (a [`PluginApi`] whose `handle` is never called, then
/// `attach`), and [`FEATURE_STOP`] is required.
///
/// Threads: every call on an instance (`create`, `attach`, `snapshot`,
/// `health`, `hook`, `stop`, `destroy`) comes on the instance's *home
/// thread*, a host thread that lives as long as the instance and never
/// runs anything else: whatever the release's code leaves on the thread it
/// runs on (a runtime entered, thread-local destructors) goes with it. The
/// host's data plane never runs release code. `stop` comes after the host
/// has closed the port ([`PortApi::wait_events`] returns 0 from then on),
/// and returns once every thread the instance started has ended; the host
/// then calls `destroy`, ends the home thread, and only then may unload
/// the library.
///
/// Memory: nothing changes owner through the port. What the host lends
/// (a request head) stays valid until `request_done`; what the release
/// passes (`send_*`) is copied before the call returns.
pub const ABI_VERSION_SERVICE: u32 = 3;

/// [`PortApi`]: not now; the event named comes when it is possible.
pub const STATUS_PENDING: i32 = 3;
/// [`PortApi::read_body`]: the request body is over.
pub const STATUS_END: i32 = 4;
/// [`PortApi`]: the call is over for the host (cancelled: the client went
/// away, its time ran out, the old release's drain ended) or unknown. Stop
/// working on it and call `request_done`.
pub const STATUS_GONE: i32 = 5;

/// A new call: read its head with [`PortApi::request_head`].
pub const EVENT_REQUEST: u32 = 1;
/// More of the request body (or its end) can be read.
pub const EVENT_READABLE: u32 = 2;
/// The response has room for more data.
pub const EVENT_WRITABLE: u32 = 4;
/// The call was cancelled: every later call on it answers [`STATUS_GONE`].
pub const EVENT_CANCELLED: u32 = 8;
/// [`PortEvent::call`] is a connection, the release's to serve
/// ([`FEATURE_CONNECTIONS`]): take it with `take_connection`.
pub const EVENT_CONNECTION: u32 = 16;
/// With [`PortEvent::call`] 0: the release must start no new request on
/// any connection it took (saying so of each with `connection_yielded`),
/// and give each back with `connection_done` once its requests under way
/// are answered. Connections handed over after it are taken as before.
pub const EVENT_YIELD: u32 = 32;

/// [`RawRequestHead::body_len`], [`PortApi::send_head`]: a body whose
/// length is not known ahead.
pub const BODY_LEN_UNKNOWN: u64 = u64::MAX;

/// Events for one call, as [`PortApi::wait_events`] gives them.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct PortEvent {
    pub call: u64,
    /// `EVENT_*` bits.
    pub events: u32,
}

/// A request's head, lent by the host until the call's `request_done`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct RawRequestHead {
    pub method: Slice,
    /// The path, percent-encoded as it came, without the query.
    pub path: Slice,
    pub query: Slice,
    pub headers: *const Header,
    pub header_count: usize,
    /// 10, 11 or 20 for HTTP/1.0, 1.1, 2.
    pub version: u32,
    /// The client's address, `ip:port`.
    pub remote: Slice,
    /// 0 for no body, its length, or [`BODY_LEN_UNKNOWN`].
    pub body_len: u64,
}

/// What an instance of an [`ABI_VERSION_SERVICE`] release is served
/// through. Every function may be called from any thread of the release,
/// never blocks except `wait_events`, and reports a call the host no longer
/// knows as [`STATUS_GONE`]. It lives until `stop` returns.
#[repr(C)]
#[derive(Debug)]
pub struct Port {
    /// `size_of::<Port>()` of the host that made it.
    pub size: u32,
    /// Passed back to every function.
    pub context: *const c_void,
    pub api: *const PortApi,
}

// SAFETY: the host keeps the port alive and unchanged until `stop`
// returns, and its functions may be called from any thread.
unsafe impl Send for Port {}
// SAFETY: as above.
unsafe impl Sync for Port {}

/// The host's functions behind a [`Port`].
#[repr(C)]
#[derive(Debug)]
pub struct PortApi {
    /// `size_of::<PortApi>()` of the host: entries added later go at the
    /// end.
    pub size: u32,
    /// Blocks until events are pending, writes at most `max` of them to
    /// `out` (each call's bits together) and returns how many; 0 once the
    /// port is closed. Meant for one thread of the release that hands the
    /// events on.
    pub wait_events:
        unsafe extern "C" fn(context: *const c_void, out: *mut PortEvent, max: usize) -> usize,
    /// Lends the call's head ([`STATUS_OK`]), valid until `request_done`.
    pub request_head:
        unsafe extern "C" fn(context: *const c_void, call: u64, out: *mut RawRequestHead) -> i32,
    /// Copies up to `cap` bytes of the request body into `dst` and writes
    /// how many to `read`: [`STATUS_OK`] (at least one byte),
    /// [`STATUS_PENDING`] (none yet: [`EVENT_READABLE`] follows),
    /// [`STATUS_END`] (the body is over), [`STATUS_GONE`]; [`STATUS_ERROR`]
    /// if the client's body broke off.
    pub read_body: unsafe extern "C" fn(
        context: *const c_void,
        call: u64,
        dst: *mut u8,
        cap: usize,
        read: *mut usize,
    ) -> i32,
    /// The response's status and headers (a block as [`encode_header`]
    /// makes), and its body's length or [`BODY_LEN_UNKNOWN`]. Once.
    pub send_head: unsafe extern "C" fn(
        context: *const c_void,
        call: u64,
        status: u16,
        headers: Slice,
        body_len: u64,
    ) -> i32,
    /// Queues a chunk of the response body (copied): [`STATUS_OK`], or
    /// [`STATUS_PENDING`] if the response is full (nothing was taken:
    /// [`EVENT_WRITABLE`] follows).
    pub send_data: unsafe extern "C" fn(context: *const c_void, call: u64, data: Slice) -> i32,
    /// Ends the response, with trailers (a header block; empty for none).
    pub send_end: unsafe extern "C" fn(context: *const c_void, call: u64, trailers: Slice) -> i32,
    /// Ends the call in error: before the head, the client is answered 500
    /// with `reason` logged; after it, the response breaks off.
    pub abort: unsafe extern "C" fn(context: *const c_void, call: u64, reason: Slice),
    /// The release is done with the call: its head is no longer used, and
    /// a response not ended counts as aborted. Always the last call on it.
    pub request_done: unsafe extern "C" fn(context: *const c_void, call: u64),
    /// Takes connection `connection` ([`EVENT_CONNECTION`]): its socket is
    /// the release's from [`STATUS_OK`] on. [`STATUS_GONE`] if the host
    /// took it back meanwhile (an [`EVENT_YIELD`] came first).
    pub take_connection: unsafe extern "C" fn(
        context: *const c_void,
        connection: u64,
        out: *mut RawConnection,
    ) -> i32,
    /// After [`EVENT_YIELD`]: no new request will start on `connection`.
    pub connection_yielded: unsafe extern "C" fn(context: *const c_void, connection: u64),
    /// The release is done with `connection`: `fd` is -1 if it closed it
    /// (the client left, a limit, the end of its last response), or the
    /// socket given back at a request boundary, with `unread` the bytes
    /// read from it and not served (copied). Always the last call on it.
    pub connection_done:
        unsafe extern "C" fn(context: *const c_void, connection: u64, fd: i32, unread: Slice),
    /// A request began on a connection the release serves.
    pub request_begun: unsafe extern "C" fn(context: *const c_void),
    /// ... and ended, answered with `status` after `micros` (the client
    /// got the whole response, or went away: 499).
    pub request_ended: unsafe extern "C" fn(context: *const c_void, status: u16, micros: u64),
}

/// A connection the host hands over ([`PortApi::take_connection`]): the
/// socket, what was read of it and not served yet, and the limits its
/// requests are held to, as the host holds its own.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct RawConnection {
    /// A connected TCP socket, the release's from now on: it closes it or
    /// gives it back.
    pub fd: i32,
    /// Bytes already read from it, to be served first; lent until
    /// `connection_done`.
    pub unread: Slice,
    /// The client's address, `ip:port`; lent until `connection_done`.
    pub remote: Slice,
    /// From the first byte of a request to the end of its headers.
    pub header_timeout_ms: u64,
    /// With no request under way and no byte of a new one.
    pub idle_timeout_ms: u64,
    /// Between two pieces of a request body.
    pub body_timeout_ms: u64,
    /// Until a response's head; 0: none.
    pub request_timeout_ms: u64,
    /// The largest request body.
    pub max_body: u64,
}

/// The table an [`ABI_VERSION_SERVICE`] library exports through
/// [`API_SYMBOL`]: `plugin.abi_version` is 3 and `plugin.size` is
/// `size_of::<ServiceApi>()`.
#[repr(C)]
#[derive(Debug)]
pub struct ServiceApi {
    pub plugin: PluginApi,
    /// Hands an instance its [`Port`], once, before any request; the port
    /// stays valid until `stop` returns.
    pub attach:
        unsafe extern "C" fn(instance: *const c_void, port: *const Port, err: *mut Buffer) -> i32,
}

// SAFETY: as for `PluginApi`: immutable, with `'static` slices.
unsafe impl Sync for ServiceApi {}
