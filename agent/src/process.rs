//! This worker's process, as `Status` and `AgentInfo` show it: its pid and
//! start, its supervisor's pid, how the worker before it ended, and the
//! sha256 of the binary it runs (what a self-upgrade changed).

use std::io::Read;
use std::sync::OnceLock;

static SHA: OnceLock<String> = OnceLock::new();

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
        hasher
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}
