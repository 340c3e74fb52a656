//! The process layout (issue 9): a supervisor holds the sockets, a worker
//! serves. A worker that dies is replaced on the permanent release with
//! its last checkpoint while connections wait in the backlog — none is
//! refused; a release that kills its worker is failed with the signal; a
//! worker that keeps dying at start falls back; the agent upgrades itself
//! under load with exact counts; and it runs on listeners passed in by
//! socket activation.
//!
//! A new agent binary is untrusted until it serves (issue 16): one that
//! cannot start — at a restart or at the supervisor's re-exec — is
//! refused while the agent goes on serving, and says why; a new worker
//! that dies after the old one handed over is replaced by one from the
//! binary that served.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nine9s_tests::{
    bin_dir, eventually, hello, kill, on_0_2_0, stage_fixture, Agent, Load, LoadReport,
};

/// `ctl status`'s `agent`, once the worker has hashed its binary.
fn agent_process(agent: &Agent) -> serde_json::Value {
    let mut process = serde_json::Value::Null;
    assert!(eventually(Duration::from_secs(10), || {
        process = agent.status()["agent"].clone();
        process["binary_sha256"]
            .as_str()
            .is_some_and(|s| s.len() == 64)
    }));
    process
}

/// Puts `bytes` in place of the binary at `path`, as an installer does:
/// written aside, made executable, renamed over it.
fn install(path: &Path, bytes: &[u8]) {
    let staged = path.with_extension("new");
    std::fs::write(&staged, bytes).unwrap();
    std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::rename(&staged, path).unwrap();
}

/// Another build of the agent: the same code with other bytes (ELF
/// ignores a tail).
fn another_build(tail: &str) -> Vec<u8> {
    let mut other = std::fs::read(bin_dir().join("agent")).unwrap();
    other.extend_from_slice(tail.as_bytes());
    other
}

/// A binary that cannot start: it says why on stderr and exits 3.
const BROKEN_BINARY: &str =
    "#!/bin/sh\necho 'agent: error: this build is broken (the test says so)' >&2\nexit 3\n";

/// The first event of `kind` (its name in `ctl --output json watch`) the
/// agent has kept, within `within`.
fn event(agent: &Agent, kind: &str, within: Duration) -> Option<serde_json::Value> {
    let mut watch = agent.watch_json();
    let lines = BufReader::new(watch.stdout.take().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    let kind = kind.to_owned();
    std::thread::spawn(move || {
        for line in lines.lines().map_while(Result::ok) {
            let event: serde_json::Value = serde_json::from_str(&line).unwrap();
            if event["kind"] == kind.as_str() {
                let _ = tx.send(event);
                return;
            }
        }
    });
    let found = rx.recv_timeout(within).ok();
    let _ = watch.kill();
    let _ = watch.wait();
    found
}

/// An agent on 0.2.0 (permanent), running from a copy of its binary in
/// `dir`, which the test replaces; the copy's path.
fn on_a_copy_of_the_binary(dir: &std::path::Path) -> (Agent, std::path::PathBuf) {
    let binary = dir.join("agent");
    std::fs::copy(bin_dir().join("agent"), &binary).unwrap();
    let agent = Agent::start_binary(&binary, &dir.join("data"), &[]);
    nine9s_tests::stage_sample(&agent, "0.2.0");
    agent.ctl(&["upgrade", "--to", "0.2.0", "--permanent"]).ok();
    (agent, binary)
}

#[test]
fn a_killed_worker_is_replaced_and_no_connection_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let agent = on_0_2_0(
        &dir.path().join("data"),
        &["--checkpoint-every", "100ms"],
        5,
    );
    agent.checkpointed();
    let old = agent.worker_pid();
    // `/count` does not count: the state stays exact under this load.
    let load = Load::start(agent.http, "/count", 8);
    std::thread::sleep(Duration::from_millis(300));
    kill("KILL", old);
    let new = agent.new_worker(old);
    std::thread::sleep(Duration::from_millis(300));
    let report = load.stop();
    assert_eq!(report.refused, 0, "{report:?}");
    // Only requests in flight on the dead worker may fail: one per connection at most.
    assert!(report.failed <= 8, "{report:?}");
    assert!(report.ok > 0, "{report:?}");
    assert_ne!(new, old);
    let status = agent.status();
    assert_eq!(status["permanent_version"], "0.2.0", "{status}");
    assert_eq!(agent.get("/count").body, "5", "the last checkpoint");
    assert!(
        status["agent"]["previous_exit"]
            .as_str()
            .unwrap()
            .contains("SIGKILL"),
        "{status}"
    );
    assert_eq!(status["agent"]["supervisor_pid"], agent.pid());
}

#[test]
fn a_release_that_kills_its_worker_is_failed_with_the_signal() {
    let dir = tempfile::tempdir().unwrap();
    let agent = on_0_2_0(
        &dir.path().join("data"),
        &["--checkpoint-every", "100ms"],
        3,
    );
    stage_fixture(&agent, "segfault").ok();
    agent
        .ctl(&["upgrade", "--to", "0.2.8", "--soak", "1h"])
        .ok();
    assert_eq!(agent.get("/").body, "Hello segfault !");
    let old = agent.worker_pid();
    let load = Load::start(agent.http, "/count", 8);
    std::thread::sleep(Duration::from_millis(300));
    let crashed = nine9s_tests::Client::connect(agent.http)
        .unwrap()
        .get("/crash");
    assert!(crashed.is_err(), "the worker answered /crash: {crashed:?}");
    agent.new_worker(old);
    std::thread::sleep(Duration::from_millis(300));
    let report = load.stop();
    assert_eq!(report.refused, 0, "{report:?}");
    assert!(report.failed <= 8 && report.ok > 0, "{report:?}");
    // Back on the permanent release, with the state it had when it was
    // left: what the current release served is gone with it, as after
    // any restart.
    let reply = agent.get("/count");
    assert_eq!(
        (reply.release.as_str(), reply.body.as_str()),
        ("0.2.0", "3")
    );
    let release = agent.release("0.2.8").unwrap();
    assert_eq!(release["state"], "failed", "{release}");
    let failure = release["failure"].as_str().unwrap();
    assert!(
        failure.contains("died while 0.2.8 was current") && failure.contains("SIGSEGV"),
        "{failure}"
    );
    // And the history says so, as an automatic restart.
    let history = agent.history();
    let restart = history.last().unwrap();
    assert_eq!(
        (&restart["kind"], &restart["automatic"]),
        (&"restart".into(), &true.into()),
        "{restart}"
    );
    assert!(
        restart["reason"].as_str().unwrap().contains("SIGSEGV"),
        "{restart}"
    );
}

#[test]
fn a_worker_that_keeps_dying_at_start_falls_back_to_the_release_before() {
    let dir = tempfile::tempdir().unwrap();
    let crash_file = dir.path().join("crash-now");
    let data = dir.path().join("data");
    let agent = Agent::start_with_env(
        &data,
        &["--checkpoint-every", "100ms"],
        &[("NINE9S_FIXTURE_CRASH_FILE", crash_file.to_str().unwrap())],
    );
    nine9s_tests::stage_sample(&agent, "0.2.0");
    agent.ctl(&["upgrade", "--to", "0.2.0", "--permanent"]).ok();
    hello(&agent, 2);
    stage_fixture(&agent, "segfault").ok();
    agent.ctl(&["upgrade", "--to", "0.2.8", "--permanent"]).ok();
    hello(&agent, 3);
    agent.checkpointed();
    // From now on 0.2.8 cannot start: every new worker dies in its init.
    std::fs::write(&crash_file, "").unwrap();
    let old = agent.worker_pid();
    kill("KILL", old);
    assert_eq!(agent.serving_release(), "0.2.0");
    let status = agent.status();
    assert_eq!(status["permanent_version"], "0.2.0", "{status}");
    let release = agent.release("0.2.8").unwrap();
    assert_eq!(release["state"], "failed", "{release}");
    assert!(
        release["failure"]
            .as_str()
            .unwrap()
            .contains("killed the agent 2 times"),
        "{release}"
    );
    assert!(
        agent.log().contains("FELL BACK to 0.2.0"),
        "{}",
        agent.log()
    );
}

#[test]
fn the_agent_upgrades_itself_under_load_with_exact_counts() {
    let dir = tempfile::tempdir().unwrap();
    let (agent, binary) = on_a_copy_of_the_binary(dir.path());
    let before = agent_process(&agent);
    install(&binary, &another_build("another build"));

    let load = Load::start(agent.http, "/", 16);
    std::thread::sleep(Duration::from_millis(500));
    let started = Instant::now();
    let out = agent.ctl(&["agent", "restart", "--wait", "--reason", "agent 0.1.1"]);
    assert_eq!(out.code, 0, "{out:?}");
    // And again at once, a few times: a worker retired right after it
    // began to serve still drains (once, a SIGTERM that came before its
    // handler was in place killed it, connections and state with it).
    for _ in 0..5 {
        let again = agent.ctl(&["agent", "restart", "--wait"]);
        assert_eq!(again.code, 0, "{again:?}");
    }
    let took = started.elapsed();
    std::thread::sleep(Duration::from_millis(500));
    let report: LoadReport = load.stop();
    assert_eq!((report.refused, report.failed), (0, 0), "{report:?}");
    let after = agent_process(&agent);
    assert_ne!(after["worker_pid"], before["worker_pid"]);
    assert_eq!(after["supervisor_pid"], before["supervisor_pid"]);
    assert_ne!(
        after["binary_sha256"], before["binary_sha256"],
        "the new binary runs"
    );
    assert_eq!(after["previous_exit"], "");
    // Every 200 counted: not one request lost or counted twice.
    assert_eq!(
        agent.get("/count").body,
        report.ok.to_string(),
        "restart took {took:?}"
    );
}

#[test]
fn killing_the_supervisor_takes_the_worker_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let agent = Agent::start(&data, &[]);
    let worker = agent.worker_pid();
    agent.kill9();
    let gone = || {
        std::fs::read_to_string(format!("/proc/{worker}/status")).map_or(true, |s| {
            s.lines()
                .any(|l| l.starts_with("State:") && l.contains('Z'))
        })
    };
    assert!(
        eventually(Duration::from_secs(10), gone),
        "worker {worker} outlived its supervisor"
    );
    // Nothing holds the data dir: a new agent starts on it.
    let again = Agent::start(&data, &[]);
    assert_eq!(again.get("/").status, 200);
}

#[test]
fn listeners_passed_in_by_socket_activation_are_served() {
    use command_fds::{CommandFdExt, FdMapping};
    let dir = tempfile::tempdir().unwrap();
    let http = TcpListener::bind("127.0.0.1:0").unwrap();
    let grpc = TcpListener::bind("127.0.0.1:0").unwrap();
    let (http_addr, grpc_addr) = (http.local_addr().unwrap(), grpc.local_addr().unwrap());
    let mut command = Command::new(bin_dir().join("agent"));
    command
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .env("LISTEN_FDS", "2")
        .env("LISTEN_FDNAMES", "http:grpc")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .fd_mappings(vec![
            FdMapping {
                parent_fd: OwnedFd::from(http),
                child_fd: 3,
            },
            FdMapping {
                parent_fd: OwnedFd::from(grpc),
                child_fd: 4,
            },
        ])
        .unwrap();
    let mut child = command.spawn().unwrap();
    // The sockets were listening before the agent ran: connections made
    // now wait in their backlog until it serves.
    let reply = nine9s_tests::get(http_addr, "/");
    assert_eq!((reply.status, reply.body.as_str()), (200, "Hello world!"));
    let socket = format!("unix:{}", dir.path().join("data/control.sock").display());
    let status = nine9s_tests::ctl(&socket, &["--output", "json", "status"]);
    assert_eq!(status.code, 0, "{status:?}");
    // The gRPC listener passed in answers too (a caller without a token
    // is told so by the agent).
    let tcp = nine9s_tests::ctl(&format!("http://{grpc_addr}"), &["status"]);
    assert!(tcp.stderr.contains("[UNAUTHENTICATED]"), "{tcp:?}");
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let exited = child.wait().unwrap();
    assert_eq!(exited.code(), Some(0));
}

#[test]
fn the_supervisor_re_executes_itself_keeping_the_listeners_and_the_worker() {
    let dir = tempfile::tempdir().unwrap();
    let agent = on_0_2_0(
        &dir.path().join("data"),
        &["--checkpoint-every", "100ms"],
        2,
    );
    let worker = agent.worker_pid();
    let load = Load::start(agent.http, "/count", 4);
    agent.reexec_supervisor();
    let report = load.stop();
    assert_eq!((report.refused, report.failed), (0, 0), "{report:?}");
    // The same worker serves, now supervised by the new image: its death
    // is seen and mended.
    assert_eq!(agent.worker_pid(), worker);
    // (Checkpoints wait for a moment with no request in flight: the load
    // kept them from coming.)
    agent.checkpointed();
    kill("KILL", worker);
    agent.new_worker(worker);
    assert_eq!(agent.get("/count").body, "2");
    assert_eq!(agent.status()["agent"]["supervisor_pid"], agent.pid());
}

#[test]
fn a_restart_to_a_binary_that_cannot_start_is_refused_while_the_agent_serves() {
    let dir = tempfile::tempdir().unwrap();
    let (agent, binary) = on_a_copy_of_the_binary(dir.path());
    let before = agent_process(&agent);
    install(&binary, BROKEN_BINARY.as_bytes());

    let load = Load::start(agent.http, "/", 8);
    std::thread::sleep(Duration::from_millis(300));
    let out = agent.ctl(&["agent", "restart", "--wait", "--timeout", "30s"]);
    std::thread::sleep(Duration::from_millis(300));
    let report = load.stop();
    // The operator hears why, with the new worker's own last words.
    assert_eq!(out.code, 1, "{out:?}\nlog:\n{}", agent.log());
    assert!(
        out.stderr.contains("exited with code 3")
            && out
                .stderr
                .contains("this build is broken (the test says so)"),
        "{out:?}"
    );
    // And the agent never stopped serving: the same worker, every request
    // answered and counted.
    assert_eq!((report.refused, report.failed), (0, 0), "{report:?}");
    assert!(report.ok > 0, "{report:?}");
    let after = agent_process(&agent);
    assert_eq!(after["worker_pid"], before["worker_pid"]);
    assert_eq!(after["supervisor_pid"], before["supervisor_pid"]);
    assert_eq!(agent.get("/count").body, report.ok.to_string());
    // AgentInfo and the events say so.
    let info = agent.json(&["info"]);
    let failed = &info["process"]["last_failed_restart"];
    assert_eq!(failed["exit"], "exited with code 3", "{info}");
    assert!(
        failed["stderr"].as_array().is_some_and(|lines| lines
            .iter()
            .any(|l| l.as_str().unwrap().contains("this build is broken"))),
        "{info}"
    );
    let recorded = event(&agent, "agent_restart_failed", Duration::from_secs(10))
        .unwrap_or_else(|| panic!("no agent_restart_failed event; log:\n{}", agent.log()));
    let message = recorded["message"].as_str().unwrap();
    assert!(
        message.contains("exited with code 3") && message.contains("this build is broken"),
        "{recorded}"
    );

    // With a good binary back, the next restart goes through.
    install(&binary, &another_build("a fixed build"));
    agent.ctl(&["agent", "restart", "--wait"]).ok();
    let fixed = agent_process(&agent);
    assert_ne!(fixed["worker_pid"], before["worker_pid"]);
    assert_ne!(fixed["binary_sha256"], before["binary_sha256"]);
    assert_eq!(fixed["supervisor_pid"], before["supervisor_pid"]);
}

#[test]
fn a_new_worker_that_dies_after_the_handover_is_replaced_from_the_binary_that_served() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // Every worker started for a self-upgrade dies once the old one has
    // handed its state over (the first worker is none of them).
    let agent = Agent::start_with_env(&data, &[], &[("NINE9S_CRASH_AT", "handover:received")]);
    nine9s_tests::stage_sample(&agent, "0.2.0");
    agent.ctl(&["upgrade", "--to", "0.2.0", "--permanent"]).ok();
    let before = agent_process(&agent);

    let load = Load::start(agent.http, "/", 8);
    std::thread::sleep(Duration::from_millis(300));
    let out = agent.ctl(&["agent", "restart", "--wait", "--timeout", "30s"]);
    let serving = agent.new_worker(before["worker_pid"].as_u64().unwrap() as u32);
    std::thread::sleep(Duration::from_millis(300));
    let report = load.stop();
    assert_eq!(out.code, 1, "{out:?}\nlog:\n{}", agent.log());
    assert!(out.stderr.contains("was killed by SIGKILL"), "{out:?}");
    // The old worker's state reached the store; the worker that took over
    // from it runs the binary that served.
    assert_eq!((report.refused, report.failed), (0, 0), "{report:?}");
    assert_eq!(agent.get("/count").body, report.ok.to_string());
    let after = agent_process(&agent);
    assert_eq!(after["worker_pid"], serving);
    assert_eq!(after["binary_sha256"], before["binary_sha256"]);
    assert_eq!(after["supervisor_pid"], before["supervisor_pid"]);
    assert_eq!(
        agent.json(&["info"])["process"]["last_failed_restart"]["exit"],
        "was killed by SIGKILL"
    );
}

#[test]
fn the_supervisor_refuses_to_re_execute_a_binary_that_cannot_start() {
    let dir = tempfile::tempdir().unwrap();
    let (agent, binary) = on_a_copy_of_the_binary(dir.path());
    let worker = agent.worker_pid();
    install(&binary, BROKEN_BINARY.as_bytes());

    let load = Load::start(agent.http, "/", 4);
    std::thread::sleep(Duration::from_millis(200));
    kill("USR2", agent.pid());
    let mut failed = serde_json::Value::Null;
    assert!(
        eventually(Duration::from_secs(20), || {
            failed = agent
                .ctl(&["--output", "json", "info"])
                .stdout
                .parse::<serde_json::Value>()
                .map(|info| info["process"]["last_failed_restart"].clone())
                .unwrap_or_default();
            failed.is_object()
        }),
        "no failed restart in AgentInfo; log:\n{}",
        agent.log()
    );
    std::thread::sleep(Duration::from_millis(200));
    let report = load.stop();
    assert_eq!((report.refused, report.failed), (0, 0), "{report:?}");
    assert_eq!(failed["supervisor"], true, "{failed}");
    assert_eq!(failed["exit"], "exited with code 3", "{failed}");
    assert!(
        failed["stderr"]
            .to_string()
            .contains("this build is broken"),
        "{failed}"
    );
    assert!(event(&agent, "agent_restart_failed", Duration::from_secs(10)).is_some());
    // The same supervisor and worker go on; the binary fixed, the re-exec
    // goes through.
    assert_eq!(agent.worker_pid(), worker);
    assert_eq!(agent.status()["agent"]["supervisor_pid"], agent.pid());
    install(&binary, &another_build("a fixed build"));
    agent.reexec_supervisor();
    assert_eq!(agent.worker_pid(), worker);
    assert_eq!(agent.get("/").status, 200);
}
