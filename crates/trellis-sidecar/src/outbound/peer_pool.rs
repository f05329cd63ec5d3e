//! The outbound proxy's connections to one upstream sidecar: ONE HTTP/2 connection over mTLS
//! per worker thread ([`PerWorker`]: its driving task runs on that worker, so a request never
//! wakes another thread), every app request multiplexed on it, replaced when it dies. Opening it is single-flight:
//! concurrent requests wait for one attempt and share its outcome. A peer that does not offer
//! `h2` in ALPN gets pooled HTTP/1.1 connections instead.

use crate::body::{http1_builder, send_pooled, spawn_http1, H2Body, Http1Idle, ProxyBody, ReqBody};
use crate::config::Limits;

use crate::dial::{PeerIo, PeerTarget, TlsClient};
use crate::forward_error::{failed, ForwardError};
use crate::metrics::Direction;
use crate::mtls::{H2_CONNECTION_WINDOW, H2_MAX_SEND_BUF, H2_STREAM_WINDOW};
use crate::upgrade::{send_upgrade, Switch};
use arc_swap::ArcSwapOption;
use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response, Uri, Version};
use hyper::body::{Body, Frame, Incoming};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;
use trellis_serve::PerWorker;

/// The pooled HTTP/2 connection: a handle to open streams on, whether it has ended, and, if
/// the keepalive closed it, what went unanswered.
struct H2Conn {
    sender: h2::client::SendRequest<Bytes>,
    closed: Arc<AtomicBool>,
    lost: Arc<OnceLock<String>>,
}

impl H2Conn {
    fn is_live(&self) -> bool {
        !self.closed.load(Ordering::Acquire)
    }

    /// What a request that failed on this connection gets: `503` when the keepalive found the
    /// peer silent and closed the connection under it (the app may retry elsewhere or later),
    /// `502` for anything else.
    fn failure(&self, target: &Arc<str>, e: h2::Error) -> ForwardError {
        match self.lost.get() {
            Some(detail) => ForwardError::ConnectionLost {
                target: target.clone(),
                detail: detail.clone(),
            },
            None => failed(target, e),
        }
    }
}

/// The outbound pool for one HTTP upstream.
pub struct PeerPool {
    peer: PeerTarget,
    /// Offers `h2` and `http/1.1`.
    tls: TlsClient,
    /// Offers `http/1.1` only, once the peer has shown it does not speak HTTP/2.
    tls_http1: TlsClient,
    /// Each worker's connections.
    conns: PerWorker<Conns>,
    /// The peer has shown it does not speak HTTP/2 (what the peer is, for every worker).
    http1_mode: AtomicBool,
    h2_builder: h2::client::Builder,
    h1_builder: http1::Builder,
    keepalive: Keepalive,
}

/// One worker's connections to the peer.
struct Conns {
    h2: ArcSwapOption<H2Conn>,
    /// Serializes connection attempts; holds the last attempt's failure for those who waited.
    connecting: tokio::sync::Mutex<Option<ForwardError>>,
    /// Connection attempts finished so far.
    attempts: AtomicU64,
    http1_idle: Arc<Http1Idle>,
}

impl Conns {
    fn new() -> Self {
        Self {
            h2: ArcSwapOption::empty(),
            connecting: tokio::sync::Mutex::new(None),
            attempts: AtomicU64::new(0),
            http1_idle: Http1Idle::new(),
        }
    }
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
    /// `workers`: worker threads, each with its own connections.
    pub fn new(
        peer: PeerTarget,
        tls: TlsClient,
        tls_http1: TlsClient,
        limits: &Limits,
        workers: usize,
    ) -> Self {
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
            conns: PerWorker::new(workers, |_| Conns::new()),
            http1_mode: AtomicBool::new(false),
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
                Err((e, None)) => return Err(conn.failure(self.target(), e)),
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
                Err((e, None)) => return Err(conn.failure(self.target(), e)),
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
        let current = self.conns.get().h2.load();
        let conn = current.as_ref()?;
        conn.is_live().then(|| conn.clone())
    }

    /// Single-flight: one attempt at a time; those who waited on a failed attempt get its error
    /// instead of trying again at once.
    async fn connect_shared(&self) -> Result<Shared, ForwardError> {
        // This worker's: the connection opened here is driven here.
        let conns = self.conns.get();
        let seen = conns.attempts.load(Ordering::Acquire);
        let mut last_failure = conns.connecting.lock().await;
        if let Some(conn) = self.live_h2() {
            return Ok(Shared::H2(conn));
        }
        if self.http1_mode.load(Ordering::Relaxed) {
            return Ok(Shared::Http1);
        }
        if conns.attempts.load(Ordering::Acquire) != seen {
            if let Some(e) = last_failure.as_ref() {
                return Err(e.clone());
            }
        }
        let result = self.open(&self.tls).await;
        *last_failure = result.as_ref().err().cloned();
        // Counted when it ends: a request that came while it ran takes its outcome rather than
        // waiting for one more attempt (on a silent path, one more connect timeout).
        conns.attempts.fetch_add(1, Ordering::AcqRel);
        match result? {
            Opened::H2(conn) => {
                let conn = Arc::new(conn);
                conns.h2.store(Some(conn.clone()));
                Ok(Shared::H2(conn))
            }
            Opened::Http1(sender) => {
                tracing::info!(target = %self.target(), "peer does not offer h2; using pooled HTTP/1.1");
                self.http1_mode.store(true, Ordering::Relaxed);
                conns.http1_idle.checkin(sender);
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
                let lost = Arc::new(OnceLock::new());
                tokio::spawn(drive_h2_client(
                    conn,
                    self.keepalive,
                    Ended {
                        closed: closed.clone(),
                        lost: lost.clone(),
                        counted: self.peer.metrics().upstream_connections_lost.clone(),
                    },
                    self.peer.metrics().connection(Direction::Outbound),
                    target.clone(),
                ));
                Ok(Opened::H2(H2Conn {
                    sender,
                    closed,
                    lost,
                }))
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
                    Some(self.peer.metrics().connection(Direction::Outbound)),
                );
                Ok(Opened::Http1(sender))
            }
        }
    }

    /// A WebSocket upgrade request on a dedicated mTLS HTTP/1.1 connection to the peer (see
    /// [`crate::upgrade`] for why not a stream of the pooled HTTP/2 connection).
    pub async fn upgrade(&self, req: Request<Incoming>) -> Result<Switch, ForwardError> {
        let mut req = req.map(ReqBody::Hyper);
        to_origin_form(&mut req);
        let io = match self.peer.connect_http(&self.tls_http1).await? {
            PeerIo::Http1(io) => io,
            PeerIo::H2(_) => {
                return Err(failed(
                    self.target(),
                    "peer chose h2, which was not offered",
                ))
            }
        };
        let guard = self.peer.metrics().connection(Direction::Outbound);
        send_upgrade(io, req, self.target(), Some(guard)).await
    }

    async fn send_http1(
        &self,
        req: Request<Incoming>,
    ) -> Result<Response<ProxyBody>, ForwardError> {
        let mut req = req.map(ReqBody::Hyper);
        to_origin_form(&mut req);
        let idle = &self.conns.get().http1_idle;
        loop {
            let (sender, reused) = match idle.checkout() {
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
            match send_pooled(sender, req, idle).await {
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

/// Where the connection's driver reports its end.
struct Ended {
    closed: Arc<AtomicBool>,
    lost: Arc<OnceLock<String>>,
    /// `trellis_upstream_connections_lost_total`.
    counted: prometheus_client::metrics::counter::Counter,
}

/// Runs the pooled connection until it ends, PINGing it every `keepalive.interval` (idle or
/// not) and closing it when a PING goes unanswered for `keepalive.timeout`; then marks it
/// closed so the next request opens a new one. Dropping the connection fails every stream
/// still waiting on it: with `lost` set first, those requests answer `503` at once instead of
/// hanging until their request timeout.
async fn drive_h2_client<T>(
    mut conn: h2::client::Connection<T, Bytes>,
    keepalive: Keepalive,
    ended: Ended,
    _open: crate::metrics::ConnectionGuard,
    target: Arc<str>,
) where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let ping_pong = conn.ping_pong();
    let pinging = async move {
        let Some(mut ping_pong) = ping_pong else {
            return std::future::pending::<Option<Duration>>().await;
        };
        loop {
            tokio::time::sleep(keepalive.interval).await;
            match tokio::time::timeout(keepalive.timeout, ping_pong.ping(h2::Ping::opaque())).await
            {
                Ok(Ok(_pong)) => {}
                Ok(Err(_)) => return None,
                Err(_) => return Some(keepalive.timeout),
            }
        }
    };
    tokio::select! {
        done = &mut conn => {
            if let Err(e) = done {
                tracing::debug!(%target, error = %e, "upstream HTTP/2 connection ended");
            }
        }
        unanswered = pinging => match unanswered {
            Some(waited) => {
                let detail = format!(
                    "no reply to an HTTP/2 PING within {}",
                    humantime::format_duration(waited)
                );
                tracing::warn!(%target, %detail, "closing the upstream HTTP/2 connection: the peer stopped answering");
                let _ = ended.lost.set(detail);
                ended.counted.inc();
            }
            None => tracing::debug!(%target, "upstream HTTP/2 connection failed"),
        },
    }
    ended.closed.store(true, Ordering::Release);
    // `conn` drops here, after `lost` is set: its waiting streams fail with a broken pipe.
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
    B::Error: Into<crate::body::BoxError> + Send,
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
    B::Error: Into<crate::body::BoxError>,
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
            .map_err(crate::body::BoxError::from),
        Some(Err(e)) => {
            send.send_reset(h2::Reason::INTERNAL_ERROR);
            Err(e.into())
        }
        Some(Ok(frame)) => {
            let body = Prepended {
                first: Some(frame),
                rest: body,
            };
            // Unbounded here: the app's connection has its own idle bound (`idle_timeout`).
            crate::body::pipe_to_h2(body, &mut send, None).await
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
    use http::StatusCode;
    use std::net::SocketAddr;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpStream;

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
            lost: Arc::new(OnceLock::new()),
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

    /// A peer that stops answering (packets dropped on the way): the keepalive closes the
    /// connection and the request waiting on it gets `503` naming the cause, in about the
    /// keepalive's interval + timeout rather than its request timeout.
    #[tokio::test]
    async fn silent_peer_fails_waiting_request_with_503_at_keepalive_timeout() {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await.unwrap();
            // Its SETTINGS, then silence: reads everything, answers nothing, not even PINGs.
            tcp.write_all(&[0, 0, 0, 0x4, 0, 0, 0, 0, 0]).await.unwrap();
            let mut sink = vec![0u8; 4096];
            while tcp.read(&mut sink).await.is_ok_and(|n| n > 0) {}
        });
        let tcp = TcpStream::connect(addr).await.unwrap();
        let (sender, conn) = h2::client::handshake(tcp).await.unwrap();
        let metrics = crate::metrics::SidecarMetrics::new();
        let counted = metrics.upstream_connections_lost.clone();
        let h2c = H2Conn {
            sender,
            closed: Arc::new(AtomicBool::new(false)),
            lost: Arc::new(OnceLock::new()),
        };
        let target: Arc<str> = "upstream `b` (test)".into();
        tokio::spawn(drive_h2_client(
            conn,
            Keepalive {
                interval: Duration::from_millis(100),
                timeout: Duration::from_millis(300),
            },
            Ended {
                closed: h2c.closed.clone(),
                lost: h2c.lost.clone(),
                counted: counted.clone(),
            },
            metrics.connection(Direction::Outbound),
            target.clone(),
        ));
        let started = std::time::Instant::now();
        let sent = send_h2(&h2c, get("/hang", http_body_util::Empty::<Bytes>::new()));
        let err = match tokio::time::timeout(Duration::from_secs(5), sent).await {
            Ok(Err((e, None))) => h2c.failure(&target, e),
            Ok(Err((e, Some(_)))) => panic!("handed back for a resend: {e}"),
            Ok(Ok(r)) => panic!("answered {}", r.status()),
            Err(_) => panic!("still waiting after 5 s: the keepalive did not close it"),
        };
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(err.status(), StatusCode::SERVICE_UNAVAILABLE, "{err}");
        assert!(
            err.to_string()
                .contains("stopped answering: no reply to an HTTP/2 PING within 300ms"),
            "{err}"
        );
        assert!(!h2c.is_live());
        assert_eq!(counted.get(), 1);
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
