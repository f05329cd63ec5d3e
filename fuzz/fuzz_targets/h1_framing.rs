//! Arbitrary bytes through the sidecar's HTTP/1.1 request-framing tracker (the smuggling
//! guard in front of hyper) must not panic, and cutting the stream into reads of other sizes
//! must not change what it finds.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    trellis_sidecar::h1_framing::fuzz_framing(data);
});
