//! A scripted SDS server for sidecar tests: a real tonic `SecretDiscoveryService` over TLS 1.3
//! presenting `spiffe://<td>/trellis/control`, where the test decides every response and reads
//! every ACK or NACK the sidecar sends back.
//!
//! ```no_run
//! # async fn f() -> anyhow::Result<()> {
//! use std::time::Duration;
//! use trellis_tests::sds_server::{csr_of, secrets_response, LeafSpec, SdsServer, TestCa};
//!
//! let ca = TestCa::root("example.org");
//! let mut server = SdsServer::start(&ca).await?;
//! // … start `trellis sidecar --control-plane <server.addr> --control-bundle <server.bundle_path>`
//! let mut stream = server.next_stream(Duration::from_secs(30)).await?;
//! let first = stream.request(Duration::from_secs(30)).await?;
//! let chain = ca.sign_csr(&csr_of(&first).unwrap(), &LeafSpec::new("spiffe://example.org/b"))?;
//! let reply = stream
//!     .push_and_wait(secrets_response("v1", &chain, None, &ca.bundle_pem()), Duration::from_secs(30))
//!     .await?;
//! assert!(reply.is_ack());
//! # Ok(()) }
//! ```
//!
//! The CA is the one test CA, `trellis_identity::testca::TestCa` (re-exported here): in CSR
//! mode the sidecar keeps its key, so the test signs the public key it was given
//! ([`TestCa::sign_csr`]) with exactly the property under test (expired, another SPIFFE ID,
//! another CA). The same server serves the sidecar crate's in-process SDS client tests.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use tempfile::TempDir;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::transport::server::Connected;
use tonic::{Request, Response, Status, Streaming};
pub use trellis_identity::testca::{LeafSpec, TestCa};
use trellis_identity::tls::{server_config, SpiffeClientVerifier, SvidResolver, TlsPolicy};
use trellis_identity::{
    certs_to_pem, key_to_pem, CertificateDer, PrivateKeyDer, SpiffeId, Svid, TrustBundle,
};
use trellis_proto::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
use trellis_proto::{
    data_source, secret, CertificateValidationContext, DataSource, DiscoveryRequest,
    DiscoveryResponse, Secret, SecretDiscoveryService, SecretDiscoveryServiceServer,
    TlsCertificate, SECRET_TYPE_URL,
};

/// `node.metadata` key of the sidecar's CSR (`trellis_sidecar::csr::CSR_METADATA_KEY`).
pub const CSR_METADATA_KEY: &str = "trellis.io/csr";

// ---- responses ----------------------------------------------------------------------------

/// An inline-bytes `DataSource`.
pub fn inline(bytes: impl Into<Vec<u8>>) -> Option<DataSource> {
    Some(DataSource {
        specifier: Some(data_source::Specifier::InlineBytes(bytes.into())),
    })
}

/// The `default` secret: a chain and, in server-key mode, a key (both PEM).
pub fn tls_secret(chain_pem: &str, key_pem: Option<&str>) -> Secret {
    Secret {
        name: "default".into(),
        r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
            certificate_chain: inline(chain_pem),
            private_key: key_pem.and_then(inline),
        })),
    }
}

/// The `ROOTCA` secret.
pub fn bundle_secret(bundle_pem: &str) -> Secret {
    Secret {
        name: "ROOTCA".into(),
        r#type: Some(secret::Type::ValidationContext(
            CertificateValidationContext {
                trusted_ca: inline(bundle_pem),
            },
        )),
    }
}

/// A secret wrapped as the `Any` a response carries.
pub fn any_of(secret: &Secret) -> prost_types::Any {
    prost_types::Any {
        type_url: SECRET_TYPE_URL.into(),
        value: prost::Message::encode_to_vec(secret),
    }
}

/// A State-of-the-World response with `resources`, `version_info` = `version` and nonce
/// `nonce-<version>`.
pub fn response(version: &str, resources: Vec<prost_types::Any>) -> DiscoveryResponse {
    DiscoveryResponse {
        version_info: version.into(),
        resources,
        canary: false,
        type_url: SECRET_TYPE_URL.into(),
        nonce: format!("nonce-{version}"),
    }
}

/// `default` (chain, optional key) and `ROOTCA` in one response.
pub fn secrets_response(
    version: &str,
    chain: &[CertificateDer<'_>],
    key: Option<&PrivateKeyDer<'_>>,
    bundle_pem: &str,
) -> DiscoveryResponse {
    let key_pem = key.map(key_to_pem);
    response(
        version,
        vec![
            any_of(&tls_secret(
                &certs_to_pem(chain),
                key_pem.as_ref().map(|k| k.as_str()),
            )),
            any_of(&bundle_secret(bundle_pem)),
        ],
    )
}

/// The CSR (PEM) in a request's `node.metadata`, if any.
pub fn csr_of(req: &DiscoveryRequest) -> Option<String> {
    let field = req
        .node
        .as_ref()?
        .metadata
        .as_ref()?
        .fields
        .get(CSR_METADATA_KEY)?;
    match field.kind.as_ref()? {
        prost_types::value::Kind::StringValue(s) => Some(s.clone()),
        _ => None,
    }
}

// ---- the server ---------------------------------------------------------------------------

/// The client's SPIFFE ID from its TLS certificate, if it presented one.
#[derive(Clone, Debug)]
struct PeerId(Option<SpiffeId>);

struct Conn {
    inner: TlsStream<TcpStream>,
    peer: PeerId,
}

impl Connected for Conn {
    type ConnectInfo = PeerId;
    fn connect_info(&self) -> PeerId {
        self.peer.clone()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// What the sidecar answered to one pushed response.
#[derive(Debug, Clone)]
pub struct Reply {
    /// The request itself.
    pub request: DiscoveryRequest,
}

impl Reply {
    /// An ACK: no `error_detail`.
    pub fn is_ack(&self) -> bool {
        self.request.error_detail.is_none()
    }

    /// The request's `version_info` (the last version the sidecar accepted).
    pub fn version(&self) -> &str {
        &self.request.version_info
    }

    /// `error_detail.message` of a NACK.
    pub fn nack_message(&self) -> Option<&str> {
        self.request
            .error_detail
            .as_ref()
            .map(|d| d.message.as_str())
    }

    /// `error_detail.code` of a NACK.
    pub fn nack_code(&self) -> Option<i32> {
        self.request.error_detail.as_ref().map(|d| d.code)
    }
}

/// One `StreamSecrets` call from a sidecar, for the test to script.
pub struct ScriptedStream {
    /// The `authorization` header, if the client sent one.
    pub authorization: Option<String>,
    /// The SPIFFE ID of the client certificate, if the client presented one.
    pub peer: Option<SpiffeId>,
    requests: Streaming<DiscoveryRequest>,
    responses: mpsc::Sender<Result<DiscoveryResponse, Status>>,
    /// The most recent request received.
    pub last_request: Option<DiscoveryRequest>,
}

impl ScriptedStream {
    /// The next request within `timeout`. Errors if the client ended the stream.
    pub async fn request(&mut self, timeout: Duration) -> anyhow::Result<DiscoveryRequest> {
        let msg = tokio::time::timeout(timeout, self.requests.message())
            .await
            .with_context(|| format!("no SDS request from the sidecar within {timeout:?}"))?;
        match msg {
            Ok(Some(r)) => {
                self.last_request = Some(r.clone());
                Ok(r)
            }
            Ok(None) => bail!("the sidecar closed its SDS stream"),
            Err(status) => bail!("the sidecar's SDS stream failed: {status}"),
        }
    }

    /// Sends `resp` on the stream.
    pub async fn push(&self, resp: DiscoveryResponse) -> anyhow::Result<()> {
        self.responses
            .send(Ok(resp))
            .await
            .map_err(|_| anyhow!("the SDS response stream is closed"))
    }

    /// Ends the stream with a gRPC error status.
    pub async fn fail(&self, status: Status) -> anyhow::Result<()> {
        self.responses
            .send(Err(status))
            .await
            .map_err(|_| anyhow!("the SDS response stream is closed"))
    }

    /// Sends `resp` and returns the request that answers it (the first one carrying its
    /// nonce). Requests with another nonce (a key rotation's fresh CSR) are skipped.
    pub async fn push_and_wait(
        &mut self,
        resp: DiscoveryResponse,
        timeout: Duration,
    ) -> anyhow::Result<Reply> {
        let nonce = resp.nonce.clone();
        self.push(resp).await?;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let request = self
                .request(left)
                .await
                .with_context(|| format!("waiting for the ACK/NACK of nonce {nonce:?}"))?;
            if request.response_nonce == nonce {
                return Ok(Reply { request });
            }
        }
    }

    /// The CSR of the most recent request, if any.
    pub fn latest_csr(&self) -> Option<String> {
        self.last_request.as_ref().and_then(csr_of)
    }
}

struct Service {
    streams: mpsc::Sender<ScriptedStream>,
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl SecretDiscoveryService for Service {
    type DeltaSecretsStream = BoxStream<DeltaDiscoveryResponse>;
    type StreamSecretsStream = BoxStream<DiscoveryResponse>;

    async fn delta_secrets(
        &self,
        _: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaSecretsStream>, Status> {
        Err(Status::unimplemented(
            "scripted SDS server: StreamSecrets only",
        ))
    }

    async fn stream_secrets(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamSecretsStream>, Status> {
        let authorization = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let peer = request
            .extensions()
            .get::<PeerId>()
            .and_then(|p| p.0.clone());
        let (tx, rx) = mpsc::channel(16);
        let stream = ScriptedStream {
            authorization,
            peer,
            requests: request.into_inner(),
            responses: tx,
            last_request: None,
        };
        self.streams
            .send(stream)
            .await
            .map_err(|_| Status::unavailable("the test is over"))?;
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn fetch_secrets(
        &self,
        _: Request<DiscoveryRequest>,
    ) -> Result<Response<DiscoveryResponse>, Status> {
        Err(Status::unimplemented(
            "scripted SDS server: StreamSecrets only",
        ))
    }
}

/// A scripted SDS server on `127.0.0.1:0`, serving TLS 1.3 with a control-plane SVID (by
/// default `spiffe://<td>/trellis/control` from the CA it was started with). Client
/// certificates are optional and verified against the same bundle (sidecars re-attest with
/// their SVID).
pub struct SdsServer {
    /// Where it listens.
    pub addr: SocketAddr,
    /// The CA's bundle as a file, for `--control-bundle`.
    pub bundle_path: PathBuf,
    /// Holds `bundle_path`; a test may put logs here too.
    pub dir: TempDir,
    streams: mpsc::Receiver<ScriptedStream>,
    handshakes_failed: Arc<AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for SdsServer {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl SdsServer {
    /// Starts the server with a control-plane SVID (`spiffe://<td>/trellis/control`) from
    /// `ca`, verifying optional client certificates against `ca`'s bundle.
    pub async fn start(ca: &TestCa) -> anyhow::Result<Self> {
        Self::start_with(&ca.bundle(), &ca.svid("/trellis/control")).await
    }

    /// Starts the server presenting `control`, verifying optional client certificates against
    /// `bundle` (which is also what `bundle_path` holds).
    pub async fn start_with(bundle: &TrustBundle, control: &Svid) -> anyhow::Result<Self> {
        let resolver = SvidResolver::empty();
        resolver
            .install(control)
            .map_err(|e| anyhow!("control SVID: {e}"))?;
        let shared = Arc::new(arc_swap::ArcSwap::from_pointee(bundle.clone()));
        let tls = server_config(
            resolver,
            SpiffeClientVerifier::new(shared, true),
            TlsPolicy::Tls13,
            &[b"h2"],
        )?;
        let acceptor = TlsAcceptor::from(Arc::new(tls));
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (conn_tx, conn_rx) = mpsc::channel::<Result<Conn, io::Error>>(16);
        let handshakes_failed = Arc::new(AtomicUsize::new(0));
        let failed = Arc::clone(&handshakes_failed);
        let accept = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let acceptor = acceptor.clone();
                let conn_tx = conn_tx.clone();
                let failed = Arc::clone(&failed);
                tokio::spawn(async move {
                    // A failed handshake is the client's problem (the sidecar logs it); the
                    // count lets a test prove the client tried and gave up.
                    match acceptor.accept(tcp).await {
                        Ok(tls) => {
                            let peer = PeerId(trellis_identity::tls::peer_spiffe_id(
                                tls.get_ref().1.peer_certificates(),
                            ));
                            let _ = conn_tx.send(Ok(Conn { inner: tls, peer })).await;
                        }
                        Err(_) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        let (streams_tx, streams) = mpsc::channel(16);
        let serve = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(SecretDiscoveryServiceServer::new(Service {
                    streams: streams_tx,
                }))
                .serve_with_incoming(ReceiverStream::new(conn_rx))
                .await;
        });
        let dir = tempfile::tempdir()?;
        let bundle_path = dir.path().join("control-bundle.pem");
        std::fs::write(&bundle_path, bundle.to_pem())?;
        Ok(SdsServer {
            addr,
            bundle_path,
            dir,
            streams,
            handshakes_failed,
            tasks: vec![accept, serve],
        })
    }

    /// The next `StreamSecrets` call within `timeout`.
    pub async fn next_stream(&mut self, timeout: Duration) -> anyhow::Result<ScriptedStream> {
        tokio::time::timeout(timeout, self.streams.recv())
            .await
            .with_context(|| format!("no SDS stream opened within {timeout:?}"))?
            .context("the SDS server stopped")
    }

    /// TLS handshakes that did not complete (a client that refused this server, or gave up).
    pub fn handshakes_failed(&self) -> usize {
        self.handshakes_failed.load(Ordering::Relaxed)
    }

    /// A stream opened since the last call, if any (to prove a client did *not* reconnect).
    pub fn try_next_stream(&mut self) -> Option<ScriptedStream> {
        self.streams.try_recv().ok()
    }
}
