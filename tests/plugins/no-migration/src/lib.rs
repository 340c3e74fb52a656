//! Test fixture nine9s 0.5.0: state v9 and no migrations at all — an
//! upgrade from a release with state must be refused before the switch.
#![forbid(unsafe_code)]

use nine9s_sdk::{Plugin, Request, Response};

pub struct NoMigration;

impl Plugin for NoMigration {
    const STATE_VERSION: u32 = 9;

    fn init(_state: Option<&[u8]>) -> Result<Self, String> {
        Ok(NoMigration)
    }

    fn handle(&self, _request: &Request<'_>) -> Response {
        Response::text("0.5.0")
    }
}

nine9s_sdk::export_plugin!(NoMigration, name = "nine9s");
