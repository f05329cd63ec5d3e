//! Whether the state database answers, as the control plane last saw it: fed by the CA
//! rotator's once-a-second read of scheduled rotations and by the issuance recorder's
//! writes; shown by `/ready` (as text: the replica stays ready, see below), the
//! `trellis_database_up` gauge and `trellis_database_errors_total{op}`.
//!
//! Readiness is not withdrawn while the database is away: every replica of a trust domain
//! shares it, so an unready signal would take all of them out of the Service at once, while
//! they can still do what running workloads need (re-attest by SVID and rotate: issuance
//! records are queued and written once the database is back). Only join-token redemption
//! stops, and it answers `UNAVAILABLE` so callers retry.

use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwapOption;
use trellis_serve::time::rfc3339;

use crate::metrics::ControlMetrics;
use crate::registry::RegistryError;

/// What the control plane was doing with the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DbOp {
    /// Reading (the CA rotator's poll).
    Read,
    /// Writing (issuance records).
    Write,
}

impl DbOp {
    /// `read` or `write`, the metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            DbOp::Read => "read",
            DbOp::Write => "write",
        }
    }
}

/// An ongoing failure of one kind of operation.
#[derive(Debug, Clone)]
pub struct DbOutage {
    /// When the first failure of this run was seen.
    pub since: SystemTime,
    /// The latest error.
    pub error: String,
}

/// The database's health as last seen; cheap to update from any thread.
pub struct DbHealth {
    read: ArcSwapOption<DbOutage>,
    write: ArcSwapOption<DbOutage>,
    metrics: Arc<ControlMetrics>,
}

impl DbHealth {
    /// Healthy until told otherwise.
    pub fn new(metrics: Arc<ControlMetrics>) -> Arc<Self> {
        metrics.database_up.set(1);
        Arc::new(Self {
            read: ArcSwapOption::empty(),
            write: ArcSwapOption::empty(),
            metrics,
        })
    }

    fn slot(&self, op: DbOp) -> &ArcSwapOption<DbOutage> {
        match op {
            DbOp::Read => &self.read,
            DbOp::Write => &self.write,
        }
    }

    /// `op` succeeded: ends an outage of that kind (logged once, with its length).
    pub fn succeeded(&self, op: DbOp) {
        if let Some(was) = self.slot(op).swap(None) {
            let lasted = SystemTime::now()
                .duration_since(was.since)
                .unwrap_or_default();
            tracing::info!(
                op = op.as_str(),
                after_ms = lasted.as_millis() as u64,
                "state database answers again"
            );
        }
        self.update_gauge();
    }

    /// `op` failed with `e`: starts (logged once) or continues an outage.
    pub fn failed(&self, op: DbOp, e: &RegistryError) {
        self.metrics.database_error(op.as_str());
        let error = e.to_string();
        let slot = self.slot(op);
        let since = match slot.load_full() {
            Some(was) => was.since,
            None => {
                tracing::error!(op = op.as_str(), error = %error, "state database unavailable: join tokens cannot be redeemed; issuance records are queued until it is back");
                SystemTime::now()
            }
        };
        slot.store(Some(Arc::new(DbOutage { since, error })));
        self.update_gauge();
    }

    fn update_gauge(&self) {
        let up = self.read.load().is_none() && self.write.load().is_none();
        self.metrics.database_up.set(i64::from(up));
    }

    /// The ongoing outages, oldest kind first; empty when the database answers.
    pub fn outages(&self) -> Vec<(DbOp, Arc<DbOutage>)> {
        [DbOp::Read, DbOp::Write]
            .into_iter()
            .filter_map(|op| self.slot(op).load_full().map(|o| (op, o)))
            .collect()
    }

    /// One line per outage for `/ready`, or `None` when healthy.
    pub fn describe(&self) -> Option<String> {
        let outages = self.outages();
        if outages.is_empty() {
            return None;
        }
        let lines: Vec<String> = outages
            .iter()
            .map(|(op, o)| {
                format!(
                    "state database {}s failing since {}: {}",
                    op.as_str(),
                    rfc3339(o.since),
                    o.error
                )
            })
            .collect();
        Some(lines.join("\n"))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn err() -> RegistryError {
        RegistryError::Unavailable {
            target: "postgres://trellis:***@db/trellis".into(),
        }
    }

    #[test]
    fn an_outage_starts_on_failure_and_ends_on_success_of_the_same_kind() {
        let metrics = Arc::new(ControlMetrics::new());
        let h = DbHealth::new(Arc::clone(&metrics));
        assert!(h.describe().is_none());
        assert_eq!(metrics.database_up.get(), 1);
        h.failed(DbOp::Write, &err());
        let first = h.outages()[0].1.since;
        h.failed(DbOp::Write, &err());
        assert_eq!(h.outages()[0].1.since, first, "the outage keeps its start");
        assert_eq!(metrics.database_up.get(), 0);
        // A read succeeding does not end a write outage (a read-only SQLite file reads fine).
        h.succeeded(DbOp::Read);
        assert_eq!(metrics.database_up.get(), 0);
        let text = h.describe().unwrap();
        assert!(
            text.starts_with("state database writes failing since "),
            "{text}"
        );
        assert!(text.contains("connection thread stopped"), "{text}");
        h.succeeded(DbOp::Write);
        assert!(h.describe().is_none());
        assert_eq!(metrics.database_up.get(), 1);
        assert!(metrics
            .encode()
            .contains("trellis_database_errors_total{op=\"write\"} 2"));
    }
}
