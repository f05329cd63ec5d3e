//! Control-plane metrics, exposed as Prometheus text on the admin port.
//!
//! Counters and gauges are atomics: recording never takes a lock.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use trellis_serve::ListenerEvents;

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

/// `trust_domain` and `reason` labels of a failed federated bundle refresh.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FederationFailureLabel {
    /// The foreign trust domain.
    pub trust_domain: String,
    /// `connect`, `tls`, `http`, `http_status`, `timeout`, `invalid_bundle`,
    /// `wrong_trust_domain`, `sequence_backwards`, `no_bundle`.
    pub reason: &'static str,
}

/// `trust_domain` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TrustDomainLabel {
    /// A foreign trust domain.
    pub trust_domain: String,
}

/// `spiffe_id` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SpiffeIdLabel {
    /// The SPIFFE ID, e.g. `spiffe://example.org/trellis/control`.
    pub spiffe_id: String,
}

/// `result` label of `trellis_webhook_reviews_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    /// `injected`, `skipped`, `opted_out`, `error`.
    pub result: &'static str,
}

/// `{version,commit}` of `trellis_build_info`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabel {
    /// The release, e.g. `0.1.0`.
    pub version: &'static str,
    /// The git commit, or `unknown`.
    pub commit: &'static str,
}

/// `listener` label of `trellis_connections_refused_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabel {
    /// `sds`, `admin`, `webhook`.
    pub listener: &'static str,
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
    /// `trellis_jwks_refresh_failures_total{reason}`: refreshes of the Kubernetes issuer keys
    /// from `--k8s-jwks-url` that failed (the keys in force were kept).
    pub jwks_refresh_failures: Family<ReasonLabel, Counter>,
    /// `trellis_federation_refresh_failures_total{trust_domain,reason}`: federated bundle
    /// fetches that failed or were refused (the bundle in force was kept).
    pub federation_refresh_failures: Family<FederationFailureLabel, Counter>,
    /// `trellis_federated_bundle_refresh_timestamp_seconds{trust_domain}`: when the bundle in
    /// force was last fetched (its age is `time() -` this).
    pub federated_bundle_refresh: Family<TrustDomainLabel, Gauge>,
    /// `trellis_federated_bundle_sequence{trust_domain}`: its `spiffe_sequence`.
    pub federated_bundle_sequence: Family<TrustDomainLabel, Gauge>,
    /// `trellis_svid_expiry_timestamp_seconds{spiffe_id}`: notAfter of the control plane's
    /// own serving SVID (the same name sidecars use for theirs, so one alert covers both).
    pub svid_expiry: Family<SpiffeIdLabel, Gauge>,
    /// `trellis_webhook_reviews_total{result}`: admission reviews answered by the sidecar
    /// injection webhook (`injected`, `skipped`, `opted_out`, `error`).
    pub webhook_reviews: Family<ResultLabel, Counter>,
    /// `trellis_webhook_cert_expiry_timestamp_seconds`: notAfter of the webhook's serving
    /// certificate (0 while the webhook is off).
    pub webhook_cert_expiry: Gauge,
    /// `trellis_sds_rate_limited_total`: SDS streams refused with `RESOURCE_EXHAUSTED` because
    /// their source IP exceeded its attestation rate.
    pub sds_rate_limited: Counter,
    /// `trellis_connections_refused_total{listener}`: connections closed on accept because the
    /// listener was at its connection cap.
    pub connections_refused: Family<ListenerLabel, Counter>,
    /// `trellis_sds_handshake_timeouts_total`: SDS TLS handshakes dropped for taking longer
    /// than the handshake timeout.
    pub sds_handshake_timeouts: Counter,
    /// `trellis_pkcs11_retries_total`: PKCS#11 calls retried on a fresh session after the
    /// token closed a session, lost the login or reported a transient device error.
    pub pkcs11_retries: Counter,
    /// The issuance transparency log's series (`trellis_log_*`).
    pub log: Arc<crate::translog::LogMetrics>,
    /// `trellis_database_up`: 1 while the state database answers reads and writes, else 0.
    pub database_up: Gauge,
    /// `trellis_database_errors_total{op}`: failed state database reads and writes.
    pub database_errors: Family<OpLabel, Counter>,
    /// `trellis_issuances_refused_total{reason}`: SVIDs not handed out because their issuance
    /// could not be recorded (`audit_write`) or the wall clock just jumped (`clock_jump`).
    pub issuances_refused: Family<ReasonLabel, Counter>,
    /// `trellis_jwt_svids_issued_total`: JWT-SVIDs signed and handed out.
    pub jwt_svids_issued: Counter,
    /// `trellis_jwt_svids_refused_total{reason}`: JWT-SVID requests refused (`rate_limited`,
    /// `no_svid`, `bad_audience`, `no_key`, `sign`, `audit_write`, `clock_jump`).
    pub jwt_svids_refused: Family<ReasonLabel, Counter>,
    /// `trellis_jwt_keys`: JWT signing keys in the published bundle (2 around a rotation).
    pub jwt_keys: Gauge,
}

/// `op` label of `trellis_database_errors_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabel {
    /// `read` or `write`.
    pub op: &'static str,
}

/// One listener's accept-loop events as counters.
struct ListenerCounters {
    metrics: Arc<ControlMetrics>,
    listener: &'static str,
}

impl ListenerEvents for ListenerCounters {
    fn refused(&self) {
        self.metrics.connection_refused(self.listener);
    }

    fn handshake_timed_out(&self) {
        // Only SDS handshake timeouts have a series; the webhook's are logged.
        if self.listener == "sds" {
            self.metrics.sds_handshake_timeouts.inc();
        }
    }
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
            jwks_refresh_failures: Family::default(),
            federation_refresh_failures: Family::default(),
            federated_bundle_refresh: Family::default(),
            federated_bundle_sequence: Family::default(),
            svid_expiry: Family::default(),
            webhook_reviews: Family::default(),
            webhook_cert_expiry: Gauge::default(),
            sds_rate_limited: Counter::default(),
            connections_refused: Family::default(),
            sds_handshake_timeouts: Counter::default(),
            pkcs11_retries: Counter::default(),
            log: Arc::default(),
            database_up: Gauge::default(),
            database_errors: Family::default(),
            issuances_refused: Family::default(),
            jwt_svids_issued: Counter::default(),
            jwt_svids_refused: Family::default(),
            jwt_keys: Gauge::default(),
            registry: Registry::default(),
        };
        // One series, always 1: joins version and commit onto any other series in a query.
        let build = trellis_serve::build_info::get();
        let build_info = Family::<BuildLabel, Gauge>::default();
        build_info
            .get_or_create(&BuildLabel {
                version: build.version,
                commit: build.commit,
            })
            .set(1);
        registry.register(
            "build_info",
            "The running build: always 1, labelled with version and commit",
            build_info,
        );
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
        registry.register(
            "svid_expiry_timestamp_seconds",
            "Expiry of the control plane's own serving SVID, unix seconds",
            m.svid_expiry.clone(),
        );
        registry.register(
            "webhook_reviews",
            "Admission reviews answered by the sidecar injection webhook, by result",
            m.webhook_reviews.clone(),
        );
        registry.register(
            "webhook_cert_expiry_timestamp_seconds",
            "Expiry of the admission webhook's serving certificate, unix seconds",
            m.webhook_cert_expiry.clone(),
        );
        registry.register(
            "jwks_refresh_failures",
            "Failed refreshes of the Kubernetes issuer keys from --k8s-jwks-url, by reason (the keys in force were kept)",
            m.jwks_refresh_failures.clone(),
        );
        registry.register(
            "federation_refresh_failures",
            "Federated bundle fetches that failed or were refused, by trust domain and reason (the bundle in force was kept)",
            m.federation_refresh_failures.clone(),
        );
        registry.register(
            "federated_bundle_refresh_timestamp_seconds",
            "When each federated trust domain's bundle in force was fetched, unix seconds",
            m.federated_bundle_refresh.clone(),
        );
        registry.register(
            "federated_bundle_sequence",
            "spiffe_sequence of each federated trust domain's bundle in force",
            m.federated_bundle_sequence.clone(),
        );
        registry.register(
            "sds_rate_limited",
            "SDS streams refused because their source IP exceeded its attestation rate",
            m.sds_rate_limited.clone(),
        );
        registry.register(
            "connections_refused",
            "Connections closed on accept because the listener was at its connection cap, by listener",
            m.connections_refused.clone(),
        );
        registry.register(
            "sds_handshake_timeouts",
            "SDS TLS handshakes dropped for exceeding the handshake timeout",
            m.sds_handshake_timeouts.clone(),
        );
        registry.register(
            "pkcs11_retries",
            "PKCS#11 calls retried on a fresh session (session closed, login lost, transient device error)",
            m.pkcs11_retries.clone(),
        );
        m.log.register(&mut registry);
        registry.register(
            "database_up",
            "1 while the state database answers reads and writes, else 0",
            m.database_up.clone(),
        );
        registry.register(
            "database_errors",
            "Failed state database operations, by op (read, write)",
            m.database_errors.clone(),
        );
        registry.register(
            "issuances_refused",
            "SVIDs not handed out, by reason: audit_write (the issuance could not be recorded), clock_jump (the wall clock just jumped)",
            m.issuances_refused.clone(),
        );
        registry.register(
            "jwt_svids_issued",
            "JWT-SVIDs signed and handed out",
            m.jwt_svids_issued.clone(),
        );
        registry.register(
            "jwt_svids_refused",
            "JWT-SVID requests refused, by reason",
            m.jwt_svids_refused.clone(),
        );
        registry.register(
            "jwt_keys",
            "JWT signing keys in the published JWT bundle (more than one around a rotation)",
            m.jwt_keys.clone(),
        );
        // Every reason exists from the start at 0: alert rules (`increase(…[5m]) > 0`) and
        // dashboards see the series before the first refusal, not only after it.
        for reason in ["audit_write", "clock_jump"] {
            let _ = m.issuances_refused.get_or_create(&ReasonLabel { reason });
        }
        ControlMetrics { registry, ..m }
    }

    /// Counts a refused JWT-SVID request.
    pub fn jwt_refused(&self, reason: &'static str) {
        self.jwt_svids_refused
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    /// Counts a failed state database operation.
    pub fn database_error(&self, op: &'static str) {
        self.database_errors.get_or_create(&OpLabel { op }).inc();
    }

    /// Records the notAfter (unix seconds) of the control plane's own serving SVID.
    pub fn serving_svid_expiry(&self, spiffe_id: &str, not_after_unix: i64) {
        self.svid_expiry
            .get_or_create(&SpiffeIdLabel {
                spiffe_id: spiffe_id.to_owned(),
            })
            .set(not_after_unix);
    }

    /// Counts an admission review answered by the webhook with `result`.
    pub fn webhook_review(&self, result: &'static str) {
        self.webhook_reviews
            .get_or_create(&ResultLabel { result })
            .inc();
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

    /// Counts a connection closed on accept by `listener`'s connection cap.
    pub fn connection_refused(&self, listener: &'static str) {
        self.connections_refused
            .get_or_create(&ListenerLabel { listener })
            .inc();
    }

    /// What the listener labelled `listener` (`sds`, `admin`, `webhook`) reports from the
    /// accept loop, counted: refusals by label, and SDS handshake timeouts.
    pub fn listener_events(self: &Arc<Self>, listener: &'static str) -> Arc<dyn ListenerEvents> {
        Arc::new(ListenerCounters {
            metrics: Arc::clone(self),
            listener,
        })
    }

    /// Counts a push.
    pub fn pushed(&self, reason: &'static str) {
        self.sds_pushes.get_or_create(&ReasonLabel { reason }).inc();
    }

    /// Counts a failed refresh of the Kubernetes issuer keys.
    pub fn jwks_refresh_failed(&self, reason: &'static str) {
        self.jwks_refresh_failures
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    /// Counts a failed federated bundle refresh.
    pub fn federation_refresh_failed(&self, trust_domain: &str, reason: &'static str) {
        self.federation_refresh_failures
            .get_or_create(&FederationFailureLabel {
                trust_domain: trust_domain.to_owned(),
                reason,
            })
            .inc();
    }

    /// Records a federated bundle taken into force: its sequence and fetch time.
    pub fn federated_bundle(&self, trust_domain: &str, sequence: u64, fetched_at: i64) {
        let label = TrustDomainLabel {
            trust_domain: trust_domain.to_owned(),
        };
        self.federated_bundle_refresh
            .get_or_create(&label)
            .set(fetched_at);
        self.federated_bundle_sequence
            .get_or_create(&label)
            .set(i64::try_from(sequence).unwrap_or(i64::MAX));
    }

    /// Drops a federated trust domain's gauges (its relationship was removed), so no stale
    /// alert fires for a domain no longer trusted.
    pub fn forget_federated_bundle(&self, trust_domain: &str) {
        let label = TrustDomainLabel {
            trust_domain: trust_domain.to_owned(),
        };
        self.federated_bundle_refresh.remove(&label);
        self.federated_bundle_sequence.remove(&label);
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

    /// Every metric family the control plane exports, with its type and labels. Dashboards and
    /// alert rules are written against these: a rename is a breaking change, so it must
    /// show up here.
    const PINNED: &[(&str, &str, &[&str])] = &[
        ("trellis_build_info", "gauge", &["version", "commit"]),
        ("trellis_svids_issued_total", "counter", &["attestor"]),
        ("trellis_attestation_failures_total", "counter", &["reason"]),
        ("trellis_sds_streams", "gauge", &[]),
        ("trellis_sds_pushes_total", "counter", &["reason"]),
        ("trellis_sds_nacks_total", "counter", &[]),
        ("trellis_sds_request_errors_total", "counter", &["reason"]),
        ("trellis_ca_expiry_timestamp_seconds", "gauge", &[]),
        ("trellis_bundle_expiry_timestamp_seconds", "gauge", &[]),
        ("trellis_audit_write_errors_total", "counter", &[]),
        ("trellis_bundle_cas", "gauge", &[]),
        ("trellis_ca_transitions_total", "counter", &["phase"]),
        (
            "trellis_jwks_refresh_failures_total",
            "counter",
            &["reason"],
        ),
        (
            "trellis_svid_expiry_timestamp_seconds",
            "gauge",
            &["spiffe_id"],
        ),
        ("trellis_webhook_reviews_total", "counter", &["result"]),
        (
            "trellis_webhook_cert_expiry_timestamp_seconds",
            "gauge",
            &[],
        ),
        ("trellis_sds_rate_limited_total", "counter", &[]),
        (
            "trellis_connections_refused_total",
            "counter",
            &["listener"],
        ),
        ("trellis_sds_handshake_timeouts_total", "counter", &[]),
        ("trellis_pkcs11_retries_total", "counter", &[]),
        ("trellis_log_entries", "gauge", &[]),
        ("trellis_log_heads_signed_total", "counter", &[]),
        ("trellis_log_inconsistencies_total", "counter", &[]),
        ("trellis_log_head_timestamp_seconds", "gauge", &[]),
        ("trellis_database_up", "gauge", &[]),
        ("trellis_database_errors_total", "counter", &["op"]),
        ("trellis_issuances_refused_total", "counter", &["reason"]),
        ("trellis_jwt_svids_issued_total", "counter", &[]),
        ("trellis_jwt_svids_refused_total", "counter", &["reason"]),
        ("trellis_jwt_keys", "gauge", &[]),
        (
            "trellis_federation_refresh_failures_total",
            "counter",
            &["trust_domain", "reason"],
        ),
        (
            "trellis_federated_bundle_refresh_timestamp_seconds",
            "gauge",
            &["trust_domain"],
        ),
        (
            "trellis_federated_bundle_sequence",
            "gauge",
            &["trust_domain"],
        ),
    ];

    #[test]
    fn names_and_labels_are_pinned() {
        let m = ControlMetrics::new();
        // One sample in every labelled family, so its labels show.
        m.svids_issued
            .get_or_create(&AttestorLabel { attestor: "k8s" })
            .inc();
        m.attestation_failed("expired");
        m.pushed("rotation");
        m.request_error("unknown_resource");
        m.ca_transition("active");
        m.webhook_review("injected");
        m.serving_svid_expiry("spiffe://example.org/trellis/control", 1_900_000_000);
        m.jwks_refresh_failed("connect");
        m.federation_refresh_failed("b.org", "connect");
        m.federated_bundle("b.org", 3, 1_900_000_000);
        m.connection_refused("sds");
        m.database_error("read");
        m.jwt_refused("bad_audience");
        m.issuances_refused
            .get_or_create(&ReasonLabel {
                reason: "audit_write",
            })
            .inc();
        let text = m.encode();
        // No binary set the build here: the crate's version, commit unknown.
        let build = format!(
            "trellis_build_info{{version=\"{}\",commit=\"unknown\"}} 1",
            env!("CARGO_PKG_VERSION")
        );
        assert!(text.lines().any(|l| l == build), "{build} missing:\n{text}");

        // Every family declared with the pinned type, and no family that is not pinned.
        let declared: Vec<(&str, &str)> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split_once(' '))
            .collect();
        for (name, kind, _) in PINNED {
            assert!(
                declared.contains(&(*name, *kind)),
                "`{name}` is not declared as a {kind}:\n{text}"
            );
        }
        for (family, _) in &declared {
            assert!(
                PINNED.iter().any(|(name, _, _)| name == family),
                "`{family}` is exported but not pinned here"
            );
        }
        // Every sample carries exactly the pinned labels.
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let (name, labels) = match line.split_once('{') {
                Some((name, rest)) => (name, rest.split_once('}').map_or("", |(l, _)| l)),
                None => (line.split_whitespace().next().unwrap_or_default(), ""),
            };
            let got: Vec<&str> = labels
                .split(',')
                .filter(|l| !l.is_empty())
                .filter_map(|l| l.split_once('=').map(|(k, _)| k))
                .collect();
            let (_, _, want) = PINNED
                .iter()
                .find(|(pinned, _, _)| *pinned == name)
                .unwrap_or_else(|| panic!("sample `{name}` is not pinned:\n{text}"));
            assert_eq!(got, *want, "labels of `{name}`");
        }
        for sample in [
            "trellis_svids_issued_total{attestor=\"k8s\"} 1",
            "trellis_attestation_failures_total{reason=\"expired\"} 1",
            "trellis_sds_streams 0",
            "trellis_webhook_reviews_total{result=\"injected\"} 1",
            "trellis_svid_expiry_timestamp_seconds{spiffe_id=\"spiffe://example.org/trellis/control\"} 1900000000",
        ] {
            assert!(text.contains(sample), "missing `{sample}` in:\n{text}");
        }
    }
}
