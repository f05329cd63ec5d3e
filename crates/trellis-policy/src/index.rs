//! The compiled matcher: rules indexed by principal, then by path segment.
//!
//! A request visits only the buckets its caller's SPIFFE ID can land in:
//!
//! - `exact[caller]`: rules naming the caller exactly;
//! - `one_more[parent(caller)]`: rules with `parent/*`;
//! - `any_more[ancestor]` for each proper ancestor of the caller (trust domain included):
//!   rules with `ancestor/**`;
//! - `any`: rules with `*`.
//!
//! Each bucket holds a segment trie of its rules' path patterns (literal children in a
//! short list or, past a few, a hash map; one `*` child; and the targets that end at each
//! node with or without `**`). Walking it costs one lookup per path segment (two where a
//! `*` branch exists), so a decision is independent of how many rules name *other*
//! callers or paths. Ancestors of the caller are only looked up at lengths that some
//! `/**` key has. All keys are borrowed slices of the caller and the path: nothing is
//! allocated.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use crate::pattern::{PathPattern, Principal, Seg};

/// FxHash (rustc's hasher): much faster than SipHash on short keys. The tables are built
/// from the policy only (a request can choose what it looks up, never what is stored), so
/// a request cannot make a table degenerate.
#[derive(Default, Clone, Copy)]
pub(crate) struct FxHasher {
    hash: u64,
}

const FX_SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;

impl FxHasher {
    #[inline]
    fn add(&mut self, word: u64) {
        self.hash = (self.hash.rotate_left(5) ^ word).wrapping_mul(FX_SEED);
    }
}

impl Hasher for FxHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            self.add(u64::from_le_bytes(w));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut w = [0u8; 8];
            w[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(w));
        }
    }

    #[inline]
    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }

    #[inline]
    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }

    #[inline]
    fn finish(&self) -> u64 {
        self.hash
    }
}

pub(crate) type FxHashMap<K, V> = HashMap<K, V, BuildHasherDefault<FxHasher>>;

/// What a matching rule contributes: its id (file order), action and mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Class {
    pub deny: bool,
    pub audit: bool,
}

/// A (rule, `to` entry, path pattern) triple placed in a path trie.
#[derive(Debug)]
pub(crate) struct Target {
    pub rule: u32,
    pub class: Class,
    /// `None`: any method.
    pub methods: Option<Box<[Box<str>]>>,
}

impl Target {
    #[inline]
    fn method_ok(&self, method: &str) -> bool {
        match &self.methods {
            None => true,
            // Methods match ASCII case-insensitively: some servers upper-case the method
            // before routing, so `delete` must not slip past a rule about `DELETE`.
            Some(ms) => ms.iter().any(|m| m.eq_ignore_ascii_case(method)),
        }
    }
}

/// A rule's L4 (plain TCP) scope in a bucket.
#[derive(Debug)]
pub(crate) struct L4Target {
    pub rule: u32,
    pub class: Class,
    /// `None`: any port.
    pub ports: Option<Box<[u16]>>,
}

/// Above this many literal children a node switches from a list to a hash map.
const FEW_CHILDREN: usize = 8;

/// A node's literal children: scanning a few short strings beats hashing the segment.
#[derive(Debug)]
enum Children {
    Few(Vec<(Box<str>, PathNode)>),
    Many(FxHashMap<Box<str>, PathNode>),
}

impl Default for Children {
    fn default() -> Self {
        Children::Few(Vec::new())
    }
}

impl Children {
    #[inline]
    fn get(&self, seg: &str) -> Option<&PathNode> {
        match self {
            Children::Few(list) => list.iter().find(|(k, _)| **k == *seg).map(|(_, n)| n),
            Children::Many(map) => map.get(seg),
        }
    }

    fn get_or_insert(&mut self, seg: &str) -> &mut PathNode {
        if let Children::Few(list) = self {
            if list.len() >= FEW_CHILDREN && !list.iter().any(|(k, _)| **k == *seg) {
                *self = Children::Many(std::mem::take(list).into_iter().collect());
            }
        }
        match self {
            Children::Few(list) => {
                let i = match list.iter().position(|(k, _)| **k == *seg) {
                    Some(i) => i,
                    None => {
                        list.push((seg.into(), PathNode::default()));
                        list.len() - 1
                    }
                };
                &mut list[i].1
            }
            Children::Many(map) => map.entry(seg.into()).or_default(),
        }
    }
}

#[derive(Debug, Default)]
pub(crate) struct PathNode {
    children: Children,
    star: Option<Box<PathNode>>,
    /// Patterns that end here (no `**`): match when the path ends here.
    exact: Vec<Target>,
    /// Patterns `…/**` whose fixed part ends here: match here and anywhere below.
    globstar: Vec<Target>,
}

impl PathNode {
    fn insert(&mut self, pattern: &PathPattern, target: Target) {
        let mut node = self;
        for seg in &pattern.segs {
            node = match seg {
                Seg::Lit(l) => node.children.get_or_insert(l),
                Seg::Star => node.star.get_or_insert_with(Default::default),
            };
        }
        if pattern.globstar {
            node.globstar.push(target);
        } else {
            node.exact.push(target);
        }
    }

    /// Calls `f` on every target whose pattern matches the rest of the path (`None`: no
    /// segments left). Methods are the caller's business.
    fn walk(&self, rest: Option<&str>, f: &mut impl FnMut(&Target)) {
        self.globstar.iter().for_each(&mut *f);
        let Some(rest) = rest else {
            self.exact.iter().for_each(f);
            return;
        };
        let (seg, next) = match rest.split_once('/') {
            Some((seg, next)) => (seg, Some(next)),
            None => (rest, None),
        };
        if let Some(child) = self.children.get(seg) {
            child.walk(next, f);
        }
        if let Some(star) = &self.star {
            star.walk(next, f);
        }
    }
}

/// The rules whose principal lands on one index key.
#[derive(Debug, Default)]
pub(crate) struct Bucket {
    /// Rule ids, ascending, each once.
    pub rules: Vec<u32>,
    http: PathNode,
    l4: Vec<L4Target>,
}

impl Bucket {
    fn add_rule(&mut self, rule: u32) -> bool {
        if self.rules.last() == Some(&rule) {
            return false;
        }
        self.rules.push(rule);
        true
    }
}

/// The first matching rule (lowest id) of each kind, `NONE` when none matched.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Best {
    pub enforced_deny: u32,
    pub enforced_allow: u32,
    pub any_deny: u32,
    pub any_allow: u32,
}

impl Best {
    pub(crate) const NONE: u32 = u32::MAX;

    pub(crate) fn new() -> Best {
        Best {
            enforced_deny: Self::NONE,
            enforced_allow: Self::NONE,
            any_deny: Self::NONE,
            any_allow: Self::NONE,
        }
    }

    #[inline]
    pub(crate) fn offer(&mut self, rule: u32, class: Class) {
        let (enforced, any) = if class.deny {
            (&mut self.enforced_deny, &mut self.any_deny)
        } else {
            (&mut self.enforced_allow, &mut self.any_allow)
        };
        *any = (*any).min(rule);
        if !class.audit {
            *enforced = (*enforced).min(rule);
        }
    }
}

/// A rule's HTTP scope for the index: (methods, paths) per `to` entry; `None` methods
/// is any method, and paths is never empty (absent `paths` is `/**`).
pub(crate) type HttpEntries<'a> = Vec<(Option<&'a [Box<str>]>, Vec<&'a PathPattern>)>;

/// What the index needs to know about a rule.
pub(crate) struct IndexRule<'a> {
    pub from: &'a [Principal],
    pub class: Class,
    /// `None`: no HTTP scope.
    pub http: Option<HttpEntries<'a>>,
    /// `None`: no L4 scope. `Some(None)`: any port.
    pub l4: Option<Option<&'a [u16]>>,
}

#[derive(Debug, Default)]
pub(crate) struct Index {
    exact: FxHashMap<Box<str>, Bucket>,
    one_more: FxHashMap<Box<str>, Bucket>,
    any_more: FxHashMap<Box<str>, Bucket>,
    /// Bit `n` set: some `any_more` key is `n` bytes long.
    any_more_lens: Vec<u64>,
    any: Bucket,
}

fn has_len(bits: &[u64], len: usize) -> bool {
    bits.get(len / 64)
        .is_some_and(|w| w & (1 << (len % 64)) != 0)
}

const SCHEME: &str = "spiffe://";

impl Index {
    pub(crate) fn build<'a>(rules: impl IntoIterator<Item = IndexRule<'a>>) -> Index {
        let mut index = Index::default();
        for (id, rule) in rules.into_iter().enumerate() {
            let id = u32::try_from(id).unwrap_or(u32::MAX - 1);
            for principal in rule.from {
                let bucket = match principal {
                    Principal::Any => &mut index.any,
                    Principal::Exact(k) => index.exact.entry(k.clone()).or_default(),
                    Principal::OneMore(k) => index.one_more.entry(k.clone()).or_default(),
                    Principal::AnyMore(k) => index.any_more.entry(k.clone()).or_default(),
                };
                // A rule naming two principals that share a bucket goes in once.
                if !bucket.add_rule(id) {
                    continue;
                }
                if let Some(entries) = &rule.http {
                    for (methods, paths) in entries {
                        for path in paths {
                            bucket.http.insert(
                                path,
                                Target {
                                    rule: id,
                                    class: rule.class,
                                    methods: methods.map(|m| m.to_vec().into_boxed_slice()),
                                },
                            );
                        }
                    }
                }
                if let Some(ports) = rule.l4 {
                    bucket.l4.push(L4Target {
                        rule: id,
                        class: rule.class,
                        ports: ports.map(|p| p.to_vec().into_boxed_slice()),
                    });
                }
            }
        }
        for key in index.any_more.keys() {
            let len = key.len();
            if index.any_more_lens.len() <= len / 64 {
                index.any_more_lens.resize(len / 64 + 1, 0);
            }
            index.any_more_lens[len / 64] |= 1 << (len % 64);
        }
        index
    }

    /// Calls `f` on every bucket whose principal pattern matches `caller`.
    #[inline]
    pub(crate) fn for_each_bucket(&self, caller: &str, mut f: impl FnMut(&Bucket)) {
        if let Some(b) = self.exact.get(caller) {
            f(b);
        }
        if caller.starts_with(SCHEME) && !(self.one_more.is_empty() && self.any_more.is_empty()) {
            let bytes = caller.as_bytes();
            let len = bytes.len();
            if !self.one_more.is_empty() {
                if let Some(p) = caller.rfind('/') {
                    if p >= SCHEME.len() && p + 1 < len {
                        if let Some(b) = self.one_more.get(&caller[..p]) {
                            f(b);
                        }
                    }
                }
            }
            if !self.any_more.is_empty() {
                for p in SCHEME.len()..len.saturating_sub(1) {
                    if bytes[p] == b'/' && has_len(&self.any_more_lens, p) {
                        if let Some(b) = self.any_more.get(&caller[..p]) {
                            f(b);
                        }
                    }
                }
            }
        }
        f(&self.any);
    }

    /// Calls `f` with every rule (id, class) matching an HTTP request; a rule may come
    /// more than once.
    #[inline]
    pub(crate) fn http_matches(
        &self,
        caller: &str,
        method: &str,
        view: &str,
        mut f: impl FnMut(u32, Class),
    ) {
        let rest = (!view.is_empty()).then_some(view);
        self.for_each_bucket(caller, |b| {
            b.http.walk(rest, &mut |t: &Target| {
                if t.method_ok(method) {
                    f(t.rule, t.class);
                }
            })
        });
    }

    /// Calls `f` with every rule (id, class) matching a TCP connection to `port`.
    #[inline]
    pub(crate) fn l4_matches(&self, caller: &str, port: u16, mut f: impl FnMut(u32, Class)) {
        self.for_each_bucket(caller, |b| {
            for t in &b.l4 {
                if t.ports.as_ref().is_none_or(|ps| ps.contains(&port)) {
                    f(t.rule, t.class);
                }
            }
        });
    }

    /// The best rules for an HTTP request.
    #[inline]
    pub(crate) fn http(&self, caller: &str, method: &str, view: &str) -> Best {
        let mut best = Best::new();
        self.http_matches(caller, method, view, |r, c| best.offer(r, c));
        best
    }

    /// The best rules for a TCP connection to `port`.
    #[inline]
    pub(crate) fn l4(&self, caller: &str, port: u16) -> Best {
        let mut best = Best::new();
        self.l4_matches(caller, port, |r, c| best.offer(r, c));
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::BuildHasher;

    #[test]
    fn fx_hash_distinguishes_short_keys() {
        let h = BuildHasherDefault::<FxHasher>::default();
        let keys = ["a", "b", "ab", "ba", "admin", "administrator", ""];
        let hashes: std::collections::HashSet<u64> = keys.iter().map(|k| h.hash_one(k)).collect();
        assert_eq!(hashes.len(), keys.len());
    }

    #[test]
    fn best_keeps_the_lowest_rule_of_each_kind() {
        let mut b = Best::new();
        let deny = Class {
            deny: true,
            audit: false,
        };
        let audit_deny = Class {
            deny: true,
            audit: true,
        };
        b.offer(5, deny);
        b.offer(3, deny);
        b.offer(1, audit_deny);
        assert_eq!(b.enforced_deny, 3);
        assert_eq!(b.any_deny, 1);
        assert_eq!(b.enforced_allow, Best::NONE);
    }
}
