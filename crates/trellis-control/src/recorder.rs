//! Issuance records go to the registry (SQLite, or the PostgreSQL that replicas share) from
//! one background thread, batched: a rotation wave of thousands of SVIDs costs a handful of
//! transactions (fsyncs, or round trips), not one per SVID.

use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::registry::{IssuanceRecord, Registry};

/// Most records written in one transaction.
const MAX_BATCH: usize = 1024;
/// Records queued before `record` reports back-pressure.
const QUEUE: usize = 65_536;

/// Hands issuance records to the writer thread.
#[derive(Clone)]
pub struct IssuanceRecorder {
    tx: SyncSender<IssuanceRecord>,
}

impl IssuanceRecorder {
    /// Starts the writer thread; it ends when every `IssuanceRecorder` clone is dropped.
    pub fn spawn(registry: Arc<Registry>) -> std::io::Result<(Self, JoinHandle<()>)> {
        let (tx, rx) = sync_channel(QUEUE);
        let handle = std::thread::Builder::new()
            .name("trellis-recorder".into())
            .spawn(move || write_loop(&registry, &rx))?;
        Ok((Self { tx }, handle))
    }

    /// Queues a record. Blocks only when the queue is full (the database is far behind);
    /// call from blocking context.
    pub fn record(&self, rec: IssuanceRecord) {
        match self.tx.try_send(rec) {
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

fn write_loop(registry: &Registry, rx: &Receiver<IssuanceRecord>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while let Ok(first) = rx.recv() {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(rec) => batch.push(rec),
                Err(_) => break,
            }
        }
        if let Err(e) = registry.record_issuances(&batch) {
            tracing::error!(error = %e, records = batch.len(), "cannot record issuances");
        }
        batch.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::SystemTime;
    use trellis_identity::SpiffeId;

    #[test]
    fn records_reach_the_database() {
        let dir = tempfile::tempdir().unwrap();
        let registry = Arc::new(Registry::open(&dir.path().join("t.db")).unwrap());
        let (recorder, handle) = IssuanceRecorder::spawn(Arc::clone(&registry)).unwrap();
        for i in 0..2500 {
            recorder.record(IssuanceRecord {
                spiffe_id: SpiffeId::parse("spiffe://example.org/x").unwrap(),
                serial_hex: format!("{i:x}"),
                not_after: SystemTime::now(),
                attestor: "join_token",
                peer: None,
                issued_at: SystemTime::now(),
            });
        }
        drop(recorder);
        handle.join().unwrap();
        assert_eq!(registry.issuance_count().unwrap(), 2500);
    }
}
