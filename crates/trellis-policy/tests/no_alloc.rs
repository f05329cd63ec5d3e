//! `decide`, `decide_l4`, `decide_request` and normalizing an already-normal path allocate
//! nothing: the request path of the sidecar must not touch the allocator for
//! authorization. (A `;` under `pathParameters: strictest`, or an uppercase letter under
//! `caseInsensitivePaths: true`, costs one copy of the path.)
#![allow(clippy::unwrap_used)]

use std::fmt::Write;

use trellis_policy::{compile, normalize_path};

fn big_policy() -> String {
    let mut t = String::from("apiVersion: trellis.io/v1\nkind: Policy\nrules:\n");
    for k in 0..10 {
        writeln!(t, "  - name: deny-{k}\n    action: deny\n    mode: audit\n    from: [\"*\"]\n    to: [{{paths: [/admin{k}/**]}}]").unwrap();
    }
    for i in 0..2000 {
        let from = match i % 3 {
            0 => format!("spiffe://example.org/ns/ns{}/sa/svc{i}", i / 100),
            1 => format!("spiffe://example.org/ns/ns{}/sa/*", i / 100),
            _ => format!("spiffe://example.org/ns/ns{}/**", i / 100),
        };
        writeln!(t, "  - name: svc-{i}\n    action: allow\n    from: [{from}]\n    to: [{{methods: [GET], paths: [/api/svc{i}/*, /api/svc{i}/docs/**]}}]").unwrap();
    }
    writeln!(
        t,
        "  - name: tcp\n    action: allow\n    from: [spiffe://example.org/**]\n    ports: [5432]"
    )
    .unwrap();
    t
}

#[test]
fn decide_does_not_allocate() {
    let text = big_policy();
    let p = compile(&[("p.yaml", text.as_str())]).unwrap();
    let caller = "spiffe://example.org/ns/ns12/sa/svc1200";
    let paths = [
        normalize_path("/api/svc1200/items").unwrap(),
        normalize_path("/api/svc1200/docs/a/b/c").unwrap(),
        normalize_path("/admin3/x").unwrap(),
        normalize_path("/nothing/here/").unwrap(),
        normalize_path("/").unwrap(),
    ];
    let mut allowed = 0;
    let info = allocation_counter::measure(|| {
        for path in &paths {
            for method in ["GET", "post"] {
                for c in [caller, "spiffe://example.org/ns/ns12/sa/x", "not-spiffe"] {
                    let d = p.decide(c, method, path);
                    allowed += usize::from(d.is_allowed());
                    std::hint::black_box(d);
                }
            }
        }
        std::hint::black_box(p.decide_l4(caller, 5432));
        std::hint::black_box(p.decide_l4(caller, 80));
    });
    assert_eq!(info.count_total, 0, "decide allocated: {info:?}");
    assert!(allowed > 0);
}

#[test]
fn normalizing_an_already_normal_path_does_not_allocate() {
    let info = allocation_counter::measure(|| {
        for raw in ["/", "/api/v1/items/42", "/a/b/", "/x%C3%A9y"] {
            let n = normalize_path(raw).unwrap();
            assert!(n.is_borrowed());
            std::hint::black_box(n);
        }
    });
    assert_eq!(info.count_total, 0);
}

#[test]
fn decide_request_on_the_fast_path_does_not_allocate() {
    let text = big_policy();
    let p = compile(&[("p.yaml", text.as_str())]).unwrap();
    let caller = "spiffe://example.org/ns/ns12/sa/svc1200";
    // Already normal, no `;`, case-sensitive policy (default `pathParameters: strictest`).
    let raws = [
        "/api/svc1200/items",
        "/api/svc1200/docs/a/b/c",
        "/admin3/x",
        "/nothing/here/",
        "/",
        "/a%3Bb/%C3%A9",
    ];
    let mut allowed = 0;
    let info = allocation_counter::measure(|| {
        for raw in raws {
            for method in ["GET", "post"] {
                let r = p.decide_request(caller, method, raw).unwrap();
                assert!(r.path.is_borrowed());
                allowed += usize::from(r.decision.is_allowed());
                std::hint::black_box(r);
            }
        }
    });
    assert_eq!(info.count_total, 0, "decide_request allocated: {info:?}");
    assert!(allowed > 0);
}

#[test]
fn case_insensitive_policy_allocates_only_for_uppercase_paths() {
    let text = format!("{}caseInsensitivePaths: true\n", big_policy());
    let p = compile(&[("p.yaml", text.as_str())]).unwrap();
    let caller = "spiffe://example.org/ns/ns12/sa/svc1200";
    let info = allocation_counter::measure(|| {
        let r = p
            .decide_request(caller, "GET", "/api/svc1200/items")
            .unwrap();
        assert!(r.decision.is_allowed());
        std::hint::black_box(r);
    });
    assert_eq!(info.count_total, 0, "lowercase path allocated: {info:?}");
    let info = allocation_counter::measure(|| {
        let r = p
            .decide_request(caller, "GET", "/API/svc1200/Items")
            .unwrap();
        assert!(r.decision.is_allowed());
        std::hint::black_box(r);
    });
    assert_eq!(info.count_total, 1, "one lowercased copy: {info:?}");
}
