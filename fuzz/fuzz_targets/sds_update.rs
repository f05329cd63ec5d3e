//! Protobuf bytes → a `DiscoveryResponse` → the sidecar's SDS update decoding and validation
//! (both key modes, SVID rules, chain against the bundle) must not panic; refusals carry
//! label-shaped reasons.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    trellis_sidecar::sds::update::fuzz_response(data);
});
