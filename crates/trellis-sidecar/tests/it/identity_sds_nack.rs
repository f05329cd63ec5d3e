//! The SDS client against the scripted fake SDS server of the test-support crate
//! (`trellis_tests::sds_server`: real TLS, real gRPC): every hostile
//! update is NACKed with an `error_detail` naming the problem, counted, and the previous SVID
//! stays installed. Also: what the client sends (node, CSR, credential) on each stream.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tonic::Status;
use trellis_identity::testca::{LeafSpec, TestCa};
use trellis_identity::{certs_to_pem, key_to_pem, CertificateDer, SpiffeId, Svid, TrustBundle};
use trellis_proto::{DiscoveryRequest, DiscoveryResponse, SECRET_TYPE_URL};
use trellis_sidecar::config::{Credential, SdsSettings};
use trellis_sidecar::metrics::SidecarMetrics;
use trellis_sidecar::sds::SdsClient;
use trellis_sidecar::SvidStore;
use trellis_tests::metrics::Metrics;
use trellis_tests::poll_until as eventually;
use trellis_tests::sds_server::{
    self, any_of, bundle_secret, tls_secret, ScriptedStream, SdsServer,
};

const WEB: &str = "spiffe://example.org/web";
/// How long the fake server waits for the client's next stream or request.
const WAIT: Duration = Duration::from_secs(10);

/// `series` (`name` or `name{labels}`) in the sidecar's exposition; panics naming it if absent.
#[track_caller]
fn metric(m: &SidecarMetrics, series: &str) -> f64 {
    Metrics::parse(&m.encode()).unwrap().series(series)
}

// ---- responses ----------------------------------------------------------------------------

/// `default` (chain PEM, optional key PEM) and `ROOTCA` in one response, nonce `nonce-<version>`.
fn response(
    version: &str,
    chain_pem: &str,
    key_pem: Option<&str>,
    bundle_pem: &str,
) -> DiscoveryResponse {
    sds_server::response(
        version,
        vec![
            any_of(&tls_secret(chain_pem, key_pem)),
            any_of(&bundle_secret(bundle_pem)),
        ],
    )
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
    fake: &SdsServer,
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
async fn with_first_svid(expected: Option<&str>) -> (TestCa, SdsServer, Client, ScriptedStream) {
    let ca = TestCa::root("example.org");
    let mut fake = SdsServer::start_with(&ca.bundle(), &ca.svid("/trellis/control"))
        .await
        .unwrap();
    let c = client(&fake, &ca.bundle(), join(), expected, false);
    let mut s = fake.next_stream(WAIT).await.unwrap();
    let first = s.request(WAIT).await.unwrap();
    assert_eq!(
        first.resource_names,
        ["default", "ROOTCA", "trellis-log-head"]
    );
    assert_eq!(first.type_url, SECRET_TYPE_URL);
    assert!(first.response_nonce.is_empty() && first.error_detail.is_none());
    s.push(svid_response("v1", &ca.svid("/web"), &ca.bundle()))
        .await
        .unwrap();
    let ack = s.request(WAIT).await.unwrap();
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
    s: &mut ScriptedStream,
    bad: DiscoveryResponse,
    reason: &str,
    says: &str,
) {
    let before = c.store.current().unwrap().serial_hex().to_owned();
    s.push(bad).await.unwrap();
    let nack = s.request(WAIT).await.unwrap();
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
    s.push(good).await.unwrap();
    let ack = s.request(WAIT).await.unwrap();
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
    let mut fake = SdsServer::start_with(&ca.bundle(), &ca.svid("/trellis/control"))
        .await
        .unwrap();
    let c = client(&fake, &ca.bundle(), join(), None, true);
    let mut s = fake.next_stream(WAIT).await.unwrap();
    s.request(WAIT).await.unwrap();
    s.push(svid_response("v1", &ca.svid("/web"), &ca.bundle()))
        .await
        .unwrap();
    let nack = s.request(WAIT).await.unwrap();
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
    sds_server::csr_of(req).expect("a CSR in node.metadata")
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
    let mut fake = SdsServer::start_with(ca.bundle(), &control).await.unwrap();
    let c = client(&fake, ca.bundle(), join(), Some(WEB), true);
    let sign = |csr: &str, ttl: u64| -> Vec<CertificateDer<'static>> {
        ca.sign_csr(csr, &web, Duration::from_secs(ttl), SystemTime::now())
            .unwrap()
    };

    let mut s = fake.next_stream(WAIT).await.unwrap();
    let first = s.request(WAIT).await.unwrap();
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
    s.push(response(
        "v1",
        &certs_to_pem(&chain),
        None,
        &ca.bundle().to_pem(),
    ))
    .await
    .unwrap();
    let ack = s.request(WAIT).await.unwrap();
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
    let rotate = s.request(WAIT).await.unwrap();
    assert!(rotate.error_detail.is_none());
    assert_eq!(
        (rotate.version_info.as_str(), rotate.response_nonce.as_str()),
        ("v1", "nonce-v1")
    );
    let csr2 = csr_of(&rotate);
    assert_ne!(csr2, csr1);
    let chain = sign(&csr2, 3600);
    s.push(response(
        "v2",
        &certs_to_pem(&chain),
        None,
        &ca.bundle().to_pem(),
    ))
    .await
    .unwrap();
    let ack = s.request(WAIT).await.unwrap();
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
    s.push(response(
        "v3",
        &certs_to_pem(&chain),
        None,
        &ca.bundle().to_pem(),
    ))
    .await
    .unwrap();
    let ack = s.request(WAIT).await.unwrap();
    assert!(ack.error_detail.is_none(), "{:?}", ack.error_detail);
    assert_eq!(c.store.current().unwrap().serial_hex(), serial);

    // A certificate for a key we never asked for is refused.
    let stranger = trellis_sidecar::csr::generate(Some(&web)).unwrap();
    let chain = sign(&stranger.csr_pem, 3600);
    s.push(response(
        "v4",
        &certs_to_pem(&chain),
        None,
        &ca.bundle().to_pem(),
    ))
    .await
    .unwrap();
    let nack = s.request(WAIT).await.unwrap();
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
    let mut fake = SdsServer::start_with(&ca.bundle(), &ca.svid("/trellis/control"))
        .await
        .unwrap();
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
    let mut s = fake.next_stream(WAIT).await.unwrap();
    assert_eq!(s.authorization.as_deref(), Some("Bearer first-token"));
    s.request(WAIT).await.unwrap();
    // Kubelet rotates the token; the stream fails before any SVID arrives.
    std::fs::write(&token, "second-token\n").unwrap();
    s.fail(Status::unavailable("restarting")).await.unwrap();
    let s = fake.next_stream(WAIT).await.unwrap();
    assert_eq!(s.authorization.as_deref(), Some("Bearer second-token"));
    assert!(s.peer.is_none(), "no SVID yet, so no client certificate");
    assert!(c.store.current().is_none());
}

#[tokio::test]
async fn token_file_is_tried_when_the_svid_is_refused() {
    let ca = TestCa::root("example.org");
    let mut fake = SdsServer::start_with(&ca.bundle(), &ca.svid("/trellis/control"))
        .await
        .unwrap();
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
    let mut s = fake.next_stream(WAIT).await.unwrap();
    s.request(WAIT).await.unwrap();
    s.push(svid_response("v1", &ca.svid("/web"), &ca.bundle()))
        .await
        .unwrap();
    s.request(WAIT).await.unwrap();
    assert!(c.store.current().is_some());
    s.fail(Status::unavailable("restarting")).await.unwrap();
    // With an SVID: no token. The control plane refuses it (say its bundle lost our CA).
    let s = fake.next_stream(WAIT).await.unwrap();
    assert_eq!((s.authorization.as_deref(), s.peer.is_some()), (None, true));
    s.fail(Status::unauthenticated("unknown CA")).await.unwrap();
    // Next attempt: the token file, without the SVID.
    let s = fake.next_stream(WAIT).await.unwrap();
    assert_eq!(
        (s.authorization.as_deref(), s.peer.is_some()),
        (Some("Bearer k8s-token"), false)
    );
    s.fail(Status::unavailable("again")).await.unwrap();
    // Then the SVID again.
    let s = fake.next_stream(WAIT).await.unwrap();
    assert_eq!(s.authorization, None);
}

#[tokio::test]
async fn reconnect_with_svid_sends_no_token_and_presents_the_svid() {
    let (ca, mut fake, c, s) = with_first_svid(None).await;
    assert!(s.authorization.is_some());
    assert!(s.peer.is_none());
    s.fail(Status::unavailable("restarting")).await.unwrap();
    // (sds_connected dips to 0 only for the backoff here, too briefly to poll for; the
    // control-plane restart test in identity_sds.rs shows it.)
    let mut again = fake.next_stream(WAIT).await.unwrap();
    assert_eq!(
        again.authorization, None,
        "the SVID re-attests: no token on the wire"
    );
    assert_eq!(again.peer.as_ref().map(|p| p.as_str()), Some(WEB));
    let first = again.request(WAIT).await.unwrap();
    assert_eq!(
        first.node.unwrap().id,
        WEB,
        "node.id is the SPIFFE ID once known"
    );
    again
        .push(svid_response("v1", &ca.svid("/web"), &ca.bundle()))
        .await
        .unwrap();
    assert!(again.request(WAIT).await.unwrap().error_detail.is_none());
    assert_eq!(metric(&c.metrics, "trellis_sds_connected"), 1.0);
}

#[tokio::test]
async fn unauthenticated_is_retried() {
    let ca = TestCa::root("example.org");
    let mut fake = SdsServer::start_with(&ca.bundle(), &ca.svid("/trellis/control"))
        .await
        .unwrap();
    let _c = client(&fake, &ca.bundle(), join(), None, false);
    let s = fake.next_stream(WAIT).await.unwrap();
    s.fail(Status::unauthenticated("join token already used"))
        .await
        .unwrap();
    // Backoff, then another attempt.
    let _again = fake.next_stream(WAIT).await.unwrap();
}

/// A control plane from before the transparency log answers NOT_FOUND for `trellis-log-head`:
/// the sidecar stops asking for it instead of never getting an SVID.
#[tokio::test]
async fn a_control_plane_without_the_log_head_is_not_asked_for_it_again() {
    let ca = TestCa::root("example.org");
    let mut fake = SdsServer::start(&ca).await.unwrap();
    let c = client(&fake, &ca.bundle(), join(), None, false);
    let mut s = fake.next_stream(WAIT).await.unwrap();
    let first = s.request(WAIT).await.unwrap();
    assert!(first.resource_names.iter().any(|n| n == "trellis-log-head"));
    s.fail(Status::not_found(
        "unknown secret `trellis-log-head`: Trellis serves `default` (your SVID), `ROOTCA`",
    ))
    .await
    .unwrap();
    let mut again = fake.next_stream(WAIT).await.unwrap();
    let retry = again.request(WAIT).await.unwrap();
    assert_eq!(retry.resource_names, ["default", "ROOTCA"]);
    again
        .push(svid_response("v1", &ca.svid("/web"), &ca.bundle()))
        .await
        .unwrap();
    assert!(again.request(WAIT).await.unwrap().error_detail.is_none());
    assert!(c.store.is_ready(SystemTime::now(), Duration::ZERO));
}

#[tokio::test]
async fn control_plane_with_wrong_identity_is_refused() {
    let ca = TestCa::root("example.org");
    // The server presents a valid SVID of the trust domain, but not the control plane's.
    let mut fake = SdsServer::start_with(&ca.bundle(), &ca.svid("/impostor"))
        .await
        .unwrap();
    let c = client(&fake, &ca.bundle(), join(), None, false);
    // Proof the client ran: it reached the server and walked away from the handshake, twice
    // (so it also keeps retrying), and never opened a stream.
    eventually(WAIT, "two refused handshakes", || {
        fake.handshakes_failed() >= 2
    })
    .await;
    assert!(
        fake.try_next_stream().is_none(),
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
