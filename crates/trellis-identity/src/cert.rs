//! Facts read from one X.509 certificate (x509-parser), for logs, metrics and checks.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls_pki_types::CertificateDer;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;

use crate::{IdError, SpiffeId, SvidError};

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
    /// keyUsage asserts keyCertSign or cRLSign (the key may sign certificates or CRLs).
    pub can_sign_certs: bool,
    /// Subject DN, RFC 4514-ish, for display.
    pub subject: String,
    /// Issuer DN, same form: tells which CA of a rotation signed it.
    pub issuer: String,
}

impl CertFacts {
    /// X509-SVID rules for a leaf: not a CA, no signing key usage, exactly one URI SAN, and that
    /// SAN a valid SPIFFE ID with a path.
    pub fn leaf_spiffe_id(&self) -> Result<SpiffeId, SvidError> {
        // X509-SVID 5.2: "the validator MUST ensure that the `CA` field in the basic constraints
        // extension is set to `false`, and that `keyCertSign` and `cRLSign` are not set in the
        // key usage extension."
        if self.is_ca {
            return Err(SvidError::LeafIsCa);
        }
        if self.can_sign_certs {
            return Err(SvidError::LeafCanSign);
        }
        // X509-SVID 2: "An X.509 SVID MUST contain exactly one URI SAN, and by extension, exactly
        // one SPIFFE ID." ... "Validators encountering an SVID containing more than one URI SAN
        // MUST reject the SVID."
        let [uri] = self.uri_sans.as_slice() else {
            return Err(SvidError::UriSanCount(self.uri_sans.len()));
        };
        // X509-SVID 5.2: "The validator must also ensure that the scheme of the SPIFFE ID is set
        // to `spiffe`." (SpiffeId::parse enforces `spiffe://` and the rest of SPIFFE-ID 2.)
        let id = SpiffeId::parse(uri)?;
        // X509-SVID 3.1: "Leaf certificate SPIFFE IDs MUST have a non-root path component."
        if id.path().is_empty() {
            return Err(IdError::Invalid {
                input: id.to_string(),
                reason: "a leaf SVID's SPIFFE ID must have a path (this is a trust domain ID)"
                    .to_owned(),
            }
            .into());
        }
        Ok(id)
    }
}

/// Parses `der` and returns its facts.
pub fn cert_facts(der: &CertificateDer<'_>) -> Result<CertFacts, SvidError> {
    parse(der.as_ref()).map(|(facts, _spki)| facts)
}

/// The facts and the DER SubjectPublicKeyInfo, borrowed from `der`.
pub(crate) fn parse(der: &[u8]) -> Result<(CertFacts, &[u8]), SvidError> {
    let malformed = |e: &dyn std::fmt::Display| SvidError::Malformed(e.to_string());
    let (rest, cert) = X509Certificate::from_der(der).map_err(|e| malformed(&e))?;
    if !rest.is_empty() {
        return Err(SvidError::Malformed(format!(
            "{} bytes of trailing data after the certificate",
            rest.len()
        )));
    }

    // x509-parser's `is_ca()` treats a broken or duplicated basicConstraints as "not a CA";
    // here that is an error instead.
    let is_ca = cert
        .basic_constraints()
        .map_err(|e| malformed(&e))?
        .is_some_and(|bc| bc.value.ca);
    let can_sign_certs = cert
        .key_usage()
        .map_err(|e| malformed(&e))?
        .is_some_and(|ku| ku.value.key_cert_sign() || ku.value.crl_sign());
    let uri_sans = match cert.subject_alternative_name().map_err(|e| malformed(&e))? {
        Some(san) => san
            .value
            .general_names
            .iter()
            .filter_map(|name| match name {
                GeneralName::URI(uri) => Some((*uri).to_owned()),
                _ => None,
            })
            .collect(),
        None => Vec::new(),
    };

    let validity = cert.validity();
    let not_before = system_time(validity.not_before.timestamp())
        .ok_or_else(|| SvidError::Malformed("notBefore is out of range".to_owned()))?;
    let not_after = system_time(validity.not_after.timestamp())
        .ok_or_else(|| SvidError::Malformed("notAfter is out of range".to_owned()))?;

    let facts = CertFacts {
        uri_sans,
        serial_hex: serial_hex(cert.tbs_certificate.raw_serial()),
        not_before,
        not_after,
        is_ca,
        can_sign_certs,
        subject: cert.subject().to_string(),
        issuer: cert.issuer().to_string(),
    };
    Ok((facts, cert.tbs_certificate.subject_pki.raw))
}

/// The serial's magnitude as lowercase hex: DER prefixes a 00 byte to positive integers whose
/// top bit is set; that byte is an encoding detail, not part of the number.
fn serial_hex(raw: &[u8]) -> String {
    let mut bytes = raw;
    while let [0, rest @ ..] = bytes {
        if rest.is_empty() {
            break;
        }
        bytes = rest;
    }
    hex::encode(bytes)
}

fn system_time(unix_secs: i64) -> Option<SystemTime> {
    let magnitude = Duration::from_secs(unix_secs.unsigned_abs());
    if unix_secs >= 0 {
        UNIX_EPOCH.checked_add(magnitude)
    } else {
        UNIX_EPOCH.checked_sub(magnitude)
    }
}

/// notBefore and notAfter of the certificate `der` in unix seconds; `None` if it does not
/// parse.
pub(crate) fn validity_secs(der: &[u8]) -> Option<(i64, i64)> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let validity = cert.validity();
    Some((
        validity.not_before.timestamp(),
        validity.not_after.timestamp(),
    ))
}

/// `t` as unix seconds (negative before 1970, saturating), as reports and error messages
/// show certificate times.
pub fn unix_secs(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => i64::try_from(e.duration().as_secs()).map_or(i64::MIN, |s| -s),
    }
}

/// SHA-256 of the DER certificate, lowercase hex (the XFCC `Hash=` value).
pub fn leaf_sha256_hex(der: &CertificateDer<'_>) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(der.as_ref()))
}

/// SHA-256 of the certificate's SubjectPublicKeyInfo (DER): what the issuance transparency
/// log records as the certified key.
pub fn spki_sha256(der: &CertificateDer<'_>) -> Result<[u8; 32], SvidError> {
    use sha2::Digest;
    let (_, spki) = parse(der.as_ref())?;
    Ok(sha2::Sha256::digest(spki).into())
}

/// `unix` seconds as RFC 3339 UTC (`2026-01-31T12:00:00Z`). Hand-rolled because a peer's
/// certificate may carry any date from year 0 to 9999, which must print, never panic.
pub fn rfc3339(unix: i64) -> String {
    // X.509 times span years 0000..=9999.
    let unix = unix.clamp(-62_167_219_200, 253_402_300_799);
    let days = unix.div_euclid(86_400);
    let secs = unix.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

/// Howard Hinnant's `civil_from_days`: days since 1970-01-01 to (year, month, day).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    use super::*;
    use crate::testca::{LeafSpec, TestCa};

    const ID: &str = "spiffe://example.org/ns/prod/sa/web";

    fn leaf_facts(spec: &LeafSpec) -> CertFacts {
        let ca = TestCa::root("example.org");
        let (chain, _key) = ca.issue(spec);
        cert_facts(&chain[0]).unwrap()
    }

    fn secs(t: SystemTime) -> u64 {
        t.duration_since(UNIX_EPOCH).unwrap().as_secs()
    }

    #[test]
    fn reads_leaf_facts() {
        let spec = LeafSpec::new(ID);
        let facts = leaf_facts(&spec);
        assert_eq!(facts.uri_sans, vec![ID.to_owned()]);
        assert!(!facts.is_ca);
        assert!(!facts.can_sign_certs);
        assert_eq!(secs(facts.not_before), secs(spec.not_before));
        assert_eq!(secs(facts.not_after), secs(spec.not_after));
        assert!(
            facts.subject.contains("Trellis test workload"),
            "{}",
            facts.subject
        );
        assert_eq!(facts.leaf_spiffe_id().unwrap().as_str(), ID);
    }

    #[test]
    fn reads_ca_facts() {
        let ca = TestCa::root("example.org");
        let facts = cert_facts(ca.cert()).unwrap();
        assert!(facts.is_ca);
        assert!(facts.can_sign_certs);
        assert_eq!(facts.uri_sans, vec!["spiffe://example.org".to_owned()]);
    }

    #[test]
    fn serial_hex_matches_rcgen() {
        for serial in [
            vec![0x8f, 0x01, 0xab, 0xcd], // top bit set: DER adds a 00 byte
            vec![0x12, 0x34, 0x56],       // no padding needed
            vec![0x01],                   // one byte
            vec![0x7f; 20],               // RFC 5280's maximum length
        ] {
            let mut spec = LeafSpec::new(ID);
            spec.serial = Some(serial.clone());
            assert_eq!(leaf_facts(&spec).serial_hex, hex::encode(&serial));
        }
    }

    #[test]
    fn serial_hex_strips_der_sign_byte() {
        assert_eq!(serial_hex(&[0x00, 0x8f, 0x01]), "8f01");
        assert_eq!(serial_hex(&[0x00]), "00");
        assert_eq!(serial_hex(&[0x01, 0x00]), "0100");
    }

    #[test]
    fn rejects_two_uri_sans() {
        let mut spec = LeafSpec::new(ID);
        spec.uri_sans
            .push("spiffe://example.org/ns/prod/sa/admin".to_owned());
        assert!(matches!(
            leaf_facts(&spec).leaf_spiffe_id(),
            Err(SvidError::UriSanCount(2))
        ));
    }

    #[test]
    fn rejects_leaf_without_uri_san() {
        let mut spec = LeafSpec::new(ID);
        spec.uri_sans.clear();
        assert!(matches!(
            leaf_facts(&spec).leaf_spiffe_id(),
            Err(SvidError::UriSanCount(0))
        ));
    }

    #[test]
    fn rejects_leaf_with_ca_flag() {
        let mut spec = LeafSpec::new(ID);
        spec.is_ca = true;
        let err = leaf_facts(&spec).leaf_spiffe_id().unwrap_err();
        assert!(matches!(err, SvidError::LeafIsCa), "{err:?}");
        assert_eq!(err.reason(), "not_svid");
    }

    #[test]
    fn rejects_leaf_with_key_cert_sign() {
        let mut spec = LeafSpec::new(ID);
        spec.key_cert_sign = true;
        assert!(matches!(
            leaf_facts(&spec).leaf_spiffe_id(),
            Err(SvidError::LeafCanSign)
        ));
    }

    #[test]
    fn rejects_leaf_with_trust_domain_id() {
        let facts = leaf_facts(&LeafSpec::new("spiffe://example.org"));
        let err = facts.leaf_spiffe_id().unwrap_err();
        assert!(
            matches!(err, SvidError::BadId(IdError::Invalid { .. })),
            "{err:?}"
        );
        assert!(err.to_string().contains("must have a path"));
    }

    #[test]
    fn rejects_leaf_with_invalid_spiffe_id() {
        let facts = leaf_facts(&LeafSpec::new("spiffe://Example.org/web"));
        assert!(matches!(
            facts.leaf_spiffe_id(),
            Err(SvidError::BadId(IdError::Invalid { .. }))
        ));
        let facts = leaf_facts(&LeafSpec::new("https://example.org/web"));
        assert!(matches!(facts.leaf_spiffe_id(), Err(SvidError::BadId(_))));
    }

    #[test]
    fn rejects_garbage_der() {
        let err = cert_facts(&CertificateDer::from(vec![0x30, 0x03, 0x01, 0x02])).unwrap_err();
        assert!(matches!(err, SvidError::Malformed(_)), "{err:?}");
        assert!(cert_facts(&CertificateDer::from(Vec::new())).is_err());
    }

    #[test]
    fn rejects_trailing_data() {
        let ca = TestCa::root("example.org");
        let mut der = ca.cert().to_vec();
        der.push(0);
        let err = cert_facts(&CertificateDer::from(der)).unwrap_err();
        assert!(err.to_string().contains("trailing"), "{err}");
    }

    #[test]
    fn unix_secs_both_sides_of_epoch() {
        assert_eq!(unix_secs(UNIX_EPOCH + Duration::from_secs(5)), 5);
        assert_eq!(unix_secs(UNIX_EPOCH - Duration::from_secs(5)), -5);
        assert_eq!(system_time(-5), Some(UNIX_EPOCH - Duration::from_secs(5)));
    }

    #[test]
    fn sha256_is_lowercase_hex_of_der() {
        let hash = leaf_sha256_hex(&CertificateDer::from(b"abc".to_vec()));
        assert_eq!(
            hash,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn formats_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_767_225_599), "2025-12-31T23:59:59Z");
        assert_eq!(rfc3339(-1), "1969-12-31T23:59:59Z");
        assert_eq!(rfc3339(i64::MAX), "9999-12-31T23:59:59Z");
        assert_eq!(rfc3339(i64::MIN), "0000-01-01T00:00:00Z");
    }
}
