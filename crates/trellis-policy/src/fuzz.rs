//! The bodies of the cargo-fuzz targets in `fuzz/`, here so that the stable test suite
//! runs exactly the same checks over random inputs (`tests/fuzz_bodies.rs`). Not API.

use std::sync::OnceLock;

use crate::request::without_parameters;
use crate::{
    compile, normalize_path, CompiledPolicy, Decision, PathError, PathParameters, Reading,
};

/// A few callers and requests every successfully compiled policy is asked about.
const CALLERS: &[&str] = &[
    "spiffe://example.org/ns/prod/sa/service-a",
    "spiffe://example.org/ns/prod/sa/service-b",
    "spiffe://example.org/a",
    "spiffe://other.org/x/y",
    "not-a-spiffe-id",
    "",
];
const PATHS: &[&str] = &[
    "/",
    "/admin",
    "/admin/x",
    "/load-balancer/health",
    "/a/b/c",
    "/admin;x/user-export",
    "/public/..;/admin",
    "/..;/admin",
    "/ADMIN/x",
    "/a;jsessionid=1/b",
];
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
            for method in METHODS {
                let got = policy.decide_request(caller, method, raw);
                assert_eq!(
                    got.as_ref()
                        .map(|r| (r.decision, r.reading))
                        .map_err(|e| *e),
                    reference_request(&policy, caller, method, raw),
                    "caller {caller} {method} {raw}"
                );
                let Ok(path) = normalize_path(raw) else {
                    continue;
                };
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

/// Removes each segment's `;…` (written apart from `without_parameters`, to check it).
pub(crate) fn strip_reference(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    let mut skipping = false;
    for c in raw.chars() {
        match c {
            '/' => {
                skipping = false;
                out.push(c);
            }
            ';' => skipping = true,
            _ if skipping => {}
            _ => out.push(c),
        }
    }
    out
}

/// `decide_request` spelled out with the unindexed reference evaluation: the readings the
/// policy's `pathParameters` calls for, each normalized and decided alone, the stricter
/// kept ("allowed only if both readings are allowed; otherwise the denying reading
/// decides"; between two allows, one that reports an audit denial).
pub(crate) fn reference_request<'p>(
    p: &'p CompiledPolicy,
    caller: &str,
    method: &str,
    raw: &str,
) -> Result<(Decision<'p>, Reading), PathError> {
    let has = raw.contains(';');
    if has && p.path_parameters() == PathParameters::Reject {
        return Err(PathError::PathParameters);
    }
    let literal = normalize_path(raw)?;
    let dl = p.decide_reference(caller, method, literal.match_view());
    if !has || p.path_parameters() == PathParameters::Literal {
        return Ok((dl, Reading::Literal));
    }
    let stripped = strip_reference(raw);
    let bare = normalize_path(&stripped)?;
    let db = p.decide_reference(caller, method, bare.match_view());
    Ok(if !dl.is_allowed() {
        (dl, Reading::Literal)
    } else if !db.is_allowed() || (db.audit.is_some() && dl.audit.is_none()) {
        (db, Reading::WithoutParameters)
    } else {
        (dl, Reading::Literal)
    })
}

/// The three policies `path_readings` asks: `deny /admin/**` (else allow) under each
/// `pathParameters`, the strictest one also case-insensitive.
fn reading_policies() -> &'static [CompiledPolicy; 3] {
    static POLICIES: OnceLock<[CompiledPolicy; 3]> = OnceLock::new();
    POLICIES.get_or_init(|| {
        let make = |settings: &str| {
            let text = format!(
                "apiVersion: trellis.io/v1\nkind: Policy\ndefaultAction: allow\n{settings}\
                 rules:\n  - name: no-admin\n    action: deny\n    from: [\"*\"]\n    \
                 to: [{{paths: [/admin/**]}}]\n"
            );
            match compile(&[("readings.yaml", text.as_str())]) {
                Ok(p) => p,
                Err(e) => panic!("the fixed policy does not compile: {e}"),
            }
        };
        [
            make("pathParameters: strictest\ncaseInsensitivePaths: true\n"),
            make("pathParameters: reject\n"),
            make("pathParameters: literal\n"),
        ]
    })
}

/// Whether a normalized path is `/admin` or below it, in any case.
fn under_admin(normal: &str) -> bool {
    let view = normal.trim_start_matches('/');
    let first = view.split('/').next().unwrap_or("");
    first.eq_ignore_ascii_case("admin")
}

/// Any string as a raw request path → the readings and `decide_request` must not panic;
/// stripping parameters leaves no `;` and agrees with a second implementation; and the
/// security property: under `strictest` + `caseInsensitivePaths`, a request is only allowed
/// when neither its literal nor its parameter-less reading, in any case, is under
/// `/admin`. Under `reject` any `;` is refused; under `literal` the decision is the
/// literal path's.
pub fn path_readings(data: &[u8]) {
    let raw = String::from_utf8_lossy(data);
    let bare = without_parameters(&raw);
    assert!(!bare.contains(';'));
    assert_eq!(bare, strip_reference(&raw));
    let [strictest, reject, literal] = reading_policies();
    let caller = CALLERS[0];

    let got = strictest.decide_request(caller, "GET", &raw);
    assert_eq!(
        got.as_ref()
            .map(|r| (r.decision, r.reading))
            .map_err(|e| *e),
        reference_request(strictest, caller, "GET", &raw)
    );
    if let Ok(r) = &got {
        assert_eq!(Ok(&r.path), normalize_path(&raw).as_ref());
        if r.decision.is_allowed() {
            assert!(!under_admin(r.path.as_str()), "{raw:?} reached {}", r.path);
            match normalize_path(&bare) {
                Ok(b) => assert!(!under_admin(b.as_str()), "{raw:?} reached {b} without `;`"),
                Err(e) => {
                    panic!("{raw:?} allowed although its reading without `;` is refused: {e}")
                }
            }
        }
    }

    let got = reject.decide_request(caller, "GET", &raw);
    if raw.contains(';') {
        assert_eq!(got, Err(PathError::PathParameters));
    } else {
        assert_eq!(
            got.map(|r| r.reading).ok(),
            normalize_path(&raw).ok().map(|_| Reading::Literal)
        );
    }

    let got = literal.decide_request(caller, "GET", &raw);
    match normalize_path(&raw) {
        Ok(n) => {
            let r = got.as_ref().ok();
            assert_eq!(
                r.map(|r| r.decision),
                Some(literal.decide(caller, "GET", &n))
            );
            assert_eq!(r.map(|r| r.reading), Some(Reading::Literal));
        }
        Err(e) => assert_eq!(got.err(), Some(e)),
    }
}

/// A log line → `parse_access_line` must not panic; a record it returns must replay (be
/// decided again, as `trellis policy replay` does) without panicking, and the line it was
/// read from, with one character cut from its end, must never read as a different record.
pub fn access_line(data: &[u8]) {
    static POLICY: OnceLock<CompiledPolicy> = OnceLock::new();
    let policy = POLICY.get_or_init(|| {
        compile(&[(
            "p.yaml",
            "apiVersion: trellis.io/v1\nkind: Policy\nrules:\n  - name: api\n    action: allow\n    from: [\"*\"]\n    to:\n      - paths: [/api/**]\n  - name: db\n    action: allow\n    from: [\"*\"]\n    ports: [5432]\n",
        )])
        .expect("the fuzz policy compiles")
    });
    let text = String::from_utf8_lossy(data);
    let Ok(crate::LogLine::Record(record)) = crate::parse_access_line(&text) else {
        return;
    };
    let mut replay = crate::Replay::new(policy);
    let _ = replay.record(&record);
    let _ = replay.finish();
    if let Some((cut, _)) = text.char_indices().last() {
        if let Ok(crate::LogLine::Record(other)) = crate::parse_access_line(&text[..cut]) {
            // Only trailing whitespace can go without changing the record.
            assert_eq!(other, record, "{text:?}");
        }
    }
}
