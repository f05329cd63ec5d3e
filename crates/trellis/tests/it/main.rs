//! The `trellis` binary's integration tests (the example configs, `trellis policy` as an
//! operator runs it), one module per concern, in one test binary.

mod examples;
mod policy_cli;
