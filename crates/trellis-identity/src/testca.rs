//! A throwaway CA for tests (feature `test-util`): roots, intermediates and leaves carrying
//! exactly the property a test needs (expired, other trust domain, two URI SANs, CA flag, …).
//!
//! Everything here panics on failure: it exists to keep tests short, never to run in production.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rcgen::string::Ia5String;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::tls::SharedBundle;
use crate::{Svid, TrustBundle, TrustDomain};

const HOUR: Duration = Duration::from_secs(3600);

/// A CA (root or intermediate) that signs test certificates for one trust domain.
pub struct TestCa {
    trust_domain: TrustDomain,
    issuer: Issuer<'static, KeyPair>,
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

    /// Issues a leaf as `spec` says: the chain (leaf, then intermediates) and its PKCS#8 key.
    pub fn issue(&self, spec: &LeafSpec) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let key = KeyPair::generate().expect("generate leaf key");
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, "Trellis test workload");
        params.subject_alt_names = spec
            .uri_sans
            .iter()
            .map(|uri| SanType::URI(Ia5String::try_from(uri.as_str()).expect("ASCII URI SAN")))
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
        params.serial_number = spec.serial.as_deref().map(SerialNumber::from_slice);
        params.use_authority_key_identifier_extension = true;
        let leaf = params
            .signed_by(&key, &self.issuer)
            .expect("sign leaf")
            .der()
            .clone();
        let mut chain = vec![leaf];
        chain.extend(self.chain_tail.iter().cloned());
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        (chain, key)
    }

    /// A valid SVID for `spiffe://<trust domain><path>` (`path` starts with `/`).
    pub fn svid(&self, path: &str) -> Svid {
        let id = format!("spiffe://{}{}", self.trust_domain, path);
        let (chain, key) = self.issue(&LeafSpec::new(&id));
        Svid::new(chain, key).expect("test SVID")
    }
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
    /// The serial's bytes (big-endian); rcgen derives one from the key when `None`.
    pub serial: Option<Vec<u8>>,
}

impl LeafSpec {
    /// One URI SAN `uri`, valid from an hour ago for 24 hours, serverAuth and clientAuth.
    pub fn new(uri: &str) -> Self {
        let now = SystemTime::now();
        LeafSpec {
            uri_sans: vec![uri.to_owned()],
            not_before: now - HOUR,
            not_after: now + 23 * HOUR,
            is_ca: false,
            key_cert_sign: false,
            server_auth: true,
            client_auth: true,
            serial: None,
        }
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
