//! Chain verification against a trust bundle, plus the X509-SVID leaf rules.

use std::time::{SystemTime, UNIX_EPOCH};

use rustls_pki_types::{CertificateDer, UnixTime};
use webpki::{EndEntityCert, KeyUsage};

use crate::cert::unix_secs;
use crate::{CertFacts, IdError, SpiffeId, SvidError, TrustBundle};

/// Which extended key usage the leaf must carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    /// serverAuth (the peer is a server).
    Server,
    /// clientAuth (the peer is a client).
    Client,
    /// Either (an SVID checked outside a handshake).
    Either,
}

/// Verifies `chain` (leaf first) against `bundle` at `now` with rustls-webpki, then applies the
/// X509-SVID leaf rules and checks the SPIFFE ID is in the bundle's trust domain.
/// Returns the leaf's SPIFFE ID.
pub fn verify_svid_chain(
    chain: &[CertificateDer<'_>],
    bundle: &TrustBundle,
    now: SystemTime,
    usage: Usage,
) -> Result<SpiffeId, SvidError> {
    let (leaf, intermediates) = chain.split_first().ok_or(SvidError::EmptyChain)?;
    verify_leaf(leaf, intermediates, bundle, now, usage)
}

/// [`verify_svid_chain`] with the leaf apart, as rustls hands it over (no allocation).
pub(crate) fn verify_leaf(
    leaf: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    bundle: &TrustBundle,
    now: SystemTime,
    usage: Usage,
) -> Result<SpiffeId, SvidError> {
    let facts = crate::cert_facts(leaf)?;
    // SPIFFE Trust Domain and Bundle 4.1: "the trust domain name of the SPIFFE ID is used to
    // select the bundle" that validates the SVID. With federation the leaf's SPIFFE ID picks
    // its own domain's bundle, so `spiffe://a.org/...` must chain to a.org's CAs and never to
    // b.org's. A leaf of an untrusted domain (or no SPIFFE ID) is judged against the own
    // bundle, which refuses it exactly as without federation.
    // Parsed once per handshake: it picks the bundle here and is checked below.
    let leaf_id = facts.leaf_spiffe_id();
    let bundle = match &leaf_id {
        Ok(id) if bundle.is_federated() => {
            bundle.for_domain(id.trust_domain_name()).unwrap_or(bundle)
        }
        _ => bundle,
    };

    // X509-SVID 5.1: "The validation of trust in a given SVID is based on standard X.509 path
    // validation, and MUST follow RFC 5280 path validation semantics."
    let end_entity =
        EndEntityCert::try_from(leaf).map_err(|e| SvidError::Malformed(e.to_string()))?;
    let time = UnixTime::since_unix_epoch(now.duration_since(UNIX_EPOCH).unwrap_or_default());
    let path = |eku: KeyUsage| {
        end_entity
            .verify_for_usage(
                webpki::ALL_VERIFICATION_ALGS,
                bundle.anchors(),
                intermediates,
                time,
                eku,
                None,
                None,
            )
            .map(|_| ())
    };
    let verified = match usage {
        Usage::Server => path(KeyUsage::server_auth()),
        Usage::Client => path(KeyUsage::client_auth()),
        // Report the serverAuth failure unless it was only about the EKU, in which case the
        // clientAuth attempt says more.
        Usage::Either => path(KeyUsage::server_auth()).or_else(|server_err| {
            path(KeyUsage::client_auth()).map_err(|client_err| {
                if is_eku_error(&server_err) {
                    client_err
                } else {
                    server_err
                }
            })
        }),
    };
    verified.map_err(|e| webpki_error(e, usage, &facts, bundle))?;

    // The SVID rules run even when webpki is satisfied: webpki knows nothing of SPIFFE.
    let id = leaf_id?;
    // SPIFFE-ID 3: "An SVID is considered valid if it has been signed by an authority within the
    // SPIFFE ID's trust domain." The bundle holds exactly the authorities of its trust domain.
    if !id.is_member_of(bundle.trust_domain()) {
        return Err(IdError::WrongTrustDomain {
            id: id.to_string(),
            expected: bundle.trust_domain().to_string(),
        }
        .into());
    }
    Ok(id)
}

// webpki 0.103 reports the Context form; the unit form is matched in case a path still uses it.
#[allow(deprecated)]
fn is_eku_error(e: &webpki::Error) -> bool {
    matches!(
        e,
        webpki::Error::RequiredEkuNotFound | webpki::Error::RequiredEkuNotFoundContext(_)
    )
}

fn webpki_error(
    e: webpki::Error,
    usage: Usage,
    leaf: &CertFacts,
    bundle: &TrustBundle,
) -> SvidError {
    if is_eku_error(&e) {
        // X509-SVID 4.4: "When included, fields `id-kp-serverAuth` and `id-kp-clientAuth` MUST
        // be set."
        return SvidError::MissingKeyUsage {
            required: match usage {
                Usage::Server => "serverAuth",
                Usage::Client => "clientAuth",
                Usage::Either => "serverAuth and clientAuth",
            },
        };
    }
    match e {
        webpki::Error::CertExpired { .. } | webpki::Error::CertNotValidYet { .. } => {
            SvidError::NotValidNow {
                not_before: unix_secs(leaf.not_before),
                not_after: unix_secs(leaf.not_after),
            }
        }
        // X509-SVID 4.1: "leaf certificates MUST set the `cA` field to `false`."
        webpki::Error::CaUsedAsEndEntity => SvidError::LeafIsCa,
        other => SvidError::UnknownIssuer {
            trust_domain: bundle.trust_domain().to_string(),
            detail: format!("{other:?}"),
        },
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::testca::{LeafSpec, TestCa};

    const ID: &str = "spiffe://example.org/ns/prod/sa/web";
    const HOUR: Duration = Duration::from_secs(3600);

    fn verify(ca: &TestCa, spec: &LeafSpec, usage: Usage) -> Result<SpiffeId, SvidError> {
        let (chain, _) = ca.issue(spec);
        verify_svid_chain(&chain, &ca.bundle(), SystemTime::now(), usage)
    }

    #[test]
    fn verifies_leaf_intermediate_root_chain() {
        let root = TestCa::root("example.org");
        let intermediate = root.intermediate();
        let (chain, _) = intermediate.issue(&LeafSpec::new(ID));
        assert_eq!(chain.len(), 2);
        let bundle = root.bundle();
        for usage in [Usage::Server, Usage::Client, Usage::Either] {
            let id = verify_svid_chain(&chain, &bundle, SystemTime::now(), usage).unwrap();
            assert_eq!(id.as_str(), ID);
        }
    }

    #[test]
    fn verifies_through_two_intermediates() {
        let root = TestCa::root("example.org");
        let issuing = root.intermediate().intermediate();
        let (chain, _) = issuing.issue(&LeafSpec::new(ID));
        assert_eq!(chain.len(), 3);
        verify_svid_chain(&chain, &root.bundle(), SystemTime::now(), Usage::Either).unwrap();
    }

    #[test]
    fn rejects_chain_missing_its_intermediate() {
        let root = TestCa::root("example.org");
        let (chain, _) = root.intermediate().issue(&LeafSpec::new(ID));
        let err = verify_svid_chain(
            &chain[..1],
            &root.bundle(),
            SystemTime::now(),
            Usage::Server,
        )
        .unwrap_err();
        assert!(matches!(err, SvidError::UnknownIssuer { .. }), "{err:?}");
    }

    #[test]
    fn rejects_empty_chain() {
        let ca = TestCa::root("example.org");
        let err = verify_svid_chain(&[], &ca.bundle(), SystemTime::now(), Usage::Either);
        assert!(matches!(err, Err(SvidError::EmptyChain)));
    }

    #[test]
    fn rejects_expired_leaf() {
        let ca = TestCa::root("example.org");
        let mut spec = LeafSpec::new(ID);
        spec.not_before = SystemTime::now() - 3 * HOUR;
        spec.not_after = SystemTime::now() - HOUR;
        let err = verify(&ca, &spec, Usage::Either).unwrap_err();
        let SvidError::NotValidNow {
            not_before,
            not_after,
        } = err
        else {
            panic!("expected NotValidNow, got {err:?}");
        };
        assert_eq!(not_before, unix_secs(spec.not_before));
        assert_eq!(not_after, unix_secs(spec.not_after));
        assert_eq!(err.reason(), "expired");
    }

    #[test]
    fn rejects_not_yet_valid_leaf() {
        let ca = TestCa::root("example.org");
        let mut spec = LeafSpec::new(ID);
        spec.not_before = SystemTime::now() + HOUR;
        spec.not_after = SystemTime::now() + 3 * HOUR;
        let err = verify(&ca, &spec, Usage::Either).unwrap_err();
        assert!(matches!(err, SvidError::NotValidNow { .. }), "{err:?}");
    }

    #[test]
    fn expiry_uses_the_given_time() {
        let ca = TestCa::root("example.org");
        let spec = LeafSpec::new(ID);
        let (chain, _) = ca.issue(&spec);
        let later = spec.not_after + Duration::from_secs(1);
        let err = verify_svid_chain(&chain, &ca.bundle(), later, Usage::Either).unwrap_err();
        assert!(matches!(err, SvidError::NotValidNow { .. }), "{err:?}");
    }

    #[test]
    fn rejects_chain_from_other_ca() {
        let ours = TestCa::root("example.org");
        let theirs = TestCa::root("example.org");
        let (chain, _) = theirs.issue(&LeafSpec::new(ID));
        let err = verify_svid_chain(&chain, &ours.bundle(), SystemTime::now(), Usage::Either)
            .unwrap_err();
        assert!(matches!(err, SvidError::UnknownIssuer { .. }), "{err:?}");
        assert_eq!(err.reason(), "unknown_ca");
        assert!(err.to_string().contains("`example.org`"), "{err}");
    }

    #[test]
    fn rejects_id_from_other_trust_domain() {
        // Our own CA signed it, but for a trust domain that is not the bundle's.
        let ca = TestCa::root("example.org");
        let err = verify(&ca, &LeafSpec::new("spiffe://other.org/web"), Usage::Either).unwrap_err();
        assert!(
            matches!(err, SvidError::BadId(IdError::WrongTrustDomain { .. })),
            "{err:?}"
        );
        assert!(
            err.to_string()
                .contains("not in trust domain `example.org`"),
            "{err}"
        );
    }

    #[test]
    fn rejects_leaf_with_ca_flag() {
        let ca = TestCa::root("example.org");
        let mut spec = LeafSpec::new(ID);
        spec.is_ca = true;
        let err = verify(&ca, &spec, Usage::Either).unwrap_err();
        assert!(matches!(err, SvidError::LeafIsCa), "{err:?}");
    }

    #[test]
    fn rejects_leaf_with_key_cert_sign() {
        let ca = TestCa::root("example.org");
        let mut spec = LeafSpec::new(ID);
        spec.key_cert_sign = true;
        let err = verify(&ca, &spec, Usage::Either).unwrap_err();
        assert!(matches!(err, SvidError::LeafCanSign), "{err:?}");
    }

    #[test]
    fn rejects_two_uri_sans() {
        let ca = TestCa::root("example.org");
        let mut spec = LeafSpec::new(ID);
        spec.uri_sans.push("spiffe://example.org/admin".to_owned());
        let err = verify(&ca, &spec, Usage::Either).unwrap_err();
        assert!(matches!(err, SvidError::UriSanCount(2)), "{err:?}");
    }

    #[test]
    fn rejects_leaf_without_uri_san() {
        let ca = TestCa::root("example.org");
        let mut spec = LeafSpec::new(ID);
        spec.uri_sans.clear();
        let err = verify(&ca, &spec, Usage::Either).unwrap_err();
        assert!(matches!(err, SvidError::UriSanCount(0)), "{err:?}");
    }

    #[test]
    fn rejects_server_only_leaf_as_client() {
        let ca = TestCa::root("example.org");
        let mut spec = LeafSpec::new(ID);
        spec.client_auth = false;
        let err = verify(&ca, &spec, Usage::Client).unwrap_err();
        assert!(
            matches!(
                err,
                SvidError::MissingKeyUsage {
                    required: "clientAuth"
                }
            ),
            "{err:?}"
        );
        verify(&ca, &spec, Usage::Server).unwrap();
        verify(&ca, &spec, Usage::Either).unwrap();
    }

    #[test]
    fn rejects_client_only_leaf_as_server() {
        let ca = TestCa::root("example.org");
        let mut spec = LeafSpec::new(ID);
        spec.server_auth = false;
        let err = verify(&ca, &spec, Usage::Server).unwrap_err();
        assert!(
            matches!(
                err,
                SvidError::MissingKeyUsage {
                    required: "serverAuth"
                }
            ),
            "{err:?}"
        );
        verify(&ca, &spec, Usage::Client).unwrap();
    }

    #[test]
    fn accepts_leaf_without_eku_extension() {
        // X509-SVID 4.4: leaves "SHOULD include this extension"; absent means any usage.
        let ca = TestCa::root("example.org");
        let mut spec = LeafSpec::new(ID);
        spec.server_auth = false;
        spec.client_auth = false;
        verify(&ca, &spec, Usage::Server).unwrap();
        verify(&ca, &spec, Usage::Client).unwrap();
    }

    #[test]
    fn rejects_garbage_leaf() {
        let ca = TestCa::root("example.org");
        let chain = [CertificateDer::from(vec![0x30, 0x00])];
        let err =
            verify_svid_chain(&chain, &ca.bundle(), SystemTime::now(), Usage::Either).unwrap_err();
        assert!(matches!(err, SvidError::Malformed(_)), "{err:?}");
    }

    #[test]
    fn accepts_any_root_of_a_rotating_bundle() {
        let old = TestCa::root("example.org");
        let new = TestCa::root("example.org");
        let bundle = TrustBundle::new(
            old.trust_domain().clone(),
            vec![old.cert().clone(), new.cert().clone()],
        )
        .unwrap();
        for ca in [&old, &new] {
            let (chain, _) = ca.issue(&LeafSpec::new(ID));
            verify_svid_chain(&chain, &bundle, SystemTime::now(), Usage::Either).unwrap();
        }
    }

    #[test]
    fn federated_peer_verifies_against_its_own_domain_only() {
        let a = TestCa::root("a.org");
        let b = TestCa::root("b.org");
        let federated = a.bundle().with_federated([b.bundle()]);
        let now = SystemTime::now();
        // A b.org workload signed by b.org's CA: accepted through the federated bundle.
        let (chain, _) = b.issue(&LeafSpec::new("spiffe://b.org/web"));
        let id = verify_svid_chain(&chain, &federated, now, Usage::Either).unwrap();
        assert_eq!(id.as_str(), "spiffe://b.org/web");
        // An a.org workload signed by a.org's CA: still accepted.
        let (chain, _) = a.issue(&LeafSpec::new("spiffe://a.org/web"));
        verify_svid_chain(&chain, &federated, now, Usage::Either).unwrap();
        // The impostor: an a.org ID signed by b.org's CA must not pass as a.org.
        let (chain, _) = b.issue(&LeafSpec::new("spiffe://a.org/web"));
        let err = verify_svid_chain(&chain, &federated, now, Usage::Either).unwrap_err();
        assert!(matches!(err, SvidError::UnknownIssuer { .. }), "{err:?}");
        // And a b.org ID signed by a.org's CA is refused the same way.
        let (chain, _) = a.issue(&LeafSpec::new("spiffe://b.org/web"));
        let err = verify_svid_chain(&chain, &federated, now, Usage::Either).unwrap_err();
        assert!(matches!(err, SvidError::UnknownIssuer { .. }), "{err:?}");
        // Without federation, b.org's workloads are refused.
        let (chain, _) = b.issue(&LeafSpec::new("spiffe://b.org/web"));
        assert!(verify_svid_chain(&chain, &a.bundle(), now, Usage::Either).is_err());
    }
}
