//! The plugin host: opens nine9s release libraries, checks their ABI, and
//! calls them. This crate and the SDK are the only places with `unsafe`
//! code; everything the agent does with a plugin goes through the safe
//! [`Library`] and [`Instance`] types here.
//!
//! Invariants:
//! - the ABI version is read (a data symbol, no code runs) before anything
//!   else in the library is touched; versions 2 and 1 (frozen) are loaded,
//!   and only this crate knows the difference;
//! - a [`Library`] outlives every [`Instance`] made from it (each instance
//!   holds an `Arc` of its library), and every buffer a plugin hands over is
//!   given back to that plugin's `free` (a response body once it is sent,
//!   the rest once copied);
//! - an instance's `stop` (v2) runs before it is destroyed, with no call
//!   in flight;
//! - [`sandbox`] holds the walls the agent's probe opens untrusted
//!   libraries behind (namespaces, read-only mounts, no privileges);
//! - a release is loaded from the descriptor it was hashed through
//!   ([`Library::open_file`]), never a name another loaded library holds;
//! - when the last handle on a library is dropped it is `dlclose`d, and the
//!   host checks `/proc/self/maps` to tell whether it is really gone.
// The workspace denies unsafe code; this crate is one of the two allowed
// to have it (ARCHITECTURE.md), each block with its SAFETY comment.
#![allow(unsafe_code)]

mod allocator;
mod connections;
mod descriptor;
mod error;
mod home;
mod host_table;
mod library;
mod maps;
mod port;
pub mod sandbox;

pub use allocator::{limit_malloc_arenas, unmap_large_blocks};
pub use connections::{ConnectionLimits, Handed, Meter, Returned};
pub use error::{CallError, LoadError};
pub use library::{Instance, Library, Request, Response, ABI_VERSIONS};
pub use maps::lingering;
pub use port::{Broken, Call, Closed, Frame, Port, RequestHead, ResponseHead};
