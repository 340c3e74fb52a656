//! What can go wrong when opening or calling a plugin library.

use std::path::PathBuf;

/// A library was refused. Each message names the file, what was found and
/// what was expected.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{path}: not a loadable shared library: {reason}")]
    NotALibrary { path: PathBuf, reason: String },
    #[error(
        "{path}: not a nine9s plugin: symbol `{symbol}` not found (a plugin exports it with nine9s_sdk::export_plugin!)"
    )]
    MissingSymbol { path: PathBuf, symbol: &'static str },
    #[error(
        "{path}: plugin ABI version {found}, but this agent loads {}; rebuild the plugin against a matching nine9s-sdk",
        versions(.expected)
    )]
    AbiMismatch {
        path: PathBuf,
        found: u32,
        expected: Vec<u32>,
    },
    #[error("{path}: invalid plugin table: {reason}")]
    BadTable { path: PathBuf, reason: String },
}

impl LoadError {
    /// This error in words that name no path: for a client of the agent,
    /// who should learn what is wrong with the library but not where the
    /// agent keeps it.
    pub fn without_path(&self) -> String {
        let (LoadError::NotALibrary { path, .. }
        | LoadError::MissingSymbol { path, .. }
        | LoadError::AbiMismatch { path, .. }
        | LoadError::BadTable { path, .. }) = self;
        let path = path.display().to_string();
        let message = self.to_string();
        message
            .strip_prefix(&format!("{path}: "))
            .unwrap_or(&message)
            .replace(&path, "the library")
    }
}

/// A call into a plugin failed. The plugin is still loaded and usable.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CallError {
    #[error("plugin panicked: {0}")]
    Panicked(String),
    #[error("{0}")]
    Failed(String),
    #[error("plugin returned an unknown status code {0}")]
    BadStatus(i32),
}

/// `ABI version 1 or 2`.
fn versions(expected: &[u32]) -> String {
    let list: Vec<String> = expected.iter().map(u32::to_string).collect();
    format!("ABI version {}", list.join(" or "))
}
