//! How a request path is read: the `pathParameters` setting and the readings it produces.

use std::fmt;

/// What a policy does with `;` parameters in path segments (`pathParameters`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum PathParameters {
    /// Decide under both readings (with and without parameters); the stricter wins.
    #[default]
    Strictest,
    /// Refuse any path with a `;` (400, reason `path_parameters`).
    Reject,
    /// `;` is an ordinary character; only the literal reading is decided.
    Literal,
}

impl PathParameters {
    /// `"strictest"`, `"reject"` or `"literal"`, as written in policy files.
    pub fn as_str(&self) -> &'static str {
        match self {
            PathParameters::Strictest => "strictest",
            PathParameters::Reject => "reject",
            PathParameters::Literal => "literal",
        }
    }
}

impl fmt::Display for PathParameters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One way of reading a request path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reading {
    /// The path as sent, normalized (`;` is an ordinary character). What the app receives.
    Literal,
    /// Every segment's `;…` removed before normalization, as servlet containers read it.
    WithoutParameters,
}

impl Reading {
    /// `"literal"` or `"without_parameters"` (a log field).
    pub fn as_str(&self) -> &'static str {
        match self {
            Reading::Literal => "literal",
            Reading::WithoutParameters => "without_parameters",
        }
    }

    /// How people read it: `"the path as sent"`, `"the path without its `;` parameters"`.
    pub fn describe(&self) -> &'static str {
        match self {
            Reading::Literal => "the path as sent",
            Reading::WithoutParameters => "the path without its `;` parameters",
        }
    }
}

impl fmt::Display for Reading {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
