//! What the agent offers a plugin: its logs and a monotonic clock. The
//! agent hands its table to every instance it creates; the SDK keeps it for
//! the library (the table lives as long as the library is loaded). Outside
//! the agent (a plugin's own unit tests) logging does nothing and the clock
//! is the process's own.
//!
//! ```ignore
//! nine9s_sdk::info!("cache warmed with {} entries", n);
//! let started = nine9s_sdk::host::monotonic();
//! ```

use std::sync::atomic::{AtomicPtr, Ordering};
use std::time::Duration;

use crate::abi::{self, HostApi, Slice};

/// The agent's table, once an instance was created.
static HOST: AtomicPtr<HostApi> = AtomicPtr::new(std::ptr::null_mut());

/// Keeps the agent's table for later calls.
pub(crate) fn install(host: *const HostApi) {
    if !host.is_null() {
        HOST.store(host.cast_mut(), Ordering::Release);
    }
}

fn table() -> Option<&'static HostApi> {
    let host = HOST.load(Ordering::Acquire);
    // SAFETY: set only from a table the agent passed to `create`, which it
    // keeps alive while the library is loaded; never written through.
    unsafe { host.as_ref() }
}

/// How much a log line matters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Error,
    Warn,
    Info,
    Debug,
}

/// Logs `message` through the agent, with the release's version.
pub fn log(level: Level, message: &str) {
    let Some(host) = table() else { return };
    let level = match level {
        Level::Error => abi::LOG_ERROR,
        Level::Warn => abi::LOG_WARN,
        Level::Info => abi::LOG_INFO,
        Level::Debug => abi::LOG_DEBUG,
    };
    // SAFETY: an entry of the agent's table; the message is borrowed for
    // the call.
    unsafe { (host.log)(host.context, level, Slice::new(message.as_bytes())) }
}

/// Time on a monotonic clock: only differences mean something.
pub fn monotonic() -> Duration {
    match table() {
        // SAFETY: an entry of the agent's table; it takes no arguments.
        Some(host) => Duration::from_nanos(unsafe { (host.monotonic_ns)() }),
        None => {
            static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
            START.get_or_init(std::time::Instant::now).elapsed()
        }
    }
}

/// Logs through the agent at error level: `nine9s_sdk::error!("...", args)`.
#[macro_export]
macro_rules! error {
    ($($arg:tt)*) => { $crate::host::log($crate::host::Level::Error, &format!($($arg)*)) };
}

/// Logs through the agent at warn level.
#[macro_export]
macro_rules! warn {
    ($($arg:tt)*) => { $crate::host::log($crate::host::Level::Warn, &format!($($arg)*)) };
}

/// Logs through the agent at info level.
#[macro_export]
macro_rules! info {
    ($($arg:tt)*) => { $crate::host::log($crate::host::Level::Info, &format!($($arg)*)) };
}

/// Logs through the agent at debug level.
#[macro_export]
macro_rules! debug {
    ($($arg:tt)*) => { $crate::host::log($crate::host::Level::Debug, &format!($($arg)*)) };
}
