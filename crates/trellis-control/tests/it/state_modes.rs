#![allow(clippy::unwrap_used)]
//! The state directory is 0700 and every file the control plane writes in it is 0600, except
//! `bundle.pem` (public trust anchors, meant to be copied to sidecars: 0644).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use trellis_control::config::{ControlFile, ControlSettings};
use trellis_control::server::ControlPlane;
use trellis_identity::SpiffeId;

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

async fn start(state: &Path) -> ControlPlane {
    let file = ControlFile {
        trust_domain: Some("example.org".into()),
        listen: Some("127.0.0.1:0".parse().unwrap()),
        admin: Some("127.0.0.1:0".parse().unwrap()),
        state_dir: Some(state.to_owned()),
        svid_ttl: Some(Duration::from_secs(3600)),
        rotate_every: Some(Duration::from_secs(600)),
        ..Default::default()
    };
    ControlPlane::start(ControlSettings::from_file(file).unwrap())
        .await
        .unwrap()
}

fn check_modes(state: &Path) {
    assert_eq!(mode(state), 0o700, "state directory");
    let mut seen = Vec::new();
    for entry in std::fs::read_dir(state).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        // Public: the trust anchors and the transparency log's key, meant to be copied.
        let public = name == "bundle.pem" || name == "log-key.pem";
        let want = if public { 0o644 } else { 0o600 };
        assert_eq!(mode(&path), want, "{name}: mode {:o}", mode(&path));
        seen.push(name);
    }
    seen.sort();
    println!("state files: {seen:?}");
    for must in [
        "trellis.db",
        "trellis.db-wal",
        "trellis.db-shm",
        "audit.log",
        "bundle.pem",
        "log-key.pem",
    ] {
        assert!(seen.iter().any(|s| s == must), "{must} missing: {seen:?}");
    }
}

#[tokio::test]
async fn new_state_dir_is_0700_and_its_files_0600() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let cp = start(&state).await;
    // A write to the database, so the WAL holds something.
    cp.registry
        .create_join_token(
            &SpiffeId::parse("spiffe://example.org/app").unwrap(),
            Duration::from_secs(60),
            std::time::SystemTime::now(),
        )
        .unwrap();
    check_modes(&state);
    cp.shutdown().await;
}

#[tokio::test]
async fn loose_state_dir_and_files_are_tightened() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let cp = start(&state).await;
    cp.shutdown().await;
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755)).unwrap();
    for name in ["trellis.db", "audit.log"] {
        std::fs::set_permissions(state.join(name), std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let cp = start(&state).await;
    check_modes(&state);
    cp.shutdown().await;
}
