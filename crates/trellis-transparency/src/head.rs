//! Tree heads and their signatures. A signed head is the log's promise: "these were my
//! first `tree_size` entries at `timestamp_ms`, and this is their root". Two signed heads
//! for one size with different roots are proof of a fork, with the log's own signature on
//! both.

use aws_lc_rs::signature::{UnparsedPublicKey, ECDSA_P256_SHA256_ASN1};
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::hash::Hash;

/// What a signature covers, before the head's fields: binds it to this log format so a
/// signature made for anything else with the same key can never pass as a head.
const SIGNING_CONTEXT: &[u8] = b"trellis-log-tree-head-v1\0";

/// DER prefix of a P-256 SubjectPublicKeyInfo with an uncompressed point: fixed, so a key
/// of any other shape is refused rather than half-understood.
const P256_SPKI_PREFIX: [u8; 27] = [
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00, 0x04,
];

/// Why a head or key was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    /// The key is not an ECDSA P-256 public key.
    #[error("the log key is not an ECDSA P-256 public key (SubjectPublicKeyInfo)")]
    NotP256,
    /// The PEM text holds no public key.
    #[error("no PUBLIC KEY block in the log key PEM")]
    NoPem,
    /// The head names a different signing key.
    #[error("the head was signed by key {got}, not the log key {want}")]
    OtherKey {
        /// Key id in the head.
        got: String,
        /// Key id of the key it was checked with.
        want: String,
    },
    /// The signature does not verify.
    #[error("the head's signature does not verify with the log key")]
    BadSignature,
}

/// An unsigned tree head.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TreeHead {
    /// Number of entries the head covers.
    pub tree_size: u64,
    /// Root of the tree of those entries.
    #[serde(with = "b64_hash")]
    pub root_hash: Hash,
    /// When the head was produced, Unix milliseconds.
    pub timestamp_ms: u64,
}

impl TreeHead {
    /// The bytes the log key signs.
    pub fn signing_input(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(SIGNING_CONTEXT.len() + 48);
        out.extend_from_slice(SIGNING_CONTEXT);
        out.extend_from_slice(&self.tree_size.to_be_bytes());
        out.extend_from_slice(&self.root_hash);
        out.extend_from_slice(&self.timestamp_ms.to_be_bytes());
        out
    }
}

/// A tree head with the log key's ECDSA P-256 / SHA-256 signature (ASN.1 DER).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedTreeHead {
    /// The head.
    #[serde(flatten)]
    pub head: TreeHead,
    /// SHA-256 of the signing key's SubjectPublicKeyInfo, hex.
    pub key_id: String,
    /// DER ECDSA signature over [`TreeHead::signing_input`], base64.
    #[serde(with = "b64_vec")]
    pub signature: Vec<u8>,
}

/// The log's public key, as published next to the trust bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogPublicKey {
    spki_der: Vec<u8>,
    key_id: String,
}

impl LogPublicKey {
    /// From a DER SubjectPublicKeyInfo of an ECDSA P-256 key.
    pub fn from_spki_der(der: &[u8]) -> Result<Self, HeadError> {
        if der.len() != P256_SPKI_PREFIX.len() + 64 || !der.starts_with(&P256_SPKI_PREFIX) {
            return Err(HeadError::NotP256);
        }
        Ok(Self {
            spki_der: der.to_vec(),
            key_id: hex::encode(Sha256::digest(der)),
        })
    }

    /// From PEM text holding a `PUBLIC KEY` block.
    pub fn from_pem(pem: &str) -> Result<Self, HeadError> {
        use rustls_pki_types::pem::PemObject as _;
        let der = rustls_pki_types::SubjectPublicKeyInfoDer::from_pem_slice(pem.as_bytes())
            .map_err(|_| HeadError::NoPem)?;
        Self::from_spki_der(der.as_ref())
    }

    /// The key as PEM (`PUBLIC KEY`).
    pub fn to_pem(&self) -> String {
        let b64 = base64::engine::general_purpose::STANDARD.encode(&self.spki_der);
        let mut out = String::from("-----BEGIN PUBLIC KEY-----\n");
        for line in b64.as_bytes().chunks(64) {
            out.push_str(&String::from_utf8_lossy(line));
            out.push('\n');
        }
        out.push_str("-----END PUBLIC KEY-----\n");
        out
    }

    /// The DER SubjectPublicKeyInfo.
    pub fn spki_der(&self) -> &[u8] {
        &self.spki_der
    }

    /// SHA-256 of the SubjectPublicKeyInfo, hex: what heads name as `key_id`.
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// Checks a signed head against this key.
    pub fn verify(&self, sth: &SignedTreeHead) -> Result<(), HeadError> {
        if sth.key_id != self.key_id {
            return Err(HeadError::OtherKey {
                got: sth.key_id.clone(),
                want: self.key_id.clone(),
            });
        }
        let point = &self.spki_der[P256_SPKI_PREFIX.len() - 1..];
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, point)
            .verify(&sth.head.signing_input(), &sth.signature)
            .map_err(|_| HeadError::BadSignature)
    }
}

mod b64_hash {
    use base64::Engine as _;
    use serde::{de::Error as _, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(h: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(h))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let text = String::deserialize(d)?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text)
            .map_err(D::Error::custom)?;
        bytes
            .try_into()
            .map_err(|_| D::Error::custom("a hash is 32 bytes"))
    }
}

pub(crate) mod b64_vec {
    use base64::Engine as _;
    use serde::{de::Error as _, Deserialize, Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(v))
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(text)
            .map_err(D::Error::custom)
    }
}

/// Serde for lists of hashes as base64 strings (proofs in JSON).
pub mod b64_hashes {
    use base64::Engine as _;
    use serde::{de::Error as _, Deserialize, Deserializer, Serializer};

    /// Writes hashes as base64 strings.
    pub fn serialize<S: Serializer>(v: &[[u8; 32]], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(
            v.iter()
                .map(|h| base64::engine::general_purpose::STANDARD.encode(h)),
        )
    }

    /// Reads hashes from base64 strings.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<[u8; 32]>, D::Error> {
        let texts = Vec::<String>::deserialize(d)?;
        texts
            .into_iter()
            .map(|t| {
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(t)
                    .map_err(D::Error::custom)?;
                bytes
                    .try_into()
                    .map_err(|_| D::Error::custom("a hash is 32 bytes"))
            })
            .collect()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use aws_lc_rs::encoding::AsDer;
    use aws_lc_rs::rand::SystemRandom;
    use aws_lc_rs::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_ASN1_SIGNING};

    /// A log key and a function that signs heads with it.
    pub(crate) fn log_key() -> (EcdsaKeyPair, LogPublicKey) {
        let pair = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_ASN1_SIGNING).unwrap();
        let spki = pair.public_key().as_der().unwrap();
        let public = LogPublicKey::from_spki_der(spki.as_ref()).unwrap();
        (pair, public)
    }

    pub(crate) fn sign(pair: &EcdsaKeyPair, key: &LogPublicKey, head: TreeHead) -> SignedTreeHead {
        let sig = pair
            .sign(&SystemRandom::new(), &head.signing_input())
            .unwrap();
        SignedTreeHead {
            head,
            key_id: key.key_id().to_string(),
            signature: sig.as_ref().to_vec(),
        }
    }

    #[test]
    fn a_signed_head_verifies_and_any_change_breaks_it() {
        let (pair, key) = log_key();
        let head = TreeHead {
            tree_size: 8,
            root_hash: [5; 32],
            timestamp_ms: 1000,
        };
        let sth = sign(&pair, &key, head);
        key.verify(&sth).unwrap();

        let mut other_root = sth.clone();
        other_root.head.root_hash[0] ^= 1;
        assert_eq!(key.verify(&other_root), Err(HeadError::BadSignature));
        let mut other_size = sth.clone();
        other_size.head.tree_size = 9;
        assert_eq!(key.verify(&other_size), Err(HeadError::BadSignature));

        let (_, stranger) = log_key();
        assert!(matches!(
            stranger.verify(&sth),
            Err(HeadError::OtherKey { .. })
        ));
    }

    #[test]
    fn heads_and_keys_round_trip_through_json_and_pem() {
        let (pair, key) = log_key();
        let sth = sign(
            &pair,
            &key,
            TreeHead {
                tree_size: 3,
                root_hash: [1; 32],
                timestamp_ms: 7,
            },
        );
        let json = serde_json::to_string(&sth).unwrap();
        assert!(json.contains("\"tree_size\":3"), "{json}");
        let back: SignedTreeHead = serde_json::from_str(&json).unwrap();
        assert_eq!(back, sth);
        let again = LogPublicKey::from_pem(&key.to_pem()).unwrap();
        assert_eq!(again, key);
        again.verify(&back).unwrap();
    }

    #[test]
    fn keys_of_another_shape_are_refused() {
        assert_eq!(
            LogPublicKey::from_spki_der(&[0; 91]),
            Err(HeadError::NotP256)
        );
        assert_eq!(LogPublicKey::from_pem("nothing"), Err(HeadError::NoPem));
    }
}
