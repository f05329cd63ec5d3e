//! The process allocator: jemalloc, set up to give memory back to the OS.
//!
//! glibc's malloc kept a sidecar that had held 2,000 idle inbound TLS connections at 44.7 MiB
//! after they had all closed (12.1 MiB before): freed chunks stay in its arenas unless they
//! border the top of the heap. jemalloc (which ztunnel moved to for the same reason) purges
//! unused pages on its own. It serves the Rust allocations (every per-connection buffer of h2,
//! hyper, rustls and tonic); the C code in the process (aws-lc, SQLite) keeps glibc's `malloc`.
//! Not `unprefixed_malloc_on_supported_platforms`: a jemalloc that is also the process's
//! `malloc` deadlocks under libfaketime (its initialisation calls `clock_gettime`, which
//! libfaketime intercepts and initialises itself with `dlsym`, which allocates; libfaketime
//! issue #130), and the clock-skew tests run the binary under `faketime`. docs/benchmarks.md
//! ("Memory") has the figures.
//!
//! aws-lc's share is small but not nothing: every TLS connection holds its two record keys
//! (592 bytes each) in glibc's heap, so a burst of 2,000 connections grows that heap by
//! ~2.4 MiB, and once they close it stays, fragmented below a chunk still in use at its top.
//! [`return_freed_c_heap`] hands such pages back with `malloc_trim` when glibc holds more
//! than [`TRIM_ABOVE`] free. That call and `mallinfo2`, which decides when, are the only
//! `unsafe` of the workspace's own code outside tests (tests/run.sh checks): neither takes a
//! pointer, and glibc locks each arena around them. glibc 2.33 has `mallinfo2`; the binary
//! already needs 2.34.
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

/// Free bytes in glibc's heap above which [`return_freed_c_heap`] trims it: a few handshakes'
/// worth of churn stays, a burst's worth goes back.
const TRIM_ABOVE: usize = 1024 * 1024;

/// How often [`return_freed_c_heap`] looks at glibc's heap.
const TRIM_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// Whether this build can trim glibc's heap (other C libraries return memory on their own, or
/// offer no such call).
const TRIMS: bool = cfg!(all(target_os = "linux", target_env = "gnu"));

/// Every [`TRIM_EVERY`], returns glibc's free heap pages to the OS when they amount to more
/// than [`TRIM_ABOVE`]; runs until its task is dropped, or returns at once off glibc.
///
/// Pages already handed back still count as free, so after a burst this trims on every tick
/// (one `madvise` over pages mostly already gone, ~30 µs) rather than guess from glibc's
/// counters whether the pages were used again in between; it logs only when more is free.
pub async fn return_freed_c_heap() {
    if !TRIMS {
        return;
    }
    let mut every = tokio::time::interval(TRIM_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut logged = 0;
    loop {
        every.tick().await;
        if let Some(free) = trim_c_heap(TRIM_ABOVE) {
            if free > logged + TRIM_ABOVE / 16 {
                tracing::debug!(
                    free_kib = free / 1024,
                    "handed glibc's free heap pages back"
                );
            }
            logged = free;
        }
    }
}

/// Trims glibc's heap when more than `above` bytes of it are free: `Some(free bytes)` when it
/// did, `None` when too little was free.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn trim_c_heap(above: usize) -> Option<usize> {
    // SAFETY: neither call takes a pointer or leaves state for the caller; glibc locks each
    // arena while it walks it, so other threads may allocate meanwhile (they wait).
    let free = unsafe { libc::mallinfo2() }.fordblks;
    (free > above).then(|| {
        // SAFETY: as above. Its result (whether any `madvise` ran) says nothing about RSS.
        unsafe { libc::malloc_trim(0) };
        free
    })
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim_c_heap(_above: usize) -> Option<usize> {
    None
}

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

    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    #[allow(unsafe_code)]
    fn freed_c_heap_above_the_threshold_goes_back() {
        // A burst's shape: 64 chunks of 32 KiB (below glibc's mmap threshold, so from its
        // heap), written so their pages are resident, then all freed but one allocated after
        // them (100 KiB, larger than any hole an earlier test could have left), which keeps
        // the freed ones from being cut off the heap's top by `free` itself.
        const CHUNK: usize = 32 * 1024;
        // SAFETY: each pointer comes from malloc, is checked, written within its size and
        // freed once.
        let chunks: Vec<*mut u8> = (0..64)
            .map(|_| unsafe { libc::malloc(CHUNK) }.cast::<u8>())
            .collect();
        let pin = unsafe { libc::malloc(100 * 1024) }.cast::<u8>();
        assert!(!pin.is_null() && chunks.iter().all(|p| !p.is_null()));
        assert!(
            chunks.iter().all(|&p| p < pin),
            "the pin is not above the chunks: glibc reused a hole; the test cannot tell"
        );
        for &p in &chunks {
            unsafe { std::ptr::write_bytes(p, 1, CHUNK) };
        }
        for &p in &chunks {
            unsafe { libc::free(p.cast()) };
        }
        // The mapping that holds the chunks only: other tests run meanwhile, and what they
        // allocate elsewhere made the process's RSS an unreliable yardstick.
        let at = chunks[0] as usize;
        let before = resident_kib_around(at);
        let free = trim_c_heap(TRIM_ABOVE);
        let returned = before.saturating_sub(resident_kib_around(at));
        unsafe { libc::free(pin.cast()) };
        assert!(free.is_some_and(|f| f >= 64 * CHUNK), "free: {free:?}");
        assert!(
            returned >= 1024,
            "only {returned} KiB went back of 2 MiB freed"
        );
    }

    /// Resident KiB of the mapping of this process that holds `addr` (glibc's heap, or the
    /// heap of the arena the calling thread allocates from).
    fn resident_kib_around(addr: usize) -> usize {
        let smaps = std::fs::read_to_string("/proc/self/smaps").expect("smaps");
        let mut inside = false;
        for line in smaps.lines() {
            let first = line.split_whitespace().next().unwrap_or("");
            if let Some((lo, hi)) = first.split_once('-') {
                if let (Ok(lo), Ok(hi)) =
                    (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
                {
                    inside = lo <= addr && addr < hi;
                    continue;
                }
            }
            if inside {
                if let Some(v) = line.strip_prefix("Rss:") {
                    return v
                        .trim()
                        .trim_end_matches("kB")
                        .trim()
                        .parse()
                        .expect("an Rss value");
                }
            }
        }
        panic!("no mapping holds {addr:#x}")
    }
}
