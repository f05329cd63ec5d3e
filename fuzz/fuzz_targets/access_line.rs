//! Arbitrary bytes → `parse_access_line` (what `trellis policy replay` reads from sidecar
//! logs) must not panic, a record must replay, and a line cut short must not read as another
//! record.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    trellis_policy::fuzz::access_line(data);
});
