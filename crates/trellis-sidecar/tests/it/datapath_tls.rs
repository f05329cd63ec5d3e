//! The inbound listener against raw TLS clients (every way a caller can be wrong), session
//! resumption on both sides, raw TCP mode, and the HTTP/1.1 fallback toward a peer without h2.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use crate::datapath_support;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::StatusCode;
use hyper_util::rt::TokioIo;
use rustls::client::Resumption;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, HandshakeKind, ProtocolVersion};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use trellis_identity::testca::{AlwaysPresents, LeafSpec, TestCa};
use trellis_identity::tls::{
    client_config, PeerMatch, SpiffeServerVerifier, SvidResolver, TlsPolicy,
};
use trellis_identity::{leaf_sha256_hex, SpiffeId, Svid};
use trellis_sidecar::config::Protocol;
use trellis_sidecar::dial::{PeerTarget, TlsClient};
use trellis_sidecar::forward_error::ForwardError;
use trellis_sidecar::mtls::{self, SessionTicketer};

use datapath_support::*;

fn server_name() -> ServerName<'static> {
    ServerName::try_from("127.0.0.1").unwrap()
}

fn resolver(svid: &Svid) -> Arc<SvidResolver> {
    let r = SvidResolver::empty();
    r.install(svid).unwrap();
    r
}

/// A raw client: presents `cert` (or nothing), verifies the server as `SERVER_ID` under `ca`,
/// offers ALPN `http/1.1`, remembers sessions.
fn raw_client(ca: &TestCa, cert: Option<&Svid>, policy: TlsPolicy) -> TlsConnector {
    let verifier = SpiffeServerVerifier::new(
        ca.shared_bundle(),
        PeerMatch::Exact(SpiffeId::parse(SERVER_ID).unwrap()),
    );
    let mut config = client_config(cert.map(resolver), verifier, policy, &[b"http/1.1"]).unwrap();
    config.resumption = Resumption::in_memory_sessions(8);
    TlsConnector::from(Arc::new(config))
}

fn always_presents(ca: &TestCa, svid: &Svid) -> TlsConnector {
    let verifier = SpiffeServerVerifier::new(
        ca.shared_bundle(),
        PeerMatch::Exact(SpiffeId::parse(SERVER_ID).unwrap()),
    );
    let config = ClientConfig::builder_with_provider(trellis_identity::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(AlwaysPresents::new(svid));
    TlsConnector::from(Arc::new(config))
}

async fn dial(
    connector: &TlsConnector,
    addr: std::net::SocketAddr,
) -> std::io::Result<TlsStream<TcpStream>> {
    connector
        .connect(server_name(), TcpStream::connect(addr).await?)
        .await
}

/// Connects and asks for `/`; `Ok(body)` only if the app answered.
async fn call(connector: &TlsConnector, addr: std::net::SocketAddr) -> Result<Echo, String> {
    let mut tls = dial(connector, addr)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let text = raw_http1(&mut tls, "service-b", "/", "")
        .await
        .map_err(|e| format!("exchange: {e}"))?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no response: {text:?}"))?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(head.to_owned());
    }
    Ok(Echo::parse(body.as_bytes()))
}

async fn server_only(mesh: &Mesh, policy: TlsPolicy) -> (App, Running<InboundAddrs>) {
    let app = spawn_app().await;
    let mut s = settings(app.addr, vec![]);
    s.tls_policy = policy;
    let inbound = spawn_inbound(&s, mesh.server_store.clone(), mesh.server_metrics.clone()).await;
    (app, inbound)
}

#[tokio::test]
async fn raw_client_with_svid_gets_through() {
    let mesh = Mesh::new();
    let (_app, inbound) = server_only(&mesh, TlsPolicy::Tls13).await;
    let echo = call(
        &raw_client(&mesh.ca, Some(&mesh.client_svid), TlsPolicy::Tls13),
        inbound.addrs.http,
    )
    .await
    .unwrap();
    assert_eq!(echo.xfcc.len(), 1);
    assert!(
        echo.xfcc[0].ends_with(&format!(";URI={CLIENT_ID}")),
        "{:?}",
        echo.xfcc
    );
}

#[tokio::test]
async fn rejects_client_without_certificate() {
    let mesh = Mesh::new();
    let (app, inbound) = server_only(&mesh, TlsPolicy::Tls13).await;
    let result = call(
        &raw_client(&mesh.ca, None, TlsPolicy::Tls13),
        inbound.addrs.http,
    )
    .await;
    assert!(result.is_err(), "{result:?}");
    eventually("no_cert counted", || {
        handshakes(&mesh.server_metrics, "inbound", "error", "no_cert") == 1
    })
    .await;
    assert_eq!(app.state.requests.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn rejects_client_certificate_from_another_ca() {
    let mesh = Mesh::new();
    let (app, inbound) = server_only(&mesh, TlsPolicy::Tls13).await;
    let stranger = TestCa::root("example.org").svid(CLIENT_PATH);
    let result = call(
        &raw_client(&mesh.ca, Some(&stranger), TlsPolicy::Tls13),
        inbound.addrs.http,
    )
    .await;
    assert!(result.is_err(), "{result:?}");
    eventually("unknown_ca counted", || {
        handshakes(&mesh.server_metrics, "inbound", "error", "unknown_ca") == 1
    })
    .await;
    assert_eq!(app.state.requests.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn rejects_expired_client_certificate() {
    let mesh = Mesh::new();
    let (_app, inbound) = server_only(&mesh, TlsPolicy::Tls13).await;
    let mut spec = LeafSpec::new(CLIENT_ID);
    spec.not_before = SystemTime::now() - Duration::from_secs(7200);
    spec.not_after = SystemTime::now() - Duration::from_secs(3600);
    let (chain, key) = mesh.ca.issue(&spec);
    let expired = Svid::new(chain, key).unwrap();
    // Trellis's own resolver never presents an expired SVID; a hostile client does.
    assert!(
        call(&always_presents(&mesh.ca, &expired), inbound.addrs.http)
            .await
            .is_err()
    );
    eventually("expired counted", || {
        handshakes(&mesh.server_metrics, "inbound", "error", "expired") == 1
    })
    .await;
}

fn tls12_only(mesh: &Mesh) -> TlsConnector {
    let verifier = SpiffeServerVerifier::new(
        mesh.ca.shared_bundle(),
        PeerMatch::Exact(SpiffeId::parse(SERVER_ID).unwrap()),
    );
    let mut config = ClientConfig::builder_with_provider(trellis_identity::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(resolver(&mesh.client_svid));
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    TlsConnector::from(Arc::new(config))
}

#[tokio::test]
async fn rejects_tls12_client_under_tls13_policy() {
    let mesh = Mesh::new();
    let (app, inbound) = server_only(&mesh, TlsPolicy::Tls13).await;
    let err = dial(&tls12_only(&mesh), inbound.addrs.http)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("ProtocolVersion"), "{err}");
    eventually("protocol_version counted", || {
        handshakes(&mesh.server_metrics, "inbound", "error", "protocol_version") == 1
    })
    .await;
    assert_eq!(app.state.requests.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn tls12_plus_policy_accepts_tls12_client() {
    let mesh = Mesh::new();
    let (_app, inbound) = server_only(&mesh, TlsPolicy::Tls12Plus).await;
    let mut tls = dial(&tls12_only(&mesh), inbound.addrs.http).await.unwrap();
    assert_eq!(
        tls.get_ref().1.protocol_version(),
        Some(ProtocolVersion::TLSv1_2)
    );
    let text = raw_http1(&mut tls, "service-b", "/", "").await.unwrap();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
}

#[tokio::test]
async fn resumed_session_keeps_the_caller_identity() {
    let mesh = Mesh::new();
    let (_app, inbound) = server_only(&mesh, TlsPolicy::Tls13).await;
    let client = raw_client(&mesh.ca, Some(&mesh.client_svid), TlsPolicy::Tls13);

    let mut first = dial(&client, inbound.addrs.http).await.unwrap();
    assert_eq!(
        first.get_ref().1.handshake_kind(),
        Some(HandshakeKind::Full)
    );
    let full = raw_http1(&mut first, "service-b", "/", "").await.unwrap();

    let mut second = dial(&client, inbound.addrs.http).await.unwrap();
    assert_eq!(
        second.get_ref().1.handshake_kind(),
        Some(HandshakeKind::Resumed)
    );
    let resumed = raw_http1(&mut second, "service-b", "/", "").await.unwrap();

    let xfcc = |text: &str| Echo::parse(text.split_once("\r\n\r\n").unwrap().1.as_bytes()).xfcc;
    let expected = format!(
        "By={SERVER_ID};Hash={};URI={CLIENT_ID}",
        leaf_sha256_hex(&mesh.client_svid.chain()[0])
    );
    assert_eq!(xfcc(&full), std::slice::from_ref(&expected));
    assert_eq!(xfcc(&resumed), [expected]);
    assert_eq!(handshakes(&mesh.server_metrics, "inbound", "ok", "none"), 2);
}

/// Waits (polling the clock) until `t` is in the past by more than a second: certificate times
/// have one-second resolution.
async fn wait_until_past(t: SystemTime) {
    let past = t + Duration::from_secs(1);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while SystemTime::now() <= past {
        assert!(std::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn short_lived(ca: &TestCa, id: &str) -> (Svid, SystemTime) {
    let mut spec = LeafSpec::new(id);
    spec.not_after = SystemTime::now() + Duration::from_secs(2);
    let (chain, key) = ca.issue(&spec);
    (Svid::new(chain, key).unwrap(), spec.not_after)
}

#[tokio::test]
async fn resumed_session_whose_client_certificate_expired_is_refused() {
    let mesh = Mesh::new();
    let (app, inbound) = server_only(&mesh, TlsPolicy::Tls13).await;
    let (svid, not_after) = short_lived(&mesh.ca, CLIENT_ID);
    let client = raw_client(&mesh.ca, Some(&svid), TlsPolicy::Tls13);
    call(&client, inbound.addrs.http).await.unwrap();

    wait_until_past(not_after).await;
    let mut resumed = dial(&client, inbound.addrs.http).await.unwrap();
    assert_eq!(
        resumed.get_ref().1.handshake_kind(),
        Some(HandshakeKind::Resumed)
    );
    let answer = raw_http1(&mut resumed, "service-b", "/", "").await;
    assert!(answer.as_deref().map_or(true, str::is_empty), "{answer:?}");
    eventually("expired resumption counted", || {
        handshakes(&mesh.server_metrics, "inbound", "error", "expired") == 1
    })
    .await;
    assert_eq!(app.state.requests.load(Ordering::SeqCst), 1);
}

// ---------------------------------------------------------------------------------------------
// Raw TCP mode and the outbound side of resumption.

/// Echoes bytes until EOF, then closes.
async fn spawn_tcp_echo() -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut tcp, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let (mut r, mut w) = tcp.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

async fn ping<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    stream: &mut S,
    msg: &[u8],
) -> Vec<u8> {
    stream.write_all(msg).await.unwrap();
    stream.shutdown().await.unwrap();
    let mut back = Vec::new();
    stream.read_to_end(&mut back).await.unwrap();
    back
}

async fn tcp_forward_inbound(mesh: &Mesh) -> Running<InboundAddrs> {
    let echo = spawn_tcp_echo().await;
    let mut s = settings(closed_port().await, vec![]);
    s.inbound_tcp = vec![tcp_forward(echo)];
    spawn_inbound(&s, mesh.server_store.clone(), mesh.server_metrics.clone()).await
}

#[tokio::test]
async fn tcp_upstream_splices_bytes_both_ways_through_mtls() {
    let mesh = Mesh::new();
    let inbound = tcp_forward_inbound(&mesh).await;
    let mut upstream = http_upstream("db", &[], inbound.addrs.tcp[0], SERVER_ID);
    upstream.protocol = Protocol::Tcp;
    upstream.listen = Some("127.0.0.1:0".parse().unwrap());
    let outbound = spawn_outbound(
        &settings(closed_port().await, vec![upstream]),
        mesh.client_store.clone(),
        mesh.client_metrics.clone(),
    )
    .await;
    let mut app = TcpStream::connect(addr_of(&outbound.addrs, "db"))
        .await
        .unwrap();
    let big = vec![42u8; 1 << 20];
    assert_eq!(ping(&mut app, &big).await, big);
    assert_eq!(handshakes(&mesh.server_metrics, "inbound", "ok", "none"), 1);
    assert_eq!(
        metric(&mesh.client_metrics, "trellis_upstream_connections_total"),
        1
    );
}

#[tokio::test]
async fn tcp_upstream_with_wrong_identity_closes_the_app_connection() {
    let mesh = Mesh::new();
    let inbound = tcp_forward_inbound(&mesh).await;
    let mut upstream = http_upstream(
        "db",
        &[],
        inbound.addrs.tcp[0],
        "spiffe://example.org/ns/b/sa/db",
    );
    upstream.protocol = Protocol::Tcp;
    upstream.listen = Some("127.0.0.1:0".parse().unwrap());
    let outbound = spawn_outbound(
        &settings(closed_port().await, vec![upstream]),
        mesh.client_store.clone(),
        mesh.client_metrics.clone(),
    )
    .await;
    let mut app = TcpStream::connect(addr_of(&outbound.addrs, "db"))
        .await
        .unwrap();
    let mut buf = Vec::new();
    let read = app.read_to_end(&mut buf).await;
    assert!(read.is_err() || buf.is_empty(), "{read:?} {buf:?}");
    eventually("wrong_identity counted", || {
        handshakes(&mesh.client_metrics, "outbound", "error", "wrong_identity") == 1
    })
    .await;
}

fn peer(mesh: &Mesh, addr: std::net::SocketAddr) -> (PeerTarget, TlsClient) {
    let id = SpiffeId::parse(SERVER_ID).unwrap();
    let (config, sessions) =
        mtls::client_config(&mesh.client_store, &id, TlsPolicy::Tls13, mtls::ALPN_NONE).unwrap();
    let target = PeerTarget::new(
        "db",
        &addr.to_string(),
        id,
        mesh.client_store.bundle(),
        mesh.client_metrics.clone(),
        Duration::from_secs(5),
    )
    .unwrap();
    (target, TlsClient::new(config, sessions))
}

#[tokio::test]
async fn outbound_resumes_sessions_with_the_peer() {
    let mesh = Mesh::new();
    let inbound = tcp_forward_inbound(&mesh).await;
    let (target, tls) = peer(&mesh, inbound.addrs.tcp[0]);
    let mut first = target.connect_stream(&tls).await.unwrap();
    assert_eq!(
        first.get_ref().1.handshake_kind(),
        Some(HandshakeKind::Full)
    );
    assert_eq!(ping(&mut first, b"one").await, b"one");
    let mut second = target.connect_stream(&tls).await.unwrap();
    assert_eq!(
        second.get_ref().1.handshake_kind(),
        Some(HandshakeKind::Resumed)
    );
    assert_eq!(ping(&mut second, b"two").await, b"two");
    assert_eq!(
        handshakes(&mesh.client_metrics, "outbound", "ok", "none"),
        2
    );
    assert_eq!(handshakes(&mesh.server_metrics, "inbound", "ok", "none"), 2);
}

#[tokio::test]
async fn outbound_refuses_resumed_session_whose_server_certificate_expired() {
    let mut mesh = Mesh::new();
    let (server_svid, not_after) = short_lived(&mesh.ca, SERVER_ID);
    let (server_store, server_metrics) = store(&mesh.ca, server_svid);
    mesh.server_store = server_store;
    mesh.server_metrics = server_metrics;
    let inbound = tcp_forward_inbound(&mesh).await;
    let (target, tls) = peer(&mesh, inbound.addrs.tcp[0]);
    let mut first = target.connect_stream(&tls).await.unwrap();
    assert_eq!(ping(&mut first, b"one").await, b"one");

    wait_until_past(not_after).await;
    // Either the client's re-check refuses the resumed session (counted as `expired`) or the
    // server, which never presents an expired SVID, refuses the handshake: the caller never
    // gets a connection to a peer whose certificate expired.
    let err = target.connect_stream(&tls).await.unwrap_err();
    assert!(matches!(err, ForwardError::Handshake { .. }), "{err:?}");
    assert_eq!(err.status(), StatusCode::BAD_GATEWAY);
    assert!(handshakes(&mesh.client_metrics, "outbound", "error", "expired") <= 1);
}

// ---------------------------------------------------------------------------------------------
// A peer that only speaks HTTP/1.1.

#[tokio::test]
async fn peer_without_h2_is_reached_over_pooled_http1() {
    let mesh = Mesh::new();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let config = mtls::server_config(
        &mesh.server_store,
        TlsPolicy::Tls13,
        &[mtls::ALPN_HTTP11],
        SessionTicketer::new().unwrap(),
    )
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = hyper::service::service_fn(
                    |req: http::Request<hyper::body::Incoming>| async move {
                        let body = format!("http1 peer saw {:?} {}", req.version(), req.uri());
                        Ok::<_, std::convert::Infallible>(http::Response::new(
                            http_body_util::Full::new(bytes::Bytes::from(body)),
                        ))
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    let outbound = spawn_outbound(
        &settings(
            closed_port().await,
            vec![http_upstream("old", &["old"], addr, SERVER_ID)],
        ),
        mesh.client_store.clone(),
        mesh.client_metrics.clone(),
    )
    .await;
    let mut app = Client::http1(addr_of(&outbound.addrs, "shared")).await;
    for i in 0..5 {
        let reply = app.get("old", &format!("/v{i}")).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        assert_eq!(reply.text(), format!("http1 peer saw HTTP/1.1 /v{i}"));
    }
    assert_eq!(
        metric(&mesh.client_metrics, "trellis_upstream_connections_total"),
        1
    );
}
