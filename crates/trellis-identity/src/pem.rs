//! PEM <-> DER, through rustls-pki-types' `PemObject` (rustls-pemfile is unmaintained).

use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use zeroize::Zeroizing;

use crate::PemError;

/// All `CERTIFICATE` blocks in `pem`, in order. Errors if there are none.
pub fn certs_from_pem(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, PemError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(e, "CERTIFICATE"))?;
    if certs.is_empty() {
        return Err(PemError::Missing {
            what: "CERTIFICATE",
        });
    }
    Ok(certs)
}

/// The first private key (PKCS#8, SEC1 or PKCS#1) in `pem`.
pub fn key_from_pem(pem: &[u8]) -> Result<PrivateKeyDer<'static>, PemError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| pem_error(e, "PRIVATE KEY"))
}

/// Certificates as concatenated `CERTIFICATE` PEM blocks.
pub fn certs_to_pem(certs: &[CertificateDer<'_>]) -> String {
    let mut out = String::with_capacity(certs.iter().map(|c| pem_len("CERTIFICATE", c)).sum());
    for cert in certs {
        write_pem(&mut out, "CERTIFICATE", cert);
    }
    out
}

/// A private key as a PEM block; zeroized when dropped.
pub fn key_to_pem(key: &PrivateKeyDer<'_>) -> Zeroizing<String> {
    let label = match key {
        PrivateKeyDer::Pkcs1(_) => "RSA PRIVATE KEY",
        PrivateKeyDer::Sec1(_) => "EC PRIVATE KEY",
        // PKCS#8, and any encoding rustls-pki-types adds later (they are all PKCS#8-shaped).
        _ => "PRIVATE KEY",
    };
    let der = key.secret_der();
    // Sized exactly so the String never reallocates and leaves a copy of the key behind.
    let mut out = Zeroizing::new(String::with_capacity(pem_len(label, der)));
    write_pem(&mut out, label, der);
    out
}

fn pem_error(e: pem::Error, what: &'static str) -> PemError {
    match e {
        pem::Error::NoItemsFound => PemError::Missing { what },
        other => PemError::Malformed(other.to_string()),
    }
}

const LINE_BYTES: usize = 48; // 48 input bytes = 64 base64 characters per line
const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Exact length of the PEM block `write_pem` produces.
fn pem_len(label: &str, der: &[u8]) -> usize {
    let b64 = der.len().div_ceil(3) * 4;
    let lines = der.len().div_ceil(LINE_BYTES);
    "-----BEGIN -----\n".len() + "-----END -----\n".len() + 2 * label.len() + b64 + lines
}

/// Appends an RFC 7468 block: base64 in 64-column lines between BEGIN/END markers.
fn write_pem(out: &mut String, label: &str, der: &[u8]) {
    out.push_str("-----BEGIN ");
    out.push_str(label);
    out.push_str("-----\n");
    for line in der.chunks(LINE_BYTES) {
        for group in line.chunks(3) {
            let b = [
                group[0],
                group.get(1).copied().unwrap_or(0),
                group.get(2).copied().unwrap_or(0),
            ];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for (i, shift) in [18u32, 12, 6, 0].into_iter().enumerate() {
                // A group of k bytes yields k + 1 characters, padded with `=` to four.
                if i <= group.len() {
                    out.push(char::from(B64[((n >> shift) & 0x3f) as usize]));
                } else {
                    out.push('=');
                }
            }
        }
        out.push('\n');
    }
    out.push_str("-----END ");
    out.push_str(label);
    out.push_str("-----\n");
}

#[cfg(test)]
mod tests {
    use rustls_pki_types::{PrivatePkcs8KeyDer, PrivateSec1KeyDer};

    use super::*;

    fn rcgen_cert() -> (rcgen::Certificate, rcgen::KeyPair) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["a.test".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        (cert, key)
    }

    #[test]
    fn cert_pem_round_trip_matches_rcgen() {
        let (a, _) = rcgen_cert();
        let (b, _) = rcgen_cert();
        let pem = certs_to_pem(&[a.der().clone(), b.der().clone()]);
        // Byte-for-byte what rcgen (the `pem` crate) writes: 64 columns, LF.
        assert_eq!(pem, format!("{}{}", a.pem(), b.pem()));
        assert!(pem.lines().all(|l| l.len() <= 64));
        let back = certs_from_pem(pem.as_bytes()).unwrap();
        assert_eq!(back, vec![a.der().clone(), b.der().clone()]);
    }

    #[test]
    fn key_pem_round_trip_matches_rcgen() {
        let (_, key) = rcgen_cert();
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let pem = key_to_pem(&der);
        assert_eq!(pem.as_str(), key.serialize_pem());
        assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----\n"));
        assert_eq!(key_from_pem(pem.as_bytes()).unwrap(), der);
    }

    #[test]
    fn sec1_key_keeps_its_label() {
        let der = PrivateKeyDer::Sec1(PrivateSec1KeyDer::from(vec![1, 2, 3, 4, 5]));
        let pem = key_to_pem(&der);
        assert_eq!(
            pem.as_str(),
            "-----BEGIN EC PRIVATE KEY-----\nAQIDBAU=\n-----END EC PRIVATE KEY-----\n"
        );
        assert_eq!(key_from_pem(pem.as_bytes()).unwrap(), der);
    }

    #[test]
    fn base64_lines_for_every_length() {
        // Every padding case and line boundary, checked against rustls-pki-types' decoder.
        for len in 0..200usize {
            let der: Vec<u8> = (0..len).map(|i| (i * 37 + len) as u8).collect();
            let mut pem = String::new();
            write_pem(&mut pem, "CERTIFICATE", &der);
            assert_eq!(pem.len(), pem_len("CERTIFICATE", &der), "length {len}");
            assert!(pem.lines().all(|l| l.len() <= 64));
            if len > 0 {
                let back = certs_from_pem(pem.as_bytes()).unwrap();
                assert_eq!(back[0].as_ref(), der.as_slice(), "length {len}");
            }
        }
    }

    #[test]
    fn rejects_garbage_pem() {
        assert!(matches!(
            certs_from_pem(b"this is not PEM at all"),
            Err(PemError::Missing {
                what: "CERTIFICATE"
            })
        ));
        assert!(matches!(
            certs_from_pem(
                b"-----BEGIN CERTIFICATE-----\n!!!not base64!!!\n-----END CERTIFICATE-----\n"
            ),
            Err(PemError::Malformed(_))
        ));
        assert!(matches!(
            certs_from_pem(b"-----BEGIN CERTIFICATE-----\nAQID\n"),
            Err(PemError::Malformed(_))
        ));
        assert!(matches!(
            key_from_pem(b"\x00\xff\x13garbage"),
            Err(PemError::Missing {
                what: "PRIVATE KEY"
            })
        ));
    }

    #[test]
    fn rejects_empty_pem() {
        assert!(matches!(certs_from_pem(b""), Err(PemError::Missing { .. })));
        assert!(matches!(key_from_pem(b""), Err(PemError::Missing { .. })));
    }

    #[test]
    fn key_pem_is_not_a_certificate() {
        let (_, key) = rcgen_cert();
        assert!(matches!(
            certs_from_pem(key.serialize_pem().as_bytes()),
            Err(PemError::Missing { .. })
        ));
        let (cert, _) = rcgen_cert();
        assert!(matches!(
            key_from_pem(cert.pem().as_bytes()),
            Err(PemError::Missing { .. })
        ));
    }
}
