//! Following the agent's lifecycle events: the stream that survives
//! disconnects (it resumes after the last event seen), `ctl watch`, and
//! `--wait` until a release is permanent or rolled back; and `ctl agent
//! restart --wait`, asking the agent until a new worker serves.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::anyhow;
use nine9s_proto as pb;
use pb::{EventKind, ReleaseState, TransitionKind, TransitionResult};
use tonic::codec::Streaming;
use tonic::{Code, Status};

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
                            // A refused client certificate is no outage.
                            if let Some(failure) =
                                self.agent.diagnose("watching events", &status).await
                            {
                                return Err(failure);
                            }
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
            Output::Json => json::print(&event),
            Output::Table => render::event(&event),
        }
    }
}

/// `--wait`: follows the events after `after` until `target` is permanent
/// (Ok, with the line to print) or left: rolled back by the health gate
/// (`Failure::RolledBack`), or switched away from, or given up on at a
/// restart (`Failure::Failed`). `soaking` hears the soak's time left as
/// the agent reports it (about once a second).
pub async fn until_permanent(
    agent: &Agent,
    target: &str,
    after: u64,
    timeout: Option<Duration>,
    soaking: &dyn Fn(Duration),
) -> Result<String, Failure> {
    let follow = follow(agent, target, after, soaking);
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

async fn follow(
    agent: &Agent,
    target: &str,
    after: u64,
    soaking: &dyn Fn(Duration),
) -> Result<String, Failure> {
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
            EventKind::SoakStarted | EventKind::SoakProgress if about_target => {
                soaking(Duration::from_millis(event.soak_remaining_ms));
            }
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

/// How often a plain line tells the soak's time left, when stderr is no
/// terminal (a terminal gets one live line).
const PLAIN_EVERY: Duration = Duration::from_secs(10);

/// What `--wait` shows on stderr while a soak runs: a live countdown on a
/// terminal, else a plain line when the soak starts and every 10 s.
pub struct Countdown {
    target: String,
    bar: Option<indicatif::ProgressBar>,
    last_line: std::cell::Cell<Option<Instant>>,
}

impl Countdown {
    pub fn new(target: &str) -> Countdown {
        use std::io::IsTerminal;
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new_spinner();
            bar.enable_steady_tick(Duration::from_millis(120));
            bar
        });
        Countdown {
            target: target.to_owned(),
            bar,
            last_line: std::cell::Cell::new(None),
        }
    }

    pub fn tick(&self, left: Duration) {
        let line = format!(
            "{} soaking: {} left",
            self.target,
            render::seconds(left.as_millis() as u64)
        );
        match &self.bar {
            Some(bar) => bar.set_message(line),
            None => {
                if self
                    .last_line
                    .get()
                    .is_none_or(|t| t.elapsed() >= PLAIN_EVERY)
                {
                    self.last_line.set(Some(Instant::now()));
                    eprintln!("ctl: {line}");
                }
            }
        }
    }
}

impl Drop for Countdown {
    fn drop(&mut self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// How often `ctl agent restart --wait` asks the agent.
const WORKER_POLL: Duration = Duration::from_millis(50);
/// How long one of those calls may take before it is given up, and asked
/// again on a new connection: a connection the old worker accepted but
/// will not answer on must not hold the wait up.
const WORKER_CALL_LIMIT: Duration = Duration::from_secs(5);
/// How long a new worker that serves may take to report its binary's
/// sha256 (it hashes it on a thread of its own as it starts) before the
/// wait ends without it.
const HASH_WAIT: Duration = Duration::from_secs(10);

/// `ctl agent restart --wait`: asks the agent (`AgentInfo`) until a worker
/// other than `old_worker` serves and knows its binary's sha256 (or
/// `HASH_WAIT` after it served), and returns it with when it was first
/// seen serving; `Failure::Failed` when
/// the agent reports a failed restart other than `failed_before` (the new
/// worker's exit and last stderr lines), after `limit`, or when the agent
/// refuses the question (credentials).
pub async fn until_new_worker(
    agent: &Agent,
    old_worker: u32,
    failed_before: Option<pb::FailedRestart>,
    limit: Duration,
) -> Result<(pb::AgentProcess, Instant), Failure> {
    // What the last call saw, for the message if the wait gives up.
    let mut seen = String::from("no answer yet");
    let poll = poll_worker(agent, old_worker, failed_before.as_ref(), &mut seen);
    match tokio::time::timeout(limit, poll).await {
        Ok(outcome) => outcome,
        Err(_) => Err(anyhow!(
            "gave up waiting after {}: no new worker serves yet (last: {seen}); \
             `ctl info` shows the serving worker",
            render::seconds(limit.as_millis() as u64)
        )
        .into()),
    }
}

async fn poll_worker(
    agent: &Agent,
    old_worker: u32,
    failed_before: Option<&pb::FailedRestart>,
    seen: &mut String,
) -> Result<(pb::AgentProcess, Instant), Failure> {
    let mut client = agent.client();
    let mut serving_since = None;
    loop {
        let call = client.agent_info(pb::AgentInfoRequest {});
        match tokio::time::timeout(WORKER_CALL_LIMIT, call).await {
            Ok(Ok(reply)) => {
                let process = process_of(reply.into_inner());
                if let Some(failed) = restart_failed(&process, failed_before) {
                    return Err(anyhow!("{}", did_not_restart(failed, &process, old_worker)).into());
                }
                seen.clear();
                if is_new_worker(&process, old_worker) {
                    let since = *serving_since.get_or_insert_with(Instant::now);
                    if !process.binary_sha256.is_empty() || since.elapsed() >= HASH_WAIT {
                        return Ok((process, since));
                    }
                    let _ = write!(
                        seen,
                        "worker {} serves; it is still hashing its binary",
                        process.worker_pid
                    );
                } else {
                    let _ = write!(seen, "worker {} still serves", process.worker_pid);
                }
            }
            Ok(Err(status)) if passes(&status) => {
                *seen = with_causes(&status);
                if is_transport(&status) {
                    client = agent.reconnected();
                }
            }
            Ok(Err(status)) => {
                return Err(agent.failure("waiting for the new worker", status).await)
            }
            Err(_) => {
                *seen = format!(
                    "the agent did not answer within {}",
                    render::seconds(WORKER_CALL_LIMIT.as_millis() as u64)
                );
                client = agent.reconnected();
            }
        }
        tokio::time::sleep(WORKER_POLL).await;
    }
}

/// The serving worker, from an agent that may predate `process`.
fn process_of(info: pb::AgentInfoReply) -> pb::AgentProcess {
    info.process.unwrap_or(pb::AgentProcess {
        agent_version: info.agent_version,
        worker_pid: info.pid,
        worker_started_at_ms: info.started_at_ms,
        ..Default::default()
    })
}

fn is_new_worker(process: &pb::AgentProcess, old_worker: u32) -> bool {
    process.worker_pid != 0 && process.worker_pid != old_worker
}

/// A worker restart that failed since `before` was reported.
fn restart_failed<'a>(
    process: &'a pb::AgentProcess,
    before: Option<&pb::FailedRestart>,
) -> Option<&'a pb::FailedRestart> {
    process
        .last_failed_restart
        .as_ref()
        .filter(|f| !f.supervisor && Some(*f) != before)
}

/// Why the restart did not happen, who serves, and the new worker's last
/// words.
fn did_not_restart(
    failed: &pb::FailedRestart,
    process: &pb::AgentProcess,
    old_worker: u32,
) -> String {
    let serving = if process.worker_pid == old_worker || process.worker_pid == 0 {
        format!("worker {old_worker} goes on serving")
    } else {
        format!(
            "worker {} took over, from the binary that served",
            process.worker_pid
        )
    };
    let mut message = format!(
        "the agent did not restart: the new worker (pid {}) {} before it served; {serving}",
        failed.pid, failed.exit
    );
    if failed.stderr.is_empty() {
        message.push_str(" (it wrote nothing on stderr)");
    } else {
        message.push_str(". Its last lines on stderr:");
        for line in &failed.stderr {
            let _ = write!(message, "\n  {line}");
        }
    }
    message
}

/// A failure that may pass while the workers hand over: the call did not
/// reach a worker, a worker going away cut it short, or the new worker is
/// not ready yet. Anything else (credentials, permissions) will not change.
fn passes(status: &Status) -> bool {
    is_transport(status)
        || matches!(
            status.code(),
            Code::Unavailable
                | Code::Unknown
                | Code::Internal
                | Code::Cancelled
                | Code::DeadlineExceeded
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_worker_is_another_live_one() {
        let worker = |pid| pb::AgentProcess {
            worker_pid: pid,
            ..Default::default()
        };
        assert!(!is_new_worker(&worker(1234), 1234));
        assert!(!is_new_worker(&worker(0), 1234));
        assert!(is_new_worker(&worker(5678), 1234));
    }

    #[test]
    fn an_agent_without_process_names_its_worker_by_pid() {
        let old = pb::AgentInfoReply {
            agent_version: "0.1.0".into(),
            pid: 1234,
            started_at_ms: 7,
            ..Default::default()
        };
        let p = process_of(old);
        assert_eq!((p.worker_pid, p.worker_started_at_ms), (1234, 7));
        assert_eq!(p.agent_version, "0.1.0");
        let new = pb::AgentInfoReply {
            pid: 1234,
            process: Some(pb::AgentProcess {
                worker_pid: 5678,
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(process_of(new).worker_pid, 5678);
    }

    #[test]
    fn a_restart_failed_is_one_not_seen_before_and_not_the_supervisors() {
        let failed = |pid, supervisor| pb::FailedRestart {
            pid,
            exit: "exited with code 3".into(),
            stderr: vec!["agent: error: broken".into()],
            at_ms: 7,
            supervisor,
        };
        let process = |f| pb::AgentProcess {
            worker_pid: 1234,
            last_failed_restart: f,
            ..Default::default()
        };
        assert!(restart_failed(&process(None), None).is_none());
        let seen = failed(5678, false);
        assert!(restart_failed(&process(Some(seen.clone())), Some(&seen)).is_none());
        assert!(restart_failed(&process(Some(failed(5679, false))), Some(&seen)).is_some());
        assert!(restart_failed(&process(Some(failed(5679, true))), None).is_none());
        let message = did_not_restart(&failed(5679, false), &process(None), 1234);
        assert!(
            message.contains("(pid 5679) exited with code 3")
                && message.contains("worker 1234 goes on serving")
                && message.ends_with("\n  agent: error: broken"),
            "{message}"
        );
    }

    #[test]
    fn what_passes_while_workers_hand_over() {
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        assert!(passes(&Status::from_error(Box::new(reset))));
        assert!(passes(&Status::unavailable("starting")));
        assert!(!passes(&Status::unauthenticated("who")));
        assert!(!passes(&Status::permission_denied("no")));
        assert!(!passes(&Status::unimplemented("old agent")));
    }
}
