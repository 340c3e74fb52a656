//! The plugin ABI (issue 11): version 2 gives a plugin its request headers
//! as name/value pairs with their bytes, lets it answer with any headers,
//! the agent's log and clock, and a `stop` before unloading; a release
//! built against version 1 (a frozen copy of that SDK) still stages, serves,
//! carries its state both ways and survives a restart; and the SDK refuses
//! to build a plugin with `panic = "abort"`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;

use nine9s_tests::{hello, root, stage_fixture, stage_sample, Agent};

/// Sends `head` (the request line and headers, raw bytes) and returns the
/// response head's lines, as bytes, and the body.
fn raw_request(addr: SocketAddr, head: &[u8]) -> (Vec<Vec<u8>>, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.write_all(head).unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).unwrap();
    let split = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a response head");
    let lines = answer[..split]
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l).to_vec())
        .collect();
    let body = String::from_utf8_lossy(&answer[split + 4..]).into_owned();
    (lines, body)
}

/// The values of the response headers named `name` (lower case).
fn values(lines: &[Vec<u8>], name: &str) -> Vec<Vec<u8>> {
    lines
        .iter()
        .filter_map(|line| {
            let colon = line.iter().position(|&b| b == b':')?;
            let (n, v) = line.split_at(colon);
            n.eq_ignore_ascii_case(name.as_bytes())
                .then(|| v[1..].trim_ascii().to_vec())
        })
        .collect()
}

#[test]
fn a_release_built_for_abi_v1_loads_serves_and_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let agent = Agent::start(&data, &[]);
    let info = agent.json(&["info"]);
    assert_eq!(info["abi_versions"], serde_json::json!([1, 2, 3]));
    let staged = stage_fixture(&agent, "abi-v1");
    assert_eq!(staged.code, 0, "{staged:?}");
    agent.ctl(&["upgrade", "--to", "0.4.1", "--permanent"]).ok();
    hello(&agent, 3);
    let reply = agent.get("/count");
    assert_eq!(
        (reply.body.as_str(), reply.release.as_str()),
        ("3", "0.4.1")
    );
    // v1 hands headers over as `name: value` lines.
    let (_, body) = raw_request(
        agent.http,
        b"GET /headers HTTP/1.1\r\nhost: x\r\nx-test: v1 lines\r\nconnection: close\r\n\r\n",
    );
    assert!(body.contains("x-test: v1 lines"), "{body}");

    // A restart boots it again, with its state.
    assert_eq!(agent.terminate(), 0);
    let agent = Agent::start(&data, &[]);
    assert_eq!(agent.status()["active_version"], "0.4.1");
    let reply = agent.get("/count");
    assert_eq!(
        (reply.body.as_str(), reply.release.as_str()),
        ("3", "0.4.1")
    );

    // State crosses between a v1 and a v2 release, both ways.
    stage_sample(&agent, "0.2.0");
    agent
        .ctl(&["downgrade", "--to", "0.2.0", "--permanent"])
        .ok();
    assert_eq!(agent.get("/count").body, "3");
    hello(&agent, 1);
    agent.ctl(&["upgrade", "--to", "0.4.1", "--permanent"]).ok();
    let reply = agent.get("/count");
    assert_eq!(
        (reply.body.as_str(), reply.release.as_str()),
        ("4", "0.4.1")
    );
}

#[test]
fn abi_v2_headers_go_both_ways_with_their_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&dir.path().join("data"), &[]);
    let staged = stage_fixture(&agent, "headers");
    assert_eq!(staged.code, 0, "{staged:?}");
    agent.ctl(&["upgrade", "--to", "0.4.2", "--permanent"]).ok();

    // Request headers arrive as pairs: bytes kept (a non-UTF-8 value),
    // repeated names kept apart.
    let (lines, _) = raw_request(
        agent.http,
        b"GET /echo HTTP/1.1\r\nhost: x\r\nx-bytes: \xff\xfe ok\r\nx-repeat: 1\r\nx-repeat: 2\r\nconnection: close\r\n\r\n",
    );
    assert_eq!(values(&lines, "x-echo-x-bytes"), [b"fffe206f6b".to_vec()]);
    assert_eq!(values(&lines, "x-repeat-count"), [b"2".to_vec()]);
    assert_eq!(values(&lines, "x-nine9s-release"), [b"0.4.2".to_vec()]);

    // Responses carry any headers, a name repeated.
    let (lines, _) = raw_request(
        agent.http,
        b"GET /cookies HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    );
    assert_eq!(
        values(&lines, "set-cookie"),
        [b"a=1; Path=/".to_vec(), b"b=2; Path=/".to_vec()]
    );
    assert_eq!(values(&lines, "cache-control"), [b"no-store".to_vec()]);
    let (lines, _) = raw_request(
        agent.http,
        b"GET /moved HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    );
    assert!(lines[0].starts_with(b"HTTP/1.1 308"), "{lines:?}");
    assert_eq!(values(&lines, "location"), [b"/count".to_vec()]);

    // The plugin logs through the agent, with its version.
    let log = agent.log();
    let started = log
        .lines()
        .find(|l| l.contains("headers fixture started its ticker thread"))
        .unwrap_or_else(|| panic!("no plugin log line in:\n{log}"));
    assert!(started.contains("release=0.4.2"), "{started}");

    // Switching away stops the instance (its thread joined) before the
    // library is unloaded; the agent serves on.
    stage_sample(&agent, "0.2.0");
    agent
        .ctl(&["downgrade", "--to", "0.2.0", "--permanent"])
        .ok();
    assert!(nine9s_tests::eventually(
        std::time::Duration::from_secs(10),
        || agent
            .log()
            .contains("headers fixture joined its ticker thread")
    ));
    // Released: gone, or (a thread it ran registered thread-local
    // destructors, so glibc keeps it mapped) lingering, never called again.
    assert!(nine9s_tests::eventually(
        std::time::Duration::from_secs(10),
        || agent.status()["libraries"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|l| l["version"] == "0.4.2")
            .all(|l| l["lingering"] == true)
    ));
    assert_eq!(agent.get("/").status, 200);
}

/// Builds a one-line plugin against the SDK with `rustc` directly (as the
/// agent's build script builds the embedded sample) and `extra` flags.
fn build_plugin(dir: &Path, extra: &[&str]) -> std::process::Output {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let sdk = dir.join("libnine9s_sdk.rlib");
    let built = Command::new(&rustc)
        .args([
            "--edition",
            "2021",
            "--crate-type",
            "rlib",
            "--crate-name",
            "nine9s_sdk",
        ])
        .args(extra)
        .arg(root().join("plugins/sdk/src/lib.rs"))
        .arg("-o")
        .arg(&sdk)
        .output()
        .unwrap();
    assert!(built.status.success(), "{built:?}");
    let plugin = dir.join("plugin.rs");
    std::fs::write(
        &plugin,
        "struct P;\n\
         impl nine9s_sdk::Plugin for P {\n\
             fn init(_: Option<&[u8]>) -> Result<Self, String> { Ok(P) }\n\
             fn handle(&self, _: &nine9s_sdk::Request<'_>) -> nine9s_sdk::Response { nine9s_sdk::Response::text(\"hi\") }\n\
         }\n\
         nine9s_sdk::export_plugin!(P, name = \"p\");\n",
    )
    .unwrap();
    Command::new(&rustc)
        .args([
            "--edition",
            "2021",
            "--crate-type",
            "cdylib",
            "--crate-name",
            "p",
        ])
        .args(extra)
        .arg("--extern")
        .arg(format!("nine9s_sdk={}", sdk.display()))
        .arg(&plugin)
        .arg("--out-dir")
        .arg(dir)
        .env("CARGO_PKG_VERSION", "0.0.1")
        .output()
        .unwrap()
}

#[test]
fn a_plugin_built_with_panic_abort_does_not_compile() {
    let dir = tempfile::tempdir().unwrap();
    let unwinding = build_plugin(dir.path(), &[]);
    assert!(unwinding.status.success(), "{unwinding:?}");
    let aborting = build_plugin(dir.path(), &["-C", "panic=abort"]);
    assert!(!aborting.status.success(), "{aborting:?}");
    let stderr = String::from_utf8_lossy(&aborting.stderr);
    assert!(
        stderr.contains("nine9s plugins must unwind on panic"),
        "{stderr}"
    );
}
