//! Test fixture nine9s 0.2.8: counts like 0.2.0 (state v1), but `GET
//! /crash` writes through a null pointer — a segfault no `catch_unwind`
//! contains, which kills the worker serving it — and so does `init` while
//! the file named by `NINE9S_FIXTURE_CRASH_FILE` exists (a release that
//! cannot start any more).
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
}

impl Plugin for Segfault {
    const STATE_VERSION: u32 = STATE_VERSION;

    fn init(state: Option<&[u8]>) -> Result<Self, String> {
        if std::env::var_os("NINE9S_FIXTURE_CRASH_FILE")
            .is_some_and(|path| std::path::Path::new(&path).exists())
        {
            segfault();
        }
        Ok(Segfault {
            count: Counter::restore(state)?,
        })
    }

    fn handle(&self, request: &Request<'_>) -> Response {
        match request.path {
            "/" => {
                self.count.hit();
                Response::text("Hello segfault !")
            }
            "/count" => self.count.response(),
            "/crash" => {
                segfault();
                Response::text("unreachable")
            }
            _ => Response::not_found(),
        }
    }

    fn snapshot(&self) -> Vec<u8> {
        self.count.snapshot()
    }
}

nine9s_sdk::export_plugin!(Segfault, name = "nine9s");
