//! Wires a sidecar together: identity source → [`SvidStore`] → inbound and outbound proxies,
//! plus the admin endpoint; drains on shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use trellis_identity::{SpiffeId, TrustBundle};

use crate::admin::{self, AdminState};
use crate::config::{IdentitySource, SidecarSettings};
use trellis_serve::drain::{self, DrainSignal};

use crate::identity_files;
use crate::inbound::InboundProxy;
use crate::metrics::SidecarMetrics;
use crate::outbound::OutboundProxy;
use crate::policy::{PolicyEngine, PolicyWatcher};
use crate::sds::SdsClient;
use crate::svid_store::SvidStore;
use crate::workload_api::{SocketFile, WorkloadApi};

/// Why the sidecar could not start; names the file or address.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A bootstrap file (bundle, token, PEM).
    #[error("{path}: {problem}")]
    File {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// Identity files refused.
    #[error(transparent)]
    Files(#[from] identity_files::FilesError),
    /// The authorization policy cannot be loaded (`file:line:column: message`).
    #[error(transparent)]
    Policy(#[from] crate::policy::PolicyLoadError),
    /// SDS bootstrap refused.
    #[error(transparent)]
    Sds(#[from] crate::sds::SdsClientError),
    /// The Workload API socket could not be created (names the path and what to do).
    #[error(transparent)]
    WorkloadApi(#[from] crate::workload_api::SocketError),
    /// A listener could not bind.
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        /// `inbound`, `outbound`, `admin`.
        what: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
}

/// A running sidecar.
pub struct Sidecar {
    /// The mTLS inbound listener.
    pub inbound_addr: SocketAddr,
    /// Outbound listeners: `("shared", addr)` and one per dedicated upstream port.
    pub outbound_addrs: Vec<(String, SocketAddr)>,
    /// The admin listener.
    pub admin_addr: SocketAddr,
    /// The identity.
    pub store: Arc<SvidStore>,
    /// Metrics.
    pub metrics: Arc<SidecarMetrics>,
    /// The authorization policy in force.
    pub policy: Arc<PolicyEngine>,
    /// The SPIFFE Workload API socket, when served; removed when the sidecar stops.
    workload_api: Option<SocketFile>,
    drain_timeout: Duration,
    drain_signal: DrainSignal,
    /// The admin listener's drain: it keeps answering (`/ready`, `/metrics`) while the
    /// proxies drain, and winds down with the rest of the process after.
    admin_drain: DrainSignal,
    shutdown: watch::Sender<bool>,
    /// Turns true when `POST /shutdown` on the admin endpoint was accepted.
    admin_shutdown: watch::Receiver<bool>,
    tasks: Vec<JoinHandle<()>>,
}

fn read_bundle(
    path: &std::path::Path,
    setting: &str,
    settings: &SidecarSettings,
) -> Result<TrustBundle, StartError> {
    let pem = std::fs::read(path).map_err(|e| StartError::File {
        path: path.to_owned(),
        problem: format!("cannot read {setting}: {e}"),
    })?;
    TrustBundle::from_pem(settings.trust_domain.clone(), &pem).map_err(|e| StartError::File {
        path: path.to_owned(),
        problem: format!("{setting}: {e}"),
    })
}

impl Sidecar {
    /// Loads the identity source, binds every listener, and starts serving. With files, the
    /// SVID is installed before this returns; with SDS, `/ready` turns true on the first SVID.
    pub async fn start(settings: SidecarSettings) -> Result<Self, StartError> {
        let metrics = Arc::new(SidecarMetrics::new());
        // A policy that does not load refuses the start (no silent allow-all).
        let policy = match &settings.policy {
            Some(path) => PolicyEngine::load(path, Arc::clone(&metrics))?,
            None => PolicyEngine::allow_all(Arc::clone(&metrics)),
        };
        let (shutdown, shutdown_rx) = watch::channel(false);
        let mut tasks = Vec::new();
        let store = match &settings.identity {
            IdentitySource::Files(files) => {
                let store = SvidStore::new(
                    read_bundle(
                        &files.bundle,
                        "the trust bundle (identity.files.bundle, --bundle)",
                        &settings,
                    )?,
                    None,
                    Arc::clone(&metrics),
                );
                identity_files::load(files, &store)?;
                tasks.push(tokio::spawn(identity_files::watch(
                    files.clone(),
                    Arc::clone(&store),
                    Arc::clone(&metrics),
                    shutdown_rx.clone(),
                )));
                store
            }
            IdentitySource::Sds(sds) => {
                let bundle =
                    crate::sds::read_control_bundle(&sds.control_bundle, &settings.trust_domain)?;
                let store = SvidStore::new(bundle, sds.expected_id.clone(), Arc::clone(&metrics));
                let client = SdsClient::new(sds.clone(), Arc::clone(&store), Arc::clone(&metrics))?;
                tasks.push(tokio::spawn(client.run(shutdown_rx.clone())));
                store
            }
        };

        // Whatever the identity source, an SVID about to expire (or expired) is said out loud.
        tasks.push(tokio::spawn(crate::svid_store::watch_expiry(
            Arc::clone(&store),
            settings.expiry_margin,
            shutdown_rx.clone(),
        )));

        let inbound = InboundProxy::bind_with_policy(
            &settings,
            Arc::clone(&store),
            Arc::clone(&metrics),
            Arc::clone(&policy),
        )
        .await
        .map_err(|source| StartError::Bind {
            what: "inbound",
            addr: settings.inbound_listen,
            source,
        })?;
        let outbound = OutboundProxy::bind(&settings, Arc::clone(&store), Arc::clone(&metrics))
            .await
            .map_err(|source| StartError::Bind {
                what: "outbound",
                addr: settings.outbound_listen,
                source,
            })?;
        let admin_listener =
            TcpListener::bind(settings.admin)
                .await
                .map_err(|source| StartError::Bind {
                    what: "admin",
                    addr: settings.admin,
                    source,
                })?;
        let admin_addr = admin_listener
            .local_addr()
            .map_err(|source| StartError::Bind {
                what: "admin",
                addr: settings.admin,
                source,
            })?;
        // Bound after the TCP listeners, so a start that fails on a port leaves no socket.
        let workload_api = match &settings.workload_api_socket {
            Some(path) => {
                let (listener, file) = crate::workload_api::socket::bind(path)?;
                let mut api = WorkloadApi::new(Arc::clone(&store), Arc::clone(&metrics));
                // JWT-SVIDs come from the control plane, over the same mTLS as SDS.
                if let IdentitySource::Sds(sds) = &settings.identity {
                    let control_id = SpiffeId::from_parts(
                        &settings.trust_domain,
                        crate::sds::connect::CONTROL_ID_PATH,
                    )
                    .map_err(|e| crate::sds::SdsClientError::ControlPlane {
                        address: sds.control_plane.clone(),
                        problem: e.to_string(),
                    })?;
                    let client = crate::workload_api::jwt::JwtClient::new(
                        sds.control_plane.clone(),
                        control_id,
                        Arc::clone(&store),
                    );
                    tasks.push(tokio::spawn(Arc::clone(&client).run(shutdown_rx.clone())));
                    api = api.with_jwt(client);
                }
                tasks.push(tokio::spawn(api.serve(listener)));
                tracing::info!(socket = %path.display(), "serving the SPIFFE Workload API");
                Some(file)
            }
            None => None,
        };
        let inbound_addr = inbound.local_addr();
        let outbound_addrs = outbound.local_addrs();

        let (drain_signal, drain) = drain::channel();
        tasks.push(tokio::spawn(inbound.run(drain.clone())));
        tasks.push(tokio::spawn(outbound.run(drain)));
        let admin_state = Arc::new(AdminState {
            store: Arc::clone(&store),
            metrics: Arc::clone(&metrics),
            expiry_margin: settings.expiry_margin,
            policy: Arc::clone(&policy),
            source: admin::source_json(&settings.identity),
        });
        if settings.policy.is_some() {
            tasks.push(tokio::spawn(
                PolicyWatcher::new(Arc::clone(&policy)).run(shutdown_rx.clone()),
            ));
        }
        let (admin_shutdown_tx, admin_shutdown) = watch::channel(false);
        let (admin_drain, admin_drain_rx) = drain::channel();
        let limits = settings.limits;
        tasks.push(tokio::spawn(async move {
            admin::serve(
                admin_listener,
                admin_state,
                &limits,
                admin_drain_rx,
                admin_shutdown_tx,
            )
            .await;
        }));
        tracing::info!(inbound = %inbound_addr, outbound = ?outbound_addrs, admin = %admin_addr, "sidecar serving");
        Ok(Self {
            inbound_addr,
            outbound_addrs,
            admin_addr,
            store,
            metrics,
            policy,
            workload_api,
            drain_timeout: settings.drain_timeout,
            drain_signal,
            admin_drain,
            shutdown,
            admin_shutdown,
            tasks,
        })
    }

    /// Resolves once `POST /shutdown` on the admin endpoint was accepted (and answered `202`).
    /// The embedder then calls [`Sidecar::shutdown`], exactly as on SIGTERM.
    pub async fn shutdown_requested(&self) {
        let mut requested = self.admin_shutdown.clone();
        if requested.wait_for(|asked| *asked).await.is_err() {
            // The admin endpoint is gone, so nobody can ask any more.
            std::future::pending::<()>().await;
        }
    }

    /// The Workload API socket's path, when served.
    pub fn workload_api_socket(&self) -> Option<&std::path::Path> {
        self.workload_api.as_ref().map(SocketFile::path)
    }

    /// The shared outbound listener.
    pub fn outbound_addr(&self) -> Option<SocketAddr> {
        self.outbound_addrs
            .iter()
            .find(|(n, _)| n == "shared")
            .map(|(_, a)| *a)
    }

    /// Waits until an SVID is installed, up to `timeout`.
    pub async fn wait_ready(&self, timeout: Duration) -> bool {
        let mut generation = self.store.subscribe();
        let ready = async {
            loop {
                if self.store.is_ready(SystemTime::now(), Duration::ZERO) {
                    return;
                }
                if generation.changed().await.is_err() {
                    return;
                }
            }
        };
        tokio::time::timeout(timeout, ready).await.is_ok() && self.store.current().is_some()
    }

    /// Stops accepting, lets in-flight requests finish (bounded by the drain timeout), stops
    /// the identity source and the admin endpoint. Returns whether everything drained in time.
    pub async fn shutdown(self) -> bool {
        let drained = self.drain_signal.drain(self.drain_timeout).await;
        let _ = self.shutdown.send(true);
        // Sends the signal at once; the returned wait is not needed (the tasks end below).
        drop(self.admin_drain.drain(Duration::ZERO));
        for task in self.tasks {
            task.abort();
        }
        // Open Workload API streams end with their task; the socket file goes with them.
        drop(self.workload_api);
        drained
    }
}
