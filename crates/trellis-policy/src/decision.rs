//! What evaluation returns.

use std::fmt;

/// The rule name reported when no rule matched and `defaultAction` decided.
pub const DEFAULT_RULE: &str = "default";

/// What a rule (or the default) does with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// Let the request through.
    Allow,
    /// Refuse it (403 for HTTP, close for TCP).
    Deny,
}

impl Action {
    /// `"allow"` or `"deny"` (as written in policy files; a metric label).
    pub fn as_str(&self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Deny => "deny",
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether decisions are enforced or only reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Decisions are enforced.
    Enforce,
    /// Decisions are reported in [`Decision::audit`] but not enforced.
    Audit,
}

impl Mode {
    /// `"enforce"` or `"audit"`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Mode::Enforce => "enforce",
            Mode::Audit => "audit",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The outcome for one request or connection. Borrows rule names from the policy, so
/// making one allocates nothing.
///
/// `action` and `rule` are what to enforce. `audit` is set when the policy's audit-mode
/// rules (or the whole policy, in `mode: audit`) would have decided differently had they
/// been enforced: it carries that action and the rule (or `default`) that would have made
/// it. The caller logs and counts it, and enforces `action`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Decision<'a> {
    /// What to do.
    pub action: Action,
    /// The rule that decided, or [`DEFAULT_RULE`].
    pub rule: &'a str,
    /// What the audit-mode rules would have done instead, when that differs.
    pub audit: Option<AuditHit<'a>>,
}

impl Decision<'_> {
    /// `action == Allow`.
    pub fn is_allowed(&self) -> bool {
        self.action == Action::Allow
    }
}

/// The decision the policy would have made with its audit-mode rules enforced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AuditHit<'a> {
    /// What would have happened.
    pub action: Action,
    /// The rule that would have decided, or [`DEFAULT_RULE`].
    pub rule: &'a str,
}
