//! The C ABI between the agent and a plugin library. Version
//! [`ABI_VERSION`]; any change to these types or to the meaning of a field
//! bumps it, and the host refuses a library of another version before it
//! calls anything.
//!
//! Ownership: a [`Slice`] is borrowed for the duration of one call. A
//! [`Buffer`] is allocated by the plugin and must be given back to the
//! plugin's [`PluginApi::free`]; the host copies what it needs first.

use std::ffi::c_void;

/// The version of this ABI.
pub const ABI_VERSION: u32 = 1;
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

    /// Plugin side: takes back a buffer made by [`Buffer::from_vec`].
    ///
    /// # Safety
    /// `self` must come from `Buffer::from_vec` in this same library and not
    /// have been freed, or be [`Buffer::EMPTY`].
    pub unsafe fn into_vec(self) -> Vec<u8> {
        if self.ptr.is_null() {
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

/// One HTTP request, borrowed from the host.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct RawRequest {
    pub method: Slice,
    pub path: Slice,
    pub query: Slice,
    /// `name: value` lines separated by `\n`.
    pub headers: Slice,
    pub body: Slice,
}

/// One HTTP response; its buffers belong to the plugin.
#[repr(C)]
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    pub content_type: Buffer,
    pub body: Buffer,
}

/// The table a plugin exports through [`API_SYMBOL`]. Every function
/// catches panics and reports them as [`STATUS_PANIC`]; every `err`
/// buffer is filled only when the status is not [`STATUS_OK`].
#[repr(C)]
#[derive(Debug)]
pub struct PluginApi {
    pub abi_version: u32,
    pub name: Slice,
    pub version: Slice,
    pub state_version: u32,
    /// Builds an instance from a state snapshot of `state_version`, or fresh
    /// when `state` is null. Writes the instance pointer to `out`.
    pub create:
        unsafe extern "C" fn(state: *const Slice, out: *mut *mut c_void, err: *mut Buffer) -> i32,
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
}

// SAFETY: the table is immutable after construction and its slices point
// to `'static` string literals, so sharing it between threads is sound.
unsafe impl Sync for PluginApi {}
