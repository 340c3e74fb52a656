//! Test fixture nine9s 0.6.0: serves like 0.2.0 (state v1), but its health
//! check fails once it has served a request — healthy when the agent tries
//! it before the switch, unhealthy during the soak.
#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicU64, Ordering};

use nine9s_sdk::{Plugin, Request, Response};

pub struct Unhealthy {
    count: AtomicU64,
    served: AtomicU64,
}

impl Plugin for Unhealthy {
    const STATE_VERSION: u32 = 1;

    fn init(state: Option<&[u8]>) -> Result<Self, String> {
        let count = state.map_or(Ok(0), |s| {
            s.try_into()
                .map(u64::from_le_bytes)
                .map_err(|_| "bad state".to_string())
        })?;
        Ok(Unhealthy {
            count: AtomicU64::new(count),
            served: AtomicU64::new(0),
        })
    }

    fn handle(&self, request: &Request<'_>) -> Response {
        self.served.fetch_add(1, Ordering::Relaxed);
        match request.path {
            "/" => {
                self.count.fetch_add(1, Ordering::Relaxed);
                Response::text("Hello world 6 !")
            }
            "/count" => Response::text(self.count.load(Ordering::Relaxed).to_string()),
            _ => Response::not_found(),
        }
    }

    fn snapshot(&self) -> Vec<u8> {
        self.count.load(Ordering::Relaxed).to_le_bytes().to_vec()
    }

    fn health(&self) -> Result<(), String> {
        if self.served.load(Ordering::Relaxed) > 0 {
            Err("database connection lost".into())
        } else {
            Ok(())
        }
    }
}

nine9s_sdk::export_plugin!(Unhealthy, name = "nine9s");
