//! Sidecar metrics, Prometheus text on the admin port. Recording is atomics only: the request
//! path never takes a lock here (label families are looked up with fixed, pre-registered
//! label values where the set is small).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Traffic direction: `inbound` (peer → app) or `outbound` (app → peer).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Direction {
    /// Peer → app.
    Inbound,
    /// App → peer.
    Outbound,
}

impl Direction {
    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        }
    }
}

/// `{direction}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabel {
    /// `inbound` / `outbound`.
    pub direction: &'static str,
}

/// `{direction,result,reason}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandshakeLabel {
    /// `inbound` / `outbound`.
    pub direction: &'static str,
    /// `ok` / `error`.
    pub result: &'static str,
    /// `none`, or `no_cert`, `unknown_ca`, `expired`, `wrong_identity`, `protocol_version`, ….
    pub reason: &'static str,
}

/// `{direction,code}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabel {
    /// `inbound` / `outbound`.
    pub direction: &'static str,
    /// HTTP status code.
    pub code: u16,
}

/// `{result}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    /// `ok`, or a reason such as `unknown_ca`, `wrong_identity`, `bad_key`, `malformed`.
    pub result: &'static str,
}

/// `{decision,rule}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuthzLabel {
    /// `allow`, `deny` or `audit_deny` (an audit-mode rule would have denied).
    pub decision: &'static str,
    /// The deciding rule's name, or `default`. Bounded by the loaded policy's rules.
    pub rule: String,
}

/// `{reason}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// A stable snake_case reason.
    pub reason: &'static str,
}

/// Every sidecar metric.
pub struct SidecarMetrics {
    registry: Registry,
    /// `trellis_sds_connected` (0/1).
    pub sds_connected: Gauge,
    /// `trellis_sds_updates_total{result}`.
    pub sds_updates: Family<ResultLabel, Counter>,
    /// `trellis_sds_last_update_timestamp_seconds`.
    pub sds_last_update: Gauge,
    /// `trellis_svid_rotations_total`: SVIDs installed after the first.
    pub svid_rotations: Counter,
    /// `trellis_svid_expiry_timestamp_seconds`.
    pub svid_expiry: Gauge,
    /// `trellis_bundle_expiry_timestamp_seconds`.
    pub bundle_expiry: Gauge,
    /// `trellis_tls_handshakes_total{direction,result,reason}`.
    pub tls_handshakes: Family<HandshakeLabel, Counter>,
    /// `trellis_requests_total{direction,code}`.
    pub requests: Family<RequestLabel, Counter>,
    /// `trellis_connections_open{direction}` (mTLS connections).
    pub connections_open: Family<DirectionLabel, Gauge>,
    /// `trellis_upstream_connections_total`: mTLS connections the outbound pool opened.
    pub upstream_connections: Counter,
    /// `trellis_authz_decisions_total{decision,rule}`. The policy engine looks a rule's
    /// counter up in the family (which takes a lock) on its first use after a policy load
    /// and keeps the handle, so the request path is a hash map lookup and an atomic add.
    /// Series of rules that no longer exist stay exported with their last counts.
    pub authz_decisions: Family<AuthzLabel, Counter>,
    /// `trellis_authz_bad_paths_total{reason}`: requests refused with 400 because their
    /// path could not be normalized.
    pub authz_bad_paths: Family<ReasonLabel, Counter>,
    /// `trellis_policy_reload_errors_total`.
    pub policy_reload_errors: Counter,
    /// `trellis_policy_loaded_timestamp_seconds` (0: no policy loaded).
    pub policy_loaded: Gauge,
    /// `trellis_policy_rules`.
    pub policy_rules: Gauge,
}

impl SidecarMetrics {
    /// Creates and registers every metric under `trellis_`.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("trellis");
        let sds_connected = Gauge::default();
        let sds_updates = Family::<ResultLabel, Counter>::default();
        let sds_last_update = Gauge::default();
        let svid_rotations = Counter::default();
        let svid_expiry = Gauge::default();
        let bundle_expiry = Gauge::default();
        let tls_handshakes = Family::<HandshakeLabel, Counter>::default();
        let requests = Family::<RequestLabel, Counter>::default();
        let connections_open = Family::<DirectionLabel, Gauge>::default();
        let upstream_connections = Counter::default();
        let authz_decisions = Family::<AuthzLabel, Counter>::default();
        let authz_bad_paths = Family::<ReasonLabel, Counter>::default();
        let policy_reload_errors = Counter::default();
        let policy_loaded = Gauge::default();
        let policy_rules = Gauge::default();
        registry.register(
            "sds_connected",
            "1 while the SDS stream to the control plane is up",
            sds_connected.clone(),
        );
        registry.register(
            "sds_updates",
            "SDS updates received, by result",
            sds_updates.clone(),
        );
        registry.register(
            "sds_last_update_timestamp_seconds",
            "When the last valid SDS update was installed, unix seconds",
            sds_last_update.clone(),
        );
        registry.register(
            "svid_rotations",
            "SVIDs installed after the first",
            svid_rotations.clone(),
        );
        registry.register(
            "svid_expiry_timestamp_seconds",
            "Expiry of the current SVID, unix seconds",
            svid_expiry.clone(),
        );
        registry.register(
            "bundle_expiry_timestamp_seconds",
            "Earliest expiry among trust bundle CAs, unix seconds",
            bundle_expiry.clone(),
        );
        registry.register(
            "tls_handshakes",
            "mTLS handshakes, by direction, result and reason",
            tls_handshakes.clone(),
        );
        registry.register(
            "requests",
            "HTTP requests proxied, by direction and status code",
            requests.clone(),
        );
        registry.register(
            "connections_open",
            "Open mTLS connections, by direction",
            connections_open.clone(),
        );
        registry.register(
            "upstream_connections",
            "mTLS connections opened by the outbound pool",
            upstream_connections.clone(),
        );
        registry.register(
            "authz_decisions",
            "Authorization decisions, by decision (allow, deny, audit_deny) and deciding rule",
            authz_decisions.clone(),
        );
        registry.register(
            "authz_bad_paths",
            "Requests refused with 400 because their path cannot be normalized, by reason",
            authz_bad_paths.clone(),
        );
        registry.register(
            "policy_reload_errors",
            "Policy reloads refused (the last good policy stays in force)",
            policy_reload_errors.clone(),
        );
        registry.register(
            "policy_loaded_timestamp_seconds",
            "When the policy in force was loaded, unix seconds (0: none)",
            policy_loaded.clone(),
        );
        registry.register(
            "policy_rules",
            "Rules in the policy in force",
            policy_rules.clone(),
        );
        Self {
            registry,
            sds_connected,
            sds_updates,
            sds_last_update,
            svid_rotations,
            svid_expiry,
            bundle_expiry,
            tls_handshakes,
            requests,
            connections_open,
            upstream_connections,
            authz_decisions,
            authz_bad_paths,
            policy_reload_errors,
            policy_loaded,
            policy_rules,
        }
    }

    /// Prometheus text format 0.0.4.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(4096);
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry);
        out
    }

    /// Counts a handshake; `reason` is `none` on success.
    pub fn handshake(&self, direction: Direction, ok: bool, reason: &'static str) {
        self.tls_handshakes
            .get_or_create(&HandshakeLabel {
                direction: direction.as_str(),
                result: if ok { "ok" } else { "error" },
                reason: if ok { "none" } else { reason },
            })
            .inc();
    }

    /// Counts a proxied request by its final status.
    pub fn request(&self, direction: Direction, code: u16) {
        self.requests
            .get_or_create(&RequestLabel {
                direction: direction.as_str(),
                code,
            })
            .inc();
    }

    /// Tracks an open mTLS connection until the guard drops.
    pub fn connection(&self, direction: Direction) -> ConnectionGuard {
        let gauge = self
            .connections_open
            .get_or_create(&DirectionLabel {
                direction: direction.as_str(),
            })
            .clone();
        gauge.inc();
        ConnectionGuard(gauge)
    }

    /// Counts an SDS update by result.
    pub fn sds_update(&self, result: &'static str) {
        self.sds_updates
            .get_or_create(&ResultLabel { result })
            .inc();
    }
}

impl Default for SidecarMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Decrements `trellis_connections_open` on drop.
pub struct ConnectionGuard(Gauge);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// `Content-Type` of [`SidecarMetrics::encode`].
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_pinned() {
        let m = SidecarMetrics::new();
        m.handshake(Direction::Inbound, false, "no_cert");
        m.request(Direction::Outbound, 502);
        m.sds_update("ok");
        let _g = m.connection(Direction::Inbound);
        let text = m.encode();
        for line in [
            "trellis_tls_handshakes_total{direction=\"inbound\",result=\"error\",reason=\"no_cert\"} 1",
            "trellis_requests_total{direction=\"outbound\",code=\"502\"} 1",
            "trellis_sds_updates_total{result=\"ok\"} 1",
            "trellis_connections_open{direction=\"inbound\"} 1",
            "trellis_sds_connected 0",
            "trellis_svid_rotations_total 0",
            "trellis_svid_expiry_timestamp_seconds 0",
            "trellis_bundle_expiry_timestamp_seconds 0",
            "trellis_upstream_connections_total 0",
            "trellis_sds_last_update_timestamp_seconds 0",
            "trellis_policy_reload_errors_total 0",
            "trellis_policy_loaded_timestamp_seconds 0",
            "trellis_policy_rules 0",
        ] {
            assert!(text.contains(line), "missing `{line}` in\n{text}");
        }
    }
}
