//! ABI version 1, frozen: the types of the first plugin ABI, exactly as
//! they were, so the agent can still load every release built against it
//! (the releases stored on a node, its permanent one included). Nothing
//! here may change. A v1 library exports the same two symbols; its table
//! has no size, no features, no host table and no `stop`, and its
//! requests carry their headers as `name: value` lines.

use std::ffi::c_void;

use super::{Buffer, Slice};

/// The version of this ABI.
pub const ABI_VERSION: u32 = 1;

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

/// The table a plugin exports through [`super::API_SYMBOL`]. Every function
/// catches panics and reports them as [`super::STATUS_PANIC`]; every `err`
/// buffer is filled only when the status is not [`super::STATUS_OK`].
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
