//! Crash points for testing crash safety: with `NINE9S_CRASH_AT=<name>` in
//! its environment, the agent kills itself with SIGKILL when it reaches the
//! point of that name — no destructor runs and nothing more is flushed, as
//! with `kill -9`, but at a moment a test can choose. SIGKILL, not an
//! abort: a SIGABRT is a fault signal that boot blames on the release being
//! switched to, and the agent's own crash point is not that release's
//! doing. Without the variable a point costs one load of a cached value.

use std::sync::OnceLock;

/// Kills the process if `NINE9S_CRASH_AT` names this point.
pub fn crash_point(name: &str) {
    static ARMED: OnceLock<Option<String>> = OnceLock::new();
    let armed = ARMED.get_or_init(|| std::env::var("NINE9S_CRASH_AT").ok());
    if armed.as_deref() == Some(name) {
        eprintln!("nine9s agent: crashing at {name} (NINE9S_CRASH_AT)");
        let _ =
            rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::KILL);
        // Not reached: SIGKILL cannot be caught.
        std::process::abort();
    }
}
