//! Unit tests of compilation, evaluation, lints and explanations, one per hostile or
//! tricky input; and properties that tie the indexed matcher to the reference semantics.

use crate::*;

const HEAD: &str = "apiVersion: trellis.io/v1\nkind: Policy\n";
const A: &str = "spiffe://example.org/ns/prod/sa/service-a";
const B: &str = "spiffe://example.org/ns/prod/sa/service-b";
const DEV: &str = "spiffe://example.org/ns/dev/sa/tool";

fn policy(body: &str) -> CompiledPolicy {
    let text = format!("{HEAD}{body}");
    match compile(&[("policy.yaml", text.as_str())]) {
        Ok(p) => p,
        Err(e) => panic!("{e}\n---\n{text}"),
    }
}

fn error(body: &str) -> PolicyError {
    let text = format!("{HEAD}{body}");
    compile(&[("policy.yaml", text.as_str())]).unwrap_err()
}

fn decide<'p>(p: &'p CompiledPolicy, caller: &str, method: &str, path: &str) -> Decision<'p> {
    let n = normalize_path(path).unwrap();
    let d = p.decide(caller, method, &n);
    assert_eq!(
        d,
        p.decide_reference(caller, method, n.match_view()),
        "index and reference disagree for {caller} {method} {path}"
    );
    d
}

fn allowed(p: &CompiledPolicy, caller: &str, method: &str, path: &str) -> bool {
    decide(p, caller, method, path).is_allowed()
}

const EXAMPLE: &str = "\
defaultAction: deny
rules:
  - name: lb-health
    action: allow
    from: [spiffe://example.org/ns/prod/sa/service-a]
    to:
      - methods: [GET]
        paths: [/load-balancer/health]
  - name: no-export
    action: deny
    from: [\"*\"]
    to:
      - paths: [/admin/**]
  - name: prod-admin
    action: allow
    from: [spiffe://example.org/ns/prod/**]
    to:
      - paths: [/admin/**, /api/**]
";

// ---------------------------------------------------------------- semantics

#[test]
fn example_allows_health_and_denies_admin_export() {
    let p = policy(EXAMPLE);
    let d = decide(&p, A, "GET", "/load-balancer/health");
    assert_eq!(
        (d.action, d.rule, d.audit),
        (Action::Allow, "lb-health", None)
    );
    let d = decide(&p, A, "GET", "/admin/user-export");
    assert_eq!((d.action, d.rule), (Action::Deny, "no-export"));
}

#[test]
fn foreign_trust_domain_principals_are_rules_like_any_other() {
    // SPIFFE federation: a policy may name callers of another trust domain, exactly or by
    // prefix, and `spiffe://a.org/**` never covers a b.org caller.
    let p = policy(
        "defaultAction: deny\nrules:\n  - name: a-org\n    action: allow\n    from: [spiffe://a.org/ns/prod/**]\n    to:\n      - paths: [/api/**]\n  - name: b-org-web\n    action: allow\n    from: [spiffe://b.org/ns/prod/sa/web]\n    to:\n      - methods: [GET]\n        paths: [/health]\n",
    );
    assert!(allowed(
        &p,
        "spiffe://a.org/ns/prod/sa/frontend",
        "GET",
        "/api/x"
    ));
    assert!(allowed(
        &p,
        "spiffe://b.org/ns/prod/sa/web",
        "GET",
        "/health"
    ));
    assert!(!allowed(
        &p,
        "spiffe://b.org/ns/prod/sa/frontend",
        "GET",
        "/api/x"
    ));
    assert!(!allowed(
        &p,
        "spiffe://a.org.evil/ns/prod/sa/x",
        "GET",
        "/api/x"
    ));
    assert!(!allowed(&p, A, "GET", "/api/x"));
}

#[test]
fn deny_wins_over_allow() {
    // `prod-admin` allows /admin/** to prod, `no-export` denies it to everyone: deny wins,
    // wherever it stands in the file.
    let p = policy(EXAMPLE);
    assert_eq!(decide(&p, B, "GET", "/admin/x").rule, "no-export");
    let reordered = policy(
        "rules:
  - name: allow-first
    action: allow
    from: [\"*\"]
  - name: deny-second
    action: deny
    from: [\"*\"]
    to: [{paths: [/x]}]
",
    );
    assert_eq!(decide(&reordered, A, "GET", "/x").rule, "deny-second");
    assert_eq!(decide(&reordered, A, "GET", "/y").rule, "allow-first");
}

#[test]
fn unknown_caller_is_denied_by_default() {
    let p = policy(EXAMPLE);
    let d = decide(
        &p,
        "spiffe://example.org/ns/other/sa/x",
        "GET",
        "/load-balancer/health",
    );
    assert_eq!((d.action, d.rule), (Action::Deny, DEFAULT_RULE));
}

#[test]
fn default_allow_lets_unmatched_requests_through() {
    let p = policy("defaultAction: allow\nrules: []\n");
    let d = decide(&p, A, "GET", "/anything");
    assert_eq!((d.action, d.rule), (Action::Allow, "default"));
}

#[test]
fn default_action_defaults_to_deny() {
    let p = policy("rules: []\n");
    assert_eq!(p.default_action(), Action::Deny);
    assert!(!allowed(&p, A, "GET", "/"));
}

#[test]
fn first_matching_rule_of_the_winning_action_is_reported() {
    let p = policy(
        "rules:
  - name: one
    action: allow
    from: [\"*\"]
    to: [{paths: [/a/**]}]
  - name: two
    action: allow
    from: [spiffe://example.org/ns/prod/sa/service-a]
    to: [{paths: [/a/b]}]
",
    );
    assert_eq!(decide(&p, A, "GET", "/a/b").rule, "one");
}

#[test]
fn method_not_listed_is_not_matched() {
    let p = policy(EXAMPLE);
    assert_eq!(
        decide(&p, A, "POST", "/load-balancer/health").rule,
        DEFAULT_RULE
    );
}

#[test]
fn lowercase_method_matches_uppercase_rule() {
    let p = policy(
        "defaultAction: allow
rules:
  - name: no-delete
    action: deny
    from: [\"*\"]
    to: [{methods: [DELETE]}]
",
    );
    assert!(!allowed(&p, A, "delete", "/x"));
    assert!(!allowed(&p, A, "DeLeTe", "/x"));
    assert!(allowed(&p, A, "GET", "/x"));
}

#[test]
fn get_does_not_imply_head() {
    let p = policy(EXAMPLE);
    assert!(!allowed(&p, A, "HEAD", "/load-balancer/health"));
}

#[test]
fn admin_prefix_rule_does_not_cover_administrator() {
    let p = policy(
        "defaultAction: allow
rules:
  - name: no-admin
    action: deny
    from: [\"*\"]
    to: [{paths: [/admin/**]}]
",
    );
    assert!(!allowed(&p, A, "GET", "/admin"));
    assert!(!allowed(&p, A, "GET", "/admin/"));
    assert!(!allowed(&p, A, "GET", "/admin/x/y"));
    assert!(allowed(&p, A, "GET", "/administrator"));
    assert!(allowed(&p, A, "GET", "/ADMIN"));
}

#[test]
fn encoded_and_dotted_spellings_cannot_reach_admin() {
    let p = policy(
        "defaultAction: allow
rules:
  - name: no-admin
    action: deny
    from: [\"*\"]
    to: [{paths: [/admin/**]}]
",
    );
    for spelling in [
        "/%61dmin/users",
        "/public/../admin/users",
        "/public/%2e%2e/admin/users",
        "//admin//users",
        "/./admin/users",
        "/admin/./users/",
    ] {
        assert!(!allowed(&p, A, "GET", spelling), "{spelling}");
    }
}

#[test]
fn exact_path_rule_also_matches_trailing_slash() {
    let p = policy(
        "defaultAction: allow
rules:
  - name: no-admin
    action: deny
    from: [\"*\"]
    to: [{paths: [/admin]}]
",
    );
    assert!(!allowed(&p, A, "GET", "/admin"));
    assert!(!allowed(&p, A, "GET", "/admin/"));
    assert!(allowed(&p, A, "GET", "/admin/x"));
}

#[test]
fn single_star_path_matches_one_segment() {
    let p = policy(
        "rules:
  - name: users
    action: allow
    from: [\"*\"]
    to: [{paths: [/users/*, /orgs/*/members]}]
",
    );
    assert!(allowed(&p, A, "GET", "/users/42"));
    assert!(allowed(&p, A, "GET", "/users/42/"));
    assert!(!allowed(&p, A, "GET", "/users"));
    assert!(!allowed(&p, A, "GET", "/users/42/posts"));
    assert!(allowed(&p, A, "GET", "/orgs/acme/members"));
    assert!(!allowed(&p, A, "GET", "/orgs/acme/admins"));
}

#[test]
fn root_pattern_matches_only_root() {
    let p = policy(
        "rules:
  - name: root
    action: allow
    from: [\"*\"]
    to: [{paths: [/]}]
",
    );
    assert!(allowed(&p, A, "GET", "/"));
    assert!(!allowed(&p, A, "GET", "/x"));
}

#[test]
fn principal_patterns_match_on_segments() {
    let p = policy(
        "rules:
  - name: one-more
    action: allow
    from: [spiffe://example.org/ns/prod/*]
    to: [{paths: [/one]}]
  - name: any-more
    action: allow
    from: [spiffe://example.org/ns/prod/**]
    to: [{paths: [/any]}]
",
    );
    let direct = "spiffe://example.org/ns/prod/x";
    assert!(allowed(&p, direct, "GET", "/one"));
    assert!(!allowed(&p, A, "GET", "/one"));
    assert!(allowed(&p, A, "GET", "/any"));
    assert!(allowed(&p, direct, "GET", "/any"));
    assert!(!allowed(&p, "spiffe://example.org/ns/prod", "GET", "/any"));
    assert!(!allowed(
        &p,
        "spiffe://example.org/ns/production/x",
        "GET",
        "/any"
    ));
    assert!(!allowed(
        &p,
        "spiffe://example.org/ns/production/x",
        "GET",
        "/one"
    ));
}

#[test]
fn non_spiffe_caller_only_matches_star() {
    let p = policy(
        "rules:
  - name: any
    action: allow
    from: [\"*\"]
    to: [{paths: [/public]}]
  - name: td
    action: allow
    from: [spiffe://example.org/**]
",
    );
    assert!(allowed(&p, "garbage", "GET", "/public"));
    assert!(!allowed(&p, "garbage", "GET", "/other"));
    assert!(allowed(&p, A, "GET", "/other"));
}

#[test]
fn rule_without_to_covers_every_request() {
    let p = policy(
        "defaultAction: allow
rules:
  - name: no-dev
    action: deny
    from: [spiffe://example.org/ns/dev/**]
",
    );
    assert_eq!(decide(&p, DEV, "PATCH", "/x/y").rule, "no-dev");
    assert_eq!(p.decide_l4(DEV, 5432).rule, "no-dev");
    assert!(allowed(&p, A, "GET", "/x"));
}

#[test]
fn many_sibling_paths_are_all_found() {
    // Past a few children a trie node switches from a list to a hash map.
    let mut body = String::from("rules:\n");
    for i in 0..40 {
        body.push_str(&format!(
            "  - name: r{i}\n    action: allow\n    from: [\"*\"]\n    to: [{{paths: [/s{i}, /t/s{i}/*]}}]\n"
        ));
    }
    let p = policy(&body);
    for i in 0..40 {
        assert_eq!(
            decide(&p, A, "GET", &format!("/s{i}")).rule,
            format!("r{i}")
        );
        assert_eq!(
            decide(&p, A, "GET", &format!("/t/s{i}/x")).rule,
            format!("r{i}")
        );
    }
    assert_eq!(decide(&p, A, "GET", "/s40").rule, DEFAULT_RULE);
}

#[test]
fn many_principal_ancestors_are_all_found() {
    let mut body = String::from("rules:\n");
    for i in 0..30 {
        body.push_str(&format!(
            "  - name: r{i}\n    action: allow\n    from: [spiffe://example.org/{}**]\n    to: [{{paths: [/p{i}]}}]\n",
            "a/".repeat(i)
        ));
    }
    let p = policy(&body);
    let deep = format!("spiffe://example.org/{}x", "a/".repeat(29));
    for i in 0..30 {
        assert_eq!(
            decide(&p, &deep, "GET", &format!("/p{i}")).rule,
            format!("r{i}")
        );
    }
    assert_eq!(
        decide(&p, "spiffe://example.org/x", "GET", "/p1").rule,
        DEFAULT_RULE
    );
}

// ---------------------------------------------------------------- L4

const L4: &str = "\
rules:
  - name: db-clients
    action: allow
    from: [spiffe://example.org/ns/prod/*]
    ports: [5432]
  - name: http-only
    action: allow
    from: [\"*\"]
    to: [{paths: [/**]}]
";

#[test]
fn l4_rule_applies_to_its_ports_only() {
    let p = policy(L4);
    let caller = "spiffe://example.org/ns/prod/db-client";
    assert_eq!(p.decide_l4(caller, 5432).rule, "db-clients");
    assert_eq!(p.decide_l4(caller, 5433).rule, DEFAULT_RULE);
    assert_eq!(
        p.decide_l4(caller, 5432),
        p.decide_l4_reference(caller, 5432)
    );
}

#[test]
fn rule_with_to_does_not_apply_to_tcp() {
    let p = policy(L4);
    assert_eq!(p.decide_l4(A, 80).action, Action::Deny);
}

#[test]
fn rule_with_ports_does_not_apply_to_http() {
    let p = policy(
        "rules:
  - name: db-clients
    action: allow
    from: [\"*\"]
    ports: [5432]
",
    );
    assert_eq!(decide(&p, A, "GET", "/").rule, DEFAULT_RULE);
}

#[test]
fn ports_with_to_is_rejected() {
    let e = error(
        "rules:
  - name: mixed
    action: allow
    from: [\"*\"]
    to: [{paths: [/x]}]
    ports: [80]
",
    );
    assert_eq!((e.line, e.column), (8, 13));
    assert!(e.message.contains("split it"), "{e}");
}

#[test]
fn port_zero_and_out_of_range_ports_are_rejected() {
    for (port, col) in [("0", 13), ("65536", 13), ("http", 13), ("-1", 13)] {
        let e = error(&format!(
            "rules:\n  - name: p\n    action: allow\n    from: [\"*\"]\n    ports: [{port}]\n"
        ));
        assert_eq!((e.line, e.column), (7, col), "{e}");
        assert!(e.message.contains("1 to 65535"), "{e}");
    }
}

// ---------------------------------------------------------------- audit

#[test]
fn audit_rule_reports_a_deny_without_enforcing_it() {
    let p = policy(
        "rules:
  - name: allow-all
    action: allow
    from: [\"*\"]
  - name: no-export
    action: deny
    mode: audit
    from: [\"*\"]
    to: [{paths: [/admin/**]}]
",
    );
    let d = decide(&p, A, "GET", "/admin/export");
    assert_eq!(d.action, Action::Allow);
    assert_eq!(d.rule, "allow-all");
    assert_eq!(
        d.audit,
        Some(AuditHit {
            action: Action::Deny,
            rule: "no-export"
        })
    );
    assert_eq!(decide(&p, A, "GET", "/other").audit, None);
}

#[test]
fn audit_allow_does_not_let_anything_in() {
    let p = policy(
        "rules:
  - name: new-allow
    action: allow
    mode: audit
    from: [\"*\"]
",
    );
    let d = decide(&p, A, "GET", "/x");
    assert_eq!((d.action, d.rule), (Action::Deny, DEFAULT_RULE));
    assert_eq!(
        d.audit,
        Some(AuditHit {
            action: Action::Allow,
            rule: "new-allow"
        })
    );
}

#[test]
fn enforced_deny_hides_matching_audit_rules() {
    let p = policy(
        "rules:
  - name: hard-deny
    action: deny
    from: [\"*\"]
  - name: audit-deny
    action: deny
    mode: audit
    from: [\"*\"]
",
    );
    let d = decide(&p, A, "GET", "/x");
    assert_eq!(
        (d.action, d.rule, d.audit),
        (Action::Deny, "hard-deny", None)
    );
}

#[test]
fn audit_policy_allows_everything_and_reports_would_be_denials() {
    let p = policy(&format!("mode: audit\n{EXAMPLE}"));
    assert_eq!(p.mode(), Mode::Audit);
    let d = decide(&p, A, "GET", "/admin/user-export");
    assert_eq!((d.action, d.rule), (Action::Allow, DEFAULT_RULE));
    assert_eq!(
        d.audit,
        Some(AuditHit {
            action: Action::Deny,
            rule: "no-export"
        })
    );
    let d = decide(&p, "spiffe://x.org/y", "GET", "/nope");
    assert_eq!(
        d.audit,
        Some(AuditHit {
            action: Action::Deny,
            rule: DEFAULT_RULE
        })
    );
    assert_eq!(decide(&p, A, "GET", "/load-balancer/health").audit, None);
    assert!(!p.denies_everything_from("spiffe://x.org/y"));
}

// ---------------------------------------------------------------- multiple files

fn file(body: &str) -> String {
    format!("{HEAD}{body}")
}

#[test]
fn files_merge_in_the_given_order() {
    let a = file(
        "rules:\n  - name: a\n    action: allow\n    from: [\"*\"]\n    to: [{paths: [/x]}]\n",
    );
    let b = file("rules:\n  - name: b\n    action: allow\n    from: [\"*\"]\n");
    let p = compile(&[("a.yaml", a.as_str()), ("b.yaml", b.as_str())]).unwrap();
    assert_eq!(p.rule_count(), 2);
    assert_eq!(p.rule_names().collect::<Vec<_>>(), ["a", "b"]);
    assert_eq!(p.source_names().collect::<Vec<_>>(), ["a.yaml", "b.yaml"]);
    assert_eq!(decide(&p, A, "GET", "/x").rule, "a");
    let p = compile(&[("b.yaml", b.as_str()), ("a.yaml", a.as_str())]).unwrap();
    assert_eq!(decide(&p, A, "GET", "/x").rule, "b");
}

#[test]
fn duplicate_rule_name_names_both_places() {
    let a = file("rules:\n  - name: dup\n    action: allow\n    from: [\"*\"]\n");
    let b = file("rules:\n  - name: other\n    action: allow\n    from: [\"*\"]\n  - name:   dup\n    action: deny\n    from: [\"*\"]\n");
    let e = compile(&[("a.yaml", a.as_str()), ("b.yaml", b.as_str())]).unwrap_err();
    assert_eq!(
        e.to_string(),
        "b.yaml:7:13: duplicate rule name `dup`: first defined at a.yaml:4:11; rule names \
         must be unique across all policy files"
    );
}

#[test]
fn duplicate_rule_name_in_one_file_is_rejected() {
    let e = error("rules:\n  - name: x\n    action: allow\n    from: []\n  - name: x\n    action: deny\n    from: []\n");
    assert_eq!((e.line, e.column), (7, 11));
    assert!(e.message.contains("policy.yaml:4:11"), "{e}");
}

#[test]
fn disagreeing_default_actions_name_both_places() {
    let a = file("defaultAction: deny\n");
    let b = file("defaultAction: allow\n");
    let e = compile(&[("a.yaml", a.as_str()), ("b.yaml", b.as_str())]).unwrap_err();
    assert_eq!((e.source.as_str(), e.line, e.column), ("b.yaml", 3, 16));
    assert!(e.message.contains("a.yaml:3:16"), "{e}");
}

#[test]
fn disagreeing_modes_are_rejected() {
    let a = file("mode: audit\n");
    let b = file("mode: enforce\n");
    let e = compile(&[("a.yaml", a.as_str()), ("b.yaml", b.as_str())]).unwrap_err();
    assert!(e.message.contains("disagrees"), "{e}");
}

#[test]
fn a_file_without_default_action_inherits_it() {
    let a = file("rules: []\n");
    let b = file("defaultAction: allow\n");
    let p = compile(&[("a.yaml", a.as_str()), ("b.yaml", b.as_str())]).unwrap();
    assert_eq!(p.default_action(), Action::Allow);
}

#[test]
fn no_files_is_an_error() {
    let none: [(&str, &str); 0] = [];
    let e = compile(&none).unwrap_err();
    assert_eq!(e.line, 0);
    assert!(e.to_string().contains("no policy files"));
}

#[test]
fn empty_file_is_an_error() {
    for text in ["", "\n\n", "# only a comment\n", "---\n"] {
        let e = compile(&[("empty.yaml", text)]).unwrap_err();
        assert!(e.message.contains("the file is empty"), "{text:?}: {e}");
    }
}

// ---------------------------------------------------------------- located errors

#[test]
fn unknown_field_is_located() {
    let e = error(
        "rules:
  - name: x
    action: allow
    from: [\"*\"]
    to:
      - metods: [GET]
",
    );
    assert_eq!((e.line, e.column), (8, 9), "{e}");
    assert!(
        e.message
            .contains("unknown field `metods`, expected `methods` or `paths`"),
        "{e}"
    );
    assert!(!e.message.contains(" at line "), "{e}");
}

#[test]
fn unknown_top_level_field_is_located() {
    let e = error("defaultaction: deny\n");
    assert_eq!((e.line, e.column), (3, 1));
    assert!(e.message.contains("unknown field `defaultaction`"), "{e}");
}

#[test]
fn yaml_syntax_error_is_located() {
    let e = compile(&[("p.yaml", "apiVersion: trellis.io/v1\nkind: [Policy\n")]).unwrap_err();
    assert_eq!(e.source, "p.yaml");
    assert!(e.line >= 2, "{e}");
}

#[test]
fn missing_field_is_reported() {
    let e = error("rules:\n  - name: x\n    action: allow\n");
    assert!(e.message.contains("missing field `from`"), "{e}");
    assert_eq!(e.line, 4);
}

#[test]
fn wrong_api_version_is_located() {
    let e = compile(&[("p.yaml", "apiVersion: trellis.io/v2\nkind: Policy\n")]).unwrap_err();
    assert_eq!(
        e.to_string(),
        "p.yaml:1:13: unsupported apiVersion `trellis.io/v2`: expected `trellis.io/v1`"
    );
}

#[test]
fn wrong_kind_is_located() {
    let e = compile(&[("p.yaml", "apiVersion: trellis.io/v1\nkind: Policies\n")]).unwrap_err();
    assert_eq!((e.line, e.column), (2, 7));
}

#[test]
fn bad_action_is_located_with_the_choices() {
    let e = error("rules:\n  - name: x\n    action: permit\n    from: [\"*\"]\n");
    assert_eq!(
        e.to_string(),
        "policy.yaml:5:13: unknown action `permit`: expected `allow` or `deny`"
    );
    let e = error("rules:\n  - name: x\n    action: Allow\n    from: [\"*\"]\n");
    assert!(e.message.contains("lowercase: `allow`"), "{e}");
}

#[test]
fn bad_default_action_and_mode_are_located() {
    let e = error("defaultAction: reject\n");
    assert_eq!((e.line, e.column), (3, 16));
    let e = error("mode: dry-run\n");
    assert_eq!((e.line, e.column), (3, 7));
    assert!(e.message.contains("`enforce` or `audit`"));
}

#[test]
fn mid_path_principal_wildcard_is_located() {
    let e = error(
        "rules:
  - name: x
    action: allow
    from:
      - spiffe://example.org/ns/prod/sa/a
      - spiffe://example.org/ns/*/sa/x
",
    );
    assert_eq!((e.line, e.column), (8, 9), "{e}");
    assert!(e.message.contains("only be the last segment"), "{e}");
}

#[test]
fn principal_error_in_flow_list_points_at_the_item() {
    let e = error("rules:\n  - name: x\n    action: allow\n    from: [\"*\", https://x]\n");
    assert_eq!((e.line, e.column), (6, 17), "{e}");
}

#[test]
fn path_pattern_error_is_located() {
    let e = error(
        "rules:
  - name: x
    action: allow
    from: [\"*\"]
    to:
      - paths: [/ok, /a/**/b]
",
    );
    assert_eq!(
        e.to_string(),
        "policy.yaml:8:22: path pattern `/a/**/b`: `**` may only end a pattern (`/admin/**`)"
    );
}

#[test]
fn method_error_is_located() {
    let e = error("rules:\n  - name: x\n    action: allow\n    from: [\"*\"]\n    to: [{methods: [GET, post]}]\n");
    assert_eq!((e.line, e.column), (7, 26), "{e}");
    assert!(e.message.contains("`POST`"));
}

#[test]
fn reserved_rule_name_is_rejected() {
    let e = error("rules:\n  - name: default\n    action: allow\n    from: []\n");
    assert_eq!((e.line, e.column), (4, 11));
    assert!(e.message.contains("reserved"));
}

#[test]
fn rule_name_with_spaces_is_rejected() {
    let e = error("rules:\n  - name: my rule\n    action: allow\n    from: []\n");
    assert!(e.message.contains("` ` is not allowed"), "{e}");
    let e = error("rules:\n  - name: \"\"\n    action: allow\n    from: []\n");
    assert!(e.message.contains("empty"), "{e}");
}

#[test]
fn from_as_a_single_string_is_rejected() {
    let e = error("rules:\n  - name: x\n    action: allow\n    from: \"*\"\n");
    assert_eq!(e.line, 6);
    assert!(e.message.contains("expected a sequence"), "{e}");
}

#[test]
fn unquoted_star_gets_a_hint_to_quote_it() {
    let e = error("rules:\n  - name: x\n    action: allow\n    from: [*]\n");
    assert_eq!(e.line, 6);
    assert!(e.message.contains("quote it, as in `from: [\"*\"]`"), "{e}");
}

#[test]
fn scalar_where_a_list_belongs_gets_a_hint() {
    let e = error("rules:\n  - name: x\n    action: allow\n    from: [\"*\"]\n    to:\n      - paths: /admin/**\n");
    assert_eq!((e.line, e.column), (8, 16));
    assert!(e.message.contains("write a list"), "{e}");
}

#[test]
fn numeric_rule_name_is_read_as_text() {
    let p = policy("rules:\n  - name: 404\n    action: allow\n    from: [\"*\"]\n");
    assert_eq!(p.rule_names().next(), Some("404"));
}

#[test]
fn multiple_documents_in_one_file_are_rejected() {
    let text = format!("{HEAD}---\n{HEAD}");
    assert!(compile(&[("p.yaml", text.as_str())]).is_err());
}

#[test]
fn billion_laughs_is_refused_not_expanded() {
    let mut text = String::from("apiVersion: trellis.io/v1\nkind: Policy\nx0: &a0 [lol]\n");
    for i in 1..30 {
        let prev = i - 1;
        text.push_str(&format!(
            "x{i}: &a{i} [*a{prev},*a{prev},*a{prev},*a{prev},*a{prev},*a{prev},*a{prev},*a{prev},*a{prev}]\n"
        ));
    }
    assert!(compile(&[("p.yaml", text.as_str())]).is_err());
}

// ---------------------------------------------------------------- hash & helpers

#[test]
fn hash_is_sha256_of_the_texts_in_order() {
    let a = file("rules: []\n");
    let p = compile(&[("a.yaml", a.as_str())]).unwrap();
    use sha2::Digest;
    assert_eq!(p.hash(), hex::encode(sha2::Sha256::digest(a.as_bytes())));
    let b = file("defaultAction: deny\n");
    let ab = compile(&[("a.yaml", a.as_str()), ("b.yaml", b.as_str())]).unwrap();
    let ba = compile(&[("b.yaml", b.as_str()), ("a.yaml", a.as_str())]).unwrap();
    assert_ne!(ab.hash(), ba.hash());
    assert_eq!(ab.hash().len(), 64);
}

#[test]
fn compiled_policy_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<CompiledPolicy>();
}

// ---------------------------------------------------------------- denies_everything_from

#[test]
fn caller_with_no_allow_is_denied_everything() {
    let p = policy(EXAMPLE);
    assert!(p.denies_everything_from("spiffe://example.org/ns/other/sa/x"));
    assert!(!p.denies_everything_from(A));
}

#[test]
fn caller_under_a_total_deny_is_denied_everything_even_with_allows() {
    let p = policy(
        "defaultAction: allow
rules:
  - name: no-dev
    action: deny
    from: [spiffe://example.org/ns/dev/**]
  - name: dev-health
    action: allow
    from: [spiffe://example.org/ns/dev/**]
    to: [{paths: [/health]}]
",
    );
    assert!(p.denies_everything_from(DEV));
    assert!(!p.denies_everything_from(A));
}

#[test]
fn partial_deny_does_not_deny_everything() {
    let p = policy(
        "defaultAction: allow
rules:
  - name: no-admin
    action: deny
    from: [\"*\"]
    to: [{paths: [/admin/**]}]
",
    );
    assert!(!p.denies_everything_from(A));
}

#[test]
fn dead_or_audit_allow_does_not_count_as_access() {
    let p = policy(
        "rules:
  - name: dead
    action: allow
    from: [\"*\"]
    to: [{methods: []}]
  - name: audit-only
    action: allow
    mode: audit
    from: [\"*\"]
",
    );
    assert!(p.denies_everything_from(A));
}

#[test]
fn l4_only_allow_counts_as_access() {
    let p = policy(L4);
    assert!(!p.denies_everything_from("spiffe://example.org/ns/prod/db"));
}

// ---------------------------------------------------------------- lints

/// A policy that says its paths are case-sensitive (`caseInsensitivePaths: false`,
/// appended so that line numbers stay), so that the case lint stays quiet and the test
/// sees only the lints it is about.
fn policy_with_case_stated(body: &str) -> CompiledPolicy {
    policy(&format!("{body}caseInsensitivePaths: false\n"))
}

fn kinds(p: &CompiledPolicy) -> Vec<(String, WarningKind)> {
    p.lint().into_iter().map(|w| (w.rule, w.kind)).collect()
}

#[test]
fn clean_example_has_no_warnings() {
    // `prod-admin` is partly shadowed by `no-export` (/admin/**) but not entirely (/api/**).
    assert_eq!(policy_with_case_stated(EXAMPLE).lint(), []);
}

#[test]
fn empty_from_never_matches() {
    let p = policy("rules:\n  - name: nobody\n    action: allow\n    from: []\n");
    let w = p.lint();
    assert_eq!(w.len(), 1);
    assert_eq!(w[0].kind, WarningKind::NeverMatches);
    assert_eq!((w[0].line, w[0].column), (4, 11));
    assert_eq!(
        w[0].to_string(),
        "policy.yaml:4:11: warning: rule `nobody` can never match: `from` is empty (write \
         `[\"*\"]` for any caller)"
    );
}

#[test]
fn empty_method_list_never_matches() {
    let p = policy(
        "rules:
  - name: half
    action: allow
    from: [\"*\"]
    to:
      - methods: []
      - paths: [/x]
  - name: none
    action: allow
    from: [\"*\"]
    to: [{paths: []}]
  - name: empty-to
    action: allow
    from: [\"*\"]
    to: []
  - name: no-ports
    action: allow
    from: [\"*\"]
    ports: []
",
    );
    let w = p.lint();
    assert_eq!(
        kinds(&p),
        [
            ("half".to_owned(), WarningKind::NeverMatches),
            ("none".to_owned(), WarningKind::NeverMatches),
            ("empty-to".to_owned(), WarningKind::NeverMatches),
            ("no-ports".to_owned(), WarningKind::NeverMatches),
        ]
    );
    assert!(w[0].message.contains("`to[0]`"), "{}", w[0]);
}

#[test]
fn allow_covered_by_a_deny_is_shadowed() {
    let p = policy_with_case_stated(
        "rules:
  - name: export
    action: allow
    from: [spiffe://example.org/ns/prod/sa/service-a]
    to: [{methods: [GET], paths: [/admin/export]}]
  - name: no-admin
    action: deny
    from: [spiffe://example.org/ns/prod/**]
    to: [{paths: [/admin/**]}]
",
    );
    let w = p.lint();
    assert_eq!(kinds(&p), [("export".to_owned(), WarningKind::Shadowed)]);
    assert!(
        w[0].message
            .contains("denied by rule `no-admin` (policy.yaml:8:11)"),
        "{}",
        w[0]
    );
}

#[test]
fn allow_partly_covered_by_a_deny_is_not_reported() {
    let p = policy_with_case_stated(
        "rules:
  - name: export
    action: allow
    from: [spiffe://example.org/ns/prod/sa/service-a, spiffe://example.org/ns/dev/sa/x]
    to: [{paths: [/admin/export]}]
  - name: no-admin
    action: deny
    from: [spiffe://example.org/ns/prod/**]
    to: [{paths: [/admin/**]}]
",
    );
    assert_eq!(p.lint(), []);
}

#[test]
fn audit_deny_does_not_shadow_an_allow() {
    let p = policy(
        "rules:
  - name: export
    action: allow
    from: [\"*\"]
  - name: no-all
    action: deny
    mode: audit
    from: [\"*\"]
",
    );
    assert_eq!(p.lint(), []);
}

#[test]
fn identical_later_rule_is_redundant() {
    let p = policy(
        "rules:
  - name: first
    action: allow
    from: [spiffe://example.org/ns/prod/*]
    to: [{methods: [GET, POST], paths: [/a/*]}]
  - name: again
    action: allow
    from: [spiffe://example.org/ns/prod/*]
    to: [{methods: [POST, GET], paths: [/a/*]}]
",
    );
    assert_eq!(kinds(&p), [("again".to_owned(), WarningKind::Redundant)]);
}

#[test]
fn narrower_later_rule_with_same_action_is_shadowed() {
    let p = policy_with_case_stated(
        "rules:
  - name: broad
    action: deny
    from: [\"*\"]
    to: [{paths: [/admin/**]}]
  - name: narrow
    action: deny
    from: [spiffe://example.org/ns/dev/**]
    to: [{methods: [DELETE], paths: [/admin/users/*]}]
",
    );
    assert_eq!(kinds(&p), [("narrow".to_owned(), WarningKind::Shadowed)]);
}

#[test]
fn narrower_earlier_rule_is_not_shadowed() {
    let p = policy_with_case_stated(
        "rules:
  - name: narrow
    action: deny
    from: [spiffe://example.org/ns/dev/**]
    to: [{paths: [/admin/users/*]}]
  - name: broad
    action: deny
    from: [\"*\"]
    to: [{paths: [/admin/**]}]
",
    );
    assert_eq!(p.lint(), []);
}

#[test]
fn l4_rule_is_not_shadowed_by_an_http_rule() {
    let p = policy(
        "rules:
  - name: http
    action: allow
    from: [\"*\"]
    to: [{paths: [/**]}]
  - name: tcp
    action: allow
    from: [\"*\"]
    ports: [5432]
",
    );
    assert_eq!(p.lint(), []);
}

#[test]
fn rule_without_to_is_shadowed_only_by_a_rule_covering_tcp_too() {
    let p = policy(
        "rules:
  - name: http-all
    action: allow
    from: [\"*\"]
    to: [{}]
  - name: everything
    action: allow
    from: [spiffe://example.org/ns/prod/**]
  - name: everything-again
    action: allow
    from: [spiffe://example.org/ns/prod/sa/service-a]
",
    );
    assert_eq!(
        kinds(&p),
        [("everything-again".to_owned(), WarningKind::Shadowed)]
    );
}

#[test]
fn enforce_mode_in_audit_policy_has_no_effect() {
    let p = policy("mode: audit\nrules:\n  - name: x\n    action: deny\n    mode: enforce\n    from: [\"*\"]\n");
    let w = p.lint();
    assert_eq!(kinds(&p), [("x".to_owned(), WarningKind::NoEffect)]);
    assert_eq!((w[0].line, w[0].column), (7, 11));
}

#[test]
fn unregistered_method_is_flagged() {
    let p = policy("rules:\n  - name: x\n    action: allow\n    from: [\"*\"]\n    to: [{methods: [GET, GTE]}]\n");
    let w = p.lint();
    assert_eq!(kinds(&p), [("x".to_owned(), WarningKind::UnknownMethod)]);
    assert_eq!((w[0].line, w[0].column), (7, 26));
}

// ---------------------------------------------------------------- explain

#[test]
fn explain_names_the_failing_field_of_a_near_miss() {
    let p = policy(EXAMPLE);
    let x = p.explain(A, "POST", "/load-balancer/health");
    let d = x.decision.unwrap();
    assert_eq!((d.action, d.rule), (Action::Deny, DEFAULT_RULE));
    assert!(x.matched.is_empty());
    // Every rule that names the caller misses on one field here; lb-health on the method.
    let near: Vec<_> = x.near_misses.iter().map(|n| n.rule).collect();
    assert_eq!(near, ["lb-health", "no-export", "prod-admin"]);
    assert_eq!(
        x.near_misses[0].reasons,
        ["to[0]: method POST not in [GET]"]
    );
    let text = x.to_string();
    assert!(text.contains("decision: deny by default"), "{text}");
    assert!(
        text.contains("lb-health  (policy.yaml:5:11): to[0]: method POST not in [GET]"),
        "{text}"
    );
}

#[test]
fn explain_lists_every_matching_rule_and_the_decider() {
    let p = policy(EXAMPLE);
    let x = p.explain(A, "GET", "/public/../admin/export");
    let text = x.to_string();
    assert!(text.contains("(normalized: /admin/export)"), "{text}");
    assert!(
        text.contains("decision: deny by rule `no-export` (policy.yaml:11:11)"),
        "{text}"
    );
    let names: Vec<_> = x.matched.iter().map(|m| m.rule).collect();
    assert_eq!(names, ["no-export", "prod-admin"]);
    // lb-health fails on the path (and method is fine).
    let near: Vec<_> = x.near_misses.iter().map(|n| n.rule).collect();
    assert_eq!(near, ["lb-health"]);
    assert!(x.near_misses[0].reasons[0]
        .contains("path /admin/export matches none of [/load-balancer/health]"));
}

#[test]
fn explain_reports_caller_mismatch_for_rules_that_match_the_request() {
    let p = policy(EXAMPLE);
    let x = p.explain(DEV, "GET", "/api/items");
    let n = x
        .near_misses
        .iter()
        .find(|n| n.rule == "prod-admin")
        .unwrap();
    assert_eq!(
        n.reasons,
        ["caller is not in `from` [spiffe://example.org/ns/prod/**]"]
    );
}

#[test]
fn explain_shows_a_refused_path() {
    let p = policy(EXAMPLE);
    let x = p.explain(A, "GET", "/a/%2F/b");
    assert!(x.decision.is_none());
    assert!(x
        .to_string()
        .contains("refused before authorization (encoded_slash)"));
}

#[test]
fn explain_shows_audit_hits() {
    let p = policy(&format!("mode: audit\n{EXAMPLE}"));
    let text = p.explain(A, "GET", "/admin/x").to_string();
    assert!(
        text.contains("decision: allow (the policy is in audit mode"),
        "{text}"
    );
    assert!(
        text.contains("audit:    would deny by rule `no-export`"),
        "{text}"
    );
}

#[test]
fn explain_l4_says_why_an_http_rule_does_not_apply() {
    let p = policy(L4);
    let x = p.explain_l4("spiffe://example.org/ns/prod/db", 5433);
    let reasons: Vec<_> = x.near_misses.iter().map(|n| n.reasons.join(";")).collect();
    assert_eq!(
        reasons,
        [
            "port 5433 not in `ports` [5432]",
            "applies only to HTTP requests (it has `to`)"
        ]
    );
}

// ---------------------------------------------------------------- `;` parameters and case

/// Everyone may call `/public/**`; nobody `/admin/**`; the rest is denied.
const PARAMS: &str = "\
defaultAction: deny
rules:
  - name: public
    action: allow
    from: [\"*\"]
    to:
      - paths: [/public/**]
  - name: no-admin
    action: deny
    from: [\"*\"]
    to:
      - paths: [/admin/**]
";

/// Everything is allowed but `/admin/**`.
const ADMIN_ONLY: &str = "\
defaultAction: allow
rules:
  - name: no-admin
    action: deny
    from: [\"*\"]
    to:
      - paths: [/admin/**]
";

/// `decide_request`, checked against the readings decided one by one with the reference
/// evaluation.
fn request<'p, 'r>(
    p: &'p CompiledPolicy,
    method: &str,
    raw: &'r str,
) -> Result<RequestDecision<'p, 'r>, PathError> {
    let r = p.decide_request(A, method, raw);
    if let Ok(r) = &r {
        let reading_path = match r.reading {
            Reading::Literal => normalize_path(raw).unwrap().into_string(),
            Reading::WithoutParameters => normalize_path(&request::without_parameters(raw))
                .unwrap()
                .into_string(),
        };
        let view = crate::path::match_view(&reading_path);
        assert_eq!(r.decision, p.decide_reference(A, method, view), "{raw}");
        assert_eq!(r.path, normalize_path(raw).unwrap(), "{raw}");
    }
    r
}

#[test]
fn param_segment_cannot_dodge_an_admin_deny() {
    let p = policy(ADMIN_ONLY);
    assert_eq!(p.path_parameters(), PathParameters::Strictest);
    for raw in [
        "/admin;x/user-export",
        "/admin;/user-export",
        "/admin;jsessionid=1",
        "/;x/admin/user-export",
        "/admin;a=b;c=d/x;y",
        "/%61dmin;x/user-export",
    ] {
        let r = request(&p, "GET", raw).unwrap();
        assert_eq!(
            (r.decision.action, r.decision.rule, r.reading),
            (Action::Deny, "no-admin", Reading::WithoutParameters),
            "{raw}"
        );
    }
    // Each reading alone: the literal one would have let it through.
    let literal = normalize_path("/admin;x/user-export").unwrap();
    assert!(p.decide(A, "GET", &literal).is_allowed());
}

#[test]
fn dotdot_param_climbs_into_admin_as_tomcat_reads_it() {
    // `/public/..;/admin` is under `/public/**` literally, and `/admin` to Tomcat.
    let p = policy(PARAMS);
    let r = request(&p, "GET", "/public/..;/admin/user-export").unwrap();
    assert_eq!(
        (r.decision.action, r.decision.rule, r.reading),
        (Action::Deny, "no-admin", Reading::WithoutParameters)
    );
    assert_eq!(r.path, "/public/..;/admin/user-export");
    let r = request(&p, "GET", "/public/x/..;x/..;y/secret").unwrap();
    assert_eq!(
        (r.decision.action, r.decision.rule, r.reading),
        (Action::Deny, DEFAULT_RULE, Reading::WithoutParameters)
    );
}

#[test]
fn jsessionid_param_is_allowed_when_both_readings_are() {
    let p = policy(PARAMS);
    let r = request(&p, "GET", "/public/page;jsessionid=0123ABCD").unwrap();
    assert_eq!(
        (r.decision.action, r.decision.rule, r.reading),
        (Action::Allow, "public", Reading::Literal)
    );
    // The app gets the parameters it may rely on, untouched (and nothing was copied).
    assert_eq!(r.path, "/public/page;jsessionid=0123ABCD");
    assert!(r.path.is_borrowed());
}

#[test]
fn literal_denial_decides_when_both_readings_deny() {
    let p = policy(PARAMS);
    let r = request(&p, "GET", "/admin/x;y").unwrap();
    assert_eq!(
        (r.decision.action, r.decision.rule, r.reading),
        (Action::Deny, "no-admin", Reading::Literal)
    );
}

#[test]
fn a_reading_that_normalization_refuses_refuses_the_request() {
    // Without its parameter, `/..;/admin` climbs above the root.
    let p = policy(ADMIN_ONLY);
    assert_eq!(
        p.decide_request(A, "GET", "/..;/admin"),
        Err(PathError::AboveRoot)
    );
    // The literal reading's own refusals come first, as before.
    assert_eq!(
        p.decide_request(A, "GET", "/a;x/%2F"),
        Err(PathError::EncodedSlash)
    );
}

#[test]
fn audit_denial_under_the_bare_reading_is_reported() {
    let p = policy(
        "defaultAction: allow
rules:
  - name: would-block-admin
    action: deny
    mode: audit
    from: [\"*\"]
    to: [{paths: [/admin/**]}]
",
    );
    let r = request(&p, "GET", "/admin;x/y").unwrap();
    assert!(r.decision.is_allowed());
    assert_eq!(r.reading, Reading::WithoutParameters);
    let audit = r.decision.audit.unwrap();
    assert_eq!(
        (audit.action, audit.rule),
        (Action::Deny, "would-block-admin")
    );
}

#[test]
fn encoded_semicolon_is_data_not_a_parameter() {
    let p = policy(&format!("pathParameters: reject\n{ADMIN_ONLY}"));
    let r = request(&p, "GET", "/admin%3Bx/y").unwrap();
    assert_eq!(
        (r.decision.action, r.decision.rule, r.reading),
        (Action::Allow, DEFAULT_RULE, Reading::Literal)
    );
}

#[test]
fn reject_mode_refuses_any_semicolon() {
    let p = policy(&format!("pathParameters: reject\n{PARAMS}"));
    assert_eq!(p.path_parameters(), PathParameters::Reject);
    for raw in ["/public/page;jsessionid=1", "/admin;x/y", "/;", "/a/b;"] {
        assert_eq!(
            p.decide_request(A, "GET", raw),
            Err(PathError::PathParameters),
            "{raw}"
        );
    }
    assert_eq!(PathError::PathParameters.reason(), "path_parameters");
    assert!(PathError::PathParameters
        .to_string()
        .contains("pathParameters: reject"));
    assert!(request(&p, "GET", "/public/page")
        .unwrap()
        .decision
        .is_allowed());
}

#[test]
fn literal_mode_reads_semicolons_as_ordinary_characters() {
    let p = policy(&format!("pathParameters: literal\n{ADMIN_ONLY}"));
    assert_eq!(p.path_parameters(), PathParameters::Literal);
    let r = request(&p, "GET", "/admin;x/user-export").unwrap();
    assert_eq!(
        (r.decision.action, r.decision.rule, r.reading),
        (Action::Allow, DEFAULT_RULE, Reading::Literal)
    );
    // ...and `/..;` is an ordinary segment, not a refusal.
    assert!(request(&p, "GET", "/..;/admin")
        .unwrap()
        .decision
        .is_allowed());
}

#[test]
fn uppercase_admin_is_denied_with_case_insensitive_paths() {
    let p = policy(&format!("caseInsensitivePaths: true\n{ADMIN_ONLY}"));
    assert!(p.case_insensitive_paths());
    for raw in [
        "/ADMIN/user-export",
        "/Admin",
        "/aDmIn/",
        "/%41DMIN/x",
        "/ADMIN;x/y",
    ] {
        let r = request(&p, "GET", raw).unwrap();
        assert_eq!(
            (r.decision.action, r.decision.rule),
            (Action::Deny, "no-admin"),
            "{raw}"
        );
    }
    // The forwarded path keeps its case.
    let r = request(&p, "GET", "/Public/Page").unwrap();
    assert!(r.decision.is_allowed());
    assert_eq!(r.path, "/Public/Page");
}

#[test]
fn case_sensitive_policy_lets_uppercase_through() {
    // The default, and what the case lint warns about.
    let p = policy(ADMIN_ONLY);
    assert!(!p.case_insensitive_paths());
    assert!(request(&p, "GET", "/ADMIN/user-export")
        .unwrap()
        .decision
        .is_allowed());
}

#[test]
fn uppercase_pattern_matches_any_case_when_case_insensitive() {
    let p = policy(
        "caseInsensitivePaths: true
defaultAction: allow
rules:
  - name: no-reports
    action: deny
    from: [\"*\"]
    to: [{paths: [/Reports/*/Q1, /caf%C3%A9]}]
",
    );
    for raw in ["/reports/2024/q1", "/REPORTS/x/Q1", "/Caf%c3%a9", "/CAFé"] {
        assert!(
            !request(&p, "GET", raw).unwrap().decision.is_allowed(),
            "{raw}"
        );
    }
    assert!(request(&p, "GET", "/reports/2024/q2")
        .unwrap()
        .decision
        .is_allowed());
    // Explanations quote the pattern as written.
    let text = p.explain(A, "GET", "/reports/2024/q2").to_string();
    assert!(text.contains("[/Reports/*/Q1, /caf%C3%A9]"), "{text}");
}

#[test]
fn bad_path_parameters_is_located_with_the_choices() {
    let e = error("pathParameters: maybe\n");
    assert_eq!((e.line, e.column), (3, 17), "{e}");
    for choice in ["`strictest`", "`reject`", "`literal`"] {
        assert!(e.message.contains(choice), "{e}");
    }
    assert!(
        e.to_string()
            .starts_with("policy.yaml:3:17: unknown pathParameters `maybe`"),
        "{e}"
    );
}

#[test]
fn bad_case_insensitive_paths_is_located() {
    let e = error("caseInsensitivePaths: yes\n");
    assert_eq!(
        e.to_string(),
        "policy.yaml:3:23: caseInsensitivePaths `yes`: expected `true` or `false`"
    );
    let e = error("caseInsensitivePaths: True\n");
    assert!(e.message.contains("write it in lowercase: `true`"), "{e}");
    let e = error("caseInsensitivePaths: [true]\n");
    assert_eq!(e.line, 3, "{e}");
}

#[test]
fn disagreeing_path_settings_name_both_places() {
    let a = file("pathParameters: strictest\ncaseInsensitivePaths: true\n");
    let b = file("pathParameters: literal\n");
    let e = compile(&[("a.yaml", a.as_str()), ("b.yaml", b.as_str())]).unwrap_err();
    assert_eq!(
        e.to_string(),
        "b.yaml:3:17: pathParameters `literal` disagrees with `strictest` set at a.yaml:3:17: \
         files that set pathParameters must agree (or leave it out)"
    );
    let b = file("caseInsensitivePaths: false\n");
    let e = compile(&[("a.yaml", a.as_str()), ("b.yaml", b.as_str())]).unwrap_err();
    assert_eq!((e.source.as_str(), e.line, e.column), ("b.yaml", 3, 23));
    assert!(e.message.contains("a.yaml:4:23"), "{e}");
}

#[test]
fn a_file_without_the_path_settings_inherits_them() {
    let a = file(
        "pathParameters: reject
caseInsensitivePaths: true
",
    );
    let b = file(ADMIN_ONLY);
    let p = compile(&[("a.yaml", a.as_str()), ("b.yaml", b.as_str())]).unwrap();
    assert_eq!(p.path_parameters(), PathParameters::Reject);
    assert!(p.case_insensitive_paths());
    // The rules of b.yaml are folded too.
    assert!(!request(&p, "GET", "/ADMIN").unwrap().decision.is_allowed());
    // Agreeing files are fine.
    let c = file("pathParameters: reject\n");
    assert!(compile(&[("a.yaml", a.as_str()), ("c.yaml", c.as_str())]).is_ok());
}

#[test]
fn deny_path_with_letters_warns_in_a_case_sensitive_policy() {
    let p = policy(PARAMS);
    let w = p.lint();
    assert_eq!(
        kinds(&p),
        [("no-admin".to_owned(), WarningKind::CaseSensitivePath)]
    );
    // At the pattern itself (`      - paths: [/admin/**]` on line 14).
    assert_eq!((w[0].line, w[0].column), (14, 17), "{}", w[0]);
    assert_eq!(
        WarningKind::CaseSensitivePath.as_str(),
        "case_sensitive_path"
    );
    let text = w[0].to_string();
    for want in [
        "policy.yaml:14:17: warning: deny rule `no-admin`",
        "`/ADMIN/**` is not denied by `/admin/**`",
        "set `caseInsensitivePaths: true`",
    ] {
        assert!(text.contains(want), "missing {want:?} in {text}");
    }
}

#[test]
fn case_lint_is_quiet_once_the_setting_is_written() {
    for setting in ["true", "false"] {
        let p = policy(&format!("caseInsensitivePaths: {setting}\n{PARAMS}"));
        assert_eq!(p.lint(), [], "caseInsensitivePaths: {setting}");
    }
}

#[test]
fn case_lint_flags_audit_denies_only_among_rules_without_letters() {
    let p = policy(
        "rules:
  - name: allow-admin
    action: allow
    from: [\"*\"]
    to: [{paths: [/admin]}]
  - name: digits
    action: deny
    from: [\"*\"]
    to: [{paths: [/1/*/2, /%C3%A9/**]}]
  - name: everything
    action: deny
    from: [spiffe://example.org/ns/dev/**]
  - name: later-letters
    action: deny
    mode: audit
    from: [\"*\"]
    to: [{paths: [/2]}, {paths: [/3, /v1/**]}]
",
    );
    let w = p.lint();
    assert_eq!(
        kinds(&p),
        [("later-letters".to_owned(), WarningKind::CaseSensitivePath)]
    );
    assert!(
        w[0].message.contains("`/V1/**` is not denied by `/v1/**`"),
        "{}",
        w[0]
    );
}

#[test]
fn case_insensitive_duplicates_are_redundant() {
    let p = policy(
        "caseInsensitivePaths: true
rules:
  - name: a
    action: deny
    from: [\"*\"]
    to: [{paths: [/Admin/**]}]
  - name: b
    action: deny
    from: [\"*\"]
    to: [{paths: [/admin/**]}]
",
    );
    assert_eq!(kinds(&p), [("b".to_owned(), WarningKind::Redundant)]);
}

#[test]
fn explain_shows_both_readings_and_which_decided() {
    let p = policy(PARAMS);
    let x = p.explain(A, "GET", "/public/..;/admin/x");
    assert_eq!(x.readings.len(), 2);
    assert_eq!(x.readings[0].reading, Reading::Literal);
    assert_eq!(x.readings[0].path.as_deref(), Ok("/public/..;/admin/x"));
    assert!(x.readings[0].decision.unwrap().is_allowed());
    assert!(!x.readings[0].decided);
    assert_eq!(x.readings[1].path.as_deref(), Ok("/admin/x"));
    assert!(x.readings[1].decided);
    assert_eq!(x.decision.unwrap().rule, "no-admin");
    // `matched` is about the deciding reading.
    let names: Vec<_> = x.matched.iter().map(|m| m.rule).collect();
    assert_eq!(names, ["no-admin"]);
    let text = x.to_string();
    for want in [
        "readings: the path carries `;` parameters (pathParameters: strictest)",
        "  literal             /public/..;/admin/x  allow by rule `public`\n",
        "  without_parameters  /admin/x             deny by rule `no-admin`  <- decides\n",
        "decision: deny by rule `no-admin` (policy.yaml:10:11), reading the path without its \
         `;` parameters",
    ] {
        assert!(text.contains(want), "missing {want:?} in\n{text}");
    }
}

#[test]
fn explain_of_a_plain_path_shows_one_reading() {
    let p = policy(PARAMS);
    let x = p.explain(A, "GET", "/public/x");
    assert_eq!(x.readings.len(), 1);
    assert!(x.readings[0].decided);
    let text = x.to_string();
    assert!(!text.contains("readings:"), "{text}");
    assert!(!text.contains("case-insensitive"), "{text}");
}

#[test]
fn explain_shows_a_reading_refused_by_normalization() {
    let p = policy(PARAMS);
    let x = p.explain(A, "GET", "/..;/admin");
    assert!(x.decision.is_none());
    assert!(matches!(
        &x.request,
        ExplainedRequest::Http {
            normalized: Err(PathError::AboveRoot),
            ..
        }
    ));
    assert!(x.readings[1].decided);
    let text = x.to_string();
    assert!(
        text.contains("  without_parameters  /../admin   refused (above_root)  <- decides"),
        "{text}"
    );
    assert!(
        text.contains(
            "decision: refused before authorization (above_root): path climbs above the root \
             with `..`, reading the path without its `;` parameters"
        ),
        "{text}"
    );
}

#[test]
fn explain_of_reject_mode_names_the_reason() {
    let p = policy(&format!("pathParameters: reject\n{PARAMS}"));
    let x = p.explain(A, "GET", "/public/a;b");
    assert!(x.decision.is_none() && x.readings.is_empty());
    assert!(x
        .to_string()
        .contains("refused before authorization (path_parameters)"));
}

#[test]
fn explain_says_matching_was_case_insensitive() {
    let p = policy(&format!("caseInsensitivePaths: true\n{PARAMS}"));
    let x = p.explain(A, "GET", "/ADMIN/x");
    assert!(x.case_insensitive_paths);
    assert_eq!(x.decision.unwrap().rule, "no-admin");
    let text = x.to_string();
    assert!(
        text.contains("paths:    matched case-insensitively (caseInsensitivePaths: true)"),
        "{text}"
    );
    // Near misses are worked out case-insensitively too: `public` fails on the path.
    assert!(
        text.contains("path /ADMIN/x matches none of [/public/**]"),
        "{text}"
    );
}

// ---------------------------------------------------------------- properties

mod properties {
    use super::*;
    use crate::fuzz::reference_request;
    use proptest::prelude::*;

    const CALLERS: &[&str] = &[
        "spiffe://example.org/ns/prod/sa/a",
        "spiffe://example.org/ns/prod/sa/b",
        "spiffe://example.org/ns/dev/sa/a",
        "spiffe://example.org/ns/prod",
        "spiffe://example.org/x",
        "spiffe://other.org/ns/prod/sa/a",
    ];
    const PRINCIPALS: &[&str] = &[
        "\"*\"",
        "spiffe://example.org/ns/prod/sa/a",
        "spiffe://example.org/ns/prod/sa/*",
        "spiffe://example.org/ns/prod/**",
        "spiffe://example.org/**",
        "spiffe://example.org/*",
        "spiffe://example.org/ns/dev/sa/a",
        "spiffe://other.org/**",
    ];
    const SEGS: &[&str] = &["a", "b", "admin", "x", "Admin"];

    fn path_pattern() -> impl Strategy<Value = String> {
        (
            prop::collection::vec(
                prop_oneof![4 => prop::sample::select(SEGS).prop_map(str::to_owned), 1 => Just("*".to_owned())],
                0..4,
            ),
            any::<bool>(),
        )
            .prop_map(|(segs, globstar)| {
                let mut p = String::new();
                for s in &segs {
                    p.push('/');
                    p.push_str(s);
                }
                if globstar {
                    p.push_str("/**");
                }
                if p.is_empty() {
                    p.push('/');
                }
                p
            })
    }

    fn to_entry() -> impl Strategy<Value = String> {
        (
            prop::option::of(prop::sample::subsequence(
                vec!["GET", "POST", "DELETE"],
                0..3,
            )),
            prop::option::of(prop::collection::vec(path_pattern(), 0..3)),
        )
            .prop_map(|(methods, paths)| {
                let mut e = String::from("{");
                if let Some(ms) = methods {
                    e.push_str(&format!("methods: [{}], ", ms.join(", ")));
                }
                if let Some(ps) = paths {
                    e.push_str(&format!("paths: [{}]", ps.join(", ")));
                }
                e.push('}');
                e
            })
    }

    fn rule() -> impl Strategy<Value = String> {
        (
            any::<bool>(),
            prop::sample::select(vec!["", "audit", "enforce"]),
            prop::collection::vec(prop::sample::select(PRINCIPALS), 0..3),
            prop_oneof![
                2 => prop::collection::vec(to_entry(), 0..3).prop_map(|es| format!("to: [{}]", es.join(", "))),
                1 => Just(String::new()),
                1 => prop::collection::vec(prop::sample::select(vec![80u16, 443, 5432]), 0..2)
                    .prop_map(|ps| format!("ports: {ps:?}")),
            ],
        )
            .prop_map(|(deny, mode, from, scope)| {
                let mut r = format!(
                    "    action: {}\n    from: [{}]\n",
                    if deny { "deny" } else { "allow" },
                    from.join(", ")
                );
                if !mode.is_empty() {
                    r.push_str(&format!("    mode: {mode}\n"));
                }
                if !scope.is_empty() {
                    r.push_str(&format!("    {scope}\n"));
                }
                r
            })
    }

    pub(super) fn policy_text() -> impl Strategy<Value = String> {
        (
            any::<bool>(),
            any::<bool>(),
            prop::sample::select(vec!["", "true", "false"]),
            prop::sample::select(vec!["", "strictest", "reject", "literal"]),
            prop::collection::vec(rule(), 0..12),
        )
            .prop_map(|(allow_default, audit, case, params, rules)| {
                let mut t = format!(
                    "{HEAD}defaultAction: {}\nmode: {}\n",
                    if allow_default { "allow" } else { "deny" },
                    if audit { "audit" } else { "enforce" }
                );
                if !case.is_empty() {
                    t.push_str(&format!("caseInsensitivePaths: {case}\n"));
                }
                if !params.is_empty() {
                    t.push_str(&format!("pathParameters: {params}\n"));
                }
                t.push_str("rules:\n");
                if rules.is_empty() {
                    t.push_str("  []\n");
                }
                for (i, r) in rules.iter().enumerate() {
                    t.push_str(&format!("  - name: r{i}\n{r}"));
                }
                t
            })
    }

    fn request_path() -> impl Strategy<Value = String> {
        (
            prop::collection::vec(prop::sample::select(SEGS), 0..5),
            any::<bool>(),
        )
            .prop_map(|(segs, trailing)| {
                let mut p = String::new();
                for s in segs {
                    p.push('/');
                    p.push_str(s);
                }
                if trailing || p.is_empty() {
                    p.push('/');
                }
                p
            })
    }

    /// Raw paths as a hostile caller writes them: `;` parameters, `..;`, dots, case.
    fn raw_request_path() -> impl Strategy<Value = String> {
        prop::collection::vec(
            prop::sample::select(vec![
                "a", "admin", "Admin", "ADMIN", "x", "..", ".", "..;", "..;x", "admin;x",
                "a;b=c;d", ";", ";x", "%2e%2e;", "x;", "",
            ]),
            0..5,
        )
        .prop_map(|segs| format!("/{}", segs.join("/")))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        /// Under `caseInsensitivePaths: true` a pattern and a path that differ only in
        /// letter case match, whichever side has the capitals, through the index as in the
        /// reference; under the default they do not.
        #[test]
        fn case_insensitive_matching_ignores_case_on_both_sides(
            pattern in prop::collection::vec(prop::sample::select(vec!["admin", "Admin", "ADMIN", "x", "X", "*"]), 1..4),
            path in prop::collection::vec(prop::sample::select(vec!["admin", "aDMIN", "ADMIN", "x", "X"]), 1..4),
            globstar in any::<bool>(),
            insensitive in any::<bool>(),
        ) {
            let written = format!("/{}{}", pattern.join("/"), if globstar { "/**" } else { "" });
            let text = format!(
                "{HEAD}defaultAction: allow\ncaseInsensitivePaths: {insensitive}\nrules:\n  - name: d\n    action: deny\n    from: [\"*\"]\n    to: [{{paths: [{written}]}}]\n"
            );
            let p = compile(&[("p.yaml", text.as_str())]).unwrap();
            let raw = format!("/{}", path.join("/"));
            let n = normalize_path(&raw).unwrap();
            let d = p.decide(A, "GET", &n);
            prop_assert_eq!(d, p.decide_reference(A, "GET", n.match_view()));
            // What should happen, worked out on strings.
            let fold = |s: &str| if insensitive { s.to_ascii_lowercase() } else { s.to_owned() };
            let fits = |i: usize| pattern[i] == "*" || fold(pattern[i]) == fold(path[i]);
            let want_deny = path.len() >= pattern.len()
                && (globstar || path.len() == pattern.len())
                && (0..pattern.len()).all(fits);
            prop_assert_eq!(!d.is_allowed(), want_deny, "{} vs {}", written, raw);
        }

        /// `decide_request` (index, one pass per reading) equals the readings decided one
        /// by one with the reference evaluation; under `strictest` nothing either reading
        /// denies is allowed; `explain` reports the same decision; the path to forward is
        /// the literal one.
        #[test]
        fn request_decision_is_the_stricter_of_its_readings(
            text in policy_text(),
            caller in prop::sample::select(CALLERS),
            method in prop::sample::select(vec!["GET", "POST", "delete"]),
            raw in raw_request_path(),
        ) {
            let p = compile(&[("p.yaml", text.as_str())]).unwrap();
            let got = p.decide_request(caller, method, &raw);
            let want = reference_request(&p, caller, method, &raw);
            prop_assert_eq!(
                got.as_ref().map(|r| (r.decision, r.reading)).map_err(|e| *e),
                want
            );
            if let Ok(r) = &got {
                prop_assert_eq!(&r.path, &normalize_path(&raw).unwrap());
            }
            let x = p.explain(caller, method, &raw);
            prop_assert_eq!(x.decision, got.ok().map(|r| r.decision));
        }

        /// The index (principal buckets, path tries) decides exactly as a plain walk over
        /// every rule applying the written semantics.
        #[test]
        fn indexed_decision_equals_reference(
            text in policy_text(),
            caller in prop::sample::select(CALLERS),
            method in prop::sample::select(vec!["GET", "POST", "DELETE", "delete"]),
            path in request_path(),
            port in prop::sample::select(vec![80u16, 443, 5432, 8080]),
        ) {
            let p = compile(&[("p.yaml", text.as_str())]).unwrap();
            let n = normalize_path(&path).unwrap();
            prop_assert_eq!(p.decide(caller, method, &n), p.decide_reference(caller, method, n.match_view()));
            prop_assert_eq!(p.decide_l4(caller, port), p.decide_l4_reference(caller, port));
            let x = p.explain(caller, method, &path);
            prop_assert_eq!(x.decision, Some(p.decide(caller, method, &n)));
        }

        /// `denies_everything_from` is never wrong in the dangerous direction: if it says
        /// so, no request and no connection of the caller is allowed.
        #[test]
        fn denies_everything_means_nothing_is_allowed(
            text in policy_text(),
            caller in prop::sample::select(CALLERS),
            method in prop::sample::select(vec!["GET", "POST", "DELETE"]),
            path in request_path(),
            port in prop::sample::select(vec![80u16, 443, 5432]),
        ) {
            let p = compile(&[("p.yaml", text.as_str())]).unwrap();
            if p.denies_everything_from(caller) {
                let n = normalize_path(&path).unwrap();
                prop_assert!(!p.decide(caller, method, &n).is_allowed());
                prop_assert!(!p.decide_l4(caller, port).is_allowed());
            }
        }

        /// The index-driven lint finds exactly what checking every pair of rules finds.
        #[test]
        fn lint_candidates_from_the_index_miss_nothing(text in policy_text()) {
            let p = compile(&[("p.yaml", text.as_str())]).unwrap();
            prop_assert_eq!(p.lint(), p.lint_exhaustive());
        }

        /// A rule the lints call shadowed, redundant or never-matching never decides:
        /// removing it changes no decision (action, rule and audit report).
        #[test]
        fn linted_dead_rules_never_decide(
            text in policy_text(),
            caller in prop::sample::select(CALLERS),
            method in prop::sample::select(vec!["GET", "POST", "DELETE"]),
            path in request_path(),
            port in prop::sample::select(vec![80u16, 443, 5432]),
        ) {
            let p = compile(&[("p.yaml", text.as_str())]).unwrap();
            let dead: Vec<String> = p
                .lint()
                .into_iter()
                .filter(|w| match w.kind {
                    WarningKind::Shadowed | WarningKind::Redundant => true,
                    WarningKind::NeverMatches => !w.message.contains("`to["),
                    _ => false,
                })
                .map(|w| w.rule)
                .collect();
            let n = normalize_path(&path).unwrap();
            let d = p.decide(caller, method, &n);
            let l4 = p.decide_l4(caller, port);
            for name in &dead {
                prop_assert_ne!(d.rule, name.as_str());
                prop_assert!(d.audit.is_none_or(|a| a.rule != name.as_str()));
                prop_assert_ne!(l4.rule, name.as_str());
                prop_assert!(l4.audit.is_none_or(|a| a.rule != name.as_str()));
            }
        }
    }
}
