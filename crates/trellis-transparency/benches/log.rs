//! The transparency log at 1,000,000 entries: inclusion and consistency proofs (target
//! < 1 ms each), building the tree from stored leaf hashes (what a restart does), and
//! auditing every entry and head (`trellis log verify` without the storage reads; target
//! < 30 s for the whole log).
//!
//!     cargo bench -p trellis-transparency --bench log

// A benchmark reports failure by panicking.
#![allow(clippy::unwrap_used)]

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use trellis_transparency::{
    audit_log, leaf_hash, verify_consistency, verify_inclusion, IssuanceEntry, LogBody, LogEntry,
    MerkleTree, StoredEntry,
};

const ENTRIES: u64 = 1_000_000;

fn entry(index: u64) -> Vec<u8> {
    LogEntry {
        index,
        time_ms: 1_765_000_000_000 + index,
        body: LogBody::Issuance(IssuanceEntry {
            serial: index.to_be_bytes().to_vec(),
            spiffe_id: format!(
                "spiffe://example.org/ns/ns{}/sa/app{}",
                index % 100,
                index % 997
            ),
            public_key_sha256: [index as u8; 32],
            not_before: 1_765_000_000,
            not_after: 1_765_086_400,
            issuer_key_id: vec![1; 20],
            attestation: "k8s_psat".into(),
        }),
    }
    .encode()
    .unwrap()
}

fn bench(c: &mut Criterion) {
    let entries: Vec<Vec<u8>> = (0..ENTRIES).map(entry).collect();
    let leaves: Vec<_> = entries.iter().map(|e| leaf_hash(e)).collect();
    let tree = MerkleTree::from_leaf_hashes(leaves.iter().copied());
    let root = tree.root();
    eprintln!(
        "log of {ENTRIES} entries: {} bytes per entry (canonical encoding, typical) + 32 bytes leaf hash",
        entries[ENTRIES as usize / 2].len()
    );

    let mut g = c.benchmark_group("log_1m");
    g.bench_function("inclusion_proof_and_verify", |b| {
        let mut i = 0u64;
        b.iter(|| {
            i = (i + 7_919) % ENTRIES;
            let proof = tree.inclusion_proof(i, ENTRIES).unwrap();
            verify_inclusion(i, ENTRIES, &leaves[i as usize], &proof, &root).unwrap();
            black_box(proof)
        })
    });
    g.bench_function("consistency_proof_and_verify", |b| {
        let mut first = 1u64;
        b.iter(|| {
            first = (first + 104_729) % ENTRIES + 1;
            let proof = tree.consistency_proof(first, ENTRIES).unwrap();
            let first_root = tree.root_at(first).unwrap();
            verify_consistency(first, ENTRIES, &first_root, &root, &proof).unwrap();
            black_box(proof)
        })
    });
    g.sample_size(10);
    g.bench_function("build_tree_from_leaf_hashes", |b| {
        b.iter(|| black_box(MerkleTree::from_leaf_hashes(leaves.iter().copied()).root()))
    });
    g.bench_function("audit_whole_log", |b| {
        let (pair, key) = signing_key();
        let head = trellis_transparency::TreeHead {
            tree_size: ENTRIES,
            root_hash: root,
            timestamp_ms: 1,
        };
        let sth = sign(&pair, &key, head);
        b.iter(|| {
            let stored = entries.iter().enumerate().map(|(i, e)| StoredEntry {
                index: i as u64,
                bytes: e.clone(),
                leaf_hash: Some(leaves[i]),
            });
            black_box(audit_log(stored, std::slice::from_ref(&sth), &key).unwrap())
        })
    });
    g.finish();
}

fn signing_key() -> (
    aws_lc_rs::signature::EcdsaKeyPair,
    trellis_transparency::LogPublicKey,
) {
    use aws_lc_rs::encoding::AsDer;
    use aws_lc_rs::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_ASN1_SIGNING};
    let pair = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_ASN1_SIGNING).unwrap();
    let spki = pair.public_key().as_der().unwrap();
    let key = trellis_transparency::LogPublicKey::from_spki_der(spki.as_ref()).unwrap();
    (pair, key)
}

fn sign(
    pair: &aws_lc_rs::signature::EcdsaKeyPair,
    key: &trellis_transparency::LogPublicKey,
    head: trellis_transparency::TreeHead,
) -> trellis_transparency::SignedTreeHead {
    let sig = pair
        .sign(&aws_lc_rs::rand::SystemRandom::new(), &head.signing_input())
        .unwrap();
    trellis_transparency::SignedTreeHead {
        head,
        key_id: key.key_id().to_string(),
        signature: sig.as_ref().to_vec(),
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
