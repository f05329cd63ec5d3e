//! Control-plane metrics, exposed as Prometheus text on the admin port.
//!
//! Counters and gauges are atomics: recording never takes a lock.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// `attestor` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AttestorLabel {
    /// `k8s`, `join_token`, `svid`.
    pub attestor: &'static str,
}

/// `reason` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// A stable reason such as `expired` or `join_token_redeemed`.
    pub reason: &'static str,
}

/// Every metric the control plane records.
pub struct ControlMetrics {
    registry: Registry,
    /// `trellis_svids_issued_total{attestor}`.
    pub svids_issued: Family<AttestorLabel, Counter>,
    /// `trellis_attestation_failures_total{reason}`.
    pub attestation_failures: Family<ReasonLabel, Counter>,
    /// `trellis_sds_streams`: open StreamSecrets streams.
    pub sds_streams: Gauge,
    /// `trellis_sds_pushes_total{reason}`: responses sent (`request`, `rotation`, `bundle`).
    pub sds_pushes: Family<ReasonLabel, Counter>,
    /// `trellis_sds_nacks_total`: responses a client rejected.
    pub sds_nacks: Counter,
    /// `trellis_sds_request_errors_total{reason}`: malformed or refused requests.
    pub sds_request_errors: Family<ReasonLabel, Counter>,
    /// `trellis_ca_expiry_timestamp_seconds`: the signing CA's notAfter.
    pub ca_expiry: Gauge,
    /// `trellis_bundle_expiry_timestamp_seconds`: the earliest notAfter in the bundle.
    pub bundle_expiry: Gauge,
    /// `trellis_audit_write_errors_total`.
    pub audit_write_errors: Counter,
    /// `trellis_bundle_cas`: CA certificates in the trust bundle (2 during a rotation).
    pub bundle_cas: Gauge,
    /// `trellis_ca_transitions_total{phase}`: CAs entering a rotation phase.
    pub ca_transitions: Family<PhaseLabel, Counter>,
}

/// `{phase}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabel {
    /// `prepared`, `active`, `retiring`, `retired`.
    pub phase: &'static str,
}

impl ControlMetrics {
    /// Creates and registers every metric under the `trellis` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("trellis");
        let m = ControlMetrics {
            svids_issued: Family::default(),
            attestation_failures: Family::default(),
            sds_streams: Gauge::default(),
            sds_pushes: Family::default(),
            sds_nacks: Counter::default(),
            sds_request_errors: Family::default(),
            ca_expiry: Gauge::default(),
            bundle_expiry: Gauge::default(),
            audit_write_errors: Counter::default(),
            bundle_cas: Gauge::default(),
            ca_transitions: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "svids_issued",
            "X.509-SVIDs issued, by attestor",
            m.svids_issued.clone(),
        );
        registry.register(
            "attestation_failures",
            "Refused attestations, by reason",
            m.attestation_failures.clone(),
        );
        registry.register(
            "sds_streams",
            "Open SDS StreamSecrets streams",
            m.sds_streams.clone(),
        );
        registry.register(
            "sds_pushes",
            "SDS responses sent, by reason",
            m.sds_pushes.clone(),
        );
        registry.register(
            "sds_nacks",
            "SDS responses rejected by a client (NACK)",
            m.sds_nacks.clone(),
        );
        registry.register(
            "sds_request_errors",
            "SDS requests refused with a gRPC error, by reason",
            m.sds_request_errors.clone(),
        );
        registry.register(
            "ca_expiry_timestamp_seconds",
            "Expiry of the signing CA certificate, unix seconds",
            m.ca_expiry.clone(),
        );
        registry.register(
            "bundle_expiry_timestamp_seconds",
            "Earliest expiry among trust bundle CAs, unix seconds",
            m.bundle_expiry.clone(),
        );
        registry.register(
            "audit_write_errors",
            "Audit log lines that could not be written",
            m.audit_write_errors.clone(),
        );
        registry.register(
            "bundle_cas",
            "CA certificates in the trust bundle (more than one while a CA rotates)",
            m.bundle_cas.clone(),
        );
        registry.register(
            "ca_transitions",
            "CAs that entered a rotation phase (prepared, active, retiring, retired)",
            m.ca_transitions.clone(),
        );
        ControlMetrics { registry, ..m }
    }

    /// Counts a CA entering `phase`.
    pub fn ca_transition(&self, phase: &'static str) {
        self.ca_transitions
            .get_or_create(&PhaseLabel { phase })
            .inc();
    }

    /// Prometheus text format (0.0.4), as `promtool check metrics` reads it.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(4096);
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry);
        out
    }

    /// Counts an attestation failure.
    pub fn attestation_failed(&self, reason: &'static str) {
        self.attestation_failures
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    /// Counts a push.
    pub fn pushed(&self, reason: &'static str) {
        self.sds_pushes.get_or_create(&ReasonLabel { reason }).inc();
    }

    /// Counts a refused request.
    pub fn request_error(&self, reason: &'static str) {
        self.sds_request_errors
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }
}

impl Default for ControlMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// `Content-Type` of [`ControlMetrics::encode`].
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_pinned() {
        let m = ControlMetrics::new();
        m.svids_issued
            .get_or_create(&AttestorLabel { attestor: "k8s" })
            .inc();
        m.attestation_failed("expired");
        m.pushed("rotation");
        m.request_error("unknown_resource");
        let text = m.encode();
        for name in [
            "trellis_svids_issued_total{attestor=\"k8s\"} 1",
            "trellis_attestation_failures_total{reason=\"expired\"} 1",
            "trellis_sds_streams 0",
            "trellis_sds_pushes_total{reason=\"rotation\"} 1",
            "trellis_sds_nacks_total 0",
            "trellis_sds_request_errors_total{reason=\"unknown_resource\"} 1",
            "trellis_ca_expiry_timestamp_seconds 0",
            "trellis_bundle_expiry_timestamp_seconds 0",
            "trellis_audit_write_errors_total 0",
        ] {
            assert!(text.contains(name), "missing `{name}` in:\n{text}");
        }
    }
}
