//! Requests in flight: a switch waits for them and holds new requests back
//! (none is refused); a switch that cannot quiesce in time is abandoned;
//! SIGTERM lets them finish.

use std::thread;
use std::time::{Duration, Instant};

use nine9s_tests::{eventually, get, stage_fixture, stage_sample, Agent};

/// An agent on the slow fixture (permanent), with 0.3.0 staged.
fn on_slow(dir: &tempfile::TempDir, extra: &[&str]) -> Agent {
    let agent = Agent::start(&dir.path().join("data"), extra);
    stage_fixture(&agent, "slow").ok();
    stage_sample(&agent, "0.3.0");
    agent.ctl(&["upgrade", "--to", "0.2.6", "--permanent"]).ok();
    agent
}

/// Waits until `calls` requests are in flight on the active release.
fn wait_in_flight(agent: &Agent, calls: u64) {
    assert!(
        eventually(Duration::from_secs(10), || agent.status()["libraries"]
            .as_array()
            .expect("an array of libraries")
            .iter()
            .any(|l| l["active"] == true && l["in_flight"] == calls)),
        "never {calls} in flight: {}",
        agent.status()
    );
}

#[test]
fn a_switch_waits_for_calls_in_flight_and_holds_new_requests_back() {
    let dir = tempfile::tempdir().unwrap();
    let agent = on_slow(&dir, &[]);
    agent.get("/");
    let addr = agent.http;
    let slow = thread::spawn(move || get(addr, "/slow?ms=2000"));
    wait_in_flight(&agent, 1);

    let upgrade = {
        let local = agent.local();
        thread::spawn(move || {
            nine9s_tests::ctl(&local, &["upgrade", "--to", "0.3.0", "--permanent"])
        })
    };
    assert!(
        eventually(Duration::from_secs(10), || agent.status()["running"]
            ["to_version"]
            == "0.3.0"),
        "the upgrade never started: {}",
        agent.status()
    );
    // Until the switch queues behind the slow call (after loading 0.3.0 and
    // rehearsing it), 0.2.6 answers at once; the first request that arrives
    // while the switch waits is held, then served by the new release.
    let mut hellos = 1;
    let mut held = None;
    assert!(
        eventually(Duration::from_secs(10), || {
            let started = Instant::now();
            let reply = agent.get("/");
            let waited = started.elapsed();
            assert_eq!(reply.status, 200, "{reply:?}");
            hellos += 1;
            let switched = reply.release == "0.3.0";
            held = Some((reply, waited));
            switched
        }),
        "never answered by 0.3.0: {:?}",
        held
    );
    let (held, waited) = held.unwrap();

    let slow = slow.join().unwrap();
    assert_eq!(
        (slow.status, slow.body.as_str(), slow.release.as_str()),
        (200, "slept 2000 ms", "0.2.6")
    );
    let upgrade = upgrade.join().unwrap().ok();
    assert!(
        upgrade.stdout.contains("upgraded 0.2.6 -> 0.3.0"),
        "{upgrade:?}"
    );
    assert_eq!((held.status, held.release.as_str()), (200, "0.3.0"));
    assert!(
        waited >= Duration::from_millis(500),
        "the request was held by the switch: {waited:?}"
    );
    assert_eq!(agent.get("/count").body, hellos.to_string());
}

#[test]
fn a_switch_that_cannot_quiesce_in_time_is_abandoned() {
    let dir = tempfile::tempdir().unwrap();
    let agent = on_slow(&dir, &["--quiesce-timeout", "200ms"]);
    let addr = agent.http;
    let slow = thread::spawn(move || get(addr, "/slow?ms=1500"));
    wait_in_flight(&agent, 1);
    let out = agent.ctl(&["upgrade", "--to", "0.3.0"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr.contains("did not finish within 200 ms")
            && out.stderr.contains("0.2.6 keeps serving"),
        "{}",
        out.stderr
    );
    assert_eq!(slow.join().unwrap().status, 200);
    assert_eq!(agent.get("/").release, "0.2.6");
    assert_eq!(agent.status()["active_version"], "0.2.6");
    let last = agent.history().pop().expect("a history");
    assert_eq!(
        (&last["kind"], &last["to_version"], &last["result"]),
        (&"upgrade".into(), &"0.3.0".into(), &"failed".into()),
        "{last}"
    );
}

#[test]
fn sigterm_lets_requests_in_flight_finish() {
    let dir = tempfile::tempdir().unwrap();
    let agent = on_slow(&dir, &[]);
    let addr = agent.http;
    let slow = thread::spawn(move || get(addr, "/slow?ms=1000"));
    wait_in_flight(&agent, 1);
    assert_eq!(agent.terminate(), 0);
    let reply = slow.join().unwrap();
    assert_eq!((reply.status, reply.body.as_str()), (200, "slept 1000 ms"));
}

#[test]
fn a_blocking_release_does_not_hold_up_other_requests() {
    let dir = tempfile::tempdir().unwrap();
    let agent = on_slow(&dir, &[]);
    let addr = agent.http;
    // More slow calls than the agent has request threads (one per core).
    let cores = thread::available_parallelism().map_or(2, |n| n.get());
    let slow: Vec<_> = (0..cores)
        .map(|_| thread::spawn(move || get(addr, "/slow?ms=2000")))
        .collect();
    wait_in_flight(&agent, cores as u64);
    let started = Instant::now();
    let reply = agent.get("/");
    let took = started.elapsed();
    assert_eq!(reply.status, 200);
    assert!(
        took < Duration::from_millis(1000),
        "a quick request waited {took:?} behind slow ones"
    );
    for call in slow {
        assert_eq!(call.join().unwrap().status, 200);
    }
}
