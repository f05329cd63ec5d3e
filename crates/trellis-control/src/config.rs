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

/// Kubernetes attestation settings.
#[derive(Debug, Clone)]
pub struct K8sSettings {
    /// JWKS file.
    pub jwks: PathBuf,
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
    /// Signing CA files, or `None` for the embedded self-signed CA.
    pub ca: Option<CaFiles>,
    /// Kubernetes attestation, or `None` to refuse JWTs.
    pub k8s: Option<K8sSettings>,
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
}

impl ControlSettings {
    /// Builds settings from a merged file (flags already applied over it).
    pub fn from_file(f: ControlFile) -> Result<Self, ConfigError> {
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
        let k8s = match f.k8s_jwks {
            Some(jwks) => Some(K8sSettings {
                jwks,
                issuer: f.k8s_issuer.ok_or(ConfigError::Invalid {
                    field: "k8s_issuer",
                    problem: "required with k8s_jwks: the cluster's service-account issuer, e.g. https://kubernetes.default.svc.cluster.local".into(),
                })?,
                audience: f.k8s_audience.unwrap_or_else(|| defaults::K8S_AUDIENCE.to_owned()),
            }),
            None if f.k8s_issuer.is_some() => {
                return Err(ConfigError::Invalid { field: "k8s_issuer", problem: "set k8s_jwks too (the issuer's public keys)".into() })
            }
            None => None,
        };
        Ok(Self {
            trust_domain,
            listen,
            admin,
            state_dir: f
                .state_dir
                .unwrap_or_else(|| PathBuf::from(defaults::STATE_DIR)),
            svid_ttl,
            rotate_every,
            ca,
            k8s,
        })
    }
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
}
