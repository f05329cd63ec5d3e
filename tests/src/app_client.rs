//! The app's side of a sidecar: plain HTTP/1.1 or h2c (prior knowledge) to the outbound
//! listener, with streaming request bodies.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode, Version};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt as _, Empty, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt as _;

/// A request body the client can stream.
pub type ReqBody = UnsyncBoxBody<Bytes, std::io::Error>;

/// How long one request may take, headers and body, unless a test says otherwise.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);

/// Which HTTP the app speaks to its sidecar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    /// HTTP/1.1 with keep-alive.
    H1,
    /// HTTP/2 over plain TCP with prior knowledge.
    H2c,
}

/// An empty body.
pub fn empty() -> ReqBody {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

/// A body of `bytes`.
pub fn full(bytes: impl Into<Bytes>) -> ReqBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// A body fed chunk by chunk through the returned sender; it ends when the sender is dropped.
pub fn channel_body() -> (mpsc::Sender<Bytes>, ReqBody) {
    let (tx, rx) = mpsc::channel::<Bytes>(2);
    let stream = ReceiverStream::new(rx).map(|b| Ok::<_, std::io::Error>(Frame::data(b)));
    (tx, StreamBody::new(stream).boxed_unsync())
}

/// A response with its body read to the end.
#[derive(Debug, Clone)]
pub struct Reply {
    /// Status.
    pub status: StatusCode,
    /// HTTP version of the response.
    pub version: Version,
    /// Headers.
    pub headers: HeaderMap,
    /// Body.
    pub body: Bytes,
}

impl Reply {
    /// The body as text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON.
    pub fn json(&self) -> anyhow::Result<serde_json::Value> {
        serde_json::from_slice(&self.body)
            .with_context(|| format!("response body is not JSON: {:?}", self.text()))
    }

    /// Status and body on one line, for error messages.
    pub fn summary(&self) -> String {
        let mut body = self.text();
        if body.len() > 300 {
            body.truncate(300);
            body.push('…');
        }
        format!("{} {body:?}", self.status)
    }
}

enum Sender {
    H1(http1::SendRequest<ReqBody>),
    H2(http2::SendRequest<ReqBody>),
}

/// One connection from the app to a sidecar's outbound listener.
pub struct AppConn {
    sender: Sender,
    proto: Proto,
}

impl AppConn {
    /// Connects to `addr` and performs the HTTP handshake (nothing for HTTP/1.1, the h2
    /// preface for h2c).
    pub async fn connect(addr: SocketAddr, proto: Proto) -> anyhow::Result<Self> {
        let tcp = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connect {addr}"))?;
        tcp.set_nodelay(true)?;
        let io = TokioIo::new(tcp);
        let sender = match proto {
            Proto::H1 => {
                let (tx, conn) = http1::handshake(io).await?;
                tokio::spawn(conn);
                Sender::H1(tx)
            }
            Proto::H2c => {
                let (tx, conn) = http2::handshake(TokioExecutor::new(), io).await?;
                tokio::spawn(conn);
                Sender::H2(tx)
            }
        };
        Ok(AppConn { sender, proto })
    }

    /// A request for `host` + `path` in the form this connection's protocol wants: origin-form
    /// and a `Host` header for HTTP/1.1; an absolute URI (`:authority`) for h2.
    pub fn request(&self, method: Method, host: &str, path: &str) -> http::request::Builder {
        match self.proto {
            Proto::H1 => Request::builder()
                .method(method)
                .uri(path)
                .header(http::header::HOST, host),
            Proto::H2c => Request::builder()
                .method(method)
                .version(Version::HTTP_2)
                .uri(format!("http://{host}{path}")),
        }
    }

    /// Sends `req`; returns when the response head arrives.
    pub async fn send(&mut self, req: Request<ReqBody>) -> anyhow::Result<Response<Incoming>> {
        let what = format!("{} {}", req.method(), req.uri());
        let fut = async {
            match &mut self.sender {
                Sender::H1(tx) => {
                    tx.ready().await?;
                    tx.send_request(req).await
                }
                Sender::H2(tx) => {
                    tx.ready().await?;
                    tx.send_request(req).await
                }
            }
        };
        tokio::time::timeout(REQUEST_TIMEOUT, fut)
            .await
            .map_err(|_| anyhow!("{what}: no response head within {REQUEST_TIMEOUT:?}"))?
            .with_context(|| format!("{what}: send"))
    }

    /// Sends `req` and reads the whole response body.
    pub async fn send_read(&mut self, req: Request<ReqBody>) -> anyhow::Result<Reply> {
        let what = format!("{} {}", req.method(), req.uri());
        let resp = self.send(req).await?;
        read_reply(resp)
            .await
            .with_context(|| format!("{what}: read body"))
    }

    /// `GET path` on `host` with extra headers, body read to the end.
    pub async fn get(
        &mut self,
        host: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> anyhow::Result<Reply> {
        let mut b = self.request(Method::GET, host, path);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        self.send_read(b.body(empty())?).await
    }
}

/// Reads a response body to the end (within [`REQUEST_TIMEOUT`]).
pub async fn read_reply(resp: Response<Incoming>) -> anyhow::Result<Reply> {
    let (parts, body) = resp.into_parts();
    let body = tokio::time::timeout(REQUEST_TIMEOUT, body.collect())
        .await
        .map_err(|_| anyhow!("body not complete within {REQUEST_TIMEOUT:?}"))??
        .to_bytes();
    Ok(Reply {
        status: parts.status,
        version: parts.version,
        headers: parts.headers,
        body,
    })
}

/// One request on a fresh connection.
pub async fn get_once(
    addr: SocketAddr,
    proto: Proto,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> anyhow::Result<Reply> {
    AppConn::connect(addr, proto)
        .await?
        .get(host, path, headers)
        .await
}

/// Checks that `reply` is a 200 JSON echo from the app and returns it.
pub fn echo_json(reply: &Reply) -> anyhow::Result<serde_json::Value> {
    if reply.status != StatusCode::OK {
        bail!("want 200 from the app, got {}", reply.summary());
    }
    reply.json()
}
