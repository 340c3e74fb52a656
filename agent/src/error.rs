//! The agent's errors. Each says what went wrong in words a person can act
//! on; `control` is the one place that turns them into gRPC statuses.

use nine9s_host::{CallError, LoadError};
use nine9s_manifest::{ManifestError, Version};

use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("release {0} is not known to this agent (`ctl releases` lists the staged ones)")]
    UnknownVersion(Version),
    /// The request is valid but not in the agent's current state.
    #[error("{0}")]
    Precondition(String),
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// The uploaded library is unusable.
    #[error("{0}")]
    InvalidArtifact(String),
    /// A staged library failed to load at upgrade time.
    #[error("cannot load release {version}: {source}")]
    Load { version: Version, source: LoadError },
    /// Plugin code failed; the switch did not happen.
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
        "requests on {version} did not finish within {timeout_ms} ms, so the switch was abandoned; {version} keeps serving"
    )]
    QuiesceTimeout { version: Version, timeout_ms: u64 },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
}

impl Error {
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let context = context.into();
        move |source| Error::Io { context, source }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
