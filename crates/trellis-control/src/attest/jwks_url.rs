//! The Kubernetes service-account issuer's keys, fetched from the API server
//! (`--k8s-jwks-url https://kubernetes.default.svc/openid/v1/jwks`) instead of a mounted file.
//!
//! Each fetch is an HTTPS GET verified against the cluster CA file and authenticated with the
//! pod's own service-account token; both files are read again on every fetch, because kubelet
//! rotates the token (and the CA ConfigMap can change) under a running pod. The key set is
//! fetched once at start (the control plane does not start without it) and then every
//! `--k8s-jwks-refresh`: a refresh that fails, or returns something that is not a usable JWKS,
//! keeps the keys in force, logs a warning and counts
//! `trellis_jwks_refresh_failures_total{reason}`. Kubernetes publishes a new signing key in
//! the JWKS before it signs with it, so refreshing every few minutes follows a key rotation.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Request, StatusCode};
use http_body_util::{BodyExt as _, Empty, Limited};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use thiserror::Error;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_rustls::TlsConnector;

use crate::attest::jwks::{JwksError, JwksKeyStore, JwksKeys, MAX_JWKS_BYTES};
use crate::metrics::ControlMetrics;

/// `--k8s-ca` default: the cluster CA every pod gets with its service-account token.
pub const DEFAULT_CA: &str = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt";
/// `--k8s-token` default: the pod's own service-account token (rotated by kubelet).
pub const DEFAULT_TOKEN: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";
/// `--k8s-jwks-refresh` default.
pub const DEFAULT_REFRESH: Duration = Duration::from_secs(5 * 60);
/// Shortest refresh interval accepted.
pub const MIN_REFRESH: Duration = Duration::from_secs(1);
/// `limits.k8s.jwks_fetch_timeout` when not configured: one whole fetch (connect, TLS,
/// request, body).
pub const DEFAULT_FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest token file read; a Kubernetes token is about 1 KiB.
const MAX_TOKEN_BYTES: u64 = 64 * 1024;
/// How much of an error body goes into the error message.
const ERROR_BODY_CHARS: usize = 200;

/// Why the JWKS could not be fetched or used. Each names the URL or file involved.
#[derive(Debug, Error)]
pub enum JwksFetchError {
    /// The URL is not an `https://host[:port]/path` URL.
    #[error("--k8s-jwks-url `{url}`: {problem}")]
    BadUrl {
        /// The URL as given.
        url: String,
        /// What is wrong.
        problem: String,
    },
    /// The cluster CA file is unreadable or holds no certificate.
    #[error("{path}: cannot use as the cluster CA (--k8s-ca): {problem}")]
    Ca {
        /// The file.
        path: PathBuf,
        /// What failed.
        problem: String,
    },
    /// The token file is unreadable or empty.
    #[error("{path}: cannot read the service-account token (--k8s-token): {problem}")]
    Token {
        /// The file.
        path: PathBuf,
        /// What failed.
        problem: String,
    },
    /// No TCP connection.
    #[error("{url}: cannot connect: {problem}")]
    Connect {
        /// The URL.
        url: String,
        /// The OS error.
        problem: String,
    },
    /// The TLS handshake failed (most often: the server certificate does not chain to --k8s-ca
    /// or does not name the URL's host).
    #[error("{url}: TLS handshake failed (is --k8s-ca the CA of this server?): {problem}")]
    Tls {
        /// The URL.
        url: String,
        /// rustls' error.
        problem: String,
    },
    /// The HTTP exchange failed.
    #[error("{url}: HTTP request failed: {problem}")]
    Http {
        /// The URL.
        url: String,
        /// What failed.
        problem: String,
    },
    /// A status other than 200.
    #[error("{url}: HTTP {status}{hint}: {body}")]
    Status {
        /// The URL.
        url: String,
        /// The status code.
        status: u16,
        /// What to do about it, for 401 and 403.
        hint: &'static str,
        /// The start of the response body.
        body: String,
    },
    /// No complete answer within the fetch timeout.
    #[error("{url}: no complete answer within {} (jwks_fetch_timeout)", humantime::format_duration(*.after))]
    Timeout {
        /// The URL.
        url: String,
        /// The timeout that passed.
        after: Duration,
    },
    /// The body is not a usable JWKS.
    #[error(transparent)]
    Jwks(#[from] JwksError),
}

impl JwksFetchError {
    /// Stable label for `trellis_jwks_refresh_failures_total{reason}`.
    pub fn reason(&self) -> &'static str {
        match self {
            JwksFetchError::BadUrl { .. } => "bad_url",
            JwksFetchError::Ca { .. } => "ca",
            JwksFetchError::Token { .. } => "token",
            JwksFetchError::Connect { .. } => "connect",
            JwksFetchError::Tls { .. } => "tls",
            JwksFetchError::Http { .. } => "http",
            JwksFetchError::Status { .. } => "http_status",
            JwksFetchError::Timeout { .. } => "timeout",
            JwksFetchError::Jwks(_) => "invalid_jwks",
        }
    }
}

/// The JWKS URL: an [`HttpsUrl`](crate::https_url::HttpsUrl).
pub type JwksUrl = crate::https_url::HttpsUrl;

/// Parses and checks a JWKS URL (see [`HttpsUrl::parse`](crate::https_url::HttpsUrl::parse)).
pub fn parse_url(url: &str) -> Result<JwksUrl, JwksFetchError> {
    JwksUrl::parse(url, "https://kubernetes.default.svc/openid/v1/jwks").map_err(|problem| {
        JwksFetchError::BadUrl {
            url: url.to_owned(),
            problem,
        }
    })
}

/// Where the keys come from and how to authenticate: the URL, the CA file that verifies the
/// server, and the bearer token file.
#[derive(Debug, Clone)]
pub struct JwksSource {
    url: JwksUrl,
    ca: PathBuf,
    token: PathBuf,
    /// Largest body read (`max_jwks_bytes`).
    max_body_bytes: usize,
    /// A whole fetch (connect, TLS, request, body) that takes longer fails
    /// (`jwks_fetch_timeout`).
    fetch_timeout: Duration,
}

impl JwksSource {
    /// A source with the default limits; nothing is read until [`JwksSource::fetch`].
    pub fn new(url: JwksUrl, ca: PathBuf, token: PathBuf) -> Self {
        Self {
            url,
            ca,
            token,
            max_body_bytes: MAX_JWKS_BYTES,
            fetch_timeout: DEFAULT_FETCH_TIMEOUT,
        }
    }

    /// Reads at most `max_body_bytes` of a response (`max_jwks_bytes`) and gives a whole
    /// fetch `fetch_timeout` (`jwks_fetch_timeout`).
    pub fn with_limits(mut self, max_body_bytes: usize, fetch_timeout: Duration) -> Self {
        self.max_body_bytes = max_body_bytes;
        self.fetch_timeout = fetch_timeout;
        self
    }

    /// The URL.
    pub fn url(&self) -> &JwksUrl {
        &self.url
    }

    /// One fetch: reads the CA and token files, GETs the URL, parses and validates the JWKS.
    pub async fn fetch(&self) -> Result<JwksKeys, JwksFetchError> {
        let url = self.url.as_str().to_owned();
        match tokio::time::timeout(self.fetch_timeout, self.fetch_inner()).await {
            Ok(result) => result,
            Err(_) => Err(JwksFetchError::Timeout {
                url,
                after: self.fetch_timeout,
            }),
        }
    }

    async fn fetch_inner(&self) -> Result<JwksKeys, JwksFetchError> {
        let url = || self.url.as_str().to_owned();
        let tls = Arc::new(client_config(&self.ca)?);
        let token = read_token(&self.token)?;

        let server_name =
            ServerName::try_from(self.url.host.clone()).map_err(|e| JwksFetchError::BadUrl {
                url: url(),
                problem: format!("host is not a valid TLS server name: {e}"),
            })?;
        let tcp = TcpStream::connect((self.url.host.as_str(), self.url.port))
            .await
            .map_err(|e| JwksFetchError::Connect {
                url: url(),
                problem: e.to_string(),
            })?;
        let _ = tcp.set_nodelay(true);
        let stream = TlsConnector::from(tls)
            .connect(server_name, tcp)
            .await
            .map_err(|e| JwksFetchError::Tls {
                url: url(),
                problem: e.to_string(),
            })?;
        let http_err = |e: hyper::Error| JwksFetchError::Http {
            url: url(),
            problem: e.to_string(),
        };
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(http_err)?;
        // The connection task ends when the response is read and `sender` is dropped.
        let conn = tokio::spawn(conn);

        let request = Request::get(self.url.path_and_query.as_str())
            .header(header::HOST, self.url.authority.as_str())
            .header(header::AUTHORIZATION, format!("Bearer {token}"))
            .header(header::ACCEPT, "application/jwk-set+json, application/json")
            .body(Empty::<Bytes>::new())
            .map_err(|e| JwksFetchError::Http {
                url: url(),
                problem: e.to_string(),
            })?;
        let response = sender.send_request(request).await.map_err(http_err)?;
        let status = response.status();
        let max = self.max_body_bytes;
        let body = Limited::new(response.into_body(), max)
            .collect()
            .await
            .map_err(|e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    JwksFetchError::Jwks(JwksError::Invalid {
                        path: PathBuf::from(self.url.as_str()),
                        problem: format!(
                            "the body is larger than {max} bytes (max_jwks_bytes); an issuer's \
                             JWKS is a few KiB"
                        ),
                    })
                } else {
                    JwksFetchError::Http {
                        url: url(),
                        problem: format!("reading the body (at most {max} bytes): {e}"),
                    }
                }
            })?
            .to_bytes();
        drop(sender);
        conn.abort();

        if status != StatusCode::OK {
            let text = String::from_utf8_lossy(&body);
            let clipped: String = text.trim().chars().take(ERROR_BODY_CHARS).collect();
            return Err(JwksFetchError::Status {
                url: url(),
                status: status.as_u16(),
                hint: match status {
                    StatusCode::UNAUTHORIZED => {
                        " (the service-account token was refused; is --k8s-token this pod's token?)"
                    }
                    StatusCode::FORBIDDEN => {
                        " (bind the ClusterRole system:service-account-issuer-discovery to the \
                         control plane's ServiceAccount)"
                    }
                    _ => "",
                },
                body: clipped,
            });
        }
        let text = std::str::from_utf8(&body).map_err(|_| {
            JwksFetchError::Jwks(JwksError::Invalid {
                path: PathBuf::from(self.url.as_str()),
                problem: "the body is not UTF-8 JSON".into(),
            })
        })?;
        Ok(JwksKeys::parse(
            text,
            Path::new(self.url.as_str()),
            self.max_body_bytes,
        )?)
    }
}

/// A TLS client trusting only the certificates in `ca` (the cluster CA), not the system roots:
/// the keys decide identities, so only the cluster's own API server may supply them.
fn client_config(ca: &Path) -> Result<rustls::ClientConfig, JwksFetchError> {
    let ca_err = |problem: String| JwksFetchError::Ca {
        path: ca.to_path_buf(),
        problem,
    };
    let pem = std::fs::read(ca).map_err(|e| ca_err(e.to_string()))?;
    let certs = trellis_identity::certs_from_pem(&pem).map_err(|e| ca_err(e.to_string()))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in certs {
        roots
            .add(cert)
            .map_err(|e| ca_err(format!("not a usable CA certificate: {e}")))?;
    }
    let mut config = rustls::ClientConfig::builder_with_provider(trellis_identity::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| ca_err(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// The token, trimmed (kubelet writes it without a newline; a hand-made file may have one).
fn read_token(path: &Path) -> Result<String, JwksFetchError> {
    let token_err = |problem: String| JwksFetchError::Token {
        path: path.to_path_buf(),
        problem,
    };
    let meta = std::fs::metadata(path).map_err(|e| token_err(e.to_string()))?;
    if meta.len() > MAX_TOKEN_BYTES {
        return Err(token_err(format!(
            "{} bytes; a service-account token is about 1 KiB",
            meta.len()
        )));
    }
    let raw = std::fs::read_to_string(path).map_err(|e| token_err(e.to_string()))?;
    let token = raw.trim();
    if token.is_empty() {
        return Err(token_err("the file is empty".into()));
    }
    if token.contains(|c: char| c.is_whitespace() || c.is_control()) {
        return Err(token_err("the token contains whitespace".into()));
    }
    Ok(token.to_owned())
}

/// Refreshes `store` from `source` every `every` until `shutdown` turns true. A failed refresh
/// keeps the keys in force; the next attempt is at the next interval.
pub async fn refresh_loop(
    source: JwksSource,
    store: JwksKeyStore,
    every: Duration,
    metrics: Arc<ControlMetrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
        let fetched = tokio::select! {
            fetched = source.fetch() => fetched,
            _ = shutdown.wait_for(|stop| *stop) => return,
        };
        match fetched {
            Ok(keys) => {
                let new_ids = keys.key_ids();
                if new_ids != store.key_ids() {
                    tracing::info!(url = %source.url(), kids = ?new_ids, "Kubernetes issuer keys changed");
                }
                store.store(keys);
            }
            Err(e) => {
                metrics.jwks_refresh_failed(e.reason());
                tracing::warn!(url = %source.url(), error = %e, reason = e.reason(), kids = ?store.key_ids(), "cannot refresh the Kubernetes issuer keys; keeping the current ones");
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_api_server_url() {
        let u = parse_url("https://kubernetes.default.svc/openid/v1/jwks").unwrap();
        assert_eq!(u.host, "kubernetes.default.svc");
        assert_eq!(u.port, 443);
        assert_eq!(u.authority, "kubernetes.default.svc");
        assert_eq!(u.path_and_query, "/openid/v1/jwks");
    }

    #[test]
    fn parses_port_and_ip_hosts() {
        let u = parse_url("https://127.0.0.1:6443/openid/v1/jwks?x=1").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("127.0.0.1", 6443));
        assert_eq!(u.path_and_query, "/openid/v1/jwks?x=1");
        let u = parse_url("https://[::1]:6443/keys").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("::1", 6443));
        assert_eq!(u.authority, "[::1]:6443");
        let u = parse_url("https://issuer.example").unwrap();
        assert_eq!(u.path_and_query, "/");
    }

    #[test]
    fn rejects_plain_http_and_odd_urls() {
        for url in [
            "http://kubernetes.default.svc/openid/v1/jwks",
            "kubernetes.default.svc/openid/v1/jwks",
            "/openid/v1/jwks",
            "https://user:pw@kubernetes.default.svc/openid/v1/jwks",
            "not a url",
        ] {
            let err = parse_url(url).unwrap_err();
            assert_eq!(err.reason(), "bad_url", "{url}");
            assert!(err.to_string().contains("--k8s-jwks-url"), "{err}");
        }
    }

    #[test]
    fn token_is_trimmed_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "abc.def.ghi\n").unwrap();
        assert_eq!(read_token(&path).unwrap(), "abc.def.ghi");
        std::fs::write(&path, "  \n").unwrap();
        assert!(read_token(&path).unwrap_err().to_string().contains("empty"));
        std::fs::write(&path, "abc def").unwrap();
        assert!(read_token(&path).is_err());
        let missing = dir.path().join("missing");
        let err = read_token(&missing).unwrap_err();
        assert_eq!(err.reason(), "token");
        assert!(err.to_string().contains("--k8s-token"), "{err}");
    }

    #[test]
    fn ca_file_must_hold_a_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.crt");
        std::fs::write(&path, "not pem").unwrap();
        let err = client_config(&path).unwrap_err();
        assert_eq!(err.reason(), "ca");
        assert!(err.to_string().contains("--k8s-ca"), "{err}");
    }

    /// A TLS server on loopback (its certificate, for 127.0.0.1, written to `dir/ca.crt`)
    /// answering one request with `body`; plus a token file. Returns the URL and both files.
    async fn serve_once(dir: &Path, body: Vec<u8>) -> (JwksUrl, PathBuf, PathBuf) {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into()]).unwrap();
        let ca = dir.join("ca.crt");
        std::fs::write(&ca, cert.cert.pem()).unwrap();
        let token = dir.join("token");
        std::fs::write(&token, "t.o.k").unwrap();
        let key = rustls::pki_types::PrivatePkcs8KeyDer::from(cert.signing_key.serialize_der());
        let config = rustls::ServerConfig::builder_with_provider(trellis_identity::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.cert.der().clone()], key.into())
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut tls = acceptor.accept(tcp).await.unwrap();
            let mut head = [0u8; 4096];
            let _ = tls.read(&mut head).await;
            let reply = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                body.len()
            );
            let _ = tls.write_all(reply.as_bytes()).await;
            let _ = tls.write_all(&body).await;
            let _ = tls.flush().await;
        });
        let url = parse_url(&format!("https://127.0.0.1:{port}/openid/v1/jwks")).unwrap();
        (url, ca, token)
    }

    #[tokio::test]
    async fn a_body_over_max_jwks_bytes_is_refused_with_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let (url, ca, token) = serve_once(dir.path(), vec![b' '; 4096]).await;
        let err = JwksSource::new(url, ca, token)
            .with_limits(2048, Duration::from_secs(30))
            .fetch()
            .await
            .unwrap_err();
        assert_eq!(err.reason(), "invalid_jwks", "{err}");
        let text = err.to_string();
        assert!(
            text.contains("larger than 2048 bytes") && text.contains("max_jwks_bytes"),
            "{text}"
        );
        assert!(text.contains("127.0.0.1"), "{text}");
    }

    #[tokio::test]
    async fn a_server_slower_than_jwks_fetch_timeout_is_a_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "t.o.k").unwrap();
        let ca = dir.path().join("ca.crt");
        let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into()]).unwrap();
        std::fs::write(&ca, cert.cert.pem()).unwrap();
        // Accepts, then never says a word.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (_tcp, _) = listener.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(60)).await;
        });
        let url = parse_url(&format!("https://127.0.0.1:{port}/openid/v1/jwks")).unwrap();
        let err = JwksSource::new(url, ca, token)
            .with_limits(1024 * 1024, Duration::from_millis(300))
            .fetch()
            .await
            .unwrap_err();
        assert_eq!(err.reason(), "timeout", "{err}");
        assert!(
            err.to_string().contains("300ms (jwks_fetch_timeout)"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn unreachable_server_is_a_connect_error() {
        // Bind then drop: nothing listens on the port any more.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.crt");
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        std::fs::write(&ca, cert.cert.pem()).unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "t.o.k").unwrap();
        let url = parse_url(&format!("https://127.0.0.1:{port}/openid/v1/jwks")).unwrap();
        let err = JwksSource::new(url, ca, token).fetch().await.unwrap_err();
        assert_eq!(err.reason(), "connect", "{err}");
        assert!(err.to_string().contains("cannot connect"), "{err}");
    }
}
