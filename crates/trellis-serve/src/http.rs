//! The admin-style HTTP server: small requests answered by the process itself (the sidecar's
//! and the control plane's admin endpoints, the injection webhook). Each registers only its
//! [`Routes`]; accept, limits, idle close, drain and the `POST /shutdown` hand-off are here.
//!
//! Per connection:
//! - **protocol detection guard**: hyper-util's auto server waits for a client's first bytes
//!   without a deadline to tell HTTP/1 from HTTP/2, and HTTP/1's header timeout only starts
//!   after it; the server reads those bytes itself, within `header_read_timeout`, then hands
//!   them to hyper ([`crate::prefixed::Prefixed`]). A client that sends nothing, or trickles
//!   the HTTP/2 preface, is closed when the timeout passes (slowloris).
//! - **HTTP/1.1**: request head within `header_read_timeout` (hyper's timer, which also runs
//!   while a keep-alive connection waits for its next request), head at most
//!   `max_header_bytes` (larger: `431`), at most `max_headers` lines.
//! - **HTTP/2**: `max_streams_per_connection` streams, header list at most `max_header_bytes`,
//!   rapid reset bounded by `max_pending_resets` (and `max_local_error_resets`).
//! - **idle**: a connection that moves no byte for `idle_timeout` is shut down gracefully
//!   (HTTP/2: GOAWAY); a request still being answered finishes, otherwise the client gets
//!   [`IDLE_GOAWAY_GRACE`] to close before the connection is dropped.
//! - **drain**: graceful shutdown when the server's drain signals; dropped when it is forced.
//! - **shutdown hand-off**: a route that answers [`AdminAction::Shutdown`] (`POST /shutdown`)
//!   gets its response out first (HTTP/1.1 closes after it; at most [`SHUTDOWN_FLUSH`] for a
//!   client that keeps an HTTP/2 connection open), then the server's shutdown request is set.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::sync::{watch, Notify};

use crate::accept::{Handshake, Listener};
use crate::drain::Drain;
use crate::graceful::IDLE_GOAWAY_GRACE;
use crate::idle::{IdleClock, Tracked};
use crate::prefixed::Prefixed;

/// After a `202` to `/shutdown`, how long the response may take to reach the caller before
/// the shutdown starts anyway (HTTP/1.1 closes at once; an HTTP/2 client may linger).
pub const SHUTDOWN_FLUSH: Duration = Duration::from_secs(1);

/// The HTTP/2 connection preface (RFC 9113 3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What one connection of an admin-style server may hold (per listener: `limits.admin`,
/// `limits.webhook`, …; the connection cap is the [`Listener`]'s).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerLimits {
    /// Protocol detection and (HTTP/1.1) each request head must arrive within this.
    pub header_read_timeout: Duration,
    /// Largest HTTP/1.1 request head (hyper's read buffer; at least 8 KiB) and HTTP/2 header
    /// list.
    pub max_header_bytes: usize,
    /// Most HTTP/1.1 header lines; `None`: hyper's default (100).
    pub max_headers: Option<usize>,
    /// A connection that moves no byte for this long is closed; `None`: no idle close (an
    /// HTTP/1.1-only server whose header timeout also bounds the wait between requests).
    pub idle_timeout: Option<Duration>,
    /// Concurrent HTTP/2 streams per connection.
    pub max_streams_per_connection: u32,
    /// HTTP/2 streams a client may reset before they are accepted (rapid reset).
    pub max_pending_resets: usize,
    /// HTTP/2 streams the server may reset for the client's errors; `None`: hyper's default.
    pub max_local_error_resets: Option<usize>,
}

/// What one request asks of the process beyond its response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminAction {
    /// Nothing.
    None,
    /// `POST /shutdown` was accepted: stop (drain and exit) once the response is out.
    Shutdown,
}

/// The requests an admin-style server answers.
pub trait Routes: Send + Sync + 'static {
    /// Answers `req` from `peer`, and says what the process should do once it is sent.
    fn respond(
        &self,
        req: Request<Incoming>,
        peer: SocketAddr,
    ) -> impl Future<Output = (Response<Full<Bytes>>, AdminAction)> + Send;
}

/// An admin-style HTTP server over [`Routes`] `R`.
pub struct HttpServer<R> {
    routes: Arc<R>,
    builder: auto::Builder<TokioExecutor>,
    header_read_timeout: Duration,
    idle_timeout: Option<Duration>,
    detect_version: bool,
    shutdown_request: Option<watch::Sender<bool>>,
}

impl<R: Routes> HttpServer<R> {
    /// HTTP/1.1 and HTTP/2 (prior knowledge) within `limits`.
    pub fn new(routes: Arc<R>, limits: &ServerLimits) -> Self {
        let mut builder = auto::Builder::new(TokioExecutor::new());
        let mut h1 = builder.http1();
        h1.timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout)
            .max_buf_size(limits.max_header_bytes);
        if let Some(n) = limits.max_headers {
            h1.max_headers(n);
        }
        let mut h2 = builder.http2();
        h2.timer(TokioTimer::new())
            .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
            .max_concurrent_streams(limits.max_streams_per_connection)
            .max_pending_accept_reset_streams(limits.max_pending_resets);
        if let Some(n) = limits.max_local_error_resets {
            h2.max_local_error_reset_streams(n);
        }
        Self {
            routes,
            builder,
            header_read_timeout: limits.header_read_timeout,
            idle_timeout: limits.idle_timeout,
            detect_version: true,
            shutdown_request: None,
        }
    }

    /// HTTP/1.1 only (no protocol detection: hyper's header timeout runs from the first read).
    pub fn http1_only(mut self) -> Self {
        self.builder = self.builder.http1_only();
        self.detect_version = false;
        self
    }

    /// Where an accepted [`AdminAction::Shutdown`] is reported (set to `true` once the
    /// response is out).
    pub fn on_shutdown_request(mut self, requested: watch::Sender<bool>) -> Self {
        self.shutdown_request = Some(requested);
        self
    }

    /// Serves every connection `listener` accepts until `drain` signals; connections wind down
    /// with it.
    pub async fn serve<H>(self, listener: Listener<H>, drain: Drain)
    where
        H: Handshake,
        H::Io: AsyncRead + AsyncWrite + Unpin,
    {
        let server = Arc::new(self);
        listener
            .serve(&drain, |conn| {
                let (server, drain) = (Arc::clone(&server), drain.clone());
                async move {
                    let peer = conn.peer();
                    if let Some(io) = conn.handshake().await {
                        server.serve_connection(io, peer, drain).await;
                    }
                }
            })
            .await;
    }

    /// Serves one connection from `peer` to its end.
    pub async fn serve_connection<I>(&self, mut io: I, peer: SocketAddr, drain: Drain)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let first = if self.detect_version {
            match read_version(&mut io, self.header_read_timeout).await {
                Some(first) => first,
                None => {
                    tracing::debug!(%peer, "client sent no request in time; closing");
                    return;
                }
            }
        } else {
            Vec::new()
        };
        let shared = Arc::new(ConnShared::default());
        let svc = {
            let (routes, shared) = (Arc::clone(&self.routes), Arc::clone(&shared));
            hyper::service::service_fn(move |req: Request<Incoming>| {
                let (routes, shared) = (Arc::clone(&routes), Arc::clone(&shared));
                async move {
                    let _counted = InFlight::start(&shared);
                    let (resp, action) = routes.respond(req, peer).await;
                    if action == AdminAction::Shutdown {
                        shared.requested.store(true, Ordering::Release);
                        shared.notify.notify_one();
                    }
                    Ok::<_, Infallible>(resp)
                }
            })
        };
        let clock = IdleClock::new();
        let io = TokioIo::new(Tracked::new(Prefixed::new(first, io), Arc::clone(&clock)));
        let conn = self.builder.serve_connection(io, svc);
        let mut conn = std::pin::pin!(conn);
        let idle = async {
            match self.idle_timeout {
                Some(timeout) => Arc::clone(&clock).expired(timeout).await,
                None => std::future::pending().await,
            }
        };
        let ended = tokio::select! {
            result = conn.as_mut() => Some(result),
            () = shared.notify.notified() => None,
            () = idle => {
                tracing::debug!(%peer, "idle connection closed");
                conn.as_mut().graceful_shutdown();
                // A request still being answered finishes; otherwise the client gets
                // IDLE_GOAWAY_GRACE to close.
                loop {
                    match tokio::time::timeout(IDLE_GOAWAY_GRACE, conn.as_mut()).await {
                        Ok(result) => break Some(result),
                        Err(_) if shared.in_flight.load(Ordering::Acquire) == 0 => {
                            tracing::debug!(%peer, "idle connection did not close after GOAWAY; dropped");
                            break Some(Ok(()));
                        }
                        Err(_) => {}
                    }
                }
            }
            () = drain.signaled() => {
                conn.as_mut().graceful_shutdown();
                tokio::select! {
                    result = conn.as_mut() => Some(result),
                    () = drain.forced() => Some(Ok(())),
                }
            }
        };
        let result = match ended {
            Some(result) => Some(result),
            // The response is on its way and the connection closes after it; bounded, so a
            // client that keeps an HTTP/2 connection open cannot hold the shutdown back.
            None => tokio::time::timeout(SHUTDOWN_FLUSH, conn.as_mut())
                .await
                .ok(),
        };
        if let Some(Err(e)) = result {
            tracing::debug!(%peer, error = %e, "connection ended with an error");
        }
        if shared.requested.load(Ordering::Acquire) {
            if let Some(requested) = &self.shutdown_request {
                requested.send_replace(true);
            }
        }
    }
}

/// What a connection's requests tell its serving loop.
#[derive(Default)]
struct ConnShared {
    /// A route answered [`AdminAction::Shutdown`].
    requested: AtomicBool,
    notify: Notify,
    /// Requests being answered now.
    in_flight: AtomicUsize,
}

/// One request being answered; counted out when dropped (also when its future is dropped
/// early).
struct InFlight<'a>(&'a ConnShared);

impl<'a> InFlight<'a> {
    fn start(shared: &'a ConnShared) -> Self {
        shared.in_flight.fetch_add(1, Ordering::AcqRel);
        Self(shared)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Reads (at most `timeout`) until enough bytes have arrived to tell HTTP/1 from the HTTP/2
/// preface; returns them, to be read again by hyper. `None`: the client was too slow or went
/// away.
async fn read_version<I: AsyncRead + Unpin>(io: &mut I, timeout: Duration) -> Option<Vec<u8>> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut first = Vec::with_capacity(H2_PREFACE.len());
    let mut chunk = [0u8; H2_PREFACE.len()];
    loop {
        let want = H2_PREFACE.len() - first.len();
        let read = tokio::time::timeout_at(deadline, io.read(&mut chunk[..want])).await;
        let n = match read {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return None,
            Ok(Ok(n)) => n,
        };
        first.extend_from_slice(&chunk[..n]);
        // Decided once the bytes stop matching the preface, or the whole preface is there.
        if first.len() >= H2_PREFACE.len() || !H2_PREFACE.starts_with(&first) {
            return Some(first);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::limit::Uncounted;
    use http::{Method, StatusCode};
    use http_body_util::BodyExt as _;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpStream;

    /// `/` answers at once; `/slow` once `gate` opens; `POST /shutdown` asks for a shutdown.
    struct TestRoutes {
        gate: watch::Receiver<bool>,
    }

    impl Routes for TestRoutes {
        async fn respond(
            &self,
            req: Request<Incoming>,
            _peer: SocketAddr,
        ) -> (Response<Full<Bytes>>, AdminAction) {
            let text = |s: &'static str| Response::new(Full::new(Bytes::from_static(s.as_bytes())));
            match (req.method(), req.uri().path()) {
                (&Method::POST, "/shutdown") => {
                    let mut resp = text("bye\n");
                    *resp.status_mut() = StatusCode::ACCEPTED;
                    resp.headers_mut()
                        .insert(http::header::CONNECTION, "close".parse().unwrap());
                    (resp, AdminAction::Shutdown)
                }
                (_, "/slow") => {
                    let mut gate = self.gate.clone();
                    let _ = gate.wait_for(|open| *open).await;
                    (text("slow\n"), AdminAction::None)
                }
                _ => (text("ok\n"), AdminAction::None),
            }
        }
    }

    fn limits() -> ServerLimits {
        ServerLimits {
            header_read_timeout: Duration::from_secs(10),
            max_header_bytes: 8 << 10,
            max_headers: Some(32),
            idle_timeout: Some(Duration::from_secs(60)),
            max_streams_per_connection: 16,
            max_pending_resets: 20,
            max_local_error_resets: None,
        }
    }

    struct Running {
        addr: SocketAddr,
        signal: crate::drain::DrainSignal,
        gate: watch::Sender<bool>,
        shutdown: watch::Receiver<bool>,
    }

    async fn start(limits: ServerLimits) -> Running {
        let tcp = crate::accept::bind("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let listener = Listener::new(tcp, "test", 64, Arc::new(Uncounted));
        let addr = listener.local_addr().unwrap();
        let (gate, gate_rx) = watch::channel(false);
        let (shutdown_tx, shutdown) = watch::channel(false);
        let (signal, drain) = crate::drain::channel();
        let server = HttpServer::new(Arc::new(TestRoutes { gate: gate_rx }), &limits)
            .on_shutdown_request(shutdown_tx);
        tokio::spawn(server.serve(listener, drain));
        Running {
            addr,
            signal,
            gate,
            shutdown,
        }
    }

    async fn h1(addr: SocketAddr) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .unwrap();
        tokio::spawn(conn);
        send
    }

    fn request(method: Method, path: &str) -> Request<Full<Bytes>> {
        Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, "admin")
            .body(Full::new(Bytes::new()))
            .unwrap()
    }

    async fn text(resp: Response<Incoming>) -> String {
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8_lossy(&body).into_owned()
    }

    /// Reads until the server closes the connection; false if it stays open for 120 s.
    async fn closed_by_server(client: &mut TcpStream) -> bool {
        let mut buf = [0u8; 256];
        loop {
            match tokio::time::timeout(Duration::from_secs(120), client.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => continue,
                Err(_) => return false,
            }
        }
    }

    #[tokio::test]
    async fn serves_http1_and_http2_prior_knowledge() {
        let s = start(limits()).await;
        let mut send = h1(s.addr).await;
        let resp = send.send_request(request(Method::GET, "/")).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(text(resp).await, "ok\n");

        let tcp = TcpStream::connect(s.addr).await.unwrap();
        let (mut send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
                .await
                .unwrap();
        tokio::spawn(conn);
        let mut req = request(Method::GET, "http://admin/");
        *req.version_mut() = http::Version::HTTP_2;
        let resp = send.send_request(req).await.unwrap();
        assert_eq!(resp.version(), http::Version::HTTP_2);
        assert_eq!(text(resp).await, "ok\n");
    }

    #[tokio::test(start_paused = true)]
    async fn version_guard_closes_silent_and_trickling_clients_at_the_header_timeout() {
        let s = start(limits()).await;
        let started = tokio::time::Instant::now();
        let mut silent = TcpStream::connect(s.addr).await.unwrap();
        let mut trickling = TcpStream::connect(s.addr).await.unwrap();
        // Half the HTTP/2 preface: hyper alone would wait for the rest forever.
        trickling.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
        assert!(closed_by_server(&mut silent).await, "silent client kept");
        assert!(
            closed_by_server(&mut trickling).await,
            "trickling client kept"
        );
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_secs(10) && waited < Duration::from_secs(15),
            "{waited:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_moving_no_byte_is_closed_at_the_idle_timeout() {
        let s = start(ServerLimits {
            header_read_timeout: Duration::from_secs(600),
            idle_timeout: Some(Duration::from_secs(5)),
            ..limits()
        })
        .await;
        let mut tcp = TcpStream::connect(s.addr).await.unwrap();
        tcp.write_all(b"GET / HTTP/1.1\r\nhost: admin\r\n\r\n")
            .await
            .unwrap();
        let mut head = [0u8; 12];
        tcp.read_exact(&mut head).await.unwrap();
        assert_eq!(&head, b"HTTP/1.1 200");
        let quiet = tokio::time::Instant::now();
        assert!(closed_by_server(&mut tcp).await, "idle connection kept");
        let waited = quiet.elapsed();
        assert!(
            waited >= Duration::from_secs(5) && waited < Duration::from_secs(6),
            "{waited:?}"
        );
    }

    #[tokio::test]
    async fn shutdown_is_requested_once_the_response_is_out() {
        let mut s = start(limits()).await;
        let mut send = h1(s.addr).await;
        let resp = send
            .send_request(request(Method::POST, "/shutdown"))
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::ACCEPTED);
        assert_eq!(text(resp).await, "bye\n");
        tokio::time::timeout(Duration::from_secs(10), s.shutdown.wait_for(|asked| *asked))
            .await
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn drain_lets_an_in_flight_request_finish_and_stops_accepting() {
        let s = start(limits()).await;
        let mut send = h1(s.addr).await;
        let in_flight = tokio::spawn(send.send_request(request(Method::GET, "/slow")));
        // The request is being answered before the drain starts.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while s.gate.receiver_count() < 2 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "request never arrived"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let drained = tokio::spawn(s.signal.drain(Duration::from_secs(30)));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(s.addr).await.is_ok() {
            assert!(tokio::time::Instant::now() < deadline, "still accepting");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(
            !drained.is_finished(),
            "drain finished with a request in flight"
        );
        s.gate.send_replace(true);
        let resp = in_flight.await.unwrap().unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(text(resp).await, "slow\n");
        assert!(drained.await.unwrap(), "drain did not finish in time");
    }
}
