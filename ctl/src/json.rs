//! `--output json`: every reply as one JSON document on stdout (one per
//! line for `watch`), for scripts. Field names follow the gRPC API
//! (`proto/proto/nine9s/control/v1/control.proto`) where they always have;
//! enums are the lower-case words of `render`.

use std::path::Path;

use nine9s_manifest::Manifest;
use nine9s_proto as pb;
use serde_json::{json, Value};

use crate::render::{
    event_kind_name, kind_name, origin_name, result_name, soak_mode_name, state_name, step_name,
};

pub fn print(value: &Value) {
    outln!("{value}");
}

/// A failure: `kind` is `failed`, `unreachable` or `rolled_back`;
/// `reason` the agent's stable code, when it sent one.
pub fn error(kind: &str, message: &str, reason: Option<&str>, exit_code: i32) -> Value {
    json!({
        "error": {
            "kind": kind,
            "message": message,
            "reason": reason,
            "exit_code": exit_code,
        }
    })
}

pub fn release(r: &pb::Release) -> Value {
    json!({
        "name": r.name,
        "version": r.version,
        "state": state_name(r.state()),
        "sha256": r.sha256,
        "size": r.size,
        "staged_at_ms": r.staged_at_ms,
        "state_version": r.state_version,
        "routes": r.routes,
        "permanent_since_ms": r.permanent_since_ms,
        "failure": r.failure,
    })
}

pub fn releases(releases: &[pb::Release]) -> Value {
    Value::Array(releases.iter().map(release).collect())
}

pub fn transition(t: &pb::Transition) -> Value {
    json!({
        "id": t.id,
        "started_at_ms": t.started_at_ms,
        "kind": kind_name(t.kind()),
        "from": t.from_version,
        "to": t.to_version,
        "result": result_name(t.result()),
        "duration_us": t.duration_us,
        "switch_wait_us": t.switch_wait_us,
        "error": t.error,
        "error_reason": t.error_reason,
        "automatic": t.automatic,
        "reason": t.reason,
        "request_id": t.request_id,
        "identity": t.identity,
    })
}

/// The history: an array, or with `--after` a page
/// `{"transitions": [...], "more": bool}`.
pub fn history(reply: &pb::HistoryReply, paged: bool) -> Value {
    let transitions = Value::Array(reply.transitions.iter().map(transition).collect());
    if paged {
        json!({ "transitions": transitions, "more": reply.more })
    } else {
        transitions
    }
}

/// A switch, a dry run (no transition, only the plan), or nothing to do
/// (`unchanged`).
pub fn switched(reply: &pb::TransitionReply) -> Value {
    json!({
        "transition": reply.transition.as_ref().map(transition),
        "plan": reply.plan.as_ref().map(|p| json!({
            "from": p.from_version,
            "to": p.to_version,
            "origin": origin_name(p.origin()),
            "steps": p.steps.iter().map(step_name).collect::<Vec<_>>(),
            "checks": p.checks,
        })),
        "unchanged": reply.unchanged,
    })
}

pub fn status(s: &pb::StatusReply) -> Value {
    let soak = s.soak.as_ref().map(|k| {
        json!({
            "mode": soak_mode_name(k.mode()),
            "version": k.version,
            "remaining_ms": k.remaining_ms,
            "reason": k.reason,
            "attempts": k.attempts,
            "last_error": k.last_error,
        })
    });
    let soak_remaining_ms = s
        .soak
        .as_ref()
        .filter(|k| k.mode() == pb::SoakMode::Soaking)
        .map_or(0, |k| k.remaining_ms);
    json!({
        "active": s.active_version,
        "permanent": s.permanent_version,
        "current": s.current_version,
        "soak_remaining_ms": soak_remaining_ms,
        "soak": soak,
        "running": s.running.as_ref().map(transition),
        "last_event_id": s.last_event_id,
        "store_error": s.store_error,
        "last_checkpoint_ms": s.last_checkpoint_ms,
        "uptime_ms": s.uptime_ms,
        "agent": s.agent.as_ref().map(process),
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

/// One event; `state` is null unless the event is a state change.
pub fn event(e: &pb::Event) -> Value {
    let state = Some(e.state())
        .filter(|s| *s != pb::ReleaseState::Unspecified)
        .map(state_name);
    json!({
        "id": e.id,
        "at_ms": e.at_ms,
        "kind": event_kind_name(e.kind()),
        "version": e.version,
        "state": state,
        "soak_remaining_ms": e.soak_remaining_ms,
        "message": e.message,
        "transition": e.transition.as_ref().map(transition),
    })
}

pub fn info(i: &pb::AgentInfoReply) -> Value {
    json!({
        "agent_version": i.agent_version,
        "abi_versions": i.abi_versions,
        "service": i.service,
        "default_soak_ms": i.default_soak_ms,
        "shutdown_grace_ms": i.shutdown_grace_ms,
        "quiesce_timeout_ms": i.quiesce_timeout_ms,
        "checkpoint_every_ms": i.checkpoint_every_ms,
        "health_timeout_ms": i.health_timeout_ms,
        "max_error_rate": i.max_error_rate,
        "keep_old": i.keep_old,
        "keep_history": i.keep_history,
        "started_at_ms": i.started_at_ms,
        "pid": i.pid,
        "process": i.process.as_ref().map(process),
    })
}

/// The agent's processes (`status`'s `agent`, `info`'s `process`).
pub fn process(p: &pb::AgentProcess) -> Value {
    json!({
        "agent_version": p.agent_version,
        "supervisor_pid": p.supervisor_pid,
        "worker_pid": p.worker_pid,
        "worker_started_at_ms": p.worker_started_at_ms,
        "binary_sha256": p.binary_sha256,
        "previous_exit": p.previous_exit,
    })
}

/// `ctl agent restart`: the agent's answer (`worker_pid` is the worker
/// being replaced); with `--wait` also the handover seen through: the new
/// worker, its binary and how long since the request, in milliseconds.
pub fn agent_restart(
    reply: &pb::RestartAgentReply,
    waited: Option<(&pb::AgentProcess, u64)>,
) -> Value {
    let mut value = json!({
        "worker_pid": reply.worker_pid,
        "supervisor_pid": reply.supervisor_pid,
    });
    if let (Some((new, ms)), Some(object)) = (waited, value.as_object_mut()) {
        object.insert("old_worker_pid".into(), reply.worker_pid.into());
        object.insert("new_worker_pid".into(), new.worker_pid.into());
        object.insert("binary_sha256".into(), new.binary_sha256.clone().into());
        object.insert("ms".into(), ms.into());
    }
    value
}

/// `ctl keygen`: the new key's id and where its two files are.
pub fn keygen(key_id: &str, secret_key: &Path, public_key: &Path) -> Value {
    json!({
        "key_id": key_id,
        "secret_key": secret_key.display().to_string(),
        "public_key": public_key.display().to_string(),
    })
}

/// `ctl sign`: what was signed, by which key, and where the signature is.
pub fn signed(
    manifest: &Manifest,
    library: &Path,
    sha256: &str,
    key_id: &str,
    signature: &Path,
) -> Value {
    json!({
        "name": manifest.name,
        "version": manifest.version.to_string(),
        "library": library.display().to_string(),
        "sha256": sha256,
        "key_id": key_id,
        "signature": signature.display().to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transitions_say_who() {
        let t = pb::Transition {
            identity: "deployer".into(),
            ..Default::default()
        };
        assert_eq!(transition(&t)["identity"], "deployer");
        let e = pb::Event {
            transition: Some(t),
            ..Default::default()
        };
        assert_eq!(event(&e)["transition"]["identity"], "deployer");
    }

    #[test]
    fn the_agent_processes() {
        let p = pb::AgentProcess {
            agent_version: "0.1.0".into(),
            supervisor_pid: 1200,
            worker_pid: 1234,
            worker_started_at_ms: 1_795_000_000_000,
            binary_sha256: "3f2a".into(),
            previous_exit: "was killed by SIGSEGV".into(),
        };
        let s = pb::StatusReply {
            agent: Some(p.clone()),
            ..Default::default()
        };
        assert_eq!(
            status(&s)["agent"],
            json!({
                "agent_version": "0.1.0",
                "supervisor_pid": 1200,
                "worker_pid": 1234,
                "worker_started_at_ms": 1_795_000_000_000_i64,
                "binary_sha256": "3f2a",
                "previous_exit": "was killed by SIGSEGV",
            })
        );
        assert!(status(&pb::StatusReply::default())["agent"].is_null());
        let i = pb::AgentInfoReply {
            process: Some(p),
            ..Default::default()
        };
        assert_eq!(info(&i)["process"]["supervisor_pid"], 1200);
        assert!(info(&pb::AgentInfoReply::default())["process"].is_null());
    }

    #[test]
    fn agent_restarts() {
        let reply = pb::RestartAgentReply {
            worker_pid: 1234,
            supervisor_pid: 1200,
        };
        assert_eq!(
            agent_restart(&reply, None),
            json!({"worker_pid": 1234, "supervisor_pid": 1200})
        );
        let new = pb::AgentProcess {
            worker_pid: 5678,
            binary_sha256: "3f2a".into(),
            ..Default::default()
        };
        assert_eq!(
            agent_restart(&reply, Some((&new, 840))),
            json!({
                "worker_pid": 1234,
                "supervisor_pid": 1200,
                "old_worker_pid": 1234,
                "new_worker_pid": 5678,
                "binary_sha256": "3f2a",
                "ms": 840,
            })
        );
    }
}
