//! Test fixture myservice 0.1.5: myservice's count (state version 1, a
//! little-endian u64) behind `GET /` and `GET /count`; what matters is its
//! plan from 0.1.0 (`release.toml`), which has no `drain` step.

use std::sync::Arc;

use axum::extract::State;
use axum::routing::get;
use axum::Router;
use fixture_counter::Counter;
use nine9s_sdk::service::{AsyncPlugin, HttpService};

pub struct App;

impl AsyncPlugin for App {
    const STATE_VERSION: u32 = fixture_counter::STATE_VERSION;
    type State = Counter;

    fn restore(state: Option<&[u8]>) -> Result<Counter, String> {
        Counter::restore(state)
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
        state.snapshot()
    }
}

async fn hello(State(counter): State<Arc<Counter>>) -> String {
    let served = counter.hit();
    format!("hello from myservice 0.1.5 ({served} served)\n")
}

async fn count(State(counter): State<Arc<Counter>>) -> String {
    format!("{}\n", counter.count())
}

nine9s_sdk::export_service!(App, name = "myservice");
