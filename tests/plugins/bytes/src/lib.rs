//! Bench fixture `bytes` 0.1.0, an async release (ABI version 3) for
//! `nine9s-bench --stream-gib`: `GET /bytes/{n}` streams n zero bytes in
//! 64 KiB chunks, as fast as the client takes them; no state. The bench
//! also compiles this file into its bare baseline server (against its
//! stand-in SDK), so it uses nothing of the SDK but `AsyncPlugin`,
//! `HttpService` and `export_service!`.

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::Path;
use axum::routing::get;
use axum::Router;
use nine9s_sdk::service::{AsyncPlugin, HttpService};

pub struct App;

impl AsyncPlugin for App {
    // It serves its connections itself, as the README's release does.
    const ENABLE_IO: bool = true;
    type State = ();

    fn restore(_state: Option<&[u8]>) -> Result<(), String> {
        Ok(())
    }

    fn service(_state: Arc<()>) -> HttpService {
        HttpService::new(Router::new().route("/bytes/{n}", get(bytes)))
    }
}

const CHUNK: usize = 64 * 1024;
static ZEROS: [u8; CHUNK] = [0; CHUNK];

async fn bytes(Path(n): Path<u64>) -> Body {
    let chunks = (0..n).step_by(CHUNK).map(move |at| {
        let len = usize::try_from(n - at).map_or(CHUNK, |left| left.min(CHUNK));
        Ok::<_, Infallible>(Bytes::from_static(&ZEROS[..len]))
    });
    Body::from_stream(futures_util::stream::iter(chunks))
}

nine9s_sdk::export_service!(App, name = "bytes");
