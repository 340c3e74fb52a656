//! The control service's gate: every call is authenticated from its
//! request headers (and its connection) before a byte of its messages is
//! read, against one table of the role each method needs; the identity
//! goes to the handler in the request's extensions. The messages of an
//! admitted call are then metered as they arrive: each is refused beyond
//! its method's size limit, and all the calls together hold at most
//! [`BUFFER_BUDGET`] of partly received messages — so neither a stranger
//! nor a caller with a token can make the agent hold memory without bound.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use hyper::body::{Body, Frame, SizeHint};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::codegen::http;
use tonic::server::NamedService;
use tonic::Status;

use crate::access::{Access, Credentials, Identity, LocalCaller, Role};
use crate::error::{Error, Reason};
use crate::incoming::Slots;

/// Bytes of partly received messages all calls may hold at once.
pub const BUFFER_BUDGET: usize = 64 * 1024 * 1024;
/// Largest `Stage` message: a header (its manifest is at most 64 KiB) or a
/// chunk of the library (ctl sends 1 MiB).
pub const MAX_STAGE_MESSAGE: usize = 4 * 1024 * 1024;
/// Largest message of every other call: they carry a few short fields.
pub const MAX_MESSAGE: usize = 64 * 1024;

const PREFIX: &str = "/nine9s.control.v1.Control/";

/// The one table of what each method needs: its role, and how large one
/// of its messages may be. A method not listed needs a known caller
/// (tonic answers it UNIMPLEMENTED).
fn method(path: &str) -> (Role, usize) {
    match path.strip_prefix(PREFIX).unwrap_or("") {
        "Stage" => (Role::Deploy, MAX_STAGE_MESSAGE),
        "Upgrade" | "Downgrade" | "Rollback" | "MakePermanent" | "Lease" => {
            (Role::Deploy, MAX_MESSAGE)
        }
        "Remove" | "RestartAgent" => (Role::Admin, MAX_MESSAGE),
        "Status" | "ListReleases" | "History" | "Watch" | "AgentInfo" | "Rollouts" => {
            (Role::Read, MAX_MESSAGE)
        }
        _ => (Role::Read, MAX_MESSAGE),
    }
}

/// The control service behind its gate.
#[derive(Clone)]
pub struct Gate<S> {
    inner: S,
    access: Arc<Access>,
    /// The connection of an authenticated call keeps its slot.
    slots: Arc<Slots>,
    budget: Arc<Semaphore>,
}

impl<S> Gate<S> {
    pub fn new(inner: S, access: Arc<Access>, slots: Arc<Slots>) -> Gate<S> {
        Gate {
            inner,
            access,
            slots,
            budget: Arc::new(Semaphore::new(BUFFER_BUDGET)),
        }
    }
}

impl<S: NamedService> NamedService for Gate<S> {
    const NAME: &'static str = S::NAME;
}

/// Who is calling, from the request's headers and connection.
fn caller(
    access: &Access,
    request: &http::Request<impl Sized>,
    needed: Role,
) -> Result<Identity, Error> {
    let credentials = Credentials {
        authorization: request
            .headers()
            .get(http::header::AUTHORIZATION)
            .map(|v| v.as_bytes()),
        certificate: crate::tls::client_name(request.extensions()),
        // Only the local control socket's connections are Unix streams.
        local: request
            .extensions()
            .get::<tonic::transport::server::UdsConnectInfo>()
            .map(|info| LocalCaller {
                uid: info.peer_cred.map(|cred| cred.uid()),
            }),
    };
    access.check(&credentials, needed)
}

impl<S, B> tonic::codegen::Service<http::Request<B>> for Gate<S>
where
    S: tonic::codegen::Service<
        http::Request<tonic::body::Body>,
        Response = http::Response<tonic::body::Body>,
        Error = Infallible,
    >,
    S::Future: Send + 'static,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<tonic::codegen::StdError>,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = tonic::codegen::BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let (needed, limit) = method(request.uri().path());
        let identity = match caller(&self.access, &request, needed) {
            Ok(identity) => identity,
            Err(e) => {
                let refused = crate::control::status(e).into_http();
                return Box::pin(async move { Ok(refused) });
            }
        };
        self.slots
            .prove(crate::incoming::peer(request.extensions()));
        request.extensions_mut().insert(identity);
        let call = request
            .uri()
            .path()
            .strip_prefix(PREFIX)
            .unwrap_or("this")
            .to_owned();
        let budget = Arc::clone(&self.budget);
        let request = request.map(|body| {
            tonic::body::Body::new(Metered {
                inner: Box::pin(body),
                call,
                limit,
                budget,
                head: Vec::with_capacity(5),
                left: 0,
                held: None,
            })
        });
        Box::pin(self.inner.call(request))
    }
}

/// The identity the gate admitted a call as.
pub fn identity<T>(request: &tonic::Request<T>) -> Result<Identity, Status> {
    request
        .extensions()
        .get::<Identity>()
        .cloned()
        .ok_or_else(|| {
            crate::control::status(Error::refused(
                Reason::Unauthenticated,
                "the call was not authenticated",
            ))
        })
}

/// A call's request body, read through gRPC's message framing (a flag
/// byte and a 4-byte length before each message): a message over the
/// call's limit is refused at its length, and each holds its length of
/// the shared budget until its last byte has passed.
struct Metered<B> {
    inner: Pin<Box<B>>,
    call: String,
    limit: usize,
    budget: Arc<Semaphore>,
    /// The current message's prefix, while it comes.
    head: Vec<u8>,
    /// Bytes of the current message still to come.
    left: usize,
    held: Option<OwnedSemaphorePermit>,
}

impl<B> Metered<B> {
    /// Follows the framing over `data`.
    fn meter(&mut self, mut data: &[u8]) -> Result<(), Status> {
        while !data.is_empty() {
            if self.left > 0 {
                let n = self.left.min(data.len());
                self.left -= n;
                data = &data[n..];
                if self.left == 0 {
                    self.held = None;
                }
                continue;
            }
            let n = (5 - self.head.len()).min(data.len());
            self.head.extend_from_slice(&data[..n]);
            data = &data[n..];
            if self.head.len() < 5 {
                continue;
            }
            let len = u32::from_be_bytes([self.head[1], self.head[2], self.head[3], self.head[4]])
                as usize;
            self.head.clear();
            if len > self.limit {
                return Err(crate::control::status(Error::refused(
                    Reason::TooLarge,
                    format!(
                        "a {} message of {len} bytes is over this agent's limit of {} bytes for it{}",
                        self.call,
                        self.limit,
                        if self.limit == MAX_STAGE_MESSAGE {
                            ": send the library in chunks of 1 MiB after the header, as ctl does"
                        } else {
                            ": check what the client puts in it"
                        }
                    ),
                )));
            }
            let permits = u32::try_from(len).unwrap_or(u32::MAX);
            self.held = match Arc::clone(&self.budget).try_acquire_many_owned(permits) {
                Ok(held) => Some(held),
                Err(_) => {
                    tracing::warn!(call = %self.call, bytes = len, "the budget of partly received messages is used up: call refused");
                    return Err(crate::control::status(Error::refused(
                        Reason::Busy,
                        format!(
                            "the agent holds {} MiB of partly received messages already, as much as it takes at once; try again shortly",
                            BUFFER_BUDGET / (1024 * 1024)
                        ),
                    )));
                }
            };
            self.left = len;
            if len == 0 {
                self.held = None;
            }
        }
        Ok(())
    }
}

impl<B> Body for Metered<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<tonic::codegen::StdError>,
{
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let frame = match self.inner.as_mut().poll_frame(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Ready(Some(Err(e))) => {
                return Poll::Ready(Some(Err(Status::from_error(e.into()))))
            }
            Poll::Ready(Some(Ok(frame))) => frame,
        };
        if let Some(data) = frame.data_ref() {
            if let Err(refused) = self.meter(data.chunk()) {
                return Poll::Ready(Some(Err(refused)));
            }
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
