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

/// `trellis sidecar` hands over to a `trellis-sidecar` next to it only when that one reports
/// the same build; a stale one is named in a warning and the sidecar runs in-process.
#[test]
fn trellis_sidecar_is_exec_ed_only_when_it_is_from_the_same_build() -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let (version, commit) = version_and_commit()?;
    let dir = tempfile::tempdir()?;
    let trellis = dir.path().join("trellis");
    // A copy, not a link: the hand-over looks next to the resolved executable.
    std::fs::copy(trellis_bin(), &trellis)?;
    let stand_in = dir.path().join("trellis-sidecar");
    let run = |reported: &str| -> anyhow::Result<(String, String)> {
        // Answers --version like the real one, and says what it was run with otherwise.
        std::fs::write(
            &stand_in,
            format!(
                "#!/bin/sh\nif [ \"$1\" = --version ]; then echo 'trellis-sidecar {reported}'; exit 0; fi\necho \"handed over: $* format=$TRELLIS_LOG_FORMAT\"\n"
            ),
        )?;
        std::fs::set_permissions(&stand_in, std::fs::Permissions::from_mode(0o755))?;
        let mut cmd = Command::new(&trellis);
        cmd.args([
            "--log-format",
            "json",
            "sidecar",
            "--config",
            "/nonexistent/sidecar.yaml",
        ]);
        let out = run_with_timeout(cmd, COMMAND_TIMEOUT)?;
        Ok((
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    };

    let (stdout, stderr) = run(&format!("{version} (commit {commit})"))?;
    ensure!(
        stdout.trim() == "handed over: --config /nonexistent/sidecar.yaml format=json",
        "same build: exec'ed with the arguments after `sidecar`; stdout {stdout:?}, stderr {stderr:?}"
    );

    let (stdout, stderr) = run("0.0.0 (commit 000000000000)")?;
    ensure!(
        !stdout.contains("handed over"),
        "a stale trellis-sidecar must not run: {stdout:?}"
    );
    ensure!(
        stderr.contains("is not from this build (0.0.0 (commit 000000000000))")
            && stderr.contains("/nonexistent/sidecar.yaml"),
        "warned, then the in-process sidecar reads (and refuses) the config: {stderr:?}"
    );
    Ok(())
}
