//! myservice: an axum router served by nine9s as an async release.
//! `GET /` says hello with the version and counts it; `GET /count` is that
//! count, carried across upgrades (state version 1, a little-endian u64);
//! `GET /sleep/{ms}` answers after ms milliseconds; `GET /stream/{n}`
//! streams n lines, one every 10 ms; `POST /echo` streams the request body
//! back as it arrives.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::routing::{get, post};
use axum::Router;
use nine9s_sdk::service::{AsyncPlugin, HttpService};

pub struct App;

/// What every request shares, and what crosses upgrades.
pub struct Counter(AtomicU64);

impl AsyncPlugin for App {
    const STATE_VERSION: u32 = 1;
    // Tokio's I/O driver: the release then serves its clients' HTTP/1.1
    // connections itself, at the speed of a bare server.
    const ENABLE_IO: bool = true;
    type State = Counter;

    fn restore(state: Option<&[u8]>) -> Result<Counter, String> {
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

    fn service(state: Arc<Counter>) -> HttpService {
        HttpService::new(
            Router::new()
                .route("/", get(hello))
                .route("/count", get(count))
                .route("/sleep/{ms}", get(sleep))
                .route("/stream/{n}", get(stream))
                .route("/echo", post(echo))
                .with_state(state),
        )
    }

    fn snapshot(state: &Counter) -> Vec<u8> {
        state.0.load(Ordering::Relaxed).to_le_bytes().to_vec()
    }
}

async fn hello(State(counter): State<Arc<Counter>>) -> String {
    let served = counter.0.fetch_add(1, Ordering::Relaxed) + 1;
    let version = env!("CARGO_PKG_VERSION");
    format!("hello from myservice {version} ({served} served)\n")
}

async fn count(State(counter): State<Arc<Counter>>) -> String {
    format!("{}\n", counter.0.load(Ordering::Relaxed))
}

async fn sleep(Path(ms): Path<u64>) -> String {
    tokio::time::sleep(Duration::from_millis(ms)).await;
    format!("slept {ms} ms\n")
}

async fn stream(Path(n): Path<u32>) -> Body {
    let lines = futures_util::stream::unfold(1, move |i| async move {
        if i > n {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        Some((Ok::<_, Infallible>(format!("line {i} of {n}\n")), i + 1))
    });
    Body::from_stream(lines)
}

/// The request body is the response body: each piece goes back as it comes.
async fn echo(body: Body) -> Body {
    body
}

nine9s_sdk::export_service!(App, name = "myservice");
