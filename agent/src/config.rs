//! The agent's settings, with the defaults that let `agent` run with no
//! flags at all.

use std::path::PathBuf;
use std::time::Duration;

/// Which release an empty data directory starts on.
#[derive(Debug, Clone)]
pub enum Bootstrap {
    /// The sample nine9s 0.1.0 compiled into the agent.
    Embedded,
    /// A release directory (`release.toml` + library), as `ctl stage` takes.
    Dir(PathBuf),
}

#[derive(Debug, Clone)]
pub struct Config {
    pub data_dir: PathBuf,
    pub bootstrap: Bootstrap,
    /// How long a new release must stay healthy before it becomes permanent.
    pub soak: Duration,
    /// How long a switch waits for in-flight calls on the old code before
    /// it gives up (and the old release keeps serving).
    pub quiesce_timeout: Duration,
    /// How long a switch's `drain` step waits for others to let go of the
    /// old instance (a `status` call reading its counters, a health check
    /// still running on it) before it drops its own reference; the library
    /// is then unloaded by whoever lets go last. Requests never hold it:
    /// no request runs old code after the swap.
    pub drain_grace: Duration,
    /// On SIGTERM, how long in-flight requests get to finish.
    pub shutdown_grace: Duration,
    /// Old releases kept for downgrades; older ones are removed.
    pub keep_old: usize,
    /// Transitions kept in the history; older ones are dropped.
    pub keep_history: usize,
    /// How often the active state is checkpointed into the store.
    pub checkpoint_every: Duration,
    /// Share of 5xx responses (and panics) during a soak that rolls back.
    pub max_error_rate: f64,
    /// How long a soaking release's health check may take; longer is a
    /// failed check.
    pub health_timeout: Duration,
}

impl Config {
    pub fn new(data_dir: PathBuf) -> Config {
        Config {
            data_dir,
            bootstrap: Bootstrap::Embedded,
            soak: Duration::from_secs(5),
            quiesce_timeout: Duration::from_secs(5),
            drain_grace: Duration::from_secs(2),
            shutdown_grace: Duration::from_secs(10),
            keep_old: 5,
            keep_history: 10_000,
            checkpoint_every: Duration::from_secs(10),
            max_error_rate: 0.05,
            health_timeout: Duration::from_secs(2),
        }
    }
}
