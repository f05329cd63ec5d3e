//! Typed errors. Each variant says what was wrong and, where it helps, what to do.

use thiserror::Error;

/// A string is not a valid SPIFFE ID or trust domain.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum IdError {
    /// Parse failure with the offending input and the rule it broke.
    #[error("invalid SPIFFE ID `{input}`: {reason}")]
    Invalid {
        /// The rejected input.
        input: String,
        /// Which rule of the SPIFFE ID spec it breaks.
        reason: String,
    },
    /// The ID parsed but belongs to another trust domain.
    #[error("SPIFFE ID `{id}` is not in trust domain `{expected}`")]
    WrongTrustDomain {
        /// The ID.
        id: String,
        /// The trust domain it had to be in.
        expected: String,
    },
}

/// PEM input could not be decoded.
#[derive(Debug, Error)]
pub enum PemError {
    /// No PEM block of the wanted kind was found.
    #[error("no {what} found in PEM input")]
    Missing {
        /// "CERTIFICATE" or "PRIVATE KEY".
        what: &'static str,
    },
    /// A PEM block was malformed.
    #[error("malformed PEM: {0}")]
    Malformed(String),
}

/// An X.509-SVID or chain failed validation. `reason()` is a stable metric label.
#[derive(Debug, Error)]
pub enum SvidError {
    /// The chain was empty.
    #[error("certificate chain is empty")]
    EmptyChain,
    /// The DER could not be parsed as X.509.
    #[error("certificate is not valid X.509: {0}")]
    Malformed(String),
    /// X509-SVID spec: "An X.509 SVID MUST contain exactly one URI SAN".
    #[error("leaf must carry exactly one URI SAN, found {0}")]
    UriSanCount(usize),
    /// The URI SAN is not a valid SPIFFE ID.
    #[error(transparent)]
    BadId(#[from] IdError),
    /// X509-SVID spec: leaf SVIDs MUST NOT be CAs.
    #[error("leaf certificate has the CA flag set")]
    LeafIsCa,
    /// X509-SVID spec: leaf SVIDs MUST NOT set keyCertSign or cRLSign.
    #[error(
        "leaf certificate's key usage allows signing certificates or CRLs (keyCertSign/cRLSign)"
    )]
    LeafCanSign,
    /// The leaf has an extendedKeyUsage extension without the usage the handshake needs.
    #[error(
        "leaf certificate's extended key usage lacks {required} (X509-SVID: when present it must include serverAuth and clientAuth)"
    )]
    MissingKeyUsage {
        /// `serverAuth`, `clientAuth`, or both (for [`crate::Usage::Either`]).
        required: &'static str,
    },
    /// Outside its validity window.
    #[error(
        "certificate expired or not yet valid (valid {not_before} .. {not_after} unix seconds)"
    )]
    NotValidNow {
        /// notBefore, unix seconds.
        not_before: i64,
        /// notAfter, unix seconds.
        not_after: i64,
    },
    /// Does not chain to the trust bundle.
    #[error("certificate does not chain to the trust bundle of `{trust_domain}`: {detail}")]
    UnknownIssuer {
        /// The bundle's trust domain.
        trust_domain: String,
        /// webpki's reason.
        detail: String,
    },
    /// Verified, but not the identity that was required.
    #[error("peer presented `{presented}`, expected `{expected}`")]
    WrongIdentity {
        /// What was required.
        expected: String,
        /// What the certificate carries.
        presented: String,
    },
    /// The private key does not belong to the leaf certificate.
    #[error("private key does not match the certificate's public key")]
    KeyMismatch,
    /// The private key could not be loaded.
    #[error("private key is unusable: {0}")]
    BadKey(String),
    /// The trust bundle is empty or holds a non-CA certificate.
    #[error("trust bundle is invalid: {0}")]
    BadBundle(String),
}

impl SvidError {
    /// A short, stable reason for metrics labels and logs (`no_cert`, `unknown_ca`, `expired`, …).
    pub fn reason(&self) -> &'static str {
        match self {
            SvidError::EmptyChain => "no_cert",
            SvidError::Malformed(_) => "malformed",
            SvidError::UriSanCount(_)
            | SvidError::BadId(_)
            | SvidError::LeafIsCa
            | SvidError::LeafCanSign
            | SvidError::MissingKeyUsage { .. } => "not_svid",
            SvidError::NotValidNow { .. } => "expired",
            SvidError::UnknownIssuer { .. } => "unknown_ca",
            SvidError::WrongIdentity { .. } => "wrong_identity",
            SvidError::KeyMismatch | SvidError::BadKey(_) => "bad_key",
            SvidError::BadBundle(_) => "bad_bundle",
        }
    }
}
