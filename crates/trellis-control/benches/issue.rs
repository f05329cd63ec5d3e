//! Benchmark: SVID issuance (P-256 key generation + signing), and signing a CSR; each also
//! with the transparency-log entry the issuing thread builds from the new certificate; and
//! recording a batch of 1,024 issuances with their log entries (the recorder thread's write);
//! and issuance and CSR signing with the intermediate's key in a PKCS#11 token (SoftHSM2, when
//! installed: `pkcs11/…`) next to the same intermediate profile with a file key (`file/…`).
#![allow(missing_docs)]

use std::hint::black_box;
use std::time::{Duration, SystemTime};

use criterion::{criterion_group, criterion_main, Criterion};
use trellis_control::ca::Ca;
use trellis_control::registry::{IssuanceRecord, Registry};
use trellis_control::translog::issuance_body;
use trellis_identity::{SpiffeId, TrustDomain};

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temp dir");
    let registry = Registry::open(&dir.path().join("trellis.db")).expect("registry");
    let td = TrustDomain::parse("example.org").expect("trust domain");
    let ca = Ca::load_or_create(&registry, &td).expect("CA");
    let id = SpiffeId::parse("spiffe://example.org/ns/prod/sa/web").expect("SPIFFE ID");
    let ttl = Duration::from_secs(86_400);

    c.bench_function("svid_issue", |b| {
        b.iter(|| {
            black_box(
                ca.issue(black_box(&id), ttl, SystemTime::now())
                    .expect("issue"),
            )
        })
    });

    c.bench_function("svid_issue_with_log_entry", |b| {
        b.iter(|| {
            let svid = ca
                .issue(black_box(&id), ttl, SystemTime::now())
                .expect("issue");
            black_box(issuance_body(&svid.chain()[0], "k8s").expect("log entry"))
        })
    });

    let key = rcgen::KeyPair::generate().expect("key");
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = vec![rcgen::SanType::URI(
        id.as_str().try_into().expect("URI SAN"),
    )];
    let csr = params
        .serialize_request(&key)
        .expect("CSR")
        .pem()
        .expect("CSR PEM");
    c.bench_function("svid_sign_csr", |b| {
        b.iter(|| {
            black_box(
                ca.sign_csr(black_box(&csr), &id, ttl, SystemTime::now())
                    .expect("sign CSR"),
            )
        })
    });
}

fn record(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temp dir");
    let registry = Registry::open(&dir.path().join("trellis.db")).expect("registry");
    let td = TrustDomain::parse("example.org").expect("trust domain");
    let ca = Ca::load_or_create(&registry, &td).expect("CA");
    let id = SpiffeId::parse("spiffe://example.org/ns/prod/sa/web").expect("SPIFFE ID");
    let svid = ca
        .issue(&id, Duration::from_secs(86_400), SystemTime::now())
        .expect("issue");
    let rec = IssuanceRecord {
        spiffe_id: id,
        serial_hex: svid.serial_hex().to_owned(),
        not_after: svid.not_after(),
        attestor: "k8s",
        peer: None,
        issued_at: SystemTime::now(),
        log: issuance_body(&svid.chain()[0], "k8s").expect("log entry"),
    };
    let batch = vec![rec; 1024];
    let mut g = c.benchmark_group("record");
    g.throughput(criterion::Throughput::Elements(1024));
    g.sample_size(10);
    g.bench_function("batch_1024_with_log_entries", |b| {
        b.iter(|| {
            registry
                .record_issuances(black_box(&batch))
                .expect("record")
        })
    });
    g.finish();
}

const SOFTHSM: &str = "/usr/lib/softhsm/libsofthsm2.so";

/// An intermediate under a fresh offline root, with its key in a file (`None`) or made in a
/// SoftHSM2 token.
fn intermediate(
    td: &TrustDomain,
    dir: &std::path::Path,
    token: Option<&trellis_control::keys::Keyring>,
) -> Ca {
    use trellis_control::keys::{Pkcs11Uri, SigningKey};
    match token {
        None => {
            let files = Ca::init_offline(td, &dir.join("file-ca")).expect("ca init");
            Ca::from_files(
                td,
                &files.intermediate_cert,
                &files.intermediate_key,
                Some(&files.bundle),
            )
            .expect("file CA")
        }
        Some(keys) => {
            let ring = keys.pkcs11().expect("module");
            let key = ring.generate(Some("bench"), "bench-ca").expect("token key");
            let files =
                Ca::init_with_token_key(td, &dir.join("token-ca"), None, SigningKey::token(key))
                    .expect("ca init");
            let uri = Pkcs11Uri::parse(&files.intermediate_key_uri.expect("uri")).expect("uri");
            Ca::from_token(
                td,
                &files.intermediate_cert,
                &uri,
                Some(&files.bundle),
                keys,
            )
            .expect("token CA")
        }
    }
}

/// A SoftHSM2 token `bench` in `dir` (PIN 1234), or `None` without SoftHSM2.
fn softhsm(dir: &std::path::Path) -> Option<trellis_control::keys::Keyring> {
    use trellis_control::keys::{Keyring, Pkcs11Keyring, Pkcs11Settings};
    if !std::path::Path::new(SOFTHSM).exists() {
        eprintln!("pkcs11 benchmarks skipped: {SOFTHSM} not installed (Debian softhsm2)");
        return None;
    }
    std::fs::create_dir_all(dir.join("tokens")).expect("token dir");
    let conf = dir.join("softhsm2.conf");
    std::fs::write(
        &conf,
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
            dir.join("tokens").display()
        ),
    )
    .expect("conf");
    // Read by the module when it initializes, below.
    std::env::set_var("SOFTHSM2_CONF", &conf);
    let ok = std::process::Command::new("softhsm2-util")
        .args([
            "--init-token",
            "--free",
            "--label",
            "bench",
            "--pin",
            "1234",
            "--so-pin",
            "5678",
        ])
        .status()
        .expect("softhsm2-util")
        .success();
    assert!(ok, "softhsm2-util --init-token failed");
    std::fs::write(dir.join("pin"), "1234\n").expect("pin");
    std::fs::set_permissions(
        dir.join("pin"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .expect("pin mode");
    let ring = Pkcs11Keyring::open(
        Pkcs11Settings {
            module: SOFTHSM.into(),
            pin_file: dir.join("pin"),
            sessions: 4,
        },
        Default::default(),
    )
    .expect("PKCS#11 module");
    Some(Keyring::with_pkcs11(ring))
}

/// The same intermediate profile with a file key and a token key: `svid_issue` (key pair
/// made here, leaf signed by the CA key) and `svid_sign_csr`.
fn key_sources(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temp dir");
    let td = TrustDomain::parse("example.org").expect("trust domain");
    let id = SpiffeId::parse("spiffe://example.org/ns/prod/sa/web").expect("SPIFFE ID");
    let ttl = Duration::from_secs(86_400);
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = vec![rcgen::SanType::URI(
        id.as_str().try_into().expect("URI SAN"),
    )];
    let csr = params
        .serialize_request(&key)
        .expect("CSR")
        .pem()
        .expect("CSR PEM");
    let token = softhsm(dir.path());
    let mut sources = vec![("file", intermediate(&td, dir.path(), None))];
    if let Some(keys) = &token {
        sources.push(("pkcs11", intermediate(&td, dir.path(), Some(keys))));
    }
    for (name, ca) in &sources {
        let mut g = c.benchmark_group(*name);
        g.throughput(criterion::Throughput::Elements(1));
        g.bench_function("svid_issue", |b| {
            b.iter(|| black_box(ca.issue(&id, ttl, SystemTime::now()).expect("issue")))
        });
        g.bench_function("svid_sign_csr", |b| {
            b.iter(|| {
                black_box(
                    ca.sign_csr(&csr, &id, ttl, SystemTime::now())
                        .expect("sign CSR"),
                )
            })
        });
        g.finish();
    }
}

criterion_group!(benches, bench, record, key_sources);
criterion_main!(benches);
