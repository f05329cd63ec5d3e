//! Trust bundles: the CA certificates that verify SVIDs of one trust domain.

use std::time::SystemTime;

use rustls_pki_types::CertificateDer;

use crate::{SvidError, TrustDomain};

/// The CAs of one trust domain. Never empty; every member is a CA certificate.
#[derive(Clone, Debug)]
pub struct TrustBundle {
    trust_domain: TrustDomain,
    roots: Vec<CertificateDer<'static>>,
}

impl TrustBundle {
    /// Validates that `roots` is non-empty, parses, and every certificate is a CA.
    pub fn new(
        trust_domain: TrustDomain,
        roots: Vec<CertificateDer<'static>>,
    ) -> Result<Self, SvidError> {
        todo!("{trust_domain} {}", roots.len())
    }

    /// Parses PEM, then as [`TrustBundle::new`].
    pub fn from_pem(trust_domain: TrustDomain, pem: &[u8]) -> Result<Self, SvidError> {
        let roots = crate::certs_from_pem(pem).map_err(|e| SvidError::BadBundle(e.to_string()))?;
        Self::new(trust_domain, roots)
    }

    /// The bundle as concatenated PEM (the `ROOTCA` secret, `bundle.pem`).
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
        todo!()
    }
}
