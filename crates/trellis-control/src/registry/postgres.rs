//! The replicated registry: a PostgreSQL database shared by every control-plane replica of a
//! trust domain (`--database postgres://USER:PASSWORD@HOST:5432/DB`).
//!
//! Same tables and the same rules as SQLite, made safe across processes by PostgreSQL itself:
//!
//! - redemption reads the token row `FOR UPDATE`, so of two replicas redeeming one token at
//!   once the second waits for the first to commit and then sees it spent;
//! - `store_ca_if_absent` is `INSERT … ON CONFLICT DO NOTHING` then a read of the winner;
//! - the schema is created and migrated in one transaction under an advisory lock, and
//!   rotations are added under another, so ids become visible in order;
//! - a token's verifier is stored as its SHA-256, never in clear (its selector is the key).
//!
//! One file for one job, the PostgreSQL side of [`super::Registry`]: it is as long as the
//! registry is wide (tokens, issuances, CA rotations, JWT keys, federated bundles, log entries and
//! heads), one statement or transaction per method, and splitting it by table would only move
//! the connection thread below into a third file every part imports.
//!
//! The `postgres` client runs a small tokio runtime of its own and must not be driven from
//! a thread that is running async tasks (it would panic), nor dropped there. So each
//! connection lives on a dedicated thread, and callers hand it closures over a channel and
//! block for the answer: the same blocking behaviour as the SQLite backend, from any thread.
//!
//! TLS: `sslmode=require`, `verify-ca` or `verify-full` turn on TLS with rustls, which always
//! verifies the server's certificate and name, against `sslrootcert=PATH` when given, else
//! the system's roots. Without `sslmode` (or `disable`/`prefer`), the connection is plain
//! TCP: only for loopback or a network you trust.

use std::fmt;
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use postgres::NoTls;
use tokio_postgres_rustls::MakeRustlsConnect;
use trellis_identity::SpiffeId;
use trellis_transparency::{Hash, LogBody, SignedTreeHead, StoredEntry};
use zeroize::Zeroizing;

use super::model::{
    from_unix_ms, CaMaterial, CaRotation, DatabaseUrlError, FederatedBundleRow, IssuanceRow,
    JoinError, JwtKeyRow, NewToken, Redeem, RegistryError, TokenRow, Verdict, SCHEMA_VERSION,
};

/// How long connecting may take before the start (or a call after a reconnect) fails.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Unacknowledged data older than this drops the connection (a vanished server or a
/// partition is noticed instead of hanging a call for the kernel's ~15 minutes).
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(30);
/// A connection idle for longer is checked (an empty query) before the next call uses it:
/// after a server restart or failover, the first call then reconnects instead of failing.
pub(super) const IDLE_CHECK: Duration = Duration::from_secs(1);
/// How long that check may take.
const CHECK_TIMEOUT: Duration = Duration::from_secs(5);
/// `pg_advisory_xact_lock` keys ("trellis" + a byte): schema migration, rotation insert.
const SCHEMA_LOCK: i64 = 0x7472_656c_6c69_7301;
const ROTATION_LOCK: i64 = 0x7472_656c_6c69_7302;

/// A PostgreSQL URL, checked; its password never shows in `Debug`, `Display` or errors.
#[derive(Clone, PartialEq, Eq)]
pub struct PostgresUrl {
    /// What the client parses: `sslrootcert` taken out, `sslmode` mapped to its values.
    config: Zeroizing<String>,
    /// The URL as given, with `***` for the password.
    redacted: String,
    tls: TlsMode,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum TlsMode {
    /// Plain TCP.
    Plain,
    /// TLS, the server verified against these roots (or the system's).
    Verify { root: Option<PathBuf> },
}

impl PostgresUrl {
    /// Checks `value` (`postgres://` or `postgresql://`): a host and a user are required;
    /// `sslmode` and `sslrootcert` are read as libpq does, except that TLS always verifies.
    pub fn parse(value: &str) -> Result<Self, DatabaseUrlError> {
        let redacted = redact(value);
        let err = |problem: String| DatabaseUrlError {
            shown: redacted.clone(),
            problem,
        };
        let (base, query) = value.split_once('?').unwrap_or((value, ""));
        let mut kept = Vec::new();
        let mut mode = None;
        let mut root = None;
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, val) = pair.split_once('=').unwrap_or((pair, ""));
            match key {
                "sslmode" => mode = Some(percent_decode(val)),
                "sslrootcert" => root = Some(PathBuf::from(percent_decode(val))),
                _ => kept.push(pair),
            }
        }
        let tls = match mode.as_deref() {
            None | Some("disable" | "allow" | "prefer") => {
                if root.is_some() {
                    return Err(err(
                        "sslrootcert needs sslmode=verify-full (or require) to be used".into(),
                    ));
                }
                TlsMode::Plain
            }
            Some("require" | "verify-ca" | "verify-full") => TlsMode::Verify { root },
            Some(other) => {
                return Err(err(format!(
                    "sslmode={other} is not one of disable, prefer, require, verify-ca, verify-full"
                )))
            }
        };
        kept.push(match tls {
            TlsMode::Plain => "sslmode=disable",
            TlsMode::Verify { .. } => "sslmode=require",
        });
        let config = Zeroizing::new(format!("{base}?{}", kept.join("&")));
        let parsed: postgres::Config = config.parse().map_err(|e| {
            err(format!(
                "not a usable PostgreSQL URL ({e}); write postgres://USER:PASSWORD@HOST:5432/DATABASE"
            ))
        })?;
        if parsed.get_hosts().is_empty() {
            return Err(err(
                "no host: write postgres://USER:PASSWORD@HOST:5432/DATABASE".into(),
            ));
        }
        if parsed.get_user().is_none() {
            return Err(err(
                "no user: write postgres://USER:PASSWORD@HOST:5432/DATABASE".into(),
            ));
        }
        Ok(Self {
            config,
            redacted,
            tls,
        })
    }

    /// The URL with its password replaced by `***`: safe to log.
    pub fn redacted(&self) -> &str {
        &self.redacted
    }

    /// Whether the connection uses TLS (`sslmode=require` or stricter).
    pub fn uses_tls(&self) -> bool {
        matches!(self.tls, TlsMode::Verify { .. })
    }

    fn client_config(&self) -> Result<postgres::Config, RegistryError> {
        let mut config: postgres::Config =
            self.config
                .parse()
                .map_err(|source| RegistryError::Postgres {
                    target: self.redacted.clone(),
                    source,
                })?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        if config.get_tcp_user_timeout().is_none() {
            config.tcp_user_timeout(TCP_USER_TIMEOUT);
        }
        if config.get_application_name().is_none() {
            // Operators see which sessions are Trellis in pg_stat_activity.
            config.application_name("trellis");
        }
        Ok(config)
    }

    fn connector(&self) -> Result<Tls, RegistryError> {
        let TlsMode::Verify { root } = &self.tls else {
            return Ok(Tls::Plain);
        };
        let tls_err = |problem: String| RegistryError::PostgresTls {
            target: self.redacted.clone(),
            problem,
        };
        let mut roots = rustls::RootCertStore::empty();
        match root {
            Some(path) => {
                let pem = std::fs::read(path).map_err(|e| {
                    tls_err(format!("sslrootcert {}: cannot read: {e}", path.display()))
                })?;
                let certs = trellis_identity::certs_from_pem(&pem)
                    .map_err(|e| tls_err(format!("sslrootcert {}: {e}", path.display())))?;
                let (_, bad) = roots.add_parsable_certificates(certs);
                if bad > 0 {
                    return Err(tls_err(format!(
                        "sslrootcert {}: {bad} certificate(s) cannot be used as trust anchors",
                        path.display()
                    )));
                }
            }
            None => {
                let found = rustls_native_certs::load_native_certs();
                roots.add_parsable_certificates(found.certs);
                if roots.is_empty() {
                    return Err(tls_err(
                        "no system CA certificates to verify the server with: add \
                         sslrootcert=/path/to/ca.pem to the URL"
                            .into(),
                    ));
                }
            }
        }
        let config = rustls::ClientConfig::builder_with_provider(trellis_identity::tls::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| tls_err(format!("TLS setup: {e}")))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Tls::Rustls(MakeRustlsConnect::new(config)))
    }
}

impl fmt::Debug for PostgresUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PostgresUrl({})", self.redacted)
    }
}

impl fmt::Display for PostgresUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted)
    }
}

/// `value` with the password of a `scheme://user:password@host` URL, and the value of any
/// `password=` parameter, replaced by `***`.
pub fn redact(value: &str) -> String {
    let mut out = match value.split_once("://") {
        Some((scheme, rest)) => {
            let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
            let (authority, tail) = rest.split_at(end);
            match authority.rsplit_once('@') {
                Some((userinfo, host)) => {
                    let user = match userinfo.split_once(':') {
                        Some((user, _password)) => format!("{user}:***"),
                        None => userinfo.to_owned(),
                    };
                    format!("{scheme}://{user}@{host}{tail}")
                }
                None => value.to_owned(),
            }
        }
        None => value.to_owned(),
    };
    let mut from = 0;
    while let Some(pos) = out[from..].find("password=") {
        let start = from + pos + "password=".len();
        let end = out[start..]
            .find(|c: char| c == '&' || c.is_whitespace())
            .map_or(out.len(), |e| start + e);
        out.replace_range(start..end, "***");
        from = start + 3;
    }
    out
}

/// `%XX` sequences decoded (for `sslmode` and `sslrootcert` values); anything else as is.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (bytes[i], bytes.get(i + 1), bytes.get(i + 2)) {
            (b'%', Some(&h), Some(&l)) if hex(h).is_some() && hex(l).is_some() => {
                let v = hex(h).unwrap_or(0) * 16 + hex(l).unwrap_or(0);
                out.push(v as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[derive(Clone)]
enum Tls {
    Plain,
    Rustls(MakeRustlsConnect),
}

pub(super) mod log;
pub(super) use log::LogRows;

/// A failure inside a job: the client's (named with the URL by the bridge) or ours.
enum Fail {
    Pg(postgres::Error),
    Reg(RegistryError),
}

impl From<postgres::Error> for Fail {
    fn from(e: postgres::Error) -> Self {
        Fail::Pg(e)
    }
}

impl From<log::LogFail> for Fail {
    fn from(e: log::LogFail) -> Self {
        match e {
            log::LogFail::Pg(e) => Fail::Pg(e),
            log::LogFail::Reg(e) => Fail::Reg(e),
        }
    }
}

impl From<RegistryError> for Fail {
    fn from(e: RegistryError) -> Self {
        Fail::Reg(e)
    }
}

type Job = Box<dyn FnOnce(&mut Session) + Send>;

/// One connection, owned by its thread; reconnects on the next call after it broke.
struct Session {
    config: postgres::Config,
    tls: Tls,
    /// Run after every (re)connect.
    setup: &'static str,
    client: Option<postgres::Client>,
    /// When `client` last answered.
    last_used: Instant,
    target: String,
}

impl Session {
    fn run<R>(
        &mut self,
        job: impl FnOnce(&mut postgres::Client) -> Result<R, Fail>,
    ) -> Result<R, RegistryError> {
        let pg_err = |source| RegistryError::Postgres {
            target: self.target.clone(),
            source,
        };
        let idle = self.last_used.elapsed() > IDLE_CHECK;
        // The client only learns that the server dropped it when it next reads, so a
        // connection that sat idle is checked first.
        let usable = |c: &mut postgres::Client| {
            !c.is_closed() && (!idle || c.is_valid(CHECK_TIMEOUT).is_ok())
        };
        let current = self.client.take();
        let had_one = current.is_some();
        let client = match current.and_then(|mut c| usable(&mut c).then_some(c)) {
            Some(c) => c,
            None => {
                let mut c = match &self.tls {
                    Tls::Plain => self.config.connect(NoTls),
                    Tls::Rustls(tls) => self.config.connect(tls.clone()),
                }
                .map_err(pg_err)?;
                if !self.setup.is_empty() {
                    c.batch_execute(self.setup).map_err(pg_err)?;
                }
                if had_one {
                    tracing::info!(database = %self.target, "reconnected to PostgreSQL");
                }
                c
            }
        };
        let client = self.client.insert(client);
        let result = job(client);
        self.last_used = Instant::now();
        result.map_err(|fail| match fail {
            Fail::Pg(source) => RegistryError::Postgres {
                target: self.target.clone(),
                source,
            },
            Fail::Reg(e) => e,
        })
    }
}

/// The caller's side of one connection thread.
struct Worker {
    jobs: mpsc::Sender<Job>,
    target: String,
}

impl Worker {
    /// Starts the thread and connects (so a bad URL or password fails the start).
    fn start(
        url: &PostgresUrl,
        tls: Tls,
        name: &str,
        setup: &'static str,
    ) -> Result<Self, RegistryError> {
        let target = url.redacted.clone();
        let mut session = Session {
            config: url.client_config()?,
            tls,
            setup,
            client: None,
            last_used: Instant::now(),
            target: target.clone(),
        };
        let (jobs, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name(format!("trellis-pg-{name}"))
            // Ends when the Worker (the only sender) is dropped; the client is dropped here,
            // off any async runtime.
            .spawn(move || {
                for job in rx {
                    job(&mut session);
                }
            })
            .map_err(|e| RegistryError::PostgresTls {
                target: target.clone(),
                problem: format!("cannot start the connection thread: {e}"),
            })?;
        let worker = Worker { jobs, target };
        worker.call(|_| Ok(()))?;
        Ok(worker)
    }

    /// Runs `job` on the connection thread and waits for its answer.
    fn call<R: Send + 'static>(
        &self,
        job: impl FnOnce(&mut postgres::Client) -> Result<R, Fail> + Send + 'static,
    ) -> Result<R, RegistryError> {
        let (tx, rx) = mpsc::sync_channel(1);
        let boxed: Job = Box::new(move |session: &mut Session| {
            let _ = tx.send(session.run(job));
        });
        let gone = || RegistryError::Unavailable {
            target: self.target.clone(),
        };
        self.jobs.send(boxed).map_err(|_| gone())?;
        rx.recv().map_err(|_| gone())?
    }
}

/// The PostgreSQL store behind a [`super::Registry`].
pub struct PostgresStore {
    /// Tokens, CA material, rotations: every commit durable before we answer.
    conn: Worker,
    /// Issuance records, on their own connection so a rotation wave's writes never queue
    /// ahead of a redemption; `synchronous_commit = off` like SQLite's `synchronous=NORMAL`
    /// (a server crash may drop the last records, never corrupt them; the audit log is the
    /// record of truth).
    log_conn: Worker,
}

impl PostgresStore {
    /// Connects twice, and creates or migrates the schema.
    pub fn connect(url: &PostgresUrl) -> Result<Self, RegistryError> {
        let tls = url.connector()?;
        if !url.uses_tls() {
            tracing::info!(database = %url.redacted, "PostgreSQL connection without TLS; add sslmode=verify-full&sslrootcert=/path/ca.pem to the URL unless the network is trusted");
        }
        let conn = Worker::start(url, tls.clone(), "registry", "")?;
        let target = url.redacted.clone();
        conn.call(move |c| migrate(c, &target))?;
        let log_conn = Worker::start(url, tls, "issuances", "SET synchronous_commit = off")?;
        Ok(Self { conn, log_conn })
    }

    pub(super) fn insert_token(&self, row: NewToken) -> Result<(), RegistryError> {
        self.conn.call(move |c| {
            c.execute(
                "INSERT INTO join_tokens (selector, hash, spiffe_id, created_at, expires_at)
                 VALUES ($1, $2, $3, $4, $5)",
                &[
                    &row.selector,
                    &row.verifier_hash,
                    &row.spiffe_id,
                    &row.created_at,
                    &row.expires_at,
                ],
            )?;
            Ok(())
        })
    }

    pub(super) fn redeem(
        &self,
        attempt: Redeem,
    ) -> Result<Result<SpiffeId, JoinError>, RegistryError> {
        self.conn.call(move |c| {
            let mut tx = c.transaction()?;
            // FOR UPDATE: a redemption of the same token on another replica waits here until
            // this transaction ends, then reads the row as this one left it.
            let row = tx.query_opt(
                "SELECT hash, spiffe_id, expires_at, redeemed_at, redeemed_by_ip
                 FROM join_tokens WHERE selector = $1 FOR UPDATE",
                &[&attempt.selector],
            )?;
            let Some(row) = row else {
                return Ok(Err(JoinError::Unknown));
            };
            let row = TokenRow {
                verifier_hash: row.try_get(0)?,
                spiffe_id: row.try_get(1)?,
                expires_at: row.try_get(2)?,
                redeemed_at: row.try_get(3)?,
                redeemed_by_ip: row.try_get(4)?,
            };
            match attempt.judge(row)? {
                Verdict::First(id) => {
                    tx.execute(
                        "UPDATE join_tokens SET redeemed_at = $1, redeemed_by_ip = $2
                         WHERE selector = $3",
                        &[&attempt.now, &attempt.peer_ip, &attempt.selector],
                    )?;
                    // Committed (and flushed) before answering: once the caller has an
                    // SVID, no replica will honour the token again.
                    tx.commit()?;
                    Ok(Ok(id))
                }
                Verdict::Again(id) => Ok(Ok(id)),
                Verdict::Refuse(why) => Ok(Err(why)),
            }
        })
    }

    pub(super) fn federated_bundle(
        &self,
        trust_domain: &str,
    ) -> Result<Option<FederatedBundleRow>, RegistryError> {
        let td = trust_domain.to_owned();
        self.conn.call(move |c| {
            let row = c.query_opt(
                "SELECT sequence, bundle_pem, fetched_at_ms FROM federated_bundles
                 WHERE trust_domain = $1",
                &[&td],
            )?;
            Ok(row.map(|r| FederatedBundleRow {
                sequence: u64::try_from(r.get::<_, i64>(0)).unwrap_or(0),
                bundle_pem: r.get(1),
                fetched_at: from_unix_ms(r.get::<_, i64>(2)),
            }))
        })
    }

    pub(super) fn store_federated_bundle(
        &self,
        trust_domain: &str,
        sequence: i64,
        bundle_pem: &str,
        fetched_at_ms: i64,
    ) -> Result<(), RegistryError> {
        let (td, pem) = (trust_domain.to_owned(), bundle_pem.to_owned());
        self.conn.call(move |c| {
            // Never back to a lower sequence, whichever replica writes last.
            c.execute(
                "INSERT INTO federated_bundles (trust_domain, sequence, bundle_pem, fetched_at_ms)
                 VALUES ($1, $2, $3, $4)
                 ON CONFLICT (trust_domain) DO UPDATE SET sequence = EXCLUDED.sequence,
                     bundle_pem = EXCLUDED.bundle_pem, fetched_at_ms = EXCLUDED.fetched_at_ms
                 WHERE EXCLUDED.sequence >= federated_bundles.sequence",
                &[&td, &sequence, &pem, &fetched_at_ms],
            )?;
            Ok(())
        })
    }

    pub(super) fn load_ca(&self) -> Result<Option<CaMaterial>, RegistryError> {
        self.conn.call(|c| Ok(read_ca(c)?))
    }

    pub(super) fn store_ca(&self, m: CaMaterial) -> Result<(), RegistryError> {
        self.conn.call(move |c| {
            c.execute(
                "INSERT INTO ca (id, chain_pem, bundle_pem, key_pem) VALUES (1, $1, $2, $3)
                 ON CONFLICT (id) DO UPDATE SET chain_pem = EXCLUDED.chain_pem,
                     bundle_pem = EXCLUDED.bundle_pem, key_pem = EXCLUDED.key_pem",
                &[&m.chain_pem, &m.bundle_pem, &m.key_pem.as_str()],
            )?;
            Ok(())
        })
    }

    pub(super) fn store_ca_if_absent(&self, m: CaMaterial) -> Result<CaMaterial, RegistryError> {
        self.conn.call(move |c| {
            // Of two replicas inserting at once, one wins; the other's insert waits for that
            // commit and does nothing, and its read (a new statement) sees the winner's row.
            c.execute(
                "INSERT INTO ca (id, chain_pem, bundle_pem, key_pem) VALUES (1, $1, $2, $3)
                 ON CONFLICT (id) DO NOTHING",
                &[&m.chain_pem, &m.bundle_pem, &m.key_pem.as_str()],
            )?;
            read_ca(c)?.ok_or_else(|| {
                Fail::Reg(RegistryError::Corrupt(
                    "the CA row is missing right after it was stored".into(),
                ))
            })
        })
    }

    pub(super) fn add_ca_rotation(
        &self,
        m: CaMaterial,
        prepared_at_ms: i64,
        activate_at_ms: i64,
        now_ms: i64,
    ) -> Result<i64, RegistryError> {
        self.conn.call(move |c| {
            let mut tx = c.transaction()?;
            // Two `trellis ca rotate` at once: the second waits, then sees the first pending.
            // Holding the lock to commit also makes ids visible in increasing order, which
            // `ca_rotations_after` relies on.
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&ROTATION_LOCK])?;
            let pending = tx.query_opt(
                "SELECT activate_at_ms FROM ca_rotations WHERE activate_at_ms > $1
                 ORDER BY activate_at_ms DESC LIMIT 1",
                &[&now_ms],
            )?;
            if let Some(row) = pending {
                return Err(Fail::Reg(RegistryError::RotationPending {
                    activate_at: from_unix_ms(row.try_get(0)?),
                }));
            }
            let row = tx.query_one(
                "INSERT INTO ca_rotations
                     (chain_pem, bundle_pem, key_pem, prepared_at_ms, activate_at_ms)
                 VALUES ($1, $2, $3, $4, $5) RETURNING id",
                &[
                    &m.chain_pem,
                    &m.bundle_pem,
                    &m.key_pem.as_str(),
                    &prepared_at_ms,
                    &activate_at_ms,
                ],
            )?;
            let id: i64 = row.try_get(0)?;
            tx.commit()?;
            Ok(id)
        })
    }

    pub(super) fn ca_rotations_after(&self, after: i64) -> Result<Vec<CaRotation>, RegistryError> {
        self.conn.call(move |c| {
            let rows = c.query(
                "SELECT id, chain_pem, bundle_pem, key_pem, prepared_at_ms, activate_at_ms
                 FROM ca_rotations WHERE id > $1 ORDER BY id",
                &[&after],
            )?;
            let mut out = Vec::with_capacity(rows.len());
            for r in rows {
                out.push(CaRotation {
                    id: r.try_get(0)?,
                    material: CaMaterial {
                        chain_pem: r.try_get(1)?,
                        bundle_pem: r.try_get(2)?,
                        key_pem: Zeroizing::new(r.try_get(3)?),
                    },
                    prepared_at: from_unix_ms(r.try_get(4)?),
                    activate_at: from_unix_ms(r.try_get(5)?),
                });
            }
            Ok(out)
        })
    }

    pub(super) fn record_issuances(
        &self,
        rows: Vec<IssuanceRow>,
        log: log::LogRows,
    ) -> Result<(), RegistryError> {
        self.log_conn.call(move |c| {
            let mut cols = IssuanceColumns::default();
            for r in rows {
                cols.spiffe_id.push(r.spiffe_id);
                cols.serial.push(r.serial);
                cols.not_after.push(r.not_after);
                cols.attestor.push(r.attestor);
                cols.peer.push(r.peer);
                cols.issued_at.push(r.issued_at);
            }
            // The records and their log entries commit together or not at all.
            let mut tx = c.transaction()?;
            // One statement (one round trip) per batch, however large the rotation wave.
            tx.execute(
                "INSERT INTO issuances (spiffe_id, serial, not_after, attestor, peer, issued_at)
                 SELECT * FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::text[],
                                      $5::text[], $6::bigint[])",
                &[
                    &cols.spiffe_id,
                    &cols.serial,
                    &cols.not_after,
                    &cols.attestor,
                    &cols.peer,
                    &cols.issued_at,
                ],
            )?;
            log::append(&mut tx, log)?;
            tx.commit()?;
            Ok(())
        })
    }

    pub(super) fn prune_issuances(
        &self,
        expired_before: i64,
        limit: i64,
    ) -> Result<u64, RegistryError> {
        self.log_conn.call(move |c| {
            Ok(c.execute(
                "DELETE FROM issuances WHERE id IN
                     (SELECT id FROM issuances WHERE not_after < $1 LIMIT $2)",
                &[&expired_before, &limit],
            )?)
        })
    }

    pub(super) fn issuance_count(&self) -> Result<u64, RegistryError> {
        self.log_conn.call(|c| {
            let n: i64 = c
                .query_one("SELECT COUNT(*) FROM issuances", &[])?
                .try_get(0)?;
            Ok(u64::try_from(n).unwrap_or(0))
        })
    }

    pub(super) fn record_ca_phase(&self, body: LogBody, time_ms: u64) -> Result<(), RegistryError> {
        self.log_conn.call(move |c| {
            let mut tx = c.transaction()?;
            let rows = LogRows {
                bodies: vec![(body, None)],
                time_ms,
            };
            log::append(&mut tx, rows)?;
            tx.commit()?;
            Ok(())
        })
    }

    pub(super) fn log_leaf_hashes(
        &self,
        from: u64,
        limit: u64,
    ) -> Result<Vec<Hash>, RegistryError> {
        self.log_conn
            .call(move |c| Ok(log::leaf_hashes(c, from, limit)?))
    }

    pub(super) fn log_entries(
        &self,
        from: u64,
        to: u64,
    ) -> Result<Vec<StoredEntry>, RegistryError> {
        self.log_conn.call(move |c| Ok(log::entries(c, from, to)?))
    }

    pub(super) fn log_index_of_serial(
        &self,
        serial_hex: String,
    ) -> Result<Option<u64>, RegistryError> {
        self.log_conn
            .call(move |c| Ok(log::index_of_serial(c, &serial_hex)?))
    }

    pub(super) fn log_heads(&self) -> Result<Vec<SignedTreeHead>, RegistryError> {
        self.conn.call(|c| Ok(log::heads(c)?))
    }

    pub(super) fn latest_log_head(&self) -> Result<Option<SignedTreeHead>, RegistryError> {
        self.conn.call(|c| Ok(log::latest_head(c)?))
    }

    /// On the durable connection: its commit also flushes every entry the head covers
    /// (PostgreSQL's WAL is one sequence; the entries' asynchronous commits precede it).
    pub(super) fn insert_log_head(
        &self,
        sth: SignedTreeHead,
    ) -> Result<SignedTreeHead, RegistryError> {
        self.conn.call(move |c| Ok(log::insert_head(c, &sth)?))
    }

    pub(super) fn log_key(&self) -> Result<Option<Zeroizing<Vec<u8>>>, RegistryError> {
        self.conn.call(|c| Ok(log::key(c)?))
    }

    pub(super) fn log_key_or_insert(
        &self,
        pkcs8: Zeroizing<Vec<u8>>,
    ) -> Result<Zeroizing<Vec<u8>>, RegistryError> {
        self.conn.call(move |c| Ok(log::key_or_insert(c, &pkcs8)?))
    }
}

impl PostgresStore {
    pub(super) fn jwt_keys(&self) -> Result<Vec<JwtKeyRow>, RegistryError> {
        self.conn.call(|c| {
            let rows = c.query(
                "SELECT kid, pkcs8, sign_from_ms, sign_until_ms FROM jwt_keys ORDER BY sign_from_ms",
                &[],
            )?;
            let mut out = Vec::with_capacity(rows.len());
            for r in rows {
                out.push(JwtKeyRow {
                    kid: r.try_get(0)?,
                    pkcs8: Zeroizing::new(r.try_get(1)?),
                    sign_from_ms: r.try_get(2)?,
                    sign_until_ms: r.try_get(3)?,
                });
            }
            Ok(out)
        })
    }

    pub(super) fn insert_jwt_key(&self, key: JwtKeyRow) -> Result<bool, RegistryError> {
        self.conn.call(move |c| {
            let n = c.execute(
                "INSERT INTO jwt_keys (kid, pkcs8, sign_from_ms, sign_until_ms)
                 VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
                &[
                    &key.kid,
                    &key.pkcs8.as_slice(),
                    &key.sign_from_ms,
                    &key.sign_until_ms,
                ],
            )?;
            Ok(n == 1)
        })
    }

    pub(super) fn prune_jwt_keys(&self, before_ms: i64) -> Result<usize, RegistryError> {
        self.conn.call(move |c| {
            let n = c.execute(
                "DELETE FROM jwt_keys WHERE sign_until_ms < $1",
                &[&before_ms],
            )?;
            Ok(usize::try_from(n).unwrap_or(usize::MAX))
        })
    }
}

#[derive(Default)]
struct IssuanceColumns {
    spiffe_id: Vec<String>,
    serial: Vec<String>,
    not_after: Vec<i64>,
    attestor: Vec<String>,
    peer: Vec<Option<String>>,
    issued_at: Vec<i64>,
}

fn read_ca(c: &mut postgres::Client) -> Result<Option<CaMaterial>, postgres::Error> {
    c.query_opt(
        "SELECT chain_pem, bundle_pem, key_pem FROM ca WHERE id = 1",
        &[],
    )?
    .map(|r| {
        Ok(CaMaterial {
            chain_pem: r.try_get(0)?,
            bundle_pem: r.try_get(1)?,
            key_pem: Zeroizing::new(r.try_get(2)?),
        })
    })
    .transpose()
}

/// Creates or migrates the schema in one transaction, under an advisory lock so that
/// replicas starting at once take turns (the second finds the work done).
fn migrate(c: &mut postgres::Client, target: &str) -> Result<(), Fail> {
    let mut tx = c.transaction()?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK])?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS trellis_schema (
             id       INTEGER PRIMARY KEY CHECK (id = 1),
             version  BIGINT NOT NULL
         )",
    )?;
    let version: i64 = match tx.query_opt("SELECT version FROM trellis_schema WHERE id = 1", &[])? {
        Some(row) => row.try_get(0)?,
        None => 0,
    };
    if version > SCHEMA_VERSION {
        return Err(Fail::Reg(RegistryError::Schema {
            path: target.to_owned(),
            found: version,
            supported: SCHEMA_VERSION,
        }));
    }
    // The same steps as the SQLite schema, in PostgreSQL types.
    if version < 1 {
        tx.batch_execute(
            "CREATE TABLE join_tokens (
                 hash            TEXT PRIMARY KEY,
                 spiffe_id       TEXT NOT NULL,
                 created_at      BIGINT NOT NULL,
                 expires_at      BIGINT NOT NULL,
                 redeemed_at     BIGINT,
                 redeemed_by_ip  TEXT
             );
             CREATE TABLE ca (
                 id          INTEGER PRIMARY KEY CHECK (id = 1),
                 chain_pem   TEXT NOT NULL,
                 bundle_pem  TEXT NOT NULL,
                 key_pem     TEXT NOT NULL
             );
             CREATE TABLE issuances (
                 id          BIGSERIAL PRIMARY KEY,
                 spiffe_id   TEXT NOT NULL,
                 serial      TEXT NOT NULL,
                 not_after   BIGINT NOT NULL,
                 attestor    TEXT NOT NULL,
                 peer        TEXT,
                 issued_at   BIGINT NOT NULL
             );
             CREATE INDEX issuances_not_after ON issuances (not_after);",
        )?;
    }
    if version < 2 {
        tx.batch_execute(
            "CREATE TABLE ca_rotations (
                 id              BIGSERIAL PRIMARY KEY,
                 chain_pem       TEXT NOT NULL,
                 bundle_pem      TEXT NOT NULL,
                 key_pem         TEXT NOT NULL,
                 prepared_at_ms  BIGINT NOT NULL,
                 activate_at_ms  BIGINT NOT NULL
             );",
        )?;
    }
    if version < 3 {
        // Split join tokens, as in SQLite: `hash` holds the verifier's SHA-256 and rows are
        // found by `selector`. Old rows keep working for replicas still running the previous
        // build during a rolling upgrade; this build never finds them.
        tx.batch_execute(
            "ALTER TABLE join_tokens ADD COLUMN selector TEXT;
             CREATE UNIQUE INDEX join_tokens_selector ON join_tokens (selector);",
        )?;
    }
    if version < 4 {
        // The issuance transparency log, as in SQLite.
        tx.batch_execute(
            "CREATE TABLE log_entries (
                 idx        BIGINT PRIMARY KEY,
                 entry      BYTEA NOT NULL,
                 leaf_hash  BYTEA NOT NULL,
                 serial     TEXT
             );
             CREATE INDEX log_entries_serial ON log_entries (serial);
             CREATE TABLE log_heads (
                 tree_size     BIGINT PRIMARY KEY,
                 root_hash     BYTEA NOT NULL,
                 timestamp_ms  BIGINT NOT NULL,
                 key_id        TEXT NOT NULL,
                 signature     BYTEA NOT NULL
             );
             CREATE TABLE log_ca_phases (
                 ca_sha256  BYTEA NOT NULL,
                 phase      TEXT NOT NULL,
                 PRIMARY KEY (ca_sha256, phase)
             );
             CREATE TABLE log_key (
                 id     INTEGER PRIMARY KEY CHECK (id = 1),
                 pkcs8  BYTEA NOT NULL
             );",
        )?;
    }
    if version < 5 {
        // JWT-SVID signing keys, as in SQLite.
        tx.batch_execute(
            "CREATE TABLE jwt_keys (
                 kid            TEXT PRIMARY KEY,
                 pkcs8          BYTEA NOT NULL,
                 sign_from_ms   BIGINT NOT NULL UNIQUE,
                 sign_until_ms  BIGINT NOT NULL
             );",
        )?;
    }
    if version < 6 {
        // SPIFFE federation: each federated trust domain's last good bundle, shared by
        // replicas (see the SQLite step).
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS federated_bundles (
                 trust_domain   TEXT PRIMARY KEY,
                 sequence       BIGINT NOT NULL,
                 bundle_pem     TEXT NOT NULL,
                 fetched_at_ms  BIGINT NOT NULL
             );",
        )?;
    }
    if version != SCHEMA_VERSION {
        tx.execute(
            "INSERT INTO trellis_schema (id, version) VALUES (1, $1)
             ON CONFLICT (id) DO UPDATE SET version = EXCLUDED.version",
            &[&SCHEMA_VERSION],
        )?;
        tracing::info!(database = %target, from = version, to = SCHEMA_VERSION, "PostgreSQL schema created or migrated");
    }
    tx.commit()?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn redacts_password_in_userinfo_and_query() {
        assert_eq!(
            redact("postgres://trellis:s3cr%40t@db.example:5432/trellis?sslmode=require"),
            "postgres://trellis:***@db.example:5432/trellis?sslmode=require"
        );
        assert_eq!(
            redact("postgres://db/trellis?user=t&password=hunter2&sslmode=disable"),
            "postgres://db/trellis?user=t&password=***&sslmode=disable"
        );
        assert_eq!(redact("postgres://t@db/x"), "postgres://t@db/x");
        assert_eq!(
            redact("host=db password=hunter2 user=t"),
            "host=db password=*** user=t"
        );
    }

    #[test]
    fn parse_keeps_password_out_of_every_message() {
        let url = PostgresUrl::parse("postgres://trellis:hunter2@db:5432/trellis").unwrap();
        assert!(!format!("{url:?} {url}").contains("hunter2"));
        assert!(!url.uses_tls());
        let err = PostgresUrl::parse("postgres://trellis:hunter2@db:notaport/trellis")
            .unwrap_err()
            .to_string();
        assert!(!err.contains("hunter2"), "{err}");
        assert!(err.contains("trellis:***@db"), "{err}");
        let err = PostgresUrl::parse("postgres://trellis:hunter2@db/t?sslmode=sometimes")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("sslmode=sometimes") && !err.contains("hunter2"),
            "{err}"
        );
    }

    #[test]
    fn sslmode_and_sslrootcert_are_understood() {
        let url = PostgresUrl::parse(
            "postgres://t:p@db/x?sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem",
        )
        .unwrap();
        assert!(url.uses_tls());
        assert_eq!(
            url.tls,
            TlsMode::Verify {
                root: Some(PathBuf::from("/etc/ca.pem"))
            }
        );
        assert!(url.config.ends_with("?sslmode=require"), "{}", *url.config);
        assert!(PostgresUrl::parse("postgres://t:p@db/x?sslrootcert=/ca.pem").is_err());
        let err = PostgresUrl::parse("postgres://t:p@db/x?sslmode=require&sslrootcert=/nope.pem")
            .unwrap()
            .connector()
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("/nope.pem") && !err.contains(":p@"), "{err}");
    }

    #[test]
    fn host_and_user_are_required() {
        assert!(PostgresUrl::parse("postgres:///trellis?user=t").is_err());
        assert!(PostgresUrl::parse("postgres://db/trellis").is_err());
        assert!(PostgresUrl::parse("postgres://t@db/trellis").is_ok());
    }
}
