//! PEM <-> DER, through rustls-pki-types' `PemObject` (rustls-pemfile is unmaintained).

use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use zeroize::Zeroizing;

use crate::PemError;

/// All `CERTIFICATE` blocks in `pem`, in order. Errors if there are none.
pub fn certs_from_pem(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, PemError> {
    todo!("{}", pem.len())
}

/// The first private key (PKCS#8, SEC1 or PKCS#1) in `pem`.
pub fn key_from_pem(pem: &[u8]) -> Result<PrivateKeyDer<'static>, PemError> {
    todo!("{}", pem.len())
}

/// Certificates as concatenated `CERTIFICATE` PEM blocks.
pub fn certs_to_pem(certs: &[CertificateDer<'_>]) -> String {
    todo!("{}", certs.len())
}

/// A private key as a PEM block; zeroized when dropped.
pub fn key_to_pem(key: &PrivateKeyDer<'_>) -> Zeroizing<String> {
    todo!("{:?}", key.secret_der().len())
}
