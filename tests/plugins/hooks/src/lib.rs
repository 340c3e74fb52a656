//! Test fixture nine9s 0.2.5: counts like 0.2.0 (state v1) and records
//! the hooks an upgrade plan ran on it, in order, at `GET /hooks`.
#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use nine9s_sdk::{Plugin, Request, Response};

pub struct Hooks {
    count: AtomicU64,
    ran: Mutex<Vec<String>>,
}

impl Plugin for Hooks {
    const STATE_VERSION: u32 = 1;

    fn init(state: Option<&[u8]>) -> Result<Self, String> {
        let count = state.map_or(Ok(0), |s| {
            s.try_into()
                .map(u64::from_le_bytes)
                .map_err(|_| "bad state".to_string())
        })?;
        Ok(Hooks {
            count: AtomicU64::new(count),
            ran: Mutex::new(Vec::new()),
        })
    }

    fn handle(&self, request: &Request<'_>) -> Response {
        match request.path {
            "/" => {
                self.count.fetch_add(1, Ordering::Relaxed);
                Response::text("Hello hooks !")
            }
            "/count" => Response::text(self.count.load(Ordering::Relaxed).to_string()),
            "/hooks" => {
                Response::text(self.ran.lock().unwrap_or_else(|e| e.into_inner()).join(" "))
            }
            _ => Response::not_found(),
        }
    }

    fn snapshot(&self) -> Vec<u8> {
        self.count.load(Ordering::Relaxed).to_le_bytes().to_vec()
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
