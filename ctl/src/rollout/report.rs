//! What a rollout (or an undo) tells at its end: each agent's track — the
//! release before and after, how it ended there and why — and the whole
//! run's outcome, as the JSON document of `--output json` or the table on
//! stdout.

use serde::Serialize;

use crate::render;

/// How the run ended for one agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Nothing done yet (and with `--dry-run`, nothing done at all).
    Pending,
    /// The target was already permanent there.
    AlreadyThere,
    /// Switched (upgraded or downgraded), and permanent after its soak.
    Upgraded,
    /// Its switch was refused, or it did not become permanent.
    Failed,
    /// The health gate rolled the target back during its soak.
    FailedSoak,
    /// Permanent, but worse than the release it replaced (the analysis
    /// after its step): rolled back by the halt.
    FailedAnalysis,
    /// Switched, then rolled back by the halt.
    RolledBack,
    /// The run halted before its turn.
    NotReached,
    /// It could not be reached.
    Unreachable,
    /// It could not be reached, or refused the release, and the
    /// unavailability budget (`--max-unavailable`) let the rollout go on
    /// without it.
    Skipped,
    /// The halt's rollback of it failed: it may still run the target.
    RollbackFailed,
    /// It served the target as a canary, dropped by the halt (or the
    /// undo) before its promotion.
    CanaryDropped,
    /// `undo`: back on the release it had before the rollout.
    Undone,
    /// `undo`: the rollout never switched it, or it left the target since.
    Untouched,
}

/// One agent in the summary (and the JSON document).
#[derive(Debug, Clone, Serialize)]
pub struct Track {
    pub name: String,
    pub address: String,
    /// The active release when the run found it.
    pub before: Option<String>,
    /// The active release when the run ended.
    pub after: Option<String>,
    pub outcome: Outcome,
    /// Why it failed, was skipped, not reached or rolled back.
    pub error: Option<String>,
    /// The agent's reason code with `error`, when it sent one.
    pub reason: Option<String>,
    /// The request id of its switch.
    pub request_id: String,
    /// What became of the release staged there, when the run halted or
    /// was undone: removed, or why it stayed.
    pub cleanup: Option<String>,
    /// The analysis after its step: what it compared, or why it failed.
    pub analysis: Option<String>,
    /// The analysis of its canary step (`canary 10%`), before its switch:
    /// the canary against the active release beside it.
    pub canary_analysis: Option<String>,
}

impl Track {
    pub fn new(name: &str, address: &str, request_id: String) -> Track {
        Track {
            name: name.to_owned(),
            address: address.to_owned(),
            before: None,
            after: None,
            outcome: Outcome::Pending,
            error: None,
            reason: None,
            request_id,
            cleanup: None,
            analysis: None,
            canary_analysis: None,
        }
    }

    /// The table's OUTCOME cell: the JSON word, in words.
    fn outcome_words(&self) -> String {
        serde_json::to_value(self.outcome)
            .ok()
            .and_then(|v| v.as_str().map(|s| s.replace('_', " ")))
            .unwrap_or_default()
    }
}

/// The document `--output json` prints, and what the summary shows.
#[derive(Debug, Serialize)]
pub struct Report {
    pub rollout_id: String,
    /// Which attempt of the rollout this run was (request ids are unique
    /// per attempt), and whether it took up an interrupted one.
    pub attempt: u32,
    pub resumed: bool,
    /// `rollout` or `undo`.
    pub action: &'static str,
    pub version: String,
    pub sha256: String,
    /// `converged`, `planned` (`--dry-run`), `undone`, `halted` (and
    /// rolled back), `stopped` (before any switch), `leased` (another
    /// rollout holds some agent: nothing done), `unreachable` (some agent
    /// could not be reached), or `failed` (a rollback failed).
    pub outcome: &'static str,
    /// The failure that stopped the run.
    pub halted_by: Option<String>,
    /// Indexes into `agents`: the canary, then the waves.
    pub canary: Option<usize>,
    pub waves: Vec<Vec<usize>>,
    pub elapsed_ms: u64,
    /// Where the time went.
    pub phases: Phases,
    pub agents: Vec<Track>,
}

/// Milliseconds spent in each phase (0: not reached).
#[derive(Debug, Default, Serialize)]
pub struct Phases {
    pub survey_ms: u64,
    pub stage_ms: u64,
    pub canary_ms: u64,
    pub waves_ms: u64,
    pub rollback_ms: u64,
}

/// The table at the end, on stdout.
pub fn summary(report: &Report) {
    let rows: Vec<[String; 5]> = report
        .agents
        .iter()
        .map(|t| {
            let mut note = t.error.clone().unwrap_or_default();
            if let Some(cleanup) = &t.cleanup {
                if !note.is_empty() {
                    note.push_str("; ");
                }
                note.push_str(cleanup);
            }
            [
                t.name.clone(),
                t.before.clone().unwrap_or_else(|| "?".into()),
                match (&t.after, report.outcome) {
                    (_, "planned") => "-".into(),
                    (Some(after), _) => after.clone(),
                    (None, _) => "?".into(),
                },
                t.outcome_words(),
                note,
            ]
        })
        .collect();
    let header = ["AGENT", "BEFORE", "AFTER", "OUTCOME", "NOTE"];
    let width = |c: usize| {
        rows.iter()
            .map(|r| r[c].chars().count())
            .chain([header[c].len()])
            .max()
            .unwrap_or(0)
    };
    let widths = [width(0), width(1), width(2), width(3)];
    let line = |r: [&str; 5]| {
        let text = format!(
            "{:<w0$}  {:<w1$}  {:<w2$}  {:<w3$}  {}",
            r[0],
            r[1],
            r[2],
            r[3],
            r[4],
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2],
            w3 = widths[3]
        );
        outln!("{}", text.trim_end());
    };
    if report.outcome == "planned" {
        let name = |i: usize| report.agents[i].name.as_str();
        match report.canary {
            Some(c) => outln!("canary: {}", name(c)),
            None => outln!("canary: done in an earlier run"),
        }
        for (n, wave) in report.waves.iter().enumerate() {
            let names: Vec<&str> = wave.iter().map(|&i| name(i)).collect();
            outln!("wave {}: {}", n + 1, names.join(", "));
        }
    }
    line(header);
    for row in &rows {
        line([&row[0], &row[1], &row[2], &row[3], &row[4]]);
    }
    let on_target = report
        .agents
        .iter()
        .filter(|t| t.after.as_deref() == Some(report.version.as_str()))
        .count();
    let skipped = report
        .agents
        .iter()
        .filter(|t| t.outcome == Outcome::Skipped)
        .count();
    let took = render::seconds(report.elapsed_ms);
    let id = format!("rollout {} (attempt {})", report.rollout_id, report.attempt);
    match report.outcome {
        "converged" if skipped > 0 => outln!(
            "{id}: converged but for {skipped} skipped agent(s): {} of {} agents run {} (permanent), in {took}; run it again to pick them up",
            on_target,
            report.agents.len(),
            report.version
        ),
        "converged" => outln!(
            "{id}: converged: {} of {} agents run {} (permanent), in {took}",
            on_target,
            report.agents.len(),
            report.version
        ),
        "planned" => outln!("{id}: dry run: nothing was changed"),
        "undone" => outln!(
            "{id}: undone: every agent it switched is back on its release from before, in {took}"
        ),
        outcome => outln!(
            "{id}: {outcome}: {}; {} of {} agents run {}, after {took}",
            report.halted_by.as_deref().unwrap_or(""),
            on_target,
            report.agents.len(),
            report.version
        ),
    }
}
