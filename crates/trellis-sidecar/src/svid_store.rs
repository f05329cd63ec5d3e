//! The sidecar's current identity: SVID, key and trust bundle, swapped atomically.
//!
//! Writers (SDS client, file watcher) build and validate a whole new value, then store it.
//! Readers (every handshake) `load()` once. Established connections keep the certificate
//! they were made with; new handshakes get the new one. Nothing restarts.
//!
//! [`watch_expiry`] keeps an eye on the clock: when the control plane stays away long enough
//! for the SVID to enter the expiry margin, and then to expire, it says so once per change
//! (WARN, then ERROR), and once more when a fresh SVID arrives.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

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
    /// What this sidecar witnessed of the control plane's transparency log.
    log_witness: crate::log_witness::LogWitness,
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
            log_witness: crate::log_witness::LogWitness::new(Arc::clone(&metrics)),
            metrics,
        })
    }

    /// What this sidecar witnessed of the control plane's transparency log.
    pub fn log_witness(&self) -> &crate::log_witness::LogWitness {
        &self.log_witness
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
        // The same certificate and CAs again (a control plane re-sending its state, e.g.
        // with a transparency-log proof): nothing changes, nothing rotates.
        if let Some(current) = self.current.load().as_deref() {
            if current.chain() == svid.chain() && self.bundle.load().same_cas(&bundle) {
                self.metrics.sds_last_update.set(unix(now));
                tracing::debug!(serial = svid.serial_hex(), "SDS update unchanged");
                return Ok(());
            }
        }
        let first = self.current.load().is_none();
        self.metrics
            .bundle_expiry
            .set(unix(bundle.earliest_expiry()));
        self.bundle.store(Arc::new(bundle));
        self.resolver.install(&svid)?;
        self.metrics
            .set_svid_expiry(svid.spiffe_id().as_str(), unix(svid.not_after()));
        self.metrics.sds_last_update.set(unix(now));
        if !first {
            self.metrics.svid_rotations.inc();
        }
        tracing::info!(spiffe_id = %svid.spiffe_id(), serial = svid.serial_hex(), "installed SVID");
        self.log_witness.hold(&svid);
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

/// Where the current SVID stands against the clock and the expiry margin. The boundaries are
/// the ones [`SvidStore::is_ready`] (ready iff notAfter > now + margin) and the rustls
/// resolver (presented iff now <= notAfter) use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SvidHealth {
    /// No SVID installed yet.
    Missing,
    /// More than the margin left.
    Fresh,
    /// Inside the margin: `/ready` says not ready, the SVID is still presented.
    ExpiringSoon,
    /// Past notAfter: presented to nobody.
    Expired,
}

impl SvidHealth {
    /// The health of an SVID expiring at `not_after` (`None`: no SVID) at `now`.
    pub fn at(not_after: Option<SystemTime>, now: SystemTime, margin: Duration) -> Self {
        match not_after {
            None => SvidHealth::Missing,
            Some(t) if now > t => SvidHealth::Expired,
            Some(t) if t <= now + margin => SvidHealth::ExpiringSoon,
            Some(_) => SvidHealth::Fresh,
        }
    }
}

/// A change worth telling the operator about, from [`ExpiryWatch::observe`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExpiryEvent {
    /// The SVID entered the expiry margin and no replacement has arrived.
    Expiring {
        /// The SVID's serial.
        serial: String,
        /// Its notAfter.
        not_after: SystemTime,
        /// Time left.
        left: Duration,
    },
    /// A newly installed SVID is already inside the margin: its lifetime is shorter than the
    /// margin (a configuration mistake: `/ready` will never say ready).
    ShortLived {
        /// The SVID's serial.
        serial: String,
        /// Its notAfter.
        not_after: SystemTime,
        /// Time left.
        left: Duration,
    },
    /// The SVID expired without a replacement.
    Expired {
        /// The SVID's serial.
        serial: String,
        /// Its notAfter.
        not_after: SystemTime,
    },
    /// A fresh SVID replaced one that was expiring or expired.
    Recovered {
        /// The new SVID's serial.
        serial: String,
        /// Its notAfter.
        not_after: SystemTime,
    },
}

/// Remembers the last [`SvidHealth`] so each change is reported once, not once per check.
#[derive(Debug)]
pub struct ExpiryWatch {
    margin: Duration,
    last: SvidHealth,
    last_serial: Option<String>,
    not_after: Option<SystemTime>,
}

/// Slack added to a computed wake-up, so the boundary has passed when the check runs.
const WAKE_SLACK: Duration = Duration::from_millis(20);
/// Longest sleep between checks: a wall clock that jumps (NTP, suspend) is noticed by then.
const MAX_CHECK_INTERVAL: Duration = Duration::from_secs(30);

impl ExpiryWatch {
    /// Nothing installed yet.
    pub fn new(margin: Duration) -> Self {
        Self {
            margin,
            last: SvidHealth::Missing,
            last_serial: None,
            not_after: None,
        }
    }

    /// Looks at the current SVID (`(serial, notAfter)`) at `now`; returns an event when its
    /// health changed in a way the operator must hear about.
    pub fn observe(
        &mut self,
        current: Option<(&str, SystemTime)>,
        now: SystemTime,
    ) -> Option<ExpiryEvent> {
        let not_after = current.map(|(_, t)| t);
        let health = SvidHealth::at(not_after, now, self.margin);
        let replaced = current.map(|(s, _)| s) != self.last_serial.as_deref();
        let previous = std::mem::replace(&mut self.last, health);
        self.last_serial = current.map(|(s, _)| s.to_owned());
        self.not_after = not_after;
        let (serial, not_after) = current?;
        let serial = serial.to_owned();
        let left = not_after.duration_since(now).unwrap_or(Duration::ZERO);
        match (previous, health) {
            (p, h) if p == h => None,
            (_, SvidHealth::ExpiringSoon) if replaced => Some(ExpiryEvent::ShortLived {
                serial,
                not_after,
                left,
            }),
            (_, SvidHealth::ExpiringSoon) => Some(ExpiryEvent::Expiring {
                serial,
                not_after,
                left,
            }),
            (_, SvidHealth::Expired) => Some(ExpiryEvent::Expired { serial, not_after }),
            (SvidHealth::ExpiringSoon | SvidHealth::Expired, SvidHealth::Fresh) => {
                Some(ExpiryEvent::Recovered { serial, not_after })
            }
            _ => None,
        }
    }

    /// How long after `now` the health of the last observed SVID changes by the clock alone
    /// (capped, so a jumping wall clock is caught up with); `None` when only an install can
    /// change it.
    pub fn next_check(&self, now: SystemTime) -> Option<Duration> {
        let not_after = self.not_after?;
        let at = match self.last {
            SvidHealth::Fresh => not_after.checked_sub(self.margin)?,
            SvidHealth::ExpiringSoon => not_after,
            SvidHealth::Missing | SvidHealth::Expired => return None,
        };
        let wait = at.duration_since(now).unwrap_or(Duration::ZERO) + WAKE_SLACK;
        Some(wait.min(MAX_CHECK_INTERVAL))
    }
}

fn rfc3339(t: SystemTime) -> humantime::Rfc3339Timestamp {
    humantime::format_rfc3339_seconds(t)
}

fn whole_seconds(d: Duration) -> humantime::FormattedDuration {
    humantime::format_duration(Duration::from_secs(d.as_secs()))
}

impl ExpiryEvent {
    /// Logs the event: WARN when the SVID is about to expire, ERROR once it has, INFO on
    /// recovery.
    pub fn log(&self, margin: Duration) {
        let margin = whole_seconds(margin);
        match self {
            ExpiryEvent::Expiring {
                serial,
                not_after,
                left,
            } => tracing::warn!(
                serial,
                %margin,
                "SVID expires at {} (in {}) and the control plane has not sent a replacement; /ready reports not ready until one arrives",
                rfc3339(*not_after),
                whole_seconds(*left),
            ),
            ExpiryEvent::ShortLived {
                serial,
                not_after,
                left,
            } => tracing::warn!(
                serial,
                %margin,
                "the installed SVID expires at {} (in {}), inside expiry_margin: /ready reports not ready; make the SVID lifetime (svid_ttl) longer than expiry_margin",
                rfc3339(*not_after),
                whole_seconds(*left),
            ),
            ExpiryEvent::Expired { serial, not_after } => tracing::error!(
                serial,
                "SVID expired at {}; presenting no certificate until the control plane issues a new one",
                rfc3339(*not_after),
            ),
            ExpiryEvent::Recovered { serial, not_after } => tracing::info!(
                serial,
                "a fresh SVID (expires at {}) replaced the expiring one; ready again",
                rfc3339(*not_after),
            ),
        }
    }
}

/// Runs until `shutdown` flips: checks the SVID at every install and at each boundary
/// (notAfter - margin, notAfter) and logs each change of [`SvidHealth`] once.
pub async fn watch_expiry(
    store: Arc<SvidStore>,
    margin: Duration,
    shutdown: watch::Receiver<bool>,
) {
    watch_expiry_reporting(store, margin, shutdown, |event| event.log(margin)).await;
}

/// [`watch_expiry`] with each event handed to `report` (the tests' window into the loop).
async fn watch_expiry_reporting(
    store: Arc<SvidStore>,
    margin: Duration,
    mut shutdown: watch::Receiver<bool>,
    mut report: impl FnMut(&ExpiryEvent),
) {
    let mut installs = store.subscribe();
    let mut tracker = ExpiryWatch::new(margin);
    loop {
        let now = SystemTime::now();
        let current = store.current();
        if let Some(event) = tracker.observe(
            current.as_deref().map(|s| (s.serial_hex(), s.not_after())),
            now,
        ) {
            report(&event);
        }
        let wake = tracker.next_check(now);
        tokio::select! {
            changed = installs.changed() => if changed.is_err() { return },
            () = async {
                match wake {
                    Some(d) => tokio::time::sleep(d).await,
                    None => std::future::pending().await,
                }
            } => {}
            _ = shutdown.changed() => return,
        }
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
    fn the_same_svid_and_bundle_again_change_nothing() {
        let ca = TestCa::root("example.org");
        let s = store(&ca, None);
        let svid = ca.svid("/web");
        let again = Svid::new(svid.chain().to_vec(), svid.key().clone_key()).unwrap();
        s.install(svid, ca.bundle(), SystemTime::now()).unwrap();
        s.install(again, ca.bundle(), SystemTime::now()).unwrap();
        assert_eq!(s.metrics.svid_rotations.get(), 0);
        assert_eq!(*s.subscribe().borrow(), 1);
        // A new bundle with the same SVID is an update.
        let other = TestCa::root("example.org");
        let both = TrustBundle::new(
            ca.bundle().trust_domain().clone(),
            vec![ca.cert().clone(), other.cert().clone()],
        )
        .unwrap();
        let svid = s.current().unwrap();
        let same = Svid::new(svid.chain().to_vec(), svid.key().clone_key()).unwrap();
        s.install(same, both, SystemTime::now()).unwrap();
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

    const MARGIN: Duration = Duration::from_secs(5);

    fn t(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_000_000 + secs)
    }

    #[test]
    fn health_boundaries_match_ready_and_the_resolver() {
        let na = Some(t(100));
        assert_eq!(SvidHealth::at(None, t(0), MARGIN), SvidHealth::Missing);
        assert_eq!(SvidHealth::at(na, t(94), MARGIN), SvidHealth::Fresh);
        // is_ready: notAfter > now + margin.
        assert_eq!(SvidHealth::at(na, t(95), MARGIN), SvidHealth::ExpiringSoon);
        // The resolver presents through notAfter inclusive.
        assert_eq!(SvidHealth::at(na, t(100), MARGIN), SvidHealth::ExpiringSoon);
        assert_eq!(
            SvidHealth::at(na, t(100) + Duration::from_millis(1), MARGIN),
            SvidHealth::Expired
        );
    }

    #[test]
    fn each_change_is_reported_once() {
        let mut w = ExpiryWatch::new(MARGIN);
        assert_eq!(w.observe(None, t(0)), None);
        assert_eq!(w.next_check(t(0)), None);
        // First SVID: fresh, nothing to say.
        assert_eq!(w.observe(Some(("aa", t(20))), t(0)), None);
        assert_eq!(
            w.next_check(t(0)),
            Some(Duration::from_secs(15) + WAKE_SLACK)
        );
        assert_eq!(w.observe(Some(("aa", t(20))), t(10)), None);
        // Enters the margin with no replacement: one WARN, however often it is checked.
        assert_eq!(
            w.observe(Some(("aa", t(20))), t(16)),
            Some(ExpiryEvent::Expiring {
                serial: "aa".into(),
                not_after: t(20),
                left: Duration::from_secs(4),
            })
        );
        assert_eq!(w.observe(Some(("aa", t(20))), t(17)), None);
        assert_eq!(
            w.next_check(t(17)),
            Some(Duration::from_secs(3) + WAKE_SLACK)
        );
        // Expires: one ERROR.
        assert_eq!(
            w.observe(Some(("aa", t(20))), t(21)),
            Some(ExpiryEvent::Expired {
                serial: "aa".into(),
                not_after: t(20),
            })
        );
        assert_eq!(w.observe(Some(("aa", t(20))), t(40)), None);
        assert_eq!(w.next_check(t(40)), None);
        // The control plane is back: one INFO.
        assert_eq!(
            w.observe(Some(("bb", t(80))), t(41)),
            Some(ExpiryEvent::Recovered {
                serial: "bb".into(),
                not_after: t(80),
            })
        );
        // Rotations while fresh say nothing.
        assert_eq!(w.observe(Some(("cc", t(90))), t(50)), None);
    }

    #[test]
    fn an_svid_shorter_than_the_margin_is_called_out() {
        let mut w = ExpiryWatch::new(Duration::from_secs(300));
        assert_eq!(
            w.observe(Some(("aa", t(60))), t(0)),
            Some(ExpiryEvent::ShortLived {
                serial: "aa".into(),
                not_after: t(60),
                left: Duration::from_secs(60),
            })
        );
        // Every rotation is just as short: said once.
        assert_eq!(w.observe(Some(("bb", t(90))), t(30)), None);
    }

    #[test]
    fn checks_are_capped_so_clock_jumps_are_noticed() {
        let mut w = ExpiryWatch::new(MARGIN);
        w.observe(Some(("aa", t(3600))), t(0));
        assert_eq!(w.next_check(t(0)), Some(MAX_CHECK_INTERVAL));
    }

    #[tokio::test]
    async fn watchdog_follows_installs_and_stops_on_shutdown() {
        let ca = TestCa::root("example.org");
        let s = store(&ca, None);
        let (stop, stop_rx) = watch::channel(false);
        let (events_tx, mut events) = tokio::sync::mpsc::unbounded_channel();
        // A margin longer than the test CA's SVIDs live: the install must be reported as
        // short-lived, which only happens if the watchdog woke for it.
        let margin = Duration::from_secs(10 * 365 * 24 * 3600);
        let task = tokio::spawn(watch_expiry_reporting(
            Arc::clone(&s),
            margin,
            stop_rx,
            move |e| {
                let _ = events_tx.send(e.clone());
            },
        ));
        let svid = ca.svid("/web");
        let serial = svid.serial_hex().to_owned();
        s.install(svid, ca.bundle(), SystemTime::now()).unwrap();
        let event = tokio::time::timeout(Duration::from_secs(5), events.recv())
            .await
            .expect("the watchdog reports the install")
            .unwrap();
        assert!(
            matches!(&event, ExpiryEvent::ShortLived { serial: s, .. } if *s == serial),
            "{event:?}"
        );
        stop.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("watchdog stops on shutdown")
            .unwrap();
    }
}
