//! The pure part of a rollout, tested without agents: from what each agent
//! was found running, who is the canary and what the waves are, cut into
//! `--steps` with pauses between them and in-process canaries before them;
//! which
//! attempt of the rollout this run is, from the records the agents keep;
//! the unavailability budget; and the request ids, derived from the
//! rollout and its attempt so that resuming an interrupted attempt sends
//! the same ids (the agents answer what they already did instead of acting
//! twice) while a new attempt (after a halt or an undo) acts anew.

use std::time::Duration;

use nine9s_proto as pb;
use sha2::{Digest, Sha256};

/// Where an agent stands relative to the rollout's target version, as read
/// before anything is done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    /// The target is permanent there: nothing to do.
    Permanent,
    /// The target is active but not permanent yet (a rollout interrupted
    /// during its soak): its verdict is awaited, nothing is sent.
    Soaking,
    /// Another release is active: the agent is staged and upgraded.
    Elsewhere,
}

/// The order of the rollout, as indexes into the fleet.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    /// Upgraded (or awaited) alone, first; its verdict decides whether the
    /// waves start. `None` when an agent this rollout switched (in an
    /// earlier run) already has the target permanent: that was the canary.
    pub canary: Option<usize>,
    /// Then these, each wave at once, one wave after the other.
    pub waves: Vec<Vec<usize>>,
}

/// The canary and the waves of at most `max_parallel` (at least 1) agents,
/// in fleet order. A soaking agent is awaited where it stands; the canary
/// is the first soaking agent if there is one (an interrupted rollout's
/// canary), else the first agent elsewhere. `ours[i]`: this rollout
/// switched agent `i` in an earlier run (an agent someone else upgraded
/// proves nothing about the release here).
pub fn plan(found: &[Found], ours: &[bool], max_parallel: usize) -> Plan {
    let max_parallel = max_parallel.max(1);
    let pending: Vec<usize> = (0..found.len())
        .filter(|&i| found[i] != Found::Permanent)
        .collect();
    let canary_done =
        (0..found.len()).any(|i| found[i] == Found::Permanent && ours.get(i) == Some(&true));
    let canary = if canary_done {
        None
    } else {
        pending
            .iter()
            .copied()
            .find(|&i| found[i] == Found::Soaking)
            .or_else(|| pending.first().copied())
    };
    let rest: Vec<usize> = pending.into_iter().filter(|&i| Some(i) != canary).collect();
    Plan {
        canary,
        waves: rest.chunks(max_parallel).map(<[usize]>::to_vec).collect(),
    }
}

/// One item of `--steps`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepSpec {
    /// Switch agents until this many of the fleet run the target (`3`).
    Agents(usize),
    /// ... this share of the fleet, rounded up (`20%`).
    Percent(u8),
    /// Wait this long (`pause 5m`), or until `ctl rollout resume` (`pause`).
    Pause(Option<Duration>),
    /// Before the next count's agents switch, serve the target beside
    /// their active release to this share of requests, in per mille
    /// (`canary 10%`: 100), through the pauses written after it; the
    /// count's switch then promotes it.
    Canary(u16),
}

/// `10%`, `0.5%` or `10`: a canary's weight in per mille, 1 to 1000 (as
/// `ctl upgrade --canary` and `--steps 'canary 10%'` take it).
pub fn canary_weight(text: &str) -> Result<u16, String> {
    let number = text.trim().trim_end_matches('%');
    let percent: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a percentage (e.g. 10%)"))?;
    let permille = (percent * 10.0).round();
    if !(1.0..=1000.0).contains(&permille) || (percent * 10.0 - permille).abs() > 1e-6 {
        return Err(format!("{text:?}: from 0.1% to 100%, in steps of 0.1%"));
    }
    Ok(permille as u16)
}

/// A canary's weight for people: `10%`, `0.5%`.
pub fn weight(permille: u16) -> String {
    match permille % 10 {
        0 => format!("{}%", permille / 10),
        tenth => format!("{}.{tenth}%", permille / 10),
    }
}

/// `--steps` as clap holds it (a `Vec` would be taken for many values).
#[derive(Debug, Clone)]
pub struct Steps(pub Vec<StepSpec>);

impl std::str::FromStr for Steps {
    type Err = String;

    fn from_str(text: &str) -> Result<Steps, String> {
        parse_steps(text).map(Steps)
    }
}

/// The longest pause with a duration: a week, as a soak.
const MAX_PAUSE: Duration = Duration::from_secs(7 * 24 * 3600);

/// `--steps`: comma-separated counts of agents (`1`), shares of the fleet
/// (`20%`), pauses (`pause`, `pause 30s`) and canaries (`canary 10%`),
/// each canary followed by a pause, then by the count whose agents run it.
pub fn parse_steps(text: &str) -> Result<Vec<StepSpec>, String> {
    let mut steps = Vec::new();
    for item in text.split(',').map(str::trim) {
        let step = if let Some(rest) = item.strip_prefix("canary") {
            let weight = rest.trim();
            if weight.is_empty() || weight == rest {
                return Err(format!(
                    "step {item:?}: a canary step is `canary WEIGHT` (canary 10%)"
                ));
            }
            StepSpec::Canary(canary_weight(weight).map_err(|e| format!("step {item:?}: {e}"))?)
        } else if let Some(rest) = item.strip_prefix("pause") {
            let rest = rest.trim();
            if rest.is_empty() {
                StepSpec::Pause(None)
            } else {
                let pause = nine9s_manifest::parse_duration(rest)
                    .map_err(|e| format!("step {item:?}: {e}"))?;
                if pause.is_zero() || pause > MAX_PAUSE {
                    return Err(format!(
                        "step {item:?}: a pause is above zero and at most 7 days"
                    ));
                }
                StepSpec::Pause(Some(pause))
            }
        } else if let Some(p) = item.strip_suffix('%') {
            match p.parse::<u8>() {
                Ok(p @ 1..=100) => StepSpec::Percent(p),
                _ => return Err(format!("step {item:?}: a share is 1% to 100%")),
            }
        } else {
            match item.parse::<usize>() {
                Ok(n @ 1..=super::fleet::MAX_AGENTS) => StepSpec::Agents(n),
                _ => {
                    return Err(format!(
                        "step {item:?} is not a number of agents (3), a share of the fleet (20%), `pause`, `pause DURATION` or `canary WEIGHT`"
                    ))
                }
            }
        };
        steps.push(step);
    }
    if !steps.iter().any(is_count) {
        return Err("--steps needs at least one count of agents or share of the fleet".into());
    }
    // A canary runs on the agents of the count after it, and is judged
    // after the pause between them: without one it would be judged (on
    // nothing) the moment it started.
    for (n, step) in steps.iter().enumerate() {
        let StepSpec::Canary(permille) = *step else {
            continue;
        };
        let rest = &steps[n + 1..];
        let Some(count) = rest.iter().position(is_count) else {
            return Err(format!(
                "step \"canary {}\" needs a count of agents or a share of the fleet after it: the agents it runs on",
                weight(permille)
            ));
        };
        if !rest[..count]
            .iter()
            .any(|s| matches!(s, StepSpec::Pause(_)))
        {
            return Err(format!(
                "step \"canary {}\" needs a pause after it (`pause 5m`, or `pause`): how long it serves before its analysis",
                weight(permille)
            ));
        }
    }
    Ok(steps)
}

/// A step that switches agents: a count or a share.
fn is_count(step: &StepSpec) -> bool {
    matches!(step, StepSpec::Agents(_) | StepSpec::Percent(_))
}

/// What a rollout does in order: switch groups of agents, pause, start
/// canaries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stage {
    /// These agents, in waves (each at once, one wave after the other).
    Switch(Vec<Vec<usize>>),
    Pause(Option<Duration>),
    /// The target as a canary of `permille` beside the active release on
    /// these agents (in waves), which the next `Switch` promotes. `step`:
    /// the step's index in `--steps`, which its request ids carry.
    Canary {
        waves: Vec<Vec<usize>>,
        permille: u16,
        step: usize,
    },
}

/// The plan as stages. Without steps: the canary alone, then the waves.
/// With steps, the agents to switch — the canary first, then the others
/// in fleet order — are cut where each step's count of agents on the
/// target (of `total`, counting `done`: already there) is reached, in
/// waves of `max_parallel`; what is left after the last step is a last
/// stage. A canary step runs on the agents of the next count (none if
/// that count switches nobody). Pauses stand where they are written,
/// except before any switch or canary, or after the last switch.
pub fn stages(
    plan: &Plan,
    steps: &[StepSpec],
    total: usize,
    done: usize,
    max_parallel: usize,
) -> Vec<Stage> {
    let max_parallel = max_parallel.max(1);
    let waves = |agents: &[usize]| -> Vec<Vec<usize>> {
        agents.chunks(max_parallel).map(<[usize]>::to_vec).collect()
    };
    let order: Vec<usize> = plan
        .canary
        .into_iter()
        .chain(plan.waves.iter().flatten().copied())
        .collect();
    if steps.is_empty() {
        let mut stages: Vec<Stage> = plan
            .canary
            .map(|c| Stage::Switch(vec![vec![c]]))
            .into_iter()
            .collect();
        if !plan.waves.is_empty() {
            stages.push(Stage::Switch(plan.waves.clone()));
        }
        return stages;
    }
    // How far a count step reaches in `order`.
    let upto = |step: &StepSpec| -> Option<usize> {
        let goal = match *step {
            StepSpec::Agents(n) => n,
            StepSpec::Percent(p) => (total * usize::from(p)).div_ceil(100),
            StepSpec::Pause(_) | StepSpec::Canary(_) => return None,
        };
        Some(goal.saturating_sub(done).min(order.len()))
    };
    let mut stages = Vec::new();
    let mut next = 0;
    // A canary runs: its pauses are its time to serve.
    let mut canary = false;
    for (n, step) in steps.iter().enumerate() {
        match *step {
            StepSpec::Pause(pause) => {
                // A pause before anything switched, or after the last
                // agent, waits for nothing.
                if canary || (next > 0 && next < order.len()) {
                    stages.push(Stage::Pause(pause));
                }
            }
            StepSpec::Canary(permille) => {
                let to = steps[n + 1..].iter().find_map(upto).unwrap_or(next);
                if to > next {
                    stages.push(Stage::Canary {
                        waves: waves(&order[next..to]),
                        permille,
                        step: n,
                    });
                    canary = true;
                }
            }
            StepSpec::Agents(_) | StepSpec::Percent(_) => {
                let to = upto(step).unwrap_or(next);
                if to > next {
                    stages.push(Stage::Switch(waves(&order[next..to])));
                    next = to;
                    canary = false;
                }
            }
        }
    }
    if next < order.len() {
        stages.push(Stage::Switch(waves(&order[next..])));
    }
    // Two pauses in a row (a step that switched nobody): the first is
    // kept, as written first.
    stages.dedup_by(|b, a| matches!((a, b), (Stage::Pause(_), Stage::Pause(_))));
    stages
}

/// What a release served on one agent, as its status tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Sample {
    pub requests: u64,
    pub errors: u64,
    /// `u64::MAX`: beyond the agent's last bucket.
    pub p99_us: u64,
}

impl From<&pb::VersionServed> for Sample {
    fn from(served: &pb::VersionServed) -> Sample {
        Sample {
            requests: served.requests,
            errors: served.errors,
            p99_us: served.p99_us,
        }
    }
}

impl Sample {
    /// What `version` served, from an agent's status (none: nothing).
    pub fn of(status: &pb::StatusReply, version: &str) -> Sample {
        status
            .served
            .iter()
            .find(|s| s.version == version)
            .map_or(Sample::default(), Sample::from)
    }

    /// The requests and errors since `base` was read; all of them if the
    /// counters went back (a new worker counts from zero). The p99 stays
    /// the one since the worker started: the agent keeps no histogram per
    /// moment.
    pub fn since(self, base: Sample) -> Sample {
        if self.requests < base.requests || self.errors < base.errors {
            return self;
        }
        Sample {
            requests: self.requests - base.requests,
            errors: self.errors - base.errors,
            p99_us: self.p99_us,
        }
    }

    /// Enough requests for the analysis to judge.
    pub fn enough(self) -> bool {
        self.requests >= MIN_REQUESTS
    }
}

/// The analysis after each step: how much worse than the release it
/// replaced a new one may do on the same agent.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Gate {
    /// Its error rate at most this much above the old one's (0.01: one
    /// percentage point).
    pub max_error_increase: f64,
    /// Its p99 latency at most this many times the old one's, or else
    /// within `P99_SLACK_US` of it.
    pub max_p99_ratio: f64,
}

/// Requests each release must have served for the analysis to judge.
pub const MIN_REQUESTS: u64 = 100;
/// A p99 this close to the old one passes whatever the ratio: the agent's
/// buckets are coarse (100 µs, 250 µs, ...), and a few milliseconds more
/// on a fast service are no regression to halt a rollout for.
pub const P99_SLACK_US: u64 = 10_000;

impl Gate {
    /// The verdict on `new` against `old`: `Ok` with what was compared
    /// (or why nothing could be), `Err` with why the step fails.
    pub fn judge(&self, new: Sample, old: Sample) -> Result<String, String> {
        if !new.enough() || !old.enough() {
            return Ok(format!(
                "not judged: {} requests on the new release, {} on the old (at least {MIN_REQUESTS} each)",
                new.requests, old.requests
            ));
        }
        // The agent's two counters are read apart: a moment's errors
        // above the requests is no rate above 100%.
        let rate = |s: Sample| s.errors.min(s.requests) as f64 / s.requests as f64;
        let (new_rate, old_rate) = (rate(new), rate(old));
        let p99 = |us: u64| {
            if us == u64::MAX {
                "over 10 s".to_owned()
            } else {
                format!("{:.1} ms", us as f64 / 1000.0)
            }
        };
        let compared = format!(
            "error rate {:.2}% against {:.2}%, p99 {} against {}",
            new_rate * 100.0,
            old_rate * 100.0,
            p99(new.p99_us),
            p99(old.p99_us)
        );
        if new_rate > old_rate + self.max_error_increase {
            return Err(format!(
                "{compared}: the error rate is more than {:.2} points above the old release's",
                self.max_error_increase * 100.0
            ));
        }
        let allowed = (old.p99_us as f64 * self.max_p99_ratio)
            .max(old.p99_us.saturating_add(P99_SLACK_US) as f64);
        if new.p99_us as f64 > allowed {
            return Err(format!(
                "{compared}: the p99 is more than {}x the old release's (and {} ms above it)",
                self.max_p99_ratio,
                P99_SLACK_US / 1000
            ));
        }
        Ok(compared)
    }
}

/// Which attempt of rollout `id` a run is, from every record of it the
/// agents keep (`(rollout id, attempt, held)`: held while its lease is):
/// an attempt some agent is still held by resumes (`resumed`); otherwise
/// the next one after every attempt that ended.
pub fn attempt<'a>(id: &str, records: impl IntoIterator<Item = (&'a str, u32, bool)>) -> Attempt {
    let mut ended = 0;
    let mut held = None;
    for (rollout, attempt, holds) in records {
        if rollout != id {
            continue;
        }
        if holds {
            held = held.max(Some(attempt));
        } else {
            ended = ended.max(attempt);
        }
    }
    match held {
        Some(number) => Attempt {
            number,
            resumed: true,
        },
        None => Attempt {
            number: ended.saturating_add(1),
            resumed: false,
        },
    }
}

/// Which attempt a run is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attempt {
    /// 1 for the first.
    pub number: u32,
    /// An interrupted attempt taken up again.
    pub resumed: bool,
}

/// How many agents a rollout may leave behind (unreachable, or refusing
/// the release), each skipped and reported instead of halting everything.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Budget {
    /// None: the first agent that cannot be reached stops the rollout.
    #[default]
    None,
    /// At most this many.
    Count(usize),
    /// This share of the fleet, rounded down (`--max-unavailable 10%`).
    Percent(u8),
}

impl Budget {
    /// The agents of a fleet of `total` that may be skipped.
    pub fn of(self, total: usize) -> usize {
        match self {
            Budget::None => 0,
            Budget::Count(n) => n,
            Budget::Percent(p) => total * usize::from(p) / 100,
        }
    }
}

impl std::str::FromStr for Budget {
    type Err = String;

    fn from_str(text: &str) -> Result<Budget, String> {
        let bad = || format!("{text:?} is not a number of agents (5) or a percentage (10%)");
        match text.strip_suffix('%') {
            Some(p) => match p.parse::<u8>() {
                Ok(p) if p <= 100 => Ok(if p == 0 {
                    Budget::None
                } else {
                    Budget::Percent(p)
                }),
                _ => Err(format!("{text:?}: a percentage is 0% to 100%")),
            },
            None => match text.parse::<usize>().map_err(|_| bad())? {
                0 => Ok(Budget::None),
                n if n <= super::fleet::MAX_AGENTS => Ok(Budget::Count(n)),
                _ => Err(format!(
                    "{text}: a fleet has at most {} agents",
                    super::fleet::MAX_AGENTS
                )),
            },
        }
    }
}

/// The steps that carry a request id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Stage,
    /// An upgrade or a downgrade to the target.
    Switch,
    Rollback,
    /// `ctl rollout undo`: back to the release an agent had before.
    Undo,
    /// Removing the release staged on an agent that never switched to it.
    Remove,
    /// Starting the canary of the `--steps` item at this index.
    Canary(usize),
    /// Dropping the canary this rollout started (a halt, an undo).
    DropCanary,
}

impl Step {
    fn word(self) -> String {
        match self {
            Step::Stage => "stage".into(),
            Step::Switch => "switch".into(),
            Step::Rollback => "rollback".into(),
            Step::Undo => "undo".into(),
            Step::Remove => "remove".into(),
            Step::Canary(n) => format!("canary{n}"),
            Step::DropCanary => "drop".into(),
        }
    }
}

/// The longest `--rollout-id`: with the prefix, the attempt, the step and
/// the agent's key, a request id stays within the agent's 128 characters.
pub const MAX_ROLLOUT_ID: usize = 64;

/// The rollout's id when none is given: the same for the same release
/// bytes, target version and set of agents (their canonical addresses:
/// `fleet::canonical`), so that running the same command again resumes
/// the rollout.
pub fn default_rollout_id(version: &str, sha256: &str, addresses: &[&str]) -> String {
    let mut sorted = addresses.to_vec();
    sorted.sort_unstable();
    let mut hash = Sha256::new();
    hash.update(version.as_bytes());
    hash.update([0]);
    hash.update(sha256.as_bytes());
    for address in sorted {
        hash.update([0]);
        hash.update(address.as_bytes());
    }
    format!("{version}-{}", &hex::encode(hash.finalize())[..12])
}

/// The request id of `step` on the agent at (canonical) `address` in
/// attempt `attempt` of rollout `rollout`.
pub fn request_id(rollout: &str, attempt: u32, step: Step, address: &str) -> String {
    let key = &hex::encode(Sha256::digest(address.as_bytes()))[..10];
    format!("{}{}-{key}", prefix(rollout, attempt), step.word())
}

/// What every request id of attempt `attempt` of `rollout` starts with.
pub fn prefix(rollout: &str, attempt: u32) -> String {
    format!("rollout-{rollout}-a{attempt}-")
}

/// The rollout a request id belongs to, if a rollout sent it: whether
/// `request_id` is `step`'s in some attempt of `rollout`.
pub fn sent_by(request_id: &str, rollout: &str, step: Step) -> bool {
    after_attempt(request_id, rollout)
        .and_then(|rest| rest.strip_prefix(step.word().as_str()))
        .is_some_and(|key| key.starts_with('-'))
}

/// Whether `request_id` started a canary of some step, in some attempt of
/// `rollout`.
pub fn canary_sent_by(request_id: &str, rollout: &str) -> bool {
    after_attempt(request_id, rollout)
        .and_then(|rest| rest.strip_prefix("canary"))
        .and_then(|rest| rest.split_once('-'))
        .is_some_and(|(n, _)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// What follows `rollout-ID-aN-` in a request id of `rollout`.
fn after_attempt<'a>(request_id: &'a str, rollout: &str) -> Option<&'a str> {
    let rest = request_id.strip_prefix(&format!("rollout-{rollout}-a"))?;
    let (attempt, rest) = rest.split_once('-')?;
    (!attempt.is_empty() && attempt.bytes().all(|b| b.is_ascii_digit())).then_some(rest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use Found::*;

    #[test]
    fn a_fresh_rollout_starts_with_the_first_agent() {
        let plan = plan(&[Elsewhere; 5], &[false; 5], 2);
        assert_eq!(plan.canary, Some(0));
        assert_eq!(plan.waves, vec![vec![1, 2], vec![3, 4]]);
    }

    #[test]
    fn a_resumed_rollout_awaits_its_canary_then_goes_on() {
        // Interrupted during the canary's soak.
        let plan1 = plan(&[Elsewhere, Soaking, Elsewhere], &[false, true, false], 1);
        assert_eq!(plan1.canary, Some(1));
        assert_eq!(plan1.waves, vec![vec![0], vec![2]]);
        // Interrupted in the second wave: the canary is done.
        let plan2 = plan(
            &[Permanent, Permanent, Soaking, Elsewhere],
            &[true, true, true, false],
            2,
        );
        assert_eq!(plan2.canary, None);
        assert_eq!(plan2.waves, vec![vec![2, 3]]);
        assert_eq!(plan(&[Permanent; 3], &[true; 3], 4), Plan::default());
        // Upgraded by hand, not by this rollout: the canary still comes first.
        let by_hand = plan(&[Permanent, Elsewhere, Elsewhere], &[false; 3], 1);
        assert_eq!(by_hand.canary, Some(1));
        assert_eq!(by_hand.waves, vec![vec![2]]);
    }

    #[test]
    fn request_ids_are_the_same_on_every_run_and_valid() {
        let id = default_rollout_id("0.2.0", "ab", &["http://b:1", "http://a:1"]);
        assert_eq!(
            id,
            default_rollout_id("0.2.0", "ab", &["http://a:1", "http://b:1"])
        );
        assert_ne!(
            id,
            default_rollout_id("0.2.0", "ac", &["http://a:1", "http://b:1"])
        );
        assert_ne!(id, default_rollout_id("0.2.0", "ab", &["http://a:1"]));
        let long = "x".repeat(MAX_ROLLOUT_ID);
        let request = request_id(&long, u32::MAX, Step::Rollback, "https://[::1]:50051");
        assert!(request.len() <= 128, "{request}");
        assert_ne!(
            request_id(&id, 1, Step::Switch, "http://a:1"),
            request_id(&id, 1, Step::Switch, "http://b:1")
        );
        assert_ne!(
            request_id(&id, 1, Step::Switch, "http://a:1"),
            request_id(&id, 1, Step::Rollback, "http://a:1")
        );
        assert_ne!(
            request_id(&id, 1, Step::Switch, "http://a:1"),
            request_id(&id, 2, Step::Switch, "http://a:1")
        );
    }

    #[test]
    fn a_request_id_tells_its_rollout_and_step() {
        let id = request_id("0.2.0-abc", 12, Step::Switch, "http://a:1");
        assert!(sent_by(&id, "0.2.0-abc", Step::Switch));
        assert!(!sent_by(&id, "0.2.0-abc", Step::Undo));
        assert!(!sent_by(&id, "0.2.0", Step::Switch));
        assert!(!sent_by(&id, "0.2.0-ab", Step::Switch));
        assert!(!sent_by(
            "rollout-0.2.0-abc-a-switch-x",
            "0.2.0-abc",
            Step::Switch
        ));
        assert!(!sent_by("deploy-42", "0.2.0-abc", Step::Switch));
    }

    #[test]
    fn the_attempt_resumes_a_held_lease_or_follows_the_last() {
        let first = attempt("r", []);
        assert_eq!((first.number, first.resumed), (1, false));
        let after_halt = attempt("r", [("r", 1, false), ("other", 7, false)]);
        assert_eq!((after_halt.number, after_halt.resumed), (2, false));
        // Killed during attempt 3: some agents still held by it.
        let killed = attempt("r", [("r", 2, false), ("r", 3, true), ("r", 1, false)]);
        assert_eq!((killed.number, killed.resumed), (3, true));
        assert_eq!(attempt("r", [("other", 4, true)]).number, 1);
    }

    #[test]
    fn budgets_parse_and_apply() {
        assert_eq!("2".parse(), Ok(Budget::Count(2)));
        assert_eq!("0".parse(), Ok(Budget::None));
        assert_eq!("10%".parse(), Ok(Budget::Percent(10)));
        assert_eq!("0%".parse(), Ok(Budget::None));
        for bad in [
            "",
            "-1",
            "101%",
            "x%",
            "1.5",
            "99999999999999999999",
            "10001",
        ] {
            assert!(bad.parse::<Budget>().is_err(), "{bad}");
        }
        assert_eq!(Budget::Percent(10).of(50), 5);
        assert_eq!(Budget::Percent(10).of(9), 0);
        assert_eq!(Budget::Count(3).of(2), 3);
        assert_eq!(Budget::None.of(100), 0);
    }

    #[test]
    fn steps_parse_and_cut_the_fleet() {
        use StepSpec::*;
        assert_eq!(
            parse_steps("1, pause 30s,20%,pause,100%").unwrap(),
            [
                Agents(1),
                Pause(Some(Duration::from_secs(30))),
                Percent(20),
                Pause(None),
                Percent(100)
            ]
        );
        for bad in [
            "", "pause", "0", "101%", "0%", "x", "pause 0s", "pause 8d", "1,,2", "10001",
        ] {
            assert!(parse_steps(bad).is_err(), "{bad}");
        }
        // Ten agents, none on the target: the canary, then up to 5, then
        // the rest, a pause after the canary.
        let plan = plan(&[Elsewhere; 10], &[false; 10], 2);
        let steps = parse_steps("1,pause 1m,50%,pause").unwrap();
        assert_eq!(
            stages(&plan, &steps, 10, 0, 2),
            [
                Stage::Switch(vec![vec![0]]),
                Stage::Pause(Some(Duration::from_secs(60))),
                Stage::Switch(vec![vec![1, 2], vec![3, 4]]),
                Stage::Pause(None),
                Stage::Switch(vec![vec![5, 6], vec![7, 8], vec![9]]),
            ]
        );
        // Without steps: the canary alone, then the waves.
        assert_eq!(
            stages(&plan, &[], 10, 0, 4),
            [
                Stage::Switch(vec![vec![0]]),
                Stage::Switch(vec![
                    vec![1, 2],
                    vec![3, 4],
                    vec![5, 6],
                    vec![7, 8],
                    vec![9]
                ]),
            ]
        );
        // Run again with 5 of 10 there: 50% is behind it, and so is the
        // pause after it (running it again is the go-ahead).
        let found = [[Permanent; 5], [Elsewhere; 5]].concat();
        let resumed = super::plan(&found, &[true; 10], 5);
        assert_eq!(
            stages(&resumed, &steps, 10, 5, 5),
            [Stage::Switch(vec![vec![5, 6, 7, 8, 9]])]
        );
    }

    #[test]
    fn canary_steps_parse_and_run_on_the_next_steps_agents() {
        use StepSpec::*;
        let minute = Some(Duration::from_secs(60));
        assert_eq!(
            parse_steps("canary 10%, pause 1m,2,50%").unwrap(),
            [Canary(100), Pause(minute), Agents(2), Percent(50)]
        );
        assert_eq!(
            parse_steps("canary 0.5%,pause,canary 25%,pause 1m,1").unwrap(),
            [
                Canary(5),
                Pause(None),
                Canary(250),
                Pause(minute),
                Agents(1)
            ]
        );
        for bad in [
            "canary",
            "canary ",
            "canary10%",
            "canary 0%",
            "canary 101%",
            "canary 0.05%",
            "canary ten",
            // No pause to serve in, no agents to run on.
            "canary 10%,1",
            "canary 10%,pause",
            "1,canary 10%,pause 1m",
        ] {
            assert!(parse_steps(bad).is_err(), "{bad}");
        }
        assert_eq!(
            (weight(100), weight(5), weight(1000), weight(1)),
            ("10%".into(), "0.5%".into(), "100%".into(), "0.1%".into())
        );

        // Ten agents: a canary on the first two, promoted by `2`.
        let plan = plan(&[Elsewhere; 10], &[false; 10], 2);
        let steps = parse_steps("canary 10%,pause 1m,2,50%").unwrap();
        assert_eq!(
            stages(&plan, &steps, 10, 0, 2),
            [
                Stage::Canary {
                    waves: vec![vec![0, 1]],
                    permille: 100,
                    step: 0
                },
                Stage::Pause(minute),
                Stage::Switch(vec![vec![0, 1]]),
                Stage::Switch(vec![vec![2, 3], vec![4]]),
                Stage::Switch(vec![vec![5, 6], vec![7, 8], vec![9]]),
            ]
        );
        // Run again with 5 of 10 there: the first canary's agents are done
        // (so is it, and its pause); the second runs on the rest.
        let found = [[Permanent; 5], [Elsewhere; 5]].concat();
        let resumed = super::plan(&found, &[true; 10], 5);
        let steps = parse_steps("canary 1%,pause,50%,canary 20%,pause,100%").unwrap();
        assert_eq!(
            stages(&resumed, &steps, 10, 5, 5),
            [
                Stage::Canary {
                    waves: vec![vec![5, 6, 7, 8, 9]],
                    permille: 200,
                    step: 3
                },
                Stage::Pause(None),
                Stage::Switch(vec![vec![5, 6, 7, 8, 9]]),
            ]
        );

        // Each canary step's request ids are its own.
        let id = request_id("r", 1, Step::Canary(0), "http://a:1");
        assert_ne!(id, request_id("r", 1, Step::Canary(3), "http://a:1"));
        assert!(canary_sent_by(&id, "r"));
        assert!(sent_by(&id, "r", Step::Canary(0)));
        assert!(!sent_by(&id, "r", Step::Canary(3)));
        assert!(!canary_sent_by(&id, "r2"));
        assert!(!canary_sent_by(
            &request_id("r", 1, Step::Switch, "http://a:1"),
            "r"
        ));
        assert!(!canary_sent_by("rollout-r-a1-canary-x", "r"));
    }

    #[test]
    fn the_gate_compares_a_new_release_with_the_old_one() {
        let gate = Gate {
            max_error_increase: 0.01,
            max_p99_ratio: 2.0,
        };
        let sample = |requests, errors, p99_us| Sample {
            requests,
            errors,
            p99_us,
        };
        let old = sample(1000, 10, 1_000);
        assert!(gate.judge(sample(1000, 15, 2_500), old).is_ok());
        // Two points more errors.
        let why = gate.judge(sample(1000, 31, 1_000), old).unwrap_err();
        assert!(why.contains("error rate 3.10% against 1.00%"), "{why}");
        // 50 ms against 1 ms; 5 ms against 1 ms is within the slack.
        assert!(gate.judge(sample(1000, 0, 50_000), old).is_err());
        assert!(gate.judge(sample(1000, 0, 5_000), old).is_ok());
        assert!(gate.judge(sample(1000, 0, u64::MAX), old).is_err());
        // 300 ms against 100 ms: more than twice, and 10 ms above.
        assert!(gate
            .judge(sample(1000, 0, 250_000), sample(1000, 0, 100_000))
            .is_err());
        // Too few requests on either side: not judged.
        let why = gate.judge(sample(1000, 1003, 1_000), old).unwrap_err();
        assert!(why.contains("error rate 100.00%"), "{why}");
        let note = gate.judge(sample(99, 99, u64::MAX), old).unwrap();
        assert!(note.starts_with("not judged"), "{note}");
        assert!(gate
            .judge(sample(1000, 999, u64::MAX), sample(5, 0, 100))
            .is_ok());
    }

    #[test]
    fn a_sample_since_a_base_counts_what_came_after() {
        let then = Sample {
            requests: 500,
            errors: 5,
            p99_us: 1_000,
        };
        let now = Sample {
            requests: 650,
            errors: 8,
            p99_us: 2_500,
        };
        let since = now.since(then);
        assert_eq!(
            (since.requests, since.errors, since.p99_us),
            (150, 3, 2_500)
        );
        assert!(
            since.enough()
                && !now
                    .since(Sample {
                        requests: 600,
                        ..then
                    })
                    .enough()
        );
        // A new worker counts from zero: all it counted.
        let restarted = Sample {
            requests: 20,
            errors: 0,
            p99_us: 100,
        };
        assert_eq!(restarted.since(then), restarted);
    }

    fn found() -> impl Strategy<Value = Found> {
        prop_oneof![Just(Permanent), Just(Soaking), Just(Elsewhere)]
    }

    proptest! {
        /// Every agent that is not done is in the plan exactly once, the
        /// canary alone and first, waves in fleet order and never wider
        /// than asked.
        #[test]
        fn every_pending_agent_once_in_order(
            found_ours in prop::collection::vec((found(), any::<bool>()), 0..40),
            max in 0usize..8,
        ) {
            let (found, ours): (Vec<Found>, Vec<bool>) = found_ours.into_iter().unzip();
            let plan = plan(&found, &ours, max);
            let mut seen: Vec<usize> = plan.canary.into_iter().collect();
            for wave in &plan.waves {
                prop_assert!(!wave.is_empty() && wave.len() <= max.max(1));
                seen.extend(wave);
            }
            let mut sorted = seen.clone();
            sorted.sort_unstable();
            let pending: Vec<usize> = (0..found.len()).filter(|&i| found[i] != Permanent).collect();
            prop_assert_eq!(&sorted, &pending);
            let after_canary: Vec<usize> = plan.waves.concat();
            prop_assert!(after_canary.windows(2).all(|w| w[0] < w[1]));
            let done_by_us = (0..found.len()).any(|i| found[i] == Permanent && ours[i]);
            prop_assert_eq!(plan.canary.is_some(), !pending.is_empty() && !done_by_us);
        }

        /// Whatever the steps, every agent of the plan is switched exactly
        /// once, in the plan's order, no wave wider than asked, and no
        /// pause before the first switch or after the last.
        #[test]
        fn steps_switch_every_agent_once_in_order(
            n in 0usize..30,
            done in 0usize..5,
            max in 1usize..6,
            steps in prop::collection::vec(prop_oneof![
                (1usize..40).prop_map(StepSpec::Agents),
                (1u8..=100).prop_map(StepSpec::Percent),
                Just(StepSpec::Pause(None)),
                (1u16..=1000).prop_map(StepSpec::Canary),
            ], 0..8),
        ) {
            let found = [vec![Permanent; done], vec![Elsewhere; n]].concat();
            let plan = plan(&found, &vec![false; found.len()], max);
            let stages = stages(&plan, &steps, found.len(), done, max);
            let switched: Vec<usize> = stages.iter().flat_map(|s| match s {
                Stage::Switch(waves) => {
                    waves.iter().flatten().copied().collect()
                }
                Stage::Pause(_) | Stage::Canary { .. } => Vec::new(),
            }).collect();
            let order: Vec<usize> = plan.canary.into_iter().chain(plan.waves.concat()).collect();
            prop_assert_eq!(switched, order);
            for stage in &stages {
                if let Stage::Switch(waves) = stage {
                    prop_assert!(waves.iter().all(|w| !w.is_empty() && w.len() <= max));
                }
            }
            prop_assert!(!matches!(stages.first(), Some(Stage::Pause(_))));
            let last_switches = matches!(stages.last(), None | Some(Stage::Switch(_)));
            prop_assert!(last_switches);
            // A canary runs on exactly the agents the next switch
            // promotes, with only pauses and canaries between them.
            for (n, stage) in stages.iter().enumerate() {
                if let Stage::Canary { waves, permille, step } = stage {
                    prop_assert!(waves.iter().all(|w| !w.is_empty() && w.len() <= max));
                    prop_assert!((1..=1000).contains(permille));
                    prop_assert_eq!(steps[*step], StepSpec::Canary(*permille));
                    let promoted = stages[n + 1..].iter().find_map(|s| match s {
                        Stage::Switch(waves) => Some(waves.concat()),
                        _ => None,
                    });
                    prop_assert_eq!(Some(waves.concat()), promoted);
                }
            }
        }
    }
}
