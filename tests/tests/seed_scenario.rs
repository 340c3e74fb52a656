//! The tutorial's scenario, as a user runs it: nine9s 0.1.0 serving, stage
//! 0.2.0, upgrade in place, count, downgrade, restart on the same data dir.

use nine9s_tests::{release_dir, Agent};

#[test]
fn upgrade_count_downgrade_and_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let agent = Agent::start(&data, &[]);

    let hello = agent.get("/");
    assert_eq!(
        (hello.status, hello.body.as_str(), hello.release.as_str()),
        (200, "Hello world!", "0.1.0")
    );
    assert_eq!(agent.get("/count").status, 404);

    // As a user would: the release directory, library found in the build.
    let staged = agent
        .ctl(&["stage", release_dir("nine9s-0.2.0").to_str().unwrap()])
        .ok();
    assert!(staged.stdout.contains("staged nine9s 0.2.0"), "{staged:?}");
    assert_eq!(agent.release_state("0.2.0"), "staged");

    let upgraded = agent.ctl(&["upgrade", "--to", "0.2.0", "--permanent"]).ok();
    assert!(
        upgraded.stdout.contains("upgraded 0.1.0 -> 0.2.0"),
        "{upgraded:?}"
    );
    let hellos = 7;
    for _ in 0..hellos {
        let reply = agent.get("/");
        assert_eq!(
            (reply.status, reply.body.as_str()),
            (200, "Hello world 2 !")
        );
    }
    assert_eq!(agent.get("/count").body, hellos.to_string());

    let status = agent.status();
    assert_eq!(
        (&status["active_version"], &status["permanent_version"]),
        (&"0.2.0".into(), &"0.2.0".into()),
        "{status}"
    );

    let downgraded = agent
        .ctl(&["downgrade", "--to", "0.1.0", "--permanent"])
        .ok();
    assert!(
        downgraded.stdout.contains("downgraded 0.2.0 -> 0.1.0"),
        "{downgraded:?}"
    );
    assert_eq!(agent.get("/").body, "Hello world!");
    assert_eq!(agent.get("/count").status, 404);

    let history = agent.history();
    let kinds: Vec<[&str; 4]> = history
        .iter()
        .map(|t| {
            ["kind", "from_version", "to_version", "result"]
                .map(|field| t[field].as_str().unwrap_or("?"))
        })
        .collect();
    assert_eq!(
        kinds,
        [
            ["install", "", "0.1.0", "ok"],
            ["stage", "", "0.2.0", "ok"],
            ["upgrade", "0.1.0", "0.2.0", "ok"],
            ["downgrade", "0.2.0", "0.1.0", "ok"],
        ],
        "{history:#?}"
    );

    // Back up, count a little, and restart: the permanent release and its
    // count come back.
    agent.ctl(&["upgrade", "--to", "0.2.0", "--permanent"]).ok();
    for _ in 0..3 {
        agent.get("/");
    }
    assert_eq!(agent.terminate(), 0);
    let agent = Agent::start(&data, &[]);
    let reply = agent.get("/");
    assert_eq!(
        (reply.body.as_str(), reply.release.as_str()),
        ("Hello world 2 !", "0.2.0")
    );
    assert_eq!(
        agent.get("/count").body,
        "4",
        "the count continues after a restart"
    );
}

#[test]
fn a_fresh_data_dir_starts_on_the_embedded_sample_release() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&dir.path().join("data"), &[]);
    let status = agent.status();
    assert_eq!(
        (&status["active_version"], &status["permanent_version"]),
        (&"0.1.0".into(), &"0.1.0".into()),
        "{status}"
    );
    assert_eq!(agent.get("/").body, "Hello world!");
    assert_eq!(agent.get("/anything-else").status, 404);
}
