//! Issue #17, scenario 4: the control plane's disk fills up. The control plane runs in a
//! mount namespace of its own (`unshare -m`, as root) with its state directory (SQLite
//! database, audit log, bundle) on a 4 MiB tmpfs; the test fills it while app A → sidecar A →
//! sidecar B → app B carries load, holds it full, then frees the space.
//!
//! Asserts, while full: no request fails (sidecars keep the SVIDs they have); every
//! issuance is refused with `UNAVAILABLE` naming the audit log or the database (sidecar B's
//! rotations are counted in `trellis_issuances_refused_total{reason="audit_write"}`, a new
//! workload's join is refused); B presents no certificate without its audit line; the audit
//! log holds only whole lines. Once space returns, without a restart: B rotates again and the
//! new workload joins. Skipped (loudly) unless running as root with `unshare`.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::io::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};
use trellis_tests::load::{Load, LoadOpts};
use trellis_tests::mesh::{Mesh, MeshOpts};
use trellis_tests::{
    e2e, eventually, fetch_svid, fetch_svid_trusting, grpc_code, in_ci, which, ControlPlaneOpts,
};

/// How long the disk stays full after the first refused issuance (appends first use up the
/// room left in the audit log's last page, a few seconds of rotations).
const FULL_FOR: Duration = Duration::from_secs(6);

fn root_with_unshare(test: &str) -> bool {
    let root = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .map(|v| v.split_whitespace().next() == Some("0"))
        })
        .unwrap_or(false);
    if root && which("unshare").is_some() {
        return true;
    }
    assert!(
        !in_ci(),
        "{test}: needs root and unshare (util-linux) to mount a tmpfs in a mount namespace"
    );
    eprintln!("SKIP {test}: needs root and `unshare` to mount a small tmpfs in a mount namespace");
    false
}

/// Writes `path` until the filesystem is full; returns the bytes written.
fn fill(path: &Path) -> anyhow::Result<u64> {
    let mut f = std::fs::File::create(path)?;
    let chunk = vec![0x5a_u8; 16 * 1024];
    let mut total = 0u64;
    loop {
        match f.write(&chunk) {
            Ok(0) => break,
            Ok(n) => total += n as u64,
            Err(e) if e.raw_os_error() == Some(28) => break, // ENOSPC
            Err(e) => return Err(e).context("filling the state tmpfs"),
        }
    }
    // Whatever a page still holds.
    let _ = f.write_all(&[0u8; 1]);
    Ok(total)
}

/// Serials of every `issued` line, and how many lines are not whole JSON objects.
fn audit_serials(state: &Path) -> anyhow::Result<(BTreeSet<String>, usize)> {
    let text = std::fs::read_to_string(state.join("audit.log"))?;
    let mut serials = BTreeSet::new();
    let mut torn = 0;
    for line in text.lines() {
        match serde_json::from_str::<serde_json::Value>(line) {
            Ok(v) if v["event"] == "issued" => {
                serials.insert(v["serial"].as_str().unwrap_or_default().to_owned());
            }
            Ok(_) => {}
            Err(_) => torn += 1,
        }
    }
    Ok((serials, torn))
}

async fn refused_audit(mesh: &Mesh) -> anyhow::Result<f64> {
    Ok(mesh.cp.metrics().await?.sum_or_zero(
        "trellis_issuances_refused_total",
        &[("reason", "audit_write")],
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_state_disk_refuses_unrecorded_issuance_and_recovers() -> anyhow::Result<()> {
    e2e(async {
        let test = "full_state_disk_refuses_unrecorded_issuance_and_recovers";
        if !root_with_unshare(test) {
            return Ok(());
        }
        let margin = vec!["--expiry-margin".to_string(), "2s".to_string()];
        let mesh = Mesh::start(MeshOpts {
            control: ControlPlaneOpts {
                svid_ttl: Some("30s".into()),
                rotate_every: Some("1s".into()),
                state_tmpfs: Some("4m".into()),
                ..Default::default()
            },
            a_args: margin.clone(),
            b_args: margin,
            ..Default::default()
        })
        .await?;
        let state = mesh.cp.state_dir.clone();
        let token = mesh.cp.create_token("spiffe://example.org/ns/demo/sa/late", "10m")?;

        let load = Load::start(LoadOpts::new(mesh.a.outbound(), "b", "app-b"));
        tokio::time::sleep(Duration::from_secs(2)).await;
        let mut presented = BTreeSet::new();
        presented.insert(mesh.b.svid_serial().await?);

        let event = load.mark("disk full");
        let filler = state.join("filler");
        let filled = fill(&filler)?;
        let filled_at = Instant::now();
        let refused_before = refused_audit(&mesh).await?;
        // A rotation soon finds no room for its audit line.
        eventually(Duration::from_secs(20), "a rotation refused for its audit line", || async {
            let n = refused_audit(&mesh).await?;
            if n > refused_before {
                Ok(())
            } else {
                bail!("trellis_issuances_refused_total{{reason=\"audit_write\"}} = {n}")
            }
        })
        .await?;
        let full_at = Instant::now();
        let refusal = match fetch_svid(&mesh.cp, &token).await {
            Ok((svid, _)) => bail!("a new workload was issued {} on a full disk", svid.spiffe_id()),
            Err(e) => {
                let msg = format!("{e:#}");
                ensure!(grpc_code(&e) == Some(tonic::Code::Unavailable), "want UNAVAILABLE: {msg}");
                ensure!(
                    msg.contains("audit log") || msg.contains("state database is unavailable"),
                    "the refusal must say why: {msg}"
                );
                msg
            }
        };
        while full_at.elapsed() < FULL_FOR {
            presented.insert(mesh.b.svid_serial().await?);
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let refused_while_full = refused_audit(&mesh).await? - refused_before;
        let (_, torn) = audit_serials(&state)?;
        ensure!(torn == 0, "{torn} torn line(s) in the audit log");

        std::fs::remove_file(&filler)?;
        let freed = Instant::now();
        load.end(event);
        let serial_full = mesh.b.svid_serial().await?;
        let rotated_after = mesh
            .b
            .next_svid_serial(&serial_full, Duration::from_secs(30))
            .await
            .map(|s| (s, freed.elapsed()))
            .context("B rotates once space returns")?;
        presented.insert(rotated_after.0.clone());
        let joined_after = eventually(Duration::from_secs(30), "the new workload joins", || async {
            fetch_svid(&mesh.cp, &token).await.map(|_| freed.elapsed())
        })
        .await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let report = load.stop().await;
        report.print(&format!("state tmpfs full for {}s", FULL_FOR.as_secs()));
        let (audited, torn) = audit_serials(&state)?;
        let unaudited: Vec<&String> = presented.difference(&audited).collect();
        println!(
            "[disk] filled with {filled} bytes; first refusal {:.1}s later; {refused_while_full} issuances refused while full; refusal: {refusal}; \
             B rotated {:.1}s and a new workload joined {:.1}s after space returned; {} serials B presented, all audited",
            (full_at - filled_at).as_secs_f64(),
            rotated_after.1.as_secs_f64(),
            joined_after.as_secs_f64(),
            presented.len()
        );
        report.assert_no_failures()?;
        let during = report.events.first().context("event")?;
        let sent = report.sent_between(during.from, during.to.context("end")?);
        ensure!(sent >= 100, "only {sent} requests while the disk was full");
        ensure!(refused_while_full >= 2.0, "only {refused_while_full} issuances refused while full");
        ensure!(torn == 0, "{torn} torn line(s) in the audit log");
        ensure!(unaudited.is_empty(), "B presented certificates without an audit line: {unaudited:?}");
        Ok(())
    })
    .await
}

/// The state directory is renamed away under load (what a removed or unmounted volume looks
/// like to a process holding its files open), then put back. SQLite and the audit log would
/// keep writing to files nobody will find again; instead issuance is refused (no SVID
/// without a record someone can read), a join is refused `UNAVAILABLE` without spending the
/// token, `/ready` and `trellis_database_up` name the missing database, traffic carries on,
/// and everything resumes when the directory is back, without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vanished_state_directory_refuses_issuance_and_recovers() -> anyhow::Result<()> {
    e2e(async {
        let margin = vec!["--expiry-margin".to_string(), "2s".to_string()];
        let mesh = Mesh::start(MeshOpts {
            control: ControlPlaneOpts {
                svid_ttl: Some("30s".into()),
                rotate_every: Some("1s".into()),
                ..Default::default()
            },
            a_args: margin.clone(),
            b_args: margin,
            ..Default::default()
        })
        .await?;
        let state = mesh.cp.state_dir.clone();
        let gone = state.with_extension("gone");
        let bundle = mesh.cp.bundle()?;
        let token = mesh.cp.create_token("spiffe://example.org/ns/demo/sa/late", "10m")?;
        let load = Load::start(LoadOpts::new(mesh.a.outbound(), "b", "app-b"));
        tokio::time::sleep(Duration::from_secs(2)).await;
        let mut presented = BTreeSet::new();
        presented.insert(mesh.b.svid_serial().await?);

        let event = load.mark("state directory gone");
        let refused_before = refused_audit(&mesh).await?;
        std::fs::rename(&state, &gone)?;
        let moved = Instant::now();
        eventually(Duration::from_secs(20), "a rotation refused for its audit line", || async {
            let n = refused_audit(&mesh).await?;
            if n >= refused_before + 2.0 {
                Ok(())
            } else {
                bail!("trellis_issuances_refused_total{{reason=\"audit_write\"}} = {n}")
            }
        })
        .await?;
        let detected = moved.elapsed();
        let refusal = match fetch_svid_trusting(&mesh.cp, bundle.clone(), &token).await {
            Ok((svid, _)) => bail!("a new workload was issued {} with no state directory", svid.spiffe_id()),
            Err(e) => {
                let msg = format!("{e:#}");
                ensure!(grpc_code(&e) == Some(tonic::Code::Unavailable), "want UNAVAILABLE: {msg}");
                ensure!(msg.contains("gone"), "the refusal must say the state is gone: {msg}");
                msg
            }
        };
        // The database check runs with the once-a-second CA poll: give it a few.
        eventually(Duration::from_secs(10), "the control plane reports the database gone", || async {
            let up = mesh.cp.metrics().await?.series("trellis_database_up");
            ensure!(up == 0.0, "trellis_database_up is {up} while the database file is gone");
            let ready = mesh.cp.admin_get("/ready").await?;
            ensure!(ready.text().contains("gone"), "/ready must name the missing database: {}", ready.text());
            Ok(())
        })
        .await?;
        let held_from = Instant::now();
        while held_from.elapsed() < Duration::from_secs(3) {
            presented.insert(mesh.b.svid_serial().await?);
            tokio::time::sleep(Duration::from_millis(500)).await;
        }

        std::fs::rename(&gone, &state)?;
        let back = Instant::now();
        load.end(event);
        let serial_gone = mesh.b.svid_serial().await?;
        let rotated = mesh
            .b
            .next_svid_serial(&serial_gone, Duration::from_secs(30))
            .await
            .map(|s| (s, back.elapsed()))
            .context("B rotates once the directory is back")?;
        presented.insert(rotated.0.clone());
        eventually(Duration::from_secs(30), "the token refused meanwhile joins", || async {
            fetch_svid(&mesh.cp, &token).await.map(|_| ())
        })
        .await?;
        let report = load.stop().await;
        report.print("state directory renamed away for 3 s");
        let (audited, torn) = audit_serials(&state)?;
        let unaudited: Vec<&String> = presented.difference(&audited).collect();
        println!(
            "[disk] state directory renamed away: issuance refused within {:.1}s; join refused: {refusal}; \
             B rotated {:.1}s after it came back; {} serials B presented, all audited",
            detected.as_secs_f64(),
            rotated.1.as_secs_f64(),
            presented.len()
        );
        report.assert_no_failures()?;
        let during = report.events.first().context("event")?;
        let sent = report.sent_between(during.from, during.to.context("end")?);
        ensure!(sent >= 50, "only {sent} requests while the state directory was gone");
        ensure!(torn == 0, "{torn} torn line(s) in the audit log");
        ensure!(unaudited.is_empty(), "B presented certificates without a readable audit line: {unaudited:?}");
        Ok(())
    })
    .await
}

/// A state directory that is read-only when the control plane starts (a volume mounted `ro`
/// by mistake): it refuses to start, naming the directory and the cause.
#[test]
fn read_only_state_directory_is_refused_at_start() -> anyhow::Result<()> {
    if !root_with_unshare("read_only_state_directory_is_refused_at_start") {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let state = dir.path().join("state");
    std::fs::create_dir(&state)?;
    let mut cmd = std::process::Command::new("unshare");
    cmd.args(["-m", "--propagation", "private", "sh", "-c"])
        .arg(r#"mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$1" control --trust-domain example.org --state-dir "$0" --listen 127.0.0.1:0 --admin 127.0.0.1:0"#)
        .arg(&state)
        .arg(trellis_tests::trellis_bin());
    let out = trellis_tests::run_with_timeout(cmd, trellis_tests::COMMAND_TIMEOUT)?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success(),
        "started on a read-only state directory: {stderr}"
    );
    ensure!(
        stderr.contains(&state.display().to_string()) && stderr.contains("Read-only file system"),
        "the error must name the directory and the cause: {stderr}"
    );
    Ok(())
}
