//! `trellis control --k8s-jwks-url`: the Kubernetes issuer keys fetched from an API server
//! over HTTPS (verified with `--k8s-ca`, authenticated with the `--k8s-token` file), at start
//! and every `--k8s-jwks-refresh`.
//!
//! The "API server" is a small HTTPS server in the test: a certificate for 127.0.0.1 from a
//! test cluster CA (written as the `--k8s-ca` file), answering `GET /openid/v1/jwks` with
//! whatever the test sets, and only to the bearer token the test expects.
#![allow(clippy::unwrap_used)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{ensure, Context as _};
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use trellis_tests::control_must_fail_to_start as start_must_fail;
use trellis_tests::k8s::{K8sIssuer, AUDIENCE, ISSUER};
use trellis_tests::sds_server::{LeafSpec, TestCa};
use trellis_tests::{e2e, eventually, fetch_svid, ControlPlane, ControlPlaneOpts};

const JWKS_PATH: &str = "/openid/v1/jwks";

/// A test cluster CA and the API server's certificate (SAN 127.0.0.1) signed by it.
struct ClusterCa {
    ca_pem: String,
    server_chain: Vec<CertificateDer<'static>>,
    server_key: Vec<u8>,
}

impl ClusterCa {
    fn new() -> anyhow::Result<Self> {
        let ca = TestCa::root("cluster.local");
        let (mut server_chain, server_key) = ca.issue(&LeafSpec::server("127.0.0.1"));
        server_chain.push(ca.cert().clone());
        Ok(ClusterCa {
            ca_pem: ca.bundle_pem(),
            server_chain,
            server_key: server_key.secret_der().to_vec(),
        })
    }
}

/// What the fake API server answers, and what it has seen.
struct Served {
    /// Status and body of a `GET /openid/v1/jwks` with the right token.
    answer: Mutex<(u16, String)>,
    /// The only bearer token accepted.
    token: Mutex<String>,
    /// Requests answered, whatever the answer.
    hits: AtomicUsize,
    /// Requests refused for their token.
    unauthorized: AtomicUsize,
}

impl Served {
    fn set(&self, status: u16, body: String) {
        *self.answer.lock().unwrap() = (status, body);
    }
    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

/// The fake API server: HTTPS on 127.0.0.1, port chosen by the kernel. Stops when dropped.
struct ApiServer {
    addr: SocketAddr,
    served: Arc<Served>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ApiServer {
    async fn start(ca: &ClusterCa, token: &str, jwks: String) -> anyhow::Result<Self> {
        let config = rustls::ServerConfig::builder_with_provider(trellis_identity::tls::provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(
                ca.server_chain.clone(),
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(ca.server_key.clone())),
            )?;
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let served = Arc::new(Served {
            answer: Mutex::new((200, jwks)),
            token: Mutex::new(token.to_string()),
            hits: AtomicUsize::new(0),
            unauthorized: AtomicUsize::new(0),
        });
        let state = served.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let acceptor = acceptor.clone();
                let state = state.clone();
                tokio::spawn(async move {
                    // A client that fails the handshake (wrong CA) is simply gone.
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = service_fn(move |req| {
                        let state = state.clone();
                        async move { Ok::<_, Infallible>(answer(&state, &req)) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        Ok(ApiServer { addr, served, task })
    }

    fn url(&self) -> String {
        format!("https://{}{JWKS_PATH}", self.addr)
    }
}

fn answer(state: &Served, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let expected = format!("Bearer {}", state.token.lock().unwrap());
    let presented = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let (status, body) = if req.uri().path() != JWKS_PATH {
        (404, "not found".to_string())
    } else if presented != expected {
        state.unauthorized.fetch_add(1, Ordering::SeqCst);
        (
            401,
            r#"{"kind":"Status","message":"Unauthorized"}"#.to_string(),
        )
    } else {
        state.answer.lock().unwrap().clone()
    };
    state.hits.fetch_add(1, Ordering::SeqCst);
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap()
}

/// Writes `token` as kubelet does: a new file renamed over the old one.
fn write_token(path: &Path, token: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, token).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// The `--k8s-*` flags for a control plane trusting `server`.
fn jwks_url_args(server_url: &str, ca: &Path, token: &Path, refresh: &str) -> Vec<String> {
    vec![
        "--k8s-jwks-url".into(),
        server_url.into(),
        "--k8s-ca".into(),
        ca.display().to_string(),
        "--k8s-token".into(),
        token.display().to_string(),
        "--k8s-issuer".into(),
        ISSUER.into(),
        "--k8s-audience".into(),
        AUDIENCE.into(),
        "--k8s-jwks-refresh".into(),
        refresh.into(),
    ]
}

/// `trellis_jwks_refresh_failures_total{reason="…"}` on the control plane's `/metrics`; 0
/// before the first failure of that reason (a labelled counter has no line until it moves;
/// every use compares against an earlier reading, so a renamed metric still fails).
async fn refresh_failures(cp: &ControlPlane, reason: &str) -> anyhow::Result<u64> {
    let m = cp.metrics().await?;
    Ok(m.sum_or_zero("trellis_jwks_refresh_failures_total", &[("reason", reason)]) as u64)
}

/// The SPIFFE ID the control plane issues for `token`.
async fn attest(cp: &ControlPlane, token: &str) -> anyhow::Result<String> {
    let (svid, _bundle) = fetch_svid(cp, token).await?;
    Ok(svid.spiffe_id().as_str().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_from_the_api_server_attest_rotate_and_survive_garbage() -> anyhow::Result<()> {
    e2e(async {
        let dir = tempfile::tempdir()?;
        let ca = ClusterCa::new()?;
        let ca_file = dir.path().join("ca.crt");
        std::fs::write(&ca_file, &ca.ca_pem)?;
        let token_file = dir.path().join("token");
        write_token(&token_file, "control-plane-sa-token-1");

        let first = K8sIssuer::new()?;
        let server = ApiServer::start(&ca, "control-plane-sa-token-1", first.jwks()?).await?;
        let cp = ControlPlane::start(ControlPlaneOpts {
            extra_args: jwks_url_args(&server.url(), &ca_file, &token_file, "1s"),
            ..Default::default()
        })?;
        ensure!(
            server.served.hits() >= 1,
            "the keys were not fetched at start"
        );

        // 1. A workload token signed by the issuer attests.
        let id = attest(&cp, &first.token("demo", "service-a")?).await?;
        assert_eq!(id, "spiffe://example.org/ns/demo/sa/service-a");
        eprintln!(
            "start: {id} attested with the keys fetched from {}",
            server.url()
        );

        // 2. The issuer rotates its key, and kubelet rotates the control plane's own token:
        //    the next refresh (with the token file read again) picks up the new key.
        let second = K8sIssuer::new()?;
        *server.served.token.lock().unwrap() = "control-plane-sa-token-2".into();
        write_token(&token_file, "control-plane-sa-token-2");
        server.served.set(200, second.jwks()?);
        let rotated_token = second.token("demo", "service-b")?;
        let started = std::time::Instant::now();
        let id = eventually(
            Duration::from_secs(30),
            "a token of the rotated key to attest",
            || attest(&cp, &rotated_token),
        )
        .await?;
        assert_eq!(id, "spiffe://example.org/ns/demo/sa/service-b");
        eprintln!(
            "rotation: the new key attested {:?} after the switch ({} requests so far, {} with \
             the old token)",
            started.elapsed(),
            server.served.hits(),
            server.served.unauthorized.load(Ordering::SeqCst)
        );
        // The old key left the JWKS, so its tokens no longer verify.
        let refused = attest(&cp, &first.token("demo", "service-a")?).await;
        ensure!(
            refused.is_err(),
            "a token of the removed key still attests: {refused:?}"
        );
        eprintln!("rotation: old key refused: {:#}", refused.unwrap_err());

        // 3. Garbage, then an error status: both counted, the keys in force kept.
        for (status, body, reason) in [
            (
                200,
                "<html>this is not a JWKS</html>".to_string(),
                "invalid_jwks",
            ),
            (200, r#"{"keys":[]}"#.to_string(), "invalid_jwks"),
            (
                503,
                "the API server is overloaded".to_string(),
                "http_status",
            ),
        ] {
            let before = refresh_failures(&cp, reason).await?;
            let hits = server.served.hits();
            server.served.set(status, body.clone());
            eventually(
                Duration::from_secs(30),
                "two refreshes of the bad answer, counted",
                || async {
                    ensure!(server.served.hits() >= hits + 2, "not fetched twice yet");
                    let now = refresh_failures(&cp, reason).await?;
                    ensure!(now > before, "{reason} failures still {now}");
                    Ok(())
                },
            )
            .await?;
            let id = attest(&cp, &rotated_token).await?;
            assert_eq!(id, "spiffe://example.org/ns/demo/sa/service-b");
            eprintln!(
                "bad answer ({status} {body:?}): counted as {reason} ({} so far), keys kept",
                refresh_failures(&cp, reason).await?
            );
        }
        let log = cp.child.stderr();
        ensure!(
            log.contains("keeping the current ones"),
            "no warning logged for the failed refreshes:\n{log}"
        );

        // 4. The server recovers with a third key: refreshing resumed.
        let third = K8sIssuer::new()?;
        server.served.set(200, third.jwks()?);
        let third_token = third.token("prod", "web")?;
        let id = eventually(
            Duration::from_secs(30),
            "a token of the third key to attest",
            || attest(&cp, &third_token),
        )
        .await?;
        assert_eq!(id, "spiffe://example.org/ns/prod/sa/web");
        eprintln!(
            "recovery: third key attested; {} JWKS requests in all",
            server.served.hits()
        );
        Ok(())
    })
    .await
}

/// Files for a control plane: the cluster CA and a token, in `dir`.
fn write_files(dir: &Path, ca_pem: &str) -> (PathBuf, PathBuf) {
    let ca_file = dir.join("ca.crt");
    std::fs::write(&ca_file, ca_pem).unwrap();
    let token_file = dir.join("token");
    write_token(&token_file, "control-plane-sa-token");
    (ca_file, token_file)
}

#[test]
fn unreachable_jwks_url_stops_start() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let ca = ClusterCa::new()?;
    let (ca_file, token_file) = write_files(dir.path(), &ca.ca_pem);
    // Bound and released: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let url = format!("https://127.0.0.1:{port}{JWKS_PATH}");
    let stderr = start_must_fail(
        dir.path(),
        &jwks_url_args(&url, &ca_file, &token_file, "5m"),
    )?;
    ensure!(
        stderr.contains("cannot fetch the Kubernetes issuer keys") && stderr.contains(&url),
        "stderr does not say what failed: {stderr}"
    );
    ensure!(stderr.contains("cannot connect"), "stderr: {stderr}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_url_with_another_ca_stops_start() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let ca = ClusterCa::new()?;
    let other = ClusterCa::new()?;
    // The control plane is given a CA that did not sign the server's certificate.
    let (ca_file, token_file) = write_files(dir.path(), &other.ca_pem);
    let server = ApiServer::start(&ca, "control-plane-sa-token", K8sIssuer::new()?.jwks()?).await?;
    let args = jwks_url_args(&server.url(), &ca_file, &token_file, "5m");
    let path = dir.path().to_path_buf();
    let stderr = tokio::task::spawn_blocking(move || start_must_fail(&path, &args)).await??;
    ensure!(
        stderr.contains("TLS handshake failed") && stderr.contains("--k8s-ca"),
        "stderr does not blame the CA: {stderr}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_url_refusing_the_token_stops_start() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let ca = ClusterCa::new()?;
    let (ca_file, token_file) = write_files(dir.path(), &ca.ca_pem);
    // Authenticated but not authorized, as without the issuer-discovery ClusterRoleBinding.
    let server = ApiServer::start(&ca, "control-plane-sa-token", String::new()).await?;
    server.served.set(
        403,
        r#"{"kind":"Status","message":"forbidden: User cannot get path /openid/v1/jwks"}"#.into(),
    );
    let args = jwks_url_args(&server.url(), &ca_file, &token_file, "5m");
    let path = dir.path().to_path_buf();
    let stderr = tokio::task::spawn_blocking(move || start_must_fail(&path, &args)).await??;
    ensure!(
        stderr.contains("HTTP 403") && stderr.contains("system:service-account-issuer-discovery"),
        "stderr does not say what to do: {stderr}"
    );
    Ok(())
}

#[test]
fn jwks_url_and_jwks_file_together_are_refused() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let jwks = dir.path().join("jwks.json");
    std::fs::write(&jwks, K8sIssuer::new()?.jwks()?)?;
    let mut args = vec!["--k8s-jwks".to_string(), jwks.display().to_string()];
    args.extend(jwks_url_args(
        "https://kubernetes.default.svc/openid/v1/jwks",
        Path::new("/nonexistent/ca.crt"),
        Path::new("/nonexistent/token"),
        "5m",
    ));
    let stderr = start_must_fail(dir.path(), &args).context("both sources")?;
    ensure!(
        stderr.contains("--k8s-jwks-url") && stderr.contains("--k8s-jwks"),
        "stderr: {stderr}"
    );
    Ok(())
}
