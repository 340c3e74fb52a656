//! The request body of a call, read from the host as the handler polls it:
//! at most [`READ_CHUNK`] bytes a frame, none before they are asked for
//! (the client's window stays shut until the handler reads).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body::{Frame, SizeHint};

use super::call::CallCell;
use super::port::PortLink;
use crate::abi::{BODY_LEN_UNKNOWN, STATUS_END, STATUS_GONE, STATUS_OK, STATUS_PENDING};

/// The most one frame reads.
const READ_CHUNK: usize = 16 * 1024;

/// A request's body, streamed from the agent: an `http_body::Body` of
/// [`Bytes`] frames (axum: `axum::body::Body::new(body)`, or the
/// `Request<Body>` a router takes).
pub struct Body {
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
        Body {
            call,
            port,
            buffer: BytesMut::new(),
            len,
            read: 0,
            over: len == 0,
        }
    }
}

impl std::fmt::Debug for Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Body")
            .field("call", &self.call.id)
            .field("read", &self.read)
            .field("over", &self.over)
            .finish()
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
}

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BodyError::Gone => "the request is over: cancelled by the agent",
            BodyError::BrokenOff => "the client's request body broke off",
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
        let body = self.get_mut();
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
