//! The SDS client against a scripted fake SDS server (real TLS, real gRPC): every hostile
//! update is NACKed with an `error_detail` naming the problem, counted, and the previous SVID
//! stays installed. Also: what the client sends (node, CSR, credential) on each stream.
#![allow(clippy::unwrap_used)]

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use futures::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;
use tonic::{Request, Response, Status, Streaming};
use trellis_identity::testca::{LeafSpec, TestCa};
use trellis_identity::tls::{server_config, SpiffeClientVerifier, SvidResolver, TlsPolicy};
use trellis_identity::{certs_to_pem, key_to_pem, CertificateDer, SpiffeId, Svid, TrustBundle};
use trellis_proto::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
use trellis_proto::{
    data_source, secret, CertificateValidationContext, DataSource, DiscoveryRequest,
    DiscoveryResponse, Secret, SecretDiscoveryService, SecretDiscoveryServiceServer,
    TlsCertificate, SECRET_TYPE_URL,
};
use trellis_sidecar::config::{Credential, SdsSettings};
use trellis_sidecar::csr::CSR_METADATA_KEY;
use trellis_sidecar::metrics::SidecarMetrics;
use trellis_sidecar::sds::SdsClient;
use trellis_sidecar::SvidStore;

const WEB: &str = "spiffe://example.org/web";

fn metric(m: &SidecarMetrics, line_prefix: &str) -> f64 {
    m.encode()
        .lines()
        .find(|l| l.starts_with(line_prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

// ---- the fake server ----------------------------------------------------------------------

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

/// One StreamSecrets call, handed to the test to script.
struct FakeStream {
    authorization: Option<String>,
    peer: Option<SpiffeId>,
    requests: Streaming<DiscoveryRequest>,
    responses: mpsc::Sender<Result<DiscoveryResponse, Status>>,
}

impl FakeStream {
    async fn request(&mut self) -> DiscoveryRequest {
        tokio::time::timeout(Duration::from_secs(10), self.requests.message())
            .await
            .expect("a request within 10 s")
            .unwrap()
            .expect("the stream is open")
    }

    async fn respond(&self, r: DiscoveryResponse) {
        self.responses.send(Ok(r)).await.unwrap();
    }
}

struct Service {
    streams: mpsc::Sender<FakeStream>,
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
        Err(Status::unimplemented("fake"))
    }

    async fn stream_secrets(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamSecretsStream>, Status> {
        let authorization = request
            .metadata()
            .get("authorization")
            .map(|v| v.to_str().unwrap().to_owned());
        let peer = request
            .extensions()
            .get::<PeerId>()
            .and_then(|p| p.0.clone());
        let (tx, rx) = mpsc::channel(8);
        let stream = FakeStream {
            authorization,
            peer,
            requests: request.into_inner(),
            responses: tx,
        };
        self.streams
            .send(stream)
            .await
            .map_err(|_| Status::unavailable("test over"))?;
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn fetch_secrets(
        &self,
        _: Request<DiscoveryRequest>,
    ) -> Result<Response<DiscoveryResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
}

/// A TLS SDS server presenting `spiffe://example.org/trellis/control` from `ca`.
struct FakeSds {
    addr: std::net::SocketAddr,
    streams: mpsc::Receiver<FakeStream>,
    _dir: tempfile::TempDir,
    bundle_path: std::path::PathBuf,
}

impl FakeSds {
    async fn start(bundle: &TrustBundle, control: &Svid) -> Self {
        let resolver = SvidResolver::empty();
        resolver.install(control).unwrap();
        let shared = Arc::new(arc_swap::ArcSwap::from_pointee(bundle.clone()));
        let tls = server_config(
            resolver,
            SpiffeClientVerifier::new(shared, true),
            TlsPolicy::Tls13,
            &[b"h2"],
        )
        .unwrap();
        let acceptor = TlsAcceptor::from(Arc::new(tls));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (conn_tx, conn_rx) = mpsc::channel::<Result<Conn, io::Error>>(16);
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let acceptor = acceptor.clone();
                let conn_tx = conn_tx.clone();
                tokio::spawn(async move {
                    if let Ok(tls) = acceptor.accept(tcp).await {
                        let peer = PeerId(trellis_identity::tls::peer_spiffe_id(
                            tls.get_ref().1.peer_certificates(),
                        ));
                        let _ = conn_tx.send(Ok(Conn { inner: tls, peer })).await;
                    }
                });
            }
        });
        let (streams_tx, streams) = mpsc::channel(8);
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(SecretDiscoveryServiceServer::new(Service {
                    streams: streams_tx,
                }))
                .serve_with_incoming(ReceiverStream::new(conn_rx)),
        );
        let dir = tempfile::tempdir().unwrap();
        let bundle_path = dir.path().join("bundle.pem");
        std::fs::write(&bundle_path, bundle.to_pem()).unwrap();
        Self {
            addr,
            streams,
            _dir: dir,
            bundle_path,
        }
    }

    async fn stream(&mut self) -> FakeStream {
        tokio::time::timeout(Duration::from_secs(10), self.streams.recv())
            .await
            .expect("a stream within 10 s")
            .unwrap()
    }
}

// ---- responses ----------------------------------------------------------------------------

fn inline(b: impl Into<Vec<u8>>) -> Option<DataSource> {
    Some(DataSource {
        specifier: Some(data_source::Specifier::InlineBytes(b.into())),
    })
}

fn any(s: Secret) -> prost_types::Any {
    prost_types::Any {
        type_url: SECRET_TYPE_URL.into(),
        value: prost::Message::encode_to_vec(&s),
    }
}

fn response(
    version: &str,
    chain_pem: &str,
    key_pem: Option<&str>,
    bundle_pem: &str,
) -> DiscoveryResponse {
    let default = Secret {
        name: "default".into(),
        r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
            certificate_chain: inline(chain_pem),
            private_key: key_pem.and_then(inline),
        })),
    };
    let rootca = Secret {
        name: "ROOTCA".into(),
        r#type: Some(secret::Type::ValidationContext(
            CertificateValidationContext {
                trusted_ca: inline(bundle_pem),
            },
        )),
    };
    DiscoveryResponse {
        version_info: version.into(),
        resources: vec![any(default), any(rootca)],
        canary: false,
        type_url: SECRET_TYPE_URL.into(),
        nonce: format!("nonce-{version}"),
    }
}

fn svid_response(version: &str, svid: &Svid, bundle: &TrustBundle) -> DiscoveryResponse {
    response(
        version,
        &certs_to_pem(svid.chain()),
        Some(key_to_pem(svid.key()).as_str()),
        &bundle.to_pem(),
    )
}

// ---- the sidecar side ---------------------------------------------------------------------

struct Client {
    store: Arc<SvidStore>,
    metrics: Arc<SidecarMetrics>,
    _stop: watch::Sender<bool>,
}

fn client(
    fake: &FakeSds,
    bundle: &TrustBundle,
    credential: Credential,
    expected: Option<&str>,
    csr: bool,
) -> Client {
    let metrics = Arc::new(SidecarMetrics::new());
    let expected_id = expected.map(|e| SpiffeId::parse(e).unwrap());
    let store = SvidStore::new(bundle.clone(), expected_id.clone(), Arc::clone(&metrics));
    let settings = SdsSettings {
        control_plane: fake.addr.to_string(),
        control_bundle: fake.bundle_path.clone().into(),
        credential,
        expected_id,
        csr,
    };
    let c = SdsClient::new(settings, Arc::clone(&store), Arc::clone(&metrics)).unwrap();
    let (stop, rx) = watch::channel(false);
    tokio::spawn(c.run(rx));
    Client {
        store,
        metrics,
        _stop: stop,
    }
}

fn join() -> Credential {
    Credential::JoinToken(zeroize::Zeroizing::new("trellis-join.test-token".into()))
}

/// Starts a fake server and a non-CSR client, delivers one good SVID and checks its ACK.
async fn with_first_svid(expected: Option<&str>) -> (TestCa, FakeSds, Client, FakeStream) {
    let ca = TestCa::root("example.org");
    let mut fake = FakeSds::start(&ca.bundle(), &ca.svid("/trellis/control")).await;
    let c = client(&fake, &ca.bundle(), join(), expected, false);
    let mut s = fake.stream().await;
    let first = s.request().await;
    assert_eq!(first.resource_names, ["default", "ROOTCA"]);
    assert_eq!(first.type_url, SECRET_TYPE_URL);
    assert!(first.response_nonce.is_empty() && first.error_detail.is_none());
    s.respond(svid_response("v1", &ca.svid("/web"), &ca.bundle()))
        .await;
    let ack = s.request().await;
    assert_eq!(
        (ack.version_info.as_str(), ack.response_nonce.as_str()),
        ("v1", "nonce-v1")
    );
    assert!(ack.error_detail.is_none(), "{:?}", ack.error_detail);
    assert!(c.store.is_ready(SystemTime::now(), Duration::ZERO));
    (ca, fake, c, s)
}

/// Sends `bad` as v2 and checks the NACK: nonce of v2, version v1, INVALID_ARGUMENT, a message
/// containing `says`; the SVID is unchanged and `reason` was counted.
async fn assert_nacked(
    c: &Client,
    s: &mut FakeStream,
    bad: DiscoveryResponse,
    reason: &str,
    says: &str,
) {
    let before = c.store.current().unwrap().serial_hex().to_owned();
    s.respond(bad).await;
    let nack = s.request().await;
    assert_eq!(nack.response_nonce, "nonce-v2");
    assert_eq!(
        nack.version_info, "v1",
        "a NACK carries the last accepted version"
    );
    let detail = nack.error_detail.expect("a NACK carries error_detail");
    assert_eq!(detail.code, 3, "INVALID_ARGUMENT");
    assert!(
        detail.message.contains(says),
        "error_detail `{}` should mention `{says}`",
        detail.message
    );
    assert_eq!(
        c.store.current().unwrap().serial_hex(),
        before,
        "the previous SVID stays"
    );
    assert_eq!(
        metric(
            &c.metrics,
            &format!("trellis_sds_updates_total{{result=\"{reason}\"}}")
        ),
        1.0
    );
    assert_eq!(
        metric(&c.metrics, "trellis_sds_updates_total{result=\"ok\"}"),
        1.0
    );
}

// ---- hostile updates ----------------------------------------------------------------------

#[tokio::test]
async fn key_not_matching_certificate_is_nacked() {
    let (ca, _fake, c, mut s) = with_first_svid(None).await;
    let a = ca.svid("/web");
    let b = ca.svid("/web");
    let bad = response(
        "v2",
        &certs_to_pem(a.chain()),
        Some(key_to_pem(b.key()).as_str()),
        &ca.bundle().to_pem(),
    );
    assert_nacked(&c, &mut s, bad, "bad_key", "private key does not match").await;
}

#[tokio::test]
async fn wrong_spiffe_id_is_nacked() {
    let (ca, _fake, c, mut s) = with_first_svid(Some(WEB)).await;
    let bad = svid_response("v2", &ca.svid("/admin"), &ca.bundle());
    assert_nacked(
        &c,
        &mut s,
        bad,
        "wrong_identity",
        "spiffe://example.org/admin",
    )
    .await;
}

#[tokio::test]
async fn identity_change_is_nacked_even_without_expected_id() {
    let (ca, _fake, c, mut s) = with_first_svid(None).await;
    let bad = svid_response("v2", &ca.svid("/admin"), &ca.bundle());
    assert_nacked(
        &c,
        &mut s,
        bad,
        "wrong_identity",
        "this sidecar is `spiffe://example.org/web`",
    )
    .await;
}

#[tokio::test]
async fn expired_certificate_is_nacked() {
    let (ca, _fake, c, mut s) = with_first_svid(None).await;
    let mut spec = LeafSpec::new(WEB);
    spec.not_before = SystemTime::now() - Duration::from_secs(7200);
    spec.not_after = SystemTime::now() - Duration::from_secs(60);
    let (chain, key) = ca.issue(&spec);
    let bad = response(
        "v2",
        &certs_to_pem(&chain),
        Some(key_to_pem(&key).as_str()),
        &ca.bundle().to_pem(),
    );
    assert_nacked(&c, &mut s, bad, "expired", "expired or not yet valid").await;
}

#[tokio::test]
async fn garbage_pem_is_nacked() {
    let (ca, _fake, c, mut s) = with_first_svid(None).await;
    let bad = response(
        "v2",
        "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
        None,
        &ca.bundle().to_pem(),
    );
    assert_nacked(&c, &mut s, bad, "malformed", "certificate_chain").await;
}

#[tokio::test]
async fn empty_bundle_is_nacked() {
    let (ca, _fake, c, mut s) = with_first_svid(None).await;
    let svid = ca.svid("/web");
    let bad = response(
        "v2",
        &certs_to_pem(svid.chain()),
        Some(key_to_pem(svid.key()).as_str()),
        "",
    );
    assert_nacked(&c, &mut s, bad, "bad_bundle", "secret `ROOTCA`").await;
}

#[tokio::test]
async fn certificate_from_another_ca_is_nacked() {
    let (ca, _fake, c, mut s) = with_first_svid(None).await;
    let other = TestCa::root("example.org");
    let bad = svid_response("v2", &other.svid("/web"), &ca.bundle());
    assert_nacked(
        &c,
        &mut s,
        bad,
        "unknown_ca",
        "does not chain to the trust bundle",
    )
    .await;
}

#[tokio::test]
async fn response_missing_rootca_is_nacked() {
    let (ca, _fake, c, mut s) = with_first_svid(None).await;
    let mut bad = svid_response("v2", &ca.svid("/web"), &ca.bundle());
    bad.resources.truncate(1);
    assert_nacked(&c, &mut s, bad, "missing_secret", "missing secret `ROOTCA`").await;
}

#[tokio::test]
async fn good_update_after_nack_is_installed() {
    let (ca, _fake, c, mut s) = with_first_svid(None).await;
    let bad = response("v2", "garbage", None, &ca.bundle().to_pem());
    assert_nacked(&c, &mut s, bad, "malformed", "certificate_chain").await;
    let next = ca.svid("/web");
    let mut good = svid_response("v3", &next, &ca.bundle());
    good.nonce = "nonce-v3".into();
    s.respond(good).await;
    let ack = s.request().await;
    assert_eq!(
        (ack.version_info.as_str(), ack.response_nonce.as_str()),
        ("v3", "nonce-v3")
    );
    assert!(ack.error_detail.is_none());
    assert_eq!(c.store.current().unwrap().serial_hex(), next.serial_hex());
}

// ---- CSR mode -----------------------------------------------------------------------------

#[tokio::test]
async fn key_in_response_is_nacked_in_csr_mode() {
    let ca = TestCa::root("example.org");
    let mut fake = FakeSds::start(&ca.bundle(), &ca.svid("/trellis/control")).await;
    let c = client(&fake, &ca.bundle(), join(), None, true);
    let mut s = fake.stream().await;
    s.request().await;
    s.respond(svid_response("v1", &ca.svid("/web"), &ca.bundle()))
        .await;
    let nack = s.request().await;
    let detail = nack.error_detail.expect("NACK");
    assert!(
        detail.message.contains("keys must not leave the workload"),
        "{}",
        detail.message
    );
    assert!(c.store.current().is_none());
    assert_eq!(
        metric(
            &c.metrics,
            "trellis_sds_updates_total{result=\"key_in_response\"}"
        ),
        1.0
    );
}

fn csr_of(req: &DiscoveryRequest) -> String {
    let field = req
        .node
        .as_ref()
        .unwrap()
        .metadata
        .as_ref()
        .unwrap()
        .fields
        .get(CSR_METADATA_KEY)
        .unwrap();
    match field.kind.as_ref().unwrap() {
        prost_types::value::Kind::StringValue(s) => s.clone(),
        other => panic!("CSR is not a string: {other:?}"),
    }
}

fn public_key_of_csr(pem: &str) -> Vec<u8> {
    use rcgen::PublicKeyData;
    rcgen::CertificateSigningRequestParams::from_pem(pem)
        .unwrap()
        .public_key
        .der_bytes()
        .to_vec()
}

fn public_key_of(svid: &Svid) -> Vec<u8> {
    rcgen::KeyPair::try_from(svid.key())
        .unwrap()
        .public_key_raw()
        .to_vec()
}

#[tokio::test]
async fn csr_mode_installs_our_key_and_rotates_it_on_the_same_stream() {
    // The real CA's CSR signer behind a scripted stream, so the test sees every request.
    let dir = tempfile::tempdir().unwrap();
    let registry = trellis_control::registry::Registry::open(&dir.path().join("t.db")).unwrap();
    let td = trellis_identity::TrustDomain::parse("example.org").unwrap();
    let ca = trellis_control::ca::Ca::load_or_create(&registry, &td).unwrap();
    let web = SpiffeId::parse(WEB).unwrap();
    let control = ca
        .issue(
            &SpiffeId::parse("spiffe://example.org/trellis/control").unwrap(),
            Duration::from_secs(3600),
            SystemTime::now(),
        )
        .unwrap();
    let mut fake = FakeSds::start(ca.bundle(), &control).await;
    let c = client(&fake, ca.bundle(), join(), Some(WEB), true);
    let sign = |csr: &str, ttl: u64| -> Vec<CertificateDer<'static>> {
        ca.sign_csr(csr, &web, Duration::from_secs(ttl), SystemTime::now())
            .unwrap()
    };

    let mut s = fake.stream().await;
    let first = s.request().await;
    let node = first.node.clone().unwrap();
    assert_eq!(node.id, WEB, "node.id is the expected SPIFFE ID");
    assert_eq!(node.cluster, "trellis");
    assert_eq!(node.user_agent_name, "trellis-sidecar");
    assert_eq!(
        s.authorization.as_deref(),
        Some("Bearer trellis-join.test-token")
    );
    let csr1 = csr_of(&first);
    assert!(csr1.starts_with("-----BEGIN CERTIFICATE REQUEST-----"));

    // 4 s certificates: the client's next CSR is due in about 2 s.
    let chain = sign(&csr1, 4);
    s.respond(response(
        "v1",
        &certs_to_pem(&chain),
        None,
        &ca.bundle().to_pem(),
    ))
    .await;
    let ack = s.request().await;
    assert!(ack.error_detail.is_none(), "{:?}", ack.error_detail);
    assert_eq!(
        csr_of(&ack),
        csr1,
        "every request repeats the CSR until it is replaced"
    );
    let svid = c.store.current().unwrap();
    assert_eq!(
        public_key_of(&svid),
        public_key_of_csr(&csr1),
        "the store holds the key we made"
    );

    // The client rotates its key: a fresh request on the same stream with a new CSR.
    let rotate = s.request().await;
    assert!(rotate.error_detail.is_none());
    assert_eq!(
        (rotate.version_info.as_str(), rotate.response_nonce.as_str()),
        ("v1", "nonce-v1")
    );
    let csr2 = csr_of(&rotate);
    assert_ne!(csr2, csr1);
    let chain = sign(&csr2, 3600);
    s.respond(response(
        "v2",
        &certs_to_pem(&chain),
        None,
        &ca.bundle().to_pem(),
    ))
    .await;
    let ack = s.request().await;
    assert!(ack.error_detail.is_none(), "{:?}", ack.error_detail);
    assert_eq!(csr_of(&ack), csr2);
    let svid = c.store.current().unwrap();
    assert_eq!(
        public_key_of(&svid),
        public_key_of_csr(&csr2),
        "the new key is installed"
    );

    // A server-initiated renewal for the current key is accepted too.
    let chain = sign(&csr2, 3600);
    let serial = trellis_identity::cert_facts(&chain[0]).unwrap().serial_hex;
    s.respond(response(
        "v3",
        &certs_to_pem(&chain),
        None,
        &ca.bundle().to_pem(),
    ))
    .await;
    let ack = s.request().await;
    assert!(ack.error_detail.is_none(), "{:?}", ack.error_detail);
    assert_eq!(c.store.current().unwrap().serial_hex(), serial);

    // A certificate for a key we never asked for is refused.
    let stranger = trellis_sidecar::csr::generate(Some(&web)).unwrap();
    let chain = sign(&stranger.csr_pem, 3600);
    s.respond(response(
        "v4",
        &certs_to_pem(&chain),
        None,
        &ca.bundle().to_pem(),
    ))
    .await;
    let nack = s.request().await;
    assert!(nack
        .error_detail
        .unwrap()
        .message
        .contains("not for the key of any CSR"));
    assert_eq!(c.store.current().unwrap().serial_hex(), serial);
}

// ---- credentials --------------------------------------------------------------------------

#[tokio::test]
async fn token_file_is_reread_on_every_connect() {
    let ca = TestCa::root("example.org");
    let mut fake = FakeSds::start(&ca.bundle(), &ca.svid("/trellis/control")).await;
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "first-token\n").unwrap();
    let c = client(
        &fake,
        &ca.bundle(),
        Credential::TokenFile(token.clone()),
        None,
        false,
    );
    let mut s = fake.stream().await;
    assert_eq!(s.authorization.as_deref(), Some("Bearer first-token"));
    s.request().await;
    // Kubelet rotates the token; the stream fails before any SVID arrives.
    std::fs::write(&token, "second-token\n").unwrap();
    s.responses
        .send(Err(Status::unavailable("restarting")))
        .await
        .unwrap();
    let s = fake.stream().await;
    assert_eq!(s.authorization.as_deref(), Some("Bearer second-token"));
    assert!(s.peer.is_none(), "no SVID yet, so no client certificate");
    assert!(c.store.current().is_none());
}

#[tokio::test]
async fn token_file_is_tried_when_the_svid_is_refused() {
    let ca = TestCa::root("example.org");
    let mut fake = FakeSds::start(&ca.bundle(), &ca.svid("/trellis/control")).await;
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "k8s-token").unwrap();
    let c = client(
        &fake,
        &ca.bundle(),
        Credential::TokenFile(token),
        None,
        false,
    );
    let mut s = fake.stream().await;
    s.request().await;
    s.respond(svid_response("v1", &ca.svid("/web"), &ca.bundle()))
        .await;
    s.request().await;
    assert!(c.store.current().is_some());
    s.responses
        .send(Err(Status::unavailable("restarting")))
        .await
        .unwrap();
    // With an SVID: no token. The control plane refuses it (say its bundle lost our CA).
    let s = fake.stream().await;
    assert_eq!((s.authorization.as_deref(), s.peer.is_some()), (None, true));
    s.responses
        .send(Err(Status::unauthenticated("unknown CA")))
        .await
        .unwrap();
    // Next attempt: the token file, without the SVID.
    let s = fake.stream().await;
    assert_eq!(
        (s.authorization.as_deref(), s.peer.is_some()),
        (Some("Bearer k8s-token"), false)
    );
    s.responses
        .send(Err(Status::unavailable("again")))
        .await
        .unwrap();
    // Then the SVID again.
    let s = fake.stream().await;
    assert_eq!(s.authorization, None);
}

#[tokio::test]
async fn reconnect_with_svid_sends_no_token_and_presents_the_svid() {
    let (ca, mut fake, c, s) = with_first_svid(None).await;
    assert!(s.authorization.is_some());
    assert!(s.peer.is_none());
    s.responses
        .send(Err(Status::unavailable("restarting")))
        .await
        .unwrap();
    // (sds_connected dips to 0 only for the backoff here, too briefly to poll for; the
    // control-plane restart test in identity_sds.rs shows it.)
    let mut again = fake.stream().await;
    assert_eq!(
        again.authorization, None,
        "the SVID re-attests: no token on the wire"
    );
    assert_eq!(again.peer.as_ref().map(|p| p.as_str()), Some(WEB));
    let first = again.request().await;
    assert_eq!(
        first.node.unwrap().id,
        WEB,
        "node.id is the SPIFFE ID once known"
    );
    again
        .respond(svid_response("v1", &ca.svid("/web"), &ca.bundle()))
        .await;
    assert!(again.request().await.error_detail.is_none());
    assert_eq!(metric(&c.metrics, "trellis_sds_connected"), 1.0);
}

#[tokio::test]
async fn unauthenticated_is_retried() {
    let ca = TestCa::root("example.org");
    let mut fake = FakeSds::start(&ca.bundle(), &ca.svid("/trellis/control")).await;
    let _c = client(&fake, &ca.bundle(), join(), None, false);
    let s = fake.stream().await;
    s.responses
        .send(Err(Status::unauthenticated("join token already used")))
        .await
        .unwrap();
    // Backoff, then another attempt.
    let _again = fake.stream().await;
}

#[tokio::test]
async fn control_plane_with_wrong_identity_is_refused() {
    let ca = TestCa::root("example.org");
    // The server presents a valid SVID of the trust domain, but not the control plane's.
    let mut fake = FakeSds::start(&ca.bundle(), &ca.svid("/impostor")).await;
    let c = client(&fake, &ca.bundle(), join(), None, false);
    let got = tokio::time::timeout(Duration::from_millis(1500), fake.streams.recv()).await;
    assert!(
        got.is_err(),
        "the client must not open a stream to an impostor"
    );
    assert_eq!(metric(&c.metrics, "trellis_sds_connected"), 0.0);
}

// ---- bootstrap ----------------------------------------------------------------------------

fn settings(bundle: std::path::PathBuf, credential: Credential, address: &str) -> SdsSettings {
    SdsSettings {
        control_plane: address.into(),
        control_bundle: bundle.into(),
        credential,
        expected_id: None,
        csr: true,
    }
}

fn new_err(s: SdsSettings) -> String {
    let ca = TestCa::root("example.org");
    let metrics = Arc::new(SidecarMetrics::new());
    let store = SvidStore::new(ca.bundle(), None, Arc::clone(&metrics));
    match SdsClient::new(s, store, metrics) {
        Ok(_) => panic!("bootstrap accepted"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn missing_control_bundle_names_the_file() {
    let err = new_err(settings(
        "/nonexistent/bundle.pem".into(),
        join(),
        "127.0.0.1:8443",
    ));
    assert!(
        err.starts_with("/nonexistent/bundle.pem: cannot read"),
        "{err}"
    );
}

#[test]
fn garbage_control_bundle_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bundle.pem");
    std::fs::write(&p, "garbage").unwrap();
    let err = new_err(settings(p.clone(), join(), "127.0.0.1:8443"));
    assert!(
        err.starts_with(&format!("{}: not a usable trust bundle", p.display())),
        "{err}"
    );
}

#[test]
fn unreadable_token_file_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bundle.pem");
    std::fs::write(&p, TestCa::root("example.org").bundle().to_pem()).unwrap();
    let err = new_err(settings(
        p,
        Credential::TokenFile("/nonexistent/token".into()),
        "127.0.0.1:8443",
    ));
    assert!(
        err.starts_with("/nonexistent/token: cannot read the token file"),
        "{err}"
    );
}

#[test]
fn empty_token_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bundle.pem");
    std::fs::write(&p, TestCa::root("example.org").bundle().to_pem()).unwrap();
    let t = dir.path().join("token");
    std::fs::write(&t, "\n").unwrap();
    let err = new_err(settings(p, Credential::TokenFile(t), "127.0.0.1:8443"));
    assert!(err.ends_with("the token file is empty"), "{err}");
}

#[test]
fn control_plane_address_without_port_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bundle.pem");
    std::fs::write(&p, TestCa::root("example.org").bundle().to_pem()).unwrap();
    let err = new_err(settings(p, join(), "trellis-control"));
    assert!(err.contains("expected host:port"), "{err}");
}
