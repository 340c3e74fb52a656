//! The gRPC control plane. The only module that knows the generated proto
//! types: it validates requests, turns them into engine commands, and
//! turns domain values into replies and errors into statuses — each with a
//! `google.rpc.ErrorInfo` carrying the error's stable reason code.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::header::{HeaderName, HeaderValue};
use nine9s_manifest::signature::TrustedKeys;
use nine9s_manifest::{Manifest, Step, Version, MAX_MANIFEST};
use nine9s_proto as pb;
use pb::control_server::{Control, ControlServer};
use tokio::sync::{broadcast, mpsc, oneshot, watch, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::metadata::MetadataMap;
use tonic::{Code, Request, Response, Status, Streaming};
use tonic_types::{ErrorDetails, StatusExt};

use crate::access::{Access, Identity};
use crate::artifacts::{self, Reservation, Reservations, Upload};
use crate::error::{Error, Reason};
use crate::gate::{identity, Gate, MAX_STAGE_MESSAGE};
use crate::incoming::Slots;
use crate::lease::{self, Admitted, Rollout};
use crate::model::{Event, EventKind, Outcome, Release, ReleaseState, Transition, TransitionKind};
use crate::release_handler::{
    check_service, embedded_sha256, inspect, CarriedState, Command, Direction, Engine, Meta,
    Permanence, PlanReport, Reply, Signed, Soak, Staging, StateSource, FREE_SPACE_MARGIN,
};
use crate::runtime::Split;

/// Largest library `Stage` accepts.
const MAX_ARTIFACT: u64 = 512 * 1024 * 1024;
/// Longest soak a request may ask for.
const MAX_SOAK: Duration = Duration::from_secs(7 * 24 * 3600);
const MAX_REQUEST_ID: usize = 128;
const MAX_REASON: usize = 1024;
/// A rollout's record, as `Lease` takes it.
const MAX_ROLLOUT_ID: usize = 64;
const MAX_STEP: usize = 256;
const MAX_OUTCOME: usize = 64;
const MAX_COMMAND: usize = 1024;
/// How long a lease may hold without a renewal.
const LEASE_TTL: std::ops::RangeInclusive<u64> = 1_000..=3_600_000;
/// Largest history page.
const MAX_PAGE: u32 = 1000;
/// `Watch` streams one identity may have open at once.
const MAX_WATCHES: usize = 32;
/// Events read from the store at a time for a watcher's backlog.
const WATCH_PAGE: usize = 64;
/// Events queued for a watcher's stream.
const WATCH_QUEUE: usize = 16;
/// How long a watcher's queue may stay full before its stream is ended.
const WATCH_SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// `ErrorInfo.domain` of every error.
const DOMAIN: &str = "nine9s.dev";
/// What a signed release staged on an agent that trusts no keys is told.
const UNCHECKED_SIGNATURE: &str = "the release is signed, but this agent trusts no keys (no --trusted-keys) and requires none: the signature was not checked, and the release is staged as unsigned";

/// The control service behind its gate (`gate.rs`), which authenticates
/// every call from `access` before its messages are read and proves its
/// connection's slot in `slots`.
pub fn service(
    engine: Engine,
    access: Arc<Access>,
    slots: Arc<Slots>,
    keys: Option<Arc<TrustedKeys>>,
    stopped: watch::Receiver<bool>,
) -> Gate<ControlServer<ControlService>> {
    let uploads = Arc::new(Semaphore::new(engine.config().limits.max_uploads));
    let server = ControlServer::new(ControlService {
        engine,
        keys,
        uploads,
        reservations: Reservations::default(),
        watches: Watches::default(),
        stopped,
    })
    // The gate refuses larger messages first, with a clearer word.
    .max_decoding_message_size(MAX_STAGE_MESSAGE);
    Gate::new(server, access, slots)
}

/// The gRPC server of the control service, as the health service names it.
pub type Server = ControlServer<ControlService>;

pub struct ControlService {
    engine: Engine,
    /// Keys whose release signatures are trusted (`--trusted-keys`).
    keys: Option<Arc<TrustedKeys>>,
    /// One permit per upload in progress (`--max-uploads`).
    uploads: Arc<Semaphore>,
    /// Disk space promised to uploads in progress.
    reservations: Reservations,
    /// Open `Watch` streams per identity.
    watches: Watches,
    /// Flips to true on shutdown: open `Watch` streams end.
    stopped: watch::Receiver<bool>,
}

/// The one place an agent error becomes a gRPC status.
pub fn status(error: Error) -> Status {
    let reason = error.reason();
    let mut metadata = HashMap::new();
    match &error {
        Error::UnknownVersion(v) => {
            metadata.insert("version".to_owned(), v.to_string());
        }
        Error::ExpectedActive { expected, active } => {
            metadata.insert("expected_active".to_owned(), expected.to_string());
            metadata.insert("active".to_owned(), active.to_string());
        }
        Error::Load { version, .. } | Error::Plugin { version, .. } => {
            metadata.insert("version".to_owned(), version.to_string());
        }
        Error::Lease(refused) => {
            if let Some(holder) = refused.holder() {
                metadata.insert("rollout_id".to_owned(), holder.report.id.clone());
                metadata.insert("owner".to_owned(), holder.owner.clone());
                metadata.insert("expires_at_ms".to_owned(), holder.expires_at_ms.to_string());
            }
            if let Some(lease) = refused.lease() {
                metadata.insert("lease".to_owned(), lease.to_owned());
            }
        }
        _ => {}
    }
    let code = code(reason);
    Status::with_error_details(
        code,
        client_message(&error),
        ErrorDetails::with_error_info(reason.as_str(), DOMAIN, metadata),
    )
}

/// What the client is told of `error`. The agent's own I/O, its store and
/// a library that does not load are described in words that name the
/// server's paths (and the store's lock): those stay in the agent's log,
/// and the client learns what failed.
fn client_message(error: &Error) -> String {
    let summary = match error {
        Error::Io { source, .. } if crate::error::is_disk_full(source) => {
            "the agent's disk is full".to_owned()
        }
        Error::Io { .. } => "the agent could not read or write its data dir".to_owned(),
        Error::Store(_) => "the agent's store is unavailable".to_owned(),
        Error::Load { version, source } => {
            format!("cannot load release {version}: {}", source.without_path())
        }
        other => return other.to_string(),
    };
    tracing::error!(error = %error, "answered the client without the details: {summary}");
    format!("{summary} (the agent's log has the details)")
}

/// The gRPC code of each reason, per gRPC's guide: INVALID_ARGUMENT for
/// the request itself, FAILED_PRECONDITION for the agent's state (plugin
/// failures included: retrying will not help), ABORTED only for
/// `expected_active`, UNAVAILABLE for what a later retry may clear.
fn code(reason: Reason) -> Code {
    match reason {
        Reason::InvalidArgument
        | Reason::InvalidManifest
        | Reason::InvalidArtifact
        | Reason::WrongService
        | Reason::RequestIdReused => Code::InvalidArgument,
        Reason::UnknownRelease => Code::NotFound,
        Reason::WrongDirection
        | Reason::NoRollbackTarget
        | Reason::NotCurrent
        | Reason::ReleaseInUse
        | Reason::VersionConflict
        | Reason::LoadFailed
        | Reason::PluginFailed
        | Reason::NoMigrationPath
        | Reason::NoSnapshot
        | Reason::RollbackPending => Code::FailedPrecondition,
        Reason::ExpectedActiveMismatch | Reason::ExpectedCanaryMismatch => Code::Aborted,
        Reason::DiskFull
        | Reason::TooLarge
        | Reason::TooManyUploads
        | Reason::Busy
        | Reason::TooManyWatches
        | Reason::WatcherTooSlow => Code::ResourceExhausted,
        Reason::Unauthenticated => Code::Unauthenticated,
        Reason::PermissionDenied => Code::PermissionDenied,
        Reason::BadSignature
        | Reason::SignatureRequired
        | Reason::NoSupervisor
        | Reason::CanaryWithState
        | Reason::CanaryWhileCurrent
        | Reason::OutcomeUnknown
        | Reason::TransitionAborted
        | Reason::LeaseHeld
        | Reason::Leased => Code::FailedPrecondition,
        Reason::ChecksumMismatch => Code::DataLoss,
        Reason::UploadStalled => Code::DeadlineExceeded,
        Reason::QuiesceTimeout | Reason::StoreUnavailable | Reason::ShuttingDown => {
            Code::Unavailable
        }
        Reason::Internal => Code::Internal,
    }
}

fn invalid(message: impl Into<String>) -> Status {
    status(Error::refused(Reason::InvalidArgument, message))
}

fn too_large(message: impl Into<String>) -> Status {
    status(Error::refused(Reason::TooLarge, message))
}

fn parse_version(field: &str, text: &str) -> Result<Version, Status> {
    Version::parse(text.trim()).map_err(|_| {
        invalid(format!(
            "{field}: {text:?} is not a version (expected something like 0.2.0)"
        ))
    })
}

/// A mutating request: it carries a request id, an expected active
/// release and a reason, and (a switching command) the rollout lease it
/// is sent under and whether it is forced past another's.
trait Mutating {
    fn fields(&self) -> (&str, &str, &str);
    fn lease(&self) -> Lease<'_>;
}

macro_rules! mutating {
    ($($request:ty),*) => {$(
        impl Mutating for $request {
            fn fields(&self) -> (&str, &str, &str) {
                (&self.request_id, &self.expected_active, &self.reason)
            }

            fn lease(&self) -> Lease<'_> {
                Lease {
                    rollout_id: &self.lease,
                    force: self.force,
                }
            }
        }
    )*};
}

/// A switching command's `lease` and `force` fields.
#[derive(Clone, Copy)]
struct Lease<'a> {
    rollout_id: &'a str,
    force: bool,
}

mutating!(
    pb::TransitionRequest,
    pb::RollbackRequest,
    pb::MakePermanentRequest,
    pb::RemoveRequest
);

fn meta_of<R: Mutating>(request: &Request<R>, identity: Identity) -> Result<Meta, Status> {
    let (request_id, expected_active, reason) = request.get_ref().fields();
    let mut meta = meta(request.metadata(), request_id, expected_active, reason)?;
    meta.identity = Some(identity.name);
    Ok(meta)
}

/// The fields every mutating request carries, validated.
fn meta(
    metadata: &MetadataMap,
    request_id: &str,
    expected_active: &str,
    reason: &str,
) -> Result<Meta, Status> {
    let request_id = match request_id {
        "" => None,
        id if id.len() > MAX_REQUEST_ID || !id.bytes().all(|b| b.is_ascii_graphic()) => {
            return Err(invalid(format!(
                "request_id must be 1 to {MAX_REQUEST_ID} printable ASCII characters without spaces"
            )))
        }
        id => Some(id.to_owned()),
    };
    let expected_active = match expected_active {
        "" => None,
        text => Some(parse_version("expected_active", text)?),
    };
    if reason.chars().count() > MAX_REASON {
        return Err(invalid(format!("reason is over {MAX_REASON} characters")));
    }
    Ok(Meta {
        request_id,
        expected_active,
        reason: (!reason.is_empty()).then(|| reason.to_owned()),
        deadline: deadline(metadata),
        identity: None,
    })
}

/// When the client stops waiting, from its `grpc-timeout` header.
fn deadline(metadata: &MetadataMap) -> Option<Instant> {
    let value = metadata.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    let n: u64 = digits.parse().ok()?;
    let timeout = match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    };
    Instant::now().checked_add(timeout)
}

/// A rollout id (`record.rollout_id`, or a command's `lease`), checked.
fn rollout_id(field: &str, id: &str) -> Result<String, Status> {
    if id.is_empty() || id.len() > MAX_ROLLOUT_ID || !id.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(invalid(format!(
            "{field}: a rollout id is 1 to {MAX_ROLLOUT_ID} printable ASCII characters without spaces"
        )));
    }
    Ok(id.to_owned())
}

/// The fields of a `RolloutRecord` the rollout sets, checked; those the
/// agent sets are ignored.
fn rollout_report(record: &pb::RolloutRecord) -> Result<lease::Report, Status> {
    let id = rollout_id("record.rollout_id", &record.rollout_id)?;
    if record.attempt == 0 {
        return Err(invalid("record.attempt: attempts count from 1"));
    }
    let version = parse_version("record.version", &record.version)?;
    for (field, text, max) in [
        ("record.step", &record.step, MAX_STEP),
        ("record.outcome", &record.outcome, MAX_OUTCOME),
        ("record.command", &record.command, MAX_COMMAND),
    ] {
        if text.chars().count() > max {
            return Err(invalid(format!("{field} is over {max} characters")));
        }
    }
    Ok(lease::Report {
        id,
        attempt: record.attempt,
        version,
        step: record.step.clone(),
        outcome: record.outcome.clone(),
        agents: lease::Agents {
            total: record.agents_total,
            done: record.agents_done,
            pending: record.agents_pending,
            skipped: record.agents_skipped,
        },
        soak_until_ms: record.soak_until_ms,
        command: record.command.clone(),
    })
}

fn rollout_pb(rollout: &Rollout) -> pb::RolloutRecord {
    let report = &rollout.report;
    pb::RolloutRecord {
        rollout_id: report.id.clone(),
        attempt: report.attempt,
        version: report.version.to_string(),
        owner: rollout.owner.clone(),
        started_at_ms: rollout.started_at_ms,
        updated_at_ms: rollout.updated_at_ms,
        expires_at_ms: rollout.expires_at_ms,
        ended_at_ms: rollout.ended_at_ms.unwrap_or(0),
        step: report.step.clone(),
        outcome: report.outcome.clone(),
        agents_total: report.agents.total,
        agents_done: report.agents.done,
        agents_pending: report.agents.pending,
        agents_skipped: report.agents.skipped,
        soak_until_ms: report.soak_until_ms,
        taken_from: rollout.taken_from.clone().unwrap_or_default(),
        command: report.command.clone(),
    }
}

fn permanence(request: &pb::TransitionRequest) -> Result<Permanence, Status> {
    let soak = match request.soak_ms {
        0 => None,
        ms if Duration::from_millis(ms) > MAX_SOAK => {
            return Err(invalid(format!(
                "soak_ms {ms} is over the limit of 7 days ({} ms)",
                MAX_SOAK.as_millis()
            )))
        }
        ms => Some(Duration::from_millis(ms)),
    };
    let permanence = pb::Permanence::try_from(request.permanence).map_err(|_| {
        invalid(format!(
            "permanence {} is not a Permanence value",
            request.permanence
        ))
    })?;
    match permanence {
        pb::Permanence::Unspecified | pb::Permanence::Soak => Ok(Permanence::Soak(soak)),
        _ if soak.is_some() => Err(invalid(
            "soak_ms is only meaningful with PERMANENCE_SOAK (or unspecified)",
        )),
        pb::Permanence::Immediate => Ok(Permanence::Immediate),
        pb::Permanence::Never => Ok(Permanence::Never),
    }
}

impl ControlService {
    /// This worker's process, for Status and AgentInfo.
    fn process(&self) -> pb::AgentProcess {
        let config = self.engine.config();
        pb::AgentProcess {
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            supervisor_pid: config.supervisor_pid.unwrap_or(0),
            worker_pid: std::process::id(),
            worker_started_at_ms: self.engine.started_at_ms(),
            binary_sha256: crate::process::binary_sha256().to_owned(),
            previous_exit: config.previous_exit.clone().unwrap_or_default(),
            last_failed_restart: crate::process::failed_restart().map(|f| pb::FailedRestart {
                pid: f.pid,
                exit: f.exit,
                stderr: f.stderr,
                at_ms: f.at_ms,
                supervisor: f.supervisor,
            }),
        }
    }

    /// A Stage header's checks: sizes, the manifest, the service, the
    /// signature, room on disk.
    fn check_header(
        &self,
        header: &pb::StageHeader,
    ) -> Result<(Manifest, Reservation, Signed), Status> {
        if header.manifest_toml.len() > MAX_MANIFEST {
            return Err(too_large(format!(
                "the release.toml is {} bytes; the limit is {MAX_MANIFEST}",
                header.manifest_toml.len()
            )));
        }
        if header.size == 0 {
            return Err(invalid("the library is empty (size 0)"));
        }
        if header.size > MAX_ARTIFACT {
            return Err(too_large(format!(
                "the library is {} bytes; the limit is {MAX_ARTIFACT}",
                header.size
            )));
        }
        if header.sha256.len() != 64 || !header.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(invalid("sha256 must be 64 hex digits"));
        }
        let manifest = Manifest::parse(&header.manifest_toml).map_err(|e| status(e.into()))?;
        check_service(&manifest, self.engine.service()).map_err(status)?;
        let signed = self.check_signature(header).map_err(status)?;
        let dir = artifacts::dir(&self.engine.config().data_dir);
        let free = artifacts::free_space(&dir)
            .map_err(|e| status(Error::io("cannot read the free space of the data dir")(e)))?;
        let reservation = self
            .reservations
            .reserve(free, header.size, FREE_SPACE_MARGIN)
            .map_err(|left| {
                let needed = header.size + FREE_SPACE_MARGIN;
                status(Error::refused(
                    Reason::DiskFull,
                    format!(
                        "not enough free space in the data dir to stage {} {}: {} MiB free for it (other uploads in progress included), {} MiB needed (the library plus {} MiB kept for the store)",
                        manifest.name,
                        manifest.version,
                        left / (1024 * 1024),
                        needed.div_ceil(1024 * 1024),
                        FREE_SPACE_MARGIN / (1024 * 1024)
                    ),
                ))
            })?;
        Ok((manifest, reservation, signed))
    }

    /// A signature must verify against a trusted key, whether or not one
    /// is required; none at all is refused only under `--require-signed`.
    /// An agent that trusts no keys (and so requires none) cannot check a
    /// signature: the release is staged unsigned, and the reply says so.
    /// Returns who signed it, to be recorded with the release.
    fn check_signature(&self, header: &pb::StageHeader) -> Result<Signed, Error> {
        let config = self.engine.config();
        if header.signature.is_empty() {
            if config.require_signed {
                return Err(Error::refused(
                    Reason::SignatureRequired,
                    "this agent takes signed releases only (--require-signed): sign it with `ctl sign DIR --key KEY` by a key in its --trusted-keys",
                ));
            }
            return Ok(Signed::default());
        }
        let Some(keys) = &self.keys else {
            // No key to check it against, and none required: the release
            // is what it would be without the signature, and says so.
            tracing::info!("{UNCHECKED_SIGNATURE}");
            return Ok(Signed::default());
        };
        let key = keys
            .verify(
                &header.signature,
                &header.manifest_toml,
                &header.sha256.to_ascii_lowercase(),
            )
            .map_err(|e| Error::refused(Reason::BadSignature, e.to_string()))?;
        tracing::info!(key, "release signature verified");
        Ok(Signed {
            by: Some(key),
            signature: header.signature.clone(),
        })
    }

    /// Under `--require-signed`, a release may be switched to (or made
    /// permanent) only if a key trusted now signed it, or it is the sample
    /// release built into the agent — also one staged before the flag
    /// was given. An unknown version is left to the engine to answer.
    fn check_trusted(&self, version: &Version) -> Result<(), Status> {
        if !self.engine.config().require_signed {
            return Ok(());
        }
        let releases = self.engine.releases().map_err(status)?;
        let Some(release) = releases.iter().find(|r| r.version == *version) else {
            return Ok(());
        };
        if release.sha256 == embedded_sha256() {
            return Ok(());
        }
        let verified = self.keys.as_ref().is_some_and(|keys| {
            !release.signature.is_empty()
                && keys
                    .verify(&release.signature, &release.manifest, &release.sha256)
                    .is_ok()
        });
        if verified {
            return Ok(());
        }
        let why = if release.signature.is_empty() {
            "was staged unsigned"
        } else {
            "is signed by a key this agent no longer trusts"
        };
        Err(status(Error::refused(
            Reason::SignatureRequired,
            format!(
                "release {version} {why}, and this agent runs only signed releases (--require-signed): nothing was switched. Remove it (`ctl remove {version}`) and stage it signed (`ctl sign DIR --key KEY`)"
            ),
        )))
    }

    async fn command(&self, command: Command, meta: Meta) -> Result<Reply, Status> {
        self.engine.command(command, meta).await.map_err(status)
    }

    /// A switching command (Upgrade, Downgrade — canaries included —,
    /// Rollback, MakePermanent, Remove): checked against the rollout lease
    /// here, the one place, then run. While a rollout holds the lease it
    /// is refused (LEASED) unless it is sent under that rollout's lease or
    /// forced; a forced one says so in its reason, for the history. A dry
    /// run changes nothing and is never refused. What the agent does on
    /// its own (soak verdicts, health-gated rollbacks) never comes here.
    async fn switching(
        &self,
        command: Command,
        mut meta: Meta,
        lease: Lease<'_>,
    ) -> Result<Reply, Status> {
        let sent_under = match lease.rollout_id {
            "" => None,
            id => Some(rollout_id("lease", id)?),
        };
        if !command.dry_run() {
            let admitted = self
                .engine
                .admit_command(sent_under.as_deref(), lease.force, command.name())
                .map_err(status)?;
            if let Admitted::Forced(holder) = admitted {
                let note = format!(
                    "(forced past rollout {}'s lease, attempt {} by {})",
                    holder.report.id, holder.report.attempt, holder.owner
                );
                tracing::warn!(command = command.name(), identity = ?meta.identity, "{note}");
                meta.reason = Some(match meta.reason.take() {
                    Some(reason) => format!("{reason} {note}"),
                    None => note,
                });
            }
        }
        self.command(command, meta).await
    }

    /// Upgrade and Downgrade: the same request, another direction.
    async fn switch(
        &self,
        request: Request<pb::TransitionRequest>,
        direction: Direction,
    ) -> Result<Response<pb::TransitionReply>, Status> {
        let identity = identity(&request)?;
        let meta_in = meta_of(&request, identity)?;
        let request = request.into_inner();
        let lease = request.lease();
        let version = parse_version("version", &request.version)?;
        self.check_trusted(&version)?;
        let command = match &request.canary {
            Some(split) => {
                if request.permanence() != pb::Permanence::Unspecified || request.soak_ms != 0 {
                    return Err(invalid("permanence, soak_ms: a canary does not switch, so it has no soak; `ctl promote` switches, and soaks"));
                }
                if request.dry_run {
                    return Err(invalid("dry_run: a canary has no dry run; it changes no lifecycle state, and a rollback drops it"));
                }
                if request.state() == pb::StateSource::Snapshot {
                    return Err(invalid(
                        "state: a canary keeps no state, so it has none to restore",
                    ));
                }
                Command::Canary {
                    version,
                    split: canary_split(split)?,
                }
            }
            None => Command::Switch {
                direction,
                version,
                permanence: permanence(&request)?,
                source: state_source(request.state)?,
                dry_run: request.dry_run,
                expected_canary: match request.expected_canary.as_str() {
                    "" => None,
                    text => Some(parse_version("expected_canary", text)?),
                },
            },
        };
        let reply = self.switching(command, meta_in, lease).await?;
        Ok(Response::new(transition_reply(reply)))
    }
}

/// Where a switch's state comes from, as a request field gives it.
fn state_source(state: i32) -> Result<StateSource, Status> {
    match pb::StateSource::try_from(state) {
        Ok(pb::StateSource::Unspecified | pb::StateSource::Migrate) => Ok(StateSource::Migrate),
        Ok(pb::StateSource::Snapshot) => Ok(StateSource::Snapshot),
        Err(_) => Err(invalid(format!("state {state} is not a StateSource value"))),
    }
}

/// A canary's split, checked: a weight of 1 to 1000 per mille, or a
/// header name (and value) that can appear in a request; not both.
fn canary_split(split: &pb::CanarySplit) -> Result<Split, Status> {
    match (split.permille, split.header.as_str()) {
        (0, "") => Err(invalid(
            "canary: give a weight (permille 1 to 1000) or a header",
        )),
        (1..=1000, "") if !split.header_value.is_empty() => Err(invalid(
            "canary.header_value: only with a header, not with a weight",
        )),
        (permille @ 1..=1000, "") => Ok(Split::Weight(permille as u16)),
        (0, header) => {
            let name = HeaderName::from_bytes(header.as_bytes())
                .map_err(|_| invalid("canary.header: not a header name"))?;
            let value = match split.header_value.as_str() {
                "" => None,
                value => Some(
                    HeaderValue::from_str(value)
                        .map_err(|_| invalid("canary.header_value: not a header value"))?,
                ),
            };
            Ok(Split::Header { name, value })
        }
        (1..=1000, _) => Err(invalid("canary: a weight or a header, not both")),
        _ => Err(invalid("canary.permille: 1 to 1000 (per mille)")),
    }
}

fn split_pb(split: &Split) -> pb::CanarySplit {
    match split {
        Split::Weight(permille) => pb::CanarySplit {
            permille: u32::from(*permille),
            ..Default::default()
        },
        Split::Header { name, value } => pb::CanarySplit {
            header: name.to_string(),
            header_value: value
                .as_ref()
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                .unwrap_or_default(),
            ..Default::default()
        },
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::Event, Status>> + Send>>;

#[tonic::async_trait]
impl Control for ControlService {
    async fn stage(
        &self,
        request: Request<Streaming<pb::StageChunk>>,
    ) -> Result<Response<pb::StageReply>, Status> {
        let identity = identity(&request)?;
        let deadline = deadline(request.metadata());
        let limits = &self.engine.config().limits;
        let permit = Arc::clone(&self.uploads).try_acquire_owned().map_err(|_| {
            status(Error::refused(
                Reason::TooManyUploads,
                format!(
                    "{} uploads are in progress, as many as this agent takes at once (--max-uploads); try again when one has ended",
                    limits.max_uploads
                ),
            ))
        })?;
        let idle = limits.upload_idle_timeout;
        let mut stream = request.into_inner();
        let mut next = async || match tokio::time::timeout(idle, stream.next()).await {
            Ok(chunk) => chunk.transpose(),
            Err(_) => Err(status(Error::refused(
                Reason::UploadStalled,
                format!(
                    "the upload sent nothing for {} ms (--upload-idle-timeout); it was dropped",
                    idle.as_millis()
                ),
            ))),
        };
        let header = match next().await? {
            Some(pb::StageChunk {
                part: Some(pb::stage_chunk::Part::Header(header)),
            }) => header,
            _ => return Err(invalid("the first Stage message must be the header")),
        };
        let mut meta = meta(&MetadataMap::new(), &header.request_id, "", &header.reason)?;
        meta.deadline = deadline;
        meta.identity = Some(identity.name);
        // Everything the header alone can tell is checked before a byte of
        // the library is accepted.
        let (manifest, reservation, signed) = self.check_header(&header)?;
        // A signature set aside unchecked (see `check_signature`).
        let unchecked = !header.signature.is_empty() && self.keys.is_none();
        let mut upload = Upload::create(
            &artifacts::dir(&self.engine.config().data_dir),
            Some(reservation),
        )
        .map_err(|e| status(Error::io("cannot start the upload")(e)))?;
        while let Some(chunk) = next().await? {
            let Some(pb::stage_chunk::Part::Data(data)) = chunk.part else {
                return Err(invalid("only one Stage header is allowed"));
            };
            if upload.size() + data.len() as u64 > header.size {
                return Err(invalid(format!(
                    "more bytes than the {} the header announced",
                    header.size
                )));
            }
            // A write and its hashing block; other calls go on meanwhile.
            tokio::task::block_in_place(|| upload.write(&data))
                .map_err(|e| status(Error::io("cannot write the upload")(e)))?;
        }
        if upload.size() != header.size {
            return Err(invalid(format!(
                "the upload ended after {} of {} bytes",
                upload.size(),
                header.size
            )));
        }
        let expected = header.sha256.to_ascii_lowercase();
        // On a thread of its own, not the control plane's blocking pool,
        // which soak health checks need; the upload permit goes with it,
        // so an inspection outliving its client still counts.
        let (done, inspection) = oneshot::channel();
        let inspect_upload = move || {
            let upload = upload
                .finish()
                .map_err(Error::io("cannot write the upload"))?;
            if upload.sha256 != expected {
                return Err(Error::refused(
                    Reason::ChecksumMismatch,
                    format!(
                        "the upload is corrupt: its sha256 is {} ({} bytes), but the header says {expected}",
                        upload.sha256, upload.size
                    ),
                ));
            }
            let report = inspect(&manifest, &upload)?;
            Ok(Staging {
                manifest_toml: header.manifest_toml,
                upload,
                state_version: report.state_version,
                signed,
            })
        };
        std::thread::Builder::new()
            .name("nine9s-inspect".into())
            .spawn(move || {
                let _permit = permit;
                let _ = done.send(inspect_upload());
            })
            .map_err(|e| status(Error::io("cannot start the upload's inspection")(e)))?;
        let inspected = inspection.await.map_err(|_| {
            status(Error::refused(
                Reason::Internal,
                "the upload's inspection ended without an answer",
            ))
        })?;
        let reply = self
            .command(Command::Stage(Box::new(inspected.map_err(status)?)), meta)
            .await?;
        let Reply::Staged {
            release,
            already_staged,
        } = reply
        else {
            return Err(Status::internal("Stage answered with another reply"));
        };
        Ok(Response::new(pb::StageReply {
            release: Some(release_pb(&release)),
            already_staged,
            signature_note: if unchecked {
                UNCHECKED_SIGNATURE.to_owned()
            } else {
                String::new()
            },
        }))
    }

    async fn list_releases(
        &self,
        _request: Request<pb::ListReleasesRequest>,
    ) -> Result<Response<pb::ListReleasesReply>, Status> {
        let releases = self.engine.releases().map_err(status)?;
        Ok(Response::new(pb::ListReleasesReply {
            releases: releases.iter().map(release_pb).collect(),
        }))
    }

    async fn upgrade(
        &self,
        request: Request<pb::TransitionRequest>,
    ) -> Result<Response<pb::TransitionReply>, Status> {
        self.switch(request, Direction::Up).await
    }

    async fn downgrade(
        &self,
        request: Request<pb::TransitionRequest>,
    ) -> Result<Response<pb::TransitionReply>, Status> {
        self.switch(request, Direction::Down).await
    }

    async fn rollback(
        &self,
        request: Request<pb::RollbackRequest>,
    ) -> Result<Response<pb::TransitionReply>, Status> {
        let identity = identity(&request)?;
        let meta = meta_of(&request, identity)?;
        let r = request.get_ref();
        let source = state_source(r.state)?;
        let reply = self
            .switching(
                Command::Rollback {
                    source,
                    dry_run: r.dry_run,
                    expected_canary: match r.expected_canary.as_str() {
                        "" => None,
                        text => Some(parse_version("expected_canary", text)?),
                    },
                },
                meta,
                r.lease(),
            )
            .await?;
        Ok(Response::new(transition_reply(reply)))
    }

    async fn make_permanent(
        &self,
        request: Request<pb::MakePermanentRequest>,
    ) -> Result<Response<pb::TransitionReply>, Status> {
        let identity = identity(&request)?;
        let meta = meta_of(&request, identity)?;
        let r = request.get_ref();
        let version = parse_version("version", &r.version)?;
        self.check_trusted(&version)?;
        let reply = self
            .switching(Command::MakePermanent { version }, meta, r.lease())
            .await?;
        Ok(Response::new(transition_reply(reply)))
    }

    async fn remove(
        &self,
        request: Request<pb::RemoveRequest>,
    ) -> Result<Response<pb::RemoveReply>, Status> {
        let identity = identity(&request)?;
        let meta = meta_of(&request, identity)?;
        let r = request.get_ref();
        let version = parse_version("version", &r.version)?;
        let Reply::Removed { release, collected } = self
            .switching(Command::Remove { version }, meta, r.lease())
            .await?
        else {
            return Err(Status::internal("Remove answered with another reply"));
        };
        Ok(Response::new(pb::RemoveReply {
            release: release.as_ref().map(release_pb),
            collected,
        }))
    }

    async fn status(
        &self,
        _request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusReply>, Status> {
        let status = self.engine.status().map_err(status)?;
        let text = |v: Option<Version>| v.map(|v| v.to_string()).unwrap_or_default();
        let soak = match &status.soak {
            Soak::Idle => pb::Soak {
                mode: pb::SoakMode::Idle.into(),
                ..Default::default()
            },
            Soak::Soaking { version, .. } => pb::Soak {
                mode: pb::SoakMode::Soaking.into(),
                version: version.to_string(),
                remaining_ms: status.soak_remaining.as_millis() as u64,
                ..Default::default()
            },
            Soak::Held { version } => pb::Soak {
                mode: pb::SoakMode::Held.into(),
                version: version.to_string(),
                ..Default::default()
            },
            Soak::RollingBack {
                version,
                reason,
                attempts,
                last_error,
            } => pb::Soak {
                mode: pb::SoakMode::RollingBack.into(),
                version: version.to_string(),
                remaining_ms: 0,
                reason: reason.clone(),
                attempts: *attempts,
                last_error: last_error.clone().unwrap_or_default(),
            },
        };
        Ok(Response::new(pb::StatusReply {
            active_version: status.active.to_string(),
            permanent_version: text(status.permanent),
            current_version: text(status.current),
            releases: status.releases.iter().map(release_pb).collect(),
            libraries: status
                .libraries
                .into_iter()
                .map(|l| pb::LoadedLibrary {
                    version: text(l.version),
                    path: l.path,
                    active: l.active,
                    in_flight: l.counters.in_flight,
                    served: l.counters.served,
                    errors: l.counters.errors,
                    lingering: l.lingering,
                    stuck: l.counters.stuck,
                    timed_out: l.counters.timed_out,
                    connections: l.counters.connections,
                })
                .collect(),
            uptime_ms: status.uptime.as_millis() as u64,
            soak: Some(soak),
            running: status.running.as_ref().map(transition_pb),
            last_event_id: status.last_event_id,
            store_error: status.store_error.unwrap_or_default(),
            last_checkpoint_ms: status.last_checkpoint_ms.unwrap_or(0),
            agent: Some(self.process()),
            served: crate::runtime::all_totals()
                .into_iter()
                .map(|totals| {
                    let served = totals.served();
                    pb::VersionServed {
                        version: totals.label.to_owned(),
                        requests: served.requests,
                        errors: served.errors,
                        p50_us: served.p50_us.unwrap_or(u64::MAX),
                        p99_us: served.p99_us.unwrap_or(u64::MAX),
                    }
                })
                .collect(),
            canary: self.engine.runtime().canary().map(|canary| {
                let counters = canary.loaded.counters();
                pb::Canary {
                    version: canary.loaded.version.to_string(),
                    split: Some(split_pb(&canary.split)),
                    served: counters.served,
                    errors: counters.errors,
                    in_flight: counters.in_flight,
                    stuck: counters.stuck,
                    timed_out: counters.timed_out,
                }
            }),
        }))
    }

    async fn history(
        &self,
        request: Request<pb::HistoryRequest>,
    ) -> Result<Response<pb::HistoryReply>, Status> {
        let r = request.into_inner();
        let (after, limit) = match (r.after_id, r.limit) {
            (None, limit) => (None, limit as usize),
            (Some(after), 0) => (Some(after), 100),
            (Some(after), limit) if limit <= MAX_PAGE => (Some(after), limit as usize),
            (_, limit) => {
                return Err(invalid(format!(
                    "limit {limit} is over the page size limit of {MAX_PAGE}"
                )))
            }
        };
        let (transitions, more) = self.engine.history(after, limit).map_err(status)?;
        Ok(Response::new(pb::HistoryReply {
            transitions: transitions.iter().map(transition_pb).collect(),
            more,
        }))
    }

    type WatchStream = EventStream;

    async fn watch(
        &self,
        request: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let identity = identity(&request)?;
        let watching = self.watches.open(&identity.name)?;
        let after = request.into_inner().after_id;
        // Subscribed before the backlog is read: nothing falls in between.
        let live = self.engine.subscribe();
        let (tx, rx) = mpsc::channel(WATCH_QUEUE);
        let (end, ended) = oneshot::channel();
        let engine = self.engine.clone();
        let stopped = self.stopped.clone();
        tokio::spawn(async move {
            if let Err(End::Refused(refused)) = follow(engine, after, live, &tx, stopped).await {
                let _ = end.send(refused);
            }
        });
        Ok(Response::new(Box::pin(Watching {
            events: ReceiverStream::new(rx),
            ended: Some(ended),
            done: false,
            _slot: watching,
        })))
    }

    async fn agent_info(
        &self,
        _request: Request<pb::AgentInfoRequest>,
    ) -> Result<Response<pb::AgentInfoReply>, Status> {
        let config = self.engine.config();
        Ok(Response::new(pb::AgentInfoReply {
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            abi_versions: nine9s_host::ABI_VERSIONS.to_vec(),
            service: self.engine.service().to_owned(),
            default_soak_ms: config.soak.as_millis() as u64,
            shutdown_grace_ms: config.shutdown_grace.as_millis() as u64,
            quiesce_timeout_ms: config.quiesce_timeout.as_millis() as u64,
            gate_timeout_ms: config.gate_timeout.as_millis() as u64,
            checkpoint_every_ms: config.checkpoint_every.as_millis() as u64,
            health_timeout_ms: config.health_timeout.as_millis() as u64,
            max_error_rate: config.max_error_rate,
            keep_old: config.keep_old.try_into().unwrap_or(u32::MAX),
            keep_history: config.keep_history.try_into().unwrap_or(u32::MAX),
            started_at_ms: self.engine.started_at_ms(),
            pid: std::process::id(),
            process: Some(self.process()),
        }))
    }

    async fn lease(
        &self,
        request: Request<pb::LeaseRequest>,
    ) -> Result<Response<pb::LeaseReply>, Status> {
        let identity = identity(&request)?;
        let r = request.into_inner();
        let Some(record) = &r.record else {
            return Err(invalid(
                "record: the rollout taking or giving back the lease is missing",
            ));
        };
        let report = rollout_report(record)?;
        // A flush: off the async threads' way.
        let record = if r.release {
            tokio::task::block_in_place(|| self.engine.give_back_lease(report))
        } else {
            if !LEASE_TTL.contains(&r.ttl_ms) {
                return Err(invalid(format!(
                    "ttl_ms {} is out of range: a lease holds 1 s to 1 hour without a renewal ({} to {} ms)",
                    r.ttl_ms,
                    LEASE_TTL.start(),
                    LEASE_TTL.end()
                )));
            }
            let take = lease::Take {
                report,
                ttl_ms: r.ttl_ms as i64,
                force: r.force,
                owner: identity.name,
            };
            tokio::task::block_in_place(|| self.engine.take_lease(take)).map(Some)
        }
        .map_err(status)?;
        Ok(Response::new(pb::LeaseReply {
            record: record.as_ref().map(rollout_pb),
        }))
    }

    async fn rollouts(
        &self,
        _request: Request<pb::RolloutsRequest>,
    ) -> Result<Response<pb::RolloutsReply>, Status> {
        let (holder, ended) = self.engine.rollouts();
        Ok(Response::new(pb::RolloutsReply {
            holder: holder.as_ref().map(rollout_pb),
            ended: ended.iter().map(rollout_pb).collect(),
        }))
    }

    async fn restart_agent(
        &self,
        request: Request<pb::RestartAgentRequest>,
    ) -> Result<Response<pb::RestartAgentReply>, Status> {
        let identity = identity(&request)?;
        let reason = request.into_inner().reason;
        let supervisor = self.engine.config().supervisor_pid;
        // Only the supervisor that started this worker.
        let asked = crate::process::ask_for_new_worker(supervisor, false)
            .map_err(|e| status(Error::io("cannot signal the supervisor")(e)))?;
        if !asked {
            return Err(status(Error::refused(
                Reason::NoSupervisor,
                "this agent runs without its supervisor (as `agent worker`), so nothing can start a new worker: restart it by hand",
            )));
        }
        tracing::info!(identity = %identity.name, %reason, ?supervisor, "agent restart requested: the supervisor starts a new worker");
        Ok(Response::new(pb::RestartAgentReply {
            worker_pid: std::process::id(),
            supervisor_pid: supervisor.unwrap_or_default(),
        }))
    }
}

/// How a watcher's stream ended early.
enum End {
    /// Its client went away.
    Gone,
    /// With this status, the last thing it sees.
    Refused(Status),
}

/// Sends a watcher every event after `after` — first those in the store, a
/// page at a time, then each new one — until it goes away, does not read
/// for [`WATCH_SEND_TIMEOUT`], or the agent stops. Only a page and the
/// watcher's queue are held, whatever the backlog.
async fn follow(
    engine: Engine,
    mut after: u64,
    mut live: broadcast::Receiver<Event>,
    tx: &mpsc::Sender<pb::Event>,
    mut stopped: watch::Receiver<bool>,
) -> Result<(), End> {
    let deliver = async |event: &Event| match tx
        .send_timeout(event_pb(event), WATCH_SEND_TIMEOUT)
        .await
    {
        Ok(()) => Ok(()),
        Err(mpsc::error::SendTimeoutError::Closed(_)) => Err(End::Gone),
        Err(mpsc::error::SendTimeoutError::Timeout(_)) => {
            tracing::warn!(
                timeout_ms = WATCH_SEND_TIMEOUT.as_millis() as u64,
                "a Watch stream whose client does not read its events was ended"
            );
            Err(End::Refused(status(Error::refused(
                Reason::WatcherTooSlow,
                format!(
                    "this watch did not read its events for {} s, so the agent ended it; watch again with --after the last event id seen",
                    WATCH_SEND_TIMEOUT.as_secs()
                ),
            ))))
        }
    };
    loop {
        // The store first, from the last event sent.
        loop {
            let page = engine
                .events_after(after, WATCH_PAGE)
                .map_err(|e| End::Refused(status(e)))?;
            let Some(last) = page.last().map(|e| e.id) else {
                break;
            };
            for event in &page {
                deliver(event).await?;
            }
            after = last;
        }
        // Then each new event, until this watcher falls behind.
        loop {
            if *stopped.borrow() {
                return Ok(());
            }
            tokio::select! {
                changed = stopped.changed() => if changed.is_err() {
                    return Ok(());
                },
                () = tx.closed() => return Err(End::Gone),
                received = live.recv() => match received {
                    Ok(event) => {
                        // Id 0: an event the store could not record; still news.
                        if event.id != 0 && event.id <= after {
                            continue;
                        }
                        after = after.max(event.id);
                        deliver(&event).await?;
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => break,
                    Err(broadcast::error::RecvError::Closed) => return Ok(()),
                },
            }
        }
    }
}

/// The `Watch` streams open per identity.
#[derive(Default, Clone)]
struct Watches(Arc<parking_lot::Mutex<HashMap<String, usize>>>);

impl Watches {
    /// A slot for a new stream of `name`'s, if it has fewer than
    /// [`MAX_WATCHES`] open.
    fn open(&self, name: &str) -> Result<WatchSlot, Status> {
        let mut open = self.0.lock();
        let count = open.entry(name.to_owned()).or_default();
        if *count >= MAX_WATCHES {
            return Err(status(Error::refused(
                Reason::TooManyWatches,
                format!(
                    "{name} has {MAX_WATCHES} Watch streams open, as many as one identity may; end one (or use one stream for several readers)"
                ),
            )));
        }
        *count += 1;
        Ok(WatchSlot {
            watches: self.clone(),
            name: name.to_owned(),
        })
    }
}

/// One open `Watch` stream, counted until its stream is dropped.
struct WatchSlot {
    watches: Watches,
    name: String,
}

impl Drop for WatchSlot {
    fn drop(&mut self) {
        let mut open = self.watches.0.lock();
        if let Some(count) = open.get_mut(&self.name) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.name);
            }
        }
    }
}

/// A `Watch` stream: the events `follow` queued, then the status it
/// ended with, if any — that one ahead of the events still queued.
struct Watching {
    events: ReceiverStream<pb::Event>,
    /// Until `follow` has ended.
    ended: Option<oneshot::Receiver<Status>>,
    done: bool,
    _slot: WatchSlot,
}

impl Stream for Watching {
    type Item = Result<pb::Event, Status>;

    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        if self.done {
            return std::task::Poll::Ready(None);
        }
        if let Some(ended) = &mut self.ended {
            if let std::task::Poll::Ready(ended) = Pin::new(ended).poll(cx) {
                self.ended = None;
                if let Ok(refused) = ended {
                    self.done = true;
                    return std::task::Poll::Ready(Some(Err(refused)));
                }
            }
        }
        Pin::new(&mut self.events)
            .poll_next(cx)
            .map(|event| event.map(Ok))
    }
}

fn transition_reply(reply: Reply) -> pb::TransitionReply {
    match reply {
        Reply::Switched {
            transition,
            plan,
            unchanged,
        } => {
            let (carried_state, snapshot_taken_at_ms, state_fallback) =
                match plan.as_ref().and_then(|p| p.state.clone()) {
                    None => (pb::CarriedState::Unspecified, 0, String::new()),
                    Some(CarriedState::Fresh) => (pb::CarriedState::None, 0, String::new()),
                    Some(CarriedState::Running) => (pb::CarriedState::Running, 0, String::new()),
                    Some(CarriedState::Snapshot {
                        taken_at_ms,
                        fallback,
                    }) => (
                        pb::CarriedState::Snapshot,
                        taken_at_ms,
                        fallback.unwrap_or_default(),
                    ),
                };
            pb::TransitionReply {
                transition: transition.as_ref().map(transition_pb),
                plan: plan.as_ref().map(plan_pb),
                unchanged,
                carried_state: carried_state.into(),
                snapshot_taken_at_ms,
                state_fallback,
            }
        }
        Reply::Staged { .. } | Reply::Removed { .. } => pb::TransitionReply::default(),
    }
}

fn state_pb(state: ReleaseState) -> pb::ReleaseState {
    match state {
        ReleaseState::Staged => pb::ReleaseState::Staged,
        ReleaseState::Current => pb::ReleaseState::Current,
        ReleaseState::Permanent => pb::ReleaseState::Permanent,
        ReleaseState::Old => pb::ReleaseState::Old,
        ReleaseState::Failed => pb::ReleaseState::Failed,
    }
}

fn release_pb(release: &Release) -> pb::Release {
    pb::Release {
        name: release.name.clone(),
        version: release.version.to_string(),
        state: state_pb(release.state).into(),
        sha256: release.sha256.clone(),
        size: release.size,
        staged_at_ms: release.staged_at_ms,
        state_version: release.state_version,
        routes: release.routes.clone(),
        permanent_since_ms: release.permanent_since_ms.unwrap_or(0),
        failure: release.failure.clone().unwrap_or_default(),
        signed_by: release.signed_by.clone().unwrap_or_default(),
    }
}

fn transition_pb(t: &Transition) -> pb::Transition {
    let text = |v: &Option<Version>| v.as_ref().map(|v| v.to_string()).unwrap_or_default();
    let kind = match t.kind {
        TransitionKind::Install => pb::TransitionKind::Install,
        TransitionKind::Stage => pb::TransitionKind::Stage,
        TransitionKind::Upgrade => pb::TransitionKind::Upgrade,
        TransitionKind::Downgrade => pb::TransitionKind::Downgrade,
        TransitionKind::Rollback => pb::TransitionKind::Rollback,
        TransitionKind::MakePermanent => pb::TransitionKind::MakePermanent,
        TransitionKind::Remove => pb::TransitionKind::Remove,
        TransitionKind::Restart => pb::TransitionKind::Restart,
        TransitionKind::Canary => pb::TransitionKind::Canary,
    };
    let result = match t.outcome {
        Outcome::Running => pb::TransitionResult::Running,
        Outcome::Ok => pb::TransitionResult::Ok,
        Outcome::Failed => pb::TransitionResult::Failed,
        Outcome::Aborted => pb::TransitionResult::Aborted,
    };
    pb::Transition {
        id: t.id,
        started_at_ms: t.started_at_ms,
        kind: kind.into(),
        from_version: text(&t.from),
        to_version: text(&t.to),
        result: result.into(),
        duration_us: t.duration_us,
        switch_wait_us: t.switch_wait_us,
        error: t.error.clone().unwrap_or_default(),
        automatic: t.automatic,
        reason: t.reason.clone().unwrap_or_default(),
        request_id: t.request_id.clone().unwrap_or_default(),
        error_reason: t
            .error_reason
            .map(|r| r.as_str().to_owned())
            .unwrap_or_default(),
        identity: t.identity.clone().unwrap_or_default(),
    }
}

fn plan_pb(report: &PlanReport) -> pb::Plan {
    let origin = match report.plan.origin {
        nine9s_manifest::PlanOrigin::Written => pb::PlanOrigin::Written,
        nine9s_manifest::PlanOrigin::Derived => pb::PlanOrigin::Derived,
    };
    pb::Plan {
        from_version: report.from.to_string(),
        to_version: report.to.to_string(),
        origin: origin.into(),
        steps: report
            .plan
            .steps
            .iter()
            .map(|step| {
                let (kind, hook) = match step {
                    Step::Load => (pb::StepKind::Load, String::new()),
                    Step::Migrate => (pb::StepKind::Migrate, String::new()),
                    Step::Switch => (pb::StepKind::Switch, String::new()),
                    Step::Hook(name) => (pb::StepKind::Hook, name.clone()),
                    Step::Drain => (pb::StepKind::Drain, String::new()),
                    Step::Unload => (pb::StepKind::Unload, String::new()),
                };
                pb::PlanStep {
                    kind: kind.into(),
                    hook,
                }
            })
            .collect(),
        checks: report.checks.clone(),
    }
}

fn event_pb(event: &Event) -> pb::Event {
    let kind = match event.kind {
        EventKind::TransitionStarted => pb::EventKind::TransitionStarted,
        EventKind::TransitionFinished => pb::EventKind::TransitionFinished,
        EventKind::ReleaseStateChanged => pb::EventKind::ReleaseStateChanged,
        EventKind::SoakStarted => pb::EventKind::SoakStarted,
        EventKind::SoakProgress => pb::EventKind::SoakProgress,
        EventKind::SoakPassed => pb::EventKind::SoakPassed,
        EventKind::SoakFailed => pb::EventKind::SoakFailed,
        EventKind::RollbackRetry => pb::EventKind::RollbackRetry,
        EventKind::AgentStarted => pb::EventKind::AgentStarted,
        EventKind::CheckpointSkipped => pb::EventKind::CheckpointSkipped,
        EventKind::AgentRestartFailed => pb::EventKind::AgentRestartFailed,
        EventKind::LeaseTaken => pb::EventKind::LeaseTaken,
        EventKind::LeaseReleased => pb::EventKind::LeaseReleased,
    };
    pb::Event {
        id: event.id,
        at_ms: event.at_ms,
        kind: kind.into(),
        transition: event.transition.as_ref().map(transition_pb),
        version: event
            .version
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default(),
        state: event.state.map_or(0, |s| state_pb(s).into()),
        soak_remaining_ms: event.soak_remaining_ms,
        message: event.message.clone().unwrap_or_default(),
    }
}
