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
