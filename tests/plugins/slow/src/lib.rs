//! Test fixture nine9s 0.2.6: counts `GET /` like 0.2.0 (state v1), and
//! `GET /slow?ms=N` takes N milliseconds — a request still in flight when
//! a switch or a shutdown comes.
#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use nine9s_sdk::{Plugin, Request, Response};

pub struct Slow {
    count: AtomicU64,
}

impl Plugin for Slow {
    const STATE_VERSION: u32 = 1;

    fn init(state: Option<&[u8]>) -> Result<Self, String> {
        let count = state.map_or(Ok(0), |s| {
            s.try_into()
                .map(u64::from_le_bytes)
                .map_err(|_| "bad state".to_string())
        })?;
        Ok(Slow {
            count: AtomicU64::new(count),
        })
    }

    fn handle(&self, request: &Request<'_>) -> Response {
        match request.path {
            "/" => {
                self.count.fetch_add(1, Ordering::Relaxed);
                Response::text("Hello slow !")
            }
            "/count" => Response::text(self.count.load(Ordering::Relaxed).to_string()),
            "/slow" => {
                let ms = request
                    .query
                    .strip_prefix("ms=")
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(100);
                std::thread::sleep(Duration::from_millis(ms));
                Response::text(format!("slept {ms} ms"))
            }
            _ => Response::not_found(),
        }
    }

    fn snapshot(&self) -> Vec<u8> {
        self.count.load(Ordering::Relaxed).to_le_bytes().to_vec()
    }
}

nine9s_sdk::export_plugin!(Slow, name = "nine9s");
