//! Containing a process that opens untrusted code (the agent's probe and
//! rehearsal): the kernel facilities that need `unsafe` — a child
//! subreaper, new namespaces, a fork, read-only mounts, dropping
//! privileges — behind safe functions. The agent decides what runs in
//! the contained child; this module only builds the walls.
//!
//! The shape: the process (trusted code so far, single-threaded) becomes a
//! child subreaper, moves its future children into new PID and mount
//! namespaces, and network and IPC ones too for [`Walls::All`]
//! ([`isolate_children`]; as root directly, otherwise inside a new user
//! namespace — whichever the kernel allows), forks ([`fork`]), and the
//! child walls itself in ([`cover`], [`hide_file`], [`mount_proc`],
//! [`make_read_only`], [`drop_privileges`] or [`drop_capabilities`])
//! before it touches the untrusted code. The child is the init of its PID
//! namespace:
//! when it ends, the kernel kills everything it started, daemons in new
//! sessions included; without namespaces the subreaper inherits them and
//! sweeps them ([`children`]).

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// Which namespaces a contained child gets, besides a PID namespace of its
/// own and a mount namespace to hide files in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Walls {
    /// Only those two: the child keeps the network and the host's IPC.
    Mounts,
    /// New network and IPC namespaces too: nothing to talk to.
    All,
}

/// What [`isolate_children`] got from the kernel.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Isolation {
    /// Children start in the new namespaces the [`Walls`] asked for.
    pub namespaces: bool,
    /// ... owned by a new user namespace (an unprivileged agent).
    pub user_namespace: bool,
}

/// The uid and gid a root agent's contained child runs as.
const NOBODY: u32 = 65534;

fn check(result: libc::c_int) -> io::Result<()> {
    if result == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Makes this process the reaper of every orphan below it: a daemon its
/// children start (double fork, `setsid`) becomes its child, not init's.
pub fn become_subreaper() -> io::Result<()> {
    // SAFETY: prctl with an integer option and argument touches no memory.
    check(unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) })
}

/// Moves this process's future children into new PID and mount
/// namespaces and, with [`Walls::All`], new network and IPC namespaces —
/// directly when privileged, else owned by a new user namespace that maps
/// only this process's own uid and gid. Neither allowed: no isolation (the
/// caller still contains by subreaper).
pub fn isolate_children(walls: Walls) -> Isolation {
    let mut flags = libc::CLONE_NEWPID | libc::CLONE_NEWNS;
    if walls == Walls::All {
        flags |= libc::CLONE_NEWNET | libc::CLONE_NEWIPC;
    }
    // SAFETY: unshare takes flags only; the PID namespace applies to
    // children, and this thread's other attributes stay valid.
    if unsafe { libc::unshare(flags) } == 0 {
        return Isolation {
            namespaces: true,
            user_namespace: false,
        };
    }
    // SAFETY: as above; geteuid/getegid cannot fail.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    // SAFETY: as above.
    if unsafe { libc::unshare(flags | libc::CLONE_NEWUSER) } != 0 {
        return Isolation::default();
    }
    // An unprivileged process may map only its own ids, and only once it
    // gave up setgroups. Unmapped, it would run as the overflow uid: still
    // isolated, so a failure here changes nothing that matters.
    let _ = std::fs::write("/proc/self/setgroups", "deny")
        .and_then(|()| std::fs::write("/proc/self/uid_map", format!("{uid} {uid} 1")))
        .and_then(|()| std::fs::write("/proc/self/gid_map", format!("{gid} {gid} 1")));
    Isolation {
        namespaces: true,
        user_namespace: true,
    }
}

/// The two sides of a [`fork`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forked {
    Child,
    Parent(u32),
}

/// Forks this process, which must have a single thread (checked: a fork
/// of a threaded process may inherit locks held by threads that are gone).
pub fn fork() -> io::Result<Forked> {
    let threads = std::fs::read_dir("/proc/self/task")?.count();
    if threads != 1 {
        return Err(io::Error::other(format!(
            "cannot fork a process with {threads} threads"
        )));
    }
    // SAFETY: the process has one thread (checked above), so the child
    // inherits no lock another thread held; it goes on running this
    // program's own code.
    match unsafe { libc::fork() } {
        -1 => Err(io::Error::last_os_error()),
        0 => Ok(Forked::Child),
        pid => Ok(Forked::Parent(pid as u32)),
    }
}

/// Makes every mount of this mount namespace private, so what the child
/// mounts next stays in it (a shared `/` would carry a mount over to the
/// agent's own namespace). Every function below that mounts calls it first.
fn make_private() -> io::Result<()> {
    // SAFETY: valid NUL-terminated strings; null fstype and data are
    // allowed for a propagation change.
    check(unsafe {
        libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        )
    })
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
}

/// In a child with a mount namespace: covers `dir` with an empty tmpfs of
/// `size` bytes that only its owner (root, or the agent's user in a user
/// namespace) may write, so what was there is out of sight, for the caller
/// to put what the contained code needs into, before [`make_read_only`].
pub fn cover(dir: &Path, size: u64) -> io::Result<()> {
    make_private()?;
    let target = c_path(dir)?;
    let options = CString::new(format!("size={size},mode=755")).expect("no NUL");
    // SAFETY: valid NUL-terminated strings, alive for the call.
    check(unsafe {
        libc::mount(
            c"nine9s-contained".as_ptr(),
            target.as_ptr(),
            c"tmpfs".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV,
            options.as_ptr().cast(),
        )
    })
}

/// In a child with a mount namespace: covers the file `file` with
/// `/dev/null` (a bind mount), so it reads as empty, and writing to it
/// writes nothing: a secret outside any covered directory, hidden without
/// hiding its neighbours.
pub fn hide_file(file: &Path) -> io::Result<()> {
    make_private()?;
    let target = c_path(file)?;
    // SAFETY: valid NUL-terminated strings, alive for the call; a bind
    // mount takes no fstype or data.
    check(unsafe {
        libc::mount(
            c"/dev/null".as_ptr(),
            target.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND,
            std::ptr::null(),
        )
    })
}

/// In the init of a new PID namespace with a mount namespace: mounts a
/// `/proc` of that PID namespace over the agent's, so the contained code
/// sees only its own processes (no other process's files, memory,
/// environment or root directory through `/proc/PID`).
pub fn mount_proc() -> io::Result<()> {
    make_private()?;
    // SAFETY: valid NUL-terminated strings; proc takes no data.
    check(unsafe {
        libc::mount(
            c"proc".as_ptr(),
            c"/proc".as_ptr(),
            c"proc".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            std::ptr::null(),
        )
    })
}

/// In a child with a mount namespace: every mount it sees becomes
/// read-only and `nosuid`, so it cannot write a file anywhere.
pub fn make_read_only() -> io::Result<()> {
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID,
        ..MountAttr::default()
    };
    // SAFETY: `attr` is a valid mount_attr of the size passed, alive for
    // the call; the path is NUL-terminated.
    let set = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            libc::AT_FDCWD,
            c"/".as_ptr(),
            libc::AT_RECURSIVE,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if set == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Gives up privileges for good before running untrusted code: root (not
/// in a user namespace) becomes `nobody`, with no capabilities and no
/// access to root's owner-only files; anyone else drops every
/// capability; and neither can gain any again (`no_new_privs`, so no
/// set-uid program either). Returns whether it became `nobody`.
pub fn drop_privileges(isolation: Isolation) -> io::Result<bool> {
    // SAFETY: geteuid cannot fail.
    let nobody = unsafe { libc::geteuid() } == 0 && !isolation.user_namespace;
    if nobody {
        // SAFETY: integer arguments only; an empty group list is allowed
        // with a null pointer.
        unsafe {
            check(libc::setgroups(0, std::ptr::null()))?;
            check(libc::setresgid(NOBODY, NOBODY, NOBODY))?;
            check(libc::setresuid(NOBODY, NOBODY, NOBODY))?;
        }
    } else {
        empty_capabilities()?;
    }
    no_new_privs()?;
    Ok(nobody)
}

/// Gives up every capability for good, keeping the user (root stays uid
/// 0, but without a capability it cannot undo a mount or reach another
/// user's files), and `no_new_privs`, so no program it runs gains any
/// (neither a set-uid one nor root's `exec`).
pub fn drop_capabilities() -> io::Result<()> {
    empty_capabilities()?;
    no_new_privs()
}

fn no_new_privs() -> io::Result<()> {
    // SAFETY: integer arguments only.
    check(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) })
}

/// Empties the effective, permitted and inheritable sets (the ambient
/// set follows the permitted one).
fn empty_capabilities() -> io::Result<()> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: libc::c_int,
    }
    #[repr(C)]
    #[derive(Default, Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const VERSION_3: u32 = 0x2008_0522;
    let header = Header {
        version: VERSION_3,
        pid: 0,
    };
    let data = [Data::default(); 2];
    // SAFETY: a version-3 header and the two data words it calls for,
    // both alive for the call.
    let set = unsafe { libc::syscall(libc::SYS_capset, &header as *const Header, data.as_ptr()) };
    if set == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `struct mount_attr` of `mount_setattr(2)`.
#[repr(C)]
#[derive(Default)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}
const MOUNT_ATTR_RDONLY: u64 = 0x1;
const MOUNT_ATTR_NOSUID: u64 = 0x2;

/// The pids whose parent is `parent` (read from `/proc`): what a
/// subreaper inherited.
pub fn children(parent: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            // `pid (comm) state ppid ...`: comm may hold anything, so
            // the fields are read after its last `)`.
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
                stat.rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok())
                    == Some(parent)
            })
        })
        .collect()
}
