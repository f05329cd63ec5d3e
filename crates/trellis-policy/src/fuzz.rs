//! The bodies of the cargo-fuzz targets in `fuzz/`, here so that the stable test suite
//! runs exactly the same checks over random inputs (`tests/fuzz_bodies.rs`). Not API.

use crate::{compile, normalize_path};

/// A few callers and requests every successfully compiled policy is asked about.
const CALLERS: &[&str] = &[
    "spiffe://example.org/ns/prod/sa/service-a",
    "spiffe://example.org/ns/prod/sa/service-b",
    "spiffe://example.org/a",
    "spiffe://other.org/x/y",
    "not-a-spiffe-id",
    "",
];
const PATHS: &[&str] = &["/", "/admin", "/admin/x", "/load-balancer/health", "/a/b/c"];
const METHODS: &[&str] = &["GET", "POST", "get"];

/// Policy text → `compile` must not panic; a policy that compiles must lint, explain and
/// decide without panicking, and its indexed decisions must equal the reference ones.
/// The input may hold two files separated by a NUL byte.
pub fn policy_parse(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let sources: Vec<(&str, &str)> = match text.split_once('\0') {
        Some((a, b)) => vec![("a.yaml", a), ("b.yaml", b)],
        None => vec![("policy.yaml", &*text)],
    };
    let Ok(policy) = compile(&sources) else {
        return;
    };
    let _ = policy.lint();
    for caller in CALLERS {
        let _ = policy.denies_everything_from(caller);
        for port in [1, 5432, 65535] {
            assert_eq!(
                policy.decide_l4(caller, port),
                policy.decide_l4_reference(caller, port)
            );
        }
        for raw in PATHS {
            let Ok(path) = normalize_path(raw) else {
                continue;
            };
            for method in METHODS {
                assert_eq!(
                    policy.decide(caller, method, &path),
                    policy.decide_reference(caller, method, path.match_view()),
                    "caller {caller} {method} {raw}"
                );
            }
        }
        let _ = policy.explain(caller, "GET", "/admin/x").to_string();
    }
}

/// Any string → `normalize_path` must not panic; a normalized path is returned unchanged
/// (and borrowed) when normalized again, starts with `/`, and is ASCII.
pub fn normalize(data: &[u8]) {
    let raw = String::from_utf8_lossy(data);
    let Ok(once) = normalize_path(&raw) else {
        return;
    };
    assert!(once.as_str().starts_with('/'));
    assert!(once.as_str().is_ascii());
    let twice = normalize_path(once.as_str());
    assert_eq!(twice.as_ref().map(|p| p.as_str()), Ok(once.as_str()));
    assert!(twice.is_ok_and(|p| p.is_borrowed()));
}
