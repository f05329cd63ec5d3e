//! The transparency log's tables in PostgreSQL, shared by replicas: entries are appended
//! under one advisory lock, so every replica's appends land in one order with no gaps, and a
//! head's size is its primary key, so no two heads for one size are ever stored. Functions
//! over the connection of the store's worker thread.

use postgres::Client;
use trellis_transparency::{leaf_hash, Hash, LogBody, SignedTreeHead, StoredEntry, TreeHead};
use zeroize::Zeroizing;

use crate::registry::model::{encode_entry, IssuanceRecord, RegistryError};

/// Serializes log appends across replicas (transaction-scoped: released at commit).
const LOG_APPEND_LOCK: i64 = 0x7472_656c_6c69_7302;

/// A failure of a log query: the client's, or a stored value this build cannot use.
pub(super) enum LogFail {
    Pg(postgres::Error),
    Reg(RegistryError),
}

impl From<postgres::Error> for LogFail {
    fn from(e: postgres::Error) -> Self {
        LogFail::Pg(e)
    }
}

impl From<RegistryError> for LogFail {
    fn from(e: RegistryError) -> Self {
        LogFail::Reg(e)
    }
}

/// Bodies to append, owned so they can go to the connection thread.
pub(crate) struct LogRows {
    pub(super) bodies: Vec<(LogBody, Option<String>)>,
    pub(super) time_ms: u64,
}

impl LogRows {
    /// The log bodies of `recs`, appended at `time_ms`.
    pub(crate) fn of(recs: &[IssuanceRecord], time_ms: u64) -> Self {
        Self {
            bodies: recs
                .iter()
                .map(|r| (r.log.clone(), Some(r.serial_hex.clone())))
                .collect(),
            time_ms,
        }
    }
}

/// Appends `rows` inside the caller's transaction.
pub(super) fn append(tx: &mut postgres::Transaction<'_>, rows: LogRows) -> Result<(), LogFail> {
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&LOG_APPEND_LOCK])?;
    let mut next: i64 = tx
        .query_one("SELECT COALESCE(MAX(idx) + 1, 0) FROM log_entries", &[])?
        .get(0);
    let (mut idx, mut entries, mut hashes, mut serials) = (vec![], vec![], vec![], vec![]);
    for (body, serial) in &rows.bodies {
        if let LogBody::CaPhase(p) = body {
            let inserted = tx.execute(
                "INSERT INTO log_ca_phases (ca_sha256, phase) VALUES ($1, $2)
                 ON CONFLICT DO NOTHING",
                &[&p.ca_sha256.as_slice(), &p.phase],
            )?;
            if inserted == 0 {
                continue;
            }
        }
        let bytes = encode_entry(next, rows.time_ms, body)?;
        hashes.push(leaf_hash(&bytes).to_vec());
        entries.push(bytes);
        idx.push(next);
        serials.push(serial.clone());
        next += 1;
    }
    if !idx.is_empty() {
        tx.execute(
            "INSERT INTO log_entries (idx, entry, leaf_hash, serial)
             SELECT * FROM UNNEST($1::bigint[], $2::bytea[], $3::bytea[], $4::text[])",
            &[&idx, &entries, &hashes, &serials],
        )?;
    }
    Ok(())
}

fn hash_of(bytes: Vec<u8>) -> Result<Hash, LogFail> {
    bytes
        .try_into()
        .map_err(|_| LogFail::Reg(RegistryError::Corrupt("a log hash is not 32 bytes".into())))
}

fn to_head(row: &postgres::Row) -> Result<SignedTreeHead, LogFail> {
    let size: i64 = row.get(0);
    let ts: i64 = row.get(2);
    Ok(SignedTreeHead {
        head: TreeHead {
            tree_size: size.try_into().unwrap_or(0),
            root_hash: hash_of(row.get(1))?,
            timestamp_ms: ts.try_into().unwrap_or(0),
        },
        key_id: row.get(3),
        signature: row.get(4),
    })
}

const HEAD_COLUMNS: &str = "tree_size, root_hash, timestamp_ms, key_id, signature";

pub(super) fn leaf_hashes(c: &mut Client, from: u64, limit: u64) -> Result<Vec<Hash>, LogFail> {
    let rows = c.query(
        "SELECT leaf_hash FROM log_entries WHERE idx >= $1 ORDER BY idx LIMIT $2",
        &[&(from as i64), &(limit as i64)],
    )?;
    rows.into_iter().map(|r| hash_of(r.get(0))).collect()
}

pub(super) fn entries(c: &mut Client, from: u64, to: u64) -> Result<Vec<StoredEntry>, LogFail> {
    let rows = c.query(
        "SELECT idx, entry, leaf_hash FROM log_entries
         WHERE idx >= $1 AND idx < $2 ORDER BY idx",
        &[&(from as i64), &(to as i64)],
    )?;
    rows.into_iter()
        .map(|r| {
            let idx: i64 = r.get(0);
            Ok(StoredEntry {
                index: idx.try_into().unwrap_or(u64::MAX),
                bytes: r.get(1),
                leaf_hash: Some(hash_of(r.get(2))?),
            })
        })
        .collect()
}

pub(super) fn index_of_serial(c: &mut Client, serial_hex: &str) -> Result<Option<u64>, LogFail> {
    let row = c.query_opt(
        "SELECT idx FROM log_entries WHERE serial = $1 ORDER BY idx DESC LIMIT 1",
        &[&serial_hex],
    )?;
    Ok(row.map(|r| r.get::<_, i64>(0).try_into().unwrap_or(u64::MAX)))
}

pub(super) fn heads(c: &mut Client) -> Result<Vec<SignedTreeHead>, LogFail> {
    let rows = c.query(
        &format!("SELECT {HEAD_COLUMNS} FROM log_heads ORDER BY tree_size"),
        &[],
    )?;
    rows.iter().map(to_head).collect()
}

pub(super) fn latest_head(c: &mut Client) -> Result<Option<SignedTreeHead>, LogFail> {
    let row = c.query_opt(
        &format!("SELECT {HEAD_COLUMNS} FROM log_heads ORDER BY tree_size DESC LIMIT 1"),
        &[],
    )?;
    row.as_ref().map(to_head).transpose()
}

/// Stores `sth` unless a head for its size exists; returns the stored one.
pub(super) fn insert_head(c: &mut Client, sth: &SignedTreeHead) -> Result<SignedTreeHead, LogFail> {
    c.execute(
        &format!(
            "INSERT INTO log_heads ({HEAD_COLUMNS}) VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (tree_size) DO NOTHING"
        ),
        &[
            &(sth.head.tree_size as i64),
            &sth.head.root_hash.as_slice(),
            &(sth.head.timestamp_ms as i64),
            &sth.key_id,
            &sth.signature,
        ],
    )?;
    let row = c.query_one(
        &format!("SELECT {HEAD_COLUMNS} FROM log_heads WHERE tree_size = $1"),
        &[&(sth.head.tree_size as i64)],
    )?;
    to_head(&row)
}

pub(super) fn key(c: &mut Client) -> Result<Option<Zeroizing<Vec<u8>>>, LogFail> {
    let row = c.query_opt("SELECT pkcs8 FROM log_key WHERE id = 1", &[])?;
    Ok(row.map(|r| Zeroizing::new(r.get::<_, Vec<u8>>(0))))
}

pub(super) fn key_or_insert(c: &mut Client, pkcs8: &[u8]) -> Result<Zeroizing<Vec<u8>>, LogFail> {
    c.execute(
        "INSERT INTO log_key (id, pkcs8) VALUES (1, $1) ON CONFLICT (id) DO NOTHING",
        &[&pkcs8],
    )?;
    let row = c.query_one("SELECT pkcs8 FROM log_key WHERE id = 1", &[])?;
    Ok(Zeroizing::new(row.get::<_, Vec<u8>>(0)))
}
