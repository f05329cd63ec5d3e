//! `limits.sds`: what SDS clients may hold or do (docs/security.md, "Hardening"), its defaults and
//! checks. `crate::config` reads the file and checks the one rule that spans two sections (the
//! header list must carry a `limits.k8s.max_jwt_bytes` JWT).

use std::time::Duration;

use serde::Deserialize;
use trellis_serve::config::{at_least_one, bytes_within, deadline, within, ConfigError};

use crate::ratelimit::RateLimit;

/// Defaults of `limits.sds`.
pub mod defaults {
    use std::time::Duration;
    /// `--sds-max-connections`: room for 10,000 streams (tests/bench/SCALE.md) on one
    /// connection each, twice over.
    pub const MAX_CONNECTIONS: usize = 20_000;
    /// `--sds-handshake-timeout`.
    pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
    /// `--sds-max-streams-per-connection`: a sidecar or Envoy opens one or two streams; the
    /// `sds_load` harness multiplexes 100 on one connection.
    pub const MAX_STREAMS_PER_CONNECTION: u32 = 128;
    /// `--sds-rate-limit`: stream opens per second per source IP.
    pub const RATE_LIMIT: f64 = 10.0;
    /// `--sds-rate-burst`.
    pub const RATE_BURST: u32 = 50;
    /// `--sds-max-message-bytes`: SDS requests are small (a node and a few resource names).
    pub const MAX_MESSAGE_BYTES: usize = 256 * 1024;
    /// `--sds-max-header-list-bytes`: room for a `limits.k8s.max_jwt_bytes` JWT in
    /// `authorization` and the gRPC headers. Larger lists are refused by the HTTP/2 layer
    /// before any handler runs, which also bounds CONTINUATION floods.
    pub const MAX_HEADER_LIST_BYTES: u32 = 16 * 1024;
    /// `--sds-max-pending-resets`: streams a client may reset before the server has accepted
    /// them (HTTP/2 rapid reset, CVE-2023-44487); past this the connection gets GOAWAY.
    pub const MAX_PENDING_RESETS: usize = 20;
}

/// `limits.sds` in the file.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SdsLimitsFile {
    /// Most SDS connections open at once (TLS handshakes included); more are closed on accept.
    pub max_connections: Option<usize>,
    /// How long an SDS client may take to finish its TLS handshake, e.g. `10s`.
    #[serde(default, with = "humantime_serde")]
    pub handshake_timeout: Option<Duration>,
    /// Most concurrent HTTP/2 streams (SDS calls) on one SDS connection.
    pub max_streams_per_connection: Option<u32>,
    /// SDS stream opens (attestations) per second allowed from one source IP; 0 turns it off.
    pub rate_limit: Option<f64>,
    /// How many SDS stream opens one source IP may make at once before the rate applies.
    pub rate_burst: Option<u32>,
    /// Rate-limit loopback peers too (they are exempt by default).
    pub rate_limit_loopback: Option<bool>,
    /// Largest SDS request message decoded, in bytes.
    pub max_message_bytes: Option<usize>,
    /// Largest HTTP/2 header list (HPACK-decoded) on an SDS connection, in bytes.
    pub max_header_list_bytes: Option<u32>,
    /// Streams an SDS client may reset before the server accepts them (HTTP/2 rapid reset).
    pub max_pending_resets: Option<usize>,
}

/// What SDS clients may hold or do.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SdsLimits {
    /// Most SDS connections (handshaking or open).
    pub max_connections: usize,
    /// TLS handshake deadline.
    pub handshake_timeout: Duration,
    /// HTTP/2 `SETTINGS_MAX_CONCURRENT_STREAMS`.
    pub max_streams_per_connection: u32,
    /// Per-source-IP rate of stream opens.
    pub rate: RateLimit,
    /// Largest request message decoded.
    pub max_message_bytes: usize,
    /// HTTP/2 `SETTINGS_MAX_HEADER_LIST_SIZE`.
    pub max_header_list_bytes: u32,
    /// Streams reset before accept that a connection may have pending (rapid reset).
    pub max_pending_resets: usize,
}

impl Default for SdsLimits {
    fn default() -> Self {
        Self {
            max_connections: defaults::MAX_CONNECTIONS,
            handshake_timeout: defaults::HANDSHAKE_TIMEOUT,
            max_streams_per_connection: defaults::MAX_STREAMS_PER_CONNECTION,
            rate: RateLimit::DEFAULT,
            max_message_bytes: defaults::MAX_MESSAGE_BYTES,
            max_header_list_bytes: defaults::MAX_HEADER_LIST_BYTES,
            max_pending_resets: defaults::MAX_PENDING_RESETS,
        }
    }
}

impl SdsLimits {
    /// Applies `f` over the defaults and checks ranges; errors name `limits.sds.*`.
    pub fn from_file(f: &SdsLimitsFile) -> Result<Self, ConfigError> {
        let per_second = f.rate_limit.unwrap_or(defaults::RATE_LIMIT);
        if !per_second.is_finite() || per_second < 0.0 {
            return Err(ConfigError::invalid(
                "limits.sds.rate_limit",
                format!(
                    "{per_second} is not a rate: give stream opens per second, or 0 for no limit"
                ),
            ));
        }
        let burst = f.rate_burst.unwrap_or(defaults::RATE_BURST);
        if burst == 0 && per_second > 0.0 {
            return Err(ConfigError::invalid(
                "limits.sds.rate_burst",
                "must be at least 1 while limits.sds.rate_limit is on",
            ));
        }
        Ok(Self {
            max_connections: at_least_one(
                "limits.sds.max_connections",
                f.max_connections,
                defaults::MAX_CONNECTIONS,
            )?,
            handshake_timeout: deadline(
                "limits.sds.handshake_timeout",
                f.handshake_timeout,
                defaults::HANDSHAKE_TIMEOUT,
                Duration::from_millis(100),
            )?,
            max_streams_per_connection: match f.max_streams_per_connection {
                Some(0) => {
                    return Err(ConfigError::invalid(
                        "limits.sds.max_streams_per_connection",
                        "must be at least 1",
                    ))
                }
                Some(n) => n,
                None => defaults::MAX_STREAMS_PER_CONNECTION,
            },
            rate: RateLimit {
                per_second,
                burst: f64::from(burst),
                limit_loopback: f.rate_limit_loopback.unwrap_or(false),
                ..RateLimit::DEFAULT
            },
            max_message_bytes: bytes_within(
                "limits.sds.max_message_bytes",
                f.max_message_bytes,
                defaults::MAX_MESSAGE_BYTES,
                (1024, 64 * 1024 * 1024),
                "an SDS request is a node and a few resource names",
            )?,
            max_header_list_bytes: bytes_within(
                "limits.sds.max_header_list_bytes",
                f.max_header_list_bytes,
                defaults::MAX_HEADER_LIST_BYTES,
                (4096, 1024 * 1024),
                "a JWT and the gRPC headers",
            )?,
            max_pending_resets: within(
                "limits.sds.max_pending_resets",
                f.max_pending_resets,
                defaults::MAX_PENDING_RESETS,
                1,
                10_000,
            )?,
        })
    }
}
