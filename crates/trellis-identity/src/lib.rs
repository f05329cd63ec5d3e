//! SPIFFE identities for Trellis: IDs, X.509-SVIDs, trust bundles, PEM/DER, and the
//! rustls verifiers and resolver that enforce them inside the TLS handshake.
//!
//! Everything that crosses a trust boundary (a PEM file, an SDS message, a peer's
//! certificate chain) is validated here once and turned into a typed value.
#![warn(missing_docs)]
// Unit tests may unwrap: a panic is how they report failure.
#![cfg_attr(test, allow(clippy::unwrap_used))]

mod bundle;
mod cert;
mod error;
pub mod jwt;
mod pem;
mod spiffe_id;
mod svid;
#[cfg(any(test, feature = "test-util"))]
pub mod testca;
pub mod tls;
mod verify;

pub use bundle::{BundleCaSummary, TrustBundle};
pub use cert::{cert_facts, leaf_sha256_hex, rfc3339, spki_sha256, unix_secs, CertFacts};
pub use error::{IdError, PemError, SvidError};
pub use pem::{certs_from_pem, certs_to_pem, key_from_pem, key_to_pem};
pub use spiffe_id::{SpiffeId, TrustDomain};
pub use svid::Svid;
pub use verify::{verify_svid_chain, Usage};

/// DER certificate, re-exported so callers need not depend on rustls-pki-types.
pub use rustls_pki_types::{CertificateDer, PrivateKeyDer};
