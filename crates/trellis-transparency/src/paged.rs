//! A Merkle tree whose memory does not grow with the log: the levels above pages of leaves,
//! the newest pages whole, and older pages' leaf hashes read back from storage when a proof
//! needs them.
//!
//! Why: [`MerkleTree`] keeps every level, ~64 bytes per entry for as long as the process runs,
//! and a control plane logs every SVID it issues (10,000 workloads rotating every half hour
//! are ~480,000 entries, ~30 MiB, a day). Here a page of 2^k leaves costs one hash once it is
//! older than the pages kept whole. Proofs about recent entries (an SDS stream's proof of the
//! SVID it was just sent, a witness's consistency proof from the last head it saw) touch only
//! the newest pages and the levels above pages, both in memory. A proof about an older entry
//! or size reads at most a few pages: the RFC's recursions descend below page level only
//! along the paths to the proven leaf and to the two tree sizes.

use std::collections::{BTreeSet, HashMap, VecDeque};

use crate::hash::Hash;
use crate::tree::{
    check_consistency, check_inclusion, check_size, consistency, inclusion, subtree, MerkleTree,
    Nodes, TreeError,
};

/// Why a paged tree could not produce a root or proof.
#[derive(Debug, thiserror::Error)]
pub enum PagedTreeError<E: std::error::Error + 'static> {
    /// The request itself is out of range.
    #[error(transparent)]
    Tree(#[from] TreeError),
    /// Storage could not give back a page's leaf hashes.
    #[error("cannot read the leaf hashes of entries {from}..{to}: {source}")]
    Load {
        /// First entry of the page.
        from: u64,
        /// One past its last entry.
        to: u64,
        /// Storage's error.
        #[source]
        source: E,
    },
    /// Storage's leaf hashes for a page are not the ones the tree was built from.
    #[error(
        "the stored leaf hashes of entries {from}..{to} do not produce the page root this \
         process computed from them earlier: storage changed under the log"
    )]
    Mismatch {
        /// First entry of the page.
        from: u64,
        /// One past its last entry.
        to: u64,
    },
}

/// A Merkle tree over leaf hashes in log order that keeps the levels above pages of
/// `2^page_bits` leaves and the newest `keep_pages` pages whole; see the module docs.
#[derive(Debug, Clone)]
pub struct PagedMerkleTree {
    page_bits: u32,
    keep_pages: usize,
    /// One leaf per complete page, its root: the whole tree's levels from `page_bits` up.
    pages: MerkleTree,
    /// Every level of the newest pages, oldest first; the last may be the open page.
    recent: VecDeque<MerkleTree>,
    /// The page number of `recent[0]`.
    first_recent: u64,
}

impl PagedMerkleTree {
    /// An empty tree with pages of `2^page_bits` leaves (1..=20), keeping the newest
    /// `keep_pages` pages (at least 1, the open one) whole.
    pub fn new(page_bits: u32, keep_pages: usize) -> Self {
        Self {
            page_bits: page_bits.clamp(1, 20),
            keep_pages: keep_pages.max(1),
            pages: MerkleTree::new(),
            recent: VecDeque::new(),
            first_recent: 0,
        }
    }

    fn page_len(&self) -> u64 {
        1 << self.page_bits
    }

    /// Number of entries: every complete page's, and the open page's (a page is complete
    /// once it holds `page_len` entries, so its count modulo that is the open part).
    pub fn size(&self) -> u64 {
        let page_len = self.page_len();
        let open = self.recent.back().map_or(0, |page| page.size() % page_len);
        self.pages.size() * page_len + open
    }

    /// Appends a leaf hash; returns its index.
    pub fn push(&mut self, leaf: Hash) -> u64 {
        let page_len = self.page_len();
        let index = self.size();
        // The open page, or a new one when the last is complete (or there is none yet).
        let mut open = match self.recent.back() {
            Some(page) if page.size() < page_len => self.recent.pop_back().unwrap_or_default(),
            _ => MerkleTree::new(),
        };
        open.push(leaf);
        let completed = (open.size() == page_len).then(|| open.root());
        self.recent.push_back(open);
        if let Some(root) = completed {
            self.pages.push(root);
            while self.recent.len() > self.keep_pages {
                self.recent.pop_front();
                self.first_recent += 1;
            }
        }
        index
    }

    /// The root the tree had when it held `size` entries; `load(from, to)` gives back the
    /// leaf hashes of entries `from..to` (one page) when the root needs an old page.
    pub fn root_at<E: std::error::Error + 'static>(
        &self,
        size: u64,
        load: impl FnMut(u64, u64) -> Result<Vec<Hash>, E>,
    ) -> Result<Hash, PagedTreeError<E>> {
        check_size(self.size(), size)?;
        self.with_pages(load, |nodes| subtree(nodes, 0, size))
    }

    /// The RFC 9162 inclusion proof of leaf `index` in the tree of `size` entries; `load` as
    /// for [`PagedMerkleTree::root_at`].
    pub fn inclusion_proof<E: std::error::Error + 'static>(
        &self,
        index: u64,
        size: u64,
        load: impl FnMut(u64, u64) -> Result<Vec<Hash>, E>,
    ) -> Result<Vec<Hash>, PagedTreeError<E>> {
        check_inclusion(self.size(), index, size)?;
        self.with_pages(load, |nodes| inclusion(nodes, index, size))
    }

    /// The RFC 9162 consistency proof between the trees of `first` and `second` entries;
    /// `load` as for [`PagedMerkleTree::root_at`].
    pub fn consistency_proof<E: std::error::Error + 'static>(
        &self,
        first: u64,
        second: u64,
        load: impl FnMut(u64, u64) -> Result<Vec<Hash>, E>,
    ) -> Result<Vec<Hash>, PagedTreeError<E>> {
        check_consistency(self.size(), first, second)?;
        self.with_pages(load, |nodes| consistency(nodes, first, second))
    }

    /// Runs `f` over the tree's nodes. Which nodes the RFC's recursions visit depends only on
    /// the sizes and indexes, never on hash values, so a first run finds every old page they
    /// need; those are loaded, checked against their roots, and `f` runs again.
    fn with_pages<T, E: std::error::Error + 'static>(
        &self,
        mut load: impl FnMut(u64, u64) -> Result<Vec<Hash>, E>,
        f: impl Fn(&mut PagedNodes<'_>) -> T,
    ) -> Result<T, PagedTreeError<E>> {
        let mut nodes = PagedNodes {
            tree: self,
            loaded: HashMap::new(),
            missing: BTreeSet::new(),
        };
        let first = f(&mut nodes);
        if nodes.missing.is_empty() {
            return Ok(first);
        }
        let page_len = self.page_len();
        for page in std::mem::take(&mut nodes.missing) {
            let (from, to) = (page * page_len, (page + 1) * page_len);
            let leaves =
                load(from, to).map_err(|source| PagedTreeError::Load { from, to, source })?;
            let tree = MerkleTree::from_leaf_hashes(leaves);
            // Only complete pages are ever dropped, and `pages` holds each one's root.
            if tree.size() != page_len || Some(tree.root()) != self.pages.leaf(page) {
                return Err(PagedTreeError::Mismatch { from, to });
            }
            nodes.loaded.insert(page, tree);
        }
        Ok(f(&mut nodes))
    }
}

/// The nodes of one root or proof: the tree's, and the old pages loaded for it.
struct PagedNodes<'a> {
    tree: &'a PagedMerkleTree,
    loaded: HashMap<u64, MerkleTree>,
    /// Old pages asked for and not loaded: the caller loads them and asks again.
    missing: BTreeSet<u64>,
}

impl Nodes for PagedNodes<'_> {
    fn node(&mut self, level: u32, index: u64) -> Hash {
        let bits = self.tree.page_bits;
        if level >= bits {
            return self.tree.pages.node(level - bits, index);
        }
        let page = index >> (bits - level);
        let within = index - (page << (bits - level));
        if let Some(recent) = page
            .checked_sub(self.tree.first_recent)
            .and_then(|i| self.tree.recent.get(i as usize))
        {
            return recent.node(level, within);
        }
        match self.loaded.get(&page) {
            Some(old) => old.node(level, within),
            None => {
                self.missing.insert(page);
                // A stand-in: this run's result is thrown away once the page is loaded.
                [0; 32]
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::hash::leaf_hash;

    /// Storage that fails, for the paths that must not read it.
    #[derive(Debug, thiserror::Error)]
    #[error("storage is away")]
    struct Away;

    fn leaves(n: u64) -> Vec<Hash> {
        (0..n).map(|i| leaf_hash(&i.to_be_bytes())).collect()
    }

    /// Every root and proof a paged tree gives equals the whole tree's, at every size, with
    /// pages of 4 leaves of which 2 are kept whole; and it reads only the pages it must.
    #[test]
    fn roots_and_proofs_match_the_whole_tree() {
        let all = leaves(70);
        let mut whole = MerkleTree::new();
        let mut paged = PagedMerkleTree::new(2, 2);
        for (i, leaf) in all.iter().enumerate() {
            assert_eq!(paged.push(*leaf), whole.push(*leaf));
            let size = i as u64 + 1;
            assert_eq!(paged.size(), size);
            let mut reads = 0;
            let mut load = |from: u64, to: u64| {
                reads += 1;
                Ok::<_, Away>(all[from as usize..to as usize].to_vec())
            };
            for old in 0..=size {
                assert_eq!(
                    paged.root_at(old, &mut load).unwrap(),
                    whole.root_at(old).unwrap()
                );
                for index in 0..old {
                    assert_eq!(
                        paged.inclusion_proof(index, old, &mut load).unwrap(),
                        whole.inclusion_proof(index, old).unwrap(),
                        "inclusion of {index} in {old}"
                    );
                }
                assert_eq!(
                    paged.consistency_proof(old, size, &mut load).unwrap(),
                    whole.consistency_proof(old, size).unwrap(),
                    "consistency {old}..{size}"
                );
            }
            // The latest root never needs storage.
            assert_eq!(paged.root_at(size, |_, _| Err(Away)).unwrap(), whole.root());
            // Memory: the page roots, the pages kept whole and the open one.
            assert!(paged.recent.len() <= 3);
            assert_eq!(paged.pages.size(), size / 4);
            if size > 12 {
                assert!(reads > 0, "proofs about old entries read their pages");
            }
        }
    }

    #[test]
    fn recent_proofs_read_nothing_and_old_ones_read_a_few_pages() {
        let all = leaves(10_000);
        let mut paged = PagedMerkleTree::new(8, 4);
        for leaf in &all {
            paged.push(*leaf);
        }
        let whole = MerkleTree::from_leaf_hashes(all.iter().copied());
        let away = |_: u64, _: u64| Err::<Vec<Hash>, _>(Away);
        // An entry in the newest pages, against the latest size: memory only.
        assert_eq!(
            paged.inclusion_proof(9_500, 10_000, away).unwrap(),
            whole.inclusion_proof(9_500, 10_000).unwrap()
        );
        assert_eq!(
            paged.consistency_proof(9_000, 10_000, away).unwrap(),
            whole.consistency_proof(9_000, 10_000).unwrap()
        );
        // An old entry: its page only (the latest size's edge is in memory).
        let mut pages = Vec::new();
        let proof = paged
            .inclusion_proof(1_000, 10_000, |from, to| {
                pages.push((from, to));
                Ok::<_, Away>(all[from as usize..to as usize].to_vec())
            })
            .unwrap();
        assert_eq!(proof, whole.inclusion_proof(1_000, 10_000).unwrap());
        assert_eq!(pages, [(768, 1024)]);
        // Storage away for an old page: an error that says which entries, not a wrong proof.
        let err = paged.inclusion_proof(1_000, 10_000, away).unwrap_err();
        assert!(
            matches!(
                err,
                PagedTreeError::Load {
                    from: 768,
                    to: 1024,
                    ..
                }
            ),
            "{err}"
        );
        assert!(paged.recent.len() <= 5);
    }

    #[test]
    fn stored_leaves_that_changed_are_refused() {
        let mut all = leaves(64);
        let mut paged = PagedMerkleTree::new(2, 1);
        for leaf in &all {
            paged.push(*leaf);
        }
        all[5] = leaf_hash(b"tampered");
        let err = paged
            .inclusion_proof(5, 64, |from, to| {
                Ok::<_, Away>(all[from as usize..to as usize].to_vec())
            })
            .unwrap_err();
        assert!(
            matches!(err, PagedTreeError::Mismatch { from: 4, to: 8 }),
            "{err}"
        );
        // Short pages are refused the same way.
        let err = paged
            .root_at(6, |from, _| Ok::<_, Away>(vec![all[from as usize]]))
            .unwrap_err();
        assert!(matches!(err, PagedTreeError::Mismatch { .. }), "{err}");
    }

    #[test]
    fn out_of_range_requests_are_tree_errors() {
        let mut paged = PagedMerkleTree::new(2, 1);
        paged.push(leaf_hash(b"a"));
        let away = |_: u64, _: u64| Err::<Vec<Hash>, _>(Away);
        assert!(matches!(
            paged.root_at(2, away),
            Err(PagedTreeError::Tree(TreeError::SizeOutOfRange { .. }))
        ));
        assert!(matches!(
            paged.inclusion_proof(1, 1, away),
            Err(PagedTreeError::Tree(TreeError::IndexOutOfRange { .. }))
        ));
        assert!(matches!(
            paged.consistency_proof(2, 1, away),
            Err(PagedTreeError::Tree(_))
        ));
    }
}
