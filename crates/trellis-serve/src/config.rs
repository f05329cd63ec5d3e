//! What both binaries' configuration code shares: the error a bad file or setting produces, and
//! the table of keys that moved (so an old config file gets "now `limits.sds.max_connections`"
//! instead of a bare "unknown field").

use std::fmt::Display;
use std::path::PathBuf;
use std::time::Duration;

use thiserror::Error;

/// A config file or a setting is wrong. Messages name the file and line where there is one,
/// and say what to do.
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
        /// The parser's message, with line and column.
        message: String,
    },
    /// A value is out of range or inconsistent.
    #[error("invalid setting `{field}`: {problem}")]
    Invalid {
        /// The setting, as a YAML path (`limits.sds.max_connections`).
        field: String,
        /// What is wrong and what to do.
        problem: String,
    },
}

impl ConfigError {
    /// [`ConfigError::Invalid`] for `field`.
    pub fn invalid(field: impl Into<String>, problem: impl Into<String>) -> Self {
        ConfigError::Invalid {
            field: field.into(),
            problem: problem.into(),
        }
    }

    /// A parse error of the file at `path`; an unknown field that is a key listed in `moved`
    /// (old key, new key) is told where it went.
    pub fn parse(path: impl Into<PathBuf>, message: String, moved: &[(&str, &str)]) -> Self {
        ConfigError::Parse {
            path: path.into(),
            message: moved_key_message(&message, moved).unwrap_or(message),
        }
    }
}

/// `Some(better message)` when `message` is serde's "unknown field `X`, expected …" for an `X`
/// that `moved` lists: the old key with the path serde_yaml puts before it (`limits.X`), its
/// new key, and where in the file (serde_yaml's "at line L column C"). The old keys are unique
/// enough that a hint is right wherever one turns up.
pub fn moved_key_message(message: &str, moved: &[(&str, &str)]) -> Option<String> {
    let (before, rest) = message.split_once("unknown field `")?;
    let key = rest.split('`').next()?;
    let (_, new) = moved.iter().find(|(old, _)| *old == key)?;
    let path = before.trim().trim_end_matches(':');
    let old = if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    };
    let place = message.rfind(" at line ").map_or(String::new(), |i| {
        format!("{}: ", message[i + 4..].trim_end())
    });
    Some(format!(
        "{place}`{old}` is now `{new}` (limits are nested per listener; see docs/security.md, \"Hardening\"); \
         flags and TRELLIS_* variables keep their names"
    ))
}

/// A count that must be at least 1 (`field` is its YAML path); `default` when unset.
pub fn at_least_one(field: &str, v: Option<usize>, default: usize) -> Result<usize, ConfigError> {
    match v {
        Some(0) => Err(ConfigError::invalid(field, "must be at least 1")),
        Some(n) => Ok(n),
        None => Ok(default),
    }
}

/// A value in `lo..=hi`; `default` when unset. The ceiling keeps a typo from switching a
/// protection off.
pub fn within<T>(field: &str, v: Option<T>, default: T, lo: T, hi: T) -> Result<T, ConfigError>
where
    T: PartialOrd + Display + Copy,
{
    match v {
        Some(n) if n < lo || n > hi => Err(ConfigError::invalid(
            field,
            format!("{n} is out of range: use {lo} to {hi}"),
        )),
        Some(n) => Ok(n),
        None => Ok(default),
    }
}

/// A size in bytes in `lo..=hi`: a floor below which real traffic is refused, a ceiling above
/// which the limit no longer protects anything; `why` tells the operator what the floor is for.
pub fn bytes_within<T>(
    field: &str,
    v: Option<T>,
    default: T,
    (lo, hi): (T, T),
    why: &str,
) -> Result<T, ConfigError>
where
    T: PartialOrd + Display + Copy,
{
    match v {
        Some(n) if n < lo || n > hi => Err(ConfigError::invalid(
            field,
            format!("{n} bytes is out of range: use {lo} to {hi} ({why})"),
        )),
        Some(n) => Ok(n),
        None => Ok(default),
    }
}

/// A deadline of at least `min` (shorter would cut off clients on any real network);
/// `default` when unset.
pub fn deadline(
    field: &str,
    v: Option<Duration>,
    default: Duration,
    min: Duration,
) -> Result<Duration, ConfigError> {
    let d = v.unwrap_or(default);
    if d < min {
        return Err(ConfigError::invalid(
            field,
            format!(
                "{} is too short: use at least {}",
                humantime::format_duration(d),
                humantime::format_duration(min)
            ),
        ));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOVED: &[(&str, &str)] = &[("sds_max_connections", "limits.sds.max_connections")];

    #[test]
    fn a_moved_key_is_told_its_new_place_and_line() {
        let serde = "unknown field `sds_max_connections`, expected one of `trust_domain`, `limits` at line 2 column 1";
        let better = moved_key_message(serde, MOVED).unwrap_or_default();
        assert!(
            better.starts_with(
                "line 2 column 1: `sds_max_connections` is now `limits.sds.max_connections`"
            ),
            "{better}"
        );
        let e = ConfigError::parse("c.yaml", serde.to_owned(), MOVED).to_string();
        assert!(e.starts_with("c.yaml: line 2 column 1: "), "{e}");
        // serde_yaml names the mapping the key was found in.
        let nested =
            "limits: unknown field `sds_max_connections`, expected one of `sds` at line 3 column 3";
        let better = moved_key_message(nested, MOVED).unwrap_or_default();
        assert!(
            better.starts_with(
                "line 3 column 3: `limits.sds_max_connections` is now `limits.sds.max_connections`"
            ),
            "{better}"
        );
    }

    #[test]
    fn checks_name_the_field_and_what_to_use() {
        let e = at_least_one("limits.sds.max_connections", Some(0), 5).unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid setting `limits.sds.max_connections`: must be at least 1"
        );
        assert_eq!(at_least_one("x", None, 5).ok(), Some(5));
        let e = within(
            "limits.admin.max_pending_resets",
            Some(0usize),
            20,
            1,
            10_000,
        );
        assert!(e
            .unwrap_err()
            .to_string()
            .contains("0 is out of range: use 1 to 10000"));
        let e = bytes_within("f", Some(10usize), 1, (1024, 2048), "why not");
        assert!(e
            .unwrap_err()
            .to_string()
            .contains("10 bytes is out of range: use 1024 to 2048 (why not)"));
        let e = deadline(
            "f",
            Some(Duration::from_millis(1)),
            Duration::ZERO,
            Duration::from_millis(100),
        );
        assert!(e
            .unwrap_err()
            .to_string()
            .ends_with("1ms is too short: use at least 100ms"));
        assert_eq!(
            deadline(
                "f",
                None,
                Duration::from_secs(10),
                Duration::from_millis(100)
            )
            .ok(),
            Some(Duration::from_secs(10))
        );
    }

    #[test]
    fn other_errors_are_left_alone() {
        for message in [
            "unknown field `listen_addr`, expected one of `listen` at line 2 column 1",
            "invalid type: string \"x\", expected usize at line 3 column 5",
        ] {
            assert_eq!(moved_key_message(message, MOVED), None, "{message}");
            let e = ConfigError::parse("c.yaml", message.to_owned(), MOVED).to_string();
            assert_eq!(e, format!("c.yaml: {message}"));
        }
    }
}
