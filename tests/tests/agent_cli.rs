//! The agent refuses to start, with one clear line and exit code 1, when
//! it cannot have what it needs: a port, or a data dir of its own.

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use nine9s_tests::{bin_dir, Agent};

/// Runs the agent to its exit (it must exit on its own within 30 s).
fn agent_exits(args: &[&str]) -> Output {
    let mut child = Command::new(bin_dir().join("agent"))
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start the agent");
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the agent did not exit");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("output")
}

/// `--data-dir DATA` on free ports, then `extra`.
fn on_free_ports<'a>(data: &'a std::path::Path, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "--data-dir",
        data.to_str().unwrap(),
        "--http",
        "127.0.0.1:0",
        "--grpc",
        "127.0.0.1:0",
    ];
    args.extend_from_slice(extra);
    args
}

fn last_line(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr)
        .lines()
        .last()
        .unwrap_or_default()
        .to_owned()
}

#[test]
fn a_port_in_use_is_a_clear_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let out = agent_exits(&[
        "--data-dir",
        data.to_str().unwrap(),
        "--http",
        &port,
        "--grpc",
        "127.0.0.1:0",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let line = last_line(&out);
    assert!(
        line.contains(&format!("cannot listen for HTTP on {port}")),
        "{line}"
    );
}

#[test]
fn a_data_dir_in_use_by_another_agent_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let first = Agent::start(&data, &[]);
    let out = agent_exits(&on_free_ports(&data, &[]));
    assert_eq!(out.status.code(), Some(1));
    let line = last_line(&out);
    assert!(line.contains("another agent using this data dir"), "{line}");
    assert_eq!(
        first.get("/").body,
        "Hello world!",
        "the first agent is unharmed"
    );
}

#[test]
fn a_bad_bootstrap_release_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let missing = dir.path().join("no-such-release");
    let out = agent_exits(&on_free_ports(
        &data,
        &["--bootstrap", missing.to_str().unwrap()],
    ));
    assert_eq!(out.status.code(), Some(1));
    let line = last_line(&out);
    assert!(
        line.contains("cannot read") && line.contains("release.toml"),
        "{line}"
    );
}

#[test]
fn json_logs_carry_the_transition_on_its_lines() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&dir.path().join("data"), &["--log-format", "json"]);
    nine9s_tests::stage_sample(&agent, "0.2.0");
    agent.ctl(&["upgrade", "--to", "0.2.0", "--permanent"]).ok();
    let upgrade = agent
        .history()
        .into_iter()
        .find(|t| t["kind"] == "upgrade")
        .expect("the upgrade in the history");
    let log = agent.log();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let switched = lines
        .iter()
        .find(|l| l["fields"]["message"] == "switched")
        .unwrap_or_else(|| panic!("no 'switched' line in\n{log}"));
    let transition = switched["spans"]
        .as_array()
        .and_then(|spans| spans.iter().find(|s| s["name"] == "transition"))
        .unwrap_or_else(|| panic!("no transition span on {switched}"));
    assert_eq!(transition["id"], upgrade["id"], "{switched}");
    assert_eq!(transition["kind"], "upgrade");
}
