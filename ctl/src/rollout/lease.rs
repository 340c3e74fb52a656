//! The rollout's hold on its agents: the lease it takes on every agent it
//! will touch before it changes anything (so a second rollout over any of
//! them is refused, and single-agent commands need `--force`), renews
//! while it runs — carrying its progress, which `ctl rollout status` reads
//! from any agent — and gives back when it ends, with its outcome, which
//! `ctl rollout history` reads. The agent enforces the lease; this side
//! only keeps it alive and says how far the rollout got.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::future::join_all;
use nine9s_proto as pb;
use parking_lot::Mutex;
use tokio::sync::{watch, Notify};

use super::{Node, StepError};
use crate::{json, Failure, Output};

/// How long a lease holds without renewal: a rollout whose ctl was killed
/// shows as expired this long after (its agents stay held until it is
/// resumed, undone or taken over).
pub const TTL: Duration = Duration::from_secs(30);
/// Renewed this often, and soon when the progress changes: at most once
/// a second then, so that a burst of changes (a wave's agents finishing)
/// costs each agent one write of its store.
const RENEW_EVERY: Duration = Duration::from_secs(10);
const RENEW_AFTER_CHANGE: Duration = Duration::from_secs(1);
/// While paused until `ctl rollout resume`, the lease is renewed this
/// rarely and for this long, so that the resume's word (in the record's
/// step) is not overwritten before it is read; how often it is looked for.
const PAUSED_TTL: Duration = Duration::from_secs(3600);
const PAUSED_RENEW_EVERY: Duration = Duration::from_secs(1200);
const RESUME_POLL: Duration = Duration::from_secs(1);

/// The step `ctl rollout resume` writes into a paused rollout's record:
/// the paused rollout reads it and goes on.
pub const RESUME_REQUESTED: &str = "resume requested";
/// How a rollout paused until resumed says so in its step (at its end:
/// `canary 10%: paused until ...` while a canary step waits).
pub const PAUSED: &str = "paused until `ctl rollout resume`";

/// The reason code of a lease another rollout holds.
pub const LEASE_HELD: &str = "LEASE_HELD";

/// The leases of one rollout attempt over its fleet.
pub struct Leases<'a> {
    nodes: &'a [Node],
    /// The record sent with every take and renewal: the rollout's progress.
    record: Mutex<pb::RolloutRecord>,
    /// Which agents this run holds.
    held: Mutex<Vec<bool>>,
    changed: Notify,
    /// Paused until resumed: the renewals stop (see `PAUSED_TTL`).
    paused: AtomicBool,
}

impl<'a> Leases<'a> {
    pub fn new(nodes: &'a [Node], record: pb::RolloutRecord) -> Leases<'a> {
        Leases {
            nodes,
            record: Mutex::new(record),
            held: Mutex::new(vec![false; nodes.len()]),
            changed: Notify::new(),
            paused: AtomicBool::new(false),
        }
    }

    /// Takes (or, for the same rollout, takes again) agent `i`'s lease;
    /// with `force`, from another rollout. Refused with `LEASE_HELD` when
    /// another rollout holds it.
    pub async fn take(&self, i: usize, force: bool) -> Result<pb::RolloutRecord, StepError> {
        let reply = self.call(i, false, force, TTL).await?;
        self.held.lock()[i] = true;
        Ok(reply.record.unwrap_or_default())
    }

    /// Changes the progress the leases carry, and renews them with it.
    pub fn update(&self, change: impl FnOnce(&mut pb::RolloutRecord)) {
        change(&mut self.record.lock());
        self.changed.notify_one();
    }

    /// Keeps every held lease alive until `stop` turns true.
    pub async fn renew_until(&self, mut stop: watch::Receiver<bool>) {
        loop {
            let changed = tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                _ = tokio::time::sleep(RENEW_EVERY) => false,
                _ = self.changed.notified() => true,
            };
            if changed {
                tokio::select! {
                    _ = stop.wait_for(|s| *s) => return,
                    _ = tokio::time::sleep(RENEW_AFTER_CHANGE) => {}
                }
            }
            if self.paused.load(Ordering::Relaxed) {
                continue;
            }
            // A renewal that fails is tried again at the next one: the
            // lease lasts TTL, three renewals. One taken over by force
            // refuses this rollout's commands on that agent by itself.
            self.renew_all(TTL).await;
        }
    }

    async fn renew_all(&self, ttl: Duration) {
        let held = self.held_now();
        join_all(held.into_iter().map(|i| self.call(i, false, false, ttl))).await;
    }

    /// Waits until `ctl rollout resume` asks this rollout to go on: it
    /// writes `RESUME_REQUESTED` into the record on the agents. `label`
    /// starts the step people see (`canary 10%: `). Dropped before then
    /// (a canary step cut short), the renewals go on as before.
    pub async fn until_resumed(&self, label: &str) {
        self.record.lock().step = format!("{label}{PAUSED}");
        self.paused.store(true, Ordering::Relaxed);
        let _unpause = Unpause(&self.paused);
        self.renew_all(PAUSED_TTL).await;
        let mut renewed = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(RESUME_POLL).await;
            if renewed.elapsed() >= PAUSED_RENEW_EVERY {
                // Look once more first: a resume just written stays read.
                if self.resume_requested().await {
                    break;
                }
                self.renew_all(PAUSED_TTL).await;
                renewed = tokio::time::Instant::now();
            }
            if self.resume_requested().await {
                break;
            }
        }
    }

    /// Whether some held agent's record says a resume was requested.
    async fn resume_requested(&self) -> bool {
        let id = self.record.lock().rollout_id.clone();
        for i in self.held_now() {
            if let Ok(records) = records(&self.nodes[i]).await {
                if records
                    .holder
                    .is_some_and(|h| h.rollout_id == id && h.step.starts_with(RESUME_REQUESTED))
                {
                    return true;
                }
            }
        }
        false
    }

    /// Gives every held lease back, ending the rollout's record there with
    /// `outcome`. An agent that cannot be reached keeps it: `ctl rollout
    /// status` shows it, and running the rollout again resumes it.
    pub async fn give_back(&self, outcome: &str) -> Vec<(usize, StepError)> {
        self.update(|r| outcome.clone_into(&mut r.outcome));
        let held = self.held_now();
        let results = join_all(held.iter().map(|&i| self.call(i, true, false, TTL))).await;
        let mut failed = Vec::new();
        for (i, result) in held.into_iter().zip(results) {
            match result {
                Ok(_) => self.held.lock()[i] = false,
                Err(e) => failed.push((i, e)),
            }
        }
        failed
    }

    fn held_now(&self) -> Vec<usize> {
        let held = self.held.lock();
        (0..held.len()).filter(|&i| held[i]).collect()
    }

    async fn call(
        &self,
        i: usize,
        release: bool,
        force: bool,
        ttl: Duration,
    ) -> Result<pb::LeaseReply, StepError> {
        let request = pb::LeaseRequest {
            record: Some(self.record.lock().clone()),
            ttl_ms: ttl.as_millis() as u64,
            release,
            force,
        };
        let what = if release {
            "giving the rollout's lease back"
        } else {
            "taking the rollout's lease"
        };
        self.nodes[i]
            .agent
            .call(what, request, |mut c, r| async move { c.lease(r).await })
            .await
            .map_err(StepError::from_failure)
    }
}

/// Ends a pause until resumed however its wait ends: the renewals start
/// again.
struct Unpause<'a>(&'a AtomicBool);

impl Drop for Unpause<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Relaxed);
    }
}

/// Every rollout record agent `node` keeps: the holder of its lease (if
/// any), then the ended ones.
pub async fn records(node: &Node) -> Result<pb::RolloutsReply, Failure> {
    node.agent
        .call(
            "reading its rollouts",
            pb::RolloutsRequest {},
            |mut c, r| async move { c.rollouts(r).await },
        )
        .await
}

/// The rollout holding a lease, for people: `ID (attempt N, by OWNER)`.
pub fn holder(record: &pb::RolloutRecord) -> String {
    format!(
        "{} (attempt {}, by {})",
        record.rollout_id,
        record.attempt,
        if record.owner.is_empty() {
            "?"
        } else {
            &record.owner
        }
    )
}

/// `ctl rollout resume`: tells the rollout paused on these agents to go
/// on, by writing `RESUME_REQUESTED` into its record on every agent it
/// holds (under its own rollout id, which takes the lease again).
pub async fn resume(nodes: Vec<Node>, output: Output) -> Result<(), Failure> {
    let read = join_all(nodes.iter().map(records)).await;
    let mut paused: Option<pb::RolloutRecord> = None;
    let mut held = Vec::new();
    for (i, result) in read.into_iter().enumerate() {
        let Some(record) = result?.holder else {
            continue;
        };
        if let Some(seen) = &paused {
            if (&seen.rollout_id, seen.attempt) != (&record.rollout_id, record.attempt) {
                return Err(anyhow::anyhow!(
                    "two rollouts hold these agents ({} and {}): resume one at a time, with a fleet of its agents",
                    holder(seen),
                    holder(&record)
                )
                .into());
            }
        }
        held.push(i);
        paused = Some(record);
    }
    let Some(record) = paused else {
        return Err(anyhow::anyhow!("no rollout holds these agents: nothing to resume").into());
    };
    if !record.step.ends_with(PAUSED) && !record.step.starts_with(RESUME_REQUESTED) {
        return Err(anyhow::anyhow!(
            "rollout {} is not paused (it is at: {})",
            holder(&record),
            record.step
        )
        .into());
    }
    let mut word = record.clone();
    word.step = RESUME_REQUESTED.into();
    let results = join_all(held.iter().map(|&i| {
        let request = pb::LeaseRequest {
            record: Some(word.clone()),
            ttl_ms: PAUSED_TTL.as_millis() as u64,
            release: false,
            force: false,
        };
        nodes[i].agent.call(
            "asking the rollout to go on",
            request,
            |mut c, r| async move { c.lease(r).await },
        )
    }))
    .await;
    let told = results.iter().filter(|r| r.is_ok()).count();
    if told == 0 {
        return Err(results
            .into_iter()
            .find_map(Result::err)
            .unwrap_or_else(|| anyhow::anyhow!("no agent could be told").into()));
    }
    match output {
        Output::Json => json::print(&word),
        Output::Table => outln!(
            "rollout {} goes on (told {told} of {} agent(s) it holds)",
            holder(&record),
            held.len()
        ),
    }
    Ok(())
}
