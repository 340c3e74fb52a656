//! For tests: a fake agent on a free port that fails transports on
//! purpose, refuses with ErrorInfo, and plays a script of events (breaking
//! the first Watch stream after one event), recording what ctl sent.

use std::pin::Pin;
use std::sync::{Arc, Mutex};

use nine9s_proto as pb;
use pb::control_server::{Control, ControlServer};
use tokio_stream::Stream;
use tonic::{Code, Request, Response, Status, Streaming};
use tonic_types::{ErrorDetails, StatusExt};

#[derive(Default)]
pub struct Script {
    /// Upgrades answered UNAVAILABLE (no ErrorInfo) before one succeeds.
    pub transport_failures: u32,
    /// Refuse every upgrade with this reason code.
    pub refuse_with: Option<&'static str>,
    /// What Watch plays, after the requested id.
    pub events: Vec<pb::Event>,
    pub last_event_id: u64,
}

#[derive(Default)]
pub struct Seen {
    pub upgrade_request_ids: Vec<String>,
    pub watch_after_ids: Vec<u64>,
}

struct Fake {
    script: Mutex<Script>,
    seen: Arc<Mutex<Seen>>,
}

/// Starts the fake agent; returns its URL and what it will have seen.
pub async fn start(script: Script) -> (String, Arc<Mutex<Seen>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Seen::default()));
    let fake = Fake {
        script: Mutex::new(script),
        seen: seen.clone(),
    };
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(ControlServer::new(fake))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    (url, seen)
}

fn unimplemented<T>() -> Result<Response<T>, Status> {
    Err(Status::unimplemented("not in the fake"))
}

#[tonic::async_trait]
impl Control for Fake {
    type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::Event, Status>> + Send>>;

    async fn stage(
        &self,
        _: Request<Streaming<pb::StageChunk>>,
    ) -> Result<Response<pb::StageReply>, Status> {
        unimplemented()
    }
    async fn list_releases(
        &self,
        _: Request<pb::ListReleasesRequest>,
    ) -> Result<Response<pb::ListReleasesReply>, Status> {
        unimplemented()
    }
    async fn upgrade(
        &self,
        request: Request<pb::TransitionRequest>,
    ) -> Result<Response<pb::TransitionReply>, Status> {
        let request = request.into_inner();
        self.seen
            .lock()
            .unwrap()
            .upgrade_request_ids
            .push(request.request_id);
        let mut script = self.script.lock().unwrap();
        if script.transport_failures > 0 {
            script.transport_failures -= 1;
            return Err(Status::unavailable("try again"));
        }
        if let Some(reason) = script.refuse_with {
            return Err(Status::with_error_details(
                Code::Aborted,
                "0.1.0 was expected to be active, but 0.3.0 is: nothing was done",
                ErrorDetails::with_error_info(reason, "nine9s.dev", []),
            ));
        }
        Ok(Response::new(pb::TransitionReply {
            transition: Some(pb::Transition {
                id: 7,
                kind: pb::TransitionKind::Upgrade.into(),
                from_version: "0.1.0".into(),
                to_version: request.version,
                result: pb::TransitionResult::Ok.into(),
                ..Default::default()
            }),
            ..Default::default()
        }))
    }
    async fn downgrade(
        &self,
        _: Request<pb::TransitionRequest>,
    ) -> Result<Response<pb::TransitionReply>, Status> {
        unimplemented()
    }
    async fn rollback(
        &self,
        _: Request<pb::RollbackRequest>,
    ) -> Result<Response<pb::TransitionReply>, Status> {
        unimplemented()
    }
    async fn make_permanent(
        &self,
        _: Request<pb::MakePermanentRequest>,
    ) -> Result<Response<pb::TransitionReply>, Status> {
        unimplemented()
    }
    async fn remove(
        &self,
        _: Request<pb::RemoveRequest>,
    ) -> Result<Response<pb::RemoveReply>, Status> {
        unimplemented()
    }
    async fn status(
        &self,
        _: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusReply>, Status> {
        Ok(Response::new(pb::StatusReply {
            active_version: "0.1.0".into(),
            permanent_version: "0.1.0".into(),
            last_event_id: self.script.lock().unwrap().last_event_id,
            ..Default::default()
        }))
    }
    async fn history(
        &self,
        _: Request<pb::HistoryRequest>,
    ) -> Result<Response<pb::HistoryReply>, Status> {
        unimplemented()
    }
    async fn watch(
        &self,
        request: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let after = request.into_inner().after_id;
        let first = {
            let mut seen = self.seen.lock().unwrap();
            seen.watch_after_ids.push(after);
            seen.watch_after_ids.len() == 1
        };
        let mut events: Vec<Result<pb::Event, Status>> = self
            .script
            .lock()
            .unwrap()
            .events
            .iter()
            .filter(|e| e.id > after)
            .cloned()
            .map(Ok)
            .collect();
        if first {
            events.truncate(1);
            events.push(Err(Status::unavailable("connection reset")));
        }
        // The stream stays open after the script, like the agent's.
        let stream =
            tokio_stream::StreamExt::chain(tokio_stream::iter(events), tokio_stream::pending());
        Ok(Response::new(Box::pin(stream)))
    }
    async fn agent_info(
        &self,
        _: Request<pb::AgentInfoRequest>,
    ) -> Result<Response<pb::AgentInfoReply>, Status> {
        unimplemented()
    }
}
