//! The PKCS#11 path against a real token: SoftHSM2 (Debian `softhsm2`, installed by
//! tests/run.sh). SoftHSM reads SOFTHSM2_CONF once, when the module initializes, and a
//! process initializes it once: every test here shares one token directory (made on first
//! use) and uses tokens and labels of its own. Skipped, saying so, without SoftHSM2.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, SystemTime};

use aws_lc_rs::signature::{UnparsedPublicKey, ECDSA_P256_SHA256_ASN1};
use prometheus_client::metrics::counter::Counter;

use super::*;
use crate::ca::Ca;
use trellis_identity::{SpiffeId, TrustDomain};

const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
const PIN: &str = "1234";
/// Tokens: one per concern, since login state is per token and per process.
const MAIN: &str = "trellis-main";
const PIN_TOKEN: &str = "trellis-pin";
const RETRY_TOKEN: &str = "trellis-retry";

struct Hsm {
    dir: PathBuf,
    pin_file: PathBuf,
}

/// The shared token directory with its tokens and a guard that runs the tests here one at a
/// time, or `None` (and a note) without SoftHSM2.
///
/// One at a time: the keyrings of tests running side by side share the process's one module
/// and its per-token login state, so one test's logout or session teardown failed another's
/// calls now and then (`CKR_GENERAL_ERROR`, `CKR_TEMPLATE_INCONSISTENT`, about one run in ten).
/// The control plane opens one keyring per process.
fn hsm() -> Option<(&'static Hsm, MutexGuard<'static, ()>)> {
    static SERIAL: Mutex<()> = Mutex::new(());
    let hsm = shared_hsm()?;
    // A test that failed holding the guard poisons it; the next one still runs.
    Some((hsm, SERIAL.lock().unwrap_or_else(|e| e.into_inner())))
}

/// The shared token directory with its tokens, made on first use.
fn shared_hsm() -> Option<&'static Hsm> {
    static HSM: OnceLock<Option<Hsm>> = OnceLock::new();
    HSM.get_or_init(|| {
        if !Path::new(MODULE).exists() {
            eprintln!(
                "SKIP: {MODULE} not installed (Debian package softhsm2; tests/run.sh installs it)"
            );
            return None;
        }
        let dir = tempfile::tempdir().unwrap().keep();
        std::fs::create_dir(dir.join("tokens")).unwrap();
        let conf = dir.join("softhsm2.conf");
        std::fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                dir.join("tokens").display()
            ),
        )
        .unwrap();
        // Before the module initializes in this process (it reads the variable then).
        std::env::set_var("SOFTHSM2_CONF", &conf);
        for label in [MAIN, PIN_TOKEN, RETRY_TOKEN] {
            let out = Command::new("softhsm2-util")
                .args(["--init-token", "--free", "--label", label, "--pin", PIN])
                .args(["--so-pin", "5678"])
                .env("SOFTHSM2_CONF", &conf)
                .output()
                .unwrap();
            assert!(out.status.success(), "{out:?}");
        }
        let pin_file = dir.join("pin");
        std::fs::write(&pin_file, format!("{PIN}\n")).unwrap();
        // The control plane refuses a PIN file others can read.
        std::fs::set_permissions(
            &pin_file,
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .unwrap();
        Some(Hsm { dir, pin_file })
    })
    .as_ref()
}

fn ring(h: &Hsm, pin_file: &Path, retries: Counter) -> Result<Arc<Pkcs11Keyring>, KeyError> {
    Pkcs11Keyring::open(
        Pkcs11Settings {
            module: MODULE.into(),
            pin_file: pin_file.to_path_buf(),
            sessions: 2,
        },
        retries,
    )
    .inspect(|_| assert!(h.dir.exists()))
}

fn uri(token: &str, object: &str) -> Pkcs11Uri {
    Pkcs11Uri::parse(&format!("pkcs11:token={token};object={object}")).unwrap()
}

#[test]
fn token_key_signs_and_verifies_in_both_encodings() {
    let Some((h, _serial)) = hsm() else { return };
    let ring = ring(h, &h.pin_file, Counter::default()).unwrap();
    ring.generate(Some(MAIN), "sign-test").unwrap();
    // Opened again by URI, as the control plane does.
    let key = Keyring::with_pkcs11(ring)
        .token_key(&uri(MAIN, "sign-test"))
        .unwrap();
    assert!(key.is_token());
    super::tests::assert_signs_in_both_encodings(&key, b"signed inside the token");
}

#[test]
fn generate_refuses_an_existing_label() {
    let Some((h, _serial)) = hsm() else { return };
    let ring = ring(h, &h.pin_file, Counter::default()).unwrap();
    ring.generate(Some(MAIN), "twice").unwrap();
    let err = ring
        .generate(Some(MAIN), "twice")
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("exists already"), "{err}");
}

#[test]
fn wrong_pin_is_named() {
    let Some((h, _serial)) = hsm() else { return };
    let bad = h.dir.join("bad-pin");
    std::fs::write(&bad, "0000\n").unwrap();
    std::fs::set_permissions(&bad, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let ring = ring(h, &bad, Counter::default()).unwrap();
    let err = ring.token(Some(PIN_TOKEN)).err().unwrap().to_string();
    assert!(err.contains("refused the PIN"), "{err}");
    assert!(err.contains("bad-pin"), "names the file: {err}");
    assert!(!err.contains("0000"), "never the PIN: {err}");
}

#[test]
fn missing_token_lists_the_present_ones() {
    let Some((h, _serial)) = hsm() else { return };
    let ring = ring(h, &h.pin_file, Counter::default()).unwrap();
    let err = ring.token(Some("no-such-token")).err().unwrap().to_string();
    assert!(err.contains("no token labelled `no-such-token`"), "{err}");
    assert!(err.contains(MAIN), "{err}");
}

#[test]
fn missing_object_is_named() {
    let Some((h, _serial)) = hsm() else { return };
    let ring = ring(h, &h.pin_file, Counter::default()).unwrap();
    let err = ring
        .key(&uri(MAIN, "no-such-key"))
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("holds no private key with object=no-such-key"),
        "{err}"
    );
}

#[test]
fn unloadable_module_is_named() {
    let Some((h, _serial)) = hsm() else { return };
    let not_a_module = h.dir.join("softhsm2.conf");
    let err = Pkcs11Keyring::open(
        Pkcs11Settings {
            module: not_a_module.clone(),
            pin_file: h.pin_file.clone(),
            sessions: 1,
        },
        Counter::default(),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        err.contains("PKCS#11 module") && err.contains("cannot load"),
        "{err}"
    );
    let err = Pkcs11Keyring::open(
        Pkcs11Settings {
            module: "/nonexistent/libpkcs11.so".into(),
            pin_file: h.pin_file.clone(),
            sessions: 1,
        },
        Counter::default(),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("no such file"), "{err}");
}

#[test]
fn lost_login_is_retried_and_counted() {
    let Some((h, _serial)) = hsm() else { return };
    let retries = Counter::default();
    let ring = ring(h, &h.pin_file, retries.clone()).unwrap();
    let key = SigningKey::token(ring.generate(Some(RETRY_TOKEN), "retry").unwrap());
    key.sign_der(b"before").unwrap();
    assert_eq!(retries.get(), 0);
    // As a token restart or HSM failover does: every session loses its login.
    ring.token(Some(RETRY_TOKEN)).unwrap().force_logout();
    let sig = key.sign_der(b"after").unwrap();
    UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, key.public_key_raw())
        .verify(b"after", &sig)
        .unwrap();
    assert!(retries.get() >= 1, "retries {}", retries.get());
}

#[test]
fn concurrent_signers_share_the_session_pool() {
    let Some((h, _serial)) = hsm() else { return };
    let ring = ring(h, &h.pin_file, Counter::default()).unwrap();
    let key = Arc::new(SigningKey::token(
        ring.generate(Some(MAIN), "pool").unwrap(),
    ));
    let threads: Vec<_> = (0..6)
        .map(|i| {
            let key = Arc::clone(&key);
            std::thread::spawn(move || {
                for j in 0..10 {
                    let msg = format!("{i}-{j}");
                    let sig = key.sign_der(msg.as_bytes()).unwrap();
                    UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, key.public_key_raw())
                        .verify(msg.as_bytes(), &sig)
                        .unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

#[test]
fn ca_with_token_intermediate_issues_svids_that_chain_to_the_root() {
    let Some((h, _serial)) = hsm() else { return };
    let ring = ring(h, &h.pin_file, Counter::default()).unwrap();
    let keys = Keyring::with_pkcs11(Arc::clone(&ring));
    let td = TrustDomain::parse("example.org").unwrap();
    let out = h.dir.join("ca-token");
    let key = SigningKey::token(ring.generate(Some(MAIN), "intermediate").unwrap());
    let files = Ca::init_with_token_key(&td, &out, None, key).unwrap();
    assert!(
        !files.intermediate_key.exists(),
        "no key file for a token key"
    );
    assert!(files.intermediate_csr.exists());
    let uri_text = files.intermediate_key_uri.clone().unwrap();
    assert_eq!(uri_text, format!("pkcs11:token={MAIN};object=intermediate"));
    let ca = Ca::from_token(
        &td,
        &files.intermediate_cert,
        &Pkcs11Uri::parse(&uri_text).unwrap(),
        Some(&files.bundle),
        &keys,
    )
    .unwrap();
    let id = SpiffeId::parse("spiffe://example.org/ns/prod/sa/web").unwrap();
    let now = SystemTime::now();
    let svid = ca.issue(&id, Duration::from_secs(3600), now).unwrap();
    assert_eq!(
        svid.chain().len(),
        2,
        "leaf and the token-held intermediate"
    );
    svid.verify(ca.bundle(), now).unwrap();
    // Nothing under the output directory holds a private key but the offline root's.
    for entry in std::fs::read_dir(&out).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            text.contains("PRIVATE KEY"),
            path.ends_with("root-key.pem"),
            "{}",
            path.display()
        );
    }
    // Rotation material keeps the URI, never the key; it opens again through the keyring.
    let m = Ca::material_from_token(
        &td,
        &files.intermediate_cert,
        &Pkcs11Uri::parse(&uri_text).unwrap(),
        Some(&files.bundle),
        Some(&keys),
    )
    .unwrap();
    assert_eq!(m.key_pem.as_str(), uri_text);
    Ca::from_material_with(&td, &m, Path::new("db"), &keys).unwrap();
    let err = Ca::from_material(&td, &m, Path::new("db"))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("--pkcs11-module"), "{err}");
}

#[test]
fn token_key_not_matching_the_certificate_is_refused() {
    let Some((h, _serial)) = hsm() else { return };
    let ring = ring(h, &h.pin_file, Counter::default()).unwrap();
    let keys = Keyring::with_pkcs11(Arc::clone(&ring));
    let td = TrustDomain::parse("example.org").unwrap();
    let files = Ca::init_offline(&td, &h.dir.join("ca-file")).unwrap();
    ring.generate(Some(MAIN), "other").unwrap();
    let err = Ca::from_token(
        &td,
        &files.intermediate_cert,
        &uri(MAIN, "other"),
        Some(&files.bundle),
        &keys,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        err.contains("private key does not match certificate"),
        "{err}"
    );
    assert!(err.contains("pkcs11:token="), "names the key: {err}");
}

/// The JWT-SVID signer takes the same key type: a key in the token signs JWT-SVIDs that
/// validate against the bundle its public half is published in.
#[test]
fn token_key_signs_jwt_svids() {
    let Some((h, _serial)) = hsm() else { return };
    let ring = ring(h, &h.pin_file, Counter::default()).unwrap();
    ring.generate(Some(MAIN), "jwt-test").unwrap();
    let key = Keyring::with_pkcs11(ring)
        .token_key(&uri(MAIN, "jwt-test"))
        .unwrap();
    let signer = crate::jwt::JwtSigner::from_key(key).unwrap();
    let td = trellis_identity::TrustDomain::parse("example.org").unwrap();
    let subject = trellis_identity::SpiffeId::parse("spiffe://example.org/web").unwrap();
    let now = std::time::SystemTime::now();
    let audiences = vec!["db".to_owned()];
    let token = signer
        .sign(&trellis_identity::jwt::NewJwtSvid {
            subject: &subject,
            audiences: &audiences,
            issued_at: now,
            expires_at: now + std::time::Duration::from_secs(300),
        })
        .unwrap();
    let bundle = trellis_identity::jwt::JwtBundle::new(td, vec![signer.public_key().clone()]);
    let valid = trellis_identity::jwt::validate(
        &token,
        &bundle,
        Some("db"),
        now,
        std::time::Duration::from_secs(30),
    )
    .unwrap();
    assert_eq!(valid.spiffe_id, subject);
}

/// With the CA key in a token, JWT-SVID keys are made in the token too: the registry holds
/// only their URIs, and the signer they open signs tokens that validate.
#[test]
fn jwt_keys_are_made_in_the_token_and_stored_as_uris() {
    let Some((h, _serial)) = hsm() else { return };
    let ring = ring(h, &h.pin_file, Counter::default()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let registry = Arc::new(crate::registry::Registry::open(&dir.path().join("t.db")).unwrap());
    let td = TrustDomain::parse("example.org").unwrap();
    let keys = crate::jwt::JwtKeys::load_with_token(
        Arc::clone(&registry),
        td.clone(),
        crate::jwt::JwtKeyPolicy {
            rotate_every: Duration::from_secs(3600),
            token_ttl: Duration::from_secs(300),
        },
        Arc::new(crate::metrics::ControlMetrics::new()),
        Some(crate::jwt::keys::JwtKeyToken {
            keyring: Keyring::with_pkcs11(ring),
            token: Some(MAIN.to_owned()),
        }),
    )
    .unwrap();
    let rows = registry.jwt_keys().unwrap();
    assert_eq!(rows.len(), 1);
    let stored = String::from_utf8(rows[0].pkcs8.to_vec()).unwrap();
    assert!(
        stored.starts_with("pkcs11:token=trellis-main;object=trellis-jwt-"),
        "{stored}"
    );
    let signer = keys.signer().unwrap();
    let subject = SpiffeId::parse("spiffe://example.org/web").unwrap();
    let now = SystemTime::now();
    let audiences = vec!["db".to_owned()];
    let token = signer
        .sign(&trellis_identity::jwt::NewJwtSvid {
            subject: &subject,
            audiences: &audiences,
            issued_at: now,
            expires_at: now + Duration::from_secs(300),
        })
        .unwrap();
    let bundle = keys.subscribe().borrow().clone();
    trellis_identity::jwt::validate(&token, &bundle, Some("db"), now, Duration::from_secs(30))
        .unwrap();
}

/// Imports a fresh P-256 key pair into `token` with `softhsm2-util --import`, as an operator
/// brings a key made elsewhere, under CKA_LABEL `label` and CKA_ID `id`; returns its public
/// point.
fn import_key(h: &Hsm, token: &str, label: &str, id: &[u8]) -> Vec<u8> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let pem = h.dir.join(format!("{label}-{}.pem", hex::encode(id)));
    std::fs::write(&pem, key.serialize_pem()).unwrap();
    let out = Command::new("softhsm2-util")
        .arg("--import")
        .arg(&pem)
        .args(["--token", token, "--label", label, "--id", &hex::encode(id)])
        .args(["--pin", PIN])
        .env("SOFTHSM2_CONF", h.dir.join("softhsm2.conf"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    std::fs::remove_file(&pem).unwrap();
    key.public_key_raw().to_vec()
}

/// A key addressed by `id=` (CKA_ID), the one attribute that tells apart keys sharing a
/// label: opened without `object=`, and with it; the label alone is refused as ambiguous.
#[test]
fn key_addressed_by_id_opens_when_its_label_is_shared() {
    let Some((h, _serial)) = hsm() else { return };
    // IDs are bytes, not text: NUL, `;` and `%` must survive the URI's percent-encoding.
    let (id_a, id_b) = ([0xa1, 0x00, 0x2f], [0xb2, 0x3b, 0x25]);
    let point_a = import_key(h, MAIN, "by-id", &id_a);
    let point_b = import_key(h, MAIN, "by-id", &id_b);
    let ring = ring(h, &h.pin_file, Counter::default()).unwrap();
    let keys = Keyring::with_pkcs11(Arc::clone(&ring));

    let err = ring.key(&uri(MAIN, "by-id")).err().unwrap().to_string();
    assert!(
        err.contains("matches more than one private key: add id="),
        "{err}"
    );

    let by_id = Pkcs11Uri::parse(&format!("pkcs11:token={MAIN};id=%a1%00%2f")).unwrap();
    let key = ring.key(&by_id).unwrap();
    assert_eq!(key.public_point(), point_a.as_slice());
    assert_eq!(key.uri().id.as_deref(), Some(&id_a[..]));
    let signer = keys.token_key(&by_id).unwrap();
    let sig = signer.sign_der(b"addressed by CKA_ID").unwrap();
    UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, &point_a)
        .verify(b"addressed by CKA_ID", &sig)
        .unwrap();
    assert!(UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, &point_b)
        .verify(b"addressed by CKA_ID", &sig)
        .is_err());

    let both = Pkcs11Uri::parse(&format!("pkcs11:token={MAIN};object=by-id;id=%b2%3b%25")).unwrap();
    assert_eq!(ring.key(&both).unwrap().public_point(), point_b.as_slice());

    let missing = Pkcs11Uri::parse(&format!("pkcs11:token={MAIN};id=%c3")).unwrap();
    let err = ring.key(&missing).err().unwrap().to_string();
    assert!(err.contains("holds no private key with id=c3"), "{err}");
}
