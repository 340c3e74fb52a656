//! Test fixture: a perfectly good shared library that is not a nine9s
//! plugin (no `NINE9S_ABI_VERSION`).
// Stands for foreign code that is not built with the SDK: it exports a
// symbol by hand, which the workspace's `unsafe_code` lint would refuse.
#![allow(unsafe_code)]

#[no_mangle]
pub extern "C" fn add(a: u32, b: u32) -> u32 {
    a.wrapping_add(b)
}
