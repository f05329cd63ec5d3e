//! `trellis policy test`: a file of requests and the decisions a policy must make.
//!
//! ```yaml
//! policy: [service-b.yaml]          # relative to the test file
//! tests:
//!   - { from: spiffe://example.org/ns/prod/sa/web, method: GET,  path: /api/orders, expect: allow, rule: api }
//!   - { from: spiffe://example.org/ns/prod/sa/web, method: POST, path: /admin/x,    expect: deny }
//!   - { from: spiffe://example.org/ns/prod/sa/web, method: GET,  path: /a/%2f,      expect: refused }
//!   - { from: spiffe://example.org/ns/prod/sa/db,  port: 5432,                      expect: allow }
//! ```
//!
//! A test is an HTTP request (`path`, and `method`, default `GET`; the path raw, as a caller
//! sends it) or a TCP connection (`port`). `expect` is `allow`, `deny` or `refused` (400
//! before authorization); `rule`, when given, must be the deciding rule (`default` for
//! `defaultAction`). Unknown fields are errors, located like policy errors.

use std::fmt;

use serde::Deserialize;

use crate::error::PolicyError;
use crate::located::{yaml_error, Located};
use crate::policy::CompiledPolicy;
use crate::replay::{decide_asked, Asked, Decided, Outcome};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTestFile {
    policy: Vec<Located>,
    tests: Vec<RawCase>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCase {
    from: Located,
    #[serde(default)]
    method: Option<Located>,
    #[serde(default)]
    path: Option<Located>,
    #[serde(default)]
    port: Option<Located>,
    expect: Located,
    #[serde(default)]
    rule: Option<Located>,
}

/// One expected decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestCase {
    /// Line of the test in its file (its `from`).
    pub line: usize,
    /// The request or connection.
    pub asked: Asked,
    /// The outcome it must get.
    pub expect: Outcome,
    /// The rule that must decide, when given.
    pub rule: Option<String>,
}

/// A parsed test file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyTestFile {
    /// The policy files, as written (relative to the test file).
    pub policy: Vec<String>,
    /// The tests, in file order.
    pub tests: Vec<TestCase>,
}

/// A test that did not get what it expected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestFailure {
    /// The test.
    pub case: TestCase,
    /// What the policy decided, and by which rule.
    pub got: Decided,
}

impl fmt::Display for TestFailure {
    /// `GET /api from spiffe://…: expected allow (rule api), got deny (rule default)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: expected {}", self.case.asked, self.case.expect)?;
        if let Some(rule) = &self.case.rule {
            write!(f, " (rule {rule})")?;
        }
        let by = if self.got.outcome == Outcome::Refused {
            "reason"
        } else {
            "rule"
        };
        write!(f, ", got {} ({by} {})", self.got.outcome, self.got.rule)
    }
}

/// Parses a test file (`source` names it in errors). Checks every value; the policy
/// files are the caller's to read.
pub fn parse_policy_test(source: &str, text: &str) -> Result<PolicyTestFile, PolicyError> {
    let raw: RawTestFile = serde_yaml_ng::from_str(text).map_err(|e| {
        if text
            .lines()
            .all(|l| l.trim().is_empty() || l.trim().starts_with('#'))
        {
            PolicyError::new(
                source,
                1,
                1,
                "the file is empty: a policy test file has `policy` (the policy files, \
                 relative to it) and `tests` (a list of `{from, method, path, expect, rule}`)",
            )
        } else {
            yaml_error(source, &e)
        }
    })?;
    if raw.policy.is_empty() {
        return Err(PolicyError::new(
            source,
            1,
            1,
            "`policy` is empty: list the policy files these tests run against",
        ));
    }
    let tests = raw
        .tests
        .into_iter()
        .map(|c| case(source, c))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(PolicyTestFile {
        policy: raw.policy.into_iter().map(|l| l.value).collect(),
        tests,
    })
}

fn case(source: &str, c: RawCase) -> Result<TestCase, PolicyError> {
    let from = c.from.value.clone();
    if !from.starts_with("spiffe://") {
        return Err(c.from.error(
            source,
            format!("from `{from}`: expected the caller's SPIFFE ID (`spiffe://…`)"),
        ));
    }
    let asked = match (&c.path, &c.port) {
        (Some(path), None) => Asked::Http {
            from,
            method: c
                .method
                .as_ref()
                .map_or("GET".to_owned(), |m| m.value.clone()),
            path: path.value.clone(),
        },
        (None, Some(port)) => {
            if let Some(m) = &c.method {
                return Err(m.error(
                    source,
                    "`method` with `port`: a TCP test has no method (drop one of them)",
                ));
            }
            let port = match port.value.parse::<u16>() {
                Ok(p) if p != 0 => p,
                _ => {
                    return Err(port.error(
                        source,
                        format!(
                            "port `{}`: expected a TCP port number from 1 to 65535",
                            port.value
                        ),
                    ))
                }
            };
            Asked::Tcp { from, port }
        }
        (Some(_), Some(port)) => {
            return Err(port.error(
                source,
                "a test has `path` (an HTTP request) or `port` (a TCP connection), not both",
            ))
        }
        (None, None) => {
            return Err(c.from.error(
                source,
                "the test has neither `path` (an HTTP request) nor `port` (a TCP connection)",
            ))
        }
    };
    let expect = Outcome::parse(&c.expect.value).ok_or_else(|| {
        c.expect.error(
            source,
            format!(
                "expect `{}`: expected `allow`, `deny` or `refused`",
                c.expect.value
            ),
        )
    })?;
    if expect == Outcome::Refused {
        if let Some(r) = &c.rule {
            return Err(r.error(
                source,
                "`rule` with `expect: refused`: a refused path is decided by no rule",
            ));
        }
    }
    Ok(TestCase {
        line: c.from.line,
        asked,
        expect,
        rule: c.rule.map(|r| r.value),
    })
}

impl TestCase {
    /// Runs the test against `policy`: `None` when it passes.
    pub fn run(&self, policy: &CompiledPolicy) -> Option<TestFailure> {
        let got = decide_asked(policy, &self.asked);
        let ok = got.outcome == self.expect && self.rule.as_ref().is_none_or(|r| *r == got.rule);
        (!ok).then(|| TestFailure {
            case: self.clone(),
            got,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: &str = "apiVersion: trellis.io/v1\nkind: Policy\nrules:\n  - name: api\n    action: allow\n    from: [spiffe://example.org/ns/prod/sa/web]\n    to:\n      - paths: [/api/**]\n  - name: db\n    action: allow\n    from: [\"*\"]\n    ports: [5432]\n";

    const TESTS: &str = "policy: [service-b.yaml]          # relative to the test file
tests:
  - { from: spiffe://example.org/ns/prod/sa/web, method: GET,  path: /api/orders, expect: allow, rule: api }
  - { from: spiffe://example.org/ns/prod/sa/web, method: POST, path: /admin/x,    expect: deny }
  - { from: spiffe://example.org/ns/prod/sa/web, method: GET,  path: /a/%2f,      expect: refused }
  - { from: spiffe://example.org/ns/prod/sa/db,  port: 5432,  expect: allow, rule: db }
  - from: spiffe://example.org/ns/prod/sa/web
    path: /api/x
    expect: deny
";

    #[test]
    fn parses_the_issue_example_and_runs_it() {
        let file = parse_policy_test("t.yaml", TESTS).unwrap();
        assert_eq!(file.policy, vec!["service-b.yaml"]);
        assert_eq!(
            file.tests.iter().map(|t| t.line).collect::<Vec<_>>(),
            vec![3, 4, 5, 6, 7]
        );
        let policy = crate::compile(&[("p.yaml", POLICY)]).unwrap();
        let failures: Vec<_> = file.tests.iter().filter_map(|t| t.run(&policy)).collect();
        let [f] = &failures[..] else {
            panic!("{failures:?}")
        };
        assert_eq!(f.case.line, 7);
        assert_eq!(
            f.to_string(),
            "GET /api/x from spiffe://example.org/ns/prod/sa/web: expected deny, got allow (rule api)"
        );
    }

    #[test]
    fn a_wrong_rule_fails_even_with_the_right_outcome() {
        let file = parse_policy_test(
            "t.yaml",
            "policy: [p.yaml]\ntests:\n  - { from: spiffe://example.org/x, path: /, expect: deny, rule: api }\n",
        )
        .unwrap();
        let policy = crate::compile(&[("p.yaml", POLICY)]).unwrap();
        let f = file.tests[0].run(&policy).unwrap();
        assert_eq!(
            f.to_string(),
            "GET / from spiffe://example.org/x: expected deny (rule api), got deny (rule default)"
        );
    }

    #[test]
    fn bad_test_files_get_located_errors() {
        for (text, want) in [
            ("", "t.yaml:1:1: the file is empty"),
            ("policy: [p.yaml]\ntests:\n  - { from: spiffe://e.org/x, path: /, expect: allow, methd: GET }\n", "t.yaml:3:"),
            ("policy: [p.yaml]\ntests:\n  - { from: spiffe://e.org/x, path: /, expect: allowed }\n", "t.yaml:3:48: expect `allowed`: expected `allow`, `deny` or `refused`"),
            ("policy: [p.yaml]\ntests:\n  - { from: spiffe://e.org/x, expect: allow }\n", "neither `path`"),
            ("policy: [p.yaml]\ntests:\n  - { from: spiffe://e.org/x, port: 99999, expect: allow }\n", "port `99999`"),
            ("policy: [p.yaml]\ntests:\n  - { from: web, path: /, expect: allow }\n", "from `web`"),
            ("policy: []\ntests: []\n", "`policy` is empty"),
        ] {
            let e = parse_policy_test("t.yaml", text).unwrap_err().to_string();
            assert!(e.contains(want), "{text:?}: {e}");
        }
        let e = parse_policy_test("t.yaml", "policy: [p.yaml]\ntests:\n  - { from: spiffe://e.org/x, path: /, expect: allow, methd: GET }\n").unwrap_err();
        assert!(e.message.contains("unknown field `methd`"), "{e}");
    }
}
