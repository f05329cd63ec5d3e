//! Benchmark: SVID issuance (P-256 key generation + signing), and signing a CSR.
#![allow(missing_docs)]

use std::hint::black_box;
use std::time::{Duration, SystemTime};

use criterion::{criterion_group, criterion_main, Criterion};
use trellis_control::ca::Ca;
use trellis_control::registry::Registry;
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

criterion_group!(benches, bench);
criterion_main!(benches);
