//! Proof verification exactly as RFC 9162 sections 2.1.3.2 and 2.1.4.2 describe it: what a
//! sidecar, the CLI or any third party runs with nothing but a signed head and a proof.

use crate::hash::{node_hash, Hash};

/// Why a proof did not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProofError {
    /// The leaf index is not below the tree size.
    #[error("entry {index} cannot be in a tree of {size} entries")]
    IndexOutOfRange {
        /// The leaf index.
        index: u64,
        /// The tree size.
        size: u64,
    },
    /// The second tree is smaller than the first.
    #[error("a log cannot shrink: size {first} is followed by {second}")]
    Shrunk {
        /// The older size.
        first: u64,
        /// The newer size.
        second: u64,
    },
    /// The proof has too many or too few hashes for the sizes.
    #[error("the proof has the wrong number of hashes for these sizes")]
    WrongLength,
    /// Two heads of the same size with different roots: a fork.
    #[error("two different roots for the same size {size}: the log forked")]
    Fork {
        /// The size both heads claim.
        size: u64,
    },
    /// The proof's hashes do not lead to the expected root(s).
    #[error("the proof does not lead to the signed root")]
    RootMismatch,
}

/// Checks that `leaf` is entry `index` of the tree of `size` entries with root `root`.
pub fn verify_inclusion(
    index: u64,
    size: u64,
    leaf: &Hash,
    proof: &[Hash],
    root: &Hash,
) -> Result<(), ProofError> {
    if index >= size {
        return Err(ProofError::IndexOutOfRange { index, size });
    }
    let (mut fn_, mut sn) = (index, size - 1);
    let mut r = *leaf;
    for p in proof {
        if sn == 0 {
            return Err(ProofError::WrongLength);
        }
        if fn_ & 1 == 1 || fn_ == sn {
            r = node_hash(p, &r);
            if fn_ & 1 == 0 {
                while fn_ & 1 == 0 && fn_ != 0 {
                    fn_ >>= 1;
                    sn >>= 1;
                }
            }
        } else {
            r = node_hash(&r, p);
        }
        fn_ >>= 1;
        sn >>= 1;
    }
    if sn != 0 {
        return Err(ProofError::WrongLength);
    }
    if &r != root {
        return Err(ProofError::RootMismatch);
    }
    Ok(())
}

/// Checks that the tree of `second` entries (root `second_root`) extends the tree of
/// `first` entries (root `first_root`) without changing any of its entries.
pub fn verify_consistency(
    first: u64,
    second: u64,
    first_root: &Hash,
    second_root: &Hash,
    proof: &[Hash],
) -> Result<(), ProofError> {
    if first > second {
        return Err(ProofError::Shrunk { first, second });
    }
    if first == second {
        if !proof.is_empty() {
            return Err(ProofError::WrongLength);
        }
        return if first_root == second_root {
            Ok(())
        } else {
            Err(ProofError::Fork { size: first })
        };
    }
    if first == 0 {
        // Every tree extends the empty one.
        return if proof.is_empty() {
            Ok(())
        } else {
            Err(ProofError::WrongLength)
        };
    }
    if proof.is_empty() {
        return Err(ProofError::WrongLength);
    }
    // A first tree that is a complete subtree is its own first node in the path.
    let mut path = proof.iter();
    let start = if first.is_power_of_two() {
        *first_root
    } else {
        match path.next() {
            Some(h) => *h,
            None => return Err(ProofError::WrongLength),
        }
    };
    let (mut fn_, mut sn) = (first - 1, second - 1);
    while fn_ & 1 == 1 {
        fn_ >>= 1;
        sn >>= 1;
    }
    let (mut fr, mut sr) = (start, start);
    for c in path {
        if sn == 0 {
            return Err(ProofError::WrongLength);
        }
        if fn_ & 1 == 1 || fn_ == sn {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            if fn_ & 1 == 0 {
                while fn_ & 1 == 0 && fn_ != 0 {
                    fn_ >>= 1;
                    sn >>= 1;
                }
            }
        } else {
            sr = node_hash(&sr, c);
        }
        fn_ >>= 1;
        sn >>= 1;
    }
    if sn != 0 {
        return Err(ProofError::WrongLength);
    }
    if &fr != first_root || &sr != second_root {
        return Err(ProofError::RootMismatch);
    }
    Ok(())
}
