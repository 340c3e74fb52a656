//! A frozen copy of nine9s-sdk as it was at plugin ABI version 1 (commit
//! 62022b5), vendored so that this fixture is a release built by the old
//! SDK: the agent must keep loading such releases. Do not update it.
//!
//! The nine9s plugin SDK: a release is a `cdylib` that implements [`Plugin`]
//! in plain safe Rust and calls [`export_plugin!`] once.
//!
//! The macro exports two symbols, and nothing else crosses the boundary:
//! - `NINE9S_ABI_VERSION`, a `u32` the host reads (without calling any code)
//!   before it trusts anything else in the library;
//! - `nine9s_plugin_api`, which returns the [`abi::PluginApi`] table.
//!
//! Rules the SDK keeps for every plugin, so a library can always be unloaded
//! and a plugin can never take the agent down:
//! - every exported function runs the plugin's code inside `catch_unwind`;
//!   a panic becomes an error status with the panic message;
//! - no Rust type crosses the boundary by value: only `#[repr(C)]` structs of
//!   pointers and integers; a buffer is freed by the side that allocated it;
//! - the SDK keeps no `thread_local!` with a destructor (glibc can never
//!   unmap a library that registered one). Plugin authors should not either;
//!   the agent reports a library that stays mapped after it was released.
//! - all state lives in the plugin instance, never in statics, so two
//!   instances of the same code (an upgrade back to a loaded version) never
//!   share it.
pub mod abi;
pub mod export;
mod migrate;

pub use migrate::{find_path, Migration};

/// A request as the plugin sees it. Borrowed from the host for the duration
/// of one [`Plugin::handle`] call.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub method: &'a str,
    /// The path, without the query string.
    pub path: &'a str,
    /// The query string, without the `?`; empty when there is none.
    pub query: &'a str,
    /// The headers, one `name: value` per line.
    pub headers: &'a str,
    pub body: &'a [u8],
}

impl Request<'_> {
    /// The value of the first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.lines().find_map(|line| {
            let (n, v) = line.split_once(':')?;
            n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

/// A response built by the plugin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub content_type: String,
    pub body: Vec<u8>,
}

impl Response {
    /// `200` with a `text/plain` body.
    pub fn text(body: impl Into<String>) -> Self {
        Self::with_status(200, body)
    }

    /// A `text/plain` response with the given status.
    pub fn with_status(status: u16, body: impl Into<String>) -> Self {
        Response {
            status,
            content_type: "text/plain".to_owned(),
            body: body.into().into_bytes(),
        }
    }

    pub fn not_found() -> Self {
        Self::with_status(404, "not found\n")
    }
}

/// A release's code. One instance serves all requests concurrently, so
/// state needs interior mutability (atomics, a `Mutex`).
pub trait Plugin: Sized + Send + Sync + 'static {
    /// The version of the state this code snapshots and restores. `0` means
    /// the release keeps no state: nothing is carried into or out of it.
    const STATE_VERSION: u32 = 0;

    /// Builds the instance, from a snapshot of [`Self::STATE_VERSION`] when
    /// the agent hands state over, or fresh when `state` is `None`.
    fn init(state: Option<&[u8]>) -> Result<Self, String>;

    /// Answers one request.
    fn handle(&self, request: &Request<'_>) -> Response;

    /// The state to hand to the next release (or to persist), encoded as
    /// [`Self::STATE_VERSION`].
    fn snapshot(&self) -> Vec<u8> {
        Vec::new()
    }

    /// The state migrations this code knows, up from older versions and
    /// down to older versions (the `code_change` of OTP). The agent chains
    /// them; the newer of two releases is the one asked to migrate.
    fn migrations() -> &'static [Migration] {
        &[]
    }

    /// Called by the agent during a soak; an error rolls the release back.
    fn health(&self) -> Result<(), String> {
        Ok(())
    }

    /// A named step of an upgrade plan (`hook = "name"` in release.toml).
    fn hook(&self, name: &str) -> Result<(), String> {
        Err(format!("this release has no hook named {name:?}"))
    }
}

#[doc(hidden)]
pub mod __private {
    pub use super::export::api;
}
