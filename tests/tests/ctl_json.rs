//! ctl for scripts: `--output json` prints one JSON document per command
//! on stdout, errors included (with one line on stderr and the documented
//! exit codes); and the shell completion scripts it prints.

use nine9s_tests::{library, release_dir, Agent};
use serde_json::Value;

fn json(agent: &Agent, args: &[&str]) -> Value {
    let mut all = vec!["--output", "json"];
    all.extend_from_slice(args);
    let out = agent.ctl(&all).ok();
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", out.stdout))
}

#[test]
fn a_script_can_drive_an_upgrade_with_json() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&dir.path().join("data"), &[]);
    let lib = library("nine9s_0_2_0");
    let release = release_dir("nine9s-0.2.0");
    let staged = json(
        &agent,
        &[
            "stage",
            release.to_str().unwrap(),
            "--library",
            lib.to_str().unwrap(),
        ],
    );
    assert_eq!(staged["release"]["version"], "0.2.0");
    assert_eq!(staged["release"]["state"], "staged");
    assert_eq!(staged["already_staged"], false);

    let plan = json(&agent, &["upgrade", "--to", "0.2.0", "--dry-run"]);
    assert!(plan["transition"].is_null());
    assert_eq!(plan["plan"]["origin"], "derived");

    let upgraded = json(&agent, &["upgrade", "--to", "0.2.0", "--permanent"]);
    assert_eq!(upgraded["transition"]["result"], "ok");
    assert_eq!(upgraded["transition"]["from_version"], "0.1.0");

    agent.get("/");
    let status = json(&agent, &["status"]);
    assert_eq!(status["active_version"], "0.2.0");
    assert_eq!(status["permanent_version"], "0.2.0");
    assert_eq!(status["libraries"][0]["served"], 1);

    let history = json(&agent, &["history"]);
    let kinds: Vec<&str> = history["transitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["install", "stage", "upgrade"]);

    let refused = agent.ctl(&["--output", "json", "upgrade", "--to", "9.9.9"]);
    assert_eq!(refused.code, 1);
    assert_eq!(refused.stdout.lines().count(), 1, "{refused:?}");
    assert_eq!(refused.stderr.lines().count(), 1);
}

#[test]
fn completions_for_every_shell_need_no_agent() {
    for shell in ["bash", "zsh", "fish"] {
        let out = nine9s_tests::ctl("http://127.0.0.1:1", &["completions", shell]);
        assert_eq!(out.code, 0, "{shell}: {out:?}");
        for command in ["upgrade", "rollback", "restart", "completions"] {
            assert!(out.stdout.contains(command), "{shell}: no {command}");
        }
    }
    let out = nine9s_tests::ctl("http://127.0.0.1:1", &["completions", "tcsh"]);
    assert_eq!(out.code, 2, "{out:?}");
}

#[test]
fn errors_are_one_json_document_too() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&dir.path().join("data"), &[]);
    let parse = |out: &nine9s_tests::Ctl| -> Value {
        serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {out:?}"))
    };
    // Refused by the agent: exit 1, its reason code in the document.
    let out = agent.ctl(&["--output", "json", "upgrade", "--to", "9.9.9"]);
    assert_eq!(out.code, 1, "{out:?}");
    let error = &parse(&out)["error"];
    assert_eq!(error["kind"], "failed");
    assert_eq!(error["reason"], "UNKNOWN_RELEASE");
    assert_eq!(error["exit_code"], 1);
    assert!(error["message"].as_str().unwrap().contains("9.9.9"));
    // The line on stderr is still there for people.
    assert!(out.stderr.contains("[UNKNOWN_RELEASE]"), "{out:?}");
    // No agent there: exit 3.
    let gone = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", gone.local_addr().unwrap());
    drop(gone);
    let out = nine9s_tests::ctl(&url, &["--output", "json", "status"]);
    assert_eq!(out.code, 3, "{out:?}");
    let error = &parse(&out)["error"];
    assert_eq!(error["kind"], "unreachable");
    assert_eq!(error["exit_code"], 3);
    assert!(error["reason"].is_null());
}
