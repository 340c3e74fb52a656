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
//!
//! Large blocks (request bodies of megabytes) are a second leak of the same
//! kind: glibc raises its mmap threshold each time such a block is freed,
//! so later ones come from the arena, whose freed middle it never gives
//! back. A fixed threshold keeps them mapped on their own and unmapped when
//! freed: after 40 concurrent 16 MiB bodies the worker's resident size went
//! from 49 MiB to 182 MiB with glibc's moving threshold, to 56 MiB with a
//! fixed 1 MiB one (debug build).

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

/// Serves allocations of `bytes` or more with a mapping of their own,
/// returned to the system when freed, and stops glibc from raising that
/// threshold as it otherwise does. Call it first thing in `main`.
/// Returns false if the allocator refused (or is not glibc's).
pub fn unmap_large_blocks(bytes: i32) -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only sets a tuning parameter of glibc's
        // allocator; it is thread-safe, and M_MMAP_THRESHOLD only decides
        // how later allocations are served (blocks already allocated are
        // freed the way they were made).
        unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, bytes) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        let _ = bytes;
        false
    }
}
