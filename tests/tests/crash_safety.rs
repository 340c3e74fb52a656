//! `kill -9` at any moment of a transition leaves, after a restart: the
//! permanent release serving with its state, no half-registered release,
//! and a history that shows the interrupted transition as aborted.
//!
//! The agent crashes at named points (`NINE9S_CRASH_AT`, which kills the
//! process on the spot, as `kill -9` would) so every point is hit for sure.
//! Only a debug build has them (`agent/src/failpoint.rs`): run these with
//! `cargo test`, not `cargo test --release`.

use std::path::Path;
use std::time::Duration;

use nine9s_tests::{kill, library, release_dir, stage_sample, Agent};

/// A data dir with 0.1.0 old, 0.2.0 permanent (3 hellos counted and saved
/// by a clean stop) and 0.3.0 staged, unless `stage_0_3_0` is false.
fn prepare(data: &Path, stage_0_3_0: bool) {
    let agent = Agent::start(data, &[]);
    stage_sample(&agent, "0.2.0");
    agent.ctl(&["upgrade", "--to", "0.2.0", "--permanent"]).ok();
    if stage_0_3_0 {
        stage_sample(&agent, "0.3.0");
    }
    for _ in 0..3 {
        agent.get("/");
    }
    assert_eq!(agent.terminate(), 0);
}

/// Where a node must be after the crash.
struct Expect {
    /// The permanent (and active) release.
    permanent: &'static str,
    /// What `/count` answers (404 on 0.1.0).
    count: (u16, &'static str),
    /// The last history entry's kind and result.
    last: (&'static str, &'static str),
}

/// Interrupted before it committed: back on 0.2.0, the transition aborted.
const ABORTED: Expect = Expect {
    permanent: "0.2.0",
    count: (200, "3"),
    last: ("", "aborted"),
};

/// Cut during the upload, before the stage began as a transition: the
/// history ends with the setup's upgrade, and the upload is swept.
const UPLOAD_CUT: Expect = Expect {
    permanent: "0.2.0",
    count: (200, "3"),
    last: ("upgrade", "ok"),
};

/// Committed, but only as current: the restart returns to 0.2.0 and says
/// so (and the release current when the agent died is failed).
const SOAKING_ABANDONED: Expect = Expect {
    permanent: "0.2.0",
    count: (200, "3"),
    last: ("restart", "ok"),
};

/// Restarts with a crash point armed, runs `op` (which must crash the
/// agent), then restarts clean and checks that the node is consistent.
fn crash_and_check(
    dir: &tempfile::TempDir,
    point: &str,
    stage_0_3_0: bool,
    op: &[&[&str]],
    expect: Expect,
) -> Agent {
    let data = dir.path().join("data");
    prepare(&data, stage_0_3_0);
    let agent = Agent::start_with_env(&data, &[], &[("NINE9S_CRASH_AT", point)]);
    // ctl may still succeed: a retry of a command whose answer the crash
    // cut off gets the recorded outcome from the next worker.
    for args in op {
        agent.ctl(args);
        if agent.log().contains(&format!("crashing at {point}")) {
            break;
        }
    }
    assert!(
        agent.wait_for_crash(Duration::from_secs(10)),
        "{point}: the agent did not crash"
    );
    assert!(
        agent.log().contains(&format!("crashing at {point}")),
        "{point}"
    );
    drop(agent);

    let agent = Agent::start(&data, &[]);
    let status = agent.status();
    let permanent = expect.permanent;
    assert!(
        status["active_version"] == permanent
            && status["permanent_version"] == permanent
            && status["current_version"] == "",
        "{point}: not back on the permanent release {permanent}:\n{status}"
    );
    let reply = agent.get("/count");
    assert_eq!(
        (reply.status, reply.body.as_str()),
        (expect.count.0, expect.count.1),
        "{point}: state"
    );
    if expect.count.0 == 200 {
        assert_eq!(reply.release, permanent);
    }

    let history = agent.history();
    assert!(
        history.iter().all(|t| t["result"] != "running"),
        "{point}: {history:?}"
    );
    let last = history.last().unwrap();
    assert!(
        (expect.last.0.is_empty() || last["kind"] == expect.last.0)
            && last["result"] == expect.last.1,
        "{point}: expected the last transition to be {:?}: {last}",
        expect.last
    );

    // Every release the agent lists is whole: its library loads and checks.
    let releases = agent.json(&["releases"]);
    let releases = releases.as_array().unwrap();
    for release in releases {
        let version = release["version"].as_str().unwrap();
        if version == permanent {
            continue;
        }
        let verb = if higher(version, permanent) {
            "upgrade"
        } else {
            "downgrade"
        };
        let out = agent.ctl(&[verb, "--to", version, "--dry-run"]);
        assert_eq!(
            out.code, 0,
            "{point}: {version} is listed but broken: {out:?}"
        );
    }
    let artifacts = std::fs::read_dir(data.join("artifacts")).unwrap().count();
    assert_eq!(
        artifacts,
        releases.len(),
        "{point}: one artifact per release, no debris"
    );
    agent
}

/// Whether version `a` is higher than `b` (x.y.z only).
fn higher(a: &str, b: &str) -> bool {
    let parts = |v: &str| {
        v.split('.')
            .map(|p| p.parse::<u64>().unwrap())
            .collect::<Vec<_>>()
    };
    parts(a) > parts(b)
}

#[test]
fn kill_9_during_a_stage() {
    let lib = library("nine9s_0_3_0");
    let dir = release_dir("nine9s-0.3.0");
    let stage: &[&str] = &[
        "stage",
        dir.to_str().unwrap(),
        "--library",
        lib.to_str().unwrap(),
    ];
    for (point, expect) in [
        ("stage:half-written", UPLOAD_CUT),
        ("stage:begun", ABORTED),
        ("stage:checked", ABORTED),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let agent = crash_and_check(&dir, point, false, &[stage], expect);
        let artifacts = std::fs::read_dir(dir.path().join("data/artifacts")).unwrap();
        let partial: Vec<_> = artifacts
            .map(|e| e.unwrap().file_name())
            .filter(|n| n.to_string_lossy().ends_with(".partial"))
            .collect();
        assert!(partial.is_empty(), "{point}: left behind {partial:?}");
        // Staging again works, whatever the crash left.
        agent.ctl(stage).ok();
        agent.ctl(&["upgrade", "--to", "0.3.0", "--permanent"]).ok();
        assert_eq!(agent.get("/count").body, "3", "{point}");
    }
}

/// Crashes a soaked switch at every point of it, then checks that the same
/// switch, made permanent, works afterwards and answers `expect_after`.
fn crash_a_switch_everywhere(switch: &[&str], points: &[&str], path: &str, expect_after: &str) {
    for &point in points {
        // Committed as current only: the restart abandons it.
        let expect = if point == "switch:committed" {
            SOAKING_ABANDONED
        } else {
            ABORTED
        };
        let dir = tempfile::tempdir().unwrap();
        let agent = crash_and_check(&dir, point, true, &[switch], expect);
        let mut again = switch.to_vec();
        again.push("--permanent");
        agent.ctl(&again).ok();
        assert_eq!(agent.get(path).body, expect_after, "{point}");
    }
}

#[test]
fn kill_9_during_an_upgrade() {
    let points = [
        "switch:begun",
        "switch:loaded",
        "switch:quiesced",
        "switch:switched",
        "switch:committed",
    ];
    crash_a_switch_everywhere(&["upgrade", "--to", "0.3.0"], &points, "/count", "3");
}

#[test]
fn kill_9_right_after_an_immediate_upgrade_commits_keeps_the_migrated_state() {
    let committed = Expect {
        permanent: "0.3.0",
        count: (200, "3"),
        last: ("upgrade", "ok"),
    };
    let dir = tempfile::tempdir().unwrap();
    let agent = crash_and_check(
        &dir,
        "switch:committed",
        true,
        &[&["upgrade", "--to", "0.3.0", "--permanent"]],
        committed,
    );
    assert_eq!(agent.get("/").body, "Hello world 3 !");
}

#[test]
fn kill_9_during_a_downgrade() {
    let points = [
        "switch:begun",
        "switch:quiesced",
        "switch:switched",
        "switch:committed",
    ];
    crash_a_switch_everywhere(
        &["downgrade", "--to", "0.1.0"],
        &points,
        "/",
        "Hello world!",
    );
}

#[test]
fn kill_9_during_a_rollback() {
    for point in [
        "switch:begun",
        "switch:loaded",
        "switch:quiesced",
        "switch:switched",
    ] {
        let dir = tempfile::tempdir().unwrap();
        let agent = crash_and_check(&dir, point, true, &[&["rollback"]], ABORTED);
        agent.ctl(&["rollback"]).ok();
        assert_eq!(agent.get("/").body, "Hello world!", "{point}");
    }
    // A rollback makes its target permanent as it commits.
    let committed = Expect {
        permanent: "0.1.0",
        count: (404, "not found\n"),
        last: ("rollback", "ok"),
    };
    let dir = tempfile::tempdir().unwrap();
    crash_and_check(&dir, "switch:committed", true, &[&["rollback"]], committed);
}

#[test]
fn kill_9_while_making_a_release_permanent() {
    let dir = tempfile::tempdir().unwrap();
    let agent = crash_and_check(
        &dir,
        "permanent:begun",
        true,
        &[
            &["upgrade", "--to", "0.3.0", "--no-permanent"],
            &["make-permanent", "0.3.0"],
        ],
        SOAKING_ABANDONED,
    );
    agent.ctl(&["upgrade", "--to", "0.3.0", "--permanent"]).ok();
}

#[test]
fn kill_9_during_a_remove() {
    let known = |agent: &Agent| agent.release("0.1.0").is_some();
    // Journalled, not committed: the removal is in the commit, so 0.1.0 is
    // still known with its snapshot (a downgrade to it still works), and a
    // retry removes it.
    let dir = tempfile::tempdir().unwrap();
    let agent = crash_and_check(&dir, "remove:begun", true, &[&["remove", "0.1.0"]], ABORTED);
    assert!(known(&agent), "{:?}", agent.json(&["releases"]));
    agent.ctl(&["remove", "0.1.0"]).ok();
    assert!(!known(&agent), "{:?}", agent.json(&["releases"]));

    // Committed, its artifact not yet deleted: 0.1.0 is gone, the history
    // says so, and the restart collected the artifact (`crash_and_check`
    // counts one per release).
    let removed = Expect {
        permanent: "0.2.0",
        count: (200, "3"),
        last: ("remove", "ok"),
    };
    let dir = tempfile::tempdir().unwrap();
    let agent = crash_and_check(
        &dir,
        "remove:forgotten",
        true,
        &[&["remove", "0.1.0"]],
        removed,
    );
    assert!(!known(&agent), "{:?}", agent.json(&["releases"]));
    let out = agent.ctl(&["remove", "0.1.0"]);
    assert!(out.code != 0 && out.stderr.contains("not known"), "{out:?}");
}

/// The pids of `pid`'s children (the supervisor's: its workers).
fn children(pid: u32) -> Vec<u32> {
    let mut all = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let list =
            std::fs::read_to_string(task.unwrap().path().join("children")).unwrap_or_default();
        all.extend(
            list.split_whitespace()
                .filter_map(|p| p.parse::<u32>().ok()),
        );
    }
    all
}

/// Issue 16, defect 6: boot attempts were counted whatever ended them, so
/// two SIGKILLs from outside during a slow start (systemd's stop timeout,
/// the OOM killer, an operator) failed the healthy permanent release and
/// the node fell back to an older release and state.
#[test]
fn kills_from_outside_during_a_slow_start_never_fail_the_permanent_release() {
    let dir = tempfile::tempdir().unwrap();
    let slow = dir.path().join("slow-init");
    let entered = dir.path().join("slow-init.entered");
    let data = dir.path().join("data");
    let agent = Agent::start_with_env(
        &data,
        &[],
        &[("NINE9S_FIXTURE_SLOW_INIT_FILE", slow.to_str().unwrap())],
    );
    stage_sample(&agent, "0.2.0");
    agent.ctl(&["upgrade", "--to", "0.2.0", "--permanent"]).ok();
    nine9s_tests::stage_fixture(&agent, "segfault").ok();
    agent.ctl(&["upgrade", "--to", "0.2.8", "--permanent"]).ok();

    // From now on 0.2.8 starts slowly; each new worker is killed from
    // outside while it starts, three times.
    std::fs::write(&slow, "").unwrap();
    kill("KILL", agent.worker_pid());
    for _ in 0..3 {
        assert!(
            nine9s_tests::eventually(Duration::from_secs(30), || entered.exists()),
            "no worker started 0.2.8; log:\n{}",
            agent.log()
        );
        std::fs::remove_file(&entered).unwrap();
        for worker in children(agent.pid()) {
            kill("KILL", worker);
        }
    }
    std::fs::remove_file(&slow).unwrap();

    assert_eq!(agent.serving_release(), "0.2.8", "{}", agent.log());
    assert_eq!(agent.status()["permanent_version"], "0.2.8");
    let release = agent.release("0.2.8").unwrap();
    assert_eq!(release["state"], "permanent", "{release}");
}
