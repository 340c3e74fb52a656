//! Local paths to the agent's admin: a data dir, token, tokens file, TLS
//! key or trusted key that another local user made or can change is
//! refused at start (exit 2, the path and its owner named), never adopted.
//! The tests run as root, so "another user" is `nobody` (uid 65534), made
//! the owner with chown.

use std::os::unix::fs::{chown, symlink, PermissionsExt};
use std::path::Path;
use std::process::Command;

use nine9s_tests::{bin_dir, refusal, Agent};

const NOBODY: u32 = 65534;

fn is_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
}

/// Runs the agent (or `agent FLAGS check` with `check`) over `data` and
/// expects it to refuse to start: exit 2 within 30 s. Returns its stderr.
fn refused_at_start(data: &Path, extra: &[&str], check: bool) -> String {
    let log = data.with_extension("refusal.log");
    let mut command = Command::new(bin_dir().join("agent"));
    command
        .arg("--data-dir")
        .arg(data)
        .args(["--http", "127.0.0.1:0", "--grpc", "127.0.0.1:0"])
        .args(extra)
        .args(check.then_some("check"));
    let (code, stderr) = refusal(command, &log);
    assert_eq!(code, Some(2), "{stderr}");
    stderr
}

fn mode(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[test]
fn a_data_dir_another_user_made_is_refused_with_its_planted_token() {
    if !is_root() {
        return;
    }
    let top = tempfile::tempdir().unwrap();
    let data = top.path().join("nine9s-data");
    std::fs::create_dir(&data).unwrap();
    let token = data.join("admin.token");
    std::fs::write(&token, "planted-by-nobody-0123456789\n").unwrap();
    for path in [&data, &token] {
        chown(path, Some(NOBODY), Some(NOBODY)).unwrap();
    }
    for check in [false, true] {
        let stderr = refused_at_start(&data, &[], check);
        assert!(
            stderr.contains(data.to_str().unwrap()) && stderr.contains("uid 65534"),
            "{stderr}"
        );
        assert!(stderr.contains("nobody"), "the owner's name: {stderr}");
    }
    // Nothing was made in it: no store was opened.
    assert!(!data.join("db").exists());

    // A data dir of the agent's user's own, with a token another user put in it.
    let data = top.path().join("mine");
    std::fs::create_dir(&data).unwrap();
    let token = data.join("admin.token");
    std::fs::write(&token, "planted-by-nobody-0123456789\n").unwrap();
    chown(&token, Some(NOBODY), None).unwrap();
    let stderr = refused_at_start(&data, &[], false);
    assert!(
        stderr.contains(token.to_str().unwrap()) && stderr.contains("uid 65534"),
        "{stderr}"
    );
}

#[test]
fn a_directory_on_the_way_that_others_can_write_is_refused() {
    let top = tempfile::tempdir().unwrap();
    // World-writable without the sticky bit: anyone could have made (or
    // later swap) the data dir in it.
    let shared = top.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    mode(&shared, 0o777);
    let data = shared.join("nine9s-data");
    let stderr = refused_at_start(&data, &[], false);
    assert!(
        stderr.contains(shared.to_str().unwrap()) && stderr.contains("writable by group or others"),
        "{stderr}"
    );
    assert!(!data.exists(), "nothing was made under it");
    // With the sticky bit (like /tmp) others cannot replace what is ours.
    mode(&shared, 0o1777);
    let agent = Agent::start(&data, &[]);
    assert_eq!(agent.get("/").status, 200);
}

#[test]
fn a_symlinked_token_or_store_in_the_data_dir_is_refused() {
    let top = tempfile::tempdir().unwrap();
    let data = top.path().join("data");
    std::fs::create_dir(&data).unwrap();
    mode(&data, 0o700);
    let elsewhere = top.path().join("elsewhere.token");
    std::fs::write(&elsewhere, "0123456789abcdef0123456789\n").unwrap();
    mode(&elsewhere, 0o600);
    symlink(&elsewhere, data.join("admin.token")).unwrap();
    let stderr = refused_at_start(&data, &[], false);
    assert!(
        stderr.contains("admin.token") && stderr.contains("symbolic link"),
        "{stderr}"
    );
    std::fs::remove_file(data.join("admin.token")).unwrap();
    let store = top.path().join("store");
    std::fs::create_dir(&store).unwrap();
    symlink(&store, data.join("db")).unwrap();
    let stderr = refused_at_start(&data, &[], false);
    assert!(
        stderr.contains("db") && stderr.contains("symbolic link"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read_dir(&store).unwrap().count(),
        0,
        "no store opened there"
    );
}

#[test]
fn a_tokens_file_or_tls_key_others_can_read_is_refused() {
    let top = tempfile::tempdir().unwrap();
    let tokens = top.path().join("tokens");
    std::fs::write(&tokens, "ops admin 0123456789abcdef0123\n").unwrap();
    mode(&tokens, 0o644);
    let data = top.path().join("data");
    let flags = ["--tokens", tokens.to_str().unwrap()];
    for check in [false, true] {
        let stderr = refused_at_start(&data, &flags, check);
        assert!(
            stderr.contains(tokens.to_str().unwrap())
                && stderr.contains("readable by group or others"),
            "{stderr}"
        );
    }
    // Owner-only, it is taken.
    mode(&tokens, 0o600);
    let agent = Agent::start(&data, &flags);
    assert_eq!(agent.get("/").status, 200);
    drop(agent);

    // The TLS key: checked before it is parsed (these are no PEM at all).
    let (cert, key) = (top.path().join("cert.pem"), top.path().join("key.pem"));
    std::fs::write(&cert, "not a certificate").unwrap();
    std::fs::write(&key, "not a key").unwrap();
    mode(&key, 0o604);
    let stderr = refused_at_start(
        &data,
        &[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
        false,
    );
    assert!(
        stderr.contains(key.to_str().unwrap()) && stderr.contains("readable by group or others"),
        "{stderr}"
    );
}

#[test]
fn a_trusted_key_another_user_planted_is_refused() {
    if !is_root() {
        return;
    }
    let top = tempfile::tempdir().unwrap();
    let keys = top.path().join("trusted");
    std::fs::create_dir(&keys).unwrap();
    let made = nine9s_tests::ctl(
        "http://127.0.0.1:1",
        &["keygen", "--out", top.path().join("k").to_str().unwrap()],
    );
    assert_eq!(made.code, 0, "{made:?}");
    let planted = keys.join("mallory.pub");
    std::fs::copy(top.path().join("k/nine9s.pub"), &planted).unwrap();
    chown(&planted, Some(NOBODY), None).unwrap();
    let stderr = refused_at_start(
        &top.path().join("data"),
        &["--trusted-keys", keys.to_str().unwrap()],
        false,
    );
    assert!(
        stderr.contains(planted.to_str().unwrap()) && stderr.contains("uid 65534"),
        "{stderr}"
    );
    // A keys directory others can write to is refused too.
    chown(&planted, Some(0), None).unwrap();
    mode(&keys, 0o777);
    let stderr = refused_at_start(
        &top.path().join("data"),
        &["--trusted-keys", keys.to_str().unwrap()],
        true,
    );
    assert!(stderr.contains("writable by group or others"), "{stderr}");
}
