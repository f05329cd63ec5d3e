//! The sidecar's current identity: SVID, key and trust bundle, swapped atomically.
//!
//! Writers (SDS client, file watcher) build and validate a whole new value, then store it.
//! Readers (every handshake) `load()` once. Established connections keep the certificate
//! they were made with; new handshakes get the new one. Nothing restarts.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use arc_swap::{ArcSwap, ArcSwapOption};
use tokio::sync::watch;
use trellis_identity::tls::{SharedBundle, SvidResolver};
use trellis_identity::{SpiffeId, Svid, SvidError, TrustBundle, TrustDomain};

use crate::metrics::SidecarMetrics;

/// Why an update was refused; `reason()` is the `trellis_sds_updates_total{result}` label.
#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    /// The chain does not verify against the bundle, the key does not match, or it expired.
    #[error(transparent)]
    Svid(#[from] SvidError),
    /// A valid SVID for the wrong workload.
    #[error("SVID is for `{got}`, this sidecar must be `{expected}`")]
    WrongIdentity {
        /// Configured.
        expected: SpiffeId,
        /// Received.
        got: SpiffeId,
    },
    /// A bundle for another trust domain.
    #[error("bundle is for trust domain `{got}`, expected `{expected}`")]
    WrongTrustDomain {
        /// Configured.
        expected: TrustDomain,
        /// Received.
        got: TrustDomain,
    },
}

impl UpdateError {
    /// Stable label.
    pub fn reason(&self) -> &'static str {
        match self {
            UpdateError::Svid(e) => e.reason(),
            UpdateError::WrongIdentity { .. } => "wrong_identity",
            UpdateError::WrongTrustDomain { .. } => "wrong_trust_domain",
        }
    }
}

/// Current SVID + bundle for every handshake of this sidecar.
pub struct SvidStore {
    trust_domain: TrustDomain,
    expected_id: Option<SpiffeId>,
    resolver: Arc<SvidResolver>,
    bundle: SharedBundle,
    current: ArcSwapOption<Svid>,
    generation: watch::Sender<u64>,
    metrics: Arc<SidecarMetrics>,
}

fn unix(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl SvidStore {
    /// A store with no SVID yet, trusting `initial_bundle` (the bootstrap bundle).
    pub fn new(
        initial_bundle: TrustBundle,
        expected_id: Option<SpiffeId>,
        metrics: Arc<SidecarMetrics>,
    ) -> Arc<Self> {
        metrics
            .bundle_expiry
            .set(unix(initial_bundle.earliest_expiry()));
        Arc::new(Self {
            trust_domain: initial_bundle.trust_domain().clone(),
            expected_id,
            resolver: SvidResolver::empty(),
            bundle: Arc::new(ArcSwap::from_pointee(initial_bundle)),
            current: ArcSwapOption::empty(),
            generation: watch::channel(0).0,
            metrics,
        })
    }

    /// Validates `svid` against `bundle` at `now` (chain, validity, key match, identity), then
    /// swaps both in: the bundle first, so a peer's new SVID already verifies when ours changes.
    pub fn install(
        &self,
        svid: Svid,
        bundle: TrustBundle,
        now: SystemTime,
    ) -> Result<(), UpdateError> {
        self.validate(&svid, &bundle, now)?;
        let first = self.current.load().is_none();
        self.metrics
            .bundle_expiry
            .set(unix(bundle.earliest_expiry()));
        self.bundle.store(Arc::new(bundle));
        self.resolver.install(&svid)?;
        self.metrics.svid_expiry.set(unix(svid.not_after()));
        self.metrics.sds_last_update.set(unix(now));
        if !first {
            self.metrics.svid_rotations.inc();
        }
        tracing::info!(spiffe_id = %svid.spiffe_id(), serial = svid.serial_hex(), "installed SVID");
        self.current.store(Some(Arc::new(svid)));
        self.generation.send_modify(|g| *g += 1);
        Ok(())
    }

    /// Checks an update without installing it.
    pub fn validate(
        &self,
        svid: &Svid,
        bundle: &TrustBundle,
        now: SystemTime,
    ) -> Result<(), UpdateError> {
        if bundle.trust_domain() != &self.trust_domain {
            return Err(UpdateError::WrongTrustDomain {
                expected: self.trust_domain.clone(),
                got: bundle.trust_domain().clone(),
            });
        }
        svid.verify(bundle, now)?;
        if let Some(expected) = &self.expected_id {
            if svid.spiffe_id() != expected {
                return Err(UpdateError::WrongIdentity {
                    expected: expected.clone(),
                    got: svid.spiffe_id().clone(),
                });
            }
        }
        Ok(())
    }

    /// The rustls resolver that presents the current SVID (both directions).
    pub fn resolver(&self) -> Arc<SvidResolver> {
        Arc::clone(&self.resolver)
    }

    /// The bundle every verifier reads.
    pub fn bundle(&self) -> SharedBundle {
        Arc::clone(&self.bundle)
    }

    /// The current SVID, if any.
    pub fn current(&self) -> Option<Arc<Svid>> {
        self.current.load_full()
    }

    /// Our SPIFFE ID, once we have one (or the configured one before that).
    pub fn spiffe_id(&self) -> Option<SpiffeId> {
        self.current()
            .map(|s| s.spiffe_id().clone())
            .or_else(|| self.expected_id.clone())
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// True while an SVID is installed and has more than `margin` left.
    pub fn is_ready(&self, now: SystemTime, margin: std::time::Duration) -> bool {
        self.current
            .load()
            .as_ref()
            .is_some_and(|s| s.not_after() > now + margin)
    }

    /// Changes each time an SVID is installed.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use trellis_identity::testca::TestCa;

    fn store(ca: &TestCa, expected: Option<&str>) -> Arc<SvidStore> {
        SvidStore::new(
            ca.bundle(),
            expected.map(|e| SpiffeId::parse(e).unwrap()),
            Arc::new(SidecarMetrics::new()),
        )
    }

    #[test]
    fn installs_valid_svid_and_counts_rotation() {
        let ca = TestCa::root("example.org");
        let s = store(&ca, Some("spiffe://example.org/web"));
        assert!(!s.is_ready(SystemTime::now(), Duration::ZERO));
        s.install(ca.svid("/web"), ca.bundle(), SystemTime::now())
            .unwrap();
        s.install(ca.svid("/web"), ca.bundle(), SystemTime::now())
            .unwrap();
        assert!(s.is_ready(SystemTime::now(), Duration::ZERO));
        assert_eq!(s.metrics.svid_rotations.get(), 1);
        assert_eq!(*s.subscribe().borrow(), 2);
    }

    #[test]
    fn wrong_identity_keeps_previous_svid() {
        let ca = TestCa::root("example.org");
        let s = store(&ca, Some("spiffe://example.org/web"));
        s.install(ca.svid("/web"), ca.bundle(), SystemTime::now())
            .unwrap();
        let before = s.current().unwrap().serial_hex().to_owned();
        let err = s
            .install(ca.svid("/db"), ca.bundle(), SystemTime::now())
            .unwrap_err();
        assert_eq!(err.reason(), "wrong_identity");
        assert_eq!(s.current().unwrap().serial_hex(), before);
    }

    #[test]
    fn svid_from_other_ca_is_refused() {
        let ca = TestCa::root("example.org");
        let other = TestCa::root("example.org");
        let s = store(&ca, None);
        let err = s
            .install(other.svid("/web"), ca.bundle(), SystemTime::now())
            .unwrap_err();
        assert_eq!(err.reason(), "unknown_ca");
        assert!(s.current().is_none());
    }

    #[test]
    fn not_ready_inside_expiry_margin() {
        let ca = TestCa::root("example.org");
        let s = store(&ca, None);
        s.install(ca.svid("/web"), ca.bundle(), SystemTime::now())
            .unwrap();
        assert!(!s.is_ready(SystemTime::now(), Duration::from_secs(10 * 365 * 86400)));
    }
}
