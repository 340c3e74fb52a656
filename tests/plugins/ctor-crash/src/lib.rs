//! Test fixture: a library whose ELF constructor writes through a null
//! pointer, so `dlopen` itself kills the process that opens it — before
//! anyone could read a symbol. The agent must only ever open it in its
//! throwaway probe process.
// Stands for hostile native code: a hand-placed constructor and a null
// write, which the workspace's `unsafe_code` lint would refuse.
#![allow(unsafe_code)]

extern "C" fn crash() {
    // SAFETY: none; this is the crash the fixture exists for.
    unsafe { std::ptr::null_mut::<u8>().write_volatile(1) };
}

/// Run by the dynamic loader when the library is opened.
#[used]
#[unsafe(link_section = ".init_array")]
static CONSTRUCTOR: extern "C" fn() = crash;
