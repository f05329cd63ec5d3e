use std::time::Duration;

use super::*;
use crate::ca::Ca;
use crate::registry::IssuanceRecord;
use trellis_identity::{SpiffeId, TrustDomain};
use trellis_transparency::{audit_log, verify_consistency, verify_inclusion, LogBody, LogEntry};

fn td() -> TrustDomain {
    TrustDomain::parse("example.org").unwrap()
}

/// A registry with the embedded CA, and a function that issues and records one SVID.
fn setup() -> (tempfile::TempDir, Arc<Registry>, Ca) {
    let dir = tempfile::tempdir().unwrap();
    let registry = Arc::new(Registry::open(&dir.path().join("trellis.db")).unwrap());
    let ca = Ca::load_or_create(&registry, &td()).unwrap();
    (dir, registry, ca)
}

fn issue(registry: &Registry, ca: &Ca, name: &str) -> String {
    let id = SpiffeId::parse(&format!("spiffe://example.org/ns/prod/sa/{name}")).unwrap();
    let svid = ca
        .issue(&id, Duration::from_secs(3600), SystemTime::now())
        .unwrap();
    let log = issuance_body(&svid.chain()[0], "join_token").unwrap();
    registry
        .record_issuance(&IssuanceRecord {
            spiffe_id: id,
            serial_hex: svid.serial_hex().to_owned(),
            not_after: svid.not_after(),
            attestor: "join_token",
            peer: None,
            issued_at: SystemTime::now(),
            log,
        })
        .unwrap();
    svid.serial_hex().to_owned()
}

/// With pages of two entries and one kept whole, nearly every proof reads its pages back from
/// the registry; every one verifies against the signed heads, and a log reopened on the same
/// registry proves the same.
#[test]
fn proofs_about_old_entries_read_their_pages_back_and_verify() {
    let (_dir, registry, ca) = setup();
    let metrics = Arc::new(LogMetrics::default());
    let open = || {
        IssuanceLog::open_paged(
            Arc::clone(&registry),
            Arc::clone(&metrics),
            None,
            PagedMerkleTree::new(1, 1),
        )
        .unwrap()
    };
    let log = open();
    let mut heads = Vec::new();
    for name in ["a", "b", "c", "d", "e", "f", "g"] {
        issue(&registry, &ca, name);
        log.sync().unwrap();
        heads.push(log.latest_head().unwrap().head);
    }
    let leaves = registry.log_leaf_hashes(0, 100).unwrap();
    for log in [log, open()] {
        for head in &heads {
            let size = head.tree_size;
            for index in 0..size {
                let proof = log.inclusion_proof(index, size).unwrap();
                verify_inclusion(
                    index,
                    size,
                    &leaves[index as usize],
                    &proof,
                    &head.root_hash,
                )
                .unwrap();
            }
            let latest = heads.last().unwrap();
            let proof = log.consistency_proof(size, latest.tree_size).unwrap();
            verify_consistency(
                size,
                latest.tree_size,
                &head.root_hash,
                &latest.root_hash,
                &proof,
            )
            .unwrap();
        }
        // From memory only, an old size cannot be proved; the latest pages can.
        assert!(log.consistency_proof_in_memory(1, 7).is_none());
        assert!(log.consistency_proof_in_memory(6, 7).is_some());
    }
}

#[test]
fn entries_describe_the_certificate_and_heads_prove_them() {
    let (_dir, registry, ca) = setup();
    let metrics = Arc::new(LogMetrics::default());
    let log = IssuanceLog::open(Arc::clone(&registry), Arc::clone(&metrics)).unwrap();
    assert!(log.latest_head().is_none());
    log.sync().unwrap();
    assert!(log.latest_head().is_none(), "no head for an empty log");

    let serial = issue(&registry, &ca, "web");
    issue(&registry, &ca, "db");
    log.sync().unwrap();
    let head = log.latest_head().unwrap();
    assert_eq!(head.head.tree_size, 2);
    log.public_key().verify(&head).unwrap();
    assert_eq!(metrics.heads_signed.get(), 1);

    let index = registry.log_index_of_serial(&serial).unwrap().unwrap();
    let stored = registry.log_entries(index, index + 1).unwrap().remove(0);
    let entry = LogEntry::decode(&stored.bytes).unwrap();
    let LogBody::Issuance(e) = &entry.body else {
        panic!("not an issuance: {entry:?}")
    };
    assert_eq!(hex::encode(&e.serial), serial);
    assert_eq!(e.spiffe_id, "spiffe://example.org/ns/prod/sa/web");
    assert!(e.not_after - e.not_before >= 3600);
    assert!(
        !e.issuer_key_id.is_empty(),
        "rcgen CAs carry a key identifier"
    );

    let proof = log.inclusion_proof(index, 2).unwrap();
    verify_inclusion(
        index,
        2,
        &stored.leaf_hash.unwrap(),
        &proof,
        &head.head.root_hash,
    )
    .unwrap();

    // More entries: a new head, consistent with the old one.
    issue(&registry, &ca, "api");
    log.sync().unwrap();
    let newer = log.latest_head().unwrap();
    assert_eq!(newer.head.tree_size, 3);
    assert!(newer.head.timestamp_ms >= head.head.timestamp_ms);
    let proof = log.consistency_proof(2, 3).unwrap();
    verify_consistency(2, 3, &head.head.root_hash, &newer.head.root_hash, &proof).unwrap();

    // The whole stored log audits clean.
    let summary = audit_log(
        registry.log_entries(0, 100).unwrap(),
        &registry.log_heads().unwrap(),
        log.public_key(),
    )
    .unwrap();
    assert_eq!((summary.entries, summary.heads), (3, 2));
}

#[test]
fn two_replicas_follow_one_log_and_publish_one_head_per_size() {
    let (dir, registry, ca) = setup();
    let other = Arc::new(Registry::open(&dir.path().join("trellis.db")).unwrap());
    let a = IssuanceLog::open(Arc::clone(&registry), Arc::default()).unwrap();
    let b = IssuanceLog::open(Arc::clone(&other), Arc::default()).unwrap();
    assert_eq!(
        a.public_key(),
        b.public_key(),
        "one log key for every replica"
    );
    issue(&registry, &ca, "one");
    issue(&other, &ca, "two");
    a.sync().unwrap();
    b.sync().unwrap();
    assert_eq!(
        a.latest_head(),
        b.latest_head(),
        "b adopts a's head for size 2"
    );
    assert_eq!(registry.log_heads().unwrap().len(), 1);
}

#[test]
fn a_log_that_does_not_match_its_signed_head_refuses_to_start() {
    let (dir, registry, ca) = setup();
    let log = IssuanceLog::open(Arc::clone(&registry), Arc::default()).unwrap();
    issue(&registry, &ca, "web");
    issue(&registry, &ca, "db");
    log.sync().unwrap();
    drop(log);

    // Someone with the database rewrites an entry and its leaf hash.
    let conn = rusqlite::Connection::open(dir.path().join("trellis.db")).unwrap();
    let forged = LogEntry::encode_parts(1, 1, &test_body("0bad")).unwrap();
    conn.execute(
        "UPDATE log_entries SET entry = ?1, leaf_hash = ?2 WHERE idx = 1",
        rusqlite::params![forged, trellis_transparency::leaf_hash(&forged).as_slice()],
    )
    .unwrap();
    let metrics = Arc::new(LogMetrics::default());
    let err = IssuanceLog::open(Arc::clone(&registry), Arc::clone(&metrics))
        .err()
        .unwrap();
    assert!(matches!(err, LogError::Mismatch { size: 2 }), "{err}");
    assert!(err.to_string().contains("trellis log verify"), "{err}");
    assert_eq!(metrics.inconsistencies.get(), 1);
}

#[test]
fn ca_phases_are_logged_once_each() {
    let (_dir, registry, ca) = setup();
    let active = ca_phase_body(ca.signing_cert(), "active").unwrap();
    registry.record_ca_phase(&active).unwrap();
    registry.record_ca_phase(&active).unwrap();
    registry
        .record_ca_phase(&ca_phase_body(ca.signing_cert(), "retiring").unwrap())
        .unwrap();
    let entries = registry.log_entries(0, 10).unwrap();
    assert_eq!(entries.len(), 2);
    let LogBody::CaPhase(p) = LogEntry::decode(&entries[1].bytes).unwrap().body else {
        panic!("not a phase")
    };
    assert_eq!(p.phase, "retiring");
    assert!(!p.ca_key_id.is_empty());
}

/// What a sidecar holding `svid` knows of it, as the sidecar computes it.
fn held(svid: &trellis_identity::Svid) -> trellis_transparency::HeldSvid {
    trellis_transparency::HeldSvid {
        serial_hex: svid.serial_hex().to_owned(),
        spiffe_id: svid.spiffe_id().to_string(),
        public_key_sha256: trellis_identity::spki_sha256(&svid.chain()[0]).unwrap(),
    }
}

#[test]
fn own_svid_proofs_come_once_a_head_covers_the_entry_and_only_to_its_holder() {
    let (_dir, registry, ca) = setup();
    let log = IssuanceLog::open(Arc::clone(&registry), Arc::default()).unwrap();
    let mut heads = log.watch_heads();
    issue(&registry, &ca, "db");
    log.sync().unwrap();
    assert!(heads.has_changed().unwrap());
    assert_eq!(*heads.borrow_and_update(), 1);

    let id = SpiffeId::parse("spiffe://example.org/ns/prod/sa/web").unwrap();
    let svid = ca
        .issue(&id, Duration::from_secs(3600), SystemTime::now())
        .unwrap();
    registry
        .record_issuance(&IssuanceRecord {
            spiffe_id: id.clone(),
            serial_hex: svid.serial_hex().to_owned(),
            not_after: svid.not_after(),
            attestor: "join_token",
            peer: None,
            issued_at: SystemTime::now(),
            log: issuance_body(&svid.chain()[0], "join_token").unwrap(),
        })
        .unwrap();
    // Recorded, but the latest head does not cover it yet: no proof, no error.
    let old = log.latest_head().unwrap().head;
    assert_eq!(
        log.own_svid_proof(svid.serial_hex(), id.as_str(), &old)
            .unwrap(),
        None
    );
    log.sync().unwrap();
    assert!(heads.has_changed().unwrap());
    let head = log.latest_head().unwrap().head;
    let proof = log
        .own_svid_proof(svid.serial_hex(), id.as_str(), &head)
        .unwrap()
        .expect("covered now");
    // The control plane's entry and the sidecar's view of its certificate agree.
    assert_eq!(
        trellis_transparency::check_own_svid(&head, &proof, &held(&svid)),
        Ok(1)
    );
    // Another workload asking for this serial is shown nothing; an unknown serial neither.
    assert_eq!(
        log.own_svid_proof(
            svid.serial_hex(),
            "spiffe://example.org/ns/prod/sa/db",
            &head
        )
        .unwrap(),
        None
    );
    assert_eq!(
        log.own_svid_proof("0123abcd", id.as_str(), &head).unwrap(),
        None
    );
}
