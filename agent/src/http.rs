//! The data plane: HTTP/1.1 on hyper, every request answered by the active
//! release through the [`Runtime`]. The listener is never closed by an
//! upgrade; only shutdown stops it, and then in-flight requests get a
//! grace period to finish.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::{Body, Incoming};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use nine9s_host::CallError;
use tokio::net::TcpListener;

use crate::runtime::Runtime;

/// Largest request body a plugin is given.
const MAX_BODY: usize = 16 * 1024 * 1024;

/// Header naming the release that answered.
pub const RELEASE_HEADER: &str = "x-nine9s-release";

/// Accepts connections until `shutdown` resolves, then waits up to `grace`
/// for open connections to finish their requests.
pub async fn serve(
    listener: TcpListener,
    runtime: Arc<Runtime>,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) {
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _) = match accepted {
                    Ok(conn) => conn,
                    Err(e) => {
                        // Out of file descriptors and the like: back off, keep serving.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let runtime = Arc::clone(&runtime);
                let service = service_fn(move |request| {
                    let runtime = Arc::clone(&runtime);
                    async move { Ok::<_, Infallible>(answer(&runtime, request).await) }
                });
                let connection = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
                let connection = graceful.watch(connection);
                tokio::spawn(async move {
                    if let Err(e) = connection.await {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                });
            }
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    tracing::info!("HTTP listener closed; draining open connections");
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            grace_ms = grace.as_millis() as u64,
            "grace period over with requests still open"
        );
    }
}

async fn answer(runtime: &Runtime, request: Request<Incoming>) -> Response<Full<Bytes>> {
    let (parts, body) = request.into_parts();
    let body = if body.is_end_stream() {
        Bytes::new()
    } else {
        match Limited::new(body, MAX_BODY).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => {
                return plain(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("the request body is over {MAX_BODY} bytes\n"),
                );
            }
            Err(e) => {
                return plain(
                    StatusCode::BAD_REQUEST,
                    format!("cannot read the request body: {e}\n"),
                );
            }
        }
    };
    let mut headers = String::with_capacity(parts.headers.len() * 32);
    for (name, value) in &parts.headers {
        if let Ok(value) = value.to_str() {
            headers.push_str(name.as_str());
            headers.push_str(": ");
            headers.push_str(value);
            headers.push('\n');
        }
    }
    let plugin_request = nine9s_host::Request {
        method: parts.method.as_str(),
        path: parts.uri.path(),
        query: parts.uri.query().unwrap_or(""),
        headers: &headers,
        body: &body,
    };
    let handled = runtime.handle(&plugin_request).await;
    let version = handled.version;
    let mut response = match handled.result {
        Ok(reply) => {
            let status =
                StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let mut response = Response::new(Full::new(Bytes::from(reply.body)));
            *response.status_mut() = status;
            if let Ok(value) = HeaderValue::try_from(reply.content_type) {
                response.headers_mut().insert(CONTENT_TYPE, value);
            }
            response
        }
        Err(e) => {
            match &e {
                CallError::Panicked(message) => {
                    tracing::error!(%version, path = parts.uri.path(), %message, "release panicked handling a request")
                }
                other => {
                    tracing::error!(%version, path = parts.uri.path(), error = %other, "release failed a request")
                }
            }
            plain(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("release {version} failed this request: {e}\n"),
            )
        }
    };
    response
        .headers_mut()
        .insert(RELEASE_HEADER, HeaderValue::from_static(version));
    response
}

fn plain(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    response
}
