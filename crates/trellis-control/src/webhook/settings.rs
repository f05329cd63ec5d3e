//! The injection webhook's settings, defaults and checks: where it listens, the names on its
//! certificate, what it injects, and `limits.webhook`. `crate::config` reads the file and
//! hands the values here.

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;
use trellis_serve::config::{at_least_one, bytes_within, deadline, ConfigError};
use trellis_serve::http::ServerLimits;

use super::inject::{no_proxy_entry_ok, DefaultRouteCheck, DEFAULT_ROUTE_SYNTAX};

/// Defaults of the webhook's settings.
pub mod defaults {
    use std::time::Duration;
    /// `--webhook-dns-name`: the `trellis-control` Service in `trellis-system`, the name the
    /// API server uses for a `service` webhook reference.
    pub const DNS_NAME: &str = "trellis-control.trellis-system.svc";
    /// `--sidecar-image`.
    pub const SIDECAR_IMAGE: &str = "ghcr.io/trellis-mesh/trellis:0.1.0";
    /// `--sidecar-control-plane`.
    pub const SIDECAR_CONTROL_PLANE: &str = "trellis-control.trellis-system.svc:8443";
    /// `--native-sidecar`: Kubernetes 1.29 turned native sidecars on by default, and every
    /// release still supported upstream has them.
    pub const NATIVE_SIDECAR: bool = true;
    /// `--webhook-max-connections`: the API servers call it, a handful at a time.
    pub const MAX_CONNECTIONS: usize = 256;
    /// `--webhook-max-header-bytes`: the API server sends a handful of short headers.
    pub const MAX_HEADER_BYTES: usize = 64 * 1024;
    /// `--webhook-max-body-bytes`: etcd stores objects of at most 1.5 MiB, so every pod that
    /// could ever be created fits, with room for the review around it.
    pub const MAX_BODY_BYTES: usize = 2 * 1024 * 1024;
    /// `--webhook-body-timeout`: the API server gives up after `timeoutSeconds` (5 s) anyway.
    pub const BODY_TIMEOUT: Duration = Duration::from_secs(10);
    /// `--webhook-header-read-timeout`.
    pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
    /// `--webhook-handshake-timeout`.
    pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
}

/// `limits.webhook` in the file.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookLimitsFile {
    /// Most webhook connections open at once.
    pub max_connections: Option<usize>,
    /// Largest webhook request head (and HTTP/1.1 read buffer), in bytes.
    pub max_header_bytes: Option<usize>,
    /// Largest AdmissionReview the webhook reads, in bytes.
    pub max_body_bytes: Option<usize>,
    /// How long a webhook request body may take to arrive, e.g. `10s`.
    #[serde(default, with = "humantime_serde")]
    pub body_timeout: Option<Duration>,
    /// How long a webhook client may take to send its request head, e.g. `10s`.
    #[serde(default, with = "humantime_serde")]
    pub header_read_timeout: Option<Duration>,
    /// How long a webhook client may take to finish its TLS handshake, e.g. `10s`.
    #[serde(default, with = "humantime_serde")]
    pub handshake_timeout: Option<Duration>,
}

/// What one webhook connection and request may hold (`limits.webhook`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WebhookLimits {
    /// Most connections open at once.
    pub max_connections: usize,
    /// Largest AdmissionReview body read.
    pub max_body_bytes: usize,
    /// Time for a whole request body to arrive.
    pub body_timeout: Duration,
    /// Time for the request head to arrive.
    pub header_read_timeout: Duration,
    /// Time for the TLS handshake.
    pub handshake_timeout: Duration,
    /// Largest request head (hyper's HTTP/1.1 read buffer): longer heads get `431`.
    pub max_header_bytes: usize,
}

impl Default for WebhookLimits {
    fn default() -> Self {
        Self {
            max_connections: defaults::MAX_CONNECTIONS,
            max_body_bytes: defaults::MAX_BODY_BYTES,
            body_timeout: defaults::BODY_TIMEOUT,
            header_read_timeout: defaults::HEADER_READ_TIMEOUT,
            handshake_timeout: defaults::HANDSHAKE_TIMEOUT,
            max_header_bytes: defaults::MAX_HEADER_BYTES,
        }
    }
}

impl WebhookLimits {
    /// Applies `f` over the defaults and checks ranges; errors name `limits.webhook.*`.
    pub fn from_file(f: &WebhookLimitsFile) -> Result<Self, ConfigError> {
        let d = Self::default();
        let min = Duration::from_millis(100);
        Ok(Self {
            max_connections: at_least_one(
                "limits.webhook.max_connections",
                f.max_connections,
                d.max_connections,
            )?,
            max_body_bytes: bytes_within(
                "limits.webhook.max_body_bytes",
                f.max_body_bytes,
                d.max_body_bytes,
                (4 * 1024, 64 * 1024 * 1024),
                "an AdmissionReview of a small pod is a few KiB; a large one up to 1.5 MiB",
            )?,
            body_timeout: deadline(
                "limits.webhook.body_timeout",
                f.body_timeout,
                d.body_timeout,
                min,
            )?,
            header_read_timeout: deadline(
                "limits.webhook.header_read_timeout",
                f.header_read_timeout,
                d.header_read_timeout,
                min,
            )?,
            handshake_timeout: deadline(
                "limits.webhook.handshake_timeout",
                f.handshake_timeout,
                d.handshake_timeout,
                min,
            )?,
            max_header_bytes: bytes_within(
                "limits.webhook.max_header_bytes",
                f.max_header_bytes,
                d.max_header_bytes,
                (8 * 1024, 1024 * 1024),
                "the HTTP/1.1 read buffer cannot be smaller than 8 KiB",
            )?,
        })
    }

    /// The HTTP server's connection limits: HTTP/1.1 only (reviews are single small
    /// requests), whose header timeout also bounds the wait between requests; no idle close.
    pub fn server(&self) -> ServerLimits {
        ServerLimits {
            header_read_timeout: self.header_read_timeout,
            max_header_bytes: self.max_header_bytes,
            max_headers: None,
            idle_timeout: None,
            // HTTP/2 is never negotiated (ALPN offers only http/1.1); these bound nothing.
            max_streams_per_connection: 1,
            max_pending_resets: 1,
            max_local_error_resets: None,
        }
    }
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
    /// Inject native sidecars (init containers with `restartPolicy: Always`) unless a pod
    /// says `trellis.io/native-sidecar: "false"`.
    pub native_sidecar: bool,
    /// `NO_PROXY` entries of every app container besides localhost and the pod itself.
    pub no_proxy: Vec<String>,
    /// `TRELLIS_DEFAULT_ROUTE` of injected sidecars unless a pod's `trellis.io/default-route`
    /// says otherwise; `None`: no convention route.
    pub sidecar_default_route: Option<String>,
    /// The sidecar's own check of a default route, set by [`Self::check_default_route`]
    /// (`None`: routes are passed on unchecked).
    pub default_route_check: Option<DefaultRouteCheck>,
    /// `limits.webhook`.
    pub limits: WebhookLimits,
}

/// The top-level webhook keys of the file, as given.
#[derive(Debug, Default, Clone)]
pub struct WebhookFields {
    /// `webhook_listen`.
    pub listen: Option<SocketAddr>,
    /// `webhook_dns_names`.
    pub dns_names: Option<Vec<String>>,
    /// `sidecar_image`.
    pub sidecar_image: Option<String>,
    /// `sidecar_control_plane`.
    pub sidecar_control_plane: Option<String>,
    /// `native_sidecar`.
    pub native_sidecar: Option<bool>,
    /// `no_proxy`.
    pub no_proxy: Option<Vec<String>>,
    /// `sidecar_default_route`.
    pub sidecar_default_route: Option<String>,
}

impl WebhookSettings {
    /// Validates the webhook settings; `None` unless `webhook_listen` is set (the other
    /// webhook fields alone are ignored, so one environment can serve replicas with and
    /// without the webhook).
    pub fn from_fields(
        f: WebhookFields,
        limits: WebhookLimits,
    ) -> Result<Option<Self>, ConfigError> {
        let Some(listen) = f.listen else {
            return Ok(None);
        };
        let (sidecar_image, sidecar_control_plane, native_sidecar) =
            Self::injection(f.sidecar_image, f.sidecar_control_plane, f.native_sidecar)?;
        let no_proxy = Self::no_proxy(f.no_proxy)?;
        let sidecar_default_route = Self::default_route(f.sidecar_default_route, None, "")?;
        let raw = f
            .dns_names
            .unwrap_or_else(|| vec![defaults::DNS_NAME.to_owned()]);
        let mut dns_names: Vec<String> = Vec::new();
        for name in raw.iter().map(|n| n.trim().to_ascii_lowercase()) {
            if name.is_empty() {
                continue;
            }
            // The API server verifies the certificate by DNS name (RFC 6125); an IP address or
            // a wildcard cannot name a Service.
            if name.contains('*') || rustls::pki_types::DnsName::try_from(name.as_str()).is_err() {
                return Err(ConfigError::invalid(
                    "webhook_dns_names",
                    format!(
                        "`{name}` is not a DNS name: use the webhook Service's name, e.g. {}",
                        defaults::DNS_NAME
                    ),
                ));
            }
            if !dns_names.contains(&name) {
                dns_names.push(name);
            }
        }
        if dns_names.is_empty() {
            return Err(ConfigError::invalid(
                "webhook_dns_names",
                format!("empty: give at least one, e.g. {}", defaults::DNS_NAME),
            ));
        }
        Ok(Some(WebhookSettings {
            listen,
            dns_names,
            sidecar_image,
            sidecar_control_plane,
            native_sidecar,
            no_proxy,
            sidecar_default_route,
            default_route_check: None,
            limits,
        }))
    }

    /// Checks `sidecar_default_route` for sidecars of `trust_domain` with `check` (the
    /// sidecar's own parser, which this crate does not import), and keeps `check` for the
    /// pods' `trellis.io/default-route`. The binary calls this before the webhook starts, so
    /// a bad template stops the control plane instead of every injected sidecar.
    pub fn check_default_route(
        &mut self,
        check: DefaultRouteCheck,
        trust_domain: &str,
    ) -> Result<(), ConfigError> {
        self.sidecar_default_route =
            Self::default_route(self.sidecar_default_route.take(), Some(check), trust_domain)?;
        self.default_route_check = Some(check);
        Ok(())
    }

    /// `sidecar_default_route` trimmed and, with `check`, checked as the sidecar will check
    /// its `TRELLIS_DEFAULT_ROUTE`; absent or empty: none. `trellis inject` takes the same
    /// path.
    pub fn default_route(
        route: Option<String>,
        check: Option<DefaultRouteCheck>,
        trust_domain: &str,
    ) -> Result<Option<String>, ConfigError> {
        let Some(route) = route.map(|r| r.trim().to_owned()).filter(|r| !r.is_empty()) else {
            return Ok(None);
        };
        if let Some(check) = check {
            check(&route, trust_domain).map_err(|e| {
                ConfigError::invalid(
                    "sidecar_default_route",
                    format!(
                        "`{route}`: {e} (expected {}, the sidecar's TRELLIS_DEFAULT_ROUTE syntax)",
                        DEFAULT_ROUTE_SYNTAX
                    ),
                )
            })?;
        }
        Ok(Some(route))
    }

    /// `no_proxy` checked: each entry a host, domain, address or CIDR (see
    /// [`no_proxy_entry_ok`]); absent: none beyond localhost and the pod itself.
    pub fn no_proxy(list: Option<Vec<String>>) -> Result<Vec<String>, ConfigError> {
        let mut out: Vec<String> = Vec::new();
        for entry in list.unwrap_or_default().iter().map(|e| e.trim()) {
            if !no_proxy_entry_ok(entry) {
                return Err(ConfigError::invalid(
                    "no_proxy",
                    format!(
                        "`{entry}` is not a host, domain, address or CIDR (letters, digits and . - _ : / * [ ]), e.g. [.internal.example.com, 10.0.0.0/8]"
                    ),
                ));
            }
            if !out.iter().any(|e| e == entry) {
                out.push(entry.to_owned());
            }
        }
        Ok(out)
    }

    /// What injection puts into pods (`sidecar_image`, `sidecar_control_plane`,
    /// `native_sidecar`), with the defaults applied and checked. `trellis inject` takes the
    /// same values through here, so the two cannot disagree.
    pub fn injection(
        sidecar_image: Option<String>,
        sidecar_control_plane: Option<String>,
        native_sidecar: Option<bool>,
    ) -> Result<(String, String, bool), ConfigError> {
        let sidecar_image = sidecar_image.unwrap_or_else(|| defaults::SIDECAR_IMAGE.to_owned());
        if sidecar_image.is_empty() || sidecar_image.chars().any(char::is_whitespace) {
            return Err(ConfigError::invalid(
                "sidecar_image",
                format!(
                    "`{sidecar_image}` is not an image reference, e.g. {}",
                    defaults::SIDECAR_IMAGE
                ),
            ));
        }
        let sidecar_control_plane =
            sidecar_control_plane.unwrap_or_else(|| defaults::SIDECAR_CONTROL_PLANE.to_owned());
        let host_port_ok = match sidecar_control_plane.rsplit_once(':') {
            Some((host, port)) => {
                !host.is_empty()
                    && !host.chars().any(char::is_whitespace)
                    && port.parse::<u16>().is_ok_and(|p| p != 0)
            }
            None => false,
        };
        if !host_port_ok {
            return Err(ConfigError::invalid(
                "sidecar_control_plane",
                format!(
                    "`{sidecar_control_plane}` must be host:port, e.g. {}",
                    defaults::SIDECAR_CONTROL_PLANE
                ),
            ));
        }
        Ok((
            sidecar_image,
            sidecar_control_plane,
            native_sidecar.unwrap_or(defaults::NATIVE_SIDECAR),
        ))
    }
}
