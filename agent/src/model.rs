//! The agent's domain types: releases, their lifecycle states, the
//! transitions between them, and state snapshots. Neither sled nor the
//! generated proto types appear here; `store` and `control` convert.

use std::fmt;

use nine9s_manifest::Version;
use serde::{Deserialize, Serialize};

use crate::reason::Reason;

/// Where a release is in its lifecycle (OTP's release_handler states).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReleaseState {
    /// Uploaded and checked; never served, or not since it was staged.
    Staged,
    /// Serving, but not yet permanent: a restart returns to the permanent one.
    Current,
    /// The release a restart comes back on. Exactly one.
    Permanent,
    /// Served before; kept for downgrades and rollbacks.
    Old,
    /// Could not be started (load, init, migration or health failed).
    Failed,
}

impl fmt::Display for ReleaseState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ReleaseState::Staged => "staged",
            ReleaseState::Current => "current",
            ReleaseState::Permanent => "permanent",
            ReleaseState::Old => "old",
            ReleaseState::Failed => "failed",
        })
    }
}

/// A release the agent knows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Release {
    pub name: String,
    pub version: Version,
    pub state: ReleaseState,
    /// Lower-case hex sha256 of the library: its name in the artifact store.
    pub sha256: String,
    pub size: u64,
    pub staged_at_ms: i64,
    /// The state version the library's code declares.
    pub state_version: u32,
    pub routes: Vec<String>,
    /// Its handler may block (release.toml `blocking`).
    #[serde(default)]
    pub blocking: bool,
    /// When it last became permanent; the rollback target is the old
    /// release that was permanent most recently.
    #[serde(default)]
    pub permanent_since_ms: Option<i64>,
    /// The release.toml as staged.
    pub manifest: String,
    /// Why it is failed, when it is.
    #[serde(default)]
    pub failure: Option<String>,
    /// The trusted key that signed it at stage ([`BUILT_IN`] for the sample
    /// release embedded in the agent); `None`: staged unsigned.
    #[serde(default)]
    pub signed_by: Option<String>,
    /// Its `release.sig` as staged (empty: none), checked again against
    /// the keys trusted now before it is switched to under
    /// `--require-signed`.
    #[serde(default)]
    pub signature: String,
}

/// `signed_by` of the sample release embedded in the agent binary: the
/// agent trusts it as it trusts itself.
pub const BUILT_IN: &str = "built-in";

/// What a transition did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TransitionKind {
    /// The first release of an empty data directory.
    Install,
    Stage,
    Upgrade,
    Downgrade,
    Rollback,
    MakePermanent,
    Remove,
    /// The agent started and came back on the permanent release.
    Restart,
    /// A canary started beside the active release.
    Canary,
}

impl fmt::Display for TransitionKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TransitionKind::Install => "install",
            TransitionKind::Stage => "stage",
            TransitionKind::Upgrade => "upgrade",
            TransitionKind::Downgrade => "downgrade",
            TransitionKind::Rollback => "rollback",
            TransitionKind::MakePermanent => "make-permanent",
            TransitionKind::Remove => "remove",
            TransitionKind::Restart => "restart",
            TransitionKind::Canary => "canary",
        })
    }
}

/// How a transition ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Journalled before it started; still under way.
    Running,
    Ok,
    /// Refused or undone; the previous release kept serving.
    Failed,
    /// The agent stopped (or was killed) while it was running.
    Aborted,
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Outcome::Running => "running",
            Outcome::Ok => "ok",
            Outcome::Failed => "failed",
            Outcome::Aborted => "aborted",
        })
    }
}

/// One entry of the release history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transition {
    /// Monotonic across restarts.
    pub id: u64,
    pub started_at_ms: i64,
    pub kind: TransitionKind,
    pub from: Option<Version>,
    pub to: Option<Version>,
    pub outcome: Outcome,
    pub duration_us: u64,
    /// How long new requests were held at the switch.
    pub switch_wait_us: u64,
    pub error: Option<String>,
    /// Started by the agent itself (a health-gated rollback, a restart).
    pub automatic: bool,
    /// Why an automatic transition happened, or the caller's reason.
    #[serde(default)]
    pub reason: Option<String>,
    /// The request id of the command that started it.
    #[serde(default)]
    pub request_id: Option<String>,
    /// The stable code of `error`.
    #[serde(default)]
    pub error_reason: Option<Reason>,
    /// Who asked for it; `None` for the agent itself.
    #[serde(default)]
    pub identity: Option<String>,
}

/// What happened, for `Watch`: kept in the store beside the history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Monotonic across restarts.
    pub id: u64,
    pub at_ms: i64,
    pub kind: EventKind,
    #[serde(default)]
    pub transition: Option<Transition>,
    #[serde(default)]
    pub version: Option<Version>,
    #[serde(default)]
    pub state: Option<ReleaseState>,
    #[serde(default)]
    pub soak_remaining_ms: u64,
    #[serde(default)]
    pub message: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    TransitionStarted,
    TransitionFinished,
    ReleaseStateChanged,
    SoakStarted,
    SoakProgress,
    SoakPassed,
    SoakFailed,
    RollbackRetry,
    AgentStarted,
    CheckpointSkipped,
    /// A self-upgrade failed; the agent goes on serving.
    AgentRestartFailed,
    /// A rollout took the agent's lease (not a renewal).
    LeaseTaken,
    /// A rollout gave the agent's lease back.
    LeaseReleased,
}

impl Event {
    /// An event of `kind`, numbered by the store when it is recorded.
    pub fn new(kind: EventKind) -> Event {
        Event {
            id: 0,
            at_ms: now_ms(),
            kind,
            transition: None,
            version: None,
            state: None,
            soak_remaining_ms: 0,
            message: None,
        }
    }

    pub fn version(mut self, version: &Version) -> Event {
        self.version = Some(version.clone());
        self
    }

    pub fn message(mut self, message: impl Into<String>) -> Event {
        self.message = Some(message.into());
        self
    }
}

/// A command's outcome, kept under its request id so that a retry gets
/// the same answer instead of running again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recorded {
    pub at_ms: i64,
    /// What the command asked for; a retry must ask for the same.
    pub fingerprint: String,
    pub outcome: RecordedOutcome,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordedOutcome {
    /// A transition ran: recorded as it began, and again with its end
    /// (`finished`, written with its commit), so the answer outlives the
    /// history entry, which is trimmed by count.
    Transition {
        id: u64,
        #[serde(default)]
        finished: Option<Box<Transition>>,
    },
    /// The release asked for was already active.
    Unchanged,
    Staged {
        version: Version,
        already_staged: bool,
    },
    Removed {
        release: Box<Release>,
        collected: Vec<String>,
    },
    Refused {
        reason: Reason,
        message: String,
    },
}

/// A release's state, as it was at some moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub version: Version,
    pub state_version: u32,
    pub taken_at_ms: i64,
    pub bytes: Vec<u8>,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
