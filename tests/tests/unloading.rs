//! Retired libraries really leave the process, a panicking handler costs
//! one request a 500 and nothing more, and `ctl status` tells the truth
//! about what is resident.

use std::time::Duration;

use nine9s_tests::{eventually, stage_fixture, stage_sample, Agent};

fn artifact_of(agent: &Agent, version: &str) -> String {
    let releases = agent.ctl(&["releases"]).ok().stdout;
    let prefix = releases
        .lines()
        .find(|l| l.starts_with(version))
        .and_then(|l| l.split_whitespace().nth(3))
        .unwrap_or_else(|| panic!("{version} in {releases}"))
        .to_owned();
    prefix
}

#[test]
fn a_retired_library_is_unmapped() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&dir.path().join("data"), &[]);
    stage_sample(&agent, "0.2.0");
    stage_sample(&agent, "0.3.0");
    let (v2, v3) = (artifact_of(&agent, "0.2.0"), artifact_of(&agent, "0.3.0"));
    let only = |sha: &str| {
        let mapped = agent.mapped_artifacts();
        mapped.len() == 1 && mapped[0].contains(sha)
    };
    agent.ctl(&["upgrade", "--to", "0.2.0", "--permanent"]).ok();
    assert!(
        eventually(Duration::from_secs(5), || only(&v2)),
        "{:?}",
        agent.mapped_artifacts()
    );
    for _ in 0..3 {
        agent.ctl(&["upgrade", "--to", "0.3.0", "--permanent"]).ok();
        assert!(
            eventually(Duration::from_secs(5), || only(&v3)),
            "{:?}",
            agent.mapped_artifacts()
        );
        agent
            .ctl(&["downgrade", "--to", "0.2.0", "--permanent"])
            .ok();
        assert!(
            eventually(Duration::from_secs(5), || only(&v2)),
            "{:?}",
            agent.mapped_artifacts()
        );
    }
    let status = agent.ctl(&["status"]).ok().stdout;
    let libraries: Vec<&str> = status
        .lines()
        .skip_while(|l| !l.starts_with("LIBRARY"))
        .skip(1)
        .collect();
    assert_eq!(libraries.len(), 1, "{status}");
    assert!(
        libraries[0].starts_with("0.2.0") && libraries[0].contains("active"),
        "{status}"
    );
}

#[test]
fn a_panicking_handler_fails_one_request_and_the_agent_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&dir.path().join("data"), &[]);
    stage_fixture(&agent, "panicky").ok();
    agent
        .ctl(&["upgrade", "--to", "0.2.1", "--no-permanent"])
        .ok();
    for _ in 0..3 {
        let reply = agent.get("/");
        assert_eq!(reply.status, 500);
        assert!(
            reply.body.contains("deliberate panic in the handler"),
            "{}",
            reply.body
        );
    }
    assert_eq!(agent.get("/count").status, 200, "other routes still work");
    assert!(agent.log().contains("release panicked handling a request"));

    let status = agent.ctl(&["status"]).ok().stdout;
    let active = status
        .lines()
        .find(|l| l.starts_with("0.2.1") && l.contains("active"))
        .expect(&status);
    let columns: Vec<&str> = active.split_whitespace().collect();
    assert_eq!(
        &columns[2..5],
        ["0", "4", "3"],
        "in-flight, served, errors: {status}"
    );

    agent
        .ctl(&["downgrade", "--to", "0.1.0", "--permanent"])
        .ok();
    assert_eq!(agent.get("/").body, "Hello world!");
    // A library that panicked may stay mapped (std registers thread-local
    // destructors on a panic); if it does, status must say so.
    let sha = artifact_of(&agent, "0.2.1");
    std::thread::sleep(Duration::from_millis(100));
    let still_mapped = agent.mapped_artifacts().iter().any(|p| p.contains(&sha));
    let status = agent.ctl(&["status"]).ok().stdout;
    let reported = status
        .lines()
        .any(|l| l.starts_with("0.2.1") && l.contains("lingering"));
    assert_eq!(
        still_mapped, reported,
        "mapped: {still_mapped}; status:\n{status}"
    );
}

#[test]
fn a_library_that_cannot_be_unmapped_is_reported_as_lingering() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&dir.path().join("data"), &[]);
    stage_fixture(&agent, "tls-destructor").ok();
    agent.ctl(&["upgrade", "--to", "0.2.2", "--permanent"]).ok();
    for _ in 0..4 {
        assert_eq!(agent.get("/").status, 200);
    }
    agent
        .ctl(&["downgrade", "--to", "0.1.0", "--permanent"])
        .ok();
    let sha = artifact_of(&agent, "0.2.2");
    assert!(
        agent.mapped_artifacts().iter().any(|p| p.contains(&sha)),
        "glibc keeps a library with thread-local destructors mapped"
    );
    let status = agent.ctl(&["status"]).ok().stdout;
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("0.2.2") && l.contains("lingering")),
        "{status}"
    );
    assert!(agent.log().contains("library released but still mapped"));
    assert_eq!(agent.get("/").body, "Hello world!");
}
