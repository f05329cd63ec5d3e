//! One body per behaviour, run against SQLite always and against PostgreSQL when
//! `TRELLIS_TEST_POSTGRES_URL` is set (tests/run.sh starts a throwaway cluster and sets it;
//! under CI a missing variable fails the PostgreSQL tests instead of skipping them).

use super::model::SCHEMA_VERSION;
use super::*;
use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::sync::Barrier;
use std::time::UNIX_EPOCH;

const WINDOW: Duration = Duration::from_secs(30);

fn id() -> SpiffeId {
    SpiffeId::parse("spiffe://example.org/host/db-1").unwrap()
}

fn t(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
}

fn ip(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 0, 0, last))
}

fn material(s: &str) -> CaMaterial {
    CaMaterial {
        chain_pem: format!("chain {s}"),
        bundle_pem: format!("bundle {s}"),
        key_pem: Zeroizing::new(format!("key {s}")),
    }
}

/// One empty store; every `handle` is a new connection to it (another process, another
/// replica, or the same one after a restart).
trait Fixture: Sync {
    fn handle(&self) -> Registry;
}

/// Generates a `#[test]` per shared body for one backend.
macro_rules! shared_tests {
    ($fixture:path; $($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                if let Some(f) = $fixture() {
                    super::shared::$name(&f);
                }
            }
        )*
    };
}

macro_rules! all_shared_tests {
    ($fixture:path) => {
        shared_tests!($fixture;
            token_has_selector_and_256_bit_verifier,
            join_token_single_use,
            wrong_verifier_is_unknown_and_spends_nothing,
            old_format_token_is_unknown,
            join_token_shared_within_window_same_ip,
            join_token_refused_from_other_ip,
            join_token_refused_after_window,
            join_token_single_use_across_handles,
            join_token_expired,
            unknown_join_token,
            ca_material_round_trips_and_first_store_wins,
            issuance_records_count_and_prune,
            prune_deletes_more_than_one_chunk,
            concurrent_redemptions_from_two_connections_agree,
            racing_redemptions_admit_exactly_one,
            racing_first_starts_agree_on_one_ca,
            ca_rotations_are_stored_in_order_and_never_overtake,
            racing_rotations_do_not_overtake,
            log_entries_commit_with_issuances_and_outlive_pruning,
            log_heads_and_key_first_writer_wins,
            racing_appends_from_two_handles_leave_no_gap,
        );
    };
}

/// A log body for an issuance with this serial (what the recorder would build).
fn log_body(serial_hex: &str) -> trellis_transparency::LogBody {
    trellis_transparency::LogBody::Issuance(trellis_transparency::IssuanceEntry {
        serial: hex::decode(serial_hex).unwrap(),
        spiffe_id: id().to_string(),
        public_key_sha256: [7; 32],
        not_before: 0,
        not_after: 1,
        issuer_key_id: vec![1; 20],
        attestation: "join_token".into(),
    })
}

fn issuance(serial_hex: &str, not_after: SystemTime) -> IssuanceRecord {
    IssuanceRecord {
        spiffe_id: id(),
        serial_hex: serial_hex.into(),
        not_after,
        attestor: "join_token",
        peer: None,
        issued_at: t(0),
        log: log_body(serial_hex),
    }
}

mod shared {
    use super::*;
    use trellis_transparency::{LogEntry, SignedTreeHead, TreeHead};

    pub fn log_entries_commit_with_issuances_and_outlive_pruning(f: &dyn Fixture) {
        let reg = f.handle();
        reg.record_issuances(&[issuance("0a", t(10)), issuance("0b", t(1000))])
            .unwrap();
        let phase = trellis_transparency::LogBody::CaPhase(trellis_transparency::CaPhaseEntry {
            ca_sha256: [5; 32],
            ca_key_id: vec![6; 20],
            phase: "active".into(),
        });
        reg.record_ca_phase(&phase).unwrap();
        // Another replica noticing the same phase change adds nothing.
        f.handle().record_ca_phase(&phase).unwrap();
        reg.record_issuances(&[issuance("0c", t(2000))]).unwrap();

        let entries = reg.log_entries(0, 100).unwrap();
        assert_eq!(entries.len(), 4);
        let decoded: Vec<LogEntry> = entries
            .iter()
            .map(|e| LogEntry::decode(&e.bytes).unwrap())
            .collect();
        assert_eq!(
            decoded.iter().map(|e| e.index).collect::<Vec<_>>(),
            [0, 1, 2, 3]
        );
        assert!(matches!(
            decoded[2].body,
            trellis_transparency::LogBody::CaPhase(_)
        ));
        assert_eq!(reg.log_index_of_serial("0b").unwrap(), Some(1));
        assert_eq!(reg.log_index_of_serial("0c").unwrap(), Some(3));
        assert_eq!(reg.log_index_of_serial("ff").unwrap(), None);
        assert_eq!(reg.log_leaf_hashes(1, 2).unwrap().len(), 2);

        // Pruning issuance records leaves the log whole.
        assert_eq!(reg.prune_issuances(t(500)).unwrap(), 1);
        assert_eq!(reg.log_entries(0, 100).unwrap().len(), 4);
    }

    pub fn log_heads_and_key_first_writer_wins(f: &dyn Fixture) {
        let reg = f.handle();
        let key = reg.log_key_or_insert(b"first key").unwrap();
        assert_eq!(key.as_slice(), b"first key");
        let again = f.handle().log_key_or_insert(b"second key").unwrap();
        assert_eq!(again.as_slice(), b"first key");

        let head = |root: u8, ts: u64| SignedTreeHead {
            head: TreeHead {
                tree_size: 3,
                root_hash: [root; 32],
                timestamp_ms: ts,
            },
            key_id: "k".into(),
            signature: vec![root],
        };
        assert_eq!(reg.latest_log_head().unwrap(), None);
        assert_eq!(reg.insert_log_head(&head(1, 10)).unwrap(), head(1, 10));
        // A second replica's head for the same size never replaces the first.
        assert_eq!(
            f.handle().insert_log_head(&head(2, 11)).unwrap(),
            head(1, 10)
        );
        let mut bigger = head(3, 12);
        bigger.head.tree_size = 5;
        reg.insert_log_head(&bigger).unwrap();
        assert_eq!(reg.latest_log_head().unwrap(), Some(bigger.clone()));
        assert_eq!(reg.log_heads().unwrap(), vec![head(1, 10), bigger]);
    }

    pub fn racing_appends_from_two_handles_leave_no_gap(f: &dyn Fixture) {
        let (a, b) = (f.handle(), f.handle());
        let barrier = Barrier::new(2);
        std::thread::scope(|s| {
            for (name, reg) in [("a", &a), ("b", &b)] {
                let barrier = &barrier;
                s.spawn(move || {
                    barrier.wait();
                    for i in 0..20 {
                        let serial = format!("{}{i:02x}", if name == "a" { "aa" } else { "bb" });
                        reg.record_issuances(&[issuance(&serial, t(100))]).unwrap();
                    }
                });
            }
        });
        let entries = a.log_entries(0, 1000).unwrap();
        assert_eq!(entries.len(), 40);
        for (i, e) in entries.iter().enumerate() {
            assert_eq!(e.index, i as u64);
            assert_eq!(LogEntry::decode(&e.bytes).unwrap().index, i as u64);
        }
    }

    pub fn token_has_selector_and_256_bit_verifier(f: &dyn Fixture) {
        let reg = f.handle();
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let mut selectors = Vec::new();
        for _ in 0..2 {
            let tok = reg
                .create_join_token(&id(), Duration::from_secs(3600), t(0))
                .unwrap();
            let parsed = JoinToken::parse(&tok).unwrap();
            assert_eq!(b64.decode(parsed.selector()).unwrap().len(), 16);
            assert_eq!(b64.decode(parsed.verifier()).unwrap().len(), 32);
            assert_eq!(
                tok.as_str(),
                format!(
                    "{JOIN_TOKEN_PREFIX}{}.{}",
                    parsed.selector(),
                    parsed.verifier()
                )
            );
            selectors.push(parsed.selector().to_owned());
        }
        assert_ne!(selectors[0], selectors[1]);
    }

    /// `tok` with its verifier's first character changed: the right selector, a wrong secret.
    fn with_wrong_verifier(tok: &str) -> String {
        let (head, verifier) = tok.rsplit_once('.').unwrap();
        let first = if verifier.starts_with('A') { 'B' } else { 'A' };
        format!("{head}.{first}{}", &verifier[1..])
    }

    pub fn wrong_verifier_is_unknown_and_spends_nothing(f: &dyn Fixture) {
        let reg = f.handle();
        let tok = reg
            .create_join_token(&id(), Duration::from_secs(3600), t(0))
            .unwrap();
        let wrong = with_wrong_verifier(&tok);
        assert!(JoinToken::parse(&wrong).is_ok(), "{wrong}");
        // The same answer as an unknown selector, on every try (nothing was recorded).
        for s in [1, 2] {
            assert_eq!(
                reg.redeem_join_token(&wrong, ip(9), t(s), WINDOW).unwrap(),
                Err(JoinError::Unknown)
            );
        }
        // Not spent: the holder, from another address, still redeems it first …
        assert_eq!(
            reg.redeem_join_token(&tok, ip(1), t(3), WINDOW).unwrap(),
            Ok(id())
        );
        // … and a wrong verifier from the holder's own address, inside the window, is still
        // unknown rather than sharing the redemption.
        assert_eq!(
            reg.redeem_join_token(&wrong, ip(1), t(4), WINDOW).unwrap(),
            Err(JoinError::Unknown)
        );
        assert_eq!(
            f.handle()
                .redeem_join_token(&tok, ip(9), t(5), WINDOW)
                .unwrap(),
            Err(JoinError::AlreadyRedeemed)
        );
    }

    pub fn old_format_token_is_unknown(f: &dyn Fixture) {
        // `trellis-join.<43 characters>`, as earlier builds issued: never looked up.
        let reg = f.handle();
        let old = format!("{JOIN_TOKEN_PREFIX}{}", "q".repeat(43));
        assert_eq!(
            reg.redeem_join_token(&old, ip(1), t(1), WINDOW).unwrap(),
            Err(JoinError::Unknown)
        );
    }

    pub fn join_token_single_use(f: &dyn Fixture) {
        let reg = f.handle();
        let tok = reg
            .create_join_token(&id(), Duration::from_secs(3600), t(0))
            .unwrap();
        assert_eq!(
            reg.redeem_join_token(&tok, ip(1), t(1), WINDOW).unwrap(),
            Ok(id())
        );
        // From elsewhere, even inside the window: refused.
        assert_eq!(
            reg.redeem_join_token(&tok, ip(2), t(2), WINDOW).unwrap(),
            Err(JoinError::AlreadyRedeemed)
        );
    }

    pub fn join_token_shared_within_window_same_ip(f: &dyn Fixture) {
        let reg = f.handle();
        let tok = reg
            .create_join_token(&id(), Duration::from_secs(3600), t(0))
            .unwrap();
        for s in [1, 2, 10, 30] {
            assert_eq!(
                reg.redeem_join_token(&tok, ip(1), t(s), WINDOW).unwrap(),
                Ok(id()),
                "at +{s}s"
            );
        }
    }

    pub fn join_token_refused_from_other_ip(f: &dyn Fixture) {
        let reg = f.handle();
        let tok = reg
            .create_join_token(&id(), Duration::from_secs(3600), t(0))
            .unwrap();
        reg.redeem_join_token(&tok, ip(1), t(1), WINDOW)
            .unwrap()
            .unwrap();
        assert_eq!(
            reg.redeem_join_token(&tok, ip(9), t(1), WINDOW).unwrap(),
            Err(JoinError::AlreadyRedeemed)
        );
    }

    pub fn join_token_refused_after_window(f: &dyn Fixture) {
        let reg = f.handle();
        let tok = reg
            .create_join_token(&id(), Duration::from_secs(3600), t(0))
            .unwrap();
        reg.redeem_join_token(&tok, ip(1), t(1), WINDOW)
            .unwrap()
            .unwrap();
        // Window is half-open: first + 30 s is already outside.
        assert_eq!(
            reg.redeem_join_token(&tok, ip(1), t(31), WINDOW).unwrap(),
            Err(JoinError::AlreadyRedeemed)
        );
    }

    pub fn join_token_single_use_across_handles(f: &dyn Fixture) {
        // A restart of one control plane, or another replica: the spent token stays spent.
        let tok = {
            let reg = f.handle();
            let tok = reg
                .create_join_token(&id(), Duration::from_secs(3600), t(0))
                .unwrap();
            reg.redeem_join_token(&tok, ip(1), t(1), WINDOW)
                .unwrap()
                .unwrap();
            tok
        };
        let reg = f.handle();
        assert_eq!(
            reg.redeem_join_token(&tok, ip(2), t(2), WINDOW).unwrap(),
            Err(JoinError::AlreadyRedeemed)
        );
        assert_eq!(
            reg.redeem_join_token(&tok, ip(1), t(600), WINDOW).unwrap(),
            Err(JoinError::AlreadyRedeemed)
        );
    }

    pub fn join_token_expired(f: &dyn Fixture) {
        let reg = f.handle();
        let tok = reg
            .create_join_token(&id(), Duration::from_secs(60), t(0))
            .unwrap();
        // expires_at <= now: the boundary second is already expired.
        assert_eq!(
            reg.redeem_join_token(&tok, ip(1), t(60), WINDOW).unwrap(),
            Err(JoinError::Expired)
        );
    }

    pub fn unknown_join_token(f: &dyn Fixture) {
        let reg = f.handle();
        reg.create_join_token(&id(), Duration::from_secs(60), t(0))
            .unwrap();
        assert_eq!(
            reg.redeem_join_token("trellis-join.nope", ip(1), t(1), WINDOW)
                .unwrap(),
            Err(JoinError::Unknown)
        );
        // Well-formed, but no such selector.
        let absent = format!("{JOIN_TOKEN_PREFIX}{}.{}", "A".repeat(22), "A".repeat(43));
        assert_eq!(
            reg.redeem_join_token(&absent, ip(1), t(1), WINDOW).unwrap(),
            Err(JoinError::Unknown)
        );
    }

    pub fn ca_material_round_trips_and_first_store_wins(f: &dyn Fixture) {
        let reg = f.handle();
        assert!(reg.load_ca().unwrap().is_none());
        let kept = reg.store_ca_if_absent(material("a")).unwrap();
        assert_eq!(kept.chain_pem, "chain a");
        let kept = reg.store_ca_if_absent(material("b")).unwrap();
        assert_eq!(kept.key_pem.as_str(), "key a");
        reg.store_ca(&material("c")).unwrap();
        let loaded = f.handle().load_ca().unwrap().unwrap();
        assert_eq!(loaded.bundle_pem, "bundle c");
    }

    pub fn issuance_records_count_and_prune(f: &dyn Fixture) {
        let reg = f.handle();
        let rec = |not_after, peer: Option<&str>| IssuanceRecord {
            spiffe_id: id(),
            serial_hex: "01ab".into(),
            not_after,
            attestor: "join_token",
            peer: peer.map(|p| p.parse().unwrap()),
            issued_at: t(0),
            log: log_body("01ab"),
        };
        reg.record_issuance(&rec(t(100), Some("10.0.0.1:5000")))
            .unwrap();
        reg.record_issuances(&[rec(t(200), None), rec(t(300), Some("[::1]:1"))])
            .unwrap();
        reg.record_issuances(&[]).unwrap();
        assert_eq!(reg.issuance_count().unwrap(), 3);
        assert_eq!(f.handle().issuance_count().unwrap(), 3);
        assert_eq!(reg.prune_issuances(t(250)).unwrap(), 2);
        assert_eq!(reg.issuance_count().unwrap(), 1);
    }

    pub fn prune_deletes_more_than_one_chunk(f: &dyn Fixture) {
        let reg = f.handle();
        let rec = |not_after| IssuanceRecord {
            spiffe_id: id(),
            serial_hex: "01".into(),
            not_after,
            attestor: "svid",
            peer: None,
            issued_at: t(0),
            log: log_body("01"),
        };
        let old = usize::try_from(2 * PRUNE_CHUNK + 5).unwrap();
        let mut recs = vec![rec(t(10)); old];
        recs.extend([rec(t(1000)), rec(t(2000))]);
        reg.record_issuances(&recs).unwrap();
        assert_eq!(reg.prune_issuances(t(500)).unwrap(), old as u64);
        assert_eq!(reg.issuance_count().unwrap(), 2);
        assert_eq!(reg.prune_issuances(t(500)).unwrap(), 0);
    }

    pub fn concurrent_redemptions_from_two_connections_agree(f: &dyn Fixture) {
        // Two handles stand in for two processes (or two replicas).
        let a = f.handle();
        let b = f.handle();
        let tok = a
            .create_join_token(&id(), Duration::from_secs(3600), t(0))
            .unwrap();
        let ra = a.redeem_join_token(&tok, ip(1), t(1), WINDOW).unwrap();
        let rb = b.redeem_join_token(&tok, ip(2), t(1), WINDOW).unwrap();
        assert_eq!(ra, Ok(id()));
        assert_eq!(rb, Err(JoinError::AlreadyRedeemed));
    }

    pub fn racing_redemptions_admit_exactly_one(f: &dyn Fixture) {
        const RACERS: u8 = 6;
        let handles: Vec<Registry> = (0..RACERS).map(|_| f.handle()).collect();
        for round in 0..5 {
            let tok = handles[0]
                .create_join_token(&id(), Duration::from_secs(3600), t(0))
                .unwrap();
            let start = Barrier::new(usize::from(RACERS));
            let results: Vec<_> = std::thread::scope(|s| {
                let tasks: Vec<_> = handles
                    .iter()
                    .enumerate()
                    .map(|(i, reg)| {
                        let (tok, start) = (&tok, &start);
                        s.spawn(move || {
                            start.wait();
                            let peer = ip(u8::try_from(i).unwrap() + 1);
                            reg.redeem_join_token(tok, peer, t(1), WINDOW).unwrap()
                        })
                    })
                    .collect();
                tasks.into_iter().map(|h| h.join().unwrap()).collect()
            });
            let admitted = results.iter().filter(|r| r.is_ok()).count();
            assert_eq!(admitted, 1, "round {round}: {results:?}");
            assert!(results
                .iter()
                .all(|r| matches!(r, Ok(_) | Err(JoinError::AlreadyRedeemed))));
        }
    }

    pub fn racing_first_starts_agree_on_one_ca(f: &dyn Fixture) {
        const RACERS: usize = 4;
        let handles: Vec<Registry> = (0..RACERS).map(|_| f.handle()).collect();
        let start = Barrier::new(RACERS);
        let kept: Vec<String> = std::thread::scope(|s| {
            let tasks: Vec<_> = handles
                .iter()
                .enumerate()
                .map(|(i, reg)| {
                    let start = &start;
                    s.spawn(move || {
                        start.wait();
                        reg.store_ca_if_absent(material(&i.to_string()))
                            .unwrap()
                            .chain_pem
                    })
                })
                .collect();
            tasks.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(kept.iter().all(|k| *k == kept[0]), "{kept:?}");
        assert_eq!(f.handle().load_ca().unwrap().unwrap().chain_pem, kept[0]);
    }

    pub fn ca_rotations_are_stored_in_order_and_never_overtake(f: &dyn Fixture) {
        let reg = f.handle();
        let m = |s: &str| CaMaterial {
            chain_pem: s.into(),
            bundle_pem: s.into(),
            key_pem: Zeroizing::new(s.into()),
        };
        let first = reg.add_ca_rotation(&m("a"), t(0), t(60), t(0)).unwrap();
        // Pending until t(60): a second one is refused, naming when the first activates.
        let err = reg
            .add_ca_rotation(&m("b"), t(10), t(70), t(10))
            .unwrap_err();
        assert!(
            matches!(err, RegistryError::RotationPending { .. }),
            "{err}"
        );
        let second = reg.add_ca_rotation(&m("b"), t(61), t(120), t(61)).unwrap();
        assert!(second > first);
        let all = f.handle().ca_rotations_after(0).unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].material.chain_pem, "a");
        assert_eq!(all[0].activate_at, t(60));
        assert_eq!(all[0].prepared_at, t(0));
        assert_eq!(reg.ca_rotations_after(first).unwrap().len(), 1);
    }

    pub fn racing_rotations_do_not_overtake(f: &dyn Fixture) {
        // Two `trellis ca rotate` at once (on one host or two): one is scheduled, the other
        // is told a rotation is pending.
        let (a, b) = (f.handle(), f.handle());
        let start = Barrier::new(2);
        let results: Vec<_> = std::thread::scope(|s| {
            let tasks: Vec<_> = [&a, &b]
                .into_iter()
                .map(|reg| {
                    let start = &start;
                    s.spawn(move || {
                        start.wait();
                        reg.add_ca_rotation(&material("r"), t(0), t(60), t(0))
                    })
                })
                .collect();
            tasks.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 1);
        assert!(results
            .iter()
            .any(|r| matches!(r, Err(RegistryError::RotationPending { .. }))));
    }
}

mod sqlite_backend {
    use super::*;

    struct SqliteFixture {
        _dir: tempfile::TempDir,
        path: PathBuf,
    }

    impl Fixture for SqliteFixture {
        fn handle(&self) -> Registry {
            Registry::open(&self.path).unwrap()
        }
    }

    fn fixture() -> Option<SqliteFixture> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trellis.db");
        Some(SqliteFixture { _dir: dir, path })
    }

    all_shared_tests!(fixture);

    #[test]
    fn token_stored_hashed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trellis.db");
        let reg = Registry::open(&path).unwrap();
        let tok = reg
            .create_join_token(&id(), Duration::from_secs(3600), t(0))
            .unwrap();
        drop(reg); // checkpoints the WAL into the main file
        let mut bytes = std::fs::read(&path).unwrap();
        for ext in ["-wal", "-shm"] {
            if let Ok(b) = std::fs::read(format!("{}{ext}", path.display())) {
                bytes.extend(b);
            }
        }
        let parsed = JoinToken::parse(&tok).unwrap();
        assert!(!contains(&bytes, tok.as_bytes()));
        assert!(!contains(&bytes, parsed.verifier().as_bytes()));
        assert!(contains(&bytes, &verifier_hash(parsed.verifier())));
        assert!(contains(&bytes, parsed.selector().as_bytes()));
    }

    fn contains(hay: &[u8], needle: &[u8]) -> bool {
        hay.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn database_file_mode_is_0600() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trellis.db");
        std::fs::write(&path, b"").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let reg = Registry::open(&path).unwrap();
        reg.create_join_token(&id(), Duration::from_secs(3600), t(0))
            .unwrap();
        for p in [
            path.clone(),
            PathBuf::from(format!("{}-wal", path.display())),
        ] {
            let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", p.display());
        }
    }

    #[test]
    fn rejects_newer_schema() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trellis.db");
        drop(Registry::open(&path).unwrap());
        let c = rusqlite::Connection::open(&path).unwrap();
        c.pragma_update(None, "user_version", 99).unwrap();
        drop(c);
        let err = Registry::open(&path).err().unwrap();
        assert!(
            matches!(err, RegistryError::Schema { found: 99, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("trellis.db"), "{err}");
    }

    #[test]
    fn rejects_file_that_is_not_a_database() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trellis.db");
        std::fs::write(&path, vec![b'x'; 4096]).unwrap();
        let err = Registry::open(&path).err().unwrap();
        assert!(
            err.to_string().starts_with(&path.display().to_string()),
            "{err}"
        );
    }

    #[test]
    fn a_version_1_database_is_migrated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trellis.db");
        {
            let conn = rusqlite::Connection::open(&path).unwrap();
            conn.execute_batch(
                "CREATE TABLE join_tokens (hash TEXT PRIMARY KEY NOT NULL, spiffe_id TEXT NOT NULL,
                     created_at INTEGER NOT NULL, expires_at INTEGER NOT NULL,
                     redeemed_at INTEGER, redeemed_by_ip TEXT) WITHOUT ROWID;
                 CREATE TABLE ca (id INTEGER PRIMARY KEY, chain_pem TEXT, bundle_pem TEXT, key_pem TEXT);
                 INSERT INTO ca VALUES (1, 'c', 'b', 'k');
                 PRAGMA user_version = 1;",
            )
            .unwrap();
        }
        let reg = Registry::open(&path).unwrap();
        assert_eq!(reg.load_ca().unwrap().unwrap().chain_pem, "c");
        assert!(reg.ca_rotations_after(0).unwrap().is_empty());
        let tok = reg
            .create_join_token(&id(), Duration::from_secs(3600), t(0))
            .unwrap();
        assert_eq!(
            reg.redeem_join_token(&tok, ip(1), t(1), WINDOW).unwrap(),
            Ok(id())
        );
    }

    /// A database written by the previous build (schema 2: whole-token hashes) opens, gains
    /// the selector column, and refuses its old tokens while new ones work.
    #[test]
    fn a_version_2_database_is_migrated_and_old_tokens_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trellis.db");
        let old = format!("{JOIN_TOKEN_PREFIX}{}", "q".repeat(43));
        {
            let conn = rusqlite::Connection::open(&path).unwrap();
            conn.execute_batch(V2_SCHEMA).unwrap();
            conn.execute(
                "INSERT INTO join_tokens (hash, spiffe_id, created_at, expires_at)
                 VALUES (?1, ?2, 0, 9999999999)",
                rusqlite::params![
                    hex::encode(sha2::Sha256::digest(old.as_bytes())),
                    id().as_str()
                ],
            )
            .unwrap();
        }
        let reg = Registry::open(&path).unwrap();
        assert_eq!(
            reg.redeem_join_token(&old, ip(1), t(1), WINDOW).unwrap(),
            Err(JoinError::Unknown)
        );
        let tok = reg
            .create_join_token(&id(), Duration::from_secs(3600), t(0))
            .unwrap();
        assert_eq!(
            reg.redeem_join_token(&tok, ip(1), t(1), WINDOW).unwrap(),
            Ok(id())
        );
        drop(reg);
        let c = rusqlite::Connection::open(&path).unwrap();
        let version: i64 = c
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        // The old row is left as it was, for a previous build still running.
        let old_rows: i64 = c
            .query_row(
                "SELECT COUNT(*) FROM join_tokens WHERE selector IS NULL",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(old_rows, 1);
    }

    /// The schema as version 2 builds created it.
    const V2_SCHEMA: &str = "
        CREATE TABLE join_tokens (hash TEXT PRIMARY KEY NOT NULL, spiffe_id TEXT NOT NULL,
            created_at INTEGER NOT NULL, expires_at INTEGER NOT NULL, redeemed_at INTEGER,
            redeemed_by_ip TEXT) WITHOUT ROWID;
        CREATE TABLE ca (id INTEGER PRIMARY KEY CHECK (id = 1), chain_pem TEXT NOT NULL,
            bundle_pem TEXT NOT NULL, key_pem TEXT NOT NULL);
        CREATE TABLE issuances (id INTEGER PRIMARY KEY AUTOINCREMENT, spiffe_id TEXT NOT NULL,
            serial TEXT NOT NULL, not_after INTEGER NOT NULL, attestor TEXT NOT NULL, peer TEXT,
            issued_at INTEGER NOT NULL);
        CREATE INDEX issuances_not_after ON issuances (not_after);
        CREATE TABLE ca_rotations (id INTEGER PRIMARY KEY AUTOINCREMENT, chain_pem TEXT NOT NULL,
            bundle_pem TEXT NOT NULL, key_pem TEXT NOT NULL, prepared_at_ms INTEGER NOT NULL,
            activate_at_ms INTEGER NOT NULL);
        PRAGMA user_version = 2;";

    #[test]
    fn sqlite_url_opens_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.db");
        let db = Database::parse(&format!("sqlite://{}", path.display())).unwrap();
        assert_eq!(db, Database::Sqlite(path.clone()));
        assert!(!db.is_shared());
        let reg = Registry::connect(&db).unwrap();
        assert!(!reg.is_shared());
        assert_eq!(reg.path(), path);
    }
}

#[test]
fn database_urls_are_checked_and_never_show_the_password() {
    assert!(matches!(
        Database::parse("postgres://trellis:pw@db:5432/trellis").unwrap(),
        Database::Postgres(_)
    ));
    assert!(Database::parse("postgresql://trellis:pw@db/trellis")
        .unwrap()
        .is_shared());
    assert_eq!(
        Database::in_state_dir(Path::new("/var/lib/trellis")),
        Database::Sqlite(PathBuf::from("/var/lib/trellis/trellis.db"))
    );
    for bad in [
        "mysql://root:hunter2@db/trellis",
        "sqlite://",
        "postgres://trellis:hunter2@db:99999/trellis",
        "hunter2",
    ] {
        let err = Database::parse(bad).unwrap_err().to_string();
        assert!(
            err.contains("postgres://") || err.contains("sqlite"),
            "{err}"
        );
        if bad != "hunter2" {
            assert!(!err.contains("hunter2"), "{err}");
        }
    }
    let db = Database::parse("postgres://trellis:hunter2@db/trellis").unwrap();
    assert!(!format!("{db} {db:?}").contains("hunter2"));
}

/// PostgreSQL: each fixture is a fresh schema in the database of `TRELLIS_TEST_POSTGRES_URL`
/// (tests run in parallel), dropped at the end.
mod postgres_backend {
    use super::*;

    const ENV: &str = "TRELLIS_TEST_POSTGRES_URL";

    struct PgFixture {
        base: String,
        schema: String,
        db: Database,
    }

    impl Fixture for PgFixture {
        fn handle(&self) -> Registry {
            Registry::connect(&self.db).unwrap()
        }
    }

    impl Drop for PgFixture {
        fn drop(&mut self) {
            if let Ok(mut c) = ::postgres::Client::connect(&self.base, ::postgres::NoTls) {
                let _ = c.batch_execute(&format!("DROP SCHEMA IF EXISTS {} CASCADE", self.schema));
            }
        }
    }

    fn in_ci() -> bool {
        std::env::var("CI")
            .is_ok_and(|v| !v.is_empty() && v != "0" && !v.eq_ignore_ascii_case("false"))
    }

    /// The base URL, or `None` (skipping) outside CI.
    pub(super) fn base_url() -> Option<String> {
        match std::env::var(ENV) {
            Ok(url) if !url.is_empty() => Some(url),
            _ => {
                assert!(
                    !in_ci(),
                    "{ENV} is not set under CI: tests/run.sh starts PostgreSQL and sets it"
                );
                eprintln!(
                    "SKIP PostgreSQL registry tests: {ENV} is not set (bash tests/run.sh sets it)"
                );
                None
            }
        }
    }

    /// `base` with a `search_path` option, so every connection works in `schema`.
    pub(super) fn url_in_schema(base: &str, schema: &str) -> String {
        let sep = if base.contains('?') { '&' } else { '?' };
        format!("{base}{sep}options=-csearch_path%3D{schema}")
    }

    fn fixture() -> Option<PgFixture> {
        let base = base_url()?;
        let schema = format!("trellis_unit_{:016x}", rand::random::<u64>());
        let mut c = ::postgres::Client::connect(&base, ::postgres::NoTls)
            .unwrap_or_else(|e| panic!("{}: {e}", postgres::redact(&base)));
        c.batch_execute(&format!("CREATE SCHEMA {schema}")).unwrap();
        let db = Database::parse(&url_in_schema(&base, &schema)).unwrap();
        Some(PgFixture { base, schema, db })
    }

    all_shared_tests!(fixture);

    #[test]
    fn token_stored_hashed() {
        let Some(f) = fixture() else { return };
        let reg = f.handle();
        let tok = reg
            .create_join_token(&id(), Duration::from_secs(3600), t(0))
            .unwrap();
        let mut c = ::postgres::Client::connect(&f.base, ::postgres::NoTls).unwrap();
        let rows = c
            .query(
                &format!("SELECT t::text FROM {}.join_tokens t", f.schema),
                &[],
            )
            .unwrap();
        let dump: String = rows.iter().map(|r| r.get::<_, String>(0)).collect();
        let parsed = JoinToken::parse(&tok).unwrap();
        let hash: String = verifier_hash(parsed.verifier())
            .iter()
            .map(|&b| char::from(b))
            .collect();
        assert!(!dump.contains(parsed.verifier()), "{dump}");
        assert!(dump.contains(&hash), "{dump}");
        assert!(dump.contains(parsed.selector()), "{dump}");
    }

    /// A database written by the previous build (schema 2) is migrated: its old tokens are
    /// refused, new ones work, and old rows are left for replicas still on that build.
    #[test]
    fn a_version_2_database_is_migrated_and_old_tokens_refused() {
        let Some(f) = fixture() else { return };
        let old = format!("{JOIN_TOKEN_PREFIX}{}", "q".repeat(43));
        let mut c =
            ::postgres::Client::connect(&url_in_schema(&f.base, &f.schema), ::postgres::NoTls)
                .unwrap();
        c.batch_execute(
            "CREATE TABLE trellis_schema (id INTEGER PRIMARY KEY CHECK (id = 1),
                 version BIGINT NOT NULL);
             INSERT INTO trellis_schema VALUES (1, 2);
             CREATE TABLE join_tokens (hash TEXT PRIMARY KEY, spiffe_id TEXT NOT NULL,
                 created_at BIGINT NOT NULL, expires_at BIGINT NOT NULL, redeemed_at BIGINT,
                 redeemed_by_ip TEXT);
             CREATE TABLE ca (id INTEGER PRIMARY KEY CHECK (id = 1), chain_pem TEXT NOT NULL,
                 bundle_pem TEXT NOT NULL, key_pem TEXT NOT NULL);
             CREATE TABLE issuances (id BIGSERIAL PRIMARY KEY, spiffe_id TEXT NOT NULL,
                 serial TEXT NOT NULL, not_after BIGINT NOT NULL, attestor TEXT NOT NULL,
                 peer TEXT, issued_at BIGINT NOT NULL);
             CREATE INDEX issuances_not_after ON issuances (not_after);
             CREATE TABLE ca_rotations (id BIGSERIAL PRIMARY KEY, chain_pem TEXT NOT NULL,
                 bundle_pem TEXT NOT NULL, key_pem TEXT NOT NULL,
                 prepared_at_ms BIGINT NOT NULL, activate_at_ms BIGINT NOT NULL);",
        )
        .unwrap();
        c.execute(
            "INSERT INTO join_tokens (hash, spiffe_id, created_at, expires_at)
             VALUES ($1, $2, 0, 9999999999)",
            &[
                &hex::encode(sha2::Sha256::digest(old.as_bytes())),
                &id().as_str(),
            ],
        )
        .unwrap();
        let reg = f.handle();
        assert_eq!(
            reg.redeem_join_token(&old, ip(1), t(1), WINDOW).unwrap(),
            Err(JoinError::Unknown)
        );
        let tok = reg
            .create_join_token(&id(), Duration::from_secs(3600), t(0))
            .unwrap();
        assert_eq!(
            reg.redeem_join_token(&tok, ip(1), t(1), WINDOW).unwrap(),
            Ok(id())
        );
        let version: i64 = c
            .query_one("SELECT version FROM trellis_schema", &[])
            .unwrap()
            .get(0);
        assert_eq!(version, SCHEMA_VERSION);
        let old_rows: i64 = c
            .query_one(
                "SELECT COUNT(*) FROM join_tokens WHERE selector IS NULL",
                &[],
            )
            .unwrap()
            .get(0);
        assert_eq!(old_rows, 1);
    }

    #[test]
    fn rejects_newer_schema() {
        let Some(f) = fixture() else { return };
        drop(f.handle());
        let mut c = ::postgres::Client::connect(&f.base, ::postgres::NoTls).unwrap();
        c.batch_execute(&format!(
            "UPDATE {}.trellis_schema SET version = 99",
            f.schema
        ))
        .unwrap();
        let err = Registry::connect(&f.db).err().unwrap();
        assert!(
            matches!(err, RegistryError::Schema { found: 99, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("postgres"), "{err}");
    }

    #[test]
    fn wrong_password_fails_without_showing_it() {
        let Some(base) = base_url() else { return };
        let Database::Postgres(url) = Database::parse(&base).unwrap() else {
            panic!("{ENV} is not a postgres:// URL");
        };
        // Same server, wrong password: the error names the server, never the password.
        let wrong = url.redacted().replace(":***@", ":not-the-password-42@");
        let err = Registry::connect(&Database::parse(&wrong).unwrap())
            .err()
            .unwrap()
            .to_string();
        assert!(!err.contains("not-the-password-42"), "{err}");
        assert!(err.contains(":***@"), "{err}");
    }

    #[test]
    fn unreachable_server_is_a_clear_error() {
        if base_url().is_none() {
            return;
        }
        let db = Database::parse("postgres://trellis:hunter2@127.0.0.1:1/trellis").unwrap();
        let err = Registry::connect(&db).err().unwrap().to_string();
        assert!(
            err.starts_with("postgres://trellis:***@127.0.0.1:1/trellis"),
            "{err}"
        );
        assert!(!err.contains("hunter2"), "{err}");
    }

    /// The `postgres` client must not run on an async worker thread; the registry keeps it
    /// on its own thread, so calls from async code (as at control-plane start) just block.
    #[test]
    fn usable_and_droppable_inside_a_tokio_runtime() {
        let Some(f) = fixture() else { return };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            // On an async worker thread, as `ControlPlane::start` opens it.
            let reg = f.handle();
            let tok = reg
                .create_join_token(&id(), Duration::from_secs(3600), t(0))
                .unwrap();
            assert_eq!(
                reg.redeem_join_token(&tok, ip(1), t(1), WINDOW).unwrap(),
                Ok(id())
            );
            drop(reg);
        });
    }

    #[test]
    fn reconnects_after_the_server_drops_the_connection() {
        let Some(f) = fixture() else { return };
        // Its own application_name, so only this registry's sessions are killed.
        let app = format!("trellis_reconnect_{:08x}", rand::random::<u32>());
        let url = format!(
            "{}&application_name={app}",
            url_in_schema(&f.base, &f.schema)
        );
        let reg = Registry::connect(&Database::parse(&url).unwrap()).unwrap();
        reg.issuance_count().unwrap();
        let mut c = ::postgres::Client::connect(&f.base, ::postgres::NoTls).unwrap();
        let killed: i64 = c
            .query_one(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
                 WHERE application_name = $1",
                &[&app],
            )
            .unwrap()
            .get(0);
        assert_eq!(killed, 2, "the registry holds two connections");
        // As after a server restart or failover: the connections sat idle past the check,
        // so the next calls notice the dead sessions and reconnect instead of failing.
        std::thread::sleep(super::postgres::IDLE_CHECK + Duration::from_millis(200));
        reg.issuance_count().unwrap();
        reg.create_join_token(&id(), Duration::from_secs(60), t(0))
            .unwrap();
    }
}

/// What callers answer with "unavailable, retry" (nothing written, the same call works once
/// the database is back) and what they do not.
#[test]
fn unavailable_means_the_database_not_the_request() {
    let sqlite = |code| {
        RegistryError::Db(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(code),
            None,
        ))
    };
    for code in [
        rusqlite::ffi::SQLITE_FULL,
        rusqlite::ffi::SQLITE_READONLY,
        rusqlite::ffi::SQLITE_IOERR,
        rusqlite::ffi::SQLITE_CANTOPEN,
        rusqlite::ffi::SQLITE_BUSY,
    ] {
        assert!(sqlite(code).is_unavailable(), "{}", sqlite(code));
    }
    for code in [
        rusqlite::ffi::SQLITE_CONSTRAINT,
        rusqlite::ffi::SQLITE_CORRUPT,
    ] {
        assert!(!sqlite(code).is_unavailable(), "{}", sqlite(code));
    }
    assert!(!RegistryError::Corrupt("x".into()).is_unavailable());
}

/// A state directory removed under a running control plane: SQLite would keep writing to
/// the unlinked file, so the registry says the file is gone.
#[test]
fn a_vanished_sqlite_file_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    let reg = Registry::open(&state.join("trellis.db")).unwrap();
    reg.check_file().unwrap();
    std::fs::remove_dir_all(&state).unwrap();
    let err = reg.check_file().unwrap_err();
    assert!(err.is_unavailable());
    assert!(err.to_string().contains("is gone from there"), "{err}");
    // Another file in its place is not the one SQLite writes to either.
    std::fs::create_dir(&state).unwrap();
    std::fs::write(state.join("trellis.db"), b"").unwrap();
    assert!(reg.check_file().is_err());
}

/// A state directory renamed away and back: the same file again, writes resume.
#[test]
fn a_sqlite_file_put_back_is_found_again() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    let reg = Registry::open(&state.join("trellis.db")).unwrap();
    let away = dir.path().join("away");
    std::fs::rename(&state, &away).unwrap();
    assert!(reg.check_file().is_err());
    std::fs::rename(&away, &state).unwrap();
    reg.check_file().unwrap();
}
