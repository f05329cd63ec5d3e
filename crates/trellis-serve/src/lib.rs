//! What every Trellis listener shares, written once: both binaries' listeners (the sidecar's
//! inbound, outbound, TCP and admin listeners; the control plane's SDS, admin and webhook
//! listeners) accept, cap, time out and drain through this crate.
//!
//! - [`accept`]: bind, and the one accept loop ([`accept::Listener`]): connection cap, a
//!   handshake bounded by a timeout where the listener has one, accept-error backoff, drain and
//!   force-shutdown.
//! - [`drain`]: the drain signal every listener and connection holds.
//! - [`limit`]: the connection cap ([`limit::ConnLimit`]) and what a listener reports
//!   ([`limit::ListenerEvents`]: refused connections, handshake timeouts) to whoever counts.
//! - [`idle`]: an I/O wrapper that records when bytes last moved, for idle timeouts.
//! - [`graceful`]: serving one hyper connection until it ends, drains, idles out or is forced.
//! - [`http`]: the admin-style HTTP server (HTTP/1.1 and HTTP/2, protocol-detection guard,
//!   header, idle and stream limits) that the admin endpoints and the webhook register routes on.
//! - [`prefixed`]: an I/O stream with bytes already read put back in front.
//! - [`config`]: the configuration error both binaries report, and the renamed-key table.
//! - [`build_info`]: the version and commit of the running build, set once by the binary.
//! - [`worker`]: thread-per-core serving: N single-threaded runtimes, connections spread
//!   over them by the accept loop, per-worker state ([`worker::PerWorker`]).
//! - [`net`], [`time`]: small helpers every listener's reporting needs.
//!
//! Nothing here knows about metrics, TLS libraries or config file formats: those stay in the
//! crates that own them and plug in through small traits.
#![warn(missing_docs)]

pub mod accept;
pub mod build_info;
pub mod config;
pub mod drain;
pub mod graceful;
pub mod http;
pub mod idle;
pub mod limit;
pub mod net;
pub mod prefixed;
pub mod time;
pub mod watermark;
pub mod worker;

pub use accept::{bind, Handshake, Listener, Plain};
pub use drain::{Drain, DrainSignal};
pub use idle::{IdleClock, Tracked};
pub use limit::{ConnLimit, ConnPermit, ListenerEvents};
pub use worker::{PerWorker, Workers};
