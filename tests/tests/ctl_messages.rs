//! What ctl tells a user, checked against the real agent (issue 18, items
//! 5 and 6): every error says what to do, a reply says what really
//! happened to the state, and the same thing is said the same way in the
//! table, the JSON and the README.

use nine9s_tests::{
    epoch_ms, hello, on_0_2_0, self_signed_localhost, stage_fixture, stage_sample, Agent,
};

#[test]
fn plaintext_to_a_tls_control_port_says_to_use_https_and_ca() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed_localhost(dir.path());
    let (cert, key) = (cert.to_str().unwrap(), key.to_str().unwrap());
    let agent = Agent::start(
        &dir.path().join("data"),
        &["--tls-cert", cert, "--tls-key", key],
    );
    // Was "Internal: h2 protocol error".
    let plain = nine9s_tests::ctl(&agent.url(), &["status"]);
    assert_eq!(plain.code, 3, "{plain:?}");
    let https = format!("https://{}", agent.grpc);
    assert!(
        plain.stderr.contains("speaks TLS")
            && plain.stderr.contains(&format!("--agent {https}"))
            && plain.stderr.contains("--ca"),
        "{plain:?}"
    );
    assert!(!plain.stderr.contains("h2 protocol error"), "{plain:?}");
    // The message for a missing --ca is a whole sentence.
    let no_ca = nine9s_tests::ctl(&https, &["status"]);
    assert_eq!(no_ca.code, 2, "{no_ca:?}");
    assert!(
        no_ca
            .stderr
            .contains("the PEM certificate of the CA that signed the agent's TLS certificate"),
        "{no_ca:?}"
    );
}

/// A rollback whose migration down fails restores the snapshot taken when
/// its target was left: the reply says so, in the table and in the JSON,
/// rather than a plain "rolled back" (the requests served since are not
/// in the state).
#[test]
fn a_rollback_that_restored_the_snapshot_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let agent = on_0_2_0(&dir.path().join("data"), &[], 3);
    stage_fixture(&agent, "bad-downgrade").ok();
    let upgrade = ["upgrade", "--to", "0.3.5", "--soak", "10m"];
    agent.ctl(&upgrade).ok();
    hello(&agent, 2);
    let reply = agent.json(&["rollback"]);
    assert_eq!(reply["carried_state"], "snapshot", "{reply}");
    let fallback = reply["state_fallback"].as_str().unwrap();
    assert!(fallback.contains("migration failed"), "{reply}");
    // When the snapshot was taken, an RFC 3339 time as every time in the
    // JSON.
    assert!(epoch_ms(&reply["snapshot_taken_at"]) > 0, "{reply}");
    assert!(reply.get("snapshot_taken_at_ms").is_none(), "{reply}");
    assert_eq!(agent.get("/count").body, "3", "the snapshot's count");

    agent.ctl(&upgrade).ok();
    let table = agent.ctl(&["rollback"]).ok().stdout;
    assert!(table.contains("rolled back 0.3.5 -> 0.2.0"), "{table}");
    assert!(
        table.contains("state: restored from the snapshot taken when 0.2.0 was left (")
            && table.contains("because the state migration failed")
            && table.contains("requests served since then are not in it"),
        "{table}"
    );
    // A rollback that carried the running state down says nothing of a
    // snapshot.
    stage_sample(&agent, "0.3.0");
    agent
        .ctl(&["upgrade", "--to", "0.3.0", "--soak", "10m"])
        .ok();
    let reply = agent.json(&["rollback"]);
    assert_eq!(reply["carried_state"], "running", "{reply}");
    assert_eq!(reply["state_fallback"], "", "{reply}");
    agent
        .ctl(&["upgrade", "--to", "0.3.0", "--soak", "10m"])
        .ok();
    let table = agent.ctl(&["rollback"]).ok().stdout;
    assert!(table.contains("rolled back 0.3.0 -> 0.2.0"), "{table}");
    assert!(!table.contains("snapshot"), "{table}");
}

/// A switch from a release that keeps no state holds no request, as the
/// README says, and ctl says so instead of a hold of a few µs; a dry run
/// that carries no state does not speak of a migrated one.
#[test]
fn a_switch_without_state_holds_nothing_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&dir.path().join("data"), &[]);
    stage_sample(&agent, "0.2.0");
    let dry = agent
        .ctl(&["upgrade", "--to", "0.2.0", "--dry-run"])
        .ok()
        .stdout;
    assert!(dry.contains("state: not carried"), "{dry}");
    assert!(
        dry.contains("health: a trial instance without state is healthy"),
        "{dry}"
    );
    assert!(!dry.contains("migrated"), "{dry}");
    let out = agent.ctl(&["upgrade", "--to", "0.2.0"]).ok().stdout;
    assert!(
        out.contains("upgraded 0.1.0 -> 0.2.0 in ")
            && out.contains("(no request held: no state to carry)"),
        "{out}"
    );
    let switch = agent.history().pop().unwrap();
    assert_eq!(switch["to_version"], "0.2.0", "{switch}");
    assert_eq!(switch["switch_wait_us"], 0, "{switch}");
}

/// `ctl agent restart --wait` reports the sha256 of the binary the new
/// worker runs, not "unknown" (the worker hashes it as it starts).
#[test]
fn a_restart_reports_the_sha256_of_the_binary_that_serves() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&dir.path().join("data"), &[]);
    let binary = std::fs::read(nine9s_tests::bin_dir().join("agent")).unwrap();
    let sha = nine9s_tests::sha256_hex(&binary);
    let reply = agent.json(&["agent", "restart", "--wait"]);
    assert_eq!(
        reply["new_worker"]["binary_sha256"],
        sha.as_str(),
        "{reply}"
    );
    let out = agent.ctl(&["agent", "restart", "--wait"]).ok().stdout;
    assert!(
        out.contains(&format!("(binary sha256 {}…)", &sha[..12])),
        "{out}"
    );
}

/// Every time in `--output json` is RFC 3339 UTC, as the README says, under
/// its field's name without `_ms`; durations stay numbers.
#[test]
fn json_times_are_rfc_3339() {
    let dir = tempfile::tempdir().unwrap();
    let agent = on_0_2_0(&dir.path().join("data"), &[], 0);
    let status = agent.status();
    let release = agent.release("0.2.0").unwrap();
    let history = agent.history();
    let info = agent.json(&["info"]);
    for (what, time) in [
        ("staged_at", &release["staged_at"]),
        ("permanent_since", &release["permanent_since"]),
        ("started_at", &history.last().unwrap()["started_at"]),
        (
            "agent.worker_started_at",
            &status["agent"]["worker_started_at"],
        ),
        ("info.started_at", &info["started_at"]),
    ] {
        let text = time.as_str().unwrap_or_else(|| panic!("{what}: {time}"));
        assert!(text.ends_with('Z') && text.contains('T'), "{what}: {text}");
        assert!(epoch_ms(time) > 0, "{what}: {text}");
    }
    let text = serde_json::to_string(&(status.clone(), release, history, info)).unwrap();
    assert!(
        !text.contains("_at_ms") && !text.contains("since_ms"),
        "{text}"
    );
    assert!(status["uptime_ms"].is_u64(), "{status}");
}
