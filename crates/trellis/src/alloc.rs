//! The process allocator: jemalloc, set up to give memory back to the OS.
//!
//! glibc's malloc kept a sidecar that had held 2,000 idle inbound TLS connections at 44.7 MiB
//! after they had all closed (12.1 MiB before): freed chunks stay in its arenas unless they
//! border the top of the heap, and returning them needs `malloc_trim`, which this workspace
//! cannot call (`unsafe_code` is forbidden). jemalloc (which ztunnel moved to for the same
//! reason) purges unused pages on its own. It serves the Rust allocations (every per-connection
//! buffer of h2, hyper, rustls and tonic); the C code in the process (aws-lc, SQLite) keeps
//! glibc's `malloc`. Not `unprefixed_malloc_on_supported_platforms`: a jemalloc that is also
//! the process's `malloc` deadlocks under libfaketime (its initialisation calls
//! `clock_gettime`, which libfaketime intercepts and initialises itself with `dlsym`, which
//! allocates; libfaketime issue #130), and the clock-skew tests run the binary under
//! `faketime`. docs/benchmarks.md ("Memory") has the figures.
//!
//! The defaults are compiled in from `.cargo/config.toml` (`JEMALLOC_SYS_WITH_MALLOC_CONF`):
//! `background_thread:true` (a jemalloc thread purges while the process is idle, so RSS falls
//! after a burst without waiting for the next allocation), `dirty_decay_ms:1000` (freed pages
//! are handed back after about a second instead of ten), `muzzy_decay_ms:0` (pages are
//! released with `MADV_DONTNEED`, which lowers RSS at once, not `MADV_FREE`, which only does
//! so under memory pressure) and `narenas:2` (each arena keeps its own free pages; a sidecar
//! runs on one thread and the control plane's work is not allocator-bound). The
//! `_RJEM_MALLOC_CONF` environment variable (jemalloc's `MALLOC_CONF` under its prefixed
//! symbols) overrides any of them at run time.

/// Every allocation of the binary goes through jemalloc.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// The options jemalloc was built with, or `None` when the build did not set them (a build
/// that bypassed `.cargo/config.toml`); logged at start so such a build is noticed.
pub fn compiled_options() -> Option<&'static str> {
    tikv_jemalloc_ctl::config::malloc_conf::read()
        .ok()
        .filter(|c| !c.is_empty())
}

/// Logs the options jemalloc runs with, and warns when a build went without them.
pub fn log_options() {
    match compiled_options() {
        Some(options) => tracing::debug!(options, "jemalloc"),
        None => tracing::warn!(
            "jemalloc was built without the options in .cargo/config.toml: memory freed after a burst may not return to the OS"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jemalloc_is_built_to_return_memory() {
        let conf =
            compiled_options().expect("JEMALLOC_SYS_WITH_MALLOC_CONF from .cargo/config.toml");
        for option in [
            "background_thread:true",
            "muzzy_decay_ms:0",
            "dirty_decay_ms:",
        ] {
            assert!(conf.contains(option), "{option} missing from `{conf}`");
        }
        assert_eq!(
            tikv_jemalloc_ctl::opt::background_thread::read().ok(),
            Some(true)
        );
    }
}
