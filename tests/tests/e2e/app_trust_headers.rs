//! What the app sees must be what sidecar B vouched for (issue #13, items 1 and 2): forged
//! caller identities in header spellings an app stack folds into `x-forwarded-client-cert`,
//! underscore header names, and more than one `Host` — each over HTTP/1.1 and h2c from the
//! calling app (through sidecar A) and straight to sidecar B's inbound listener with a valid
//! client certificate. Every refusal is checked by what app B received, not only the status.
//!
//! The last test puts a Python stdlib `wsgiref` app behind sidecar B: WSGI folds `-` and `_`
//! into `HTTP_X_FORWARDED_CLIENT_CERT` and joins repeated fields with `,`, so the app reads a
//! forged value next to the real one unless the sidecar removed it.

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context as _};
use bytes::Bytes;
use http::{Request, StatusCode, Version};
use http_body_util::BodyExt as _;
use hyper_util::rt::{TokioExecutor, TokioIo};
use sha2::{Digest as _, Sha256};
use trellis_identity::tls::PeerMatch;
use trellis_identity::{SpiffeId, Svid};
use trellis_tests::app_client::{empty, AppConn, Proto, Reply};
use trellis_tests::mesh::{Mesh, MeshOpts, A_ID, B_ID};
use trellis_tests::sidecar::{Sidecar, SidecarOpts};
use trellis_tests::{
    e2e, fetch_svid, tls_client_config, tls_connect, tool_or_skip, Child, ControlPlane,
    ControlPlaneOpts, STARTUP_TIMEOUT,
};

const XFCC: &str = "x-forwarded-client-cert";
const FORGED: &str = "By=spiffe://example.org/x;URI=spiffe://example.org/ns/prod/sa/admin";
const CLIENT_ID: &str = "spiffe://example.org/test/direct-client";

/// Spellings of XFCC that CGI/WSGI/PHP-FPM fold into the real one (HTTP/2 forbids uppercase
/// names, so mixed case is only sent over HTTP/1.1, where `http` lowercases it).
const SPOOFS: [&str; 3] = [
    "x_forwarded_client_cert",
    "x-forwarded_client-cert",
    "x.forwarded.client.cert",
];

/// The XFCC sidecar B writes for a caller with `leaf`.
fn real_xfcc(caller: &str, leaf: &[u8]) -> String {
    format!(
        "By={B_ID};Hash={};URI={caller}",
        hex::encode(Sha256::digest(leaf))
    )
}

/// Checks that app B saw `path` once, with exactly `want` as its only XFCC-like field.
fn assert_app_saw_only(mesh: &Mesh, path: &str, want: &str) -> anyhow::Result<()> {
    let seen = mesh
        .app_b
        .last_seen(path)
        .with_context(|| format!("app B never saw {path}"))?;
    let folded: Vec<&(String, String)> = seen
        .headers
        .iter()
        .filter(|(k, _)| {
            k.len() == XFCC.len()
                && k.bytes()
                    .zip(XFCC.bytes())
                    .all(|(a, b)| a == b || (b == b'-' && !a.is_ascii_alphanumeric()))
        })
        .collect();
    ensure!(
        folded.len() == 1 && folded[0].0 == XFCC && folded[0].1 == want,
        "{path}: app B saw {folded:?}, want only {XFCC}: {want}"
    );
    Ok(())
}

/// Checks that app B never saw `path`.
fn assert_app_never_saw(mesh: &Mesh, path: &str) -> anyhow::Result<()> {
    ensure!(
        mesh.app_b.last_seen(path).is_none(),
        "{path} reached app B: {:?}",
        mesh.app_b.last_seen(path)
    );
    Ok(())
}

/// Sidecar `side`'s `trellis_requests_refused_total{reason}`.
async fn refused(side: &Sidecar, reason: &str) -> anyhow::Result<f64> {
    Ok(side
        .metrics()
        .await?
        .sum_or_zero("trellis_requests_refused_total", &[("reason", reason)]))
}

/// A client SVID for [`CLIENT_ID`] from the mesh's control plane.
async fn client_svid(mesh: &Mesh) -> anyhow::Result<Svid> {
    let token = mesh.cp.create_token(CLIENT_ID, "1h")?;
    Ok(fetch_svid(&mesh.cp, &token).await?.0)
}

/// Sends one request straight to sidecar B's inbound listener as a mesh peer holding `svid`,
/// over HTTP/2 (`h2`) or HTTP/1.1; `headers` are added in order (repeats kept).
async fn direct(
    mesh: &Mesh,
    svid: &Svid,
    h2: bool,
    uri: &str,
    headers: &[(&str, &str)],
) -> anyhow::Result<Reply> {
    let alpn: &[u8] = if h2 { b"h2" } else { b"http/1.1" };
    let config = tls_client_config(
        mesh.cp.bundle()?,
        PeerMatch::Exact(SpiffeId::parse(B_ID)?),
        Some(svid),
        &[alpn],
    )?;
    let io = TokioIo::new(tls_connect(mesh.b.addrs.inbound, config).await?);
    let mut req = Request::builder().uri(uri).version(if h2 {
        Version::HTTP_2
    } else {
        Version::HTTP_11
    });
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(http_body_util::Empty::<Bytes>::new())?;
    let resp = if h2 {
        let (mut tx, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await?;
        tokio::spawn(conn);
        tx.send_request(req).await?
    } else {
        let (mut tx, conn) = hyper::client::conn::http1::handshake(io).await?;
        tokio::spawn(conn);
        tx.send_request(req).await?
    };
    let (parts, body) = resp.into_parts();
    let body = tokio::time::timeout(Duration::from_secs(10), body.collect())
        .await
        .context("response body")??
        .to_bytes();
    Ok(Reply {
        status: parts.status,
        version: parts.version,
        headers: parts.headers,
        body,
    })
}

/// App A sends every XFCC spoof through sidecar A; app B sees only sidecar B's XFCC naming A,
/// and sidecar B counts what it removed.
async fn spoofed_xfcc_through_the_mesh(proto: Proto, tag: &str) -> anyhow::Result<()> {
    let mesh = Mesh::start(MeshOpts::default()).await?;
    let mut conn = AppConn::connect(mesh.a.outbound(), proto).await?;
    let path = format!("/spoof/{tag}");
    let mut spoofs: Vec<(&str, &str)> = SPOOFS.iter().map(|s| (*s, FORGED)).collect();
    spoofs.push((XFCC, FORGED));
    if proto == Proto::H1 {
        spoofs.push(("X_Forwarded_Client_CERT", FORGED));
    }
    // Labelled: no line until the first removal.
    let before = mesh.b.metrics().await?.sum_or_zero(
        "trellis_request_headers_removed_total",
        &[("reason", "owned")],
    );
    let reply = conn.get("b", &path, &spoofs).await?;
    ensure!(
        reply.status == StatusCode::OK,
        "{path}: {}",
        reply.summary()
    );
    // Sidecar A's client certificate is A's SVID: read its hash from what B wrote.
    let seen = mesh.app_b.last_seen(&path).context("app B never saw it")?;
    let want_prefix = format!("By={B_ID};Hash=");
    let real = seen
        .header_all(XFCC)
        .first()
        .map(|v| v.to_string())
        .unwrap_or_default();
    ensure!(
        real.starts_with(&want_prefix) && real.ends_with(&format!(";URI={A_ID}")),
        "{path}: app B's XFCC {real:?} is not sidecar B's for caller A"
    );
    assert_app_saw_only(&mesh, &path, &real)?;
    let removed = mesh.b.metrics().await?.sum(
        "trellis_request_headers_removed_total",
        &[("reason", "owned")],
    );
    ensure!(
        removed >= before + spoofs.len() as f64 - 1.0,
        "sidecar B counted {removed} owned headers removed (before {before}), sent {}",
        spoofs.len()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn underscore_xfcc_from_app_never_reaches_peer_app_h1() -> anyhow::Result<()> {
    e2e(spoofed_xfcc_through_the_mesh(Proto::H1, "h1")).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn underscore_xfcc_from_app_never_reaches_peer_app_h2c() -> anyhow::Result<()> {
    e2e(spoofed_xfcc_through_the_mesh(Proto::H2c, "h2c")).await
}

/// A mesh peer with a valid SVID speaks straight to sidecar B, HTTP/1.1 and HTTP/2, with
/// every spoof: app B sees only the XFCC naming that peer.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn underscore_xfcc_from_direct_peer_never_reaches_app() -> anyhow::Result<()> {
    e2e(async {
        let mesh = Mesh::start(MeshOpts::default()).await?;
        let svid = client_svid(&mesh).await?;
        let want = real_xfcc(CLIENT_ID, svid.chain()[0].as_ref());
        for (h2, path) in [(false, "/direct/h1"), (true, "/direct/h2")] {
            let mut headers: Vec<(&str, &str)> = SPOOFS.iter().map(|s| (*s, FORGED)).collect();
            headers.push((XFCC, FORGED));
            let uri = if h2 {
                format!("https://b{path}")
            } else {
                headers.push(("host", "b"));
                headers.push(("X_FORWARDED_CLIENT_CERT", FORGED));
                path.to_string()
            };
            let reply = direct(&mesh, &svid, h2, &uri, &headers).await?;
            ensure!(
                reply.status == StatusCode::OK,
                "{path}: {}",
                reply.summary()
            );
            assert_app_saw_only(&mesh, path, &want)?;
        }
        Ok(())
    })
    .await
}

/// Other underscore names: dropped by default (and counted), passed with `allow` (the XFCC
/// spelling still removed), and the request refused with `reject`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn underscore_headers_follow_the_setting() -> anyhow::Result<()> {
    e2e(async {
        for (mode, path) in [
            ("drop", "/underscore/drop"),
            ("allow", "/underscore/allow"),
            ("reject", "/underscore/reject"),
        ] {
            let mesh = Mesh::start(MeshOpts {
                b_args: vec!["--headers-with-underscores".into(), mode.into()],
                ..Default::default()
            })
            .await?;
            let mut conn = AppConn::connect(mesh.a.outbound(), Proto::H1).await?;
            let reply = conn
                .get(
                    "b",
                    path,
                    &[
                        ("x_user", "admin"),
                        ("x-user", "alice"),
                        ("x_forwarded_client_cert", FORGED),
                    ],
                )
                .await?;
            match mode {
                "reject" => {
                    ensure!(
                        reply.status == StatusCode::BAD_REQUEST
                            && reply.text().contains("x_")
                            && reply.text().contains("headers_with_underscores"),
                        "{mode}: want 400 naming the header and the setting, got {}",
                        reply.summary()
                    );
                    assert_app_never_saw(&mesh, path)?;
                    let n = refused(&mesh.b, "underscore_header").await?;
                    ensure!(n >= 1.0, "{mode}: sidecar B counted {n} refusals");
                }
                _ => {
                    ensure!(
                        reply.status == StatusCode::OK,
                        "{mode}: {}",
                        reply.summary()
                    );
                    let seen = mesh.app_b.last_seen(path).context("app B never saw it")?;
                    let want_underscore: &[&str] = if mode == "allow" { &["admin"] } else { &[] };
                    ensure!(
                        seen.header_all("x_user") == want_underscore,
                        "{mode}: app B saw x_user {:?}, want {want_underscore:?}",
                        seen.header_all("x_user")
                    );
                    ensure!(
                        seen.header_all("x-user") == ["alice"],
                        "{mode}: app B saw x-user {:?}",
                        seen.header_all("x-user")
                    );
                    ensure!(
                        seen.header_all("x_forwarded_client_cert").is_empty(),
                        "{mode}: the XFCC spelling reached app B"
                    );
                    if mode == "drop" {
                        let n = mesh.b.metrics().await?.sum(
                            "trellis_request_headers_removed_total",
                            &[("reason", "underscore")],
                        );
                        ensure!(n >= 1.0, "drop: sidecar B counted {n} underscore removals");
                    }
                }
            }
        }
        Ok(())
    })
    .await
}

/// Two `Host` fields over HTTP/1.1: refused `400` by sidecar A (from the app) and by sidecar B
/// (from a direct peer); app B sees neither.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn duplicate_host_is_refused_h1() -> anyhow::Result<()> {
    e2e(async {
        let mesh = Mesh::start(MeshOpts::default()).await?;
        let mut conn = AppConn::connect(mesh.a.outbound(), Proto::H1).await?;
        let req = conn
            .request(http::Method::POST, "service-n", "/two-hosts/app")
            .header("host", "b")
            .body(empty())?;
        let reply = conn.send_read(req).await?;
        ensure!(
            reply.status == StatusCode::BAD_REQUEST && reply.text().contains("more than one Host"),
            "app → sidecar A with two Hosts: {}",
            reply.summary()
        );
        ensure!(refused(&mesh.a, "duplicate_host").await? >= 1.0);
        assert_app_never_saw(&mesh, "/two-hosts/app")?;

        let svid = client_svid(&mesh).await?;
        let reply = direct(
            &mesh,
            &svid,
            false,
            "/two-hosts/direct",
            &[("host", "service-n"), ("host", "b")],
        )
        .await?;
        ensure!(
            reply.status == StatusCode::BAD_REQUEST,
            "direct peer with two Hosts: {}",
            reply.summary()
        );
        ensure!(refused(&mesh.b, "duplicate_host").await? >= 1.0);
        assert_app_never_saw(&mesh, "/two-hosts/direct")?;

        // The refusal closed that connection (`Connection: close`). One Host is fine, and the
        // app sees exactly that one.
        let mut conn = AppConn::connect(mesh.a.outbound(), Proto::H1).await?;
        let reply = conn.get("b", "/one-host", &[]).await?;
        ensure!(reply.status == StatusCode::OK, "{}", reply.summary());
        let seen = mesh
            .app_b
            .last_seen("/one-host")
            .context("app B never saw it")?;
        ensure!(
            seen.header_all("host") == ["b"],
            "host: {:?}",
            seen.header_all("host")
        );
        Ok(())
    })
    .await
}

/// HTTP/2 with a `host` that disagrees with `:authority`, or two `host` fields: refused by
/// sidecar A (h2c from the app) and by sidecar B (direct HTTP/2 peer), each counted under its
/// reason on the sidecar that refused it. An agreeing `host` passes, and the app sees exactly
/// one Host, from `:authority`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn host_disagreeing_with_authority_is_refused_h2() -> anyhow::Result<()> {
    e2e(async {
        let mesh = Mesh::start(MeshOpts::default()).await?;
        let mut conn = AppConn::connect(mesh.a.outbound(), Proto::H2c).await?;
        for (headers, path, reason) in [
            (
                vec![("host", "service-n")],
                "/authority/app-mismatch",
                "host_authority_mismatch",
            ),
            (
                vec![("host", "b"), ("host", "service-n")],
                "/authority/app-two",
                "duplicate_host",
            ),
        ] {
            let reply = conn.get("b", path, &headers).await?;
            ensure!(
                reply.status == StatusCode::BAD_REQUEST,
                "h2c {path}: {}",
                reply.summary()
            );
            ensure!(
                refused(&mesh.a, reason).await? >= 1.0,
                "{path}: not counted"
            );
            assert_app_never_saw(&mesh, path)?;
        }

        let svid = client_svid(&mesh).await?;
        for (headers, path, reason) in [
            (
                vec![("host", "service-n")],
                "/authority/direct-mismatch",
                "host_authority_mismatch",
            ),
            (
                vec![("host", "b"), ("host", "b")],
                "/authority/direct-two",
                "duplicate_host",
            ),
        ] {
            let reply = direct(&mesh, &svid, true, &format!("https://b{path}"), &headers).await?;
            ensure!(
                reply.status == StatusCode::BAD_REQUEST,
                "direct h2 {path}: {}",
                reply.summary()
            );
            ensure!(
                refused(&mesh.b, reason).await? >= 1.0,
                "direct h2 {path}: sidecar B did not count {reason}"
            );
            assert_app_never_saw(&mesh, path)?;
        }

        let reply = direct(
            &mesh,
            &svid,
            true,
            "https://b/authority/agree",
            &[("host", "B")],
        )
        .await?;
        ensure!(reply.status == StatusCode::OK, "{}", reply.summary());
        let seen = mesh
            .app_b
            .last_seen("/authority/agree")
            .context("app B never saw it")?;
        ensure!(
            seen.header_all("host") == ["b"],
            "app B saw host {:?}, want exactly [\"b\"] from :authority",
            seen.header_all("host")
        );
        Ok(())
    })
    .await
}

/// A WSGI app (Python's stdlib `wsgiref`) that answers `HTTP_X_FORWARDED_CLIENT_CERT` as its
/// body.
const WSGI_APP: &str = r#"
import sys
from wsgiref.simple_server import make_server, WSGIRequestHandler

class Quiet(WSGIRequestHandler):
    def log_message(self, *args):
        pass

def app(environ, start_response):
    body = environ.get("HTTP_X_FORWARDED_CLIENT_CERT", "<none>").encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]

server = make_server("127.0.0.1", 0, app, handler_class=Quiet)
print("listening 127.0.0.1:%d" % server.server_port, flush=True)
server.serve_forever()
"#;

/// The issue's end-to-end proof: app A forges `x_forwarded_client_cert` naming an admin; a
/// WSGI app behind sidecar B reads only the real caller in `HTTP_X_FORWARDED_CLIENT_CERT`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn wsgi_app_sees_only_the_real_caller() -> anyhow::Result<()> {
    e2e(async {
        let Some(python) = tool_or_skip("wsgi_app_sees_only_the_real_caller", "python3") else {
            return Ok(());
        };
        let cp = ControlPlane::start(ControlPlaneOpts::default())?;
        let script = cp.dir.path().join("wsgi_app.py");
        std::fs::write(&script, WSGI_APP)?;
        let mut cmd = Command::new(python);
        cmd.arg(&script);
        let mut wsgi = Child::spawn("wsgi-app", cmd, cp.dir.path())?;
        let line = wsgi.stdout_line(STARTUP_TIMEOUT)?;
        let wsgi_addr: SocketAddr = line
            .strip_prefix("listening ")
            .with_context(|| format!("wsgi app said {line:?}"))?
            .parse()?;
        let b = Sidecar::start(&cp, SidecarOpts::new("sidecar-b", B_ID, wsgi_addr)).await?;
        let app_a = trellis_tests::echo::EchoApp::start("app-a").await?;
        let a = Sidecar::start(
            &cp,
            SidecarOpts::new("sidecar-a", A_ID, app_a.addr).upstream("b", b.addrs.inbound, B_ID),
        )
        .await?;
        let forged_headers = [
            ("x_forwarded_client_cert", FORGED),
            ("X-Forwarded-Client-Cert", FORGED),
        ];
        let mut conn = AppConn::connect(a.outbound(), Proto::H1).await?;
        let reply = conn.get("b", "/whoami", &forged_headers).await?;
        ensure!(reply.status == StatusCode::OK, "{}", reply.summary());
        let answer = reply.text();
        ensure!(
            answer.starts_with(&format!("By={B_ID};Hash="))
                && answer.ends_with(&format!(";URI={A_ID}"))
                && !answer.contains(','),
            "WSGI app read HTTP_X_FORWARDED_CLIENT_CERT = {answer:?}; want only sidecar B's \
             value naming {A_ID}"
        );
        Ok(())
    })
    .await
}
