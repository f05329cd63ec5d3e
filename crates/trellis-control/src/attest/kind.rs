//! Which attestor admitted a caller.

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
