//! The bundle endpoint (`bundle_endpoint: ADDR`): `GET /` answers this trust domain's bundle
//! document over TLS with the control plane's own SVID (the `https_spiffe` profile, SPIFFE
//! Trust Domain and Bundle 5.2.2), so a federated control plane authenticates it with our
//! bundle and `spiffe://<td>/trellis/control`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use trellis_identity::tls::{policy_provider, SvidResolver, TlsPolicy};
use trellis_identity::TrustBundle;
use trellis_serve::accept::{self, Handshake};
use trellis_serve::drain::Drain;
use trellis_serve::http::{AdminAction, HttpServer, Routes, ServerLimits};

use super::document::BundleDocument;
use crate::metrics::ControlMetrics;

/// Most connections the bundle endpoint holds at once.
const MAX_CONNECTIONS: usize = 256;
/// A TLS handshake that takes longer is cut.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the bundle endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// The address could not be bound.
    #[error("bundle_endpoint listener: {0}")]
    Bind(#[from] trellis_serve::accept::BindError),
    /// The TLS config could not be built.
    #[error("bundle_endpoint TLS setup failed: {0}")]
    Tls(String),
}

/// What the endpoint serves: the own bundle (from the CA rotator), its sequence, the hint.
pub struct EndpointState {
    /// The own trust domain's bundle in force.
    pub bundle: watch::Receiver<Arc<TrustBundle>>,
    /// Its `spiffe_sequence`.
    pub sequence: Arc<AtomicU64>,
    /// `spiffe_refresh_hint`.
    pub refresh_hint: Duration,
    /// The JWT-SVID signing keys in force, published as `use: jwt-svid` keys.
    pub jwt: Option<watch::Receiver<Arc<trellis_identity::jwt::JwtBundle>>>,
}

#[derive(Clone)]
struct EndpointTls(TlsAcceptor);

impl Handshake for EndpointTls {
    type Io = TlsStream<TcpStream>;

    async fn handshake(&self, tcp: TcpStream, peer: SocketAddr) -> Option<Self::Io> {
        match self.0.accept(tcp).await {
            Ok(tls) => Some(tls),
            Err(e) => {
                tracing::debug!(%peer, error = %e, "bundle endpoint TLS handshake failed");
                None
            }
        }
    }
}

impl Routes for EndpointState {
    async fn respond(
        &self,
        req: Request<Incoming>,
        _peer: SocketAddr,
    ) -> (Response<Full<Bytes>>, AdminAction) {
        (
            self.answer(req.method(), req.uri().path()),
            AdminAction::None,
        )
    }
}

impl EndpointState {
    fn answer(&self, method: &Method, path: &str) -> Response<Full<Bytes>> {
        let text = |status: StatusCode, body: &str| {
            let mut r = Response::new(Full::new(Bytes::from(body.to_owned())));
            *r.status_mut() = status;
            r
        };
        if path != "/" {
            return text(
                StatusCode::NOT_FOUND,
                "not found: the bundle endpoint serves GET /\n",
            );
        }
        if method != Method::GET && method != Method::HEAD {
            return text(StatusCode::METHOD_NOT_ALLOWED, "use GET /\n");
        }
        let bundle = self.bundle.borrow().clone();
        let jwt = self.jwt.as_ref().map(|rx| rx.borrow().clone());
        let json = BundleDocument::to_json(
            &bundle.own(),
            jwt.as_deref(),
            self.sequence.load(Ordering::Acquire),
            self.refresh_hint,
        );
        let mut r = Response::new(Full::new(Bytes::from(json)));
        r.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        r
    }
}

/// Binds `addr` and serves the bundle endpoint with `resolver`'s SVID until `drain`.
pub async fn start(
    addr: SocketAddr,
    resolver: Arc<SvidResolver>,
    state: EndpointState,
    metrics: &Arc<ControlMetrics>,
    drain: Drain,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), EndpointError> {
    let tcp = trellis_serve::bind(addr).await?;
    let bound = tcp
        .local_addr()
        .map_err(|source| trellis_serve::accept::BindError { addr, source })?;
    // TLS 1.2 too: a federated SPIRE server or another implementation may fetch from us.
    let policy = TlsPolicy::Tls12Plus;
    let mut tls = rustls::ServerConfig::builder_with_provider(policy_provider(policy))
        .with_protocol_versions(policy.versions())
        .map_err(|e| EndpointError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let listener = accept::Listener::new(
        tcp,
        "bundle_endpoint",
        MAX_CONNECTIONS,
        metrics.listener_events("bundle_endpoint"),
    )
    .with_handshake(
        EndpointTls(TlsAcceptor::from(Arc::new(tls))),
        HANDSHAKE_TIMEOUT,
    );
    let limits = ServerLimits {
        header_read_timeout: Duration::from_secs(10),
        max_header_bytes: 16 * 1024,
        max_headers: Some(64),
        idle_timeout: None,
        max_streams_per_connection: 16,
        max_pending_resets: 16,
        max_local_error_resets: None,
    };
    let server = HttpServer::new(Arc::new(state), &limits).http1_only();
    tracing::info!(addr = %bound, "SPIFFE bundle endpoint serving (https_spiffe)");
    Ok((bound, tokio::spawn(server.serve(listener, drain))))
}
