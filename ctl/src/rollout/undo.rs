//! `ctl rollout undo`: every agent a rollout switched goes back to the
//! release it had before — read from the agent's own history (the last
//! switch that rollout made there, in any attempt) — the canary it
//! started where it never promoted it (a run killed during a canary step)
//! is dropped, and the release it staged where it never switched is
//! removed (unless `--keep-staged`).
//!
//! The undo is an attempt of the rollout like any other: it takes the
//! agents' leases under the rollout's id (so it takes over an interrupted
//! attempt of the same rollout without `--force`), its request ids are
//! its own, and running it again after an interruption resumes it without
//! acting twice. Each switch back is conditional on the rollout's target
//! still being active (`expected_active`), and permanent at once: the
//! release from before was permanent there.

use std::time::Instant;

use anyhow::anyhow;
use futures_util::future::join_all;
use nine9s_proto as pb;
use tokio::sync::watch;

use super::lease::{self, Leases};
use super::plan::{self, Step};
use super::progress::Progress;
use super::report::{self, Outcome, Phases, Report, Track};
use super::{
    canonical_keys, downward, drop_canary, fail, last_transitions, remove_staged, transition,
    Ended, Node, StepError,
};
use crate::commands::status;
use crate::{json, Failure, Output};

/// What `ctl rollout undo` was asked.
pub struct Settings {
    /// The rollout to undo; by default the newest any agent recorded.
    pub rollout_id: Option<String>,
    pub max_parallel: usize,
    pub reason: Option<String>,
    pub force: bool,
    pub keep_staged: bool,
    pub command: String,
}

pub async fn run(nodes: Vec<Node>, settings: Settings, output: Output) -> Result<(), Failure> {
    let started = Instant::now();
    let keys = canonical_keys(&nodes)
        .await
        .unwrap_or_else(|e| crate::usage_error(format!("the fleet: {e}")));
    let progress = Progress::new(nodes.iter().map(|n| n.name.clone()).collect());
    let mut tracks: Vec<Track> = nodes
        .iter()
        .map(|n| Track::new(&n.name, &n.address, String::new()))
        .collect();

    // Which rollout, which attempt, and whether another one holds an agent.
    let records = join_all(nodes.iter().map(lease::records)).await;
    let mut all = Vec::new();
    let mut unreachable = Vec::new();
    for (i, result) in records.into_iter().enumerate() {
        match result {
            Ok(reply) => all.push((i, reply)),
            Err(f) => {
                let e = StepError::from_failure(f);
                unreachable.push(format!("{}: {}", nodes[i].name, e.error));
                fail(&mut tracks[i], e);
            }
        }
    }
    // The newest rollout (an undo is an attempt of the rollout it undoes:
    // undoing again finds nothing left to undo).
    let newest = || {
        all.iter()
            .flat_map(|(_, r)| r.holder.iter().chain(&r.ended))
            .max_by_key(|r| r.started_at_ms)
            .map(|r| r.rollout_id.clone())
    };
    let Some(rollout_id) = settings.rollout_id.clone().or_else(newest) else {
        return Err(
            anyhow!("no agent of the fleet has taken part in a rollout: nothing to undo").into(),
        );
    };
    let of_it: Vec<&pb::RolloutRecord> = all
        .iter()
        .flat_map(|(_, r)| r.holder.iter().chain(&r.ended))
        .filter(|r| r.rollout_id == rollout_id)
        .collect();
    let Some(version) = of_it.iter().map(|r| r.version.clone()).next() else {
        return Err(anyhow!("no agent of the fleet has a record of rollout {rollout_id}").into());
    };
    let attempt = plan::attempt(
        &rollout_id,
        of_it
            .iter()
            .map(|r| (r.rollout_id.as_str(), r.attempt, r.ended_at_ms == 0)),
    );
    let held_by_others: Vec<String> = all
        .iter()
        .filter_map(|(i, r)| {
            let holder = r.holder.as_ref()?;
            (holder.rollout_id != rollout_id).then(|| {
                format!(
                    "{} is held by rollout {}",
                    nodes[*i].name,
                    lease::holder(holder)
                )
            })
        })
        .collect();
    progress.note(&format!(
        "undoing rollout {rollout_id} of {version} (attempt {}{}) on {} agent(s)",
        attempt.number,
        if attempt.resumed { ", resumed" } else { "" },
        nodes.len()
    ));
    let undo = Undo {
        nodes: &nodes,
        keys: &keys,
        settings: &settings,
        rollout_id: rollout_id.clone(),
        attempt: attempt.number,
        version: version.clone(),
        progress: &progress,
    };
    for (i, track) in tracks.iter_mut().enumerate() {
        track.request_id = undo.request_id(Step::Undo, i);
    }
    let ended = if !held_by_others.is_empty() && !settings.force {
        Ended::Leased {
            why: format!(
                "{}: wait for it to end, or take the agents over with --force",
                held_by_others.join("; ")
            ),
        }
    } else if !unreachable.is_empty() {
        Ended::Stopped {
            why: format!("cannot reach {}", unreachable.join("; ")),
            unreachable: true,
        }
    } else {
        let leases = Leases::new(
            &nodes,
            pb::RolloutRecord {
                rollout_id: rollout_id.clone(),
                attempt: attempt.number,
                version: version.clone(),
                step: "undoing".into(),
                agents_total: nodes.len() as u32,
                command: settings.command.clone(),
                ..Default::default()
            },
        );
        let (stop, stopped) = watch::channel(false);
        let (ended, ()) = tokio::join!(
            async {
                let ended = undo.held(&mut tracks, &leases).await;
                stop.send_replace(true);
                ended
            },
            leases.renew_until(stopped)
        );
        for (i, e) in leases.give_back(ended.word()).await {
            progress.note(&format!(
                "rollout: {} keeps the lease (it could not be given back: {})",
                nodes[i].name, e.error
            ));
        }
        ended
    };
    let now = join_all(nodes.iter().map(|n| status(&n.agent))).await;
    for (track, status) in tracks.iter_mut().zip(now) {
        track.after = status.ok().map(|s| s.active_version);
    }
    progress.finish();
    let report = Report {
        rollout_id,
        attempt: attempt.number,
        resumed: attempt.resumed,
        action: "undo",
        version,
        sha256: String::new(),
        outcome: ended.word(),
        halted_by: ended.why().map(str::to_owned),
        canary: None,
        waves: Vec::new(),
        elapsed_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        phases: Phases::default(),
        agents: tracks,
    };
    match output {
        Output::Json => json::print(&report),
        Output::Table => report::summary(&report),
    }
    ended.into_result(&report)
}

struct Undo<'a> {
    nodes: &'a [Node],
    keys: &'a [String],
    settings: &'a Settings,
    rollout_id: String,
    attempt: u32,
    /// The rollout's target.
    version: String,
    progress: &'a Progress,
}

/// Where an agent stands against the rollout being undone.
struct Found {
    active: String,
    /// The release it had before the rollout's last switch there, if the
    /// rollout switched it.
    before: Option<String>,
    /// The rollout staged its release there and it is only staged.
    staged_only: bool,
    /// It runs the rollout's release as a canary the rollout started.
    canary: bool,
}

impl Undo<'_> {
    fn request_id(&self, step: Step, i: usize) -> String {
        plan::request_id(&self.rollout_id, self.attempt, step, &self.keys[i])
    }

    async fn held(&self, tracks: &mut [Track], leases: &Leases<'_>) -> Ended {
        let taken =
            join_all((0..self.nodes.len()).map(|i| leases.take(i, self.settings.force))).await;
        let mut lost = Vec::new();
        for (i, result) in taken.into_iter().enumerate() {
            if let Err(e) = result {
                if e.is(lease::LEASE_HELD) {
                    let why = format!("{}: {}", tracks[i].name, e.error);
                    fail(&mut tracks[i], e);
                    return Ended::Leased { why };
                }
                lost.push(format!("{}: {}", tracks[i].name, e.error));
                fail(&mut tracks[i], e);
            }
        }
        if !lost.is_empty() {
            return Ended::Stopped {
                why: format!("taking the leases failed on {}", lost.join("; ")),
                unreachable: true,
            };
        }
        let found = join_all((0..self.nodes.len()).map(|i| self.find(i))).await;
        let mut back = Vec::new();
        let mut remove = Vec::new();
        let mut canaries = Vec::new();
        let mut failed = Vec::new();
        for (i, result) in found.into_iter().enumerate() {
            let track = &mut tracks[i];
            match result {
                Ok(found) => {
                    track.before = Some(found.active.clone());
                    match found.before {
                        Some(before) if found.active == self.version => back.push((i, before)),
                        _ if found.canary => canaries.push(i),
                        _ => {
                            track.outcome = Outcome::Untouched;
                            self.progress.done(
                                i,
                                if found.active == self.version {
                                    format!(
                                        "{} was not switched here by this rollout",
                                        self.version
                                    )
                                } else {
                                    format!("runs {}", found.active)
                                },
                            );
                        }
                    }
                    if found.staged_only {
                        remove.push(i);
                    }
                }
                Err(e) => {
                    failed.push(format!("{}: {}", track.name, e.error));
                    fail(track, e);
                }
            }
        }
        // Canaries first: dropping one is quick, and lets its release be
        // removed below.
        let dropped = join_all(canaries.iter().map(|&i| {
            drop_canary(
                &self.nodes[i],
                &self.version,
                self.request_id(Step::DropCanary, i),
                format!("undo of rollout {}", self.rollout_id),
                &self.rollout_id,
            )
        }))
        .await;
        for (&i, result) in canaries.iter().zip(dropped) {
            let track = &mut tracks[i];
            match result {
                Ok(true) => {
                    track.outcome = Outcome::CanaryDropped;
                    self.progress
                        .done(i, format!("the canary of {} was dropped", self.version));
                }
                // Gone since it was found: the health gate was first.
                Ok(false) => {
                    track.outcome = Outcome::Untouched;
                    self.progress
                        .done(i, format!("no canary of {} runs", self.version));
                }
                Err(e) => {
                    failed.push(format!("{}: {}", track.name, e.error));
                    self.progress
                        .done(i, format!("dropping the canary failed: {}", e.error));
                    fail(track, e);
                    remove.retain(|&r| r != i);
                }
            }
        }
        leases.update(|r| {
            r.agents_pending = back.len() as u32;
            r.agents_done = (self.nodes.len() - back.len() - failed.len()) as u32;
        });
        for wave in back.chunks(self.settings.max_parallel.max(1)) {
            let results = join_all(wave.iter().map(|(i, before)| self.back(*i, before))).await;
            for ((i, before), result) in wave.iter().zip(results) {
                let track = &mut tracks[*i];
                match result {
                    Ok(()) => {
                        track.outcome = Outcome::Undone;
                        self.progress.done(*i, format!("back on {before}"));
                    }
                    Err(e) => {
                        failed.push(format!("{}: {}", track.name, e.error));
                        self.progress.done(*i, format!("failed: {}", e.error));
                        fail(track, e);
                    }
                }
            }
            leases.update(|r| {
                r.agents_done += wave.len() as u32;
                r.agents_pending = r.agents_pending.saturating_sub(wave.len() as u32);
            });
        }
        if !self.settings.keep_staged {
            remove_staged(
                self.nodes,
                &remove,
                &self.version,
                &self.rollout_id,
                |i| self.request_id(Step::Remove, i),
                tracks,
                leases,
            )
            .await;
        }
        if failed.is_empty() {
            Ended::Undone
        } else {
            Ended::Halted {
                why: format!("the undo failed on {}", failed.join("; ")),
                unreachable: false,
                clean: false,
            }
        }
    }

    /// What agent `i` runs, and what it ran before the rollout switched it.
    async fn find(&self, i: usize) -> Result<Found, StepError> {
        let node = &self.nodes[i];
        self.progress.say(i, "reading its history");
        let now = status(&node.agent).await.map_err(StepError::from_failure)?;
        let history = last_transitions(node, 0).await?;
        let last_switch = history.iter().rev().find(|t| {
            t.result() == pb::TransitionResult::Ok
                && t.to_version == self.version
                && matches!(
                    t.kind(),
                    pb::TransitionKind::Upgrade | pb::TransitionKind::Downgrade
                )
                && plan::sent_by(&t.request_id, &self.rollout_id, Step::Switch)
        });
        let staged_by_it = history.iter().any(|t| {
            t.kind() == pb::TransitionKind::Stage
                && t.to_version == self.version
                && plan::sent_by(&t.request_id, &self.rollout_id, Step::Stage)
        });
        let staged_only = staged_by_it
            && now
                .releases
                .iter()
                .any(|r| r.version == self.version && r.state() == pb::ReleaseState::Staged);
        let canary = now
            .canary
            .as_ref()
            .is_some_and(|c| c.version == self.version)
            && history.iter().any(|t| {
                t.kind() == pb::TransitionKind::Canary
                    && t.to_version == self.version
                    && plan::canary_sent_by(&t.request_id, &self.rollout_id)
            });
        Ok(Found {
            active: now.active_version,
            before: last_switch.map(|t| t.from_version.clone()),
            staged_only,
            canary,
        })
    }

    /// Switches agent `i` back to `before`, permanent at once.
    async fn back(&self, i: usize, before: &str) -> Result<(), StepError> {
        let node = &self.nodes[i];
        let down = downward(&self.version, before);
        let word = if down { "downgrade" } else { "upgrade" };
        self.progress.say(i, format!("{word} back to {before}"));
        let request = pb::TransitionRequest {
            version: before.to_owned(),
            permanence: pb::Permanence::Immediate.into(),
            request_id: self.request_id(Step::Undo, i),
            expected_active: self.version.clone(),
            reason: self
                .settings
                .reason
                .clone()
                .unwrap_or_else(|| format!("undo of rollout {}", self.rollout_id)),
            lease: self.rollout_id.clone(),
            ..Default::default()
        };
        transition(node, down, &format!("{word} back to {before}"), request)
            .await
            .map(|_| ())
            .map_err(StepError::from_failure)
    }
}
