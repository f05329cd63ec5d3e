//! The audit log: one JSON line per issuance and per rejected attestation.
//! Never a key or a token: only identities, serials, times, attestor and peer address.

use std::net::SocketAddr;
use std::path::Path;
use std::time::SystemTime;

/// One audit event.
#[derive(Debug, Clone)]
pub enum AuditEvent {
    /// An SVID was issued.
    Issued {
        /// Identity.
        spiffe_id: String,
        /// Leaf serial, hex.
        serial_hex: String,
        /// Leaf notAfter.
        not_after: SystemTime,
        /// `k8s`, `join_token`, `svid`.
        attestor: &'static str,
        /// Caller address.
        peer: Option<SocketAddr>,
    },
    /// An attestation was refused.
    Rejected {
        /// Stable reason label.
        reason: &'static str,
        /// Human message (never contains the credential).
        detail: String,
        /// Attestor, if one was chosen.
        attestor: Option<&'static str>,
        /// Caller address.
        peer: Option<SocketAddr>,
    },
}

/// Append-only JSON-lines file (created 0600). Writes are serialized by a mutex; a write
/// error is returned so the caller can count it, never panics.
pub struct AuditLog {
    file: std::sync::Mutex<std::fs::File>,
}

impl AuditLog {
    /// Opens (creating 0600) `path` for appending.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        todo!("{}", path.display())
    }

    /// Appends one line: `{"time":"<RFC3339>","event":"issued"|"rejected",...}`.
    pub fn record(&self, event: &AuditEvent, now: SystemTime) -> std::io::Result<()> {
        todo!("{event:?} {now:?} {:?}", self.file.lock().is_ok())
    }
}
