//! Crash points for testing crash safety: with `NINE9S_CRASH_AT=<name>` in
//! its environment, the agent aborts on the spot when it reaches the point
//! of that name — no destructor runs and nothing more is flushed, as with
//! `kill -9`, but at a moment a test can choose. Without the variable a
//! point costs one load of a cached value.

use std::sync::OnceLock;

/// Aborts the process if `NINE9S_CRASH_AT` names this point.
pub fn crash_point(name: &str) {
    static ARMED: OnceLock<Option<String>> = OnceLock::new();
    let armed = ARMED.get_or_init(|| std::env::var("NINE9S_CRASH_AT").ok());
    if armed.as_deref() == Some(name) {
        eprintln!("nine9s agent: crashing at {name} (NINE9S_CRASH_AT)");
        std::process::abort();
    }
}
