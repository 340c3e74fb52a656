//! Serving a request with a release that is a service (ABI v3): the
//! request is handed to the release with its body still arriving, and the
//! response streams back as the release sends it. Nothing here runs the
//! release's code: the request goes through the instance's port (the
//! host's `Call`), which the release's own threads serve.
//!
//! The request body moves one frame at a time, when the release asks for
//! more (the client's socket holds the rest), within `--max-body` and with
//! at most `--http-body-timeout` between two frames. The response's head
//! must come within `--request-timeout` (a 504 and the call cancelled
//! otherwise); its body then takes as long as it takes, a frame at a time
//! as the client reads. A response whose client goes away is cancelled,
//! which the release hears.

use std::future::poll_fn;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Either, Full};
use hyper::body::{Body as _, Frame, Incoming, SizeHint};
use hyper::header::HeaderValue;
use hyper::{Request, Response, StatusCode};
use nine9s_host::{Broken, Call, RequestHead};

use crate::runtime::{Runtime, Submitted, Tally};

/// A response body: whole (what the agent says, or a release that is not
/// a service), or streamed from a service.
pub type Body = Either<Full<Bytes>, Streamed>;

/// The limits a streamed request is held to.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_body: usize,
    /// Between two frames of the request body.
    pub body_timeout: Duration,
    /// Until the response's head.
    pub request_timeout: Option<Duration>,
}

/// Hands `request` to the service that serves it now; gives it back if
/// the release to serve it is not a service.
pub async fn offer(
    runtime: &Runtime,
    request: Request<Incoming>,
    remote: Option<SocketAddr>,
    limits: Limits,
) -> Result<Response<Body>, Request<Incoming>> {
    let (parts, body) = request.into_parts();
    let body_len = if body.is_end_stream() {
        Some(0)
    } else {
        body.size_hint().exact()
    };
    if body_len.is_some_and(|n| n > limits.max_body as u64) {
        return Ok(whole(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the request body is over {} bytes\n", limits.max_body),
        ));
    }
    let head = RequestHead {
        method: parts.method.to_string(),
        path: parts.uri.path().to_owned(),
        query: parts.uri.query().unwrap_or("").to_owned(),
        headers: parts.headers.clone(),
        version: match parts.version {
            hyper::Version::HTTP_10 => 10,
            hyper::Version::HTTP_2 => 20,
            _ => 11,
        },
        remote: remote.map(|a| a.to_string()).unwrap_or_default(),
        body_len,
    };
    let (call, tally) = match runtime.submit(head).await {
        Submitted::Call(call, tally) => (Arc::new(call), tally),
        Submitted::NotAService => return Err(Request::from_parts(parts, body)),
        Submitted::Closed(version) => {
            // The instance was being unloaded: the next request goes to
            // the one that serves now.
            let mut response = whole(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("release {version} is stopping: retry\n"),
            );
            response
                .headers_mut()
                .insert(hyper::header::RETRY_AFTER, HeaderValue::from_static("0"));
            return Ok(labelled(response, version));
        }
    };
    if body_len == Some(0) {
        call.end_body(false);
    } else {
        tokio::spawn(feed(Arc::clone(&call), body, limits));
    }
    let head = poll_fn(|cx| call.poll_head(cx));
    let head = match limits.request_timeout {
        Some(limit) => match tokio::time::timeout(limit, head).await {
            Ok(head) => head,
            Err(_) => {
                call.cancel("its response did not begin within --request-timeout");
                tally.count(504, false);
                tracing::warn!(version = tally.label, path = parts.uri.path(), limit_ms = limit.as_millis() as u64, "a release did not begin its response within the request timeout: answered 504 and cancelled");
                let response = whole(
                    StatusCode::GATEWAY_TIMEOUT,
                    format!(
                        "release {} did not answer within {} ms\n",
                        tally.label,
                        limit.as_millis()
                    ),
                );
                return Ok(labelled(response, tally.label));
            }
        },
        None => head.await,
    };
    let head = match head {
        Ok(head) => head,
        Err(broken) => return Ok(failed(&tally, parts.uri.path(), &broken)),
    };
    if !crate::runtime::answerable(head.status) {
        call.cancel("its status is no final HTTP status");
        tally.count(502, false);
        tracing::error!(version = tally.label, path = parts.uri.path(), status = head.status, "release answered a status that is no final HTTP status (200 to 599); the client gets 502");
        let response = whole(
            StatusCode::BAD_GATEWAY,
            format!(
                "release {} answered status {}, which is no final HTTP status\n",
                tally.label, head.status
            ),
        );
        return Ok(labelled(response, tally.label));
    }
    tally.count(head.status, false);
    let mut headers = head.headers;
    crate::http::strip_connection_headers(&mut headers);
    let mut response = Response::new(Either::Right(Streamed {
        call,
        len: head.body_len,
        busy: None,
    }));
    *response.status_mut() = StatusCode::from_u16(head.status).expect("checked: 200 to 599");
    *response.headers_mut() = headers;
    Ok(labelled(response, tally.label))
}

/// Feeds the request body to `call` a frame at a time, as the release asks
/// for it.
async fn feed(call: Arc<Call>, mut body: Incoming, limits: Limits) {
    let mut received = 0usize;
    while poll_fn(|cx| call.poll_wants_body(cx)).await {
        // Trailers are not handed on: read on to data or the end.
        let data = loop {
            match tokio::time::timeout(limits.body_timeout, body.frame()).await {
                Ok(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => break Some(data),
                    Err(_) => continue,
                },
                Ok(None) => break None,
                Ok(Some(Err(e))) => {
                    tracing::debug!(error = %e, "a streamed request body broke off");
                    return call.end_body(true);
                }
                Err(_) => {
                    tracing::debug!("a streamed request body stalled past --http-body-timeout");
                    return call.end_body(true);
                }
            }
        };
        let Some(data) = data else {
            return call.end_body(false);
        };
        received += data.len();
        if received > limits.max_body {
            tracing::debug!("a streamed request body went over --max-body");
            return call.end_body(true);
        }
        call.feed_body(data);
    }
}

/// The answer to a call that ended without a response head.
fn failed(tally: &Tally, path: &str, broken: &Broken) -> Response<Body> {
    let panicked = matches!(broken, Broken::Aborted(why) if why.starts_with("panicked"));
    tally.count(500, panicked);
    tracing::error!(version = tally.label, path, error = %broken, "release failed a request");
    let response = whole(
        StatusCode::INTERNAL_SERVER_ERROR,
        format!("release {} failed this request: {broken}\n", tally.label),
    );
    labelled(response, tally.label)
}

fn whole(status: StatusCode, text: String) -> Response<Body> {
    crate::http::plain(status, text).map(Either::Left)
}

fn labelled(mut response: Response<Body>, version: &'static str) -> Response<Body> {
    response
        .headers_mut()
        .insert(crate::http::RELEASE, HeaderValue::from_static(version));
    response
}

/// A response body a service sends as it goes.
pub struct Streamed {
    call: Arc<Call>,
    /// Its length, if the release said it.
    len: Option<u64>,
    /// Whatever must live as long as the response is sent (the
    /// connection's note that a request is under way).
    busy: Option<Box<dyn Send + Sync>>,
}

impl Streamed {
    /// Keeps `guard` until the body is sent or dropped.
    pub fn hold(&mut self, guard: impl Send + Sync + 'static) {
        self.busy = Some(Box::new(guard));
    }
}

impl hyper::body::Body for Streamed {
    type Data = Bytes;
    type Error = Broken;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Broken>>> {
        self.call.poll_frame(cx).map(|frame| {
            frame.map(|frame| {
                frame.map(|frame| match frame {
                    nine9s_host::Frame::Data(data) => Frame::data(data),
                    nine9s_host::Frame::Trailers(trailers) => Frame::trailers(trailers),
                })
            })
        })
    }

    fn size_hint(&self) -> SizeHint {
        match self.len {
            Some(len) => SizeHint::with_exact(len),
            None => SizeHint::default(),
        }
    }
}

impl Drop for Streamed {
    fn drop(&mut self) {
        if !self.call.is_complete() {
            self.call.cancel("the client went away");
        }
    }
}
