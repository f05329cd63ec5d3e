//! Issue #5, scenario 6: the app behind sidecar B is down or slow. Run with `--nocapture` to
//! see the figures.
//!
//! ```text
//!  app A ──http/1.1──▶ sidecar A ══ mTLS, h2 ══▶ sidecar B ──▶ app B (stopped / slow / back)
//! ```
//!
//! - (a) app B stopped (listener and connections closed, like a crash): every request gets a
//!   prompt `503` with a one-line reason; app B starting again on the same port brings traffic
//!   back with nothing restarted.
//! - (b) app B slower than sidecar B's `--request-timeout`: `504`, promptly, with a one-line
//!   reason; other requests are unaffected.
//! - (c) 10,000 requests failing with `503` and 2,000 with `504` leak neither file descriptors
//!   nor memory in either sidecar (open fds and RSS before and after, once things settle).

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};
use http::StatusCode;
use trellis_tests::app_client::{AppConn, Proto, Reply};
use trellis_tests::echo::EchoApp;
use trellis_tests::mesh::{Mesh, MeshOpts};
use trellis_tests::sidecar::Sidecar;
use trellis_tests::{e2e, eventually};

/// Failing requests for the leak check, app down (`503`).
const LEAK_503: usize = 10_000;
/// Failing requests for the leak check, app too slow (`504`).
const LEAK_504: usize = 2_000;
/// Sidecar B's request timeout in the slow-app scenarios.
const REQUEST_TIMEOUT: &str = "300ms";
/// How long the slow app takes: well past [`REQUEST_TIMEOUT`].
const SLOW_PATH: &str = "/slow/1500";
/// Open fds allowed above the baseline once settled.
const FD_SLACK: usize = 5;
/// RSS growth allowed, KiB.
const RSS_SLACK_KIB: u64 = 8 * 1024;

fn ms(d: Duration) -> String {
    format!("{:.1}ms", d.as_secs_f64() * 1e3)
}

/// Stops app B like a crash (listener and open connections closed), leaving a placeholder app
/// on another port in the mesh. Returns app B's address.
async fn stop_app_b(mesh: &mut Mesh) -> anyhow::Result<SocketAddr> {
    let addr = mesh.app_b.addr;
    let app = std::mem::replace(&mut mesh.app_b, EchoApp::start("placeholder").await?);
    app.stop().await;
    Ok(addr)
}

/// A one-line `text/plain` reason, as docs/protocols.md promises for every sidecar error.
fn one_line_reason(reply: &Reply) -> anyhow::Result<String> {
    let text = reply.text();
    ensure!(
        text.ends_with('\n') && text.matches('\n').count() == 1 && text.len() > 10,
        "want a one-line reason, got {:?}",
        text
    );
    Ok(text.trim_end().to_string())
}

/// `n` requests for `path` through `target` over `concurrency` keep-alive app connections
/// (reconnecting after a connection error). Returns the count per outcome: the status code, or
/// `error: …` for a request that got no answer.
async fn blast(
    target: SocketAddr,
    path: &str,
    n: usize,
    concurrency: usize,
) -> BTreeMap<String, usize> {
    let next = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let (next, path) = (next.clone(), path.to_string());
            tokio::spawn(async move {
                let mut out: BTreeMap<String, usize> = BTreeMap::new();
                let mut conn: Option<AppConn> = None;
                while next.fetch_add(1, Ordering::Relaxed) < n {
                    let c = match conn.as_mut() {
                        Some(c) => c,
                        None => match AppConn::connect(target, Proto::H1).await {
                            Ok(c) => conn.insert(c),
                            Err(e) => {
                                *out.entry(format!("error: connect: {e:#}")).or_default() += 1;
                                continue;
                            }
                        },
                    };
                    match c.get("b", &path, &[]).await {
                        Ok(reply) => {
                            *out.entry(reply.status.as_u16().to_string()).or_default() += 1
                        }
                        Err(e) => {
                            conn = None;
                            *out.entry(format!("error: {e:#}")).or_default() += 1;
                        }
                    }
                }
                out
            })
        })
        .collect();
    let mut total = BTreeMap::new();
    for t in tasks {
        for (k, v) in t.await.unwrap_or_default() {
            *total.entry(k).or_default() += v;
        }
    }
    total
}

/// `count` of outcome `status` is all there is.
fn only(outcomes: &BTreeMap<String, usize>, status: &str, count: usize) -> anyhow::Result<()> {
    ensure!(
        outcomes.len() == 1 && outcomes.get(status) == Some(&count),
        "want {count} × {status}, got {outcomes:?}"
    );
    Ok(())
}

/// Latencies of `n` sequential requests for `path` on one app connection, all of which must
/// answer `status`; returns (p50, max) and the last reply.
async fn timed(
    target: SocketAddr,
    path: &str,
    n: usize,
    status: StatusCode,
) -> anyhow::Result<(Duration, Duration, Reply)> {
    let mut conn = AppConn::connect(target, Proto::H1).await?;
    let mut latencies = Vec::with_capacity(n);
    let mut last = None;
    for i in 0..n {
        let t = Instant::now();
        let reply = conn.get("b", path, &[]).await?;
        latencies.push(t.elapsed());
        ensure!(
            reply.status == status,
            "request {i} for {path}: want {status}, got {}",
            reply.summary()
        );
        last = Some(reply);
    }
    latencies.sort_unstable();
    let p50 = latencies[latencies.len() / 2];
    let max = *latencies.last().context("no requests")?;
    Ok((p50, max, last.context("no requests")?))
}

/// Waits until a request through `target` gets `status`.
async fn until_status(target: SocketAddr, status: StatusCode, what: &str) -> anyhow::Result<()> {
    eventually(Duration::from_secs(20), what, || async {
        let reply =
            trellis_tests::app_client::get_once(target, Proto::H1, "b", "/probe", &[]).await?;
        ensure!(reply.status == status, "got {}", reply.summary());
        Ok(())
    })
    .await
}

/// (a) App B stops: prompt 503s with a reason; app B back on the same port: traffic recovers
/// with no restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_down_gets_prompt_503_and_recovers_without_restart() -> anyhow::Result<()> {
    e2e(async {
        let mut mesh = Mesh::start(MeshOpts::default()).await?;
        let a_out = mesh.a.outbound();
        let pids = (mesh.a.child.id(), mesh.b.child.id());
        let (p50, _, _) = timed(a_out, "/up", 50, StatusCode::OK).await?;
        println!("[upstream] app B up: p50 {}", ms(p50));

        let app_addr = stop_app_b(&mut mesh).await?;
        until_status(
            a_out,
            StatusCode::SERVICE_UNAVAILABLE,
            "503 with app B down",
        )
        .await?;
        let (p50, max, reply) = timed(a_out, "/down", 100, StatusCode::SERVICE_UNAVAILABLE).await?;
        let reason = one_line_reason(&reply)?;
        println!(
            "[upstream] app B down: 100 × 503, p50 {} max {}; reason: {reason}",
            ms(p50),
            ms(max)
        );
        ensure!(
            reason.contains("unreachable") && reason.contains(&app_addr.to_string()),
            "the reason should name the app and say it is unreachable: {reason}"
        );

        mesh.app_b = EchoApp::start_on("app-b", app_addr).await?;
        let back = Instant::now();
        until_status(a_out, StatusCode::OK, "200 once app B is back").await?;
        println!(
            "[upstream] app B back on {app_addr}: first 200 after {}",
            ms(back.elapsed())
        );
        let (p50, _, reply) = timed(a_out, "/back", 100, StatusCode::OK).await?;
        ensure!(
            reply.json()?["app"] == "app-b",
            "not app B's echo: {}",
            reply.summary()
        );
        println!("[upstream] app B back: 100 × 200, p50 {}", ms(p50));
        ensure!(
            (mesh.a.child.id(), mesh.b.child.id()) == pids
                && mesh.a.child.try_exit().is_none()
                && mesh.b.child.try_exit().is_none(),
            "a sidecar restarted or exited"
        );
        Ok(())
    })
    .await
}

/// (b) App B slower than sidecar B's request timeout: 504, promptly, with a reason; requests
/// sent meanwhile are answered normally.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_app_gets_prompt_504() -> anyhow::Result<()> {
    e2e(async {
        let opts = MeshOpts {
            b_args: vec!["--request-timeout".into(), REQUEST_TIMEOUT.into()],
            ..MeshOpts::default()
        };
        let mesh = Mesh::start(opts).await?;
        let a_out = mesh.a.outbound();
        let slow = tokio::spawn(timed(a_out, SLOW_PATH, 10, StatusCode::GATEWAY_TIMEOUT));
        // Meanwhile, fast requests on another connection.
        let (p50_fast, _, _) = timed(a_out, "/fast", 50, StatusCode::OK).await?;
        let (p50, max, reply) = slow.await??;
        let reason = one_line_reason(&reply)?;
        println!(
            "[upstream] app B slower ({SLOW_PATH}) than sidecar B's --request-timeout {REQUEST_TIMEOUT}: 10 × 504, p50 {} max {}; reason: {reason}; fast requests meanwhile p50 {}",
            ms(p50),
            ms(max),
            ms(p50_fast)
        );
        ensure!(
            reason.contains("no response headers within 300ms"),
            "the reason should say what timed out: {reason}"
        );
        ensure!(
            mesh.app_b.slow_started() == 10,
            "app B saw {} slow requests",
            mesh.app_b.slow_started()
        );
        Ok(())
    })
    .await
}

/// Open fds and RSS of a sidecar.
#[derive(Debug, Clone, Copy)]
struct Usage {
    fds: usize,
    rss_kib: u64,
}

fn usage(s: &Sidecar) -> anyhow::Result<Usage> {
    Ok(Usage {
        fds: s.open_fds()?,
        rss_kib: s.rss_kib()?,
    })
}

/// Waits until both sidecars' fd counts hold still for a second (connections closing after a
/// batch have closed), then reads their usage.
async fn settled(a: &Sidecar, b: &Sidecar) -> anyhow::Result<(Usage, Usage)> {
    let mut last = (a.open_fds()?, b.open_fds()?);
    let mut still_since = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(30);
    while still_since.elapsed() < Duration::from_secs(1) {
        if Instant::now() > deadline {
            bail!("fd counts still moving after 30s: {last:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = (a.open_fds()?, b.open_fds()?);
        if now != last {
            last = now;
            still_since = Instant::now();
        }
    }
    Ok((usage(a)?, usage(b)?))
}

/// (c) 10,000 × 503 and 2,000 × 504: fds back to the baseline, RSS growth bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_requests_leak_no_fds_or_memory() -> anyhow::Result<()> {
    e2e(async {
        let opts = MeshOpts {
            b_args: vec!["--request-timeout".into(), REQUEST_TIMEOUT.into()],
            ..MeshOpts::default()
        };
        let mut mesh = Mesh::start(opts).await?;
        let a_out = mesh.a.outbound();

        // Warm up every path once (pools, metric cells, allocator arenas), then stop app B.
        only(&blast(a_out, "/warm", 200, 16).await, "200", 200)?;
        only(&blast(a_out, SLOW_PATH, 100, 50).await, "504", 100)?;
        let app_addr = stop_app_b(&mut mesh).await?;
        until_status(a_out, StatusCode::SERVICE_UNAVAILABLE, "503 with app B down").await?;
        only(&blast(a_out, "/warm-down", 500, 16).await, "503", 500)?;
        let (a0, b0) = settled(&mesh.a, &mesh.b).await?;

        let t = Instant::now();
        let down = blast(a_out, "/down", LEAK_503, 16).await;
        let took_503 = t.elapsed();
        only(&down, "503", LEAK_503)?;

        mesh.app_b = EchoApp::start_on("app-b", app_addr).await?;
        until_status(a_out, StatusCode::OK, "app B back").await?;
        let t = Instant::now();
        let slow = blast(a_out, SLOW_PATH, LEAK_504, 50).await;
        let took_504 = t.elapsed();
        only(&slow, "504", LEAK_504)?;
        // With app B still up: every connection a timed-out request used is gone too.
        let (a_up, b_up) = settled(&mesh.a, &mesh.b).await?;
        println!(
            "[upstream] leak check: after the 504s, app B still up: open fds A {} B {}",
            a_up.fds, b_up.fds
        );
        // Back to the baseline's conditions: app B down, no app connections open.
        stop_app_b(&mut mesh).await?;
        until_status(a_out, StatusCode::SERVICE_UNAVAILABLE, "503 with app B down").await?;
        let (a1, b1) = settled(&mesh.a, &mesh.b).await?;

        println!(
            "[upstream] leak check: {LEAK_503} × 503 in {:.1}s ({:.0}/s), {LEAK_504} × 504 in {:.1}s ({:.0}/s)",
            took_503.as_secs_f64(),
            LEAK_503 as f64 / took_503.as_secs_f64(),
            took_504.as_secs_f64(),
            LEAK_504 as f64 / took_504.as_secs_f64(),
        );
        for (name, before, after) in [("sidecar A", a0, a1), ("sidecar B", b0, b1)] {
            println!(
                "[upstream] leak check: {name}: open fds {} → {}, RSS {} KiB → {} KiB ({:+} KiB)",
                before.fds,
                after.fds,
                before.rss_kib,
                after.rss_kib,
                after.rss_kib as i64 - before.rss_kib as i64
            );
        }
        for (name, before, after) in [("sidecar A", a0, a1), ("sidecar B", b0, b1)] {
            ensure!(
                after.fds <= before.fds + FD_SLACK,
                "{name}: {} open fds after the failures, {} before",
                after.fds,
                before.fds
            );
            ensure!(
                after.rss_kib <= before.rss_kib + RSS_SLACK_KIB,
                "{name}: RSS grew from {} KiB to {} KiB",
                before.rss_kib,
                after.rss_kib
            );
        }
        Ok(())
    })
    .await
}
