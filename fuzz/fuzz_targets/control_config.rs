//! YAML text → `ControlFile::parse` → `ControlSettings::from_file` must not panic; parse
//! errors name the file.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    trellis_control::config::fuzz_config(data);
});
