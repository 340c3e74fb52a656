//! Written upgrade plans (the appup of nine9s): their steps run in order,
//! hooks included — those before the switch on the rehearsal's trial
//! instance, before any request is held — and a failing hook before the
//! switch aborts the upgrade.

use nine9s_tests::{stage_fixture, stage_sample, Agent};

#[test]
fn a_written_plan_runs_its_hooks_around_the_switch() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&dir.path().join("data"), &[]);
    stage_sample(&agent, "0.2.0");
    stage_fixture(&agent, "hooks").ok();
    agent.ctl(&["upgrade", "--to", "0.2.0", "--permanent"]).ok();
    for _ in 0..3 {
        agent.get("/");
    }
    let dry = agent
        .ctl(&["upgrade", "--to", "0.2.5", "--dry-run"])
        .ok()
        .stdout;
    assert!(
        dry.contains("(written): load, migrate, hook:warm, switch, hook:announce, drain, unload"),
        "{dry}"
    );
    let upgraded = agent.json(&["upgrade", "--to", "0.2.5", "--permanent"]);
    let checks = upgraded["plan"]["checks"].to_string();
    assert!(checks.contains("ran hook:warm and is healthy"), "{checks}");
    // `warm` ran on the trial instance before the switch; `announce` on
    // the serving one after it.
    assert_eq!(agent.get("/hooks").body, "announce");
    assert_eq!(agent.get("/count").body, "3");
}

#[test]
fn a_failing_hook_before_the_switch_aborts_the_upgrade() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&dir.path().join("data"), &[]);
    stage_fixture(&agent, "hooks").ok();
    let out = agent.ctl(&["upgrade", "--to", "0.2.5"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr.contains("hook of release 0.2.5 failed")
            && out.stderr.contains("reticulate_splines"),
        "{}",
        out.stderr
    );
    assert_eq!(agent.get("/").body, "Hello world!");
}
