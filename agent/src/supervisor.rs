//! The supervisor: the `agent` process people and systemd start. It holds
//! the listening sockets and nothing else — no plugin code, no store — and
//! runs the agent proper in a **worker**, the same binary started as
//! `agent worker`, which inherits the sockets as fds 3 (HTTP), 4 (gRPC)
//! and, with `--metrics` and `--health`, the next ones (metrics, then
//! health) by the systemd `LISTEN_FDS` convention, then the local control
//! socket (`local.rs`, bound here) and its end of a channel to the
//! supervisor (`channel.rs`), and says it serves with `sd_notify` READY=1
//! (heeded only from the current worker's pid, which the kernel attaches). The worker's stderr comes through the supervisor,
//! which writes it on as it comes and keeps its last lines.
//!
//! A new agent binary is untrusted until it serves. The supervisor keeps
//! the binary that served last open (at first, its own) and starts every
//! replacement worker from it, never from the path on disk.
//!
//! - A worker that dies is replaced at once; connections that arrive
//!   meanwhile wait in the kernel's backlog, since the sockets never close.
//!   The next worker is told in its start message (`birth.rs`) how the
//!   last one ended, so the release current at the time is failed with
//!   that cause, and how many workers were replaced so far (for
//!   `nine9s_worker_restarts_total`). Workers that die before they serve
//!   are restarted with back-off; the store counts their boot attempts, and
//!   the worker falls back to the release permanent before.
//! - SIGHUP (or `ctl agent restart`) starts a new worker from the binary on
//!   disk now, for a self-upgrade. It proves itself before anything else
//!   changes: it starts, checks its flags, opens and verifies the permanent
//!   release's library and says it is ready to take over (`standby` on its
//!   channel). Only then is the serving worker told to hand over: it stops
//!   accepting, finishes its requests and sends its state straight to the
//!   new worker, which serves at once and opens the store once the old one
//!   has let go of it (`handover.rs`). A new worker that ends before it
//!   said `standby` (or within [`STANDBY_LIMIT`]) changes nothing: the
//!   serving worker is told how it failed, with its last lines on stderr,
//!   and records it. One that ends after, before it serves, is replaced by
//!   a worker from the binary that served, told the same.
//! - SIGUSR1 (sent by the worker, whose abandoned stuck calls hold its
//!   threads) does the same handover to a new worker from the binary that
//!   serves, not the one on disk.
//! - SIGUSR2 re-executes the supervisor itself from the binary on disk,
//!   keeping its pid, the listeners and the serving worker (named to the
//!   new image in a start message of its own, and adopted only as this
//!   process's child) — once that binary has checked the flags (`agent
//!   FLAGS check`, within [`CHECK_LIMIT`]); a binary that cannot is
//!   refused, and the serving worker told why.
//! - SIGTERM or Ctrl-C stops the workers and then the supervisor, with the
//!   serving worker's exit code. The worker dies with the supervisor,
//!   whatever kills it (`PR_SET_PDEATHSIG`, set by the worker on the thread
//!   that started it: the supervisor runs on its main thread only).
//!
//! Under `--worker-user USER` (`worker_user.rs`) the supervisor stays
//! root and starts every worker as USER (its gid, no supplementary groups,
//! no capabilities left), handing it the tokens' digests and the TLS
//! files in its start message. Such a worker cannot signal its
//! supervisor: it asks for a new worker with `NINE9S_RESTART=disk` (as
//! SIGHUP) or `NINE9S_RESTART=same` (as SIGUSR1) on the notify socket,
//! heeded like READY=1 only from the current worker's pid.
//!
//! A worker that cannot start (exit code, not a signal) before any worker
//! ever served ends the supervisor with its code: a bad flag or a locked
//! data dir is not mended by retrying. Once a binary has served, the
//! supervisor never ends on its own: it goes on starting workers from it.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::fs::File;
use std::future::pending;
use std::io::{IoSliceMut, Write as _};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{SocketAddr as UnixAddr, UnixDatagram as StdDatagram, UnixStream};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;

use parking_lot::Mutex;
use std::time::{Duration, Instant};

use command_fds::{CommandFdExt, FdMapping};
use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};
use tokio::io::{AsyncReadExt, Interest};
use tokio::net::UnixDatagram;
use tokio::process::{Child, Command};
use tokio::signal::unix::{signal, SignalKind};
use tokio::task::JoinHandle;

use crate::birth::{self, Adoption, Birth, WorkerBirth};
use crate::channel::{self, Channel, Message};
use crate::process::FailedRestart;
use crate::worker_user::WorkerUser;

/// The most a crash-looping worker waits before it is started again.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How long a self-upgrade's new worker has to say it is ready to take
/// over; past it, it is killed and the restart failed.
pub const STANDBY_LIMIT: Duration = Duration::from_secs(30);
/// How long a new binary's `check` may take before the supervisor's
/// re-execution is refused.
pub const CHECK_LIMIT: Duration = Duration::from_secs(10);
/// Lines of a worker's stderr kept for a failure's report, and the most
/// kept of one line.
const TAIL_LINES: usize = 20;
const TAIL_LINE_BYTES: usize = 512;
/// How long a dead worker's last stderr lines are waited for.
const TAIL_WAIT: Duration = Duration::from_secs(1);
/// The lowest fd number a kept binary gets: above every fd mapped into a
/// child, so that `/proc/self/fd/N` still names it when the child execs.
const KEPT_FD_MIN: i32 = 100;

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
    /// The local control socket, `DATA/control.sock` (`local.rs`).
    pub control: std::os::unix::net::UnixListener,
    /// After a re-execution: the serving worker's channel and stderr, as
    /// the previous image had them.
    pub adopted_channel: Option<OwnedFd>,
    pub adopted_stderr: Option<OwnedFd>,
    /// After a re-execution: the socket the previous image wrote which
    /// worker to adopt on (`birth.rs`).
    pub birth: Option<OwnedFd>,
    /// `--worker-user`: whom workers run as.
    pub worker_user: Option<WorkerUser>,
    /// The paths of what the supervisor reads for workers under
    /// `--worker-user`: the data dir (its admin token), the tokens file,
    /// the TLS files.
    pub secrets: crate::Config,
}

/// A running worker.
struct Worker {
    /// `None` for a worker adopted across a re-exec of the supervisor:
    /// still this process's child, but not a `Child` of this image.
    child: Option<Child>,
    pid: u32,
    started: Instant,
    ready: bool,
    /// Started for a self-upgrade (from the binary on disk).
    upgrade: bool,
    /// Took over from the serving worker: it must serve by then, or it is
    /// killed and replaced from the binary that served.
    serve_by: Option<Instant>,
    /// `None` for a worker adopted from a supervisor that had none.
    channel: Option<Channel>,
    /// Its stderr as it comes; `None` if it writes to the supervisor's own.
    stderr: Option<Relay>,
}

impl Worker {
    /// Returns once everything it wrote on stderr has been passed on (or a
    /// moment passed): the supervisor's exit must not cut its last line.
    async fn relayed(&mut self) {
        if let Some(relay) = &mut self.stderr {
            relay.last_lines().await;
        }
    }

    async fn wait(&mut self) -> ExitStatus {
        wait_for(&mut self.child, self.pid).await
    }

    /// Tells it over its channel; says so (and false) if it cannot.
    fn tell(&self, message: &Message) -> bool {
        let sent = match &self.channel {
            Some(channel) => channel.send(message),
            None => Err(std::io::Error::other("it has no channel")),
        };
        if let Err(e) = &sent {
            tracing::warn!(pid = self.pid, error = %e, "cannot tell the worker");
        }
        sent.is_ok()
    }

    /// How it failed, once it has ended, with its last lines on stderr.
    async fn failure(&mut self, exit: String) -> FailedRestart {
        let stderr = match &mut self.stderr {
            Some(relay) => relay.last_lines().await,
            None => Vec::new(),
        };
        FailedRestart {
            pid: self.pid,
            exit,
            stderr,
            at_ms: crate::model::now_ms(),
            supervisor: false,
        }
    }
}

/// Waits for the worker `pid` to end: its `Child`, or `waitpid` for one
/// adopted across a re-execution.
async fn wait_for(child: &mut Option<Child>, pid: u32) -> ExitStatus {
    match child {
        Some(child) => child
            .wait()
            .await
            .unwrap_or_else(|_| ExitStatus::from_raw(1 << 8)),
        None => {
            let pid = rustix::process::Pid::from_raw(pid as i32);
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

/// A worker's stderr, written on to the supervisor's as it comes, its
/// last lines kept.
struct Relay {
    /// The supervisor's end, kept to pass on across a re-execution.
    socket: OwnedFd,
    tail: Arc<Mutex<Tail>>,
    task: Option<JoinHandle<()>>,
}

impl Relay {
    fn start(socket: OwnedFd) -> std::io::Result<Relay> {
        let stream = UnixStream::from(socket.try_clone()?);
        stream.set_nonblocking(true)?;
        let mut stream = tokio::net::UnixStream::from_std(stream)?;
        let tail = Arc::new(Mutex::new(Tail::default()));
        let task = tokio::spawn({
            let tail = Arc::clone(&tail);
            async move {
                let mut buffer = vec![0u8; 16 * 1024];
                while let Ok(n @ 1..) = stream.read(&mut buffer).await {
                    let _ = std::io::stderr().write_all(&buffer[..n]);
                    tail.lock().push(&buffer[..n]);
                }
            }
        });
        Ok(Relay {
            socket,
            tail,
            task: Some(task),
        })
    }

    /// Its last lines, once it has written everything (or a moment passed).
    async fn last_lines(&mut self) -> Vec<String> {
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(TAIL_WAIT, task).await;
        }
        self.tail.lock().lines()
    }
}

/// The last lines of a stream of bytes.
#[derive(Default)]
struct Tail {
    lines: VecDeque<String>,
    partial: Vec<u8>,
}

impl Tail {
    fn push(&mut self, mut bytes: &[u8]) {
        while let Some(end) = bytes.iter().position(|&b| b == b'\n') {
            self.partial.extend_from_slice(&bytes[..end]);
            self.line();
            bytes = &bytes[end + 1..];
        }
        self.partial.extend_from_slice(bytes);
        if self.partial.len() > TAIL_LINE_BYTES {
            self.line();
        }
    }

    fn line(&mut self) {
        let line =
            String::from_utf8_lossy(&self.partial[..self.partial.len().min(TAIL_LINE_BYTES)])
                .trim_end()
                .to_owned();
        self.partial.clear();
        if self.lines.len() == TAIL_LINES {
            self.lines.pop_front();
        }
        self.lines.push_back(line);
    }

    fn lines(&self) -> Vec<String> {
        let mut lines: Vec<String> = self.lines.iter().cloned().collect();
        if !self.partial.is_empty() {
            lines.push(String::from_utf8_lossy(&self.partial).trim_end().to_owned());
        }
        lines
    }
}

/// A self-upgrade's new worker, before it takes over.
struct Candidate {
    worker: Worker,
    /// The serving worker's end of the socket the state goes over.
    state: OwnedFd,
    deadline: Instant,
    /// Killed for not getting ready within [`STANDBY_LIMIT`].
    timed_out: bool,
}

/// What a candidate did.
enum Heard {
    Exited(ExitStatus),
    Ready,
    TimedOut,
}

impl Candidate {
    async fn next(&mut self) -> Heard {
        loop {
            let Candidate {
                worker,
                deadline,
                timed_out,
                ..
            } = self;
            let Worker {
                child,
                pid,
                channel,
                ..
            } = worker;
            let listening = channel.as_ref().filter(|_| !*timed_out);
            let said = tokio::select! {
                status = wait_for(child, *pid) => return Heard::Exited(status),
                said = async {
                    match listening {
                        Some(channel) => channel.recv().await,
                        None => pending().await,
                    }
                } => said,
                () = async {
                    if *timed_out {
                        pending::<()>().await;
                    }
                    tokio::time::sleep_until((*deadline).into()).await;
                } => return Heard::TimedOut,
            };
            match said {
                Ok(Some(Message::Standby)) => return Heard::Ready,
                Ok(Some(other)) => {
                    tracing::warn!(
                        pid = self.worker.pid,
                        ?other,
                        "unexpected message from the new worker"
                    );
                }
                // Closed or broken: its exit (or the deadline) tells the rest.
                Ok(None) | Err(_) => self.worker.channel = None,
            }
        }
    }
}

/// The binary replacement workers start from: the one that served last.
struct Kept {
    /// Open, at an fd no child mapping covers.
    binary: OwnedFd,
    /// A worker served from it (at first it is the supervisor's own).
    served: bool,
}

/// Opens `path` (a binary) at an fd that `/proc/self/fd/N` can name in a
/// child: close-on-exec, above any mapped fd.
fn keep(path: &Path) -> std::io::Result<OwnedFd> {
    let file = File::open(path)?;
    Ok(rustix::io::fcntl_dupfd_cloexec(&file, KEPT_FD_MIN)?)
}

/// What a worker runs.
enum Binary<'a> {
    /// The path on disk: a self-upgrade's new binary.
    Path(&'a Path),
    /// A binary kept open.
    Kept(&'a OwnedFd),
}

/// How the next worker starts.
#[derive(Default)]
struct Start {
    /// How the last worker ended, if it died.
    previous_exit: Option<String>,
    /// Another worker may still hold the store: wait for it.
    store_wait: bool,
    /// A self-upgrade: the new worker's end of the state socket.
    state: Option<OwnedFd>,
    /// Workers started so far because the one before died (this one
    /// included, if it is one of them).
    restarts: u64,
    /// A self-upgrade that failed after the handover, for this worker to
    /// record.
    failed_restart: Option<FailedRestart>,
}

impl Supervisor {
    /// Runs until SIGTERM (or a worker that cannot start before any
    /// served); returns the exit code.
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

    async fn supervise(mut self) -> std::io::Result<i32> {
        let (notify, notify_name) = bind_notify()?;
        let mut term = signal(SignalKind::terminate())?;
        let mut interrupt = signal(SignalKind::interrupt())?;
        let mut hangup = signal(SignalKind::hangup())?;
        // From the worker: a new worker from the binary that serves, not
        // the one on disk (its abandoned stuck calls hold threads).
        let mut renew = signal(SignalKind::user_defined1())?;
        let mut reexec = signal(SignalKind::user_defined2())?;
        // Restarts are counted across re-executions of the supervisor,
        // which pass the count on.
        let (mut current, mut restarts, mut kept) = match self.adopted()? {
            Some((worker, restarts)) => {
                tracing::info!(
                    pid = worker.pid,
                    "supervisor re-executed; the serving worker goes on"
                );
                let kept = Kept {
                    binary: keep(Path::new(&format!("/proc/{}/exe", worker.pid)))?,
                    served: true,
                };
                (Some(worker), restarts, kept)
            }
            None => {
                let kept = Kept {
                    binary: keep(Path::new("/proc/self/exe"))?,
                    served: false,
                };
                let worker =
                    self.spawn(Binary::Kept(&kept.binary), &notify_name, Start::default())?;
                (Some(worker), 0, kept)
            }
        };
        let mut candidate: Option<Candidate> = None;
        let mut retiring: Option<Worker> = None;
        // A self-upgrade that failed after the handover, told to each
        // worker started until one serves.
        let mut unrecorded: Option<FailedRestart> = None;
        let mut stopping = false;
        let mut failures_before_ready = 0u32;
        let mut told_systemd = false;
        // A new worker a worker under --worker-user asked for on the
        // notify socket (it cannot signal root): `Some(same_binary)`.
        let mut asked: Option<bool> = None;
        let mut buf = [0u8; 512];
        loop {
            let serve_by = current
                .as_ref()
                .filter(|w| !w.ready)
                .and_then(|w| w.serve_by);
            tokio::select! {
                status = exited(&mut current) => {
                    let mut worker = current.take().expect("waited on it");
                    let how = describe(status);
                    if stopping {
                        tracing::info!(pid = worker.pid, "worker {how}; supervisor stopping");
                        worker.relayed().await;
                        for mut other in retiring.take().into_iter().chain(candidate.take().map(|c| c.worker)) {
                            other.wait().await;
                        }
                        return Ok(status.code().unwrap_or(1));
                    }
                    if let Some(mut abandoned) = candidate.take() {
                        tracing::warn!(pid = abandoned.worker.pid, "the serving worker died during a self-upgrade: the new worker is stopped, and a worker from the binary that served replaces both");
                        kill(abandoned.worker.pid);
                        abandoned.worker.wait().await;
                    }
                    if worker.upgrade && !worker.ready {
                        // The old worker has handed over already: one from
                        // the binary that served takes over.
                        let failed = worker.failure(how.clone()).await;
                        tracing::error!("{}; a worker from the binary that served takes over", failed.message());
                        unrecorded = Some(failed);
                    } else if !worker.ready && !kept.served && status.signal().is_none() && retiring.is_none() {
                        // Its own last line on stderr said why: it stays the last.
                        tracing::debug!(pid = worker.pid, "the worker {how} before it served; stopping");
                        worker.relayed().await;
                        return Ok(status.code().unwrap_or(1));
                    }
                    let crashed = !worker.upgrade || worker.ready;
                    failures_before_ready = if worker.ready || worker.upgrade { 0 } else { failures_before_ready + 1 };
                    let backoff = backoff(failures_before_ready);
                    if crashed {
                        tracing::error!(
                            pid = worker.pid,
                            lived_ms = worker.started.elapsed().as_millis() as u64,
                            backoff_ms = backoff.as_millis() as u64,
                            "the worker {how}; starting another on the permanent release"
                        );
                        restarts += 1;
                    }
                    tokio::time::sleep(backoff).await;
                    let start = || Start {
                        previous_exit: crashed.then(|| how.clone()),
                        store_wait: retiring.is_some(),
                        restarts,
                        failed_restart: unrecorded.clone(),
                        ..Start::default()
                    };
                    // Spawning from a kept binary only fails for want of
                    // resources (or, under --worker-user, secrets that
                    // cannot be read, logged): try again rather than leave
                    // nothing serving.
                    let mut pause = Duration::from_millis(50);
                    current = loop {
                        match self.spawn(Binary::Kept(&kept.binary), &notify_name, start()) {
                            Ok(worker) => break Some(worker),
                            Err(e) => {
                                tracing::error!(error = %e, "cannot start a worker; trying again");
                                tokio::time::sleep(pause).await;
                                pause = (pause * 2).min(MAX_BACKOFF);
                            }
                        }
                    };
                }
                heard = next(&mut candidate) => {
                    let mut new = candidate.take().expect("heard from it");
                    match heard {
                        // Killed by the stop already.
                        Heard::Ready | Heard::TimedOut if stopping => {}
                        Heard::Ready => {
                            let old = current.take().expect("a restart starts beside a serving worker");
                            tracing::info!(new = new.worker.pid, old = old.pid, "self-upgrade: the new worker is ready to take over; the serving one hands over");
                            if !old.tell(&Message::HandOver(new.state)) {
                                // Adopted from a supervisor without channels
                                // (or its channel broke): it stops as on
                                // SIGTERM, and the new worker starts from the
                                // store once it has let go.
                                terminate(old.pid);
                            }
                            retiring = Some(old);
                            new.worker.serve_by = Some(Instant::now() + STANDBY_LIMIT);
                            current = Some(new.worker);
                        }
                        Heard::TimedOut => {
                            tracing::error!(pid = new.worker.pid, "the new worker did not get ready to take over within {} s; stopping it", STANDBY_LIMIT.as_secs());
                            kill(new.worker.pid);
                            new.timed_out = true;
                            candidate = Some(new);
                        }
                        Heard::Exited(status) if stopping => {
                            tracing::info!(pid = new.worker.pid, "the new worker {}; supervisor stopping", describe(status));
                        }
                        Heard::Exited(status) => {
                            let exit = if new.timed_out {
                                format!("did not get ready to take over within {} s", STANDBY_LIMIT.as_secs())
                            } else {
                                describe(status)
                            };
                            let failed = new.worker.failure(exit).await;
                            tracing::error!("{}; the serving worker goes on", failed.message());
                            if let Some(serving) = &current {
                                serving.tell(&Message::RestartFailed(failed));
                            }
                        }
                    }
                }
                () = until(serve_by), if !stopping => {
                    let worker = current.as_mut().expect("has a deadline");
                    worker.serve_by = None;
                    tracing::error!(pid = worker.pid, "the new worker took over but did not serve within {} s; stopping it (a worker from the binary that served replaces it)", STANDBY_LIMIT.as_secs());
                    kill(worker.pid);
                }
                status = exited(&mut retiring) => {
                    let worker = retiring.take().expect("waited on it");
                    tracing::info!(pid = worker.pid, "the previous worker {}", describe(status));
                }
                received = notify.async_io(Interest::READABLE, || receive_notify(notify.as_fd(), &mut buf)) => {
                    let (n, sender) = received?;
                    let message = String::from_utf8_lossy(&buf[..n]);
                    // Anyone on this machine can send to the abstract
                    // socket: only the current worker's own word counts.
                    let from_worker = |w: &&mut Worker| sender == Some(w.pid);
                    if current.as_mut().filter(from_worker).is_some() {
                        for line in message.lines() {
                            match line {
                                "NINE9S_RESTART=disk" => asked = Some(false),
                                "NINE9S_RESTART=same" => asked = Some(true),
                                _ => {}
                            }
                        }
                    }
                    if let Some(worker) = current.as_mut().filter(from_worker).filter(|_| message.lines().any(|l| l == "READY=1")) {
                        if !worker.ready {
                            worker.ready = true;
                            failures_before_ready = 0;
                            unrecorded = None;
                            match keep(Path::new(&format!("/proc/{}/exe", worker.pid))) {
                                Ok(binary) => kept = Kept { binary, served: true },
                                Err(e) => tracing::warn!(error = %e, "cannot keep the serving worker's binary; the one before stays kept"),
                            }
                            if worker.upgrade {
                                tracing::info!(pid = worker.pid, "self-upgrade done: the new worker serves");
                            } else {
                                tracing::info!(pid = worker.pid, "worker serving");
                            }
                            if !told_systemd {
                                told_systemd = true;
                                notify_ready();
                            }
                        }
                    }
                }
                _ = reexec.recv(), if !stopping && candidate.is_none() && retiring.is_none() && serving(&current) => {
                    let worker = current.as_ref().expect("serving");
                    match self.check(&self.exe).await {
                        Ok(binary) => {
                            let error = self.reexec(&binary, worker, restarts);
                            tracing::error!(%error, "cannot re-execute the supervisor; it goes on as it is");
                        }
                        Err(failed) => {
                            tracing::error!("{}; the supervisor goes on as it is", failed.message());
                            worker.tell(&Message::RestartFailed(failed));
                        }
                    }
                }
                _ = term.recv() => stopping = stop(&current, &retiring, &candidate),
                _ = interrupt.recv() => stopping = stop(&current, &retiring, &candidate),
                same_binary = restart_asked(&mut hangup, &mut renew, &mut asked), if !stopping && candidate.is_none() && retiring.is_none() && serving(&current) => {
                    let serving = current.as_ref().expect("serving");
                    let binary = if same_binary {
                        tracing::info!(pid = serving.pid, "replacing the worker from the binary that serves");
                        Binary::Kept(&kept.binary)
                    } else {
                        tracing::info!(pid = serving.pid, "self-upgrade: starting a new worker from {}", self.exe.display());
                        Binary::Path(&self.exe)
                    };
                    let spawned = UnixStream::pair().and_then(|(old_end, new_end)| {
                        let start = Start {
                            store_wait: true,
                            state: Some(new_end.into()),
                            restarts,
                            ..Start::default()
                        };
                        let worker = self.spawn(binary, &notify_name, start)?;
                        Ok((worker, OwnedFd::from(old_end)))
                    });
                    match spawned {
                        Ok((mut worker, state)) => {
                            worker.upgrade = true;
                            candidate = Some(Candidate {
                                worker,
                                state,
                                deadline: Instant::now() + STANDBY_LIMIT,
                                timed_out: false,
                            });
                        }
                        Err(e) => {
                            let failed = FailedRestart {
                                pid: 0,
                                exit: format!("could not be started from {}: {e}", self.exe.display()),
                                stderr: Vec::new(),
                                at_ms: crate::model::now_ms(),
                                supervisor: false,
                            };
                            tracing::error!("{}; the serving worker goes on", failed.message());
                            serving.tell(&Message::RestartFailed(failed));
                        }
                    }
                }
            }
        }
    }

    /// Has the binary at `path` check the flags (`agent FLAGS check`)
    /// within [`CHECK_LIMIT`]; returns it open, as checked, or how it failed.
    async fn check(&self, path: &Path) -> Result<OwnedFd, FailedRestart> {
        let failed = |pid, exit: String, stderr: Vec<String>| FailedRestart {
            pid,
            exit,
            stderr,
            at_ms: crate::model::now_ms(),
            supervisor: true,
        };
        let binary = keep(path).map_err(|e| {
            failed(
                0,
                format!("cannot be opened at {}: {e}", path.display()),
                Vec::new(),
            )
        })?;
        // The binary opened is the one checked, whatever the path says
        // meanwhile: run through fd 3 of the child.
        let mut command = Command::new("/proc/self/fd/3");
        command
            .arg0(path)
            .args(&self.args)
            .arg("check")
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_FDNAMES")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mapped = binary
            .try_clone()
            .map_err(|e| failed(0, format!("cannot be run: {e}"), Vec::new()))?;
        command
            .as_std_mut()
            .fd_mappings(vec![FdMapping {
                parent_fd: mapped,
                child_fd: 3,
            }])
            .map_err(|e| failed(0, format!("cannot be run: {e}"), Vec::new()))?;
        let child = command
            .spawn()
            .map_err(|e| failed(0, format!("cannot be run: {e}"), Vec::new()))?;
        let pid = child.id().unwrap_or(0);
        let output = match tokio::time::timeout(CHECK_LIMIT, child.wait_with_output()).await {
            Ok(Ok(output)) => output,
            Ok(Err(e)) => {
                return Err(failed(
                    pid,
                    format!("could not be waited for: {e}"),
                    Vec::new(),
                ))
            }
            Err(_) => {
                return Err(failed(
                    pid,
                    format!("did not check the flags within {} s", CHECK_LIMIT.as_secs()),
                    Vec::new(),
                ))
            }
        };
        if !output.status.success() {
            let mut tail = Tail::default();
            tail.push(&output.stderr);
            return Err(failed(pid, describe(output.status), tail.lines()));
        }
        Ok(binary)
    }

    /// Replaces this process's image with `binary` (the one just checked,
    /// still at the path), keeping its pid, the listeners (passed as
    /// `LISTEN_FDS`), the count of restarts and the serving worker, which
    /// stays its child (named in an [`Adoption`] on the new image's
    /// `nine9s-birth` socket), with its channel and stderr. Only returns
    /// if that failed.
    fn reexec(&self, binary: &OwnedFd, worker: &Worker, restarts: u64) -> std::io::Error {
        use std::os::unix::process::CommandExt as _;
        tracing::info!(
            pid = worker.pid,
            "SIGUSR2: re-executing the supervisor from {}",
            self.exe.display()
        );
        // A script would need the fd it is read from past the exec: the
        // path is run, once it is seen to be the file checked.
        match (std::fs::metadata(&self.exe), rustix::fs::fstat(binary)) {
            (Ok(path), Ok(checked))
                if path.dev() == checked.st_dev && path.ino() == checked.st_ino => {}
            _ => {
                return std::io::Error::other(format!(
                    "{} changed while it was checked; send SIGUSR2 again",
                    self.exe.display()
                ))
            }
        }
        let mut command = std::process::Command::new(&self.exe);
        command.args(&self.args).env_remove("LISTEN_PID");
        // Written whole now: this end closes with the exec, and the new
        // image reads to the end.
        let adoption = Birth::Supervisor(Adoption {
            worker: worker.pid,
            restarts,
        });
        let mut extras = match birth::pair()
            .and_then(|(here, there)| birth::write_now(&adoption, here).map(|()| there))
        {
            Ok(there) => vec![(channel::BIRTH, there)],
            Err(e) => return e,
        };
        let passed = |fd: std::os::fd::BorrowedFd<'_>| fd.try_clone_to_owned();
        if let Some(channel) = &worker.channel {
            match passed(channel.as_fd()) {
                Ok(fd) => extras.push((channel::ADOPTED_CHANNEL, fd)),
                Err(e) => return e,
            }
        }
        if let Some(relay) = &worker.stderr {
            match passed(relay.socket.as_fd()) {
                Ok(fd) => extras.push((channel::ADOPTED_STDERR, fd)),
                Err(e) => return e,
            }
        }
        if let Err(e) = self.pass_fds(&mut command, extras) {
            return e;
        }
        command.exec()
    }

    /// The worker a previous image of this supervisor was running, and the
    /// restarts it counted, if this one was re-executed (SIGUSR2): as its
    /// start message says, once that worker is seen to be this process's
    /// child.
    fn adopted(&mut self) -> std::io::Result<Option<(Worker, u64)>> {
        let Some(socket) = self.birth.take() else {
            return Ok(None);
        };
        let Adoption {
            worker: pid,
            restarts,
        } = birth::adoption(socket).map_err(std::io::Error::other)?;
        let worker = Worker {
            child: None,
            pid,
            started: Instant::now(),
            ready: true,
            upgrade: false,
            serve_by: None,
            channel: self.adopted_channel.take().map(Channel::new).transpose()?,
            stderr: self.adopted_stderr.take().map(Relay::start).transpose()?,
        };
        Ok(Some((worker, restarts)))
    }

    /// Starts a worker on the listeners, with its channel and its stderr
    /// through this process.
    fn spawn(&self, binary: Binary<'_>, notify: &str, start: Start) -> std::io::Result<Worker> {
        let program = match binary {
            Binary::Path(path) => path.to_owned(),
            // An ELF binary that served: the kernel opens it before the
            // exec closes the fd.
            Binary::Kept(fd) => PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd())),
        };
        let mut command = Command::new(program);
        // The flags first: they are the top-level command's.
        command
            .arg0(&self.exe)
            .args(&self.args)
            .arg("worker")
            .env_remove("LISTEN_PID")
            .env("NOTIFY_SOCKET", notify)
            .kill_on_drop(true);
        // Read as root now, as the worker read them itself before: a
        // tokens file changed since the last worker is taken.
        let secrets = match &self.worker_user {
            Some(user) => {
                let handed = crate::worker_user::gather(&self.secrets)
                    .map_err(|e| std::io::Error::other(e.to_string()))?;
                // setgid, setgroups(0) and setuid in the child before the
                // exec: no capabilities survive them.
                command.gid(user.gid).uid(user.uid);
                Some(handed)
            }
            None => None,
        };
        let told = Birth::Worker(Box::new(WorkerBirth {
            supervisor: std::process::id(),
            restarts: start.restarts,
            previous_exit: start.previous_exit,
            failed_restart: start.failed_restart,
            store_wait: start.store_wait,
            secrets,
        }));
        let (channel_here, channel_there) = channel::pair()?;
        let (stderr_here, stderr_there) = UnixStream::pair()?;
        let (birth_here, birth_there) = birth::pair()?;
        command.stderr(Stdio::from(OwnedFd::from(stderr_there)));
        let mut extras = vec![
            (channel::CHANNEL, channel_there),
            (channel::BIRTH, birth_there),
        ];
        extras.extend(start.state.map(|state| (channel::STATE, state)));
        self.pass_fds(command.as_std_mut(), extras)?;
        let child = command.spawn()?;
        birth::hand(&told, birth_here)?;
        let pid = child.id().unwrap_or(0);
        tracing::info!(pid, "worker started");
        Ok(Worker {
            child: Some(child),
            pid,
            started: Instant::now(),
            ready: false,
            upgrade: false,
            serve_by: None,
            channel: Some(Channel::new(channel_here)?),
            stderr: Some(Relay::start(stderr_here.into())?),
        })
    }

    /// Hands the listeners to `command` as fds 3, 4 (and 5, 6), then the
    /// local control socket and `extras`, all named in `LISTEN_FDS` and
    /// `LISTEN_FDNAMES`.
    fn pass_fds(
        &self,
        command: &mut std::process::Command,
        extras: Vec<(&str, OwnedFd)>,
    ) -> std::io::Result<()> {
        let mut listeners = vec![("http", &self.http), ("grpc", &self.grpc)];
        listeners.extend(self.metrics.iter().map(|m| ("metrics", m)));
        listeners.extend(self.health.iter().map(|h| ("health", h)));
        let mut named = Vec::with_capacity(listeners.len() + extras.len() + 1);
        for (name, listener) in listeners {
            named.push((name, OwnedFd::from(listener.try_clone()?)));
        }
        named.push((channel::CONTROL, OwnedFd::from(self.control.try_clone()?)));
        named.extend(extras);
        let names: Vec<&str> = named.iter().map(|(name, _)| *name).collect();
        let mappings = (3..)
            .zip(named)
            .map(|(child_fd, (_, parent_fd))| FdMapping {
                parent_fd,
                child_fd,
            })
            .collect();
        command
            .env("LISTEN_FDS", names.len().to_string())
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
    if std::env::var_os("NOTIFY_SOCKET").is_some() {
        let _ = notify("READY=1\n");
    }
}

/// Sends `message` to the service manager on `$NOTIFY_SOCKET`.
pub fn notify(message: &str) -> std::io::Result<()> {
    let target = std::env::var_os("NOTIFY_SOCKET")
        .ok_or_else(|| std::io::Error::other("no NOTIFY_SOCKET to tell the supervisor on"))?;
    let socket = StdDatagram::unbound()?;
    let target = target.to_string_lossy().into_owned();
    match target.strip_prefix('@') {
        Some(name) => socket.connect_addr(&UnixAddr::from_abstract_name(name.as_bytes())?)?,
        None => socket.connect(&target)?,
    }
    socket.send(message.as_bytes()).map(|_| ())
}

/// The supervisor's end of the workers' `sd_notify`: an abstract Unix
/// socket only this supervisor's workers are told of — but any local user
/// can find and send to it, so it takes the sender's credentials from the
/// kernel (`SO_PASSCRED`), and only the worker's pid counts.
fn bind_notify() -> std::io::Result<(UnixDatagram, String)> {
    let mut nonce = [0u8; 8];
    let _ = rustix::rand::getrandom(&mut nonce, rustix::rand::GetRandomFlags::empty());
    let name = format!("nine9s-{}-{}", std::process::id(), hex::encode(nonce));
    let socket = StdDatagram::bind_addr(&UnixAddr::from_abstract_name(name.as_bytes())?)?;
    rustix::net::sockopt::set_socket_passcred(&socket, true)?;
    socket.set_nonblocking(true)?;
    // sd_notify's convention: a leading '@' names an abstract socket.
    Ok((UnixDatagram::from_std(socket)?, format!("@{name}")))
}

/// One datagram from the notify socket, and the pid of the process that
/// sent it as the kernel tells (a sender can only claim its own pid,
/// unless it is root).
fn receive_notify(socket: BorrowedFd<'_>, buf: &mut [u8]) -> std::io::Result<(usize, Option<u32>)> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmCredentials(1))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let received = rustix::net::recvmsg(
        socket,
        &mut [IoSliceMut::new(buf)],
        &mut control,
        RecvFlags::DONTWAIT | RecvFlags::CMSG_CLOEXEC,
    )?;
    let mut sender = None;
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmCredentials(credentials) = message {
            sender = u32::try_from(credentials.pid.as_raw_nonzero().get()).ok();
        }
    }
    Ok((received.bytes, sender))
}

/// Returns at `deadline`; never without one.
async fn until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline.into()).await,
        None => pending().await,
    }
}

/// Waits for a restart to be asked: SIGHUP (a self-upgrade, from the
/// binary on disk: `false`) or SIGUSR1 (a new worker from the binary that
/// serves: `true`), or the same asked on the notify socket.
async fn restart_asked(
    hangup: &mut tokio::signal::unix::Signal,
    renew: &mut tokio::signal::unix::Signal,
    asked: &mut Option<bool>,
) -> bool {
    if let Some(same_binary) = asked.take() {
        return same_binary;
    }
    tokio::select! {
        _ = hangup.recv() => false,
        _ = renew.recv() => true,
    }
}

async fn exited(worker: &mut Option<Worker>) -> ExitStatus {
    match worker {
        Some(worker) => worker.wait().await,
        None => pending().await,
    }
}

async fn next(candidate: &mut Option<Candidate>) -> Heard {
    match candidate {
        Some(candidate) => candidate.next().await,
        None => pending().await,
    }
}

/// A worker serves (and nothing else is changing hands).
fn serving(current: &Option<Worker>) -> bool {
    current.as_ref().is_some_and(|w| w.ready)
}

/// Asks the workers to stop; returns true. A new worker that has not
/// taken over yet is killed: it never served, and it may be waiting for a
/// state that will not come.
fn stop(
    current: &Option<Worker>,
    retiring: &Option<Worker>,
    candidate: &Option<Candidate>,
) -> bool {
    for worker in current.iter().chain(retiring) {
        terminate(worker.pid);
    }
    if let Some(candidate) = candidate {
        kill(candidate.worker.pid);
    }
    true
}

fn terminate(pid: u32) {
    signal_pid(pid, rustix::process::Signal::TERM);
}

fn kill(pid: u32) {
    signal_pid(pid, rustix::process::Signal::KILL);
}

fn signal_pid(pid: u32, signal: rustix::process::Signal) {
    if let Some(pid) = rustix::process::Pid::from_raw(pid as i32) {
        let _ = rustix::process::kill_process(pid, signal);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tail_keeps_the_last_lines_each_bounded() {
        let mut tail = Tail::default();
        for i in 0..30 {
            tail.push(format!("line {i}\n").as_bytes());
        }
        tail.push(b"half a ");
        tail.push(b"line");
        let lines = tail.lines();
        assert_eq!(lines.len(), TAIL_LINES + 1);
        assert_eq!(lines[0], "line 10");
        assert_eq!(lines.last().unwrap(), "half a line");
        let mut long = Tail::default();
        long.push(&vec![b'x'; 3 * TAIL_LINE_BYTES]);
        assert!(long.lines().iter().all(|l| l.len() <= TAIL_LINE_BYTES));
    }

    #[tokio::test]
    async fn the_notify_socket_tells_who_sent_a_datagram() {
        let (notify, name) = bind_notify().unwrap();
        let address =
            UnixAddr::from_abstract_name(name.trim_start_matches('@').as_bytes()).unwrap();
        let mut buf = [0u8; 64];
        // From this process: its pid, whatever it claims.
        let sender = StdDatagram::unbound().unwrap();
        sender.send_to_addr(b"READY=1\n", &address).unwrap();
        let (n, pid) = notify
            .async_io(Interest::READABLE, || {
                receive_notify(notify.as_fd(), &mut buf)
            })
            .await
            .unwrap();
        assert_eq!(&buf[..n], b"READY=1\n");
        assert_eq!(pid, Some(std::process::id()));
        // From another process (a shell's `sd_notify` would do the same):
        // its own pid, which is not this one.
        let python = std::process::Command::new("python3")
            .arg("-c")
            .arg(format!(
                "import socket; s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); s.sendto(b'READY=1', '\\0{}'); import os; print(os.getpid())",
                name.trim_start_matches('@')
            ))
            .output();
        let Ok(output) = python else { return };
        if !output.status.success() {
            return;
        }
        let other: u32 = String::from_utf8_lossy(&output.stdout)
            .trim()
            .parse()
            .unwrap();
        let (_, pid) = notify
            .async_io(Interest::READABLE, || {
                receive_notify(notify.as_fd(), &mut buf)
            })
            .await
            .unwrap();
        assert_eq!(pid, Some(other));
        assert_ne!(pid, Some(std::process::id()));
    }

    #[test]
    fn back_off_doubles_to_its_bound() {
        assert_eq!(backoff(0), Duration::ZERO);
        assert_eq!(backoff(1), Duration::from_millis(100));
        assert_eq!(backoff(3), Duration::from_millis(400));
        assert_eq!(backoff(30), MAX_BACKOFF);
    }
}
