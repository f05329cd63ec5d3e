#![allow(clippy::unwrap_used)]
//! The sidecar limits that used to be fixed, set small through their flags and enforced:
//! the admin listener's connection, header-size, header-count, slow-head and idle bounds, and
//! `h2_max_pending_accept_reset_streams` (HTTP/2 rapid reset) on the inbound and outbound
//! listeners. Each offending connection is refused (a `431` or a close, or GOAWAY
//! `ENHANCE_YOUR_CALM`) while another client of the same sidecar is served.
//!
//! Every setting here is chosen so that the default would NOT have refused the same input (a
//! 12 KiB admin head passes a 16 KiB limit but not the old fixed 8 KiB; 15 reset streams stay
//! under the default 1024 but over a configured 5; the timeouts are checked against deadlines
//! shorter than their defaults): a setting that is not threaded through fails its test.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use trellis_identity::tls::PeerMatch;
use trellis_identity::SpiffeId;
use trellis_tests::echo::EchoApp;
use trellis_tests::h2_raw::*;
use trellis_tests::mesh::{legit, Mesh, MeshOpts, A_ID, B_ID};
use trellis_tests::raw::{exchange, read_to_close};
use trellis_tests::sidecar::{Sidecar, SidecarOpts};
use trellis_tests::{
    e2e, eventually, fetch_svid, tls_client_config, tls_connect, ControlPlane, ControlPlaneOpts,
};

const CLIENT_ID: &str = "spiffe://example.org/test/hostile-limits";
const SIDECAR_ID: &str = "spiffe://example.org/ns/demo/sa/limits";

/// A control plane, an echo app and one sidecar in front of it started with `args`.
struct One {
    sidecar: Sidecar,
    _app: EchoApp,
    _cp: ControlPlane,
}

async fn one_sidecar(args: &[&str]) -> anyhow::Result<One> {
    let cp = ControlPlane::start(ControlPlaneOpts::default())?;
    let app = EchoApp::start("app").await?;
    let sidecar = Sidecar::start(
        &cp,
        SidecarOpts::new("sidecar-limits", SIDECAR_ID, app.addr).args(args),
    )
    .await?;
    Ok(One {
        sidecar,
        _app: app,
        _cp: cp,
    })
}

/// True if the sidecar has not closed `io` (nothing to read within a short wait).
async fn still_open(io: &mut TcpStream) -> bool {
    let mut buf = [0u8; 64];
    tokio::time::timeout(Duration::from_millis(300), io.read(&mut buf))
        .await
        .is_err()
}

/// Another admin client, served meanwhile: `/healthz` must answer 200.
async fn admin_ok(sidecar: &Sidecar) -> anyhow::Result<()> {
    let r = sidecar.admin_get("/healthz").await?;
    ensure!(r.status == 200, "/healthz answered {}", r.status);
    Ok(())
}

fn admin_head(host: SocketAddr, extra: &str) -> Vec<u8> {
    format!("GET /healthz HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n{extra}\r\n")
        .into_bytes()
}

/// `admin_max_connections`, `admin_max_header_bytes` and `admin_max_headers` set through their
/// flags: the fifth connection is closed at accept (and counted), a head over 16 KiB or with
/// more than 8 header lines gets `431`; a 12 KiB head (over the old fixed 8 KiB) is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn admin_connection_and_header_limits_are_configurable() -> anyhow::Result<()> {
    e2e(async {
        let one = one_sidecar(&[
            "--admin-max-connections",
            "4",
            "--admin-max-header-bytes",
            "16384",
            "--admin-max-headers",
            "8",
        ])
        .await?;
        let sc = &one.sidecar;
        let admin = sc.addrs.admin;

        // Four silent connections fill the listener; a fifth is closed at once. Retried as a
        // whole because a probe connection from the start-up may still hold a slot briefly.
        let held = "4 admin connections held, the 5th closed";
        let mut hogs = eventually(Duration::from_secs(60), held, || async {
            let mut hogs = Vec::new();
            for _ in 0..4 {
                hogs.push(TcpStream::connect(admin).await?);
            }
            let mut extra = TcpStream::connect(admin).await?;
            let got = read_to_close(&mut extra, Duration::from_secs(5)).await;
            ensure!(got.closed, "5th admin connection left open");
            for hog in &mut hogs {
                ensure!(still_open(hog).await, "a held admin connection was closed");
            }
            Ok(hogs)
        })
        .await?;
        // One leaves: another admin client is served again.
        hogs.pop();
        eventually(
            Duration::from_secs(20),
            "admin served after a slot frees",
            || admin_ok(sc),
        )
        .await?;
        let refused = sc.metrics().await?.sum(
            "trellis_connections_refused_total",
            &[("listener", "admin")],
        );
        println!(
            "admin_max_connections 4: 5th connection closed at accept; served again after one \
             left; refused_total{{admin}} = {refused}"
        );
        ensure!(refused >= 1.0, "no refused admin connection counted");
        drop(hogs);
        eventually(Duration::from_secs(20), "admin slots free", || admin_ok(sc)).await?;

        let many = |n: usize| -> String { (0..n).map(|i| format!("x-h{i}: v\r\n")).collect() };
        // (name, extra header lines, expected status). `Host` and `Connection` count too.
        let big = |kib: usize| format!("x-big: {}\r\n", "a".repeat(kib << 10));
        let cases = [
            (
                "12 KiB head (under 16 KiB; over the old fixed 8 KiB)",
                big(12),
                200,
            ),
            (
                "20 KiB head (over admin_max_header_bytes 16 KiB)",
                big(20),
                431,
            ),
            ("8 header lines (admin_max_headers 8)", many(6), 200),
            ("12 header lines (over admin_max_headers 8)", many(10), 431),
        ];
        for (name, extra, want) in cases {
            let raw = admin_head(admin, &extra);
            let io = TcpStream::connect(admin).await?;
            let (got, ok) = tokio::join!(exchange(io, &raw, Duration::from_secs(20)), admin_ok(sc));
            ok.with_context(|| format!("another admin client during `{name}`"))?;
            println!(
                "admin: {name:<55} → {} {}",
                got.status().map_or("no response".into(), |s| s.to_string()),
                if got.closed { "closed" } else { "OPEN" }
            );
            ensure!(
                got.status() == Some(want),
                "`{name}`: want {want}, got {:?}",
                got.text.lines().next()
            );
            ensure!(got.closed, "`{name}`: connection left open");
        }
        Ok(())
    })
    .await
}

/// `admin_header_read_timeout` 1 s and `admin_idle_timeout` 2 s: a head trickled a byte every
/// 200 ms (so the connection is never idle) is cut before the 10 s default would; a silent
/// connection and an HTTP/2 connection with no open stream are closed before the 60 s default
/// would (the HTTP/2 client never acks the PING of hyper's graceful close: the sidecar drops
/// it 5 s after its GOAWAY). Another admin client is served throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn admin_timeouts_are_configurable() -> anyhow::Result<()> {
    e2e(async {
        let one = one_sidecar(&[
            "--admin-header-read-timeout",
            "1s",
            "--admin-idle-timeout",
            "2s",
        ])
        .await?;
        let sc = &one.sidecar;
        let admin = sc.addrs.admin;
        let started = Instant::now();

        // Under the 10 s default header_read_timeout.
        let slow_deadline = Duration::from_secs(8);
        let slowloris = async {
            let mut io = TcpStream::connect(admin).await?;
            let head = format!("GET /healthz HTTP/1.1\r\nHost: {admin}\r\nx-slow: ");
            let connected = Instant::now();
            let (mut sent, mut reply) = (0usize, Vec::new());
            let mut buf = [0u8; 512];
            let closed = loop {
                if connected.elapsed() > slow_deadline {
                    break false;
                }
                let byte = head.as_bytes().get(sent).copied().unwrap_or(b'a');
                if io.write_all(&[byte]).await.is_err() {
                    break true;
                }
                sent += 1;
                match tokio::time::timeout(Duration::from_millis(200), io.read(&mut buf)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => break true,
                    Ok(Ok(n)) => reply.extend_from_slice(&buf[..n]),
                    Err(_) => {}
                }
            };
            let first = String::from_utf8_lossy(&reply)
                .lines()
                .next()
                .map(str::to_owned);
            anyhow::Ok((closed, connected.elapsed(), sent, first))
        };
        // Under the 60 s default idle timeout.
        let idle_wait = Duration::from_secs(30);
        let silent = async {
            let mut io = TcpStream::connect(admin).await?;
            let connected = Instant::now();
            let got = read_to_close(&mut io, idle_wait).await;
            anyhow::Ok((got.closed, connected.elapsed()))
        };
        let h2_idle = async {
            let mut io = TcpStream::connect(admin).await?;
            let connected = Instant::now();
            let mut out = h2_start();
            frame(
                &mut out,
                HEADERS,
                END_HEADERS | END_STREAM,
                1,
                &get_block("/healthz"),
            );
            io.write_all(&out).await?;
            let seen = read_frames(&mut io, idle_wait, |_| false).await;
            anyhow::Ok((seen, connected.elapsed()))
        };
        let others = async {
            let mut n = 0;
            while started.elapsed() < Duration::from_secs(4) {
                admin_ok(sc).await?;
                n += 1;
            }
            anyhow::Ok(n)
        };
        let (slowloris, silent, h2_idle, others) = tokio::join!(slowloris, silent, h2_idle, others);
        let others = others.context("another admin client during the slow and idle ones")?;
        let (slow_closed, slow_after, sent, first) = slowloris?;
        let (silent_closed, silent_after) = silent?;
        let (h2_seen, h2_after) = h2_idle?;
        println!(
            "admin_header_read_timeout 1s: trickled head ({sent} bytes, one per 200 ms) closed \
             {slow_closed} after {slow_after:?} (reply {first:?})"
        );
        println!(
            "admin_idle_timeout 2s: silent connection closed {silent_closed} after \
             {silent_after:?}; HTTP/2 after one request (PING never acked): response on {:?}, \
             GOAWAY {:?}, closed {} after {h2_after:?}; {others} other admin requests \
             meanwhile, all 200",
            h2_seen.headers, h2_seen.goaway, h2_seen.closed
        );
        ensure!(
            slow_closed,
            "trickled admin head not closed within {slow_deadline:?}"
        );
        ensure!(
            silent_closed,
            "silent admin connection not closed within {idle_wait:?}"
        );
        ensure!(
            h2_seen.headers.contains(&1),
            "HTTP/2 admin request not answered: {h2_seen:?}"
        );
        ensure!(
            h2_seen.closed && h2_seen.goaway == Some(0),
            "idle HTTP/2 admin connection: want GOAWAY NO_ERROR and close within {idle_wait:?}, \
             saw {h2_seen:?}"
        );
        Ok(())
    })
    .await
}

// ---- HTTP/2 by hand ----------------------------------------------------------------------

/// Reset streams in the burst: over a configured 5, under the default 1024.
const BURST: u32 = 15;
/// A caller that goes away with 256 requests in flight: its sidecar cancels them all at once,
/// and on a busy connection none may have been accepted yet. h2's own default (20) ended the
/// connection for everyone on it; the sidecar's default must absorb it.
const CALLER_GONE: u32 = 256;
/// Past the default: the rapid-reset bound is still on out of the box.
const FLOOD: u32 = 4000;

/// The connection preface, then `n` streams each opened and reset at once, in one write.
fn rapid_reset_burst(n: u32) -> Vec<u8> {
    let mut out = h2_start();
    for i in 0..n {
        let stream = 2 * i + 1;
        frame(
            &mut out,
            HEADERS,
            END_HEADERS | END_STREAM,
            stream,
            &get_block("/rapid"),
        );
        frame(&mut out, RST_STREAM, 0, stream, &CANCEL.to_be_bytes());
    }
    out
}

/// Sends a burst of `n` on `io`. `limited`: the connection must end with GOAWAY
/// `ENHANCE_YOUR_CALM`. Otherwise: no GOAWAY, and the stream opened after the burst
/// (`GET /after-burst`) is answered on the same connection.
async fn burst<S: AsyncRead + AsyncWrite + Unpin>(
    mut io: S,
    n: u32,
    limited: bool,
    what: &str,
) -> anyhow::Result<()> {
    let after_id = 2 * n + 1;
    io.write_all(&rapid_reset_burst(n)).await?;
    if !limited {
        let mut next = Vec::new();
        frame(
            &mut next,
            HEADERS,
            END_HEADERS | END_STREAM,
            after_id,
            &get_block("/after-burst"),
        );
        io.write_all(&next).await?;
    }
    io.flush().await?;
    let seen = read_frames(&mut io, Duration::from_secs(20), |s| {
        s.goaway.is_some() || s.headers.contains(&after_id)
    })
    .await;
    println!(
        "{what}: {n} streams opened+reset → GOAWAY {:?}, closed {}, stream {after_id} answered {}",
        seen.goaway,
        seen.closed,
        seen.headers.contains(&after_id)
    );
    if limited {
        ensure!(
            seen.goaway == Some(ENHANCE_YOUR_CALM),
            "{what}: want GOAWAY ENHANCE_YOUR_CALM, saw {seen:?}"
        );
    } else {
        ensure!(
            seen.goaway.is_none(),
            "{what}: GOAWAY under the default limit: {seen:?}"
        );
        ensure!(
            seen.headers.contains(&after_id),
            "{what}: stream {after_id} not answered: {seen:?}"
        );
    }
    Ok(())
}

/// mTLS as [`CLIENT_ID`] to a sidecar's inbound listener, offering `h2`.
async fn peer_config(mesh: &Mesh, server: &str) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let token = mesh.cp.create_token(CLIENT_ID, "1h")?;
    let (svid, _) = fetch_svid(&mesh.cp, &token).await?;
    tls_client_config(
        mesh.cp.bundle()?,
        PeerMatch::Exact(SpiffeId::parse(server)?),
        Some(&svid),
        &[b"h2"],
    )
}

/// `--h2-max-pending-accept-reset-streams 5` on sidecar B: a burst of 15 opened-and-reset
/// streams ends in GOAWAY `ENHANCE_YOUR_CALM` on its inbound (mTLS) and its outbound (h2c from
/// the app) listeners, while A → B requests on another connection keep succeeding. On sidecar A
/// (the default, 1024) the same burst, and one of 256 (a caller cancelling everything it has in
/// flight), are absorbed: no GOAWAY, and the connection serves the next request; a flood of
/// 4,000 still ends in GOAWAY.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rapid_reset_bound_is_configurable() -> anyhow::Result<()> {
    e2e(async {
        let mesh = Mesh::start(MeshOpts {
            b_args: vec!["--h2-max-pending-accept-reset-streams".into(), "5".into()],
            ..Default::default()
        })
        .await?;
        legit(&mesh, "/warm").await?;
        let to_b = peer_config(&mesh, B_ID).await?;
        let to_a = peer_config(&mesh, A_ID).await?;

        let io = tls_connect(mesh.b.addrs.inbound, to_b).await?;
        let (attack, ok) = tokio::join!(
            burst(io, BURST, true, "B inbound, limit 5"),
            legit(&mesh, "/legit-b-inbound")
        );
        ok.context("A → B during the burst on B's inbound")?;
        attack?;

        let io = TcpStream::connect(mesh.b.outbound()).await?;
        let (attack, ok) = tokio::join!(
            burst(io, BURST, true, "B outbound (h2c), limit 5"),
            legit(&mesh, "/legit-b-outbound")
        );
        ok.context("A → B during the burst on B's outbound")?;
        attack?;

        let io = tls_connect(mesh.a.addrs.inbound, to_a.clone()).await?;
        burst(io, BURST, false, "A inbound, default").await?;
        let io = TcpStream::connect(mesh.a.outbound()).await?;
        burst(io, BURST, false, "A outbound (h2c), default").await?;
        let io = tls_connect(mesh.a.addrs.inbound, to_a.clone()).await?;
        burst(
            io,
            CALLER_GONE,
            false,
            "A inbound, a caller's in-flight requests cancelled",
        )
        .await?;
        let io = TcpStream::connect(mesh.a.outbound()).await?;
        burst(
            io,
            CALLER_GONE,
            false,
            "A outbound (h2c), an app's in-flight requests cancelled",
        )
        .await?;
        let io = tls_connect(mesh.a.addrs.inbound, to_a).await?;
        burst(io, FLOOD, true, "A inbound, default, flood").await?;
        legit(&mesh, "/legit-after").await?;
        Ok(())
    })
    .await
}
