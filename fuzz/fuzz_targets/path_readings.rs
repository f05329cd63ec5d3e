//! Arbitrary string as a raw request path → its readings (`;` parameters stripped or not,
//! case folded or not) and `decide_request` must not panic, and under `deny /admin/**` no
//! reading of an allowed path may be `/admin` or below it, in any case.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    trellis_policy::fuzz::path_readings(data);
});
