//! Sidecar admin HTTP, bound to loopback by default: `/healthz`, `/ready`, `/metrics`,
//! `/certs` (identity facts as JSON; never a key), `/policy` (the authorization policy in
//! force: sources, hash, load time, rule count, and the last reload error).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::metrics::{SidecarMetrics, CONTENT_TYPE};
use crate::policy::PolicyEngine;
use crate::svid_store::SvidStore;

/// What the admin endpoint reports on.
pub struct AdminState {
    /// Identity.
    pub store: Arc<SvidStore>,
    /// Metrics.
    pub metrics: Arc<SidecarMetrics>,
    /// `/ready` turns false this long before the SVID expires.
    pub expiry_margin: Duration,
    /// The authorization policy.
    pub policy: Arc<PolicyEngine>,
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn reply(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    resp
}

/// `/certs`: the SVID's ID, serial and validity, and the bundle's CAs with their expiry.
pub fn certs_json(store: &SvidStore) -> serde_json::Value {
    let svid = store.current().map(|s| {
        serde_json::json!({
            "spiffe_id": s.spiffe_id().as_str(),
            "serial": s.serial_hex(),
            "not_before": unix(s.not_before()),
            "not_after": unix(s.not_after()),
            "chain_length": s.chain().len(),
            "issuer": s.chain().first().and_then(|c| trellis_identity::cert_facts(c).ok()).map(|f| f.issuer),
        })
    });
    let bundle = store.bundle().load_full();
    let cas: Vec<serde_json::Value> = bundle
        .roots()
        .iter()
        .filter_map(|der| trellis_identity::cert_facts(der).ok())
        .map(|f| serde_json::json!({ "subject": f.subject, "serial": f.serial_hex, "not_after": unix(f.not_after) }))
        .collect();
    serde_json::json!({
        "trust_domain": store.trust_domain().as_str(),
        "svid": svid,
        "bundle": cas,
    })
}

/// Routes one admin request.
pub fn route(state: &AdminState, method: &Method, path: &str) -> Response<Full<Bytes>> {
    const PLAIN: &str = "text/plain; charset=utf-8";
    if method != Method::GET && method != Method::HEAD {
        return reply(StatusCode::METHOD_NOT_ALLOWED, PLAIN, "only GET\n");
    }
    match path {
        "/healthz" => reply(StatusCode::OK, PLAIN, "ok\n"),
        "/ready" => {
            let now = SystemTime::now();
            if state.store.is_ready(now, state.expiry_margin) {
                reply(StatusCode::OK, PLAIN, "ready\n")
            } else if let Some(svid) = state.store.current() {
                let at = humantime::format_rfc3339_seconds(svid.not_after());
                let body = match svid.not_after().duration_since(now) {
                    Ok(left) => format!(
                        "not ready: SVID expires at {at} (in {}s), within the expiry margin ({}s), and no replacement has arrived\n",
                        left.as_secs(),
                        state.expiry_margin.as_secs()
                    ),
                    Err(_) => format!(
                        "not ready: SVID expired at {at}; no certificate is presented until the control plane issues a new one\n"
                    ),
                };
                reply(StatusCode::SERVICE_UNAVAILABLE, PLAIN, body)
            } else {
                reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    PLAIN,
                    "not ready: no SVID yet\n",
                )
            }
        }
        "/metrics" => reply(StatusCode::OK, CONTENT_TYPE, state.metrics.encode()),
        "/certs" => reply(
            StatusCode::OK,
            "application/json",
            certs_json(&state.store).to_string(),
        ),
        "/policy" => reply(
            StatusCode::OK,
            "application/json",
            state.policy.status_json().to_string(),
        ),
        _ => reply(
            StatusCode::NOT_FOUND,
            PLAIN,
            "not found: try /healthz, /ready, /metrics, /certs, /policy\n",
        ),
    }
}

/// Serves admin requests until `shutdown` flips.
pub async fn serve(
    listener: TcpListener,
    state: Arc<AdminState>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let tcp = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let state = Arc::clone(&state);
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let resp = route(&state, req.method(), req.uri().path());
                async move { Ok::<_, Infallible>(resp) }
            });
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            if let Err(e) = builder.serve_connection(TokioIo::new(tcp), svc).await {
                tracing::debug!(error = %e, "admin connection ended with error");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_identity::testca::TestCa;

    #[test]
    fn ready_and_certs_follow_the_store() {
        let ca = TestCa::root("example.org");
        let metrics = Arc::new(SidecarMetrics::new());
        let store = SvidStore::new(ca.bundle(), None, Arc::clone(&metrics));
        let state = AdminState {
            store: Arc::clone(&store),
            policy: PolicyEngine::allow_all(Arc::clone(&metrics)),
            metrics,
            expiry_margin: Duration::from_secs(60),
        };
        assert_eq!(
            route(&state, &Method::GET, "/ready").status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        store
            .install(ca.svid("/web"), ca.bundle(), SystemTime::now())
            .unwrap();
        assert_eq!(
            route(&state, &Method::GET, "/ready").status(),
            StatusCode::OK
        );
        let certs = certs_json(&store);
        assert_eq!(certs["svid"]["spiffe_id"], "spiffe://example.org/web");
        assert_eq!(certs["bundle"].as_array().unwrap().len(), 1);
        assert!(!certs.to_string().contains("PRIVATE"));
        let policy = route(&state, &Method::GET, "/policy");
        assert_eq!(policy.status(), StatusCode::OK);
    }

    #[test]
    fn ready_says_when_the_svid_expired() {
        let ca = TestCa::root("example.org");
        let metrics = Arc::new(SidecarMetrics::new());
        let store = SvidStore::new(ca.bundle(), None, Arc::clone(&metrics));
        let now = SystemTime::now();
        let mut spec = trellis_identity::testca::LeafSpec::new("spiffe://example.org/web");
        spec.not_before = now - Duration::from_secs(120);
        spec.not_after = now - Duration::from_secs(10);
        let (chain, key) = ca.issue(&spec);
        let expired = trellis_identity::Svid::new(chain, key).unwrap();
        // Installed while it was still valid; the control plane never replaced it.
        store
            .install(expired, ca.bundle(), now - Duration::from_secs(60))
            .unwrap();
        let state = AdminState {
            store,
            policy: PolicyEngine::allow_all(Arc::clone(&metrics)),
            metrics,
            expiry_margin: Duration::from_secs(5),
        };
        let ready = route(&state, &Method::GET, "/ready");
        assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);
        let body = format!("{:?}", ready.body());
        assert!(body.contains("SVID expired at"), "{body}");
    }
}
