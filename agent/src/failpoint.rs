//! Crash points for testing crash safety: with `NINE9S_CRASH_AT=<name>` in
//! its environment, a debug build of the agent kills itself with SIGKILL
//! when it reaches the point of that name — no destructor runs and nothing
//! more is flushed, as with `kill -9`, but at a moment a test can choose.
//! SIGKILL, not an abort: a SIGABRT is a fault signal that boot blames on
//! the release being switched to, and the agent's own crash point is not
//! that release's doing.
//!
//! A release build has no crash points: a variable any parent can set must
//! not be able to kill a production agent mid-transition. They hang on
//! `debug_assertions` rather than a cargo feature because the tests crate
//! enabling a feature would enable it in `cargo build --release
//! --workspace` too (features unify across the workspace); the tests run
//! the debug build.

/// Kills the process if `NINE9S_CRASH_AT` names this point (debug builds).
#[cfg(debug_assertions)]
pub fn crash_point(name: &str) {
    static ARMED: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    let armed = ARMED.get_or_init(|| std::env::var("NINE9S_CRASH_AT").ok());
    if armed.as_deref() == Some(name) {
        eprintln!("nine9s agent: crashing at {name} (NINE9S_CRASH_AT)");
        let _ =
            rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::KILL);
        // Not reached: SIGKILL cannot be caught.
        std::process::abort();
    }
}

/// A release build has no crash points.
#[cfg(not(debug_assertions))]
#[inline(always)]
pub fn crash_point(_name: &str) {}
