//! Benchmark: the server's CPU per full mTLS handshake between two Trellis ends (the configs,
//! SPIFFE verifiers and resolver the sidecars use, over memory), by key-exchange group, and the
//! pieces of it Trellis adds: chain verification, SPIFFE ID extraction, certificate parsing.
//! Plus the request path's bulk encryption (TLS 1.3 records of 16 KiB, server to client).
//!
//! `cargo bench -p trellis-identity --bench handshake`
#![allow(missing_docs, clippy::unwrap_used)]

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rustls::pki_types::ServerName;
use rustls::{ClientConnection, ServerConnection};
use trellis_identity::testca::TestCa;
use trellis_identity::tls::{
    peer_spiffe_id, provider_for, KeyExchange, PeerMatch, SpiffeClientVerifier,
    SpiffeServerVerifier, SvidResolver, TlsPolicy,
};
use trellis_identity::{cert_facts, verify_svid_chain, Usage};

struct Ends {
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
}

/// Sidecar-like configs: TLS 1.3, mutual, no resumption, the server on `server_kx` and the
/// client on `client_kx`.
fn ends(ca: &TestCa, server_kx: KeyExchange, client_kx: KeyExchange) -> Ends {
    let bundle = ca.shared_bundle();
    let (server_id, client_id) = (SvidResolver::empty(), SvidResolver::empty());
    server_id.install(&ca.svid("/ns/demo/sa/b")).unwrap();
    client_id.install(&ca.svid("/ns/demo/sa/a")).unwrap();
    let mut server = rustls::ServerConfig::builder_with_provider(Arc::new(provider_for(server_kx)))
        .with_protocol_versions(TlsPolicy::Tls13.versions())
        .unwrap()
        .with_client_cert_verifier(SpiffeClientVerifier::new(bundle.clone(), false))
        .with_cert_resolver(server_id);
    server.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    server.send_tls13_tickets = 0;
    let mut client = rustls::ClientConfig::builder_with_provider(Arc::new(provider_for(client_kx)))
        .with_protocol_versions(TlsPolicy::Tls13.versions())
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(SpiffeServerVerifier::new(
            bundle,
            PeerMatch::AnyInTrustDomain,
        ))
        .with_client_cert_resolver(client_id);
    client.resumption = rustls::client::Resumption::disabled();
    Ends {
        server: Arc::new(server),
        client: Arc::new(client),
    }
}

/// One full handshake over memory; returns the time spent in the server's calls only, and
/// the established pair.
fn handshake(ends: &Ends) -> (Duration, ClientConnection, ServerConnection) {
    let name = ServerName::try_from("b.example.org").unwrap();
    let mut client = ClientConnection::new(ends.client.clone(), name).unwrap();
    let started = Instant::now();
    let mut server = ServerConnection::new(ends.server.clone()).unwrap();
    let mut in_server = started.elapsed();
    let mut buf = Vec::with_capacity(8192);
    while client.is_handshaking() || server.is_handshaking() {
        buf.clear();
        while client.wants_write() {
            client.write_tls(&mut buf).unwrap();
        }
        let started = Instant::now();
        feed(&mut server, &buf);
        buf.clear();
        while server.wants_write() {
            server.write_tls(&mut buf).unwrap();
        }
        in_server += started.elapsed();
        feed(&mut client, &buf);
    }
    (in_server, client, server)
}

/// Hands all of `wire` to one side (never an empty read: that would read as the peer's EOF).
fn feed<D>(conn: &mut rustls::ConnectionCommon<D>, mut wire: &[u8]) {
    while !wire.is_empty() {
        conn.read_tls(&mut wire).unwrap();
        conn.process_new_packets().unwrap();
    }
}

fn bench(c: &mut Criterion) {
    let ca = TestCa::root("example.org");

    let mut group = c.benchmark_group("mtls_handshake_server_cpu");
    for (name, server_kx, client_kx) in [
        (
            "X25519MLKEM768",
            KeyExchange::PqPreferred,
            KeyExchange::PqPreferred,
        ),
        ("X25519", KeyExchange::Classical, KeyExchange::Classical),
    ] {
        let ends = ends(&ca, server_kx, client_kx);
        let (_, _, server) = handshake(&ends);
        assert_eq!(
            trellis_identity::tls::negotiated_group(&server),
            name,
            "the benchmark must measure the group it is named for"
        );
        group.bench_function(name, |b| {
            b.iter_custom(|iters| (0..iters).map(|_| handshake(&ends).0).sum())
        });
    }
    group.finish();

    // What Trellis adds per handshake, apart from rustls' own work.
    let bundle = ca.bundle();
    let svid = ca.svid("/ns/demo/sa/a");
    let chain = svid.chain().to_vec();
    c.bench_function("verify_svid_chain", |b| {
        b.iter(|| {
            black_box(
                verify_svid_chain(black_box(&chain), &bundle, SystemTime::now(), Usage::Client)
                    .unwrap(),
            )
        })
    });
    c.bench_function("cert_facts", |b| {
        b.iter(|| black_box(cert_facts(black_box(&chain[0])).unwrap()))
    });
    c.bench_function("peer_spiffe_id", |b| {
        b.iter(|| black_box(peer_spiffe_id(Some(black_box(&chain[..]))).unwrap()))
    });

    // The request path: TLS 1.3 records, server to client, on an established connection.
    let ends = ends(&ca, KeyExchange::PqPreferred, KeyExchange::PqPreferred);
    let (_, mut client, mut server) = handshake(&ends);
    let payload = vec![0x5au8; 16 * 1024];
    let mut wire = Vec::with_capacity(32 * 1024);
    let mut plain = vec![0u8; 32 * 1024];
    let suite = server.negotiated_cipher_suite().unwrap().suite();
    let mut group = c.benchmark_group("record_16k");
    group.throughput(Throughput::Bytes(payload.len() as u64));
    group.bench_function(format!("{suite:?}").as_str(), |b| {
        b.iter(|| {
            use std::io::{Read as _, Write as _};
            server.writer().write_all(&payload).unwrap();
            wire.clear();
            while server.wants_write() {
                server.write_tls(&mut wire).unwrap();
            }
            feed(&mut client, &wire);
            let mut got = 0;
            while got < payload.len() {
                got += client.reader().read(&mut plain).unwrap();
            }
            black_box(got)
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(30)
        .measurement_time(Duration::from_secs(4))
        .warm_up_time(Duration::from_secs(1));
    targets = bench
}
criterion_main!(benches);
