//! The allocator's part in keeping memory proportional to what is stored.
//!
//! glibc's malloc keeps what a process frees: each thread arena (up to 8 per
//! core) holds its free pages, and after the first large block is freed it raises
//! its mmap threshold (up to 32 MiB), so the large temporary buffers of an
//! embedding batch or a parsed upload then come from the arenas and stay there.
//! At start `configure` bounds the arenas and fixes the thresholds (`[memory]`
//! in the configuration). Elsewhere it does nothing.
//!
//! Not done: `malloc_trim` after documents were stored or deleted. Tried (on a
//! thread of its own, at most once a second), the debug server of
//! tests/api/memory.rs exited without a message during a batch of uploads once
//! in two runs; without it the run passed. `trim` is kept for a caller that
//! measures it (the figures are in BENCHMARKS.md).

use crate::config::MemorySettings;

#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod glibc {
    /// `mallopt(param, value)`; false when glibc refused it.
    pub fn set(param: libc::c_int, value: usize) -> bool {
        let Ok(value) = libc::c_int::try_from(value) else {
            return false;
        };
        // SAFETY: mallopt only changes allocator parameters; any value is checked by glibc.
        unsafe { libc::mallopt(param, value) == 1 }
    }

    pub fn trim() {
        // SAFETY: malloc_trim walks the allocator's own free lists; no pointers of ours.
        unsafe {
            libc::malloc_trim(0);
        }
    }

    pub use libc::{M_ARENA_MAX, M_MMAP_THRESHOLD, M_TRIM_THRESHOLD};
}

/// Applies `[memory]` to the allocator (a value of 0 leaves glibc's default).
pub fn configure(m: &MemorySettings) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        for (name, param, value) in [
            ("malloc_arena_max", glibc::M_ARENA_MAX, m.malloc_arena_max),
            (
                "malloc_mmap_threshold",
                glibc::M_MMAP_THRESHOLD,
                m.malloc_mmap_threshold,
            ),
            (
                "malloc_trim_threshold",
                glibc::M_TRIM_THRESHOLD,
                m.malloc_trim_threshold,
            ),
        ] {
            if value > 0 && !glibc::set(param, value) {
                tracing::warn!(setting = name, value, "the allocator refused this memory setting");
            }
        }
    }
}

/// Hands free pages of every arena back to the system now.
pub fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    glibc::trim();
}
