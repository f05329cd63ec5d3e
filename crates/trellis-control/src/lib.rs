//! The Trellis control plane: a certificate authority for one SPIFFE trust domain.
//!
//! It attests workloads ([`attest`]), issues short-lived X.509-SVIDs ([`ca`]), pushes them with
//! the trust bundle over Envoy's SDS v3 ([`sds`]), rotates them, and writes an audit line for
//! every issuance and every rejected attestation ([`audit`]).
#![warn(missing_docs)]

pub mod admin;
pub mod attest;
pub mod audit;
pub mod authority;
pub mod ca;
pub mod client;
pub mod clock_guard;
pub mod config;
pub mod db_health;
pub mod federation;
pub mod https_url;
pub mod jwt;
pub mod keys;
pub mod metrics;
pub mod operator;
pub mod ratelimit;
pub mod recorder;
pub mod registry;
pub mod sds;
pub mod server;
pub mod state_dir;
pub mod translog;
pub mod webhook;
