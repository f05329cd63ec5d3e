//! `trellis policy diff`: where two policies decide differently, computed from their
//! rules, not from traffic.
//!
//! A decision depends on the caller, the method and the path only through which patterns
//! they match. The patterns of both policies split each dimension into finitely many
//! regions whose members match the same patterns:
//!
//! - **callers**: every SPIFFE ID a principal names, each of its ancestors `p`, and below
//!   each `p` a fresh one-segment and two-segment ID (`p/x`, `p/x/x`): a caller's matches
//!   depend only on its longest such ancestor and on whether it is one or more segments
//!   below it;
//! - **methods**: every method a rule names, and one it does not;
//! - **paths**: built segment by segment: at each depth, each literal a still-matching
//!   pattern has there (as written, lower- and uppercased, for `caseInsensitivePaths`) and a
//!   fresh segment; one fresh segment past the longest pattern (`/a` vs `/a/**`); and, when
//!   `pathParameters` differs, each path with a `;` parameter in its first segment;
//! - **ports** (TCP): every port a rule names, and one it does not.
//!
//! Candidates that match the same patterns are merged, so what remains is one concrete
//! example per region. Each is decided under both policies with
//! [`CompiledPolicy::decide_request`] / [`CompiledPolicy::decide_l4`] (the sidecar's own
//! entry points); an outcome that differs is a change. A change of deciding rule alone
//! (reordering, renaming, splitting rules) is not one.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt;

use serde::Serialize;

use crate::pattern::{PathPattern, Principal, Seg};
use crate::policy::CompiledPolicy;
use crate::replay::{decide_asked, Asked, Decided};

/// Most (caller, method, path) combinations a diff decides before giving up.
pub const MAX_DIFF_REQUESTS: usize = 20_000_000;

/// Why a diff was not computed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DiffError {
    /// The patterns induce more regions than [`MAX_DIFF_REQUESTS`].
    #[error(
        "the two policies split requests into {regions} regions, more than {max} to decide: \
         diff smaller sets of files"
    )]
    TooManyRegions {
        /// How many.
        regions: usize,
        /// The limit.
        max: usize,
    },
}

/// One region whose decision changes: an example and both decisions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DiffChange {
    /// A concrete request (or connection) of the region.
    pub example: Asked,
    /// The old policy's decision and rule.
    pub old: Decided,
    /// The new policy's decision and rule.
    pub new: Decided,
    /// How many regions share this pair of decisions (the example is the first).
    pub regions: usize,
}

impl fmt::Display for DiffChange {
    /// `POST /api/orders from spiffe://…: allow (api) → deny (default)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {} → {}", self.example, self.old, self.new)?;
        if self.regions > 1 {
            let more = self.regions - 1;
            let s = if more == 1 { "" } else { "s" };
            write!(f, " (+{more} more region{s} like it)")?;
        }
        Ok(())
    }
}

/// What a diff found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DiffReport {
    /// Regions decided (HTTP and TCP).
    pub regions: usize,
    /// The changes, one per pair of (old, new) decisions; empty: no decision changes.
    pub changes: Vec<DiffChange>,
}

/// Computes where `new` decides differently from `old`.
pub fn diff(old: &CompiledPolicy, new: &CompiledPolicy) -> Result<DiffReport, DiffError> {
    let both = [old, new];
    let principals: Vec<&Principal> = both
        .iter()
        .flat_map(|p| p.rules.iter().flat_map(|r| r.from.iter()))
        .collect();
    let callers = dedupe(caller_candidates(&principals), |c| {
        principals.iter().map(|p| p.matches(c)).collect()
    });

    let entries: Vec<_> = both
        .iter()
        .flat_map(|p| p.rules.iter().flat_map(|r| r.to.iter().flatten()))
        .collect();
    let methods = dedupe(method_candidates(&entries), |m| {
        entries.iter().map(|e| e.method_ok(m)).collect()
    });

    let patterns: Vec<(&PathPattern, bool)> = both
        .iter()
        .flat_map(|p| {
            p.rules
                .iter()
                .flat_map(|r| r.to.iter().flatten())
                .flat_map(|e| e.paths.iter().flatten())
                .map(|pat| (pat, p.case_insensitive_paths))
        })
        .collect();
    let params_differ = old.path_parameters != new.path_parameters;
    let mut paths = path_candidates(&patterns);
    if params_differ {
        let with_params: Vec<String> = paths.iter().filter_map(|p| with_parameter(p)).collect();
        paths.extend(with_params);
    }
    let paths = dedupe(paths, |raw| path_signature(raw, &patterns, params_differ));

    let ports = port_candidates(&both);

    let http = callers.len() * methods.len() * paths.len();
    let regions = http + callers.len() * ports.len();
    if regions > MAX_DIFF_REQUESTS {
        return Err(DiffError::TooManyRegions {
            regions,
            max: MAX_DIFF_REQUESTS,
        });
    }

    let mut groups: BTreeMap<(Decided, Decided), (usize, Asked)> = BTreeMap::new();
    let mut order: Vec<(Decided, Decided)> = Vec::new();
    let mut compare = |asked: Asked| {
        let (o, n) = (decide_asked(old, &asked), decide_asked(new, &asked));
        if o.outcome == n.outcome {
            return;
        }
        let key = (o, n);
        match groups.get_mut(&key) {
            Some(g) => g.0 += 1,
            None => {
                order.push(key.clone());
                groups.insert(key, (1, asked));
            }
        }
    };
    for caller in &callers {
        for method in &methods {
            for path in &paths {
                compare(Asked::Http {
                    from: caller.clone(),
                    method: method.clone(),
                    path: path.clone(),
                });
            }
        }
        for &port in &ports {
            compare(Asked::Tcp {
                from: caller.clone(),
                port,
            });
        }
    }
    let changes = order
        .into_iter()
        .filter_map(|key| {
            let (regions, example) = groups.remove(&key)?;
            Some(DiffChange {
                example,
                old: key.0,
                new: key.1,
                regions,
            })
        })
        .collect();
    Ok(DiffReport { regions, changes })
}

/// Keeps the first candidate of each signature, in order.
fn dedupe<T>(candidates: Vec<T>, signature: impl Fn(&T) -> Vec<bool>) -> Vec<T> {
    let mut seen = HashSet::new();
    candidates
        .into_iter()
        .filter(|c| seen.insert(signature(c)))
        .collect()
}

/// `spiffe://td`, `spiffe://td/a`, `spiffe://td/a/b` for `spiffe://td/a/b`.
fn ancestors_and_self(id: &str) -> Vec<&str> {
    let start = "spiffe://".len();
    let mut out: Vec<&str> = id
        .char_indices()
        .skip(start)
        .filter(|&(_, c)| c == '/')
        .map(|(i, _)| &id[..i])
        .collect();
    out.push(id);
    out
}

fn caller_candidates(principals: &[&Principal]) -> Vec<String> {
    let mut points: BTreeSet<&str> = BTreeSet::new();
    let mut exact = Vec::new();
    for p in principals {
        let id = match p {
            Principal::Any => continue,
            Principal::Exact(id) => {
                exact.push(id.to_string());
                id
            }
            Principal::OneMore(base) | Principal::AnyMore(base) => base,
        };
        points.extend(ancestors_and_self(id));
    }
    // Named IDs first: they make the most readable examples.
    let mut out = exact;
    for &p in &points {
        // A trust domain alone (`spiffe://td`) is not a workload's ID.
        if p["spiffe://".len()..].contains('/') {
            out.push(p.to_owned());
        }
    }
    for &p in &points {
        let fresh = (1..)
            .map(|i| {
                if i == 1 {
                    format!("{p}/x")
                } else {
                    format!("{p}/x{i}")
                }
            })
            .find(|c| !points.contains(c.as_str()))
            .unwrap_or_else(|| format!("{p}/x"));
        out.push(format!("{fresh}/x"));
        out.push(fresh);
    }
    if out.is_empty() {
        out.push("spiffe://example.org/x".to_owned());
    }
    out
}

fn method_candidates(entries: &[&crate::policy::ToEntry]) -> Vec<String> {
    let named: BTreeSet<&str> = entries
        .iter()
        .flat_map(|e| e.method_names.iter().flatten())
        .map(|m| &**m)
        .collect();
    let other = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]
        .into_iter()
        .find(|m| !named.contains(m))
        .unwrap_or("TRELLIS-OTHER");
    let mut out: Vec<String> = named.into_iter().map(str::to_owned).collect();
    out.insert(0, other.to_owned());
    out
}

/// The match view of a normalized path: segments joined by `/`, no leading or trailing
/// slash.
fn view_of(segs: &[String]) -> String {
    segs.join("/")
}

fn path_candidates(patterns: &[(&PathPattern, bool)]) -> Vec<String> {
    let all: Vec<usize> = (0..patterns.len()).collect();
    let mut out = Vec::new();
    let mut prefix = Vec::new();
    walk(patterns, &all, &mut prefix, &mut out);
    out
}

/// A segment no pattern has at this depth (any case).
fn fresh_segment(taken: &BTreeSet<String>) -> String {
    (1..)
        .map(|i| {
            if i == 1 {
                "x".to_owned()
            } else {
                format!("x{i}")
            }
        })
        .find(|s| !taken.iter().any(|t| t.eq_ignore_ascii_case(s)))
        .unwrap_or_else(|| "x".to_owned())
}

fn walk(
    patterns: &[(&PathPattern, bool)],
    alive: &[usize],
    prefix: &mut Vec<String>,
    out: &mut Vec<String>,
) {
    // A runaway product of `*` and literals: stop listing, `diff` reports the count.
    if out.len() > MAX_DIFF_REQUESTS {
        return;
    }
    let depth = prefix.len();
    out.push(format!("/{}", view_of(prefix)));
    let longer: Vec<usize> = alive
        .iter()
        .copied()
        .filter(|&i| patterns[i].0.segs.len() > depth)
        .collect();
    let mut literals: BTreeSet<String> = BTreeSet::new();
    for &i in &longer {
        let (pat, _) = patterns[i];
        if let Some(Seg::Lit(l)) = pat.segs.get(depth) {
            literals.insert(l.to_string());
            // As written (the compiled pattern may be case-folded) and both cases.
            if let Some(written) = pat.text.split('/').nth(depth + 1) {
                literals.insert(written.to_owned());
            }
            if !l.contains('%') {
                literals.insert(l.to_ascii_lowercase());
                literals.insert(l.to_ascii_uppercase());
            }
        }
    }
    let fresh = fresh_segment(&literals);
    if longer.is_empty() {
        // Past every pattern's segments: one more tells `/a` from `/a/**`.
        prefix.push(fresh);
        out.push(format!("/{}", view_of(prefix)));
        prefix.pop();
        return;
    }
    for lit in &literals {
        let next: Vec<usize> = longer
            .iter()
            .copied()
            .filter(|&i| match &patterns[i].0.segs[depth] {
                Seg::Star => true,
                Seg::Lit(l) => l.eq_ignore_ascii_case(lit),
            })
            .collect();
        prefix.push(lit.clone());
        walk(patterns, &next, prefix, out);
        prefix.pop();
    }
    let next: Vec<usize> = longer
        .iter()
        .copied()
        .filter(|&i| matches!(patterns[i].0.segs[depth], Seg::Star))
        .collect();
    prefix.push(fresh);
    walk(patterns, &next, prefix, out);
    prefix.pop();
}

/// `/a;p/b` for `/a/b` (the parameter in the first segment); `None` for `/`.
fn with_parameter(path: &str) -> Option<String> {
    let rest = path.strip_prefix('/')?;
    if rest.is_empty() {
        return None;
    }
    Some(match rest.split_once('/') {
        Some((first, tail)) => format!("/{first};p/{tail}"),
        None => format!("/{rest};p"),
    })
}

fn path_signature(raw: &str, patterns: &[(&PathPattern, bool)], params: bool) -> Vec<bool> {
    let view = |p: &str| {
        crate::path::normalize_path(p)
            .map(|n| n.match_view().to_owned())
            .ok()
    };
    let mut readings = vec![view(raw)];
    if params {
        readings.push(view(&crate::request::without_parameters(raw)));
    }
    readings
        .iter()
        .flat_map(|v| {
            patterns.iter().map(move |(pat, ci)| match v {
                Some(v) => pat.matches(v, *ci),
                None => false,
            })
        })
        .chain(readings.iter().map(Option::is_some))
        // `pathParameters: reject` refuses any `;`.
        .chain(std::iter::once(params && raw.contains(';')))
        .collect()
}

fn port_candidates(policies: &[&CompiledPolicy]) -> Vec<u16> {
    let named: BTreeSet<u16> = policies
        .iter()
        .flat_map(|p| p.rules.iter().flat_map(|r| r.ports.iter().flatten()))
        .copied()
        .collect();
    let other = (8080..=u16::MAX)
        .chain(1..8080)
        .find(|p| !named.contains(p))
        .unwrap_or(1);
    let mut out = vec![other];
    out.extend(named);
    out
}

/// The policy-wide settings that change decisions without any rule changing, named for
/// the report (`pathParameters`, `caseInsensitivePaths`, `defaultAction`, `mode`).
pub fn settings_changed(old: &CompiledPolicy, new: &CompiledPolicy) -> Vec<String> {
    let mut out = Vec::new();
    if old.default_action != new.default_action {
        out.push(format!(
            "defaultAction: {} → {}",
            old.default_action, new.default_action
        ));
    }
    if old.mode != new.mode {
        out.push(format!("mode: {} → {}", old.mode, new.mode));
    }
    if old.path_parameters != new.path_parameters {
        out.push(format!(
            "pathParameters: {} → {}",
            old.path_parameters, new.path_parameters
        ));
    }
    if old.case_insensitive_paths != new.case_insensitive_paths {
        out.push(format!(
            "caseInsensitivePaths: {} → {}",
            old.case_insensitive_paths, new.case_insensitive_paths
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replay::Outcome;

    fn policy(rules: &str) -> CompiledPolicy {
        policy_with("", rules)
    }

    fn policy_with(settings: &str, rules: &str) -> CompiledPolicy {
        let text = format!("apiVersion: trellis.io/v1\nkind: Policy\n{settings}rules:\n{rules}");
        crate::compile(&[("p.yaml", text)]).unwrap()
    }

    const BASE: &str = "  - name: api\n    action: allow\n    from: [spiffe://example.org/ns/prod/sa/web]\n    to:\n      - methods: [GET, POST]\n        paths: [/api/**]\n  - name: no-admin\n    action: deny\n    from: [\"*\"]\n    to:\n      - paths: [/api/admin/**]\n  - name: db\n    action: allow\n    from: [spiffe://example.org/ns/prod/*]\n    ports: [5432]\n";

    #[test]
    fn reordering_renaming_and_splitting_change_no_decision() {
        let old = policy(BASE);
        let reordered = policy("  - name: db2\n    action: allow\n    from: [spiffe://example.org/ns/prod/*]\n    ports: [5432]\n  - name: no-admin-renamed\n    action: deny\n    from: [\"*\"]\n    to:\n      - paths: [/api/admin/**]\n  - name: api-get\n    action: allow\n    from: [spiffe://example.org/ns/prod/sa/web]\n    to:\n      - methods: [GET]\n        paths: [/api/**]\n  - name: api-post\n    action: allow\n    from: [spiffe://example.org/ns/prod/sa/web]\n    to:\n      - methods: [POST]\n        paths: [/api/**]\n");
        let r = diff(&old, &reordered).unwrap();
        assert!(r.changes.is_empty(), "{:#?}", r.changes);
        assert!(r.regions > 10, "{}", r.regions);
    }

    #[test]
    fn a_narrowed_rule_shows_one_example_per_change() {
        let old = policy(BASE);
        let new = policy(&BASE.replace("methods: [GET, POST]", "methods: [GET]"));
        let r = diff(&old, &new).unwrap();
        let [c] = &r.changes[..] else {
            panic!("{:#?}", r.changes)
        };
        assert_eq!(
            c.to_string(),
            "POST /api from spiffe://example.org/ns/prod/sa/web: allow (api) → deny (default)"
        );
    }

    #[test]
    fn finds_changes_in_every_dimension() {
        let old = policy(BASE);
        // Callers: one segment more under prod (`/*` → `/**`) for TCP.
        let new = policy(&BASE.replace("ns/prod/*]\n    ports", "ns/prod/**]\n    ports"));
        let r = diff(&old, &new).unwrap();
        assert!(
            r.changes.iter().any(|c| matches!(&c.example, Asked::Tcp { from, port: 5432 } if from.matches('/').count() > 5)),
            "{:#?}",
            r.changes
        );
        // Paths: an exact path against a subtree.
        let new = policy(&BASE.replace("[/api/admin/**]", "[/api/admin]"));
        let r = diff(&old, &new).unwrap();
        assert!(
            r.changes
                .iter()
                .all(|c| c.old.outcome == Outcome::Deny && c.new.outcome == Outcome::Allow),
            "{:#?}",
            r.changes
        );
        assert!(
            r.changes.iter().any(|c| matches!(&c.example, Asked::Http { path, .. } if path.starts_with("/api/admin/"))),
            "{:#?}",
            r.changes
        );
        // Ports.
        let new = policy(&BASE.replace("ports: [5432]", "ports: [5433]"));
        let r = diff(&old, &new).unwrap();
        assert_eq!(r.changes.len(), 2, "{:#?}", r.changes);
        // Default action: everything unnamed flips.
        let new = policy_with("defaultAction: allow\n", BASE);
        assert!(!diff(&old, &new).unwrap().changes.is_empty());
    }

    #[test]
    fn settings_that_change_readings_are_found() {
        let old = policy(BASE);
        let new = policy_with("pathParameters: reject\n", BASE);
        let r = diff(&old, &new).unwrap();
        assert!(
            r.changes.iter().any(|c| c.new.outcome == Outcome::Refused),
            "{:#?}",
            r.changes
        );
        let new = policy_with("caseInsensitivePaths: true\n", BASE);
        let r = diff(&old, &new).unwrap();
        assert!(
            r.changes.iter().any(|c| matches!(&c.example, Asked::Http { path, .. } if path.contains("API") || path.contains("ADMIN"))),
            "{:#?}",
            r.changes
        );
        assert_eq!(
            settings_changed(&old, &new),
            vec!["caseInsensitivePaths: false → true"]
        );
    }

    #[test]
    fn the_diff_agrees_with_brute_force_on_small_policies() {
        // Every request over a small universe: where the two policies differ, the diff
        // must have reported a change with the same pair of outcomes.
        let old = policy(BASE);
        let new = policy("  - name: a\n    action: allow\n    from: [spiffe://example.org/ns/prod/**]\n    to:\n      - methods: [GET]\n        paths: [/api/*/x, /api/admin]\n  - name: d\n    action: deny\n    from: [spiffe://example.org/ns/prod/sa/web]\n    to:\n      - paths: [/api/orders]\n");
        let r = diff(&old, &new).unwrap();
        let reported: HashSet<(Decided, Decided)> = r
            .changes
            .iter()
            .map(|c| (c.old.clone(), c.new.clone()))
            .collect();
        let callers = [
            "spiffe://example.org/ns/prod/sa/web",
            "spiffe://example.org/ns/prod/sa/db",
            "spiffe://example.org/ns/prod/x",
            "spiffe://example.org/ns/dev/sa/web",
        ];
        let paths = [
            "/",
            "/api",
            "/api/orders",
            "/api/orders/x",
            "/api/admin",
            "/api/admin/x",
            "/api/y/x",
            "/api/y/x/z",
            "/other",
        ];
        for c in callers {
            for m in ["GET", "POST", "PUT"] {
                for p in paths {
                    let asked = Asked::Http {
                        from: c.into(),
                        method: m.into(),
                        path: p.into(),
                    };
                    let (o, n) = (decide_asked(&old, &asked), decide_asked(&new, &asked));
                    if o.outcome != n.outcome {
                        assert!(
                            reported.contains(&(o.clone(), n.clone())),
                            "{asked}: {o} → {n} not reported: {:#?}",
                            r.changes
                        );
                    }
                }
            }
        }
    }
}
