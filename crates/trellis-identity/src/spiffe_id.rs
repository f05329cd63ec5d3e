//! SPIFFE IDs and trust domains (SPIFFE-ID spec, section 2).

use std::fmt;
use std::str::FromStr;

use crate::IdError;

/// A validated SPIFFE ID: `spiffe://<trust-domain>/<path>`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    full: String,
    td_len: usize,
}

impl SpiffeId {
    /// Parses and validates a SPIFFE ID (lowercase trust domain, no port/userinfo/query/fragment,
    /// path segments not empty, `.` or `..`, characters `[A-Za-z0-9._-]`).
    pub fn parse(input: &str) -> Result<Self, IdError> {
        todo!("{input}")
    }

    /// `spiffe://<td>/<path>` for a trust domain and a path that starts with `/`.
    pub fn from_parts(td: &TrustDomain, path: &str) -> Result<Self, IdError> {
        Self::parse(&format!("spiffe://{}{}", td.as_str(), path))
    }

    /// The whole ID as a string.
    pub fn as_str(&self) -> &str {
        &self.full
    }

    /// The trust domain name, e.g. `example.org`.
    pub fn trust_domain_name(&self) -> &str {
        &self.full["spiffe://".len()..self.td_len]
    }

    /// The path, e.g. `/ns/prod/sa/web` (empty for a trust-domain ID).
    pub fn path(&self) -> &str {
        &self.full[self.td_len..]
    }

    /// True if the ID is in `td`.
    pub fn is_member_of(&self, td: &TrustDomain) -> bool {
        self.trust_domain_name() == td.as_str()
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.full)
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpiffeId({})", self.full)
    }
}

impl FromStr for SpiffeId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// A validated trust domain name, e.g. `example.org`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(String);

impl TrustDomain {
    /// Accepts `example.org` or `spiffe://example.org`.
    pub fn parse(input: &str) -> Result<Self, IdError> {
        todo!("{input}")
    }

    /// The bare name, e.g. `example.org`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The trust domain's own SPIFFE ID, `spiffe://example.org`.
    pub fn id(&self) -> SpiffeId {
        SpiffeId {
            full: format!("spiffe://{}", self.0),
            td_len: "spiffe://".len() + self.0.len(),
        }
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TrustDomain({})", self.0)
    }
}

impl FromStr for TrustDomain {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}
