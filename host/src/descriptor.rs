//! `dlopen` of an open descriptor, as `/proc/self/fd/N`: the code loaded is
//! that of the file the caller opened (and hashed), whatever was renamed
//! over its path since.
//!
//! glibc's `dlopen` first matches a library already loaded by name, then
//! by file (device and inode). A descriptor's number is reused once closed,
//! so `/proc/self/fd/N` may still name an earlier library that stays mapped
//! (kept for rollback, or lingering): loading under that name would return
//! the old code. Before loading, the name is tried with `RTLD_NOLOAD`; if
//! it answers with a library that is not this very file, the descriptor is
//! moved to a higher number and the name tried again.

use std::ffi::c_void;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use libloading::os::unix::{Library as DlLibrary, RTLD_LOCAL, RTLD_NOW};

/// Names tried before giving up: each taken one is held by a library still
/// loaded, so more than a handful means something is badly wrong.
const MAX_TRIES: usize = 64;

/// The start of glibc's `struct link_map` (`<link.h>`, public and stable).
#[repr(C)]
struct LinkMapHead {
    _l_addr: usize,
    _l_name: *const libc::c_char,
    /// The library's dynamic section: an address inside its mapping.
    l_ld: *const c_void,
}

/// Loads the library open on `file` (`RTLD_NOW | RTLD_LOCAL`).
pub(crate) fn open(file: OwnedFd) -> Result<DlLibrary, String> {
    let identity = file_id(&file).map_err(|e| e.to_string())?;
    let mut file = file;
    for _ in 0..MAX_TRIES {
        let name = format!("/proc/self/fd/{}", file.as_raw_fd());
        if name_is_free(&name, identity) {
            // SAFETY: opening runs the library's ELF initialisers; the caller
            // vouches for the file as `Library::open` documents.
            return unsafe { DlLibrary::open(Some(&name), RTLD_NOW | RTLD_LOCAL) }
                .map_err(|e| e.to_string());
        }
        file = dup_above(&file).map_err(|e| e.to_string())?;
    }
    Err(format!(
        "{MAX_TRIES} descriptor names in a row are held by other loaded libraries"
    ))
}

/// Whether loading `name` would load the file `identity`: no library holds
/// the name, or the one that answers is that file already loaded (glibc
/// shares it, as it would under any name).
fn name_is_free(name: &str, identity: (u64, u64)) -> bool {
    // SAFETY: RTLD_NOLOAD maps nothing and runs no initialisers: it only
    // returns (and counts a reference on) a library already loaded.
    let held = match unsafe { DlLibrary::open(Some(name), RTLD_NOW | libc::RTLD_NOLOAD) } {
        Ok(held) => held,
        Err(_) => return true,
    };
    let handle = held.into_raw();
    let mut map: *const LinkMapHead = std::ptr::null();
    // SAFETY: `handle` is a live dlopen handle; RTLD_DI_LINKMAP writes a
    // `struct link_map *` into `map`, whose head `LinkMapHead` mirrors.
    let ld = unsafe {
        if libc::dlinfo(
            handle,
            libc::RTLD_DI_LINKMAP,
            (&mut map as *mut *const LinkMapHead).cast(),
        ) != 0
            || map.is_null()
        {
            None
        } else {
            Some((*map).l_ld as usize)
        }
    };
    // SAFETY: the handle came from `into_raw` just above; this drops the
    // reference NOLOAD counted.
    drop(unsafe { DlLibrary::from_raw(handle) });
    ld.and_then(crate::maps::file_at) == Some(identity)
}

/// The device and inode of `file`.
fn file_id(file: &OwnedFd) -> io::Result<(u64, u64)> {
    let mut stat = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: a valid descriptor and a buffer of the size fstat writes.
    if unsafe { libc::fstat(file.as_raw_fd(), stat.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fstat succeeded, so it filled the buffer.
    let stat = unsafe { stat.assume_init() };
    Ok((stat.st_dev, stat.st_ino))
}

/// A close-on-exec duplicate of `file` numbered above it.
fn dup_above(file: &OwnedFd) -> io::Result<OwnedFd> {
    let fd = file.as_raw_fd();
    // SAFETY: F_DUPFD_CLOEXEC on a valid descriptor returns a new one (or -1).
    let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, fd + 1) };
    if new < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `new` was just created and is owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}
