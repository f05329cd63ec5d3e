//! The trust domain's CAs over time: which one signs now, and which are in the bundle.
//!
//! `trellis ca rotate` stores a new CA with an activation time in the registry. Each CA then
//! goes through four phases, a pure function of the stored schedule and the clock:
//!
//! 1. **prepared**: in the bundle, not signing. Every SDS stream receives the new bundle, so
//!    every peer trusts the new CA before anything it signed exists;
//! 2. **active**: signs every new SVID (the latest CA whose activation time has passed);
//! 3. **retiring**: superseded, still in the bundle until every SVID it signed has expired
//!    (superseded at + SVID lifetime + clock-skew allowance);
//! 4. **retired**: out of the bundle.
//!
//! Because the state depends only on the database and the clock, replicas on one database
//! agree, and a restart in the middle of a rotation resumes it where it was.
//!
//! The control plane's own certificates (its SDS serving SVID, the webhook's serving
//! certificate) come from the **oldest** CA still in the bundle, not from the signer: a
//! sidecar started during the overlap with a pre-rotation bootstrap bundle must still be able
//! to verify the control plane. They switch to the next CA when that one retires, so
//! bootstrap bundles only have to be refreshed before the old CA leaves the bundle.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use serde::Serialize;
use tokio::sync::watch;
use trellis_identity::{CertificateDer, TrustBundle, TrustDomain};
use trellis_serve::time::{rfc3339, unix_seconds};

use crate::audit::{AuditEvent, AuditLog};
use crate::ca::Ca;
use crate::metrics::ControlMetrics;
use crate::registry::Registry;

/// How long after its last possible SVID expired a superseded CA stays in the bundle: covers
/// peers whose clocks run behind ours (the CA backdates notBefore by the same amount).
pub const RETIRE_SKEW: Duration = Duration::from_secs(60);

/// A CA and when it joins the bundle and starts signing. The base CA (configured or embedded)
/// has id 0 and has always been active.
pub struct ScheduledCa {
    /// 0 for the base CA, else the registry's rotation id.
    pub id: i64,
    /// The CA.
    pub ca: Arc<Ca>,
    /// When it joined the bundle.
    pub prepared_at: SystemTime,
    /// When it starts signing.
    pub activate_at: SystemTime,
}

/// Where a CA is in its life at a given time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaPhase {
    /// In the bundle, not signing yet.
    Prepared,
    /// Signing.
    Active,
    /// Superseded; in the bundle until `until`.
    Retiring {
        /// When it leaves the bundle.
        until: SystemTime,
    },
    /// Out of the bundle.
    Retired,
}

impl CaPhase {
    /// `prepared`, `active`, `retiring`, `retired`.
    pub fn as_str(self) -> &'static str {
        match self {
            CaPhase::Prepared => "prepared",
            CaPhase::Active => "active",
            CaPhase::Retiring { .. } => "retiring",
            CaPhase::Retired => "retired",
        }
    }

    fn in_bundle(self) -> bool {
        !matches!(self, CaPhase::Retired)
    }
}

/// Every CA of the trust domain, ordered by activation.
pub struct CaSchedule {
    cas: Vec<ScheduledCa>,
    /// SVID lifetime + [`RETIRE_SKEW`].
    retire_after: Duration,
}

/// What the schedule says at one instant.
#[derive(Clone)]
pub struct CaView {
    /// The CA that signs.
    pub signer: Arc<Ca>,
    /// Its schedule id.
    pub signer_id: i64,
    /// Union of the roots of every CA not retired, without duplicates.
    pub bundle: TrustBundle,
    /// The CA the control plane's own certificates come from: the oldest one that has
    /// activated and is not retired (the signer when no rotation overlaps).
    pub serving: Arc<Ca>,
    /// Its schedule id.
    pub serving_id: i64,
    /// The bundle's `spiffe_sequence` (bundle endpoint): 1 for the base CA alone, plus one
    /// for every CA that joined the bundle and one for every CA that left it. Computed from
    /// the schedule, which lives in the registry, so it survives restarts, every replica
    /// computes the same number, and it only grows as time passes and rotations are added.
    pub sequence: u64,
}

impl CaSchedule {
    /// A schedule holding only `base`, always active; superseded CAs stay in the bundle for
    /// `svid_ttl` + [`RETIRE_SKEW`].
    pub fn new(base: Arc<Ca>, svid_ttl: Duration) -> Self {
        CaSchedule {
            cas: vec![ScheduledCa {
                id: 0,
                ca: base,
                prepared_at: SystemTime::UNIX_EPOCH,
                activate_at: SystemTime::UNIX_EPOCH,
            }],
            retire_after: svid_ttl + RETIRE_SKEW,
        }
    }

    /// Adds a scheduled CA.
    pub fn add(&mut self, ca: ScheduledCa) {
        self.cas.push(ca);
        self.cas.sort_by_key(|c| (c.activate_at, c.id));
    }

    /// Index of the CA active at `now`: the last one whose activation has passed.
    fn active_index(&self, now: SystemTime) -> usize {
        self.cas
            .iter()
            .rposition(|c| c.activate_at <= now)
            .unwrap_or(0)
    }

    /// Each CA with its phase at `now`, in activation order.
    pub fn phases(&self, now: SystemTime) -> Vec<(&ScheduledCa, CaPhase)> {
        let active = self.active_index(now);
        self.cas
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let phase = match i.cmp(&active) {
                    std::cmp::Ordering::Equal => CaPhase::Active,
                    std::cmp::Ordering::Greater => CaPhase::Prepared,
                    std::cmp::Ordering::Less => {
                        // Superseded when the next CA activated; its last SVIDs expire one
                        // SVID lifetime later.
                        let superseded = self.cas[i + 1].activate_at;
                        let until = superseded + self.retire_after;
                        if now < until {
                            CaPhase::Retiring { until }
                        } else {
                            CaPhase::Retired
                        }
                    }
                };
                (c, phase)
            })
            .collect()
    }

    /// The signer and the bundle at `now`.
    pub fn view(&self, td: &TrustDomain, now: SystemTime) -> Result<CaView, String> {
        let phases = self.phases(now);
        let mut roots: Vec<CertificateDer<'static>> = Vec::new();
        for (c, phase) in &phases {
            if !phase.in_bundle() {
                continue;
            }
            for root in c.ca.bundle().roots() {
                if !roots.iter().any(|r| r.as_ref() == root.as_ref()) {
                    roots.push(root.clone());
                }
            }
        }
        let bundle = TrustBundle::new(td.clone(), roots).map_err(|e| e.to_string())?;
        let (signer, _) = phases
            .iter()
            .find(|(_, p)| *p == CaPhase::Active)
            .ok_or("no active CA")?;
        // Phases are in activation order, so the first retiring-or-active CA is the oldest
        // root every bundle handed out since its activation still holds. A prepared CA is
        // never chosen: bundles from before the rotation lack it.
        let serving = phases
            .iter()
            .find(|(_, p)| matches!(p, CaPhase::Active | CaPhase::Retiring { .. }))
            .map_or(*signer, |(c, _)| *c);
        // SPIFFE Trust Domain and Bundle 4.2.1: "spiffe_sequence ... SHOULD be incremented
        // ... whenever the contents of the bundle change".
        let sequence = 1 + phases
            .iter()
            .map(|(c, p)| u64::from(c.id != 0) + u64::from(*p == CaPhase::Retired))
            .sum::<u64>();
        Ok(CaView {
            sequence,
            signer: Arc::clone(&signer.ca),
            signer_id: signer.id,
            bundle,
            serving: Arc::clone(&serving.ca),
            serving_id: serving.id,
        })
    }
}

/// One CA in the admin `/ca` report.
#[derive(Debug, Clone, Serialize)]
pub struct CaStatus {
    /// 0 for the base CA, else the rotation id.
    pub id: i64,
    /// Signing certificate subject and serial.
    pub ca: String,
    /// `prepared`, `active`, `retiring`, `retired`.
    pub phase: &'static str,
    /// When it joined the bundle (RFC 3339), absent for the base CA.
    pub prepared_at: Option<String>,
    /// When it starts (started) signing, absent for the base CA.
    pub activate_at: Option<String>,
    /// When a retiring CA leaves the bundle.
    pub leaves_bundle_at: Option<String>,
    /// The signing certificate's notAfter.
    pub not_after: String,
}

/// Keeps the running control plane's signer and bundle in step with the schedule: reads
/// new rotations from the registry, and applies phase changes as their time comes.
pub struct CaRotator {
    td: TrustDomain,
    schedule: CaSchedule,
    registry: Arc<Registry>,
    /// The CA every issuance uses.
    signer: Arc<ArcSwap<Ca>>,
    signer_id: i64,
    /// The CA the control plane's own certificates come from.
    serving: Arc<ArcSwap<Ca>>,
    serving_id: i64,
    on_serving_change: ServingHook,
    /// Pushed to every SDS stream on change.
    bundle_tx: watch::Sender<Arc<TrustBundle>>,
    /// What the SDS listener verifies client SVIDs with.
    listener_bundle: Arc<ArcSwap<TrustBundle>>,
    bundle_path: PathBuf,
    metrics: Arc<ControlMetrics>,
    audit: Arc<AuditLog>,
    status: Arc<ArcSwap<Vec<CaStatus>>>,
    /// Phase of each CA id as last applied, to log and audit transitions once.
    applied: Vec<(i64, CaPhase)>,
    /// The highest rotation id read from the registry (applied or refused).
    last_seen: i64,
    /// Told whether each read of the schedule worked (the database's read probe).
    health: Option<Arc<crate::db_health::DbHealth>>,
    /// The bundle's `spiffe_sequence`, for the bundle endpoint; stored after the bundle.
    sequence: Option<Arc<std::sync::atomic::AtomicU64>>,
    /// Opens stored rotations' keys that are PKCS#11 URIs.
    keys: crate::keys::Keyring,
}

/// Re-issues the control plane's own certificates from [`CaOutputs::serving`]. The rotator
/// calls it when the serving CA changes, before it publishes a bundle without the previous
/// one, so no client holding the new bundle ever meets a certificate it cannot verify.
pub type ServingHook = Box<dyn Fn() + Send + Sync>;

/// The shared pieces a [`CaRotator`] keeps current.
pub struct CaOutputs {
    /// The CA every issuance uses.
    pub signer: Arc<ArcSwap<Ca>>,
    /// The CA the control plane's own certificates come from (see the module docs).
    pub serving: Arc<ArcSwap<Ca>>,
    /// Called when `serving` changes after the first refresh.
    pub on_serving_change: ServingHook,
    /// The bundle pushed to SDS streams.
    pub bundle_tx: watch::Sender<Arc<TrustBundle>>,
    /// The bundle the SDS listener verifies clients with.
    pub listener_bundle: Arc<ArcSwap<TrustBundle>>,
    /// `bundle.pem`, rewritten on change.
    pub bundle_path: PathBuf,
    /// The admin `/ca` report.
    pub status: Arc<ArcSwap<Vec<CaStatus>>>,
}

impl CaRotator {
    /// A rotator over `schedule` (base CA plus stored rotations) whose first
    /// [`CaRotator::refresh`] publishes the state at that time.
    pub fn new(
        td: TrustDomain,
        schedule: CaSchedule,
        registry: Arc<Registry>,
        outputs: CaOutputs,
        metrics: Arc<ControlMetrics>,
        audit: Arc<AuditLog>,
    ) -> Self {
        CaRotator {
            td,
            schedule,
            registry,
            signer: outputs.signer,
            signer_id: -1,
            serving: outputs.serving,
            serving_id: -1,
            on_serving_change: outputs.on_serving_change,
            bundle_tx: outputs.bundle_tx,
            listener_bundle: outputs.listener_bundle,
            bundle_path: outputs.bundle_path,
            metrics,
            audit,
            status: outputs.status,
            applied: Vec::new(),
            last_seen: 0,
            health: None,
            sequence: None,
            keys: crate::keys::Keyring::default(),
        }
    }

    /// Keeps `sequence` at the bundle's `spiffe_sequence` (see [`CaView::sequence`]).
    pub fn with_sequence(mut self, sequence: Arc<std::sync::atomic::AtomicU64>) -> Self {
        self.sequence = Some(sequence);
        self
    }

    /// Opens rotations whose key is a PKCS#11 URI with `keys`.
    pub fn with_keyring(mut self, keys: crate::keys::Keyring) -> Self {
        self.keys = keys;
        self
    }

    /// Reports each read of the schedule (once a second) to `health`.
    pub fn with_db_health(mut self, health: Arc<crate::db_health::DbHealth>) -> Self {
        self.health = Some(health);
        self
    }

    /// Loads rotations stored since the last call (a refused one is logged and skipped,
    /// never applied), then applies the schedule at `now`: swaps the signer, pushes and
    /// writes the bundle if it changed, records each phase change. Returns whether the
    /// signer or bundle changed.
    pub fn refresh(&mut self, now: SystemTime) -> bool {
        let read = self
            .registry
            .check_file()
            .and_then(|()| self.registry.ca_rotations_after(self.last_seen));
        if let Some(h) = &self.health {
            match &read {
                Ok(_) => h.succeeded(crate::db_health::DbOp::Read),
                Err(e) => h.failed(crate::db_health::DbOp::Read, e),
            }
        }
        match read {
            Ok(rotations) => {
                for r in rotations {
                    match Ca::from_material_with(
                        &self.td,
                        &r.material,
                        self.registry.path(),
                        &self.keys,
                    ) {
                        Ok(ca) => {
                            tracing::info!(rotation = r.id, ca = ca.label(), activate_at = %rfc3339(r.activate_at), "CA rotation scheduled: the new CA joins the trust bundle now and signs from its activation time");
                            self.schedule.add(ScheduledCa {
                                id: r.id,
                                ca: Arc::new(ca),
                                prepared_at: r.prepared_at,
                                activate_at: r.activate_at,
                            });
                        }
                        Err(e) => {
                            // Skipped for good: reported once, not every second.
                            tracing::error!(rotation = r.id, error = %e, "ignoring a stored CA rotation that fails its checks; the current CA keeps signing");
                        }
                    }
                    self.last_seen = self.last_seen.max(r.id);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read scheduled CA rotations; will retry");
            }
        }
        self.apply(now)
    }

    fn apply(&mut self, now: SystemTime) -> bool {
        let view = match self.schedule.view(&self.td, now) {
            Ok(v) => v,
            Err(e) => {
                tracing::error!(error = %e, "CA schedule yields no usable bundle; keeping the current one");
                return false;
            }
        };
        let mut changed = false;
        if view.signer_id != self.signer_id {
            self.signer.store(Arc::clone(&view.signer));
            self.signer_id = view.signer_id;
            self.metrics
                .ca_expiry
                .set(unix_seconds(view.signer.not_after()));
            changed = true;
        }
        if view.serving_id != self.serving_id {
            let first = self.serving_id == -1;
            self.serving.store(Arc::clone(&view.serving));
            self.serving_id = view.serving_id;
            // Before the bundle below drops the previous CA: a client that receives that
            // bundle and reconnects must meet a certificate from a CA it still trusts.
            if !first {
                tracing::info!(
                    rotation = view.serving_id,
                    ca = view.serving.label(),
                    "the control plane's own certificates now come from this CA"
                );
                (self.on_serving_change)();
            }
            changed = true;
        }
        let current = self.bundle_tx.borrow().clone();
        let same_bundle = current.roots().len() == view.bundle.roots().len()
            && current
                .roots()
                .iter()
                .zip(view.bundle.roots())
                .all(|(a, b)| a.as_ref() == b.as_ref());
        if !same_bundle {
            let bundle = Arc::new(view.bundle);
            // The listener first: a client whose new SVID arrives with this bundle must be
            // able to reconnect at once.
            self.listener_bundle.store(Arc::clone(&bundle));
            if let Err(e) = crate::state_dir::write_bundle(&self.bundle_path, &bundle) {
                tracing::error!(error = %e, "cannot write bundle.pem; SDS clients still get the new bundle");
            }
            self.metrics
                .bundle_expiry
                .set(unix_seconds(bundle.earliest_expiry()));
            self.metrics
                .bundle_cas
                .set(i64::try_from(bundle.roots().len()).unwrap_or(i64::MAX));
            self.bundle_tx.send_replace(bundle);
            changed = true;
        }
        // After the bundle: a reader never sees a new sequence with the old CAs.
        if let Some(seq) = &self.sequence {
            seq.store(view.sequence, std::sync::atomic::Ordering::Release);
        }
        self.record_transitions(now);
        changed
    }

    /// Logs, audits and counts each CA whose phase differs from the last applied one, and
    /// publishes the `/ca` report.
    fn record_transitions(&mut self, now: SystemTime) {
        let phases = self.schedule.phases(now);
        let mut status = Vec::with_capacity(phases.len());
        let mut applied = Vec::with_capacity(phases.len());
        for (c, phase) in &phases {
            let before = self
                .applied
                .iter()
                .find(|(id, _)| *id == c.id)
                .map(|(_, p)| p.as_str());
            let first_run = self.applied.is_empty();
            if before != Some(phase.as_str()) && !(first_run && c.id == 0) {
                tracing::info!(
                    rotation = c.id,
                    ca = c.ca.label(),
                    phase = phase.as_str(),
                    "CA phase changed"
                );
                self.metrics.ca_transition(phase.as_str());
                let event = AuditEvent::CaPhase {
                    rotation: c.id,
                    ca: c.ca.label().to_owned(),
                    phase: phase.as_str(),
                };
                if let Err(e) = self.audit.record(&event, now) {
                    self.metrics.audit_write_errors.inc();
                    tracing::error!(error = %e, "cannot write audit log");
                }
            }
            if before != Some(phase.as_str()) {
                self.log_phase(c, *phase);
            }
            applied.push((c.id, *phase));
            let base = c.id == 0;
            status.push(CaStatus {
                id: c.id,
                ca: c.ca.label().to_owned(),
                phase: phase.as_str(),
                prepared_at: (!base).then(|| rfc3339(c.prepared_at)),
                activate_at: (!base).then(|| rfc3339(c.activate_at)),
                leaves_bundle_at: match phase {
                    CaPhase::Retiring { until } => Some(rfc3339(*until)),
                    _ => None,
                },
                not_after: rfc3339(c.ca.not_after()),
            });
        }
        self.applied = applied;
        self.status.store(Arc::new(status));
    }

    /// Appends the phase to the transparency log (once per CA and phase across restarts and
    /// replicas: the registry ignores repeats). A failure is logged; the next change retries
    /// nothing, but `trellis log verify` still sees every issuance that CA signed.
    fn log_phase(&self, c: &ScheduledCa, phase: CaPhase) {
        let body = match crate::translog::ca_phase_body(c.ca.signing_cert(), phase.as_str()) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, ca = c.ca.label(), "cannot log the CA phase change");
                return;
            }
        };
        if let Err(e) = self.registry.record_ca_phase(&body) {
            tracing::error!(error = %e, ca = c.ca.label(), phase = phase.as_str(), "cannot append the CA phase change to the transparency log");
        }
    }

    /// Refreshes every `every` until `shutdown` flips.
    pub async fn run(mut self, every: Duration, mut shutdown: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                () = tokio::time::sleep(every) => {}
                _ = shutdown.changed() => return,
            }
            // SQLite reads are quick but blocking; a rotation's CA checks sign a probe.
            self = match tokio::task::spawn_blocking(move || {
                self.refresh(SystemTime::now());
                self
            })
            .await
            {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "CA rotation check panicked; rotations stop being applied");
                    return;
                }
            };
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    fn td() -> TrustDomain {
        TrustDomain::parse("example.org").unwrap()
    }

    fn root(at: SystemTime) -> Arc<Ca> {
        let m = Ca::new_root(&td(), at).unwrap();
        Arc::new(Ca::from_material(&td(), &m, std::path::Path::new("test")).unwrap())
    }

    fn t(s: u64) -> SystemTime {
        SystemTime::now() + Duration::from_secs(s)
    }

    /// The base CA and a second one prepared now and activated in 100 s, SVID TTL 600 s.
    fn rotation() -> (Arc<Ca>, Arc<Ca>, Duration, CaSchedule) {
        let now = SystemTime::now();
        let (old, new) = (root(now), root(now));
        let ttl = Duration::from_secs(600);
        let mut s = CaSchedule::new(Arc::clone(&old), ttl);
        s.add(ScheduledCa {
            id: 1,
            ca: Arc::clone(&new),
            prepared_at: t(0),
            activate_at: t(100),
        });
        (old, new, ttl, s)
    }

    #[test]
    fn bundle_sequence_grows_with_every_bundle_change() {
        let (old, _, ttl, s) = rotation();
        let alone = CaSchedule::new(old, ttl);
        assert_eq!(alone.view(&td(), t(0)).unwrap().sequence, 1);
        // The new CA joined: 2; still 2 once it signs (the bundle is the same); 3 once the
        // old one left.
        assert_eq!(s.view(&td(), t(50)).unwrap().sequence, 2);
        assert_eq!(s.view(&td(), t(101)).unwrap().sequence, 2);
        let gone = t(100) + ttl + RETIRE_SKEW + Duration::from_secs(1);
        let v = s.view(&td(), gone).unwrap();
        assert_eq!(v.bundle.roots().len(), 1);
        assert_eq!(v.sequence, 3);
    }

    #[test]
    fn a_rotation_goes_prepared_active_retiring_retired() {
        let (_, new, ttl, s) = rotation();
        let phase = |s: &CaSchedule, at| -> Vec<&'static str> {
            s.phases(at).iter().map(|(_, p)| p.as_str()).collect()
        };

        // Before activation: both in the bundle, the old one signs.
        assert_eq!(phase(&s, t(50)), ["active", "prepared"]);
        let v = s.view(&td(), t(50)).unwrap();
        assert_eq!(v.signer_id, 0);
        assert_eq!(v.bundle.roots().len(), 2);

        // After: the new one signs, the old one stays while its SVIDs can be valid.
        assert_eq!(phase(&s, t(101)), ["retiring", "active"]);
        let v = s.view(&td(), t(101)).unwrap();
        assert_eq!(v.signer_id, 1);
        assert_eq!(v.bundle.roots().len(), 2);
        let until = 100 + ttl.as_secs() + RETIRE_SKEW.as_secs();
        assert_eq!(phase(&s, t(until - 1)), ["retiring", "active"]);

        // Once every SVID it signed has expired, it leaves the bundle.
        assert_eq!(phase(&s, t(until + 1)), ["retired", "active"]);
        let v = s.view(&td(), t(until + 1)).unwrap();
        assert_eq!(v.bundle.roots().len(), 1);
        assert_eq!(
            v.bundle.roots()[0].as_ref(),
            new.bundle().roots()[0].as_ref()
        );
    }

    #[test]
    fn own_certificates_come_from_the_oldest_ca_until_it_retires() {
        let (old, new, ttl, s) = rotation();
        // Prepared: the new CA is in the bundle but bundles from before lack it.
        assert_eq!(s.view(&td(), t(50)).unwrap().serving_id, 0);
        // Active: new SVIDs from the new CA, the control plane still serves from the old
        // one, which every bundle handed out since before the rotation holds.
        let v = s.view(&td(), t(101)).unwrap();
        assert_eq!((v.signer_id, v.serving_id), (1, 0));
        assert!(Arc::ptr_eq(&v.serving, &old));
        let until = 100 + ttl.as_secs() + RETIRE_SKEW.as_secs();
        assert_eq!(s.view(&td(), t(until - 1)).unwrap().serving_id, 0);
        // Retired: the old root left the bundle, so the control plane switches with it.
        let v = s.view(&td(), t(until + 1)).unwrap();
        assert_eq!((v.signer_id, v.serving_id), (1, 1));
        assert!(Arc::ptr_eq(&v.serving, &new));
    }

    #[test]
    fn rotator_reissues_own_certificates_before_pushing_the_smaller_bundle() {
        let dir = tempfile::tempdir().unwrap();
        let registry = Arc::new(
            Registry::connect(&crate::registry::Database::Sqlite(dir.path().join("s.db"))).unwrap(),
        );
        let now = SystemTime::now();
        let old = root(now);
        let new = root(now);
        let ttl = Duration::from_secs(600);
        let mut schedule = CaSchedule::new(Arc::clone(&old), ttl);
        schedule.add(ScheduledCa {
            id: 1,
            ca: Arc::clone(&new),
            prepared_at: t(0),
            activate_at: t(100),
        });
        let (bundle_tx, bundle_rx) = watch::channel(Arc::new(old.bundle().clone()));
        let serving = Arc::new(ArcSwap::from(Arc::clone(&old)));
        // What the hook saw: the number of roots in the bundle clients had at that moment.
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let hook: ServingHook = {
            let (seen, serving, rx) = (Arc::clone(&seen), Arc::clone(&serving), bundle_rx.clone());
            Box::new(move || {
                let same = Arc::ptr_eq(&serving.load_full(), &new);
                seen.lock().unwrap().push((same, rx.borrow().roots().len()));
            })
        };
        let audit = Arc::new(AuditLog::open(&dir.path().join("audit.log")).unwrap());
        let mut r = CaRotator::new(
            td(),
            schedule,
            registry,
            CaOutputs {
                signer: Arc::new(ArcSwap::from(Arc::clone(&old))),
                serving,
                on_serving_change: hook,
                bundle_tx,
                listener_bundle: Arc::new(ArcSwap::from_pointee(old.bundle().clone())),
                bundle_path: dir.path().join("bundle.pem"),
                status: Arc::new(ArcSwap::from_pointee(Vec::new())),
            },
            Arc::new(ControlMetrics::new()),
            audit,
        );
        r.refresh(t(50));
        r.refresh(t(101));
        assert!(
            seen.lock().unwrap().is_empty(),
            "no switch before retirement"
        );
        let until = 100 + ttl.as_secs() + RETIRE_SKEW.as_secs();
        r.refresh(t(until + 1));
        // Called once, with the new CA in place, while clients still had both roots.
        assert_eq!(*seen.lock().unwrap(), [(true, 2)]);
        assert_eq!(bundle_rx.borrow().roots().len(), 1);
    }

    #[test]
    fn same_root_is_listed_once() {
        let now = SystemTime::now();
        let a = root(now);
        let mut s = CaSchedule::new(Arc::clone(&a), Duration::from_secs(60));
        s.add(ScheduledCa {
            id: 1,
            ca: Arc::clone(&a),
            prepared_at: now,
            activate_at: now,
        });
        let v = s.view(&td(), now + Duration::from_secs(1)).unwrap();
        assert_eq!(v.bundle.roots().len(), 1);
        assert_eq!(v.signer_id, 1);
    }

    #[test]
    fn base_ca_is_active_before_any_rotation() {
        let s = CaSchedule::new(root(SystemTime::now()), Duration::from_secs(60));
        let v = s.view(&td(), UNIX_EPOCH + Duration::from_secs(1)).unwrap();
        assert_eq!(v.signer_id, 0);
    }
}
