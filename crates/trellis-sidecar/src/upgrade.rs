//! HTTP/1.1 `Upgrade: websocket` across the mesh.
//!
//! The upgrade request travels like any request (routed, policy-checked on sidecar B, XFCC
//! set) but on a **dedicated mTLS HTTP/1.1 connection** between the sidecars instead of a
//! stream of the pooled HTTP/2 one, and on a fresh HTTP/1.1 connection to the app. When the
//! app answers `101`, each sidecar splices the two upgraded connections until both sides
//! close. Why not RFC 8441 (extended CONNECT over the pooled HTTP/2 connection): a WebSocket
//! lives for minutes or hours, and on its own connection it shares no flow-control window
//! with the pool's requests, needs no HTTP/2 framing of every message, and is closed by
//! drain and idle rules on its own; the cost is one handshake per WebSocket, which is small
//! next to its life.
//!
//! Tunnels count toward the drain: they end on their own, after `limits.http.idle_timeout`
//! with no byte either way, or when the drain timeout forces the sidecar down (in practice the
//! process then exits and its runtime drops the tunnel: the `Drain` a tunnel holds is the
//! proxies' nested connection drain, which `drain_all` never turns forced). The e2e tests
//! `protocols::websocket_*` hold a tunnel through both.
//!
//! Other `Upgrade` tokens are refused with `501` naming the token (never stripped into a
//! wrong answer), except `h2c`, which RFC 9113 retired and a server may ignore (the request
//! is then answered over HTTP/1.1, as the client allows).

use std::time::Duration;

use http::header::{self, HeaderMap, HeaderValue};
use http::request::Parts;
use http::{Response, StatusCode, Version};
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use trellis_serve::{Drain, IdleClock, Tracked};

use crate::body::ProxyBody;
use crate::h1_framing::FramingReport;
use crate::headers::strip_hop_by_hop;
use crate::responses::text_response;
use crate::splice::splice;

/// What an HTTP/1.1 request asks of `Upgrade`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpgradeAsk {
    /// No upgrade (or one the sidecar may ignore: `h2c`, or `Upgrade` without
    /// `Connection: upgrade`).
    None,
    /// `Upgrade: websocket` with `Connection: upgrade`; holds the `Upgrade` value as sent.
    WebSocket(HeaderValue),
    /// Another protocol: refused.
    Other(String),
}

/// How the next hop answered an upgrade request.
pub enum Switch {
    /// `101`: its head (for the caller's `101`) and the upgraded connection.
    Switched(http::response::Parts, Upgraded),
    /// Anything else (a refusal, `426`, a redirect): passed on as the answer.
    Answered(Response<ProxyBody>),
}

/// Sends an upgrade request on a fresh HTTP/1.1 connection over `io` and waits for the answer
/// (`target` names the next hop in errors).
pub async fn send_upgrade<T>(
    io: T,
    req: http::Request<crate::body::ReqBody>,
    target: &std::sync::Arc<str>,
    guard: Option<crate::metrics::ConnectionGuard>,
) -> Result<Switch, crate::forward_error::ForwardError>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use crate::forward_error::failed;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| failed(target, e))?;
    let conn_target = target.clone();
    tokio::spawn(async move {
        // Held while the connection (and so the tunnel on it) lives.
        let _guard = guard;
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(target = %conn_target, error = %e, "upgrade connection ended");
        }
    });
    let mut response = sender
        .send_request(req)
        .await
        .map_err(|e| failed(target, e))?;
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        return Ok(Switch::Answered(response.map(ProxyBody::Stream)));
    }
    let upgraded = hyper::upgrade::on(&mut response)
        .await
        .map_err(|e| failed(target, e))?;
    Ok(Switch::Switched(response.into_parts().0, upgraded))
}

/// Reads the request's `Upgrade` and `Connection` headers.
pub fn upgrade_ask(parts: &Parts) -> UpgradeAsk {
    if parts.version != Version::HTTP_11 {
        return UpgradeAsk::None;
    }
    let Some(upgrade) = parts.headers.get(header::UPGRADE) else {
        return UpgradeAsk::None;
    };
    let nominated = parts.headers.get_all(header::CONNECTION).iter().any(|v| {
        v.to_str().is_ok_and(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
        })
    });
    if !nominated {
        return UpgradeAsk::None;
    }
    let text = upgrade.to_str().unwrap_or_default();
    let mut protocols = text
        .split(',')
        .map(|t| t.trim().split('/').next().unwrap_or_default());
    if protocols
        .clone()
        .any(|p| p.eq_ignore_ascii_case("websocket"))
    {
        return UpgradeAsk::WebSocket(upgrade.clone());
    }
    if protocols.all(|p| p.eq_ignore_ascii_case("h2c")) {
        return UpgradeAsk::None;
    }
    UpgradeAsk::Other(text.chars().take(64).collect())
}

/// `501` for an `Upgrade` the mesh does not carry.
pub fn upgrade_refused(protocol: &str) -> Response<ProxyBody> {
    text_response(
        StatusCode::NOT_IMPLEMENTED,
        &format!(
            "Upgrade: {protocol} is not carried through the mesh; only websocket is (use \
             plain HTTP/1.1 or HTTP/2 for other protocols)"
        ),
    )
}

/// Puts back the two headers hop-by-hop removal took away from a WebSocket upgrade request
/// (they are hop-by-hop, so each hop sets them again).
pub fn restore_upgrade(headers: &mut HeaderMap, upgrade: HeaderValue) {
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, upgrade);
}

/// Copies both ways between the two sides of a WebSocket until both close, `idle_timeout`
/// passes with no byte either way, or the drain is forced. Holds `drain` meanwhile, so a
/// graceful shutdown waits for the tunnel up to the drain timeout.
async fn tunnel(
    caller: OnUpgrade,
    upstream: Upgraded,
    drain: Drain,
    idle_timeout: Duration,
    what: &'static str,
) {
    let caller = match caller.await {
        Ok(io) => io,
        Err(e) => {
            tracing::debug!(what, error = %e, "the caller's side of a WebSocket never upgraded");
            return;
        }
    };
    let clock = IdleClock::new();
    let mut caller = Tracked::new(TokioIo::new(caller), clock.clone());
    let mut upstream = TokioIo::new(upstream);
    tokio::select! {
        done = splice(&mut caller, &mut upstream) => match done {
            Ok((up, down)) => tracing::debug!(what, up, down, "WebSocket closed"),
            Err(e) => tracing::debug!(what, error = %e, "WebSocket ended"),
        },
        () = clock.expired(idle_timeout) => {
            tracing::debug!(what, "WebSocket idle past limits.http.idle_timeout; closing it");
        }
        () = drain.forced() => {
            tracing::debug!(what, "drain timeout reached; closing WebSocket");
        }
    }
}

/// The caller's answer to its upgrade request, for both directions. On `101`: the caller's
/// connection stops being read as HTTP/1.1 (`framing`), the tunnel starts, and the caller gets
/// the upstream's head (`Upgrade`, `Connection`, `Sec-WebSocket-Accept`). Otherwise the
/// upstream's answer passes on without its hop-by-hop headers.
pub fn answer(
    switch: Switch,
    caller: OnUpgrade,
    framing: &FramingReport,
    drain: Drain,
    idle_timeout: Duration,
    what: &'static str,
) -> Response<ProxyBody> {
    match switch {
        Switch::Switched(mut head, upstream) => {
            framing.switch_protocols();
            tokio::spawn(tunnel(caller, upstream, drain, idle_timeout, what));
            head.version = Version::HTTP_11;
            Response::from_parts(head, ProxyBody::Text(None))
        }
        Switch::Answered(mut response) => {
            strip_hop_by_hop(response.headers_mut());
            response
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use http::Request;

    fn ask(headers: &[(&str, &str)]) -> UpgradeAsk {
        let mut b = Request::builder().uri("/ws");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        upgrade_ask(&b.body(()).unwrap().into_parts().0)
    }

    #[test]
    fn websocket_needs_connection_upgrade() {
        assert!(matches!(
            ask(&[
                ("upgrade", "websocket"),
                ("connection", "keep-alive, Upgrade")
            ]),
            UpgradeAsk::WebSocket(_)
        ));
        assert_eq!(ask(&[("upgrade", "websocket")]), UpgradeAsk::None);
        assert_eq!(
            ask(&[
                ("upgrade", "h2c"),
                ("connection", "upgrade, http2-settings")
            ]),
            UpgradeAsk::None
        );
        assert_eq!(
            ask(&[("upgrade", "TLS/1.2"), ("connection", "upgrade")]),
            UpgradeAsk::Other("TLS/1.2".into())
        );
        assert_eq!(ask(&[]), UpgradeAsk::None);
    }
}
