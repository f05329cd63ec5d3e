//! Wires the control plane together: state directory, CA, attestors, SDS over TLS, admin.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::{ArcSwap, ArcSwapOption};
use thiserror::Error;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use trellis_identity::tls::{server_config, SpiffeClientVerifier, SvidResolver, TlsPolicy};
use trellis_identity::SpiffeId;
use trellis_serve::accept::BindError;
use trellis_serve::drain::{self, DrainSignal};
use trellis_serve::time::unix_seconds;

use crate::admin::{self, AdminState, ServingSvid};
use crate::attest::jwks_url::{self, JwksFetchError, JwksSource};
use crate::attest::{
    Attestor, JoinAttestor, JwksError, JwksKeys, K8sAttestor, K8sKeySource, JOIN_REDEMPTION_WINDOW,
};
use crate::audit::{AuditEvent, AuditLog};
use crate::authority::{CaOutputs, CaRotator, CaSchedule, ServingHook};
use crate::ca::{Ca, CaError};
use crate::config::{CaFiles, ControlSettings};
use crate::db_health::DbHealth;
use crate::keys::{KeyRef, Keyring, Pkcs11Keyring};
use crate::metrics::ControlMetrics;
use crate::recorder::IssuanceRecorder;
use crate::registry::{Registry, RegistryError};
use crate::sds::listener::SdsTls;
use crate::sds::{IssuePolicy, SdsBundle, SdsCore, SdsService};
use crate::state_dir::{prepare_state_dir, write_bundle, StateDirError};
use crate::webhook::{WebhookCert, WebhookError};

/// Path of the control plane's own SPIFFE ID: `spiffe://<td>/trellis/control`.
pub const CONTROL_ID_PATH: &str = "/trellis/control";
/// How often the CA schedule is re-read and applied: a rotation stored by `trellis ca rotate`
/// reaches every SDS stream within this.
const CA_POLL: Duration = Duration::from_secs(1);
/// How often the JWT signing keys are re-read and the rotation rule applied: a key another
/// replica stored is published here within this.
const JWT_KEY_POLL: Duration = Duration::from_secs(1);
/// How long a shutdown waits for connections (admin and webhook requests in flight, SDS
/// connections closing) before they are cut off.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// How soon a refused renewal of the control plane's own certificates is tried again.
const SERVING_RETRY: Duration = Duration::from_secs(10);

/// Why the control plane could not start. Each names the file or address involved.
#[derive(Debug, Error)]
pub enum StartError {
    /// The state directory.
    #[error(transparent)]
    StateDir(#[from] StateDirError),
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
    #[error("{what} listener: {source}")]
    Bind {
        /// `sds` or `admin`.
        what: &'static str,
        /// The address and the OS error.
        source: BindError,
    },
    /// The sidecar injection webhook.
    #[error(transparent)]
    Webhook(#[from] WebhookError),
    /// The operator socket.
    #[error(transparent)]
    Operator(#[from] crate::operator::OperatorSocketError),
    /// TLS setup.
    #[error("TLS setup failed: {0}")]
    Tls(String),
    /// The JWT signing keys cannot be loaded or created.
    #[error(transparent)]
    JwtKeys(#[from] crate::jwt::JwtKeyError),
    /// The issuance transparency log cannot be opened or does not match its signed head.
    #[error(transparent)]
    Log(#[from] crate::translog::LogError),
    /// The SPIFFE bundle endpoint.
    #[error(transparent)]
    BundleEndpoint(#[from] crate::federation::endpoint::EndpointError),
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
    /// The operator API's Unix socket.
    pub operator_socket: PathBuf,
    /// Where the SPIFFE bundle endpoint listens (`bundle_endpoint`), if it is on.
    pub bundle_endpoint_addr: Option<SocketAddr>,
    shutdown: watch::Sender<bool>,
    /// Drains the listeners (SDS, admin, webhook) and their connections.
    drain_signal: DrainSignal,
    /// Turns true when `POST /shutdown` on the admin endpoint was accepted.
    admin_shutdown: watch::Receiver<bool>,
    tasks: Vec<JoinHandle<()>>,
}

fn state_dir_error(path: &std::path::Path, problem: impl std::fmt::Display) -> StartError {
    StartError::StateDir(StateDirError::new(path, problem))
}

/// Binds `addr` for the `what` listener and reads back its address (port 0 allowed).
async fn bind(
    what: &'static str,
    addr: SocketAddr,
) -> Result<(TcpListener, SocketAddr), StartError> {
    let bind_error = |source| StartError::Bind { what, source };
    let listener = trellis_serve::bind(addr).await.map_err(bind_error)?;
    let bound = listener
        .local_addr()
        .map_err(|source| bind_error(BindError { addr, source }))?;
    Ok((listener, bound))
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
                        JwksKeys::from_file(path, settings.limits.k8s.max_jwks_bytes)?
                    }
                    K8sKeySource::Url {
                        url,
                        ca,
                        token,
                        refresh,
                    } => {
                        let source = JwksSource::new(url.clone(), ca.clone(), token.clone())
                            .with_limits(
                                settings.limits.k8s.max_jwks_bytes,
                                settings.limits.k8s.jwks_fetch_timeout,
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
        let metrics = Arc::new(ControlMetrics::new());
        // Keys in a PKCS#11 token: the module loads and the PIN is checked here, before
        // anything listens, so a wrong PIN or a missing module stops the start.
        let keyring = match &settings.pkcs11 {
            Some(p) => {
                let ring = Pkcs11Keyring::open(p.clone(), metrics.pkcs11_retries.clone())
                    .map_err(CaError::from)?;
                tracing::info!(module = %p.module.display(), sessions = p.sessions, "PKCS#11 module loaded");
                Keyring::with_pkcs11(ring)
            }
            None => Keyring::default(),
        };
        let base = match &settings.ca {
            Some(CaFiles {
                cert,
                key: KeyRef::File(key),
                bundle,
            }) => Ca::from_files(&td, cert, key, bundle.as_deref())?,
            Some(CaFiles {
                cert,
                key: KeyRef::Pkcs11(uri),
                bundle,
            }) => {
                let ca = Ca::from_token(&td, cert, uri, bundle.as_deref(), &keyring)?;
                tracing::info!(ca = ca.label(), key = %uri, "CA key held by a PKCS#11 token");
                ca
            }
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
            .with_max_jwt_bytes(settings.limits.k8s.max_jwt_bytes),
        );
        let db_health = DbHealth::new(Arc::clone(&metrics));

        // The signer and bundle follow the CA schedule (base CA + `trellis ca rotate`s);
        // the first refresh applies any rotation stored before this start.
        let base_bundle = Arc::new(base.bundle().clone());
        let signer = Arc::new(ArcSwap::from(Arc::clone(&base)));
        let (bundle_tx, bundle_rx) = watch::channel(Arc::clone(&base_bundle));
        let shared_bundle = Arc::new(ArcSwap::from(Arc::clone(&base_bundle)));
        let ca_status = Arc::new(ArcSwap::from_pointee(Vec::new()));
        let log_key = match &settings.log_key {
            Some(uri) => Some(keyring.token_key(uri).map_err(CaError::from)?),
            None => None,
        };
        // Before any issuance: a log that fails its own signed head stops the start here.
        let translog = crate::translog::IssuanceLog::open_with_key(
            Arc::clone(&registry),
            Arc::clone(&metrics.log),
            log_key,
        )?;
        // Next to bundle.pem: what log verifiers pin (`trellis log … --log-key`).
        crate::state_dir::write_public_pem(
            &settings.state_dir.join(crate::translog::LOG_KEY_FILE),
            &translog.public_key().to_pem(),
            "the transparency-log key",
        )?;
        // One guard for every signature this process makes from its wall clock.
        let clock = Arc::new(crate::clock_guard::ClockGuard::new(
            SystemTime::now(),
            std::time::Instant::now(),
        ));
        // The control plane's own identity, for its SDS listener.
        let control_id = SpiffeId::from_parts(&td, CONTROL_ID_PATH)
            .map_err(|e| StartError::Tls(e.to_string()))?;
        let resolver = SvidResolver::empty();
        let serving = Arc::new(ArcSwapOption::empty());
        let own = Arc::new(OwnSvid {
            id: control_id.clone(),
            registry: Arc::clone(&registry),
            resolver: Arc::clone(&resolver),
            serving: Arc::clone(&serving),
            audit: Arc::clone(&audit),
            metrics: Arc::clone(&metrics),
        });
        // The webhook's serving certificate, once the webhook runs.
        let webhook_slot: Arc<ArcSwapOption<WebhookCert>> = Arc::new(ArcSwapOption::empty());
        let serving_ca = Arc::new(ArcSwap::from(Arc::clone(&base)));
        // The SDS and webhook certificates are re-issued by the rotation timer and by the CA
        // rotator (when the serving CA changes); one at a time, each from the CA current
        // under the lock, so a timer that read the previous CA cannot install after the
        // switch.
        let reissue = Arc::new(ServingCerts {
            ca: Arc::clone(&serving_ca),
            own: Arc::clone(&own),
            webhook: Arc::clone(&webhook_slot),
            ttl: settings.svid_ttl,
            lock: std::sync::Mutex::new(()),
            clock: Arc::clone(&clock),
        });
        let on_serving_change: ServingHook = {
            let reissue = Arc::clone(&reissue);
            Box::new(move || {
                reissue.renew();
            })
        };
        let rotator = CaRotator::new(
            td.clone(),
            CaSchedule::new(Arc::clone(&base), settings.svid_ttl),
            Arc::clone(&registry),
            CaOutputs {
                signer: Arc::clone(&signer),
                serving: Arc::clone(&serving_ca),
                on_serving_change,
                bundle_tx,
                listener_bundle: Arc::clone(&shared_bundle),
                bundle_path: bundle_path.clone(),
                status: Arc::clone(&ca_status),
            },
            Arc::clone(&metrics),
            Arc::clone(&audit),
        )
        .with_db_health(Arc::clone(&db_health))
        .with_keyring(keyring.clone());
        // The bundle's `spiffe_sequence`, published by the bundle endpoint.
        let bundle_sequence = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let mut rotator = rotator.with_sequence(Arc::clone(&bundle_sequence));
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
        // From the oldest CA in the bundle (see `authority`), not necessarily the signer.
        own.install(&serving_ca.load(), settings.svid_ttl)?;

        let verifier = SpiffeClientVerifier::new(Arc::clone(&shared_bundle), true);
        let tls = server_config(Arc::clone(&resolver), verifier, TlsPolicy::Tls13, &[b"h2"])
            .map_err(|e| StartError::Tls(e.to_string()))?;
        let acceptor = TlsAcceptor::from(Arc::new(tls));

        let (sds_listener, sds_addr) = bind("sds", settings.listen).await?;
        let (admin_listener, admin_addr) = bind("admin", settings.admin).await?;

        let policy = IssuePolicy {
            svid_ttl: settings.svid_ttl,
            rotate_every: settings.rotate_every,
        };
        let (recorder, _recorder_thread) = IssuanceRecorder::spawn(
            Arc::clone(&registry),
            settings.issuance_retention,
            Arc::clone(&db_health),
        )
        .map_err(|e| {
            state_dir_error(
                &settings.state_dir,
                format!("cannot start the issuance recorder: {e}"),
            )
        })?;
        let limiter = Arc::new(crate::ratelimit::PeerLimiter::new(settings.limits.sds.rate));
        // JWT-SVID signing keys, shared through the registry with every replica.
        // With the CA key in a token, JWT-SVID keys are made in that token too.
        let jwt_token = match &settings.ca {
            Some(CaFiles {
                key: KeyRef::Pkcs11(uri),
                ..
            }) => Some(crate::jwt::keys::JwtKeyToken {
                keyring: keyring.clone(),
                token: uri.token.clone(),
            }),
            _ => None,
        };
        let jwt_keys = crate::jwt::JwtKeys::load_with_token(
            Arc::clone(&registry),
            td.clone(),
            crate::jwt::JwtKeyPolicy {
                rotate_every: settings.jwt_key_rotate_every,
                token_ttl: settings.jwt_svid_ttl,
            },
            Arc::clone(&metrics),
            jwt_token,
        )?;
        // SDS streams get our bundle with every federated trust domain's attached.
        let (mut federation, sds_bundle) =
            crate::federation::Federation::new(crate::federation::FederationSetup {
                own_td: td.clone(),
                relationships: settings.federation.clone(),
                limits: settings.limits.federation,
                config: settings.config_path.clone(),
                registry: Arc::clone(&registry),
                metrics: Arc::clone(&metrics),
                own: bundle_rx.clone(),
                sequence: Arc::clone(&bundle_sequence),
            })
            .await;
        let core = Arc::new(SdsCore {
            ca: Arc::clone(&signer),
            bundle: SdsBundle::follow(sds_bundle),
            attestor,
            recorder,
            audit: Arc::clone(&audit),
            metrics: Arc::clone(&metrics),
            policy,
            limiter,
            clock: Arc::clone(&clock),
            log: Some(Arc::clone(&translog)),
        });
        let (shutdown, shutdown_rx) = watch::channel(false);
        let (drain_signal, drain) = drain::channel();
        // Its own limiter with the SDS rate: sidecars cache tokens, so a caller that needs
        // more than SDS's rate is misbehaving.
        let jwt_service = Arc::new(crate::jwt::JwtService {
            keys: Arc::clone(&jwt_keys),
            trust_domain: td.clone(),
            audit: Arc::clone(&audit),
            metrics: Arc::clone(&metrics),
            limiter: Arc::new(crate::ratelimit::PeerLimiter::new(settings.limits.sds.rate)),
            shutdown: shutdown_rx.clone(),
            clock,
        });
        let mut tasks = Vec::new();

        // The sidecar injection webhook, serving a certificate from the same CA.
        let webhook = match &settings.webhook {
            Some(w) => Some(
                crate::webhook::start(
                    w,
                    &td,
                    &serving_ca.load(),
                    settings.svid_ttl,
                    webhook_bundle,
                    Arc::clone(&metrics),
                    drain.clone(),
                )
                .await?,
            ),
            None => None,
        };
        let webhook_addr = webhook.as_ref().map(|w| w.addr);

        // The operator API: token creation and CA rotation without database credentials.
        let operator = crate::operator::start(
            &settings.operator_socket,
            Arc::new(crate::operator::OperatorState {
                trust_domain: td.clone(),
                registry: Arc::clone(&registry),
                audit: Arc::clone(&audit),
                keys: keyring.clone(),
            }),
            drain.clone(),
        )?;
        tasks.push(operator.task);
        webhook_slot.store(webhook.as_ref().map(|w| Arc::clone(&w.cert)));

        // TLS handshakes run in their own tasks so a slow client never stalls the accept loop;
        // over `limits.sds.max_connections` a connection is closed at once.
        let sds_listener = crate::sds::listener::sds_listener(
            sds_listener,
            settings.limits.sds.max_connections,
            metrics.listener_events("sds"),
            SdsTls(acceptor),
            settings.limits.sds.handshake_timeout,
        );
        tasks.push(tokio::spawn(crate::sds::listener::serve(
            sds_listener,
            SdsService::new(core),
            jwt_service,
            settings.limits.sds,
            drain.clone(),
        )));

        // Rotate the control plane's own serving SVID like any other, from the serving CA.
        let mut rotate_shutdown = shutdown_rx.clone();
        tasks.push(tokio::spawn(async move {
            let mut next = policy.next_rotation();
            loop {
                tokio::select! {
                    () = tokio::time::sleep(next) => {}
                    _ = rotate_shutdown.changed() => return,
                }
                // Signing is quick, but the lock may be held by the CA rotator.
                let reissue = Arc::clone(&reissue);
                let renewed = tokio::task::spawn_blocking(move || reissue.renew())
                    .await
                    .unwrap_or(false);
                // A refused renewal (clock jump, disk full) is retried soon, not a whole
                // rotation period later, when the current certificate may have run out.
                next = if renewed {
                    policy.next_rotation()
                } else {
                    SERVING_RETRY.min(policy.next_rotation())
                };
            }
        }));

        // The SPIFFE bundle endpoint, with the control plane's own SVID (https_spiffe).
        let bundle_endpoint_addr = match settings.bundle_endpoint {
            Some(addr) => {
                let (bound, task) = crate::federation::endpoint::start(
                    addr,
                    Arc::clone(&resolver),
                    crate::federation::endpoint::EndpointState {
                        bundle: bundle_rx.clone(),
                        sequence: Arc::clone(&bundle_sequence),
                        refresh_hint: settings.bundle_refresh_hint,
                        jwt: Some(jwt_keys.subscribe()),
                    },
                    &metrics,
                    drain.clone(),
                )
                .await?;
                tasks.push(task);
                Some(bound)
            }
            None => None,
        };
        federation.set_endpoint(bundle_endpoint_addr);
        let bundles_report = federation.report();
        tasks.push(tokio::spawn(federation.run(shutdown_rx.clone())));

        tasks.push(tokio::spawn(rotator.run(CA_POLL, shutdown_rx.clone())));
        tasks.push(tokio::spawn(
            jwt_keys.run(JWT_KEY_POLL, shutdown_rx.clone()),
        ));
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

        tasks.push(tokio::spawn(
            Arc::clone(&translog).run(crate::translog::DEFAULT_HEAD_INTERVAL, shutdown_rx.clone()),
        ));

        let admin_state = Arc::new(AdminState {
            log: Some(translog),
            ca: ca_status,
            metrics: Arc::clone(&metrics),
            ready: Default::default(),
            serving,
            bundle: Arc::clone(&shared_bundle),
            database: db_health,
            bundles: bundles_report,
        });
        admin_state
            .ready
            .store(resolver.is_ready(), Ordering::Release);
        let (admin_shutdown_tx, admin_shutdown) = watch::channel(false);
        tasks.push(tokio::spawn(admin::serve(
            admin_listener,
            settings.limits.admin,
            admin_state,
            drain,
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
            operator_socket: operator.path,
            bundle_endpoint_addr,
            shutdown,
            drain_signal,
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
            shutdown,
            drain_signal,
            tasks,
            ..
        } = self;
        // The CA rotator ends and drops the bundle channel, which ends every SDS stream
        // cleanly; clients reconnect elsewhere.
        let _ = shutdown.send(true);
        // The listeners close; connections finish what they are doing or are cut off.
        if !drain_signal.drain(DRAIN_TIMEOUT).await {
            tracing::warn!("connections still open after {DRAIN_TIMEOUT:?}; closed");
        }
        for task in tasks {
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
    }
}

/// The control plane's own serving SVID and everything that shows it: the SDS listener's
/// resolver, `/certs`, the expiry gauge and the audit log.
struct OwnSvid {
    id: SpiffeId,
    /// Where its issuance is recorded (and logged, like every SVID's).
    registry: Arc<Registry>,
    resolver: Arc<SvidResolver>,
    serving: Arc<ArcSwapOption<ServingSvid>>,
    audit: Arc<AuditLog>,
    metrics: Arc<ControlMetrics>,
}

impl OwnSvid {
    /// Issues a fresh serving SVID from `ca` and installs it.
    fn install(&self, ca: &Ca, ttl: Duration) -> Result<(), StartError> {
        let now = SystemTime::now();
        let svid = ca.issue(&self.id, ttl, now)?;
        // Like every SVID, the control plane's own is in the transparency log before use.
        let log = svid
            .chain()
            .first()
            .ok_or_else(|| CaError::Sign("issued an empty chain".into()))
            .and_then(|leaf| crate::translog::issuance_body(leaf, "self").map_err(CaError::Sign))?;
        self.registry
            .record_issuance(&crate::registry::IssuanceRecord {
                spiffe_id: self.id.clone(),
                serial_hex: svid.serial_hex().to_owned(),
                not_after: svid.not_after(),
                attestor: "self",
                peer: None,
                issued_at: now,
                log,
            })?;
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

/// The control plane's own certificates (SDS serving SVID, webhook serving certificate),
/// re-issued together from the serving CA.
struct ServingCerts {
    ca: Arc<ArcSwap<Ca>>,
    own: Arc<OwnSvid>,
    webhook: Arc<ArcSwapOption<WebhookCert>>,
    ttl: Duration,
    /// Held from reading `ca` to installing, so installs never go back to an older CA.
    lock: std::sync::Mutex<()>,
    /// A certificate signed right after a clock jump would lock every client out.
    clock: Arc<crate::clock_guard::ClockGuard>,
}

impl ServingCerts {
    /// Issues fresh certificates from the current serving CA; on failure the current ones stay
    /// (and it says false).
    fn renew(&self) -> bool {
        let _one_at_a_time = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(jump) = self
            .clock
            .check(SystemTime::now(), std::time::Instant::now())
        {
            tracing::error!("{jump}; keeping the control plane's current serving certificates");
            return false;
        }
        let ca = self.ca.load_full();
        let mut renewed = true;
        if let Err(e) = self.own.install(&ca, self.ttl) {
            renewed = false;
            tracing::error!(error = %e, "cannot rotate the control plane's own SVID; keeping the current one");
        }
        if let Some(cert) = self.webhook.load_full() {
            if let Err(e) = cert.install(&ca, self.ttl) {
                renewed = false;
                tracing::error!(error = %e, "cannot rotate the webhook's serving certificate; keeping the current one");
            }
        }
        renewed
    }
}
