//! Witnessing: what a sidecar does with the signed heads the control plane sends it.
//!
//! A log is only tamper-evident if someone other than its operator remembers what it said.
//! Every sidecar is such a someone: it receives the latest signed head with each SDS update
//! ([`HeadForWitness`]) and checks that it is signed by the log key it pinned at first sight
//! and that it extends the last head it accepted (a consistency proof from that size). A head
//! for a smaller tree (a rollback: the database restored from a backup, say) or for a
//! different tree of a size already seen (a fork: two histories shown to different parties)
//! is evidence that the log was tampered with. The witness reports it and keeps its last
//! good head; it never stops traffic: evidence is for operators, not a kill switch an attacker
//! could pull.

use serde::{Deserialize, Serialize};

use crate::hash::Hash;
use crate::head::{b64_hashes, HeadError, LogPublicKey, SignedTreeHead, TreeHead};
use crate::own::OwnSvidProof;
use crate::proof::{verify_consistency, ProofError};

/// The SDS resource name under which the control plane serves [`HeadForWitness`] (a
/// `generic_secret`; stock Envoys never ask for it).
pub const LOG_HEAD_RESOURCE: &str = "trellis-log-head";

/// The `node.metadata` key under which a witness reports the size of the last head it
/// accepted, so the control plane can prove consistency from there.
pub const WITNESSED_SIZE_METADATA_KEY: &str = "trellis.io/log-size";

/// A consistency proof from the size the witness reported to the head's size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsistencyFrom {
    /// The older size (the witness's last head).
    pub from_size: u64,
    /// RFC 9162 consistency proof from `from_size` to the head's size.
    #[serde(with = "b64_hashes")]
    pub proof: Vec<Hash>,
}

/// The `trellis-log-head` resource: the latest signed head, the log's public key, and (when
/// the witness reported a size) the proof that the head extends it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeadForWitness {
    /// The latest signed tree head.
    pub head: SignedTreeHead,
    /// The log's public key, PEM.
    pub public_key: String,
    /// Consistency with the size the witness last reported, if it reported one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consistency: Option<ConsistencyFrom>,
    /// The entry of the SVID the witness reported holding and its inclusion proof against
    /// `head`, once `head` covers it (control planes that predate it never send it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub own_svid: Option<OwnSvidProof>,
}

/// What a witness made of one head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Witnessed {
    /// The first head seen (and its key pinned), or one proven to extend the last.
    Accepted(TreeHead),
    /// The same head again.
    Unchanged,
    /// A larger head whose proof starts from another size than ours (the control plane sent
    /// it before hearing our last size): neither good nor bad; the next update proves it.
    Unproven {
        /// The size the proof starts from, if any.
        from: Option<u64>,
        /// Our last size.
        ours: u64,
    },
}

/// Evidence that the log was tampered with, or a head that cannot be checked at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WitnessAlarm {
    /// The resource is not a head this build can read.
    #[error("the log head is malformed: {0}")]
    Malformed(String),
    /// Signed by another key than the one pinned at first sight.
    #[error("the log head is signed by key {got}, but this witness pinned key {pinned}: the log key was replaced")]
    KeyChanged {
        /// The key id in the head.
        got: String,
        /// The pinned key id.
        pinned: String,
    },
    /// The signature does not verify.
    #[error("the log head's signature does not verify: {0}")]
    BadSignature(HeadError),
    /// A smaller tree than one already accepted.
    #[error("the log went back from {seen} entries to {got}: rolled back (restored from an older copy?)")]
    Rollback {
        /// The size already accepted.
        seen: u64,
        /// The size now shown.
        got: u64,
    },
    /// A different tree of a size already accepted, or one no proof connects to ours.
    #[error("the log forked: {0}")]
    Fork(ProofError),
}

impl WitnessAlarm {
    /// Stable metric label.
    pub fn kind(&self) -> &'static str {
        match self {
            WitnessAlarm::Malformed(_) => "malformed",
            WitnessAlarm::KeyChanged { .. } => "key_changed",
            WitnessAlarm::BadSignature(_) => "bad_signature",
            WitnessAlarm::Rollback { .. } => "rollback",
            WitnessAlarm::Fork(_) => "fork",
        }
    }

    /// Every [`WitnessAlarm::kind`], for pre-created metric series.
    pub const KINDS: [&'static str; 5] = [
        "malformed",
        "key_changed",
        "bad_signature",
        "rollback",
        "fork",
    ];
}

/// One witness's memory: the pinned key and the last accepted head.
#[derive(Debug, Default)]
pub struct Witness {
    key: Option<LogPublicKey>,
    last: Option<TreeHead>,
}

impl Witness {
    /// A witness that has seen nothing yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The last accepted head.
    pub fn last(&self) -> Option<&TreeHead> {
        self.last.as_ref()
    }

    /// Checks a `trellis-log-head` resource (JSON) against what this witness has seen.
    pub fn observe_json(&mut self, bytes: &[u8]) -> Result<Witnessed, WitnessAlarm> {
        let msg: HeadForWitness =
            serde_json::from_slice(bytes).map_err(|e| WitnessAlarm::Malformed(e.to_string()))?;
        self.observe(&msg)
    }

    /// Checks one head against what this witness has seen; on an alarm nothing changes.
    pub fn observe(&mut self, msg: &HeadForWitness) -> Result<Witnessed, WitnessAlarm> {
        let offered = LogPublicKey::from_pem(&msg.public_key)
            .map_err(|e| WitnessAlarm::Malformed(e.to_string()))?;
        let key = match &self.key {
            Some(pinned) if pinned.key_id() != offered.key_id() => {
                return Err(WitnessAlarm::KeyChanged {
                    got: offered.key_id().to_owned(),
                    pinned: pinned.key_id().to_owned(),
                })
            }
            Some(pinned) => pinned,
            None => &offered,
        };
        key.verify(&msg.head).map_err(WitnessAlarm::BadSignature)?;
        let new = msg.head.head;
        let Some(last) = self.last else {
            self.key = Some(offered);
            self.last = Some(new);
            return Ok(Witnessed::Accepted(new));
        };
        if new.tree_size < last.tree_size {
            return Err(WitnessAlarm::Rollback {
                seen: last.tree_size,
                got: new.tree_size,
            });
        }
        if new.tree_size == last.tree_size {
            return if new.root_hash == last.root_hash {
                Ok(Witnessed::Unchanged)
            } else {
                Err(WitnessAlarm::Fork(ProofError::Fork {
                    size: new.tree_size,
                }))
            };
        }
        match &msg.consistency {
            Some(c) if c.from_size == last.tree_size => {
                verify_consistency(
                    last.tree_size,
                    new.tree_size,
                    &last.root_hash,
                    &new.root_hash,
                    &c.proof,
                )
                .map_err(WitnessAlarm::Fork)?;
                self.last = Some(new);
                Ok(Witnessed::Accepted(new))
            }
            other => Ok(Witnessed::Unproven {
                from: other.as_ref().map(|c| c.from_size),
                ours: last.tree_size,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::leaf_hash;
    use crate::tree::MerkleTree;
    use aws_lc_rs::rand::SystemRandom;
    use aws_lc_rs::signature::{EcdsaKeyPair, KeyPair as _, ECDSA_P256_SHA256_ASN1_SIGNING};

    struct Log {
        pkcs8: Vec<u8>,
        key: EcdsaKeyPair,
        public: LogPublicKey,
        tree: MerkleTree,
    }

    impl Log {
        fn new() -> Self {
            let rng = SystemRandom::new();
            let pkcs8 =
                EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng).unwrap();
            Self::with_key(pkcs8.as_ref().to_vec())
        }

        fn with_key(pkcs8: Vec<u8>) -> Self {
            let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &pkcs8).unwrap();
            // SPKI = the fixed P-256 prefix + the uncompressed point.
            let mut spki = vec![
                0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06,
                0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
            ];
            spki.extend_from_slice(key.public_key().as_ref());
            let public = LogPublicKey::from_spki_der(&spki).unwrap();
            Self {
                pkcs8,
                key,
                public,
                tree: MerkleTree::new(),
            }
        }

        /// The same key, another (empty) history.
        fn fork(&self) -> Self {
            Self::with_key(self.pkcs8.clone())
        }

        fn grow(&mut self, n: u32) {
            for i in 0..n {
                let i = self.tree.size() as u32 + i;
                self.tree.push(leaf_hash(format!("entry {i}").as_bytes()));
            }
        }

        fn head(&self, size: u64) -> SignedTreeHead {
            let head = TreeHead {
                tree_size: size,
                root_hash: self.tree.root_at(size).unwrap(),
                timestamp_ms: 1_000 + size,
            };
            let signature = self
                .key
                .sign(&SystemRandom::new(), &head.signing_input())
                .unwrap()
                .as_ref()
                .to_vec();
            SignedTreeHead {
                head,
                key_id: self.public.key_id().to_owned(),
                signature,
            }
        }

        fn message(&self, size: u64, from: Option<u64>) -> HeadForWitness {
            HeadForWitness {
                head: self.head(size),
                public_key: self.public.to_pem(),
                consistency: from.map(|f| ConsistencyFrom {
                    from_size: f,
                    proof: self.tree.consistency_proof(f, size).unwrap(),
                }),
                own_svid: None,
            }
        }
    }

    #[test]
    fn a_growing_log_is_accepted_step_by_step() {
        let mut log = Log::new();
        let mut w = Witness::new();
        log.grow(3);
        assert!(
            matches!(w.observe(&log.message(3, None)), Ok(Witnessed::Accepted(h)) if h.tree_size == 3)
        );
        assert_eq!(w.observe(&log.message(3, None)), Ok(Witnessed::Unchanged));
        log.grow(10);
        assert!(
            matches!(w.observe(&log.message(13, Some(3))), Ok(Witnessed::Accepted(h)) if h.tree_size == 13)
        );
        // A round trip through JSON, as over SDS.
        log.grow(1);
        let json = serde_json::to_vec(&log.message(14, Some(13))).unwrap();
        assert!(matches!(w.observe_json(&json), Ok(Witnessed::Accepted(h)) if h.tree_size == 14));
        assert_eq!(w.last().unwrap().tree_size, 14);
    }

    #[test]
    fn a_proof_from_another_size_proves_nothing_either_way() {
        let mut log = Log::new();
        let mut w = Witness::new();
        log.grow(4);
        w.observe(&log.message(4, None)).unwrap();
        log.grow(4);
        assert_eq!(
            w.observe(&log.message(8, Some(2))),
            Ok(Witnessed::Unproven {
                from: Some(2),
                ours: 4
            })
        );
        assert_eq!(
            w.observe(&log.message(8, None)),
            Ok(Witnessed::Unproven {
                from: None,
                ours: 4
            })
        );
        assert_eq!(w.last().unwrap().tree_size, 4);
    }

    #[test]
    fn a_rollback_is_an_alarm_and_the_last_head_stays() {
        let mut log = Log::new();
        let mut w = Witness::new();
        log.grow(9);
        w.observe(&log.message(9, None)).unwrap();
        let alarm = w.observe(&log.message(5, None)).unwrap_err();
        assert_eq!(alarm, WitnessAlarm::Rollback { seen: 9, got: 5 });
        assert_eq!(alarm.kind(), "rollback");
        assert_eq!(w.last().unwrap().tree_size, 9);
    }

    #[test]
    fn a_fork_is_an_alarm_at_the_same_size_and_beyond() {
        let mut log = Log::new();
        let mut w = Witness::new();
        log.grow(6);
        w.observe(&log.message(6, None)).unwrap();
        // Same key, a different history of the same size.
        let mut forked = log.fork();
        for i in 0..6 {
            forked.tree.push(leaf_hash(format!("other {i}").as_bytes()));
        }
        assert_eq!(
            w.observe(&forked.message(6, None)).unwrap_err().kind(),
            "fork"
        );
        // ...and grown: its proof from 6 does not connect to our root.
        forked.grow(3);
        assert_eq!(
            w.observe(&forked.message(9, Some(6))).unwrap_err().kind(),
            "fork"
        );
        assert_eq!(w.last().unwrap().tree_size, 6);
    }

    #[test]
    fn another_key_or_a_bad_signature_is_an_alarm() {
        let mut log = Log::new();
        let mut w = Witness::new();
        log.grow(2);
        w.observe(&log.message(2, None)).unwrap();
        let mut stranger = Log::new();
        stranger.grow(3);
        assert_eq!(
            w.observe(&stranger.message(3, Some(2))).unwrap_err().kind(),
            "key_changed"
        );
        let mut bad = log.message(2, None);
        bad.head.head.timestamp_ms += 1;
        assert_eq!(w.observe(&bad).unwrap_err().kind(), "bad_signature");
        assert_eq!(w.observe_json(b"{").unwrap_err().kind(), "malformed");
    }
}
