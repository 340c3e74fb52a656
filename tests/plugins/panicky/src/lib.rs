//! Test fixture nine9s 0.2.1: state v1 like 0.2.0, but `GET /` panics —
//! for the "a panicking handler gives a 500 and the agent keeps serving"
//! and error-rate rollback tests.
#![forbid(unsafe_code)]

use fixture_counter::{Counter, STATE_VERSION};
use nine9s_sdk::{Plugin, Request, Response};

pub struct Panicky(Counter);

impl Plugin for Panicky {
    const STATE_VERSION: u32 = STATE_VERSION;

    fn init(state: Option<&[u8]>) -> Result<Self, String> {
        Counter::restore(state).map(Panicky)
    }

    fn handle(&self, request: &Request<'_>) -> Response {
        match request.path {
            "/" => panic!("deliberate panic in the handler of 0.2.1"),
            "/count" => self.0.response(),
            _ => Response::not_found(),
        }
    }

    fn snapshot(&self) -> Vec<u8> {
        self.0.snapshot()
    }
}

nine9s_sdk::export_plugin!(Panicky, name = "nine9s");
