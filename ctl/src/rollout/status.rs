//! `ctl rollout status` and `ctl rollout history`: a fleet's rollouts as
//! the agents themselves record them, readable from any terminal while a
//! rollout runs elsewhere. A running rollout renews its lease on every
//! agent with its progress (step, agents done / pending / skipped, the
//! soak's end), so what `status` shows is at most a renewal old; every
//! rollout leaves a record on each agent it held when it ends.

use std::collections::BTreeMap;

use futures_util::future::join_all;
use nine9s_proto as pb;
use serde::Serialize;

use super::{lease, Node};
use crate::commands::status;
use crate::{json, render, Failure, Output};

/// One agent in `ctl rollout status`.
#[derive(Serialize)]
struct AgentRow {
    name: String,
    address: String,
    /// None when the agent could not be read (`error` says why).
    active: Option<String>,
    permanent: Option<String>,
    soak_remaining_ms: u64,
    /// The rollout holding this agent's lease.
    lease: Option<pb::RolloutRecord>,
    error: Option<String>,
}

/// The document `ctl --output json rollout status` prints.
#[derive(Serialize)]
struct FleetStatus {
    agents: Vec<AgentRow>,
    /// Each rollout holding some agent, with the progress it last reported
    /// (the freshest renewal among its agents).
    rollouts: Vec<pb::RolloutRecord>,
}

pub async fn status_of(nodes: Vec<Node>, output: Output) -> Result<(), Failure> {
    let read = join_all(nodes.iter().map(|n| async move {
        let now = status(&n.agent).await;
        let records = lease::records(n).await;
        (now, records)
    }))
    .await;
    let mut rows = Vec::new();
    let mut rollouts: BTreeMap<(String, u32), pb::RolloutRecord> = BTreeMap::new();
    let mut unreachable = 0;
    for (node, (now, records)) in nodes.iter().zip(read) {
        let mut row = AgentRow {
            name: node.name.clone(),
            address: node.address.clone(),
            active: None,
            permanent: None,
            soak_remaining_ms: 0,
            lease: None,
            error: None,
        };
        match (now, records) {
            (Ok(now), Ok(records)) => {
                row.active = Some(now.active_version);
                row.permanent = Some(now.permanent_version);
                row.soak_remaining_ms = now.soak.map_or(0, |s| s.remaining_ms);
                if let Some(holder) = records.holder {
                    let key = (holder.rollout_id.clone(), holder.attempt);
                    let fresher = rollouts
                        .get(&key)
                        .is_none_or(|seen| seen.updated_at_ms < holder.updated_at_ms);
                    if fresher {
                        rollouts.insert(key, holder.clone());
                    }
                    row.lease = Some(holder);
                }
            }
            (Err(f), _) | (_, Err(f)) => {
                unreachable += 1;
                row.error = Some(super::StepError::from_failure(f).error);
            }
        }
        rows.push(row);
    }
    let fleet = FleetStatus {
        agents: rows,
        rollouts: rollouts.into_values().collect(),
    };
    match output {
        Output::Json => json::print(&fleet),
        Output::Table => print_status(&fleet),
    }
    if unreachable > 0 {
        return Err(Failure::Unreachable(anyhow::anyhow!(
            "{unreachable} agent(s) could not be read"
        )));
    }
    Ok(())
}

fn print_status(fleet: &FleetStatus) {
    let dash = |v: &Option<String>| v.clone().filter(|v| !v.is_empty()).unwrap_or("-".into());
    let rows: Vec<Vec<String>> = fleet
        .agents
        .iter()
        .map(|a| {
            vec![
                a.name.clone(),
                dash(&a.active),
                dash(&a.permanent),
                if a.soak_remaining_ms > 0 {
                    render::seconds(a.soak_remaining_ms)
                } else {
                    "-".into()
                },
                match (&a.lease, &a.error) {
                    (_, Some(e)) => format!("unreachable: {e}"),
                    (Some(l), None) => format!("{} (attempt {})", l.rollout_id, l.attempt),
                    (None, None) => "-".into(),
                },
            ]
        })
        .collect();
    render::table(
        &["AGENT", "ACTIVE", "PERMANENT", "SOAK LEFT", "ROLLOUT"],
        &rows,
    );
    if fleet.rollouts.is_empty() {
        outln!("no rollout holds any of these agents");
    }
    let now = render::now_ms();
    for r in &fleet.rollouts {
        let held = fleet
            .agents
            .iter()
            .filter(|a| {
                a.lease
                    .as_ref()
                    .is_some_and(|l| l.rollout_id == r.rollout_id && l.attempt == r.attempt)
            })
            .count();
        outln!(
            "rollout {} of {}: {}, {} agent(s) done, {} pending, {} skipped of {}; holds {held} here",
            lease::holder(r),
            r.version,
            if r.step.is_empty() { "starting" } else { &r.step },
            r.agents_done,
            r.agents_pending,
            r.agents_skipped,
            r.agents_total
        );
        if r.soak_until_ms > now {
            outln!(
                "  soak: {} left",
                render::seconds((r.soak_until_ms - now) as u64)
            );
        }
        if r.expires_at_ms <= now {
            outln!(
                "  its lease expired {} ago: its ctl stopped (run it again to resume it, or `ctl rollout undo --rollout-id {}`)",
                render::seconds((now - r.expires_at_ms) as u64),
                r.rollout_id
            );
        } else {
            outln!(
                "  renewed {} ago{}",
                render::seconds((now - r.updated_at_ms).max(0) as u64),
                if r.command.is_empty() {
                    String::new()
                } else {
                    format!("; started as: {}", r.command)
                }
            );
        }
    }
}

/// One rollout attempt in `ctl rollout history`, merged over the agents
/// that recorded it.
#[derive(Serialize)]
struct Past {
    #[serde(flatten)]
    record: pb::RolloutRecord,
    /// The agents that recorded it.
    agents: Vec<String>,
}

pub async fn history(nodes: Vec<Node>, output: Output) -> Result<(), Failure> {
    let read = join_all(nodes.iter().map(lease::records)).await;
    let mut merged: BTreeMap<(String, u32), Past> = BTreeMap::new();
    let mut unreachable = Vec::new();
    for (node, result) in nodes.iter().zip(read) {
        let records = match result {
            Ok(records) => records,
            Err(f) => {
                unreachable.push(format!(
                    "{}: {}",
                    node.name,
                    super::StepError::from_failure(f).error
                ));
                continue;
            }
        };
        for record in records.holder.into_iter().chain(records.ended) {
            let key = (record.rollout_id.clone(), record.attempt);
            let past = merged.entry(key).or_insert_with(|| Past {
                record: record.clone(),
                agents: Vec::new(),
            });
            // The freshest word on it: the one that ended, or was renewed last.
            if (record.ended_at_ms, record.updated_at_ms)
                > (past.record.ended_at_ms, past.record.updated_at_ms)
            {
                past.record = record;
            }
            past.agents.push(node.name.clone());
        }
    }
    let mut past: Vec<Past> = merged.into_values().collect();
    past.sort_by_key(|p| std::cmp::Reverse(p.record.started_at_ms));
    match output {
        Output::Json => json::print(&past),
        Output::Table => {
            let rows: Vec<Vec<String>> = past
                .iter()
                .map(|p| {
                    let r = &p.record;
                    vec![
                        render::time(r.started_at_ms),
                        r.rollout_id.clone(),
                        r.attempt.to_string(),
                        r.version.clone(),
                        r.owner.clone(),
                        if r.ended_at_ms == 0 {
                            format!("running ({})", r.step)
                        } else {
                            r.outcome.clone()
                        },
                        p.agents.len().to_string(),
                    ]
                })
                .collect();
            render::table(
                &[
                    "STARTED", "ROLLOUT", "ATTEMPT", "VERSION", "OWNER", "OUTCOME", "AGENTS",
                ],
                &rows,
            );
        }
    }
    if !unreachable.is_empty() {
        return Err(Failure::Unreachable(anyhow::anyhow!(
            "could not read {}",
            unreachable.join("; ")
        )));
    }
    Ok(())
}
