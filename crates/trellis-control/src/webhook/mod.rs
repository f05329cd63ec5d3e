//! The sidecar injection webhook: a Kubernetes mutating admission webhook served over HTTPS
//! (`POST /inject`, AdmissionReview `admission.k8s.io/v1`). [`inject`] decides; this module
//! serves it.
//!
//! - **TLS**: TLS 1.3 and 1.2 (ECDHE-ECDSA AEAD suites only). kube-apiserver's webhook client
//!   is Go's `crypto/tls` with its defaults (TLS 1.2 to 1.3), and Go builds in FIPS mode offer
//!   only TLS 1.2, so 1.3-only would lock some clusters out. No client certificate is asked
//!   for: the API server sends none unless configured to, and a forged review can only
//!   obtain a patch, never change anything.
//! - **Certificate**: issued by the control plane's own CA for `--webhook-dns-name` (see
//!   [`crate::ca::Ca::issue_server_cert`]), so the webhook configuration's `caBundle` is the
//!   Trellis trust bundle. Re-issued on the control plane's SVID rotation schedule; every
//!   new one is verified by DNS name against the bundle before it is served.
//! - **Limits** ([`WebhookLimits`], `limits.webhook`): bodies over `max_body_bytes` get `413`,
//!   bodies slower than `body_timeout` to arrive get `408`, heads slower than
//!   `header_read_timeout` close the connection, handshakes slower than `handshake_timeout` are
//!   dropped, connections past `max_connections` are closed on accept. The API server gives up
//!   after the configuration's `timeoutSeconds` (5 s) anyway; the limits keep a client that is
//!   not the API server from holding memory or tasks.
//! - **Serving**: `trellis-serve`'s accept loop and admin-style HTTP server (HTTP/1.1 only);
//!   this module registers only its route, `POST /inject`.

pub mod inject;
pub mod settings;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Incoming;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use thiserror::Error;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use trellis_identity::tls::{policy_provider, TlsPolicy};
use trellis_identity::{TrustBundle, TrustDomain};
use trellis_serve::accept::BindError;
use trellis_serve::http::{AdminAction, HttpServer, Routes};
use trellis_serve::time::{rfc3339, unix_seconds};
use trellis_serve::{accept, Drain, Handshake};

use crate::ca::{Ca, CaError};
use crate::metrics::ControlMetrics;
use inject::{DefaultRouteCheck, InjectConfig, Outcome};
pub use settings::{WebhookLimits, WebhookSettings};

/// The path the MutatingWebhookConfiguration points at.
pub const PATH: &str = "/inject";

/// Why the webhook could not start.
#[derive(Debug, Error)]
pub enum WebhookError {
    /// The first serving certificate could not be issued or does not verify.
    #[error("webhook serving certificate: {0}")]
    Cert(#[from] CaError),
    /// The TLS configuration was refused.
    #[error("webhook TLS setup failed: {0}")]
    Tls(#[from] rustls::Error),
    /// `--webhook-listen` could not be bound.
    #[error("webhook listener: {0}")]
    Bind(#[from] BindError),
}

/// The webhook's serving certificate, swapped atomically on rotation (new handshakes get the
/// new one; connections keep theirs).
pub struct WebhookCert {
    dns_names: Vec<String>,
    current: ArcSwapOption<CertifiedKey>,
    metrics: Arc<ControlMetrics>,
}

impl std::fmt::Debug for WebhookCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookCert")
            .field("dns_names", &self.dns_names)
            .finish_non_exhaustive()
    }
}

impl WebhookCert {
    /// No certificate yet: handshakes fail until [`WebhookCert::install`].
    pub fn new(dns_names: Vec<String>, metrics: Arc<ControlMetrics>) -> Arc<Self> {
        Arc::new(Self {
            dns_names,
            current: ArcSwapOption::empty(),
            metrics,
        })
    }

    /// Issues a fresh certificate from `ca`, checks that it verifies by every DNS name against
    /// `ca`'s bundle (as the API server will check it against `caBundle`), and swaps it in.
    /// On failure the current certificate stays.
    pub fn install(&self, ca: &Ca, ttl: Duration) -> Result<(), CaError> {
        let now = SystemTime::now();
        let cert = ca.issue_server_cert(&self.dns_names, ttl, now)?;
        verify_by_name(&cert.chain, ca.bundle(), &self.dns_names)?;
        let signing_key = trellis_identity::tls::provider()
            .key_provider
            .load_private_key(cert.key.clone_key())
            .map_err(|e| CaError::Sign(format!("webhook key: {e}")))?;
        self.current.store(Some(Arc::new(CertifiedKey::new(
            cert.chain.clone(),
            signing_key,
        ))));
        self.metrics
            .webhook_cert_expiry
            .set(unix_seconds(cert.not_after));
        tracing::info!(
            serial = %cert.serial_hex,
            dns_names = ?self.dns_names,
            not_after = %rfc3339(cert.not_after),
            "webhook serving certificate installed"
        );
        Ok(())
    }
}

impl ResolvesServerCert for WebhookCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.load_full()
    }
}

/// Verifies `chain` for each of `names` against `bundle` with rustls' WebPKI verifier, the
/// same checks a TLS client makes (chain, validity, serverAuth, name). Catches a CA that
/// cannot issue DNS certificates (e.g. an intermediate name-constrained to URIs) at start.
fn verify_by_name(
    chain: &[trellis_identity::CertificateDer<'static>],
    bundle: &TrustBundle,
    names: &[String],
) -> Result<(), CaError> {
    use rustls::client::danger::ServerCertVerifier as _;
    let invalid = |problem: String| CaError::Sign(format!("webhook certificate: {problem}"));
    let mut roots = rustls::RootCertStore::empty();
    for root in bundle.roots() {
        roots
            .add(root.clone())
            .map_err(|e| invalid(format!("bundle root: {e}")))?;
    }
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        trellis_identity::tls::provider(),
    )
    .build()
    .map_err(|e| invalid(e.to_string()))?;
    let (leaf, intermediates) = chain
        .split_first()
        .ok_or_else(|| invalid("empty chain".into()))?;
    for name in names {
        let server_name = rustls::pki_types::ServerName::try_from(name.clone())
            .map_err(|e| invalid(format!("`{name}`: {e}")))?;
        verifier
            .verify_server_cert(
                leaf,
                intermediates,
                &server_name,
                &[],
                rustls::pki_types::UnixTime::now(),
            )
            .map_err(|e| {
                invalid(format!(
                    "does not verify for `{name}` against the trust bundle: {e}"
                ))
            })?;
    }
    Ok(())
}

/// The rustls server config: TLS 1.3 and 1.2 (the API server's Go client may speak either;
/// the same forward-secret ECDSA suites as the `tls12+` policy), no client certificates, ALPN
/// `http/1.1`.
fn tls_config(cert: Arc<WebhookCert>) -> Result<rustls::ServerConfig, rustls::Error> {
    let policy = TlsPolicy::Tls12Plus;
    let mut config = rustls::ServerConfig::builder_with_provider(policy_provider(policy))
        .with_protocol_versions(policy.versions())?
        .with_no_client_auth()
        .with_cert_resolver(cert);
    // HTTP/1.1 only: reviews are single small requests, and one protocol keeps the timeouts
    // simple (the API server's Go client falls back from h2 without a fuss).
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config.max_early_data_size = 0;
    Ok(config)
}

/// What each request needs.
struct State {
    trust_domain: String,
    image: String,
    control_plane: String,
    native_sidecar: bool,
    no_proxy: Vec<String>,
    default_route: Option<String>,
    check_default_route: Option<DefaultRouteCheck>,
    /// The trust bundle in force; read per review so a CA rotation reaches new pods at once.
    bundle: watch::Receiver<Arc<TrustBundle>>,
    metrics: Arc<ControlMetrics>,
    limits: WebhookLimits,
}

impl State {
    fn inject_config(&self) -> InjectConfig {
        InjectConfig {
            trust_domain: self.trust_domain.clone(),
            image: self.image.clone(),
            control_plane: self.control_plane.clone(),
            bundle_pem: self.bundle.borrow().to_pem(),
            native_sidecar: self.native_sidecar,
            no_proxy: self.no_proxy.clone(),
            default_route: self.default_route.clone(),
            check_default_route: self.check_default_route,
        }
    }
}

/// A webhook listening and serving.
pub struct Webhook {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its serving certificate, for the rotation loop.
    pub cert: Arc<WebhookCert>,
    /// The accept loop; ends on shutdown.
    pub task: JoinHandle<()>,
}

/// The webhook's TLS handshake (no client certificate), bounded by
/// `limits.webhook.handshake_timeout` in the accept loop.
#[derive(Clone)]
struct WebhookTls(TlsAcceptor);

impl Handshake for WebhookTls {
    type Io = TlsStream<TcpStream>;

    async fn handshake(&self, tcp: TcpStream, peer: SocketAddr) -> Option<Self::Io> {
        match self.0.accept(tcp).await {
            Ok(tls) => Some(tls),
            Err(e) => {
                tracing::debug!(%peer, error = %e, "webhook TLS handshake failed");
                None
            }
        }
    }
}

impl Routes for State {
    async fn respond(
        &self,
        req: Request<Incoming>,
        peer: SocketAddr,
    ) -> (Response<Full<Bytes>>, AdminAction) {
        (handle(self, req, peer).await, AdminAction::None)
    }
}

/// Issues the first serving certificate from `ca`, binds `settings.listen` and serves until
/// `drain` signals (requests in flight then finish, or are cut when the drain is forced).
/// Injected sidecars get the bundle from `bundle` at admission time.
pub async fn start(
    settings: &WebhookSettings,
    trust_domain: &TrustDomain,
    ca: &Ca,
    ttl: Duration,
    bundle: watch::Receiver<Arc<TrustBundle>>,
    metrics: Arc<ControlMetrics>,
    drain: Drain,
) -> Result<Webhook, WebhookError> {
    let limits = settings.limits;
    let cert = WebhookCert::new(settings.dns_names.clone(), Arc::clone(&metrics));
    cert.install(ca, ttl)?;
    let tls = tls_config(Arc::clone(&cert))?;
    let tcp = trellis_serve::bind(settings.listen).await?;
    let addr = tcp.local_addr().map_err(|source| BindError {
        addr: settings.listen,
        source,
    })?;
    // Over `limits.webhook.max_connections` the socket is closed at once.
    let listener = accept::Listener::new(
        tcp,
        "webhook",
        limits.max_connections,
        metrics.listener_events("webhook"),
    )
    .with_handshake(
        WebhookTls(TlsAcceptor::from(Arc::new(tls))),
        limits.handshake_timeout,
    );
    let state = Arc::new(State {
        trust_domain: trust_domain.as_str().to_owned(),
        image: settings.sidecar_image.clone(),
        control_plane: settings.sidecar_control_plane.clone(),
        native_sidecar: settings.native_sidecar,
        no_proxy: settings.no_proxy.clone(),
        default_route: settings.sidecar_default_route.clone(),
        check_default_route: settings.default_route_check,
        bundle,
        metrics,
        limits,
    });
    tracing::info!(%addr, path = PATH, dns_names = ?settings.dns_names, image = %settings.sidecar_image, "sidecar injection webhook serving");
    let server = HttpServer::new(state, &limits.server()).http1_only();
    let task = tokio::spawn(server.serve(listener, drain));
    Ok(Webhook { addr, cert, task })
}

fn text(status: StatusCode, body: impl Into<String>) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body.into())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// Answers one request: `POST /inject` with an AdmissionReview, anything else a plain-text
/// error. Generic over the body so tests can drive it without a socket.
async fn handle<B>(state: &State, req: Request<B>, peer: SocketAddr) -> Response<Full<Bytes>>
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    if req.uri().path() != PATH {
        return text(
            StatusCode::NOT_FOUND,
            format!("not found: the sidecar injection webhook serves POST {PATH}\n"),
        );
    }
    if req.method() != Method::POST {
        let mut resp = text(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("method not allowed: use POST {PATH}\n"),
        );
        resp.headers_mut()
            .insert(http::header::ALLOW, http::HeaderValue::from_static("POST"));
        return resp;
    }
    let declared = req
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let limits = &state.limits;
    if declared.is_some_and(|n| n > limits.max_body_bytes as u64) {
        return too_large(state, peer);
    }
    let body = match tokio::time::timeout(
        limits.body_timeout,
        Limited::new(req.into_body(), limits.max_body_bytes).collect(),
    )
    .await
    {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            return too_large(state, peer);
        }
        Ok(Err(e)) => {
            state.metrics.webhook_review(Outcome::Error.label());
            tracing::debug!(%peer, error = %e, "webhook request body unreadable");
            return text(
                StatusCode::BAD_REQUEST,
                format!("cannot read the request body: {e}\n"),
            );
        }
        Err(_) => {
            state.metrics.webhook_review(Outcome::Error.label());
            tracing::warn!(%peer, "webhook request body did not arrive in time");
            let mut resp = text(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "the request body did not arrive within {} (limits.webhook.body_timeout, \
                     --webhook-body-timeout; formerly webhook_body_timeout)\n",
                    humantime::format_duration(limits.body_timeout)
                ),
            );
            resp.headers_mut().insert(
                http::header::CONNECTION,
                http::HeaderValue::from_static("close"),
            );
            return resp;
        }
    };
    match inject::review(&body, &state.inject_config()) {
        Ok(review) => {
            state.metrics.webhook_review(review.outcome.label());
            match review.outcome {
                Outcome::Error => {
                    tracing::warn!(uid = %review.uid, pod = %review.pod, reason = %review.detail, "pod refused by sidecar injection")
                }
                outcome => {
                    tracing::info!(uid = %review.uid, pod = %review.pod, result = outcome.label(), detail = %review.detail, "admission review")
                }
            }
            let mut resp = Response::new(Full::new(Bytes::from(review.body)));
            resp.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
            resp
        }
        Err(bad) => {
            state.metrics.webhook_review(Outcome::Error.label());
            tracing::warn!(%peer, error = %bad, "malformed admission review");
            text(StatusCode::BAD_REQUEST, format!("{bad}\n"))
        }
    }
}

fn too_large(state: &State, peer: SocketAddr) -> Response<Full<Bytes>> {
    state.metrics.webhook_review(Outcome::Error.label());
    let limit = state.limits.max_body_bytes;
    tracing::warn!(%peer, limit, "admission review too large");
    let mut resp = text(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!(
            "the admission review is larger than {limit} bytes (limits.webhook.max_body_bytes, \
             --webhook-max-body-bytes; formerly webhook_max_body_bytes)\n"
        ),
    );
    // The rest of the body is not read: the connection cannot carry another request.
    resp.headers_mut().insert(
        http::header::CONNECTION,
        http::HeaderValue::from_static("close"),
    );
    resp
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    use base64::Engine as _;

    const PEER: SocketAddr =
        SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 40000);

    fn state() -> (State, watch::Sender<Arc<TrustBundle>>) {
        let (tx, bundle) = watch::channel(Arc::new(ca().bundle().clone()));
        let state = State {
            trust_domain: "example.org".into(),
            image: "img:1".into(),
            control_plane: "cp:8443".into(),
            native_sidecar: false,
            no_proxy: Vec::new(),
            default_route: None,
            check_default_route: None,
            bundle,
            metrics: Arc::new(ControlMetrics::new()),
            limits: WebhookLimits::default(),
        };
        (state, tx)
    }

    fn fixture(name: &str) -> Vec<u8> {
        std::fs::read(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/admission")
                .join(name),
        )
        .unwrap()
    }

    fn post(body: impl Into<Bytes>) -> Request<Full<Bytes>> {
        Request::post(PATH).body(Full::new(body.into())).unwrap()
    }

    async fn body_of(resp: Response<Full<Bytes>>) -> String {
        String::from_utf8(
            resp.into_body()
                .collect()
                .await
                .unwrap()
                .to_bytes()
                .to_vec(),
        )
        .unwrap()
    }

    fn reviews(state: &State, result: &str) -> String {
        let want = format!("trellis_webhook_reviews_total{{result=\"{result}\"}} ");
        state
            .metrics
            .encode()
            .lines()
            .find_map(|l| l.strip_prefix(&want).map(str::to_owned))
            .unwrap_or_else(|| "0".into())
    }

    #[tokio::test]
    async fn a_review_is_answered_with_json_and_counted() {
        let (state, _tx) = state();
        let resp = handle(&state, post(fixture("deployment-pod.json")), PEER).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(
            resp.headers()[http::header::CONTENT_TYPE],
            "application/json"
        );
        let v: serde_json::Value = serde_json::from_str(&body_of(resp).await).unwrap();
        assert_eq!(v["response"]["allowed"], true);
        assert_eq!(v["response"]["patchType"], "JSONPatch");
        assert_eq!(reviews(&state, "injected"), "1");
        let resp = handle(&state, post(fixture("pod-opted-out.json")), PEER).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(reviews(&state, "opted_out"), "1");
    }

    #[tokio::test]
    async fn the_bundle_injected_follows_the_watch_channel() {
        let (state, tx) = state();
        let rotated = ca().bundle().clone();
        let want = rotated.to_pem();
        tx.send_replace(Arc::new(rotated));
        let resp = handle(&state, post(fixture("deployment-pod.json")), PEER).await;
        let v: serde_json::Value = serde_json::from_str(&body_of(resp).await).unwrap();
        let patch = base64::engine::general_purpose::STANDARD
            .decode(v["response"]["patch"].as_str().unwrap())
            .unwrap();
        let ops: Vec<serde_json::Value> = serde_json::from_slice(&patch).unwrap();
        let env = ops[0]["value"]["env"].as_array().unwrap();
        let pem = env
            .iter()
            .find(|e| e["name"] == "TRELLIS_CONTROL_BUNDLE_PEM")
            .unwrap();
        assert_eq!(pem["value"], want.as_str());
    }

    #[tokio::test]
    async fn malformed_bodies_get_400_with_the_reason() {
        let (state, _tx) = state();
        for (body, want) in [
            (
                fixture("malformed-not-json.txt"),
                "not a JSON AdmissionReview",
            ),
            (fixture("malformed-v1beta1.json"), "v1beta1"),
            (fixture("malformed-no-uid.json"), "no uid"),
        ] {
            let resp = handle(&state, post(body), PEER).await;
            assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
            let text = body_of(resp).await;
            assert!(text.contains(want), "{text}");
        }
        assert_eq!(reviews(&state, "error"), "3");
    }

    #[tokio::test]
    async fn oversized_bodies_get_413_by_header_or_by_counting() {
        let (state, _tx) = state();
        const MAX_BODY: usize = settings::defaults::MAX_BODY_BYTES;
        // Declared too large: refused before reading.
        let mut req = post(Bytes::new());
        req.headers_mut().insert(
            http::header::CONTENT_LENGTH,
            http::HeaderValue::from(MAX_BODY + 1),
        );
        let resp = handle(&state, req, PEER).await;
        assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(resp.headers()[http::header::CONNECTION], "close");
        // No length given (chunked): counted while reading.
        let resp = handle(&state, post(vec![b' '; MAX_BODY + 1]), PEER).await;
        assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert!(body_of(resp).await.contains("larger than"));
        // Exactly the limit is read (and is then not JSON).
        let resp = handle(&state, post(vec![b' '; MAX_BODY]), PEER).await;
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    }

    #[tokio::test]
    async fn other_paths_and_methods_are_refused() {
        let (state, _tx) = state();
        let resp = handle(
            &state,
            Request::post("/mutate")
                .body(Full::new(Bytes::new()))
                .unwrap(),
            PEER,
        )
        .await;
        assert_eq!(resp.status(), StatusCode::NOT_FOUND);
        let resp = handle(
            &state,
            Request::get(PATH).body(Full::new(Bytes::new())).unwrap(),
            PEER,
        )
        .await;
        assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(resp.headers()[http::header::ALLOW], "POST");
    }

    fn ca() -> Ca {
        let td = TrustDomain::parse("example.org").unwrap();
        let material = Ca::new_root(&td, SystemTime::now()).unwrap();
        Ca::from_material(&td, &material, std::path::Path::new("test")).unwrap()
    }

    #[test]
    fn install_serves_a_certificate_and_sets_the_expiry_gauge() {
        let metrics = Arc::new(ControlMetrics::new());
        let cert = WebhookCert::new(vec!["a.example".into()], Arc::clone(&metrics));
        assert!(cert.current.load().is_none());
        cert.install(&ca(), Duration::from_secs(3600)).unwrap();
        let first = cert.current.load_full().unwrap();
        assert!(metrics.encode().lines().any(|l| l
            .starts_with("trellis_webhook_cert_expiry_timestamp_seconds ")
            && !l.ends_with(" 0")));
        cert.install(&ca(), Duration::from_secs(3600)).unwrap();
        let second = cert.current.load_full().unwrap();
        assert_ne!(
            first.cert[0], second.cert[0],
            "rotation swaps the certificate"
        );
    }

    #[test]
    fn tls_config_offers_tls12_and_tls13() {
        use rustls::CipherSuite;
        use trellis_identity::tls::TLS12_SUITES;
        let metrics = Arc::new(ControlMetrics::new());
        let cert = WebhookCert::new(vec!["a.example".into()], metrics);
        let config = tls_config(cert).unwrap();
        assert_eq!(config.alpn_protocols, vec![b"http/1.1".to_vec()]);
        let suites: Vec<CipherSuite> = config
            .crypto_provider()
            .cipher_suites
            .iter()
            .map(|s| s.suite())
            .collect();
        for s in TLS12_SUITES {
            assert!(suites.contains(&s), "{s:?}");
        }
        assert!(suites.contains(&CipherSuite::TLS13_AES_128_GCM_SHA256));
        assert!(!suites.contains(&CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256));
    }
}
