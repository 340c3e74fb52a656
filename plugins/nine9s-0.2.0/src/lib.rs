//! nine9s 0.2.0: `GET /` answers `Hello world 2 !` and counts the request;
//! `GET /count` answers the count. The count is state version 1 (a
//! little-endian `u64`), carried across upgrades and restarts.
#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicU64, Ordering};

use nine9s_sdk::{Plugin, Request, Response};

pub struct Nine9s {
    hello_count: AtomicU64,
}

impl Plugin for Nine9s {
    const STATE_VERSION: u32 = 1;

    fn init(state: Option<&[u8]>) -> Result<Self, String> {
        let count = match state {
            None => 0,
            Some(bytes) => u64::from_le_bytes(
                bytes
                    .try_into()
                    .map_err(|_| format!("state v1 is 8 bytes, got {}", bytes.len()))?,
            ),
        };
        Ok(Nine9s {
            hello_count: AtomicU64::new(count),
        })
    }

    fn handle(&self, request: &Request<'_>) -> Response {
        match (request.method, request.path) {
            ("GET", "/") => {
                self.hello_count.fetch_add(1, Ordering::Relaxed);
                Response::text("Hello world 2 !")
            }
            ("GET", "/count") => {
                Response::text(self.hello_count.load(Ordering::Relaxed).to_string())
            }
            _ => Response::not_found(),
        }
    }

    fn snapshot(&self) -> Vec<u8> {
        self.hello_count
            .load(Ordering::Relaxed)
            .to_le_bytes()
            .to_vec()
    }
}

nine9s_sdk::export_plugin!(Nine9s, name = "nine9s");
