//! Rollout leases (issue 20, item 2), the agent's side, over its gRPC API:
//! one rollout at a time holds an agent; while it does, another rollout
//! is refused (LEASE_HELD) and so is every switching command that is not
//! that rollout's (LEASED) unless forced, which the history records. The
//! lease holds until it is given back — across a crash, a restart and a
//! self-upgrade, and past its expiry — or is taken over by force.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use nine9s_proto::{
    EventKind, HistoryRequest, LeaseReply, LeaseRequest, Permanence, RollbackRequest,
    RolloutRecord, RolloutsReply, RolloutsRequest, TransitionRequest, WatchRequest,
};
use nine9s_tests::{eventually, reason, stage_sample, Agent, Api};
use tokio_stream::StreamExt;
use tonic::Code;

const CI: &str = "ci-0123456789abcdef0123";
const OPS: &str = "ops-0123456789abcdef0123";
const WATCHER: &str = "watcher-0123456789abcdef0123";

/// An agent whose tokens name `ci` and `ops` (deploy) and `watcher`
/// (read), with nine9s 0.2.0 staged.
fn agent(dir: &Path) -> Agent {
    let tokens = dir.join("tokens");
    std::fs::write(
        &tokens,
        format!("ci deploy {CI}\nops deploy {OPS}\nwatcher read {WATCHER}\n"),
    )
    .unwrap();
    std::fs::set_permissions(&tokens, std::fs::Permissions::from_mode(0o600)).unwrap();
    let agent = Agent::start(&dir.join("data"), &["--tokens", tokens.to_str().unwrap()]);
    stage_sample(&agent, "0.2.0");
    agent
}

fn record(id: &str, attempt: u32) -> RolloutRecord {
    RolloutRecord {
        rollout_id: id.into(),
        attempt,
        version: "0.2.0".into(),
        step: "canary".into(),
        agents_total: 4,
        agents_pending: 4,
        command: "ctl rollout --to 0.2.0".into(),
        ..Default::default()
    }
}

fn take(id: &str, ttl_ms: u64) -> LeaseRequest {
    LeaseRequest {
        record: Some(record(id, 1)),
        ttl_ms,
        ..Default::default()
    }
}

async fn lease(api: &mut Api, request: LeaseRequest) -> Result<LeaseReply, tonic::Status> {
    api.lease(request).await.map(tonic::Response::into_inner)
}

async fn rollouts(api: &mut Api) -> RolloutsReply {
    api.rollouts(RolloutsRequest {}).await.unwrap().into_inner()
}

fn upgrade(version: &str) -> TransitionRequest {
    TransitionRequest {
        version: version.into(),
        permanence: Permanence::Immediate.into(),
        ..Default::default()
    }
}

/// The ErrorInfo metadata of a refusal.
fn metadata(status: &tonic::Status) -> HashMap<String, String> {
    use tonic_types::StatusExt;
    status
        .get_details_error_info()
        .map(|info| info.metadata)
        .unwrap_or_default()
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// The messages of the events of `kind` kept so far.
async fn events(api: &mut Api, kind: EventKind, count: usize) -> Vec<String> {
    let mut stream = api
        .watch(WatchRequest { after_id: 0 })
        .await
        .unwrap()
        .into_inner();
    let mut seen = Vec::new();
    // The backlog comes from the store at once; the bound only fails a
    // test that would otherwise hang.
    while seen.len() < count {
        let event = tokio::time::timeout(Duration::from_secs(30), stream.next())
            .await
            .unwrap_or_else(|_| panic!("only {seen:?} of {count} {kind:?} events"))
            .unwrap()
            .unwrap();
        if event.kind() == kind {
            seen.push(event.message);
        }
    }
    seen
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lease_refuses_other_rollouts_and_commands_until_given_back() {
    let dir = tempfile::tempdir().unwrap();
    let agent = agent(dir.path());
    let (mut ci, mut ops) = (
        agent.api_with(Some(CI)).await,
        agent.api_with(Some(OPS)).await,
    );

    let held = lease(&mut ci, take("r1", 60_000))
        .await
        .unwrap()
        .record
        .unwrap();
    assert_eq!(
        (
            held.rollout_id.as_str(),
            held.owner.as_str(),
            held.ended_at_ms
        ),
        ("r1", "ci", 0)
    );
    assert_eq!(held.expires_at_ms, held.updated_at_ms + 60_000);
    assert_eq!(held.started_at_ms, held.updated_at_ms);
    assert_eq!(rollouts(&mut ops).await.holder, Some(held.clone()));

    // Another rollout is refused, naming the one holding the agent.
    let refused = lease(&mut ops, take("r2", 60_000)).await.unwrap_err();
    assert_eq!(
        (refused.code(), reason(&refused).as_str()),
        (Code::FailedPrecondition, "LEASE_HELD"),
        "{refused:?}"
    );
    let named = metadata(&refused);
    assert_eq!(named["rollout_id"], "r1");
    assert_eq!(named["owner"], "ci");
    assert_eq!(named["expires_at_ms"], held.expires_at_ms.to_string());
    assert!(
        refused
            .message()
            .starts_with("rollout r1 (attempt 1, by ci) holds this agent, its lease expires in"),
        "{}",
        refused.message()
    );

    // A command outside the rollout is refused and changes nothing.
    let transitions = agent.history().len();
    let refused = ops.upgrade(upgrade("0.2.0")).await.unwrap_err();
    assert_eq!(
        (refused.code(), reason(&refused).as_str()),
        (Code::FailedPrecondition, "LEASED"),
        "{refused:?}"
    );
    assert_eq!(metadata(&refused)["rollout_id"], "r1");
    assert!(
        refused
            .message()
            .contains("so this upgrade was not run: run it anyway with --force"),
        "{}",
        refused.message()
    );
    // So is one sent under a lease its rollout does not hold.
    let refused = ops
        .upgrade(TransitionRequest {
            lease: "r2".into(),
            ..upgrade("0.2.0")
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&refused), "LEASED");
    assert_eq!(metadata(&refused)["lease"], "r2");
    assert_eq!(agent.status()["active_version"], "0.1.0");
    assert_eq!(agent.history().len(), transitions);
    // A dry run changes nothing: never refused. Nor is a stage.
    let dry = ops
        .upgrade(TransitionRequest {
            dry_run: true,
            ..upgrade("0.2.0")
        })
        .await;
    assert!(dry.is_ok(), "{dry:?}");
    stage_sample(&agent, "0.3.0");

    // The rollout's own command runs.
    ci.upgrade(TransitionRequest {
        lease: "r1".into(),
        ..upgrade("0.2.0")
    })
    .await
    .unwrap();
    assert_eq!(agent.status()["active_version"], "0.2.0");

    // A forced one runs too, and its history says so.
    let forced = ops
        .upgrade(TransitionRequest {
            force: true,
            reason: "hotfix".into(),
            ..upgrade("0.3.0")
        })
        .await
        .unwrap()
        .into_inner()
        .transition
        .unwrap();
    assert_eq!(
        forced.reason,
        "hotfix (forced past rollout r1's lease, attempt 1 by ci)"
    );
    let last = ops
        .history(HistoryRequest::default())
        .await
        .unwrap()
        .into_inner()
        .transitions
        .pop()
        .unwrap();
    assert_eq!((last.id, last.reason), (forced.id, forced.reason));

    // The next attempt of the same rollout resumes it.
    let resumed = lease(
        &mut ci,
        LeaseRequest {
            record: Some(RolloutRecord {
                step: "wave 1 of 2".into(),
                agents_done: 1,
                ..record("r1", 2)
            }),
            ttl_ms: 60_000,
            ..Default::default()
        },
    )
    .await
    .unwrap()
    .record
    .unwrap();
    assert_eq!(
        (
            resumed.attempt,
            resumed.started_at_ms,
            resumed.step.as_str(),
            resumed.agents_done
        ),
        (2, held.started_at_ms, "wave 1 of 2", 1)
    );

    // Given back, it ends with its outcome, and anyone may act again.
    let give_back = LeaseRequest {
        record: Some(RolloutRecord {
            outcome: "converged".into(),
            ..record("r1", 2)
        }),
        release: true,
        ..Default::default()
    };
    let ended = lease(&mut ci, give_back.clone())
        .await
        .unwrap()
        .record
        .unwrap();
    assert_eq!(ended.outcome, "converged");
    assert!(ended.ended_at_ms >= resumed.updated_at_ms, "{ended:?}");
    let after = rollouts(&mut ops).await;
    assert_eq!((after.holder, after.ended), (None, vec![ended.clone()]));
    // Giving it back again is a retry: the same record.
    assert_eq!(
        lease(&mut ci, give_back).await.unwrap().record,
        Some(ended.clone())
    );
    ops.rollback(RollbackRequest::default()).await.unwrap();
    assert_eq!(agent.status()["active_version"], "0.2.0");

    let taken = events(&mut ops, EventKind::LeaseTaken, 2).await;
    assert_eq!(
        taken,
        [
            "rollout r1 (attempt 1, by ci) took the lease",
            "rollout r1 (attempt 2, by ci) took the lease again, resuming attempt 1"
        ]
    );
    let released = events(&mut ops, EventKind::LeaseReleased, 1).await;
    assert_eq!(
        released,
        ["rollout r1 (attempt 2, by ci) gave the lease back: converged"]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_expired_lease_holds_across_restarts_until_taken_over_by_force() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut agent = agent(dir.path());
    let mut ci = agent.api_with(Some(CI)).await;
    let held = lease(&mut ci, take("r1", 1_000))
        .await
        .unwrap()
        .record
        .unwrap();

    // Expired, it still holds the agent: against another rollout and
    // against commands.
    assert!(
        eventually(Duration::from_secs(30), || now_ms() > held.expires_at_ms),
        "the clock stands still"
    );
    let mut ops = agent.api_with(Some(OPS)).await;
    let refused = lease(&mut ops, take("r2", 60_000)).await.unwrap_err();
    assert_eq!(reason(&refused), "LEASE_HELD");
    assert!(
        refused.message().contains("its lease expired")
            && refused
                .message()
                .contains("re-run that rollout to resume it"),
        "{}",
        refused.message()
    );
    let refused = ops.upgrade(upgrade("0.2.0")).await.unwrap_err();
    assert_eq!(reason(&refused), "LEASED");
    assert!(
        refused.message().contains("its lease expired"),
        "{}",
        refused.message()
    );

    // It survives a crash and a self-upgrade.
    agent.kill9();
    agent = Agent::start(
        &data,
        &["--tokens", dir.path().join("tokens").to_str().unwrap()],
    );
    let mut ops = agent.api_with(Some(OPS)).await;
    assert_eq!(rollouts(&mut ops).await.holder, Some(held.clone()));
    let worker = agent.worker_pid();
    agent.ctl(&["agent", "restart", "--wait"]).ok();
    agent.new_worker(worker);
    let mut ops = agent.api_with(Some(OPS)).await;
    assert_eq!(rollouts(&mut ops).await.holder, Some(held.clone()));
    assert_eq!(
        reason(&ops.upgrade(upgrade("0.2.0")).await.unwrap_err()),
        "LEASED"
    );

    // Taken over by force: the old record ends, the new one says whose it was.
    let taken = lease(
        &mut ops,
        LeaseRequest {
            force: true,
            ..take("r2", 60_000)
        },
    )
    .await
    .unwrap()
    .record
    .unwrap();
    assert_eq!(
        (taken.owner.as_str(), taken.taken_from.as_str()),
        ("ops", "r1 attempt 1")
    );
    let now = rollouts(&mut ops).await;
    assert_eq!(now.holder, Some(taken));
    assert_eq!(
        (
            now.ended.len(),
            now.ended[0].rollout_id.as_str(),
            now.ended[0].outcome.as_str()
        ),
        (1, "r1", "taken over")
    );
    let messages = events(&mut ops, EventKind::LeaseTaken, 2).await;
    assert_eq!(
        messages[1],
        "rollout r2 (attempt 1, by ops) took the lease by force from rollout r1 (attempt 1, by ci)"
    );
    // The displaced rollout's commands are refused, naming the new holder.
    let mut ci = agent.api_with(Some(CI)).await;
    let refused = ci
        .upgrade(TransitionRequest {
            lease: "r1".into(),
            ..upgrade("0.2.0")
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&refused), "LEASED");
    assert_eq!(metadata(&refused)["rollout_id"], "r2");
    assert_eq!(agent.status()["active_version"], "0.1.0");
}

#[tokio::test(flavor = "multi_thread")]
async fn who_may_take_a_lease_and_what_a_lease_must_say() {
    let dir = tempfile::tempdir().unwrap();
    let agent = agent(dir.path());
    let mut watcher = agent.api_with(Some(WATCHER)).await;
    let refused = lease(&mut watcher, take("r1", 60_000)).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    // Reading them is for anyone who may read.
    assert_eq!(rollouts(&mut watcher).await, RolloutsReply::default());

    let mut ci = agent.api_with(Some(CI)).await;
    let with = |edit: fn(&mut LeaseRequest)| {
        let mut request = take("r1", 60_000);
        edit(&mut request);
        request
    };
    for (bad, field) in [
        (with(|r| r.record = None), "record"),
        (
            with(|r| r.record.as_mut().unwrap().rollout_id.clear()),
            "record.rollout_id",
        ),
        (
            with(|r| r.record.as_mut().unwrap().rollout_id = "r".repeat(65)),
            "record.rollout_id",
        ),
        (
            with(|r| r.record.as_mut().unwrap().rollout_id = "r 1".into()),
            "record.rollout_id",
        ),
        (
            with(|r| r.record.as_mut().unwrap().attempt = 0),
            "record.attempt",
        ),
        (
            with(|r| r.record.as_mut().unwrap().version = "latest".into()),
            "record.version",
        ),
        (
            with(|r| r.record.as_mut().unwrap().step = "s".repeat(257)),
            "record.step",
        ),
        (
            with(|r| r.record.as_mut().unwrap().outcome = "o".repeat(65)),
            "record.outcome",
        ),
        (
            with(|r| r.record.as_mut().unwrap().command = "c".repeat(1025)),
            "record.command",
        ),
        (with(|r| r.ttl_ms = 999), "ttl_ms"),
        (with(|r| r.ttl_ms = 3_600_001), "ttl_ms"),
    ] {
        let refused = lease(&mut ci, bad).await.unwrap_err();
        assert_eq!(
            (refused.code(), reason(&refused).as_str()),
            (Code::InvalidArgument, "INVALID_ARGUMENT"),
            "{field}: {refused:?}"
        );
        assert!(
            refused.message().starts_with(field),
            "{field}: {}",
            refused.message()
        );
    }
    let refused = ci
        .upgrade(TransitionRequest {
            lease: "r 1".into(),
            ..upgrade("0.2.0")
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    // Nothing was taken.
    assert_eq!(rollouts(&mut ci).await, RolloutsReply::default());
    // The limits themselves are fine.
    let mut edge = take(&"r".repeat(64), 3_600_000);
    edge.record.as_mut().unwrap().command = "c".repeat(1024);
    assert!(lease(&mut ci, edge).await.is_ok());
}
