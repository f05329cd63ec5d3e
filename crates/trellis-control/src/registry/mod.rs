//! Durable state: join tokens (each its selector in clear and its verifier's SHA-256, never
//! the verifier itself), CA material and scheduled CA rotations, issuance records.
//!
//! Two backends behind one [`Registry`]:
//!
//! - **SQLite** (the single-node default): `<state-dir>/trellis.db`, mode 0600 ([`sqlite`]).
//! - **PostgreSQL** (`--database postgres://…`): shared by every control-plane replica of a
//!   trust domain ([`postgres`]). A join token redeemed on one replica is spent for all of
//!   them, issuance records from all replicas land in one table, a CA rotation scheduled once
//!   reaches every replica, and replicas with the embedded CA agree on one root.
//!
//! Both give the same answers to the same calls: the unit tests below run one body against
//! each (PostgreSQL when `TRELLIS_TEST_POSTGRES_URL` is set).

pub mod postgres;
pub mod sqlite;

use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use rand::RngCore as _;
use sha2::Digest as _;
use subtle::ConstantTimeEq as _;
use thiserror::Error;
use trellis_identity::SpiffeId;
use zeroize::Zeroizing;

pub use self::postgres::PostgresUrl;
use crate::attest::join::{JoinToken, JOIN_SELECTOR_BYTES, JOIN_TOKEN_PREFIX, JOIN_VERIFIER_BYTES};

/// The schema this build reads and writes (SQLite `PRAGMA user_version`, PostgreSQL
/// `trellis_schema.version`). Both backends take the same steps from 0 up to it.
const SCHEMA_VERSION: i64 = 3;

/// Most issuance records deleted in one transaction: a first prune of a table that grew for
/// months deletes in steps, so token redemptions and creations (SQLite's single writer) wait
/// for one step at most, never for the whole delete.
const PRUNE_CHUNK: i64 = 10_000;

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
    /// The thread that owns the PostgreSQL connection is gone (it panicked).
    #[error("{target}: the PostgreSQL connection thread stopped")]
    Unavailable {
        /// The URL without its password.
        target: String,
    },
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
}

/// Where the registry lives: `--database` / `TRELLIS_DATABASE` / `database:`.
#[derive(Clone, PartialEq, Eq)]
pub enum Database {
    /// An SQLite file (`sqlite://PATH`; the default is `<state-dir>/trellis.db`).
    Sqlite(PathBuf),
    /// A PostgreSQL database shared by replicas (`postgres://…` or `postgresql://…`).
    Postgres(PostgresUrl),
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

impl Database {
    /// Parses `postgres://USER:PASSWORD@HOST:PORT/DB?…`, `postgresql://…` or `sqlite://PATH`.
    pub fn parse(value: &str) -> Result<Self, DatabaseUrlError> {
        let value = value.trim();
        if let Some(path) = value.strip_prefix("sqlite://") {
            if path.is_empty() {
                return Err(DatabaseUrlError {
                    shown: value.to_owned(),
                    problem: "no file: write sqlite:///var/lib/trellis/trellis.db".into(),
                });
            }
            return Ok(Database::Sqlite(PathBuf::from(path)));
        }
        if value.starts_with("postgres://") || value.starts_with("postgresql://") {
            return PostgresUrl::parse(value).map(Database::Postgres);
        }
        Err(DatabaseUrlError {
            shown: postgres::redact(value),
            problem: "not a database URL: use postgres://USER:PASSWORD@HOST:5432/DATABASE \
                      (shared by replicas) or sqlite://PATH (one node)"
                .into(),
        })
    }

    /// The single-node default: `<state_dir>/trellis.db`.
    pub fn in_state_dir(state_dir: &Path) -> Self {
        Database::Sqlite(state_dir.join("trellis.db"))
    }

    /// Whether replicas can share it.
    pub fn is_shared(&self) -> bool {
        matches!(self, Database::Postgres(_))
    }
}

impl fmt::Display for Database {
    /// The file, or the URL with its password replaced by `***`: safe to log.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Database::Sqlite(path) => write!(f, "sqlite://{}", path.display()),
            Database::Postgres(url) => f.write_str(url.redacted()),
        }
    }
}

impl fmt::Debug for Database {
    // Settings are sometimes logged with `{:?}`: never show the password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Database({self})")
    }
}

/// A `--database` value as given, checked later by [`Database::parse`] (so the error can
/// name the setting). Its `Debug` hides the password: settings structs derive `Debug`.
#[derive(Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(transparent)]
pub struct DatabaseUrl(String);

impl DatabaseUrl {
    /// The value, password included: only for [`Database::parse`].
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for DatabaseUrl {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(DatabaseUrl(s.to_owned()))
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DatabaseUrl({})", postgres::redact(&self.0))
    }
}

enum Backend {
    Sqlite(sqlite::SqliteStore),
    Postgres(postgres::PostgresStore),
}

/// The registry: the same calls on SQLite or PostgreSQL. Calls block (SQLite fsyncs, a
/// PostgreSQL round trip); callers on async threads use `spawn_blocking` where it matters.
pub struct Registry {
    backend: Backend,
    /// The file, or the URL without its password: names the database in messages.
    label: PathBuf,
}

impl Registry {
    /// Opens (creating with mode 0600 and migrating) the SQLite database at `path`.
    pub fn open(path: &Path) -> Result<Self, RegistryError> {
        Ok(Self {
            backend: Backend::Sqlite(sqlite::SqliteStore::open(path)?),
            label: path.to_path_buf(),
        })
    }

    /// Opens `db`: an SQLite file as [`Registry::open`] does, or a PostgreSQL database
    /// (connecting, and creating or migrating the schema under an advisory lock).
    pub fn connect(db: &Database) -> Result<Self, RegistryError> {
        match db {
            Database::Sqlite(path) => Self::open(path),
            Database::Postgres(url) => Ok(Self {
                backend: Backend::Postgres(postgres::PostgresStore::connect(url)?),
                label: PathBuf::from(url.redacted()),
            }),
        }
    }

    /// The database file, or the PostgreSQL URL without its password (for messages).
    pub fn path(&self) -> &Path {
        &self.label
    }

    /// Whether this registry is shared by replicas (PostgreSQL).
    pub fn is_shared(&self) -> bool {
        matches!(self.backend, Backend::Postgres(_))
    }

    /// Creates a random single-use join token `trellis-join.<selector>.<verifier>` bound to
    /// `id`, valid for `ttl` from `now`. Returns the token in clear; the selector is stored as
    /// is, the verifier only as its SHA-256.
    pub fn create_join_token(
        &self,
        id: &SpiffeId,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<Zeroizing<String>, RegistryError> {
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let mut selector = [0u8; JOIN_SELECTOR_BYTES];
        rand::rng().fill_bytes(&mut selector);
        let mut verifier = Zeroizing::new([0u8; JOIN_VERIFIER_BYTES]);
        rand::rng().fill_bytes(verifier.as_mut());
        let selector = b64.encode(selector);
        let verifier = Zeroizing::new(b64.encode(verifier.as_ref()));
        let token = Zeroizing::new(format!("{JOIN_TOKEN_PREFIX}{selector}.{}", *verifier));
        let created = unix(now);
        let expires = created.saturating_add(i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX));
        let row = NewToken {
            selector,
            verifier_hash: verifier_hash(&verifier)
                .iter()
                .map(|&b| char::from(b))
                .collect(),
            spiffe_id: id.as_str().to_owned(),
            created_at: created,
            expires_at: expires,
        };
        match &self.backend {
            Backend::Sqlite(s) => s.insert_token(&row)?,
            Backend::Postgres(p) => p.insert_token(row)?,
        }
        Ok(token)
    }

    /// Redeems a join token given as a string: [`Registry::redeem_parsed_join_token`] after
    /// a shape check; anything that is not a join token (the old single-part format
    /// included) is [`JoinError::Unknown`] without a database call.
    pub fn redeem_join_token(
        &self,
        token: &str,
        peer: IpAddr,
        now: SystemTime,
        window: Duration,
    ) -> Result<Result<SpiffeId, JoinError>, RegistryError> {
        match JoinToken::parse(token) {
            Ok(token) => self.redeem_parsed_join_token(token, peer, now, window),
            Err(_) => Ok(Err(JoinError::Unknown)),
        }
    }

    /// Redeems a join token. The row is found by selector and the verifier's SHA-256 compared
    /// with the stored hash in constant time; a mismatch is [`JoinError::Unknown`], like an
    /// unknown selector, and writes nothing. The first redemption records `peer` and `now`
    /// durably *before* returning; a later call succeeds only from the same peer IP within
    /// `window` of the first (the streams one client opens in its first seconds share the
    /// redemption). With PostgreSQL this holds across replicas: the row is locked while it
    /// is judged.
    pub fn redeem_parsed_join_token(
        &self,
        token: JoinToken<'_>,
        peer: IpAddr,
        now: SystemTime,
        window: Duration,
    ) -> Result<Result<SpiffeId, JoinError>, RegistryError> {
        let attempt = Redeem {
            selector: token.selector().to_owned(),
            verifier_hash: verifier_hash(token.verifier()),
            peer_ip: peer.to_string(),
            now: unix(now),
            window: i64::try_from(window.as_secs()).unwrap_or(i64::MAX),
        };
        match &self.backend {
            Backend::Sqlite(s) => s.redeem(&attempt),
            Backend::Postgres(p) => p.redeem(attempt),
        }
    }

    /// Stored CA material, if any.
    pub fn load_ca(&self) -> Result<Option<CaMaterial>, RegistryError> {
        match &self.backend {
            Backend::Sqlite(s) => s.load_ca(),
            Backend::Postgres(p) => p.load_ca(),
        }
    }

    /// Stores CA material (replacing any).
    pub fn store_ca(&self, material: &CaMaterial) -> Result<(), RegistryError> {
        match &self.backend {
            Backend::Sqlite(s) => s.store_ca(material),
            Backend::Postgres(p) => p.store_ca(material.clone()),
        }
    }

    /// Stores `material` unless CA material is already stored, atomically; returns what is
    /// stored afterwards. Two control planes starting on one database at once (two
    /// processes on one state directory, or two replicas on one PostgreSQL) thus agree on a
    /// single CA.
    pub fn store_ca_if_absent(&self, material: CaMaterial) -> Result<CaMaterial, RegistryError> {
        match &self.backend {
            Backend::Sqlite(s) => s.store_ca_if_absent(material),
            Backend::Postgres(p) => p.store_ca_if_absent(material),
        }
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
        let (prepared_at, activate_at, now) =
            (unix_ms(prepared_at), unix_ms(activate_at), unix_ms(now));
        match &self.backend {
            Backend::Sqlite(s) => s.add_ca_rotation(material, prepared_at, activate_at, now),
            Backend::Postgres(p) => {
                p.add_ca_rotation(material.clone(), prepared_at, activate_at, now)
            }
        }
    }

    /// Scheduled CA rotations with an id above `after`, oldest first.
    pub fn ca_rotations_after(&self, after: i64) -> Result<Vec<CaRotation>, RegistryError> {
        match &self.backend {
            Backend::Sqlite(s) => s.ca_rotations_after(after),
            Backend::Postgres(p) => p.ca_rotations_after(after),
        }
    }

    /// Appends an issuance record.
    pub fn record_issuance(&self, rec: &IssuanceRecord) -> Result<(), RegistryError> {
        self.record_issuances(std::slice::from_ref(rec))
    }

    /// Appends several issuance records in one transaction (a rotation round).
    pub fn record_issuances(&self, recs: &[IssuanceRecord]) -> Result<(), RegistryError> {
        if recs.is_empty() {
            return Ok(());
        }
        match &self.backend {
            Backend::Sqlite(s) => s.record_issuances(recs),
            Backend::Postgres(p) => {
                p.record_issuances(recs.iter().map(IssuanceRow::from).collect())
            }
        }
    }

    /// Deletes issuance records whose SVID expired before `expired_before`; returns how many.
    /// The issuance recorder calls it hourly ([`crate::recorder`]) so the table does not grow
    /// without bound. Deletes in transactions of at most 10,000 rows.
    pub fn prune_issuances(&self, expired_before: SystemTime) -> Result<u64, RegistryError> {
        let cutoff = unix(expired_before);
        let mut total = 0;
        loop {
            let n = match &self.backend {
                Backend::Sqlite(s) => s.prune_issuances(cutoff, PRUNE_CHUNK)?,
                Backend::Postgres(p) => p.prune_issuances(cutoff, PRUNE_CHUNK)?,
            };
            total += n;
            if n < PRUNE_CHUNK.unsigned_abs() {
                return Ok(total);
            }
        }
    }

    /// Number of issuance records (for tests and status).
    pub fn issuance_count(&self) -> Result<u64, RegistryError> {
        match &self.backend {
            Backend::Sqlite(s) => s.issuance_count(),
            Backend::Postgres(p) => p.issuance_count(),
        }
    }
}

/// A join token row about to be inserted.
struct NewToken {
    selector: String,
    /// Lowercase hex SHA-256 of the verifier.
    verifier_hash: String,
    spiffe_id: String,
    created_at: i64,
    expires_at: i64,
}

/// One redemption attempt, in stored units.
struct Redeem {
    selector: String,
    /// Lowercase hex SHA-256 of the presented verifier, as stored.
    verifier_hash: [u8; 64],
    peer_ip: String,
    /// Unix seconds.
    now: i64,
    /// Seconds.
    window: i64,
}

/// A join token row as read for redemption.
struct TokenRow {
    verifier_hash: String,
    spiffe_id: String,
    expires_at: i64,
    redeemed_at: Option<i64>,
    redeemed_by_ip: Option<String>,
}

/// What to do with a redemption attempt.
enum Verdict {
    /// First redemption: record peer and time, then admit.
    First(SpiffeId),
    /// Within the same-IP window of the first: admit, nothing to write.
    Again(SpiffeId),
    /// Refuse.
    Refuse(JoinError),
}

impl Redeem {
    /// The one rule both backends apply, to a row read under their write lock.
    fn judge(&self, row: TokenRow) -> Result<Verdict, RegistryError> {
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
struct IssuanceRow {
    spiffe_id: String,
    serial: String,
    not_after: i64,
    attestor: String,
    peer: Option<String>,
    issued_at: i64,
}

impl From<&IssuanceRecord> for IssuanceRow {
    fn from(rec: &IssuanceRecord) -> Self {
        IssuanceRow {
            spiffe_id: rec.spiffe_id.as_str().to_owned(),
            serial: rec.serial_hex.clone(),
            not_after: unix(rec.not_after),
            attestor: rec.attestor.to_owned(),
            peer: rec.peer.map(|p| p.to_string()),
            issued_at: unix(rec.issued_at),
        }
    }
}

/// Lowercase hex SHA-256 of a verifier: the only form of it stored. On the stack, so a
/// redemption allocates nothing for it.
fn verifier_hash(verifier: &str) -> [u8; 64] {
    let mut out = [0u8; 64];
    // Cannot fail: 32 bytes always encode to exactly 64 hex digits.
    let _ = hex::encode_to_slice(sha2::Sha256::digest(verifier.as_bytes()), &mut out);
    out
}

/// Unix milliseconds; times before 1970 (a broken clock) count as 0.
fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Unix seconds; times before 1970 (a broken clock) count as 0.
fn unix(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// The time `ms` unix milliseconds stand for.
fn from_unix_ms(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
