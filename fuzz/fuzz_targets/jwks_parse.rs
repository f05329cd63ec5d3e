//! JSON text → `JwksKeys::parse` must not panic; a parsed set refuses a junk-signed token
//! for each of its keys and algorithms without panicking.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    trellis_control::attest::k8s::fuzz_jwks(data);
});
