//! `trellis_build_info{version,commit}`: both roles of the binary export the build they run,
//! with the commit `trellis --version` reports (and, in a git checkout, the checkout's HEAD as
//! it was when the binary was built by tests/run.sh).

use std::process::Command;

use anyhow::{ensure, Context as _};
use trellis_tests::echo::EchoApp;
use trellis_tests::sidecar::{Metrics, Sidecar, SidecarOpts};
use trellis_tests::{
    e2e, run_with_timeout, trellis_bin, workspace_root, ControlPlane, ControlPlaneOpts,
    COMMAND_TIMEOUT,
};

/// `trellis --version` → (version, commit), from `trellis 0.1.0 (commit abc123…)`.
fn version_and_commit() -> anyhow::Result<(String, String)> {
    let mut cmd = Command::new(trellis_bin());
    cmd.arg("--version");
    let out = run_with_timeout(cmd, COMMAND_TIMEOUT)?;
    let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let rest = text
        .strip_prefix("trellis ")
        .with_context(|| format!("--version printed {text:?}"))?;
    let (version, commit) = rest
        .split_once(" (commit ")
        .with_context(|| format!("--version printed {text:?}"))?;
    Ok((version.to_owned(), commit.trim_end_matches(')').to_owned()))
}

fn build_info_of(who: &str, m: &Metrics, version: &str, commit: &str) -> anyhow::Result<()> {
    let v = m
        .get(
            "trellis_build_info",
            &[("version", version), ("commit", commit)],
        )
        .with_context(|| format!("{who}: {}", m.lines_of("trellis_build_info")))?;
    ensure!(v == 1.0, "{who}: {}", m.lines_of("trellis_build_info"));
    ensure!(
        m.lines_of("trellis_build_info").lines().count() == 1,
        "{who}: one series only:\n{}",
        m.lines_of("trellis_build_info")
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_and_sidecar_export_their_version_and_commit() -> anyhow::Result<()> {
    e2e(async {
        let (version, commit) = version_and_commit()?;
        ensure!(version == env!("CARGO_PKG_VERSION"), "version {version}");
        ensure!(
            commit == "unknown"
                || (commit.len() == 12 && commit.bytes().all(|b| b.is_ascii_hexdigit())),
            "commit {commit:?}"
        );
        // In a checkout, without an override, the build script read this HEAD.
        let mut git = Command::new("git");
        git.current_dir(workspace_root())
            .args(["rev-parse", "--short=12", "HEAD"]);
        if let (Ok(out), None) = (
            run_with_timeout(git, COMMAND_TIMEOUT),
            std::env::var_os("TRELLIS_BUILD_COMMIT"),
        ) {
            if out.status.success() {
                let head = String::from_utf8_lossy(&out.stdout).trim().to_owned();
                ensure!(
                    commit == head,
                    "the binary says commit {commit}, the checkout is at {head}: rebuild it"
                );
            }
        }
        let cp = ControlPlane::start(ControlPlaneOpts::default())?;
        build_info_of("control plane", &cp.metrics().await?, &version, &commit)?;
        let app = EchoApp::start("app").await?;
        let sidecar = Sidecar::start(
            &cp,
            SidecarOpts::new("sidecar", "spiffe://example.org/build", app.addr),
        )
        .await?;
        build_info_of("sidecar", &sidecar.metrics().await?, &version, &commit)?;
        Ok(())
    })
    .await
}
