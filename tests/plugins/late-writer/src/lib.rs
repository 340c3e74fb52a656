//! Test fixture myservice 0.1.9: keeps myservice's count (state version 1,
//! a little-endian u64); `GET /late/{ms}` waits ms milliseconds, then
//! counts — after a switch that came meanwhile took the state.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
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
                .route("/count", get(count))
                .route("/late/{ms}", get(late))
                .with_state(state),
        )
    }

    fn snapshot(state: &Counter) -> Vec<u8> {
        state.snapshot()
    }
}

async fn count(State(counter): State<Arc<Counter>>) -> String {
    format!("{}\n", counter.count())
}

async fn late(State(counter): State<Arc<Counter>>, Path(ms): Path<u64>) -> String {
    tokio::time::sleep(Duration::from_millis(ms)).await;
    let count = counter.hit();
    format!("counted late: {count}\n")
}

nine9s_sdk::export_service!(App, name = "myservice");
