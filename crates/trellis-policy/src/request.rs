//! The one entry point for an HTTP request as it arrives: its raw path is normalized,
//! read the ways the app behind the sidecar might read it, and decided.
//!
//! **`;` parameters.** RFC 3986 §3.3 lets a path segment carry parameters after `;`
//! (`/admin;x/y`). Servlet containers (Tomcat, Jetty, Spring's `UrlPathHelper`) strip them
//! from every segment *before* decoding and normalizing, so they serve `/admin;x/y` as
//! `/admin/y` and `/public/..;/admin` as `/admin`, while a matcher that treats `;` as an
//! ordinary character sees the segments `admin;x` and `..;`. The policy's
//! `pathParameters` says what to do with a path that holds a `;`:
//!
//! - `strictest` (default): decide it under both readings, the literal one and the one
//!   without parameters; "The request is allowed only if both readings are allowed;
//!   otherwise the denying reading decides." The app still receives the literal path.
//!   Harmless parameters (`;jsessionid=…`) the policy allows both ways pass; nothing any
//!   reading would deny gets through.
//! - `reject`: any `;` is refused (400, [`PathError::PathParameters`]).
//! - `literal`: `;` is an ordinary character (for apps whose paths carry `;` as data).
//!
//! A `%3B` is data in every reading: the containers above split on the raw `;` only.
//!
//! **Case.** With `caseInsensitivePaths: true` both the patterns (at compile) and the
//! request path (per decision) are ASCII-lowercased for matching; the forwarded path
//! keeps its case. That is [`CompiledPolicy::decide`]'s business, so every reading gets it.

use crate::decision::{Action, Decision};
use crate::error::PathError;
use crate::path::{normalize_path, NormalizedPath};
use crate::policy::CompiledPolicy;
use crate::reading::{PathParameters, Reading};

/// The outcome for one HTTP request, from [`CompiledPolicy::decide_request`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestDecision<'p, 'r> {
    /// The literal reading, normalized: what to forward to the app (borrowed from the raw
    /// path when it was already normal).
    pub path: NormalizedPath<'r>,
    /// What to do, and the rule that decided.
    pub decision: Decision<'p>,
    /// The reading whose decision this is.
    pub reading: Reading,
}

/// The raw path with every segment's `;…` removed (segments split on the raw `/`),
/// as Tomcat's `parsePathParameters` does before decoding: `/public/..;x/admin` →
/// `/public/../admin`, `/a;b=c/d;e` → `/a/d`.
pub(crate) fn without_parameters(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    for (i, segment) in raw.split('/').enumerate() {
        if i > 0 {
            out.push('/');
        }
        out.push_str(segment.split_once(';').map_or(segment, |(kept, _)| kept));
    }
    out
}

/// The readings a raw path is decided under, given the policy's `pathParameters`; `Err`
/// when the path is refused for its `;` alone.
pub(crate) fn readings(raw: &str, mode: PathParameters) -> Result<&'static [Reading], PathError> {
    if !raw.as_bytes().contains(&b';') {
        return Ok(&[Reading::Literal]);
    }
    match mode {
        PathParameters::Reject => Err(PathError::PathParameters),
        PathParameters::Literal => Ok(&[Reading::Literal]),
        PathParameters::Strictest => Ok(&[Reading::Literal, Reading::WithoutParameters]),
    }
}

/// The stricter of the literal decision and the one without parameters: a denial wins
/// (the literal one first, as it is what the app receives); between two allows, the one
/// carrying an audit "would deny" is kept so that it is reported.
pub(crate) fn stricter<'p>(literal: Decision<'p>, bare: Decision<'p>) -> (Decision<'p>, Reading) {
    let would_deny = |d: &Decision<'_>| d.audit.is_some_and(|a| a.action == Action::Deny);
    match (literal.is_allowed(), bare.is_allowed()) {
        (false, _) => (literal, Reading::Literal),
        (true, false) => (bare, Reading::WithoutParameters),
        (true, true) if would_deny(&bare) && !would_deny(&literal) => {
            (bare, Reading::WithoutParameters)
        }
        (true, true) => (literal, Reading::Literal),
    }
}

impl CompiledPolicy {
    /// Decides an HTTP request from its **raw** path (the request-target without the
    /// query): normalizes it, decides it under each reading the policy's `pathParameters`
    /// calls for, and returns the path to forward, the decision and the reading that made
    /// it, or why the path is refused (400) before authorization.
    ///
    /// A path with no `;` in a case-sensitive policy, already in normal form (the usual
    /// request), costs one [`normalize_path`] and one [`decide`](Self::decide) and
    /// allocates nothing. Under `strictest`, a `;` costs a second normalization and
    /// decision; a reading that normalization refuses (`/..;/x` reads as `/../x`) refuses
    /// the request.
    ///
    /// ```
    /// let policy = trellis_policy::compile(&[(
    ///     "policy.yaml",
    ///     "apiVersion: trellis.io/v1\nkind: Policy\ndefaultAction: allow\nrules:\n  - name: no-admin\n    action: deny\n    from: [\"*\"]\n    to:\n      - paths: [/admin/**]\n",
    /// )])
    /// .unwrap();
    /// let r = policy
    ///     .decide_request("spiffe://example.org/a", "GET", "/admin;x/user-export")
    ///     .unwrap();
    /// assert_eq!(r.decision.rule, "no-admin");
    /// assert_eq!(r.reading, trellis_policy::Reading::WithoutParameters);
    /// assert_eq!(r.path.as_str(), "/admin;x/user-export");
    /// ```
    pub fn decide_request<'p, 'r>(
        &'p self,
        caller: &str,
        method: &str,
        raw_path: &'r str,
    ) -> Result<RequestDecision<'p, 'r>, PathError> {
        let readings = readings(raw_path, self.path_parameters)?;
        let path = normalize_path(raw_path)?;
        let literal = self.decide(caller, method, &path);
        if readings.len() == 1 {
            return Ok(RequestDecision {
                path,
                decision: literal,
                reading: Reading::Literal,
            });
        }
        let stripped = without_parameters(raw_path);
        let bare = normalize_path(&stripped)?;
        let (decision, reading) = stricter(literal, self.decide(caller, method, &bare));
        Ok(RequestDecision {
            path,
            decision,
            reading,
        })
    }

    /// The policy's `pathParameters` (`strictest` when no file sets it).
    pub fn path_parameters(&self) -> PathParameters {
        self.path_parameters
    }

    /// The policy's `caseInsensitivePaths` (`false` when no file sets it).
    pub fn case_insensitive_paths(&self) -> bool {
        self.case_insensitive_paths
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decision::AuditHit;

    #[test]
    fn without_parameters_strips_every_segment_before_decoding() {
        assert_eq!(
            without_parameters("/admin;x/user-export"),
            "/admin/user-export"
        );
        assert_eq!(without_parameters("/public/..;/admin"), "/public/../admin");
        assert_eq!(without_parameters("/a;b=c;d/e;f"), "/a/e");
        assert_eq!(without_parameters("/;x/admin"), "//admin");
        assert_eq!(without_parameters("/a%3Bb/c"), "/a%3Bb/c");
        assert_eq!(without_parameters("/plain/path/"), "/plain/path/");
    }

    #[test]
    fn readings_follow_the_setting_only_when_there_is_a_semicolon() {
        for mode in [
            PathParameters::Strictest,
            PathParameters::Reject,
            PathParameters::Literal,
        ] {
            assert_eq!(readings("/a/b", mode), Ok(&[Reading::Literal][..]));
            // An encoded `;` is data, not a parameter.
            assert_eq!(readings("/a%3Bb", mode), Ok(&[Reading::Literal][..]));
        }
        assert_eq!(
            readings("/a;x", PathParameters::Strictest),
            Ok(&[Reading::Literal, Reading::WithoutParameters][..])
        );
        assert_eq!(
            readings("/a;x", PathParameters::Reject),
            Err(PathError::PathParameters)
        );
        assert_eq!(
            readings("/a;x", PathParameters::Literal),
            Ok(&[Reading::Literal][..])
        );
    }

    fn d(action: Action, rule: &str, audit: Option<Action>) -> Decision<'_> {
        Decision {
            action,
            rule,
            audit: audit.map(|action| AuditHit {
                action,
                rule: "audit-rule",
            }),
        }
    }

    #[test]
    fn stricter_prefers_a_denial_and_the_literal_one_first() {
        use Action::{Allow, Deny};
        let (got, by) = stricter(d(Deny, "lit", None), d(Deny, "bare", None));
        assert_eq!((got.rule, by), ("lit", Reading::Literal));
        let (got, by) = stricter(d(Deny, "lit", None), d(Allow, "bare", None));
        assert_eq!((got.rule, by), ("lit", Reading::Literal));
        let (got, by) = stricter(d(Allow, "lit", None), d(Deny, "bare", None));
        assert_eq!((got.rule, by), ("bare", Reading::WithoutParameters));
        let (got, by) = stricter(d(Allow, "lit", None), d(Allow, "bare", None));
        assert_eq!((got.rule, by), ("lit", Reading::Literal));
    }

    #[test]
    fn stricter_keeps_an_audit_denial_of_either_reading() {
        use Action::{Allow, Deny};
        let (got, by) = stricter(d(Allow, "lit", None), d(Allow, "bare", Some(Deny)));
        assert_eq!((got.rule, by), ("bare", Reading::WithoutParameters));
        assert!(got.audit.is_some());
        let (got, by) = stricter(d(Allow, "lit", Some(Deny)), d(Allow, "bare", Some(Deny)));
        assert_eq!((got.rule, by), ("lit", Reading::Literal));
    }

    #[test]
    fn names_are_stable() {
        assert_eq!(Reading::Literal.to_string(), "literal");
        assert_eq!(Reading::WithoutParameters.to_string(), "without_parameters");
        assert_eq!(PathParameters::default(), PathParameters::Strictest);
        assert_eq!(PathParameters::Reject.to_string(), "reject");
        assert_eq!(PathParameters::Literal.as_str(), "literal");
    }
}
