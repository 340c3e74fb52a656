//! Prometheus metrics (`--metrics ADDR`): the metric families, where each
//! is read from, and the small HTTP server that answers `GET /metrics` on
//! the admin listener with the OpenMetrics text of `prometheus-client`.
//!
//! Nothing here runs on the data plane's threads or touches its request
//! path. Requests are counted by the runtime in its own sharded atomics
//! (per version and status code, per instance in flight) and only read
//! here, when Prometheus scrapes; transitions are counted by the journal
//! on the engine's thread as they are committed; the supervisor's restart
//! count comes in with the worker's config. The server runs on the control
//! plane's runtime, so a release stuck in slow calls cannot stall a scrape
//! — that is when the metrics matter most.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeLabelValue, EncodeMetric, LabelValueEncoder,
};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::http::plain;
use crate::incoming::{Connection, Slots};
use crate::model::{Outcome, Transition, TransitionKind};
use crate::runtime::{self, Runtime};

/// What `prometheus_client::encoding::text` writes.
const OPENMETRICS_TEXT: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Scrapers connected at once; beyond, the oldest that has not completed
/// a request (or else the oldest) gives way to a new one (`incoming.rs`).
const MAX_CONNECTIONS: usize = 16;

/// How long an idle keep-alive connection stays open, and a later
/// request's headers may take (hyper has one timer for both); the first
/// request must come within `incoming::FIRST_REQUEST_TIMEOUT` of the
/// accept.
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);

/// A connection is closed after its response in progress once it is this
/// old, so one that never reads a large response holds its slot a while,
/// not for ever.
const MAX_CONNECTION_AGE: Duration = Duration::from_secs(300);

/// How long a closing connection gets to finish its response.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Transitions last from a fraction of a millisecond (make-permanent) to
/// seconds (a rehearsal with a slow health check, a quiesce timeout).
const TRANSITION_BUCKETS: [f64; 16] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

/// A switch holds requests for microseconds, a few milliseconds at worst,
/// up to `--quiesce-timeout` when requests in flight do not finish.
const SWITCH_WAIT_BUCKETS: [f64; 15] = [
    0.000_002_5,
    0.000_005,
    0.000_01,
    0.000_025,
    0.000_05,
    0.000_1,
    0.000_25,
    0.000_5,
    0.001,
    0.002_5,
    0.005,
    0.01,
    0.1,
    1.0,
    5.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TransitionLabels {
    kind: Kind,
    result: Ended,
    /// Started by the agent itself: an automatic rollback, a restart.
    automatic: bool,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: Kind,
}

/// A transition's kind as the history names it (`make-permanent`).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
struct Kind(TransitionKind);

impl EncodeLabelValue for Kind {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> std::fmt::Result {
        write!(encoder, "{}", self.0)
    }
}

/// A transition's outcome as the history names it.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
struct Ended(Outcome);

impl EncodeLabelValue for Ended {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> std::fmt::Result {
        write!(encoder, "{}", self.0)
    }
}

/// The transitions' metrics, kept by the journal, which counts each
/// transition when it is committed (or found aborted at boot).
#[derive(Clone, Debug)]
pub struct Transitions {
    finished: Family<TransitionLabels, Counter>,
    duration: Family<KindLabels, Histogram, fn() -> Histogram>,
    switch_wait: Histogram,
}

impl Default for Transitions {
    fn default() -> Transitions {
        Transitions {
            finished: Family::default(),
            duration: Family::new_with_constructor(|| Histogram::new(TRANSITION_BUCKETS)),
            switch_wait: Histogram::new(SWITCH_WAIT_BUCKETS),
        }
    }
}

impl Transitions {
    /// Counts a committed transition: its outcome, how long it took and,
    /// if it switched, how long requests were held.
    pub fn finished(&self, t: &Transition, switched: bool) {
        self.count(t);
        let kind = Kind(t.kind);
        self.duration
            .get_or_create(&KindLabels { kind })
            .observe(seconds(t.duration_us));
        if switched {
            self.switch_wait.observe(seconds(t.switch_wait_us));
        }
    }

    /// Counts a transition the previous worker left running (aborted):
    /// how long it ran is not known.
    pub fn aborted(&self, t: &Transition) {
        self.count(t);
    }

    fn count(&self, t: &Transition) {
        self.finished
            .get_or_create(&TransitionLabels {
                kind: Kind(t.kind),
                result: Ended(t.outcome),
                automatic: t.automatic,
            })
            .inc();
    }
}

fn seconds(us: u64) -> f64 {
    Duration::from_micros(us).as_secs_f64()
}

/// Every metric the worker serves.
pub fn registry(
    transitions: &Transitions,
    runtime: Arc<Runtime>,
    worker_restarts: u64,
) -> Registry {
    let mut registry = Registry::with_prefix("nine9s");
    registry.register(
        "transitions",
        "Transitions that ended, by kind and result as the history names them, and whether the agent started them itself (an automatic rollback, a restart)",
        transitions.finished.clone(),
    );
    registry.register_with_unit(
        "transition_duration",
        "How long transitions took, from being journalled to being committed, by kind",
        Unit::Seconds,
        transitions.duration.clone(),
    );
    registry.register_with_unit(
        "switch_wait",
        "How long switches held new requests back (the quiesce plus snapshot, migrate, restore and swap)",
        Unit::Seconds,
        transitions.switch_wait.clone(),
    );
    let restarts = Counter::<u64>::default();
    restarts.inc_by(worker_restarts);
    registry.register(
        "worker_restarts",
        "Workers the supervisor started because the one before died unexpectedly (a crash, a kill); self-upgrades are not counted",
        restarts,
    );
    registry.register_collector(Box::new(Live { runtime }));
    registry
}

/// The metrics read from the runtime at each scrape.
struct Live {
    runtime: Arc<Runtime>,
}

impl std::fmt::Debug for Live {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Live").finish_non_exhaustive()
    }
}

/// An HTTP status code as a label: `"other"` for any outside 100–599.
struct Code(Option<u16>);

impl EncodeLabelValue for Code {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> std::fmt::Result {
        match self.0 {
            Some(code) => write!(encoder, "{code}"),
            None => encoder.write_str("other"),
        }
    }
}

impl Collector for Live {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let mut requests = encoder.encode_descriptor(
            "http_requests",
            "HTTP requests answered by a release, by its version and the status code (other: outside 100-599); kept after the release is unloaded.",
            None,
            MetricType::Counter,
        )?;
        for totals in runtime::all_totals() {
            for (code, n) in totals.responses() {
                let labels = ([("release", totals.label)], [("code", Code(code))]);
                ConstCounter::new(n).encode(requests.encode_family(&labels)?)?;
            }
        }
        let mut cancelled = encoder.encode_descriptor(
            "drain_cancelled_requests",
            "Requests a service release still had under way on an old instance when its drain (--drain-timeout) ended, cancelled; by its version.",
            None,
            MetricType::Counter,
        )?;
        for totals in runtime::all_totals() {
            let labels = [("release", totals.label)];
            ConstCounter::new(totals.drain_cancelled())
                .encode(cancelled.encode_family(&labels)?)?;
        }
        // The active instance first, then the draining ones.
        let resident = self.runtime.resident();
        if let Some(active) = resident.first() {
            let mut info = encoder.encode_descriptor(
                "active_release",
                "The release serving new requests.",
                None,
                MetricType::Info,
            )?;
            info.encode_info(&[("version", active.label)])?;
        }
        if let Some(canary) = self.runtime.canary() {
            let mut info = encoder.encode_descriptor(
                "canary",
                "The canary serving a share of requests beside the active release, and which.",
                None,
                MetricType::Info,
            )?;
            let split = canary.split.to_string();
            info.encode_info(&[("version", canary.loaded.label), ("split", split.as_str())])?;
        }
        let in_flight: u64 = resident.iter().map(|l| l.counters().in_flight).sum();
        ConstGauge::new(in_flight).encode(encoder.encode_descriptor(
            "in_flight_requests",
            "Requests inside a release now.",
            None,
            MetricType::Gauge,
        )?)?;
        let stuck: u64 = resident.iter().map(|l| l.counters().stuck).sum();
        ConstGauge::new(stuck).encode(encoder.encode_descriptor(
            "stuck_requests",
            "Calls that ran past --request-timeout and have not returned: their clients were answered 504, and each holds a thread until it returns or the worker is replaced.",
            None,
            MetricType::Gauge,
        )?)?;
        // As `ctl status` lists them: serving, draining, and released but
        // still mapped.
        let libraries = resident.len() + nine9s_host::lingering().len();
        ConstGauge::new(libraries as u64).encode(encoder.encode_descriptor(
            "resident_libraries",
            "Release libraries the worker has mapped now: the active one, those draining, and those released but still mapped.",
            None,
            MetricType::Gauge,
        )?)?;
        Ok(())
    }
}

/// Serves `GET /metrics` until `shutdown` resolves; connections still open
/// then get a moment to finish their response.
pub async fn serve(
    listener: std::net::TcpListener,
    registry: Registry,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let listener = TcpListener::from_std(listener)?;
    tracing::info!(address = %listener.local_addr()?, "metrics served on /metrics");
    let registry = Arc::new(registry);
    let slots = Slots::new("metrics", MAX_CONNECTIONS, true);
    let (stop, stopping) = watch::channel(false);
    tokio::pin!(shutdown);
    while let Some(stream) = slots.accept(&listener, shutdown.as_mut()).await {
        let registry = Arc::clone(&registry);
        let stopping = stopping.clone();
        tokio::spawn(connection(stream, Arc::clone(&slots), registry, stopping));
    }
    drop(listener);
    let _ = stop.send(true);
    slots.drained(CLOSE_GRACE).await;
    Ok(())
}

/// Serves one scraper until it leaves, idles out, grows too old or the
/// agent stops.
async fn connection(
    stream: Connection,
    slots: Arc<Slots>,
    registry: Arc<Registry>,
    mut stopping: watch::Receiver<bool>,
) {
    let peer = Some(stream.peer());
    let service = service_fn(move |request| {
        slots.answered(peer);
        let response = answer(&registry, &request);
        async move { Ok::<_, Infallible>(response) }
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    tokio::select! {
        ended = conn.as_mut() => {
            if let Err(e) = ended {
                tracing::debug!(error = %e, "metrics connection ended with an error");
            }
            return;
        }
        _ = stopping.wait_for(|stop| *stop) => {}
        () = tokio::time::sleep(MAX_CONNECTION_AGE) => {}
    }
    conn.as_mut().graceful_shutdown();
    let _ = tokio::time::timeout(CLOSE_GRACE, conn).await;
}

fn answer(registry: &Registry, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    if request.uri().path() != "/metrics" {
        return plain(StatusCode::NOT_FOUND, "metrics are on /metrics\n".into());
    }
    if request.method() != Method::GET && request.method() != Method::HEAD {
        let mut response = plain(StatusCode::METHOD_NOT_ALLOWED, "GET /metrics\n".into());
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    let mut body = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut body, registry) {
        tracing::warn!(error = %e, "cannot encode the metrics");
        return plain(
            StatusCode::INTERNAL_SERVER_ERROR,
            "cannot encode the metrics\n".into(),
        );
    }
    let mut response = Response::new(Full::new(Bytes::from(body)));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(OPENMETRICS_TEXT));
    response
}
