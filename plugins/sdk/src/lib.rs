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
//!   share it;
//! - a thread an instance starts is joined in [`Plugin::stop`], which the
//!   agent calls before it unloads the library;
//! - a plugin built with `panic = "abort"` does not compile: its first
//!   panic would abort the agent.
//!
//! [`host`] is what the agent offers a plugin: logging through the agent's
//! own logs (with the release's version) and a monotonic clock.
//!
//! With the feature `tower`, `service` makes a release of any tower
//! service (an axum `Router`) on a tokio runtime of the release's own, with
//! streaming bodies: `service::AsyncPlugin` and `export_service!` (ABI
//! version 3).
// The workspace denies unsafe code; this crate is one of the two allowed
// to have it (ARCHITECTURE.md), each block with its SAFETY comment.
#![allow(unsafe_code)]

pub mod abi;
mod export;
pub mod host;
mod migrate;
#[cfg(feature = "tower")]
pub mod service;

use std::borrow::Cow;

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
    /// The headers as they came: bytes preserved, names repeated.
    pub headers: Headers<'a>,
    pub body: &'a [u8],
}

impl<'a> Request<'a> {
    /// The value of the first header named `name` (case-insensitive), if
    /// it is UTF-8.
    pub fn header(&self, name: &str) -> Option<&'a str> {
        self.headers.get(name)
    }
}

/// A request's headers, in the order they came.
#[derive(Clone, Copy, Default)]
pub struct Headers<'a>(&'a [abi::Header]);

impl<'a> Headers<'a> {
    /// # Safety
    /// Every slice of every header must stay valid and unmodified for `'a`.
    pub(crate) unsafe fn new(headers: &'a [abi::Header]) -> Headers<'a> {
        Headers(headers)
    }

    /// Every `(name, value)`, repeated names included.
    pub fn iter(&self) -> impl Iterator<Item = (&'a [u8], &'a [u8])> + 'a {
        // SAFETY: `new`'s contract: the slices are valid for 'a.
        self.0
            .iter()
            .map(|h| unsafe { (h.name.as_bytes(), h.value.as_bytes()) })
    }

    /// The value of the first header named `name` (case-insensitive), as
    /// bytes.
    pub fn get_bytes(&self, name: &str) -> Option<&'a [u8]> {
        self.iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
            .map(|(_, v)| v)
    }

    /// The value of the first header named `name` (case-insensitive), if
    /// it is UTF-8.
    pub fn get(&self, name: &str) -> Option<&'a str> {
        std::str::from_utf8(self.get_bytes(name)?).ok()
    }

    /// Every value of the headers named `name` (case-insensitive).
    pub fn get_all<'n>(&self, name: &'n str) -> impl Iterator<Item = &'a [u8]> + 'n
    where
        'a: 'n,
    {
        self.iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
            .map(|(_, v)| v)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::fmt::Debug for Headers<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(
                self.iter()
                    .map(|(n, v)| (String::from_utf8_lossy(n), String::from_utf8_lossy(v))),
            )
            .finish()
    }
}

/// A response built by the plugin: a status, headers and a body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    /// The `content-type` header (`text/plain` unless set).
    pub content_type: Cow<'static, str>,
    /// Other headers, in order; a name may repeat (`set-cookie`).
    pub headers: Vec<(Cow<'static, str>, Cow<'static, str>)>,
    /// The body: a `&'static` one goes out without being copied.
    pub body: Cow<'static, [u8]>,
}

impl Response {
    /// `200` with a `text/plain` body.
    pub fn text(body: impl Into<Cow<'static, str>>) -> Self {
        Self::with_status(200, body)
    }

    /// A `text/plain` response with the given status.
    pub fn with_status(status: u16, body: impl Into<Cow<'static, str>>) -> Self {
        let body = match body.into() {
            Cow::Borrowed(text) => Cow::Borrowed(text.as_bytes()),
            Cow::Owned(text) => Cow::Owned(text.into_bytes()),
        };
        Response {
            status,
            content_type: Cow::Borrowed("text/plain"),
            headers: Vec::new(),
            body,
        }
    }

    pub fn not_found() -> Self {
        Self::with_status(404, "not found\n")
    }

    /// A redirect (`301`, `302`, `303`, `307`, `308`) to `location`.
    pub fn redirect(status: u16, location: impl Into<Cow<'static, str>>) -> Self {
        Self::with_status(status, "").header("location", location)
    }

    /// Adds a header (another of the same name is kept: `set-cookie`).
    pub fn header(
        mut self,
        name: impl Into<Cow<'static, str>>,
        value: impl Into<Cow<'static, str>>,
    ) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Sets the `content-type`.
    pub fn content_type(mut self, content_type: impl Into<Cow<'static, str>>) -> Self {
        self.content_type = content_type.into();
        self
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

    /// Called once before the instance is dropped and its library
    /// unloaded, with no request in flight: join every thread the
    /// instance started here. A thread of the plugin still running after
    /// the unload would crash the agent.
    fn stop(&self) -> Result<(), String> {
        Ok(())
    }
}

#[doc(hidden)]
pub mod __private {
    pub use crate::export::api;
    #[cfg(feature = "tower")]
    pub use crate::service::instance::{service_api, Release};
}
