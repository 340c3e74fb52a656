//! The request body a handler reads: a call's, read from the host as the
//! handler polls it (at most [`READ_CHUNK`] bytes a frame, none before
//! they are asked for: the client's window stays shut until the handler
//! reads), or, on a connection the release serves itself, hyper's, held
//! to the limits the host gave with the connection.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body::{Body as _, Frame, SizeHint};

use super::call::CallCell;
use super::port::PortLink;
use crate::abi::{BODY_LEN_UNKNOWN, STATUS_END, STATUS_GONE, STATUS_OK, STATUS_PENDING};

/// The most one frame reads.
const READ_CHUNK: usize = 16 * 1024;

/// A request's body, streamed from the client: an `http_body::Body` of
/// [`Bytes`] frames (axum: `axum::body::Body::new(body)`, or the
/// `Request<Body>` a router takes).
pub struct Body(Inner);

enum Inner {
    Port(PortBody),
    Connection(ConnectionBody),
}

/// A call's body, read through the port.
struct PortBody {
    call: Arc<CallCell>,
    port: Arc<PortLink>,
    /// Frames are split off its front; its capacity is reused once they
    /// are dropped.
    buffer: BytesMut,
    /// The length the client announced, or [`BODY_LEN_UNKNOWN`].
    len: u64,
    read: u64,
    over: bool,
}

impl Body {
    /// The body of `call`, `len` bytes long (0: none) or
    /// [`BODY_LEN_UNKNOWN`].
    pub(crate) fn new(call: Arc<CallCell>, port: Arc<PortLink>, len: u64) -> Body {
        Body(Inner::Port(PortBody {
            call,
            port,
            buffer: BytesMut::new(),
            len,
            read: 0,
            over: len == 0,
        }))
    }

    /// The body of a request on a connection the release serves, at most
    /// `max` bytes, each piece within `timeout` of the one before.
    pub(crate) fn incoming(body: hyper::body::Incoming, max: u64, timeout: Duration) -> Body {
        Body(Inner::Connection(ConnectionBody {
            body,
            max,
            timeout,
            read: 0,
            deadline: None,
        }))
    }
}

impl std::fmt::Debug for Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Inner::Port(body) => f
                .debug_struct("Body")
                .field("call", &body.call.id)
                .field("read", &body.read)
                .field("over", &body.over)
                .finish(),
            Inner::Connection(body) => f.debug_struct("Body").field("read", &body.read).finish(),
        }
    }
}

/// A body hyper reads from a connection the release serves.
struct ConnectionBody {
    body: hyper::body::Incoming,
    max: u64,
    timeout: Duration,
    read: u64,
    /// For the next piece, once asked for.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl ConnectionBody {
    fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let timeout = self.timeout;
        let deadline = self
            .deadline
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        let frame = match Pin::new(&mut self.body).poll_frame(cx) {
            Poll::Pending => {
                return match deadline.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(BodyError::TooSlow))),
                    Poll::Pending => Poll::Pending,
                };
            }
            Poll::Ready(frame) => frame,
        };
        self.deadline = None;
        match frame {
            None => Poll::Ready(None),
            Some(Err(_)) => Poll::Ready(Some(Err(BodyError::BrokenOff))),
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    self.read += data.len() as u64;
                    if self.read > self.max {
                        return Poll::Ready(Some(Err(BodyError::TooLarge)));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }
}

/// Why a request body could not be read to its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyError {
    /// The call is over for the agent: the client went away, its time ran
    /// out, or the release is being stopped.
    Gone,
    /// The client's body broke off before its end.
    BrokenOff,
    /// The body is longer than the agent's `--max-body`.
    TooLarge,
    /// The client sent nothing of it for `--http-body-timeout`.
    TooSlow,
}

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BodyError::Gone => "the request is over: cancelled by the agent",
            BodyError::BrokenOff => "the client's request body broke off",
            BodyError::TooLarge => "the request body is over the agent's --max-body",
            BodyError::TooSlow => {
                "the client sent nothing of its request body for --http-body-timeout"
            }
        })
    }
}

impl std::error::Error for BodyError {}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match &mut self.get_mut().0 {
            Inner::Port(body) => body.poll_frame(cx),
            Inner::Connection(body) => body.poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.0 {
            Inner::Port(body) => body.is_end_stream(),
            Inner::Connection(body) => body.body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.0 {
            Inner::Port(body) => body.size_hint(),
            Inner::Connection(body) => body.body.size_hint(),
        }
    }
}

impl PortBody {
    fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let body = self;
        if body.over {
            return Poll::Ready(None);
        }
        // Before the read: a READABLE raised after the host answers
        // PENDING finds this waker.
        body.call.reader.register(cx.waker());
        body.buffer.reserve(READ_CHUNK);
        let spare = body.buffer.spare_capacity_mut();
        let cap = spare.len().min(READ_CHUNK);
        let (status, read) = body.port.read_body(body.call.id, &mut spare[..cap]);
        match status {
            STATUS_OK => {
                let filled = body.buffer.len() + read;
                // SAFETY: the host initialised `read` bytes (at most `cap`)
                // of the spare capacity right after the buffer's length.
                unsafe { body.buffer.set_len(filled) };
                body.read += read as u64;
                Poll::Ready(Some(Ok(Frame::data(body.buffer.split().freeze()))))
            }
            STATUS_PENDING => Poll::Pending,
            STATUS_END => {
                body.over = true;
                Poll::Ready(None)
            }
            STATUS_GONE => {
                body.over = true;
                Poll::Ready(Some(Err(BodyError::Gone)))
            }
            _ => {
                body.over = true;
                Poll::Ready(Some(Err(BodyError::BrokenOff)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.over
    }

    fn size_hint(&self) -> SizeHint {
        if self.over {
            SizeHint::with_exact(0)
        } else if self.len == BODY_LEN_UNKNOWN {
            SizeHint::default()
        } else {
            SizeHint::with_exact(self.len.saturating_sub(self.read))
        }
    }
}
