//! The certificate authority: holds the signing key in memory and issues X.509-SVIDs.
//!
//! X509-SVID spec (section 4): the leaf "MUST contain exactly one URI SAN", its basic
//! constraints "MUST NOT" set cA, key usage "MUST" include digitalSignature and "MUST NOT"
//! include keyCertSign or cRLSign. Trellis adds serverAuth + clientAuth EKUs so one SVID serves
//! both directions.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use thiserror::Error;
use trellis_identity::{SpiffeId, Svid, TrustBundle, TrustDomain};

use crate::registry::Registry;

/// CA setup and issuance failures; each names the file and what to do.
#[derive(Debug, Error)]
pub enum CaError {
    /// A CA file could not be read.
    #[error("{path}: cannot read: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A CA file could not be written.
    #[error("{path}: cannot write: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A CA file's content is wrong (not PEM, not a CA, key mismatch, …).
    #[error("{path}: {problem}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong and what to do.
        problem: String,
    },
    /// Signing failed.
    #[error("cannot sign certificate: {0}")]
    Sign(String),
    /// The state database failed.
    #[error(transparent)]
    Registry(#[from] crate::registry::RegistryError),
}

/// Files written by `trellis ca init`.
#[derive(Debug, Clone)]
pub struct OfflineCaFiles {
    /// Root certificate (also the bundle).
    pub root_cert: PathBuf,
    /// Root key: keep offline.
    pub root_key: PathBuf,
    /// Intermediate certificate for `--ca-cert`.
    pub intermediate_cert: PathBuf,
    /// Intermediate key for `--ca-key`.
    pub intermediate_key: PathBuf,
    /// Trust bundle (the root), for `--ca-bundle` and sidecars.
    pub bundle: PathBuf,
}

/// A signing CA: key in memory, its chain, and the bundle it chains to.
pub struct Ca {
    trust_domain: TrustDomain,
    bundle: TrustBundle,
}

impl Ca {
    /// The embedded default: loads the CA kept in the registry, or creates a self-signed root
    /// for `td` (P-256, 10 years) and stores it there on first start.
    pub fn load_or_create(registry: &Registry, td: &TrustDomain) -> Result<Self, CaError> {
        todo!("{td}")
    }

    /// Signs with an operator-supplied intermediate. `cert` holds the intermediate (and
    /// optionally its parents); `bundle` the roots (defaults to the last certificate in `cert`
    /// if it is self-signed). Checks: parses, is a CA, key matches, chains to the bundle, valid now.
    pub fn from_files(
        td: &TrustDomain,
        cert: &Path,
        key: &Path,
        bundle: Option<&Path>,
    ) -> Result<Self, CaError> {
        todo!("{td} {} {} {bundle:?}", cert.display(), key.display())
    }

    /// `trellis ca init`: an offline root and an intermediate under `out` (keys 0600, dir 0700).
    pub fn init_offline(td: &TrustDomain, out: &Path) -> Result<OfflineCaFiles, CaError> {
        todo!("{td} {}", out.display())
    }

    /// The trust domain this CA issues for.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The bundle that verifies what this CA issues.
    pub fn bundle(&self) -> &TrustBundle {
        &self.bundle
    }

    /// The signing certificate's notAfter.
    pub fn not_after(&self) -> SystemTime {
        todo!()
    }

    /// Issues an SVID for `id` with a fresh P-256 key made here, valid from one minute before
    /// `now` (clock skew) until `now + ttl`, capped at the CA's own expiry.
    /// Chain: leaf, then the signing certificate (and its parents below the root).
    pub fn issue(&self, id: &SpiffeId, ttl: Duration, now: SystemTime) -> Result<Svid, CaError> {
        todo!("{id} {ttl:?} {now:?}")
    }
}
