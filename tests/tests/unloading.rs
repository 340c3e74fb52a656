//! Retired libraries really leave the process, a panicking handler costs
//! one request a 500 and nothing more, and `ctl status` tells the truth
//! about what is resident.

use std::time::Duration;

use nine9s_tests::{eventually, stage_fixture, stage_sample, Agent};

/// The sha256 of a release's library, which names its artifact.
fn artifact_of(agent: &Agent, version: &str) -> String {
    let release = agent
        .release(version)
        .unwrap_or_else(|| panic!("{version} is not staged"));
    release["sha256"]
        .as_str()
        .filter(|sha| !sha.is_empty())
        .unwrap_or_else(|| panic!("no sha256: {release}"))
        .to_owned()
}

/// The loaded library of `version` in `ctl status`, if any.
fn library_of(agent: &Agent, version: &str) -> Option<serde_json::Value> {
    agent.status()["libraries"]
        .as_array()
        .expect("an array of libraries")
        .iter()
        .find(|l| l["version"] == version)
        .cloned()
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
    let status = agent.status();
    let libraries = status["libraries"]
        .as_array()
        .expect("an array of libraries");
    assert_eq!(libraries.len(), 1, "{status}");
    assert_eq!(
        (
            &libraries[0]["version"],
            &libraries[0]["active"],
            &libraries[0]["lingering"]
        ),
        (&"0.2.0".into(), &true.into(), &false.into()),
        "{status}"
    );
    assert!(
        libraries[0]["path"]
            .as_str()
            .is_some_and(|p| p.contains(&v2)),
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
    assert!(agent.logged("release panicked handling a request"));

    let library = library_of(&agent, "0.2.1").expect("0.2.1 is loaded");
    assert_eq!(library["active"], true, "{library}");
    assert_eq!(
        [
            &library["in_flight"],
            &library["served"],
            &library["errors"]
        ]
        .map(|n| n.as_u64()),
        [Some(0), Some(4), Some(3)],
        "in-flight, served, errors: {library}"
    );

    agent
        .ctl(&["downgrade", "--to", "0.1.0", "--permanent"])
        .ok();
    assert_eq!(agent.get("/").body, "Hello world!");
    // A library that panicked may stay mapped (std registers thread-local
    // destructors on a panic). Once the old instance is dropped there are
    // two settled outcomes, and status must tell which: unmapped and gone
    // from `libraries`, or still mapped and listed as lingering (the host
    // notes every library it released while mapped, `lingering()`). Before
    // that, while it drains, it is mapped and listed as resident.
    let sha = artifact_of(&agent, "0.2.1");
    let still_mapped = || agent.mapped_artifacts().iter().any(|p| p.contains(&sha));
    let settled = || match (library_of(&agent, "0.2.1"), still_mapped()) {
        (None, false) => Some("unloaded"),
        (Some(l), true) if l["lingering"] == true && l["active"] == false => Some("lingering"),
        _ => None,
    };
    let mut outcome = None;
    assert!(
        eventually(Duration::from_secs(10), || {
            outcome = settled();
            outcome.is_some()
        }),
        "mapped: {}; status: {}",
        still_mapped(),
        agent.status()
    );
    // Both outcomes are final: a library unmapped is not mapped again, and
    // glibc never unmaps one with thread-local destructors.
    assert_eq!(settled(), outcome, "status: {}", agent.status());
    if outcome == Some("lingering") {
        assert!(agent.logged("library released but still mapped"));
    }
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
    let library = library_of(&agent, "0.2.2").expect("0.2.2 is still mapped, so listed");
    assert_eq!(
        (&library["lingering"], &library["active"]),
        (&true.into(), &false.into()),
        "{library}"
    );
    assert!(agent.logged("library released but still mapped"));
    assert_eq!(agent.get("/").body, "Hello world!");

    // Issue 16, defect 12: once its file was deleted (the release removed,
    // its artifact collected), it vanished from status though still mapped.
    agent.ctl(&["remove", "0.2.2"]).ok();
    assert!(!agent
        .data_dir
        .join("artifacts")
        .join(format!("{sha}.so"))
        .exists());
    let status = agent.status();
    let libraries = status["libraries"].as_array().unwrap();
    assert!(
        libraries.iter().any(|l| l["lingering"] == true
            && l["path"].as_str().is_some_and(|p| p.contains(&sha))),
        "{status}"
    );
}
