//! Test fixture nine9s 0.2.6: counts `GET /` like 0.2.0 (state v1), and
//! `GET /slow?ms=N` takes N milliseconds — a request still in flight when
//! a switch or a shutdown comes.
#![forbid(unsafe_code)]

use fixture_counter::{Counter, STATE_VERSION};
use nine9s_sdk::{Plugin, Request, Response};

pub struct Slow(Counter);

impl Plugin for Slow {
    const STATE_VERSION: u32 = STATE_VERSION;

    fn init(state: Option<&[u8]>) -> Result<Self, String> {
        Counter::restore(state).map(Slow)
    }

    fn handle(&self, request: &Request<'_>) -> Response {
        match request.path {
            "/" => {
                self.0.hit();
                Response::text("Hello slow !")
            }
            "/count" => self.0.response(),
            "/slow" => fixture_counter::slow(request),
            _ => Response::not_found(),
        }
    }

    fn snapshot(&self) -> Vec<u8> {
        self.0.snapshot()
    }
}

nine9s_sdk::export_plugin!(Slow, name = "nine9s");
