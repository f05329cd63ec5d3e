//! Issue #17, scenarios 2 and 3: a network path that silently drops packets (a blackhole, not
//! a refusal), under load, with real processes in a network namespace the test makes for
//! itself (`unshare -n`; the test runs itself again inside it, see [`own_netns`]):
//!
//! ```text
//!  load ──▶ sidecar A ══ mTLS, h2 ══╳══▶ sidecar B ──▶ app B      (2: B's inbound port dropped)
//!              ╲ SDS ══╳══▶ control plane                         (3: the SDS port dropped)
//! ```
//!
//! - **Between sidecars** (`blackhole_between_sidecars`): every packet to and from sidecar B's
//!   inbound port is dropped for [`PEER_HOLE`] under load, then let through again. The pooled
//!   connection must be found dead within ~10 s (its PING goes unanswered) and its waiting
//!   requests answered `503` at once; no request in the hole may wait longer than 15 s or
//!   end other than `503` (a gRPC call: `UNAVAILABLE`); after the heal the first request succeeds within 3 s and none
//!   fails.
//! - **Sidecar to control plane** (`blackhole_to_control_plane`): the control plane's SDS
//!   port is dropped for [`CONTROL_HOLE`]. The sidecar finds its SDS stream dead (HTTP/2
//!   keepalive on the channel), keeps serving on its current SVID (no request fails), and
//!   reconnects after the heal.
//!
//! `TRELLIS_BLACKHOLE_SECS` shortens (or lengthens) both holes. Run with `--nocapture` to see
//! the figures (README, "Reliability").

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _};
use trellis_tests::app_client::{get_once, Proto};
use trellis_tests::load::{Load, LoadOpts, LoadReport, MIN_REQUESTS_PER_WINDOW};
use trellis_tests::mesh::{legit, Mesh, MeshOpts};
use trellis_tests::netns::{own_netns, Blackhole};
use trellis_tests::{e2e, eventually};

/// How long sidecar B's inbound port drops packets (the issue's 30 s).
const PEER_HOLE: Duration = Duration::from_secs(30);
/// The SDS channel's PING interval plus its timeout: how long a dead SDS stream may go unnoticed.
const SDS_DETECT: Duration = Duration::from_secs(
    trellis_sidecar::sds::SDS_KEEPALIVE.0.as_secs()
        + trellis_sidecar::sds::SDS_KEEPALIVE.1.as_secs(),
);
/// How long the control plane's SDS port drops packets: past the SDS keepalive's detection.
const CONTROL_HOLE: Duration = Duration::from_secs(SDS_DETECT.as_secs() + 5);
/// Steady load before the hole and after the heal.
const STEADY: Duration = Duration::from_secs(4);
/// The targets of issue #17.
const DETECT_WITHIN: Duration = Duration::from_secs(11);
const FAIL_WITHIN: Duration = Duration::from_secs(15);
const RECOVER_WITHIN: Duration = Duration::from_secs(3);
/// The whole second run, namespace and all.
const RUN_TIMEOUT: Duration = Duration::from_secs(150);

fn hole(default: Duration) -> Duration {
    std::env::var("TRELLIS_BLACKHOLE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .map_or(default, Duration::from_secs)
}

fn secs(d: Duration) -> String {
    format!("{:.2}s", d.as_secs_f64())
}

/// The status of a failed load request (`status: 503 …`), or the whole error.
fn outcome(err: &str) -> String {
    match err.strip_prefix("status: ") {
        Some(rest) => rest.chars().take(3).collect(),
        None => err.chars().take(60).collect(),
    }
}

/// A load through sidecar A to app B whose requests wait longer than any sidecar timeout:
/// what is measured is the sidecar's own answer, never the load's patience.
fn load_through(mesh: &Mesh) -> Load {
    let mut opts = LoadOpts::new(mesh.a.outbound(), "b", "app-b");
    opts.timeout = Duration::from_secs(45);
    opts.pause = Duration::from_millis(5);
    Load::start(opts)
}

/// Each window carried enough requests to say something; in the hole each request takes
/// seconds to fail, so there are few.
fn windows_ran(report: &LoadReport, min_hole: usize) -> anyhow::Result<()> {
    for e in &report.events {
        let to = e.to.unwrap_or(report.stopped);
        let sent = report.sent_between(e.from, to);
        let min = if e.name.contains("blackhole") {
            min_hole
        } else {
            MIN_REQUESTS_PER_WINDOW
        };
        ensure!(
            sent >= min,
            "only {sent} requests during `{}` (want ≥ {min}): the load did not run",
            e.name
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blackhole_between_sidecars() -> anyhow::Result<()> {
    if !own_netns("faults_network::blackhole_between_sidecars", RUN_TIMEOUT)? {
        return Ok(());
    }
    e2e(async {
        let len = hole(PEER_HOLE);
        // Default keepalive, connect and request timeouts: the defaults are what is proved.
        let mesh = Mesh::start(MeshOpts::default()).await?;
        legit(&mesh, "/warm").await?;
        let load = load_through(&mesh);
        let before = load.mark("before");
        tokio::time::sleep(STEADY).await;
        load.end(before);

        let mut hole = Blackhole::port(mesh.b.addrs.inbound.port())?;
        let broke = Instant::now();
        let during = load.mark("blackhole");
        // A gRPC call sent into the hole: it must end with UNAVAILABLE, not DEADLINE_EXCEEDED.
        let outbound = mesh.a.outbound();
        let grpc = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let sent = Instant::now();
            let reply = get_once(
                outbound,
                Proto::H2c,
                "b",
                "/echo.Echo/Say",
                &[("content-type", "application/grpc"), ("te", "trailers")],
            )
            .await?;
            let status = reply
                .headers
                .get("grpc-status")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-")
                .to_string();
            anyhow::Ok((status, sent.elapsed()))
        });
        tokio::time::sleep(len).await;
        hole.heal()?;
        let healed = Instant::now();
        load.end(during);
        let after = load.mark("after heal");
        tokio::time::sleep(STEADY).await;
        load.end(after);
        let report = load.stop().await;
        report.print(&format!(
            "blackhole between sidecars ({})",
            humantime_secs(len)
        ));

        // How the requests caught in the hole ended, and how long each took to.
        let mut statuses: BTreeMap<String, usize> = BTreeMap::new();
        let mut slowest_failure = Duration::ZERO;
        let mut detected: Option<Duration> = None;
        for s in report.failures() {
            let err = s.result.as_ref().err().cloned().unwrap_or_default();
            *statuses.entry(outcome(&err)).or_default() += 1;
            slowest_failure = slowest_failure.max(s.latency);
            if err.contains("stopped answering") {
                let at = (s.sent + s.latency).saturating_duration_since(broke);
                detected = Some(detected.map_or(at, |d| d.min(at)));
            }
        }
        let first_success = report
            .samples
            .iter()
            .filter(|s| s.result.is_ok() && s.sent + s.latency > healed)
            .map(|s| (s.sent + s.latency) - healed)
            .min();
        let failed_after = report.failures_between(healed, report.stopped);
        let (grpc_status, grpc_took) = grpc.await??;
        println!(
            "[faults] blackhole between sidecars: dead pooled connection detected after {}; \
             failures {statuses:?}, slowest {}; first success {} after the heal; {failed_after} \
             failed after it; p99 after the heal {}; gRPC call in the hole: grpc-status \
             {grpc_status} after {}",
            detected.map_or("-".into(), secs),
            secs(slowest_failure),
            first_success.map_or("-".into(), secs),
            report
                .p99_during("after heal")
                .map_or("-".into(), |d| format!("{:.1}ms", d.as_secs_f64() * 1e3)),
            secs(grpc_took),
        );

        let detected = detected.context(
            "no request failed with `stopped answering`: the dead pooled connection was never \
             detected by its keepalive",
        )?;
        ensure!(
            detected <= DETECT_WITHIN,
            "the dead pooled connection was detected after {}, want ≤ {}",
            secs(detected),
            secs(DETECT_WITHIN)
        );
        ensure!(
            statuses.keys().all(|k| k == "503"),
            "requests in the hole must fail with 503, got {statuses:?}"
        );
        ensure!(
            grpc_status == "14" && grpc_took <= FAIL_WITHIN,
            "a gRPC call in the hole must end UNAVAILABLE (14) within {}: grpc-status \
             {grpc_status} after {}",
            secs(FAIL_WITHIN),
            secs(grpc_took)
        );
        ensure!(
            slowest_failure <= FAIL_WITHIN,
            "a request in the hole took {} to fail, want ≤ {}",
            secs(slowest_failure),
            secs(FAIL_WITHIN)
        );
        windows_ran(&report, 4)?;
        let first_success = first_success.context("no request succeeded after the heal")?;
        ensure!(
            first_success <= RECOVER_WITHIN,
            "first success {} after the heal, want ≤ {}",
            secs(first_success),
            secs(RECOVER_WITHIN)
        );
        ensure!(
            failed_after == 0,
            "{failed_after} requests sent after the heal failed: {}",
            report.summary()
        );
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blackhole_to_control_plane() -> anyhow::Result<()> {
    if !own_netns("faults_network::blackhole_to_control_plane", RUN_TIMEOUT)? {
        return Ok(());
    }
    e2e(async {
        let len = hole(CONTROL_HOLE);
        let mesh = Mesh::start(MeshOpts::default()).await?;
        legit(&mesh, "/warm").await?;
        let connected = || async {
            let m = mesh.a.metrics().await?;
            anyhow::Ok(m.sum("trellis_sds_connected", &[]))
        };
        ensure!(
            connected().await? == 1.0,
            "sidecar A's SDS stream is not up"
        );
        let updates_before = mesh
            .a
            .metrics()
            .await?
            .sum("trellis_sds_updates_total", &[]);
        let load = load_through(&mesh);
        let before = load.mark("before");
        tokio::time::sleep(STEADY).await;
        load.end(before);

        let mut hole = Blackhole::port(mesh.cp.sds_addr.port())?;
        let broke = Instant::now();
        let during = load.mark("blackhole");
        let detected = eventually(len, "sidecar A finds its SDS stream dead", || async {
            ensure!(connected().await? == 0.0, "still connected");
            Ok(broke.elapsed())
        })
        .await
        .ok();
        let left = len.saturating_sub(broke.elapsed());
        tokio::time::sleep(left).await;
        // Still serving on its SVID, a minute and more before it expires.
        let ready = mesh.a.admin_get("/ready").await?;
        hole.heal()?;
        let healed = Instant::now();
        load.end(during);
        let reconnected = eventually(
            Duration::from_secs(40),
            "sidecar A reconnects its SDS stream",
            || async {
                ensure!(connected().await? == 1.0, "not connected yet");
                Ok(healed.elapsed())
            },
        )
        .await?;
        let after = load.mark("after heal");
        tokio::time::sleep(STEADY).await;
        load.end(after);
        let report = load.stop().await;
        report.print(&format!(
            "blackhole to the control plane ({})",
            humantime_secs(len)
        ));
        let updates_after = mesh
            .a
            .metrics()
            .await?
            .sum("trellis_sds_updates_total", &[]);
        println!(
            "[faults] blackhole to the control plane: SDS stream found dead after {}; \
             reconnected {} after the heal; /ready during the hole {}; SDS updates {} → {}",
            detected.map_or("-".into(), secs),
            secs(reconnected),
            ready.status,
            updates_before,
            updates_after,
        );
        report.assert_no_failures()?;
        let detected = detected.context(format!(
            "sidecar A still reported its SDS stream up after {}: the keepalive did not find \
             it dead",
            secs(len)
        ))?;
        ensure!(
            detected <= SDS_DETECT + Duration::from_secs(1),
            "SDS stream found dead after {}, want ≤ {} (the SDS keepalive's PING interval + \
             timeout, and a second)",
            secs(detected),
            secs(SDS_DETECT + Duration::from_secs(1))
        );
        // A connect in flight at the heal gets through within ~1 s (a fresh SYN every second);
        // a backoff sleep after at most three failed attempts is ≤ 2 s.
        ensure!(
            reconnected <= Duration::from_secs(10),
            "SDS stream reconnected {} after the heal, want ≤ 10 s",
            secs(reconnected)
        );
        ensure!(
            ready.status == 200,
            "sidecar A not ready during the hole: {} {}",
            ready.status,
            String::from_utf8_lossy(&ready.body)
        );
        ensure!(
            updates_after > updates_before,
            "no SDS update after the reconnect ({updates_before} → {updates_after})"
        );
        Ok(())
    })
    .await
}

fn humantime_secs(d: Duration) -> String {
    format!("{} s", d.as_secs())
}
