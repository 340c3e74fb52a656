//! Bad input gets a clear error and loses nothing: each refusal names what
//! was wrong, and the agent keeps serving the release it had.

use nine9s_tests::{ctl, fixture_dir, library, stage_fixture, Agent};

fn assert_still_serving(agent: &Agent) {
    let reply = agent.get("/");
    assert_eq!(
        (reply.status, reply.body.as_str(), reply.release.as_str()),
        (200, "Hello world!", "0.1.0")
    );
}

#[test]
fn a_file_that_is_not_a_library_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&dir.path().join("data"), &[]);
    let release = dir.path().join("junk");
    std::fs::create_dir(&release).unwrap();
    std::fs::write(
        release.join("release.toml"),
        "name = \"nine9s\"\nversion = \"0.2.0\"\nlibrary = \"libjunk.so\"\n",
    )
    .unwrap();
    std::fs::write(release.join("libjunk.so"), "this is not an ELF file\n").unwrap();

    let out = agent.ctl(&["stage", release.to_str().unwrap()]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr.contains("not an ELF shared library"),
        "{}",
        out.stderr
    );
    assert_eq!(out.stderr.lines().count(), 1, "one line: {}", out.stderr);
    assert_eq!(agent.release_state("0.2.0"), "absent");
    assert_still_serving(&agent);
}

#[test]
fn a_library_without_the_abi_symbol_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&dir.path().join("data"), &[]);
    let out = stage_fixture(&agent, "not-a-plugin");
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr.contains("not a nine9s plugin") && out.stderr.contains("NINE9S_ABI_VERSION"),
        "{}",
        out.stderr
    );
    assert_still_serving(&agent);
}

#[test]
fn a_library_of_another_abi_version_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&dir.path().join("data"), &[]);
    let out = stage_fixture(&agent, "wrong-abi");
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr.contains("ABI version 999") && out.stderr.contains("ABI version 1"),
        "names what was found and what was expected: {}",
        out.stderr
    );
    assert_still_serving(&agent);
}

#[test]
fn a_manifest_that_does_not_match_its_library_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&dir.path().join("data"), &[]);
    let release = dir.path().join("liar");
    std::fs::create_dir(&release).unwrap();
    std::fs::write(
        release.join("release.toml"),
        "name = \"nine9s\"\nversion = \"0.2.5\"\nlibrary = \"libnine9s_0_2_0.so\"\n",
    )
    .unwrap();
    let lib = library("nine9s_0_2_0");
    let out = agent.ctl(&[
        "stage",
        release.to_str().unwrap(),
        "--library",
        lib.to_str().unwrap(),
    ]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr.contains("0.2.5") && out.stderr.contains("nine9s 0.2.0"),
        "{}",
        out.stderr
    );
    assert_still_serving(&agent);
}

#[test]
fn unknown_versions_and_wrong_directions_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&dir.path().join("data"), &[]);
    let out = agent.ctl(&["upgrade", "--to", "9.9.9"]);
    assert_eq!(out.code, 1);
    assert!(
        out.stderr.contains("9.9.9 is not known") && out.stderr.contains("UNKNOWN_RELEASE"),
        "{}",
        out.stderr
    );

    let out = agent.ctl(&["upgrade", "--to", "nine"]);
    assert_eq!(out.code, 2, "a usage error");
    assert!(out.stderr.contains("not a version"), "{}", out.stderr);

    assert_eq!(stage_fixture(&agent, "panicky").code, 0);
    let out = agent.ctl(&["downgrade", "--to", "0.2.1"]);
    assert_eq!(out.code, 1);
    assert!(
        out.stderr.contains("that is an upgrade") && out.stderr.contains("WRONG_DIRECTION"),
        "{}",
        out.stderr
    );
    // Asking for what is already active converges: nothing to do.
    let reply = agent.json(&["upgrade", "--to", "0.1.0"]);
    assert_eq!(reply["unchanged"], true, "{reply}");
    assert!(reply["transition"].is_null(), "{reply}");
    assert_still_serving(&agent);
}

#[test]
fn staging_the_same_version_with_other_bytes_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&dir.path().join("data"), &[]);
    let panicky = fixture_dir("panicky");
    let out = stage_fixture(&agent, "panicky").ok();
    assert!(out.stdout.contains("staged nine9s 0.2.1"));
    let staged = agent.release("0.2.1").expect("0.2.1 is staged");
    let again = stage_fixture(&agent, "panicky").ok();
    assert!(again.stdout.contains("already staged"), "{again:?}");
    let other = library("fixture_unhealthy");
    let out = agent.ctl(&[
        "stage",
        panicky.to_str().unwrap(),
        "--library",
        other.to_str().unwrap(),
    ]);
    assert_eq!(out.code, 1, "{out:?}");
    assert_eq!(
        agent.release("0.2.1"),
        Some(staged),
        "the staged release keeps its bytes"
    );
    assert_still_serving(&agent);
}

#[test]
fn ctl_says_when_no_agent_answers() {
    // A port nothing listens on: bind one, then free it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = ctl(&format!("http://127.0.0.1:{port}"), &["status"]);
    assert_eq!(out.code, 3, "{out:?}");
    assert!(
        out.stderr.contains("cannot reach the agent"),
        "{}",
        out.stderr
    );
}

#[test]
fn an_oversized_request_body_gets_413_and_nothing_else_changes() {
    use std::io::{BufRead, BufReader, Write};

    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&dir.path().join("data"), &[]);
    let size = 17 * 1024 * 1024;
    let mut stream = std::net::TcpStream::connect(agent.http).unwrap();
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    let head = format!("POST / HTTP/1.1\r\nhost: x\r\ncontent-length: {size}\r\n\r\n");
    stream.write_all(head.as_bytes()).unwrap();
    let chunk = vec![b'x'; 1024 * 1024];
    for _ in 0..17 {
        // The agent may answer and close before the last chunk.
        if stream.write_all(&chunk).is_err() {
            break;
        }
    }
    let mut status = String::new();
    BufReader::new(stream).read_line(&mut status).unwrap();
    assert!(status.starts_with("HTTP/1.1 413"), "{status:?}");
    assert_still_serving(&agent);
}
