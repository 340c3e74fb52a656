//! The nine9s agent: hosts one service's releases, serves HTTP through the
//! active one, and takes orders over gRPC to stage, upgrade, downgrade and
//! roll back releases in place.
//!
//! [`Agent::boot`] opens the data directory and starts the release a node
//! should run; [`Agent::run`] serves on listeners the caller bound, until
//! the shutdown future resolves. `main.rs` is a thin shell over these two.
//!
//! The data plane runs on the caller's tokio runtime; the control plane
//! (gRPC, transitions, soak watching, checkpoints) on a runtime of its own.
//! Plugin code runs synchronously on the data plane's threads, so a release
//! stuck in slow calls can hold them all — and that is exactly when an
//! operator needs `ctl rollback` to work and a switch's quiesce timeout to
//! fire.
#![forbid(unsafe_code)]

mod artifacts;
mod config;
mod control;
mod error;
mod failpoint;
mod http;
mod model;
mod release_handler;
mod runtime;
mod store;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;

pub use config::{Bootstrap, Config};
pub use error::Error;
pub use http::RELEASE_HEADER;
use release_handler::ReleaseHandler;

/// How often a soaking release is looked at.
const SOAK_TICK: Duration = Duration::from_millis(100);

/// Blocking threads of the control plane. Few and long-lived, so few
/// thread stacks and malloc arenas come and go over many switches.
const CONTROL_BLOCKING_THREADS: usize = 8;

/// A booted agent, not serving yet.
pub struct Agent {
    handler: Arc<ReleaseHandler>,
    /// Always `Some` until `run` or `drop` takes it.
    control: Option<tokio::runtime::Runtime>,
}

impl Drop for Agent {
    fn drop(&mut self) {
        // Dropping a runtime blocks, which is not allowed inside another.
        if let Some(control) = self.control.take() {
            control.shutdown_background();
        }
    }
}

impl Agent {
    /// Opens the data directory and loads the release to serve.
    pub async fn boot(config: Config) -> Result<Agent, Error> {
        let control = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .max_blocking_threads(CONTROL_BLOCKING_THREADS)
            .thread_keep_alive(Duration::from_secs(300))
            .thread_name("nine9s-control")
            .enable_all()
            .build()
            .map_err(Error::io("cannot start the control plane's runtime"))?;
        let handle = control.handle().clone();
        let booted = control
            .spawn_blocking(move || ReleaseHandler::boot(config, handle))
            .await
            .expect("boot does not panic");
        match booted {
            Ok(handler) => Ok(Agent {
                handler: Arc::new(handler),
                control: Some(control),
            }),
            Err(e) => {
                control.shutdown_background();
                Err(e)
            }
        }
    }

    /// The version being served.
    pub async fn active_version(&self) -> String {
        self.handler.runtime().active().await.version.to_string()
    }

    /// Serves HTTP and gRPC until `shutdown` resolves; then stops accepting,
    /// lets in-flight requests finish (within the grace period), and
    /// snapshots the active state into the store.
    pub async fn run(
        self,
        http: TcpListener,
        grpc: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), Error> {
        let mut agent = self;
        let control = agent.control.take().expect("present until run");
        let handler = Arc::clone(&agent.handler);
        drop(agent);
        let (stop, stopped) = watch::channel(false);
        let until_stopped = |mut rx: watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|stop| *stop).await;
        };
        let grace = handler.config().shutdown_grace;
        let http = tokio::spawn(http::serve(
            http,
            Arc::clone(handler.runtime()),
            until_stopped(stopped.clone()),
            grace,
        ));
        // The listener moves to the control runtime's own I/O driver: the
        // data plane's driver stalls while plugin calls hold its threads.
        let grpc = grpc
            .into_std()
            .map_err(Error::io("cannot move the gRPC listener"))?;
        let service = control::service(Arc::clone(&handler));
        let grpc_stopped = until_stopped(stopped.clone());
        let grpc = control.spawn(async move {
            let listener = TcpListener::from_std(grpc)?;
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(
                    // Without TCP_NODELAY a reply's trailers wait ~40 ms for the
                    // client's delayed ACK.
                    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
                    grpc_stopped,
                )
                .await
                .map_err(std::io::Error::other)
        });
        let background = control.spawn(background(Arc::clone(&handler), until_stopped(stopped)));

        shutdown.await;
        tracing::info!("shutting down");
        let _ = stop.send(true);
        let _ = http.await;
        match grpc.await {
            Ok(Err(e)) => tracing::warn!(error = %e, "gRPC server ended with an error"),
            Err(e) => tracing::warn!(error = %e, "gRPC server task failed"),
            Ok(Ok(())) => {}
        }
        let _ = background.await;
        let saved = control
            .spawn_blocking(move || handler.checkpoint())
            .await
            .expect("checkpoint does not panic");
        control.shutdown_background();
        tracing::info!(version = %saved?, "state snapshot saved; stopped");
        Ok(())
    }
}

/// Watches soaks and checkpoints the active state until stopped.
async fn background(handler: Arc<ReleaseHandler>, stopped: impl Future<Output = ()>) {
    tokio::pin!(stopped);
    let mut soak = tokio::time::interval(SOAK_TICK);
    let mut checkpoint = tokio::time::interval(handler.config().checkpoint_every);
    checkpoint.tick().await;
    loop {
        let job: fn(&ReleaseHandler) -> Result<(), Error> = tokio::select! {
            () = &mut stopped => return,
            _ = soak.tick() => {
                // Most of the time nothing soaks: don't wake a blocking thread for it.
                if !handler.soaking() {
                    continue;
                }
                ReleaseHandler::watch_soak
            }
            _ = checkpoint.tick() => |h| h.checkpoint().map(drop),
        };
        let handler = Arc::clone(&handler);
        match tokio::task::spawn_blocking(move || job(&handler)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "background job failed"),
            Err(e) => tracing::error!(error = %e, "background job crashed"),
        }
    }
}
