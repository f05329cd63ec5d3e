//! Why a request could not be forwarded, and the status the caller gets for it.

use http::StatusCode;
use std::sync::Arc;
use std::time::Duration;

/// Why a request could not be forwarded. `status()` is what the caller gets; the message is the
/// one-line body.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ForwardError {
    /// TCP connect refused, unreachable or timed out.
    #[error("{target} is unreachable: {detail}")]
    Unreachable {
        /// `upstream `b` (10.0.0.7:15443)` or `app 127.0.0.1:8080`.
        target: Arc<str>,
        /// The connect error.
        detail: String,
    },
    /// The peer's name did not resolve (system resolver).
    #[error("{target}: cannot resolve `{name}`: {detail}")]
    Unresolvable {
        /// Which upstream or route.
        target: Arc<str>,
        /// The `host:port` that did not resolve.
        name: Arc<str>,
        /// What the resolver said.
        detail: String,
    },
    /// The TLS handshake failed (other than the identity check).
    #[error("TLS handshake with {target} failed ({reason}): {detail}")]
    Handshake {
        /// Which upstream.
        target: Arc<str>,
        /// The `tls_handshakes_total` reason label.
        reason: &'static str,
        /// What rustls or the verifier said.
        detail: String,
    },
    /// The peer's certificate verified but carries another SPIFFE ID than configured.
    #[error("{target}: peer presented {presented}, expected {expected}")]
    WrongIdentity {
        /// Which upstream.
        target: Arc<str>,
        /// The configured `identity`.
        expected: String,
        /// What the peer's certificate says.
        presented: String,
    },
    /// HTTP failed on an established connection.
    #[error("{target} failed: {detail}")]
    Failed {
        /// Which upstream.
        target: Arc<str>,
        /// hyper's error.
        detail: String,
    },
    /// The pooled connection the request was on stopped answering (an HTTP/2 PING went
    /// unanswered: a path that drops packets, a frozen peer) and was closed. The request may
    /// or may not have reached the peer; the next one opens a new connection.
    #[error("{target} stopped answering: {detail}; the connection was closed")]
    ConnectionLost {
        /// Which upstream.
        target: Arc<str>,
        /// What went unanswered, and for how long.
        detail: String,
    },
    /// This sidecar has no SVID yet (it has just started and the control plane has not
    /// answered), so it cannot authenticate to the peer.
    #[error("cannot connect to {target}: this sidecar has no SVID yet (waited {}); is the control plane reachable?", humantime::format_duration(*.waited))]
    NoSvid {
        /// Which upstream.
        target: Arc<str>,
        /// How long the request waited for one.
        waited: Duration,
    },
    /// No response headers within the request timeout.
    #[error("{target} sent no response headers within {}", humantime::format_duration(*.timeout))]
    Timeout {
        /// Which upstream.
        target: Arc<str>,
        /// The configured `request_timeout`.
        timeout: Duration,
    },
}

impl ForwardError {
    /// 503 unreachable, unresolvable, connection lost or no SVID yet, 502 handshake/identity/HTTP failure, 504 timeout.
    pub fn status(&self) -> StatusCode {
        match self {
            ForwardError::Unreachable { .. }
            | ForwardError::Unresolvable { .. }
            | ForwardError::ConnectionLost { .. }
            | ForwardError::NoSvid { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ForwardError::Handshake { .. }
            | ForwardError::WrongIdentity { .. }
            | ForwardError::Failed { .. } => StatusCode::BAD_GATEWAY,
            ForwardError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
        }
    }
}

pub(crate) fn failed(target: &Arc<str>, e: impl std::fmt::Display) -> ForwardError {
    ForwardError::Failed {
        target: target.clone(),
        detail: e.to_string(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn statuses_match_the_issue() {
        let t: Arc<str> = "upstream `b` (x:1)".into();
        let e = ForwardError::Unreachable {
            target: t.clone(),
            detail: "refused".into(),
        };
        assert_eq!(e.status(), StatusCode::SERVICE_UNAVAILABLE);
        let e = ForwardError::WrongIdentity {
            target: t.clone(),
            expected: "spiffe://example.org/y".into(),
            presented: "spiffe://example.org/x".into(),
        };
        assert_eq!(e.status(), StatusCode::BAD_GATEWAY);
        assert!(
            e.to_string()
                .contains("peer presented spiffe://example.org/x, expected spiffe://example.org/y"),
            "{e}"
        );
        let e = ForwardError::ConnectionLost {
            target: t.clone(),
            detail: "no reply to a PING within 5s".into(),
        };
        assert_eq!(e.status(), StatusCode::SERVICE_UNAVAILABLE);
        let e = ForwardError::NoSvid {
            target: t.clone(),
            waited: Duration::from_secs(5),
        };
        assert_eq!(e.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(e.to_string().contains("no SVID yet (waited 5s)"), "{e}");
        let e = ForwardError::Timeout {
            target: t,
            timeout: Duration::from_millis(1500),
        };
        assert_eq!(e.status(), StatusCode::GATEWAY_TIMEOUT);
        assert!(e.to_string().contains("1s 500ms"), "{e}");
    }
}
