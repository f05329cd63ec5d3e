//! Wires the control plane together: state directory, CA, attestors, SDS over TLS, admin.

use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::{ArcSwap, ArcSwapOption};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;
use trellis_identity::tls::{server_config, SpiffeClientVerifier, SvidResolver, TlsPolicy};
use trellis_identity::{SpiffeId, TrustBundle};
use trellis_proto::SecretDiscoveryServiceServer;

use crate::admin::{self, AdminState, ServingSvid};
use crate::attest::jwks_url::{self, JwksFetchError, JwksSource};
use crate::attest::k8s::{JwksError, JwksKeys};
use crate::attest::{Attestor, JoinAttestor, K8sAttestor, JOIN_REDEMPTION_WINDOW};
use crate::audit::{AuditEvent, AuditLog};
use crate::authority::{CaOutputs, CaRotator, CaSchedule};
use crate::ca::{Ca, CaError};
use crate::config::{ControlSettings, K8sKeySource};
use crate::metrics::ControlMetrics;
use crate::recorder::IssuanceRecorder;
use crate::registry::{Registry, RegistryError};
use crate::sds::{IssuePolicy, SdsCore, SdsPeer, SdsService};

/// Path of the control plane's own SPIFFE ID: `spiffe://<td>/trellis/control`.
pub const CONTROL_ID_PATH: &str = "/trellis/control";
/// How often the CA schedule is re-read and applied: a rotation stored by `trellis ca rotate`
/// reaches every SDS stream within this.
const CA_POLL: Duration = Duration::from_secs(1);

/// Why the control plane could not start. Each names the file or address involved.
#[derive(Debug, Error)]
pub enum StartError {
    /// The state directory.
    #[error("{path}: {problem}")]
    StateDir {
        /// The directory or file.
        path: PathBuf,
        /// What failed.
        problem: String,
    },
    /// CA material.
    #[error(transparent)]
    Ca(#[from] CaError),
    /// The state database.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The JWKS file.
    #[error(transparent)]
    Jwks(#[from] JwksError),
    /// The JWKS URL (`--k8s-jwks-url`) could not be fetched at start.
    #[error("cannot fetch the Kubernetes issuer keys: {0}")]
    JwksFetch(#[from] JwksFetchError),
    /// A listener could not bind.
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        /// `sds` or `admin`.
        what: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: io::Error,
    },
    /// TLS setup.
    #[error("TLS setup failed: {0}")]
    Tls(String),
}

/// A running control plane.
pub struct ControlPlane {
    /// Where SDS listens.
    pub sds_addr: SocketAddr,
    /// Where the admin endpoint listens.
    pub admin_addr: SocketAddr,
    /// The trust bundle file, for sidecars and operators.
    pub bundle_path: PathBuf,
    /// The registry (shared with `trellis token create` in tests).
    pub registry: Arc<Registry>,
    /// Metrics.
    pub metrics: Arc<ControlMetrics>,
    /// Where the sidecar injection webhook listens (`--webhook-listen`), if it is on.
    pub webhook_addr: Option<SocketAddr>,
    shutdown: watch::Sender<bool>,
    /// Turns true when `POST /shutdown` on the admin endpoint was accepted.
    admin_shutdown: watch::Receiver<bool>,
    tasks: Vec<JoinHandle<()>>,
}

fn state_dir_error(path: &Path, problem: impl std::fmt::Display) -> StartError {
    StartError::StateDir {
        path: path.to_owned(),
        problem: problem.to_string(),
    }
}

/// Creates the state directory 0700, or tightens an existing one.
pub fn prepare_state_dir(dir: &Path) -> Result<(), StartError> {
    if !dir.exists() {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| state_dir_error(dir, format!("cannot create state directory: {e}")))?;
    }
    let meta = std::fs::metadata(dir).map_err(|e| state_dir_error(dir, e))?;
    if meta.permissions().mode() & 0o077 != 0 {
        tracing::warn!(path = %dir.display(), mode = format!("{:o}", meta.permissions().mode() & 0o777), "state directory was accessible to others; setting 0700");
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| state_dir_error(dir, format!("cannot set mode 0700: {e}")))?;
    }
    Ok(())
}

/// Writes the bundle atomically (temp file + rename) so readers never see half a file.
pub fn write_bundle(path: &Path, bundle: &TrustBundle) -> Result<(), StartError> {
    let tmp = path.with_extension("pem.tmp");
    std::fs::write(&tmp, bundle.to_pem())
        .map_err(|e| state_dir_error(&tmp, format!("cannot write bundle: {e}")))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644))
        .map_err(|e| state_dir_error(&tmp, e))?;
    std::fs::rename(&tmp, path)
        .map_err(|e| state_dir_error(path, format!("cannot write bundle: {e}")))
}

fn unix_seconds(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl ControlPlane {
    /// Opens state, loads or creates the CA, binds both listeners and starts serving.
    pub async fn start(settings: ControlSettings) -> Result<Self, StartError> {
        let td = settings.trust_domain.clone();
        // Read every input file before touching the state directory.
        // With --k8s-jwks-url the keys are fetched now (no start without them) and refreshed
        // by a task started below.
        let mut jwks_refresh = None;
        let k8s = match &settings.k8s {
            Some(k) => {
                let keys = match &k.jwks {
                    K8sKeySource::File(path) => {
                        JwksKeys::from_file(path, settings.limits.max_jwks_bytes)?
                    }
                    K8sKeySource::Url {
                        url,
                        ca,
                        token,
                        refresh,
                    } => {
                        let source = JwksSource::new(url.clone(), ca.clone(), token.clone())
                            .with_limits(
                                settings.limits.max_jwks_bytes,
                                settings.limits.jwks_fetch_timeout,
                            );
                        let keys = source.fetch().await?;
                        tracing::info!(url = %url, kids = ?keys.key_ids(), refresh = %humantime::format_duration(*refresh), "fetched the Kubernetes issuer keys");
                        jwks_refresh = Some((source, *refresh));
                        keys
                    }
                };
                Some(K8sAttestor::new(keys, &k.issuer, &k.audience, &td))
            }
            None => None,
        };
        let jwks_store = k8s.as_ref().map(K8sAttestor::key_store);
        prepare_state_dir(&settings.state_dir)?;
        // SQLite in the state directory, or a PostgreSQL shared with other replicas.
        let registry = Arc::new(Registry::connect(&settings.database)?);
        tracing::info!(database = %settings.database, shared = registry.is_shared(), "registry open");
        let base = match &settings.ca {
            Some(files) => Ca::from_files(&td, &files.cert, &files.key, files.bundle.as_deref())?,
            None => Ca::load_or_create(&registry, &td)?,
        };
        let base = Arc::new(base);
        let bundle_path = settings.state_dir.join("bundle.pem");

        let audit_path = settings.state_dir.join("audit.log");
        let audit =
            Arc::new(AuditLog::open(&audit_path).map_err(|e| {
                state_dir_error(&audit_path, format!("cannot open audit log: {e}"))
            })?);
        let attestor = Arc::new(
            Attestor::new(
                td.clone(),
                k8s,
                JoinAttestor::new(Arc::clone(&registry), JOIN_REDEMPTION_WINDOW),
            )
            .with_max_jwt_bytes(settings.limits.max_jwt_bytes),
        );
        let metrics = Arc::new(ControlMetrics::new());

        // The signer and bundle follow the CA schedule (base CA + `trellis ca rotate`s);
        // the first refresh applies any rotation stored before this start.
        let base_bundle = Arc::new(base.bundle().clone());
        let signer = Arc::new(ArcSwap::from(Arc::clone(&base)));
        let (bundle_tx, bundle_rx) = watch::channel(Arc::clone(&base_bundle));
        let shared_bundle = Arc::new(ArcSwap::from(Arc::clone(&base_bundle)));
        let ca_status = Arc::new(ArcSwap::from_pointee(Vec::new()));
        let mut rotator = CaRotator::new(
            td.clone(),
            CaSchedule::new(Arc::clone(&base), settings.svid_ttl),
            Arc::clone(&registry),
            CaOutputs {
                signer: Arc::clone(&signer),
                bundle_tx,
                listener_bundle: Arc::clone(&shared_bundle),
                bundle_path: bundle_path.clone(),
                status: Arc::clone(&ca_status),
            },
            Arc::clone(&metrics),
            Arc::clone(&audit),
        );
        rotator.refresh(SystemTime::now());
        let bundle = bundle_rx.borrow().clone();
        // The injection webhook puts the bundle in force at admission into each sidecar.
        let webhook_bundle = bundle_rx.clone();
        write_bundle(&bundle_path, &bundle)?;
        metrics
            .ca_expiry
            .set(unix_seconds(signer.load().not_after()));
        metrics
            .bundle_expiry
            .set(unix_seconds(bundle.earliest_expiry()));
        metrics
            .bundle_cas
            .set(i64::try_from(bundle.roots().len()).unwrap_or(i64::MAX));

        // The control plane's own identity, for its SDS listener.
        let control_id = SpiffeId::from_parts(&td, CONTROL_ID_PATH)
            .map_err(|e| StartError::Tls(e.to_string()))?;
        let resolver = SvidResolver::empty();
        let serving = Arc::new(ArcSwapOption::empty());
        let own = OwnSvid {
            id: control_id.clone(),
            resolver: Arc::clone(&resolver),
            serving: Arc::clone(&serving),
            audit: Arc::clone(&audit),
            metrics: Arc::clone(&metrics),
        };
        own.install(&signer.load(), settings.svid_ttl)?;

        let verifier = SpiffeClientVerifier::new(Arc::clone(&shared_bundle), true);
        let tls = server_config(Arc::clone(&resolver), verifier, TlsPolicy::Tls13, &[b"h2"])
            .map_err(|e| StartError::Tls(e.to_string()))?;
        let acceptor = TlsAcceptor::from(Arc::new(tls));

        let sds_listener =
            TcpListener::bind(settings.listen)
                .await
                .map_err(|source| StartError::Bind {
                    what: "sds",
                    addr: settings.listen,
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
        let sds_addr = sds_listener
            .local_addr()
            .map_err(|source| StartError::Bind {
                what: "sds",
                addr: settings.listen,
                source,
            })?;
        let admin_addr = admin_listener
            .local_addr()
            .map_err(|source| StartError::Bind {
                what: "admin",
                addr: settings.admin,
                source,
            })?;

        let policy = IssuePolicy {
            svid_ttl: settings.svid_ttl,
            rotate_every: settings.rotate_every,
        };
        let (recorder, _recorder_thread) =
            IssuanceRecorder::spawn(Arc::clone(&registry), settings.issuance_retention).map_err(
                |e| {
                    state_dir_error(
                        &settings.state_dir,
                        format!("cannot start the issuance recorder: {e}"),
                    )
                },
            )?;
        let limiter = Arc::new(crate::ratelimit::PeerLimiter::new(settings.limits.sds_rate));
        let core = Arc::new(SdsCore {
            ca: Arc::clone(&signer),
            bundle: bundle_rx,
            attestor,
            recorder,
            audit: Arc::clone(&audit),
            metrics: Arc::clone(&metrics),
            policy,
            limiter,
        });
        let (shutdown, shutdown_rx) = watch::channel(false);
        let mut tasks = Vec::new();

        // The sidecar injection webhook, serving a certificate from the same CA.
        let webhook = match &settings.webhook {
            Some(w) => Some(
                crate::webhook::start(
                    w,
                    &td,
                    &signer.load(),
                    settings.svid_ttl,
                    webhook_bundle,
                    Arc::clone(&metrics),
                    shutdown_rx.clone(),
                )
                .await?,
            ),
            None => None,
        };
        let webhook_addr = webhook.as_ref().map(|w| w.addr);
        let webhook_cert = webhook.as_ref().map(|w| Arc::clone(&w.cert));

        // TLS handshakes run in their own tasks so a slow client never stalls the accept loop.
        let (conn_tx, conn_rx) = mpsc::channel::<Result<SdsConn, io::Error>>(128);
        tasks.push(tokio::spawn(accept_loop(
            sds_listener,
            acceptor,
            SdsAccept {
                cap: crate::ratelimit::ConnectionCap::new(
                    settings.limits.sds_max_connections,
                    "sds",
                    Arc::clone(&metrics),
                ),
                handshake_timeout: settings.limits.sds_handshake_timeout,
                metrics: Arc::clone(&metrics),
            },
            conn_tx,
            shutdown_rx.clone(),
        )));

        let service = SecretDiscoveryServiceServer::new(SdsService::new(core))
            .max_decoding_message_size(settings.limits.sds_max_message_bytes);
        let mut grpc_shutdown = shutdown_rx.clone();
        let limits = settings.limits;
        tasks.push(tokio::spawn(async move {
            let result = tonic::transport::Server::builder()
                .http2_keepalive_interval(Some(Duration::from_secs(30)))
                .http2_keepalive_timeout(Some(Duration::from_secs(10)))
                .max_concurrent_streams(limits.sds_max_streams_per_connection)
                .http2_max_header_list_size(limits.sds_max_header_list_bytes)
                .http2_max_pending_accept_reset_streams(Some(limits.sds_max_pending_resets))
                .add_service(service)
                .serve_with_incoming_shutdown(ReceiverStream::new(conn_rx), async move {
                    let _ = grpc_shutdown.wait_for(|stop| *stop).await;
                })
                .await;
            if let Err(e) = result {
                tracing::error!(error = %e, "SDS server stopped");
            }
        }));

        // Rotate the control plane's own serving SVID like any other.
        let ca = Arc::clone(&signer);
        let mut rotate_shutdown = shutdown_rx.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = tokio::time::sleep(policy.next_rotation()) => {}
                    _ = rotate_shutdown.changed() => return,
                }
                if let Err(e) = own.install(&ca.load(), policy.svid_ttl) {
                    tracing::error!(error = %e, "cannot rotate the control plane's own SVID; keeping the current one");
                }
                // The webhook's serving certificate rotates with it, from the same CA.
                if let Some(cert) = &webhook_cert {
                    if let Err(e) = cert.install(&ca.load(), policy.svid_ttl) {
                        tracing::error!(error = %e, "cannot rotate the webhook's serving certificate; keeping the current one");
                    }
                }
            }
        }));

        tasks.push(tokio::spawn(rotator.run(CA_POLL, shutdown_rx.clone())));
        if let Some(w) = webhook {
            tasks.push(w.task);
        }

        if let (Some((source, every)), Some(store)) = (jwks_refresh, jwks_store) {
            tasks.push(tokio::spawn(jwks_url::refresh_loop(
                source,
                store,
                every,
                Arc::clone(&metrics),
                shutdown_rx.clone(),
            )));
        }

        let admin_state = Arc::new(AdminState {
            ca: ca_status,
            metrics: Arc::clone(&metrics),
            ready: Default::default(),
            serving,
            bundle: Arc::clone(&shared_bundle),
        });
        admin_state
            .ready
            .store(resolver.is_ready(), Ordering::Release);
        let (admin_shutdown_tx, admin_shutdown) = watch::channel(false);
        tasks.push(tokio::spawn(admin::serve(
            admin_listener,
            crate::ratelimit::ConnectionCap::new(
                settings.limits.admin_max_connections,
                "admin",
                Arc::clone(&metrics),
            ),
            admin::AdminLimits::from(&settings.limits),
            admin_state,
            shutdown_rx,
            admin_shutdown_tx,
        )));

        tracing::info!(trust_domain = %td, sds = %sds_addr, admin = %admin_addr, bundle = %bundle_path.display(), "control plane serving");
        Ok(Self {
            sds_addr,
            admin_addr,
            bundle_path,
            registry,
            metrics,
            webhook_addr,
            shutdown,
            admin_shutdown,
            tasks,
        })
    }

    /// Resolves once `POST /shutdown` on the admin endpoint was accepted (and answered `202`).
    /// The embedder then calls [`ControlPlane::shutdown`], exactly as on SIGTERM.
    pub async fn shutdown_requested(&self) {
        let mut requested = self.admin_shutdown.clone();
        if requested.wait_for(|asked| *asked).await.is_err() {
            // The admin endpoint is gone, so nobody can ask any more.
            std::future::pending::<()>().await;
        }
    }

    /// Stops accepting, closes streams, and waits for the tasks to end.
    pub async fn shutdown(self) {
        let ControlPlane {
            shutdown, tasks, ..
        } = self;
        // The CA rotator ends and drops the bundle channel, which ends every SDS stream
        // cleanly; clients reconnect elsewhere.
        let _ = shutdown.send(true);
        for task in tasks {
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
    }
}

/// The control plane's own serving SVID and everything that shows it: the SDS listener's
/// resolver, `/certs`, the expiry gauge and the audit log.
struct OwnSvid {
    id: SpiffeId,
    resolver: Arc<SvidResolver>,
    serving: Arc<ArcSwapOption<ServingSvid>>,
    audit: Arc<AuditLog>,
    metrics: Arc<ControlMetrics>,
}

impl OwnSvid {
    /// Issues a fresh serving SVID from `ca` and installs it.
    fn install(&self, ca: &Ca, ttl: Duration) -> Result<(), StartError> {
        let svid = ca.issue(&self.id, ttl, SystemTime::now())?;
        self.resolver
            .install(&svid)
            .map_err(|e| StartError::Tls(e.to_string()))?;
        self.serving.store(Some(Arc::new(ServingSvid::of(&svid))));
        self.metrics
            .serving_svid_expiry(self.id.as_str(), unix_seconds(svid.not_after()));
        let event = AuditEvent::Issued {
            spiffe_id: self.id.to_string(),
            serial_hex: svid.serial_hex().to_owned(),
            not_after: svid.not_after(),
            attestor: "self",
            peer: None,
        };
        if let Err(e) = self.audit.record(&event, SystemTime::now()) {
            tracing::error!(error = %e, "cannot write audit log");
        }
        Ok(())
    }
}

/// What the SDS accept loop enforces before a connection reaches gRPC.
struct SdsAccept {
    cap: crate::ratelimit::ConnectionCap,
    handshake_timeout: Duration,
    metrics: Arc<ControlMetrics>,
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    limits: SdsAccept,
    tx: mpsc::Sender<Result<SdsConn, io::Error>>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let (tcp, addr) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(error = %e, "SDS accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        // The permit covers the handshake and the connection's whole life: it is dropped with
        // the connection. Over the cap the socket is closed at once.
        let Some(permit) = limits.cap.admit(addr) else {
            drop(tcp);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let tx = tx.clone();
        let timeout = limits.handshake_timeout;
        let metrics = Arc::clone(&limits.metrics);
        tokio::spawn(async move {
            match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => {
                    let svid =
                        trellis_identity::tls::peer_spiffe_id(tls.get_ref().1.peer_certificates());
                    let _ = tx
                        .send(Ok(SdsConn {
                            inner: tls,
                            peer: SdsPeer { addr, svid },
                            _permit: permit,
                        }))
                        .await;
                }
                Ok(Err(e)) => tracing::debug!(peer = %addr, error = %e, "SDS TLS handshake failed"),
                Err(_) => {
                    metrics.sds_handshake_timeouts.inc();
                    tracing::debug!(peer = %addr, "SDS TLS handshake timed out");
                }
            }
        });
    }
}

/// A verified TLS connection plus who is on the other end; tonic puts [`SdsPeer`] into each
/// request's extensions.
pub struct SdsConn {
    inner: TlsStream<TcpStream>,
    peer: SdsPeer,
    /// This connection's place under `--sds-max-connections`, released when it closes.
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl Connected for SdsConn {
    type ConnectInfo = SdsPeer;
    fn connect_info(&self) -> SdsPeer {
        self.peer.clone()
    }
}

impl AsyncRead for SdsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for SdsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
