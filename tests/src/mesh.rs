//! The two-workload mesh most sidecar tests need: a control plane, app A behind sidecar A,
//! app B behind sidecar B, and sidecar A routing `Host: b` to sidecar B.

use anyhow::{ensure, Context as _};

use crate::app_client::{echo_json, get_once, Proto};
use crate::echo::EchoApp;
use crate::sidecar::{Sidecar, SidecarOpts};
use crate::{ControlPlane, ControlPlaneOpts};

/// Workload A's SPIFFE ID.
pub const A_ID: &str = "spiffe://example.org/ns/demo/sa/a";
/// Workload B's SPIFFE ID.
pub const B_ID: &str = "spiffe://example.org/ns/demo/sa/b";

/// Extra settings for [`Mesh::start`].
#[derive(Debug, Clone, Default)]
pub struct MeshOpts {
    /// Control plane flags.
    pub control: ControlPlaneOpts,
    /// More arguments for sidecar A.
    pub a_args: Vec<String>,
    /// More arguments for sidecar B.
    pub b_args: Vec<String>,
    /// More upstreams on sidecar A that point at sidecar B's inbound: `(name, identity)`,
    /// routed by `Host: <name>`.
    pub a_upstreams_to_b: Vec<(String, String)>,
    /// More `--upstream` values for sidecar A, with `{B}` replaced by sidecar B's inbound
    /// address.
    pub a_upstreams: Vec<String>,
}

/// A running mesh. Fields drop in order: sidecars, apps, then the control plane and its
/// directory.
pub struct Mesh {
    /// Sidecar A: upstream `b` (Host `b`) → sidecar B, identity [`B_ID`].
    pub a: Sidecar,
    /// Sidecar B.
    pub b: Sidecar,
    /// The app behind sidecar A.
    pub app_a: EchoApp,
    /// The app behind sidecar B.
    pub app_b: EchoApp,
    /// The control plane; its directory holds every log.
    pub cp: ControlPlane,
}

impl Mesh {
    /// Starts everything and waits until both sidecars are ready.
    pub async fn start(opts: MeshOpts) -> anyhow::Result<Self> {
        let cp = ControlPlane::start(opts.control.clone())?;
        let app_a = EchoApp::start("app-a").await?;
        let app_b = EchoApp::start("app-b").await?;
        let mut b_opts = SidecarOpts::new("sidecar-b", B_ID, app_b.addr);
        b_opts.extra_args = opts.b_args.clone();
        let b = Sidecar::start(&cp, b_opts).await?;
        let mut a_opts =
            SidecarOpts::new("sidecar-a", A_ID, app_a.addr).upstream("b", b.addrs.inbound, B_ID);
        for (name, identity) in &opts.a_upstreams_to_b {
            a_opts = a_opts.upstream(name, b.addrs.inbound, identity);
        }
        let b_inbound = b.addrs.inbound.to_string();
        a_opts.upstreams.extend(
            opts.a_upstreams
                .iter()
                .map(|u| u.replace("{B}", &b_inbound)),
        );
        a_opts.extra_args = opts.a_args.clone();
        let a = Sidecar::start(&cp, a_opts).await?;
        Ok(Mesh {
            a,
            b,
            app_a,
            app_b,
            cp,
        })
    }
}

/// A legitimate app request through sidecar A to app B (over A's pooled connection to B's
/// inbound listener): must be a 200 echo from app B. Hostile tests send one before and after
/// each attack to show the sidecar still serves.
pub async fn legit(mesh: &Mesh, path: impl AsRef<str>) -> anyhow::Result<()> {
    let path = path.as_ref();
    let reply = get_once(mesh.a.outbound(), Proto::H1, "b", path, &[]).await?;
    let echo = echo_json(&reply).with_context(|| format!("legitimate {path}"))?;
    ensure!(echo["app"] == "app-b", "legitimate {path} reached {echo}");
    Ok(())
}
