//! The generic `extern "C"` functions behind [`crate::export_plugin!`].
//! Each one runs plugin code inside `catch_unwind`, so no panic unwinds
//! into the host. The service exports (`service/instance.rs`) share its
//! panic catching, `free` and migrations.

use std::any::Any;
use std::borrow::Cow;
use std::cell::Cell;
use std::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};

use crate::abi::{
    encode_header, Buffer, Header, HostApi, PluginApi, RawRequest, RawResponse, Slice, ABI_VERSION,
    FEATURE_STOP, STATUS_ERROR, STATUS_OK, STATUS_PANIC, TEXT_PLAIN_BLOCK,
};
use crate::{find_path, Headers, Migration, Plugin, Request};

/// Exports a [`Plugin`] implementation as a nine9s release library.
///
/// ```ignore
/// nine9s_sdk::export_plugin!(App, name = "nine9s");
/// ```
/// The release's version is the crate's `CARGO_PKG_VERSION`. A plugin
/// built with `panic = "abort"` does not compile: its first panic would
/// take the whole agent down instead of one request.
#[macro_export]
macro_rules! export_plugin {
    ($plugin:ty, name = $name:expr) => {
        #[cfg(panic = "abort")]
        compile_error!(
            "nine9s plugins must unwind on panic: remove `panic = \"abort\"` from this \
             crate's profile (a panic would abort the agent and every release in it)"
        );

        #[no_mangle]
        pub static NINE9S_ABI_VERSION: u32 = $crate::abi::ABI_VERSION;

        #[no_mangle]
        pub extern "C" fn nine9s_plugin_api() -> *const $crate::abi::PluginApi {
            static API: $crate::abi::PluginApi =
                $crate::__private::api::<$plugin>($name, env!("CARGO_PKG_VERSION"));
            &API
        }
    };
}

/// Builds the table for `P`. Used by the macro only.
pub const fn api<P: Plugin>(name: &'static str, version: &'static str) -> PluginApi {
    PluginApi {
        abi_version: ABI_VERSION,
        size: std::mem::size_of::<PluginApi>() as u32,
        features: FEATURE_STOP,
        name: Slice::from_static(name),
        version: Slice::from_static(version),
        state_version: P::STATE_VERSION,
        create: create::<P>,
        destroy: destroy::<P>,
        handle: handle::<P>,
        snapshot: snapshot::<P>,
        can_migrate: can_migrate::<P>,
        migrate: migrate::<P>,
        health: health::<P>,
        hook: hook::<P>,
        free,
        stop: stop::<P>,
    }
}

thread_local! {
    // Where the last panic on this thread happened. `Cell` of plain bytes:
    // no destructor, so this thread-local never pins the library in memory.
    static PANIC_AT: Cell<([u8; 96], usize)> = const { Cell::new(([0; 96], 0)) };
}

static HOOK_INSTALLED: AtomicBool = AtomicBool::new(false);

/// Replaces this library's panic hook (each cdylib has its own copy of std)
/// with one that only remembers where the panic happened; the host logs it.
/// A load, not a swap, on the way: it runs before every call, and a swap
/// would take the cache line from every other thread each time.
fn install_panic_hook() {
    if HOOK_INSTALLED.load(Ordering::Acquire) || HOOK_INSTALLED.swap(true, Ordering::AcqRel) {
        return;
    }
    // The SDK's own tests still print their failures.
    #[cfg(test)]
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        #[cfg(test)]
        previous(info);
        let mut at = [0u8; 96];
        let mut len = 0;
        if let Some(location) = info.location() {
            let text = format!("{}:{}", location.file(), location.line());
            len = text.len().min(at.len());
            at[..len].copy_from_slice(&text.as_bytes()[..len]);
        }
        PANIC_AT.with(|cell| cell.set((at, len)));
    }));
}

/// `panicked at FILE:LINE: MESSAGE` for a panic caught on this thread
/// (where comes from this library's panic hook).
pub(crate) fn panic_message(payload: &(dyn Any + Send)) -> String {
    let what = payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a non-string payload".to_owned());
    let (at, len) = PANIC_AT.with(Cell::get);
    let at = String::from_utf8_lossy(&at[..len]).into_owned();
    format!("panicked at {at}: {what}")
}

/// Runs `f`; a panic or an error is written to `err` and turned into a status.
pub(crate) fn guarded(err: *mut Buffer, f: impl FnOnce() -> Result<(), String>) -> i32 {
    install_panic_hook();
    let (status, message) = match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => return STATUS_OK,
        Ok(Err(message)) => (STATUS_ERROR, message),
        Err(payload) => (STATUS_PANIC, panic_message(&*payload)),
    };
    if !err.is_null() {
        // SAFETY: the host passes a valid, writable `Buffer` for the error.
        unsafe { err.write(Buffer::from_vec(message.into_bytes())) };
    }
    status
}

/// # Safety
/// `host` is null or the agent's table, alive while the library is
/// loaded; `state` is null or a valid `Slice`; `out` and `err` are writable.
unsafe extern "C" fn create<P: Plugin>(
    host: *const HostApi,
    state: *const Slice,
    out: *mut *mut c_void,
    err: *mut Buffer,
) -> i32 {
    crate::host::install(host);
    guarded(err, || {
        // SAFETY: the host passes null or a valid `Slice` borrowed for this call.
        let state = unsafe { state.as_ref().map(|s| s.as_bytes()) };
        let instance = P::init(state)?;
        // SAFETY: `out` is a valid place for the instance pointer (host contract).
        unsafe { out.write(Box::into_raw(Box::new(instance)).cast()) };
        Ok(())
    })
}

/// # Safety
/// `instance` comes from `create` of this library and is destroyed once.
unsafe extern "C" fn destroy<P: Plugin>(instance: *mut c_void) {
    // A panicking Drop must not unwind into the host; the instance is gone either way.
    let _ = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: `instance` is the Box<P> made by `create`, freed exactly once.
        drop(unsafe { Box::from_raw(instance.cast::<P>()) });
    }));
}

/// # Safety
/// `instance` is live; `request` points to slices valid for this call;
/// `response` and `err` are writable.
unsafe extern "C" fn handle<P: Plugin>(
    instance: *const c_void,
    request: *const RawRequest,
    response: *mut RawResponse,
    err: *mut Buffer,
) -> i32 {
    guarded(err, || {
        // SAFETY: host contract: a live instance of P and a request valid for this call.
        let (plugin, raw) = unsafe { (&*instance.cast::<P>(), &*request) };
        // SAFETY: the host borrows these slices, and the header array, to
        // us for the duration of the call.
        let (method, path, query, headers, body) = unsafe {
            let headers: &[Header] = if raw.header_count == 0 {
                &[]
            } else {
                std::slice::from_raw_parts(raw.headers, raw.header_count)
            };
            (
                raw.method.as_bytes(),
                raw.path.as_bytes(),
                raw.query.as_bytes(),
                Headers::new(headers),
                raw.body.as_bytes(),
            )
        };
        let text =
            |bytes| std::str::from_utf8(bytes).map_err(|e| format!("request is not UTF-8: {e}"));
        let request = Request {
            method: text(method)?,
            path: text(path)?,
            query: text(query)?,
            headers,
            body,
        };
        let reply = plugin.handle(&request);
        let headers = if reply.headers.is_empty() && reply.content_type == "text/plain" {
            Buffer::from_static(TEXT_PLAIN_BLOCK)
        } else {
            let size = reply
                .headers
                .iter()
                .map(|(n, v)| n.len() + v.len() + 8)
                .sum::<usize>()
                + reply.content_type.len()
                + 20;
            let mut block = Vec::with_capacity(size);
            encode_header(&mut block, b"content-type", reply.content_type.as_bytes());
            for (name, value) in &reply.headers {
                encode_header(&mut block, name.as_bytes(), value.as_bytes());
            }
            Buffer::from_vec(block)
        };
        let raw = RawResponse {
            status: reply.status,
            headers,
            body: match reply.body {
                Cow::Borrowed(bytes) => Buffer::from_static(bytes),
                Cow::Owned(bytes) => Buffer::from_vec(bytes),
            },
        };
        // SAFETY: `response` is writable (host contract).
        unsafe { response.write(raw) };
        Ok(())
    })
}

/// # Safety
/// `instance` is live; `out` and `err` are writable.
unsafe extern "C" fn snapshot<P: Plugin>(
    instance: *const c_void,
    out: *mut Buffer,
    err: *mut Buffer,
) -> i32 {
    guarded(err, || {
        // SAFETY: host contract: a live instance of P.
        let plugin = unsafe { &*instance.cast::<P>() };
        let state = plugin.snapshot();
        // SAFETY: `out` is writable (host contract).
        unsafe { out.write(Buffer::from_vec(state)) };
        Ok(())
    })
}

unsafe extern "C" fn can_migrate<P: Plugin>(from: u32, to: u32) -> bool {
    can_migrate_with(P::migrations, from, to)
}

/// `can_migrate` for a release whose migrations `migrations` gives (a
/// [`Plugin`] or a service).
pub(crate) fn can_migrate_with(
    migrations: fn() -> &'static [Migration],
    from: u32,
    to: u32,
) -> bool {
    catch_unwind(|| find_path(migrations(), from, to).is_some()).unwrap_or(false)
}

/// # Safety
/// `state` is valid for this call; `out` and `err` are writable.
unsafe extern "C" fn migrate<P: Plugin>(
    from: u32,
    to: u32,
    state: Slice,
    out: *mut Buffer,
    err: *mut Buffer,
) -> i32 {
    // SAFETY: the caller's contract, passed on.
    unsafe { migrate_with(P::migrations, from, to, state, out, err) }
}

/// `migrate` for a release whose migrations `migrations` gives.
///
/// # Safety
/// `state` is valid for this call; `out` and `err` are writable.
pub(crate) unsafe fn migrate_with(
    migrations: fn() -> &'static [Migration],
    from: u32,
    to: u32,
    state: Slice,
    out: *mut Buffer,
    err: *mut Buffer,
) -> i32 {
    guarded(err, || {
        let path = find_path(migrations(), from, to)
            .ok_or_else(|| format!("no migration from state version {from} to {to}"))?;
        // SAFETY: the host borrows the state bytes to us for this call.
        let mut current = unsafe { state.as_bytes() }.to_vec();
        for step in path {
            current = (step.run)(&current)
                .map_err(|e| format!("migration {} -> {} failed: {e}", step.from, step.to))?;
        }
        // SAFETY: `out` is writable (host contract).
        unsafe { out.write(Buffer::from_vec(current)) };
        Ok(())
    })
}

/// # Safety
/// `instance` is live; `err` is writable.
unsafe extern "C" fn health<P: Plugin>(instance: *const c_void, err: *mut Buffer) -> i32 {
    // SAFETY: host contract: a live instance of P.
    guarded(err, || unsafe { &*instance.cast::<P>() }.health())
}

/// # Safety
/// `instance` is live; `name` is valid for this call; `err` is writable.
unsafe extern "C" fn hook<P: Plugin>(
    instance: *const c_void,
    name: Slice,
    err: *mut Buffer,
) -> i32 {
    guarded(err, || {
        // SAFETY: host contract: a live instance and a name borrowed for this call.
        let (plugin, name) = unsafe { (&*instance.cast::<P>(), name.as_bytes()) };
        plugin.hook(&String::from_utf8_lossy(name))
    })
}

/// # Safety
/// `instance` is live, with no call in flight; `err` is writable.
unsafe extern "C" fn stop<P: Plugin>(instance: *const c_void, err: *mut Buffer) -> i32 {
    // SAFETY: host contract: a live instance of P.
    guarded(err, || unsafe { &*instance.cast::<P>() }.stop())
}

/// # Safety
/// `buffer` was made by this library and is freed once.
pub(crate) unsafe extern "C" fn free(buffer: Buffer) {
    // SAFETY: the host returns each buffer we allocated exactly once.
    drop(unsafe { buffer.into_vec() });
}
