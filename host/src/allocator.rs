//! Keeping the host process's memory flat across thousands of switches.
//!
//! glibc gives each thread that allocates its own malloc arena, up to eight
//! per core, and never returns their fragmented pages. Library loads,
//! migrations and store writes run on whichever blocking thread tokio hands
//! out, so over many upgrades every arena ends up holding freed memory.
//! Capping the number of arenas trades a little allocator contention (per-
//! thread caches absorb most of it) for a resident size that stays flatter:
//! over 1,000 switches under load, `nine9s-bench` measured 3.4-6.0 MiB of
//! growth with eight arenas, 2.5-4.2 with two and 0.7-3.3 with one.

/// Caps the number of glibc malloc arenas. Call it first thing in `main`.
/// Returns false if the allocator refused (or is not glibc's).
pub fn limit_malloc_arenas(arenas: i32) -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only sets a tuning parameter of glibc's
        // allocator; it is thread-safe and M_ARENA_MAX only affects arenas
        // created after the call.
        unsafe { libc::mallopt(libc::M_ARENA_MAX, arenas) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        let _ = arenas;
        false
    }
}
