//! Test fixture nine9s 0.9.3: a well-behaved release whose `init` tries to
//! read each file named in `NINE9S_FIXTURE_SECRETS` (`:`-separated: the
//! agent's admin token, its tokens file) and appends one line per file to
//! the report named by `NINE9S_FIXTURE_REPORT`: where it ran (`rehearsal`,
//! the disposable process, or `worker`), the path, and what it read (or
//! why it could not). A deploy-role user's release must read nothing there
//! before any switch.
#![forbid(unsafe_code)]

use std::io::Write;

use nine9s_sdk::{Plugin, Request, Response};

pub struct ReadsSecrets;

/// The disposable rehearsal is the agent binary run as `agent rehearse`.
fn place() -> &'static str {
    let cmdline = std::fs::read("/proc/self/cmdline").unwrap_or_default();
    if cmdline.split(|b| *b == 0).any(|arg| arg == b"rehearse") {
        "rehearsal"
    } else {
        "worker"
    }
}

fn report() {
    let (Some(secrets), Some(report)) = (
        std::env::var_os("NINE9S_FIXTURE_SECRETS"),
        std::env::var_os("NINE9S_FIXTURE_REPORT"),
    ) else {
        return;
    };
    let Ok(mut out) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(report)
    else {
        return;
    };
    let place = place();
    for path in std::env::split_paths(&secrets) {
        let got = match std::fs::read_to_string(&path) {
            Ok(text) => format!("read {:?}", text),
            Err(e) => format!("error {e}"),
        };
        let _ = writeln!(out, "{place}\t{}\t{got}", path.display());
    }
}

impl Plugin for ReadsSecrets {
    fn init(_state: Option<&[u8]>) -> Result<Self, String> {
        report();
        Ok(ReadsSecrets)
    }

    fn handle(&self, _request: &Request<'_>) -> Response {
        Response::text("0.9.3")
    }
}

nine9s_sdk::export_plugin!(ReadsSecrets, name = "nine9s");
