//! `trellis inspect HOST:PORT`: the `openssl s_client` of the mesh. One handshake as a sidecar
//! would make it, then what was negotiated, who the peer is, and if it failed, why and which
//! side refused. Exit status: 0 verified and accepted, 1 failed, 2 bad usage.
//!
//! With `--admin ADDR` the handshake is made by a running sidecar (`POST /inspect` on its admin
//! endpoint) with its own SVID and bundle, so its key never leaves it; the report is the same.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _};
use clap::Args;
use trellis_identity::inspect::{
    inspect, ClientIdentity, InspectOptions, InspectReport, Reason, Target, TrustDomainSource,
};
use trellis_identity::{certs_from_pem, key_from_pem, SpiffeId, TrustDomain};

use crate::cmd_status::AdminClient;

/// `trellis inspect …`.
#[derive(Args, Debug)]
pub struct InspectArgs {
    /// The TLS endpoint: a sidecar's inbound, an Envoy listener, the control plane (HOST:PORT,
    /// [IPv6]:PORT).
    #[arg(value_name = "HOST:PORT")]
    target: String,
    /// Trust bundle (PEM CA certificates, e.g. the control plane's bundle.pem) the peer must
    /// chain to.
    #[arg(long, required_unless_present = "admin")]
    bundle: Option<PathBuf>,
    /// Borrow a running sidecar's identity: its admin endpoint (HOST:PORT, loopback) makes
    /// the handshake with its current SVID and bundle.
    #[arg(long, value_name = "ADDR", conflicts_with_all = ["bundle", "cert", "key"])]
    admin: Option<String>,
    /// Client certificate chain to present (PEM, leaf first). Without it, none is offered.
    #[arg(long, requires = "key")]
    cert: Option<PathBuf>,
    /// Private key of --cert (PEM).
    #[arg(long, requires = "cert")]
    key: Option<PathBuf>,
    /// Trust domain the peer must belong to [default: the bundle CAs' spiffe://<td>, else the
    /// peer's own].
    #[arg(long)]
    trust_domain: Option<String>,
    /// Exact SPIFFE ID the peer must present [default: any ID in the trust domain].
    #[arg(long)]
    spiffe_id: Option<String>,
    /// Offer TLS 1.2 as well as 1.3 (Trellis itself speaks 1.3 only by default).
    #[arg(long)]
    tls12: bool,
    /// Give up if connecting and the handshake take longer.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Print the report as JSON (for scripts); the exit status is the same.
    #[arg(long)]
    json: bool,
}

/// Runs `trellis inspect`; prints the report on stdout, usage errors on stderr.
pub fn run(args: InspectArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::from(2);
        }
    };
    let report = if let Some(admin) = &args.admin {
        match runtime.block_on(inspect_via_admin(admin, &args)) {
            Ok(report) => report,
            Err(err) => {
                eprintln!("error: {}", crate::describe(&err));
                return ExitCode::from(2);
            }
        }
    } else {
        let (target, opts) = match prepare(&args) {
            Ok(prepared) => prepared,
            Err(err) => {
                eprintln!("error: {}", crate::describe(&err));
                return ExitCode::from(2);
            }
        };
        runtime.block_on(inspect(&target, &opts))
    };
    if args.json {
        match serde_json::to_string_pretty(&report) {
            Ok(json) => println!("{json}"),
            Err(err) => {
                eprintln!("error: cannot encode the report: {err}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        print!("{}", render(&report, args.tls12, SystemTime::now()));
    }
    if report.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Percent-encodes a query value (everything but RFC 3986 unreserved characters).
fn query_escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// `POST /inspect` on a sidecar's admin endpoint; the sidecar makes the handshake.
async fn inspect_via_admin(admin: &str, args: &InspectArgs) -> anyhow::Result<InspectReport> {
    // Checked here too, so a typo is a usage error before anything is sent.
    let target = Target::parse(&args.target)?;
    if args.timeout.is_zero() {
        bail!("--timeout must be positive");
    }
    let mut query = format!(
        "/inspect?target={}&timeout={}ms",
        query_escape(&target.to_string()),
        args.timeout.as_millis()
    );
    if let Some(id) = &args.spiffe_id {
        let id = SpiffeId::parse(id).context("--spiffe-id")?;
        let _ = write!(query, "&spiffe_id={}", query_escape(id.as_str()));
    }
    if let Some(td) = &args.trust_domain {
        let td = TrustDomain::parse(td).context("--trust-domain")?;
        let _ = write!(query, "&trust_domain={}", query_escape(td.as_str()));
    }
    if args.tls12 {
        query.push_str("&tls12=true");
    }
    let client = AdminClient::parse(admin, Duration::from_secs(5)).context("--admin")?;
    // The sidecar's handshake has its own deadline and a settle time after it.
    let resp = client
        .request(
            http::Method::POST,
            &query,
            args.timeout + Duration::from_secs(5),
        )
        .await
        .with_context(|| format!("cannot reach the sidecar admin endpoint {}", client.url()))?;
    match resp.status {
        200 => serde_json::from_str(&resp.body)
            .with_context(|| format!("{}/inspect: the answer is not an inspection report", client.url())),
        404 => bail!(
            "{} has no /inspect: --admin must be a sidecar's admin endpoint (a control plane cannot lend an identity)",
            client.url()
        ),
        status => bail!("{}/inspect: HTTP {status}: {}", client.url(), resp.body.trim()),
    }
}

/// Everything that can be wrong before connecting: files, flags.
fn prepare(args: &InspectArgs) -> anyhow::Result<(Target, InspectOptions)> {
    let target = Target::parse(&args.target)?;
    if args.timeout.is_zero() {
        bail!("--timeout must be positive");
    }
    let Some(bundle) = &args.bundle else {
        bail!("--bundle is required (or --admin to borrow a running sidecar's identity)");
    };
    let bundle_pem = read(bundle, "--bundle")?;
    let roots =
        certs_from_pem(&bundle_pem).with_context(|| format!("--bundle {}", bundle.display()))?;
    let mut opts = InspectOptions::new(roots)
        .with_context(|| format!("--bundle {}", bundle.display()))?
        .tls12(args.tls12)
        .timeout(args.timeout);
    if let Some(td) = &args.trust_domain {
        opts = opts.trust_domain(TrustDomain::parse(td).context("--trust-domain")?);
    }
    if let Some(id) = &args.spiffe_id {
        let id = SpiffeId::parse(id).context("--spiffe-id")?;
        if id.path().is_empty() {
            bail!("--spiffe-id `{id}` is a trust domain ID; use --trust-domain for that");
        }
        opts = opts.expect(id);
    }
    if let (Some(cert), Some(key)) = (&args.cert, &args.key) {
        let chain = certs_from_pem(&read(cert, "--cert")?)
            .with_context(|| format!("--cert {}", cert.display()))?;
        let key_der = key_from_pem(&read(key, "--key")?)
            .with_context(|| format!("--key {}", key.display()))?;
        let identity = ClientIdentity::new(chain, key_der)
            .with_context(|| format!("--cert {} with --key {}", cert.display(), key.display()))?;
        opts = opts.client(identity);
    }
    Ok((target, opts))
}

fn read(path: &Path, flag: &str) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("{flag} {}", path.display()))
}

/// The human report: `key  value` lines, then a one-line verdict.
fn render(report: &InspectReport, tls12_offered: bool, now: SystemTime) -> String {
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

/// A duration in its two largest units: `364d 3h`, `23h 59m`, `59m 30s`, `5s`.
pub(crate) fn span(secs: i64) -> String {
    let secs = secs.unsigned_abs();
    let units = [(86_400, "d"), (3600, "h"), (60, "m"), (1, "s")];
    let mut parts = Vec::new();
    let mut rest = secs;
    for (size, unit) in units {
        if rest >= size || (parts.is_empty() && size == 1) {
            parts.push(format!("{}{unit}", rest / size));
            rest %= size;
        } else if !parts.is_empty() {
            // Two adjacent units only: "1d 0h", never "1d 5m".
            parts.push(format!("0{unit}"));
        }
        if parts.len() == 2 {
            break;
        }
    }
    // "2h 0m" reads worse than "2h".
    if parts.len() == 2 && parts[1].starts_with('0') {
        parts.pop();
    }
    parts.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validity_is_relative_to_now() {
        let now = UNIX_EPOCH + Duration::from_secs(10_000);
        assert_eq!(validity(0, 13_570, now), "expires in 59m 30s");
        assert_eq!(validity(0, 2_800, now), "EXPIRED 2h ago");
        assert_eq!(validity(13_600, 20_000, now), "NOT VALID YET: starts in 1h");
    }

    #[test]
    fn query_values_are_escaped() {
        assert_eq!(
            query_escape("spiffe://example.org/ns/a b"),
            "spiffe%3A%2F%2Fexample.org%2Fns%2Fa%20b"
        );
        assert_eq!(query_escape("[::1]:15443"), "%5B%3A%3A1%5D%3A15443");
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

    #[test]
    fn spans_use_two_units() {
        assert_eq!(span(0), "0s");
        assert_eq!(span(5), "5s");
        assert_eq!(span(3570), "59m 30s");
        assert_eq!(span(86_399), "23h 59m");
        assert_eq!(span(364 * 86_400 + 3 * 3600 + 50), "364d 3h");
        assert_eq!(span(86_400 + 300), "1d");
        assert_eq!(span(-7200), "2h");
    }
}
