//! The sidecar's data-path observability, end to end with real processes: the metrics move as
//! the system acts, and the access log says who called what.
//!
//! ```text
//!  test (app A) ──http──▶ sidecar A ══ mTLS ══▶ sidecar B ──http──▶ app B
//!  openssl s_client ════ hostile TLS ═════════▶ sidecar B
//! ```
//!
//! - a rotation bumps `trellis_svid_rotations_total` and moves
//!   `trellis_svid_expiry_timestamp_seconds{spiffe_id}`;
//! - a denial bumps `trellis_authz_decisions_total{decision="deny",rule}` and is logged with
//!   its rule;
//! - refused handshakes bump their reason (`no_cert`, `unknown_ca`, `protocol_version`,
//!   `wrong_identity`);
//! - requests bump `trellis_requests_total{direction,code}` and the duration histograms, one
//!   access-log line each (never a header value or a query string), none with
//!   `--access-log false`; `/metrics` passes `promtool check metrics`.

use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context as _};
use http::StatusCode;
use trellis_tests::app_client::{echo_json, get_once, AppConn, Proto};
use trellis_tests::echo::EchoApp;
use trellis_tests::mesh::{Mesh, MeshOpts, A_ID, B_ID};
use trellis_tests::openssl::{http_get_request, s_client_async, InitCa};
use trellis_tests::policy_mesh::{PolicyMesh, B_HOST, SERVICE_A};
use trellis_tests::sidecar::{Metrics, Sidecar, SidecarOpts};
use trellis_tests::{
    e2e, eventually, run_with_timeout, tool_or_skip, workspace_root, ControlPlane, ControlPlaneOpts,
};

/// Polling deadline for a metric or a log line to show up (generous: 2 shared cores).
const SETTLE: Duration = Duration::from_secs(20);
/// The harness turns the access log off by default (load tests would write a line per
/// request); these tests turn it on.
fn access_log_on() -> Vec<String> {
    vec!["--access-log".into(), "true".into()]
}

/// The `tracing` target of access-log lines.
const ACCESS: &str = "trellis::access";
/// An upstream on sidecar A that points at sidecar B but expects another identity.
const WRONG_ID: &str = "spiffe://example.org/wrong";

/// The access-log lines in a sidecar's stderr (text or JSON: both name the target).
fn access_lines(sidecar: &Sidecar) -> Vec<String> {
    sidecar
        .child
        .stderr()
        .lines()
        .filter(|l| l.contains(ACCESS))
        .map(str::to_owned)
        .collect()
}

/// True when `line` carries the field `key` with `value`, as the text format writes it
/// (`key=value`, `key="value"`) or the JSON one (`"key":value`, `"key":"value"`).
fn has_field(line: &str, key: &str, value: &str) -> bool {
    [
        format!("{key}={value} "),
        format!("{key}=\"{value}\""),
        format!("\"{key}\":\"{value}\""),
        format!("\"{key}\":{value},"),
        format!("\"{key}\":{value}}}"),
    ]
    .iter()
    .any(|p| line.contains(p.as_str()))
        || line.ends_with(&format!("{key}={value}"))
}

/// The access-log lines of `sidecar` that carry every one of `fields`.
fn access_lines_with(sidecar: &Sidecar, fields: &[(&str, &str)]) -> Vec<String> {
    access_lines(sidecar)
        .into_iter()
        .filter(|l| fields.iter().all(|(k, v)| has_field(l, k, v)))
        .collect()
}

/// Waits until `sidecar`'s `/metrics` satisfies `check`, and returns that exposition.
async fn metrics_until(
    sidecar: &Sidecar,
    what: &str,
    check: impl Fn(&Metrics) -> anyhow::Result<()>,
) -> anyhow::Result<Metrics> {
    eventually(SETTLE, what, || async {
        let m = sidecar.metrics().await?;
        check(&m)?;
        Ok(m)
    })
    .await
}

/// `promtool check metrics` on `metrics`, if promtool is installed.
fn promtool_accepts(test: &str, name: &str, metrics: &Metrics) -> anyhow::Result<()> {
    let Some(promtool) = tool_or_skip(test, "promtool") else {
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    let path = dir.path().join(format!("{name}.txt"));
    std::fs::write(&path, metrics.text())?;
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(r#""$0" check metrics < "$1""#)
        .arg(promtool)
        .arg(&path);
    let out = run_with_timeout(cmd, Duration::from_secs(30))?;
    ensure!(
        out.status.success(),
        "promtool check metrics on {name} failed ({}):\n{}{}\n--- metrics ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        metrics.text()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_move_counters_histograms_and_the_access_log() -> anyhow::Result<()> {
    e2e(async {
        let mesh = Mesh::start(MeshOpts {
            a_args: access_log_on(),
            b_args: access_log_on(),
            ..Default::default()
        })
        .await?;
        // A path no other request uses, so its log lines can be counted exactly.
        let path = "/observability/hello";
        let secret_query = "token=sekrit-in-the-query";
        let secret_header = "Bearer sekrit-in-a-header";
        const H1: usize = 12;
        const H2C: usize = 8;

        let mut h1 = AppConn::connect(mesh.a.outbound(), Proto::H1).await?;
        for _ in 0..H1 {
            let reply = h1
                .get(
                    "b",
                    &format!("{path}?{secret_query}"),
                    &[("authorization", secret_header)],
                )
                .await?;
            echo_json(&reply).context("HTTP/1.1 through the mesh")?;
        }
        let mut h2 = AppConn::connect(mesh.a.outbound(), Proto::H2c).await?;
        for _ in 0..H2C {
            echo_json(&h2.get("b", path, &[]).await?).context("h2c through the mesh")?;
        }
        // No upstream for this host: the outbound side answers 404 itself.
        let missing = get_once(mesh.a.outbound(), Proto::H1, "nowhere", "/x", &[]).await?;
        ensure!(
            missing.status == StatusCode::NOT_FOUND,
            "unknown host: {}",
            missing.summary()
        );
        let sent = (H1 + H2C) as f64;

        let a = metrics_until(&mesh.a, "sidecar A's outbound series to move", |m| {
            let ok = m.get(
                "trellis_requests_total",
                &[("direction", "outbound"), ("code", "200")],
            )?;
            let not_found = m.get(
                "trellis_requests_total",
                &[("direction", "outbound"), ("code", "404")],
            )?;
            let timed = m.get(
                "trellis_request_duration_seconds_count",
                &[("direction", "outbound")],
            )?;
            let handshakes = m.get(
                "trellis_tls_handshake_duration_seconds_count",
                &[("direction", "outbound")],
            )?;
            ensure!(
                ok >= sent && not_found >= 1.0 && timed >= sent + 1.0 && handshakes >= 1.0,
                "A: 200s {ok}, 404s {not_found}, timed {timed}, handshakes timed {handshakes}\n{}\n{}",
                m.lines_of("trellis_requests_total"),
                m.lines_of("trellis_request_duration_seconds_count")
            );
            Ok(())
        })
        .await?;
        let b = metrics_until(&mesh.b, "sidecar B's inbound series to move", |m| {
            let ok = m.get(
                "trellis_requests_total",
                &[("direction", "inbound"), ("code", "200")],
            )?;
            let timed = m.get(
                "trellis_request_duration_seconds_count",
                &[("direction", "inbound")],
            )?;
            let handshakes = m.get(
                "trellis_tls_handshake_duration_seconds_count",
                &[("direction", "inbound")],
            )?;
            let open = m.get("trellis_connections_open", &[("direction", "inbound")])?;
            ensure!(
                ok >= sent && timed >= sent && handshakes >= 1.0 && open >= 1.0,
                "B: 200s {ok}, timed {timed}, handshakes timed {handshakes}, open {open}\n{}",
                m.lines_of("trellis_request")
            );
            Ok(())
        })
        .await?;
        eprintln!(
            "A: outbound 200s {}, request duration sum {:.4}s over {} requests; B: inbound 200s {}, handshakes timed {}",
            a.sum("trellis_requests_total", &[("direction", "outbound"), ("code", "200")]),
            a.sum("trellis_request_duration_seconds_sum", &[("direction", "outbound")]),
            a.sum("trellis_request_duration_seconds_count", &[("direction", "outbound")]),
            b.sum("trellis_requests_total", &[("direction", "inbound"), ("code", "200")]),
            b.sum("trellis_tls_handshake_duration_seconds_count", &[("direction", "inbound")]),
        );

        // One line per request on each side: the caller, method, path (no query), status,
        // and where it went.
        let app_b = mesh.app_b.addr.to_string();
        eventually(SETTLE, "one access-log line per request on both sides", || async {
            let inbound = access_lines_with(
                &mesh.b,
                &[
                    ("caller", A_ID),
                    ("direction", "inbound"),
                    ("method", "GET"),
                    ("path", path),
                    ("status", "200"),
                    ("upstream", &app_b),
                ],
            );
            let outbound = access_lines_with(
                &mesh.a,
                &[
                    ("caller", A_ID),
                    ("direction", "outbound"),
                    ("method", "GET"),
                    ("path", path),
                    ("status", "200"),
                    ("upstream", "b"),
                ],
            );
            ensure!(
                inbound.len() == H1 + H2C && outbound.len() == H1 + H2C,
                "want {} lines each; B has {}, A has {}:\nB:\n{}\nA:\n{}",
                H1 + H2C,
                inbound.len(),
                outbound.len(),
                access_lines(&mesh.b).join("\n"),
                access_lines(&mesh.a).join("\n")
            );
            ensure!(
                inbound.iter().all(|l| l.contains("duration_ms")),
                "lines carry the duration:\n{}",
                inbound.join("\n")
            );
            Ok(())
        })
        .await?;
        let not_found = access_lines_with(
            &mesh.a,
            &[("direction", "outbound"), ("path", "/x"), ("status", "404")],
        );
        ensure!(
            not_found.len() == 1,
            "the 404 is logged once on A:\n{}",
            access_lines(&mesh.a).join("\n")
        );
        eprintln!(
            "access log, B: {}\naccess log, A: {}",
            access_lines_with(&mesh.b, &[("path", path)])
                .first()
                .map_or("", String::as_str),
            access_lines_with(&mesh.a, &[("path", path)])
                .first()
                .map_or("", String::as_str)
        );

        // Never a header value or the query string.
        for (name, sidecar) in [("A", &mesh.a), ("B", &mesh.b)] {
            let stderr = sidecar.child.stderr();
            ensure!(
                !stderr.contains("sekrit"),
                "sidecar {name} logged a header value or a query string:\n{}",
                stderr
                    .lines()
                    .filter(|l| l.contains("sekrit"))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }

        promtool_accepts("requests_move_counters_histograms_and_the_access_log", "a", &a)?;
        promtool_accepts("requests_move_counters_histograms_and_the_access_log", "b", &b)?;
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_false_keeps_the_metrics_and_logs_nothing() -> anyhow::Result<()> {
    e2e(async {
        let off = vec!["--access-log".to_string(), "false".to_string()];
        let mesh = Mesh::start(MeshOpts {
            a_args: off.clone(),
            b_args: off,
            ..Default::default()
        })
        .await?;
        const N: usize = 10;
        let mut conn = AppConn::connect(mesh.a.outbound(), Proto::H1).await?;
        for _ in 0..N {
            echo_json(&conn.get("b", "/quiet", &[]).await?)?;
        }
        metrics_until(&mesh.b, "B to count the requests", |m| {
            let ok = m.get(
                "trellis_requests_total",
                &[("direction", "inbound"), ("code", "200")],
            )?;
            let timed = m.get(
                "trellis_request_duration_seconds_count",
                &[("direction", "inbound")],
            )?;
            ensure!(
                ok >= N as f64 && timed >= N as f64,
                "B: 200s {ok}, timed {timed}"
            );
            Ok(())
        })
        .await?;
        metrics_until(&mesh.a, "A to count the requests", |m| {
            let ok = m.get(
                "trellis_requests_total",
                &[("direction", "outbound"), ("code", "200")],
            )?;
            ensure!(ok >= N as f64, "A: 200s {ok}");
            Ok(())
        })
        .await?;
        for (name, sidecar) in [("A", &mesh.a), ("B", &mesh.b)] {
            let lines = access_lines(sidecar);
            ensure!(
                lines.is_empty(),
                "sidecar {name} wrote access-log lines with --access-log false:\n{}",
                lines.join("\n")
            );
        }
        eprintln!("{N} requests, 0 access-log lines on either side");
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denial_bumps_its_rule_and_is_logged_with_it() -> anyhow::Result<()> {
    e2e(async {
        let dir = tempfile::tempdir()?;
        std::fs::copy(
            workspace_root().join("examples/policy/service-b.yaml"),
            dir.path().join("service-b.yaml"),
        )
        .context("copy examples/policy/service-b.yaml")?;
        let mesh = PolicyMesh::start(dir.path(), None).await?;
        let deny = [("decision", "deny"), ("rule", "no-export")];
        let before = mesh
            .b_metrics()
            .await?
            .sum_or_zero("trellis_authz_decisions_total", &deny);

        let reply = get_once(
            mesh.a.outbound(),
            Proto::H1,
            B_HOST,
            "/admin/user-export",
            &[],
        )
        .await?;
        ensure!(
            reply.status == StatusCode::FORBIDDEN,
            "want 403 by no-export: {}",
            reply.summary()
        );
        let m = metrics_until(&mesh.b, "the denial under rule=\"no-export\"", |m| {
            let after = m.get("trellis_authz_decisions_total", &deny)?;
            ensure!(
                after == before + 1.0,
                "deny/no-export went {before} -> {after}\n{}",
                m.lines_of("trellis_authz_decisions_total")
            );
            Ok(())
        })
        .await?;
        ensure!(
            m.sum(
                "trellis_requests_total",
                &[("direction", "inbound"), ("code", "403")]
            ) >= 1.0,
            "B counts the 403:\n{}",
            m.lines_of("trellis_requests_total")
        );

        // An allowed request, spelled oddly: the log shows the normalized path the app got.
        let reply = get_once(
            mesh.a.outbound(),
            Proto::H1,
            B_HOST,
            "/load-balancer/./health",
            &[],
        )
        .await?;
        echo_json(&reply).context("service-a GET /load-balancer/./health")?;
        let m = metrics_until(&mesh.b, "an allow decision", |m| {
            let allowed = m.get("trellis_authz_decisions_total", &[("decision", "allow")])?;
            ensure!(
                allowed >= 1.0,
                "{}",
                m.lines_of("trellis_authz_decisions_total")
            );
            Ok(())
        })
        .await?;
        eprintln!("{}", m.lines_of("trellis_authz_decisions_total"));

        eventually(
            SETTLE,
            "B's access log to show the denial and the allow",
            || async {
                let denied = access_lines_with(
                    &mesh.b,
                    &[
                        ("caller", SERVICE_A),
                        ("direction", "inbound"),
                        ("method", "GET"),
                        ("path", "/admin/user-export"),
                        ("status", "403"),
                        ("rule", "no-export"),
                    ],
                );
                let allowed = access_lines_with(
                    &mesh.b,
                    &[
                        ("caller", SERVICE_A),
                        ("direction", "inbound"),
                        ("path", "/load-balancer/health"),
                        ("status", "200"),
                    ],
                );
                ensure!(
                denied.len() == 1 && allowed.len() == 1,
                "want one 403 line with its rule and one 200 line with the normalized path:\n{}",
                access_lines(&mesh.b).join("\n")
            );
                // An allow names its rule too, with the path as received, the decision and
                // the policy: what `trellis policy replay` decides again.
                ensure!(
                    allowed.iter().all(|l| has_field(l, "rule", "lb-health")
                        && has_field(l, "decision", "allow")
                        && l.contains("raw_path=")
                        && l.contains("policy=")),
                    "an allowed request names its rule, decision, raw path and policy: {allowed:?}"
                );
                Ok(())
            },
        )
        .await?;
        let outbound = access_lines_with(
            &mesh.a,
            &[
                ("caller", SERVICE_A),
                ("direction", "outbound"),
                ("path", "/admin/user-export"),
                ("status", "403"),
                ("upstream", B_HOST),
            ],
        );
        ensure!(
            outbound.len() == 1,
            "A logs the 403 it relayed:\n{}",
            access_lines(&mesh.a).join("\n")
        );
        eprintln!(
            "access log, B: {}",
            access_lines_with(&mesh.b, &[("rule", "no-export")]).join("")
        );
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_handshakes_bump_their_reason() -> anyhow::Result<()> {
    e2e(async {
        let test = "refused_handshakes_bump_their_reason";
        let Some(openssl) = tool_or_skip(test, "openssl") else {
            return Ok(());
        };
        let mesh = Mesh::start(MeshOpts {
            a_upstreams_to_b: vec![("b-wrong".into(), WRONG_ID.into())],
            a_args: access_log_on(),
            b_args: access_log_on(),
            ..Default::default()
        })
        .await?;
        let pki = tempfile::tempdir()?;
        let inbound_errors = |m: &Metrics, reason: &str| {
            m.sum_or_zero(
                "trellis_tls_handshakes_total",
                &[
                    ("direction", "inbound"),
                    ("result", "error"),
                    ("reason", reason),
                ],
            )
        };

        // Same trust domain and shape, but a CA the mesh never trusted.
        let other = InitCa::create("example.org", &pki.path().join("other-ca"))?;
        let intruder = other.sign_leaf_with_openssl(&openssl, A_ID, pki.path(), "intruder")?;
        let cases: [(&str, Vec<String>); 3] = [
            ("no_cert", vec!["-tls1_3".into()]),
            (
                "unknown_ca",
                [&["-tls1_3".to_string()][..], &intruder.s_client_args()].concat(),
            ),
            ("protocol_version", vec!["-tls1_2".into()]),
        ];
        for (reason, args) in cases {
            let before = inbound_errors(&mesh.b.metrics().await?, reason);
            let mut all = vec![
                "-CAfile".to_string(),
                mesh.cp.bundle_pem_path.to_string_lossy().into_owned(),
            ];
            all.extend(args);
            let run = s_client_async(
                &openssl,
                mesh.b.addrs.inbound,
                all,
                &http_get_request("b", "/never", &[]),
            )
            .await?;
            ensure!(
                run.http_status().is_none(),
                "{reason}: the request was answered:\n{}",
                run.describe()
            );
            let m = metrics_until(&mesh.b, &format!("B to count reason=\"{reason}\""), |m| {
                let after = inbound_errors(m, reason);
                ensure!(
                    after == before + 1.0,
                    "{reason}: {before} -> {after}\n{}\n{}",
                    m.lines_of("trellis_tls_handshakes_total"),
                    run.describe()
                );
                Ok(())
            })
            .await?;
            eprintln!(
                "{reason}: {}",
                m.lines_of("trellis_tls_handshakes_total")
                    .lines()
                    .find(|l| l.contains(&format!("reason=\"{reason}\"")))
                    .unwrap_or("")
            );
        }
        ensure!(
            mesh.app_b.seen().is_empty(),
            "app B saw a request from a refused handshake"
        );
        ensure!(
            access_lines(&mesh.b).is_empty(),
            "refused handshakes are not requests, yet B logged:\n{}",
            access_lines(&mesh.b).join("\n")
        );

        // Outbound: sidecar A refuses B's certificate for an upstream that expects another ID.
        let outbound_wrong = |m: &Metrics| {
            m.sum_or_zero(
                "trellis_tls_handshakes_total",
                &[
                    ("direction", "outbound"),
                    ("result", "error"),
                    ("reason", "wrong_identity"),
                ],
            )
        };
        let before = outbound_wrong(&mesh.a.metrics().await?);
        let reply = get_once(mesh.a.outbound(), Proto::H1, "b-wrong", "/never", &[]).await?;
        ensure!(
            reply.status == StatusCode::BAD_GATEWAY && reply.text().contains(B_ID),
            "want 502 naming {B_ID}: {}",
            reply.summary()
        );
        let m = metrics_until(&mesh.a, "A to count reason=\"wrong_identity\"", |m| {
            let after = outbound_wrong(m);
            ensure!(
                after == before + 1.0,
                "wrong_identity: {before} -> {after}\n{}",
                m.lines_of("trellis_tls_handshakes_total")
            );
            ensure!(
                m.get(
                    "trellis_requests_total",
                    &[("direction", "outbound"), ("code", "502")]
                )? >= 1.0,
                "A counts the 502:\n{}",
                m.lines_of("trellis_requests_total")
            );
            Ok(())
        })
        .await?;
        eprintln!("{}", m.lines_of("trellis_tls_handshakes_total"));
        let logged = access_lines_with(
            &mesh.a,
            &[
                ("caller", A_ID),
                ("direction", "outbound"),
                ("path", "/never"),
                ("status", "502"),
                ("upstream", "b-wrong"),
            ],
        );
        ensure!(
            logged.len() == 1,
            "A logs the 502 with its upstream:\n{}",
            access_lines(&mesh.a).join("\n")
        );
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_bumps_the_counter_and_moves_the_expiry_gauge() -> anyhow::Result<()> {
    e2e(async {
        let cp = ControlPlane::start(ControlPlaneOpts {
            svid_ttl: Some("1h".into()),
            rotate_every: Some("2s".into()),
            ..Default::default()
        })?;
        let app = EchoApp::start("app-a").await?;
        let sidecar = Sidecar::start(&cp, SidecarOpts::new("sidecar-a", A_ID, app.addr)).await?;
        let expiry = |m: &Metrics| {
            m.sum_or_zero(
                "trellis_svid_expiry_timestamp_seconds",
                &[("spiffe_id", A_ID)],
            )
        };
        let first = metrics_until(&sidecar, "the first SVID's expiry", |m| {
            ensure!(
                expiry(m) > 0.0 && m.sum("trellis_sds_connected", &[]) == 1.0,
                "{}\n{}",
                m.lines_of("trellis_svid_expiry_timestamp_seconds"),
                m.lines_of("trellis_sds_connected")
            );
            Ok(())
        })
        .await?;
        let (expiry0, rotations0) = (
            expiry(&first),
            first.sum("trellis_svid_rotations_total", &[]),
        );
        // The gauge is one series: the SVID in use, labelled with its SPIFFE ID.
        ensure!(
            first.sum("trellis_svid_expiry_timestamp_seconds", &[]) == expiry0,
            "more than one expiry series:\n{}",
            first.lines_of("trellis_svid_expiry_timestamp_seconds")
        );
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs_f64();
        ensure!(
            (expiry0 - now - 3600.0).abs() < 120.0,
            "a 1h SVID expires at {expiry0}, now is {now}"
        );

        let rotated = metrics_until(&sidecar, "a rotation", |m| {
            let (e, r) = (expiry(m), m.sum("trellis_svid_rotations_total", &[]));
            ensure!(
                r > rotations0 && e > expiry0,
                "rotations {rotations0} -> {r}, expiry {expiry0} -> {e}"
            );
            Ok(())
        })
        .await?;
        eprintln!(
            "rotation: trellis_svid_rotations_total {rotations0} -> {}, expiry {expiry0} -> {}",
            rotated.sum("trellis_svid_rotations_total", &[]),
            expiry(&rotated)
        );
        ensure!(
            rotated.sum("trellis_svid_expiry_timestamp_seconds", &[]) == expiry(&rotated),
            "the old SVID's series stayed:\n{}",
            rotated.lines_of("trellis_svid_expiry_timestamp_seconds")
        );
        Ok(())
    })
    .await
}
