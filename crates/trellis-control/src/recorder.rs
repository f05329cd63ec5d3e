//! Issuance records go to the registry (SQLite, or the PostgreSQL that replicas share) from
//! one background thread, batched: a rotation wave of thousands of SVIDs costs a handful of
//! transactions (fsyncs, or round trips), not one per SVID.
//!
//! The same thread prunes the table, once at start and then hourly: records of SVIDs that
//! expired more than a retention period ago are deleted, so the table stays bounded by the
//! issuance rate times (SVID TTL + retention). The audit log remains the long-term record.
//!
//! While the database is unavailable (server down, disk full), a batch is kept and retried
//! with backoff, never dropped; records queue behind it, and once the queue is full,
//! issuing waits for the database rather than lose a record.

use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::db_health::{DbHealth, DbOp};
use crate::registry::{IssuanceRecord, Registry};

/// How long issuance records are kept after their SVID expired, unless configured otherwise:
/// a week, long enough to look back at a past incident with `issuances` next to the audit log.
pub const DEFAULT_ISSUANCE_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

/// How often expired issuance records are pruned (and once when the recorder starts).
pub const PRUNE_INTERVAL: Duration = Duration::from_secs(3600);

/// Most records written in one transaction.
const MAX_BATCH: usize = 1024;
/// Records queued before `record` reports back-pressure. The queue is allocated (and every
/// slot written) when the recorder starts, so it is resident for the life of the process:
/// 65,536 slots were 10 MiB of an idle control plane's RSS. Eight batches is ample: the
/// writer empties a batch per transaction (a few ms), far faster than SVIDs are signed. A
/// slot holds a boxed record (16 bytes with its stamp, not ~320), so the queue is 128 KiB
/// rather than 2.6 MiB; the box is one allocation beside an issuance's signature.
const QUEUE: usize = 8 * MAX_BATCH;
/// First and longest wait before writing a batch again while the database is unavailable.
const RETRY_FIRST: Duration = Duration::from_millis(250);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// Hands issuance records to the writer thread.
#[derive(Clone)]
pub struct IssuanceRecorder {
    tx: SyncSender<Box<IssuanceRecord>>,
}

impl IssuanceRecorder {
    /// Starts the writer thread; it ends when every `IssuanceRecorder` clone is dropped.
    /// Every [`PRUNE_INTERVAL`], starting now, it deletes records of SVIDs that expired more
    /// than `retention` ago ([`DEFAULT_ISSUANCE_RETENTION`] unless configured).
    /// Write failures and recoveries are reported to `health`.
    pub fn spawn(
        registry: Arc<Registry>,
        retention: Duration,
        health: Arc<DbHealth>,
    ) -> std::io::Result<(Self, JoinHandle<()>)> {
        Self::spawn_pruning_every(registry, retention, PRUNE_INTERVAL, health)
    }

    fn spawn_pruning_every(
        registry: Arc<Registry>,
        retention: Duration,
        interval: Duration,
        health: Arc<DbHealth>,
    ) -> std::io::Result<(Self, JoinHandle<()>)> {
        let (tx, rx) = sync_channel(QUEUE);
        let pruning = Pruning {
            retention,
            interval,
        };
        let handle = std::thread::Builder::new()
            .name("trellis-recorder".into())
            .spawn(move || write_loop(&registry, &rx, &pruning, &health))?;
        Ok((Self { tx }, handle))
    }

    /// Queues a record. Blocks only when the queue is full (the database is far behind);
    /// call from blocking context.
    pub fn record(&self, rec: IssuanceRecord) {
        match self.tx.try_send(Box::new(rec)) {
            Ok(()) => {}
            Err(TrySendError::Full(rec)) => {
                tracing::warn!("issuance record queue full; waiting for the database");
                let _ = self.tx.send(rec);
            }
            Err(TrySendError::Disconnected(_)) => {
                tracing::error!("issuance recorder stopped; record lost")
            }
        }
    }
}

/// How long records are kept, and how often the writer thread prunes.
struct Pruning {
    retention: Duration,
    interval: Duration,
}

impl Pruning {
    /// Deletes the records past retention. A failure is logged and retried at the next
    /// interval: records are never lost by it, the table only stays larger for a while.
    fn run(&self, registry: &Registry) {
        // A clock before 1970 plus retention: prune nothing rather than everything.
        let cutoff = SystemTime::now()
            .checked_sub(self.retention)
            .unwrap_or(UNIX_EPOCH);
        let started = Instant::now();
        match registry.prune_issuances(cutoff) {
            Ok(0) => tracing::debug!("no expired issuance records to prune"),
            Ok(n) => tracing::info!(
                deleted = n,
                retention = %humantime::format_duration(self.retention),
                took_ms = started.elapsed().as_millis() as u64,
                "pruned expired issuance records"
            ),
            Err(e) => {
                tracing::warn!(error = %e, "cannot prune expired issuance records; trying again at the next prune")
            }
        }
    }
}

fn write_loop(
    registry: &Registry,
    rx: &Receiver<Box<IssuanceRecord>>,
    pruning: &Pruning,
    health: &DbHealth,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut next_prune = Instant::now();
    loop {
        let now = Instant::now();
        if now >= next_prune {
            pruning.run(registry);
            next_prune = Instant::now() + pruning.interval;
        }
        // Wait for records, but wake for the next prune even when none come.
        let first = match rx.recv_timeout(next_prune.saturating_duration_since(now)) {
            Ok(rec) => rec,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => break,
        };
        batch.push(*first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(rec) => batch.push(*rec),
                Err(_) => break,
            }
        }
        write_batch(registry, &batch, health);
        batch.clear();
    }
}

/// Writes `batch`, retrying with backoff for as long as the database is unavailable (the
/// records wait in memory; nothing is half-written, each attempt is one transaction). A
/// failure that retrying cannot fix (a corrupt or foreign schema) is logged and the batch
/// dropped: the audit log still has every issuance.
fn write_batch(registry: &Registry, batch: &[IssuanceRecord], health: &DbHealth) {
    let mut wait = RETRY_FIRST;
    let mut attempts = 0u32;
    loop {
        match registry.record_issuances(batch) {
            Ok(()) => {
                health.succeeded(DbOp::Write);
                if attempts > 0 {
                    tracing::info!(
                        records = batch.len(),
                        attempts = attempts + 1,
                        "issuance records written after the state database came back"
                    );
                }
                return;
            }
            Err(e) if e.is_unavailable() => {
                health.failed(DbOp::Write, &e);
                if attempts == 0 {
                    tracing::warn!(error = %e, records = batch.len(), "cannot record issuances yet; keeping them and retrying");
                }
                attempts += 1;
                std::thread::sleep(wait);
                wait = (wait * 2).min(RETRY_MAX);
            }
            Err(e) => {
                health.failed(DbOp::Write, &e);
                tracing::error!(error = %e, records = batch.len(), "cannot record issuances; dropped (the audit log has them)");
                return;
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::metrics::ControlMetrics;
    use trellis_identity::SpiffeId;

    fn health() -> Arc<DbHealth> {
        DbHealth::new(Arc::new(ControlMetrics::new()))
    }

    fn rec(serial: usize, not_after: SystemTime) -> IssuanceRecord {
        IssuanceRecord {
            spiffe_id: SpiffeId::parse("spiffe://example.org/x").unwrap(),
            serial_hex: format!("{serial:x}"),
            not_after,
            attestor: "join_token",
            peer: None,
            issued_at: SystemTime::now(),
            log: crate::translog::test_body(&format!("{serial:02x}")),
        }
    }

    fn ago(d: Duration) -> SystemTime {
        SystemTime::now() - d
    }

    /// Polls `count` until it is `want`, for up to a minute (a loaded machine).
    fn wait_for_count(registry: &Registry, want: u64, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let n = registry.issuance_count().unwrap();
            if n == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: {n} records, want {want}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn records_reach_the_database() {
        let dir = tempfile::tempdir().unwrap();
        let registry = Arc::new(Registry::open(&dir.path().join("t.db")).unwrap());
        let (recorder, handle) =
            IssuanceRecorder::spawn(Arc::clone(&registry), DEFAULT_ISSUANCE_RETENTION, health())
                .unwrap();
        for i in 0..2500 {
            recorder.record(rec(i, SystemTime::now()));
        }
        drop(recorder);
        handle.join().unwrap();
        assert_eq!(registry.issuance_count().unwrap(), 2500);
    }

    #[test]
    fn default_retention_is_a_week_and_pruning_is_hourly() {
        assert_eq!(DEFAULT_ISSUANCE_RETENTION, Duration::from_secs(604_800));
        assert_eq!(PRUNE_INTERVAL, Duration::from_secs(3600));
    }

    /// The first prune runs when the recorder starts (the hourly interval would not come
    /// round during the test), and keeps what is inside the retention period.
    #[test]
    fn prunes_expired_records_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let registry = Arc::new(Registry::open(&dir.path().join("t.db")).unwrap());
        let hour = Duration::from_secs(3600);
        registry
            .record_issuances(&[
                rec(1, ago(3 * hour)),            // expired before the retention: pruned
                rec(2, ago(2 * hour)),            // pruned
                rec(3, ago(hour / 2)),            // expired, but within the retention: kept
                rec(4, SystemTime::now() + hour), // still valid: kept
            ])
            .unwrap();
        let (recorder, handle) =
            IssuanceRecorder::spawn(Arc::clone(&registry), hour, health()).unwrap();
        wait_for_count(&registry, 2, "after the start prune");
        // Recording still works after a prune.
        recorder.record(rec(5, SystemTime::now()));
        wait_for_count(&registry, 3, "after one more record");
        drop(recorder);
        handle.join().unwrap();
    }

    /// With a short interval, records that expire while the recorder runs are pruned by a
    /// later round, with no new records arriving to wake the thread.
    #[test]
    fn prunes_again_every_interval() {
        let dir = tempfile::tempdir().unwrap();
        let registry = Arc::new(Registry::open(&dir.path().join("t.db")).unwrap());
        let retention = Duration::from_secs(60);
        let (recorder, handle) = IssuanceRecorder::spawn_pruning_every(
            Arc::clone(&registry),
            retention,
            Duration::from_millis(50),
            health(),
        )
        .unwrap();
        let started = Instant::now();
        for round in 0..3 {
            // Written directly, not through the recorder: only a prune round removes the
            // old record, and no queued record wakes the thread.
            registry
                .record_issuances(&[rec(round, ago(retention * 2)), rec(99, SystemTime::now())])
                .unwrap();
            wait_for_count(&registry, round as u64 + 1, "after a periodic prune");
        }
        eprintln!(
            "3 periodic prunes observed in {:?} (interval 50 ms)",
            started.elapsed()
        );
        drop(recorder);
        handle.join().unwrap();
    }
}
