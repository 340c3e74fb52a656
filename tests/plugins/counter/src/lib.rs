//! What most test fixtures share with nine9s 0.2.0: a count of `GET /`
//! kept as state version 1 (a little-endian `u64`), so the fixtures can
//! take over 0.2.0's state and hand it back; and `GET /slow?ms=N`, a
//! request that stays in flight for a while.
#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicU64, Ordering};

use nine9s_sdk::{Request, Response};

/// The state version of the count, as in nine9s 0.2.0.
pub const STATE_VERSION: u32 = 1;

pub struct Counter(AtomicU64);

impl Counter {
    /// From a v1 snapshot, or zero.
    pub fn restore(state: Option<&[u8]>) -> Result<Counter, String> {
        let count = match state {
            None => 0,
            Some(bytes) => u64::from_le_bytes(
                bytes
                    .try_into()
                    .map_err(|_| format!("state v1 is 8 bytes, got {}", bytes.len()))?,
            ),
        };
        Ok(Counter(AtomicU64::new(count)))
    }

    /// Counts one; the count after it.
    pub fn hit(&self) -> u64 {
        self.0.fetch_add(1, Ordering::Relaxed) + 1
    }

    pub fn count(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    /// The answer to `GET /count`.
    pub fn response(&self) -> Response {
        Response::text(self.count().to_string())
    }

    pub fn snapshot(&self) -> Vec<u8> {
        self.count().to_le_bytes().to_vec()
    }
}

/// The answer to `GET /slow?ms=N`, after sleeping N milliseconds (100 by
/// default).
pub fn slow(request: &Request<'_>) -> Response {
    let ms = request
        .query
        .strip_prefix("ms=")
        .and_then(|n| n.parse().ok())
        .unwrap_or(100);
    std::thread::sleep(std::time::Duration::from_millis(ms));
    Response::text(format!("slept {ms} ms"))
}
