//! `--output json`: every reply as one JSON document on stdout, for
//! scripts. Field names follow the gRPC API (`proto/nine9s.proto`).

use nine9s_proto as pb;
use serde_json::{json, Value};

use crate::render::state_name;

pub fn print(value: &Value) {
    println!("{value}");
}

pub fn release(r: &pb::Release) -> Value {
    json!({
        "name": r.name,
        "version": r.version,
        "state": state_name(r.state),
        "sha256": r.sha256,
        "size": r.size,
        "staged_at_ms": r.staged_at_ms,
        "state_version": r.state_version,
        "routes": r.routes,
    })
}

pub fn releases(releases: &[pb::Release]) -> Value {
    Value::Array(releases.iter().map(release).collect())
}

pub fn transition(t: &pb::Transition) -> Value {
    json!({
        "id": t.id,
        "started_at_ms": t.started_at_ms,
        "kind": t.kind,
        "from": t.from_version,
        "to": t.to_version,
        "result": t.result,
        "duration_us": t.duration_us,
        "switch_wait_us": t.switch_wait_us,
        "error": t.error,
        "automatic": t.automatic,
        "reason": t.reason,
    })
}

pub fn history(transitions: &[pb::Transition]) -> Value {
    Value::Array(transitions.iter().map(transition).collect())
}

/// A switch, or a dry run (no transition, only the plan).
pub fn switched(reply: &pb::TransitionReply) -> Value {
    json!({
        "transition": reply.transition.as_ref().map(transition),
        "plan": reply.plan.as_ref().map(|p| json!({
            "from": p.from_version,
            "to": p.to_version,
            "origin": p.origin,
            "steps": p.steps,
            "checks": p.checks,
        })),
    })
}

pub fn status(s: &pb::StatusReply) -> Value {
    json!({
        "active": s.active_version,
        "permanent": s.permanent_version,
        "current": s.current_version,
        "soak_remaining_ms": s.soak_remaining_ms,
        "uptime_ms": s.uptime_ms,
        "releases": releases(&s.releases),
        "libraries": s.libraries.iter().map(|l| json!({
            "version": l.version,
            "path": l.path,
            "active": l.active,
            "lingering": l.lingering,
            "in_flight": l.in_flight,
            "served": l.served,
            "errors": l.errors,
        })).collect::<Vec<_>>(),
    })
}

pub fn staged(reply: &pb::StageReply) -> Value {
    json!({
        "release": reply.release.as_ref().map(release),
        "already_staged": reply.already_staged,
    })
}

pub fn removed(reply: &pb::RemoveReply) -> Value {
    json!({
        "release": reply.release.as_ref().map(release),
        "collected": reply.collected,
    })
}
