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

pub mod join_token;
mod model;
pub mod postgres;
pub mod sqlite;

use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use rand::RngCore as _;
use sha2::Digest as _;
use trellis_identity::SpiffeId;
use trellis_serve::time::{unix_millis as unix_ms, unix_seconds as unix};
use zeroize::Zeroizing;

pub use self::join_token::{JoinToken, JOIN_TOKEN_PREFIX};
use self::join_token::{JOIN_SELECTOR_BYTES, JOIN_VERIFIER_BYTES};
pub use self::model::{
    CaMaterial, CaRotation, DatabaseUrlError, FederatedBundleRow, IssuanceRecord, JoinError,
    JwtKeyRow, RegistryError,
};
use self::model::{IssuanceRow, NewToken, Redeem};
pub use self::postgres::PostgresUrl;

/// Most issuance records deleted in one transaction: a first prune of a table that grew for
/// months deletes in steps, so token redemptions and creations (SQLite's single writer) wait
/// for one step at most, never for the whole delete.
const PRUNE_CHUNK: i64 = 10_000;

/// Where the registry lives: `--database` / `TRELLIS_DATABASE` / `database:`.
#[derive(Clone, PartialEq, Eq)]
pub enum Database {
    /// An SQLite file (`sqlite://PATH`; the default is `<state-dir>/trellis.db`).
    Sqlite(PathBuf),
    /// A PostgreSQL database shared by replicas (`postgres://…` or `postgresql://…`).
    Postgres(PostgresUrl),
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
    /// The SQLite file's (device, inode) when opened: the file SQLite keeps writing to.
    file_id: Option<(u64, u64)>,
}

use crate::state_dir::file_id;

impl Registry {
    /// Opens (creating with mode 0600 and migrating) the SQLite database at `path`.
    pub fn open(path: &Path) -> Result<Self, RegistryError> {
        let backend = Backend::Sqlite(sqlite::SqliteStore::open(path)?);
        Ok(Self {
            backend,
            label: path.to_path_buf(),
            file_id: file_id(path),
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
                file_id: None,
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

    /// Fails if the SQLite file is no longer where it was opened (state directory removed,
    /// renamed, unmounted, or another file put in its place): SQLite keeps writing to the
    /// open file, which the next start would not find. Always `Ok` for PostgreSQL.
    pub fn check_file(&self) -> Result<(), RegistryError> {
        match &self.backend {
            Backend::Sqlite(_) if file_id(&self.label) != self.file_id => {
                Err(RegistryError::Vanished {
                    path: self.label.display().to_string(),
                })
            }
            _ => Ok(()),
        }
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
            Backend::Sqlite(s) => {
                // A token spent in a file nobody will open again would be spent for nothing.
                self.check_file()?;
                s.redeem(&attempt)
            }
            Backend::Postgres(p) => p.redeem(attempt),
        }
    }

    /// The stored bundle of federated trust domain `td`, if any replica stored one.
    pub fn federated_bundle(
        &self,
        td: &trellis_identity::TrustDomain,
    ) -> Result<Option<FederatedBundleRow>, RegistryError> {
        match &self.backend {
            Backend::Sqlite(s) => s.federated_bundle(td.as_str()),
            Backend::Postgres(p) => p.federated_bundle(td.as_str()),
        }
    }

    /// Stores `td`'s bundle unless a higher `sequence` is stored already.
    pub fn store_federated_bundle(
        &self,
        td: &trellis_identity::TrustDomain,
        sequence: u64,
        bundle_pem: &str,
        fetched_at: SystemTime,
    ) -> Result<(), RegistryError> {
        let seq = i64::try_from(sequence).unwrap_or(i64::MAX);
        let ms = unix_ms(fetched_at);
        match &self.backend {
            Backend::Sqlite(s) => s.store_federated_bundle(td.as_str(), seq, bundle_pem, ms),
            Backend::Postgres(p) => p.store_federated_bundle(td.as_str(), seq, bundle_pem, ms),
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
        let time_ms = now_ms();
        match &self.backend {
            Backend::Sqlite(s) => s.record_issuances(recs, time_ms),
            Backend::Postgres(p) => p.record_issuances(
                recs.iter().map(IssuanceRow::from).collect(),
                postgres::LogRows::of(recs, time_ms),
            ),
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

/// Now, unix milliseconds (log entry and CA phase times).
fn now_ms() -> u64 {
    u64::try_from(unix_ms(SystemTime::now())).unwrap_or(0)
}

/// The transparency log's storage: entries (appended with issuance records, see
/// [`Registry::record_issuances`]), signed heads, CA phases and the log key.
impl Registry {
    /// Appends a CA phase change to the log, unless that CA's phase is logged already.
    pub fn record_ca_phase(
        &self,
        body: &trellis_transparency::LogBody,
    ) -> Result<(), RegistryError> {
        match &self.backend {
            Backend::Sqlite(s) => s.record_ca_phase(body, now_ms()),
            Backend::Postgres(p) => p.record_ca_phase(body.clone(), now_ms()),
        }
    }

    /// Leaf hashes of entries `from..` (at most `limit`), in log order.
    pub fn log_leaf_hashes(
        &self,
        from: u64,
        limit: u64,
    ) -> Result<Vec<trellis_transparency::Hash>, RegistryError> {
        match &self.backend {
            Backend::Sqlite(s) => s.log_leaf_hashes(from, limit),
            Backend::Postgres(p) => p.log_leaf_hashes(from, limit),
        }
    }

    /// Stored entries `from..to`, in log order.
    pub fn log_entries(
        &self,
        from: u64,
        to: u64,
    ) -> Result<Vec<trellis_transparency::StoredEntry>, RegistryError> {
        match &self.backend {
            Backend::Sqlite(s) => s.log_entries(from, to),
            Backend::Postgres(p) => p.log_entries(from, to),
        }
    }

    /// The index of the (latest) entry for the SVID with this serial.
    pub fn log_index_of_serial(&self, serial_hex: &str) -> Result<Option<u64>, RegistryError> {
        match &self.backend {
            Backend::Sqlite(s) => s.log_index_of_serial(serial_hex),
            Backend::Postgres(p) => p.log_index_of_serial(serial_hex.to_owned()),
        }
    }

    /// Every stored signed head, by size.
    pub fn log_heads(&self) -> Result<Vec<trellis_transparency::SignedTreeHead>, RegistryError> {
        match &self.backend {
            Backend::Sqlite(s) => s.log_heads(),
            Backend::Postgres(p) => p.log_heads(),
        }
    }

    /// The signed head of the largest size.
    pub fn latest_log_head(
        &self,
    ) -> Result<Option<trellis_transparency::SignedTreeHead>, RegistryError> {
        match &self.backend {
            Backend::Sqlite(s) => s.latest_log_head(),
            Backend::Postgres(p) => p.latest_log_head(),
        }
    }

    /// Stores `sth` unless a head for its size exists (another replica's); returns the one
    /// stored. So no two different heads are ever published for one size.
    pub fn insert_log_head(
        &self,
        sth: &trellis_transparency::SignedTreeHead,
    ) -> Result<trellis_transparency::SignedTreeHead, RegistryError> {
        match &self.backend {
            Backend::Sqlite(s) => s.insert_log_head(sth),
            Backend::Postgres(p) => p.insert_log_head(sth.clone()),
        }
    }

    /// The stored log key (PKCS#8 DER), if the log was ever opened.
    pub fn log_key(&self) -> Result<Option<Zeroizing<Vec<u8>>>, RegistryError> {
        match &self.backend {
            Backend::Sqlite(s) => s.log_key(),
            Backend::Postgres(p) => p.log_key(),
        }
    }

    /// The log key (PKCS#8 DER): the stored one, or `generated` stored now if there is none
    /// (of two replicas starting at once, one key wins for both).
    pub fn log_key_or_insert(&self, generated: &[u8]) -> Result<Zeroizing<Vec<u8>>, RegistryError> {
        match &self.backend {
            Backend::Sqlite(s) => s.log_key_or_insert(generated),
            Backend::Postgres(p) => p.log_key_or_insert(Zeroizing::new(generated.to_vec())),
        }
    }
}

impl Registry {
    /// Every stored JWT-SVID signing key, oldest signing window first.
    pub fn jwt_keys(&self) -> Result<Vec<JwtKeyRow>, RegistryError> {
        match &self.backend {
            Backend::Sqlite(s) => s.jwt_keys(),
            Backend::Postgres(p) => p.jwt_keys(),
        }
    }

    /// Stores `key` unless a key for the same signing window start exists (another replica's,
    /// which then wins for both). `true` when this one was stored.
    pub fn insert_jwt_key(&self, key: &JwtKeyRow) -> Result<bool, RegistryError> {
        match &self.backend {
            Backend::Sqlite(s) => s.insert_jwt_key(key),
            Backend::Postgres(p) => p.insert_jwt_key(key.clone()),
        }
    }

    /// Deletes the keys whose signing window ended before `before_ms`: nothing they signed
    /// is still valid. Returns how many.
    pub fn prune_jwt_keys(&self, before_ms: i64) -> Result<usize, RegistryError> {
        match &self.backend {
            Backend::Sqlite(s) => s.prune_jwt_keys(before_ms),
            Backend::Postgres(p) => p.prune_jwt_keys(before_ms),
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
