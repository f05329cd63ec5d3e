//! The one throwaway CA of the test suites (feature `test-util`): roots, intermediates and
//! leaves carrying exactly the property a test needs (expired, other trust domain, two URI
//! SANs, CA flag, …), for keys it makes or keys it is given in a CSR (a sidecar in CSR mode
//! keeps its key). `trellis_tests` (the test-support crate) re-exports it.
//!
//! Everything here panics on failure: it exists to keep tests short, never to run in production.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher as _, Hasher as _};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rcgen::string::Ia5String;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData,
    SanType, SerialNumber,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::tls::SharedBundle;
use crate::{certs_to_pem, Svid, TrustBundle, TrustDomain};

const HOUR: Duration = Duration::from_secs(3600);

/// A CA (root or intermediate) that signs test certificates for one trust domain.
pub struct TestCa {
    trust_domain: TrustDomain,
    issuer: Issuer<'static, KeyPair>,
    /// The CA key, PKCS#8 PEM.
    key_pem: String,
    cert: CertificateDer<'static>,
    root: CertificateDer<'static>,
    /// What a leaf's chain carries after the leaf: this CA and its parents, without the root.
    chain_tail: Vec<CertificateDer<'static>>,
}

impl std::fmt::Debug for TestCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCa")
            .field("trust_domain", &self.trust_domain)
            .field("depth", &self.chain_tail.len())
            .finish_non_exhaustive()
    }
}

impl TestCa {
    /// A self-signed root for `trust_domain` (e.g. `example.org`), valid from an hour ago for 30 days.
    pub fn root(trust_domain: &str) -> Self {
        let trust_domain = TrustDomain::parse(trust_domain).expect("test trust domain");
        let key = KeyPair::generate().expect("generate CA key");
        let params = ca_params(&trust_domain, "Trellis test root CA");
        let cert = params
            .self_signed(&key)
            .expect("self-sign root")
            .der()
            .clone();
        TestCa {
            trust_domain,
            key_pem: key.serialize_pem(),
            issuer: Issuer::new(params, key),
            root: cert.clone(),
            cert,
            chain_tail: Vec::new(),
        }
    }

    /// An intermediate CA signed by this one; leaves it issues chain through it.
    pub fn intermediate(&self) -> Self {
        let key = KeyPair::generate().expect("generate intermediate key");
        let params = ca_params(&self.trust_domain, "Trellis test intermediate CA");
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("sign intermediate")
            .der()
            .clone();
        let mut chain_tail = vec![cert.clone()];
        chain_tail.extend(self.chain_tail.iter().cloned());
        TestCa {
            trust_domain: self.trust_domain.clone(),
            key_pem: key.serialize_pem(),
            issuer: Issuer::new(params, key),
            cert,
            root: self.root.clone(),
            chain_tail,
        }
    }

    /// This CA's own certificate.
    pub fn cert(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// This CA's private key as PKCS#8 PEM (to run `trellis control --ca-key` with it).
    pub fn key_pem(&self) -> String {
        self.key_pem.clone()
    }

    /// This CA's certificate as PEM (`trellis control --ca-cert`).
    pub fn cert_pem(&self) -> String {
        certs_to_pem(std::slice::from_ref(&self.cert))
    }

    /// The trust domain the CA was made for.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// A bundle holding the root this CA descends from.
    pub fn bundle(&self) -> TrustBundle {
        TrustBundle::new(self.trust_domain.clone(), vec![self.root.clone()]).expect("test bundle")
    }

    /// [`TestCa::bundle`], ready for the rustls verifiers.
    pub fn shared_bundle(&self) -> SharedBundle {
        Arc::new(ArcSwap::from_pointee(self.bundle()))
    }

    /// `spiffe://<trust domain><path>` (`path` starts with `/`).
    pub fn id(&self, path: &str) -> String {
        format!("spiffe://{}{}", self.trust_domain, path)
    }

    /// [`TestCa::bundle`] as PEM (what an SDS `ROOTCA` or a `--control-bundle` file carries).
    pub fn bundle_pem(&self) -> String {
        certs_to_pem(std::slice::from_ref(&self.root))
    }

    /// Issues a leaf as `spec` says: the chain (leaf, then intermediates) and its PKCS#8 key.
    pub fn issue(&self, spec: &LeafSpec) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let key = KeyPair::generate().expect("generate leaf key");
        let chain = self.sign(spec, &key);
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        (chain, key)
    }

    /// Signs a leaf as `spec` says for a public key the test was given (a sidecar keeps its key
    /// and sends a CSR): the chain, leaf first.
    pub fn sign(
        &self,
        spec: &LeafSpec,
        public_key: &impl PublicKeyData,
    ) -> Vec<CertificateDer<'static>> {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, "Trellis test workload");
        params.subject_alt_names = spec
            .uri_sans
            .iter()
            .map(|uri| SanType::URI(Ia5String::try_from(uri.as_str()).expect("ASCII URI SAN")))
            .chain(spec.host_sans.iter().map(|host| match host.parse() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(Ia5String::try_from(host.as_str()).expect("DNS SAN")),
            }))
            .collect();
        params.not_before = spec.not_before.into();
        params.not_after = spec.not_after.into();
        params.is_ca = if spec.is_ca {
            IsCa::Ca(BasicConstraints::Unconstrained)
        } else {
            IsCa::ExplicitNoCa
        };
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        if spec.key_cert_sign {
            params.key_usages.push(KeyUsagePurpose::KeyCertSign);
        }
        if spec.server_auth {
            params
                .extended_key_usages
                .push(ExtendedKeyUsagePurpose::ServerAuth);
        }
        if spec.client_auth {
            params
                .extended_key_usages
                .push(ExtendedKeyUsagePurpose::ClientAuth);
        }
        params.serial_number = Some(match spec.serial.as_deref() {
            Some(serial) => SerialNumber::from_slice(serial),
            None => random_serial(),
        });
        params.use_authority_key_identifier_extension = true;
        let leaf = params
            .signed_by(public_key, &self.issuer)
            .expect("sign leaf")
            .der()
            .clone();
        let mut chain = vec![leaf];
        chain.extend(self.chain_tail.iter().cloned());
        chain
    }

    /// Checks a CSR's self-signature, then signs its public key as `spec` says (whatever SPIFFE
    /// ID the CSR asked for: the test decides). An error if the CSR does not parse or verify.
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        spec: &LeafSpec,
    ) -> Result<Vec<CertificateDer<'static>>, rcgen::Error> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)?;
        Ok(self.sign(spec, &csr.public_key))
    }

    /// A valid SVID for `spiffe://<trust domain><path>` (`path` starts with `/`).
    pub fn svid(&self, path: &str) -> Svid {
        let id = format!("spiffe://{}{}", self.trust_domain, path);
        let (chain, key) = self.issue(&LeafSpec::new(&id));
        Svid::new(chain, key).expect("test SVID")
    }
}

/// 16 random bytes as a positive serial. rcgen would derive the serial from the public key,
/// which makes every renewal for the same key (CSR mode) look identical; a test that watches
/// the serial change needs a fresh one each time.
fn random_serial() -> SerialNumber {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut bytes = Vec::with_capacity(16);
    for _ in 0..2 {
        // RandomState is seeded randomly per instance: enough entropy for test serials.
        let mut h = RandomState::new().build_hasher();
        h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
        bytes.extend_from_slice(&h.finish().to_be_bytes());
    }
    // Positive, and no leading zero byte for the DER encoder to trim.
    bytes[0] = (bytes[0] & 0x7f) | 0x01;
    SerialNumber::from_slice(&bytes)
}

fn ca_params(td: &TrustDomain, name: &str) -> CertificateParams {
    let now = SystemTime::now();
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, format!("{name} {td}"));
    // X509-SVID 3.2: "If present, the SPIFFE ID of a signing certificate MUST NOT have a path
    // component".
    params.subject_alt_names = vec![SanType::URI(
        Ia5String::try_from(td.id().to_string()).expect("ASCII trust domain ID"),
    )];
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = (now - HOUR).into();
    params.not_after = (now + 30 * 24 * HOUR).into();
    params.use_authority_key_identifier_extension = true;
    params
}

/// What a test leaf looks like. [`LeafSpec::new`] is a valid X509-SVID; change one field to
/// break exactly one rule.
#[derive(Debug, Clone)]
pub struct LeafSpec {
    /// URI SANs, in order.
    pub uri_sans: Vec<String>,
    /// DNS names and IP addresses (an IP when it parses as one), after the URI SANs: for the
    /// web-PKI servers tests stand up (a Kubernetes API server, PostgreSQL).
    pub host_sans: Vec<String>,
    /// notBefore.
    pub not_before: SystemTime,
    /// notAfter.
    pub not_after: SystemTime,
    /// basicConstraints cA.
    pub is_ca: bool,
    /// keyUsage keyCertSign.
    pub key_cert_sign: bool,
    /// EKU serverAuth.
    pub server_auth: bool,
    /// EKU clientAuth.
    pub client_auth: bool,
    /// The serial's bytes (big-endian); a fresh random one when `None`.
    pub serial: Option<Vec<u8>>,
}

impl LeafSpec {
    /// One URI SAN `uri`, valid from an hour ago for 24 hours, serverAuth and clientAuth.
    pub fn new(uri: &str) -> Self {
        let now = SystemTime::now();
        LeafSpec {
            uri_sans: vec![uri.to_owned()],
            host_sans: Vec::new(),
            not_before: now - HOUR,
            not_after: now + 23 * HOUR,
            is_ca: false,
            key_cert_sign: false,
            server_auth: true,
            client_auth: true,
            serial: None,
        }
    }

    /// A TLS server certificate for `host` (DNS name or IP address): no URI SAN, serverAuth
    /// only, valid from an hour ago for 24 hours.
    pub fn server(host: &str) -> Self {
        let mut spec = LeafSpec::new("");
        spec.uri_sans.clear();
        spec.host_sans = vec![host.to_owned()];
        spec.client_auth = false;
        spec
    }

    /// Expired a minute ago (valid for the hour before).
    pub fn expired(mut self) -> Self {
        let now = SystemTime::now();
        self.not_before = now - 2 * HOUR;
        self.not_after = now - Duration::from_secs(60);
        self
    }

    /// Valid only from an hour from now.
    pub fn not_yet_valid(mut self) -> Self {
        let now = SystemTime::now();
        self.not_before = now + HOUR;
        self.not_after = now + 2 * HOUR;
        self
    }
}

/// Presents one SVID whatever its validity, as a broken or hostile peer would (Trellis's own
/// [`crate::tls::SvidResolver`] never presents an expired SVID).
#[derive(Debug)]
pub struct AlwaysPresents(Arc<rustls::sign::CertifiedKey>);

impl AlwaysPresents {
    /// A resolver for `svid`.
    pub fn new(svid: &Svid) -> Arc<Self> {
        let key = crate::tls::provider()
            .key_provider
            .load_private_key(svid.key().clone_key())
            .expect("test SVID key loads");
        Arc::new(Self(Arc::new(rustls::sign::CertifiedKey::new(
            svid.chain().to_vec(),
            key,
        ))))
    }
}

impl rustls::client::ResolvesClientCert for AlwaysPresents {
    fn resolve(
        &self,
        _hints: &[&[u8]],
        _schemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(Arc::clone(&self.0))
    }

    fn has_certs(&self) -> bool {
        true
    }
}

impl rustls::server::ResolvesServerCert for AlwaysPresents {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(Arc::clone(&self.0))
    }
}
