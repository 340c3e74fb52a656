//! The release lifecycle: staged → current → permanent → old. Soaks,
//! health-gated automatic rollback, restarts, rollback, make-permanent,
//! dry runs, removal and retention.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use nine9s_tests::{
    epoch_ms, eventually, hello, on_0_2_0, stage_fixture, stage_sample, Agent, Client,
};

/// The newest transition of `kind` in the history.
fn last_of_kind(agent: &Agent, kind: &str) -> serde_json::Value {
    let history = agent.history();
    history
        .iter()
        .rev()
        .find(|t| t["kind"] == kind)
        .cloned()
        .unwrap_or_else(|| panic!("no {kind} in the history: {history:#?}"))
}

/// The last rollback, which must be the health gate's, from `from` to `to`.
fn automatic_rollback(agent: &Agent, from: &str, to: &str) -> serde_json::Value {
    let rollback = last_of_kind(agent, "rollback");
    assert_eq!(
        (
            &rollback["from_version"],
            &rollback["to_version"],
            &rollback["result"],
            &rollback["automatic"]
        ),
        (&from.into(), &to.into(), &"ok".into(), &true.into()),
        "{rollback}"
    );
    rollback
}

/// Whether `field` of a JSON object is a string containing `text`.
fn says(value: &serde_json::Value, field: &str, text: &str) -> bool {
    value[field].as_str().is_some_and(|s| s.contains(text))
}

#[test]
fn a_healthy_release_becomes_permanent_after_its_soak() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&dir.path().join("data"), &[]);
    stage_sample(&agent, "0.2.0");
    let out = agent
        .ctl(&["upgrade", "--to", "0.2.0", "--soak", "2s"])
        .ok();
    assert!(
        out.stdout.contains("becomes permanent if it stays healthy"),
        "{out:?}"
    );
    let s = agent.status();
    assert_eq!(
        (
            &s["active_version"],
            &s["permanent_version"],
            &s["current_version"]
        ),
        (&"0.2.0".into(), &"0.1.0".into(), &"0.2.0".into()),
        "{s}"
    );
    assert_eq!(
        (&s["soak"]["mode"], &s["soak"]["version"]),
        (&"soaking".into(), &"0.2.0".into()),
        "{s}"
    );
    assert!(
        eventually(Duration::from_secs(10), || agent.release_state("0.2.0")
            == "permanent"),
        "{}",
        agent.status()
    );
    assert_eq!(agent.release_state("0.1.0"), "old");
    let last = agent.history().pop().expect("a history");
    assert_eq!(
        (
            &last["kind"],
            &last["to_version"],
            &last["result"],
            &last["automatic"]
        ),
        (
            &"make_permanent".into(),
            &"0.2.0".into(),
            &"ok".into(),
            &true.into()
        ),
        "{last}"
    );
    assert!(says(&last, "reason", "healthy through its soak"), "{last}");
}

#[test]
fn a_release_whose_health_check_fails_during_its_soak_is_rolled_back_without_refusing_a_request() {
    let dir = tempfile::tempdir().unwrap();
    let agent = on_0_2_0(&dir.path().join("data"), &[], 5);
    stage_fixture(&agent, "unhealthy").ok();

    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (addr, stop) = (agent.http, Arc::clone(&stop));
        thread::spawn(move || {
            let mut client = Client::connect(addr).unwrap();
            let (mut ok, mut failed) = (0u64, 0u64);
            while !stop.load(Ordering::Relaxed) {
                match client.get("/") {
                    Ok(r) if r.status == 200 => ok += 1,
                    _ => failed += 1,
                }
            }
            (ok, failed)
        })
    };
    agent
        .ctl(&["upgrade", "--to", "0.6.0", "--soak", "30s"])
        .ok();
    // Every probe is a `GET /` too, counted by whichever release serves it.
    let mut probes = 0u64;
    let rolled_back = eventually(Duration::from_secs(10), || {
        probes += 1;
        agent.get("/").release == "0.2.0"
    });
    stop.store(true, Ordering::Relaxed);
    let (ok, failed) = load.join().unwrap();
    assert!(rolled_back, "still on 0.6.0:\n{}", agent.log());
    assert_eq!(failed, 0, "no request refused or failed");
    assert_eq!(agent.release_state("0.6.0"), "failed");
    assert_eq!(agent.release_state("0.2.0"), "permanent");
    let rollback = automatic_rollback(&agent, "0.6.0", "0.2.0");
    assert!(
        says(
            &rollback,
            "reason",
            "health check failed: database connection lost"
        ),
        "{rollback}"
    );
    // 0.6.0 keeps 0.2.0's state version, so the rollback carries its count
    // down: every request answered, on either release, is counted once.
    assert_eq!(
        agent.get("/count").body,
        (5 + ok + probes).to_string(),
        "count carried through 0.6.0 and back: 5 before, {ok} under load, {probes} probes"
    );
}

#[test]
fn a_release_that_fails_requests_during_its_soak_is_rolled_back() {
    let dir = tempfile::tempdir().unwrap();
    let agent = on_0_2_0(&dir.path().join("data"), &[], 2);
    stage_fixture(&agent, "panicky").ok();
    agent
        .ctl(&["upgrade", "--to", "0.2.1", "--soak", "30s"])
        .ok();
    for _ in 0..12 {
        agent.get("/");
    }
    assert!(eventually(Duration::from_secs(5), || agent
        .get("/")
        .release
        == "0.2.0"));
    let rollback = automatic_rollback(&agent, "0.2.1", "0.2.0");
    assert!(says(&rollback, "reason", "requests failed"), "{rollback}");
    assert_eq!(agent.release_state("0.2.1"), "failed");
}

#[test]
fn a_restart_while_a_release_is_only_current_comes_back_on_the_permanent_one() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let agent = on_0_2_0(&data, &[], 3);
    stage_sample(&agent, "0.3.0");
    agent
        .ctl(&["upgrade", "--to", "0.3.0", "--no-permanent"])
        .ok();
    hello(&agent, 4);
    assert_eq!(agent.get("/count").body, "7");
    agent.kill9();

    let agent = Agent::start(&data, &[]);
    let reply = agent.get("/count");
    assert_eq!(reply.release, "0.2.0");
    assert_eq!(reply.body, "3", "0.2.0's snapshot from when it was left");
    // Dying while current counts against the release (a clean stop would
    // only make it old).
    let release = agent.release("0.3.0").expect("0.3.0 is known");
    assert_eq!(release["state"], "failed", "{release}");
    assert!(
        says(
            &release,
            "failure",
            "the agent died while 0.3.0 was current"
        ),
        "{release}"
    );
    let s = agent.status();
    assert_eq!(
        (
            &s["active_version"],
            &s["permanent_version"],
            &s["current_version"]
        ),
        (&"0.2.0".into(), &"0.2.0".into(), &"".into()),
        "{s}"
    );
    let last = agent.history().pop().expect("a history");
    assert_eq!(
        (&last["kind"], &last["result"], &last["automatic"]),
        (&"restart".into(), &"ok".into(), &true.into()),
        "{last}"
    );
    assert!(
        says(&last, "reason", "the agent died while 0.3.0 was current"),
        "{last}"
    );
}

#[test]
fn make_permanent_keeps_a_current_release_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let agent = Agent::start(&data, &[]);
    stage_sample(&agent, "0.2.0");
    agent
        .ctl(&["upgrade", "--to", "0.2.0", "--no-permanent"])
        .ok();
    let out = agent.ctl(&["make-permanent", "0.1.0"]);
    assert_eq!(out.code, 1);
    assert!(
        out.stderr.contains("only the current release"),
        "{}",
        out.stderr
    );
    agent.ctl(&["make-permanent", "0.2.0"]).ok();
    assert_eq!(agent.release_state("0.2.0"), "permanent");
    assert_eq!(agent.terminate(), 0);
    let agent = Agent::start(&data, &[]);
    assert_eq!(agent.get("/").release, "0.2.0");
    assert_eq!(agent.release_state("0.2.0"), "permanent");
}

#[test]
fn rollback_returns_to_the_previous_permanent_release() {
    let dir = tempfile::tempdir().unwrap();
    let agent = on_0_2_0(&dir.path().join("data"), &[], 5);
    stage_sample(&agent, "0.3.0");
    agent.ctl(&["upgrade", "--to", "0.3.0", "--permanent"]).ok();
    hello(&agent, 2);

    let dry = agent.ctl(&["rollback", "--dry-run"]).ok().stdout;
    assert!(
        dry.contains("plan 0.3.0 -> 0.2.0") && dry.contains("nothing changed"),
        "{dry}"
    );
    assert_eq!(agent.get("/").release, "0.3.0");

    let out = agent.ctl(&["rollback"]).ok();
    assert!(out.stdout.contains("rolled back 0.3.0 -> 0.2.0"), "{out:?}");
    // 5 on 0.2.0, then 2 and one probe on 0.3.0, migrated down.
    assert_eq!(agent.get("/count").body, "8");
    assert_eq!(agent.release_state("0.2.0"), "permanent");

    // Back up, then roll back restoring the snapshot taken when 0.2.0 was left.
    agent.ctl(&["upgrade", "--to", "0.3.0", "--permanent"]).ok();
    hello(&agent, 10);
    agent.ctl(&["rollback", "--state", "snapshot"]).ok();
    assert_eq!(
        agent.get("/count").body,
        "8",
        "the snapshot taken when 0.2.0 was left, not the 10 hellos since"
    );
}

#[test]
fn a_dry_run_prints_the_plan_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let agent = on_0_2_0(&dir.path().join("data"), &[], 1);
    stage_sample(&agent, "0.3.0");
    let before = (agent.json(&["releases"]), agent.history());
    let out = agent
        .ctl(&["upgrade", "--to", "0.3.0", "--dry-run"])
        .ok()
        .stdout;
    for expected in [
        "plan 0.2.0 -> 0.3.0 (written): load, migrate, switch, drain, unload",
        "library: nine9s 0.3.0 loads",
        "state: migrated v1 -> v2 by nine9s 0.3.0",
        "routes: added [\"/stats\"]",
        "health: a trial instance with the running state migrated is healthy",
        "dry run: nothing changed",
    ] {
        assert!(out.contains(expected), "{expected:?} in:\n{out}");
    }
    let after = (agent.json(&["releases"]), agent.history());
    assert_eq!(before, after);
    assert_eq!(agent.get("/count").body, "1");
    let derived = agent
        .ctl(&["downgrade", "--to", "0.1.0", "--dry-run"])
        .ok()
        .stdout;
    assert!(
        derived.contains("(derived)") && derived.contains("not carried"),
        "{derived}"
    );
}

#[test]
fn sigterm_drains_and_keeps_the_count() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let agent = on_0_2_0(&data, &["--checkpoint-every", "1h"], 6);
    assert_eq!(agent.terminate(), 0);
    let agent = Agent::start(&data, &[]);
    assert_eq!(agent.get("/count").body, "6");
    assert!(agent.get("/").status == 200 && agent.get("/count").body == "7");
}

#[test]
fn a_periodic_checkpoint_bounds_what_kill_9_loses() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let agent = on_0_2_0(&data, &["--checkpoint-every", "200ms"], 9);
    let before = epoch_ms(&agent.status()["last_checkpoint"]);
    // A checkpoint written after the 9 requests were served.
    assert!(
        eventually(Duration::from_secs(5), || {
            epoch_ms(&agent.status()["last_checkpoint"]) > before
        }),
        "no checkpoint was taken"
    );
    agent.kill9();
    let agent = Agent::start(&data, &[]);
    assert_eq!(agent.get("/count").body, "9");
}

#[test]
fn remove_refuses_what_is_in_use_and_collects_the_artifact() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let agent = on_0_2_0(&data, &[], 0);
    let out = agent.ctl(&["remove", "0.2.0"]);
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("cannot be removed"), "{}", out.stderr);
    let artifacts = || std::fs::read_dir(data.join("artifacts")).unwrap().count();
    assert_eq!(artifacts(), 2);
    let out = agent.ctl(&["remove", "0.1.0"]).ok();
    assert!(
        out.stdout.contains("deleted unreferenced artifact"),
        "{out:?}"
    );
    assert_eq!(artifacts(), 1);
    assert_eq!(agent.release_state("0.1.0"), "absent");
}

#[test]
fn only_the_configured_number_of_old_releases_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let agent = on_0_2_0(&dir.path().join("data"), &["--keep-old", "1"], 0);
    stage_sample(&agent, "0.3.0");
    agent.ctl(&["upgrade", "--to", "0.3.0", "--permanent"]).ok();
    assert_eq!(agent.release_state("0.1.0"), "absent");
    assert_eq!(agent.release_state("0.2.0"), "old");
}

/// Issue 16, defect 12: the sample 0.1.0 compiled into the agent and the
/// one cargo builds from `plugins/nine9s-0.1.0` differ in their bytes, so
/// staging the sample 0.1.0 on a fresh agent was refused VERSION_CONFLICT.
#[test]
fn staging_the_sample_the_agent_was_built_with_is_already_staged() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&dir.path().join("data"), &[]);
    let staged = agent.json(&[
        "stage",
        nine9s_tests::release_dir("nine9s-0.1.0").to_str().unwrap(),
        "--library",
        nine9s_tests::library("nine9s_0_1_0").to_str().unwrap(),
    ]);
    assert_eq!(staged["already_staged"], true, "{staged}");
    assert_eq!(staged["release"]["state"], "permanent", "{staged}");
    assert_eq!(agent.get("/").body, "Hello world!");
}
