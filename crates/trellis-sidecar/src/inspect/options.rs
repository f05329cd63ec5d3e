//! What an inspection checks and presents: the target, the bundle and trust domain, the
//! expected peer, and our own certificate. Everything that can be wrong with them is found
//! here, before any connection is made.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::sign::CertifiedKey;
use serde::{Deserialize, Serialize};
use thiserror::Error;
use trellis_identity::{SpiffeId, Svid, SvidError, TrustBundle, TrustDomain};

/// How long to wait after a TLS 1.3 handshake for the server's verdict on our certificate.
const DEFAULT_SETTLE: Duration = Duration::from_secs(1);
/// Stands in for the trust domain while it is unknown (no `--trust-domain`, nothing in the
/// bundle): it only reaches the verifier when the peer has no SPIFFE ID to take one from, and
/// then the verdict is `no_spiffe_id` before any trust-domain check.
const UNKNOWN_TRUST_DOMAIN: &str = "unknown.invalid";

/// Bad input to an inspection, found before any connection is made.
#[derive(Debug, Error)]
pub enum InspectError {
    /// The target is not `HOST:PORT`.
    #[error("`{0}` is not HOST:PORT (IPv6 addresses go in brackets: [::1]:15443)")]
    BadTarget(String),
    /// The bundle holds no certificate, or one that is not a CA.
    #[error("{0}")]
    BadBundle(SvidError),
    /// The bundle's CAs name more than one trust domain.
    #[error("the bundle's CAs belong to several trust domains ({0}); pass --trust-domain")]
    MixedTrustDomains(String),
    /// The client certificate and key cannot be used together.
    #[error("client certificate: {0}")]
    BadClientCert(String),
}

/// Where to connect: a host name or IP address and a port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub(super) host: String,
    pub(super) port: u16,
}

impl Target {
    /// Parses `HOST:PORT`, `IPV4:PORT` or `[IPV6]:PORT`.
    pub fn parse(input: &str) -> Result<Self, InspectError> {
        let bad = || InspectError::BadTarget(input.to_owned());
        let (host, port) = if let Some(rest) = input.strip_prefix('[') {
            let (host, port) = rest.split_once("]:").ok_or_else(bad)?;
            (host, port)
        } else {
            input.rsplit_once(':').ok_or_else(bad)?
        };
        // A bare IPv6 address without brackets has colons in its "host".
        if host.is_empty() || (host.contains(':') && !input.starts_with('[')) {
            return Err(bad());
        }
        let port: u16 = port.parse().map_err(|_| bad())?;
        if port == 0 {
            return Err(bad());
        }
        let target = Target {
            host: host.to_owned(),
            port,
        };
        // A host that is neither an IP address nor a DNS name cannot go into the handshake.
        target.server_name()?;
        Ok(target)
    }

    /// The host name or IP address.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// What rustls puts in SNI: a DNS name is sent, an IP address is not.
    pub(super) fn server_name(&self) -> Result<ServerName<'static>, InspectError> {
        ServerName::try_from(self.host.clone())
            .map_err(|_| InspectError::BadTarget(self.to_string()))
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// A client certificate chain and its key, checked to belong together.
#[derive(Clone)]
pub struct ClientIdentity {
    pub(super) key: Arc<CertifiedKey>,
    /// The leaf's URI SAN (or subject when it has none), for the report.
    pub(super) name: String,
}

impl fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the key.
        f.debug_struct("ClientIdentity")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl ClientIdentity {
    /// `chain` (leaf first) and its private key. The leaf need not be a valid SVID: presenting
    /// a deliberately odd certificate is a legitimate diagnosis.
    pub fn new(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<Self, InspectError> {
        let leaf = chain
            .first()
            .ok_or_else(|| InspectError::BadClientCert("no certificate".to_owned()))?;
        let facts = trellis_identity::cert_facts(leaf)
            .map_err(|e| InspectError::BadClientCert(e.to_string()))?;
        let name = facts
            .uri_sans
            .first()
            .cloned()
            .unwrap_or_else(|| facts.subject.clone());
        let key = CertifiedKey::from_der(chain, key, &trellis_identity::tls::provider()).map_err(
            |e| {
                InspectError::BadClientCert(match e {
                    rustls::Error::InconsistentKeys(_) => {
                        "the private key does not match the certificate".to_owned()
                    }
                    other => format!("unusable private key: {other}"),
                })
            },
        )?;
        Ok(ClientIdentity {
            key: Arc::new(key),
            name,
        })
    }

    /// An already-loaded signing key and chain, e.g. the one a running sidecar presents: no key
    /// bytes are copied or re-parsed, so a borrowed identity never leaves its process.
    pub fn from_certified_key(key: Arc<CertifiedKey>) -> Result<Self, InspectError> {
        let leaf = key
            .cert
            .first()
            .ok_or_else(|| InspectError::BadClientCert("no certificate".to_owned()))?;
        let facts = trellis_identity::cert_facts(leaf)
            .map_err(|e| InspectError::BadClientCert(e.to_string()))?;
        let name = facts
            .uri_sans
            .first()
            .cloned()
            .unwrap_or_else(|| facts.subject.clone());
        Ok(ClientIdentity { key, name })
    }

    /// A validated SVID (whose key [`Svid::new`](trellis_identity::Svid::new) already matched to its leaf).
    pub fn from_svid(svid: &Svid) -> Result<Self, InspectError> {
        let signing_key = trellis_identity::tls::provider()
            .key_provider
            .load_private_key(svid.key().clone_key())
            .map_err(|e| InspectError::BadClientCert(format!("unusable private key: {e}")))?;
        Ok(ClientIdentity {
            key: Arc::new(CertifiedKey::new(svid.chain().to_vec(), signing_key)),
            name: svid.spiffe_id().to_string(),
        })
    }

    /// The leaf's SPIFFE ID (its first URI SAN) or, without one, its subject.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// Where the trust domain the peer is checked against came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrustDomainSource {
    /// Given explicitly (`--trust-domain`).
    Flag,
    /// The URI SAN (`spiffe://<td>`) of the bundle's CA certificates.
    Bundle,
    /// The expected SPIFFE ID (`--spiffe-id`).
    ExpectedId,
    /// The peer's own SPIFFE ID: nothing else named one, so membership proves little.
    Peer,
    /// The trust domain of the running sidecar whose identity the inspection borrowed
    /// (`trellis inspect --admin`), when its bundle's CAs name none.
    Sidecar,
}

/// What to check and present. Built with [`InspectOptions::new`] and the setters.
#[derive(Debug, Clone)]
pub struct InspectOptions {
    pub(super) roots: Vec<CertificateDer<'static>>,
    pub(super) trust_domain: Option<(TrustDomain, TrustDomainSource)>,
    pub(super) expected: Option<SpiffeId>,
    pub(super) client: Option<ClientIdentity>,
    pub(super) tls12: bool,
    pub(super) timeout: Duration,
    pub(super) settle: Duration,
}

impl InspectOptions {
    /// Checks the peer against these CA certificates. Fails if there are none, if one is not a
    /// CA, or if their URI SANs name different trust domains. The trust domain is taken from
    /// those SANs until [`InspectOptions::trust_domain`] says otherwise.
    pub fn new(roots: Vec<CertificateDer<'static>>) -> Result<Self, InspectError> {
        if roots.is_empty() {
            return Err(InspectError::BadBundle(SvidError::BadBundle(
                "no CA certificates".to_owned(),
            )));
        }
        let bundle_td = bundle_trust_domain(&roots)?;
        // Validates now (CA flag, parse) so a bad bundle is a usage error, not a failed probe.
        let placeholder = placeholder_trust_domain();
        TrustBundle::new(bundle_td.clone().unwrap_or(placeholder), roots.clone())
            .map_err(InspectError::BadBundle)?;
        Ok(InspectOptions {
            roots,
            trust_domain: bundle_td.map(|td| (td, TrustDomainSource::Bundle)),
            expected: None,
            client: None,
            tls12: false,
            timeout: Duration::from_secs(5),
            settle: DEFAULT_SETTLE,
        })
    }

    /// The trust domain the peer must belong to, overriding the bundle's.
    pub fn trust_domain(mut self, td: TrustDomain) -> Self {
        self.trust_domain = Some((td, TrustDomainSource::Flag));
        self
    }

    /// The trust domain of the sidecar running this inspection, used only when neither
    /// [`InspectOptions::trust_domain`] nor the bundle named one.
    pub fn sidecar_trust_domain(mut self, td: TrustDomain) -> Self {
        if self.trust_domain.is_none() {
            self.trust_domain = Some((td, TrustDomainSource::Sidecar));
        }
        self
    }

    /// The exact SPIFFE ID the peer must present (default: any ID in the trust domain).
    pub fn expect(mut self, id: SpiffeId) -> Self {
        self.expected = Some(id);
        self
    }

    /// Presents this certificate when the server asks for one (default: none).
    pub fn client(mut self, identity: ClientIdentity) -> Self {
        self.client = Some(identity);
        self
    }

    /// Offers TLS 1.2 as well as 1.3 (with every TLS 1.2 suite rustls has, to diagnose peers
    /// Trellis would not talk to).
    pub fn tls12(mut self, on: bool) -> Self {
        self.tls12 = on;
        self
    }

    /// The deadline for resolving, connecting and the handshake together (default 5 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// How long to wait after a TLS 1.3 handshake for an alert refusing our certificate
    /// (default 1 s). In TLS 1.3 the server judges the client's certificate after the client
    /// has finished its handshake, so silence for this long counts as acceptance.
    pub fn settle(mut self, settle: Duration) -> Self {
        self.settle = settle;
        self
    }

    /// The trust domain and where it came from, before the peer is seen.
    pub(super) fn known_trust_domain(&self) -> Option<(TrustDomain, TrustDomainSource)> {
        self.trust_domain.clone().or_else(|| {
            self.expected.as_ref().and_then(|id| {
                TrustDomain::parse(id.trust_domain_name())
                    .ok()
                    .map(|td| (td, TrustDomainSource::ExpectedId))
            })
        })
    }
}

pub(super) fn placeholder_trust_domain() -> TrustDomain {
    TrustDomain::parse(UNKNOWN_TRUST_DOMAIN).unwrap_or_else(|_| unreachable!("valid constant"))
}

/// The trust domain the CA certificates name in their `spiffe://<td>` URI SANs (X509-SVID 3.2:
/// a signing certificate's SPIFFE ID has no path), if any do.
fn bundle_trust_domain(
    roots: &[CertificateDer<'static>],
) -> Result<Option<TrustDomain>, InspectError> {
    let mut found: Vec<TrustDomain> = Vec::new();
    for root in roots {
        let Ok(facts) = trellis_identity::cert_facts(root) else {
            continue; // TrustBundle::new reports it with its index.
        };
        for uri in &facts.uri_sans {
            let Some(rest) = uri.strip_prefix("spiffe://") else {
                continue;
            };
            let name = rest.split('/').next().unwrap_or_default();
            if let Ok(td) = TrustDomain::parse(name) {
                if !found.contains(&td) {
                    found.push(td);
                }
            }
        }
    }
    match found.len() {
        0 => Ok(None),
        1 => Ok(found.pop()),
        _ => Err(InspectError::MixedTrustDomains(
            found
                .iter()
                .map(TrustDomain::to_string)
                .collect::<Vec<_>>()
                .join(", "),
        )),
    }
}

#[cfg(test)]
mod tests {
    use trellis_identity::testca::TestCa;

    use super::*;

    #[test]
    fn client_identity_from_a_loaded_svid() {
        let ca = TestCa::root("example.org");
        let svid = ca.svid("/web");
        let identity = ClientIdentity::from_svid(&svid).unwrap();
        assert_eq!(identity.name(), "spiffe://example.org/web");
        let borrowed = ClientIdentity::from_certified_key(identity.key.clone()).unwrap();
        assert_eq!(borrowed.name(), "spiffe://example.org/web");
        assert!(Arc::ptr_eq(&borrowed.key, &identity.key));
        assert!(!format!("{borrowed:?}").contains("PRIVATE"));
    }

    #[test]
    fn parses_targets() {
        let t = Target::parse("127.0.0.1:15443").unwrap();
        assert_eq!((t.host(), t.port()), ("127.0.0.1", 15443));
        let t = Target::parse("service-b.prod.svc:443").unwrap();
        assert_eq!((t.host(), t.port()), ("service-b.prod.svc", 443));
        let t = Target::parse("[::1]:8443").unwrap();
        assert_eq!((t.host(), t.port()), ("::1", 8443));
        assert_eq!(t.to_string(), "[::1]:8443");
        for bad in [
            "127.0.0.1",
            ":443",
            "host:",
            "host:0",
            "host:99999",
            "::1:443",
            "[::1]",
        ] {
            assert!(Target::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn trust_domain_comes_from_the_bundle() {
        let ca = TestCa::root("example.org");
        let opts = InspectOptions::new(vec![ca.cert().clone()]).unwrap();
        assert_eq!(
            opts.known_trust_domain(),
            Some((
                TrustDomain::parse("example.org").unwrap(),
                TrustDomainSource::Bundle
            ))
        );
        let other = TestCa::root("other.org");
        let err = InspectOptions::new(vec![ca.cert().clone(), other.cert().clone()]).unwrap_err();
        assert!(matches!(err, InspectError::MixedTrustDomains(_)), "{err}");
        assert!(InspectOptions::new(vec![]).is_err());
        // A leaf is not a CA.
        let leaf = ca.svid("/web").chain()[0].clone();
        let err = InspectOptions::new(vec![leaf]).unwrap_err();
        assert!(err.to_string().contains("not a CA"), "{err}");
    }

    #[test]
    fn client_identity_needs_a_matching_key() {
        let ca = TestCa::root("example.org");
        let a = ca.svid("/a");
        let b = ca.svid("/b");
        let ok = ClientIdentity::new(a.chain().to_vec(), a.key().clone_key()).unwrap();
        assert_eq!(ok.name(), "spiffe://example.org/a");
        let err = ClientIdentity::new(a.chain().to_vec(), b.key().clone_key()).unwrap_err();
        assert!(err.to_string().contains("does not match"), "{err}");
    }
}
