//! The control plane's integration tests through its public API, one module per concern, in
//! one test binary (each binary links the whole dependency tree; one link instead of five).

mod fuzz_bodies;
mod sds_server;
mod state_ca;
mod state_join;
mod state_modes;
