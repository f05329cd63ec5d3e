//! The SDS client against a real `trellis control` in-process on loopback: first SVID from a
//! join token, server rotations, CSR mode (keys never travel; client-driven key rotation), and
//! re-attestation with the SVID after the control plane restarts.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use trellis_control::config::{ControlFile, ControlSettings};
use trellis_control::server::ControlPlane;
use trellis_identity::{SpiffeId, TrustBundle, TrustDomain};
use trellis_sidecar::config::{Credential, SdsSettings};
use trellis_sidecar::metrics::SidecarMetrics;
use trellis_sidecar::sds::SdsClient;
use trellis_sidecar::SvidStore;
use trellis_tests::metrics::Metrics;
use trellis_tests::poll_until as eventually;

const WEB: &str = "spiffe://example.org/app/web";

/// `series` (`name` or `name{labels}`) in the exposition `text`; panics naming it if absent.
#[track_caller]
fn metric(text: &str, series: &str) -> f64 {
    Metrics::parse(text).unwrap().series(series)
}

/// [`metric`] for a labelled series that is right not to exist: a refusal reason or
/// attestor that never occurred has no line (each label value is asserted non-zero by
/// another test).
fn metric_or_zero(text: &str, series: &str) -> f64 {
    Metrics::parse(text).unwrap().series_or_zero(series)
}

fn td() -> TrustDomain {
    TrustDomain::parse("example.org").unwrap()
}

struct Control {
    cp: ControlPlane,
    _dir: tempfile::TempDir,
    state: PathBuf,
    bundle: TrustBundle,
}

async fn control_plane(
    state: PathBuf,
    listen: &str,
    ttl: Duration,
    rotate: Duration,
) -> ControlPlane {
    let file = ControlFile {
        trust_domain: Some("example.org".into()),
        listen: Some(listen.parse().unwrap()),
        admin: Some("127.0.0.1:0".parse().unwrap()),
        state_dir: Some(state),
        svid_ttl: Some(ttl),
        rotate_every: Some(rotate),
        ..Default::default()
    };
    ControlPlane::start(ControlSettings::from_file(file).unwrap())
        .await
        .unwrap()
}

impl Control {
    async fn start(ttl: Duration, rotate: Duration) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let cp = control_plane(state.clone(), "127.0.0.1:0", ttl, rotate).await;
        let bundle = TrustBundle::from_pem(td(), &std::fs::read(&cp.bundle_path).unwrap()).unwrap();
        Self {
            cp,
            _dir: dir,
            state,
            bundle,
        }
    }

    fn token(&self, id: &str) -> zeroize::Zeroizing<String> {
        self.cp
            .registry
            .create_join_token(
                &SpiffeId::parse(id).unwrap(),
                Duration::from_secs(60),
                SystemTime::now(),
            )
            .unwrap()
    }

    #[track_caller]
    fn metric(&self, series: &str) -> f64 {
        metric(&self.cp.metrics.encode(), series)
    }

    fn metric_or_zero(&self, series: &str) -> f64 {
        metric_or_zero(&self.cp.metrics.encode(), series)
    }
}

struct Sidecar {
    store: Arc<SvidStore>,
    metrics: Arc<SidecarMetrics>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Sidecar {
    fn start(c: &Control, csr: bool, expected: Option<&str>) -> Self {
        let metrics = Arc::new(SidecarMetrics::new());
        let expected_id = expected.map(|e| SpiffeId::parse(e).unwrap());
        let store = SvidStore::new(c.bundle.clone(), expected_id.clone(), Arc::clone(&metrics));
        let settings = SdsSettings {
            control_plane: c.cp.sds_addr.to_string(),
            control_bundle: c.cp.bundle_path.clone().into(),
            credential: Credential::JoinToken(c.token(WEB)),
            expected_id,
            csr,
        };
        let client = SdsClient::new(settings, Arc::clone(&store), Arc::clone(&metrics)).unwrap();
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(client.run(stop_rx));
        Self {
            store,
            metrics,
            stop,
            task,
        }
    }

    #[track_caller]
    fn metric(&self, series: &str) -> f64 {
        metric(&self.metrics.encode(), series)
    }

    fn metric_or_zero(&self, series: &str) -> f64 {
        metric_or_zero(&self.metrics.encode(), series)
    }

    fn serial(&self) -> Option<String> {
        self.store.current().map(|s| s.serial_hex().to_owned())
    }

    fn key_der(&self) -> Vec<u8> {
        self.store.current().unwrap().key().secret_der().to_vec()
    }

    async fn ready(&self) {
        eventually(Duration::from_secs(10), "first SVID installed", || {
            self.store.is_ready(SystemTime::now(), Duration::ZERO)
        })
        .await;
    }

    async fn stop(self) {
        self.stop.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(5), self.task)
            .await
            .expect("client stops on shutdown")
            .unwrap();
        assert_eq!(metric(&self.metrics.encode(), "trellis_sds_connected"), 0.0);
    }
}

#[tokio::test]
async fn join_token_installs_first_svid_and_turns_ready() {
    let c = Control::start(Duration::from_secs(3600), Duration::from_secs(60)).await;
    let s = Sidecar::start(&c, false, Some(WEB));
    assert!(!s.store.is_ready(SystemTime::now(), Duration::ZERO));
    s.ready().await;
    assert_eq!(s.store.current().unwrap().spiffe_id().as_str(), WEB);
    eventually(Duration::from_secs(5), "sds_connected is 1", || {
        s.metric("trellis_sds_connected") == 1.0
    })
    .await;
    assert_eq!(s.metric("trellis_sds_updates_total{result=\"ok\"}"), 1.0);
    assert_eq!(
        c.metric("trellis_svids_issued_total{attestor=\"join_token\"}"),
        1.0
    );
    // The ACK reached the server: no NACK was counted there.
    assert_eq!(c.metric("trellis_sds_nacks_total"), 0.0);
    s.stop().await;
}

#[tokio::test]
async fn server_rotation_installs_new_serial() {
    let c = Control::start(Duration::from_secs(3600), Duration::from_secs(1)).await;
    let s = Sidecar::start(&c, false, None);
    s.ready().await;
    let first = s.serial().unwrap();
    eventually(Duration::from_secs(10), "a rotated SVID", || {
        s.serial().as_deref() != Some(first.as_str())
    })
    .await;
    assert!(s.metric("trellis_svid_rotations_total") >= 1.0);
    assert_eq!(s.store.current().unwrap().spiffe_id().as_str(), WEB);
    assert_eq!(c.metric("trellis_sds_nacks_total"), 0.0);
    s.stop().await;
}

#[tokio::test]
async fn csr_mode_key_never_travels_and_server_rotation_keeps_our_key() {
    let c = Control::start(Duration::from_secs(3600), Duration::from_secs(1)).await;
    let s = Sidecar::start(&c, true, Some(WEB));
    s.ready().await;
    let key = s.key_der();
    let first = s.serial().unwrap();
    // Server-initiated rotations renew the certificate for the key we already hold.
    eventually(Duration::from_secs(10), "a rotated SVID", || {
        s.serial().as_deref() != Some(first.as_str())
    })
    .await;
    assert_eq!(
        s.key_der(),
        key,
        "a server rotation in CSR mode certifies the current key"
    );
    // Had the control plane sent a key, the client would have refused (and counted) it.
    assert_eq!(
        s.metric_or_zero("trellis_sds_updates_total{result=\"key_in_response\"}"),
        0.0
    );
    assert!(s.metric("trellis_sds_updates_total{result=\"ok\"}") >= 2.0);
    assert_eq!(c.metric("trellis_sds_nacks_total"), 0.0);
    s.stop().await;
}

#[tokio::test]
async fn csr_mode_client_driven_key_rotation_installs_new_key() {
    // 10 s SVIDs: the sidecar sends a fresh CSR at about half the remaining lifetime.
    let c = Control::start(Duration::from_secs(10), Duration::from_secs(9)).await;
    let s = Sidecar::start(&c, true, None);
    s.ready().await;
    let key = s.key_der();
    eventually(
        Duration::from_secs(20),
        "a certificate for a new key",
        || s.key_der() != key,
    )
    .await;
    assert_eq!(s.store.current().unwrap().spiffe_id().as_str(), WEB);
    assert!(s.metric("trellis_svid_rotations_total") >= 1.0);
    assert_eq!(
        s.metric_or_zero("trellis_sds_updates_total{result=\"bad_key\"}"),
        0.0
    );
    assert_eq!(c.metric("trellis_sds_nacks_total"), 0.0);
    s.stop().await;
}

async fn reattests_after_restart(csr: bool) {
    let c = Control::start(Duration::from_secs(3600), Duration::from_secs(60)).await;
    let addr = c.cp.sds_addr;
    let s = Sidecar::start(&c, csr, Some(WEB));
    s.ready().await;
    let first = s.serial().unwrap();
    eventually(Duration::from_secs(5), "sds_connected is 1", || {
        s.metric("trellis_sds_connected") == 1.0
    })
    .await;

    let Control {
        cp,
        _dir,
        state,
        bundle,
    } = c;
    cp.shutdown().await;
    eventually(Duration::from_secs(10), "sds_connected drops to 0", || {
        s.metric("trellis_sds_connected") == 0.0
    })
    .await;
    // The sidecar keeps serving on its SVID while the control plane is away.
    assert_eq!(s.serial().unwrap(), first);
    assert!(s.store.is_ready(SystemTime::now(), Duration::ZERO));

    // Same state directory (same CA), same address. The join token is spent: the sidecar must
    // come back with its SVID as the TLS client certificate.
    let cp = control_plane(
        state.clone(),
        &addr.to_string(),
        Duration::from_secs(3600),
        Duration::from_secs(60),
    )
    .await;
    let c = Control {
        cp,
        _dir,
        state,
        bundle,
    };
    eventually(
        Duration::from_secs(40),
        "a new SVID after the restart",
        || s.serial().as_deref() != Some(first.as_str()),
    )
    .await;
    assert_eq!(
        c.metric("trellis_svids_issued_total{attestor=\"svid\"}"),
        1.0
    );
    assert_eq!(
        c.metric_or_zero("trellis_svids_issued_total{attestor=\"join_token\"}"),
        0.0
    );
    eventually(Duration::from_secs(5), "sds_connected is 1 again", || {
        s.metric("trellis_sds_connected") == 1.0
    })
    .await;
    s.stop().await;
}

#[tokio::test]
async fn reconnect_after_restart_reattests_with_svid() {
    reattests_after_restart(false).await;
}

#[tokio::test]
async fn reconnect_after_restart_reattests_with_svid_in_csr_mode() {
    reattests_after_restart(true).await;
}

#[tokio::test]
async fn unreachable_control_plane_keeps_retrying_and_is_not_ready() {
    let c = Control::start(Duration::from_secs(3600), Duration::from_secs(60)).await;
    let bundle_path = c.cp.bundle_path.clone();
    let addr = c.cp.sds_addr;
    let Control { cp, _dir, .. } = c;
    cp.shutdown().await;
    let metrics = Arc::new(SidecarMetrics::new());
    let store = SvidStore::new(
        TrustBundle::from_pem(td(), &std::fs::read(&bundle_path).unwrap()).unwrap(),
        None,
        Arc::clone(&metrics),
    );
    let settings = SdsSettings {
        control_plane: addr.to_string(),
        control_bundle: bundle_path.into(),
        credential: Credential::JoinToken(zeroize::Zeroizing::new("trellis-join.unused".into())),
        expected_id: None,
        csr: true,
    };
    let client = SdsClient::new(settings, Arc::clone(&store), Arc::clone(&metrics)).unwrap();
    let (stop, stop_rx) = watch::channel(false);
    let task = tokio::spawn(client.run(stop_rx));
    // Something listens where the control plane was but closes every connection: count
    // the client's attempts, proof that it keeps retrying (with backoff) rather than giving up.
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let attempts = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = Arc::clone(&attempts);
    let silent = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            drop(tcp);
        }
    });
    eventually(Duration::from_secs(20), "three connection attempts", || {
        attempts.load(std::sync::atomic::Ordering::Relaxed) >= 3
    })
    .await;
    silent.abort();
    assert!(!store.is_ready(SystemTime::now(), Duration::ZERO));
    assert_eq!(metric(&metrics.encode(), "trellis_sds_connected"), 0.0);
    // Shutdown interrupts the backoff sleep promptly.
    stop.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(2), task)
        .await
        .expect("stops during backoff")
        .unwrap();
}
