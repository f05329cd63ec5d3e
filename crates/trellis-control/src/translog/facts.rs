//! What the log records of a certificate: read from the DER the CA just produced, so the
//! entry says what the certificate says, not what the code meant to put in it.

use sha2::{Digest, Sha256};
use trellis_identity::CertificateDer;
use trellis_transparency::{CaPhaseEntry, IssuanceEntry, LogBody};
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::X509Certificate;

fn parse<'a>(der: &'a CertificateDer<'_>) -> Result<X509Certificate<'a>, String> {
    x509_parser::parse_x509_certificate(der.as_ref())
        .map(|(_, c)| c)
        .map_err(|e| format!("cannot parse the certificate to log: {e}"))
}

/// The log body of an issued SVID leaf, admitted by `attestor`.
pub fn issuance_body(leaf: &CertificateDer<'_>, attestor: &str) -> Result<LogBody, String> {
    let cert = parse(leaf)?;
    let mut spiffe_id = None;
    let mut issuer_key_id = Vec::new();
    for ext in cert.extensions() {
        match ext.parsed_extension() {
            ParsedExtension::SubjectAlternativeName(san) => {
                spiffe_id = san.general_names.iter().find_map(|n| match n {
                    GeneralName::URI(uri) if uri.starts_with("spiffe://") => Some(uri.to_string()),
                    _ => None,
                });
            }
            ParsedExtension::AuthorityKeyIdentifier(aki) => {
                if let Some(id) = &aki.key_identifier {
                    issuer_key_id = id.0.to_vec();
                }
            }
            _ => {}
        }
    }
    Ok(LogBody::Issuance(IssuanceEntry {
        serial: cert.raw_serial().to_vec(),
        spiffe_id: spiffe_id.ok_or("the certificate to log has no spiffe:// URI SAN")?,
        public_key_sha256: Sha256::digest(cert.public_key().raw).into(),
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
        issuer_key_id,
        attestation: attestor.to_owned(),
    }))
}

/// The log body of a CA entering `phase`.
pub fn ca_phase_body(ca: &CertificateDer<'_>, phase: &str) -> Result<LogBody, String> {
    let cert = parse(ca)?;
    let ca_key_id = cert
        .extensions()
        .iter()
        .find_map(|ext| match ext.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(id) => Some(id.0.to_vec()),
            _ => None,
        })
        .unwrap_or_default();
    Ok(LogBody::CaPhase(CaPhaseEntry {
        ca_sha256: Sha256::digest(ca.as_ref()).into(),
        ca_key_id,
        phase: phase.to_owned(),
    }))
}
