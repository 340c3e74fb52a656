//! The lifecycle as a pure state machine: which state every release is in,
//! which release serves, and what the soak watcher is doing — and how each
//! event changes them. No I/O: the engine asks it what a command may do,
//! does the work (loading, switching, writing the store), then applies the
//! outcome here and persists what changed.
//!
//! The invariants (`Lifecycle::check`) hold after every `apply`:
//! exactly one permanent release; at most one current, and when there is
//! one it is the active release and the soak watcher is on it; otherwise
//! the permanent release is active. A release is marked failed only for a
//! fault of its own code (or the agent dying while it was current), never
//! for another release's fault, and the permanent release never.

use std::collections::BTreeMap;
use std::fmt;

use nine9s_manifest::Version;

use crate::error::{Error, Reason};
use crate::model::ReleaseState;

/// What the machine knows of one release.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub state: ReleaseState,
    /// When it last became permanent; cleared when it is rolled back from,
    /// so a rollback never returns to a release it just left.
    pub permanent_since_ms: Option<i64>,
    /// Why it is failed.
    pub failure: Option<String>,
}

/// What the soak watcher is doing.
#[derive(Debug, Clone, PartialEq)]
pub enum Soak {
    /// The active release is permanent.
    Idle,
    /// The current release becomes permanent at `until_ms` if healthy.
    Soaking { version: Version, until_ms: i64 },
    /// The current release stays current until made permanent.
    Held { version: Version },
    /// The current release failed its soak; the automatic rollback is
    /// retried until it succeeds.
    RollingBack {
        version: Version,
        reason: String,
        attempts: u32,
        last_error: Option<String>,
    },
}

impl Soak {
    pub fn version(&self) -> Option<&Version> {
        match self {
            Soak::Idle => None,
            Soak::Soaking { version, .. }
            | Soak::Held { version }
            | Soak::RollingBack { version, .. } => Some(version),
        }
    }
}

/// How a switched-to release settles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settle {
    Immediate,
    /// Soak until this instant (epoch ms).
    Soak {
        until_ms: i64,
    },
    /// Current until `MakePermanent`.
    Held,
}

/// Something that happened, to be applied to the lifecycle.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The bootstrap release of an empty store is installed, permanent.
    Installed {
        version: Version,
        at_ms: i64,
    },
    Staged {
        version: Version,
    },
    /// An upgrade or downgrade switched to `to`.
    Switched {
        to: Version,
        settle: Settle,
        at_ms: i64,
    },
    /// A switch to `to` failed before the swap; `fault` is set when `to`'s
    /// own code failed (its load, init, migration or health check).
    SwitchFailed {
        to: Version,
        fault: Option<String>,
    },
    /// The soaking release is unhealthy: roll it back.
    SoakFailed {
        reason: String,
    },
    /// The soaking release stayed healthy to the end.
    SoakPassed {
        at_ms: i64,
    },
    /// A rollback to `to` succeeded; a release that failed its soak is
    /// marked failed by it.
    RolledBack {
        to: Version,
        at_ms: i64,
    },
    /// An automatic rollback attempt failed; it will be retried.
    RollbackFailed {
        error: String,
    },
    MadePermanent {
        version: Version,
        at_ms: i64,
    },
    Removed {
        version: Version,
    },
    /// The agent started and serves `serving`. `unclean`: the previous run
    /// did not stop cleanly. `unloadable`: releases tried first whose
    /// library could not be started, with why.
    Booted {
        serving: Version,
        unclean: bool,
        /// How the process before ended, when it died (from the supervisor).
        cause: Option<String>,
        unloadable: Vec<(Version, String)>,
        at_ms: i64,
    },
}

/// What applying an event asks of the engine beyond persisting it. What
/// changed is not an effect: the engine commits every entry that differs
/// between the lifecycle before and after (`Actor::prepare`).
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Start the automatic rollback of the release that failed its soak.
    RollBack { reason: String },
}

/// What a switch command should do, decided before any work.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// The release asked for is already active: nothing to do.
    Unchanged,
    Proceed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Up,
    Down,
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Direction::Up => "upgrade",
            Direction::Down => "downgrade",
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Lifecycle {
    releases: BTreeMap<Version, Entry>,
    active: Version,
    soak: Soak,
}

fn refused(reason: Reason, message: String) -> Error {
    Error::Refused { reason, message }
}

impl Lifecycle {
    /// The lifecycle as the store last recorded it, serving `active`.
    /// Stores written before the invariants were enforced may break them;
    /// `Event::Booted` repairs that.
    pub fn new(releases: BTreeMap<Version, Entry>, active: Version) -> Lifecycle {
        Lifecycle {
            releases,
            active,
            soak: Soak::Idle,
        }
    }

    pub fn active(&self) -> &Version {
        &self.active
    }

    pub fn soak(&self) -> &Soak {
        &self.soak
    }

    /// Every release known, lowest version first.
    pub fn versions(&self) -> impl Iterator<Item = &Version> {
        self.releases.keys()
    }

    pub fn entry(&self, version: &Version) -> Option<&Entry> {
        self.releases.get(version)
    }

    pub fn permanent(&self) -> Option<&Version> {
        self.find(ReleaseState::Permanent)
    }

    pub fn current(&self) -> Option<&Version> {
        self.find(ReleaseState::Current)
    }

    fn find(&self, state: ReleaseState) -> Option<&Version> {
        self.releases
            .iter()
            .find(|(_, e)| e.state == state)
            .map(|(v, _)| v)
    }

    /// The releases to try at boot, best first: the permanent one, then
    /// every release that was permanent, most recent first.
    pub fn boot_candidates(&self) -> Vec<Version> {
        let mut candidates: Vec<(&Version, &Entry)> = self
            .releases
            .iter()
            .filter(|(_, e)| e.state == ReleaseState::Permanent || e.permanent_since_ms.is_some())
            .collect();
        candidates.sort_by_key(|(v, e)| {
            (
                e.state != ReleaseState::Permanent,
                std::cmp::Reverse(e.permanent_since_ms),
                std::cmp::Reverse((*v).clone()),
            )
        });
        candidates.into_iter().map(|(v, _)| v.clone()).collect()
    }

    /// Whether an upgrade or downgrade to `to` may run.
    pub fn check_switch(&self, direction: Direction, to: &Version) -> Result<Decision, Error> {
        self.known(to)?;
        if let Soak::RollingBack { version, .. } = &self.soak {
            return Err(refused(
                Reason::RollbackPending,
                format!("{version} failed its soak and is being rolled back; wait for the rollback (ctl status) before switching"),
            ));
        }
        if *to == self.active {
            return Ok(Decision::Unchanged);
        }
        let wrong_way = match direction {
            Direction::Up => *to < self.active,
            Direction::Down => *to > self.active,
        };
        if wrong_way {
            let other = match direction {
                Direction::Up => "a downgrade",
                Direction::Down => "an upgrade",
            };
            return Err(refused(
                Reason::WrongDirection,
                format!(
                    "cannot {direction} from {} to {to}: that is {other}",
                    self.active
                ),
            ));
        }
        Ok(Decision::Proceed)
    }

    /// Where a rollback goes: the permanent release while another one is
    /// current, otherwise the release that was permanent most recently
    /// before the active one (and was not rolled back from since).
    pub fn rollback_target(&self) -> Result<Version, Error> {
        if let Some(permanent) = self.permanent().filter(|p| **p != self.active) {
            return Ok(permanent.clone());
        }
        self.releases
            .iter()
            .filter(|(v, e)| {
                **v != self.active
                    && e.state == ReleaseState::Old
                    && e.permanent_since_ms.is_some()
            })
            .max_by_key(|(_, e)| e.permanent_since_ms)
            .map(|(v, _)| v.clone())
            .ok_or_else(|| {
                refused(
                    Reason::NoRollbackTarget,
                    format!(
                        "{} is permanent and no older release was permanent before it: nothing to roll back to",
                        self.active
                    ),
                )
            })
    }

    pub fn check_make_permanent(&self, version: &Version) -> Result<(), Error> {
        let entry = self.known(version)?;
        if let Soak::RollingBack {
            version: failing, ..
        } = &self.soak
        {
            return Err(refused(
                Reason::RollbackPending,
                format!("{failing} failed its soak and is being rolled back; it cannot be made permanent"),
            ));
        }
        if entry.state != ReleaseState::Current {
            return Err(refused(
                Reason::NotCurrent,
                format!(
                    "{version} is {}, not current; only the current release can be made permanent",
                    entry.state
                ),
            ));
        }
        Ok(())
    }

    pub fn check_remove(&self, version: &Version) -> Result<(), Error> {
        let entry = self.known(version)?;
        if *version == self.active
            || matches!(entry.state, ReleaseState::Permanent | ReleaseState::Current)
        {
            let what = if *version == self.active {
                "active".to_owned()
            } else {
                entry.state.to_string()
            };
            return Err(refused(
                Reason::ReleaseInUse,
                format!("{version} is {what} and cannot be removed; switch away from it first"),
            ));
        }
        Ok(())
    }

    fn known(&self, version: &Version) -> Result<&Entry, Error> {
        self.releases
            .get(version)
            .ok_or_else(|| Error::UnknownVersion(version.clone()))
    }

    /// Applies an event: the new lifecycle and what the engine must do.
    /// Refuses an event that does not fit the current state (a bug in the
    /// engine), leaving the lifecycle as it was.
    pub fn apply(&self, event: Event) -> Result<(Lifecycle, Vec<Effect>), Error> {
        let mut next = self.clone();
        let mut effects = Vec::new();
        match event {
            Event::Installed { version, at_ms } => {
                if !self.releases.is_empty() {
                    return Err(bug(
                        "the bootstrap release is installed only on an empty store",
                    ));
                }
                next.set(&version, ReleaseState::Permanent);
                next.entry_mut(&version).permanent_since_ms = Some(at_ms);
                next.active = version;
            }
            Event::Staged { version } => {
                if self.releases.contains_key(&version) {
                    return Err(bug("a release is staged once"));
                }
                next.set(&version, ReleaseState::Staged);
            }
            Event::Switched { to, settle, at_ms } => {
                self.known(&to)?;
                if to == self.active || matches!(self.soak, Soak::RollingBack { .. }) {
                    return Err(bug("switched to the active release, or during a rollback"));
                }
                let permanent = self.entry(&to).map(|e| e.state) == Some(ReleaseState::Permanent);
                if let Some(current) = self.current().filter(|c| **c != to).cloned() {
                    next.set(&current, ReleaseState::Old);
                }
                if permanent {
                    next.soak = Soak::Idle;
                } else if settle == Settle::Immediate {
                    next.promote(&to, at_ms);
                    next.soak = Soak::Idle;
                } else {
                    next.set(&to, ReleaseState::Current);
                    next.soak = match settle {
                        Settle::Soak { until_ms } => Soak::Soaking {
                            version: to.clone(),
                            until_ms,
                        },
                        _ => Soak::Held {
                            version: to.clone(),
                        },
                    };
                }
                next.active = to;
            }
            Event::SwitchFailed { to, fault } => {
                self.known(&to)?;
                let state = self.entry(&to).map(|e| e.state);
                if let Some(fault) = fault {
                    // Never the permanent release, nor the one serving.
                    if state != Some(ReleaseState::Permanent) && to != self.active {
                        next.set(&to, ReleaseState::Failed);
                        next.entry_mut(&to).failure = Some(fault);
                    }
                }
            }
            Event::SoakFailed { reason } => {
                let Soak::Soaking { version, .. } = &self.soak else {
                    return Err(bug("only a soaking release fails its soak"));
                };
                next.soak = Soak::RollingBack {
                    version: version.clone(),
                    reason: reason.clone(),
                    attempts: 0,
                    last_error: None,
                };
                effects.push(Effect::RollBack { reason });
            }
            Event::SoakPassed { at_ms } => {
                let Soak::Soaking { version, .. } = &self.soak else {
                    return Err(bug("only a soaking release passes its soak"));
                };
                let version = version.clone();
                next.promote(&version, at_ms);
                next.soak = Soak::Idle;
            }
            Event::RollbackFailed { error } => {
                let Soak::RollingBack {
                    version,
                    reason,
                    attempts,
                    ..
                } = &self.soak
                else {
                    return Err(bug("only an automatic rollback is retried"));
                };
                next.soak = Soak::RollingBack {
                    version: version.clone(),
                    reason: reason.clone(),
                    attempts: attempts + 1,
                    last_error: Some(error),
                };
            }
            Event::RolledBack { to, at_ms } => {
                self.known(&to)?;
                if to == self.active {
                    return Err(bug("rolled back to the active release"));
                }
                let left = self.active.clone();
                // Whoever rolls back a release that failed its soak, it failed.
                let failed_soak = match &self.soak {
                    Soak::RollingBack { reason, .. } => Some(reason.clone()),
                    _ => None,
                };
                next.promote(&to, at_ms);
                if let Some(reason) = failed_soak {
                    next.set(&left, ReleaseState::Failed);
                    next.entry_mut(&left).failure = Some(format!("failed its soak: {reason}"));
                } else if next.entry(&left).map(|e| e.state) != Some(ReleaseState::Old) {
                    next.set(&left, ReleaseState::Old);
                }
                next.entry_mut(&left).permanent_since_ms = None;
                next.soak = Soak::Idle;
                next.active = to;
            }
            Event::MadePermanent { version, at_ms } => {
                self.check_make_permanent(&version)?;
                next.promote(&version, at_ms);
                next.soak = Soak::Idle;
            }
            Event::Removed { version } => {
                self.check_remove(&version)?;
                next.releases.remove(&version);
            }
            Event::Booted {
                serving,
                unclean,
                cause,
                unloadable,
                at_ms,
            } => {
                self.known(&serving)?;
                if let Some(current) = self.current().cloned() {
                    if unclean {
                        next.set(&current, ReleaseState::Failed);
                        let how = cause
                            .as_ref()
                            .map(|how| format!(": its worker {how}"))
                            .unwrap_or_default();
                        next.entry_mut(&current).failure =
                            Some(format!("the agent died while {current} was current{how}"));
                    } else {
                        next.set(&current, ReleaseState::Old);
                    }
                }
                for (version, why) in unloadable {
                    if version != serving && self.releases.contains_key(&version) {
                        next.set(&version, ReleaseState::Failed);
                        next.entry_mut(&version).failure = Some(why);
                    }
                }
                // Stores from before the invariants: more than one permanent.
                let others: Vec<Version> = next
                    .releases
                    .iter()
                    .filter(|(v, e)| e.state == ReleaseState::Permanent && **v != serving)
                    .map(|(v, _)| v.clone())
                    .collect();
                for other in others {
                    next.set(&other, ReleaseState::Old);
                }
                if next.entry(&serving).map(|e| e.state) != Some(ReleaseState::Permanent) {
                    next.set(&serving, ReleaseState::Permanent);
                    next.entry_mut(&serving).permanent_since_ms = Some(at_ms);
                    next.entry_mut(&serving).failure = None;
                }
                next.soak = Soak::Idle;
                next.active = serving;
            }
        }
        next.check().map_err(|broken| Error::Refused {
            reason: Reason::Internal,
            message: format!("refused: applying that would break an invariant: {broken}"),
        })?;
        Ok((next, effects))
    }

    /// `version` becomes permanent; the permanent release before it is old.
    fn promote(&mut self, version: &Version, at_ms: i64) {
        if let Some(previous) = self.permanent().filter(|p| *p != version).cloned() {
            self.set(&previous, ReleaseState::Old);
        }
        self.set(version, ReleaseState::Permanent);
        let entry = self.entry_mut(version);
        entry.permanent_since_ms = Some(at_ms);
        entry.failure = None;
    }

    fn set(&mut self, version: &Version, state: ReleaseState) {
        if self.releases.get(version).map(|e| e.state) == Some(state) {
            return;
        }
        self.releases
            .entry(version.clone())
            .and_modify(|e| e.state = state)
            .or_insert(Entry {
                state,
                permanent_since_ms: None,
                failure: None,
            });
        if state != ReleaseState::Failed {
            self.entry_mut(version).failure = None;
        }
    }

    fn entry_mut(&mut self, version: &Version) -> &mut Entry {
        self.releases
            .get_mut(version)
            .expect("set() created the entry")
    }

    /// The invariants; `Err` names the first one broken.
    pub fn check(&self) -> Result<(), String> {
        check_states(self.releases.iter().map(|(v, e)| (v, e.state)))?;
        let active = self
            .releases
            .get(&self.active)
            .ok_or_else(|| format!("the active release {} is unknown", self.active))?;
        match self.current() {
            Some(current) if *current != self.active => {
                return Err(format!(
                    "{current} is current but {} is active",
                    self.active
                ))
            }
            None if active.state != ReleaseState::Permanent => {
                return Err(format!(
                    "the active release {} is {}, neither permanent nor current",
                    self.active, active.state
                ))
            }
            _ => {}
        }
        if self.soak.version() != self.current() {
            return Err(format!(
                "the soak watches {:?} but the current release is {:?}",
                self.soak.version().map(ToString::to_string),
                self.current().map(ToString::to_string)
            ));
        }
        Ok(())
    }
}

/// The invariants on release states alone, also checked by the store
/// before it commits: exactly one permanent, at most one current.
pub fn check_states<'a>(
    states: impl IntoIterator<Item = (&'a Version, ReleaseState)>,
) -> Result<(), String> {
    let (mut permanent, mut current) = (Vec::new(), Vec::new());
    for (version, state) in states {
        match state {
            ReleaseState::Permanent => permanent.push(version.to_string()),
            ReleaseState::Current => current.push(version.to_string()),
            _ => {}
        }
    }
    if permanent.len() != 1 {
        return Err(format!(
            "exactly one release must be permanent, not {permanent:?}"
        ));
    }
    if current.len() > 1 {
        return Err(format!(
            "at most one release may be current, not {current:?}"
        ));
    }
    Ok(())
}

fn bug(what: &str) -> Error {
    Error::Refused {
        reason: Reason::Internal,
        message: format!("internal error: {what}"),
    }
}

#[cfg(test)]
mod tests;
