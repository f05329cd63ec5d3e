//! gRPC awareness: a gRPC client reads `grpc-status`, not the HTTP status, so every error the
//! sidecar writes itself for a gRPC request (`content-type: application/grpc*` over HTTP/2)
//! becomes a gRPC "trailers-only" response (HTTP 200, `grpc-status`, `grpc-message`), and the
//! caller's `grpc-timeout` bounds how long the sidecar waits for the answer.
//!
//! Mapping (gRPC status codes, `grpc/doc/statuscodes.md`): policy deny `403` → 7
//! PERMISSION_DENIED; refused path or head `400`/`414`/`431` → 3 INVALID_ARGUMENT; no
//! upstream, peer unreachable, app down `404`/`502`/`503` → 14 UNAVAILABLE; sidecar timeout
//! `504` → 4 DEADLINE_EXCEEDED; `413` → 8 RESOURCE_EXHAUSTED; anything else → 2 UNKNOWN.

use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Response, StatusCode, Version};

use crate::body::ProxyBody;

/// True for a gRPC request: HTTP/2 and `content-type: application/grpc` (or `+proto`, …).
pub fn is_grpc(version: Version, headers: &HeaderMap) -> bool {
    version == Version::HTTP_2
        && headers
            .get(header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// The gRPC status code for an HTTP status the sidecar answered with.
pub fn status_for(status: StatusCode) -> u8 {
    match status.as_u16() {
        400 | 414 | 431 => 3,
        403 => 7,
        404 | 502 | 503 => 14,
        504 | 408 => 4,
        413 | 429 => 8,
        401 => 16,
        _ => 2,
    }
}

/// `grpc-timeout` (`1*8DIGIT unit`, unit one of `H M S m u n`), if present and well formed.
pub fn timeout(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get("grpc-timeout")?.as_bytes();
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b"H" => Duration::from_secs(n.saturating_mul(3600)),
        b"M" => Duration::from_secs(n.saturating_mul(60)),
        b"S" => Duration::from_secs(n),
        b"m" => Duration::from_millis(n),
        b"u" => Duration::from_micros(n),
        b"n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// A response the sidecar wrote itself (a text body) turned into a gRPC trailers-only
/// response; a response from the app or a peer passes unchanged.
pub fn into_grpc(response: Response<ProxyBody>) -> Response<ProxyBody> {
    let (parts, body) = response.into_parts();
    let ProxyBody::Text(text) = body else {
        return Response::from_parts(parts, body);
    };
    if parts.status == StatusCode::OK {
        return Response::from_parts(parts, ProxyBody::Text(text));
    }
    let message = text
        .as_deref()
        .map_or(Bytes::new(), |t| Bytes::copy_from_slice(t.trim_ascii_end()));
    let mut out = Response::new(ProxyBody::Text(None));
    let headers = out.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    headers.insert(
        "grpc-status",
        HeaderValue::from(u16::from(status_for(parts.status))),
    );
    if let Ok(v) = HeaderValue::from_maybe_shared(Bytes::from(percent_encode(&message))) {
        headers.insert("grpc-message", v);
    }
    out
}

/// gRPC's `grpc-message` encoding: bytes outside `0x20..=0x7E`, and `%`, as `%XX`.
fn percent_encode(message: &[u8]) -> String {
    let mut out = String::with_capacity(message.len());
    for &b in message {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::responses::text_response;

    #[test]
    fn grpc_timeout_units() {
        let mut h = HeaderMap::new();
        for (v, want) in [
            ("100m", Some(Duration::from_millis(100))),
            ("2S", Some(Duration::from_secs(2))),
            ("1H", Some(Duration::from_secs(3600))),
            ("5u", Some(Duration::from_micros(5))),
            ("123456789S", None),
            ("S", None),
            ("10x", None),
            ("-1S", None),
        ] {
            h.insert("grpc-timeout", HeaderValue::from_static(v));
            assert_eq!(timeout(&h), want, "{v}");
        }
    }

    #[test]
    fn sidecar_errors_become_trailers_only_responses() {
        let r = into_grpc(text_response(
            StatusCode::FORBIDDEN,
            "{\"error\":\"forbidden\",\"rule\":\"no-admin\"}",
        ));
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()["grpc-status"], "7");
        assert_eq!(r.headers()["content-type"], "application/grpc");
        assert!(r.headers()["grpc-message"]
            .to_str()
            .unwrap()
            .contains("no-admin"));
        assert!(matches!(r.body(), ProxyBody::Text(None)));
        let r = into_grpc(text_response(StatusCode::GATEWAY_TIMEOUT, "100% late\n"));
        assert_eq!(r.headers()["grpc-status"], "4");
        assert_eq!(r.headers()["grpc-message"], "100%25 late");
        assert_eq!(status_for(StatusCode::SERVICE_UNAVAILABLE), 14);
        assert_eq!(status_for(StatusCode::BAD_REQUEST), 3);
    }

    #[test]
    fn only_http2_with_grpc_content_type_is_grpc() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc+proto"),
        );
        assert!(is_grpc(Version::HTTP_2, &h));
        assert!(!is_grpc(Version::HTTP_11, &h));
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        assert!(!is_grpc(Version::HTTP_2, &h));
    }
}
