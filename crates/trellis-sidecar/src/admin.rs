//! Sidecar admin HTTP, bound to loopback by default.
//!
//! Read-only (`GET`): `/healthz`, `/ready`, `/metrics`, `/certs` (identity facts as JSON;
//! never a key), `/policy` (the authorization policy in force: sources, rules, hash, load
//! time, and the last reload error).
//!
//! Actions (`POST`, from a loopback peer only, because the listener may be bound to
//! `0.0.0.0` by config): `/shutdown` (drain and exit as on SIGTERM; answered `202` first) and
//! `/inspect?target=HOST:PORT[&spiffe_id=…][&trust_domain=…][&tls12=true][&timeout=5s]` (one
//! diagnostic handshake presenting this sidecar's current SVID, whose key never leaves the
//! process; answers the [`InspectReport`](crate::inspect::InspectReport) as JSON).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::inspect::{self, ClientIdentity, InspectOptions, Target};
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::Full;
use hyper::body::Incoming;
use tokio::net::TcpListener;
use tokio::sync::watch;
use trellis_identity::{SpiffeId, TrustDomain};
use trellis_serve::http::{HttpServer, Routes};
use trellis_serve::net::is_loopback;
use trellis_serve::time::{rfc3339, unix_seconds};
use trellis_serve::{accept, Drain};

use crate::config::Limits;
use crate::listen;
use crate::metrics::{Listener, SidecarMetrics, CONTENT_TYPE};
use crate::policy::PolicyEngine;
use crate::svid_store::SvidStore;

const PLAIN: &str = "text/plain; charset=utf-8";
const JSON: &str = "application/json";
/// The longest `timeout` an `/inspect` caller may ask for: it holds an admin connection.
const MAX_INSPECT_TIMEOUT: Duration = Duration::from_secs(60);

/// What one admin request asks of the process beyond its response (`trellis-serve`'s, shared
/// with the control plane's admin endpoint).
pub use trellis_serve::http::AdminAction;

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
    /// Where the SVID comes from, as `/certs` reports it in `source` (see [`source_json`]).
    pub source: serde_json::Value,
}

/// `/certs`' `source`: `{"kind": "sds", "control_plane": …}` or `{"kind": "files", "cert": …,
/// "key": …, "bundle": …}` (paths, never contents), so `trellis status` can tell a sidecar
/// without SDS from one whose SDS stream is down.
pub fn source_json(identity: &crate::config::IdentitySource) -> serde_json::Value {
    match identity {
        crate::config::IdentitySource::Sds(sds) => {
            serde_json::json!({"kind": "sds", "control_plane": sds.control_plane})
        }
        crate::config::IdentitySource::Files(files) => serde_json::json!({
            "kind": "files",
            "cert": files.cert.display().to_string(),
            "key": files.key.display().to_string(),
            "bundle": files.bundle.display().to_string(),
        }),
    }
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

fn method_not_allowed(allow: &'static str) -> Response<Full<Bytes>> {
    let mut resp = reply(
        StatusCode::METHOD_NOT_ALLOWED,
        PLAIN,
        format!("method not allowed: use {allow}\n"),
    );
    resp.headers_mut()
        .insert(http::header::ALLOW, http::HeaderValue::from_static(allow));
    resp
}

/// `/certs`: the SVID's ID, serial and validity (unix seconds and RFC 3339), and the bundle's
/// CAs with their expiry. Built from certificate facts only: there is no key to leak.
pub fn certs_json(store: &SvidStore) -> serde_json::Value {
    let now = SystemTime::now();
    let svid = store.current().map(|s| {
        let leaf = s
            .chain()
            .first()
            .and_then(|c| trellis_identity::cert_facts(c).ok());
        serde_json::json!({
            "spiffe_id": s.spiffe_id().as_str(),
            "serial": s.serial_hex(),
            "not_before": unix_seconds(s.not_before()),
            "not_after": unix_seconds(s.not_after()),
            "not_before_rfc3339": rfc3339(s.not_before()),
            "not_after_rfc3339": rfc3339(s.not_after()),
            "expires_in_seconds": s.not_after().duration_since(now).map_or(0, |d| d.as_secs()),
            // Past notAfter the sidecar presents no certificate at all.
            "expired": s.not_after() <= now,
            "chain_length": s.chain().len(),
            "issuer": leaf.map(|f| f.issuer),
        })
    });
    let bundle = store.bundle().load_full();
    let cas = bundle.summary();
    serde_json::json!({
        "trust_domain": store.trust_domain().as_str(),
        "svid": svid,
        "bundle": cas,
    })
}

/// `/policy`: the policy engine's status plus what the loaded policy is (default action,
/// mode, rule names in evaluation order) and the times as RFC 3339.
pub fn policy_json(policy: &PolicyEngine) -> serde_json::Value {
    let mut status = policy.status_json();
    let current = policy.current();
    let last_error = policy.last_error();
    if let Some(obj) = status.as_object_mut() {
        obj.insert(
            "loaded_at_rfc3339".into(),
            current.as_ref().map(|p| rfc3339(p.loaded_at)).into(),
        );
        obj.insert(
            "last_error_at_rfc3339".into(),
            last_error.as_ref().map(|(_, t)| rfc3339(*t)).into(),
        );
        obj.insert(
            "default_action".into(),
            current
                .as_ref()
                .map(|p| p.compiled.default_action().as_str())
                .into(),
        );
        obj.insert(
            "mode".into(),
            current.as_ref().map(|p| p.compiled.mode().as_str()).into(),
        );
        obj.insert(
            "rule_names".into(),
            current
                .as_ref()
                .map_or_else(Vec::new, |p| {
                    p.compiled.rule_names().map(str::to_owned).collect()
                })
                .into(),
        );
    }
    status
}

/// Routes one read-only admin request. The `POST` actions are served by [`handle`]; here they
/// only answer `405` to other methods.
pub fn route(state: &AdminState, method: &Method, path: &str) -> Response<Full<Bytes>> {
    const READ_ONLY: [&str; 5] = ["/healthz", "/ready", "/metrics", "/certs", "/policy"];
    if matches!(path, "/shutdown" | "/inspect") {
        return method_not_allowed("POST");
    }
    // An unknown path is 404 whatever the method: "no such endpoint" is not "wrong method".
    if READ_ONLY.contains(&path) && method != Method::GET && method != Method::HEAD {
        return method_not_allowed("GET, HEAD");
    }
    match path {
        "/healthz" => reply(StatusCode::OK, PLAIN, "ok\n"),
        "/ready" => {
            let now = SystemTime::now();
            if state.store.is_ready(now, state.expiry_margin) {
                match state.store.log_witness().alarm() {
                    // Still ready: the evidence is for operators, traffic is not affected.
                    Some(alarm) => reply(
                        StatusCode::OK,
                        PLAIN,
                        format!(
                            "ready\nwarning: transparency log alarm ({}): {}\n",
                            alarm.kind, alarm.message
                        ),
                    ),
                    None => reply(StatusCode::OK, PLAIN, "ready\n"),
                }
            } else if let Some(svid) = state.store.current() {
                let at = rfc3339(svid.not_after());
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
        "/certs" => {
            let mut certs = certs_json(&state.store);
            certs["source"] = state.source.clone();
            certs["transparency_log"] = state.store.log_witness().to_json();
            reply(StatusCode::OK, JSON, certs.to_string())
        }
        "/policy" => reply(StatusCode::OK, JSON, policy_json(&state.policy).to_string()),
        _ => reply(
            StatusCode::NOT_FOUND,
            PLAIN,
            "not found: try GET /healthz, /ready, /metrics, /certs, /policy; POST /shutdown, /inspect\n",
        ),
    }
}

/// Serves one admin request from `peer`: the `POST` actions (loopback peers only), else
/// [`route`]. The caller carries out the returned [`AdminAction`] once the response is sent.
pub async fn handle(
    state: &AdminState,
    method: &Method,
    uri: &Uri,
    peer: IpAddr,
) -> (Response<Full<Bytes>>, AdminAction) {
    let path = uri.path();
    let action = matches!(path, "/shutdown" | "/inspect") && method == Method::POST;
    if !action {
        return (route(state, method, path), AdminAction::None);
    }
    // The admin listener may be bound to a routable address; stopping the sidecar or
    // lending its identity is for someone on this host.
    if !is_loopback(peer) {
        tracing::warn!(%peer, path, "admin action refused: not a loopback peer");
        return (
            reply(
                StatusCode::FORBIDDEN,
                PLAIN,
                format!("forbidden: POST {path} is accepted from a loopback address only\n"),
            ),
            AdminAction::None,
        );
    }
    if path == "/shutdown" {
        tracing::info!(%peer, "shutdown requested on the admin endpoint");
        let mut resp = reply(
            StatusCode::ACCEPTED,
            PLAIN,
            "shutting down: draining, then exiting\n",
        );
        // HTTP/1.1 then closes the connection after the response, which tells the server
        // loop the 202 is out and the drain may begin.
        resp.headers_mut().insert(
            http::header::CONNECTION,
            http::HeaderValue::from_static("close"),
        );
        return (resp, AdminAction::Shutdown);
    }
    (inspect_route(state, uri.query()).await, AdminAction::None)
}

/// What `/inspect` was asked to do.
struct InspectQuery {
    target: Target,
    spiffe_id: Option<SpiffeId>,
    trust_domain: Option<TrustDomain>,
    tls12: bool,
    timeout: Option<Duration>,
}

/// Decodes `%XX` escapes (a SPIFFE ID in a query is sent escaped); `None` if malformed.
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn parse_inspect_query(query: Option<&str>) -> Result<InspectQuery, String> {
    let mut target = None;
    let (mut spiffe_id, mut trust_domain, mut tls12, mut timeout) = (None, None, false, None);
    for pair in query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let value = percent_decode(value).ok_or_else(|| format!("`{key}`: bad %-escape"))?;
        match key {
            "target" => target = Some(Target::parse(&value).map_err(|e| e.to_string())?),
            "spiffe_id" => {
                let id = SpiffeId::parse(&value).map_err(|e| format!("spiffe_id: {e}"))?;
                if id.path().is_empty() {
                    return Err(format!(
                        "spiffe_id `{id}` is a trust domain ID; use trust_domain for that"
                    ));
                }
                spiffe_id = Some(id);
            }
            "trust_domain" => {
                trust_domain =
                    Some(TrustDomain::parse(&value).map_err(|e| format!("trust_domain: {e}"))?);
            }
            "tls12" => {
                tls12 = match value.as_str() {
                    "true" | "1" | "" => true,
                    "false" | "0" => false,
                    _ => return Err(format!("tls12 `{value}`: use true or false")),
                }
            }
            "timeout" => {
                let t = humantime::parse_duration(&value)
                    .map_err(|e| format!("timeout `{value}`: {e}"))?;
                if t.is_zero() || t > MAX_INSPECT_TIMEOUT {
                    return Err(format!(
                        "timeout `{value}`: must be positive and at most {}s",
                        MAX_INSPECT_TIMEOUT.as_secs()
                    ));
                }
                timeout = Some(t);
            }
            _ => {
                return Err(format!(
                    "unknown parameter `{key}` (target, spiffe_id, trust_domain, tls12, timeout)"
                ))
            }
        }
    }
    Ok(InspectQuery {
        target: target.ok_or("missing `target=HOST:PORT`")?,
        spiffe_id,
        trust_domain,
        tls12,
        timeout,
    })
}

/// `POST /inspect`: one handshake with the sidecar's current SVID and bundle.
async fn inspect_route(state: &AdminState, query: Option<&str>) -> Response<Full<Bytes>> {
    let q = match parse_inspect_query(query) {
        Ok(q) => q,
        Err(e) => {
            return reply(
                StatusCode::BAD_REQUEST,
                PLAIN,
                format!("bad request: {e}\n"),
            )
        }
    };
    let bundle = state.store.bundle().load_full();
    let mut opts = match InspectOptions::new(bundle.roots().to_vec()) {
        Ok(opts) => opts,
        Err(e) => {
            return reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                PLAIN,
                format!("this sidecar's trust bundle cannot be used: {e}\n"),
            )
        }
    };
    opts = opts.tls12(q.tls12);
    if let Some(td) = q.trust_domain {
        opts = opts.trust_domain(td);
    }
    opts = opts.sidecar_trust_domain(state.store.trust_domain().clone());
    if let Some(id) = q.spiffe_id {
        opts = opts.expect(id);
    }
    if let Some(timeout) = q.timeout {
        opts = opts.timeout(timeout);
    }
    // Present the SVID the sidecar itself would present: none once it has expired.
    if let Some(svid) = state
        .store
        .current()
        .filter(|s| s.not_after() > SystemTime::now())
    {
        match ClientIdentity::from_svid(&svid) {
            Ok(identity) => opts = opts.client(identity),
            Err(e) => {
                return reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    PLAIN,
                    format!("this sidecar's SVID cannot be presented: {e}\n"),
                )
            }
        }
    }
    let report = inspect::inspect(&q.target, &opts).await;
    tracing::info!(target = %q.target, ok = report.ok, reason = ?report.reason, "admin inspect");
    match serde_json::to_vec_pretty(&report) {
        Ok(body) => reply(StatusCode::OK, JSON, body),
        Err(e) => reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            PLAIN,
            format!("cannot encode the report: {e}\n"),
        ),
    }
}

impl Routes for AdminState {
    async fn respond(
        &self,
        req: Request<Incoming>,
        peer: SocketAddr,
    ) -> (Response<Full<Bytes>>, AdminAction) {
        handle(self, req.method(), req.uri(), peer.ip()).await
    }
}

/// Serves admin requests on `listener` until `drain` signals, within `limits.admin` (and the
/// rapid-reset bounds of `limits.h2`). An accepted `POST /shutdown` sets `shutdown_request`
/// once its `202` has been sent (or `trellis_serve::http::SHUTDOWN_FLUSH` has passed).
pub async fn serve(
    listener: TcpListener,
    state: Arc<AdminState>,
    limits: &Limits,
    drain: Drain,
    shutdown_request: watch::Sender<bool>,
) {
    let events = listen::events(&state.metrics, Listener::Admin);
    let listener = accept::Listener::new(listener, "admin", limits.admin.max_connections, events);
    HttpServer::new(state, &limits.admin_server())
        .on_shutdown_request(shutdown_request)
        .serve(listener, drain)
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt as _;
    use trellis_identity::testca::TestCa;

    fn state_with(ca: &TestCa) -> AdminState {
        let metrics = Arc::new(SidecarMetrics::new());
        let store = SvidStore::new(ca.bundle(), None, Arc::clone(&metrics));
        AdminState {
            store,
            policy: PolicyEngine::allow_all(Arc::clone(&metrics)),
            metrics,
            expiry_margin: Duration::from_secs(60),
            source: serde_json::Value::Null,
        }
    }

    async fn body_text(resp: Response<Full<Bytes>>) -> String {
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    const LOCAL: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    #[test]
    fn ready_and_certs_follow_the_store() {
        let ca = TestCa::root("example.org");
        let state = state_with(&ca);
        let store = Arc::clone(&state.store);
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
        assert!(certs["svid"]["not_after"].as_u64().unwrap() > 0);
        let rfc = certs["svid"]["not_after_rfc3339"].as_str().unwrap();
        assert!(rfc.ends_with('Z') && rfc.contains('T'), "{rfc}");
        assert_eq!(certs["svid"]["expired"], false);
        assert_eq!(certs["bundle"].as_array().unwrap().len(), 1);
        assert!(certs["bundle"][0]["not_after_rfc3339"].is_string());
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
            source: serde_json::Value::Null,
        };
        let ready = route(&state, &Method::GET, "/ready");
        assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);
        let body = format!("{:?}", ready.body());
        assert!(body.contains("SVID expired at"), "{body}");
        assert_eq!(certs_json(&state.store)["svid"]["expired"], true);
    }

    #[test]
    fn policy_shows_what_is_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("policy.yaml");
        std::fs::write(
            &path,
            "apiVersion: trellis.io/v1\nkind: Policy\ndefaultAction: deny\nrules:\n  \
             - name: web\n    action: allow\n    from: [spiffe://example.org/web]\n",
        )
        .unwrap();
        let engine = PolicyEngine::load(&path, Arc::new(SidecarMetrics::new())).unwrap();
        let status = policy_json(&engine);
        assert_eq!(status["loaded"], true, "{status:#}");
        assert_eq!(status["rule_names"], serde_json::json!(["web"]));
        assert_eq!(status["default_action"], "deny");
        assert_eq!(status["mode"], "enforce");
        assert_eq!(status["hash"].as_str().map(str::len), Some(64));
        assert!(status["loaded_at_rfc3339"].as_str().unwrap().ends_with('Z'));
        assert!(status["last_error"].is_null());

        std::fs::write(&path, "rules: [oops").unwrap();
        assert!(engine.reload().is_err());
        let status = policy_json(&engine);
        assert_eq!(
            status["rule_names"],
            serde_json::json!(["web"]),
            "last good policy"
        );
        assert!(status["last_error"]
            .as_str()
            .unwrap()
            .contains("policy.yaml"));
        assert!(status["last_error_at_rfc3339"].is_string());

        let none = policy_json(&PolicyEngine::allow_all(Arc::new(SidecarMetrics::new())));
        assert_eq!(none["loaded"], false);
        assert_eq!(none["rule_names"], serde_json::json!([]));
    }

    #[tokio::test]
    async fn every_route_answers() {
        let ca = TestCa::root("example.org");
        let state = state_with(&ca);
        for (method, path, want) in [
            (Method::GET, "/healthz", StatusCode::OK),
            (Method::HEAD, "/healthz", StatusCode::OK),
            (Method::GET, "/ready", StatusCode::SERVICE_UNAVAILABLE),
            (Method::GET, "/metrics", StatusCode::OK),
            (Method::GET, "/certs", StatusCode::OK),
            (Method::GET, "/policy", StatusCode::OK),
            (Method::GET, "/nope", StatusCode::NOT_FOUND),
            (Method::POST, "/nope", StatusCode::NOT_FOUND),
            (Method::POST, "/metrics", StatusCode::METHOD_NOT_ALLOWED),
            (Method::DELETE, "/certs", StatusCode::METHOD_NOT_ALLOWED),
            (Method::GET, "/shutdown", StatusCode::METHOD_NOT_ALLOWED),
            (Method::PUT, "/shutdown", StatusCode::METHOD_NOT_ALLOWED),
            (Method::GET, "/inspect", StatusCode::METHOD_NOT_ALLOWED),
        ] {
            let uri: Uri = path.parse().unwrap();
            let (resp, action) = handle(&state, &method, &uri, LOCAL).await;
            assert_eq!(resp.status(), want, "{method} {path}");
            assert_eq!(action, AdminAction::None, "{method} {path}");
            if want == StatusCode::METHOD_NOT_ALLOWED {
                assert!(resp.headers().contains_key(http::header::ALLOW));
            }
        }
        let (resp, _) = handle(&state, &Method::GET, &"/shutdown".parse().unwrap(), LOCAL).await;
        assert_eq!(resp.headers()[http::header::ALLOW], "POST");
    }

    #[tokio::test]
    async fn shutdown_is_accepted_from_loopback_only() {
        let ca = TestCa::root("example.org");
        let state = state_with(&ca);
        let uri: Uri = "/shutdown".parse().unwrap();
        for peer in ["127.0.0.1", "127.8.9.10", "::1", "::ffff:127.0.0.1"] {
            let (resp, action) = handle(&state, &Method::POST, &uri, peer.parse().unwrap()).await;
            assert_eq!(resp.status(), StatusCode::ACCEPTED, "{peer}");
            assert_eq!(resp.headers()[http::header::CONNECTION], "close");
            assert_eq!(action, AdminAction::Shutdown, "{peer}");
        }
        for peer in [
            "10.0.0.7",
            "192.168.1.2",
            "::ffff:10.0.0.7",
            "2001:db8::1",
            "0.0.0.0",
        ] {
            let (resp, action) = handle(&state, &Method::POST, &uri, peer.parse().unwrap()).await;
            assert_eq!(resp.status(), StatusCode::FORBIDDEN, "{peer}");
            assert_eq!(action, AdminAction::None, "{peer}");
        }
        let inspect: Uri = "/inspect?target=127.0.0.1:1".parse().unwrap();
        let (resp, _) = handle(&state, &Method::POST, &inspect, "10.1.2.3".parse().unwrap()).await;
        assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    }

    #[tokio::test]
    async fn inspect_refuses_bad_queries() {
        let ca = TestCa::root("example.org");
        let state = state_with(&ca);
        for (query, needle) in [
            ("/inspect", "missing `target"),
            ("/inspect?target=nohost", "not HOST:PORT"),
            ("/inspect?target=127.0.0.1:1&spiffe_id=nope", "spiffe_id"),
            (
                "/inspect?target=127.0.0.1:1&spiffe_id=spiffe%3A%2F%2Fexample.org",
                "trust domain ID",
            ),
            ("/inspect?target=127.0.0.1:1&tls12=maybe", "tls12"),
            ("/inspect?target=127.0.0.1:1&timeout=1h", "at most"),
            (
                "/inspect?target=127.0.0.1:1&colour=red",
                "unknown parameter `colour`",
            ),
            ("/inspect?target=127.0.0.1:1&spiffe_id=%zz", "bad %-escape"),
        ] {
            let (resp, _) = handle(&state, &Method::POST, &query.parse().unwrap(), LOCAL).await;
            assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{query}");
            let body = body_text(resp).await;
            assert!(body.contains(needle), "{query}: {body}");
        }
    }

    #[tokio::test]
    async fn inspect_presents_the_sidecars_svid() {
        use trellis_identity::tls::{server_config, SpiffeClientVerifier, SvidResolver, TlsPolicy};
        let ca = TestCa::root("example.org");
        let state = state_with(&ca);
        state
            .store
            .install(ca.svid("/web"), ca.bundle(), SystemTime::now())
            .unwrap();
        // A server that requires a client certificate from the trust domain.
        let resolver = SvidResolver::empty();
        resolver.install(&ca.svid("/server")).unwrap();
        let verifier = SpiffeClientVerifier::new(state.store.bundle(), false);
        let config = server_config(resolver, verifier, TlsPolicy::Tls13, &[b"h2"]).unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut tls = acceptor.accept(tcp).await.unwrap();
            let id = trellis_identity::tls::peer_spiffe_id(tls.get_ref().1.peer_certificates())
                .map(|id| id.to_string());
            // Stay up until the inspector closes: closing first would read as a refusal.
            let mut buf = [0u8; 64];
            let _ = tokio::io::AsyncReadExt::read(&mut tls, &mut buf).await;
            id
        });
        let uri: Uri = format!(
            "/inspect?target={addr}&spiffe_id=spiffe%3A%2F%2Fexample.org%2Fserver&timeout=10s"
        )
        .parse()
        .unwrap();
        let (resp, _) = handle(&state, &Method::POST, &uri, LOCAL).await;
        assert_eq!(resp.status(), StatusCode::OK);
        let report: serde_json::Value = serde_json::from_str(&body_text(resp).await).unwrap();
        assert_eq!(report["ok"], true, "{report:#}");
        assert_eq!(report["peer_spiffe_id"], "spiffe://example.org/server");
        assert_eq!(
            report["client_cert"]["presented"],
            "spiffe://example.org/web"
        );
        assert_eq!(
            seen.await.unwrap().as_deref(),
            Some("spiffe://example.org/web")
        );
        assert!(!report.to_string().contains("PRIVATE"));
    }
}
