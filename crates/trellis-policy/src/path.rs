//! Request path normalization: one spelling per path, so that no other spelling of a
//! path slips past a rule, and the app receives exactly the path that was authorized.
//!
//! The rules (also in the crate docs):
//!
//! 1. The input is the request-target's path: it must start with `/`; a raw `?` or `#`
//!    is refused (the caller splits the query off first).
//! 2. Percent-escapes must be `%` + two hex digits. Escapes of unreserved characters
//!    (RFC 3986 §2.3: `A-Z a-z 0-9 - . _ ~`) are decoded (`%41` → `A`, `%2e` → `.`);
//!    every other escape is kept, with its hex in uppercase (`%c3%a9` → `%C3%A9`). A path
//!    is decoded once: `%252e` stays `%252e`.
//! 3. Refused: `%2F` (encoded slash), `\` and `%5C` (backslash), NUL and every other
//!    control character raw or encoded (`%00`–`%1F`, `%7F`), and a raw space.
//! 4. Characters that may not appear raw in a path (`"`, `<`, `>`, `[`, `]`, `^`, `` ` ``,
//!    `{`, `|`, `}` and non-ASCII) are percent-encoded (UTF-8 bytes, uppercase hex), so
//!    `/café` and `/caf%C3%A9` are one path. The output is always ASCII.
//! 5. Repeated slashes collapse (`//` → `/`).
//! 6. `.` segments are removed and `..` removes the segment before it, after decoding
//!    (so `/%2e%2e/` is `..`). A `..` that would climb above `/` is refused, not clamped.
//!    A path ending in `.` or `..` ends with `/` (RFC 3986 §5.2.4: `/a/b/..` → `/a/`).
//! 7. Case is kept: paths are case-sensitive (`/ADMIN` is not `/admin`).
//! 8. A trailing slash is kept in the output; matching ignores it (see the crate docs).

use std::borrow::Cow;
use std::fmt;

use crate::error::PathError;

/// A request path in normal form, the only thing policy evaluation accepts.
///
/// Made only by [`normalize_path`]. Borrows the input when it was already normal (the
/// common case: no allocation), owns a rewritten copy otherwise. Forward
/// [`as_str`](Self::as_str) to the app so that the app and the policy agree on the path.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NormalizedPath<'a>(Cow<'a, str>);

impl<'a> NormalizedPath<'a> {
    /// The normalized path (ASCII, starts with `/`).
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// True when the input was already normal and is borrowed as is (nothing allocated).
    pub fn is_borrowed(&self) -> bool {
        matches!(self.0, Cow::Borrowed(_))
    }

    /// The same path, owning its text.
    pub fn into_owned(self) -> NormalizedPath<'static> {
        NormalizedPath(Cow::Owned(self.0.into_owned()))
    }

    /// The path as an owned `String`.
    pub fn into_string(self) -> String {
        self.0.into_owned()
    }

    /// The segments to match, joined by `/`: no leading slash, no trailing slash;
    /// `""` for the root. Normal form guarantees no empty segment inside.
    pub(crate) fn match_view(&self) -> &str {
        match_view(&self.0)
    }
}

/// [`NormalizedPath::match_view`] for a string already in normal form.
pub(crate) fn match_view(normal: &str) -> &str {
    let s = normal.strip_prefix('/').unwrap_or(normal);
    s.strip_suffix('/').unwrap_or(s)
}

impl fmt::Display for NormalizedPath<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for NormalizedPath<'_> {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl PartialEq<str> for NormalizedPath<'_> {
    fn eq(&self, other: &str) -> bool {
        *self.0 == *other
    }
}

impl PartialEq<&str> for NormalizedPath<'_> {
    fn eq(&self, other: &&str) -> bool {
        *self.0 == **other
    }
}

/// What a byte does when it appears raw in a path.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Raw {
    /// Kept as is: unreserved, sub-delims, `:`, `@`.
    Keep,
    /// `/`
    Slash,
    /// `%`: an escape starts.
    Percent,
    /// Not allowed raw in a path, percent-encoded on output.
    Encode,
    /// Refused.
    Reject(PathError),
}

fn classify_raw(b: u8) -> Raw {
    match b {
        b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => Raw::Keep,
        b'!' | b'$' | b'&' | b'\'' | b'(' | b')' | b'*' | b'+' | b',' | b';' | b'=' => Raw::Keep,
        b':' | b'@' => Raw::Keep,
        b'/' => Raw::Slash,
        b'%' => Raw::Percent,
        b'\\' => Raw::Reject(PathError::Backslash),
        b'?' | b'#' => Raw::Reject(PathError::QueryOrFragment),
        0x00..=0x20 | 0x7F => Raw::Reject(PathError::ControlCharacter),
        _ => Raw::Encode,
    }
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'A'..=b'F' => Some(b - b'A' + 10),
        b'a'..=b'f' => Some(b - b'a' + 10),
        _ => None,
    }
}

const HEX_UPPER: &[u8; 16] = b"0123456789ABCDEF";

/// What an escape `%XY` does, given its decoded byte.
enum Escape {
    /// Decode to this unreserved byte.
    Decode(u8),
    /// Keep encoded (in uppercase hex).
    Keep(u8),
}

fn classify_escape(v: u8) -> Result<Escape, PathError> {
    match v {
        b'/' => Err(PathError::EncodedSlash),
        b'\\' => Err(PathError::Backslash),
        0x00..=0x1F | 0x7F => Err(PathError::ControlCharacter),
        _ if is_unreserved(v) => Ok(Escape::Decode(v)),
        _ => Ok(Escape::Keep(v)),
    }
}

/// Reads the escape at `bytes[i]` (which is `%`): the decoded byte and whether its hex
/// was written in uppercase.
fn read_escape(bytes: &[u8], i: usize) -> Result<(u8, bool), PathError> {
    let (Some(&h), Some(&l)) = (bytes.get(i + 1), bytes.get(i + 2)) else {
        return Err(PathError::BadEscape);
    };
    let (Some(hv), Some(lv)) = (hex_val(h), hex_val(l)) else {
        return Err(PathError::BadEscape);
    };
    let upper = !h.is_ascii_lowercase() && !l.is_ascii_lowercase();
    Ok((hv << 4 | lv, upper))
}

/// Normalizes a request path (the request-target without its query) into the one
/// spelling that policy matches and the app receives.
///
/// See the module rules: unreserved escapes decoded, other escapes uppercased, encoded
/// slashes, backslashes and control characters refused, `//` collapsed, `.`/`..`
/// resolved (never above `/`), case kept. Returns the input borrowed when it is already
/// normal, so the usual request costs no allocation.
///
/// ```
/// use trellis_policy::normalize_path;
/// assert_eq!(normalize_path("/a//b/./c/../%7Ex").unwrap().as_str(), "/a/b/~x");
/// assert!(normalize_path("/a/%2F/b").is_err());
/// assert!(normalize_path("/api/v1/items").unwrap().is_borrowed());
/// ```
pub fn normalize_path(raw: &str) -> Result<NormalizedPath<'_>, PathError> {
    if !raw.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    if is_normal(raw)? {
        return Ok(NormalizedPath(Cow::Borrowed(raw)));
    }
    rewrite(raw).map(|s| NormalizedPath(Cow::Owned(s)))
}

/// Scans `raw` (which starts with `/`). `Ok(true)`: already normal, nothing to rewrite.
/// `Ok(false)`: needs a rewrite (which may still fail, e.g. `..` above the root).
/// `Err`: a byte or escape that the rewrite would refuse anyway.
fn is_normal(raw: &str) -> Result<bool, PathError> {
    let bytes = raw.as_bytes();
    let mut normal = true;
    // Start of the current segment (just after its `/`).
    let mut seg_start = 1;
    let mut i = 1;
    while i <= bytes.len() {
        let b = bytes.get(i).copied();
        match b {
            None | Some(b'/') => {
                let seg = &bytes[seg_start..i];
                if seg == b"." || seg == b".." {
                    normal = false;
                }
                // An empty segment is only normal as the very last one (a trailing slash,
                // or the root itself).
                if seg.is_empty() && b.is_some() {
                    normal = false;
                }
                seg_start = i + 1;
                i += 1;
            }
            Some(b) => match classify_raw(b) {
                Raw::Keep => i += 1,
                // Matched by the arm above; kept for exhaustiveness.
                Raw::Slash => i += 1,
                Raw::Encode => {
                    normal = false;
                    i += 1;
                }
                Raw::Reject(e) => return Err(e),
                Raw::Percent => {
                    let (v, upper) = read_escape(bytes, i)?;
                    match classify_escape(v)? {
                        Escape::Decode(_) => normal = false,
                        Escape::Keep(_) => normal &= upper,
                    }
                    i += 3;
                }
            },
        }
    }
    Ok(normal)
}

/// The full rewrite: decode, classify segments, resolve dots, re-join.
fn rewrite(raw: &str) -> Result<String, PathError> {
    let body = &raw[1..];
    let mut out = String::with_capacity(raw.len() + 8);
    // Where each kept segment starts in `out` (the index of its leading `/`).
    let mut starts: Vec<usize> = Vec::new();
    let mut seg = String::new();
    let mut parts = body.split('/').peekable();
    let mut trailing = false;
    while let Some(part) = parts.next() {
        let last = parts.peek().is_none();
        decode_segment(part, &mut seg)?;
        trailing = false;
        match seg.as_str() {
            "" => {
                // `//` collapses; an empty last part is a trailing slash.
                trailing = last;
            }
            "." => trailing = last,
            ".." => {
                let start = starts.pop().ok_or(PathError::AboveRoot)?;
                out.truncate(start);
                trailing = last;
            }
            s => {
                starts.push(out.len());
                out.push('/');
                out.push_str(s);
            }
        }
    }
    if out.is_empty() || trailing {
        out.push('/');
    }
    Ok(out)
}

/// Decodes one segment into `out` (cleared first): unreserved escapes decoded, other
/// escapes kept in uppercase, raw bytes that need it encoded.
fn decode_segment(part: &str, out: &mut String) -> Result<(), PathError> {
    out.clear();
    let bytes = part.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match classify_raw(b) {
            Raw::Keep => {
                out.push(char::from(b));
                i += 1;
            }
            // `part` comes from splitting on `/`.
            Raw::Slash => i += 1,
            Raw::Encode => {
                push_escape(out, b);
                i += 1;
            }
            Raw::Reject(e) => return Err(e),
            Raw::Percent => {
                let (v, _) = read_escape(bytes, i)?;
                match classify_escape(v)? {
                    Escape::Decode(c) => out.push(char::from(c)),
                    Escape::Keep(c) => push_escape(out, c),
                }
                i += 3;
            }
        }
    }
    Ok(())
}

fn push_escape(out: &mut String, b: u8) {
    out.push('%');
    out.push(char::from(HEX_UPPER[usize::from(b >> 4)]));
    out.push(char::from(HEX_UPPER[usize::from(b & 0x0F)]));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(s: &str) -> String {
        normalize_path(s).unwrap().into_string()
    }

    #[test]
    fn already_normal_path_is_borrowed() {
        for p in [
            "/",
            "/a",
            "/a/",
            "/api/v1/items/42",
            "/a/%C3%A9",
            "/a:b@c;d=e",
        ] {
            let n = normalize_path(p).unwrap();
            assert!(n.is_borrowed(), "{p}");
            assert_eq!(n, p);
        }
    }

    #[test]
    fn relative_path_is_rejected() {
        assert_eq!(normalize_path(""), Err(PathError::NotAbsolute));
        assert_eq!(normalize_path("a/b"), Err(PathError::NotAbsolute));
        assert_eq!(normalize_path("*"), Err(PathError::NotAbsolute));
        assert_eq!(
            normalize_path("http://host/admin"),
            Err(PathError::NotAbsolute)
        );
    }

    #[test]
    fn encoded_slash_is_rejected() {
        assert_eq!(normalize_path("/a%2Fb"), Err(PathError::EncodedSlash));
        assert_eq!(normalize_path("/a%2fb"), Err(PathError::EncodedSlash));
        assert_eq!(
            normalize_path("/admin%2F..%2Fpublic"),
            Err(PathError::EncodedSlash)
        );
    }

    #[test]
    fn backslash_is_rejected_raw_and_encoded() {
        assert_eq!(normalize_path("/a\\b"), Err(PathError::Backslash));
        assert_eq!(normalize_path("/a%5Cb"), Err(PathError::Backslash));
        assert_eq!(normalize_path("/a%5cb"), Err(PathError::Backslash));
        assert_eq!(normalize_path("/..\\admin"), Err(PathError::Backslash));
    }

    #[test]
    fn nul_is_rejected_raw_and_encoded() {
        assert_eq!(normalize_path("/a%00b"), Err(PathError::ControlCharacter));
        assert_eq!(normalize_path("/a\0b"), Err(PathError::ControlCharacter));
    }

    #[test]
    fn control_characters_are_rejected_raw_and_encoded() {
        assert_eq!(
            normalize_path("/a%0D%0Ab"),
            Err(PathError::ControlCharacter)
        );
        assert_eq!(normalize_path("/a\nb"), Err(PathError::ControlCharacter));
        assert_eq!(normalize_path("/a\tb"), Err(PathError::ControlCharacter));
        assert_eq!(normalize_path("/a%7F"), Err(PathError::ControlCharacter));
        assert_eq!(normalize_path("/a\x7F"), Err(PathError::ControlCharacter));
    }

    #[test]
    fn raw_space_is_rejected_but_encoded_space_is_kept() {
        assert_eq!(normalize_path("/a b"), Err(PathError::ControlCharacter));
        assert_eq!(norm("/a%20b"), "/a%20b");
    }

    #[test]
    fn query_or_fragment_is_rejected() {
        assert_eq!(
            normalize_path("/public?x=/admin"),
            Err(PathError::QueryOrFragment)
        );
        assert_eq!(normalize_path("/a#frag"), Err(PathError::QueryOrFragment));
        // Encoded, they are ordinary characters of a segment.
        assert_eq!(norm("/a%3Fb%23c"), "/a%3Fb%23c");
    }

    #[test]
    fn malformed_escapes_are_rejected() {
        for p in ["/a%", "/a%4", "/a%G1", "/a%4g", "/%%41"] {
            assert_eq!(normalize_path(p), Err(PathError::BadEscape), "{p}");
        }
    }

    #[test]
    fn unreserved_escapes_are_decoded() {
        assert_eq!(norm("/%41dmin"), "/Admin");
        assert_eq!(norm("/%61dmin"), "/admin");
        assert_eq!(norm("/%7Euser"), "/~user");
        assert_eq!(norm("/a%2Db%5Fc%2E"), "/a-b_c.");
    }

    #[test]
    fn reserved_escapes_are_kept_with_uppercase_hex() {
        assert_eq!(norm("/a%3bb"), "/a%3Bb");
        assert_eq!(norm("/caf%c3%a9"), "/caf%C3%A9");
        assert_eq!(norm("/a%40b"), "/a%40b");
    }

    #[test]
    fn double_encoding_is_decoded_once() {
        assert_eq!(norm("/%252e%252e/admin"), "/%252e%252e/admin");
        assert_eq!(norm("/%25"), "/%25");
    }

    #[test]
    fn non_ascii_is_percent_encoded() {
        assert_eq!(norm("/café"), "/caf%C3%A9");
        assert_eq!(norm("/café"), norm("/caf%c3%a9"));
    }

    #[test]
    fn characters_not_allowed_raw_are_percent_encoded() {
        assert_eq!(norm("/a{b}"), "/a%7Bb%7D");
        assert_eq!(norm("/\"<>[]^`|"), "/%22%3C%3E%5B%5D%5E%60%7C");
    }

    #[test]
    fn repeated_slashes_collapse() {
        assert_eq!(norm("//admin"), "/admin");
        assert_eq!(norm("/a///b"), "/a/b");
        assert_eq!(norm("/a//"), "/a/");
        assert_eq!(norm("//"), "/");
    }

    #[test]
    fn dot_segments_are_resolved() {
        assert_eq!(norm("/a/./b"), "/a/b");
        assert_eq!(norm("/a/b/../c"), "/a/c");
        assert_eq!(norm("/a/b/.."), "/a/");
        assert_eq!(norm("/a/."), "/a/");
        assert_eq!(norm("/./"), "/");
        assert_eq!(norm("/a/.."), "/");
        assert_eq!(norm("/public/../admin"), "/admin");
    }

    #[test]
    fn dot_dot_cannot_climb_above_root() {
        assert_eq!(normalize_path("/.."), Err(PathError::AboveRoot));
        assert_eq!(normalize_path("/../admin"), Err(PathError::AboveRoot));
        assert_eq!(normalize_path("/a/../../admin"), Err(PathError::AboveRoot));
    }

    #[test]
    fn encoded_dots_resolve_like_dots() {
        assert_eq!(normalize_path("/%2e%2e/admin"), Err(PathError::AboveRoot));
        assert_eq!(norm("/public/%2e%2e/admin"), "/admin");
        assert_eq!(norm("/public/.%2E/admin"), "/admin");
        assert_eq!(norm("/a/%2e/b"), "/a/b");
    }

    #[test]
    fn three_dots_are_an_ordinary_segment() {
        assert_eq!(norm("/a/.../b"), "/a/.../b");
        assert_eq!(norm("/a/.x"), "/a/.x");
    }

    #[test]
    fn case_is_kept() {
        assert_eq!(norm("/ADMIN"), "/ADMIN");
        assert_ne!(norm("/ADMIN"), norm("/admin"));
    }

    #[test]
    fn trailing_slash_is_kept() {
        assert_eq!(norm("/a/"), "/a/");
        assert_eq!(norm("/a"), "/a");
    }

    #[test]
    fn match_view_drops_leading_and_trailing_slash() {
        assert_eq!(normalize_path("/").unwrap().match_view(), "");
        assert_eq!(normalize_path("/a/b/").unwrap().match_view(), "a/b");
        assert_eq!(normalize_path("/a/b").unwrap().match_view(), "a/b");
    }

    #[test]
    fn normalization_is_idempotent_on_examples() {
        for p in [
            "/a//b/./c/../d/",
            "/%2e/%7e/%c3%a9",
            "/café/{x}",
            "/a/b/..",
            "//",
        ] {
            let once = norm(p);
            let twice = normalize_path(&once).unwrap();
            assert!(twice.is_borrowed(), "{p} -> {once}");
            assert_eq!(twice, once.as_str());
        }
    }
}
