//! How replies look on a terminal: short sentences and aligned tables;
//! and the lower-case words the API's enums are shown as (here and in
//! `--output json`).

use std::path::Path;

use nine9s_proto as pb;
use pb::{
    CarriedState, EventKind, PlanOrigin, ReleaseState, SoakMode, StepKind, TransitionKind,
    TransitionResult,
};

use crate::Switch;

pub fn state_name(state: ReleaseState) -> &'static str {
    match state {
        ReleaseState::Staged => "staged",
        ReleaseState::Current => "current",
        ReleaseState::Permanent => "permanent",
        ReleaseState::Old => "old",
        ReleaseState::Failed => "failed",
        ReleaseState::Unspecified => "unknown",
    }
}

pub fn kind_name(kind: TransitionKind) -> &'static str {
    match kind {
        TransitionKind::Install => "install",
        TransitionKind::Stage => "stage",
        TransitionKind::Upgrade => "upgrade",
        TransitionKind::Downgrade => "downgrade",
        TransitionKind::Rollback => "rollback",
        TransitionKind::MakePermanent => "make-permanent",
        TransitionKind::Remove => "remove",
        TransitionKind::Restart => "restart",
        TransitionKind::Canary => "canary",
        TransitionKind::Unspecified => "unknown",
    }
}

pub fn result_name(result: TransitionResult) -> &'static str {
    match result {
        TransitionResult::Running => "running",
        TransitionResult::Ok => "ok",
        TransitionResult::Failed => "failed",
        TransitionResult::Aborted => "aborted",
        TransitionResult::Unspecified => "unknown",
    }
}

pub fn origin_name(origin: PlanOrigin) -> &'static str {
    match origin {
        PlanOrigin::Written => "written",
        PlanOrigin::Derived => "derived",
        PlanOrigin::Unspecified => "unknown",
    }
}

/// `load`, `migrate`, `switch`, `drain`, `unload`, or `hook:NAME`.
pub fn step_name(step: &pb::PlanStep) -> String {
    match step.kind() {
        StepKind::Load => "load".into(),
        StepKind::Migrate => "migrate".into(),
        StepKind::Switch => "switch".into(),
        StepKind::Drain => "drain".into(),
        StepKind::Unload => "unload".into(),
        StepKind::Hook => format!("hook:{}", step.hook),
        StepKind::Unspecified => "unknown".into(),
    }
}

pub fn event_kind_name(kind: EventKind) -> &'static str {
    match kind {
        EventKind::TransitionStarted => "transition_started",
        EventKind::TransitionFinished => "transition_finished",
        EventKind::ReleaseStateChanged => "release_state_changed",
        EventKind::SoakStarted => "soak_started",
        EventKind::SoakProgress => "soak_progress",
        EventKind::SoakPassed => "soak_passed",
        EventKind::SoakFailed => "soak_failed",
        EventKind::RollbackRetry => "rollback_retry",
        EventKind::AgentStarted => "agent_started",
        EventKind::CheckpointSkipped => "checkpoint_skipped",
        EventKind::AgentRestartFailed => "agent_restart_failed",
        EventKind::LeaseTaken => "lease_taken",
        EventKind::LeaseReleased => "lease_released",
        EventKind::Unspecified => "unknown",
    }
}

/// Prints rows with every column padded to its widest cell.
pub fn table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        outln!("{}", padded.join("  ").trim_end());
    };
    line(header.iter().map(|h| h.to_string()).collect());
    for row in rows {
        line(row.clone());
    }
}

/// A duration given in microseconds, in the unit that keeps its digits.
fn ms(us: u64) -> String {
    if us < 1000 {
        format!("{us} µs")
    } else {
        format!("{:.1} ms", us as f64 / 1000.0)
    }
}

/// RFC 3339 UTC (`2026-11-26T03:20:00Z`) from milliseconds since the epoch.
pub fn time(ms: i64) -> String {
    match u64::try_from(ms) {
        Ok(ms) => humantime::format_rfc3339_seconds(
            std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms),
        )
        .to_string(),
        Err(_) => "-".into(),
    }
}

/// `signer`: the key id of the release.sig sent along, if one was.
pub fn staged(reply: &pb::StageReply, library: &Path, signer: Option<&str>) {
    let Some(r) = &reply.release else { return };
    // A signature the agent set aside unchecked signs nothing there.
    let signer = signer.filter(|_| reply.signature_note.is_empty());
    let signed = signer.map_or_else(String::new, |id| format!("; signed by {id}"));
    if reply.already_staged {
        outln!(
            "{} {} was already staged (sha256 {}){signed}",
            r.name,
            r.version,
            r.sha256
        );
    } else {
        outln!(
            "staged {} {} from {} ({} bytes, sha256 {}){signed}",
            r.name,
            r.version,
            library.display(),
            r.size,
            r.sha256
        );
    }
    if !reply.signature_note.is_empty() {
        outln!("note: {}", reply.signature_note);
    }
}

pub fn releases(releases: &[pb::Release]) {
    let rows: Vec<Vec<String>> = releases
        .iter()
        .map(|r| {
            let mut note = r.routes.join(" ");
            if !r.failure.is_empty() {
                note = format!("failed: {}", r.failure);
            }
            vec![
                r.version.clone(),
                state_name(r.state()).to_owned(),
                format!("v{}", r.state_version),
                r.sha256.chars().take(12).collect(),
                time(r.staged_at_ms),
                if r.signed_by.is_empty() {
                    "-".to_owned()
                } else {
                    r.signed_by.clone()
                },
                note,
            ]
        })
        .collect();
    table(
        &[
            "VERSION",
            "STATE",
            "STATE-FORMAT",
            "SHA256",
            "STAGED (UTC)",
            "SIGNED-BY",
            "ROUTES",
        ],
        &rows,
    );
}

fn plan(plan: &pb::Plan) {
    let steps: Vec<String> = plan.steps.iter().map(step_name).collect();
    outln!(
        "plan {} -> {} ({}): {}",
        plan.from_version,
        plan.to_version,
        origin_name(plan.origin()),
        steps.join(", ")
    );
    for check in &plan.checks {
        outln!("  ok  {check}");
    }
}

pub fn switched(word: &str, switch: &Switch, reply: &pb::TransitionReply) {
    if reply.unchanged {
        outln!("{} is already active; nothing to do", switch.to);
        return;
    }
    let Some(t) = &reply.transition else {
        if let Some(p) = &reply.plan {
            plan(p);
        }
        outln!("dry run: nothing changed");
        return;
    };
    if t.kind() == TransitionKind::Canary {
        outln!(
            "canary {} serves beside {} ({}); `ctl promote` finishes the switch, `ctl rollback` drops it",
            t.to_version,
            t.from_version,
            t.reason
                .split_once("canary: ")
                .and_then(|(_, split)| split.split("; ").next())
                .unwrap_or(&t.reason)
        );
        return;
    }
    let then = if switch.permanent {
        format!("{} is permanent", t.to_version)
    } else if switch.no_permanent {
        format!(
            "{} is current; `ctl make-permanent {}` keeps it across restarts",
            t.to_version, t.to_version
        )
    } else {
        format!(
            "{} is current and becomes permanent if it stays healthy through its soak",
            t.to_version
        )
    };
    outln!(
        "{word}d {} -> {} in {} ({}); {then}",
        t.from_version,
        t.to_version,
        ms(t.duration_us),
        held(reply, t)
    );
    if let Some(line) = restored(reply, &t.to_version) {
        outln!("{line}");
    }
}

/// `requests held 57 µs`; a switch that carried no state from a release
/// that keeps none closed no gate (the agent reports no wait) and held
/// none.
fn held(reply: &pb::TransitionReply, t: &pb::Transition) -> String {
    if reply.carried_state() == CarriedState::None && t.switch_wait_us == 0 {
        "no request held: no state to carry".to_owned()
    } else {
        format!("requests held {}", ms(t.switch_wait_us))
    }
}

/// What the state of `version` is when a stored snapshot was restored:
/// the requests served since it was taken are not in it.
fn restored(reply: &pb::TransitionReply, version: &str) -> Option<String> {
    if reply.carried_state() != CarriedState::Snapshot {
        return None;
    }
    let why = if reply.state_fallback.is_empty() {
        String::new()
    } else {
        format!(" because {}", reply.state_fallback)
    };
    Some(format!(
        "state: restored from the snapshot taken when {version} was left ({}){why}; requests served since then are not in it",
        time(reply.snapshot_taken_at_ms)
    ))
}

pub fn rolled_back(dry_run: bool, reply: &pb::TransitionReply) {
    if dry_run {
        if let Some(p) = &reply.plan {
            plan(p);
        }
        outln!("dry run: nothing changed");
    } else if let Some(t) = reply
        .transition
        .as_ref()
        .filter(|t| t.reason.contains("was dropped"))
    {
        outln!(
            "dropped the canary of {}; every request goes to {} again",
            t.from_version,
            t.to_version
        );
    } else if let Some(t) = &reply.transition {
        outln!(
            "rolled back {} -> {} in {} ({}); {} is permanent",
            t.from_version,
            t.to_version,
            ms(t.duration_us),
            held(reply, t),
            t.to_version
        );
        if let Some(line) = restored(reply, &t.to_version) {
            outln!("{line}");
        }
    } else {
        outln!("nothing to do");
    }
}

pub fn made_permanent(version: &str, reply: &pb::TransitionReply) {
    if reply.unchanged {
        outln!("{version} is already permanent; nothing to do");
    } else {
        outln!("{version} is now permanent");
    }
}

/// Milliseconds as seconds with one decimal.
pub fn seconds(ms: u64) -> String {
    format!("{:.1} s", ms as f64 / 1000.0)
}

/// A transition in a few words: `#7 upgrade 0.1.0 -> 0.2.0 ok by deployer`
/// (`(auto)` for what the agent did on its own).
fn transition_summary(t: &pb::Transition) -> String {
    let mut line = format!(
        "#{} {} {} -> {} {}",
        t.id,
        kind_name(t.kind()),
        t.from_version,
        t.to_version,
        result_name(t.result())
    );
    if t.automatic {
        line.push_str(" (auto)");
    }
    if !t.identity.is_empty() {
        line.push_str(&format!(" by {}", t.identity));
    }
    if !t.error.is_empty() {
        line.push_str(&format!(": {}", t.error));
        if !t.error_reason.is_empty() {
            line.push_str(&format!(" [{}]", t.error_reason));
        }
    }
    if !t.reason.is_empty() {
        line.push_str(&format!("; {}", t.reason));
    }
    if !t.request_id.is_empty() {
        line.push_str(&format!(" (request {})", t.request_id));
    }
    line
}

pub fn status(s: &pb::StatusReply) {
    outln!("active:    {}", s.active_version);
    outln!("permanent: {}", s.permanent_version);
    let soak = s.soak.clone().unwrap_or_default();
    if !s.current_version.is_empty() {
        let note = match soak.mode() {
            SoakMode::Soaking => format!(" (soaking, {} left)", seconds(soak.remaining_ms)),
            SoakMode::Held => format!(
                " (held: `ctl make-permanent {}` keeps it across restarts)",
                s.current_version
            ),
            SoakMode::RollingBack => " (failed its soak; rolling back)".to_owned(),
            SoakMode::Idle | SoakMode::Unspecified => String::new(),
        };
        outln!("current:   {}{note}", s.current_version);
    }
    if soak.mode() == SoakMode::RollingBack {
        let mut line = format!(
            "soak:      {} failed its soak: {}; automatic rollback, {} attempt(s) so far",
            soak.version, soak.reason, soak.attempts
        );
        if !soak.last_error.is_empty() {
            line.push_str(&format!("; last error: {}", soak.last_error));
        }
        outln!("{line}");
    }
    if let Some(t) = &s.running {
        outln!("running:   {}", transition_summary(t));
    }
    if !s.store_error.is_empty() {
        outln!(
            "store:     cannot be written: {} (transitions are refused; serving goes on)",
            s.store_error
        );
    }
    if let Some(c) = &s.canary {
        let split = c.split.clone().unwrap_or_default();
        let which = if split.permille > 0 {
            format!("{}% of requests", f64::from(split.permille) / 10.0)
        } else if split.header_value.is_empty() {
            format!("requests with header {}", split.header)
        } else {
            format!("requests with {}: {}", split.header, split.header_value)
        };
        outln!(
            "canary:    {} ({which}): {} served, {} errors",
            c.version,
            c.served,
            c.errors
        );
    }
    outln!("uptime:    {}", seconds(s.uptime_ms));
    if let Some(p) = &s.agent {
        outln!("agent:     {}", process_line(p, now_ms()));
        if !p.previous_exit.is_empty() {
            outln!("           {}", previous_worker(p));
        }
    }
    outln!();
    releases(&s.releases);
    outln!();
    let rows: Vec<Vec<String>> = s
        .libraries
        .iter()
        .map(|l| {
            let canary = s.canary.as_ref().is_some_and(|c| c.version == l.version);
            let role = if l.active {
                "active"
            } else if canary && !l.lingering {
                "canary"
            } else if l.lingering {
                "lingering (released, still mapped)"
            } else {
                "draining"
            };
            vec![
                l.version.clone(),
                role.to_owned(),
                l.in_flight.to_string(),
                l.stuck.to_string(),
                l.served.to_string(),
                l.errors.to_string(),
                l.path.clone(),
            ]
        })
        .collect();
    table(
        &[
            "LIBRARY",
            "ROLE",
            "IN-FLIGHT",
            "STUCK",
            "SERVED",
            "ERRORS",
            "PATH",
        ],
        &rows,
    );
}

/// Who started a transition: the identity of its token or certificate;
/// `agent` for what the agent did on its own; `-` when not recorded
/// (history from before identities were).
fn who(t: &pb::Transition) -> String {
    if !t.identity.is_empty() {
        t.identity.clone()
    } else if t.automatic {
        "agent".to_owned()
    } else {
        "-".to_owned()
    }
}

pub fn history(reply: &pb::HistoryReply) {
    let rows: Vec<Vec<String>> = reply
        .transitions
        .iter()
        .map(|t| {
            let mut notes = Vec::new();
            if !t.error.is_empty() {
                notes.push(if t.error_reason.is_empty() {
                    t.error.clone()
                } else {
                    format!("{} [{}]", t.error, t.error_reason)
                });
            }
            if !t.reason.is_empty() {
                notes.push(t.reason.clone());
            }
            let kind = kind_name(t.kind());
            vec![
                t.id.to_string(),
                time(t.started_at_ms),
                if t.automatic {
                    format!("{kind} (auto)")
                } else {
                    kind.to_owned()
                },
                who(t),
                t.from_version.clone(),
                t.to_version.clone(),
                result_name(t.result()).to_owned(),
                ms(t.duration_us),
                ms(t.switch_wait_us),
                notes.join("; "),
            ]
        })
        .collect();
    table(
        &[
            "ID",
            "TIME (UTC)",
            "KIND",
            "WHO",
            "FROM",
            "TO",
            "RESULT",
            "DURATION",
            "HELD",
            "NOTE",
        ],
        &rows,
    );
    if let (true, Some(last)) = (reply.more, reply.transitions.last()) {
        outln!();
        outln!("more follow: ctl history --after {}", last.id);
    }
}

/// One event, one line: `ID  TIME  KIND  what it says`.
pub fn event(e: &pb::Event) {
    let mut parts = Vec::new();
    if let Some(t) = &e.transition {
        parts.push(transition_summary(t));
    }
    if !e.version.is_empty() {
        parts.push(e.version.clone());
    }
    if e.state() != ReleaseState::Unspecified {
        parts.push(format!("-> {}", state_name(e.state())));
    }
    if matches!(e.kind(), EventKind::SoakStarted | EventKind::SoakProgress) {
        parts.push(format!("{} left", seconds(e.soak_remaining_ms)));
    }
    if !e.message.is_empty() {
        parts.push(e.message.clone());
    }
    outln!(
        "{}  {}  {}  {}",
        e.id,
        time(e.at_ms),
        event_kind_name(e.kind()),
        parts.join("  ")
    );
}

pub fn info(i: &pb::AgentInfoReply) {
    let abi: Vec<String> = i.abi_versions.iter().map(u32::to_string).collect();
    outln!("agent:              {} (pid {})", i.agent_version, i.pid);
    outln!("service:            {}", i.service);
    outln!("plugin ABI:         {}", abi.join(", "));
    outln!("started (UTC):      {}", time(i.started_at_ms));
    outln!("default soak:       {}", seconds(i.default_soak_ms));
    outln!("max error rate:     {}", i.max_error_rate);
    outln!("health timeout:     {}", seconds(i.health_timeout_ms));
    outln!("quiesce timeout:    {}", seconds(i.quiesce_timeout_ms));
    outln!("shutdown grace:     {}", seconds(i.shutdown_grace_ms));
    outln!("checkpoint every:   {}", seconds(i.checkpoint_every_ms));
    outln!("keep old releases:  {}", i.keep_old);
    outln!("keep history:       {}", i.keep_history);
    if let Some(p) = &i.process {
        let supervisor = if p.supervisor_pid == 0 {
            "none (the worker runs on its own)".to_owned()
        } else {
            p.supervisor_pid.to_string()
        };
        outln!("supervisor:         {supervisor}");
        outln!("worker:             {}{}", p.worker_pid, up(p, now_ms()));
        outln!("binary sha256:      {}", or_unknown(&p.binary_sha256));
        if !p.previous_exit.is_empty() {
            outln!("previous worker:    {}", p.previous_exit);
        }
        if let Some(f) = &p.last_failed_restart {
            outln!("last failed restart: {}", failed_restart(f));
        }
    }
}

/// A failed self-upgrade in one line: when, what, how.
pub fn failed_restart(f: &pb::FailedRestart) -> String {
    let what = if f.supervisor {
        "the supervisor's new binary"
    } else {
        "the new worker"
    };
    format!("{} {what} (pid {}) {}", time(f.at_ms), f.pid, f.exit)
}

/// Now, in milliseconds since the epoch (0 if the clock is before it).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// A running time in its two largest units: `45s`, `3m12s`, `2h05m`,
/// `3d04h`.
fn age(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        3600..=86_399 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86_400, s % 86_400 / 3600),
    }
}

/// ` (up 3m12s)`, or nothing when the start time is not known.
fn up(p: &pb::AgentProcess, now_ms: i64) -> String {
    if p.worker_started_at_ms <= 0 {
        return String::new();
    }
    // A clock behind the agent's counts as just started.
    let ms = u64::try_from(now_ms.saturating_sub(p.worker_started_at_ms)).unwrap_or(0);
    format!(" (up {})", age(ms))
}

/// The first 12 hex digits of a sha256, and `…` when there is more.
pub fn short_sha(sha: &str) -> String {
    if sha.is_empty() {
        return "unknown".to_owned();
    }
    let short: String = sha.chars().take(12).collect();
    if short.len() < sha.len() {
        format!("{short}…")
    } else {
        short
    }
}

fn or_unknown(text: &str) -> &str {
    if text.is_empty() {
        "unknown"
    } else {
        text
    }
}

/// The agent's processes on one line:
/// `0.1.0  supervisor 1200  worker 1234 (up 3m12s)  binary 3f2a9c1b7e04…`.
pub fn process_line(p: &pb::AgentProcess, now_ms: i64) -> String {
    let supervisor = if p.supervisor_pid == 0 {
        "no supervisor".to_owned()
    } else {
        format!("supervisor {}", p.supervisor_pid)
    };
    format!(
        "{}  {supervisor}  worker {}{}  binary {}",
        or_unknown(&p.agent_version),
        p.worker_pid,
        up(p, now_ms),
        short_sha(&p.binary_sha256)
    )
}

/// `previous worker was killed by SIGSEGV`.
fn previous_worker(p: &pb::AgentProcess) -> String {
    format!("previous worker {}", p.previous_exit)
}

/// `ctl agent restart`: the agent's answer, before the handover.
pub fn agent_restarting(reply: &pb::RestartAgentReply) {
    outln!(
        "restarting the agent: worker {} is handing over to a new worker from the binary on disk",
        reply.worker_pid
    );
}

/// `ctl agent restart --wait`: the handover seen through.
pub fn agent_restarted(old_worker: u32, new: &pb::AgentProcess, ms: u64) -> String {
    format!(
        "agent restarted: worker {old_worker} -> {} (binary sha256 {}), in {ms} ms",
        new.worker_pid,
        short_sha(&new.binary_sha256)
    )
}

#[cfg(test)]
mod tests {
    use super::{time, transition_summary, who};
    use nine9s_proto as pb;

    #[test]
    fn who_started_it() {
        let mut t = pb::Transition {
            id: 7,
            identity: "deployer".into(),
            ..Default::default()
        };
        assert_eq!(who(&t), "deployer");
        assert!(transition_summary(&t).contains("by deployer"));
        t.identity.clear();
        assert_eq!(who(&t), "-");
        assert!(!transition_summary(&t).contains(" by "));
        t.automatic = true;
        assert_eq!(who(&t), "agent");
    }

    #[test]
    fn durations() {
        assert_eq!(super::ms(57), "57 µs");
        assert_eq!(super::ms(1_250), "1.2 ms");
        assert_eq!(super::ms(30_002_700), "30002.7 ms");
    }

    #[test]
    fn the_agent_processes() {
        let sha = "3f2a9c1b7e04d5a6b7c8d9e0f1a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4";
        let mut p = pb::AgentProcess {
            agent_version: "0.1.0".into(),
            supervisor_pid: 1200,
            worker_pid: 1234,
            worker_started_at_ms: 1_000_000,
            binary_sha256: sha.into(),
            previous_exit: String::new(),
            last_failed_restart: None,
        };
        assert_eq!(
            super::process_line(&p, 1_000_000 + 192_000),
            "0.1.0  supervisor 1200  worker 1234 (up 3m12s)  binary 3f2a9c1b7e04…"
        );
        // A clock behind the agent's; no start time; no supervisor.
        assert!(super::process_line(&p, 0).contains("worker 1234 (up 0s)"));
        p.worker_started_at_ms = 0;
        p.supervisor_pid = 0;
        assert_eq!(
            super::process_line(&p, 1_000_000),
            "0.1.0  no supervisor  worker 1234  binary 3f2a9c1b7e04…"
        );
        p.previous_exit = "was killed by SIGSEGV".into();
        assert_eq!(
            super::previous_worker(&p),
            "previous worker was killed by SIGSEGV"
        );
        let new = pb::AgentProcess {
            worker_pid: 5678,
            binary_sha256: sha.into(),
            ..Default::default()
        };
        assert_eq!(
            super::agent_restarted(1234, &new, 840),
            "agent restarted: worker 1234 -> 5678 (binary sha256 3f2a9c1b7e04…), in 840 ms"
        );
        assert_eq!(super::short_sha(""), "unknown");
        assert_eq!(super::short_sha("abcd"), "abcd");
        assert_eq!(
            super::process_line(&pb::AgentProcess::default(), 0),
            "unknown  no supervisor  worker 0  binary unknown"
        );
    }

    #[test]
    fn ages() {
        assert_eq!(super::age(999), "0s");
        assert_eq!(super::age(45_000), "45s");
        assert_eq!(super::age(192_000), "3m12s");
        assert_eq!(super::age(2 * 3_600_000 + 5 * 60_000), "2h05m");
        assert_eq!(super::age(3 * 86_400_000 + 4 * 3_600_000), "3d04h");
        assert!(super::age(u64::MAX).ends_with('h'));
    }

    #[test]
    fn utc_time() {
        assert_eq!(time(0), "1970-01-01T00:00:00Z");
        assert_eq!(time(1_795_000_000_000), "2026-11-18T11:06:40Z");
        assert_eq!(time(-1), "-");
    }
}
