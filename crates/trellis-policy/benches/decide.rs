//! Decision latency for a 10-rule and a 10,000-rule policy (many principals and paths),
//! for allowed requests, denials by rule, misses that fall to the default, and unknown
//! callers; plus path normalization and compiling the 10,000-rule policy.
//!
//!     cargo bench -p trellis-policy --bench decide

// A benchmark reports failure by panicking.
#![allow(clippy::unwrap_used)]

use std::fmt::Write;
use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use trellis_policy::{compile, normalize_path, CompiledPolicy};

/// A policy of `n` rules: a few global denies (`*`) on admin paths (2 of 10, 10 of
/// 10,000), then per service an allow for its own API (exact caller), every tenth a
/// namespace-wide (`/*`) rule, every fiftieth a `/**` rule.
fn policy_text(n: usize) -> String {
    let mut t =
        String::from("apiVersion: trellis.io/v1\nkind: Policy\ndefaultAction: deny\nrules:\n");
    let denies = (n / 1000).clamp(2, 10);
    for k in 0..denies {
        writeln!(
            t,
            "  - name: deny-admin-{k}\n    action: deny\n    from: [\"*\"]\n    to:\n      - paths: [/admin{k}/**]"
        )
        .unwrap();
    }
    for i in 0..n - denies {
        let (ns, svc) = (i / 100, i % 100);
        let from = if i % 50 == 0 {
            format!("spiffe://example.org/ns/ns{ns}/**")
        } else if i % 10 == 0 {
            format!("spiffe://example.org/ns/ns{ns}/sa/*")
        } else {
            format!("spiffe://example.org/ns/ns{ns}/sa/svc{svc}")
        };
        writeln!(
            t,
            "  - name: svc-{i}\n    action: allow\n    from: [{from}]\n    to:\n      - methods: [GET, POST]\n        paths: [/api/v1/svc{i}/items/*, /api/v1/svc{i}/status, /api/v1/svc{i}/docs/**]"
        )
        .unwrap();
    }
    t
}

fn compiled(n: usize) -> CompiledPolicy {
    let text = policy_text(n);
    let p = compile(&[("bench.yaml", text.as_str())]).unwrap();
    assert_eq!(p.rule_count(), n);
    p
}

fn bench_decide(c: &mut Criterion) {
    for n in [10usize, 10_000] {
        let p = compiled(n);
        // Rule svc-{i} belongs to caller ns{i/100}/sa/svc{i%100}.
        let i = if n == 10 { 0 } else { 4321 };
        let caller = format!("spiffe://example.org/ns/ns{}/sa/svc{}", i / 100, i % 100);
        let (hit, hit_deep) = (
            format!("/api/v1/svc{i}/items/42"),
            format!("/api/v1/svc{i}/docs/a/b/c/d"),
        );
        let hit = normalize_path(&hit).unwrap();
        let hit_deep = normalize_path(&hit_deep).unwrap();
        let miss = normalize_path("/api/v1/svc9999/items/42").unwrap();
        let denied = normalize_path("/admin1/users/export").unwrap();
        let unknown = "spiffe://example.org/ns/elsewhere/sa/nobody";

        assert!(p.decide(&caller, "GET", &hit).is_allowed());
        assert!(p.decide(&caller, "GET", &hit_deep).is_allowed());
        assert!(!p.decide(&caller, "GET", &miss).is_allowed());
        assert_eq!(p.decide(&caller, "GET", &denied).rule, "deny-admin-1");

        let mut g = c.benchmark_group(format!("decide/{n}_rules"));
        g.bench_function("allow_hit", |b| {
            b.iter(|| black_box(p.decide(black_box(&caller), black_box("GET"), black_box(&hit))))
        });
        g.bench_function("allow_hit_deep_path", |b| {
            b.iter(|| black_box(p.decide(black_box(&caller), "GET", black_box(&hit_deep))))
        });
        g.bench_function("deny_hit", |b| {
            b.iter(|| black_box(p.decide(black_box(&caller), "GET", black_box(&denied))))
        });
        g.bench_function("miss_default", |b| {
            b.iter(|| black_box(p.decide(black_box(&caller), "GET", black_box(&miss))))
        });
        g.bench_function("unknown_caller", |b| {
            b.iter(|| black_box(p.decide(black_box(unknown), "GET", black_box(&hit))))
        });
        g.bench_function("l4", |b| {
            b.iter(|| black_box(p.decide_l4(black_box(&caller), black_box(5432))))
        });
        g.finish();
    }
}

fn bench_normalize(c: &mut Criterion) {
    let mut g = c.benchmark_group("normalize_path");
    g.bench_function("already_normal", |b| {
        b.iter(|| black_box(normalize_path(black_box("/api/v1/svc4321/items/42"))))
    });
    g.bench_function("rewritten", |b| {
        b.iter(|| {
            black_box(normalize_path(black_box(
                "/api//v1/./svc%34321/../items/%7e42",
            )))
        })
    });
    g.finish();
}

fn bench_compile(c: &mut Criterion) {
    let text = policy_text(10_000);
    let mut g = c.benchmark_group("compile");
    g.sample_size(10);
    g.bench_function("10000_rules", |b| {
        b.iter(|| black_box(compile(&[("bench.yaml", black_box(text.as_str()))]).unwrap()))
    });
    g.finish();
}

criterion_group!(benches, bench_decide, bench_normalize, bench_compile);
criterion_main!(benches);
