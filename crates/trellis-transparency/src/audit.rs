//! Auditing a stored log: recompute the tree from every entry, check every signed head
//! against it, and name the first thing that is wrong.
//!
//! What can be named precisely and what cannot: an entry that was edited without fixing its
//! recorded leaf hash, removed, duplicated or moved is named by index (entries carry their
//! own index). An attacker who also rewrote the leaf hashes is still caught by the signed
//! heads (a head signs a root over every entry before it); then the tampering is located to
//! the entries between the last head that still matches and the first that does not.

use crate::entry::LogEntry;
use crate::hash::{leaf_hash, Hash};
use crate::head::{LogPublicKey, SignedTreeHead};
use crate::tree::MerkleTree;

/// One stored entry as read back from storage.
#[derive(Debug, Clone)]
pub struct StoredEntry {
    /// The index the storage files it under.
    pub index: u64,
    /// The entry's canonical bytes.
    pub bytes: Vec<u8>,
    /// The leaf hash recorded when it was appended, if the storage keeps one.
    pub leaf_hash: Option<Hash>,
}

/// What a successful audit checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditSummary {
    /// Entries recomputed.
    pub entries: u64,
    /// Signed heads verified.
    pub heads: u64,
    /// Root of the whole log.
    pub root: Hash,
}

/// The first problem an audit found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuditFailure {
    /// Something is wrong with one entry.
    #[error("entry {index}: {reason}")]
    Entry {
        /// The entry's position.
        index: u64,
        /// What is wrong.
        reason: String,
    },
    /// Something is wrong with a signed head.
    #[error("head for size {size}: {reason}")]
    Head {
        /// The size the head claims.
        size: u64,
        /// What is wrong.
        reason: String,
    },
}

/// Recomputes the log from `entries` (in storage order) and checks each of `heads`.
pub fn audit_log(
    entries: impl IntoIterator<Item = StoredEntry>,
    heads: &[SignedTreeHead],
    key: &LogPublicKey,
) -> Result<AuditSummary, AuditFailure> {
    let mut tree = MerkleTree::new();
    for stored in entries {
        let expected = tree.size();
        if stored.index != expected {
            let reason = if stored.index > expected {
                format!("missing (the next stored entry is {})", stored.index)
            } else {
                format!("stored again after entry {}", expected - 1)
            };
            let index = expected.min(stored.index);
            return Err(AuditFailure::Entry { index, reason });
        }
        let entry = LogEntry::decode(&stored.bytes).map_err(|e| AuditFailure::Entry {
            index: expected,
            reason: format!("not a valid entry: {e}"),
        })?;
        if entry.index != expected {
            return Err(AuditFailure::Entry {
                index: expected,
                reason: format!(
                    "records index {}: entries were moved or swapped",
                    entry.index
                ),
            });
        }
        let hash = leaf_hash(&stored.bytes);
        if stored.leaf_hash.is_some_and(|recorded| recorded != hash) {
            return Err(AuditFailure::Entry {
                index: expected,
                reason: "does not match the leaf hash recorded when it was appended: it was edited"
                    .into(),
            });
        }
        tree.push(hash);
    }

    let mut ordered: Vec<&SignedTreeHead> = heads.iter().collect();
    ordered.sort_by_key(|h| (h.head.tree_size, h.head.timestamp_ms));
    let mut last_good: Option<&SignedTreeHead> = None;
    for sth in ordered {
        let size = sth.head.tree_size;
        let fail = |reason: String| AuditFailure::Head { size, reason };
        key.verify(sth).map_err(|e| fail(e.to_string()))?;
        if let Some(prev) = last_good {
            if prev.head.tree_size == size && prev.head.root_hash != sth.head.root_hash {
                return Err(fail(
                    "two signed heads for this size with different roots: the log forked".into(),
                ));
            }
            if sth.head.timestamp_ms < prev.head.timestamp_ms {
                return Err(fail(format!(
                    "signed at {} ms, before the head for size {} ({} ms)",
                    sth.head.timestamp_ms, prev.head.tree_size, prev.head.timestamp_ms
                )));
            }
        }
        let root = tree.root_at(size).map_err(|_| {
            fail(format!(
                "the log holds only {} entries: it was truncated",
                tree.size()
            ))
        })?;
        if root != sth.head.root_hash {
            let from = last_good.map_or(0, |h| h.head.tree_size);
            return Err(fail(format!(
                "the entries do not produce the signed root: one of entries {from}..{} was changed",
                size.saturating_sub(1)
            )));
        }
        last_good = Some(sth);
    }
    Ok(AuditSummary {
        entries: tree.size(),
        heads: heads.len() as u64,
        root: tree.root(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entry::{IssuanceEntry, LogBody};
    use crate::head::tests::{log_key, sign};
    use crate::head::TreeHead;

    fn entry(index: u64) -> StoredEntry {
        let bytes = LogEntry {
            index,
            time_ms: 1000 + index,
            body: LogBody::Issuance(IssuanceEntry {
                serial: index.to_be_bytes().to_vec(),
                spiffe_id: format!("spiffe://example.org/ns/prod/sa/app{index}"),
                public_key_sha256: [index as u8; 32],
                not_before: 0,
                not_after: 3600,
                issuer_key_id: vec![1; 20],
                attestation: "join_token".into(),
            }),
        }
        .encode()
        .unwrap();
        StoredEntry {
            index,
            leaf_hash: Some(leaf_hash(&bytes)),
            bytes,
        }
    }

    /// 50 entries with signed heads at 10, 20, 30, 40 and 50.
    fn log() -> (Vec<StoredEntry>, Vec<SignedTreeHead>, LogPublicKey) {
        let (pair, key) = log_key();
        let entries: Vec<StoredEntry> = (0..50).map(entry).collect();
        let tree = MerkleTree::from_leaf_hashes(entries.iter().map(|e| leaf_hash(&e.bytes)));
        let heads = (1..=5)
            .map(|i| {
                let size = i * 10;
                let head = TreeHead {
                    tree_size: size,
                    root_hash: tree.root_at(size).unwrap(),
                    timestamp_ms: 2000 + size,
                };
                sign(&pair, &key, head)
            })
            .collect();
        (entries, heads, key)
    }

    fn failure(entries: Vec<StoredEntry>, heads: &[SignedTreeHead], key: &LogPublicKey) -> String {
        audit_log(entries, heads, key).unwrap_err().to_string()
    }

    #[test]
    fn an_intact_log_passes_with_its_counts() {
        let (entries, heads, key) = log();
        let summary = audit_log(entries, &heads, &key).unwrap();
        assert_eq!((summary.entries, summary.heads), (50, 5));
    }

    #[test]
    fn every_kind_of_tampering_is_named() {
        let (entries, heads, key) = log();

        let mut edited = entries.clone();
        edited[41].bytes[30] ^= 1;
        assert_eq!(
            failure(edited.clone(), &heads, &key),
            "entry 41: does not match the leaf hash recorded when it was appended: it was edited"
        );
        // The editor also rewrote the recorded hash: the signed heads still catch it.
        edited[41].leaf_hash = Some(leaf_hash(&edited[41].bytes));
        assert_eq!(
            failure(edited, &heads, &key),
            "head for size 50: the entries do not produce the signed root: one of entries 40..49 \
             was changed"
        );

        let mut deleted = entries.clone();
        deleted.remove(41);
        assert_eq!(
            failure(deleted, &heads, &key),
            "entry 41: missing (the next stored entry is 42)"
        );

        let mut swapped = entries.clone();
        swapped.swap(12, 13);
        swapped[12].index = 12;
        swapped[13].index = 13;
        assert_eq!(
            failure(swapped, &heads, &key),
            "entry 12: records index 13: entries were moved or swapped"
        );

        let truncated: Vec<StoredEntry> = entries.iter().take(45).cloned().collect();
        assert_eq!(
            failure(truncated, &heads, &key),
            "head for size 50: the log holds only 45 entries: it was truncated"
        );

        let mut garbage = entries.clone();
        garbage[7].bytes.push(0);
        garbage[7].leaf_hash = None;
        assert!(failure(garbage, &heads, &key).starts_with("entry 7: not a valid entry"));
    }

    #[test]
    fn bad_forked_or_foreign_heads_are_named() {
        let (entries, heads, key) = log();

        let mut bad_sig = heads.clone();
        bad_sig[2].signature[10] ^= 1;
        assert_eq!(
            failure(entries.clone(), &bad_sig, &key),
            "head for size 30: the head's signature does not verify with the log key"
        );

        // A correctly signed head for a root the entries never had.
        let (pair, key2) = log_key();
        let forged_root = |size: u64, root: Hash, ts: u64| {
            sign(
                &pair,
                &key2,
                TreeHead {
                    tree_size: size,
                    root_hash: root,
                    timestamp_ms: ts,
                },
            )
        };
        let resigned: Vec<SignedTreeHead> = heads
            .iter()
            .map(|h| forged_root(h.head.tree_size, h.head.root_hash, h.head.timestamp_ms))
            .collect();
        let mut other_root = resigned.clone();
        other_root[1] = forged_root(20, [9; 32], other_root[1].head.timestamp_ms);
        assert_eq!(
            failure(entries.clone(), &other_root, &key2),
            "head for size 20: the entries do not produce the signed root: one of entries 10..19 \
             was changed"
        );

        let mut forked = resigned.clone();
        forked.push(forged_root(30, [9; 32], 2031));
        assert_eq!(
            failure(entries.clone(), &forked, &key2),
            "head for size 30: two signed heads for this size with different roots: the log forked"
        );

        assert!(failure(entries, &heads, &key2)
            .starts_with("head for size 10: the head was signed by key"));
    }
}
