//! The processes the bench drives: finding the built binaries, plugin
//! libraries and release directories; starting and stopping the agent and
//! the bare server; running `ctl`; reading the agent's memory, CPU time,
//! mapped libraries and HTTP connections from `/proc`; raising the
//! open-file limit. Every child is killed when its handle is
//! dropped, so an error or a panic leaves no process behind.
//!
//! The pid the bench spawns is the agent's **supervisor**, which holds the
//! sockets and runs no plugin code; the agent proper runs in its
//! **worker** child (`agent FLAGS worker`), found through
//! `/proc/SUPERVISOR/task/SUPERVISOR/children`. Everything measured is
//! measured on the worker. A SIGKILL goes to the supervisor, and the
//! worker dies with it (`PR_SET_PDEATHSIG`) — a moment later: waiting for
//! a killed agent also waits until its worker is gone, since the next
//! agent on the same data dir needs the store's lock it held.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use nine9s_proto::control_client::ControlClient;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::Channel;

use crate::bare::Baseline;

const BUILD_FIRST: &str = "build first: cargo build --release --workspace";
/// Boot writes the embedded release and opens the store; generous for a
/// loaded 2-core machine.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// The agent's own shutdown grace is 10 s; its connections are idle by then.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);

/// How long a killed agent's worker may take to be gone.
const WORKER_GONE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the build put what the bench runs.
pub struct Layout {
    pub bench: PathBuf,
    pub agent: PathBuf,
    pub ctl: PathBuf,
    /// `(release directory, library)` of 0.2.0 and of 0.3.0.
    pub releases: [(PathBuf, PathBuf); 2],
    /// The workspace (where `plugins/` is) and the build's directory.
    root: PathBuf,
    dir: PathBuf,
}

impl Layout {
    /// Looks next to the bench's executable, and for `plugins/` in the
    /// directories above it.
    pub fn find() -> anyhow::Result<Layout> {
        let bench = std::env::current_exe().context("cannot find the bench's own executable")?;
        let dir = bench
            .parent()
            .ok_or_else(|| anyhow!("{} has no directory", bench.display()))?;
        let existing = |path: PathBuf| {
            if path.is_file() {
                Ok(path)
            } else {
                Err(anyhow!("{} is missing; {BUILD_FIRST}", path.display()))
            }
        };
        let root = dir
            .ancestors()
            .find(|d| d.join("plugins/nine9s-0.2.0/release.toml").is_file())
            .ok_or_else(|| {
                anyhow!(
                    "no plugins/nine9s-0.2.0 in any directory above {}: run the bench from its workspace's target/release; {BUILD_FIRST}",
                    dir.display()
                )
            })?;
        let release = |version: &str| -> anyhow::Result<(PathBuf, PathBuf)> {
            let release_dir = root.join(format!("plugins/nine9s-{version}"));
            existing(release_dir.join("release.toml"))?;
            let library =
                existing(dir.join(format!("libnine9s_{}.so", version.replace('.', "_"))))?;
            Ok((release_dir, library))
        };
        Ok(Layout {
            agent: existing(dir.join("agent"))?,
            ctl: existing(dir.join("ctl"))?,
            releases: [release("0.2.0")?, release("0.3.0")?],
            root: root.to_owned(),
            dir: dir.to_owned(),
            bench,
        })
    }

    /// `(release directory, library)` of the test fixture nine9s 0.2.8
    /// (`tests/plugins/segfault`), whose `GET /crash` segfaults the worker.
    pub fn segfault_release(&self) -> anyhow::Result<(PathBuf, PathBuf)> {
        self.built("tests/plugins/segfault", "libfixture_segfault.so")
    }

    /// `(release directory, library)` of the README's async release
    /// myservice 0.1.0.
    pub fn myservice_release(&self) -> anyhow::Result<(PathBuf, PathBuf)> {
        self.built("plugins/myservice-0.1.0", "libmyservice_0_1_0.so")
    }

    /// `(release directory, library)` of the bench fixture `bytes`
    /// (`tests/plugins/bytes`), whose `GET /bytes/{n}` streams n bytes.
    pub fn bytes_release(&self) -> anyhow::Result<(PathBuf, PathBuf)> {
        self.built("tests/plugins/bytes", "libfixture_bytes.so")
    }

    /// The release directory `dir` of the workspace and the library the
    /// build put next to the bench, both there.
    fn built(&self, dir: &str, library: &str) -> anyhow::Result<(PathBuf, PathBuf)> {
        let release_dir = self.root.join(dir);
        let library = self.dir.join(library);
        for path in [release_dir.join("release.toml"), library.clone()] {
            if !path.is_file() {
                bail!("{} is missing; {BUILD_FIRST}", path.display());
            }
        }
        Ok((release_dir, library))
    }
}

/// A process as `/proc` knows it: its pid and its start time (in clock
/// ticks after boot), which together never name another process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcId {
    pub pid: u32,
    start: u64,
}

impl ProcId {
    /// The process `pid` if it lives (a zombie does not).
    pub fn of(pid: u32) -> Option<ProcId> {
        let stat = Stat::read(pid).ok()?;
        (!stat.dead()).then_some(ProcId {
            pid,
            start: stat.start,
        })
    }

    /// The process has ended: no such pid, another process under it, or
    /// a zombie — which has closed its files, so its locks are free.
    pub fn gone(&self) -> bool {
        ProcId::of(self.pid) != Some(*self)
    }

    /// Waits until [`ProcId::gone`], polling every millisecond.
    pub async fn wait_gone(&self, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        while !self.gone() {
            if Instant::now() >= deadline {
                bail!("process {} still runs after {within:?}", self.pid);
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        Ok(())
    }
}

/// What the bench reads of `/proc/PID/stat`.
struct Stat {
    /// One letter: R, S, D, Z, X...
    state: char,
    /// utime + stime, in clock ticks.
    cpu_ticks: u64,
    /// Start time after boot, in clock ticks.
    start: u64,
}

impl Stat {
    fn read(pid: u32) -> anyhow::Result<Stat> {
        let path = format!("/proc/{pid}/stat");
        let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        // Fields after the command name, which is in parentheses and may hold spaces.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        // `fields` starts at the 3rd field (state); utime, stime and
        // starttime are the 14th, 15th and 22nd.
        let number = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
        let state = fields.first().and_then(|s| s.chars().next());
        let (Some(state), Some(user), Some(system), Some(start)) =
            (state, number(11), number(12), number(19))
        else {
            bail!("cannot parse {path}");
        };
        Ok(Stat {
            state,
            cpu_ticks: user + system,
            start,
        })
    }

    fn dead(&self) -> bool {
        matches!(self.state, 'Z' | 'X' | 'x')
    }
}

/// The live children of `pid`'s main thread, oldest first.
fn children(pid: u32) -> anyhow::Result<Vec<ProcId>> {
    let path = format!("/proc/{pid}/task/{pid}/children");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let mut children: Vec<ProcId> = text
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .filter_map(ProcId::of)
        .collect();
    children.sort_by_key(|c| c.start);
    Ok(children)
}

/// The real agent, started on port 0 with its data in a directory of ours:
/// the supervisor we spawned, and through it its worker.
pub struct AgentProcess {
    child: Child,
    /// The supervisor's.
    pid: u32,
    /// The workers noted just before a SIGKILL, to wait for.
    dying: Vec<ProcId>,
    pub http: SocketAddr,
    pub grpc: SocketAddr,
    data: PathBuf,
    artifacts: PathBuf,
    log: PathBuf,
}

impl AgentProcess {
    /// Starts the agent on `dir/data` and waits up to `ready_within` for
    /// its ready line. Its log goes to `dir/agent.log`, appended, so the
    /// crash loop's restarts on one data dir keep the whole story.
    pub async fn start(
        agent: &Path,
        dir: &Path,
        ready_within: Duration,
    ) -> anyhow::Result<AgentProcess> {
        AgentProcess::start_with(agent, dir, ready_within, &[]).await
    }

    /// [`AgentProcess::start`] with extra flags.
    pub async fn start_with(
        agent: &Path,
        dir: &Path,
        ready_within: Duration,
        extra: &[&str],
    ) -> anyhow::Result<AgentProcess> {
        let data = dir.join("data");
        let log = dir.join("agent.log");
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let mut child = Command::new(agent)
            .arg("--data-dir")
            .arg(&data)
            .args(["--http", "127.0.0.1:0", "--grpc", "127.0.0.1:0"])
            // The bench reads the state through `/count`, not from snapshots.
            .args(["--checkpoint-every", "1h"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log_file)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", agent.display()))?;
        let pid = child
            .id()
            .ok_or_else(|| anyhow!("the agent exited at once"))?;
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout is piped"));
        let mut line = String::new();
        let read = tokio::time::timeout(ready_within, stdout.read_line(&mut line)).await;
        let ready = match read {
            Ok(Ok(n)) if n > 0 => parse_ready(line.trim_end()),
            Ok(Ok(_)) => Err(anyhow!("the agent exited before it was ready")),
            Ok(Err(e)) => Err(anyhow!("cannot read the agent's stdout: {e}")),
            Err(_) => Err(anyhow!("the agent was not ready within {ready_within:?}")),
        };
        let (http, grpc) = match ready {
            Ok(addresses) => addresses,
            Err(e) => {
                // Reaped here, not just signalled on drop: the next agent
                // may want the same data dir, and sled locks it.
                let workers = children(pid).unwrap_or_default();
                let _ = child.start_kill();
                let _ = child.wait().await;
                for worker in workers {
                    let _ = worker.wait_gone(WORKER_GONE_TIMEOUT).await;
                }
                bail!("{e}\n{}", log_tail(&log));
            }
        };
        // Keeps the pipe open and empty should the agent print more.
        tokio::spawn(async move { tokio::io::copy(&mut stdout, &mut tokio::io::sink()).await });
        // /proc shows the library paths with symlinks resolved.
        let data = data.canonicalize().unwrap_or(data);
        let artifacts = data.join("artifacts");
        Ok(AgentProcess {
            child,
            pid,
            dying: Vec::new(),
            http,
            grpc,
            data,
            artifacts,
            log,
        })
    }

    pub fn grpc_url(&self) -> String {
        format!("http://{}", self.grpc)
    }

    /// Its local control socket, as ctl's `--agent` takes it (no token).
    pub fn local(&self) -> String {
        format!("unix:{}", self.data.join("control.sock").display())
    }

    /// The admin token the agent created in its data dir.
    pub fn token_file(&self) -> PathBuf {
        self.data.join("admin.token")
    }

    /// A gRPC client that sends the agent's admin token with every call.
    pub async fn client(&self) -> anyhow::Result<Client> {
        let token = std::fs::read_to_string(self.token_file())
            .with_context(|| format!("cannot read {}", self.token_file().display()))?;
        let header = format!("Bearer {}", token.trim())
            .parse()
            .context("the admin token is not a header value")?;
        let channel = Channel::from_shared(self.grpc_url())?.connect().await?;
        Ok(ControlClient::with_interceptor(channel, Bearer(header)))
    }

    /// The supervisor's pid: the process the bench spawned.
    pub fn supervisor_pid(&self) -> u32 {
        self.pid
    }

    /// The worker serving now: the supervisor's youngest child (during a
    /// self-upgrade the retiring worker is the older one).
    pub fn worker(&self) -> anyhow::Result<ProcId> {
        children(self.pid)?
            .pop()
            .ok_or_else(|| anyhow!("the agent's supervisor {} has no worker", self.pid))
    }

    /// The pid of the worker serving now.
    pub fn worker_pid(&self) -> anyhow::Result<u32> {
        Ok(self.worker()?.pid)
    }

    /// CPU time the agent's worker has used so far, user and system.
    pub fn cpu(&self) -> anyhow::Result<Duration> {
        cpu_time(self.worker_pid()?)
    }

    /// The HTTP connections the worker has accepted and holds open: its
    /// sockets (`/proc/PID/fd`) that `/proc/PID/net/tcp` shows established
    /// on the HTTP port.
    pub fn http_connections(&self) -> anyhow::Result<usize> {
        let pid = self.worker_pid()?;
        let path = format!("/proc/{pid}/fd");
        let held: HashSet<String> = std::fs::read_dir(&path)
            .with_context(|| format!("reading {path}"))?
            .filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
            .filter_map(|target| {
                let inode = target
                    .to_str()?
                    .strip_prefix("socket:[")?
                    .strip_suffix(']')?;
                Some(inode.to_owned())
            })
            .collect();
        let path = format!("/proc/{pid}/net/tcp");
        let table = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        let port = format!(":{:04X}", self.http.port());
        // sl, local address, remote address, state, queues, timer,
        // retransmits, uid, timeout, inode; state 01 is ESTABLISHED.
        Ok(table
            .lines()
            .skip(1)
            .map(|line| line.split_whitespace().collect::<Vec<_>>())
            .filter(|fields| {
                fields.len() > 9
                    && fields[1].ends_with(&port)
                    && fields[3] == "01"
                    && held.contains(fields[9])
            })
            .count())
    }

    /// The worker's resident memory in KiB.
    pub fn rss_kib(&self) -> anyhow::Result<u64> {
        let path = format!("/proc/{}/status", self.worker_pid()?);
        let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .ok_or_else(|| anyhow!("no VmRSS in {path}"))
    }

    /// Distinct files under the data dir's `artifacts/` mapped by the
    /// worker.
    pub fn mapped_artifacts(&self) -> anyhow::Result<usize> {
        let path = format!("/proc/{}/maps", self.worker_pid()?);
        let maps = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        let mut mapped: Vec<&str> = maps
            .lines()
            .filter_map(|line| line.split_whitespace().nth(5))
            .filter(|file| Path::new(file).starts_with(&self.artifacts))
            .collect();
        mapped.sort_unstable();
        mapped.dedup();
        Ok(mapped.len())
    }

    /// Bytes on disk under the data dir, artifacts aside, in KiB: what the
    /// store has written, to set the memory growth against.
    pub fn store_kib(&self) -> anyhow::Result<u64> {
        fn size(dir: &Path, skip: &Path) -> std::io::Result<u64> {
            let mut total = 0;
            for entry in std::fs::read_dir(dir)? {
                let entry = entry?;
                let meta = entry.metadata()?;
                if meta.is_dir() {
                    if entry.path() != skip {
                        total += size(&entry.path(), skip)?;
                    }
                } else {
                    total += meta.len();
                }
            }
            Ok(total)
        }
        let bytes = size(&self.data, &self.artifacts)
            .with_context(|| format!("measuring {}", self.data.display()))?;
        Ok(bytes / 1024)
    }

    /// The end of the agent's log, for error messages.
    pub fn log_tail(&self) -> String {
        log_tail(&self.log)
    }

    /// The agent's whole log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Notes the workers now running, for [`AgentProcess::wait`] after a
    /// kill; [`AgentProcess::kill`] does it itself when nothing was noted,
    /// but a caller timing the kill to the microsecond does it beforehand.
    pub fn note_workers(&mut self) {
        self.dying = children(self.pid).unwrap_or_default();
    }

    /// SIGKILL to the supervisor, at once (its worker follows by
    /// PDEATHSIG); callable from a plain thread, which is how the crash
    /// loop times it to the microsecond.
    pub fn kill(&mut self) -> std::io::Result<()> {
        if self.dying.is_empty() {
            self.note_workers();
        }
        self.child.start_kill()
    }

    /// Waits for the supervisor to be gone (after [`AgentProcess::kill`]),
    /// then for its workers: a worker killed by PDEATHSIG may still hold
    /// the store's lock a moment after its supervisor was reaped.
    pub async fn wait(mut self) -> anyhow::Result<ExitStatus> {
        let status = self.child.wait().await?;
        for worker in std::mem::take(&mut self.dying) {
            worker
                .wait_gone(WORKER_GONE_TIMEOUT)
                .await
                .with_context(|| {
                    format!(
                        "the worker {} outlived its killed supervisor {}",
                        worker.pid, self.pid
                    )
                })?;
        }
        Ok(status)
    }

    /// SIGTERM, then waits for the clean shutdown (the supervisor stops
    /// its workers and waits for them); SIGKILL if it hangs.
    /// Stops the agent after a measurement, with its log's tail on stderr
    /// if the measurement failed: the measurement, and how the agent
    /// exited (for the report).
    pub async fn finish<T>(self, measured: anyhow::Result<T>) -> anyhow::Result<(T, String)> {
        if measured.is_err() {
            eprintln!("{}", self.log_tail());
        }
        crate::run::progress(format_args!("stopping the agent"));
        let stopped = self.stop().await;
        let measured = measured?;
        let exit = match stopped {
            Ok(status) => status.to_string(),
            Err(e) => format!("{e:#}"),
        };
        Ok((measured, exit))
    }

    pub async fn stop(mut self) -> anyhow::Result<ExitStatus> {
        // `kill(1)` because the bench forbids the unsafe a direct kill(2) needs.
        let signalled = Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status()
            .await
            .is_ok_and(|s| s.success());
        if signalled {
            if let Ok(status) = tokio::time::timeout(STOP_TIMEOUT, self.child.wait()).await {
                return Ok(status?);
            }
        }
        self.note_workers();
        self.child.start_kill()?;
        let status = self.wait().await?;
        if signalled {
            bail!("the agent did not stop within {STOP_TIMEOUT:?} of SIGTERM; killed");
        }
        Ok(status)
    }
}

fn parse_ready(line: &str) -> anyhow::Result<(SocketAddr, SocketAddr)> {
    let fields = line
        .strip_prefix("nine9s agent ready: ")
        .ok_or_else(|| anyhow!("unexpected first line from the agent: {line:?}"))?;
    let address = |key: &str| -> anyhow::Result<SocketAddr> {
        fields
            .split_whitespace()
            .find_map(|field| field.strip_prefix(key))
            .ok_or_else(|| anyhow!("no {key} in {line:?}"))?
            .parse()
            .with_context(|| format!("bad {key} in {line:?}"))
    };
    Ok((address("http=")?, address("grpc=")?))
}

/// Starts the agent on a data dir in a new temporary directory (named
/// after `what`), and says so on stderr.
pub async fn start_in_temp(
    layout: &Layout,
    what: &str,
) -> anyhow::Result<(tempfile::TempDir, AgentProcess)> {
    let temp = tempfile::Builder::new()
        .prefix(&format!("nine9s-{what}-"))
        .tempdir()
        .context("cannot create a temporary directory")?;
    crate::run::progress(format_args!("starting {}", layout.agent.display()));
    let agent = AgentProcess::start(&layout.agent, temp.path(), READY_TIMEOUT).await?;
    crate::run::progress(format_args!(
        "agent ready: http={} grpc={}, supervisor {}",
        agent.http,
        agent.grpc,
        agent.supervisor_pid()
    ));
    Ok((temp, agent))
}

/// Starts the agent with `release` (`(directory, library)`) as its
/// bootstrap, from a copy of both in a new temporary directory, so that it
/// serves the library the bench names rather than whichever build is
/// newest; `extra` flags besides.
pub async fn start_bootstrapped(
    layout: &Layout,
    what: &str,
    release: &(PathBuf, PathBuf),
    extra: &[&str],
) -> anyhow::Result<(tempfile::TempDir, AgentProcess)> {
    let temp = tempfile::Builder::new()
        .prefix(&format!("nine9s-{what}-"))
        .tempdir()
        .context("cannot create a temporary directory")?;
    let (dir, library) = release;
    let bootstrap = temp.path().join("release");
    std::fs::create_dir(&bootstrap)?;
    for (from, name) in [
        (
            dir.join("release.toml"),
            Some(std::ffi::OsStr::new("release.toml")),
        ),
        (library.clone(), library.file_name()),
    ] {
        let name = name.ok_or_else(|| anyhow!("{} has no file name", from.display()))?;
        std::fs::copy(&from, bootstrap.join(name))
            .with_context(|| format!("cannot copy {}", from.display()))?;
    }
    crate::run::progress(format_args!(
        "starting {} on {}",
        layout.agent.display(),
        dir.display()
    ));
    let mut flags = vec![
        "--bootstrap",
        bootstrap
            .to_str()
            .context("a temporary path is not UTF-8")?,
    ];
    flags.extend_from_slice(extra);
    let agent = AgentProcess::start_with(&layout.agent, temp.path(), READY_TIMEOUT, &flags).await?;
    crate::run::progress(format_args!(
        "agent ready: http={} grpc={}, supervisor {}",
        agent.http,
        agent.grpc,
        agent.supervisor_pid()
    ));
    Ok((temp, agent))
}

/// [`start_in_temp`] from a copy of the agent binary in the temporary
/// directory (returned), which the caller may then replace: what a
/// self-upgrade runs.
pub async fn start_copy_in_temp(
    layout: &Layout,
    what: &str,
) -> anyhow::Result<(tempfile::TempDir, AgentProcess, PathBuf)> {
    let temp = tempfile::Builder::new()
        .prefix(&format!("nine9s-{what}-"))
        .tempdir()
        .context("cannot create a temporary directory")?;
    let binary = temp.path().join("agent");
    std::fs::copy(&layout.agent, &binary)
        .with_context(|| format!("cannot copy {}", layout.agent.display()))?;
    crate::run::progress(format_args!("starting {}", binary.display()));
    let agent = AgentProcess::start(&binary, temp.path(), READY_TIMEOUT).await?;
    crate::run::progress(format_args!(
        "agent ready: http={} grpc={}, supervisor {}",
        agent.http,
        agent.grpc,
        agent.supervisor_pid()
    ));
    Ok((temp, agent, binary))
}

pub fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(15)..].join("\n");
    format!("agent log ({}), last lines:\n{tail}", log.display())
}

/// A baseline server: the bench's own binary under `--bare-server`.
pub struct BareServer {
    child: Child,
    pub addr: SocketAddr,
}

impl BareServer {
    /// The `Hello world!` server.
    pub async fn start(bench: &Path) -> anyhow::Result<BareServer> {
        BareServer::start_as(bench, Baseline::Hello).await
    }

    pub async fn start_as(bench: &Path, baseline: Baseline) -> anyhow::Result<BareServer> {
        let mut child = Command::new(bench)
            .arg("--bare-server")
            .args(baseline.arg())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {} --bare-server", bench.display()))?;
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout is piped"));
        let mut line = String::new();
        tokio::time::timeout(READY_TIMEOUT, stdout.read_line(&mut line))
            .await
            .context("the bare server did not start")??;
        let port: u16 = line
            .trim()
            .parse()
            .with_context(|| format!("the bare server printed {line:?}, not a port"))?;
        Ok(BareServer {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        })
    }

    /// CPU time the bare server has used so far, user and system.
    pub fn cpu(&self) -> anyhow::Result<Duration> {
        cpu_time(
            self.child
                .id()
                .ok_or_else(|| anyhow!("the bare server has exited"))?,
        )
    }

    /// Closes its stdin, which ends it.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        drop(self.child.stdin.take());
        match tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await {
            Ok(status) => {
                status?;
            }
            Err(_) => {
                self.child.start_kill()?;
                self.child.wait().await?;
            }
        }
        Ok(())
    }
}

/// Raises this process's open-file limit (which the agent it starts
/// inherits) towards `wanted`: the hard limit too when privileged, else
/// the soft one to the hard one. The limit it ends at.
pub fn raise_open_files(wanted: u64) -> u64 {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let hard = getrlimit(Resource::Nofile).maximum;
    let target = hard.map(|hard| hard.max(wanted));
    let to = |limit: Option<u64>| {
        setrlimit(
            Resource::Nofile,
            Rlimit {
                current: limit,
                maximum: limit,
            },
        )
    };
    if to(target).is_err() {
        // Unprivileged: as far as the hard limit goes.
        let _ = to(hard);
    }
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

/// A gRPC client of the agent, with its admin token.
pub type Client = ControlClient<InterceptedService<Channel, Bearer>>;

/// Adds `authorization: Bearer TOKEN` to every call.
#[derive(Clone)]
pub struct Bearer(MetadataValue<Ascii>);

impl Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        request
            .metadata_mut()
            .insert("authorization", self.0.clone());
        Ok(request)
    }
}

/// Runs `ctl --agent unix:DATA/control.sock ARGS...` (the agent's user
/// on its local socket) to success and returns its wall time.
pub async fn ctl(ctl: &Path, agent: &AgentProcess, args: &[&str]) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let output = Command::new(ctl)
        .arg("--agent")
        .arg(agent.local())
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .with_context(|| format!("cannot run {}", ctl.display()))?;
    let elapsed = started.elapsed();
    if !output.status.success() {
        bail!(
            "ctl {} failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim_end()
        );
    }
    Ok(elapsed)
}

/// User plus system CPU time of a process, from `/proc/PID/stat`. CPU per
/// request compares the two servers far more steadily than throughput does
/// on a machine whose cores the load generator shares.
pub fn cpu_time(pid: u32) -> anyhow::Result<Duration> {
    // Linux reports it in clock ticks of 1/100 s (USER_HZ) on every
    // architecture it runs this bench on.
    Ok(Duration::from_millis(Stat::read(pid)?.cpu_ticks * 10))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_is_known_by_pid_and_start_until_it_is_reaped() {
        let me = ProcId::of(std::process::id()).expect("this process lives");
        assert!(!me.gone());
        assert!(cpu_time(me.pid).is_ok());
        let mut child = std::process::Command::new("sleep")
            .arg("10")
            .spawn()
            .unwrap();
        let sleeper = ProcId::of(child.id()).expect("the child lives");
        // The test runs on a thread of its own: its children are listed
        // under its task, not the main thread's `children()` reads.
        let listed = std::fs::read_dir("/proc/self/task").unwrap().any(|task| {
            let path = task.unwrap().path().join("children");
            std::fs::read_to_string(path)
                .unwrap_or_default()
                .split_whitespace()
                .any(|pid| pid == sleeper.pid.to_string())
        });
        assert!(listed);
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(sleeper.gone());
    }
}
