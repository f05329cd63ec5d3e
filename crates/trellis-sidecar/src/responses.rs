//! Responses the sidecar writes itself (errors, refusals), one line of text each.

use crate::body::ProxyBody;
use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Response, StatusCode, Version};

/// A `text/plain` response whose body is `message` on one line.
pub fn text_response(status: StatusCode, message: &str) -> Response<ProxyBody> {
    let mut line = String::with_capacity(message.len() + 1);
    line.extend(
        message
            .chars()
            .map(|c| if c == '\n' || c == '\r' { ' ' } else { c }),
    );
    line.push('\n');
    let mut response = Response::new(ProxyBody::Text(Some(Bytes::from(line))));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// `414` for a request target longer than `max` bytes, else `None`. With `Connection: close`
/// for HTTP/1.x: a peer that sends such targets gets no further requests on the connection.
pub(crate) fn uri_too_long(
    uri: &http::Uri,
    version: Version,
    max: usize,
) -> Option<Response<ProxyBody>> {
    // The request target: authority (absolute form, or HTTP/2 `:authority`) + path and query.
    let len = uri.authority().map_or(0, |a| a.as_str().len())
        + uri.path_and_query().map_or(0, |pq| pq.as_str().len());
    if len <= max {
        return None;
    }
    let mut response = text_response(
        StatusCode::URI_TOO_LONG,
        &format!("request target is {len} bytes; the limit is {max} (limits.http.max_uri_bytes)"),
    );
    if version != Version::HTTP_2 {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    Some(response)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn text_response_is_one_line() {
        let r = text_response(StatusCode::BAD_GATEWAY, "a\nb\r\nc");
        let ProxyBody::Text(Some(b)) = r.body() else {
            panic!()
        };
        assert_eq!(&b[..], b"a b  c\n");
    }
}
