//! A Workload API client's bytes → the sidecar's `:authority` rewrite must not panic; every
//! header block it writes decodes and carries a valid authority.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    trellis_sidecar::workload_api::fuzz_rewrite(data);
});
