//! The Kubernetes issuer's public keys: a JWKS document (RFC 7517) parsed and validated into
//! [`JwksKeys`] (only RSA of 2048 bits or more and EC P-256/P-384 signing keys), and the
//! [`JwksKeyStore`] a refresh swaps a new set into. The file (`--k8s-jwks`) and the URL
//! (`--k8s-jwks-url`, [`super::jwks_url`]) both end here; [`super::k8s`] verifies with it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use base64::Engine as _;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet, PublicKeyUse};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey};
use thiserror::Error;

/// `limits.k8s.max_jwks_bytes` when not configured: a cluster's issuer publishes a few keys
/// in a few KiB.
pub const MAX_JWKS_BYTES: usize = 1024 * 1024;

/// The JWKS file (or the body fetched from `--k8s-jwks-url`) could not be used; names it.
#[derive(Debug, Error)]
pub enum JwksError {
    /// Unreadable.
    #[error("{path}: cannot read JWKS: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// I/O error.
        source: std::io::Error,
    },
    /// Not a JWKS (`{"keys": [...]}`) or no usable key.
    #[error("{path}: not a usable JWKS: {problem}")]
    Invalid {
        /// The file, or the URL it came from.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
}

/// The only JWS algorithms accepted, all asymmetric. RFC 8725 (JWT BCP) 3.1: "libraries
/// MUST enable the caller to specify a supported set of algorithms and MUST NOT use any other
/// algorithms when performing cryptographic operations". `none` and HS* are never here: an
/// HMAC "verified" with a public key (which anyone has) proves nothing.
pub(crate) const ALLOWED_ALGS: [(&str, Algorithm); 8] = [
    ("RS256", Algorithm::RS256),
    ("RS384", Algorithm::RS384),
    ("RS512", Algorithm::RS512),
    ("PS256", Algorithm::PS256),
    ("PS384", Algorithm::PS384),
    ("PS512", Algorithm::PS512),
    ("ES256", Algorithm::ES256),
    ("ES384", Algorithm::ES384),
];

/// One issuer key and the algorithms it may verify (by key type and curve, narrowed by the
/// JWK's own `alg` if it has one).
pub(crate) struct IssuerKey {
    pub(crate) key: DecodingKey,
    pub(crate) algs: Vec<Algorithm>,
}

/// A validated issuer key set, parsed from JWKS JSON: what
/// [`K8sAttestor`](crate::attest::K8sAttestor) verifies with.
/// It is replaced whole (never edited), so a refresh that fails to parse changes nothing.
pub struct JwksKeys {
    keys: HashMap<String, IssuerKey>,
}

impl std::fmt::Debug for JwksKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwksKeys")
            .field("kids", &self.key_ids())
            .finish()
    }
}

impl JwksKeys {
    /// Reads and parses a JWKS JSON file of at most `max_bytes` (`max_jwks_bytes`).
    pub fn from_file(path: &Path, max_bytes: usize) -> Result<Self, JwksError> {
        // Read at most one byte past the limit, so a huge (or endless) file is never loaded.
        let mut json = String::new();
        std::fs::File::open(path)
            .and_then(|f| {
                std::io::Read::read_to_string(
                    &mut std::io::Read::take(f, (max_bytes as u64).saturating_add(1)),
                    &mut json,
                )
            })
            .map_err(|source| JwksError::Read {
                path: path.to_path_buf(),
                source,
            })?;
        Self::parse(&json, path, max_bytes)
    }

    /// Parses JWKS JSON text of at most `max_bytes` (`source`, a file or URL, names it in
    /// errors). Only RSA (2048 bits or more) and EC P-256/P-384 signing keys with a `kid` are
    /// kept; at least one is required.
    pub fn parse(json: &str, source: &Path, max_bytes: usize) -> Result<Self, JwksError> {
        let invalid = |problem: String| JwksError::Invalid {
            path: source.to_path_buf(),
            problem,
        };
        // Checked before any parsing.
        if json.len() > max_bytes {
            return Err(invalid(format!(
                "larger than {max_bytes} bytes (max_jwks_bytes); an issuer's JWKS is a few KiB"
            )));
        }
        let set: JwkSet = serde_json::from_str(json).map_err(|e| {
            invalid(format!(
                "expected JSON like {{\"keys\": [...]}} (the output of \
                 `kubectl get --raw /openid/v1/jwks`): {e}"
            ))
        })?;
        let mut keys = HashMap::new();
        let mut symmetric = 0usize;
        for (i, jwk) in set.keys.iter().enumerate() {
            let kid = jwk.common.key_id.clone();
            let name = kid.clone().unwrap_or_else(|| format!("#{}", i + 1));
            if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
                continue;
            }
            let (key, mut algs) = match &jwk.algorithm {
                AlgorithmParameters::RSA(p) => {
                    let n = b64(&p.n).map_err(|e| invalid(format!("key `{name}`: n: {e}")))?;
                    let e = b64(&p.e).map_err(|e| invalid(format!("key `{name}`: e: {e}")))?;
                    if n.len() < 256 {
                        return Err(invalid(format!(
                            "key `{name}`: RSA modulus is {} bits; at least 2048 are required",
                            n.len() * 8
                        )));
                    }
                    (
                        DecodingKey::from_rsa_raw_components(&n, &e),
                        AlgorithmFamily::Rsa.algorithms().to_vec(),
                    )
                }
                AlgorithmParameters::EllipticCurve(p) => {
                    let (alg, len) = match p.curve {
                        EllipticCurve::P256 => (Algorithm::ES256, 32),
                        EllipticCurve::P384 => (Algorithm::ES384, 48),
                        _ => continue, // no allowed algorithm uses it
                    };
                    let x = b64(&p.x).map_err(|e| invalid(format!("key `{name}`: x: {e}")))?;
                    let y = b64(&p.y).map_err(|e| invalid(format!("key `{name}`: y: {e}")))?;
                    if x.len() != len || y.len() != len {
                        return Err(invalid(format!(
                            "key `{name}`: EC coordinates must be {len} bytes"
                        )));
                    }
                    let mut point = Vec::with_capacity(1 + 2 * len);
                    point.push(0x04);
                    point.extend_from_slice(&x);
                    point.extend_from_slice(&y);
                    (DecodingKey::from_ec_der(&point), vec![alg])
                }
                // A shared secret has no place in an issuer's public key set; never load one,
                // so no token can be checked against it.
                AlgorithmParameters::OctetKey(_) => {
                    symmetric += 1;
                    continue;
                }
                _ => continue,
            };
            if let Some(ka) = jwk.common.key_algorithm {
                algs.retain(|a| format!("{a:?}") == ka.to_string());
            }
            if algs.is_empty() {
                continue;
            }
            // Kubernetes always sets `kid`; a key without one could never be selected.
            let Some(kid) = kid else { continue };
            if keys.contains_key(&kid) {
                return Err(invalid(format!("key id `{kid}` appears twice")));
            }
            keys.insert(kid, IssuerKey { key, algs });
        }
        if keys.is_empty() {
            return Err(invalid(if symmetric > 0 {
                "it holds only symmetric (`oct`) keys; an issuer's JWKS must hold its public \
                 RSA or EC keys"
                    .into()
            } else {
                "no RSA or EC (P-256/P-384) signing key with a `kid`".into()
            }));
        }
        Ok(Self { keys })
    }

    /// The key published under `kid`.
    pub(crate) fn get(&self, kid: &str) -> Option<&IssuerKey> {
        self.keys.get(kid)
    }

    /// The key ids, sorted (for logs and tests).
    pub fn key_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.keys.keys().cloned().collect();
        ids.sort();
        ids
    }

    /// How many keys there are.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Never true for a parsed set (parsing requires a key); here for clippy's `len` rule.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// A handle on an attestor's key set: a refresher stores a new, fully validated set and every
/// attestation after that uses it. Attestations already running keep the set they loaded.
#[derive(Clone)]
pub struct JwksKeyStore(Arc<ArcSwap<JwksKeys>>);

impl JwksKeyStore {
    /// A store holding `keys`.
    pub fn new(keys: JwksKeys) -> Self {
        Self(Arc::new(ArcSwap::from_pointee(keys)))
    }

    /// The key set in force (one atomic load; the set stays valid while held).
    pub(crate) fn load(&self) -> arc_swap::Guard<Arc<JwksKeys>> {
        self.0.load()
    }

    /// Replaces the key set, atomically.
    pub fn store(&self, keys: JwksKeys) {
        self.0.store(Arc::new(keys));
    }

    /// The key ids in force, sorted.
    pub fn key_ids(&self) -> Vec<String> {
        self.0.load().key_ids()
    }
}

/// base64url without padding (RFC 7515 2: "with all trailing '=' characters omitted").
pub(crate) fn b64(s: &str) -> Result<Vec<u8>, base64::DecodeError> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(s)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::attest::k8s::tests::keys;

    #[test]
    fn jwks_limit_is_the_one_given() {
        let jwks = &keys().jwks;
        assert!(JwksKeys::parse(jwks, Path::new("j.json"), jwks.len()).is_ok());
        let err = JwksKeys::parse(jwks, Path::new("j.json"), jwks.len() - 1)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("max_jwks_bytes") && err.contains("j.json"),
            "{err}"
        );
    }

    #[test]
    fn rejects_oversized_jwks() {
        let big = format!(
            "{{\"keys\": [], \"pad\": \"{}\"}}",
            "x".repeat(MAX_JWKS_BYTES)
        );
        let err = JwksKeys::parse(&big, Path::new("big.json"), MAX_JWKS_BYTES).err();
        assert!(
            matches!(&err, Some(JwksError::Invalid { problem, .. }) if problem.contains("larger than")),
            "{err:?}"
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.json");
        std::fs::write(&path, &big).unwrap();
        let err = JwksKeys::from_file(&path, MAX_JWKS_BYTES).err();
        assert!(
            matches!(&err, Some(JwksError::Invalid { problem, .. }) if problem.contains("larger than")),
            "{err:?}"
        );
    }
    #[test]
    fn rejects_jwks_not_json() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jwks.json");
        std::fs::write(&path, "this is not json").unwrap();
        let err = JwksKeys::from_file(&path, MAX_JWKS_BYTES)
            .err()
            .unwrap()
            .to_string();
        assert!(err.starts_with(&path.display().to_string()), "{err}");
        assert!(err.contains("not a usable JWKS"), "{err}");
    }

    #[test]
    fn rejects_unreadable_jwks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing.json");
        let err = JwksKeys::from_file(&path, MAX_JWKS_BYTES).err().unwrap();
        assert!(matches!(err, JwksError::Read { .. }));
        assert!(
            err.to_string().starts_with(&path.display().to_string()),
            "{err}"
        );
    }

    #[test]
    fn rejects_jwks_with_only_symmetric_keys() {
        let json = r#"{"keys":[{"kty":"oct","kid":"k","k":"c2VjcmV0"}]}"#;
        let err = JwksKeys::parse(json, Path::new("j.json"), MAX_JWKS_BYTES)
            .err()
            .unwrap()
            .to_string();
        assert!(err.starts_with("j.json: "), "{err}");
        assert!(err.contains("symmetric"), "{err}");
    }

    #[test]
    fn rejects_jwks_without_keys() {
        for json in [
            r#"{"keys":[]}"#,
            r#"{"keys":[{"kty":"OKP","crv":"Ed25519","x":"AA"}]}"#,
        ] {
            let err = JwksKeys::parse(json, Path::new("j.json"), MAX_JWKS_BYTES)
                .err()
                .unwrap()
                .to_string();
            assert!(err.contains("no RSA or EC"), "{err}");
        }
    }

    #[test]
    fn rejects_jwks_with_weak_rsa_key() {
        let json = r#"{"keys":[{"kty":"RSA","kid":"k","n":"AQAB","e":"AQAB"}]}"#;
        let err = JwksKeys::parse(json, Path::new("j.json"), MAX_JWKS_BYTES)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("2048"), "{err}");
    }
}
