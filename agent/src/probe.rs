//! Looking at an uploaded library without trusting it. `dlopen` runs a
//! library's ELF constructors before a single symbol can be read, so the
//! serving process never opens bytes nobody has vouched for: first the ELF
//! headers are read as data ([`check_elf`]: the right architecture and
//! type, every loadable segment and the section headers inside the file), then the library is
//! opened in a throwaway child — this same binary run as `agent probe
//! LIBRARY` ([`child`]) — in a process group of its own, under a time,
//! memory, file size and open-file limit. The child
//! reports the plugin's ABI, name, version and state version as one JSON
//! line; a crash, a hang or anything else is the library's fault, said in
//! words, and the agent never mapped it.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

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
const MAX_REPORT: u64 = 64 * 1024;

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

/// Opens `library` in a child process and returns what it found, or why
/// the library is refused. Blocks for up to [`TIME_LIMIT`].
///
/// The child leads a process group of its own, killed whole when the
/// probe ends: a constructor that forks leaves nothing behind, and the
/// report is read on a thread of its own, so a grandchild holding stdout
/// open cannot hold the agent either.
pub fn probe(library: &Path) -> Result<Report, ProbeError> {
    check_elf(library)?;
    // The probe runs in `/`: a relative data dir would not be found there.
    let library = library
        .canonicalize()
        .map_err(|e| ProbeError::Failed(format!("cannot find the upload: {e}")))?;
    // The running binary itself, even if a package upgrade replaced the file.
    let mut child = Command::new("/proc/self/exe")
        .arg("probe")
        .arg(&library)
        .current_dir("/")
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| ProbeError::Failed(format!("cannot start the probe process: {e}")))?;
    let group = rustix::process::Pid::from_child(&child);
    let stdout = child.stdout.take().expect("piped");
    let reader = std::thread::spawn(move || {
        let mut out = String::new();
        let _ = stdout.take(MAX_REPORT).read_to_string(&mut out);
        out
    });
    let deadline = Instant::now() + TIME_LIMIT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Ok(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(2)),
            Ok(None) => {
                break Err(ProbeError::Refused(format!(
                    "opening it did not finish within {} s (a constructor that hangs?)",
                    TIME_LIMIT.as_secs()
                )))
            }
            Err(e) => {
                break Err(ProbeError::Failed(format!(
                    "cannot wait for the probe: {e}"
                )))
            }
        }
    };
    // Whatever the library started goes with the probe.
    let _ = rustix::process::kill_process_group(group, rustix::process::Signal::KILL);
    let _ = child.kill();
    let _ = child.wait();
    let out = reader.join().unwrap_or_default();
    let status = status?;
    if let Some(signal) = std::os::unix::process::ExitStatusExt::signal(&status) {
        let hint = if signal == 9 {
            " (out of its memory limit?)"
        } else {
            ""
        };
        return Err(ProbeError::Refused(format!(
            "opening it crashed the probe process with {}{hint}",
            signal_name(signal)
        )));
    }
    // The last line: a constructor may have printed before the report.
    match out.lines().last().map(serde_json::from_str::<Answer>) {
        Some(Ok(Answer::Plugin(report))) if status.success() => Ok(report),
        Some(Ok(Answer::Refused(reason))) => Err(ProbeError::Refused(reason)),
        _ => Err(ProbeError::Refused(format!(
            "the probe ended with {status} and no report (the library exited the process?)"
        ))),
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

/// The child side, `agent probe LIBRARY`: limits itself, opens the
/// library, prints one JSON line and returns the exit code.
pub fn child(library: &Path) -> i32 {
    use rustix::process::{setrlimit, Resource, Rlimit};
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
    // A constructor may write, but cannot fill the disk or open much.
    limit(Resource::Fsize, FILE_LIMIT);
    limit(Resource::Nofile, 64);
    // A crash here is expected of bad uploads: leave no core dumps behind.
    limit(Resource::Core, 0);
    // Die with the agent rather than linger.
    let _ = rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL));
    let answer = match nine9s_host::Library::open(library) {
        Ok(opened) => Answer::Plugin(Report {
            abi: opened.abi_version(),
            name: opened.name().to_owned(),
            version: opened.version().to_owned(),
            state_version: opened.state_version(),
        }),
        Err(e) => Answer::Refused(e.to_string()),
    };
    let line = serde_json::to_string(&answer).unwrap_or_default();
    println!("\n{line}");
    match answer {
        Answer::Plugin(_) => 0,
        Answer::Refused(_) => 3,
    }
}
