//! The mesh end to end, with real processes: `trellis control`, sidecar A and sidecar B
//! (`trellis sidecar`, identities over SDS with join tokens), and an echo app behind each
//! (in the test process).
//!
//! ```text
//!  test (app A) ──http/1.1 or h2c──▶ sidecar A ══ mTLS, h2 ══▶ sidecar B ──http/1.1──▶ app B
//! ```

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};
use bytes::Bytes;
use http::{Method, StatusCode, Version};
use http_body_util::BodyExt as _;
use sha2::{Digest as _, Sha256};
use trellis_identity::tls::PeerMatch;
use trellis_identity::SpiffeId;
use trellis_tests::app_client::{channel_body, echo_json, get_once, AppConn, Proto};
use trellis_tests::echo::{pattern, pattern_byte, CHUNK};
use trellis_tests::echo::{EchoApp, TcpEcho};
use trellis_tests::mesh::{Mesh, MeshOpts, A_ID, B_ID};
use trellis_tests::sidecar::{Sidecar, SidecarOpts};
use trellis_tests::{
    e2e, eventually, fetch_svid, free_port, peer_leaf, tls_client_config, tls_connect,
};
use trellis_tests::{ControlPlane, ControlPlaneOpts};

const XFCC: &str = "x-forwarded-client-cert";
const TEN_MB: u64 = 10 * 1024 * 1024;
/// The ceiling for a sidecar's resident memory while 10 MB bodies pass through it.
const RSS_LIMIT_KIB: u64 = 64 * 1024;

/// SHA-256 (hex) of the leaf certificate sidecar `s` presents, read by an mTLS probe of its
/// inbound listener with a client SVID of our own. A sidecar presents the same SVID as client
/// and as server, so this is the `Hash=` its peers must put in XFCC.
async fn presented_leaf_sha256(mesh: &Mesh, s: &Sidecar) -> anyhow::Result<String> {
    let token = mesh
        .cp
        .create_token("spiffe://example.org/test/probe", "1h")?;
    let (svid, bundle) = fetch_svid(&mesh.cp, &token).await?;
    let config = tls_client_config(
        bundle,
        PeerMatch::Exact(SpiffeId::parse(&s.spiffe_id)?),
        Some(&svid),
        &[b"http/1.1"],
    )?;
    let tls = tls_connect(s.addrs.inbound, config).await?;
    Ok(hex::encode(Sha256::digest(peer_leaf(&tls)?.as_ref())))
}

/// The XFCC values app B received with the request for `path`.
fn xfcc_seen_by_b(mesh: &Mesh, path: &str) -> anyhow::Result<Vec<String>> {
    let seen = mesh
        .app_b
        .last_seen(path)
        .with_context(|| format!("app B never received {path}"))?;
    Ok(seen
        .header_all(XFCC)
        .iter()
        .map(|s| s.to_string())
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn http1_and_h2c_from_the_app_reach_b_with_callers_identity_in_xfcc() -> anyhow::Result<()> {
    e2e(async {
        let mesh = Mesh::start(MeshOpts {
            a_upstreams: vec![format!(
                "name=b-direct,listen=127.0.0.1:0,address={{B}},identity={B_ID}"
            )],
            ..Default::default()
        })
        .await?;
        let a_leaf_hash = presented_leaf_sha256(&mesh, &mesh.a).await?;
        let want_xfcc = format!("By={B_ID};Hash={a_leaf_hash};URI={A_ID}");

        for (proto, path) in [(Proto::H1, "/hello/h1"), (Proto::H2c, "/hello/h2c")] {
            let mut conn = AppConn::connect(mesh.a.outbound(), proto).await?;
            let reply = conn.get("b", path, &[]).await?;
            let echo = echo_json(&reply).with_context(|| format!("{proto:?} {path}"))?;
            ensure!(
                echo["app"] == "app-b" && echo["path"] == path,
                "{proto:?}: wrong app or path: {echo}"
            );
            let want_version = match proto {
                Proto::H1 => Version::HTTP_11,
                Proto::H2c => Version::HTTP_2,
            };
            ensure!(
                reply.version == want_version,
                "{proto:?}: response came back as {:?}",
                reply.version
            );
            let xfcc = xfcc_seen_by_b(&mesh, path)?;
            ensure!(
                xfcc == [want_xfcc.clone()],
                "{proto:?}: app B saw XFCC {xfcc:?}, want [{want_xfcc:?}]"
            );
            // The same connection keeps working.
            let again = conn.get("b", path, &[]).await?;
            ensure!(
                again.status == StatusCode::OK,
                "{proto:?} second request: {}",
                again.summary()
            );
        }

        // An upstream on its own port (`listen=`) needs no Host routing.
        let direct = *mesh
            .a
            .addrs
            .outbound
            .get("b-direct")
            .context("sidecar A did not report its `b-direct` listener")?;
        for proto in [Proto::H1, Proto::H2c] {
            let reply = get_once(direct, proto, "anything", "/direct", &[]).await?;
            let echo = echo_json(&reply).with_context(|| format!("{proto:?} via b-direct"))?;
            ensure!(echo["app"] == "app-b", "{proto:?} via b-direct: {echo}");
            let xfcc = xfcc_seen_by_b(&mesh, "/direct")?;
            ensure!(
                xfcc == [want_xfcc.clone()],
                "{proto:?} via b-direct: app B saw XFCC {xfcc:?}"
            );
        }

        // On the shared listener an unknown host is the app's mistake: 404, naming the host.
        let reply = get_once(mesh.a.outbound(), Proto::H1, "nosuch", "/", &[]).await?;
        ensure!(
            reply.status == StatusCode::NOT_FOUND && reply.text().contains("nosuch"),
            "unknown host: {}",
            reply.summary()
        );
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn caller_supplied_xfcc_never_reaches_the_app() -> anyhow::Result<()> {
    e2e(async {
        let mesh = Mesh::start(MeshOpts::default()).await?;
        let forged = [
            (
                XFCC,
                "By=spiffe://example.org/admin;Hash=00;URI=spiffe://example.org/admin",
            ),
            ("X-Forwarded-Client-Cert", "URI=spiffe://example.org/root"),
        ];
        for (proto, path) in [(Proto::H1, "/forged/h1"), (Proto::H2c, "/forged/h2c")] {
            let reply = get_once(mesh.a.outbound(), proto, "b", path, &forged).await?;
            echo_json(&reply).with_context(|| format!("{proto:?}"))?;
            let xfcc = xfcc_seen_by_b(&mesh, path)?;
            ensure!(
                xfcc.len() == 1,
                "{proto:?}: app B saw {} XFCC values: {xfcc:?}",
                xfcc.len()
            );
            ensure!(
                xfcc[0].starts_with(&format!("By={B_ID};Hash="))
                    && xfcc[0].ends_with(&format!(";URI={A_ID}"))
                    && !xfcc[0].contains("admin")
                    && !xfcc[0].contains("root"),
                "{proto:?}: app B saw XFCC {xfcc:?}"
            );
        }
        Ok(())
    })
    .await
}

/// Samples the VmRSS of `pids` every 5 ms on a thread until dropped; keeps the peak of each.
struct RssSampler {
    stop: Arc<AtomicBool>,
    peaks: Arc<Vec<AtomicU64>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RssSampler {
    fn start(pids: Vec<u32>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let peaks: Arc<Vec<AtomicU64>> = Arc::new(pids.iter().map(|_| AtomicU64::new(0)).collect());
        let (s, p) = (stop.clone(), peaks.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                for (i, pid) in pids.iter().enumerate() {
                    if let Ok(kib) = trellis_tests::sidecar::rss_kib(*pid) {
                        p[i].fetch_max(kib, Ordering::SeqCst);
                    }
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        RssSampler {
            stop,
            peaks,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> Vec<u64> {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.peaks
            .iter()
            .map(|p| p.load(Ordering::SeqCst))
            .collect()
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Uploads 10 MB to app B through the mesh. Only the first MiB is sent until app B has
/// received some of it: a sidecar that buffered whole bodies would stall here.
async fn upload_10mb(mesh: &Mesh, proto: Proto) -> anyhow::Result<()> {
    let before = mesh.app_b.upload_progress();
    let mut conn = AppConn::connect(mesh.a.outbound(), proto).await?;
    let (tx, body) = channel_body();
    let req = conn.request(Method::POST, "b", "/upload").body(body)?;
    let mut expected = Sha256::new();
    let send = async {
        let mut off = 0u64;
        while off < TEN_MB {
            if off == 1024 * 1024 {
                eventually(
                    Duration::from_secs(15),
                    "app B to receive the start of the upload before the rest is sent",
                    || async {
                        ensure!(mesh.app_b.upload_progress() > before, "nothing yet");
                        Ok(())
                    },
                )
                .await?;
            }
            let n = (TEN_MB - off).min(CHUNK as u64) as usize;
            let chunk = pattern(off, n);
            expected.update(&chunk);
            tx.send(chunk)
                .await
                .context("request body channel closed")?;
            off += n as u64;
        }
        drop(tx);
        anyhow::Ok(())
    };
    let (sent, reply) = tokio::join!(send, conn.send_read(req));
    let reply = reply?;
    sent.with_context(|| format!("{proto:?} upload"))?;
    let json = echo_json(&reply)?;
    let want_hash = hex::encode(expected.finalize());
    ensure!(
        json["len"] == TEN_MB && json["sha256"] == want_hash.as_str(),
        "{proto:?}: app B got {json}, want len {TEN_MB} sha256 {want_hash}"
    );
    Ok(())
}

/// Downloads 10 MB from app B through the mesh. App B sends the first chunk and then waits
/// until the test has received bytes: a sidecar that buffered whole bodies would stall here.
async fn download_10mb(mesh: &Mesh, proto: Proto) -> anyhow::Result<()> {
    let mut conn = AppConn::connect(mesh.a.outbound(), proto).await?;
    let path = format!("/gated-bytes/{TEN_MB}");
    let resp = conn
        .send(
            conn.request(Method::GET, "b", &path)
                .body(trellis_tests::app_client::empty())?,
        )
        .await?;
    ensure!(
        resp.status() == StatusCode::OK,
        "{proto:?} GET {path}: {}",
        resp.status()
    );
    let mut body = resp.into_body();
    let mut got = 0u64;
    let mut gate_opened = false;
    let deadline = Instant::now() + Duration::from_secs(60);
    while let Some(frame) = tokio::time::timeout(Duration::from_secs(15), body.frame())
        .await
        .with_context(|| {
            format!(
                "{proto:?}: no body bytes for 15s after {got} bytes (gate opened: {gate_opened})"
            )
        })?
    {
        let frame = frame.with_context(|| format!("{proto:?}: body broke after {got} bytes"))?;
        let Some(data) = frame.data_ref() else {
            continue;
        };
        for (i, b) in data.iter().enumerate() {
            if *b != pattern_byte(got + i as u64) {
                bail!(
                    "{proto:?}: byte {} is {b}, want {}",
                    got + i as u64,
                    pattern_byte(got + i as u64)
                );
            }
        }
        got += data.len() as u64;
        if !gate_opened && got > 0 {
            mesh.app_b.open_gate();
            gate_opened = true;
        }
        ensure!(
            Instant::now() < deadline,
            "{proto:?}: download took over 60s"
        );
    }
    ensure!(
        got == TEN_MB,
        "{proto:?}: received {got} bytes, want {TEN_MB}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_megabyte_bodies_stream_through_with_low_sidecar_memory() -> anyhow::Result<()> {
    e2e(async {
        let mesh = Mesh::start(MeshOpts::default()).await?;
        // Warm up the pooled connection so the idle figure includes it.
        let warm = get_once(mesh.a.outbound(), Proto::H1, "b", "/warm", &[]).await?;
        ensure!(warm.status == StatusCode::OK, "warm-up: {}", warm.summary());
        let idle = (mesh.a.rss_kib()?, mesh.b.rss_kib()?);

        let sampler = RssSampler::start(vec![mesh.a.child.id(), mesh.b.child.id()]);
        let started = Instant::now();
        for proto in [Proto::H1, Proto::H2c] {
            upload_10mb(&mesh, proto).await?;
            download_10mb(&mesh, proto).await?;
        }
        let elapsed = started.elapsed();
        let peaks = sampler.finish();
        eprintln!(
            "40 MB through the mesh in {elapsed:?}; sidecar RSS idle → peak: A {} → {} KiB, B {} → {} KiB (limit {RSS_LIMIT_KIB} KiB)",
            idle.0, peaks[0], idle.1, peaks[1]
        );
        for (name, peak) in [("A", peaks[0]), ("B", peaks[1])] {
            ensure!(peak > 0, "no RSS sample of sidecar {name}");
            ensure!(
                peak < RSS_LIMIT_KIB,
                "sidecar {name} peaked at {peak} KiB resident while streaming 10 MB bodies (limit {RSS_LIMIT_KIB} KiB)"
            );
        }
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thousand_sequential_requests_ride_one_upstream_connection() -> anyhow::Result<()> {
    e2e(async {
        let mesh = Mesh::start(MeshOpts::default()).await?;
        let started = Instant::now();
        // 10 app connections (5 HTTP/1.1, 5 h2c) × 100 requests: the pool, not the app's
        // connection, decides how many mTLS connections there are.
        let mut n = 0;
        for c in 0..10 {
            let proto = if c % 2 == 0 { Proto::H1 } else { Proto::H2c };
            let mut conn = AppConn::connect(mesh.a.outbound(), proto).await?;
            for _ in 0..100 {
                n += 1;
                let reply = conn.get("b", "/seq", &[]).await?;
                ensure!(
                    reply.status == StatusCode::OK,
                    "request {n} ({proto:?}): {}",
                    reply.summary()
                );
            }
        }
        let elapsed = started.elapsed();
        let metrics = mesh.a.metrics().await?;
        let opened = metrics.sum("trellis_upstream_connections_total", &[]);
        eprintln!(
            "{n} sequential requests in {elapsed:?}; sidecar A opened {opened} upstream connection(s)"
        );
        ensure!(
            opened == 1.0,
            "sidecar A opened {opened} upstream mTLS connections for {n} requests, want 1:\n{}",
            metrics.lines_of("trellis_upstream_connections_total")
        );
        let a_ok = metrics.sum(
            "trellis_requests_total",
            &[("direction", "outbound"), ("code", "200")],
        );
        let a_open = metrics.sum("trellis_connections_open", &[("direction", "outbound")]);
        ensure!(
            a_ok >= n as f64 && a_open == 1.0,
            "sidecar A counted {a_ok} outbound 200s (want ≥ {n}) and {a_open} open outbound mTLS connections (want 1):\n{}\n{}",
            metrics.lines_of("trellis_requests_total"),
            metrics.lines_of("trellis_connections_open")
        );
        let b_seen = mesh.app_b.seen().iter().filter(|r| r.path == "/seq").count();
        ensure!(b_seen == n, "app B saw {b_seen} of {n} requests");
        let b_handshakes = mesh.b.metrics().await?.sum(
            "trellis_tls_handshakes_total",
            &[("direction", "inbound"), ("result", "ok")],
        );
        ensure!(
            b_handshakes <= 1.0,
            "sidecar B counted {b_handshakes} successful inbound handshakes for one pooled connection"
        );
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn outbound_errors_tell_the_app_why() -> anyhow::Result<()> {
    e2e(async {
        let dead = free_port();
        let mesh = Mesh::start(MeshOpts {
            a_args: vec!["--request-timeout".into(), "1s".into()],
            a_upstreams: vec![format!(
                "name=dead,hosts=dead,address=127.0.0.1:{dead},identity={B_ID}"
            )],
            ..Default::default()
        })
        .await?;
        let reply = get_once(mesh.a.outbound(), Proto::H1, "dead", "/", &[]).await?;
        ensure!(
            reply.status == StatusCode::SERVICE_UNAVAILABLE,
            "peer not listening: want 503, got {}",
            reply.summary()
        );
        let started = Instant::now();
        let reply = get_once(mesh.a.outbound(), Proto::H1, "b", "/slow/5000", &[]).await?;
        ensure!(
            reply.status == StatusCode::GATEWAY_TIMEOUT,
            "app B answers after 5s, request timeout 1s: want 504, got {} after {:?}",
            reply.summary(),
            started.elapsed()
        );
        ensure!(
            started.elapsed() < Duration::from_secs(4),
            "504 came after {:?}",
            started.elapsed()
        );
        // The mesh still works afterwards.
        let reply = get_once(mesh.a.outbound(), Proto::H2c, "b", "/after", &[]).await?;
        echo_json(&reply)?;
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_lets_the_in_flight_request_finish_then_exits_zero() -> anyhow::Result<()> {
    e2e(async {
        let mut mesh = Mesh::start(MeshOpts {
            a_args: vec!["--drain-timeout".into(), "10s".into()],
            ..Default::default()
        })
        .await?;
        let outbound = mesh.a.outbound();
        let in_flight =
            tokio::spawn(
                async move { get_once(outbound, Proto::H1, "b", "/slow/3000", &[]).await },
            );
        eventually(
            Duration::from_secs(10),
            "the slow request to reach app B",
            || async {
                ensure!(mesh.app_b.slow_started() == 1, "not yet");
                Ok(())
            },
        )
        .await?;
        let signalled = Instant::now();
        mesh.a.sigterm()?;

        // Draining stops accepting: while the slow request is still in flight, a new app
        // connection is refused (or closed, or left unanswered) instead of being served. The
        // slow request takes 3 s: the window is generous for 2 cores, and still inside it.
        let refusal = eventually(
            Duration::from_secs(2),
            "sidecar A to stop serving new connections after SIGTERM",
            || async {
                let attempt = tokio::time::timeout(
                    Duration::from_millis(500),
                    get_once(outbound, Proto::H1, "b", "/after-sigterm", &[]),
                )
                .await;
                match attempt {
                    Ok(Ok(reply)) if reply.status == StatusCode::OK => {
                        bail!("a new connection was still served after SIGTERM")
                    }
                    Ok(Ok(reply)) => Ok(format!("answered {}", reply.summary())),
                    Ok(Err(e)) => Ok(format!("failed: {e:#}")),
                    Err(_) => Ok("no answer within 500ms".to_string()),
                }
            },
        )
        .await?;
        eprintln!("a new app request during the drain: {refusal}");

        let reply = tokio::time::timeout(Duration::from_secs(15), in_flight)
            .await
            .context("in-flight request did not finish within 15s of SIGTERM")??
            .context("in-flight request during drain")?;
        ensure!(
            reply.status == StatusCode::OK && reply.body == Bytes::from_static(b"slow done\n"),
            "in-flight request during drain: {}",
            reply.summary()
        );
        mesh.a.exits_drained(signalled).await?;
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn not_ready_and_serves_no_mtls_without_a_valid_svid() -> anyhow::Result<()> {
    e2e(async {
        let cp = ControlPlane::start(ControlPlaneOpts::default())?;
        let app = EchoApp::start("app").await?;
        let mut opts = SidecarOpts::new("sidecar-unattested", A_ID, app.addr);
        opts.join_token = Some("trellis-join.not-a-token-the-control-plane-issued".into());
        // An inbound handshake waits up to the handshake timeout for a first SVID; keep that
        // wait short so the refusal below comes well within the test's deadline.
        opts.extra_args = vec!["--handshake-timeout".into(), "2s".into()];
        let s = Sidecar::start_unready(&cp, opts)?;

        // The control plane refuses the token; the sidecar keeps running, alive but not ready.
        eventually(
            Duration::from_secs(10),
            "the sidecar to log that the control plane refused it",
            || async {
                ensure!(
                    s.child.stderr().contains("Unauthenticated"),
                    "no refusal logged yet"
                );
                Ok(())
            },
        )
        .await?;
        let healthz = s.admin_get("/healthz").await?;
        ensure!(healthz.status == 200, "/healthz: {}", healthz.status);
        let ready = s.admin_get("/ready").await?;
        ensure!(
            ready.status == 503,
            "/ready without an SVID: {} {}",
            ready.status,
            ready.text()
        );
        let metrics = s.metrics().await?;
        ensure!(
            metrics.sum("trellis_sds_connected", &[]) == 0.0,
            "trellis_sds_connected is not 0 while refused"
        );

        // Its inbound listener has no certificate to present: a valid client gets no service.
        let token = cp.create_token("spiffe://example.org/test/client", "1h")?;
        let (svid, bundle) = fetch_svid(&cp, &token).await?;
        let config = tls_client_config(
            bundle,
            PeerMatch::Exact(SpiffeId::parse(A_ID)?),
            Some(&svid),
            &[b"http/1.1"],
        )?;
        let attempt = async {
            let tls = tls_connect(s.addrs.inbound, config).await?;
            trellis_tests::http_get(tls, "a", "/").await
        };
        match tokio::time::timeout(Duration::from_secs(10), attempt).await {
            Ok(Ok(resp)) => bail!(
                "inbound served {} without an SVID: {}",
                resp.status,
                resp.text()
            ),
            Ok(Err(e)) => eprintln!("inbound without an SVID: {e:#}"),
            Err(_) => bail!("inbound handshake without an SVID hung for 10s"),
        }
        ensure!(app.seen().is_empty(), "the app was reached");
        Ok(())
    })
    .await
}

/// Plain TCP mode: sidecar A's dedicated TCP port carries raw bytes over mTLS to sidecar B's
/// TCP port, which hands them to a TCP echo app. The identity check still applies: with the
/// wrong expected identity the bytes never reach the app.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tcp_mode_carries_raw_bytes_and_still_checks_identity() -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    e2e(async {
        let echo = TcpEcho::start().await?;
        // The listening line does not report TCP ports, so this one is picked in advance.
        let b_tcp = free_port();
        let dir = tempfile::tempdir()?;
        let b_file = dir.path().join("sidecar-b-tcp.yaml");
        std::fs::write(
            &b_file,
            format!(
                "inbound:\n  tcp:\n    - listen: 127.0.0.1:{b_tcp}\n      app: {}\n",
                echo.addr
            ),
        )?;
        let mesh = Mesh::start(MeshOpts {
            b_args: vec!["--config".into(), b_file.to_string_lossy().into_owned()],
            a_upstreams: vec![
                format!(
                    "name=db,listen=127.0.0.1:0,protocol=tcp,address=127.0.0.1:{b_tcp},identity={B_ID}"
                ),
                format!(
                    "name=db-wrong,listen=127.0.0.1:0,protocol=tcp,address=127.0.0.1:{b_tcp},identity=spiffe://example.org/wrong"
                ),
            ],
            ..Default::default()
        })
        .await?;
        let port = |name: &str| {
            mesh.a
                .addrs
                .outbound
                .get(name)
                .copied()
                .with_context(|| format!("sidecar A did not report its `{name}` listener"))
        };

        let payload: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
        let mut tcp = tokio::net::TcpStream::connect(port("db")?).await?;
        let (mut r, mut w) = tcp.split();
        let write = async {
            w.write_all(&payload).await?;
            anyhow::Ok(())
        };
        let read = async {
            let mut got = vec![0u8; payload.len()];
            r.read_exact(&mut got).await?;
            anyhow::Ok(got)
        };
        let (wrote, got) = tokio::time::timeout(Duration::from_secs(20), async {
            tokio::join!(write, read)
        })
        .await
        .context("200 kB did not come back through TCP mode within 20s")?;
        wrote?;
        ensure!(got? == payload, "TCP mode echoed different bytes");
        ensure!(echo.accepted() == 1, "echo app accepted {}", echo.accepted());

        // Wrong identity: sidecar A must close the app's connection without reaching B's app.
        let mut tcp = tokio::net::TcpStream::connect(port("db-wrong")?).await?;
        let _ = tcp.write_all(b"hello?").await;
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buf))
            .await
            .context("TCP connection with a failed identity check stayed open for 10s")?
            .unwrap_or(0);
        ensure!(n == 0, "got {n} bytes back over a connection whose identity check failed");
        ensure!(
            echo.accepted() == 1,
            "the echo app was reached over a connection whose identity check failed"
        );
        let wrong = mesh.a.metrics().await?.sum(
            "trellis_tls_handshakes_total",
            &[("direction", "outbound"), ("result", "error"), ("reason", "wrong_identity")],
        );
        ensure!(wrong >= 1.0, "sidecar A did not count the wrong_identity failure");
        Ok(())
    })
    .await
}
