//! Kubernetes attestation's settings, defaults and checks: where the issuer's keys come from
//! (`k8s_jwks` or `k8s_jwks_url` and friends) and `limits.k8s` (token and JWKS sizes, the
//! fetch deadline). `crate::config` reads the file and hands the values here.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use trellis_serve::config::{bytes_within, deadline, ConfigError};

use crate::attest::jwks::MAX_JWKS_BYTES;
use crate::attest::jwks_url::{self, JwksUrl, DEFAULT_FETCH_TIMEOUT};
use crate::attest::k8s::MAX_JWT_BYTES;

/// `--k8s-audience` default.
pub const K8S_AUDIENCE: &str = "trellis";

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

/// The top-level `k8s_*` keys of the file, as given.
#[derive(Debug, Default, Clone)]
pub struct K8sFields {
    /// `k8s_jwks`.
    pub jwks: Option<PathBuf>,
    /// `k8s_jwks_url`.
    pub jwks_url: Option<String>,
    /// `k8s_ca`.
    pub ca: Option<PathBuf>,
    /// `k8s_token`.
    pub token: Option<PathBuf>,
    /// `k8s_jwks_refresh`.
    pub refresh: Option<Duration>,
    /// `k8s_issuer`.
    pub issuer: Option<String>,
    /// `k8s_audience`.
    pub audience: Option<String>,
}

impl K8sSettings {
    /// Validates the Kubernetes attestation fields: `k8s_jwks` or `k8s_jwks_url` (not both),
    /// the issuer with either, and the URL-only fields only with the URL. `None`: neither is
    /// set (Kubernetes tokens are refused).
    pub fn from_fields(f: K8sFields) -> Result<Option<Self>, ConfigError> {
        let K8sFields {
            jwks,
            jwks_url,
            ca,
            token,
            refresh,
            issuer,
            audience,
        } = f;
        let source = match (jwks, jwks_url) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::invalid(
                    "k8s_jwks_url",
                    "set k8s_jwks (a file) or k8s_jwks_url (the API server), not both",
                ))
            }
            (Some(file), None) => {
                for (field, set) in [
                    ("k8s_ca", ca.is_some()),
                    ("k8s_token", token.is_some()),
                    ("k8s_jwks_refresh", refresh.is_some()),
                ] {
                    if set {
                        return Err(ConfigError::invalid(
                            field,
                            "only used with k8s_jwks_url; a k8s_jwks file is read once at start",
                        ));
                    }
                }
                K8sKeySource::File(file)
            }
            (None, Some(url)) => {
                let url = jwks_url::parse_url(&url)
                    .map_err(|e| ConfigError::invalid("k8s_jwks_url", e.to_string()))?;
                let refresh = refresh.unwrap_or(jwks_url::DEFAULT_REFRESH);
                if refresh < jwks_url::MIN_REFRESH {
                    return Err(ConfigError::invalid(
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
                        return Err(ConfigError::invalid(
                            field,
                            "set k8s_jwks or k8s_jwks_url too (the issuer's public keys)",
                        ));
                    }
                }
                return Ok(None);
            }
        };
        let issuer = issuer.ok_or_else(|| {
            ConfigError::invalid(
                "k8s_issuer",
                "required with k8s_jwks or k8s_jwks_url: the cluster's service-account issuer, \
                 e.g. https://kubernetes.default.svc.cluster.local (`kubectl get --raw \
                 /.well-known/openid-configuration` shows it)",
            )
        })?;
        Ok(Some(K8sSettings {
            jwks: source,
            issuer,
            audience: audience.unwrap_or_else(|| K8S_AUDIENCE.to_owned()),
        }))
    }
}

/// `limits.k8s` in the file.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct K8sLimitsFile {
    /// Largest Kubernetes service-account JWT accepted, in bytes.
    pub max_jwt_bytes: Option<usize>,
    /// Largest JWKS document (file or `k8s_jwks_url` body) parsed, in bytes.
    pub max_jwks_bytes: Option<usize>,
    /// How long one fetch of `k8s_jwks_url` may take, e.g. `10s`.
    #[serde(default, with = "humantime_serde")]
    pub jwks_fetch_timeout: Option<Duration>,
}

/// What a Kubernetes credential and the issuer's key set may cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct K8sLimits {
    /// Largest Kubernetes JWT (the `authorization` value may be
    /// [`CREDENTIAL_OVERHEAD`](super::CREDENTIAL_OVERHEAD) bytes longer).
    pub max_jwt_bytes: usize,
    /// Largest JWKS document, from the file or the URL.
    pub max_jwks_bytes: usize,
    /// Deadline of one `k8s_jwks_url` fetch.
    pub jwks_fetch_timeout: Duration,
}

impl Default for K8sLimits {
    fn default() -> Self {
        Self {
            max_jwt_bytes: MAX_JWT_BYTES,
            max_jwks_bytes: MAX_JWKS_BYTES,
            jwks_fetch_timeout: DEFAULT_FETCH_TIMEOUT,
        }
    }
}

impl K8sLimits {
    /// Applies `f` over the defaults and checks ranges; errors name `limits.k8s.*`.
    pub fn from_file(f: &K8sLimitsFile) -> Result<Self, ConfigError> {
        let d = Self::default();
        Ok(Self {
            max_jwt_bytes: bytes_within(
                "limits.k8s.max_jwt_bytes",
                f.max_jwt_bytes,
                d.max_jwt_bytes,
                (1024, 64 * 1024),
                "a Kubernetes service-account token is about 1 KiB",
            )?,
            max_jwks_bytes: bytes_within(
                "limits.k8s.max_jwks_bytes",
                f.max_jwks_bytes,
                d.max_jwks_bytes,
                (1024, 64 * 1024 * 1024),
                "an issuer's JWKS is a few KiB",
            )?,
            jwks_fetch_timeout: deadline(
                "limits.k8s.jwks_fetch_timeout",
                f.jwks_fetch_timeout,
                d.jwks_fetch_timeout,
                Duration::from_millis(100),
            )?,
        })
    }
}
