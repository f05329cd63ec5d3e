//! The control plane goes away under load (issue #5, scenarios 3 and 4), with real processes:
//! app A → sidecar A → sidecar B → app B carries requests the whole time.
//!
//! - **Killed for a minute** (`control_plane_killed_for_a_minute_under_load_drops_nothing`):
//!   SIGKILL, 60 s down, started again on the same ports and state. SVIDs live 3 min, so they
//!   outlive the outage. No request may fail; during the outage both sidecars report
//!   `trellis_sds_connected 0` and `trellis_sds_last_update_timestamp_seconds` stands still;
//!   after the restart they reconnect (with jittered, bounded backoff, read from their logs)
//!   and rotations resume.
//! - **Away longer than an SVID lives** (`control_plane_away_longer_than_an_svid_lives`):
//!   SVIDs live 20 s and the sidecars' expiry margin is 5 s. After the kill, `/ready` turns
//!   503 while the SVID still has time left, the sidecar logs a WARN and then an ERROR naming
//!   the expiry, and once the SVID expired no handshake with its inbound is offered an expired
//!   certificate. The sidecars attest with Kubernetes service-account token files (a standing
//!   credential, as in production): a spent join token could not bring back a sidecar whose
//!   SVID expired. After the restart they turn ready again and traffic flows.
//!
//! Run with `--nocapture` to see the figures.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Context as _};
use trellis_identity::CertificateDer;
use trellis_sidecar::inspect::{inspect, InspectOptions, Reason, Target};
use trellis_tests::app_client::{echo_json, get_once, Proto};
use trellis_tests::echo::EchoApp;
use trellis_tests::k8s::K8sIssuer;
use trellis_tests::load::{Load, LoadOpts};
use trellis_tests::mesh::{Mesh, MeshOpts, A_ID, B_ID};
use trellis_tests::probe::{ProbeClient, ProbeRun};
use trellis_tests::sidecar::Sidecar;
use trellis_tests::{
    e2e, eventually, trellis_bin, ControlPlane, ControlPlaneOpts, StoppedControlPlane,
};

const CONNECTED: &str = "trellis_sds_connected";
const LAST_UPDATE: &str = "trellis_sds_last_update_timestamp_seconds";
const ROTATIONS: &str = "trellis_svid_rotations_total";
/// How long the control plane stays down in the first scenario.
const OUTAGE: Duration = Duration::from_secs(60);
/// How long the load keeps going once both sidecars are back on the control plane.
const AFTER_RECONNECT: Duration = Duration::from_secs(15);
/// The sidecar's largest reconnect delay (`sds::timing::BACKOFF_MAX`).
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Generous: the last backoff delay before the restart can be up to [`BACKOFF_MAX`].
const RECONNECT_DEADLINE: Duration = Duration::from_secs(90);

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

fn secs(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}

/// A gauge or counter of `s`.
async fn metric(s: &Sidecar, name: &str) -> anyhow::Result<f64> {
    Ok(s.metrics().await?.sum(name, &[]))
}

/// One request through sidecar A to app B must work.
async fn request_a_to_b(outbound: SocketAddr) -> anyhow::Result<()> {
    echo_json(&get_once(outbound, Proto::H1, "b", "/check", &[]).await?).map(|_| ())
}

/// The SVID's notAfter (unix seconds) from `/certs`.
async fn svid_not_after(s: &Sidecar) -> anyhow::Result<u64> {
    let r = s.admin_get("/certs").await?;
    let v: serde_json::Value = serde_json::from_slice(&r.body).context("/certs JSON")?;
    v["svid"]["not_after"]
        .as_u64()
        .with_context(|| format!("/certs has no svid.not_after: {v}"))
}

/// Parses a `Duration` as `{:?}` prints it (`183.9ms`, `1.5s`, `12µs`, `0ns`).
fn parse_debug_duration(s: &str) -> Option<Duration> {
    [("ns", 1e-9), ("µs", 1e-6), ("ms", 1e-3), ("s", 1.0)]
        .iter()
        .find_map(|(unit, scale)| {
            let n: f64 = s.strip_suffix(unit)?.parse().ok()?;
            Some(Duration::from_secs_f64(n * scale))
        })
}

/// The reconnect delays a sidecar logged (`retry_in=…` on each failed attempt), in order.
fn retry_delays(stderr: &str) -> Vec<Duration> {
    stderr
        .lines()
        .filter_map(|l| l.split_once("retry_in=").map(|(_, rest)| rest))
        .filter_map(|rest| parse_debug_duration(rest.split_whitespace().next()?))
        .collect()
}

/// Each first line of `stderr` at `level` that contains `text`.
fn log_line(stderr: &str, level: &str, text: &str) -> Option<String> {
    stderr
        .lines()
        .find(|l| l.contains(level) && l.contains(text))
        .map(str::to_owned)
}

/// What one handshake with a sidecar's inbound showed.
struct Presented {
    /// The handshake's outcome (the probe sends no certificate, so the sidecar refuses it
    /// after presenting its own; what matters is what it presented).
    handshake: Result<(), String>,
    /// The leaf's notAfter and serial, if the sidecar presented one.
    leaf: Option<(SystemTime, String)>,
}

/// One `trellis inspect` handshake (TLS 1.3, no client certificate) with `addr`, recording
/// the server's leaf whatever it is: the probe reports what a sidecar *presents*, including
/// what a real verifier would refuse. `roots` is the bundle the sidecars were given.
async fn presented_by(
    addr: SocketAddr,
    roots: &[CertificateDer<'static>],
) -> anyhow::Result<Presented> {
    let target = Target::parse(&addr.to_string())?;
    let opts = InspectOptions::new(roots.to_vec())?.timeout(Duration::from_secs(10));
    let report = inspect(&target, &opts).await;
    if report.address.is_none() || report.reason == Some(Reason::Timeout) {
        bail!("no handshake outcome with {addr}: {report:?}");
    }
    let handshake = match report.reason {
        None => Ok(()),
        Some(reason) => Err(format!(
            "{reason}: {}",
            report.detail.as_deref().unwrap_or_default()
        )),
    };
    let leaf = report.peer_chain.first().map(|leaf| {
        let not_after =
            UNIX_EPOCH + Duration::from_secs(u64::try_from(leaf.not_after_unix).unwrap_or(0));
        (not_after, leaf.serial.clone())
    });
    Ok(Presented { handshake, leaf })
}

// ---------------------------------------------------------------------------------------
// Scenario 3: killed for a minute.
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_killed_for_a_minute_under_load_drops_nothing() -> anyhow::Result<()> {
    e2e(async {
        // Declared before the mesh so it is dropped after the sidecars (their logs live in
        // its directory).
        let stopped: StoppedControlPlane;
        // The expiry margin (default 5m) must be shorter than the 3m SVIDs.
        let margin = vec!["--expiry-margin".to_string(), "30s".to_string()];
        let mut mesh = Mesh::start(MeshOpts {
            control: ControlPlaneOpts {
                svid_ttl: Some("3m".into()),
                rotate_every: Some("5s".into()),
                ..Default::default()
            },
            a_args: margin.clone(),
            b_args: margin,
            ..Default::default()
        })
        .await?;
        let outbound = mesh.a.outbound();
        eventually(Duration::from_secs(30), "a first request A → B", || {
            request_a_to_b(outbound)
        })
        .await?;
        let load = Load::start(LoadOpts::new(outbound, "b", "app-b"));
        let before = load.mark("before the kill");
        eventually(Duration::from_secs(60), "a rotation on both sidecars", || async {
            for s in [&mesh.a, &mesh.b] {
                ensure!(metric(s, ROTATIONS).await? >= 1.0, "no rotation yet");
            }
            Ok(())
        })
        .await?;
        load.end(before);
        // Fresh mTLS handshakes with B during the outage: the load above rides one pooled
        // connection that nothing re-verifies. The probe's SVID (3 min) outlives the outage.
        let prober = ProbeClient::fetch(
            &mesh.cp,
            "spiffe://example.org/ns/demo/sa/probe",
            Duration::from_secs(3),
        )
        .await?;
        let bundle = mesh.cp.bundle()?;
        let mut probes = ProbeRun::default();

        // Down.
        let outage = load.mark("control plane down (60s)");
        let killed = Instant::now();
        stopped = mesh.cp.kill();
        let (last_a, last_b) = eventually(
            Duration::from_secs(60),
            "both sidecars report trellis_sds_connected 0",
            || async {
                let (ma, mb) = (mesh.a.metrics().await?, mesh.b.metrics().await?);
                ensure!(
                    ma.sum(CONNECTED, &[]) == 0.0 && mb.sum(CONNECTED, &[]) == 0.0,
                    "A: {}, B: {}",
                    ma.lines_of(CONNECTED),
                    mb.lines_of(CONNECTED)
                );
                Ok((ma.sum(LAST_UPDATE, &[]), mb.sum(LAST_UPDATE, &[])))
            },
        )
        .await?;
        let noticed = killed.elapsed();
        let mut since_last_update = 0.0f64;
        let mut outage_samples = 0;
        while killed.elapsed() < OUTAGE {
            let left = OUTAGE.saturating_sub(killed.elapsed());
            prober
                .probe_for(
                    &bundle,
                    mesh.b.addrs.inbound,
                    B_ID,
                    "app-b",
                    Duration::from_millis(500),
                    left.min(Duration::from_secs(5)),
                    &mut probes,
                )
                .await;
            for (name, s, last) in [("A", &mesh.a, last_a), ("B", &mesh.b, last_b)] {
                let m = s.metrics().await?;
                ensure!(
                    m.sum(CONNECTED, &[]) == 0.0,
                    "sidecar {name} reports {CONNECTED} {} with the control plane down",
                    m.sum(CONNECTED, &[])
                );
                ensure!(
                    m.sum(LAST_UPDATE, &[]) == last,
                    "sidecar {name}'s {LAST_UPDATE} moved during the outage: {last} → {}",
                    m.sum(LAST_UPDATE, &[])
                );
                since_last_update = since_last_update.max(unix_now() - last);
            }
            outage_samples += 1;
        }
        load.end(outage);
        let rotations_down = (
            metric(&mesh.a, ROTATIONS).await?,
            metric(&mesh.b, ROTATIONS).await?,
        );

        // Back on the same ports and state.
        let back = load.mark("control plane back");
        mesh.cp = stopped.start_again()?;
        let restarted = Instant::now();
        let mut reconnected: [Option<Duration>; 2] = [None, None];
        while reconnected.iter().any(Option::is_none) {
            if restarted.elapsed() > RECONNECT_DEADLINE {
                bail!(
                    "sidecars not reconnected {RECONNECT_DEADLINE:?} after the restart: {reconnected:?}"
                );
            }
            for (i, s) in [&mesh.a, &mesh.b].into_iter().enumerate() {
                if reconnected[i].is_none() && metric(s, CONNECTED).await? == 1.0 {
                    reconnected[i] = Some(restarted.elapsed());
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // The stream's first answer installs an SVID; one more means the rotation schedule
        // runs again.
        eventually(
            Duration::from_secs(60),
            "two more SVIDs on each sidecar after the restart",
            || async {
                let (ra, rb) = (
                    metric(&mesh.a, ROTATIONS).await?,
                    metric(&mesh.b, ROTATIONS).await?,
                );
                ensure!(
                    ra >= rotations_down.0 + 2.0 && rb >= rotations_down.1 + 2.0,
                    "rotations A {} → {ra}, B {} → {rb}",
                    rotations_down.0,
                    rotations_down.1
                );
                Ok(())
            },
        )
        .await?;
        let rotations_after = (
            metric(&mesh.a, ROTATIONS).await? - rotations_down.0,
            metric(&mesh.b, ROTATIONS).await? - rotations_down.1,
        );
        for (name, s, last) in [("A", &mesh.a, last_a), ("B", &mesh.b, last_b)] {
            let now_last = metric(s, LAST_UPDATE).await?;
            ensure!(
                now_last > last,
                "sidecar {name}'s {LAST_UPDATE} did not advance after the restart ({last})"
            );
        }
        let back_for = restarted.elapsed();
        tokio::time::sleep(AFTER_RECONNECT.saturating_sub(back_for.saturating_sub(
            reconnected.iter().flatten().max().copied().unwrap_or_default(),
        )))
        .await;
        load.end(back);
        let report = load.stop().await;

        let (delays_a, delays_b) = (
            retry_delays(&mesh.a.child.stderr()),
            retry_delays(&mesh.b.child.stderr()),
        );
        let fmt = |d: &[Duration]| {
            d.iter()
                .map(|d| format!("{:.2}", d.as_secs_f64()))
                .collect::<Vec<_>>()
                .join(" ")
        };
        report.print("control plane killed for 60s");
        println!(
            "[outage] sds_connected 0 on both {} after SIGKILL; {outage_samples} checks during the \
             outage: connected 0, last update frozen, up to {since_last_update:.0}s since the last \
             update",
            secs(noticed)
        );
        println!(
            "[outage] reconnected after the restart: A in {}, B in {}; rotations since: A {}, B {}",
            secs(reconnected[0].unwrap_or_default()),
            secs(reconnected[1].unwrap_or_default()),
            rotations_after.0,
            rotations_after.1
        );
        println!("[outage] reconnect delays (s) A: {}", fmt(&delays_a));
        println!("[outage] reconnect delays (s) B: {}", fmt(&delays_b));
        println!(
            "[outage] fresh handshakes with B during the outage: {} ({} failed)",
            probes.attempted(),
            probes.failed.len()
        );

        report.assert_no_failures()?;
        probes.assert_all_ok(40)?;
        for (name, delays) in [("A", &delays_a), ("B", &delays_b)] {
            ensure!(
                delays.len() >= 3,
                "sidecar {name} logged only {} reconnect delays in a 60s outage",
                delays.len()
            );
            ensure!(
                delays.iter().all(|d| *d <= BACKOFF_MAX),
                "sidecar {name}: a reconnect delay above {BACKOFF_MAX:?}: {delays:?}"
            );
        }
        // Full jitter: two sidecars that lost the control plane at the same instant do not
        // retry in step (equal sequences would take equal random draws to the nanosecond).
        ensure!(
            delays_a != delays_b,
            "sidecars A and B retried with identical delays: no jitter? {delays_a:?}"
        );
        Ok(())
    })
    .await
}

// ---------------------------------------------------------------------------------------
// Scenario 4: away longer than an SVID lives.
// ---------------------------------------------------------------------------------------

/// Starts a sidecar that attests with a Kubernetes token file for `ns/demo/sa/<sa>`.
async fn k8s_sidecar(
    cp: &ControlPlane,
    issuer: &K8sIssuer,
    name: &str,
    spiffe_id: &str,
    sa: &str,
    app: SocketAddr,
    upstreams: &[String],
) -> anyhow::Result<Sidecar> {
    let token_file = cp.dir.path().join(format!("{name}.token"));
    std::fs::write(&token_file, issuer.token("demo", sa)?)?;
    let mut cmd = Command::new(trellis_bin());
    cmd.arg("sidecar")
        .args(["--trust-domain", cp.trust_domain.as_str()])
        .args(["--control-plane", &cp.sds_addr.to_string()])
        .arg("--control-bundle")
        .arg(&cp.bundle_pem_path)
        .arg("--token-file")
        .arg(&token_file)
        .args(["--spiffe-id", spiffe_id])
        .args(["--inbound", "127.0.0.1:0", "--outbound", "127.0.0.1:0"])
        .args(["--admin", "127.0.0.1:0", "--app", &app.to_string()])
        .args(["--expiry-margin", "5s"]);
    for u in upstreams {
        cmd.args(["--upstream", u]);
    }
    Sidecar::spawn(name, spiffe_id, cmd, cp.dir.path()).await
}

/// When `/ready` first read not ready after the kill.
struct NotReady {
    after_kill: Duration,
    /// SVID time left then, from `/certs`.
    left: f64,
    not_after: u64,
    body: String,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_away_longer_than_an_svid_lives() -> anyhow::Result<()> {
    e2e(async {
        // Declared first so it is dropped after the sidecars (their logs live in its
        // directory).
        let stopped: StoppedControlPlane;
        let issuer = K8sIssuer::new()?;
        let dir = tempfile::tempdir()?;
        let k8s = issuer.write_jwks(&dir.path().join("jwks.json"))?;
        let mut cp = ControlPlane::start_in(
            dir,
            ControlPlaneOpts {
                // The shortest lifetime `trellis control` accepts is 10s; 20s leaves room for
                // a 5s margin on a loaded machine.
                svid_ttl: Some("20s".into()),
                rotate_every: Some("5s".into()),
                k8s: Some(k8s),
                ..Default::default()
            },
        )?;
        // The CA outlives the outage (same state directory), so this bundle stays right.
        let roots = cp.bundle()?.roots().to_vec();
        let app_a = EchoApp::start("app-a").await?;
        let app_b = EchoApp::start("app-b").await?;
        let b = k8s_sidecar(&cp, &issuer, "sidecar-b", B_ID, "b", app_b.addr, &[]).await?;
        let a = k8s_sidecar(
            &cp,
            &issuer,
            "sidecar-a",
            A_ID,
            "a",
            app_a.addr,
            &[format!(
                "name=b,hosts=b,address={},identity={B_ID}",
                b.addrs.inbound
            )],
        )
        .await?;
        let outbound = a.outbound();
        eventually(Duration::from_secs(30), "a first request A → B", || {
            request_a_to_b(outbound)
        })
        .await?;
        // The probe sees what a sidecar presents (so it would see an expired certificate).
        let healthy = presented_by(b.addrs.inbound, &roots).await?;
        let (not_after, _) = healthy
            .leaf
            .clone()
            .context("sidecar B presented no certificate while healthy")?;
        ensure!(not_after > SystemTime::now(), "B's fresh certificate expired?");

        let load = Load::start(LoadOpts::new(outbound, "b", "app-b"));
        let valid = load.mark("control plane down, SVIDs valid");
        let killed = Instant::now();
        stopped = cp.kill();

        // /ready turns 503 inside the margin, while the SVID still has time left.
        let sidecars = [("A", &a), ("B", &b)];
        let mut not_ready: [Option<NotReady>; 2] = [None, None];
        while not_ready.iter().any(Option::is_none) {
            ensure!(
                killed.elapsed() < Duration::from_secs(60),
                "/ready still 200 a minute after the kill (SVIDs live 20s)"
            );
            for (i, (_, s)) in sidecars.iter().enumerate() {
                if not_ready[i].is_some() {
                    continue;
                }
                let r = s.admin_get("/ready").await?;
                if r.status == 200 {
                    continue;
                }
                let not_after = svid_not_after(s).await?;
                not_ready[i] = Some(NotReady {
                    after_kill: killed.elapsed(),
                    left: not_after as f64 - unix_now(),
                    not_after,
                    body: r.text().trim().to_string(),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let not_ready = not_ready.map(Option::unwrap);
        for ((name, _), nr) in sidecars.iter().zip(&not_ready) {
            println!(
                "[expiry] sidecar {name}: /ready 503 {} after the kill with {:.1}s of SVID left \
                 (margin 5s): {:?}",
                secs(nr.after_kill),
                nr.left,
                nr.body
            );
            ensure!(
                nr.left > 0.0,
                "sidecar {name}'s /ready turned 503 only {:.1}s after its SVID expired",
                -nr.left
            );
        }

        // Past both expiries (notAfter is whole seconds; one more for the clock).
        let last_expiry = not_ready.iter().map(|n| n.not_after).max().unwrap_or(0);
        let first_expiry = not_ready.iter().map(|n| n.not_after).min().unwrap_or(0);
        let valid_until = Instant::now()
            + Duration::from_secs_f64((first_expiry as f64 - unix_now()).max(0.0));
        while unix_now() < last_expiry as f64 + 1.0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        load.end(valid);
        let expired = load.mark("SVIDs expired");

        // Said loudly, once each: a WARN on entering the margin, an ERROR on expiry.
        for (name, s) in sidecars {
            let (warn, error) = eventually(
                Duration::from_secs(15),
                "the sidecar's expiry WARN and ERROR lines",
                || async {
                    let log = s.child.stderr();
                    let warn = log_line(&log, "WARN", "SVID expires at")
                        .context("no WARN line about the coming expiry")?;
                    let error = log_line(&log, "ERROR", "SVID expired at")
                        .context("no ERROR line about the expiry")?;
                    Ok((warn, error))
                },
            )
            .await
            .with_context(|| format!("sidecar {name}"))?;
            let log = s.child.stderr();
            ensure!(
                log.matches("SVID expired at").count() == 1,
                "sidecar {name} logged the expiry more than once"
            );
            println!("[expiry] sidecar {name} logged:\n  {warn}\n  {error}");
            let r = s.admin_get("/ready").await?;
            ensure!(
                r.status == 503 && r.text().contains("expired"),
                "sidecar {name} /ready after expiry: {} {}",
                r.status,
                r.text()
            );
        }

        // Never an expired certificate on a new handshake.
        for (name, s) in sidecars {
            for _ in 0..3 {
                let p = presented_by(s.addrs.inbound, &roots).await?;
                let now = SystemTime::now();
                if let Some((not_after, serial)) = &p.leaf {
                    ensure!(
                        *not_after > now,
                        "sidecar {name} presented expired certificate {serial} (notAfter {:?})",
                        unix_secs(*not_after)
                    );
                }
                println!(
                    "[expiry] handshake with sidecar {name}'s inbound after expiry: {}; certificate \
                     presented: {}",
                    match &p.handshake {
                        Ok(()) => "completed".to_string(),
                        Err(e) => format!("failed ({e})"),
                    },
                    p.leaf
                        .as_ref()
                        .map(|(_, s)| format!("unexpired {s}"))
                        .unwrap_or_else(|| "none".into())
                );
            }
        }
        // A few seconds with both SVIDs expired, to see what the apps see: new handshakes
        // fail, connections made earlier carry on (not asserted; printed).
        tokio::time::sleep(Duration::from_secs(5)).await;
        load.end(expired);

        // The control plane comes back: fresh SVIDs through the token files, ready, traffic.
        let back = load.mark("control plane back");
        cp = stopped.start_again()?;
        let restarted = Instant::now();
        let mut ready_again: [Option<Duration>; 2] = [None, None];
        while ready_again.iter().any(Option::is_none) {
            if restarted.elapsed() > RECONNECT_DEADLINE {
                bail!("sidecars not ready {RECONNECT_DEADLINE:?} after the restart: {ready_again:?}");
            }
            for (i, (_, s)) in sidecars.iter().enumerate() {
                if ready_again[i].is_none() && s.admin_get("/ready").await?.status == 200 {
                    ready_again[i] = Some(restarted.elapsed());
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        eventually(Duration::from_secs(30), "a request A → B after recovery", || {
            request_a_to_b(outbound)
        })
        .await?;
        load.end(back);
        let recovered = load.mark("recovered");
        tokio::time::sleep(Duration::from_secs(5)).await;
        load.end(recovered);
        let report = load.stop().await;
        let after = presented_by(b.addrs.inbound, &roots).await?;

        report.print("control plane away longer than an SVID lives");
        println!("[expiry] control plane back on sds={}", cp.sds_addr);
        println!(
            "[expiry] ready again after the restart: A in {}, B in {}",
            secs(ready_again[0].unwrap_or_default()),
            secs(ready_again[1].unwrap_or_default()),
        );
        let ev = |name: &str| report.events.iter().find(|e| e.name == name).cloned();
        let recovered = ev("recovered").context("recovered event")?;
        let failed_valid = report.failures_between(report.started, valid_until);
        let failed_recovered = report.failures_between(
            recovered.from,
            recovered.to.unwrap_or(report.stopped),
        );
        ensure!(
            failed_valid == 0,
            "{failed_valid} requests failed while the SVIDs were still valid:\n{:?}",
            report
                .failures()
                .take(5)
                .map(|s| s.result.clone())
                .collect::<Vec<_>>()
        );
        ensure!(
            failed_recovered == 0,
            "{failed_recovered} requests failed after recovery"
        );
        let (not_after, _) = after
            .leaf
            .context("sidecar B presents no certificate after recovery")?;
        ensure!(
            not_after > SystemTime::now(),
            "sidecar B presents an expired certificate after recovery"
        );
        Ok(())
    })
    .await
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[test]
fn parses_logged_delays() {
    assert_eq!(
        parse_debug_duration("183.5ms"),
        Some(Duration::from_micros(183_500))
    );
    assert_eq!(
        parse_debug_duration("1.5s"),
        Some(Duration::from_millis(1500))
    );
    assert_eq!(parse_debug_duration("0ns"), Some(Duration::ZERO));
    let log = "WARN trellis_sidecar::sds: cannot reach the control plane; reconnecting \
               control_plane=127.0.0.1:1 error=x y retry_in=250ms serving=true\n\
               INFO other\n";
    assert_eq!(retry_delays(log), vec![Duration::from_millis(250)]);
}
