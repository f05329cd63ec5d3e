//! `trellis control` settings: the YAML file shape and the validated [`ControlSettings`].
//!
//! The binary merges flags and `TRELLIS_*` variables over the file; this module only knows
//! the file and composes the settings each domain module owns and checks: Kubernetes
//! attestation ([`crate::attest::settings`]), the webhook ([`crate::webhook::settings`]), the
//! registry ([`crate::registry::Database`]), and the listeners' limits, nested per listener
//! under `limits:` (`limits.sds` in [`crate::sds::limits`], `limits.admin` in
//! [`crate::admin`], `limits.webhook`, `limits.k8s`). No domain module imports this one.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use trellis_identity::tls::KeyExchange;
use trellis_identity::TrustDomain;

use crate::admin::{AdminLimits, AdminLimitsFile};
use crate::attest::settings::{K8sFields, K8sLimitsFile};
use crate::attest::{K8sLimits, K8sSettings, CREDENTIAL_OVERHEAD};
use crate::federation::{FederationLimits, FederationLimitsFile, Relationship, RelationshipFile};
use crate::registry::{Database, DatabaseUrl};
use crate::sds::limits::{SdsLimits, SdsLimitsFile};
use crate::webhook::settings::{WebhookFields, WebhookLimitsFile};
use crate::webhook::{WebhookLimits, WebhookSettings};

pub use trellis_serve::config::ConfigError;

use crate::keys::{KeyRef, Pkcs11Settings, Pkcs11Uri};

/// Keys that used to sit at the top level of the file, and where they are now.
pub const MOVED_KEYS: &[(&str, &str)] = &[
    ("sds_max_connections", "limits.sds.max_connections"),
    ("sds_handshake_timeout", "limits.sds.handshake_timeout"),
    (
        "sds_max_streams_per_connection",
        "limits.sds.max_streams_per_connection",
    ),
    ("sds_rate_limit", "limits.sds.rate_limit"),
    ("sds_rate_burst", "limits.sds.rate_burst"),
    ("sds_rate_limit_loopback", "limits.sds.rate_limit_loopback"),
    ("sds_max_message_bytes", "limits.sds.max_message_bytes"),
    (
        "sds_max_header_list_bytes",
        "limits.sds.max_header_list_bytes",
    ),
    ("sds_max_pending_resets", "limits.sds.max_pending_resets"),
    ("admin_max_connections", "limits.admin.max_connections"),
    (
        "admin_header_read_timeout",
        "limits.admin.header_read_timeout",
    ),
    ("admin_max_header_bytes", "limits.admin.max_header_bytes"),
    ("admin_idle_timeout", "limits.admin.idle_timeout"),
    (
        "admin_max_streams_per_connection",
        "limits.admin.max_streams_per_connection",
    ),
    (
        "admin_max_pending_resets",
        "limits.admin.max_pending_resets",
    ),
    ("webhook_max_connections", "limits.webhook.max_connections"),
    (
        "webhook_max_header_bytes",
        "limits.webhook.max_header_bytes",
    ),
    ("webhook_max_body_bytes", "limits.webhook.max_body_bytes"),
    ("webhook_body_timeout", "limits.webhook.body_timeout"),
    (
        "webhook_header_read_timeout",
        "limits.webhook.header_read_timeout",
    ),
    (
        "webhook_handshake_timeout",
        "limits.webhook.handshake_timeout",
    ),
    ("max_jwt_bytes", "limits.k8s.max_jwt_bytes"),
    ("max_jwks_bytes", "limits.k8s.max_jwks_bytes"),
    ("jwks_fetch_timeout", "limits.k8s.jwks_fetch_timeout"),
];

/// `limits:` in the file: what one peer, or many, can make the control plane hold or do,
/// per listener. Absent fields take each section's defaults.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsFile {
    /// The SDS listener.
    #[serde(default)]
    pub sds: SdsLimitsFile,
    /// The admin listener.
    #[serde(default)]
    pub admin: AdminLimitsFile,
    /// The injection webhook's listener.
    #[serde(default)]
    pub webhook: WebhookLimitsFile,
    /// Kubernetes credentials and the issuer's key set.
    #[serde(default)]
    pub k8s: K8sLimitsFile,
    /// Federated bundle refresh bounds and fetch limits.
    #[serde(default)]
    pub federation: FederationLimitsFile,
}

/// The YAML file, every field optional (flags and defaults fill the rest).
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct ControlFile {
    /// `trust_domain: example.org`
    pub trust_domain: Option<String>,
    /// SDS listen address.
    pub listen: Option<SocketAddr>,
    /// Admin HTTP listen address.
    pub admin: Option<SocketAddr>,
    /// State directory.
    pub state_dir: Option<PathBuf>,
    /// The operator API's Unix socket (`trellis token create`, `trellis ca rotate`).
    pub operator_socket: Option<PathBuf>,
    /// SVID lifetime, e.g. `24h`.
    #[serde(default, with = "humantime_serde")]
    pub svid_ttl: Option<Duration>,
    /// Rotation interval, e.g. `1h`.
    #[serde(default, with = "humantime_serde")]
    pub rotate_every: Option<Duration>,
    /// How long issuance records are kept after their SVID expired, e.g. `7d`.
    #[serde(default, with = "humantime_serde")]
    pub issuance_retention: Option<Duration>,
    /// JWT-SVID lifetime, e.g. `5m`.
    #[serde(default, with = "humantime_serde")]
    pub jwt_svid_ttl: Option<Duration>,
    /// How long each JWT signing key signs before the next one takes over, e.g. `24h`.
    #[serde(default, with = "humantime_serde")]
    pub jwt_key_rotate_every: Option<Duration>,
    /// Intermediate CA certificate (PEM).
    pub ca_cert: Option<PathBuf>,
    /// Intermediate CA key: a PEM file, or a key in a PKCS#11 token
    /// (`pkcs11:token=LABEL;object=LABEL`, RFC 7512).
    pub ca_key: Option<PathBuf>,
    /// Trust bundle (roots) for the intermediate, PEM.
    pub ca_bundle: Option<PathBuf>,
    /// Kubernetes service-account issuer JWKS file.
    pub k8s_jwks: Option<PathBuf>,
    /// Expected `iss` of Kubernetes tokens.
    pub k8s_issuer: Option<String>,
    /// Expected `aud` of Kubernetes tokens.
    pub k8s_audience: Option<String>,
    /// The issuer's JWKS URL on the API server (instead of `k8s_jwks`), e.g.
    /// `https://kubernetes.default.svc/openid/v1/jwks`.
    pub k8s_jwks_url: Option<String>,
    /// CA file that verifies `k8s_jwks_url`'s server.
    pub k8s_ca: Option<PathBuf>,
    /// Bearer token file sent to `k8s_jwks_url`, read again on every fetch.
    pub k8s_token: Option<PathBuf>,
    /// How often `k8s_jwks_url` is fetched again, e.g. `5m`.
    #[serde(default, with = "humantime_serde")]
    pub k8s_jwks_refresh: Option<Duration>,
    /// Where the sidecar injection webhook (HTTPS) listens; absent: no webhook.
    pub webhook_listen: Option<SocketAddr>,
    /// DNS names of the webhook's serving certificate.
    pub webhook_dns_names: Option<Vec<String>>,
    /// The image injected sidecars run.
    pub sidecar_image: Option<String>,
    /// The control plane address (`host:port`) injected sidecars connect to.
    pub sidecar_control_plane: Option<String>,
    /// Inject native sidecars (Kubernetes 1.29+); `false`: ordinary containers.
    pub native_sidecar: Option<bool>,
    /// `NO_PROXY` entries injected app containers get besides localhost and the pod itself.
    pub no_proxy: Option<Vec<String>>,
    /// `TRELLIS_DEFAULT_ROUTE` of injected sidecars (`hosts=…;…,address=…,identity=…`), unless
    /// a pod's `trellis.io/default-route` says otherwise.
    pub sidecar_default_route: Option<String>,
    /// Where tokens, issuances and CA rotations live: `postgres://USER:PASSWORD@HOST/DB`
    /// (shared by replicas) or `sqlite://PATH`; absent: `<state_dir>/trellis.db`.
    pub database: Option<DatabaseUrl>,
    /// `pq-preferred` (default), `pq-only` or `classical`: the key-exchange groups of the SDS
    /// listener, the webhook and every client the control plane opens.
    pub tls_key_exchange: Option<KeyExchange>,
    /// Where the SPIFFE bundle endpoint listens (`https_spiffe`); absent: not served.
    pub bundle_endpoint: Option<SocketAddr>,
    /// `spiffe_refresh_hint` of the bundle we publish, e.g. `5m`.
    #[serde(default, with = "humantime_serde")]
    pub bundle_refresh_hint: Option<Duration>,
    /// SPIFFE federation relationships, one per foreign trust domain (reloaded on change).
    pub federation: Option<Vec<RelationshipFile>>,
    /// The PKCS#11 module (`.so`) that holds `pkcs11:` keys.
    pub pkcs11_module: Option<PathBuf>,
    /// File holding the token's user PIN (never the PIN itself in the config).
    pub pkcs11_pin_file: Option<PathBuf>,
    /// Sessions per token: how many signatures run at once [default: 4].
    pub pkcs11_sessions: Option<usize>,
    /// The transparency-log signing key in a PKCS#11 token (`pkcs11:…`); absent: the key in
    /// the database.
    pub log_key: Option<String>,
    /// Limits per listener.
    #[serde(default)]
    pub limits: LimitsFile,
}

impl ControlFile {
    /// Reads and parses a config file; unknown fields are errors (a key that moved under
    /// `limits:` is told where).
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses YAML text; `path` names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        if text.trim().is_empty() {
            return Ok(Self::default());
        }
        serde_yaml_ng::from_str(text)
            .map_err(|e| ConfigError::parse(path, e.to_string(), MOVED_KEYS))
    }
}

/// An operator-supplied signing CA.
#[derive(Debug, Clone)]
pub struct CaFiles {
    /// Intermediate certificate.
    pub cert: PathBuf,
    /// Intermediate key: a file or a PKCS#11 token key.
    pub key: KeyRef,
    /// Roots, if not the last certificate of `cert`.
    pub bundle: Option<PathBuf>,
}

/// Validated settings the control plane runs with.
#[derive(Debug, Clone)]
pub struct ControlSettings {
    /// The trust domain.
    pub trust_domain: TrustDomain,
    /// SDS gRPC-over-TLS listener.
    pub listen: SocketAddr,
    /// Admin HTTP listener.
    pub admin: SocketAddr,
    /// State directory (created 0700).
    pub state_dir: PathBuf,
    /// The operator API's Unix socket (mode 0600): `operator_socket`, else
    /// `<state_dir>/operator.sock`.
    pub operator_socket: PathBuf,
    /// SVID lifetime.
    pub svid_ttl: Duration,
    /// Rotation interval.
    pub rotate_every: Duration,
    /// Issuance records are pruned once their SVID expired this long ago.
    pub issuance_retention: Duration,
    /// JWT-SVID lifetime (`jwt_svid_ttl`).
    pub jwt_svid_ttl: Duration,
    /// How long each JWT signing key signs (`jwt_key_rotate_every`); its successor is
    /// published half of this before it signs.
    pub jwt_key_rotate_every: Duration,
    /// Signing CA files, or `None` for the embedded self-signed CA.
    pub ca: Option<CaFiles>,
    /// Kubernetes attestation, or `None` to refuse JWTs.
    pub k8s: Option<K8sSettings>,
    /// The sidecar injection webhook, or `None` when `webhook_listen` is not set.
    pub webhook: Option<WebhookSettings>,
    /// The registry: SQLite in the state directory unless `database` names another.
    pub database: Database,
    /// Key-exchange groups of every TLS endpoint (the binary installs them process-wide).
    pub tls_key_exchange: KeyExchange,
    /// Limits per listener (hostile peers).
    pub limits: Limits,
    /// Where the bundle endpoint listens, if it is on.
    pub bundle_endpoint: Option<SocketAddr>,
    /// `spiffe_refresh_hint` we publish.
    pub bundle_refresh_hint: Duration,
    /// Federation relationships at start.
    pub federation: Vec<Relationship>,
    /// The config file, whose `federation:` list is reloaded when it changes (set by the
    /// binary; `None`: no reload).
    pub config_path: Option<PathBuf>,
    /// The PKCS#11 module, PIN file and session count, when any key lives in a token.
    pub pkcs11: Option<Pkcs11Settings>,
    /// The transparency-log key in a token, or `None` for the database's.
    pub log_key: Option<Pkcs11Uri>,
}

/// Validated limits, per listener.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Limits {
    /// `limits.sds`.
    pub sds: SdsLimits,
    /// `limits.admin`.
    pub admin: AdminLimits,
    /// `limits.webhook`.
    pub webhook: WebhookLimits,
    /// `limits.k8s`.
    pub k8s: K8sLimits,
    /// `limits.federation`.
    pub federation: FederationLimits,
}

/// Room in the SDS header list beyond the `authorization` value: the gRPC headers.
const GRPC_HEADERS_ROOM: u32 = 1024;

impl Limits {
    /// Each section's checks, then the one that spans two: a JWT the attestor would accept
    /// must also get through the SDS HTTP/2 layer, or every Kubernetes workload is refused
    /// with a protocol error instead of a reason.
    pub fn from_file(f: &LimitsFile) -> Result<Self, ConfigError> {
        let limits = Self {
            sds: SdsLimits::from_file(&f.sds)?,
            admin: AdminLimits::from_file(&f.admin)?,
            webhook: WebhookLimits::from_file(&f.webhook)?,
            k8s: K8sLimits::from_file(&f.k8s)?,
            federation: FederationLimits::from_file(&f.federation)?,
        };
        let max_jwt_bytes = limits.k8s.max_jwt_bytes;
        let header_list = limits.sds.max_header_list_bytes;
        let needed = u32::try_from(max_jwt_bytes + CREDENTIAL_OVERHEAD)
            .unwrap_or(u32::MAX)
            .saturating_add(GRPC_HEADERS_ROOM);
        if header_list < needed {
            return Err(ConfigError::invalid(
                "limits.sds.max_header_list_bytes",
                format!(
                    "{header_list} bytes cannot carry a {max_jwt_bytes}-byte JWT \
                     (limits.k8s.max_jwt_bytes) and the gRPC headers: use at least {needed}, \
                     or lower limits.k8s.max_jwt_bytes"
                ),
            ));
        }
        Ok(limits)
    }
}

/// Defaults of the top-level settings (each domain module has its own).
pub mod defaults {
    use std::time::Duration;
    /// `--listen`.
    pub const LISTEN: &str = "0.0.0.0:8443";
    /// `--admin`.
    pub const ADMIN: &str = "127.0.0.1:9090";
    /// `--state-dir`.
    pub const STATE_DIR: &str = "/var/lib/trellis";
    /// `--svid-ttl`.
    pub const SVID_TTL: Duration = Duration::from_secs(24 * 3600);
    /// `--rotate-every`.
    pub const ROTATE_EVERY: Duration = Duration::from_secs(3600);
    /// `jwt_svid_ttl`: JWT-SVIDs are bearer tokens, so short.
    pub const JWT_SVID_TTL: Duration = Duration::from_secs(300);
    /// `jwt_key_rotate_every`.
    pub const JWT_KEY_ROTATE_EVERY: Duration = Duration::from_secs(24 * 3600);
}

impl ControlSettings {
    /// Builds settings from a merged file (flags already applied over it).
    pub fn from_file(f: ControlFile) -> Result<Self, ConfigError> {
        let limits = Limits::from_file(&f.limits)?;
        let webhook = WebhookSettings::from_fields(
            WebhookFields {
                listen: f.webhook_listen,
                dns_names: f.webhook_dns_names,
                sidecar_image: f.sidecar_image,
                sidecar_control_plane: f.sidecar_control_plane,
                native_sidecar: f.native_sidecar,
                no_proxy: f.no_proxy,
                sidecar_default_route: f.sidecar_default_route,
            },
            limits.webhook,
        )?;
        let td = f.trust_domain.ok_or_else(|| {
            ConfigError::invalid(
                "trust_domain",
                "missing: pass --trust-domain example.org or set trust_domain in the config file",
            )
        })?;
        let trust_domain = TrustDomain::parse(&td)
            .map_err(|e| ConfigError::invalid("trust_domain", e.to_string()))?;
        let addr = |field: &str, v: Option<SocketAddr>, default: &str| match v {
            Some(a) => Ok(a),
            None => default
                .parse::<SocketAddr>()
                .map_err(|e| ConfigError::invalid(field, e.to_string())),
        };
        let listen = addr("listen", f.listen, defaults::LISTEN)?;
        let admin = addr("admin", f.admin, defaults::ADMIN)?;
        let svid_ttl = f.svid_ttl.unwrap_or(defaults::SVID_TTL);
        let rotate_every = f.rotate_every.unwrap_or(defaults::ROTATE_EVERY);
        if svid_ttl < Duration::from_secs(10) {
            return Err(ConfigError::invalid(
                "svid_ttl",
                format!("{svid_ttl:?} is too short: use at least 10s"),
            ));
        }
        if rotate_every < Duration::from_millis(500) {
            return Err(ConfigError::invalid(
                "rotate_every",
                format!("{rotate_every:?} is too short: use at least 500ms"),
            ));
        }
        if rotate_every >= svid_ttl {
            return Err(ConfigError::invalid(
                "rotate_every",
                format!(
                    "{} must be shorter than svid_ttl {} so SVIDs are replaced before they expire",
                    humantime::format_duration(rotate_every),
                    humantime::format_duration(svid_ttl)
                ),
            ));
        }
        let jwt_svid_ttl = f.jwt_svid_ttl.unwrap_or(defaults::JWT_SVID_TTL);
        if jwt_svid_ttl < Duration::from_secs(10) || jwt_svid_ttl > Duration::from_secs(24 * 3600) {
            return Err(ConfigError::invalid(
                "jwt_svid_ttl",
                format!(
                    "{} is out of range: use 10s to 24h (JWT-SVIDs are bearer tokens: keep them short)",
                    humantime::format_duration(jwt_svid_ttl)
                ),
            ));
        }
        let jwt_key_rotate_every = f
            .jwt_key_rotate_every
            .unwrap_or(defaults::JWT_KEY_ROTATE_EVERY);
        if jwt_key_rotate_every < Duration::from_secs(2) {
            return Err(ConfigError::invalid(
                "jwt_key_rotate_every",
                format!(
                    "{} is too short: use at least 2s",
                    humantime::format_duration(jwt_key_rotate_every)
                ),
            ));
        }
        let issuance_retention = f
            .issuance_retention
            .unwrap_or(crate::recorder::DEFAULT_ISSUANCE_RETENTION);
        if issuance_retention < Duration::from_secs(60) {
            return Err(ConfigError::invalid(
                "issuance_retention",
                format!(
                    "{} is too short: use at least 1m (records are the issuance history)",
                    humantime::format_duration(issuance_retention)
                ),
            ));
        }
        let ca = match (f.ca_cert, f.ca_key) {
            (Some(cert), Some(key)) => Some(CaFiles {
                cert,
                key: KeyRef::parse(&key.to_string_lossy())
                    .map_err(|e| ConfigError::invalid("ca_key", e.to_string()))?,
                bundle: f.ca_bundle,
            }),
            (None, None) if f.ca_bundle.is_none() => None,
            _ => {
                return Err(ConfigError::invalid(
                    "ca_cert",
                    "ca_cert and ca_key go together (ca_bundle is optional with them)",
                ))
            }
        };
        let log_key = f
            .log_key
            .as_deref()
            .map(|k| {
                if !Pkcs11Uri::is_uri(k) {
                    return Err(ConfigError::invalid(
                        "log_key",
                        format!("`{k}` is not a pkcs11: URI (the database keeps the log key otherwise; leave log_key unset)"),
                    ));
                }
                Pkcs11Uri::parse(k).map_err(|e| ConfigError::invalid("log_key", e.to_string()))
            })
            .transpose()?;
        let wants_token = log_key.is_some()
            || matches!(
                &ca,
                Some(CaFiles {
                    key: KeyRef::Pkcs11(_),
                    ..
                })
            );
        let pkcs11 = match (f.pkcs11_module, f.pkcs11_pin_file) {
            (Some(module), Some(pin_file)) => {
                let sessions = f.pkcs11_sessions.unwrap_or(crate::keys::pkcs11::DEFAULT_SESSIONS);
                if !(1..=256).contains(&sessions) {
                    return Err(ConfigError::invalid(
                        "pkcs11_sessions",
                        format!("{sessions} is out of range: allowed 1 to 256"),
                    ));
                }
                Some(Pkcs11Settings {
                    module,
                    pin_file,
                    sessions,
                })
            }
            (None, None) if !wants_token => None,
            (None, None) => {
                return Err(ConfigError::invalid(
                    "pkcs11_module",
                    "a pkcs11: key is configured (ca_key or log_key): set pkcs11_module (--pkcs11-module) and pkcs11_pin_file (--pkcs11-pin-file)",
                ))
            }
            (Some(_), None) => {
                return Err(ConfigError::invalid(
                    "pkcs11_pin_file",
                    "pkcs11_module needs pkcs11_pin_file (--pkcs11-pin-file): a file holding the token's user PIN",
                ))
            }
            (None, Some(_)) => {
                return Err(ConfigError::invalid(
                    "pkcs11_module",
                    "pkcs11_pin_file needs pkcs11_module (--pkcs11-module): the PKCS#11 library path",
                ))
            }
        };
        let k8s = K8sSettings::from_fields(K8sFields {
            jwks: f.k8s_jwks,
            jwks_url: f.k8s_jwks_url,
            ca: f.k8s_ca,
            token: f.k8s_token,
            refresh: f.k8s_jwks_refresh,
            issuer: f.k8s_issuer,
            audience: f.k8s_audience,
        })?;
        let state_dir = f
            .state_dir
            .unwrap_or_else(|| PathBuf::from(defaults::STATE_DIR));
        let operator_socket = f
            .operator_socket
            .unwrap_or_else(|| crate::operator::default_socket(&state_dir));
        if operator_socket.as_os_str().is_empty() {
            return Err(ConfigError::invalid(
                "operator_socket",
                "empty: give a path, e.g. /var/lib/trellis/operator.sock",
            ));
        }
        let database = match &f.database {
            None => Database::in_state_dir(&state_dir),
            Some(url) => Database::parse(url.expose()).map_err(|e| {
                ConfigError::invalid(
                    "database",
                    format!("{e} (from --database, TRELLIS_DATABASE or `database:`)"),
                )
            })?,
        };
        let bundle_refresh_hint = f
            .bundle_refresh_hint
            .unwrap_or(crate::federation::DEFAULT_REFRESH_HINT);
        if bundle_refresh_hint < Duration::from_secs(1) {
            return Err(ConfigError::invalid(
                "bundle_refresh_hint",
                "too short: use at least 1s (it is in whole seconds)",
            ));
        }
        let federation =
            crate::federation::relationships(&trust_domain, f.federation.unwrap_or_default())?;
        Ok(Self {
            bundle_endpoint: f.bundle_endpoint,
            bundle_refresh_hint,
            federation,
            config_path: None,
            trust_domain,
            listen,
            admin,
            state_dir,
            operator_socket,
            svid_ttl,
            rotate_every,
            issuance_retention,
            jwt_svid_ttl,
            jwt_key_rotate_every,
            ca,
            k8s,
            webhook,
            database,
            tls_key_exchange: f.tls_key_exchange.unwrap_or_default(),
            limits,
            pkcs11,
            log_key,
        })
    }
}

/// Fuzzing entry point (`fuzz/fuzz_targets/control_config.rs`, run on stable by
/// `tests/fuzz_bodies.rs`): YAML text → [`ControlFile::parse`] → [`ControlSettings::from_file`]
/// must not panic, and every refusal names the file. Not API.
#[doc(hidden)]
pub fn fuzz_config(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let path = Path::new("fuzz.yaml");
    let file = match ControlFile::parse(&text, path) {
        Ok(f) => f,
        Err(e) => {
            assert!(e.to_string().contains("fuzz.yaml"), "{e}");
            return;
        }
    };
    let _ = ControlSettings::from_file(file).map_err(|e| e.to_string());
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
