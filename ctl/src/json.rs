//! `--output json`: every reply as one JSON document on stdout (one per
//! line for `watch`), for scripts. A reply of the agent is its proto
//! message as `nine9s-proto` serializes it (proto field names, numbers as
//! numbers, enums as the lower-case name of their value, times — epoch
//! milliseconds in the API — as RFC 3339 UTC strings under the name
//! without `_ms`, `null` for none): the document a
//! script reads is the API's own message, never a hand-made copy. What
//! ctl makes itself (keys, signatures, errors, a restart's wait, a
//! rollout's report) is described where it is made.

use std::path::Path;

use nine9s_manifest::Manifest;
use nine9s_proto as pb;
use serde::Serialize;
use serde_json::{json, Value};

/// Prints one document.
pub fn print<T: Serialize + ?Sized>(value: &T) {
    match serde_json::to_string(value) {
        Ok(text) => outln!("{text}"),
        // Only a map with non-string keys fails, and no reply has one.
        Err(e) => eprintln!("ctl: error: cannot write JSON: {e}"),
    }
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

/// `ctl agent restart`: the agent's answer (`worker_pid` is the worker
/// being replaced); with `--wait` also the handover seen through.
#[derive(Serialize)]
pub struct AgentRestart<'a> {
    #[serde(flatten)]
    pub reply: &'a pb::RestartAgentReply,
    /// With `--wait`: the new worker, and how long since the request.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub new_worker: Option<&'a pb::AgentProcess>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waited_ms: Option<u64>,
}

/// `ctl keygen`: the new key's id and where its two files are.
pub fn keygen(key_id: &str, secret_key: &Path, public_key: &Path) -> Value {
    json!({
        "key_id": key_id,
        "secret_key": secret_key.display().to_string(),
        "public_key": public_key.display().to_string(),
    })
}

/// `ctl new`: the crate written, where, on which SDK.
pub fn created<'a>(
    name: &str,
    version: &str,
    dir: &Path,
    sdk: &Path,
    files: impl Iterator<Item = &'a str>,
) -> Value {
    json!({
        "name": name,
        "version": version,
        "dir": dir.display().to_string(),
        "sdk": sdk.display().to_string(),
        "files": files.collect::<Vec<_>>(),
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
    fn a_restart_with_and_without_its_wait() {
        let reply = pb::RestartAgentReply {
            worker_pid: 1234,
            supervisor_pid: 1200,
        };
        let plain = AgentRestart {
            reply: &reply,
            new_worker: None,
            waited_ms: None,
        };
        assert_eq!(
            serde_json::to_value(&plain).unwrap(),
            json!({"worker_pid": 1234, "supervisor_pid": 1200})
        );
        let new = pb::AgentProcess {
            worker_pid: 5678,
            binary_sha256: "3f2a".into(),
            ..Default::default()
        };
        let waited = AgentRestart {
            new_worker: Some(&new),
            waited_ms: Some(840),
            ..plain
        };
        let value = serde_json::to_value(&waited).unwrap();
        assert_eq!(value["new_worker"]["worker_pid"], 5678);
        assert_eq!(value["new_worker"]["binary_sha256"], "3f2a");
        assert_eq!(value["waited_ms"], 840);
    }
}
