//! Chain verification against a trust bundle, plus the X509-SVID leaf rules.

use std::time::SystemTime;

use rustls_pki_types::CertificateDer;

use crate::{SpiffeId, SvidError, TrustBundle};

/// Which extended key usage the leaf must carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    /// serverAuth (the peer is a server).
    Server,
    /// clientAuth (the peer is a client).
    Client,
    /// Either (an SVID checked outside a handshake).
    Either,
}

/// Verifies `chain` (leaf first) against `bundle` at `now` with rustls-webpki, then applies the
/// X509-SVID leaf rules and checks the SPIFFE ID is in the bundle's trust domain.
/// Returns the leaf's SPIFFE ID.
pub fn verify_svid_chain(
    chain: &[CertificateDer<'_>],
    bundle: &TrustBundle,
    now: SystemTime,
    usage: Usage,
) -> Result<SpiffeId, SvidError> {
    todo!("{} {:?} {:?} {:?}", chain.len(), bundle, now, usage)
}
