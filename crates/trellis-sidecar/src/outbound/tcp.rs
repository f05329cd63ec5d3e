//! Outbound raw TCP upstreams (`protocol: tcp` on a dedicated `listen`): app → plain TCP →
//! sidecar → mTLS (peer verified against the bundle and the upstream's `identity`) → peer.

use crate::dial::{PeerTarget, TlsClient};
use crate::listen::{self};
use crate::metrics::{Direction, Listener, SidecarMetrics};
use crate::splice::splice;
use std::sync::Arc;
use tokio::net::TcpListener;
use trellis_serve::{accept, Drain, Workers};

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
    workers: Workers,
    drain: Drain,
) {
    let OutboundTcp {
        listener,
        peer,
        tls,
    } = upstream;
    let events = listen::events(metrics, Listener::OutboundTcp);
    let listener = accept::Listener::new(listener, "outbound_tcp", max_connections, events)
        .with_workers(workers);
    listener.serve(&drain, |conn| {
        let (peer, tls) = (peer.clone(), tls.clone());
        async move {
            let app_addr = conn.peer();
            let mut app = match conn.into_tcp() {
                Ok(app) => app,
                Err(e) => {
                    tracing::warn!(%app_addr, error = %e, "TCP upstream: cannot serve the connection");
                    return;
                }
            };
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
