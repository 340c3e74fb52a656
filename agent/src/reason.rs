//! The stable error codes ([`Reason`]) clients branch on, sent as
//! `google.rpc.ErrorInfo.reason`: a leaf, so that the types that record a
//! reason (`model`, `store`) need not import the errors (`error`), which
//! themselves wrap the store's.

use std::fmt;

use serde::{Deserialize, Serialize};

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
    /// Another rollout holds the agent's lease (taking it).
    LeaseHeld,
    /// A switching command refused while a rollout holds the agent's lease
    /// (it is not that rollout's, and not forced).
    Leased,
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
            Reason::LeaseHeld => "LEASE_HELD",
            Reason::Leased => "LEASED",
            Reason::Internal => "INTERNAL",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
