//! `trellis sidecar` settings: the YAML file shape, defaults, and validation.
//!
//! ```yaml
//! trust_domain: example.org
//! identity:
//!   sds:
//!     control_plane: 127.0.0.1:8443
//!     control_bundle: /etc/trellis/bundle.pem   # verifies the control plane
//!     # or control_bundle_pem: "-----BEGIN CERTIFICATE-----…" (the PEM itself)
//!     token_file: /var/run/secrets/tokens/trellis   # or join_token: trellis-join.…
//!     spiffe_id: spiffe://example.org/ns/prod/sa/web  # optional: refuse any other
//!   # or files: { cert: svid.pem, key: svid-key.pem, bundle: bundle.pem }
//! inbound:
//!   listen: 0.0.0.0:15443
//!   app: 127.0.0.1:8080
//!   tcp: [{ listen: 0.0.0.0:15432, app: 127.0.0.1:5432 }]
//!   headers_with_underscores: drop  # or reject (400) or allow; see crate::headers
//!   app_protocol: http1  # or h2c: prior-knowledge HTTP/2 to the app (gRPC servers)
//! outbound:
//!   listen: 127.0.0.1:15001        # Host-routed
//!   upstreams:
//!     - name: billing
//!       hosts: [billing, billing.prod]
//!       address: 10.0.0.7:15443
//!       identity: spiffe://example.org/ns/prod/sa/billing
//!     - name: db
//!       listen: 127.0.0.1:5432       # a dedicated port
//!       protocol: tcp
//!       address: 10.0.0.8:15432
//!       identity: spiffe://example.org/ns/prod/sa/db
//!   default_route:                   # hosts no upstream lists (see [`route`])
//!     hosts: ["{service}.{namespace}.svc.cluster.local", "{service}.{namespace}"]
//!     address: "{service}.{namespace}.svc.cluster.local:15443"
//!     identity: "spiffe://{trust_domain}/ns/{namespace}/sa/{service}"
//!   resolve_ttl: 10s                 # how long a resolved peer name is reused
//! admin: 127.0.0.1:15000
//! tls_policy: tls13                   # or tls12+
//! tls_key_exchange: pq-preferred      # or pq-only, classical (X25519MLKEM768 first)
//! access_log: true                   # one line per request, target trellis::access
//! workload_api: { socket: /run/spiffe/workload.sock }  # SPIFFE Workload API (crate::workload_api)
//! limits:                            # what one hostile peer may cost, by listener (see [`limits`])
//!   http: { max_header_bytes: 65536, header_read_timeout: 10s }
//!   inbound: { max_connections: 4096, handshake_timeout: 10s }
//!   admin: { max_connections: 64 }
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use trellis_identity::tls::{KeyExchange, TlsPolicy};
use trellis_identity::{SpiffeId, TrustDomain};

use crate::headers::UnderscoreHeaders;

pub mod limits;
pub mod route;

pub use limits::{
    AdminLimits, H2Limits, HttpLimits, InboundLimits, Limits, LimitsFile, OutboundLimits,
};

pub use route::{DefaultRouteFile, HostTemplate, Template};
pub use trellis_serve::config::ConfigError;

fn invalid(field: impl Into<String>, problem: impl Into<String>) -> ConfigError {
    ConfigError::invalid(field, problem)
}

/// `identity.sds` in the file.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SdsFile {
    /// Control plane SDS address, `host:port`.
    pub control_plane: Option<String>,
    /// Bundle that verifies the control plane (`<state-dir>/bundle.pem`).
    pub control_bundle: Option<PathBuf>,
    /// The same bundle as PEM text, instead of a path (what the injection webhook sets, as
    /// `TRELLIS_CONTROL_BUNDLE_PEM`: a pod cannot mount a ConfigMap of another namespace).
    pub control_bundle_pem: Option<String>,
    /// Kubernetes projected service-account token file (re-read on every connect).
    pub token_file: Option<PathBuf>,
    /// Join token.
    pub join_token: Option<String>,
    /// The SPIFFE ID this sidecar must receive; anything else is NACKed.
    pub spiffe_id: Option<String>,
    /// Generate the key here and send a CSR (default true). False: accept a key from the
    /// control plane, as a stock Envoy does.
    pub csr: Option<bool>,
}

/// `identity.files` in the file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilesFile {
    /// SVID chain PEM (leaf first).
    pub cert: PathBuf,
    /// SVID private key PEM.
    pub key: PathBuf,
    /// Trust bundle PEM.
    pub bundle: PathBuf,
}

/// `identity` in the file: exactly one of `sds` or `files`.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityFile {
    /// From the control plane.
    pub sds: Option<SdsFile>,
    /// From PEM files.
    pub files: Option<FilesFile>,
}

/// A raw TCP forward.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TcpForward {
    /// Where the sidecar listens (mTLS for inbound).
    pub listen: SocketAddr,
    /// Where the bytes go.
    pub app: SocketAddr,
}

/// `inbound` in the file.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InboundFile {
    /// mTLS listener for HTTP.
    pub listen: Option<SocketAddr>,
    /// The local app.
    pub app: Option<SocketAddr>,
    /// Raw TCP ports (mTLS outside, plain TCP to the app).
    #[serde(default)]
    pub tcp: Vec<TcpForward>,
    /// Request headers whose names contain `_`: `drop` (default), `reject` or `allow`.
    pub headers_with_underscores: Option<UnderscoreHeaders>,
    /// How to talk to the app: `http1` (default) or `h2c`.
    pub app_protocol: Option<AppProtocol>,
}

/// How the inbound sidecar talks to the app (`inbound.app_protocol`).
#[derive(Debug, Default, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum AppProtocol {
    /// Pooled HTTP/1.1 keep-alive connections.
    #[default]
    Http1,
    /// One pooled prior-knowledge HTTP/2 connection (gRPC servers, HTTP/2-only apps):
    /// trailers, streaming both ways, flow control end to end.
    H2c,
}

impl AppProtocol {
    /// The setting's spelling in config files and flags.
    pub fn as_str(self) -> &'static str {
        match self {
            AppProtocol::Http1 => "http1",
            AppProtocol::H2c => "h2c",
        }
    }
}

impl std::str::FromStr for AppProtocol {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "http1" => Ok(AppProtocol::Http1),
            "h2c" => Ok(AppProtocol::H2c),
            other => Err(format!("`{other}`: use http1 (default) or h2c")),
        }
    }
}

/// Upstream protocol.
#[derive(Debug, Default, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// HTTP/1.1 or h2c from the app, HTTP/2 over mTLS to the peer.
    #[default]
    Http,
    /// Raw bytes over mTLS (needs a dedicated `listen`).
    Tcp,
}

/// One upstream in the file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamFile {
    /// Name, for logs and metrics.
    pub name: String,
    /// Dedicated local port.
    pub listen: Option<SocketAddr>,
    /// Host names routed on the shared outbound port.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Peer sidecar `host:port`.
    pub address: String,
    /// SPIFFE ID the peer must present.
    pub identity: String,
    /// `http` (default) or `tcp`.
    #[serde(default)]
    pub protocol: Protocol,
}

/// `outbound` in the file.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutboundFile {
    /// Shared, Host-routed listener.
    pub listen: Option<SocketAddr>,
    /// Upstreams.
    #[serde(default)]
    pub upstreams: Vec<UpstreamFile>,
    /// Convention route for hosts no upstream lists.
    pub default_route: Option<DefaultRouteFile>,
    /// How long a peer name's addresses from the system resolver are reused.
    #[serde(default, with = "humantime_serde")]
    pub resolve_ttl: Option<Duration>,
}

/// `workload_api` in the file: the SPIFFE Workload API on a Unix socket.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadApiFile {
    /// The socket's path; its directory must exist.
    pub socket: Option<PathBuf>,
}

/// The whole YAML file.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SidecarFile {
    /// Trust domain.
    pub trust_domain: Option<String>,
    /// Where the SVID comes from.
    #[serde(default)]
    pub identity: IdentityFile,
    /// Peer → app.
    #[serde(default)]
    pub inbound: InboundFile,
    /// App → peer.
    #[serde(default)]
    pub outbound: OutboundFile,
    /// Admin HTTP listener.
    pub admin: Option<SocketAddr>,
    /// `tls13` (default) or `tls12+`.
    pub tls_policy: Option<String>,
    /// `pq-preferred` (default), `pq-only` or `classical`.
    pub tls_key_exchange: Option<KeyExchange>,
    /// Authorization policy: a YAML file, or a directory whose `*.yaml`/`*.yml` files are
    /// merged in name order; watched and hot-reloaded. Absent: every authenticated peer of
    /// the trust domain may call anything.
    pub policy: Option<PathBuf>,
    /// How long SIGTERM waits for in-flight requests.
    #[serde(default, with = "humantime_serde")]
    pub drain_timeout: Option<Duration>,
    /// Connect timeout toward peers and the app.
    #[serde(default, with = "humantime_serde")]
    pub connect_timeout: Option<Duration>,
    /// Whole-request timeout (until response headers).
    #[serde(default, with = "humantime_serde")]
    pub request_timeout: Option<Duration>,
    /// `/ready` turns false this long before the SVID expires.
    #[serde(default, with = "humantime_serde")]
    pub expiry_margin: Option<Duration>,
    /// One log line per proxied request (default true).
    pub access_log: Option<bool>,
    /// Resource limits against hostile peers.
    #[serde(default)]
    pub limits: LimitsFile,
    /// The SPIFFE Workload API for SPIFFE-aware apps (off unless a socket is set).
    #[serde(default)]
    pub workload_api: WorkloadApiFile,
}

impl SidecarFile {
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
        serde_yaml_ng::from_str(text)
            .map_err(|e| ConfigError::parse(path, e.to_string(), limits::MOVED_KEYS))
    }
}

/// How the sidecar attests to the control plane.
#[derive(Clone)]
pub enum Credential {
    /// A Kubernetes token file, re-read on every connect (kubelet rotates it).
    TokenFile(PathBuf),
    /// A join token (used until the first SVID; then the SVID re-attests).
    JoinToken(zeroize::Zeroizing<String>),
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credential::TokenFile(p) => write!(f, "TokenFile({})", p.display()),
            Credential::JoinToken(_) => f.write_str("JoinToken(<redacted>)"),
        }
    }
}

/// Where the bundle that verifies the control plane comes from.
#[derive(Clone, PartialEq, Eq)]
pub enum ControlBundle {
    /// A PEM file (`control_bundle`, `--control-bundle`), read at start.
    File(PathBuf),
    /// PEM text (`control_bundle_pem`, `--control-bundle-pem`, `TRELLIS_CONTROL_BUNDLE_PEM`).
    Pem(String),
}

impl From<PathBuf> for ControlBundle {
    fn from(path: PathBuf) -> Self {
        ControlBundle::File(path)
    }
}

impl std::fmt::Debug for ControlBundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ControlBundle::File(p) => write!(f, "File({})", p.display()),
            // Public certificates, but long: a size is enough in a log line.
            ControlBundle::Pem(pem) => write!(f, "Pem({} bytes)", pem.len()),
        }
    }
}

/// SVIDs from the control plane.
#[derive(Debug, Clone)]
pub struct SdsSettings {
    /// `host:port` of the control plane.
    pub control_plane: String,
    /// Verifies the control plane (and is the initial trust bundle).
    pub control_bundle: ControlBundle,
    /// How to attest.
    pub credential: Credential,
    /// Refuse any other identity.
    pub expected_id: Option<SpiffeId>,
    /// Send a CSR (key made here) instead of accepting a key.
    pub csr: bool,
}

/// Where the SVID comes from.
#[derive(Debug, Clone)]
pub enum IdentitySource {
    /// The control plane.
    Sds(SdsSettings),
    /// PEM files, watched.
    Files(FilesFile),
}

/// A validated upstream.
#[derive(Debug, Clone)]
pub struct Upstream {
    /// Name.
    pub name: String,
    /// Dedicated listener, if any.
    pub listen: Option<SocketAddr>,
    /// Host names (lowercase, no port) on the shared listener.
    pub hosts: Vec<String>,
    /// Peer `host:port`.
    pub address: String,
    /// Required peer identity.
    pub identity: SpiffeId,
    /// HTTP or TCP.
    pub protocol: Protocol,
}

/// A validated `outbound.default_route`.
#[derive(Debug, Clone)]
pub struct DefaultRoute {
    /// Host templates, address and identity templates.
    pub templates: DefaultRouteFile,
    /// Peers (each with a pooled connection) kept at once.
    pub max_peers: usize,
}

/// Validated settings.
#[derive(Debug, Clone)]
pub struct SidecarSettings {
    /// Trust domain.
    pub trust_domain: TrustDomain,
    /// Identity source.
    pub identity: IdentitySource,
    /// mTLS HTTP listener.
    pub inbound_listen: SocketAddr,
    /// The local app.
    pub app: SocketAddr,
    /// Raw TCP inbound forwards.
    pub inbound_tcp: Vec<TcpForward>,
    /// What reaches the app of request headers with `_` in their names.
    pub headers_with_underscores: UnderscoreHeaders,
    /// HTTP/1.1 or h2c to the app.
    pub app_protocol: AppProtocol,
    /// Shared outbound listener.
    pub outbound_listen: SocketAddr,
    /// Upstreams.
    pub upstreams: Vec<Upstream>,
    /// Convention route for hosts no upstream lists (`None`: such hosts get `404`).
    pub default_route: Option<DefaultRoute>,
    /// How long resolved peer names are reused (the system resolver gives no TTL).
    pub resolve_ttl: Duration,
    /// Admin listener.
    pub admin: SocketAddr,
    /// TLS versions.
    pub tls_policy: TlsPolicy,
    /// Key-exchange groups of every TLS endpoint (the binary installs them process-wide).
    pub tls_key_exchange: KeyExchange,
    /// SIGTERM drain bound.
    pub drain_timeout: Duration,
    /// Connect timeout.
    pub connect_timeout: Duration,
    /// Request timeout (until response headers).
    pub request_timeout: Duration,
    /// `/ready` false this long before expiry.
    pub expiry_margin: Duration,
    /// Authorization policy file or directory (`None`: every authenticated peer of the
    /// trust domain is allowed, see [`crate::policy`]).
    pub policy: Option<PathBuf>,
    /// Log one line per proxied request (`tracing` target `trellis::access`, INFO).
    pub access_log: bool,
    /// Resource limits against hostile peers.
    pub limits: Limits,
    /// Where to serve the SPIFFE Workload API (`None`: not served).
    pub workload_api_socket: Option<PathBuf>,
    /// The threads that serve connections (`--worker-threads`; not in the file): the embedder
    /// starts them, every listener spreads its connections over them, and each keeps its own
    /// pooled connections. Default: one, the embedder's runtime.
    pub workers: trellis_serve::Workers,
}

/// Defaults.
pub mod defaults {
    use std::time::Duration;
    /// `inbound.listen`.
    pub const INBOUND: &str = "0.0.0.0:15443";
    /// `inbound.app`.
    pub const APP: &str = "127.0.0.1:8080";
    /// `outbound.listen`.
    pub const OUTBOUND: &str = "127.0.0.1:15001";
    /// `admin`.
    pub const ADMIN: &str = "127.0.0.1:15000";
    /// `drain_timeout`.
    pub const DRAIN: Duration = Duration::from_secs(15);
    /// `connect_timeout`.
    pub const CONNECT: Duration = Duration::from_secs(5);
    /// `request_timeout`.
    pub const REQUEST: Duration = Duration::from_secs(30);
    /// `expiry_margin`.
    pub const EXPIRY_MARGIN: Duration = Duration::from_secs(300);
    /// `access_log`.
    pub const ACCESS_LOG: bool = true;
    /// `outbound.resolve_ttl`.
    pub const RESOLVE_TTL: Duration = Duration::from_secs(10);
    /// `outbound.resolve_ttl` bounds: below, every new connection asks the resolver anyway;
    /// above, a Service moved to new addresses stays unreachable too long.
    pub const RESOLVE_TTL_RANGE: (Duration, Duration) =
        (Duration::from_secs(1), Duration::from_secs(300));
    /// `outbound.default_route.max_peers`.
    pub const MAX_PEERS: usize = 1024;
}

fn addr(field: &str, v: Option<SocketAddr>, default: &str) -> Result<SocketAddr, ConfigError> {
    match v {
        Some(a) => Ok(a),
        None => default.parse().map_err(|e| invalid(field, format!("{e}"))),
    }
}

impl SidecarSettings {
    /// Validates a merged file.
    pub fn from_file(f: SidecarFile) -> Result<Self, ConfigError> {
        let td = f.trust_domain.ok_or_else(|| {
            invalid(
                "trust_domain",
                "missing: pass --trust-domain example.org or set trust_domain",
            )
        })?;
        let trust_domain =
            TrustDomain::parse(&td).map_err(|e| invalid("trust_domain", e.to_string()))?;
        let identity = match (f.identity.sds, f.identity.files) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "identity",
                    "set either identity.sds or identity.files, not both",
                ))
            }
            (None, Some(files)) => IdentitySource::Files(files),
            (Some(s), None) => {
                let credential = match (s.token_file, s.join_token) {
                    (Some(p), None) => Credential::TokenFile(p),
                    (None, Some(t)) => Credential::JoinToken(zeroize::Zeroizing::new(t)),
                    _ => {
                        return Err(invalid(
                            "identity.sds",
                            "set exactly one of token_file (Kubernetes) or join_token (`trellis token create`)",
                        ))
                    }
                };
                let expected_id = match s.spiffe_id {
                    Some(id) => {
                        let id = SpiffeId::parse(&id)
                            .map_err(|e| invalid("identity.sds.spiffe_id", e.to_string()))?;
                        if !id.is_member_of(&trust_domain) {
                            return Err(invalid(
                                "identity.sds.spiffe_id",
                                format!("`{id}` is not in trust domain `{trust_domain}`"),
                            ));
                        }
                        Some(id)
                    }
                    None => None,
                };
                IdentitySource::Sds(SdsSettings {
                    control_plane: s.control_plane.ok_or_else(|| {
                        invalid(
                            "identity.sds.control_plane",
                            "missing: the control plane's SDS host:port",
                        )
                    })?,
                    control_bundle: match (s.control_bundle, s.control_bundle_pem) {
                        (Some(path), None) => ControlBundle::File(path),
                        (None, Some(pem)) => ControlBundle::Pem(pem),
                        (None, None) => {
                            return Err(invalid(
                                "identity.sds.control_bundle",
                                "missing: the control plane's bundle.pem (from its state dir), \
                                 or its PEM text in control_bundle_pem (TRELLIS_CONTROL_BUNDLE_PEM)",
                            ))
                        }
                        (Some(_), Some(_)) => {
                            return Err(invalid(
                                "identity.sds.control_bundle",
                                "set exactly one of control_bundle (a path) or \
                                 control_bundle_pem (the PEM text), not both",
                            ))
                        }
                    },
                    credential,
                    expected_id,
                    csr: s.csr.unwrap_or(true),
                })
            }
            (None, None) => {
                return Err(invalid(
                    "identity",
                    "missing: set identity.sds (control plane) or identity.files (PEM files)",
                ))
            }
        };
        let mut upstreams = Vec::with_capacity(f.outbound.upstreams.len());
        let mut seen_hosts = std::collections::HashSet::new();
        for (i, u) in f.outbound.upstreams.into_iter().enumerate() {
            let field = format!("outbound.upstreams[{i}] ({})", u.name);
            let identity = SpiffeId::parse(&u.identity)
                .map_err(|e| invalid(format!("{field}.identity"), e.to_string()))?;
            // A foreign trust domain is allowed (SPIFFE federation): the handshake checks the
            // upstream against its own domain's bundle, and refuses it if none was federated.
            if u.listen.is_none() && u.hosts.is_empty() {
                return Err(invalid(
                    field,
                    "give it a dedicated `listen` port or `hosts` routed on outbound.listen",
                ));
            }
            if u.protocol == Protocol::Tcp && u.listen.is_none() {
                return Err(invalid(
                    field,
                    "protocol tcp needs a dedicated `listen` port (TCP has no Host header)",
                ));
            }
            if !u.address.contains(':') {
                return Err(invalid(
                    format!("{field}.address"),
                    format!("`{}` must be host:port", u.address),
                ));
            }
            let hosts: Vec<String> = u.hosts.iter().map(|h| h.to_ascii_lowercase()).collect();
            for h in &hosts {
                if !seen_hosts.insert(h.clone()) {
                    return Err(invalid(
                        format!("{field}.hosts"),
                        format!("host `{h}` is routed to two upstreams"),
                    ));
                }
            }
            upstreams.push(Upstream {
                name: u.name,
                listen: u.listen,
                hosts,
                address: u.address,
                identity,
                protocol: u.protocol,
            });
        }
        let default_route = match f.outbound.default_route {
            Some(templates) => Some(default_route(templates, &trust_domain)?),
            None => None,
        };
        let (lo, hi) = defaults::RESOLVE_TTL_RANGE;
        let resolve_ttl: Duration = trellis_serve::config::within(
            "outbound.resolve_ttl",
            f.outbound.resolve_ttl.map(humantime::Duration::from),
            defaults::RESOLVE_TTL.into(),
            lo.into(),
            hi.into(),
        )?
        .into();
        let tls_policy = match f.tls_policy.as_deref() {
            None | Some("tls13") => TlsPolicy::Tls13,
            Some("tls12+") => TlsPolicy::Tls12Plus,
            Some(other) => {
                return Err(invalid(
                    "tls_policy",
                    format!("`{other}`: use tls13 (default) or tls12+"),
                ))
            }
        };
        Ok(Self {
            trust_domain,
            identity,
            inbound_listen: addr("inbound.listen", f.inbound.listen, defaults::INBOUND)?,
            app: addr("inbound.app", f.inbound.app, defaults::APP)?,
            inbound_tcp: f.inbound.tcp,
            headers_with_underscores: f.inbound.headers_with_underscores.unwrap_or_default(),
            app_protocol: f.inbound.app_protocol.unwrap_or_default(),
            outbound_listen: addr("outbound.listen", f.outbound.listen, defaults::OUTBOUND)?,
            upstreams,
            default_route,
            resolve_ttl,
            admin: addr("admin", f.admin, defaults::ADMIN)?,
            tls_policy,
            tls_key_exchange: f.tls_key_exchange.unwrap_or_default(),
            drain_timeout: f.drain_timeout.unwrap_or(defaults::DRAIN),
            connect_timeout: f.connect_timeout.unwrap_or(defaults::CONNECT),
            request_timeout: f.request_timeout.unwrap_or(defaults::REQUEST),
            expiry_margin: f.expiry_margin.unwrap_or(defaults::EXPIRY_MARGIN),
            policy: f.policy,
            access_log: f.access_log.unwrap_or(defaults::ACCESS_LOG),
            limits: Limits::from_file(&f.limits)?,
            workload_api_socket: match f.workload_api.socket {
                Some(p) if p.as_os_str().is_empty() => {
                    return Err(invalid(
                        "workload_api.socket",
                        "empty: give the socket's path, e.g. /run/spiffe/workload.sock",
                    ))
                }
                other => other,
            },
            workers: trellis_serve::Workers::single(),
        })
    }
}

/// Checks a one-line default route (`TRELLIS_DEFAULT_ROUTE`, see
/// [`DefaultRouteFile::parse_spec`]) for a sidecar of `trust_domain` exactly as that sidecar
/// will at start: templates, placeholders, the identity's trust domain, `max_peers`. The
/// control plane's injector runs it on its `sidecar_default_route` and on each pod's
/// `trellis.io/default-route`, so a mistake is refused once, not in every pod.
pub fn check_default_route(spec: &str, trust_domain: &str) -> Result<(), String> {
    let td = TrustDomain::parse(trust_domain).map_err(|e| format!("trust domain: {e}"))?;
    let templates = DefaultRouteFile::parse_spec(spec)?;
    default_route(templates, &td)
        .map(drop)
        .map_err(|e| match e {
            // `identity: …` rather than a file path the one-line form does not have.
            ConfigError::Invalid { field, problem } => {
                let key = field
                    .strip_prefix("outbound.default_route.")
                    .unwrap_or(&field);
                format!("{key}: {problem}")
            }
            other => other.to_string(),
        })
}

/// The identity template must give a SPIFFE ID of our trust domain for any host it matches:
/// checked by expanding it with sample values.
fn default_route(
    templates: DefaultRouteFile,
    trust_domain: &TrustDomain,
) -> Result<DefaultRoute, ConfigError> {
    let sample = route::Bound {
        service: "service",
        namespace: Some("namespace"),
    };
    let id = templates.identity.expand(sample, trust_domain.as_str());
    let parsed = SpiffeId::parse(&id).map_err(|e| {
        invalid(
            "outbound.default_route.identity",
            format!("`{}` gives `{id}`: {e}", templates.identity),
        )
    })?;
    if !parsed.is_member_of(trust_domain) {
        return Err(invalid(
            "outbound.default_route.identity",
            format!(
                "`{}` gives `{id}`, not in trust domain `{trust_domain}` (use {{trust_domain}})",
                templates.identity
            ),
        ));
    }
    let max_peers = trellis_serve::config::within(
        "outbound.default_route.max_peers",
        templates.max_peers,
        defaults::MAX_PEERS,
        1,
        65_536,
    )?;
    Ok(DefaultRoute {
        templates,
        max_peers,
    })
}

/// Fuzzing entry point (`fuzz/fuzz_targets/sidecar_config.rs`, run on stable by
/// `tests/fuzz_bodies.rs`): YAML text → [`SidecarFile::parse`] → [`SidecarSettings::from_file`]
/// must not panic, and every refusal names the file. Not API.
#[doc(hidden)]
pub fn fuzz_config(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let path = Path::new("fuzz.yaml");
    let file = match SidecarFile::parse(&text, path) {
        Ok(f) => f,
        Err(e) => {
            assert!(e.to_string().contains("fuzz.yaml"), "{e}");
            return;
        }
    };
    let _ = SidecarSettings::from_file(file).map_err(|e| e.to_string());
}

#[cfg(test)]
mod tests;
