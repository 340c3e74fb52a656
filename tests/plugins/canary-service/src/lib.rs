//! Test fixture nine9s 0.1.6: a service (ABI version 3) that keeps no
//! state, like 0.1.0, so it can serve as a canary beside it. `GET /`
//! answers `Hello canary service !`; `GET /stream/{n}` streams n lines
//! (`line K of N`), one every 10 ms, as myservice does.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::Path;
use axum::routing::get;
use axum::Router;
use nine9s_sdk::service::{AsyncPlugin, HttpService};

pub struct App;

impl AsyncPlugin for App {
    type State = ();

    fn restore(_state: Option<&[u8]>) -> Result<(), String> {
        Ok(())
    }

    fn service(_state: Arc<()>) -> HttpService {
        HttpService::new(
            Router::new()
                .route("/", get(|| async { "Hello canary service !\n" }))
                .route("/stream/{n}", get(stream)),
        )
    }
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

nine9s_sdk::export_service!(App, name = "nine9s");
