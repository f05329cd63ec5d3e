//! The policy as operators and the sidecar use it, through the public API only: the
//! issue's scenarios, the examples of the crate README and docs/policy.md, and the errors a
//! user sees.
#![allow(clippy::unwrap_used)]

use trellis_policy::{
    compile, normalize_path, Action, AuditHit, ExplainedRequest, Mode, PathError, PathParameters,
    Reading, WarningKind, DEFAULT_RULE,
};

const SERVICE_A: &str = "spiffe://example.org/ns/prod/sa/service-a";

/// The example from the crate README (and issue 4), verbatim.
const README_POLICY: &str = "\
apiVersion: trellis.io/v1
kind: Policy
defaultAction: deny          # allow | deny; optional, default deny
mode: enforce                # enforce | audit; optional, default enforce
pathParameters: strictest    # strictest | reject | literal; optional, default strictest
caseInsensitivePaths: false  # true | false; optional, default false
rules:
  - name: lb-health
    action: allow
    from: [spiffe://example.org/ns/prod/sa/service-a]
    to:
      - methods: [GET]
        paths: [/load-balancer/health]
  - name: no-export
    action: deny
    mode: audit              # this rule only reports what it would do
    from: [\"*\"]
    to:
      - paths: [/admin/**]
  - name: db-clients         # an L4 rule: `from` and optionally `ports`, no `to`
    action: allow
    from: [spiffe://example.org/ns/prod/*]
    ports: [5432]
";

#[test]
fn readme_policy_compiles_and_decides() {
    let p = compile(&[("policy.yaml", README_POLICY)]).unwrap();
    assert_eq!(p.rule_count(), 3);
    assert_eq!(p.mode(), Mode::Enforce);
    assert_eq!(p.path_parameters(), PathParameters::Strictest);
    assert!(!p.case_insensitive_paths());
    assert_eq!(p.lint(), []);

    let health = normalize_path("/load-balancer/health").unwrap();
    let d = p.decide(SERVICE_A, "GET", &health);
    assert_eq!(
        (d.action, d.rule, d.audit),
        (Action::Allow, "lb-health", None)
    );

    // no-export is in audit mode: the export falls to the default deny, and the audit
    // rule is not reported because it would not change the outcome.
    let export = normalize_path("/admin/user-export").unwrap();
    let d = p.decide(SERVICE_A, "GET", &export);
    assert_eq!(
        (d.action, d.rule, d.audit),
        (Action::Deny, DEFAULT_RULE, None)
    );

    assert!(p
        .decide_l4("spiffe://example.org/ns/prod/db-client", 5432)
        .is_allowed());
    assert!(!p
        .decide_l4("spiffe://example.org/ns/prod/sa/db-client", 5432)
        .is_allowed());
}

#[test]
fn issue_scenario_health_allowed_export_forbidden_stranger_denied() {
    let text = README_POLICY.replace(
        "    mode: audit              # this rule only reports what it would do\n",
        "",
    );
    let p = compile(&[("policy.yaml", text.as_str())]).unwrap();
    let health = normalize_path("/load-balancer/health").unwrap();
    let export = normalize_path("/admin/user-export").unwrap();
    assert!(p.decide(SERVICE_A, "GET", &health).is_allowed());
    let d = p.decide(SERVICE_A, "GET", &export);
    assert_eq!((d.action, d.rule), (Action::Deny, "no-export"));
    let d = p.decide("spiffe://example.org/ns/prod/sa/stranger", "GET", &health);
    assert_eq!((d.action, d.rule), (Action::Deny, "default"));
}

#[test]
fn audit_deny_over_enforced_allow_is_reported_not_enforced() {
    let text = README_POLICY.replace(
        "    to:\n      - methods: [GET]\n        paths: [/load-balancer/health]\n",
        "",
    );
    let p = compile(&[("policy.yaml", text.as_str())]).unwrap();
    let export = normalize_path("/admin/user-export").unwrap();
    let d = p.decide(SERVICE_A, "GET", &export);
    assert_eq!(d.action, Action::Allow);
    assert_eq!(d.rule, "lb-health");
    assert_eq!(
        d.audit,
        Some(AuditHit {
            action: Action::Deny,
            rule: "no-export"
        })
    );
}

#[test]
fn readme_error_examples_are_what_users_see() {
    let typo = README_POLICY.replace("      - methods: [GET]", "      - metods: [GET]");
    let e = compile(&[("policy.yaml", typo.as_str())]).unwrap_err();
    assert_eq!(
        e.to_string(),
        "policy.yaml:12:9: rules[0].to[0]: unknown field `metods`, expected `methods` or `paths`"
    );

    let bad = README_POLICY.replace("paths: [/admin/**]", "paths: [/a/**/b]");
    let e = compile(&[("policy.yaml", bad.as_str())]).unwrap_err();
    assert_eq!(
        e.to_string(),
        "policy.yaml:19:17: path pattern `/a/**/b`: `**` may only end a pattern (`/admin/**`)"
    );

    let e = compile(&[("a.yaml", README_POLICY), ("b.yaml", README_POLICY)]).unwrap_err();
    assert_eq!(
        e.to_string(),
        "b.yaml:8:11: duplicate rule name `lb-health`: first defined at a.yaml:8:11; rule \
         names must be unique across all policy files"
    );
}

#[test]
fn hostile_spellings_of_admin_are_denied_or_refused() {
    let p = compile(&[(
        "p.yaml",
        "apiVersion: trellis.io/v1\nkind: Policy\ndefaultAction: allow\nrules:\n  - name: no-admin\n    action: deny\n    from: [\"*\"]\n    to: [{paths: [/admin/**]}]\n",
    )])
    .unwrap();
    for raw in [
        "/admin",
        "/admin/",
        "//admin/x",
        "/%61dmin/x",
        "/%61%64%6d%69%6e",
        "/x/../admin",
        "/x/%2e%2e/admin",
        "/x/%2E./admin",
        "/./admin",
        "/admin/./x/../y",
    ] {
        let n = normalize_path(raw).unwrap();
        let d = p.decide(SERVICE_A, "GET", &n);
        assert_eq!(
            (d.action, d.rule),
            (Action::Deny, "no-admin"),
            "{raw} -> {n}"
        );
    }
    for (raw, err) in [
        ("/admin%2Fx", PathError::EncodedSlash),
        ("/public%2F..%2Fadmin", PathError::EncodedSlash),
        ("/public\\..\\admin", PathError::Backslash),
        ("/public/%5C../admin", PathError::Backslash),
        ("/../admin", PathError::AboveRoot),
        ("/%2e%2e/admin", PathError::AboveRoot),
        ("/admin%00.html", PathError::ControlCharacter),
        ("/public?/admin", PathError::QueryOrFragment),
    ] {
        assert_eq!(normalize_path(raw), Err(err), "{raw}");
    }
    // As the sidecar decides a raw path: `;` parameters are read both ways (the default
    // `pathParameters: strictest`), so the servlet container's reading is denied too.
    for raw in [
        "/admin;x/users",
        "/public/..;/admin",
        "/;/admin",
        "/admin;jsessionid=1",
    ] {
        let r = p.decide_request(SERVICE_A, "GET", raw).unwrap();
        assert_eq!(
            (r.decision.action, r.decision.rule, r.reading),
            (Action::Deny, "no-admin", Reading::WithoutParameters),
            "{raw}"
        );
    }
    assert_eq!(
        p.decide_request(SERVICE_A, "GET", "/..;/admin"),
        Err(PathError::AboveRoot)
    );
    for raw in [
        "/administrator",
        "/ADMIN",
        "/%252e%252e/admin",
        "/admin%3Bx/users",
    ] {
        let r = p.decide_request(SERVICE_A, "GET", raw).unwrap();
        assert!(r.decision.is_allowed(), "{raw}");
    }
}

#[test]
fn uppercase_admin_is_denied_once_paths_are_case_insensitive() {
    let text = "apiVersion: trellis.io/v1\nkind: Policy\ndefaultAction: allow\ncaseInsensitivePaths: true\nrules:\n  - name: no-admin\n    action: deny\n    from: [\"*\"]\n    to: [{paths: [/admin/**]}]\n";
    let p = compile(&[("p.yaml", text)]).unwrap();
    for raw in ["/ADMIN", "/Admin/user-export", "/ADMIN;x/users", "/%41DMIN"] {
        let r = p.decide_request(SERVICE_A, "GET", raw).unwrap();
        assert_eq!(
            (r.decision.action, r.decision.rule),
            (Action::Deny, "no-admin"),
            "{raw}"
        );
    }
    let r = p.decide_request(SERVICE_A, "GET", "/Public/Page").unwrap();
    assert!(r.decision.is_allowed());
    assert_eq!(r.path.as_str(), "/Public/Page");
    assert_eq!(p.lint(), []);
}

#[test]
fn readme_policy_without_the_case_setting_gets_the_case_lint() {
    let text = README_POLICY.replace(
        "caseInsensitivePaths: false  # true | false; optional, default false\n",
        "",
    );
    let p = compile(&[("policy.yaml", text.as_str())]).unwrap();
    let w = p.lint();
    assert_eq!(w.len(), 1, "{w:?}");
    assert_eq!(w[0].kind, WarningKind::CaseSensitivePath);
    assert!(
        w[0].to_string().starts_with(
            "policy.yaml:18:17: warning: deny rule `no-export`: paths are matched \
             case-sensitively, so `/ADMIN/**` is not denied by `/admin/**`"
        ),
        "{}",
        w[0]
    );
}

#[test]
fn explain_prints_a_readable_report() {
    let p = compile(&[("policy.yaml", README_POLICY)]).unwrap();
    let x = p.explain(SERVICE_A, "POST", "/load-balancer/health");
    assert!(matches!(x.request, ExplainedRequest::Http { .. }));
    assert_eq!(
        x.to_string(),
        "caller:   spiffe://example.org/ns/prod/sa/service-a
request:  POST /load-balancer/health
decision: deny by default (no rule matched)
matched:  none (defaultAction: deny)
near misses:
  allow         lb-health  (policy.yaml:8:11): to[0]: method POST not in [GET]
  deny (audit)  no-export  (policy.yaml:14:11): to[0]: path /load-balancer/health matches none of [/admin/**]
"
    );
}

#[test]
fn lint_warnings_display_with_location() {
    let text = format!(
        "{README_POLICY}  - name: lb-health-again\n    action: allow\n    from: [spiffe://example.org/ns/prod/sa/service-a]\n    to:\n      - methods: [GET]\n        paths: [/load-balancer/health]\n"
    );
    let p = compile(&[("policy.yaml", text.as_str())]).unwrap();
    let w = p.lint();
    assert_eq!(w.len(), 1);
    assert_eq!(w[0].kind, WarningKind::Redundant);
    assert_eq!(
        w[0].to_string(),
        "policy.yaml:24:11: warning: rule `lb-health-again` is redundant: rule `lb-health` \
         (policy.yaml:8:11) has the same scope and action and comes first"
    );
}

#[test]
fn ten_thousand_rules_compile_and_decide() {
    let mut text = String::from("apiVersion: trellis.io/v1\nkind: Policy\nrules:\n");
    for i in 0..10_000 {
        text.push_str(&format!(
            "  - name: r{i}\n    action: allow\n    from: [spiffe://example.org/ns/n{}/sa/s{i}]\n    to: [{{paths: [/api/{i}/**]}}]\n",
            i % 97
        ));
    }
    let p = compile(&[("big.yaml", text.as_str())]).unwrap();
    assert_eq!(p.rule_count(), 10_000);
    let path = normalize_path("/api/9876/x").unwrap();
    let d = p.decide("spiffe://example.org/ns/n79/sa/s9876", "GET", &path);
    assert_eq!((d.action, d.rule), (Action::Allow, "r9876"));
    assert!(p.lint().is_empty());
}
