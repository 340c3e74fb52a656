//! The nine9s agent: hosts one service's releases, serves HTTP through the
//! active one, and takes orders over gRPC to stage, upgrade, downgrade and
//! roll back releases in place.
//!
//! [`Agent::boot`] opens the data directory and starts the release a node
//! should run; [`Agent::run`] serves on listeners the caller bound, until
//! the shutdown future resolves (or the supervisor asks for the state to
//! be handed over to a new worker). [`Agent::take_over`] is a
//! self-upgrade's new worker: ready before it touches the store, serving
//! with the state handed over before the old worker has let go of it.
//! `main.rs` is a thin shell over these.
//!
//! The data plane runs on the caller's tokio runtime; the control plane
//! (gRPC, soak watching, the metrics listener) on a runtime of its own, and
//! transitions on the engine's own thread.
//! Plugin code runs synchronously on the data plane's threads, so a release
//! stuck in slow calls can hold them — and that is exactly when an
//! operator needs `ctl rollback` to work, a switch's quiesce timeout to
//! fire, and the request time limit's watchdog (`stuck.rs`) to answer the
//! clients of calls that do not come back.
#![forbid(unsafe_code)]

mod access;
mod artifacts;
pub mod birth;
pub mod channel;
mod config;
mod control;
pub mod datadir;
mod error;
mod failpoint;
mod gate;
mod handover;
mod http;
mod http_tls;
mod incoming;
mod lease;
pub mod local;
mod metrics;
mod model;
pub mod probe;
pub mod process;
mod reason;
mod release_handler;
mod runtime;
mod store;
mod streaming;
mod stuck;
pub mod supervisor;
mod tls;
pub mod worker_user;

use std::future::Future;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};

pub use access::admin_token_path;
pub use config::{defaults, Bootstrap, Config, HttpTlsFiles, Limits, TlsFiles};
pub use error::Error;
pub use http::RELEASE_HEADER;
pub use http_tls::check as check_http_tls;
use nine9s_manifest::signature::TrustedKeys;
use release_handler::Engine;

/// Blocking threads of the control plane. Few and long-lived, so few
/// thread stacks and malloc arenas come and go over many switches.
const CONTROL_BLOCKING_THREADS: usize = 8;

/// Concurrent calls (`Watch` streams included) on one gRPC connection.
const GRPC_STREAMS_PER_CONNECTION: u32 = 128;

/// HTTP/2 flow-control windows of the control plane: what a client may
/// send ahead of what the agent has read, per call and per connection (a
/// call's messages are only read once it is authenticated).
const GRPC_STREAM_WINDOW: u32 = 256 * 1024;
const GRPC_CONNECTION_WINDOW: u32 = 1024 * 1024;

/// Connections to the plaintext health listener, and calls (`Watch`
/// streams included) on each: enough for a kubelet and a load balancer,
/// and nothing a stranger could use to hold the agent's memory.
const HEALTH_CONNECTIONS: usize = 16;
const HEALTH_STREAMS_PER_CONNECTION: u32 = 8;
const HEALTH_WINDOW: u32 = 64 * 1024;

/// What SIGTERM may take beyond `--shutdown-grace`: the final checkpoint
/// and closing the store.
const STOP_MARGIN: Duration = Duration::from_secs(1);

/// A booted agent, not serving yet.
pub struct Agent {
    engine: Engine,
    access: Arc<access::Access>,
    tls: Option<tonic::transport::ServerTlsConfig>,
    http_tls: Option<Arc<http_tls::HttpTls>>,
    keys: Option<Arc<TrustedKeys>>,
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

/// What a worker loads before the store: the tokens, both planes' TLS,
/// trusted keys and the control plane's runtime. A self-upgrade's new worker has it all
/// before the serving one stops.
struct Prepared {
    config: Config,
    access: Arc<access::Access>,
    tls: Option<tonic::transport::ServerTlsConfig>,
    http_tls: Option<Arc<http_tls::HttpTls>>,
    keys: Option<Arc<TrustedKeys>>,
    control: tokio::runtime::Runtime,
}

impl Prepared {
    fn new(config: Config) -> Result<Prepared, Error> {
        process::hash_binary_in_background();
        datadir::prepare(&config.data_dir, config.worker_user.as_ref())?;
        datadir::check(&config)?;
        // Under --worker-user the supervisor read the files for this worker.
        let access = Arc::new(match &config.handed {
            Some(handed) => access::Access::from_handed(&handed.tokens, &handed.source)?,
            None => access::load(config.tokens.as_deref(), &config.data_dir)?,
        });
        tracing::info!(tokens = access.source(), "control plane access");
        let tls = match (&config.tls, config.handed.as_ref().map(|h| &h.tls)) {
            (None, _) => None,
            (Some(files), None) => Some(files.server_config()?),
            (Some(_), Some(Some(pem))) => Some(tls::server_config(
                pem.cert.as_bytes(),
                pem.key.as_bytes(),
                pem.client_ca.as_ref().map(String::as_bytes),
            )?),
            (Some(_), Some(None)) => {
                return Err(Error::refused(
                    error::Reason::InvalidArgument,
                    "the supervisor handed this worker no TLS files for --tls-cert",
                ))
            }
        };
        // A certificate that does not load stops this worker before it
        // serves: a self-upgrade's old worker keeps serving.
        let http_tls = match &config.http_tls {
            Some(files) => Some(Arc::new(
                http_tls::HttpTls::load(files.cert.clone(), files.key.clone()).map_err(|e| {
                    Error::refused(
                        error::Reason::InvalidArgument,
                        format!("--http-tls-cert, --http-tls-key: {}", error::chain(&e)),
                    )
                })?,
            )),
            None => None,
        };
        let keys = match &config.trusted_keys {
            Some(dir) => Some(Arc::new(TrustedKeys::read_dir(dir).map_err(|e| {
                Error::refused(
                    error::Reason::InvalidArgument,
                    format!("--trusted-keys: {e}"),
                )
            })?)),
            None => None,
        };
        let control = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .max_blocking_threads(CONTROL_BLOCKING_THREADS)
            .thread_keep_alive(Duration::from_secs(300))
            .thread_name("nine9s-control")
            .enable_all()
            .build()
            .map_err(Error::io("cannot start the control plane's runtime"))?;
        Ok(Prepared {
            config,
            access,
            tls,
            http_tls,
            keys,
            control,
        })
    }

    /// Opens the store (waiting for it as the config says) and starts the
    /// engine on the release to serve, or on `preloaded`.
    async fn boot(self, preloaded: Option<handover::Preloaded>) -> Result<Agent, Error> {
        let Prepared {
            config,
            access,
            tls,
            http_tls,
            keys,
            control,
        } = self;
        let handle = control.handle().clone();
        let booted = control
            .spawn_blocking(move || Engine::start(config, handle, preloaded))
            .await
            .expect("boot does not panic");
        match booted {
            Ok(engine) => Ok(Agent {
                engine,
                access,
                tls,
                http_tls,
                keys,
                control: Some(control),
            }),
            Err(e) => {
                control.shutdown_background();
                Err(e)
            }
        }
    }
}

impl Agent {
    /// Opens the data directory and loads the release to serve.
    pub async fn boot(config: Config) -> Result<Agent, Error> {
        Prepared::new(config)?.boot(None).await
    }

    /// A self-upgrade's new worker: loads everything it can before the
    /// store (as [`Agent::boot`] would, and the permanent release's
    /// library), tells the supervisor on `channel` that it is ready to
    /// take over, then waits for the serving worker's state on `state`.
    /// With it, it serves HTTP at once and opens the store once the old
    /// worker has let go of it; without, it boots from the store. Any
    /// failure before the state came leaves the serving worker untouched.
    pub async fn take_over(
        config: Config,
        http: TcpListener,
        state: OwnedFd,
        channel: Option<&OwnedFd>,
    ) -> Result<(Agent, Http), Error> {
        let prepared = Prepared::new(config)?;
        let standby = handover::Standby::prepare(&prepared.config)?;
        if let Some(channel) = channel {
            channel::send(channel, &channel::Message::Standby)
                .map_err(Error::io("cannot tell the supervisor this worker is ready"))?;
        }
        match standby.take_over(state).await? {
            Some(preloaded) => {
                let serving = DataPlane::start(
                    http,
                    Arc::clone(&preloaded.runtime),
                    &prepared.config,
                    prepared.http_tls.clone(),
                    prepared.control.handle(),
                );
                // No connection was accepted in between: at most this long
                // did one wait (beyond its request's own time).
                tracing::info!(
                    gap_us = handover::now_us() - preloaded.stopped_accepting_us,
                    "serving with the state handed over"
                );
                let agent = prepared.boot(Some(preloaded)).await?;
                Ok((agent, Http::Serving(serving)))
            }
            None => Ok((prepared.boot(None).await?, Http::Listener(http))),
        }
    }

    /// The version being served.
    pub fn active_version(&self) -> String {
        self.engine.runtime().active().version.to_string()
    }

    /// Serves HTTP and gRPC (and Prometheus metrics, and the plaintext
    /// health service, where given) until `shutdown` resolves; then stops
    /// accepting,
    /// lets in-flight requests finish (within the grace period), takes a
    /// last checkpoint (the previous one stands if requests are still in
    /// flight) and records the clean stop — all within the grace period
    /// plus a small margin, whatever the release is doing.
    ///
    /// With the supervisor's `channel`, it also hears of failed
    /// self-upgrades (recorded as events) and is asked to hand over: it
    /// then stops as on `shutdown`, but hands its state to the new worker
    /// as soon as its HTTP requests are done, before anything else.
    pub async fn run(
        self,
        listeners: Listeners,
        shutdown: impl Future<Output = ()>,
        channel: Option<OwnedFd>,
    ) -> Result<(), Error> {
        let Listeners {
            http,
            grpc,
            local,
            metrics,
            health: health_only,
        } = listeners;
        let mut agent = self;
        let control = agent.control.take().expect("present until run");
        let engine = agent.engine.clone();
        let access = Arc::clone(&agent.access);
        let tls = agent.tls.take();
        let http_tls = agent.http_tls.take();
        let keys = agent.keys.take();
        drop(agent);
        let address = grpc
            .local_addr()
            .map_err(Error::io("cannot read the gRPC listener's address"))?;
        if tls.is_none() && !address.ip().is_loopback() {
            return Err(Error::refused(
                error::Reason::InvalidArgument,
                plaintext_refusal(address),
            ));
        }
        let (stop, stopped) = watch::channel(false);
        let until_stopped = |mut rx: watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|stop| *stop).await;
        };
        let grace = engine.config().shutdown_grace;
        let http = match http {
            Http::Listener(listener) => DataPlane::start(
                listener,
                Arc::clone(engine.runtime()),
                engine.config(),
                http_tls,
                control.handle(),
            ),
            Http::Serving(serving) => serving,
        };
        let (handover, handing_over) = oneshot::channel();
        if let Some(channel) = channel {
            control.spawn(listen(channel, engine.clone(), handover));
        }
        // The listener moves to the control runtime's own I/O driver: the
        // data plane's driver stalls while plugin calls hold its threads.
        let grpc = grpc
            .into_std()
            .map_err(Error::io("cannot move the gRPC listener"))?;
        let max_control_connections = engine.config().limits.max_control_connections;
        let control_slots = incoming::Slots::new("control plane", max_control_connections, false);
        let service = control::service(
            engine.clone(),
            access,
            Arc::clone(&control_slots),
            keys,
            stopped.clone(),
        );
        // The standard services answer anyone: a Kubernetes gRPC probe
        // sends no token, and the API's description is no secret.
        let (health, health_service) = tonic_health::server::health_reporter();
        health.set_serving::<control::Server>().await;
        let reflection = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(nine9s_proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        };
        let unbuildable =
            |e| Error::io("cannot build the reflection service")(std::io::Error::other(e));
        let reflection_v1 = reflection().build_v1().map_err(unbuildable)?;
        let reflection_v1alpha = reflection().build_v1alpha().map_err(unbuildable)?;
        // The health service alone, in plaintext, for probes that cannot
        // speak TLS or send a token (Kubernetes' gRPC probes): it says
        // SERVING or NOT_SERVING and nothing else.
        let health_only = match health_only {
            Some(listener) => {
                let listener = listener
                    .into_std()
                    .map_err(Error::io("cannot move the health listener"))?;
                let health_service = health_service.clone();
                let stopped = until_stopped(stopped.clone());
                Some(control.spawn(async move {
                    let listener = TcpListener::from_std(listener)?;
                    // Anyone may ask: a connection that asked is proven.
                    let slots = incoming::Slots::new("health", HEALTH_CONNECTIONS, true);
                    tonic::transport::Server::builder()
                        .max_concurrent_streams(Some(HEALTH_STREAMS_PER_CONNECTION))
                        .initial_stream_window_size(Some(HEALTH_WINDOW))
                        .initial_connection_window_size(Some(HEALTH_WINDOW))
                        .http2_keepalive_interval(Some(Duration::from_secs(30)))
                        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
                        .add_service(incoming::Proving::new(health_service, Arc::clone(&slots)))
                        .serve_with_incoming_shutdown(incoming::stream(listener, slots), stopped)
                        .await
                        .map_err(std::io::Error::other)
                }))
            }
            None => None,
        };
        // The same services on the local control socket, in plaintext:
        // its callers are known by their uid, and only the agent's user
        // and root can reach it.
        let local = match local {
            Some(listener) => {
                let service = service.clone();
                let health_service = health_service.clone();
                let reflection_v1 = reflection().build_v1().map_err(unbuildable)?;
                let reflection_v1alpha = reflection().build_v1alpha().map_err(unbuildable)?;
                let stopped = until_stopped(stopped.clone());
                Some(control.spawn(async move {
                    let listener = tokio::net::UnixListener::from_std(listener)?;
                    tonic::transport::Server::builder()
                        .max_concurrent_streams(Some(GRPC_STREAMS_PER_CONNECTION))
                        .http2_keepalive_interval(Some(Duration::from_secs(30)))
                        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
                        .add_service(service)
                        .add_service(health_service)
                        .add_service(reflection_v1)
                        .add_service(reflection_v1alpha)
                        .serve_with_incoming_shutdown(
                            tokio_stream::wrappers::UnixListenerStream::new(listener),
                            stopped,
                        )
                        .await
                        .map_err(std::io::Error::other)
                }))
            }
            None => {
                tracing::warn!("no local control socket was passed in (a supervisor from before it): the control plane is on TCP only");
                None
            }
        };
        let grpc_stopped = until_stopped(stopped.clone());
        let grpc = control.spawn(async move {
            let listener = TcpListener::from_std(grpc)?;
            // Bounds on what one connection can hold, authenticated or not.
            let mut server = tonic::transport::Server::builder()
                .max_concurrent_streams(Some(GRPC_STREAMS_PER_CONNECTION))
                .initial_stream_window_size(Some(GRPC_STREAM_WINDOW))
                .initial_connection_window_size(Some(GRPC_CONNECTION_WINDOW))
                .tcp_keepalive(Some(Duration::from_secs(60)))
                .http2_keepalive_interval(Some(Duration::from_secs(30)))
                .http2_keepalive_timeout(Some(Duration::from_secs(10)));
            if let Some(tls) = tls {
                server = server.tls_config(tls).map_err(std::io::Error::other)?;
            }
            // What anyone may ask keeps a connection past the deadline,
            // never from giving way: only an authenticated call does.
            let answered = Arc::clone(&control_slots);
            server
                .add_service(service)
                .add_service(incoming::Proving::new(
                    health_service,
                    Arc::clone(&answered),
                ))
                .add_service(incoming::Proving::new(reflection_v1, Arc::clone(&answered)))
                .add_service(incoming::Proving::new(reflection_v1alpha, answered))
                .serve_with_incoming_shutdown(
                    incoming::stream(listener, control_slots),
                    grpc_stopped,
                )
                .await
                .map_err(std::io::Error::other)
        });
        let soaks = control.spawn(release_handler::watch_soaks(
            engine.clone(),
            until_stopped(stopped.clone()),
        ));
        let metrics = match metrics {
            Some(listener) => {
                // Like gRPC: on the control runtime's own I/O driver.
                let listener = listener
                    .into_std()
                    .map_err(Error::io("cannot move the metrics listener"))?;
                let registry = metrics::registry(
                    engine.transitions(),
                    Arc::clone(engine.runtime()),
                    engine.config().worker_restarts,
                );
                Some(control.spawn(metrics::serve(
                    listener,
                    registry,
                    until_stopped(stopped.clone()),
                )))
            }
            None => None,
        };
        let checkpoints = control.spawn(checkpoints(engine.clone(), until_stopped(stopped)));

        let handover = tokio::select! {
            () = shutdown => None,
            Ok(state) = handing_over => Some(state),
        };
        let deadline = Instant::now() + grace + STOP_MARGIN;
        if handover.is_some() {
            tracing::info!(
                grace_ms = grace.as_millis() as u64,
                "self-upgrade: handing over to the new worker"
            );
        } else {
            tracing::info!(grace_ms = grace.as_millis() as u64, "shutting down");
        }
        // Probes and load balancers hear it first.
        health.set_not_serving::<control::Server>().await;
        health
            .set_service_status("", tonic_health::ServingStatus::NotServing)
            .await;
        let _ = stop.send(true);
        let stopped_accepting_us = handover::now_us();
        http.stop().await;
        let left = || deadline.saturating_duration_since(Instant::now());
        // The new worker waits for nothing else: the state goes as soon as
        // no request can change it.
        let handed_over = match handover {
            Some(socket) => {
                let outgoing = handover::Outgoing {
                    socket,
                    stopped_accepting_us,
                };
                Some(engine.stop(left(), Some(outgoing)).await)
            }
            None => None,
        };
        finish("gRPC", grpc, left()).await;
        if let Some(local) = local {
            finish("local control socket", local, left()).await;
        }
        if let Some(metrics) = metrics {
            finish("metrics", metrics, left()).await;
        }
        if let Some(health_only) = health_only {
            finish("health", health_only, left()).await;
        }
        let _ = soaks.await;
        let _ = checkpoints.await;
        let stopped = match handed_over {
            Some(stopped) => stopped,
            None => engine.stop(left(), None).await,
        };
        control.shutdown_background();
        match stopped {
            Some(Ok(())) => tracing::info!("final checkpoint taken; stopped"),
            Some(Err(release_handler::FinalCheckpoint::Busy)) => tracing::warn!(
                "requests were still in flight: no final checkpoint, the last one stands; stopped"
            ),
            Some(Err(release_handler::FinalCheckpoint::Failed(why))) => {
                tracing::error!(%why, "the final checkpoint failed: what was served since the last checkpoint is lost; stopped");
                return Err(Error::refused(
                    error::Reason::Internal,
                    format!("the final checkpoint failed ({why}): what was served since the last checkpoint is lost"),
                ));
            }
            None => tracing::warn!("the engine did not stop in time (a transition was running); the last checkpoint stands"),
        }
        Ok(())
    }
}

/// The supervisor's channel, read on the control plane's runtime: a
/// failed self-upgrade is recorded; a handover's socket goes to `handover`.
async fn listen(channel: OwnedFd, engine: Engine, handover: oneshot::Sender<OwnedFd>) {
    let channel = match channel::Channel::new(channel) {
        Ok(channel) => channel,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the supervisor's channel");
            return;
        }
    };
    let mut handover = Some(handover);
    loop {
        match channel.recv().await {
            Ok(Some(channel::Message::HandOver(state))) => {
                if let Some(handover) = handover.take() {
                    let _ = handover.send(state);
                }
            }
            Ok(Some(channel::Message::RestartFailed(failed))) => engine.restart_failed(failed),
            Ok(Some(channel::Message::Standby)) => {}
            // The supervisor is gone: this worker dies with it.
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(error = %e, "a message from the supervisor was not understood")
            }
        }
    }
}

/// The data plane, serving on its listener until stopped, and the
/// watchdog of its calls past the request timeout (`stuck`).
pub struct DataPlane {
    task: tokio::task::JoinHandle<()>,
    stop: watch::Sender<bool>,
    /// The watchdog, on the control runtime: it must tick while every
    /// data-plane thread is inside a call.
    stuck_calls: tokio::task::JoinHandle<()>,
    /// Stops the watchdog, once the data plane has drained (it keeps the
    /// data plane's I/O driven until then).
    drained: watch::Sender<bool>,
}

impl DataPlane {
    /// Serves HTTP on `listener` through `runtime`, on the caller's
    /// runtime; watches its calls on `control`.
    fn start(
        listener: TcpListener,
        runtime: Arc<runtime::Runtime>,
        config: &Config,
        tls: Option<Arc<http_tls::HttpTls>>,
        control: &tokio::runtime::Handle,
    ) -> DataPlane {
        let board = Arc::new(stuck::Board::new(
            config.limits.max_connections,
            config.limits.max_connections_per_client,
            config.limits.request_timeout,
        ));
        let (stop, mut stopped) = watch::channel(false);
        let task = tokio::spawn(http::serve(
            listener,
            Arc::clone(&runtime),
            Arc::clone(&board),
            tls,
            config.limits.clone(),
            async move {
                let _ = stopped.wait_for(|stop| *stop).await;
            },
            config.shutdown_grace,
        ));
        let (drained, mut until_drained) = watch::channel(false);
        let stuck_calls = control.spawn(stuck::watch(
            board,
            runtime,
            tokio::runtime::Handle::current(),
            async move {
                let _ = until_drained.wait_for(|drained| *drained).await;
            },
        ));
        DataPlane {
            task,
            stop,
            stuck_calls,
            drained,
        }
    }

    /// Stops accepting and waits until the open connections are done
    /// (within the shutdown grace; a call abandoned past the request
    /// timeout is not waited for).
    async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
        let _ = self.drained.send(true);
        let _ = self.stuck_calls.await;
    }
}

/// The HTTP listener, or the data plane a self-upgrade's new worker
/// already serves on it.
pub enum Http {
    Listener(TcpListener),
    Serving(DataPlane),
}

/// Where the worker serves: the data plane, the control plane (on TCP,
/// and on the local control socket the supervisor passed, `local.rs`),
/// and the optional metrics (`--metrics`) and plaintext health
/// (`--health`) listeners.
pub struct Listeners {
    pub http: Http,
    pub grpc: TcpListener,
    /// Non-blocking; `None` only from a supervisor that predates it.
    pub local: Option<std::os::unix::net::UnixListener>,
    pub metrics: Option<TcpListener>,
    pub health: Option<TcpListener>,
}

/// Waits, up to `within`, for the server task `what` to end after the stop
/// was signalled; says so if it did not, or ended with an error.
async fn finish(what: &str, task: tokio::task::JoinHandle<std::io::Result<()>>, within: Duration) {
    match tokio::time::timeout(within, task).await {
        Ok(Ok(Err(e))) => tracing::warn!(error = %e, "{what} server ended with an error"),
        Ok(Err(e)) => tracing::warn!(error = %e, "{what} server task failed"),
        Err(_) => tracing::warn!("{what} connections still open at the end of the grace period"),
        Ok(Ok(Ok(()))) => {}
    }
}

/// Why a plaintext control plane on `address` is refused, and what to do.
pub fn plaintext_refusal(address: std::net::SocketAddr) -> String {
    format!(
        "refusing to serve the control plane on {address} without TLS: whoever reaches it could read its tokens off the wire and run code as this agent. Give --tls-cert and --tls-key (and --client-ca to require client certificates), or listen on a loopback address such as 127.0.0.1"
    )
}

/// Asks for a checkpoint every `--checkpoint-every` until stopped.
async fn checkpoints(engine: Engine, stopped: impl Future<Output = ()>) {
    tokio::pin!(stopped);
    let mut tick = tokio::time::interval(engine.config().checkpoint_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            () = &mut stopped => return,
            _ = tick.tick() => engine.checkpoint(),
        }
    }
}
