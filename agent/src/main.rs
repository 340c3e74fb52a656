//! `agent`: runs the nine9s agent. With no flags it serves the sample
//! release nine9s 0.1.0 on 127.0.0.1:9090, gRPC on 127.0.0.1:50051 and on
//! the local control socket `./nine9s-data/control.sock`, data in
//! `./nine9s-data`.
//!
//! The process started is the supervisor (`supervisor.rs`): it binds the
//! listeners (or takes them from systemd, `LISTEN_FDS`) and runs the agent
//! proper in a worker, this binary again as `agent FLAGS worker` (hidden).
//! `agent probe LIBRARY` (hidden) is the throwaway process a worker opens
//! an uploaded library in before its own process ever maps it; `agent
//! FLAGS check` (hidden) only checks the flags, which the supervisor has a
//! new binary do before it re-executes itself from it.
//!
//! With `--worker-user USER` the supervisor must run as root, and runs its
//! workers as USER (`worker_user.rs`).
//!
//! Exit codes: 0 after a clean shutdown (SIGTERM or Ctrl-C), 1 when the
//! agent cannot start or fails, 2 for bad flags (`--worker-user` without
//! root among them) and for a data dir, tokens file, TLS key or trusted
//! key another local user could have made or changed (`datadir.rs`).

use std::io::{IsTerminal, Write};
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{CommandFactory, Parser, Subcommand};
use nine9s_agent::birth::WorkerBirth;
use nine9s_agent::channel::Inherited;
use nine9s_agent::worker_user::WorkerUser;
use nine9s_agent::{defaults, Agent, Bootstrap, Config, Http, HttpTlsFiles, Limits, TlsFiles};
use tokio::net::TcpListener;
use tracing_subscriber::EnvFilter;

/// nine9s agent: serves a service and upgrades it in place.
#[derive(Parser)]
#[command(name = "agent", version)]
struct Args {
    #[command(subcommand)]
    mode: Option<Mode>,
    /// Where releases, history and state snapshots are kept.
    #[arg(long, default_value = DEFAULT_DATA_DIR, env = "NINE9S_DATA_DIR")]
    data_dir: PathBuf,
    /// Address the service answers HTTP on.
    #[arg(long, default_value = "127.0.0.1:9090")]
    http: SocketAddr,
    /// Address of the gRPC control plane.
    #[arg(long, default_value = "127.0.0.1:50051")]
    grpc: SocketAddr,
    /// Serve Prometheus metrics on this address (`GET /metrics`), such as
    /// 127.0.0.1:9464. Off by default; unauthenticated, so keep it on
    /// loopback or a network only the scraper reaches.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<SocketAddr>,
    /// Serve only the gRPC health service (`grpc.health.v1.Health`), in
    /// plaintext and without a token, on this address: for probes that
    /// cannot speak TLS, such as Kubernetes' gRPC probes. It says SERVING
    /// or NOT_SERVING and nothing else, so it may listen beyond loopback.
    #[arg(long, value_name = "ADDR")]
    health: Option<SocketAddr>,
    /// Release directory installed on an empty data dir (default: the
    /// embedded sample nine9s 0.1.0).
    #[arg(long)]
    bootstrap: Option<PathBuf>,
    /// Default soak before a new release becomes permanent (up to 7d).
    #[arg(long, default_value = shown(defaults::SOAK), value_parser = soak)]
    soak: Duration,
    /// How often the active state is checkpointed (100ms to 1d).
    #[arg(long, default_value = shown(defaults::CHECKPOINT_EVERY), value_parser = checkpoint_every)]
    checkpoint_every: Duration,
    /// How long in-flight requests get on shutdown (up to 1h).
    #[arg(long, default_value = shown(defaults::SHUTDOWN_GRACE), value_parser = up_to_an_hour)]
    shutdown_grace: Duration,
    /// How long the old release of a service (ABI v3) may finish the
    /// requests it has under way after a switch (streams, long responses);
    /// those left are then cancelled (up to 1h).
    #[arg(long, default_value = shown(defaults::DRAIN_TIMEOUT), value_parser = up_to_an_hour)]
    drain_timeout: Duration,
    /// How long a switch waits for in-flight calls on the old release (up to 1h).
    #[arg(long, default_value = shown(defaults::QUIESCE_TIMEOUT), value_parser = positive_up_to_an_hour)]
    quiesce_timeout: Duration,
    /// How long the release's code may hold requests once the gate is
    /// closed — a switch's snapshot, migration and init, a checkpoint's
    /// snapshot — before it is abandoned and the gate reopens (up to 1h).
    #[arg(long, default_value = shown(defaults::GATE_TIMEOUT), value_parser = positive_up_to_an_hour)]
    gate_timeout: Duration,
    /// How long a soaking release's health check may take (up to 1h).
    #[arg(long, default_value = shown(defaults::HEALTH_TIMEOUT), value_parser = positive_up_to_an_hour)]
    health_timeout: Duration,
    /// Old releases kept for downgrades.
    #[arg(long, default_value_t = defaults::KEEP_OLD, value_parser = clap::value_parser!(u32).range(0..=1000))]
    keep_old: u32,
    /// Transitions (and events) kept in the history.
    #[arg(long, default_value_t = defaults::KEEP_HISTORY, value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    keep_history: u32,
    /// Share of failed requests during a soak that rolls back (0 to 1).
    #[arg(long, default_value_t = defaults::MAX_ERROR_RATE, value_parser = rate)]
    max_error_rate: f64,
    /// Who may use the control plane: one `NAME ROLE TOKEN` per line, ROLE
    /// read, deploy or admin. Default: an admin token kept in DATA/admin.token.
    #[arg(long, env = "NINE9S_TOKENS")]
    tokens: Option<PathBuf>,
    /// The control plane's TLS certificate (PEM); needed to listen beyond loopback.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Require client certificates signed by this CA (PEM); a certificate's
    /// subject common name is looked up as a NAME in --tokens.
    #[arg(long, requires = "tls_cert")]
    client_ca: Option<PathBuf>,
    /// Directory of ed25519 public keys (`*.pub`, from `ctl keygen`) whose
    /// release signatures are trusted.
    #[arg(long)]
    trusted_keys: Option<PathBuf>,
    /// Refuse releases that carry no signature by a --trusted-keys key.
    #[arg(long, requires = "trusted_keys")]
    require_signed: bool,
    /// Uploads (stages) in progress at once; more are refused (1 to 64).
    #[arg(long, default_value_t = defaults::MAX_UPLOADS, value_parser = clap::value_parser!(u32).range(1..=64))]
    max_uploads: u32,
    /// An upload that sends nothing for this long is dropped (100ms to 1h).
    #[arg(long, default_value = shown(defaults::UPLOAD_IDLE_TIMEOUT), value_parser = upload_idle)]
    upload_idle_timeout: Duration,
    /// How long an HTTP client gets to send a request's headers (up to 1h).
    #[arg(long, default_value = shown(defaults::HTTP_HEADER_TIMEOUT), value_parser = positive_up_to_an_hour)]
    http_header_timeout: Duration,
    /// How long an idle HTTP keep-alive connection stays open (up to 1h).
    #[arg(long, default_value = shown(defaults::HTTP_IDLE_TIMEOUT), value_parser = positive_up_to_an_hour)]
    http_idle_timeout: Duration,
    /// How long an HTTP request's body may take to arrive (up to 1h).
    #[arg(long, default_value = shown(defaults::HTTP_BODY_TIMEOUT), value_parser = positive_up_to_an_hour)]
    http_body_timeout: Duration,
    /// Open gRPC connections at most; more wait in the listen backlog.
    #[arg(long, default_value_t = defaults::MAX_CONTROL_CONNECTIONS, value_parser = clap::value_parser!(u32).range(1..=4096))]
    max_control_connections: u32,
    /// Open HTTP connections at most. At the cap, an idle keep-alive
    /// connection is closed (between requests) for each newcomer; with
    /// none idle, newcomers wait in the listen backlog.
    #[arg(long, default_value_t = defaults::MAX_CONNECTIONS, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    max_connections: u32,
    /// Open HTTP connections from one client IP address at most; more from
    /// it are answered 503 and closed. Behind a proxy that connects from
    /// one address, raise it to --max-connections.
    #[arg(long, default_value_t = defaults::MAX_CONNECTIONS_PER_CLIENT, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    max_connections_per_client: u32,
    /// Requests (streams) under way at once on one HTTP/2 connection
    /// (1 to 1000); the client is told in the connection's settings.
    #[arg(long = "http2-max-streams", default_value_t = defaults::HTTP2_MAX_STREAMS, value_parser = clap::value_parser!(u32).range(1..=1000))]
    http2_max_streams: u32,
    /// Serve the data plane over TLS with this certificate chain (PEM),
    /// HTTP/2 and HTTP/1.1 by ALPN. A changed file is taken within a second
    /// for new connections; open ones keep theirs.
    #[arg(long, requires = "http_tls_key")]
    http_tls_cert: Option<PathBuf>,
    /// The private key of --http-tls-cert (PEM).
    #[arg(long, requires = "http_tls_cert")]
    http_tls_key: Option<PathBuf>,
    /// Logs on stderr as `text`, or `json`: one object per line, with the
    /// transition a line belongs to.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Largest HTTP request body handed to a release, in bytes (up to 1 GiB).
    #[arg(long, default_value_t = defaults::MAX_BODY, value_parser = clap::value_parser!(u64).range(0..=1024 * 1024 * 1024))]
    max_body: u64,
    /// Bytes of HTTP request bodies held in memory at once, all requests
    /// together (at least --max-body, up to 64GiB; suffixes KiB, MiB, GiB).
    /// A request whose body would go beyond is answered 503 with
    /// Retry-After; requests already reading theirs are unaffected. A
    /// service (ABI v3) gets its bodies as they arrive: none is buffered.
    #[arg(long, default_value = shown_size(defaults::MAX_BUFFERED_BODIES), value_parser = size)]
    max_buffered_bodies: u64,
    /// How long a release may take to answer an HTTP request (10ms to 1h;
    /// 0: no limit). Past it the client is answered 504, the call counts
    /// as failed and is abandoned: it cannot be stopped, so it keeps its
    /// thread, and a soaking release or a canary with such a call fails.
    #[arg(long, default_value = shown(defaults::REQUEST_TIMEOUT), value_parser = request_timeout)]
    request_timeout: Duration,
    /// Run the workers — the processes that load releases, and so run
    /// their code — as USER (a name or uid in /etc/passwd), with no
    /// capabilities; the agent itself must run as root. A release then
    /// cannot read DATA/admin.token or the --tokens file: workers get only
    /// the tokens' sha256 digests from the supervisor.
    #[arg(long, value_name = "USER")]
    worker_user: Option<String>,
}

#[derive(Subcommand)]
enum Mode {
    /// Opens LIBRARY in this throwaway process and reports what it is, as
    /// one JSON line (used by the agent itself).
    #[command(hide = true)]
    Probe {
        library: PathBuf,
        /// A directory the probe must not see (the data dir).
        #[arg(long)]
        hide: Option<PathBuf>,
    },
    /// Rehearses a switch to TARGET in a disposable process (the state's
    /// bytes on stdin); the serving worker runs this before it maps TARGET.
    #[command(hide = true)]
    Rehearse {
        target: PathBuf,
        #[arg(long)]
        active: Option<PathBuf>,
        #[arg(long)]
        state_version: Option<u32>,
        #[arg(long)]
        hook: Vec<String>,
        /// A directory or file the rehearsal must not see (the data dir,
        /// the secrets flags name).
        #[arg(long)]
        hide: Vec<PathBuf>,
        #[arg(long)]
        limit_ms: u64,
    },
    /// Serves, on the listeners passed in as fds 3 and 4, and 5 for
    /// `--metrics`, then `--health` (`LISTEN_FDS`); the supervisor runs the
    /// agent this way.
    #[command(hide = true)]
    Worker,
    /// Checks the flags and exits 0, serving nothing (the supervisor has a
    /// new binary do this before it re-executes itself from it).
    #[command(hide = true)]
    Check,
}

/// How long a control socket that still answers is given to go away
/// before the agent refuses to start: the worker of an agent just killed
/// dies with its supervisor, a moment later (as the store's lock does).
const LOCAL_SOCKET_WAIT: Duration = Duration::from_secs(3);

const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(24 * 3600);

/// A duration within `min..=max`.
fn bounded(text: &str, min: Duration, max: Duration) -> Result<Duration, String> {
    let d = nine9s_manifest::parse_duration(text)?;
    if d < min || d > max {
        return Err(format!(
            "{text} is out of range: give {} to {}",
            humanize(min),
            humanize(max)
        ));
    }
    Ok(d)
}

fn humanize(d: Duration) -> String {
    match d.as_secs() {
        0 => format!("{}ms", d.as_millis()),
        s if s % 86_400 == 0 => format!("{}d", s / 86_400),
        s if s % 3600 == 0 => format!("{}h", s / 3600),
        s => format!("{s}s"),
    }
}

/// A default duration as its flag shows it and parses it back.
fn shown(default: Duration) -> String {
    humantime::format_duration(default).to_string()
}

/// A default size in MiB, as `size` parses it back.
fn shown_size(default: u64) -> String {
    format!("{}MiB", default >> 20)
}

fn soak(text: &str) -> Result<Duration, String> {
    bounded(text, Duration::ZERO, 7 * DAY)
}

fn checkpoint_every(text: &str) -> Result<Duration, String> {
    bounded(text, Duration::from_millis(100), DAY)
}

fn up_to_an_hour(text: &str) -> Result<Duration, String> {
    bounded(text, Duration::ZERO, HOUR)
}

fn positive_up_to_an_hour(text: &str) -> Result<Duration, String> {
    bounded(text, Duration::from_millis(1), HOUR)
}

/// 0 (no limit), or 10ms to 1h: the watchdog looks at calls every 25 ms.
fn request_timeout(text: &str) -> Result<Duration, String> {
    match nine9s_manifest::parse_duration(text)? {
        zero if zero.is_zero() => Ok(zero),
        _ => bounded(text, Duration::from_millis(10), HOUR)
            .map_err(|e| format!("{e} (or 0 for no limit)")),
    }
}

/// A number of bytes, with an optional binary suffix (`KiB`, `MiB`,
/// `GiB`, or `K`, `M`, `G`), up to 64 GiB.
fn size(text: &str) -> Result<u64, String> {
    const MAX: u64 = 64 << 30;
    let digits = text.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let scale = match &text[digits.len()..] {
        "" | "B" => 1,
        "K" | "KiB" => 1 << 10,
        "M" | "MiB" => 1 << 20,
        "G" | "GiB" => 1 << 30,
        other => return Err(format!("{other:?} is no size unit: give KiB, MiB or GiB")),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?} is not a size such as 256MiB"))?;
    match n.checked_mul(scale) {
        Some(bytes) if bytes <= MAX => Ok(bytes),
        _ => Err(format!("{text} is over 64GiB")),
    }
}

/// Refuses (exit 2) limits that contradict each other.
fn check_limits(args: &Args) {
    if args.max_buffered_bodies < args.max_body {
        Args::command()
            .error(
                clap::error::ErrorKind::ArgumentConflict,
                format!(
                    "--max-buffered-bodies ({} bytes) is below --max-body ({} bytes): a body of the largest size allowed could never be read",
                    args.max_buffered_bodies, args.max_body
                ),
            )
            .exit();
    }
}

fn upload_idle(text: &str) -> Result<Duration, String> {
    bounded(text, Duration::from_millis(100), HOUR)
}

fn rate(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
        Ok(_) => Err(format!(
            "{text} is not a share between 0 and 1 (5% is 0.05)"
        )),
        Err(_) => Err(format!("{text:?} is not a number")),
    }
}

/// glibc malloc arenas the agent uses (see `nine9s_host::limit_malloc_arenas`:
/// one kept resident memory flattest in the bench).
const MALLOC_ARENAS: i32 = 1;

/// Blocks this large or larger (request bodies, large responses) get a
/// mapping of their own, unmapped when freed (see
/// `nine9s_host::unmap_large_blocks`): a burst of large bodies leaves no
/// resident memory behind.
const UNMAPPED_BLOCKS: i32 = 1024 * 1024;

fn main() {
    // Everything the agent creates is its own alone: the data dir holds
    // the admin token, the artifacts and the store.
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    let args = Args::parse();
    if !matches!(args.mode, Some(Mode::Probe { .. })) {
        check_limits(&args);
    }
    // Before anything starts: only root can start workers as another user.
    if worker_user(&args).is_some() && matches!(args.mode, None | Some(Mode::Check)) {
        if let Err(e) = WorkerUser::check_root() {
            Args::command()
                .error(clap::error::ErrorKind::ArgumentConflict, e)
                .exit();
        }
    }
    match &args.mode {
        Some(Mode::Probe { library, hide }) => {
            std::process::exit(nine9s_agent::probe::child(library, hide.as_deref()))
        }
        Some(Mode::Rehearse {
            target,
            active,
            state_version,
            hook,
            hide,
            limit_ms,
        }) => std::process::exit(nine9s_agent::probe::rehearsal_child(
            target,
            active.as_deref(),
            *state_version,
            hook,
            hide,
            Duration::from_millis(*limit_ms),
        )),
        Some(Mode::Worker) => worker(args),
        Some(Mode::Check) => {
            check_plaintext(&args, args.grpc);
            check_paths(&args);
            std::process::exit(0)
        }
        None => supervise(args),
    }
}

/// Logs on stderr, as text or as one JSON object per line (with the
/// fields of the spans a line is in: a transition's id and kind).
fn init_logging(format: LogFormat) {
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => logs.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => logs.json().with_current_span(true).init(),
    }
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Refuses (exit 2) a control plane beyond loopback without TLS.
fn check_plaintext(args: &Args, grpc: SocketAddr) {
    if args.tls_cert.is_none() && !grpc.ip().is_loopback() {
        Args::command()
            .error(
                clap::error::ErrorKind::ArgumentConflict,
                nine9s_agent::plaintext_refusal(grpc),
            )
            .exit();
    }
}

/// The supervisor: the listeners, then workers until SIGTERM.
fn supervise(args: Args) -> ! {
    init_logging(args.log_format);
    check_paths(&args);
    let listeners = listeners(&args).unwrap_or_else(|e| {
        eprintln!("agent: error: {e}");
        std::process::exit(1);
    });
    if let Ok(address) = listeners.grpc.local_addr() {
        check_plaintext(&args, address);
    }
    // Bound here, not by a worker: it lives as long as the TCP listeners.
    let worker_user = worker_user(&args);
    let control = match listeners.inherited.control {
        Some(fd) => std::os::unix::net::UnixListener::from(fd),
        None => nine9s_agent::local::bind(&args.data_dir, worker_user.as_ref(), LOCAL_SOCKET_WAIT)
            .unwrap_or_else(|e| {
                eprintln!("agent: error: {e}");
                std::process::exit(exit_code(&e));
            }),
    };
    tracing::info!("ctl on this machine: {}", ctl_command(&args.data_dir));
    let exe = std::env::current_exe().unwrap_or_else(|e| {
        eprintln!("agent: error: cannot find the agent binary to start workers from: {e}");
        std::process::exit(1);
    });
    let supervisor = nine9s_agent::supervisor::Supervisor {
        exe,
        args: std::env::args_os().skip(1).collect(),
        http: listeners.http,
        grpc: listeners.grpc,
        metrics: listeners.metrics,
        health: listeners.health,
        control,
        adopted_channel: listeners.inherited.adopted_channel,
        adopted_stderr: listeners.inherited.adopted_stderr,
        birth: listeners.inherited.birth,
        worker_user,
        secrets: paths(&args),
    };
    std::process::exit(supervisor.run());
}

/// The agent's listening sockets.
struct Listeners {
    http: StdListener,
    grpc: StdListener,
    /// With `--metrics` only.
    metrics: Option<StdListener>,
    /// With `--health` only.
    health: Option<StdListener>,
    /// The supervisor's sockets passed beside them (`channel.rs`).
    inherited: Inherited,
}

/// The listeners passed in by systemd (or by the supervisor) — HTTP as the
/// first, gRPC as the second, then metrics and health in that order, each
/// only if its flag is given, then the supervisor's own sockets, named —
/// made close-on-exec, so no probe inherits them; those not passed in are
/// bound.
fn listeners(args: &Args) -> Result<Listeners, String> {
    let names = std::env::var("LISTEN_FDNAMES").unwrap_or_default();
    let mut fds = listenfd::ListenFd::from_env();
    let inherited = Inherited::take(&mut fds, &names)?;
    let passed = fds.len() - inherited.count;
    let mut take = |index: usize, what: &str| {
        let listener = fds
            .take_tcp_listener(index)
            .map_err(|e| {
                format!(
                    "LISTEN_FDS: fd {} is not a TCP listener for {what}: {e}",
                    3 + index
                )
            })?
            .ok_or_else(|| {
                format!(
                    "LISTEN_FDS names {passed} sockets; the agent needs two: HTTP, then gRPC (then metrics and health, or it binds --metrics and --health itself)"
                )
            })?;
        rustix::io::fcntl_setfd(&listener, rustix::io::FdFlags::CLOEXEC)
            .map_err(|e| format!("LISTEN_FDS: {e}"))?;
        Ok::<_, String>(listener)
    };
    if passed == 0 {
        return Ok(Listeners {
            http: bind(args.http, "HTTP")?,
            grpc: bind(args.grpc, "gRPC")?,
            metrics: args.metrics.map(|a| bind(a, "metrics")).transpose()?,
            health: args.health.map(|a| bind(a, "health")).transpose()?,
            inherited,
        });
    }
    let http = take(0, "HTTP")?;
    let grpc = take(1, "gRPC")?;
    // The optional ones follow, each in the next fd if there is one.
    let mut next = 2;
    let mut optional = |address: Option<SocketAddr>, what: &str| match address {
        Some(_) if passed > next => {
            next += 1;
            take(next - 1, what).map(Some)
        }
        Some(address) => bind(address, what).map(Some),
        None => Ok(None),
    };
    let metrics = optional(args.metrics, "metrics")?;
    let health = optional(args.health, "health")?;
    Ok(Listeners {
        http,
        grpc,
        metrics,
        health,
        inherited,
    })
}

fn bind(address: SocketAddr, what: &str) -> Result<StdListener, String> {
    let listener = StdListener::bind(address)
        .map_err(|e| format!("cannot listen for {what} on {address}: {e}"))?;
    // std listens with a backlog of 128: a burst beyond it while no worker
    // accepts (one is replaced, or taking over) would have its handshakes
    // dropped and retried a second later. The kernel caps it at somaxconn.
    rustix::net::listen(&listener, LISTEN_BACKLOG)
        .map_err(|e| format!("cannot listen for {what} on {address}: {e}"))?;
    Ok(listener)
}

/// Connections a listener queues while none is accepted.
const LISTEN_BACKLOG: i32 = 4096;

/// The worker: dies with its supervisor, serves on the inherited
/// listeners, says READY=1 once it serves.
fn worker(args: Args) -> ! {
    let mut listeners = listeners(&args).unwrap_or_else(|e| {
        eprintln!("agent: error: {e}");
        std::process::exit(1);
    });
    let birth = match (
        listeners.inherited.birth.take(),
        &listeners.inherited.channel,
    ) {
        (Some(socket), _) => {
            let _ = rustix::process::set_parent_process_death_signal(Some(
                rustix::process::Signal::KILL,
            ));
            // Checked after the line above: a supervisor that died before
            // it is no longer this process's parent, and is refused.
            let birth = nine9s_agent::birth::worker(socket).unwrap_or_else(|e| {
                eprintln!("agent worker: error: {e}");
                std::process::exit(1);
            });
            Some(birth)
        }
        // A supervisor's channel without a start message: a supervisor
        // from before the start message, whose word is not taken.
        (None, Some(_)) => {
            eprintln!("agent worker: error: started by a supervisor that sent no start message (nine9s-birth): restart the agent with this binary");
            std::process::exit(1);
        }
        // Started by hand: no supervisor.
        (None, None) => None,
    };
    if let Some(user) = worker_user(&args) {
        // The supervisor made this process USER before the exec; nothing
        // it runs gains privileges again (a set-user-ID binary, say).
        if rustix::process::geteuid().as_raw() != user.uid {
            eprintln!(
                "agent worker: error: started as uid {}, not as the --worker-user {} (uid {})",
                rustix::process::geteuid().as_raw(),
                user.name,
                user.uid
            );
            std::process::exit(1);
        }
        if let Err(e) = rustix::thread::set_no_new_privs(true) {
            eprintln!("agent worker: error: cannot set no_new_privs: {e}");
            std::process::exit(1);
        }
    }
    nine9s_host::limit_malloc_arenas(MALLOC_ARENAS);
    nine9s_host::unmap_large_blocks(UNMAPPED_BLOCKS);
    init_logging(args.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("agent: error: cannot start the tokio runtime: {e}");
            std::process::exit(1);
        }
    };
    let result = runtime.block_on(run(args, listeners, birth));
    // A data-plane thread may still be inside a slow plugin call: don't
    // wait for it past the grace period that already passed.
    runtime.shutdown_timeout(Duration::from_millis(100));
    if let Err(e) = result {
        eprintln!("agent: error: {e}");
        std::process::exit(e.downcast_ref().map_or(1, exit_code));
    }
    std::process::exit(0);
}

/// How the agent exits on `error`: 2 for a data dir that is unsafe or
/// that the worker user cannot reach (the operator's to fix, like a bad
/// flag), 1 for anything else.
fn exit_code(error: &nine9s_agent::Error) -> i32 {
    use nine9s_agent::datadir::DataDirError;
    match error {
        nine9s_agent::Error::DataDir(DataDirError::Unsafe(_) | DataDirError::Unreachable(_)) => 2,
        _ => 1,
    }
}

async fn run(
    args: Args,
    listeners: Listeners,
    birth: Option<WorkerBirth>,
) -> Result<(), Box<dyn std::error::Error>> {
    let shutdown = shutdown_signal()?;
    let Listeners {
        http,
        grpc,
        metrics,
        health,
        inherited,
    } = listeners;
    check_plaintext(&args, grpc.local_addr()?);
    let listener = |l: StdListener| {
        l.set_nonblocking(true)?;
        TcpListener::from_std(l)
    };
    let (http, grpc) = (listener(http)?, listener(grpc)?);
    let metrics = metrics.map(listener).transpose()?;
    let health = health.map(listener).transpose()?;
    let local = inherited
        .control
        .map(|fd| {
            let local = std::os::unix::net::UnixListener::from(fd);
            local.set_nonblocking(true).map(|()| local)
        })
        .transpose()?;
    let mut config = paths(&args);
    config.bootstrap = args.bootstrap.map_or(Bootstrap::Embedded, Bootstrap::Dir);
    config.soak = args.soak;
    config.checkpoint_every = args.checkpoint_every;
    config.shutdown_grace = args.shutdown_grace;
    config.drain_timeout = args.drain_timeout;
    config.quiesce_timeout = args.quiesce_timeout;
    config.gate_timeout = args.gate_timeout;
    config.health_timeout = args.health_timeout;
    config.keep_old = args.keep_old as usize;
    config.keep_history = args.keep_history as usize;
    config.max_error_rate = args.max_error_rate;
    config.require_signed = args.require_signed;
    // What the supervisor said at the start (`birth.rs`); nothing, for a
    // worker started by hand.
    config.supervisor_pid = birth.as_ref().map(|birth| birth.supervisor);
    let birth = birth.unwrap_or_default();
    config.previous_exit = birth.previous_exit;
    config.worker_restarts = birth.restarts;
    config.failed_restart = birth.failed_restart;
    config.handed = match (birth.secrets, &config.worker_user) {
        (Some(handed), Some(_)) => Some(handed),
        (None, Some(_)) => {
            return Err(
                "--worker-user: this worker was not handed its secrets by a supervisor".into(),
            )
        }
        (_, None) => None,
    };
    // With a request time limit, each connection's socket is held twice:
    // the watchdog answers on a duplicate.
    let fds_per_connection = if args.request_timeout.is_zero() { 1 } else { 2 };
    let max_connections = connection_cap(
        args.max_connections as usize,
        fds_per_connection,
        u64::from(args.max_control_connections) + RESERVED_FDS,
    );
    config.limits = Limits {
        max_uploads: args.max_uploads as usize,
        upload_idle_timeout: args.upload_idle_timeout,
        http_header_timeout: args.http_header_timeout,
        http_idle_timeout: args.http_idle_timeout,
        max_connections,
        max_connections_per_client: args.max_connections_per_client as usize,
        max_control_connections: args.max_control_connections as usize,
        http2_max_streams: args.http2_max_streams,
        http_body_timeout: args.http_body_timeout,
        max_body: usize::try_from(args.max_body).unwrap_or(usize::MAX),
        max_buffered_bodies: usize::try_from(args.max_buffered_bodies).unwrap_or(usize::MAX),
        request_timeout: (!args.request_timeout.is_zero()).then_some(args.request_timeout),
    };

    if birth.store_wait {
        // The worker before this one still holds the store: it lets go
        // once its requests are done, within its shutdown grace.
        config.store_wait = config.shutdown_grace + Duration::from_secs(10);
    }
    let http_address = http.local_addr()?;
    let (agent, http) = match inherited.state {
        // Started for a self-upgrade: ready before the store, then the
        // serving worker's state.
        Some(state) => Agent::take_over(config, http, state, inherited.channel.as_ref()).await?,
        None => (Agent::boot(config).await?, Http::Listener(http)),
    };
    // One line on stdout, for people and for scripts that started the agent
    // on port 0 (every worker says it; a reader that went away is no error).
    let mut optional = String::new();
    for (name, listener) in [("metrics", &metrics), ("health", &health)] {
        if let Some(listener) = listener {
            optional.push_str(&format!(" {name}={}", listener.local_addr()?));
        }
    }
    let _ = writeln!(
        std::io::stdout(),
        "nine9s agent ready: release {} http={} grpc={}{optional}",
        agent.active_version(),
        http_address,
        grpc.local_addr()?
    );
    // The listeners already queue connections: serving starts below.
    nine9s_agent::supervisor::notify_ready();
    let listeners = nine9s_agent::Listeners {
        http,
        grpc,
        local,
        metrics,
        health,
    };
    agent.run(listeners, shutdown, inherited.channel).await?;
    Ok(())
}

/// The configuration's paths: the data dir and the files flags name,
/// which `nine9s_agent::datadir::check` looks at.
fn paths(args: &Args) -> Config {
    let mut config = Config::new(args.data_dir.clone());
    config.tokens = args.tokens.clone();
    config.tls = args
        .tls_cert
        .clone()
        .zip(args.tls_key.clone())
        .map(|(cert, key)| TlsFiles {
            cert,
            key,
            client_ca: args.client_ca.clone(),
        });
    config.http_tls = args
        .http_tls_cert
        .clone()
        .zip(args.http_tls_key.clone())
        .map(|(cert, key)| HttpTlsFiles { cert, key });
    config.trusted_keys = args.trusted_keys.clone();
    config.worker_user = worker_user(args);
    config
}

/// The data dir when none is given: the one `ctl` looks in by default.
const DEFAULT_DATA_DIR: &str = "nine9s-data";

/// The `ctl` command (in backquotes) a user on this machine pastes to reach this agent
/// over its local socket: plain `ctl status` where ctl's default finds it
/// (the default data dir, from this directory), `--data-dir` otherwise.
fn ctl_command(data_dir: &Path) -> String {
    let absolute = std::path::absolute(data_dir).unwrap_or_else(|_| data_dir.to_owned());
    let text = absolute.display().to_string();
    let plain = |c: char| c.is_ascii_alphanumeric() || "/._-+,:@%".contains(c);
    let quoted = if text.chars().all(plain) {
        text
    } else {
        format!("'{}'", text.replace('\'', r"'\''"))
    };
    if data_dir == Path::new(DEFAULT_DATA_DIR) {
        format!("`ctl status` from this directory, `ctl --data-dir {quoted} status` from anywhere")
    } else {
        format!("`ctl --data-dir {quoted} status`")
    }
}

/// The `--worker-user`, looked up; exits 2 if /etc/passwd does not list it
/// (or it is root).
fn worker_user(args: &Args) -> Option<WorkerUser> {
    let user = args.worker_user.as_deref()?;
    match WorkerUser::lookup(user) {
        Ok(user) => Some(user),
        Err(e) => Args::command()
            .error(clap::error::ErrorKind::InvalidValue, e)
            .exit(),
    }
}

/// Refuses (exit 2) a data dir, tokens file, TLS key or trusted key
/// another local user could have made or changed.
fn check_paths(args: &Args) {
    let config = paths(args);
    if let Err(e) = nine9s_agent::datadir::check(&config) {
        eprintln!("agent: error: {e}");
        std::process::exit(2);
    }
    if let Some(files) = &config.http_tls {
        if let Err(why) = nine9s_agent::check_http_tls(files) {
            eprintln!("agent: error: {why}");
            std::process::exit(2);
        }
    }
}

/// File descriptors kept beside the control plane's connections for the
/// store, artifacts, uploads and probes.
const RESERVED_FDS: u64 = 128;

/// Raises the open-file limit to its maximum, and keeps `wanted`
/// connections of `fds` file descriptors each under it with room to spare:
/// a flood of HTTP connections must never leave the control plane unable
/// to accept.
fn connection_cap(wanted: usize, fds: u64, reserved: u64) -> usize {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let limit = getrlimit(Resource::Nofile);
    if let Some(max) = limit.maximum {
        let _ = setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(max),
                maximum: Some(max),
            },
        );
    }
    let Some(files) = getrlimit(Resource::Nofile).current else {
        return wanted;
    };
    let room = usize::try_from((files.saturating_sub(reserved) / fds).max(1)).unwrap_or(usize::MAX);
    if wanted > room {
        tracing::warn!(
            wanted,
            allowed = room,
            open_files = files,
            "--max-connections is over what the open-file limit leaves beside the control plane; lowered"
        );
    }
    wanted.min(room)
}

/// Resolves on SIGTERM or Ctrl-C. The handlers are installed when this is
/// called, not when it is first awaited: a SIGTERM that comes while the
/// agent boots (a supervisor retiring a worker it just started) is kept,
/// not the default death.
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = interrupt.recv() => {}
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each flag shows and takes the default `Config` and `Limits` hold:
    /// what `shown` prints parses back to the same value.
    #[test]
    fn the_flags_default_to_the_configs_defaults() {
        let args = Args::try_parse_from(["agent"]).unwrap();
        let config = Config::new(PathBuf::from("data"));
        let limits = &config.limits;
        assert_eq!(
            [
                args.soak,
                args.checkpoint_every,
                args.shutdown_grace,
                args.drain_timeout,
                args.quiesce_timeout,
                args.gate_timeout,
                args.health_timeout,
                args.upload_idle_timeout,
                args.http_header_timeout,
                args.http_idle_timeout,
                args.http_body_timeout,
            ],
            [
                config.soak,
                config.checkpoint_every,
                config.shutdown_grace,
                config.drain_timeout,
                config.quiesce_timeout,
                config.gate_timeout,
                config.health_timeout,
                limits.upload_idle_timeout,
                limits.http_header_timeout,
                limits.http_idle_timeout,
                limits.http_body_timeout,
            ]
        );
        assert_eq!(Some(args.request_timeout), limits.request_timeout);
        assert_eq!(
            [
                args.keep_old as usize,
                args.keep_history as usize,
                args.max_uploads as usize,
                args.max_control_connections as usize,
                args.max_connections as usize,
                args.max_connections_per_client as usize,
                args.http2_max_streams as usize,
                args.max_body as usize,
                args.max_buffered_bodies as usize,
            ],
            [
                config.keep_old,
                config.keep_history,
                limits.max_uploads,
                limits.max_control_connections,
                limits.max_connections,
                limits.max_connections_per_client,
                limits.http2_max_streams as usize,
                limits.max_body,
                limits.max_buffered_bodies,
            ]
        );
        assert_eq!(args.max_error_rate, config.max_error_rate);
    }
}
