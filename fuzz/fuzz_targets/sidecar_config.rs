//! YAML text → `SidecarFile::parse` → `SidecarSettings::from_file` must not panic; parse
//! errors name the file.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    trellis_sidecar::config::fuzz_config(data);
});
