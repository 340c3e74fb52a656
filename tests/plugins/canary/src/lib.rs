//! Test fixture nine9s 0.1.5: keeps no state, like 0.1.0, so it can serve
//! as a canary beside it. `GET /` answers `Hello canary !`; `GET /fail`
//! answers 500, which a canary's error rate counts.
#![forbid(unsafe_code)]

use nine9s_sdk::{Plugin, Request, Response};

pub struct Canary;

impl Plugin for Canary {
    fn init(_: Option<&[u8]>) -> Result<Self, String> {
        Ok(Canary)
    }

    fn handle(&self, request: &Request<'_>) -> Response {
        match request.path {
            "/" => Response::text("Hello canary !"),
            "/fail" => Response::with_status(500, "failing on purpose\n"),
            _ => Response::not_found(),
        }
    }
}

nine9s_sdk::export_plugin!(Canary, name = "nine9s");
