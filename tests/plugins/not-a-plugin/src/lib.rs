//! Test fixture: a perfectly good shared library that is not a nine9s
//! plugin (no `NINE9S_ABI_VERSION`).

#[no_mangle]
pub extern "C" fn add(a: u32, b: u32) -> u32 {
    a.wrapping_add(b)
}
