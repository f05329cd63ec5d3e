//! Attestation: turning a caller's credential into the SPIFFE ID it may have.
//!
//! Credentials arrive as `authorization: Bearer <credential>` gRPC metadata or as a client
//! SVID on the mTLS connection (re-attestation after a join token).

pub mod join;
pub mod k8s;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use thiserror::Error;
use trellis_identity::{SpiffeId, TrustDomain};

pub use join::JoinAttestor;
pub use k8s::K8sAttestor;

/// Which attestor admitted a caller; a metric label and an audit field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AttestorKind {
    /// Kubernetes projected service-account token.
    K8s,
    /// Single-use join token.
    JoinToken,
    /// A client SVID presented on the mTLS connection.
    Svid,
}

impl AttestorKind {
    /// Stable label: `k8s`, `join_token`, `svid`.
    pub fn as_str(self) -> &'static str {
        match self {
            AttestorKind::K8s => "k8s",
            AttestorKind::JoinToken => "join_token",
            AttestorKind::Svid => "svid",
        }
    }
}

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
    /// Kubernetes attestation is not configured (no `--k8s-jwks`).
    #[error("Kubernetes tokens are not accepted: the control plane has no --k8s-jwks")]
    K8sDisabled,
    /// Join token refused.
    #[error(transparent)]
    Join(#[from] crate::registry::JoinError),
    /// The derived ID is not a valid SPIFFE ID in the trust domain.
    #[error("attested identity is invalid: {0}")]
    BadIdentity(String),
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
            AttestError::Join(crate::registry::JoinError::Unknown) => "join_token_unknown",
            AttestError::Join(crate::registry::JoinError::Expired) => "join_token_expired",
            AttestError::Join(crate::registry::JoinError::AlreadyRedeemed) => "join_token_redeemed",
            AttestError::BadIdentity(_) => "bad_identity",
            AttestError::Internal(_) => "internal",
        }
    }

    /// Which attestor the failure belongs to, if one was chosen.
    pub fn attestor(&self) -> Option<AttestorKind> {
        match self {
            AttestError::MissingCredential
            | AttestError::Malformed(_)
            | AttestError::Internal(_) => None,
            AttestError::Join(_) => Some(AttestorKind::JoinToken),
            _ => Some(AttestorKind::K8s),
        }
    }
}

/// A successfully attested caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attested {
    /// The identity it gets.
    pub spiffe_id: SpiffeId,
    /// Who said so.
    pub attestor: AttestorKind,
}

/// What the caller presented.
#[derive(Debug, Clone, Copy)]
pub enum Credential<'a> {
    /// The value of the `authorization` metadata (the whole `Bearer …` string).
    Authorization(&'a str),
    /// A client SVID already verified by the TLS layer against the current bundle.
    PeerSvid(&'a SpiffeId),
    /// Nothing.
    None,
}

/// All configured attestors; picks one by the credential's shape.
pub struct Attestor {
    trust_domain: TrustDomain,
    k8s: Option<K8sAttestor>,
    join: JoinAttestor,
}

impl Attestor {
    /// Combines the attestors. `k8s` is `None` when no JWKS is configured.
    pub fn new(trust_domain: TrustDomain, k8s: Option<K8sAttestor>, join: JoinAttestor) -> Self {
        Self {
            trust_domain,
            k8s,
            join,
        }
    }

    /// Attests a caller. A bearer credential wins over a peer SVID (so a workload can switch
    /// identity with a new token). Join tokens are recognised by their `trellis-join.` prefix;
    /// anything else is treated as a JWT. The `Bearer ` scheme is case-insensitive; credentials
    /// over 16 KiB are rejected unparsed.
    pub fn attest(
        &self,
        cred: Credential<'_>,
        peer: Option<SocketAddr>,
        now: SystemTime,
    ) -> Result<Attested, AttestError> {
        todo!(
            "{cred:?} {peer:?} {now:?} {} {}",
            self.trust_domain,
            self.k8s.is_some()
        )
    }

    /// Access to the join attestor (token creation shares its registry).
    pub fn join(&self) -> &JoinAttestor {
        &self.join
    }
}

/// Grace window during which the streams one client opens right after redeeming a join
/// token may reuse it (from the same IP only).
pub const JOIN_REDEMPTION_WINDOW: Duration = Duration::from_secs(30);

#[allow(dead_code)]
fn _assert_send_sync() {
    fn is<T: Send + Sync>() {}
    is::<Attestor>();
    let _ = Arc::new(());
}
