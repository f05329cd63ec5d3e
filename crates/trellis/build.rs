//! Records the git commit the binary is built from, for `trellis_build_info{commit}` and
//! `trellis --version`. `TRELLIS_BUILD_COMMIT` wins (the Docker build has no `.git`); else
//! `git rev-parse`; else `unknown`. Never fails the build.

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
