//! One diagnostic TLS handshake with a peer, reported in full: the engine of `trellis inspect`
//! ("the `openssl s_client` of the mesh") and of a sidecar's `POST /inspect`, which makes the
//! handshake with the sidecar's own SVID so its key never leaves the process.
//!
//! [`inspect`] connects, shakes hands as a Trellis sidecar would (TLS 1.3, ALPN `h2` and
//! `http/1.1`, optionally presenting an SVID) and returns an [`InspectReport`]: timings, the
//! negotiated parameters, the peer's chain and SPIFFE ID, whether that chain verifies against
//! the bundle with the real SPIFFE server verifier, and on failure a stable [`Reason`] and which
//! side refused ([`Side`]).
//!
//! It lives here, not in `trellis-identity` (pure data and verification, no tokio), because it
//! is network code that the sidecar itself runs; the CLI (`crates/trellis/src/inspect/`) builds
//! the options from flags and renders the report.
//!
//! - `options`: what to check and present, validated before connecting;
//! - `probe`: resolve, connect, the recording handshake, the settle read;
//! - `classify`: rustls and socket errors to a [`Reason`] and [`Side`];
//! - `report`: the serializable [`InspectReport`].

mod classify;
mod options;
mod probe;
mod report;

pub use classify::alert_name;
pub use options::{ClientIdentity, InspectError, InspectOptions, Target, TrustDomainSource};
pub use probe::inspect;
pub use report::{CertInfo, ClientCertReport, InspectReport, Reason, Side};
