//! The allocator's part in keeping memory proportional to what is stored.
//!
//! The binary allocates with jemalloc (feature `jemalloc`, on by default; options
//! in `main.rs`): size-class slabs, and dirty pages purged after a second by a
//! background thread, so what a request or a deleted document freed goes back to
//! the system. glibc malloc still serves the C libraries (SQLite, the PDF child's
//! parser), and the whole process in a build without the feature.
//!
//! For glibc, `configure` bounds the arenas and fixes the thresholds at start
//! (`[memory]` in the configuration): each thread arena (up to 8 per core) keeps
//! its free pages, and after the first large block is freed glibc raises its mmap
//! threshold (up to 32 MiB), so large temporary buffers then come from the arenas
//! and stay there. Even so, glibc's heap grows by MiBs per request kind and gives
//! little back after deletes (BENCHMARKS.md, "Memory per request").

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
