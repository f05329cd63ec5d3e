//! Issue #17, scenario 1: the state database goes away under load. Two control-plane
//! replicas share a PostgreSQL of the test's own, which is stopped with
//! `pg_ctl stop -m immediate` (a crash, as clients see it) while app A → sidecar A → sidecar
//! B → app B carries load, then started again.
//!
//! The outage lasts 60 s, as the issue asks (`TRELLIS_TEST_DB_OUTAGE_SECS` sets another
//! length, e.g. 15 for a quicker local run). Asserts, while the database is down:
//! no request fails (and the outage window carries requests); sidecar B keeps rotating (SVIDs
//! from the audit log, records queued); a join token redeemed on either replica is refused
//! with `UNAVAILABLE` and a message naming the database, and stays unspent; both replicas
//! report `trellis_database_up 0` and a degraded `/ready` naming the database. After it is
//! back, without restarting anything: both replicas redeem the tokens refused during the
//! outage, report `trellis_database_up 1`, and every SVID issued during the outage has its
//! issuance record in the database.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};
use trellis_tests::load::{Load, LoadOpts};
use trellis_tests::mesh::{Mesh, MeshOpts, B_ID};
use trellis_tests::postgres::TestPostgres;
use trellis_tests::{e2e, eventually, fetch_svid, grpc_code, ControlPlane, ControlPlaneOpts};

/// The outage length: 60 s (issue #17), or `TRELLIS_TEST_DB_OUTAGE_SECS`.
fn outage() -> Duration {
    let secs = std::env::var("TRELLIS_TEST_DB_OUTAGE_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    Duration::from_secs(secs)
}

async fn database_up(cp: &ControlPlane) -> anyhow::Result<f64> {
    cp.metrics().await?.get("trellis_database_up", &[])
}

/// The refusal a redemption of `token` on `cp` gets: must be `UNAVAILABLE` naming the database.
async fn refused_unavailable(cp: &ControlPlane, token: &str) -> anyhow::Result<String> {
    match fetch_svid(cp, token).await {
        Ok((svid, _)) => bail!("redeemed while the database is down: {}", svid.spiffe_id()),
        Err(e) => {
            let code = grpc_code(&e);
            let msg = format!("{e:#}");
            ensure!(
                code == Some(tonic::Code::Unavailable),
                "want UNAVAILABLE, got {code:?}: {msg}"
            );
            ensure!(
                msg.contains("state database is unavailable") && msg.contains("not spent"),
                "{msg}"
            );
            Ok(msg)
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_outage_under_load_loses_nothing() -> anyhow::Result<()> {
    e2e(async {
        let Some(pg) = TestPostgres::start_own_or_skip("postgres_outage_under_load_loses_nothing")?
        else {
            return Ok(());
        };
        let schema = pg.fresh_schema("outage")?;
        let db = vec!["--database".to_string(), schema.url.clone()];
        let margin = vec!["--expiry-margin".to_string(), "2s".to_string()];
        let control = ControlPlaneOpts {
            svid_ttl: Some("20s".into()),
            rotate_every: Some("2s".into()),
            extra_args: db.clone(),
            ..Default::default()
        };
        let mesh = Mesh::start(MeshOpts {
            control: control.clone(),
            a_args: margin.clone(),
            b_args: margin,
            ..Default::default()
        })
        .await?;
        let r2 = ControlPlane::start(control)?;
        let (r1, cps) = (&mesh.cp, [&mesh.cp, &r2]);
        // Made while the database is up, redeemed while it is down, then again after.
        let tokens = [
            r1.create_token("spiffe://example.org/ns/demo/sa/late-1", "10m")?,
            r1.create_token("spiffe://example.org/ns/demo/sa/late-2", "10m")?,
        ];
        for cp in cps {
            ensure!(database_up(cp).await? == 1.0, "database_up before the outage");
        }

        let load = Load::start(LoadOpts::new(mesh.a.outbound(), "b", "app-b"));
        tokio::time::sleep(Duration::from_secs(2)).await;
        let rotations_before = mesh.b.metrics().await?.sum("trellis_svid_rotations_total", &[]);

        let event = load.mark("database down");
        let stopped = Instant::now();
        pg.stop_immediate()?;
        // Both replicas notice (the CA poll reads once a second) and say so.
        let detected = eventually(Duration::from_secs(10), "both replicas report the database down", || async {
            for cp in cps {
                let up = database_up(cp).await?;
                if up != 0.0 {
                    bail!("{} still says trellis_database_up {up}", cp.sds_addr);
                }
            }
            Ok(stopped.elapsed())
        })
        .await?;
        for cp in cps {
            let ready = cp.admin_get("/ready").await?;
            ensure!(ready.status == 200, "/ready {} during the outage", ready.status);
            ensure!(
                ready.text().starts_with("ready (degraded)")
                    && ready.text().contains("failing since")
                    && ready.text().contains(pg.base_url().split('@').nth(1).unwrap_or("?")),
                "/ready: {}",
                ready.text()
            );
        }
        let mut refusals = Vec::new();
        for (cp, token) in cps.iter().zip(&tokens) {
            refusals.push(refused_unavailable(cp, token).await?);
        }
        // SVIDs B is issued while the database is down.
        let mut serials = BTreeSet::new();
        while stopped.elapsed() < outage() {
            serials.insert(mesh.b.svid_serial().await?);
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let rotations_during =
            mesh.b.metrics().await?.sum("trellis_svid_rotations_total", &[]) - rotations_before;

        pg.start_again()?;
        let restarted = Instant::now();
        load.end(event);
        // Without restarting a replica: each redeems the token it refused.
        let mut redeemed_after = Vec::new();
        for (cp, token) in cps.iter().zip(&tokens) {
            eventually(Duration::from_secs(30), "a refused token redeems after the outage", || async {
                fetch_svid(cp, token).await.map(|_| ())
            })
            .await?;
            redeemed_after.push(restarted.elapsed());
        }
        let healthy_after = eventually(Duration::from_secs(30), "both replicas report the database up", || async {
            for cp in cps {
                let up = database_up(cp).await?;
                if up != 1.0 {
                    bail!("{} says trellis_database_up {up}", cp.sds_addr);
                }
            }
            Ok(restarted.elapsed())
        })
        .await?;
        // Every SVID issued during the outage has its record (written once the database was
        // back), none was dropped.
        let serial_list: Vec<String> = serials.iter().map(|s| format!("'{s}'")).collect();
        let recorded = eventually(Duration::from_secs(30), "issuance records of the outage", || async {
            let n: usize = schema
                .query(&format!(
                    "SELECT count(DISTINCT serial) FROM issuances WHERE spiffe_id = '{B_ID}' AND serial IN ({})",
                    serial_list.join(",")
                ))?
                .trim()
                .parse()?;
            if n == serials.len() {
                Ok(n)
            } else {
                bail!("{n} of {} serials recorded", serials.len())
            }
        })
        .await?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let report = load.stop().await;
        report.print(&format!("PostgreSQL down for {}s, two replicas", outage().as_secs()));
        println!(
            "[db] outage detected by both replicas {:.1}s after the stop; B rotated {rotations_during} times while down \
             ({} serials seen, all {recorded} recorded after); tokens redeemed {:.1}s / {:.1}s after the restart; \
             trellis_database_up 1 on both {:.1}s after; refusal: {}",
            detected.as_secs_f64(),
            serials.len(),
            redeemed_after[0].as_secs_f64(),
            redeemed_after[1].as_secs_f64(),
            healthy_after.as_secs_f64(),
            refusals[0],
        );
        report.assert_no_failures()?;
        let during = report.events.first().context("event")?;
        let sent = report.sent_between(during.from, during.to.context("end")?);
        ensure!(sent >= 200, "only {sent} requests during the outage");
        ensure!(
            rotations_during >= 2.0 && serials.len() >= 2,
            "B rotated {rotations_during} times ({} serials) during the outage: rotations must not need the database",
            serials.len()
        );
        Ok(())
    })
    .await
}
