//! `trellis policy check` and `trellis policy explain`, run as the operator would.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Command, Output};

const POLICY: &str = "apiVersion: trellis.io/v1
kind: Policy
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
";

fn trellis(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_trellis"))
        .args(args)
        .output()
        .unwrap()
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn check_accepts_a_good_policy() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "p.yaml", POLICY);
    let out = trellis(&["policy", "check", &file]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).starts_with("ok: 2 rules, hash "),
        "{}",
        text(&out.stdout)
    );
}

#[test]
fn check_rejects_a_bad_file_with_its_location() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "bad.yaml",
        "apiVersion: trellis.io/v1\nkind: Policy\nrules:\n  - name: a\n    acton: allow\n",
    );
    let out = trellis(&["policy", "check", &file]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains(&format!("{file}:5:5: ")), "{err}");
    assert!(err.contains("acton"), "{err}");
}

#[test]
fn check_warns_about_a_shadowed_rule() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "shadow.yaml",
        "apiVersion: trellis.io/v1
kind: Policy
rules:
  - name: everyone
    action: allow
    from: [\"*\"]
  - name: only-x
    action: allow
    from: [spiffe://example.org/x]
    to: [{paths: [/x]}]
",
    );
    let out = trellis(&["policy", "check", &file]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(err.contains(&format!("{file}:7:")), "{err}");
    assert!(err.contains("warning:") && err.contains("only-x"), "{err}");
}

#[test]
fn check_compiles_files_together() {
    let dir = tempfile::tempdir().unwrap();
    let a = write(dir.path(), "a.yaml", POLICY);
    let b = write(dir.path(), "b.yaml", POLICY);
    let out = trellis(&["policy", "check", &a, &b]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains(&format!("{b}:5:")),
        "duplicate rule names: {err}"
    );
}

#[test]
fn explain_prints_the_deciding_rule() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "p.yaml", POLICY);
    let a = "spiffe://example.org/ns/prod/sa/service-a";
    let out = trellis(&[
        "policy",
        "explain",
        &file,
        "--from",
        a,
        "--method",
        "GET",
        "--path",
        "/admin/user-export",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert_eq!(
        stdout.lines().next(),
        Some("DENY by rule no-export"),
        "{stdout}"
    );
    assert!(stdout.contains(&format!("{file}:11:")), "{stdout}");

    let out = trellis(&[
        "policy",
        "explain",
        &file,
        "--from",
        a,
        "--path",
        "/load-balancer/./health",
    ]);
    assert!(out.status.success());
    assert_eq!(
        text(&out.stdout).lines().next(),
        Some("ALLOW by rule lb-health")
    );

    let out = trellis(&[
        "policy",
        "explain",
        &file,
        "--from",
        "spiffe://example.org/who",
        "--path",
        "/x",
    ]);
    assert!(out.status.success());
    assert_eq!(text(&out.stdout).lines().next(), Some("DENY by default"));
}

#[test]
fn explain_of_a_path_the_sidecar_refuses_fails() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "p.yaml", POLICY);
    let out = trellis(&[
        "policy",
        "explain",
        &file,
        "--from",
        "spiffe://example.org/a",
        "--path",
        "/admin%2Fx",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("encoded_slash"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn the_example_policy_checks_clean() {
    let example = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/policy/service-b.yaml"
    );
    let out = trellis(&["policy", "check", example]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stderr), "", "the example should have no warnings");
}

#[test]
fn check_warns_that_a_case_sensitive_deny_misses_uppercase() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "p.yaml", POLICY);
    let out = trellis(&["policy", "check", &file]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    // `      - paths: [/admin/**]` is line 15.
    assert!(
        err.contains(&format!(
            "{file}:15:17: warning: deny rule `no-export`: paths are matched \
             case-sensitively, so `/ADMIN/**` is not denied by `/admin/**`"
        )),
        "{err}"
    );
    assert!(err.contains("`caseInsensitivePaths: true`"), "{err}");

    // Stating the app's behaviour, either way, answers the warning.
    for setting in ["true", "false"] {
        let stated = POLICY.replace(
            "defaultAction: deny\n",
            &format!("defaultAction: deny\ncaseInsensitivePaths: {setting}\n"),
        );
        let file = write(dir.path(), "stated.yaml", &stated);
        let out = trellis(&["policy", "check", &file]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert_eq!(text(&out.stderr), "", "caseInsensitivePaths: {setting}");
    }
}

#[test]
fn check_rejects_an_unknown_path_parameters_setting_with_its_location() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "p.yaml",
        &POLICY.replace("defaultAction: deny\n", "pathParameters: maybe\n"),
    );
    let out = trellis(&["policy", "check", &file]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains(&format!("{file}:3:17: unknown pathParameters `maybe`")),
        "{err}"
    );
    for choice in ["`strictest`", "`reject`", "`literal`"] {
        assert!(err.contains(choice), "{err}");
    }
}

#[test]
fn explain_shows_which_reading_of_a_param_path_decided() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "p.yaml", POLICY);
    let out = trellis(&[
        "policy",
        "explain",
        &file,
        "--from",
        "spiffe://example.org/ns/prod/sa/service-a",
        "--path",
        "/admin;x/user-export",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    // Both readings are denied (by default as sent): the literal one decides.
    assert_eq!(stdout.lines().next(), Some("DENY by default"), "{stdout}");
    assert!(
        stdout.contains("  literal             /admin;x/user-export  deny by default  <- decides"),
        "{stdout}"
    );
    assert!(
        stdout.contains("  without_parameters  /admin/user-export    deny by rule `no-export`\n"),
        "{stdout}"
    );

    // Allowed as sent, denied as a servlet container reads it.
    let allow_all = POLICY.replace("defaultAction: deny", "defaultAction: allow");
    let file = write(dir.path(), "allow.yaml", &allow_all);
    let out = trellis(&[
        "policy",
        "explain",
        &file,
        "--from",
        "spiffe://example.org/ns/prod/sa/service-a",
        "--path",
        "/public/..;/admin/user-export",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert_eq!(
        stdout.lines().next(),
        Some("DENY by rule no-export (reading the path without its `;` parameters)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("readings: the path carries `;` parameters (pathParameters: strictest)"),
        "{stdout}"
    );
}

#[test]
fn explain_says_when_paths_matched_case_insensitively() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "p.yaml",
        &POLICY.replace(
            "defaultAction: deny\n",
            "defaultAction: deny\ncaseInsensitivePaths: true\n",
        ),
    );
    let out = trellis(&[
        "policy",
        "explain",
        &file,
        "--from",
        "spiffe://example.org/ns/prod/sa/service-a",
        "--path",
        "/ADMIN/User-Export",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert_eq!(
        stdout.lines().next(),
        Some("DENY by rule no-export"),
        "{stdout}"
    );
    assert!(
        stdout.contains("paths:    matched case-insensitively (caseInsensitivePaths: true)"),
        "{stdout}"
    );
}

#[test]
fn explain_of_a_param_path_under_reject_fails_naming_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "p.yaml",
        &POLICY.replace(
            "defaultAction: deny\n",
            "defaultAction: deny\npathParameters: reject\n",
        ),
    );
    let out = trellis(&[
        "policy",
        "explain",
        &file,
        "--from",
        "spiffe://example.org/ns/prod/sa/service-a",
        "--path",
        "/load-balancer/health;jsessionid=1",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stdout).lines().next(),
        Some("REFUSED with 400 before authorization")
    );
    let err = text(&out.stderr);
    assert!(err.contains("400 (path_parameters)"), "{err}");
}
