//! Durable state in an embedded SQLite database (`<state-dir>/trellis.db`, mode 0600):
//! join tokens (stored as SHA-256 hashes, never in clear), CA material and scheduled CA
//! rotations, issuance records.
//!
//! Two processes write this file: the running control plane and `trellis token create`.
//! WAL mode lets readers proceed while one writes, and a 5 s busy timeout makes a writer
//! wait for the other instead of failing.

use std::fs::OpenOptions;
use std::net::IpAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use rand::RngCore as _;
use rusqlite::{params, OptionalExtension, TransactionBehavior};
use sha2::Digest as _;
use thiserror::Error;
use trellis_identity::SpiffeId;
use zeroize::Zeroizing;

use crate::attest::join::JOIN_TOKEN_PREFIX;

/// The schema this build reads and writes (`PRAGMA user_version`).
const SCHEMA_VERSION: i64 = 2;

/// How long a writer waits for the other process's write lock before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Random bytes in a join token (256 bits: guessing is hopeless, so no rate limit is needed).
const JOIN_TOKEN_BYTES: usize = 32;

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
    /// The database file could not be created or its mode set to 0600.
    #[error("{path}: cannot create state database: {source}")]
    Create {
        /// The database file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The database was written by a newer Trellis with a schema this build does not know.
    #[error(
        "{path}: state database has schema version {found}, this trellis knows up to \
         {supported}: run a newer trellis or point --state-dir elsewhere"
    )]
    Schema {
        /// The database file.
        path: String,
        /// `user_version` found in the file.
        found: i64,
        /// Highest version this build understands.
        supported: i64,
    },
    /// `trellis ca rotate` while an earlier rotation has not activated yet.
    #[error(
        "a CA rotation is already scheduled to activate at {}; wait until it activates, then rotate again",
        humantime::format_rfc3339_seconds(*activate_at)
    )]
    RotationPending {
        /// When the pending rotation activates.
        activate_at: SystemTime,
    },
    /// A stored value is not what this build wrote (hand-edited or corrupt database).
    #[error("state database holds an invalid value: {0}")]
    Corrupt(String),
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

/// A CA scheduled by `trellis ca rotate`.
pub struct CaRotation {
    /// Row id: later rotations have larger ids.
    pub id: i64,
    /// The CA.
    pub material: CaMaterial,
    /// When it joined the bundle.
    pub prepared_at: SystemTime,
    /// When it starts signing.
    pub activate_at: SystemTime,
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
    /// Tokens and CA material: `synchronous=FULL`, every commit is on disk before we answer.
    conn: Mutex<rusqlite::Connection>,
    /// Issuance records: `synchronous=NORMAL` (still crash-consistent in WAL mode, but a power
    /// loss may drop the last few records). A rotation pushes one SVID per open stream, and an
    /// fsync per record would make 10,000 streams take tens of seconds; the audit log is the
    /// record of truth for issuances, this table is for status and tests.
    log_conn: Mutex<rusqlite::Connection>,
    path: PathBuf,
}

impl Registry {
    /// Opens (creating with mode 0600 and migrating) the database at `path`.
    pub fn open(path: &Path) -> Result<Self, RegistryError> {
        let shown = path.display().to_string();
        // Create the file ourselves so SQLite never creates it with the umask's mode; SQLite
        // gives its -wal and -shm files the main file's permissions.
        let create_err = |source| RegistryError::Create {
            path: shown.clone(),
            source,
        };
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .map_err(create_err)?;
        // An existing file keeps its mode through `open`: tighten it.
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(create_err)?;

        let open_err = |source| RegistryError::Open {
            path: shown.clone(),
            source,
        };
        let conn = Self::connect(path, "FULL").map_err(open_err)?;
        Self::migrate(&conn, &shown)?;
        let log_conn = Self::connect(path, "NORMAL").map_err(open_err)?;
        Ok(Self {
            conn: Mutex::new(conn),
            log_conn: Mutex::new(log_conn),
            path: path.to_path_buf(),
        })
    }

    fn connect(path: &Path, synchronous: &str) -> rusqlite::Result<rusqlite::Connection> {
        let conn = rusqlite::Connection::open(path)?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        let mode: String =
            conn.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            // e.g. a filesystem without shared memory; rollback journal still works, just
            // with readers blocked during writes.
            tracing::warn!(path = %path.display(), %mode, "state database is not in WAL mode");
        }
        conn.pragma_update(None, "synchronous", synchronous)?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        Ok(conn)
    }

    fn migrate(conn: &rusqlite::Connection, shown: &str) -> Result<(), RegistryError> {
        let open_err = |source| RegistryError::Open {
            path: shown.to_string(),
            source,
        };
        // Serialize concurrent first starts (control plane and token CLI) on the write lock.
        let tx = rusqlite::Transaction::new_unchecked(conn, TransactionBehavior::Immediate)
            .map_err(open_err)?;
        let version: i64 = tx
            .pragma_query_value(None, "user_version", |row| row.get(0))
            .map_err(open_err)?;
        if version > SCHEMA_VERSION {
            return Err(RegistryError::Schema {
                path: shown.to_string(),
                found: version,
                supported: SCHEMA_VERSION,
            });
        }
        // Each step takes the schema from version N to N+1; a fresh file runs them all.
        if version < 1 {
            tx.execute_batch(
                "CREATE TABLE join_tokens (
                     hash            TEXT PRIMARY KEY NOT NULL,
                     spiffe_id       TEXT NOT NULL,
                     created_at      INTEGER NOT NULL,
                     expires_at      INTEGER NOT NULL,
                     redeemed_at     INTEGER,
                     redeemed_by_ip  TEXT
                 ) WITHOUT ROWID;
                 CREATE TABLE ca (
                     id          INTEGER PRIMARY KEY CHECK (id = 1),
                     chain_pem   TEXT NOT NULL,
                     bundle_pem  TEXT NOT NULL,
                     key_pem     TEXT NOT NULL
                 );
                 CREATE TABLE issuances (
                     id          INTEGER PRIMARY KEY AUTOINCREMENT,
                     spiffe_id   TEXT NOT NULL,
                     serial      TEXT NOT NULL,
                     not_after   INTEGER NOT NULL,
                     attestor    TEXT NOT NULL,
                     peer        TEXT,
                     issued_at   INTEGER NOT NULL
                 );
                 CREATE INDEX issuances_not_after ON issuances (not_after);",
            )
            .map_err(open_err)?;
        }
        if version < 2 {
            // Scheduled CA rotations (`trellis ca rotate`): each CA joins the bundle at
            // `prepared_at_ms` and signs from `activate_at_ms` (unix milliseconds).
            tx.execute_batch(
                "CREATE TABLE ca_rotations (
                     id              INTEGER PRIMARY KEY AUTOINCREMENT,
                     chain_pem       TEXT NOT NULL,
                     bundle_pem      TEXT NOT NULL,
                     key_pem         TEXT NOT NULL,
                     prepared_at_ms  INTEGER NOT NULL,
                     activate_at_ms  INTEGER NOT NULL
                 );",
            )
            .map_err(open_err)?;
        }
        if version != SCHEMA_VERSION {
            tx.pragma_update(None, "user_version", SCHEMA_VERSION)
                .map_err(open_err)?;
        }
        tx.commit().map_err(open_err)?;
        Ok(())
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn lock(m: &Mutex<rusqlite::Connection>) -> MutexGuard<'_, rusqlite::Connection> {
        // A panic while holding the lock drops (and so rolls back) any open transaction: the
        // connection is still consistent.
        m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Creates a random single-use join token bound to `id`, valid for `ttl` from `now`.
    /// Returns the token in clear; only its hash is stored.
    pub fn create_join_token(
        &self,
        id: &SpiffeId,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<Zeroizing<String>, RegistryError> {
        let mut raw = Zeroizing::new([0u8; JOIN_TOKEN_BYTES]);
        rand::rng().fill_bytes(raw.as_mut());
        let token = Zeroizing::new(format!(
            "{JOIN_TOKEN_PREFIX}{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw.as_ref())
        ));
        let created = unix(now);
        let expires = created.saturating_add(i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX));
        let conn = Self::lock(&self.conn);
        conn.execute(
            "INSERT INTO join_tokens (hash, spiffe_id, created_at, expires_at) VALUES (?1, ?2, ?3, ?4)",
            params![token_hash(&token), id.as_str(), created, expires],
        )?;
        Ok(token)
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
        // The token is looked up by its SHA-256, never compared in clear: a timing difference
        // in the index search can only tell an attacker about the hash of their own guess,
        // which does not help find a 256-bit preimage. So no constant-time compare is needed.
        let hash = token_hash(token);
        let now = unix(now);
        let peer_ip = peer.to_string();
        let mut conn = Self::lock(&self.conn);
        // BEGIN IMMEDIATE takes the write lock before the read, so two redemptions (threads or
        // processes) cannot both see `redeemed_at IS NULL`.
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let row: Option<(String, i64, Option<i64>, Option<String>)> = tx
            .query_row(
                "SELECT spiffe_id, expires_at, redeemed_at, redeemed_by_ip
                 FROM join_tokens WHERE hash = ?1",
                params![hash],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .optional()?;
        let Some((id, expires_at, redeemed_at, redeemed_by_ip)) = row else {
            return Ok(Err(JoinError::Unknown));
        };
        let id = SpiffeId::parse(&id)
            .map_err(|e| RegistryError::Corrupt(format!("join token SPIFFE ID: {e}")))?;
        if expires_at <= now {
            return Ok(Err(JoinError::Expired));
        }
        match redeemed_at {
            None => {
                tx.execute(
                    "UPDATE join_tokens SET redeemed_at = ?1, redeemed_by_ip = ?2 WHERE hash = ?3",
                    params![now, peer_ip, hash],
                )?;
                // Commit (fsync'd: synchronous=FULL) before answering: if we crash after
                // this line the token is spent; if before, the caller got nothing.
                tx.commit()?;
                Ok(Ok(id))
            }
            Some(first) => {
                let window = i64::try_from(window.as_secs()).unwrap_or(i64::MAX);
                let same_ip = redeemed_by_ip.as_deref() == Some(peer_ip.as_str());
                if same_ip && now < first.saturating_add(window) {
                    Ok(Ok(id))
                } else {
                    Ok(Err(JoinError::AlreadyRedeemed))
                }
            }
        }
    }

    /// Stored CA material, if any.
    pub fn load_ca(&self) -> Result<Option<CaMaterial>, RegistryError> {
        let conn = Self::lock(&self.conn);
        Ok(conn
            .query_row(
                "SELECT chain_pem, bundle_pem, key_pem FROM ca WHERE id = 1",
                [],
                |r| {
                    Ok(CaMaterial {
                        chain_pem: r.get(0)?,
                        bundle_pem: r.get(1)?,
                        key_pem: Zeroizing::new(r.get(2)?),
                    })
                },
            )
            .optional()?)
    }

    /// Stores CA material (replacing any).
    pub fn store_ca(&self, material: &CaMaterial) -> Result<(), RegistryError> {
        let conn = Self::lock(&self.conn);
        conn.execute(
            "INSERT OR REPLACE INTO ca (id, chain_pem, bundle_pem, key_pem) VALUES (1, ?1, ?2, ?3)",
            params![
                material.chain_pem,
                material.bundle_pem,
                material.key_pem.as_str()
            ],
        )?;
        Ok(())
    }

    /// Stores `material` unless CA material is already stored, in one transaction; returns
    /// what is stored afterwards. Two control planes starting on one state directory at once
    /// thus agree on a single CA.
    pub fn store_ca_if_absent(&self, material: CaMaterial) -> Result<CaMaterial, RegistryError> {
        let mut conn = Self::lock(&self.conn);
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let existing = tx
            .query_row(
                "SELECT chain_pem, bundle_pem, key_pem FROM ca WHERE id = 1",
                [],
                |r| {
                    Ok(CaMaterial {
                        chain_pem: r.get(0)?,
                        bundle_pem: r.get(1)?,
                        key_pem: Zeroizing::new(r.get(2)?),
                    })
                },
            )
            .optional()?;
        if let Some(existing) = existing {
            return Ok(existing);
        }
        tx.execute(
            "INSERT INTO ca (id, chain_pem, bundle_pem, key_pem) VALUES (1, ?1, ?2, ?3)",
            params![
                material.chain_pem,
                material.bundle_pem,
                material.key_pem.as_str()
            ],
        )?;
        tx.commit()?;
        Ok(material)
    }

    /// Schedules a CA rotation: `material` joins the bundle at `prepared_at` and signs from
    /// `activate_at`. Refused while another rotation is still waiting to activate (at `now`),
    /// so rotations never overtake each other. Returns the rotation's id.
    pub fn add_ca_rotation(
        &self,
        material: &CaMaterial,
        prepared_at: SystemTime,
        activate_at: SystemTime,
        now: SystemTime,
    ) -> Result<i64, RegistryError> {
        let mut conn = Self::lock(&self.conn);
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let pending: Option<i64> = tx
            .query_row(
                "SELECT activate_at_ms FROM ca_rotations WHERE activate_at_ms > ?1
                 ORDER BY activate_at_ms DESC LIMIT 1",
                params![unix_ms(now)],
                |r| r.get(0),
            )
            .optional()?;
        if let Some(at) = pending {
            return Err(RegistryError::RotationPending {
                activate_at: UNIX_EPOCH + Duration::from_millis(u64::try_from(at).unwrap_or(0)),
            });
        }
        tx.execute(
            "INSERT INTO ca_rotations (chain_pem, bundle_pem, key_pem, prepared_at_ms, activate_at_ms)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                material.chain_pem,
                material.bundle_pem,
                material.key_pem.as_str(),
                unix_ms(prepared_at),
                unix_ms(activate_at)
            ],
        )?;
        let id = tx.last_insert_rowid();
        tx.commit()?;
        Ok(id)
    }

    /// Scheduled CA rotations with an id above `after`, oldest first.
    pub fn ca_rotations_after(&self, after: i64) -> Result<Vec<CaRotation>, RegistryError> {
        let conn = Self::lock(&self.conn);
        let mut stmt = conn.prepare_cached(
            "SELECT id, chain_pem, bundle_pem, key_pem, prepared_at_ms, activate_at_ms
             FROM ca_rotations WHERE id > ?1 ORDER BY id",
        )?;
        let rows = stmt.query_map(params![after], |r| {
            let ms = |v: i64| UNIX_EPOCH + Duration::from_millis(u64::try_from(v).unwrap_or(0));
            Ok(CaRotation {
                id: r.get(0)?,
                material: CaMaterial {
                    chain_pem: r.get(1)?,
                    bundle_pem: r.get(2)?,
                    key_pem: Zeroizing::new(r.get(3)?),
                },
                prepared_at: ms(r.get(4)?),
                activate_at: ms(r.get(5)?),
            })
        })?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    /// Appends an issuance record.
    pub fn record_issuance(&self, rec: &IssuanceRecord) -> Result<(), RegistryError> {
        self.record_issuances(std::slice::from_ref(rec))
    }

    /// Appends several issuance records in one transaction (a rotation round).
    pub fn record_issuances(&self, recs: &[IssuanceRecord]) -> Result<(), RegistryError> {
        let mut conn = Self::lock(&self.log_conn);
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        {
            let mut stmt = tx.prepare_cached(
                "INSERT INTO issuances (spiffe_id, serial, not_after, attestor, peer, issued_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?;
            for rec in recs {
                stmt.execute(params![
                    rec.spiffe_id.as_str(),
                    rec.serial_hex,
                    unix(rec.not_after),
                    rec.attestor,
                    rec.peer.map(|p| p.to_string()),
                    unix(rec.issued_at),
                ])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Deletes issuance records whose SVID expired before `expired_before`; returns how many.
    /// Call it now and then (e.g. daily, with a cutoff of some weeks ago) so the table does
    /// not grow without bound.
    pub fn prune_issuances(&self, expired_before: SystemTime) -> Result<u64, RegistryError> {
        let conn = Self::lock(&self.log_conn);
        let n = conn.execute(
            "DELETE FROM issuances WHERE not_after < ?1",
            params![unix(expired_before)],
        )?;
        Ok(n as u64)
    }

    /// Number of issuance records (for tests and status).
    pub fn issuance_count(&self) -> Result<u64, RegistryError> {
        let conn = Self::lock(&self.log_conn);
        let n: i64 = conn.query_row("SELECT COUNT(*) FROM issuances", [], |r| r.get(0))?;
        Ok(u64::try_from(n).unwrap_or(0))
    }
}

/// Lowercase hex SHA-256 of the token: the only form stored.
fn token_hash(token: &str) -> String {
    hex::encode(sha2::Sha256::digest(token.as_bytes()))
}

/// Unix seconds; times before 1970 (a broken clock) count as 0.
fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn unix(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    const WINDOW: Duration = Duration::from_secs(30);

    fn id() -> SpiffeId {
        SpiffeId::parse("spiffe://example.org/host/db-1").unwrap()
    }

    fn t(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
    }

    fn ip(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 0, 0, last))
    }

    fn open() -> (tempfile::TempDir, Registry) {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::open(&dir.path().join("trellis.db")).unwrap();
        (dir, reg)
    }

    #[test]
    fn token_has_prefix_and_256_bits() {
        let (_d, reg) = open();
        let tok = reg
            .create_join_token(&id(), Duration::from_secs(3600), t(0))
            .unwrap();
        let body = tok.strip_prefix(JOIN_TOKEN_PREFIX).unwrap();
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(body)
            .unwrap();
        assert_eq!(raw.len(), 32);
    }

    #[test]
    fn join_token_single_use() {
        let (_d, reg) = open();
        let tok = reg
            .create_join_token(&id(), Duration::from_secs(3600), t(0))
            .unwrap();
        assert_eq!(
            reg.redeem_join_token(&tok, ip(1), t(1), WINDOW).unwrap(),
            Ok(id())
        );
        // From elsewhere, even inside the window: refused.
        assert_eq!(
            reg.redeem_join_token(&tok, ip(2), t(2), WINDOW).unwrap(),
            Err(JoinError::AlreadyRedeemed)
        );
    }

    #[test]
    fn join_token_shared_within_window_same_ip() {
        let (_d, reg) = open();
        let tok = reg
            .create_join_token(&id(), Duration::from_secs(3600), t(0))
            .unwrap();
        for s in [1, 2, 10, 30] {
            assert_eq!(
                reg.redeem_join_token(&tok, ip(1), t(s), WINDOW).unwrap(),
                Ok(id()),
                "at +{s}s"
            );
        }
    }

    #[test]
    fn join_token_refused_from_other_ip() {
        let (_d, reg) = open();
        let tok = reg
            .create_join_token(&id(), Duration::from_secs(3600), t(0))
            .unwrap();
        reg.redeem_join_token(&tok, ip(1), t(1), WINDOW)
            .unwrap()
            .unwrap();
        assert_eq!(
            reg.redeem_join_token(&tok, ip(9), t(1), WINDOW).unwrap(),
            Err(JoinError::AlreadyRedeemed)
        );
    }

    #[test]
    fn join_token_refused_after_window() {
        let (_d, reg) = open();
        let tok = reg
            .create_join_token(&id(), Duration::from_secs(3600), t(0))
            .unwrap();
        reg.redeem_join_token(&tok, ip(1), t(1), WINDOW)
            .unwrap()
            .unwrap();
        // Window is half-open: first + 30 s is already outside.
        assert_eq!(
            reg.redeem_join_token(&tok, ip(1), t(31), WINDOW).unwrap(),
            Err(JoinError::AlreadyRedeemed)
        );
    }

    #[test]
    fn join_token_single_use_across_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trellis.db");
        let tok = {
            let reg = Registry::open(&path).unwrap();
            let tok = reg
                .create_join_token(&id(), Duration::from_secs(3600), t(0))
                .unwrap();
            reg.redeem_join_token(&tok, ip(1), t(1), WINDOW)
                .unwrap()
                .unwrap();
            tok
        };
        let reg = Registry::open(&path).unwrap();
        assert_eq!(
            reg.redeem_join_token(&tok, ip(2), t(2), WINDOW).unwrap(),
            Err(JoinError::AlreadyRedeemed)
        );
        assert_eq!(
            reg.redeem_join_token(&tok, ip(1), t(600), WINDOW).unwrap(),
            Err(JoinError::AlreadyRedeemed)
        );
    }

    #[test]
    fn join_token_expired() {
        let (_d, reg) = open();
        let tok = reg
            .create_join_token(&id(), Duration::from_secs(60), t(0))
            .unwrap();
        // expires_at <= now: the boundary second is already expired.
        assert_eq!(
            reg.redeem_join_token(&tok, ip(1), t(60), WINDOW).unwrap(),
            Err(JoinError::Expired)
        );
    }

    #[test]
    fn unknown_join_token() {
        let (_d, reg) = open();
        reg.create_join_token(&id(), Duration::from_secs(60), t(0))
            .unwrap();
        assert_eq!(
            reg.redeem_join_token("trellis-join.nope", ip(1), t(1), WINDOW)
                .unwrap(),
            Err(JoinError::Unknown)
        );
    }

    #[test]
    fn token_stored_hashed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trellis.db");
        let reg = Registry::open(&path).unwrap();
        let tok = reg
            .create_join_token(&id(), Duration::from_secs(3600), t(0))
            .unwrap();
        drop(reg); // checkpoints the WAL into the main file
        let mut bytes = std::fs::read(&path).unwrap();
        for ext in ["-wal", "-shm"] {
            if let Ok(b) = std::fs::read(format!("{}{ext}", path.display())) {
                bytes.extend(b);
            }
        }
        let body = tok.strip_prefix(JOIN_TOKEN_PREFIX).unwrap();
        assert!(!contains(&bytes, tok.as_bytes()));
        assert!(!contains(&bytes, body.as_bytes()));
        assert!(contains(&bytes, token_hash(&tok).as_bytes()));
    }

    fn contains(hay: &[u8], needle: &[u8]) -> bool {
        hay.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn database_file_mode_is_0600() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trellis.db");
        std::fs::write(&path, b"").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let reg = Registry::open(&path).unwrap();
        reg.create_join_token(&id(), Duration::from_secs(3600), t(0))
            .unwrap();
        for p in [
            path.clone(),
            PathBuf::from(format!("{}-wal", path.display())),
        ] {
            let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", p.display());
        }
    }

    #[test]
    fn rejects_newer_schema() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trellis.db");
        drop(Registry::open(&path).unwrap());
        let c = rusqlite::Connection::open(&path).unwrap();
        c.pragma_update(None, "user_version", 99).unwrap();
        drop(c);
        let err = Registry::open(&path).err().unwrap();
        assert!(
            matches!(err, RegistryError::Schema { found: 99, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("trellis.db"), "{err}");
    }

    #[test]
    fn rejects_file_that_is_not_a_database() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trellis.db");
        std::fs::write(&path, vec![b'x'; 4096]).unwrap();
        let err = Registry::open(&path).err().unwrap();
        assert!(
            err.to_string().starts_with(&path.display().to_string()),
            "{err}"
        );
    }

    #[test]
    fn ca_material_round_trips_and_first_store_wins() {
        let (_d, reg) = open();
        assert!(reg.load_ca().unwrap().is_none());
        let m = |s: &str| CaMaterial {
            chain_pem: format!("chain {s}"),
            bundle_pem: format!("bundle {s}"),
            key_pem: Zeroizing::new(format!("key {s}")),
        };
        let kept = reg.store_ca_if_absent(m("a")).unwrap();
        assert_eq!(kept.chain_pem, "chain a");
        let kept = reg.store_ca_if_absent(m("b")).unwrap();
        assert_eq!(kept.key_pem.as_str(), "key a");
        reg.store_ca(&m("c")).unwrap();
        let loaded = reg.load_ca().unwrap().unwrap();
        assert_eq!(loaded.bundle_pem, "bundle c");
    }

    #[test]
    fn issuance_records_count_and_prune() {
        let (_d, reg) = open();
        let rec = |not_after| IssuanceRecord {
            spiffe_id: id(),
            serial_hex: "01ab".into(),
            not_after,
            attestor: "join_token",
            peer: Some("10.0.0.1:5000".parse().unwrap()),
            issued_at: t(0),
        };
        reg.record_issuance(&rec(t(100))).unwrap();
        reg.record_issuances(&[rec(t(200)), rec(t(300))]).unwrap();
        assert_eq!(reg.issuance_count().unwrap(), 3);
        assert_eq!(reg.prune_issuances(t(250)).unwrap(), 2);
        assert_eq!(reg.issuance_count().unwrap(), 1);
    }

    #[test]
    fn concurrent_redemptions_from_two_connections_agree() {
        // Two Registry handles on one file stand in for two processes.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trellis.db");
        let a = Registry::open(&path).unwrap();
        let b = Registry::open(&path).unwrap();
        let tok = a
            .create_join_token(&id(), Duration::from_secs(3600), t(0))
            .unwrap();
        let ra = a.redeem_join_token(&tok, ip(1), t(1), WINDOW).unwrap();
        let rb = b.redeem_join_token(&tok, ip(2), t(1), WINDOW).unwrap();
        assert_eq!(ra, Ok(id()));
        assert_eq!(rb, Err(JoinError::AlreadyRedeemed));
    }

    #[test]
    fn ca_rotations_are_stored_in_order_and_never_overtake() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::open(&dir.path().join("trellis.db")).unwrap();
        let m = |s: &str| CaMaterial {
            chain_pem: s.into(),
            bundle_pem: s.into(),
            key_pem: Zeroizing::new(s.into()),
        };
        let first = reg.add_ca_rotation(&m("a"), t(0), t(60), t(0)).unwrap();
        // Pending until t(60): a second one is refused, naming when the first activates.
        let err = reg
            .add_ca_rotation(&m("b"), t(10), t(70), t(10))
            .unwrap_err();
        assert!(
            matches!(err, RegistryError::RotationPending { .. }),
            "{err}"
        );
        let second = reg.add_ca_rotation(&m("b"), t(61), t(120), t(61)).unwrap();
        assert!(second > first);
        let all = reg.ca_rotations_after(0).unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].material.chain_pem, "a");
        assert_eq!(all[0].activate_at, t(60));
        assert_eq!(reg.ca_rotations_after(first).unwrap().len(), 1);
    }

    #[test]
    fn a_version_1_database_is_migrated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trellis.db");
        {
            let conn = rusqlite::Connection::open(&path).unwrap();
            conn.execute_batch(
                "CREATE TABLE ca (id INTEGER PRIMARY KEY, chain_pem TEXT, bundle_pem TEXT, key_pem TEXT);
                 INSERT INTO ca VALUES (1, 'c', 'b', 'k');
                 PRAGMA user_version = 1;",
            )
            .unwrap();
        }
        let reg = Registry::open(&path).unwrap();
        assert_eq!(reg.load_ca().unwrap().unwrap().chain_pem, "c");
        assert!(reg.ca_rotations_after(0).unwrap().is_empty());
    }
}
