//! Plain TCP mode, for protocols that are not HTTP. Identity checks still apply:
//!
//! - outbound (`protocol: tcp` upstream on its dedicated `listen`): app → plain TCP → sidecar →
//!   mTLS (peer verified against the bundle and the upstream's `identity`) → peer;
//! - inbound (`inbound.tcp`): peer → mTLS (client certificate required) → policy
//!   (`decide_l4(caller, listen port)`; a denial closes the connection right after the
//!   handshake, and a reload that denies an open forward closes it) → sidecar → plain TCP →
//!   app.
//!
//! Bytes are copied both ways with [`tokio::io::copy_bidirectional_with_sizes`]; an EOF on one
//! side is passed on as a half-close (TLS `close_notify` + TCP FIN) so request/response
//! protocols that shut down their write side still work. On drain, forwards keep copying until
//! they end on their own or the drain timeout passes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use trellis_serve::{accept, Drain};

use crate::http_util::{connect_tcp, TcpTarget, ACCESS_LOG_TARGET};
use crate::listen::{self, InboundTls};
use crate::metrics::{Direction, Listener, SidecarMetrics};
use crate::policy::{AccessDecision, PolicyEngine};
use crate::pool::{PeerTarget, TlsClient};

/// Copy buffer per direction: one TLS record's worth of plaintext.
pub const COPY_BUFFER: usize = 16 * 1024;

/// Copies until both directions have ended; returns (a→b, b→a) bytes.
pub async fn splice<A, B>(a: &mut A, b: &mut B) -> std::io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    tokio::io::copy_bidirectional_with_sizes(a, b, COPY_BUFFER, COPY_BUFFER).await
}

/// One inbound raw TCP forward, bound (mTLS: [`InboundTls`], as the HTTP listener).
pub(crate) struct InboundForward {
    pub(crate) listener: accept::Listener<InboundTls>,
    pub(crate) app: SocketAddr,
}

/// What every inbound forward connection needs.
pub(crate) struct InboundTcpContext {
    /// Log each connection's decision (target `trellis::access`, message `connection`).
    pub(crate) access_log: bool,
    pub(crate) metrics: Arc<SidecarMetrics>,
    pub(crate) policy: Arc<PolicyEngine>,
    pub(crate) connect_timeout: Duration,
}

/// Accepts mTLS on the forward's listener until `drain`; each connection is spliced to the app.
pub(crate) async fn run_inbound_forward(
    forward: InboundForward,
    ctx: Arc<InboundTcpContext>,
    drain: Drain,
) {
    let InboundForward { listener, app } = forward;
    // Policy L4 rules name the port this forward listens on.
    let port = listener.local_addr().map_or(0, |a| a.port());
    listener.serve(&drain, |conn| {
        let ctx = ctx.clone();
        async move {
            let peer_addr = conn.peer();
            let Some((mut tls, peer_id, _)) = conn.handshake().await else {
                return;
            };
            let mut decided = AccessDecision::default();
            let allowed = ctx.policy.authorize_l4_logged(
                peer_id.as_str(),
                port,
                ctx.access_log.then_some(&mut decided),
            );
            if ctx.access_log {
                // What `trellis policy replay` decides again: caller and listen port.
                tracing::info!(
                    target: ACCESS_LOG_TARGET,
                    caller = peer_id.as_str(),
                    direction = Direction::Inbound.as_str(),
                    port,
                    decision = decided.decision,
                    rule = decided.rule.as_deref(),
                    policy = decided.policy.as_deref(),
                    "connection"
                );
            }
            if !allowed {
                let _ = tls.shutdown().await;
                return;
            }
            let _open = ctx.metrics.connection(Direction::Inbound);
            let mut to_app = match connect_tcp(TcpTarget::Addr(app), ctx.connect_timeout).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(%peer_addr, %peer_id, %app, error = %e, "TCP forward: app unreachable");
                    return;
                }
            };
            tokio::select! {
                spliced = splice(&mut tls, &mut to_app) => match spliced {
                    Ok((up, down)) => tracing::debug!(%peer_addr, %peer_id, %app, up, down, "TCP forward done"),
                    Err(e) => tracing::debug!(%peer_addr, %peer_id, %app, error = %e, "TCP forward ended"),
                },
                () = ctx.policy.l4_revoked(peer_id.as_str(), port) => {
                    tracing::info!(%peer_addr, %peer_id, port, "policy no longer allows this TCP connection; closing it");
                }
            }
        }
    })
    .await;
}

/// An outbound TCP upstream, bound on its dedicated port.
pub(crate) struct OutboundTcp {
    pub(crate) listener: TcpListener,
    pub(crate) peer: Arc<PeerTarget>,
    pub(crate) tls: TlsClient,
}

/// Accepts plain TCP from the app until `drain`; each connection gets its own mTLS connection
/// to the peer (checked like HTTP upstreams) and is spliced to it. A peer that cannot be
/// reached or fails the identity check closes the app's connection (TCP has no error page);
/// the reason is logged and counted in `tls_handshakes_total`.
pub(crate) async fn run_outbound_tcp(
    upstream: OutboundTcp,
    max_connections: usize,
    metrics: &Arc<SidecarMetrics>,
    drain: Drain,
) {
    let OutboundTcp {
        listener,
        peer,
        tls,
    } = upstream;
    let events = listen::events(metrics, Listener::OutboundTcp);
    let listener = accept::Listener::new(listener, "outbound_tcp", max_connections, events);
    listener.serve(&drain, |conn| {
        let (peer, tls) = (peer.clone(), tls.clone());
        async move {
            let app_addr = conn.peer();
            let mut app = conn.into_tcp();
            let mut to_peer = match peer.connect_stream(&tls).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(%app_addr, error = %e, "TCP upstream: cannot connect");
                    return;
                }
            };
            let _open = peer.metrics().connection(Direction::Outbound);
            match splice(&mut app, &mut to_peer).await {
                Ok((up, down)) => tracing::debug!(%app_addr, target = %peer.target(), up, down, "TCP upstream done"),
                Err(e) => tracing::debug!(%app_addr, target = %peer.target(), error = %e, "TCP upstream ended"),
            }
        }
    })
    .await;
}
