//! The issuance transparency log: every X.509 SVID the CA issues and every CA phase change
//! is an entry of an append-only Merkle tree (RFC 9162 hashing), whose heads the control
//! plane signs with a key of its own. Anyone holding the log's public key can then check
//! that an SVID was logged (inclusion proof), that the log only grew between two heads
//! (consistency proof), and that nobody edited, removed or reordered an entry (audit).
//!
//! This crate is the shared, I/O-free part: the control plane builds and serves the log,
//! the sidecar witnesses heads, the CLI verifies. Storage and signing keys live elsewhere.
#![warn(missing_docs)]
// Unit tests may unwrap: a panic is how they report failure.
#![cfg_attr(test, allow(clippy::unwrap_used))]

mod audit;
mod entry;
mod hash;
mod head;
mod own;
mod paged;
mod proof;
mod tree;
mod witness;

pub use audit::{audit_log, AuditFailure, AuditSummary, StoredEntry};
pub use entry::{CaPhaseEntry, EntryError, IssuanceEntry, LogBody, LogEntry, ENTRY_VERSION};
pub use hash::{empty_root, leaf_hash, node_hash, Hash};
pub use head::{b64_hashes, HeadError, LogPublicKey, SignedTreeHead, TreeHead};
pub use own::{check_own_svid, HeldSvid, OwnSvidMismatch, OwnSvidProof, HELD_SERIAL_METADATA_KEY};
pub use paged::{PagedMerkleTree, PagedTreeError};
pub use proof::{verify_consistency, verify_inclusion, ProofError};
pub use tree::{MerkleTree, TreeError};
pub use witness::{
    ConsistencyFrom, HeadForWitness, Witness, WitnessAlarm, Witnessed, LOG_HEAD_RESOURCE,
    WITNESSED_SIZE_METADATA_KEY,
};
