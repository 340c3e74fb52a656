//! Test fixture nine9s 0.2.1: state v1 like 0.2.0, but `GET /` panics —
//! for the "a panicking handler gives a 500 and the agent keeps serving"
//! and error-rate rollback tests.
#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicU64, Ordering};

use nine9s_sdk::{Plugin, Request, Response};

pub struct Panicky {
    count: AtomicU64,
}

impl Plugin for Panicky {
    const STATE_VERSION: u32 = 1;

    fn init(state: Option<&[u8]>) -> Result<Self, String> {
        let count = state.map_or(Ok(0), |s| {
            s.try_into()
                .map(u64::from_le_bytes)
                .map_err(|_| "bad state".to_string())
        })?;
        Ok(Panicky {
            count: AtomicU64::new(count),
        })
    }

    fn handle(&self, request: &Request<'_>) -> Response {
        match request.path {
            "/" => panic!("deliberate panic in the handler of 0.2.1"),
            "/count" => Response::text(self.count.load(Ordering::Relaxed).to_string()),
            _ => Response::not_found(),
        }
    }

    fn snapshot(&self) -> Vec<u8> {
        self.count.load(Ordering::Relaxed).to_le_bytes().to_vec()
    }
}

nine9s_sdk::export_plugin!(Panicky, name = "nine9s");
