//! A witness's own SVID: the control plane sends, with a signed head, the log entry of the
//! SVID the sidecar says it holds and that entry's RFC 9162 inclusion proof against the head.
//! The sidecar checks that the entry describes *its* certificate (serial, SPIFFE ID, public
//! key) and that the proof leads to the signed root. A failure is evidence that the CA issued
//! the sidecar a certificate it did not log, or that the control plane shows the sidecar
//! something other than what the log holds.
//!
//! The entry is signed into a head only a second or so after the SVID is pushed, so the proof
//! usually comes with a later update: no proof is never an alarm, only a wrong one is.

use serde::{Deserialize, Serialize};

use crate::entry::{EntryError, LogBody, LogEntry};
use crate::hash::{leaf_hash, Hash};
use crate::head::{b64_hashes, b64_vec, TreeHead};
use crate::proof::{verify_inclusion, ProofError};

/// The `node.metadata` key under which a witness reports the serial (lowercase hex, as in
/// its certificate without DER's leading zero byte) of the SVID it holds, so the control
/// plane can prove that SVID's entry.
pub const HELD_SERIAL_METADATA_KEY: &str = "trellis.io/log-serial";

/// The entry of the witness's SVID and its inclusion proof against the head it came with
/// (`own_svid` in the `trellis-log-head` JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnSvidProof {
    /// The serial the witness reported (what it asked to have proven).
    pub serial: String,
    /// The entry's position in the log.
    pub index: u64,
    /// The entry's canonical bytes, base64.
    #[serde(with = "b64_vec")]
    pub entry: Vec<u8>,
    /// RFC 9162 inclusion proof of entry `index` in the head's tree.
    #[serde(with = "b64_hashes")]
    pub proof: Vec<Hash>,
}

/// What a witness knows of a certificate it holds: what its log entry must say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldSvid {
    /// The serial, lowercase hex without leading zero bytes.
    pub serial_hex: String,
    /// The SPIFFE ID in its URI SAN.
    pub spiffe_id: String,
    /// SHA-256 of its SubjectPublicKeyInfo (DER), as [`crate::IssuanceEntry`] records it.
    pub public_key_sha256: Hash,
}

/// Why an own-SVID proof was refused: the log does not show this certificate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OwnSvidMismatch {
    /// The entry bytes are not a canonical entry.
    #[error("the log entry sent for serial {serial} cannot be read: {error}")]
    Undecodable {
        /// The serial asked about.
        serial: String,
        /// Why the bytes are not an entry.
        error: EntryError,
    },
    /// The entry records something other than an issuance.
    #[error("the log entry sent for serial {serial} (index {index}) records no issuance")]
    NotIssuance {
        /// The serial asked about.
        serial: String,
        /// The entry's index.
        index: u64,
    },
    /// The entry names another position than the proof.
    #[error("the log entry sent for serial {serial} says it is entry {recorded}, but the proof is for entry {index}")]
    WrongIndex {
        /// The serial asked about.
        serial: String,
        /// The index the proof is for.
        index: u64,
        /// The index the entry records.
        recorded: u64,
    },
    /// A field of the entry differs from the certificate held.
    #[error("the log entry {index} sent for this sidecar's SVID (serial {serial}) records {field} {logged}, but the certificate has {held}: the CA issued a certificate the log does not show")]
    Differs {
        /// The serial asked about.
        serial: String,
        /// The entry's index.
        index: u64,
        /// `serial`, `SPIFFE ID` or `public key SHA-256`.
        field: &'static str,
        /// What the entry says.
        logged: String,
        /// What the certificate says.
        held: String,
    },
    /// The proof does not lead from the entry to the signed root.
    #[error("the inclusion proof of entry {index} (serial {serial}) does not verify against the signed head of size {tree_size}: {error}")]
    Proof {
        /// The serial asked about.
        serial: String,
        /// The entry's index.
        index: u64,
        /// The head's size.
        tree_size: u64,
        /// What failed.
        error: ProofError,
    },
}

/// Lowercase hex of a DER serial's magnitude: DER prefixes a zero byte to positive integers
/// whose top bit is set, which is an encoding detail and not part of the number. (The same
/// rule as `trellis_identity`'s certificate serials; this crate depends on no other.)
fn serial_hex_of(raw: &[u8]) -> String {
    let mut bytes = raw;
    while let [0, rest @ ..] = bytes {
        if rest.is_empty() {
            break;
        }
        bytes = rest;
    }
    hex::encode(bytes)
}

/// Checks that `proof` shows `held` logged under `head` (whose signature and consistency the
/// caller has verified). Returns the entry's index.
pub fn check_own_svid(
    head: &TreeHead,
    proof: &OwnSvidProof,
    held: &HeldSvid,
) -> Result<u64, OwnSvidMismatch> {
    let serial = held.serial_hex.clone();
    let index = proof.index;
    // The proof first: an entry that is not under the signed root proves nothing, whatever
    // it says.
    verify_inclusion(
        index,
        head.tree_size,
        &leaf_hash(&proof.entry),
        &proof.proof,
        &head.root_hash,
    )
    .map_err(|error| OwnSvidMismatch::Proof {
        serial: serial.clone(),
        index,
        tree_size: head.tree_size,
        error,
    })?;
    let entry = LogEntry::decode(&proof.entry).map_err(|error| OwnSvidMismatch::Undecodable {
        serial: serial.clone(),
        error,
    })?;
    if entry.index != index {
        return Err(OwnSvidMismatch::WrongIndex {
            serial,
            index,
            recorded: entry.index,
        });
    }
    let LogBody::Issuance(issued) = entry.body else {
        return Err(OwnSvidMismatch::NotIssuance { serial, index });
    };
    let differs = |field, logged: String, held: String| OwnSvidMismatch::Differs {
        serial: serial.clone(),
        index,
        field,
        logged,
        held,
    };
    let logged_serial = serial_hex_of(&issued.serial);
    if logged_serial != held.serial_hex {
        return Err(differs("serial", logged_serial, held.serial_hex.clone()));
    }
    if issued.spiffe_id != held.spiffe_id {
        return Err(differs(
            "SPIFFE ID",
            issued.spiffe_id,
            held.spiffe_id.clone(),
        ));
    }
    if issued.public_key_sha256 != held.public_key_sha256 {
        return Err(differs(
            "public key SHA-256",
            hex::encode(issued.public_key_sha256),
            hex::encode(held.public_key_sha256),
        ));
    }
    Ok(index)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entry::{CaPhaseEntry, IssuanceEntry};
    use crate::tree::MerkleTree;

    const ID: &str = "spiffe://example.org/ns/prod/sa/web";

    fn held() -> HeldSvid {
        HeldSvid {
            serial_hex: "80abcd".into(),
            spiffe_id: ID.into(),
            public_key_sha256: [7; 32],
        }
    }

    fn issuance(index: u64, serial: &[u8], id: &str, key: Hash) -> Vec<u8> {
        LogEntry {
            index,
            time_ms: 1_765_000_000_000 + index,
            body: LogBody::Issuance(IssuanceEntry {
                serial: serial.to_vec(),
                spiffe_id: id.into(),
                public_key_sha256: key,
                not_before: 1_765_000_000,
                not_after: 1_765_086_400,
                issuer_key_id: vec![9; 20],
                attestation: "join_token".into(),
            }),
        }
        .encode()
        .unwrap()
    }

    /// A log of `n` entries where entry `at` is `entry`; the head over all and the proof.
    fn logged(n: u64, at: u64, entry: Vec<u8>) -> (TreeHead, OwnSvidProof) {
        let mut tree = MerkleTree::new();
        for i in 0..n {
            if i == at {
                tree.push(leaf_hash(&entry));
            } else {
                tree.push(leaf_hash(&issuance(i, &[i as u8 + 1], ID, [i as u8; 32])));
            }
        }
        let head = TreeHead {
            tree_size: n,
            root_hash: tree.root_at(n).unwrap(),
            timestamp_ms: 5,
        };
        let proof = OwnSvidProof {
            serial: "80abcd".into(),
            index: at,
            entry,
            proof: tree.inclusion_proof(at, n).unwrap(),
        };
        (head, proof)
    }

    #[test]
    fn the_entry_of_the_held_svid_is_proven() {
        // DER's leading zero byte before 0x80 is not part of the serial.
        let (head, proof) = logged(11, 6, issuance(6, &[0, 0x80, 0xab, 0xcd], ID, [7; 32]));
        assert_eq!(check_own_svid(&head, &proof, &held()), Ok(6));
        // As JSON, the way it travels in `trellis-log-head`.
        let json = serde_json::to_string(&proof).unwrap();
        let back: OwnSvidProof = serde_json::from_str(&json).unwrap();
        assert_eq!(check_own_svid(&head, &back, &held()), Ok(6));
        // A one-entry log: the proof is empty.
        let (head, proof) = logged(1, 0, issuance(0, &[0x80, 0xab, 0xcd], ID, [7; 32]));
        assert_eq!(check_own_svid(&head, &proof, &held()), Ok(0));
    }

    #[test]
    fn an_entry_for_another_certificate_is_a_mismatch_naming_the_field() {
        let cases = [
            (issuance(3, &[0x01], ID, [7; 32]), "serial"),
            (
                issuance(
                    3,
                    &[0x80, 0xab, 0xcd],
                    "spiffe://example.org/ns/prod/sa/db",
                    [7; 32],
                ),
                "SPIFFE ID",
            ),
            (
                issuance(3, &[0x80, 0xab, 0xcd], ID, [8; 32]),
                "public key SHA-256",
            ),
        ];
        for (entry, want) in cases {
            let (head, proof) = logged(8, 3, entry);
            match check_own_svid(&head, &proof, &held()) {
                Err(OwnSvidMismatch::Differs { field, index, .. }) => {
                    assert_eq!((field, index), (want, 3))
                }
                other => panic!("{want}: {other:?}"),
            }
        }
        let phase = LogEntry {
            index: 3,
            time_ms: 1,
            body: LogBody::CaPhase(CaPhaseEntry {
                ca_sha256: [1; 32],
                ca_key_id: vec![2; 20],
                phase: "active".into(),
            }),
        }
        .encode()
        .unwrap();
        let (head, proof) = logged(8, 3, phase);
        assert!(matches!(
            check_own_svid(&head, &proof, &held()),
            Err(OwnSvidMismatch::NotIssuance { index: 3, .. })
        ));
        // An entry that records another position than it is proven at.
        let (head, proof) = logged(8, 3, issuance(4, &[0x80, 0xab, 0xcd], ID, [7; 32]));
        assert!(matches!(
            check_own_svid(&head, &proof, &held()),
            Err(OwnSvidMismatch::WrongIndex {
                index: 3,
                recorded: 4,
                ..
            })
        ));
    }

    #[test]
    fn a_proof_that_does_not_lead_to_the_root_is_a_mismatch() {
        let good = issuance(5, &[0x80, 0xab, 0xcd], ID, [7; 32]);
        let (head, proof) = logged(9, 5, good.clone());
        let err = |p: &OwnSvidProof, h: &TreeHead| match check_own_svid(h, p, &held()) {
            Err(OwnSvidMismatch::Proof { error, .. }) => error,
            other => panic!("{other:?}"),
        };
        // An entry the log does not hold, shown with the real entry's proof.
        let mut forged = proof.clone();
        forged.entry = issuance(5, &[0x80, 0xab, 0xcd], ID, [8; 32]);
        assert_eq!(err(&forged, &head), ProofError::RootMismatch);
        // A changed proof hash, a missing one, another index, another root.
        let mut bent = proof.clone();
        bent.proof[0][0] ^= 1;
        assert_eq!(err(&bent, &head), ProofError::RootMismatch);
        let mut short = proof.clone();
        short.proof.pop();
        assert_eq!(err(&short, &head), ProofError::WrongLength);
        let mut moved = proof.clone();
        moved.index = 4;
        assert_eq!(err(&moved, &head), ProofError::RootMismatch);
        let mut other_root = head;
        other_root.root_hash[0] ^= 1;
        assert_eq!(err(&proof, &other_root), ProofError::RootMismatch);
        // Beyond the head: the entry is not covered by it.
        let mut beyond = proof.clone();
        beyond.index = 9;
        assert!(matches!(
            err(&beyond, &head),
            ProofError::IndexOutOfRange { index: 9, size: 9 }
        ));
        // The message names the serial, the entry and the head.
        let text = check_own_svid(&head, &forged, &held())
            .unwrap_err()
            .to_string();
        assert!(
            text.contains("entry 5") && text.contains("80abcd") && text.contains("size 9"),
            "{text}"
        );
    }

    #[test]
    fn serials_are_compared_without_der_padding() {
        assert_eq!(serial_hex_of(&[0, 0x80, 1]), "8001");
        assert_eq!(serial_hex_of(&[0x7f]), "7f");
        assert_eq!(serial_hex_of(&[0]), "00");
        assert_eq!(serial_hex_of(&[]), "");
    }
}
