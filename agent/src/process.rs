//! This worker's process, as `Status` and `AgentInfo` show it: its pid and
//! start, its supervisor's pid, how the worker before it ended, the sha256
//! of the binary it runs (what a self-upgrade changed), and the last
//! self-upgrade that failed, as the supervisor told it; and asking its
//! supervisor for a new worker.

use std::io::Read;
use std::sync::OnceLock;

use parking_lot::Mutex;

use serde::{Deserialize, Serialize};

static SHA: OnceLock<String> = OnceLock::new();
static FAILED_RESTART: Mutex<Option<FailedRestart>> = Mutex::new(None);

/// A self-upgrade that did not happen: the supervisor saw the new worker
/// (or the check of its own new binary) end before it served.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailedRestart {
    /// The process that failed.
    pub pid: u32,
    /// How it ended ("exited with code 1").
    pub exit: String,
    /// Its last lines on stderr, oldest first.
    pub stderr: Vec<String>,
    pub at_ms: i64,
    /// The supervisor's re-execution was refused, not a worker's restart.
    pub supervisor: bool,
}

impl FailedRestart {
    /// One message for the log and the event: what failed, how, and its
    /// last words.
    pub fn message(&self) -> String {
        let what = if self.supervisor {
            format!(
                "the supervisor did not re-execute itself: its new binary (checked as pid {}) {}",
                self.pid, self.exit
            )
        } else {
            format!(
                "the new worker (pid {}) {} before it served",
                self.pid, self.exit
            )
        };
        if self.stderr.is_empty() {
            return format!("{what}; it wrote nothing on stderr");
        }
        format!(
            "{what}; its last lines on stderr:\n{}",
            self.stderr.join("\n")
        )
    }
}

/// Remembers the last failed self-upgrade, for `AgentInfo`.
pub fn set_failed_restart(failed: FailedRestart) {
    *FAILED_RESTART.lock() = Some(failed);
}

/// The last failed self-upgrade this worker was told of.
pub fn failed_restart() -> Option<FailedRestart> {
    FAILED_RESTART.lock().clone()
}

/// Starts hashing the running binary on a thread of its own, so that no
/// call waits for it.
pub fn hash_binary_in_background() {
    let _ = std::thread::Builder::new()
        .name("nine9s-binary-hash".into())
        .spawn(|| SHA.get_or_init(hash));
}

/// The sha256 of the running binary (`/proc/self/exe`, the file this
/// process was started from even if it was replaced since); empty until
/// [`hash_binary_in_background`] is done.
pub fn binary_sha256() -> &'static str {
    SHA.get().map_or("", String::as_str)
}

/// Asks the supervisor that started this worker (`supervisor`, if it is
/// still this process's parent) to start a new one and retire this one,
/// with the self-upgrade's handover: from the binary on disk (SIGHUP), or
/// with `same_binary` from the one that serves (SIGUSR1); `Ok(false)` if
/// there is no such supervisor. A worker under `--worker-user` may not
/// signal its root supervisor: it asks on its notify socket instead
/// (`NINE9S_RESTART=disk` or `=same`, heeded only from the current
/// worker's pid).
pub fn ask_for_new_worker(supervisor: Option<u32>, same_binary: bool) -> std::io::Result<bool> {
    let parent = rustix::process::getppid().map(|p| p.as_raw_nonzero().get() as u32);
    let Some(pid) = supervisor
        .filter(|&pid| parent == Some(pid))
        .and_then(|pid| rustix::process::Pid::from_raw(pid as i32))
    else {
        return Ok(false);
    };
    let signal = if same_binary {
        rustix::process::Signal::USR1
    } else {
        rustix::process::Signal::HUP
    };
    match rustix::process::kill_process(pid, signal) {
        Err(rustix::io::Errno::PERM) => {
            let line = if same_binary {
                "NINE9S_RESTART=same\n"
            } else {
                "NINE9S_RESTART=disk\n"
            };
            crate::supervisor::notify(line)?;
        }
        sent => sent?,
    }
    Ok(true)
}

fn hash() -> String {
    {
        use sha2::Digest;
        let Ok(mut file) = std::fs::File::open("/proc/self/exe") else {
            return String::new();
        };
        let mut hasher = sha2::Sha256::new();
        let mut buffer = vec![0; 256 * 1024];
        loop {
            match file.read(&mut buffer) {
                Ok(0) => break,
                Ok(n) => hasher.update(&buffer[..n]),
                Err(_) => return String::new(),
            }
        }
        hex::encode(hasher.finalize())
    }
}
