//! Keys never leave the workload: the sidecar makes its P-256 key pair here and sends the
//! control plane a CSR (PEM, in `node.metadata["trellis.io/csr"]`).
//!
//! The control plane checks the CSR's self-signature (proof that we hold the key), that it asks
//! for nothing beyond the attested SPIFFE ID, and answers with a certificate chain only.

use rcgen::string::Ia5String;
use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use trellis_identity::SpiffeId;
use zeroize::Zeroize;

/// `node.metadata` key that carries the CSR.
pub const CSR_METADATA_KEY: &str = "trellis.io/csr";

/// A fresh key and the CSR for it. The key is zeroized on drop.
pub struct KeyAndCsr {
    /// PKCS#8 private key.
    pub key: PrivateKeyDer<'static>,
    /// PEM `CERTIFICATE REQUEST`.
    pub csr_pem: String,
}

impl Drop for KeyAndCsr {
    fn drop(&mut self) {
        self.key.zeroize();
    }
}

impl std::fmt::Debug for KeyAndCsr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyAndCsr").finish_non_exhaustive()
    }
}

/// Makes a P-256 key and a CSR asking for `id` as its only URI SAN (or no SAN when the ID is
/// not known before attestation; the control plane fills in the attested ID).
pub fn generate(id: Option<&SpiffeId>) -> Result<KeyAndCsr, rcgen::Error> {
    let mut key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    // The subject carries nothing: the identity is the URI SAN, and the CA uses its own profile.
    params.distinguished_name = DistinguishedName::new();
    // X509-SVID 2: "An X.509 SVID MUST contain exactly one URI SAN" — ask for that one or none.
    if let Some(id) = id {
        params.subject_alt_names = vec![SanType::URI(Ia5String::try_from(id.as_str())?)];
    }
    let csr_pem = params.serialize_request(&key)?.pem()?;
    let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    key.zeroize();
    Ok(KeyAndCsr { key: der, csr_pem })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csr_is_pem_and_key_is_p256_pkcs8() {
        let id = SpiffeId::parse("spiffe://example.org/web").unwrap();
        let k = generate(Some(&id)).unwrap();
        assert!(
            k.csr_pem.starts_with("-----BEGIN CERTIFICATE REQUEST-----"),
            "{}",
            k.csr_pem
        );
        assert!(matches!(k.key, PrivateKeyDer::Pkcs8(_)));
        let parsed = rcgen::CertificateSigningRequestParams::from_pem(&k.csr_pem).unwrap();
        assert_eq!(parsed.params.subject_alt_names.len(), 1);
        assert!(
            matches!(&parsed.params.subject_alt_names[0], SanType::URI(u) if u.as_str() == id.as_str()),
            "{:?}",
            parsed.params.subject_alt_names
        );
        // The key loads as a rustls signing key (what the resolver will do with it).
        trellis_identity::tls::provider()
            .key_provider
            .load_private_key(k.key.clone_key())
            .unwrap();
    }

    #[test]
    fn csr_without_id_has_no_san() {
        let k = generate(None).unwrap();
        let parsed = rcgen::CertificateSigningRequestParams::from_pem(&k.csr_pem).unwrap();
        assert!(parsed.params.subject_alt_names.is_empty());
    }

    #[test]
    fn every_call_makes_a_new_key() {
        let a = generate(None).unwrap();
        let b = generate(None).unwrap();
        assert_ne!(a.key.secret_der(), b.key.secret_der());
        assert_ne!(a.csr_pem, b.csr_pem);
    }

    #[test]
    fn debug_never_shows_the_key() {
        let k = generate(None).unwrap();
        assert_eq!(format!("{k:?}"), "KeyAndCsr { .. }");
    }

    #[test]
    fn control_plane_ca_signs_it_for_the_attested_id() {
        let dir = tempfile::tempdir().unwrap();
        let registry = trellis_control::registry::Registry::open(&dir.path().join("t.db")).unwrap();
        let td = trellis_identity::TrustDomain::parse("example.org").unwrap();
        let ca = trellis_control::ca::Ca::load_or_create(&registry, &td).unwrap();
        let id = SpiffeId::parse("spiffe://example.org/ns/prod/sa/web").unwrap();
        let now = std::time::SystemTime::now();
        for k in [generate(Some(&id)).unwrap(), generate(None).unwrap()] {
            let chain = ca
                .sign_csr(&k.csr_pem, &id, std::time::Duration::from_secs(3600), now)
                .unwrap();
            // The certificate is for our key: Svid::new checks the key matches the leaf.
            let svid = trellis_identity::Svid::new(chain, k.key.clone_key()).unwrap();
            assert_eq!(svid.spiffe_id(), &id);
            svid.verify(ca.bundle(), now).unwrap();
        }
    }

    #[test]
    fn control_plane_ca_refuses_csr_for_another_id() {
        let dir = tempfile::tempdir().unwrap();
        let registry = trellis_control::registry::Registry::open(&dir.path().join("t.db")).unwrap();
        let td = trellis_identity::TrustDomain::parse("example.org").unwrap();
        let ca = trellis_control::ca::Ca::load_or_create(&registry, &td).unwrap();
        let asked = SpiffeId::parse("spiffe://example.org/admin").unwrap();
        let attested = SpiffeId::parse("spiffe://example.org/web").unwrap();
        let k = generate(Some(&asked)).unwrap();
        let err = ca
            .sign_csr(
                &k.csr_pem,
                &attested,
                std::time::Duration::from_secs(3600),
                std::time::SystemTime::now(),
            )
            .unwrap_err();
        assert!(
            err.to_string().contains("spiffe://example.org/admin"),
            "{err}"
        );
    }
}
