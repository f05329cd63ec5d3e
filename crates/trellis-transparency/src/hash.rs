//! RFC 9162 section 2.1.1 hashing: domain-separated leaves and interior nodes.

use sha2::{Digest, Sha256};

/// A SHA-256 value: a leaf hash, an interior node or a tree root.
pub type Hash = [u8; 32];

/// The hash of a leaf: SHA-256(0x00 ‖ entry). The prefix keeps a leaf from ever being
/// mistaken for an interior node (second-preimage resistance of the tree).
pub fn leaf_hash(entry: &[u8]) -> Hash {
    let mut h = Sha256::new();
    h.update([0x00]);
    h.update(entry);
    h.finalize().into()
}

/// The hash of an interior node: SHA-256(0x01 ‖ left ‖ right).
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update([0x01]);
    h.update(left);
    h.update(right);
    h.finalize().into()
}

/// The root of the empty tree: SHA-256 of nothing.
pub fn empty_root() -> Hash {
    Sha256::digest([]).into()
}
