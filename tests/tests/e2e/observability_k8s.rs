//! `k8s/observability/`: the Grafana dashboard is well-formed dashboard JSON, every query in it
//! (and every metric the alert rules name) is something a running sidecar or control plane
//! exports, and every query parses as PromQL (`promtool check rules` on a rules file made of
//! the dashboard's expressions). The alert rules themselves are checked and unit-tested by
//! `promtool` in `tests/run.sh`.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, ensure, Context as _};
use serde_json::Value;
use trellis_tests::app_client::{get_once, Proto};
use trellis_tests::policy_mesh::{PolicyMesh, B_HOST};
use trellis_tests::{
    e2e, eventually, fetch_svid, run_with_timeout, tool_or_skip, trellis_bin, workspace_root,
    SdsStream, COMMAND_TIMEOUT, STARTUP_TIMEOUT,
};

fn observability_dir() -> PathBuf {
    workspace_root().join("k8s/observability")
}

fn dashboard() -> Value {
    let path = observability_dir().join("trellis-dashboard.json");
    let text = std::fs::read_to_string(&path).unwrap();
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every `(panel title, PromQL)` in the dashboard, and the metric each templating query reads.
fn dashboard_queries(dash: &Value) -> (Vec<(String, String)>, Vec<String>) {
    let mut exprs = Vec::new();
    for panel in dash["panels"].as_array().unwrap() {
        let title = panel["title"].as_str().unwrap_or("?").to_string();
        for target in panel["targets"].as_array().into_iter().flatten() {
            exprs.push((title.clone(), target["expr"].as_str().unwrap().to_string()));
        }
    }
    let mut variable_metrics = Vec::new();
    for var in dash["templating"]["list"].as_array().unwrap() {
        if var["type"] == "query" {
            let q = var["query"]["query"].as_str().unwrap();
            // label_values(<metric>, <label>)
            let inner = q
                .strip_prefix("label_values(")
                .and_then(|r| r.strip_suffix(')'))
                .unwrap_or_else(|| panic!("variable {}: unexpected query {q:?}", var["name"]));
            let metric = inner.split(',').next().unwrap().trim();
            variable_metrics.push(metric.to_string());
        }
    }
    (exprs, variable_metrics)
}

/// The metric names a PromQL expression selects: identifiers that are not functions,
/// aggregation operators, keywords, label names in `by (…)`/`on (…)`, label matchers,
/// durations, numbers, strings or Grafana variables.
fn metric_names(expr: &str) -> BTreeSet<String> {
    const AGGREGATIONS: &[&str] = &[
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
    ];
    const KEYWORDS: &[&str] = &["and", "or", "unless", "bool", "offset", "atan2"];
    const GROUPING: &[&str] = &[
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    ];
    let chars: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    // Skips from an opening bracket to just past its closing one, stepping over strings.
    let skip_until = |mut i: usize, close: char| -> usize {
        while i < chars.len() && chars[i] != close {
            if chars[i] == '"' || chars[i] == '\'' {
                let q = chars[i];
                i += 1;
                while i < chars.len() && chars[i] != q {
                    if chars[i] == '\\' {
                        i += 1;
                    }
                    i += 1;
                }
            }
            i += 1;
        }
        i + 1
    };
    while i < chars.len() {
        let c = chars[i];
        match c {
            '"' | '\'' => {
                i += 1;
                while i < chars.len() && chars[i] != c {
                    if chars[i] == '\\' {
                        i += 1;
                    }
                    i += 1;
                }
                i += 1;
            }
            '{' => i = skip_until(i + 1, '}'),
            '[' => i = skip_until(i + 1, ']'),
            '$' => {
                // A Grafana variable: $name or ${name}.
                i += 1;
                if i < chars.len() && chars[i] == '{' {
                    i = skip_until(i + 1, '}');
                } else {
                    while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_') {
                        i += 1;
                    }
                }
            }
            c if c.is_ascii_digit() || c == '.' => {
                // Numbers, and durations such as `1h` after `offset`.
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                    i += 1;
                }
            }
            c if c.is_ascii_alphabetic() || c == '_' || c == ':' => {
                let start = i;
                while i < chars.len()
                    && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
                {
                    i += 1;
                }
                let ident: String = chars[start..i].iter().collect();
                let mut j = i;
                while j < chars.len() && chars[j].is_whitespace() {
                    j += 1;
                }
                let next = chars.get(j).copied();
                if GROUPING.contains(&ident.as_str()) {
                    if next == Some('(') {
                        i = skip_until(j + 1, ')');
                    }
                } else if next == Some('(')
                    || AGGREGATIONS.contains(&ident.as_str())
                    || KEYWORDS.contains(&ident.as_str())
                {
                    // A function call, an aggregation (`sum by (…) (…)`) or a keyword.
                } else {
                    names.insert(ident);
                }
            }
            _ => i += 1,
        }
    }
    names
}

/// The sample names a `/metrics` exposition can contain, from its `# TYPE` lines (a labelled
/// counter that has not moved has no sample yet, but its family is declared).
fn exported_names(exposition: &str, into: &mut BTreeSet<String>) {
    for line in exposition.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let mut parts = rest.split_whitespace();
        let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
            continue;
        };
        into.insert(name.to_string());
        match kind {
            "counter" if !name.ends_with("_total") => {
                into.insert(format!("{name}_total"));
            }
            "histogram" | "summary" => {
                for suffix in ["_bucket", "_sum", "_count"] {
                    into.insert(format!("{name}{suffix}"));
                }
            }
            _ => {}
        }
    }
}

#[test]
fn dashboard_is_grafana_dashboard_json() {
    let dash = dashboard();
    for key in ["title", "uid"] {
        assert!(
            dash[key].as_str().is_some_and(|s| !s.is_empty()),
            "dashboard has no {key}"
        );
    }
    assert!(dash["schemaVersion"].as_u64().is_some(), "no schemaVersion");
    assert!(dash["time"]["from"].is_string() && dash["time"]["to"].is_string());
    assert!(
        dash["id"].is_null(),
        "id must be null so an import creates it"
    );

    // A Prometheus data source variable every query uses, so the dashboard imports anywhere.
    let vars = dash["templating"]["list"]
        .as_array()
        .expect("templating.list");
    let ds = vars
        .iter()
        .find(|v| v["name"] == "datasource")
        .expect("a `datasource` variable");
    assert_eq!(ds["type"], "datasource");
    assert_eq!(ds["query"], "prometheus");
    for v in vars.iter().filter(|v| v["type"] == "query") {
        assert_eq!(
            v["datasource"]["uid"], "${datasource}",
            "variable {}",
            v["name"]
        );
    }

    let panels = dash["panels"].as_array().expect("panels");
    let mut ids = BTreeSet::new();
    let mut cells: BTreeMap<(u64, u64), String> = BTreeMap::new();
    let mut queries = 0;
    for p in panels {
        let title = p["title"].as_str().expect("every panel has a title");
        let id = p["id"].as_u64().unwrap_or_else(|| panic!("{title}: no id"));
        assert!(ids.insert(id), "{title}: duplicate panel id {id}");
        let kind = p["type"]
            .as_str()
            .unwrap_or_else(|| panic!("{title}: no type"));
        let g = &p["gridPos"];
        let [h, w, x, y] = ["h", "w", "x", "y"].map(|k| {
            g[k].as_u64()
                .unwrap_or_else(|| panic!("{title}: gridPos.{k}"))
        });
        assert!(
            w >= 1 && x + w <= 24 && h >= 1,
            "{title}: gridPos {g} off the 24-column grid"
        );
        // No two panels share a grid cell.
        for row in y..y + h {
            for col in x..x + w {
                if let Some(other) = cells.insert((row, col), title.to_string()) {
                    panic!("{title} overlaps {other} at row {row}, column {col}");
                }
            }
        }
        if kind == "row" {
            continue;
        }
        assert!(
            ["timeseries", "stat", "gauge", "table", "bargauge"].contains(&kind),
            "{title}: unexpected panel type {kind}"
        );
        assert_eq!(p["datasource"]["type"], "prometheus", "{title}");
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{title}");
        assert!(
            p["description"].as_str().is_some_and(|d| !d.is_empty()),
            "{title}: no description"
        );
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title}: no queries");
        let mut ref_ids = BTreeSet::new();
        for t in targets {
            let r = t["refId"].as_str().expect("refId");
            assert!(ref_ids.insert(r), "{title}: duplicate refId {r}");
            assert_eq!(t["datasource"]["uid"], "${datasource}", "{title} {r}");
            let expr = t["expr"].as_str().expect("expr");
            assert!(!expr.trim().is_empty(), "{title} {r}: empty expr");
            assert!(
                !metric_names(expr).is_empty(),
                "{title} {r}: {expr} selects no metric"
            );
            queries += 1;
        }
    }
    println!(
        "dashboard: {} panels, {queries} queries, {} variables",
        panels.len(),
        vars.len()
    );

    // The panels the operator's view needs, by the metric they chart.
    let (exprs, _) = dashboard_queries(&dash);
    let all: BTreeSet<String> = exprs.iter().flat_map(|(_, e)| metric_names(e)).collect();
    for needed in [
        "trellis_svid_expiry_timestamp_seconds",
        "trellis_sds_connected",
        "trellis_sds_updates_total",
        "trellis_tls_handshakes_total",
        "trellis_tls_handshake_duration_seconds_bucket",
        "trellis_request_duration_seconds_bucket",
        "trellis_requests_total",
        "trellis_authz_decisions_total",
        "trellis_policy_reload_errors_total",
        "trellis_svids_issued_total",
        "trellis_attestation_failures_total",
        "trellis_sds_streams",
        "trellis_bundle_cas",
        "trellis_ca_expiry_timestamp_seconds",
    ] {
        assert!(all.contains(needed), "no panel charts {needed}");
    }
}

#[test]
fn metric_names_skips_everything_but_metrics() {
    let names = metric_names(
        r#"histogram_quantile(0.99, sum by (le, direction) (rate(trellis_x_bucket{job=~"$j",a="b{c}"}[$__rate_interval] offset 1h))) > 3 * (sum without (rule) (trellis_y) or vector(0)) and on () trellis_z:recorded"#,
    );
    let want: BTreeSet<String> = ["trellis_x_bucket", "trellis_y", "trellis_z:recorded"]
        .map(String::from)
        .into();
    assert_eq!(names, want);
}

/// The dashboard's expressions, with Grafana's variables filled in, as recording rules that
/// `promtool check rules` parses.
#[test]
fn dashboard_queries_parse_as_promql() {
    let Some(promtool) = tool_or_skip("dashboard_queries_parse_as_promql", "promtool") else {
        return;
    };
    let (exprs, _) = dashboard_queries(&dashboard());
    let mut rules = String::from("groups:\n  - name: trellis-dashboard\n    rules:\n");
    for (i, (_, expr)) in exprs.iter().enumerate() {
        let expr = expr
            .replace("$__rate_interval", "5m")
            .replace("$sidecar_job", ".*")
            .replace("$control_job", ".*");
        rules.push_str(&format!(
            "      - record: dashboard:query_{i}\n        expr: {}\n",
            serde_json::to_string(&expr).unwrap()
        ));
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dashboard-rules.yaml");
    std::fs::write(&path, &rules).unwrap();
    let mut cmd = Command::new(promtool);
    cmd.args(["check", "rules"]).arg(&path);
    let out = run_with_timeout(cmd, COMMAND_TIMEOUT).unwrap();
    assert!(
        out.status.success(),
        "promtool check rules on the dashboard's queries failed:\n{}{}\n{rules}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("promtool parsed all {} dashboard queries", exprs.len());
}

/// Every metric the dashboard and the alert rules name is exported by a running sidecar or
/// control plane. A labelled family has no line in `/metrics` until it moves, so the test
/// moves each one first: requests through a policy (allowed and denied), a refused join
/// token, an SDS request for an unknown secret, and a scheduled CA rotation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_and_alerts_name_only_exported_metrics() -> anyhow::Result<()> {
    e2e(async {
        let policy = workspace_root().join("examples/policy/service-b.yaml");
        let mesh = PolicyMesh::start(&policy, None).await?;
        let ok = get_once(mesh.a.outbound(), Proto::H1, B_HOST, "/api/items", &[]).await?;
        ensure!(ok.status == 200, "GET /api/items: {}", ok.summary());
        let denied =
            get_once(mesh.a.outbound(), Proto::H1, B_HOST, "/admin/user-export", &[]).await?;
        ensure!(denied.status == 403, "GET /admin/user-export: {}", denied.summary());
        ensure!(
            fetch_svid(&mesh.cp, "trellis-join.not-a-real-token-0123456789")
                .await
                .is_err(),
            "a made-up join token was accepted"
        );
        let token = mesh.cp.create_token("spiffe://example.org/ns/demo/sa/c", "1h")?;
        let mut client = mesh.cp.sds_client().await?;
        let unknown = match SdsStream::open(&mut client, Some(&token), &["no-such-secret"]).await {
            Ok(mut stream) => stream.recv(Duration::from_secs(10)).await.map(|_| ()),
            Err(e) => Err(e),
        };
        ensure!(unknown.is_err(), "an unknown secret name was served");
        let mut rotate = Command::new(trellis_bin());
        rotate
            .args(["ca", "rotate", "--state-dir"])
            .arg(&mesh.cp.state_dir)
            .args(["--trust-domain", "example.org", "--activate-after", "1h"]);
        let out = run_with_timeout(rotate, COMMAND_TIMEOUT)?;
        ensure!(
            out.status.success(),
            "trellis ca rotate: {}",
            String::from_utf8_lossy(&out.stderr)
        );

        // The control plane picks the rotation up within a second or so.
        let cp_text = eventually(STARTUP_TIMEOUT, "control plane counters moved", || async {
            let r = mesh.cp.admin_get("/metrics").await?;
            ensure!(r.status == 200, "control plane /metrics: {}", r.status);
            let text = r.text();
            for family in [
                "trellis_ca_transitions",
                "trellis_attestation_failures",
                "trellis_sds_request_errors",
            ] {
                ensure!(
                    text.contains(&format!("# TYPE {family}")),
                    "{family} not in /metrics yet"
                );
            }
            Ok(text)
        })
        .await?;
        let mut exported = BTreeSet::new();
        for sidecar in [&mesh.a, &mesh.b] {
            exported_names(sidecar.metrics().await?.text(), &mut exported);
        }
        exported_names(&cp_text, &mut exported);
        // The federation families move only with a relationship: a second control plane
        // federates with an endpoint nobody serves (bundle never fetched, fetches failing).
        let fed_dir = tempfile::tempdir()?;
        let bootstrap = fed_dir.path().join("b.org.pem");
        std::fs::write(
            &bootstrap,
            trellis_identity::testca::TestCa::root("b.org").bundle_pem(),
        )?;
        let config = fed_dir.path().join("control.yaml");
        std::fs::write(
            &config,
            format!(
                "federation:\n  - trust_domain: b.org\n    bundle_endpoint_url: https://127.0.0.1:{}\n    profile: https_spiffe\n    endpoint_spiffe_id: spiffe://b.org/trellis/control\n    bootstrap_bundle: {}\n",
                trellis_tests::free_port(),
                bootstrap.display()
            ),
        )?;
        let fed_cp = trellis_tests::ControlPlane::start(trellis_tests::ControlPlaneOpts {
            extra_args: vec!["--config".into(), config.display().to_string()],
            ..Default::default()
        })?;
        let fed_text = eventually(STARTUP_TIMEOUT, "a federation refresh failure", || async {
            let text = fed_cp.admin_get("/metrics").await?.text();
            ensure!(
                text.contains("trellis_federation_refresh_failures_total{"),
                "no refresh failure counted yet"
            );
            Ok(text)
        })
        .await?;
        exported_names(&fed_text, &mut exported);

        let dash = dashboard();
        let (exprs, variable_metrics) = dashboard_queries(&dash);
        let mut unknown = Vec::new();
        for (title, expr) in &exprs {
            for name in metric_names(expr) {
                if !exported.contains(&name) {
                    unknown.push(format!("panel {title:?}: {name}"));
                }
            }
        }
        for name in &variable_metrics {
            if !exported.contains(name) {
                unknown.push(format!("variable query: {name}"));
            }
        }

        // The rules file has no other `trellis_…` words than metric names (annotations quote
        // metrics only), so a plain scan catches a renamed or misspelled metric.
        let alerts_path = observability_dir().join("trellis-alerts.yaml");
        let alerts = std::fs::read_to_string(&alerts_path)
            .with_context(|| format!("read {}", alerts_path.display()))?;
        let mut alert_metrics = BTreeSet::new();
        for word in alerts.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if word.starts_with("trellis_") {
                alert_metrics.insert(word.to_string());
            }
        }
        for name in &alert_metrics {
            if !exported.contains(name) {
                unknown.push(format!("{}: {name}", alerts_path.display()));
            }
        }

        let used: BTreeSet<String> = exprs.iter().flat_map(|(_, e)| metric_names(e)).collect();
        println!(
            "exported families+samples: {}; dashboard uses {} metric names, alert rules {}",
            exported.len(),
            used.len(),
            alert_metrics.len()
        );
        if !unknown.is_empty() {
            bail!(
                "metrics named in k8s/observability but not exported:\n  {}\nexported: {exported:?}",
                unknown.join("\n  ")
            );
        }
        Ok(())
    })
    .await
}
