//! A service of one's own, as the README's "Your own service" walks it
//! (issue 18, item 3): `ctl new` writes a release crate, cargo builds it
//! outside this workspace, an agent started with `--bootstrap` serves it,
//! and its next version is staged and upgraded to with its state carried.

use std::path::Path;
use std::process::Command;

use nine9s_tests::{ctl_in, Agent};

/// `cargo build` of the crate in `dir` (its own target directory), which
/// must succeed.
fn build(dir: &Path) {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let built = Command::new(cargo)
        .args(["build", "--quiet", "--manifest-path"])
        .arg(dir.join("Cargo.toml"))
        .env_remove("CARGO_TARGET_DIR")
        .output()
        .unwrap();
    assert!(built.status.success(), "{built:?}");
}

/// Sets the crate's version in both its Cargo.toml and its release.toml.
fn set_version(dir: &Path, from: &str, to: &str) {
    for file in ["Cargo.toml", "release.toml"] {
        let path = dir.join(file);
        let text = std::fs::read_to_string(&path).unwrap();
        let line = format!("version = \"{from}\"");
        assert!(text.contains(&line), "{file}: {text}");
        std::fs::write(&path, text.replace(&line, &format!("version = \"{to}\""))).unwrap();
    }
}

#[test]
fn a_crate_from_ctl_new_is_served_from_bootstrap_and_upgraded_with_its_state() {
    let work = tempfile::tempdir().unwrap();
    let crate_dir = work.path().join("my-service");
    let dir = crate_dir.to_str().unwrap();
    let made = ctl_in(work.path(), &["--output", "json", "new", dir], &[]);
    assert_eq!(made.code, 0, "{made:?}");
    let made: serde_json::Value = serde_json::from_str(&made.stdout).unwrap();
    assert_eq!(
        (made["name"].as_str(), made["version"].as_str()),
        (Some("my-service"), Some("0.1.0"))
    );
    // Never over what is there; a name cargo would refuse is a usage error.
    let again = ctl_in(work.path(), &["new", dir], &[]);
    assert_eq!(again.code, 1, "{again:?}");
    assert!(
        again.stderr.contains("exists; nothing was written"),
        "{again:?}"
    );
    let bad = ctl_in(work.path(), &["new", "My Service!"], &[]);
    assert_eq!(bad.code, 2, "{bad:?}");
    assert!(!work.path().join("My Service!").exists());

    build(&crate_dir);
    let agent = Agent::start(&work.path().join("data"), &["--bootstrap", dir]);
    let hello = agent.get("/");
    assert_eq!(
        (hello.status, hello.release.as_str()),
        (200, "0.1.0"),
        "{hello:?}"
    );
    assert_eq!(hello.body, "hello from my-service 0.1.0 (1 served)\n");
    agent.get("/");

    set_version(&crate_dir, "0.1.0", "0.2.0");
    build(&crate_dir);
    // No --library: ctl finds it in the crate's own target directory.
    agent.ctl(&["stage", dir]).ok();
    agent.ctl(&["upgrade", "--to", "0.2.0", "--permanent"]).ok();
    let hello = agent.get("/");
    assert_eq!(
        (hello.status, hello.release.as_str()),
        (200, "0.2.0"),
        "{hello:?}"
    );
    assert_eq!(hello.body, "hello from my-service 0.2.0 (3 served)\n");
    assert_eq!(agent.get("/count").body, "3");
}
