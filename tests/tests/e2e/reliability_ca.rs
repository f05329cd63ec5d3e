//! CA rotation under load (issue #5, scenario 2): `trellis ca rotate` for a root and for an
//! intermediate while requests flow app A → sidecar A → sidecar B → app B. The new CA must
//! reach every sidecar's bundle before anything it signed is presented, the old one must
//! leave only once its SVIDs have expired, and no request may fail. The load runs over
//! sidecar A's pooled connection, which nothing re-verifies, so fresh mTLS handshakes with
//! sidecar B (new client SVID, bundle of the moment) probe every 0.5 s through the event.
//!
//! Issue #17, scenario 7 (new workloads during a CA rotation): a sidecar started after
//! activation with the pre-rotation bootstrap bundle still reaches the control plane (which
//! serves its own certificate from the oldest CA in the bundle), gets an SVID from the new
//! CA and serves traffic; at retirement the control plane switches to the new CA, and a
//! sidecar whose bootstrap bundle holds only the new root joins.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use tokio::sync::Notify;
use trellis_identity::tls::PeerMatch;
use trellis_tests::app_client::{echo_json, get_once, Proto};
use trellis_tests::echo::EchoApp;
use trellis_tests::load::{Load, LoadOpts};
use trellis_tests::mesh::{Mesh, MeshOpts, B_ID};
use trellis_tests::openssl::InitCa;
use trellis_tests::probe::ProbeClient;
use trellis_tests::sidecar::{Sidecar, SidecarOpts};
use trellis_tests::{
    e2e, eventually, peer_leaf, run_with_timeout, tls_client_config, tls_connect, trellis_bin,
    ControlPlane, ControlPlaneOpts, COMMAND_TIMEOUT,
};

/// SVIDs live 10 s here: `/ready` must not count them as about to expire.
fn short_margin() -> Vec<String> {
    vec!["--expiry-margin".into(), "2s".into()]
}

/// What a sidecar's `/certs` says: the bundle's CA subjects and its SVID's issuer.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    bundle: Vec<String>,
    issuer: String,
}

async fn seen(s: &Sidecar) -> anyhow::Result<Seen> {
    let r = s.admin_get("/certs").await?;
    let v: serde_json::Value = serde_json::from_str(&r.text())?;
    let bundle = v["bundle"]
        .as_array()
        .context("bundle")?
        .iter()
        .filter_map(|c| c["subject"].as_str().map(str::to_owned))
        .collect();
    let issuer = v["svid"]["issuer"]
        .as_str()
        .context("svid.issuer")?
        .to_owned();
    Ok(Seen { bundle, issuer })
}

fn subject_of(pem_file: &Path) -> anyhow::Result<String> {
    let pem = std::fs::read(pem_file)?;
    let certs = trellis_identity::certs_from_pem(&pem)?;
    Ok(trellis_identity::cert_facts(certs.first().context("no cert")?)?.subject)
}

fn bundle_subjects(cp: &ControlPlane) -> anyhow::Result<Vec<String>> {
    Ok(cp
        .bundle()?
        .roots()
        .iter()
        .map(|r| trellis_identity::cert_facts(r).map(|f| f.subject))
        .collect::<Result<_, _>>()?)
}

pub(crate) fn ca_rotate(cp: &ControlPlane, args: &[&str]) -> anyhow::Result<String> {
    let mut cmd = Command::new(trellis_bin());
    cmd.args(["ca", "rotate", "--state-dir"])
        .arg(&cp.state_dir)
        .args(["--trust-domain", cp.trust_domain.as_str()])
        .args(args);
    let out = run_with_timeout(cmd, COMMAND_TIMEOUT)?;
    if !out.status.success() {
        bail!(
            "trellis ca rotate failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Polls both sidecars until both present SVIDs issued by `new_issuer`; returns, per
/// sidecar, the poll in which the bundle first held `new_root` (if it changes) and the poll in
/// which its SVID first came from `new_issuer`, plus every bundle size seen and when the
/// first new SVID was seen.
async fn watch_switch(
    mesh: &Mesh,
    new_root: Option<&str>,
    new_issuer: &str,
) -> anyhow::Result<([Option<usize>; 2], [Option<usize>; 2], Vec<usize>, Instant)> {
    let mut trusted = [None, None];
    let mut signed = [None, None];
    let mut sizes = Vec::new();
    let mut first_signed_at = None;
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut poll = 0usize;
    while signed.iter().any(Option::is_none) {
        if Instant::now() > deadline {
            bail!("sidecars did not switch to SVIDs from {new_issuer} within 90s: trusted={trusted:?} signed={signed:?}");
        }
        for (i, s) in [&mesh.a, &mesh.b].into_iter().enumerate() {
            let seen = seen(s).await?;
            sizes.push(seen.bundle.len());
            if new_root.is_some_and(|r| seen.bundle.iter().any(|b| b == r)) {
                trusted[i].get_or_insert(poll);
            }
            if seen.issuer == new_issuer {
                signed[i].get_or_insert(poll);
                first_signed_at.get_or_insert_with(Instant::now);
            }
        }
        poll += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let first_signed_at = first_signed_at.context("no new SVID seen")?;
    Ok((trusted, signed, sizes, first_signed_at))
}

/// The issuer of the certificate the control plane's SDS listener presents to a fresh
/// handshake that trusts only `bundle` (fails if that bundle cannot verify it).
async fn control_cert_issuer(cp: &ControlPlane, bundle: &Path) -> anyhow::Result<String> {
    let pem = std::fs::read(bundle)?;
    let bundle = trellis_identity::TrustBundle::from_pem(cp.trust_domain.clone(), &pem)
        .map_err(|e| anyhow::anyhow!("{}: {e}", bundle.display()))?;
    let config = tls_client_config(bundle, PeerMatch::Exact(cp.control_id()), None, &[b"h2"])?;
    let tls = tls_connect(cp.sds_addr, config).await?;
    Ok(trellis_identity::cert_facts(&peer_leaf(&tls)?)
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .issuer)
}

/// Starts app C behind sidecar C (upstream `b` → sidecar B) with `control_bundle` as its
/// bootstrap bundle, waits until it is ready and a request C → B is answered by app B.
async fn start_c(
    mesh: &Mesh,
    name: &str,
    control_bundle: &Path,
) -> anyhow::Result<(EchoApp, Sidecar)> {
    let app = EchoApp::start(&format!("app-{name}")).await?;
    let mut opts = SidecarOpts::new(
        &format!("sidecar-{name}"),
        &format!("spiffe://example.org/ns/demo/sa/{name}"),
        app.addr,
    )
    .upstream("b", mesh.b.addrs.inbound, B_ID);
    opts.extra_args = short_margin();
    opts.control_bundle = Some(control_bundle.to_owned());
    let sidecar = tokio::time::timeout(Duration::from_secs(30), Sidecar::start(&mesh.cp, opts))
        .await
        .with_context(|| format!("sidecar-{name} got no SVID within 30s"))??;
    for i in 0..20 {
        let reply = get_once(
            sidecar.outbound(),
            Proto::H1,
            "b",
            &format!("/from-{name}/{i}"),
            &[],
        )
        .await?;
        let echo = echo_json(&reply)?;
        anyhow::ensure!(echo["app"] == "app-b", "sidecar-{name} → b reached {echo}");
    }
    Ok((app, sidecar))
}

fn audit_phases(cp: &ControlPlane) -> anyhow::Result<Vec<(i64, String)>> {
    let text = std::fs::read_to_string(cp.state_dir.join("audit.log"))?;
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["event"] == "ca_phase")
        .map(|v| {
            (
                v["rotation"].as_i64().unwrap_or(-1),
                v["phase"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_rotation_overlaps_and_drops_no_request() -> anyhow::Result<()> {
    e2e(async {
        // Short lifetimes so the whole overlap fits in a test: SVIDs live 10 s, so the old
        // root may leave the bundle 10 s + 60 s (clock-skew allowance) after the switch.
        let mesh = Mesh::start(MeshOpts {
            control: ControlPlaneOpts {
                svid_ttl: Some("10s".into()),
                rotate_every: Some("2s".into()),
                ..Default::default()
            },
            a_args: short_margin(),
            b_args: short_margin(),
            ..Default::default()
        })
        .await?;
        let old_root = bundle_subjects(&mesh.cp)?;
        assert_eq!(old_root.len(), 1, "{old_root:?}");
        let old_root = old_root[0].clone();
        // What operators handed to sidecars before the rotation, and did not refresh.
        let pre_rotation_bundle = mesh.cp.dir.path().join("pre-rotation-bundle.pem");
        std::fs::copy(&mesh.cp.bundle_pem_path, &pre_rotation_bundle)?;
        assert_eq!(control_cert_issuer(&mesh.cp, &pre_rotation_bundle).await?, old_root);

        let mut prober = ProbeClient::fetch(&mesh.cp, "spiffe://example.org/ns/demo/sa/probe", Duration::from_secs(3)).await?;
        let stop_probes = Notify::new();
        let probes = prober.run_until(
            &mesh.cp,
            mesh.b.addrs.inbound,
            B_ID,
            "app-b",
            PROBE_EVERY,
            &stop_probes,
        );
        let scenario = async {
            let r = rotation_scenario(&mesh, &old_root, &pre_rotation_bundle).await;
            stop_probes.notify_one();
            r
        };
        let (probes, scenario) = tokio::join!(probes, scenario);
        let (report, new_root, switched_at) = scenario?;
        let (before, after) = probes.ok.iter().partition::<Vec<_>, _>(|p| p.issuer == old_root);
        println!(
            "[ca] fresh handshakes with sidecar B: {} ({} failed), {} saw an old-root certificate, {} a new-root one",
            probes.attempted(),
            probes.failed.len(),
            before.len(),
            after.len()
        );
        report.assert_no_failures()?;
        probes.assert_all_ok(60)?;
        // Probes ran on both sides of the switch, and after it B presented the new root.
        anyhow::ensure!(
            !before.is_empty() && after.iter().all(|p| p.issuer == new_root),
            "probes saw issuers {:?}",
            probes.ok.iter().map(|p| &p.issuer).collect::<std::collections::BTreeSet<_>>()
        );
        anyhow::ensure!(
            after.iter().filter(|p| p.at > switched_at).count() >= 20,
            "fewer than 20 fresh handshakes after B switched to the new root"
        );
        Ok(())
    })
    .await
}

/// Time between two fresh-handshake probes.
const PROBE_EVERY: Duration = Duration::from_millis(500);

/// The root rotation itself, under load; returns the load report, the new root's subject and
/// when B first presented a new-root SVID.
async fn rotation_scenario(
    mesh: &Mesh,
    old_root: &str,
    pre_rotation_bundle: &Path,
) -> anyhow::Result<(trellis_tests::load::LoadReport, String, Instant)> {
    let load = Load::start(LoadOpts::new(mesh.a.outbound(), "b", "app-b"));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let event = load.mark("root rotation");
    let scheduled = Instant::now();
    let out = ca_rotate(&mesh.cp, &["--activate-after", "5s"])?;
    println!("{out}");

    let both = eventually(
        Duration::from_secs(10),
        "bundle.pem holds two roots",
        || async {
            let s = bundle_subjects(&mesh.cp)?;
            if s.len() == 2 {
                Ok(s)
            } else {
                bail!("{s:?}")
            }
        },
    )
    .await?;
    let new_root = both
        .into_iter()
        .find(|s| s != old_root)
        .context("new root")?;

    let (trusted, signed, sizes, first_signed_at) =
        watch_switch(mesh, Some(&new_root), &new_root).await?;
    let first_signed = signed.iter().flatten().min().copied().context("signed")?;
    for (name, t) in ["sidecar A", "sidecar B"].iter().zip(trusted) {
        let t = t.with_context(|| format!("{name} never had the new root in its bundle"))?;
        // Overlap: every sidecar trusts the new root before any SVID it signed exists, as
        // seen in an earlier poll (not the same one).
        anyhow::ensure!(
            t < first_signed,
            "{name} trusted the new root in poll {t}, not before the first SVID it signed (poll {first_signed})"
        );
    }
    println!(
        "[ca] new root in both bundles by poll {:?}; first new-root SVID {:.1}s after `ca rotate` (poll {first_signed})",
        trusted,
        (first_signed_at - scheduled).as_secs_f64(),
    );
    anyhow::ensure!(sizes.iter().all(|n| (1..=2).contains(n)), "{sizes:?}");

    // Scenario 7: activated, not retired. The control plane still presents an old-root
    // certificate, so a sidecar with the pre-rotation bootstrap bundle joins, is issued a
    // new-root SVID and serves traffic.
    anyhow::ensure!(
        control_cert_issuer(&mesh.cp, pre_rotation_bundle).await? == old_root,
        "after activation the control plane must still present a certificate from the old root"
    );
    let joined = Instant::now();
    let (_app_c, c) = start_c(mesh, "c", pre_rotation_bundle).await?;
    println!(
        "[ca] sidecar C (pre-rotation bootstrap bundle) ready and serving {:.1}s after it started, {:.1}s after activation",
        joined.elapsed().as_secs_f64(),
        (Instant::now() - first_signed_at).as_secs_f64()
    );
    anyhow::ensure!(
        seen(&c).await?.issuer == new_root,
        "sidecar C's SVID is not from the new root"
    );

    // The old root leaves once every SVID it signed has expired, and sidecars follow.
    eventually(
        Duration::from_secs(120),
        "old root leaves every bundle",
        || async {
            let cp = bundle_subjects(&mesh.cp)?;
            let a = seen(&mesh.a).await?.bundle;
            let b = seen(&mesh.b).await?.bundle;
            let c = seen(&c).await?.bundle;
            if [&cp, &a, &b, &c]
                .iter()
                .all(|s| s.as_slice() == [new_root.clone()])
            {
                Ok(())
            } else {
                bail!("control plane {cp:?}, A {a:?}, B {b:?}, C {c:?}")
            }
        },
    )
    .await?;
    let retired_after = scheduled.elapsed();
    // Retired: the control plane now serves from the new root, which a bootstrap bundle
    // holding only the new root verifies; sidecar C (bundle now from SDS) keeps serving.
    anyhow::ensure!(
        control_cert_issuer(&mesh.cp, &mesh.cp.bundle_pem_path).await? == new_root,
        "after retirement the control plane must present a certificate from the new root"
    );
    let (_app_d, _d) = start_c(mesh, "d", &mesh.cp.bundle_pem_path).await?;
    let reply = get_once(
        c.outbound(),
        Proto::H1,
        "b",
        "/from-c/after-retirement",
        &[],
    )
    .await?;
    anyhow::ensure!(
        echo_json(&reply)?["app"] == "app-b",
        "C → B after retirement"
    );
    load.end(event);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let report = load.stop().await;
    report.print("root rotation (activate after 5s, SVID TTL 10s)");
    println!(
        "[ca] old root left every bundle {:.1}s after `ca rotate`",
        retired_after.as_secs_f64()
    );

    let phases = audit_phases(&mesh.cp)?;
    for want in [
        (1, "prepared"),
        (0, "retiring"),
        (1, "active"),
        (0, "retired"),
    ] {
        anyhow::ensure!(
            phases.iter().any(|(id, p)| *id == want.0 && p == want.1),
            "audit log lacks {want:?}: {phases:?}"
        );
    }
    // When B's first new-root SVID was seen: probes after it must meet the new root.
    let switched_at = first_signed_at;
    Ok((report, new_root, switched_at))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn intermediate_rotation_keeps_the_bundle_and_drops_no_request() -> anyhow::Result<()> {
    e2e(async {
        let dir = tempfile::tempdir()?;
        let first = InitCa::create("example.org", &dir.path().join("first"))?;
        let mesh = Mesh::start(MeshOpts {
            control: ControlPlaneOpts {
                svid_ttl: Some("10s".into()),
                rotate_every: Some("2s".into()),
                extra_args: vec![
                    "--ca-cert".into(),
                    first.intermediate().display().to_string(),
                    "--ca-key".into(),
                    first.intermediate_key().display().to_string(),
                    "--ca-bundle".into(),
                    first.bundle().display().to_string(),
                ],
                ..Default::default()
            },
            a_args: short_margin(),
            b_args: short_margin(),
            ..Default::default()
        })
        .await?;
        let root = bundle_subjects(&mesh.cp)?;

        // A second intermediate under the same offline root.
        let second = dir.path().join("second");
        let mut cmd = Command::new(trellis_bin());
        cmd.args(["ca", "init", "--trust-domain", "example.org", "--out"])
            .arg(&second)
            .arg("--root-cert")
            .arg(first.dir.join("root.pem"))
            .arg("--root-key")
            .arg(first.dir.join("root-key.pem"));
        let out = run_with_timeout(cmd, COMMAND_TIMEOUT)?;
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let second = InitCa { dir: second };
        let old_issuer = subject_of(&first.intermediate())?;
        let new_issuer = subject_of(&second.intermediate())?;
        assert_ne!(old_issuer, new_issuer, "intermediates must be told apart");
        assert_eq!(seen(&mesh.a).await?.issuer, old_issuer);

        let load = Load::start(LoadOpts::new(mesh.a.outbound(), "b", "app-b"));
        tokio::time::sleep(Duration::from_secs(2)).await;
        let event = load.mark("intermediate rotation");
        let scheduled = Instant::now();
        let second_cert = second.intermediate().display().to_string();
        let second_key = second.intermediate_key().display().to_string();
        let second_bundle = second.bundle().display().to_string();
        ca_rotate(
            &mesh.cp,
            &[
                "--activate-after",
                "3s",
                "--ca-cert",
                &second_cert,
                "--ca-key",
                &second_key,
                "--ca-bundle",
                &second_bundle,
            ],
        )?;
        let (_, _, sizes, _) = watch_switch(&mesh, None, &new_issuer).await?;
        // Same root: the bundle never changes.
        assert!(sizes.iter().all(|n| *n == 1), "{sizes:?}");
        assert_eq!(bundle_subjects(&mesh.cp)?, root);
        println!(
            "[ca] both sidecars on the new intermediate {:.1}s after `ca rotate`",
            scheduled.elapsed().as_secs_f64()
        );
        // Keep load across a few more rotations on the new intermediate.
        tokio::time::sleep(Duration::from_secs(5)).await;
        load.end(event);
        let report = load.stop().await;
        report.print("intermediate rotation (same root, activate after 3s)");

        // A second rotation while one is pending is refused with a clear message.
        let err = {
            ca_rotate(&mesh.cp, &["--activate-after", "1h"])?;
            ca_rotate(&mesh.cp, &["--activate-after", "1h"]).unwrap_err()
        };
        assert!(format!("{err:#}").contains("already scheduled"), "{err:#}");
        report.assert_no_failures()
    })
    .await
}

#[test]
fn rotate_refuses_bad_input() -> anyhow::Result<()> {
    let cp = ControlPlane::start(ControlPlaneOpts::default())?;
    let dir = tempfile::tempdir()?;
    // Missing state.
    let mut cmd = Command::new(trellis_bin());
    cmd.args([
        "ca",
        "rotate",
        "--trust-domain",
        "example.org",
        "--state-dir",
    ])
    .arg(dir.path().join("nothing"));
    let out = run_with_timeout(cmd, COMMAND_TIMEOUT)?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no control-plane state here"));
    // A CA for another trust domain.
    let other = InitCa::create("other.org", &dir.path().join("other"))?;
    let err = ca_rotate(
        &cp,
        &[
            "--ca-cert",
            &other.intermediate().display().to_string(),
            "--ca-key",
            &other.intermediate_key().display().to_string(),
            "--ca-bundle",
            &other.bundle().display().to_string(),
        ],
    )
    .unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("intermediate.pem") && msg.contains("other.org"),
        "{msg}"
    );
    // Too short an overlap.
    let err = ca_rotate(&cp, &["--activate-after", "0s"]).unwrap_err();
    assert!(format!("{err:#}").contains("at least 1s"), "{err:#}");
    Ok(())
}
