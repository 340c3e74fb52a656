//! Test fixture myservice 0.1.5: myservice's count (state version 1, a
//! little-endian u64) behind `GET /` and `GET /count`; what matters is its
//! plan from 0.1.0 (`release.toml`), which has no `drain` step.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::routing::get;
use axum::Router;
use nine9s_sdk::service::{AsyncPlugin, HttpService};

pub struct App;

pub struct Counter(AtomicU64);

impl AsyncPlugin for App {
    const STATE_VERSION: u32 = 1;
    type State = Counter;

    fn restore(state: Option<&[u8]>) -> Result<Counter, String> {
        let count = match state {
            None => 0,
            Some(bytes) => u64::from_le_bytes(bytes.try_into().map_err(|_| "not 8 bytes")?),
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
        state.0.load(Ordering::Relaxed).to_le_bytes().to_vec()
    }
}

async fn hello(State(counter): State<Arc<Counter>>) -> String {
    let served = counter.0.fetch_add(1, Ordering::Relaxed) + 1;
    format!("hello from myservice 0.1.5 ({served} served)\n")
}

async fn count(State(counter): State<Arc<Counter>>) -> String {
    format!("{}\n", counter.0.load(Ordering::Relaxed))
}

nine9s_sdk::export_service!(App, name = "myservice");
