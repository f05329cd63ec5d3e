//! Facts read from one X.509 certificate (x509-parser), for logs, metrics and checks.

use std::time::SystemTime;

use rustls_pki_types::CertificateDer;

use crate::{SpiffeId, SvidError};

/// What Trellis needs to know about a certificate, read once.
#[derive(Debug, Clone)]
pub struct CertFacts {
    /// The URI SANs, as written.
    pub uri_sans: Vec<String>,
    /// Serial number, lowercase hex without separators.
    pub serial_hex: String,
    /// notBefore.
    pub not_before: SystemTime,
    /// notAfter.
    pub not_after: SystemTime,
    /// basicConstraints CA flag.
    pub is_ca: bool,
    /// Subject DN, RFC 4514-ish, for display.
    pub subject: String,
}

impl CertFacts {
    /// X509-SVID rules for a leaf: exactly one URI SAN, a valid SPIFFE ID, not a CA.
    pub fn leaf_spiffe_id(&self) -> Result<SpiffeId, SvidError> {
        if self.is_ca {
            return Err(SvidError::LeafIsCa);
        }
        if self.uri_sans.len() != 1 {
            return Err(SvidError::UriSanCount(self.uri_sans.len()));
        }
        Ok(SpiffeId::parse(&self.uri_sans[0])?)
    }
}

/// Parses `der` and returns its facts.
pub fn cert_facts(der: &CertificateDer<'_>) -> Result<CertFacts, SvidError> {
    todo!("{}", der.len())
}

/// SHA-256 of the DER certificate, lowercase hex (the XFCC `Hash=` value).
pub fn leaf_sha256_hex(der: &CertificateDer<'_>) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(der.as_ref()))
}
