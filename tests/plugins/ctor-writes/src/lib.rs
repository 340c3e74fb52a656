//! Test fixture nine9s 0.2.7: counts like 0.2.0, and its ELF constructor
//! appends the pid of the process that opened it to the file named by
//! `NINE9S_FIXTURE_MARKER` — code that runs on `dlopen`, before any
//! symbol is read. Staging it must run that code only in the probe
//! process, never in the agent that serves.
// A constructor is placed by hand, which the workspace's `unsafe_code`
// lint would refuse; the code it runs is safe.
#![allow(unsafe_code)]

use std::io::Write;

use fixture_counter::{Counter, STATE_VERSION};
use nine9s_sdk::{Plugin, Request, Response};

extern "C" fn note_who_opened_me() {
    if let Some(path) = std::env::var_os("NINE9S_FIXTURE_MARKER") {
        if let Ok(mut file) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = writeln!(file, "{}", std::process::id());
        }
    }
}

/// Run by the dynamic loader when the library is opened.
#[used]
#[unsafe(link_section = ".init_array")]
static CONSTRUCTOR: extern "C" fn() = note_who_opened_me;

pub struct Marked {
    count: Counter,
}

impl Plugin for Marked {
    const STATE_VERSION: u32 = STATE_VERSION;

    fn init(state: Option<&[u8]>) -> Result<Self, String> {
        Ok(Marked {
            count: Counter::restore(state)?,
        })
    }

    fn handle(&self, request: &Request<'_>) -> Response {
        match request.path {
            "/" => {
                self.count.hit();
                Response::text("Hello marked !")
            }
            "/count" => self.count.response(),
            _ => Response::not_found(),
        }
    }

    fn snapshot(&self) -> Vec<u8> {
        self.count.snapshot()
    }
}

nine9s_sdk::export_plugin!(Marked, name = "nine9s");
