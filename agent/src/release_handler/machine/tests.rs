//! The lifecycle machine without I/O: the confirmed defects as examples,
//! and random sequences of commands, plugin failures and crashes that must
//! keep every invariant.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;

use super::*;

fn v(minor: u64) -> Version {
    Version::new(0, minor, 0)
}

/// A store with 0.1.0 installed and 0.2.0 .. 0.N.0 staged.
fn installed(staged: u64) -> Lifecycle {
    let empty = Lifecycle::new(BTreeMap::new(), v(1));
    let (mut l, _) = empty
        .apply(Event::Installed {
            version: v(1),
            at_ms: 1,
        })
        .unwrap();
    for minor in 2..=staged {
        l = l.apply(Event::Staged { version: v(minor) }).unwrap().0;
    }
    l
}

fn state(l: &Lifecycle, minor: u64) -> ReleaseState {
    l.entry(&v(minor)).unwrap().state
}

fn apply(l: &Lifecycle, event: Event) -> Lifecycle {
    l.apply(event).unwrap().0
}

fn switched(to: u64, settle: Settle, at_ms: i64) -> Event {
    Event::Switched {
        to: v(to),
        settle,
        at_ms,
    }
}

#[test]
fn a_failed_rollback_never_fails_the_permanent_release() {
    // Defect 1: 0.2.0 permanent, 0.3.0 current; the rollback fails in
    // 0.3.0's down-migration.
    let l = installed(3);
    let l = apply(&l, switched(2, Settle::Immediate, 2));
    let l = apply(&l, switched(3, Settle::Held, 3));
    assert_eq!(l.rollback_target().unwrap(), v(2));
    let l = apply(
        &l,
        Event::SwitchFailed {
            to: v(2),
            fault: Some("state migration panicked".into()),
        },
    );
    assert_eq!(state(&l, 2), ReleaseState::Permanent);
    assert_eq!(state(&l, 3), ReleaseState::Current);
    l.check().unwrap();
}

#[test]
fn a_failed_automatic_rollback_stays_visible_and_pending() {
    // Defect 2.
    let l = installed(3);
    let l = apply(&l, switched(2, Settle::Immediate, 2));
    let l = apply(&l, switched(3, Settle::Soak { until_ms: 100 }, 3));
    let (l, effects) = l
        .apply(Event::SoakFailed {
            reason: "health check failed".into(),
        })
        .unwrap();
    assert_eq!(
        effects,
        [Effect::RollBack {
            reason: "health check failed".into()
        }]
    );
    let l = apply(
        &l,
        Event::RollbackFailed {
            error: "quiesce timeout".into(),
        },
    );
    assert!(matches!(l.soak(), Soak::RollingBack { attempts: 1, .. }));
    // Nothing else may switch meanwhile, and the release stays current.
    assert!(l.check_switch(Direction::Down, &v(1)).is_err());
    assert_eq!(state(&l, 3), ReleaseState::Current);
    let l = apply(&l, Event::RolledBack { to: v(2), at_ms: 4 });
    assert_eq!(state(&l, 3), ReleaseState::Failed);
    assert_eq!(state(&l, 2), ReleaseState::Permanent);
    assert_eq!(l.soak(), &Soak::Idle);
}

#[test]
fn a_repeated_rollback_goes_further_back_never_forth() {
    // Defect 3: 0.1.0 -> 0.2.0 -> 0.3.0, all permanent in turn.
    let l = installed(3);
    let l = apply(&l, switched(2, Settle::Immediate, 2));
    let l = apply(&l, switched(3, Settle::Immediate, 3));
    let target = l.rollback_target().unwrap();
    assert_eq!(target, v(2));
    let l = apply(
        &l,
        Event::RolledBack {
            to: target,
            at_ms: 4,
        },
    );
    assert_eq!(l.rollback_target().unwrap(), v(1));
    let l = apply(&l, Event::RolledBack { to: v(1), at_ms: 5 });
    assert!(l.rollback_target().is_err(), "nothing older than 0.1.0");
}

#[test]
fn a_crash_while_current_fails_the_release_and_a_clean_stop_does_not() {
    // Defect 8.
    let l = installed(2);
    let l = apply(&l, switched(2, Settle::Held, 2));
    let booted = |unclean, cause: Option<&str>| Event::Booted {
        serving: v(1),
        unclean,
        cause: cause.map(str::to_owned),
        unloadable: vec![],
        at_ms: 9,
    };
    let crashed = apply(&l, booted(true, None));
    assert_eq!(state(&crashed, 2), ReleaseState::Failed);
    assert!(crashed
        .entry(&v(2))
        .unwrap()
        .failure
        .as_deref()
        .unwrap()
        .contains("agent died while 0.2.0 was current"));
    // The supervisor says how its worker died: the reason names it.
    let segfaulted = apply(&l, booted(true, Some("was killed by SIGSEGV")));
    assert_eq!(
        segfaulted.entry(&v(2)).unwrap().failure.as_deref(),
        Some("the agent died while 0.2.0 was current: its worker was killed by SIGSEGV")
    );
    let stopped = apply(&l, booted(false, None));
    assert_eq!(state(&stopped, 2), ReleaseState::Old);
}

#[test]
fn boot_falls_back_to_the_last_permanent_release_that_loads() {
    let l = installed(3);
    let l = apply(&l, switched(2, Settle::Immediate, 2));
    let l = apply(&l, switched(3, Settle::Immediate, 3));
    assert_eq!(l.boot_candidates(), [v(3), v(2), v(1)]);
    let l = apply(
        &l,
        Event::Booted {
            serving: v(2),
            unclean: true,
            cause: None,
            unloadable: vec![(v(3), "cannot load".into())],
            at_ms: 10,
        },
    );
    assert_eq!(state(&l, 2), ReleaseState::Permanent);
    assert_eq!(state(&l, 3), ReleaseState::Failed);
    assert_eq!(l.active(), &v(2));
}

#[test]
fn switching_to_the_active_release_is_unchanged_and_the_wrong_way_is_refused() {
    let l = installed(3);
    let l = apply(&l, switched(2, Settle::Immediate, 2));
    assert_eq!(
        l.check_switch(Direction::Up, &v(2)).unwrap(),
        Decision::Unchanged
    );
    let err = l.check_switch(Direction::Up, &v(1)).unwrap_err();
    assert_eq!(err.reason(), Reason::WrongDirection);
    assert!(matches!(
        l.check_switch(Direction::Up, &v(9)),
        Err(Error::UnknownVersion(_))
    ));
}

/// A step of a random history.
#[derive(Debug, Clone)]
enum Op {
    Stage,
    Switch { to: u64, settle: u8, fault: bool },
    SwitchFailsForOtherReasons { to: u64 },
    SoakFails,
    SoakPasses,
    Rollback { succeeds: bool, own_fault: bool },
    MakePermanent,
    Remove { version: u64 },
    Crash { unloadable_permanent: bool },
    CleanRestart,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        Just(Op::Stage),
        (1u64..8, 0u8..3, any::<bool>()).prop_map(|(to, settle, fault)| Op::Switch {
            to,
            settle,
            fault
        }),
        (1u64..8).prop_map(|to| Op::SwitchFailsForOtherReasons { to }),
        Just(Op::SoakFails),
        Just(Op::SoakPasses),
        (any::<bool>(), any::<bool>()).prop_map(|(succeeds, own_fault)| Op::Rollback {
            succeeds,
            own_fault
        }),
        Just(Op::MakePermanent),
        (1u64..8).prop_map(|version| Op::Remove { version }),
        any::<bool>().prop_map(|unloadable_permanent| Op::Crash {
            unloadable_permanent
        }),
        Just(Op::CleanRestart),
    ]
}

/// Which releases may legitimately be failed: those whose own code was
/// blamed, those current when the agent died, those that failed a soak,
/// and those that could not be loaded at boot.
struct Blame(BTreeSet<Version>);

/// The way a switch from the active release to `to` goes.
fn direction_to(l: &Lifecycle, to: &Version) -> Direction {
    if *to > *l.active() {
        Direction::Up
    } else {
        Direction::Down
    }
}

/// Plays one op the way the engine does: ask the machine, then apply
/// what happened. Refused commands change nothing.
fn play(l: &Lifecycle, op: &Op, t: i64, staged: &mut u64, blame: &mut Blame) -> Lifecycle {
    let next = |event| l.apply(event).map(|(next, _)| next);
    let result = match op {
        Op::Stage => {
            *staged += 1;
            next(Event::Staged {
                version: v(*staged),
            })
        }
        Op::Switch { to, settle, fault } => {
            let to = v(*to);
            match l.check_switch(direction_to(l, &to), &to) {
                Ok(Decision::Proceed) if *fault => {
                    blame.0.insert(to.clone());
                    next(Event::SwitchFailed {
                        to,
                        fault: Some("init panicked".into()),
                    })
                }
                Ok(Decision::Proceed) => next(Event::Switched {
                    to,
                    settle: match settle {
                        0 => Settle::Immediate,
                        1 => Settle::Soak { until_ms: t + 5 },
                        _ => Settle::Held,
                    },
                    at_ms: t,
                }),
                Ok(Decision::Unchanged) | Err(_) => Ok(l.clone()),
            }
        }
        Op::SwitchFailsForOtherReasons { to } => {
            let to = v(*to);
            match l.check_switch(direction_to(l, &to), &to) {
                Ok(Decision::Proceed) => next(Event::SwitchFailed { to, fault: None }),
                _ => Ok(l.clone()),
            }
        }
        Op::SoakFails => match l.soak() {
            Soak::Soaking { version, .. } => {
                blame.0.insert(version.clone());
                next(Event::SoakFailed {
                    reason: "unhealthy".into(),
                })
            }
            _ => Ok(l.clone()),
        },
        Op::SoakPasses => match l.soak() {
            Soak::Soaking { .. } => next(Event::SoakPassed { at_ms: t }),
            _ => Ok(l.clone()),
        },
        Op::Rollback {
            succeeds,
            own_fault,
        } => match l.rollback_target() {
            Ok(to) if *succeeds => next(Event::RolledBack { to, at_ms: t }),
            Ok(to) => match l.soak() {
                Soak::RollingBack { .. } => next(Event::RollbackFailed {
                    error: "quiesce timeout".into(),
                }),
                _ => {
                    if *own_fault {
                        blame.0.insert(to.clone());
                    }
                    next(Event::SwitchFailed {
                        to,
                        fault: own_fault.then(|| "init panicked".into()),
                    })
                }
            },
            Err(_) => Ok(l.clone()),
        },
        Op::MakePermanent => match l.current() {
            Some(current) => {
                let version = current.clone();
                match l.apply(Event::MadePermanent { version, at_ms: t }) {
                    Ok((next, _)) => Ok(next),
                    Err(_) => Ok(l.clone()),
                }
            }
            None => Ok(l.clone()),
        },
        Op::Remove { version } => match l.check_remove(&v(*version)) {
            Ok(()) => next(Event::Removed {
                version: v(*version),
            }),
            Err(_) => Ok(l.clone()),
        },
        Op::Crash {
            unloadable_permanent,
        } => {
            if let Some(current) = l.current() {
                blame.0.insert(current.clone());
            }
            let candidates = l.boot_candidates();
            let skip = usize::from(*unloadable_permanent && candidates.len() > 1);
            let unloadable: Vec<(Version, String)> = candidates[..skip]
                .iter()
                .map(|v| (v.clone(), "cannot load".to_owned()))
                .collect();
            blame.0.extend(unloadable.iter().map(|(v, _)| v.clone()));
            next(Event::Booted {
                serving: candidates[skip].clone(),
                unclean: true,
                cause: None,
                unloadable,
                at_ms: t,
            })
        }
        Op::CleanRestart => next(Event::Booted {
            serving: l.permanent().expect("one permanent").clone(),
            unclean: false,
            cause: None,
            unloadable: vec![],
            at_ms: t,
        }),
    };
    result.unwrap_or_else(|e| panic!("{op:?} refused by the machine: {e}\n{l:#?}"))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn random_histories_keep_every_invariant(ops in proptest::collection::vec(op(), 1..60)) {
        let mut staged = 3;
        let mut l = installed(staged);
        let mut blame = Blame(BTreeSet::new());
        for (t, op) in ops.iter().enumerate() {
            let before = l.clone();
            l = play(&l, op, t as i64 + 10, &mut staged, &mut blame);
            prop_assert!(l.check().is_ok(), "{op:?} broke {:?}", l.check());
            for (version, entry) in &l.releases {
                if entry.state == ReleaseState::Failed {
                    prop_assert!(blame.0.contains(version), "{version} failed without its own fault after {op:?}");
                }
            }
            // The permanent release is only ever left for another one that
            // becomes permanent: never lost.
            prop_assert!(l.permanent().is_some());
            if let (Some(was), Some(now)) = (before.permanent(), l.permanent()) {
                if was != now {
                    prop_assert!(l.entry(was).is_some(), "the old permanent was forgotten");
                }
            }
        }
    }

    #[test]
    fn a_rollback_never_returns_to_the_release_it_left(ops in proptest::collection::vec(op(), 1..40)) {
        let mut staged = 3;
        let mut l = installed(staged);
        let mut blame = Blame(BTreeSet::new());
        for (t, op) in ops.iter().enumerate() {
            l = play(&l, op, t as i64 + 10, &mut staged, &mut blame);
        }
        // Two rollbacks in a row never come back to where they started.
        let start = l.active().clone();
        if let Ok(first) = l.rollback_target() {
            let l = apply(&l, Event::RolledBack { to: first, at_ms: 1000 });
            if let Ok(second) = l.rollback_target() {
                prop_assert_ne!(second, start);
            }
        }
    }
}
