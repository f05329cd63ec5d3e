//! The certificate authority: holds the signing key in memory and issues X.509-SVIDs.
//!
//! X509-SVID spec: "An X.509 SVID MUST contain exactly one URI SAN" (section 2); "leaf
//! certificates MUST set the `cA` field to `false`" (4.1); "Leaf SVIDs MUST set
//! `digitalSignature`" and "MUST NOT set `keyCertSign` or `cRLSign`" (4.3); the EKU, when
//! included, has "`id-kp-serverAuth` and `id-kp-clientAuth`" (4.4), so one SVID serves both
//! directions.
//!
//! Two ways to get a signing key:
//! - the embedded default ([`Ca::load_or_create`]): a self-signed root kept in the state
//!   database; the root signs SVIDs directly, so chain = `[leaf]`, bundle = `[root]`;
//! - an operator intermediate ([`Ca::from_files`], usually made by [`Ca::init_offline`]):
//!   chain = `[leaf, intermediate, …]`, bundle = the offline root.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::RngCore as _;
use rcgen::{
    CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use thiserror::Error;
use time::OffsetDateTime;
use trellis_identity::{CertificateDer, PrivateKeyDer, SpiffeId, Svid, TrustBundle, TrustDomain};
use trellis_serve::time::{
    from_unix_seconds as from_unix, rfc3339_unix as fmt_unix, unix_seconds as unix,
};
use x509_parser::certificate::X509Certificate;

use crate::keys::SigningKey;
use zeroize::Zeroize as _;

mod material;
mod server_cert;

/// Backdating of notBefore, so a peer whose clock is a little behind accepts a fresh cert.
pub(crate) const CLOCK_SKEW: Duration = Duration::from_secs(60);

/// CA setup and issuance failures; each names the file and what to do.
#[derive(Debug, Error)]
pub enum CaError {
    /// A CA file could not be read.
    #[error("{path}: cannot read: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A CA file could not be written.
    #[error("{path}: cannot write: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A CA file's content is wrong (not PEM, not a CA, key mismatch, …).
    #[error("{path}: {problem}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong and what to do.
        problem: String,
    },
    /// A certificate signing request was refused (the caller's input, not the CA's setup).
    #[error("certificate signing request refused: {0}")]
    BadCsr(String),
    /// Signing failed.
    #[error("cannot sign certificate: {0}")]
    Sign(String),
    /// The signing key cannot be opened (PKCS#11 module, PIN, token, object).
    #[error(transparent)]
    Key(#[from] crate::keys::KeyError),
    /// The state database failed.
    #[error(transparent)]
    Registry(#[from] crate::registry::RegistryError),
}

/// Files written by `trellis ca init`.
#[derive(Debug, Clone)]
pub struct OfflineCaFiles {
    /// Root certificate (also the bundle).
    pub root_cert: PathBuf,
    /// Root key: keep offline.
    pub root_key: PathBuf,
    /// Intermediate certificate for `--ca-cert`.
    pub intermediate_cert: PathBuf,
    /// Intermediate key for `--ca-key` (not written when the key is in a token).
    pub intermediate_key: PathBuf,
    /// The token key's URI for `--ca-key`, when `trellis ca init` made the key in a token.
    pub intermediate_key_uri: Option<String>,
    /// The intermediate's CSR, signed by the token key (written only for a token key).
    pub intermediate_csr: PathBuf,
    /// Trust bundle (the root), for `--ca-bundle` and sidecars.
    pub bundle: PathBuf,
}

/// A TLS serving certificate for DNS names, made by [`Ca::issue_server_cert`]: what the
/// admission webhook presents to the Kubernetes API server. Not an SVID (no URI SAN), so no
/// SPIFFE verifier accepts it as a workload identity.
pub struct ServerCert {
    /// Leaf first, then the signing certificate and its parents below the root.
    pub chain: Vec<CertificateDer<'static>>,
    /// The leaf's fresh P-256 key (PKCS#8), made here and never written anywhere.
    pub key: PrivateKeyDer<'static>,
    /// The leaf's notAfter.
    pub not_after: SystemTime,
    /// The leaf's serial, lowercase hex.
    pub serial_hex: String,
}

impl std::fmt::Debug for ServerCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("ServerCert")
            .field("serial_hex", &self.serial_hex)
            .field("not_after", &self.not_after)
            .field("chain_len", &self.chain.len())
            .finish_non_exhaustive()
    }
}

/// A signing CA: its key (in memory or in a PKCS#11 token), its chain, and the bundle it chains to.
pub struct Ca {
    trust_domain: TrustDomain,
    bundle: TrustBundle,
    /// Signing certificate's subject and key identifier, and the key.
    issuer: Issuer<'static, SigningKey>,
    /// The signing certificate (what the transparency log names CA phases by).
    signing_cert: CertificateDer<'static>,
    /// What follows the leaf in an SVID chain: the signing certificate and its parents below
    /// the root. Empty when the signing certificate is itself a root in the bundle. Shared
    /// with every SVID issued on an SDS stream, which keeps it for the stream's life.
    chain_tail: Arc<[CertificateDer<'static>]>,
    /// Earliest notAfter of the signing certificate and the rest of `chain_tail`.
    not_after: SystemTime,
    /// The signing certificate's subject and serial, for logs and status.
    label: String,
}

impl Ca {
    /// The trust domain this CA issues for.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The bundle that verifies what this CA issues.
    pub fn bundle(&self) -> &TrustBundle {
        &self.bundle
    }

    /// The signing certificate's notAfter (or an earlier one of its parents below the root).
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// The certificate whose key signs (an intermediate, or a bundle root).
    pub fn signing_cert(&self) -> &CertificateDer<'static> {
        &self.signing_cert
    }

    /// The signing certificate's subject and serial (`CN=…, O=Trellis (serial 4f…)`).
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Issues an SVID for `id` with a fresh P-256 key made here, valid from one minute before
    /// `now` (clock skew) until `now + ttl`, capped at the CA's own expiry.
    /// Chain: leaf, then the signing certificate (and its parents below the root).
    pub fn issue(&self, id: &SpiffeId, ttl: Duration, now: SystemTime) -> Result<Svid, CaError> {
        let (leaf, _) = self.issue_leaf(id, ttl, now)?;
        let (mut chain, key) = leaf.into_parts();
        chain.extend(self.chain_tail.iter().cloned());
        Svid::new(chain, key)
            .map_err(|e| CaError::Sign(format!("issued SVID fails its own checks: {e}")))
    }

    /// [`Ca::issue`], with the chain in two parts: an [`Svid`] of the leaf alone (checked as
    /// `issue` checks it), and the certificates above it, shared with everything this CA
    /// issues (what an SDS stream keeps for its life is then the leaf and key alone).
    pub fn issue_leaf(
        &self,
        id: &SpiffeId,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<(Svid, Arc<[CertificateDer<'static>]>), CaError> {
        let mut key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(sign_err)?;
        let params = self.leaf_params(id, ttl, now)?;
        let leaf = params.signed_by(&key, &self.issuer).map_err(sign_err)?;
        let key_der = PrivateKeyDer::Pkcs8(key.serialize_der().into());
        key.zeroize();
        let svid = Svid::new(vec![exact_der(&leaf)], key_der)
            .map_err(|e| CaError::Sign(format!("issued SVID fails its own checks: {e}")))?;
        Ok((svid, Arc::clone(&self.chain_tail)))
    }

    /// Signs a PKCS#10 CSR (PEM) for `id` with the same leaf profile as [`Ca::issue`]; the
    /// caller keeps its private key. Refused unless the CSR's self-signature verifies, its
    /// key is ECDSA P-256, and it asks for no SAN but `id` and no CA rights. Whatever else
    /// the CSR asks for (subject, key usages, EKUs) is ignored: the profile is ours.
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        id: &SpiffeId,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<Vec<CertificateDer<'static>>, CaError> {
        let (leaf, _) = self.sign_csr_leaf(csr_pem, id, ttl, now)?;
        Ok(self.chain_with(leaf))
    }

    /// [`Ca::sign_csr`], with the chain in two parts: the leaf, and the certificates above it
    /// (shared, as in [`Ca::issue_leaf`]).
    pub fn sign_csr_leaf(
        &self,
        csr_pem: &str,
        id: &SpiffeId,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<(CertificateDer<'static>, Arc<[CertificateDer<'static>]>), CaError> {
        if !id.is_member_of(&self.trust_domain) {
            return Err(CaError::BadCsr(format!(
                "`{id}` is not in trust domain `{}`",
                self.trust_domain
            )));
        }
        // rcgen verifies the CSR's self-signature while parsing (proof the caller holds the
        // key) and refuses extensions it does not know.
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| CaError::BadCsr(e.to_string()))?;
        let requested = &csr.params;
        // X509-SVID spec 4.1: "leaf certificates MUST set the `cA` field to `false`".
        if matches!(requested.is_ca, IsCa::Ca(_))
            || requested
                .key_usages
                .iter()
                .any(|u| matches!(u, KeyUsagePurpose::KeyCertSign | KeyUsagePurpose::CrlSign))
        {
            return Err(CaError::BadCsr("CSR asks for CA rights".into()));
        }
        // X509-SVID spec 2: "An X.509 SVID MUST contain exactly one URI SAN".
        for san in &requested.subject_alt_names {
            match san {
                SanType::URI(uri) if uri.as_str() == id.as_str() => {}
                other => {
                    return Err(CaError::BadCsr(format!(
                        "CSR asks for {other:?}; only the URI SAN `{id}` may be requested"
                    )))
                }
            }
        }
        if csr.public_key.algorithm() != &rcgen::PKCS_ECDSA_P256_SHA256
            || !is_p256_point(rcgen::PublicKeyData::der_bytes(&csr.public_key))
        {
            return Err(CaError::BadCsr(
                "CSR key must be ECDSA P-256 (signed with ecdsa-with-SHA256)".into(),
            ));
        }
        let params = self.leaf_params(id, ttl, now)?;
        let leaf = params
            .signed_by(&csr.public_key, &self.issuer)
            .map_err(sign_err)?;
        let leaf = exact_der(&leaf);
        // Same check `issue` gets from `Svid::new`, minus the key (which we never see).
        let facts = trellis_identity::cert_facts(&leaf)
            .map_err(|e| CaError::Sign(format!("issued certificate: {e}")))?;
        facts
            .leaf_spiffe_id()
            .map_err(|e| CaError::Sign(format!("issued certificate: {e}")))?;
        Ok((leaf, Arc::clone(&self.chain_tail)))
    }

    /// `leaf`, then the certificates above it.
    fn chain_with(&self, leaf: CertificateDer<'static>) -> Vec<CertificateDer<'static>> {
        std::iter::once(leaf)
            .chain(self.chain_tail.iter().cloned())
            .collect()
    }

    /// The X509-SVID leaf profile.
    fn leaf_params(
        &self,
        id: &SpiffeId,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<CertificateParams, CaError> {
        if !id.is_member_of(&self.trust_domain) {
            return Err(CaError::Sign(format!(
                "`{id}` is not in trust domain `{}`",
                self.trust_domain
            )));
        }
        let not_before = whole_seconds(now.checked_sub(CLOCK_SKEW).unwrap_or(UNIX_EPOCH));
        let not_after =
            whole_seconds(now.checked_add(ttl).unwrap_or(self.not_after)).min(self.not_after);
        if not_after <= now {
            return Err(CaError::Sign(format!(
                "the signing certificate expires at {}: renew the CA",
                fmt_unix(unix(self.not_after))
            )));
        }
        let mut params = CertificateParams::default();
        // No CN: the identity lives in the URI SAN only. A fixed O keeps the subject non-empty
        // for tools that mishandle empty subjects.
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Trellis");
        params.distinguished_name = dn;
        params.subject_alt_names = vec![SanType::URI(
            id.as_str()
                .try_into()
                .map_err(|e: rcgen::Error| CaError::Sign(e.to_string()))?,
        )];
        // X509-SVID spec 4.1: "leaf certificates MUST set the `cA` field to `false`";
        // ExplicitNoCa writes basicConstraints (critical) with cA=false.
        params.is_ca = IsCa::ExplicitNoCa;
        // X509-SVID spec 4.3: "Leaf SVIDs MUST set `digitalSignature`" and "MUST NOT set
        // `keyCertSign` or `cRLSign`"; rcgen marks the extension critical ("MUST be marked
        // critical").
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.serial_number = Some(random_serial());
        params.not_before = OffsetDateTime::from(not_before);
        params.not_after = OffsetDateTime::from(not_after);
        params.use_authority_key_identifier_extension = true;
        Ok(params)
    }
}

/// `<kind> <td> <creation time> <8 random hex>`: operators tell the CAs of a rotation apart by
/// name, and two CAs made in the same second still get different subjects (certificate paths
/// are built by matching issuer and subject names).
fn random_serial() -> SerialNumber {
    let mut b = [0u8; 16];
    rand::rng().fill_bytes(&mut b);
    b[0] &= 0x7f;
    if b[0] == 0 {
        b[0] = 1;
    }
    SerialNumber::from_slice(&b)
}

/// A copy of `cert`'s DER of the exact size: rcgen's grew by doubling, and the control plane
/// keeps each stream's SVID for as long as the stream lasts (one per sidecar).
fn exact_der(cert: &rcgen::Certificate) -> CertificateDer<'static> {
    CertificateDer::from(cert.der().to_vec())
}

fn sign_err(e: rcgen::Error) -> CaError {
    CaError::Sign(e.to_string())
}

fn is_ca(c: &X509Certificate<'_>) -> bool {
    matches!(c.basic_constraints(), Ok(Some(bc)) if bc.value.ca)
}

fn is_p256_point(raw: &[u8]) -> bool {
    raw.len() == 65 && raw[0] == 0x04
}

fn whole_seconds(t: SystemTime) -> SystemTime {
    from_unix(unix(t))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::registry::Registry;
    use material::uri_sans;
    use rcgen::BasicConstraints;
    use std::path::Path;
    use trellis_identity::Usage;
    use x509_parser::extensions::GeneralName;
    use x509_parser::extensions::ParsedExtension;
    use x509_parser::oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY};

    pub(super) const DAY: Duration = Duration::from_secs(86_400);

    pub(super) fn td() -> TrustDomain {
        TrustDomain::parse("example.org").unwrap()
    }

    pub(super) fn id() -> SpiffeId {
        SpiffeId::parse("spiffe://example.org/ns/prod/sa/web").unwrap()
    }

    pub(super) fn default_ca() -> (tempfile::TempDir, Registry, Ca) {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::open(&dir.path().join("trellis.db")).unwrap();
        let ca = Ca::load_or_create(&reg, &td()).unwrap();
        (dir, reg, ca)
    }

    /// An operator intermediate under an offline root, as `trellis ca init` makes them (the
    /// directory holds its files).
    pub(super) fn intermediate_ca() -> (tempfile::TempDir, Ca) {
        let dir = tempfile::tempdir().unwrap();
        let files = Ca::init_offline(&td(), &dir.path().join("ca")).unwrap();
        let ca = Ca::from_files(
            &td(),
            &files.intermediate_cert,
            &files.intermediate_key,
            Some(&files.bundle),
        )
        .unwrap();
        (dir, ca)
    }

    /// A root that expires `life` from now, signing directly (like the embedded default).
    pub(super) fn short_lived_ca(life: Duration) -> Ca {
        let now = SystemTime::now();
        let (mut params, key) =
            material::ca_params(&td(), "short", now, DAY, BasicConstraints::Unconstrained).unwrap();
        params.not_after = OffsetDateTime::from(whole_seconds(now + life));
        let cert = params.self_signed(&key).unwrap();
        let bundle = TrustBundle::new(td(), vec![cert.der().clone()]).unwrap();
        let p = Path::new("test");
        Ca::assemble(
            &td(),
            p,
            p,
            vec![cert.der().clone()],
            bundle,
            SigningKey::memory(key),
            now,
        )
        .unwrap()
    }

    pub(super) fn parse<'a>(der: &'a CertificateDer<'_>) -> X509Certificate<'a> {
        x509_parser::parse_x509_certificate(der.as_ref()).unwrap().1
    }

    #[test]
    fn svid_has_exactly_one_uri_san_equal_to_the_id() {
        let (_d, _r, ca) = default_ca();
        let svid = ca.issue(&id(), DAY, SystemTime::now()).unwrap();
        let leaf = parse(&svid.chain()[0]);
        let san = leaf.subject_alternative_name().unwrap().unwrap();
        assert_eq!(
            san.value.general_names,
            vec![GeneralName::URI("spiffe://example.org/ns/prod/sa/web")]
        );
        assert_eq!(svid.spiffe_id(), &id());
        // No CN: the identity lives only in the URI SAN.
        assert_eq!(leaf.subject().iter_common_name().count(), 0);
    }

    #[test]
    fn svid_is_not_a_ca_and_says_so_critically() {
        let (_d, _r, ca) = default_ca();
        let svid = ca.issue(&id(), DAY, SystemTime::now()).unwrap();
        let leaf = parse(&svid.chain()[0]);
        let bc = leaf.basic_constraints().unwrap().unwrap();
        assert!(!bc.value.ca);
        assert!(bc.critical);
    }

    #[test]
    fn svid_key_usage_is_digital_signature_only() {
        let (_d, _r, ca) = default_ca();
        let svid = ca.issue(&id(), DAY, SystemTime::now()).unwrap();
        let leaf = parse(&svid.chain()[0]);
        let ku = leaf.key_usage().unwrap().unwrap();
        assert!(ku.critical);
        assert!(ku.value.digital_signature());
        assert!(!ku.value.key_cert_sign());
        assert!(!ku.value.crl_sign());
        assert!(!ku.value.key_encipherment());
    }

    #[test]
    fn svid_has_server_and_client_auth() {
        let (_d, _r, ca) = default_ca();
        let svid = ca.issue(&id(), DAY, SystemTime::now()).unwrap();
        let leaf = parse(&svid.chain()[0]);
        let eku = leaf.extended_key_usage().unwrap().unwrap();
        assert!(eku.value.server_auth && eku.value.client_auth);
        assert!(!eku.value.any);
    }

    #[test]
    fn svid_key_is_p256() {
        let (_d, _r, ca) = default_ca();
        let svid = ca.issue(&id(), DAY, SystemTime::now()).unwrap();
        let leaf = parse(&svid.chain()[0]);
        let spki = leaf.public_key();
        assert_eq!(spki.algorithm.algorithm, OID_KEY_TYPE_EC_PUBLIC_KEY);
        assert_eq!(
            spki.algorithm
                .parameters
                .as_ref()
                .unwrap()
                .as_oid()
                .unwrap(),
            OID_EC_P256
        );
        let PrivateKeyDer::Pkcs8(k) = svid.key() else {
            panic!("key is not PKCS#8")
        };
        let kp = KeyPair::try_from(k.secret_pkcs8_der()).unwrap();
        assert_eq!(kp.algorithm(), &rcgen::PKCS_ECDSA_P256_SHA256);
    }

    #[test]
    fn svid_times_and_serial() {
        let (_d, _r, ca) = default_ca();
        let now = SystemTime::now();
        let a = ca.issue(&id(), DAY, now).unwrap();
        let b = ca.issue(&id(), DAY, now).unwrap();
        assert_eq!(a.not_before(), whole_seconds(now - CLOCK_SKEW));
        assert_eq!(a.not_after(), whole_seconds(now + DAY));
        let leaf = parse(&a.chain()[0]);
        assert_eq!(leaf.raw_serial().len(), 16);
        assert!(leaf.raw_serial()[0] & 0x80 == 0, "serial must be positive");
        assert_ne!(a.serial_hex(), b.serial_hex());
    }

    #[test]
    fn default_chain_is_the_leaf_and_bundle_is_the_root() {
        let (_d, _r, ca) = default_ca();
        let svid = ca.issue(&id(), DAY, SystemTime::now()).unwrap();
        assert_eq!(svid.chain().len(), 1);
        assert_eq!(ca.bundle().roots().len(), 1);
        let root = parse(&ca.bundle().roots()[0]);
        assert!(root
            .subject()
            .to_string()
            .contains("CN=Trellis CA example.org"));
        assert_eq!(uri_sans(&root), vec!["spiffe://example.org"]);
        let bc = root.basic_constraints().unwrap().unwrap().value;
        assert!(bc.ca && bc.path_len_constraint.is_none());
        let ku = root.key_usage().unwrap().unwrap().value;
        assert!(ku.key_cert_sign() && ku.crl_sign() && ku.digital_signature());
        let life = root.validity().not_after.timestamp() - root.validity().not_before.timestamp();
        assert!(life >= 3650 * 86_400, "root lives {life} s");
    }

    #[test]
    fn svid_verifies_against_bundle() {
        let (_d, _r, ca) = default_ca();
        let now = SystemTime::now();
        let svid = ca.issue(&id(), DAY, now).unwrap();
        for usage in [Usage::Server, Usage::Client] {
            let got =
                trellis_identity::verify_svid_chain(svid.chain(), ca.bundle(), now, usage).unwrap();
            assert_eq!(got, id());
        }
        svid.verify(ca.bundle(), now).unwrap();
    }

    #[test]
    fn svid_not_after_capped_at_ca_expiry() {
        let ca = short_lived_ca(Duration::from_secs(3600));
        let now = SystemTime::now();
        let svid = ca.issue(&id(), DAY, now).unwrap();
        assert_eq!(svid.not_after(), ca.not_after());
        assert!(svid.not_after() < now + DAY);
    }

    #[test]
    fn refuses_to_issue_after_ca_expiry() {
        let ca = short_lived_ca(Duration::from_secs(3600));
        let later = SystemTime::now() + 2 * DAY;
        let err = ca.issue(&id(), DAY, later).unwrap_err();
        assert!(err.to_string().contains("renew the CA"), "{err}");
    }

    #[test]
    fn refuses_to_issue_for_other_trust_domain() {
        let (_d, _r, ca) = default_ca();
        let other = SpiffeId::parse("spiffe://evil.org/ns/a/sa/b").unwrap();
        let err = ca.issue(&other, DAY, SystemTime::now()).unwrap_err();
        assert!(err.to_string().contains("not in trust domain"), "{err}");
    }

    fn csr_for(params: CertificateParams, key: &KeyPair) -> String {
        params.serialize_request(key).unwrap().pem().unwrap()
    }

    fn uri_params(uris: &[&str]) -> CertificateParams {
        let mut p = CertificateParams::default();
        p.subject_alt_names = uris
            .iter()
            .map(|u| SanType::URI((*u).try_into().unwrap()))
            .collect();
        p
    }

    #[test]
    fn sign_csr_issues_for_the_csr_key() {
        let (_d, _r, ca) = default_ca();
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let csr = csr_for(uri_params(&[id().as_str()]), &key);
        let now = SystemTime::now();
        let chain = ca.sign_csr(&csr, &id(), DAY, now).unwrap();
        let leaf = parse(&chain[0]);
        assert_eq!(
            leaf.public_key().subject_public_key.data.as_ref(),
            key.public_key_raw()
        );
        assert!(!leaf.basic_constraints().unwrap().unwrap().value.ca);
        let svid = Svid::new(
            chain.clone(),
            PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
        svid.verify(ca.bundle(), now).unwrap();
        // A CSR without SANs gets the ID too.
        let bare = csr_for(CertificateParams::default(), &key);
        let chain = ca.sign_csr(&bare, &id(), DAY, now).unwrap();
        assert_eq!(uri_sans(&parse(&chain[0])), vec![id().as_str()]);
    }

    #[test]
    fn sign_csr_rejects_other_uri_san() {
        let (_d, _r, ca) = default_ca();
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let csr = csr_for(
            uri_params(&["spiffe://example.org/ns/kube-system/sa/admin"]),
            &key,
        );
        let err = ca
            .sign_csr(&csr, &id(), DAY, SystemTime::now())
            .unwrap_err();
        assert!(matches!(err, CaError::BadCsr(_)), "{err}");
    }

    #[test]
    fn sign_csr_rejects_extra_dns_san() {
        let (_d, _r, ca) = default_ca();
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = uri_params(&[id().as_str()]);
        p.subject_alt_names
            .push(SanType::DnsName("example.com".try_into().unwrap()));
        let err = ca
            .sign_csr(&csr_for(p, &key), &id(), DAY, SystemTime::now())
            .unwrap_err();
        assert!(matches!(err, CaError::BadCsr(_)), "{err}");
    }

    #[test]
    fn sign_csr_rejects_ca_request() {
        let (_d, _r, ca) = default_ca();
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = uri_params(&[id().as_str()]);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let err = ca
            .sign_csr(&csr_for(p, &key), &id(), DAY, SystemTime::now())
            .unwrap_err();
        assert!(err.to_string().contains("CA rights"), "{err}");
        let mut p = uri_params(&[id().as_str()]);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let err = ca
            .sign_csr(&csr_for(p, &key), &id(), DAY, SystemTime::now())
            .unwrap_err();
        assert!(err.to_string().contains("CA rights"), "{err}");
    }

    #[test]
    fn sign_csr_rejects_bad_self_signature() {
        let (_d, _r, ca) = default_ca();
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let csr = uri_params(&[id().as_str()])
            .serialize_request(&key)
            .unwrap();
        let mut der = csr.der().to_vec();
        let last = der.len() - 1;
        der[last] ^= 0x01; // flip a bit of the signature
        let pem = pem_block("CERTIFICATE REQUEST", &der);
        let err = ca
            .sign_csr(&pem, &id(), DAY, SystemTime::now())
            .unwrap_err();
        assert!(matches!(err, CaError::BadCsr(_)), "{err}");
    }

    #[test]
    fn sign_csr_rejects_p384_key() {
        let (_d, _r, ca) = default_ca();
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        let csr = csr_for(uri_params(&[id().as_str()]), &key);
        let err = ca
            .sign_csr(&csr, &id(), DAY, SystemTime::now())
            .unwrap_err();
        assert!(err.to_string().contains("P-256"), "{err}");
    }

    #[test]
    fn sign_csr_rejects_garbage() {
        let (_d, _r, ca) = default_ca();
        let err = ca
            .sign_csr("not a csr", &id(), DAY, SystemTime::now())
            .unwrap_err();
        assert!(matches!(err, CaError::BadCsr(_)), "{err}");
    }

    fn pem_block(label: &str, der: &[u8]) -> String {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD.encode(der);
        let mut out = format!("-----BEGIN {label}-----\n");
        for chunk in b64.as_bytes().chunks(64) {
            out.push_str(std::str::from_utf8(chunk).unwrap());
            out.push('\n');
        }
        out.push_str(&format!("-----END {label}-----\n"));
        out
    }

    #[test]
    fn leaf_has_no_unexpected_extensions() {
        let (_d, _r, ca) = default_ca();
        let svid = ca.issue(&id(), DAY, SystemTime::now()).unwrap();
        let leaf = parse(&svid.chain()[0]);
        for ext in leaf.iter_extensions() {
            assert!(
                matches!(
                    ext.parsed_extension(),
                    ParsedExtension::SubjectAlternativeName(_)
                        | ParsedExtension::KeyUsage(_)
                        | ParsedExtension::ExtendedKeyUsage(_)
                        | ParsedExtension::BasicConstraints(_)
                        | ParsedExtension::SubjectKeyIdentifier(_)
                        | ParsedExtension::AuthorityKeyIdentifier(_)
                ),
                "unexpected extension {}",
                ext.oid
            );
        }
    }
}
