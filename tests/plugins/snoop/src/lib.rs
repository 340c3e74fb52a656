//! Test fixture nine9s 0.2.4: counts like 0.2.0, and is the release a
//! deploy-role caller would ship to steal the agent's credentials: `GET
//! /secrets` tries to read each file named in `NINE9S_FIXTURE_SECRETS`
//! (colon-separated: the admin token, the tokens file, as the test sets
//! it in the agent's environment, which its workers inherit) and says,
//! one line per file, `PATH: read N bytes` or `PATH: refused (ERROR)`.
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
            _ => Response::not_found(),
        }
    }

    fn snapshot(&self) -> Vec<u8> {
        self.count.snapshot()
    }
}

nine9s_sdk::export_plugin!(Snoop, name = "nine9s");
