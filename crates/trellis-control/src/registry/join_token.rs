//! The join token format: `trellis-join.<selector>.<verifier>` (the split-token design). The
//! selector (16 random bytes) is a lookup key, stored in clear; the verifier (32 random bytes)
//! is the secret, stored only as its SHA-256. [`super::Registry::create_join_token`] makes
//! them; redemption finds the row by selector and compares the verifier's hash with the
//! stored one in constant time.

/// Prefix that marks a join token (so it is never mistaken for a JWT).
pub const JOIN_TOKEN_PREFIX: &str = "trellis-join.";

/// Random bytes in a token's selector (the public lookup key): 128 bits, so selectors of
/// different tokens never collide.
pub const JOIN_SELECTOR_BYTES: usize = 16;

/// Random bytes in a token's verifier (the secret): 256 bits, so guessing is hopeless.
pub const JOIN_VERIFIER_BYTES: usize = 32;

/// Unpadded base64url length of the selector.
pub const SELECTOR_LEN: usize = 22;
/// Unpadded base64url length of the verifier.
pub const VERIFIER_LEN: usize = 43;
/// Length of a token in the single-part format of earlier builds (prefix and 43 characters).
const LEGACY_TOKEN_LEN: usize = JOIN_TOKEN_PREFIX.len() + 43;

/// Exact length of a join token: the prefix, the selector, a dot and the verifier (79
/// characters). Anything else is refused before it is hashed or reaches the registry.
pub const JOIN_TOKEN_LEN: usize = JOIN_TOKEN_PREFIX.len() + SELECTOR_LEN + 1 + VERIFIER_LEN;

/// A join token split into its parts, its shape checked (not its existence).
#[derive(Clone, Copy)]
pub struct JoinToken<'a> {
    selector: &'a str,
    verifier: &'a str,
}

/// Why a string cannot be a join token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JoinTokenShapeError {
    /// Longer than any join token.
    Oversized,
    /// The single-part format of earlier builds (`trellis-join.<43 characters>`).
    OldFormat,
    /// Any other wrong shape.
    Malformed,
}

impl<'a> JoinToken<'a> {
    /// Checks the exact shape: the prefix, then 22 and 43 base64url characters joined by a dot.
    /// Looks only at the caller's input, so its timing tells nothing about stored tokens.
    pub fn parse(token: &'a str) -> Result<Self, JoinTokenShapeError> {
        if token.len() > JOIN_TOKEN_LEN {
            return Err(JoinTokenShapeError::Oversized);
        }
        let body = token
            .strip_prefix(JOIN_TOKEN_PREFIX)
            .ok_or(JoinTokenShapeError::Malformed)?;
        if token.len() == LEGACY_TOKEN_LEN && is_base64url(body) {
            return Err(JoinTokenShapeError::OldFormat);
        }
        match body.split_once('.') {
            Some((selector, verifier))
                if selector.len() == SELECTOR_LEN
                    && verifier.len() == VERIFIER_LEN
                    && is_base64url(selector)
                    && is_base64url(verifier) =>
            {
                Ok(Self { selector, verifier })
            }
            _ => Err(JoinTokenShapeError::Malformed),
        }
    }

    /// The public half: the registry's lookup key.
    pub fn selector(&self) -> &'a str {
        self.selector
    }

    /// The secret half: only its SHA-256 is stored.
    pub fn verifier(&self) -> &'a str {
        self.verifier
    }
}

/// The unpadded base64url alphabet (RFC 4648 section 5), nothing else.
fn is_base64url(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}
