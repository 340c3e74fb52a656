//! Test fixture: a library whose ELF constructor starts a long-lived child
//! process that inherits (and so holds open) the opener's stdout, then
//! never returns. The agent's probe must give up after its time limit,
//! take the child down with it, and never wait on that stdout.
// A constructor is placed by hand, which the workspace's `unsafe_code`
// lint would refuse; the code it runs is safe.
#![allow(unsafe_code)]

extern "C" fn hang() {
    let _child = std::process::Command::new("sleep").arg("3599").spawn();
    loop {
        std::thread::sleep(std::time::Duration::from_secs(60));
    }
}

/// Run by the dynamic loader when the library is opened.
#[used]
#[unsafe(link_section = ".init_array")]
static CONSTRUCTOR: extern "C" fn() = hang;
