#![allow(clippy::unwrap_used)]
//! Hostile peers on a sidecar's listeners: oversized and malformed HTTP/1.1 heads, request
//! smuggling, HTTP/2 rapid reset and CONTINUATION floods, stream and connection limits,
//! slow or stalled peers — each answered with its 4xx or a closed connection while a
//! legitimate request through the same sidecar, sent at the same time, succeeds. And a soak:
//! 1,000 slowloris connections while a load runs.
//!
//! Sidecar A's outbound listener (plain HTTP from the app) and sidecar B's inbound listener
//! (mTLS; the test holds a client SVID from the control plane) are attacked with raw bytes:
//! no HTTP library on the attacking side would send them.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use trellis_identity::tls::PeerMatch;
use trellis_identity::SpiffeId;
use trellis_tests::h2_raw::*;
use trellis_tests::load::{Load, LoadOpts};
use trellis_tests::mesh::{legit, Mesh, MeshOpts, B_ID};
use trellis_tests::raw::{exchange, read_to_close};
use trellis_tests::{e2e, eventually, fetch_svid, tls_client_config, tls_connect};

const CLIENT_ID: &str = "spiffe://example.org/test/hostile";

async fn mesh(a_args: &[&str], b_args: &[&str]) -> anyhow::Result<Mesh> {
    Mesh::start(MeshOpts {
        a_args: a_args.iter().map(|s| s.to_string()).collect(),
        b_args: b_args.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    })
    .await
}

/// A direct mTLS connection to sidecar B's inbound listener as [`CLIENT_ID`], offering `alpn`.
struct Peer {
    config: Arc<rustls::ClientConfig>,
    addr: SocketAddr,
}

impl Peer {
    async fn new(mesh: &Mesh, alpn: &[u8]) -> anyhow::Result<Self> {
        let token = mesh.cp.create_token(CLIENT_ID, "1h")?;
        let (svid, _) = fetch_svid(&mesh.cp, &token).await?;
        let config = tls_client_config(
            mesh.cp.bundle()?,
            PeerMatch::Exact(SpiffeId::parse(B_ID)?),
            Some(&svid),
            &[alpn],
        )?;
        Ok(Peer {
            config,
            addr: mesh.b.addrs.inbound,
        })
    }

    async fn connect(&self) -> anyhow::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        tls_connect(self.addr, self.config.clone()).await
    }
}

/// One hostile HTTP/1.1 input: the raw request and what must come back.
struct Case {
    name: &'static str,
    raw: Vec<u8>,
    /// `Some(code)`: this status, then close. `None`: any non-2xx or none, then close.
    status: Option<u16>,
    /// A path app B must never see.
    never_seen: &'static str,
}

fn cases() -> Vec<Case> {
    let head = |lines: &str| format!("{lines}\r\n").into_bytes();
    let many_headers: String = (0..30).map(|i| format!("x-h{i}: v\r\n")).collect();
    vec![
        Case {
            name: "header section over max_header_bytes",
            raw: head(&format!(
                "GET /big-header HTTP/1.1\r\nHost: b\r\nx-big: {}\r\n",
                "a".repeat(12_000)
            )),
            status: Some(431),
            never_seen: "/big-header",
        },
        Case {
            name: "header count over max_headers",
            raw: head(&format!("GET /many HTTP/1.1\r\nHost: b\r\n{many_headers}")),
            status: Some(431),
            never_seen: "/many",
        },
        Case {
            name: "request target over max_uri_bytes",
            raw: head(&format!(
                "GET /long{} HTTP/1.1\r\nHost: b\r\n",
                "x".repeat(2000)
            )),
            status: Some(414),
            never_seen: "/long",
        },
        Case {
            name: "two different Content-Lengths",
            raw: head("POST /two-cl HTTP/1.1\r\nHost: b\r\nContent-Length: 5\r\nContent-Length: 6\r\n")
                .into_iter()
                .chain(*b"hello!")
                .collect(),
            status: Some(400),
            never_seen: "/two-cl",
        },
        Case {
            name: "a Content-Length list",
            raw: head("POST /cl-list HTTP/1.1\r\nHost: b\r\nContent-Length: 5, 6\r\n")
                .into_iter()
                .chain(*b"hello!")
                .collect(),
            status: Some(400),
            never_seen: "/cl-list",
        },
        Case {
            name: "Transfer-Encoding whose last coding is not chunked",
            raw: head("POST /te-gzip HTTP/1.1\r\nHost: b\r\nTransfer-Encoding: chunked, gzip\r\n")
                .into_iter()
                .chain(*b"5\r\nhello\r\n0\r\n\r\n")
                .collect(),
            status: Some(400),
            never_seen: "/te-gzip",
        },
        Case {
            name: "Transfer-Encoding on HTTP/1.0",
            raw: head("POST /te-10 HTTP/1.0\r\nHost: b\r\nTransfer-Encoding: chunked\r\n")
                .into_iter()
                .chain(*b"0\r\n\r\n")
                .collect(),
            status: Some(400),
            never_seen: "/te-10",
        },
        Case {
            name: "obs-fold (a header continuation line)",
            raw: head("GET /obs-fold HTTP/1.1\r\nHost: b\r\nx-folded: a\r\n b\r\n"),
            status: Some(400),
            never_seen: "/obs-fold",
        },
        Case {
            name: "space before the header colon",
            raw: head("GET /space-colon HTTP/1.1\r\nHost: b\r\nContent-Length : 0\r\n"),
            status: Some(400),
            never_seen: "/space-colon",
        },
        Case {
            // RFC 9112 6.1 lets a server reject these; the sidecar does (h1_framing.rs), so
            // neither this request nor the bytes after its chunked body reach the app.
            name: "Content-Length and Transfer-Encoding together",
            raw: head(
                "POST /cl-te HTTP/1.1\r\nHost: b\r\nContent-Length: 44\r\nTransfer-Encoding: chunked\r\n",
            )
            .into_iter()
            .chain(*b"0\r\n\r\nGET /smuggled-cl-te HTTP/1.1\r\nHost: b\r\n\r\n")
            .collect(),
            status: Some(400),
            never_seen: "/smuggled-cl-te",
        },
        Case {
            name: "bad chunk size",
            raw: head("POST /bad-chunk HTTP/1.1\r\nHost: b\r\nTransfer-Encoding: chunked\r\n")
                .into_iter()
                .chain(*b"zz\r\nhello\r\n0\r\n\r\nGET /smuggled-chunk HTTP/1.1\r\nHost: b\r\n\r\n")
                .collect(),
            status: Some(400),
            never_seen: "/smuggled-chunk",
        },
    ]
}

/// Runs every [`cases`] input against `connect()`, each with a legitimate request at the same
/// time; checks the answer, the close, that app B never saw the path, and the legitimate
/// request's success.
async fn run_cases<F, Fut, S>(mesh: &Mesh, listener: &str, connect: F) -> anyhow::Result<()>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<S>>,
    S: AsyncRead + AsyncWrite + Unpin,
{
    for case in cases() {
        let io = connect().await?;
        let (got, ok) = tokio::join!(
            exchange(io, &case.raw, Duration::from_secs(20)),
            legit(mesh, "/legit")
        );
        ok.with_context(|| format!("{listener}: legitimate request during `{}`", case.name))?;
        let status = got.status();
        println!(
            "{listener}: {:<55} → {} {}",
            case.name,
            status.map_or("no response".to_string(), |s| s.to_string()),
            if got.closed { "closed" } else { "OPEN" }
        );
        // Without an expected status: whatever the answer, there is at most one (below).
        if let Some(want) = case.status {
            ensure!(
                status == Some(want),
                "{listener}: `{}`: want {want}, got {:?}",
                case.name,
                got.text.lines().next()
            );
        }
        ensure!(
            got.closed,
            "{listener}: `{}`: connection left open",
            case.name
        );
        ensure!(
            got.text.matches("HTTP/1.1 ").count() <= 1,
            "{listener}: `{}`: more than one response: {:?}",
            case.name,
            got.text
        );
        ensure!(
            mesh.app_b.last_seen(case.never_seen).is_none(),
            "{listener}: `{}`: app B saw {}",
            case.name,
            case.never_seen
        );
    }
    Ok(())
}

const LIMIT_ARGS: &[&str] = &[
    "--max-header-bytes",
    "8192",
    "--max-headers",
    "20",
    "--max-uri-bytes",
    "1024",
];

/// Oversized and ambiguous HTTP/1.1 requests from the app on sidecar A's outbound listener.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn outbound_http1_limits_and_smuggling() -> anyhow::Result<()> {
    e2e(async {
        let mesh = mesh(LIMIT_ARGS, &[]).await?;
        let addr = mesh.a.outbound();
        run_cases(&mesh, "outbound", || async move {
            Ok(TcpStream::connect(addr).await?)
        })
        .await
    })
    .await
}

/// The same inputs from an authenticated peer over mTLS on sidecar B's inbound listener.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn inbound_http1_limits_and_smuggling() -> anyhow::Result<()> {
    e2e(async {
        let mesh = mesh(&[], LIMIT_ARGS).await?;
        let peer = Peer::new(&mesh, b"http/1.1").await?;
        let peer = &peer;
        run_cases(&mesh, "inbound", || async move { peer.connect().await }).await
    })
    .await
}

// ---- HTTP/2 by hand ----------------------------------------------------------------------

/// Rapid reset (CVE-2023-44487): thousands of streams opened and reset at once get GOAWAY
/// `ENHANCE_YOUR_CALM`; a CONTINUATION flood is cut off; streams past
/// `h2_max_concurrent_streams` are refused. Legitimate requests through the same sidecar keep
/// succeeding.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn http2_rapid_reset_continuation_flood_and_stream_limit() -> anyhow::Result<()> {
    e2e(async {
        let mesh = mesh(&[], &["--h2-max-concurrent-streams", "8"]).await?;
        legit(&mesh, "/warm").await?;
        let peer = Peer::new(&mesh, b"h2").await?;

        // Rapid reset.
        let mut tls = peer.connect().await?;
        let (mut rd, mut wr) = tokio::io::split(&mut tls);
        let attack = async {
            wr.write_all(&h2_start()).await?;
            let mut sent = 0u32;
            for batch in 0..50u32 {
                let mut out = Vec::new();
                for i in 0..100u32 {
                    let stream = 2 * (batch * 100 + i) + 1;
                    frame(&mut out, HEADERS, END_HEADERS | END_STREAM, stream, &get_block("/rapid"));
                    frame(&mut out, RST_STREAM, 0, stream, &CANCEL.to_be_bytes());
                }
                if wr.write_all(&out).await.is_err() {
                    break;
                }
                sent += 100;
            }
            anyhow::Ok(sent)
        };
        let (sent, seen, ok) = tokio::join!(
            attack,
            read_frames(&mut rd, Duration::from_secs(20), |_| false),
            legit(&mesh, "/legit-rapid")
        );
        ok.context("legitimate request during the rapid reset")?;
        println!(
            "rapid reset: {} streams opened+reset before the sidecar stopped reading; GOAWAY {:?}, closed {}",
            sent?, seen.goaway, seen.closed
        );
        ensure!(
            seen.goaway == Some(ENHANCE_YOUR_CALM),
            "rapid reset: want GOAWAY ENHANCE_YOUR_CALM, saw {seen:?}"
        );
        drop(tls);

        // CONTINUATION flood: one header block that never ends.
        let mut tls = peer.connect().await?;
        let (mut rd, mut wr) = tokio::io::split(&mut tls);
        let flood = async {
            wr.write_all(&h2_start()).await?;
            let mut first = Vec::new();
            frame(&mut first, HEADERS, 0, 1, &get_block("/flood"));
            wr.write_all(&first).await?;
            // 100 literal headers `x-f: aaa` per frame: ~3.8 KB of header list each.
            let mut block = Vec::new();
            for _ in 0..100 {
                block.extend_from_slice(&[0x00, 0x03, b'x', b'-', b'f', 0x03, b'a', b'a', b'a']);
            }
            let mut frames = 0usize;
            for _ in 0..200 {
                let mut out = Vec::new();
                for _ in 0..25 {
                    frame(&mut out, CONTINUATION, 0, 1, &block);
                }
                if wr.write_all(&out).await.is_err() {
                    break;
                }
                frames += 25;
            }
            anyhow::Ok(frames)
        };
        let (frames, seen, ok) = tokio::join!(
            flood,
            read_frames(&mut rd, Duration::from_secs(20), |_| false),
            legit(&mesh, "/legit-flood")
        );
        ok.context("legitimate request during the CONTINUATION flood")?;
        println!(
            "CONTINUATION flood: {} frames written; GOAWAY {:?}, RST {:?}, closed {}",
            frames?, seen.goaway, seen.rst, seen.closed
        );
        ensure!(
            seen.closed || seen.goaway.is_some(),
            "CONTINUATION flood: connection not cut off: {seen:?}"
        );
        ensure!(mesh.app_b.last_seen("/flood").is_none(), "app B saw /flood");
        drop(tls);

        // Streams past the limit of 8: 20 requests whose bodies never end.
        let mut tls = peer.connect().await?;
        let mut out = h2_start();
        for i in 0..20u32 {
            frame(&mut out, HEADERS, END_HEADERS, 2 * i + 1, &get_block("/held"));
        }
        tls.write_all(&out).await?;
        let (seen, ok) = tokio::join!(
            read_frames(&mut tls, Duration::from_secs(5), |_| false),
            legit(&mesh, "/legit-streams")
        );
        ok.context("legitimate request while a peer holds its streams")?;
        let refused = seen.rst.iter().filter(|c| **c == REFUSED_STREAM).count();
        println!("stream limit 8: of 20 streams opened, {refused} refused (REFUSED_STREAM)");
        ensure!(refused >= 12, "want ≥ 12 streams refused, saw {seen:?}");
        Ok(())
    })
    .await
}

/// Slow or stalled peers: a request head trickled in (slowloris) is cut at
/// `header_read_timeout` on both listeners, a stalled TLS handshake at `handshake_timeout`, an
/// HTTP/2 connection with no stream at `idle_timeout`. Legitimate requests keep succeeding.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn timeouts_cut_slow_and_idle_peers() -> anyhow::Result<()> {
    e2e(async {
        let mesh = mesh(
            &["--header-read-timeout", "2s"],
            &[
                "--header-read-timeout",
                "2s",
                "--handshake-timeout",
                "2s",
                "--idle-timeout",
                "3s",
            ],
        )
        .await?;
        legit(&mesh, "/warm").await?;
        let h1 = Peer::new(&mesh, b"http/1.1").await?;
        let h2 = Peer::new(&mesh, b"h2").await?;
        let wait = Duration::from_secs(30);

        let started = Instant::now();
        let outbound = async {
            let io = TcpStream::connect(mesh.a.outbound()).await?;
            let got = exchange(io, b"GET /slow HTTP/1.1\r\nHost: b\r\nx-slow: ", wait).await;
            anyhow::Ok((got, started.elapsed()))
        };
        let inbound = async {
            let io = h1.connect().await?;
            let got = exchange(io, b"GET /slow HTTP/1.1\r\nHost: b\r\nx-slow: ", wait).await;
            anyhow::Ok((got, started.elapsed()))
        };
        let handshake = async {
            let mut io = TcpStream::connect(mesh.b.addrs.inbound).await?;
            let got = read_to_close(&mut io, wait).await;
            anyhow::Ok((got, started.elapsed()))
        };
        let idle = async {
            let mut io = h2.connect().await?;
            io.write_all(&h2_start()).await?;
            let seen = read_frames(&mut io, wait, |_| false).await;
            anyhow::Ok((seen, started.elapsed()))
        };
        let legit_loop = async {
            let mut n = 0;
            while started.elapsed() < Duration::from_secs(5) {
                legit(&mesh, "/legit-timeouts").await?;
                n += 1;
            }
            anyhow::Ok(n)
        };
        let (outbound, inbound, handshake, idle, legit_n) =
            tokio::join!(outbound, inbound, handshake, idle, legit_loop);
        let legit_n = legit_n.context("legitimate requests during the slow peers")?;
        let (outbound, inbound, handshake, idle) = (outbound?, inbound?, handshake?, idle?);
        println!(
            "header_read_timeout 2s: outbound closed {} after {:?} ({:?}); inbound closed {} after {:?} ({:?})",
            outbound.0.closed, outbound.1, outbound.0.status(), inbound.0.closed, inbound.1, inbound.0.status()
        );
        println!(
            "handshake_timeout 2s: closed {} after {:?}; idle_timeout 3s (h2, no stream): GOAWAY {:?} closed {} after {:?}; {legit_n} legitimate requests meanwhile, all 200",
            handshake.0.closed, handshake.1, idle.0.goaway, idle.0.closed, idle.1
        );
        ensure!(outbound.0.closed, "outbound slowloris not closed");
        ensure!(inbound.0.closed, "inbound slowloris not closed");
        ensure!(handshake.0.closed, "stalled handshake not closed");
        // Each cut comes from its flag, not from the built-in default (10 s for the head and
        // the handshake, 60 s idle), which the 30 s wait would also have seen.
        for (what, took, bound) in [
            ("outbound slowloris (2 s; default 10 s)", outbound.1, 7),
            ("inbound slowloris (2 s; default 10 s)", inbound.1, 7),
            ("stalled handshake (2 s; default 10 s)", handshake.1, 7),
            ("idle HTTP/2 (3 s + 5 s GOAWAY grace; default 60 s)", idle.1, 20),
        ] {
            ensure!(
                took < Duration::from_secs(bound),
                "{what} closed after {took:?}: later than its flag allows"
            );
        }
        ensure!(
            idle.0.closed && idle.0.goaway == Some(0),
            "idle HTTP/2 connection: want GOAWAY NO_ERROR and close, saw {:?}",
            idle.0
        );
        // A's pooled connection to B goes idle too and B closes it: A's next request must
        // reconnect without a failure.
        eventually(Duration::from_secs(30), "B closes A's idle pooled connection", || async {
            let open = mesh
                .b
                .metrics()
                .await?
                .sum("trellis_connections_open", &[("direction", "inbound")]);
            ensure!(open == 0.0, "{open} inbound connections still open");
            Ok(())
        })
        .await?;
        legit(&mesh, "/legit-after-idle-close")
            .await
            .context("first request after B closed A's idle pooled connection")?;
        Ok(())
    })
    .await
}

/// Connections past `max_connections_*` are closed at accept and counted in
/// `trellis_connections_refused_total{listener}`; the listener serves again once one closes,
/// and the other listeners are not affected meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn connection_limits_close_the_excess() -> anyhow::Result<()> {
    e2e(async {
        let mesh = mesh(
            &["--max-connections-outbound", "16"],
            &["--max-connections-inbound", "16", "--handshake-timeout", "60s"],
        )
        .await?;
        legit(&mesh, "/warm").await?;

        // Sidecar B inbound: 16 stalled TCP connections fill it (A's pooled connection to B
        // was opened by the warm-up, before); the 17th is closed at once.
        let mut hogs = Vec::new();
        for _ in 0..15 {
            hogs.push(TcpStream::connect(mesh.b.addrs.inbound).await?);
        }
        let mut extra = TcpStream::connect(mesh.b.addrs.inbound).await?;
        let got = read_to_close(&mut extra, Duration::from_secs(10)).await;
        ensure!(got.closed, "17th inbound connection left open");
        legit(&mesh, "/legit-inbound-full")
            .await
            .context("A → B over the pooled connection while B's inbound is full")?;
        let refused = mesh.b.metrics().await?.sum(
            "trellis_connections_refused_total",
            &[("listener", "inbound")],
        );
        println!("inbound limit 16: extra connection closed; refused_total{{inbound}} = {refused}");
        ensure!(refused >= 1.0, "B counted no refused inbound connection");
        drop(hogs);

        // Sidecar A outbound: 16 idle app connections fill it; the 17th is closed at once;
        // after one hog leaves, a legitimate request gets in.
        let mut hogs = Vec::new();
        for _ in 0..16 {
            hogs.push(TcpStream::connect(mesh.a.outbound()).await?);
        }
        let mut extra = TcpStream::connect(mesh.a.outbound()).await?;
        let got = read_to_close(&mut extra, Duration::from_secs(10)).await;
        ensure!(got.closed, "17th outbound connection left open");
        let refused = mesh.a.metrics().await?.sum(
            "trellis_connections_refused_total",
            &[("listener", "outbound")],
        );
        ensure!(refused >= 1.0, "A counted no refused outbound connection");
        hogs.pop();
        eventually(Duration::from_secs(20), "a slot frees on A's outbound", || {
            legit(&mesh, "/legit-after-hog")
        })
        .await?;
        println!("outbound limit 16: extra connection closed; refused_total{{outbound}} = {refused}; served again after one left");
        Ok(())
    })
    .await
}

/// 1,000 slowloris connections — 700 trickling a request head byte by byte into sidecar A's
/// outbound listener, 300 stalled in the TLS handshake on sidecar B's inbound listener — while
/// a load runs A → B. Prints the load's p99 without and with them; asserts no legitimate
/// request failed and every slowloris connection was closed by its timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn soak_1000_slowloris_connections() -> anyhow::Result<()> {
    e2e(async {
        let mesh = mesh(
            &["--header-read-timeout", "15s"],
            &["--handshake-timeout", "15s"],
        )
        .await?;
        legit(&mesh, "/warm").await?;
        let load = Load::start(LoadOpts::new(mesh.a.outbound(), "b", "app-b"));
        let quiet = load.mark("baseline");
        tokio::time::sleep(Duration::from_secs(8)).await;
        load.end(quiet);

        let closed = Arc::new(AtomicUsize::new(0));
        let opened = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..1000usize {
            let closed = Arc::clone(&closed);
            let (outbound, inbound) = (mesh.a.outbound(), mesh.b.addrs.inbound);
            tasks.spawn(async move {
                let mut io = if i < 700 {
                    TcpStream::connect(outbound).await?
                } else {
                    TcpStream::connect(inbound).await?
                };
                let head = b"GET /slowloris HTTP/1.1\r\nHost: b\r\nx-a: ";
                let mut buf = [0u8; 256];
                let mut sent = 0usize;
                // From the connect: on a loaded machine a connect may wait in the backlog.
                let connected = Instant::now();
                let deadline = connected + Duration::from_secs(50);
                while Instant::now() < deadline {
                    if i < 700 {
                        let byte = head.get(sent).copied().unwrap_or(b'a');
                        if io.write_all(&[byte]).await.is_err() {
                            break;
                        }
                        sent += 1;
                    }
                    match tokio::time::timeout(Duration::from_millis(500), io.read(&mut buf)).await {
                        Ok(Ok(0)) | Ok(Err(_)) => break,
                        Ok(Ok(_)) | Err(_) => {}
                    }
                }
                if Instant::now() < deadline {
                    closed.fetch_add(1, Ordering::Relaxed);
                } else {
                    eprintln!("slowloris {i} (sent {sent} bytes) still open");
                }
                anyhow::Ok(connected.elapsed())
            });
            if i % 100 == 99 {
                // Connect in waves so the listeners' backlogs never overflow (a dropped SYN
                // is retried by the kernel seconds later).
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        let opened_all = opened.elapsed();
        // Let them all connect, then measure while they are held.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let during = load.mark("1000 slowloris held");
        tokio::time::sleep(Duration::from_secs(10)).await;
        load.end(during);
        let mut longest_open = Duration::ZERO;
        while let Some(done) = tasks.join_next().await {
            longest_open = longest_open.max(done??);
        }
        let report = load.stop().await;
        report.print("1000 slowloris connections");
        println!(
            "p99 baseline {:?}, with 1000 slowloris held {:?}; {} of 1000 slowloris connections closed by the sidecars (timeouts 15 s), the longest open {:?}; all spawned within {:?}",
            report.p99_during("baseline"),
            report.p99_during("1000 slowloris held"),
            closed.load(Ordering::Relaxed),
            longest_open,
            opened_all
        );
        report.assert_no_failures()?;
        let closed = closed.load(Ordering::Relaxed);
        if closed != 1000 {
            bail!("{} slowloris connections were not closed within 50 s", 1000 - closed);
        }
        Ok(())
    })
    .await
}
