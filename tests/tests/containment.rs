//! What a release's code can reach before any switch: the disposable
//! rehearsal (`agent rehearse`, run by a dry run and before every switch)
//! runs the release's `init` with the data dir and the secret files the
//! agent was given hidden, so a deploy-role user cannot read the admin
//! token or the tokens file there — while a well-behaved release still
//! rehearses and switches as before. A dry run is that rehearsal alone:
//! the serving worker never maps the library, nor runs its `init`.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use nine9s_tests::Agent;

const ADMIN_TOKEN: &str = "admin-token-the-rehearsal-must-not-read";
const TOKENS_LINE: &str = "ops admin tokens-file-the-rehearsal-must-not-read";

fn write_secret(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

#[test]
fn a_release_rehearsed_before_a_switch_cannot_read_the_agents_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700)).unwrap();
    // An admin token left by a start without `--tokens`, and the tokens
    // file this agent is given.
    let admin_token = data.join("admin.token");
    write_secret(&admin_token, ADMIN_TOKEN);
    let tokens = dir.path().join("tokens");
    write_secret(&tokens, TOKENS_LINE);
    // Writable by anyone, outside the data dir: wherever the release runs,
    // it can say what it read.
    let reports = dir.path().join("reports");
    std::fs::create_dir(&reports).unwrap();
    std::fs::set_permissions(&reports, std::fs::Permissions::from_mode(0o777)).unwrap();
    let report = reports.join("report");
    let secrets = std::env::join_paths([&admin_token, &tokens]).unwrap();
    let agent = Agent::start_with_env(
        &data,
        &["--tokens", tokens.to_str().unwrap()],
        &[
            ("NINE9S_FIXTURE_SECRETS", secrets.to_str().unwrap()),
            ("NINE9S_FIXTURE_REPORT", report.to_str().unwrap()),
        ],
    );
    nine9s_tests::stage_fixture(&agent, "init-reads-secrets").ok();

    let sha = agent.release("0.9.3").unwrap()["sha256"]
        .as_str()
        .unwrap()
        .to_owned();
    let mapped = || agent.mapped_artifacts().iter().any(|p| p.contains(&sha));

    let dry = agent.json(&["upgrade", "--to", "0.9.3", "--dry-run"]);
    let checks = dry["plan"]["checks"].to_string();
    for expected in [
        "0.9.3 opened, started and checked in a disposable process first",
        "library: nine9s 0.9.3 loads, ABI v2",
        "state: not carried",
        "health: a trial instance without state is healthy",
    ] {
        assert!(checks.contains(expected), "{expected:?} in: {dry}");
    }
    let written = std::fs::read_to_string(&report).unwrap_or_default();
    assert!(
        !written.lines().any(|line| line.starts_with("worker\t")),
        "the dry run ran the release's init in the serving worker: {written}"
    );
    assert!(
        !mapped(),
        "the dry run mapped the library in the serving worker"
    );
    let rehearsal: Vec<&str> = written
        .lines()
        .filter(|line| line.starts_with("rehearsal\t"))
        .collect();
    assert_eq!(
        rehearsal.len(),
        2,
        "the rehearsal's init did not report: {written}"
    );
    for line in &rehearsal {
        assert!(
            !line.contains(ADMIN_TOKEN) && !line.contains(TOKENS_LINE),
            "the rehearsal read a secret: {line}"
        );
    }
    assert_eq!(agent.release_state("0.9.3"), "staged");

    // Behind its walls the release still switches: only now does the
    // serving worker map it and run its code.
    agent.ctl(&["upgrade", "--to", "0.9.3"]).ok();
    assert_eq!(agent.get("/").body, "0.9.3");
    let written = std::fs::read_to_string(&report).unwrap_or_default();
    assert!(
        written.lines().any(|line| line.starts_with("worker\t")),
        "{written}"
    );
    assert!(mapped());
}
