//! Issue #17, scenario 5 (sidecar side): a sidecar whose clock is 10 minutes off, run under
//! libfaketime (Debian's `faketime`; tests/run.sh installs it) next to a control plane and
//! a peer with the right time.
//!
//! - **10 minutes ahead**: SVIDs live 1 h here, so a fresh one still has 50 min left by the
//!   sidecar's clock: it turns ready and carries requests to and from the peer.
//! - **10 minutes behind**: every certificate the control plane issues starts 60 s before
//!   its now (the skew allowance), i.e. 9 minutes in this sidecar's future, its own SDS
//!   certificate included: the sidecar cannot even verify the control plane, stays unready,
//!   presents nothing, and logs that the certificate is not valid at this host's time and to
//!   check the clocks. A clock off by more than the allowance needs fixing (NTP).
//!
//! And the control plane side: its wall clock jumps two hours forward mid-run (libfaketime
//! reading its offset from a file the test rewrites). It must refuse to sign (rotations
//! answered `UNAVAILABLE` naming the jump, counted) rather than hand out SVIDs that start two
//! hours in everyone's future; traffic carries on with the SVIDs already issued; when the clock
//! is stepped back, rotations resume and a new workload joins without a restart.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use anyhow::Context as _;
use anyhow::{bail, ensure};
use trellis_tests::app_client::{echo_json, get_once, Proto};
use trellis_tests::echo::EchoApp;
use trellis_tests::load::{Load, LoadOpts};
use trellis_tests::mesh::{Mesh, MeshOpts, B_ID};
use trellis_tests::sidecar::{Sidecar, SidecarOpts};
use trellis_tests::{e2e, eventually, fetch_svid, grpc_code, in_ci, ControlPlaneOpts};

/// libfaketime preloaded with its clock `offset` (`+10m`: what `faketime -f +10m` sets), the
/// monotonic clock left alone (timers and timeouts run at the real pace; only the wall clock
/// is off). Through `env`, which execs the command in place: the sidecar is the test's own
/// child and stops with it. `faketime` itself forks and waits, so stopping it orphaned the
/// sidecar, and every run left two sidecars running.
fn faketime(lib: &std::path::Path, offset: &str) -> Vec<String> {
    vec![
        "env".to_owned(),
        format!("LD_PRELOAD={}", lib.display()),
        format!("FAKETIME={offset}"),
        "FAKETIME_DONT_FAKE_MONOTONIC=1".to_owned(),
    ]
}

/// libfaketime, or `None` (and a note) without it; in CI it must be there.
fn libfaketime_or_skip(test: &str) -> Option<std::path::PathBuf> {
    let lib = libfaketime();
    if lib.is_none() {
        assert!(
            !in_ci(),
            "{test}: libfaketime missing (tests/run.sh installs the Debian package `faketime`)"
        );
        eprintln!("SKIP {test}: no libfaketime (apt-get install faketime)");
    }
    lib
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_clock_ten_minutes_off() -> anyhow::Result<()> {
    e2e(async {
        let Some(lib) = libfaketime_or_skip("sidecar_clock_ten_minutes_off") else {
            return Ok(());
        };
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
        opts.wrapper = faketime(&lib, "+10m");
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
        opts.wrapper = faketime(&lib, "-10m");
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

/// libfaketime's multi-threaded library, if installed.
fn libfaketime() -> Option<std::path::PathBuf> {
    let dirs = std::fs::read_dir("/usr/lib").ok()?;
    dirs.filter_map(Result::ok)
        .map(|d| d.path().join("faketime/libfaketimeMT.so.1"))
        .find(|p| p.exists())
}

async fn refused_clock(mesh: &Mesh) -> anyhow::Result<f64> {
    Ok(mesh.cp.metrics().await?.sum_or_zero(
        "trellis_issuances_refused_total",
        &[("reason", "clock_jump")],
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_clock_jump_is_not_signed_into_certificates() -> anyhow::Result<()> {
    e2e(async {
        let test = "control_plane_clock_jump_is_not_signed_into_certificates";
        let Some(lib) = libfaketime_or_skip(test) else {
            return Ok(());
        };
        let dir = tempfile::tempdir()?;
        let offset_file = dir.path().join("faketime");
        std::fs::write(&offset_file, "+0\n")?;
        let env = [
            ("LD_PRELOAD", lib.display().to_string()),
            ("FAKETIME_TIMESTAMP_FILE", offset_file.display().to_string()),
            // Re-read the file at most once a second; timers keep the real pace.
            ("FAKETIME_CACHE_DURATION", "1".to_string()),
            ("FAKETIME_DONT_FAKE_MONOTONIC", "1".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let margin = vec!["--expiry-margin".to_string(), "2s".to_string()];
        let mesh = Mesh::start(MeshOpts {
            control: ControlPlaneOpts {
                // A jump of 2 h is past the SVID lifetime: every SVID signed after it would
                // start after the ones before it expired.
                svid_ttl: Some("1h".into()),
                rotate_every: Some("1s".into()),
                env,
                ..Default::default()
            },
            a_args: margin.clone(),
            b_args: margin,
            ..Default::default()
        })
        .await?;
        let token = mesh.cp.create_token("spiffe://example.org/ns/demo/sa/late", "10m")?;
        let load = Load::start(LoadOpts::new(mesh.a.outbound(), "b", "app-b"));
        tokio::time::sleep(Duration::from_secs(2)).await;

        let event = load.mark("control plane clock 2 h ahead");
        std::fs::write(&offset_file, "+2h\n")?;
        let jumped = Instant::now();
        eventually(Duration::from_secs(20), "a rotation refused for the clock jump", || async {
            let n = refused_clock(&mesh).await?;
            if n >= 2.0 {
                Ok(())
            } else {
                bail!("trellis_issuances_refused_total{{reason=\"clock_jump\"}} = {n}")
            }
        })
        .await?;
        let detected = jumped.elapsed();
        // A new workload is not signed in either. (Its handshake may already fail: by the
        // control plane's jumped clock, its own serving SVID has expired too, and it does not
        // present an expired certificate. Either way nothing is issued.)
        let refusal = match fetch_svid(&mesh.cp, &token).await {
            Ok((svid, _)) => bail!("a new workload was issued {} right after a 2 h clock jump", svid.spiffe_id()),
            Err(e) => {
                let msg = format!("{e:#}");
                if grpc_code(&e) == Some(tonic::Code::Unavailable) && !msg.contains("TLS handshake") {
                    ensure!(msg.contains("wall clock jumped forward"), "the refusal must name the jump: {msg}");
                }
                msg
            }
        };
        // While the clock is off, B keeps the SVID it had: nothing new is signed.
        let held = mesh.b.svid_serial().await?;
        let hold_from = Instant::now();
        while hold_from.elapsed() < Duration::from_secs(4) {
            let now = mesh.b.svid_serial().await?;
            ensure!(now == held, "B installed {now} while the control plane's clock was 2 h off");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let refused = refused_clock(&mesh).await?;

        std::fs::write(&offset_file, "+0\n")?;
        let back = Instant::now();
        load.end(event);
        mesh.b
            .next_svid_serial(&held, Duration::from_secs(30))
            .await
            .context("B rotates once the clock is back")?;
        let resumed = back.elapsed();
        eventually(Duration::from_secs(30), "the new workload joins", || async {
            fetch_svid(&mesh.cp, &token).await.map(|_| ())
        })
        .await?;
        let report = load.stop().await;
        report.print("control plane clock 2 h ahead");
        println!(
            "[clock] control plane 2 h ahead: first refusals within {:.1}s, {refused} issuances refused ({refusal}); \
             B kept its SVID; rotations resumed {:.1}s after the clock was stepped back, no restart",
            detected.as_secs_f64(),
            resumed.as_secs_f64()
        );
        report.assert_no_failures()?;
        let during = report.events.first().context("event")?;
        let sent = report.sent_between(during.from, during.to.context("end")?);
        ensure!(sent >= 50, "only {sent} requests while the clock was off");
        Ok(())
    })
    .await
}
