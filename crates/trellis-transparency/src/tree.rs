//! An in-memory Merkle tree over leaf hashes that answers roots of every past size and
//! RFC 9162 inclusion and consistency proofs in O(log² n) hashes.
//!
//! Why every level is kept: a proof for a log of a million entries must take well under a
//! millisecond, and the RFC's recursive definitions (section 2.1) split a range at the
//! largest power of two below its size, so every subrange they visit is either a complete,
//! aligned subtree (one lookup here) or the ragged right edge (at most log n of those).
//! Keeping all levels costs about two hashes (64 bytes) per entry: right for a check that
//! ends (`trellis log verify`), not for a control plane that logs every SVID for months, which
//! keeps a [`crate::PagedMerkleTree`] (same answers; old pages read back from storage).

use crate::hash::{empty_root, node_hash, Hash};

/// Why a root or proof was not produced.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TreeError {
    /// The request named a tree size larger than the log.
    #[error("the log has {size} entries; size {requested} does not exist yet")]
    SizeOutOfRange {
        /// Entries in the log.
        size: u64,
        /// The size asked for.
        requested: u64,
    },
    /// The leaf index is not below the tree size of the proof.
    #[error("entry {index} is not in a tree of {size} entries")]
    IndexOutOfRange {
        /// The leaf asked for.
        index: u64,
        /// The tree size of the proof.
        size: u64,
    },
    /// A consistency proof needs first ≤ second.
    #[error("consistency needs first ≤ second (got {first} > {second})")]
    SizesReversed {
        /// The older size.
        first: u64,
        /// The newer size.
        second: u64,
    },
}

/// The log's Merkle tree: leaf hashes and every complete interior node above them.
#[derive(Debug, Clone, Default)]
pub struct MerkleTree {
    /// `levels[k][i]` is the root of the complete subtree over leaves `[i·2^k, (i+1)·2^k)`.
    levels: Vec<Vec<Hash>>,
}

impl MerkleTree {
    /// An empty tree.
    pub fn new() -> Self {
        Self::default()
    }

    /// A tree over leaf hashes in log order.
    pub fn from_leaf_hashes(leaves: impl IntoIterator<Item = Hash>) -> Self {
        let mut tree = Self::new();
        for leaf in leaves {
            tree.push(leaf);
        }
        tree
    }

    /// Appends a leaf hash; returns its index.
    pub fn push(&mut self, leaf: Hash) -> u64 {
        if self.levels.is_empty() {
            self.levels.push(Vec::new());
        }
        self.levels[0].push(leaf);
        let index = self.levels[0].len() - 1;
        // Complete every subtree this leaf closes: one per trailing 1-bit of its index.
        let mut level = 0;
        let mut at = index;
        while at % 2 == 1 {
            let parent = node_hash(&self.levels[level][at - 1], &self.levels[level][at]);
            if self.levels.len() == level + 1 {
                self.levels.push(Vec::new());
            }
            self.levels[level + 1].push(parent);
            level += 1;
            at /= 2;
        }
        index as u64
    }

    /// Number of entries.
    pub fn size(&self) -> u64 {
        self.levels.first().map_or(0, |l| l.len() as u64)
    }

    /// The leaf hash at `index`, if the log has it.
    pub fn leaf(&self, index: u64) -> Option<Hash> {
        self.levels
            .first()?
            .get(usize::try_from(index).ok()?)
            .copied()
    }

    /// The root of the whole tree.
    pub fn root(&self) -> Hash {
        subtree(&mut &*self, 0, self.size())
    }

    /// The root the tree had when it held `size` entries.
    pub fn root_at(&self, size: u64) -> Result<Hash, TreeError> {
        check_size(self.size(), size)?;
        Ok(subtree(&mut &*self, 0, size))
    }

    /// The RFC 9162 inclusion proof (audit path) of leaf `index` in the tree of `size`
    /// entries, leaf side first.
    pub fn inclusion_proof(&self, index: u64, size: u64) -> Result<Vec<Hash>, TreeError> {
        check_inclusion(self.size(), index, size)?;
        Ok(inclusion(&mut &*self, index, size))
    }

    /// The RFC 9162 consistency proof between the trees of `first` and `second` entries.
    /// Empty when `first` is 0 or equal to `second` (nothing to prove).
    pub fn consistency_proof(&self, first: u64, second: u64) -> Result<Vec<Hash>, TreeError> {
        check_consistency(self.size(), first, second)?;
        Ok(consistency(&mut &*self, first, second))
    }

    /// The root of the complete, aligned subtree `index` of `level` (it must exist).
    pub(crate) fn node(&self, level: u32, index: u64) -> Hash {
        self.levels[level as usize][index as usize]
    }
}

/// Where the RFC's recursions find the root of a complete, aligned subtree: the whole tree's
/// levels, or a paged tree's (see [`crate::PagedMerkleTree`]).
pub(crate) trait Nodes {
    /// The root of the complete subtree over leaves `[index·2^level, (index+1)·2^level)`.
    fn node(&mut self, level: u32, index: u64) -> Hash;
}

impl Nodes for &MerkleTree {
    fn node(&mut self, level: u32, index: u64) -> Hash {
        MerkleTree::node(self, level, index)
    }
}

/// Refuses a tree size beyond the `have` entries a tree holds.
pub(crate) fn check_size(have: u64, requested: u64) -> Result<(), TreeError> {
    if requested > have {
        return Err(TreeError::SizeOutOfRange {
            size: have,
            requested,
        });
    }
    Ok(())
}

/// Refuses an inclusion proof that a tree of `have` entries cannot give.
pub(crate) fn check_inclusion(have: u64, index: u64, size: u64) -> Result<(), TreeError> {
    check_size(have, size)?;
    if index >= size {
        return Err(TreeError::IndexOutOfRange { index, size });
    }
    Ok(())
}

/// Refuses a consistency proof that a tree of `have` entries cannot give.
pub(crate) fn check_consistency(have: u64, first: u64, second: u64) -> Result<(), TreeError> {
    check_size(have, second)?;
    if first > second {
        return Err(TreeError::SizesReversed { first, second });
    }
    Ok(())
}

/// MTH(D[start : start+n]) (RFC 9162 section 2.1.1).
pub(crate) fn subtree(nodes: &mut impl Nodes, start: u64, n: u64) -> Hash {
    if n == 0 {
        return empty_root();
    }
    if n.is_power_of_two() && start.is_multiple_of(n) {
        let level = n.trailing_zeros();
        return nodes.node(level, start >> level);
    }
    let k = largest_power_of_two_below(n);
    node_hash(&subtree(nodes, start, k), &subtree(nodes, start + k, n - k))
}

/// PATH(m, D[start : start+n]) (RFC 9162 section 2.1.3.1), appended to `out`.
fn path(nodes: &mut impl Nodes, m: u64, start: u64, n: u64, out: &mut Vec<Hash>) {
    if n <= 1 {
        return;
    }
    let k = largest_power_of_two_below(n);
    if m < k {
        path(nodes, m, start, k, out);
        out.push(subtree(nodes, start + k, n - k));
    } else {
        path(nodes, m - k, start + k, n - k, out);
        out.push(subtree(nodes, start, k));
    }
}

/// SUBPROOF(m, D[start : start+n], b) (RFC 9162 section 2.1.4.1), appended to `out`.
fn subproof(
    nodes: &mut impl Nodes,
    m: u64,
    start: u64,
    n: u64,
    complete: bool,
    out: &mut Vec<Hash>,
) {
    if m == n {
        if !complete {
            out.push(subtree(nodes, start, n));
        }
        return;
    }
    let k = largest_power_of_two_below(n);
    if m <= k {
        subproof(nodes, m, start, k, complete, out);
        out.push(subtree(nodes, start + k, n - k));
    } else {
        subproof(nodes, m - k, start + k, n - k, false, out);
        out.push(subtree(nodes, start, k));
    }
}

/// The RFC 9162 inclusion proof of leaf `index` in the tree of `size` entries (checked by
/// the caller with [`check_inclusion`]), leaf side first.
pub(crate) fn inclusion(nodes: &mut impl Nodes, index: u64, size: u64) -> Vec<Hash> {
    let mut proof = Vec::with_capacity(64 - size.leading_zeros() as usize);
    path(nodes, index, 0, size, &mut proof);
    proof
}

/// The RFC 9162 consistency proof between `first` ≤ `second` (checked by the caller with
/// [`check_consistency`]).
pub(crate) fn consistency(nodes: &mut impl Nodes, first: u64, second: u64) -> Vec<Hash> {
    let mut proof = Vec::new();
    if first > 0 && first < second {
        subproof(nodes, first, 0, second, true, &mut proof);
    }
    proof
}

/// The largest power of two strictly below `n` (n ≥ 2).
fn largest_power_of_two_below(n: u64) -> u64 {
    1 << (63 - (n - 1).leading_zeros())
}

#[cfg(test)]
mod tests;
