//! Issue #17, scenario 5 (sidecar side): a sidecar whose clock is 10 minutes off, run under
//! Debian's `faketime` (libfaketime; tests/run.sh installs it) next to a control plane and
//! a peer with the right time.
//!
//! - **10 minutes ahead**: SVIDs live 1 h here, so a fresh one still has 50 min left by the
//!   sidecar's clock: it turns ready and carries requests to and from the peer.
//! - **10 minutes behind**: every certificate the control plane issues starts 60 s before
//!   its now (the skew allowance), i.e. 9 minutes in this sidecar's future, its own SDS
//!   certificate included: the sidecar cannot even verify the control plane, stays unready,
//!   presents nothing, and logs that the certificate is not valid at this host's time and to
//!   check the clocks. A clock off by more than the allowance needs fixing (NTP).
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use anyhow::{bail, ensure};
use trellis_tests::app_client::{echo_json, get_once, Proto};
use trellis_tests::echo::EchoApp;
use trellis_tests::mesh::{Mesh, MeshOpts, B_ID};
use trellis_tests::sidecar::{Sidecar, SidecarOpts};
use trellis_tests::{e2e, eventually, in_ci, which, ControlPlaneOpts};

/// `faketime -f <offset>`, with the monotonic clock left alone (timers and timeouts run at
/// the real pace; only the wall clock is off).
fn faketime(offset: &str) -> Vec<String> {
    [
        "env",
        "FAKETIME_DONT_FAKE_MONOTONIC=1",
        "faketime",
        "-f",
        offset,
    ]
    .into_iter()
    .map(str::to_owned)
    .collect()
}

fn faketime_or_skip(test: &str) -> bool {
    if which("faketime").is_some() {
        return true;
    }
    assert!(
        !in_ci(),
        "{test}: faketime missing (tests/run.sh installs the Debian package `faketime`)"
    );
    eprintln!("SKIP {test}: no faketime (apt-get install faketime)");
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_clock_ten_minutes_off() -> anyhow::Result<()> {
    e2e(async {
        if !faketime_or_skip("sidecar_clock_ten_minutes_off") {
            return Ok(());
        }
        let mesh = Mesh::start(MeshOpts {
            control: ControlPlaneOpts {
                svid_ttl: Some("1h".into()),
                rotate_every: Some("30m".into()),
                ..Default::default()
            },
            ..Default::default()
        })
        .await?;

        // Ahead: ready, and both directions of mTLS with a right-time peer work.
        let app = EchoApp::start("app-ahead").await?;
        let mut opts = SidecarOpts::new("sidecar-ahead", "spiffe://example.org/ns/demo/sa/ahead", app.addr)
            .upstream("b", mesh.b.addrs.inbound, B_ID);
        opts.wrapper = faketime("+10m");
        let started = Instant::now();
        let ahead = Sidecar::start(&mesh.cp, opts).await?;
        let ready_after = started.elapsed();
        for i in 0..20 {
            let reply = get_once(ahead.outbound(), Proto::H1, "b", &format!("/ahead/{i}"), &[]).await?;
            ensure!(echo_json(&reply)?["app"] == "app-b", "ahead → b: {}", reply.summary());
        }
        let certs: serde_json::Value = serde_json::from_str(&ahead.admin_get("/certs").await?.text())?;
        let left = certs["svid"]["expires_in_seconds"].as_u64().unwrap_or(0);
        // 1 h minus the 10 min the sidecar's clock is ahead.
        ensure!(
            (2900..=3000).contains(&left),
            "the sidecar ahead sees {left}s left on a 1h SVID, want about 50 min"
        );

        // Behind: the control plane's own certificate is not valid yet for it; it says why.
        let app = EchoApp::start("app-behind").await?;
        let mut opts = SidecarOpts::new("sidecar-behind", "spiffe://example.org/ns/demo/sa/behind", app.addr);
        opts.wrapper = faketime("-10m");
        let behind = Sidecar::start_unready(&mesh.cp, opts)?;
        let hint = "check this host's clock and the control plane's";
        let attempts = eventually(Duration::from_secs(20), "the sidecar behind names the clock", || async {
            let log = behind.child.stderr();
            let n = log.lines().filter(|l| l.contains(hint)).count();
            if n >= 2 {
                Ok(n)
            } else {
                bail!("{n} log lines name the clock")
            }
        })
        .await?;
        let ready = behind.admin_get("/ready").await?;
        ensure!(ready.status == 503, "the sidecar behind says /ready {}", ready.status);
        println!(
            "[clock] sidecar 10 min ahead: ready in {:.1}s, 20 requests to a right-time peer, sees {left}s left on a 1h SVID; \
             sidecar 10 min behind: {attempts} connection attempts refused the control plane's not-yet-valid certificate, \
             each logged with the clock hint; /ready 503",
            ready_after.as_secs_f64()
        );
        Ok(())
    })
    .await
}
