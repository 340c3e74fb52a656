//! Test fixture nine9s 0.2.8: counts like 0.2.0 (state v1), but `GET
//! /crash` writes through a null pointer — a segfault no `catch_unwind`
//! contains, which kills the worker serving it — and so does `init` while
//! the file named by `NINE9S_FIXTURE_CRASH_FILE` exists (a release that
//! cannot start any more), and while the file named by
//! `NINE9S_FIXTURE_CRASH_PID_FILE` holds the pid of the process running it
//! (a release that crashes in the serving worker but behaved in the
//! disposable rehearsal, another process). While the file named by
//! `NINE9S_FIXTURE_SLOW_INIT_FILE` exists, `init` waits (a slow start),
//! after creating that path with `.entered` appended. After `GET
//! /break-snapshot`, the instance's `snapshot` panics (its state can no
//! longer be saved); after `GET /slow-snapshot?ms=N`, it takes N ms.
// Stands for a release with a memory bug: the null write needs `unsafe`,
// which the workspace's lint would refuse.
#![allow(unsafe_code)]

use fixture_counter::{Counter, STATE_VERSION};
use nine9s_sdk::{Plugin, Request, Response};

fn segfault() {
    // SAFETY: none; this is the crash the fixture exists for.
    unsafe { std::ptr::null_mut::<u8>().write_volatile(1) };
}

pub struct Segfault {
    count: Counter,
    snapshot_broken: std::sync::atomic::AtomicBool,
    snapshot_ms: std::sync::atomic::AtomicU64,
}

impl Plugin for Segfault {
    const STATE_VERSION: u32 = STATE_VERSION;

    fn init(state: Option<&[u8]>) -> Result<Self, String> {
        if std::env::var_os("NINE9S_FIXTURE_CRASH_FILE")
            .is_some_and(|path| std::path::Path::new(&path).exists())
        {
            segfault();
        }
        if std::env::var_os("NINE9S_FIXTURE_CRASH_PID_FILE")
            .and_then(|path| std::fs::read_to_string(path).ok())
            .is_some_and(|pid| pid.trim() == std::process::id().to_string())
        {
            segfault();
        }
        if let Some(path) = std::env::var_os("NINE9S_FIXTURE_SLOW_INIT_FILE") {
            let path = std::path::PathBuf::from(path);
            if path.exists() {
                let mut entered = path.clone().into_os_string();
                entered.push(".entered");
                std::fs::write(entered, b"").map_err(|e| e.to_string())?;
                while path.exists() {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
            }
        }
        Ok(Segfault {
            count: Counter::restore(state)?,
            snapshot_broken: Default::default(),
            snapshot_ms: Default::default(),
        })
    }

    fn handle(&self, request: &Request<'_>) -> Response {
        match request.path {
            "/" => {
                self.count.hit();
                Response::text("Hello segfault !")
            }
            "/count" => self.count.response(),
            "/break-snapshot" => {
                self.snapshot_broken
                    .store(true, std::sync::atomic::Ordering::SeqCst);
                Response::text("its snapshot fails from now on")
            }
            "/slow-snapshot" => {
                let ms = request
                    .query
                    .strip_prefix("ms=")
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0);
                self.snapshot_ms
                    .store(ms, std::sync::atomic::Ordering::SeqCst);
                Response::text(format!("its snapshot takes {ms} ms from now on"))
            }
            "/crash" => {
                segfault();
                Response::text("unreachable")
            }
            _ => Response::not_found(),
        }
    }

    fn snapshot(&self) -> Vec<u8> {
        if self
            .snapshot_broken
            .load(std::sync::atomic::Ordering::SeqCst)
        {
            panic!("deliberate panic in the snapshot of 0.2.8");
        }
        let ms = self.snapshot_ms.load(std::sync::atomic::Ordering::SeqCst);
        std::thread::sleep(std::time::Duration::from_millis(ms));
        self.count.snapshot()
    }
}

nine9s_sdk::export_plugin!(Segfault, name = "nine9s");
