//! Test fixture nine9s 0.6.0: serves like 0.2.0 (state v1), but its health
//! check fails once it has served a request — healthy when the agent tries
//! it before the switch, unhealthy during the soak. `GET /slow?ms=N` takes
//! N milliseconds: a request that keeps its rollback from quiescing.
#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicBool, Ordering};

use fixture_counter::{Counter, STATE_VERSION};
use nine9s_sdk::{Plugin, Request, Response};

pub struct Unhealthy {
    count: Counter,
    served: AtomicBool,
}

impl Plugin for Unhealthy {
    const STATE_VERSION: u32 = STATE_VERSION;

    fn init(state: Option<&[u8]>) -> Result<Self, String> {
        Ok(Unhealthy {
            count: Counter::restore(state)?,
            served: AtomicBool::new(false),
        })
    }

    fn handle(&self, request: &Request<'_>) -> Response {
        self.served.store(true, Ordering::Relaxed);
        match request.path {
            "/" => {
                self.count.hit();
                Response::text("Hello world 6 !")
            }
            "/count" => self.count.response(),
            "/slow" => fixture_counter::slow(request),
            _ => Response::not_found(),
        }
    }

    fn snapshot(&self) -> Vec<u8> {
        self.count.snapshot()
    }

    fn health(&self) -> Result<(), String> {
        if self.served.load(Ordering::Relaxed) {
            Err("database connection lost".into())
        } else {
            Ok(())
        }
    }
}

nine9s_sdk::export_plugin!(Unhealthy, name = "nine9s");
