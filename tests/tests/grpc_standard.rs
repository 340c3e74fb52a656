//! The standard gRPC services generic tools expect on the control port
//! (issue 10): `grpc.health.v1.Health` — what a Kubernetes gRPC probe
//! calls, with no token — and server reflection, so grpcurl-style tools
//! find the API without the .proto at hand.

use nine9s_tests::{on_0_2_0, self_signed_localhost, Agent};
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
use tonic_reflection::pb::v1::ServerReflectionRequest;

async fn channel(agent: &Agent) -> Channel {
    Channel::from_shared(agent.url())
        .unwrap()
        .connect()
        .await
        .unwrap()
}

fn check(service: &str) -> HealthCheckRequest {
    HealthCheckRequest {
        service: service.to_owned(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn health_answers_without_a_token_and_says_when_the_agent_stops() {
    let dir = tempfile::tempdir().unwrap();
    let agent = on_0_2_0(&dir.path().join("data"), &[], 1);
    // No authorization metadata at all: as a Kubernetes probe calls it.
    let mut health = HealthClient::new(channel(&agent).await);
    for service in ["", "nine9s.control.v1.Control"] {
        let reply = health.check(check(service)).await.unwrap().into_inner();
        assert_eq!(reply.status(), ServingStatus::Serving, "{service:?}");
    }
    let unknown = health.check(check("no.such.Service")).await.unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);
    // The rest of the API still wants a token.
    let status = agent
        .api_with(None)
        .await
        .status(nine9s_proto::StatusRequest {})
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated);

    // Watch: SERVING now, NOT_SERVING once the agent begins to stop.
    let mut watch = health
        .watch(check("nine9s.control.v1.Control"))
        .await
        .unwrap()
        .into_inner();
    let first = watch.next().await.unwrap().unwrap();
    assert_eq!(first.status(), ServingStatus::Serving);
    let pid = agent.pid();
    std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    let mut seen = Vec::new();
    while let Some(Ok(update)) = watch.next().await {
        seen.push(update.status());
        if update.status() == ServingStatus::NotServing {
            break;
        }
    }
    assert_eq!(seen.last(), Some(&ServingStatus::NotServing), "{seen:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn reflection_describes_the_api() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&dir.path().join("data"), &[]);
    let mut reflection = ServerReflectionClient::new(channel(&agent).await);
    let ask = |message| ServerReflectionRequest {
        host: String::new(),
        message_request: Some(message),
    };
    let mut replies = reflection
        .server_reflection_info(tokio_stream::iter([
            ask(MessageRequest::ListServices(String::new())),
            ask(MessageRequest::FileContainingSymbol(
                "nine9s.control.v1.Control".into(),
            )),
        ]))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) =
        replies.next().await.unwrap().unwrap().message_response
    else {
        panic!("no service list");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for expected in ["nine9s.control.v1.Control", "grpc.health.v1.Health"] {
        assert!(names.iter().any(|n| n == expected), "{names:?}");
    }
    let Some(MessageResponse::FileDescriptorResponse(files)) =
        replies.next().await.unwrap().unwrap().message_response
    else {
        panic!("no file descriptor");
    };
    // A serialized FileDescriptorProto: the package, the service and its
    // methods appear in it by name.
    let file = String::from_utf8_lossy(&files.file_descriptor_proto[0]).into_owned();
    for name in ["nine9s.control.v1", "Control", "Upgrade", "RestartAgent"] {
        assert!(file.contains(name), "{name} not described");
    }
}

/// `--health ADDR`: the health service alone, in plaintext and without a
/// token, beside a control plane that requires TLS and client
/// certificates: what a Kubernetes gRPC probe (plaintext only) can reach.
#[tokio::test(flavor = "multi_thread")]
async fn a_plaintext_health_port_beside_a_mutual_tls_control_plane() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed_localhost(dir.path());
    let agent = Agent::start(
        &dir.path().join("data"),
        &[
            "--health",
            "127.0.0.1:0",
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
            "--client-ca",
            cert.to_str().unwrap(),
        ],
    );
    let health_address = agent
        .ready_address("health")
        .unwrap_or_else(|| panic!("no health= in {:?}", agent.ready));
    let plaintext = |address: std::net::SocketAddr| async move {
        Channel::from_shared(format!("http://{address}"))
            .unwrap()
            .connect()
            .await
    };
    // The control port speaks only TLS: a plaintext call fails.
    if let Ok(channel) = plaintext(agent.grpc).await {
        let refused = HealthClient::new(channel).check(check("")).await;
        assert!(refused.is_err(), "plaintext answered on the TLS port");
    }
    // The health port answers in plaintext, with no token or certificate.
    let mut health = HealthClient::new(plaintext(health_address).await.unwrap());
    for service in ["", "nine9s.control.v1.Control"] {
        let reply = health.check(check(service)).await.unwrap().into_inner();
        assert_eq!(reply.status(), ServingStatus::Serving, "{service:?}");
    }
    // And nothing else is there.
    let mut control =
        nine9s_proto::control_client::ControlClient::new(plaintext(health_address).await.unwrap());
    let status = control
        .status(nine9s_proto::StatusRequest {})
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unimplemented);
    // It says when the agent begins to stop.
    let mut watch = health.watch(check("")).await.unwrap().into_inner();
    assert_eq!(
        watch.next().await.unwrap().unwrap().status(),
        ServingStatus::Serving
    );
    let pid = agent.pid();
    let stopper = std::thread::spawn(move || agent.terminate());
    let next = watch.next().await.unwrap().unwrap();
    assert_eq!(next.status(), ServingStatus::NotServing);
    assert_eq!(
        stopper.join().unwrap(),
        0,
        "agent {pid} did not stop cleanly"
    );
}

#[test]
fn unusable_tls_files_stop_the_agent_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "").unwrap();
    // Owner-only, as a key must be: what is refused here is its contents.
    std::fs::set_permissions(&empty, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let mut agent = std::process::Command::new(nine9s_tests::bin_dir().join("agent"))
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args(["--http", "127.0.0.1:0", "--grpc", "127.0.0.1:0"])
        .arg("--tls-cert")
        .arg(&empty)
        .arg("--tls-key")
        .arg(&empty)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Before the fix it printed "ready" and served HTTP without a control
    // plane, forever: it must end by itself.
    let ended = nine9s_tests::eventually(std::time::Duration::from_secs(30), || {
        agent.try_wait().unwrap().is_some()
    });
    if !ended {
        agent.kill().unwrap();
    }
    let out = agent.wait_with_output().unwrap();
    assert!(ended, "the agent kept running: {out:?}");
    assert_ne!(out.status.code(), Some(0), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--tls-cert"), "{stderr}");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("ready"));
}
