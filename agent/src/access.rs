//! Who may drive the control plane: bearer tokens (and, over mTLS, client
//! certificates), each naming an identity with a role, and on the local
//! control socket (`DATA/control.sock`) the caller's uid as the kernel
//! tells it (`SO_PEERCRED`): the agent's own user and root are admins
//! (`local:<user>`), anyone else is refused, and no token is looked at
//! there. Every RPC asks [`Access::check`] for the role it needs before it
//! reads its request: it is the one place that decides who the caller is.
//!
//! Under `--worker-user` the worker never reads a token: its supervisor
//! hands it [`Access::digests`] (`worker_user.rs`), and on the local
//! socket only root is its admin ([`Access::from_handed`]), never the
//! worker's own user, which release code runs as.
//!
//! With no `--tokens` file the agent keeps one admin token in
//! `DATA/admin.token`, created owner-only at first start, for clients
//! that reach the agent over TCP (over TLS beyond this machine).
//! Tokens are compared by their sha256 in constant time, and every
//! entry is compared, so timing tells nothing about which one matched.

use std::fmt;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::error::{Error, Reason, Result};

/// Shortest token accepted in a tokens file: guessing must be hopeless.
const MIN_TOKEN: usize = 16;
const MAX_NAME: usize = 64;

/// What an identity may do; each role includes the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// Status, releases, history, watch, info, rollouts.
    Read,
    /// Stage, upgrade, downgrade, rollback, make-permanent, lease.
    Deploy,
    /// Remove, and everything else.
    Admin,
}

impl Role {
    fn parse(text: &str) -> Option<Role> {
        match text {
            "read" => Some(Role::Read),
            "deploy" => Some(Role::Deploy),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Read => "read",
            Role::Deploy => "deploy",
            Role::Admin => "admin",
        })
    }
}

/// A caller the agent recognised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub name: String,
    pub role: Role,
}

struct Entry {
    identity: Identity,
    /// sha256 of the token; `None` for a certificate-only identity.
    digest: Option<[u8; 32]>,
}

/// The identities the control plane knows.
pub struct Access {
    entries: Vec<Entry>,
    /// Where the tokens came from, for messages.
    source: String,
    /// Who may use the local control socket.
    local: LocalUsers,
}

/// What a caller presented.
pub struct Credentials<'a> {
    /// The `authorization` metadata, if any.
    pub authorization: Option<&'a [u8]>,
    /// The subject common name of a verified client certificate, if any.
    pub certificate: Option<String>,
    /// Set when the call came over the local control socket.
    pub local: Option<LocalCaller>,
}

/// A caller on the local control socket.
pub struct LocalCaller {
    /// Its uid as the kernel tells (`SO_PEERCRED`); `None` if it could not.
    pub uid: Option<u32>,
}

/// The users the local control socket admits, as admins: the agent's own
/// (its effective uid) and root, with their names for the history.
struct LocalUsers {
    owner: u32,
    owner_name: String,
    root_name: String,
}

impl LocalUsers {
    fn current() -> LocalUsers {
        LocalUsers::of(rustix::process::geteuid().as_raw())
    }

    /// The agent's user is `owner` (and root).
    fn of(owner: u32) -> LocalUsers {
        LocalUsers {
            owner,
            owner_name: local_name(owner),
            root_name: local_name(0),
        }
    }

    fn identity(&self, caller: &LocalCaller) -> Result<Identity> {
        let name = match caller.uid {
            Some(0) => &self.root_name,
            Some(uid) if uid == self.owner => &self.owner_name,
            Some(uid) => {
                return Err(unauthenticated(&format!(
                    "uid {uid} may not use this agent's local control socket: only its own user (uid {}) and root may; others need a token, over TLS",
                    self.owner
                )))
            }
            None => {
                return Err(unauthenticated(
                    "the local control socket could not tell who is calling (no peer credentials)",
                ))
            }
        };
        Ok(Identity {
            name: name.clone(),
            role: Role::Admin,
        })
    }
}

/// `local:<user>` from /etc/passwd, or `local:uid:N` for a uid it does
/// not list.
fn local_name(uid: u32) -> String {
    match crate::datadir::user_name(uid) {
        Some(name) => format!("local:{name}"),
        None => format!("local:uid:{uid}"),
    }
}

impl Access {
    /// Reads a tokens file: one `NAME ROLE TOKEN` per line (`#` starts a
    /// comment). A TOKEN of `-` admits the identity only by a client
    /// certificate whose subject common name is NAME.
    pub fn from_file(path: &Path) -> Result<Access> {
        let text = std::fs::read_to_string(path).map_err(Error::io(format!(
            "cannot read the tokens file {}",
            path.display()
        )))?;
        let source = path.display().to_string();
        match Access::parse(&text) {
            Ok(access) => Ok(Access { source, ..access }),
            Err(message) => Err(Error::refused(
                Reason::InvalidArgument,
                format!("{source}: {message}"),
            )),
        }
    }

    fn parse(text: &str) -> Result<Access, String> {
        let mut entries: Vec<Entry> = Vec::new();
        for (n, line) in text.lines().enumerate() {
            // A comment is a line that starts with `#`, or ` #` after the
            // fields: a token may contain `#`.
            let line = line.split(" #").next().unwrap_or("").trim();
            if line.starts_with('#') {
                continue;
            }
            if line.is_empty() {
                continue;
            }
            let at = |what: String| format!("line {}: {what}", n + 1);
            let fields: Vec<&str> = line.split_whitespace().collect();
            let [name, role, token] = fields[..] else {
                return Err(at("expected NAME ROLE TOKEN".into()));
            };
            if name.len() > MAX_NAME
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.@=".contains(c))
            {
                return Err(at(format!(
                    "name {name:?} must be 1 to {MAX_NAME} letters, digits or -_.@="
                )));
            }
            let role = Role::parse(role)
                .ok_or_else(|| at(format!("role {role:?} is not read, deploy or admin")))?;
            let digest = match token {
                "-" => None,
                t if t.starts_with(HASHED) => Some(hashed(t).ok_or_else(|| {
                    at(format!(
                        "the token of {name} starts with {HASHED:?} but is not 64 hex digits after it"
                    ))
                })?),
                t if t.len() < MIN_TOKEN => {
                    return Err(at(format!(
                        "the token of {name} is shorter than {MIN_TOKEN} characters"
                    )))
                }
                t => Some(digest(t.as_bytes())),
            };
            if entries.iter().any(|e| e.identity.name == name) {
                return Err(at(format!("{name} is listed twice")));
            }
            if digest.is_some() && entries.iter().any(|e| e.digest == digest) {
                return Err(at(format!("the token of {name} is another's too")));
            }
            entries.push(Entry {
                identity: Identity {
                    name: name.to_owned(),
                    role,
                },
                digest,
            });
        }
        if entries.is_empty() {
            return Err("no identities: give at least one NAME ROLE TOKEN line".into());
        }
        Ok(Access {
            entries,
            source: String::new(),
            local: LocalUsers::current(),
        })
    }

    /// The admin token kept in `data_dir`: read it, or create it (owner-only)
    /// at first start.
    pub fn default_admin(data_dir: &Path) -> Result<Access> {
        let path = admin_token_path(data_dir);
        let token = match crate::datadir::read_secret(&path) {
            Ok(text) => text.trim().to_owned(),
            Err(crate::datadir::DataDirError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                create_admin_token(&path)?
            }
            Err(e) => return Err(e.into()),
        };
        if token.len() < MIN_TOKEN {
            return Err(Error::refused(
                Reason::InvalidArgument,
                format!(
                    "{} holds no usable token; delete it and restart to get a new one",
                    path.display()
                ),
            ));
        }
        Ok(Access {
            entries: vec![Entry {
                identity: Identity {
                    name: "admin".into(),
                    role: Role::Admin,
                },
                digest: Some(digest(token.as_bytes())),
            }],
            source: path.display().to_string(),
            local: LocalUsers::current(),
        })
    }

    /// The access list a worker under `--worker-user` is handed by its
    /// supervisor (`worker_user.rs`): a tokens file of digests. On the
    /// local control socket the agent's user is the supervisor's, root —
    /// never the worker's own user, which is what release code runs as.
    pub fn from_handed(tokens: &str, source: &str) -> Result<Access> {
        let access = Access::parse(tokens).map_err(|message| {
            Error::refused(Reason::InvalidArgument, format!("{source}: {message}"))
        })?;
        Ok(Access {
            source: source.to_owned(),
            local: LocalUsers::of(0),
            ..access
        })
    }

    /// The identities as a tokens file that holds each token's sha256
    /// (`sha256:HEX`) instead of the token: it admits the same callers,
    /// and whoever reads it learns no usable token.
    pub fn digests(&self) -> String {
        self.entries
            .iter()
            .map(|e| {
                let token = match &e.digest {
                    Some(d) => format!("{HASHED}{}", hex::encode(d)),
                    None => "-".to_owned(),
                };
                format!("{} {} {token}\n", e.identity.name, e.identity.role)
            })
            .collect()
    }

    /// Where the tokens came from.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The identity behind `credentials`, if it may act as `needed`. On
    /// the local control socket only the caller's uid counts; elsewhere a
    /// bearer token is looked at first, and without one, a verified client
    /// certificate.
    pub fn check(&self, credentials: &Credentials<'_>, needed: Role) -> Result<Identity> {
        let identity = match (
            &credentials.local,
            credentials.authorization,
            &credentials.certificate,
        ) {
            (Some(caller), _, _) => self.local.identity(caller)?,
            (None, Some(header), _) => {
                let token = bearer(header).ok_or_else(|| {
                    unauthenticated("the authorization metadata must be \"Bearer TOKEN\"")
                })?;
                self.by_token(token).ok_or_else(|| {
                    unauthenticated("the token is not one this agent accepts")
                })?
            }
            // Only identities listed for certificates (`NAME ROLE -`): a
            // certificate never stands in for a token's identity.
            (None, None, Some(subject)) => self
                .entries
                .iter()
                .find(|e| e.digest.is_none() && e.identity.name == *subject)
                .map(|e| e.identity.clone())
                .ok_or_else(|| {
                    unauthenticated(&format!(
                        "the client certificate {subject:?} is not listed as NAME ROLE - in the tokens file"
                    ))
                })?,
            (None, None, None) => {
                return Err(unauthenticated(
                    "no credentials: send \"authorization: Bearer TOKEN\" (ctl: --token, --token-file or NINE9S_TOKEN, over https://), or use the agent's local control socket DATA/control.sock as its user or root",
                ))
            }
        };
        if identity.role < needed {
            return Err(Error::refused(
                Reason::PermissionDenied,
                format!(
                    "{} has the {} role; this call needs {needed}",
                    identity.name, identity.role
                ),
            ));
        }
        Ok(identity)
    }

    /// Compares against every entry, without stopping at a match.
    fn by_token(&self, token: &[u8]) -> Option<Identity> {
        let presented = digest(token);
        let mut found = None;
        for entry in &self.entries {
            if let Some(d) = &entry.digest {
                if bool::from(d.ct_eq(&presented)) {
                    found = Some(entry.identity.clone());
                }
            }
        }
        found
    }
}

/// Builds the access list: the tokens file if one was given, otherwise
/// the data dir's admin token.
pub fn load(tokens: Option<&Path>, data_dir: &Path) -> Result<Access> {
    match tokens {
        Some(path) => Access::from_file(path),
        None => Access::default_admin(data_dir),
    }
}

pub fn admin_token_path(data_dir: &Path) -> PathBuf {
    data_dir.join("admin.token")
}

fn unauthenticated(message: &str) -> Error {
    Error::refused(Reason::Unauthenticated, message)
}

fn bearer(header: &[u8]) -> Option<&[u8]> {
    let (scheme, token) = header.split_at_checked(7)?;
    scheme
        .eq_ignore_ascii_case(b"bearer ")
        .then(|| token.trim_ascii())
        .filter(|t| !t.is_empty())
}

/// A tokens file may hold a token's sha256 instead of the token
/// (`sha256:` and 64 hex digits): then nothing that can read the file —
/// the agent's own process, or code it runs — learns a usable token.
const HASHED: &str = "sha256:";

/// The digest of a `sha256:HEX` token field.
fn hashed(field: &str) -> Option<[u8; 32]> {
    let mut digest = [0; 32];
    hex::decode_to_slice(field.strip_prefix(HASHED)?, &mut digest).ok()?;
    Some(digest)
}

fn digest(token: &[u8]) -> [u8; 32] {
    Sha256::digest(token).into()
}

/// A new random admin token, written owner-only (created with mode 0600,
/// whatever the umask) and synced; never through a symlink, never into a
/// file that exists.
fn create_admin_token(path: &Path) -> Result<String> {
    let mut bytes = [0u8; 32];
    rustix::rand::getrandom(&mut bytes, rustix::rand::GetRandomFlags::empty())
        .map_err(|e| Error::io("cannot draw a random admin token")(e.into()))?;
    let token = hex::encode(bytes);
    let written = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(crate::datadir::NOFOLLOW)
            .open(path)?;
        writeln!(file, "{token}")?;
        file.sync_all()
    })();
    written.map_err(Error::io(format!("cannot write {}", path.display())))?;
    tracing::info!(path = %path.display(), "created the admin token (owner-only), for clients over TCP; ctl on this machine uses DATA/control.sock");
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creds(token: &str) -> Credentials<'_> {
        Credentials {
            authorization: Some(token.as_bytes()),
            certificate: None,
            local: None,
        }
    }

    const FILE: &str = "# who may deploy\nci deploy 0123456789abcdef0123\nwatcher read fedcba9876543210fedc # dashboards\nops admin aaaaaaaaaaaa#aaaaaaaaaaa\nedge-1 deploy -\n";

    #[test]
    fn roles_are_checked_per_call() {
        let access = Access::parse(FILE).unwrap();
        let ci = access
            .check(&creds("Bearer 0123456789abcdef0123"), Role::Deploy)
            .unwrap();
        assert_eq!(ci.name, "ci");
        let ops = access
            .check(&creds("Bearer aaaaaaaaaaaa#aaaaaaaaaaa"), Role::Admin)
            .unwrap();
        assert_eq!(ops.name, "ops");
        let err = access
            .check(&creds("Bearer 0123456789abcdef0123"), Role::Admin)
            .unwrap_err();
        assert_eq!(err.reason(), Reason::PermissionDenied);
        let err = access
            .check(&creds("bearer fedcba9876543210fedc"), Role::Deploy)
            .unwrap_err();
        assert_eq!(err.reason(), Reason::PermissionDenied);
        assert!(
            err.to_string().contains("watcher has the read role"),
            "{err}"
        );
    }

    #[test]
    fn strangers_are_unauthenticated() {
        let access = Access::parse(FILE).unwrap();
        for header in [
            "Bearer nope-nope-nope-nope",
            "Basic abc",
            "Bearer ",
            "0123456789abcdef0123",
        ] {
            let err = access.check(&creds(header), Role::Read).unwrap_err();
            assert_eq!(err.reason(), Reason::Unauthenticated, "{header}");
        }
        let none = Credentials {
            authorization: None,
            certificate: None,
            local: None,
        };
        assert_eq!(
            access.check(&none, Role::Read).unwrap_err().reason(),
            Reason::Unauthenticated
        );
    }

    #[test]
    fn a_certificate_is_an_identity_by_its_common_name() {
        let access = Access::parse(FILE).unwrap();
        let cert = |cn: &str| Credentials {
            authorization: None,
            certificate: Some(cn.to_owned()),
            local: None,
        };
        assert_eq!(
            access.check(&cert("edge-1"), Role::Deploy).unwrap().name,
            "edge-1"
        );
        assert_eq!(
            access
                .check(&cert("mallory"), Role::Read)
                .unwrap_err()
                .reason(),
            Reason::Unauthenticated
        );
        // A token identity's name on a certificate is not that identity.
        assert_eq!(
            access.check(&cert("ops"), Role::Read).unwrap_err().reason(),
            Reason::Unauthenticated
        );
        // A certificate-only identity has no token that "-" would match.
        assert_eq!(
            access
                .check(&creds("Bearer -"), Role::Read)
                .unwrap_err()
                .reason(),
            Reason::Unauthenticated
        );
    }

    #[test]
    fn the_local_socket_admits_the_agents_user_and_root_only_by_uid() {
        let access = Access::parse(FILE).unwrap();
        let owner = rustix::process::geteuid().as_raw();
        let local = |uid: Option<u32>, token: Option<&'static str>| Credentials {
            authorization: token.map(str::as_bytes),
            certificate: None,
            local: Some(LocalCaller { uid }),
        };
        let me = access
            .check(&local(Some(owner), None), Role::Admin)
            .unwrap();
        assert!(me.name.starts_with("local:"), "{me:?}");
        assert_eq!(me.role, Role::Admin);
        let root = access.check(&local(Some(0), None), Role::Admin).unwrap();
        assert_eq!(root.name, local_name(0));
        let stranger = if owner == 65534 { 65533 } else { 65534 };
        let err = access
            .check(&local(Some(stranger), None), Role::Read)
            .unwrap_err();
        assert_eq!(err.reason(), Reason::Unauthenticated);
        assert!(
            err.to_string().contains(&format!("uid {stranger}")),
            "{err}"
        );
        // A valid token does not make a stranger on the socket anyone.
        let err = access
            .check(
                &local(Some(stranger), Some("Bearer aaaaaaaaaaaa#aaaaaaaaaaa")),
                Role::Read,
            )
            .unwrap_err();
        assert_eq!(err.reason(), Reason::Unauthenticated);
        let err = access.check(&local(None, None), Role::Read).unwrap_err();
        assert_eq!(err.reason(), Reason::Unauthenticated);
    }

    #[test]
    fn a_file_may_hold_a_tokens_sha256_instead_of_the_token() {
        let token = "0123456789abcdef0123";
        let hex = hex::encode(digest(token.as_bytes()));
        let access = Access::parse(&format!("ci deploy sha256:{hex}\n")).unwrap();
        let ci = access
            .check(&creds(&format!("Bearer {token}")), Role::Deploy)
            .unwrap();
        assert_eq!(ci.name, "ci");
        // The hash itself is no token.
        let err = access
            .check(&creds(&format!("Bearer sha256:{hex}")), Role::Read)
            .unwrap_err();
        assert_eq!(err.reason(), Reason::Unauthenticated);
        let upper = Access::parse(&format!("ci deploy sha256:{}\n", hex.to_uppercase())).unwrap();
        assert!(upper
            .check(&creds(&format!("Bearer {token}")), Role::Read)
            .is_ok());
    }

    #[test]
    fn digests_admit_the_same_callers_and_hold_no_token() {
        let access = Access::parse(FILE).unwrap();
        let digests = access.digests();
        assert!(!digests.contains("0123456789abcdef0123"), "{digests}");
        assert!(digests.contains("edge-1 deploy -\n"), "{digests}");
        let handed = Access::from_handed(&digests, "handed").unwrap();
        for (token, role, name) in [
            ("Bearer 0123456789abcdef0123", Role::Deploy, "ci"),
            ("Bearer aaaaaaaaaaaa#aaaaaaaaaaa", Role::Admin, "ops"),
            ("Bearer fedcba9876543210fedc", Role::Read, "watcher"),
        ] {
            assert_eq!(handed.check(&creds(token), role).unwrap().name, name);
        }
        let err = handed
            .check(&creds("Bearer 0123456789abcdef0123"), Role::Admin)
            .unwrap_err();
        assert_eq!(err.reason(), Reason::PermissionDenied);
    }

    #[test]
    fn a_handed_list_admits_root_but_not_the_worker_user_on_the_local_socket() {
        let handed = Access::from_handed(&Access::parse(FILE).unwrap().digests(), "h").unwrap();
        let local = |uid| Credentials {
            authorization: None,
            certificate: None,
            local: Some(LocalCaller { uid: Some(uid) }),
        };
        assert_eq!(
            handed.check(&local(0), Role::Admin).unwrap().role,
            Role::Admin
        );
        // The worker runs as this user, and so does the release's code.
        let err = handed.check(&local(65534), Role::Read).unwrap_err();
        assert_eq!(err.reason(), Reason::Unauthenticated);
    }

    #[test]
    fn bad_files_say_which_line() {
        for (text, expected) in [
            ("ci deploy short", "line 1: the token of ci is shorter"),
            ("ci root 0123456789abcdef0123", "line 1: role \"root\""),
            (
                "a read 0123456789abcdef0123\nb read 0123456789abcdef0123",
                "line 2: the token of b is another's",
            ),
            (
                "a read 0123456789abcdef0123\na admin 0123456789abcdef9999",
                "line 2: a is listed twice",
            ),
            ("a read", "line 1: expected NAME ROLE TOKEN"),
            (
                "a read sha256:abc",
                "line 1: the token of a starts with \"sha256:\"",
            ),
            (
                "a read sha256:zz23456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
                "is not 64 hex digits",
            ),
            ("# nothing\n", "no identities"),
        ] {
            let err = Access::parse(text).err().expect(text);
            assert!(err.contains(expected), "{text:?}: {err}");
        }
    }

    #[test]
    fn the_default_admin_token_is_created_owner_only_and_kept() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let first = Access::default_admin(dir.path()).unwrap();
        let path = admin_token_path(dir.path());
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "mode {mode:o}");
        let token = std::fs::read_to_string(&path).unwrap();
        let header = format!("Bearer {}", token.trim());
        assert_eq!(
            first.check(&creds(&header), Role::Admin).unwrap().name,
            "admin"
        );
        let again = Access::default_admin(dir.path()).unwrap();
        assert!(again.check(&creds(&header), Role::Admin).is_ok());
    }
}
