//! The Trellis data plane. Apps talk plain HTTP to 127.0.0.1; between sidecars everything is
//! mTLS with X.509-SVIDs pushed by `trellis control` over SDS (or read from files).
//!
//! Identity flows in through [`sds`] or [`identity_files`] into the [`SvidStore`]; requests
//! flow through [`outbound`] (app → peer) and [`inbound`] (peer → app); [`admin`] reports;
//! [`workload_api`] hands the same identity to SPIFFE-aware apps on a Unix socket.
#![warn(missing_docs)]

pub mod access_log;
pub mod admin;
pub mod body;
pub mod config;
mod conn_state;
pub mod csr;
pub mod dial;
pub mod forward_error;
pub mod grpc;
pub mod h1_framing;
pub mod headers;
pub mod identity_files;
pub mod inbound;
pub mod inspect;
mod listen;
pub mod log_witness;
pub mod metrics;
pub mod mtls;
pub mod outbound;
pub mod policy;
pub mod resolve;
pub mod responses;
pub mod sds;
pub mod sidecar;
pub mod splice;
pub mod svid_store;
pub mod upgrade;
pub mod workload_api;

/// The drain every listener and connection holds (from `trellis-serve`, shared with the
/// control plane).
pub use trellis_serve::drain;

pub use config::SidecarSettings;
pub use sidecar::Sidecar;
pub use svid_store::SvidStore;
