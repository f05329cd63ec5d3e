//! Authorization policy end to end, with real processes: `trellis control`, sidecar A for
//! service-a, sidecar B for service-b run with `--policy DIR` (the example policy), and a
//! third sidecar for an identity the policy does not name.
//!
//! ```text
//!  test (app A) ──http/1.1──▶ sidecar A (service-a) ══ mTLS ══▶ sidecar B (--policy) ──▶ app B
//!  test (app C) ──http/1.1──▶ sidecar C (intruder)  ══ mTLS ══╝
//! ```

use anyhow::{ensure, Context as _};
use http::StatusCode;
use trellis_tests::app_client::{echo_json, get_once, Proto, Reply};
use trellis_tests::policy_mesh::{PolicyMesh, B_HOST, SERVICE_A};
use trellis_tests::{e2e, workspace_root};

/// An identity of the trust domain that no rule of the example policy names.
const INTRUDER: &str = "spiffe://example.org/ns/dev/sa/intruder";

/// Checks that `reply` is the sidecar's 403 naming `rule` and `caller`.
fn expect_forbidden(reply: &Reply, rule: &str, caller: &str) -> anyhow::Result<()> {
    ensure!(
        reply.status == StatusCode::FORBIDDEN,
        "want 403 by {rule}, got {}",
        reply.summary()
    );
    let body = reply.json()?;
    ensure!(
        body == serde_json::json!({"error": "forbidden", "rule": rule, "caller": caller}),
        "403 body: {body}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn service_a_gets_health_not_the_export_and_strangers_get_nothing() -> anyhow::Result<()> {
    e2e(async {
        // `--policy DIR`: the example policy, as an operator would deploy it.
        let dir = tempfile::tempdir()?;
        std::fs::copy(
            workspace_root().join("examples/policy/service-b.yaml"),
            dir.path().join("service-b.yaml"),
        )
        .context("copy examples/policy/service-b.yaml")?;
        let mesh = PolicyMesh::start(dir.path(), Some(INTRUDER)).await?;
        let a = mesh.a.outbound();
        let status = mesh.policy_status().await?;
        ensure!(
            status["loaded"] == true
                && status["hash"].is_string()
                && status["last_error"].is_null(),
            "/policy: {status}"
        );

        // service-a: the health check passes and the app sees it.
        let reply = get_once(a, Proto::H1, B_HOST, "/load-balancer/health", &[]).await?;
        let echo = echo_json(&reply).context("service-a GET /load-balancer/health")?;
        ensure!(
            echo["app"] == "app-b" && echo["path"] == "/load-balancer/health",
            "health: {echo}"
        );

        // The user export is denied by `no-export`, and the app never hears of it.
        let reply = get_once(a, Proto::H1, B_HOST, "/admin/user-export", &[]).await?;
        expect_forbidden(&reply, "no-export", SERVICE_A)?;
        ensure!(
            mesh.app_b
                .seen()
                .iter()
                .all(|r| !r.path.starts_with("/admin")),
            "app B received an /admin request"
        );

        // Another spelling of the health path is allowed, and the app sees the normal form.
        let before = mesh.app_b.seen().len();
        let reply = get_once(a, Proto::H1, B_HOST, "/load-balancer/./health", &[]).await?;
        let echo = echo_json(&reply).context("service-a GET /load-balancer/./health")?;
        ensure!(
            echo["path"] == "/load-balancer/health",
            "the app saw {} for /load-balancer/./health",
            echo["path"]
        );
        let seen = mesh.app_b.seen();
        ensure!(
            seen.len() == before + 1 && seen[before].path == "/load-balancer/health",
            "app B saw {:?}",
            seen[before..].iter().map(|r| &r.path).collect::<Vec<_>>()
        );
        // ...and a spelling of the export path is still the export.
        let reply = get_once(a, Proto::H1, B_HOST, "/admin/./x/../user-export", &[]).await?;
        expect_forbidden(&reply, "no-export", SERVICE_A)?;

        // An authenticated caller the policy does not name: denied by `default`, even for
        // the path service-a may call.
        let c = mesh.c.as_ref().context("no third caller")?.outbound();
        let reply = get_once(c, Proto::H1, B_HOST, "/load-balancer/health", &[]).await?;
        expect_forbidden(&reply, "default", INTRUDER)?;
        let reply = get_once(c, Proto::H1, B_HOST, "/admin/user-export", &[]).await?;
        expect_forbidden(&reply, "no-export", INTRUDER)?;

        // Every decision is counted under its rule.
        let m = mesh.b_metrics().await?;
        let name = "trellis_authz_decisions_total";
        for (decision, rule, want) in [
            ("allow", "lb-health", 2.0),
            ("deny", "no-export", 3.0),
            ("deny", "default", 1.0),
        ] {
            let got = m.sum(name, &[("decision", decision), ("rule", rule)]);
            ensure!(
                got == want,
                "{name}{{decision={decision},rule={rule}}} = {got}, want {want}:\n{}",
                m.lines_of(name)
            );
        }
        Ok(())
    })
    .await
}
