#![allow(clippy::unwrap_used)]
//! The control plane's configurable limits (docs/security.md, "Hardening"), each set below its default on
//! a real `trellis control`: the offending client is refused (a gRPC status, a 4xx, or its
//! connection closed) while a well-behaved client of the same process is served. Each
//! offending input is within the default limit, so a refusal shows the configured value is the
//! one enforced.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tonic::Code;
use trellis_proto::{DiscoveryRequest, SECRET_TYPE_URL};
use trellis_tests::control_must_fail_to_start as start_must_fail;
use trellis_tests::k8s::K8sIssuer;
use trellis_tests::{
    e2e, fetch_svid, grpc_code, test_node, workspace_root, ControlPlane, ControlPlaneOpts,
    SdsStream,
};

fn opts(extra: &[&str]) -> ControlPlaneOpts {
    ControlPlaneOpts {
        extra_args: extra.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

/// Reads until the server closes `io` (EOF or reset) and returns what it sent; `None` if it
/// is still open after `within`.
async fn read_until_closed<S: AsyncRead + Unpin>(io: &mut S, within: Duration) -> Option<Vec<u8>> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let read_all = async {
        loop {
            match io.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(within, read_all).await.ok()?;
    Some(got)
}

/// The status code of the first HTTP/1.1 response in `raw`.
fn status_of(raw: &[u8]) -> Option<u16> {
    let text = String::from_utf8_lossy(raw);
    text.lines().next()?.split_whitespace().nth(1)?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sds_message_over_the_limit_fails_its_stream_while_others_are_served() -> anyhow::Result<()>
{
    e2e(async {
        let cp = ControlPlane::start(opts(&["--sds-max-message-bytes", "4096"]))?;
        let token = cp.create_token("spiffe://example.org/app/big", "1h")?;
        // 8 KiB of resource names: under the 256 KiB default, over the configured 4 KiB.
        let names: Vec<String> = (0..64).map(|i| format!("{i:0>128}")).collect();
        let first = DiscoveryRequest {
            node: Some(test_node()),
            resource_names: names,
            type_url: SECRET_TYPE_URL.into(),
            ..Default::default()
        };
        let mut client = cp.sds_client().await?;
        let outcome = match SdsStream::open_with(&mut client, Some(&token), first).await {
            Ok(mut s) => s.recv(Duration::from_secs(20)).await.map(|_| ()),
            Err(e) => Err(e),
        };
        let err = match outcome {
            Ok(()) => anyhow::bail!("an 8 KiB request was served with a 4 KiB limit"),
            Err(e) => e,
        };
        println!("8 KiB SDS request with sds_max_message_bytes 4096: {err:#}");
        ensure!(
            grpc_code(&err) == Some(Code::OutOfRange),
            "want OUT_OF_RANGE (message too large), got {err:#}"
        );
        // Another client (and another stream on the same connection) is served.
        let good = cp.create_token("spiffe://example.org/app/small", "1h")?;
        let (svid, _) = fetch_svid(&cp, &good).await?;
        ensure!(svid.spiffe_id().as_str() == "spiffe://example.org/app/small");
        let again = cp.create_token("spiffe://example.org/app/same-conn", "1h")?;
        let mut stream = SdsStream::open(&mut client, Some(&again), &["default"]).await?;
        stream.recv(Duration::from_secs(20)).await?;
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_head_over_the_limit_gets_431() -> anyhow::Result<()> {
    e2e(async {
        let cp = ControlPlane::start(opts(&["--admin-max-header-bytes", "8192"]))?;
        // 10 KiB of header: under the 16 KiB default, over the configured 8 KiB.
        let mut tcp = TcpStream::connect(cp.admin_addr).await?;
        let head = format!(
            "GET /healthz HTTP/1.1\r\nHost: admin\r\nX-Pad: {}\r\n\r\n",
            "p".repeat(10 * 1024)
        );
        tcp.write_all(head.as_bytes()).await?;
        let raw = read_until_closed(&mut tcp, Duration::from_secs(30))
            .await
            .context("the oversized head's connection was never closed")?;
        let status = status_of(&raw);
        println!("10 KiB admin head with admin_max_header_bytes 8192: {status:?}");
        ensure!(status == Some(431), "want 431, got {status:?}");
        // A head within the limit, and the probe, are served.
        let mut tcp = TcpStream::connect(cp.admin_addr).await?;
        let head = format!(
            "GET /healthz HTTP/1.1\r\nHost: admin\r\nX-Pad: {}\r\nConnection: close\r\n\r\n",
            "p".repeat(4 * 1024)
        );
        tcp.write_all(head.as_bytes()).await?;
        let raw = read_until_closed(&mut tcp, Duration::from_secs(30))
            .await
            .context("no answer to a 4 KiB head")?;
        ensure!(
            status_of(&raw) == Some(200),
            "4 KiB head: {:?}",
            status_of(&raw)
        );
        let r = cp.admin_get("/healthz").await?;
        ensure!(r.status == 200, "/healthz: {}", r.status);
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_admin_heads_are_closed_after_the_header_read_timeout() -> anyhow::Result<()> {
    e2e(async {
        // The idle timeout is far longer, so only the head timeout can close these.
        let cp = ControlPlane::start(opts(&[
            "--admin-header-read-timeout",
            "1s",
            "--admin-idle-timeout",
            "120s",
        ]))?;
        // One sends nothing at all (protocol detection), one half a head (slowloris).
        let started = Instant::now();
        let mut silent = TcpStream::connect(cp.admin_addr).await?;
        let mut slow = TcpStream::connect(cp.admin_addr).await?;
        slow.write_all(b"GET /metrics HTTP/1.1\r\nHost: adm")
            .await?;
        // Meanwhile a normal client is served.
        let r = cp.admin_get("/healthz").await?;
        ensure!(r.status == 200, "/healthz: {}", r.status);
        for (name, tcp) in [("silent", &mut silent), ("half a head", &mut slow)] {
            // Before the built-in 10 s head timeout (and the 120 s idle timeout) could fire:
            // only the 1 s flag explains the close.
            let left = Duration::from_secs(8).saturating_sub(started.elapsed());
            ensure!(
                read_until_closed(tcp, left).await.is_some(),
                "the {name} admin client was still connected 8s after connecting (flag 1s; the 10s default would come later)"
            );
            println!(
                "{name} admin client closed {:?} after connecting (admin_header_read_timeout 1s)",
                started.elapsed()
            );
        }
        let r = cp.admin_get("/healthz").await?;
        ensure!(r.status == 200, "/healthz after: {}", r.status);
        Ok(())
    })
    .await
}

type H2Sender = hyper::client::conn::http2::SendRequest<Empty<Bytes>>;

/// An HTTP/2 (prior knowledge) connection to the admin port; the handle ends when it closes.
async fn h2_admin(cp: &ControlPlane) -> anyhow::Result<(H2Sender, tokio::task::JoinHandle<()>)> {
    let tcp = TcpStream::connect(cp.admin_addr).await?;
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)).await?;
    let task = tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok((sender, task))
}

async fn h2_get(sender: &mut H2Sender, path: &str) -> anyhow::Result<u16> {
    let req = http::Request::get(format!("http://admin{path}")).body(Empty::new())?;
    let resp = tokio::time::timeout(Duration::from_secs(20), sender.send_request(req))
        .await
        .context("no HTTP/2 response within 20s")??;
    let status = resp.status().as_u16();
    resp.into_body().collect().await?;
    Ok(status)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_admin_connections_are_closed_while_busy_ones_live() -> anyhow::Result<()> {
    e2e(async {
        let idle_timeout = Duration::from_secs(2);
        let cp = ControlPlane::start(opts(&[
            "--admin-idle-timeout",
            "2s",
            "--admin-header-read-timeout",
            "120s",
        ]))?;
        let started = Instant::now();
        let (mut idle, idle_conn) = h2_admin(&cp).await?;
        let (mut busy, busy_conn) = h2_admin(&cp).await?;
        ensure!(h2_get(&mut idle, "/healthz").await? == 200);
        // An HTTP/1.1 keep-alive connection that goes quiet after one request.
        let mut h1 = TcpStream::connect(cp.admin_addr).await?;
        h1.write_all(b"GET /healthz HTTP/1.1\r\nHost: admin\r\n\r\n")
            .await?;
        let h1_closed = tokio::spawn(async move {
            let raw = read_until_closed(&mut h1, Duration::from_secs(60)).await;
            (raw, started.elapsed())
        });

        // The busy connection asks every 200 ms until the idle one is gone and it has itself
        // lived for three idle timeouts.
        let mut busy_requests = 0u32;
        let mut idle_closed_after = None;
        let deadline = Instant::now() + Duration::from_secs(90);
        while idle_closed_after.is_none() || started.elapsed() < 3 * idle_timeout {
            ensure!(
                Instant::now() < deadline,
                "the idle HTTP/2 connection was still open after 90s"
            );
            let status = h2_get(&mut busy, "/healthz")
                .await
                .with_context(|| format!("busy connection, request {busy_requests}"))?;
            ensure!(status == 200, "busy connection got {status}");
            busy_requests += 1;
            if idle_closed_after.is_none() && idle_conn.is_finished() {
                idle_closed_after = Some(started.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        ensure!(!busy_conn.is_finished(), "the busy connection was closed");
        ensure!(h2_get(&mut busy, "/ready").await.is_ok());
        println!(
            "idle HTTP/2 admin connection closed after {:?} (admin_idle_timeout 2s); busy one \
             served {busy_requests} requests over {:?} on one connection",
            idle_closed_after.unwrap_or_default(),
            started.elapsed()
        );
        // And the quiet HTTP/1.1 connection is closed, long before its 120 s head timeout.
        let (raw, after) = h1_closed.await?;
        let raw = raw.context("the idle HTTP/1.1 admin connection was still open after 60s")?;
        ensure!(
            status_of(&raw) == Some(200),
            "HTTP/1.1: {:?}",
            status_of(&raw)
        );
        println!("idle HTTP/1.1 admin connection closed {after:?} after it connected");
        Ok(())
    })
    .await
}

/// A TLS client trusting `bundle.pem`.
fn webhook_tls(cp: &ControlPlane) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    for root in cp.bundle()?.roots() {
        roots.add(root.clone())?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Sends `head` then `body` to the webhook and returns the status and body of the answer.
async fn webhook_exchange(
    cp: &ControlPlane,
    head: &str,
    body: &[u8],
) -> anyhow::Result<(u16, String)> {
    const NAME: &str = "trellis-control.trellis-system.svc";
    let addr = cp
        .webhook_addr
        .context("no webhook= on the listening line")?;
    let tcp = TcpStream::connect(addr).await?;
    let mut tls = tokio_rustls::TlsConnector::from(webhook_tls(cp)?)
        .connect(rustls::pki_types::ServerName::try_from(NAME)?, tcp)
        .await?;
    tls.write_all(head.as_bytes()).await?;
    // The server may answer (and close) before it has read everything.
    let _ = tls.write_all(body).await;
    let _ = tls.flush().await;
    let raw = read_until_closed(&mut tls, Duration::from_secs(30))
        .await
        .context("the webhook did not answer and close within 30s")?;
    let status = status_of(&raw).context("no HTTP status")?;
    let text = String::from_utf8_lossy(&raw);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .unwrap_or_default();
    Ok((status, body.to_owned()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_body_over_the_limit_gets_413_while_reviews_are_served() -> anyhow::Result<()> {
    e2e(async {
        let cp = ControlPlane::start(opts(&[
            "--webhook-listen",
            "127.0.0.1:0",
            "--webhook-max-body-bytes",
            "8192",
        ]))?;
        let review = std::fs::read(
            workspace_root().join("crates/trellis-control/tests/fixtures/admission/pod-opted-out.json"),
        )?;
        // 12 KiB: under the 2 MiB default, over the configured 8 KiB.
        let mut big = review.clone();
        big.resize(12 * 1024, b' ');
        let mut by_length: BTreeMap<&str, (u16, String)> = BTreeMap::new();
        by_length.insert(
            "declared",
            webhook_exchange(
                &cp,
                &format!(
                    "POST /inject HTTP/1.1\r\nHost: w\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                    big.len()
                ),
                &big,
            )
            .await?,
        );
        // Chunked, no length given: counted while reading.
        let mut chunked = format!("{:x}\r\n", big.len()).into_bytes();
        chunked.extend_from_slice(&big);
        chunked.extend_from_slice(b"\r\n0\r\n\r\n");
        by_length.insert(
            "chunked",
            webhook_exchange(
                &cp,
                "POST /inject HTTP/1.1\r\nHost: w\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n",
                &chunked,
            )
            .await?,
        );
        for (how, (status, body)) in &by_length {
            println!("12 KiB review ({how}) with webhook_max_body_bytes 8192: {status} {}", body.trim());
            ensure!(*status == 413, "{how}: want 413, got {status} {body}");
            ensure!(body.contains("webhook_max_body_bytes"), "{how}: {body}");
        }
        // A normal review is answered.
        let (status, body) = webhook_exchange(
            &cp,
            &format!(
                "POST /inject HTTP/1.1\r\nHost: w\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                review.len()
            ),
            &review,
        )
        .await?;
        ensure!(status == 200, "normal review: {status} {body}");
        ensure!(body.contains("\"allowed\":true"), "{body}");
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_over_max_jwt_bytes_is_refused_with_the_reason() -> anyhow::Result<()> {
    e2e(async {
        let dir = tempfile::tempdir()?;
        let issuer = K8sIssuer::new()?;
        let k8s = issuer.write_jwks(&dir.path().join("jwks.json"))?;
        let cp = ControlPlane::start(ControlPlaneOpts {
            k8s: Some(k8s),
            extra_args: [
                "--max-jwt-bytes",
                "1024",
                "--sds-max-header-list-bytes",
                "4096",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
            ..Default::default()
        })?;
        let good = issuer.token("prod", "web")?;
        println!("a real service-account token here: {} bytes", good.len());
        ensure!(good.len() <= 1024, "the test token is {} bytes", good.len());
        // 1.5 KiB: under the 8 KiB default, over the configured 1 KiB.
        let big = format!(
            "{}.{}.{}",
            "e".repeat(512),
            "p".repeat(512),
            "s".repeat(512)
        );
        let mut client = cp.sds_client().await?;
        let err = match SdsStream::open(&mut client, Some(&big), &["default"]).await {
            Ok(mut s) => s
                .recv(Duration::from_secs(20))
                .await
                .err()
                .context("a 1.5 KiB JWT was served")?,
            Err(e) => e,
        };
        println!("1.5 KiB JWT with max_jwt_bytes 1024: {err:#}");
        ensure!(grpc_code(&err) == Some(Code::InvalidArgument), "{err:#}");
        ensure!(
            format!("{err:#}").contains("max_jwt_bytes"),
            "the refusal does not name the limit: {err:#}"
        );
        let oversized = cp
            .metrics()
            .await?
            .series("trellis_attestation_failures_total{reason=\"oversized\"}");
        ensure!(oversized >= 1.0, "oversized refusal not counted");
        // 6 KiB: past the configured HTTP/2 header list, refused before any handler runs.
        let huge = "h".repeat(6 * 1024);
        let mut other = cp.sds_client().await?;
        let code = match SdsStream::open(&mut other, Some(&huge), &["default"]).await {
            Ok(mut s) => s
                .recv(Duration::from_secs(20))
                .await
                .err()
                .map(|e| grpc_code(&e)),
            Err(e) => Some(grpc_code(&e)),
        };
        println!("6 KiB authorization with sds_max_header_list_bytes 4096: {code:?}");
        ensure!(code.is_some(), "a 6 KiB header was served");
        // A real token is served on a fresh connection.
        let (svid, _) = fetch_svid(&cp, &good).await?;
        ensure!(
            svid.spiffe_id().as_str() == "spiffe://example.org/ns/prod/sa/web",
            "{}",
            svid.spiffe_id()
        );
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_over_max_jwks_bytes_stops_start() -> anyhow::Result<()> {
    e2e(async {
        let dir = tempfile::tempdir()?;
        let issuer = K8sIssuer::new()?;
        let path = dir.path().join("jwks.json");
        let k8s = issuer.write_jwks(&path)?;
        // 3 KiB of JSON (padded with whitespace): under the 1 MiB default, over 2 KiB.
        let mut jwks = std::fs::read(&path)?;
        jwks.resize(3 * 1024, b' ');
        std::fs::write(&path, &jwks)?;
        let args = |max: &str| -> Vec<String> {
            vec![
                "--k8s-jwks".into(),
                path.display().to_string(),
                "--k8s-issuer".into(),
                k8s.issuer.clone(),
                "--max-jwks-bytes".into(),
                max.into(),
            ]
        };
        let stderr = start_must_fail(dir.path(), &args("2048"))?;
        println!("3 KiB JWKS with max_jwks_bytes 2048: {}", stderr.trim());
        ensure!(
            stderr.contains("max_jwks_bytes") && stderr.contains("jwks.json"),
            "the error does not name the file and the limit: {stderr}"
        );
        // The same file within the limit: the control plane starts and attests its tokens.
        let cp = ControlPlane::start(ControlPlaneOpts {
            k8s: Some(k8s),
            extra_args: vec!["--max-jwks-bytes".into(), "4096".into()],
            ..Default::default()
        })?;
        let (svid, _) = fetch_svid(&cp, &issuer.token("prod", "api")?).await?;
        ensure!(svid.spiffe_id().as_str() == "spiffe://example.org/ns/prod/sa/api");
        Ok(())
    })
    .await
}

/// The server's `SETTINGS_MAX_CONCURRENT_STREAMS` (RFC 9113 6.5.2) on a fresh HTTP/2 admin
/// connection, read from its first SETTINGS frame.
async fn advertised_max_streams(cp: &ControlPlane) -> anyhow::Result<Option<u32>> {
    let mut tcp = TcpStream::connect(cp.admin_addr).await?;
    // Preface, then an empty SETTINGS frame.
    tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await?;
    let read = async {
        loop {
            let mut head = [0u8; 9];
            tcp.read_exact(&mut head).await?;
            let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
            let mut payload = vec![0u8; len];
            tcp.read_exact(&mut payload).await?;
            // SETTINGS (type 4) without ACK (flag 1).
            if head[3] == 4 && head[4] & 1 == 0 {
                let max = payload.chunks_exact(6).find_map(|e| {
                    (u16::from_be_bytes([e[0], e[1]]) == 3)
                        .then(|| u32::from_be_bytes([e[2], e[3], e[4], e[5]]))
                });
                return anyhow::Ok(max);
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(20), read)
        .await
        .context("no SETTINGS from the admin listener within 20s")?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_streams_and_webhook_head_limits_are_configurable() -> anyhow::Result<()> {
    e2e(async {
        let defaults = ControlPlane::start(opts(&[]))?;
        let default_max = advertised_max_streams(&defaults).await?;
        drop(defaults);
        let cp = ControlPlane::start(opts(&[
            "--admin-max-streams-per-connection",
            "2",
            "--admin-max-pending-resets",
            "5",
            "--webhook-listen",
            "127.0.0.1:0",
            "--webhook-max-header-bytes",
            "16384",
        ]))?;
        let configured = advertised_max_streams(&cp).await?;
        println!("admin SETTINGS_MAX_CONCURRENT_STREAMS: default {default_max:?}, configured {configured:?}");
        ensure!(default_max == Some(16), "default: {default_max:?}");
        ensure!(configured == Some(2), "configured: {configured:?}");
        // Once the client has the server's SETTINGS, streams past the limit wait for a free
        // slot rather than fail: four requests on one connection that allows two at a time
        // are all answered. (Before the SETTINGS arrive a client may open more, which the
        // server refuses with REFUSED_STREAM, so one request goes first.)
        let (mut sender, _conn) = h2_admin(&cp).await?;
        ensure!(h2_get(&mut sender, "/healthz").await? == 200, "first admin request");
        let gets: Vec<_> = (0..4)
            .map(|_| {
                let mut s = sender.clone();
                tokio::spawn(async move { h2_get(&mut s, "/healthz").await })
            })
            .collect();
        for get in gets {
            let status = get.await??;
            ensure!(status == 200, "admin over HTTP/2: {status}");
        }
        // A 20 KiB webhook head: under the 64 KiB default, over the configured 16 KiB.
        let (status, body) = webhook_exchange(
            &cp,
            &format!(
                "POST /inject HTTP/1.1\r\nHost: w\r\nX-Pad: {}\r\nContent-Length: 0\r\n\r\n",
                "p".repeat(20 * 1024)
            ),
            b"",
        )
        .await?;
        println!("20 KiB webhook head with webhook_max_header_bytes 16384: {status}");
        ensure!(status == 431, "want 431, got {status} {body}");
        let review = std::fs::read(
            workspace_root().join("crates/trellis-control/tests/fixtures/admission/pod-opted-out.json"),
        )?;
        let (status, body) = webhook_exchange(
            &cp,
            &format!(
                "POST /inject HTTP/1.1\r\nHost: w\r\nContent-Type: application/json\r\nX-Pad: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                "p".repeat(8 * 1024),
                review.len()
            ),
            &review,
        )
        .await?;
        ensure!(status == 200, "review with an 8 KiB head: {status} {body}");
        Ok(())
    })
    .await
}
