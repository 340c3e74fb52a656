//! nine9s 0.1.0, the tutorial's first release: `GET /` answers
//! `Hello world!`; everything else is 404. It keeps no state.
#![forbid(unsafe_code)]

use nine9s_sdk::{Plugin, Request, Response};

pub struct Nine9s;

impl Plugin for Nine9s {
    fn init(_state: Option<&[u8]>) -> Result<Self, String> {
        Ok(Nine9s)
    }

    fn handle(&self, request: &Request<'_>) -> Response {
        match (request.method, request.path) {
            ("GET", "/") => Response::text("Hello world!"),
            _ => Response::not_found(),
        }
    }
}

nine9s_sdk::export_plugin!(Nine9s, name = "nine9s");
