//! Test fixture nine9s 0.1.5: keeps no state, like 0.1.0, so it can serve
//! as a canary beside it. `GET /` answers `Hello canary !`; `GET /fail`
//! answers 500, which a canary's error rate counts; after `GET
//! /hang-health` this instance's next health check hangs for a minute;
//! `GET /stuck` never returns.
#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use nine9s_sdk::{Plugin, Request, Response};

pub struct Canary {
    hang_next_check: AtomicBool,
}

impl Plugin for Canary {
    fn init(_: Option<&[u8]>) -> Result<Self, String> {
        Ok(Canary {
            hang_next_check: AtomicBool::new(false),
        })
    }

    fn handle(&self, request: &Request<'_>) -> Response {
        match request.path {
            "/" => Response::text("Hello canary !"),
            "/fail" => Response::with_status(500, "failing on purpose\n"),
            "/hang-health" => {
                self.hang_next_check.store(true, Ordering::SeqCst);
                Response::text("the next health check hangs")
            }
            "/stuck" => loop {
                std::thread::sleep(Duration::from_secs(3600));
            },
            _ => Response::not_found(),
        }
    }

    fn health(&self) -> Result<(), String> {
        if self.hang_next_check.swap(false, Ordering::SeqCst) {
            std::thread::sleep(Duration::from_secs(60));
        }
        Ok(())
    }
}

nine9s_sdk::export_plugin!(Canary, name = "nine9s");
