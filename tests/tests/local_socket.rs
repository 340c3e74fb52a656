//! ctl never hands a credential to a server that has not proven it is the
//! agent (issue 17, item 2): no token over plaintext http://, no token
//! read from the working directory, and on the agent's machine the local
//! control socket `DATA/control.sock`, where the agent knows the caller
//! by its uid and only its own user and root get in.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};

use nine9s_tests::{bin_dir, ctl_in, stage_sample, Agent, Ctl};

const TOKEN: &str = "planted-admin-token-0123456789abcdef";

/// A gRPC server on a free loopback port that is not the agent (it knows
/// only the health service) and keeps the `authorization` metadata of
/// every request it gets: whoever could bind the agent's port.
struct Listener {
    address: SocketAddr,
    /// One entry a request: its `authorization`, or "" without one.
    seen: Arc<Mutex<Vec<String>>>,
    _runtime: tokio::runtime::Runtime,
}

impl Listener {
    fn start() -> Listener {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let address = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = {
            let seen = Arc::clone(&seen);
            move |request: tonic::Request<()>| {
                let authorization = request
                    .metadata()
                    .get("authorization")
                    .map(|v| v.to_str().unwrap_or("(not ASCII)").to_owned());
                seen.lock().unwrap().push(authorization.unwrap_or_default());
                Ok(request)
            }
        };
        let (_, health) = tonic_health::server::health_reporter();
        runtime.spawn(
            tonic::transport::Server::builder()
                .layer(tonic::service::InterceptorLayer::new(record))
                .add_service(health)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        Listener {
            address,
            seen,
            _runtime: runtime,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }
}

#[test]
fn a_token_is_never_sent_over_plaintext_http() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let listener = Listener::start();
    let url = listener.url();
    let by_file = ctl_in(
        dir.path(),
        &[
            "--agent",
            &url,
            "--token-file",
            token_file.to_str().unwrap(),
            "status",
        ],
        &[],
    );
    let by_env = ctl_in(
        dir.path(),
        &["status"],
        &[("NINE9S_AGENT", &url), ("NINE9S_TOKEN", TOKEN)],
    );
    let seen = listener.seen();
    assert!(seen.is_empty(), "ctl called a stranger: {seen:?}");
    for out in [&by_file, &by_env] {
        assert_eq!(out.code, 2, "{out:?}");
        assert!(out.stderr.contains("plaintext"), "{out:?}");
        assert!(out.stderr.contains("unix:"), "{out:?}");
        assert!(out.stderr.contains("https://"), "{out:?}");
    }
}

#[test]
fn ctl_never_reads_a_token_planted_in_its_working_directory() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("nine9s-data")).unwrap();
    std::fs::write(
        dir.path().join("nine9s-data/admin.token"),
        format!("{TOKEN}\n"),
    )
    .unwrap();
    // Whoever holds the port the agent would use.
    let listener = Listener::start();
    let out = ctl_in(
        dir.path(),
        &["status"],
        &[("NINE9S_AGENT", &listener.url())],
    );
    // It asked the stranger (with nothing to prove who it is, it may) but
    // sent no token.
    let seen = listener.seen();
    assert!(!seen.is_empty(), "{out:?}");
    assert!(
        seen.iter().all(String::is_empty),
        "a token was sent: {seen:?}"
    );
    assert_eq!(out.code, 1, "{out:?}");
    // With no agent named, ctl looks for the local socket here: there is
    // none, and it says how to name an agent.
    let out = ctl_in(dir.path(), &["status"], &[]);
    assert_eq!(out.code, 3, "{out:?}");
    assert!(out.stderr.contains("no agent is running"), "{out:?}");
    assert!(out.stderr.contains("ctl --data-dir DIR"), "{out:?}");
}

#[test]
fn the_owner_drives_the_agent_on_its_socket_with_no_token() {
    let dir = tempfile::tempdir().unwrap();
    // The agent's default data dir under the directory it runs in.
    let data = dir.path().join("nine9s-data");
    let agent = Agent::start(&data, &[]);
    let socket = data.join("control.sock");
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "control.sock mode {mode:o}");
    // ctl in that directory, nothing given: the socket, no token.
    let out = ctl_in(dir.path(), &["--output", "json", "status"], &[]);
    assert_eq!(out.code, 0, "{out:?}");
    stage_sample(&agent, "0.2.0").ok();
    agent
        .ctl(&[
            "upgrade",
            "--to",
            "0.2.0",
            "--permanent",
            "--reason",
            "local",
        ])
        .ok();
    assert_eq!(agent.get("/").release, "0.2.0");
    let history = agent.json(&["history"]);
    let upgrade = history["transitions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["kind"] == "upgrade")
        .cloned()
        .unwrap();
    let who = upgrade["identity"].as_str().unwrap();
    assert!(who.starts_with("local:"), "{upgrade}");
    // A self-upgrade's new worker serves the same socket.
    let worker = agent.worker_pid();
    agent.ctl(&["agent", "restart", "--wait"]).ok();
    assert_ne!(agent.worker_pid(), worker);
    agent.ctl(&["status"]).ok();
}

/// Runs ctl as `nobody` (uid 65534).
fn ctl_as_nobody(agent: &str, args: &[&str]) -> Ctl {
    let output = Command::new("setpriv")
        .args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
        .arg(bin_dir().join("ctl"))
        .args(["--agent", agent])
        .args(args)
        .current_dir("/")
        .env_remove("NINE9S_TOKEN")
        .env_remove("NINE9S_TOKEN_FILE")
        .output()
        .expect("run setpriv");
    Ctl {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

#[test]
fn another_user_is_kept_off_the_socket_by_the_dir_and_refused_by_the_agent() {
    let root = Command::new("id").arg("-u").output().unwrap();
    if String::from_utf8_lossy(&root.stdout).trim() != "0" {
        eprintln!("skipped: needs root to run ctl as another user");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let agent = Agent::start(&data, &[]);
    // The 0700 data dir keeps nobody from even reaching the socket.
    let out = ctl_as_nobody(&agent.local(), &["status"]);
    assert_eq!(out.code, 3, "{out:?}");
    assert!(out.stderr.contains("ermission denied"), "{out:?}");
    // Were the dir and the socket open to all, the agent itself turns
    // the stranger away by its uid.
    let open = |path: &Path, mode: u32| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap()
    };
    open(dir.path(), 0o711);
    open(&data, 0o711);
    open(&data.join("control.sock"), 0o666);
    let out = ctl_as_nobody(&agent.local(), &["upgrade", "--to", "0.1.0"]);
    open(&data.join("control.sock"), 0o600);
    open(&data, 0o700);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("[UNAUTHENTICATED]"), "{out:?}");
    assert!(out.stderr.contains("uid 65534"), "{out:?}");
    let history = agent.json(&["history"]);
    assert_eq!(history["transitions"].as_array().unwrap().len(), 1);
}

/// `ctl --data-dir DIR` and `NINE9S_DATA_DIR` reach the agent of that data
/// dir over its local socket from any directory, the command the agent
/// logs works as written, and naming the agent twice is a usage error
/// (issue 18, item 4: ctl looked in `./nine9s-data` only).
#[test]
fn ctl_reaches_an_agent_by_its_data_dir_as_the_agent_says() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("state of the agent");
    let agent = Agent::start(&data, &[]);
    let elsewhere = tempfile::tempdir().unwrap();
    let data_arg = data.to_str().unwrap();
    let pid = |out: &Ctl| {
        assert_eq!(out.code, 0, "{out:?}");
        let status: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
        status["agent"]["worker_pid"].as_u64()
    };
    let worker = Some(u64::from(agent.worker_pid()));
    let flag = ctl_in(
        elsewhere.path(),
        &["--data-dir", data_arg, "--output", "json", "status"],
        &[],
    );
    assert_eq!(pid(&flag), worker);
    let variable = ctl_in(
        elsewhere.path(),
        &["--output", "json", "status"],
        &[("NINE9S_DATA_DIR", data_arg)],
    );
    assert_eq!(pid(&variable), worker);
    // The command in the agent's log, run through a shell as pasted.
    let log = agent.log();
    let logged = log
        .lines()
        .find_map(|line| line.split("ctl on this machine: `").nth(1))
        .and_then(|rest| rest.split('`').next())
        .unwrap_or_else(|| panic!("no ctl command in the log:\n{log}"))
        .to_owned();
    let pasted = Command::new("sh")
        .arg("-c")
        .arg(format!("{logged} --output json"))
        .env("PATH", format!("{}:/usr/bin:/bin", bin_dir().display()))
        .env_remove("NINE9S_DATA_DIR")
        .env_remove("NINE9S_AGENT")
        .current_dir(elsewhere.path())
        .output()
        .unwrap();
    assert!(pasted.status.success(), "{logged}: {pasted:?}");
    // Both typed: which agent is meant is unclear.
    let both = ctl_in(
        elsewhere.path(),
        &["--data-dir", data_arg, "--agent", &agent.local(), "status"],
        &[],
    );
    assert_eq!(both.code, 2, "{both:?}");
    assert!(both.stderr.contains("--data-dir"), "{both:?}");
    // A typed --agent wins over the variable: here a socket that is not
    // there, which is said as such.
    let missing = format!("unix:{}", elsewhere.path().join("none.sock").display());
    let typed = ctl_in(
        elsewhere.path(),
        &["--agent", &missing, "status"],
        &[("NINE9S_DATA_DIR", data_arg)],
    );
    assert_eq!(typed.code, 3, "{typed:?}");
}
