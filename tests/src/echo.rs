//! The workload behind a sidecar: a small HTTP server inside the test process.
//!
//! Routes (any method):
//! - `/bytes/<n>`: `n` bytes of [`pattern_byte`], streamed in 64 KiB chunks, never held whole.
//! - `/gated-bytes/<n>`: like `/bytes/<n>`, but after the first chunk it waits for
//!   [`EchoApp::open_gate`]: a test proves the first chunk reached the caller before the app
//!   produced the rest (the sidecars stream; they do not buffer a whole body).
//! - `/upload`: reads the request body as it arrives (progress in [`EchoApp::upload_progress`])
//!   and answers `{"len":…,"sha256":"…"}`.
//! - `/slow/<ms>`: counts the request in [`EchoApp::slow_started`], waits `ms`, answers `slow done`.
//! - anything else: a JSON echo of what the app saw: `{"app","method","path","version","headers"}`
//!   (`headers`: name → list of values).
//!
//! Every request's head is also recorded ([`EchoApp::seen`]).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt as _, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use sha2::{Digest as _, Sha256};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, Notify};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt as _;

/// Chunk size of streamed response bodies.
pub const CHUNK: usize = 64 * 1024;

/// Byte `i` of every generated body: a pattern that a shifted, truncated or duplicated chunk
/// does not reproduce.
pub fn pattern_byte(i: u64) -> u8 {
    // 251 is prime: the pattern does not line up with any power-of-two chunk size.
    (i % 251) as u8
}

/// `len` bytes of the pattern starting at `offset`.
pub fn pattern(offset: u64, len: usize) -> Bytes {
    (0..len as u64).map(|i| pattern_byte(offset + i)).collect()
}

/// The head of a request as the app received it.
#[derive(Debug, Clone)]
pub struct SeenRequest {
    /// Method.
    pub method: String,
    /// Path and query.
    pub path: String,
    /// `HTTP/1.1`, `HTTP/2.0`, ...
    pub version: String,
    /// Headers in order, names lowercase.
    pub headers: Vec<(String, String)>,
}

impl SeenRequest {
    /// Every value of header `name`.
    pub fn header_all(&self, name: &str) -> Vec<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .filter(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

#[derive(Debug, Default)]
struct State {
    name: String,
    seen: Mutex<Vec<SeenRequest>>,
    upload_progress: AtomicU64,
    slow_started: AtomicU64,
    gate: Notify,
    /// Open connections' tasks, for [`EchoApp::stop`].
    conns: Mutex<Vec<tokio::task::AbortHandle>>,
}

/// A running echo app; stops when dropped.
#[derive(Debug)]
pub struct EchoApp {
    /// Where it listens (127.0.0.1, a kernel-chosen port).
    pub addr: SocketAddr,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for EchoApp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type Body = UnsyncBoxBody<Bytes, Infallible>;

impl EchoApp {
    /// Starts an app named `name` (it appears in JSON echoes) on `127.0.0.1:0`. Serves
    /// HTTP/1.1 and h2c.
    pub async fn start(name: &str) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        Self::serve(name, listener)
    }

    /// Like [`EchoApp::start`], on `addr` (an app coming back on the port it had). Retries the
    /// bind for a few seconds: the previous app's listener may still be closing.
    pub async fn start_on(name: &str, addr: SocketAddr) -> anyhow::Result<Self> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let listener = loop {
            match TcpListener::bind(addr).await {
                Ok(l) => break l,
                Err(_) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => return Err(anyhow::Error::new(e).context(format!("bind {addr}"))),
            }
        };
        Self::serve(name, listener)
    }

    /// Stops the app like a crash: the listener and every open connection close (dropping an
    /// `EchoApp` only closes the listener). Returns once the listener is closed.
    pub async fn stop(mut self) {
        self.task.abort();
        let _ = (&mut self.task).await;
        let conns =
            std::mem::take(&mut *self.state.conns.lock().unwrap_or_else(|e| e.into_inner()));
        for c in conns {
            c.abort();
        }
    }

    fn serve(name: &str, listener: TcpListener) -> anyhow::Result<Self> {
        let addr = listener.local_addr()?;
        let state = Arc::new(State {
            name: name.to_string(),
            ..Default::default()
        });
        let st = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let _ = tcp.set_nodelay(true);
                let st2 = st.clone();
                let conn = tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| handle(st2.clone(), req));
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
                let mut conns = st.conns.lock().unwrap_or_else(|e| e.into_inner());
                conns.retain(|c| !c.is_finished());
                conns.push(conn.abort_handle());
            }
        });
        Ok(EchoApp { addr, state, task })
    }

    /// Every request head received so far, in order.
    pub fn seen(&self) -> Vec<SeenRequest> {
        self.state
            .seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The last request whose path is `path`.
    pub fn last_seen(&self, path: &str) -> Option<SeenRequest> {
        self.seen().into_iter().rev().find(|r| r.path == path)
    }

    /// Bytes of `/upload` bodies received so far (all uploads together).
    pub fn upload_progress(&self) -> u64 {
        self.state.upload_progress.load(Ordering::SeqCst)
    }

    /// `/slow/…` requests that have reached the app.
    pub fn slow_started(&self) -> u64 {
        self.state.slow_started.load(Ordering::SeqCst)
    }

    /// Lets one waiting (or the next) `/gated-bytes/…` response continue.
    pub fn open_gate(&self) {
        self.state.gate.notify_one();
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut resp = Response::new(Full::new(body.into()).boxed_unsync());
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain"),
    );
    resp
}

/// A body of `len` pattern bytes made by a task, `CHUNK` at a time, through a channel of two
/// chunks: the app never holds more than a few chunks, whatever `len` is. If `gate` is given,
/// the task waits on it after the first chunk.
fn streamed(len: u64, gate: Option<Arc<State>>) -> Response<Body> {
    let (tx, rx) = mpsc::channel::<Bytes>(2);
    tokio::spawn(async move {
        let mut off = 0u64;
        let mut gate = gate;
        while off < len {
            let n = (len - off).min(CHUNK as u64) as usize;
            if tx.send(pattern(off, n)).await.is_err() {
                return;
            }
            off += n as u64;
            // Only after the first chunk.
            if let Some(st) = gate.take() {
                st.gate.notified().await;
            }
        }
    });
    let stream = ReceiverStream::new(rx).map(|b| Ok::<_, Infallible>(Frame::data(b)));
    let mut resp = Response::new(StreamBody::new(stream).boxed_unsync());
    resp.headers_mut()
        .insert(http::header::CONTENT_LENGTH, http::HeaderValue::from(len));
    resp
}

async fn handle(st: Arc<State>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let seen = SeenRequest {
        method: req.method().to_string(),
        path: req
            .uri()
            .path_and_query()
            .map_or_else(|| req.uri().path().to_string(), |p| p.to_string()),
        version: format!("{:?}", req.version()),
        headers: req
            .headers()
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
    };
    st.seen
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(seen.clone());
    let path = req.uri().path().to_string();
    let parse_n = |prefix: &str| {
        path.strip_prefix(prefix)
            .and_then(|n| n.parse::<u64>().ok())
    };

    if let Some(n) = parse_n("/bytes/") {
        return Ok(streamed(n, None));
    }
    if let Some(n) = parse_n("/gated-bytes/") {
        return Ok(streamed(n, Some(st.clone())));
    }
    if let Some(ms) = parse_n("/slow/") {
        st.slow_started.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(ms)).await;
        return Ok(text(StatusCode::OK, "slow done\n"));
    }
    if path == "/upload" {
        let mut body = req.into_body();
        let mut len = 0u64;
        let mut hash = Sha256::new();
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(frame) => {
                    if let Some(data) = frame.data_ref() {
                        len += data.len() as u64;
                        hash.update(data);
                        st.upload_progress
                            .fetch_add(data.len() as u64, Ordering::SeqCst);
                    }
                }
                Err(e) => {
                    return Ok(text(
                        StatusCode::BAD_REQUEST,
                        format!("upload broke after {len} bytes: {e}\n"),
                    ))
                }
            }
        }
        let json = serde_json::json!({ "len": len, "sha256": hex::encode(hash.finalize()) });
        return Ok(text(StatusCode::OK, json.to_string()));
    }

    // Drain whatever body came with it, then echo the head.
    let _ = req.into_body().collect().await;
    let mut headers: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (k, v) in &seen.headers {
        headers.entry(k.as_str()).or_default().push(v.as_str());
    }
    let json = serde_json::json!({
        "app": st.name,
        "method": seen.method,
        "path": seen.path,
        "version": seen.version,
        "headers": headers,
    });
    Ok(text(StatusCode::OK, json.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_is_continuous_across_chunks() {
        let whole = pattern(0, 1000);
        let mut joined = pattern(0, 300).to_vec();
        joined.extend_from_slice(&pattern(300, 700));
        assert_eq!(whole.as_ref(), joined.as_slice());
        assert_eq!(whole[251], 0);
        assert_eq!(whole[252], 1);
    }
}

/// A raw TCP echo server (the app behind a sidecar's TCP port): writes back every byte it
/// reads. Counts the connections it accepted. Stops when dropped.
#[derive(Debug)]
pub struct TcpEcho {
    /// Where it listens.
    pub addr: SocketAddr,
    accepted: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TcpEcho {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TcpEcho {
    /// Starts on `127.0.0.1:0`.
    pub async fn start() -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let accepted = Arc::new(AtomicU64::new(0));
        let count = accepted.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut tcp, _)) = listener.accept().await else {
                    continue;
                };
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let (mut r, mut w) = tcp.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        Ok(TcpEcho {
            addr,
            accepted,
            task,
        })
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }
}
