//! Serving one hyper connection to its end: [`serve_until_drained`] winds it down gracefully
//! when its drain signals or when it has been idle too long, and cuts it off when the drain is
//! forced or a peer will not finish closing.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::header::{self, HeaderMap, HeaderValue};
use http::{Response, Version};
use hyper::body::{Body, Incoming};

use crate::drain::Drain;
use crate::idle::IdleClock;

/// How long a draining HTTP/1.1 connection that is idle is kept open for one more request
/// (answered with `Connection: close`) before it is closed. Closing an idle keep-alive
/// connection races with a request the client may be writing into it at that moment, which
/// then fails without an answer; a client that is told `Connection: close` on a response
/// instead opens a new connection for its next request and never sends it into a closing one.
pub const HTTP1_DRAIN_GRACE: Duration = Duration::from_secs(1);

/// After an idle connection's graceful close began (HTTP/2: GOAWAY), how long the peer has to
/// finish it while no byte moves. hyper's and h2's HTTP/2 graceful close waits for the peer's
/// PING ACK; without this bound a peer that never answers would hold its connection (and its
/// slot under the connection cap) forever.
pub const IDLE_GOAWAY_GRACE: Duration = Duration::from_secs(5);

/// A connection hyper serves that can be asked to wind down.
pub trait GracefulConnection: Future {
    /// hyper's graceful shutdown: HTTP/2 GOAWAY, HTTP/1.1 close after the in-flight response.
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

// The same for connections that may hand their I/O over after a `101` (WebSocket tunnels).
impl<I, S, B> GracefulConnection for hyper::server::conn::http1::UpgradeableConnection<I, S>
where
    S: hyper::service::HttpService<Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    B: Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn begin_shutdown(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

impl<I, S, E, B> GracefulConnection
    for hyper_util::server::conn::auto::UpgradeableConnection<'_, I, S, E>
where
    S: hyper::service::Service<http::Request<Incoming>, Response = Response<B>>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    S::Future: 'static,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    B: Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    E: hyper::rt::bounds::Http2ServerConnExec<S::Future, B>,
{
    fn begin_shutdown(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

/// A served connection's drain state, shared with the service that answers its requests (the
/// service marks HTTP/1.x responses `Connection: close` once draining).
#[derive(Debug, Default)]
pub struct ConnState {
    draining: AtomicBool,
    http2: AtomicBool,
}

impl ConnState {
    /// Called with every response: records the protocol and, once draining, marks an
    /// HTTP/1.x response `Connection: close` (hyper then closes the connection after it).
    pub fn on_response(&self, version: Version, headers: &mut HeaderMap) {
        if version == Version::HTTP_2 {
            self.http2.store(true, Ordering::Relaxed);
        } else if self.draining.load(Ordering::Relaxed) {
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
    }

    /// True once the connection's drain has begun.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }
}

/// Serves `conn` to its end. Once `drain` signals: HTTP/2 gets GOAWAY at once (hyper's graceful
/// shutdown; in-flight streams finish); HTTP/1.1 answers its next response with
/// `Connection: close` and is closed if it stays idle for [`HTTP1_DRAIN_GRACE`] (an in-flight
/// request still finishes); once the drain is forced, the connection is dropped. When no byte
/// has moved for `idle_timeout` (see [`IdleClock`]) the connection is shut down gracefully the
/// same way, and dropped if it then stays silent for [`IDLE_GOAWAY_GRACE`]. Holds `drain`
/// until the connection is gone.
pub async fn serve_until_drained<C, E>(
    conn: C,
    drain: Drain,
    state: &ConnState,
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
            () = drain.forced() => return Ok(()),
        }
    }
    conn.as_mut().begin_shutdown();
    tokio::select! {
        biased;
        res = conn.as_mut() => res,
        () = drain.forced() => Ok(()),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::Full;
    use hyper_util::rt::TokioIo;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::watch;

    use crate::idle::Tracked;

    /// One HTTP/1.1 connection served with `serve_until_drained`; every request waits for
    /// `gate`. Returns the client side.
    async fn serve_one(
        drain: Drain,
        gate: watch::Receiver<bool>,
        idle_timeout: Duration,
    ) -> (TcpStream, tokio::task::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (tcp, _) = listener.accept().await.unwrap();
        let task = tokio::spawn(async move {
            let state = Arc::new(ConnState::default());
            let svc = {
                let state = Arc::clone(&state);
                hyper::service::service_fn(move |req: http::Request<Incoming>| {
                    let (state, mut gate) = (Arc::clone(&state), gate.clone());
                    async move {
                        let _ = gate.wait_for(|open| *open).await;
                        let mut resp = Response::new(Full::new(Bytes::from_static(b"done")));
                        state.on_response(req.version(), resp.headers_mut());
                        Ok::<_, std::convert::Infallible>(resp)
                    }
                })
            };
            let clock = IdleClock::new();
            let io = TokioIo::new(Tracked::new(tcp, Arc::clone(&clock)));
            let conn = hyper::server::conn::http1::Builder::new().serve_connection(io, svc);
            let _ = serve_until_drained(conn, drain, &state, &clock, idle_timeout).await;
        });
        (client, task)
    }

    async fn read_to_close(client: &mut TcpStream) -> String {
        let mut out = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(60), client.read_to_end(&mut out));
        read.await.unwrap().unwrap();
        String::from_utf8_lossy(&out).into_owned()
    }

    #[tokio::test(start_paused = true)]
    async fn drain_lets_the_in_flight_request_finish_with_connection_close() {
        let (signal, drain) = crate::drain::channel();
        let (gate, gate_rx) = watch::channel(false);
        let (mut client, served) = serve_one(drain, gate_rx, Duration::from_secs(60)).await;
        client
            .write_all(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
            .await
            .unwrap();
        tokio::task::yield_now().await;
        let drained = tokio::spawn(signal.drain(Duration::from_secs(30)));
        // Well past HTTP1_DRAIN_GRACE: the request is in flight, so the connection stays.
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(!served.is_finished(), "closed with a request in flight");
        gate.send_replace(true);
        let answer = read_to_close(&mut client).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(
            answer.to_ascii_lowercase().contains("connection: close"),
            "{answer}"
        );
        assert!(answer.ends_with("done"), "{answer}");
        served.await.unwrap();
        assert!(drained.await.unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_is_closed_after_the_timeout() {
        let (_signal, drain) = crate::drain::channel();
        let (_gate, gate_rx) = watch::channel(true);
        let (mut client, served) = serve_one(drain, gate_rx, Duration::from_secs(7)).await;
        let started = tokio::time::Instant::now();
        assert_eq!(read_to_close(&mut client).await, "");
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_secs(7) && waited < Duration::from_secs(8),
            "{waited:?}"
        );
        served.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_forced_drain_cuts_the_in_flight_request() {
        let (signal, drain) = crate::drain::channel();
        let (_gate, gate_rx) = watch::channel(false);
        let (mut client, served) = serve_one(drain, gate_rx, Duration::from_secs(60)).await;
        client
            .write_all(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
            .await
            .unwrap();
        tokio::task::yield_now().await;
        assert!(!signal.drain(Duration::from_secs(5)).await);
        served.await.unwrap();
        assert_eq!(
            read_to_close(&mut client).await,
            "",
            "answered after a forced drain"
        );
    }
}
