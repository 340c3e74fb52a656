//! Prometheus metrics on the admin listener (`--metrics ADDR`): what a
//! scrape says after requests, an upgrade, a self-upgrade and a worker
//! crash — on the same port throughout, since the supervisor holds the
//! listener — and how a bad `--metrics` is refused.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::process::{Command, Stdio};
use std::time::Duration;

use nine9s_tests::{bin_dir, eventually, hello, kill, stage_sample, Agent};

/// One sample of an OpenMetrics exposition.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// A scrape: the samples, parsed from the text as a scraper would.
#[derive(Debug)]
struct Scrape(Vec<Sample>);

impl Scrape {
    /// Parses `name{k="v",...} value` lines (label values here need no
    /// unescaping); checks the exposition ends with `# EOF`.
    fn parse(text: &str) -> Scrape {
        assert!(text.ends_with("# EOF\n"), "no # EOF at the end:\n{text}");
        let samples = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .map(|line| {
                let (series, value) = line.rsplit_once(' ').expect("a value");
                let (name, labels) = match series.split_once('{') {
                    Some((name, rest)) => (name, rest.strip_suffix('}').expect("closing brace")),
                    None => (series, ""),
                };
                let labels = labels
                    .split(',')
                    .filter(|l| !l.is_empty())
                    .map(|pair| {
                        let (key, value) = pair.split_once('=').expect("key=value");
                        (key.to_owned(), value.trim_matches('"').to_owned())
                    })
                    .collect();
                Sample {
                    name: name.to_owned(),
                    labels,
                    value: value.parse().expect("a number"),
                }
            })
            .collect();
        Scrape(samples)
    }

    /// The samples of `name` whose labels include `labels`.
    fn series(&self, name: &str, labels: &[(&str, &str)]) -> Vec<&Sample> {
        self.0
            .iter()
            .filter(|s| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .collect()
    }

    /// The value of the one series of `name` with `labels`.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        match self.series(name, labels)[..] {
            [one] => one.value,
            ref other => panic!("{name} {labels:?}: {} series: {other:?}", other.len()),
        }
    }
}

/// `GET /metrics` on a fresh connection: the content type and the body.
fn get_metrics(addr: SocketAddr) -> std::io::Result<(String, String)> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n"
    )?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply)?;
    let (head, body) = reply
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other(format!("no header end in {reply:?}")))?;
    assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
    let content_type = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-type:")
                .map(|v| v.trim().to_owned())
        })
        .unwrap_or_default();
    Ok((content_type, body.to_owned()))
}

fn scrape(addr: SocketAddr) -> Scrape {
    let (content_type, body) = get_metrics(addr).expect("a scrape");
    assert_eq!(
        content_type,
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    Scrape::parse(&body)
}

/// Where the agent serves metrics, as its log says (it was given port 0).
fn metrics_address(agent: &Agent) -> SocketAddr {
    let mut address = None;
    assert!(
        eventually(Duration::from_secs(10), || {
            address = agent
                .log()
                .lines()
                .filter(|l| l.contains("metrics served on /metrics"))
                .find_map(|l| {
                    l.split_whitespace()
                        .find_map(|w| w.strip_prefix("address="))
                })
                .and_then(|a| a.parse().ok());
            address.is_some()
        }),
        "no metrics address in the log:\n{}",
        agent.log()
    );
    address.unwrap()
}

/// A scrape that satisfies `check`, waiting for it (a new worker that
/// does not serve yet, a library still draining).
fn scrape_until(addr: SocketAddr, mut check: impl FnMut(&Scrape) -> bool) -> Scrape {
    let mut last = None;
    let ok = eventually(Duration::from_secs(30), || {
        let Ok((_, body)) = get_metrics(addr) else {
            return false;
        };
        let scrape = Scrape::parse(&body);
        let ok = check(&scrape);
        last = Some(scrape);
        ok
    });
    assert!(ok, "never held; last scrape: {last:#?}");
    last.unwrap()
}

const REQUESTS: &str = "nine9s_http_requests_total";
const RESTARTS: &str = "nine9s_worker_restarts_total";

#[test]
fn a_scrape_counts_requests_transitions_and_worker_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&dir.path().join("data"), &["--metrics", "127.0.0.1:0"]);
    let addr = metrics_address(&agent);
    hello(&agent, 5);
    assert_eq!(agent.get("/no/such/page").status, 404);
    stage_sample(&agent, "0.2.0");
    agent.ctl(&["upgrade", "--to", "0.2.0", "--permanent"]).ok();
    hello(&agent, 3);

    // Once the old library is unloaded: the count `ctl status` lists.
    let metrics = scrape_until(addr, |s| s.value("nine9s_resident_libraries", &[]) == 1.0);
    let status = agent.status();
    assert_eq!(status["libraries"].as_array().unwrap().len(), 1, "{status}");

    // Exact: this test owns the agent. 0.1.0's counts outlive its library.
    assert_eq!(
        metrics.value(REQUESTS, &[("release", "0.1.0"), ("code", "200")]),
        5.0
    );
    assert_eq!(
        metrics.value(REQUESTS, &[("release", "0.1.0"), ("code", "404")]),
        1.0
    );
    assert_eq!(
        metrics.value(REQUESTS, &[("release", "0.2.0"), ("code", "200")]),
        3.0
    );
    assert_eq!(metrics.series(REQUESTS, &[]).len(), 3, "{metrics:#?}");
    // The history's names; the first start was an install.
    let transitions = "nine9s_transitions_total";
    for (kind, automatic) in [
        ("install", "false"),
        ("stage", "false"),
        ("upgrade", "false"),
    ] {
        let labels = [("kind", kind), ("result", "ok"), ("automatic", automatic)];
        assert_eq!(metrics.value(transitions, &labels), 1.0, "{kind}");
    }
    assert_eq!(metrics.series(transitions, &[]).len(), 3, "{metrics:#?}");
    let upgrade = [("kind", "upgrade")];
    assert_eq!(
        metrics.value("nine9s_transition_duration_seconds_count", &upgrade),
        1.0
    );
    assert!(metrics.value("nine9s_transition_duration_seconds_sum", &upgrade) > 0.0);
    // Only the upgrade switched.
    assert_eq!(metrics.value("nine9s_switch_wait_seconds_count", &[]), 1.0);
    let active = metrics.series("nine9s_active_release_info", &[]);
    assert_eq!(active.len(), 1, "{active:?}");
    assert_eq!(
        (active[0].labels["version"].as_str(), active[0].value),
        ("0.2.0", 1.0)
    );
    assert_eq!(metrics.value("nine9s_in_flight_requests", &[]), 0.0);
    assert_eq!(metrics.value(RESTARTS, &[]), 0.0);

    // A self-upgrade is no restart; the new worker serves the same port.
    let first = agent.worker_pid();
    agent.ctl(&["agent", "restart", "--wait"]).ok();
    let second = agent.new_worker(first);
    // (A new worker counts requests from zero.)
    let after_self_upgrade = scrape_until(addr, |s| s.series(REQUESTS, &[]).is_empty());
    assert_eq!(after_self_upgrade.value(RESTARTS, &[]), 0.0);

    // A worker killed is: its replacement says so, on the same port.
    kill("KILL", second);
    let third = agent.new_worker(second);
    let after_crash = scrape_until(addr, |s| s.value(RESTARTS, &[]) == 1.0);
    let active = after_crash.series("nine9s_active_release_info", &[]);
    assert_eq!(active.len(), 1, "{active:?}");
    assert_eq!(active[0].labels["version"], "0.2.0");
    hello(&agent, 2);
    let counted = scrape(addr);
    assert_eq!(
        counted.value(REQUESTS, &[("release", "0.2.0"), ("code", "200")]),
        2.0
    );

    // The supervisor re-executed keeps the count and the listener.
    agent.reexec_supervisor();
    kill("KILL", third);
    agent.new_worker(third);
    scrape_until(addr, |s| s.value(RESTARTS, &[]) == 2.0);
}

#[test]
fn other_paths_are_not_found_and_metrics_are_off_without_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&dir.path().join("data"), &["--metrics", "127.0.0.1:0"]);
    let addr = metrics_address(&agent);
    let reply = nine9s_tests::get(addr, "/");
    assert_eq!(reply.status, 404);

    let agent = Agent::start(&dir.path().join("other"), &[]);
    // By the time the control plane answers, a metrics server would be up.
    agent.status();
    assert!(!agent.log().contains("metrics served"), "{}", agent.log());
}

#[test]
fn an_unusable_metrics_address_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let run = |metrics: &str| {
        Command::new(bin_dir().join("agent"))
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(["--http", "127.0.0.1:0", "--grpc", "127.0.0.1:0"])
            .args(["--metrics", metrics])
            .output()
            .unwrap()
    };
    // Not an address: a usage error, naming the flag.
    let out = run("notanaddress");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--metrics"), "{stderr}");
    // An address in use: the agent cannot start, as for --http.
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = taken.local_addr().unwrap().to_string();
    let out = run(&address);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("cannot listen for metrics on {address}")),
        "{stderr}"
    );
}

#[test]
fn a_metrics_socket_passed_in_by_socket_activation_is_served() {
    use command_fds::{CommandFdExt, FdMapping};
    let dir = tempfile::tempdir().unwrap();
    let listeners: Vec<TcpListener> = (0..3)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let addresses: Vec<SocketAddr> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
    let mut command = Command::new(bin_dir().join("agent"));
    command
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        // Ignored for the socket passed in, as --http and --grpc are.
        .args(["--metrics", "127.0.0.1:1"])
        .env("LISTEN_FDS", "3")
        .env("LISTEN_FDNAMES", "http:grpc:metrics")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .fd_mappings(
            listeners
                .into_iter()
                .zip(3..)
                .map(|(listener, child_fd)| FdMapping {
                    parent_fd: OwnedFd::from(listener),
                    child_fd,
                })
                .collect(),
        )
        .unwrap();
    let mut child = command.spawn().unwrap();
    // The socket was listening before the agent ran: the scrape waits in
    // its backlog until the agent serves.
    let metrics = scrape(addresses[2]);
    let active = metrics.series("nine9s_active_release_info", &[]);
    assert_eq!(active.len(), 1, "{active:?}");
    assert_eq!(nine9s_tests::get(addresses[0], "/").status, 200);
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    assert_eq!(child.wait().unwrap().code(), Some(0));
}
