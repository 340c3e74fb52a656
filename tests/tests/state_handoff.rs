//! State crosses versions exactly: under concurrent load, across upgrades
//! and downgrades between 0.2.0 and 0.3.0 (whose state has another shape),
//! `/count` equals the number of `/` requests that got a 200, and no
//! request fails. Migrations that are missing or panic stop the upgrade
//! before the switch.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;

use nine9s_tests::{stage_fixture, stage_sample, Agent, Client};

/// Starts an agent on 0.2.0 (permanent) with 0.3.0 staged.
fn agent_on_0_2_0(dir: &tempfile::TempDir) -> Agent {
    let agent = Agent::start(&dir.path().join("data"), &[]);
    stage_sample(&agent, "0.2.0");
    stage_sample(&agent, "0.3.0");
    agent.ctl(&["upgrade", "--to", "0.2.0", "--permanent"]).ok();
    agent
}

#[test]
fn counts_stay_exact_under_load_across_upgrades_and_downgrades() {
    let dir = tempfile::tempdir().unwrap();
    let agent = agent_on_0_2_0(&dir);
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..8)
        .map(|_| {
            let (addr, stop) = (agent.http, Arc::clone(&stop));
            thread::spawn(move || {
                let mut client = Client::connect(addr).expect("connect");
                let (mut ok, mut bad) = (0u64, Vec::new());
                while !stop.load(Ordering::Relaxed) {
                    match client.get("/") {
                        Ok(r) if r.status == 200 => {
                            let expected = match r.release.as_str() {
                                "0.2.0" => "Hello world 2 !",
                                "0.3.0" => "Hello world 3 !",
                                other => panic!("answered by {other}"),
                            };
                            assert_eq!(r.body, expected);
                            ok += 1;
                        }
                        other => bad.push(format!("{other:?}")),
                    }
                }
                (ok, bad)
            })
        })
        .collect();

    let cycles = 15;
    for _ in 0..cycles {
        agent.ctl(&["upgrade", "--to", "0.3.0", "--permanent"]).ok();
        agent
            .ctl(&["downgrade", "--to", "0.2.0", "--permanent"])
            .ok();
    }
    agent.ctl(&["upgrade", "--to", "0.3.0", "--permanent"]).ok();
    stop.store(true, Ordering::Relaxed);

    let (mut served, mut failures) = (0, Vec::new());
    for worker in workers {
        let (ok, bad) = worker.join().expect("worker");
        served += ok;
        failures.extend(bad);
    }
    assert!(
        failures.is_empty(),
        "{} requests failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(served > 100, "load too light to prove anything: {served}");
    assert_eq!(
        agent.get("/count").body,
        served.to_string(),
        "no count lost, none doubled"
    );

    let history = agent.history();
    let switches = history
        .iter()
        .filter(|t| (t["kind"] == "upgrade" || t["kind"] == "downgrade") && t["result"] == "ok")
        .count();
    assert_eq!(switches, 2 * cycles + 2, "{history:#?}");
}

#[test]
fn migrating_down_gives_the_older_release_a_state_it_understands() {
    let dir = tempfile::tempdir().unwrap();
    let agent = agent_on_0_2_0(&dir);
    for _ in 0..5 {
        agent.get("/");
    }
    agent.ctl(&["upgrade", "--to", "0.3.0", "--permanent"]).ok();
    assert_eq!(agent.get("/count").body, "5");
    for _ in 0..3 {
        assert_eq!(agent.get("/").body, "Hello world 3 !");
    }
    let stats = agent.get("/stats").body;
    assert!(
        stats
            .lines()
            .any(|l| l.starts_with("8 ") && l.ends_with(" /")),
        "{stats}"
    );
    agent
        .ctl(&["downgrade", "--to", "0.2.0", "--permanent"])
        .ok();
    assert_eq!(agent.get("/count").body, "8");
    assert_eq!(agent.get("/stats").status, 404);
}

#[test]
fn a_missing_migration_path_is_refused_before_the_switch() {
    let dir = tempfile::tempdir().unwrap();
    let agent = agent_on_0_2_0(&dir);
    for _ in 0..4 {
        agent.get("/");
    }
    stage_fixture(&agent, "no-migration").ok();
    for args in [
        &["upgrade", "--to", "0.5.0", "--dry-run"][..],
        &["upgrade", "--to", "0.5.0"],
    ] {
        let out = agent.ctl(args);
        assert_eq!(out.code, 1, "{out:?}");
        assert!(
            out.stderr
                .contains("no state migration from 0.2.0 (state v1) to 0.5.0 (state v9)"),
            "{}",
            out.stderr
        );
    }
    assert_eq!(agent.get("/").release, "0.2.0");
    assert_eq!(agent.get("/count").body, "5", "state untouched");
}

#[test]
fn a_panic_in_a_migration_aborts_the_upgrade_with_state_intact() {
    let dir = tempfile::tempdir().unwrap();
    let agent = agent_on_0_2_0(&dir);
    for _ in 0..3 {
        agent.get("/");
    }
    stage_fixture(&agent, "bad-migration").ok();
    let out = agent.ctl(&["upgrade", "--to", "0.4.0"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr
            .contains("state migration of release 0.4.0 failed")
            && out
                .stderr
                .contains("deliberate panic in the v1 -> v3 migration"),
        "{}",
        out.stderr
    );
    assert_eq!(agent.get("/").body, "Hello world 2 !");
    assert_eq!(agent.get("/count").body, "4");
    assert_eq!(agent.release_state("0.4.0"), "failed");
    let last = agent.history().pop().expect("a history");
    assert_eq!(
        (
            &last["kind"],
            &last["from_version"],
            &last["to_version"],
            &last["result"]
        ),
        (
            &"upgrade".into(),
            &"0.2.0".into(),
            &"0.4.0".into(),
            &"failed".into()
        ),
        "{last}"
    );
    assert_eq!(agent.status()["active_version"], "0.2.0");
}

#[test]
fn a_panic_in_init_aborts_the_upgrade_with_state_intact() {
    let dir = tempfile::tempdir().unwrap();
    let agent = agent_on_0_2_0(&dir);
    agent.get("/");
    stage_fixture(&agent, "init-fails").ok();
    let out = agent.ctl(&["upgrade", "--to", "0.7.0"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr.contains("init of release 0.7.0 failed")
            && out.stderr.contains("deliberate panic in init"),
        "{}",
        out.stderr
    );
    assert_eq!(agent.get("/count").body, "1");
}
