//! The transparency log's tables in PostgreSQL, shared by replicas: entries are appended
//! under one advisory lock, so every replica's appends land in one order with no gaps, and a
//! head's size is its primary key, so no two heads for one size are ever stored.

use trellis_transparency::{leaf_hash, Hash, LogBody, SignedTreeHead, StoredEntry, TreeHead};
use zeroize::Zeroizing;

use super::{Fail, PostgresStore};
use crate::registry::model::{IssuanceRecord, RegistryError};

/// Serializes log appends across replicas (transaction-scoped: released at commit).
const LOG_APPEND_LOCK: i64 = 0x7472_656c_6c69_7302;

/// Bodies to append, owned so they can go to the connection thread.
pub(in crate::registry) struct LogRows {
    bodies: Vec<(LogBody, Option<String>)>,
    time_ms: u64,
}

impl LogRows {
    /// The log bodies of `recs`, appended at `time_ms`.
    pub(in crate::registry) fn of(
        recs: &[IssuanceRecord],
        time_ms: u64,
    ) -> Result<Self, RegistryError> {
        Ok(Self {
            bodies: recs
                .iter()
                .map(|r| (r.log.clone(), Some(r.serial_hex.clone())))
                .collect(),
            time_ms,
        })
    }
}

/// Appends `rows` inside the caller's transaction.
pub(super) fn append(tx: &mut postgres::Transaction<'_>, rows: LogRows) -> Result<(), Fail> {
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
        let bytes = crate::registry::encode_entry(next, rows.time_ms, body)?;
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

fn hash_of(bytes: Vec<u8>) -> Result<Hash, Fail> {
    bytes
        .try_into()
        .map_err(|_| Fail::Reg(RegistryError::Corrupt("a log hash is not 32 bytes".into())))
}

fn to_head(row: &postgres::Row) -> Result<SignedTreeHead, Fail> {
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

impl PostgresStore {
    pub(in crate::registry) fn record_ca_phase(
        &self,
        body: LogBody,
        time_ms: u64,
    ) -> Result<(), RegistryError> {
        self.log_conn.call(move |c| {
            let mut tx = c.transaction()?;
            append(
                &mut tx,
                LogRows {
                    bodies: vec![(body, None)],
                    time_ms,
                },
            )?;
            tx.commit()?;
            Ok(())
        })
    }

    pub(in crate::registry) fn log_leaf_hashes(
        &self,
        from: u64,
        limit: u64,
    ) -> Result<Vec<Hash>, RegistryError> {
        self.log_conn.call(move |c| {
            let rows = c.query(
                "SELECT leaf_hash FROM log_entries WHERE idx >= $1 ORDER BY idx LIMIT $2",
                &[&(from as i64), &(limit as i64)],
            )?;
            rows.into_iter().map(|r| hash_of(r.get(0))).collect()
        })
    }

    pub(in crate::registry) fn log_entries(
        &self,
        from: u64,
        to: u64,
    ) -> Result<Vec<StoredEntry>, RegistryError> {
        self.log_conn.call(move |c| {
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
        })
    }

    pub(in crate::registry) fn log_index_of_serial(
        &self,
        serial_hex: String,
    ) -> Result<Option<u64>, RegistryError> {
        self.log_conn.call(move |c| {
            let row = c.query_opt(
                "SELECT idx FROM log_entries WHERE serial = $1 ORDER BY idx DESC LIMIT 1",
                &[&serial_hex],
            )?;
            Ok(row.map(|r| r.get::<_, i64>(0).try_into().unwrap_or(u64::MAX)))
        })
    }

    pub(in crate::registry) fn log_heads(&self) -> Result<Vec<SignedTreeHead>, RegistryError> {
        self.conn.call(|c| {
            let rows = c.query(
                &format!("SELECT {HEAD_COLUMNS} FROM log_heads ORDER BY tree_size"),
                &[],
            )?;
            rows.iter().map(to_head).collect()
        })
    }

    pub(in crate::registry) fn latest_log_head(
        &self,
    ) -> Result<Option<SignedTreeHead>, RegistryError> {
        self.conn.call(|c| {
            let row = c.query_opt(
                &format!("SELECT {HEAD_COLUMNS} FROM log_heads ORDER BY tree_size DESC LIMIT 1"),
                &[],
            )?;
            row.as_ref().map(to_head).transpose()
        })
    }

    /// On the durable connection: its commit also flushes every entry the head covers
    /// (PostgreSQL's WAL is one sequence; the entries' asynchronous commits precede it).
    pub(in crate::registry) fn insert_log_head(
        &self,
        sth: SignedTreeHead,
    ) -> Result<SignedTreeHead, RegistryError> {
        self.conn.call(move |c| {
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
        })
    }

    pub(in crate::registry) fn log_key(&self) -> Result<Option<Zeroizing<Vec<u8>>>, RegistryError> {
        self.conn.call(|c| {
            let row = c.query_opt("SELECT pkcs8 FROM log_key WHERE id = 1", &[])?;
            Ok(row.map(|r| Zeroizing::new(r.get::<_, Vec<u8>>(0))))
        })
    }

    pub(in crate::registry) fn log_key_or_insert(
        &self,
        pkcs8: Zeroizing<Vec<u8>>,
    ) -> Result<Zeroizing<Vec<u8>>, RegistryError> {
        self.conn.call(move |c| {
            c.execute(
                "INSERT INTO log_key (id, pkcs8) VALUES (1, $1) ON CONFLICT (id) DO NOTHING",
                &[&pkcs8.as_slice()],
            )?;
            let row = c.query_one("SELECT pkcs8 FROM log_key WHERE id = 1", &[])?;
            Ok(Zeroizing::new(row.get::<_, Vec<u8>>(0)))
        })
    }
}
