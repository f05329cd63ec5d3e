//! The transparency log's tables in SQLite: entries, signed heads, the CA phases already
//! logged, and the log's signing key (as the embedded CA key is kept). Functions over a
//! connection the store has locked; the store decides which connection.

use rusqlite::{params, Connection, OptionalExtension};
use trellis_transparency::{leaf_hash, Hash, LogBody, SignedTreeHead, StoredEntry, TreeHead};
use zeroize::Zeroizing;

use crate::registry::model::{encode_entry, LogAppend, RegistryError};

/// Appends `bodies` after the last entry, inside the caller's transaction (which holds
/// SQLite's write lock, so no other writer can take the same indices).
pub(super) fn append(
    tx: &rusqlite::Transaction<'_>,
    bodies: &[LogAppend<'_>],
    time_ms: u64,
) -> Result<(), RegistryError> {
    let mut next: i64 = tx.query_row(
        "SELECT COALESCE(MAX(idx) + 1, 0) FROM log_entries",
        [],
        |r| r.get(0),
    )?;
    let mut insert = tx.prepare_cached(
        "INSERT INTO log_entries (idx, entry, leaf_hash, serial) VALUES (?1, ?2, ?3, ?4)",
    )?;
    let mut phase = tx
        .prepare_cached("INSERT OR IGNORE INTO log_ca_phases (ca_sha256, phase) VALUES (?1, ?2)")?;
    for item in bodies {
        // A CA phase is logged once, whichever replica or restart notices it first.
        if let LogBody::CaPhase(p) = item.body {
            if phase.execute(params![p.ca_sha256.as_slice(), p.phase])? == 0 {
                continue;
            }
        }
        let bytes = encode_entry(next, time_ms, item.body)?;
        let hash = leaf_hash(&bytes);
        insert.execute(params![next, bytes, hash.as_slice(), item.serial])?;
        next += 1;
    }
    Ok(())
}

fn hash_of(bytes: Vec<u8>) -> Result<Hash, RegistryError> {
    bytes
        .try_into()
        .map_err(|_| RegistryError::Corrupt("a log hash is not 32 bytes".into()))
}

/// A `log_heads` row: size, root, timestamp, key id, signature.
type HeadRow = (i64, Vec<u8>, i64, String, Vec<u8>);

fn head_of(r: &rusqlite::Row<'_>) -> rusqlite::Result<HeadRow> {
    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
}

fn to_head(row: HeadRow) -> Result<SignedTreeHead, RegistryError> {
    let (size, root, ts, key_id, signature) = row;
    Ok(SignedTreeHead {
        head: TreeHead {
            tree_size: size.try_into().unwrap_or(0),
            root_hash: hash_of(root)?,
            timestamp_ms: ts.try_into().unwrap_or(0),
        },
        key_id,
        signature,
    })
}

const HEAD_COLUMNS: &str = "tree_size, root_hash, timestamp_ms, key_id, signature";

pub(super) fn leaf_hashes(
    conn: &Connection,
    from: u64,
    limit: u64,
) -> Result<Vec<Hash>, RegistryError> {
    let mut stmt = conn.prepare_cached(
        "SELECT leaf_hash FROM log_entries WHERE idx >= ?1 ORDER BY idx LIMIT ?2",
    )?;
    let rows = stmt.query_map(params![from as i64, limit as i64], |r| {
        r.get::<_, Vec<u8>>(0)
    })?;
    rows.map(|r| hash_of(r?)).collect()
}

pub(super) fn entries(
    conn: &Connection,
    from: u64,
    to: u64,
) -> Result<Vec<StoredEntry>, RegistryError> {
    let mut stmt = conn.prepare_cached(
        "SELECT idx, entry, leaf_hash FROM log_entries WHERE idx >= ?1 AND idx < ?2 ORDER BY idx",
    )?;
    let rows = stmt.query_map(params![from as i64, to as i64], |r| {
        Ok((
            r.get::<_, i64>(0)?,
            r.get::<_, Vec<u8>>(1)?,
            r.get::<_, Vec<u8>>(2)?,
        ))
    })?;
    rows.map(|r| {
        let (idx, bytes, hash) = r?;
        Ok(StoredEntry {
            index: idx.try_into().unwrap_or(u64::MAX),
            bytes,
            leaf_hash: Some(hash_of(hash)?),
        })
    })
    .collect()
}

pub(super) fn index_of_serial(
    conn: &Connection,
    serial_hex: &str,
) -> Result<Option<u64>, RegistryError> {
    let idx: Option<i64> = conn
        .query_row(
            "SELECT idx FROM log_entries WHERE serial = ?1 ORDER BY idx DESC LIMIT 1",
            params![serial_hex],
            |r| r.get(0),
        )
        .optional()?;
    Ok(idx.map(|i| i.try_into().unwrap_or(u64::MAX)))
}

pub(super) fn heads(conn: &Connection) -> Result<Vec<SignedTreeHead>, RegistryError> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {HEAD_COLUMNS} FROM log_heads ORDER BY tree_size"
    ))?;
    let rows = stmt.query_map([], head_of)?;
    rows.map(|r| to_head(r?)).collect()
}

pub(super) fn latest_head(conn: &Connection) -> Result<Option<SignedTreeHead>, RegistryError> {
    let row = conn
        .query_row(
            &format!("SELECT {HEAD_COLUMNS} FROM log_heads ORDER BY tree_size DESC LIMIT 1"),
            [],
            head_of,
        )
        .optional()?;
    row.map(to_head).transpose()
}

/// Stores `sth` unless a head for its size exists; returns the stored one.
pub(super) fn insert_head(
    conn: &Connection,
    sth: &SignedTreeHead,
) -> Result<SignedTreeHead, RegistryError> {
    conn.execute(
        &format!("INSERT OR IGNORE INTO log_heads ({HEAD_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5)"),
        params![
            sth.head.tree_size as i64,
            sth.head.root_hash.as_slice(),
            sth.head.timestamp_ms as i64,
            sth.key_id,
            sth.signature
        ],
    )?;
    let row = conn.query_row(
        &format!("SELECT {HEAD_COLUMNS} FROM log_heads WHERE tree_size = ?1"),
        params![sth.head.tree_size as i64],
        head_of,
    )?;
    to_head(row)
}

pub(super) fn key(conn: &Connection) -> Result<Option<Zeroizing<Vec<u8>>>, RegistryError> {
    let key: Option<Vec<u8>> = conn
        .query_row("SELECT pkcs8 FROM log_key WHERE id = 1", [], |r| r.get(0))
        .optional()?;
    Ok(key.map(Zeroizing::new))
}

pub(super) fn key_or_insert(
    conn: &Connection,
    pkcs8: &[u8],
) -> Result<Zeroizing<Vec<u8>>, RegistryError> {
    conn.execute(
        "INSERT OR IGNORE INTO log_key (id, pkcs8) VALUES (1, ?1)",
        params![pkcs8],
    )?;
    let key: Vec<u8> =
        conn.query_row("SELECT pkcs8 FROM log_key WHERE id = 1", [], |r| r.get(0))?;
    Ok(Zeroizing::new(key))
}
