//! The ragchat binary: the command line is `cli` (serve, migrate, create-user, seed,
//! eval, bench), and the hidden `__extract-pdf` that reads one PDF in a child process.

mod cli;

/// jemalloc as the binary's allocator (feature `jemalloc`, on by default): its
/// size classes keep a long-running server's heap from fragmenting the way glibc's
/// arenas do, and pages freed for `dirty_decay_ms` go back to the system (a
/// background thread purges them), so memory follows what the server holds.
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read at its start (`_RJEM_MALLOC_CONF` in the environment
/// overrides them): purge unused dirty pages after a second by a background thread;
/// no "muzzy" stage (pages are returned, not kept lazily); no separate arena for
/// blocks over 8 MiB (it purges them at once, so a forward's large activations
/// would fault their pages in again on every prompt). Model speed against glibc:
/// `scripts/bench-allocator` (BENCHMARKS.md); thread caches for blocks up to 4 MiB
/// (`tcache_max:4194304`) win back most of the prefill but hold ~13 MiB more after
/// an upload, past the memory bound of tests/api/memory.rs.
#[cfg(feature = "jemalloc")]
#[allow(non_upper_case_globals)]
#[export_name = "_rjem_malloc_conf"]
pub static malloc_conf: &[u8] = b"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0,oversize_threshold:0\0";

fn main() -> std::process::ExitCode {
    // The PDF reader's child process (see `knowledge::pdf`): before any runtime or
    // thread, so its resource limits cover all it does.
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == ragchat::knowledge::pdf::SUBCOMMAND)
    {
        let rest: Vec<String> = std::env::args_os()
            .skip(2)
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        return ragchat::knowledge::pdf::child_main(&rest);
    }
    actix_web::rt::System::new().block_on(cli::main())
}
