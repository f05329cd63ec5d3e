#![allow(clippy::unwrap_used)]
//! HTTP/1.1 request framing on a sidecar's listeners (the guard in `h1_framing.rs`): a request
//! with both Content-Length and Transfer-Encoding is answered `400` and reaches nobody, alone
//! or behind a good pipelined request; a malformed chunked body is answered `400` (the
//! client's fault), whether it arrives with the head or after the head was forwarded; and
//! `header_read_timeout` bounds a slow request head without closing an idle keep-alive
//! connection. Each on sidecar A's outbound listener (plain TCP from the app) and sidecar B's
//! inbound listener (mTLS, as an authenticated peer), with legitimate traffic alongside.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use trellis_identity::tls::PeerMatch;
use trellis_identity::SpiffeId;
use trellis_tests::app_client::{echo_json, get_once, Proto};
use trellis_tests::mesh::{legit, Mesh, MeshOpts, B_ID};
use trellis_tests::raw::{read_to_close, Exchange};
use trellis_tests::{e2e, eventually, fetch_svid, tls_client_config, tls_connect};

const CLIENT_ID: &str = "spiffe://example.org/test/smuggler";

async fn mesh(a_args: &[&str], b_args: &[&str]) -> anyhow::Result<Mesh> {
    Mesh::start(MeshOpts {
        a_args: a_args.iter().map(|s| s.to_string()).collect(),
        b_args: b_args.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    })
    .await
}

/// Opens raw connections to one listener: A's outbound (TCP) or B's inbound (mTLS as
/// [`CLIENT_ID`], ALPN `http/1.1`).
enum Target {
    Outbound(SocketAddr),
    Inbound {
        config: Arc<rustls::ClientConfig>,
        addr: SocketAddr,
    },
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

impl Target {
    async fn both(mesh: &Mesh) -> anyhow::Result<[Target; 2]> {
        let token = mesh.cp.create_token(CLIENT_ID, "1h")?;
        let (svid, _) = fetch_svid(&mesh.cp, &token).await?;
        let config = tls_client_config(
            mesh.cp.bundle()?,
            PeerMatch::Exact(SpiffeId::parse(B_ID)?),
            Some(&svid),
            &[b"http/1.1"],
        )?;
        Ok([
            Target::Outbound(mesh.a.outbound()),
            Target::Inbound {
                config,
                addr: mesh.b.addrs.inbound,
            },
        ])
    }

    fn name(&self) -> &'static str {
        match self {
            Target::Outbound(_) => "outbound",
            Target::Inbound { .. } => "inbound",
        }
    }

    async fn connect(&self) -> anyhow::Result<Box<dyn Io>> {
        Ok(match self {
            Target::Outbound(addr) => Box::new(TcpStream::connect(addr).await?),
            Target::Inbound { config, addr } => Box::new(tls_connect(*addr, config.clone()).await?),
        })
    }
}

/// Writes `raw` (errors ignored: the sidecar may close first), then reads to the close.
async fn exchange(target: &Target, raw: &[u8]) -> anyhow::Result<Exchange> {
    let mut io = target.connect().await?;
    let _ = io.write_all(raw).await;
    let _ = io.flush().await;
    Ok(read_to_close(&mut io, Duration::from_secs(20)).await)
}

/// Reads exactly one response with a Content-Length body; returns its status and body.
async fn read_response<S: AsyncRead + Unpin + ?Sized>(io: &mut S) -> anyhow::Result<(u16, String)> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .context("response without content-length")?
                .trim()
                .parse()?;
            if got.len() >= end + 4 + len {
                let status = head.get(9..12).context("short status line")?.parse()?;
                let body = String::from_utf8_lossy(&got[end + 4..end + 4 + len]).into_owned();
                return Ok((status, body));
            }
        }
        let n = tokio::time::timeout_at(deadline, io.read(&mut buf))
            .await
            .context("no complete response within 20 s")??;
        ensure!(
            n > 0,
            "connection closed after {:?}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    }
}

fn both_lengths(path: &str, smuggled: &str) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nHost: b\r\nContent-Length: 44\r\nTransfer-Encoding: chunked\r\n\r\n\
         0\r\n\r\nGET {smuggled} HTTP/1.1\r\nHost: b\r\n\r\n"
    )
}

/// Content-Length with Transfer-Encoding: `400` naming both, connection closed, nothing at the
/// app, also as the second of two pipelined requests (the first is answered normally).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn both_lengths_are_refused_and_reach_nobody() -> anyhow::Result<()> {
    e2e(async {
        let mesh = mesh(&[], &[]).await?;
        legit(&mesh, "/warm").await?;
        for target in Target::both(&mesh).await? {
            let name = target.name();
            let raw = both_lengths(&format!("/cl-te-{name}"), &format!("/smuggled-{name}"));
            let (alone, ok) = tokio::join!(
                exchange(&target, raw.as_bytes()),
                legit(&mesh, format!("/legit-during-cl-te-{name}"))
            );
            ok.with_context(|| format!("{name}: legitimate request alongside"))?;
            let alone = alone?;
            println!(
                "{name}: CL+TE → {:?} {:?}, {}",
                alone.statuses(),
                alone.text.lines().last(),
                if alone.closed { "closed" } else { "OPEN" }
            );
            ensure!(
                alone.statuses() == [400],
                "{name}: want one 400, got {:?}",
                alone.text
            );
            ensure!(
                alone
                    .text
                    .contains("request has both Content-Length and Transfer-Encoding"),
                "{name}: 400 does not say why: {:?}",
                alone.text
            );
            ensure!(alone.closed, "{name}: connection left open after CL+TE");

            let first = format!("/first-{name}");
            let raw = format!(
                "GET {first} HTTP/1.1\r\nHost: b\r\n\r\n{}",
                both_lengths(&format!("/second-{name}"), &format!("/smuggled2-{name}"))
            );
            let (piped, ok) = tokio::join!(
                exchange(&target, raw.as_bytes()),
                legit(&mesh, format!("/legit-during-pipelined-{name}"))
            );
            ok.with_context(|| format!("{name}: legitimate request alongside the pipeline"))?;
            let piped = piped?;
            println!(
                "{name}: GET then CL+TE pipelined → {:?}, {}",
                piped.statuses(),
                if piped.closed { "closed" } else { "OPEN" }
            );
            ensure!(
                piped.statuses() == [200, 400],
                "{name}: want 200 then 400, got {:?}",
                piped.text
            );
            ensure!(
                piped.text.contains("app-b"),
                "{name}: first answer is not app B's echo"
            );
            ensure!(
                piped.closed,
                "{name}: connection left open after the pipelined CL+TE"
            );
            ensure!(
                mesh.app_b.last_seen(&first).is_some(),
                "{name}: app B never saw the good pipelined request"
            );
            for path in ["cl-te", "smuggled", "second", "smuggled2"] {
                let path = format!("/{path}-{name}");
                ensure!(
                    mesh.app_b.last_seen(&path).is_none(),
                    "{name}: app B saw {path}"
                );
            }
        }
        // h2c prior knowledge on the same listener still works (the guard steps aside).
        let reply = get_once(mesh.a.outbound(), Proto::H2c, "b", "/h2c-after", &[]).await?;
        ensure!(echo_json(&reply)?["app"] == "app-b", "h2c request failed");
        Ok(())
    })
    .await
}

/// A malformed chunk is the client's fault: `400` with the reason, connection closed, whether
/// it comes with the head (nothing forwarded) or after the head and a good chunk went on to
/// the app (the forwarded request is aborted; not a `502`).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn malformed_chunks_get_400() -> anyhow::Result<()> {
    e2e(async {
        let mesh = mesh(&[], &[]).await?;
        legit(&mesh, "/warm").await?;
        for target in Target::both(&mesh).await? {
            let name = target.name();
            let bad = format!("/bad-chunk-{name}");
            let smuggled = format!("/smuggled-chunk-{name}");
            let raw = format!(
                "POST {bad} HTTP/1.1\r\nHost: b\r\nTransfer-Encoding: chunked\r\n\r\n\
                 zz\r\nhello\r\n0\r\n\r\nGET {smuggled} HTTP/1.1\r\nHost: b\r\n\r\n"
            );
            let (got, ok) = tokio::join!(
                exchange(&target, raw.as_bytes()),
                legit(&mesh, format!("/legit-during-bad-chunk-{name}"))
            );
            ok.with_context(|| format!("{name}: legitimate request alongside"))?;
            let got = got?;
            println!(
                "{name}: bad chunk size with the head → {:?} {:?}, {}; app saw the head: {}",
                got.statuses(),
                got.text.lines().last(),
                if got.closed { "closed" } else { "OPEN" },
                mesh.app_b.last_seen(&bad).is_some()
            );
            ensure!(got.statuses() == [400], "{name}: want one 400, got {:?}", got.text);
            ensure!(
                got.text.contains("malformed chunked request body: invalid chunk size"),
                "{name}: 400 does not say why: {:?}",
                got.text
            );
            ensure!(got.closed, "{name}: connection left open");
            ensure!(
                mesh.app_b.last_seen(&smuggled).is_none(),
                "{name}: app B saw {smuggled}"
            );

            // After forwarding: the app is reading the upload when the bad chunk comes.
            let before = mesh.app_b.upload_progress();
            let mut io = target.connect().await?;
            io.write_all(b"POST /upload HTTP/1.1\r\nHost: b\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
                .await?;
            io.flush().await?;
            eventually(Duration::from_secs(20), "app B reads the first chunk", || async {
                let seen = mesh.app_b.upload_progress() - before;
                ensure!(seen >= 5, "app B has {seen} bytes of the upload");
                Ok(())
            })
            .await
            .with_context(|| format!("{name}: upload never reached app B"))?;
            let _ = io.write_all(b"5\r\nworld\r\nXX\r\n").await;
            let _ = io.flush().await;
            let got = read_to_close(&mut io, Duration::from_secs(20)).await;
            println!(
                "{name}: bad chunk after forwarding → {:?} {:?}, {}",
                got.statuses(),
                got.text.lines().last(),
                if got.closed { "closed" } else { "OPEN" }
            );
            ensure!(got.statuses() == [400], "{name}: want one 400, got {:?}", got.text);
            ensure!(
                got.text.contains("malformed chunked request body"),
                "{name}: 400 does not say why: {:?}",
                got.text
            );
            ensure!(got.closed, "{name}: connection left open");
        }
        legit(&mesh, "/after").await
    })
    .await
}

/// `header_read_timeout` 1 s: a keep-alive connection idle for 2.5 s still serves its next
/// request (the wait between requests is `idle_timeout`'s), while a head trickled one byte
/// per 200 ms is cut about 1 s after its first byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn header_read_timeout_spares_idle_keep_alive_but_cuts_slowloris() -> anyhow::Result<()> {
    e2e(async {
        let args = ["--header-read-timeout", "1s"];
        let mesh = mesh(&args, &args).await?;
        legit(&mesh, "/warm").await?;
        for target in Target::both(&mesh).await? {
            let name = target.name();
            let keep_alive = async {
                let mut io = target.connect().await?;
                io.write_all(format!("GET /ka-1-{name} HTTP/1.1\r\nHost: b\r\n\r\n").as_bytes())
                    .await?;
                let (status, _) = read_response(&mut io).await.context("first request")?;
                ensure!(status == 200, "first request: {status}");
                // The scenario itself: idle for longer than header_read_timeout.
                tokio::time::sleep(Duration::from_millis(2500)).await;
                io.write_all(format!("GET /ka-2-{name} HTTP/1.1\r\nHost: b\r\n\r\n").as_bytes())
                    .await?;
                let (status, body) = read_response(&mut io)
                    .await
                    .context("second request on the idle keep-alive connection")?;
                ensure!(status == 200 && body.contains("app-b"), "second request: {status} {body}");
                anyhow::Ok(())
            };
            let slowloris = async {
                let head = format!("GET /slow-{name} HTTP/1.1\r\nHost: b\r\nx-slow: {}\r\n\r\n", "a".repeat(100));
                let mut io = target.connect().await?;
                let started = Instant::now();
                let mut sent = 0;
                let mut buf = [0u8; 1024];
                let closed = loop {
                    if sent < head.len() {
                        if io.write_all(&head.as_bytes()[sent..sent + 1]).await.is_err() {
                            break true;
                        }
                        sent += 1;
                    }
                    match tokio::time::timeout(Duration::from_millis(200), io.read(&mut buf)).await {
                        Ok(Ok(0)) | Ok(Err(_)) => break true,
                        Ok(Ok(_)) => {}
                        Err(_) if started.elapsed() > Duration::from_secs(60) => break false,
                        Err(_) => {}
                    }
                };
                anyhow::Ok((closed, sent, head.len(), started.elapsed()))
            };
            let legit_loop = async {
                let started = Instant::now();
                let mut n = 0;
                while started.elapsed() < Duration::from_secs(3) {
                    legit(&mesh, format!("/legit-timeouts-{name}")).await?;
                    n += 1;
                }
                anyhow::Ok(n)
            };
            let (keep_alive, slowloris, legit_n) = tokio::join!(keep_alive, slowloris, legit_loop);
            keep_alive.with_context(|| format!("{name}: idle keep-alive connection"))?;
            let (closed, sent, len, took) = slowloris?;
            let legit_n = legit_n?;
            println!(
                "{name}: keep-alive idle 2.5 s then served; slowloris closed {closed} after {took:?} with {sent} of {len} head bytes sent; {legit_n} legitimate requests meanwhile"
            );
            ensure!(closed, "{name}: slowloris head never closed");
            ensure!(sent < len, "{name}: the whole slow head got through ({sent} bytes)");
            // The 1 s flag cut it, not the 10 s default (which `sent < len` alone would allow).
            ensure!(
                took < Duration::from_secs(5),
                "{name}: slowloris cut after {took:?}; header_read_timeout is 1 s"
            );
            ensure!(
                mesh.app_b.last_seen(&format!("/slow-{name}")).is_none(),
                "{name}: the slow request reached app B"
            );
        }
        Ok(())
    })
    .await
}
