//! Benchmark: SVID issuance (P-256 key generation + signing), and signing a CSR; each also
//! with the transparency-log entry the issuing thread builds from the new certificate; and
//! recording a batch of 1,024 issuances with their log entries (the recorder thread's write).
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

criterion_group!(benches, bench, record);
criterion_main!(benches);
