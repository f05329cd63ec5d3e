//! `trellis status --admin ADDR`: a one-screen summary of a running sidecar or control plane,
//! read from its admin endpoint (`/ready`, `/certs`, `/metrics`, and `/policy` on a sidecar or
//! `/ca` on a control plane, which is also how the two are told apart).
//!
//! A sidecar's identity comes from the control plane (SDS) or from PEM files it watches;
//! `/certs` says which in `source` (`{"kind": "sds", "control_plane": …}` or `{"kind": "files",
//! "cert": …, "key": …, "bundle": …}`). A files sidecar never connects to a control plane, so
//! its summary shows the files instead of an SDS line that would read as a fault. A sidecar
//! whose `/certs` has no `source` is summarized as an SDS one.
//!
//! Exit status: 0 ready, 1 reachable but not ready, 2 unreachable or bad usage.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _};
use clap::Args;
use serde_json::{json, Value};

use crate::admin_client::{AdminClient, AdminResponse};
use crate::timespan::span;

/// `trellis status …`.
#[derive(Args, Debug)]
pub struct StatusArgs {
    /// The admin endpoint of a sidecar (default 127.0.0.1:15000) or a control plane (default
    /// 127.0.0.1:9090): HOST:PORT or http://HOST:PORT.
    #[arg(long, value_name = "ADDR")]
    admin: String,
    /// Print the summary as JSON (for scripts); the exit status is the same.
    #[arg(long)]
    json: bool,
    /// Give up on each admin request after this long.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

/// Runs `trellis status`; the summary on stdout, errors on stderr.
pub fn run(args: StatusArgs) -> ExitCode {
    let client = match AdminClient::parse(&args.admin, args.timeout) {
        Ok(client) => client,
        Err(err) => {
            eprintln!("error: {}", crate::logging::describe(&err));
            return ExitCode::from(2);
        }
    };
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
    let status = match runtime.block_on(collect(&client)) {
        Ok(status) => status,
        Err(err) => {
            eprintln!("error: {}", crate::logging::describe(&err));
            return ExitCode::from(2);
        }
    };
    if args.json {
        match serde_json::to_string_pretty(&status) {
            Ok(text) => println!("{text}"),
            Err(err) => {
                eprintln!("error: cannot encode the summary: {err}");
                return ExitCode::from(2);
            }
        }
    } else {
        print!("{}", render(&status));
    }
    if status["ready"] == true {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

// ---------------------------------------------------------------------------------------------
// Prometheus text, just enough to sum counters by label.

/// One sample line: name, labels, value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    name: String,
    labels: Vec<(String, String)>,
    value: f64,
}

impl Sample {
    fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Parses Prometheus text format 0.0.4 (and OpenMetrics) sample lines; comments and lines
/// that do not parse are skipped.
pub fn parse_metrics(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(parse_sample)
        .collect()
}

fn parse_sample(line: &str) -> Option<Sample> {
    let line = line.trim();
    let name_end = line.find(['{', ' '])?;
    let name = line[..name_end].to_owned();
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(after) = rest.strip_prefix('{') {
        let mut chars = after.char_indices().peekable();
        let end;
        loop {
            // Skip separators, then `key="value"` with \\, \" and \n escapes.
            while let Some((_, c)) = chars.peek() {
                if *c == ',' || c.is_whitespace() {
                    chars.next();
                } else {
                    break;
                }
            }
            let (start, c) = *chars.peek()?;
            if c == '}' {
                end = start + 1;
                break;
            }
            let eq = after[start..].find('=')? + start;
            let key = after[start..eq].trim().to_owned();
            while chars.peek().is_some_and(|(i, _)| *i <= eq) {
                chars.next();
            }
            if chars.next()?.1 != '"' {
                return None;
            }
            let mut value = String::new();
            loop {
                match chars.next()?.1 {
                    '"' => break,
                    '\\' => match chars.next()?.1 {
                        'n' => value.push('\n'),
                        other => value.push(other),
                    },
                    other => value.push(other),
                }
            }
            labels.push((key, value));
        }
        rest = &after[end..];
    }
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some(Sample {
        name,
        labels,
        value,
    })
}

/// The single value of `name` (the sum over its label sets), if it is exported.
fn value(samples: &[Sample], name: &str) -> Option<f64> {
    let mut found = samples.iter().filter(|s| s.name == name).peekable();
    found.peek()?;
    Some(found.map(|s| s.value).sum())
}

/// Sums `name` by the value of `label`, over samples whose labels match `filter`; zeros left
/// out.
fn by_label(
    samples: &[Sample],
    name: &str,
    label: &str,
    filter: &[(&str, &str)],
) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for s in samples.iter().filter(|s| s.name == name) {
        if filter.iter().all(|(k, v)| s.label(k) == Some(*v)) {
            if let Some(key) = s.label(label) {
                *out.entry(key.to_owned()).or_insert(0.0) += s.value;
            }
        }
    }
    out.retain(|_, v| *v != 0.0);
    out
}

fn counts(map: BTreeMap<String, f64>) -> Value {
    Value::Object(
        map.into_iter()
            // Counters are whole numbers; print them as such.
            .map(|(k, v)| (k, json!(v as u64)))
            .collect(),
    )
}

// ---------------------------------------------------------------------------------------------
// Collecting.

fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

fn json_of(resp: &AdminResponse, path: &str) -> anyhow::Result<Value> {
    if resp.status != 200 {
        bail!("{path}: HTTP {}: {}", resp.status, resp.body.trim());
    }
    serde_json::from_str(&resp.body).with_context(|| format!("{path}: not JSON"))
}

/// Reads every endpoint and builds the summary (the `--json` output).
async fn collect(client: &AdminClient) -> anyhow::Result<Value> {
    let health = client.get("/healthz").await.with_context(|| {
        format!(
            "{} is unreachable: is the sidecar or control plane running, and is this its --admin address?",
            client.url()
        )
    })?;
    if health.status != 200 {
        bail!(
            "{}/healthz answered HTTP {}: not a Trellis admin endpoint?",
            client.url(),
            health.status
        );
    }
    // `/policy` exists only on a sidecar, `/ca` only on a control plane.
    let policy = client.get("/policy").await?;
    let kind = if policy.status == 200 {
        "sidecar"
    } else if client.get("/ca").await?.status == 200 {
        "control"
    } else {
        bail!(
            "{} serves /healthz but neither /policy (sidecar) nor /ca (control plane): not a Trellis admin endpoint",
            client.url()
        );
    };
    let ready = client.get("/ready").await?;
    let certs = json_of(&client.get("/certs").await?, "/certs")?;
    let metrics_resp = client.get("/metrics").await?;
    if metrics_resp.status != 200 {
        bail!("/metrics: HTTP {}", metrics_resp.status);
    }
    let samples = parse_metrics(&metrics_resp.body);
    let now = now_unix();

    let mut status = json!({
        "kind": kind,
        "admin": client.url(),
        "ready": ready.status == 200,
        "ready_detail": ready.body.trim(),
        "trust_domain": certs["trust_domain"],
        "identity": identity_json(&certs["svid"], now),
        "bundle": bundle_json(&certs["bundle"], now),
    });
    let extra = if kind == "sidecar" {
        sidecar_json(
            &json_of(&policy, "/policy")?,
            &certs["source"],
            &samples,
            now,
        )
    } else {
        let ca = json_of(&client.get("/ca").await?, "/ca")?;
        let mut control = control_json(&ca, &samples);
        // SPIFFE federation (absent from control planes that predate it).
        let bundles = client.get("/bundles").await?;
        if bundles.status == 200 {
            let bundles = json_of(&bundles, "/bundles")?;
            if let Some(obj) = control.as_object_mut() {
                obj.insert("bundle_sequence".into(), bundles["sequence"].clone());
                obj.insert("bundle_endpoint".into(), bundles["bundle_endpoint"].clone());
                obj.insert(
                    "federation_config_error".into(),
                    bundles["config_error"].clone(),
                );
                obj.insert("federated".into(), bundles["federated"].clone());
            }
        }
        control
    };
    if let (Some(obj), Value::Object(extra)) = (status.as_object_mut(), extra) {
        obj.extend(extra);
    }
    Ok(status)
}

fn identity_json(svid: &Value, now: i64) -> Value {
    if svid.is_null() {
        return Value::Null;
    }
    let not_after = svid["not_after"].as_i64();
    json!({
        "spiffe_id": svid["spiffe_id"],
        "serial": svid["serial"],
        "issuer": svid["issuer"],
        "not_after": svid["not_after_rfc3339"],
        "expires_in_seconds": not_after.map(|t| t - now),
    })
}

fn bundle_json(bundle: &Value, now: i64) -> Value {
    let cas = bundle.as_array().map_or_else(Vec::new, |cas| {
        cas.iter()
            .map(|ca| {
                json!({
                    "subject": ca["subject"],
                    "not_after": ca["not_after_rfc3339"],
                    "expires_in_seconds": ca["not_after"].as_i64().map(|t| t - now),
                })
            })
            .collect()
    });
    Value::Array(cas)
}

/// The sidecar part of the summary. `source` is `/certs`' `source` (null from a sidecar that
/// does not report it: then SDS is assumed, as before the field existed).
fn sidecar_json(policy: &Value, source: &Value, samples: &[Sample], now: i64) -> Value {
    let last_update = value(samples, "trellis_sds_last_update_timestamp_seconds")
        .filter(|t| *t > 0.0)
        .map(|t| t as i64);
    // A reload of the identity files counts as an update and a rotation like an SDS one does.
    let installs_after_first = value(samples, "trellis_svid_rotations_total").map(|v| v as u64);
    let refused = counts({
        let mut refused = by_label(samples, "trellis_sds_updates_total", "result", &[]);
        refused.remove("ok");
        refused
    });
    let (identity_source, sds, files) = if source["kind"] == "files" {
        let files = json!({
            "cert": source["cert"],
            "key": source["key"],
            "bundle": source["bundle"],
            "reloads": installs_after_first,
            "reloads_refused": refused,
        });
        ("files", Value::Null, files)
    } else {
        let sds = json!({
            "control_plane": source["control_plane"],
            "connected": value(samples, "trellis_sds_connected").map(|v| v > 0.0),
            "last_update_age_seconds": last_update.map(|t| now - t),
            "svid_rotations": installs_after_first,
            "updates_refused": refused,
        });
        ("sds", sds, Value::Null)
    };
    let mut requests = serde_json::Map::new();
    for direction in ["inbound", "outbound"] {
        requests.insert(
            direction.to_owned(),
            counts(by_label(
                samples,
                "trellis_requests_total",
                "code",
                &[("direction", direction)],
            )),
        );
    }
    let policy_configured = policy["path"].is_string();
    json!({
        "identity_source": identity_source,
        "sds": sds,
        "files": files,
        "policy": {
            "configured": policy_configured,
            "path": policy["path"],
            "hash": policy["hash"],
            "rules": policy["rules"],
            "loaded_at": policy["loaded_at_rfc3339"],
            "loaded_age_seconds": policy["loaded_at"].as_i64().map(|t| now - t),
            "last_error": policy["last_error"],
            "last_error_at": policy["last_error_at_rfc3339"],
            "reload_errors": value(samples, "trellis_policy_reload_errors_total").map(|v| v as u64),
        },
        "requests": Value::Object(requests),
        "denies": counts(by_label(
            samples,
            "trellis_authz_decisions_total",
            "rule",
            &[("decision", "deny")],
        )),
        "audit_denies": counts(by_label(
            samples,
            "trellis_authz_decisions_total",
            "rule",
            &[("decision", "audit_deny")],
        )),
        "key_exchange": counts(by_label(
            samples,
            "trellis_tls_handshakes_total",
            "group",
            &[("result", "ok")],
        )),
        "handshake_failures": counts(by_label(
            samples,
            "trellis_tls_handshakes_total",
            "reason",
            &[("result", "error")],
        )),
        "connections_open": counts(by_label(samples, "trellis_connections_open", "direction", &[])),
    })
}

fn control_json(ca: &Value, samples: &[Sample]) -> Value {
    let cas = ca["cas"].as_array().map_or_else(Vec::new, |cas| {
        cas.iter()
            .map(|c| {
                json!({
                    "ca": c["ca"],
                    "phase": c["phase"],
                    "not_after": c["not_after"],
                    "activate_at": c["activate_at"],
                    "leaves_bundle_at": c["leaves_bundle_at"],
                })
            })
            .collect()
    });
    json!({
        "cas": cas,
        "sds_streams": value(samples, "trellis_sds_streams").map(|v| v as u64),
        "svids_issued": counts(by_label(samples, "trellis_svids_issued_total", "attestor", &[])),
        "attestation_failures": counts(by_label(
            samples,
            "trellis_attestation_failures_total",
            "reason",
            &[],
        )),
        "sds_nacks": value(samples, "trellis_sds_nacks_total").map(|v| v as u64),
    })
}

// ---------------------------------------------------------------------------------------------
// Rendering.

/// "in 59m 30s" or "EXPIRED 2h ago".
fn until(seconds: Option<i64>) -> String {
    match seconds {
        Some(s) if s >= 0 => format!("in {}", span(s)),
        Some(s) => format!("EXPIRED {} ago", span(s)),
        None => "?".to_owned(),
    }
}

fn str_of(v: &Value) -> &str {
    v.as_str().unwrap_or("?")
}

/// `200=120 403=3`, or `none`.
fn counts_line(v: &Value) -> String {
    match v.as_object() {
        Some(map) if !map.is_empty() => map
            .iter()
            .map(|(k, n)| format!("{k}={n}"))
            .collect::<Vec<_>>()
            .join(" "),
        _ => "none".to_owned(),
    }
}

/// Successful handshakes by key-exchange group, and the post-quantum share:
/// `X25519=1 X25519MLKEM768=3 (75% post-quantum)`, or `none`.
fn key_exchange_line(v: &Value) -> String {
    let mut text = counts_line(v);
    let Some(map) = v.as_object().filter(|m| !m.is_empty()) else {
        return text;
    };
    let total: f64 = map.values().filter_map(Value::as_f64).sum();
    let pq: f64 = map
        .iter()
        .filter(|(group, _)| group.contains("MLKEM"))
        .filter_map(|(_, n)| n.as_f64())
        .sum();
    if total > 0.0 {
        let _ = write!(text, " ({:.0}% post-quantum)", 100.0 * pq / total);
    }
    text
}

/// `; refused expired=1`, or nothing when nothing was refused.
fn refused_suffix(text: &mut String, refused: &Value) {
    if refused.as_object().is_some_and(|m| !m.is_empty()) {
        let _ = write!(text, "; refused {}", counts_line(refused));
    }
}

/// `connected; last update 3s ago; 2 rotations`, naming the control plane when not connected.
fn sds_line(sds: &Value) -> String {
    let connected = match (sds["connected"].as_bool(), sds["control_plane"].as_str()) {
        (Some(true), _) => "connected".to_owned(),
        (Some(false), Some(cp)) => format!("NOT connected to {cp}"),
        (Some(false), None) => "NOT connected".to_owned(),
        (None, _) => "?".to_owned(),
    };
    let update = match sds["last_update_age_seconds"].as_i64() {
        Some(age) => format!("last update {} ago", span(age)),
        None => "no update yet".to_owned(),
    };
    let rotations = sds["svid_rotations"].as_u64().unwrap_or(0);
    let mut text = format!("{connected}; {update}; {rotations} rotations");
    refused_suffix(&mut text, &sds["updates_refused"]);
    text
}

/// The human summary: `key  value` lines, one screen.
fn render(s: &Value) -> String {
    let mut out = String::new();
    let mut line = |key: &str, value: &str| {
        let _ = writeln!(out, "{key:<15} {value}");
    };
    let kind = if s["kind"] == "sidecar" {
        "sidecar"
    } else {
        "control plane"
    };
    line(kind, str_of(&s["admin"]));
    let ready = if s["ready"] == true {
        "READY".to_owned()
    } else {
        format!(
            "NOT READY: {}",
            str_of(&s["ready_detail"]).trim_start_matches("not ready: ")
        )
    };
    line("status", &ready);
    line("trust domain", str_of(&s["trust_domain"]));
    let id = &s["identity"];
    if id.is_null() {
        line("identity", "(no SVID yet)");
    } else {
        line("identity", str_of(&id["spiffe_id"]));
        line("  serial", str_of(&id["serial"]));
        line(
            "  expires",
            &format!(
                "{} ({})",
                str_of(&id["not_after"]),
                until(id["expires_in_seconds"].as_i64())
            ),
        );
        if let Some(issuer) = id["issuer"].as_str() {
            line("  issuer", issuer);
        }
    }
    for (i, ca) in s["bundle"].as_array().into_iter().flatten().enumerate() {
        line(
            if i == 0 { "bundle" } else { "" },
            &format!(
                "{}  expires {} ({})",
                str_of(&ca["subject"]),
                str_of(&ca["not_after"]),
                until(ca["expires_in_seconds"].as_i64())
            ),
        );
    }
    if s["kind"] == "sidecar" {
        if s["identity_source"] == "files" {
            let files = &s["files"];
            let mut source = format!(
                "identity files (no control plane); {} reloads",
                files["reloads"].as_u64().unwrap_or(0)
            );
            refused_suffix(&mut source, &files["reloads_refused"]);
            line("source", &source);
            line("  cert", str_of(&files["cert"]));
            line("  key", str_of(&files["key"]));
            line("  bundle", str_of(&files["bundle"]));
        } else {
            line("sds", &sds_line(&s["sds"]));
        }
        let p = &s["policy"];
        if p["configured"] == true {
            let hash = str_of(&p["hash"]);
            line(
                "policy",
                &format!(
                    "sha256 {}…, {} rules, loaded {} ({} ago)",
                    hash.get(..12).unwrap_or(hash),
                    p["rules"].as_u64().unwrap_or(0),
                    str_of(&p["loaded_at"]),
                    span(p["loaded_age_seconds"].as_i64().unwrap_or(0))
                ),
            );
            let last_error = match p["last_error"].as_str() {
                Some(e) => format!("{} ({})", e, str_of(&p["last_error_at"])),
                None => "none".to_owned(),
            };
            line("  last error", &last_error);
        } else {
            line(
                "policy",
                "none configured: every peer in the trust domain is allowed",
            );
        }
        let requests = &s["requests"];
        line(
            "requests",
            &format!(
                "inbound {} | outbound {}",
                counts_line(&requests["inbound"]),
                counts_line(&requests["outbound"])
            ),
        );
        line("denies", &counts_line(&s["denies"]));
        if s["audit_denies"].as_object().is_some_and(|m| !m.is_empty()) {
            line("audit denies", &counts_line(&s["audit_denies"]));
        }
        line("key exchange", &key_exchange_line(&s["key_exchange"]));
        line("tls failures", &counts_line(&s["handshake_failures"]));
    } else {
        for (i, ca) in s["cas"].as_array().into_iter().flatten().enumerate() {
            let mut text = format!("{:<9} {}", str_of(&ca["phase"]), str_of(&ca["ca"]));
            if let Some(at) = ca["activate_at"].as_str() {
                let _ = write!(text, "; activates {at}");
            }
            if let Some(at) = ca["leaves_bundle_at"].as_str() {
                let _ = write!(text, "; leaves the bundle {at}");
            }
            line(if i == 0 { "cas" } else { "" }, &text);
        }
        line(
            "sds streams",
            &s["sds_streams"]
                .as_u64()
                .map_or_else(|| "?".to_owned(), |n| n.to_string()),
        );
        line("svids issued", &counts_line(&s["svids_issued"]));
        line("attest. fails", &counts_line(&s["attestation_failures"]));
        if let Some(seq) = s["bundle_sequence"].as_u64() {
            let endpoint = s["bundle_endpoint"].as_str().unwrap_or("off");
            line(
                "bundle endpt",
                &format!("{endpoint} (spiffe_sequence {seq})"),
            );
        }
        if let Some(e) = s["federation_config_error"].as_str() {
            line("federation", &format!("CONFIG REFUSED: {e}"));
        }
        for (i, d) in s["federated"].as_array().into_iter().flatten().enumerate() {
            let seq = d["sequence"]
                .as_u64()
                .map_or_else(|| "?".to_owned(), |n| n.to_string());
            let mut text = format!(
                "{} seq {seq}, {} CAs from {}; refreshed {}, next {}",
                str_of(&d["trust_domain"]),
                d["cas"].as_u64().unwrap_or(0),
                str_of(&d["source"]),
                d["last_refresh"].as_str().unwrap_or("never"),
                str_of(&d["next_refresh"]),
            );
            if let Some(e) = d["last_error"].as_str() {
                let _ = write!(text, "; LAST ERROR: {e}");
            }
            line(if i == 0 { "federated" } else { "" }, &text);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_prometheus_samples() {
        let text = "# HELP trellis_requests_total x\n\
            # TYPE trellis_requests_total counter\n\
            trellis_requests_total{direction=\"inbound\",code=\"200\"} 12\n\
            trellis_requests_total{direction=\"inbound\",code=\"403\"} 3\n\
            trellis_requests_total{direction=\"outbound\",code=\"200\"} 7\n\
            trellis_authz_decisions_total{decision=\"deny\",rule=\"we\\\"ird,{rule}\"} 2\n\
            trellis_sds_connected 1\n\
            trellis_request_duration_seconds_bucket{direction=\"inbound\",le=\"+Inf\"} 15\n\
            garbage{ 1\n";
        let samples = parse_metrics(text);
        assert_eq!(samples.len(), 6, "{samples:?}");
        assert_eq!(value(&samples, "trellis_sds_connected"), Some(1.0));
        assert_eq!(value(&samples, "trellis_nope"), None);
        let inbound = by_label(
            &samples,
            "trellis_requests_total",
            "code",
            &[("direction", "inbound")],
        );
        assert_eq!(inbound.get("200"), Some(&12.0));
        assert_eq!(inbound.get("403"), Some(&3.0));
        assert_eq!(inbound.len(), 2);
        let denies = by_label(
            &samples,
            "trellis_authz_decisions_total",
            "rule",
            &[("decision", "deny")],
        );
        assert_eq!(denies.get("we\"ird,{rule}"), Some(&2.0));
    }

    #[test]
    fn renders_a_sidecar_on_one_screen() {
        let s = json!({
            "kind": "sidecar",
            "admin": "http://127.0.0.1:15000",
            "ready": false,
            "ready_detail": "not ready: no SVID yet",
            "trust_domain": "example.org",
            "identity": null,
            "bundle": [{"subject": "CN=root", "not_after": "2036-01-01T00:00:00Z", "expires_in_seconds": 86_400}],
            "sds": {"connected": false, "last_update_age_seconds": null, "svid_rotations": 0, "updates_refused": {"expired": 1}},
            "policy": {"configured": false},
            "requests": {"inbound": {}, "outbound": {"503": 4}},
            "denies": {},
            "audit_denies": {},
            "key_exchange": {"X25519MLKEM768": 3, "X25519": 1},
            "handshake_failures": {"no_cert": 2},
        });
        let text = render(&s);
        for needle in [
            "sidecar         http://127.0.0.1:15000",
            "status          NOT READY: no SVID yet",
            "identity        (no SVID yet)",
            "bundle          CN=root  expires 2036-01-01T00:00:00Z (in 1d)",
            "sds             NOT connected; no update yet; 0 rotations; refused expired=1",
            "requests        inbound none | outbound 503=4",
            "key exchange    X25519=1 X25519MLKEM768=3 (75% post-quantum)",
            "tls failures    no_cert=2",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
        }
        assert!(text.lines().count() < 25, "{text}");
    }

    /// What a sidecar with identity files reports: `/certs`' `source`, and metrics in which
    /// the SDS gauge is 0 because there is no SDS at all.
    fn files_sidecar_summary() -> Value {
        let source = json!({
            "kind": "files",
            "cert": "/etc/trellis/svid.pem",
            "key": "/etc/trellis/svid-key.pem",
            "bundle": "/etc/trellis/bundle.pem",
        });
        let samples = parse_metrics(
            "trellis_sds_connected 0\n\
             trellis_sds_updates_total{result=\"ok\"} 2\n\
             trellis_sds_updates_total{result=\"expired\"} 1\n\
             trellis_sds_last_update_timestamp_seconds 1000\n\
             trellis_svid_rotations_total 2\n",
        );
        let mut s = json!({
            "kind": "sidecar",
            "admin": "http://127.0.0.1:15000",
            "ready": true,
            "ready_detail": "ready",
            "trust_domain": "example.org",
            "identity": {"spiffe_id": "spiffe://example.org/web", "serial": "0a", "not_after": "2036-01-01T00:00:00Z", "expires_in_seconds": 60},
            "bundle": [],
        });
        if let (Some(obj), Value::Object(extra)) = (
            s.as_object_mut(),
            sidecar_json(&json!({}), &source, &samples, 1010),
        ) {
            obj.extend(extra);
        }
        s
    }

    #[test]
    fn a_files_sidecar_shows_its_files_not_sds() {
        let s = files_sidecar_summary();
        assert_eq!(s["identity_source"], "files");
        assert!(s["sds"].is_null(), "{s:#}");
        assert_eq!(s["files"]["cert"], "/etc/trellis/svid.pem");
        assert_eq!(s["files"]["reloads"], 2);
        assert_eq!(s["files"]["reloads_refused"], json!({"expired": 1}));
        let text = render(&s);
        for needle in [
            "source          identity files (no control plane); 2 reloads; refused expired=1",
            "  cert          /etc/trellis/svid.pem",
            "  key           /etc/trellis/svid-key.pem",
            "  bundle        /etc/trellis/bundle.pem",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
        }
        assert!(!text.contains("sds "), "{text}");
        assert!(!text.contains("NOT connected"), "{text}");
    }

    #[test]
    fn an_sds_sidecar_names_its_control_plane_when_not_connected() {
        let samples = parse_metrics("trellis_sds_connected 0\n");
        let sds = |source: Value| {
            let s = sidecar_json(&json!({}), &source, &samples, 0);
            assert_eq!(s["identity_source"], "sds");
            assert!(s["files"].is_null(), "{s:#}");
            sds_line(&s["sds"])
        };
        assert_eq!(
            sds(json!({"kind": "sds", "control_plane": "10.0.0.1:8443"})),
            "NOT connected to 10.0.0.1:8443; no update yet; 0 rotations"
        );
        // A sidecar that does not report its source is summarized as before.
        assert_eq!(
            sds(Value::Null),
            "NOT connected; no update yet; 0 rotations"
        );
    }
}
