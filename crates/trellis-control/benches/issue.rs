//! Benchmark: SVID issuance (P-256 key generation + signing).
fn main() {}
