//! The control plane's signing keys, wherever they live: one type, [`SigningKey`], for the CA
//! key, the transparency-log key (and any later ECDSA P-256 key, such as a JWT-SVID key).
//!
//! Three sources, one interface:
//! - a PEM file the operator gives (`--ca-key PATH`);
//! - the state database (the embedded default CA and the log key);
//! - a PKCS#11 token (`--ca-key 'pkcs11:token=…;object=…'`, RFC 7512), where the private key
//!   never leaves the token: this process only asks the token to sign digests ([`pkcs11`]).
//!
//! A caller signs bytes and gets an ECDSA signature in the encoding it needs:
//! [`SigningKey::sign_der`] (ASN.1 DER, as X.509 and the transparency log use) or
//! [`SigningKey::sign_fixed`] (`r || s`, 64 bytes, as JWS ES256 uses).

mod error;
pub mod pkcs11;
pub(crate) mod secret_file;
mod sig;
mod uri;

use std::path::PathBuf;
use std::sync::Arc;

use rcgen::KeyPair;
use zeroize::Zeroize as _;

pub use error::KeyError;
pub use pkcs11::{Pkcs11Keyring, Pkcs11Settings, TokenKey};
pub use sig::{der_to_fixed, fixed_to_der};
pub use uri::Pkcs11Uri;

/// Where an operator says a signing key lives: a PEM file or a PKCS#11 URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyRef {
    /// A PEM file (PKCS#8).
    File(PathBuf),
    /// A key in a PKCS#11 token.
    Pkcs11(Pkcs11Uri),
}

impl KeyRef {
    /// `pkcs11:…` is a token key (RFC 7512); anything else is a file path.
    pub fn parse(s: &str) -> Result<Self, KeyError> {
        if Pkcs11Uri::is_uri(s) {
            Ok(Self::Pkcs11(Pkcs11Uri::parse(s)?))
        } else {
            Ok(Self::File(PathBuf::from(s)))
        }
    }
}

impl std::fmt::Display for KeyRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::File(p) => write!(f, "{}", p.display()),
            Self::Pkcs11(u) => write!(f, "{u}"),
        }
    }
}

/// Opens the keys operators name: files and stored PEM always, PKCS#11 URIs when a module
/// is configured. Cheap to clone; every clone shares the token sessions.
#[derive(Clone, Default)]
pub struct Keyring {
    pkcs11: Option<Arc<Pkcs11Keyring>>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyring")
            .field(
                "pkcs11",
                &self.pkcs11.as_ref().map(|k| k.module().to_owned()),
            )
            .finish()
    }
}

impl Keyring {
    /// A keyring that also opens keys of the PKCS#11 module in `pkcs11`.
    pub fn with_pkcs11(pkcs11: Arc<Pkcs11Keyring>) -> Self {
        Self {
            pkcs11: Some(pkcs11),
        }
    }

    /// The PKCS#11 keyring, if a module is configured.
    pub fn pkcs11(&self) -> Option<&Arc<Pkcs11Keyring>> {
        self.pkcs11.as_ref()
    }

    /// The token key `uri` names.
    pub fn token_key(&self, uri: &Pkcs11Uri) -> Result<SigningKey, KeyError> {
        let ring = self.pkcs11.as_ref().ok_or_else(|| KeyError::NoModule {
            uri: uri.to_string(),
        })?;
        Ok(SigningKey::token(ring.key(uri)?))
    }

    /// A key as the database stores it: a PKCS#11 URI (the key stays in the token) or a
    /// PEM private key.
    pub fn stored(&self, text: &str) -> Result<SigningKey, KeyError> {
        let trimmed = text.trim();
        if Pkcs11Uri::is_uri(trimmed) {
            self.token_key(&Pkcs11Uri::parse(trimmed)?)
        } else {
            let pair = KeyPair::from_pem(text).map_err(|e| KeyError::Software(e.to_string()))?;
            Ok(SigningKey::memory(pair))
        }
    }
}

/// A signing key: in memory (read from a file or the database) or held by a PKCS#11 token.
/// Implements rcgen's [`rcgen::SigningKey`], so certificates are signed the same way either
/// way.
pub struct SigningKey {
    inner: Inner,
}

enum Inner {
    /// rcgen keeps a PKCS#8 copy, wiped on drop (aws-lc-rs' own copy is beyond our reach).
    Memory(KeyPair),
    Token(TokenKey),
}

impl Drop for SigningKey {
    fn drop(&mut self) {
        if let Inner::Memory(k) = &mut self.inner {
            k.zeroize();
        }
    }
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key itself.
        f.debug_struct("SigningKey")
            .field("source", &self.source())
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    /// A key held in this process's memory.
    pub fn memory(pair: KeyPair) -> Self {
        Self {
            inner: Inner::Memory(pair),
        }
    }

    /// A key held by a PKCS#11 token.
    pub fn token(key: TokenKey) -> Self {
        Self {
            inner: Inner::Token(key),
        }
    }

    /// An in-memory key from PKCS#8 DER.
    pub fn from_pkcs8_der(der: &[u8]) -> Result<Self, KeyError> {
        let pkcs8 = rustls::pki_types::PrivatePkcs8KeyDer::from(der);
        let pair = KeyPair::try_from(&rustls::pki_types::PrivateKeyDer::Pkcs8(pkcs8))
            .map_err(|e| KeyError::Software(e.to_string()))?;
        Ok(Self::memory(pair))
    }

    /// Whether the private key lives outside this process (in a token).
    pub fn is_token(&self) -> bool {
        matches!(self.inner, Inner::Token(_))
    }

    /// Where the key lives, for logs: `memory` or the PKCS#11 URI.
    pub fn source(&self) -> String {
        match &self.inner {
            Inner::Memory(_) => "memory".into(),
            Inner::Token(t) => t.uri().to_string(),
        }
    }

    /// The public key as X.509 carries it in the subjectPublicKey BIT STRING (for ECDSA the
    /// uncompressed point).
    pub fn public_key_raw(&self) -> &[u8] {
        match &self.inner {
            Inner::Memory(k) => k.public_key_raw(),
            Inner::Token(t) => t.public_point(),
        }
    }

    /// The SubjectPublicKeyInfo, DER.
    pub fn spki_der(&self) -> Vec<u8> {
        rcgen::PublicKeyData::subject_public_key_info(self)
    }

    /// Signs `msg` (hashed here with the key's hash): ECDSA signature, ASN.1 DER.
    pub fn sign_der(&self, msg: &[u8]) -> Result<Vec<u8>, KeyError> {
        match &self.inner {
            Inner::Memory(k) => {
                rcgen::SigningKey::sign(k, msg).map_err(|e| KeyError::Software(e.to_string()))
            }
            Inner::Token(t) => Ok(fixed_to_der(&t.sign_sha256(msg)?)),
        }
    }

    /// Signs `msg` with ECDSA P-256/SHA-256: `r || s`, 64 bytes (JWS ES256).
    pub fn sign_fixed(&self, msg: &[u8]) -> Result<[u8; 64], KeyError> {
        match &self.inner {
            Inner::Memory(k) => {
                if k.algorithm() != &rcgen::PKCS_ECDSA_P256_SHA256 {
                    return Err(KeyError::Software(
                        "fixed-size signatures need an ECDSA P-256 key".into(),
                    ));
                }
                der_to_fixed(&self.sign_der(msg)?)
                    .ok_or_else(|| KeyError::Software("malformed ECDSA signature".into()))
            }
            Inner::Token(t) => t.sign_sha256(msg),
        }
    }
}

impl rcgen::PublicKeyData for SigningKey {
    fn der_bytes(&self) -> &[u8] {
        self.public_key_raw()
    }
    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        match &self.inner {
            Inner::Memory(k) => k.algorithm(),
            Inner::Token(_) => &rcgen::PKCS_ECDSA_P256_SHA256,
        }
    }
}

impl rcgen::SigningKey for SigningKey {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        // rcgen has no variant for a remote signer's failure; RemoteKeyError is the one it
        // reserves for keys it does not hold. The cause is logged here, where it is known.
        self.sign_der(msg).map_err(|e| {
            tracing::error!(key = %self.source(), error = %e, "signing failed");
            rcgen::Error::RemoteKeyError
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use aws_lc_rs::signature::{
        UnparsedPublicKey, ECDSA_P256_SHA256_ASN1, ECDSA_P256_SHA256_FIXED,
    };

    /// `key` signs `msg` verifiably with its public key, DER (X.509) and fixed (JWS) alike.
    pub(super) fn assert_signs_in_both_encodings(key: &SigningKey, msg: &[u8]) {
        let der = key.sign_der(msg).unwrap();
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, key.public_key_raw())
            .verify(msg, &der)
            .unwrap();
        let fixed = key.sign_fixed(msg).unwrap();
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, key.public_key_raw())
            .verify(msg, &fixed)
            .unwrap();
    }

    #[test]
    fn memory_key_signs_in_both_encodings() {
        let key =
            SigningKey::memory(KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap());
        assert_signs_in_both_encodings(&key, b"tree head");
        assert!(!key.is_token());
        assert_eq!(key.source(), "memory");
    }

    #[test]
    fn key_ref_tells_uris_from_paths() {
        assert_eq!(
            KeyRef::parse("/etc/trellis/key.pem").unwrap(),
            KeyRef::File("/etc/trellis/key.pem".into())
        );
        assert!(matches!(
            KeyRef::parse("pkcs11:token=t;object=o").unwrap(),
            KeyRef::Pkcs11(_)
        ));
    }

    #[test]
    fn token_uri_without_module_names_the_flags() {
        let err = Keyring::default()
            .stored("pkcs11:token=hsm;object=ca")
            .unwrap_err()
            .to_string();
        assert!(err.contains("--pkcs11-module"), "{err}");
    }
}

#[cfg(test)]
mod softhsm_tests;
