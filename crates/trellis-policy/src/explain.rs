//! `trellis policy explain`: the decision for one request, the rule that made it, every
//! rule that matched, and the near misses (rules that failed on one side only: the
//! caller, or the request) with the field that failed.

use std::borrow::Cow;
use std::fmt;

use crate::decision::{Action, Decision, Mode, DEFAULT_RULE};
use crate::error::PathError;
use crate::path::{match_view, normalize_path};
use crate::policy::{CompiledPolicy, HttpScope, Rule, ToEntry};
use crate::reading::{PathParameters, Reading};
use crate::request::{readings, without_parameters};

/// How many near misses `Display` lists before summarizing the rest.
const NEAR_MISSES_SHOWN: usize = 20;
/// How many items of a list (`from`, `paths`) a reason quotes.
const LIST_ITEMS_SHOWN: usize = 6;

/// Why a request or connection got its decision. `Display` prints it for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Explanation<'a> {
    /// The caller's SPIFFE ID as given.
    pub caller: String,
    /// What was asked.
    pub request: ExplainedRequest,
    /// The decision ([`CompiledPolicy::decide_request`]'s), or `None` when the path was
    /// refused before authorization.
    pub decision: Option<Decision<'a>>,
    /// HTTP: each reading of the path that was decided (the literal one, and under
    /// `pathParameters: strictest` the one without `;` parameters), with its own decision
    /// and whether it is the one that decided (or refused) the request. Empty for TCP and
    /// for a path refused for its `;` alone.
    pub readings: Vec<ExplainedReading<'a>>,
    /// Every rule that matched (under the deciding reading), enforced or audit, in
    /// evaluation order.
    pub matched: Vec<RuleMatch<'a>>,
    /// Rules that matched the caller but not the request (under the deciding reading), or
    /// the request but not the caller, in evaluation order.
    pub near_misses: Vec<NearMiss<'a>>,
    /// Whether paths were matched ASCII case-insensitively (`caseInsensitivePaths: true`).
    pub case_insensitive_paths: bool,
    /// The policy's `pathParameters`.
    pub path_parameters: PathParameters,
    /// The policy's mode.
    pub mode: Mode,
    /// The policy's `defaultAction`.
    pub default_action: Action,
}

/// The request an [`Explanation`] is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExplainedRequest {
    /// An HTTP request.
    Http {
        /// The method as given.
        method: String,
        /// The path as given.
        path: String,
        /// The path the app would receive (after [`normalize_path`]), or why the request is
        /// refused before authorization (by normalization of any reading, or for its `;`
        /// under `pathParameters: reject`).
        normalized: Result<String, PathError>,
    },
    /// A plain TCP connection.
    Tcp {
        /// The inbound listen port.
        port: u16,
    },
}

/// One reading of an HTTP request's path and what it alone would decide.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExplainedReading<'a> {
    /// Which reading.
    pub reading: Reading,
    /// The raw path under this reading, before normalization (`/public/../admin` for
    /// `/public/..;/admin` without parameters).
    pub raw: String,
    /// The path under this reading, normalized, or why normalization refused it.
    pub path: Result<String, PathError>,
    /// What this reading alone decides (`None`: refused).
    pub decision: Option<Decision<'a>>,
    /// This reading decided the request (or its refusal refused it).
    pub decided: bool,
}

/// A rule that matched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleMatch<'a> {
    /// Its name.
    pub rule: &'a str,
    /// Its action.
    pub action: Action,
    /// Whether it is in audit mode (reported, not enforced).
    pub audit: bool,
    /// `source:line:column` of its name.
    pub location: String,
}

/// A rule that failed on one side only, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NearMiss<'a> {
    /// Its name.
    pub rule: &'a str,
    /// Its action.
    pub action: Action,
    /// Whether it is in audit mode.
    pub audit: bool,
    /// `source:line:column` of its name.
    pub location: String,
    /// What failed, e.g. ``to[0]: method POST not in [GET]``.
    pub reasons: Vec<String>,
}

enum Request<'r> {
    Http {
        method: &'r str,
        view: &'r str,
        path: &'r str,
    },
    Tcp {
        port: u16,
    },
}

impl CompiledPolicy {
    /// Explains the decision for an HTTP request. `path` is the raw path: it is read,
    /// normalized and decided as [`decide_request`](Self::decide_request) does, and the
    /// explanation shows each reading, its normal form (or why it was refused) and which
    /// reading decided.
    pub fn explain(&self, caller: &str, method: &str, path: &str) -> Explanation<'_> {
        let outcome = self.decide_request(caller, method, path);
        let mut explained = Vec::new();
        for &reading in readings(path, self.path_parameters).unwrap_or(&[]) {
            let text: Cow<'_, str> = match reading {
                Reading::Literal => Cow::Borrowed(path),
                Reading::WithoutParameters => Cow::Owned(without_parameters(path)),
            };
            let (normal, decision) = match normalize_path(&text) {
                Ok(n) => {
                    let d = self.decide(caller, method, &n);
                    (Ok(n.into_string()), Some(d))
                }
                Err(e) => (Err(e), None),
            };
            explained.push(ExplainedReading {
                reading,
                raw: text.into_owned(),
                path: normal,
                decision,
                decided: false,
            });
        }
        // `decide_request` refuses with the first reading that normalization refuses.
        let decided_by = match &outcome {
            Ok(r) => Some(r.reading),
            Err(_) => explained
                .iter()
                .find(|r| r.path.is_err())
                .map(|r| r.reading),
        };
        for r in &mut explained {
            r.decided = Some(r.reading) == decided_by;
        }
        let deciding_path = explained
            .iter()
            .filter(|_| outcome.is_ok())
            .find(|r| r.decided)
            .and_then(|r| r.path.as_ref().ok());
        let (matched, near_misses) = match deciding_path {
            Some(p) => self.walk(
                caller,
                &Request::Http {
                    method,
                    view: match_view(p),
                    path: p,
                },
            ),
            None => (Vec::new(), Vec::new()),
        };
        Explanation {
            caller: caller.to_owned(),
            request: ExplainedRequest::Http {
                method: method.to_owned(),
                path: path.to_owned(),
                normalized: outcome
                    .as_ref()
                    .map(|r| r.path.as_str().to_owned())
                    .map_err(|e| *e),
            },
            decision: outcome.ok().map(|r| r.decision),
            readings: explained,
            matched,
            near_misses,
            case_insensitive_paths: self.case_insensitive_paths,
            path_parameters: self.path_parameters,
            mode: self.mode,
            default_action: self.default_action,
        }
    }

    /// Explains the decision for a plain TCP connection to `port`.
    pub fn explain_l4(&self, caller: &str, port: u16) -> Explanation<'_> {
        let (matched, near_misses) = self.walk(caller, &Request::Tcp { port });
        Explanation {
            caller: caller.to_owned(),
            request: ExplainedRequest::Tcp { port },
            decision: Some(self.decide_l4(caller, port)),
            readings: Vec::new(),
            matched,
            near_misses,
            case_insensitive_paths: self.case_insensitive_paths,
            path_parameters: self.path_parameters,
            mode: self.mode,
            default_action: self.default_action,
        }
    }

    fn walk(&self, caller: &str, req: &Request<'_>) -> (Vec<RuleMatch<'_>>, Vec<NearMiss<'_>>) {
        let mut matched = Vec::new();
        let mut near = Vec::new();
        for rule in &self.rules {
            let from_ok = rule.caller_matches(caller);
            let request_failures = request_failures(rule, req, self.case_insensitive_paths);
            let location = self.place(rule.loc);
            match (from_ok, request_failures.is_empty()) {
                (true, true) => matched.push(RuleMatch {
                    rule: &rule.name,
                    action: rule.action,
                    audit: rule.audit,
                    location,
                }),
                (false, true) => near.push(NearMiss {
                    rule: &rule.name,
                    action: rule.action,
                    audit: rule.audit,
                    location,
                    reasons: vec![format!(
                        "caller is not in `from` {}",
                        list(rule.from.iter())
                    )],
                }),
                (true, false) => near.push(NearMiss {
                    rule: &rule.name,
                    action: rule.action,
                    audit: rule.audit,
                    location,
                    reasons: request_failures,
                }),
                (false, false) => {}
            }
        }
        (matched, near)
    }
}

/// Why the request side of `rule` fails (empty: it matches).
fn request_failures(rule: &Rule, req: &Request<'_>, case_insensitive: bool) -> Vec<String> {
    match *req {
        Request::Http { method, view, path } => match rule.http_scope() {
            HttpScope::None => {
                vec!["applies only to plain TCP connections (it has `ports`)".to_owned()]
            }
            HttpScope::All => Vec::new(),
            HttpScope::Entries([]) => vec!["`to` is empty: matches no request".to_owned()],
            HttpScope::Entries(entries) => {
                let failures: Vec<String> = entries
                    .iter()
                    .enumerate()
                    .filter_map(|(k, e)| entry_failure(k, e, method, view, path, case_insensitive))
                    .collect();
                if failures.len() < entries.len() {
                    Vec::new()
                } else {
                    failures
                }
            }
        },
        Request::Tcp { port } => match rule.l4_scope() {
            None => vec!["applies only to HTTP requests (it has `to`)".to_owned()],
            Some(None) => Vec::new(),
            Some(Some([])) => vec!["`ports` is empty: matches no connection".to_owned()],
            Some(Some(ports)) if !ports.contains(&port) => {
                vec![format!("port {port} not in `ports` {}", list(ports.iter()))]
            }
            Some(Some(_)) => Vec::new(),
        },
    }
}

fn entry_failure(
    k: usize,
    e: &ToEntry,
    method: &str,
    view: &str,
    path: &str,
    case_insensitive: bool,
) -> Option<String> {
    let mut parts = Vec::new();
    if !e.method_ok(method) {
        parts.push(match &e.method_names {
            Some(ms) if ms.is_empty() => "`methods` is empty".to_owned(),
            Some(ms) => format!("method {method} not in {}", list(ms.iter())),
            None => String::new(),
        });
    }
    if !e.path_ok(view, case_insensitive) {
        parts.push(match &e.paths {
            Some(ps) if ps.is_empty() => "`paths` is empty".to_owned(),
            Some(ps) => format!(
                "path {path} matches none of {}",
                list(ps.iter().map(|p| &p.text))
            ),
            None => String::new(),
        });
    }
    (!parts.is_empty()).then(|| format!("to[{k}]: {}", parts.join(" and ")))
}

fn list<T: fmt::Display>(items: impl ExactSizeIterator<Item = T>) -> String {
    let n = items.len();
    let mut shown: Vec<String> = items
        .take(LIST_ITEMS_SHOWN)
        .map(|i| i.to_string())
        .collect();
    if n > LIST_ITEMS_SHOWN {
        shown.push(format!("… {} more", n - LIST_ITEMS_SHOWN));
    }
    format!("[{}]", shown.join(", "))
}

fn tag(action: Action, audit: bool) -> String {
    if audit {
        format!("{action} (audit)")
    } else {
        action.to_string()
    }
}

/// `allow by rule `x`` / `deny by default`: a reading's decision on one line.
fn short(d: &Decision<'_>) -> String {
    if d.rule == DEFAULT_RULE {
        format!("{} by default", d.action)
    } else {
        format!("{} by rule `{}`", d.action, d.rule)
    }
}

impl fmt::Display for Explanation<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "caller:   {}", self.caller)?;
        let mut refused = None;
        match &self.request {
            ExplainedRequest::Http {
                method,
                path,
                normalized,
            } => {
                write!(f, "request:  {method} {path}")?;
                match normalized {
                    Ok(n) if n != path => writeln!(f, " (normalized: {n})")?,
                    Ok(_) => writeln!(f)?,
                    Err(e) => {
                        writeln!(f)?;
                        refused = Some(e);
                    }
                }
            }
            ExplainedRequest::Tcp { port } => {
                writeln!(f, "request:  TCP connection to port {port}")?
            }
        }
        if self.readings.len() > 1 {
            writeln!(
                f,
                "readings: the path carries `;` parameters (pathParameters: {}): it is \
                 decided as sent and without them, and the stricter decision wins",
                self.path_parameters
            )?;
            let shown: Vec<(&str, String)> = self
                .readings
                .iter()
                .map(|r| match (&r.path, &r.decision) {
                    (Ok(p), Some(d)) => (p.as_str(), short(d)),
                    (Ok(p), None) => (p.as_str(), String::new()),
                    (Err(e), _) => (r.raw.as_str(), format!("refused ({})", e.reason())),
                })
                .collect();
            let width = shown.iter().map(|(p, _)| p.len()).max().unwrap_or(0);
            for (r, (path, outcome)) in self.readings.iter().zip(&shown) {
                let mark = if r.decided { "  <- decides" } else { "" };
                writeln!(
                    f,
                    "  {:<19} {path:<width$}  {outcome}{mark}",
                    r.reading.as_str()
                )?;
            }
        }
        if self.case_insensitive_paths && matches!(self.request, ExplainedRequest::Http { .. }) {
            writeln!(
                f,
                "paths:    matched case-insensitively (caseInsensitivePaths: true)"
            )?;
        }
        let deciding = self.readings.iter().find(|r| r.decided).map(|r| r.reading);
        let under = match deciding {
            Some(reading @ Reading::WithoutParameters) => {
                format!(", reading {}", reading.describe())
            }
            _ => String::new(),
        };
        if let Some(e) = refused {
            writeln!(
                f,
                "decision: refused before authorization ({}): {e}{under}",
                e.reason()
            )?;
            return Ok(());
        }
        if let Some(d) = &self.decision {
            let by_rule = |action: Action, rule: &str| -> String {
                if rule != DEFAULT_RULE {
                    let at = self
                        .matched
                        .iter()
                        .find(|m| m.rule == rule)
                        .map(|m| format!(" ({})", m.location))
                        .unwrap_or_default();
                    format!("{action} by rule `{rule}`{at}")
                } else {
                    format!("{action} by default (no rule matched)")
                }
            };
            if self.mode == Mode::Audit && d.rule == DEFAULT_RULE {
                writeln!(
                    f,
                    "decision: allow (the policy is in audit mode: nothing is enforced)"
                )?;
            } else {
                writeln!(f, "decision: {}{under}", by_rule(d.action, d.rule))?;
            }
            if let Some(a) = &d.audit {
                writeln!(
                    f,
                    "audit:    would {} if audit-mode rules were enforced (not enforced)",
                    by_rule(a.action, a.rule)
                )?;
            }
        }
        if self.matched.is_empty() {
            writeln!(f, "matched:  none (defaultAction: {})", self.default_action)?;
        } else {
            writeln!(f, "matched:")?;
            for m in &self.matched {
                writeln!(
                    f,
                    "  {:<13} {}  ({})",
                    tag(m.action, m.audit),
                    m.rule,
                    m.location
                )?;
            }
        }
        if !self.near_misses.is_empty() {
            writeln!(f, "near misses:")?;
            for n in self.near_misses.iter().take(NEAR_MISSES_SHOWN) {
                writeln!(
                    f,
                    "  {:<13} {}  ({}): {}",
                    tag(n.action, n.audit),
                    n.rule,
                    n.location,
                    n.reasons.join("; ")
                )?;
            }
            if self.near_misses.len() > NEAR_MISSES_SHOWN {
                writeln!(
                    f,
                    "  … and {} more",
                    self.near_misses.len() - NEAR_MISSES_SHOWN
                )?;
            }
        }
        Ok(())
    }
}
