//! The table the host hands to every v2 plugin instance it creates
//! (`nine9s_sdk::abi::HostApi`): logging through the agent's `tracing`,
//! with the release's version as a field, and a monotonic clock. One table
//! per version, made once and kept for the life of the process: a plugin
//! keeps the pointer as long as its library is loaded, and the same library
//! may be loaded again later.

use std::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::OnceLock;

use parking_lot::Mutex;
use std::time::Instant;

use nine9s_sdk::abi::{HostApi, Slice, LOG_DEBUG, LOG_ERROR, LOG_INFO, LOG_WARN};

/// The table for releases of `version`.
pub fn host_table(version: &str) -> &'static HostApi {
    static TABLES: Mutex<Vec<&'static HostApi>> = Mutex::new(Vec::new());
    let mut tables = TABLES.lock();
    let known = tables.iter().copied().find(|t| {
        // SAFETY: every context below is a leaked `String`.
        let theirs = unsafe { &*t.context.cast::<String>() };
        theirs == version
    });
    if let Some(table) = known {
        return table;
    }
    let context: &'static String = Box::leak(Box::new(version.to_owned()));
    let table: &'static HostApi = Box::leak(Box::new(HostApi {
        size: std::mem::size_of::<HostApi>() as u32,
        context: (context as *const String).cast(),
        log,
        monotonic_ns,
    }));
    tables.push(table);
    table
}

/// # Safety
/// `context` is the leaked version `String` of a table made above;
/// `message` is borrowed for the call.
unsafe extern "C" fn log(context: *const c_void, level: u32, message: Slice) {
    // Nothing may unwind into the plugin.
    let _ = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: the caller's contract.
        let (version, message) = unsafe { (&*context.cast::<String>(), message.as_bytes()) };
        let message = String::from_utf8_lossy(message);
        match level {
            LOG_ERROR => tracing::error!(target: "release", release = %version, "{message}"),
            LOG_WARN => tracing::warn!(target: "release", release = %version, "{message}"),
            LOG_INFO => tracing::info!(target: "release", release = %version, "{message}"),
            LOG_DEBUG => tracing::debug!(target: "release", release = %version, "{message}"),
            _ => tracing::trace!(target: "release", release = %version, "{message}"),
        }
    }));
}

unsafe extern "C" fn monotonic_ns() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    let elapsed = START.get_or_init(Instant::now).elapsed();
    u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX)
}
