//! Connection pools on the data path.
//!
//! - [`AppPool`]: plain HTTP/1.1 keep-alive connections from the inbound proxy to the local
//!   app. Idle connections are reused newest-first; a connection goes back to the pool when
//!   the response body has been read to its end ([`PooledBody`]), with no task per request.
//! - [`PeerPool`]: the outbound proxy's connections to one upstream sidecar: ONE HTTP/2
//!   connection over mTLS, every app request multiplexed on it, replaced when it dies. Opening
//!   it is single-flight: concurrent requests wait for one attempt and share its outcome.
//!   A peer that does not offer `h2` in ALPN gets pooled HTTP/1.1 connections instead.
//! - [`PeerTarget`]: dialing a peer: TCP, mTLS with the identity check inside the handshake,
//!   the re-check of a resumed session, and the errors the app will read.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use rustls::client::ClientSessionMemoryCache;
use rustls::pki_types::ServerName;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use trellis_identity::tls::{
    handshake_failure_reason, negotiated_group, svid_error_of, SharedBundle,
};
use trellis_identity::{SpiffeId, SvidError};

use crate::config::Limits;
use crate::http_util::{connect_tcp, tls_error, H2Body, Prefixed, ProxyBody, ReqBody, TcpTarget};
use crate::metrics::{Direction, SidecarMetrics};
use crate::mtls;
use crate::svid_store::SvidStore;

/// HTTP/2 stream receive window (both directions between sidecars). Large enough that a
/// loopback or LAN hop streams at full speed; it bounds memory per stream, not per connection.
pub const H2_STREAM_WINDOW: u32 = 1 << 20;
/// HTTP/2 connection receive window: a few streams' worth, since every app request of an
/// upstream shares one connection.
pub const H2_CONNECTION_WINDOW: u32 = 4 << 20;
/// Most bytes hyper buffers per stream on the sending side.
pub const H2_MAX_SEND_BUF: usize = 400 << 10;
/// Idle HTTP/1.1 connections kept per pool.
pub const MAX_IDLE_HTTP1: usize = 256;
/// An idle HTTP/1.1 connection older than this is closed instead of reused: apps close idle
/// keep-alive connections on their own timers (Node.js after 5 s), and a request written into
/// a connection the app is closing fails without a safe way to retry it.
pub const HTTP1_REUSE_WITHIN: Duration = Duration::from_secs(4);
/// Longest a new HTTP/2 connection waits for the server's first frame before it is used. A
/// server that refused our certificate (or a resumed session) closes instead of sending
/// SETTINGS; reading first turns that into a handshake error instead of a failed request.
const SERVER_PREFACE_WAIT: Duration = Duration::from_secs(2);

/// Why a request could not be forwarded. `status()` is what the caller gets; the message is the
/// one-line body.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ForwardError {
    /// TCP connect refused, unreachable or timed out.
    #[error("{target} is unreachable: {detail}")]
    Unreachable {
        /// `upstream `b` (10.0.0.7:15443)` or `app 127.0.0.1:8080`.
        target: Arc<str>,
        /// The connect error.
        detail: String,
    },
    /// The TLS handshake failed (other than the identity check).
    #[error("TLS handshake with {target} failed ({reason}): {detail}")]
    Handshake {
        /// Which upstream.
        target: Arc<str>,
        /// The `tls_handshakes_total` reason label.
        reason: &'static str,
        /// What rustls or the verifier said.
        detail: String,
    },
    /// The peer's certificate verified but carries another SPIFFE ID than configured.
    #[error("{target}: peer presented {presented}, expected {expected}")]
    WrongIdentity {
        /// Which upstream.
        target: Arc<str>,
        /// The configured `identity`.
        expected: String,
        /// What the peer's certificate says.
        presented: String,
    },
    /// HTTP failed on an established connection.
    #[error("{target} failed: {detail}")]
    Failed {
        /// Which upstream.
        target: Arc<str>,
        /// hyper's error.
        detail: String,
    },
    /// This sidecar has no SVID yet (it has just started and the control plane has not
    /// answered), so it cannot authenticate to the peer.
    #[error("cannot connect to {target}: this sidecar has no SVID yet (waited {}); is the control plane reachable?", humantime::format_duration(*.waited))]
    NoSvid {
        /// Which upstream.
        target: Arc<str>,
        /// How long the request waited for one.
        waited: Duration,
    },
    /// No response headers within the request timeout.
    #[error("{target} sent no response headers within {}", humantime::format_duration(*.timeout))]
    Timeout {
        /// Which upstream.
        target: Arc<str>,
        /// The configured `request_timeout`.
        timeout: Duration,
    },
}

impl ForwardError {
    /// 503 unreachable or no SVID yet, 502 handshake/identity/HTTP failure, 504 timeout.
    pub fn status(&self) -> StatusCode {
        match self {
            ForwardError::Unreachable { .. } | ForwardError::NoSvid { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ForwardError::Handshake { .. }
            | ForwardError::WrongIdentity { .. }
            | ForwardError::Failed { .. } => StatusCode::BAD_GATEWAY,
            ForwardError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
        }
    }
}

fn failed(target: &Arc<str>, e: impl std::fmt::Display) -> ForwardError {
    ForwardError::Failed {
        target: target.clone(),
        detail: e.to_string(),
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP/1.1 idle list and the body that returns a connection to it.

struct IdleConn {
    sender: http1::SendRequest<ReqBody>,
    since: Instant,
}

/// Idle HTTP/1.1 connections, newest at the back.
pub(crate) struct Http1Idle {
    list: Mutex<VecDeque<IdleConn>>,
}

impl Http1Idle {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            list: Mutex::new(VecDeque::new()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<IdleConn>> {
        // Nothing panics while holding the lock; recover the list if something ever did.
        self.list
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The newest idle connection that is still open and fresh enough to reuse.
    fn checkout(&self) -> Option<http1::SendRequest<ReqBody>> {
        let now = Instant::now();
        let mut list = self.lock();
        while let Some(idle) = list.pop_back() {
            if idle.sender.is_closed() {
                continue;
            }
            if now.saturating_duration_since(idle.since) > HTTP1_REUSE_WITHIN {
                // Everything in front of it is older still.
                list.clear();
                return None;
            }
            return Some(idle.sender);
        }
        None
    }

    fn checkin(&self, sender: http1::SendRequest<ReqBody>) {
        if sender.is_closed() {
            return;
        }
        let idle = IdleConn {
            sender,
            since: Instant::now(),
        };
        let mut list = self.lock();
        if list.len() >= MAX_IDLE_HTTP1 {
            list.pop_front();
        }
        list.push_back(idle);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().len()
    }
}

/// A response body from a pooled HTTP/1.1 connection. When the body has been read to its end,
/// the connection goes back to the idle list; if it is dropped early the connection closes.
pub struct PooledBody {
    inner: Incoming,
    release: Option<(http1::SendRequest<ReqBody>, Arc<Http1Idle>)>,
}

impl std::fmt::Debug for PooledBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PooledBody")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl PooledBody {
    fn new(inner: Incoming, sender: http1::SendRequest<ReqBody>, idle: Arc<Http1Idle>) -> Self {
        let mut body = Self {
            inner,
            release: Some((sender, idle)),
        };
        // hyper never polls a body that is already at its end (HEAD, 204, 304, length 0).
        if body.inner.is_end_stream() {
            body.release();
        }
        body
    }

    fn release(&mut self) {
        if let Some((sender, idle)) = self.release.take() {
            idle.checkin(sender);
        }
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => this.release(),
            Poll::Ready(Some(Ok(_))) if this.inner.is_end_stream() => this.release(),
            Poll::Ready(Some(Err(_))) => this.release = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Sends `req` on `sender`, wrapping the response body so the connection returns to `idle`.
/// On failure, hands back the request if hyper never wrote it (safe to try elsewhere).
async fn send_pooled(
    mut sender: http1::SendRequest<ReqBody>,
    req: Request<ReqBody>,
    idle: &Arc<Http1Idle>,
) -> Result<Response<PooledBody>, (hyper::Error, Option<Request<ReqBody>>)> {
    if let Err(e) = sender.ready().await {
        return Err((e, Some(req)));
    }
    match sender.try_send_request(req).await {
        Ok(response) => Ok(response.map(|body| PooledBody::new(body, sender, idle.clone()))),
        Err(mut e) => {
            let unsent = e.take_message();
            Err((e.into_error(), unsent))
        }
    }
}

fn http1_builder() -> http1::Builder {
    http1::Builder::new()
}

fn spawn_http1<T>(
    conn: http1::Connection<T, ReqBody>,
    target: Arc<str>,
    guard: Option<crate::metrics::ConnectionGuard>,
) where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let _guard = guard;
        if let Err(e) = conn.await {
            tracing::debug!(%target, error = %e, "HTTP/1.1 connection ended");
        }
    });
}

// ---------------------------------------------------------------------------------------------
// Inbound → app.

/// Pooled HTTP/1.1 keep-alive connections to the local app.
pub struct AppPool {
    addr: SocketAddr,
    target: Arc<str>,
    connect_timeout: Duration,
    idle: Arc<Http1Idle>,
    builder: http1::Builder,
}

impl AppPool {
    /// A pool for the app at `addr`.
    pub fn new(addr: SocketAddr, connect_timeout: Duration) -> Self {
        Self {
            addr,
            target: format!("app {addr}").into(),
            connect_timeout,
            idle: Http1Idle::new(),
            builder: http1_builder(),
        }
    }

    /// Sends `req` (origin-form URI, `Host` set) on an idle connection or a new one. A request
    /// an idle connection hands back unsent (the app closed it meanwhile) is tried on the next.
    pub async fn send(&self, req: Request<ReqBody>) -> Result<Response<PooledBody>, ForwardError> {
        // The hot path (an idle connection) stays small; connecting is boxed so its much larger
        // state is not part of (and copied with) every request's future.
        let req = match self.idle.checkout() {
            Some(sender) => match send_pooled(sender, req, &self.idle).await {
                Ok(response) => return Ok(response),
                Err((_, Some(unsent))) => unsent,
                Err((e, None)) => return Err(failed(&self.target, e)),
            },
            None => req,
        };
        Box::pin(self.send_slow(req)).await
    }

    async fn send_slow(
        &self,
        mut req: Request<ReqBody>,
    ) -> Result<Response<PooledBody>, ForwardError> {
        loop {
            let (sender, reused) = match self.idle.checkout() {
                Some(sender) => (sender, true),
                None => (self.connect().await?, false),
            };
            match send_pooled(sender, req, &self.idle).await {
                Ok(response) => return Ok(response),
                Err((_, Some(unsent))) if reused => req = unsent,
                Err((e, _)) => return Err(failed(&self.target, e)),
            }
        }
    }

    async fn connect(&self) -> Result<http1::SendRequest<ReqBody>, ForwardError> {
        let tcp = connect_tcp(TcpTarget::Addr(self.addr), self.connect_timeout)
            .await
            .map_err(|e| ForwardError::Unreachable {
                target: self.target.clone(),
                detail: e.to_string(),
            })?;
        let (sender, conn) = self
            .builder
            .handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| failed(&self.target, e))?;
        spawn_http1(conn, self.target.clone(), None);
        Ok(sender)
    }

    /// `app <addr>`, as error bodies name it.
    pub fn target(&self) -> &Arc<str> {
        &self.target
    }

    #[cfg(test)]
    pub(crate) fn idle_len(&self) -> usize {
        self.idle.len()
    }
}

// ---------------------------------------------------------------------------------------------
// Outbound → peer sidecar.

/// One rustls client config and the sessions it may resume.
#[derive(Clone)]
pub struct TlsClient {
    connector: TlsConnector,
    sessions: Arc<ClientSessionMemoryCache>,
}

impl TlsClient {
    /// Built once per upstream and ALPN set (see [`mtls::client_config`]).
    pub fn new(config: Arc<rustls::ClientConfig>, sessions: Arc<ClientSessionMemoryCache>) -> Self {
        Self {
            connector: TlsConnector::from(config),
            sessions,
        }
    }
}

/// How to reach one upstream sidecar and what it must prove.
pub struct PeerTarget {
    target: Arc<str>,
    address: Arc<str>,
    resolved: Option<SocketAddr>,
    server_name: ServerName<'static>,
    expected: SpiffeId,
    bundle: SharedBundle,
    metrics: Arc<SidecarMetrics>,
    connect_timeout: Duration,
    /// Our identity: a connection waits (up to `connect_timeout`) until it holds an SVID.
    svid: Option<Arc<SvidStore>>,
}

/// A new HTTP connection to a peer, by negotiated protocol.
enum PeerIo {
    H2(Prefixed<TlsStream<TcpStream>>),
    Http1(TlsStream<TcpStream>),
}

impl PeerTarget {
    /// `name`, `address` (`host:port`) and `expected` come from the upstream's config. The TLS
    /// server name is the address's host (SPIFFE verification ignores it; it keys sessions).
    pub fn new(
        name: &str,
        address: &str,
        expected: SpiffeId,
        bundle: SharedBundle,
        metrics: Arc<SidecarMetrics>,
        connect_timeout: Duration,
    ) -> std::io::Result<Self> {
        let resolved = address.parse::<SocketAddr>().ok();
        let host = match resolved {
            Some(a) => a.ip().to_string(),
            None => {
                let host = crate::headers::host_without_port(address);
                host.trim_start_matches('[')
                    .trim_end_matches(']')
                    .to_owned()
            }
        };
        let server_name = ServerName::try_from(host).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("upstream `{name}`: address `{address}` has no usable host name: {e}"),
            )
        })?;
        Ok(Self {
            target: format!("upstream `{name}` ({address})").into(),
            address: address.into(),
            resolved,
            server_name,
            expected,
            bundle,
            metrics,
            connect_timeout,
            svid: None,
        })
    }

    /// Makes every connection wait, up to the connect timeout, until `store` holds an SVID:
    /// right after a start, before the control plane has answered, a handshake without a
    /// client certificate would only be refused by the peer (a `502` for the app).
    pub fn wait_for_svid(mut self, store: Arc<SvidStore>) -> Self {
        self.svid = Some(store);
        self
    }

    /// `upstream `name` (address)`, as error bodies name it.
    pub fn target(&self) -> &Arc<str> {
        &self.target
    }

    pub(crate) fn metrics(&self) -> &SidecarMetrics {
        &self.metrics
    }

    async fn tcp(&self) -> Result<TcpStream, ForwardError> {
        let to = match self.resolved {
            Some(a) => TcpTarget::Addr(a),
            None => TcpTarget::Name(&self.address),
        };
        connect_tcp(to, self.connect_timeout)
            .await
            .map_err(|e| ForwardError::Unreachable {
                target: self.target.clone(),
                detail: e.to_string(),
            })
    }

    fn handshake_failed(&self, reason: &'static str) {
        self.metrics.handshake(Direction::Outbound, false, reason);
    }

    fn tls_failure(&self, err: &std::io::Error) -> ForwardError {
        let Some(tls) = tls_error(err) else {
            self.handshake_failed("io");
            return ForwardError::Handshake {
                target: self.target.clone(),
                reason: "io",
                detail: err.to_string(),
            };
        };
        let reason = handshake_failure_reason(tls);
        self.handshake_failed(reason);
        match svid_error_of(tls) {
            Some(SvidError::WrongIdentity {
                expected,
                presented,
            }) => ForwardError::WrongIdentity {
                target: self.target.clone(),
                expected: expected.clone(),
                presented: presented.clone(),
            },
            Some(svid) => ForwardError::Handshake {
                target: self.target.clone(),
                reason,
                detail: svid.to_string(),
            },
            None => ForwardError::Handshake {
                target: self.target.clone(),
                reason,
                detail: tls.to_string(),
            },
        }
    }

    /// TCP + mTLS. The verifier checks the chain and the expected identity inside the handshake;
    /// a resumed session skipped it, so its stored chain is checked again here, and if that
    /// fails the sessions are forgotten and a full handshake is made instead. Returns the
    /// stream, whether it resumed, and how long the (last) TLS handshake took.
    async fn handshake(
        &self,
        tls: &TlsClient,
    ) -> Result<(TlsStream<TcpStream>, bool, Duration), ForwardError> {
        if let Some(store) = &self.svid {
            if !mtls::wait_for_svid(store, self.connect_timeout).await {
                return Err(ForwardError::NoSvid {
                    target: self.target.clone(),
                    waited: self.connect_timeout,
                });
            }
        }
        let mut attempts = 0;
        loop {
            attempts += 1;
            let tcp = self.tcp().await?;
            let started = Instant::now();
            let stream = match tokio::time::timeout(
                self.connect_timeout,
                tls.connector.connect(self.server_name.clone(), tcp),
            )
            .await
            {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => return Err(self.tls_failure(&e)),
                Err(_) => {
                    self.handshake_failed("timeout");
                    return Err(ForwardError::Handshake {
                        target: self.target.clone(),
                        reason: "timeout",
                        detail: format!(
                            "no answer within {}",
                            humantime::format_duration(self.connect_timeout)
                        ),
                    });
                }
            };
            let conn = stream.get_ref().1;
            let resumed = mtls::is_resumed(conn.handshake_kind());
            if resumed {
                let checked = mtls::recheck_resumed_server(
                    conn.peer_certificates(),
                    &self.bundle,
                    &self.expected,
                    SystemTime::now(),
                );
                if let Err(e) = checked {
                    self.handshake_failed(e.reason());
                    tracing::info!(target = %self.target, error = %e, "resumed session no longer verifies; full handshake");
                    mtls::forget_sessions(&tls.sessions, &self.server_name);
                    if attempts < 2 {
                        continue;
                    }
                    return Err(ForwardError::Handshake {
                        target: self.target.clone(),
                        reason: e.reason(),
                        detail: e.to_string(),
                    });
                }
            }
            return Ok((stream, resumed, started.elapsed()));
        }
    }

    fn connected(&self, handshake_took: Duration, group: &'static str) {
        self.metrics.handshake_ok(Direction::Outbound, group);
        self.metrics
            .handshake_duration(Direction::Outbound, handshake_took);
        self.metrics.upstream_connections.inc();
    }

    /// A raw mTLS stream (TCP upstreams).
    pub async fn connect_stream(
        &self,
        tls: &TlsClient,
    ) -> Result<TlsStream<TcpStream>, ForwardError> {
        let (stream, _, took) = self.handshake(tls).await?;
        self.connected(took, negotiated_group(stream.get_ref().1));
        Ok(stream)
    }

    /// An mTLS stream for HTTP. With `h2` negotiated, waits for the server's first bytes: in
    /// TLS 1.3 the client finishes before the server has checked the client certificate, so a
    /// refusal (our SVID, or a resumed session the server no longer accepts) only shows as an
    /// alert or a close on the first read.
    async fn connect_http(&self, tls: &TlsClient) -> Result<PeerIo, ForwardError> {
        let mut attempts = 0;
        loop {
            attempts += 1;
            let (mut stream, resumed, took) = self.handshake(tls).await?;
            if stream.get_ref().1.alpn_protocol() != Some(mtls::ALPN_H2) {
                self.connected(took, negotiated_group(stream.get_ref().1));
                return Ok(PeerIo::Http1(stream));
            }
            let mut first = vec![0u8; 1024];
            let wait = self.connect_timeout.min(SERVER_PREFACE_WAIT);
            let refused = match tokio::time::timeout(wait, stream.read(&mut first)).await {
                // A server that waits for our preface before it speaks: go ahead unchecked.
                Err(_) => {
                    first.clear();
                    None
                }
                Ok(Ok(0)) => Some(None),
                Ok(Ok(n)) => {
                    first.truncate(n);
                    None
                }
                Ok(Err(e)) => Some(Some(e)),
            };
            let Some(err) = refused else {
                self.connected(took, negotiated_group(stream.get_ref().1));
                return Ok(PeerIo::H2(Prefixed::new(first, stream)));
            };
            if resumed && attempts < 2 {
                // Most likely our certificate in that session expired or our CA left the
                // peer's bundle; a full handshake presents the current SVID.
                self.handshake_failed("resumption_refused");
                mtls::forget_sessions(&tls.sessions, &self.server_name);
                continue;
            }
            return Err(match err {
                Some(e) if tls_error(&e).is_some() => self.tls_failure(&e),
                other => {
                    self.handshake_failed("closed");
                    ForwardError::Handshake {
                        target: self.target.clone(),
                        reason: "closed",
                        detail: match other {
                            Some(e) => format!("peer closed the connection after the handshake: {e}"),
                            None => "peer closed the connection after the handshake (does it trust our SVID?)".into(),
                        },
                    }
                }
            });
        }
    }
}

/// The pooled HTTP/2 connection: a handle to open streams on, and whether it has ended.
struct H2Conn {
    sender: h2::client::SendRequest<Bytes>,
    closed: Arc<AtomicBool>,
}

impl H2Conn {
    fn is_live(&self) -> bool {
        !self.closed.load(Ordering::Acquire)
    }
}

/// The outbound pool for one HTTP upstream.
pub struct PeerPool {
    peer: PeerTarget,
    /// Offers `h2` and `http/1.1`.
    tls: TlsClient,
    /// Offers `http/1.1` only, once the peer has shown it does not speak HTTP/2.
    tls_http1: TlsClient,
    h2: ArcSwapOption<H2Conn>,
    /// Serializes connection attempts; holds the last attempt's failure for those who waited.
    connecting: tokio::sync::Mutex<Option<ForwardError>>,
    attempts: AtomicU64,
    http1_mode: AtomicBool,
    http1_idle: Arc<Http1Idle>,
    h2_builder: h2::client::Builder,
    h1_builder: http1::Builder,
    keepalive: Keepalive,
}

/// Dead-peer detection on the pooled HTTP/2 connection (`limits.h2.keepalive_*`).
#[derive(Debug, Clone, Copy)]
struct Keepalive {
    interval: Duration,
    timeout: Duration,
}

enum Shared {
    H2(Arc<H2Conn>),
    Http1,
}

impl PeerPool {
    /// A pool for `peer`. `tls` offers ALPN `h2, http/1.1`; `tls_http1` offers `http/1.1`.
    /// `limits` gives the keepalive and the reset bounds (a peer sidecar may misbehave too).
    pub fn new(peer: PeerTarget, tls: TlsClient, tls_http1: TlsClient, limits: &Limits) -> Self {
        let mut h2_builder = h2::client::Builder::new();
        h2_builder
            .enable_push(false)
            .initial_window_size(H2_STREAM_WINDOW)
            .initial_connection_window_size(H2_CONNECTION_WINDOW)
            .max_send_buffer_size(H2_MAX_SEND_BUF)
            .max_header_list_size(limits.h2.max_header_list_bytes)
            // Push is off, so no stream waits to be accepted here: the pending-accept bound is
            // for servers only.
            .max_local_error_reset_streams(Some(limits.h2.max_local_error_reset_streams))
            .max_concurrent_reset_streams(limits.h2.max_concurrent_reset_streams);
        Self {
            peer,
            tls,
            tls_http1,
            h2: ArcSwapOption::empty(),
            connecting: tokio::sync::Mutex::new(None),
            attempts: AtomicU64::new(0),
            http1_mode: AtomicBool::new(false),
            http1_idle: Http1Idle::new(),
            h2_builder,
            h1_builder: http1_builder(),
            keepalive: Keepalive {
                interval: limits.h2.keepalive_interval,
                timeout: limits.h2.keepalive_timeout,
            },
        }
    }

    /// Error bodies name the upstream with this.
    pub fn target(&self) -> &Arc<str> {
        self.peer.target()
    }

    /// Forwards `req` (absolute-form URI: scheme, authority = the app's `Host`, path). Returns
    /// the peer's response with its body streaming.
    pub async fn send(&self, req: Request<Incoming>) -> Result<Response<ProxyBody>, ForwardError> {
        // The hot path: the pooled HTTP/2 connection is up. Everything else (connecting, the
        // HTTP/1.1 fallback) is boxed, so its much larger state is not part of (and copied
        // with) every request's future.
        let req = match self.live_h2() {
            Some(conn) => match send_h2(&conn, req).await {
                Ok(response) => return Ok(response),
                Err((e, Some(unsent))) => {
                    tracing::debug!(target = %self.target(), error = %e, "request not processed by the peer; sending it on a new connection");
                    unsent
                }
                Err((e, None)) => return Err(failed(self.target(), e)),
            },
            None => req,
        };
        Box::pin(self.send_slow(req)).await
    }

    async fn send_slow(
        &self,
        mut req: Request<Incoming>,
    ) -> Result<Response<ProxyBody>, ForwardError> {
        // Each round follows a request that was never sent because the connection had closed
        // (GOAWAY from a draining peer, a dead socket): safe to send on a fresh one.
        for _ in 0..3 {
            if self.http1_mode.load(Ordering::Relaxed) {
                return self.send_http1(req).await;
            }
            let conn = match self.live_h2() {
                Some(conn) => conn,
                None => match self.connect_shared().await? {
                    Shared::H2(conn) => conn,
                    Shared::Http1 => continue,
                },
            };
            match send_h2(&conn, req).await {
                Ok(response) => return Ok(response),
                Err((e, Some(unsent))) => {
                    tracing::debug!(target = %self.target(), error = %e, "request not processed by the peer; sending it on a new connection");
                    req = unsent;
                }
                Err((e, None)) => return Err(failed(self.target(), e)),
            }
        }
        Err(failed(
            self.target(),
            "the connection to the peer closed three times in a row",
        ))
    }

    fn live_h2(&self) -> Option<Arc<H2Conn>> {
        if self.http1_mode.load(Ordering::Relaxed) {
            return None;
        }
        let current = self.h2.load();
        let conn = current.as_ref()?;
        conn.is_live().then(|| conn.clone())
    }

    /// Single-flight: one attempt at a time; those who waited on a failed attempt get its error
    /// instead of trying again at once.
    async fn connect_shared(&self) -> Result<Shared, ForwardError> {
        let seen = self.attempts.load(Ordering::Acquire);
        let mut last_failure = self.connecting.lock().await;
        if let Some(conn) = self.live_h2() {
            return Ok(Shared::H2(conn));
        }
        if self.http1_mode.load(Ordering::Relaxed) {
            return Ok(Shared::Http1);
        }
        if self.attempts.load(Ordering::Acquire) != seen {
            if let Some(e) = last_failure.as_ref() {
                return Err(e.clone());
            }
        }
        self.attempts.fetch_add(1, Ordering::AcqRel);
        let result = self.open(&self.tls).await;
        *last_failure = result.as_ref().err().cloned();
        match result? {
            Opened::H2(conn) => {
                let conn = Arc::new(conn);
                self.h2.store(Some(conn.clone()));
                Ok(Shared::H2(conn))
            }
            Opened::Http1(sender) => {
                tracing::info!(target = %self.target(), "peer does not offer h2; using pooled HTTP/1.1");
                self.http1_mode.store(true, Ordering::Relaxed);
                self.http1_idle.checkin(sender);
                Ok(Shared::Http1)
            }
        }
    }

    async fn open(&self, tls: &TlsClient) -> Result<Opened, ForwardError> {
        let target = self.target();
        match self.peer.connect_http(tls).await? {
            PeerIo::H2(io) => {
                let (sender, conn) = self
                    .h2_builder
                    .handshake::<_, Bytes>(io)
                    .await
                    .map_err(|e| failed(target, e))?;
                let closed = Arc::new(AtomicBool::new(false));
                tokio::spawn(drive_h2_client(
                    conn,
                    self.keepalive,
                    closed.clone(),
                    self.peer.metrics.connection(Direction::Outbound),
                    target.clone(),
                ));
                Ok(Opened::H2(H2Conn { sender, closed }))
            }
            PeerIo::Http1(io) => {
                let (sender, conn) = self
                    .h1_builder
                    .handshake(TokioIo::new(io))
                    .await
                    .map_err(|e| failed(target, e))?;
                spawn_http1(
                    conn,
                    target.clone(),
                    Some(self.peer.metrics.connection(Direction::Outbound)),
                );
                Ok(Opened::Http1(sender))
            }
        }
    }

    async fn send_http1(
        &self,
        req: Request<Incoming>,
    ) -> Result<Response<ProxyBody>, ForwardError> {
        let mut req = req.map(ReqBody::Hyper);
        to_origin_form(&mut req);
        loop {
            let (sender, reused) = match self.http1_idle.checkout() {
                Some(sender) => (sender, true),
                None => match self.open(&self.tls_http1).await? {
                    Opened::Http1(sender) => (sender, false),
                    // Only `http/1.1` was offered; a server picking h2 anyway is broken.
                    Opened::H2(_) => {
                        return Err(failed(
                            self.target(),
                            "peer chose h2, which was not offered",
                        ))
                    }
                },
            };
            match send_pooled(sender, req, &self.http1_idle).await {
                Ok(response) => return Ok(response.map(ProxyBody::Pooled)),
                Err((_, Some(unsent))) if reused => req = unsent,
                Err((e, _)) => return Err(failed(self.target(), e)),
            }
        }
    }
}

enum Opened {
    H2(H2Conn),
    Http1(http1::SendRequest<ReqBody>),
}

/// Runs the pooled connection until it ends, PINGing it every `keepalive.interval` and
/// closing it when a PING goes unanswered for `keepalive.timeout`; then marks it closed so the
/// next request opens a new one.
async fn drive_h2_client<T>(
    mut conn: h2::client::Connection<T, Bytes>,
    keepalive: Keepalive,
    closed: Arc<AtomicBool>,
    _open: crate::metrics::ConnectionGuard,
    target: Arc<str>,
) where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let ping_pong = conn.ping_pong();
    let pinging = async move {
        let Some(mut ping_pong) = ping_pong else {
            return std::future::pending::<&'static str>().await;
        };
        loop {
            tokio::time::sleep(keepalive.interval).await;
            match tokio::time::timeout(keepalive.timeout, ping_pong.ping(h2::Ping::opaque())).await
            {
                Ok(Ok(_pong)) => {}
                Ok(Err(_)) => return "the connection failed",
                Err(_) => return "the peer stopped answering PINGs",
            }
        }
    };
    tokio::select! {
        ended = &mut conn => {
            if let Err(e) = ended {
                tracing::debug!(%target, error = %e, "upstream HTTP/2 connection ended");
            }
        }
        why = pinging => tracing::info!(%target, why, "closing upstream HTTP/2 connection"),
    }
    closed.store(true, Ordering::Release);
}

/// What it takes to send a request again: its head without the body. Kept while the peer may
/// still refuse the stream unprocessed.
struct Resend {
    method: http::Method,
    uri: Uri,
    headers: http::HeaderMap,
}

impl Resend {
    fn of(head: &http::request::Parts) -> Self {
        Self {
            method: head.method.clone(),
            uri: head.uri.clone(),
            headers: head.headers.clone(),
        }
    }

    fn with_body<B>(self, body: B) -> Request<B> {
        let mut req = Request::new(body);
        *req.method_mut() = self.method;
        *req.uri_mut() = self.uri;
        *req.headers_mut() = self.headers;
        req
    }
}

/// RFC 9113 6.8: streams above a GOAWAY's last-stream-id "were not and will not be processed"
/// and "can safely be retried"; 8.7: so can a stream reset with REFUSED_STREAM. h2 reports the
/// first as a remote GOAWAY error on the stream (streams at or below the id carry on), the
/// second as a remote reset.
fn refused_unprocessed(e: &h2::Error) -> bool {
    e.is_remote() && (e.is_go_away() || e.reason() == Some(h2::Reason::REFUSED_STREAM))
}

/// Opens a stream for `req` on `conn`, streams the request body, and waits for the response
/// head. The request is handed back (to be sent on a new connection) when the connection could
/// not take it, or when the peer refused the stream unprocessed (a draining peer's GOAWAY)
/// before its body had been touched.
async fn send_h2<B>(
    conn: &H2Conn,
    req: Request<B>,
) -> Result<Response<ProxyBody>, (h2::Error, Option<Request<B>>)>
where
    B: Body<Data = Bytes> + Unpin + Send + 'static,
    B::Error: Into<crate::http_util::BoxError> + Send,
{
    let mut sender = conn.sender.clone();
    // Waits for a free stream slot (the peer's SETTINGS_MAX_CONCURRENT_STREAMS). Fails once the
    // connection is gone or the peer sent GOAWAY (h2 opens no stream after one): either way the
    // request was not sent.
    if let Err(e) = std::future::poll_fn(|cx| sender.poll_ready(cx)).await {
        conn.closed.store(true, Ordering::Release);
        return Err((e, Some(req)));
    }
    let (mut head, body) = req.into_parts();
    // RFC 9113 8.3.1: clients use :authority (from the URI) rather than Host.
    head.headers.remove(header::HOST);
    head.version = Version::HTTP_2;
    let resend = Resend::of(&head);
    let end_of_stream = body.is_end_stream();
    let (response, send) = match sender.send_request(Request::from_parts(head, ()), end_of_stream) {
        Ok(started) => started,
        // h2 refused to open the stream, so nothing went out; if the connection is what failed
        // (it ended, or GOAWAY came in since `poll_ready`), a new one may take the request.
        Err(e) if e.is_io() || e.is_go_away() => {
            conn.closed.store(true, Ordering::Release);
            return Err((e, Some(resend.with_body(body))));
        }
        // Something about this request (h2 checks headers): no connection would take it.
        Err(e) => return Err((e, None)),
    };
    // An empty body stays here for a resend; any other streams on its own task (the response
    // may come before the upload ends) and comes back only if the peer refused the stream
    // before a byte of it was taken.
    let (mut kept, handed_back) = if end_of_stream {
        drop(send);
        (Some(body), None)
    } else {
        let (give_back, handed_back) = tokio::sync::oneshot::channel();
        tokio::spawn(pipe_request(body, send, give_back));
        (None, Some(handed_back))
    };
    match response.await {
        Ok(response) => {
            let (head, recv) = response.into_parts();
            let body = H2Body::new(recv, &head.headers);
            Ok(Response::from_parts(head, ProxyBody::H2(body)))
        }
        Err(e) => {
            if e.is_io() || e.is_go_away() {
                conn.closed.store(true, Ordering::Release);
            }
            if refused_unprocessed(&e) {
                let body = match handed_back {
                    Some(rx) => rx.await.ok(),
                    None => kept.take(),
                };
                if let Some(body) = body {
                    return Err((e, Some(resend.with_body(body))));
                }
            }
            Err((e, None))
        }
    }
}

/// Streams a request body into its HTTP/2 stream. If the peer refuses or resets the stream
/// before the first frame of the body has been taken, the untouched body goes back through
/// `give_back` so the request can be sent again elsewhere.
async fn pipe_request<B>(
    mut body: B,
    mut send: h2::SendStream<Bytes>,
    give_back: tokio::sync::oneshot::Sender<B>,
) where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<crate::http_util::BoxError>,
{
    let first = std::future::poll_fn(|cx| {
        if send.poll_reset(cx).is_ready() {
            return Poll::Ready(None);
        }
        Pin::new(&mut body).poll_frame(cx).map(Some)
    })
    .await;
    let Some(first) = first else {
        let _ = give_back.send(body);
        return;
    };
    // From here on the body is being consumed: a refusal can no longer be retried.
    drop(give_back);
    let piped = match first {
        None => send
            .send_data(Bytes::new(), true)
            .map_err(crate::http_util::BoxError::from),
        Some(Err(e)) => {
            send.send_reset(h2::Reason::INTERNAL_ERROR);
            Err(e.into())
        }
        Some(Ok(frame)) => {
            let body = Prepended {
                first: Some(frame),
                rest: body,
            };
            crate::http_util::pipe_to_h2(body, &mut send).await
        }
    };
    if let Err(e) = piped {
        tracing::debug!(error = %e, "request body to upstream ended early");
    }
}

/// A body whose first frame was already taken, put back in front of the rest.
struct Prepended<B> {
    first: Option<Frame<Bytes>>,
    rest: B,
}

impl<B: Body<Data = Bytes> + Unpin> Body for Prepended<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        if let Some(frame) = this.first.take() {
            return Poll::Ready(Some(Ok(frame)));
        }
        Pin::new(&mut this.rest).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.first.is_none() && self.rest.is_end_stream()
    }
}

/// HTTP/1.1 wants origin-form and a `Host` header (RFC 9112 3.2).
fn to_origin_form(req: &mut Request<ReqBody>) {
    *req.version_mut() = Version::HTTP_11;
    let uri = std::mem::take(req.uri_mut());
    let mut parts = uri.into_parts();
    if let Some(authority) = parts.authority.take() {
        if !req.headers().contains_key(header::HOST) {
            if let Ok(host) = HeaderValue::from_str(authority.as_str()) {
                req.headers_mut().insert(header::HOST, host);
            }
        }
    }
    *req.uri_mut() = match parts.path_and_query {
        Some(pq) => Uri::from(pq),
        None => Uri::from_static("/"),
    };
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn statuses_match_the_issue() {
        let t: Arc<str> = "upstream `b` (x:1)".into();
        let e = ForwardError::Unreachable {
            target: t.clone(),
            detail: "refused".into(),
        };
        assert_eq!(e.status(), StatusCode::SERVICE_UNAVAILABLE);
        let e = ForwardError::WrongIdentity {
            target: t.clone(),
            expected: "spiffe://example.org/y".into(),
            presented: "spiffe://example.org/x".into(),
        };
        assert_eq!(e.status(), StatusCode::BAD_GATEWAY);
        assert!(
            e.to_string()
                .contains("peer presented spiffe://example.org/x, expected spiffe://example.org/y"),
            "{e}"
        );
        let e = ForwardError::NoSvid {
            target: t.clone(),
            waited: Duration::from_secs(5),
        };
        assert_eq!(e.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(e.to_string().contains("no SVID yet (waited 5s)"), "{e}");
        let e = ForwardError::Timeout {
            target: t,
            timeout: Duration::from_millis(1500),
        };
        assert_eq!(e.status(), StatusCode::GATEWAY_TIMEOUT);
        assert!(e.to_string().contains("1s 500ms"), "{e}");
    }

    #[test]
    fn peer_target_rejects_address_without_host() {
        let ca = trellis_identity::testca::TestCa::root("example.org");
        let id = SpiffeId::parse("spiffe://example.org/b").unwrap();
        let m = Arc::new(SidecarMetrics::new());
        let bad = PeerTarget::new(
            "b",
            ":15443",
            id.clone(),
            ca.shared_bundle(),
            m.clone(),
            Duration::from_secs(1),
        );
        assert!(bad.is_err());
        for ok in ["10.0.0.7:15443", "[::1]:15443", "peer.example.org:15443"] {
            PeerTarget::new(
                "b",
                ok,
                id.clone(),
                ca.shared_bundle(),
                m.clone(),
                Duration::from_secs(1),
            )
            .unwrap();
        }
    }

    #[tokio::test]
    async fn app_pool_reuses_one_connection_for_sequential_requests() {
        use http_body_util::BodyExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicU64::new(0));
        let counter = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                counter.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(|_req| async {
                        Ok::<_, std::convert::Infallible>(Response::new(http_body_util::Full::new(
                            Bytes::from_static(b"ok"),
                        )))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        // The requests need an `Incoming` body: make them on a loopback hyper server.
        let pool = Arc::new(AppPool::new(addr, Duration::from_secs(5)));
        let front = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let front_addr = front.local_addr().unwrap();
        let p = pool.clone();
        tokio::spawn(async move {
            let (tcp, _) = front.accept().await.unwrap();
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let p = p.clone();
                async move {
                    let r = p.send(req.map(ReqBody::Hyper)).await.unwrap();
                    Ok::<_, std::convert::Infallible>(r.map(ProxyBody::Pooled))
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
        let tcp = TcpStream::connect(front_addr).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .unwrap();
        tokio::spawn(conn);
        for _ in 0..20 {
            sender.ready().await.unwrap();
            let req = Request::builder()
                .uri("/")
                .header("host", "app")
                .body(http_body_util::Empty::<Bytes>::new())
                .unwrap();
            let body = sender
                .send_request(req)
                .await
                .unwrap()
                .into_body()
                .collect()
                .await
                .unwrap()
                .to_bytes();
            assert_eq!(&body[..], b"ok");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        assert_eq!(pool.idle_len(), 1);
    }

    /// A raw HTTP/2 server: waits until it has seen `streams` request HEADERS frames, then
    /// sends GOAWAY with last-stream-id 1 and answers stream 1 alone (`:status 200`). Every
    /// other stream is above the last-stream-id: refused, unprocessed.
    async fn goaway_server(streams: usize) -> SocketAddr {
        use tokio::io::AsyncWriteExt;
        fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
            let len = payload.len() as u32;
            let mut f = len.to_be_bytes()[1..].to_vec();
            f.extend([kind, flags]);
            f.extend(stream.to_be_bytes());
            f.extend(payload);
            f
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await.unwrap();
            tcp.write_all(&frame(0x4, 0, 0, &[])).await.unwrap(); // SETTINGS
            let mut preface = [0u8; 24];
            tcp.read_exact(&mut preface).await.unwrap();
            let mut seen = 0;
            while seen < streams {
                let mut head = [0u8; 9];
                tcp.read_exact(&mut head).await.unwrap();
                let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
                let mut payload = vec![0u8; len];
                tcp.read_exact(&mut payload).await.unwrap();
                if head[3] == 0x1 {
                    seen += 1;
                }
            }
            let mut goaway = 1u32.to_be_bytes().to_vec();
            goaway.extend(0u32.to_be_bytes()); // NO_ERROR
            tcp.write_all(&frame(0x4, 0x1, 0, &[])).await.unwrap(); // SETTINGS ack
            tcp.write_all(&frame(0x7, 0, 0, &goaway)).await.unwrap();
            // HEADERS, END_STREAM | END_HEADERS, HPACK static index 8 = `:status 200`.
            tcp.write_all(&frame(0x1, 0x5, 1, &[0x88])).await.unwrap();
            let mut rest = Vec::new();
            let _ = tcp.read_to_end(&mut rest).await;
        });
        addr
    }

    async fn h2_conn(addr: SocketAddr) -> Arc<H2Conn> {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let (sender, conn) = h2::client::handshake(tcp).await.unwrap();
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Arc::new(H2Conn {
            sender,
            closed: Arc::new(AtomicBool::new(false)),
        })
    }

    /// A request body that never yields: an upload the app has not started sending.
    struct NotYet;

    impl Body for NotYet {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            Poll::Pending
        }
    }

    fn get<B>(path: &str, body: B) -> Request<B> {
        Request::builder()
            .uri(format!("http://b{path}"))
            .header("x-keep", "me")
            .body(body)
            .unwrap()
    }

    #[tokio::test]
    async fn stream_above_goaway_last_id_is_handed_back_for_a_new_connection() {
        let conn = h2_conn(goaway_server(2).await).await;
        let empty = || http_body_util::Empty::<Bytes>::new();
        // `join!` polls in order: the first request opens stream 1, the second stream 3.
        let (first, second) = futures::join!(
            send_h2(&conn, get("/one", empty())),
            send_h2(&conn, get("/two", empty()))
        );
        assert_eq!(first.unwrap().status(), StatusCode::OK);
        let Err((e, Some(again))) = second else {
            panic!("stream 3 was refused unprocessed; the request must come back");
        };
        assert!(refused_unprocessed(&e), "{e:?}");
        assert_eq!(again.uri(), "http://b/two");
        assert_eq!(again.headers()["x-keep"], "me");
        assert!(
            !conn.is_live(),
            "a connection that sent GOAWAY takes no more requests"
        );
    }

    #[tokio::test]
    async fn refused_request_gets_its_untouched_body_back() {
        let conn = h2_conn(goaway_server(2).await).await;
        let (first, second) = futures::join!(
            send_h2(&conn, get("/one", http_body_util::Empty::<Bytes>::new())),
            send_h2(&conn, get("/upload", NotYet))
        );
        assert_eq!(first.unwrap().status(), StatusCode::OK);
        match second {
            Err((e, Some(again))) => {
                assert!(refused_unprocessed(&e), "{e:?}");
                assert_eq!(again.uri(), "http://b/upload");
            }
            Err((e, None)) => panic!("body not handed back: {e}"),
            Ok(r) => panic!("stream 3 answered {}", r.status()),
        }
    }
}
