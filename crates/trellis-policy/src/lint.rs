//! Warnings for `trellis policy check`: rules that can never match, rules that never get
//! to decide anything because an earlier or stronger rule always does, and settings that
//! have no effect. Conservative: a warning is only given when it is certain; a rule that
//! is covered only by the union of several others is not reported.

use std::fmt;

use crate::decision::{Action, Mode};
use crate::pattern::{PathPattern, Principal, Seg, KNOWN_METHODS};
use crate::policy::{CompiledPolicy, HttpScope, Loc, Rule, ToEntry};

/// A problem that does not stop the policy from loading, with where it is.
///
/// `Display` is `"{source}:{line}:{column}: warning: {message}"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    /// The source name given to [`compile`](crate::compile).
    pub source: String,
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub column: usize,
    /// The rule the warning is about.
    pub rule: String,
    /// What kind of problem.
    pub kind: WarningKind,
    /// What is wrong and what to do.
    pub message: String,
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: warning: {}",
            self.source, self.line, self.column, self.message
        )
    }
}

/// The kinds of [`Warning`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum WarningKind {
    /// The rule, or one of its `to` entries, can never match (an empty list).
    NeverMatches,
    /// Every request the rule matches is decided by another rule: an enforced `deny`
    /// that covers an `allow`, or an earlier rule with the same action that covers it.
    Shadowed,
    /// An earlier rule has exactly the same scope and action.
    Redundant,
    /// A setting that has no effect (`mode: enforce` on a rule of an audit-mode policy).
    NoEffect,
    /// A method that is not in the IANA HTTP method registry (a typo?).
    UnknownMethod,
    /// A `deny` rule's path has letters, and no file says whether paths are
    /// case-insensitive: `/ADMIN/…` is not denied by a rule on `/admin/**`.
    CaseSensitivePath,
}

impl WarningKind {
    /// A stable snake_case label.
    pub fn as_str(&self) -> &'static str {
        match self {
            WarningKind::NeverMatches => "never_matches",
            WarningKind::Shadowed => "shadowed",
            WarningKind::Redundant => "redundant",
            WarningKind::NoEffect => "no_effect",
            WarningKind::UnknownMethod => "unknown_method",
            WarningKind::CaseSensitivePath => "case_sensitive_path",
        }
    }
}

impl CompiledPolicy {
    /// All warnings, in rule order.
    pub fn lint(&self) -> Vec<Warning> {
        self.lint_with(false)
    }

    /// `lint`, but checking every pair of rules instead of the index's candidates: the
    /// tests check that both agree.
    #[cfg(test)]
    pub(crate) fn lint_exhaustive(&self) -> Vec<Warning> {
        self.lint_with(true)
    }

    fn lint_with(&self, exhaustive: bool) -> Vec<Warning> {
        let scopes: Vec<Scope<'_>> = self.rules.iter().map(Scope::of).collect();
        let mut out = Vec::new();
        for (j, rule) in self.rules.iter().enumerate() {
            let mut warn = |loc: Loc, kind: WarningKind, message: String| {
                out.push(Warning {
                    source: self.sources.get(loc.source).cloned().unwrap_or_default(),
                    line: loc.line,
                    column: loc.column,
                    rule: rule.name.clone(),
                    kind,
                    message,
                });
            };
            let name = &rule.name;

            if let Some(why) = never_matches_because(rule) {
                warn(
                    rule.loc,
                    WarningKind::NeverMatches,
                    format!("rule `{name}` can never match: {why}"),
                );
            } else if let Some(to) = &rule.to {
                for (k, entry) in to.iter().enumerate() {
                    if let Some(why) = dead_entry_because(entry) {
                        warn(
                            rule.loc,
                            WarningKind::NeverMatches,
                            format!("rule `{name}`: `to[{k}]` can never match: {why}"),
                        );
                    }
                }
            }

            for entry in rule.to.iter().flatten() {
                for (m, loc) in entry.methods.iter().flatten() {
                    if !KNOWN_METHODS.contains(&&**m) {
                        warn(
                            *loc,
                            WarningKind::UnknownMethod,
                            format!(
                                "rule `{name}`: `{m}` is not a registered HTTP method (a typo?)"
                            ),
                        );
                    }
                }
            }

            if let Some((pattern, loc)) = self.case_dodgeable_path(rule) {
                let upper = pattern.to_ascii_uppercase();
                warn(
                    loc,
                    WarningKind::CaseSensitivePath,
                    format!(
                        "deny rule `{name}`: paths are matched case-sensitively, so `{upper}` \
                         is not denied by `{pattern}`; if the app treats paths \
                         case-insensitively (IIS, case-insensitive file systems, some \
                         frameworks), set `caseInsensitivePaths: true`; if it does not, write \
                         `caseInsensitivePaths: false` to say so"
                    ),
                );
            }

            if let (Mode::Audit, Some((Mode::Enforce, loc))) = (self.mode, rule.mode) {
                warn(
                    loc,
                    WarningKind::NoEffect,
                    format!(
                        "rule `{name}`: `mode: enforce` has no effect: the whole policy is in \
                         audit mode, so no rule is enforced"
                    ),
                );
            }

            if scopes.get(j).is_none_or(|s| s.dead) {
                continue;
            }
            if let Some((kind, message)) = self.shadowing(j, &scopes, exhaustive) {
                warn(rule.loc, kind, message);
            }
        }
        out
    }

    /// The first rule that certainly keeps rule `j` from ever deciding.
    fn shadowing(
        &self,
        j: usize,
        scopes: &[Scope<'_>],
        exhaustive: bool,
    ) -> Option<(WarningKind, String)> {
        let rule = self.rules.get(j)?;
        let mut candidates = Vec::new();
        if exhaustive {
            candidates.extend((0..self.rules.len()).filter_map(|i| u32::try_from(i).ok()));
        } else {
            self.candidates_covering(rule, &mut candidates)?;
        }
        candidates.sort_unstable();
        candidates.dedup();
        let name = &rule.name;
        for i in candidates
            .into_iter()
            .filter_map(|i| usize::try_from(i).ok())
        {
            let (Some(other), Some(scope)) = (self.rules.get(i), scopes.get(i)) else {
                continue;
            };
            if i == j || scope.dead {
                continue;
            }
            // "A matching deny wins": an enforced deny shadows an allow wherever it is.
            let deny_over_allow =
                rule.action == Action::Allow && other.action == Action::Deny && !other.audit;
            // Same action, earlier: the first matching rule is the one reported, so the
            // later one never decides. An audit rule does not shadow an enforced one.
            let earlier_same = i < j && rule.action == other.action && (!other.audit || rule.audit);
            if !(deny_over_allow || earlier_same) || !covers(other, scope, rule, &scopes[j]) {
                continue;
            }
            let at = self.place(other.loc);
            let oname = &other.name;
            if deny_over_allow {
                return Some((
                    WarningKind::Shadowed,
                    format!(
                        "allow rule `{name}` can never take effect: every request it matches \
                         is denied by rule `{oname}` ({at})"
                    ),
                ));
            }
            if rule.audit == other.audit && covers(rule, &scopes[j], other, scope) {
                return Some((
                    WarningKind::Redundant,
                    format!(
                        "rule `{name}` is redundant: rule `{oname}` ({at}) has the same \
                         scope and action and comes first"
                    ),
                ));
            }
            return Some((
                WarningKind::Shadowed,
                format!(
                    "rule `{name}` never decides anything: every request it matches is \
                     matched first by rule `{oname}` ({at}), which also {}s",
                    other.action
                ),
            ));
        }
        None
    }
}

impl CompiledPolicy {
    /// The first path pattern (as written, and where) of a `deny` rule, enforced or audit,
    /// that a change of letter case steps around: only while no file has written
    /// `caseInsensitivePaths` (writing `false` says the app is case-sensitive too).
    fn case_dodgeable_path(&self, rule: &Rule) -> Option<(String, Loc)> {
        if self.case_setting_written || rule.action != Action::Deny {
            return None;
        }
        rule.to.iter().flatten().find_map(|entry| {
            entry
                .paths
                .iter()
                .flatten()
                .zip(&entry.path_locs)
                .find(|(p, _)| p.has_letters())
                .map(|(p, loc)| (p.text.to_string(), *loc))
        })
    }
}

/// Stands for "any value" in a representative request: no pattern, method or port in a
/// policy equals it, so only wildcards match it.
const ANY_SEGMENT: &str = "\u{0}";
const ANY_METHOD: &str = "\u{0}";
const ANY_PORT: u16 = 0;

impl CompiledPolicy {
    /// Every rule that could cover `rule`: those matching one representative request of
    /// it (its first principal, first live `to` entry, first method and first path, with
    /// wildcards replaced by a value only wildcards match). A rule covering `rule` matches
    /// all of its requests, so it matches this one; the index finds them without a scan.
    fn candidates_covering(&self, rule: &Rule, out: &mut Vec<u32>) -> Option<()> {
        let caller = match rule.from.first()? {
            Principal::Any => ANY_SEGMENT.to_owned(),
            Principal::Exact(id) => id.to_string(),
            Principal::OneMore(base) | Principal::AnyMore(base) => format!("{base}/{ANY_SEGMENT}"),
        };
        match rule.http_scope() {
            HttpScope::All => self.http_rule_ids(&caller, ANY_METHOD, "", out),
            HttpScope::Entries(entries) => {
                let entry = entries.iter().find(|e| !e.is_dead())?;
                let method = entry
                    .method_names
                    .as_ref()
                    .and_then(|m| m.first())
                    .map_or(ANY_METHOD, |m| &**m);
                let view = match entry.paths.as_ref().and_then(|p| p.first()) {
                    None => String::new(),
                    Some(p) => p
                        .segs
                        .iter()
                        .map(|s| match s {
                            Seg::Lit(l) => &**l,
                            Seg::Star => ANY_SEGMENT,
                        })
                        .collect::<Vec<_>>()
                        .join("/"),
                };
                self.http_rule_ids(&caller, method, &view, out);
            }
            HttpScope::None => {
                let port = rule
                    .ports
                    .as_ref()
                    .and_then(|p| p.first().copied())
                    .unwrap_or(ANY_PORT);
                self.l4_rule_ids(&caller, port, out);
            }
        }
        Some(())
    }
}

/// A rule's scope, prepared once for the pairwise coverage checks.
struct Scope<'a> {
    dead: bool,
    http: Vec<EntryView<'a>>,
    l4: Option<Option<&'a [u16]>>,
}

impl<'a> Scope<'a> {
    fn of(rule: &'a Rule) -> Scope<'a> {
        Scope {
            dead: rule.never_matches(),
            http: entries(&rule.http_scope()),
            l4: rule.l4_scope(),
        }
    }
}

fn never_matches_because(rule: &Rule) -> Option<String> {
    if rule.from.is_empty() {
        return Some("`from` is empty (write `[\"*\"]` for any caller)".to_owned());
    }
    if let Some(to) = &rule.to {
        if to.is_empty() {
            return Some("`to` is empty (leave it out to match every request)".to_owned());
        }
        if to.iter().all(ToEntry::is_dead) {
            return Some("every `to` entry has an empty `methods` or `paths` list".to_owned());
        }
    }
    if rule.ports.as_ref().is_some_and(Vec::is_empty) {
        return Some("`ports` is empty (leave it out to match every port)".to_owned());
    }
    None
}

fn dead_entry_because(entry: &ToEntry) -> Option<&'static str> {
    if entry.method_names.as_ref().is_some_and(Vec::is_empty) {
        Some("`methods` is empty (leave it out to match any method)")
    } else if entry.paths.as_ref().is_some_and(Vec::is_empty) {
        Some("`paths` is empty (leave it out to match any path)")
    } else {
        None
    }
}

/// Does `a` match every request and connection that `b` matches? Certain answers only.
fn covers(a: &Rule, sa: &Scope<'_>, b: &Rule, sb: &Scope<'_>) -> bool {
    l4_covers(sa.l4, sb.l4)
        && sb
            .http
            .iter()
            .all(|eb| sa.http.iter().any(|ea| entry_covers(ea, eb)))
        && b.from
            .iter()
            .all(|pb| a.from.iter().any(|pa| pa.covers(pb)))
}

/// A `to` entry, or the whole of HTTP (`All`: no methods and no paths given).
struct EntryView<'a> {
    methods: Option<&'a [Box<str>]>,
    paths: Option<&'a [PathPattern]>,
}

fn entries<'a>(scope: &HttpScope<'a>) -> Vec<EntryView<'a>> {
    match scope {
        HttpScope::None => Vec::new(),
        HttpScope::All => vec![EntryView {
            methods: None,
            paths: None,
        }],
        HttpScope::Entries(es) => es
            .iter()
            .filter(|e| !e.is_dead())
            .map(|e| EntryView {
                methods: e.method_names.as_deref(),
                paths: e.paths.as_deref(),
            })
            .collect(),
    }
}

fn entry_covers(a: &EntryView<'_>, b: &EntryView<'_>) -> bool {
    let methods = match (a.methods, b.methods) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(ma), Some(mb)) => mb
            .iter()
            .all(|m| ma.iter().any(|n| n.eq_ignore_ascii_case(m))),
    };
    methods
        && match (a.paths, b.paths) {
            (None, _) => true,
            (Some(pa), None) => pa.iter().any(|p| p.segs.is_empty() && p.globstar),
            (Some(pa), Some(pb)) => pb.iter().all(|p| pa.iter().any(|q| q.covers(p))),
        }
}

fn l4_covers(a: Option<Option<&[u16]>>, b: Option<Option<&[u16]>>) -> bool {
    match (a, b) {
        (_, None) => true,
        (None, Some(_)) => false,
        (Some(None), Some(_)) => true,
        (Some(Some(_)), Some(None)) => false,
        (Some(Some(pa)), Some(Some(pb))) => pb.iter().all(|p| pa.contains(p)),
    }
}
