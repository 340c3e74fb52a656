//! Following the agent's lifecycle events: the stream that survives
//! disconnects (it resumes after the last event seen), `ctl watch`, and
//! `--wait` until a release is permanent or rolled back.

use std::time::Duration;

use anyhow::anyhow;
use nine9s_proto as pb;
use pb::{EventKind, ReleaseState, TransitionKind, TransitionResult};
use tonic::codec::Streaming;

use crate::rpc::{is_transport, with_causes, Agent};
use crate::{json, render, Failure, Output};

/// The longest pause between two reconnects.
const MAX_PAUSE: Duration = Duration::from_secs(5);

/// The agent's events after an id, reconnecting when the stream breaks.
struct Events<'a> {
    agent: &'a Agent,
    /// The last event seen: a new stream resumes after it.
    after: u64,
    stream: Option<Streaming<pb::Event>>,
    /// The pause before the next reconnect; zero while connected.
    pause: Duration,
}

impl<'a> Events<'a> {
    fn after(agent: &'a Agent, after: u64) -> Self {
        Events {
            agent,
            after,
            stream: None,
            pause: Duration::ZERO,
        }
    }

    async fn next(&mut self) -> Result<pb::Event, Failure> {
        loop {
            let stream = match &mut self.stream {
                Some(stream) => stream,
                None => {
                    let request = pb::WatchRequest {
                        after_id: self.after,
                    };
                    match self.agent.client().watch(request).await {
                        Ok(reply) => self.stream.insert(reply.into_inner()),
                        Err(status) if is_transport(&status) => {
                            self.broke(&with_causes(&status)).await;
                            continue;
                        }
                        Err(status) => {
                            return Err(self.agent.failure("watching events", status).await)
                        }
                    }
                }
            };
            let broken = match stream.message().await {
                Ok(Some(event)) => {
                    self.after = event.id;
                    self.pause = Duration::ZERO;
                    return Ok(event);
                }
                Ok(None) => "the agent closed the stream".to_owned(),
                Err(status) if !has_reason(&status) => with_causes(&status),
                Err(status) => return Err(self.agent.failure("watching events", status).await),
            };
            self.stream = None;
            self.broke(&broken).await;
        }
    }

    /// Says so on stderr (once per outage) and waits before reconnecting.
    async fn broke(&mut self, why: &str) {
        if self.pause.is_zero() {
            eprintln!(
                "ctl: lost the agent's events ({why}); reconnecting to resume after event {}",
                self.after
            );
            self.pause = Duration::from_millis(200);
        } else {
            self.pause = (self.pause * 2).min(MAX_PAUSE);
        }
        tokio::time::sleep(self.pause).await;
    }
}

fn has_reason(status: &tonic::Status) -> bool {
    use tonic_types::StatusExt;
    status.get_error_details().error_info().is_some()
}

/// `ctl watch`: every event, one line (or one JSON object) each, until
/// Ctrl-C or a closed stdout.
pub async fn watch(agent: &Agent, after: u64, output: Output) -> Result<(), Failure> {
    let mut events = Events::after(agent, after);
    loop {
        let event = tokio::select! {
            event = events.next() => event?,
            _ = tokio::signal::ctrl_c() => return Ok(()),
        };
        match output {
            Output::Json => outln!("{}", json::event(&event)),
            Output::Table => render::event(&event),
        }
    }
}

/// `--wait`: follows the events after `after` until `target` is permanent
/// (Ok, with the line to print) or left: rolled back by the health gate
/// (`Failure::RolledBack`), or switched away from, or given up on at a
/// restart (`Failure::Failed`).
pub async fn until_permanent(
    agent: &Agent,
    target: &str,
    after: u64,
    timeout: Option<Duration>,
) -> Result<String, Failure> {
    let follow = follow(agent, target, after);
    match timeout {
        None => follow.await,
        Some(limit) => tokio::time::timeout(limit, follow)
            .await
            .unwrap_or_else(|_| {
                Err(anyhow!(
                    "gave up waiting after {}: {target} is not permanent yet",
                    render::seconds(limit.as_millis() as u64)
                )
                .into())
            }),
    }
}

async fn follow(agent: &Agent, target: &str, after: u64) -> Result<String, Failure> {
    let mut events = Events::after(agent, after);
    // Why the release failed, once it did: the automatic rollback follows.
    let mut failed: Option<String> = None;
    loop {
        let event = events.next().await?;
        let about_target = event.version == target;
        match event.kind() {
            EventKind::ReleaseStateChanged if about_target => match event.state() {
                ReleaseState::Permanent => {
                    return Ok(format!("{target} is permanent after its soak"))
                }
                ReleaseState::Failed => {
                    failed.get_or_insert_with(|| or(&event.message, "it failed"));
                }
                _ => {}
            },
            EventKind::SoakFailed if about_target => {
                failed = Some(or(&event.message, "it failed its soak"));
            }
            EventKind::TransitionFinished => {
                let Some(t) = event.transition.as_ref() else {
                    continue;
                };
                if t.from_version != target
                    || t.to_version == target
                    || t.result() != TransitionResult::Ok
                {
                    continue;
                }
                if t.automatic && t.kind() == TransitionKind::Rollback {
                    let why = failed.unwrap_or_else(|| or(&t.reason, "it failed its soak"));
                    return Err(Failure::RolledBack(anyhow!(
                        "{target} was rolled back to {} by the health gate: {why}",
                        t.to_version
                    )));
                }
                return Err(anyhow!(
                    "{target} was left for {} ({}{}) before it became permanent",
                    t.to_version,
                    render::kind_name(t.kind()),
                    if t.request_id.is_empty() {
                        String::new()
                    } else {
                        format!(", request {}", t.request_id)
                    }
                )
                .into());
            }
            EventKind::AgentStarted if !about_target => {
                return Err(anyhow!(
                    "the agent restarted on {}; {target} is not permanent",
                    event.version
                )
                .into());
            }
            _ => {}
        }
    }
}

fn or(text: &str, default: &str) -> String {
    if text.is_empty() {
        default.to_owned()
    } else {
        text.to_owned()
    }
}
