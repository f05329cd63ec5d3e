//! `trellis control` settings: the YAML file shape, defaults, and validation.
//!
//! The binary merges flags and `TRELLIS_*` variables over the file; this module only knows
//! the file and the final, validated [`ControlSettings`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use thiserror::Error;
use trellis_identity::TrustDomain;

use crate::attest::jwks_url::{self, JwksUrl};
use crate::registry::{Database, DatabaseUrl};

/// A config file or a setting is wrong. Messages name the file and line where there is one.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// Unreadable file.
    #[error("{path}: cannot read config: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// YAML syntax, unknown field, wrong type.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// serde_yaml_ng's message, with line and column.
        message: String,
    },
    /// A value is out of range or inconsistent.
    #[error("invalid setting `{field}`: {problem}")]
    Invalid {
        /// The setting.
        field: &'static str,
        /// What is wrong and what to do.
        problem: String,
    },
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
    /// SVID lifetime, e.g. `24h`.
    #[serde(default, with = "humantime_serde")]
    pub svid_ttl: Option<Duration>,
    /// Rotation interval, e.g. `1h`.
    #[serde(default, with = "humantime_serde")]
    pub rotate_every: Option<Duration>,
    /// How long issuance records are kept after their SVID expired, e.g. `7d`.
    #[serde(default, with = "humantime_serde")]
    pub issuance_retention: Option<Duration>,
    /// Intermediate CA certificate (PEM).
    pub ca_cert: Option<PathBuf>,
    /// Intermediate CA key (PEM).
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
    /// Where tokens, issuances and CA rotations live: `postgres://USER:PASSWORD@HOST/DB`
    /// (shared by replicas) or `sqlite://PATH`; absent: `<state_dir>/trellis.db`.
    pub database: Option<DatabaseUrl>,
    /// Most SDS connections open at once (TLS handshakes included); more are closed on accept.
    pub sds_max_connections: Option<usize>,
    /// How long an SDS client may take to finish its TLS handshake, e.g. `10s`.
    #[serde(default, with = "humantime_serde")]
    pub sds_handshake_timeout: Option<Duration>,
    /// Most concurrent HTTP/2 streams (SDS calls) on one SDS connection.
    pub sds_max_streams_per_connection: Option<u32>,
    /// SDS stream opens (attestations) per second allowed from one source IP; 0 turns it off.
    pub sds_rate_limit: Option<f64>,
    /// How many SDS stream opens one source IP may make at once before the rate applies.
    pub sds_rate_burst: Option<u32>,
    /// Rate-limit loopback peers too (they are exempt by default).
    pub sds_rate_limit_loopback: Option<bool>,
    /// Most admin connections open at once.
    pub admin_max_connections: Option<usize>,
    /// Most webhook connections open at once.
    pub webhook_max_connections: Option<usize>,
    /// Largest SDS request message decoded, in bytes.
    pub sds_max_message_bytes: Option<usize>,
    /// Largest HTTP/2 header list (HPACK-decoded) on an SDS connection, in bytes.
    pub sds_max_header_list_bytes: Option<u32>,
    /// Streams an SDS client may reset before the server accepts them (HTTP/2 rapid reset).
    pub sds_max_pending_resets: Option<usize>,
    /// How long an admin client may take to send its request head, e.g. `10s`.
    #[serde(default, with = "humantime_serde")]
    pub admin_header_read_timeout: Option<Duration>,
    /// Largest admin request head (HTTP/1.1) or header list (HTTP/2), in bytes.
    pub admin_max_header_bytes: Option<usize>,
    /// How long an admin connection may move no bytes before it is closed, e.g. `60s`.
    #[serde(default, with = "humantime_serde")]
    pub admin_idle_timeout: Option<Duration>,
    /// Concurrent HTTP/2 streams on one admin connection.
    pub admin_max_streams_per_connection: Option<u32>,
    /// Streams an admin client may reset before the server accepts them (HTTP/2 rapid reset).
    pub admin_max_pending_resets: Option<usize>,
    /// Largest webhook request head (and HTTP/1.1 read buffer), in bytes.
    pub webhook_max_header_bytes: Option<usize>,
    /// Largest AdmissionReview the webhook reads, in bytes.
    pub webhook_max_body_bytes: Option<usize>,
    /// How long a webhook request body may take to arrive, e.g. `10s`.
    #[serde(default, with = "humantime_serde")]
    pub webhook_body_timeout: Option<Duration>,
    /// How long a webhook client may take to send its request head, e.g. `10s`.
    #[serde(default, with = "humantime_serde")]
    pub webhook_header_read_timeout: Option<Duration>,
    /// How long a webhook client may take to finish its TLS handshake, e.g. `10s`.
    #[serde(default, with = "humantime_serde")]
    pub webhook_handshake_timeout: Option<Duration>,
    /// Largest Kubernetes service-account JWT accepted, in bytes.
    pub max_jwt_bytes: Option<usize>,
    /// Largest JWKS document (file or `k8s_jwks_url` body) parsed, in bytes.
    pub max_jwks_bytes: Option<usize>,
    /// How long one fetch of `k8s_jwks_url` may take, e.g. `10s`.
    #[serde(default, with = "humantime_serde")]
    pub jwks_fetch_timeout: Option<Duration>,
}

impl ControlFile {
    /// Reads and parses a config file; unknown fields are errors.
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
        serde_yaml_ng::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })
    }
}

/// Where the Kubernetes service-account issuer's keys come from.
#[derive(Debug, Clone)]
pub enum K8sKeySource {
    /// A JWKS file, read once at start (`k8s_jwks`).
    File(PathBuf),
    /// The API server's JWKS endpoint, fetched at start and every `refresh` (`k8s_jwks_url`).
    Url {
        /// The endpoint.
        url: JwksUrl,
        /// CA file verifying its server.
        ca: PathBuf,
        /// Bearer token file.
        token: PathBuf,
        /// Refresh interval.
        refresh: Duration,
    },
}

/// Kubernetes attestation settings.
#[derive(Debug, Clone)]
pub struct K8sSettings {
    /// Where the issuer's keys come from.
    pub jwks: K8sKeySource,
    /// Expected issuer.
    pub issuer: String,
    /// Expected audience.
    pub audience: String,
}

/// An operator-supplied signing CA.
#[derive(Debug, Clone)]
pub struct CaFiles {
    /// Intermediate certificate.
    pub cert: PathBuf,
    /// Intermediate key.
    pub key: PathBuf,
    /// Roots, if not the last certificate of `cert`.
    pub bundle: Option<PathBuf>,
}

/// The sidecar injection webhook (`--webhook-listen` and friends).
#[derive(Debug, Clone)]
pub struct WebhookSettings {
    /// HTTPS listener for `POST /inject`.
    pub listen: SocketAddr,
    /// DNS SANs of its serving certificate (lowercase, validated).
    pub dns_names: Vec<String>,
    /// Image of the injected `trellis-sidecar` container.
    pub sidecar_image: String,
    /// `TRELLIS_CONTROL_PLANE` of injected sidecars (`host:port`).
    pub sidecar_control_plane: String,
    /// The `webhook_*` limits, checked with the others in [`ListenerLimits`].
    pub limits: crate::webhook::WebhookLimits,
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
    /// SVID lifetime.
    pub svid_ttl: Duration,
    /// Rotation interval.
    pub rotate_every: Duration,
    /// Issuance records are pruned once their SVID expired this long ago.
    pub issuance_retention: Duration,
    /// Signing CA files, or `None` for the embedded self-signed CA.
    pub ca: Option<CaFiles>,
    /// Kubernetes attestation, or `None` to refuse JWTs.
    pub k8s: Option<K8sSettings>,
    /// The sidecar injection webhook, or `None` when `webhook_listen` is not set.
    pub webhook: Option<WebhookSettings>,
    /// The registry: SQLite in the state directory unless `database` names another.
    pub database: Database,
    /// Limits on the listeners (hostile peers).
    pub limits: ListenerLimits,
}

/// Limits that bound what one peer, or many, can make the control plane hold or do.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ListenerLimits {
    /// Most SDS connections (handshaking or open).
    pub sds_max_connections: usize,
    /// SDS TLS handshake deadline.
    pub sds_handshake_timeout: Duration,
    /// HTTP/2 `SETTINGS_MAX_CONCURRENT_STREAMS` on SDS connections.
    pub sds_max_streams_per_connection: u32,
    /// Per-source-IP rate of SDS stream opens.
    pub sds_rate: crate::ratelimit::RateLimit,
    /// Largest SDS request message decoded.
    pub sds_max_message_bytes: usize,
    /// HTTP/2 `SETTINGS_MAX_HEADER_LIST_SIZE` on SDS connections.
    pub sds_max_header_list_bytes: u32,
    /// Streams reset before accept that an SDS connection may have pending (rapid reset).
    pub sds_max_pending_resets: usize,
    /// Most admin connections.
    pub admin_max_connections: usize,
    /// Admin protocol detection and request head deadline.
    pub admin_header_read_timeout: Duration,
    /// Largest admin request head (HTTP/1.1) or header list (HTTP/2).
    pub admin_max_header_bytes: usize,
    /// Admin connections that move no bytes for this long are closed.
    pub admin_idle_timeout: Duration,
    /// Concurrent HTTP/2 streams per admin connection.
    pub admin_max_streams_per_connection: u32,
    /// Streams reset before accept that an admin connection may have pending (rapid reset).
    pub admin_max_pending_resets: usize,
    /// Largest webhook request head (the HTTP/1.1 read buffer).
    pub webhook_max_header_bytes: usize,
    /// Most webhook connections.
    pub webhook_max_connections: usize,
    /// Largest AdmissionReview body.
    pub webhook_max_body_bytes: usize,
    /// Webhook request body deadline.
    pub webhook_body_timeout: Duration,
    /// Webhook request head deadline.
    pub webhook_header_read_timeout: Duration,
    /// Webhook TLS handshake deadline.
    pub webhook_handshake_timeout: Duration,
    /// Largest Kubernetes JWT (the `authorization` value may be 64 bytes longer).
    pub max_jwt_bytes: usize,
    /// Largest JWKS document, from the file or the URL.
    pub max_jwks_bytes: usize,
    /// Deadline of one `k8s_jwks_url` fetch.
    pub jwks_fetch_timeout: Duration,
}

impl Default for ListenerLimits {
    fn default() -> Self {
        Self {
            sds_max_connections: defaults::SDS_MAX_CONNECTIONS,
            sds_handshake_timeout: defaults::SDS_HANDSHAKE_TIMEOUT,
            sds_max_streams_per_connection: defaults::SDS_MAX_STREAMS_PER_CONNECTION,
            sds_rate: crate::ratelimit::RateLimit::DEFAULT,
            sds_max_message_bytes: defaults::SDS_MAX_MESSAGE_BYTES,
            sds_max_header_list_bytes: defaults::SDS_MAX_HEADER_LIST_BYTES,
            sds_max_pending_resets: defaults::SDS_MAX_PENDING_RESETS,
            admin_max_connections: defaults::ADMIN_MAX_CONNECTIONS,
            admin_header_read_timeout: defaults::ADMIN_HEADER_READ_TIMEOUT,
            admin_max_header_bytes: defaults::ADMIN_MAX_HEADER_BYTES,
            admin_idle_timeout: defaults::ADMIN_IDLE_TIMEOUT,
            admin_max_streams_per_connection: defaults::ADMIN_MAX_STREAMS_PER_CONNECTION,
            admin_max_pending_resets: defaults::ADMIN_MAX_PENDING_RESETS,
            webhook_max_header_bytes: defaults::WEBHOOK_MAX_HEADER_BYTES,
            webhook_max_connections: defaults::WEBHOOK_MAX_CONNECTIONS,
            webhook_max_body_bytes: defaults::WEBHOOK_MAX_BODY_BYTES,
            webhook_body_timeout: defaults::WEBHOOK_BODY_TIMEOUT,
            webhook_header_read_timeout: defaults::WEBHOOK_HEADER_READ_TIMEOUT,
            webhook_handshake_timeout: defaults::WEBHOOK_HANDSHAKE_TIMEOUT,
            max_jwt_bytes: defaults::MAX_JWT_BYTES,
            max_jwks_bytes: defaults::MAX_JWKS_BYTES,
            jwks_fetch_timeout: defaults::JWKS_FETCH_TIMEOUT,
        }
    }
}

/// Defaults.
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
    /// `--k8s-audience`.
    pub const K8S_AUDIENCE: &str = "trellis";
    /// `--webhook-dns-name`: the `trellis-control` Service in `trellis-system`, the name the
    /// API server uses for a `service` webhook reference.
    pub const WEBHOOK_DNS_NAME: &str = "trellis-control.trellis-system.svc";
    /// `--sidecar-image`.
    pub const SIDECAR_IMAGE: &str = "ghcr.io/trellis-mesh/trellis:0.1.0";
    /// `--sidecar-control-plane`.
    pub const SIDECAR_CONTROL_PLANE: &str = "trellis-control.trellis-system.svc:8443";
    /// `--sds-max-connections`: room for 10,000 streams (tests/bench/SCALE.md) on one
    /// connection each, twice over.
    pub const SDS_MAX_CONNECTIONS: usize = 20_000;
    /// `--sds-handshake-timeout`.
    pub const SDS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
    /// `--sds-max-streams-per-connection`: a sidecar or Envoy opens one or two streams; the
    /// `sds_load` harness multiplexes 100 on one connection.
    pub const SDS_MAX_STREAMS_PER_CONNECTION: u32 = 128;
    /// `--sds-rate-limit`: stream opens per second per source IP.
    pub const SDS_RATE_LIMIT: f64 = 10.0;
    /// `--sds-rate-burst`.
    pub const SDS_RATE_BURST: u32 = 50;
    /// `--admin-max-connections`: the admin port serves a scraper, probes and an operator.
    pub const ADMIN_MAX_CONNECTIONS: usize = 64;
    /// `--webhook-max-connections`: the API servers call it, a handful at a time.
    pub const WEBHOOK_MAX_CONNECTIONS: usize = 256;
    /// `--sds-max-message-bytes`: SDS requests are small (a node and a few resource names).
    pub const SDS_MAX_MESSAGE_BYTES: usize = 256 * 1024;
    /// `--sds-max-header-list-bytes`: room for a [`MAX_JWT_BYTES`] JWT in `authorization` and
    /// the gRPC headers. Larger lists are refused by the HTTP/2 layer before any handler
    /// runs, which also bounds CONTINUATION floods.
    pub const SDS_MAX_HEADER_LIST_BYTES: u32 = 16 * 1024;
    /// `--sds-max-pending-resets`: streams a client may reset before the server has accepted
    /// them (HTTP/2 rapid reset, CVE-2023-44487); past this the connection gets GOAWAY.
    pub const SDS_MAX_PENDING_RESETS: usize = 20;
    /// `--admin-header-read-timeout`: slower clients (slowloris) are disconnected.
    pub const ADMIN_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
    /// `--admin-max-header-bytes`: longer HTTP/1.1 heads get `431`.
    pub const ADMIN_MAX_HEADER_BYTES: usize = 16 * 1024;
    /// `--admin-idle-timeout`: a scraper polls every few seconds; nothing needs an idle hour.
    pub const ADMIN_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
    /// `--admin-max-streams-per-connection`: a scraper or an operator needs one or two.
    pub const ADMIN_MAX_STREAMS_PER_CONNECTION: u32 = 16;
    /// `--admin-max-pending-resets`: as on SDS connections.
    pub const ADMIN_MAX_PENDING_RESETS: usize = 20;
    /// `--webhook-max-header-bytes`: the API server sends a handful of short headers.
    pub const WEBHOOK_MAX_HEADER_BYTES: usize = 64 * 1024;
    /// `--webhook-max-body-bytes`: etcd stores objects of at most 1.5 MiB, so every pod that
    /// could ever be created fits, with room for the review around it.
    pub const WEBHOOK_MAX_BODY_BYTES: usize = 2 * 1024 * 1024;
    /// `--webhook-body-timeout`: the API server gives up after `timeoutSeconds` (5 s) anyway.
    pub const WEBHOOK_BODY_TIMEOUT: Duration = Duration::from_secs(10);
    /// `--webhook-header-read-timeout`.
    pub const WEBHOOK_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
    /// `--webhook-handshake-timeout`.
    pub const WEBHOOK_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
    /// `--max-jwt-bytes`: Kubernetes tokens are about 1 KiB (a few more with many audiences
    /// or a long issuer URL).
    pub const MAX_JWT_BYTES: usize = 8 * 1024;
    /// `--max-jwks-bytes`: a cluster's issuer publishes a few keys in a few KiB.
    pub const MAX_JWKS_BYTES: usize = 1024 * 1024;
    /// `--jwks-fetch-timeout`: one whole fetch (connect, TLS, request, body).
    pub const JWKS_FETCH_TIMEOUT: Duration = Duration::from_secs(10);
}

/// Room in the `authorization` value beyond the JWT: the `Bearer ` scheme and spaces.
pub const CREDENTIAL_OVERHEAD: usize = 64;
/// Room in the SDS header list beyond the `authorization` value: the gRPC headers.
const GRPC_HEADERS_ROOM: u32 = 1024;

/// Checks the limit fields and fills in defaults.
fn listener_limits(f: &ControlFile) -> Result<ListenerLimits, ConfigError> {
    let invalid = |field: &'static str, problem: String| ConfigError::Invalid { field, problem };
    let positive = |field: &'static str, v: Option<usize>, default: usize| match v {
        Some(0) => Err(invalid(field, "must be at least 1".into())),
        Some(n) => Ok(n),
        None => Ok(default),
    };
    // Sizes: a floor below which real traffic is refused, a ceiling above which the limit no
    // longer protects anything; `why` tells the operator what the floor is for.
    let bytes = |field: &'static str,
                 v: Option<usize>,
                 default: usize,
                 (min, max): (usize, usize),
                 why: &str| match v {
        Some(n) if n < min || n > max => Err(invalid(
            field,
            format!("{n} bytes is out of range: use {min} to {max} ({why})"),
        )),
        Some(n) => Ok(n),
        None => Ok(default),
    };
    // Rapid-reset bounds: 0 would make every cancelled request fatal to its connection.
    let pending_resets = |field: &'static str, v: Option<usize>, default: usize| match v {
        Some(n) if n == 0 || n > 10_000 => Err(invalid(
            field,
            format!("{n} is out of range: use 1 to 10000"),
        )),
        Some(n) => Ok(n),
        None => Ok(default),
    };
    // Deadlines: shorter than this would cut off clients on any real network.
    let deadline = |field: &'static str, v: Option<Duration>, default: Duration| {
        let d = v.unwrap_or(default);
        if d < Duration::from_millis(100) {
            return Err(invalid(
                field,
                format!("{d:?} is too short: use at least 100ms"),
            ));
        }
        Ok(d)
    };
    let sds_handshake_timeout = deadline(
        "sds_handshake_timeout",
        f.sds_handshake_timeout,
        defaults::SDS_HANDSHAKE_TIMEOUT,
    )?;
    let sds_max_streams_per_connection = f
        .sds_max_streams_per_connection
        .unwrap_or(defaults::SDS_MAX_STREAMS_PER_CONNECTION);
    if sds_max_streams_per_connection == 0 {
        return Err(invalid(
            "sds_max_streams_per_connection",
            "must be at least 1".into(),
        ));
    }
    let per_second = f.sds_rate_limit.unwrap_or(defaults::SDS_RATE_LIMIT);
    if !per_second.is_finite() || per_second < 0.0 {
        return Err(invalid(
            "sds_rate_limit",
            format!("{per_second} is not a rate: give stream opens per second, or 0 for no limit"),
        ));
    }
    let burst = f.sds_rate_burst.unwrap_or(defaults::SDS_RATE_BURST);
    if burst == 0 && per_second > 0.0 {
        return Err(invalid(
            "sds_rate_burst",
            "must be at least 1 while sds_rate_limit is on".into(),
        ));
    }
    let max_jwt_bytes = bytes(
        "max_jwt_bytes",
        f.max_jwt_bytes,
        defaults::MAX_JWT_BYTES,
        (1024, 64 * 1024),
        "a Kubernetes service-account token is about 1 KiB",
    )?;
    let sds_max_header_list_bytes = match f.sds_max_header_list_bytes {
        Some(n) if !(4096..=1024 * 1024).contains(&n) => {
            return Err(invalid(
                "sds_max_header_list_bytes",
                format!("{n} bytes is out of range: use 4096 to 1048576"),
            ))
        }
        Some(n) => n,
        None => defaults::SDS_MAX_HEADER_LIST_BYTES,
    };
    // A JWT the attestor would accept must also get through the HTTP/2 layer, or every
    // Kubernetes workload is refused with a protocol error instead of a reason.
    let needed = u32::try_from(max_jwt_bytes + CREDENTIAL_OVERHEAD)
        .unwrap_or(u32::MAX)
        .saturating_add(GRPC_HEADERS_ROOM);
    if sds_max_header_list_bytes < needed {
        return Err(invalid(
            "sds_max_header_list_bytes",
            format!(
                "{sds_max_header_list_bytes} bytes cannot carry a {max_jwt_bytes}-byte JWT \
                 (max_jwt_bytes) and the gRPC headers: use at least {needed}, or lower \
                 max_jwt_bytes"
            ),
        ));
    }
    Ok(ListenerLimits {
        sds_max_connections: positive(
            "sds_max_connections",
            f.sds_max_connections,
            defaults::SDS_MAX_CONNECTIONS,
        )?,
        sds_handshake_timeout,
        sds_max_streams_per_connection,
        sds_rate: crate::ratelimit::RateLimit {
            per_second,
            burst: f64::from(burst),
            limit_loopback: f.sds_rate_limit_loopback.unwrap_or(false),
            ..crate::ratelimit::RateLimit::DEFAULT
        },
        sds_max_message_bytes: bytes(
            "sds_max_message_bytes",
            f.sds_max_message_bytes,
            defaults::SDS_MAX_MESSAGE_BYTES,
            (1024, 64 * 1024 * 1024),
            "an SDS request is a node and a few resource names",
        )?,
        sds_max_header_list_bytes,
        sds_max_pending_resets: pending_resets(
            "sds_max_pending_resets",
            f.sds_max_pending_resets,
            defaults::SDS_MAX_PENDING_RESETS,
        )?,
        admin_max_connections: positive(
            "admin_max_connections",
            f.admin_max_connections,
            defaults::ADMIN_MAX_CONNECTIONS,
        )?,
        admin_header_read_timeout: deadline(
            "admin_header_read_timeout",
            f.admin_header_read_timeout,
            defaults::ADMIN_HEADER_READ_TIMEOUT,
        )?,
        admin_max_header_bytes: bytes(
            "admin_max_header_bytes",
            f.admin_max_header_bytes,
            defaults::ADMIN_MAX_HEADER_BYTES,
            (8 * 1024, 1024 * 1024),
            "the HTTP/1.1 read buffer cannot be smaller than 8 KiB",
        )?,
        admin_idle_timeout: deadline(
            "admin_idle_timeout",
            f.admin_idle_timeout,
            defaults::ADMIN_IDLE_TIMEOUT,
        )?,
        admin_max_streams_per_connection: match f.admin_max_streams_per_connection {
            Some(n) if n == 0 || n > 1024 => {
                return Err(invalid(
                    "admin_max_streams_per_connection",
                    format!("{n} is out of range: use 1 to 1024"),
                ))
            }
            Some(n) => n,
            None => defaults::ADMIN_MAX_STREAMS_PER_CONNECTION,
        },
        admin_max_pending_resets: pending_resets(
            "admin_max_pending_resets",
            f.admin_max_pending_resets,
            defaults::ADMIN_MAX_PENDING_RESETS,
        )?,
        webhook_max_header_bytes: bytes(
            "webhook_max_header_bytes",
            f.webhook_max_header_bytes,
            defaults::WEBHOOK_MAX_HEADER_BYTES,
            (8 * 1024, 1024 * 1024),
            "the HTTP/1.1 read buffer cannot be smaller than 8 KiB",
        )?,
        webhook_max_connections: positive(
            "webhook_max_connections",
            f.webhook_max_connections,
            defaults::WEBHOOK_MAX_CONNECTIONS,
        )?,
        webhook_max_body_bytes: bytes(
            "webhook_max_body_bytes",
            f.webhook_max_body_bytes,
            defaults::WEBHOOK_MAX_BODY_BYTES,
            (4 * 1024, 64 * 1024 * 1024),
            "an AdmissionReview of a small pod is a few KiB; a large one up to 1.5 MiB",
        )?,
        webhook_body_timeout: deadline(
            "webhook_body_timeout",
            f.webhook_body_timeout,
            defaults::WEBHOOK_BODY_TIMEOUT,
        )?,
        webhook_header_read_timeout: deadline(
            "webhook_header_read_timeout",
            f.webhook_header_read_timeout,
            defaults::WEBHOOK_HEADER_READ_TIMEOUT,
        )?,
        webhook_handshake_timeout: deadline(
            "webhook_handshake_timeout",
            f.webhook_handshake_timeout,
            defaults::WEBHOOK_HANDSHAKE_TIMEOUT,
        )?,
        max_jwt_bytes,
        max_jwks_bytes: bytes(
            "max_jwks_bytes",
            f.max_jwks_bytes,
            defaults::MAX_JWKS_BYTES,
            (1024, 64 * 1024 * 1024),
            "an issuer's JWKS is a few KiB",
        )?,
        jwks_fetch_timeout: deadline(
            "jwks_fetch_timeout",
            f.jwks_fetch_timeout,
            defaults::JWKS_FETCH_TIMEOUT,
        )?,
    })
}

/// Validates the webhook settings of `f`; `None` unless `webhook_listen` is set (the other
/// webhook fields alone are ignored, so one environment can serve replicas with and without
/// the webhook).
fn webhook_settings(
    f: &ControlFile,
    limits: &ListenerLimits,
) -> Result<Option<WebhookSettings>, ConfigError> {
    let Some(listen) = f.webhook_listen else {
        return Ok(None);
    };
    let raw = f
        .webhook_dns_names
        .clone()
        .unwrap_or_else(|| vec![defaults::WEBHOOK_DNS_NAME.to_owned()]);
    let mut dns_names: Vec<String> = Vec::new();
    for name in raw.iter().map(|n| n.trim().to_ascii_lowercase()) {
        if name.is_empty() {
            continue;
        }
        // The API server verifies the certificate by DNS name (RFC 6125); an IP address or
        // a wildcard cannot name a Service.
        if name.contains('*') || rustls::pki_types::DnsName::try_from(name.as_str()).is_err() {
            return Err(ConfigError::Invalid {
                field: "webhook_dns_names",
                problem: format!(
                    "`{name}` is not a DNS name: use the webhook Service's name, e.g. {}",
                    defaults::WEBHOOK_DNS_NAME
                ),
            });
        }
        if !dns_names.contains(&name) {
            dns_names.push(name);
        }
    }
    if dns_names.is_empty() {
        return Err(ConfigError::Invalid {
            field: "webhook_dns_names",
            problem: format!(
                "empty: give at least one, e.g. {}",
                defaults::WEBHOOK_DNS_NAME
            ),
        });
    }
    let sidecar_image = f
        .sidecar_image
        .clone()
        .unwrap_or_else(|| defaults::SIDECAR_IMAGE.to_owned());
    if sidecar_image.is_empty() || sidecar_image.chars().any(char::is_whitespace) {
        return Err(ConfigError::Invalid {
            field: "sidecar_image",
            problem: format!(
                "`{sidecar_image}` is not an image reference, e.g. {}",
                defaults::SIDECAR_IMAGE
            ),
        });
    }
    let sidecar_control_plane = f
        .sidecar_control_plane
        .clone()
        .unwrap_or_else(|| defaults::SIDECAR_CONTROL_PLANE.to_owned());
    let host_port_ok = match sidecar_control_plane.rsplit_once(':') {
        Some((host, port)) => {
            !host.is_empty()
                && !host.chars().any(char::is_whitespace)
                && port.parse::<u16>().is_ok_and(|p| p != 0)
        }
        None => false,
    };
    if !host_port_ok {
        return Err(ConfigError::Invalid {
            field: "sidecar_control_plane",
            problem: format!(
                "`{sidecar_control_plane}` must be host:port, e.g. {}",
                defaults::SIDECAR_CONTROL_PLANE
            ),
        });
    }
    Ok(Some(WebhookSettings {
        listen,
        dns_names,
        sidecar_image,
        sidecar_control_plane,
        limits: crate::webhook::WebhookLimits::from(limits),
    }))
}

/// Validates the Kubernetes attestation fields: `k8s_jwks` or `k8s_jwks_url` (not both), the
/// issuer with either, and the URL-only fields only with the URL.
fn k8s_settings(
    jwks: Option<PathBuf>,
    jwks_url: Option<String>,
    ca: Option<PathBuf>,
    token: Option<PathBuf>,
    refresh: Option<Duration>,
    issuer: Option<String>,
    audience: Option<String>,
) -> Result<Option<K8sSettings>, ConfigError> {
    let invalid = |field: &'static str, problem: String| ConfigError::Invalid { field, problem };
    let source = match (jwks, jwks_url) {
        (Some(_), Some(_)) => {
            return Err(invalid(
                "k8s_jwks_url",
                "set k8s_jwks (a file) or k8s_jwks_url (the API server), not both".into(),
            ))
        }
        (Some(file), None) => {
            for (field, set) in [
                ("k8s_ca", ca.is_some()),
                ("k8s_token", token.is_some()),
                ("k8s_jwks_refresh", refresh.is_some()),
            ] {
                if set {
                    return Err(invalid(
                        field,
                        "only used with k8s_jwks_url; a k8s_jwks file is read once at start".into(),
                    ));
                }
            }
            K8sKeySource::File(file)
        }
        (None, Some(url)) => {
            let url = JwksUrl::parse(&url).map_err(|e| invalid("k8s_jwks_url", e.to_string()))?;
            let refresh = refresh.unwrap_or(jwks_url::DEFAULT_REFRESH);
            if refresh < jwks_url::MIN_REFRESH {
                return Err(invalid(
                    "k8s_jwks_refresh",
                    format!(
                        "{} is too short: use at least {}",
                        humantime::format_duration(refresh),
                        humantime::format_duration(jwks_url::MIN_REFRESH)
                    ),
                ));
            }
            K8sKeySource::Url {
                url,
                ca: ca.unwrap_or_else(|| PathBuf::from(jwks_url::DEFAULT_CA)),
                token: token.unwrap_or_else(|| PathBuf::from(jwks_url::DEFAULT_TOKEN)),
                refresh,
            }
        }
        (None, None) => {
            for (field, set) in [
                ("k8s_issuer", issuer.is_some()),
                ("k8s_ca", ca.is_some()),
                ("k8s_token", token.is_some()),
                ("k8s_jwks_refresh", refresh.is_some()),
            ] {
                if set {
                    return Err(invalid(
                        field,
                        "set k8s_jwks or k8s_jwks_url too (the issuer's public keys)".into(),
                    ));
                }
            }
            return Ok(None);
        }
    };
    let issuer = issuer.ok_or_else(|| {
        invalid(
            "k8s_issuer",
            "required with k8s_jwks or k8s_jwks_url: the cluster's service-account issuer, e.g. \
             https://kubernetes.default.svc.cluster.local (`kubectl get --raw \
             /.well-known/openid-configuration` shows it)"
                .into(),
        )
    })?;
    Ok(Some(K8sSettings {
        jwks: source,
        issuer,
        audience: audience.unwrap_or_else(|| defaults::K8S_AUDIENCE.to_owned()),
    }))
}

impl ControlSettings {
    /// Builds settings from a merged file (flags already applied over it).
    pub fn from_file(f: ControlFile) -> Result<Self, ConfigError> {
        let limits = listener_limits(&f)?;
        let webhook = webhook_settings(&f, &limits)?;
        let td = f.trust_domain.ok_or(ConfigError::Invalid {
            field: "trust_domain",
            problem:
                "missing: pass --trust-domain example.org or set trust_domain in the config file"
                    .into(),
        })?;
        let trust_domain = TrustDomain::parse(&td).map_err(|e| ConfigError::Invalid {
            field: "trust_domain",
            problem: e.to_string(),
        })?;
        let parse_addr = |s: &str| s.parse::<SocketAddr>();
        let listen = match f.listen {
            Some(a) => a,
            None => parse_addr(defaults::LISTEN).map_err(|e| ConfigError::Invalid {
                field: "listen",
                problem: e.to_string(),
            })?,
        };
        let admin = match f.admin {
            Some(a) => a,
            None => parse_addr(defaults::ADMIN).map_err(|e| ConfigError::Invalid {
                field: "admin",
                problem: e.to_string(),
            })?,
        };
        let svid_ttl = f.svid_ttl.unwrap_or(defaults::SVID_TTL);
        let rotate_every = f.rotate_every.unwrap_or(defaults::ROTATE_EVERY);
        if svid_ttl < Duration::from_secs(10) {
            return Err(ConfigError::Invalid {
                field: "svid_ttl",
                problem: format!("{svid_ttl:?} is too short: use at least 10s"),
            });
        }
        if rotate_every < Duration::from_millis(500) {
            return Err(ConfigError::Invalid {
                field: "rotate_every",
                problem: format!("{rotate_every:?} is too short: use at least 500ms"),
            });
        }
        if rotate_every >= svid_ttl {
            return Err(ConfigError::Invalid {
                field: "rotate_every",
                problem: format!(
                    "{} must be shorter than svid_ttl {} so SVIDs are replaced before they expire",
                    humantime::format_duration(rotate_every),
                    humantime::format_duration(svid_ttl)
                ),
            });
        }
        let issuance_retention = f
            .issuance_retention
            .unwrap_or(crate::recorder::DEFAULT_ISSUANCE_RETENTION);
        if issuance_retention < Duration::from_secs(60) {
            return Err(ConfigError::Invalid {
                field: "issuance_retention",
                problem: format!(
                    "{} is too short: use at least 1m (records are the issuance history)",
                    humantime::format_duration(issuance_retention)
                ),
            });
        }
        let ca = match (f.ca_cert, f.ca_key) {
            (Some(cert), Some(key)) => Some(CaFiles {
                cert,
                key,
                bundle: f.ca_bundle,
            }),
            (None, None) if f.ca_bundle.is_none() => None,
            _ => {
                return Err(ConfigError::Invalid {
                    field: "ca_cert",
                    problem: "ca_cert and ca_key go together (ca_bundle is optional with them)"
                        .into(),
                })
            }
        };
        let k8s = k8s_settings(
            f.k8s_jwks,
            f.k8s_jwks_url,
            f.k8s_ca,
            f.k8s_token,
            f.k8s_jwks_refresh,
            f.k8s_issuer,
            f.k8s_audience,
        )?;
        let state_dir = f
            .state_dir
            .unwrap_or_else(|| PathBuf::from(defaults::STATE_DIR));
        let database = match &f.database {
            None => Database::in_state_dir(&state_dir),
            Some(url) => Database::parse(url.expose()).map_err(|e| ConfigError::Invalid {
                field: "database",
                problem: format!("{e} (from --database, TRELLIS_DATABASE or `database:`)"),
            })?,
        };
        Ok(Self {
            trust_domain,
            listen,
            admin,
            state_dir,
            svid_ttl,
            rotate_every,
            issuance_retention,
            ca,
            k8s,
            webhook,
            database,
            limits,
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
mod tests {
    use super::*;

    #[test]
    fn unknown_field_names_file_and_line() {
        let err = ControlFile::parse(
            "trust_domain: example.org\nlisten_addr: 1.2.3.4:5\n",
            Path::new("/etc/trellis/control.yaml"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("/etc/trellis/control.yaml: "), "{err}");
        assert!(err.contains("unknown field `listen_addr`"), "{err}");
        assert!(err.contains("line 2"), "{err}");
    }

    #[test]
    fn issuance_retention_defaults_and_is_checked() {
        let f = ControlFile::parse("trust_domain: example.org\n", Path::new("c.yaml")).unwrap();
        let s = ControlSettings::from_file(f).unwrap();
        assert_eq!(
            s.issuance_retention,
            crate::recorder::DEFAULT_ISSUANCE_RETENTION
        );
        let f = ControlFile::parse(
            "trust_domain: example.org\nissuance_retention: 30d\n",
            Path::new("c.yaml"),
        )
        .unwrap();
        let s = ControlSettings::from_file(f).unwrap();
        assert_eq!(s.issuance_retention, Duration::from_secs(30 * 86_400));
        let f = ControlFile::parse(
            "trust_domain: example.org\nissuance_retention: 5s\n",
            Path::new("c.yaml"),
        )
        .unwrap();
        let err = ControlSettings::from_file(f).unwrap_err().to_string();
        assert!(err.contains("issuance_retention"), "{err}");
    }

    #[test]
    fn bad_duration_is_located() {
        let err = ControlFile::parse("svid_ttl: soon\n", Path::new("c.yaml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("c.yaml") && err.contains("line 1"), "{err}");
    }

    #[test]
    fn rotation_must_be_shorter_than_ttl() {
        let f = ControlFile {
            trust_domain: Some("example.org".into()),
            svid_ttl: Some(Duration::from_secs(60)),
            rotate_every: Some(Duration::from_secs(120)),
            ..Default::default()
        };
        let err = ControlSettings::from_file(f).unwrap_err().to_string();
        assert!(err.contains("rotate_every"), "{err}");
    }

    #[test]
    fn missing_trust_domain_says_what_to_do() {
        let err = ControlSettings::from_file(ControlFile::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("--trust-domain"), "{err}");
    }

    fn with_webhook(edit: impl FnOnce(&mut ControlFile)) -> Result<ControlSettings, ConfigError> {
        let mut f = ControlFile {
            trust_domain: Some("example.org".into()),
            webhook_listen: Some("127.0.0.1:0".parse().unwrap()),
            ..Default::default()
        };
        edit(&mut f);
        ControlSettings::from_file(f)
    }

    #[test]
    fn webhook_is_off_unless_listen_is_set() {
        let s = ControlSettings::from_file(ControlFile {
            trust_domain: Some("example.org".into()),
            sidecar_image: Some("registry.example/trellis:1".into()),
            ..Default::default()
        })
        .unwrap();
        assert!(s.webhook.is_none());
    }

    #[test]
    fn webhook_defaults_and_names() {
        let w = with_webhook(|_| {}).unwrap().webhook.unwrap();
        assert_eq!(w.dns_names, [defaults::WEBHOOK_DNS_NAME]);
        assert_eq!(w.sidecar_image, defaults::SIDECAR_IMAGE);
        assert_eq!(w.sidecar_control_plane, defaults::SIDECAR_CONTROL_PLANE);
        assert_eq!(w.limits.max_connections, defaults::WEBHOOK_MAX_CONNECTIONS);
        assert_eq!(w.limits.max_body_bytes, defaults::WEBHOOK_MAX_BODY_BYTES);
        let w = with_webhook(|f| {
            f.webhook_dns_names = Some(vec![
                "Trellis-Control.trellis-system.svc".into(),
                "trellis-control.trellis-system.svc".into(),
                "localhost".into(),
            ])
        })
        .unwrap()
        .webhook
        .unwrap();
        assert_eq!(
            w.dns_names,
            ["trellis-control.trellis-system.svc", "localhost"]
        );
    }

    #[test]
    fn webhook_bad_settings_are_named() {
        for (edit, field) in [
            (
                Box::new(|f: &mut ControlFile| f.webhook_dns_names = Some(vec!["*.svc".into()]))
                    as Box<dyn FnOnce(&mut ControlFile)>,
                "webhook_dns_names",
            ),
            (
                Box::new(|f: &mut ControlFile| f.webhook_dns_names = Some(vec!["a b".into()])),
                "webhook_dns_names",
            ),
            (
                Box::new(|f: &mut ControlFile| f.webhook_dns_names = Some(vec![String::new()])),
                "webhook_dns_names",
            ),
            (
                Box::new(|f: &mut ControlFile| f.sidecar_image = Some("a b".into())),
                "sidecar_image",
            ),
            (
                Box::new(|f: &mut ControlFile| f.sidecar_control_plane = Some("no-port".into())),
                "sidecar_control_plane",
            ),
            (
                Box::new(|f: &mut ControlFile| f.sidecar_control_plane = Some("h:0".into())),
                "sidecar_control_plane",
            ),
        ] {
            let err = with_webhook(edit).unwrap_err().to_string();
            assert!(err.contains(field), "{err}");
        }
    }

    #[test]
    fn webhook_fields_parse_from_yaml() {
        let f = ControlFile::parse(
            "trust_domain: example.org\nwebhook_listen: 0.0.0.0:8444\nwebhook_dns_names: [a.svc, b.svc]\nsidecar_image: img:1\nsidecar_control_plane: cp:8443\n",
            Path::new("c.yaml"),
        )
        .unwrap();
        let w = ControlSettings::from_file(f).unwrap().webhook.unwrap();
        assert_eq!(w.listen.port(), 8444);
        assert_eq!(w.dns_names, ["a.svc", "b.svc"]);
        assert_eq!(w.sidecar_image, "img:1");
        assert_eq!(w.sidecar_control_plane, "cp:8443");
    }

    fn with_k8s(edit: impl FnOnce(&mut ControlFile)) -> Result<ControlSettings, ConfigError> {
        let mut f = ControlFile {
            trust_domain: Some("example.org".into()),
            k8s_issuer: Some("https://kubernetes.default.svc.cluster.local".into()),
            ..Default::default()
        };
        edit(&mut f);
        ControlSettings::from_file(f)
    }

    #[test]
    fn k8s_jwks_url_defaults_to_the_pod_files() {
        let s = with_k8s(|f| {
            f.k8s_jwks_url = Some("https://kubernetes.default.svc/openid/v1/jwks".into())
        })
        .unwrap();
        let k8s = s.k8s.unwrap();
        assert_eq!(k8s.audience, defaults::K8S_AUDIENCE);
        let K8sKeySource::Url {
            url,
            ca,
            token,
            refresh,
        } = k8s.jwks
        else {
            panic!("expected a URL source");
        };
        assert_eq!(
            url.as_str(),
            "https://kubernetes.default.svc/openid/v1/jwks"
        );
        assert_eq!(ca, Path::new(jwks_url::DEFAULT_CA));
        assert_eq!(token, Path::new(jwks_url::DEFAULT_TOKEN));
        assert_eq!(refresh, jwks_url::DEFAULT_REFRESH);
    }

    #[test]
    fn k8s_jwks_url_settings_are_checked() {
        let url = || Some("https://kubernetes.default.svc/openid/v1/jwks".to_string());
        type Edit = Box<dyn FnOnce(&mut ControlFile)>;
        let cases: Vec<(Edit, &str, &str)> = vec![
            (
                Box::new(move |f| {
                    f.k8s_jwks_url = url();
                    f.k8s_jwks = Some("jwks.json".into());
                }),
                "k8s_jwks_url",
                "not both",
            ),
            (
                Box::new(|f| f.k8s_jwks_url = Some("http://10.0.0.1/openid/v1/jwks".into())),
                "k8s_jwks_url",
                "https://",
            ),
            (
                Box::new(move |f| {
                    f.k8s_jwks_url = url();
                    f.k8s_jwks_refresh = Some(Duration::from_millis(10));
                }),
                "k8s_jwks_refresh",
                "at least 1s",
            ),
            (
                Box::new(move |f| {
                    f.k8s_jwks_url = url();
                    f.k8s_issuer = None;
                }),
                "k8s_issuer",
                "openid-configuration",
            ),
            (
                Box::new(|f| {
                    f.k8s_jwks = Some("jwks.json".into());
                    f.k8s_ca = Some("ca.crt".into());
                }),
                "k8s_ca",
                "only used with k8s_jwks_url",
            ),
            (
                Box::new(|_| {}),
                "k8s_issuer",
                "set k8s_jwks or k8s_jwks_url too",
            ),
        ];
        for (edit, field, words) in cases {
            let err = with_k8s(edit).unwrap_err().to_string();
            assert!(err.contains(&format!("`{field}`")), "{err}");
            assert!(err.contains(words), "{err}");
        }
    }

    #[test]
    fn k8s_file_and_url_fields_parse_from_yaml() {
        let f = ControlFile::parse(
            "k8s_jwks_url: https://kubernetes.default.svc/openid/v1/jwks\n\
             k8s_ca: /ca.crt\nk8s_token: /token\nk8s_jwks_refresh: 30s\n",
            Path::new("c.yaml"),
        )
        .unwrap();
        assert_eq!(f.k8s_jwks_refresh, Some(Duration::from_secs(30)));
        assert_eq!(f.k8s_ca.as_deref(), Some(Path::new("/ca.crt")));
        assert_eq!(f.k8s_token.as_deref(), Some(Path::new("/token")));
    }

    #[test]
    fn listener_limits_default_and_are_checked() {
        let base = || ControlFile {
            trust_domain: Some("example.org".into()),
            ..Default::default()
        };
        let s = ControlSettings::from_file(base()).unwrap();
        assert_eq!(s.limits, ListenerLimits::default());
        assert_eq!(s.limits.sds_max_connections, 20_000);
        assert!(!s.limits.sds_rate.limit_loopback);
        // The documented defaults (README "Hardening").
        let d = s.limits;
        assert_eq!(d.sds_max_message_bytes, 256 * 1024);
        assert_eq!(d.sds_max_header_list_bytes, 16 * 1024);
        assert_eq!(d.sds_max_pending_resets, 20);
        assert_eq!(d.admin_header_read_timeout, Duration::from_secs(10));
        assert_eq!(d.admin_max_header_bytes, 16 * 1024);
        assert_eq!(d.admin_idle_timeout, Duration::from_secs(60));
        assert_eq!(d.admin_max_streams_per_connection, 16);
        assert_eq!(d.admin_max_pending_resets, 20);
        assert_eq!(d.webhook_max_header_bytes, 64 * 1024);
        assert_eq!(d.webhook_max_connections, 256);
        assert_eq!(d.webhook_max_body_bytes, 2 * 1024 * 1024);
        assert_eq!(d.webhook_body_timeout, Duration::from_secs(10));
        assert_eq!(d.webhook_header_read_timeout, Duration::from_secs(10));
        assert_eq!(d.webhook_handshake_timeout, Duration::from_secs(10));
        assert_eq!(d.max_jwt_bytes, 8 * 1024);
        assert_eq!(d.max_jwks_bytes, 1024 * 1024);
        assert_eq!(d.jwks_fetch_timeout, Duration::from_secs(10));
        let yaml = "trust_domain: example.org\nsds_max_connections: 5\nsds_handshake_timeout: 2s\n\
                    sds_max_streams_per_connection: 16\nsds_rate_limit: 0.5\nsds_rate_burst: 3\n\
                    sds_rate_limit_loopback: true\nadmin_max_connections: 2\nwebhook_max_connections: 9\n\
                    sds_max_message_bytes: 4096\nsds_max_header_list_bytes: 8192\n\
                    sds_max_pending_resets: 5\nadmin_header_read_timeout: 3s\n\
                    admin_max_header_bytes: 9000\nadmin_idle_timeout: 4s\n\
                    webhook_max_body_bytes: 65536\nwebhook_body_timeout: 5s\n\
                    webhook_header_read_timeout: 6s\nwebhook_handshake_timeout: 7s\n\
                    max_jwt_bytes: 2048\nmax_jwks_bytes: 4096\njwks_fetch_timeout: 500ms\n\
                    admin_max_streams_per_connection: 3\nadmin_max_pending_resets: 4\n\
                    webhook_max_header_bytes: 16384\n";
        let s = ControlSettings::from_file(ControlFile::parse(yaml, Path::new("c.yaml")).unwrap())
            .unwrap();
        assert_eq!(s.limits.sds_max_connections, 5);
        assert_eq!(s.limits.sds_handshake_timeout, Duration::from_secs(2));
        assert_eq!(s.limits.sds_max_streams_per_connection, 16);
        assert_eq!(s.limits.sds_rate.per_second, 0.5);
        assert_eq!(s.limits.sds_rate.burst, 3.0);
        assert!(s.limits.sds_rate.limit_loopback);
        assert_eq!(s.limits.admin_max_connections, 2);
        assert_eq!(s.limits.webhook_max_connections, 9);
        assert_eq!(s.limits.sds_max_message_bytes, 4096);
        assert_eq!(s.limits.sds_max_header_list_bytes, 8192);
        assert_eq!(s.limits.sds_max_pending_resets, 5);
        assert_eq!(s.limits.admin_header_read_timeout, Duration::from_secs(3));
        assert_eq!(s.limits.admin_max_header_bytes, 9000);
        assert_eq!(s.limits.admin_max_streams_per_connection, 3);
        assert_eq!(s.limits.admin_max_pending_resets, 4);
        assert_eq!(s.limits.webhook_max_header_bytes, 16384);
        assert_eq!(s.limits.admin_idle_timeout, Duration::from_secs(4));
        assert_eq!(s.limits.webhook_max_body_bytes, 65536);
        assert_eq!(s.limits.webhook_body_timeout, Duration::from_secs(5));
        assert_eq!(s.limits.webhook_header_read_timeout, Duration::from_secs(6));
        assert_eq!(s.limits.webhook_handshake_timeout, Duration::from_secs(7));
        assert_eq!(s.limits.max_jwt_bytes, 2048);
        assert_eq!(s.limits.max_jwks_bytes, 4096);
        assert_eq!(s.limits.jwks_fetch_timeout, Duration::from_millis(500));
        assert!(s.webhook.is_none());
        for (edit, field) in [
            (
                Box::new(|f: &mut ControlFile| f.sds_max_connections = Some(0))
                    as Box<dyn Fn(&mut ControlFile)>,
                "sds_max_connections",
            ),
            (
                Box::new(|f: &mut ControlFile| {
                    f.sds_handshake_timeout = Some(Duration::from_millis(1))
                }),
                "sds_handshake_timeout",
            ),
            (
                Box::new(|f: &mut ControlFile| f.sds_max_streams_per_connection = Some(0)),
                "sds_max_streams_per_connection",
            ),
            (
                Box::new(|f: &mut ControlFile| f.sds_rate_limit = Some(-1.0)),
                "sds_rate_limit",
            ),
            (
                Box::new(|f: &mut ControlFile| f.sds_rate_burst = Some(0)),
                "sds_rate_burst",
            ),
            (
                Box::new(|f: &mut ControlFile| f.admin_max_connections = Some(0)),
                "admin_max_connections",
            ),
            (
                Box::new(|f: &mut ControlFile| f.webhook_max_connections = Some(0)),
                "webhook_max_connections",
            ),
            (
                Box::new(|f: &mut ControlFile| f.sds_max_message_bytes = Some(100)),
                "sds_max_message_bytes",
            ),
            (
                Box::new(|f: &mut ControlFile| f.sds_max_header_list_bytes = Some(1024)),
                "sds_max_header_list_bytes",
            ),
            (
                // In range, but too small for the default 8 KiB JWT.
                Box::new(|f: &mut ControlFile| f.sds_max_header_list_bytes = Some(8192)),
                "sds_max_header_list_bytes",
            ),
            (
                Box::new(|f: &mut ControlFile| f.sds_max_pending_resets = Some(0)),
                "sds_max_pending_resets",
            ),
            (
                Box::new(|f: &mut ControlFile| f.sds_max_pending_resets = Some(1_000_000)),
                "sds_max_pending_resets",
            ),
            (
                Box::new(|f: &mut ControlFile| {
                    f.admin_header_read_timeout = Some(Duration::from_millis(10))
                }),
                "admin_header_read_timeout",
            ),
            (
                Box::new(|f: &mut ControlFile| f.admin_max_header_bytes = Some(4096)),
                "admin_max_header_bytes",
            ),
            (
                Box::new(|f: &mut ControlFile| f.admin_max_streams_per_connection = Some(0)),
                "admin_max_streams_per_connection",
            ),
            (
                Box::new(|f: &mut ControlFile| f.admin_max_pending_resets = Some(0)),
                "admin_max_pending_resets",
            ),
            (
                Box::new(|f: &mut ControlFile| f.webhook_max_header_bytes = Some(1024)),
                "webhook_max_header_bytes",
            ),
            (
                Box::new(|f: &mut ControlFile| f.admin_idle_timeout = Some(Duration::ZERO)),
                "admin_idle_timeout",
            ),
            (
                Box::new(|f: &mut ControlFile| f.webhook_max_body_bytes = Some(1 << 30)),
                "webhook_max_body_bytes",
            ),
            (
                Box::new(|f: &mut ControlFile| {
                    f.webhook_body_timeout = Some(Duration::from_millis(1))
                }),
                "webhook_body_timeout",
            ),
            (
                Box::new(|f: &mut ControlFile| {
                    f.webhook_header_read_timeout = Some(Duration::from_millis(1))
                }),
                "webhook_header_read_timeout",
            ),
            (
                Box::new(|f: &mut ControlFile| {
                    f.webhook_handshake_timeout = Some(Duration::from_millis(1))
                }),
                "webhook_handshake_timeout",
            ),
            (
                Box::new(|f: &mut ControlFile| f.max_jwt_bytes = Some(10)),
                "max_jwt_bytes",
            ),
            (
                Box::new(|f: &mut ControlFile| f.max_jwt_bytes = Some(1 << 20)),
                "max_jwt_bytes",
            ),
            (
                Box::new(|f: &mut ControlFile| f.max_jwks_bytes = Some(0)),
                "max_jwks_bytes",
            ),
            (
                Box::new(|f: &mut ControlFile| {
                    f.jwks_fetch_timeout = Some(Duration::from_millis(1))
                }),
                "jwks_fetch_timeout",
            ),
        ] {
            let mut f = base();
            edit(&mut f);
            match ControlSettings::from_file(f) {
                Err(ConfigError::Invalid {
                    field: got,
                    problem,
                }) => {
                    assert_eq!(got, field, "{problem}");
                    assert!(!problem.is_empty());
                }
                other => panic!("{field}: expected Invalid, got {other:?}"),
            }
        }
        // The header list check names both settings and what to do.
        let mut f = base();
        f.max_jwt_bytes = Some(32 * 1024);
        let err = ControlSettings::from_file(f).unwrap_err().to_string();
        assert!(
            err.contains("sds_max_header_list_bytes") && err.contains("max_jwt_bytes"),
            "{err}"
        );
        assert!(err.contains("use at least 33856"), "{err}");
    }

    #[test]
    fn defaults_apply() {
        let s = ControlSettings::from_file(ControlFile {
            trust_domain: Some("example.org".into()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(s.svid_ttl, defaults::SVID_TTL);
        assert_eq!(s.rotate_every, defaults::ROTATE_EVERY);
        assert!(s.ca.is_none() && s.k8s.is_none());
    }

    #[test]
    fn database_defaults_to_sqlite_in_the_state_dir() {
        let s = ControlSettings::from_file(ControlFile {
            trust_domain: Some("example.org".into()),
            state_dir: Some("/srv/trellis".into()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            s.database,
            Database::Sqlite(PathBuf::from("/srv/trellis/trellis.db"))
        );
        let f = ControlFile::parse(
            "trust_domain: example.org\ndatabase: postgres://trellis:hunter2@db:5432/trellis\n",
            Path::new("c.yaml"),
        )
        .unwrap();
        assert!(!format!("{f:?}").contains("hunter2"));
        let s = ControlSettings::from_file(f).unwrap();
        assert!(s.database.is_shared());
        assert!(!format!("{s:?}").contains("hunter2"));
    }

    #[test]
    fn bad_database_url_names_the_flag_not_the_password() {
        let err = ControlSettings::from_file(ControlFile {
            trust_domain: Some("example.org".into()),
            database: Some("mysql://root:hunter2@db/trellis".parse().unwrap()),
            ..Default::default()
        })
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("--database") && err.contains("TRELLIS_DATABASE"),
            "{err}"
        );
        assert!(!err.contains("hunter2"), "{err}");
    }
}
