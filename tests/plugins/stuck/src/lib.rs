//! Test fixture nine9s 0.2.9: counts `GET /` like 0.2.0 (state v1), and
//! `GET /stuck` never returns — a handler caught in a loop. It says
//! nothing of blocking: its calls run on the agent's data-plane threads.
#![forbid(unsafe_code)]

use fixture_counter::{Counter, STATE_VERSION};
use nine9s_sdk::{Plugin, Request, Response};

pub struct Stuck(Counter);

impl Plugin for Stuck {
    const STATE_VERSION: u32 = STATE_VERSION;

    fn init(state: Option<&[u8]>) -> Result<Self, String> {
        Counter::restore(state).map(Stuck)
    }

    fn handle(&self, request: &Request<'_>) -> Response {
        match request.path {
            "/" => {
                self.0.hit();
                Response::text("Hello stuck !")
            }
            "/count" => self.0.response(),
            "/stuck" => loop {
                // Asleep rather than spinning: the test machine's cores
                // are for the tests.
                std::thread::sleep(std::time::Duration::from_secs(1));
            },
            _ => Response::not_found(),
        }
    }

    fn snapshot(&self) -> Vec<u8> {
        self.0.snapshot()
    }
}

nine9s_sdk::export_plugin!(Stuck, name = "nine9s");
