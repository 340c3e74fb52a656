//! Test fixture: a library that exports the nine9s ABI symbol with a
//! version no agent speaks. The agent must refuse it without calling it.
// Stands for foreign code that is not built with the SDK: it exports a
// symbol by hand, which the workspace's `unsafe_code` lint would refuse.
#![allow(unsafe_code)]

/// Read by the host as data; never a real ABI.
#[no_mangle]
pub static NINE9S_ABI_VERSION: u32 = 999;
