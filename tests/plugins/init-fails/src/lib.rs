//! Test fixture nine9s 0.7.0: state v1, and `init` panics when it is
//! handed state — an upgrade from 0.2.0 must abort before the switch.
#![forbid(unsafe_code)]

use nine9s_sdk::{Plugin, Request, Response};

pub struct InitFails;

impl Plugin for InitFails {
    const STATE_VERSION: u32 = 1;

    fn init(state: Option<&[u8]>) -> Result<Self, String> {
        if state.is_some() {
            panic!("deliberate panic in init");
        }
        Ok(InitFails)
    }

    fn handle(&self, _request: &Request<'_>) -> Response {
        Response::text("0.7.0")
    }
}

nine9s_sdk::export_plugin!(InitFails, name = "nine9s");
