//! Identity from files: `watch` picks up every way a file gets replaced on disk, and a bad
//! rewrite keeps the current SVID.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use trellis_identity::testca::TestCa;
use trellis_identity::{certs_to_pem, key_to_pem, Svid, TrustBundle};
use trellis_sidecar::config::FilesFile;
use trellis_sidecar::identity_files;
use trellis_sidecar::metrics::SidecarMetrics;
use trellis_sidecar::SvidStore;
use trellis_tests::metrics::Metrics;
use trellis_tests::poll_until as eventually;

/// `series` (`name` or `name{labels}`) in the sidecar's exposition; panics naming it if absent.
#[track_caller]
fn metric(m: &SidecarMetrics, series: &str) -> f64 {
    Metrics::parse(&m.encode()).unwrap().series(series)
}

/// [`metric`], 0 while a labelled series has not moved yet (for polls that wait for it).
fn metric_or_zero(m: &SidecarMetrics, series: &str) -> f64 {
    Metrics::parse(&m.encode()).unwrap().series_or_zero(series)
}

fn write_set(dir: &Path, svid: &Svid, bundle: &TrustBundle) {
    std::fs::write(dir.join("cert.pem"), certs_to_pem(svid.chain())).unwrap();
    std::fs::write(dir.join("key.pem"), key_to_pem(svid.key()).as_bytes()).unwrap();
    std::fs::write(dir.join("bundle.pem"), bundle.to_pem()).unwrap();
}

struct Watched {
    ca: TestCa,
    store: Arc<SvidStore>,
    metrics: Arc<SidecarMetrics>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    first_serial: String,
}

impl Watched {
    /// Loads the files in `dir` (written by the caller as a valid set) and starts watching.
    fn start(ca: TestCa, dir: &Path) -> Self {
        let files = FilesFile {
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
            bundle: dir.join("bundle.pem"),
        };
        let metrics = Arc::new(SidecarMetrics::new());
        let store = SvidStore::new(ca.bundle(), None, Arc::clone(&metrics));
        identity_files::load(&files, &store).unwrap();
        let first_serial = store.current().unwrap().serial_hex().to_owned();
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(identity_files::watch(
            files,
            Arc::clone(&store),
            Arc::clone(&metrics),
            stop_rx,
        ));
        Self {
            ca,
            store,
            metrics,
            stop,
            task,
            first_serial,
        }
    }

    fn serial(&self) -> String {
        self.store.current().unwrap().serial_hex().to_owned()
    }

    async fn wait_for_serial(&self, serial: &str) {
        eventually(
            Duration::from_secs(10),
            &format!("serial {serial} installed"),
            || self.serial() == serial,
        )
        .await;
    }

    async fn stop(self) {
        self.stop.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(5), self.task)
            .await
            .expect("watch stops on shutdown")
            .unwrap();
    }
}

#[tokio::test]
async fn watch_picks_up_in_place_rewrite() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::root("example.org");
    write_set(dir.path(), &ca.svid("/web"), &ca.bundle());
    let w = Watched::start(ca, dir.path());
    let next = w.ca.svid("/web");
    write_set(dir.path(), &next, &w.ca.bundle());
    w.wait_for_serial(next.serial_hex()).await;
    assert_eq!(metric(&w.metrics, "trellis_svid_rotations_total"), 1.0);
    assert_eq!(
        metric(&w.metrics, "trellis_sds_updates_total{result=\"ok\"}"),
        1.0
    );
    w.stop().await;
}

#[tokio::test]
async fn watch_picks_up_write_temp_then_rename() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::root("example.org");
    write_set(dir.path(), &ca.svid("/web"), &ca.bundle());
    let w = Watched::start(ca, dir.path());
    let staging = tempfile::tempdir_in(dir.path()).unwrap();
    let next = w.ca.svid("/web");
    write_set(staging.path(), &next, &w.ca.bundle());
    for f in ["key.pem", "cert.pem", "bundle.pem"] {
        std::fs::rename(staging.path().join(f), dir.path().join(f)).unwrap();
    }
    w.wait_for_serial(next.serial_hex()).await;
    w.stop().await;
}

#[tokio::test]
async fn watch_picks_up_kubernetes_symlink_swap() {
    // What kubelet does for a Secret volume: the files are symlinks through `..data`, which
    // points at a timestamped directory; an update writes a new directory and renames a new
    // `..data` symlink over the old one (one atomic step), then deletes the old directory.
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let ca = TestCa::root("example.org");
    std::fs::create_dir(root.join("..2026_01_01_00_00_00.1")).unwrap();
    write_set(
        &root.join("..2026_01_01_00_00_00.1"),
        &ca.svid("/web"),
        &ca.bundle(),
    );
    std::os::unix::fs::symlink("..2026_01_01_00_00_00.1", root.join("..data")).unwrap();
    for f in ["cert.pem", "key.pem", "bundle.pem"] {
        std::os::unix::fs::symlink(format!("..data/{f}"), root.join(f)).unwrap();
    }
    let w = Watched::start(ca, root);

    let next = w.ca.svid("/web");
    std::fs::create_dir(root.join("..2026_01_01_01_00_00.2")).unwrap();
    write_set(&root.join("..2026_01_01_01_00_00.2"), &next, &w.ca.bundle());
    std::os::unix::fs::symlink("..2026_01_01_01_00_00.2", root.join("..data_tmp")).unwrap();
    std::fs::rename(root.join("..data_tmp"), root.join("..data")).unwrap();
    std::fs::remove_dir_all(root.join("..2026_01_01_00_00_00.1")).unwrap();

    w.wait_for_serial(next.serial_hex()).await;
    w.stop().await;
}

#[tokio::test]
async fn garbage_rewrite_keeps_current_svid_and_is_counted() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::root("example.org");
    write_set(dir.path(), &ca.svid("/web"), &ca.bundle());
    let w = Watched::start(ca, dir.path());
    std::fs::write(dir.path().join("cert.pem"), "this is not a certificate").unwrap();
    eventually(
        Duration::from_secs(10),
        "the garbage rewrite is counted",
        || {
            metric_or_zero(
                &w.metrics,
                "trellis_sds_updates_total{result=\"malformed\"}",
            ) >= 1.0
        },
    )
    .await;
    assert_eq!(w.serial(), w.first_serial);
    assert!(w
        .store
        .is_ready(std::time::SystemTime::now(), Duration::ZERO));
    // A good set afterwards is picked up: the watch survived the bad one.
    let next = w.ca.svid("/web");
    write_set(dir.path(), &next, &w.ca.bundle());
    w.wait_for_serial(next.serial_hex()).await;
    w.stop().await;
}

#[tokio::test]
async fn key_from_another_svid_keeps_current_svid() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::root("example.org");
    write_set(dir.path(), &ca.svid("/web"), &ca.bundle());
    let w = Watched::start(ca, dir.path());
    std::fs::write(
        dir.path().join("key.pem"),
        key_to_pem(w.ca.svid("/web").key()).as_bytes(),
    )
    .unwrap();
    eventually(
        Duration::from_secs(10),
        "the mismatched key is counted",
        || metric_or_zero(&w.metrics, "trellis_sds_updates_total{result=\"bad_key\"}") >= 1.0,
    )
    .await;
    assert_eq!(w.serial(), w.first_serial);
    w.stop().await;
}

#[tokio::test]
async fn unrelated_file_in_the_directory_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::root("example.org");
    write_set(dir.path(), &ca.svid("/web"), &ca.bundle());
    let w = Watched::start(ca, dir.path());
    // The watch's first look (at start) finds the set unchanged; then the unrelated write must
    // be looked at and found unchanged too, before the real change, so the order is proven.
    let unchanged = || {
        metric_or_zero(
            &w.metrics,
            "trellis_sds_updates_total{result=\"unchanged\"}",
        )
    };
    eventually(Duration::from_secs(10), "the watch's first look", || {
        unchanged() >= 1.0
    })
    .await;
    std::fs::write(dir.path().join("README"), "hello").unwrap();
    eventually(
        Duration::from_secs(10),
        "the unrelated write looked at",
        || unchanged() >= 2.0,
    )
    .await;
    let next = w.ca.svid("/web");
    write_set(dir.path(), &next, &w.ca.bundle());
    w.wait_for_serial(next.serial_hex()).await;
    assert_eq!(
        metric(&w.metrics, "trellis_svid_rotations_total"),
        1.0,
        "an unchanged set must not be re-installed"
    );
    w.stop().await;
}
