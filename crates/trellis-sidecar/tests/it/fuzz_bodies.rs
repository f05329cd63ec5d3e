//! The cargo-fuzz targets' bodies for this crate (`sds::update::fuzz_response`,
//! `config::fuzz_config`, `h1_framing::fuzz_framing`, `headers::fuzz_headers`, called by
//! `fuzz/fuzz_targets/sds_update.rs`, `sidecar_config.rs`, `h1_framing.rs` and
//! `sidecar_headers.rs`; `workload_api::fuzz_rewrite`, `workload_api_relay.rs`) run here on
//! stable, so CI checks the same properties: each seed in
//! `fuzz/seeds/<target>/`, freshly built SDS responses, then a few thousand byte-level
//! mutations of them (a small deterministic mutator; `TRELLIS_FUZZ_SEED=n` picks another
//! sequence, `TRELLIS_FUZZ_CASES=n` another count).
//!
//! `TRELLIS_WRITE_FUZZ_SEEDS=1 cargo test -p trellis-sidecar --test it fuzz_bodies` rewrites
//! `fuzz/seeds/sds_update/` from the responses built here.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use prost::Message;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use trellis_identity::testca::TestCa;
use trellis_identity::{certs_to_pem, key_to_pem};
use trellis_proto::{
    data_source, secret, CertificateValidationContext, DataSource, DiscoveryResponse, Secret,
    TlsCertificate, SECRET_TYPE_URL,
};
use trellis_sidecar::config::fuzz_config;
use trellis_sidecar::h1_framing::fuzz_framing;
use trellis_sidecar::headers::fuzz_headers;
use trellis_sidecar::sds::update::fuzz_response;
use trellis_sidecar::workload_api::fuzz_rewrite;

fn seeds(target: &str) -> Vec<Vec<u8>> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/seeds")
        .join(target);
    let mut out: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| std::fs::read(e.unwrap().path()).unwrap())
        .collect();
    out.sort();
    out
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Flips, deletes, inserts, truncates and copies bytes: enough to walk off every parser's
/// happy path from a valid seed.
fn mutate(rng: &mut StdRng, seed: &[u8]) -> Vec<u8> {
    let mut v = seed.to_vec();
    for _ in 0..rng.random_range(1..=6) {
        let len = v.len();
        match rng.random_range(0..6) {
            0 if len > 0 => v[rng.random_range(0..len)] = rng.random(),
            1 if len > 0 => {
                v.remove(rng.random_range(0..len));
            }
            2 => v.insert(rng.random_range(0..=len), rng.random()),
            3 if len > 0 => v.truncate(rng.random_range(0..len)),
            4 if len > 1 => {
                let a = rng.random_range(0..len);
                let b = rng.random_range(a..len.min(a + 32));
                let chunk = v[a..=b].to_vec();
                let at = rng.random_range(0..=v.len());
                v.splice(at..at, chunk);
            }
            5 if len > 0 => {
                let i = rng.random_range(0..len);
                v[i] = *[0u8, 0xff, b'\n', b':', b'"', b'-', 0x7f, 0x80]
                    .get(rng.random_range(0..8))
                    .unwrap();
            }
            _ => {}
        }
    }
    v
}

fn run(target: &str, corpus: &[Vec<u8>], body: fn(&[u8]), default_cases: u64) {
    for input in corpus {
        body(input);
    }
    let seed = env_u64("TRELLIS_FUZZ_SEED", 8);
    let cases = env_u64("TRELLIS_FUZZ_CASES", default_cases);
    let mut rng = StdRng::seed_from_u64(seed);
    for _ in 0..cases {
        let input = if corpus.is_empty() || rng.random_ratio(1, 10) {
            let n = rng.random_range(0..128);
            (0..n).map(|_| rng.random()).collect()
        } else {
            let pick = rng.random_range(0..corpus.len());
            mutate(&mut rng, &corpus[pick])
        };
        body(&input);
    }
    println!(
        "{target}: {} seeds + {cases} mutations (seed {seed})",
        corpus.len()
    );
}

fn inline(b: impl Into<Vec<u8>>) -> Option<DataSource> {
    Some(DataSource {
        specifier: Some(data_source::Specifier::InlineBytes(b.into())),
    })
}

fn response(secrets: &[Secret]) -> Vec<u8> {
    DiscoveryResponse {
        version_info: "1".into(),
        resources: secrets
            .iter()
            .map(|s| prost_types::Any {
                type_url: SECRET_TYPE_URL.into(),
                value: s.encode_to_vec(),
            })
            .collect(),
        canary: false,
        type_url: SECRET_TYPE_URL.into(),
        nonce: "n".into(),
    }
    .encode_to_vec()
}

/// Valid and near-valid responses: key in the response or not, chain with an intermediate,
/// a foreign trust domain, a mismatched key, an empty bundle.
fn sds_responses() -> Vec<(&'static str, Vec<u8>)> {
    let ca = TestCa::root("example.org");
    let inter = ca.intermediate();
    let other = TestCa::root("other.org");
    let stranger = TestCa::root("example.org");
    let svid = ca.svid("/ns/prod/sa/web");
    let deep = inter.svid("/ns/prod/sa/db");
    let foreign = other.svid("/ns/x/sa/y");
    let tls = |chain: &[trellis_identity::CertificateDer<'static>], key: Option<String>| Secret {
        name: "default".into(),
        r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
            certificate_chain: inline(certs_to_pem(chain)),
            private_key: key.and_then(|k| inline(k.into_bytes())),
        })),
    };
    let root = |pem: String| Secret {
        name: "ROOTCA".into(),
        r#type: Some(secret::Type::ValidationContext(
            CertificateValidationContext {
                trusted_ca: inline(pem),
                custom_validator_config: None,
            },
        )),
    };
    let key = |s: &trellis_identity::Svid| Some(key_to_pem(s.key()).as_str().to_owned());
    vec![
        (
            "key-in-response",
            response(&[tls(svid.chain(), key(&svid)), root(ca.bundle().to_pem())]),
        ),
        (
            "csr-mode",
            response(&[root(ca.bundle().to_pem()), tls(svid.chain(), None)]),
        ),
        (
            "intermediate-chain",
            response(&[tls(deep.chain(), key(&deep)), root(ca.bundle().to_pem())]),
        ),
        (
            "foreign-trust-domain",
            response(&[
                tls(foreign.chain(), key(&foreign)),
                root(other.bundle().to_pem()),
            ]),
        ),
        (
            "key-mismatch",
            response(&[tls(svid.chain(), key(&deep)), root(ca.bundle().to_pem())]),
        ),
        (
            "unrelated-bundle",
            response(&[
                tls(svid.chain(), key(&svid)),
                root(stranger.bundle().to_pem()),
            ]),
        ),
    ]
}

#[test]
fn sds_update_body_holds_for_seeds_and_mutations() {
    let built = sds_responses();
    if std::env::var_os("TRELLIS_WRITE_FUZZ_SEEDS").is_some() {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/seeds/sds_update");
        std::fs::create_dir_all(&dir).unwrap();
        for (name, bytes) in &built {
            std::fs::write(dir.join(name), bytes).unwrap();
        }
    }
    let mut corpus = seeds("sds_update");
    corpus.extend(built.into_iter().map(|(_, b)| b));
    run("sds_update", &corpus, fuzz_response, 3000);
}

#[test]
fn sidecar_config_body_holds_for_seeds_and_mutations() {
    run(
        "sidecar_config",
        &seeds("sidecar_config"),
        fuzz_config,
        3000,
    );
}

/// Inputs worth pinning (the fuzzers found no failure here so far; add any they find).
#[test]
fn h1_framing_body_holds_for_seeds_and_mutations() {
    run("h1_framing", &seeds("h1_framing"), fuzz_framing, 5000);
}

#[test]
fn sidecar_headers_body_holds_for_seeds_and_mutations() {
    run(
        "sidecar_headers",
        &seeds("sidecar_headers"),
        fuzz_headers,
        5000,
    );
}

#[test]
fn regressions() {
    for input in [
        &b""[..],
        b"\xff\xff\xff",
        b"inbound: {tcp: [{listen: 127.0.0.1:1, app: 127.0.0.1:1}]}",
        b"identity: {sds: {}, files: {cert: a, key: b, bundle: c}}",
        b"drain_timeout: 99999999999999999999s",
        b"x: &a [*a, *a]",
    ] {
        fuzz_config(input);
    }
    for input in [&b""[..], b"\x12\x00", b"\x12\x02\x0a\x00"] {
        fuzz_response(input);
    }
}

#[test]
fn workload_api_relay_body_holds_for_seeds_and_mutations() {
    run(
        "workload_api_relay",
        &seeds("workload_api_relay"),
        fuzz_rewrite,
        3000,
    );
}
