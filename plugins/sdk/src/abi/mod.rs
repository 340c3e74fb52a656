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
