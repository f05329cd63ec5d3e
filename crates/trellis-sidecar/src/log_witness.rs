//! The sidecar as a witness of the control plane's transparency log.
//!
//! With every SDS update the control plane sends its latest signed tree head
//! (`trellis-log-head`); [`trellis_transparency::Witness`] checks the signature with the key
//! pinned at first sight and the consistency with the last head accepted. What is found here
//! is evidence for operators (an ERROR line, `trellis_log_witness_alarms_total{kind}`, a
//! warning in `/ready` and `/certs`), never a reason to refuse an SVID or drop traffic: a
//! witness that could stop the mesh would be a switch for an attacker to pull.

use std::sync::{Arc, Mutex};

use arc_swap::ArcSwapOption;
use trellis_transparency::{Witness, WitnessAlarm, Witnessed};

use crate::metrics::{AlarmLabel, SidecarMetrics};

/// The first alarm raised, kept until the process restarts: a fork stays a fork.
#[derive(Debug)]
pub struct LogAlarm {
    /// `rollback`, `fork`, …
    pub kind: &'static str,
    /// What was wrong, for `/ready` and `/certs`.
    pub message: String,
}

/// The witness state of one sidecar, shared by the SDS client and the admin endpoint.
pub struct LogWitness {
    witness: Mutex<Witness>,
    alarm: ArcSwapOption<LogAlarm>,
    metrics: Arc<SidecarMetrics>,
}

impl std::fmt::Debug for LogWitness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogWitness")
            .field("witnessed_size", &self.witnessed_size())
            .field("alarm", &self.alarm.load())
            .finish()
    }
}

impl LogWitness {
    /// A witness that has seen no head yet.
    pub fn new(metrics: Arc<SidecarMetrics>) -> Self {
        Self {
            witness: Mutex::new(Witness::new()),
            alarm: ArcSwapOption::empty(),
            metrics,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Witness> {
        // Only the SDS client writes; a panic mid-observe leaves the last accepted head.
        self.witness
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The size of the last head accepted (what the control plane must prove consistency from).
    pub fn witnessed_size(&self) -> Option<u64> {
        self.lock().last().map(|h| h.tree_size)
    }

    /// The first alarm, if any.
    pub fn alarm(&self) -> Option<Arc<LogAlarm>> {
        self.alarm.load_full()
    }

    /// Checks one `trellis-log-head` resource; logs and counts what it finds.
    pub fn observe(&self, json: &[u8]) {
        let result = self.lock().observe_json(json);
        match result {
            Ok(Witnessed::Accepted(head)) => {
                self.metrics
                    .log_witnessed_size
                    .set(i64::try_from(head.tree_size).unwrap_or(i64::MAX));
                tracing::debug!(tree_size = head.tree_size, "transparency log head verified");
            }
            Ok(Witnessed::Unchanged) => {}
            Ok(Witnessed::Unproven { from, ours }) => {
                tracing::debug!(
                    ?from,
                    ours,
                    "transparency log head not proven from our size yet; keeping the last one"
                );
            }
            Err(alarm) => self.raise(&alarm),
        }
    }

    fn raise(&self, alarm: &WitnessAlarm) {
        let kind = alarm.kind();
        self.metrics
            .log_witness_alarms
            .get_or_create(&AlarmLabel { kind })
            .inc();
        tracing::error!(
            kind,
            "transparency log alarm: {alarm}; the control plane's issuance log cannot be trusted: investigate (traffic is not affected)"
        );
        if self.alarm.load().is_none() {
            self.alarm.store(Some(Arc::new(LogAlarm {
                kind,
                message: alarm.to_string(),
            })));
        }
    }

    /// `/certs`' `transparency_log`: what was witnessed, and the alarm if any.
    pub fn to_json(&self) -> serde_json::Value {
        let last = self.lock().last().copied();
        serde_json::json!({
            "witnessed_size": last.map(|h| h.tree_size),
            "witnessed_timestamp_ms": last.map(|h| h.timestamp_ms),
            "alarm": self.alarm().map(|a| serde_json::json!({"kind": a.kind, "message": a.message})),
        })
    }
}
