//! Prior-knowledge HTTP/2 (h2c) to the local app, for `inbound.app_protocol: h2c` (gRPC
//! servers and other HTTP/2-only apps). ONE connection, every request a stream on it, replaced
//! when it dies; streams carry bodies and trailers end to end with HTTP/2 flow control, so a
//! large or long-lived message is never buffered whole.
//!
//! hyper's HTTP/2 client is used here (not the `h2` crate directly, as between sidecars): the
//! app is on loopback and the per-request task hyper spawns is noise next to the app's own
//! work, while hyper handles the client side's flow control, trailers and resets for us.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use http::uri::{Authority, Scheme};
use http::{header, Request, Response, Uri, Version};
use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use crate::body::ReqBody;
use crate::dial::{connect_tcp, TcpTarget};
use crate::forward_error::{failed, ForwardError};
use crate::mtls::{H2_CONNECTION_WINDOW, H2_MAX_SEND_BUF, H2_STREAM_WINDOW};

/// The pooled h2c connection to the app.
pub(super) struct AppH2 {
    addr: SocketAddr,
    target: Arc<str>,
    connect_timeout: Duration,
    /// The live connection; a lock-free read per request.
    current: ArcSwapOption<Conn>,
    /// Single flight: concurrent requests wait for one connection attempt.
    connecting: tokio::sync::Mutex<()>,
}

struct Conn {
    sender: http2::SendRequest<ReqBody>,
    /// Set by the first response: until then a failure most likely means the app does not
    /// speak HTTP/2 at all, and the caller is told so.
    answered: AtomicBool,
}

impl AppH2 {
    /// A pool for the app at `addr`, named `target` in error bodies.
    pub(super) fn new(addr: SocketAddr, target: Arc<str>, connect_timeout: Duration) -> Self {
        Self {
            addr,
            target,
            connect_timeout,
            current: ArcSwapOption::empty(),
            connecting: tokio::sync::Mutex::new(()),
        }
    }

    /// Sends `req` as a stream on the pooled connection (opened first if there is none).
    pub(super) async fn send(
        &self,
        mut req: Request<ReqBody>,
    ) -> Result<Response<Incoming>, ForwardError> {
        // Never a silent fallback: the policy decided on this path, so it goes as it is or not
        // at all.
        to_h2c_form(&mut req, self.addr).map_err(|e| ForwardError::Failed {
            target: self.target.clone(),
            detail: format!("cannot write the request as HTTP/2: {e}"),
        })?;
        let conn = match self.live() {
            Some(conn) => conn,
            None => Box::pin(self.open()).await?,
        };
        let mut sender = conn.sender.clone();
        let sent = async {
            sender.ready().await?;
            sender.send_request(req).await
        }
        .await;
        match sent {
            Ok(response) => {
                conn.answered.store(true, Ordering::Relaxed);
                Ok(response)
            }
            Err(e) if !conn.answered.load(Ordering::Relaxed) => Err(ForwardError::Failed {
                target: self.target.clone(),
                detail: format!("app did not answer HTTP/2; check app_protocol ({e})"),
            }),
            Err(e) => Err(failed(&self.target, e)),
        }
    }

    fn live(&self) -> Option<Arc<Conn>> {
        self.current
            .load_full()
            .filter(|conn| !conn.sender.is_closed())
    }

    async fn open(&self) -> Result<Arc<Conn>, ForwardError> {
        let _single_flight = self.connecting.lock().await;
        if let Some(conn) = self.live() {
            return Ok(conn);
        }
        let tcp = connect_tcp(TcpTarget::Addr(self.addr), self.connect_timeout)
            .await
            .map_err(|e| ForwardError::Unreachable {
                target: self.target.clone(),
                detail: e.to_string(),
            })?;
        let (sender, connection) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .initial_stream_window_size(H2_STREAM_WINDOW)
            .initial_connection_window_size(H2_CONNECTION_WINDOW)
            .max_send_buf_size(H2_MAX_SEND_BUF)
            .handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| ForwardError::Failed {
                target: self.target.clone(),
                detail: format!("app did not answer HTTP/2; check app_protocol ({e})"),
            })?;
        let target = self.target.clone();
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(%target, error = %e, "h2c connection to the app ended");
            }
        });
        let conn = Arc::new(Conn {
            sender,
            answered: AtomicBool::new(false),
        });
        self.current.store(Some(conn.clone()));
        Ok(conn)
    }
}

/// An HTTP/2 request needs `:scheme` and `:authority`: the origin-form request the inbound
/// proxy prepared gets them from its `Host` (or, without one, the app's address), and `Host`
/// itself is removed (RFC 9113 8.3.1: `:authority` replaces it).
fn to_h2c_form<B>(req: &mut Request<B>, app: SocketAddr) -> Result<(), http::uri::InvalidUriParts> {
    *req.version_mut() = Version::HTTP_2;
    let authority = req
        .headers_mut()
        .remove(header::HOST)
        .and_then(|host| Authority::try_from(host.as_bytes()).ok())
        .or_else(|| req.uri().authority().cloned())
        .or_else(|| Authority::try_from(app.to_string()).ok());
    let mut parts = std::mem::take(req.uri_mut()).into_parts();
    parts.scheme = Some(Scheme::HTTP);
    parts.authority = authority;
    if parts.path_and_query.is_none() {
        parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
    }
    *req.uri_mut() = Uri::from_parts(parts)?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn origin_form_gets_scheme_and_authority_from_host() {
        let mut req = Request::builder()
            .uri("/test.Echo/Unary?x=1")
            .header("host", "service-b:8080")
            .body(())
            .unwrap();
        to_h2c_form(&mut req, "127.0.0.1:9".parse().unwrap()).unwrap();
        assert_eq!(
            req.uri().to_string(),
            "http://service-b:8080/test.Echo/Unary?x=1"
        );
        assert!(req.headers().get("host").is_none());
        assert_eq!(req.version(), Version::HTTP_2);
    }

    #[test]
    fn without_host_the_app_address_is_the_authority() {
        let mut req = Request::builder().uri("/a").body(()).unwrap();
        to_h2c_form(&mut req, "127.0.0.1:9".parse().unwrap()).unwrap();
        assert_eq!(req.uri().to_string(), "http://127.0.0.1:9/a");
    }
}
