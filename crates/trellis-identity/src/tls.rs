//! rustls glue: SPIFFE verifiers for both sides of a handshake and a hot-swappable resolver.
//!
//! Verifiers check the chain against the *current* bundle (an `ArcSwap`, read once per
//! handshake) and the peer's SPIFFE ID inside the handshake, so a wrong peer never gets
//! as far as HTTP.

use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;

use crate::{SpiffeId, Svid, SvidError, TrustBundle};

/// The bundle shared between the updater and every handshake.
pub type SharedBundle = Arc<ArcSwap<TrustBundle>>;

/// The crypto provider Trellis uses everywhere (ring).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// TLS versions a listener or client accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TlsPolicy {
    /// TLS 1.3 only (default).
    #[default]
    Tls13,
    /// TLS 1.2 (ECDHE-ECDSA AEAD suites) and 1.3.
    Tls12Plus,
}

/// Which peer identity a verifier accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerMatch {
    /// Exactly this SPIFFE ID.
    Exact(SpiffeId),
    /// Any SPIFFE ID in the bundle's trust domain.
    AnyInTrustDomain,
}

/// Client-side verifier: chain to the bundle, serverAuth, and the expected SPIFFE ID.
/// Ignores the DNS server name (SPIFFE identities live in the URI SAN).
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    bundle: SharedBundle,
    expected: PeerMatch,
    provider: Arc<CryptoProvider>,
}

impl SpiffeServerVerifier {
    /// A verifier that accepts servers matching `expected` under the current `bundle`.
    pub fn new(bundle: SharedBundle, expected: PeerMatch) -> Arc<Self> {
        Arc::new(Self {
            bundle,
            expected,
            provider: provider(),
        })
    }
}

/// Server-side verifier: client chain to the bundle, clientAuth, SPIFFE ID in the trust domain.
/// With `optional`, a client may present no certificate (the SDS server lets token holders in).
#[derive(Debug)]
pub struct SpiffeClientVerifier {
    bundle: SharedBundle,
    optional: bool,
    provider: Arc<CryptoProvider>,
}

impl SpiffeClientVerifier {
    /// A verifier for client certificates under the current `bundle`.
    pub fn new(bundle: SharedBundle, optional: bool) -> Arc<Self> {
        Arc::new(Self {
            bundle,
            optional,
            provider: provider(),
        })
    }
}

/// Serves the current SVID for both client and server handshakes; swapped atomically.
#[derive(Debug)]
pub struct SvidResolver {
    current: ArcSwap<Option<Arc<CertifiedKey>>>,
}

impl SvidResolver {
    /// A resolver with no SVID yet (handshakes fail until [`SvidResolver::install`]).
    pub fn empty() -> Arc<Self> {
        todo!()
    }

    /// Builds the rustls signing key from `svid` and swaps it in. New handshakes use it;
    /// established connections keep theirs.
    pub fn install(&self, svid: &Svid) -> Result<(), SvidError> {
        todo!("{svid:?}")
    }

    /// True once an SVID is installed.
    pub fn is_ready(&self) -> bool {
        self.current.load().is_some()
    }
}

/// A server config presenting `resolver`'s SVID and verifying clients with `verifier`.
/// ALPN `h2` then `http/1.1`; no 0-RTT.
pub fn server_config(
    resolver: Arc<SvidResolver>,
    verifier: Arc<SpiffeClientVerifier>,
    policy: TlsPolicy,
    alpn: &[&[u8]],
) -> Result<rustls::ServerConfig, rustls::Error> {
    todo!("{resolver:?} {verifier:?} {policy:?} {}", alpn.len())
}

/// A client config presenting `resolver`'s SVID (if any) and verifying with `verifier`.
pub fn client_config(
    resolver: Option<Arc<SvidResolver>>,
    verifier: Arc<SpiffeServerVerifier>,
    policy: TlsPolicy,
    alpn: &[&[u8]],
) -> Result<rustls::ClientConfig, rustls::Error> {
    todo!("{resolver:?} {verifier:?} {policy:?} {}", alpn.len())
}

/// The SPIFFE ID of a verified peer, read from the leaf rustls kept for the connection.
pub fn peer_spiffe_id(
    peer_certs: Option<&[rustls_pki_types::CertificateDer<'_>]>,
) -> Option<SpiffeId> {
    let leaf = peer_certs?.first()?;
    crate::cert_facts(leaf).ok()?.leaf_spiffe_id().ok()
}
