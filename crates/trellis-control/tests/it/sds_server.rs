//! The SDS server in-process on loopback, driven by a real tonic client over TLS.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, SystemTime};

use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataValue;
use tonic::{Code, Streaming};
use trellis_control::config::{ControlFile, ControlSettings};
use trellis_control::server::ControlPlane;
use trellis_identity::tls::SvidResolver;
use trellis_identity::{verify_svid_chain, SpiffeId, Svid, TrustBundle, TrustDomain, Usage};
use trellis_proto::google::rpc::Status as RpcStatus;
use trellis_proto::{
    data_source, secret, DiscoveryRequest, DiscoveryResponse, Secret, SecretDiscoveryServiceClient,
    SECRET_TYPE_URL,
};

const WEB: &str = "spiffe://example.org/app/web";

struct Fixture {
    cp: ControlPlane,
    _dir: tempfile::TempDir,
    bundle: TrustBundle,
}

async fn start(rotate: Duration) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let file = ControlFile {
        trust_domain: Some("example.org".into()),
        listen: Some("127.0.0.1:0".parse().unwrap()),
        admin: Some("127.0.0.1:0".parse().unwrap()),
        state_dir: Some(dir.path().join("state")),
        svid_ttl: Some(Duration::from_secs(3600)),
        rotate_every: Some(rotate),
        ..Default::default()
    };
    let cp = ControlPlane::start(ControlSettings::from_file(file).unwrap())
        .await
        .unwrap();
    let bundle = TrustBundle::from_pem(td(), &std::fs::read(&cp.bundle_path).unwrap()).unwrap();
    Fixture {
        cp,
        _dir: dir,
        bundle,
    }
}

fn td() -> TrustDomain {
    TrustDomain::parse("example.org").unwrap()
}

type Client = SecretDiscoveryServiceClient<tonic::transport::Channel>;

impl Fixture {
    async fn client(&self, svid: Option<&Svid>) -> Client {
        SecretDiscoveryServiceClient::new(self.channel(svid).await)
    }

    async fn channel(&self, svid: Option<&Svid>) -> tonic::transport::Channel {
        let resolver = svid.map(|s| {
            let r = SvidResolver::empty();
            r.install(s).unwrap();
            r
        });
        let control = SpiffeId::parse("spiffe://example.org/trellis/control").unwrap();
        trellis_control::client::connect(self.cp.sds_addr, self.bundle.clone(), control, resolver)
            .await
            .unwrap()
    }

    fn token(&self, id: &str) -> String {
        let id = SpiffeId::parse(id).unwrap();
        self.cp
            .registry
            .create_join_token(&id, Duration::from_secs(60), SystemTime::now())
            .unwrap()
            .as_str()
            .to_owned()
    }

    /// One series (`name` or `name{labels}`) of the control plane's exposition; panics
    /// naming it if absent.
    #[track_caller]
    fn metric(&self, series: &str) -> f64 {
        trellis_tests::metrics::Metrics::parse(&self.cp.metrics.encode())
            .unwrap()
            .series(series)
    }
}

fn req(names: &[&str], version: &str, nonce: &str) -> DiscoveryRequest {
    DiscoveryRequest {
        version_info: version.into(),
        resource_names: names.iter().map(|s| s.to_string()).collect(),
        type_url: SECRET_TYPE_URL.into(),
        response_nonce: nonce.into(),
        ..Default::default()
    }
}

struct Stream {
    tx: mpsc::Sender<DiscoveryRequest>,
    rx: Streaming<DiscoveryResponse>,
}

async fn open(
    client: &mut Client,
    token: Option<&str>,
    first: DiscoveryRequest,
) -> Result<Stream, tonic::Status> {
    let (tx, rx) = mpsc::channel(8);
    tx.send(first).await.unwrap();
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    if let Some(t) = token {
        request.metadata_mut().insert(
            "authorization",
            MetadataValue::try_from(format!("Bearer {t}")).unwrap(),
        );
    }
    let rx = client.stream_secrets(request).await?.into_inner();
    Ok(Stream { tx, rx })
}

impl Stream {
    /// The next response, `Ok(None)` if none arrives within `within`.
    async fn next(&mut self, within: Duration) -> Result<Option<DiscoveryResponse>, tonic::Status> {
        match tokio::time::timeout(within, self.rx.message()).await {
            Ok(r) => r,
            Err(_) => Ok(None),
        }
    }
    async fn expect(&mut self) -> DiscoveryResponse {
        self.next(Duration::from_secs(10))
            .await
            .unwrap()
            .expect("a response")
    }
    async fn ack(&self, r: &DiscoveryResponse, names: &[&str]) {
        self.tx
            .send(req(names, &r.version_info, &r.nonce))
            .await
            .unwrap();
    }
}

fn secrets(r: &DiscoveryResponse) -> Vec<Secret> {
    r.resources
        .iter()
        .map(|a| {
            assert_eq!(a.type_url, SECRET_TYPE_URL);
            Secret::decode(a.value.as_slice()).unwrap()
        })
        .collect()
}

fn bytes(ds: Option<trellis_proto::DataSource>) -> Vec<u8> {
    match ds.and_then(|d| d.specifier) {
        Some(data_source::Specifier::InlineBytes(b)) => b,
        other => panic!("not inline bytes: {other:?}"),
    }
}

fn svid_of(r: &DiscoveryResponse) -> Svid {
    for s in secrets(r) {
        if let Some(secret::Type::TlsCertificate(tc)) = s.r#type {
            return Svid::from_pem(&bytes(tc.certificate_chain), &bytes(tc.private_key)).unwrap();
        }
    }
    panic!("no tls_certificate in response")
}

#[tokio::test]
async fn join_token_gets_default_and_rootca_that_verify() {
    let f = start(Duration::from_secs(60)).await;
    let mut client = f.client(None).await;
    let token = f.token(WEB);
    let mut s = open(
        &mut client,
        Some(&token),
        req(&["default", "ROOTCA"], "", ""),
    )
    .await
    .unwrap();
    let r = s.expect().await;
    let names: Vec<String> = secrets(&r).into_iter().map(|s| s.name).collect();
    assert_eq!(names, ["default", "ROOTCA"]);
    let svid = svid_of(&r);
    let id = verify_svid_chain(svid.chain(), &f.bundle, SystemTime::now(), Usage::Either).unwrap();
    assert_eq!(id.as_str(), WEB);
    assert_eq!(
        f.metric("trellis_svids_issued_total{attestor=\"join_token\"}"),
        1.0
    );
    assert_eq!(f.metric("trellis_sds_streams"), 1.0);
}

#[tokio::test]
async fn ack_is_quiet_then_rotation_pushes_new_serial() {
    let f = start(Duration::from_secs(1)).await;
    let mut client = f.client(None).await;
    let token = f.token(WEB);
    let mut s = open(&mut client, Some(&token), req(&["default"], "", ""))
        .await
        .unwrap();
    let first = s.expect().await;
    s.ack(&first, &["default"]).await;
    let second = s.expect().await;
    assert_ne!(first.version_info, second.version_info);
    assert_ne!(first.nonce, second.nonce);
    assert_ne!(svid_of(&first).serial_hex(), svid_of(&second).serial_hex());
    assert!(f.metric("trellis_sds_pushes_total{reason=\"rotation\"}") >= 1.0);
}

/// The stream has no task of its own: when the client goes away, tonic drops the stream and
/// everything it held (the gauge shows it), on both ways of leaving.
#[tokio::test]
async fn stream_state_is_dropped_when_the_client_goes_away() {
    let f = start(Duration::from_secs(60)).await;
    let token = f.token(WEB);
    let wait_for_streams = |n: f64| {
        let f = &f;
        async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while f.metric("trellis_sds_streams") != n {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "trellis_sds_streams never reached {n}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    // The client ends its request stream: the server ends the response stream.
    let mut client = f.client(None).await;
    let mut s = open(&mut client, Some(&token), req(&["default"], "", ""))
        .await
        .unwrap();
    s.expect().await;
    wait_for_streams(1.0).await;
    drop(s.tx);
    let end = tokio::time::timeout(Duration::from_secs(10), s.rx.message())
        .await
        .expect("the server ends the stream");
    assert!(
        end.unwrap().is_none(),
        "no response after the client closed"
    );
    wait_for_streams(0.0).await;
    // The client drops the whole connection mid-stream.
    let mut client = f.client(None).await;
    let mut s = open(&mut client, Some(&f.token(WEB)), req(&["default"], "", ""))
        .await
        .unwrap();
    s.expect().await;
    wait_for_streams(1.0).await;
    drop((s, client));
    wait_for_streams(0.0).await;
}

#[tokio::test]
async fn nack_is_counted_and_not_resent() {
    let f = start(Duration::from_secs(60)).await;
    let mut client = f.client(None).await;
    let token = f.token(WEB);
    let mut s = open(&mut client, Some(&token), req(&["default"], "", ""))
        .await
        .unwrap();
    let first = s.expect().await;
    let mut nack = req(&["default"], "", &first.nonce);
    nack.error_detail = Some(RpcStatus {
        code: 3,
        message: "test rejects it".into(),
        details: vec![],
    });
    s.tx.send(nack).await.unwrap();
    assert!(
        s.next(Duration::from_millis(500)).await.unwrap().is_none(),
        "a NACK must not trigger a resend of the same content"
    );
    assert_eq!(f.metric("trellis_sds_nacks_total"), 1.0);
}

#[tokio::test]
async fn names_change_is_answered_and_stale_nonce_ignored() {
    let f = start(Duration::from_secs(60)).await;
    let mut client = f.client(None).await;
    let token = f.token(WEB);
    let mut s = open(&mut client, Some(&token), req(&["default"], "", ""))
        .await
        .unwrap();
    let first = s.expect().await;
    s.tx.send(req(
        &["default", "ROOTCA"],
        &first.version_info,
        "stale-nonce",
    ))
    .await
    .unwrap();
    assert!(
        s.next(Duration::from_millis(500)).await.unwrap().is_none(),
        "a stale nonce must be ignored"
    );
    s.ack(&first, &["default", "spiffe://example.org"]).await;
    let second = s.expect().await;
    let names: Vec<String> = secrets(&second).into_iter().map(|s| s.name).collect();
    assert_eq!(names, ["default", "spiffe://example.org"]);
}

#[tokio::test]
async fn bad_or_missing_token_is_unauthenticated() {
    let f = start(Duration::from_secs(60)).await;
    let mut client = f.client(None).await;
    let err = open(
        &mut client,
        Some("trellis-join.bogus"),
        req(&["default"], "", ""),
    )
    .await
    .err()
    .unwrap();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    let err = open(&mut client, None, req(&["default"], "", ""))
        .await
        .err()
        .unwrap();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert!(f.metric("trellis_attestation_failures_total{reason=\"join_token_unknown\"}") >= 1.0);
}

#[tokio::test]
async fn another_workloads_identity_is_permission_denied_and_server_keeps_serving() {
    let f = start(Duration::from_secs(60)).await;
    let mut client = f.client(None).await;
    let token = f.token(WEB);
    let mut bad = open(
        &mut client,
        Some(&token),
        req(&["spiffe://example.org/app/db"], "", ""),
    )
    .await
    .unwrap();
    let err = bad.next(Duration::from_secs(5)).await.err().unwrap();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    // The same client (same address, inside the redemption window) is still served.
    let mut good = open(&mut client, Some(&token), req(&[WEB], "", ""))
        .await
        .unwrap();
    let r = good.expect().await;
    assert_eq!(secrets(&r)[0].name, WEB);
}

#[tokio::test]
async fn svid_reattests_without_token() {
    let f = start(Duration::from_secs(60)).await;
    let mut client = f.client(None).await;
    let token = f.token(WEB);
    let mut s = open(&mut client, Some(&token), req(&["default"], "", ""))
        .await
        .unwrap();
    let svid = svid_of(&s.expect().await);
    let mut mtls = f.client(Some(&svid)).await;
    let mut again = open(&mut mtls, None, req(&["default"], "", ""))
        .await
        .unwrap();
    let r = again.expect().await;
    assert_eq!(svid_of(&r).spiffe_id().as_str(), WEB);
    assert_eq!(
        f.metric("trellis_svids_issued_total{attestor=\"svid\"}"),
        1.0
    );
}

#[tokio::test]
async fn fetch_secrets_works_and_delta_is_unimplemented() {
    let f = start(Duration::from_secs(60)).await;
    let mut client = f.client(None).await;
    let token = f.token(WEB);
    let mut request = tonic::Request::new(req(&["ROOTCA", "default"], "", ""));
    request.metadata_mut().insert(
        "authorization",
        MetadataValue::try_from(format!("Bearer {token}")).unwrap(),
    );
    let r = client.fetch_secrets(request).await.unwrap().into_inner();
    assert_eq!(secrets(&r).len(), 2);
    let (_tx, rx) = mpsc::channel(1);
    let err = client
        .delta_secrets(ReceiverStream::new(rx))
        .await
        .err()
        .unwrap();
    assert_eq!(err.code(), Code::Unimplemented);
}

#[tokio::test]
async fn wrong_type_url_is_invalid_argument() {
    let f = start(Duration::from_secs(60)).await;
    let mut client = f.client(None).await;
    let token = f.token(WEB);
    let mut r = req(&["default"], "", "");
    r.type_url = "type.googleapis.com/envoy.config.listener.v3.Listener".into();
    let mut s = open(&mut client, Some(&token), r).await.unwrap();
    let err = s.next(Duration::from_secs(5)).await.err().unwrap();
    assert_eq!(err.code(), Code::InvalidArgument);
}

fn csr_request(names: &[&str], version: &str, nonce: &str, csr_pem: &str) -> DiscoveryRequest {
    let mut r = req(names, version, nonce);
    let mut fields = std::collections::BTreeMap::new();
    fields.insert(
        "trellis.io/csr".to_owned(),
        prost_types::Value {
            kind: Some(prost_types::value::Kind::StringValue(csr_pem.to_owned())),
        },
    );
    r.node = Some(trellis_proto::Node {
        id: "csr-test".into(),
        metadata: Some(prost_types::Struct { fields }),
        ..Default::default()
    });
    r
}

fn make_csr(uri: Option<&str>) -> (rcgen::KeyPair, String) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::default();
    if let Some(uri) = uri {
        params.subject_alt_names = vec![rcgen::SanType::URI(uri.try_into().unwrap())];
    }
    let csr = params.serialize_request(&key).unwrap().pem().unwrap();
    (key, csr)
}

fn chain_only(r: &DiscoveryResponse) -> Vec<u8> {
    for s in secrets(r) {
        if let Some(secret::Type::TlsCertificate(tc)) = s.r#type {
            assert!(
                tc.private_key.is_none(),
                "CSR mode: the key must not travel"
            );
            return bytes(tc.certificate_chain);
        }
    }
    panic!("no tls_certificate in response")
}

#[tokio::test]
async fn csr_mode_signs_the_callers_key_and_sends_no_key() {
    let f = start(Duration::from_secs(60)).await;
    let mut client = f.client(None).await;
    let token = f.token(WEB);
    let (key, csr) = make_csr(Some(WEB));
    let mut s = open(
        &mut client,
        Some(&token),
        csr_request(&["default", "ROOTCA"], "", "", &csr),
    )
    .await
    .unwrap();
    let first = s.expect().await;
    let chain = chain_only(&first);
    let key_pem = key.serialize_pem();
    let svid = Svid::from_pem(&chain, key_pem.as_bytes()).expect("certificate is for our key");
    assert_eq!(svid.spiffe_id().as_str(), WEB);
    verify_svid_chain(svid.chain(), &f.bundle, SystemTime::now(), Usage::Either).unwrap();

    // The client rotates its key: a fresh CSR on the same stream gets a certificate for it.
    let (key2, csr2) = make_csr(None);
    s.tx.send(csr_request(
        &["default", "ROOTCA"],
        &first.version_info,
        &first.nonce,
        &csr2,
    ))
    .await
    .unwrap();
    let second = s.expect().await;
    let svid2 = Svid::from_pem(&chain_only(&second), key2.serialize_pem().as_bytes())
        .expect("new certificate is for the new key");
    assert_ne!(svid.serial_hex(), svid2.serial_hex());
    // Repeating the same CSR in an ACK is quiet.
    s.tx.send(csr_request(
        &["default", "ROOTCA"],
        &second.version_info,
        &second.nonce,
        &csr2,
    ))
    .await
    .unwrap();
    assert!(s.next(Duration::from_millis(500)).await.unwrap().is_none());
}

#[tokio::test]
async fn csr_for_another_identity_is_invalid_argument() {
    let f = start(Duration::from_secs(60)).await;
    let mut client = f.client(None).await;
    let token = f.token(WEB);
    let (_key, csr) = make_csr(Some("spiffe://example.org/app/db"));
    let mut s = open(
        &mut client,
        Some(&token),
        csr_request(&["default"], "", "", &csr),
    )
    .await
    .unwrap();
    let err = s.next(Duration::from_secs(5)).await.err().unwrap();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let mut s = open(
        &mut client,
        Some(&token),
        csr_request(
            &["default"],
            "",
            "",
            "-----BEGIN CERTIFICATE REQUEST-----\ngarbage\n",
        ),
    )
    .await
    .unwrap();
    let err = s.next(Duration::from_secs(5)).await.err().unwrap();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
}

/// The JWT-SVID service next to SDS: a token only for a caller presenting its SVID, for its
/// own SPIFFE ID, with a good audience; refusals counted by reason.
#[tokio::test]
async fn jwt_svid_needs_client_svid_and_audience() {
    use trellis_proto::trellis::jwt::v1::jwt_svid_service_client::JwtSvidServiceClient;
    use trellis_proto::trellis::jwt::v1::{MintJwtSvidRequest, WatchJwtBundleRequest};
    let f = start(Duration::from_secs(60)).await;
    let mint = |aud: &[&str]| MintJwtSvidRequest {
        audiences: aud.iter().map(|s| s.to_string()).collect(),
    };
    // No client certificate: no token (a bearer credential is not enough either).
    let mut anonymous = JwtSvidServiceClient::new(f.channel(None).await);
    let err = anonymous.mint_jwt_svid(mint(&["db"])).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    let err = anonymous
        .watch_jwt_bundle(WatchJwtBundleRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");

    // An SVID from SDS, then presented as client certificate.
    let mut client = f.client(None).await;
    let token = f.token(WEB);
    let mut s = open(&mut client, Some(&token), req(&["default"], "", ""))
        .await
        .unwrap();
    let svid = svid_of(&s.expect().await);
    let mut jwt = JwtSvidServiceClient::new(f.channel(Some(&svid)).await);
    for bad in [&[][..], &[""], &["two words"]] {
        let err = jwt.mint_jwt_svid(mint(bad)).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{bad:?}: {err:?}");
    }
    let minted = jwt
        .mint_jwt_svid(mint(&["db", "cache"]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(minted.spiffe_id, WEB);
    assert_eq!(
        minted.expires_at - minted.issued_at,
        300,
        "default jwt_svid_ttl"
    );
    let update = jwt
        .watch_jwt_bundle(WatchJwtBundleRequest {})
        .await
        .unwrap()
        .into_inner()
        .message()
        .await
        .unwrap()
        .unwrap();
    assert_eq!(update.trust_domain, "example.org");
    let bundle = trellis_identity::jwt::JwtBundle::parse(td(), &update.jwks).unwrap();
    let valid = trellis_identity::jwt::validate(
        &minted.token,
        &bundle,
        Some("cache"),
        SystemTime::now(),
        trellis_identity::jwt::DEFAULT_SKEW,
    )
    .unwrap();
    assert_eq!(valid.spiffe_id.as_str(), WEB);
    assert_eq!(f.metric("trellis_jwt_svids_issued_total"), 1.0);
    assert_eq!(
        f.metric("trellis_jwt_svids_refused_total{reason=\"no_svid\"}"),
        2.0
    );
    assert_eq!(
        f.metric("trellis_jwt_svids_refused_total{reason=\"bad_audience\"}"),
        3.0
    );
    assert_eq!(f.metric("trellis_jwt_keys"), 1.0);
}

/// An ACK of `r` that reports holding the SVID with `serial` (as a Trellis sidecar does).
fn holding(names: &[&str], r: &DiscoveryResponse, serial: &str) -> DiscoveryRequest {
    let mut fields = std::collections::BTreeMap::new();
    fields.insert(
        trellis_transparency::HELD_SERIAL_METADATA_KEY.to_owned(),
        prost_types::Value {
            kind: Some(prost_types::value::Kind::StringValue(serial.to_owned())),
        },
    );
    DiscoveryRequest {
        node: Some(trellis_proto::Node {
            metadata: Some(prost_types::Struct { fields }),
            ..Default::default()
        }),
        ..req(names, &r.version_info, &r.nonce)
    }
}

/// The `trellis-log-head` resource of a response.
fn log_head_of(r: &DiscoveryResponse) -> trellis_transparency::HeadForWitness {
    for s in secrets(r) {
        if let Some(secret::Type::GenericSecret(g)) = s.r#type {
            return serde_json::from_slice(&bytes(g.secret)).unwrap();
        }
    }
    panic!("no trellis-log-head in response")
}

/// A client that reports the serial it holds gets the same state again once a signed head
/// covers that SVID's log entry, now with the entry and its inclusion proof; after that its
/// ACKs are quiet again (one extra response per SVID, not one per head).
#[tokio::test]
async fn the_held_svids_inclusion_proof_is_pushed_once_a_head_covers_it() {
    // No rotation during the test: the second response can only be the proof's.
    let f = start(Duration::from_secs(1800)).await;
    let mut client = f.client(None).await;
    let token = f.token(WEB);
    let names = ["default", "ROOTCA", "trellis-log-head"];
    let mut s = open(&mut client, Some(&token), req(&names, "", ""))
        .await
        .unwrap();
    let first = s.expect().await;
    let svid = svid_of(&first);
    s.tx.send(holding(&names, &first, svid.serial_hex()))
        .await
        .unwrap();
    let second = s.expect().await;
    assert_eq!(
        svid_of(&second).chain(),
        svid.chain(),
        "the same SVID again"
    );
    let msg = log_head_of(&second);
    trellis_transparency::LogPublicKey::from_pem(&msg.public_key)
        .unwrap()
        .verify(&msg.head)
        .unwrap();
    let proof = msg.own_svid.expect("the held SVID's proof");
    assert_eq!(proof.serial, svid.serial_hex());
    let held = trellis_transparency::HeldSvid {
        serial_hex: svid.serial_hex().to_owned(),
        spiffe_id: WEB.to_owned(),
        public_key_sha256: trellis_identity::spki_sha256(&svid.chain()[0]).unwrap(),
    };
    trellis_transparency::check_own_svid(&msg.head.head, &proof, &held).unwrap();
    assert_eq!(
        f.metric("trellis_sds_pushes_total{reason=\"log_proof\"}"),
        1.0
    );
    s.tx.send(holding(&names, &second, svid.serial_hex()))
        .await
        .unwrap();
    assert!(
        s.next(Duration::from_secs(3)).await.unwrap().is_none(),
        "proven: nothing more to send"
    );
    // A serial that is not hex is ignored, not an error.
    s.tx.send(holding(&names, &second, "not-a-serial"))
        .await
        .unwrap();
    assert!(s.next(Duration::from_secs(2)).await.unwrap().is_none());
    // Later responses carry the head without the proof: it goes once per SVID and stream
    // (each would cost two registry reads), and the client checks each head's consistency.
    let fewer = ["default", "trellis-log-head"];
    s.tx.send(holding(&fewer, &second, svid.serial_hex()))
        .await
        .unwrap();
    let third = s
        .next(Duration::from_secs(3))
        .await
        .unwrap()
        .expect("a response to the changed subscription");
    assert!(log_head_of(&third).own_svid.is_none());
}
