//! What build a process runs, for the `trellis_build_info{version,commit}` gauge both the
//! control plane and the sidecar export. The binary knows its commit (its build script reads
//! git) and sets it once at start with [`set`]; libraries read it with [`get`]. Unset (tests
//! that embed a control plane or a sidecar), the commit reads `unknown`.

use std::sync::OnceLock;

/// The version and commit of the running build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BuildInfo {
    /// The release, e.g. `0.1.0`.
    pub version: &'static str,
    /// The git commit (abbreviated), or `unknown` when built outside a checkout.
    pub commit: &'static str,
}

static BUILD: OnceLock<BuildInfo> = OnceLock::new();

/// Records the running build; the first call wins (a process runs one build).
pub fn set(info: BuildInfo) {
    let _ = BUILD.set(info);
}

/// The running build: what [`set`] recorded, else this crate's version and `unknown`.
pub fn get() -> BuildInfo {
    BUILD.get().copied().unwrap_or(BuildInfo {
        version: env!("CARGO_PKG_VERSION"),
        commit: "unknown",
    })
}
