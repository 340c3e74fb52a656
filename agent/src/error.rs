//! The agent's errors. Each says what went wrong in words a person can act
//! on, and has a stable [`Reason`] code that clients branch on; `control`
//! is the one place that turns them into gRPC statuses.

use nine9s_host::{CallError, LoadError};
use nine9s_manifest::{ManifestError, Version};

use crate::datadir::DataDirError;
use crate::lease::LeaseError;
pub use crate::reason::Reason;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("release {0} is not known to this agent (`ctl releases` lists the staged ones)")]
    UnknownVersion(Version),
    /// Valid, but not in the agent's current state (or not valid at all:
    /// the reason says which).
    #[error("{message}")]
    Refused { reason: Reason, message: String },
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// The uploaded library is unusable.
    #[error("{0}")]
    InvalidArtifact(String),
    /// A release's artifact no longer has the digest it was staged with.
    #[error("the library of release {version} was changed on disk (sha256 {actual}, staged as {expected}); it was not loaded")]
    Corrupt {
        version: Version,
        expected: String,
        actual: String,
    },
    /// A release's library failed to load.
    #[error("cannot load release {version}: {source}")]
    Load { version: Version, source: LoadError },
    /// Plugin code of release `version` failed; nothing was switched.
    #[error("{during} of release {version} failed, nothing was switched: {source}")]
    Plugin {
        version: Version,
        during: &'static str,
        source: CallError,
    },
    #[error(
        "no state migration from {from} (state v{from_state}) to {to} (state v{to_state}): the newer release must declare one; nothing was switched"
    )]
    NoMigrationPath {
        from: Version,
        from_state: u32,
        to: Version,
        to_state: u32,
    },
    #[error(
        "requests on {version} did not finish within {timeout_ms} ms, so the switch was abandoned; {version} keeps serving (a call past the request timeout is not waited for: retry then)"
    )]
    QuiesceTimeout { version: Version, timeout_ms: u64 },
    #[error("{expected} was expected to be active, but {active} is: nothing was done")]
    ExpectedActive { expected: Version, active: Version },
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A rollout holds the agent's lease.
    #[error(transparent)]
    Lease(#[from] LeaseError),
    /// The data dir or a file a flag names cannot be used (another local
    /// user could have made or changed it; the worker user cannot reach
    /// it): the agent does not start.
    #[error(transparent)]
    DataDir(#[from] DataDirError),
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    /// The outcome recorded for a request id, returned to a retry.
    #[error("{message}")]
    Recorded { reason: Reason, message: String },
}

impl Error {
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let context = context.into();
        move |source| Error::Io { context, source }
    }

    pub fn refused(reason: Reason, message: impl Into<String>) -> Error {
        Error::Refused {
            reason,
            message: message.into(),
        }
    }

    /// The stable code of this error.
    pub fn reason(&self) -> Reason {
        match self {
            Error::UnknownVersion(_) => Reason::UnknownRelease,
            Error::Refused { reason, .. } | Error::Recorded { reason, .. } => *reason,
            Error::Manifest(_) => Reason::InvalidManifest,
            Error::InvalidArtifact(_) => Reason::InvalidArtifact,
            Error::Load { .. } => Reason::LoadFailed,
            Error::Corrupt { .. } => Reason::ChecksumMismatch,
            Error::Plugin { .. } => Reason::PluginFailed,
            Error::NoMigrationPath { .. } => Reason::NoMigrationPath,
            Error::QuiesceTimeout { .. } => Reason::QuiesceTimeout,
            Error::ExpectedActive { .. } => Reason::ExpectedActiveMismatch,
            Error::Store(_) => Reason::StoreUnavailable,
            Error::Lease(LeaseError::Held { .. }) => Reason::LeaseHeld,
            Error::Lease(LeaseError::Leased { .. }) => Reason::Leased,
            Error::DataDir(DataDirError::Io { source, .. }) if is_disk_full(source) => {
                Reason::DiskFull
            }
            Error::DataDir(DataDirError::Io { .. }) => Reason::Internal,
            Error::DataDir(_) => Reason::InvalidArgument,
            Error::Io { source, .. } if is_disk_full(source) => Reason::DiskFull,
            Error::Io { .. } => Reason::Internal,
        }
    }

    /// The release whose own code (or library) this error blames, if any:
    /// only that release may be marked failed for it.
    pub fn blames(&self) -> Option<&Version> {
        match self {
            // A rehearsal that timed out may be stuck in either release's code.
            Error::Plugin {
                during: "rehearsal",
                ..
            } => None,
            Error::Load { version, .. }
            | Error::Corrupt { version, .. }
            | Error::Plugin { version, .. } => Some(version),
            _ => None,
        }
    }
}

/// Whether an I/O error means the disk (or quota) is full.
pub fn is_disk_full(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(code) if code == 28 /* ENOSPC */ || code == 122 /* EDQUOT */)
        || e.kind() == std::io::ErrorKind::StorageFull
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// `e` and its sources, `: `-separated, as `anyhow`'s `{:#}` prints them:
/// for a message that must say what went wrong underneath.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut why = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        why.push_str(&format!(": {c}"));
        cause = c.source();
    }
    why
}
