//! Test fixture nine9s 0.6.5: serves like 0.2.0 (state v1), but once it
//! has served a request its health check hangs for a minute — healthy
//! when the agent rehearses the switch, stuck during the soak. `GET /hung`
//! says whether a health check is hanging right now.
#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use fixture_counter::{Counter, STATE_VERSION};
use nine9s_sdk::{Plugin, Request, Response};

pub struct HungHealth {
    count: Counter,
    served: AtomicBool,
    hanging: AtomicBool,
}

impl Plugin for HungHealth {
    const STATE_VERSION: u32 = STATE_VERSION;

    fn init(state: Option<&[u8]>) -> Result<Self, String> {
        Ok(HungHealth {
            count: Counter::restore(state)?,
            served: AtomicBool::new(false),
            hanging: AtomicBool::new(false),
        })
    }

    fn handle(&self, request: &Request<'_>) -> Response {
        self.served.store(true, Ordering::Relaxed);
        match request.path {
            "/" => {
                self.count.hit();
                Response::text("Hello hung !")
            }
            "/count" => self.count.response(),
            "/hung" => Response::text(if self.hanging.load(Ordering::SeqCst) {
                "yes"
            } else {
                "no"
            }),
            _ => Response::not_found(),
        }
    }

    fn snapshot(&self) -> Vec<u8> {
        self.count.snapshot()
    }

    fn health(&self) -> Result<(), String> {
        if self.served.load(Ordering::Relaxed) {
            self.hanging.store(true, Ordering::SeqCst);
            std::thread::sleep(Duration::from_secs(60));
            self.hanging.store(false, Ordering::SeqCst);
        }
        Ok(())
    }
}

nine9s_sdk::export_plugin!(HungHealth, name = "nine9s");
