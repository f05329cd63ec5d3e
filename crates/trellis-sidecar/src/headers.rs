//! Header rules: what the sidecar removes, owns and refuses in the messages it forwards.
//!
//! - **Hop-by-hop** fields never cross a proxy (RFC 9110 7.6.1).
//! - **Owned** request headers ([`OWNED_REQUEST_HEADERS`]) are set by the sidecar alone. A
//!   caller's copy is removed in every spelling an app stack could fold into the same name:
//!   CGI (RFC 3875 4.1.18), WSGI, PHP-FPM and others map `-` to `_` and ignore case, so
//!   `x_forwarded_client_cert` and `X-Forwarded-Client-Cert` both become
//!   `HTTP_X_FORWARDED_CLIENT_CERT` next to ours.
//! - **Underscores** in other header names: dropped by default (nginx's and Apache's default,
//!   for the same folding reason), refused or passed on by setting ([`UnderscoreHeaders`]).
//! - **One `Host`.** RFC 9112 3.2: "A server MUST respond with a 400 (Bad Request) status code
//!   to any HTTP/1.1 request message that … contains more than one Host header field line or a
//!   Host header field with an invalid field value." RFC 9113 8.3.1: a `host` that identifies
//!   another entity than `:authority` is malformed. Refused rather than guessed
//!   ([`check_host`]).

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::Version;
use serde::Deserialize;

/// `x-forwarded-client-cert`: the caller's identity, as the inbound sidecar vouches for it.
pub static XFCC: HeaderName = HeaderName::from_static("x-forwarded-client-cert");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");

/// Request headers only the sidecar may set on what reaches the app. Every name here is
/// removed from a caller's request in any spelling that folds to it (see [`folds_to`]) before
/// the sidecar sets its own.
pub const OWNED_REQUEST_HEADERS: [&str; 1] = ["x-forwarded-client-cert"];

/// What the inbound sidecar does with a request header whose name contains `_`
/// (`inbound.headers_with_underscores`). Whatever the setting, an underscore spelling of an
/// owned header never reaches the app.
#[derive(Debug, Default, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum UnderscoreHeaders {
    /// Removed before the request reaches the app, and counted (nginx's default).
    #[default]
    Drop,
    /// The request is answered `400` naming the header.
    Reject,
    /// Passed to the app (for apps that rely on such names and fold nothing).
    Allow,
}

impl UnderscoreHeaders {
    /// The setting's spelling in config files and flags.
    pub fn as_str(self) -> &'static str {
        match self {
            UnderscoreHeaders::Drop => "drop",
            UnderscoreHeaders::Reject => "reject",
            UnderscoreHeaders::Allow => "allow",
        }
    }
}

impl std::str::FromStr for UnderscoreHeaders {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "drop" => Ok(UnderscoreHeaders::Drop),
            "reject" => Ok(UnderscoreHeaders::Reject),
            "allow" => Ok(UnderscoreHeaders::Allow),
            other => Err(format!("`{other}`: use drop (default), reject or allow")),
        }
    }
}

/// True when header `name` is `owned` once every character other than a letter or digit is
/// read as `-` (names are lowercase already: `http` lowercases HTTP/1.1 names, and HTTP/2
/// forbids uppercase). Wider than CGI's `_` ↔ `-` on purpose: no legitimate header is spelled
/// like an owned one with other punctuation.
pub fn folds_to(name: &str, owned: &str) -> bool {
    name.len() == owned.len()
        && name.bytes().zip(owned.bytes()).all(|(n, o)| {
            n == o || (o == b'-' && !n.is_ascii_alphanumeric()) || n.eq_ignore_ascii_case(&o)
        })
}

fn is_owned(name: &str) -> bool {
    OWNED_REQUEST_HEADERS
        .iter()
        .any(|owned| folds_to(name, owned))
}

/// What [`sanitize_for_app`] removed, for the metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Removed {
    /// Fields spelling an owned header (the exact name included).
    pub owned: u32,
    /// Other fields whose names contain `_` (dropped under [`UnderscoreHeaders::Drop`]).
    pub underscore: u32,
}

/// Removes from a caller's request every owned header (any spelling) and, per `underscores`,
/// every other name with `_`. `Err(name)`: `underscores` is [`UnderscoreHeaders::Reject`] and
/// `name` has one; nothing was removed. One pass over the names, no allocation, when there is
/// nothing to remove (the common case).
pub fn sanitize_for_app(
    headers: &mut HeaderMap,
    underscores: UnderscoreHeaders,
) -> Result<Removed, HeaderName> {
    let mut removed = Removed::default();
    for name in headers.keys() {
        let s = name.as_str();
        let underscore = s.as_bytes().contains(&b'_');
        if underscore && underscores == UnderscoreHeaders::Reject {
            return Err(name.clone());
        }
        if is_owned(s) {
            removed.owned += 1;
        } else if underscore && underscores == UnderscoreHeaders::Drop {
            removed.underscore += 1;
        }
    }
    if removed == Removed::default() {
        return Ok(removed);
    }
    let doomed: Vec<HeaderName> = headers
        .keys()
        .filter(|name| {
            let s = name.as_str();
            is_owned(s) || (underscores == UnderscoreHeaders::Drop && s.as_bytes().contains(&b'_'))
        })
        .cloned()
        .collect();
    // `keys()` yields each name once; `remove` takes every value of it.
    for name in doomed {
        headers.remove(name);
    }
    Ok(removed)
}

/// Why a request's `Host` was refused (`400`); [`HostFault::reason`] is the metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostFault {
    /// More than one `Host` field.
    Duplicate,
    /// A `Host` that cannot be a host (and port).
    Invalid,
    /// HTTP/2: `host` names another authority than `:authority`.
    Mismatch,
}

impl HostFault {
    /// The `reason` label of `trellis_requests_refused_total`.
    pub fn reason(self) -> &'static str {
        match self {
            HostFault::Duplicate => "duplicate_host",
            HostFault::Invalid => "invalid_host",
            HostFault::Mismatch => "host_authority_mismatch",
        }
    }

    /// The one-line body of the `400`.
    pub fn message(self) -> &'static str {
        match self {
            HostFault::Duplicate => "request has more than one Host header (RFC 9112 3.2); refused",
            HostFault::Invalid => "request Host is not a valid host[:port] (RFC 9112 3.2); refused",
            HostFault::Mismatch => {
                "request host header disagrees with :authority (RFC 9113 8.3.1); refused"
            }
        }
    }
}

/// Checks that a request names at most one host: one `Host` field with a valid value and, on
/// HTTP/2, a `host` that agrees with `:authority` (compared without case and default port).
/// HTTP/1.1 absolute-form is not checked against `Host`: RFC 9112 3.2.2 says the target's
/// authority wins and `Host` is replaced ([`set_host_from_authority`]).
pub fn check_host(parts: &Parts) -> Result<(), HostFault> {
    let mut hosts = parts.headers.get_all(header::HOST).iter();
    let Some(host) = hosts.next() else {
        return Ok(());
    };
    if hosts.next().is_some() {
        return Err(HostFault::Duplicate);
    }
    if !valid_host(host.as_bytes()) {
        return Err(HostFault::Invalid);
    }
    if parts.version == Version::HTTP_2 {
        if let Some(authority) = parts.uri.authority() {
            let default_port = match parts.uri.scheme_str() {
                Some("https") => "443",
                _ => "80",
            };
            if !same_host(host.as_bytes(), authority.as_str().as_bytes(), default_port) {
                return Err(HostFault::Mismatch);
            }
        }
    }
    Ok(())
}

/// RFC 9112 3.2: `Host = uri-host [ ":" port ]`. Letters, digits, `-._~`, `%`-escapes, the
/// sub-delimiters but `,` (a comma is what two Host fields folded into one look like), and
/// `[`, `]`, `:` for IPv6 literals and the port. No userinfo, path, space or control byte.
fn valid_host(host: &[u8]) -> bool {
    !host.is_empty()
        && host.iter().all(|&b| {
            b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b'-' | b'.'
                        | b'_'
                        | b'~'
                        | b'%'
                        | b'!'
                        | b'$'
                        | b'&'
                        | b'\''
                        | b'('
                        | b')'
                        | b'*'
                        | b'+'
                        | b';'
                        | b'='
                        | b':'
                        | b'['
                        | b']'
                )
        })
}

/// `a` and `b` name the same authority: equal ignoring ASCII case, or equal once one drops an
/// explicit default port (`b:80` is `b` for `http`).
fn same_host(a: &[u8], b: &[u8], default_port: &str) -> bool {
    let without_default = |s: &'_ [u8]| -> usize {
        let suffix_len = default_port.len() + 1;
        if s.len() > suffix_len
            && s[s.len() - suffix_len] == b':'
            && &s[s.len() - default_port.len()..] == default_port.as_bytes()
        {
            s.len() - suffix_len
        } else {
            s.len()
        }
    };
    let (a, b) = (&a[..without_default(a)], &b[..without_default(b)]);
    a.eq_ignore_ascii_case(b)
}

/// Makes the request's authority its only `Host`: for HTTP/2 `:authority` and HTTP/1.1
/// absolute-form (RFC 9112 3.2.2: the proxy "MUST ignore the received Host header field …
/// and instead replace it with the host information of the request-target"). No authority:
/// the `Host` stays as it is.
pub fn set_host_from_authority(parts: &mut Parts) {
    if let Some(authority) = parts.uri.authority() {
        if let Ok(host) = HeaderValue::from_str(authority.as_str()) {
            // `insert` replaces every value the name had.
            parts.headers.insert(header::HOST, host);
        }
    }
}

/// RFC 9110 7.6.1: a proxy "MUST remove any header fields nominated by the Connection header
/// field", and the connection-specific fields (Connection, Proxy-Connection, Keep-Alive, TE,
/// Transfer-Encoding, Upgrade; RFC 9113 8.2.2 lists the same for HTTP/2), plus Trailer and
/// the proxy credentials pair. `TE: trailers` is the one TE value HTTP/2 allows, and gRPC needs
/// it, so it stays.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    name == header::CONNECTION
        || name == header::TE
        || name == header::TRANSFER_ENCODING
        || name == header::UPGRADE
        || name == header::TRAILER
        || name == header::PROXY_AUTHENTICATE
        || name == header::PROXY_AUTHORIZATION
        || name == PROXY_CONNECTION
        || name == KEEP_ALIVE
}

/// Removes hop-by-hop headers in place. Costs one pass over the names when there are none.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    // Names listed in Connection, other than the usual `keep-alive`/`close` (rare, so the
    // allocation is only paid when a client actually nominates headers).
    let mut nominated: Vec<HeaderName> = Vec::new();
    for value in headers.get_all(header::CONNECTION) {
        let Ok(value) = value.to_str() else { continue };
        for token in value.split(',').map(str::trim) {
            if token.is_empty()
                || token.eq_ignore_ascii_case("keep-alive")
                || token.eq_ignore_ascii_case("close")
            {
                continue;
            }
            if let Ok(name) = HeaderName::from_bytes(token.as_bytes()) {
                nominated.push(name);
            }
        }
    }
    for name in nominated {
        headers.remove(name);
    }
    let te_trailers = headers.get_all(header::TE).iter().count() == 1
        && headers
            .get(header::TE)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    for name in [
        &header::CONNECTION,
        &header::TRANSFER_ENCODING,
        &header::UPGRADE,
        &header::TRAILER,
        &header::PROXY_AUTHENTICATE,
        &header::PROXY_AUTHORIZATION,
        &PROXY_CONNECTION,
        &KEEP_ALIVE,
    ] {
        headers.remove(name);
    }
    if !te_trailers {
        headers.remove(header::TE);
    }
}

/// The host part of a `Host` header or authority: port removed, IPv6 brackets kept.
pub fn host_without_port(authority: &str) -> &str {
    if authority.starts_with('[') {
        return match authority.find(']') {
            Some(end) => &authority[..=end],
            None => authority,
        };
    }
    match authority.rfind(':') {
        Some(colon) if authority[colon + 1..].bytes().all(|b| b.is_ascii_digit()) => {
            &authority[..colon]
        }
        _ => authority,
    }
}

/// Fuzzing entry point (`fuzz/fuzz_targets/sidecar_headers.rs`, run on stable by
/// `tests/fuzz_bodies.rs`): arbitrary header fields through the inbound header rules must not
/// panic, and what is left never holds a spelling of an owned header or, under `drop`, a name
/// with `_`. Not API.
#[doc(hidden)]
pub fn fuzz_headers(data: &[u8]) {
    let Some((&mode, mut rest)) = data.split_first() else {
        return;
    };
    let underscores = match mode % 3 {
        0 => UnderscoreHeaders::Drop,
        1 => UnderscoreHeaders::Reject,
        _ => UnderscoreHeaders::Allow,
    };
    let mut request = http::Request::builder().version(if mode & 4 == 0 {
        Version::HTTP_11
    } else {
        Version::HTTP_2
    });
    if mode & 8 != 0 {
        request = request.uri("http://service-b:8080/x");
    }
    let Ok(request) = request.body(()) else {
        return;
    };
    let (mut parts, ()) = request.into_parts();
    // Fields as `name\0value\n` records; invalid names or values are skipped, as hyper and h2
    // would refuse them before the sidecar sees them.
    while !rest.is_empty() {
        let end = rest.iter().position(|&b| b == b'\n').unwrap_or(rest.len());
        let (record, tail) = rest.split_at(end);
        rest = tail.get(1..).unwrap_or_default();
        let Some(split) = record.iter().position(|&b| b == 0) else {
            continue;
        };
        let (name, value) = (&record[..split], &record[split + 1..]);
        if let (Ok(name), Ok(value)) =
            (HeaderName::from_bytes(name), HeaderValue::from_bytes(value))
        {
            parts.headers.append(name, value);
        }
    }
    let _ = check_host(&parts);
    let before = parts.headers.len();
    match sanitize_for_app(&mut parts.headers, underscores) {
        Ok(removed) => {
            for name in parts.headers.keys() {
                assert!(!is_owned(name.as_str()), "{name} reached the app");
                if underscores == UnderscoreHeaders::Drop {
                    assert!(!name.as_str().contains('_'), "{name} reached the app");
                }
            }
            assert!(parts.headers.len() <= before);
            let _ = removed;
        }
        Err(name) => {
            assert_eq!(underscores, UnderscoreHeaders::Reject);
            assert!(name.as_str().contains('_'));
            assert_eq!(parts.headers.len(), before, "a refusal removes nothing");
        }
    }
    set_host_from_authority(&mut parts);
    strip_hop_by_hop(&mut parts.headers);
    assert!(
        parts.headers.get_all(header::HOST).iter().count() <= 1 || parts.uri.authority().is_none()
    );
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use http::Request;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_bytes(v.as_bytes()).unwrap(),
            );
        }
        h
    }

    fn parts(req: http::request::Builder) -> Parts {
        req.body(()).unwrap().into_parts().0
    }

    #[test]
    fn underscore_and_mixed_case_xfcc_are_owned() {
        for spelling in [
            "x-forwarded-client-cert",
            "x_forwarded_client_cert",
            "X_Forwarded-Client_CERT",
            "x.forwarded.client.cert",
            "x-forwarded_client-cert",
        ] {
            let name = HeaderName::from_bytes(spelling.as_bytes()).unwrap();
            assert!(is_owned(name.as_str()), "{spelling}");
        }
        for other in [
            "x-forwarded-client-certs",
            "x-forwarded-for",
            "xforwardedclientcert1",
        ] {
            assert!(!is_owned(other), "{other}");
        }
    }

    #[test]
    fn spoofed_xfcc_is_removed_in_every_mode() {
        for mode in [UnderscoreHeaders::Drop, UnderscoreHeaders::Allow] {
            let mut h = headers(&[
                (
                    "x_forwarded_client_cert",
                    "URI=spiffe://example.org/ns/prod/sa/admin",
                ),
                ("x-forwarded-client-cert", "By=evil"),
                ("x-kept", "1"),
            ]);
            let removed = sanitize_for_app(&mut h, mode).unwrap();
            assert_eq!(removed.owned, 2, "{mode:?}");
            let left: Vec<_> = h.keys().map(HeaderName::as_str).collect();
            assert_eq!(left, ["x-kept"], "{mode:?}");
        }
        let mut h = headers(&[("x_forwarded_client_cert", "URI=evil")]);
        let refused = sanitize_for_app(&mut h, UnderscoreHeaders::Reject).unwrap_err();
        assert_eq!(refused, "x_forwarded_client_cert");
        assert_eq!(h.len(), 1, "a refusal removes nothing");
    }

    #[test]
    fn underscore_headers_follow_the_setting() {
        let fields = [("x_user", "admin"), ("x_user", "again"), ("x-user", "ok")];
        let mut h = headers(&fields);
        let removed = sanitize_for_app(&mut h, UnderscoreHeaders::Drop).unwrap();
        assert_eq!(
            removed,
            Removed {
                owned: 0,
                underscore: 1
            }
        );
        assert!(h.get("x_user").is_none());
        assert_eq!(h["x-user"], "ok");

        let mut h = headers(&fields);
        assert_eq!(
            sanitize_for_app(&mut h, UnderscoreHeaders::Allow).unwrap(),
            Removed::default()
        );
        assert_eq!(h.get_all("x_user").iter().count(), 2);

        let mut h = headers(&fields);
        assert_eq!(
            sanitize_for_app(&mut h, UnderscoreHeaders::Reject).unwrap_err(),
            "x_user"
        );
    }

    #[test]
    fn nothing_to_remove_is_untouched() {
        let mut h = headers(&[("host", "b"), ("content-type", "text/plain")]);
        assert_eq!(
            sanitize_for_app(&mut h, UnderscoreHeaders::Drop).unwrap(),
            Removed::default()
        );
        assert_eq!(h.len(), 2);
    }

    #[test]
    fn underscore_setting_parses() {
        assert_eq!("reject".parse(), Ok(UnderscoreHeaders::Reject));
        let e = "maybe".parse::<UnderscoreHeaders>().unwrap_err();
        assert!(
            e.contains("drop") && e.contains("reject") && e.contains("allow"),
            "{e}"
        );
    }

    #[test]
    fn two_hosts_are_refused() {
        let p = parts(
            Request::builder()
                .uri("/x")
                .header("host", "service-n")
                .header("host", "service-b"),
        );
        assert_eq!(check_host(&p), Err(HostFault::Duplicate));
        // The same twice is still two fields.
        let p = parts(
            Request::builder()
                .uri("/x")
                .header("host", "b")
                .header("host", "b"),
        );
        assert_eq!(check_host(&p), Err(HostFault::Duplicate));
    }

    #[test]
    fn invalid_hosts_are_refused() {
        for bad in ["a, b", "a b", "user@b", "b/x", "b?x", ""] {
            let p = parts(Request::builder().uri("/x").header("host", bad));
            assert_eq!(check_host(&p), Err(HostFault::Invalid), "{bad:?}");
        }
        for good in [
            "b",
            "service-b.prod:8080",
            "[::1]:80",
            "127.0.0.1",
            "xn--caf-dma",
        ] {
            let p = parts(Request::builder().uri("/x").header("host", good));
            assert_eq!(check_host(&p), Ok(()), "{good:?}");
        }
    }

    #[test]
    fn h2_host_must_agree_with_authority() {
        let h2 = |host: &str, uri: &str| {
            check_host(&parts(
                Request::builder()
                    .version(Version::HTTP_2)
                    .uri(uri)
                    .header("host", host),
            ))
        };
        assert_eq!(
            h2("service-n", "http://service-b/x"),
            Err(HostFault::Mismatch)
        );
        assert_eq!(h2("Service-B", "http://service-b/x"), Ok(()));
        assert_eq!(h2("service-b:80", "http://service-b/x"), Ok(()));
        assert_eq!(h2("service-b", "https://service-b:443/x"), Ok(()));
        assert_eq!(
            h2("service-b:8080", "http://service-b/x"),
            Err(HostFault::Mismatch)
        );
        // No :authority: host alone is fine (RFC 9113 8.3.1 allows it).
        assert_eq!(h2("service-b", "/x"), Ok(()));
    }

    #[test]
    fn h1_absolute_form_replaces_host() {
        let mut p = parts(
            Request::builder()
                .uri("http://service-b:8080/x")
                .header("host", "service-n"),
        );
        assert_eq!(check_host(&p), Ok(()), "RFC 9112 3.2.2: the target wins");
        set_host_from_authority(&mut p);
        let hosts: Vec<_> = p.headers.get_all("host").iter().collect();
        assert_eq!(hosts, ["service-b:8080"]);
    }

    #[test]
    fn strips_hop_by_hop_and_nominated_headers() {
        let mut h = headers(&[
            ("connection", "keep-alive, X-Secret"),
            ("x-secret", "1"),
            ("keep-alive", "timeout=5"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("proxy-authorization", "Basic x"),
            ("te", "gzip"),
            ("x-kept", "1"),
            ("content-length", "3"),
        ]);
        strip_hop_by_hop(&mut h);
        let left: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["x-kept", "content-length"]);
    }

    #[test]
    fn keeps_te_trailers() {
        let mut h = headers(&[("te", "trailers"), ("connection", "close")]);
        strip_hop_by_hop(&mut h);
        assert_eq!(h.get("te").unwrap(), "trailers");
        assert!(h.get("connection").is_none());
    }

    #[test]
    fn garbage_connection_tokens_do_not_panic() {
        let mut h = headers(&[("connection", " , ,, bad header name!, caf\u{e9}")]);
        strip_hop_by_hop(&mut h);
        assert!(h.is_empty());
    }

    #[test]
    fn host_port_is_stripped() {
        assert_eq!(host_without_port("billing:15001"), "billing");
        assert_eq!(host_without_port("billing"), "billing");
        assert_eq!(host_without_port("[::1]:80"), "[::1]");
        assert_eq!(host_without_port("[::1"), "[::1");
        assert_eq!(host_without_port("a:b"), "a:b");
        assert_eq!(host_without_port(""), "");
        assert_eq!(host_without_port(":"), "");
    }

    #[test]
    fn fuzz_entry_survives_samples() {
        fuzz_headers(b"\x00x_forwarded_client_cert\x00URI=evil\nhost\x00a\nhost\x00b\n");
        fuzz_headers(b"\x0cX-Forwarded-Client-Cert\x00v\nx_a\x00b\n\n\x00\n");
        fuzz_headers(b"\x01x_a\x00b");
        fuzz_headers(b"");
    }
}
