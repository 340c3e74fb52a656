//! The control plane as another orchestrator sees it: the gRPC API
//! directly, with the status codes it promises.

use nine9s_proto::{
    HistoryRequest, Permanence, StatusRequest, TransitionKind, TransitionRequest, TransitionResult,
};
use nine9s_tests::{library, reason, release_dir, sha256_hex, stage_chunks, Agent, Api};
use tokio_stream::StreamExt;
use tonic::Code;

async fn client(agent: &Agent) -> Api {
    agent.api().await
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
            &sha256_hex(&bytes),
            &corrupt,
        )))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::DataLoss, "{err:?}");
    assert_eq!(reason(&err), "CHECKSUM_MISMATCH");
    assert!(err.message().contains("corrupt"), "{}", err.message());

    // A truncated upload.
    let mut chunks = stage_chunks(&manifest, &sha256_hex(&bytes), &bytes);
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
            &sha256_hex(&bytes),
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
    // 0.1.0 keeps no state: the switch holds no request (README), so no
    // time is reported held; the transition itself took some.
    assert_eq!((t.switch_wait_us, t.duration_us > 0), (0, true), "{t:?}");
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

async fn stage_sample_over_grpc(api: &mut Api, version: &str) {
    let dir = release_dir(&format!("nine9s-{version}"));
    let manifest = std::fs::read_to_string(dir.join("release.toml")).unwrap();
    let bytes = std::fs::read(library(&format!("nine9s_{}", version.replace('.', "_")))).unwrap();
    api.stage(tokio_stream::iter(stage_chunks(
        &manifest,
        &sha256_hex(&bytes),
        &bytes,
    )))
    .await
    .unwrap();
}

#[tokio::test]
async fn commands_an_orchestrator_can_retry_and_condition() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&dir.path().join("data"), &[]);
    let mut api = client(&agent).await;
    stage_sample_over_grpc(&mut api, "0.2.0").await;

    // A compare-and-set that does not hold changes nothing.
    let err = api
        .upgrade(TransitionRequest {
            expected_active: "0.3.0".into(),
            ..transition("0.2.0")
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Aborted, "{err:?}");
    assert_eq!(reason(&err), "EXPECTED_ACTIVE_MISMATCH");
    assert_eq!(agent.get("/").body, "Hello world!");

    // The same request id twice: one transition, the same answer.
    let request = TransitionRequest {
        request_id: "deploy-42".into(),
        expected_active: "0.1.0".into(),
        reason: "ticket 42".into(),
        ..transition("0.2.0")
    };
    let first = api.upgrade(request.clone()).await.unwrap().into_inner();
    let retry = api.upgrade(request.clone()).await.unwrap().into_inner();
    let (a, b) = (first.transition.unwrap(), retry.transition.unwrap());
    assert_eq!(a.id, b.id);
    assert_eq!(
        (a.reason.as_str(), a.request_id.as_str()),
        ("ticket 42", "deploy-42")
    );
    // Reusing the id for another command is refused.
    let err = api
        .downgrade(TransitionRequest {
            request_id: "deploy-42".into(),
            ..transition("0.1.0")
        })
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), reason(&err).as_str()),
        (Code::InvalidArgument, "REQUEST_ID_REUSED")
    );

    // Declarative callers converge: the active release again is "unchanged".
    let again = api.upgrade(transition("0.2.0")).await.unwrap().into_inner();
    assert!(again.unchanged && again.transition.is_none());

    // Out-of-range and unknown values are INVALID_ARGUMENT, never accepted.
    for bad in [
        TransitionRequest {
            permanence: 99,
            ..transition("0.2.0")
        },
        TransitionRequest {
            permanence: Permanence::Soak.into(),
            soak_ms: u64::MAX,
            ..transition("0.2.0")
        },
        TransitionRequest {
            request_id: "has spaces".into(),
            ..transition("0.2.0")
        },
    ] {
        let err = api.downgrade(bad).await.unwrap_err();
        assert_eq!(
            (err.code(), reason(&err).as_str()),
            (Code::InvalidArgument, "INVALID_ARGUMENT"),
            "{err:?}"
        );
    }
    let err = api
        .rollback(nine9s_proto::RollbackRequest {
            state: 7,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    let info = api
        .agent_info(nine9s_proto::AgentInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.service, "nine9s");
    assert_eq!(info.default_soak_ms, 5000);
    assert!(info.abi_versions.contains(&1));
}

#[tokio::test]
async fn the_event_stream_resumes_after_a_disconnect() {
    use nine9s_proto::{EventKind, ReleaseState, WatchRequest};
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&dir.path().join("data"), &[]);
    let mut api = client(&agent).await;
    let start = api
        .status(StatusRequest {})
        .await
        .unwrap()
        .into_inner()
        .last_event_id;
    stage_sample_over_grpc(&mut api, "0.2.0").await;

    let mut events = api
        .watch(WatchRequest { after_id: start })
        .await
        .unwrap()
        .into_inner();
    let first = events.next().await.unwrap().unwrap();
    assert_eq!(first.kind(), EventKind::TransitionStarted);
    assert_eq!(first.id, start + 1);
    drop(events);

    api.upgrade(transition("0.2.0")).await.unwrap();
    // Resuming after the last event seen: nothing lost, nothing twice.
    let mut events = api
        .watch(WatchRequest { after_id: first.id })
        .await
        .unwrap()
        .into_inner();
    let mut seen = vec![first];
    while let Ok(Some(event)) =
        tokio::time::timeout(std::time::Duration::from_secs(2), events.next()).await
    {
        seen.push(event.unwrap());
    }
    let ids: Vec<u64> = seen.iter().map(|e| e.id).collect();
    assert!(ids.windows(2).all(|w| w[1] == w[0] + 1), "{ids:?}");
    assert!(
        seen.iter()
            .any(|e| e.kind() == EventKind::ReleaseStateChanged
                && e.version == "0.2.0"
                && e.state() == ReleaseState::Permanent),
        "{seen:?}"
    );
    assert_eq!(
        seen.iter()
            .filter(|e| e.kind() == EventKind::TransitionFinished)
            .count(),
        2,
        "the stage and the upgrade"
    );
}

#[tokio::test]
async fn a_command_whose_client_gave_up_while_it_was_queued_never_runs() {
    let dir = tempfile::tempdir().unwrap();
    let agent = std::sync::Arc::new(Agent::start(&dir.path().join("data"), &[]));
    nine9s_tests::stage_fixture(&agent, "slow").ok();
    agent.ctl(&["upgrade", "--to", "0.2.6", "--permanent"]).ok();
    nine9s_tests::stage_sample(&agent, "0.3.0");
    nine9s_tests::stage_fixture(&agent, "bad-downgrade").ok();

    // A slow request keeps the next upgrade waiting to quiesce...
    let addr = agent.http;
    let slow = std::thread::spawn(move || nine9s_tests::get(addr, "/slow?ms=3000"));
    assert!(nine9s_tests::eventually(
        std::time::Duration::from_secs(5),
        || agent.status()["libraries"][0]["in_flight"] == 1
    ));
    let busy = {
        let agent = std::sync::Arc::clone(&agent);
        std::thread::spawn(move || agent.ctl(&["upgrade", "--to", "0.3.0", "--permanent"]))
    };
    assert!(nine9s_tests::eventually(
        std::time::Duration::from_secs(5),
        || !agent.status()["running"].is_null()
    ));
    // ...and this one queues behind it, and its client gives up.
    let mut api = client(&agent).await;
    let mut ghost = tonic::Request::new(TransitionRequest {
        request_id: "ghost-1".into(),
        ..transition("0.3.5")
    });
    ghost.set_timeout(std::time::Duration::from_millis(300));
    let err = api.upgrade(ghost).await.unwrap_err();
    assert!(
        matches!(err.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{err:?}"
    );
    busy.join().unwrap().ok();
    slow.join().unwrap();
    // Anything queued before this dry run has been handled when it answers.
    agent.ctl(&["downgrade", "--to", "0.2.6", "--dry-run"]).ok();
    assert_eq!(agent.status()["active_version"], "0.3.0");
    assert!(
        agent.history().iter().all(|t| t["request_id"] != "ghost-1"),
        "the ghost ran: {:?}",
        agent.history()
    );
}

/// Every event after `after`, as Watch gives them, until it has been
/// quiet for a moment.
async fn events_after(agent: &Agent, after: u64) -> Vec<nine9s_proto::Event> {
    let mut api = client(agent).await;
    let mut events = api
        .watch(nine9s_proto::WatchRequest { after_id: after })
        .await
        .unwrap()
        .into_inner();
    // Up to the newest event the agent reports (the stream stays open for
    // the ones to come). Not until a pause in the stream: 1.5 s of silence
    // also gave the store time to write them to disk, which hid events
    // lost by a kill -9 just after they were seen.
    let newest = agent.status()["last_event_id"].as_u64().unwrap();
    let mut seen: Vec<nine9s_proto::Event> = Vec::new();
    while seen.last().map_or(after, |e| e.id) < newest {
        let event = tokio::time::timeout(std::time::Duration::from_secs(30), events.next())
            .await
            .expect("the events up to the newest within 30 s")
            .expect("the stream goes on")
            .unwrap();
        seen.push(event);
    }
    seen
}

/// Issue 16, defect 4: every store open used to push event ids up by 2^20
/// and the next trim deleted every earlier event, so after any restart
/// `watch --after 0` returned one event and a follower resuming after the
/// last id it saw could miss the verdict it waited for. And events were
/// broadcast before they were on disk: a kill -9 just after took back the
/// last ones a watcher had seen.
#[tokio::test]
async fn events_survive_self_upgrades_crashes_and_restarts_without_gap_or_duplicate() {
    use nine9s_proto::EventKind;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut agent = Agent::start(&data, &[]);
    agent
        .ctl(&["stage", release_dir("nine9s-0.2.0").to_str().unwrap()])
        .ok();
    let mut history = events_after(&agent, 0).await;
    assert!(history.len() >= 3, "{history:?}");

    // One of each way the worker or the agent comes back.
    for way in ["self-upgrade", "kill -9", "clean stop"] {
        let seen = history.last().unwrap().id;
        agent = match way {
            "self-upgrade" => {
                agent.ctl(&["agent", "restart", "--wait"]).ok();
                agent
            }
            "kill -9" => {
                agent.kill9();
                Agent::start(&data, &[])
            }
            _ => {
                assert_eq!(agent.terminate(), 0);
                Agent::start(&data, &[])
            }
        };
        // Something happens after it comes back.
        let mut api = client(&agent).await;
        if way == "kill -9" {
            api.downgrade(transition("0.1.0")).await.unwrap();
        } else {
            api.upgrade(transition("0.2.0")).await.unwrap();
        }
        let all = events_after(&agent, 0).await;
        let ids: Vec<u64> = all.iter().map(|e| e.id).collect();
        assert!(
            ids.windows(2).all(|w| w[0] < w[1]),
            "after a {way}: {ids:?}"
        );
        assert!(
            all.len() > history.len(),
            "after a {way}, {} events where {} were: {ids:?}",
            all.len(),
            history.len()
        );
        // Nothing seen before is gone or changed its id.
        assert_eq!(
            all[..history.len()]
                .iter()
                .map(|e| (e.id, e.kind))
                .collect::<Vec<_>>(),
            history.iter().map(|e| (e.id, e.kind)).collect::<Vec<_>>(),
            "after a {way}"
        );
        // A follower resuming after the last event it saw gets exactly the
        // ones since, the new start among them.
        let resumed = events_after(&agent, seen).await;
        assert_eq!(resumed.as_slice(), &all[history.len()..], "after a {way}");
        assert!(
            resumed.iter().any(|e| e.kind() == EventKind::AgentStarted),
            "after a {way}: {resumed:?}"
        );
        history = all;
    }
}
