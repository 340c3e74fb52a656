//! The failure paths users install nine9s for, each a defect once
//! confirmed (issue 7): the permanent release and its state survive a
//! failed rollback, a failed automatic rollback is retried in plain sight,
//! a retried rollback never flips back, plugin code never holds the engine
//! or the traffic without a bound (nor a hung health check the soak of a
//! new instance of its version: issue 16), a crash while a release is
//! current counts against it, and a broken permanent release falls back
//! at boot.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use nine9s_proto::{Event, EventKind, WatchRequest};
use nine9s_tests::{
    eventually, hello, on_0_2_0, reason, stage_fixture, stage_sample, Agent, Api, SmallDisk,
};
use tokio_stream::StreamExt;

/// Runs `call` with a gRPC client of the agent, on a runtime of its own.
fn with_api<T>(agent: &Agent, call: impl AsyncFnOnce(Api) -> T) -> T {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async { call(agent.api().await).await })
}

/// The first event of `kind` after `after`, from the agent's Watch stream.
fn first_event(agent: &Agent, after: u64, kind: EventKind) -> Event {
    with_api(agent, async |mut api| {
        let mut events = api
            .watch(WatchRequest { after_id: after })
            .await
            .unwrap()
            .into_inner();
        let found = tokio::time::timeout(Duration::from_secs(20), async {
            while let Some(event) = events.next().await {
                let event = event.unwrap();
                if event.kind() == kind {
                    return event;
                }
            }
            panic!("the event stream ended");
        })
        .await;
        found.unwrap_or_else(|_| panic!("no {kind:?} event:\n{}", agent.log()))
    })
}

fn last(agent: &Agent) -> serde_json::Value {
    agent.history().pop().expect("a history")
}

#[test]
fn a_rollback_whose_down_migration_panics_restores_the_snapshot_and_keeps_the_permanent_release() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let agent = on_0_2_0(&data, &[], 3);
    stage_fixture(&agent, "bad-downgrade").ok();
    agent
        .ctl(&["upgrade", "--to", "0.3.5", "--soak", "10m"])
        .ok();
    hello(&agent, 2);
    assert_eq!(agent.get("/count").body, "5");

    let out = agent.ctl(&["rollback"]);
    assert_eq!(
        out.code, 0,
        "the rollback falls back to the snapshot: {out:?}"
    );
    let status = agent.status();
    assert_eq!(status["active_version"], "0.2.0");
    assert_eq!(status["permanent_version"], "0.2.0");
    assert_eq!(status["current_version"], "");
    assert_eq!(agent.release_state("0.2.0"), "permanent");
    assert_eq!(
        agent.release_state("0.3.5"),
        "old",
        "a manual rollback fails nobody"
    );
    // The snapshot taken when 0.2.0 was left: the 2 hellos on 0.3.5 are
    // what could not be carried down.
    assert_eq!(agent.get("/count").body, "3");
    let rollback = last(&agent);
    assert_eq!(rollback["kind"], "rollback");
    assert_eq!(rollback["result"], "ok");
    assert!(
        rollback["reason"]
            .as_str()
            .unwrap()
            .contains("restored the snapshot"),
        "{rollback}"
    );

    // And a restart comes back on it, with its state.
    assert_eq!(agent.terminate(), 0);
    let agent = Agent::start(&data, &[]);
    assert_eq!(agent.status()["permanent_version"], "0.2.0");
    assert_eq!(agent.get("/").body, "Hello world 2 !");
    assert_eq!(agent.get("/count").body, "4");
}

#[test]
fn a_failed_automatic_rollback_is_retried_in_plain_sight_until_it_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let agent = on_0_2_0(&dir.path().join("data"), &["--quiesce-timeout", "200ms"], 2);
    stage_fixture(&agent, "unhealthy").ok();
    agent
        .ctl(&["upgrade", "--to", "0.6.0", "--soak", "10m"])
        .ok();
    // A slow request makes 0.6.0 unhealthy and keeps its rollback from
    // quiescing for a while.
    let addr = agent.http;
    let slow = thread::spawn(move || nine9s_tests::get(addr, "/slow?ms=3000"));
    let mut seen = serde_json::Value::Null;
    assert!(
        eventually(Duration::from_secs(10), || {
            seen = agent.status()["soak"].clone();
            seen["mode"] == "rolling_back" && seen["attempts"].as_u64() >= Some(1)
        }),
        "no pending rollback shown: {seen}\n{}",
        agent.log()
    );
    assert!(
        seen["last_error"]
            .as_str()
            .unwrap()
            .contains("did not finish"),
        "{seen}"
    );
    assert_eq!(
        agent.status()["current_version"],
        "0.6.0",
        "still watched, still current"
    );
    assert_eq!(slow.join().unwrap().status, 200);
    assert!(
        eventually(Duration::from_secs(15), || agent.status()["active_version"]
            == "0.2.0"),
        "the rollback was not retried:\n{}",
        agent.log()
    );
    assert_eq!(agent.release_state("0.6.0"), "failed");
    assert_eq!(agent.status()["soak"]["mode"], "idle");
    let rollbacks: Vec<String> = agent
        .history()
        .iter()
        .filter(|t| t["kind"] == "rollback" && t["automatic"] == true)
        .map(|t| t["result"].as_str().unwrap().to_owned())
        .collect();
    assert!(rollbacks.len() >= 2, "{rollbacks:?}");
    assert_eq!(rollbacks.last().unwrap(), "ok");
    assert!(rollbacks[..rollbacks.len() - 1]
        .iter()
        .all(|r| r == "failed"));
}

#[test]
fn a_retried_rollback_never_flips_back() {
    let dir = tempfile::tempdir().unwrap();
    let agent = on_0_2_0(&dir.path().join("data"), &[], 0);
    stage_sample(&agent, "0.3.0");
    agent.ctl(&["upgrade", "--to", "0.3.0", "--permanent"]).ok();

    let first = agent.json(&["rollback", "--request-id", "rb-1"]);
    let again = agent.json(&["rollback", "--request-id", "rb-1"]);
    assert_eq!(first["transition"]["id"], again["transition"]["id"]);
    assert_eq!(agent.status()["active_version"], "0.2.0");

    // A new rollback goes further back, never forth to 0.3.0.
    let further = agent.json(&["rollback"]);
    assert_eq!(further["transition"]["to_version"], "0.1.0");
    let out = agent.ctl(&["rollback"]);
    assert_eq!(out.code, 1, "nothing older than 0.1.0: {out:?}");
    assert!(out.stderr.contains("NO_ROLLBACK_TARGET"), "{}", out.stderr);
    assert_eq!(agent.status()["active_version"], "0.1.0");
}

#[test]
fn a_hung_health_check_does_not_hold_up_a_rollback() {
    let dir = tempfile::tempdir().unwrap();
    let agent = on_0_2_0(&dir.path().join("data"), &["--health-timeout", "1h"], 1);
    stage_fixture(&agent, "hung-health").ok();
    agent
        .ctl(&["upgrade", "--to", "0.6.5", "--soak", "10m"])
        .ok();
    // Served once: its next health check hangs for a minute.
    hello(&agent, 1);
    assert!(eventually(Duration::from_secs(10), || agent
        .get("/hung")
        .body
        == "yes"));
    // The rollback answers while the health check hangs (well before the
    // minute is over).
    with_api(&agent, async |mut api| {
        let mut rollback = tonic::Request::new(nine9s_proto::RollbackRequest {
            reason: "health check hangs".into(),
            ..Default::default()
        });
        rollback.set_timeout(Duration::from_secs(20));
        api.rollback(rollback).await.unwrap();
    });
    assert_eq!(agent.get("/hung").release, "0.2.0");
    let rollback = last(&agent);
    assert_eq!(
        (
            &rollback["kind"],
            &rollback["automatic"],
            &rollback["reason"]
        ),
        (
            &serde_json::json!("rollback"),
            &serde_json::json!(false),
            &serde_json::json!("health check hangs")
        )
    );
    assert_eq!(agent.status()["active_version"], "0.2.0");
}

#[test]
fn a_fresh_soak_gets_its_verdict_while_a_hung_check_of_the_same_version_runs() {
    let dir = tempfile::tempdir().unwrap();
    let agent = on_0_2_0(&dir.path().join("data"), &["--health-timeout", "500ms"], 1);
    stage_fixture(&agent, "hung-health").ok();
    agent
        .ctl(&["upgrade", "--to", "0.6.5", "--soak", "10m"])
        .ok();
    // Served once: this instance's next health check hangs for a minute,
    // past the health timeout: the soak fails and rolls back.
    hello(&agent, 1);
    assert!(
        eventually(Duration::from_secs(20), || agent.release_state("0.6.5")
            == "failed"
            && agent.status()["active_version"] == "0.2.0"),
        "the hung check did not fail the soak:\n{}",
        agent.log()
    );
    // A new instance of 0.6.5 (it has served nothing: its checks answer)
    // soaks while the first one's check still hangs, and gets its verdict
    // long before that minute is over.
    agent
        .ctl(&["upgrade", "--to", "0.6.5", "--soak", "1s"])
        .ok();
    assert!(
        eventually(Duration::from_secs(20), || agent.status()
            ["permanent_version"]
            == "0.6.5"),
        "no verdict on the fresh soak: {}",
        agent.status()["soak"]
    );
    let passed = last(&agent);
    assert_eq!(
        (&passed["kind"], &passed["automatic"], &passed["result"]),
        (
            &serde_json::json!("make_permanent"),
            &serde_json::json!(true),
            &serde_json::json!("ok")
        ),
        "{passed}"
    );
}

#[test]
fn a_slow_request_never_stalls_traffic_behind_a_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&dir.path().join("data"), &["--checkpoint-every", "1s"]);
    stage_fixture(&agent, "slow").ok();
    agent.ctl(&["upgrade", "--to", "0.2.6", "--permanent"]).ok();
    let after = agent.status()["last_event_id"].as_u64().unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let slow = {
        let (addr, done) = (agent.http, Arc::clone(&done));
        thread::spawn(move || {
            let reply = nine9s_tests::get(addr, "/slow?ms=6000");
            done.store(true, Ordering::SeqCst);
            reply
        })
    };
    // A checkpoint comes, cannot quiesce, and is skipped — it does not wait.
    let skipped = first_event(&agent, after, EventKind::CheckpointSkipped);
    assert!(skipped.message.contains("still in flight"), "{skipped:?}");
    // Requests flow meanwhile.
    assert_eq!(agent.get("/").status, 200);
    assert!(
        !done.load(Ordering::SeqCst),
        "the slow request should still be running"
    );
    assert_eq!(slow.join().unwrap().status, 200);
}

#[test]
fn sigterm_stops_within_the_grace_period_with_a_slow_request_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let agent = on_0_2_0(&dir.path().join("data"), &["--shutdown-grace", "500ms"], 3);
    stage_fixture(&agent, "slow").ok();
    // The switch stores 0.2.6's starting state (the count, 3).
    agent.ctl(&["upgrade", "--to", "0.2.6", "--permanent"]).ok();
    let answered = Arc::new(AtomicBool::new(false));
    {
        let (addr, answered) = (agent.http, Arc::clone(&answered));
        thread::spawn(move || {
            let reply =
                nine9s_tests::Client::connect(addr).and_then(|mut c| c.get("/slow?ms=30000"));
            answered.store(reply.is_ok(), Ordering::SeqCst);
        });
    }
    assert!(eventually(Duration::from_secs(5), || {
        agent.status()["libraries"][0]["in_flight"] == 1
    }));
    let data = agent.data_dir.clone();
    assert_eq!(agent.terminate(), 0);
    assert!(
        !answered.load(Ordering::SeqCst),
        "the agent waited for the 30 s request instead of stopping after its grace period"
    );
    // The final checkpoint could not be taken; the last one stands.
    let agent = Agent::start(&data, &[]);
    assert_eq!(agent.get("/count").body, "3");
}

#[test]
fn an_agent_killed_while_a_release_is_current_counts_it_as_failed() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let agent = on_0_2_0(&data, &[], 1);
    stage_sample(&agent, "0.3.0");
    agent
        .ctl(&["upgrade", "--to", "0.3.0", "--no-permanent"])
        .ok();
    agent.kill9();
    let agent = Agent::start(&data, &[]);
    let release = agent.release("0.3.0").unwrap();
    assert_eq!(release["state"], "failed");
    assert!(
        release["failure"]
            .as_str()
            .unwrap()
            .contains("the agent died while 0.3.0 was current"),
        "{release}"
    );
    assert_eq!(agent.status()["active_version"], "0.2.0");
    let restart = last(&agent);
    assert_eq!(
        (&restart["kind"], &restart["result"]),
        (&"restart".into(), &"ok".into())
    );

    // A clean stop while current is not a failure.
    agent
        .ctl(&["upgrade", "--to", "0.3.0", "--no-permanent"])
        .ok();
    assert_eq!(agent.terminate(), 0);
    let agent = Agent::start(&data, &[]);
    assert_eq!(agent.release_state("0.3.0"), "old");
}

#[test]
fn a_permanent_release_that_no_longer_loads_falls_back_to_the_one_before() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let agent = on_0_2_0(&data, &[], 2);
    stage_sample(&agent, "0.3.0");
    agent.ctl(&["upgrade", "--to", "0.3.0", "--permanent"]).ok();
    let sha = agent.release("0.3.0").unwrap()["sha256"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(agent.terminate(), 0);
    std::fs::write(
        data.join("artifacts").join(format!("{sha}.so")),
        b"not a library any more",
    )
    .unwrap();

    let agent = Agent::start(&data, &[]);
    let status = agent.status();
    assert_eq!(status["active_version"], "0.2.0", "{status}");
    assert_eq!(status["permanent_version"], "0.2.0");
    assert_eq!(agent.release_state("0.3.0"), "failed");
    assert!(
        agent.log().contains("FELL BACK to 0.2.0"),
        "{}",
        agent.log()
    );
    let restart = last(&agent);
    assert!(
        restart["reason"].as_str().unwrap().contains("FELL BACK"),
        "{restart}"
    );
    // Its state: the snapshot taken when 0.2.0 was left.
    assert_eq!(agent.get("/count").body, "2");
}

#[test]
fn bad_flag_values_are_usage_errors_not_crashes() {
    let dir = tempfile::tempdir().unwrap();
    for flags in [
        ["--checkpoint-every", "0s"],
        ["--soak", "99999999999999999999h"],
        ["--max-error-rate", "7"],
        ["--quiesce-timeout", "0s"],
        ["--request-timeout", "5ms"],
        ["--request-timeout", "-1s"],
    ] {
        let out = std::process::Command::new(nine9s_tests::bin_dir().join("agent"))
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(flags)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flags:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{flags:?}: {stderr}");
    }
    let agent = Agent::start(&dir.path().join("data"), &[]);
    for args in [
        &[
            "upgrade",
            "--to",
            "0.2.0",
            "--soak",
            "99999999999999999999h",
        ][..],
        &["upgrade", "--to", "nine"],
        &["history", "--limit", "-1"],
    ] {
        let out = agent.ctl(args);
        assert_eq!(out.code, 2, "{args:?}: {out:?}");
        assert!(!out.stderr.contains("panicked"), "{args:?}: {out:?}");
    }
}

#[test]
fn a_closed_pipe_ends_ctl_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let agent = on_0_2_0(&dir.path().join("data"), &[], 0);
    let mut child = std::process::Command::new(nine9s_tests::bin_dir().join("ctl"))
        .args(["--agent", &agent.local(), "history"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // As `ctl history | head -0`: the reader is gone before ctl writes.
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.is_empty(), "{stderr}");
}

#[test]
fn a_dry_run_refuses_a_plan_whose_hook_does_not_exist() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&dir.path().join("data"), &[]);
    stage_fixture(&agent, "hooks").ok();
    let out = agent.ctl(&["upgrade", "--to", "0.2.5", "--dry-run"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr.contains("reticulate_splines") && out.stderr.contains("PLUGIN_FAILED"),
        "{}",
        out.stderr
    );
    assert_eq!(
        agent.release_state("0.2.5"),
        "staged",
        "a dry run fails nobody"
    );
}

#[test]
fn a_full_disk_loses_nothing_and_the_agent_recovers_by_itself() {
    let Some(disk) = SmallDisk::mount(64) else {
        eprintln!("skipped: mounting a small tmpfs needs root");
        return;
    };
    let data = disk.path().join("data");
    // No periodic checkpoint in the way: the test decides what writes when.
    let agent = on_0_2_0(&data, &["--checkpoint-every", "1d"], 3);
    // The test holds the agent's lease as a rollout would: its renewals
    // are the harmless writes below, and its commands go under it.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut api = runtime.block_on(agent.api());
    let lease = |release: bool| nine9s_proto::LeaseRequest {
        record: Some(nine9s_proto::RolloutRecord {
            rollout_id: "disk-test".into(),
            attempt: 1,
            version: "0.2.0".into(),
            agents_total: 1,
            outcome: if release {
                "converged".into()
            } else {
                String::new()
            },
            ..Default::default()
        }),
        ttl_ms: 600_000,
        release,
        ..Default::default()
    };
    runtime.block_on(api.lease(lease(false))).unwrap();
    disk.fill();
    // The store's file still ends in a partly written page that small
    // flushed writes fit in (every event is flushed as it is emitted, so
    // nothing waits in memory to overflow it): renewals of the lease, each
    // flushed, use it up until the store refuses one.
    runtime.block_on(async {
        for _ in 0..10_000 {
            if api.lease(lease(false)).await.is_err() {
                return;
            }
        }
        panic!("the store took 10,000 writes on a full disk");
    });

    // Staging checks the free space first, and leaves nothing behind.
    let out = stage_sample_result(&agent, "0.3.0");
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("DISK_FULL"), "{}", out.stderr);
    let debris: Vec<_> = std::fs::read_dir(data.join("artifacts"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().ends_with(".partial"))
        .collect();
    assert!(debris.is_empty(), "{debris:?}");

    // A transition that cannot be journalled: refused, and the store is
    // marked failed. Serving goes on, other transitions are refused with a
    // clear reason.
    let refused = runtime
        .block_on(api.remove(nine9s_proto::RemoveRequest {
            version: "0.1.0".into(),
            lease: "disk-test".into(),
            ..Default::default()
        }))
        .unwrap_err();
    assert_eq!(reason(&refused), "STORE_UNAVAILABLE", "{refused:?}");
    assert_ne!(agent.status()["store_error"], "");
    let refused = runtime
        .block_on(api.downgrade(nine9s_proto::TransitionRequest {
            version: "0.1.0".into(),
            lease: "disk-test".into(),
            ..Default::default()
        }))
        .unwrap_err();
    assert_eq!(reason(&refused), "STORE_UNAVAILABLE", "{refused:?}");
    assert!(
        refused.message().contains("keeps serving 0.2.0"),
        "{refused:?}"
    );
    hello(&agent, 2);
    assert_eq!(agent.get("/").body, "Hello world 2 !");
    assert_eq!(agent.get("/count").body, "6");

    // Room again: the next command finds the store working again.
    disk.free();
    stage_sample(&agent, "0.3.0");
    assert_eq!(agent.status()["store_error"], "");
    runtime.block_on(api.lease(lease(true))).unwrap();
    assert_eq!(
        agent.release_state("0.1.0"),
        "old",
        "the refused remove did nothing"
    );

    // And the state served meanwhile survives a restart.
    assert_eq!(agent.terminate(), 0);
    let agent = Agent::start(&data, &[]);
    assert_eq!(agent.status()["permanent_version"], "0.2.0");
    assert_eq!(agent.get("/count").body, "6");
    assert_eq!(agent.release_state("0.3.0"), "staged");
    drop(agent);
}

/// `ctl stage` of a sample release, whatever its outcome.
fn stage_sample_result(agent: &Agent, version: &str) -> nine9s_tests::Ctl {
    let lib = nine9s_tests::library(&format!("nine9s_{}", version.replace('.', "_")));
    let dir = nine9s_tests::release_dir(&format!("nine9s-{version}"));
    agent.ctl(&[
        "stage",
        dir.to_str().unwrap(),
        "--library",
        lib.to_str().unwrap(),
    ])
}

#[test]
fn a_retry_after_a_crash_finds_the_command_it_retries() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let agent = on_0_2_0(&data, &[], 0);
    stage_sample(&agent, "0.3.0");
    agent.ctl(&["upgrade", "--to", "0.3.0", "--permanent"]).ok();
    assert_eq!(agent.terminate(), 0);

    // The worker dies right after committing the rollback, before it
    // answers; ctl's own retry (same id) reaches the next worker, which
    // answers with the rollback that happened.
    let agent = Agent::start_with_env(&data, &[], &[("NINE9S_CRASH_AT", "switch:committed")]);
    let out = agent.ctl(&["rollback", "--request-id", "rb-crash"]);
    assert!(agent.wait_for_crash(Duration::from_secs(10)));
    if out.code == 0 {
        assert!(out.stdout.contains("0.3.0 -> 0.2.0"), "{out:?}");
    }
    drop(agent);

    // The orchestrator retries with the same id: it gets the rollback that
    // happened, and nothing runs a second time (that would go to 0.1.0).
    let agent = Agent::start(&data, &[]);
    let retry = agent.json(&["rollback", "--request-id", "rb-crash"]);
    assert_eq!(
        (
            &retry["transition"]["to_version"],
            &retry["transition"]["request_id"]
        ),
        (&"0.2.0".into(), &"rb-crash".into()),
        "{retry}"
    );
    assert_eq!(agent.status()["active_version"], "0.2.0");
    let rollbacks = agent
        .history()
        .iter()
        .filter(|t| t["kind"] == "rollback")
        .count();
    assert_eq!(rollbacks, 1);
}

/// Issue 16, defect 3: a request id whose transition was trimmed from the
/// history (`--keep-history`) ran its command again — a retried rollback
/// went two releases back.
#[test]
fn a_retried_rollback_trimmed_from_the_history_is_answered_not_run_again() {
    let dir = tempfile::tempdir().unwrap();
    let agent = on_0_2_0(&dir.path().join("data"), &["--keep-history", "1"], 0);
    stage_sample(&agent, "0.3.0");
    agent.ctl(&["upgrade", "--to", "0.3.0", "--permanent"]).ok();
    let first = agent.json(&["rollback", "--request-id", "rb-trim"]);
    assert_eq!(first["transition"]["to_version"], "0.2.0", "{first}");
    // Another transition pushes the rollback out of the history.
    stage_fixture(&agent, "hooks").ok();
    assert!(agent.history().iter().all(|t| t["request_id"] != "rb-trim"));

    let again = agent.json(&["rollback", "--request-id", "rb-trim"]);
    assert_eq!(
        again["transition"]["id"], first["transition"]["id"],
        "{again}"
    );
    assert_eq!(agent.status()["active_version"], "0.2.0");
}

/// Issue 16, defect 3: a retry of a transition the agent's stop cut short
/// (recorded `aborted`) ran the command again; it is answered instead.
#[test]
fn a_retried_command_whose_transition_was_cut_short_is_not_run_again() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let agent = on_0_2_0(&data, &[], 0);
    stage_sample(&agent, "0.3.0");
    agent.ctl(&["upgrade", "--to", "0.3.0", "--permanent"]).ok();
    assert_eq!(agent.terminate(), 0);

    // The worker dies in the middle of the rollback, before it commits.
    let agent = Agent::start_with_env(&data, &[], &[("NINE9S_CRASH_AT", "switch:quiesced")]);
    agent.ctl(&["rollback", "--request-id", "rb-cut"]);
    assert!(agent.wait_for_crash(Duration::from_secs(10)));
    drop(agent);

    let agent = Agent::start(&data, &[]);
    let retry = agent.ctl(&["rollback", "--request-id", "rb-cut"]);
    assert_eq!(retry.code, 1, "{retry:?}");
    assert!(
        retry.stderr.contains("TRANSITION_ABORTED"),
        "{}",
        retry.stderr
    );
    assert_eq!(agent.status()["active_version"], "0.3.0");
    let rollbacks: Vec<_> = agent
        .history()
        .into_iter()
        .filter(|t| t["kind"] == "rollback")
        .map(|t| t["result"].clone())
        .collect();
    assert_eq!(rollbacks, ["aborted"]);

    // A dry run never shares an outcome with the command it rehearses.
    let dry = agent.ctl(&["rollback", "--dry-run", "--request-id", "rb-cut"]);
    assert!(dry.stderr.contains("REQUEST_ID_REUSED"), "{dry:?}");
}

/// Issue 17, item 10: a release that behaved in the disposable rehearsal
/// but killed the serving worker while it was switched to stayed `staged`
/// (only its transition was recorded aborted). The next worker serves the
/// release before it with its last checkpoint and fails the one that
/// crashed; the command retried with its request id does not run again.
#[test]
fn a_release_that_kills_the_worker_during_its_switch_is_failed() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // The fixture's init segfaults in the process whose pid this file holds.
    let crash_pid = dir.path().join("crash-pid");
    let env = [("NINE9S_FIXTURE_CRASH_PID_FILE", crash_pid.to_str().unwrap())];
    let agent = Agent::start_with_env(&data, &[], &env);
    stage_sample(&agent, "0.2.0");
    agent.ctl(&["upgrade", "--to", "0.2.0", "--permanent"]).ok();
    stage_fixture(&agent, "segfault").ok();
    hello(&agent, 3);
    // A clean stop checkpoints 3; what the next run counts is never saved.
    assert_eq!(agent.terminate(), 0);
    let agent = Agent::start_with_env(&data, &[], &env);
    hello(&agent, 2);

    let worker = agent.worker_pid();
    std::fs::write(&crash_pid, worker.to_string()).unwrap();
    let upgrade = ["upgrade", "--to", "0.2.8", "--request-id", "up-crash"];
    let out = agent.ctl(&upgrade);
    assert_eq!(out.code, 1, "{out:?}");
    let worker = agent.new_worker(worker);
    // A second run of the switch would kill this worker too.
    std::fs::write(&crash_pid, worker.to_string()).unwrap();

    let status = agent.status();
    assert_eq!(
        (&status["active_version"], &status["permanent_version"]),
        (&"0.2.0".into(), &"0.2.0".into()),
        "{status}"
    );
    assert_eq!(agent.get("/count").body, "3");
    let release = agent.release("0.2.8").unwrap();
    assert_eq!(
        release["state"],
        "failed",
        "{release}\nlog:\n{}",
        agent.log()
    );
    assert!(
        release["failure"]
            .as_str()
            .unwrap()
            .contains("killed by SIGSEGV while switching to 0.2.8"),
        "{release}"
    );

    let retry = agent.ctl(&upgrade);
    assert_eq!(retry.code, 1, "{retry:?}");
    assert!(retry.stderr.contains("TRANSITION_ABORTED"), "{retry:?}");
    assert_eq!(agent.worker_pid(), worker);
    assert_eq!(agent.status()["active_version"], "0.2.0");
}

/// Issue 16, defect 8: a release whose `snapshot()` fails was made
/// permanent anyway, and its state was then never saved. Its soak fails
/// instead (making it permanent needs its state saved), and it is rolled
/// back.
#[test]
fn a_release_whose_snapshot_fails_during_its_soak_fails_it() {
    let dir = tempfile::tempdir().unwrap();
    let agent = on_0_2_0(&dir.path().join("data"), &[], 3);
    stage_fixture(&agent, "segfault").ok();
    agent
        .ctl(&["upgrade", "--to", "0.2.8", "--soak", "2s"])
        .ok();
    assert_eq!(agent.get("/break-snapshot").status, 200);
    hello(&agent, 2);
    assert!(
        eventually(Duration::from_secs(20), || agent.release_state("0.2.8")
            == "failed"),
        "{}",
        agent.log()
    );
    let status = agent.status();
    assert_eq!(
        (&status["active_version"], &status["permanent_version"]),
        (&"0.2.0".into(), &"0.2.0".into()),
        "{status}"
    );
    let release = agent.release("0.2.8").unwrap();
    assert!(
        release["failure"].as_str().unwrap().contains("snapshot"),
        "{release}"
    );
    // Back on 0.2.0 with the state it had when it was left.
    assert_eq!(agent.get("/count").body, "3");
}

/// Issue 16, defect 8: SIGTERM logged "final checkpoint taken; stopped"
/// and exited 0 while the snapshot failed and the state since the last
/// checkpoint was lost.
#[test]
fn a_stop_whose_final_checkpoint_fails_says_so_and_exits_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    let agent = on_0_2_8(&dir.path().join("data"), &["--checkpoint-every", "1h"], 0);
    assert_eq!(agent.get("/break-snapshot").status, 200);
    hello(&agent, 2);
    let log = agent.log.clone();
    let code = agent.terminate();
    let log = std::fs::read_to_string(log).unwrap();
    assert_ne!(code, 0, "{log}");
    assert!(log.contains("the final checkpoint failed"), "{log}");
    assert!(!log.contains("final checkpoint taken"), "{log}");
}

/// Issue 16, defect 9: re-hashing an artifact before a load read it to EOF
/// on the engine's thread: a FIFO planted under `artifacts/` blocked every
/// later command, rollback included, until a restart.
#[test]
fn a_fifo_in_place_of_an_artifact_fails_the_load_and_never_holds_the_engine() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let agent = on_0_2_0(&data, &[], 2);
    stage_sample(&agent, "0.3.0");
    let sha = agent.release("0.3.0").unwrap()["sha256"]
        .as_str()
        .unwrap()
        .to_owned();
    let artifact = data.join("artifacts").join(format!("{sha}.so"));
    std::fs::remove_file(&artifact).unwrap();
    let made = std::process::Command::new("mkfifo")
        .arg(&artifact)
        .status()
        .unwrap();
    assert!(made.success());

    with_api(&agent, async |mut api| {
        let mut upgrade = tonic::Request::new(nine9s_proto::TransitionRequest {
            version: "0.3.0".into(),
            ..Default::default()
        });
        // A bound on a hang, not a speed target: the old agent never answered.
        upgrade.set_timeout(Duration::from_secs(20));
        let err = api.upgrade(upgrade).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
        assert!(err.message().contains("not a regular file"), "{err:?}");
    });
    // The engine takes commands, and 0.2.0 serves with its state.
    assert_eq!(agent.status()["active_version"], "0.2.0");
    assert_eq!(agent.get("/count").body, "2");
    agent.ctl(&["remove", "0.3.0"]).ok();
}

/// Issue 16, defect 10: when boot fell back past a release whose artifact
/// was damaged, its last checkpoint stayed in the store, but no command
/// could bring it back once the artifact was repaired.
#[test]
fn a_release_the_boot_fell_back_past_comes_back_with_its_last_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let agent = on_0_2_0(&data, &[], 2);
    stage_sample(&agent, "0.3.0");
    agent.ctl(&["upgrade", "--to", "0.3.0", "--permanent"]).ok();
    hello(&agent, 3);
    let sha = agent.release("0.3.0").unwrap()["sha256"]
        .as_str()
        .unwrap()
        .to_owned();
    // A clean stop checkpoints 0.3.0's count: 5.
    assert_eq!(agent.terminate(), 0);
    let artifact = data.join("artifacts").join(format!("{sha}.so"));
    std::fs::write(&artifact, b"not a library any more").unwrap();

    let agent = Agent::start(&data, &[]);
    assert_eq!(agent.status()["active_version"], "0.2.0");
    assert_eq!(agent.get("/count").body, "2");
    // The fallback's start event says how to get the state back.
    let mut after = 0;
    let started = loop {
        let started = first_event(&agent, after, EventKind::AgentStarted);
        if started.message.contains("FELL BACK") {
            break started;
        }
        after = started.id;
    };
    assert!(
        started
            .message
            .contains("ctl upgrade --to 0.3.0 --state snapshot"),
        "{started:?}"
    );

    // Staging the same release again repairs its artifact; the upgrade
    // restores its last checkpoint instead of migrating 0.2.0's count.
    stage_sample(&agent, "0.3.0");
    let upgraded = agent.json(&[
        "upgrade",
        "--to",
        "0.3.0",
        "--state",
        "snapshot",
        "--permanent",
    ]);
    assert_eq!(upgraded["transition"]["result"], "ok", "{upgraded}");
    assert_eq!(agent.get("/count").body, "5");
    assert_eq!(agent.status()["permanent_version"], "0.3.0");
}

/// 0.2.8 (the segfault fixture, which counts like 0.2.0) permanent, with
/// `hellos` counted, 0.3.0 staged.
fn on_0_2_8(data: &std::path::Path, extra: &[&str], hellos: usize) -> Agent {
    let agent = on_0_2_0(data, extra, 0);
    stage_fixture(&agent, "segfault").ok();
    agent.ctl(&["upgrade", "--to", "0.2.8", "--permanent"]).ok();
    hello(&agent, hellos);
    stage_sample(&agent, "0.3.0");
    agent
}

/// Issue 16, defect 2: plugin code behind the closed gate had no time
/// limit — a snapshot that took 3 s held every request 3 s, whatever
/// `--quiesce-timeout` said. Past `--gate-timeout` the switch is abandoned
/// and the gate reopens on the release that served.
#[test]
fn a_switch_whose_snapshot_outlasts_the_gate_timeout_is_abandoned() {
    let dir = tempfile::tempdir().unwrap();
    let agent = on_0_2_8(
        &dir.path().join("data"),
        &["--gate-timeout", "300ms", "--checkpoint-every", "1h"],
        3,
    );
    assert_eq!(agent.get("/slow-snapshot?ms=2000").status, 200);
    let out = agent.ctl(&["upgrade", "--to", "0.3.0", "--permanent"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr
            .contains("did not return within the gate's 300 ms"),
        "{}",
        out.stderr
    );
    let status = agent.status();
    assert_eq!(status["active_version"], "0.2.8", "{status}");
    // The release at fault is the one serving, and permanent: never failed.
    assert_eq!(agent.release_state("0.2.8"), "permanent");
    assert_eq!(agent.release_state("0.3.0"), "staged");
    hello(&agent, 1);
    assert_eq!(agent.get("/count").body, "4");
    assert!(
        last(&agent)["error"]
            .as_str()
            .unwrap()
            .contains("--gate-timeout"),
        "{}",
        last(&agent)
    );
}

/// Issue 16, defect 2: a checkpoint's snapshot held every request for as
/// long as it took; past `--gate-timeout` it is abandoned and skipped.
#[test]
fn a_checkpoint_whose_snapshot_outlasts_the_gate_timeout_is_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let agent = on_0_2_8(
        &dir.path().join("data"),
        &["--gate-timeout", "300ms", "--checkpoint-every", "500ms"],
        2,
    );
    let after = agent.status()["last_event_id"].as_u64().unwrap();
    assert_eq!(agent.get("/slow-snapshot?ms=2000").status, 200);
    let skipped = first_event(&agent, after, EventKind::CheckpointSkipped);
    assert!(skipped.message.contains("--gate-timeout"), "{skipped:?}");
    hello(&agent, 1);
    assert_eq!(agent.get("/count").body, "3");
}

/// Issue 16, defect 2: a serving instance whose snapshot never returns is
/// wedged: the worker is replaced on the permanent release with its last
/// checkpoint, as after a crash.
#[test]
fn a_serving_instance_whose_snapshot_never_returns_is_replaced_with_its_last_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let agent = on_0_2_8(
        &dir.path().join("data"),
        &["--gate-timeout", "300ms", "--checkpoint-every", "300ms"],
        2,
    );
    agent.checkpointed();
    let old = agent.worker_pid();
    // From now on its snapshot never returns: the next checkpoint is
    // abandoned behind the gate, and the instance never comes back.
    assert_eq!(agent.get("/slow-snapshot?ms=3600000").status, 200);
    hello(&agent, 1);
    let new = agent.new_worker(old);
    assert_ne!(new, old);
    assert!(agent.logged("it is wedged"), "{}", agent.log());
    assert_eq!(agent.status()["active_version"], "0.2.8");
    // Its last checkpoint: what was counted before the snapshot hung.
    assert_eq!(agent.get("/count").body, "2");
}
