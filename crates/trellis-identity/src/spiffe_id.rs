//! SPIFFE IDs and trust domains (SPIFFE-ID spec, section 2).

use std::fmt;
use std::str::FromStr;

use crate::IdError;

/// A validated SPIFFE ID: `spiffe://<trust-domain>/<path>`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    full: String,
    td_len: usize,
}

impl SpiffeId {
    /// Parses and validates a SPIFFE ID (lowercase trust domain, no port/userinfo/query/fragment,
    /// path segments not empty, `.` or `..`, characters `[A-Za-z0-9._-]`).
    pub fn parse(input: &str) -> Result<Self, IdError> {
        // SPIFFE-ID 2.3: "SPIFFE implementations MUST support SPIFFE URIs up to 2048 bytes in
        // length and SHOULD NOT generate URIs of length greater than 2048 bytes."
        if input.len() > MAX_ID_LEN {
            return Err(invalid(input, "longer than 2048 bytes"));
        }
        let rest = strip_scheme(input)?;
        // SPIFFE-ID 2: "Valid SPIFFE IDs ... MUST NOT include a query or fragment component."
        if rest.contains('?') {
            return Err(invalid(input, "a query (`?`) is not allowed"));
        }
        if rest.contains('#') {
            return Err(invalid(input, "a fragment (`#`) is not allowed"));
        }
        let (td, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        check_trust_domain(input, td)?;
        check_path(input, path)?;
        Ok(SpiffeId {
            full: input.to_owned(),
            td_len: SCHEME.len() + td.len(),
        })
    }

    /// `spiffe://<td>/<path>` for a trust domain and a path that starts with `/`.
    pub fn from_parts(td: &TrustDomain, path: &str) -> Result<Self, IdError> {
        let full = format!("spiffe://{}{}", td.as_str(), path);
        // Without the leading `/` the path would silently become part of the trust domain.
        if !path.is_empty() && !path.starts_with('/') {
            return Err(invalid(&full, "the path must start with `/`"));
        }
        Self::parse(&full)
    }

    /// The whole ID as a string.
    pub fn as_str(&self) -> &str {
        &self.full
    }

    /// The trust domain name, e.g. `example.org`.
    pub fn trust_domain_name(&self) -> &str {
        &self.full["spiffe://".len()..self.td_len]
    }

    /// The path, e.g. `/ns/prod/sa/web` (empty for a trust-domain ID).
    pub fn path(&self) -> &str {
        &self.full[self.td_len..]
    }

    /// True if the ID is in `td`.
    pub fn is_member_of(&self, td: &TrustDomain) -> bool {
        self.trust_domain_name() == td.as_str()
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.full)
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpiffeId({})", self.full)
    }
}

impl FromStr for SpiffeId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// A validated trust domain name, e.g. `example.org`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(String);

impl TrustDomain {
    /// Accepts `example.org` or `spiffe://example.org`.
    pub fn parse(input: &str) -> Result<Self, IdError> {
        let name = if input.contains("://") {
            let rest = strip_scheme(input)?;
            if rest.contains('/') || rest.contains('?') || rest.contains('#') {
                return Err(invalid(
                    input,
                    "a trust domain is `example.org` or `spiffe://example.org`, without path, query or fragment",
                ));
            }
            rest
        } else {
            input
        };
        check_trust_domain(input, name)?;
        Ok(TrustDomain(name.to_owned()))
    }

    /// The bare name, e.g. `example.org`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The trust domain's own SPIFFE ID, `spiffe://example.org`.
    pub fn id(&self) -> SpiffeId {
        SpiffeId {
            full: format!("spiffe://{}", self.0),
            td_len: "spiffe://".len() + self.0.len(),
        }
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TrustDomain({})", self.0)
    }
}

impl FromStr for TrustDomain {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

const SCHEME: &str = "spiffe://";
const MAX_ID_LEN: usize = 2048;
const MAX_TRUST_DOMAIN_LEN: usize = 255;

/// The error for `input`, which breaks `reason`. The input is shortened and its control
/// characters escaped so that a hostile ID cannot flood or forge log lines.
fn invalid(input: &str, reason: &str) -> IdError {
    const SHOWN: usize = 256;
    let mut shown = String::with_capacity(input.len().min(SHOWN) + 3);
    for (i, c) in input.chars().enumerate() {
        if i == SHOWN {
            shown.push('…');
            break;
        }
        if c.is_control() {
            shown.extend(c.escape_default());
        } else {
            shown.push(c);
        }
    }
    IdError::Invalid {
        input: shown,
        reason: reason.to_owned(),
    }
}

/// The part after `spiffe://`.
fn strip_scheme(input: &str) -> Result<&str, IdError> {
    // SPIFFE-ID 2: "Valid SPIFFE IDs MUST have the scheme set to `spiffe`". Trellis also
    // requires it in lowercase, so that one identity has exactly one spelling.
    if let Some(rest) = input.strip_prefix(SCHEME) {
        return Ok(rest);
    }
    let looks_like_spiffe = input
        .get(..SCHEME.len())
        .is_some_and(|p| p.eq_ignore_ascii_case(SCHEME));
    Err(invalid(
        input,
        if looks_like_spiffe {
            "the scheme must be written `spiffe://` in lowercase"
        } else {
            "the scheme must be `spiffe://`"
        },
    ))
}

/// SPIFFE-ID 2.1 rules for the authority part. `input` is only for the error message.
fn check_trust_domain(input: &str, td: &str) -> Result<(), IdError> {
    // SPIFFE-ID 2.1: "The `host` part of the authority MUST NOT be empty."
    if td.is_empty() {
        return Err(invalid(input, "the trust domain is empty"));
    }
    // SPIFFE-ID 2.3: "a maximum length of a trust domain name is 255 bytes."
    if td.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(invalid(input, "the trust domain is longer than 255 bytes"));
    }
    // SPIFFE-ID 2.1: "The `userinfo` and `port` parts of the authority component MUST be empty."
    if td.contains('@') {
        return Err(invalid(
            input,
            "userinfo (`user@`) is not allowed in the trust domain",
        ));
    }
    if td.contains(':') {
        return Err(invalid(
            input,
            "a port (`:`) is not allowed in the trust domain",
        ));
    }
    // SPIFFE-ID 2.1: "The `host` part of the authority MUST NOT contain percent-encoded characters."
    if td.contains('%') {
        return Err(invalid(
            input,
            "percent-encoded characters are not allowed in the trust domain",
        ));
    }
    // SPIFFE-ID 2.1: "The `host` part of the authority MUST be lowercase." and "MUST contain only
    // letters, numbers, dots, dashes, and underscores ([a-z0-9.-_])."
    if td.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(invalid(input, "the trust domain must be lowercase"));
    }
    if !td.bytes().all(is_trust_domain_byte) {
        return Err(invalid(
            input,
            "the trust domain may only contain [a-z0-9._-]",
        ));
    }
    Ok(())
}

fn is_trust_domain_byte(b: u8) -> bool {
    matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'-')
}

/// SPIFFE-ID 2.2 rules for the path (empty, or starting with `/`).
fn check_path(input: &str, path: &str) -> Result<(), IdError> {
    if path.is_empty() {
        return Ok(());
    }
    // The path comes from splitting at the first `/`, so the first piece is always empty.
    let mut segments = path.split('/').skip(1).peekable();
    while let Some(segment) = segments.next() {
        // SPIFFE-ID 2.2: "The path component MUST NOT include a trailing `/`." and "MUST NOT
        // include segments that are empty or are relative path modifiers (i.e. `.`, `..`)".
        if segment.is_empty() {
            return Err(invalid(
                input,
                if segments.peek().is_none() {
                    "the path must not end with `/`"
                } else {
                    "the path must not contain empty segments (`//`)"
                },
            ));
        }
        if segment == "." || segment == ".." {
            return Err(invalid(
                input,
                "the path must not contain `.` or `..` segments",
            ));
        }
        // SPIFFE-ID 2.2: "The path component MUST NOT include percent-encoded characters."
        if segment.contains('%') {
            return Err(invalid(
                input,
                "percent-encoded characters are not allowed in the path",
            ));
        }
        // SPIFFE-ID 2.2: "Individual path segments MUST contain only letters, numbers, dots,
        // dashes, and underscores ([a-zA-Z0-9.-_])."
        if !segment.bytes().all(is_path_byte) {
            return Err(invalid(
                input,
                "path segments may only contain [A-Za-z0-9._-]",
            ));
        }
    }
    Ok(())
}

fn is_path_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reason(input: &str) -> String {
        match SpiffeId::parse(input) {
            Err(IdError::Invalid { reason, .. }) => reason,
            other => panic!("`{input}` should be rejected, got {other:?}"),
        }
    }

    #[test]
    fn accepts_kubernetes_style_id() {
        let id = SpiffeId::parse("spiffe://example.org/ns/prod/sa/web").unwrap();
        assert_eq!(id.as_str(), "spiffe://example.org/ns/prod/sa/web");
        assert_eq!(id.trust_domain_name(), "example.org");
        assert_eq!(id.path(), "/ns/prod/sa/web");
        assert!(id.is_member_of(&TrustDomain::parse("example.org").unwrap()));
        assert!(!id.is_member_of(&TrustDomain::parse("example.com").unwrap()));
    }

    #[test]
    fn accepts_every_allowed_character() {
        let id = SpiffeId::parse("spiffe://a-b_c.0.9z/A-Z_a.z-0/9..x/.hidden/x..").unwrap();
        assert_eq!(id.trust_domain_name(), "a-b_c.0.9z");
        assert_eq!(id.path(), "/A-Z_a.z-0/9..x/.hidden/x..");
    }

    #[test]
    fn accepts_trust_domain_id_without_path() {
        let id = SpiffeId::parse("spiffe://example.org").unwrap();
        assert_eq!(id.trust_domain_name(), "example.org");
        assert_eq!(id.path(), "");
        assert_eq!(id, TrustDomain::parse("example.org").unwrap().id());
    }

    #[test]
    fn rejects_id_with_uppercase_trust_domain() {
        assert!(reason("spiffe://Example.org/web").contains("lowercase"));
    }

    #[test]
    fn rejects_uppercase_scheme() {
        assert!(reason("SPIFFE://example.org/web").contains("lowercase"));
    }

    #[test]
    fn rejects_other_scheme() {
        assert!(reason("https://example.org/web").contains("spiffe://"));
        assert!(reason("spiffe:/example.org/web").contains("spiffe://"));
        assert!(reason("example.org/web").contains("spiffe://"));
    }

    #[test]
    fn rejects_empty_input() {
        assert!(reason("").contains("spiffe://"));
    }

    #[test]
    fn rejects_empty_trust_domain() {
        assert!(reason("spiffe://").contains("empty"));
        assert!(reason("spiffe:///web").contains("empty"));
    }

    #[test]
    fn rejects_port() {
        assert!(reason("spiffe://example.org:8443/web").contains("port"));
    }

    #[test]
    fn rejects_userinfo() {
        assert!(reason("spiffe://admin@example.org/web").contains("userinfo"));
    }

    #[test]
    fn rejects_percent_encoded_trust_domain() {
        assert!(reason("spiffe://exa%6Dple.org/web").contains("percent"));
    }

    #[test]
    fn rejects_bad_trust_domain_character() {
        assert!(reason("spiffe://exa+mple.org/web").contains("[a-z0-9._-]"));
    }

    #[test]
    fn rejects_trust_domain_longer_than_255_bytes() {
        let td = "a".repeat(256);
        assert!(reason(&format!("spiffe://{td}/web")).contains("255"));
        assert!(SpiffeId::parse(&format!("spiffe://{}/web", "a".repeat(255))).is_ok());
    }

    #[test]
    fn rejects_dot_segment() {
        assert!(reason("spiffe://example.org/ns/./web").contains("`.`"));
        assert!(reason("spiffe://example.org/ns/../admin").contains("`..`"));
        assert!(reason("spiffe://example.org/..").contains("`..`"));
    }

    #[test]
    fn rejects_empty_segment() {
        assert!(reason("spiffe://example.org/ns//web").contains("empty segments"));
    }

    #[test]
    fn rejects_trailing_slash() {
        assert!(reason("spiffe://example.org/web/").contains("end with `/`"));
        assert!(reason("spiffe://example.org/").contains("end with `/`"));
    }

    #[test]
    fn rejects_query() {
        assert!(reason("spiffe://example.org/web?admin=1").contains("query"));
        assert!(reason("spiffe://example.org?x").contains("query"));
    }

    #[test]
    fn rejects_fragment() {
        assert!(reason("spiffe://example.org/web#admin").contains("fragment"));
    }

    #[test]
    fn rejects_percent_encoded_path() {
        assert!(reason("spiffe://example.org/a%2Fb").contains("percent"));
    }

    #[test]
    fn rejects_bad_path_character() {
        assert!(reason("spiffe://example.org/we b").contains("[A-Za-z0-9._-]"));
        assert!(reason("spiffe://example.org/wéb").contains("[A-Za-z0-9._-]"));
        assert!(reason("spiffe://example.org/a:b").contains("[A-Za-z0-9._-]"));
    }

    #[test]
    fn rejects_id_longer_than_2048_bytes() {
        let prefix = "spiffe://example.org/";
        let longest = format!("{prefix}{}", "a".repeat(2048 - prefix.len()));
        assert_eq!(longest.len(), 2048);
        assert!(SpiffeId::parse(&longest).is_ok());
        assert!(reason(&format!("{longest}a")).contains("2048"));
    }

    #[test]
    fn error_names_input_and_escapes_control_characters() {
        let err = SpiffeId::parse("spiffe://example.org/a\nb").unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.starts_with("invalid SPIFFE ID `spiffe://example.org/a\\nb`"),
            "{msg}"
        );
        assert!(!msg.contains('\n'));
    }

    #[test]
    fn error_truncates_huge_input() {
        let err =
            SpiffeId::parse(&format!("spiffe://example.org/{}", "a".repeat(5000))).unwrap_err();
        assert!(err.to_string().len() < 400);
    }

    #[test]
    fn trust_domain_accepts_bare_and_spiffe_forms() {
        let bare = TrustDomain::parse("example.org").unwrap();
        let uri = TrustDomain::parse("spiffe://example.org").unwrap();
        assert_eq!(bare, uri);
        assert_eq!(bare.as_str(), "example.org");
        assert_eq!(bare.id().as_str(), "spiffe://example.org");
        assert_eq!("example.org".parse::<TrustDomain>().unwrap(), bare);
    }

    #[test]
    fn rejects_trust_domain_with_path() {
        assert!(TrustDomain::parse("spiffe://example.org/web").is_err());
        assert!(TrustDomain::parse("spiffe://example.org/").is_err());
        assert!(TrustDomain::parse("example.org/web").is_err());
    }

    #[test]
    fn rejects_bad_trust_domains() {
        for bad in [
            "",
            "Example.org",
            "example.org:443",
            "user@example.org",
            "spiffe://",
            "http://example.org",
            "spiffe://Example.org",
            "exa mple.org",
        ] {
            assert!(
                TrustDomain::parse(bad).is_err(),
                "`{bad}` should be rejected"
            );
        }
    }

    #[test]
    fn from_parts_builds_and_validates() {
        let td = TrustDomain::parse("example.org").unwrap();
        let id = SpiffeId::from_parts(&td, "/ns/prod/sa/web").unwrap();
        assert_eq!(id.as_str(), "spiffe://example.org/ns/prod/sa/web");
        assert_eq!(SpiffeId::from_parts(&td, "").unwrap(), td.id());
        assert!(SpiffeId::from_parts(&td, "/ns/../admin").is_err());
    }

    #[test]
    fn from_parts_requires_leading_slash() {
        let td = TrustDomain::parse("example.org").unwrap();
        // Without the check this would be `spiffe://example.orgevil.com/x`, another domain.
        assert!(SpiffeId::from_parts(&td, "evil.com/x").is_err());
    }

    #[test]
    fn display_and_from_str_round_trip() {
        let id: SpiffeId = "spiffe://example.org/web".parse().unwrap();
        assert_eq!(id.to_string(), "spiffe://example.org/web");
        assert_eq!(format!("{id:?}"), "SpiffeId(spiffe://example.org/web)");
    }
}
