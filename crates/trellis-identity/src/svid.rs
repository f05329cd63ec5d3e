//! X.509-SVIDs: a certificate chain whose leaf carries one SPIFFE ID, and its private key.

use std::fmt;
use std::time::SystemTime;

use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::{SpiffeId, SvidError, TrustBundle};

/// A validated X.509-SVID with its key. The key never appears in `Debug` output.
pub struct Svid {
    spiffe_id: SpiffeId,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    serial_hex: String,
    not_before: SystemTime,
    not_after: SystemTime,
}

impl Svid {
    /// Checks the leaf against the X509-SVID rules and that `key` matches its public key.
    /// Does not check the chain against a bundle: see [`Svid::verify`].
    pub fn new(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<Self, SvidError> {
        todo!("{} {}", chain.len(), key.secret_der().len())
    }

    /// Parses PEM chain and key, then as [`Svid::new`].
    pub fn from_pem(chain_pem: &[u8], key_pem: &[u8]) -> Result<Self, SvidError> {
        let chain =
            crate::certs_from_pem(chain_pem).map_err(|e| SvidError::Malformed(e.to_string()))?;
        let key = crate::key_from_pem(key_pem).map_err(|e| SvidError::BadKey(e.to_string()))?;
        Self::new(chain, key)
    }

    /// Verifies the chain against `bundle` at `now` (validity window, issuer, trust domain).
    pub fn verify(&self, bundle: &TrustBundle, now: SystemTime) -> Result<(), SvidError> {
        crate::verify_svid_chain(&self.chain, bundle, now, crate::Usage::Either).map(|_| ())
    }

    /// The SPIFFE ID in the leaf's URI SAN.
    pub fn spiffe_id(&self) -> &SpiffeId {
        &self.spiffe_id
    }
    /// Leaf first, then intermediates.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }
    /// The private key (PKCS#8 DER).
    pub fn key(&self) -> &PrivateKeyDer<'static> {
        &self.key
    }
    /// The leaf's serial, lowercase hex.
    pub fn serial_hex(&self) -> &str {
        &self.serial_hex
    }
    /// The leaf's notBefore.
    pub fn not_before(&self) -> SystemTime {
        self.not_before
    }
    /// The leaf's notAfter.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }
}

impl Clone for Svid {
    fn clone(&self) -> Self {
        Svid {
            spiffe_id: self.spiffe_id.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            serial_hex: self.serial_hex.clone(),
            not_before: self.not_before,
            not_after: self.not_after,
        }
    }
}

impl fmt::Debug for Svid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Svid")
            .field("spiffe_id", &self.spiffe_id)
            .field("serial", &self.serial_hex)
            .field("not_after", &self.not_after)
            .field("chain_len", &self.chain.len())
            .finish_non_exhaustive()
    }
}
