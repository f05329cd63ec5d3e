//! The sidecar's integration tests, one module per concern, in one test binary (each binary
//! links the whole dependency tree; one link instead of nine). The data path and policy
//! tests share `datapath_support` and `policy_support`; the SDS client tests drive the one fake
//! SDS server of the test-support crate (`trellis_tests::sds_server`).

mod datapath_support;
mod policy_support;

mod datapath_http;
mod datapath_tls;
mod fuzz_bodies;
mod identity_files;
mod identity_sds;
mod identity_sds_nack;
mod policy_http;
mod policy_l4;
mod policy_reload;
