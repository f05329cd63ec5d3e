//! Decision latency for a 10-rule and a 10,000-rule policy (many principals and paths),
//! for allowed requests, denials by rule, misses that fall to the default, and unknown
//! callers; plus path normalization, compiling the 10,000-rule policy, and replaying
//! 1,000,000 access-log lines (`trellis policy replay` without the file reading).
//!
//!     cargo bench -p trellis-policy --bench decide
//!     cargo bench -p trellis-policy --bench decide -- replay

// A benchmark reports failure by panicking.
#![allow(clippy::unwrap_used)]

use std::fmt::Write;
use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use trellis_policy::{compile, normalize_path, parse_access_line, CompiledPolicy, LogLine, Replay};

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

/// `n` distinct log lines as a sidecar writes them: 8 of 10 inbound HTTP requests from 20
/// callers (allowed, denied, some paths to normalize, some with `;` parameters), 1 TCP
/// connection, 1 other line.
fn access_lines(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            let caller = format!("spiffe://example.org/ns/ns0/sa/svc{}", i % 20);
            match i % 10 {
                8 => format!(
                    r#"{{"timestamp":"2026-12-06T00:00:00.{i:06}Z","level":"INFO","target":"trellis::access","message":"connection","fields":{{"caller":"{caller}","direction":"inbound","port":5432,"decision":"deny","rule":"default","policy":"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"}}}}"#
                ),
                9 => format!(
                    r#"{{"timestamp":"2026-12-06T00:00:00.{i:06}Z","level":"INFO","target":"trellis_sidecar::pool","message":"connected","fields":{{"peer":"{caller}"}}}}"#
                ),
                k => {
                    let raw = match k {
                        0 => format!("/api/v1/svc{}/items/{i}", i % 20),
                        1 => format!("/api/v1/svc{}/docs/a/b/c", i % 20),
                        2 => format!("/api//v1/./svc{}/status", i % 20),
                        3 => format!("/api/v1/svc{};jsessionid={i}/status", i % 20),
                        4 => "/admin1/users/export".to_owned(),
                        _ => format!("/api/v1/svc{}/items/{i}", (i + 1) % 20),
                    };
                    format!(
                        r#"{{"timestamp":"2026-12-06T00:00:00.{i:06}Z","level":"INFO","target":"trellis::access","message":"request","fields":{{"caller":"{caller}","direction":"inbound","method":"GET","path":"{raw}","raw_path":"{raw}","status":200,"duration_ms":0.231,"upstream":"127.0.0.1:8080","rule":"svc-1","decision":"allow","policy":"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"}}}}"#
                    )
                }
            }
        })
        .collect()
}

fn bench_replay(c: &mut Criterion) {
    let p = compiled(10);
    // 10,000 distinct lines, read 100 times: one million lines per iteration.
    let lines = access_lines(10_000);
    let mut g = c.benchmark_group("replay");
    g.sample_size(10);
    g.bench_function("1000000_lines_10_rules", |b| {
        b.iter(|| {
            let mut replay = Replay::new(&p);
            for _ in 0..100 {
                for line in &lines {
                    match parse_access_line(black_box(line)).unwrap() {
                        LogLine::Record(r) => {
                            replay.record(&r);
                        }
                        LogLine::Skipped(why) => replay.skip(why),
                    }
                }
            }
            let report = replay.finish();
            assert_eq!(report.requests + report.connections, 900_000);
            black_box(report)
        })
    });
    g.finish();
}

criterion_group!(
    benches,
    bench_decide,
    bench_normalize,
    bench_compile,
    bench_replay
);
criterion_main!(benches);
