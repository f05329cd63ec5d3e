//! The single-node registry: an embedded SQLite database (`<state-dir>/trellis.db`, mode 0600).
//!
//! Two processes write this file: the running control plane and `trellis token create`.
//! WAL mode lets readers proceed while one writes, and a 5 s busy timeout makes a writer
//! wait for the other instead of failing.

use std::fs::OpenOptions;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::{params, OptionalExtension, TransactionBehavior};
use trellis_identity::SpiffeId;
use trellis_transparency::{Hash, LogBody, SignedTreeHead, StoredEntry};
use zeroize::Zeroizing;

use super::model::{
    from_unix_ms, CaMaterial, CaRotation, FederatedBundleRow, IssuanceRecord, IssuanceRow,
    JoinError, JwtKeyRow, LogAppend, NewToken, Redeem, RegistryError, TokenRow, Verdict,
    SCHEMA_VERSION,
};

mod log;

/// How long a writer waits for the other process's write lock before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The SQLite store behind a [`super::Registry`].
pub struct SqliteStore {
    /// Tokens and CA material: `synchronous=FULL`, every commit is on disk before we answer.
    conn: Mutex<rusqlite::Connection>,
    /// Issuance records: `synchronous=NORMAL` (still crash-consistent in WAL mode, but a power
    /// loss may drop the last few records). A rotation pushes one SVID per open stream, and an
    /// fsync per record would make 10,000 streams take tens of seconds; the audit log is the
    /// record of truth for issuances, this table is for status and tests.
    log_conn: Mutex<rusqlite::Connection>,
}

impl SqliteStore {
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
        if version < 3 {
            // Split join tokens: a row is found by `selector` (public) and `hash` now holds
            // the SHA-256 of the verifier only, compared in constant time. Rows from earlier
            // builds (`hash` of the whole token, no selector) are never found by selector:
            // their tokens are refused by shape. Adding a column, not a table, keeps the rows
            // readable by a process still running the previous build during an upgrade.
            tx.execute_batch(
                "ALTER TABLE join_tokens ADD COLUMN selector TEXT;
                 CREATE UNIQUE INDEX join_tokens_selector ON join_tokens (selector);",
            )
            .map_err(open_err)?;
        }
        if version < 4 {
            // The issuance transparency log (trellis-transparency): entries appended in the
            // transaction that records each issuance, heads signed by the log key, the CA
            // phases already logged (once each), and the log key itself. Never pruned.
            tx.execute_batch(
                "CREATE TABLE log_entries (
                     idx        INTEGER PRIMARY KEY,
                     entry      BLOB NOT NULL,
                     leaf_hash  BLOB NOT NULL,
                     serial     TEXT
                 );
                 CREATE INDEX log_entries_serial ON log_entries (serial);
                 CREATE TABLE log_heads (
                     tree_size     INTEGER PRIMARY KEY,
                     root_hash     BLOB NOT NULL,
                     timestamp_ms  INTEGER NOT NULL,
                     key_id        TEXT NOT NULL,
                     signature     BLOB NOT NULL
                 );
                 CREATE TABLE log_ca_phases (
                     ca_sha256  BLOB NOT NULL,
                     phase      TEXT NOT NULL,
                     PRIMARY KEY (ca_sha256, phase)
                 ) WITHOUT ROWID;
                 CREATE TABLE log_key (
                     id     INTEGER PRIMARY KEY CHECK (id = 1),
                     pkcs8  BLOB NOT NULL
                 );",
            )
            .map_err(open_err)?;
        }
        if version < 5 {
            // JWT-SVID signing keys: each signs in [sign_from_ms, sign_until_ms); one key per
            // window start, so replicas racing to add the next key agree on one.
            tx.execute_batch(
                "CREATE TABLE jwt_keys (
                     kid            TEXT PRIMARY KEY NOT NULL,
                     pkcs8          BLOB NOT NULL,
                     sign_from_ms   INTEGER NOT NULL UNIQUE,
                     sign_until_ms  INTEGER NOT NULL
                 );",
            )
            .map_err(open_err)?;
        }
        if version < 6 {
            // SPIFFE federation: the last good bundle of each federated trust domain, so a
            // restart (or another replica) starts from it instead of the bootstrap bundle.
            tx.execute_batch(
                "CREATE TABLE IF NOT EXISTS federated_bundles (
                     trust_domain   TEXT PRIMARY KEY NOT NULL,
                     sequence       INTEGER NOT NULL,
                     bundle_pem     TEXT NOT NULL,
                     fetched_at_ms  INTEGER NOT NULL
                 ) WITHOUT ROWID;",
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

    fn lock(m: &Mutex<rusqlite::Connection>) -> MutexGuard<'_, rusqlite::Connection> {
        // A panic while holding the lock drops (and so rolls back) any open transaction: the
        // connection is still consistent.
        m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(super) fn insert_token(&self, row: &NewToken) -> Result<(), RegistryError> {
        let conn = Self::lock(&self.conn);
        conn.execute(
            "INSERT INTO join_tokens (selector, hash, spiffe_id, created_at, expires_at)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                row.selector,
                row.verifier_hash,
                row.spiffe_id,
                row.created_at,
                row.expires_at
            ],
        )?;
        Ok(())
    }

    pub(super) fn redeem(
        &self,
        attempt: &Redeem,
    ) -> Result<Result<SpiffeId, JoinError>, RegistryError> {
        let mut conn = Self::lock(&self.conn);
        // BEGIN IMMEDIATE takes the write lock before the read, so two redemptions (threads or
        // processes) cannot both see `redeemed_at IS NULL`.
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let row = tx
            .query_row(
                "SELECT hash, spiffe_id, expires_at, redeemed_at, redeemed_by_ip
                 FROM join_tokens WHERE selector = ?1",
                params![attempt.selector],
                |r| {
                    Ok(TokenRow {
                        verifier_hash: r.get(0)?,
                        spiffe_id: r.get(1)?,
                        expires_at: r.get(2)?,
                        redeemed_at: r.get(3)?,
                        redeemed_by_ip: r.get(4)?,
                    })
                },
            )
            .optional()?;
        let Some(row) = row else {
            return Ok(Err(JoinError::Unknown));
        };
        match attempt.judge(row)? {
            Verdict::First(id) => {
                tx.execute(
                    "UPDATE join_tokens SET redeemed_at = ?1, redeemed_by_ip = ?2
                     WHERE selector = ?3",
                    params![attempt.now, attempt.peer_ip, attempt.selector],
                )?;
                // Commit (fsync'd: synchronous=FULL) before answering: if we crash after
                // this line the token is spent; if before, the caller got nothing.
                tx.commit()?;
                Ok(Ok(id))
            }
            Verdict::Again(id) => Ok(Ok(id)),
            Verdict::Refuse(why) => Ok(Err(why)),
        }
    }

    pub(super) fn load_ca(&self) -> Result<Option<CaMaterial>, RegistryError> {
        let conn = Self::lock(&self.conn);
        Ok(Self::read_ca(&conn)?)
    }

    fn read_ca(conn: &rusqlite::Connection) -> rusqlite::Result<Option<CaMaterial>> {
        conn.query_row(
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
        .optional()
    }

    pub(super) fn store_ca(&self, material: &CaMaterial) -> Result<(), RegistryError> {
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

    pub(super) fn store_ca_if_absent(
        &self,
        material: CaMaterial,
    ) -> Result<CaMaterial, RegistryError> {
        let mut conn = Self::lock(&self.conn);
        // The write lock first: a second process waits here, then reads what the first stored.
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        if let Some(existing) = Self::read_ca(&tx)? {
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

    pub(super) fn add_ca_rotation(
        &self,
        material: &CaMaterial,
        prepared_at_ms: i64,
        activate_at_ms: i64,
        now_ms: i64,
    ) -> Result<i64, RegistryError> {
        let mut conn = Self::lock(&self.conn);
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let pending: Option<i64> = tx
            .query_row(
                "SELECT activate_at_ms FROM ca_rotations WHERE activate_at_ms > ?1
                 ORDER BY activate_at_ms DESC LIMIT 1",
                params![now_ms],
                |r| r.get(0),
            )
            .optional()?;
        if let Some(at) = pending {
            return Err(RegistryError::RotationPending {
                activate_at: from_unix_ms(at),
            });
        }
        tx.execute(
            "INSERT INTO ca_rotations (chain_pem, bundle_pem, key_pem, prepared_at_ms, activate_at_ms)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                material.chain_pem,
                material.bundle_pem,
                material.key_pem.as_str(),
                prepared_at_ms,
                activate_at_ms
            ],
        )?;
        let id = tx.last_insert_rowid();
        tx.commit()?;
        Ok(id)
    }

    pub(super) fn ca_rotations_after(&self, after: i64) -> Result<Vec<CaRotation>, RegistryError> {
        let conn = Self::lock(&self.conn);
        let mut stmt = conn.prepare_cached(
            "SELECT id, chain_pem, bundle_pem, key_pem, prepared_at_ms, activate_at_ms
             FROM ca_rotations WHERE id > ?1 ORDER BY id",
        )?;
        let rows = stmt.query_map(params![after], |r| {
            Ok(CaRotation {
                id: r.get(0)?,
                material: CaMaterial {
                    chain_pem: r.get(1)?,
                    bundle_pem: r.get(2)?,
                    key_pem: Zeroizing::new(r.get(3)?),
                },
                prepared_at: from_unix_ms(r.get(4)?),
                activate_at: from_unix_ms(r.get(5)?),
            })
        })?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    pub(super) fn record_issuances(
        &self,
        recs: &[IssuanceRecord],
        time_ms: u64,
    ) -> Result<(), RegistryError> {
        let mut conn = Self::lock(&self.log_conn);
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        {
            let mut stmt = tx.prepare_cached(
                "INSERT INTO issuances (spiffe_id, serial, not_after, attestor, peer, issued_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?;
            for rec in recs {
                let row = IssuanceRow::from(rec);
                stmt.execute(params![
                    row.spiffe_id,
                    row.serial,
                    row.not_after,
                    row.attestor,
                    row.peer,
                    row.issued_at,
                ])?;
            }
        }
        let appends: Vec<LogAppend<'_>> = recs.iter().map(LogAppend::of).collect();
        log::append(&tx, &appends, time_ms)?;
        tx.commit()?;
        Ok(())
    }

    /// Deletes at most `limit` records that expired before `expired_before`, in one
    /// transaction (the caller repeats until fewer are deleted).
    pub(super) fn prune_issuances(
        &self,
        expired_before: i64,
        limit: i64,
    ) -> Result<u64, RegistryError> {
        let conn = Self::lock(&self.log_conn);
        let n = conn.execute(
            "DELETE FROM issuances WHERE id IN
                 (SELECT id FROM issuances WHERE not_after < ?1 LIMIT ?2)",
            params![expired_before, limit],
        )?;
        Ok(n as u64)
    }

    pub(super) fn issuance_count(&self) -> Result<u64, RegistryError> {
        let conn = Self::lock(&self.log_conn);
        let n: i64 = conn.query_row("SELECT COUNT(*) FROM issuances", [], |r| r.get(0))?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    pub(super) fn record_ca_phase(
        &self,
        body: &LogBody,
        time_ms: u64,
    ) -> Result<(), RegistryError> {
        let mut conn = Self::lock(&self.log_conn);
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        log::append(&tx, &[LogAppend { body, serial: None }], time_ms)?;
        tx.commit()?;
        Ok(())
    }

    pub(super) fn log_leaf_hashes(
        &self,
        from: u64,
        limit: u64,
    ) -> Result<Vec<Hash>, RegistryError> {
        log::leaf_hashes(&Self::lock(&self.log_conn), from, limit)
    }

    pub(super) fn log_entries(
        &self,
        from: u64,
        to: u64,
    ) -> Result<Vec<StoredEntry>, RegistryError> {
        log::entries(&Self::lock(&self.log_conn), from, to)
    }

    pub(super) fn log_index_of_serial(
        &self,
        serial_hex: &str,
    ) -> Result<Option<u64>, RegistryError> {
        log::index_of_serial(&Self::lock(&self.log_conn), serial_hex)
    }

    pub(super) fn log_heads(&self) -> Result<Vec<SignedTreeHead>, RegistryError> {
        log::heads(&Self::lock(&self.conn))
    }

    pub(super) fn latest_log_head(&self) -> Result<Option<SignedTreeHead>, RegistryError> {
        log::latest_head(&Self::lock(&self.conn))
    }

    /// On the fully synchronous connection: its commit also makes every entry the head
    /// covers durable (one WAL), so a power loss can never leave a head over lost entries.
    pub(super) fn insert_log_head(
        &self,
        sth: &SignedTreeHead,
    ) -> Result<SignedTreeHead, RegistryError> {
        log::insert_head(&Self::lock(&self.conn), sth)
    }

    pub(super) fn log_key(&self) -> Result<Option<Zeroizing<Vec<u8>>>, RegistryError> {
        log::key(&Self::lock(&self.conn))
    }

    pub(super) fn log_key_or_insert(
        &self,
        pkcs8: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, RegistryError> {
        log::key_or_insert(&Self::lock(&self.conn), pkcs8)
    }

    pub(super) fn jwt_keys(&self) -> Result<Vec<JwtKeyRow>, RegistryError> {
        let conn = Self::lock(&self.conn);
        let mut stmt = conn.prepare(
            "SELECT kid, pkcs8, sign_from_ms, sign_until_ms FROM jwt_keys ORDER BY sign_from_ms",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(JwtKeyRow {
                kid: r.get(0)?,
                pkcs8: Zeroizing::new(r.get(1)?),
                sign_from_ms: r.get(2)?,
                sign_until_ms: r.get(3)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub(super) fn insert_jwt_key(&self, key: &JwtKeyRow) -> Result<bool, RegistryError> {
        let n = Self::lock(&self.conn).execute(
            "INSERT OR IGNORE INTO jwt_keys (kid, pkcs8, sign_from_ms, sign_until_ms)
             VALUES (?1, ?2, ?3, ?4)",
            params![
                key.kid,
                key.pkcs8.as_slice(),
                key.sign_from_ms,
                key.sign_until_ms
            ],
        )?;
        Ok(n == 1)
    }

    pub(super) fn prune_jwt_keys(&self, before_ms: i64) -> Result<usize, RegistryError> {
        Ok(Self::lock(&self.conn).execute(
            "DELETE FROM jwt_keys WHERE sign_until_ms < ?1",
            params![before_ms],
        )?)
    }

    pub(super) fn federated_bundle(
        &self,
        trust_domain: &str,
    ) -> Result<Option<FederatedBundleRow>, RegistryError> {
        let conn = Self::lock(&self.conn);
        let row = conn
            .query_row(
                "SELECT sequence, bundle_pem, fetched_at_ms FROM federated_bundles
                 WHERE trust_domain = ?1",
                [trust_domain],
                |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, i64>(2)?,
                    ))
                },
            )
            .optional()?;
        Ok(row.map(|(seq, pem, ms)| FederatedBundleRow {
            sequence: u64::try_from(seq).unwrap_or(0),
            bundle_pem: pem,
            fetched_at: from_unix_ms(ms),
        }))
    }

    pub(super) fn store_federated_bundle(
        &self,
        trust_domain: &str,
        sequence: i64,
        bundle_pem: &str,
        fetched_at_ms: i64,
    ) -> Result<(), RegistryError> {
        let conn = Self::lock(&self.conn);
        // Never back to a lower sequence, whichever replica writes last.
        conn.execute(
            "INSERT INTO federated_bundles (trust_domain, sequence, bundle_pem, fetched_at_ms)
             VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (trust_domain) DO UPDATE SET sequence = excluded.sequence,
                 bundle_pem = excluded.bundle_pem, fetched_at_ms = excluded.fetched_at_ms
             WHERE excluded.sequence >= federated_bundles.sequence",
            rusqlite::params![trust_domain, sequence, bundle_pem, fetched_at_ms],
        )?;
        Ok(())
    }
}
