//! Why attestation failed: one error for every attestor, whose [`AttestError::reason`] is the
//! metric label and whose message is what the caller is told (never the token itself).

use thiserror::Error;

use crate::attest::kind::AttestorKind;
use crate::registry::JoinError;

/// Why attestation failed; `reason()` is a stable metric label. Messages never contain the token.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum AttestError {
    /// No `authorization` metadata and no client SVID.
    #[error("no credential: send `authorization: Bearer <token>` or a client SVID")]
    MissingCredential,
    /// Not `Bearer <token>`, or an oversized/garbled token.
    #[error("malformed credential: {0}")]
    Malformed(String),
    /// JWT `alg` is not an allowed asymmetric algorithm (`none`, HS*).
    #[error("JWT algorithm `{0}` is not allowed")]
    AlgNotAllowed(String),
    /// JWT `kid` not in the JWKS.
    #[error("JWT key id `{0}` is not in the issuer's JWKS")]
    UnknownKid(String),
    /// JWT signature does not verify.
    #[error("JWT signature does not verify")]
    BadSignature,
    /// JWT `exp` in the past.
    #[error("JWT expired")]
    Expired,
    /// JWT `nbf` in the future.
    #[error("JWT not yet valid")]
    NotYetValid,
    /// JWT `iss` mismatch.
    #[error("JWT issuer `{0}` is not the configured issuer")]
    WrongIssuer(String),
    /// JWT `aud` mismatch.
    #[error("JWT audience does not include `{0}`")]
    WrongAudience(String),
    /// JWT lacks `kubernetes.io` namespace/serviceaccount claims.
    #[error("JWT lacks kubernetes.io namespace/serviceaccount claims")]
    MissingClaims,
    /// Kubernetes attestation is not configured (no `--k8s-jwks` or `--k8s-jwks-url`).
    #[error(
        "Kubernetes tokens are not accepted: the control plane has no --k8s-jwks or --k8s-jwks-url"
    )]
    K8sDisabled,
    /// Join token refused.
    #[error(transparent)]
    Join(#[from] JoinError),
    /// The derived ID is not a valid SPIFFE ID in the trust domain.
    #[error("attested identity is invalid: {0}")]
    BadIdentity(String),
    /// A credential larger than any real one, refused before parsing.
    #[error("{0} is too large (over the control plane's max_jwt_bytes, 8 KiB by default)")]
    Oversized(&'static str),
    /// The state database is out of reach or cannot take writes (not the caller's fault;
    /// the token was not spent): retry once it is back.
    #[error("the control plane's state database is unavailable ({0}); the token was not spent: retry later")]
    Unavailable(String),
    /// Registry failure (not the caller's fault).
    #[error("internal error: {0}")]
    Internal(String),
}

impl AttestError {
    /// Stable reason label for `trellis_attestation_failures_total{reason}`.
    pub fn reason(&self) -> &'static str {
        match self {
            AttestError::MissingCredential => "missing_credential",
            AttestError::Malformed(_) => "malformed",
            AttestError::AlgNotAllowed(_) => "alg_not_allowed",
            AttestError::UnknownKid(_) => "unknown_kid",
            AttestError::BadSignature => "bad_signature",
            AttestError::Expired => "expired",
            AttestError::NotYetValid => "not_yet_valid",
            AttestError::WrongIssuer(_) => "wrong_issuer",
            AttestError::WrongAudience(_) => "wrong_audience",
            AttestError::MissingClaims => "missing_claims",
            AttestError::K8sDisabled => "k8s_disabled",
            AttestError::Join(JoinError::Unknown) => "join_token_unknown",
            AttestError::Join(JoinError::Expired) => "join_token_expired",
            AttestError::Join(JoinError::AlreadyRedeemed) => "join_token_redeemed",
            AttestError::BadIdentity(_) => "bad_identity",
            AttestError::Oversized(_) => "oversized",
            AttestError::Unavailable(_) => "database_unavailable",
            AttestError::Internal(_) => "internal",
        }
    }

    /// Which attestor the failure belongs to, if one was chosen.
    pub fn attestor(&self) -> Option<AttestorKind> {
        match self {
            // BadIdentity can follow any attestor; the error alone does not say which.
            AttestError::MissingCredential
            | AttestError::Malformed(_)
            | AttestError::BadIdentity(_)
            | AttestError::Oversized(_)
            | AttestError::Unavailable(_)
            | AttestError::Internal(_) => None,
            AttestError::Join(_) => Some(AttestorKind::JoinToken),
            _ => Some(AttestorKind::K8s),
        }
    }
}
