//! One fetch of a foreign bundle endpoint, authenticated per profile (SPIFFE Trust Domain and
//! Bundle 5.2): `https_spiffe` checks the endpoint's SVID against the foreign trust domain's
//! bundle in force and its `endpoint_spiffe_id`; `https_web` checks an ordinary server
//! certificate against the system's roots and the URL's host name.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{header, Request, StatusCode};
use http_body_util::{BodyExt as _, Empty, Limited};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use thiserror::Error;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use trellis_identity::tls::{client_config, PeerMatch, SpiffeServerVerifier, TlsPolicy};
use trellis_identity::{SpiffeId, TrustBundle, TrustDomain};

use super::document::{BundleDocument, DocumentError};

/// Why a fetch failed. The bundle in force stays; the reason becomes a metric label.
#[derive(Debug, Error)]
pub enum FetchError {
    /// No TCP connection.
    #[error("cannot connect: {0}")]
    Connect(String),
    /// The TLS handshake failed: for `https_spiffe`, most often the endpoint presented an SVID
    /// that is not `endpoint_spiffe_id` or does not chain to the foreign bundle.
    #[error("TLS handshake failed: {0}")]
    Tls(String),
    /// The HTTP exchange failed.
    #[error("HTTP request failed: {0}")]
    Http(String),
    /// A status other than 200.
    #[error("HTTP {0}")]
    Status(u16),
    /// No complete answer in time.
    #[error("no complete answer within {}", humantime::format_duration(*.0))]
    Timeout(Duration),
    /// The body is not a usable bundle document.
    #[error(transparent)]
    Document(#[from] DocumentError),
    /// No bundle to authenticate an `https_spiffe` endpoint with.
    #[error("no bundle of the foreign trust domain yet (set bootstrap_bundle)")]
    NoBundle,
}

impl FetchError {
    /// Stable `reason` label.
    pub fn reason(&self) -> &'static str {
        match self {
            FetchError::Connect(_) => "connect",
            FetchError::Tls(_) => "tls",
            FetchError::Http(_) => "http",
            FetchError::Status(_) => "http_status",
            FetchError::Timeout(_) => "timeout",
            FetchError::Document(DocumentError::WrongTrustDomain { .. }) => "wrong_trust_domain",
            FetchError::Document(_) => "invalid_bundle",
            FetchError::NoBundle => "no_bundle",
        }
    }
}

/// How the endpoint is authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Profile {
    /// `https_spiffe`: the endpoint presents this SPIFFE ID, chaining to the foreign bundle.
    HttpsSpiffe {
        /// `endpoint_spiffe_id`.
        endpoint_id: SpiffeId,
    },
    /// `https_web`: a Web PKI certificate for the URL's host, verified with the system roots.
    HttpsWeb,
}

impl Profile {
    /// `https_spiffe` or `https_web`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Profile::HttpsSpiffe { .. } => "https_spiffe",
            Profile::HttpsWeb => "https_web",
        }
    }
}

/// A bundle endpoint URL: an [`HttpsUrl`](crate::https_url::HttpsUrl).
pub type EndpointUrl = crate::https_url::HttpsUrl;

/// Parses and checks a bundle endpoint URL; the error names it.
pub fn parse_endpoint_url(url: &str) -> Result<EndpointUrl, String> {
    EndpointUrl::parse(url, "https://cp.b.org:8443").map_err(|problem| format!("`{url}` {problem}"))
}

/// Fetches and parses `url`'s bundle document for `td`. `current` is the foreign bundle in
/// force (bootstrap or last good), which authenticates an `https_spiffe` endpoint.
pub async fn fetch(
    td: &TrustDomain,
    url: &EndpointUrl,
    profile: &Profile,
    current: Option<&TrustBundle>,
    max_bytes: usize,
    timeout: Duration,
) -> Result<BundleDocument, FetchError> {
    match tokio::time::timeout(timeout, fetch_inner(td, url, profile, current, max_bytes)).await {
        Ok(r) => r,
        Err(_) => Err(FetchError::Timeout(timeout)),
    }
}

/// The system's root certificates (`https_web`). Read off the async threads (it is file I/O),
/// and refused when there are none: every fetch would otherwise fail with an unknown issuer.
async fn system_roots() -> Result<rustls::RootCertStore, FetchError> {
    let loaded = tokio::task::spawn_blocking(rustls_native_certs::load_native_certs)
        .await
        .map_err(|e| FetchError::Tls(format!("cannot read the system root certificates: {e}")))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in loaded.certs {
        let _ = roots.add(cert);
    }
    if roots.is_empty() {
        let why = loaded
            .errors
            .first()
            .map(|e| format!(" ({e})"))
            .unwrap_or_default();
        return Err(FetchError::Tls(format!(
            "the https_web profile needs the system's root certificates and none were found{why}: \
             install them (Debian: the ca-certificates package), point SSL_CERT_FILE at a PEM \
             bundle, or use the https_spiffe profile"
        )));
    }
    Ok(roots)
}

async fn fetch_inner(
    td: &TrustDomain,
    url: &EndpointUrl,
    profile: &Profile,
    current: Option<&TrustBundle>,
    max_bytes: usize,
) -> Result<BundleDocument, FetchError> {
    let tls = match profile {
        Profile::HttpsSpiffe { endpoint_id } => {
            let bundle = current.ok_or(FetchError::NoBundle)?.own();
            let verifier = SpiffeServerVerifier::new(
                Arc::new(ArcSwap::from_pointee(bundle)),
                PeerMatch::Exact(endpoint_id.clone()),
            );
            // TLS 1.2 too: another implementation's endpoint may not speak 1.3.
            client_config(None, verifier, TlsPolicy::Tls12Plus, &[b"http/1.1"])
                .map_err(|e| FetchError::Tls(e.to_string()))?
        }
        Profile::HttpsWeb => {
            let roots = system_roots().await?;
            let mut config = rustls::ClientConfig::builder_with_provider(
                trellis_identity::tls::policy_provider(TlsPolicy::Tls12Plus),
            )
            .with_protocol_versions(TlsPolicy::Tls12Plus.versions())
            .map_err(|e| FetchError::Tls(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
            config.alpn_protocols = vec![b"http/1.1".to_vec()];
            config
        }
    };
    let server_name = ServerName::try_from(url.host.clone())
        .map_err(|e| FetchError::Tls(format!("host is not a TLS server name: {e}")))?;
    let tcp = TcpStream::connect((url.host.as_str(), url.port))
        .await
        .map_err(|e| FetchError::Connect(e.to_string()))?;
    let _ = tcp.set_nodelay(true);
    let stream = TlsConnector::from(Arc::new(tls))
        .connect(server_name, tcp)
        .await
        .map_err(|e| FetchError::Tls(e.to_string()))?;
    let http_err = |e: hyper::Error| FetchError::Http(e.to_string());
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(http_err)?;
    let conn = tokio::spawn(conn);
    let request = Request::get(url.path_and_query.as_str())
        .header(header::HOST, url.authority.as_str())
        .header(header::ACCEPT, "application/json")
        .body(Empty::<Bytes>::new())
        .map_err(|e| FetchError::Http(e.to_string()))?;
    let response = sender.send_request(request).await.map_err(http_err)?;
    let status = response.status();
    let body = Limited::new(response.into_body(), max_bytes)
        .collect()
        .await
        .map_err(|e| {
            FetchError::Http(format!("reading the body (at most {max_bytes} bytes): {e}"))
        })?
        .to_bytes();
    drop(sender);
    conn.abort();
    if status != StatusCode::OK {
        return Err(FetchError::Status(status.as_u16()));
    }
    Ok(BundleDocument::parse(td, &body)?)
}
