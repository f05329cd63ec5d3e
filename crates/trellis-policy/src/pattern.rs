//! The three kinds of pattern a rule holds: principals (who), paths and methods (what).
//! Each parses from its written form with an error message that says what to write, can
//! match a request on its own (the reference semantics that `explain` and the tests use),
//! and can tell whether it covers another pattern (for the shadowing lints).

use std::fmt;

use crate::path::normalize_path;

const SPIFFE_SCHEME: &str = "spiffe://";
/// SPIFFE IDs are at most 2048 bytes (SPIFFE-ID §2.3, "Maximum SPIFFE ID Length").
const MAX_SPIFFE_ID_LEN: usize = 2048;

/// Who a rule is about.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Principal {
    /// `*`: any caller (the sidecar only ever passes verified SPIFFE IDs).
    Any,
    /// `spiffe://td/a/b`: exactly this ID.
    Exact(Box<str>),
    /// `spiffe://td/a/*`: `base` is `spiffe://td/a`; matches `base/x`, one more segment.
    OneMore(Box<str>),
    /// `spiffe://td/a/**`: `base` is `spiffe://td/a`; matches `base/x`, `base/x/y`, …
    AnyMore(Box<str>),
}

impl Principal {
    /// Parses a principal as written in `from`.
    pub(crate) fn parse(s: &str) -> Result<Principal, String> {
        if s == "*" {
            return Ok(Principal::Any);
        }
        let hint = "expected a SPIFFE ID (`spiffe://example.org/ns/prod/sa/api`), one ending \
                    in `/*` (one more segment) or `/**` (one or more), or `*` (any caller)";
        let Some(rest) = s.strip_prefix(SPIFFE_SCHEME) else {
            return Err(format!("principal `{s}`: {hint}"));
        };
        if s.len() > MAX_SPIFFE_ID_LEN {
            return Err(format!(
                "principal `{}…`: longer than a SPIFFE ID may be ({MAX_SPIFFE_ID_LEN} bytes)",
                truncate(s, 40)
            ));
        }
        let (td, path) = match rest.split_once('/') {
            Some((td, path)) => (td, Some(path)),
            None => (rest, None),
        };
        if td.is_empty() {
            return Err(format!(
                "principal `{s}`: the trust domain is missing ({hint})"
            ));
        }
        if let Some(bad) = td
            .chars()
            .find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '.' | '-' | '_'))
        {
            let why = if bad.is_ascii_uppercase() {
                format!(
                    "trust domains are lowercase: write `{}`",
                    td.to_ascii_lowercase()
                )
            } else if bad == '*' {
                "wildcards may only end the path (`spiffe://example.org/ns/prod/*`), not \
                 stand in the trust domain"
                    .to_owned()
            } else {
                format!(
                    "`{bad}` is not allowed in a trust domain (lowercase letters, digits, \
                     `.`, `-`, `_`)"
                )
            };
            return Err(format!("principal `{s}`: {why}"));
        }
        let Some(path) = path else {
            return Err(format!(
                "principal `{s}` names a trust domain, not a workload: add a path, or write \
                 `{s}/**` for every workload in it"
            ));
        };
        let segments: Vec<&str> = path.split('/').collect();
        let last = segments.len() - 1;
        for (i, seg) in segments.iter().enumerate() {
            if seg.is_empty() {
                return Err(format!(
                    "principal `{s}`: empty path segment (`//` or a trailing `/`)"
                ));
            }
            if seg.contains('*') {
                if i != last {
                    return Err(format!(
                        "principal `{s}`: `*` and `**` may only be the last segment \
                         (`spiffe://example.org/ns/prod/*`), not appear in the middle"
                    ));
                }
                if *seg != "*" && *seg != "**" {
                    return Err(format!(
                        "principal `{s}`: `*` must be a whole segment (`…/prod/*`), not part \
                         of one"
                    ));
                }
                continue;
            }
            if *seg == "." || *seg == ".." {
                return Err(format!(
                    "principal `{s}`: `.` and `..` segments are not allowed in SPIFFE IDs"
                ));
            }
            if let Some(bad) = seg
                .chars()
                .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')))
            {
                return Err(format!(
                    "principal `{s}`: `{bad}` is not allowed in a SPIFFE ID path (letters, \
                     digits, `.`, `-`, `_`)"
                ));
            }
        }
        let base = || s[..s.rfind('/').unwrap_or(s.len())].into();
        Ok(match segments[last] {
            "*" => Principal::OneMore(base()),
            "**" => Principal::AnyMore(base()),
            _ => Principal::Exact(s.into()),
        })
    }

    /// Does this pattern match the caller's SPIFFE ID?
    pub(crate) fn matches(&self, caller: &str) -> bool {
        match self {
            Principal::Any => true,
            Principal::Exact(id) => **id == *caller,
            Principal::OneMore(base) => below(base, caller).is_some_and(|r| !r.contains('/')),
            Principal::AnyMore(base) => below(base, caller).is_some(),
        }
    }

    /// Does every caller this pattern matches also match `self`? (Certain answers only:
    /// `false` means "not provably".)
    pub(crate) fn covers(&self, other: &Principal) -> bool {
        use Principal::*;
        match (self, other) {
            (Any, _) => true,
            (_, Any) => false,
            (Exact(a), Exact(b)) => a == b,
            (Exact(_), _) => false,
            (OneMore(_) | AnyMore(_), Exact(id)) => self.matches(id),
            (OneMore(a), OneMore(b)) => a == b,
            (OneMore(_), AnyMore(_)) => false,
            (AnyMore(a), OneMore(b) | AnyMore(b)) => a == b || is_ancestor(a, b),
        }
    }
}

/// The non-empty rest of `id` below `base/`, if `id` is below `base`.
fn below<'a>(base: &str, id: &'a str) -> Option<&'a str> {
    id.strip_prefix(base)?
        .strip_prefix('/')
        .filter(|r| !r.is_empty())
}

/// Is `a` a proper ancestor of `b` (on segment boundaries)?
fn is_ancestor(a: &str, b: &str) -> bool {
    b.strip_prefix(a).is_some_and(|r| r.starts_with('/'))
}

fn truncate(s: &str, n: usize) -> &str {
    match s.char_indices().nth(n) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Principal::Any => f.write_str("*"),
            Principal::Exact(id) => f.write_str(id),
            Principal::OneMore(base) => write!(f, "{base}/*"),
            Principal::AnyMore(base) => write!(f, "{base}/**"),
        }
    }
}

/// One segment of a path pattern before any trailing `**`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Seg {
    /// Exactly this (normalized) segment.
    Lit(Box<str>),
    /// `*`: any one segment.
    Star,
}

/// A path pattern: `/a/b`, `/a/*`, `/a/*/c`, `/a/**`, `/`, `/**`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct PathPattern {
    /// As written (which is its normal form).
    pub text: Box<str>,
    /// The segments before a trailing `**`.
    pub segs: Vec<Seg>,
    /// Ends in `**`: zero or more further segments.
    pub globstar: bool,
}

impl PathPattern {
    /// The pattern `/**` (what an absent `paths` means).
    pub(crate) fn any() -> PathPattern {
        PathPattern {
            text: "/**".into(),
            segs: Vec::new(),
            globstar: true,
        }
    }

    /// Parses a path pattern as written in `paths`.
    pub(crate) fn parse(s: &str) -> Result<PathPattern, String> {
        if !s.starts_with('/') {
            return Err(format!("path pattern `{s}` must start with `/`"));
        }
        match normalize_path(s) {
            Err(e) => return Err(format!("path pattern `{s}`: {e}")),
            Ok(n) if n.as_str() != s => {
                return Err(format!(
                    "path pattern `{s}` is not in normal form: write `{n}` (requests are \
                     normalized before matching, so `{s}` could never be seen)"
                ))
            }
            Ok(_) => {}
        }
        if s != "/" && s.ends_with('/') {
            return Err(format!(
                "path pattern `{s}`: drop the trailing slash: `{}` already matches both \
                 with and without it",
                &s[..s.len() - 1]
            ));
        }
        let view = &s[1..];
        let parts: Vec<&str> = if view.is_empty() {
            Vec::new()
        } else {
            view.split('/').collect()
        };
        let mut segs = Vec::with_capacity(parts.len());
        let mut globstar = false;
        for (i, part) in parts.iter().enumerate() {
            match *part {
                "**" if i + 1 == parts.len() => globstar = true,
                "**" => {
                    return Err(format!(
                        "path pattern `{s}`: `**` may only end a pattern (`/admin/**`)"
                    ))
                }
                "*" => segs.push(Seg::Star),
                p if p.contains('*') => {
                    return Err(format!(
                        "path pattern `{s}`: `*` must be a whole segment (`/a/*`), not part \
                         of one (`/a*`)"
                    ))
                }
                p => segs.push(Seg::Lit(p.into())),
            }
        }
        Ok(PathPattern {
            text: s.into(),
            segs,
            globstar,
        })
    }

    /// Does the pattern match a normalized path's match view (segments joined by `/`,
    /// no leading or trailing slash, `""` for the root)? With `case_insensitive`, literal
    /// segments compare ASCII case-insensitively (the reference semantics of
    /// `caseInsensitivePaths: true`; the index lowercases instead).
    pub(crate) fn matches(&self, view: &str, case_insensitive: bool) -> bool {
        let mut it = segments(view);
        for seg in &self.segs {
            match (seg, it.next()) {
                (_, None) => return false,
                (Seg::Star, Some(_)) => {}
                (Seg::Lit(l), Some(s)) if **l == *s => {}
                (Seg::Lit(l), Some(s)) if case_insensitive && l.eq_ignore_ascii_case(s) => {}
                (Seg::Lit(_), Some(_)) => return false,
            }
        }
        self.globstar || it.next().is_none()
    }

    /// Lowercases the literal segments (ASCII), for a policy with
    /// `caseInsensitivePaths: true`; `text` stays as written, for messages.
    pub(crate) fn fold_case(&mut self) {
        for seg in &mut self.segs {
            if let Seg::Lit(l) = seg {
                if l.bytes().any(|b| b.is_ascii_uppercase()) {
                    *l = l.to_ascii_lowercase().into();
                }
            }
        }
    }

    /// True when the pattern has an ASCII letter outside an escape's hex digits: a
    /// case-sensitive match of it can be dodged by changing that letter's case.
    pub(crate) fn has_letters(&self) -> bool {
        self.segs.iter().any(|seg| match seg {
            Seg::Star => false,
            Seg::Lit(l) => {
                let b = l.as_bytes();
                let mut i = 0;
                while i < b.len() {
                    if b[i] == b'%' {
                        // `%C3`: escapes are written in uppercase hex by normal form, and
                        // the hex is not a letter a request can change the case of.
                        i += 3;
                        continue;
                    }
                    if b[i].is_ascii_alphabetic() {
                        return true;
                    }
                    i += 1;
                }
                false
            }
        })
    }

    /// Does this pattern match every path that `other` matches?
    pub(crate) fn covers(&self, other: &PathPattern) -> bool {
        let pairs_covered = || {
            self.segs
                .iter()
                .zip(&other.segs)
                .all(|(a, b)| match (a, b) {
                    (Seg::Star, _) => true,
                    (Seg::Lit(x), Seg::Lit(y)) => x == y,
                    (Seg::Lit(_), Seg::Star) => false,
                })
        };
        if self.globstar {
            other.segs.len() >= self.segs.len() && pairs_covered()
        } else {
            !other.globstar && other.segs.len() == self.segs.len() && pairs_covered()
        }
    }
}

/// The segments of a match view.
pub(crate) fn segments(view: &str) -> impl Iterator<Item = &str> {
    let mut rest = (!view.is_empty()).then_some(view);
    std::iter::from_fn(move || {
        let r = rest?;
        match r.split_once('/') {
            Some((seg, next)) => {
                rest = Some(next);
                Some(seg)
            }
            None => {
                rest = None;
                Some(r)
            }
        }
    })
}

/// Methods registered in the IANA HTTP Method Registry that the `unknown method` lint
/// accepts without comment.
pub(crate) const KNOWN_METHODS: &[&str] = &[
    "GET",
    "HEAD",
    "POST",
    "PUT",
    "DELETE",
    "CONNECT",
    "OPTIONS",
    "TRACE",
    "PATCH",
    "QUERY",
    "PROPFIND",
    "PROPPATCH",
    "MKCOL",
    "COPY",
    "MOVE",
    "LOCK",
    "UNLOCK",
    "SEARCH",
    "REPORT",
    "ACL",
    "MERGE",
    "BIND",
    "UNBIND",
    "REBIND",
    "CHECKOUT",
    "CHECKIN",
    "UNCHECKOUT",
    "MKACTIVITY",
    "MKCALENDAR",
    "MKREDIRECTREF",
    "MKWORKSPACE",
    "ORDERPATCH",
    "UPDATE",
    "UPDATEREDIRECTREF",
    "VERSION-CONTROL",
    "LABEL",
    "BASELINE-CONTROL",
    "LINK",
    "UNLINK",
    "PRI",
];

/// Validates a method as written in `methods`: an RFC 9110 token, in uppercase.
pub(crate) fn parse_method(s: &str) -> Result<Box<str>, String> {
    if s == "*" {
        return Err("method `*`: leave `methods` out to match any method".to_owned());
    }
    if s.is_empty() {
        return Err("empty method name".to_owned());
    }
    // tchar = "!" / "#" / "$" / "%" / "&" / "'" / "*" / "+" / "-" / "." / "^" / "_" / "`"
    //       / "|" / "~" / DIGIT / ALPHA            (RFC 9110 §5.6.2)
    let tchar = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
    if let Some(bad) = s.chars().find(|&c| !tchar(c)) {
        return Err(format!(
            "method `{s}`: `{bad}` cannot appear in an HTTP method (RFC 9110 token)"
        ));
    }
    if s.bytes().any(|b| b.is_ascii_lowercase()) {
        return Err(format!(
            "method `{s}`: write methods in uppercase: `{}`",
            s.to_ascii_uppercase()
        ));
    }
    Ok(s.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Principal {
        Principal::parse(s).unwrap()
    }

    fn perr(s: &str) -> String {
        Principal::parse(s).unwrap_err()
    }

    fn path(s: &str) -> PathPattern {
        PathPattern::parse(s).unwrap()
    }

    fn path_err(s: &str) -> String {
        PathPattern::parse(s).unwrap_err()
    }

    #[test]
    fn principal_forms_parse() {
        assert_eq!(p("*"), Principal::Any);
        assert_eq!(
            p("spiffe://example.org/ns/prod/sa/a"),
            Principal::Exact("spiffe://example.org/ns/prod/sa/a".into())
        );
        assert_eq!(
            p("spiffe://example.org/ns/prod/*"),
            Principal::OneMore("spiffe://example.org/ns/prod".into())
        );
        assert_eq!(
            p("spiffe://example.org/**"),
            Principal::AnyMore("spiffe://example.org".into())
        );
    }

    #[test]
    fn mid_path_principal_wildcard_is_rejected() {
        assert!(perr("spiffe://td/ns/*/sa/x").contains("only be the last segment"));
    }

    #[test]
    fn double_star_not_at_end_of_principal_is_rejected() {
        assert!(perr("spiffe://td/**/sa/x").contains("only be the last segment"));
    }

    #[test]
    fn partial_segment_principal_wildcard_is_rejected() {
        assert!(perr("spiffe://td/ns/prod-*").contains("whole segment"));
    }

    #[test]
    fn non_spiffe_principal_is_rejected() {
        assert!(perr("https://example.org/x").contains("expected a SPIFFE ID"));
        assert!(perr("example.org/ns/x").contains("expected a SPIFFE ID"));
        assert!(perr("SPIFFE://example.org/x").contains("expected a SPIFFE ID"));
        assert!(perr("**").contains("expected a SPIFFE ID"));
    }

    #[test]
    fn uppercase_trust_domain_is_rejected_with_the_fix() {
        assert!(perr("spiffe://Example.org/x").contains("write `example.org`"));
    }

    #[test]
    fn wildcard_trust_domain_is_rejected() {
        assert!(perr("spiffe://*/ns/x").contains("trust domain"));
    }

    #[test]
    fn trust_domain_alone_is_not_a_principal() {
        assert!(perr("spiffe://example.org").contains("spiffe://example.org/**"));
        assert!(perr("spiffe://").contains("trust domain is missing"));
    }

    #[test]
    fn principal_with_empty_segment_or_port_is_rejected() {
        assert!(perr("spiffe://td/a//b").contains("empty path segment"));
        assert!(perr("spiffe://td/a/").contains("empty path segment"));
        assert!(perr("spiffe://td:443/a").contains("`:`"));
        assert!(perr("spiffe://td/a/..").contains("`..`"));
        assert!(perr("spiffe://td/a?b").contains("`?`"));
    }

    #[test]
    fn one_more_principal_matches_exactly_one_more_segment() {
        let pat = p("spiffe://td/ns/prod/*");
        assert!(pat.matches("spiffe://td/ns/prod/a"));
        assert!(!pat.matches("spiffe://td/ns/prod"));
        assert!(!pat.matches("spiffe://td/ns/prod/a/b"));
        assert!(!pat.matches("spiffe://td/ns/production/a"));
    }

    #[test]
    fn any_more_principal_matches_one_or_more_segments() {
        let pat = p("spiffe://td/ns/prod/**");
        assert!(pat.matches("spiffe://td/ns/prod/a"));
        assert!(pat.matches("spiffe://td/ns/prod/sa/a"));
        assert!(!pat.matches("spiffe://td/ns/prod"));
        assert!(!pat.matches("spiffe://td/ns/production/a"));
    }

    #[test]
    fn principal_coverage() {
        assert!(p("*").covers(&p("spiffe://td/a")));
        assert!(!p("spiffe://td/a").covers(&p("*")));
        assert!(p("spiffe://td/**").covers(&p("spiffe://td/ns/*")));
        assert!(p("spiffe://td/ns/**").covers(&p("spiffe://td/ns/*")));
        assert!(!p("spiffe://td/ns/*").covers(&p("spiffe://td/ns/**")));
        assert!(p("spiffe://td/ns/*").covers(&p("spiffe://td/ns/a")));
        assert!(!p("spiffe://td/ns/*").covers(&p("spiffe://td/ns/a/b")));
        assert!(!p("spiffe://td/ns/**").covers(&p("spiffe://td/nsx/**")));
    }

    #[test]
    fn path_pattern_forms_parse() {
        assert_eq!(path("/").segs.len(), 0);
        assert!(!path("/").globstar);
        assert!(path("/**").globstar);
        assert_eq!(path("/a/*/c").segs[1], Seg::Star);
    }

    #[test]
    fn admin_prefix_does_not_match_administrator() {
        let pat = path("/admin/**");
        assert!(pat.matches("admin", false));
        assert!(pat.matches("admin/users", false));
        assert!(!pat.matches("administrator", false));
        assert!(!pat.matches("administrator/x", false));
    }

    #[test]
    fn double_star_matches_the_prefix_itself_and_everything_below() {
        let pat = path("/admin/**");
        assert!(pat.matches("admin", false));
        assert!(pat.matches("admin/a/b/c", false));
        assert!(!pat.matches("", false));
        assert!(path("/**").matches("", false));
    }

    #[test]
    fn single_star_matches_exactly_one_segment() {
        let pat = path("/users/*");
        assert!(pat.matches("users/42", false));
        assert!(!pat.matches("users", false));
        assert!(!pat.matches("users/42/posts", false));
        assert!(path("/users/*/posts").matches("users/42/posts", false));
    }

    #[test]
    fn exact_path_matches_only_itself() {
        let pat = path("/a/b");
        assert!(pat.matches("a/b", false));
        assert!(!pat.matches("a/b/c", false));
        assert!(!pat.matches("a", false));
        assert!(path("/").matches("", false));
        assert!(!path("/").matches("a", false));
    }

    #[test]
    fn case_insensitive_match_compares_literal_segments_ignoring_ascii_case() {
        let pat = path("/Admin/*/x");
        assert!(!pat.matches("admin/a/X", false));
        assert!(pat.matches("Admin/a/x", false));
        assert!(pat.matches("admin/a/X", true));
        assert!(pat.matches("ADMIN/Whatever/x", true));
        assert!(!pat.matches("administrator/a/x", true));
    }

    #[test]
    fn fold_case_lowercases_literal_segments_and_keeps_the_text() {
        let mut pat = path("/Admin/*/caf%C3%A9/**");
        pat.fold_case();
        assert_eq!(pat.segs[0], Seg::Lit("admin".into()));
        assert_eq!(pat.segs[1], Seg::Star);
        assert_eq!(pat.segs[2], Seg::Lit("caf%c3%a9".into()));
        assert_eq!(&*pat.text, "/Admin/*/caf%C3%A9/**");
        assert!(pat.globstar);
    }

    #[test]
    fn letters_outside_escapes_make_a_pattern_case_dodgeable() {
        assert!(path("/admin/**").has_letters());
        assert!(path("/1/v2").has_letters());
        assert!(path("/x%C3%A9").has_letters());
        assert!(!path("/1/*/2").has_letters());
        assert!(!path("/%C3%A9/**").has_letters());
        assert!(!path("/").has_letters());
        assert!(!path("/**").has_letters());
    }

    #[test]
    fn double_star_in_the_middle_of_a_path_is_rejected() {
        assert_eq!(
            path_err("/a/**/b"),
            "path pattern `/a/**/b`: `**` may only end a pattern (`/admin/**`)"
        );
    }

    #[test]
    fn partial_segment_path_wildcard_is_rejected() {
        assert!(path_err("/admin*").contains("whole segment"));
        assert!(path_err("/a/***").contains("whole segment"));
    }

    #[test]
    fn non_normal_path_pattern_is_rejected_with_its_normal_form() {
        assert!(path_err("/a//b").contains("write `/a/b`"));
        assert!(path_err("/a/./b").contains("write `/a/b`"));
        assert!(path_err("/%61dmin/**").contains("write `/admin/**`"));
        assert!(path_err("/a/%2F").contains("encoded slash"));
        assert!(path_err("/../a").contains("above the root"));
        assert!(path_err("admin").contains("must start with `/`"));
    }

    #[test]
    fn trailing_slash_in_path_pattern_is_rejected() {
        assert!(path_err("/admin/").contains("drop the trailing slash"));
    }

    #[test]
    fn path_coverage() {
        assert!(path("/**").covers(&path("/")));
        assert!(path("/**").covers(&path("/a/**")));
        assert!(path("/a/**").covers(&path("/a")));
        assert!(path("/a/**").covers(&path("/a/*/c")));
        assert!(!path("/a/*").covers(&path("/a/**")));
        assert!(!path("/*/**").covers(&path("/**")));
        assert!(path("/*/b").covers(&path("/a/b")));
        assert!(!path("/a/b").covers(&path("/*/b")));
        assert!(!path("/a").covers(&path("/a/b")));
    }

    #[test]
    fn methods_must_be_uppercase_tokens() {
        assert_eq!(&*parse_method("GET").unwrap(), "GET");
        assert_eq!(&*parse_method("PROPFIND").unwrap(), "PROPFIND");
        assert!(parse_method("get").unwrap_err().contains("`GET`"));
        assert!(parse_method("GE T").unwrap_err().contains("RFC 9110"));
        assert!(parse_method("*")
            .unwrap_err()
            .contains("leave `methods` out"));
        assert!(parse_method("").is_err());
    }
}
