//! Test fixture myservice 0.3.0: the count as state version 2 (a
//! big-endian u64), with migrations from and to myservice's version 1 (a
//! little-endian u64). Each migration keeps a scratch buffer in a
//! `thread_local!` with a destructor, as code that caches per thread does
//! (a thread-local RNG, a formatter's buffer): glibc keeps the library
//! mapped for as long as the thread it ran on lives, so the agent must run
//! it on a thread that ends before the library is let go of.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::routing::get;
use axum::Router;
use nine9s_sdk::service::{AsyncPlugin, HttpService};
use nine9s_sdk::Migration;

pub struct App;

pub struct Counter(AtomicU64);

thread_local! {
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// `bytes` re-encoded from one byte order to the other, through the
/// thread's scratch buffer.
fn swap_order(bytes: &[u8]) -> Result<Vec<u8>, String> {
    let count: [u8; 8] = bytes.try_into().map_err(|_| "not 8 bytes")?;
    SCRATCH.with(|scratch| {
        let mut scratch = scratch.borrow_mut();
        scratch.clear();
        scratch.extend(count.iter().rev());
        Ok(scratch.clone())
    })
}

const MIGRATIONS: &[Migration] = &[
    Migration {
        from: 1,
        to: 2,
        run: swap_order,
    },
    Migration {
        from: 2,
        to: 1,
        run: swap_order,
    },
];

impl AsyncPlugin for App {
    const STATE_VERSION: u32 = 2;
    type State = Counter;

    fn restore(state: Option<&[u8]>) -> Result<Counter, String> {
        let count = match state {
            None => 0,
            Some(bytes) => u64::from_be_bytes(bytes.try_into().map_err(|_| "not 8 bytes")?),
        };
        Ok(Counter(AtomicU64::new(count)))
    }

    fn service(state: Arc<Counter>) -> HttpService {
        HttpService::new(
            Router::new()
                .route("/", get(hello))
                .route("/count", get(count))
                .with_state(state),
        )
    }

    fn snapshot(state: &Counter) -> Vec<u8> {
        state.0.load(Ordering::Relaxed).to_be_bytes().to_vec()
    }

    fn migrations() -> &'static [Migration] {
        MIGRATIONS
    }
}

async fn hello(State(counter): State<Arc<Counter>>) -> String {
    let served = counter.0.fetch_add(1, Ordering::Relaxed) + 1;
    format!("hello from myservice 0.3.0 ({served} served)\n")
}

async fn count(State(counter): State<Arc<Counter>>) -> String {
    format!("{}\n", counter.0.load(Ordering::Relaxed))
}

nine9s_sdk::export_service!(App, name = "myservice");
