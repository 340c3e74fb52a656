//! The line to the agent: one lazily connected client that sends the
//! bearer token with every call, unary calls retried on transport failures
//! (always with the same request, so the same request id: a retry never
//! acts twice; a request without an id only when it cannot have been
//! sent), and error statuses turned into `Failure`s carrying the agent's
//! stable reason code. A transport failure is looked at once more before
//! it is called unreachable: an https:// agent may have refused the client
//! certificate (`handshake.rs` reads its alert), an http:// URL may name
//! an agent that speaks TLS.

use std::future::Future;
use std::time::Duration;

use anyhow::anyhow;
use nine9s_proto as pb;
use pb::control_client::ControlClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Code, ConnectError, Status};
use tonic_types::StatusExt;

use crate::credentials::{unauthenticated_hint, Bearer, Connection, Line, TokenSource};
use crate::handshake;
use crate::Failure;

/// Tries after the first one, and the pause before the first retry (it
/// doubles each time).
const RETRIES: u32 = 3;
const FIRST_PAUSE: Duration = Duration::from_millis(200);

/// The reason code for `--expect-active` not matching.
const EXPECTED_ACTIVE_MISMATCH: &str = "EXPECTED_ACTIVE_MISMATCH";
/// The reason code for missing or unknown credentials.
const UNAUTHENTICATED: &str = "UNAUTHENTICATED";

/// A client whose every call carries the token.
pub type Client = ControlClient<InterceptedService<Channel, Bearer>>;

pub struct Agent {
    url: String,
    client: Client,
    token_source: TokenSource,
    /// For `reconnected`.
    line: Line,
    bearer: Bearer,
}

impl Agent {
    /// Connecting waits for the first call.
    pub fn new(connection: Connection) -> Agent {
        let Connection {
            url,
            line,
            bearer,
            token_source,
        } = connection;
        Agent {
            url,
            client: client(&line, &bearer),
            token_source,
            line,
            bearer,
        }
    }

    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// A client on a connection of its own, made at its first call: for a
    /// connection that stopped answering (the channel replaces a connection
    /// the agent closed by itself, but not one that hangs).
    pub fn reconnected(&self) -> Client {
        client(&self.line, &self.bearer)
    }

    /// Calls `rpc` with `request`, again with the same request after a
    /// transport failure; `what` names the call in errors.
    pub async fn call<Req, Rep, F, Fut>(
        &self,
        what: &str,
        request: Req,
        rpc: F,
    ) -> Result<Rep, Failure>
    where
        Req: Clone,
        F: Fn(Client, Req) -> Fut,
        Fut: Future<Output = Result<tonic::Response<Rep>, Status>>,
    {
        match self.call_retrying(request, rpc, is_transport).await {
            Ok(reply) => Ok(reply),
            Err(status) => Err(self.failure(what, status).await),
        }
    }

    /// As `call`, for a request the agent would act on twice (it carries
    /// no request id): retried only when it cannot have been sent, because
    /// no connection to the agent could be made.
    pub async fn call_unsent_retried<Req, Rep, F, Fut>(
        &self,
        what: &str,
        request: Req,
        rpc: F,
    ) -> Result<Rep, Failure>
    where
        Req: Clone,
        F: Fn(Client, Req) -> Fut,
        Fut: Future<Output = Result<tonic::Response<Rep>, Status>>,
    {
        match self.call_retrying(request, rpc, is_unsent).await {
            Ok(reply) => Ok(reply),
            Err(status) if is_transport(&status) && !is_unsent(&status) => {
                if let Some(failure) = self.diagnose(what, &status).await {
                    return Err(failure);
                }
                Err(Failure::Unreachable(anyhow!(
                    "{what}: the connection to the agent at {} broke before its answer: {}; \
                     it may have acted all the same: `ctl info` tells",
                    self.url,
                    with_causes(&status)
                )))
            }
            Err(status) => Err(self.failure(what, status).await),
        }
    }

    /// Calls `rpc`, again after a failure `retry` accepts; the last
    /// failure as it came.
    async fn call_retrying<Req, Rep, F, Fut>(
        &self,
        request: Req,
        rpc: F,
        retry: fn(&Status) -> bool,
    ) -> Result<Rep, Status>
    where
        Req: Clone,
        F: Fn(Client, Req) -> Fut,
        Fut: Future<Output = Result<tonic::Response<Rep>, Status>>,
    {
        let mut pause = FIRST_PAUSE;
        for _ in 0..RETRIES {
            match rpc(self.client(), request.clone()).await {
                Ok(reply) => return Ok(reply.into_inner()),
                Err(status) if retry(&status) => {
                    tokio::time::sleep(pause).await;
                    pause *= 2;
                }
                Err(status) => return Err(status),
            }
        }
        rpc(self.client(), request)
            .await
            .map(tonic::Response::into_inner)
    }

    /// An error status as one line: `<what>: <message>`, with the agent's
    /// reason code beside it.
    pub async fn failure(&self, what: &str, status: Status) -> Failure {
        if let Some(failure) = self.diagnose(what, &status).await {
            return failure;
        }
        if is_transport(&status) {
            return Failure::Unreachable(anyhow!(
                "{what}: cannot reach the agent at {}: {}",
                self.url,
                with_causes(&status)
            ));
        }
        let info = status.get_error_details().error_info().cloned();
        let mut message = status.message().to_owned();
        // Without credentials nothing else can work: say how to give them.
        if status.code() == Code::Unauthenticated
            || info.as_ref().is_some_and(|i| i.reason == UNAUTHENTICATED)
        {
            message.push_str(&format!(" ({})", unauthenticated_hint(&self.token_source)));
        }
        let Some(info) = info else {
            return Failure::Failed {
                error: anyhow!("{what}: {:?}: {message}", status.code()),
                reason: None,
            };
        };
        if info.reason == EXPECTED_ACTIVE_MISMATCH {
            let active = match info.metadata.get("active").cloned() {
                Some(active) => Some(active),
                None => self
                    .client()
                    .status(pb::StatusRequest {})
                    .await
                    .ok()
                    .map(|reply| reply.into_inner().active_version),
            };
            match active {
                Some(active) if !message.contains(&active) => {
                    message.push_str(&format!(" ({active} is active)"));
                }
                Some(_) => {}
                None => message.push_str(" (the active release could not be read)"),
            }
        }
        Failure::Failed {
            error: anyhow!("{what}: {message}"),
            reason: Some(info.reason),
        }
    }

    /// What a failure the agent sent no details with really was, when a
    /// look at the connection tells: a client certificate the agent
    /// refused, or none where it requires one (UNAUTHENTICATED, exit 1);
    /// TLS spoken where an http:// URL expected plaintext.
    pub async fn diagnose(&self, what: &str, status: &Status) -> Option<Failure> {
        if status.get_error_details().error_info().is_some() {
            return None;
        }
        match &self.line {
            Line::Tls { tls, .. } if is_transport(status) => {
                let refusal = tls.refusal().await?;
                Some(Failure::Failed {
                    error: anyhow!("{what}: {refusal}"),
                    reason: Some(UNAUTHENTICATED.to_owned()),
                })
            }
            // A TLS record read as HTTP/2 is "h2 protocol error".
            Line::Plain(_) if is_transport(status) || status.code() == Code::Internal => {
                let url: tonic::transport::Uri = self.url.parse().ok()?;
                let (host, port) = handshake::host_port(&url).ok()?;
                if !handshake::speaks_tls(&host, port).await {
                    return None;
                }
                let authority = url.authority().map_or(host.as_str(), |a| a.as_str());
                Some(Failure::Unreachable(anyhow!(
                    "{what}: the agent at {} speaks TLS: use --agent https://{authority} with --ca FILE (the CA that signed its certificate)",
                    self.url
                )))
            }
            _ => None,
        }
    }
}

fn client(line: &Line, bearer: &Bearer) -> Client {
    ControlClient::with_interceptor(line.channel(), bearer.clone())
        .max_decoding_message_size(64 * 1024 * 1024)
}

/// A status the agent did not send: the call may not have reached it, and
/// is safe to try again with the same request id.
pub fn is_transport(status: &Status) -> bool {
    let from_transport = match status.code() {
        Code::Unavailable => true,
        // A connection the agent closed (a TLS handshake it refused, say):
        // tonic's own error, with the transport's under it, or the call
        // cut short with it (ctl never cancels a call itself).
        Code::Unknown => std::error::Error::source(status).is_some(),
        Code::Cancelled => true,
        _ => false,
    };
    from_transport && status.get_error_details().error_info().is_none()
}

/// A call that never left: no connection could be made (refused, timed
/// out, a failed TLS handshake), so the agent cannot have seen it.
pub fn is_unsent(status: &Status) -> bool {
    let mut cause = std::error::Error::source(status);
    while let Some(e) = cause {
        if e.is::<ConnectError>() {
            return true;
        }
        cause = e.source();
    }
    false
}

/// The status's message and the errors under it (a connect error says
/// why only there: "connection refused").
pub fn with_causes(status: &Status) -> String {
    let mut line = status.message().to_owned();
    let mut cause = std::error::Error::source(status);
    while let Some(e) = cause {
        let text = e.to_string();
        if !line.contains(&text) {
            line.push_str(&format!(": {text}"));
        }
        cause = e.source();
    }
    line
}

/// A fresh request id: random when the system has a random source, else
/// from the time and the process id.
pub fn new_request_id() -> String {
    use std::io::Read;
    let mut bytes = [0u8; 12];
    let random = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes));
    if random.is_err() {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let mixed = nanos ^ (u128::from(std::process::id()) << 96);
        bytes.copy_from_slice(&mixed.to_le_bytes()[..12]);
    }
    format!("ctl-{}", hex::encode(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic_types::{ErrorDetails, StatusExt};

    #[test]
    fn only_statuses_the_agent_did_not_send_are_retried() {
        assert!(is_transport(&Status::unavailable("tcp connect error")));
        assert!(!is_transport(&Status::failed_precondition("no")));
        let agents = Status::with_error_details(
            Code::Unavailable,
            "the store cannot be written",
            ErrorDetails::with_error_info("STORE_UNAVAILABLE", "nine9s.dev", []),
        );
        assert!(!is_transport(&agents));
    }

    #[test]
    fn only_calls_without_a_connection_are_unsent() {
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let unsent = Status::from_error(Box::new(ConnectError(Box::new(refused))));
        assert!(is_transport(&unsent));
        assert!(is_unsent(&unsent));
        // A connection cut mid-call: the agent may have acted on it.
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        let cut = Status::from_error(Box::new(reset));
        assert!(is_transport(&cut));
        assert!(!is_unsent(&cut));
        assert!(!is_unsent(&Status::unavailable("tcp connect error")));
    }

    #[test]
    fn request_ids_are_fresh_and_valid() {
        let (a, b) = (new_request_id(), new_request_id());
        assert_ne!(a, b);
        assert!(crate::request_id(&a).is_ok());
    }
}
