//! Test fixture nine9s 0.2.5: counts like 0.2.0 (state v1) and records
//! the hooks an upgrade plan ran on it, in order, at `GET /hooks`.
#![forbid(unsafe_code)]

use std::sync::Mutex;

use fixture_counter::{Counter, STATE_VERSION};
use nine9s_sdk::{Plugin, Request, Response};

pub struct Hooks {
    count: Counter,
    ran: Mutex<Vec<String>>,
}

impl Plugin for Hooks {
    const STATE_VERSION: u32 = STATE_VERSION;

    fn init(state: Option<&[u8]>) -> Result<Self, String> {
        Ok(Hooks {
            count: Counter::restore(state)?,
            ran: Mutex::new(Vec::new()),
        })
    }

    fn handle(&self, request: &Request<'_>) -> Response {
        match request.path {
            "/" => {
                self.count.hit();
                Response::text("Hello hooks !")
            }
            "/count" => self.count.response(),
            "/hooks" => {
                Response::text(self.ran.lock().unwrap_or_else(|e| e.into_inner()).join(" "))
            }
            _ => Response::not_found(),
        }
    }

    fn snapshot(&self) -> Vec<u8> {
        self.count.snapshot()
    }

    fn hook(&self, name: &str) -> Result<(), String> {
        match name {
            "warm" | "announce" => {
                self.ran
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(name.to_owned());
                Ok(())
            }
            other => Err(format!("no hook named {other:?}")),
        }
    }
}

nine9s_sdk::export_plugin!(Hooks, name = "nine9s");
