//! The cargo-fuzz targets' bodies (`trellis_policy::fuzz`, called by `fuzz/fuzz_targets/`)
//! run here on stable over a few thousand random inputs each, so CI exercises the same
//! properties: no panic on any input; normalization is a fixed point; a compiled policy
//! lints, explains, and decides exactly as the reference evaluation; a raw path's
//! readings (`;` parameters, case) never let `/admin` through a `deny /admin/**`.
#![allow(clippy::unwrap_used)]

use proptest::prelude::*;
use trellis_policy::fuzz;

/// Lines that a policy file might (or should not) contain, to build texts from.
const FRAGMENTS: &[&str] = &[
    "apiVersion: trellis.io/v1",
    "kind: Policy",
    "defaultAction: allow",
    "defaultAction: deny",
    "mode: audit",
    "pathParameters: strictest",
    "pathParameters: reject",
    "pathParameters: literal",
    "pathParameters: maybe",
    "caseInsensitivePaths: true",
    "caseInsensitivePaths: false",
    "caseInsensitivePaths: yes",
    "rules:",
    "rules: []",
    "  - name: r",
    "  - name: r2",
    "  - name: default",
    "    action: allow",
    "    action: deny",
    "    mode: audit",
    "    from: [\"*\"]",
    "    from: []",
    "    from: [spiffe://example.org/ns/prod/**]",
    "    from: [spiffe://example.org/ns/*/x]",
    "    from:",
    "      - spiffe://example.org/ns/prod/sa/service-a",
    "    to:",
    "    to: []",
    "      - methods: [GET]",
    "      - paths: [/admin/**, /a/*/b]",
    "      - paths: [/Admin/*, /ADMIN]",
    "        paths: [/a//b]",
    "        methods: []",
    "    ports: [5432]",
    "    ports: [0]",
    "  metods: [GET]",
    "x: &a [*a]",
    "y: *a",
    "<<: {a: 1}",
    "---",
    "\t- broken",
    ": :",
    "- [",
    "\"unterminated",
];

fn policy_like() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(
        prop_oneof![
            8 => prop::sample::select(FRAGMENTS).prop_map(|s| format!("{s}\n")),
            1 => "[ -~\n]{0,12}",
            1 => Just("\0".to_owned()),
        ],
        0..24,
    )
    .prop_map(|parts| parts.concat().into_bytes())
}

fn path_like() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        "/[a-zA-Z0-9./%~_:;@!*\\\\?# é-]{0,40}".prop_map(String::into_bytes),
        prop::collection::vec(
            prop::sample::select(vec![
                "/", "//", ".", "..", "%2e", "%2E", "%2f", "%5c", "%00", "%41", "%c3%a9", "%",
                "%4", "a", "admin", "é", "\\", "?", " ", "%25", "{",
            ]),
            0..16
        )
        .prop_map(|p| p.concat().into_bytes()),
    ]
}

/// Paths built from the pieces of `;`, dot, case and encoding tricks.
fn hostile_path() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(
        prop::sample::select(vec![
            "/",
            "admin",
            "ADMIN",
            "Admin",
            "%61dmin",
            "%41",
            ";",
            ";x",
            ";jsessionid=1",
            "..",
            "..;",
            ".",
            "%2e",
            "%2e%2e",
            "%3B",
            "%3b",
            "public",
            "x",
            "//",
            "%2F",
            "\\",
            "?",
        ]),
        0..12,
    )
    .prop_map(|p| format!("/{}", p.concat()).into_bytes())
}

/// An inbound access line as the sidecar writes it.
const ACCESS_LINE: &str = r#"{"timestamp":"2026-12-06T00:00:00.000001Z","level":"INFO","target":"trellis::access","message":"request","fields":{"caller":"spiffe://example.org/ns/prod/sa/web","direction":"inbound","method":"GET","path":"/api/orders","raw_path":"/api//orders","status":200,"duration_ms":0.2,"upstream":"127.0.0.1:9","rule":"api","decision":"allow","policy":"0123"}}"#;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    #[test]
    fn normalize_path_body_holds_for_random_bytes(data in prop::collection::vec(any::<u8>(), 0..64)) {
        fuzz::normalize(&data);
    }

    #[test]
    fn normalize_path_body_holds_for_path_like_strings(data in path_like()) {
        fuzz::normalize(&data);
    }

    #[test]
    fn access_line_body_holds_for_mangled_access_lines(
        cut in 0usize..400,
        insert in prop::sample::select(&["\"", "}", "{", "\\", ",", ":1", "\\u0000", "é", "null"][..]),
        at in 0usize..400,
    ) {
        // A real access line, cut short and with one token inserted somewhere.
        let line = ACCESS_LINE;
        let mut s = line[..line.len().saturating_sub(cut % line.len())].to_owned();
        let at = (0..=at.min(s.len())).rev().find(|&i| s.is_char_boundary(i)).unwrap_or(0);
        s.insert_str(at, insert);
        fuzz::access_line(s.as_bytes());
    }

    #[test]
    fn access_line_body_holds_for_random_bytes(data in prop::collection::vec(any::<u8>(), 0..200)) {
        fuzz::access_line(&data);
    }

    #[test]
    fn path_readings_body_holds_for_random_bytes(data in prop::collection::vec(any::<u8>(), 0..64)) {
        fuzz::path_readings(&data);
    }

    #[test]
    fn path_readings_body_holds_for_hostile_paths(data in hostile_path()) {
        fuzz::path_readings(&data);
    }

    #[test]
    fn policy_parse_body_holds_for_random_bytes(data in prop::collection::vec(any::<u8>(), 0..256)) {
        fuzz::policy_parse(&data);
    }

    #[test]
    fn policy_parse_body_holds_for_policy_like_texts(data in policy_like()) {
        fuzz::policy_parse(&data);
    }
}

/// Corners worth pinning (the fuzzers have found no failure so far; add any they find here).
#[test]
fn policy_parse_regressions() {
    for input in [
        &b""[..],
        b"\0",
        b"apiVersion: trellis.io/v1\nkind: Policy\nrules:\n  - name: a\n    action: allow\n    from: [\"*\"]\n",
        b"apiVersion: trellis.io/v1\nkind: Policy\nrules:\n  - {name: a, action: deny, from: [\"*\"], to: [{paths: [/]}]}\n",
        b"&a [*a]",
        b"apiVersion: &v trellis.io/v1\nkind: Policy\nrules:\n  - name: *v\n",
    ] {
        fuzz::policy_parse(input);
    }
}

/// The attacks of issue 13 and their relatives, pinned.
#[test]
fn path_readings_regressions() {
    for input in [
        "/admin;x/user-export",
        "/ADMIN/user-export",
        "/ADMIN;x/user-export",
        "/public/..;/admin",
        "/public/..;x/ADMIN/x",
        "/..;/admin",
        "/;/admin",
        "/admin%3Bx",
        "/a;b/..;/..;/admin",
        "/%2e%2e;/admin",
        "",
        ";",
        "/é;é/admin",
    ] {
        fuzz::path_readings(input.as_bytes());
    }
}

#[test]
fn normalize_path_regressions() {
    for input in [
        "/",
        "//",
        "/..",
        "/%2e%2e",
        "/a/b/../..",
        "/\u{0}",
        "/é/%C3%A9",
    ] {
        fuzz::normalize(input.as_bytes());
    }
}
