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
use trellis_identity::tls::{handshake_failure_reason, svid_error_of, SharedBundle};
use trellis_identity::{SpiffeId, SvidError};

use crate::http_util::{connect_tcp, tls_error, H2Body, Prefixed, ProxyBody, ReqBody, TcpTarget};
use crate::metrics::{Direction, SidecarMetrics};
use crate::mtls;

/// HTTP/2 stream receive window (both directions between sidecars). Large enough that a
/// loopback or LAN hop streams at full speed; it bounds memory per stream, not per connection.
pub const H2_STREAM_WINDOW: u32 = 1 << 20;
/// HTTP/2 connection receive window: a few streams' worth, since every app request of an
/// upstream shares one connection.
pub const H2_CONNECTION_WINDOW: u32 = 4 << 20;
/// Most bytes hyper buffers per stream on the sending side.
pub const H2_MAX_SEND_BUF: usize = 400 << 10;
/// Largest header block accepted on HTTP/2 (as hyper's default).
pub const H2_MAX_HEADER_LIST: u32 = 16 << 10;
/// Concurrent streams the inbound HTTP/2 server allows per connection. One connection carries
/// all of a peer's traffic, so this is well above hyper's default of 200.
pub const H2_MAX_CONCURRENT_STREAMS: u32 = 1024;
/// PING interval on the pooled upstream connection (finds a dead peer without a request).
pub const H2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// How long a PING may go unanswered before the connection is closed and replaced.
pub const H2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
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
    /// 503 unreachable, 502 handshake/identity/HTTP failure, 504 timeout.
    pub fn status(&self) -> StatusCode {
        match self {
            ForwardError::Unreachable { .. } => StatusCode::SERVICE_UNAVAILABLE,
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
                let host = crate::http_util::host_without_port(address);
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
        })
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
    /// fails the sessions are forgotten and a full handshake is made instead.
    async fn handshake(
        &self,
        tls: &TlsClient,
    ) -> Result<(TlsStream<TcpStream>, bool), ForwardError> {
        let mut attempts = 0;
        loop {
            attempts += 1;
            let tcp = self.tcp().await?;
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
            return Ok((stream, resumed));
        }
    }

    fn connected(&self) {
        self.metrics.handshake(Direction::Outbound, true, "none");
        self.metrics.upstream_connections.inc();
    }

    /// A raw mTLS stream (TCP upstreams).
    pub async fn connect_stream(
        &self,
        tls: &TlsClient,
    ) -> Result<TlsStream<TcpStream>, ForwardError> {
        let (stream, _) = self.handshake(tls).await?;
        self.connected();
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
            let (mut stream, resumed) = self.handshake(tls).await?;
            if stream.get_ref().1.alpn_protocol() != Some(mtls::ALPN_H2) {
                self.connected();
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
                self.connected();
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
}

enum Shared {
    H2(Arc<H2Conn>),
    Http1,
}

impl PeerPool {
    /// A pool for `peer`. `tls` offers ALPN `h2, http/1.1`; `tls_http1` offers `http/1.1`.
    pub fn new(peer: PeerTarget, tls: TlsClient, tls_http1: TlsClient) -> Self {
        let mut h2_builder = h2::client::Builder::new();
        h2_builder
            .enable_push(false)
            .initial_window_size(H2_STREAM_WINDOW)
            .initial_connection_window_size(H2_CONNECTION_WINDOW)
            .max_send_buffer_size(H2_MAX_SEND_BUF)
            .max_header_list_size(H2_MAX_HEADER_LIST);
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
                Err((_, Some(unsent))) => unsent,
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
                Err((_, Some(unsent))) => req = unsent,
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

/// Runs the pooled connection until it ends, PINGing it every [`H2_KEEPALIVE_INTERVAL`] and
/// closing it when a PING goes unanswered for [`H2_KEEPALIVE_TIMEOUT`]; then marks it closed so
/// the next request opens a new one.
async fn drive_h2_client<T>(
    mut conn: h2::client::Connection<T, Bytes>,
    closed: Arc<AtomicBool>,
    _open: crate::metrics::ConnectionGuard,
    target: Arc<str>,
) where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let ping_pong = conn.ping_pong();
    let keepalive = async move {
        let Some(mut ping_pong) = ping_pong else {
            return std::future::pending::<&'static str>().await;
        };
        loop {
            tokio::time::sleep(H2_KEEPALIVE_INTERVAL).await;
            match tokio::time::timeout(H2_KEEPALIVE_TIMEOUT, ping_pong.ping(h2::Ping::opaque()))
                .await
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
        why = keepalive => tracing::info!(%target, why, "closing upstream HTTP/2 connection"),
    }
    closed.store(true, Ordering::Release);
}

/// Opens a stream for `req` on `conn`, streams the request body, and waits for the response
/// head. A request is handed back unsent only when the connection could not take it at all.
async fn send_h2(
    conn: &H2Conn,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, (h2::Error, Option<Request<Incoming>>)> {
    let mut sender = conn.sender.clone();
    // Waits for a free stream slot (the peer's SETTINGS_MAX_CONCURRENT_STREAMS); fails only
    // when the connection is gone.
    if let Err(e) = std::future::poll_fn(|cx| sender.poll_ready(cx)).await {
        conn.closed.store(true, Ordering::Release);
        return Err((e, Some(req)));
    }
    let (mut head, body) = req.into_parts();
    // RFC 9113 8.3.1: clients use :authority (from the URI) rather than Host.
    head.headers.remove(header::HOST);
    head.version = Version::HTTP_2;
    let end_of_stream = body.is_end_stream();
    let (response, mut send) =
        match sender.send_request(Request::from_parts(head, ()), end_of_stream) {
            Ok(started) => started,
            Err(e) => {
                if e.is_io() || e.is_go_away() {
                    conn.closed.store(true, Ordering::Release);
                }
                return Err((e, None));
            }
        };
    if !end_of_stream {
        // The body streams on its own task: the response may come before the upload ends.
        tokio::spawn(async move {
            if let Err(e) = crate::http_util::pipe_to_h2(body, &mut send).await {
                tracing::debug!(error = %e, "request body to upstream ended early");
            }
        });
    }
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
            Err((e, None))
        }
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
}
