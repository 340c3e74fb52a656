//! Test fixture nine9s 0.4.2: what ABI v2 gives a plugin.
//! - `GET /echo` answers every request header as a response header
//!   `x-echo-NAME` whose value is the request value's bytes in hex
//!   (non-UTF-8 included), and the number of headers named `x-repeat` in
//!   `x-repeat-count`;
//! - `GET /cookies` sets two cookies (one header name, twice) and a
//!   `cache-control`; `GET /moved` redirects with a `location`;
//! - `GET /status?code=N` answers status N, whatever it is (101 and 999
//!   included: the agent must not pass those on);
//! - it logs through the agent when it starts and stops, with the time its
//!   instance lived on the agent's monotonic clock;
//! - each instance starts a ticker thread and joins it in `stop`; a thread
//!   left running after the unload would crash the agent.
//!
//! `/` and `/count` count like 0.2.0 (state v1).
#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use fixture_counter::{Counter, STATE_VERSION};
use nine9s_sdk::{Plugin, Request, Response};

pub struct Headers {
    count: Counter,
    started: Duration,
    ticking: Arc<AtomicBool>,
    ticker: Mutex<Option<JoinHandle<()>>>,
}

impl Plugin for Headers {
    const STATE_VERSION: u32 = STATE_VERSION;

    fn init(state: Option<&[u8]>) -> Result<Self, String> {
        let ticking = Arc::new(AtomicBool::new(true));
        let flag = Arc::clone(&ticking);
        let ticker = std::thread::spawn(move || {
            while flag.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        nine9s_sdk::info!("headers fixture started its ticker thread");
        Ok(Headers {
            count: Counter::restore(state)?,
            started: nine9s_sdk::host::monotonic(),
            ticking,
            ticker: Mutex::new(Some(ticker)),
        })
    }

    fn handle(&self, request: &Request<'_>) -> Response {
        match request.path {
            "/" => {
                self.count.hit();
                Response::text("Hello world 2 !")
            }
            "/count" => self.count.response(),
            "/echo" => {
                let mut response = Response::text("echo").header(
                    "x-repeat-count",
                    request.headers.get_all("x-repeat").count().to_string(),
                );
                for (name, value) in request.headers.iter() {
                    let name = format!("x-echo-{}", String::from_utf8_lossy(name));
                    let hex: String = value.iter().map(|b| format!("{b:02x}")).collect();
                    response = response.header(name, hex);
                }
                response
            }
            "/cookies" => Response::text("cookies")
                .header("set-cookie", "a=1; Path=/")
                .header("set-cookie", "b=2; Path=/")
                .header("cache-control", "no-store"),
            "/moved" => Response::redirect(308, "/count"),
            "/status" => {
                let code = request
                    .query
                    .strip_prefix("code=")
                    .and_then(|c| c.parse().ok())
                    .unwrap_or(200);
                Response::with_status(code, "status")
            }
            _ => Response::not_found(),
        }
    }

    fn snapshot(&self) -> Vec<u8> {
        self.count.snapshot()
    }

    fn stop(&self) -> Result<(), String> {
        self.ticking.store(false, Ordering::Relaxed);
        let ticker = self.ticker.lock().map_err(|e| e.to_string())?.take();
        if let Some(ticker) = ticker {
            ticker.join().map_err(|_| "the ticker thread panicked")?;
        }
        let lived = nine9s_sdk::host::monotonic().saturating_sub(self.started);
        nine9s_sdk::info!("headers fixture joined its ticker thread after {lived:?}");
        Ok(())
    }
}

nine9s_sdk::export_plugin!(Headers, name = "nine9s");
