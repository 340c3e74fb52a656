//! A nine9s release: `GET /` says hello with the crate's version and
//! counts the request; `GET /count` answers the count. The count is the
//! state (version 1: a little-endian `u64`), carried across upgrades,
//! downgrades and restarts.

use std::sync::atomic::{AtomicU64, Ordering};

use nine9s_sdk::{Plugin, Request, Response};

pub struct Service {
    hellos: AtomicU64,
}

impl Plugin for Service {
    /// Bump it when the state's shape changes, and add a migration
    /// (`fn migrations()`) from the older shape.
    const STATE_VERSION: u32 = 1;

    fn init(state: Option<&[u8]>) -> Result<Self, String> {
        let hellos = match state {
            None => 0,
            Some(bytes) => u64::from_le_bytes(
                bytes
                    .try_into()
                    .map_err(|_| format!("state v1 is 8 bytes, got {}", bytes.len()))?,
            ),
        };
        Ok(Service {
            hellos: AtomicU64::new(hellos),
        })
    }

    fn handle(&self, request: &Request<'_>) -> Response {
        match (request.method, request.path) {
            ("GET", "/") => {
                let served = self.hellos.fetch_add(1, Ordering::Relaxed) + 1;
                Response::text(format!(
                    "hello from {} {} ({served} served)\n",
                    env!("CARGO_PKG_NAME"),
                    env!("CARGO_PKG_VERSION")
                ))
            }
            ("GET", "/count") => Response::text(self.hellos.load(Ordering::Relaxed).to_string()),
            _ => Response::not_found(),
        }
    }

    fn snapshot(&self) -> Vec<u8> {
        self.hellos.load(Ordering::Relaxed).to_le_bytes().to_vec()
    }
}

nine9s_sdk::export_plugin!(Service, name = env!("CARGO_PKG_NAME"));
