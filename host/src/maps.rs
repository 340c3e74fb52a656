//! Whether a library file is still mapped into this process, read from
//! `/proc/self/maps`: the one way to tell that `dlclose` really unloaded it.

use parking_lot::Mutex;
use std::path::{Path, PathBuf};

/// Libraries the host released that were still mapped afterwards.
static RELEASED_BUT_MAPPED: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// True when any mapping of this process is backed by `path`, deleted
/// since or not (the kernel then appends " (deleted)" to the line).
pub(crate) fn is_mapped(path: &Path) -> bool {
    let Ok(maps) = std::fs::read_to_string("/proc/self/maps") else {
        return false;
    };
    let wanted = path.to_string_lossy();
    maps.lines().any(|line| {
        let line = line.trim_end();
        line.strip_suffix(" (deleted)")
            .unwrap_or(line)
            .ends_with(wanted.as_ref())
    })
}

/// The device and inode of the file mapped at `address`, if any.
pub(crate) fn file_at(address: usize) -> Option<(u64, u64)> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines().find_map(|line| {
        // start-end perms offset major:minor inode [path]
        let mut fields = line.split_ascii_whitespace();
        let (start, end) = fields.next()?.split_once('-')?;
        let start = usize::from_str_radix(start, 16).ok()?;
        let end = usize::from_str_radix(end, 16).ok()?;
        if !(start..end).contains(&address) {
            return None;
        }
        let (major, minor) = fields.nth(2)?.split_once(':')?;
        let major = u32::from_str_radix(major, 16).ok()?;
        let minor = u32::from_str_radix(minor, 16).ok()?;
        let inode = fields.next()?.parse().ok()?;
        Some((libc::makedev(major, minor), inode))
    })
}

pub(crate) fn note_released_but_mapped(path: PathBuf) {
    let mut list = RELEASED_BUT_MAPPED.lock();
    if !list.contains(&path) {
        list.push(path);
    }
}

pub(crate) fn forget_released(path: &Path) {
    let mut list = RELEASED_BUT_MAPPED.lock();
    list.retain(|p| p != path);
}

/// Libraries the host has released that the process still maps (a Rust
/// library that registered a thread-local destructor can never be
/// unmapped on glibc). Checked afresh on every call.
pub fn lingering() -> Vec<PathBuf> {
    let mut list = RELEASED_BUT_MAPPED.lock();
    list.retain(|p| is_mapped(p));
    list.clone()
}
