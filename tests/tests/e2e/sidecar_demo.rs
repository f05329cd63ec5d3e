//! `trellis demo --once`: the README's run command, as a check that exits 0 only if the whole
//! local mesh works.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::ensure;
use trellis_tests::{e2e, run_with_timeout, trellis_bin};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_once_passes_its_checks_within_a_minute() -> anyhow::Result<()> {
    e2e(async {
        let mut cmd = Command::new(trellis_bin());
        cmd.args(["demo", "--once"]);
        let started = Instant::now();
        let out =
            tokio::task::spawn_blocking(move || run_with_timeout(cmd, Duration::from_secs(60)))
                .await??;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        eprintln!(
            "trellis demo --once: {} in {:?}",
            out.status,
            started.elapsed()
        );
        ensure!(
            out.status.success(),
            "trellis demo --once exited {}\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}",
            out.status
        );
        ensure!(
            stdout.contains("checks passed"),
            "no `checks passed` line\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}"
        );
        Ok(())
    })
    .await
}
