//! What the registry stores and the rules both backends apply: the error type, the records
//! callers see, the rows the backends read and write, and the join-token redemption rule.
//! The backends (`sqlite`, `postgres`) and the [`super::Registry`] facade build on this; it
//! builds on nothing of theirs.

use std::time::SystemTime;

use subtle::ConstantTimeEq as _;
use thiserror::Error;
use trellis_identity::SpiffeId;
use trellis_serve::time::unix_seconds;
use zeroize::Zeroizing;

/// The schema this build reads and writes (SQLite `PRAGMA user_version`, PostgreSQL
/// `trellis_schema.version`). Both backends take the same steps from 0 up to it.
pub(super) const SCHEMA_VERSION: i64 = 4;

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
         {supported}: run a newer trellis or point --state-dir (or --database) elsewhere"
    )]
    Schema {
        /// The database file, or the PostgreSQL URL without its password.
        path: String,
        /// Version found in the database.
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
    /// A PostgreSQL connection or query failed.
    #[error("{target}: {source}")]
    Postgres {
        /// The URL without its password.
        target: String,
        /// The client's error (never contains the password).
        source: ::postgres::Error,
    },
    /// The TLS settings of a PostgreSQL URL cannot be used.
    #[error("{target}: {problem}")]
    PostgresTls {
        /// The URL without its password.
        target: String,
        /// What is wrong and what to do.
        problem: String,
    },
    /// The SQLite file is gone from the state directory while the control plane runs.
    #[error("{path}: the state database file this control plane opened is gone from there (state directory removed, renamed or unmounted?); put it back and writes resume by themselves, or restart the control plane on the directory it should use")]
    Vanished {
        /// The database file.
        path: String,
    },
    /// The thread that owns the PostgreSQL connection is gone (it panicked).
    #[error("{target}: the PostgreSQL connection thread stopped")]
    Unavailable {
        /// The URL without its password.
        target: String,
    },
}

impl RegistryError {
    /// Whether the database itself is out of reach or cannot take writes (server down,
    /// connection lost, disk full, read-only or vanished file), as opposed to a bad value or
    /// a rule refusing the call. Callers answer these with "unavailable, retry": nothing was
    /// written, and the same call succeeds once the database is back.
    pub fn is_unavailable(&self) -> bool {
        match self {
            RegistryError::Unavailable { .. }
            | RegistryError::Open { .. }
            | RegistryError::Vanished { .. } => true,
            RegistryError::Postgres { source, .. } => match source.as_db_error() {
                // No server answer at all: connect refused, connection closed, timeout, I/O.
                None => true,
                // SQLSTATE classes 08 (connection exception), 53 (insufficient resources:
                // disk full, out of memory, too many connections), 57P01-57P03 (the server
                // is shutting down, crashed, or cannot accept connections yet).
                Some(db) => {
                    let code = db.code().code();
                    code.starts_with("08")
                        || code.starts_with("53")
                        || matches!(code, "57P01" | "57P02" | "57P03")
                }
            },
            RegistryError::Db(rusqlite::Error::SqliteFailure(e, _)) => matches!(
                e.code,
                rusqlite::ErrorCode::ReadOnly
                    | rusqlite::ErrorCode::DiskFull
                    | rusqlite::ErrorCode::CannotOpen
                    | rusqlite::ErrorCode::SystemIoFailure
                    | rusqlite::ErrorCode::DatabaseBusy
                    | rusqlite::ErrorCode::DatabaseLocked
            ),
            _ => false,
        }
    }
}

/// Why a join token was refused. Each maps to a stable metric reason.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum JoinError {
    /// No token with that selector, or its verifier does not match (the same answer, so a
    /// caller cannot tell a known selector from an unknown one by the error).
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
#[derive(Clone)]
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
    /// What the transparency log records of it (appended in the same transaction).
    pub log: trellis_transparency::LogBody,
}

/// A `--database` value that cannot be used. The message never contains the password.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("{shown}: {problem}")]
pub struct DatabaseUrlError {
    /// The value as given, password replaced by `***`.
    pub shown: String,
    /// What is wrong and what to do.
    pub problem: String,
}

/// A join token row about to be inserted.
pub(super) struct NewToken {
    pub(super) selector: String,
    /// Lowercase hex SHA-256 of the verifier.
    pub(super) verifier_hash: String,
    pub(super) spiffe_id: String,
    pub(super) created_at: i64,
    pub(super) expires_at: i64,
}

/// One redemption attempt, in stored units.
pub(super) struct Redeem {
    pub(super) selector: String,
    /// Lowercase hex SHA-256 of the presented verifier, as stored.
    pub(super) verifier_hash: [u8; 64],
    pub(super) peer_ip: String,
    /// Unix seconds.
    pub(super) now: i64,
    /// Seconds.
    pub(super) window: i64,
}

/// A join token row as read for redemption.
pub(super) struct TokenRow {
    pub(super) verifier_hash: String,
    pub(super) spiffe_id: String,
    pub(super) expires_at: i64,
    pub(super) redeemed_at: Option<i64>,
    pub(super) redeemed_by_ip: Option<String>,
}

/// What to do with a redemption attempt.
pub(super) enum Verdict {
    /// First redemption: record peer and time, then admit.
    First(SpiffeId),
    /// Within the same-IP window of the first: admit, nothing to write.
    Again(SpiffeId),
    /// Refuse.
    Refuse(JoinError),
}

impl Redeem {
    /// The one rule both backends apply, to a row read under their write lock.
    pub(super) fn judge(&self, row: TokenRow) -> Result<Verdict, RegistryError> {
        // The verifier is the secret: compared in constant time, so the time a refusal takes
        // says nothing about how much of a guess matched. A mismatch answers as an unknown
        // selector does and writes nothing, so a wrong guess cannot spend someone's token.
        if !bool::from(row.verifier_hash.as_bytes().ct_eq(&self.verifier_hash)) {
            return Ok(Verdict::Refuse(JoinError::Unknown));
        }
        let id = SpiffeId::parse(&row.spiffe_id)
            .map_err(|e| RegistryError::Corrupt(format!("join token SPIFFE ID: {e}")))?;
        if row.expires_at <= self.now {
            return Ok(Verdict::Refuse(JoinError::Expired));
        }
        Ok(match row.redeemed_at {
            None => Verdict::First(id),
            Some(first) => {
                let same_ip = row.redeemed_by_ip.as_deref() == Some(self.peer_ip.as_str());
                if same_ip && self.now < first.saturating_add(self.window) {
                    Verdict::Again(id)
                } else {
                    Verdict::Refuse(JoinError::AlreadyRedeemed)
                }
            }
        })
    }
}

/// An issuance record in stored units.
pub(super) struct IssuanceRow {
    pub(super) spiffe_id: String,
    pub(super) serial: String,
    pub(super) not_after: i64,
    pub(super) attestor: String,
    pub(super) peer: Option<String>,
    pub(super) issued_at: i64,
}

impl From<&IssuanceRecord> for IssuanceRow {
    fn from(rec: &IssuanceRecord) -> Self {
        IssuanceRow {
            spiffe_id: rec.spiffe_id.as_str().to_owned(),
            serial: rec.serial_hex.clone(),
            not_after: unix_seconds(rec.not_after),
            attestor: rec.attestor.to_owned(),
            peer: rec.peer.map(|p| p.to_string()),
            issued_at: unix_seconds(rec.issued_at),
        }
    }
}

/// The time `ms` unix milliseconds stand for (as the backends store times).
pub(super) fn from_unix_ms(ms: i64) -> SystemTime {
    trellis_serve::time::from_unix_millis(ms)
}

/// One body to append to the transparency log, and the serial it is found by.
pub(crate) struct LogAppend<'a> {
    pub(crate) body: &'a trellis_transparency::LogBody,
    pub(crate) serial: Option<&'a str>,
}

impl<'a> LogAppend<'a> {
    pub(super) fn of(rec: &'a IssuanceRecord) -> Self {
        LogAppend {
            body: &rec.log,
            serial: Some(&rec.serial_hex),
        }
    }
}

/// The canonical bytes of entry `index`.
pub(super) fn encode_entry(
    index: i64,
    time_ms: u64,
    body: &trellis_transparency::LogBody,
) -> Result<Vec<u8>, RegistryError> {
    let index = u64::try_from(index)
        .map_err(|_| RegistryError::Corrupt(format!("log index {index} is negative")))?;
    trellis_transparency::LogEntry::encode_parts(index, time_ms, body)
        .map_err(|e| RegistryError::Corrupt(format!("cannot encode log entry {index}: {e}")))
}
