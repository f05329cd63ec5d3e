//! The body types of both proxies, and the HTTP/1.1 idle list a response body returns its
//! connection to when it has been read to its end.

use bytes::Bytes;
use http::header::{self, HeaderMap};
use http::{Request, Response};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1;
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

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

/// A body that neither yielded a frame nor could send one for this long, so its stream was
/// reset (`CANCEL`): an app that sent its response head and then stalled, or a reader that
/// stopped taking data.
#[derive(Debug, thiserror::Error)]
#[error("the body moved no data for {}", humantime::format_duration(*.0))]
pub struct Stalled(pub Duration);

/// Streams `body` into an HTTP/2 stream, respecting flow control, ending the stream with the
/// last data frame (no separate empty frame) or with trailers. Stops when the peer resets the
/// stream; resets it when `body` fails. With `stall`, a body that yields no frame (or a frame
/// that finds no send capacity) for that long resets the stream with `CANCEL` and ends with
/// [`Stalled`]: the stream, and the app connection behind it, are not held forever.
pub(crate) async fn pipe_to_h2<B>(
    body: B,
    send: &mut h2::SendStream<Bytes>,
    stall: Option<Duration>,
) -> Result<(), BoxError>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let mut body = std::pin::pin!(body);
    let stall_bound = stall.unwrap_or(Duration::MAX);
    let deadline = |send: &mut h2::SendStream<Bytes>| {
        send.send_reset(h2::Reason::CANCEL);
        BoxError::from(Stalled(stall_bound))
    };
    loop {
        let next = std::future::poll_fn(|cx| {
            if let Poll::Ready(reset) = send.poll_reset(cx) {
                let why = match reset {
                    Ok(reason) => format!("peer reset the stream ({reason})"),
                    Err(e) => e.to_string(),
                };
                return Poll::Ready(Err(BoxError::from(why)));
            }
            body.as_mut().poll_frame(cx).map(Ok)
        });
        let frame = match within(next, stall).await {
            Some(frame) => frame?,
            None => return Err(deadline(send)),
        };
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
                    let capacity = std::future::poll_fn(|cx| send.poll_capacity(cx));
                    let capacity = match within(capacity, stall).await {
                        Some(capacity) => capacity,
                        None => return Err(deadline(send)),
                    };
                    let capacity = match capacity {
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

/// Awaits `fut`, for at most `bound` when there is one: `None` if the bound passed first.
async fn within<F: Future>(fut: F, bound: Option<Duration>) -> Option<F::Output> {
    let Some(bound) = bound else {
        return Some(fut.await);
    };
    // Most futures here are ready at once (a small response arrives with its head; send
    // capacity is usually there): a first poll without a timer spares each of them a clock
    // read and a timer.
    let mut fut = std::pin::pin!(fut);
    match ready_now(fut.as_mut()).await {
        Some(out) => Some(out),
        None => tokio::time::timeout(bound, fut).await.ok(),
    }
}

/// Polls `fut` once: its output if it is ready now, `None` (waker registered) if not.
async fn ready_now<F: Future + ?Sized>(fut: Pin<&mut F>) -> Option<F::Output> {
    let mut fut = Some(fut);
    std::future::poll_fn(|cx| match fut.take() {
        Some(mut f) => Poll::Ready(match f.as_mut().poll(cx) {
            Poll::Ready(out) => Some(out),
            Poll::Pending => None,
        }),
        None => Poll::Ready(None),
    })
    .await
}

/// Idle HTTP/1.1 connections kept per pool.
pub const MAX_IDLE_HTTP1: usize = 256;
/// An idle HTTP/1.1 connection older than this is closed instead of reused: apps close idle
/// keep-alive connections on their own timers (Node.js after 5 s), and a request written into
/// a connection the app is closing fails without a safe way to retry it.
pub const HTTP1_REUSE_WITHIN: Duration = Duration::from_secs(4);

// ---------------------------------------------------------------------------------------------
// HTTP/1.1 idle list and the body that returns a connection to it.

pub(crate) struct IdleConn {
    sender: http1::SendRequest<ReqBody>,
    since: Instant,
}

/// Idle HTTP/1.1 connections, newest at the back.
pub(crate) struct Http1Idle {
    list: Mutex<VecDeque<IdleConn>>,
}

impl Http1Idle {
    pub(crate) fn new() -> Arc<Self> {
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
    pub(crate) fn checkout(&self) -> Option<http1::SendRequest<ReqBody>> {
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

    pub(crate) fn checkin(&self, sender: http1::SendRequest<ReqBody>) {
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
    pub(crate) fn len(&self) -> usize {
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
    pub(crate) fn new(
        inner: Incoming,
        sender: http1::SendRequest<ReqBody>,
        idle: Arc<Http1Idle>,
    ) -> Self {
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
pub(crate) async fn send_pooled(
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

pub(crate) fn http1_builder() -> http1::Builder {
    http1::Builder::new()
}

pub(crate) fn spawn_http1<T>(
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
