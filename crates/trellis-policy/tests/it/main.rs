//! The policy crate's integration tests through its public API, one module per concern, in
//! one test binary. `tests/no_alloc.rs` stays a binary of its own: it installs a counting
//! global allocator, which would count every other test's allocations too.

mod fuzz_bodies;
mod policy;
mod properties;
