//! The issuance transparency log of the control plane: every issued SVID and every CA phase
//! change is an entry (appended by the registry in the transaction that records it), and
//! this module keeps the Merkle tree over the stored entries, signs a tree head whenever the
//! log has grown (at most every `interval`, one second by default), and answers proofs for
//! the admin endpoint (`/log/*`, see [`admin`]).
//!
//! Replicas on PostgreSQL each follow the one shared log: they read new leaf hashes in index
//! order, so their trees agree, and a head's size is its primary key, so the first replica to
//! sign a size wins and the others adopt its head after checking it against their own tree
//! (a mismatch is a fork: counted, logged, never signed over).

pub mod admin;
mod facts;

use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use aws_lc_rs::encoding::AsDer as _;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{EcdsaKeyPair, KeyPair as _, ECDSA_P256_SHA256_ASN1_SIGNING};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::watch;
use trellis_transparency::{
    Hash, LogPublicKey, PagedMerkleTree, PagedTreeError, SignedTreeHead, TreeError, TreeHead,
};

pub use facts::{ca_phase_body, issuance_body};

use crate::keys::SigningKey;
use crate::registry::{Registry, RegistryError};

/// The log's public key in the state directory, next to `bundle.pem`.
pub const LOG_KEY_FILE: &str = "log-key.pem";

/// How often the log looks for new entries and signs a head over them, unless configured.
pub const DEFAULT_HEAD_INTERVAL: Duration = Duration::from_secs(1);

/// Leaf hashes read per query while catching up (32 bytes each: 3.2 MB per page).
const PAGE: u64 = 100_000;

/// What can go wrong with the log.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The registry could not be read or written.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The stored log key is not an ECDSA P-256 PKCS#8 key.
    #[error("the stored transparency-log key cannot be used: {0}")]
    Key(String),
    /// The stored entries do not produce a stored signed head: tampering, or a fork.
    #[error(
        "the transparency log's entries do not match its signed head for size {size}: the \
         log was tampered with or forked; run `trellis log verify` to find the first bad entry"
    )]
    Mismatch {
        /// The size of the head that disagrees.
        size: u64,
    },
    /// A proof was asked for something the log cannot prove.
    #[error(transparent)]
    Tree(#[from] TreeError),
    /// Stored leaf hashes read back for a proof are not the ones the tree was built from.
    #[error(
        "the stored leaf hashes of log entries {from}..{to} changed since this control plane \
         read them: the log was tampered with; run `trellis log verify` to find the first bad \
         entry"
    )]
    StorageChanged {
        /// First entry of the page read back.
        from: u64,
        /// One past its last entry.
        to: u64,
    },
}

impl From<PagedTreeError<RegistryError>> for LogError {
    fn from(e: PagedTreeError<RegistryError>) -> Self {
        match e {
            PagedTreeError::Tree(e) => LogError::Tree(e),
            PagedTreeError::Load { source, .. } => LogError::Registry(source),
            PagedTreeError::Mismatch { from, to } => LogError::StorageChanged { from, to },
        }
    }
}

/// The tree keeps the levels above pages of 2^8 = 256 entries, and the newest
/// [`KEEP_PAGES`] pages whole: a proof about anything older reads its page (8 KiB of leaf
/// hashes) from the registry.
const PAGE_BITS: u32 = 8;

/// 64 pages, 16,384 entries, ~1 MiB: a rotation wave of 10,000 workloads proves every SVID
/// it issued from memory.
const KEEP_PAGES: usize = 64;

/// A proof asked on an async worker needs a page that is not in memory.
#[derive(Debug, thiserror::Error)]
#[error("the page is not in memory")]
struct NotInMemory;

/// The log's metrics (`trellis_log_*`).
#[derive(Default)]
pub struct LogMetrics {
    /// `trellis_log_entries`: entries in the log.
    pub entries: Gauge,
    /// `trellis_log_heads_signed_total`: heads this replica signed and stored.
    pub heads_signed: Counter,
    /// `trellis_log_inconsistencies_total`: stored heads that disagree with the entries.
    pub inconsistencies: Counter,
    /// `trellis_log_head_age_seconds` is derived by scrapers from this: the latest head's
    /// timestamp, unix seconds.
    pub head_timestamp: Gauge,
}

impl LogMetrics {
    /// Registers the series under the `trellis` prefix of `registry`.
    pub fn register(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register(
            "log_entries",
            "Entries in the issuance transparency log",
            self.entries.clone(),
        );
        registry.register(
            "log_heads_signed",
            "Signed tree heads this replica produced",
            self.heads_signed.clone(),
        );
        registry.register(
            "log_inconsistencies",
            "Stored signed heads that do not match the log's entries (tampering or a fork)",
            self.inconsistencies.clone(),
        );
        registry.register(
            "log_head_timestamp_seconds",
            "When the latest signed tree head was produced, unix seconds",
            self.head_timestamp.clone(),
        );
    }
}

/// The public half of a stored log key (PKCS#8 DER), for verifiers that read the database.
pub fn public_key_of(pkcs8: &[u8]) -> Result<LogPublicKey, LogError> {
    let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8)
        .map_err(|e| LogError::Key(e.to_string()))?;
    let spki = pair
        .public_key()
        .as_der()
        .map_err(|e| LogError::Key(e.to_string()))?;
    LogPublicKey::from_spki_der(spki.as_ref()).map_err(|e| LogError::Key(e.to_string()))
}

/// The signing key of the log: the one in the registry, or a PKCS#11 token key.
struct LogKey {
    key: SigningKey,
    public: LogPublicKey,
}

impl LogKey {
    /// The registry's log key, made and stored now if there is none.
    fn load_or_create(registry: &Registry) -> Result<Self, LogError> {
        let generated =
            EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &SystemRandom::new())
                .map_err(|e| LogError::Key(e.to_string()))?;
        let stored = registry.log_key_or_insert(generated.as_ref())?;
        let public = public_key_of(&stored)?;
        let key = SigningKey::from_pkcs8_der(&stored).map_err(|e| LogError::Key(e.to_string()))?;
        Ok(Self { key, public })
    }

    /// A key kept elsewhere (a PKCS#11 token): nothing is stored in the registry.
    fn from_key(key: SigningKey) -> Result<Self, LogError> {
        let public = LogPublicKey::from_spki_der(&key.spki_der())
            .map_err(|e| LogError::Key(e.to_string()))?;
        Ok(Self { key, public })
    }

    fn sign(&self, head: TreeHead) -> Result<SignedTreeHead, LogError> {
        let sig = self
            .key
            .sign_der(&head.signing_input())
            .map_err(|e| LogError::Key(format!("cannot sign a tree head: {e}")))?;
        Ok(SignedTreeHead {
            head,
            key_id: self.public.key_id().to_owned(),
            signature: sig,
        })
    }
}

/// The control plane's view of the transparency log.
pub struct IssuanceLog {
    registry: Arc<Registry>,
    key: LogKey,
    /// The levels above pages of stored entries' leaf hashes, and the newest pages whole
    /// (older pages are read back for proofs). Written only by `sync`; readers (proofs) hold
    /// the read lock for microseconds, or for a page's read when they need one.
    tree: RwLock<PagedMerkleTree>,
    /// The latest signed head, for `/log/sth` and proofs.
    head: ArcSwapOption<SignedTreeHead>,
    /// The latest head's size, for SDS streams waiting for a head to cover an SVID.
    head_size: watch::Sender<u64>,
    metrics: Arc<LogMetrics>,
}

impl IssuanceLog {
    /// Loads the key and every stored leaf hash, and checks the latest stored head against
    /// them. A log whose entries do not produce its own signed head refuses to start: signing
    /// on top of tampered entries would bless them.
    pub fn open(registry: Arc<Registry>, metrics: Arc<LogMetrics>) -> Result<Arc<Self>, LogError> {
        Self::open_with_key(registry, metrics, None)
    }

    /// [`IssuanceLog::open`] signing with `key` (e.g. a PKCS#11 token key) instead of the
    /// key stored in the registry; `None`: the registry's.
    pub fn open_with_key(
        registry: Arc<Registry>,
        metrics: Arc<LogMetrics>,
        key: Option<SigningKey>,
    ) -> Result<Arc<Self>, LogError> {
        Self::open_paged(
            registry,
            metrics,
            key,
            PagedMerkleTree::new(PAGE_BITS, KEEP_PAGES),
        )
    }

    /// [`IssuanceLog::open_with_key`] over an empty `tree` of any page size (tests use tiny
    /// pages to read old ones back).
    fn open_paged(
        registry: Arc<Registry>,
        metrics: Arc<LogMetrics>,
        key: Option<SigningKey>,
        tree: PagedMerkleTree,
    ) -> Result<Arc<Self>, LogError> {
        let key = match key {
            Some(k) => LogKey::from_key(k)?,
            None => LogKey::load_or_create(&registry)?,
        };
        let log = Arc::new(Self {
            registry,
            key,
            tree: RwLock::new(tree),
            head: ArcSwapOption::empty(),
            head_size: watch::channel(0).0,
            metrics,
        });
        log.catch_up()?;
        if let Some(stored) = log.registry.latest_log_head()? {
            log.check_stored(&stored)?;
            log.publish(stored);
        }
        Ok(log)
    }

    /// The log's public key (published at `/log/key` and next to the bundle).
    pub fn public_key(&self) -> &LogPublicKey {
        &self.key.public
    }

    /// The latest signed head, if any entry was ever logged.
    pub fn latest_head(&self) -> Option<Arc<SignedTreeHead>> {
        self.head.load_full()
    }

    /// The registry the entries are read from.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Entries in the tree (may be ahead of the latest head by up to one interval).
    pub fn size(&self) -> u64 {
        self.read_tree().size()
    }

    /// The RFC 9162 inclusion proof of entry `index` in the tree of `size` entries. May read
    /// an old page of leaf hashes from the registry: call it off the async workers.
    pub fn inclusion_proof(&self, index: u64, size: u64) -> Result<Vec<Hash>, LogError> {
        Ok(self
            .read_tree()
            .inclusion_proof(index, size, |from, to| self.page(from, to))?)
    }

    /// The RFC 9162 consistency proof between two sizes. May read old pages of leaf hashes
    /// from the registry: call it off the async workers.
    pub fn consistency_proof(&self, first: u64, second: u64) -> Result<Vec<Hash>, LogError> {
        Ok(self
            .read_tree()
            .consistency_proof(first, second, |from, to| self.page(from, to))?)
    }

    /// [`IssuanceLog::consistency_proof`] for async code: from memory on the caller's
    /// worker, unless it needs an old page (a witness far behind); then on a blocking thread.
    /// `None` when it cannot be proved or the registry cannot be read.
    pub async fn consistency_proof_async(
        self: &Arc<Self>,
        first: u64,
        second: u64,
    ) -> Option<Vec<Hash>> {
        if let Some(proof) = self.consistency_proof_in_memory(first, second) {
            return Some(proof);
        }
        let log = Arc::clone(self);
        tokio::task::spawn_blocking(move || log.consistency_proof(first, second).ok())
            .await
            .ok()
            .flatten()
    }

    /// [`IssuanceLog::consistency_proof`] from memory only: `None` when it needs an old page
    /// (or cannot be proved).
    fn consistency_proof_in_memory(&self, first: u64, second: u64) -> Option<Vec<Hash>> {
        self.read_tree()
            .consistency_proof(first, second, |_, _| Err(NotInMemory))
            .ok()
    }

    /// The leaf hashes of entries `from..to`, read back from the registry.
    fn page(&self, from: u64, to: u64) -> Result<Vec<Hash>, RegistryError> {
        self.registry.log_leaf_hashes(from, to - from)
    }

    fn read_tree(&self) -> std::sync::RwLockReadGuard<'_, PagedMerkleTree> {
        // A panic while writing leaves a tree that is still a prefix of the log: usable.
        self.tree.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads entries appended since the last call into the tree.
    fn catch_up(&self) -> Result<(), LogError> {
        loop {
            let from = self.size();
            let page = self.registry.log_leaf_hashes(from, PAGE)?;
            let n = page.len() as u64;
            if n > 0 {
                let mut tree = self.tree.write().unwrap_or_else(|p| p.into_inner());
                // Another caller may have appended meanwhile: only push what is new.
                let skip = tree.size().saturating_sub(from) as usize;
                for hash in page.into_iter().skip(skip) {
                    tree.push(hash);
                }
            }
            if n < PAGE {
                self.metrics.entries.set(self.size() as i64);
                return Ok(());
            }
        }
    }

    /// Checks a stored head against the tree; a mismatch is counted and refused.
    fn check_stored(&self, stored: &SignedTreeHead) -> Result<(), LogError> {
        let size = stored.head.tree_size;
        let ours = match self
            .read_tree()
            .root_at(size, |from, to| self.page(from, to))
        {
            Ok(root) => Some(root),
            // The registry being away says nothing about the entries.
            Err(PagedTreeError::Load { source, .. }) => return Err(LogError::Registry(source)),
            Err(_) => None,
        };
        let signed_by_us = self.key.public.verify(stored).is_ok();
        if !signed_by_us || ours != Some(stored.head.root_hash) {
            self.metrics.inconsistencies.inc();
            tracing::error!(
                size,
                signed_by_log_key = signed_by_us,
                "transparency log: a stored signed head does not match the entries; run `trellis log verify`"
            );
            return Err(LogError::Mismatch { size });
        }
        Ok(())
    }

    fn publish(&self, sth: SignedTreeHead) {
        self.metrics
            .head_timestamp
            .set((sth.head.timestamp_ms / 1000) as i64);
        let size = sth.head.tree_size;
        self.head.store(Some(Arc::new(sth)));
        self.head_size.send_replace(size);
    }

    /// Follows the size of the latest signed head (changes about once per `interval` while
    /// entries arrive, never while the log is idle).
    pub fn watch_heads(&self) -> watch::Receiver<u64> {
        self.head_size.subscribe()
    }

    /// The entry of the SVID with `serial_hex` and its inclusion proof under `head`, for the
    /// workload `caller` that holds it. `None` when the head does not cover it (yet), when
    /// the log has no entry under that serial, or when the entry names another identity (a
    /// workload is shown its own entries only). The entry is sent as stored, unchecked: the
    /// sidecar is the judge of whether it describes its certificate.
    pub fn own_svid_proof(
        &self,
        serial_hex: &str,
        caller: &str,
        head: &TreeHead,
    ) -> Result<Option<trellis_transparency::OwnSvidProof>, LogError> {
        let Some(index) = self.registry.log_index_of_serial(serial_hex)? else {
            return Ok(None);
        };
        if index >= head.tree_size {
            return Ok(None);
        }
        let Some(stored) = self
            .registry
            .log_entries(index, index + 1)?
            .into_iter()
            .next()
        else {
            return Ok(None);
        };
        let for_caller = matches!(
            trellis_transparency::LogEntry::decode(&stored.bytes),
            Ok(trellis_transparency::LogEntry {
                body: trellis_transparency::LogBody::Issuance(ref e),
                ..
            }) if e.spiffe_id == caller
        );
        if !for_caller {
            // Debug only: any workload can report any serial, so this is no evidence.
            tracing::debug!(
                serial = serial_hex,
                index,
                caller,
                "the log entry stored under this serial is not an issuance to the workload that reported holding it; not shown to it"
            );
            return Ok(None);
        }
        let proof = self.inclusion_proof(index, head.tree_size)?;
        Ok(Some(trellis_transparency::OwnSvidProof {
            serial: serial_hex.to_owned(),
            index,
            entry: stored.bytes,
            proof,
        }))
    }

    /// Reads new entries and, if the log grew past the latest head, signs and stores a head
    /// for its new size (or adopts the one another replica stored first).
    pub fn sync(&self) -> Result<(), LogError> {
        self.catch_up()?;
        let size = self.size();
        let signed = self.head.load().as_ref().map_or(0, |h| h.head.tree_size);
        if size == 0 || size <= signed {
            return Ok(());
        }
        let root = self
            .read_tree()
            .root_at(size, |from, to| self.page(from, to))?;
        let timestamp_ms = u64::try_from(trellis_serve::time::unix_millis(SystemTime::now()))
            .unwrap_or(0)
            // Heads never go back in time, even if the clock does.
            .max(self.head.load().as_ref().map_or(0, |h| h.head.timestamp_ms));
        let ours = self.key.sign(TreeHead {
            tree_size: size,
            root_hash: root,
            timestamp_ms,
        })?;
        let stored = self.registry.insert_log_head(&ours)?;
        if stored == ours {
            self.metrics.heads_signed.inc();
        }
        self.check_stored(&stored)?;
        self.publish(stored);
        Ok(())
    }

    /// Syncs every `every` until `shutdown`. Failures (database away, a fork) are logged and
    /// retried: issuance goes on, the head just stops advancing until the cause is fixed.
    pub async fn run(self: Arc<Self>, every: Duration, mut shutdown: watch::Receiver<bool>) {
        let mut last_error: Option<String> = None;
        loop {
            let log = Arc::clone(&self);
            let result = tokio::task::spawn_blocking(move || log.sync()).await;
            let error = match result {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e.to_string()),
                Err(e) => Some(format!("log task failed: {e}")),
            };
            if error != last_error {
                match &error {
                    Some(e) => {
                        tracing::warn!(error = %e, "transparency log: cannot advance the signed head")
                    }
                    None if last_error.is_some() => {
                        tracing::info!("transparency log: signed heads advance again")
                    }
                    None => {}
                }
                last_error = error;
            }
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}

/// A log body for an issuance with this serial, for tests that need records, not certificates.
#[cfg(test)]
pub(crate) fn test_body(serial_hex: &str) -> trellis_transparency::LogBody {
    trellis_transparency::LogBody::Issuance(trellis_transparency::IssuanceEntry {
        serial: hex::decode(serial_hex).unwrap_or_default(),
        spiffe_id: "spiffe://example.org/x".into(),
        public_key_sha256: [0; 32],
        not_before: 0,
        not_after: 0,
        issuer_key_id: Vec::new(),
        attestation: "join_token".into(),
    })
}

#[cfg(test)]
mod tests;
