//! The data path's rustls configs, built once per listener or upstream at bind time, and TLS
//! session resumption between sidecars.
//!
//! The configs read the current SVID (resolver) and trust bundle (verifiers) on every handshake,
//! so an SVID rotation or a bundle change needs no rebuild.
//!
//! ## Resumption
//! The issue asks for TLS 1.3 tickets with three constraints; each is met here:
//!
//! 1. *Ticket keys rotated.* [`SessionTicketer`] encrypts with a fresh key every
//!    `TICKET_LIFETIME / 2` and erases a key one rotation later, so no key outlives
//!    [`TICKET_LIFETIME`] (1 h).
//! 2. *A resumed session never outlives the certificates it was first authenticated with.*
//!    A resumed handshake skips the verifier, so after it the peer's stored chain (rustls keeps
//!    it in the ticket) is verified again against the *current* bundle at the *current* time
//!    ([`recheck_resumed_client`], [`recheck_resumed_server`]); a failure closes the connection.
//!    Tickets also carry their issue time and are refused after [`TICKET_LIFETIME`], whatever
//!    the client claims.
//! 3. *The caller identity policy sees is the same as on a full handshake.* It is read from
//!    the same leaf (rustls restores the client chain from the ticket), and re-verified.
//!
//! Never 0-RTT: early data is off in both configs (`trellis_identity::tls`).

use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::client::{ClientSessionMemoryCache, ClientSessionStore, Resumption};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::server::ProducesTickets;
use rustls::{ClientConfig, HandshakeKind, ServerConfig};
use trellis_identity::tls::{
    PeerMatch, SharedBundle, SpiffeClientVerifier, SpiffeServerVerifier, TlsPolicy,
};
use trellis_identity::{verify_svid_chain, SpiffeId, SvidError, Usage};

use crate::svid_store::SvidStore;

/// ALPN for HTTP/2 between sidecars.
pub const ALPN_H2: &[u8] = b"h2";

/// HTTP/2 stream receive window (both directions between sidecars). Large enough that a
/// loopback or LAN hop streams at full speed; it bounds memory per stream, not per connection.
pub const H2_STREAM_WINDOW: u32 = 1 << 20;
/// HTTP/2 connection receive window: a few streams' worth, since every app request of an
/// upstream shares one connection.
pub const H2_CONNECTION_WINDOW: u32 = 4 << 20;
/// Most bytes hyper buffers per stream on the sending side.
pub const H2_MAX_SEND_BUF: usize = 400 << 10;
/// ALPN for the HTTP/1.1 fallback.
pub const ALPN_HTTP11: &[u8] = b"http/1.1";
/// What HTTP listeners and HTTP upstreams offer, in preference order.
pub const ALPN_HTTP: &[&[u8]] = &[ALPN_H2, ALPN_HTTP11];
/// Raw TCP forwards negotiate no ALPN.
pub const ALPN_NONE: &[&[u8]] = &[];

/// Longest a ticket is accepted after it was issued (and the lifetime hint clients get).
pub const TICKET_LIFETIME: Duration = Duration::from_secs(3600);
/// Tickets a server sends after each handshake (a client uses each ticket once).
pub const TICKETS_PER_HANDSHAKE: usize = 2;
/// Tickets a client remembers per upstream config. Each upstream has its own config and cache
/// and talks to one server name, so this is one server's worth: rustls keeps up to 8 TLS 1.3
/// tickets per server (`ClientSessionMemoryCache::new(n)` remembers `ceil(n / 8)` servers).
pub const CLIENT_SESSIONS: usize = 8;

fn io_err(e: rustls::Error) -> std::io::Error {
    std::io::Error::other(format!("cannot build TLS config: {e}"))
}

/// A server config for an mTLS listener: client certificate required and verified against the
/// store's bundle, the store's SVID presented, tickets from `ticketer`.
pub fn server_config(
    store: &SvidStore,
    policy: TlsPolicy,
    alpn: &[&[u8]],
    ticketer: Arc<dyn ProducesTickets>,
) -> std::io::Result<Arc<ServerConfig>> {
    let verifier = SpiffeClientVerifier::new(store.bundle(), false);
    let mut config = trellis_identity::tls::server_config(store.resolver(), verifier, policy, alpn)
        .map_err(io_err)?;
    // Stateless tickets only (no server-side session cache to grow).
    config.ticketer = ticketer;
    config.send_tls13_tickets = TICKETS_PER_HANDSHAKE;
    Ok(Arc::new(config))
}

/// A client config for one upstream: our SVID as client certificate, the server verified
/// against the bundle *and* `expected` inside the handshake, sessions remembered in the
/// returned cache (one cache per config, so no upstream ever resumes another's session).
pub fn client_config(
    store: &SvidStore,
    expected: &SpiffeId,
    policy: TlsPolicy,
    alpn: &[&[u8]],
) -> std::io::Result<(Arc<ClientConfig>, Arc<ClientSessionMemoryCache>)> {
    let verifier = SpiffeServerVerifier::new(store.bundle(), PeerMatch::Exact(expected.clone()));
    let mut config =
        trellis_identity::tls::client_config(Some(store.resolver()), verifier, policy, alpn)
            .map_err(io_err)?;
    let sessions = Arc::new(ClientSessionMemoryCache::new(CLIENT_SESSIONS));
    config.resumption = Resumption::store(sessions.clone());
    Ok((Arc::new(config), sessions))
}

/// Waits up to `timeout` until `store` holds an SVID; true if it does. A sidecar that has just
/// started has no certificate until the control plane answers (a few milliseconds, normally):
/// a connection that arrives in that moment waits for it instead of failing its handshake.
pub async fn wait_for_svid(store: &SvidStore, timeout: Duration) -> bool {
    if store.current().is_some() {
        return true;
    }
    let mut installed = store.subscribe();
    let wait = async {
        while store.current().is_none() {
            if installed.changed().await.is_err() {
                // The store is gone; nothing will ever be installed.
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::time::timeout(timeout, wait).await.is_ok()
}

/// Drops every remembered session for `server`, so the next connection does a full handshake.
pub fn forget_sessions(sessions: &ClientSessionMemoryCache, server: &ServerName<'static>) {
    while sessions.take_tls13_ticket(server).is_some() {}
    sessions.remove_tls12_session(server);
}

/// True when the handshake on `kind` resumed a session (and so skipped the verifier).
pub fn is_resumed(kind: Option<HandshakeKind>) -> bool {
    kind == Some(HandshakeKind::Resumed)
}

/// Re-verifies a resumed client's stored chain against the current bundle at `now`, as the
/// verifier would on a full handshake. Returns the caller's SPIFFE ID.
pub fn recheck_resumed_client(
    peer_certs: Option<&[CertificateDer<'_>]>,
    bundle: &SharedBundle,
    now: SystemTime,
) -> Result<SpiffeId, SvidError> {
    let chain = peer_certs.ok_or(SvidError::EmptyChain)?;
    verify_svid_chain(chain, &bundle.load(), now, Usage::Client)
}

/// Re-verifies a resumed server's stored chain against the current bundle at `now`, and that it
/// still is `expected`.
pub fn recheck_resumed_server(
    peer_certs: Option<&[CertificateDer<'_>]>,
    bundle: &SharedBundle,
    expected: &SpiffeId,
    now: SystemTime,
) -> Result<(), SvidError> {
    let chain = peer_certs.ok_or(SvidError::EmptyChain)?;
    let presented = verify_svid_chain(chain, &bundle.load(), now, Usage::Server)?;
    if presented != *expected {
        return Err(SvidError::WrongIdentity {
            expected: expected.to_string(),
            presented: presented.to_string(),
        });
    }
    Ok(())
}

/// Rotating ticket keys with a hard ticket lifetime.
///
/// Each key is a fresh `rustls::crypto::aws_lc_rs::Ticketer` (RFC 5077: AES-256-CBC and HMAC-SHA256, random keys).
/// It encrypts for `lifetime / 2`, then only decrypts for `lifetime / 2`, then is dropped.
/// Every ticket's plaintext starts with its issue time (unix seconds, big-endian), checked on
/// decryption: a ticket older than `lifetime` is refused even while its key is still around.
pub struct SessionTicketer {
    lifetime_secs: u64,
    keys: RwLock<TicketKeys>,
}

struct TicketKeys {
    current: Arc<dyn ProducesTickets>,
    previous: Option<Arc<dyn ProducesTickets>>,
    rotate_at: u64,
}

impl std::fmt::Debug for SessionTicketer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionTicketer")
            .field("lifetime_secs", &self.lifetime_secs)
            .finish_non_exhaustive()
    }
}

/// The key that encrypts now, and the one before it (decrypt only).
type KeyPair = (Arc<dyn ProducesTickets>, Option<Arc<dyn ProducesTickets>>);

const STAMP: usize = 8;

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl SessionTicketer {
    /// Tickets valid for [`TICKET_LIFETIME`].
    pub fn new() -> std::io::Result<Arc<Self>> {
        Self::with_lifetime(TICKET_LIFETIME, unix_now())
    }

    fn with_lifetime(lifetime: Duration, now: u64) -> std::io::Result<Arc<Self>> {
        let lifetime_secs = lifetime.as_secs().max(2);
        Ok(Arc::new(Self {
            lifetime_secs,
            keys: RwLock::new(TicketKeys {
                current: new_key()?,
                previous: None,
                rotate_at: now + lifetime_secs / 2,
            }),
        }))
    }

    /// Rotates if due; returns the keys to use.
    fn keys(&self, now: u64) -> Option<KeyPair> {
        {
            let keys = self.keys.read().ok()?;
            if now < keys.rotate_at {
                return Some((keys.current.clone(), keys.previous.clone()));
            }
        }
        let fresh = new_key().ok()?;
        let mut keys = self.keys.write().ok()?;
        if now >= keys.rotate_at {
            let half = self.lifetime_secs / 2;
            // More than a whole rotation late (idle server): the old key is past its life too.
            let old = std::mem::replace(&mut keys.current, fresh);
            keys.previous = (now < keys.rotate_at + half).then_some(old);
            keys.rotate_at = now + half;
        }
        Some((keys.current.clone(), keys.previous.clone()))
    }

    fn encrypt_at(&self, plain: &[u8], now: u64) -> Option<Vec<u8>> {
        let (current, _) = self.keys(now)?;
        let mut stamped = Vec::with_capacity(STAMP + plain.len());
        stamped.extend_from_slice(&now.to_be_bytes());
        stamped.extend_from_slice(plain);
        current.encrypt(&stamped)
    }

    fn decrypt_at(&self, cipher: &[u8], now: u64) -> Option<Vec<u8>> {
        let (current, previous) = self.keys(now)?;
        let mut plain = current
            .decrypt(cipher)
            .or_else(|| previous.and_then(|p| p.decrypt(cipher)))?;
        let stamp: [u8; STAMP] = plain.get(..STAMP)?.try_into().ok()?;
        let issued = u64::from_be_bytes(stamp);
        // Refuse tickets from the future (clock stepped back) and past their lifetime.
        if issued > now || now - issued > self.lifetime_secs {
            return None;
        }
        plain.drain(..STAMP);
        Some(plain)
    }
}

fn new_key() -> std::io::Result<Arc<dyn ProducesTickets>> {
    rustls::crypto::aws_lc_rs::Ticketer::new().map_err(io_err)
}

impl ProducesTickets for SessionTicketer {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        u32::try_from(self.lifetime_secs).unwrap_or(u32::MAX)
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        self.encrypt_at(plain, unix_now())
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        self.decrypt_at(cipher, unix_now())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const T0: u64 = 1_700_000_000;

    #[test]
    fn ticket_round_trips_within_its_lifetime() {
        let t = SessionTicketer::with_lifetime(Duration::from_secs(3600), T0).unwrap();
        let c = t.encrypt_at(b"session", T0).unwrap();
        assert_eq!(t.decrypt_at(&c, T0 + 3599).unwrap(), b"session");
        assert_eq!(t.lifetime(), 3600);
    }

    #[test]
    fn ticket_is_refused_after_its_lifetime() {
        let t = SessionTicketer::with_lifetime(Duration::from_secs(3600), T0).unwrap();
        let c = t.encrypt_at(b"session", T0 + 1700).unwrap();
        // The key rotated at T0+1800 and is kept as `previous` until T0+3600.
        assert_eq!(t.decrypt_at(&c, T0 + 1900).unwrap(), b"session");
        let late = t.encrypt_at(b"late", T0 + 1799).unwrap();
        assert!(t.decrypt_at(&late, T0 + 1799 + 3601).is_none());
    }

    #[test]
    fn keys_are_erased_after_two_rotations() {
        let t = SessionTicketer::with_lifetime(Duration::from_secs(3600), T0).unwrap();
        let c = t.encrypt_at(b"session", T0 + 10).unwrap();
        t.keys(T0 + 1800); // rotation 1: the key becomes `previous`
        t.keys(T0 + 3600); // rotation 2: it is gone
        assert!(t.decrypt_at(&c, T0 + 3600).is_none());
    }

    #[test]
    fn ticket_from_the_future_is_refused() {
        let t = SessionTicketer::with_lifetime(Duration::from_secs(3600), T0).unwrap();
        let c = t.encrypt_at(b"session", T0 + 100).unwrap();
        assert!(t.decrypt_at(&c, T0 + 50).is_none());
    }

    #[test]
    fn garbage_tickets_are_refused_without_panicking() {
        let t = SessionTicketer::with_lifetime(Duration::from_secs(3600), T0).unwrap();
        for junk in [&[][..], &[0u8; 3][..], &[0xffu8; 200][..]] {
            assert!(t.decrypt_at(junk, T0).is_none());
        }
    }
}
