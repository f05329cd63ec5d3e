//! X.509-SVIDs: a certificate chain whose leaf carries one SPIFFE ID, and its private key.

use std::fmt;
use std::time::SystemTime;

use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::{SpiffeId, SvidError, TrustBundle};

/// A validated X.509-SVID with its key. The key never appears in `Debug` output, and its bytes
/// are overwritten with zeros when the `Svid` is dropped (rustls-pki-types' `Zeroize` for
/// `PrivateKeyDer`), so a rotated-out key does not linger in freed heap memory. Copies handed
/// out with `key().clone_key()` are the caller's to wipe.
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
        let leaf = chain.first().ok_or(SvidError::EmptyChain)?;
        let (facts, leaf_spki) = crate::cert::parse(leaf.as_ref())?;
        let spiffe_id = facts.leaf_spiffe_id()?;

        // SPIFFE-ID 3.2: "the corresponding private key is retained by the entity to which the
        // SVID has been issued, and is used to prove ownership of the SVID itself." A key that
        // is not the leaf's would fail every handshake, so refuse it here.
        let signing_key = crate::tls::provider()
            .key_provider
            .load_private_key(key.clone_key())
            .map_err(|e| SvidError::BadKey(e.to_string()))?;
        let key_spki = signing_key.public_key().ok_or_else(|| {
            SvidError::BadKey("the key's public half cannot be derived".to_owned())
        })?;
        if key_spki.as_ref() != leaf_spki {
            return Err(SvidError::KeyMismatch);
        }

        Ok(Svid {
            spiffe_id,
            serial_hex: facts.serial_hex,
            not_before: facts.not_before,
            not_after: facts.not_after,
            chain,
            key,
        })
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
    /// The private key, DER in the encoding it was given in (PKCS#8 from the Trellis CA).
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
    /// The chain and the key, for a holder that needs nothing else of them. The key is then
    /// the holder's to wipe (`Zeroize`), as a copy from `key().clone_key()` would be.
    pub fn into_parts(mut self) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let chain = std::mem::take(&mut self.chain);
        // What is left for `Drop` to wipe: an empty key.
        let key = std::mem::replace(&mut self.key, PrivateKeyDer::Pkcs8(Vec::new().into()));
        (chain, key)
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

impl Svid {
    /// Overwrites the key bytes with zeros (and empties them). Called on drop.
    fn wipe_key(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.key);
    }
}

impl Drop for Svid {
    fn drop(&mut self) {
        self.wipe_key();
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testca::{LeafSpec, TestCa};

    const ID: &str = "spiffe://example.org/ns/prod/sa/web";

    #[test]
    fn builds_and_verifies() {
        let root = TestCa::root("example.org");
        let ca = root.intermediate();
        let mut spec = LeafSpec::new(ID);
        spec.serial = Some(vec![0x9a, 0xbc, 0xde]);
        let (chain, key) = ca.issue(&spec);
        let svid = Svid::new(chain.clone(), key).unwrap();
        assert_eq!(svid.spiffe_id().as_str(), ID);
        assert_eq!(svid.serial_hex(), "9abcde");
        assert_eq!(svid.chain(), chain.as_slice());
        let secs = |t: SystemTime| t.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
        assert_eq!(secs(svid.not_before()), secs(spec.not_before));
        assert_eq!(secs(svid.not_after()), secs(spec.not_after));
        svid.verify(&root.bundle(), SystemTime::now()).unwrap();
        assert!(svid
            .verify(&TestCa::root("example.org").bundle(), SystemTime::now())
            .is_err());
    }

    #[test]
    fn pem_round_trip() {
        let svid = TestCa::root("example.org").svid("/web");
        let chain_pem = crate::certs_to_pem(svid.chain());
        let key_pem = crate::key_to_pem(svid.key());
        let again = Svid::from_pem(chain_pem.as_bytes(), key_pem.as_bytes()).unwrap();
        assert_eq!(again.chain(), svid.chain());
        assert_eq!(again.key().secret_der(), svid.key().secret_der());
        assert_eq!(again.spiffe_id(), svid.spiffe_id());
    }

    #[test]
    fn rejects_key_not_matching_cert() {
        let ca = TestCa::root("example.org");
        let (chain, _) = ca.issue(&LeafSpec::new(ID));
        let (_, other_key) = ca.issue(&LeafSpec::new(ID));
        let err = Svid::new(chain, other_key).unwrap_err();
        assert!(matches!(err, SvidError::KeyMismatch), "{err:?}");
        assert_eq!(err.reason(), "bad_key");
    }

    #[test]
    fn rejects_unloadable_key() {
        let ca = TestCa::root("example.org");
        let (chain, _) = ca.issue(&LeafSpec::new(ID));
        let key = PrivateKeyDer::Pkcs8(vec![0x30, 0x03, 0x02, 0x01, 0x00].into());
        let err = Svid::new(chain, key).unwrap_err();
        assert!(matches!(err, SvidError::BadKey(_)), "{err:?}");
    }

    #[test]
    fn rejects_garbage_pem() {
        let err = Svid::from_pem(b"garbage", b"garbage").unwrap_err();
        assert!(matches!(err, SvidError::Malformed(_)), "{err:?}");
        let svid = TestCa::root("example.org").svid("/web");
        let chain_pem = crate::certs_to_pem(svid.chain());
        let err = Svid::from_pem(chain_pem.as_bytes(), b"garbage").unwrap_err();
        assert!(matches!(err, SvidError::BadKey(_)), "{err:?}");
    }

    #[test]
    fn rejects_empty_chain() {
        let svid = TestCa::root("example.org").svid("/web");
        let err = Svid::new(Vec::new(), svid.key().clone_key()).unwrap_err();
        assert!(matches!(err, SvidError::EmptyChain));
    }

    #[test]
    fn rejects_leaf_with_ca_flag() {
        // Svid::new does not run webpki: the X509-SVID rule alone must catch it.
        let ca = TestCa::root("example.org");
        let mut spec = LeafSpec::new(ID);
        spec.is_ca = true;
        let (chain, key) = ca.issue(&spec);
        assert!(matches!(Svid::new(chain, key), Err(SvidError::LeafIsCa)));
    }

    #[test]
    fn rejects_two_uri_sans() {
        let ca = TestCa::root("example.org");
        let mut spec = LeafSpec::new(ID);
        spec.uri_sans.push("spiffe://example.org/admin".to_owned());
        let (chain, key) = ca.issue(&spec);
        assert!(matches!(
            Svid::new(chain, key),
            Err(SvidError::UriSanCount(2))
        ));
    }

    #[test]
    fn key_is_wiped_on_drop() {
        let mut svid = TestCa::root("example.org").svid("/web");
        assert!(!svid.key().secret_der().is_empty());
        let clone = svid.clone();
        // Drop runs exactly this; calling it directly lets the test look at the result.
        svid.wipe_key();
        assert!(
            svid.key().secret_der().iter().all(|b| *b == 0),
            "key bytes survived"
        );
        // A clone owns its own copy.
        assert!(clone.key().secret_der().iter().any(|b| *b != 0));
    }

    #[test]
    fn debug_never_shows_the_key() {
        let svid = TestCa::root("example.org").svid("/web");
        let debug = format!("{svid:?}");
        assert!(debug.contains("spiffe://example.org/web"), "{debug}");
        assert!(!debug.contains("key"), "{debug}");
        let clone = svid.clone();
        assert_eq!(clone.key().secret_der(), svid.key().secret_der());
    }
}
