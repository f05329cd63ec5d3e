//! The inbound proxy enforcing a policy: allowed and denied requests, the 403 body, the
//! default deny, path normalization (what is allowed reaches the app in normal form; what
//! cannot be normalized is refused), and the decision metrics.
#![allow(clippy::unwrap_used)]

use crate::policy_support;

use http::StatusCode;
use policy_support::*;

#[tokio::test]
async fn service_a_may_get_the_health_check() {
    let mut pm = PolicyMesh::start(Layout::File, POLICY).await;
    let a = pm.caller(SERVICE_A_PATH).await;
    let reply = get(a, "/load-balancer/health").await;
    assert_eq!(reply.echo().path, "/load-balancer/health");
    assert_eq!(
        pm.metric("trellis_authz_decisions_total{decision=\"allow\",rule=\"lb-health\"}"),
        1
    );
}

#[tokio::test]
async fn export_is_forbidden_with_a_json_body_naming_the_rule() {
    let mut pm = PolicyMesh::start(Layout::File, POLICY).await;
    let a = pm.caller(SERVICE_A_PATH).await;
    let reply = get(a, "/admin/user-export").await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN);
    assert_eq!(reply.headers["content-type"], "application/json");
    let body: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
    assert_eq!(
        body,
        serde_json::json!({"error": "forbidden", "rule": "no-export", "caller": SERVICE_A})
    );
    assert_eq!(
        pm.app
            .state
            .requests
            .load(std::sync::atomic::Ordering::SeqCst),
        0
    );
    assert_eq!(
        pm.metric("trellis_authz_decisions_total{decision=\"deny\",rule=\"no-export\"}"),
        1
    );
}

#[tokio::test]
async fn unknown_caller_is_denied_by_default() {
    let mut pm = PolicyMesh::start(Layout::File, POLICY).await;
    let stranger = pm.caller(STRANGER_PATH).await;
    let reply = get(stranger, "/load-balancer/health").await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN);
    let body: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
    assert_eq!(body["rule"], "default");
    assert_eq!(body["caller"], STRANGER);
}

#[tokio::test]
async fn dot_segments_and_double_slashes_reach_the_app_normalized() {
    let mut pm = PolicyMesh::start(Layout::File, POLICY).await;
    let a = pm.caller(SERVICE_A_PATH).await;
    for spelling in [
        "/load-balancer/./health",
        "//load-balancer/health",
        "/load-balancer/x/../health",
        "/load-balancer/%68ealth",
    ] {
        let reply = get(a, spelling).await;
        assert_eq!(reply.echo().path, "/load-balancer/health", "{spelling}");
    }
}

#[tokio::test]
async fn other_spellings_of_a_denied_path_are_denied() {
    let mut pm = PolicyMesh::start(Layout::File, POLICY).await;
    let stranger = pm.caller(STRANGER_PATH).await;
    for spelling in [
        "/admin/./user-export",
        "//admin/user-export",
        "/%61dmin/user-export",
    ] {
        let reply = get(stranger, spelling).await;
        assert_eq!(reply.status, StatusCode::FORBIDDEN, "{spelling}");
        let body: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
        assert_eq!(body["rule"], "no-export", "{spelling}");
    }
}

#[tokio::test]
async fn encoded_slash_is_refused_with_400() {
    let mut pm = PolicyMesh::start(Layout::File, POLICY).await;
    let a = pm.caller(SERVICE_A_PATH).await;
    let reply = get(a, "/admin%2Fuser-export").await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    reply.assert_one_line();
    assert!(reply.text().contains("encoded slash"), "{}", reply.text());
    assert_eq!(
        pm.metric("trellis_authz_bad_paths_total{reason=\"encoded_slash\"}"),
        1
    );
}
