//! Durable state in an embedded SQLite database (`<state-dir>/trellis.db`, mode 0600):
//! join tokens (stored as SHA-256 hashes, never in clear), CA material, issuance records.

use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, SystemTime};

use thiserror::Error;
use trellis_identity::SpiffeId;
use zeroize::Zeroizing;

/// Registry failures.
#[derive(Debug, Error)]
pub enum RegistryError {
    /// The database could not be opened or migrated.
    #[error("{path}: cannot open state database: {source}")]
    Open {
        /// The database file.
        path: String,
        /// SQLite's error.
        source: rusqlite::Error,
    },
    /// A query failed.
    #[error("state database error: {0}")]
    Db(#[from] rusqlite::Error),
}

/// Why a join token was refused. Each maps to a stable metric reason.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum JoinError {
    /// No token with that hash.
    #[error("join token is unknown")]
    Unknown,
    /// Past its TTL.
    #[error("join token expired")]
    Expired,
    /// Already redeemed, outside the redemption window or from another address.
    #[error("join token was already redeemed")]
    AlreadyRedeemed,
}

/// CA material as stored: PEM chain (signing cert first) and PEM key.
pub struct CaMaterial {
    /// The signing certificate, then any intermediates up to (and excluding) the root.
    pub chain_pem: String,
    /// The trust bundle roots, PEM.
    pub bundle_pem: String,
    /// The signing key, PEM; zeroized on drop.
    pub key_pem: Zeroizing<String>,
}

/// One issued SVID, as recorded.
#[derive(Debug, Clone)]
pub struct IssuanceRecord {
    /// Issued identity.
    pub spiffe_id: SpiffeId,
    /// Leaf serial, hex.
    pub serial_hex: String,
    /// Leaf notAfter.
    pub not_after: SystemTime,
    /// Which attestor admitted the caller (`k8s`, `join_token`, `svid`).
    pub attestor: &'static str,
    /// Where the request came from.
    pub peer: Option<std::net::SocketAddr>,
    /// When.
    pub issued_at: SystemTime,
}

/// The SQLite-backed registry. Cheap operations; callers on async threads wrap in `spawn_blocking`
/// only where it matters.
pub struct Registry {
    conn: std::sync::Mutex<rusqlite::Connection>,
}

impl Registry {
    /// Opens (creating with mode 0600 and migrating) the database at `path`.
    pub fn open(path: &Path) -> Result<Self, RegistryError> {
        todo!("{}", path.display())
    }

    /// Creates a random single-use join token bound to `id`, valid for `ttl` from `now`.
    /// Returns the token in clear; only its hash is stored.
    pub fn create_join_token(
        &self,
        id: &SpiffeId,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<Zeroizing<String>, RegistryError> {
        todo!("{id} {ttl:?} {now:?}")
    }

    /// Redeems a join token. The first redemption records `peer` and `now` durably *before*
    /// returning; a later call succeeds only from the same peer IP within `window` of the
    /// first (the streams one client opens in its first seconds share the redemption).
    pub fn redeem_join_token(
        &self,
        token: &str,
        peer: IpAddr,
        now: SystemTime,
        window: Duration,
    ) -> Result<Result<SpiffeId, JoinError>, RegistryError> {
        todo!("{} {peer} {now:?} {window:?}", token.len())
    }

    /// Stored CA material, if any.
    pub fn load_ca(&self) -> Result<Option<CaMaterial>, RegistryError> {
        todo!()
    }

    /// Stores CA material (replacing any).
    pub fn store_ca(&self, material: &CaMaterial) -> Result<(), RegistryError> {
        todo!("{}", material.chain_pem.len())
    }

    /// Appends an issuance record.
    pub fn record_issuance(&self, rec: &IssuanceRecord) -> Result<(), RegistryError> {
        todo!("{rec:?}")
    }

    /// Number of issuance records (for tests and status).
    pub fn issuance_count(&self) -> Result<u64, RegistryError> {
        todo!()
    }
}
