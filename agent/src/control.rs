//! The gRPC control plane. The only module that knows the generated proto
//! types: it converts requests into calls on the [`ReleaseHandler`] (on a
//! blocking thread: transitions flush to disk and load libraries) and
//! domain values and errors into replies and statuses.

use std::sync::Arc;

use nine9s_manifest::Version;
use nine9s_proto as pb;
use pb::control_server::{Control, ControlServer};
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use crate::error::Error;
use crate::model::{Release, ReleaseState, Transition};
use crate::release_handler::{Permanence, PlanReport, ReleaseHandler, StateSource, Switch};

/// Largest library `Stage` accepts.
const MAX_ARTIFACT: u64 = 512 * 1024 * 1024;

pub fn service(handler: Arc<ReleaseHandler>) -> ControlServer<ControlService> {
    ControlServer::new(ControlService { handler }).max_decoding_message_size(8 * 1024 * 1024)
}

pub struct ControlService {
    handler: Arc<ReleaseHandler>,
}

impl ControlService {
    /// Runs a handler operation on a blocking thread.
    async fn run<T: Send + 'static>(
        &self,
        op: impl FnOnce(&ReleaseHandler) -> Result<T, Error> + Send + 'static,
    ) -> Result<T, Status> {
        let handler = Arc::clone(&self.handler);
        tokio::task::spawn_blocking(move || op(&handler))
            .await
            .map_err(|e| Status::internal(format!("the operation crashed: {e}")))?
            .map_err(status)
    }

    /// Upgrade and Downgrade: the same request, another direction.
    async fn switch(
        &self,
        request: pb::TransitionRequest,
        op: fn(&ReleaseHandler, &Version, Permanence, bool) -> Result<Switch, Error>,
    ) -> Result<Response<pb::TransitionReply>, Status> {
        let version = parse_version(&request.version)?;
        let permanence = permanence(&request);
        let switch = self
            .run(move |h| op(h, &version, permanence, request.dry_run))
            .await?;
        Ok(Response::new(switch_pb(switch)))
    }
}

/// The one place an agent error becomes a gRPC status.
fn status(error: Error) -> Status {
    let message = error.to_string();
    match error {
        Error::UnknownVersion(_) => Status::not_found(message),
        Error::Precondition(_) | Error::NoMigrationPath { .. } => {
            Status::failed_precondition(message)
        }
        Error::Manifest(_) | Error::InvalidArtifact(_) => Status::invalid_argument(message),
        Error::Load { .. } => Status::failed_precondition(message),
        Error::Plugin { .. } | Error::QuiesceTimeout { .. } => Status::aborted(message),
        Error::Store(_) | Error::Io { .. } => Status::internal(message),
    }
}

fn parse_version(text: &str) -> Result<Version, Status> {
    Version::parse(text.trim()).map_err(|_| {
        Status::invalid_argument(format!(
            "{text:?} is not a version (expected something like 0.2.0)"
        ))
    })
}

fn permanence(request: &pb::TransitionRequest) -> Permanence {
    match request.permanence() {
        pb::Permanence::Immediate => Permanence::Immediate,
        pb::Permanence::Never => Permanence::Never,
        pb::Permanence::Soak => Permanence::Soak(
            (request.soak_ms > 0).then(|| std::time::Duration::from_millis(request.soak_ms)),
        ),
    }
}

#[tonic::async_trait]
impl Control for ControlService {
    async fn stage(
        &self,
        request: Request<Streaming<pb::StageChunk>>,
    ) -> Result<Response<pb::StageReply>, Status> {
        let mut stream = request.into_inner();
        let header = match stream.next().await {
            Some(Ok(pb::StageChunk {
                part: Some(pb::stage_chunk::Part::Header(header)),
            })) => header,
            Some(Err(e)) => return Err(e),
            _ => {
                return Err(Status::invalid_argument(
                    "the first Stage message must be the header",
                ))
            }
        };
        if header.size > MAX_ARTIFACT {
            return Err(Status::invalid_argument(format!(
                "the library is {} bytes; the limit is {MAX_ARTIFACT}",
                header.size
            )));
        }
        // Grown as chunks arrive: a header alone must not reserve the whole limit.
        let mut bytes = Vec::new();
        while let Some(chunk) = stream.next().await {
            match chunk?.part {
                Some(pb::stage_chunk::Part::Data(data)) => {
                    if bytes.len() as u64 + data.len() as u64 > header.size {
                        return Err(Status::invalid_argument(format!(
                            "more bytes than the {} the header announced",
                            header.size
                        )));
                    }
                    bytes.extend_from_slice(&data);
                }
                _ => return Err(Status::invalid_argument("only one Stage header is allowed")),
            }
        }
        if bytes.len() as u64 != header.size {
            return Err(Status::invalid_argument(format!(
                "the upload ended after {} of {} bytes",
                bytes.len(),
                header.size
            )));
        }
        let (release, already_staged) = self
            .run(move |h| h.stage(&header.manifest_toml, &header.sha256, &bytes))
            .await?;
        Ok(Response::new(pb::StageReply {
            release: Some(release_pb(&release)),
            already_staged,
        }))
    }

    async fn list_releases(
        &self,
        _request: Request<pb::ListReleasesRequest>,
    ) -> Result<Response<pb::ListReleasesReply>, Status> {
        let releases = self.run(|h| h.releases()).await?;
        Ok(Response::new(pb::ListReleasesReply {
            releases: releases.iter().map(release_pb).collect(),
        }))
    }

    async fn upgrade(
        &self,
        request: Request<pb::TransitionRequest>,
    ) -> Result<Response<pb::TransitionReply>, Status> {
        self.switch(request.into_inner(), ReleaseHandler::upgrade)
            .await
    }

    async fn downgrade(
        &self,
        request: Request<pb::TransitionRequest>,
    ) -> Result<Response<pb::TransitionReply>, Status> {
        self.switch(request.into_inner(), ReleaseHandler::downgrade)
            .await
    }

    async fn rollback(
        &self,
        request: Request<pb::RollbackRequest>,
    ) -> Result<Response<pb::TransitionReply>, Status> {
        let request = request.into_inner();
        let source = match request.state() {
            pb::StateSource::Migrate => StateSource::Migrate,
            pb::StateSource::Snapshot => StateSource::Snapshot,
        };
        let switch = self
            .run(move |h| h.rollback(source, request.dry_run))
            .await?;
        Ok(Response::new(switch_pb(switch)))
    }

    async fn make_permanent(
        &self,
        request: Request<pb::MakePermanentRequest>,
    ) -> Result<Response<pb::TransitionReply>, Status> {
        let version = parse_version(&request.into_inner().version)?;
        let transition = self.run(move |h| h.make_permanent(&version)).await?;
        Ok(Response::new(pb::TransitionReply {
            transition: Some(transition_pb(&transition)),
            plan: None,
        }))
    }

    async fn remove(
        &self,
        request: Request<pb::RemoveRequest>,
    ) -> Result<Response<pb::RemoveReply>, Status> {
        let version = parse_version(&request.into_inner().version)?;
        let (release, collected) = self.run(move |h| h.remove(&version)).await?;
        Ok(Response::new(pb::RemoveReply {
            release: Some(release_pb(&release)),
            collected,
        }))
    }

    async fn status(
        &self,
        _request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusReply>, Status> {
        let status = self.run(|h| h.status()).await?;
        let text = |v: Option<Version>| v.map(|v| v.to_string()).unwrap_or_default();
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
                })
                .collect(),
            uptime_ms: status.uptime.as_millis() as u64,
            soak_remaining_ms: status.soak_remaining.as_millis() as u64,
        }))
    }

    async fn history(
        &self,
        request: Request<pb::HistoryRequest>,
    ) -> Result<Response<pb::HistoryReply>, Status> {
        let limit = request.into_inner().limit as usize;
        let history = self.run(move |h| h.history(limit)).await?;
        Ok(Response::new(pb::HistoryReply {
            transitions: history.iter().map(transition_pb).collect(),
        }))
    }
}

fn release_pb(release: &Release) -> pb::Release {
    let state = match release.state {
        ReleaseState::Staged => pb::ReleaseState::Staged,
        ReleaseState::Current => pb::ReleaseState::Current,
        ReleaseState::Permanent => pb::ReleaseState::Permanent,
        ReleaseState::Old => pb::ReleaseState::Old,
        ReleaseState::Failed => pb::ReleaseState::Failed,
    };
    pb::Release {
        name: release.name.clone(),
        version: release.version.to_string(),
        state: state.into(),
        sha256: release.sha256.clone(),
        size: release.size,
        staged_at_ms: release.staged_at_ms,
        state_version: release.state_version,
        routes: release.routes.clone(),
    }
}

fn transition_pb(t: &Transition) -> pb::Transition {
    let text = |v: &Option<Version>| v.as_ref().map(|v| v.to_string()).unwrap_or_default();
    pb::Transition {
        id: t.id,
        started_at_ms: t.started_at_ms,
        kind: t.kind.to_string(),
        from_version: text(&t.from),
        to_version: text(&t.to),
        result: t.outcome.to_string(),
        duration_us: t.duration_us,
        switch_wait_us: t.switch_wait_us,
        error: t.error.clone().unwrap_or_default(),
        automatic: t.automatic,
        reason: t.reason.clone().unwrap_or_default(),
    }
}

fn plan_pb(report: &PlanReport) -> pb::Plan {
    pb::Plan {
        from_version: report.from.to_string(),
        to_version: report.to.to_string(),
        origin: report.plan.origin.to_string(),
        steps: report.plan.steps.iter().map(|s| s.to_string()).collect(),
        checks: report.checks.clone(),
    }
}

fn switch_pb(switch: Switch) -> pb::TransitionReply {
    pb::TransitionReply {
        transition: switch.transition.as_ref().map(transition_pb),
        plan: Some(plan_pb(&switch.plan)),
    }
}
