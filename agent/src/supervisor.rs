//! The supervisor: the `agent` process people and systemd start. It holds
//! the listening sockets and nothing else — no plugin code, no store — and
//! runs the agent proper in a **worker**, the same binary started as
//! `agent worker`, which inherits the sockets as fds 3 (HTTP), 4 (gRPC)
//! and, with `--metrics` and `--health`, the next ones (metrics, then
//! health) by the systemd `LISTEN_FDS` convention and says it serves with `sd_notify` READY=1.
//!
//! - A worker that dies is replaced at once; connections that arrive
//!   meanwhile wait in the kernel's backlog, since the sockets never close.
//!   The next worker is told how the last one ended (`NINE9S_PREVIOUS_EXIT`)
//!   so the release current at the time is failed with that cause, and how
//!   many workers were replaced so far (`NINE9S_WORKER_RESTARTS`, for
//!   `nine9s_worker_restarts_total`). Workers that die before they serve
//!   are restarted with back-off; the store counts their boot attempts, and
//!   the worker falls back to the release permanent before.
//! - SIGHUP (or `ctl agent restart`) starts a new worker from the binary on
//!   disk now, and stops the old one as SIGTERM would: it finishes its
//!   requests, checkpoints and closes the store, which the new one waits
//!   for (`NINE9S_HANDOVER`).
//! - SIGUSR2 re-executes the supervisor itself from the binary on disk,
//!   keeping its pid, the listeners and the serving worker.
//! - SIGTERM or Ctrl-C stops the worker and then the supervisor, with the
//!   worker's exit code. The worker dies with the supervisor, whatever
//!   kills it (`PR_SET_PDEATHSIG`, set by the worker on the thread that
//!   started it: the supervisor runs on its main thread only).
//!
//! A worker that cannot start (exit code, not a signal) before it ever
//! served ends the supervisor with its code: a bad flag or a locked data
//! dir is not mended by retrying.

use std::ffi::OsString;
use std::future::pending;
use std::os::fd::OwnedFd;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr as UnixAddr, UnixDatagram as StdDatagram};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use command_fds::{CommandFdExt, FdMapping};
use tokio::net::UnixDatagram;
use tokio::process::{Child, Command};
use tokio::signal::unix::{signal, SignalKind};

/// The most a crash-looping worker waits before it is started again.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// What the supervisor needs to start workers.
pub struct Supervisor {
    /// The agent binary, as found at start: a self-upgrade runs what is
    /// at this path now.
    pub exe: PathBuf,
    /// The flags the supervisor was given, passed on to every worker.
    pub args: Vec<OsString>,
    pub http: std::net::TcpListener,
    pub grpc: std::net::TcpListener,
    /// With `--metrics` only.
    pub metrics: Option<std::net::TcpListener>,
    /// With `--health` only.
    pub health: Option<std::net::TcpListener>,
}

/// A running worker.
struct Worker {
    /// `None` for a worker adopted across a re-exec of the supervisor:
    /// still this process's child, but not a `Child` of this image.
    child: Option<Child>,
    pid: u32,
    started: Instant,
    ready: bool,
}

impl Worker {
    async fn wait(&mut self) -> ExitStatus {
        match &mut self.child {
            Some(child) => child
                .wait()
                .await
                .unwrap_or_else(|_| ExitStatus::from_raw(1 << 8)),
            None => {
                let pid = rustix::process::Pid::from_raw(self.pid as i32);
                loop {
                    match rustix::process::waitpid(pid, rustix::process::WaitOptions::NOHANG) {
                        Ok(Some((_, status))) => return ExitStatus::from_raw(status.as_raw()),
                        Ok(None) => tokio::time::sleep(Duration::from_millis(10)).await,
                        Err(_) => return ExitStatus::from_raw(1 << 8),
                    }
                }
            }
        }
    }
}

/// How the next worker starts.
#[derive(Default)]
struct Start {
    /// How the last worker ended, if it died.
    previous_exit: Option<String>,
    /// Another worker still holds the store: wait for it.
    handover: bool,
    /// Workers started so far because the one before died (this one
    /// included, if it is one of them).
    restarts: u64,
}

impl Supervisor {
    /// Runs until SIGTERM (or a worker that cannot start); returns the exit code.
    pub fn run(self) -> i32 {
        // One thread: the worker's PR_SET_PDEATHSIG fires when the thread
        // that started it ends, and this one ends only with the process.
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(runtime) => runtime,
            Err(e) => {
                eprintln!("agent: error: cannot start the supervisor's runtime: {e}");
                return 1;
            }
        };
        match runtime.block_on(self.supervise()) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("agent: error: {e}");
                1
            }
        }
    }

    async fn supervise(self) -> std::io::Result<i32> {
        let (notify, notify_name) = bind_notify()?;
        let mut term = signal(SignalKind::terminate())?;
        let mut interrupt = signal(SignalKind::interrupt())?;
        let mut hangup = signal(SignalKind::hangup())?;
        let mut reexec = signal(SignalKind::user_defined2())?;
        // Restarts are counted across re-executions of the supervisor,
        // which pass the count on.
        let (mut current, mut restarts) = match adopted() {
            Some((worker, restarts)) => {
                tracing::info!(
                    pid = worker.pid,
                    "supervisor re-executed; the serving worker goes on"
                );
                (Some(worker), restarts)
            }
            None => (Some(self.spawn(&notify_name, Start::default())?), 0),
        };
        let mut retiring: Option<Worker> = None;
        let mut stopping = false;
        let mut failures_before_ready = 0u32;
        let mut told_systemd = false;
        let mut buf = [0u8; 512];
        loop {
            tokio::select! {
                status = exited(&mut current) => {
                    let worker = current.take().expect("waited on it");
                    let how = describe(status);
                    if stopping {
                        tracing::info!(pid = worker.pid, "worker {how}; supervisor stopping");
                        if let Some(mut old) = retiring.take() {
                            old.wait().await;
                        }
                        return Ok(status.code().unwrap_or(1));
                    }
                    if !worker.ready && status.signal().is_none() && retiring.is_none() {
                        // Its own last line on stderr said why: it stays the last.
                        tracing::debug!(pid = worker.pid, "the worker {how} before it served; stopping");
                        return Ok(status.code().unwrap_or(1));
                    }
                    failures_before_ready = if worker.ready { 0 } else { failures_before_ready + 1 };
                    let backoff = backoff(failures_before_ready);
                    tracing::error!(
                        pid = worker.pid,
                        lived_ms = worker.started.elapsed().as_millis() as u64,
                        backoff_ms = backoff.as_millis() as u64,
                        "the worker {how}; starting another on the permanent release"
                    );
                    tokio::time::sleep(backoff).await;
                    restarts += 1;
                    let start = || Start {
                        previous_exit: Some(how.clone()),
                        handover: retiring.is_some(),
                        restarts,
                    };
                    // The binary may be mid-replacement ("text file busy"):
                    // try again rather than leave nothing serving.
                    let mut pause = Duration::from_millis(50);
                    current = loop {
                        match self.spawn(&notify_name, start()) {
                            Ok(worker) => break Some(worker),
                            Err(e) => {
                                tracing::error!(error = %e, "cannot start a worker; trying again");
                                tokio::time::sleep(pause).await;
                                pause = (pause * 2).min(MAX_BACKOFF);
                            }
                        }
                    };
                }
                status = exited(&mut retiring) => {
                    let worker = retiring.take().expect("waited on it");
                    tracing::info!(pid = worker.pid, "the previous worker {}", describe(status));
                }
                received = notify.recv_from(&mut buf) => {
                    let (n, _) = received?;
                    let message = String::from_utf8_lossy(&buf[..n]);
                    if let Some(worker) = current.as_mut().filter(|_| message.lines().any(|l| l == "READY=1")) {
                        if !worker.ready {
                            worker.ready = true;
                            failures_before_ready = 0;
                            tracing::info!(pid = worker.pid, "worker serving");
                            if !told_systemd {
                                told_systemd = true;
                                notify_ready();
                            }
                        }
                    }
                }
                _ = reexec.recv(), if !stopping && retiring.is_none() => {
                    if let Some(worker) = &current {
                        let error = self.reexec(worker, restarts);
                        tracing::error!(%error, "cannot re-execute the supervisor; it goes on as it is");
                    }
                }
                _ = term.recv() => stopping = stop(&current, &retiring),
                _ = interrupt.recv() => stopping = stop(&current, &retiring),
                _ = hangup.recv(), if !stopping && retiring.is_none() => {
                    let Some(old) = current.take() else { continue };
                    tracing::info!(pid = old.pid, "self-upgrade: starting a new worker from {}", self.exe.display());
                    match self.spawn(&notify_name, Start { previous_exit: None, handover: true, restarts }) {
                        Ok(new) => {
                            terminate(old.pid);
                            retiring = Some(old);
                            current = Some(new);
                        }
                        Err(e) => {
                            tracing::error!(error = %e, pid = old.pid, "cannot start a new worker; the current one keeps serving");
                            current = Some(old);
                        }
                    }
                }
            }
        }
    }

    /// Replaces this process's image with the agent binary on disk,
    /// keeping its pid, the listeners (passed as `LISTEN_FDS`), the count
    /// of restarts and the serving worker, which stays its child
    /// (`NINE9S_ADOPT_WORKER`). Only returns if that failed.
    fn reexec(&self, worker: &Worker, restarts: u64) -> std::io::Error {
        use std::os::unix::process::CommandExt as _;
        tracing::info!(
            pid = worker.pid,
            "SIGUSR2: re-executing the supervisor from {}",
            self.exe.display()
        );
        let mut command = std::process::Command::new(&self.exe);
        command
            .args(&self.args)
            .env_remove("LISTEN_PID")
            .env("NINE9S_ADOPT_WORKER", worker.pid.to_string())
            .env("NINE9S_WORKER_RESTARTS", restarts.to_string());
        if let Err(e) = self.pass_listeners(&mut command) {
            return e;
        }
        command.exec()
    }

    /// Starts a worker on the listeners.
    fn spawn(&self, notify: &str, start: Start) -> std::io::Result<Worker> {
        let mut command = Command::new(&self.exe);
        // The flags first: they are the top-level command's.
        command
            .args(&self.args)
            .arg("worker")
            .env_remove("LISTEN_PID")
            .env_remove("NINE9S_ADOPT_WORKER")
            .env("NOTIFY_SOCKET", notify)
            .env("NINE9S_SUPERVISOR_PID", std::process::id().to_string())
            .env("NINE9S_WORKER_RESTARTS", start.restarts.to_string())
            .kill_on_drop(true);
        if let Some(how) = &start.previous_exit {
            command.env("NINE9S_PREVIOUS_EXIT", how);
        }
        if start.handover {
            command.env("NINE9S_HANDOVER", "1");
        }
        self.pass_listeners(command.as_std_mut())?;
        let child = command.spawn()?;
        let pid = child.id().unwrap_or(0);
        tracing::info!(pid, "worker started");
        Ok(Worker {
            child: Some(child),
            pid,
            started: Instant::now(),
            ready: false,
        })
    }

    /// Hands the listeners to `command` as fds 3, 4 (and 5), named in
    /// `LISTEN_FDS` and `LISTEN_FDNAMES`.
    fn pass_listeners(&self, command: &mut std::process::Command) -> std::io::Result<()> {
        let mut listeners = vec![("http", &self.http), ("grpc", &self.grpc)];
        listeners.extend(self.metrics.iter().map(|m| ("metrics", m)));
        listeners.extend(self.health.iter().map(|h| ("health", h)));
        let names: Vec<&str> = listeners.iter().map(|(name, _)| *name).collect();
        let mut mappings = Vec::with_capacity(listeners.len());
        for (child_fd, (_, listener)) in (3..).zip(&listeners) {
            mappings.push(FdMapping {
                parent_fd: OwnedFd::from(listener.try_clone()?),
                child_fd,
            });
        }
        command
            .env("LISTEN_FDS", listeners.len().to_string())
            .env("LISTEN_FDNAMES", names.join(":"))
            .fd_mappings(mappings)
            .map(|_| ())
            .map_err(|e| std::io::Error::other(format!("cannot pass the listeners on: {e}")))
    }
}

/// Tells the service manager that started this process (systemd, or a
/// worker's supervisor) that it serves: `READY=1` on `$NOTIFY_SOCKET`, a
/// path or, with a leading `@`, an abstract socket name. Without one,
/// nothing to do; a manager that went away is no error.
pub fn notify_ready() {
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let Ok(socket) = StdDatagram::unbound() else {
        return;
    };
    let target = target.to_string_lossy().into_owned();
    let connected = match target.strip_prefix('@') {
        Some(name) => UnixAddr::from_abstract_name(name.as_bytes())
            .and_then(|address| socket.connect_addr(&address)),
        None => socket.connect(&target),
    };
    if connected.is_ok() {
        let _ = socket.send(b"READY=1\n");
    }
}

/// The supervisor's end of the workers' `sd_notify`: an abstract Unix
/// socket only this supervisor's workers are told of.
fn bind_notify() -> std::io::Result<(UnixDatagram, String)> {
    let mut nonce = [0u8; 8];
    let _ = rustix::rand::getrandom(&mut nonce, rustix::rand::GetRandomFlags::empty());
    let name = format!(
        "nine9s-{}-{}",
        std::process::id(),
        nonce.iter().map(|b| format!("{b:02x}")).collect::<String>()
    );
    let socket = StdDatagram::bind_addr(&UnixAddr::from_abstract_name(name.as_bytes())?)?;
    socket.set_nonblocking(true)?;
    // sd_notify's convention: a leading '@' names an abstract socket.
    Ok((UnixDatagram::from_std(socket)?, format!("@{name}")))
}

async fn exited(worker: &mut Option<Worker>) -> ExitStatus {
    match worker {
        Some(worker) => worker.wait().await,
        None => pending().await,
    }
}

/// The worker a previous image of this supervisor was running, and the
/// restarts it counted, if this one was re-executed (SIGUSR2).
fn adopted() -> Option<(Worker, u64)> {
    let pid: u32 = std::env::var("NINE9S_ADOPT_WORKER").ok()?.parse().ok()?;
    let restarts = std::env::var("NINE9S_WORKER_RESTARTS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    let worker = Worker {
        child: None,
        pid,
        started: Instant::now(),
        ready: true,
    };
    Some((worker, restarts))
}

/// Asks the workers to stop; returns true.
fn stop(current: &Option<Worker>, retiring: &Option<Worker>) -> bool {
    for worker in current.iter().chain(retiring) {
        terminate(worker.pid);
    }
    true
}

fn terminate(pid: u32) {
    if let Some(pid) = rustix::process::Pid::from_raw(pid as i32) {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
    }
}

/// "killed by SIGSEGV", "exited with code 1".
fn describe(status: ExitStatus) -> String {
    match (status.signal(), status.code()) {
        (Some(signal), _) => format!("was killed by {}", crate::probe::signal_name(signal)),
        (None, Some(code)) => format!("exited with code {code}"),
        (None, None) => "ended".to_owned(),
    }
}

/// No wait after a worker that had served; then 100 ms, doubling, to 5 s.
fn backoff(failures_before_ready: u32) -> Duration {
    match failures_before_ready {
        0 => Duration::ZERO,
        n => (Duration::from_millis(100) * 2u32.saturating_pow(n - 1)).min(MAX_BACKOFF),
    }
}
