//! Records the git commit the binary is built from, for `trellis_build_info{commit}` and
//! `trellis --version`. `TRELLIS_BUILD_COMMIT` wins (the Docker build has no `.git`); else
//! `git rev-parse`; else `unknown`. Never fails the build.
//!
//! Also lays out `trellis-sidecar`'s code in the order of `sidecar-code-order.txt`, and
//! `trellis`'s (which runs the control plane) in that of `control-code-order.txt` (see
//! [`code_order`]).

use std::path::PathBuf;
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8(out.stdout).ok()?.trim().to_owned();
    (!text.is_empty()).then_some(text)
}

fn main() {
    code_order();
    println!("cargo:rerun-if-env-changed=TRELLIS_BUILD_COMMIT");
    let from_env = std::env::var("TRELLIS_BUILD_COMMIT")
        .ok()
        .map(|c| c.trim().to_owned())
        .filter(|c| !c.is_empty());
    let commit = from_env.or_else(|| {
        let commit = git(&["rev-parse", "--short=12", "HEAD"])?;
        // Rebuild when HEAD moves: HEAD itself (a branch switch or a detached checkout), the
        // branch it points at, and packed refs. Paths from git, so worktrees work too.
        for file in ["HEAD", "packed-refs"] {
            if let Some(p) = git(&["rev-parse", "--git-path", file]) {
                watch(absolute(p));
            }
        }
        if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
            if let Some(p) = git(&["rev-parse", "--git-path", &branch]) {
                watch(absolute(p));
            }
        }
        Some(commit)
    });
    let commit = commit
        .filter(|c| c.bytes().all(|b| b.is_ascii_alphanumeric()))
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=TRELLIS_BUILD_COMMIT={commit}");
}

/// git prints paths relative to the current directory (the crate's) unless they are outside.
fn absolute(p: String) -> PathBuf {
    let p = PathBuf::from(p);
    if p.is_absolute() {
        p
    } else {
        std::env::current_dir().map(|d| d.join(&p)).unwrap_or(p)
    }
}

/// A path that does not exist would make cargo rerun this script on every build.
fn watch(path: PathBuf) {
    if path.exists() {
        println!("cargo:rerun-if-changed={}", path.display());
    }
}

/// Each binary and the list its code is laid out by: the sidecar's from profiles of working
/// sidecars, `trellis`'s from a control plane serving SDS (`trellis control` is its long-running
/// job; its other subcommands are short-lived).
const CODE_ORDERS: [(&str, &str); 2] = [
    ("trellis-sidecar", "sidecar-code-order.txt"),
    ("trellis", "control-code-order.txt"),
];

/// Links the functions a binary runs at work first and together (rust-lld's
/// `--symbol-ordering-file`, the lists made by `tests/bench/code-order.sh` from callgrind
/// profiles).
///
/// An idle process's memory is mostly its executable's pages: the kernel maps code in blocks
/// around every function that runs, and the ~3,000 functions a sidecar (or a control plane)
/// runs were spread over all of the 9 MB (20 MB) of code. Packed together they fill a few MiB
/// (docs/benchmarks.md, "Idle RSS: code layout"). Names the build no longer has are skipped, so
/// a stale list costs memory, never correctness. Only release builds for x86_64 Linux with
/// Rust 1.90 or newer, whose default linker is rust-lld; other linkers (GNU ld, gold) lack the
/// option. `TRELLIS_CODE_ORDER=off` turns it off, e.g. for a build configured with another
/// linker.
fn code_order() {
    let dir = PathBuf::from(env("CARGO_MANIFEST_DIR"));
    for (_, list) in CODE_ORDERS {
        println!("cargo:rerun-if-changed={}", dir.join(list).display());
    }
    println!("cargo:rerun-if-env-changed=TRELLIS_CODE_ORDER");
    let flags = env("CARGO_ENCODED_RUSTFLAGS");
    let other_linker = [
        "fuse-ld=",
        "linker-features=-lld",
        "linker=",
        "linker-flavor=",
    ]
    .iter()
    .any(|f| flags.contains(f));
    if env("PROFILE") != "release"
        || env("TARGET") != "x86_64-unknown-linux-gnu"
        || env("TRELLIS_CODE_ORDER") == "off"
        || other_linker
        || !links_with_rust_lld()
    {
        return;
    }
    for (bin, list) in CODE_ORDERS {
        let order = dir.join(list);
        if !order.exists() {
            continue;
        }
        for arg in [
            format!("-Wl,--symbol-ordering-file={}", order.display()),
            "-Wl,--no-warn-symbol-ordering".to_owned(),
        ] {
            println!("cargo:rustc-link-arg-bin={bin}={arg}");
        }
    }
}

/// Rust 1.90 made rust-lld the default linker of x86_64-unknown-linux-gnu.
fn links_with_rust_lld() -> bool {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".to_owned());
    let Ok(out) = Command::new(rustc).arg("-V").output() else {
        return false;
    };
    // "rustc 1.95.0 (59807616e 2026-04-14)"
    let text = String::from_utf8_lossy(&out.stdout);
    let mut version = text
        .split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .split('.')
        .map(|n| n.parse::<u32>().unwrap_or(0));
    let (major, minor) = (version.next().unwrap_or(0), version.next().unwrap_or(0));
    (major, minor) >= (1, 90)
}

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_default()
}
