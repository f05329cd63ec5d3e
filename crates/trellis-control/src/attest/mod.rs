//! Attestation: turning a caller's credential into the SPIFFE ID it may have.
//!
//! Credentials arrive as `authorization: Bearer <credential>` gRPC metadata or as a client
//! SVID on the mTLS connection (re-attestation after a join token).

pub mod error;
pub mod join;
pub mod jwks;
pub mod jwks_url;
pub mod k8s;
mod kind;
pub mod settings;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, SystemTime};

use trellis_identity::{SpiffeId, TrustDomain};

pub use crate::registry::JOIN_TOKEN_PREFIX;
pub use error::AttestError;
pub use join::JoinAttestor;
pub use jwks::{JwksError, JwksKeyStore, JwksKeys};
pub use jwks_url::{JwksSource, JwksUrl};
pub use k8s::K8sAttestor;
pub use kind::AttestorKind;
pub use settings::{K8sKeySource, K8sLimits, K8sSettings};

/// Room in the `authorization` value beyond the JWT: the `Bearer ` scheme and spaces.
pub const CREDENTIAL_OVERHEAD: usize = 64;

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
    /// Longest `authorization` value parsed: the largest JWT plus [`CREDENTIAL_OVERHEAD`].
    max_credential_len: usize,
}

impl Attestor {
    /// Combines the attestors. `k8s` is `None` when no JWKS is configured.
    pub fn new(trust_domain: TrustDomain, k8s: Option<K8sAttestor>, join: JoinAttestor) -> Self {
        Self {
            trust_domain,
            k8s,
            join,
            max_credential_len: k8s::MAX_JWT_BYTES + CREDENTIAL_OVERHEAD,
        }
    }

    /// Applies `max_jwt_bytes`: refuses `authorization` values that could not hold a JWT of at
    /// most `max` bytes, and has the Kubernetes attestor refuse longer JWTs themselves.
    pub fn with_max_jwt_bytes(mut self, max: usize) -> Self {
        self.max_credential_len = max.saturating_add(CREDENTIAL_OVERHEAD);
        self.k8s = self.k8s.map(|k| k.with_max_token_bytes(max));
        self
    }

    /// Longest `authorization` value parsed; longer ones are refused as oversized.
    pub fn max_credential_len(&self) -> usize {
        self.max_credential_len
    }

    /// Attests a caller. A bearer credential wins over a peer SVID (so a workload can switch
    /// identity with a new token). Join tokens are recognised by their `trellis-join.` prefix;
    /// anything else is treated as a JWT. The `Bearer ` scheme is case-insensitive; credentials
    /// over [`Attestor::max_credential_len`] are rejected unparsed.
    pub fn attest(
        &self,
        cred: Credential<'_>,
        peer: Option<SocketAddr>,
        now: SystemTime,
    ) -> Result<Attested, AttestError> {
        let (spiffe_id, attestor) = match cred {
            Credential::Authorization(value) => {
                let token = bearer_token(value, self.max_credential_len)?;
                if token.starts_with(JOIN_TOKEN_PREFIX) {
                    // Without a peer address (in-process callers) every redemption shares
                    // one pseudo-address, so the window still applies.
                    let ip = peer
                        .map(|p| p.ip())
                        .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
                    (self.join.attest(token, ip, now)?, AttestorKind::JoinToken)
                } else {
                    let k8s = self.k8s.as_ref().ok_or(AttestError::K8sDisabled)?;
                    (k8s.attest(token, now)?, AttestorKind::K8s)
                }
            }
            // The TLS layer verified the chain against the current bundle; the SVID's own ID
            // is the identity (re-attestation after a join token).
            Credential::PeerSvid(id) => (id.clone(), AttestorKind::Svid),
            Credential::None => return Err(AttestError::MissingCredential),
        };
        // Whatever the attestor, the control plane only issues in its own trust domain. A join
        // token's ID was checked by the CLI when created, but the trust domain may have been
        // changed since.
        if !spiffe_id.is_member_of(&self.trust_domain) {
            return Err(AttestError::BadIdentity(format!(
                "`{spiffe_id}` is not in trust domain `{}`",
                self.trust_domain
            )));
        }
        Ok(Attested {
            spiffe_id,
            attestor,
        })
    }

    /// Access to the join attestor (token creation shares its registry).
    pub fn join(&self) -> &JoinAttestor {
        &self.join
    }
}

/// Grace window during which the streams one client opens right after redeeming a join
/// token may reuse it (from the same IP only).
pub const JOIN_REDEMPTION_WINDOW: Duration = Duration::from_secs(30);

/// The token of an `authorization: Bearer <token>` value of at most `max_len` bytes (checked
/// before any parsing). RFC 9110 11.1: the auth-scheme is "case-insensitive"; RFC 6750 2.1
/// puts one or more spaces between scheme and token.
fn bearer_token(value: &str, max_len: usize) -> Result<&str, AttestError> {
    if value.len() > max_len {
        return Err(AttestError::Oversized("authorization metadata"));
    }
    let expected = || AttestError::Malformed("expected `Bearer <token>`".into());
    let (scheme, rest) = value.trim().split_once(' ').ok_or_else(expected)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(expected());
    }
    let token = rest.trim_start_matches(' ');
    // token68 (RFC 7235 2.1) has no whitespace; a second word is not a token.
    if token.is_empty() || token.contains(char::is_whitespace) {
        return Err(expected());
    }
    Ok(token)
}

// The SDS server shares one Attestor across tasks.
const _: () = {
    const fn is_send_sync<T: Send + Sync>() {}
    is_send_sync::<Attestor>();
};

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::k8s::tests as jwt;
    use super::*;
    use crate::registry::{JoinError, Registry};
    use std::sync::Arc;

    struct Fixture {
        _dir: tempfile::TempDir,
        registry: Arc<Registry>,
        attestor: Attestor,
    }

    fn fixture(with_k8s: bool) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let registry = Arc::new(Registry::open(&dir.path().join("trellis.db")).unwrap());
        let k8s = with_k8s.then(jwt::attestor);
        let attestor = Attestor::new(
            jwt::td(),
            k8s,
            JoinAttestor::new(registry.clone(), JOIN_REDEMPTION_WINDOW),
        );
        Fixture {
            _dir: dir,
            registry,
            attestor,
        }
    }

    fn host_id() -> SpiffeId {
        SpiffeId::parse("spiffe://td.example/host/db-1").unwrap()
    }

    fn peer(ip: &str) -> Option<SocketAddr> {
        Some(format!("{ip}:40000").parse().unwrap())
    }

    fn token(f: &Fixture, id: &SpiffeId) -> String {
        f.registry
            .create_join_token(id, Duration::from_secs(3600), jwt::now())
            .unwrap()
            .to_string()
    }

    #[test]
    fn join_token_bearer_attests_with_any_scheme_case() {
        let f = fixture(false);
        let tok = token(&f, &host_id());
        for scheme in ["Bearer", "bearer", "BEARER"] {
            let got = f.attestor.attest(
                Credential::Authorization(&format!("{scheme} {tok}")),
                peer("10.0.0.1"),
                jwt::now(),
            );
            assert_eq!(
                got,
                Ok(Attested {
                    spiffe_id: host_id(),
                    attestor: AttestorKind::JoinToken
                }),
                "{scheme}"
            );
        }
    }

    #[test]
    fn join_token_refused_from_other_ip() {
        let f = fixture(false);
        let auth = format!("Bearer {}", token(&f, &host_id()));
        let cred = Credential::Authorization(&auth);
        f.attestor
            .attest(cred, peer("10.0.0.1"), jwt::now())
            .unwrap();
        let err = f
            .attestor
            .attest(cred, peer("10.0.0.2"), jwt::now())
            .unwrap_err();
        assert_eq!(err, AttestError::Join(JoinError::AlreadyRedeemed));
        assert_eq!(err.reason(), "join_token_redeemed");
        assert_eq!(err.attestor(), Some(AttestorKind::JoinToken));
    }

    #[test]
    fn join_token_without_peer_address_shares_the_window() {
        let f = fixture(false);
        let auth = format!("Bearer {}", token(&f, &host_id()));
        for _ in 0..2 {
            f.attestor
                .attest(Credential::Authorization(&auth), None, jwt::now())
                .unwrap();
        }
    }

    #[test]
    fn unknown_join_token() {
        let f = fixture(false);
        let err = f
            .attestor
            .attest(
                Credential::Authorization("Bearer trellis-join.AAAA"),
                peer("10.0.0.1"),
                jwt::now(),
            )
            .unwrap_err();
        assert_eq!(err, AttestError::Join(JoinError::Unknown));
        // The message never echoes the credential.
        assert!(!err.to_string().contains("AAAA"));
    }

    #[test]
    fn join_token_for_other_trust_domain_is_refused() {
        let f = fixture(false);
        let other = SpiffeId::parse("spiffe://other.example/host/db-1").unwrap();
        let auth = format!("Bearer {}", token(&f, &other));
        let err = f
            .attestor
            .attest(
                Credential::Authorization(&auth),
                peer("10.0.0.1"),
                jwt::now(),
            )
            .unwrap_err();
        assert!(matches!(err, AttestError::BadIdentity(_)), "{err}");
    }

    #[test]
    fn registry_failure_is_internal_not_the_callers_fault() {
        let f = fixture(false);
        let auth = format!("Bearer {}", token(&f, &host_id()));
        let db = rusqlite::Connection::open(f.registry.path()).unwrap();
        db.execute_batch("DROP TABLE join_tokens").unwrap();
        let err = f
            .attestor
            .attest(
                Credential::Authorization(&auth),
                peer("10.0.0.1"),
                jwt::now(),
            )
            .unwrap_err();
        assert!(matches!(err, AttestError::Internal(_)), "{err}");
    }

    #[test]
    fn k8s_token_bearer_attests() {
        let f = fixture(true);
        let auth = format!("Bearer {}", jwt::rs256(&jwt::claims("prod", "web")));
        let got = f
            .attestor
            .attest(
                Credential::Authorization(&auth),
                peer("10.0.0.1"),
                jwt::now(),
            )
            .unwrap();
        assert_eq!(got.attestor, AttestorKind::K8s);
        assert_eq!(got.spiffe_id.as_str(), "spiffe://td.example/ns/prod/sa/web");
    }

    #[test]
    fn same_token_opens_several_streams() {
        let f = fixture(true);
        let auth = format!("Bearer {}", jwt::rs256(&jwt::claims("prod", "web")));
        for port in [1, 2, 3] {
            let p = Some(SocketAddr::from(([10, 0, 0, 1], port)));
            assert!(f
                .attestor
                .attest(Credential::Authorization(&auth), p, jwt::now())
                .is_ok());
        }
    }

    #[test]
    fn jwt_without_jwks_is_k8s_disabled() {
        let f = fixture(false);
        let auth = format!("Bearer {}", jwt::rs256(&jwt::claims("prod", "web")));
        let err = f
            .attestor
            .attest(Credential::Authorization(&auth), None, jwt::now())
            .unwrap_err();
        assert_eq!(err, AttestError::K8sDisabled);
    }

    #[test]
    fn rejects_non_bearer_authorization() {
        let f = fixture(true);
        for value in [
            "",
            "Bearer",
            "Bearer ",
            "Basic dXNlcjpwYXNz",
            "Bearertrellis-join.x",
            "Bearer a b",
            "trellis-join.x",
        ] {
            let err = f
                .attestor
                .attest(Credential::Authorization(value), None, jwt::now())
                .unwrap_err();
            assert_eq!(
                err,
                AttestError::Malformed("expected `Bearer <token>`".into()),
                "{value:?}"
            );
        }
    }

    #[test]
    fn rejects_oversized_credential() {
        let f = fixture(true);
        assert_eq!(f.attestor.max_credential_len(), 8 * 1024 + 64);
        let value = format!("Bearer {}", "x".repeat(f.attestor.max_credential_len()));
        let err = f
            .attestor
            .attest(Credential::Authorization(&value), None, jwt::now())
            .unwrap_err();
        assert_eq!(err, AttestError::Oversized("authorization metadata"));
        assert_eq!(err.reason(), "oversized");
        assert!(err.to_string().contains("max_jwt_bytes"), "{err}");
        // A configured `max_jwt_bytes` moves the limit.
        let small = f.attestor.with_max_jwt_bytes(1024);
        let value = format!("Bearer {}", "x".repeat(1100));
        assert_eq!(
            small.attest(Credential::Authorization(&value), None, jwt::now()),
            Err(AttestError::Oversized("authorization metadata"))
        );
    }

    #[test]
    fn missing_credential() {
        let f = fixture(true);
        assert_eq!(
            f.attestor.attest(Credential::None, None, jwt::now()),
            Err(AttestError::MissingCredential)
        );
    }

    #[test]
    fn peer_svid_in_trust_domain_reattests() {
        let f = fixture(false);
        let got = f
            .attestor
            .attest(
                Credential::PeerSvid(&host_id()),
                peer("10.0.0.9"),
                jwt::now(),
            )
            .unwrap();
        assert_eq!(
            got,
            Attested {
                spiffe_id: host_id(),
                attestor: AttestorKind::Svid
            }
        );
    }

    #[test]
    fn peer_svid_from_other_trust_domain_is_refused() {
        let f = fixture(false);
        let other = SpiffeId::parse("spiffe://other.example/host/db-1").unwrap();
        let err = f
            .attestor
            .attest(Credential::PeerSvid(&other), None, jwt::now())
            .unwrap_err();
        assert!(matches!(err, AttestError::BadIdentity(_)), "{err}");
    }

    #[test]
    fn attestor_is_shareable() {
        let f = fixture(false);
        let shared = Arc::new(f.attestor);
        let t = std::thread::spawn({
            let a = shared.clone();
            move || a.attest(Credential::None, None, jwt::now()).is_err()
        });
        assert!(t.join().unwrap());
    }
}
