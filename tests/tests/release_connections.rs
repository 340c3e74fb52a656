//! A service that serves its HTTP/1.1 connections itself (issue 19: a
//! release whose SDK runtime has its I/O driver, myservice among them):
//! the agent hands each plain connection over, counts its requests, and
//! takes it back at a switch for whichever release serves then. The same
//! keep-alive connection is answered by 0.1.0 (in the release), then by a
//! release that does not serve connections (through the agent), then by
//! 0.2.0, with the count carried and no request lost; the agent's limits
//! hold on the connections a release serves.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use nine9s_tests::{eventually, release_dir, stage_fixture, stage_myservice, Agent, Client};

fn agent(dir: &std::path::Path, extra: &[&str]) -> Agent {
    let bootstrap = release_dir("myservice-0.1.0");
    let mut args = vec!["--bootstrap", bootstrap.to_str().unwrap()];
    args.extend_from_slice(extra);
    Agent::start(&dir.join("data"), &args)
}

/// The connections `version`'s instance serves itself, as status says.
fn connections_of(agent: &Agent, version: &str) -> u64 {
    agent.status()["libraries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["version"] == version)
        .map(|l| l["connections"].as_u64().unwrap())
        .sum()
}

/// The requests `version` answered, as status counts them.
fn served(agent: &Agent, version: &str) -> u64 {
    agent.status()["served"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["version"] == version)
        .map_or(0, |s| s["requests"].as_u64().unwrap())
}

#[test]
fn a_keep_alive_connection_follows_each_switch_with_nothing_lost() {
    let dir = tempfile::tempdir().unwrap();
    let agent = agent(dir.path(), &[]);
    stage_myservice(&agent, "0.2.0");
    let staged = stage_fixture(&agent, "no-drain");
    assert_eq!(staged.code, 0, "{staged:?}");

    let mut client = Client::connect(agent.http).unwrap();
    let reply = client.get("/").unwrap();
    assert_eq!((reply.status, reply.release.as_str()), (200, "0.1.0"));
    assert!(!reply.close, "{reply:?}");
    // The release serves it, and counts what it served with the agent.
    assert!(eventually(Duration::from_secs(10), || connections_of(
        &agent, "0.1.0"
    ) == 1));
    client.get("/").unwrap();
    assert_eq!(served(&agent, "0.1.0"), 2);

    // A release that does not serve connections: the agent takes this one
    // back at the switch and serves it itself.
    agent.ctl(&["upgrade", "--to", "0.1.5"]).ok();
    let reply = client.get("/").unwrap();
    assert_eq!((reply.status, reply.release.as_str()), (200, "0.1.5"));
    assert!(reply.body.contains("(3 served)"), "{reply:?}");
    assert_eq!(connections_of(&agent, "0.1.0"), 0);

    // And to a release that serves them: new connections are its own; the
    // one the agent serves goes on with the agent, on the new release.
    agent.ctl(&["upgrade", "--to", "0.2.0"]).ok();
    let reply = client.get("/").unwrap();
    assert_eq!((reply.status, reply.release.as_str()), (200, "0.2.0"));
    assert!(reply.body.contains("(4 served)"), "{reply:?}");
    let mut second = Client::connect(agent.http).unwrap();
    let reply = second.get("/").unwrap();
    assert_eq!(reply.release, "0.2.0");
    assert!(eventually(Duration::from_secs(10), || connections_of(
        &agent, "0.2.0"
    ) == 1));

    // Back down to 0.1.0: the connection 0.2.0 served comes back at the
    // switch and goes to 0.1.0, answered there with the count carried.
    agent
        .ctl(&["downgrade", "--to", "0.1.0", "--permanent"])
        .ok();
    let reply = second.get("/").unwrap();
    assert_eq!((reply.status, reply.release.as_str()), (200, "0.1.0"));
    assert!(reply.body.contains("(6 served)"), "{reply:?}");
    assert!(eventually(Duration::from_secs(10), || connections_of(
        &agent, "0.1.0"
    ) == 1));
    assert_eq!(client.get("/count").unwrap().body.trim(), "6");
}

/// Reads until the server closes the connection; how long that took.
fn closed_within(mut stream: TcpStream, limit: Duration) -> Duration {
    stream.set_read_timeout(Some(limit)).unwrap();
    let started = Instant::now();
    let mut sink = Vec::new();
    stream
        .read_to_end(&mut sink)
        .expect("the agent's limit closes the connection");
    started.elapsed()
}

#[test]
fn the_agents_limits_hold_on_the_connections_a_release_serves() {
    let dir = tempfile::tempdir().unwrap();
    let agent = agent(
        dir.path(),
        &[
            "--http-idle-timeout",
            "1s",
            "--http-header-timeout",
            "1s",
            "--max-body",
            "1000",
        ],
    );

    // Idle after a request: closed after --http-idle-timeout.
    let mut idle = TcpStream::connect(agent.http).unwrap();
    idle.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        .unwrap();
    let mut head = [0u8; 12];
    idle.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");
    assert!(eventually(Duration::from_secs(10), || connections_of(
        &agent, "0.1.0"
    ) == 1));
    closed_within(idle, Duration::from_secs(30));

    // Headers that never end: closed after --http-header-timeout.
    let mut slow = TcpStream::connect(agent.http).unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n").unwrap();
    closed_within(slow, Duration::from_secs(30));

    // A body announced over --max-body: 413, and nothing reaches the
    // release (its count stays).
    let before = served(&agent, "0.1.0");
    let mut big = TcpStream::connect(agent.http).unwrap();
    big.write_all(b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 2000\r\n\r\n")
        .unwrap();
    let mut head = [0u8; 12];
    big.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.1 413");
    assert_eq!(served(&agent, "0.1.0"), before + 1);
}

/// Under keep-alive load, twenty switches each way between two releases
/// that serve their connections: no request fails, and every `GET /`
/// answered is counted exactly once — none started on a release after
/// its switch's snapshot (its count would not have crossed).
#[test]
fn switches_under_load_lose_no_request_and_no_count() {
    let dir = tempfile::tempdir().unwrap();
    let agent = agent(dir.path(), &[]);
    stage_myservice(&agent, "0.2.0");
    let load = nine9s_tests::Load::start(agent.http, "/", 8);
    assert!(eventually(Duration::from_secs(10), || connections_of(
        &agent, "0.1.0"
    ) == 8));
    for _ in 0..20 {
        agent.ctl(&["upgrade", "--to", "0.2.0"]).ok();
        agent.ctl(&["downgrade", "--to", "0.1.0"]).ok();
    }
    let report = load.stop();
    assert_eq!((report.failed, report.refused), (0, 0), "{report:?}");
    assert!(report.ok > 0, "{report:?}");
    let count: u64 = agent.get("/count").body.trim().parse().unwrap();
    assert_eq!(count, report.ok, "{report:?}");
}
