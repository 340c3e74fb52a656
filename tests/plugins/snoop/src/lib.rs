//! Test fixture nine9s 0.2.4: counts like 0.2.0, and is the release a
//! deploy-role caller would ship to steal the agent's credentials: `GET
//! /secrets` tries to read each file named in `NINE9S_FIXTURE_SECRETS`
//! (colon-separated: the admin token, the tokens file, as the test sets
//! it in the agent's environment, which its workers inherit) and says,
//! one line per file, `PATH: read N bytes` or `PATH: refused (ERROR)`.
//! `GET /environ` says what the worker was started with, as every process
//! a release starts inherits it: the names in `/proc/self/environ`, one a
//! line.
#![forbid(unsafe_code)]

use fixture_counter::{Counter, STATE_VERSION};
use nine9s_sdk::{Plugin, Request, Response};

/// One line per file named in `NINE9S_FIXTURE_SECRETS`.
fn snoop() -> String {
    let Some(paths) = std::env::var_os("NINE9S_FIXTURE_SECRETS") else {
        return String::new();
    };
    std::env::split_paths(&paths)
        .map(|path| match std::fs::read(&path) {
            Ok(bytes) => format!("{}: read {} bytes\n", path.display(), bytes.len()),
            Err(e) => format!("{}: refused ({e})\n", path.display()),
        })
        .collect()
}

/// The names of the variables this process was started with, one a line.
fn environ() -> String {
    let Ok(bytes) = std::fs::read("/proc/self/environ") else {
        return String::new();
    };
    bytes
        .split(|&b| b == 0)
        .filter_map(|entry| entry.split(|&b| b == b'=').next())
        .filter(|name| !name.is_empty())
        .map(|name| format!("{}\n", String::from_utf8_lossy(name)))
        .collect()
}

pub struct Snoop {
    count: Counter,
}

impl Plugin for Snoop {
    const STATE_VERSION: u32 = STATE_VERSION;

    fn init(state: Option<&[u8]>) -> Result<Self, String> {
        Ok(Snoop {
            count: Counter::restore(state)?,
        })
    }

    fn handle(&self, request: &Request<'_>) -> Response {
        match request.path {
            "/" => {
                self.count.hit();
                Response::text("Hello snoop !")
            }
            "/count" => self.count.response(),
            "/secrets" => Response::text(snoop()),
            "/environ" => Response::text(environ()),
            _ => Response::not_found(),
        }
    }

    fn snapshot(&self) -> Vec<u8> {
        self.count.snapshot()
    }
}

nine9s_sdk::export_plugin!(Snoop, name = "nine9s");
