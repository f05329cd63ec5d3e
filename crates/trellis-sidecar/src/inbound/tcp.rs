//! Inbound raw TCP forwards (`inbound.tcp`): peer → mTLS (client certificate required) →
//! policy (`decide_l4(caller, listen port)`; a denial closes the connection right after the
//! handshake, and a reload that denies an open forward closes it) → plain TCP → app.

use crate::access_log::ACCESS_LOG_TARGET;
use crate::dial::{connect_tcp, TcpTarget};
use crate::listen::InboundTls;
use crate::metrics::{Direction, SidecarMetrics};
use crate::policy::{AccessDecision, ConnectionScope, PolicyEngine};
use crate::splice::splice;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use trellis_serve::{accept, Drain};

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
            let grant = ctx.policy.admit_logged(
                peer_id.as_str(),
                ConnectionScope::Tcp { port },
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
            let Some(mut grant) = grant else {
                let _ = tls.shutdown().await;
                return;
            };
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
                () = grant.revoked() => {
                    tracing::info!(%peer_addr, %peer_id, port, "policy no longer allows this TCP connection; closing it");
                }
            }
        }
    })
    .await;
}
