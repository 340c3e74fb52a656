//! The control plane as another orchestrator sees it: the gRPC API
//! directly, with the status codes it promises.

use nine9s_proto::control_client::ControlClient;
use nine9s_proto::{
    stage_chunk, HistoryRequest, Permanence, StageChunk, StageHeader, StatusRequest,
    TransitionKind, TransitionRequest, TransitionResult,
};
use nine9s_tests::{library, release_dir, Agent};
use sha2::{Digest, Sha256};
use tonic::transport::Channel;
use tonic::Code;

async fn client(agent: &Agent) -> ControlClient<Channel> {
    ControlClient::connect(format!("http://{}", agent.grpc))
        .await
        .expect("connect")
}

fn stage_chunks(manifest: &str, sha256: &str, bytes: &[u8]) -> Vec<StageChunk> {
    let mut chunks = vec![StageChunk {
        part: Some(stage_chunk::Part::Header(StageHeader {
            manifest_toml: manifest.to_owned(),
            sha256: sha256.to_owned(),
            size: bytes.len() as u64,
            ..Default::default()
        })),
    }];
    chunks.extend(bytes.chunks(64 * 1024).map(|c| StageChunk {
        part: Some(stage_chunk::Part::Data(c.to_vec())),
    }));
    chunks
}

fn hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn transition(version: &str) -> TransitionRequest {
    TransitionRequest {
        version: version.into(),
        permanence: Permanence::Immediate.into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn stage_upgrade_and_the_status_codes_of_refusals() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&dir.path().join("data"), &[]);
    let mut api = client(&agent).await;
    let manifest =
        std::fs::read_to_string(release_dir("nine9s-0.2.0").join("release.toml")).unwrap();
    let bytes = std::fs::read(library("nine9s_0_2_0")).unwrap();

    // A corrupted upload: the digest does not match the bytes.
    let mut corrupt = bytes.clone();
    corrupt[1000] ^= 0xff;
    let err = api
        .stage(tokio_stream::iter(stage_chunks(
            &manifest,
            &hex(&bytes),
            &corrupt,
        )))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("corrupt"), "{}", err.message());

    // A truncated upload.
    let mut chunks = stage_chunks(&manifest, &hex(&bytes), &bytes);
    chunks.pop();
    let err = api.stage(tokio_stream::iter(chunks)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("ended after"), "{}", err.message());

    // An unknown version, before anything is staged.
    let err = api.upgrade(transition("0.2.0")).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");

    let reply = api
        .stage(tokio_stream::iter(stage_chunks(
            &manifest,
            &hex(&bytes),
            &bytes,
        )))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.release.unwrap().version, "0.2.0");
    assert!(!reply.already_staged);

    // An illegal transition: a downgrade that goes up.
    let err = api.downgrade(transition("0.2.0")).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");

    let reply = api.upgrade(transition("0.2.0")).await.unwrap().into_inner();
    let t = reply.transition.unwrap();
    assert_eq!(
        (
            t.kind(),
            t.from_version.as_str(),
            t.to_version.as_str(),
            t.result()
        ),
        (
            TransitionKind::Upgrade,
            "0.1.0",
            "0.2.0",
            TransitionResult::Ok
        )
    );
    assert!(t.switch_wait_us < t.duration_us);
    assert_eq!(agent.get("/").body, "Hello world 2 !");

    let status = api.status(StatusRequest {}).await.unwrap().into_inner();
    assert_eq!(
        (
            status.active_version.as_str(),
            status.permanent_version.as_str()
        ),
        ("0.2.0", "0.2.0")
    );
    assert_eq!(status.libraries.len(), 1);
    assert!(status.libraries[0].active && status.libraries[0].served == 1);

    let history = api
        .history(HistoryRequest::default())
        .await
        .unwrap()
        .into_inner()
        .transitions;
    let ids: Vec<u64> = history.iter().map(|t| t.id).collect();
    assert!(
        ids.windows(2).all(|w| w[1] == w[0] + 1),
        "monotonic ids: {ids:?}"
    );
    let outcomes: Vec<(TransitionKind, TransitionResult)> =
        history.iter().map(|t| (t.kind(), t.result())).collect();
    use TransitionKind::*;
    assert_eq!(
        outcomes,
        [
            (Install, TransitionResult::Ok),
            (Stage, TransitionResult::Ok),
            (Upgrade, TransitionResult::Ok)
        ],
        "refusals that never started a transition are not in the history"
    );
}
