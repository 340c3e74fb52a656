//! A release that serves as an async service (ABI version 3, feature
//! `tower`): any tower service over `http` — an axum `Router`, a tonic
//! server, a hand-written one — on a tokio runtime the release owns.
//!
//! ```ignore
//! use nine9s_sdk::service::{AsyncPlugin, HttpService};
//!
//! pub struct App;
//! impl AsyncPlugin for App {
//!     type State = Counter;
//!     fn restore(state: Option<&[u8]>) -> Result<Counter, String> { ... }
//!     fn service(state: Arc<Counter>) -> HttpService {
//!         HttpService::new(Router::new().route("/", get(hello)).with_state(state))
//!     }
//! }
//! nine9s_sdk::export_service!(App, name = "myservice");
//! ```
//!
//! How it runs (every instance call comes on the instance's home thread,
//! a host thread of its own): `create` builds the runtime —
//! [`AsyncPlugin::worker_threads`] threads named after the release — and,
//! inside it, the state ([`AsyncPlugin::restore`]) and the service.
//! `attach` starts one dispatcher thread that takes the host's events:
//! each new call becomes a task on the runtime that builds the
//! `http::Request` (its body a [`Body`] read from the host as the handler
//! polls it), calls the service and streams the response back, with
//! backpressure both ways; a call the host cancels has its handler
//! dropped. With [`AsyncPlugin::ENABLE_IO`], the host also hands the
//! release plain HTTP/1.1 connections: each is a task serving it with
//! hyper, its requests going straight to the service, until a yield gives
//! it back (`connection.rs`). `stop` ends the dispatcher, cancels the calls left, drops the
//! service and the state and then the runtime, which joins every thread of
//! it: none is left when the library is unloaded.
//!
//! Rules for the release's code: no `thread_local!` with a destructor
//! outside the runtime's threads; a thread or task of its own must end
//! when the state is dropped (a blocking task that never ends holds `stop`
//! and keeps the library loaded); and no tokio `signal` or `process`
//! feature, whose process-wide handlers would outlive the library.

mod body;
mod call;
mod connection;
pub(crate) mod instance;
mod port;
#[cfg(test)]
mod tests;

use std::error::Error as StdError;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;

use crate::Migration;

pub use body::{Body, BodyError};

/// The error of a service: anything boxed.
pub type BoxError = Box<dyn StdError + Send + Sync>;

/// The address of the client, `ip:port`, in every request's extensions
/// (`axum::Extension<Peer>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer(pub SocketAddr);

/// An async release's code: the state it carries across upgrades and the
/// service that answers its requests. The implementing type is a marker
/// (`pub struct App;`); everything lives in [`AsyncPlugin::State`].
pub trait AsyncPlugin: 'static {
    /// The version of the state this code snapshots and restores. `0` means
    /// the release keeps no state: nothing is carried into or out of it.
    const STATE_VERSION: u32 = 0;

    /// Whether the runtime gets tokio's I/O driver: the release then
    /// serves the plain HTTP/1.1 connections the agent hands it itself
    /// (no thread woken between the socket and the handler: as cheap as a
    /// bare server), and may open sockets of its own (a database client).
    /// Off, the runtime has timers only and every request comes through
    /// the agent. A tokio with the `signal` or `process` feature adds a
    /// process-wide pipe to the driver that this library's copy of tokio
    /// never closes: two descriptors per load.
    const ENABLE_IO: bool = false;

    /// What the service shares between its requests (a counter, a pool).
    type State: Send + Sync + 'static;

    /// Builds the state, from a snapshot of [`Self::STATE_VERSION`] when
    /// the agent hands state over, or fresh when `state` is `None`. Runs
    /// inside the runtime (it may spawn).
    fn restore(state: Option<&[u8]>) -> Result<Self::State, String>;

    /// The service that answers every request, built once per instance
    /// inside the runtime: `HttpService::new(router.with_state(state))`.
    fn service(state: Arc<Self::State>) -> HttpService;

    /// The state to hand to the next release (or to persist), encoded as
    /// [`Self::STATE_VERSION`]. Requests may still run while it is taken.
    fn snapshot(_state: &Self::State) -> Vec<u8> {
        Vec::new()
    }

    /// The state migrations this code knows, as for [`crate::Plugin`].
    fn migrations() -> &'static [Migration] {
        &[]
    }

    /// Called by the agent during a soak; an error rolls the release back.
    fn health(_state: &Self::State) -> Result<(), String> {
        Ok(())
    }

    /// A named step of an upgrade plan (`hook = "name"` in release.toml).
    fn hook(_state: &Self::State, name: &str) -> Result<(), String> {
        Err(format!("this release has no hook named {name:?}"))
    }

    /// How many threads the runtime runs tasks on.
    fn worker_threads() -> usize {
        2
    }
}

/// The future a call of the service becomes: the whole exchange, response
/// body included, on the call's task.
type Exchange = Pin<Box<dyn Future<Output = Result<(), call::Failure>> + Send>>;

/// A response's body, its types erased (on a connection the release serves).
type ResponseBody = Pin<Box<dyn http_body::Body<Data = Bytes, Error = BoxError> + Send>>;

/// The service's answer to one request on a connection the release serves.
type Responding =
    Pin<Box<dyn Future<Output = Result<http::Response<ResponseBody>, BoxError>> + Send>>;

/// A tower service of `http` requests whose body is a [`Body`], with its
/// types erased: what [`AsyncPlugin::service`] returns.
pub struct HttpService(Box<dyn ErasedService>);

impl HttpService {
    /// Wraps any cloneable tower service of `http::Request<Body>`: an axum
    /// `Router` with its state applied, a tonic server, a `service_fn`.
    /// Each request gets a clone, readied then called.
    pub fn new<S, B>(service: S) -> HttpService
    where
        S: tower_service::Service<http::Request<Body>, Response = http::Response<B>>
            + Clone
            + Send
            + 'static,
        S::Future: Send,
        S::Error: Into<BoxError>,
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        HttpService(Box::new(Typed(service)))
    }

    /// The exchange of one call: its request read from the port, the
    /// service's answer written to it.
    fn exchange(self, call: call::Call) -> Exchange {
        self.0.exchange(call)
    }

    /// Its answer to a request read on a connection the release serves.
    fn respond(self, request: http::Request<Body>) -> Responding {
        self.0.respond(request)
    }
}

impl Clone for HttpService {
    fn clone(&self) -> HttpService {
        HttpService(self.0.clone_box())
    }
}

impl std::fmt::Debug for HttpService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HttpService")
    }
}

/// What `HttpService` needs of its service, whatever its types.
trait ErasedService: Send {
    fn clone_box(&self) -> Box<dyn ErasedService>;
    fn exchange(self: Box<Self>, call: call::Call) -> Exchange;
    fn respond(self: Box<Self>, request: http::Request<Body>) -> Responding;
}

struct Typed<S>(S);

impl<S, B> ErasedService for Typed<S>
where
    S: tower_service::Service<http::Request<Body>, Response = http::Response<B>>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    fn clone_box(&self) -> Box<dyn ErasedService> {
        Box::new(Typed(self.0.clone()))
    }

    fn exchange(self: Box<Self>, call: call::Call) -> Exchange {
        Box::pin(call::exchange(self.0, call))
    }

    fn respond(self: Box<Self>, request: http::Request<Body>) -> Responding {
        let mut service = self.0;
        Box::pin(async move {
            let boxed = |e: S::Error| -> BoxError { e.into() };
            std::future::poll_fn(|cx| service.poll_ready(cx))
                .await
                .map_err(boxed)?;
            let response = service.call(request).await.map_err(boxed)?;
            Ok(response.map(|body| Box::pin(ErrorsBoxed(body)) as ResponseBody))
        })
    }
}

/// A body whose errors are boxed.
struct ErrorsBoxed<B>(B);

impl<B> ErrorsBoxed<B> {
    fn body(self: Pin<&mut Self>) -> Pin<&mut B> {
        // SAFETY: a structural projection: the body is never moved out of
        // its pinned `ErrorsBoxed`, which has no `Drop` and is `Unpin`
        // only if `B` is.
        unsafe { self.map_unchecked_mut(|boxed| &mut boxed.0) }
    }
}

impl<B> http_body::Body for ErrorsBoxed<B>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        self.body()
            .poll_frame(cx)
            .map_err(|e| -> BoxError { e.into() })
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.0.size_hint()
    }
}

/// Exports an [`AsyncPlugin`] implementation as a nine9s release library
/// of ABI version 3 (feature `tower`).
///
/// ```ignore
/// nine9s_sdk::export_service!(App, name = "myservice");
/// ```
/// The release's version is the crate's `CARGO_PKG_VERSION`. A release
/// built with `panic = "abort"` does not compile: its first panic would
/// take the whole agent down instead of one request.
#[macro_export]
macro_rules! export_service {
    ($service:ty, name = $name:expr) => {
        #[cfg(panic = "abort")]
        compile_error!(
            "nine9s plugins must unwind on panic: remove `panic = \"abort\"` from this \
             crate's profile (a panic would abort the agent and every release in it)"
        );

        #[no_mangle]
        pub static NINE9S_ABI_VERSION: u32 = $crate::abi::ABI_VERSION_SERVICE;

        #[no_mangle]
        pub extern "C" fn nine9s_plugin_api() -> *const $crate::abi::ServiceApi {
            enum Exported {}
            impl $crate::__private::Release for Exported {
                type Plugin = $service;
                const NAME: &'static str = $name;
                const VERSION: &'static str = env!("CARGO_PKG_VERSION");
            }
            static API: $crate::abi::ServiceApi = $crate::__private::service_api::<Exported>();
            &API
        }
    };
}
