//! Join-token attestation: single-use split tokens bound to a SPIFFE ID, redeemed against the
//! registry (the token format, [`JoinToken`], lives with the registry that stores it).

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use trellis_identity::SpiffeId;

use crate::attest::error::AttestError;
use crate::registry::join_token::{JoinToken, JoinTokenShapeError};
use crate::registry::{JoinError, Registry};

/// Redeems join tokens against the registry.
pub struct JoinAttestor {
    registry: Arc<Registry>,
    window: Duration,
}

impl JoinAttestor {
    /// `window`: how long after the first redemption the same peer IP may reuse the token.
    pub fn new(registry: Arc<Registry>, window: Duration) -> Self {
        Self { registry, window }
    }

    /// Redeems `token` for `peer`.
    ///
    /// Timing: the shape check looks only at the caller's input. The registry then looks the
    /// row up by selector, which is not secret: the lookup's timing may reveal whether a
    /// selector exists, which is worthless without its verifier. The verifier's SHA-256 is
    /// compared with the stored hash in constant time, so how long a refusal takes says
    /// nothing about how close a guess came. An unknown selector and a wrong verifier get
    /// the same answer ([`JoinError::Unknown`]), and a wrong verifier spends nothing.
    pub fn attest(
        &self,
        token: &str,
        peer: IpAddr,
        now: SystemTime,
    ) -> Result<SpiffeId, AttestError> {
        let token = JoinToken::parse(token).map_err(shape_error)?;
        match self
            .registry
            .redeem_parsed_join_token(token, peer, now, self.window)
        {
            Ok(Ok(id)) => Ok(id),
            Ok(Err(refused)) => Err(AttestError::Join(refused)),
            // The database failed: not the caller's fault, and the token may still be good
            // (redemption is one transaction: it commits whole or not at all).
            Err(e) if e.is_unavailable() => Err(AttestError::Unavailable(e.to_string())),
            Err(e) => Err(AttestError::Internal(e.to_string())),
        }
    }

    /// The registry tokens are redeemed against (token creation uses the same one).
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// How long after the first redemption the same peer IP may reuse a token.
    pub fn window(&self) -> Duration {
        self.window
    }
}

/// The answer for a string that cannot be a join token, given without hashing or any
/// database work: longer than a token is `Oversized`; a token of the old format is told to
/// make a new one; any other shape is `Unknown`, as a lookup would say.
fn shape_error(e: JoinTokenShapeError) -> AttestError {
    match e {
        JoinTokenShapeError::Oversized => AttestError::Oversized("join token"),
        JoinTokenShapeError::OldFormat => AttestError::Malformed(
            "this join token has the single-part format of an earlier Trellis, which is no \
             longer accepted: create a new one with `trellis token create`"
                .into(),
        ),
        JoinTokenShapeError::Malformed => AttestError::Join(JoinError::Unknown),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::registry::join_token::{
        JOIN_TOKEN_LEN, JOIN_TOKEN_PREFIX, SELECTOR_LEN, VERIFIER_LEN,
    };

    fn good() -> String {
        format!(
            "{JOIN_TOKEN_PREFIX}{}.{}",
            "A".repeat(SELECTOR_LEN),
            "b".repeat(VERIFIER_LEN)
        )
    }

    fn check(token: &str) -> Result<(), AttestError> {
        JoinToken::parse(token).map(|_| ()).map_err(shape_error)
    }

    #[test]
    fn token_length_is_prefix_selector_dot_verifier() {
        assert_eq!(JOIN_TOKEN_LEN, 79);
        assert_eq!(good().len(), JOIN_TOKEN_LEN);
        let t = good();
        let parsed = JoinToken::parse(&t).unwrap();
        assert_eq!(parsed.selector(), "A".repeat(SELECTOR_LEN));
        assert_eq!(parsed.verifier(), "b".repeat(VERIFIER_LEN));
    }

    #[test]
    fn join_token_shape_is_checked_before_lookup() {
        assert!(check(&good()).is_ok());
        for long in [
            format!("{}A", good()),
            format!("{JOIN_TOKEN_PREFIX}{}", "A".repeat(1 << 20)),
        ] {
            assert_eq!(check(&long), Err(AttestError::Oversized("join token")));
        }
        let sel = "A".repeat(SELECTOR_LEN);
        let ver = "b".repeat(VERIFIER_LEN);
        let p = JOIN_TOKEN_PREFIX;
        for bad in [
            // Wrong lengths of either part, the same total length.
            format!(
                "{p}{}.{}",
                "A".repeat(SELECTOR_LEN - 1),
                "b".repeat(VERIFIER_LEN + 1)
            ),
            format!(
                "{p}{}.{}",
                "A".repeat(SELECTOR_LEN + 1),
                "b".repeat(VERIFIER_LEN - 1)
            ),
            // Short parts.
            format!("{p}{sel}.{}", "b".repeat(VERIFIER_LEN - 1)),
            format!("{p}{}.{ver}", "A".repeat(SELECTOR_LEN - 1)),
            // Not two parts.
            format!("{p}{sel}{ver}"),
            format!("{p}{sel}.{}.b", "b".repeat(VERIFIER_LEN - 2)),
            format!("{p}.{sel}{ver}"),
            format!("{p}{sel}{ver}."),
            // Outside the base64url alphabet, padding included.
            format!("{p}{sel}.{}=", "b".repeat(VERIFIER_LEN - 1)),
            format!("{p}{sel}.{}+", "b".repeat(VERIFIER_LEN - 1)),
            format!("{p}{}/.{ver}", "A".repeat(SELECTOR_LEN - 1)),
            format!("{p}{}é.{ver}", "A".repeat(SELECTOR_LEN - 2)),
            // Wrong or missing prefix.
            format!("trellis-jain.{sel}.{ver}"),
            format!("{sel}.{ver}.{}", "x".repeat(12)),
            p.to_owned(),
            String::new(),
        ] {
            assert_eq!(
                check(&bad),
                Err(AttestError::Join(JoinError::Unknown)),
                "{bad}"
            );
        }
    }

    #[test]
    fn old_format_token_is_refused_with_a_clear_message() {
        let old = format!("{JOIN_TOKEN_PREFIX}{}", "x".repeat(43));
        let err = check(&old).unwrap_err();
        assert_eq!(err.reason(), "malformed");
        let msg = err.to_string();
        assert!(msg.contains("trellis token create"), "{msg}");
        assert!(!msg.contains("xxxx"), "the message echoes the token: {msg}");
        // The old length with a character outside the alphabet is just malformed.
        let garbled = format!("{JOIN_TOKEN_PREFIX}{}.", "x".repeat(42));
        assert_eq!(check(&garbled), Err(AttestError::Join(JoinError::Unknown)));
    }

    /// Redemption through the attestor: the registry is only reached by well-shaped tokens.
    #[test]
    fn attestor_round_trip_and_refusals() {
        let dir = tempfile::tempdir().unwrap();
        let registry = Arc::new(Registry::open(&dir.path().join("t.db")).unwrap());
        let att = JoinAttestor::new(Arc::clone(&registry), Duration::from_secs(30));
        let id = SpiffeId::parse("spiffe://example.org/host/a").unwrap();
        let now = SystemTime::now();
        let tok = registry
            .create_join_token(&id, Duration::from_secs(3600), now)
            .unwrap();
        assert_eq!(tok.len(), JOIN_TOKEN_LEN);
        let (a, b) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());

        // The right selector with a wrong verifier: unknown, and the token is not spent.
        let (head, verifier) = tok.rsplit_once('.').unwrap();
        let flipped = if verifier.starts_with('A') { 'B' } else { 'A' };
        let wrong = format!("{head}.{flipped}{}", &verifier[1..]);
        assert_eq!(
            att.attest(&wrong, b, now),
            Err(AttestError::Join(JoinError::Unknown))
        );
        assert_eq!(att.attest(&tok, a, now), Ok(id.clone()));
        // Spent by `a` (the wrong guess from `b` did not claim it): `b` is refused.
        assert_eq!(
            att.attest(&tok, b, now),
            Err(AttestError::Join(JoinError::AlreadyRedeemed))
        );
        assert_eq!(att.attest(&tok, a, now), Ok(id));
    }
}
