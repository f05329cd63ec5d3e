//! The canonical, versioned encoding of a log entry. Leaf hashes are taken over these bytes,
//! so the encoding is fixed forever for a version: big-endian integers, length-prefixed
//! strings, no optional fields, nothing after the last field.
//!
//! ```text
//! entry   = version:u8 (=1) kind:u8 index:u64 time_ms:u64 body
//! kind 1  = issuance: serial:opaque8 spiffe_id:opaque16 public_key_sha256:[32]
//!           not_before:i64 not_after:i64 issuer_key_id:opaque8 attestation:opaque8
//! kind 2  = CA phase: ca_sha256:[32] ca_key_id:opaque8 phase:opaque8
//! ```
//! The entry carries its own index so that a swapped or removed entry is named by the
//! audit, not just noticed as a wrong root somewhere in a range.

/// The encoding version this crate writes and reads.
pub const ENTRY_VERSION: u8 = 1;

const KIND_ISSUANCE: u8 = 1;
const KIND_CA_PHASE: u8 = 2;

/// Why bytes are not a valid entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EntryError {
    /// The first byte is not a version this build reads.
    #[error("entry version {0} is unknown (this build reads version {ENTRY_VERSION})")]
    UnknownVersion(u8),
    /// The kind byte names no entry kind.
    #[error("entry kind {0} is unknown")]
    UnknownKind(u8),
    /// The bytes end inside a field.
    #[error("entry is truncated in field `{0}`")]
    Truncated(&'static str),
    /// Bytes follow the last field.
    #[error("entry has {0} bytes after its last field")]
    TrailingBytes(usize),
    /// A text field is not UTF-8.
    #[error("field `{0}` is not UTF-8")]
    NotUtf8(&'static str),
    /// A field is longer than its length prefix can say.
    #[error("field `{0}` is too long to encode")]
    TooLong(&'static str),
}

/// One issued X.509 SVID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuanceEntry {
    /// Certificate serial number (big-endian bytes as in the certificate).
    pub serial: Vec<u8>,
    /// The SPIFFE ID in the URI SAN.
    pub spiffe_id: String,
    /// SHA-256 of the subject public key info (DER).
    pub public_key_sha256: [u8; 32],
    /// notBefore, Unix seconds.
    pub not_before: i64,
    /// notAfter, Unix seconds.
    pub not_after: i64,
    /// The issuing CA's key identifier (the leaf's authority key identifier, which is the
    /// CA certificate's subject key identifier): names the CA across re-issued certificates.
    pub issuer_key_id: Vec<u8>,
    /// How the workload was attested (`k8s_psat`, `join_token`, `control` …).
    pub attestation: String,
}

/// A CA changing phase (created, prepared, active, retired …).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaPhaseEntry {
    /// SHA-256 of the CA certificate (DER).
    pub ca_sha256: [u8; 32],
    /// The CA's subject key identifier (what issuance entries name as their issuer).
    pub ca_key_id: Vec<u8>,
    /// The phase it entered.
    pub phase: String,
}

/// What a log entry records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogBody {
    /// An SVID was issued.
    Issuance(IssuanceEntry),
    /// A CA changed phase.
    CaPhase(CaPhaseEntry),
}

/// One entry of the log: its position, when it was appended and what it records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogEntry {
    /// Position in the log, from 0.
    pub index: u64,
    /// When it was appended, Unix milliseconds.
    pub time_ms: u64,
    /// What it records.
    pub body: LogBody,
}

impl LogEntry {
    /// The canonical bytes (what the leaf hash covers).
    pub fn encode(&self) -> Result<Vec<u8>, EntryError> {
        Self::encode_parts(self.index, self.time_ms, &self.body)
    }

    /// The canonical bytes of an entry made of these parts, without assembling one.
    pub fn encode_parts(index: u64, time_ms: u64, body: &LogBody) -> Result<Vec<u8>, EntryError> {
        let mut out = Vec::with_capacity(160);
        out.push(ENTRY_VERSION);
        out.push(match body {
            LogBody::Issuance(_) => KIND_ISSUANCE,
            LogBody::CaPhase(_) => KIND_CA_PHASE,
        });
        out.extend_from_slice(&index.to_be_bytes());
        out.extend_from_slice(&time_ms.to_be_bytes());
        match body {
            LogBody::Issuance(e) => {
                put8(&mut out, "serial", &e.serial)?;
                put16(&mut out, "spiffe_id", e.spiffe_id.as_bytes())?;
                out.extend_from_slice(&e.public_key_sha256);
                out.extend_from_slice(&e.not_before.to_be_bytes());
                out.extend_from_slice(&e.not_after.to_be_bytes());
                put8(&mut out, "issuer_key_id", &e.issuer_key_id)?;
                put8(&mut out, "attestation", e.attestation.as_bytes())?;
            }
            LogBody::CaPhase(e) => {
                out.extend_from_slice(&e.ca_sha256);
                put8(&mut out, "ca_key_id", &e.ca_key_id)?;
                put8(&mut out, "phase", e.phase.as_bytes())?;
            }
        }
        Ok(out)
    }

    /// Parses canonical bytes; anything else (unknown version, trailing bytes) is refused.
    pub fn decode(bytes: &[u8]) -> Result<Self, EntryError> {
        let mut r = Reader(bytes);
        let version = r.u8("version")?;
        if version != ENTRY_VERSION {
            return Err(EntryError::UnknownVersion(version));
        }
        let kind = r.u8("kind")?;
        let index = u64::from_be_bytes(r.array("index")?);
        let time_ms = u64::from_be_bytes(r.array("time_ms")?);
        let body = match kind {
            KIND_ISSUANCE => LogBody::Issuance(IssuanceEntry {
                serial: r.opaque8("serial")?.to_vec(),
                spiffe_id: r.text16("spiffe_id")?,
                public_key_sha256: r.array("public_key_sha256")?,
                not_before: i64::from_be_bytes(r.array("not_before")?),
                not_after: i64::from_be_bytes(r.array("not_after")?),
                issuer_key_id: r.opaque8("issuer_key_id")?.to_vec(),
                attestation: r.text8("attestation")?,
            }),
            KIND_CA_PHASE => LogBody::CaPhase(CaPhaseEntry {
                ca_sha256: r.array("ca_sha256")?,
                ca_key_id: r.opaque8("ca_key_id")?.to_vec(),
                phase: r.text8("phase")?,
            }),
            other => return Err(EntryError::UnknownKind(other)),
        };
        if !r.0.is_empty() {
            return Err(EntryError::TrailingBytes(r.0.len()));
        }
        Ok(Self {
            index,
            time_ms,
            body,
        })
    }
}

fn put8(out: &mut Vec<u8>, field: &'static str, bytes: &[u8]) -> Result<(), EntryError> {
    let len = u8::try_from(bytes.len()).map_err(|_| EntryError::TooLong(field))?;
    out.push(len);
    out.extend_from_slice(bytes);
    Ok(())
}

fn put16(out: &mut Vec<u8>, field: &'static str, bytes: &[u8]) -> Result<(), EntryError> {
    let len = u16::try_from(bytes.len()).map_err(|_| EntryError::TooLong(field))?;
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(bytes);
    Ok(())
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, field: &'static str, n: usize) -> Result<&'a [u8], EntryError> {
        if self.0.len() < n {
            return Err(EntryError::Truncated(field));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u8(&mut self, field: &'static str) -> Result<u8, EntryError> {
        Ok(self.take(field, 1)?[0])
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], EntryError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(field, N)?);
        Ok(out)
    }

    fn opaque8(&mut self, field: &'static str) -> Result<&'a [u8], EntryError> {
        let n = self.u8(field)? as usize;
        self.take(field, n)
    }

    fn text8(&mut self, field: &'static str) -> Result<String, EntryError> {
        let bytes = self.opaque8(field)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| EntryError::NotUtf8(field))
    }

    fn text16(&mut self, field: &'static str) -> Result<String, EntryError> {
        let n = u16::from_be_bytes(self.array(field)?) as usize;
        let bytes = self.take(field, n)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| EntryError::NotUtf8(field))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn issuance() -> LogEntry {
        LogEntry {
            index: 41,
            time_ms: 1_765_000_000_123,
            body: LogBody::Issuance(IssuanceEntry {
                serial: vec![0x01, 0xab, 0xcd],
                spiffe_id: "spiffe://example.org/ns/prod/sa/web".into(),
                public_key_sha256: [7; 32],
                not_before: 1_765_000_000,
                not_after: 1_765_086_400,
                issuer_key_id: vec![9; 20],
                attestation: "k8s_psat".into(),
            }),
        }
    }

    #[test]
    fn entries_round_trip_through_their_canonical_bytes() {
        let phase = LogEntry {
            index: 0,
            time_ms: 5,
            body: LogBody::CaPhase(CaPhaseEntry {
                ca_sha256: [3; 32],
                ca_key_id: vec![4; 20],
                phase: "active".into(),
            }),
        };
        for entry in [issuance(), phase] {
            let bytes = entry.encode().unwrap();
            assert_eq!(LogEntry::decode(&bytes).unwrap(), entry);
        }
    }

    #[test]
    fn the_encoding_is_fixed() {
        // Leaf hashes are over these bytes: a change here breaks every existing log.
        let bytes = issuance().encode().unwrap();
        assert_eq!(&bytes[..2], &[1, 1]);
        assert_eq!(&bytes[2..10], &41u64.to_be_bytes());
        assert_eq!(
            bytes.len(),
            2 + 8 + 8 + 1 + 3 + 2 + 35 + 32 + 8 + 8 + 1 + 20 + 1 + 8
        );
    }

    #[test]
    fn non_canonical_bytes_are_refused_with_the_field() {
        let bytes = issuance().encode().unwrap();
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(LogEntry::decode(&longer), Err(EntryError::TrailingBytes(1)));
        assert_eq!(
            LogEntry::decode(&bytes[..bytes.len() - 1]),
            Err(EntryError::Truncated("attestation"))
        );
        let mut v2 = bytes.clone();
        v2[0] = 2;
        assert_eq!(LogEntry::decode(&v2), Err(EntryError::UnknownVersion(2)));
        let mut kind = bytes;
        kind[1] = 9;
        assert_eq!(LogEntry::decode(&kind), Err(EntryError::UnknownKind(9)));
        assert_eq!(LogEntry::decode(&[]), Err(EntryError::Truncated("version")));
    }
}
