//! `limits:` in the sidecar's config file: what one hostile peer may cost, nested by what it
//! bounds (docs/security.md, "Hardening", says what happens when each is exceeded):
//!
//! ```yaml
//! limits:                          # every field optional
//!   http:                          # HTTP/1.1 and h2c requests on the inbound and outbound listeners
//!     max_header_bytes: 65536      # request line + headers → 431
//!     max_headers: 100             # header count → 431
//!     max_uri_bytes: 8192          # request target → 414
//!     header_read_timeout: 10s     # request head, from its first byte (slowloris)
//!     idle_timeout: 60s            # no bytes either way (HTTP/1.1, h2c from apps), no open stream (inbound HTTP/2)
//!   h2:                            # HTTP/2 toward and from peers, h2c from apps
//!     max_concurrent_streams: 1024
//!     max_header_list_bytes: 65536
//!     max_pending_accept_reset_streams: 1024 # rapid reset → GOAWAY; default: max_concurrent_streams
//!     max_local_error_reset_streams: 1024    # streams reset for peer errors → same
//!     max_concurrent_reset_streams: 10       # reset streams remembered at once
//!     keepalive_interval: 5s       # PING on each pooled upstream HTTP/2 connection, idle or not
//!     keepalive_timeout: 5s        # unanswered PING → closed, its requests 503, replaced
//!     stream_idle_timeout: 5m      # inbound response body moving no data → stream reset
//!   inbound:
//!     max_connections: 4096        # per listener (TCP forwards too); excess closed at once
//!     handshake_timeout: 10s       # inbound mTLS handshake
//!   outbound:
//!     max_connections: 1024        # per listener
//!   admin:
//!     max_connections: 64
//!     max_header_bytes: 8192       # request head → 431
//!     max_headers: 32              # header count → 431
//!     header_read_timeout: 10s     # request head (slowloris)
//!     idle_timeout: 60s            # connection moving no byte
//! ```
//!
//! The flags and `TRELLIS_*` variables kept their flat names (`--max-header-bytes`,
//! `--admin-max-connections`, …); the keys that were flat under `limits:` before are in
//! [`MOVED_KEYS`], so an old file is told where each went.

use std::time::Duration;

use serde::Deserialize;
use trellis_serve::config::ConfigError;
use trellis_serve::http::ServerLimits;

/// Keys that used to sit flat under `limits:`, and where they are now.
pub const MOVED_KEYS: &[(&str, &str)] = &[
    ("max_header_bytes", "limits.http.max_header_bytes"),
    ("max_headers", "limits.http.max_headers"),
    ("max_uri_bytes", "limits.http.max_uri_bytes"),
    ("header_read_timeout", "limits.http.header_read_timeout"),
    ("idle_timeout", "limits.http.idle_timeout"),
    (
        "h2_max_concurrent_streams",
        "limits.h2.max_concurrent_streams",
    ),
    (
        "h2_max_header_list_bytes",
        "limits.h2.max_header_list_bytes",
    ),
    (
        "h2_max_pending_accept_reset_streams",
        "limits.h2.max_pending_accept_reset_streams",
    ),
    (
        "h2_max_local_error_reset_streams",
        "limits.h2.max_local_error_reset_streams",
    ),
    (
        "h2_max_concurrent_reset_streams",
        "limits.h2.max_concurrent_reset_streams",
    ),
    ("h2_keepalive_interval", "limits.h2.keepalive_interval"),
    ("h2_keepalive_timeout", "limits.h2.keepalive_timeout"),
    ("max_connections_inbound", "limits.inbound.max_connections"),
    ("handshake_timeout", "limits.inbound.handshake_timeout"),
    (
        "max_connections_outbound",
        "limits.outbound.max_connections",
    ),
    ("admin_max_connections", "limits.admin.max_connections"),
    ("admin_max_header_bytes", "limits.admin.max_header_bytes"),
    ("admin_max_headers", "limits.admin.max_headers"),
    (
        "admin_header_read_timeout",
        "limits.admin.header_read_timeout",
    ),
    ("admin_idle_timeout", "limits.admin.idle_timeout"),
];

/// `limits.http` in the file.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpLimitsFile {
    /// HTTP/1.1 request line plus header section, bytes.
    pub max_header_bytes: Option<usize>,
    /// HTTP/1.1 header lines per request.
    pub max_headers: Option<usize>,
    /// Request target (path and query, or absolute form), bytes.
    pub max_uri_bytes: Option<usize>,
    /// Bound on receiving one HTTP/1.1 request head.
    #[serde(default, with = "humantime_serde")]
    pub header_read_timeout: Option<Duration>,
    /// An HTTP connection with nothing to do for this long is closed.
    #[serde(default, with = "humantime_serde")]
    pub idle_timeout: Option<Duration>,
}

/// `limits.h2` in the file.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct H2LimitsFile {
    /// Streams a peer may have open at once on one HTTP/2 connection.
    pub max_concurrent_streams: Option<u32>,
    /// Decoded HTTP/2 header list (RFC 9113 `SETTINGS_MAX_HEADER_LIST_SIZE`), bytes.
    pub max_header_list_bytes: Option<u32>,
    /// HTTP/2 streams a peer may open and reset before they were accepted (rapid reset).
    pub max_pending_accept_reset_streams: Option<usize>,
    /// HTTP/2 streams the server may reset for the peer's protocol errors.
    pub max_local_error_reset_streams: Option<usize>,
    /// Locally reset HTTP/2 streams remembered at once (their late frames are ignored).
    pub max_concurrent_reset_streams: Option<usize>,
    /// PING interval on each pooled HTTP/2 connection to an upstream sidecar.
    #[serde(default, with = "humantime_serde")]
    pub keepalive_interval: Option<Duration>,
    /// How long such a PING may go unanswered.
    #[serde(default, with = "humantime_serde")]
    pub keepalive_timeout: Option<Duration>,
    /// An inbound HTTP/2 response body that moves no data for this long is reset.
    #[serde(default, with = "humantime_serde")]
    pub stream_idle_timeout: Option<Duration>,
}

/// `limits.inbound` in the file.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InboundLimitsFile {
    /// Open connections on the inbound listener (and on each inbound TCP forward).
    pub max_connections: Option<usize>,
    /// Inbound mTLS handshake bound.
    #[serde(default, with = "humantime_serde")]
    pub handshake_timeout: Option<Duration>,
}

/// `limits.outbound` in the file.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutboundLimitsFile {
    /// Open connections on each outbound listener.
    pub max_connections: Option<usize>,
}

/// `limits.admin` in the file.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminLimitsFile {
    /// Open connections on the admin listener.
    pub max_connections: Option<usize>,
    /// Admin request line plus header section, bytes.
    pub max_header_bytes: Option<usize>,
    /// Header lines per admin request.
    pub max_headers: Option<usize>,
    /// Bound on receiving one admin request head.
    #[serde(default, with = "humantime_serde")]
    pub header_read_timeout: Option<Duration>,
    /// An admin connection moving no byte for this long is closed.
    #[serde(default, with = "humantime_serde")]
    pub idle_timeout: Option<Duration>,
}

/// `limits` in the file. Absent fields take [`Limits`]'s defaults.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsFile {
    /// HTTP/1.1 requests on both proxies.
    #[serde(default)]
    pub http: HttpLimitsFile,
    /// HTTP/2 on both proxies.
    #[serde(default)]
    pub h2: H2LimitsFile,
    /// The inbound listeners.
    #[serde(default)]
    pub inbound: InboundLimitsFile,
    /// The outbound listeners.
    #[serde(default)]
    pub outbound: OutboundLimitsFile,
    /// The admin listener.
    #[serde(default)]
    pub admin: AdminLimitsFile,
}

/// HTTP/1.1 (and h2c) requests on the inbound and outbound listeners.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    /// Request line plus header section, bytes: over it, `431` and close.
    pub max_header_bytes: usize,
    /// Header lines: over it, `431` and close.
    pub max_headers: usize,
    /// Request target bytes: over it, `414` (HTTP/1.1: and close).
    pub max_uri_bytes: usize,
    /// Request head bound from its first byte until it is complete (`RequestFraming`); the
    /// wait between keep-alive requests is bounded by `idle_timeout`.
    pub header_read_timeout: Duration,
    /// HTTP/1.1 and h2c from apps: no bytes either way; inbound HTTP/2: no open stream; for
    /// this long → closed gracefully.
    pub idle_timeout: Duration,
}

/// HTTP/2 on the inbound listener, the app-facing h2c listener and the pooled client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct H2Limits {
    /// `SETTINGS_MAX_CONCURRENT_STREAMS`: more are refused with `REFUSED_STREAM`.
    pub max_concurrent_streams: u32,
    /// `SETTINGS_MAX_HEADER_LIST_SIZE` on both servers and on the pooled client toward peers
    /// (their responses); also bounds a CONTINUATION sequence.
    pub max_header_list_bytes: u32,
    /// Streams a peer may open and reset before the server accepted them (the HTTP/2
    /// rapid-reset attack, CVE-2023-44487): past it, GOAWAY `ENHANCE_YOUR_CALM`. Unset in the
    /// file, it is `max_concurrent_streams`, so that a caller cancelling all it has in flight
    /// does not end the connection for everyone else on it.
    pub max_pending_accept_reset_streams: usize,
    /// Streams the server may reset because of the peer's protocol errors before it ends the
    /// connection with GOAWAY `ENHANCE_YOUR_CALM` ("MadeYouReset", CVE-2025-8671).
    pub max_local_error_reset_streams: usize,
    /// Locally reset streams remembered (to ignore their late frames) at once; bounds the
    /// memory a reset flood can pin.
    pub max_concurrent_reset_streams: usize,
    /// PING interval on the pooled upstream HTTP/2 connection (finds a dead peer without
    /// waiting for a request to fail).
    pub keepalive_interval: Duration,
    /// How long a PING may go unanswered before the pooled connection is replaced.
    pub keepalive_timeout: Duration,
    /// An inbound HTTP/2 stream whose response body (from the app) or whose reader (the peer)
    /// moves no data for this long is reset with `CANCEL` and counted: an app that sent its
    /// head and stalled holds neither the stream nor its app connection forever.
    pub stream_idle_timeout: Duration,
}

/// The inbound mTLS listener and the inbound TCP forwards (each).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InboundLimits {
    /// Connections past it are accepted and closed at once.
    pub max_connections: usize,
    /// mTLS handshake bound (including, right after a start, the wait for the first SVID).
    pub handshake_timeout: Duration,
}

/// Each outbound listener (shared, dedicated, TCP).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutboundLimits {
    /// Connections past it are accepted and closed at once.
    pub max_connections: usize,
}

/// The admin listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdminLimits {
    /// Connections past it are accepted and closed at once.
    pub max_connections: usize,
    /// Request line plus headers, bytes (also the HTTP/2 header list): over it, `431`.
    pub max_header_bytes: usize,
    /// Header lines per request: over it, `431`.
    pub max_headers: usize,
    /// Protocol detection and request head bound (slowloris).
    pub header_read_timeout: Duration,
    /// A connection that moves no byte for this long is closed (an in-flight request still
    /// finishes).
    pub idle_timeout: Duration,
}

/// Validated limits, by what they bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// `limits.http`.
    pub http: HttpLimits,
    /// `limits.h2`.
    pub h2: H2Limits,
    /// `limits.inbound`.
    pub inbound: InboundLimits,
    /// `limits.outbound`.
    pub outbound: OutboundLimits,
    /// `limits.admin`.
    pub admin: AdminLimits,
}

/// Streams an HTTP/2 admin client may have open at once: probes and scrapers send one at a
/// time.
const ADMIN_MAX_STREAMS: u32 = 16;

impl Default for Limits {
    fn default() -> Self {
        Self {
            http: HttpLimits {
                max_header_bytes: 64 << 10,
                max_headers: 100,
                max_uri_bytes: 8 << 10,
                header_read_timeout: Duration::from_secs(10),
                idle_timeout: Duration::from_secs(60),
            },
            h2: H2Limits {
                max_concurrent_streams: 1024,
                max_header_list_bytes: 64 << 10,
                // h2's defaults or tighter, written out so an h2 upgrade cannot loosen them.
                // As many as a peer may have open: a caller that goes away cancels every
                // request it has in flight at once, and on a busy connection those streams
                // can all still be waiting to be accepted. At h2's 20, one such caller (an
                // h2load run ending with 64 requests in flight per connection) made the
                // inbound end the pooled connection and fail every other caller's requests on
                // it. The flood stays bounded, and each stream costs only its HPACK decode.
                // `from_file` keeps it equal to a `max_concurrent_streams` set alone.
                max_pending_accept_reset_streams: 1024,
                max_local_error_reset_streams: 1024,
                max_concurrent_reset_streams: 10,
                // A path that drops packets is found 5-10 s after it broke, before a
                // request's 30 s timeout (docs/configuration.md, "Dead peers").
                keepalive_interval: Duration::from_secs(5),
                keepalive_timeout: Duration::from_secs(5),
                // Envoy's `stream_idle_timeout` default: long enough for watch streams and
                // long polls that are quiet for minutes.
                stream_idle_timeout: Duration::from_secs(300),
            },
            inbound: InboundLimits {
                max_connections: 4096,
                handshake_timeout: Duration::from_secs(10),
            },
            outbound: OutboundLimits {
                max_connections: 1024,
            },
            // Scrapers, probes and operators need a handful; admin requests are small.
            admin: AdminLimits {
                max_connections: 64,
                max_header_bytes: 8 << 10,
                max_headers: 32,
                header_read_timeout: Duration::from_secs(10),
                idle_timeout: Duration::from_secs(60),
            },
        }
    }
}

/// `field` (a path under `limits.`) must be in `lo..=hi`.
fn range(field: &str, v: usize, lo: usize, hi: usize) -> Result<(), ConfigError> {
    if (lo..=hi).contains(&v) {
        Ok(())
    } else {
        Err(ConfigError::invalid(
            format!("limits.{field}"),
            format!("{v} is out of range: use {lo} to {hi}"),
        ))
    }
}

impl Limits {
    /// hyper's HTTP/1.1 read buffer (~400 KiB) is the hard ceiling for a header section; its
    /// floor (8 KiB, hyper's smallest buffer: it panics below) is the floor here too, for
    /// `http.max_header_bytes` and `admin.max_header_bytes` alike.
    pub const MAX_HEADER_BYTES_CEILING: usize = 256 << 10;
    /// Most header lines `http.max_headers` and `admin.max_headers` may allow.
    pub const MAX_HEADERS_CEILING: usize = 1000;

    /// Applies `f` over the defaults and checks ranges; errors name the nested field.
    pub fn from_file(f: &LimitsFile) -> Result<Self, ConfigError> {
        let d = Self::default();
        let streams =
            f.h2.max_concurrent_streams
                .unwrap_or(d.h2.max_concurrent_streams);
        let l = Self {
            http: HttpLimits {
                max_header_bytes: f.http.max_header_bytes.unwrap_or(d.http.max_header_bytes),
                max_headers: f.http.max_headers.unwrap_or(d.http.max_headers),
                max_uri_bytes: f.http.max_uri_bytes.unwrap_or(d.http.max_uri_bytes),
                header_read_timeout: f
                    .http
                    .header_read_timeout
                    .unwrap_or(d.http.header_read_timeout),
                idle_timeout: f.http.idle_timeout.unwrap_or(d.http.idle_timeout),
            },
            h2: H2Limits {
                max_concurrent_streams: streams,
                max_header_list_bytes: f
                    .h2
                    .max_header_list_bytes
                    .unwrap_or(d.h2.max_header_list_bytes),
                // Unset, it follows the streams a peer may have open: a caller that cancels
                // all it has in flight (it went away, a fan-out was abandoned) must not end
                // the connection other callers share, whatever the stream limit is.
                max_pending_accept_reset_streams: f
                    .h2
                    .max_pending_accept_reset_streams
                    .unwrap_or(streams as usize),
                max_local_error_reset_streams: f
                    .h2
                    .max_local_error_reset_streams
                    .unwrap_or(d.h2.max_local_error_reset_streams),
                max_concurrent_reset_streams: f
                    .h2
                    .max_concurrent_reset_streams
                    .unwrap_or(d.h2.max_concurrent_reset_streams),
                keepalive_interval: f.h2.keepalive_interval.unwrap_or(d.h2.keepalive_interval),
                keepalive_timeout: f.h2.keepalive_timeout.unwrap_or(d.h2.keepalive_timeout),
                stream_idle_timeout: f.h2.stream_idle_timeout.unwrap_or(d.h2.stream_idle_timeout),
            },
            inbound: InboundLimits {
                max_connections: f
                    .inbound
                    .max_connections
                    .unwrap_or(d.inbound.max_connections),
                handshake_timeout: f
                    .inbound
                    .handshake_timeout
                    .unwrap_or(d.inbound.handshake_timeout),
            },
            outbound: OutboundLimits {
                max_connections: f
                    .outbound
                    .max_connections
                    .unwrap_or(d.outbound.max_connections),
            },
            admin: AdminLimits {
                max_connections: f.admin.max_connections.unwrap_or(d.admin.max_connections),
                max_header_bytes: f.admin.max_header_bytes.unwrap_or(d.admin.max_header_bytes),
                max_headers: f.admin.max_headers.unwrap_or(d.admin.max_headers),
                header_read_timeout: f
                    .admin
                    .header_read_timeout
                    .unwrap_or(d.admin.header_read_timeout),
                idle_timeout: f.admin.idle_timeout.unwrap_or(d.admin.idle_timeout),
            },
        };
        l.check()?;
        Ok(l)
    }

    fn check(&self) -> Result<(), ConfigError> {
        let (http, h2, admin) = (&self.http, &self.h2, &self.admin);
        range(
            "http.max_header_bytes",
            http.max_header_bytes,
            8 << 10,
            Self::MAX_HEADER_BYTES_CEILING,
        )?;
        range(
            "http.max_headers",
            http.max_headers,
            1,
            Self::MAX_HEADERS_CEILING,
        )?;
        range(
            "http.max_uri_bytes",
            http.max_uri_bytes,
            16,
            http.max_header_bytes,
        )?;
        range(
            "h2.max_concurrent_streams",
            h2.max_concurrent_streams as usize,
            1,
            1 << 16,
        )?;
        range(
            "h2.max_header_list_bytes",
            h2.max_header_list_bytes as usize,
            1024,
            16 << 20,
        )?;
        range(
            "inbound.max_connections",
            self.inbound.max_connections,
            1,
            1 << 20,
        )?;
        range(
            "outbound.max_connections",
            self.outbound.max_connections,
            1,
            1 << 20,
        )?;
        // The reset bounds are the rapid-reset defence: a ceiling keeps a typo from switching
        // it off, and zero would end a connection on the first cancelled request.
        range(
            "h2.max_pending_accept_reset_streams",
            h2.max_pending_accept_reset_streams,
            1,
            1 << 16,
        )?;
        range(
            "h2.max_local_error_reset_streams",
            h2.max_local_error_reset_streams,
            1,
            1 << 16,
        )?;
        range(
            "h2.max_concurrent_reset_streams",
            h2.max_concurrent_reset_streams,
            1,
            1 << 16,
        )?;
        range("admin.max_connections", admin.max_connections, 1, 1 << 16)?;
        range(
            "admin.max_header_bytes",
            admin.max_header_bytes,
            8 << 10,
            Self::MAX_HEADER_BYTES_CEILING,
        )?;
        range(
            "admin.max_headers",
            admin.max_headers,
            1,
            Self::MAX_HEADERS_CEILING,
        )?;
        for (field, v) in [
            ("inbound.handshake_timeout", self.inbound.handshake_timeout),
            ("http.header_read_timeout", http.header_read_timeout),
            ("http.idle_timeout", http.idle_timeout),
            ("h2.keepalive_interval", h2.keepalive_interval),
            ("h2.keepalive_timeout", h2.keepalive_timeout),
            ("h2.stream_idle_timeout", h2.stream_idle_timeout),
            ("admin.header_read_timeout", admin.header_read_timeout),
            ("admin.idle_timeout", admin.idle_timeout),
        ] {
            if v < Duration::from_millis(10) {
                return Err(ConfigError::invalid(
                    format!("limits.{field}"),
                    "must be at least 10ms (a zero timeout would refuse every peer)",
                ));
            }
        }
        Ok(())
    }

    /// The admin server's connection limits: `limits.admin`, with the rapid-reset bounds of
    /// `limits.h2`. Admin requests are small, so the header bound also bounds the HTTP/2
    /// header list.
    pub fn admin_server(&self) -> ServerLimits {
        ServerLimits {
            header_read_timeout: self.admin.header_read_timeout,
            max_header_bytes: self.admin.max_header_bytes,
            max_headers: Some(self.admin.max_headers),
            idle_timeout: Some(self.admin.idle_timeout),
            max_streams_per_connection: ADMIN_MAX_STREAMS,
            max_pending_resets: self.h2.max_pending_accept_reset_streams,
            max_local_error_resets: Some(self.h2.max_local_error_reset_streams),
        }
    }
}
