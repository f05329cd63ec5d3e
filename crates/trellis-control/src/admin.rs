//! The admin HTTP endpoint: `/healthz`, `/ready`, `/metrics`, `/ca`.
//!
//! Plain HTTP/1.1 bound to loopback by default; it never serves a key or a token.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::watch;

use arc_swap::ArcSwap;

use crate::authority::CaStatus;
use crate::metrics::{ControlMetrics, CONTENT_TYPE};

/// What the admin endpoint reports on.
pub struct AdminState {
    /// The CAs of the trust domain and their rotation phase (`/ca`).
    pub ca: Arc<ArcSwap<Vec<CaStatus>>>,
    /// Prometheus metrics.
    pub metrics: Arc<ControlMetrics>,
    /// True once the SDS listener serves with a CA and the control plane's own SVID.
    pub ready: AtomicBool,
}

fn text(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    resp
}

/// Routes one admin request.
pub fn route(state: &AdminState, method: &Method, path: &str) -> Response<Full<Bytes>> {
    const PLAIN: &str = "text/plain; charset=utf-8";
    if method != Method::GET && method != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, PLAIN, "only GET\n");
    }
    match path {
        "/healthz" => text(StatusCode::OK, PLAIN, "ok\n"),
        "/ready" if state.ready.load(Ordering::Acquire) => text(StatusCode::OK, PLAIN, "ready\n"),
        "/ready" => text(StatusCode::SERVICE_UNAVAILABLE, PLAIN, "not ready\n"),
        "/metrics" => text(StatusCode::OK, CONTENT_TYPE, state.metrics.encode()),
        "/ca" => {
            match serde_json::to_vec_pretty(&serde_json::json!({ "cas": **state.ca.load() })) {
                Ok(body) => text(StatusCode::OK, "application/json", body),
                Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, PLAIN, format!("{e}\n")),
            }
        }
        _ => text(
            StatusCode::NOT_FOUND,
            PLAIN,
            "not found: try /healthz, /ready, /metrics, /ca\n",
        ),
    }
}

/// Serves admin requests on `listener` until `shutdown` flips.
pub async fn serve(
    listener: TcpListener,
    state: Arc<AdminState>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let (tcp, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let state = Arc::clone(&state);
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let resp = route(&state, req.method(), req.uri().path());
                async move { Ok::<_, Infallible>(resp) }
            });
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            if let Err(e) = builder.serve_connection(TokioIo::new(tcp), svc).await {
                tracing::debug!(error = %e, "admin connection ended with error");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_follows_state() {
        let state = AdminState {
            ca: Arc::new(ArcSwap::from_pointee(Vec::new())),
            metrics: Arc::new(ControlMetrics::new()),
            ready: AtomicBool::new(false),
        };
        assert_eq!(
            route(&state, &Method::GET, "/ready").status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        state.ready.store(true, Ordering::Release);
        assert_eq!(
            route(&state, &Method::GET, "/ready").status(),
            StatusCode::OK
        );
        assert_eq!(
            route(&state, &Method::GET, "/healthz").status(),
            StatusCode::OK
        );
        assert_eq!(
            route(&state, &Method::GET, "/nope").status(),
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            route(&state, &Method::POST, "/metrics").status(),
            StatusCode::METHOD_NOT_ALLOWED
        );
        assert_eq!(route(&state, &Method::GET, "/ca").status(), StatusCode::OK);
    }
}
