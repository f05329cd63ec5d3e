//! Pieces both proxies share: the response body type, error responses, hop-by-hop header
//! removal, the access log line, and connection-serving helpers.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Response, StatusCode, Version};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::drain::Drain;
use crate::h1_framing::FramingReport;
use crate::metrics::{Direction, Listener, SidecarMetrics};
use crate::pool::PooledBody;

/// Errors a body can end with.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Every response either proxy sends: streamed from a peer over HTTP/2, streamed from a pooled
/// HTTP/1.1 connection, streamed from another hyper connection, or a short text message the
/// sidecar wrote itself. An enum, not a boxed trait object, so a response costs no allocation
/// for its body.
#[derive(Debug)]
pub enum ProxyBody {
    /// Streamed from an HTTP/2 stream (the pooled connection to a peer sidecar).
    H2(H2Body),
    /// Streamed from a pooled HTTP/1.1 connection; the connection goes back to the pool at the
    /// end of the body.
    Pooled(PooledBody),
    /// Streamed from a hyper connection.
    Stream(Incoming),
    /// Written by the sidecar (errors, 404s). Yields once.
    Text(Option<Bytes>),
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ProxyBody::H2(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            ProxyBody::Pooled(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            ProxyBody::Stream(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            ProxyBody::Text(t) => Poll::Ready(t.take().map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::H2(b) => b.is_end_stream(),
            ProxyBody::Pooled(b) => b.is_end_stream(),
            ProxyBody::Stream(b) => b.is_end_stream(),
            ProxyBody::Text(t) => t.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::H2(b) => b.size_hint(),
            ProxyBody::Pooled(b) => b.size_hint(),
            ProxyBody::Stream(b) => b.size_hint(),
            ProxyBody::Text(t) => SizeHint::with_exact(t.as_ref().map_or(0, |b| b.len() as u64)),
        }
    }
}

/// A request body on its way to a pooled HTTP/1.1 connection: from a hyper connection (an
/// HTTP/1.1 peer, or the app) or from an HTTP/2 stream.
#[derive(Debug)]
pub enum ReqBody {
    /// From a hyper connection.
    Hyper(Incoming),
    /// From an HTTP/2 stream.
    H2(H2Body),
}

impl Body for ReqBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ReqBody::Hyper(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            ReqBody::H2(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ReqBody::Hyper(b) => b.is_end_stream(),
            ReqBody::H2(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ReqBody::Hyper(b) => b.size_hint(),
            ReqBody::H2(b) => b.size_hint(),
        }
    }
}

/// The body of an HTTP/2 stream (request on the inbound side, response on the outbound side).
/// Flow-control capacity is handed back as soon as a chunk is taken, so the peer may send the
/// next window while this one is written onward.
#[derive(Debug)]
pub struct H2Body {
    recv: h2::RecvStream,
    /// From `content-length`, counted down: lets hyper send a length instead of chunking.
    remaining: Option<u64>,
    data_done: bool,
}

impl H2Body {
    /// Wraps `recv`; `headers` are the message's (for `content-length`).
    pub fn new(recv: h2::RecvStream, headers: &HeaderMap) -> Self {
        let remaining = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        Self {
            recv,
            remaining,
            data_done: false,
        }
    }
}

impl Body for H2Body {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let this = self.get_mut();
        if !this.data_done {
            match this.recv.poll_data(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(data))) => {
                    // Only fails once the stream is gone, which the next poll reports.
                    let _ = this.recv.flow_control().release_capacity(data.len());
                    if let Some(rest) = this.remaining.as_mut() {
                        *rest = rest.saturating_sub(data.len() as u64);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(None) => this.data_done = true,
            }
        }
        match this.recv.poll_trailers(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(Some(trailers))) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Poll::Ready(Ok(None)) => Poll::Ready(None),
            Poll::Ready(Err(e)) => Poll::Ready(Some(Err(e))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        match self.remaining {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

/// Streams `body` into an HTTP/2 stream, respecting flow control, ending the stream with the
/// last data frame (no separate empty frame) or with trailers. Stops when the peer resets the
/// stream; resets it when `body` fails.
pub(crate) async fn pipe_to_h2<B>(body: B, send: &mut h2::SendStream<Bytes>) -> Result<(), BoxError>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let mut body = std::pin::pin!(body);
    loop {
        let frame = std::future::poll_fn(|cx| {
            if let Poll::Ready(reset) = send.poll_reset(cx) {
                let why = match reset {
                    Ok(reason) => format!("peer reset the stream ({reason})"),
                    Err(e) => e.to_string(),
                };
                return Poll::Ready(Err(BoxError::from(why)));
            }
            body.as_mut().poll_frame(cx).map(Ok)
        })
        .await?;
        let frame = match frame {
            None => {
                send.send_data(Bytes::new(), true)?;
                return Ok(());
            }
            Some(Ok(frame)) => frame,
            Some(Err(e)) => {
                send.send_reset(h2::Reason::INTERNAL_ERROR);
                return Err(e.into());
            }
        };
        match frame.into_data() {
            Ok(mut data) => {
                let last = body.is_end_stream();
                if data.is_empty() && !last {
                    continue;
                }
                loop {
                    if data.is_empty() {
                        // Only reached for an empty last frame.
                        send.send_data(data, true)?;
                        break;
                    }
                    send.reserve_capacity(data.len());
                    let capacity = match std::future::poll_fn(|cx| send.poll_capacity(cx)).await {
                        Some(Ok(n)) => n,
                        Some(Err(e)) => return Err(e.into()),
                        None => return Err("the stream closed while sending".into()),
                    };
                    if capacity == 0 {
                        continue;
                    }
                    let chunk = data.split_to(capacity.min(data.len()));
                    let end = last && data.is_empty();
                    send.send_data(chunk, end)?;
                    if data.is_empty() {
                        break;
                    }
                }
                if last {
                    return Ok(());
                }
            }
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    send.send_trailers(trailers)?;
                    return Ok(());
                }
            }
        }
    }
}

/// A `text/plain` response whose body is `message` on one line.
pub fn text_response(status: StatusCode, message: &str) -> Response<ProxyBody> {
    let mut line = String::with_capacity(message.len() + 1);
    line.extend(
        message
            .chars()
            .map(|c| if c == '\n' || c == '\r' { ' ' } else { c }),
    );
    line.push('\n');
    let mut response = Response::new(ProxyBody::Text(Some(Bytes::from(line))));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// `tracing` target of the access log (`RUST_LOG=trellis::access=off` silences it too).
pub const ACCESS_LOG_TARGET: &str = "trellis::access";

/// One access-log line: what was asked, of whom, by whom, and how it ended.
///
/// Deliberately narrow: the path without its query string (queries carry tokens often
/// enough), the method and the status; never a header value, a body, a key or a token.
pub(crate) struct AccessEntry<'a> {
    /// Inbound: the peer's SPIFFE ID; outbound: ours (`None` before the first SVID).
    pub(crate) caller: Option<&'a str>,
    pub(crate) direction: Direction,
    pub(crate) method: &'a Method,
    /// As forwarded (inbound with a policy: the normalized path the policy decided on).
    pub(crate) path: &'a str,
    pub(crate) status: StatusCode,
    /// Request head received to response head ready.
    pub(crate) took: Duration,
    /// Outbound: the upstream's name (`None`: no upstream matched); inbound: the app address.
    pub(crate) upstream: Option<&'a str>,
    /// The deciding rule of a policy denial.
    pub(crate) rule: Option<&'a str>,
}

impl AccessEntry<'_> {
    /// Emits the line: a `tracing` event at INFO, target [`ACCESS_LOG_TARGET`], structured
    /// fields (so `--log-format json` renders them as JSON).
    pub(crate) fn emit(&self) {
        // Milliseconds with microsecond resolution: `0.417`, not `0.41700000000000004`.
        let duration_ms = self.took.as_micros() as f64 / 1000.0;
        tracing::info!(
            target: ACCESS_LOG_TARGET,
            caller = self.caller,
            direction = self.direction.as_str(),
            method = self.method.as_str(),
            path = self.path,
            status = self.status.as_u16(),
            duration_ms,
            upstream = self.upstream,
            rule = self.rule,
            "request"
        );
    }
}

/// The `rustls::Error` inside an I/O error from tokio-rustls, if there is one.
pub fn tls_error(err: &io::Error) -> Option<&rustls::Error> {
    err.get_ref()?.downcast_ref::<rustls::Error>()
}

/// Connects with a timeout and turns Nagle off (requests are small and latency-bound).
pub async fn connect_tcp(addr: TcpTarget<'_>, timeout: Duration) -> io::Result<TcpStream> {
    let connect = async {
        match addr {
            TcpTarget::Addr(a) => TcpStream::connect(a).await,
            TcpTarget::Name(n) => TcpStream::connect(n).await,
        }
    };
    let stream = tokio::time::timeout(timeout, connect).await.map_err(|_| {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no answer within {}", humantime::format_duration(timeout)),
        )
    })??;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Where to connect: a resolved address, or `host:port` to resolve per connection.
#[derive(Debug, Clone, Copy)]
pub enum TcpTarget<'a> {
    /// Already an address.
    Addr(SocketAddr),
    /// Resolved through the system resolver at each connect.
    Name(&'a str),
}

/// A connection hyper serves that can be asked to wind down.
pub(crate) trait GracefulConnection: Future {
    fn begin_shutdown(self: Pin<&mut Self>);
}

impl<I, S, B> GracefulConnection for hyper::server::conn::http1::Connection<I, S>
where
    S: hyper::service::HttpService<Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
    B: Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn begin_shutdown(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

impl<I, S, E, B> GracefulConnection for hyper_util::server::conn::auto::Connection<'_, I, S, E>
where
    S: hyper::service::Service<http::Request<Incoming>, Response = Response<B>>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    S::Future: 'static,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + 'static,
    B: Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    E: hyper::rt::bounds::Http2ServerConnExec<S::Future, B>,
{
    fn begin_shutdown(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

/// How long a draining HTTP/1.1 connection that is idle is kept open for one more request
/// (answered with `Connection: close`) before it is closed. Closing an idle keep-alive
/// connection races with a request the client may be writing into it at that moment, which
/// then fails without an answer; a client that is told `Connection: close` on a response
/// instead opens a new connection for its next request and never sends it into a closing one.
pub const HTTP1_DRAIN_GRACE: Duration = Duration::from_secs(1);

/// After an idle connection's GOAWAY, how long the peer has to finish the close while no byte
/// moves. hyper's HTTP/2 graceful close waits for the peer's PING ACK; without this bound a peer
/// that never answers would hold its connection (and its slot) forever.
pub const IDLE_GOAWAY_GRACE: Duration = Duration::from_secs(5);

/// A served connection's drain state, shared with the service that answers its requests;
/// also what its HTTP/1.1 framing guard found (one allocation per connection for both).
#[derive(Debug, Default)]
pub(crate) struct ConnDrain {
    draining: AtomicBool,
    http2: AtomicBool,
    /// Filled by [`crate::h1_framing::RequestFraming`] as it reads, checked by the service per request.
    pub(crate) framing: FramingReport,
}

impl AsRef<FramingReport> for ConnDrain {
    fn as_ref(&self) -> &FramingReport {
        &self.framing
    }
}

impl ConnDrain {
    /// Called with every response: records the protocol and, once draining, marks an
    /// HTTP/1.x response `Connection: close` (hyper then closes the connection after it).
    pub(crate) fn on_response(&self, version: Version, headers: &mut HeaderMap) {
        if version == Version::HTTP_2 {
            self.http2.store(true, Ordering::Relaxed);
        } else if self.draining.load(Ordering::Relaxed) {
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
    }
}

/// Serves `conn` to its end. Once `drain` signals: HTTP/2 gets GOAWAY at once (hyper's graceful
/// shutdown; in-flight streams finish); HTTP/1.1 answers its next response with
/// `Connection: close` and is closed if it stays idle for [`HTTP1_DRAIN_GRACE`] (an in-flight
/// request still finishes). When no byte has moved for `idle_timeout` (see [`IdleClock`]) the
/// connection is shut down gracefully the same way, and dropped if it then stays silent for
/// [`IDLE_GOAWAY_GRACE`]. Holds `drain` until the connection is gone.
pub(crate) async fn serve_until_drained<C, E>(
    conn: C,
    drain: Drain,
    state: &ConnDrain,
    clock: &Arc<IdleClock>,
    idle_timeout: Duration,
) -> Result<(), E>
where
    C: GracefulConnection<Output = Result<(), E>>,
{
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        biased;
        res = conn.as_mut() => return res,
        () = drain.signaled() => {}
        () = Arc::clone(clock).expired(idle_timeout) => {
            conn.as_mut().begin_shutdown();
            // `conn` first: polling it writes the GOAWAY, which restarts the clock.
            return tokio::select! {
                biased;
                res = conn.as_mut() => res,
                () = Arc::clone(clock).expired(IDLE_GOAWAY_GRACE) => Ok(()),
            };
        }
    }
    state.draining.store(true, Ordering::Relaxed);
    if !state.http2.load(Ordering::Relaxed) {
        tokio::select! {
            biased;
            res = conn.as_mut() => return res,
            () = tokio::time::sleep(HTTP1_DRAIN_GRACE) => {}
        }
    }
    conn.as_mut().begin_shutdown();
    conn.await
}

/// A cap on one listener's open connections. Past it a connection is accepted and closed at
/// once (cheaper and clearer for the peer than leaving it in the kernel backlog) and counted in
/// `trellis_connections_refused_total{listener}`.
pub(crate) struct ConnLimit {
    open: AtomicUsize,
    max: usize,
    listener: Listener,
    metrics: Arc<SidecarMetrics>,
}

impl ConnLimit {
    /// At most `max` open connections on a `listener`.
    pub(crate) fn new(max: usize, listener: Listener, metrics: Arc<SidecarMetrics>) -> Arc<Self> {
        Arc::new(Self {
            open: AtomicUsize::new(0),
            max,
            listener,
            metrics,
        })
    }

    /// A permit for one more connection, or `None` (counted) when the listener is full.
    pub(crate) fn try_acquire(self: &Arc<Self>) -> Option<ConnPermit> {
        if self.open.fetch_add(1, Ordering::AcqRel) >= self.max {
            self.open.fetch_sub(1, Ordering::AcqRel);
            self.metrics.connection_refused(self.listener);
            return None;
        }
        Some(ConnPermit(Arc::clone(self)))
    }
}

/// One open connection of a [`ConnLimit`]; released on drop.
pub(crate) struct ConnPermit(Arc<ConnLimit>);

impl Drop for ConnPermit {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// When a connection last moved a byte, for the idle timeout: one relaxed store per read or
/// write, no timer reset per I/O.
#[derive(Debug)]
pub(crate) struct IdleClock {
    base: Instant,
    /// Milliseconds since `base`.
    last: AtomicU64,
}

impl IdleClock {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self {
            base: Instant::now(),
            last: AtomicU64::new(0),
        })
    }

    fn touch(&self) {
        let now = u64::try_from(self.base.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(now, Ordering::Relaxed);
    }

    /// Completes once no byte has moved for `timeout` (checked when the last deadline passes,
    /// so a busy connection costs one timer per `timeout`).
    pub(crate) async fn expired(self: Arc<Self>, timeout: Duration) {
        loop {
            let last = self.base + Duration::from_millis(self.last.load(Ordering::Relaxed));
            let deadline = last + timeout;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline.into()).await;
        }
    }
}

/// An I/O stream that records its activity in an [`IdleClock`].
#[derive(Debug)]
pub(crate) struct Tracked<T> {
    inner: T,
    clock: Arc<IdleClock>,
}

impl<T> Tracked<T> {
    pub(crate) fn new(inner: T, clock: Arc<IdleClock>) -> Self {
        Self { inner, clock }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Tracked<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.clock.touch();
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Tracked<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write(cx, data);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            this.clock.touch();
        }
        polled
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            this.clock.touch();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// `414` for a request target longer than `max` bytes, else `None`. With `Connection: close`
/// for HTTP/1.x: a peer that sends such targets gets no further requests on the connection.
pub(crate) fn uri_too_long(
    uri: &http::Uri,
    version: Version,
    max: usize,
) -> Option<Response<ProxyBody>> {
    // The request target: authority (absolute form, or HTTP/2 `:authority`) + path and query.
    let len = uri.authority().map_or(0, |a| a.as_str().len())
        + uri.path_and_query().map_or(0, |pq| pq.as_str().len());
    if len <= max {
        return None;
    }
    let mut response = text_response(
        StatusCode::URI_TOO_LONG,
        &format!("request target is {len} bytes; the limit is {max} (limits.max_uri_bytes)"),
    );
    if version != Version::HTTP_2 {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    Some(response)
}

/// An I/O stream with bytes already read from it put back in front.
#[derive(Debug)]
pub struct Prefixed<T> {
    prefix: Vec<u8>,
    pos: usize,
    inner: T,
}

impl<T> Prefixed<T> {
    /// `prefix` is returned by reads before anything from `inner`.
    pub fn new(prefix: Vec<u8>, inner: T) -> Self {
        Self {
            prefix,
            pos: 0,
            inner,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Prefixed<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.pos < this.prefix.len() {
            let rest = &this.prefix[this.pos..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.pos += n;
            if this.pos == this.prefix.len() {
                this.prefix = Vec::new();
                this.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Prefixed<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn text_response_is_one_line() {
        let r = text_response(StatusCode::BAD_GATEWAY, "a\nb\r\nc");
        let ProxyBody::Text(Some(b)) = r.body() else {
            panic!()
        };
        assert_eq!(&b[..], b"a b  c\n");
    }

    #[tokio::test]
    async fn prefixed_reads_prefix_first() {
        use tokio::io::AsyncReadExt;
        let mut io = Prefixed::new(b"abc".to_vec(), &b"def"[..]);
        let mut out = String::new();
        io.read_to_string(&mut out).await.unwrap();
        assert_eq!(out, "abcdef");
    }
}
