//! In-memory rustls handshakes between Trellis' client and server configs: every way a peer can
//! be wrong, and the reason label the failure carries.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, Connection, ServerConfig, ServerConnection};
use trellis_identity::testca::{AlwaysPresents, LeafSpec, TestCa};
use trellis_identity::tls::{
    client_config, handshake_failure_reason, peer_spiffe_id, server_config, svid_error_of,
    PeerMatch, SharedBundle, SpiffeClientVerifier, SpiffeServerVerifier, SvidResolver, TlsPolicy,
};
use trellis_identity::{SpiffeId, Svid, SvidError};

const ALPN: &[&[u8]] = &[b"h2", b"http/1.1"];

/// What a handshake left behind on each side.
struct Outcome {
    client: ClientConnection,
    server: ServerConnection,
    client_err: Option<rustls::Error>,
    server_err: Option<rustls::Error>,
}

impl Outcome {
    fn ok(&self) -> bool {
        self.client_err.is_none()
            && self.server_err.is_none()
            && !self.client.is_handshaking()
            && !self.server.is_handshaking()
    }
}

/// Runs a handshake over in-memory buffers until neither side has anything to say.
fn handshake(client: Arc<ClientConfig>, server: Arc<ServerConfig>) -> Outcome {
    // SPIFFE verifiers ignore the DNS name; any syntactically valid one will do.
    let name = ServerName::try_from("web.example.org").unwrap();
    let mut client = Connection::Client(ClientConnection::new(client, name).unwrap());
    let mut server = Connection::Server(ServerConnection::new(server).unwrap());
    let (mut client_err, mut server_err) = (None, None);
    for _ in 0..32 {
        let c2s = transfer(&mut client, &mut server, &mut server_err);
        let s2c = transfer(&mut server, &mut client, &mut client_err);
        if !c2s && !s2c {
            break;
        }
    }
    let (Connection::Client(client), Connection::Server(server)) = (client, server) else {
        unreachable!()
    };
    Outcome {
        client,
        server,
        client_err,
        server_err,
    }
}

/// Moves everything `from` wants to send into `to`. Returns whether any bytes moved.
fn transfer(
    from: &mut Connection,
    to: &mut Connection,
    to_err: &mut Option<rustls::Error>,
) -> bool {
    let mut buf = Vec::new();
    while from.wants_write() {
        from.write_tls(&mut buf).unwrap();
    }
    if buf.is_empty() {
        return false;
    }
    if to_err.is_some() {
        return true; // the receiver already failed; it reads nothing more
    }
    let mut rest = &buf[..];
    while !rest.is_empty() {
        match to.read_tls(&mut rest) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        if let Err(e) = to.process_new_packets() {
            *to_err = Some(e);
            break;
        }
    }
    true
}

struct Mesh {
    ca: TestCa,
    bundle: SharedBundle,
}

impl Mesh {
    fn new() -> Self {
        let ca = TestCa::root("example.org");
        let bundle = ca.shared_bundle();
        Mesh { ca, bundle }
    }

    fn resolver(svid: &Svid) -> Arc<SvidResolver> {
        let resolver = SvidResolver::empty();
        resolver.install(svid).unwrap();
        resolver
    }

    fn server(&self, svid: &Svid, optional_client: bool, policy: TlsPolicy) -> Arc<ServerConfig> {
        Arc::new(
            server_config(
                Self::resolver(svid),
                SpiffeClientVerifier::new(self.bundle.clone(), optional_client),
                policy,
                ALPN,
            )
            .unwrap(),
        )
    }

    fn client(&self, svid: Option<&Svid>, expected: PeerMatch) -> Arc<ClientConfig> {
        Arc::new(
            client_config(
                svid.map(Self::resolver),
                SpiffeServerVerifier::new(self.bundle.clone(), expected),
                TlsPolicy::Tls13,
                ALPN,
            )
            .unwrap(),
        )
    }
}

fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).unwrap()
}

#[test]
fn mutual_tls_succeeds_and_both_sides_see_the_peer_id() {
    let mesh = Mesh::new();
    let server_svid = mesh.ca.svid("/ns/prod/sa/api");
    let client_svid = mesh.ca.svid("/ns/prod/sa/web");
    let out = handshake(
        mesh.client(
            Some(&client_svid),
            PeerMatch::Exact(id("spiffe://example.org/ns/prod/sa/api")),
        ),
        mesh.server(&server_svid, false, TlsPolicy::Tls13),
    );
    assert!(
        out.ok(),
        "client: {:?}, server: {:?}",
        out.client_err,
        out.server_err
    );
    assert_eq!(
        peer_spiffe_id(out.server.peer_certificates()),
        Some(id("spiffe://example.org/ns/prod/sa/web"))
    );
    assert_eq!(
        peer_spiffe_id(out.client.peer_certificates()),
        Some(id("spiffe://example.org/ns/prod/sa/api"))
    );
    assert_eq!(out.server.alpn_protocol(), Some(&b"h2"[..]));
    assert_eq!(
        out.client.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
}

#[test]
fn mutual_tls_through_an_intermediate_ca() {
    let mesh = Mesh::new();
    let issuing = mesh.ca.intermediate();
    let out = handshake(
        mesh.client(Some(&issuing.svid("/web")), PeerMatch::AnyInTrustDomain),
        mesh.server(&issuing.svid("/api"), false, TlsPolicy::Tls13),
    );
    assert!(
        out.ok(),
        "client: {:?}, server: {:?}",
        out.client_err,
        out.server_err
    );
    assert_eq!(
        peer_spiffe_id(out.server.peer_certificates()),
        Some(id("spiffe://example.org/web"))
    );
}

#[test]
fn rejects_server_with_wrong_identity() {
    let mesh = Mesh::new();
    let out = handshake(
        mesh.client(
            Some(&mesh.ca.svid("/web")),
            PeerMatch::Exact(id("spiffe://example.org/ns/prod/sa/db")),
        ),
        mesh.server(&mesh.ca.svid("/ns/prod/sa/api"), false, TlsPolicy::Tls13),
    );
    let err = out.client_err.expect("client must refuse the server");
    assert_eq!(handshake_failure_reason(&err), "wrong_identity");
    let Some(SvidError::WrongIdentity {
        expected,
        presented,
    }) = svid_error_of(&err)
    else {
        panic!("expected WrongIdentity, got {err:?}");
    };
    assert_eq!(expected, "spiffe://example.org/ns/prod/sa/db");
    assert_eq!(presented, "spiffe://example.org/ns/prod/sa/api");
    assert!(out.server_err.is_some(), "the server hears the alert");
}

#[test]
fn rejects_client_without_certificate_when_mandatory() {
    let mesh = Mesh::new();
    let out = handshake(
        mesh.client(None, PeerMatch::AnyInTrustDomain),
        mesh.server(&mesh.ca.svid("/api"), false, TlsPolicy::Tls13),
    );
    let err = out.server_err.expect("server must refuse the client");
    assert_eq!(handshake_failure_reason(&err), "no_cert");
    let client_err = out.client_err.expect("client hears certificate_required");
    assert_eq!(handshake_failure_reason(&client_err), "no_cert");
}

#[test]
fn accepts_client_without_certificate_when_optional() {
    let mesh = Mesh::new();
    let out = handshake(
        mesh.client(None, PeerMatch::AnyInTrustDomain),
        mesh.server(&mesh.ca.svid("/api"), true, TlsPolicy::Tls13),
    );
    assert!(
        out.ok(),
        "client: {:?}, server: {:?}",
        out.client_err,
        out.server_err
    );
    assert_eq!(peer_spiffe_id(out.server.peer_certificates()), None);
}

#[test]
fn optional_client_auth_still_verifies_a_presented_certificate() {
    let mesh = Mesh::new();
    let stranger = TestCa::root("example.org").svid("/web");
    let out = handshake(
        mesh.client(Some(&stranger), PeerMatch::AnyInTrustDomain),
        mesh.server(&mesh.ca.svid("/api"), true, TlsPolicy::Tls13),
    );
    let err = out.server_err.expect("server must refuse the client");
    assert_eq!(handshake_failure_reason(&err), "unknown_ca");
}

#[test]
fn rejects_client_cert_from_other_ca() {
    let mesh = Mesh::new();
    let stranger = TestCa::root("example.org").svid("/web");
    let out = handshake(
        mesh.client(Some(&stranger), PeerMatch::AnyInTrustDomain),
        mesh.server(&mesh.ca.svid("/api"), false, TlsPolicy::Tls13),
    );
    let err = out.server_err.expect("server must refuse the client");
    assert_eq!(handshake_failure_reason(&err), "unknown_ca");
    assert!(matches!(
        svid_error_of(&err),
        Some(SvidError::UnknownIssuer { .. })
    ));
    assert!(out.client_err.is_some(), "the client hears the alert");
}

#[test]
fn rejects_server_cert_from_other_ca() {
    let mesh = Mesh::new();
    let stranger = TestCa::root("example.org").svid("/api");
    let out = handshake(
        mesh.client(Some(&mesh.ca.svid("/web")), PeerMatch::AnyInTrustDomain),
        mesh.server(&stranger, false, TlsPolicy::Tls13),
    );
    let err = out.client_err.expect("client must refuse the server");
    assert_eq!(handshake_failure_reason(&err), "unknown_ca");
}

#[test]
fn rejects_expired_client_cert() {
    let mesh = Mesh::new();
    let mut spec = LeafSpec::new("spiffe://example.org/web");
    spec.not_before = SystemTime::now() - Duration::from_secs(7200);
    spec.not_after = SystemTime::now() - Duration::from_secs(60);
    let (chain, key) = mesh.ca.issue(&spec);
    let expired = Svid::new(chain, key).unwrap();
    // Trellis's resolver never presents an expired SVID; a hostile client does.
    let hostile = ClientConfig::builder_with_provider(trellis_identity::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(SpiffeServerVerifier::new(
            mesh.bundle.clone(),
            PeerMatch::AnyInTrustDomain,
        ))
        .with_client_cert_resolver(AlwaysPresents::new(&expired));
    let out = handshake(
        Arc::new(hostile),
        mesh.server(&mesh.ca.svid("/api"), false, TlsPolicy::Tls13),
    );
    let err = out.server_err.expect("server must refuse the client");
    assert_eq!(handshake_failure_reason(&err), "expired");
}

#[test]
fn rejects_client_from_other_trust_domain() {
    // The bundle's CA signed an ID outside its trust domain: still refused.
    let mesh = Mesh::new();
    let (chain, key) = mesh.ca.issue(&LeafSpec::new("spiffe://other.org/web"));
    let foreign = Svid::new(chain, key).unwrap();
    let out = handshake(
        mesh.client(Some(&foreign), PeerMatch::AnyInTrustDomain),
        mesh.server(&mesh.ca.svid("/api"), false, TlsPolicy::Tls13),
    );
    let err = out.server_err.expect("server must refuse the client");
    assert_eq!(handshake_failure_reason(&err), "not_svid");
}

#[test]
fn rejects_server_leaf_without_server_auth() {
    let mesh = Mesh::new();
    let mut spec = LeafSpec::new("spiffe://example.org/api");
    spec.server_auth = false;
    let (chain, key) = mesh.ca.issue(&spec);
    let client_only = Svid::new(chain, key).unwrap();
    let out = handshake(
        mesh.client(Some(&mesh.ca.svid("/web")), PeerMatch::AnyInTrustDomain),
        mesh.server(&client_only, false, TlsPolicy::Tls13),
    );
    let err = out.client_err.expect("client must refuse the server");
    assert!(matches!(
        svid_error_of(&err),
        Some(SvidError::MissingKeyUsage {
            required: "serverAuth"
        })
    ));
}

#[test]
fn rejects_tls12_only_client_on_tls13_server() {
    let mesh = Mesh::new();
    let tls12_only = ClientConfig::builder_with_provider(trellis_identity::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(SpiffeServerVerifier::new(
            mesh.bundle.clone(),
            PeerMatch::AnyInTrustDomain,
        ))
        .with_no_client_auth();
    let out = handshake(
        Arc::new(tls12_only),
        mesh.server(&mesh.ca.svid("/api"), true, TlsPolicy::Tls13),
    );
    let err = out.server_err.expect("server must refuse TLS 1.2");
    assert_eq!(handshake_failure_reason(&err), "protocol_version");
    let client_err = out.client_err.expect("client hears protocol_version");
    assert_eq!(handshake_failure_reason(&client_err), "protocol_version");
}

#[test]
fn tls12_plus_server_accepts_tls12_client_with_ecdsa_suite() {
    let mesh = Mesh::new();
    let tls12_only = ClientConfig::builder_with_provider(trellis_identity::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(SpiffeServerVerifier::new(
            mesh.bundle.clone(),
            PeerMatch::Exact(id("spiffe://example.org/api")),
        ))
        .with_client_cert_resolver(Mesh::resolver(&mesh.ca.svid("/web")));
    let out = handshake(
        Arc::new(tls12_only),
        mesh.server(&mesh.ca.svid("/api"), false, TlsPolicy::Tls12Plus),
    );
    assert!(
        out.ok(),
        "client: {:?}, server: {:?}",
        out.client_err,
        out.server_err
    );
    assert_eq!(
        out.server.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_2)
    );
    assert_eq!(
        out.server.negotiated_cipher_suite().map(|s| s.suite()),
        Some(rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384)
    );
    assert_eq!(
        peer_spiffe_id(out.server.peer_certificates()),
        Some(id("spiffe://example.org/web"))
    );
}

#[test]
fn server_without_svid_fails_the_handshake() {
    let mesh = Mesh::new();
    let server = server_config(
        SvidResolver::empty(),
        SpiffeClientVerifier::new(mesh.bundle.clone(), true),
        TlsPolicy::Tls13,
        ALPN,
    )
    .unwrap();
    let out = handshake(
        mesh.client(None, PeerMatch::AnyInTrustDomain),
        Arc::new(server),
    );
    assert!(out.server_err.is_some());
    assert!(out.client_err.is_some());
}

#[test]
fn new_handshakes_use_the_rotated_svid() {
    let mesh = Mesh::new();
    let resolver = SvidResolver::empty();
    let old = mesh.ca.svid("/api");
    resolver.install(&old).unwrap();
    let server = Arc::new(
        server_config(
            resolver.clone(),
            SpiffeClientVerifier::new(mesh.bundle.clone(), true),
            TlsPolicy::Tls13,
            ALPN,
        )
        .unwrap(),
    );
    let client = mesh.client(None, PeerMatch::AnyInTrustDomain);

    let first = handshake(client.clone(), server.clone());
    assert!(first.ok());
    assert_eq!(first.client.peer_certificates().unwrap()[0], old.chain()[0]);

    let new = mesh.ca.svid("/api");
    resolver.install(&new).unwrap();
    let second = handshake(client, server);
    assert!(second.ok());
    assert_eq!(
        second.client.peer_certificates().unwrap()[0],
        new.chain()[0]
    );
    // The first connection keeps what it negotiated.
    assert_eq!(first.client.peer_certificates().unwrap()[0], old.chain()[0]);
}

#[test]
fn bundle_swap_takes_effect_on_the_next_handshake() {
    let mesh = Mesh::new();
    let server = mesh.server(&mesh.ca.svid("/api"), false, TlsPolicy::Tls13);
    let client = mesh.client(Some(&mesh.ca.svid("/web")), PeerMatch::AnyInTrustDomain);
    assert!(handshake(client.clone(), server.clone()).ok());

    // The CA is rotated out: the same client and server configs now refuse each other.
    mesh.bundle
        .store(Arc::new(TestCa::root("example.org").bundle()));
    let out = handshake(client, server);
    assert_eq!(
        handshake_failure_reason(&out.client_err.expect("client must refuse")),
        "unknown_ca"
    );
}
