#![doc = include_str!("../README.md")]
#![warn(missing_docs)]
// Unit tests may unwrap: a panic is how they report failure.
#![cfg_attr(test, allow(clippy::unwrap_used))]

mod decision;
mod diff;
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
mod policy_test;
mod reading;
mod replay;
mod request;
#[cfg(test)]
mod tests;

pub use decision::{Action, AuditHit, Decision, Mode, DEFAULT_RULE};
pub use diff::{diff, settings_changed, DiffChange, DiffError, DiffReport, MAX_DIFF_REQUESTS};
pub use error::{PathError, PolicyError};
pub use explain::{ExplainedReading, ExplainedRequest, Explanation, NearMiss, RuleMatch};
pub use lint::{Warning, WarningKind};
pub use path::{normalize_path, NormalizedPath};
pub use policy::{compile, CompiledPolicy, API_VERSION, KIND, MAX_RULES, MAX_RULE_NAME_LEN};
pub use policy_test::{parse_policy_test, PolicyTestFile, TestCase, TestFailure};
pub use reading::{PathParameters, Reading};
pub use replay::{
    decide_asked, parse_access_line, AccessRecord, Asked, CallerChange, ChangeGroup, Decided,
    LogLine, LogLineError, Outcome, Replay, ReplayReport, RuleChange, Skipped, Tally,
    ACCESS_LOG_TARGET,
};
pub use request::RequestDecision;
