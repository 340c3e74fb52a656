//! Rollout leases: which fleet rollout holds this agent, and the rollouts
//! that held it before. A rollout takes the lease before it touches the
//! agent, renews it as it goes and gives it back when it ends; while one
//! holds it, every other switching command is refused unless it is forced
//! ([`Table::admits`]). A lease is held until it is given back or taken
//! over by force — expiry frees nothing: an expired lease is a rollout
//! interrupted half way (its ctl killed, a laptop closed), to be resumed,
//! undone or knowingly taken over, never silently overrun. Expiry only
//! tells people that nothing renews it any more.
//!
//! Pure, with model types of its own: the caller gives the time and keeps
//! what changed (the engine holds the table, `store` keeps it, the journal
//! announces it: `release_handler/leases.rs`); `control` converts to and
//! from the proto's `RolloutRecord`.

use std::collections::VecDeque;
use std::fmt;
use std::time::Duration;

use nine9s_manifest::Version;
use serde::{Deserialize, Serialize};

/// Ended rollouts kept, newest first.
pub const ENDED_KEPT: usize = 100;
/// The outcome of a rollout whose lease another one took by force.
pub const TAKEN_OVER: &str = "taken over";
/// The outcome of a rollout that gave its lease back without saying how
/// it ended.
pub const GIVEN_BACK: &str = "given back";

/// What a rollout says of itself: the fields of its record it sets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// The same for every attempt of the same release, version and fleet.
    pub id: String,
    /// Which attempt of it this is (1, 2, ...).
    pub attempt: u32,
    /// The target version.
    pub version: Version,
    /// What it is doing (`canary`, `wave 2 of 5`...).
    pub step: String,
    /// How it ended (`converged`, `halted`...); empty while it runs.
    pub outcome: String,
    pub agents: Agents,
    /// When the soak under way ends (epoch ms; 0: none).
    pub soak_until_ms: i64,
    /// The command line that started it, for people.
    pub command: String,
}

/// The rollout's fleet, as it last counted it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Agents {
    pub total: u32,
    pub done: u32,
    pub pending: u32,
    pub skipped: u32,
}

/// One rollout as this agent saw it: what it said of itself, and what the
/// agent recorded of its lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rollout {
    #[serde(flatten)]
    pub report: Report,
    /// Who took the lease (the caller's identity; a renewal of the same
    /// attempt keeps it, another attempt's takes its own).
    pub owner: String,
    /// When the lease was first taken (kept across renewals and attempts).
    pub started_at_ms: i64,
    /// When it was last taken or renewed.
    pub updated_at_ms: i64,
    /// When it expires unless renewed (it stays held all the same).
    pub expires_at_ms: i64,
    /// When it was given back or taken over; `None` while it is held.
    #[serde(default)]
    pub ended_at_ms: Option<i64>,
    /// The rollout ("ID attempt N") whose lease this one took by force.
    #[serde(default)]
    pub taken_from: Option<String>,
}

impl Rollout {
    /// "ID attempt N", as `taken_from` names it.
    pub fn tag(&self) -> String {
        format!("{} attempt {}", self.report.id, self.report.attempt)
    }

    /// The rollout's name for messages: "rollout ID (attempt N, by OWNER)".
    fn name(&self) -> String {
        format!(
            "rollout {} (attempt {}, by {})",
            self.report.id, self.report.attempt, self.owner
        )
    }

    /// Whether its lease expired, and when, in words.
    fn expiry(&self, now_ms: i64) -> String {
        let left = self.expires_at_ms.saturating_sub(now_ms);
        if left <= 0 {
            format!("its lease expired {} ago", seconds(-left))
        } else {
            format!("its lease expires in {} unless renewed", seconds(left))
        }
    }
}

/// `ms` rounded up to whole seconds, in words ("40s", "2m 5s").
fn seconds(ms: i64) -> String {
    let secs = (ms.max(1) as u64).div_ceil(1000);
    humantime::format_duration(Duration::from_secs(secs)).to_string()
}

/// A rollout asking for the lease.
#[derive(Debug, Clone)]
pub struct Take {
    pub report: Report,
    /// How long it holds without a renewal.
    pub ttl_ms: i64,
    /// Take it from another rollout that holds it.
    pub force: bool,
    /// The caller's identity.
    pub owner: String,
}

/// How the lease was taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Taken {
    /// Nobody held it.
    Fresh,
    /// The same attempt of the same rollout held it: renewed.
    Renewed,
    /// Another attempt of the same rollout held it: resumed.
    Resumed { from_attempt: u32 },
    /// Another rollout held it, and was ended "taken over" (this record).
    ByForce(Box<Rollout>),
}

/// What giving the lease back did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GiveBack {
    /// The rollout held it: its record ended (this one).
    Ended(Box<Rollout>),
    /// It did not (a retry, or its lease was taken over): the last ended
    /// record of that rollout, if the table has one.
    NotHeld(Option<Box<Rollout>>),
}

/// Why a switching command may run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admitted {
    /// No rollout holds the lease.
    Free,
    /// It is the command of the rollout holding the lease.
    Holder,
    /// Forced past the lease of this rollout.
    Forced(Box<Rollout>),
}

/// A refusal: someone else holds the lease.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LeaseError {
    /// Taking the lease while another rollout holds it.
    #[error("{}", held(holder, *now_ms))]
    Held { holder: Box<Rollout>, now_ms: i64 },
    /// A switching command that is not the holder's (or names a rollout
    /// that does not hold the lease).
    #[error("{}", leased(holder.as_deref(), lease.as_deref(), command, *now_ms))]
    Leased {
        holder: Option<Box<Rollout>>,
        /// The rollout the command said it came from.
        lease: Option<String>,
        command: &'static str,
        now_ms: i64,
    },
}

impl LeaseError {
    /// The rollout holding the lease, if any.
    pub fn holder(&self) -> Option<&Rollout> {
        match self {
            LeaseError::Held { holder, .. } => Some(holder),
            LeaseError::Leased { holder, .. } => holder.as_deref(),
        }
    }

    /// The rollout a refused command said it came from.
    pub fn lease(&self) -> Option<&str> {
        match self {
            LeaseError::Held { .. } => None,
            LeaseError::Leased { lease, .. } => lease.as_deref(),
        }
    }
}

fn held(holder: &Rollout, now_ms: i64) -> String {
    let name = holder.name();
    let expiry = holder.expiry(now_ms);
    if holder.expires_at_ms <= now_ms {
        format!("{name} holds this agent, {expiry}: re-run that rollout to resume it, `ctl rollout undo` it, or take it over with --force")
    } else {
        format!("{name} holds this agent, {expiry}: wait for that rollout to end, or take it over with --force")
    }
}

fn leased(holder: Option<&Rollout>, lease: Option<&str>, command: &str, now_ms: i64) -> String {
    match (holder, lease) {
        (Some(holder), None) => format!(
            "{} holds this agent ({}), so this {command} was not run: run it anyway with --force (recorded in the agent's history), or let that rollout end",
            holder.name(),
            holder.expiry(now_ms)
        ),
        (Some(holder), Some(lease)) => format!(
            "this {command} was sent under the lease of rollout {lease}, but {} holds this agent ({}): rollout {lease} lost its lease (taken over), so nothing was run; run it anyway with --force",
            holder.name(),
            holder.expiry(now_ms)
        ),
        (None, lease) => format!(
            "this {command} was sent under the lease of rollout {}, but no rollout holds this agent's lease (it was given back, or taken over and ended), so nothing was run: take the lease again first, or run it anyway with --force",
            lease.unwrap_or("?")
        ),
    }
}

/// The lease and the rollouts that held it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Table {
    holder: Option<Rollout>,
    /// Newest first, at most [`ENDED_KEPT`].
    ended: VecDeque<Rollout>,
}

impl Table {
    /// The table as kept: the holder and the ended rollouts, newest first.
    pub fn new(holder: Option<Rollout>, ended: Vec<Rollout>) -> Table {
        let mut ended = VecDeque::from(ended);
        ended.truncate(ENDED_KEPT);
        Table { holder, ended }
    }

    pub fn holder(&self) -> Option<&Rollout> {
        self.holder.as_ref()
    }

    /// The ended rollouts, newest first.
    pub fn ended(&self) -> impl Iterator<Item = &Rollout> {
        self.ended.iter()
    }

    fn end(&mut self, rollout: Rollout) {
        self.ended.push_front(rollout);
        self.ended.truncate(ENDED_KEPT);
    }

    /// Takes or renews the lease for `take`'s rollout: free, or held by
    /// the same rollout id (any attempt: it resumes, keeping when it
    /// started), or by another one with `force` (which ends that one's
    /// record "taken over"). Refused while another rollout holds it,
    /// expired or not.
    pub fn take(&mut self, take: Take, now_ms: i64) -> Result<(Rollout, Taken), LeaseError> {
        let Take {
            report,
            ttl_ms,
            force,
            owner,
        } = take;
        let (started_at_ms, taken_from, taken, owner) = match self.holder.take() {
            None => (now_ms, None, Taken::Fresh, owner),
            // Renewed by anyone (`ctl rollout resume` writes into a paused
            // rollout's record): it is still its taker's.
            Some(held) if held.report.id == report.id && held.report.attempt == report.attempt => (
                held.started_at_ms,
                held.taken_from,
                Taken::Renewed,
                held.owner,
            ),
            Some(held) if held.report.id == report.id => (
                held.started_at_ms,
                held.taken_from,
                Taken::Resumed {
                    from_attempt: held.report.attempt,
                },
                owner,
            ),
            Some(mut held) if force => {
                held.report.outcome = TAKEN_OVER.to_owned();
                held.ended_at_ms = Some(now_ms);
                let from = held.tag();
                self.end(held.clone());
                (now_ms, Some(from), Taken::ByForce(Box::new(held)), owner)
            }
            Some(held) => {
                let refused = LeaseError::Held {
                    holder: Box::new(held.clone()),
                    now_ms,
                };
                self.holder = Some(held);
                return Err(refused);
            }
        };
        let record = Rollout {
            report,
            owner,
            started_at_ms,
            updated_at_ms: now_ms,
            expires_at_ms: now_ms.saturating_add(ttl_ms),
            ended_at_ms: None,
            taken_from,
        };
        self.holder = Some(record.clone());
        Ok((record, taken))
    }

    /// Gives the lease back if `report`'s rollout holds it: its record
    /// takes the report's last word (an empty outcome is [`GIVEN_BACK`])
    /// and ends. Otherwise nothing changes.
    pub fn give_back(&mut self, mut report: Report, now_ms: i64) -> GiveBack {
        match self.holder.take() {
            Some(held) if held.report.id == report.id => {
                if report.outcome.is_empty() {
                    report.outcome = GIVEN_BACK.to_owned();
                }
                let ended = Rollout {
                    report,
                    updated_at_ms: now_ms,
                    ended_at_ms: Some(now_ms),
                    ..held
                };
                self.end(ended.clone());
                GiveBack::Ended(Box::new(ended))
            }
            other => {
                self.holder = other;
                GiveBack::NotHeld(
                    self.ended
                        .iter()
                        .find(|r| r.report.id == report.id)
                        .cloned()
                        .map(Box::new),
                )
            }
        }
    }

    /// Whether a switching command (`command`: "upgrade", "rollback"...)
    /// may run: when no rollout holds the lease and the command names
    /// none, when it names the rollout holding it (`lease`), or when it is
    /// forced.
    pub fn admits(
        &self,
        now_ms: i64,
        lease: Option<&str>,
        force: bool,
        command: &'static str,
    ) -> Result<Admitted, LeaseError> {
        match (&self.holder, lease) {
            (Some(holder), Some(lease)) if holder.report.id == lease => Ok(Admitted::Holder),
            (Some(holder), _) if force => Ok(Admitted::Forced(Box::new(holder.clone()))),
            (None, _) if force => Ok(Admitted::Free),
            (None, None) => Ok(Admitted::Free),
            (holder, lease) => Err(LeaseError::Leased {
                holder: holder.clone().map(Box::new),
                lease: lease.map(str::to_owned),
                command,
                now_ms,
            }),
        }
    }
}

impl fmt::Display for Taken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Taken::Fresh => f.write_str("took the lease"),
            Taken::Renewed => f.write_str("renewed the lease"),
            Taken::Resumed { from_attempt } => {
                write!(f, "took the lease again, resuming attempt {from_attempt}")
            }
            Taken::ByForce(from) => {
                write!(f, "took the lease by force from {}", from.name())
            }
        }
    }
}

/// The message of a `LEASE_TAKEN` event: "rollout ID (attempt N, by
/// OWNER) took the lease ...".
pub fn taken_message(record: &Rollout, taken: &Taken) -> String {
    format!("{} {taken}", record.name())
}

/// The message of a `LEASE_RELEASED` event.
pub fn released_message(record: &Rollout) -> String {
    format!(
        "{} gave the lease back: {}",
        record.name(),
        record.report.outcome
    )
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const TTL: i64 = 30_000;

    fn report(id: &str, attempt: u32) -> Report {
        Report {
            id: id.to_owned(),
            attempt,
            version: Version::new(0, 2, 0),
            step: "canary".into(),
            outcome: String::new(),
            agents: Agents::default(),
            soak_until_ms: 0,
            command: "ctl rollout --to 0.2.0".into(),
        }
    }

    fn take(id: &str, attempt: u32, force: bool) -> Take {
        Take {
            report: report(id, attempt),
            ttl_ms: TTL,
            force,
            owner: "ci".into(),
        }
    }

    #[test]
    fn a_held_lease_refuses_others_until_given_back_expired_or_not() {
        let mut table = Table::default();
        let (held, taken) = table.take(take("a", 1, false), 1_000).unwrap();
        assert_eq!(taken, Taken::Fresh);
        assert_eq!(
            (held.started_at_ms, held.expires_at_ms, held.ended_at_ms),
            (1_000, 1_000 + TTL, None)
        );
        // Long expired: still held.
        let later = 1_000 + TTL + 40_000;
        let refused = table.take(take("b", 1, false), later).unwrap_err();
        assert_eq!(refused.holder().unwrap().report.id, "a");
        let message = refused.to_string();
        assert!(
            message.starts_with("rollout a (attempt 1, by ci) holds this agent, its lease expired 40s ago: re-run that rollout to resume it, `ctl rollout undo` it, or take it over with --force"),
            "{message}"
        );
        assert!(table
            .admits(later, None, false, "upgrade")
            .unwrap_err()
            .to_string()
            .contains("so this upgrade was not run: run it anyway with --force"));
        // Live: the message says so.
        let live = table.take(take("b", 1, false), 2_000).unwrap_err();
        assert!(
            live.to_string()
                .contains("its lease expires in 29s unless renewed: wait for that rollout to end"),
            "{live}"
        );

        let GiveBack::Ended(ended) = table.give_back(
            Report {
                outcome: "converged".into(),
                ..report("a", 1)
            },
            later,
        ) else {
            panic!("not ended");
        };
        assert_eq!(
            (ended.ended_at_ms, ended.report.outcome.as_str()),
            (Some(later), "converged")
        );
        assert_eq!(table.holder(), None);
        assert_eq!(table.ended().next(), Some(&*ended));
        assert_eq!(
            table.admits(later, None, false, "upgrade"),
            Ok(Admitted::Free)
        );
        // Given back again: answered with the ended record, nothing changes.
        let before = table.clone();
        assert_eq!(
            table.give_back(report("a", 1), later + 1),
            GiveBack::NotHeld(Some(ended))
        );
        assert_eq!(table, before);
        assert!(table.take(take("b", 1, false), later).is_ok());
    }

    #[test]
    fn the_same_rollout_resumes_keeping_when_it_started() {
        let mut table = Table::default();
        table.take(take("a", 1, false), 1_000).unwrap();
        let by_ops = Take {
            owner: "ops".into(),
            ..take("a", 1, false)
        };
        let (renewed, taken) = table.take(by_ops, 5_000).unwrap();
        assert_eq!(taken, Taken::Renewed);
        assert_eq!(renewed.owner, "ci");
        let (resumed, taken) = table.take(take("a", 2, false), 90_000).unwrap();
        assert_eq!(taken, Taken::Resumed { from_attempt: 1 });
        assert_eq!(
            (renewed.started_at_ms, resumed.started_at_ms),
            (1_000, 1_000)
        );
        assert_eq!(
            (
                resumed.report.attempt,
                resumed.updated_at_ms,
                resumed.expires_at_ms
            ),
            (2, 90_000, 90_000 + TTL)
        );
        assert_eq!(table.ended().count(), 0);
    }

    #[test]
    fn force_takes_it_over_and_ends_the_displaced_record() {
        let mut table = Table::default();
        table.take(take("a", 3, false), 1_000).unwrap();
        let (record, taken) = table.take(take("b", 1, true), 2_000).unwrap();
        let Taken::ByForce(old) = &taken else {
            panic!("{taken:?}");
        };
        assert_eq!(
            (old.report.outcome.as_str(), old.ended_at_ms),
            (TAKEN_OVER, Some(2_000))
        );
        assert_eq!(record.taken_from.as_deref(), Some("a attempt 3"));
        assert_eq!(table.ended().next(), Some(&**old));
        assert_eq!(
            taken_message(&record, &taken),
            "rollout b (attempt 1, by ci) took the lease by force from rollout a (attempt 3, by ci)"
        );
        // The displaced rollout's commands are refused, naming the holder.
        let refused = table
            .admits(3_000, Some("a"), false, "upgrade")
            .unwrap_err();
        assert_eq!(refused.holder().map(|h| h.report.id.as_str()), Some("b"));
        assert_eq!(refused.lease(), Some("a"));
        // So is a command naming a lease nobody holds.
        table.give_back(report("b", 1), 4_000);
        let refused = table
            .admits(5_000, Some("b"), false, "rollback")
            .unwrap_err();
        assert!(refused.holder().is_none());
        assert!(
            refused.to_string().contains("no rollout holds"),
            "{refused}"
        );
        assert_eq!(
            table.admits(5_000, Some("b"), true, "rollback"),
            Ok(Admitted::Free)
        );
    }

    #[test]
    fn only_the_last_ended_rollouts_are_kept_newest_first() {
        let mut table = Table::default();
        for n in 0..(ENDED_KEPT as i64 + 20) {
            let id = format!("r{n}");
            table.take(take(&id, 1, false), n).unwrap();
            table.give_back(report(&id, 1), n);
        }
        let ended: Vec<_> = table.ended().map(|r| r.ended_at_ms.unwrap()).collect();
        assert_eq!(ended.len(), ENDED_KEPT);
        assert_eq!(ended[0], ENDED_KEPT as i64 + 19);
        assert!(ended.windows(2).all(|w| w[0] > w[1]));
    }

    #[derive(Debug, Clone)]
    enum Op {
        Take { id: u8, attempt: u32, force: bool },
        GiveBack { id: u8 },
        Wait(i64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u8..3, 1u32..3, any::<bool>()).prop_map(|(id, attempt, force)| Op::Take {
                id,
                attempt,
                force
            }),
            (0u8..3).prop_map(|id| Op::GiveBack { id }),
            (0i64..2 * TTL).prop_map(Op::Wait),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn one_holder_whom_only_force_or_give_back_displaces(ops in proptest::collection::vec(op(), 1..80)) {
            let mut table = Table::default();
            let mut now = 0;
            for op in ops {
                let before = table.clone();
                let held = before.holder().map(|h| h.report.id.clone());
                match op {
                    Op::Take { id, attempt, force } => {
                        let id = id.to_string();
                        let result = table.take(take(&id, attempt, force), now);
                        match &held {
                            // Another rollout without force never takes it,
                            // and changes nothing.
                            Some(h) if *h != id && !force => {
                                prop_assert!(result.is_err());
                                prop_assert_eq!(&table, &before);
                            }
                            // The same rollout always does, keeping its start.
                            Some(h) if *h == id => {
                                let (record, _) = result.as_ref().unwrap();
                                prop_assert_eq!(record.started_at_ms, before.holder().unwrap().started_at_ms);
                            }
                            // Free (never held, or given back) or forced: anyone can.
                            _ => prop_assert!(result.is_ok()),
                        }
                        if result.is_ok() {
                            prop_assert_eq!(table.holder().map(|h| h.report.id.as_str()), Some(id.as_str()));
                        } else {
                            prop_assert_eq!(&table, &before);
                        }
                    }
                    Op::GiveBack { id } => {
                        let id = id.to_string();
                        table.give_back(report(&id, 1), now);
                        if held.as_deref() == Some(id.as_str()) {
                            prop_assert!(table.holder().is_none());
                            prop_assert_eq!(table.ended().next().map(|r| &r.report.id), Some(&id));
                        } else {
                            prop_assert_eq!(&table, &before);
                        }
                    }
                    // Time frees nothing.
                    Op::Wait(ms) => now += ms,
                }
                prop_assert!(table.ended().count() <= ENDED_KEPT);
                // admits agrees with the holder.
                let holder = table.holder().map(|h| h.report.id.clone());
                prop_assert_eq!(table.admits(now, None, false, "upgrade").is_ok(), holder.is_none());
                for id in ["0", "1", "2"] {
                    prop_assert_eq!(
                        table.admits(now, Some(id), false, "upgrade").is_ok(),
                        holder.as_deref() == Some(id)
                    );
                    prop_assert!(table.admits(now, Some(id), true, "upgrade").is_ok());
                }
            }
        }
    }
}
