//! Identity from PEM files, for hosts without a control plane and for benchmarks: the SVID,
//! its key and the bundle are read, validated like an SDS update, and swapped into the
//! [`SvidStore`]; the files' directories are watched and a change reloads them.
//!
//! The *directories* are watched (non-recursively), not the files: an editor or `cp` that
//! writes a temporary file and renames it over the old one, and Kubernetes, which swaps a
//! `..data` symlink to a new timestamped directory, both replace the inode a file watch would
//! be attached to. Events are debounced ([`DEBOUNCE`]) so the three files of one update are
//! read together, and a set that fails validation keeps the current identity in force.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use notify::event::{AccessKind, AccessMode};
use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::{mpsc, watch};
use trellis_identity::{
    certs_from_pem, key_from_pem, PemError, Svid, SvidError, TrustBundle, TrustDomain,
};

use crate::config::FilesFile;
use crate::metrics::SidecarMetrics;
use crate::svid_store::{SvidStore, UpdateError};

/// Quiet time after the last file event before the files are read.
pub const DEBOUNCE: Duration = Duration::from_millis(200);

/// A file could not be used; names the file.
#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    /// Unreadable.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: std::path::PathBuf,
        /// I/O error.
        source: std::io::Error,
    },
    /// Content refused.
    #[error("{path}: {problem}")]
    Invalid {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong.
        problem: String,
        /// Stable label for `trellis_sds_updates_total{result}` (`bad_key`, `expired`, …).
        reason: &'static str,
    },
}

impl FilesError {
    /// Stable metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            FilesError::Read { .. } => "unreadable",
            FilesError::Invalid { reason, .. } => reason,
        }
    }

    /// The file at fault.
    pub fn path(&self) -> &Path {
        match self {
            FilesError::Read { path, .. } | FilesError::Invalid { path, .. } => path,
        }
    }
}

fn invalid(path: &Path, reason: &'static str, problem: impl Into<String>) -> FilesError {
    FilesError::Invalid {
        path: path.to_owned(),
        problem: problem.into(),
        reason,
    }
}

fn read_file(path: &Path) -> Result<Vec<u8>, FilesError> {
    std::fs::read(path).map_err(|source| FilesError::Read {
        path: path.to_owned(),
        source,
    })
}

/// The three files, parsed and checked against each other (not yet against the store).
fn read_set(files: &FilesFile, td: &TrustDomain) -> Result<(Svid, TrustBundle), FilesError> {
    let cert_pem = read_file(&files.cert)?;
    let key_pem = zeroize::Zeroizing::new(read_file(&files.key)?);
    let bundle_pem = read_file(&files.bundle)?;
    let chain = certs_from_pem(&cert_pem).map_err(|e| {
        invalid(
            &files.cert,
            "malformed",
            format!("SVID certificate chain: {e}"),
        )
    })?;
    let key = key_from_pem(&key_pem).map_err(|e| {
        // Never echo the key file's text: name the problem only.
        let what = match e {
            PemError::Missing { .. } => "no PRIVATE KEY block found",
            PemError::Malformed(_) => "malformed PEM",
        };
        invalid(&files.key, "bad_key", format!("SVID private key: {what}"))
    })?;
    let bundle = TrustBundle::from_pem(td.clone(), &bundle_pem)
        .map_err(|e| invalid(&files.bundle, "bad_bundle", e.to_string()))?;
    let svid = Svid::new(chain, key).map_err(|e| match e {
        SvidError::KeyMismatch => invalid(
            &files.key,
            e.reason(),
            format!(
                "private key does not match the certificate in {}",
                files.cert.display()
            ),
        ),
        SvidError::BadKey(_) => invalid(&files.key, e.reason(), e.to_string()),
        e => invalid(&files.cert, e.reason(), e.to_string()),
    })?;
    Ok((svid, bundle))
}

/// Installs a set, naming the file at fault when the store refuses it.
fn install(
    svid: Svid,
    bundle: TrustBundle,
    files: &FilesFile,
    store: &SvidStore,
) -> Result<(), FilesError> {
    store
        .install(svid, bundle, SystemTime::now())
        .map_err(|e| match &e {
            UpdateError::WrongTrustDomain { .. } => {
                invalid(&files.bundle, e.reason(), e.to_string())
            }
            UpdateError::Svid(SvidError::UnknownIssuer { .. }) => invalid(
                &files.cert,
                e.reason(),
                format!("{e} (bundle: {})", files.bundle.display()),
            ),
            // Expired and not-yet-valid files need different fixes: same split as for SDS.
            UpdateError::Svid(inner) => {
                match crate::sds::update::validity_window(inner, SystemTime::now()) {
                    Some((reason, why)) => invalid(&files.cert, reason, format!("{e}: {why}")),
                    None => invalid(&files.cert, e.reason(), e.to_string()),
                }
            }
            _ => invalid(&files.cert, e.reason(), e.to_string()),
        })
}

/// True when the store already holds exactly this set (an event for another file in the
/// directory, or a rewrite with the same content): nothing to install, nothing to count.
fn unchanged(svid: &Svid, bundle: &TrustBundle, store: &SvidStore) -> bool {
    store.current().is_some_and(|cur| {
        cur.chain() == svid.chain()
            && cur.key().secret_der() == svid.key().secret_der()
            && store.bundle().load().roots() == bundle.roots()
    })
}

/// Reads the three files once and installs them (used at start: a failure stops the start).
pub fn load(files: &FilesFile, store: &SvidStore) -> Result<(), FilesError> {
    let (svid, bundle) = read_set(files, store.trust_domain())?;
    install(svid, bundle, files, store)
}

/// One reload after a change; a failure keeps the current identity, is logged and counted.
async fn reload(files: &FilesFile, store: &SvidStore, metrics: &SidecarMetrics) {
    let (set_files, td) = (files.clone(), store.trust_domain().clone());
    let read = match tokio::task::spawn_blocking(move || read_set(&set_files, &td)).await {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "identity file reload task failed");
            return;
        }
    };
    let result = read.and_then(|(svid, bundle)| {
        if unchanged(&svid, &bundle, store) {
            return Ok(false);
        }
        install(svid, bundle, files, store).map(|()| true)
    });
    match result {
        Ok(false) => {
            // Counted too: a writer that touches the files without changing them shows up.
            metrics.sds_update("unchanged");
            tracing::debug!("identity files changed on disk but not in content");
        }
        Ok(true) => {
            metrics.sds_update("ok");
            tracing::info!(cert = %files.cert.display(), "reloaded identity files");
        }
        Err(e) => {
            metrics.sds_update(e.reason());
            tracing::warn!(file = %e.path().display(), reason = e.reason(), error = %e, "identity files refused; keeping the current SVID");
        }
    }
}

/// The directory to watch for `file`.
pub(crate) fn parent_dir(file: &Path) -> PathBuf {
    match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    }
}

/// Whether an event can mean new content. Opening and reading (ours included: inotify
/// reports our own reads) cannot; closing a file that was open for writing can.
pub(crate) fn may_change_content(kind: &EventKind) -> bool {
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    }
}

async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

/// Watches the files' directories (in-place writes, rename-over, Kubernetes `..data` symlink
/// swaps), debounces, and reloads; a bad set keeps the current identity and is counted.
pub async fn watch(
    files: FilesFile,
    store: Arc<SvidStore>,
    metrics: Arc<SidecarMetrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    // Capacity 1: one pending "something changed" is all a reload needs to know.
    let (tx, mut rx) = mpsc::channel::<()>(1);
    let mut watcher = match notify::recommended_watcher(
        move |event: notify::Result<notify::Event>| match event {
            Ok(event) if may_change_content(&event.kind) => {
                let _ = tx.try_send(());
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "identity file watch error"),
        },
    ) {
        Ok(w) => w,
        Err(e) => {
            tracing::error!(error = %e, "cannot watch identity files; changes will not be picked up");
            return;
        }
    };
    let dirs: BTreeSet<PathBuf> = [&files.cert, &files.key, &files.bundle]
        .into_iter()
        .map(|f| parent_dir(f))
        .collect();
    for dir in &dirs {
        if let Err(e) = watcher.watch(dir, RecursiveMode::NonRecursive) {
            tracing::error!(dir = %dir.display(), error = %e, "cannot watch identity file directory; changes will not be picked up");
            return;
        }
    }
    tracing::info!(dirs = ?dirs, "watching identity files");
    // A change between `load` and the watch being set up would otherwise go unseen.
    reload(&files, &store, &metrics).await;
    loop {
        tokio::select! {
            event = rx.recv() => if event.is_none() { return },
            () = stopped(&mut shutdown) => return,
        }
        // Debounce: read once the directory has been quiet for DEBOUNCE.
        loop {
            tokio::select! {
                event = rx.recv() => if event.is_none() { return },
                () = tokio::time::sleep(DEBOUNCE) => break,
                () = stopped(&mut shutdown) => return,
            }
        }
        reload(&files, &store, &metrics).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_identity::testca::{LeafSpec, TestCa};
    use trellis_identity::{certs_to_pem, key_to_pem};

    struct Dir {
        dir: tempfile::TempDir,
        files: FilesFile,
    }

    fn dir() -> Dir {
        let dir = tempfile::tempdir().unwrap();
        let files = FilesFile {
            cert: dir.path().join("cert.pem"),
            key: dir.path().join("key.pem"),
            bundle: dir.path().join("bundle.pem"),
        };
        Dir { dir, files }
    }

    fn write(d: &Dir, svid: &Svid, bundle: &TrustBundle) {
        std::fs::write(&d.files.cert, certs_to_pem(svid.chain())).unwrap();
        std::fs::write(&d.files.key, key_to_pem(svid.key()).as_bytes()).unwrap();
        std::fs::write(&d.files.bundle, bundle.to_pem()).unwrap();
    }

    fn store(ca: &TestCa) -> Arc<SvidStore> {
        SvidStore::new(ca.bundle(), None, Arc::new(SidecarMetrics::new()))
    }

    #[test]
    fn loads_valid_files() {
        let ca = TestCa::root("example.org");
        let d = dir();
        let svid = ca.svid("/web");
        write(&d, &svid, &ca.bundle());
        let s = store(&ca);
        load(&d.files, &s).unwrap();
        assert_eq!(s.current().unwrap().serial_hex(), svid.serial_hex());
        assert!(d.dir.path().exists());
    }

    #[test]
    fn key_not_matching_names_the_key_file() {
        let ca = TestCa::root("example.org");
        let d = dir();
        write(&d, &ca.svid("/web"), &ca.bundle());
        std::fs::write(&d.files.key, key_to_pem(ca.svid("/web").key()).as_bytes()).unwrap();
        let err = load(&d.files, &store(&ca)).unwrap_err();
        assert_eq!(err.path(), d.files.key);
        assert_eq!(err.reason(), "bad_key");
        let msg = err.to_string();
        assert!(
            msg.starts_with(&format!("{}: ", d.files.key.display())),
            "{msg}"
        );
        assert!(msg.contains("does not match the certificate in"), "{msg}");
    }

    #[test]
    fn missing_file_names_it() {
        let ca = TestCa::root("example.org");
        let d = dir();
        write(&d, &ca.svid("/web"), &ca.bundle());
        std::fs::remove_file(&d.files.bundle).unwrap();
        let err = load(&d.files, &store(&ca)).unwrap_err();
        assert_eq!(err.path(), d.files.bundle);
        assert_eq!(err.reason(), "unreadable");
    }

    #[test]
    fn garbage_cert_names_the_cert_file() {
        let ca = TestCa::root("example.org");
        let d = dir();
        write(&d, &ca.svid("/web"), &ca.bundle());
        std::fs::write(&d.files.cert, "garbage").unwrap();
        let err = load(&d.files, &store(&ca)).unwrap_err();
        assert_eq!(err.path(), d.files.cert);
        assert_eq!(err.reason(), "malformed");
    }

    #[test]
    fn garbage_key_is_not_echoed() {
        let ca = TestCa::root("example.org");
        let d = dir();
        write(&d, &ca.svid("/web"), &ca.bundle());
        std::fs::write(
            &d.files.key,
            "-----BEGIN PRIVATE KEY-----\nSECRETSTUFF!!\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        let err = load(&d.files, &store(&ca)).unwrap_err();
        assert_eq!(err.path(), d.files.key);
        assert!(!err.to_string().contains("SECRETSTUFF"), "{err}");
    }

    #[test]
    fn empty_bundle_names_the_bundle_file() {
        let ca = TestCa::root("example.org");
        let d = dir();
        write(&d, &ca.svid("/web"), &ca.bundle());
        std::fs::write(&d.files.bundle, "").unwrap();
        let err = load(&d.files, &store(&ca)).unwrap_err();
        assert_eq!(err.path(), d.files.bundle);
        assert_eq!(err.reason(), "bad_bundle");
    }

    #[test]
    fn cert_from_another_ca_names_cert_and_bundle() {
        let ca = TestCa::root("example.org");
        let other = TestCa::root("example.org");
        let d = dir();
        write(&d, &other.svid("/web"), &ca.bundle());
        let err = load(&d.files, &store(&ca)).unwrap_err();
        assert_eq!(err.path(), d.files.cert);
        assert_eq!(err.reason(), "unknown_ca");
        assert!(
            err.to_string()
                .contains(&d.files.bundle.display().to_string()),
            "{err}"
        );
    }

    #[test]
    fn expired_cert_is_refused() {
        let ca = TestCa::root("example.org");
        let d = dir();
        let mut spec = LeafSpec::new("spiffe://example.org/web");
        spec.not_before = SystemTime::now() - Duration::from_secs(7200);
        spec.not_after = SystemTime::now() - Duration::from_secs(3600);
        let (chain, key) = ca.issue(&spec);
        write(&d, &Svid::new(chain, key).unwrap(), &ca.bundle());
        let err = load(&d.files, &store(&ca)).unwrap_err();
        assert_eq!(err.reason(), "expired");
        assert_eq!(err.path(), d.files.cert);
        assert!(err.to_string().contains("it expired 1h"), "{err}");
    }

    #[test]
    fn cert_from_the_future_is_not_yet_valid() {
        let ca = TestCa::root("example.org");
        let d = dir();
        let mut spec = LeafSpec::new("spiffe://example.org/web");
        spec.not_before = SystemTime::now() + Duration::from_secs(3600);
        spec.not_after = SystemTime::now() + Duration::from_secs(7200);
        let (chain, key) = ca.issue(&spec);
        write(&d, &Svid::new(chain, key).unwrap(), &ca.bundle());
        let err = load(&d.files, &store(&ca)).unwrap_err();
        assert_eq!(err.reason(), "not_yet_valid");
        assert_eq!(err.path(), d.files.cert);
        assert!(err.to_string().contains("clock"), "{err}");
    }

    #[test]
    fn svid_of_another_trust_domain_names_the_cert_file() {
        let ca = TestCa::root("example.org");
        let d = dir();
        write(&d, &ca.svid("/web"), &ca.bundle());
        // The sidecar belongs to other.org; the files hold an example.org SVID.
        let s = SvidStore::new(
            TestCa::root("other.org").bundle(),
            None,
            Arc::new(SidecarMetrics::new()),
        );
        let err = load(&d.files, &s).unwrap_err();
        assert_eq!(err.path(), d.files.cert);
        assert!(
            err.to_string().contains("not in trust domain `other.org`"),
            "{err}"
        );
    }

    #[test]
    fn own_reads_do_not_count_as_changes() {
        assert!(!may_change_content(&EventKind::Access(AccessKind::Open(
            AccessMode::Read
        ))));
        assert!(!may_change_content(&EventKind::Access(AccessKind::Close(
            AccessMode::Read
        ))));
        assert!(may_change_content(&EventKind::Access(AccessKind::Close(
            AccessMode::Write
        ))));
        assert!(may_change_content(&EventKind::Create(
            notify::event::CreateKind::File
        )));
    }

    #[test]
    fn parent_of_bare_file_name_is_cwd() {
        assert_eq!(parent_dir(Path::new("cert.pem")), PathBuf::from("."));
        assert_eq!(
            parent_dir(Path::new("/etc/trellis/cert.pem")),
            PathBuf::from("/etc/trellis")
        );
    }
}
