//! Test fixture nine9s 0.4.0: state v3, and its migration up from v1
//! panics — an upgrade from 0.2.0 must abort before the switch.
#![forbid(unsafe_code)]

use nine9s_sdk::{Migration, Plugin, Request, Response};

pub struct BadMigration;

fn explode(_: &[u8]) -> Result<Vec<u8>, String> {
    panic!("deliberate panic in the v1 -> v3 migration")
}

impl Plugin for BadMigration {
    const STATE_VERSION: u32 = 3;

    fn init(_state: Option<&[u8]>) -> Result<Self, String> {
        Ok(BadMigration)
    }

    fn handle(&self, _request: &Request<'_>) -> Response {
        Response::text("0.4.0")
    }

    fn migrations() -> &'static [Migration] {
        &[Migration {
            from: 1,
            to: 3,
            run: explode,
        }]
    }
}

nine9s_sdk::export_plugin!(BadMigration, name = "nine9s");
