#![doc = include_str!("../README.md")]
#![warn(missing_docs)]
// Unit tests may unwrap: a panic is how they report failure.
#![cfg_attr(test, allow(clippy::unwrap_used))]

mod decision;
mod error;
mod explain;
#[doc(hidden)]
pub mod fuzz;
mod index;
mod lint;
mod located;
mod model;
mod path;
mod pattern;
mod policy;
mod reading;
mod request;
#[cfg(test)]
mod tests;

pub use decision::{Action, AuditHit, Decision, Mode, DEFAULT_RULE};
pub use error::{PathError, PolicyError};
pub use explain::{ExplainedReading, ExplainedRequest, Explanation, NearMiss, RuleMatch};
pub use lint::{Warning, WarningKind};
pub use path::{normalize_path, NormalizedPath};
pub use policy::{compile, CompiledPolicy, API_VERSION, KIND, MAX_RULES, MAX_RULE_NAME_LEN};
pub use reading::{PathParameters, Reading};
pub use request::RequestDecision;
