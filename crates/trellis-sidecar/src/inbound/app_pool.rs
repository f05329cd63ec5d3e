//! Pooled HTTP/1.1 keep-alive connections from the inbound proxy to the local app. Idle
//! connections are reused newest-first; a connection goes back to the pool when the response
//! body has been read to its end ([`PooledBody`]), with no task per request. Each worker thread
//! has its own pool ([`PerWorker`]): a connection's task runs on the worker that opened it.

use super::app_h2::AppH2;
use crate::body::{
    http1_builder, send_pooled, spawn_http1, Http1Idle, PooledBody, ProxyBody, ReqBody,
};
use crate::config::AppProtocol;
use crate::dial::{connect_tcp, TcpTarget};
use crate::forward_error::{failed, ForwardError};
use crate::upgrade::{send_upgrade, Switch};
use http::{Request, Response};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use trellis_serve::PerWorker;

/// Pooled HTTP/1.1 keep-alive connections to the local app.
pub struct AppPool {
    /// `inbound.app_protocol: h2c`: one prior-knowledge HTTP/2 connection (per worker) instead.
    h2: Option<PerWorker<AppH2>>,
    addr: SocketAddr,
    target: Arc<str>,
    connect_timeout: Duration,
    idle: PerWorker<Arc<Http1Idle>>,
    builder: http1::Builder,
}

impl AppPool {
    /// A pool for the app at `addr`, speaking `protocol`, with connections of its own for
    /// each of `workers` worker threads.
    pub fn new(
        addr: SocketAddr,
        connect_timeout: Duration,
        protocol: AppProtocol,
        workers: usize,
    ) -> Self {
        let target: Arc<str> = format!("app {addr}").into();
        Self {
            h2: (protocol == AppProtocol::H2c).then(|| {
                PerWorker::new(workers, |_| {
                    AppH2::new(addr, target.clone(), connect_timeout)
                })
            }),
            addr,
            target,
            connect_timeout,
            idle: PerWorker::new(workers, |_| Http1Idle::new()),
            builder: http1_builder(),
        }
    }

    /// Sends `req` (origin-form URI, `Host` set) to the app: as a stream on the h2c
    /// connection, or over HTTP/1.1 (see [`AppPool::send_http1`]).
    pub async fn send(&self, req: Request<ReqBody>) -> Result<Response<ProxyBody>, ForwardError> {
        match &self.h2 {
            Some(h2) => Ok(h2.get().send(req).await?.map(ProxyBody::Stream)),
            None => Ok(self.send_http1(req).await?.map(ProxyBody::Pooled)),
        }
    }

    /// Sends `req` on an idle HTTP/1.1 connection or a new one. A request an idle connection
    /// hands back unsent (the app closed it meanwhile) is tried on the next.
    async fn send_http1(
        &self,
        req: Request<ReqBody>,
    ) -> Result<Response<PooledBody>, ForwardError> {
        // The hot path (an idle connection) stays small; connecting is boxed so its much larger
        // state is not part of (and copied with) every request's future.
        let idle = self.idle.get();
        let req = match idle.checkout() {
            Some(sender) => match send_pooled(sender, req, idle).await {
                Ok(response) => return Ok(response),
                Err((_, Some(unsent))) => unsent,
                Err((e, None)) => return Err(failed(&self.target, e)),
            },
            None => req,
        };
        Box::pin(self.send_slow(req)).await
    }

    /// A WebSocket upgrade request on a fresh HTTP/1.1 connection to the app (never pooled: it
    /// becomes the tunnel).
    pub async fn upgrade(&self, req: Request<ReqBody>) -> Result<Switch, ForwardError> {
        if self.h2.is_some() {
            return Err(ForwardError::Failed {
                target: self.target.clone(),
                detail: "WebSocket needs HTTP/1.1 to the app; this app is set to \
                         app_protocol: h2c"
                    .into(),
            });
        }
        let tcp = connect_tcp(TcpTarget::Addr(self.addr), self.connect_timeout)
            .await
            .map_err(|e| ForwardError::Unreachable {
                target: self.target.clone(),
                detail: e.to_string(),
            })?;
        send_upgrade(tcp, req, &self.target, None).await
    }

    async fn send_slow(
        &self,
        mut req: Request<ReqBody>,
    ) -> Result<Response<PooledBody>, ForwardError> {
        let idle = self.idle.get();
        loop {
            let (sender, reused) = match idle.checkout() {
                Some(sender) => (sender, true),
                None => (self.connect().await?, false),
            };
            match send_pooled(sender, req, idle).await {
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
        self.idle.get().len()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use hyper::body::Incoming;
    use std::sync::atomic::{AtomicU64, Ordering};
    use tokio::net::TcpStream;

    /// An app answering `ok` to everything; counts the connections it accepted.
    async fn app() -> (SocketAddr, Arc<AtomicU64>) {
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
        (addr, accepted)
    }

    /// A loopback hyper server that sends every request it gets through `pool` (the pool's
    /// requests need an `Incoming` body).
    async fn front(pool: Arc<AppPool>) -> SocketAddr {
        let front = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let front_addr = front.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = front.accept().await.unwrap();
                let p = pool.clone();
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let p = p.clone();
                    async move {
                        let r = p.send(req.map(ReqBody::Hyper)).await.unwrap();
                        Ok::<_, std::convert::Infallible>(r)
                    }
                });
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        front_addr
    }

    /// `requests` sequential GETs on one connection to `front`, each answered `ok`.
    async fn get_many(front: SocketAddr, requests: usize) {
        use http_body_util::BodyExt;
        let tcp = TcpStream::connect(front).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .unwrap();
        tokio::spawn(conn);
        for _ in 0..requests {
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
    }

    #[tokio::test]
    async fn app_pool_reuses_one_connection_for_sequential_requests() {
        let (addr, accepted) = app().await;
        let pool = Arc::new(AppPool::new(
            addr,
            Duration::from_secs(5),
            AppProtocol::Http1,
            1,
        ));
        get_many(front(pool.clone()).await, 20).await;
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        assert_eq!(pool.idle_len(), 1);
    }

    #[tokio::test]
    async fn concurrent_callers_reuse_their_app_connections() {
        // Concurrent callers hand their connections back to the pool ready for the next
        // request, or every request would cost a new connection to the app.
        let (addr, accepted) = app().await;
        let pool = Arc::new(AppPool::new(
            addr,
            Duration::from_secs(5),
            AppProtocol::Http1,
            1,
        ));
        let front = front(pool.clone()).await;
        let callers: Vec<_> = (0..8).map(|_| tokio::spawn(get_many(front, 50))).collect();
        for caller in callers {
            caller.await.unwrap();
        }
        let opened = accepted.load(Ordering::SeqCst);
        assert!(
            opened <= 8,
            "400 requests from 8 callers opened {opened} app connections"
        );
        assert_eq!(pool.idle_len() as u64, opened);
    }
}
