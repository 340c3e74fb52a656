//! Test fixture nine9s 0.3.5: counts like 0.2.0 but keeps the count as
//! state v2 (the same bytes); its migration up from v1 works, its
//! migration back down to v1 panics — so a rollback to 0.2.0 cannot carry
//! the running state and must fall back to 0.2.0's snapshot.
#![forbid(unsafe_code)]

use fixture_counter::Counter;
use nine9s_sdk::{Migration, Plugin, Request, Response};

pub struct BadDowngrade(Counter);

fn up(state: &[u8]) -> Result<Vec<u8>, String> {
    Ok(state.to_vec())
}

fn down(_: &[u8]) -> Result<Vec<u8>, String> {
    panic!("deliberate panic in the v2 -> v1 migration")
}

impl Plugin for BadDowngrade {
    const STATE_VERSION: u32 = 2;

    fn init(state: Option<&[u8]>) -> Result<Self, String> {
        Counter::restore(state).map(BadDowngrade)
    }

    fn handle(&self, request: &Request<'_>) -> Response {
        match request.path {
            "/" => {
                self.0.hit();
                Response::text("Hello world 3.5 !")
            }
            "/count" => self.0.response(),
            _ => Response::not_found(),
        }
    }

    fn snapshot(&self) -> Vec<u8> {
        self.0.snapshot()
    }

    fn migrations() -> &'static [Migration] {
        &[
            Migration {
                from: 1,
                to: 2,
                run: up,
            },
            Migration {
                from: 2,
                to: 1,
                run: down,
            },
        ]
    }
}

nine9s_sdk::export_plugin!(BadDowngrade, name = "nine9s");
