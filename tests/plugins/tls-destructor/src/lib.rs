//! Test fixture nine9s 0.2.2: what the SDK tells plugin authors not to do.
//! It keeps a `thread_local!` with a destructor, so once it has served a
//! request glibc will never unmap it; the agent must say so instead of
//! pretending it unloaded.
#![forbid(unsafe_code)]

use std::cell::RefCell;

use nine9s_sdk::{Plugin, Request, Response};

thread_local! {
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

pub struct TlsDestructor;

impl Plugin for TlsDestructor {
    fn init(_state: Option<&[u8]>) -> Result<Self, String> {
        Ok(TlsDestructor)
    }

    fn handle(&self, _request: &Request<'_>) -> Response {
        SCRATCH.with(|s| s.borrow_mut().extend_from_slice(b"x"));
        Response::text("Hello from a library that can never leave")
    }
}

nine9s_sdk::export_plugin!(TlsDestructor, name = "nine9s");
