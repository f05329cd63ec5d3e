//! The two error types: a policy file that cannot be loaded, and a request path that
//! cannot be normalized.

use std::fmt;

/// A policy that cannot be loaded: which file, where in it, and what to fix.
///
/// `Display` is `"{source}:{line}:{column}: {message}"`, the shape editors and CI logs
/// turn into a link. `line` and `column` count from 1; an error that concerns no line
/// (no files at all) has `line == 0` and displays as `"{source}: {message}"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyError {
    /// The source name the caller passed with the text (usually the file's path).
    pub source: String,
    /// 1-based line, or 0 when the error is about no particular line.
    pub line: usize,
    /// 1-based column (in characters as libyaml counts them), or 0 with `line == 0`.
    pub column: usize,
    /// What is wrong and what to write instead.
    pub message: String,
}

impl PolicyError {
    pub(crate) fn new(
        source: &str,
        line: usize,
        column: usize,
        message: impl Into<String>,
    ) -> Self {
        PolicyError {
            source: source.to_owned(),
            line,
            column,
            message: message.into(),
        }
    }
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.source, self.message)
        } else {
            write!(
                f,
                "{}:{}:{}: {}",
                self.source, self.line, self.column, self.message
            )
        }
    }
}

impl std::error::Error for PolicyError {}

/// Why a request path was refused by [`normalize_path`](crate::normalize_path) or
/// [`CompiledPolicy::decide_request`](crate::CompiledPolicy::decide_request).
///
/// A refused path never reaches policy evaluation: the sidecar answers it directly
/// (400). [`PathError::reason`] is a stable snake_case label for metrics and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
#[non_exhaustive]
pub enum PathError {
    /// The path is empty or does not start with `/` (`*`, `http://…`, `a/b`).
    #[error("path must start with `/` (pass the request-target's path, without scheme or host)")]
    NotAbsolute,
    /// A raw `?` or `#`: the caller must split the query off before normalizing.
    #[error("path contains `?` or `#`: split the query off and pass only the path")]
    QueryOrFragment,
    /// `%2F`: an encoded slash would let one segment pass for two.
    #[error("path contains an encoded slash (`%2F`), which could make one segment look like two")]
    EncodedSlash,
    /// A raw `\` or `%5C`: some servers treat a backslash as a slash.
    #[error("path contains a backslash (raw or `%5C`), which some servers treat as a slash")]
    Backslash,
    /// NUL or another control character, raw or percent-encoded, or a raw space.
    #[error("path contains a NUL or control character (raw or percent-encoded) or a raw space")]
    ControlCharacter,
    /// A `%` not followed by two hex digits.
    #[error("path contains a malformed percent-escape (`%` must be followed by two hex digits)")]
    BadEscape,
    /// A `..` segment that would climb above `/`.
    #[error("path climbs above the root with `..`")]
    AboveRoot,
    /// A `;` in the path, under a policy with `pathParameters: reject`: servlet containers
    /// (Tomcat, Jetty, Spring) strip `;parameters` from segments, so `/admin;x/y` could be
    /// served as `/admin/y` while the policy saw the segment `admin;x`.
    #[error(
        "path carries `;` parameters (as in `/a;x/b`), which this service's policy refuses \
         (pathParameters: reject): send the path without them"
    )]
    PathParameters,
}

impl PathError {
    /// A stable snake_case label for this error (a metric label, a log field).
    pub fn reason(&self) -> &'static str {
        match self {
            PathError::NotAbsolute => "not_absolute",
            PathError::QueryOrFragment => "query_or_fragment",
            PathError::EncodedSlash => "encoded_slash",
            PathError::Backslash => "backslash",
            PathError::ControlCharacter => "control_character",
            PathError::BadEscape => "bad_escape",
            PathError::AboveRoot => "above_root",
            PathError::PathParameters => "path_parameters",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_error_displays_file_line_column_message() {
        let e = PolicyError::new("policy.yaml", 7, 9, "unknown field `metods`");
        assert_eq!(e.to_string(), "policy.yaml:7:9: unknown field `metods`");
    }

    #[test]
    fn policy_error_without_line_displays_source_and_message() {
        let e = PolicyError::new("<policy>", 0, 0, "no policy files given");
        assert_eq!(e.to_string(), "<policy>: no policy files given");
    }

    #[test]
    fn path_error_reasons_are_snake_case() {
        for e in [
            PathError::NotAbsolute,
            PathError::QueryOrFragment,
            PathError::EncodedSlash,
            PathError::Backslash,
            PathError::ControlCharacter,
            PathError::BadEscape,
            PathError::AboveRoot,
            PathError::PathParameters,
        ] {
            assert!(e
                .reason()
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b == b'_'));
        }
    }
}
