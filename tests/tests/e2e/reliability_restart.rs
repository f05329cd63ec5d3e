//! Issue #5, scenario 5: a sidecar restarts (SIGTERM, drain, exit, start again on the same
//! ports with a fresh join token) while traffic flows through app → sidecar A → sidecar B →
//! app B. Run with `--nocapture` to see the figures.
//!
//! ```text
//!  load (4 × app A) ──http/1.1──▶ sidecar A ══ mTLS, h2 ══▶ sidecar B ──▶ app B
//!  + slow requests in flight      (client side, (b))        (server side, (a))
//! ```
//!
//! What must hold, on either side:
//! - every request in flight at SIGTERM completes with the app's answer, including slow ones
//!   that outlast the moment the sidecar stops accepting;
//! - no request sent before SIGTERM fails;
//! - while the sidecar is away, what the app sees is counted and printed. Server side, the
//!   only failure allowed is sidecar A's prompt `503 … unreachable` (connection refused):
//!   never a reset, a GOAWAY or a `502`. Client side, the app only learns it before sending:
//!   a refused connect, or a keep-alive connection whose last answer said
//!   `Connection: close`; never a request written into a connection that closes unanswered,
//!   never a `5xx` from a sidecar that has not got its SVID yet;
//! - once the new sidecar is ready, every request succeeds again (sidecar A reconnects).

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _};
use http::StatusCode;
use tokio::task::JoinHandle;
use trellis_tests::app_client::{get_once, Proto, Reply};
use trellis_tests::load::{Load, LoadOpts, LoadReport, Sample};
use trellis_tests::mesh::{Mesh, MeshOpts};
use trellis_tests::sidecar::Sidecar;
use trellis_tests::{e2e, eventually};

/// Slow requests in flight at SIGTERM (each on its own app connection).
const SLOW: usize = 4;
/// How long the app takes to answer each of them: well past the SIGTERM.
const SLOW_MS: u64 = 2500;
/// Successful load requests before the event and after recovery.
const STEADY: usize = 300;
/// Generous bound for a drain (the sidecar's own bound is its 15 s drain timeout).
const EXIT_WITHIN: Duration = Duration::from_secs(30);

/// Sends `SLOW` requests for `/slow/SLOW_MS` through `outbound`, each on a fresh connection,
/// and waits until all of them have reached app B.
async fn slow_in_flight(
    outbound: std::net::SocketAddr,
    started_before: u64,
    app_b: &trellis_tests::echo::EchoApp,
) -> anyhow::Result<Vec<JoinHandle<anyhow::Result<Reply>>>> {
    let path = format!("/slow/{SLOW_MS}");
    let tasks: Vec<_> = (0..SLOW)
        .map(|_| {
            let path = path.clone();
            tokio::spawn(async move { get_once(outbound, Proto::H1, "b", &path, &[]).await })
        })
        .collect();
    eventually(
        Duration::from_secs(20),
        "the slow requests to reach app B",
        || async {
            let n = app_b.slow_started() - started_before;
            ensure!(
                n as usize >= SLOW,
                "{n} of {SLOW} slow requests reached app B"
            );
            Ok(())
        },
    )
    .await?;
    Ok(tasks)
}

/// Every slow request answered by the app, not by a sidecar.
async fn slow_all_done(tasks: Vec<JoinHandle<anyhow::Result<Reply>>>) -> anyhow::Result<()> {
    for (i, t) in tasks.into_iter().enumerate() {
        let reply = t
            .await?
            .with_context(|| format!("slow request {i} in flight at SIGTERM"))?;
        ensure!(
            reply.status == StatusCode::OK && reply.text() == "slow done\n",
            "slow request {i} in flight at SIGTERM: {}",
            reply.summary()
        );
    }
    Ok(())
}

/// Waits until app B has answered `n` more load requests than `before`.
async fn steady(app_b: &trellis_tests::echo::EchoApp, n: usize, what: &str) -> anyhow::Result<()> {
    let before = app_b.seen().len();
    eventually(Duration::from_secs(60), what, || async {
        let seen = app_b.seen().len() - before;
        ensure!(seen >= n, "{seen} of {n} requests reached app B");
        Ok(())
    })
    .await
}

/// What the app saw, in a few words: the status and the gist of the body, or the kind of
/// connection failure.
fn category(error: &str) -> String {
    if let Some(rest) = error.strip_prefix("status: ") {
        let code = rest.split_whitespace().next().unwrap_or("?");
        let gist = if rest.contains("Connection refused") {
            "peer sidecar unreachable (connection refused)"
        } else if rest.contains("unreachable") {
            "unreachable (other)"
        } else if rest.contains("GOAWAY") || rest.contains("go away") {
            "GOAWAY"
        } else if rest.contains("reset") {
            "reset"
        } else if rest.contains("handshake") {
            "TLS handshake"
        } else {
            rest
        };
        return format!("{code} {gist}");
    }
    if error.starts_with("connect:") {
        if error.contains("Connection refused") {
            return "app → sidecar connect: connection refused".into();
        }
        return format!("app → sidecar connect: {error}");
    }
    if error.contains("connection closed before message completed") {
        return "app connection closed with the request unanswered".into();
    }
    if error.contains("connection reset") || error.contains("Connection reset") {
        return "app connection reset".into();
    }
    if error.contains("channel closed") {
        // hyper's client refuses to send on a connection whose last answer said
        // `Connection: close`: the app learns before it writes anything.
        return "app connection closed after a `Connection: close` answer (request not sent)"
            .into();
    }
    error.to_string()
}

/// Failures sent in `[from, to)` by category: how many, and the first one's error.
fn categories(
    report: &LoadReport,
    from: Instant,
    to: Instant,
) -> BTreeMap<String, (usize, String)> {
    let mut out: BTreeMap<String, (usize, String)> = BTreeMap::new();
    for s in report.failures().filter(|s| s.sent >= from && s.sent < to) {
        let e = s.result.as_ref().err().map(String::as_str).unwrap_or("");
        out.entry(category(e))
            .or_insert_with(|| (0, e.to_string()))
            .0 += 1;
    }
    out
}

fn list(samples: &[&Sample], started: Instant) -> String {
    samples
        .iter()
        .take(10)
        .map(|s| {
            format!(
                "  +{:.3}s: {}",
                (s.sent - started).as_secs_f64(),
                s.result.as_ref().err().map(String::as_str).unwrap_or("")
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn failed_between(r: &LoadReport, from: Instant, to: Instant) -> Vec<&Sample> {
    r.failures()
        .filter(|s| s.sent >= from && s.sent < to)
        .collect()
}

fn ms(d: Duration) -> String {
    format!("{:.0}ms", d.as_secs_f64() * 1e3)
}

/// The figures every scenario prints: before, during the gap, after.
fn print_phases(scenario: &str, r: &LoadReport, term: Instant, exited: Instant, ready: Instant) {
    r.print(scenario);
    println!(
        "[restart] {scenario}: drain (SIGTERM → exit) {}, gap (SIGTERM → new sidecar ready) {}",
        ms(exited - term),
        ms(ready - term)
    );
    println!(
        "[restart] {scenario}: sent before SIGTERM {} (failed {}), during the gap {} (failed {}), after {} (failed {})",
        r.sent_between(r.started, term),
        r.failures_between(r.started, term),
        r.sent_between(term, ready),
        r.failures_between(term, ready),
        r.sent_between(ready, r.stopped),
        r.failures_between(ready, r.stopped),
    );
    for (what, (n, example)) in categories(r, term, ready) {
        println!("[restart] {scenario}: during the gap the app saw {n} × {what}, e.g. {example:?}");
    }
}

/// Checks shared by both sides: nothing sent before SIGTERM or after the new sidecar is ready
/// failed.
fn assert_before_and_after(r: &LoadReport, term: Instant, ready: Instant) -> anyhow::Result<()> {
    let before = failed_between(r, r.started, term);
    ensure!(
        before.is_empty(),
        "{} requests sent before SIGTERM failed:\n{}",
        before.len(),
        list(&before, r.started)
    );
    let after = failed_between(r, ready, r.stopped);
    ensure!(
        after.is_empty(),
        "{} requests sent after the new sidecar was ready failed:\n{}",
        after.len(),
        list(&after, r.started)
    );
    Ok(())
}

/// (a) Server side: sidecar B gets SIGTERM with slow requests and load in flight, drains,
/// exits 0, and a new sidecar B starts on the same inbound port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_side_sidecar_restart_under_load() -> anyhow::Result<()> {
    e2e(async {
        let mut mesh = Mesh::start(MeshOpts::default()).await?;
        let a_out = mesh.a.outbound();
        let load = Load::start(LoadOpts::new(a_out, "b", "app-b"));
        steady(&mesh.app_b, STEADY, "load to flow before the restart").await?;
        let upstream_conns = |m: &trellis_tests::sidecar::Metrics| {
            m.sum("trellis_upstream_connections_total", &[])
        };
        let conns_before = upstream_conns(&mesh.a.metrics().await?);
        let slow = slow_in_flight(a_out, mesh.app_b.slow_started(), &mesh.app_b).await?;

        let event = load.mark("sidecar B restart");
        let term = Instant::now();
        mesh.b.sigterm()?;
        let status = mesh
            .b
            .wait_exit(EXIT_WITHIN)
            .await
            .context("sidecar B did not exit after SIGTERM")?;
        let exited = Instant::now();
        ensure!(status.success(), "sidecar B exited {status}, want 0");
        slow_all_done(slow).await?;

        let opts = mesh.b.same_ports_opts().context("sidecar B's options")?;
        mesh.b = Sidecar::start(&mesh.cp, opts).await?;
        let ready = Instant::now();
        load.end(event);
        steady(&mesh.app_b, STEADY, "load to flow after the restart").await?;
        let report = load.stop().await;
        let conns_after = upstream_conns(&mesh.a.metrics().await?);

        print_phases("server side (sidecar B)", &report, term, exited, ready);
        println!(
            "[restart] server side: sidecar A's upstream connections opened: {conns_before} before, {conns_after} after"
        );
        assert_before_and_after(&report, term, ready)?;
        // While B was away, A must answer at once that B is unreachable; a request on the
        // draining connection must never come back as a reset, a GOAWAY or a 502.
        let gap = failed_between(&report, term, ready);
        let unexpected: Vec<&Sample> = gap
            .iter()
            .copied()
            .filter(|s| {
                let e = s.result.as_ref().err().map(String::as_str).unwrap_or("");
                !(e.starts_with("status: 503") && e.contains("Connection refused"))
            })
            .collect();
        ensure!(
            unexpected.is_empty(),
            "{} requests during the restart failed other than with 503 connection refused:\n{}",
            unexpected.len(),
            list(&unexpected, report.started)
        );
        ensure!(
            conns_after > conns_before,
            "sidecar A opened no new upstream connection after B came back"
        );
        Ok(())
    })
    .await
}

/// (b) Client side: sidecar A (the app's own sidecar) gets SIGTERM with slow requests and load
/// in flight, drains, exits 0, and a new sidecar A starts on the same outbound port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_side_sidecar_restart_under_load() -> anyhow::Result<()> {
    e2e(async {
        let mut mesh = Mesh::start(MeshOpts::default()).await?;
        let a_out = mesh.a.outbound();
        let load = Load::start(LoadOpts::new(a_out, "b", "app-b"));
        steady(&mesh.app_b, STEADY, "load to flow before the restart").await?;
        let slow = slow_in_flight(a_out, mesh.app_b.slow_started(), &mesh.app_b).await?;

        let event = load.mark("sidecar A restart");
        let term = Instant::now();
        mesh.a.sigterm()?;
        let status = mesh
            .a
            .wait_exit(EXIT_WITHIN)
            .await
            .context("sidecar A did not exit after SIGTERM")?;
        let exited = Instant::now();
        ensure!(status.success(), "sidecar A exited {status}, want 0");
        slow_all_done(slow).await?;

        let opts = mesh.a.same_ports_opts().context("sidecar A's options")?;
        mesh.a = Sidecar::start(&mesh.cp, opts).await?;
        let ready = Instant::now();
        ensure!(mesh.a.outbound() == a_out, "new sidecar A on another port");
        load.end(event);
        steady(&mesh.app_b, STEADY, "load to flow after the restart").await?;
        let report = load.stop().await;

        print_phases("client side (sidecar A)", &report, term, exited, ready);
        assert_before_and_after(&report, term, ready)?;
        // The app's own sidecar is gone for a while. The app may only learn it before sending:
        // its keep-alive connection was answered `Connection: close` (so it sends nothing
        // more on it), or a new connection is refused. Never a request written into a
        // connection that then closes unanswered, and never a 5xx from a sidecar that could
        // not serve yet.
        let gap = failed_between(&report, term, ready);
        let unexpected: Vec<&Sample> = gap
            .iter()
            .copied()
            .filter(|s| {
                let e = s.result.as_ref().err().map(String::as_str).unwrap_or("");
                !(e.ends_with("send: channel closed")
                    || (e.starts_with("connect:") && e.contains("Connection refused")))
            })
            .collect();
        ensure!(
            unexpected.is_empty(),
            "{} requests during the restart failed other than by a refused connect or a \
             connection closed before sending:\n{}",
            unexpected.len(),
            list(&unexpected, report.started)
        );
        Ok(())
    })
    .await
}
