//! Test fixture nine9s 0.2.3: counts like 0.2.0, and while
//! `NINE9S_FIXTURE_DAEMON` names a process, its ELF constructor leaves a
//! daemon of that name behind — forked twice, in a session of its own,
//! holding the opener's stdout — which writes up to 50 files of 1 MiB
//! into the directory `NINE9S_FIXTURE_FILES` names, then sleeps 30 s.
//! The constructor itself returns at once: the library opens fine. What
//! opens it must contain all of that.
// A constructor is placed by hand and forks, which the workspace's
// `unsafe_code` lint would refuse.
#![allow(unsafe_code)]

use fixture_counter::{Counter, STATE_VERSION};
use nine9s_sdk::{Plugin, Request, Response};

extern "C" fn leave_a_daemon() {
    let Some(name) = std::env::var("NINE9S_FIXTURE_DAEMON").ok() else {
        return;
    };
    // SAFETY: the opener is the single-threaded probe (the test only
    // stages this release); each side of a fork runs only this code.
    unsafe {
        let first = libc::fork();
        if first != 0 {
            if first > 0 {
                libc::waitpid(first, std::ptr::null_mut(), 0);
            }
            return;
        }
        libc::setsid();
        if libc::fork() != 0 {
            libc::_exit(0);
        }
        let mut comm = name.into_bytes();
        comm.truncate(15);
        comm.push(0);
        libc::prctl(libc::PR_SET_NAME, comm.as_ptr());
    }
    if let Some(dir) = std::env::var_os("NINE9S_FIXTURE_FILES") {
        let block = vec![b'x'; 1024 * 1024];
        for i in 0..50 {
            let _ = std::fs::write(std::path::Path::new(&dir).join(format!("f{i}")), &block);
        }
    }
    std::thread::sleep(std::time::Duration::from_secs(30));
    // SAFETY: ends this forked process without running the opener's exit code.
    unsafe { libc::_exit(0) };
}

/// Run by the dynamic loader when the library is opened.
#[used]
#[unsafe(link_section = ".init_array")]
static CONSTRUCTOR: extern "C" fn() = leave_a_daemon;

pub struct Daemonic {
    count: Counter,
}

impl Plugin for Daemonic {
    const STATE_VERSION: u32 = STATE_VERSION;

    fn init(state: Option<&[u8]>) -> Result<Self, String> {
        Ok(Daemonic {
            count: Counter::restore(state)?,
        })
    }

    fn handle(&self, request: &Request<'_>) -> Response {
        match request.path {
            "/" => {
                self.count.hit();
                Response::text("Hello daemon !")
            }
            "/count" => self.count.response(),
            _ => Response::not_found(),
        }
    }

    fn snapshot(&self) -> Vec<u8> {
        self.count.snapshot()
    }
}

nine9s_sdk::export_plugin!(Daemonic, name = "nine9s");
