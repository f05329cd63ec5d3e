//! `trellis ca init` output and operator-supplied CA files: what `Ca::from_files` accepts and
//! the message a user gets for each thing it refuses.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::time::{Duration, SystemTime};

use trellis_control::ca::{Ca, CaError, OfflineCaFiles};
use trellis_identity::{cert_facts, verify_svid_chain, SpiffeId, TrustDomain, Usage};

const DAY: Duration = Duration::from_secs(86_400);

fn td() -> TrustDomain {
    TrustDomain::parse("example.org").unwrap()
}

fn id() -> SpiffeId {
    SpiffeId::parse("spiffe://example.org/ns/prod/sa/web").unwrap()
}

fn init(dir: &Path) -> OfflineCaFiles {
    Ca::init_offline(&td(), &dir.join("ca")).unwrap()
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn from_files(f: &OfflineCaFiles) -> Result<Ca, CaError> {
    Ca::from_files(
        &td(),
        &f.intermediate_cert,
        &f.intermediate_key,
        Some(&f.bundle),
    )
}

/// The message, which must name `path`.
fn err_naming(r: Result<Ca, CaError>, path: &Path) -> String {
    let msg = match r {
        Ok(_) => panic!("accepted"),
        Err(e) => e.to_string(),
    };
    assert!(
        msg.starts_with(&path.display().to_string()),
        "message does not name {}: {msg}",
        path.display()
    );
    msg
}

#[test]
fn init_offline_then_from_files_issues_verifiable_svid() {
    let dir = tempfile::tempdir().unwrap();
    let f = init(dir.path());
    let ca = from_files(&f).unwrap();
    let now = SystemTime::now();
    let svid = ca.issue(&id(), DAY, now).unwrap();

    // X509-SVID chain: leaf then the intermediate; the root only in the bundle.
    assert_eq!(svid.chain().len(), 2);
    let intermediate =
        trellis_identity::certs_from_pem(&std::fs::read(&f.intermediate_cert).unwrap()).unwrap();
    assert_eq!(svid.chain()[1], intermediate[0]);
    assert_eq!(
        ca.bundle().to_pem(),
        std::fs::read_to_string(&f.bundle).unwrap()
    );
    assert_eq!(
        verify_svid_chain(svid.chain(), ca.bundle(), now, Usage::Either).unwrap(),
        id()
    );
    // Capped by the intermediate (1 year), not the root (10 years).
    let int = cert_facts(&intermediate[0]).unwrap();
    assert_eq!(ca.not_after(), int.not_after);
    let far = ca.issue(&id(), 400 * DAY, now).unwrap();
    assert_eq!(far.not_after(), int.not_after);
}

#[test]
fn init_offline_file_modes_and_profiles() {
    let dir = tempfile::tempdir().unwrap();
    let f = init(dir.path());
    assert_eq!(mode(&dir.path().join("ca")), 0o700);
    assert_eq!(mode(&f.root_key), 0o600);
    assert_eq!(mode(&f.intermediate_key), 0o600);
    assert_eq!(
        std::fs::read(&f.root_cert).unwrap(),
        std::fs::read(&f.bundle).unwrap()
    );
    let int =
        trellis_identity::certs_from_pem(&std::fs::read(&f.intermediate_cert).unwrap()).unwrap();
    let facts = cert_facts(&int[0]).unwrap();
    assert!(facts.is_ca);
    assert_eq!(facts.uri_sans, vec!["spiffe://example.org".to_string()]);
    let life = facts.not_after.duration_since(facts.not_before).unwrap();
    assert!(life > 364 * DAY && life < 367 * DAY, "{life:?}");
}

#[test]
fn init_offline_refuses_to_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let f = init(dir.path());
    let before = std::fs::read(&f.root_key).unwrap();
    let err = Ca::init_offline(&td(), &dir.path().join("ca")).unwrap_err();
    assert!(err.to_string().contains("refusing to overwrite"), "{err}");
    assert_eq!(std::fs::read(&f.root_key).unwrap(), before);
}

#[test]
fn accepts_cert_file_with_root_appended_and_no_bundle() {
    let dir = tempfile::tempdir().unwrap();
    let f = init(dir.path());
    let full = dir.path().join("full-chain.pem");
    let mut pem = std::fs::read_to_string(&f.intermediate_cert).unwrap();
    pem.push_str(&std::fs::read_to_string(&f.root_cert).unwrap());
    std::fs::write(&full, pem).unwrap();
    let ca = Ca::from_files(&td(), &full, &f.intermediate_key, None).unwrap();
    let svid = ca.issue(&id(), DAY, SystemTime::now()).unwrap();
    // The root is the bundle, never part of the chain.
    assert_eq!(svid.chain().len(), 2);
    assert_eq!(
        ca.bundle().to_pem(),
        std::fs::read_to_string(&f.root_cert).unwrap()
    );
}

#[test]
fn rejects_missing_bundle_when_cert_file_has_no_root() {
    let dir = tempfile::tempdir().unwrap();
    let f = init(dir.path());
    let r = Ca::from_files(&td(), &f.intermediate_cert, &f.intermediate_key, None);
    let msg = err_naming(r, &f.intermediate_cert);
    assert!(msg.contains("--ca-bundle"), "{msg}");
}

#[test]
fn rejects_ca_key_not_matching_cert() {
    let dir = tempfile::tempdir().unwrap();
    let f = init(dir.path());
    // The root key is a fine key, just not the intermediate's.
    let r = Ca::from_files(&td(), &f.intermediate_cert, &f.root_key, Some(&f.bundle));
    let msg = err_naming(r, &f.root_key);
    assert!(
        msg.contains(&format!(
            "private key does not match certificate {}",
            f.intermediate_cert.display()
        )),
        "{msg}"
    );
}

#[test]
fn rejects_unreadable_ca_file() {
    let dir = tempfile::tempdir().unwrap();
    let f = init(dir.path());
    let missing = dir.path().join("nope.pem");
    let r = Ca::from_files(&td(), &missing, &f.intermediate_key, Some(&f.bundle));
    assert!(matches!(r, Err(CaError::Read { .. })));
    let msg = err_naming(r, &missing);
    assert!(msg.contains("cannot read"), "{msg}");

    // A directory where the key should be: readable metadata, unreadable content.
    let as_dir = dir.path().join("key-dir");
    std::fs::create_dir(&as_dir).unwrap();
    std::fs::set_permissions(&as_dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    let r = Ca::from_files(&td(), &f.intermediate_cert, &as_dir, Some(&f.bundle));
    assert!(matches!(r, Err(CaError::Read { .. })));
    err_naming(r, &as_dir);

    let r = Ca::from_files(
        &td(),
        &f.intermediate_cert,
        &f.intermediate_key,
        Some(&missing),
    );
    err_naming(r, &missing);
}

#[test]
fn rejects_cert_file_that_is_not_pem() {
    let dir = tempfile::tempdir().unwrap();
    let f = init(dir.path());
    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "hello\n").unwrap();
    let r = Ca::from_files(&td(), &junk, &f.intermediate_key, Some(&f.bundle));
    let msg = err_naming(r, &junk);
    assert!(msg.contains("expected a PEM CERTIFICATE block"), "{msg}");
}

#[test]
fn rejects_key_file_that_is_not_a_key() {
    let dir = tempfile::tempdir().unwrap();
    let f = init(dir.path());
    let junk = dir.path().join("junk-key.pem");
    std::fs::write(&junk, std::fs::read(&f.intermediate_cert).unwrap()).unwrap();
    std::fs::set_permissions(&junk, std::fs::Permissions::from_mode(0o600)).unwrap();
    let r = Ca::from_files(&td(), &f.intermediate_cert, &junk, Some(&f.bundle));
    let msg = err_naming(r, &junk);
    assert!(msg.contains("PRIVATE KEY"), "{msg}");
}

#[test]
fn rejects_non_ca_cert() {
    // A leaf (an SVID) with its own key, offered as the signing CA.
    let dir = tempfile::tempdir().unwrap();
    let f = init(dir.path());
    let ca = from_files(&f).unwrap();
    let svid = ca.issue(&id(), DAY, SystemTime::now()).unwrap();
    let cert = dir.path().join("leaf.pem");
    let key = dir.path().join("leaf-key.pem");
    std::fs::write(&cert, trellis_identity::certs_to_pem(svid.chain())).unwrap();
    std::fs::write(&key, trellis_identity::key_to_pem(svid.key()).as_bytes()).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let r = Ca::from_files(&td(), &cert, &key, Some(&f.bundle));
    let msg = err_naming(r, &cert);
    assert!(
        msg.contains("is not a CA certificate (basicConstraints cA=false)"),
        "{msg}"
    );
    assert!(msg.contains("trellis ca init"), "{msg}");
}

#[test]
fn rejects_world_readable_ca_key() {
    let dir = tempfile::tempdir().unwrap();
    let f = init(dir.path());
    std::fs::set_permissions(&f.intermediate_key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let msg = err_naming(from_files(&f), &f.intermediate_key);
    assert_eq!(
        msg,
        format!(
            "{0}: mode 0644 is readable by others; run chmod 600 {0}",
            f.intermediate_key.display()
        )
    );
}

#[test]
fn rejects_world_readable_or_group_writable_ca_key() {
    // A root-owned key may be group-readable (a Kubernetes Secret under fsGroup); nothing
    // else may read it, and nobody else may write it.
    let dir = tempfile::tempdir().unwrap();
    let f = init(dir.path());
    for mode in [0o644, 0o660, 0o604] {
        std::fs::set_permissions(&f.intermediate_key, std::fs::Permissions::from_mode(mode))
            .unwrap();
        let msg = err_naming(from_files(&f), &f.intermediate_key);
        assert!(msg.contains(&format!("mode {mode:04o}")), "{msg}");
    }
}

#[test]
fn rejects_intermediate_from_another_root() {
    let dir = tempfile::tempdir().unwrap();
    let f = init(dir.path());
    let other = Ca::init_offline(&td(), &dir.path().join("other")).unwrap();
    let r = Ca::from_files(
        &td(),
        &f.intermediate_cert,
        &f.intermediate_key,
        Some(&other.bundle),
    );
    let msg = err_naming(r, &f.intermediate_cert);
    assert!(msg.contains("does not chain to the trust bundle"), "{msg}");
}

#[test]
fn rejects_ca_made_for_another_trust_domain() {
    let dir = tempfile::tempdir().unwrap();
    let f = init(dir.path());
    let other = TrustDomain::parse("other.org").unwrap();
    let r = Ca::from_files(
        &other,
        &f.intermediate_cert,
        &f.intermediate_key,
        Some(&f.bundle),
    );
    let msg = err_naming(r, &f.intermediate_cert);
    assert!(msg.contains("not trust domain `other.org`"), "{msg}");
}

#[test]
fn rejects_expired_intermediate() {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, KeyUsagePurpose};
    let dir = tempfile::tempdir().unwrap();
    let f = init(dir.path());
    // Re-sign an intermediate with the offline root, valid only in the past.
    let root_key = KeyPair::from_pem(&std::fs::read_to_string(&f.root_key).unwrap()).unwrap();
    let root = Issuer::from_ca_cert_pem(&std::fs::read_to_string(&f.root_cert).unwrap(), root_key)
        .unwrap();
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut p = CertificateParams::default();
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    p.not_before = rcgen::date_time_ymd(2020, 1, 1);
    p.not_after = rcgen::date_time_ymd(2021, 1, 1);
    let cert = p.signed_by(&key, &root).unwrap();
    let cert_path = dir.path().join("old.pem");
    let key_path = dir.path().join("old-key.pem");
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let r = Ca::from_files(&td(), &cert_path, &key_path, Some(&f.bundle));
    let msg = err_naming(r, &cert_path);
    assert!(msg.contains("not valid now"), "{msg}");
}
