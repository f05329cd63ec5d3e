//! Properties of normalization and matching:
//!
//! - a path decided one way in one spelling is decided the same way in every equivalent
//!   spelling (extra slashes, `./`, `x/../` detours, percent-encoded unreserved
//!   characters in either hex case, lowercase hex in kept escapes, raw non-ASCII versus
//!   its UTF-8 escapes, a trailing slash or `/.`);
//! - normalization is idempotent, and its output is in the normal form.
#![allow(clippy::unwrap_used)]

use proptest::prelude::*;
use trellis_policy::{compile, normalize_path, CompiledPolicy};

/// Canonical segments (already normal) and an equivalent raw spelling of each.
const SEGMENTS: &[(&str, &str)] = &[
    ("admin", "admin"),
    ("a~b", "a~b"),
    ("x.y", "x.y"),
    ("caf%C3%A9", "café"),
    ("semi%3Bcolon", "semi%3bcolon"),
    ("Users", "Users"),
    ("_-", "_-"),
    ("v1", "v1"),
];
const CALLERS: &[&str] = &[
    "spiffe://example.org/ns/prod/sa/a",
    "spiffe://example.org/ns/dev/sa/b",
];

fn pattern() -> impl Strategy<Value = String> {
    (
        prop::collection::vec(
            prop_oneof![
                4 => prop::sample::select(SEGMENTS).prop_map(|(c, _)| c.to_owned()),
                1 => Just("*".to_owned()),
            ],
            0..4,
        ),
        any::<bool>(),
    )
        .prop_map(|(segs, globstar)| {
            let mut p: String = segs.iter().map(|s| format!("/{s}")).collect();
            if globstar {
                p.push_str("/**");
            }
            if p.is_empty() {
                p.push('/');
            }
            p
        })
}

fn policy() -> impl Strategy<Value = CompiledPolicy> {
    (
        any::<bool>(),
        prop::collection::vec(
            (
                any::<bool>(),
                prop::sample::select(vec![
                    "\"*\"",
                    "spiffe://example.org/ns/prod/**",
                    "spiffe://example.org/ns/dev/sa/b",
                ]),
                prop::collection::vec(pattern(), 1..4),
            ),
            1..10,
        ),
    )
        .prop_map(|(default_allow, rules)| {
            let mut t = format!(
                "apiVersion: trellis.io/v1\nkind: Policy\ndefaultAction: {}\nrules:\n",
                if default_allow { "allow" } else { "deny" }
            );
            for (i, (deny, from, paths)) in rules.iter().enumerate() {
                t.push_str(&format!(
                    "  - name: r{i}\n    action: {}\n    from: [{from}]\n    to: [{{paths: [{}]}}]\n",
                    if *deny { "deny" } else { "allow" },
                    paths.join(", ")
                ));
            }
            compile(&[("p.yaml", t.as_str())]).unwrap()
        })
}

/// One spelling step applied before a segment.
#[derive(Debug, Clone)]
enum Noise {
    None,
    ExtraSlash,
    Dot,
    Detour(usize),
}

fn noise() -> impl Strategy<Value = Noise> {
    prop_oneof![
        4 => Just(Noise::None),
        1 => Just(Noise::ExtraSlash),
        1 => Just(Noise::Dot),
        1 => (0..SEGMENTS.len()).prop_map(Noise::Detour),
    ]
}

/// Percent-encodes unreserved characters of `seg` where `mask` says so (hex case from
/// `lower`), and lowercases the hex of kept escapes where `lower` says so.
fn respell(seg: &str, mask: &[bool], lower: &[bool]) -> String {
    let mut out = String::new();
    let bytes = seg.as_bytes();
    let mut i = 0;
    let mut k = 0;
    while i < bytes.len() {
        let flip = mask.get(k).copied().unwrap_or(false);
        let low = lower.get(k).copied().unwrap_or(false);
        k += 1;
        let b = bytes[i];
        if b == b'%' {
            let esc = &seg[i..i + 3];
            out.push_str(&if low {
                esc.to_ascii_lowercase()
            } else {
                esc.to_owned()
            });
            i += 3;
            continue;
        }
        if b.is_ascii() && (b.is_ascii_alphanumeric() || b"-._~".contains(&b)) && flip {
            let e = format!("%{b:02X}");
            out.push_str(&if low { e.to_ascii_lowercase() } else { e });
        } else {
            // Non-ASCII (from the raw spellings) goes through as is.
            let c = seg[i..].chars().next().unwrap();
            out.push(c);
            i += c.len_utf8();
            continue;
        }
        i += 1;
    }
    out
}

#[derive(Debug, Clone)]
struct Spelled {
    canonical: String,
    spelling: String,
}

fn spelled_path() -> impl Strategy<Value = Spelled> {
    (
        prop::collection::vec(
            (
                0..SEGMENTS.len(),
                any::<bool>(),
                noise(),
                prop::collection::vec(any::<bool>(), 12),
                prop::collection::vec(any::<bool>(), 12),
            ),
            0..5,
        ),
        prop::sample::select(vec!["", "/", "/.", "//"]),
    )
        .prop_map(|(segs, tail)| {
            let mut canonical = String::new();
            let mut spelling = String::new();
            for (idx, raw_form, noise, mask, lower) in segs {
                let (canon, raw) = SEGMENTS[idx];
                canonical.push('/');
                canonical.push_str(canon);
                match noise {
                    Noise::None => {}
                    Noise::ExtraSlash => spelling.push('/'),
                    Noise::Dot => spelling.push_str("/."),
                    Noise::Detour(j) => {
                        spelling.push('/');
                        spelling.push_str(SEGMENTS[j].1);
                        spelling.push_str("/%2e%2E");
                    }
                }
                spelling.push('/');
                let base = if raw_form { raw } else { canon };
                spelling.push_str(&respell(base, &mask, &lower));
            }
            if spelling.is_empty() || !tail.is_empty() {
                spelling.push_str(if spelling.is_empty() { "/" } else { tail });
            }
            if canonical.is_empty() {
                canonical.push('/');
            }
            Spelled {
                canonical,
                spelling,
            }
        })
}

fn strip_trailing_slash(s: &str) -> &str {
    if s.len() > 1 {
        s.strip_suffix('/').unwrap_or(s)
    } else {
        s
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// A path denied (or allowed) in one spelling gets the same decision, by the same
    /// rule, in every equivalent spelling.
    #[test]
    fn equivalent_spellings_get_the_same_decision(
        p in policy(),
        path in spelled_path(),
        caller in prop::sample::select(CALLERS),
        method in prop::sample::select(vec!["GET", "POST"]),
    ) {
        let canonical = normalize_path(&path.canonical).unwrap();
        prop_assert!(canonical.is_borrowed(), "{} is not canonical", path.canonical);
        let spelled = normalize_path(&path.spelling).unwrap();
        prop_assert_eq!(
            strip_trailing_slash(spelled.as_str()),
            strip_trailing_slash(canonical.as_str()),
            "spelling {}", path.spelling
        );
        prop_assert_eq!(
            p.decide(caller, method, &spelled),
            p.decide(caller, method, &canonical),
            "spelling {} vs {}", path.spelling, path.canonical
        );
    }

    /// Normalizing twice gives what normalizing once gave, borrowed.
    #[test]
    fn normalize_is_idempotent(raw in "/[a-zA-Z0-9./%~_:;@!*{}é -]{0,30}") {
        if let Ok(once) = normalize_path(&raw) {
            let twice = normalize_path(once.as_str()).unwrap();
            prop_assert!(twice.is_borrowed());
            prop_assert_eq!(twice.as_str(), once.as_str());
        }
    }

    /// Normal form: ASCII, absolute, no empty or dot segment, no lowercase hex, no escape
    /// of an unreserved character.
    #[test]
    fn normalized_paths_are_in_normal_form(raw in "/[a-zA-Z0-9./%~_é-]{0,30}") {
        if let Ok(n) = normalize_path(&raw) {
            let s = n.as_str();
            prop_assert!(s.is_ascii() && s.starts_with('/'));
            prop_assert!(!s.contains("//"));
            let inner = s.trim_end_matches('/');
            for seg in inner.split('/').skip(1) {
                prop_assert!(seg != "." && seg != "..", "{}", s);
            }
            let b = s.as_bytes();
            for (i, _) in s.match_indices('%') {
                let hex = &s[i + 1..i + 3];
                prop_assert_eq!(hex, hex.to_ascii_uppercase());
                let v = u8::from_str_radix(hex, 16).unwrap();
                prop_assert!(!(v.is_ascii_alphanumeric() || b"-._~".contains(&v)), "{}", s);
                prop_assert!(i + 2 < b.len());
            }
        }
    }
}
