//! The cargo-fuzz targets' bodies for this crate (`attest::k8s::fuzz_jwks`,
//! `attest::k8s::fuzz_attest`, `config::fuzz_config`, `webhook::inject::fuzz_review`, called
//! by `fuzz/fuzz_targets/`) run here on stable, so CI checks the same properties: each seed in
//! `fuzz/seeds/<target>/`, then a few thousand byte-level mutations of them (a small
//! deterministic mutator; `TRELLIS_FUZZ_SEED=n` picks another sequence, `TRELLIS_FUZZ_CASES=n`
//! another count). An injected patch must also apply to the pod, as the API server applies it.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use trellis_control::attest::k8s::{fuzz_attest, fuzz_jwks};
use trellis_control::config::fuzz_config;
use trellis_control::webhook::inject::{fuzz_review, SIDECAR_CONTAINER};

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
                v[i] = *[0u8, 0xff, b'\n', b':', b'"', b'{', b'[', b'.', b'/', b'0']
                    .get(rng.random_range(0..10))
                    .unwrap();
            }
            _ => {}
        }
    }
    v
}

fn run(target: &str, body: &dyn Fn(&[u8]), default_cases: u64) {
    let corpus = seeds(target);
    for input in &corpus {
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

/// `fuzz_review`, plus what the API server does with an injected patch: apply it to the pod.
/// It must apply cleanly and leave exactly one sidecar (init) container.
pub fn review_and_apply(data: &[u8]) {
    let Some((pod, patch)) = fuzz_review(data) else {
        return;
    };
    let patch: json_patch::Patch = serde_json::from_value(Value::Array(patch)).unwrap();
    let mut after = pod.clone();
    json_patch::patch(&mut after, &patch)
        .unwrap_or_else(|e| panic!("patch does not apply: {e}\npod: {pod}\npatch: {patch:?}"));
    // Native form: among the init containers; fallback form: among the containers.
    let sidecars: usize = ["initContainers", "containers"]
        .iter()
        .map(|list| {
            after["spec"][*list]
                .as_array()
                .map(|cs| cs.iter().filter(|c| c["name"] == SIDECAR_CONTAINER).count())
                .unwrap_or(0)
        })
        .sum();
    assert_eq!(sidecars, 1, "pod after the patch: {after}");
}

#[test]
fn jwks_parse_body_holds_for_seeds_and_mutations() {
    run("jwks_parse", &fuzz_jwks, 2000);
}

#[test]
fn jwt_attest_body_holds_for_seeds_and_mutations() {
    run(
        "jwt_attest",
        &|data| {
            fuzz_attest(data);
        },
        2000,
    );
}

#[test]
fn control_config_body_holds_for_seeds_and_mutations() {
    run("control_config", &fuzz_config, 3000);
}

#[test]
fn admission_review_body_holds_for_seeds_and_mutations() {
    run("admission_review", &review_and_apply, 3000);
}

/// The valid seeds reach the deep paths (a token is accepted, a pod is injected), so the
/// mutations above start from there.
#[test]
fn seeds_reach_acceptance() {
    let token = std::fs::read(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/seeds/jwt_attest/signed-valid"),
    )
    .unwrap();
    assert!(fuzz_attest(&token));
    let pod = std::fs::read(
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../fuzz/seeds/admission_review/deployment-pod.json"),
    )
    .unwrap();
    assert!(fuzz_review(&pod).is_some());
}

/// Inputs worth pinning (the fuzzers found no failure here so far; add any they find).
#[test]
fn regressions() {
    for input in [
        &b""[..],
        b"{\"keys\": []}",
        b"{\"keys\": [{\"kty\": \"EC\", \"crv\": \"P-256\", \"kid\": \"a\", \"x\": \"\", \"y\": \"\"}]}",
    ] {
        fuzz_jwks(input);
    }
    for input in [
        &b""[..],
        b"\x00",
        b"\x01",
        b"\x01\x00",
        b"\x00..",
        b"\x00a.b.c",
    ] {
        assert!(!fuzz_attest(input));
    }
    for input in [
        &b""[..],
        b"svid_ttl: 0s",
        b"svid_ttl: 18446744073709551615s",
        b"webhook_listen: 127.0.0.1:1",
        b"database: postgres://",
    ] {
        fuzz_config(input);
    }
    for input in [
        &b""[..],
        b"{}",
        b"{\"apiVersion\":\"admission.k8s.io/v1\",\"kind\":\"AdmissionReview\",\"request\":{\"uid\":\"u\",\"kind\":{\"kind\":\"Pod\"},\"operation\":\"CREATE\",\"object\":{}}}",
    ] {
        review_and_apply(input);
    }
}
