//! The agent's settings, with the defaults that let `agent` run with no
//! flags at all.

use std::path::PathBuf;
use std::time::Duration;

pub use crate::tls::TlsFiles;

/// The defaults of the settings `agent` has flags for: `Config::new` and
/// `Limits::default` take them, and the flags show and take them when not
/// given — one place for each.
pub mod defaults {
    use std::time::Duration;

    pub const SOAK: Duration = Duration::from_secs(5);
    pub const CHECKPOINT_EVERY: Duration = Duration::from_secs(10);
    pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
    pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
    pub const QUIESCE_TIMEOUT: Duration = Duration::from_secs(5);
    pub const GATE_TIMEOUT: Duration = Duration::from_secs(1);
    pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(2);
    pub const KEEP_OLD: u32 = 5;
    pub const KEEP_HISTORY: u32 = 10_000;
    pub const MAX_ERROR_RATE: f64 = 0.05;
    pub const MAX_UPLOADS: u32 = 4;
    pub const UPLOAD_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
    pub const HTTP_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
    pub const HTTP_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
    pub const HTTP_BODY_TIMEOUT: Duration = Duration::from_secs(30);
    pub const MAX_CONTROL_CONNECTIONS: u32 = 128;
    pub const MAX_CONNECTIONS: u32 = 4096;
    pub const MAX_CONNECTIONS_PER_CLIENT: u32 = 256;
    pub const MAX_BODY: u64 = 16 * 1024 * 1024;
    pub const MAX_BUFFERED_BODIES: u64 = 256 * 1024 * 1024;
    pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
    pub const HTTP2_MAX_STREAMS: u32 = 100;
}

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
    /// How long plugin code may run behind the closed gate — a switch's
    /// snapshot, migration and `init`, a checkpoint's snapshot — before the
    /// switch or checkpoint is abandoned and the gate reopens.
    pub gate_timeout: Duration,
    /// How long a switch's `drain` step waits for others to let go of the
    /// old instance (a `status` call reading its counters, a health check
    /// still running on it, a request whose call on it has not returned —
    /// after a switch that carries no state, old calls finish on the old
    /// code) before it drops its own reference; the library is then
    /// unloaded by whoever lets go last. Calls stuck past the request
    /// timeout are not waited for: they hold it until they return.
    pub drain_grace: Duration,
    /// How long a switch's `drain` step lets the old release of a service
    /// finish the requests it has under way (long responses, streams);
    /// those left then are cancelled.
    pub drain_timeout: Duration,
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
    /// `NAME ROLE TOKEN` lines; `None`: one admin token in `DATA/admin.token`.
    pub tokens: Option<PathBuf>,
    /// TLS (and mTLS) for the control plane.
    pub tls: Option<TlsFiles>,
    /// TLS for the data plane (`--http-tls-cert`, `--http-tls-key`).
    pub http_tls: Option<HttpTlsFiles>,
    /// Directory of `*.pub` ed25519 keys whose release signatures are trusted.
    pub trusted_keys: Option<PathBuf>,
    /// Refuse releases without a trusted signature.
    pub require_signed: bool,
    /// Workers run as this user (`--worker-user`), the supervisor as root.
    pub worker_user: Option<crate::worker_user::WorkerUser>,
    /// In such a worker: the tokens' digests and the TLS files, handed by
    /// the supervisor (the files themselves are not the worker's to read).
    pub handed: Option<crate::worker_user::Handed>,
    /// Limits on the control and data planes.
    pub limits: Limits,
    /// How the worker before this one ended, when it died ("was killed by
    /// SIGSEGV"): the release current then is failed with this cause.
    pub previous_exit: Option<String>,
    /// The supervisor's pid, when a supervisor runs this agent.
    pub supervisor_pid: Option<u32>,
    /// Workers the supervisor started after one died unexpectedly, before
    /// this one (`nine9s_worker_restarts_total`).
    pub worker_restarts: u64,
    /// A self-upgrade that failed after the worker before this one handed
    /// over (the supervisor says so): recorded as an event at boot.
    pub failed_restart: Option<crate::process::FailedRestart>,
    /// How long to wait for the store's lock: another worker handing over,
    /// or the worker of an agent just killed (it dies with its supervisor,
    /// but a moment later, and its lock with it).
    pub store_wait: Duration,
}

/// The data plane's certificate chain and key (PEM), read again when
/// they change (`http_tls.rs`).
#[derive(Debug, Clone)]
pub struct HttpTlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// What a stranger (or a broken client) can make the agent hold.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Uploads in progress at once; more are refused.
    pub max_uploads: usize,
    /// An upload that sends nothing for this long is dropped.
    pub upload_idle_timeout: Duration,
    /// How long a client gets to send a request's headers.
    pub http_header_timeout: Duration,
    /// How long an idle keep-alive connection is kept open.
    pub http_idle_timeout: Duration,
    /// Open data-plane connections; at the cap, an idle keep-alive
    /// connection is closed for a newcomer, and with none idle newcomers
    /// wait in the backlog.
    pub max_connections: usize,
    /// Open data-plane connections from one client address; beyond, new
    /// ones from it are answered 503 and closed.
    pub max_connections_per_client: usize,
    /// Open control-plane connections; beyond, new ones wait in the backlog.
    pub max_control_connections: usize,
    /// Requests (streams) under way on one HTTP/2 connection; the client
    /// is told so in its settings and a stream beyond is refused.
    pub http2_max_streams: u32,
    /// How long a request body may take to arrive.
    pub http_body_timeout: Duration,
    /// Largest request body handed to a release.
    pub max_body: usize,
    /// Bytes of request bodies buffered at once, all connections together;
    /// a request whose body would go beyond is answered 503.
    pub max_buffered_bodies: usize,
    /// How long a release may take to answer a request before its client
    /// is answered 504 and the call abandoned; `None`: no limit.
    pub request_timeout: Option<Duration>,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_uploads: defaults::MAX_UPLOADS as usize,
            upload_idle_timeout: defaults::UPLOAD_IDLE_TIMEOUT,
            http_header_timeout: defaults::HTTP_HEADER_TIMEOUT,
            http_idle_timeout: defaults::HTTP_IDLE_TIMEOUT,
            max_connections: defaults::MAX_CONNECTIONS as usize,
            max_connections_per_client: defaults::MAX_CONNECTIONS_PER_CLIENT as usize,
            max_control_connections: defaults::MAX_CONTROL_CONNECTIONS as usize,
            http2_max_streams: defaults::HTTP2_MAX_STREAMS,
            http_body_timeout: defaults::HTTP_BODY_TIMEOUT,
            max_body: defaults::MAX_BODY as usize,
            max_buffered_bodies: defaults::MAX_BUFFERED_BODIES as usize,
            request_timeout: Some(defaults::REQUEST_TIMEOUT),
        }
    }
}

impl Config {
    /// Where the standby hint (`handover.rs`) is kept: in the data dir, or
    /// under `--worker-user` in the artifacts dir, the worker's own (the
    /// data dir is root's).
    pub fn hint_dir(&self) -> PathBuf {
        if self.worker_user.is_some() {
            crate::artifacts::dir(&self.data_dir)
        } else {
            self.data_dir.clone()
        }
    }

    pub fn new(data_dir: PathBuf) -> Config {
        Config {
            data_dir,
            bootstrap: Bootstrap::Embedded,
            soak: defaults::SOAK,
            quiesce_timeout: defaults::QUIESCE_TIMEOUT,
            gate_timeout: defaults::GATE_TIMEOUT,
            drain_grace: Duration::from_secs(2),
            drain_timeout: defaults::DRAIN_TIMEOUT,
            shutdown_grace: defaults::SHUTDOWN_GRACE,
            keep_old: defaults::KEEP_OLD as usize,
            keep_history: defaults::KEEP_HISTORY as usize,
            checkpoint_every: defaults::CHECKPOINT_EVERY,
            max_error_rate: defaults::MAX_ERROR_RATE,
            health_timeout: defaults::HEALTH_TIMEOUT,
            tokens: None,
            tls: None,
            http_tls: None,
            trusted_keys: None,
            require_signed: false,
            worker_user: None,
            handed: None,
            limits: Limits::default(),
            previous_exit: None,
            supervisor_pid: None,
            worker_restarts: 0,
            failed_restart: None,
            store_wait: Duration::from_secs(3),
        }
    }
}
