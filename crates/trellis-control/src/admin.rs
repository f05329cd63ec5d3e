//! The admin HTTP endpoint: `GET /healthz`, `/ready`, `/metrics`, `/ca`, `/certs`, and
//! `POST /shutdown` (from a loopback peer only: the listener may be bound to `0.0.0.0` by
//! config; answered `202`, then the control plane stops as on SIGTERM).
//!
//! Plain HTTP/1.1 bound to loopback by default; it never serves a key or a token.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};

use arc_swap::{ArcSwap, ArcSwapOption};
use trellis_identity::{Svid, TrustBundle};

use crate::authority::CaStatus;
use crate::metrics::{ControlMetrics, CONTENT_TYPE};

const PLAIN: &str = "text/plain; charset=utf-8";
/// After a `202` to `/shutdown`, how long the response may take to reach the caller before
/// the shutdown starts anyway (HTTP/1.1 closes at once; an HTTP/2 client may linger).
const SHUTDOWN_FLUSH: Duration = Duration::from_secs(1);
/// After an idle connection's graceful close began (HTTP/2: GOAWAY), how long the peer has to
/// finish it before the connection is dropped: h2 waits for the peer's PING ACK.
const IDLE_CLOSE_GRACE: Duration = Duration::from_secs(5);
/// The HTTP/2 connection preface (RFC 9113 3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What one admin connection may hold (the `admin_*` settings).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdminLimits {
    /// The client must send enough to tell HTTP/1 from HTTP/2, then (HTTP/1.1) its whole
    /// request head, within this; slower clients (slowloris) are disconnected.
    pub header_read_timeout: Duration,
    /// Largest HTTP/1.1 request head (and read buffer; longer heads get `431`) and largest
    /// HTTP/2 header list.
    pub max_header_bytes: usize,
    /// A connection that moves no byte either way for this long is closed (HTTP/2: GOAWAY).
    pub idle_timeout: Duration,
    /// Concurrent HTTP/2 streams per connection.
    pub max_streams_per_connection: u32,
    /// HTTP/2 streams a client may reset before they are accepted (rapid reset).
    pub max_pending_resets: usize,
}

impl From<&crate::config::ListenerLimits> for AdminLimits {
    fn from(l: &crate::config::ListenerLimits) -> Self {
        Self {
            header_read_timeout: l.admin_header_read_timeout,
            max_header_bytes: l.admin_max_header_bytes,
            idle_timeout: l.admin_idle_timeout,
            max_streams_per_connection: l.admin_max_streams_per_connection,
            max_pending_resets: l.admin_max_pending_resets,
        }
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
}

/// What one admin request asks of the process beyond its response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminAction {
    /// Nothing.
    None,
    /// `POST /shutdown` was accepted: stop once the `202` is out.
    Shutdown,
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

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// True for 127.0.0.0/8 and ::1, and for 127.0.0.0/8 mapped into IPv6.
pub fn is_loopback(peer: IpAddr) -> bool {
    peer.to_canonical().is_loopback()
}

/// `/certs`: the serving SVID's ID, serial and validity (unix seconds and RFC 3339), and the
/// bundle's CAs with their expiry. Certificate facts only: there is no key to leak.
pub fn certs_json(state: &AdminState) -> serde_json::Value {
    let now = SystemTime::now();
    let svid = state.serving.load_full().map(|s| {
        serde_json::json!({
            "spiffe_id": s.spiffe_id,
            "serial": s.serial,
            "not_before": unix(s.not_before),
            "not_after": unix(s.not_after),
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
    const READ_ONLY: [&str; 5] = ["/healthz", "/ready", "/metrics", "/ca", "/certs"];
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
        "/ready" if state.ready.load(Ordering::Acquire) => text(StatusCode::OK, PLAIN, "ready\n"),
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
        _ => text(
            StatusCode::NOT_FOUND,
            PLAIN,
            "not found: try GET /healthz, /ready, /metrics, /ca, /certs; POST /shutdown\n",
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

/// Serves admin requests on `listener` until `shutdown` flips. An accepted `POST /shutdown`
/// sets `shutdown_request` once its `202` has been sent (or [`SHUTDOWN_FLUSH`] has passed).
pub async fn serve(
    listener: TcpListener,
    cap: crate::ratelimit::ConnectionCap,
    limits: AdminLimits,
    state: Arc<AdminState>,
    mut shutdown: watch::Receiver<bool>,
    shutdown_request: watch::Sender<bool>,
) {
    let shutdown_request = Arc::new(shutdown_request);
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        // Over `--admin-max-connections` the socket is closed at once.
        let Some(permit) = cap.admit(peer) else {
            drop(tcp);
            continue;
        };
        let state = Arc::clone(&state);
        let shutdown_request = Arc::clone(&shutdown_request);
        tokio::spawn(async move {
            serve_connection(tcp, peer, limits, state, shutdown_request).await;
            drop(permit);
        });
    }
}

async fn serve_connection(
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    limits: AdminLimits,
    state: Arc<AdminState>,
    shutdown_request: Arc<watch::Sender<bool>>,
) {
    let requested = Arc::new(AtomicBool::new(false));
    let notify = Arc::new(Notify::new());
    let svc = {
        let (requested, notify) = (Arc::clone(&requested), Arc::clone(&notify));
        hyper::service::service_fn(move |req: Request<Incoming>| {
            let (resp, action) = handle(&state, req.method(), req.uri().path(), peer.ip());
            if action == AdminAction::Shutdown {
                requested.store(true, Ordering::Release);
                notify.notify_one();
            }
            async move { Ok::<_, Infallible>(resp) }
        })
    };
    // hyper's protocol detection waits for the first bytes without a deadline, and HTTP/1's
    // header timeout only starts after it: bound the wait for the version here.
    if !version_readable(&tcp, limits.header_read_timeout).await {
        tracing::debug!(%peer, "admin client sent no request in time; closing");
        return;
    }
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes);
    builder
        .http2()
        .timer(hyper_util::rt::TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .max_concurrent_streams(limits.max_streams_per_connection)
        .max_pending_accept_reset_streams(Some(limits.max_pending_resets));
    // Neither hyper's HTTP/1.1 nor its HTTP/2 server closes a connection that simply stays
    // quiet after a request: the idle clock does, for both.
    let clock = IdleClock::new();
    let io = TokioIo::new(Tracked {
        inner: tcp,
        clock: Arc::clone(&clock),
    });
    let conn = builder.serve_connection(io, svc);
    tokio::pin!(conn);
    let ended = tokio::select! {
        result = conn.as_mut() => Some(result),
        () = notify.notified() => None,
        () = clock.expired(limits.idle_timeout) => {
            tracing::debug!(%peer, "idle admin connection closed");
            conn.as_mut().graceful_shutdown();
            Some(
                tokio::time::timeout(IDLE_CLOSE_GRACE, conn.as_mut())
                    .await
                    .unwrap_or(Ok(())),
            )
        }
    };
    let result = match ended {
        Some(result) => Some(result),
        // The 202 is on its way and the connection closes after it; bounded, so a client
        // that keeps an HTTP/2 connection open cannot hold the shutdown back.
        None => tokio::time::timeout(SHUTDOWN_FLUSH, conn.as_mut())
            .await
            .ok(),
    };
    if let Some(Err(e)) = result {
        tracing::debug!(error = %e, "admin connection ended with error");
    }
    if requested.load(Ordering::Acquire) {
        shutdown_request.send_replace(true);
    }
}

/// Waits (at most `timeout`) until enough bytes have arrived to tell HTTP/1 from the HTTP/2
/// preface, without consuming them. `false`: the client was too slow or went away.
async fn version_readable(tcp: &tokio::net::TcpStream, timeout: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut buf = [0u8; 24];
    loop {
        let n = match tokio::time::timeout_at(deadline, tcp.peek(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return false,
            Ok(Ok(n)) => n,
        };
        // Decided once the bytes stop matching the preface, or the whole preface is there.
        if n >= H2_PREFACE.len() || buf.get(..n) != H2_PREFACE.get(..n) {
            return true;
        }
        // `peek` returns at once while bytes wait; sleep a little before looking again.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// When a connection last moved a byte, for the idle timeout: one relaxed store per read or
/// write, and one timer per `timeout` rather than one reset per I/O.
struct IdleClock {
    base: std::time::Instant,
    /// Milliseconds since `base`.
    last: AtomicU64,
}

impl IdleClock {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            base: std::time::Instant::now(),
            last: AtomicU64::new(0),
        })
    }

    fn touch(&self) {
        let now = u64::try_from(self.base.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(now, Ordering::Relaxed);
    }

    /// Completes once no byte has moved for `timeout`.
    async fn expired(&self, timeout: Duration) {
        loop {
            let last = self.base + Duration::from_millis(self.last.load(Ordering::Relaxed));
            let deadline = last + timeout;
            if std::time::Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline.into()).await;
        }
    }
}

/// A TCP stream that records its activity in an [`IdleClock`].
struct Tracked {
    inner: tokio::net::TcpStream,
    clock: Arc<IdleClock>,
}

impl AsyncRead for Tracked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.clock.touch();
        }
        polled
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.clock.touch();
        }
        polled
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
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
        AdminState {
            ca: Arc::new(ArcSwap::from_pointee(Vec::new())),
            metrics: Arc::new(ControlMetrics::new()),
            ready: AtomicBool::new(false),
            serving: Arc::new(ArcSwapOption::from_pointee(ServingSvid::of(&svid))),
            bundle: Arc::new(ArcSwap::from_pointee(ca.bundle().clone())),
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
