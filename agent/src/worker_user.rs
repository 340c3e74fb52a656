//! `--worker-user USER`: the supervisor stays root and every worker —
//! the process that loads releases, and so whatever it starts (the probe,
//! the rehearsal) — runs as USER, with no capabilities and
//! `no_new_privs`. A release's code then has USER's rights, not root's:
//! it cannot read the secrets that decide who drives the agent. The
//! supervisor reads them (the tokens file or `DATA/admin.token`, both
//! root's and owner-only) and hands each worker only what it needs, in its
//! start message on a socket it inherits (`birth.rs`): the tokens' sha256
//! digests (a tokens file of `sha256:HEX` lines) and the TLS files'
//! contents. A digest is no token: a release that reads its
//! worker's memory learns none. The TLS key is another matter: the worker
//! serves with it, so it is in the worker's memory, where a release can
//! read it — under `--worker-user` a release cannot read the key's file,
//! but it can read the key.
//!
//! The data dir is then root's (mode 0711, so USER can reach what is its
//! own inside), with `admin.token` and `control.sock` root's; `db` and
//! `artifacts` — all the worker writes, the standby hint included — are
//! USER's (`datadir.rs`).

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::error::{Error, Result};

/// The user workers run as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

/// Why `--worker-user` cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("--worker-user {0}: /etc/passwd lists no such user (give a name or uid it lists)")]
    Unknown(String),
    #[error("--worker-user {0}: that is root, which would contain nothing")]
    Root(String),
    #[error("--worker-user needs the agent to run as root (it runs as uid {0}): only root can start workers as another user. Start it as root, or leave --worker-user out")]
    NotRoot(u32),
}

impl WorkerUser {
    /// USER by name or uid, as `/etc/passwd` lists it; never root.
    pub fn lookup(user: &str) -> Result<WorkerUser, Refusal> {
        let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
        let found = lookup_in(user, &passwd).ok_or_else(|| Refusal::Unknown(user.to_owned()))?;
        if found.uid == 0 {
            return Err(Refusal::Root(user.to_owned()));
        }
        Ok(found)
    }

    /// What the supervisor must be for it to start workers as this user.
    pub fn check_root() -> Result<(), Refusal> {
        match rustix::process::geteuid().as_raw() {
            0 => Ok(()),
            uid => Err(Refusal::NotRoot(uid)),
        }
    }
}

/// [`WorkerUser::lookup`] on the text of `/etc/passwd`.
fn lookup_in(user: &str, passwd: &str) -> Option<WorkerUser> {
    passwd.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        let (name, uid, gid) = (fields.first()?, fields.get(2)?, fields.get(3)?);
        (!name.is_empty() && (*name == user || *uid == user)).then_some(())?;
        Some(WorkerUser {
            name: (*name).to_owned(),
            uid: uid.parse().ok()?,
            gid: gid.parse().ok()?,
        })
    })
}

/// What the supervisor hands a worker that runs as `--worker-user`.
#[derive(Clone, Serialize, Deserialize)]
pub struct Handed {
    /// The identities, as a tokens file whose tokens are `sha256:HEX`.
    pub tokens: String,
    /// Where the tokens came from, for messages.
    pub source: String,
    /// The TLS files' contents, with `--tls-cert`.
    pub tls: Option<TlsPem>,
}

/// `--tls-cert`, `--tls-key` and `--client-ca`, read.
#[derive(Clone, Serialize, Deserialize)]
pub struct TlsPem {
    pub cert: String,
    pub key: String,
    pub client_ca: Option<String>,
}

impl std::fmt::Debug for Handed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key, in a log or a panic.
        f.debug_struct("Handed")
            .field("source", &self.source)
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

/// Reads what a worker is handed, as root: the tokens file (or the data
/// dir's admin token, created at first start) reduced to digests, and the
/// TLS files. Run before each worker starts, as the worker itself read
/// them before: a restart takes a changed tokens file.
pub fn gather(config: &Config) -> Result<Handed> {
    let access = crate::access::load(config.tokens.as_deref(), &config.data_dir)?;
    let read = |path: &Path| {
        std::fs::read_to_string(path).map_err(Error::io(format!("cannot read {}", path.display())))
    };
    let tls = match &config.tls {
        Some(files) => Some(TlsPem {
            cert: read(&files.cert)?,
            key: read(&files.key)?,
            client_ca: files.client_ca.as_deref().map(read).transpose()?,
        }),
        None => None,
    };
    Ok(Handed {
        tokens: access.digests(),
        source: format!("{} (digests handed by the supervisor)", access.source()),
        tls,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\nweb:x:1001:1002::/srv:/bin/sh\n";

    #[test]
    fn a_user_is_found_by_name_or_uid() {
        let web = WorkerUser {
            name: "web".into(),
            uid: 1001,
            gid: 1002,
        };
        assert_eq!(lookup_in("web", PASSWD), Some(web.clone()));
        assert_eq!(lookup_in("1001", PASSWD), Some(web));
        assert_eq!(lookup_in("nobody", PASSWD).map(|u| u.uid), Some(65534));
        assert_eq!(lookup_in("mallory", PASSWD), None);
        assert_eq!(lookup_in("", PASSWD), None);
    }
}
