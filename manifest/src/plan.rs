//! Upgrade plans: the ordered steps of a transition between two releases.

use std::fmt;

use crate::ManifestError;

/// One step of a transition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Where the target is loaded: its library re-hashed and opened and a
    /// trial instance rehearsed (the state migrated, `init`, the hooks
    /// before `switch`, the health check, a snapshot), none serving yet.
    /// The engine does this first whatever the plan, so the step moves
    /// nothing: it marks where the target exists, as OTP's `load_module`
    /// does in an appup. What needs the target — `migrate` and its hooks —
    /// comes after it (a plan that puts either before is refused).
    Load,
    /// Snapshot the running state and migrate it to the target's state version.
    Migrate,
    /// Quiesce, hand the state over, and send new requests to the target.
    Switch,
    /// Run a hook of the target instance (before the switch: on the fresh
    /// instance; after: on the serving one).
    Hook(String),
    /// Wait for the requests still running on the old code.
    Drain,
    /// Release the old library.
    Unload,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::Load => f.write_str("load"),
            Step::Migrate => f.write_str("migrate"),
            Step::Switch => f.write_str("switch"),
            Step::Hook(name) => write!(f, "hook:{name}"),
            Step::Drain => f.write_str("drain"),
            Step::Unload => f.write_str("unload"),
        }
    }
}

/// Where a plan came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlanOrigin {
    Written,
    Derived,
}

impl fmt::Display for PlanOrigin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PlanOrigin::Written => "written",
            PlanOrigin::Derived => "derived",
        })
    }
}

/// The steps of one transition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub origin: PlanOrigin,
    pub steps: Vec<Step>,
}

impl Plan {
    /// The plan used when none is written: every step, in order.
    pub fn derived() -> Plan {
        Plan {
            origin: PlanOrigin::Derived,
            steps: vec![
                Step::Load,
                Step::Migrate,
                Step::Switch,
                Step::Drain,
                Step::Unload,
            ],
        }
    }
}

pub(crate) fn parse_steps(raw: &[String]) -> Result<Vec<Step>, ManifestError> {
    let steps = raw
        .iter()
        .map(|s| match s.as_str() {
            "load" => Ok(Step::Load),
            "migrate" => Ok(Step::Migrate),
            "switch" => Ok(Step::Switch),
            "drain" => Ok(Step::Drain),
            "unload" => Ok(Step::Unload),
            other => match other.strip_prefix("hook:") {
                Some(name) if !name.is_empty() => Ok(Step::Hook(name.to_owned())),
                _ => Err(ManifestError::Invalid(format!(
                    "unknown plan step {other:?}; steps are load, migrate, switch, drain, unload, hook:NAME"
                ))),
            },
        })
        .collect::<Result<Vec<_>, _>>()?;
    let position = |wanted: &Step| steps.iter().position(|s| s == wanted);
    let order_error = |what: &str| Err(ManifestError::Invalid(format!("plan {raw:?}: {what}")));
    let (Some(load), Some(switch)) = (position(&Step::Load), position(&Step::Switch)) else {
        return order_error("a plan needs a load and a switch step");
    };
    if load > switch {
        return order_error("load must come before switch");
    }
    if position(&Step::Migrate).is_some_and(|m| m < load || m > switch) {
        return order_error("migrate must come between load and switch");
    }
    if let Some(hook) = steps[..load].iter().find(|s| matches!(s, Step::Hook(_))) {
        return order_error(&format!(
            "{hook} comes before load: a hook is the target's, which exists only once loaded"
        ));
    }
    for after in [Step::Drain, Step::Unload] {
        if position(&after).is_some_and(|p| p < switch) {
            return order_error(&format!("{after} must come after switch"));
        }
    }
    for step in [
        Step::Load,
        Step::Migrate,
        Step::Switch,
        Step::Drain,
        Step::Unload,
    ] {
        if steps.iter().filter(|s| **s == step).count() > 1 {
            return order_error(&format!("{step} appears twice"));
        }
    }
    Ok(steps)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(steps: &[&str]) -> Result<Vec<Step>, ManifestError> {
        parse_steps(&steps.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn hooks_and_order() {
        let steps = parse(&[
            "load",
            "hook:warm",
            "migrate",
            "switch",
            "hook:routes",
            "drain",
        ])
        .unwrap();
        assert_eq!(steps[1], Step::Hook("warm".into()));
    }

    #[test]
    fn switch_before_load_is_refused() {
        assert!(parse(&["switch", "load"]).is_err());
        assert!(parse(&["load"]).is_err());
        assert!(parse(&["load", "switch", "migrate"]).is_err());
        assert!(parse(&["load", "drain", "switch"]).is_err());
        assert!(parse(&["load", "switch", "reboot"]).is_err());
        let early = parse(&["hook:warm", "load", "switch"])
            .unwrap_err()
            .to_string();
        assert!(early.contains("hook:warm comes before load"), "{early}");
    }
}
