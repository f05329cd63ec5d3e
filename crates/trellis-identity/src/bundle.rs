//! Trust bundles: the CA certificates that verify SVIDs of one trust domain.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use rustls_pki_types::{CertificateDer, TrustAnchor};

use crate::{SvidError, TrustDomain};

/// The CAs of one trust domain. Never empty; every member is a CA certificate.
#[derive(Clone, Debug)]
pub struct TrustBundle {
    trust_domain: TrustDomain,
    roots: Vec<CertificateDer<'static>>,
    /// webpki's view of `roots`, built once here instead of on every handshake.
    anchors: Vec<TrustAnchor<'static>>,
    earliest_expiry: SystemTime,
    /// Bundles of other trust domains this one federates with (SPIFFE federation), keyed by
    /// trust domain; empty without federation. A peer is verified against the bundle of the
    /// trust domain its SPIFFE ID names, never against another domain's.
    federated: Arc<BTreeMap<TrustDomain, TrustBundle>>,
}

impl TrustBundle {
    /// Validates that `roots` is non-empty, parses, and every certificate is a CA.
    pub fn new(
        trust_domain: TrustDomain,
        roots: Vec<CertificateDer<'static>>,
    ) -> Result<Self, SvidError> {
        if roots.is_empty() {
            return Err(SvidError::BadBundle(format!(
                "no CA certificates for trust domain `{trust_domain}`"
            )));
        }
        let mut anchors = Vec::with_capacity(roots.len());
        let mut earliest_expiry = None::<SystemTime>;
        for (i, root) in roots.iter().enumerate() {
            let facts = crate::cert_facts(root)
                .map_err(|e| SvidError::BadBundle(format!("certificate #{i}: {e}")))?;
            // X509-SVID 4.1: "Signing certificates MUST set the `cA` field to `true`".
            if !facts.is_ca {
                return Err(SvidError::BadBundle(format!(
                    "certificate #{i} (`{}`) is not a CA (basicConstraints cA is not true)",
                    facts.subject
                )));
            }
            let anchor = webpki::anchor_from_trusted_cert(root).map_err(|e| {
                SvidError::BadBundle(format!("certificate #{i} (`{}`): {e}", facts.subject))
            })?;
            anchors.push(anchor.to_owned());
            earliest_expiry = Some(match earliest_expiry {
                Some(t) => t.min(facts.not_after),
                None => facts.not_after,
            });
        }
        let earliest_expiry = earliest_expiry.unwrap_or(SystemTime::UNIX_EPOCH);
        Ok(TrustBundle {
            trust_domain,
            roots,
            anchors,
            earliest_expiry,
            federated: Arc::default(),
        })
    }

    /// This bundle with `foreign` as its federated bundles (replacing any before). Bundles of
    /// this bundle's own trust domain are left out (its own CAs always win), as are the
    /// federated bundles nested inside `foreign` (federation is not transitive).
    pub fn with_federated(mut self, foreign: impl IntoIterator<Item = TrustBundle>) -> Self {
        let mut map = BTreeMap::new();
        for mut bundle in foreign {
            if bundle.trust_domain == self.trust_domain {
                continue;
            }
            bundle.federated = Arc::default();
            map.insert(bundle.trust_domain.clone(), bundle);
        }
        self.federated = Arc::new(map);
        self
    }

    /// The federated (foreign) bundles, ordered by trust domain; empty without federation.
    pub fn federated(&self) -> impl Iterator<Item = &TrustBundle> {
        self.federated.values()
    }

    /// True when this bundle carries other trust domains' bundles.
    pub fn is_federated(&self) -> bool {
        !self.federated.is_empty()
    }

    /// The bundle that verifies SVIDs of `td`: this one for its own trust domain, a federated
    /// one for a foreign trust domain, `None` for a domain not trusted at all.
    pub fn for_domain(&self, td: &str) -> Option<&TrustBundle> {
        if self.trust_domain.as_str() == td {
            return Some(self);
        }
        self.federated
            .iter()
            .find(|(name, _)| name.as_str() == td)
            .map(|(_, b)| b)
    }

    /// This bundle without its federated bundles (the own trust domain's CAs only).
    pub fn own(&self) -> TrustBundle {
        let mut own = self.clone();
        own.federated = Arc::default();
        own
    }

    /// True when both hold the same CAs for the same trust domains (own and federated).
    pub fn same_cas(&self, other: &TrustBundle) -> bool {
        self.trust_domain == other.trust_domain
            && self.roots == other.roots
            && self.federated.len() == other.federated.len()
            && self
                .federated
                .iter()
                .zip(other.federated.iter())
                .all(|((a, x), (b, y))| a == b && x.roots == y.roots)
    }

    /// Parses PEM, then as [`TrustBundle::new`].
    pub fn from_pem(trust_domain: TrustDomain, pem: &[u8]) -> Result<Self, SvidError> {
        let roots = crate::certs_from_pem(pem).map_err(|e| SvidError::BadBundle(e.to_string()))?;
        Self::new(trust_domain, roots)
    }

    /// The bundle as concatenated PEM (the `ROOTCA` secret, `bundle.pem`): the own trust
    /// domain's CAs only, never the federated ones.
    pub fn to_pem(&self) -> String {
        crate::certs_to_pem(&self.roots)
    }

    /// The trust domain this bundle verifies.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The CA certificates.
    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    /// The earliest notAfter among the CAs.
    pub fn earliest_expiry(&self) -> SystemTime {
        self.earliest_expiry
    }

    /// The roots as webpki trust anchors.
    pub(crate) fn anchors(&self) -> &[TrustAnchor<'static>] {
        &self.anchors
    }

    /// Each CA's public facts, as both admin endpoints' `/certs` show them (a member that
    /// does not parse is left out; `new` already refused those).
    pub fn summary(&self) -> Vec<BundleCaSummary> {
        self.roots
            .iter()
            .filter_map(|der| crate::cert_facts(der).ok())
            .map(|f| BundleCaSummary {
                spiffe_id: f.uri_sans.into_iter().find(|u| u.starts_with("spiffe://")),
                not_before: unix(f.not_before),
                not_after: unix(f.not_after),
                not_before_rfc3339: rfc3339(f.not_before),
                not_after_rfc3339: rfc3339(f.not_after),
                subject: f.subject,
                serial: f.serial_hex,
            })
            .collect()
    }
}

/// One CA of a trust bundle: public facts only, serialized into `/certs`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct BundleCaSummary {
    /// Subject DN.
    pub subject: String,
    /// Serial number, lowercase hex.
    pub serial: String,
    /// The CA's SPIFFE ID URI SAN, if it has one.
    pub spiffe_id: Option<String>,
    /// notBefore, unix seconds.
    pub not_before: u64,
    /// notAfter, unix seconds.
    pub not_after: u64,
    /// notBefore, RFC 3339.
    pub not_before_rfc3339: String,
    /// notAfter, RFC 3339.
    pub not_after_rfc3339: String,
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn rfc3339(t: SystemTime) -> String {
    crate::cert::rfc3339(crate::cert::unix_secs(t))
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    use super::*;
    use crate::testca::{LeafSpec, TestCa};

    fn td() -> TrustDomain {
        TrustDomain::parse("example.org").unwrap()
    }

    #[test]
    fn accepts_roots_and_round_trips_pem() {
        let a = TestCa::root("example.org");
        let b = TestCa::root("example.org");
        let bundle = TrustBundle::new(td(), vec![a.cert().clone(), b.cert().clone()]).unwrap();
        assert_eq!(bundle.roots().len(), 2);
        assert_eq!(bundle.trust_domain(), &td());
        let again = TrustBundle::from_pem(td(), bundle.to_pem().as_bytes()).unwrap();
        assert_eq!(again.roots(), bundle.roots());
    }

    #[test]
    fn same_cas_compares_own_and_federated_cas() {
        let (a, b, c) = (
            TestCa::root("example.org"),
            TestCa::root("example.org"),
            TestCa::root("other.org"),
        );
        let ab = TrustBundle::new(td(), vec![a.cert().clone(), b.cert().clone()]).unwrap();
        assert!(ab.same_cas(&ab.clone()));
        assert!(!ab.same_cas(&a.bundle()));
        assert!(!ab.same_cas(&ab.clone().with_federated([c.bundle()])));
        let fed = ab.clone().with_federated([c.bundle()]);
        assert!(fed.same_cas(&ab.clone().with_federated([c.bundle()])));
        let other_c = TestCa::root("other.org");
        assert!(!fed.same_cas(&ab.with_federated([other_c.bundle()])));
    }

    #[test]
    fn rejects_empty_bundle() {
        let err = TrustBundle::new(td(), Vec::new()).unwrap_err();
        assert!(matches!(err, SvidError::BadBundle(_)), "{err:?}");
        assert!(err.to_string().contains("no CA certificates"), "{err}");
    }

    #[test]
    fn rejects_bundle_with_leaf_cert() {
        let ca = TestCa::root("example.org");
        let (leaf, _) = ca.issue(&LeafSpec::new("spiffe://example.org/web"));
        let err = TrustBundle::new(td(), vec![ca.cert().clone(), leaf[0].clone()]).unwrap_err();
        assert!(matches!(err, SvidError::BadBundle(_)), "{err:?}");
        assert!(err.to_string().contains("certificate #1"), "{err}");
        assert!(err.to_string().contains("not a CA"), "{err}");
    }

    #[test]
    fn rejects_bundle_with_garbage_cert() {
        let err = TrustBundle::new(td(), vec![CertificateDer::from(vec![1, 2, 3])]).unwrap_err();
        assert!(err.to_string().contains("certificate #0"), "{err}");
    }

    #[test]
    fn rejects_garbage_pem_bundle() {
        let err = TrustBundle::from_pem(td(), b"not a bundle").unwrap_err();
        assert!(matches!(err, SvidError::BadBundle(_)), "{err:?}");
    }

    #[test]
    fn earliest_expiry_is_the_soonest_not_after() {
        let root = TestCa::root("example.org");
        // A second CA that expires in two hours, well before the root's 30 days.
        let mut spec = LeafSpec::new("spiffe://example.org");
        spec.is_ca = true;
        spec.key_cert_sign = true;
        spec.not_after = SystemTime::now() + Duration::from_secs(7200);
        let (short_lived, _) = root.issue(&spec);
        let bundle =
            TrustBundle::new(td(), vec![root.cert().clone(), short_lived[0].clone()]).unwrap();
        let secs = |t: SystemTime| t.duration_since(UNIX_EPOCH).unwrap().as_secs();
        assert_eq!(secs(bundle.earliest_expiry()), secs(spec.not_after));
    }
}
