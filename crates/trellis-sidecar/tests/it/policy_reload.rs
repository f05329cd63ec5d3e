//! Hot reload: the decision follows an in-place rewrite, an editor's rename and a
//! Kubernetes ConfigMap symlink swap; an invalid policy keeps the last good one, is counted
//! and shows on `/policy`; a reload that denies a caller everything closes its connections.
#![allow(clippy::unwrap_used)]

use crate::datapath_support;
use crate::policy_support;

use std::time::{Duration, Instant};

use http::StatusCode;
use policy_support::*;

const BROKEN: &str = "apiVersion: trellis.io/v1
kind: Policy
rules:
  - name: typo
    acton: allow
";

#[tokio::test]
async fn in_place_rewrite_is_followed() {
    let mut pm = PolicyMesh::start(Layout::File, POLICY).await;
    let a = pm.caller(SERVICE_A_PATH).await;
    assert_eq!(get(a, "/other").await.status, StatusCode::FORBIDDEN);
    pm.write_in_place(&policy_allowing_other());
    eventually_status(a, "/other", StatusCode::OK).await;
    pm.write_in_place(POLICY);
    eventually_status(a, "/other", StatusCode::FORBIDDEN).await;
}

#[tokio::test]
async fn rename_over_is_followed() {
    let mut pm = PolicyMesh::start(Layout::File, POLICY).await;
    let a = pm.caller(SERVICE_A_PATH).await;
    pm.write_by_rename(&policy_allowing_other());
    eventually_status(a, "/other", StatusCode::OK).await;
    pm.write_by_rename(POLICY);
    eventually_status(a, "/other", StatusCode::FORBIDDEN).await;
}

#[tokio::test]
async fn configmap_symlink_swap_is_followed() {
    let mut pm = PolicyMesh::start(Layout::ConfigMap, POLICY).await;
    let a = pm.caller(SERVICE_A_PATH).await;
    assert_eq!(get(a, "/load-balancer/health").await.status, StatusCode::OK);
    pm.swap_configmap(&policy_allowing_other());
    eventually_status(a, "/other", StatusCode::OK).await;
    pm.swap_configmap(POLICY);
    eventually_status(a, "/other", StatusCode::FORBIDDEN).await;
    let status = pm.admin_policy().await;
    let sources = status["sources"].as_array().unwrap();
    assert_eq!(sources.len(), 1, "{status}");
    assert!(
        sources[0].as_str().unwrap().ends_with("/policy.yaml"),
        "{status}"
    );
}

#[tokio::test]
async fn invalid_rewrite_keeps_the_last_good_policy_and_shows_the_error() {
    let mut pm = PolicyMesh::start(Layout::File, POLICY).await;
    let a = pm.caller(SERVICE_A_PATH).await;
    let before = pm.admin_policy().await;
    assert_eq!(before["loaded"], true);
    assert!(before["last_error"].is_null());
    assert_eq!(before["rules"], 3);

    pm.write_in_place(BROKEN);
    let deadline = Instant::now() + Duration::from_secs(10);
    while pm.metric("trellis_policy_reload_errors_total") == 0 {
        assert!(
            Instant::now() < deadline,
            "the broken policy was never refused"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Still the old policy.
    assert_eq!(get(a, "/load-balancer/health").await.status, StatusCode::OK);
    assert_eq!(get(a, "/other").await.status, StatusCode::FORBIDDEN);
    let after = pm.admin_policy().await;
    assert_eq!(after["hash"], before["hash"]);
    assert_eq!(after["rules"], 3);
    let error = after["last_error"].as_str().unwrap();
    let file = pm.policy_file().display().to_string();
    assert!(error.starts_with(&format!("{file}:5:")), "{error}");
    assert!(error.contains("acton"), "{error}");
    assert!(after["last_error_at"].as_u64().unwrap() > 0);

    // Fixed: loads, and the error clears.
    pm.write_in_place(&policy_allowing_other());
    eventually_status(a, "/other", StatusCode::OK).await;
    let fixed = pm.admin_policy().await;
    assert!(fixed["last_error"].is_null(), "{fixed}");
    assert_eq!(fixed["rules"], 4);
}

#[tokio::test]
async fn connections_of_a_caller_denied_everything_are_closed() {
    let mut pm = PolicyMesh::start(Layout::File, POLICY).await;
    let a = pm.caller(SERVICE_A_PATH).await;
    let inbound_open = "trellis_connections_open{direction=\"inbound\"}";
    // The outbound sidecar keeps its mTLS connection to the server open (pooled).
    assert_eq!(get(a, "/load-balancer/health").await.status, StatusCode::OK);
    assert_eq!(pm.metric(inbound_open), 1);
    // A policy that names service-a nowhere: denied everything by default.
    pm.write_in_place(&POLICY.replace("service-a", "service-z"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while pm.metric(inbound_open) != 0 {
        assert!(
            Instant::now() < deadline,
            "service-a's connection stayed open"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let reply = get(a, "/load-balancer/health").await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn a_bad_policy_at_start_refuses_to_start_with_its_location() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("policy.yaml");
    std::fs::write(&file, BROKEN).unwrap();
    let mut settings = datapath_support::settings(datapath_support::closed_port().await, vec![]);
    settings.policy = Some(file.clone());
    let err = trellis_sidecar::Sidecar::start(settings)
        .await
        .err()
        .expect("the sidecar started with a broken policy")
        .to_string();
    assert!(
        err.starts_with(&format!("{}:5:5: ", file.display())),
        "{err}"
    );
}

#[tokio::test]
async fn an_empty_policy_directory_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = datapath_support::settings(datapath_support::closed_port().await, vec![]);
    settings.policy = Some(dir.path().to_owned());
    let err = trellis_sidecar::Sidecar::start(settings)
        .await
        .err()
        .expect("the sidecar started without policy files")
        .to_string();
    assert!(err.contains("no policy files"), "{err}");
}

/// A caller speaking HTTP/1.1 straight to the inbound (ALPN `http/1.1`, no outbound
/// sidecar): its path is normalized too, and its keep-alive connection is closed when a
/// reload denies it everything.
#[tokio::test]
async fn http1_keep_alive_connection_is_closed_when_its_caller_is_denied_everything() {
    use std::sync::Arc;

    use http_body_util::{BodyExt, Full};
    use hyper_util::rt::TokioIo;
    use trellis_identity::tls::{client_config, PeerMatch, SpiffeServerVerifier, SvidResolver};
    use trellis_identity::SpiffeId;

    let pm = PolicyMesh::start(Layout::File, POLICY).await;
    let resolver = SvidResolver::empty();
    resolver.install(&pm.mesh.ca.svid(SERVICE_A_PATH)).unwrap();
    let verifier = SpiffeServerVerifier::new(
        pm.mesh.ca.shared_bundle(),
        PeerMatch::Exact(SpiffeId::parse(datapath_support::SERVER_ID).unwrap()),
    );
    let config = client_config(
        Some(resolver),
        verifier,
        trellis_identity::tls::TlsPolicy::Tls13,
        &[b"http/1.1"],
    )
    .unwrap();
    let tcp = tokio::net::TcpStream::connect(pm.inbound.addrs.http)
        .await
        .unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(
            rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap(),
            tcp,
        )
        .await
        .unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    let conn = tokio::spawn(conn);
    let request = http::Request::builder()
        .uri("/load-balancer/./health?probe=1")
        .header("host", "service-b")
        .body(Full::new(bytes::Bytes::new()))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let echo = datapath_support::Echo::parse(&body);
    assert_eq!(echo.path, "/load-balancer/health");

    pm.write_in_place(&POLICY.replace("service-a", "service-z"));
    let closed = tokio::time::timeout(Duration::from_secs(10), conn).await;
    assert!(closed.is_ok(), "the HTTP/1.1 connection stayed open");
}
