//! Join-token attestation: single-use tokens bound to a SPIFFE ID, stored hashed.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use trellis_identity::SpiffeId;

use crate::attest::AttestError;
use crate::registry::Registry;

/// Prefix that marks a join token (so it is never mistaken for a JWT).
pub const JOIN_TOKEN_PREFIX: &str = "trellis-join.";

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
    pub fn attest(
        &self,
        token: &str,
        peer: IpAddr,
        now: SystemTime,
    ) -> Result<SpiffeId, AttestError> {
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
