//! A mesh with a policy on the server side: callers with their own outbound sidecars →
//! mTLS → the server's inbound (deciding with a `PolicyEngine`, its file watched) → echo app.
#![allow(dead_code, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, StatusCode};
use http_body_util::BodyExt;
use tokio::sync::watch;
use trellis_sidecar::admin::{self, AdminState};
use trellis_sidecar::drain;
use trellis_sidecar::inbound::InboundProxy;
use trellis_sidecar::metrics::SidecarMetrics;
use trellis_sidecar::policy::{PolicyEngine, PolicyWatcher};

use crate::datapath_support::*;

pub const SERVICE_A_PATH: &str = "/ns/prod/sa/service-a";
pub const SERVICE_A: &str = "spiffe://example.org/ns/prod/sa/service-a";
pub const STRANGER_PATH: &str = "/ns/prod/sa/stranger";
pub const STRANGER: &str = "spiffe://example.org/ns/prod/sa/stranger";

/// service-a may GET the load balancer health check, nobody may touch `/admin/**`,
/// everything else is denied by default.
pub const POLICY: &str = "apiVersion: trellis.io/v1
kind: Policy
defaultAction: deny
rules:
  - name: lb-health
    action: allow
    from: [spiffe://example.org/ns/prod/sa/service-a]
    to:
      - methods: [GET]
        paths: [/load-balancer/health]
  - name: no-export
    action: deny
    from: [\"*\"]
    to:
      - paths: [/admin/**]
  - name: a-admin
    action: allow
    from: [spiffe://example.org/ns/prod/sa/service-a]
    to:
      - paths: [/admin/**]
";

/// The same, with service-a allowed `/other` as well (a visible change of decision).
pub fn policy_allowing_other() -> String {
    format!(
        "{POLICY}  - name: a-other
    action: allow
    from: [spiffe://example.org/ns/prod/sa/service-a]
    to:
      - paths: [/other]
"
    )
}

/// How the policy sits on disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// `dir/policy.yaml`; the sidecar is given the file.
    File,
    /// Kubernetes ConfigMap volume: `dir/policy.yaml -> ..data/policy.yaml`,
    /// `..data -> ..<timestamp>`; the sidecar is given the directory.
    ConfigMap,
}

pub struct PolicyMesh {
    pub mesh: Mesh,
    pub app: App,
    pub dir: tempfile::TempDir,
    pub layout: Layout,
    pub engine: Arc<PolicyEngine>,
    pub server_metrics: Arc<SidecarMetrics>,
    pub inbound: Running<InboundAddrs>,
    pub admin: AdminState,
    outbounds: Vec<Running<Vec<(String, SocketAddr)>>>,
    swaps: u32,
    _stop_watcher: watch::Sender<bool>,
}

impl PolicyMesh {
    pub async fn start(layout: Layout, policy: &str) -> Self {
        let mesh = Mesh::new();
        let app = spawn_app().await;
        let dir = tempfile::tempdir().unwrap();
        let mut pm_swaps = 0;
        let policy_path = match layout {
            Layout::File => {
                let file = dir.path().join("policy.yaml");
                std::fs::write(&file, policy).unwrap();
                file
            }
            Layout::ConfigMap => {
                configmap_swap(dir.path(), &mut pm_swaps, policy);
                std::os::unix::fs::symlink("..data/policy.yaml", dir.path().join("policy.yaml"))
                    .unwrap();
                dir.path().to_owned()
            }
        };
        let server_metrics = mesh.server_metrics.clone();
        let engine = PolicyEngine::load(&policy_path, server_metrics.clone()).unwrap();
        let (stop, stop_rx) = watch::channel(false);
        tokio::spawn(PolicyWatcher::new(engine.clone()).run(stop_rx));
        let mut inbound_settings = settings(app.addr, Vec::new());
        inbound_settings.inbound_tcp = vec![tcp_forward(app.addr)];
        let proxy = InboundProxy::bind_with_policy(
            &inbound_settings,
            mesh.server_store.clone(),
            server_metrics.clone(),
            engine.clone(),
        )
        .await
        .unwrap();
        let addrs = InboundAddrs {
            http: proxy.local_addr(),
            tcp: proxy.tcp_addrs(),
        };
        let (signal, drain) = drain::channel();
        let task = tokio::spawn(proxy.run(drain));
        let admin = AdminState {
            store: mesh.server_store.clone(),
            metrics: server_metrics.clone(),
            expiry_margin: Duration::from_secs(60),
            policy: engine.clone(),
            source: serde_json::Value::Null,
        };
        Self {
            mesh,
            app,
            dir,
            layout,
            engine,
            server_metrics,
            inbound: Running {
                addrs,
                signal: Some(signal),
                task,
            },
            admin,
            outbounds: Vec::new(),
            swaps: pm_swaps,
            _stop_watcher: stop,
        }
    }

    /// An outbound sidecar for a caller with SVID path `path`, routing Host `service-b`
    /// to the server; returns its shared listener.
    pub async fn caller(&mut self, path: &str) -> SocketAddr {
        let (store, metrics) = store(&self.mesh.ca, self.mesh.ca.svid(path));
        let upstream = http_upstream("b", &["service-b"], self.inbound.addrs.http, SERVER_ID);
        let s = settings(closed_port().await, vec![upstream]);
        let running = spawn_outbound(&s, store, metrics).await;
        let addr = addr_of(&running.addrs, "shared");
        self.outbounds.push(running);
        addr
    }

    /// An outbound sidecar for a caller with SVID path `path` with a TCP upstream to the
    /// server's TCP forward (which leads to the echo app); returns the upstream's listener.
    pub async fn tcp_caller(&mut self, path: &str) -> SocketAddr {
        let (store, metrics) = store(&self.mesh.ca, self.mesh.ca.svid(path));
        let mut upstream = http_upstream("db", &[], self.inbound.addrs.tcp[0], SERVER_ID);
        upstream.protocol = trellis_sidecar::config::Protocol::Tcp;
        upstream.listen = Some("127.0.0.1:0".parse().unwrap());
        let s = settings(closed_port().await, vec![upstream]);
        let running = spawn_outbound(&s, store, metrics).await;
        let addr = addr_of(&running.addrs, "db");
        self.outbounds.push(running);
        addr
    }

    /// The policy file the watcher sees (the symlinked name in a ConfigMap layout).
    pub fn policy_file(&self) -> PathBuf {
        self.dir.path().join("policy.yaml")
    }

    /// Rewrites the file in place (truncate + write, same inode).
    pub fn write_in_place(&self, text: &str) {
        assert_eq!(self.layout, Layout::File);
        std::fs::write(self.policy_file(), text).unwrap();
    }

    /// Writes a temporary file and renames it over the policy (an editor's save).
    pub fn write_by_rename(&self, text: &str) {
        assert_eq!(self.layout, Layout::File);
        let tmp = self.dir.path().join(".policy.yaml.swp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, self.policy_file()).unwrap();
    }

    /// Kubernetes' atomic update: a new timestamped directory, `..data` swapped to it.
    pub fn swap_configmap(&mut self, text: &str) {
        assert_eq!(self.layout, Layout::ConfigMap);
        configmap_swap(self.dir.path(), &mut self.swaps, text);
    }

    /// `/policy` as JSON, through the admin router.
    pub async fn admin_policy(&self) -> serde_json::Value {
        let response = admin::route(&self.admin, &Method::GET, "/policy");
        assert_eq!(response.status(), StatusCode::OK);
        let body: Bytes = response.into_body().collect().await.unwrap().to_bytes();
        serde_json::from_slice(&body).unwrap()
    }

    #[track_caller]
    pub fn metric(&self, series: &str) -> u64 {
        metric(&self.server_metrics, series)
    }

    /// [`PolicyMesh::metric`], 0 while a labelled series has not moved yet (for polls).
    pub fn metric_or_zero(&self, series: &str) -> u64 {
        metric_or_zero(&self.server_metrics, series)
    }
}

/// One ConfigMap update (the first call creates the volume's layout).
fn configmap_swap(dir: &Path, swaps: &mut u32, text: &str) {
    *swaps += 1;
    let data = format!("..2026_11_26_{:02}", *swaps);
    std::fs::create_dir(dir.join(&data)).unwrap();
    std::fs::write(dir.join(&data).join("policy.yaml"), text).unwrap();
    let tmp = dir.join("..data_tmp");
    std::os::unix::fs::symlink(&data, &tmp).unwrap();
    let old = std::fs::read_link(dir.join("..data")).ok();
    std::fs::rename(&tmp, dir.join("..data")).unwrap();
    if let Some(old) = old {
        std::fs::remove_dir_all(dir.join(old)).unwrap();
    }
}

/// GET `path` on service-b through the caller's outbound listener, on a new connection.
pub async fn get(outbound: SocketAddr, path: &str) -> Reply {
    Client::http1(outbound).await.get("service-b", path).await
}

/// Polls `GET path` until it answers `want` or 10 s pass.
pub async fn eventually_status(outbound: SocketAddr, path: &str, want: StatusCode) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = get(outbound, path).await.status;
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{path}: still {got}, waiting for {want}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
