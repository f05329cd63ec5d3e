//! Join tokens through the public API, the way two processes use them: `trellis token create`
//! writes a token while `trellis control` runs, and a restart never revives a spent token.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use trellis_control::attest::{
    AttestError, Attestor, AttestorKind, Credential, JoinAttestor, JOIN_REDEMPTION_WINDOW,
};
use trellis_control::registry::{JoinError, Registry};
use trellis_identity::{SpiffeId, TrustDomain};

fn attestor(registry: Arc<Registry>) -> Attestor {
    Attestor::new(
        TrustDomain::parse("example.org").unwrap(),
        None,
        JoinAttestor::new(registry, JOIN_REDEMPTION_WINDOW),
    )
}

fn peer(ip: [u8; 4], port: u16) -> Option<SocketAddr> {
    Some(SocketAddr::from((ip, port)))
}

#[test]
fn join_token_single_use_across_restart() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("trellis.db");
    let id = SpiffeId::parse("spiffe://example.org/host/db-1").unwrap();
    let now = SystemTime::now();

    // The control plane is running ...
    let control = Arc::new(Registry::open(&db).unwrap());
    let a = attestor(control.clone());
    // ... when the CLI, a separate handle on the same file, creates a token.
    let auth = {
        let cli = Registry::open(&db).unwrap();
        let tok = cli
            .create_join_token(&id, Duration::from_secs(3600), now)
            .unwrap();
        format!("Bearer {}", tok.as_str())
    };
    let cred = Credential::Authorization(&auth);

    // Envoy opens two streams (one per secret name) within a second: both share the redemption.
    for port in [50001, 50002] {
        let got = a.attest(cred, peer([10, 0, 0, 7], port), now).unwrap();
        assert_eq!(got.spiffe_id, id);
        assert_eq!(got.attestor, AttestorKind::JoinToken);
    }

    // Restart: a fresh Registry on the same file refuses the token, even from the same IP
    // once the window has passed, and from any other IP at once.
    drop(a);
    drop(control);
    let a = attestor(Arc::new(Registry::open(&db).unwrap()));
    assert_eq!(
        a.attest(cred, peer([10, 0, 0, 8], 50003), now).unwrap_err(),
        AttestError::Join(JoinError::AlreadyRedeemed)
    );
    let later = now + JOIN_REDEMPTION_WINDOW + Duration::from_secs(1);
    assert_eq!(
        a.attest(cred, peer([10, 0, 0, 7], 50004), later)
            .unwrap_err(),
        AttestError::Join(JoinError::AlreadyRedeemed)
    );
}

#[test]
fn join_token_redeemed_by_racing_connections_once() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("trellis.db");
    let id = SpiffeId::parse("spiffe://example.org/host/db-2").unwrap();
    let now = SystemTime::now();
    let registry = Registry::open(&db).unwrap();
    let tok = registry
        .create_join_token(&id, Duration::from_secs(3600), now)
        .unwrap()
        .to_string();
    // Eight hosts race for one token, each through its own connection (as separate
    // processes would): SQLite's write lock, not our mutex, decides. Exactly one wins.
    let winners: usize = (1..=8u8)
        .map(|i| {
            let (db, tok) = (db.clone(), tok.clone());
            std::thread::spawn(move || {
                let registry = Registry::open(&db).unwrap();
                let ip = std::net::IpAddr::from([10, 0, 1, i]);
                registry
                    .redeem_join_token(&tok, ip, now, JOIN_REDEMPTION_WINDOW)
                    .unwrap()
                    .is_ok()
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|h| usize::from(h.join().unwrap()))
        .sum();
    assert_eq!(winners, 1);
}
