//! Untrusted code out of the serving process. `dlopen` runs a library's
//! ELF constructors before a single symbol can be read, so the serving
//! process never opens bytes nobody has vouched for: first the ELF headers
//! are read as data ([`check_elf`]: the right architecture and type, every
//! loadable segment and the section headers inside the file), then the
//! library is opened in a throwaway process — this same binary run as
//! `agent probe LIBRARY` ([`child`]) — which opens it in a contained child
//! (new namespaces, read-only mounts, no privileges: `nine9s_host::sandbox`)
//! under a time, memory and open-file limit, and kills everything that
//! child started. It reports the plugin's ABI, name, version and state
//! version as one JSON line; a crash, a hang or anything else is the
//! library's fault, said in words, and the agent never mapped it. Before a
//! switch maps a release, [`rehearse`] runs its trial instance the same
//! way (`agent rehearse`), so a crash there costs only that process, behind
//! lower walls: the data dir and the secrets the flags name hidden, but the
//! rest of the files and the network as the worker sees them. It reports
//! all a dry run says (the library, how the state crossed) or the step the
//! release failed: a dry run is this rehearsal alone.

use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nine9s_host::sandbox::{self, Forked, Isolation, Walls};
use object::elf::{self, FileHeader64};
use object::read::elf::{FileHeader, ProgramHeader};
use object::{Endianness, FileKind, ReadCache};
use serde::{Deserialize, Serialize};

/// How long the probe may take: opening a library is milliseconds.
pub const TIME_LIMIT: Duration = Duration::from_secs(10);
/// The probe's address space: the agent binary, libc and one plugin.
const MEMORY_LIMIT: u64 = 1024 * 1024 * 1024;
/// The largest file the probe may write.
const FILE_LIMIT: u64 = 1024 * 1024;
/// The largest report the parent reads.
const MAX_REPORT: usize = 64 * 1024;

/// What the probe found in a library that opened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    pub abi: u32,
    pub name: String,
    pub version: String,
    pub state_version: u32,
}

/// The child's one line on stdout.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Answer {
    Plugin(Report),
    Refused(String),
    /// The contained child was killed by this signal.
    Crashed(i32),
    /// A rehearsal's trial instance went through: what it found, and
    /// whether it ran behind its walls (the kernel gave namespaces).
    Rehearsed {
        rehearsed: Rehearsed,
        contained: bool,
    },
    /// A rehearsal's trial failed a step in the release's code.
    Failed(Failure),
    /// The rehearsal could not wall itself in (not the release's fault):
    /// its code never ran.
    Uncontained(String),
}

/// Checks what can be read of `path` as data: a 64-bit ELF shared
/// object for this machine, whose loadable segments and section headers
/// all lie inside the file (a truncated library would be mapped past its
/// end: SIGBUS).
pub fn check_elf(path: &Path) -> Result<(), ProbeError> {
    let refused = ProbeError::Refused;
    let unreadable = |e: std::io::Error| ProbeError::Failed(format!("cannot read the upload: {e}"));
    let file = std::fs::File::open(path).map_err(unreadable)?;
    let size = file.metadata().map_err(unreadable)?.len();
    // Only the headers are read, not the whole upload.
    let data = ReadCache::new(file);
    match FileKind::parse(&data) {
        Ok(FileKind::Elf64) => {}
        Ok(FileKind::Elf32) => {
            return Err(refused(
                "a 32-bit ELF file; this agent loads 64-bit libraries".into(),
            ))
        }
        Ok(other) => {
            return Err(refused(format!(
                "a {other:?} file, not an ELF shared library"
            )))
        }
        Err(_) => return Err(refused("not an ELF shared library (no ELF header)".into())),
    }
    let header = FileHeader64::<Endianness>::parse(&data)
        .map_err(|e| refused(format!("not a valid ELF file: {e}")))?;
    let endian = header
        .endian()
        .map_err(|e| refused(format!("not a valid ELF file: {e}")))?;
    let machine = header.e_machine(endian);
    if machine != HOST_MACHINE {
        return Err(refused(format!(
            "built for {} (ELF machine {machine}); this agent runs on {}",
            machine_name(machine),
            std::env::consts::ARCH
        )));
    }
    if header.e_type(endian) != elf::ET_DYN {
        return Err(refused(
            "an ELF file that is not a shared library (build the release as a cdylib)".into(),
        ));
    }
    let truncated = |what: &str, end: u64| {
        refused(format!(
            "truncated: {what} needs the file to be {end} bytes, but it has {size}"
        ))
    };
    let sections_end = header
        .e_shoff(endian)
        .saturating_add(u64::from(header.e_shnum(endian)) * u64::from(header.e_shentsize(endian)));
    if sections_end > size {
        return Err(truncated("the section header table", sections_end));
    }
    let segments = header
        .program_headers(endian, &data)
        .map_err(|e| refused(format!("truncated or corrupt program headers: {e}")))?;
    for segment in segments {
        if segment.p_type(endian) != elf::PT_LOAD {
            continue;
        }
        let end = segment
            .p_offset(endian)
            .saturating_add(segment.p_filesz(endian));
        if end > size {
            return Err(truncated("a loadable segment", end));
        }
    }
    Ok(())
}

/// This machine's ELF `e_machine`.
const HOST_MACHINE: u16 = if cfg!(target_arch = "x86_64") {
    elf::EM_X86_64
} else if cfg!(target_arch = "aarch64") {
    elf::EM_AARCH64
} else if cfg!(target_arch = "riscv64") {
    elf::EM_RISCV
} else {
    elf::EM_NONE
};

fn machine_name(machine: u16) -> String {
    match machine {
        elf::EM_X86_64 => "x86_64".into(),
        elf::EM_AARCH64 => "AArch64".into(),
        elf::EM_RISCV => "RISC-V".into(),
        elf::EM_386 => "i386".into(),
        elf::EM_ARM => "ARM".into(),
        elf::EM_PPC64 => "PowerPC 64".into(),
        elf::EM_S390 => "s390".into(),
        other => format!("machine {other}"),
    }
}

/// Why a library was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The library's fault: it is refused.
    #[error("{0}")]
    Refused(String),
    /// The agent could not look (no process, no file): not the library's fault.
    #[error("{0}")]
    Failed(String),
}

/// Reads `library`'s ELF headers, then has the probe process open it in
/// its contained child, and returns what it found, why the library is
/// refused, or why the agent could not look. Blocks for up to
/// [`TIME_LIMIT`] plus 2 s (the backstop behind the probe's own limit).
///
/// The report is read as it comes, never waiting for the end of the
/// output: once the probe process has exited, whatever it wrote is there,
/// so a process that escaped it holding the pipe cannot hold the agent.
pub fn probe(library: &Path) -> Result<Report, ProbeError> {
    check_elf(library)?;
    // The probe runs in `/`: a relative data dir would not be found there.
    let library = library
        .canonicalize()
        .map_err(|e| ProbeError::Failed(format!("cannot find the upload: {e}")))?;
    let mut command = Command::new("/proc/self/exe");
    command.arg("probe").arg(&library);
    // Uploads live in `DATA/artifacts`: the probe hides the data dir.
    if let Some(data_dir) = library.parent().and_then(Path::parent) {
        command.arg("--hide").arg(data_dir);
    }
    match run(command, None, TIME_LIMIT)? {
        Answer::Plugin(report) => Ok(report),
        Answer::Refused(reason) => Err(ProbeError::Refused(reason)),
        Answer::Crashed(signal) => Err(crashed(signal)),
        Answer::Rehearsed { .. } | Answer::Uncontained(_) | Answer::Failed(_) => {
            Err(ProbeError::Failed("the probe answered a rehearsal".into()))
        }
    }
}

/// Runs `command` (this binary in a contained mode) with `input` on its
/// stdin, for `limit` and a moment at most, and returns its last line.
fn run(
    mut command: Command,
    input: Option<Vec<u8>>,
    limit: Duration,
) -> Result<Answer, ProbeError> {
    // The running binary itself, even if a package upgrade replaced the file.
    let mut child = command
        .current_dir("/")
        .process_group(0)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| ProbeError::Failed(format!("cannot start the probe process: {e}")))?;
    if let (Some(bytes), Some(mut stdin)) = (input, child.stdin.take()) {
        // A child that stops reading ends the write with it.
        std::thread::spawn(move || std::io::Write::write_all(&mut stdin, &bytes));
    }
    let group = rustix::process::Pid::from_child(&child);
    let stdout = child.stdout.take().expect("piped");
    let read = rustix::fs::fcntl_setfl(&stdout, rustix::fs::OFlags::NONBLOCK);
    let mut output = Tail::default();
    // The probe process keeps its own time limit; this one is the backstop.
    let deadline = Instant::now() + limit + Duration::from_secs(2);
    let status = loop {
        output.take(&stdout);
        match child.try_wait() {
            Ok(Some(status)) => break Ok(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(2)),
            Ok(None) => {
                break Err(ProbeError::Refused(format!(
                    "its process did not finish within {} s",
                    limit.as_secs()
                )))
            }
            Err(e) => {
                break Err(ProbeError::Failed(format!(
                    "cannot wait for the probe: {e}"
                )))
            }
        }
    };
    let _ = rustix::process::kill_process_group(group, rustix::process::Signal::KILL);
    let _ = child.kill();
    let _ = child.wait();
    read.map_err(|e| ProbeError::Failed(format!("cannot read the probe's report: {e}")))?;
    // What the probe wrote before it exited is in the pipe now.
    output.take(&stdout);
    let status = status?;
    if let Some(signal) = std::os::unix::process::ExitStatusExt::signal(&status) {
        return Ok(Answer::Crashed(signal));
    }
    // The last line: a constructor may have printed before the report.
    let out = String::from_utf8_lossy(&output.0);
    match out.lines().last().map(serde_json::from_str::<Answer>) {
        Some(Ok(Answer::Plugin(_) | Answer::Rehearsed { .. })) if !status.success() => Err(
            ProbeError::Refused(format!("the probe ended with {status}")),
        ),
        Some(Ok(answer)) => Ok(answer),
        _ => Err(ProbeError::Refused(format!(
            "the probe ended with {status} and no report (the library exited the process?)"
        ))),
    }
}

fn crashed(signal: i32) -> ProbeError {
    let hint = if signal == 9 {
        " (out of its memory limit?)"
    } else {
        ""
    };
    ProbeError::Refused(format!(
        "opening it crashed the probe process with {}{hint}",
        signal_name(signal)
    ))
}

/// The last [`MAX_REPORT`] bytes of the probe's output.
#[derive(Default)]
struct Tail(Vec<u8>);

impl Tail {
    /// Reads what the non-blocking pipe holds now.
    fn take(&mut self, pipe: &std::process::ChildStdout) {
        let mut buffer = [0u8; 8192];
        while let Ok(n @ 1..) = rustix::io::read(pipe, &mut buffer) {
            self.0.extend_from_slice(&buffer[..n]);
            let over = self.0.len().saturating_sub(MAX_REPORT);
            self.0.drain(..over);
        }
    }
}

pub(crate) fn signal_name(signal: i32) -> String {
    let name = match signal {
        4 => "SIGILL",
        6 => "SIGABRT",
        7 => "SIGBUS",
        8 => "SIGFPE",
        9 => "SIGKILL",
        11 => "SIGSEGV",
        24 => "SIGXCPU (out of its CPU time)",
        25 => "SIGXFSZ",
        _ => return format!("signal {signal}"),
    };
    name.to_owned()
}

/// The probe process, `agent probe LIBRARY [--hide DIR]`: contains a
/// child that opens the library, and prints the last line of the report.
///
/// This process runs only the agent's own code. It copies the library
/// into a sealed memory file, becomes a child subreaper, asks for new
/// PID, network, mount and IPC namespaces for its child, and forks. The
/// child ([`open_contained`]) walls itself in, then opens the library. This
/// process waits for it at most [`TIME_LIMIT`], kills it, and kills every
/// process it inherited until none is left: the child is its namespace's
/// init, so the kernel kills whatever it started; without namespaces the
/// daemons it left became this subreaper's children.
pub fn child(library: &Path, hide: Option<&Path>) -> i32 {
    contain(TIME_LIMIT, Walls::All, "opening it", |isolation| {
        open_contained(library, isolation, hide)
    })
}

/// Runs `body` in a contained child (see [`child`]; in the namespaces
/// `walls` asks for) for `limit` at most, and returns this process's exit
/// code.
fn contain(limit: Duration, walls: Walls, what: &str, body: impl FnOnce(Isolation) -> i32) -> i32 {
    let _ = rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL));
    let subreaper = sandbox::become_subreaper();
    let isolation = sandbox::isolate_children(walls);
    let pid = match sandbox::fork() {
        Ok(Forked::Child) => std::process::exit(body(isolation)),
        Ok(Forked::Parent(pid)) => pid,
        Err(e) => return answer(&Answer::Refused(format!("cannot start the probe: {e}"))),
    };
    let started = Instant::now();
    let pid = rustix::process::Pid::from_raw(pid as i32).expect("a child's pid is positive");
    let ended = loop {
        match rustix::process::waitpid(Some(pid), rustix::process::WaitOptions::NOHANG) {
            Ok(Some((_, status))) => break Some(status),
            Ok(None) if started.elapsed() < limit => std::thread::sleep(Duration::from_millis(2)),
            _ => break None,
        }
    };
    let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
    sweep(subreaper.is_ok());
    match ended {
        None => answer(&Answer::Refused(format!(
            "{what} did not finish within {} s (a constructor or a call that hangs?)",
            limit.as_secs()
        ))),
        Some(status) => match (status.exit_status(), status.terminating_signal()) {
            (Some(code), _) => code,
            (None, Some(signal)) => answer(&Answer::Crashed(signal)),
            (None, None) => answer(&Answer::Refused("the probe stopped".into())),
        },
    }
}

/// Kills and reaps every process this one inherited (its child, and, as a
/// subreaper, the daemons below it) until none is left, for a second at most.
fn sweep(subreaper: bool) {
    let me = std::process::id();
    let until = Instant::now() + Duration::from_secs(1);
    while Instant::now() < until {
        loop {
            match rustix::process::wait(rustix::process::WaitOptions::NOHANG) {
                Ok(Some(_)) => continue,
                Ok(None) => break,
                // No child left.
                Err(_) => return,
            }
        }
        if !subreaper {
            return;
        }
        for pid in sandbox::children(me) {
            if let Some(pid) = rustix::process::Pid::from_raw(pid as i32) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Prints `answer` as the report's last line and returns the exit code.
fn answer(answer: &Answer) -> i32 {
    let line = serde_json::to_string(answer).unwrap_or_default();
    println!("\n{line}");
    match answer {
        Answer::Plugin(_) => 0,
        Answer::Rehearsed { .. } => 0,
        Answer::Refused(_) | Answer::Crashed(_) | Answer::Uncontained(_) | Answer::Failed(_) => 3,
    }
}

/// The contained child: walls itself in, limits itself, opens the
/// library, prints the report and returns the exit code.
fn open_contained(library: &Path, isolation: Isolation, hide: Option<&Path>) -> i32 {
    use rustix::process::{setrlimit, Resource, Rlimit};
    // Dies with the probe process rather than linger.
    let _ = rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL));
    let library = match wall_in(library, isolation, hide) {
        Ok(library) => library,
        Err(e) => return answer(&Answer::Refused(format!("cannot contain the probe: {e}"))),
    };
    let limit = |resource, value: u64| {
        let _ = setrlimit(
            resource,
            Rlimit {
                current: Some(value),
                maximum: Some(value),
            },
        );
    };
    limit(Resource::As, MEMORY_LIMIT);
    limit(Resource::Cpu, TIME_LIMIT.as_secs());
    // Without a mount namespace a constructor may still write somewhere
    // (as `nobody` when the agent is root): not much per file, nor many.
    limit(Resource::Fsize, FILE_LIMIT);
    limit(Resource::Nofile, 64);
    // A crash here is expected of bad uploads: leave no core dumps behind.
    limit(Resource::Core, 0);
    answer(&match nine9s_host::Library::open(&library) {
        Ok(opened) => Answer::Plugin(Report {
            abi: opened.abi_version(),
            name: opened.name().to_owned(),
            version: opened.version().to_owned(),
            state_version: opened.state_version(),
        }),
        Err(e) => Answer::Refused(e.to_string()),
    })
}

/// Walls the contained child in, where the kernel gave namespaces: the
/// data dir (`hide`) covered by an empty tmpfs, `/dev/shm` by one holding
/// only a copy of the library (a path `nobody` can reach), every mount
/// read-only, then no privileges (`nobody` for a root agent). Returns
/// where to open the library. Without namespaces only the limits and the
/// sweep contain it.
fn wall_in(library: &Path, isolation: Isolation, hide: Option<&Path>) -> std::io::Result<PathBuf> {
    if !isolation.namespaces {
        return Ok(library.to_owned());
    }
    let mut original = std::fs::File::open(library)?;
    let size = original.metadata()?.len();
    if let Some(hide) = hide {
        sandbox::cover(hide, 4096)?;
    }
    sandbox::cover(Path::new("/dev/shm"), size + 64 * 1024)?;
    let copy = Path::new("/dev/shm/library.so").to_owned();
    let mut file = std::fs::File::create_new(&copy)?;
    std::io::copy(&mut original, &mut file)?;
    // Readable by `nobody`, whatever the umask.
    file.set_permissions(std::fs::Permissions::from_mode(0o444))?;
    drop((original, file));
    sandbox::make_read_only()?;
    sandbox::drop_privileges(isolation)?;
    Ok(copy)
}

/// How a rehearsal in a disposable process went, when it did not crash.
#[derive(Debug)]
pub enum Rehearsal {
    /// The trial instance went through: what it found.
    Passed(Rehearsed),
    /// The release failed a step (an error it returned, not a crash).
    Failed(Failure),
    /// It did not finish in time: stuck in the target's code, or in the
    /// active release's migration.
    Hung(String),
    /// It could not try the release (its state unread, a library file it
    /// could not open): not the release's fault, and no verdict on it.
    Inconclusive(String),
}

/// What a rehearsal that went through found: all a dry run reports, so
/// the serving worker need not map the library to say it.
#[derive(Debug, Serialize, Deserialize)]
pub struct Rehearsed {
    /// The target library, as it opened.
    pub library: Report,
    /// How the state crossed into the trial instance.
    pub carried: Carried,
}

/// How the state crossed into a trial instance.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Carried {
    /// Not at all: the trial instance started fresh.
    Fresh,
    /// As is (the same state version).
    Same,
    /// Migrated between state versions by the library `name` `version`.
    Migrated {
        from: u32,
        to: u32,
        name: String,
        version: String,
    },
}

/// The step of a rehearsal a release failed, and the error it gave.
#[derive(Debug, Serialize, Deserialize)]
pub struct Failure {
    pub during: Stage,
    pub error: String,
}

/// A step of the rehearsal's trial, for whoever words its failure.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// Opening the target library.
    Open,
    /// Neither library can migrate the state between these versions.
    NoMigration {
        from: u32,
        to: u32,
    },
    /// The state migration, by the library of version `by`.
    Migration {
        by: String,
    },
    Init,
    Hook,
    Health,
    Snapshot,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let during = match &self.during {
            Stage::Open => "opening it",
            Stage::NoMigration { .. } => "carrying the state",
            Stage::Migration { .. } => "state migration",
            Stage::Init => "init",
            Stage::Hook => "hook",
            Stage::Health => "health check",
            Stage::Snapshot => "snapshot",
        };
        write!(f, "{during}: {}", self.error)
    }
}

/// Rehearses a switch to `target` in a disposable process — this binary
/// as `agent rehearse` — before the serving worker maps it: `state` (its
/// state version and bytes) migrated (by `target` or `active`), a trial
/// instance started with it, `hooks` run, its health checked, a snapshot
/// taken. `hide` (the data dir and the secret files: `datadir::secrets`)
/// is out of its sight. `active` is given when the state is the serving
/// release's (it may migrate it), not for a stored snapshot of the
/// target's own. A crash there is `Err(Refused)`; the serving process
/// never ran the code.
pub fn rehearse(
    target: &Path,
    active: Option<&Path>,
    state: Option<(u32, Vec<u8>)>,
    hooks: &[String],
    hide: &[PathBuf],
    limit: Duration,
) -> Result<Rehearsal, ProbeError> {
    let absolute = |path: &Path| {
        path.canonicalize()
            .map_err(|e| ProbeError::Failed(format!("cannot find {}: {e}", path.display())))
    };
    let mut command = Command::new("/proc/self/exe");
    command.arg("rehearse").arg(absolute(target)?);
    if let Some(active) = active {
        command.arg("--active").arg(absolute(active)?);
    }
    if let Some((version, _)) = &state {
        command.arg("--state-version").arg(version.to_string());
    }
    for hook in hooks {
        command.arg("--hook").arg(hook);
    }
    // It runs in `/`: every path absolute, and the real one, which is what
    // a mount covers. Nothing there (yet) is nothing to read.
    for path in hide.iter().filter_map(|p| p.canonicalize().ok()) {
        command.arg("--hide").arg(path);
    }
    command.arg("--limit-ms").arg(limit.as_millis().to_string());
    match run(command, state.map(|(_, bytes)| bytes), limit)? {
        Answer::Rehearsed {
            rehearsed,
            contained,
        } => {
            if !contained {
                tracing::warn!(
                    "the rehearsal ran without its walls: the kernel gave it no namespaces \
                     (the agent is not root and user namespaces are off), so the release's code \
                     could read the data dir and the secret files"
                );
            }
            Ok(Rehearsal::Passed(rehearsed))
        }
        Answer::Failed(failure) => Ok(Rehearsal::Failed(failure)),
        Answer::Uncontained(why) => Err(ProbeError::Failed(why)),
        Answer::Refused(reason) if reason.contains("did not finish within") => {
            Ok(Rehearsal::Hung(reason))
        }
        Answer::Refused(reason) => Ok(Rehearsal::Inconclusive(reason)),
        Answer::Crashed(signal) => Err(ProbeError::Refused(format!(
            "it crashed the rehearsal's disposable process with {}",
            signal_name(signal)
        ))),
        Answer::Plugin(_) => Err(ProbeError::Failed("the rehearsal answered a probe".into())),
    }
}

/// The rehearsal process, `agent rehearse TARGET [--active LIBRARY]
/// [--state-version N] [--hook NAME]... [--hide PATH]... --limit-ms MS`,
/// the state's bytes on stdin: contained like the probe (a PID namespace
/// of its own and the subreaper's sweep) but behind lower walls
/// ([`seal`]): the trial must see the files and network the serving
/// worker would, but not the agent's credentials.
pub fn rehearsal_child(
    target: &Path,
    active: Option<&Path>,
    state_version: Option<u32>,
    hooks: &[String],
    hide: &[PathBuf],
    limit: Duration,
) -> i32 {
    contain(limit, Walls::Mounts, "the rehearsal", |isolation| {
        let _ =
            rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL));
        // A crash here is expected of bad releases: leave no core dumps.
        let _ = rustix::process::setrlimit(
            rustix::process::Resource::Core,
            rustix::process::Rlimit {
                current: Some(0),
                maximum: Some(0),
            },
        );
        let state = match state_version {
            None => None,
            Some(version) => {
                let mut bytes = Vec::new();
                if let Err(e) = std::io::Read::read_to_end(&mut std::io::stdin(), &mut bytes) {
                    return answer(&Answer::Refused(format!("cannot read the state: {e}")));
                }
                Some((version, bytes))
            }
        };
        // Opened before the walls: the libraries live in the data dir.
        let open = |path: &Path| std::fs::File::open(path).map(OwnedFd::from);
        let files = match (open(target), active.map(open).transpose()) {
            (Ok(target), Ok(active)) => (target, active),
            (Err(e), _) | (_, Err(e)) => {
                return answer(&Answer::Refused(format!("cannot open the library: {e}")))
            }
        };
        if let Err(e) = seal(isolation, hide) {
            return answer(&Answer::Uncontained(format!(
                "cannot contain the rehearsal: {e}"
            )));
        }
        answer(&match trial(files.0, files.1, state, hooks) {
            Ok(rehearsed) => Answer::Rehearsed {
                rehearsed,
                contained: isolation.namespaces,
            },
            Err(failure) => Answer::Failed(failure),
        })
    })
}

/// Walls the rehearsal in, where the kernel gave namespaces: each file of
/// `hide` (a secret a flag names) reads as empty, each directory (the data
/// dir: the admin token, the store, the control socket) is covered by an
/// empty tmpfs, `/proc` shows only the rehearsal's own processes, and it
/// keeps no capability (root stays uid 0 but cannot undo a mount). The
/// rest of the files, writable as before, and the network stay as the
/// worker sees them. Without namespaces only the sweep contains it.
fn seal(isolation: Isolation, hide: &[PathBuf]) -> std::io::Result<()> {
    if !isolation.namespaces {
        return Ok(());
    }
    let (dirs, files): (Vec<&PathBuf>, Vec<&PathBuf>) = hide
        .iter()
        .filter(|path| path.symlink_metadata().is_ok())
        .partition(|path| path.is_dir());
    // Files first: one may lie in a directory covered next.
    for file in files {
        sandbox::hide_file(file)?;
    }
    for dir in dirs {
        sandbox::cover(dir, 4096)?;
    }
    sandbox::mount_proc()?;
    sandbox::drop_capabilities()
}

/// The rehearsal's trial, in the disposable process, on the libraries
/// opened before its walls went up. The state crosses as the serving
/// worker's `load` step would carry it (`handoff`): not at all when either
/// side keeps none, as is at the same version, else migrated by the newer
/// of the two libraries that can (only the target is given when a stored
/// snapshot of its own is restored).
fn trial(
    target: OwnedFd,
    active: Option<OwnedFd>,
    state: Option<(u32, Vec<u8>)>,
    hooks: &[String],
) -> Result<Rehearsed, Failure> {
    let failed = |during: Stage| move |error: String| Failure { during, error };
    let library = nine9s_host::Library::open_file(target)
        .map_err(|e| e.without_path())
        .map_err(failed(Stage::Open))?;
    let to = library.state_version();
    let (migrated, carried) = match state {
        Some((from, _)) if from == 0 || to == 0 => (None, Carried::Fresh),
        Some((from, bytes)) if from == to => (Some(bytes), Carried::Same),
        Some((from, bytes)) => {
            let old = active
                .map(nine9s_host::Library::open_file)
                .transpose()
                .map_err(|e| failed(Stage::Open)(e.without_path()))?;
            let (newer, older) = if to > from {
                (Some(&library), old.as_ref())
            } else {
                (old.as_ref(), Some(&library))
            };
            let migrator = newer
                .into_iter()
                .chain(older)
                .find(|l| l.can_migrate(from, to))
                .ok_or_else(|| Failure {
                    during: Stage::NoMigration { from, to },
                    error: format!("no migration from state v{from} to v{to}"),
                })?;
            let by = migrator.version().to_owned();
            let bytes = migrator
                .migrate(from, to, &bytes)
                .map_err(|e| failed(Stage::Migration { by: by.clone() })(e.to_string()))?;
            let carried = Carried::Migrated {
                from,
                to,
                name: migrator.name().to_owned(),
                version: by,
            };
            (Some(bytes), carried)
        }
        None => (None, Carried::Fresh),
    };
    let instance = library
        .instantiate(migrated.as_deref())
        .map_err(|e| failed(Stage::Init)(e.to_string()))?;
    for hook in hooks {
        instance
            .hook(hook)
            .map_err(|e| failed(Stage::Hook)(e.to_string()))?;
    }
    instance
        .health()
        .map_err(|e| failed(Stage::Health)(e.to_string()))?;
    if to != 0 {
        instance
            .snapshot()
            .map_err(|e| failed(Stage::Snapshot)(e.to_string()))?;
    }
    Ok(Rehearsed {
        library: Report {
            abi: library.abi_version(),
            name: library.name().to_owned(),
            version: library.version().to_owned(),
            state_version: to,
        },
        carried,
    })
}
