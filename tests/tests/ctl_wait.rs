//! `ctl --wait` and `ctl watch` against the real agent: a script waits for
//! the soak's verdict through the event stream, and tells a release made
//! permanent (exit 0) from one the health gate rolled back (exit 4).

use std::io::{BufRead, BufReader};
use std::thread;
use std::time::Duration;

use nine9s_tests::{eventually, stage_fixture, stage_sample, Agent};

#[test]
fn wait_returns_once_the_release_is_permanent() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&dir.path().join("data"), &[]);
    stage_sample(&agent, "0.2.0");
    let out = agent.ctl(&["upgrade", "--to", "0.2.0", "--soak", "1s", "--wait"]);
    assert_eq!(out.code, 0, "{out:?}");
    // No polling needed: when --wait returns, the verdict is in.
    assert_eq!(agent.status()["permanent_version"], "0.2.0");
    assert_eq!(agent.status()["soak"]["mode"], "idle");
}

#[test]
fn wait_exits_4_when_the_health_gate_rolls_the_release_back() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&dir.path().join("data"), &[]);
    stage_sample(&agent, "0.2.0");
    agent.ctl(&["upgrade", "--to", "0.2.0", "--permanent"]).ok();
    stage_fixture(&agent, "unhealthy").ok();
    let waiting = {
        let local = agent.local();
        thread::spawn(move || {
            nine9s_tests::ctl(
                &local,
                &[
                    "upgrade", "--to", "0.6.0", "--soak", "1m", "--wait", "--reason", "canary",
                ],
            )
        })
    };
    // Once 0.6.0 serves a request its health check fails.
    assert!(eventually(Duration::from_secs(10), || agent
        .get("/")
        .release
        == "0.6.0"));
    let out = waiting.join().unwrap();
    assert_eq!(out.code, 4, "{out:?}");
    assert!(out.stderr.contains("rolled back"), "{}", out.stderr);
    assert_eq!(agent.status()["active_version"], "0.2.0");
    assert_eq!(agent.release_state("0.6.0"), "failed");
    let upgrade = agent
        .history()
        .into_iter()
        .find(|t| t["kind"] == "upgrade" && t["to_version"] == "0.6.0")
        .unwrap();
    assert_eq!(upgrade["reason"], "canary");
}

#[test]
fn watch_prints_every_event_as_json_lines() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&dir.path().join("data"), &[]);
    let mut watch = agent.watch_json();
    stage_sample(&agent, "0.2.0");
    agent.ctl(&["upgrade", "--to", "0.2.0", "--permanent"]).ok();
    let mut kinds = Vec::new();
    let mut lines = BufReader::new(watch.stdout.take().unwrap()).lines();
    while let Some(Ok(line)) = lines.next() {
        let event: serde_json::Value = serde_json::from_str(&line).unwrap();
        kinds.push(event["kind"].as_str().unwrap().to_owned());
        if event["kind"] == "release_state_changed"
            && event["version"] == "0.2.0"
            && event["state"] == "permanent"
        {
            break;
        }
    }
    let _ = watch.kill();
    let _ = watch.wait();
    assert_eq!(
        kinds.first().map(String::as_str),
        Some("transition_started"),
        "{kinds:?}"
    );
    assert!(kinds.contains(&"agent_started".to_owned()), "{kinds:?}");
    assert!(
        kinds.iter().filter(|k| *k == "transition_finished").count() >= 3,
        "install, stage, upgrade: {kinds:?}"
    );
}
