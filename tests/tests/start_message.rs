//! What the supervisor tells a worker, and its previous image tells a
//! re-executed supervisor, comes in a start message on an inherited
//! socket, never in the environment (issue 18): a release's processes
//! never see it, and whoever starts `agent` (or `agent worker`) cannot
//! forge a supervisor, a handover, an adoption, a restart count or how a
//! last worker ended with `NINE9S_*` variables. A start message itself is
//! believed only from the process's parent (or, for an adoption, of its
//! own child).

use std::io::Write;
use std::net::TcpListener;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use command_fds::{CommandFdExt, FdMapping};
use nine9s_proto::StatusRequest;
use nine9s_tests::{bin_dir, eventually, hello, kill, on_0_2_0, stage_fixture, Agent};

/// The variables the supervisor once passed its workers and its own next
/// image, each with a forged value for the agent to ignore: a supervisor
/// (the test itself, the parent of an `agent worker` it starts), a
/// handover, an adoption, restarts, how a last worker ended, a failed
/// self-upgrade.
fn forged(adopt: u32) -> Vec<(&'static str, String)> {
    vec![
        ("NINE9S_SUPERVISOR_PID", std::process::id().to_string()),
        ("NINE9S_HANDOVER", "1".to_owned()),
        ("NINE9S_ADOPT_WORKER", adopt.to_string()),
        ("NINE9S_WORKER_RESTARTS", "7".to_owned()),
        ("NINE9S_PREVIOUS_EXIT", "was killed by SIGSEGV".to_owned()),
        (
            "NINE9S_FAILED_RESTART",
            r#"{"pid":1,"exit":"exited with code 3","stderr":["forged"],"at_ms":1,"supervisor":false}"#
                .to_owned(),
        ),
    ]
}

fn pairs<'a>(env: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    env.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

/// The parent of process `pid`, from `/proc/PID/stat`.
fn parent_of(pid: u32) -> u32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The command (in parentheses) may hold spaces: the fields after it.
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    after.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// `nine9s_worker_restarts_total` from the `--metrics` listener.
fn worker_restarts(agent: &Agent) -> String {
    let metrics = agent.ready_address("metrics").expect("a metrics address");
    let reply = nine9s_tests::get(metrics, "/metrics");
    reply
        .body
        .lines()
        .find_map(|l| l.strip_prefix("nine9s_worker_restarts_total "))
        .unwrap_or_else(|| panic!("no restarts in {}", reply.body))
        .to_owned()
}

/// The `NINE9S_*` variables the serving release's worker was started with
/// (the snoop fixture's `GET /environ`) beyond those this test was.
fn supervisor_variables(agent: &Agent) -> Vec<String> {
    let reply = agent.get("/environ");
    assert_eq!(reply.status, 200, "{reply:?}");
    reply
        .body
        .lines()
        .filter(|name| name.starts_with("NINE9S_") && std::env::var_os(name).is_none())
        .map(str::to_owned)
        .collect()
}

#[test]
fn a_release_never_sees_what_the_supervisor_tells_its_worker() {
    let dir = tempfile::tempdir().unwrap();
    let agent = on_0_2_0(&dir.path().join("data"), &[], 3);
    stage_fixture(&agent, "snoop").ok();
    agent.ctl(&["upgrade", "--to", "0.2.4", "--permanent"]).ok();
    assert_eq!(agent.get("/count").body, "3", "the state went across");
    // The first worker.
    assert_eq!(supervisor_variables(&agent), Vec::<String>::new());

    // A worker that replaces one that died: told how, and the restarts.
    let first = agent.worker_pid();
    kill("KILL", first);
    let second = agent.new_worker(first);
    let process = agent.status()["agent"].clone();
    assert_eq!(
        process["previous_exit"], "was killed by SIGKILL",
        "{process}"
    );
    assert_eq!(process["supervisor_pid"], agent.pid(), "{process}");
    assert_eq!(supervisor_variables(&agent), Vec::<String>::new());

    // A self-upgrade's worker: told another holds the store.
    agent.ctl(&["agent", "restart", "--wait"]).ok();
    agent.new_worker(second);
    assert_eq!(agent.get("/count").body, "3", "the state was handed over");
    assert_eq!(supervisor_variables(&agent), Vec::<String>::new());
}

#[test]
fn an_agent_started_with_forged_variables_starts_as_the_first() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    assert_eq!(on_0_2_0(&data, &[], 3).terminate(), 0);
    // A live process the agent did not start, to adopt.
    let mut stranger = Command::new("sleep").arg("60").spawn().unwrap();
    let env = forged(stranger.id());
    let agent = Agent::start_with_env(&data, &["--metrics", "127.0.0.1:0"], &pairs(&env));
    let process = agent.status()["agent"].clone();
    let worker = agent.worker_pid();
    assert_eq!(process["supervisor_pid"], agent.pid(), "{process}");
    assert_eq!(parent_of(worker), agent.pid(), "its own worker serves");
    assert_eq!(process["previous_exit"], "", "{process}");
    assert!(process["last_failed_restart"].is_null(), "{process}");
    assert_eq!(worker_restarts(&agent), "0");
    assert_eq!(agent.release_state("0.2.0"), "permanent");
    assert_eq!(agent.get("/count").body, "3");
    assert!(!agent.log().contains("supervisor re-executed"));
    // It goes on as any agent: a self-upgrade hands over to a new worker.
    hello(&agent, 1);
    agent.ctl(&["agent", "restart", "--wait"]).ok();
    agent.new_worker(worker);
    assert_eq!(agent.get("/count").body, "4");
    stranger.kill().unwrap();
    stranger.wait().unwrap();
}

#[test]
fn a_worker_started_by_hand_takes_no_word_from_its_environment() {
    let dir = tempfile::tempdir().unwrap();
    // Its parent is this test, as a supervisor is its worker's.
    let env = forged(std::process::id());
    let agent = Agent::start_with_env(
        &dir.path().join("data"),
        &["--metrics", "127.0.0.1:0", "worker"],
        &pairs(&env),
    );
    hello(&agent, 1);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let process = runtime.block_on(async {
        let mut api = agent.api().await;
        api.status(StatusRequest::default())
            .await
            .unwrap()
            .into_inner()
            .agent
            .expect("the agent's process")
    });
    assert_eq!(process.supervisor_pid, 0, "{process:?}");
    assert_eq!(process.worker_pid, agent.pid(), "{process:?}");
    assert_eq!(process.previous_exit, "", "{process:?}");
    assert!(process.last_failed_restart.is_none(), "{process:?}");
    assert_eq!(worker_restarts(&agent), "0");
}

/// Runs `agent --data-dir DATA [worker]` on listeners of its own with a
/// start message written by this test (not the process it names) on
/// `nine9s-birth`, and returns its exit code and stderr: it must refuse.
fn refused_start(data: &Path, mode: Option<&str>, message: &str) -> (Option<i32>, String) {
    let http = TcpListener::bind("127.0.0.1:0").unwrap();
    let grpc = TcpListener::bind("127.0.0.1:0").unwrap();
    let (mut here, there) = UnixStream::pair().unwrap();
    here.write_all(message.as_bytes()).unwrap();
    drop(here);
    let mut command = Command::new(bin_dir().join("agent"));
    command
        .arg("--data-dir")
        .arg(data)
        .args(mode)
        .env("LISTEN_FDS", "3")
        .env("LISTEN_FDNAMES", "http:grpc:nine9s-birth")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .fd_mappings(
            [OwnedFd::from(http), grpc.into(), there.into()]
                .into_iter()
                .zip(3..)
                .map(|(parent_fd, child_fd)| FdMapping {
                    parent_fd,
                    child_fd,
                })
                .collect(),
        )
        .unwrap();
    let mut child = command.spawn().unwrap();
    // Bounded: one that serves instead never exits by itself.
    let ended = eventually(Duration::from_secs(30), || {
        child.try_wait().unwrap().is_some()
    });
    if !ended {
        child.kill().unwrap();
    }
    let output = child.wait_with_output().unwrap();
    assert!(ended, "it did not refuse");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn a_start_message_is_believed_only_from_the_parent_of_a_child() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // A worker told its supervisor is pid 1: not its parent.
    let (code, stderr) = refused_start(
        &data,
        Some("worker"),
        r#"{"to":"worker","supervisor":1,"restarts":0,"previous_exit":null,"failed_restart":null,"store_wait":true,"secrets":null}"#,
    );
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("names supervisor 1, but this worker's parent is"),
        "{stderr}"
    );
    // A supervisor told to adopt pid 1, on a socket it did not make.
    let (code, stderr) = refused_start(
        &data,
        None,
        r#"{"to":"supervisor","worker":1,"restarts":7}"#,
    );
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("not written by this process's previous image"),
        "{stderr}"
    );
}
