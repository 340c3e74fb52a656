//! The rollout's hold on its agents: the lease it takes on every agent it
//! will touch before it changes anything (so a second rollout over any of
//! them is refused, and single-agent commands need `--force`), renews
//! while it runs — carrying its progress, which `ctl rollout status` reads
//! from any agent — and gives back when it ends, with its outcome, which
//! `ctl rollout history` reads. The agent enforces the lease; this side
//! only keeps it alive and says how far the rollout got.

use std::time::Duration;

use futures_util::future::join_all;
use nine9s_proto as pb;
use parking_lot::Mutex;
use tokio::sync::{watch, Notify};

use super::{Node, StepError};
use crate::Failure;

/// How long a lease holds without renewal: a rollout whose ctl was killed
/// shows as expired this long after (its agents stay held until it is
/// resumed, undone or taken over).
pub const TTL: Duration = Duration::from_secs(30);
/// Renewed this often, and at once when the progress changes.
const RENEW_EVERY: Duration = Duration::from_secs(10);

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
}

impl<'a> Leases<'a> {
    pub fn new(nodes: &'a [Node], record: pb::RolloutRecord) -> Leases<'a> {
        Leases {
            nodes,
            record: Mutex::new(record),
            held: Mutex::new(vec![false; nodes.len()]),
            changed: Notify::new(),
        }
    }

    /// Takes (or, for the same rollout, takes again) agent `i`'s lease;
    /// with `force`, from another rollout. Refused with `LEASE_HELD` when
    /// another rollout holds it.
    pub async fn take(&self, i: usize, force: bool) -> Result<pb::RolloutRecord, StepError> {
        let reply = self.call(i, false, force).await?;
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
            tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                _ = tokio::time::sleep(RENEW_EVERY) => {}
                _ = self.changed.notified() => {}
            }
            let held: Vec<usize> = self.held_now();
            // A renewal that fails is tried again at the next one: the
            // lease lasts TTL, three renewals. One taken over by force
            // refuses this rollout's commands on that agent by itself.
            join_all(held.into_iter().map(|i| self.call(i, false, false))).await;
        }
    }

    /// Gives every held lease back, ending the rollout's record there with
    /// `outcome`. An agent that cannot be reached keeps it: `ctl rollout
    /// status` shows it, and running the rollout again resumes it.
    pub async fn give_back(&self, outcome: &str) -> Vec<(usize, StepError)> {
        self.update(|r| outcome.clone_into(&mut r.outcome));
        let held = self.held_now();
        let results = join_all(held.iter().map(|&i| self.call(i, true, false))).await;
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
    ) -> Result<pb::LeaseReply, StepError> {
        let request = pb::LeaseRequest {
            record: Some(self.record.lock().clone()),
            ttl_ms: TTL.as_millis() as u64,
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
