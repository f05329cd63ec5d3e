//! Unit tests of the parent module.

use super::*;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

#[test]
fn names_are_pinned() {
    let m = SidecarMetrics::new();
    m.handshake(Direction::Inbound, false, "no_cert");
    m.handshake_ok(Direction::Outbound, "X25519MLKEM768");
    m.handshake_ok(Direction::Inbound, "X25519");
    m.handshake_ok(Direction::Inbound, "a-group-from-the-future");
    m.handshake(Direction::Inbound, false, "no_shared_group");
    m.handshake_duration(Direction::Outbound, ms(3));
    m.request(Direction::Outbound, 502, ms(1));
    m.request(Direction::Inbound, 200, ms(2));
    m.sds_update("ok");
    m.bad_path("encoded_slash");
    m.set_svid_expiry("spiffe://example.org/a", 1_700_000_000);
    m.authz_decisions
        .get_or_create(&AuthzLabel {
            decision: "deny",
            rule: "no-export".into(),
        })
        .inc();
    let _g = m.connection(Direction::Inbound);
    let text = m.encode();
    // No binary set the build here: the crate's version, commit unknown.
    let build = format!(
        "trellis_build_info{{version=\"{}\",commit=\"unknown\"}} 1",
        env!("CARGO_PKG_VERSION")
    );
    assert!(text.contains(&build), "missing `{build}` in\n{text}");
    for line in [
        "trellis_tls_handshakes_total{direction=\"inbound\",result=\"error\",reason=\"no_cert\"} 1",
        "trellis_tls_handshakes_total{direction=\"outbound\",result=\"ok\",reason=\"none\",group=\"X25519MLKEM768\"} 1",
        "trellis_tls_handshakes_total{direction=\"inbound\",result=\"ok\",reason=\"none\",group=\"X25519\"} 1",
        "trellis_tls_handshakes_total{direction=\"inbound\",result=\"ok\",reason=\"none\",group=\"other\"} 1",
        "trellis_tls_handshakes_total{direction=\"inbound\",result=\"error\",reason=\"no_shared_group\"} 1",
        "# TYPE trellis_tls_handshake_duration_seconds histogram",
        "trellis_tls_handshake_duration_seconds_bucket{direction=\"outbound\",le=\"0.0025\"} 0",
        "trellis_tls_handshake_duration_seconds_bucket{direction=\"outbound\",le=\"0.005\"} 1",
        "trellis_tls_handshake_duration_seconds_bucket{direction=\"outbound\",le=\"+Inf\"} 1",
        "trellis_tls_handshake_duration_seconds_sum{direction=\"outbound\"} 0.003",
        "trellis_tls_handshake_duration_seconds_count{direction=\"outbound\"} 1",
        "trellis_requests_total{direction=\"outbound\",code=\"502\"} 1",
        "trellis_requests_total{direction=\"inbound\",code=\"200\"} 1",
        "# TYPE trellis_request_duration_seconds histogram",
        "trellis_request_duration_seconds_bucket{direction=\"inbound\",le=\"0.0001\"} 0",
        "trellis_request_duration_seconds_bucket{direction=\"inbound\",le=\"30\"} 1",
        "trellis_request_duration_seconds_count{direction=\"inbound\"} 1",
        "trellis_request_duration_seconds_count{direction=\"outbound\"} 1",
        "trellis_sds_updates_total{result=\"ok\"} 1",
        "trellis_connections_open{direction=\"inbound\"} 1",
        "trellis_connections_open{direction=\"outbound\"} 0",
        "trellis_authz_decisions_total{decision=\"deny\",rule=\"no-export\"} 1",
        "trellis_authz_bad_paths_total{reason=\"encoded_slash\"} 1",
        "trellis_svid_expiry_timestamp_seconds{spiffe_id=\"spiffe://example.org/a\"} 1700000000",
        "trellis_sds_connected 0",
        "trellis_svid_rotations_total 0",
        "trellis_bundle_expiry_timestamp_seconds 0",
        "trellis_upstream_connections_total 0",
        "trellis_upstream_connections_lost_total 0",
        "trellis_stalled_bodies_total 0",
        "trellis_sds_last_update_timestamp_seconds 0",
        "trellis_policy_reload_errors_total 0",
        "trellis_policy_loaded_timestamp_seconds 0",
        "trellis_policy_rules 0",
    ] {
        assert!(text.contains(line), "missing `{line}` in\n{text}");
    }
    // Each family is described once, with the type Prometheus expects for its suffixes.
    for (family, kind) in [
        ("trellis_tls_handshakes_total", "counter"),
        ("trellis_requests_total", "counter"),
        ("trellis_tls_handshake_duration_seconds", "histogram"),
        ("trellis_request_duration_seconds", "histogram"),
        ("trellis_connections_open", "gauge"),
        ("trellis_svid_expiry_timestamp_seconds", "gauge"),
        ("trellis_authz_bad_paths_total", "counter"),
    ] {
        let decl = format!("# TYPE {family} {kind}\n");
        assert_eq!(text.matches(&decl).count(), 1, "`{decl}` in\n{text}");
    }
}

#[test]
fn untouched_series_are_not_exported() {
    let text = SidecarMetrics::new().encode();
    for absent in [
        "trellis_tls_handshakes_total",
        "trellis_requests_total",
        "trellis_tls_handshake_duration_seconds",
        "trellis_request_duration_seconds",
        "trellis_svid_expiry_timestamp_seconds",
        "trellis_authz_bad_paths_total",
    ] {
        assert!(!text.contains(absent), "`{absent}` in\n{text}");
    }
    // The open-connection gauges are a fixed pair, exported from the start.
    assert!(text.contains("trellis_connections_open{direction=\"outbound\"} 0"));
}

#[test]
fn svid_expiry_keeps_one_series() {
    let m = SidecarMetrics::new();
    m.set_svid_expiry("spiffe://example.org/old", 10);
    m.set_svid_expiry("spiffe://example.org/new", 20);
    let text = m.encode();
    assert!(!text.contains("/old"), "{text}");
    assert!(text.contains(
        "trellis_svid_expiry_timestamp_seconds{spiffe_id=\"spiffe://example.org/new\"} 20"
    ));
    assert_eq!(
        m.svid_expiry(),
        Some(SvidExpiry {
            spiffe_id: "spiffe://example.org/new".into(),
            not_after: 20
        })
    );
}

#[test]
fn histogram_buckets_follow_le_semantics() {
    // On a bound: that bucket (le is "less than or equal").
    assert_eq!(AtomicHistogram::bucket_of(Duration::from_micros(100)), 0);
    assert_eq!(AtomicHistogram::bucket_of(Duration::ZERO), 0);
    assert_eq!(AtomicHistogram::bucket_of(Duration::from_nanos(100_001)), 1);
    assert_eq!(AtomicHistogram::bucket_of(ms(1)), 3);
    assert_eq!(AtomicHistogram::bucket_of(Duration::from_secs(30)), 16);
    // Past the last bound: +Inf.
    assert_eq!(AtomicHistogram::bucket_of(Duration::from_secs(31)), 17);
    assert_eq!(AtomicHistogram::bucket_of(Duration::MAX), 17);

    let h = AtomicHistogram::default();
    for d in [
        Duration::from_micros(50),
        Duration::from_micros(100),
        ms(2),
        ms(2),
        Duration::from_secs(40),
    ] {
        h.observe(d);
    }
    let s = h.snapshot();
    assert_eq!(s.count, 5);
    assert_eq!(s.buckets.len(), LATENCY_BUCKETS_NANOS.len());
    assert_eq!(s.buckets[0], (0.0001, 2));
    assert_eq!(s.buckets[4], (0.0025, 2));
    assert_eq!(s.buckets.iter().map(|b| b.1).sum::<u64>(), 4, "one in +Inf");
    assert!((s.sum_seconds - 40.00415).abs() < 1e-9, "{}", s.sum_seconds);
    assert_eq!(s.buckets.last().unwrap().0, 30.0);
}

#[test]
fn histogram_exposition_is_cumulative() {
    let m = SidecarMetrics::new();
    for d in [
        Duration::from_micros(50),
        ms(2),
        ms(2),
        Duration::from_secs(40),
    ] {
        m.request(Direction::Inbound, 200, d);
    }
    let text = m.encode();
    for line in [
        "trellis_request_duration_seconds_bucket{direction=\"inbound\",le=\"0.0001\"} 1",
        "trellis_request_duration_seconds_bucket{direction=\"inbound\",le=\"0.001\"} 1",
        "trellis_request_duration_seconds_bucket{direction=\"inbound\",le=\"0.0025\"} 3",
        "trellis_request_duration_seconds_bucket{direction=\"inbound\",le=\"30\"} 3",
        "trellis_request_duration_seconds_bucket{direction=\"inbound\",le=\"+Inf\"} 4",
        "trellis_request_duration_seconds_count{direction=\"inbound\"} 4",
        "trellis_requests_total{direction=\"inbound\",code=\"200\"} 4",
    ] {
        assert!(text.contains(line), "missing `{line}` in\n{text}");
    }
    assert!(!text.contains("direction=\"outbound\",le="), "{text}");
}

#[test]
fn unknown_reasons_and_codes_stay_bounded() {
    let m = SidecarMetrics::new();
    m.handshake(Direction::Inbound, false, "brand_new_reason");
    m.bad_path("brand_new_reason");
    m.request(Direction::Inbound, 999, ms(1));
    m.request(Direction::Inbound, 42, ms(1)); // not a status: timed, not counted
    let text = m.encode();
    assert!(text.contains(
        "trellis_tls_handshakes_total{direction=\"inbound\",result=\"error\",reason=\"other\"} 1"
    ));
    assert!(text.contains("trellis_authz_bad_paths_total{reason=\"other\"} 1"));
    assert!(text.contains("trellis_requests_total{direction=\"inbound\",code=\"999\"} 1"));
    assert!(!text.contains("code=\"42\""));
    assert!(!text.contains("brand_new_reason"));
}

#[test]
fn path_error_reasons_are_all_known() {
    use trellis_policy::PathError;
    for e in [
        PathError::NotAbsolute,
        PathError::QueryOrFragment,
        PathError::EncodedSlash,
        PathError::Backslash,
        PathError::ControlCharacter,
        PathError::BadEscape,
        PathError::AboveRoot,
        PathError::PathParameters,
    ] {
        let known = &BAD_PATH_REASONS[..BAD_PATH_REASONS.len() - 1];
        assert!(known.contains(&e.reason()), "{e:?}: {}", e.reason());
    }
}

#[test]
fn connection_guard_counts_down() {
    let m = SidecarMetrics::new();
    let a = m.connection(Direction::Outbound);
    let b = m.connection(Direction::Outbound);
    drop(a);
    assert!(m
        .encode()
        .contains("trellis_connections_open{direction=\"outbound\"} 1"));
    drop(b);
    assert!(m
        .encode()
        .contains("trellis_connections_open{direction=\"outbound\"} 0"));
}
