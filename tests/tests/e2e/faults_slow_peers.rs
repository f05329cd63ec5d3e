//! Issue #17, scenario 6: slow and half-open peers. Each is cut by a configured timeout set
//! well below its default, the cut is counted in a metric, and the socket behind it is closed
//! (no pooled slot held):
//!
//! - a peer sidecar that accepts TCP and never answers the TLS handshake (`connect_timeout`,
//!   `trellis_tls_handshakes_total{direction="outbound",reason="timeout"}`, `502`);
//! - an app that accepts and never reads (`request_timeout` on sidecar B,
//!   `trellis_requests_total{direction="inbound",code="504"}`);
//! - an app that sends its response head and then stalls the body
//!   (`limits.h2.stream_idle_timeout` on sidecar B, `trellis_stalled_bodies_total`, the stream reset and the caller's response
//!   cut short).
//!
//! The inbound side of a stalled TLS handshake and slowloris heads are in `hostile_peers`.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use trellis_tests::app_client::{get_once, Proto};
use trellis_tests::echo::EchoApp;
use trellis_tests::mesh::{A_ID, B_ID};
use trellis_tests::sidecar::{Sidecar, SidecarOpts};
use trellis_tests::{e2e, ControlPlane, ControlPlaneOpts};

/// Longest any cut may take here: every flag below is 1-2 s, every default 5 s or more.
const CUT_WITHIN: Duration = Duration::from_secs(4);

/// Reads `io` until the other end closes it (or `wait` passes). Returns what came, whether it
/// closed, and when.
async fn read_to_close(io: &mut TcpStream, wait: Duration) -> (Vec<u8>, bool, Duration) {
    let started = Instant::now();
    let mut got = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    let closed = loop {
        match tokio::time::timeout_at((started + wait).into(), io.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => break false,
        }
    };
    (got, closed, started.elapsed())
}

/// A raw app: accepts one connection and hands it to the test.
async fn raw_app() -> anyhow::Result<(SocketAddr, tokio::sync::oneshot::Receiver<TcpStream>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        if let Ok((io, _)) = listener.accept().await {
            let _ = tx.send(io);
        }
    });
    Ok((addr, rx))
}

/// Sidecar B in front of `app_b` with `b_args`, and sidecar A routing `Host: b` to it.
async fn pair(
    cp: &ControlPlane,
    app_b: SocketAddr,
    b_args: &[&str],
) -> anyhow::Result<(Sidecar, Sidecar, EchoApp)> {
    let app_a = EchoApp::start("app-a").await?;
    let b = Sidecar::start(cp, SidecarOpts::new("sidecar-b", B_ID, app_b).args(b_args)).await?;
    let a = Sidecar::start(
        cp,
        SidecarOpts::new("sidecar-a", A_ID, app_a.addr).upstream("b", b.addrs.inbound, B_ID),
    )
    .await?;
    Ok((a, b, app_a))
}

async fn counter(sidecar: &Sidecar, name: &str, labels: &[(&str, &str)]) -> anyhow::Result<f64> {
    Ok(sidecar.metrics().await?.sum(name, labels))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_that_never_answers_the_tls_handshake_is_cut_at_connect_timeout() -> anyhow::Result<()>
{
    e2e(async {
        let cp = ControlPlane::start(ControlPlaneOpts::default())?;
        let (silent, accepted) = raw_app().await?;
        let app_a = EchoApp::start("app-a").await?;
        let a = Sidecar::start(
            &cp,
            SidecarOpts::new("sidecar-a", A_ID, app_a.addr)
                .upstream("silent", silent, B_ID)
                .args(&["--connect-timeout", "1s"]),
        )
        .await?;
        let started = Instant::now();
        let reply = get_once(a.outbound(), Proto::H1, "silent", "/x", &[]).await?;
        let took = started.elapsed();
        let mut io = accepted.await.context("sidecar A never connected")?;
        let (_, closed, _) = read_to_close(&mut io, Duration::from_secs(10)).await;
        let timeouts = counter(
            &a,
            "trellis_tls_handshakes_total",
            &[("direction", "outbound"), ("reason", "timeout")],
        )
        .await?;
        println!(
            "[faults] silent TLS peer: {} after {took:?}; socket closed by A: {closed}; \
             handshake timeouts counted: {timeouts}",
            reply.summary()
        );
        ensure!(reply.status == 502, "want 502, got {}", reply.summary());
        ensure!(
            reply.text().contains("no answer within 1s"),
            "the reason must name the timeout: {}",
            reply.summary()
        );
        ensure!(
            took < CUT_WITHIN,
            "cut after {took:?}: the 1 s flag, not the 5 s default, must bound it"
        );
        ensure!(closed, "sidecar A kept the silent peer's socket open");
        ensure!(timeouts >= 1.0, "handshake timeout not counted");
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_that_never_reads_is_cut_at_request_timeout() -> anyhow::Result<()> {
    e2e(async {
        let cp = ControlPlane::start(ControlPlaneOpts::default())?;
        let (app_b, accepted) = raw_app().await?;
        let (a, b, _app_a) = pair(&cp, app_b, &["--request-timeout", "1s"]).await?;
        // A 1 MiB upload the app never reads, and never answers.
        let mut client = TcpStream::connect(a.outbound()).await?;
        let body = vec![b'x'; 1 << 20];
        let head = format!(
            "POST /upload HTTP/1.1\r\nHost: b\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        let started = Instant::now();
        let (mut rd, mut wr) = client.split();
        let write = async {
            wr.write_all(head.as_bytes()).await?;
            wr.write_all(&body).await?;
            anyhow::Ok(())
        };
        let read = async {
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = tokio::time::timeout(Duration::from_secs(40), rd.read(&mut buf))
                    .await
                    .context("no response within 40 s")??;
                ensure!(n > 0, "closed without a response");
                got.extend_from_slice(&buf[..n]);
            }
            anyhow::Ok((String::from_utf8_lossy(&got).to_string(), started.elapsed()))
        };
        let (_, response) = tokio::join!(write, read);
        let (response, took) = response?;
        let mut app_io = accepted
            .await
            .context("sidecar B never connected to the app")?;
        // Only now does the app read: what B wrote, then B's close.
        let (_, closed, _) = read_to_close(&mut app_io, Duration::from_secs(10)).await;
        let counted = counter(
            &b,
            "trellis_requests_total",
            &[("direction", "inbound"), ("code", "504")],
        )
        .await?;
        println!(
            "[faults] app never reads: {:?} after {took:?}; app connection closed by B: \
             {closed}; inbound 504s counted: {counted}",
            response.lines().next()
        );
        ensure!(response.starts_with("HTTP/1.1 504"), "want 504: {response}");
        ensure!(
            took < CUT_WITHIN,
            "cut after {took:?}: the 1 s flag, not the 30 s default, must bound it"
        );
        ensure!(closed, "sidecar B kept the app connection open");
        ensure!(counted >= 1.0, "the 504 was not counted");
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_that_stalls_its_body_is_cut_at_stream_idle_timeout() -> anyhow::Result<()> {
    e2e(async {
        let cp = ControlPlane::start(ControlPlaneOpts::default())?;
        let (app_b, accepted) = raw_app().await?;
        let (a, b, _app_a) = pair(&cp, app_b, &["--h2-stream-idle-timeout", "2s"]).await?;
        let app = tokio::spawn(async move {
            let mut io = accepted.await?;
            let mut head = Vec::new();
            let mut buf = [0u8; 4096];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = io.read(&mut buf).await?;
                anyhow::ensure!(n > 0, "sidecar B closed before its request head");
                head.extend_from_slice(&buf[..n]);
            }
            // The head, 10 of 100 body bytes, then nothing.
            io.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
                .await?;
            let stalled = Instant::now();
            let (_, closed, _) = read_to_close(&mut io, Duration::from_secs(30)).await;
            anyhow::Ok((closed, stalled.elapsed()))
        });
        let mut client = TcpStream::connect(a.outbound()).await?;
        client
            .write_all(b"GET /stall HTTP/1.1\r\nHost: b\r\n\r\n")
            .await?;
        let (got, closed, took) = read_to_close(&mut client, Duration::from_secs(30)).await;
        let got = String::from_utf8_lossy(&got).to_string();
        let (app_closed, app_took) = app.await??;
        let stalls = counter(&b, "trellis_stalled_bodies_total", &[]).await?;
        println!(
            "[faults] app stalls its body: caller got {} bytes, connection closed {closed} after \
             {took:?}; app connection closed by B {app_closed} {app_took:?} after the stall; \
             stalled bodies counted: {stalls}",
            got.len()
        );
        ensure!(
            got.starts_with("HTTP/1.1 200"),
            "want the 200 head: {got:?}"
        );
        ensure!(
            got.ends_with("0123456789"),
            "want the 10 bytes sent and nothing more: {got:?}"
        );
        ensure!(
            closed && took < Duration::from_secs(2) + CUT_WITHIN,
            "the caller's cut-short response must end near the 2 s stream idle timeout (5 m \
             default), ended {closed} after {took:?}"
        );
        ensure!(
            app_closed && app_took < Duration::from_secs(2) + CUT_WITHIN,
            "sidecar B kept the stalled app connection: closed {app_closed} after {app_took:?}"
        );
        ensure!(stalls == 1.0, "want 1 stalled body counted, got {stalls}");
        Ok(())
    })
    .await
}
