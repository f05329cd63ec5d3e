//! The human report of `trellis inspect`: `key  value` lines, then a one-line verdict.

use std::fmt::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

use trellis_sidecar::inspect::{InspectReport, Reason, TrustDomainSource};

use crate::timespan::span;

/// The human report: `key  value` lines, then a one-line verdict.
pub(super) fn render(report: &InspectReport, tls12_offered: bool, now: SystemTime) -> String {
    let mut out = String::new();
    let mut line = |key: &str, value: &str| {
        let _ = writeln!(out, "{key:<15} {value}");
    };
    let target = match &report.address {
        Some(addr) if *addr != report.target => format!("{} ({addr})", report.target),
        _ => report.target.clone(),
    };
    line("target", &target);
    if let Some(ms) = report.tcp_connect_ms {
        line("tcp connect", &format!("{ms:.2} ms"));
    }
    if let Some(ms) = report.handshake_ms {
        line("tls handshake", &format!("{ms:.2} ms"));
    }
    if let Some(v) = &report.tls_version {
        line("tls version", v);
    }
    if let Some(s) = &report.cipher_suite {
        line("cipher suite", s);
    }
    if let Some(group) = &report.key_exchange {
        line("key exchange", group);
    }
    if report.tls_version.is_some() {
        line("alpn", report.alpn.as_deref().unwrap_or("(none)"));
    }
    if let Some(td) = &report.trust_domain {
        let source = match report.trust_domain_source {
            Some(TrustDomainSource::Flag) => "from --trust-domain",
            Some(TrustDomainSource::Bundle) => "from the bundle",
            Some(TrustDomainSource::ExpectedId) => "from --spiffe-id",
            Some(TrustDomainSource::Peer) => "from the peer's certificate: pass --trust-domain",
            Some(TrustDomainSource::Sidecar) => "the inspecting sidecar's own",
            None => "",
        };
        line("trust domain", &format!("{td} ({source})"));
    }
    let expected = match (&report.expected_spiffe_id, &report.trust_domain) {
        (Some(id), _) => id.clone(),
        (None, Some(td)) => format!("any SPIFFE ID in {td}"),
        (None, None) => "any SPIFFE ID in the bundle's trust domain".to_owned(),
    };
    line("expected peer", &expected);
    if !report.peer_chain.is_empty() {
        line(
            "peer spiffe id",
            report.peer_spiffe_id.as_deref().unwrap_or("(none)"),
        );
    }
    for (i, cert) in report.peer_chain.iter().enumerate() {
        let key = if i == 0 { "peer chain" } else { "" };
        line(key, &format!("[{i}] subject  {}", cert.subject));
        line("", &format!("    issuer   {}", cert.issuer));
        line("", &format!("    serial   {}", cert.serial));
        line(
            "",
            &format!(
                "    valid    {} .. {} ({})",
                cert.not_before,
                cert.not_after,
                validity(cert.not_before_unix, cert.not_after_unix, now)
            ),
        );
        for id in &cert.spiffe_ids {
            line("", &format!("    spiffe   {id}"));
        }
    }
    let client = &report.client_cert;
    let completed = report.tls_version.is_some();
    let fate = match (client.requested, client.accepted) {
        _ if report.handshake_ms.is_none() => "not used",
        (true, Some(true)) => "requested, accepted",
        (true, Some(false)) => "requested, refused",
        (true, None) => "requested",
        (false, _) if completed => "not requested by the server",
        (false, _) => "not requested before the handshake ended",
    };
    if report.handshake_ms.is_some() || client.presented.is_some() {
        let ours = client.presented.as_deref().unwrap_or("(none)");
        line("client cert", &format!("{ours}: {fate}"));
    }
    if let Some(alert) = &report.alert {
        line("alert", &format!("{alert} (sent by the server)"));
    }
    if !report.peer_chain.is_empty() {
        line("verified", if report.verified { "yes" } else { "no" });
    }
    if let Some(detail) = &report.detail {
        line("error", detail);
    }
    out.push_str(&verdict(report, tls12_offered));
    out.push('\n');
    out
}

/// `OK: verified … in 2.10 ms` or `FAILED (client refused): … (unknown_ca)`.
fn verdict(report: &InspectReport, tls12_offered: bool) -> String {
    if report.ok {
        return format!(
            "OK: verified {} ({}, {}, {}) in {:.1} ms",
            report.peer_spiffe_id.as_deref().unwrap_or("(no SPIFFE ID)"),
            report.tls_version.as_deref().unwrap_or("?"),
            report.cipher_suite.as_deref().unwrap_or("?"),
            report.alpn.as_deref().unwrap_or("no ALPN"),
            report.handshake_ms.unwrap_or_default()
        );
    }
    let reason = report.reason.unwrap_or(Reason::Other);
    let who = match report.refused_by {
        Some(side) => format!("FAILED ({side} refused)"),
        None => "FAILED".to_owned(),
    };
    let mut text = format!("{who}: {} ({reason})", reason.describe(report.refused_by));
    if reason == Reason::ProtocolVersion && !tls12_offered {
        text.push_str("; only TLS 1.3 was offered: try --tls12");
    }
    text
}

/// "expires in 59m 30s", "EXPIRED 2h ago", "NOT VALID YET: starts in 1h".
fn validity(not_before: i64, not_after: i64, now: SystemTime) -> String {
    let now = now
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    if now < not_before {
        format!("NOT VALID YET: starts in {}", span(not_before - now))
    } else if now > not_after {
        format!("EXPIRED {} ago", span(now - not_after))
    } else {
        format!("expires in {}", span(not_after - now))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn validity_is_relative_to_now() {
        let now = UNIX_EPOCH + Duration::from_secs(10_000);
        assert_eq!(validity(0, 13_570, now), "expires in 59m 30s");
        assert_eq!(validity(0, 2_800, now), "EXPIRED 2h ago");
        assert_eq!(validity(13_600, 20_000, now), "NOT VALID YET: starts in 1h");
    }

    #[test]
    fn a_report_from_a_sidecar_renders_like_a_local_one() {
        // What `POST /inspect` answers is the report `--json` prints; it reads back whole,
        // and a reason this build does not know reads as `other`.
        let json = r#"{"target":"127.0.0.1:1","address":null,"ok":false,"verified":false,
            "reason":"a_reason_from_the_future","refused_by":"server","detail":"x","alert":null,
            "tcp_connect_ms":null,"handshake_ms":null,"tls_version":null,"cipher_suite":null,
            "alpn":null,"trust_domain":"example.org","trust_domain_source":"sidecar",
            "expected_spiffe_id":null,"peer_spiffe_id":null,"peer_chain":[],
            "client_cert":{"presented":"spiffe://example.org/a","requested":false,"accepted":null}}"#;
        let report: InspectReport = serde_json::from_str(json).unwrap();
        assert_eq!(report.reason, Some(Reason::Other));
        let text = render(&report, false, SystemTime::now());
        assert!(
            text.contains("example.org (the inspecting sidecar's own)"),
            "{text}"
        );
        assert!(text.contains("FAILED (server refused)"), "{text}");
    }
}
