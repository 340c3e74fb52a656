//! The agent's errors. Each says what went wrong in words a person can act
//! on, and has a stable [`Reason`] code that clients branch on; `control`
//! is the one place that turns them into gRPC statuses.

use std::fmt;

use nine9s_host::{CallError, LoadError};
use nine9s_manifest::{ManifestError, Version};
use serde::{Deserialize, Serialize};

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
    /// A path another local user could have made or changed: the agent
    /// does not start.
    #[error(transparent)]
    UnsafePath(#[from] crate::datadir::UnsafePath),
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
            Error::UnsafePath(_) => Reason::InvalidArgument,
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

/// Stable error codes, sent as `google.rpc.ErrorInfo.reason`. Clients
/// branch on these, never on messages; never rename one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Reason {
    /// A field is malformed or out of range.
    InvalidArgument,
    UnknownRelease,
    /// An upgrade to a lower version, or a downgrade to a higher one.
    WrongDirection,
    NoRollbackTarget,
    /// Only the current release can be made permanent.
    NotCurrent,
    /// The permanent, current or active release cannot be removed.
    ReleaseInUse,
    /// The version is staged already, with other contents.
    VersionConflict,
    /// The release is of another service than this agent's.
    WrongService,
    InvalidManifest,
    InvalidArtifact,
    LoadFailed,
    /// Plugin code failed (init, migration, health, hook); nothing switched.
    PluginFailed,
    NoMigrationPath,
    NoSnapshot,
    QuiesceTimeout,
    ExpectedActiveMismatch,
    /// `expected_canary` is not the canary (any more).
    ExpectedCanaryMismatch,
    /// A release failed its soak and its rollback is pending.
    RollbackPending,
    StoreUnavailable,
    DiskFull,
    TooLarge,
    RequestIdReused,
    ShuttingDown,
    /// No credentials, or credentials the agent does not accept.
    Unauthenticated,
    /// A known identity whose role does not allow the call.
    PermissionDenied,
    /// A signature that does not verify, or by a key the agent does not trust.
    BadSignature,
    /// An unsigned release, and the agent requires signatures.
    SignatureRequired,
    /// Bytes that do not match their recorded sha256 (an upload, or an
    /// artifact on disk before it is loaded).
    ChecksumMismatch,
    /// As many uploads as the agent takes at once are in progress.
    TooManyUploads,
    /// An upload sent nothing for longer than the idle timeout.
    UploadStalled,
    /// The agent runs without its supervisor: it cannot replace itself.
    NoSupervisor,
    /// A canary was asked for a release that keeps state (or beside one).
    CanaryWithState,
    /// A canary was asked while a release is current (soaking or held).
    CanaryWhileCurrent,
    /// A retried request id whose transition has no recorded end (its
    /// commit failed): it is not run again, and its effect is unknown.
    OutcomeUnknown,
    /// A retried request id whose transition was cut short by the
    /// agent's stop: it took no effect, and it is not run again.
    TransitionAborted,
    /// The agent holds as many partly received messages as it takes at
    /// once: a retry shortly may pass.
    Busy,
    /// The identity has as many `Watch` streams open as it may.
    TooManyWatches,
    /// A `Watch` stream whose client did not read its events in time.
    WatcherTooSlow,
    Internal,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::InvalidArgument => "INVALID_ARGUMENT",
            Reason::UnknownRelease => "UNKNOWN_RELEASE",
            Reason::WrongDirection => "WRONG_DIRECTION",
            Reason::NoRollbackTarget => "NO_ROLLBACK_TARGET",
            Reason::NotCurrent => "NOT_CURRENT",
            Reason::ReleaseInUse => "RELEASE_IN_USE",
            Reason::VersionConflict => "VERSION_CONFLICT",
            Reason::WrongService => "WRONG_SERVICE",
            Reason::InvalidManifest => "INVALID_MANIFEST",
            Reason::InvalidArtifact => "INVALID_ARTIFACT",
            Reason::LoadFailed => "LOAD_FAILED",
            Reason::PluginFailed => "PLUGIN_FAILED",
            Reason::NoMigrationPath => "NO_MIGRATION_PATH",
            Reason::NoSnapshot => "NO_SNAPSHOT",
            Reason::QuiesceTimeout => "QUIESCE_TIMEOUT",
            Reason::ExpectedActiveMismatch => "EXPECTED_ACTIVE_MISMATCH",
            Reason::ExpectedCanaryMismatch => "EXPECTED_CANARY_MISMATCH",
            Reason::RollbackPending => "ROLLBACK_PENDING",
            Reason::StoreUnavailable => "STORE_UNAVAILABLE",
            Reason::DiskFull => "DISK_FULL",
            Reason::TooLarge => "TOO_LARGE",
            Reason::RequestIdReused => "REQUEST_ID_REUSED",
            Reason::ShuttingDown => "SHUTTING_DOWN",
            Reason::Unauthenticated => "UNAUTHENTICATED",
            Reason::PermissionDenied => "PERMISSION_DENIED",
            Reason::BadSignature => "BAD_SIGNATURE",
            Reason::SignatureRequired => "SIGNATURE_REQUIRED",
            Reason::ChecksumMismatch => "CHECKSUM_MISMATCH",
            Reason::TooManyUploads => "TOO_MANY_UPLOADS",
            Reason::UploadStalled => "UPLOAD_STALLED",
            Reason::NoSupervisor => "NO_SUPERVISOR",
            Reason::CanaryWithState => "CANARY_WITH_STATE",
            Reason::CanaryWhileCurrent => "CANARY_WHILE_CURRENT",
            Reason::OutcomeUnknown => "OUTCOME_UNKNOWN",
            Reason::TransitionAborted => "TRANSITION_ABORTED",
            Reason::Busy => "BUSY",
            Reason::TooManyWatches => "TOO_MANY_WATCHES",
            Reason::WatcherTooSlow => "WATCHER_TOO_SLOW",
            Reason::Internal => "INTERNAL",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
