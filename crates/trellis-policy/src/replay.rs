//! `trellis policy replay`: decide again, under another policy, every request (and TCP
//! connection) a sidecar recorded in its access log, and count what changes.
//!
//! The input is what `trellis sidecar --log-format json` writes with the access log on:
//! one JSON object per line, `{"timestamp","level","target","message","fields"}`. Lines of
//! target `trellis::access` are access lines; inbound ones carry what the policy hook saw
//! and did:
//!
//! - HTTP (`message: request`): `caller`, `method`, `raw_path` (the path as received,
//!   query left out), `path` (as forwarded), `decision` (`allow`, `deny` or `refused`),
//!   `rule` and `policy` (the SHA-256 of the policy in force);
//! - TCP (`message: connection`): `caller`, `port` (the inbound listen port), `decision`,
//!   `rule`, `policy`.
//!
//! A request is decided again with [`CompiledPolicy::decide_request`] on its raw path
//! and a connection with [`CompiledPolicy::decide_l4`]: the sidecar's own entry points, so
//! normalization, `;` parameter readings and case folding are the same. Every other line
//! (other targets, outbound lines, requests refused for their framing before the policy
//! saw them) is counted as skipped, never an error.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;

use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};

use crate::decision::Action;
use crate::policy::CompiledPolicy;

/// `tracing` target of the sidecar's access log.
pub const ACCESS_LOG_TARGET: &str = "trellis::access";

/// What happened to a request or connection, as enforced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// Let through.
    Allow,
    /// Refused by the policy (403, or the TCP connection closed).
    Deny,
    /// Refused with 400 before authorization: the path cannot be authorized.
    Refused,
}

impl Outcome {
    /// `"allow"`, `"deny"` or `"refused"` (as the access log and test files write it).
    pub fn as_str(&self) -> &'static str {
        match self {
            Outcome::Allow => "allow",
            Outcome::Deny => "deny",
            Outcome::Refused => "refused",
        }
    }

    /// Parses [`as_str`](Self::as_str)'s words.
    pub fn parse(s: &str) -> Option<Outcome> {
        match s {
            "allow" => Some(Outcome::Allow),
            "deny" => Some(Outcome::Deny),
            "refused" => Some(Outcome::Refused),
            _ => None,
        }
    }
}

impl From<Action> for Outcome {
    fn from(a: Action) -> Outcome {
        match a {
            Action::Allow => Outcome::Allow,
            Action::Deny => Outcome::Deny,
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What was asked: an HTTP request or a TCP connection.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(untagged)]
pub enum Asked {
    /// An HTTP request.
    Http {
        /// The caller's SPIFFE ID.
        from: String,
        /// The method.
        method: String,
        /// The path as received (raw).
        path: String,
    },
    /// A TCP connection to an inbound listen port.
    Tcp {
        /// The caller's SPIFFE ID.
        from: String,
        /// The inbound listen port.
        port: u16,
    },
}

impl Asked {
    /// The caller's SPIFFE ID.
    pub fn caller(&self) -> &str {
        match self {
            Asked::Http { from, .. } | Asked::Tcp { from, .. } => from,
        }
    }
}

impl fmt::Display for Asked {
    /// `POST /api/orders from spiffe://…` or `TCP port 5432 from spiffe://…`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Asked::Http { from, method, path } => write!(f, "{method} {path} from {from}"),
            Asked::Tcp { from, port } => write!(f, "TCP port {port} from {from}"),
        }
    }
}

/// One decided request or connection read from an access-log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessRecord {
    /// What was asked.
    pub asked: Asked,
    /// What the sidecar did.
    pub outcome: Outcome,
    /// The deciding rule, or `default` (`None`: refused, or no policy was loaded).
    pub rule: Option<String>,
    /// SHA-256 of the policy that decided (`None`: no policy was loaded).
    pub policy: Option<String>,
}

/// Why a log line holds nothing to replay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skipped {
    /// Not an access-log line (another target, or not JSON from a sidecar at all).
    Other,
    /// An outbound access line: the caller's side, which no policy decides.
    Outbound,
    /// An inbound request refused before the policy hook (its framing or headers).
    Undecided,
}

/// What one log line is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogLine {
    /// A request or connection to decide again.
    Record(AccessRecord),
    /// Nothing to decide.
    Skipped(Skipped),
}

/// Why an access-log line cannot be read. `Display` says what is wrong with the line
/// (the caller adds file and line number).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LogLineError {
    /// The line stops inside the JSON object.
    #[error("truncated JSON: the line ends at column {column} inside the object (was the log cut mid-line?)")]
    Truncated {
        /// Where it ends.
        column: usize,
    },
    /// Not valid JSON, or a field of the wrong type, or an unknown field.
    #[error("malformed access-log line: {0}")]
    Malformed(String),
    /// An inbound request line without `raw_path`: written before the access log recorded
    /// what replay needs.
    #[error(
        "access-log line from an older sidecar: it has no `raw_path` (and `decision`, \
         `policy`), so the request cannot be decided again; replay logs written by a sidecar \
         of this version"
    )]
    OlderFormat,
    /// A field replay needs is missing.
    #[error("access-log line lacks `{0}`")]
    Missing(&'static str),
    /// `decision` has a value this version does not know.
    #[error("unknown decision `{0}`: expected `allow`, `deny` or `refused`")]
    UnknownDecision(String),
}

/// The top level of a JSON log line (trellis `--log-format json`). Fields replay does not
/// use are checked for presence only ([`IgnoredAny`]): no allocation for them.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLine {
    #[serde(default, rename = "timestamp")]
    _timestamp: Option<IgnoredAny>,
    #[serde(default, rename = "level")]
    _level: Option<IgnoredAny>,
    target: String,
    message: String,
    #[serde(default)]
    fields: Option<RawFields>,
}

/// The fields of an access-log line (HTTP and TCP).
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawFields {
    caller: Option<String>,
    direction: Option<String>,
    method: Option<String>,
    path: Option<IgnoredAny>,
    raw_path: Option<String>,
    #[serde(rename = "status")]
    _status: Option<IgnoredAny>,
    #[serde(rename = "duration_ms")]
    _duration_ms: Option<IgnoredAny>,
    #[serde(rename = "upstream")]
    _upstream: Option<IgnoredAny>,
    rule: Option<String>,
    decision: Option<String>,
    policy: Option<String>,
    port: Option<u16>,
    #[serde(rename = "spans")]
    _spans: Option<IgnoredAny>,
}

/// Reads one log line. Lines that are not access-log lines (other targets, text-format
/// lines, blank lines) are [`Skipped::Other`]; an access-log line that cannot be read is an
/// error.
///
/// ```
/// use trellis_policy::{parse_access_line, LogLine, Outcome};
/// let line = r#"{"timestamp":"2026-01-01T00:00:00Z","level":"INFO","target":"trellis::access","message":"request","fields":{"caller":"spiffe://example.org/ns/prod/sa/web","direction":"inbound","method":"GET","path":"/api/orders","raw_path":"/api//orders","status":200,"duration_ms":0.4,"upstream":"127.0.0.1:8080","rule":"api","decision":"allow","policy":"ab12"}}"#;
/// let LogLine::Record(r) = parse_access_line(line).unwrap() else { panic!() };
/// assert_eq!(r.outcome, Outcome::Allow);
/// assert_eq!(r.asked.to_string(), "GET /api//orders from spiffe://example.org/ns/prod/sa/web");
/// ```
pub fn parse_access_line(line: &str) -> Result<LogLine, LogLineError> {
    // The JSON formatter writes `"target":"trellis::access"` verbatim; inside any string
    // value the quotes would be escaped, so this cannot match a message that merely
    // mentions the target. Cheap enough to skip every other line without parsing it.
    if !line.contains(r#""target":"trellis::access""#) {
        return Ok(LogLine::Skipped(Skipped::Other));
    }
    let raw: RawLine = serde_json::from_str(line).map_err(|e| {
        if e.is_eof() {
            LogLineError::Truncated {
                column: line.chars().count(),
            }
        } else {
            LogLineError::Malformed(e.to_string())
        }
    })?;
    if raw.target != ACCESS_LOG_TARGET {
        return Ok(LogLine::Skipped(Skipped::Other));
    }
    let f = raw.fields.unwrap_or_default();
    if f.direction.as_deref() == Some("outbound") {
        return Ok(LogLine::Skipped(Skipped::Outbound));
    }
    let tcp = match raw.message.as_str() {
        "request" => false,
        "connection" => true,
        _ => return Ok(LogLine::Skipped(Skipped::Other)),
    };
    if !tcp && f.raw_path.is_none() {
        // Written before the access log carried `raw_path`: `path` alone is the
        // normalized path of an allowed request, which replay cannot decide again.
        if f.path.is_some() && f.decision.is_none() && f.policy.is_none() {
            return Err(LogLineError::OlderFormat);
        }
        return Err(LogLineError::Missing("raw_path"));
    }
    let Some(decision) = f.decision else {
        return Ok(LogLine::Skipped(Skipped::Undecided));
    };
    let outcome = Outcome::parse(&decision).ok_or(LogLineError::UnknownDecision(decision))?;
    let from = f.caller.ok_or(LogLineError::Missing("caller"))?;
    let asked = if tcp {
        Asked::Tcp {
            from,
            port: f.port.ok_or(LogLineError::Missing("port"))?,
        }
    } else {
        Asked::Http {
            from,
            method: f.method.ok_or(LogLineError::Missing("method"))?,
            path: f.raw_path.ok_or(LogLineError::Missing("raw_path"))?,
        }
    };
    Ok(LogLine::Record(AccessRecord {
        asked,
        outcome,
        rule: f.rule,
        policy: f.policy,
    }))
}

/// A decision with its deciding rule (`default`; `(refused)` with the reason for a path
/// refused before authorization; `(no policy)` when none was loaded).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct Decided {
    /// What happened.
    pub outcome: Outcome,
    /// Why: the rule, `default`, or what refused it.
    pub rule: String,
}

impl fmt::Display for Decided {
    /// `allow (api)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.outcome, self.rule)
    }
}

/// Decides a request or connection under `policy` exactly as a sidecar does.
pub fn decide_asked(policy: &CompiledPolicy, asked: &Asked) -> Decided {
    match asked {
        Asked::Http { from, method, path } => match policy.decide_request(from, method, path) {
            Ok(r) => Decided {
                outcome: r.decision.action.into(),
                rule: r.decision.rule.to_owned(),
            },
            Err(e) => Decided {
                outcome: Outcome::Refused,
                rule: e.reason().to_owned(),
            },
        },
        Asked::Tcp { from, port } => {
            let d = policy.decide_l4(from, *port);
            Decided {
                outcome: d.action.into(),
                rule: d.rule.to_owned(),
            }
        }
    }
}

/// How many of each outcome.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Tally {
    /// Allowed.
    pub allow: u64,
    /// Denied.
    pub deny: u64,
    /// Refused before authorization.
    pub refused: u64,
}

impl Tally {
    fn add(&mut self, o: Outcome) {
        match o {
            Outcome::Allow => self.allow += 1,
            Outcome::Deny => self.deny += 1,
            Outcome::Refused => self.refused += 1,
        }
    }
}

/// Changes of one rule pair, with the first example seen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RuleChange {
    /// The rule that decided before.
    pub old_rule: String,
    /// The rule that decides now.
    pub new_rule: String,
    /// How many recorded requests and connections.
    pub count: u64,
    /// The first one.
    pub example: Asked,
}

/// How many changed for one caller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CallerChange {
    /// The caller's SPIFFE ID.
    pub caller: String,
    /// How many of its requests and connections.
    pub count: u64,
}

/// Every change from one outcome to another (`allow → deny`, …).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChangeGroup {
    /// The outcome recorded.
    pub from: Outcome,
    /// The outcome under the new policy.
    pub to: Outcome,
    /// How many.
    pub count: u64,
    /// By rule pair, most first.
    pub by_rule: Vec<RuleChange>,
    /// By caller, most first.
    pub by_caller: Vec<CallerChange>,
}

/// What a replay found.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ReplayReport {
    /// The new policy's hash.
    pub policy: String,
    /// HTTP requests decided again.
    pub requests: u64,
    /// TCP connections decided again.
    pub connections: u64,
    /// Lines that were not access-log lines.
    pub other_lines: u64,
    /// Outbound access lines (no policy decides them).
    pub outbound: u64,
    /// Inbound requests refused before the policy hook.
    pub undecided: u64,
    /// The policies that made the recorded decisions (hashes; empty: none was loaded).
    pub recorded_policies: Vec<String>,
    /// The recorded outcomes.
    pub recorded: Tally,
    /// The outcomes under the new policy.
    pub replayed: Tally,
    /// Requests and connections whose outcome changes.
    pub changed: u64,
    /// Same outcome, another deciding rule.
    pub rule_changed: u64,
    /// The changes, grouped by outcome pair.
    pub changes: Vec<ChangeGroup>,
}

#[derive(Default)]
struct Group {
    count: u64,
    by_rule: HashMap<(String, String), (u64, Asked)>,
    by_caller: HashMap<String, u64>,
}

/// Replays access-log records under a policy: feed [`record`](Self::record) and
/// [`skip`](Self::skip), then [`finish`](Self::finish).
pub struct Replay<'p> {
    policy: &'p CompiledPolicy,
    report: ReplayReport,
    policies: BTreeSet<String>,
    groups: BTreeMap<(Outcome, Outcome), Group>,
}

impl<'p> Replay<'p> {
    /// A replay under `policy`.
    pub fn new(policy: &'p CompiledPolicy) -> Self {
        Replay {
            policy,
            report: ReplayReport {
                policy: policy.hash().to_owned(),
                ..ReplayReport::default()
            },
            policies: BTreeSet::new(),
            groups: BTreeMap::new(),
        }
    }

    /// Counts a line with nothing to decide.
    pub fn skip(&mut self, why: Skipped) {
        match why {
            Skipped::Other => self.report.other_lines += 1,
            Skipped::Outbound => self.report.outbound += 1,
            Skipped::Undecided => self.report.undecided += 1,
        }
    }

    /// Decides one record again and compares. Returns the new decision.
    pub fn record(&mut self, r: &AccessRecord) -> Decided {
        let now = decide_asked(self.policy, &r.asked);
        match r.asked {
            Asked::Http { .. } => self.report.requests += 1,
            Asked::Tcp { .. } => self.report.connections += 1,
        }
        if let Some(p) = &r.policy {
            if !self.policies.contains(p) {
                self.policies.insert(p.clone());
            }
        }
        self.report.recorded.add(r.outcome);
        self.report.replayed.add(now.outcome);
        let old_rule = r.rule.as_deref().unwrap_or(match (r.outcome, &r.policy) {
            (Outcome::Refused, _) => "refused",
            (_, None) => "no policy",
            (_, Some(_)) => "?",
        });
        if now.outcome == r.outcome {
            if old_rule != now.rule && r.policy.is_some() && now.outcome != Outcome::Refused {
                self.report.rule_changed += 1;
            }
            return now;
        }
        self.report.changed += 1;
        let g = self.groups.entry((r.outcome, now.outcome)).or_default();
        g.count += 1;
        g.by_rule
            .entry((old_rule.to_owned(), now.rule.clone()))
            .or_insert_with(|| (0, r.asked.clone()))
            .0 += 1;
        *g.by_caller.entry(r.asked.caller().to_owned()).or_default() += 1;
        now
    }

    /// The report: groups in the order allow→deny, allow→refused, deny→allow, …; rule
    /// pairs and callers most first (ties by name).
    pub fn finish(mut self) -> ReplayReport {
        self.report.recorded_policies = self.policies.into_iter().collect();
        self.report.changes = self
            .groups
            .into_iter()
            .map(|((from, to), g)| {
                let mut by_rule: Vec<RuleChange> = g
                    .by_rule
                    .into_iter()
                    .map(|((old_rule, new_rule), (count, example))| RuleChange {
                        old_rule,
                        new_rule,
                        count,
                        example,
                    })
                    .collect();
                by_rule.sort_by(|a, b| {
                    b.count
                        .cmp(&a.count)
                        .then_with(|| (&a.old_rule, &a.new_rule).cmp(&(&b.old_rule, &b.new_rule)))
                });
                let mut by_caller: Vec<CallerChange> = g
                    .by_caller
                    .into_iter()
                    .map(|(caller, count)| CallerChange { caller, count })
                    .collect();
                by_caller.sort_by(|a, b| b.count.cmp(&a.count).then(a.caller.cmp(&b.caller)));
                ChangeGroup {
                    from,
                    to,
                    count: g.count,
                    by_rule,
                    by_caller,
                }
            })
            .collect();
        self.report
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY_OLD: &str = "apiVersion: trellis.io/v1\nkind: Policy\nrules:\n  - name: api\n    action: allow\n    from: [spiffe://example.org/ns/prod/sa/web]\n    to:\n      - paths: [/api/**]\n  - name: db\n    action: allow\n    from: [\"*\"]\n    ports: [5432]\n";
    const POLICY_NEW: &str = "apiVersion: trellis.io/v1\nkind: Policy\nrules:\n  - name: api-read\n    action: allow\n    from: [spiffe://example.org/ns/prod/sa/web]\n    to:\n      - methods: [GET]\n        paths: [/api/**]\n";
    const WEB: &str = "spiffe://example.org/ns/prod/sa/web";

    fn policy(text: &str) -> CompiledPolicy {
        crate::compile(&[("p.yaml", text)]).unwrap()
    }

    fn http_line(method: &str, raw: &str, decision: &str, rule: &str) -> String {
        format!(
            r#"{{"timestamp":"2026-01-01T00:00:00.000001Z","level":"INFO","target":"trellis::access","message":"request","fields":{{"caller":"{WEB}","direction":"inbound","method":"{method}","path":"{raw}","raw_path":"{raw}","status":200,"duration_ms":0.1,"upstream":"127.0.0.1:1","rule":"{rule}","decision":"{decision}","policy":"h1"}}}}"#
        )
    }

    fn record(line: &str) -> AccessRecord {
        match parse_access_line(line).unwrap() {
            LogLine::Record(r) => r,
            other => panic!("not a record: {other:?}"),
        }
    }

    #[test]
    fn reads_http_and_tcp_lines() {
        let r = record(&http_line("POST", "/api/orders", "allow", "api"));
        assert_eq!(
            r.asked,
            Asked::Http {
                from: WEB.into(),
                method: "POST".into(),
                path: "/api/orders".into()
            }
        );
        assert_eq!(
            (r.outcome, r.rule.as_deref()),
            (Outcome::Allow, Some("api"))
        );
        let tcp = format!(
            r#"{{"timestamp":"t","level":"INFO","target":"trellis::access","message":"connection","fields":{{"caller":"{WEB}","direction":"inbound","port":5432,"decision":"deny","rule":"default","policy":"h1"}}}}"#
        );
        let r = record(&tcp);
        assert_eq!(r.asked.to_string(), format!("TCP port 5432 from {WEB}"));
        assert_eq!(r.outcome, Outcome::Deny);
    }

    #[test]
    fn skips_other_lines_outbound_and_undecided() {
        for line in [
            "",
            "2026-01-01T00:00:00Z  INFO trellis::access: request caller=x",
            r#"{"timestamp":"t","level":"INFO","target":"trellis_sidecar","message":"ready"}"#,
            r#"{"timestamp":"t","level":"WARN","target":"trellis","message":"\"target\":\"trellis::access\" mentioned"}"#,
        ] {
            assert_eq!(
                parse_access_line(line),
                Ok(LogLine::Skipped(Skipped::Other)),
                "{line}"
            );
        }
        let out = r#"{"timestamp":"t","level":"INFO","target":"trellis::access","message":"request","fields":{"caller":"x","direction":"outbound","method":"GET","path":"/","status":200,"duration_ms":1.0,"upstream":"b"}}"#;
        assert_eq!(
            parse_access_line(out),
            Ok(LogLine::Skipped(Skipped::Outbound))
        );
        let undecided = r#"{"timestamp":"t","level":"INFO","target":"trellis::access","message":"request","fields":{"caller":"x","direction":"inbound","method":"GET","path":"/","raw_path":"/","status":414,"duration_ms":1.0,"upstream":"b"}}"#;
        assert_eq!(
            parse_access_line(undecided),
            Ok(LogLine::Skipped(Skipped::Undecided))
        );
    }

    #[test]
    fn truncated_json_is_an_error_that_says_so() {
        let line = http_line("GET", "/api/x", "allow", "api");
        let cut = &line[..line.len() - 20];
        let e = parse_access_line(cut).unwrap_err();
        assert!(matches!(e, LogLineError::Truncated { .. }), "{e:?}");
        assert!(e.to_string().starts_with("truncated JSON"), "{e}");
    }

    #[test]
    fn older_format_is_an_error_that_says_so() {
        let old = r#"{"timestamp":"t","level":"INFO","target":"trellis::access","message":"request","fields":{"caller":"x","direction":"inbound","method":"GET","path":"/api","status":403,"duration_ms":1.0,"upstream":"b","rule":"default"}}"#;
        let e = parse_access_line(old).unwrap_err();
        assert_eq!(e, LogLineError::OlderFormat);
        assert!(e.to_string().contains("older sidecar"), "{e}");
    }

    #[test]
    fn unknown_fields_are_an_error_naming_them() {
        let line = http_line("GET", "/api/x", "allow", "api")
            .replace(r#""policy":"h1""#, r#""policy":"h1","tenant":"blue""#);
        let e = parse_access_line(&line).unwrap_err();
        assert!(e.to_string().contains("unknown field `tenant`"), "{e}");
        let line = http_line("GET", "/api/x", "maybe", "api");
        assert_eq!(
            parse_access_line(&line),
            Err(LogLineError::UnknownDecision("maybe".into()))
        );
    }

    #[test]
    fn replay_counts_changes_by_outcome_rule_and_caller() {
        let new = policy(POLICY_NEW);
        let mut replay = Replay::new(&new);
        for line in [
            http_line("GET", "/api/orders", "allow", "api"),
            http_line("POST", "/api/orders", "allow", "api"),
            http_line("POST", "/api/orders", "allow", "api"),
            http_line("GET", "/other", "deny", "default"),
            http_line("GET", "/a/%2f", "refused", "x"),
        ] {
            replay.record(&record(&line));
        }
        replay.skip(Skipped::Other);
        let r = replay.finish();
        assert_eq!((r.requests, r.changed, r.other_lines), (5, 2, 1));
        assert_eq!(r.rule_changed, 1, "GET /api/orders: api → api-read");
        assert_eq!(r.recorded_policies, vec!["h1".to_owned()]);
        assert_eq!(
            r.replayed,
            Tally {
                allow: 1,
                deny: 3,
                refused: 1
            }
        );
        let [g] = &r.changes[..] else {
            panic!("{:?}", r.changes)
        };
        assert_eq!((g.from, g.to, g.count), (Outcome::Allow, Outcome::Deny, 2));
        assert_eq!(
            (
                g.by_rule[0].old_rule.as_str(),
                g.by_rule[0].new_rule.as_str()
            ),
            ("api", "default")
        );
        assert_eq!(
            g.by_rule[0].example.to_string(),
            format!("POST /api/orders from {WEB}")
        );
        assert_eq!(g.by_caller[0].caller, WEB);
    }

    #[test]
    fn replay_decides_like_the_sidecar_on_raw_paths() {
        // The raw path is normalized and read with and without `;` parameters, as
        // `decide_request` does in the sidecar.
        let p = policy("apiVersion: trellis.io/v1\nkind: Policy\ndefaultAction: allow\nrules:\n  - name: no-admin\n    action: deny\n    from: [\"*\"]\n    to:\n      - paths: [/admin/**]\n");
        for (raw, want) in [
            ("/admin;x/export", Outcome::Deny),
            ("/public/../admin/x", Outcome::Deny),
            ("/a/%2f", Outcome::Refused),
            ("/public", Outcome::Allow),
        ] {
            let asked = Asked::Http {
                from: WEB.into(),
                method: "GET".into(),
                path: raw.into(),
            };
            assert_eq!(decide_asked(&p, &asked).outcome, want, "{raw}");
        }
        let old = policy(POLICY_OLD);
        let tcp = Asked::Tcp {
            from: WEB.into(),
            port: 5432,
        };
        assert_eq!(decide_asked(&old, &tcp).rule, "db");
        assert_eq!(
            decide_asked(&policy(POLICY_NEW), &tcp).outcome,
            Outcome::Deny
        );
    }
}
