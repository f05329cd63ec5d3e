//! A token (first byte even) or `header NUL claims` signed with the fixture key (odd) →
//! `K8sAttestor::attest` against a fixed JWKS must not panic; an accepted token is ES256
//! with the fixture `kid` and yields a well-formed `ns/<ns>/sa/<sa>` SPIFFE ID.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = trellis_control::attest::k8s::fuzz_attest(data);
});
