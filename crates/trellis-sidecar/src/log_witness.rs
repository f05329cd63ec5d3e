//! The sidecar as a witness of the control plane's transparency log.
//!
//! With every SDS update the control plane sends its latest signed tree head
//! (`trellis-log-head`); [`trellis_transparency::Witness`] checks the signature with the key
//! pinned at first sight and the consistency with the last head accepted. Once a head covers
//! the SVID this sidecar holds (it reports the serial in `node.metadata["trellis.io/log-serial"]`),
//! the control plane adds that SVID's log entry and inclusion proof, and the sidecar checks
//! that the entry describes its own certificate and is under the verified head: the CA cannot
//! hand it a certificate the log does not show.
//!
//! What is found here is evidence for operators (an ERROR line,
//! `trellis_log_witness_alarms_total{kind}` or `trellis_log_own_svid_checks_total{result}`, a
//! warning in `/ready` and `/certs`), never a reason to refuse an SVID or drop traffic: a
//! witness that could stop the mesh would be a switch for an attacker to pull.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwapOption;
use trellis_identity::Svid;
use trellis_transparency::{
    check_own_svid, HeadForWitness, HeldSvid, OwnSvidProof, TreeHead, Witness, WitnessAlarm,
    Witnessed,
};

use crate::metrics::{AlarmLabel, ResultLabel, SidecarMetrics};

/// The alarm kind (in `/ready` and `/certs`) of an own-SVID proof that failed.
pub const OWN_SVID_ALARM: &str = "own_svid";

/// The SVIDs remembered for proofs: the one held and the few before it (a proof can be for
/// the SVID held when the control plane built its answer, just replaced by the same answer).
const HELD_KEPT: usize = 4;

/// The first alarm raised, kept until the process restarts: a fork stays a fork.
#[derive(Debug)]
pub struct LogAlarm {
    /// `rollback`, `fork`, `own_svid`, …
    pub kind: &'static str,
    /// What was wrong, for `/ready` and `/certs`.
    pub message: String,
}

/// The last SVID of this sidecar proven to be in the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProvenSvid {
    /// Its serial, lowercase hex.
    pub serial_hex: String,
    /// Its entry's index in the log.
    pub index: u64,
    /// The size of the signed head the proof was checked against.
    pub tree_size: u64,
}

/// What one head said about this sidecar's own SVID (`trellis_log_own_svid_checks_total{result}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OwnSvidCheck {
    /// The entry is this sidecar's certificate, under the verified head.
    Proven,
    /// No proof for an SVID this sidecar holds (not yet under a signed head, or a control
    /// plane that predates the check): not an alarm, the next update brings it.
    Missing,
    /// The entry or its proof is wrong: an alarm.
    Mismatch,
}

impl OwnSvidCheck {
    /// Stable metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            OwnSvidCheck::Proven => "proven",
            OwnSvidCheck::Missing => "missing",
            OwnSvidCheck::Mismatch => "mismatch",
        }
    }
}

/// The witness state of one sidecar, shared by the SDS client and the admin endpoint.
pub struct LogWitness {
    witness: Mutex<Witness>,
    /// What the log must say of the SVIDs held lately, newest first.
    held: Mutex<VecDeque<HeldSvid>>,
    proven: ArcSwapOption<ProvenSvid>,
    alarm: ArcSwapOption<LogAlarm>,
    metrics: Arc<SidecarMetrics>,
}

impl std::fmt::Debug for LogWitness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogWitness")
            .field("witnessed_size", &self.witnessed_size())
            .field("proven", &self.proven.load())
            .field("alarm", &self.alarm.load())
            .finish()
    }
}

/// Locks `m`; a panic while it was held leaves data that is still a valid earlier state.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl LogWitness {
    /// A witness that has seen no head yet.
    pub fn new(metrics: Arc<SidecarMetrics>) -> Self {
        Self {
            witness: Mutex::new(Witness::new()),
            held: Mutex::new(VecDeque::with_capacity(HELD_KEPT)),
            proven: ArcSwapOption::empty(),
            alarm: ArcSwapOption::empty(),
            metrics,
        }
    }

    /// The size of the last head accepted (what the control plane must prove consistency from).
    pub fn witnessed_size(&self) -> Option<u64> {
        lock(&self.witness).last().map(|h| h.tree_size)
    }

    /// The first alarm, if any.
    pub fn alarm(&self) -> Option<Arc<LogAlarm>> {
        self.alarm.load_full()
    }

    /// The last SVID of this sidecar proven to be in the log.
    pub fn proven(&self) -> Option<Arc<ProvenSvid>> {
        self.proven.load_full()
    }

    /// Remembers what the log entry of `svid` (now installed) must say.
    pub fn hold(&self, svid: &Svid) {
        let Some(leaf) = svid.chain().first() else {
            return;
        };
        // The store validated this certificate already; a parse failure here cannot happen,
        // and would only mean its proof is never checked.
        let Ok(public_key_sha256) = trellis_identity::spki_sha256(leaf) else {
            return;
        };
        let mut held = lock(&self.held);
        if held
            .front()
            .is_some_and(|h| h.serial_hex == svid.serial_hex())
        {
            return;
        }
        held.truncate(HELD_KEPT - 1);
        held.push_front(HeldSvid {
            serial_hex: svid.serial_hex().to_owned(),
            spiffe_id: svid.spiffe_id().to_string(),
            public_key_sha256,
        });
    }

    /// Checks one `trellis-log-head` resource; logs and counts what it finds.
    pub fn observe(&self, json: &[u8]) {
        let msg: HeadForWitness = match serde_json::from_slice(json) {
            Ok(m) => m,
            Err(e) => return self.raise_witness(&WitnessAlarm::Malformed(e.to_string())),
        };
        let result = lock(&self.witness).observe(&msg);
        let verified: Option<TreeHead> = match result {
            Ok(Witnessed::Accepted(head)) => {
                self.metrics
                    .log_witnessed_size
                    .set(i64::try_from(head.tree_size).unwrap_or(i64::MAX));
                tracing::debug!(tree_size = head.tree_size, "transparency log head verified");
                Some(head)
            }
            Ok(Witnessed::Unchanged) => Some(msg.head.head),
            Ok(Witnessed::Unproven { from, ours }) => {
                tracing::debug!(
                    ?from,
                    ours,
                    "transparency log head not proven from our size yet; keeping the last one"
                );
                None
            }
            Err(alarm) => {
                self.raise_witness(&alarm);
                None
            }
        };
        // An inclusion proof means something only against a head this witness verified.
        if let Some(head) = verified {
            let check = self.check_own(&head, msg.own_svid.as_ref());
            if let Some(check) = check {
                self.metrics
                    .log_own_svid_checks
                    .get_or_create(&ResultLabel {
                        result: check.as_str(),
                    })
                    .inc();
            }
        }
    }

    /// Checks the proof of our own SVID against `head`; `None` before we hold any SVID.
    fn check_own(&self, head: &TreeHead, proof: Option<&OwnSvidProof>) -> Option<OwnSvidCheck> {
        let held = lock(&self.held);
        let current = held.front()?;
        let Some(proof) = proof else {
            if self
                .proven
                .load()
                .as_ref()
                .is_some_and(|p| p.serial_hex == current.serial_hex)
            {
                // Proven under an earlier head this witness verified; this head was proven
                // consistent with it, so the entry is still there. The control plane sends the
                // proof once per SVID and stream, not with every head.
                return None;
            }
            tracing::debug!(
                serial = current.serial_hex,
                tree_size = head.tree_size,
                "no transparency log proof for our SVID with this head yet"
            );
            return Some(OwnSvidCheck::Missing);
        };
        let wanted = proof.serial.to_ascii_lowercase();
        let Some(cert) = held.iter().find(|h| h.serial_hex == wanted) else {
            // A proof for an SVID we do not hold proves nothing about ours.
            tracing::debug!(
                serial = wanted,
                "transparency log proof for a serial this sidecar does not hold; ignored"
            );
            return Some(OwnSvidCheck::Missing);
        };
        match check_own_svid(head, proof, cert) {
            Ok(index) => {
                let is_current = std::ptr::eq(cert, current);
                tracing::debug!(
                    serial = cert.serial_hex,
                    index,
                    tree_size = head.tree_size,
                    is_current,
                    "our SVID is in the transparency log"
                );
                let newer = self.proven.load().as_ref().is_none_or(|p| {
                    // Never step back to an older SVID's proof after a newer one's.
                    is_current || p.serial_hex != current.serial_hex
                });
                if newer {
                    self.proven.store(Some(Arc::new(ProvenSvid {
                        serial_hex: cert.serial_hex.clone(),
                        index,
                        tree_size: head.tree_size,
                    })));
                }
                Some(OwnSvidCheck::Proven)
            }
            Err(mismatch) => {
                drop(held);
                tracing::error!(
                    kind = OWN_SVID_ALARM,
                    "transparency log alarm: {mismatch}; the control plane's CA may be issuing certificates it does not log: investigate (traffic is not affected)"
                );
                self.keep_first_alarm(OWN_SVID_ALARM, mismatch.to_string());
                Some(OwnSvidCheck::Mismatch)
            }
        }
    }

    fn raise_witness(&self, alarm: &WitnessAlarm) {
        let kind = alarm.kind();
        self.metrics
            .log_witness_alarms
            .get_or_create(&AlarmLabel { kind })
            .inc();
        tracing::error!(
            kind,
            "transparency log alarm: {alarm}; the control plane's issuance log cannot be trusted: investigate (traffic is not affected)"
        );
        self.keep_first_alarm(kind, alarm.to_string());
    }

    fn keep_first_alarm(&self, kind: &'static str, message: String) {
        if self.alarm.load().is_none() {
            self.alarm.store(Some(Arc::new(LogAlarm { kind, message })));
        }
    }

    /// `/certs`' `transparency_log`: what was witnessed, the last own SVID proven, and the
    /// alarm if any.
    pub fn to_json(&self) -> serde_json::Value {
        let last = lock(&self.witness).last().copied();
        let proven = self.proven();
        let current = lock(&self.held).front().map(|h| h.serial_hex.clone());
        serde_json::json!({
            "witnessed_size": last.map(|h| h.tree_size),
            "witnessed_timestamp_ms": last.map(|h| h.timestamp_ms),
            "own_svid": {
                "proven_serial": proven.as_ref().map(|p| p.serial_hex.clone()),
                "proven_index": proven.as_ref().map(|p| p.index),
                "proven_tree_size": proven.as_ref().map(|p| p.tree_size),
                "current_proven": current.is_some() && proven.as_ref().map(|p| &p.serial_hex) == current.as_ref(),
            },
            "alarm": self.alarm().map(|a| serde_json::json!({"kind": a.kind, "message": a.message})),
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use aws_lc_rs::encoding::AsDer as _;
    use aws_lc_rs::rand::SystemRandom;
    use aws_lc_rs::signature::{EcdsaKeyPair, KeyPair as _, ECDSA_P256_SHA256_ASN1_SIGNING};
    use trellis_identity::testca::TestCa;
    use trellis_transparency::{
        leaf_hash, IssuanceEntry, LogBody, LogEntry, LogPublicKey, MerkleTree, SignedTreeHead,
    };

    #[test]
    fn every_check_result_has_a_pre_created_metric_series() {
        let labels: Vec<&str> = [
            OwnSvidCheck::Proven,
            OwnSvidCheck::Missing,
            OwnSvidCheck::Mismatch,
        ]
        .into_iter()
        .map(OwnSvidCheck::as_str)
        .collect();
        assert_eq!(labels, crate::metrics::OWN_SVID_CHECK_RESULTS);
    }

    /// A control plane's log, as far as a witness can tell: a key, a tree, signed heads.
    struct Log {
        key: EcdsaKeyPair,
        public: LogPublicKey,
        tree: MerkleTree,
        entries: Vec<Vec<u8>>,
    }

    impl Log {
        fn new() -> Self {
            let key = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_ASN1_SIGNING).unwrap();
            let public =
                LogPublicKey::from_spki_der(key.public_key().as_der().unwrap().as_ref()).unwrap();
            Self {
                key,
                public,
                tree: MerkleTree::new(),
                entries: Vec::new(),
            }
        }

        fn append(&mut self, body: LogBody) -> u64 {
            let index = self.tree.size();
            let bytes = LogEntry {
                index,
                time_ms: 1_000 + index,
                body,
            }
            .encode()
            .unwrap();
            self.tree.push(leaf_hash(&bytes));
            self.entries.push(bytes);
            index
        }

        /// Logs `svid` as the CA does.
        fn log(&mut self, svid: &Svid) -> u64 {
            self.append(issuance(svid, svid.serial_hex()))
        }

        /// The resource for a witness last at `from`, proving `serial` at `index` if given.
        fn message(&self, from: Option<u64>, own: Option<(&str, u64)>) -> Vec<u8> {
            let size = self.tree.size();
            let head = TreeHead {
                tree_size: size,
                root_hash: self.tree.root_at(size).unwrap(),
                timestamp_ms: 5_000 + size,
            };
            let signature = self
                .key
                .sign(&SystemRandom::new(), &head.signing_input())
                .unwrap()
                .as_ref()
                .to_vec();
            let msg = HeadForWitness {
                head: SignedTreeHead {
                    head,
                    key_id: self.public.key_id().to_owned(),
                    signature,
                },
                public_key: self.public.to_pem(),
                consistency: from.map(|f| trellis_transparency::ConsistencyFrom {
                    from_size: f,
                    proof: self.tree.consistency_proof(f, size).unwrap(),
                }),
                own_svid: own.map(|(serial, index)| OwnSvidProof {
                    serial: serial.to_owned(),
                    index,
                    entry: self.entries[index as usize].clone(),
                    proof: self.tree.inclusion_proof(index, size).unwrap(),
                }),
            };
            serde_json::to_vec(&msg).unwrap()
        }
    }

    /// An issuance entry for `svid`'s key and identity, under serial `serial_hex`.
    fn issuance(svid: &Svid, serial_hex: &str) -> LogBody {
        LogBody::Issuance(IssuanceEntry {
            serial: hex::decode(serial_hex).unwrap(),
            spiffe_id: svid.spiffe_id().to_string(),
            public_key_sha256: trellis_identity::spki_sha256(&svid.chain()[0]).unwrap(),
            not_before: 0,
            not_after: 0,
            issuer_key_id: Vec::new(),
            attestation: "join_token".into(),
        })
    }

    fn witness() -> LogWitness {
        LogWitness::new(Arc::new(SidecarMetrics::new()))
    }

    fn checks(w: &LogWitness, result: &'static str) -> u64 {
        w.metrics
            .log_own_svid_checks
            .get_or_create(&ResultLabel { result })
            .get()
    }

    #[test]
    fn the_held_svid_is_proven_once_a_head_covers_it() {
        let ca = TestCa::root("example.org");
        let (mut log, w) = (Log::new(), witness());
        let svid = ca.svid("/ns/prod/sa/web");
        // Before any SVID: nothing to prove, nothing counted.
        log.log(&ca.svid("/ns/prod/sa/db"));
        w.observe(&log.message(None, None));
        assert_eq!(checks(&w, "missing"), 0);
        // The SVID is installed before its entry is under a head: missing, not an alarm.
        w.hold(&svid);
        w.observe(&log.message(None, None));
        assert_eq!(checks(&w, "missing"), 1);
        let index = log.log(&svid);
        w.observe(&log.message(Some(1), Some((svid.serial_hex(), index))));
        assert_eq!(checks(&w, "proven"), 1);
        assert!(w.alarm().is_none());
        let proven = w.proven().unwrap();
        assert_eq!(
            (proven.serial_hex.as_str(), proven.index, proven.tree_size),
            (svid.serial_hex(), 1, 2)
        );
        let json = w.to_json();
        assert_eq!(json["own_svid"]["proven_serial"], svid.serial_hex());
        assert_eq!(json["own_svid"]["current_proven"], true);

        // Rotated: the proof for the previous SVID still counts, and the new one is not
        // proven until its own proof comes.
        let next = ca.svid("/ns/prod/sa/web");
        w.hold(&next);
        w.observe(&log.message(None, Some((svid.serial_hex(), index))));
        assert_eq!(checks(&w, "proven"), 2);
        assert_eq!(w.to_json()["own_svid"]["current_proven"], false);
        let at = log.log(&next);
        w.observe(&log.message(Some(2), Some((next.serial_hex(), at))));
        assert_eq!(w.proven().unwrap().serial_hex, next.serial_hex());
        // A late proof of the older one does not step back.
        w.observe(&log.message(None, Some((svid.serial_hex(), index))));
        assert_eq!(w.proven().unwrap().serial_hex, next.serial_hex());
        assert_eq!(checks(&w, "mismatch"), 0);
        assert!(w.alarm().is_none());
    }

    #[test]
    fn an_entry_for_another_certificate_is_an_alarm() {
        let ca = TestCa::root("example.org");
        let (mut log, w) = (Log::new(), witness());
        let svid = ca.svid("/ns/prod/sa/web");
        w.hold(&svid);
        // The log holds an SVID of the same identity, not ours; the control plane passes it
        // off as ours.
        let other = log.log(&ca.svid("/ns/prod/sa/web"));
        w.observe(&log.message(None, Some((svid.serial_hex(), other))));
        assert_eq!(checks(&w, "mismatch"), 1);
        assert_eq!(checks(&w, "proven"), 0);
        let alarm = w.alarm().unwrap();
        assert_eq!(alarm.kind, OWN_SVID_ALARM);
        assert!(
            alarm.message.contains(svid.serial_hex()) && alarm.message.contains("serial"),
            "{}",
            alarm.message
        );
        assert!(w.proven().is_none());
        // Our serial on an entry for another key (a certificate the log does not show).
        let (mut log, w) = (Log::new(), witness());
        w.hold(&svid);
        let forged = log.append(issuance(&ca.svid("/ns/prod/sa/web"), svid.serial_hex()));
        w.observe(&log.message(None, Some((svid.serial_hex(), forged))));
        assert_eq!(checks(&w, "mismatch"), 1);
        assert!(
            w.alarm().unwrap().message.contains("public key SHA-256"),
            "{}",
            w.alarm().unwrap().message
        );
        // The alarm keeps the witness serving: the head itself was fine.
        assert_eq!(w.witnessed_size(), Some(1));
    }

    #[test]
    fn a_proof_that_does_not_lead_to_the_signed_root_is_an_alarm() {
        let ca = TestCa::root("example.org");
        let (mut log, w) = (Log::new(), witness());
        let svid = ca.svid("/ns/prod/sa/web");
        w.hold(&svid);
        log.log(&ca.svid("/ns/prod/sa/db"));
        let index = log.log(&svid);
        log.log(&ca.svid("/ns/prod/sa/api"));
        let mut msg: HeadForWitness =
            serde_json::from_slice(&log.message(None, Some((svid.serial_hex(), index)))).unwrap();
        msg.own_svid.as_mut().unwrap().proof[0][0] ^= 1;
        w.observe(&serde_json::to_vec(&msg).unwrap());
        assert_eq!(checks(&w, "mismatch"), 1);
        let alarm = w.alarm().unwrap();
        assert!(
            alarm
                .message
                .contains("does not verify against the signed head"),
            "{}",
            alarm.message
        );
        assert_eq!(w.witnessed_size(), Some(3));
    }

    #[test]
    fn a_head_without_a_proof_after_the_held_svid_was_proven_counts_nothing() {
        let ca = TestCa::root("example.org");
        let (mut log, w) = (Log::new(), witness());
        let svid = ca.svid("/ns/prod/sa/web");
        w.hold(&svid);
        let index = log.log(&svid);
        w.observe(&log.message(None, Some((svid.serial_hex(), index))));
        assert_eq!(checks(&w, "proven"), 1);
        // Later heads (a bundle push, a new entry) come without the proof: nothing to count.
        log.log(&ca.svid("/ns/prod/sa/db"));
        w.observe(&log.message(Some(1), None));
        assert_eq!(w.witnessed_size(), Some(2));
        assert_eq!(checks(&w, "missing") + checks(&w, "mismatch"), 0);
        assert_eq!(w.to_json()["own_svid"]["current_proven"], true);
        // A rotated SVID without its proof is missing again.
        w.hold(&ca.svid("/ns/prod/sa/web"));
        w.observe(&log.message(Some(2), None));
        assert_eq!(checks(&w, "missing"), 1);
    }

    #[test]
    fn no_proof_or_a_proof_for_a_serial_not_held_is_no_alarm() {
        let ca = TestCa::root("example.org");
        let (mut log, w) = (Log::new(), witness());
        let svid = ca.svid("/ns/prod/sa/web");
        w.hold(&svid);
        let index = log.log(&ca.svid("/ns/prod/sa/web"));
        // An older control plane: no `own_svid` at all.
        w.observe(&log.message(None, None));
        // A proof for someone else's serial: proves nothing about ours.
        let someone = log.entries.len() as u64 - 1;
        assert_eq!(someone, index);
        let other = ca.svid("/ns/prod/sa/web");
        w.observe(&log.message(None, Some((other.serial_hex(), index))));
        assert_eq!(checks(&w, "missing"), 2);
        assert_eq!(checks(&w, "mismatch"), 0);
        assert!(w.alarm().is_none());
    }

    #[test]
    fn a_proof_against_a_head_that_fails_witnessing_is_not_checked() {
        let ca = TestCa::root("example.org");
        let (mut log, w) = (Log::new(), witness());
        let svid = ca.svid("/ns/prod/sa/web");
        w.hold(&svid);
        let index = log.log(&svid);
        log.log(&ca.svid("/ns/prod/sa/db"));
        w.observe(&log.message(None, Some((svid.serial_hex(), index))));
        assert_eq!(checks(&w, "proven"), 1);
        // Another log key: the witness alarms (key_changed); the proof is not even looked at.
        let mut stranger = Log::new();
        let index = stranger.log(&svid);
        w.observe(&stranger.message(None, Some((svid.serial_hex(), index))));
        assert_eq!(w.alarm().unwrap().kind, "key_changed");
        assert_eq!(checks(&w, "proven"), 1);
        assert_eq!(checks(&w, "missing") + checks(&w, "mismatch"), 0);
    }
}
