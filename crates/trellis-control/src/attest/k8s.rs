//! Kubernetes projected service-account token attestation (JWT verified against the issuer's JWKS).
//!
//! SPIFFE ID: `spiffe://<td>/ns/<namespace>/sa/<serviceaccount>` from the token's
//! `kubernetes.io` claim (`{"namespace": …, "serviceaccount": {"name": …}}`).

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use thiserror::Error;
use trellis_identity::{SpiffeId, TrustDomain};

use crate::attest::AttestError;

/// The JWKS file could not be used; names the file.
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
        /// The file.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
}

/// Verifies Kubernetes service-account JWTs.
pub struct K8sAttestor {
    trust_domain: TrustDomain,
    issuer: String,
    audience: String,
}

impl K8sAttestor {
    /// Loads the issuer's public keys from a JWKS JSON file. Only RSA and EC keys are accepted.
    pub fn from_jwks_file(
        path: &Path,
        issuer: &str,
        audience: &str,
        td: &TrustDomain,
    ) -> Result<Self, JwksError> {
        todo!("{} {issuer} {audience} {td}", path.display())
    }

    /// Same, from JWKS JSON text (`source` names it in errors).
    pub fn from_jwks_json(
        json: &str,
        source: &Path,
        issuer: &str,
        audience: &str,
        td: &TrustDomain,
    ) -> Result<Self, JwksError> {
        todo!(
            "{} {} {issuer} {audience} {td}",
            json.len(),
            source.display()
        )
    }

    /// Verifies `token` at `now`: header `alg` is RS256/384/512, PS*, ES256/384 (never `none`
    /// or HS*), `kid` known, signature, `iss`, `aud` contains the audience, `exp`/`nbf` (60 s
    /// leeway), then derives the SPIFFE ID.
    pub fn attest(&self, token: &str, now: SystemTime) -> Result<SpiffeId, AttestError> {
        todo!(
            "{} {now:?} {} {} {}",
            token.len(),
            self.trust_domain,
            self.issuer,
            self.audience
        )
    }
}
