//! The policy hook of the inbound proxy: decide a request, or answer it.

use crate::body::ProxyBody;
use crate::metrics::SidecarMetrics;
use crate::policy::{AccessDecision, HttpAuthorization, PolicyEngine};
use crate::responses::text_response;
use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::request::Parts;
use http::{Response, StatusCode, Uri};

/// A request the policy hook answered itself.
pub(super) struct Refusal {
    pub(super) response: Response<ProxyBody>,
    /// The deciding rule of a denial (`None`: the path could not be normalized).
    pub(super) rule: Option<String>,
}

/// **Policy hook.** Decides each request before it reaches the app: `None` lets it through,
/// `Some(refusal)` answers instead.
///
/// Without a policy everything is allowed and nothing is rewritten. With one,
/// `PolicyEngine::authorize_request` (one `ArcSwap::load`, no lock) takes the raw path:
/// a path that cannot be authorized (it cannot be normalized under some reading, or has
/// `;` parameters under `pathParameters: reject`) is answered `400` naming the reason; a
/// path with `;` parameters is decided with and without them, the stricter wins; a denial is
/// `403` with `{"error":"forbidden","rule":…,"caller":…}`; an allowed request goes on with
/// its path replaced by the normalized literal one (query kept), so the app sees the path
/// that was authorized.
pub(super) fn authorize(
    policy: &PolicyEngine,
    metrics: &SidecarMetrics,
    caller: &str,
    request: &mut Parts,
    log: Option<&mut AccessDecision>,
) -> Option<Refusal> {
    if policy.path().is_none() {
        // No policy: allowed as sent (the access log still says so, for replay).
        if let Some(log) = log {
            log.decision = Some("allow");
        }
        return None;
    }
    let normalized = match policy.authorize_request_logged(
        caller,
        request.method.as_str(),
        request.uri.path(),
        log,
    ) {
        HttpAuthorization::Allow(path) => path,
        HttpAuthorization::Deny { rule, .. } => {
            return Some(Refusal {
                response: forbidden(&rule, caller),
                rule: Some(rule),
            })
        }
        HttpAuthorization::BadPath(e) => {
            metrics.bad_path(e.reason());
            tracing::info!(%caller, method = %request.method, path = request.uri.path(), reason = e.reason(), "request path refused");
            return Some(Refusal {
                response: text_response(
                    StatusCode::BAD_REQUEST,
                    &format!("bad request path ({}): {e}", e.reason()),
                ),
                rule: None,
            });
        }
    };
    if !normalized.is_borrowed() {
        let path = normalized.into_string();
        match with_path(&request.uri, &path) {
            Some(uri) => request.uri = uri,
            None => {
                return Some(Refusal {
                    response: text_response(
                        StatusCode::BAD_REQUEST,
                        "bad request path: cannot rewrite it in normal form",
                    ),
                    rule: None,
                })
            }
        }
    }
    None
}

/// `403` with the deciding rule and the caller, as JSON.
pub(super) fn forbidden(rule: &str, caller: &str) -> Response<ProxyBody> {
    let mut body =
        serde_json::json!({ "error": "forbidden", "rule": rule, "caller": caller }).to_string();
    body.push('\n');
    let mut response = Response::new(ProxyBody::Text(Some(Bytes::from(body))));
    *response.status_mut() = StatusCode::FORBIDDEN;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// `uri` with its path replaced by `path` (scheme, authority and query kept).
pub(super) fn with_path(uri: &Uri, path: &str) -> Option<Uri> {
    let pq = match uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path.to_owned(),
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(pq.parse().ok()?);
    Uri::from_parts(parts).ok()
}
