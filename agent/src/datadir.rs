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
//!
//! Under `--worker-user USER` (`worker_user.rs`) the agent's user is root,
//! the supervisor's, and the same rule holds with one change: what the
//! worker writes — `db` and `artifacts` — is USER's, and nobody else's.
//! The data dir itself, `admin.token` and `control.sock` stay root's, the
//! data dir mode 0711 so that USER can reach its own directories inside,
//! and the supervisor makes sure USER can pass every directory on the way.
//! The worker runs the same checks (as USER, it changes nothing).

use std::fmt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::config::Config;
use crate::worker_user::WorkerUser;

/// The entries of the data dir the agent makes, and what each is.
const ENTRIES: [(&str, Expect); 4] = [
    ("admin.token", Expect::Secret),
    ("db", Expect::WorkDir),
    ("artifacts", Expect::WorkDir),
    ("standby.json", Expect::File),
];

/// Why the data dir, or a file a flag names, cannot be used. A leaf: the
/// agent's `Error` wraps it (`Error::DataDir`), and every refusal here is
/// the operator's to fix (the agent exits 2).
#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    #[error(transparent)]
    Unsafe(#[from] UnsafePath),
    /// The `--worker-user` cannot pass a directory on the way.
    #[error("{0}")]
    Unreachable(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl DataDirError {
    /// Wraps an I/O error with what was being done.
    fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> DataDirError {
        let context = context.into();
        move |source| DataDirError::Io { context, source }
    }
}

type Error = DataDirError;

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
    /// `worker`: the owner wanted is the `--worker-user`.
    Owner {
        owner: u32,
        me: u32,
        root_too: bool,
        worker: bool,
    },
    Writable {
        mode: u32,
    },
    Readable {
        mode: u32,
    },
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
                worker,
            } => write!(
                f,
                "is owned by {}, not by {} (the {}){}",
                user(*owner),
                user(*me),
                if *worker {
                    "--worker-user, which writes it"
                } else {
                    "agent's user"
                },
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
    /// The data dir: the agent's user's.
    Dir,
    /// A directory in the data dir the worker writes (the store, the
    /// artifacts): the `--worker-user`'s, or without one the agent's user's.
    WorkDir,
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
    /// The `--worker-user`'s uid, if there is one.
    worker: Option<u32>,
}

impl Me {
    fn now() -> Me {
        let uid = rustix::process::geteuid().as_raw();
        let gid = rustix::process::getegid().as_raw();
        Me {
            uid,
            gid,
            private_group: private_group(uid, gid),
            worker: None,
        }
    }

    /// The agent's user, in the supervisor and in its workers alike: under
    /// `--worker-user`, root (the supervisor's), with the worker's uid.
    fn of(worker: Option<&WorkerUser>) -> Me {
        match worker {
            Some(worker) => Me {
                uid: 0,
                gid: 0,
                private_group: private_group(0, 0),
                worker: Some(worker.uid),
            },
            None => Me::now(),
        }
    }
}

/// This process is root: under `--worker-user`, the supervisor, not a worker.
fn is_root() -> bool {
    rustix::process::geteuid().is_root()
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
        Ancestor | Dir | WorkDir if !facts.dir => return Err(Problem::NotDir),
        File | Secret | GivenSecret if !facts.file => return Err(Problem::NotFile),
        _ => {}
    }
    let root_too = matches!(expect, Ancestor | Given | GivenSecret);
    let worker = me.worker.filter(|_| expect == WorkDir);
    let owner = worker.unwrap_or(me.uid);
    if facts.uid != owner && !(root_too && facts.uid == 0) {
        return Err(Problem::Owner {
            owner: facts.uid,
            me: owner,
            root_too,
            worker: worker.is_some(),
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
        Expect::WorkDir => {
            "Remove it, or give it to the user that writes it (chown -R the --worker-user, or the agent's user without one), and start again"
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
/// owner-only. A missing file is a `DataDirError::Io` of kind `NotFound`.
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

/// The directories of the data dir a worker writes, made the
/// `--worker-user`'s.
const WORK_DIRS: [&str; 2] = ["db", "artifacts"];

/// Creates the data dir if needed (what is missing of its path, owner-only)
/// and checks it, its path and what the agent keeps in it; makes it
/// owner-only. Run before anything is read from or made in it: the
/// supervisor before it binds anything there, the worker before it opens
/// the tokens or the store. Under `--worker-user` the supervisor also
/// makes the directories the worker writes its user's, and the data dir
/// 0711 (USER passes it, lists nothing); the worker only checks.
pub fn prepare(dir: &Path, worker: Option<&WorkerUser>) -> Result<(), Error> {
    let context = || format!("cannot prepare the data dir {}", dir.display());
    let me = Me::of(worker);
    // Nothing is made under a directory another user controls.
    check_ancestors("the data dir", dir, me)?;
    if worker.is_some() && !is_root() {
        // A worker: its supervisor made it all.
        return check_data_dir(dir, me);
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(Error::io(context()))?;
    if let Some(worker) = worker {
        // The data dir is root's and checked: no one else can put
        // anything in it, or in what root owns inside it, meanwhile.
        let real = dir.canonicalize().map_err(Error::io(context()))?;
        check_path("the data dir", &real, Expect::Dir, me)?;
        for name in WORK_DIRS {
            let path = real.join(name);
            match std::fs::symlink_metadata(&path) {
                Err(_) => {
                    std::fs::DirBuilder::new()
                        .mode(0o700)
                        .create(&path)
                        .map_err(Error::io(context()))?;
                    hand_over(&path, worker).map_err(Error::io(context()))?;
                }
                // Made by the agent before it had a worker user (or
                // chowned to root by systemd's StateDirectory=): root's
                // alone, so it is the worker's to have.
                Ok(meta) if meta.is_dir() && meta.uid() == 0 => {
                    tracing::info!(path = %path.display(), user = %worker.name, "giving the --worker-user what the worker writes");
                    hand_over(&path, worker).map_err(Error::io(context()))?;
                }
                Ok(_) => {}
            }
        }
    }
    check_data_dir(dir, me)?;
    let mode = std::fs::metadata(dir).map_err(Error::io(context()))?.mode();
    let wanted = if worker.is_some() { 0o711 } else { 0o700 };
    if mode & 0o077 != wanted & 0o077 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(wanted))
            .map_err(Error::io(context()))?;
    }
    if let Some(worker) = worker {
        reachable(dir, worker)?;
    }
    Ok(())
}

/// Makes `path` and what is below it the worker's, without following a
/// symlink (a link itself is handed over, not what it names).
fn hand_over(path: &Path, worker: &WorkerUser) -> std::io::Result<()> {
    std::os::unix::fs::lchown(path, Some(worker.uid), Some(worker.gid))?;
    if std::fs::symlink_metadata(path)?.is_dir() {
        for entry in std::fs::read_dir(path)? {
            hand_over(&entry?.path(), worker)?;
        }
    }
    Ok(())
}

/// Refuses a data dir the worker's user cannot reach: a directory on the
/// way (or the data dir) that does not let it search through.
fn reachable(dir: &Path, worker: &WorkerUser) -> Result<(), Error> {
    let real = dir.canonicalize().map_err(Error::io(format!(
        "cannot resolve the data dir {}",
        dir.display()
    )))?;
    for path in real.ancestors() {
        let meta = std::fs::metadata(path)
            .map_err(Error::io(format!("cannot inspect {}", path.display())))?;
        if !searchable(Facts::of(&meta), worker) {
            return Err(Error::Unreachable(format!(
                    "the --worker-user {} cannot reach the data dir {}: {} (mode {:04o}, owned by {}) does not let it through. Give others the search bit (chmod o+x), or choose a data dir under directories it can pass",
                    worker.name,
                    dir.display(),
                    path.display(),
                    meta.mode() & 0o7777,
                    user(meta.uid()),
            )));
        }
    }
    Ok(())
}

/// Whether `worker` (its primary group only: workers have no others) may
/// search a directory.
fn searchable(facts: Facts, worker: &WorkerUser) -> bool {
    let bit = if facts.uid == worker.uid {
        0o100
    } else if facts.gid == worker.gid {
        0o010
    } else {
        0o001
    };
    facts.mode & bit != 0
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
    let me = Me::of(config.worker_user.as_ref());
    check_data_dir(&config.data_dir, me)?;
    // A worker under --worker-user reads neither: its supervisor does, and
    // hands it what it needs.
    let handed = config.worker_user.is_some() && !is_root();
    if let Some(tokens) = config.tokens.as_ref().filter(|_| !handed) {
        check_given("the tokens file", tokens, Expect::GivenSecret, me)?;
    }
    if let Some(tls) = config.tls.as_ref().filter(|_| !handed) {
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
        worker: None,
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
    fn under_a_worker_user_what_it_writes_is_its_and_the_rest_roots() {
        use Expect::*;
        let nobody = WorkerUser {
            name: "nobody".into(),
            uid: 65534,
            gid: 65534,
        };
        let me = Me {
            uid: 0,
            gid: 0,
            private_group: true,
            worker: Some(nobody.uid),
        };
        let ok = |f, e| judge(f, e, me).is_ok();
        // The store and the artifacts: the worker's, and no one else's.
        assert!(ok(facts(65534, 65534, 0o700, true), WorkDir));
        for owner in [0, 1000] {
            assert_eq!(
                judge(facts(owner, 0, 0o700, true), WorkDir, me),
                Err(Problem::Owner {
                    owner,
                    me: 65534,
                    root_too: false,
                    worker: true,
                })
            );
        }
        assert!(!ok(facts(65534, 65534, 0o770, true), WorkDir));
        // The data dir and the admin token: root's, never the worker's.
        assert!(ok(facts(0, 0, 0o711, true), Dir));
        assert!(ok(facts(0, 0, 0o600, false), Secret));
        assert!(!ok(facts(65534, 65534, 0o700, true), Dir));
        assert!(!ok(facts(65534, 65534, 0o600, false), Secret));
        assert!(!ok(facts(0, 0, 0o644, false), Secret));
        // Files flags name: root's (or the agent's, root) as before.
        assert!(ok(facts(0, 0, 0o600, false), GivenSecret));
        assert!(!ok(facts(65534, 65534, 0o600, false), GivenSecret));
        // Without a worker user, the store is the agent's user's.
        assert!(judge(facts(1000, 1000, 0o700, true), WorkDir, ME).is_ok());
        assert!(judge(facts(65534, 65534, 0o700, true), WorkDir, ME).is_err());
        // Can the worker pass a directory? By owner, primary group or others.
        assert!(searchable(facts(0, 0, 0o711, true), &nobody));
        assert!(!searchable(facts(0, 0, 0o700, true), &nobody));
        assert!(searchable(facts(0, 65534, 0o710, true), &nobody));
        assert!(searchable(facts(65534, 0, 0o700, true), &nobody));
        assert!(!searchable(facts(65534, 0, 0o077, true), &nobody));
    }

    /// The layout made under a worker user (the tests run as root).
    #[test]
    fn a_worker_users_data_dir_is_made_and_checked() {
        if !is_root() {
            return;
        }
        let Ok(nobody) = WorkerUser::lookup("nobody") else {
            return;
        };
        let top = tempfile::tempdir().unwrap();
        // A directory on the way the worker cannot pass.
        std::fs::set_permissions(top.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let err = prepare(&top.path().join("data"), Some(&nobody))
            .unwrap_err()
            .to_string();
        assert!(err.contains("cannot reach the data dir"), "{err}");
        std::fs::set_permissions(top.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
        let dir = top.path().join("data");
        prepare(&dir, Some(&nobody)).unwrap();
        let meta = |p: &Path| std::fs::metadata(p).unwrap();
        assert_eq!((meta(&dir).uid(), meta(&dir).mode() & 0o777), (0, 0o711));
        for name in WORK_DIRS {
            let m = meta(&dir.join(name));
            assert_eq!((m.uid(), m.gid(), m.mode() & 0o777), (65534, 65534, 0o700));
        }
        prepare(&dir, Some(&nobody)).unwrap();
        // A store the agent made without --worker-user is root's: handed
        // over, all of it. One of a third user's is refused.
        let db = dir.join("db");
        std::fs::create_dir(db.join("blobs")).unwrap();
        std::fs::write(db.join("blobs/1"), "x").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", db.join("link")).unwrap();
        for path in [&db, &db.join("blobs"), &db.join("blobs/1")] {
            chown(path, Some(0), Some(0)).unwrap();
        }
        prepare(&dir, Some(&nobody)).unwrap();
        for path in [&db, &db.join("blobs"), &db.join("blobs/1")] {
            assert_eq!(meta(path).uid(), 65534, "{}", path.display());
        }
        assert_eq!(meta(Path::new("/etc/passwd")).uid(), 0, "not followed");
        chown(&db, Some(1234), None).unwrap();
        let err = prepare(&dir, Some(&nobody)).unwrap_err().to_string();
        assert!(err.contains("--worker-user") && err.contains("db"), "{err}");
        // The worker's store is refused to an agent without the flag.
        chown(dir.join("db"), Some(65534), None).unwrap();
        let err = prepare(&dir, None).unwrap_err().to_string();
        assert!(err.contains("uid 65534"), "{err}");
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
            worker: false,
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
        prepare(&dir, None).unwrap();
        assert_eq!(
            std::fs::metadata(&dir).unwrap().mode() & 0o777,
            0o700,
            "made owner-only"
        );
        // A planted admin token, a symlinked store, a data dir of nobody's.
        let token = dir.join("admin.token");
        std::fs::write(&token, "0123456789abcdef0123").unwrap();
        chown(&token, Some(65534), None).unwrap();
        let err = prepare(&dir, None).unwrap_err().to_string();
        assert!(
            err.contains("admin.token") && err.contains("uid 65534"),
            "{err}"
        );
        std::fs::remove_file(&token).unwrap();
        std::os::unix::fs::symlink(top.path(), dir.join("db")).unwrap();
        let err = prepare(&dir, None).unwrap_err().to_string();
        assert!(err.contains("symbolic link"), "{err}");
        std::fs::remove_file(dir.join("db")).unwrap();
        chown(&dir, Some(65534), None).unwrap();
        assert!(prepare(&dir, None).is_err());
        // A directory on the way that others can write to, without the
        // sticky bit.
        let open = top.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = prepare(&open.join("data"), None).unwrap_err().to_string();
        assert!(err.contains("writable by group or others"), "{err}");
        assert!(!open.join("data").exists(), "nothing made under it");
    }
}
