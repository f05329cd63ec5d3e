//! The Trellis data plane. Apps talk plain HTTP to 127.0.0.1; between sidecars everything is
//! mTLS with X.509-SVIDs pushed by `trellis control` over SDS (or read from files).
//!
//! Identity flows in through [`sds`] or [`identity_files`] into the [`SvidStore`]; requests
//! flow through [`outbound`] (app → peer) and [`inbound`] (peer → app); [`admin`] reports.
#![warn(missing_docs)]

pub mod admin;
pub mod config;
pub mod csr;
pub mod h1_framing;
pub mod headers;
pub mod http_util;
pub mod identity_files;
pub mod inbound;
pub mod inspect;
mod listen;
pub mod metrics;
pub mod mtls;
pub mod outbound;
pub mod policy;
pub mod pool;
pub mod sds;
pub mod sidecar;
pub mod svid_store;
pub mod tcp;

/// The drain every listener and connection holds (from `trellis-serve`, shared with the
/// control plane).
pub use trellis_serve::drain;

pub use config::SidecarSettings;
pub use sidecar::Sidecar;
pub use svid_store::SvidStore;
