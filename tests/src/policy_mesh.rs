//! A mesh for authorization policy tests: a control plane, service-a (app A behind sidecar
//! A) calling service-b (app B behind sidecar B, run with `--policy PATH`), and optionally a
//! third caller (sidecar C, no app traffic of its own) with another identity.
//!
//! ```text
//!  test (app A) ──http──▶ sidecar A ══ mTLS ══▶ sidecar B (--policy) ──http──▶ app B
//!  test (app C) ──http──▶ sidecar C ══ mTLS ══╝
//! ```

use std::path::Path;

use crate::echo::EchoApp;
use crate::sidecar::{Metrics, Sidecar, SidecarOpts};
use crate::{ControlPlane, ControlPlaneOpts};

/// service-a's SPIFFE ID (the caller the example policy allows).
pub const SERVICE_A: &str = "spiffe://example.org/ns/prod/sa/service-a";
/// service-b's SPIFFE ID (the server that enforces the policy).
pub const SERVICE_B: &str = "spiffe://example.org/ns/prod/sa/service-b";
/// The `Host` the callers use for service-b.
pub const B_HOST: &str = "service-b";

/// A running policy mesh. Fields drop in order: sidecars, apps, then the control plane and
/// its directory (which holds every log).
pub struct PolicyMesh {
    /// Sidecar A (service-a): upstream `service-b` → sidecar B.
    pub a: Sidecar,
    /// The optional third caller: upstream `service-b` → sidecar B.
    pub c: Option<Sidecar>,
    /// Sidecar B (service-b), enforcing the policy.
    pub b: Sidecar,
    /// The app behind sidecar A (unused by the tests, but every sidecar needs an app).
    pub app_a: EchoApp,
    /// The app behind sidecar C, when there is one.
    pub app_c: Option<EchoApp>,
    /// The app behind sidecar B: records what reached it.
    pub app_b: EchoApp,
    /// The control plane.
    pub cp: ControlPlane,
}

impl PolicyMesh {
    /// Starts the mesh with sidecar B enforcing `--policy policy` (a file or a directory),
    /// and, when `third_caller` is given, a sidecar C with that SPIFFE ID. Waits until every
    /// sidecar is ready.
    pub async fn start(policy: &Path, third_caller: Option<&str>) -> anyhow::Result<Self> {
        let cp = ControlPlane::start(ControlPlaneOpts::default())?;
        let app_a = EchoApp::start("app-a").await?;
        let app_b = EchoApp::start("app-b").await?;
        let mut b_opts = SidecarOpts::new("sidecar-b", SERVICE_B, app_b.addr);
        // Access logs on: B's records each decision with its rule, A's what it relayed.
        b_opts.extra_args = vec![
            "--policy".into(),
            policy.display().to_string(),
            "--access-log".into(),
            "true".into(),
        ];
        let b = Sidecar::start(&cp, b_opts).await?;
        let a_opts = SidecarOpts::new("sidecar-a", SERVICE_A, app_a.addr)
            .upstream(B_HOST, b.addrs.inbound, SERVICE_B)
            .args(&["--access-log", "true"]);
        let a = Sidecar::start(&cp, a_opts).await?;
        let (c, app_c) = match third_caller {
            Some(id) => {
                let app_c = EchoApp::start("app-c").await?;
                let c_opts = SidecarOpts::new("sidecar-c", id, app_c.addr).upstream(
                    B_HOST,
                    b.addrs.inbound,
                    SERVICE_B,
                );
                (Some(Sidecar::start(&cp, c_opts).await?), Some(app_c))
            }
            None => (None, None),
        };
        Ok(PolicyMesh {
            a,
            c,
            b,
            app_a,
            app_c,
            app_b,
            cp,
        })
    }

    /// Sidecar B's `/policy` admin endpoint as JSON.
    pub async fn policy_status(&self) -> anyhow::Result<serde_json::Value> {
        let r = self.b.admin_get("/policy").await?;
        anyhow::ensure!(r.status == 200, "/policy: {} {}", r.status, r.text());
        Ok(serde_json::from_str(&r.text())?)
    }

    /// Sidecar B's metrics.
    pub async fn b_metrics(&self) -> anyhow::Result<Metrics> {
        self.b.metrics().await
    }
}
