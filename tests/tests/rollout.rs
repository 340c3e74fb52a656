//! `ctl rollout` over several real agents on 127.0.0.1: a rollout that
//! converges (and does nothing when run again), one halted by a release
//! that fails its soak on one agent (everyone back, the history says why,
//! the release it staged removed where it never ran), one interrupted by
//! killing ctl and resumed without acting twice under its lease, the
//! fleet rolled up and back down with its state, undone and rolled out
//! again, a second rollout refused while the first holds the agents (and
//! seen from another process), an agent down within `--max-unavailable`,
//! a `canary W%` step (both releases served on one agent, the run killed
//! and taken up mid-canary, then promoted; a canary failing its analysis
//! dropped and the rollout halted; judged on what served during it; one
//! the agent drops ending its pause; one a re-run that stops early drops;
//! one of a release that keeps state stopping before any switch), and the
//! ways a fleet can be given wrong.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use nine9s_tests::{
    bin_dir, eventually, fixture_dir, library, release_dir, stage_dir, Agent, Client, Ctl, Load,
};
use serde_json::Value;

/// `n` agents on the embedded 0.1.0, and a fleet file naming them
/// `edge-1`.., each reached on its local socket.
struct Fleet {
    agents: Vec<Agent>,
    file: PathBuf,
    _dir: tempfile::TempDir,
}

fn fleet(n: usize) -> Fleet {
    fleet_with(n, &[])
}

/// As `fleet`, each agent started with `extra` flags.
fn fleet_with(n: usize, extra: &[&str]) -> Fleet {
    fleet_each(&vec![extra; n])
}

/// As `fleet`, one agent for each item of `flags`, started with them.
fn fleet_each(flags: &[&[&str]]) -> Fleet {
    let dir = tempfile::tempdir().unwrap();
    let agents: Vec<Agent> = flags
        .iter()
        .enumerate()
        .map(|(i, extra)| Agent::start(&dir.path().join(format!("agent-{i}")), extra))
        .collect();
    let mut toml = String::from("# written by the rollout tests\n");
    for (i, agent) in agents.iter().enumerate() {
        toml.push_str(&format!(
            "[[agent]]\nname = \"edge-{}\"\naddress = \"{}\"\n\n",
            i + 1,
            agent.local(),
        ));
    }
    let file = dir.path().join("fleet.toml");
    std::fs::write(&file, toml).unwrap();
    Fleet {
        agents,
        file,
        _dir: dir,
    }
}

/// The ctl command line of a rollout of the sample release `version`.
fn rollout_args(fleet: &Path, version: &str, extra: &[&str]) -> Vec<String> {
    let (dir, lib) = if version == "0.6.0" {
        (fixture_dir("unhealthy"), library("fixture_unhealthy"))
    } else if version == "0.7.0" {
        (fixture_dir("init-fails"), library("fixture_init_fails"))
    } else if version == "0.2.6" {
        (fixture_dir("slow"), library("fixture_slow"))
    } else if version == "0.1.5" {
        (fixture_dir("canary"), library("fixture_canary"))
    } else {
        (
            release_dir(&format!("nine9s-{version}")),
            library(&format!("nine9s_{}", version.replace('.', "_"))),
        )
    };
    let mut args: Vec<String> = [
        "--output",
        "json",
        "rollout",
        "--to",
        version,
        "--release-dir",
        dir.to_str().unwrap(),
        "--library",
        lib.to_str().unwrap(),
        "--fleet",
        fleet.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn ctl_command(args: &[String]) -> Command {
    let mut command = Command::new(bin_dir().join("ctl"));
    for (name, _) in std::env::vars() {
        if name.starts_with("NINE9S_") {
            command.env_remove(name);
        }
    }
    command.args(args);
    command
}

fn run(args: &[String]) -> (Ctl, Value) {
    let output = ctl_command(args).output().expect("run ctl");
    let ctl = Ctl {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    };
    let report = serde_json::from_str(&ctl.stdout)
        .unwrap_or_else(|e| panic!("rollout printed no JSON ({e}): {ctl:#?}"));
    (ctl, report)
}

/// The fleet's file with one more agent, `gone`, that is not there (no
/// socket: a freed TCP port could be taken by another test's agent).
fn with_gone(fleet: &Fleet) -> PathBuf {
    let dir = fleet.file.parent().unwrap();
    let gone_url = format!("unix:{}", dir.join("gone/control.sock").display());
    let mut text = std::fs::read_to_string(&fleet.file).unwrap();
    text.push_str(&format!(
        "[[agent]]\nname = \"gone\"\naddress = \"{gone_url}\"\n"
    ));
    let with_gone = dir.join("with-gone.toml");
    std::fs::write(&with_gone, text).unwrap();
    with_gone
}

/// ctl with `args` running in the background, its output kept.
fn spawn(args: &[String]) -> std::process::Child {
    ctl_command(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// `ctl --output json ARGS`: its document, whatever the exit.
fn ctl_json(args: &[&str]) -> Value {
    let mut all = vec!["--output".to_owned(), "json".to_owned()];
    all.extend(args.iter().map(|s| s.to_string()));
    run(&all).1
}

/// Every agent's /count, as a number.
fn counts(fleet: &Fleet) -> Vec<u64> {
    fleet
        .agents
        .iter()
        .map(|a| a.get("/count").body.trim().parse().expect("a count"))
        .collect()
}

fn outcomes(report: &Value) -> Vec<String> {
    report["agents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["outcome"].as_str().unwrap().to_owned())
        .collect()
}

/// The transitions of `kind` to `version` in the agent's history.
fn transitions<'a>(history: &'a [Value], kind: &str, version: &str) -> Vec<&'a Value> {
    history
        .iter()
        .filter(|t| t["kind"] == kind && t["to_version"] == version)
        .collect()
}

#[test]
fn a_rollout_converges_and_running_it_again_changes_nothing() {
    let fleet = fleet(4);
    let load = Load::start(fleet.agents[3].http, "/", 2);
    let args = rollout_args(
        &fleet.file,
        "0.2.0",
        &["--max-parallel", "2", "--soak", "300ms"],
    );
    let (ctl, report) = run(&args);
    assert_eq!(ctl.code, 0, "{ctl:#?}");
    assert_eq!(report["outcome"], "converged");
    assert_eq!(report["canary"], 0);
    assert_eq!(report["waves"], serde_json::json!([[1, 2], [3]]));
    assert_eq!(outcomes(&report), ["upgraded"; 4]);
    let rollout_id = report["rollout_id"].as_str().unwrap().to_owned();
    for (agent, reported) in fleet
        .agents
        .iter()
        .zip(report["agents"].as_array().unwrap())
    {
        let status = agent.status();
        assert_eq!(status["active_version"], "0.2.0");
        assert_eq!(status["permanent_version"], "0.2.0");
        assert_eq!(reported["before"], "0.1.0");
        assert_eq!(reported["after"], "0.2.0");
        let history = agent.history();
        let upgrades = transitions(&history, "upgrade", "0.2.0");
        assert_eq!(upgrades.len(), 1, "{history:#?}");
        assert_eq!(upgrades[0]["request_id"], reported["request_id"]);
        let id = upgrades[0]["request_id"].as_str().unwrap();
        assert!(
            id.starts_with(&format!("rollout-{rollout_id}-a1-switch-")),
            "{id}"
        );
        assert_eq!(upgrades[0]["reason"], format!("rollout {rollout_id}"));
    }
    // The human output says the same in a table.
    let mut table = args.clone();
    table.drain(..2);
    let again = ctl_command(&table).output().unwrap();
    assert_eq!(again.status.code(), Some(0));
    let text = String::from_utf8_lossy(&again.stdout);
    assert!(
        text.contains("converged: 4 of 4 agents run 0.2.0"),
        "{text}"
    );
    // Run again: the same rollout, already done everywhere.
    let before: Vec<usize> = fleet.agents.iter().map(|a| a.history().len()).collect();
    let (ctl, report) = run(&args);
    assert_eq!(ctl.code, 0, "{ctl:#?}");
    assert_eq!(report["rollout_id"], rollout_id.as_str());
    assert_eq!(report["attempt"], 3, "the third run is the third attempt");
    assert_eq!(outcomes(&report), ["already_there"; 4]);
    let after: Vec<usize> = fleet.agents.iter().map(|a| a.history().len()).collect();
    assert_eq!(before, after, "running the rollout again acted");
    let served = load.stop();
    assert_eq!((served.failed, served.refused), (0, 0), "{served:?}");
    assert!(served.ok > 0);
}

#[test]
fn a_failed_soak_halts_the_rollout_and_everyone_goes_back() {
    let fleet = fleet(4);
    // Only edge-3 serves traffic: 0.6.0 is healthy until it serves a
    // request, so it fails its soak there and nowhere else.
    let load = Load::start(fleet.agents[2].http, "/", 1);
    let (ctl, report) = run(&rollout_args(
        &fleet.file,
        "0.6.0",
        &["--max-parallel", "1", "--soak", "1s"],
    ));
    load.stop();
    assert_eq!(ctl.code, 4, "{ctl:#?}");
    assert_eq!(report["outcome"], "halted");
    assert!(
        report["halted_by"].as_str().unwrap().contains("edge-3"),
        "{report:#}"
    );
    assert_eq!(
        outcomes(&report),
        ["rolled_back", "rolled_back", "failed_soak", "not_reached"]
    );
    assert!(ctl.stderr.contains("halted and rolled back"), "{ctl:#?}");
    for agent in &fleet.agents {
        let status = agent.status();
        assert_eq!(status["active_version"], "0.1.0", "{status:#}");
        assert_eq!(status["permanent_version"], "0.1.0", "{status:#}");
    }
    // The history says why, on the agents the rollout rolled back ...
    for agent in &fleet.agents[..2] {
        let history = agent.history();
        assert_eq!(transitions(&history, "upgrade", "0.6.0").len(), 1);
        let back = transitions(&history, "rollback", "0.1.0");
        assert_eq!(back.len(), 1, "{history:#?}");
        let reason = back[0]["reason"].as_str().unwrap();
        assert!(
            reason.contains("halted") && reason.contains("edge-3"),
            "{reason}"
        );
        assert_eq!(back[0]["automatic"], false);
    }
    // ... and on the one whose health gate rolled it back.
    let history = fleet.agents[2].history();
    let gate = transitions(&history, "rollback", "0.1.0");
    assert_eq!(gate.len(), 1, "{history:#?}");
    assert_eq!(gate[0]["automatic"], true);
    // The last agent was never switched: the release the rollout staged
    // there is gone again; where it ran, it stays (failed or old).
    assert!(transitions(&fleet.agents[3].history(), "upgrade", "0.6.0").is_empty());
    assert!(fleet.agents[3].release("0.6.0").is_none(), "left staged");
    assert!(
        report["agents"][3]["cleanup"]
            .as_str()
            .unwrap()
            .contains("removed"),
        "{report:#}"
    );
    assert!(fleet.agents[0].release("0.6.0").is_some());
    // The rollout left its record on every agent, and holds none.
    let history = ctl_json(&[
        "rollout",
        "history",
        "--fleet",
        fleet.file.to_str().unwrap(),
    ]);
    assert_eq!(history.as_array().unwrap().len(), 1, "{history:#}");
    assert_eq!(history[0]["outcome"], "halted");
    assert_eq!(history[0]["agents"].as_array().unwrap().len(), 4);
    let status = ctl_json(&["rollout", "status", "--fleet", fleet.file.to_str().unwrap()]);
    assert_eq!(status["rollouts"], serde_json::json!([]), "{status:#}");
}

#[test]
fn an_interrupted_rollout_resumes_without_acting_twice() {
    let fleet = fleet(4);
    let args = rollout_args(
        &fleet.file,
        "0.2.0",
        &["--max-parallel", "1", "--soak", "1s"],
    );
    let mut first = spawn(&args);
    // Killed while the second agent soaks.
    let second = &fleet.agents[1];
    assert!(eventually(Duration::from_secs(60), || {
        second.status()["active_version"] == "0.2.0"
    }));
    first.kill().unwrap();
    first.wait().unwrap();
    assert_eq!(fleet.agents[3].status()["active_version"], "0.1.0");
    // The killed rollout still holds the agents: a switch by hand is
    // refused, changing nothing, unless forced.
    let by_hand = fleet.agents[3].ctl(&["upgrade", "--to", "0.2.0", "--dry-run"]);
    assert_eq!(by_hand.code, 0, "a dry run changes nothing: {by_hand:#?}");
    let by_hand = fleet.agents[3].ctl(&["rollback"]);
    assert_eq!(by_hand.code, 1, "{by_hand:#?}");
    assert!(by_hand.stderr.contains("[LEASED]"), "{by_hand:#?}");
    assert!(by_hand.stderr.contains("--force"), "{by_hand:#?}");
    let held = ctl_json(&["rollout", "status", "--fleet", fleet.file.to_str().unwrap()]);
    assert_eq!(held["rollouts"].as_array().unwrap().len(), 1, "{held:#}");
    assert_eq!(held["rollouts"][0]["attempt"], 1);

    let (ctl, report) = run(&args);
    assert_eq!(ctl.code, 0, "{ctl:#?}");
    assert_eq!(report["outcome"], "converged");
    assert_eq!(
        (&report["attempt"], &report["resumed"]),
        (&1.into(), &true.into())
    );
    let outcomes = outcomes(&report);
    assert_eq!(outcomes[0], "already_there");
    assert!(
        ["already_there", "upgraded"].contains(&outcomes[1].as_str()),
        "{outcomes:?}"
    );
    assert_eq!(outcomes[2..], ["upgraded", "upgraded"]);
    for agent in &fleet.agents {
        assert_eq!(agent.status()["permanent_version"], "0.2.0");
        let history = agent.history();
        // Staged and upgraded once each, over both runs.
        assert_eq!(
            transitions(&history, "stage", "0.2.0").len(),
            1,
            "{history:#?}"
        );
        assert_eq!(
            transitions(&history, "upgrade", "0.2.0").len(),
            1,
            "{history:#?}"
        );
    }
}

#[test]
fn a_fleet_given_wrong_is_refused_and_an_unreachable_agent_stops_everything() {
    let fleet = fleet(2);
    let dir = fleet.file.parent().unwrap();
    // A misspelt key would send no token: refused before any call.
    let typo = dir.join("typo.toml");
    std::fs::write(
        &typo,
        format!(
            "[[agent]]\naddress = \"{}\"\ntoken-file = \"x\"\n",
            fleet.agents[0].local()
        ),
    )
    .unwrap();
    let out = ctl_command(&rollout_args(&typo, "0.2.0", &[]))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown key \"token-file\""));
    // --fleet and --agent together.
    let mut both = rollout_args(&fleet.file, "0.2.0", &[]);
    both.extend(["--agent".into(), fleet.agents[0].local()]);
    assert_eq!(ctl_command(&both).output().unwrap().status.code(), Some(2));
    // Several --agent for a command that takes one.
    let status = ctl_command(&[
        "status".into(),
        "--agent".into(),
        fleet.agents[0].local(),
        "--agent".into(),
        fleet.agents[1].local(),
    ])
    .output()
    .unwrap();
    assert_eq!(status.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&status.stderr).contains("only `ctl rollout`"));

    // A third agent that is not there: nothing is staged or switched.
    let with_gone = with_gone(&fleet);
    let (ctl, report) = run(&rollout_args(&with_gone, "0.2.0", &[]));
    assert_eq!(ctl.code, 3, "{ctl:#?}");
    assert_eq!(report["outcome"], "unreachable");
    assert_eq!(
        outcomes(&report),
        ["not_reached", "not_reached", "unreachable"]
    );
    for agent in &fleet.agents {
        assert!(agent.release("0.2.0").is_none(), "staged despite the halt");
        assert_eq!(agent.status()["active_version"], "0.1.0");
    }
}

#[test]
fn the_fleet_rolls_up_and_back_down_with_its_state_undoes_and_rolls_out_again() {
    let fleet = fleet(3);
    let fast = ["--max-parallel", "3", "--soak", "300ms"];
    let (ctl, _) = run(&rollout_args(&fleet.file, "0.2.0", &fast));
    assert_eq!(ctl.code, 0, "{ctl:#?}");
    for (n, agent) in fleet.agents.iter().enumerate() {
        for _ in 0..=n {
            assert_eq!(agent.get("/").status, 200);
        }
    }
    assert_eq!(counts(&fleet), [1, 2, 3]);
    let (ctl, up) = run(&rollout_args(&fleet.file, "0.3.0", &fast));
    assert_eq!(ctl.code, 0, "{ctl:#?}");
    assert_eq!(counts(&fleet), [1, 2, 3], "the counts went up with 0.3.0");

    // Back down to 0.2.0: each agent downgrades, its state migrated down.
    let (ctl, down) = run(&rollout_args(&fleet.file, "0.2.0", &fast));
    assert_eq!(ctl.code, 0, "{ctl:#?}");
    assert_eq!(down["outcome"], "converged");
    assert_ne!(down["rollout_id"], up["rollout_id"]);
    assert_eq!(outcomes(&down), ["upgraded"; 3]);
    for agent in &fleet.agents {
        assert_eq!(agent.status()["permanent_version"], "0.2.0");
        let history = agent.history();
        assert_eq!(transitions(&history, "downgrade", "0.2.0").len(), 1);
    }
    assert_eq!(counts(&fleet), [1, 2, 3], "the counts came back down");

    // Undo the last rollout: every agent back on 0.3.0, as it was.
    let undo = ctl_json(&["rollout", "undo", "--fleet", fleet.file.to_str().unwrap()]);
    assert_eq!(undo["outcome"], "undone", "{undo:#}");
    assert_eq!(undo["rollout_id"], down["rollout_id"]);
    assert_eq!(outcomes(&undo), ["undone"; 3]);
    for agent in &fleet.agents {
        let status = agent.status();
        assert_eq!(status["active_version"], "0.3.0");
        assert_eq!(status["permanent_version"], "0.3.0");
    }
    assert_eq!(counts(&fleet), [1, 2, 3]);
    // Undoing again finds nothing left to undo, and changes nothing.
    let again = ctl_json(&["rollout", "undo", "--fleet", fleet.file.to_str().unwrap()]);
    assert_eq!(again["outcome"], "undone", "{again:#}");
    assert_eq!(outcomes(&again), ["untouched"; 3]);

    // The same rollout down, again: a new attempt, with ids of its own
    // (the first rollout to 0.2.0 had the same release and fleet: the
    // same rollout, attempt 1).
    let (ctl, redo) = run(&rollout_args(&fleet.file, "0.2.0", &fast));
    assert_eq!(ctl.code, 0, "{ctl:#?}");
    assert_eq!(redo["rollout_id"], down["rollout_id"]);
    assert_eq!(down["attempt"], 2);
    assert_eq!(redo["attempt"], 5, "up, down, undo, undo again, down again");
    assert_eq!(outcomes(&redo), ["upgraded"; 3]);
    for agent in &fleet.agents {
        assert_eq!(agent.status()["permanent_version"], "0.2.0");
        let history = agent.history();
        assert_eq!(transitions(&history, "downgrade", "0.2.0").len(), 2);
        // No request id refused for reuse anywhere.
        assert!(history
            .iter()
            .all(|t| t["error_reason"] != "REQUEST_ID_REUSED"));
    }
    let past = ctl_json(&[
        "rollout",
        "history",
        "--fleet",
        fleet.file.to_str().unwrap(),
    ]);
    let seen: Vec<(&str, u64)> = past
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["outcome"].as_str().unwrap(),
                r["attempt"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            ("converged", 5),
            ("undone", 4),
            ("undone", 3),
            ("converged", 2),
            ("converged", 1),
            ("converged", 1)
        ],
        "{past:#}"
    );
}

#[test]
fn a_second_rollout_is_refused_while_the_first_holds_the_agents() {
    let fleet = fleet(2);
    let first = spawn(&rollout_args(
        &fleet.file,
        "0.2.0",
        &["--max-parallel", "1", "--soak", "3s"],
    ));
    // Seen from another process: the first rollout holds both agents.
    let file = fleet.file.to_str().unwrap();
    let mut status = Value::Null;
    assert!(eventually(Duration::from_secs(60), || {
        status = ctl_json(&["rollout", "status", "--fleet", file]);
        status["agents"]
            .as_array()
            .is_some_and(|a| a.iter().all(|a| !a["lease"].is_null()))
    }));
    let holder = status["rollouts"][0].clone();
    assert_eq!(holder["version"], "0.2.0", "{status:#}");
    assert_eq!(holder["agents_total"], 2);
    assert!(
        holder["owner"].as_str().unwrap().starts_with("local:"),
        "{holder:#}"
    );

    // Another rollout (another version) over the same agents: refused
    // before it changes anything, naming the holder.
    let (ctl, second) = run(&rollout_args(&fleet.file, "0.3.0", &[]));
    assert_eq!(ctl.code, 5, "{ctl:#?}");
    assert_eq!(second["outcome"], "leased");
    let holder_id = holder["rollout_id"].as_str().unwrap();
    assert!(ctl.stderr.contains(holder_id), "{ctl:#?}");
    for agent in &fleet.agents {
        assert!(
            agent.release("0.3.0").is_none(),
            "staged by the refused rollout"
        );
    }

    // The first goes on and converges.
    let out = first.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:#?}");
    for agent in &fleet.agents {
        assert_eq!(agent.status()["permanent_version"], "0.2.0");
    }
    // Free again: the second one now runs.
    let (ctl, _) = run(&rollout_args(&fleet.file, "0.3.0", &["--soak", "300ms"]));
    assert_eq!(ctl.code, 0, "{ctl:#?}");
}

#[test]
fn an_unreachable_agent_within_the_budget_is_skipped_and_the_rest_converge() {
    let fleet = fleet(3);
    let with_gone = with_gone(&fleet);
    let (ctl, report) = run(&rollout_args(
        &with_gone,
        "0.2.0",
        &[
            "--max-parallel",
            "3",
            "--soak",
            "300ms",
            "--max-unavailable",
            "1",
        ],
    ));
    assert_eq!(ctl.code, 6, "{ctl:#?}");
    assert_eq!(report["outcome"], "converged");
    assert_eq!(
        outcomes(&report),
        ["upgraded", "upgraded", "upgraded", "skipped"]
    );
    assert!(ctl.stderr.contains("gone"), "{ctl:#?}");
    for agent in &fleet.agents {
        assert_eq!(agent.status()["permanent_version"], "0.2.0");
        // Nothing was rolled back.
        assert!(transitions(&agent.history(), "rollback", "0.1.0").is_empty());
    }
    // A percentage of the fleet: 25% of 4 is one agent.
    let (ctl, _) = run(&rollout_args(
        &with_gone,
        "0.3.0",
        &[
            "--max-unavailable",
            "25%",
            "--soak",
            "300ms",
            "--max-parallel",
            "3",
        ],
    ));
    assert_eq!(ctl.code, 6, "{ctl:#?}");
    // Bad budgets are usage errors.
    let out = ctl_command(&rollout_args(
        &with_gone,
        "0.3.0",
        &["--max-unavailable", "101%"],
    ))
    .output()
    .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn a_step_pauses_until_resumed_from_another_process() {
    let fleet = fleet(4);
    let file = fleet.file.to_str().unwrap();
    let rollout = spawn(&rollout_args(
        &fleet.file,
        "0.2.0",
        &[
            "--steps",
            "1,pause,100%",
            "--soak",
            "300ms",
            "--max-parallel",
            "3",
        ],
    ));
    // Paused after its first step: the canary alone runs 0.2.0.
    let mut status = Value::Null;
    assert!(eventually(Duration::from_secs(60), || {
        status = ctl_json(&["rollout", "status", "--fleet", file]);
        status["rollouts"][0]["step"]
            .as_str()
            .is_some_and(|s| s.starts_with("paused"))
    }));
    let active: Vec<String> = fleet
        .agents
        .iter()
        .map(|a| a.status()["active_version"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(active, ["0.2.0", "0.1.0", "0.1.0", "0.1.0"], "{status:#}");
    assert_eq!(status["rollouts"][0]["agents_done"], 1, "{status:#}");
    assert_eq!(status["rollouts"][0]["agents_pending"], 3, "{status:#}");

    let resume = || {
        ctl_command(&[
            "rollout".into(),
            "resume".into(),
            "--fleet".into(),
            file.into(),
        ])
        .output()
        .unwrap()
    };
    let resumed = resume();
    assert_eq!(resumed.status.code(), Some(0), "{resumed:#?}");
    let out = rollout.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:#?}");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(outcomes(&report), ["upgraded"; 4]);
    for agent in &fleet.agents {
        assert_eq!(agent.status()["permanent_version"], "0.2.0");
    }
    // Nothing is paused any more: resuming again says so.
    let again = resume();
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("nothing to resume"));
}

#[test]
fn a_switch_refused_on_the_canary_stops_the_rollout_with_nothing_switched() {
    let fleet = fleet(2);
    let fast = ["--max-parallel", "2", "--soak", "300ms"];
    assert_eq!(run(&rollout_args(&fleet.file, "0.2.0", &fast)).0.code, 0);
    // 0.7.0's init panics when handed 0.2.0's state: its load fails.
    let (ctl, report) = run(&rollout_args(&fleet.file, "0.7.0", &fast));
    assert_eq!(
        ctl.code, 1,
        "nothing was switched, so nothing rolled back: {ctl:#?}"
    );
    assert_eq!(report["outcome"], "stopped");
    assert_eq!(outcomes(&report), ["failed", "not_reached"]);
    assert!(
        ctl.stderr.contains("stopped before switching any agent"),
        "{ctl:#?}"
    );
    for (agent, reported) in fleet
        .agents
        .iter()
        .zip(report["agents"].as_array().unwrap())
    {
        assert_eq!(agent.status()["active_version"], "0.2.0");
        assert!(transitions(&agent.history(), "rollback", "0.2.0").is_empty());
        // Staged by this rollout and never switched to: removed again.
        assert!(agent.release("0.7.0").is_none(), "{reported:#}");
    }
}

#[test]
fn a_step_whose_release_is_slower_than_the_old_fails_its_analysis_and_rolls_back() {
    let fleet = fleet(2);
    // Clients of /slow?ms=30 on both agents: 0.1.0 answers 404 at once,
    // 0.2.6 after 30 ms. Healthy either way: only the analysis sees it.
    let loads: Vec<Load> = fleet
        .agents
        .iter()
        .map(|a| Load::start(a.http, "/slow?ms=30", 2))
        .collect();
    // The old release has served enough to compare with.
    assert!(eventually(Duration::from_secs(30), || {
        fleet.agents.iter().all(|a| {
            a.status()["served"].as_array().is_some_and(|s| {
                s.iter()
                    .any(|v| v["version"] == "0.1.0" && v["requests"].as_u64() >= Some(100))
            })
        })
    }));
    let (ctl, report) = run(&rollout_args(
        &fleet.file,
        "0.2.6",
        &["--steps", "1,100%", "--soak", "4s"],
    ));
    for load in loads {
        load.stop();
    }
    assert_eq!(ctl.code, 4, "{ctl:#?}");
    assert_eq!(report["outcome"], "halted");
    assert_eq!(outcomes(&report), ["failed_analysis", "not_reached"]);
    let analysis = report["agents"][0]["analysis"].as_str().unwrap();
    assert!(analysis.contains("p99"), "{analysis}");
    for agent in &fleet.agents {
        let status = agent.status();
        assert_eq!(status["active_version"], "0.1.0", "{status:#}");
        assert_eq!(status["permanent_version"], "0.1.0", "{status:#}");
    }
    let history = fleet.agents[0].history();
    let back = transitions(&history, "rollback", "0.1.0");
    assert_eq!(back.len(), 1);
    assert!(back[0]["reason"].as_str().unwrap().contains("analysis"));
    // The agent never switched has the release removed again.
    assert!(fleet.agents[1].release("0.2.6").is_none());
}

#[test]
fn a_skipped_agent_is_picked_up_when_the_rollout_runs_again() {
    let mut fleet = fleet(3);
    let dir = fleet.file.parent().unwrap().to_owned();
    // edge-3 is down while the rollout runs.
    assert_eq!(fleet.agents.pop().unwrap().terminate(), 0);
    let args = rollout_args(
        &fleet.file,
        "0.2.0",
        &["--soak", "300ms", "--max-unavailable", "1"],
    );
    let (ctl, first) = run(&args);
    assert_eq!(ctl.code, 6, "{ctl:#?}");
    assert_eq!(outcomes(&first), ["upgraded", "upgraded", "skipped"]);
    // Back up (on its local socket, where the fleet file says), and the
    // same command again: only edge-3 is switched.
    fleet.agents.push(Agent::start(&dir.join("agent-2"), &[]));
    let (ctl, again) = run(&args);
    assert_eq!(ctl.code, 0, "{ctl:#?}");
    assert_eq!(again["rollout_id"], first["rollout_id"]);
    assert_eq!(again["attempt"], 2);
    assert_eq!(
        outcomes(&again),
        ["already_there", "already_there", "upgraded"]
    );
    assert_eq!(fleet.agents[2].status()["permanent_version"], "0.2.0");
}

#[test]
fn a_killed_rollout_is_taken_over_by_another_only_with_force() {
    let fleet = fleet(2);
    let mut first = spawn(&rollout_args(
        &fleet.file,
        "0.2.0",
        &["--max-parallel", "1", "--soak", "30s"],
    ));
    // Killed while its canary soaks.
    assert!(eventually(Duration::from_secs(60), || {
        fleet.agents[0].status()["active_version"] == "0.2.0"
    }));
    first.kill().unwrap();
    first.wait().unwrap();
    let (ctl, refused) = run(&rollout_args(&fleet.file, "0.3.0", &["--soak", "300ms"]));
    assert_eq!(ctl.code, 5, "{ctl:#?}");
    assert_eq!(refused["outcome"], "leased");
    let (ctl, forced) = run(&rollout_args(
        &fleet.file,
        "0.3.0",
        &["--soak", "300ms", "--force"],
    ));
    assert_eq!(ctl.code, 0, "{ctl:#?}");
    assert_eq!(forced["outcome"], "converged");
    for agent in &fleet.agents {
        assert_eq!(agent.status()["permanent_version"], "0.3.0");
    }
    // Each agent's records say whose lease the forced rollout took.
    let past = ctl_json(&[
        "rollout",
        "history",
        "--fleet",
        fleet.file.to_str().unwrap(),
    ]);
    let newest = &past[0];
    assert_eq!(newest["rollout_id"], forced["rollout_id"], "{past:#}");
    assert!(
        newest["taken_from"]
            .as_str()
            .is_some_and(|t| t.contains("attempt 1")),
        "{past:#}"
    );
    assert_eq!(past[1]["outcome"], "taken over", "{past:#}");
}

/// Waits until the rollout `child` runs is paused in its canary step, as
/// `rollout status` shows it from another process, in a record renewed
/// after `after` (an RFC 3339 time, as the record says it: a killed
/// run's record is left behind); the status then.
fn paused_in_canary(
    fleet: &Fleet,
    child: &mut std::process::Child,
    weight: &str,
    after: &str,
) -> Value {
    let file = fleet.file.to_str().unwrap();
    let mut status = Value::Null;
    let step = format!("canary {weight}: paused until `ctl rollout resume`");
    assert!(
        eventually(Duration::from_secs(60), || {
            if let Some(exit) = child.try_wait().unwrap() {
                panic!("the rollout ended ({exit}) before its canary step paused");
            }
            status = ctl_json(&["rollout", "status", "--fleet", file]);
            let record = &status["rollouts"][0];
            record["step"] == step.as_str()
                && record["updated_at"].as_str().is_some_and(|t| t > after)
        }),
        "{status:#}"
    );
    status
}

fn resume(fleet: &Fleet) {
    let out = ctl_command(&[
        "rollout".into(),
        "resume".into(),
        "--fleet".into(),
        fleet.file.to_str().unwrap().into(),
    ])
    .output()
    .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:#?}");
}

/// What `version` served on `agent`, from its status: (requests, errors).
fn served(agent: &Agent, version: &str) -> (u64, u64) {
    agent.status()["served"]
        .as_array()
        .and_then(|s| s.iter().find(|v| v["version"] == version))
        .map_or((0, 0), |v| {
            (
                v["requests"].as_u64().unwrap_or(0),
                v["errors"].as_u64().unwrap_or(0),
            )
        })
}

#[test]
fn a_canary_step_serves_both_releases_survives_a_killed_run_and_is_promoted() {
    // 0.1.0 and 0.1.5 keep no state: a canary of one beside the other is
    // allowed.
    let fleet = fleet(2);
    let args = rollout_args(
        &fleet.file,
        "0.1.5",
        &[
            "--steps",
            "canary 50%,pause,1,100%",
            "--soak",
            "300ms",
            "--max-parallel",
            "2",
        ],
    );
    let mut first = spawn(&args);
    let status = paused_in_canary(&fleet, &mut first, "50%", "");
    assert_eq!(status["rollouts"][0]["agents_done"], 0, "{status:#}");
    let (edge1, edge2) = (&fleet.agents[0], &fleet.agents[1]);
    let now = edge1.status();
    assert_eq!(now["active_version"], "0.1.0", "{now:#}");
    assert_eq!(now["permanent_version"], "0.1.0", "{now:#}");
    assert_eq!(now["canary"]["version"], "0.1.5", "{now:#}");
    assert_eq!(now["canary"]["split"]["permille"], 500, "{now:#}");
    assert!(edge2.status()["canary"].is_null());

    // Killed mid-canary: the same command again takes the canary up where
    // it stands (its request answered, not run again) and waits its
    // pause again.
    first.kill().unwrap();
    first.wait().unwrap();
    let killed = ctl_json(&["rollout", "status", "--fleet", fleet.file.to_str().unwrap()]);
    let left = killed["rollouts"][0]["updated_at"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut second = spawn(&args);
    paused_in_canary(&fleet, &mut second, "50%", &left);
    let canaries: Vec<Value> = edge1
        .history()
        .into_iter()
        .filter(|t| t["kind"] == "canary")
        .collect();
    assert_eq!(canaries.len(), 1, "{canaries:#?}");
    let rollout_id = status["rollouts"][0]["rollout_id"].as_str().unwrap();
    let id = canaries[0]["request_id"].as_str().unwrap();
    assert!(
        id.starts_with(&format!("rollout-{rollout_id}-a1-canary0-")),
        "{id}"
    );

    // Both releases answer on edge-1, each counted apart.
    let mut client = Client::connect(edge1.http).unwrap();
    let mut by_release = std::collections::HashMap::<String, u64>::new();
    for _ in 0..40 {
        let reply = client.get("/").unwrap();
        assert_eq!(reply.status, 200);
        *by_release.entry(reply.release).or_default() += 1;
    }
    drop(client);
    let canary = by_release.get("0.1.5").copied().unwrap_or(0);
    assert!(canary > 0 && canary < 40, "{by_release:?}");
    assert_eq!(served(edge1, "0.1.5"), (canary, 0));
    assert!(served(edge1, "0.1.0").0 >= 40 - canary);
    assert_eq!(edge1.status()["canary"]["served"], canary);

    resume(&fleet);
    let out = second.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:#?}");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (&report["attempt"], &report["resumed"]),
        (&1.into(), &true.into())
    );
    assert_eq!(outcomes(&report), ["upgraded"; 2]);
    // Too few requests to judge: the canary passes its analysis unjudged.
    let judged = report["agents"][0]["canary_analysis"].as_str().unwrap();
    assert!(judged.starts_with("not judged"), "{judged}");
    assert!(report["agents"][1]["canary_analysis"].is_null());
    for agent in &fleet.agents {
        let status = agent.status();
        assert_eq!(status["permanent_version"], "0.1.5", "{status:#}");
        assert!(status["canary"].is_null(), "{status:#}");
        let history = agent.history();
        assert_eq!(transitions(&history, "upgrade", "0.1.5").len(), 1);
    }
    assert_eq!(transitions(&edge1.history(), "canary", "0.1.5").len(), 1);
    assert!(transitions(&edge2.history(), "canary", "0.1.5").is_empty());
    // The canary's count carried on through its promotion.
    for _ in 0..10 {
        assert_eq!(edge1.get("/").release, "0.1.5");
    }
    assert_eq!(served(edge1, "0.1.5"), (canary + 10, 0));
}

#[test]
fn a_canary_step_failing_its_analysis_is_dropped_and_the_rollout_halts() {
    // The agents' own gate never drops a canary for its errors
    // (`--max-error-rate 1`): only the rollout's analysis judges it.
    let fleet = fleet_with(2, &["--max-error-rate", "1"]);
    let edge1 = &fleet.agents[0];
    // GET /fail: 0.1.0 answers 404, its canary 0.1.5 answers 500; GET /
    // 200 from both. About half the canary's requests fail (not all: the
    // agent reads its counters apart, and a moment's errors above the
    // requests would be over any --max-error-rate).
    let loads = [
        Load::start(edge1.http, "/fail", 1),
        Load::start(edge1.http, "/", 1),
    ];
    let mut rollout = spawn(&rollout_args(
        &fleet.file,
        "0.1.5",
        &["--steps", "canary 50%,pause,1,100%", "--soak", "300ms"],
    ));
    paused_in_canary(&fleet, &mut rollout, "50%", "");
    // Enough served by each, beside the other, to judge.
    assert!(eventually(Duration::from_secs(60), || {
        served(edge1, "0.1.5").0 >= 100 && served(edge1, "0.1.0").0 >= 100
    }));
    resume(&fleet);
    let out = rollout.wait_with_output().unwrap();
    for load in loads {
        load.stop();
    }
    assert_eq!(out.status.code(), Some(4), "{out:#?}");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["outcome"], "halted", "{report:#}");
    assert_eq!(
        outcomes(&report),
        ["failed_analysis", "not_reached"],
        "{report:#}"
    );
    let analysis = report["agents"][0]["canary_analysis"].as_str().unwrap();
    assert!(
        analysis.contains("against 0.00%") && analysis.contains("more than 1.00 points above"),
        "{analysis}"
    );
    assert!(
        report["halted_by"]
            .as_str()
            .unwrap()
            .contains("canary 50% analysis"),
        "{report:#}"
    );
    // The canary is gone, no agent runs 0.1.5, and it is staged nowhere.
    for agent in &fleet.agents {
        let status = agent.status();
        assert!(status["canary"].is_null(), "{status:#}");
        assert_eq!(status["active_version"], "0.1.0", "{status:#}");
        assert_eq!(status["permanent_version"], "0.1.0", "{status:#}");
        assert!(transitions(&agent.history(), "upgrade", "0.1.5").is_empty());
        assert!(agent.release("0.1.5").is_none(), "left staged");
    }
    let history = edge1.history();
    let dropped = transitions(&history, "rollback", "0.1.0");
    assert_eq!(dropped.len(), 1, "{history:#?}");
    assert_eq!(dropped[0]["from_version"], "0.1.5");
    let reason = dropped[0]["reason"].as_str().unwrap();
    assert!(
        reason.contains("halted") && reason.contains("analysis"),
        "{reason}"
    );
}

#[test]
fn undoing_a_rollout_killed_mid_canary_drops_its_canary() {
    let fleet = fleet(2);
    let mut killed = spawn(&rollout_args(
        &fleet.file,
        "0.1.5",
        &["--steps", "canary 10%,pause,1,100%"],
    ));
    paused_in_canary(&fleet, &mut killed, "10%", "");
    killed.kill().unwrap();
    killed.wait().unwrap();
    assert_eq!(fleet.agents[0].status()["canary"]["version"], "0.1.5");
    let undo = ctl_json(&["rollout", "undo", "--fleet", fleet.file.to_str().unwrap()]);
    assert_eq!(undo["outcome"], "undone", "{undo:#}");
    assert_eq!(outcomes(&undo), ["canary_dropped", "untouched"]);
    for agent in &fleet.agents {
        let status = agent.status();
        assert!(status["canary"].is_null(), "{status:#}");
        assert_eq!(status["permanent_version"], "0.1.0", "{status:#}");
        assert!(agent.release("0.1.5").is_none(), "left staged");
    }
    let status = ctl_json(&["rollout", "status", "--fleet", fleet.file.to_str().unwrap()]);
    assert_eq!(status["rollouts"], serde_json::json!([]), "{status:#}");
}

#[test]
fn a_canary_step_judges_what_each_release_served_during_it() {
    // The agent's own gate never drops a canary for its errors.
    let fleet = fleet_with(1, &["--max-error-rate", "1"]);
    let edge1 = &fleet.agents[0];
    // An earlier canary of 0.1.5, by hand, that failed all its requests:
    // they stay in the agent's `served` for 0.1.5.
    stage_dir(edge1, &fixture_dir("canary"), &library("fixture_canary"));
    edge1
        .ctl(&["upgrade", "--to", "0.1.5", "--canary", "100%"])
        .ok();
    let mut client = Client::connect(edge1.http).unwrap();
    for _ in 0..100 {
        assert_eq!(client.get("/fail").unwrap().status, 500);
    }
    drop(client);
    edge1.ctl(&["rollback"]).ok();
    assert!(edge1.status()["canary"].is_null());
    assert_eq!(served(edge1, "0.1.5"), (100, 100));

    let mut rollout = spawn(&rollout_args(
        &fleet.file,
        "0.1.5",
        &["--steps", "canary 50%,pause,1", "--soak", "300ms"],
    ));
    paused_in_canary(&fleet, &mut rollout, "50%", "");
    // Served since the canary started: at least 100 by each, all fine.
    let active_before = served(edge1, "0.1.0").0;
    let load = Load::start(edge1.http, "/", 1);
    assert!(eventually(Duration::from_secs(60), || {
        let status = edge1.status();
        status["canary"]["served"].as_u64().unwrap_or(0) >= 100
            && served(edge1, "0.1.0").0 >= active_before + 100
    }));
    load.stop();
    resume(&fleet);
    let out = rollout.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:#?}");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(outcomes(&report), ["upgraded"]);
    let analysis = report["agents"][0]["canary_analysis"].as_str().unwrap();
    assert!(
        analysis.starts_with("error rate 0.00% against 0.00%"),
        "{analysis}"
    );
    assert_eq!(edge1.status()["permanent_version"], "0.1.5");
}

#[test]
fn a_canary_the_agent_drops_during_its_pause_ends_the_step_at_once() {
    // The agent's gate drops a canary whose error rate is over 5% (its
    // default): GET /fail is a 500 from 0.1.5.
    let fleet = fleet(2);
    let edge1 = &fleet.agents[0];
    let mut rollout = spawn(&rollout_args(
        &fleet.file,
        "0.1.5",
        &["--steps", "canary 50%,pause,1,100%", "--soak", "300ms"],
    ));
    paused_in_canary(&fleet, &mut rollout, "50%", "");
    let load = Load::start(edge1.http, "/fail", 1);
    // Paused until resumed, which nobody asks: it ends by itself once the
    // canary is gone.
    let ended = eventually(Duration::from_secs(60), || {
        rollout.try_wait().unwrap().is_some()
    });
    load.stop();
    if !ended {
        rollout.kill().unwrap();
        rollout.wait().unwrap();
        panic!("the rollout went on waiting on a canary its agent had dropped");
    }
    let out = rollout.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(4), "{out:#?}");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["outcome"], "halted", "{report:#}");
    assert_eq!(
        outcomes(&report),
        ["failed_soak", "not_reached"],
        "{report:#}"
    );
    assert!(
        report["halted_by"]
            .as_str()
            .unwrap()
            .contains("the agent's health gate dropped the canary"),
        "{report:#}"
    );
    for agent in &fleet.agents {
        let status = agent.status();
        assert!(status["canary"].is_null(), "{status:#}");
        assert_eq!(status["permanent_version"], "0.1.0", "{status:#}");
    }
    // Dropped once, by the agent: the rollout found nothing to drop.
    let history = edge1.history();
    assert_eq!(
        transitions(&history, "rollback", "0.1.0").len(),
        1,
        "{history:#?}"
    );
    assert!(fleet.agents[1].release("0.1.5").is_none(), "left staged");
}

#[test]
fn a_rerun_that_stops_early_drops_the_canary_a_killed_run_left() {
    // edge-2 takes signed releases only: it refuses the unsigned 0.1.5.
    let keys = tempfile::tempdir().unwrap();
    let made = nine9s_tests::ctl(
        "http://127.0.0.1:1",
        &["keygen", "--out", keys.path().join("k").to_str().unwrap()],
    );
    assert_eq!(made.code, 0, "{made:?}");
    let trusted = keys.path().join("trusted");
    std::fs::create_dir(&trusted).unwrap();
    std::fs::copy(keys.path().join("k/nine9s.pub"), trusted.join("team.pub")).unwrap();
    let fleet = fleet_each(&[
        &[],
        &[
            "--trusted-keys",
            trusted.to_str().unwrap(),
            "--require-signed",
        ],
    ]);
    let edge1 = &fleet.agents[0];
    let args = |extra: &[&str]| {
        let mut all = vec!["--steps", "canary 50%,pause,1,100%"];
        all.extend_from_slice(extra);
        rollout_args(&fleet.file, "0.1.5", &all)
    };
    // Skipping edge-2 (--max-unavailable 1), it runs its canary on edge-1,
    // and is killed there.
    let mut first = spawn(&args(&["--max-unavailable", "1"]));
    paused_in_canary(&fleet, &mut first, "50%", "");
    first.kill().unwrap();
    first.wait().unwrap();
    assert_eq!(edge1.status()["canary"]["version"], "0.1.5");

    // Run again without the budget: it stops at edge-2's stage, before
    // any switch, and drops the canary it had left.
    let (ctl, report) = run(&args(&[]));
    assert_eq!(ctl.code, 1, "{ctl:#?}");
    assert_eq!(report["outcome"], "stopped", "{report:#}");
    assert_eq!(report["resumed"], true, "{report:#}");
    assert_eq!(
        outcomes(&report),
        ["canary_dropped", "failed"],
        "{report:#}"
    );
    for agent in &fleet.agents {
        let status = agent.json(&["status"]);
        assert!(status["canary"].is_null(), "{status:#}");
        assert_eq!(status["active_version"], "0.1.0", "{status:#}");
    }
    let history = edge1.history();
    let dropped = transitions(&history, "rollback", "0.1.0");
    assert_eq!(dropped.len(), 1, "{history:#?}");
    assert_eq!(dropped[0]["from_version"], "0.1.5");
    let status = ctl_json(&["rollout", "status", "--fleet", fleet.file.to_str().unwrap()]);
    assert_eq!(status["rollouts"], serde_json::json!([]), "{status:#}");
}

#[test]
fn a_canary_step_of_a_release_that_keeps_state_stops_before_any_switch() {
    // 0.2.0 keeps state: no canary of it on edge-2, and edge-1, the step
    // before, is not switched either.
    let fleet = fleet(2);
    let (ctl, report) = run(&rollout_args(
        &fleet.file,
        "0.2.0",
        &["--steps", "1,canary 50%,pause 1s,100%", "--soak", "300ms"],
    ));
    assert_eq!(ctl.code, 1, "{ctl:#?}");
    assert_eq!(report["outcome"], "stopped", "{report:#}");
    let why = report["halted_by"].as_str().unwrap();
    assert!(
        why.contains("edge-2 for its canary 50%: 0.2.0 keeps state (state version 1)"),
        "{why}"
    );
    for agent in &fleet.agents {
        let status = agent.status();
        assert_eq!(status["active_version"], "0.1.0", "{status:#}");
        assert!(transitions(&agent.history(), "upgrade", "0.2.0").is_empty());
        assert!(agent.release("0.2.0").is_none(), "left staged");
    }
}
