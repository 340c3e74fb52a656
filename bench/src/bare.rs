//! The baselines: plain hyper 1 HTTP/1 servers served the way the agent
//! serves (tokio multi-thread runtime, one task per connection,
//! `TCP_NODELAY`), so the difference to the agent is the plugin call path.
//! [`Baseline::Hello`] answers every request with 200 `Hello world!`, as
//! the sync sample releases do. [`Baseline::MyService`] and
//! [`Baseline::Bytes`] serve the routers of the README's async release
//! myservice 0.1.0 and of the bench fixture `bytes`, built from their own
//! `src/lib.rs` — compiled here against the stand-in SDK
//! (`nine9s-bare-sdk`, named `nine9s_sdk` in the bench's manifest) — the
//! same handlers, without the C ABI, the release's own runtime and the
//! agent's port. Runs in the bench's own binary under `--bare-server
//! [myservice|bytes]`: prints its port on stdout, serves until its stdin
//! closes.

#[path = "../../plugins/myservice-0.1.0/src/lib.rs"]
mod myservice;

#[path = "../../tests/plugins/bytes/src/lib.rs"]
mod bytes_fixture;

use std::convert::Infallible;
use std::error::Error as StdError;
use std::io::Write;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use nine9s_sdk::service::AsyncPlugin;
use tokio::net::TcpListener;
use tower_service::Service as _;

/// Which baseline a `--bare-server` child serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Baseline {
    Hello,
    MyService,
    Bytes,
}

impl Baseline {
    /// The argument after `--bare-server` that names it; none for `Hello`.
    pub fn arg(self) -> Option<&'static str> {
        match self {
            Baseline::Hello => None,
            Baseline::MyService => Some("myservice"),
            Baseline::Bytes => Some("bytes"),
        }
    }

    pub fn parse(arg: &str) -> Option<Baseline> {
        [Baseline::MyService, Baseline::Bytes]
            .into_iter()
            .find(|b| b.arg() == Some(arg))
    }
}

pub async fn serve(baseline: Baseline) -> anyhow::Result<()> {
    match baseline {
        Baseline::Hello => serve_with(service_fn(hello)).await,
        Baseline::MyService => serve_router(router::<myservice::App>()?).await,
        Baseline::Bytes => serve_router(router::<bytes_fixture::App>()?).await,
    }
}

/// A release's router as the SDK builds it for a fresh instance: the
/// state restored from nothing, then the service over it.
fn router<P: AsyncPlugin>() -> anyhow::Result<axum::Router> {
    let state = P::restore(None).map_err(anyhow::Error::msg)?;
    Ok(P::service(Arc::new(state)).0)
}

/// Each request gets a clone of the router, as the SDK gives each call.
async fn serve_router(router: axum::Router) -> anyhow::Result<()> {
    serve_with(service_fn(move |request: Request<Incoming>| {
        let mut router = router.clone();
        async move { router.call(request).await }
    }))
    .await
}

async fn serve_with<S, B>(service: S) -> anyhow::Result<()>
where
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn StdError + Send + Sync>>,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn StdError + Send + Sync>>,
{
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let mut stdout = std::io::stdout();
    writeln!(stdout, "{}", listener.local_addr()?.port())?;
    stdout.flush()?;
    // The parent holds our stdin: when it goes away, even killed, so do we.
    // A plain thread because the workspace's tokio has no `io-std`.
    let (gone, mut parent_gone) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
        drop(gone);
    });
    loop {
        tokio::select! {
            _ = &mut parent_gone => return Ok(()),
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else {
                    // Out of file descriptors and the like: back off as the agent does.
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    continue;
                };
                let _ = stream.set_nodelay(true);
                tokio::spawn(
                    http1::Builder::new().serve_connection(TokioIo::new(stream), service.clone()),
                );
            }
        }
    }
}

async fn hello(_: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let mut response = Response::new(Full::new(Bytes::from_static(b"Hello world!")));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    Ok(response)
}
