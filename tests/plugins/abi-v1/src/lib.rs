//! Test fixture nine9s 0.4.1, built by the plugin SDK of ABI version 1
//! (vendored in `sdk_v1`, frozen): serves like 0.2.0 (`Hello world 2 !`,
//! the count as state v1) and `GET /headers` answers the request's headers
//! as the v1 ABI hands them over, `name: value` lines.
// The vendored SDK has the unsafe code the real one had.
#![allow(unsafe_code)]

// A whole SDK of which this plugin uses a part.
#[allow(dead_code)]
mod sdk_v1;

use std::sync::atomic::{AtomicU64, Ordering};

use sdk_v1::{Plugin, Request, Response};

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
            ("GET", "/headers") => Response::text(request.headers),
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

export_plugin!(Nine9s, name = "nine9s");
