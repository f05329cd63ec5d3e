//! The access log: one structured line per request.

use crate::metrics::Direction;
use http::{Method, StatusCode};
use std::time::Duration;

/// `tracing` target of the access log (`RUST_LOG=trellis::access=off` silences it too).
pub const ACCESS_LOG_TARGET: &str = "trellis::access";

/// One access-log line: what was asked, of whom, by whom, and how it ended.
///
/// Deliberately narrow: the path without its query string (queries carry tokens often
/// enough), the method and the status; never a header value, a body, a key or a token.
pub(crate) struct AccessEntry<'a> {
    /// Inbound: the peer's SPIFFE ID; outbound: ours (`None` before the first SVID).
    pub(crate) caller: Option<&'a str>,
    pub(crate) direction: Direction,
    pub(crate) method: &'a Method,
    /// As forwarded (inbound with a policy: the normalized path the policy decided on).
    pub(crate) path: &'a str,
    /// Inbound: the path as received (query left out), which `trellis policy replay`
    /// decides again exactly as the sidecar did.
    pub(crate) raw_path: Option<&'a str>,
    pub(crate) status: StatusCode,
    /// Request head received to response head ready.
    pub(crate) took: Duration,
    /// Outbound: the route, the upstream's name or `default_route` (`None`: no route
    /// matched); inbound: the app address.
    pub(crate) upstream: Option<&'a str>,
    /// Outbound: the SPIFFE ID the peer had to present (`None`: no route matched).
    pub(crate) identity: Option<&'a str>,
    /// The deciding rule (or `default`) when a policy decided.
    pub(crate) rule: Option<&'a str>,
    /// Inbound: `allow`, `deny` or `refused` (400 before authorization) when the request
    /// reached the policy hook (`None`: refused earlier, for its framing or headers).
    pub(crate) decision: Option<&'a str>,
    /// SHA-256 of the policy that decided (`None`: no policy).
    pub(crate) policy: Option<&'a str>,
}

impl AccessEntry<'_> {
    /// Emits the line: a `tracing` event at INFO, target [`ACCESS_LOG_TARGET`], structured
    /// fields (so `--log-format json` renders them as JSON).
    pub(crate) fn emit(&self) {
        // Milliseconds with microsecond resolution: `0.417`, not `0.41700000000000004`.
        let duration_ms = self.took.as_micros() as f64 / 1000.0;
        tracing::info!(
            target: ACCESS_LOG_TARGET,
            caller = self.caller,
            direction = self.direction.as_str(),
            method = self.method.as_str(),
            path = self.path,
            raw_path = self.raw_path,
            status = self.status.as_u16(),
            duration_ms,
            upstream = self.upstream,
            identity = self.identity,
            rule = self.rule,
            decision = self.decision,
            policy = self.policy,
            "request"
        );
    }
}
