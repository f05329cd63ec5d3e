//! The admin HTTP endpoint: `GET /healthz`, `/ready`, `/metrics`, `/ca`, `/certs`, the
//! transparency log's `/log/*` ([`crate::translog::admin`]), and
//! `POST /shutdown` (from a loopback peer only: the listener may be bound to `0.0.0.0` by
//! config; answered `202`, then the control plane stops as on SIGTERM).
//!
//! HTTP/1.1 and HTTP/2 on `trellis-serve`'s admin-style server, within `limits.admin`; bound to
//! loopback by default; it never serves a key or a token.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use serde::Deserialize;
use tokio::sync::watch;

use arc_swap::{ArcSwap, ArcSwapOption};
use trellis_identity::{Svid, TrustBundle};
use trellis_serve::config::{at_least_one, bytes_within, deadline, within, ConfigError};
use trellis_serve::http::{HttpServer, Routes, ServerLimits};
use trellis_serve::net::is_loopback;
use trellis_serve::time::{rfc3339, unix_seconds};
use trellis_serve::{accept, Drain};

use crate::authority::CaStatus;
use crate::metrics::{ControlMetrics, CONTENT_TYPE};

const PLAIN: &str = "text/plain; charset=utf-8";

/// What one admin request asks of the process beyond its response (`trellis-serve`'s, shared
/// with the sidecar's admin endpoint).
pub use trellis_serve::http::AdminAction;

/// Defaults of `limits.admin`.
pub mod defaults {
    use std::time::Duration;
    /// `--admin-max-connections`: the admin port serves a scraper, probes and an operator.
    pub const MAX_CONNECTIONS: usize = 64;
    /// `--admin-header-read-timeout`: slower clients (slowloris) are disconnected.
    pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
    /// `--admin-max-header-bytes`: longer HTTP/1.1 heads get `431`.
    pub const MAX_HEADER_BYTES: usize = 16 * 1024;
    /// `--admin-idle-timeout`: a scraper polls every few seconds; nothing needs an idle hour.
    pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
    /// `--admin-max-streams-per-connection`: a scraper or an operator needs one or two.
    pub const MAX_STREAMS_PER_CONNECTION: u32 = 16;
    /// `--admin-max-pending-resets`: as on SDS connections.
    pub const MAX_PENDING_RESETS: usize = 20;
}

/// `limits.admin` in the file.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminLimitsFile {
    /// Most admin connections open at once.
    pub max_connections: Option<usize>,
    /// How long an admin client may take to send its request head, e.g. `10s`.
    #[serde(default, with = "humantime_serde")]
    pub header_read_timeout: Option<Duration>,
    /// Largest admin request head (HTTP/1.1) or header list (HTTP/2), in bytes.
    pub max_header_bytes: Option<usize>,
    /// How long an admin connection may move no bytes before it is closed, e.g. `60s`.
    #[serde(default, with = "humantime_serde")]
    pub idle_timeout: Option<Duration>,
    /// Concurrent HTTP/2 streams on one admin connection.
    pub max_streams_per_connection: Option<u32>,
    /// Streams an admin client may reset before the server accepts them (HTTP/2 rapid reset).
    pub max_pending_resets: Option<usize>,
}

/// What admin clients may hold (`limits.admin`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdminLimits {
    /// Most connections; more are closed on accept.
    pub max_connections: usize,
    /// Per connection: protocol detection and request head deadline, head and header-list
    /// size, idle close, HTTP/2 streams and rapid-reset bound.
    pub server: ServerLimits,
}

impl Default for AdminLimits {
    fn default() -> Self {
        Self {
            max_connections: defaults::MAX_CONNECTIONS,
            server: ServerLimits {
                header_read_timeout: defaults::HEADER_READ_TIMEOUT,
                max_header_bytes: defaults::MAX_HEADER_BYTES,
                max_headers: None,
                idle_timeout: Some(defaults::IDLE_TIMEOUT),
                max_streams_per_connection: defaults::MAX_STREAMS_PER_CONNECTION,
                max_pending_resets: defaults::MAX_PENDING_RESETS,
                max_local_error_resets: None,
            },
        }
    }
}

impl AdminLimits {
    /// Applies `f` over the defaults and checks ranges; errors name `limits.admin.*`.
    pub fn from_file(f: &AdminLimitsFile) -> Result<Self, ConfigError> {
        let d = Self::default();
        Ok(Self {
            max_connections: at_least_one(
                "limits.admin.max_connections",
                f.max_connections,
                d.max_connections,
            )?,
            server: ServerLimits {
                header_read_timeout: deadline(
                    "limits.admin.header_read_timeout",
                    f.header_read_timeout,
                    defaults::HEADER_READ_TIMEOUT,
                    Duration::from_millis(100),
                )?,
                max_header_bytes: bytes_within(
                    "limits.admin.max_header_bytes",
                    f.max_header_bytes,
                    defaults::MAX_HEADER_BYTES,
                    (8 * 1024, 1024 * 1024),
                    "the HTTP/1.1 read buffer cannot be smaller than 8 KiB",
                )?,
                idle_timeout: Some(deadline(
                    "limits.admin.idle_timeout",
                    f.idle_timeout,
                    defaults::IDLE_TIMEOUT,
                    Duration::from_millis(100),
                )?),
                max_streams_per_connection: within(
                    "limits.admin.max_streams_per_connection",
                    f.max_streams_per_connection,
                    defaults::MAX_STREAMS_PER_CONNECTION,
                    1,
                    1024,
                )?,
                max_pending_resets: within(
                    "limits.admin.max_pending_resets",
                    f.max_pending_resets,
                    defaults::MAX_PENDING_RESETS,
                    1,
                    10_000,
                )?,
                ..d.server
            },
        })
    }
}

/// Public facts of the control plane's own serving SVID, for `/certs`. Holds no key, so
/// `/certs` cannot leak one.
#[derive(Debug, Clone)]
pub struct ServingSvid {
    /// `spiffe://<td>/trellis/control`.
    pub spiffe_id: String,
    /// Serial, lowercase hex.
    pub serial: String,
    /// notBefore.
    pub not_before: SystemTime,
    /// notAfter.
    pub not_after: SystemTime,
    /// The signing CA's subject.
    pub issuer: Option<String>,
    /// Certificates in the chain it presents.
    pub chain_length: usize,
}

impl ServingSvid {
    /// The facts of `svid`, leaving its key behind.
    pub fn of(svid: &Svid) -> Self {
        ServingSvid {
            spiffe_id: svid.spiffe_id().to_string(),
            serial: svid.serial_hex().to_owned(),
            not_before: svid.not_before(),
            not_after: svid.not_after(),
            issuer: svid
                .chain()
                .first()
                .and_then(|c| trellis_identity::cert_facts(c).ok())
                .map(|f| f.issuer),
            chain_length: svid.chain().len(),
        }
    }
}

/// What the admin endpoint reports on.
pub struct AdminState {
    /// The CAs of the trust domain and their rotation phase (`/ca`).
    pub ca: Arc<ArcSwap<Vec<CaStatus>>>,
    /// Prometheus metrics.
    pub metrics: Arc<ControlMetrics>,
    /// True once the SDS listener serves with a CA and the control plane's own SVID.
    pub ready: AtomicBool,
    /// The control plane's own serving SVID (`/certs`).
    pub serving: Arc<ArcSwapOption<ServingSvid>>,
    /// The trust bundle in force (`/certs`).
    pub bundle: Arc<ArcSwap<TrustBundle>>,
    /// The issuance transparency log (`/log/*`).
    pub log: Option<Arc<crate::translog::IssuanceLog>>,
    /// The state database's health (`/ready` names an outage).
    pub database: Arc<crate::db_health::DbHealth>,
    /// Our bundle's sequence and each federated trust domain (`/bundles`).
    pub bundles: Arc<ArcSwap<crate::federation::BundlesReport>>,
}

fn text(
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
    let mut resp = text(
        StatusCode::METHOD_NOT_ALLOWED,
        PLAIN,
        format!("method not allowed: use {allow}\n"),
    );
    resp.headers_mut()
        .insert(http::header::ALLOW, http::HeaderValue::from_static(allow));
    resp
}

/// `/certs`: the serving SVID's ID, serial and validity (unix seconds and RFC 3339), and the
/// bundle's CAs with their expiry. Certificate facts only: there is no key to leak.
pub fn certs_json(state: &AdminState) -> serde_json::Value {
    let now = SystemTime::now();
    let svid = state.serving.load_full().map(|s| {
        serde_json::json!({
            "spiffe_id": s.spiffe_id,
            "serial": s.serial,
            "not_before": unix_seconds(s.not_before),
            "not_after": unix_seconds(s.not_after),
            "not_before_rfc3339": rfc3339(s.not_before),
            "not_after_rfc3339": rfc3339(s.not_after),
            "expires_in_seconds": s.not_after.duration_since(now).map_or(0, |d| d.as_secs()),
            "expired": s.not_after <= now,
            "chain_length": s.chain_length,
            "issuer": s.issuer,
        })
    });
    let bundle = state.bundle.load_full();
    let cas = bundle.summary();
    serde_json::json!({
        "trust_domain": bundle.trust_domain().as_str(),
        "svid": svid,
        "bundle": cas,
    })
}

/// Routes one read-only admin request. `POST /shutdown` is served by [`handle`]; here it only
/// answers `405` to other methods.
pub fn route(state: &AdminState, method: &Method, path: &str) -> Response<Full<Bytes>> {
    const READ_ONLY: [&str; 6] = [
        "/healthz", "/ready", "/metrics", "/ca", "/certs", "/bundles",
    ];
    if path == "/shutdown" {
        return method_not_allowed("POST");
    }
    // An unknown path is 404 whatever the method, so a client can tell "no such endpoint here"
    // (e.g. `/inspect`, which only sidecars have) from "wrong method".
    if READ_ONLY.contains(&path) && method != Method::GET && method != Method::HEAD {
        return method_not_allowed("GET, HEAD");
    }
    match path {
        "/healthz" => text(StatusCode::OK, PLAIN, "ok\n"),
        // Still ready while the database is away (see `db_health`), but saying so.
        "/ready" if state.ready.load(Ordering::Acquire) => match state.database.describe() {
            None => text(StatusCode::OK, PLAIN, "ready\n"),
            Some(why) => text(
                StatusCode::OK,
                PLAIN,
                format!("ready (degraded): join tokens cannot be redeemed; running workloads keep rotating\n{why}\n"),
            ),
        },
        "/ready" => text(
            StatusCode::SERVICE_UNAVAILABLE,
            PLAIN,
            "not ready: the SDS listener has no serving SVID yet\n",
        ),
        "/metrics" => text(StatusCode::OK, CONTENT_TYPE, state.metrics.encode()),
        "/ca" => {
            match serde_json::to_vec_pretty(&serde_json::json!({ "cas": **state.ca.load() })) {
                Ok(body) => text(StatusCode::OK, "application/json", body),
                Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, PLAIN, format!("{e}\n")),
            }
        }
        "/certs" => text(
            StatusCode::OK,
            "application/json",
            certs_json(state).to_string(),
        ),
        "/bundles" => match serde_json::to_vec_pretty(&**state.bundles.load()) {
            Ok(body) => text(StatusCode::OK, "application/json", body),
            Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, PLAIN, format!("{e}\n")),
        },
        _ => text(
            StatusCode::NOT_FOUND,
            PLAIN,
            "not found: try GET /healthz, /ready, /metrics, /ca, /certs, /bundles, /log/sth; POST /shutdown\n",
        ),
    }
}

/// Serves one admin request from `peer`: `POST /shutdown` (loopback peers only), else
/// [`route`]. The caller carries out the returned [`AdminAction`] once the response is sent.
pub fn handle(
    state: &AdminState,
    method: &Method,
    path: &str,
    peer: IpAddr,
) -> (Response<Full<Bytes>>, AdminAction) {
    if path != "/shutdown" || method != Method::POST {
        return (route(state, method, path), AdminAction::None);
    }
    if !is_loopback(peer) {
        tracing::warn!(%peer, "admin shutdown refused: not a loopback peer");
        return (
            text(
                StatusCode::FORBIDDEN,
                PLAIN,
                "forbidden: POST /shutdown is accepted from a loopback address only\n",
            ),
            AdminAction::None,
        );
    }
    tracing::info!(%peer, "shutdown requested on the admin endpoint");
    let mut resp = text(StatusCode::ACCEPTED, PLAIN, "shutting down\n");
    // HTTP/1.1 then closes the connection after the response, which tells the server loop
    // the 202 is out and the shutdown may begin.
    resp.headers_mut().insert(
        http::header::CONNECTION,
        http::HeaderValue::from_static("close"),
    );
    (resp, AdminAction::Shutdown)
}

impl Routes for AdminState {
    async fn respond(
        &self,
        req: Request<Incoming>,
        peer: SocketAddr,
    ) -> (Response<Full<Bytes>>, AdminAction) {
        let path = req.uri().path();
        if let (Some(log), true) = (&self.log, path.starts_with("/log/")) {
            if req.method() != Method::GET && req.method() != Method::HEAD {
                return (method_not_allowed("GET, HEAD"), AdminAction::None);
            }
            let query = req.uri().query().unwrap_or("");
            return (
                crate::translog::admin::respond(log, path, query).await,
                AdminAction::None,
            );
        }
        handle(self, req.method(), path, peer.ip())
    }
}

/// Serves admin requests on `listener` until `drain` signals, within `limits`. An accepted
/// `POST /shutdown` sets `shutdown_request` once its `202` has been sent (or
/// `trellis_serve::http::SHUTDOWN_FLUSH` has passed).
pub async fn serve(
    listener: tokio::net::TcpListener,
    limits: AdminLimits,
    state: Arc<AdminState>,
    drain: Drain,
    shutdown_request: watch::Sender<bool>,
) {
    // Over `limits.admin.max_connections` the socket is closed at once.
    let events = state.metrics.listener_events("admin");
    let listener = accept::Listener::new(listener, "admin", limits.max_connections, events);
    HttpServer::new(state, &limits.server)
        .on_shutdown_request(shutdown_request)
        .serve(listener, drain)
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_identity::{SpiffeId, TrustDomain};

    fn state() -> AdminState {
        let td = TrustDomain::parse("example.org").unwrap();
        let material = crate::ca::Ca::new_root(&td, SystemTime::now()).unwrap();
        let ca =
            crate::ca::Ca::from_material(&td, &material, std::path::Path::new("test")).unwrap();
        let svid = ca
            .issue(
                &SpiffeId::parse("spiffe://example.org/trellis/control").unwrap(),
                Duration::from_secs(3600),
                SystemTime::now(),
            )
            .unwrap();
        let metrics = Arc::new(ControlMetrics::new());
        AdminState {
            log: None,
            ca: Arc::new(ArcSwap::from_pointee(Vec::new())),
            database: crate::db_health::DbHealth::new(Arc::clone(&metrics)),
            metrics,
            ready: AtomicBool::new(false),
            serving: Arc::new(ArcSwapOption::from_pointee(ServingSvid::of(&svid))),
            bundle: Arc::new(ArcSwap::from_pointee(ca.bundle().clone())),
            bundles: Arc::default(),
        }
    }

    const LOCAL: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    #[test]
    fn ready_follows_state() {
        let state = state();
        assert_eq!(
            route(&state, &Method::GET, "/ready").status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        state.ready.store(true, Ordering::Release);
        assert_eq!(
            route(&state, &Method::GET, "/ready").status(),
            StatusCode::OK
        );
        // A database outage keeps the replica ready (every replica shares the database) but
        // says what is wrong.
        state.database.failed(
            crate::db_health::DbOp::Read,
            &crate::registry::RegistryError::Unavailable {
                target: "postgres://db".into(),
            },
        );
        let resp = route(&state, &Method::GET, "/ready");
        assert_eq!(resp.status(), StatusCode::OK);
        let body = futures_body(resp);
        assert!(body.starts_with("ready (degraded)"), "{body}");
        assert!(
            body.contains("state database reads failing since"),
            "{body}"
        );
    }

    fn futures_body(resp: Response<Full<Bytes>>) -> String {
        use http_body_util::BodyExt as _;
        let bytes = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(resp.into_body().collect())
            .unwrap()
            .to_bytes();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    #[test]
    fn every_route_answers() {
        let state = state();
        for (method, path, want) in [
            (Method::GET, "/healthz", StatusCode::OK),
            (Method::HEAD, "/healthz", StatusCode::OK),
            (Method::GET, "/metrics", StatusCode::OK),
            (Method::GET, "/ca", StatusCode::OK),
            (Method::GET, "/certs", StatusCode::OK),
            (Method::GET, "/bundles", StatusCode::OK),
            (Method::GET, "/nope", StatusCode::NOT_FOUND),
            (Method::POST, "/inspect", StatusCode::NOT_FOUND),
            (Method::POST, "/metrics", StatusCode::METHOD_NOT_ALLOWED),
            (Method::DELETE, "/ca", StatusCode::METHOD_NOT_ALLOWED),
            (Method::GET, "/shutdown", StatusCode::METHOD_NOT_ALLOWED),
            (Method::PUT, "/shutdown", StatusCode::METHOD_NOT_ALLOWED),
        ] {
            let (resp, action) = handle(&state, &method, path, LOCAL);
            assert_eq!(resp.status(), want, "{method} {path}");
            assert_eq!(action, AdminAction::None, "{method} {path}");
            if want == StatusCode::METHOD_NOT_ALLOWED {
                assert!(resp.headers().contains_key(http::header::ALLOW));
            }
        }
        let (resp, _) = handle(&state, &Method::GET, "/shutdown", LOCAL);
        assert_eq!(resp.headers()[http::header::ALLOW], "POST");
    }

    #[test]
    fn shutdown_is_accepted_from_loopback_only() {
        let state = state();
        for peer in ["127.0.0.1", "127.0.0.53", "::1", "::ffff:127.0.0.1"] {
            let (resp, action) = handle(&state, &Method::POST, "/shutdown", peer.parse().unwrap());
            assert_eq!(resp.status(), StatusCode::ACCEPTED, "{peer}");
            assert_eq!(action, AdminAction::Shutdown, "{peer}");
        }
        for peer in ["10.0.0.7", "::ffff:192.168.0.1", "fe80::1", "0.0.0.0"] {
            let (resp, action) = handle(&state, &Method::POST, "/shutdown", peer.parse().unwrap());
            assert_eq!(resp.status(), StatusCode::FORBIDDEN, "{peer}");
            assert_eq!(action, AdminAction::None, "{peer}");
        }
    }

    #[test]
    fn certs_show_the_serving_svid_and_bundle_never_a_key() {
        let state = state();
        let certs = certs_json(&state);
        assert_eq!(
            certs["svid"]["spiffe_id"],
            "spiffe://example.org/trellis/control"
        );
        assert!(certs["svid"]["serial"]
            .as_str()
            .is_some_and(|s| !s.is_empty()));
        assert!(certs["svid"]["not_after"].as_u64().unwrap() > 0);
        assert!(certs["svid"]["not_after_rfc3339"]
            .as_str()
            .unwrap()
            .ends_with('Z'));
        assert_eq!(certs["trust_domain"], "example.org");
        let bundle = certs["bundle"].as_array().unwrap();
        assert_eq!(bundle.len(), 1);
        assert_eq!(bundle[0]["spiffe_id"], "spiffe://example.org");
        assert!(bundle[0]["not_after_rfc3339"].is_string());
        assert!(!certs.to_string().contains("PRIVATE"));
    }
}
