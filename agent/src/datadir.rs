//! Whose files the agent trusts. The data dir holds the admin token, the
//! store and the libraries the agent runs; the tokens file, the TLS key,
//! the client CA and the trusted keys decide who may drive it. Another
//! local user who made or can change any of them could plant a token or a
//! key and become the agent's admin (root, when it runs as root). So before
//! the agent uses them it checks each path as OpenSSH checks a secure path:
//! the thing itself owned by the agent's user (or root, for what lies
//! outside the data dir), every directory on the way to it owned by the
//! agent's user or root, and none writable by group or others (a directory
//! on the way may be, with the sticky bit, like `/tmp`); secrets (the
//! admin token, the tokens file, the TLS key) not readable by them either.
//! Nothing in the data dir may be a symlink. A path that fails is refused
//! with its owner named, and the agent does not start (exit 2).
//!
//! One allowance keeps Kubernetes working: a root-owned file or directory
//! whose group is the agent's own group (an `fsGroup` volume, a Secret with
//! `defaultMode: 0440`) has its group bits counted as the agent's.

use std::fmt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::config::Config;
use crate::error::Error;

/// The entries of the data dir the agent makes, and what each is.
const ENTRIES: [(&str, Expect); 4] = [
    ("admin.token", Expect::Secret),
    ("db", Expect::Dir),
    ("artifacts", Expect::Dir),
    ("standby.json", Expect::File),
];

/// A path the agent refuses to use, and why.
#[derive(Debug, thiserror::Error)]
#[error("refusing {what} {path}: it {problem}; another local user could use it to take over the agent. {advice}", path = path.display())]
pub struct UnsafePath {
    what: &'static str,
    path: PathBuf,
    problem: Problem,
    advice: &'static str,
}

/// What is wrong with a path (its metadata alone tells).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Problem {
    Symlink,
    NotDir,
    NotFile,
    Owner { owner: u32, me: u32, root_too: bool },
    Writable { mode: u32 },
    Readable { mode: u32 },
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::Symlink => f.write_str("is a symbolic link (nothing in the data dir may be)"),
            Problem::NotDir => f.write_str("is not a directory"),
            Problem::NotFile => f.write_str("is not a regular file"),
            Problem::Owner {
                owner,
                me,
                root_too,
            } => write!(
                f,
                "is owned by {}, not by {} (the agent's user){}",
                user(*owner),
                user(*me),
                if *root_too { " or root" } else { "" }
            ),
            Problem::Writable { mode } => {
                write!(f, "is writable by group or others (mode {mode:04o})")
            }
            Problem::Readable { mode } => write!(
                f,
                "holds a secret and is readable by group or others (mode {mode:04o})"
            ),
        }
    }
}

/// "nobody (uid 65534)", or "uid 1234" for a uid `/etc/passwd` does not name.
fn user(uid: u32) -> String {
    match user_name(uid) {
        Some(name) => format!("{name} (uid {uid})"),
        None => format!("uid {uid}"),
    }
}

/// The name `/etc/passwd` gives `uid`, if it lists it.
pub(crate) fn user_name(uid: u32) -> Option<String> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        let name = fields.next().filter(|name| !name.is_empty())?;
        (fields.nth(1)?.parse::<u32>().ok()? == uid).then(|| name.to_owned())
    })
}

/// What a path must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// A directory on the way to one checked: the agent's user's or root's;
    /// writable by others only with the sticky bit.
    Ancestor,
    /// The data dir, or a directory in it: the agent's user's.
    Dir,
    /// A file in the data dir: the agent's user's.
    File,
    /// A secret in the data dir: the agent's user's, and only readable by it.
    Secret,
    /// A file or directory named by a flag: the agent's user's or root's.
    Given,
    /// A secret named by a flag (tokens, TLS key): also only readable by
    /// its owner.
    GivenSecret,
}

/// The metadata the checks look at.
#[derive(Debug, Clone, Copy)]
struct Facts {
    uid: u32,
    gid: u32,
    mode: u32,
    symlink: bool,
    dir: bool,
    file: bool,
}

impl Facts {
    fn of(meta: &std::fs::Metadata) -> Facts {
        let kind = meta.file_type();
        Facts {
            uid: meta.uid(),
            gid: meta.gid(),
            mode: meta.mode() & 0o7777,
            symlink: kind.is_symlink(),
            dir: kind.is_dir(),
            file: kind.is_file(),
        }
    }
}

/// Who the agent runs as.
#[derive(Debug, Clone, Copy)]
struct Me {
    uid: u32,
    gid: u32,
    /// The agent's group is its user's own (a user private group, as
    /// Debian and Fedora give each user, with umask 002): no other user has
    /// it, so its group bits are the agent's too.
    private_group: bool,
}

impl Me {
    fn now() -> Me {
        let uid = rustix::process::geteuid().as_raw();
        let gid = rustix::process::getegid().as_raw();
        Me {
            uid,
            gid,
            private_group: private_group(uid, gid),
        }
    }
}

/// Whether only `uid` is in group `gid`: `/etc/group` lists no member
/// for it and no other user of `/etc/passwd` has it as primary group.
/// Unreadable files or a group they do not list: not private.
fn private_group(uid: u32, gid: u32) -> bool {
    match (
        std::fs::read_to_string("/etc/group"),
        std::fs::read_to_string("/etc/passwd"),
    ) {
        (Ok(groups), Ok(passwd)) => private_in(uid, gid, &groups, &passwd),
        _ => false,
    }
}

/// [`private_group`] on the text of `/etc/group` and `/etc/passwd`.
fn private_in(uid: u32, gid: u32, groups: &str, passwd: &str) -> bool {
    let id = |field: Option<&str>| field.and_then(|f| f.parse::<u32>().ok());
    let mut listed = false;
    for line in groups.lines() {
        let fields: Vec<&str> = line.split(':').collect();
        if id(fields.get(2).copied()) == Some(gid) {
            if fields
                .get(3)
                .is_some_and(|members| !members.trim().is_empty())
            {
                return false;
            }
            listed = true;
        }
    }
    listed
        && passwd.lines().all(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            id(fields.get(3).copied()) != Some(gid) || id(fields.get(2).copied()) == Some(uid)
        })
}

/// The rule, on metadata alone.
fn judge(facts: Facts, expect: Expect, me: Me) -> Result<(), Problem> {
    use Expect::*;
    if facts.symlink {
        return Err(Problem::Symlink);
    }
    match expect {
        Ancestor | Dir if !facts.dir => return Err(Problem::NotDir),
        File | Secret | GivenSecret if !facts.file => return Err(Problem::NotFile),
        _ => {}
    }
    let root_too = matches!(expect, Ancestor | Given | GivenSecret);
    if facts.uid != me.uid && !(root_too && facts.uid == 0) {
        return Err(Problem::Owner {
            owner: facts.uid,
            me: me.uid,
            root_too,
        });
    }
    // Root gave the agent's own group access (Kubernetes' fsGroup), or
    // the group is the agent's user's alone.
    let group_is_mine = facts.gid == me.gid && (facts.uid == 0 || me.private_group);
    let others = |bit: u32| bit | if group_is_mine { 0 } else { bit << 3 };
    let sticky = expect == Ancestor && facts.mode & 0o1000 != 0;
    if facts.mode & others(0o002) != 0 && !sticky {
        return Err(Problem::Writable { mode: facts.mode });
    }
    if matches!(expect, Secret | GivenSecret) && facts.mode & others(0o004) != 0 {
        return Err(Problem::Readable { mode: facts.mode });
    }
    Ok(())
}

/// Checks one path, following symlinks unless it is in the data dir.
fn check_path(what: &'static str, path: &Path, expect: Expect, me: Me) -> Result<(), Error> {
    let meta = match expect {
        Expect::Ancestor | Expect::Given | Expect::GivenSecret => std::fs::metadata(path),
        _ => std::fs::symlink_metadata(path),
    };
    let meta = meta.map_err(Error::io(format!(
        "cannot inspect {what} {}",
        path.display()
    )))?;
    judge(Facts::of(&meta), expect, me).map_err(|problem| unsafe_path(what, path, problem, expect))
}

fn advice(expect: Expect) -> &'static str {
    match expect {
        Expect::Ancestor => {
            "Give a path whose directories only the agent's user or root can change"
        }
        Expect::Dir | Expect::File | Expect::Secret => {
            "Remove it (or give --data-dir a directory of the agent's user's own) and start again"
        }
        Expect::Given | Expect::GivenSecret => {
            "Make it the agent's user's (or root's) and owner-only (chown, chmod 0600, or 0400)"
        }
    }
}

/// `O_NOFOLLOW`, for `OpenOptionsExt::custom_flags`: files in the data dir
/// are never opened through a symlink.
pub(crate) const NOFOLLOW: i32 = rustix::fs::OFlags::NOFOLLOW.bits() as i32;

/// Reads a secret of the data dir (the admin token) without following a
/// symlink, checking the file opened (not the path) is the agent's own and
/// owner-only. A missing file is an `Error::Io` of kind `NotFound`.
pub(crate) fn read_secret(path: &Path) -> Result<String, Error> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let context = || format!("cannot read {}", path.display());
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(NOFOLLOW | rustix::fs::OFlags::NONBLOCK.bits() as i32)
        .open(path)
        .map_err(|e| {
            if e.raw_os_error() == Some(rustix::io::Errno::LOOP.raw_os_error()) {
                unsafe_path("a data dir entry", path, Problem::Symlink, Expect::Secret)
            } else {
                Error::io(context())(e)
            }
        })?;
    let meta = file.metadata().map_err(Error::io(context()))?;
    judge(Facts::of(&meta), Expect::Secret, Me::now())
        .map_err(|problem| unsafe_path("a data dir entry", path, problem, Expect::Secret))?;
    let mut text = String::new();
    // A token is short: a bigger file is not one.
    (&mut file)
        .take(4096)
        .read_to_string(&mut text)
        .map_err(Error::io(context()))?;
    Ok(text)
}

fn unsafe_path(what: &'static str, path: &Path, problem: Problem, expect: Expect) -> Error {
    UnsafePath {
        what,
        path: path.to_owned(),
        problem,
        advice: advice(expect),
    }
    .into()
}

/// Checks every directory on the way to `path` (the path as given, and the
/// one its symlinks lead to), leaving out `path` itself. Directories that
/// do not exist yet are skipped.
fn check_ancestors(what: &'static str, path: &Path, me: Me) -> Result<(), Error> {
    let given = std::path::absolute(path).map_err(Error::io(format!(
        "cannot resolve {what} {}",
        path.display()
    )))?;
    let real = existing_real(&given);
    for path in [Some(given), real].into_iter().flatten() {
        for dir in path.ancestors().skip(1) {
            if dir.exists() {
                check_path(what, dir, Expect::Ancestor, me)?;
            }
        }
    }
    Ok(())
}

/// `path` with the symlinks of its longest existing part resolved.
fn existing_real(path: &Path) -> Option<PathBuf> {
    let mut rest = Vec::new();
    let mut head = path;
    loop {
        if let Ok(real) = head.canonicalize() {
            return Some(rest.iter().rev().fold(real, |p, c| p.join(c)));
        }
        rest.push(head.file_name()?);
        head = head.parent()?;
    }
}

/// Creates the data dir if needed (what is missing of its path, owner-only)
/// and checks it, its path and what the agent keeps in it; makes it
/// owner-only. Run before anything is read from or made in it: the
/// supervisor before it binds anything there, the worker before it opens
/// the tokens or the store.
pub fn prepare(dir: &Path) -> Result<(), Error> {
    let context = || format!("cannot prepare the data dir {}", dir.display());
    let me = Me::now();
    // Nothing is made under a directory another user controls.
    check_ancestors("the data dir", dir, me)?;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(Error::io(context()))?;
    check_data_dir(dir, me)?;
    let mode = std::fs::metadata(dir).map_err(Error::io(context()))?.mode();
    if mode & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(Error::io(context()))?;
    }
    Ok(())
}

fn check_data_dir(dir: &Path, me: Me) -> Result<(), Error> {
    const WHAT: &str = "the data dir";
    check_ancestors(WHAT, dir, me)?;
    if !dir.exists() {
        return Ok(());
    }
    // The data dir itself may be a symlink (its ancestors' owners decide
    // where it points): what it leads to must be the agent's own.
    let real = dir.canonicalize().map_err(Error::io(format!(
        "cannot resolve {WHAT} {}",
        dir.display()
    )))?;
    check_path(WHAT, &real, Expect::Dir, me)?;
    for (name, expect) in ENTRIES {
        let path = real.join(name);
        if std::fs::symlink_metadata(&path).is_ok() {
            check_path("a data dir entry", &path, expect, me)?;
        }
    }
    Ok(())
}

/// Checks a file or directory named by a flag, and the way to it.
fn check_given(what: &'static str, path: &Path, expect: Expect, me: Me) -> Result<(), Error> {
    check_ancestors(what, path, me)?;
    if path.exists() {
        check_path(what, path, expect, me)?;
    }
    Ok(())
}

/// What would give a release the agent's credentials: the data dir (the
/// admin token, the store, the control socket), the tokens file and the
/// TLS key. The rehearsal hides them from the release's code.
pub fn secrets(config: &Config) -> Vec<PathBuf> {
    let mut secrets = vec![config.data_dir.clone()];
    secrets.extend(config.tokens.clone());
    secrets.extend(config.tls.as_ref().map(|tls| tls.key.clone()));
    secrets
}

/// Every check, without creating anything: the data dir (as far as it
/// exists), the tokens file, the TLS files and the trusted keys. What
/// `agent FLAGS check` and the supervisor run before a worker starts.
pub fn check(config: &Config) -> Result<(), Error> {
    let me = Me::now();
    check_data_dir(&config.data_dir, me)?;
    if let Some(tokens) = &config.tokens {
        check_given("the tokens file", tokens, Expect::GivenSecret, me)?;
    }
    if let Some(tls) = &config.tls {
        check_given("the TLS key", &tls.key, Expect::GivenSecret, me)?;
        check_given("the TLS certificate", &tls.cert, Expect::Given, me)?;
        if let Some(ca) = &tls.client_ca {
            check_given("the client CA", ca, Expect::Given, me)?;
        }
    }
    if let Some(keys) = &config.trusted_keys {
        const WHAT: &str = "the trusted keys";
        check_given(WHAT, keys, Expect::Given, me)?;
        // A planted public key is code execution: every key file too.
        if let Ok(entries) = std::fs::read_dir(keys) {
            for entry in entries.flatten() {
                let path = entry.path();
                if path.extension().is_some_and(|e| e == "pub") {
                    check_path(WHAT, &path, Expect::Given, me)?;
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::chown;

    const ME: Me = Me {
        uid: 1000,
        gid: 1000,
        private_group: false,
    };

    fn facts(uid: u32, gid: u32, mode: u32, dir: bool) -> Facts {
        Facts {
            uid,
            gid,
            mode,
            symlink: false,
            dir,
            file: !dir,
        }
    }

    #[test]
    fn the_rule_on_metadata() {
        use Expect::*;
        let ok = |f, e| judge(f, e, ME).is_ok();
        // The agent's own, owner-only: everything passes.
        assert!(ok(facts(1000, 1000, 0o700, true), Dir));
        assert!(ok(facts(1000, 1000, 0o600, false), Secret));
        // Another user's data dir, token, or directory on the way.
        for (f, e) in [
            (facts(65534, 1000, 0o700, true), Dir),
            (facts(65534, 1000, 0o600, false), Secret),
            (facts(65534, 65534, 0o755, true), Ancestor),
            (facts(0, 0, 0o600, false), Secret),
        ] {
            assert!(
                matches!(judge(f, e, ME), Err(Problem::Owner { .. })),
                "{f:?}"
            );
        }
        // Root's directories on the way and files given are fine.
        assert!(ok(facts(0, 0, 0o755, true), Ancestor));
        assert!(ok(facts(0, 0, 0o600, false), GivenSecret));
        // Writable by others: refused, but for a sticky directory on the way.
        assert_eq!(
            judge(facts(0, 0, 0o777, true), Ancestor, ME),
            Err(Problem::Writable { mode: 0o777 })
        );
        assert!(ok(facts(0, 0, 0o1777, true), Ancestor));
        assert!(!ok(facts(1000, 1000, 0o1777, true), Dir));
        assert!(!ok(facts(1000, 1000, 0o620, false), File));
        // Secrets: readable by group or others is refused too.
        assert_eq!(
            judge(facts(1000, 1000, 0o644, false), GivenSecret, ME),
            Err(Problem::Readable { mode: 0o644 })
        );
        assert!(ok(facts(1000, 1000, 0o644, false), Given));
        // Root's file in the agent's own group (fsGroup): group bits are the agent's.
        assert!(ok(facts(0, 1000, 0o440, false), GivenSecret));
        assert!(ok(facts(0, 1000, 0o2775, true), Ancestor));
        assert!(!ok(facts(0, 1001, 0o440, false), GivenSecret));
        assert!(!ok(facts(0, 1000, 0o444, false), GivenSecret));
        // A user private group (umask 002): its group bits are the agent's,
        // another group's are not.
        let upg = Me {
            private_group: true,
            ..ME
        };
        assert!(judge(facts(1000, 1000, 0o775, true), Dir, upg).is_ok());
        assert!(judge(facts(1000, 1000, 0o660, false), Secret, upg).is_ok());
        assert!(judge(facts(1000, 1001, 0o775, true), Dir, upg).is_err());
        assert!(judge(facts(1000, 1000, 0o777, true), Dir, upg).is_err());
        assert!(!ok(facts(1000, 1000, 0o775, true), Dir));
        // Kinds and symlinks.
        let mut link = facts(1000, 1000, 0o777, false);
        link.symlink = true;
        assert_eq!(judge(link, Secret, ME), Err(Problem::Symlink));
        assert_eq!(
            judge(facts(1000, 1000, 0o700, true), Secret, ME),
            Err(Problem::NotFile)
        );
    }

    #[test]
    fn a_group_is_private_when_no_one_else_is_in_it() {
        let groups = "root:x:0:\nusers:x:100:ann,bob\nann:x:1000:\nbob:x:1001:\nstaff:x:50:\n";
        let passwd = "root:x:0:0::/root:/bin/sh\nann:x:1000:1000::/home/ann:/bin/sh\nbob:x:1001:1001::/home/bob:/bin/sh\ncarl:x:1002:50::/home/carl:/bin/sh\n";
        assert!(private_in(1000, 1000, groups, passwd));
        assert!(private_in(0, 0, groups, passwd));
        // Members listed, another user's primary group, or not listed at all.
        assert!(!private_in(1000, 100, groups, passwd));
        assert!(!private_in(1000, 50, groups, passwd));
        assert!(!private_in(1000, 1001, groups, passwd));
        assert!(!private_in(1000, 4242, groups, passwd));
    }

    #[test]
    fn messages_name_the_owner() {
        let problem = Problem::Owner {
            owner: 0,
            me: 4_000_000_000,
            root_too: false,
        };
        assert_eq!(
            problem.to_string(),
            "is owned by root (uid 0), not by uid 4000000000 (the agent's user)"
        );
    }

    /// The checks on real files (the tests run as root: chown works).
    #[test]
    fn planted_data_dirs_are_refused() {
        let me = Me::now();
        if me.uid != 0 {
            return;
        }
        let top = tempfile::tempdir().unwrap();
        let dir = top.path().join("data");
        prepare(&dir).unwrap();
        assert_eq!(
            std::fs::metadata(&dir).unwrap().mode() & 0o777,
            0o700,
            "made owner-only"
        );
        // A planted admin token, a symlinked store, a data dir of nobody's.
        let token = dir.join("admin.token");
        std::fs::write(&token, "0123456789abcdef0123").unwrap();
        chown(&token, Some(65534), None).unwrap();
        let err = prepare(&dir).unwrap_err().to_string();
        assert!(
            err.contains("admin.token") && err.contains("uid 65534"),
            "{err}"
        );
        std::fs::remove_file(&token).unwrap();
        std::os::unix::fs::symlink(top.path(), dir.join("db")).unwrap();
        let err = prepare(&dir).unwrap_err().to_string();
        assert!(err.contains("symbolic link"), "{err}");
        std::fs::remove_file(dir.join("db")).unwrap();
        chown(&dir, Some(65534), None).unwrap();
        assert!(prepare(&dir).is_err());
        // A directory on the way that others can write to, without the
        // sticky bit.
        let open = top.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = prepare(&open.join("data")).unwrap_err().to_string();
        assert!(err.contains("writable by group or others"), "{err}");
        assert!(!open.join("data").exists(), "nothing made under it");
    }
}
