//! `--worker-threads 2`: a pair of sidecars, each with two single-threaded workers, serves
//! concurrent requests on many connections, spreads the connections over both workers
//! (`trellis_worker_connections_total{worker}`), and drains in-flight requests on every worker
//! on SIGTERM.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _};
use bytes::Bytes;
use http::StatusCode;
use trellis_tests::app_client::{echo_json, AppConn, Proto};
use trellis_tests::e2e;
use trellis_tests::mesh::{Mesh, MeshOpts};
use trellis_tests::sidecar::Sidecar;

/// App connections to sidecar A, and requests on each.
const CONNECTIONS: usize = 16;
const REQUESTS_PER_CONNECTION: usize = 25;
/// Requests held in flight across the drain, on connections of their own.
const SLOW_REQUESTS: u64 = 4;

async fn handed(sidecar: &Sidecar, worker: &str) -> anyhow::Result<f64> {
    Ok(sidecar
        .metrics()
        .await?
        .sum_or_zero("trellis_worker_connections_total", &[("worker", worker)]))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_workers_serve_many_connections_and_drain_in_flight_requests() -> anyhow::Result<()> {
    e2e(async {
        let two = vec!["--worker-threads".to_string(), "2".to_string()];
        let mut a_args = two.clone();
        a_args.extend(["--drain-timeout".to_string(), "10s".to_string()]);
        let mut mesh = Mesh::start(MeshOpts {
            a_args,
            b_args: two,
            ..Default::default()
        })
        .await?;
        let outbound = mesh.a.outbound();

        // Many connections at once, each with requests back to back, mixing both protocols.
        let mut clients = tokio::task::JoinSet::new();
        for c in 0..CONNECTIONS {
            clients.spawn(async move {
                let proto = if c % 4 == 3 { Proto::H2c } else { Proto::H1 };
                let mut conn = AppConn::connect(outbound, proto).await?;
                for r in 0..REQUESTS_PER_CONNECTION {
                    let path = format!("/conn/{c}/req/{r}");
                    let reply = conn.get("b", &path, &[]).await?;
                    let echo = echo_json(&reply).with_context(|| path.clone())?;
                    ensure!(echo["app"] == "app-b", "{path} reached {echo}");
                    ensure!(echo["path"] == path.as_str(), "{path} answered as {echo}");
                }
                anyhow::Ok(())
            });
        }
        let mut ok = 0;
        while let Some(done) = clients.join_next().await {
            done??;
            ok += 1;
        }
        ensure!(
            ok == CONNECTIONS,
            "{ok} of {CONNECTIONS} connections finished"
        );

        // Sidecar A got the app's connections; sidecar B got A's pooled connections (one per
        // worker of A). Each sidecar spread its accepted connections over both workers.
        for (name, sidecar) in [("A", &mesh.a), ("B", &mesh.b)] {
            let (w0, w1) = (handed(sidecar, "0").await?, handed(sidecar, "1").await?);
            eprintln!("sidecar {name}: connections handed to workers 0 / 1: {w0} / {w1}");
            ensure!(
                w0 >= 1.0 && w1 >= 1.0,
                "sidecar {name} did not use both workers: {w0} / {w1}"
            );
        }
        let (a0, a1) = (handed(&mesh.a, "0").await?, handed(&mesh.a, "1").await?);
        ensure!(
            a0 + a1 >= CONNECTIONS as f64,
            "sidecar A counted {} connections, want at least {CONNECTIONS}",
            a0 + a1
        );

        // Slow requests on new connections, one after the other: the least-loaded choice
        // gives each worker some. Four, not two, so that a load connection not yet seen closed
        // (its worker still counting it open) cannot put them all on one worker.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut slow = tokio::task::JoinSet::new();
        for _ in 0..SLOW_REQUESTS {
            let mut conn = AppConn::connect(outbound, Proto::H1).await?;
            slow.spawn(async move { conn.get("b", "/slow/3000", &[]).await });
        }
        trellis_tests::eventually(
            Duration::from_secs(10),
            "every slow request to reach app B",
            || async {
                ensure!(mesh.app_b.slow_started() == SLOW_REQUESTS, "not yet");
                Ok(())
            },
        )
        .await?;
        let (s0, s1) = (handed(&mesh.a, "0").await?, handed(&mesh.a, "1").await?);
        ensure!(
            s0 > a0 && s1 > a1 && s0 + s1 == a0 + a1 + SLOW_REQUESTS as f64,
            "the slow requests' connections did not reach both workers: {a0} / {a1} -> {s0} / {s1}"
        );
        let signalled = Instant::now();
        mesh.a.sigterm()?;
        while let Some(done) = slow.join_next().await {
            let reply = done?.context("in-flight request during the drain")?;
            ensure!(
                reply.status == StatusCode::OK && reply.body == Bytes::from_static(b"slow done\n"),
                "in-flight request during the drain: {}",
                reply.summary()
            );
        }
        mesh.a.exits_drained(signalled).await?;
        Ok(())
    })
    .await
}
