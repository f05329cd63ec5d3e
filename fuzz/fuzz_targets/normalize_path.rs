//! Arbitrary string → `normalize_path` must not panic, and a normalized path must come
//! back unchanged (and borrowed) when normalized again.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    trellis_policy::fuzz::normalize(data);
});
