use super::*;
use crate::hash::leaf_hash;
use crate::proof::{verify_consistency, verify_inclusion, ProofError};

/// The leaves of the Certificate Transparency project's reference tests (RFC 6962 trees).
const LEAVES: [&str; 8] = [
    "",
    "00",
    "10",
    "2021",
    "3031",
    "40414243",
    "5051525354555657",
    "606162636465666768696a6b6c6d6e6f",
];

/// Their published roots for sizes 1..=8.
const ROOTS: [&str; 8] = [
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
];

fn reference_tree() -> MerkleTree {
    MerkleTree::from_leaf_hashes(LEAVES.iter().map(|l| leaf_hash(&hex::decode(l).unwrap())))
}

fn hexes(hashes: &[Hash]) -> Vec<String> {
    hashes.iter().map(hex::encode).collect()
}

fn unhex(h: &str) -> Hash {
    hex::decode(h).unwrap().try_into().unwrap()
}

/// MTH straight from RFC 9162 section 2.1.1, recomputing everything: the yardstick.
fn naive_root(leaves: &[Hash]) -> Hash {
    match leaves.len() {
        0 => empty_root(),
        1 => leaves[0],
        n => {
            let k = 1 << (usize::BITS - 1 - (n - 1).leading_zeros());
            node_hash(&naive_root(&leaves[..k]), &naive_root(&leaves[k..]))
        }
    }
}

#[test]
fn roots_match_the_published_reference_trees() {
    let tree = reference_tree();
    assert_eq!(
        hex::encode(MerkleTree::new().root()),
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    );
    for (size, want) in (1..=8).zip(ROOTS) {
        assert_eq!(
            hex::encode(tree.root_at(size).unwrap()),
            want,
            "size {size}"
        );
    }
}

#[test]
fn proofs_match_the_published_reference_proofs() {
    let tree = reference_tree();
    assert_eq!(
        hexes(&tree.inclusion_proof(0, 8).unwrap()),
        [
            "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
        ]
    );
    assert_eq!(
        hexes(&tree.inclusion_proof(5, 8).unwrap()),
        [
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        ]
    );
    assert_eq!(
        hexes(&tree.consistency_proof(1, 8).unwrap()),
        [
            "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
        ]
    );
    assert_eq!(
        hexes(&tree.consistency_proof(6, 8).unwrap()),
        [
            "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        ]
    );
    assert_eq!(
        hexes(&tree.consistency_proof(2, 5).unwrap()),
        [
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        ]
    );
    let root8 = unhex(ROOTS[7]);
    verify_consistency(
        6,
        8,
        &unhex(ROOTS[5]),
        &root8,
        &tree.consistency_proof(6, 8).unwrap(),
    )
    .unwrap();
}

#[test]
fn every_proof_of_every_small_tree_verifies_and_matches_the_naive_root() {
    let leaves: Vec<Hash> = (0u32..40).map(|i| leaf_hash(&i.to_be_bytes())).collect();
    let tree = MerkleTree::from_leaf_hashes(leaves.iter().copied());
    for n in 1..=leaves.len() as u64 {
        let root = tree.root_at(n).unwrap();
        assert_eq!(root, naive_root(&leaves[..n as usize]), "size {n}");
        for m in 0..n {
            let proof = tree.inclusion_proof(m, n).unwrap();
            verify_inclusion(m, n, &leaves[m as usize], &proof, &root).unwrap();
            // Another leaf, another index or a bent path must not pass.
            let other = leaves[((m + 1) % n) as usize];
            if n > 1 {
                assert!(verify_inclusion(m, n, &other, &proof, &root).is_err());
                assert!(
                    verify_inclusion((m + 1) % n, n, &leaves[m as usize], &proof, &root).is_err()
                );
            }
        }
        for m in 0..=n {
            let proof = tree.consistency_proof(m, n).unwrap();
            let first = tree.root_at(m).unwrap();
            verify_consistency(m, n, &first, &root, &proof).unwrap();
            if 0 < m && m < n {
                let mut bent = proof.clone();
                bent[0][0] ^= 1;
                assert!(
                    verify_consistency(m, n, &first, &root, &bent).is_err(),
                    "{m}->{n}"
                );
                let other_first = tree.root_at(m - 1).unwrap();
                assert!(verify_consistency(m, n, &other_first, &root, &proof).is_err());
                assert!(verify_consistency(m, n, &first, &root, &proof[1..]).is_err());
            }
        }
    }
}

#[test]
fn impossible_requests_and_proofs_are_refused() {
    let tree = reference_tree();
    assert_eq!(
        tree.root_at(9),
        Err(TreeError::SizeOutOfRange {
            size: 8,
            requested: 9
        })
    );
    assert_eq!(
        tree.inclusion_proof(8, 8),
        Err(TreeError::IndexOutOfRange { index: 8, size: 8 })
    );
    assert_eq!(
        tree.consistency_proof(5, 3),
        Err(TreeError::SizesReversed {
            first: 5,
            second: 3
        })
    );
    let root = tree.root();
    assert_eq!(
        verify_inclusion(8, 8, &root, &[], &root),
        Err(ProofError::IndexOutOfRange { index: 8, size: 8 })
    );
    assert_eq!(
        verify_consistency(8, 8, &root, &tree.root_at(7).unwrap(), &[]),
        Err(ProofError::Fork { size: 8 })
    );
    assert_eq!(
        verify_consistency(8, 7, &root, &root, &[]),
        Err(ProofError::Shrunk {
            first: 8,
            second: 7
        })
    );
}

#[test]
fn a_large_log_keeps_about_two_hashes_per_entry() {
    // Not timed (timed tests flake on shared machines): proves proofs come from stored
    // levels, not recomputation, by checking how many nodes the tree keeps.
    let tree = MerkleTree::from_leaf_hashes((0u32..1 << 16).map(|i| leaf_hash(&i.to_be_bytes())));
    let nodes: usize = tree.levels.iter().map(Vec::len).sum();
    assert_eq!(nodes, (1 << 17) - 1);
    let proof = tree.inclusion_proof(12_345, tree.size()).unwrap();
    assert_eq!(proof.len(), 16);
}
