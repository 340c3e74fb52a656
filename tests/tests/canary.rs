//! Canary traffic (issue 11): a release that keeps no state serves a share
//! of requests by weight, or those with a header, beside the active
//! release; `ctl promote` finishes the switch, `ctl rollback` drops the
//! canary, the health gate drops a failing one by itself (a new one of a
//! version whose earlier canary's check hangs too: issue 16), a release
//! that keeps state is refused a canary, and a canary that is a service
//! lets its streams finish, up to --drain-timeout, however it ends (issue
//! 19).

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use nine9s_tests::{eventually, stage_fixture, stage_sample, Agent, Client};

/// An agent on the embedded 0.1.0 with the canary fixture 0.1.5 staged
/// (both keep no state).
fn agent(dir: &std::path::Path) -> Agent {
    let agent = Agent::start(&dir.join("data"), &["--metrics", "127.0.0.1:0"]);
    let staged = stage_fixture(&agent, "canary");
    assert_eq!(staged.code, 0, "{staged:?}");
    agent
}

/// `GET path` `times` times on one connection, with `headers`: how many
/// each release answered.
fn answered(
    agent: &Agent,
    path: &str,
    headers: &[(&str, &str)],
    times: usize,
) -> HashMap<String, usize> {
    let mut client = Client::connect(agent.http).unwrap();
    let mut by_release = HashMap::new();
    for _ in 0..times {
        let reply = client.get_with(path, headers).unwrap();
        *by_release.entry(reply.release).or_insert(0) += 1;
    }
    by_release
}

fn canary_transition(agent: &Agent) -> serde_json::Value {
    agent
        .history()
        .into_iter()
        .rfind(|t| t["kind"] == "canary")
        .expect("a canary transition in the history")
}

#[test]
fn a_canary_by_weight_serves_its_share_then_promote_finishes_the_switch() {
    let dir = tempfile::tempdir().unwrap();
    let agent = agent(dir.path());
    agent
        .ctl(&["upgrade", "--to", "0.1.5", "--canary", "30%"])
        .ok();
    let status = agent.status();
    assert_eq!(status["canary"]["version"], "0.1.5");
    assert_eq!(status["canary"]["split"]["permille"], 300);
    // The lifecycle is untouched: 0.1.0 is still active and permanent.
    assert_eq!(status["active_version"], "0.1.0");
    assert_eq!(status["permanent_version"], "0.1.0");
    assert_eq!(agent.release_state("0.1.5"), "staged");

    let by_release = answered(&agent, "/", &[], 1000);
    let canary = by_release.get("0.1.5").copied().unwrap_or(0);
    let main = by_release.get("0.1.0").copied().unwrap_or(0);
    assert_eq!(canary + main, 1000, "{by_release:?}");
    // 30% of 1000: the standard deviation is 14.5, so 200..400 never fails
    // by chance.
    assert!((200..400).contains(&canary), "{by_release:?}");
    assert_eq!(agent.status()["canary"]["served"], canary as u64);
    // The metrics show the split too.
    let metrics = nine9s_tests::get(agent.ready_address("metrics").unwrap(), "/metrics").body;
    assert!(
        metrics.contains(r#"nine9s_canary_info{version="0.1.5",split="30% of requests"} 1"#),
        "{metrics}"
    );
    let counted = format!(r#"nine9s_http_requests_total{{release="0.1.5",code="200"}} {canary}"#);
    assert!(metrics.contains(&counted), "{counted} not in {metrics}");
    let t = canary_transition(&agent);
    assert_eq!(
        (&t["from_version"], &t["to_version"]),
        (&"0.1.0".into(), &"0.1.5".into())
    );
    assert!(
        t["reason"].as_str().unwrap().contains("30% of requests"),
        "{t}"
    );

    let promoted = agent.ctl(&["promote", "--wait"]).ok();
    assert!(
        promoted.stdout.contains("0.1.5 is permanent"),
        "{promoted:?}"
    );
    let status = agent.status();
    assert!(status["canary"].is_null(), "{status}");
    assert_eq!(status["permanent_version"], "0.1.5");
    assert_eq!(
        answered(&agent, "/", &[], 50),
        HashMap::from([("0.1.5".to_owned(), 50)])
    );
    // Nothing left to promote.
    let again = agent.ctl(&["promote"]);
    assert_eq!(again.code, 1, "{again:?}");
    assert!(again.stderr.contains("no canary"), "{again:?}");
}

#[test]
fn a_canary_by_header_serves_only_those_requests_and_rollback_drops_it() {
    let dir = tempfile::tempdir().unwrap();
    let agent = agent(dir.path());
    agent
        .ctl(&["upgrade", "--to", "0.1.5", "--canary-header", "x-canary=1"])
        .ok();
    assert_eq!(
        answered(&agent, "/", &[("x-canary", "1")], 20),
        HashMap::from([("0.1.5".to_owned(), 20)])
    );
    assert_eq!(
        answered(&agent, "/", &[("x-canary", "2")], 20),
        HashMap::from([("0.1.0".to_owned(), 20)])
    );
    assert_eq!(
        answered(&agent, "/", &[], 20),
        HashMap::from([("0.1.0".to_owned(), 20)])
    );
    // The canary's release cannot be removed from under it.
    let removed = agent.ctl(&["remove", "0.1.5"]);
    assert_eq!(removed.code, 1, "{removed:?}");
    assert!(removed.stderr.contains("[RELEASE_IN_USE]"), "{removed:?}");
    let split = &agent.status()["canary"]["split"];
    assert_eq!(
        (&split["header"], &split["header_value"]),
        (&"x-canary".into(), &"1".into())
    );

    agent.ctl(&["rollback"]).ok();
    let status = agent.status();
    assert!(status["canary"].is_null(), "{status}");
    assert_eq!(status["permanent_version"], "0.1.0");
    assert_eq!(
        answered(&agent, "/", &[("x-canary", "1")], 20),
        HashMap::from([("0.1.0".to_owned(), 20)])
    );
    let dropped = agent.history().pop().unwrap();
    assert_eq!(dropped["kind"], "rollback");
    assert_eq!(
        (&dropped["from_version"], &dropped["to_version"]),
        (&"0.1.5".into(), &"0.1.0".into())
    );
    assert!(
        dropped["reason"].as_str().unwrap().contains("was dropped"),
        "{dropped}"
    );
    // The release is as it was: staged, and can be a canary again.
    assert_eq!(agent.release_state("0.1.5"), "staged");
}

#[test]
fn a_failing_canary_is_dropped_by_the_health_gate() {
    let dir = tempfile::tempdir().unwrap();
    let agent = agent(dir.path());
    agent
        .ctl(&["upgrade", "--to", "0.1.5", "--canary-header", "x-canary"])
        .ok();
    let failing = answered(&agent, "/fail", &[("x-canary", "yes")], 20);
    assert_eq!(failing, HashMap::from([("0.1.5".to_owned(), 20)]));
    assert!(eventually(Duration::from_secs(10), || agent.status()
        ["canary"]
        .is_null()));
    assert_eq!(agent.release_state("0.1.5"), "failed");
    assert_eq!(
        answered(&agent, "/", &[("x-canary", "yes")], 10),
        HashMap::from([("0.1.0".to_owned(), 10)])
    );
    let dropped = agent.history().pop().unwrap();
    assert_eq!(dropped["kind"], "rollback");
    assert_eq!(dropped["automatic"], true);
    let reason = dropped["reason"].as_str().unwrap();
    assert!(
        reason.contains("the canary 0.1.5 failed") && reason.contains("20 of 20 requests failed"),
        "{reason}"
    );
}

/// A canary with a call stuck past the request timeout fails its health
/// gate, and the worker is replaced to reclaim the stuck call's thread,
/// with no command needed to set it off.
#[test]
fn a_canary_dropped_for_a_stuck_call_has_its_worker_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&dir.path().join("data"), &["--request-timeout", "500ms"]);
    assert_eq!(stage_fixture(&agent, "canary").code, 0);
    agent
        .ctl(&["upgrade", "--to", "0.1.5", "--canary-header", "x-canary"])
        .ok();
    let worker = agent.worker_pid();
    let mut client = Client::connect(agent.http).unwrap();
    let stuck = client.get_with("/stuck", &[("x-canary", "yes")]).unwrap();
    assert_eq!(stuck.status, 504, "{stuck:?}");
    assert!(eventually(Duration::from_secs(10), || agent.status()
        ["canary"]
        .is_null()));
    assert_eq!(agent.release_state("0.1.5"), "failed");
    agent.new_worker(worker);
    assert_eq!(agent.get("/").release, "0.1.0");
    assert!(
        agent
            .log()
            .contains("a new worker takes over from this one to reclaim their threads"),
        "{}",
        agent.log()
    );
}

#[test]
fn a_fresh_canary_is_judged_while_a_hung_check_of_an_earlier_one_of_its_version_runs() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&dir.path().join("data"), &["--health-timeout", "500ms"]);
    stage_fixture(&agent, "canary").ok();
    let canary = || {
        agent
            .ctl(&["upgrade", "--to", "0.1.5", "--canary-header", "x-canary"])
            .ok();
    };
    canary();
    // This instance's next health check hangs for a minute, past the
    // health timeout: the gate drops the canary.
    assert_eq!(
        answered(&agent, "/hang-health", &[("x-canary", "yes")], 1),
        HashMap::from([("0.1.5".to_owned(), 1)])
    );
    assert!(
        eventually(Duration::from_secs(20), || agent.status()["canary"]
            .is_null()),
        "the hung check did not drop the canary:\n{}",
        agent.log()
    );
    // A new canary of 0.1.5 fails while the first one's check still
    // hangs: the gate judges it, and drops it, long before that minute is
    // over.
    canary();
    let failing = answered(&agent, "/fail", &[("x-canary", "yes")], 20);
    assert_eq!(failing, HashMap::from([("0.1.5".to_owned(), 20)]));
    assert!(
        eventually(Duration::from_secs(20), || agent.status()["canary"]
            .is_null()),
        "the failing canary was never judged: {}",
        agent.status()
    );
    let reason = agent.history().pop().unwrap()["reason"].clone();
    assert!(
        reason
            .as_str()
            .unwrap()
            .contains("20 of 20 requests failed"),
        "{reason}"
    );
}

#[test]
fn a_release_that_keeps_state_is_refused_a_canary() {
    let dir = tempfile::tempdir().unwrap();
    let agent = agent(dir.path());
    stage_sample(&agent, "0.2.0");
    let refused = agent.ctl(&["upgrade", "--to", "0.2.0", "--canary", "10%"]);
    assert_eq!(refused.code, 1, "{refused:?}");
    assert!(
        refused.stderr.contains("[CANARY_WITH_STATE]"),
        "{refused:?}"
    );
    assert!(
        refused
            .stderr
            .contains("one of the two copies would be lost"),
        "{refused:?}"
    );
    let status = agent.status();
    assert!(status["canary"].is_null());
    assert_eq!(status["active_version"], "0.1.0");
    // Usage errors are caught before the agent is asked.
    for bad in [
        &["upgrade", "--to", "0.1.5", "--canary", "0%"][..],
        &["upgrade", "--to", "0.1.5", "--canary", "10%", "--permanent"],
        &["upgrade", "--to", "0.1.5", "--canary-header", "bad name"],
    ] {
        assert_eq!(agent.ctl(bad).code, 2, "{bad:?}");
    }
}

/// What `ctl promote` sends: the switch is refused, changing nothing,
/// unless the release is still the canary (the health gate may have
/// dropped it since `ctl` looked).
#[tokio::test(flavor = "multi_thread")]
async fn a_promotion_of_a_canary_that_is_gone_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let agent = agent(dir.path());
    let promote = nine9s_proto::TransitionRequest {
        version: "0.1.5".into(),
        expected_canary: "0.1.5".into(),
        ..Default::default()
    };
    let refused = agent
        .api()
        .await
        .upgrade(promote.clone())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Aborted);
    assert_eq!(nine9s_tests::reason(&refused), "EXPECTED_CANARY_MISMATCH");
    assert_eq!(agent.status()["active_version"], "0.1.0");
    // With the canary there, the same request promotes it.
    agent
        .ctl(&["upgrade", "--to", "0.1.5", "--canary", "50%"])
        .ok();
    let promoted = agent
        .api()
        .await
        .upgrade(promote)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(promoted.transition.unwrap().to_version, "0.1.5");
    assert!(agent.status()["canary"].is_null());
}

/// What a rollout sends to drop its canary: a rollback that drops the
/// canary of that version, and is refused, changing nothing, once it is
/// not the canary any more. Without the condition, a drop that raced the
/// health gate's rolled the active release back instead.
#[tokio::test(flavor = "multi_thread")]
async fn a_drop_of_a_canary_that_is_gone_is_refused_and_rolls_nothing_back() {
    let dir = tempfile::tempdir().unwrap();
    let agent = agent(dir.path());
    let drop_it = nine9s_proto::RollbackRequest {
        expected_canary: "0.1.5".into(),
        ..Default::default()
    };
    agent
        .ctl(&["upgrade", "--to", "0.1.5", "--canary", "50%"])
        .ok();
    agent.api().await.rollback(drop_it.clone()).await.unwrap();
    assert!(agent.status()["canary"].is_null());
    assert_eq!(agent.status()["active_version"], "0.1.0");

    // 0.1.5 current, 0.1.0 to roll back to, and no canary: the same drop
    // is refused and 0.1.5 keeps serving.
    agent.ctl(&["upgrade", "--to", "0.1.5"]).ok();
    let refused = agent.api().await.rollback(drop_it).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Aborted, "{refused:?}");
    assert_eq!(nine9s_tests::reason(&refused), "EXPECTED_CANARY_MISMATCH");
    assert_eq!(agent.status()["active_version"], "0.1.5");
    // ctl says the same.
    let out = agent.ctl(&["rollback", "--expect-canary", "0.1.5"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("EXPECTED_CANARY_MISMATCH"), "{out:?}");
    assert_eq!(agent.status()["active_version"], "0.1.5");
}

/// Issue 16, defect 11: a canary dropped by a worker crash left its
/// `canary` history row without a row closing it.
#[test]
fn a_canary_dropped_by_a_worker_crash_gets_its_end_in_the_history() {
    let dir = tempfile::tempdir().unwrap();
    let agent = agent(dir.path());
    agent
        .ctl(&["upgrade", "--to", "0.1.5", "--canary", "30%"])
        .ok();
    let canary = canary_transition(&agent);
    let old = agent.worker_pid();
    nine9s_tests::kill("KILL", old);
    agent.new_worker(old);

    let status = agent.status();
    assert!(status["canary"].is_null(), "{status}");
    let after: Vec<_> = agent
        .history()
        .into_iter()
        .filter(|t| t["id"].as_u64() > canary["id"].as_u64())
        .collect();
    let closing = after
        .iter()
        .find(|t| t["kind"] == "rollback")
        .unwrap_or_else(|| panic!("no row closes the canary: {after:#?}"));
    assert_eq!(
        (
            &closing["from_version"],
            &closing["to_version"],
            &closing["result"]
        ),
        (&"0.1.5".into(), &"0.1.0".into(), &"ok".into()),
        "{closing}"
    );
    let reason = closing["reason"].as_str().unwrap();
    assert!(
        reason.contains("canary of 0.1.5 ended") && reason.contains("SIGKILL"),
        "{reason}"
    );
    // Only once: another restart has no canary to close.
    let old = agent.worker_pid();
    nine9s_tests::kill("KILL", old);
    agent.new_worker(old);
    let rollbacks = agent
        .history()
        .into_iter()
        .filter(|t| t["kind"] == "rollback")
        .count();
    assert_eq!(rollbacks, 1);
}

/// An agent on the embedded 0.1.0 (with `extra` flags) and the fixture
/// `canary-service` 0.1.6 as a canary for the requests with `x-canary: 1`:
/// a service (ABI v3) that keeps no state.
fn service_canary(dir: &std::path::Path, extra: &[&str]) -> Agent {
    let agent = Agent::start(&dir.join("data"), extra);
    assert_eq!(stage_fixture(&agent, "canary-service").code, 0);
    agent
        .ctl(&["upgrade", "--to", "0.1.6", "--canary-header", "x-canary=1"])
        .ok();
    agent
}

/// `GET /stream/{lines}` to the canary, its first line read: a stream
/// under way on the canary's instance.
struct Stream {
    reader: BufReader<TcpStream>,
    lines: usize,
}

impl Stream {
    fn open(agent: &Agent, lines: usize) -> Stream {
        let stream = TcpStream::connect(agent.http).unwrap();
        // An upper bound only: a line comes every 10 ms.
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let mut reader = BufReader::new(stream);
        write!(
            reader.get_mut(),
            "GET /stream/{lines} HTTP/1.1\r\nhost: test\r\nx-canary: 1\r\nconnection: close\r\n\r\n"
        )
        .unwrap();
        let mut head = String::new();
        while !head.ends_with("\r\n\r\n") {
            assert_ne!(reader.read_line(&mut head).unwrap(), 0, "{head}");
        }
        let head = head.to_ascii_lowercase();
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert!(head.contains("x-nine9s-release: 0.1.6\r\n"), "{head}");
        assert!(head.contains("transfer-encoding: chunked"), "{head}");
        let mut stream = Stream { reader, lines: 0 };
        assert!(stream.next_line(), "the stream ended at once");
        stream
    }

    /// Reads the next line (`line K of N`); false once the stream ended,
    /// whole or cut off.
    fn next_line(&mut self) -> bool {
        let mut size = String::new();
        if !matches!(self.reader.read_line(&mut size), Ok(n) if n > 0) {
            return false;
        }
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else {
            return false;
        };
        if size == 0 {
            return false;
        }
        let mut chunk = vec![0; size + 2];
        if self.reader.read_exact(&mut chunk).is_err() {
            return false;
        }
        self.lines += 1;
        let line = String::from_utf8_lossy(&chunk[..size]).into_owned();
        assert!(
            line.starts_with(&format!("line {} of ", self.lines)),
            "{line}"
        );
        true
    }

    /// The number of lines received by the stream's end.
    fn finish(mut self) -> usize {
        while self.next_line() {}
        self.lines
    }
}

/// Whether an instance of `version` is still loaded (serving, or retiring
/// in the background).
fn resident(agent: &Agent, version: &str) -> bool {
    agent.status()["libraries"]
        .as_array()
        .unwrap()
        .iter()
        .any(|l| l["version"] == version)
}

/// Issue 19: a canary that is a service, replaced by another canary and
/// then dropped by `ctl rollback`, lets the streams under way on it run to
/// their end (up to --drain-timeout) — they were cut at once, the
/// instance stopped under them.
#[test]
fn a_service_canary_replaced_or_dropped_lets_its_streams_finish() {
    // 10 s each, at a line every 10 ms: under way still when the command
    // that ends the canary returns, on a loaded machine too.
    const LINES: usize = 1000;
    let dir = tempfile::tempdir().unwrap();
    let agent = service_canary(dir.path(), &["--drain-timeout", "5m"]);
    let replaced = Stream::open(&agent, LINES);
    agent
        .ctl(&["upgrade", "--to", "0.1.6", "--canary-header", "x-canary=1"])
        .ok();
    let dropped = Stream::open(&agent, LINES);
    agent.ctl(&["rollback"]).ok();
    assert!(agent.status()["canary"].is_null());
    assert_eq!(
        answered(&agent, "/", &[("x-canary", "1")], 5),
        HashMap::from([("0.1.0".to_owned(), 5)])
    );
    assert_eq!(
        (replaced.finish(), dropped.finish()),
        (LINES, LINES),
        "lines of the replaced and of the dropped canary's streams: cut"
    );
    // Retired once its streams ended.
    assert!(
        eventually(Duration::from_secs(30), || !resident(&agent, "0.1.6")),
        "{}",
        agent.status()
    );
    assert!(!agent.log().contains("when its drain ended were cancelled"));
}

/// A promotion starts an instance of the canary's release of its own: the
/// canary's instance is retired, and a stream under way on it runs to its
/// end.
#[test]
fn a_service_canary_promoted_lets_its_streams_finish() {
    const LINES: usize = 1000;
    let dir = tempfile::tempdir().unwrap();
    let agent = service_canary(dir.path(), &["--drain-timeout", "5m"]);
    let stream = Stream::open(&agent, LINES);
    agent.ctl(&["promote"]).ok();
    let status = agent.status();
    assert!(status["canary"].is_null(), "{status}");
    assert_eq!(status["active_version"], "0.1.6");
    assert_eq!(agent.get("/").release, "0.1.6");
    assert_eq!(
        stream.finish(),
        LINES,
        "the promoted canary's stream was cut"
    );
}

/// A stream still under way on a dropped service canary when
/// --drain-timeout ends is cancelled, logged and counted, as on an old
/// release after a switch.
#[test]
fn a_service_canary_stream_past_the_drain_timeout_is_cancelled() {
    let dir = tempfile::tempdir().unwrap();
    let agent = service_canary(
        dir.path(),
        &["--drain-timeout", "1s", "--metrics", "127.0.0.1:0"],
    );
    // 30 s: far past the drain timeout.
    let stream = Stream::open(&agent, 3000);
    agent.ctl(&["rollback"]).ok();
    assert!(stream.finish() < 3000, "the stream ran to its end");
    assert!(
        eventually(Duration::from_secs(30), || agent.log().contains(
            "requests still under way on the old release when its drain ended were cancelled"
        )),
        "{}",
        agent.log()
    );
    let metrics = agent.ready_address("metrics").unwrap();
    let scraped = nine9s_tests::get(metrics, "/metrics").body;
    assert!(
        scraped.contains(r#"nine9s_drain_cancelled_requests_total{release="0.1.6"} 1"#),
        "{scraped}"
    );
}
