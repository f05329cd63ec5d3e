//! Pieces both proxies share: the response body type, error responses, hop-by-hop header
//! removal, the access log line, and the per-connection state the HTTP/1.1 services read.
//! Accepting, idle tracking and draining connections are `trellis-serve`'s.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Response, StatusCode, Version};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::net::TcpStream;
use trellis_serve::graceful::ConnState;

use crate::h1_framing::FramingReport;
use crate::metrics::Direction;
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

/// An I/O stream with bytes already read from it put back in front (the pooled peer
/// connection replays the bytes it read while choosing HTTP/2 or HTTP/1.1).
pub use trellis_serve::prefixed::Prefixed;

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
    /// Inbound: the path as received (query left out), which `trellis policy replay`
    /// decides again exactly as the sidecar did.
    pub(crate) raw_path: Option<&'a str>,
    pub(crate) status: StatusCode,
    /// Request head received to response head ready.
    pub(crate) took: Duration,
    /// Outbound: the upstream's name (`None`: no upstream matched); inbound: the app address.
    pub(crate) upstream: Option<&'a str>,
    /// The deciding rule (or `default`) when a policy decided.
    pub(crate) rule: Option<&'a str>,
    /// Inbound: `allow`, `deny` or `refused` (400 before authorization) when the request
    /// reached the policy hook (`None`: refused earlier, for its framing or headers).
    pub(crate) decision: Option<&'a str>,
    /// SHA-256 of the policy that decided (`None`: no policy).
    pub(crate) policy: Option<&'a str>,
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
            raw_path = self.raw_path,
            status = self.status.as_u16(),
            duration_ms,
            upstream = self.upstream,
            rule = self.rule,
            decision = self.decision,
            policy = self.policy,
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

/// A served connection's state, shared with the service that answers its requests: its drain
/// state (`trellis-serve`) and what its HTTP/1.1 framing guard found (one allocation per
/// connection for both).
#[derive(Debug, Default)]
pub(crate) struct ConnDrain {
    /// Whether the connection is draining (responses then say `Connection: close`).
    pub(crate) drain: ConnState,
    /// Filled by [`crate::h1_framing::RequestFraming`] as it reads, checked by the service per request.
    pub(crate) framing: FramingReport,
}

impl AsRef<FramingReport> for ConnDrain {
    fn as_ref(&self) -> &FramingReport {
        &self.framing
    }
}

impl ConnDrain {
    /// Called with every response: see [`ConnState::on_response`].
    pub(crate) fn on_response(&self, version: Version, headers: &mut HeaderMap) {
        self.drain.on_response(version, headers);
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
        &format!("request target is {len} bytes; the limit is {max} (limits.http.max_uri_bytes)"),
    );
    if version != Version::HTTP_2 {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    Some(response)
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
}
