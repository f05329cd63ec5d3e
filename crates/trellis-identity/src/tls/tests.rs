//! Unit tests of the parent module.
use super::*;
use crate::testca::TestCa;

#[test]
fn svid_errors_survive_the_trip_through_rustls() {
    let err = to_rustls(SvidError::WrongIdentity {
        expected: "spiffe://example.org/a".to_owned(),
        presented: "spiffe://example.org/b".to_owned(),
    });
    assert!(matches!(
        svid_error_of(&err),
        Some(SvidError::WrongIdentity { .. })
    ));
    assert_eq!(handshake_failure_reason(&err), "wrong_identity");
    assert!(err.to_string().contains("spiffe://example.org/b"), "{err}");
}

#[test]
fn reasons_for_every_svid_error() {
    let cases = [
        (SvidError::EmptyChain, "no_cert"),
        (SvidError::Malformed("x".into()), "not_svid"),
        (SvidError::UriSanCount(2), "not_svid"),
        (SvidError::LeafIsCa, "not_svid"),
        (SvidError::LeafCanSign, "not_svid"),
        (
            SvidError::MissingKeyUsage {
                required: "clientAuth",
            },
            "not_svid",
        ),
        (
            SvidError::NotValidNow {
                not_before: 0,
                not_after: 1,
            },
            "expired",
        ),
        (
            SvidError::UnknownIssuer {
                trust_domain: "example.org".into(),
                detail: "UnknownIssuer".into(),
            },
            "unknown_ca",
        ),
        (SvidError::KeyMismatch, "bad_key"),
        (SvidError::BadKey("x".into()), "bad_key"),
        (SvidError::BadBundle("x".into()), "other"),
    ];
    for (err, reason) in cases {
        assert_eq!(handshake_failure_reason(&to_rustls(err)), reason);
    }
}

#[test]
fn reasons_for_plain_rustls_errors() {
    use rustls::Error;
    let cases = [
        (Error::NoCertificatesPresented, "no_cert"),
        (
            Error::AlertReceived(AlertDescription::CertificateRequired),
            "no_cert",
        ),
        (
            Error::AlertReceived(AlertDescription::UnknownCA),
            "unknown_ca",
        ),
        (
            Error::AlertReceived(AlertDescription::CertificateExpired),
            "expired",
        ),
        (
            Error::AlertReceived(AlertDescription::ProtocolVersion),
            "protocol_version",
        ),
        (
            Error::AlertReceived(AlertDescription::CertificateUnknown),
            "other",
        ),
        (
            Error::PeerIncompatible(PeerIncompatible::SupportedVersionsExtensionRequired),
            "protocol_version",
        ),
        (
            Error::InvalidCertificate(CertificateError::Expired),
            "expired",
        ),
        (
            Error::InvalidCertificate(CertificateError::UnknownIssuer),
            "unknown_ca",
        ),
        (
            Error::InvalidCertificate(CertificateError::BadEncoding),
            "not_svid",
        ),
        (Error::DecryptError, "other"),
    ];
    for (err, reason) in cases {
        assert_eq!(handshake_failure_reason(&err), reason, "{err:?}");
        assert!(svid_error_of(&err).is_none());
    }
}

#[test]
fn resolver_swaps_svids() {
    let ca = TestCa::root("example.org");
    let resolver = SvidResolver::empty();
    assert!(!resolver.is_ready());
    assert_eq!(resolver.current_serial(), None);
    assert!(!rustls::client::ResolvesClientCert::has_certs(&*resolver));

    let first = ca.svid("/web");
    resolver.install(&first).unwrap();
    assert!(resolver.is_ready());
    assert_eq!(
        resolver.current_serial().as_deref(),
        Some(first.serial_hex())
    );
    let key = rustls::client::ResolvesClientCert::resolve(&*resolver, &[], &[]).unwrap();
    assert_eq!(key.cert, first.chain());

    let second = ca.svid("/web");
    resolver.install(&second).unwrap();
    assert_eq!(
        resolver.current_serial().as_deref(),
        Some(second.serial_hex())
    );
    let key = rustls::client::ResolvesClientCert::resolve(&*resolver, &[], &[]).unwrap();
    assert_eq!(key.cert, second.chain());
}

#[test]
fn resolver_presents_nothing_once_the_svid_expired() {
    let ca = TestCa::root("example.org");
    let mut spec = crate::testca::LeafSpec::new("spiffe://example.org/web");
    spec.not_before = SystemTime::now() - Duration::from_secs(7200);
    spec.not_after = SystemTime::now() - Duration::from_secs(60);
    let (chain, key) = ca.issue(&spec);
    let expired = Svid::new(chain, key).unwrap();
    let resolver = SvidResolver::empty();
    resolver.install(&expired).unwrap();
    assert!(!resolver.is_ready());
    assert!(!rustls::client::ResolvesClientCert::has_certs(&*resolver));
    assert!(rustls::client::ResolvesClientCert::resolve(&*resolver, &[], &[]).is_none());
    // Still reported, so the admin endpoint can say what expired.
    assert_eq!(
        resolver.current_serial().as_deref(),
        Some(expired.serial_hex())
    );

    // A fresh SVID brings it back.
    let fresh = ca.svid("/web");
    resolver.install(&fresh).unwrap();
    assert!(resolver.is_ready());
    assert!(rustls::client::ResolvesClientCert::resolve(&*resolver, &[], &[]).is_some());
}

#[test]
fn resolver_stops_exactly_after_not_after() {
    let ca = TestCa::root("example.org");
    let svid = ca.svid("/web");
    let resolver = SvidResolver::empty();
    resolver.install(&svid).unwrap();
    let not_after = svid.not_after();
    assert!(resolver
        .key_at(not_after - Duration::from_secs(1))
        .is_some());
    // notAfter itself is still inside the validity period (RFC 5280: inclusive).
    assert!(resolver.key_at(not_after).is_some());
    assert!(resolver
        .key_at(not_after + Duration::from_secs(1))
        .is_none());
}

#[test]
fn tls12_plus_allows_only_ecdsa_aead_suites() {
    let provider = policy_provider(TlsPolicy::Tls12Plus);
    let tls12: Vec<_> = provider
        .cipher_suites
        .iter()
        .filter(|s| matches!(s, SupportedCipherSuite::Tls12(_)))
        .map(|s| s.suite())
        .collect();
    assert_eq!(tls12.len(), 3);
    assert!(tls12.iter().all(|s| TLS12_SUITES.contains(s)));
    assert!(provider
        .cipher_suites
        .iter()
        .any(|s| matches!(s, SupportedCipherSuite::Tls13(_))));

    let tls13_only = policy_provider(TlsPolicy::Tls13);
    assert!(tls13_only
        .cipher_suites
        .iter()
        .all(|s| matches!(s, SupportedCipherSuite::Tls13(_))));
}

/// A resolver presenting `svid`'s chain but signing with `signer`'s key: a peer that
/// shows a valid SVID it does not hold the key of.
fn impostor(svid: &Svid, signer: &Svid) -> Arc<SvidResolver> {
    let signing_key = provider()
        .key_provider
        .load_private_key(signer.key().clone_key())
        .unwrap();
    let resolver = SvidResolver::empty();
    resolver.current.store(Some(Arc::new(Installed {
        key: Arc::new(CertifiedKey::new(svid.chain().to_vec(), signing_key)),
        not_after: svid.not_after(),
        serial_hex: svid.serial_hex().to_owned(),
    })));
    resolver
}

/// Runs a handshake over memory; the first error either side hits, if any.
fn handshake(
    client: rustls::ClientConfig,
    server: rustls::ServerConfig,
) -> Result<(), rustls::Error> {
    let name = ServerName::try_from("web.example.org").unwrap();
    let mut client = rustls::ClientConnection::new(Arc::new(client), name).unwrap();
    let mut server = rustls::ServerConnection::new(Arc::new(server)).unwrap();
    for _ in 0..32 {
        deliver(&mut client, &mut server)?;
        deliver(&mut server, &mut client)?;
        if !client.is_handshaking() && !server.is_handshaking() {
            return Ok(());
        }
    }
    panic!("the handshake did not finish in 32 rounds");
}

/// Moves every record `from` has to send into `to`, which processes them; whether any moved,
/// or the first error `to` hits.
fn deliver<A, B>(
    from: &mut rustls::ConnectionCommon<A>,
    to: &mut rustls::ConnectionCommon<B>,
) -> Result<bool, rustls::Error> {
    let mut buf = Vec::new();
    while from.wants_write() {
        from.write_tls(&mut buf).unwrap();
    }
    let mut rest = &buf[..];
    while !rest.is_empty() {
        to.read_tls(&mut rest).unwrap();
        to.process_new_packets()?;
    }
    Ok(!buf.is_empty())
}

#[test]
fn signatures_by_a_key_other_than_the_certificates_are_refused() {
    let ca = TestCa::root("example.org");
    let bundle = ca.shared_bundle();
    let (web, api, thief) = (ca.svid("/web"), ca.svid("/api"), ca.svid("/thief"));
    let server = |resolver, versions: &[&'static SupportedProtocolVersion]| {
        rustls::ServerConfig::builder_with_provider(policy_provider(TlsPolicy::Tls12Plus))
            .with_protocol_versions(versions)
            .unwrap()
            .with_client_cert_verifier(SpiffeClientVerifier::new(bundle.clone(), false))
            .with_cert_resolver(resolver)
    };
    let client = |resolver| {
        client_config(
            Some(resolver),
            SpiffeServerVerifier::new(bundle.clone(), PeerMatch::AnyInTrustDomain),
            TlsPolicy::Tls12Plus,
            &[],
        )
        .unwrap()
    };
    let tls13: &[&'static SupportedProtocolVersion] = &[&rustls::version::TLS13];
    let tls12: &[&'static SupportedProtocolVersion] = &[&rustls::version::TLS12];
    for versions in [tls13, tls12] {
        let honest = || {
            let resolver = SvidResolver::empty();
            resolver.install(&web).unwrap();
            resolver
        };
        let api_resolver = SvidResolver::empty();
        api_resolver.install(&api).unwrap();
        // Control: the same setup with the right keys shakes hands.
        handshake(client(api_resolver.clone()), server(honest(), versions)).unwrap();
        // A server signing with another key: the client's verifier refuses it.
        let err = handshake(
            client(api_resolver.clone()),
            server(impostor(&web, &thief), versions),
        )
        .unwrap_err();
        assert!(
            matches!(
                err,
                rustls::Error::InvalidCertificate(CertificateError::BadSignature)
            ),
            "{versions:?}: {err:?}"
        );
        // A client signing with another key: the server's verifier refuses it.
        let err =
            handshake(client(impostor(&api, &thief)), server(honest(), versions)).unwrap_err();
        assert!(
            matches!(
                err,
                rustls::Error::InvalidCertificate(CertificateError::BadSignature)
            ),
            "{versions:?}: {err:?}"
        );
    }
}

/// A server and a client config of the same SVIDs, each side on the groups of its `kx`;
/// the group both sides negotiated, or the server's error.
fn negotiate(server_kx: KeyExchange, client_kx: KeyExchange) -> Result<String, rustls::Error> {
    let ca = TestCa::root("example.org");
    let bundle = ca.shared_bundle();
    let (web, api) = (SvidResolver::empty(), SvidResolver::empty());
    web.install(&ca.svid("/web")).unwrap();
    api.install(&ca.svid("/api")).unwrap();
    let server = rustls::ServerConfig::builder_with_provider(Arc::new(provider_for(server_kx)))
        .with_protocol_versions(TlsPolicy::Tls13.versions())
        .unwrap()
        .with_client_cert_verifier(SpiffeClientVerifier::new(bundle.clone(), false))
        .with_cert_resolver(web);
    let client = rustls::ClientConfig::builder_with_provider(Arc::new(provider_for(client_kx)))
        .with_protocol_versions(TlsPolicy::Tls13.versions())
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(SpiffeServerVerifier::new(
            bundle,
            PeerMatch::AnyInTrustDomain,
        ))
        .with_client_cert_resolver(api);
    let name = ServerName::try_from("web.example.org").unwrap();
    let mut client = rustls::ClientConnection::new(Arc::new(client), name).unwrap();
    let mut server = rustls::ServerConnection::new(Arc::new(server)).unwrap();
    for _ in 0..32 {
        deliver(&mut client, &mut server)?;
        deliver(&mut server, &mut client)?;
        if !client.is_handshaking() && !server.is_handshaking() {
            let (c, s) = (negotiated_group(&client), negotiated_group(&server));
            assert_eq!(c, s);
            return Ok(s.to_owned());
        }
    }
    panic!("the handshake did not finish in 32 rounds");
}

#[test]
fn pq_preferred_ends_negotiate_x25519mlkem768() {
    use KeyExchange::*;
    assert_eq!(
        negotiate(PqPreferred, PqPreferred).unwrap(),
        "X25519MLKEM768"
    );
    assert_eq!(negotiate(PqOnly, PqPreferred).unwrap(), "X25519MLKEM768");
    assert_eq!(negotiate(PqPreferred, PqOnly).unwrap(), "X25519MLKEM768");
}

#[test]
fn classical_peers_fall_back_to_x25519() {
    use KeyExchange::*;
    assert_eq!(negotiate(PqPreferred, Classical).unwrap(), "X25519");
    assert_eq!(negotiate(Classical, PqPreferred).unwrap(), "X25519");
}

#[test]
fn pq_only_refuses_a_classical_client_with_a_counted_reason() {
    let err = negotiate(KeyExchange::PqOnly, KeyExchange::Classical).unwrap_err();
    assert_eq!(
        err,
        rustls::Error::PeerIncompatible(PeerIncompatible::NoKxGroupsInCommon)
    );
    assert_eq!(handshake_failure_reason(&err), "no_shared_group");
}

#[test]
fn default_provider_prefers_the_hybrid_then_x25519_then_p256() {
    let names: Vec<_> = provider_for(KeyExchange::default())
        .kx_groups
        .iter()
        .map(|g| group_label(Some(g.name())))
        .collect();
    assert_eq!(names, ["X25519MLKEM768", "X25519", "P-256"]);
    assert!(provider_for(KeyExchange::PqOnly)
        .kx_groups
        .iter()
        .all(|g| g.name() == NamedGroup::X25519MLKEM768));
    assert!(provider_for(KeyExchange::Classical)
        .kx_groups
        .iter()
        .all(|g| !group_label(Some(g.name())).contains("MLKEM")));
}

#[test]
fn key_exchange_spellings_round_trip_and_errors_list_them() {
    for kx in KeyExchange::ALL {
        assert_eq!(kx.as_str().parse::<KeyExchange>().unwrap(), kx);
        assert!(KeyExchange::ALLOWED.contains(kx.as_str()));
    }
    let err = "pq_only".parse::<KeyExchange>().unwrap_err().to_string();
    assert!(
        err.contains("pq_only") && err.contains(KeyExchange::ALLOWED),
        "{err}"
    );
}

#[test]
fn configs_disable_early_data_and_resumption() {
    let ca = TestCa::root("example.org");
    let bundle = ca.shared_bundle();
    let server = server_config(
        SvidResolver::empty(),
        SpiffeClientVerifier::new(bundle.clone(), false),
        TlsPolicy::Tls13,
        &[b"h2", b"http/1.1"],
    )
    .unwrap();
    assert_eq!(server.max_early_data_size, 0);
    assert_eq!(server.send_tls13_tickets, 0);
    assert_eq!(
        server.alpn_protocols,
        vec![b"h2".to_vec(), b"http/1.1".to_vec()]
    );

    let client = client_config(
        None,
        SpiffeServerVerifier::new(bundle, PeerMatch::AnyInTrustDomain),
        TlsPolicy::Tls12Plus,
        &[b"h2"],
    )
    .unwrap();
    assert!(!client.enable_early_data);
    assert_eq!(client.alpn_protocols, vec![b"h2".to_vec()]);
}

/// Moves records between the two ends until neither has anything to send; the first error
/// either side hits, if any.
fn pump(
    client: &mut rustls::ClientConnection,
    server: &mut rustls::ServerConnection,
) -> Result<(), rustls::Error> {
    // `|`, not `||`: both directions every round.
    while deliver(client, server)? | deliver(server, client)? {}
    Ok(())
}

/// Ends on Trellis' extract-once HKDF and ends on rustls' stock aws-lc-rs suites derive the
/// same secrets at every step of the key schedule: the handshake (Finished checks), the
/// traffic keys (data both ways) and the resumption secret (a resumed second handshake), for
/// every TLS 1.3 suite and with either side on either implementation.
#[test]
fn extract_once_suites_interoperate_with_the_stock_ones() {
    use std::io::{Read, Write};
    let ca = TestCa::root("example.org");
    let bundle = ca.shared_bundle();
    let (web, api) = (SvidResolver::empty(), SvidResolver::empty());
    web.install(&ca.svid("/web")).unwrap();
    api.install(&ca.svid("/api")).unwrap();
    let ours = provider_for(KeyExchange::default());
    let stock = CryptoProvider {
        kx_groups: ours.kx_groups.clone(),
        ..rustls::crypto::aws_lc_rs::default_provider()
    };
    let only = |provider: &CryptoProvider, suite| {
        let mut provider = provider.clone();
        provider.cipher_suites.retain(|s| s.suite() == suite);
        assert_eq!(provider.cipher_suites.len(), 1);
        Arc::new(provider)
    };
    for suite in [
        CipherSuite::TLS13_AES_256_GCM_SHA384,
        CipherSuite::TLS13_AES_128_GCM_SHA256,
        CipherSuite::TLS13_CHACHA20_POLY1305_SHA256,
    ] {
        for (server_side, client_side) in [(&ours, &stock), (&stock, &ours)] {
            // Builder defaults: an in-memory session cache on both sides, tickets sent.
            let server = rustls::ServerConfig::builder_with_provider(only(server_side, suite))
                .with_protocol_versions(TlsPolicy::Tls13.versions())
                .unwrap()
                .with_client_cert_verifier(SpiffeClientVerifier::new(bundle.clone(), false))
                .with_cert_resolver(web.clone());
            let client = rustls::ClientConfig::builder_with_provider(only(client_side, suite))
                .with_protocol_versions(TlsPolicy::Tls13.versions())
                .unwrap()
                .dangerous()
                .with_custom_certificate_verifier(SpiffeServerVerifier::new(
                    bundle.clone(),
                    PeerMatch::AnyInTrustDomain,
                ))
                .with_client_cert_resolver(api.clone());
            let (server, client) = (Arc::new(server), Arc::new(client));
            let what = |c: &rustls::ClientConnection| {
                format!(
                    "{suite:?}, server stock: {}",
                    std::ptr::eq(server_side, &stock)
                ) + &format!(", {:?}", c.handshake_kind())
            };
            for want in [rustls::HandshakeKind::Full, rustls::HandshakeKind::Resumed] {
                let name = ServerName::try_from("web.example.org").unwrap();
                let mut c = rustls::ClientConnection::new(client.clone(), name).unwrap();
                let mut s = rustls::ServerConnection::new(server.clone()).unwrap();
                pump(&mut c, &mut s).unwrap_or_else(|e| panic!("{}: {e}", what(&c)));
                assert_eq!(c.handshake_kind(), Some(want), "{}", what(&c));
                assert_eq!(c.negotiated_cipher_suite().map(|s| s.suite()), Some(suite));
                c.writer().write_all(b"ping").unwrap();
                s.writer().write_all(b"pong").unwrap();
                pump(&mut c, &mut s).unwrap();
                let (mut at_server, mut at_client) = ([0u8; 4], [0u8; 4]);
                s.reader().read_exact(&mut at_server).unwrap();
                c.reader().read_exact(&mut at_client).unwrap();
                assert_eq!((&at_server, &at_client), (b"ping", b"pong"), "{}", what(&c));
            }
        }
    }
}
