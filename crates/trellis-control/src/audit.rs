//! The audit log: one JSON line per issuance and per rejected attestation.
//! Never a key or a token: only identities, serials, times, attestor and peer address.

use std::fs::OpenOptions;
use std::io::Write as _;
use std::net::SocketAddr;
use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::Path;
use std::time::SystemTime;

use serde_json::json;
use trellis_serve::time::rfc3339;

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
    /// A JWT-SVID was issued. Never the token: its subject, audiences, key and expiry.
    JwtIssued {
        /// `sub`.
        spiffe_id: String,
        /// `aud`.
        audiences: Vec<String>,
        /// The signing key's ID.
        kid: String,
        /// `exp`.
        expires_at: SystemTime,
        /// Caller address.
        peer: Option<SocketAddr>,
    },
    /// A CA changed phase in a rotation (`prepared`, `active`, `retiring`, `retired`).
    CaPhase {
        /// 0 for the base CA, else the rotation id.
        rotation: i64,
        /// Signing certificate subject and serial.
        ca: String,
        /// The new phase.
        phase: &'static str,
    },
    /// An operator acted through the operator socket (`token_created`,
    /// `ca_rotation_scheduled`). Never the token itself.
    Operator {
        /// What was done.
        action: &'static str,
        /// On what: the token's SPIFFE ID, or the rotation's id and CA.
        subject: String,
        /// The operator process's uid (from the socket's peer credentials).
        uid: Option<u32>,
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
    path: std::path::PathBuf,
}

impl AuditLog {
    /// Opens (creating 0600) `path` for appending.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        let file = OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(path)?;
        // An existing log keeps its mode through `open`; it names every workload, so tighten it.
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        Ok(Self {
            file: std::sync::Mutex::new(file),
            path: path.to_owned(),
        })
    }

    /// The file, for error messages.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one line: `{"time":"<RFC3339>","event":"issued"|"rejected",...}`.
    pub fn record(&self, event: &AuditEvent, now: SystemTime) -> std::io::Result<()> {
        let mut line = serde_json::to_vec(&event.to_json(now)).map_err(std::io::Error::other)?;
        line.push(b'\n');
        // One write of the whole line on an O_APPEND file: concurrent writers (even another
        // process) never interleave inside a line.
        let mut file = self
            .file
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let open = file.metadata();
        // A line appended to a file that is no longer at `path` (state directory removed,
        // renamed or unmounted) is a line nobody will ever read: refuse it, so the issuance
        // it records is refused too. One stat per line, beside a ~70 µs signature.
        let same = match &open {
            Ok(o) => crate::state_dir::file_id(&self.path) == Some((o.dev(), o.ino())),
            Err(_) => false,
        };
        if !same {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "the audit log file is no longer at its path (state directory removed, renamed or unmounted?); restore it, or restart the control plane",
            ));
        }
        let before = open.map(|m| m.len());
        let written = file.write_all(&line).and_then(|()| file.flush());
        if let (Err(_), Ok(len)) = (&written, before) {
            // A full disk can take part of the line: cut it off again, so the next line starts
            // on a line of its own and no reader meets half a record. (If even that fails,
            // the torn line is the last thing before the next newline-terminated one.)
            let _ = file.set_len(len);
        }
        written
    }
}

impl AuditEvent {
    /// The JSON object written for this event. Only the fields listed here ever reach the log:
    /// there is no field for a key or a credential.
    fn to_json(&self, now: SystemTime) -> serde_json::Value {
        match self {
            AuditEvent::Issued {
                spiffe_id,
                serial_hex,
                not_after,
                attestor,
                peer,
            } => json!({
                "time": rfc3339(now),
                "event": "issued",
                "spiffe_id": spiffe_id,
                "serial": serial_hex,
                "not_after": rfc3339(*not_after),
                "attestor": attestor,
                "peer": peer.map(|p| p.to_string()),
            }),
            AuditEvent::JwtIssued {
                spiffe_id,
                audiences,
                kid,
                expires_at,
                peer,
            } => json!({
                "time": rfc3339(now),
                "event": "jwt_issued",
                "spiffe_id": spiffe_id,
                "audiences": audiences,
                "kid": kid,
                "expires_at": rfc3339(*expires_at),
                "peer": peer.map(|p| p.to_string()),
            }),
            AuditEvent::CaPhase {
                rotation,
                ca,
                phase,
            } => json!({
                "time": rfc3339(now),
                "event": "ca_phase",
                "rotation": rotation,
                "ca": ca,
                "phase": phase,
            }),
            AuditEvent::Operator {
                action,
                subject,
                uid,
            } => json!({
                "time": rfc3339(now),
                "event": action,
                "subject": subject,
                "uid": uid,
            }),
            AuditEvent::Rejected {
                reason,
                detail,
                attestor,
                peer,
            } => json!({
                "time": rfc3339(now),
                "event": "rejected",
                "reason": reason,
                "detail": detail,
                "attestor": attestor,
                "peer": peer.map(|p| p.to_string()),
            }),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    fn t0() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_700_000_000)
    }

    fn lines(path: &Path) -> Vec<serde_json::Value> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    #[test]
    fn issued_line_is_json_with_fields() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = AuditLog::open(&path).unwrap();
        log.record(
            &AuditEvent::Issued {
                spiffe_id: "spiffe://example.org/ns/a/sa/b".into(),
                serial_hex: "7f01".into(),
                not_after: t0() + Duration::from_secs(86_400),
                attestor: "k8s",
                peer: Some("10.1.2.3:4567".parse().unwrap()),
            },
            t0(),
        )
        .unwrap();
        let got = lines(&path);
        assert_eq!(got.len(), 1);
        assert_eq!(
            got[0],
            json!({
                "time": "2023-11-14T22:13:20Z",
                "event": "issued",
                "spiffe_id": "spiffe://example.org/ns/a/sa/b",
                "serial": "7f01",
                "not_after": "2023-11-15T22:13:20Z",
                "attestor": "k8s",
                "peer": "10.1.2.3:4567",
            })
        );
    }

    #[test]
    fn rejected_line_is_json_with_reason_and_one_line_per_event() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = AuditLog::open(&path).unwrap();
        let ev = AuditEvent::Rejected {
            reason: "expired",
            // A newline in a message cannot split the record: JSON escapes it.
            detail: "JWT expired\nforged line".into(),
            attestor: Some("k8s"),
            peer: None,
        };
        log.record(&ev, t0()).unwrap();
        log.record(&ev, t0()).unwrap();
        let got = lines(&path);
        assert_eq!(got.len(), 2);
        assert_eq!(got[0]["event"], "rejected");
        assert_eq!(got[0]["reason"], "expired");
        assert_eq!(got[0]["detail"], "JWT expired\nforged line");
        assert_eq!(got[0]["attestor"], "k8s");
        assert!(got[0]["peer"].is_null());
    }

    #[test]
    fn audit_file_mode_is_0600() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        drop(AuditLog::open(&path).unwrap());
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // An existing, looser file is tightened and appended to, not truncated.
        std::fs::write(&path, "{}\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let log = AuditLog::open(&path).unwrap();
        log.record(
            &AuditEvent::Rejected {
                reason: "malformed",
                detail: String::new(),
                attestor: None,
                peer: None,
            },
            t0(),
        )
        .unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(lines(&path).len(), 2);
    }
}
