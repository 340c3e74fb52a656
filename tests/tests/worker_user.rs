//! `--worker-user`: the supervisor stays root and every worker — the
//! process that runs a release's code — runs as another user, so a
//! release staged by a deploy-role caller cannot read the admin token or
//! the tokens file (issue 17 item 11). The release here is the `snoop`
//! fixture, which answers `GET /secrets` with what it could read of the
//! files named in its environment. The tests need root (the agent must be
//! root to start workers as `nobody`); as another user they say so and
//! pass.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use nine9s_proto::RemoveRequest;
use nine9s_tests::{bin_dir, hello, refusal, stage_fixture, stage_sample, Agent};

const NOBODY: u32 = 65534;

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// A temp dir with `mode`: the agent refuses a data dir its worker user
/// cannot reach.
fn tempdir_with_mode(mode: u32) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(mode)).unwrap();
    dir
}

/// A temp dir `nobody` may pass through, for the data dir.
fn passable_tempdir() -> tempfile::TempDir {
    tempdir_with_mode(0o711)
}

/// `Uid:` and `CapEff:` of a process, from /proc.
fn credentials(pid: u32) -> (Vec<u32>, String) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name} in {status}"))
            .trim()
            .to_owned()
    };
    let uids = field("Uid:")
        .split_whitespace()
        .map(|u| u.parse().unwrap())
        .collect();
    (uids, field("CapEff:"))
}

/// The snoop fixture made active (over nine9s 0.2.0 with three requests
/// counted), and its answer to `GET /secrets`.
fn snoop(agent: &Agent) -> String {
    stage_sample(agent, "0.2.0");
    agent.ctl(&["upgrade", "--to", "0.2.0", "--permanent"]).ok();
    hello(agent, 3);
    stage_fixture(agent, "snoop").ok();
    agent
        .ctl(&["upgrade", "--to", "0.2.4", "--soak", "1h"])
        .ok();
    assert_eq!(agent.get("/count").body, "3", "the state went across");
    let reply = agent.get("/secrets");
    assert_eq!(reply.status, 200, "{reply:?}");
    reply.body
}

/// Without `--worker-user` (the agent as root), the release reads the
/// admin token: the deploy role is the admin role. This is the hole.
#[test]
fn without_a_worker_user_a_release_reads_the_admin_token() {
    if !is_root() {
        eprintln!("skipped: the agent must run as root for this test");
        return;
    }
    let dir = passable_tempdir();
    let data = dir.path().join("data");
    let token = data.join("admin.token");
    let agent = Agent::start_with_env(
        &data,
        &[],
        &[("NINE9S_FIXTURE_SECRETS", token.to_str().unwrap())],
    );
    let seen = snoop(&agent);
    assert!(seen.contains("admin.token: read 65 bytes"), "{seen}");
}

#[test]
fn under_a_worker_user_a_release_reads_no_secret_and_the_admin_still_drives() {
    if !is_root() {
        eprintln!("skipped: the agent must run as root for this test");
        return;
    }
    let dir = passable_tempdir();
    let data = dir.path().join("data");
    let token = data.join("admin.token");
    let agent = Agent::start_with_env(
        &data,
        &["--worker-user", "nobody"],
        &[("NINE9S_FIXTURE_SECRETS", token.to_str().unwrap())],
    );
    // The worker is nobody, with no capability; the supervisor root.
    let worker = agent.worker_pid();
    let (uids, caps) = credentials(worker);
    assert_eq!(uids, vec![NOBODY; 4], "worker {worker}");
    assert_eq!(caps, "0000000000000000");
    assert_eq!(credentials(agent.pid()).0, vec![0; 4]);
    // The release is refused the admin token, which is root's, 0600.
    let seen = snoop(&agent);
    assert!(
        seen.contains("admin.token: refused (Permission denied"),
        "{seen}"
    );
    assert!(!seen.contains(": read "), "{seen}");
    let meta = std::fs::metadata(&token).unwrap();
    assert_eq!(
        (
            std::os::unix::fs::MetadataExt::uid(&meta),
            meta.permissions().mode() & 0o777
        ),
        (0, 0o600)
    );

    // The admin drives it: root on the local socket (ctl above), and the
    // token over TCP, checked against the digest the worker was handed.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let mut api = agent.api().await;
        let err = api
            .remove(RemoveRequest {
                version: "9.9.9".into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::NotFound, "{err:?}");
        let mut stranger = agent.api_with(Some("not-the-admin-token-at-all")).await;
        let err = stranger
            .remove(RemoveRequest {
                version: "9.9.9".into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
    });

    // A rollback keeps the state and serves.
    hello(&agent, 2);
    agent.ctl(&["rollback"]).ok();
    assert_eq!(agent.status()["active_version"], "0.2.0");
    assert_eq!(agent.get("/count").body, "5");

    // The worker asks its root supervisor for a new one (it cannot
    // signal root): the self-upgrade's handover keeps the state, and the
    // new worker is nobody too.
    agent.ctl(&["agent", "restart", "--wait"]).ok();
    let new = agent.new_worker(worker);
    assert_eq!(credentials(new).0, vec![NOBODY; 4], "worker {new}");
    assert_eq!(agent.get("/count").body, "5");

    // An upgrade after it still works: staging probes as nobody, the
    // rehearsal too.
    agent
        .ctl(&["upgrade", "--to", "0.2.4", "--soak", "1h"])
        .ok();
    assert_eq!(agent.status()["active_version"], "0.2.4");
    assert_eq!(agent.get("/count").body, "5");
    assert!(agent.get("/secrets").body.contains("refused"));
}

#[test]
fn under_a_worker_user_a_release_cannot_read_the_tokens_file() {
    if !is_root() {
        eprintln!("skipped: the agent must run as root for this test");
        return;
    }
    let dir = passable_tempdir();
    let data = dir.path().join("data");
    let tokens = dir.path().join("tokens");
    let admin = "an-admin-token-of-some-length";
    std::fs::write(&tokens, format!("ops admin {admin}\n")).unwrap();
    std::fs::set_permissions(&tokens, std::fs::Permissions::from_mode(0o600)).unwrap();
    let agent = Agent::start_with_env(
        &data,
        &[
            "--worker-user",
            "nobody",
            "--tokens",
            tokens.to_str().unwrap(),
        ],
        &[("NINE9S_FIXTURE_SECRETS", tokens.to_str().unwrap())],
    );
    let seen = snoop(&agent);
    assert!(
        seen.contains("tokens: refused (Permission denied"),
        "{seen}"
    );
    assert!(!data.join("admin.token").exists());
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let mut api = agent.api_with(Some(admin)).await;
        let err = api
            .remove(RemoveRequest {
                version: "9.9.9".into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::NotFound, "{err:?}");
    });
}

/// `agent --worker-user` as another user than root exits 2 at once, saying
/// why, before it binds or makes anything.
#[test]
fn a_worker_user_needs_a_root_agent() {
    if !is_root() {
        eprintln!("skipped: the test runs the agent as nobody with setpriv, which needs root");
        return;
    }
    if Command::new("setpriv").arg("--version").output().is_err() {
        eprintln!("skipped: no setpriv to run the agent as nobody");
        return;
    }
    let dir = passable_tempdir();
    let data = dir.path().join("data");
    let mut command = Command::new("setpriv");
    command
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(bin_dir().join("agent"))
        .arg("--data-dir")
        .arg(&data)
        .args(["--http", "127.0.0.1:0", "--grpc", "127.0.0.1:0"])
        .args(["--worker-user", "nobody"]);
    let (code, stderr) = refusal(command, &dir.path().join("log"));
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("--worker-user needs the agent to run as root"),
        "{stderr}"
    );
    assert!(!data.exists(), "nothing made");
}

/// A data dir the worker user cannot reach is refused with the directory
/// in the way named, as the operator's to fix (exit 2, as an unsafe path).
#[test]
fn a_data_dir_the_worker_user_cannot_reach_is_refused() {
    if !is_root() {
        eprintln!("skipped: the agent must run as root for this test");
        return;
    }
    let dir = tempdir_with_mode(0o700);
    let data = dir.path().join("data");
    let mut command = Command::new(bin_dir().join("agent"));
    command
        .arg("--data-dir")
        .arg(&data)
        .args(["--http", "127.0.0.1:0", "--grpc", "127.0.0.1:0"])
        .args(["--worker-user", "nobody"]);
    let (code, stderr) = refusal(command, &dir.path().join("log"));
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("cannot reach the data dir")
            && stderr.contains(&dir.path().display().to_string()),
        "{stderr}"
    );
}
