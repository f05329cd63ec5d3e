//! Join-token attestation: single-use tokens bound to a SPIFFE ID, stored hashed.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use trellis_identity::SpiffeId;

use crate::attest::AttestError;
use crate::registry::{JoinError, Registry};

/// Prefix that marks a join token (so it is never mistaken for a JWT).
pub const JOIN_TOKEN_PREFIX: &str = "trellis-join.";

/// Exact length of a join token: the prefix and 32 random bytes in unpadded base64url (43
/// characters). Anything else is refused before it is hashed or reaches the registry.
pub const JOIN_TOKEN_LEN: usize = JOIN_TOKEN_PREFIX.len() + 43;

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
    /// Timing: the token is never compared with stored secret material. Its SHA-256 is looked
    /// up in the registry's index, and that lookup's timing can at most reveal how much of the
    /// attacker's *own* guess's hash matches a stored hash. Even a whole stored hash is useless
    /// without a SHA-256 preimage of 256 random bits, so the lookup leaks nothing usable and
    /// needs no constant-time compare. The shape checks below look only at the caller's input.
    pub fn attest(
        &self,
        token: &str,
        peer: IpAddr,
        now: SystemTime,
    ) -> Result<SpiffeId, AttestError> {
        check_shape(token)?;
        match self
            .registry
            .redeem_join_token(token, peer, now, self.window)
        {
            Ok(Ok(id)) => Ok(id),
            Ok(Err(refused)) => Err(AttestError::Join(refused)),
            // The database failed: not the caller's fault, and the token may still be good.
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

/// Refuses anything that cannot be a join token, before hashing or any database work: longer
/// than a token is `Oversized`, any other wrong shape is `Unknown`.
fn check_shape(token: &str) -> Result<(), AttestError> {
    if token.len() > JOIN_TOKEN_LEN {
        return Err(AttestError::Oversized("join token"));
    }
    let body = token.strip_prefix(JOIN_TOKEN_PREFIX).unwrap_or_default();
    if token.len() != JOIN_TOKEN_LEN
        || !body
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        // It cannot be in the registry, so it is unknown: the same answer a lookup would give,
        // without the hashing and the database round trip.
        return Err(AttestError::Join(JoinError::Unknown));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_token_shape_is_checked_before_lookup() {
        let good = format!("{JOIN_TOKEN_PREFIX}{}", "A".repeat(43));
        assert!(check_shape(&good).is_ok());
        let long = format!("{good}A");
        assert_eq!(
            check_shape(&long),
            Err(AttestError::Oversized("join token"))
        );
        let huge = format!("{JOIN_TOKEN_PREFIX}{}", "A".repeat(1 << 20));
        assert_eq!(
            check_shape(&huge),
            Err(AttestError::Oversized("join token"))
        );
        for bad in [
            format!("{JOIN_TOKEN_PREFIX}{}", "A".repeat(42)),
            format!("{JOIN_TOKEN_PREFIX}{}=", "A".repeat(42)),
            format!("{JOIN_TOKEN_PREFIX}{}%", "A".repeat(42)),
            JOIN_TOKEN_PREFIX.to_owned(),
        ] {
            assert_eq!(
                check_shape(&bad),
                Err(AttestError::Join(JoinError::Unknown)),
                "{bad}"
            );
        }
    }
}
