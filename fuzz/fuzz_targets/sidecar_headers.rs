//! Arbitrary header fields through the inbound sidecar's header rules (owned headers in any
//! spelling, underscore names, one Host) must not panic, and what is left for the app never
//! holds a spelling of an owned header.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    trellis_sidecar::headers::fuzz_headers(data);
});
