//! app → outbound sidecar → HTTP/2 over mTLS → inbound sidecar → app, on real loopback sockets.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use crate::datapath_support;

use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use trellis_identity::leaf_sha256_hex;

use datapath_support::*;

fn expected_xfcc(mesh: &Mesh) -> String {
    format!(
        "By={SERVER_ID};Hash={};URI={CLIENT_ID}",
        leaf_sha256_hex(&mesh.client_svid.chain()[0])
    )
}

#[tokio::test]
async fn http1_request_reaches_the_app_with_the_callers_identity() {
    let p = pair(PairOptions::default()).await;
    let mut app = Client::http1(p.outbound_addr()).await;
    let echo = app
        .send(
            "POST",
            "Service-B:15001",
            "/orders?id=7",
            &[],
            Bytes::from_static(b"hello"),
        )
        .await
        .echo();
    assert_eq!(echo.method, "POST");
    assert_eq!(echo.path, "/orders");
    assert_eq!(echo.version, "HTTP/1.1");
    assert_eq!(echo.host.as_deref(), Some("Service-B:15001"));
    assert_eq!(echo.bytes, 5);
    assert_eq!(echo.xfcc, [expected_xfcc(&p.mesh)]);
}

/// A caller's connection to the inbound is watched by the kernel (`limits.h2.keepalive_*`, set
/// once on the listening socket): idle, it has its keepalive timer armed, which
/// `/proc/net/tcp` shows as timer 2, so a caller that vanishes without a FIN is closed.
#[cfg(target_os = "linux")]
#[tokio::test]
async fn inbound_connections_are_watched_by_the_kernel() {
    let p = pair(PairOptions::default()).await;
    let mut app = Client::http1(p.outbound_addr()).await;
    app.get("service-b.ns-b", "/watched").await.echo();
    let port = p.inbound.addrs.http.port();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let timers = accepted_timers(port);
        if !timers.is_empty() && timers.iter().all(|&t| t == 2) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timers of the inbound's connections: {timers:?}, want 2 (keepalive)"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The `tr` (pending timer) field of every established IPv4 socket whose local port is `port`.
#[cfg(target_os = "linux")]
fn accepted_timers(port: u16) -> Vec<u8> {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let local = format!(":{port:04X}");
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (timer, _) = f.get(5)?.split_once(':')?;
            (f.get(1)?.ends_with(&local) && *f.get(3)? == "01").then(|| timer.parse().ok())?
        })
        .collect()
}

#[tokio::test]
async fn h2c_request_from_the_app_works() {
    let p = pair(PairOptions::default()).await;
    let mut app = Client::h2c(p.outbound_addr()).await;
    let echo = app.get("service-b.ns-b", "/h2c").await.echo();
    assert_eq!(echo.path, "/h2c");
    // The app behind the inbound always gets HTTP/1.1 with a Host header.
    assert_eq!(echo.version, "HTTP/1.1");
    assert_eq!(echo.host.as_deref(), Some("service-b.ns-b"));
    assert_eq!(echo.xfcc, [expected_xfcc(&p.mesh)]);
}

#[tokio::test]
async fn caller_supplied_xfcc_never_reaches_the_app() {
    let p = pair(PairOptions::default()).await;
    let mut app = Client::http1(p.outbound_addr()).await;
    let forged = [
        (
            "x-forwarded-client-cert",
            "By=spiffe://example.org/admin;URI=spiffe://example.org/admin",
        ),
        ("X-Forwarded-Client-Cert", "URI=spiffe://example.org/root"),
    ];
    let echo = app
        .send("GET", "service-b", "/", &forged, Bytes::new())
        .await
        .echo();
    assert_eq!(echo.xfcc, [expected_xfcc(&p.mesh)]);

    // Also when a header nominated in Connection tries to smuggle it past as hop-by-hop.
    let smuggle = [
        ("connection", "x-forwarded-client-cert"),
        ("x-forwarded-client-cert", "URI=spiffe://example.org/root"),
    ];
    let echo = app
        .send("GET", "service-b", "/", &smuggle, Bytes::new())
        .await
        .echo();
    assert_eq!(echo.xfcc, [expected_xfcc(&p.mesh)]);
}

#[tokio::test]
async fn ten_megabyte_body_streams_through() {
    const TEN_MB: usize = 10 * 1024 * 1024;
    let p = pair(PairOptions::default()).await;
    let mut app = Client::http1(p.outbound_addr()).await;
    let echo = app
        .send(
            "PUT",
            "service-b",
            "/upload",
            &[],
            Bytes::from(vec![7u8; TEN_MB]),
        )
        .await
        .echo();
    assert_eq!(echo.bytes, TEN_MB as u64);

    let reply = app.get("service-b", &format!("/download?{TEN_MB}")).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.body.len(), TEN_MB);
}

#[tokio::test]
async fn ten_megabyte_body_streams_through_from_an_h2c_app() {
    const TEN_MB: usize = 10 * 1024 * 1024;
    let p = pair(PairOptions::default()).await;
    let mut app = Client::h2c(p.outbound_addr()).await;
    let echo = app
        .send(
            "POST",
            "service-b",
            "/upload",
            &[],
            Bytes::from(vec![9u8; TEN_MB]),
        )
        .await
        .echo();
    assert_eq!(echo.bytes, TEN_MB as u64);
    let reply = app.get("service-b", &format!("/download?{TEN_MB}")).await;
    assert_eq!(reply.body.len(), TEN_MB);
}

#[tokio::test]
async fn thousand_sequential_requests_ride_one_upstream_connection() {
    let p = pair(PairOptions::default()).await;
    let mut app = Client::http1(p.outbound_addr()).await;
    for i in 0..1000 {
        let reply = app.get("service-b", &format!("/r{i}")).await;
        assert_eq!(
            reply.status,
            StatusCode::OK,
            "request {i}: {}",
            reply.text()
        );
    }
    assert_eq!(
        metric(&p.mesh.client_metrics, "trellis_upstream_connections_total"),
        1
    );
    assert_eq!(
        handshakes(&p.mesh.server_metrics, "inbound", "ok", "none"),
        1
    );
    assert_eq!(
        metric(
            &p.mesh.client_metrics,
            "trellis_requests_total{direction=\"outbound\",code=\"200\"}"
        ),
        1000
    );
    assert_eq!(
        metric(
            &p.mesh.server_metrics,
            "trellis_requests_total{direction=\"inbound\",code=\"200\"}"
        ),
        1000
    );
    // Sequential requests also reuse one keep-alive connection to the app.
    assert_eq!(app_connections(&p.app), 1);
}

#[tokio::test]
async fn concurrent_requests_share_one_upstream_connection() {
    let p = pair(PairOptions::default()).await;
    let addr = p.outbound_addr();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..32 {
        tasks.spawn(async move {
            let mut app = Client::http1(addr).await;
            for j in 0..10 {
                let reply = app.get("service-b", &format!("/c{i}/{j}")).await;
                assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    assert_eq!(
        metric(&p.mesh.client_metrics, "trellis_upstream_connections_total"),
        1
    );
}

#[tokio::test]
async fn wrong_peer_identity_is_502_naming_both_identities() {
    let expected = "spiffe://example.org/ns/b/sa/somebody-else";
    let p = pair(PairOptions {
        expected_identity: expected.into(),
        ..Default::default()
    })
    .await;
    let mut app = Client::http1(p.outbound_addr()).await;
    let reply = app.get("service-b", "/").await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
    reply.assert_one_line();
    assert!(
        reply
            .text()
            .contains(&format!("peer presented {SERVER_ID}, expected {expected}")),
        "{}",
        reply.text()
    );
    assert_eq!(
        handshakes(
            &p.mesh.client_metrics,
            "outbound",
            "error",
            "wrong_identity"
        ),
        1
    );
    assert_eq!(
        p.app
            .state
            .requests
            .load(std::sync::atomic::Ordering::SeqCst),
        0
    );
}

#[tokio::test]
async fn peer_down_is_503() {
    let down = closed_port().await;
    let p = pair(PairOptions {
        upstream_address: Some(down),
        ..Default::default()
    })
    .await;
    let mut app = Client::http1(p.outbound_addr()).await;
    let reply = app.get("service-b", "/").await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    reply.assert_one_line();
    assert!(
        reply.text().contains("upstream `b`") && reply.text().contains("unreachable"),
        "{}",
        reply.text()
    );
    assert_eq!(
        metric(
            &p.mesh.client_metrics,
            "trellis_requests_total{direction=\"outbound\",code=\"503\"}"
        ),
        1
    );
}

#[tokio::test]
async fn slow_app_is_504_from_the_outbound() {
    let p = pair(PairOptions {
        outbound_request_timeout: Duration::from_millis(300),
        ..Default::default()
    })
    .await;
    let mut app = Client::http1(p.outbound_addr()).await;
    let reply = app.get("service-b", "/slow").await;
    assert_eq!(reply.status, StatusCode::GATEWAY_TIMEOUT);
    reply.assert_one_line();
    assert!(
        reply
            .text()
            .contains("sent no response headers within 300ms"),
        "{}",
        reply.text()
    );
    // The connection stays usable.
    assert_eq!(app.get("service-b", "/after").await.status, StatusCode::OK);
}

#[tokio::test]
async fn slow_app_is_504_from_the_inbound() {
    let p = pair(PairOptions {
        inbound_request_timeout: Duration::from_millis(300),
        ..Default::default()
    })
    .await;
    let mut app = Client::http1(p.outbound_addr()).await;
    let reply = app.get("service-b", "/slow").await;
    assert_eq!(reply.status, StatusCode::GATEWAY_TIMEOUT);
    reply.assert_one_line();
    assert!(
        reply.text().starts_with("app 127.0.0.1:"),
        "{}",
        reply.text()
    );
}

#[tokio::test]
async fn app_down_is_503_from_the_inbound() {
    let down = closed_port().await;
    let p = pair(PairOptions {
        inbound_app: Some(down),
        ..Default::default()
    })
    .await;
    let mut app = Client::http1(p.outbound_addr()).await;
    let reply = app.get("service-b", "/").await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    reply.assert_one_line();
    assert!(
        reply
            .text()
            .starts_with(&format!("app {down} is unreachable")),
        "{}",
        reply.text()
    );
    assert_eq!(
        metric(
            &p.mesh.server_metrics,
            "trellis_requests_total{direction=\"inbound\",code=\"503\"}"
        ),
        1
    );
}

#[tokio::test]
async fn unknown_host_is_404_naming_the_known_hosts() {
    let p = pair(PairOptions::default()).await;
    let mut app = Client::http1(p.outbound_addr()).await;
    let reply = app.get("billing:8080", "/").await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    reply.assert_one_line();
    assert_eq!(
        reply.text(),
        "no upstream for host `billing`; known hosts: service-b, service-b.ns-b\n"
    );
}

#[tokio::test]
async fn dedicated_listener_needs_no_host_routing() {
    let mesh = Mesh::new();
    let app = spawn_app().await;
    let inbound = spawn_inbound(
        &settings(app.addr, vec![]),
        mesh.server_store.clone(),
        mesh.server_metrics.clone(),
    )
    .await;
    let mut upstream = http_upstream("b", &[], inbound.addrs.http, SERVER_ID);
    upstream.listen = Some("127.0.0.1:0".parse().unwrap());
    let outbound = spawn_outbound(
        &settings(closed_port().await, vec![upstream]),
        mesh.client_store.clone(),
        mesh.client_metrics.clone(),
    )
    .await;
    let mut client = Client::http1(addr_of(&outbound.addrs, "b")).await;
    let echo = client.get("whatever.local", "/dedicated").await.echo();
    assert_eq!(echo.path, "/dedicated");
    assert_eq!(echo.host.as_deref(), Some("whatever.local"));
}

#[tokio::test]
async fn drain_finishes_the_request_in_flight_and_refuses_new_connections() {
    let mut p = pair(PairOptions::default()).await;
    let outbound_addr = p.outbound_addr();
    let inbound_addr = p.inbound.addrs.http;
    let in_flight = tokio::spawn(async move {
        let mut app = Client::http1(outbound_addr).await;
        app.get("service-b", "/hold").await
    });
    p.app.state.wait_for_held().await;

    let outbound_drained = tokio::spawn(p.outbound.drain(Duration::from_secs(10)));
    let inbound_drained = tokio::spawn(p.inbound.drain(Duration::from_secs(10)));
    // Listeners close once draining starts.
    eventually("listeners closed", || {
        std::net::TcpStream::connect(outbound_addr).is_err()
            && std::net::TcpStream::connect(inbound_addr).is_err()
    })
    .await;
    assert!(!outbound_drained.is_finished() && !inbound_drained.is_finished());

    p.app.state.release_held();
    let reply = in_flight.await.unwrap();
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.echo().path, "/hold");
    assert!(outbound_drained.await.unwrap(), "outbound drain timed out");
    assert!(inbound_drained.await.unwrap(), "inbound drain timed out");
    p.outbound.task.await.unwrap();
    p.inbound.task.await.unwrap();
}

/// A TCP relay whose connections can all be cut at once (to kill a pooled connection).
struct Relay {
    addr: std::net::SocketAddr,
    conns: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl Relay {
    async fn spawn(to: std::net::SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let conns = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let c = conns.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut a, _)) = listener.accept().await else {
                    return;
                };
                let task = tokio::spawn(async move {
                    let mut b = tokio::net::TcpStream::connect(to).await.unwrap();
                    let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
                });
                c.lock().unwrap().push(task.abort_handle());
            }
        });
        Self { addr, conns }
    }

    fn cut(&self) {
        for conn in self.conns.lock().unwrap().drain(..) {
            conn.abort();
        }
    }
}

#[tokio::test]
async fn refused_resumption_falls_back_to_a_full_handshake_with_the_rotated_svid() {
    use std::time::SystemTime;
    use trellis_identity::testca::LeafSpec;

    let mesh = Mesh::new();
    // The client starts on a short-lived SVID.
    let mut spec = LeafSpec::new(CLIENT_ID);
    spec.not_after = SystemTime::now() + Duration::from_secs(2);
    let (chain, key) = mesh.ca.issue(&spec);
    let short = trellis_identity::Svid::new(chain, key).unwrap();
    mesh.client_store
        .install(short, mesh.ca.bundle(), SystemTime::now())
        .unwrap();

    let app = spawn_app().await;
    let inbound = spawn_inbound(
        &settings(app.addr, vec![]),
        mesh.server_store.clone(),
        mesh.server_metrics.clone(),
    )
    .await;
    let relay = Relay::spawn(inbound.addrs.http).await;
    let outbound = spawn_outbound(
        &settings(
            closed_port().await,
            vec![http_upstream("b", &["service-b"], relay.addr, SERVER_ID)],
        ),
        mesh.client_store.clone(),
        mesh.client_metrics.clone(),
    )
    .await;
    let mut client = Client::http1(addr_of(&outbound.addrs, "shared")).await;
    assert_eq!(client.get("service-b", "/one").await.status, StatusCode::OK);

    // Rotation: a fresh SVID; then the old one expires, and the pooled connection dies.
    mesh.client_store
        .install(
            mesh.ca.svid(CLIENT_PATH),
            mesh.ca.bundle(),
            SystemTime::now(),
        )
        .unwrap();
    let past = spec.not_after + Duration::from_secs(1);
    eventually("old SVID expired", || SystemTime::now() > past).await;
    relay.cut();
    eventually("pooled connection closed", || {
        metric(
            &mesh.client_metrics,
            "trellis_connections_open{direction=\"outbound\"}",
        ) == 0
    })
    .await;

    // The outbound offers the session made with the expired certificate; the inbound refuses
    // it, and the outbound retries with a full handshake presenting the rotated SVID.
    let echo = client.get("service-b", "/two").await.echo();
    assert_eq!(echo.path, "/two");
    assert_eq!(
        handshakes(&mesh.server_metrics, "inbound", "error", "expired"),
        1
    );
    assert_eq!(
        handshakes(
            &mesh.client_metrics,
            "outbound",
            "error",
            "resumption_refused"
        ),
        1
    );
    assert_eq!(handshakes(&mesh.server_metrics, "inbound", "ok", "none"), 2);
    assert_eq!(
        metric(&mesh.client_metrics, "trellis_upstream_connections_total"),
        2
    );
}
