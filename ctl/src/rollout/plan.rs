//! The pure part of a rollout, tested without agents: from what each agent
//! was found running, who is the canary and what the waves are; and the
//! request ids, derived from the rollout so that running the same rollout
//! again sends the same ids (the agents answer what they already did
//! instead of acting twice).

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

/// The steps that carry a request id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Stage,
    Upgrade,
    Rollback,
}

impl Step {
    fn word(self) -> &'static str {
        match self {
            Step::Stage => "stage",
            Step::Upgrade => "upgrade",
            Step::Rollback => "rollback",
        }
    }
}

/// The longest `--rollout-id`: with the prefix, the step and the agent's
/// key, a request id stays within the agent's 128 characters.
pub const MAX_ROLLOUT_ID: usize = 64;

/// The rollout's id when none is given: the same for the same release
/// bytes, target version and set of agents, so that running the same
/// command again resumes the rollout.
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

/// The request id of `step` on the agent at `address` in rollout `rollout`.
pub fn request_id(rollout: &str, step: Step, address: &str) -> String {
    let key = &hex::encode(Sha256::digest(address.as_bytes()))[..10];
    format!("rollout-{rollout}-{}-{key}", step.word())
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
        let request = request_id(&long, Step::Rollback, "https://[::1]:50051");
        assert!(request.len() <= 128, "{request}");
        assert_ne!(
            request_id(&id, Step::Upgrade, "http://a:1"),
            request_id(&id, Step::Upgrade, "http://b:1")
        );
        assert_ne!(
            request_id(&id, Step::Upgrade, "http://a:1"),
            request_id(&id, Step::Rollback, "http://a:1")
        );
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
    }
}
