//! Arbitrary text (two files when it holds a NUL byte) → `compile` must not panic; a
//! policy that compiles must lint, explain and decide without panicking, and decide
//! exactly as the unindexed reference evaluation.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    trellis_policy::fuzz::policy_parse(data);
});
