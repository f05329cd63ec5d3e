//! What this build is: the release and the commit (build.rs), for `--version`, for
//! `trellis_build_info` on /metrics, and for `trellis sidecar` to recognise a
//! `trellis-sidecar` from the same build.

/// `--version`: the release and the commit it was built from. Both binaries print it, so
/// `trellis sidecar` compares the two before handing over and never runs a stale
/// `trellis-sidecar` left next to a newer `trellis`.
pub const LONG_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("TRELLIS_BUILD_COMMIT"),
    ")"
);

/// Records the build for `trellis_build_info{version,commit}`, which both /metrics read.
pub fn record() {
    trellis_serve::build_info::set(trellis_serve::build_info::BuildInfo {
        version: env!("CARGO_PKG_VERSION"),
        commit: env!("TRELLIS_BUILD_COMMIT"),
    });
}
