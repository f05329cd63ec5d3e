//! Peer chains a verifier accepted, remembered so that the same chain presented again skips
//! X.509 path validation.
//!
//! A sidecar presents the same SVID chain on every connection it opens until the SVID rotates,
//! so a server sees few distinct chains and each of them many times. Path validation (two
//! ECDSA signature checks for leaf → intermediate → root, plus the SVID rules) is a third of a
//! full mTLS handshake's server CPU; its outcome is a pure function of the chain's bytes, the
//! bundle, the key usage asked for and the time. An entry is therefore reused only for
//! byte-identical chains, under the very bundle snapshot (pointer identity: a bundle update
//! makes every entry stale at once) and usage it was verified with, and only inside the
//! intersection of the validity periods of every certificate presented (a subset of what path
//! validation allows, so a cached answer is never more lenient). Failures are never cached.
//! The handshake's proof of possession (CertificateVerify) is checked on every handshake, by
//! rustls, as before. Only chains of a few certificates and kilobytes are kept, and only while
//! the bundle they were verified under is still the current one.

use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwap;
use rustls_pki_types::CertificateDer;

use crate::verify::verify_leaf;
use crate::{SpiffeId, SvidError, TrustBundle, Usage};

/// How many distinct chains are remembered (the oldest goes first). Sidecars talking to one
/// server are few next to this; a miss costs only the validation it would have cost anyway.
const CAPACITY: usize = 64;

/// The largest chain remembered, in certificates and in DER bytes. An SVID chain is a leaf
/// and an intermediate or two of ~0.5–1 KiB each. Webpki ignores presented certificates that
/// are not on the path it builds, so a chain can carry anything that parses: past these bounds
/// it is still validated, just not kept, so what one entry pins stays small. (A peer varying
/// its padding gets one entry per leaf: a new chain for a leaf replaces the old one.)
const MAX_KEPT_CERTS: usize = 4;
const MAX_KEPT_BYTES: usize = 8 * 1024;

/// Recently accepted chains of one verifier.
#[derive(Debug, Default)]
pub(crate) struct VerifiedChains {
    entries: ArcSwap<Vec<Arc<Entry>>>,
    /// Chains that went through full validation (tests tell hits from misses by it).
    #[cfg(test)]
    validated: std::sync::atomic::AtomicUsize,
}

#[derive(Debug)]
struct Entry {
    /// The bundle snapshot the chain was verified under.
    bundle: Arc<TrustBundle>,
    usage: Usage,
    /// Leaf first, then the intermediates as presented.
    certs: Box<[Box<[u8]>]>,
    /// Unix seconds, inclusive: the latest notBefore and earliest notAfter of `certs`.
    valid_from: i64,
    valid_until: i64,
    id: SpiffeId,
}

impl Entry {
    fn matches(
        &self,
        leaf: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        bundle: &Arc<TrustBundle>,
        usage: Usage,
        now: i64,
    ) -> bool {
        Arc::ptr_eq(&self.bundle, bundle)
            && self.usage == usage
            && (self.valid_from..=self.valid_until).contains(&now)
            && self.certs.len() == intermediates.len() + 1
            && *self.certs[0] == **leaf
            && self.certs[1..]
                .iter()
                .zip(intermediates)
                .all(|(kept, presented)| **kept == **presented)
    }
}

impl VerifiedChains {
    /// The leaf's SPIFFE ID if the chain verifies against the current bundle of `shared` at
    /// `now` for `usage`: from memory when this exact chain was accepted under that bundle
    /// before, otherwise by [`verify_leaf`], remembering a success.
    pub(crate) fn verify(
        &self,
        leaf: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        shared: &ArcSwap<TrustBundle>,
        usage: Usage,
        now: SystemTime,
    ) -> Result<SpiffeId, SvidError> {
        // One snapshot of the bundle for the whole check, even if it is swapped meanwhile.
        let bundle = shared.load();
        self.verify_under(leaf, intermediates, &bundle, usage, now, || {
            is_current(shared, &bundle)
        })
    }

    /// [`Self::verify`] under the snapshot `bundle`; a success is remembered only while
    /// `still_current()` says no newer bundle has replaced it. Otherwise a handshake that
    /// loaded the bundle before an update and finished after it would drop every chain
    /// remembered under the new bundle (entries of other bundles are dropped on saving) and
    /// keep one that can never match again.
    fn verify_under(
        &self,
        leaf: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        bundle: &Arc<TrustBundle>,
        usage: Usage,
        now: SystemTime,
        still_current: impl Fn() -> bool,
    ) -> Result<SpiffeId, SvidError> {
        let now_secs = crate::cert::unix_secs(now);
        if let Some(hit) = self
            .entries
            .load()
            .iter()
            .find(|e| e.matches(leaf, intermediates, bundle, usage, now_secs))
        {
            return Ok(hit.id.clone());
        }
        #[cfg(test)]
        self.validated
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let id = verify_leaf(leaf, intermediates, bundle, now, usage)?;
        if !worth_keeping(leaf, intermediates) || !still_current() {
            return Ok(id);
        }
        if let Some((valid_from, valid_until)) = validity_window(leaf, intermediates) {
            let entry = Arc::new(Entry {
                bundle: bundle.clone(),
                usage,
                certs: std::iter::once(leaf)
                    .chain(intermediates)
                    .map(|c| Box::from(c.as_ref()))
                    .collect(),
                valid_from,
                valid_until,
                id: id.clone(),
            });
            self.entries.rcu(|entries| {
                // Asked again after `entries` was loaded: an entry of a newer bundle in it
                // means that bundle was current before this check, which then fails. The
                // compare-and-swap retries this closure if anyone saved meanwhile.
                if !still_current() {
                    return Arc::clone(entries);
                }
                // Entries of an older bundle can never match again, and one per leaf is
                // enough: the same SVID presented with another chain (a peer padding its
                // chain, one entry per handshake) replaces its entry rather than pushing
                // everyone else's out.
                let mut kept: Vec<Arc<Entry>> = entries
                    .iter()
                    .filter(|e| {
                        Arc::ptr_eq(&e.bundle, bundle)
                            && !(e.usage == usage && *e.certs[0] == **leaf)
                    })
                    .cloned()
                    .collect();
                if kept.len() >= CAPACITY {
                    kept.remove(0);
                }
                kept.push(entry.clone());
                Arc::new(kept)
            });
        }
        Ok(id)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.load().len()
    }

    #[cfg(test)]
    fn validated(&self) -> usize {
        self.validated.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Whether `bundle` is still the snapshot `shared` holds (pointer identity: every update stores
/// a new one).
fn is_current(shared: &ArcSwap<TrustBundle>, bundle: &Arc<TrustBundle>) -> bool {
    Arc::ptr_eq(&shared.load(), bundle)
}

/// Whether a chain is within the bounds of what is remembered ([`MAX_KEPT_CERTS`],
/// [`MAX_KEPT_BYTES`]).
fn worth_keeping(leaf: &CertificateDer<'_>, intermediates: &[CertificateDer<'_>]) -> bool {
    intermediates.len() < MAX_KEPT_CERTS
        && std::iter::once(leaf)
            .chain(intermediates)
            .map(|c| c.as_ref().len())
            .sum::<usize>()
            <= MAX_KEPT_BYTES
}

/// The intersection of the validity periods of every certificate presented, in unix seconds;
/// `None` (do not remember) if one does not parse.
fn validity_window(
    leaf: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
) -> Option<(i64, i64)> {
    std::iter::once(leaf).chain(intermediates).try_fold(
        (i64::MIN, i64::MAX),
        |(from, until), cert| {
            let (not_before, not_after) = crate::cert::validity_secs(cert.as_ref())?;
            Some((from.max(not_before), until.min(not_after)))
        },
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::testca::TestCa;
    use std::time::Duration;

    fn verify(
        chains: &VerifiedChains,
        chain: &[CertificateDer<'_>],
        bundle: &Arc<TrustBundle>,
        usage: Usage,
        now: SystemTime,
    ) -> Result<SpiffeId, SvidError> {
        chains.verify(
            &chain[0],
            &chain[1..],
            &ArcSwap::new(bundle.clone()),
            usage,
            now,
        )
    }

    #[test]
    fn the_same_chain_is_validated_once_and_answers_the_same_id() {
        let ca = TestCa::root("example.org").intermediate();
        let svid = ca.svid("/ns/a/sa/a");
        assert_eq!(svid.chain().len(), 2, "leaf and intermediate");
        let bundle = Arc::new(ca.bundle());
        let chains = VerifiedChains::default();
        let now = SystemTime::now();
        let first = verify(&chains, svid.chain(), &bundle, Usage::Client, now).unwrap();
        let again = verify(&chains, svid.chain(), &bundle, Usage::Client, now).unwrap();
        assert_eq!(first, again);
        assert_eq!(first.to_string(), ca.id("/ns/a/sa/a"));
        assert_eq!(chains.validated(), 1);
        assert_eq!(chains.len(), 1);
        // Another usage, another chain: each validated on its own.
        verify(&chains, svid.chain(), &bundle, Usage::Server, now).unwrap();
        let other = ca.svid("/ns/b/sa/b");
        verify(&chains, other.chain(), &bundle, Usage::Client, now).unwrap();
        assert_eq!(chains.validated(), 3);
    }

    #[test]
    fn a_remembered_chain_expires_with_its_certificates() {
        let ca = TestCa::root("example.org");
        let svid = ca.svid("/ns/a/sa/a");
        let bundle = Arc::new(ca.bundle());
        let chains = VerifiedChains::default();
        verify(
            &chains,
            svid.chain(),
            &bundle,
            Usage::Client,
            SystemTime::now(),
        )
        .unwrap();
        let after = svid.not_after() + Duration::from_secs(1);
        let err = verify(&chains, svid.chain(), &bundle, Usage::Client, after).unwrap_err();
        assert!(err.to_string().contains("expired"), "{err}");
        assert_eq!(chains.validated(), 2);
    }

    #[test]
    fn a_new_bundle_validates_again_and_refusals_are_not_remembered() {
        let ca = TestCa::root("example.org");
        let svid = ca.svid("/ns/a/sa/a");
        let chains = VerifiedChains::default();
        let now = SystemTime::now();
        verify(
            &chains,
            svid.chain(),
            &Arc::new(ca.bundle()),
            Usage::Client,
            now,
        )
        .unwrap();
        // The CA was replaced: the same chain, accepted a moment ago, is refused now.
        let other = Arc::new(TestCa::root("example.org").bundle());
        for _ in 0..2 {
            assert!(verify(&chains, svid.chain(), &other, Usage::Client, now).is_err());
        }
        assert_eq!(chains.validated(), 3);
        // Refusals add nothing (the old bundle's entry stays until a success under a newer
        // bundle clears it).
        assert_eq!(chains.len(), 1);
    }

    #[test]
    fn a_chain_differing_in_any_byte_is_not_a_hit() {
        let ca = TestCa::root("example.org").intermediate();
        let svid = ca.svid("/ns/a/sa/a");
        let bundle = Arc::new(ca.bundle());
        let chains = VerifiedChains::default();
        let now = SystemTime::now();
        verify(&chains, svid.chain(), &bundle, Usage::Client, now).unwrap();
        // The leaf alone (intermediate left out) is a different chain, and fails validation.
        assert!(verify(&chains, &svid.chain()[..1], &bundle, Usage::Client, now).is_err());
        let mut tampered = svid.chain()[0].as_ref().to_vec();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        let chain = [CertificateDer::from(tampered), svid.chain()[1].clone()];
        assert!(verify(&chains, &chain, &bundle, Usage::Client, now).is_err());
        assert_eq!(chains.validated(), 3);
    }

    #[test]
    fn at_most_capacity_chains_are_kept() {
        let ca = TestCa::root("example.org");
        let bundle = Arc::new(ca.bundle());
        let chains = VerifiedChains::default();
        let now = SystemTime::now();
        for i in 0..CAPACITY + 3 {
            let svid = ca.svid(&format!("/n/{i}"));
            verify(&chains, svid.chain(), &bundle, Usage::Client, now).unwrap();
        }
        assert_eq!(chains.len(), CAPACITY);
    }
    #[test]
    fn a_handshake_that_outlived_its_bundle_leaves_the_new_bundles_chains_alone() {
        let old_ca = TestCa::root("example.org");
        let new_ca = TestCa::root("example.org");
        let (old_bundle, new_bundle) = (Arc::new(old_ca.bundle()), Arc::new(new_ca.bundle()));
        let chains = VerifiedChains::default();
        let now = SystemTime::now();
        let fresh = new_ca.svid("/ns/a/sa/a");
        verify(&chains, fresh.chain(), &new_bundle, Usage::Client, now).unwrap();
        // A handshake that loaded the old bundle before the update finishes after it: it is
        // answered under its snapshot, and its chain is not remembered.
        let late = old_ca.svid("/ns/b/sa/b");
        let id = chains
            .verify_under(
                &late.chain()[0],
                &late.chain()[1..],
                &old_bundle,
                Usage::Client,
                now,
                || false,
            )
            .unwrap();
        assert_eq!(id.to_string(), old_ca.id("/ns/b/sa/b"));
        assert_eq!(chains.len(), 1);
        verify(&chains, fresh.chain(), &new_bundle, Usage::Client, now).unwrap();
        assert_eq!(
            chains.validated(),
            2,
            "the new bundle's chain is still a hit"
        );
    }

    /// The SVID's chain padded with `extra` more copies of its intermediate: valid (webpki
    /// ignores certificates off its path) and byte-different for each `extra`.
    fn padded<'a>(chain: &[CertificateDer<'a>], extra: usize) -> Vec<CertificateDer<'a>> {
        chain
            .iter()
            .cloned()
            .chain(std::iter::repeat_n(chain[1].clone(), extra))
            .collect()
    }

    #[test]
    fn a_chain_past_the_bounds_is_validated_but_not_remembered() {
        let ca = TestCa::root("example.org").intermediate();
        let svid = ca.svid("/ns/a/sa/a");
        let bundle = Arc::new(ca.bundle());
        let now = SystemTime::now();
        // Leaf and MAX_KEPT_CERTS intermediates: one over.
        let over = padded(svid.chain(), MAX_KEPT_CERTS - 1);
        let chains = VerifiedChains::default();
        for _ in 0..2 {
            verify(&chains, &over, &bundle, Usage::Client, now).unwrap();
        }
        assert_eq!((chains.validated(), chains.len()), (2, 0));
        // Exactly MAX_KEPT_CERTS certificates: kept.
        let at = padded(svid.chain(), MAX_KEPT_CERTS - 2);
        assert_eq!(at.len(), MAX_KEPT_CERTS);
        verify(&chains, &at, &bundle, Usage::Client, now).unwrap();
        assert_eq!(chains.len(), 1);
        // Bytes: up to MAX_KEPT_BYTES in all.
        let leaf = &svid.chain()[0];
        let filler = |n: usize| CertificateDer::from(vec![0u8; n]);
        assert!(worth_keeping(leaf, &[filler(MAX_KEPT_BYTES - leaf.len())]));
        assert!(!worth_keeping(
            leaf,
            &[filler(MAX_KEPT_BYTES - leaf.len() + 1)]
        ));
    }

    #[test]
    fn one_leaf_holds_one_entry_whatever_chain_it_comes_with() {
        let ca = TestCa::root("example.org").intermediate();
        let (a, b) = (ca.svid("/ns/a/sa/a"), ca.svid("/ns/b/sa/b"));
        let bundle = Arc::new(ca.bundle());
        let chains = VerifiedChains::default();
        let now = SystemTime::now();
        verify(&chains, b.chain(), &bundle, Usage::Client, now).unwrap();
        // A peer padding its chain differently on every handshake: each is validated, and
        // each replaces the last instead of pushing b's entry out.
        for extra in 0..CAPACITY + 2 {
            let chain = padded(a.chain(), extra % (MAX_KEPT_CERTS - 1));
            verify(&chains, &chain, &bundle, Usage::Client, now).unwrap();
            assert_eq!(chains.len(), 2);
        }
        let validated = chains.validated();
        verify(&chains, b.chain(), &bundle, Usage::Client, now).unwrap();
        assert_eq!(chains.validated(), validated, "b's chain is still a hit");
        // The other usage is another entry.
        verify(&chains, a.chain(), &bundle, Usage::Server, now).unwrap();
        assert_eq!(chains.len(), 3);
    }

    #[test]
    fn a_snapshot_is_current_until_the_bundle_is_replaced() {
        let shared = ArcSwap::from_pointee(TestCa::root("example.org").bundle());
        let snapshot = shared.load_full();
        assert!(is_current(&shared, &snapshot));
        // Even an identical bundle is a new snapshot.
        shared.store(Arc::new((*snapshot).clone()));
        assert!(!is_current(&shared, &snapshot));
    }
}
