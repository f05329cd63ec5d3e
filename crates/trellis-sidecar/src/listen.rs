//! The sidecar's side of `trellis-serve`'s accept loop: what its listeners report (refused
//! connections, handshake timeouts) goes to [`SidecarMetrics`], and the inbound listeners'
//! mTLS handshake ([`InboundTls`]), shared by the HTTP listener and the TCP forwards.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use trellis_identity::tls::{
    handshake_failure_reason, negotiated_group, peer_spiffe_id, SharedBundle,
};
use trellis_identity::SpiffeId;
use trellis_serve::{Handshake, ListenerEvents};

use crate::metrics::{Direction, Listener, SidecarMetrics};
use crate::mtls;
use crate::svid_store::SvidStore;

/// A listener's events, counted: `trellis_connections_refused_total{listener}` and, for the
/// inbound listeners (the only ones with a handshake),
/// `trellis_tls_handshakes_total{direction="inbound",reason="timeout"}`.
struct ListenerMetrics {
    metrics: Arc<SidecarMetrics>,
    listener: Listener,
}

impl ListenerEvents for ListenerMetrics {
    fn refused(&self) {
        self.metrics.connection_refused(self.listener);
    }

    fn handshake_timed_out(&self) {
        self.metrics.handshake(Direction::Inbound, false, "timeout");
    }

    fn handed_to_worker(&self, worker: usize) {
        let worker = u16::try_from(worker).unwrap_or(u16::MAX);
        self.metrics
            .worker_connections
            .get_or_create(&crate::metrics::WorkerLabel { worker })
            .inc();
    }
}

/// What `listener` reports, as metrics.
pub(crate) fn events(metrics: &Arc<SidecarMetrics>, listener: Listener) -> Arc<dyn ListenerEvents> {
    Arc::new(ListenerMetrics {
        metrics: Arc::clone(metrics),
        listener,
    })
}

/// The inbound mTLS handshake: the caller's chain is verified against the current bundle
/// (client certificate required) by the acceptor's verifier, a resumed session is re-verified
/// against today's bundle and clock, and the outcome is counted. Yields the TLS stream, the
/// caller's SPIFFE ID and whether the session was resumed. Bounded by
/// `limits.inbound.handshake_timeout` in the accept loop (a timeout is counted there).
#[derive(Clone)]
pub(crate) struct InboundTls(Arc<InboundTlsParts>);

struct InboundTlsParts {
    acceptor: TlsAcceptor,
    store: Arc<SvidStore>,
    bundle: SharedBundle,
    metrics: Arc<SidecarMetrics>,
}

impl InboundTls {
    pub(crate) fn new(
        acceptor: TlsAcceptor,
        store: Arc<SvidStore>,
        metrics: Arc<SidecarMetrics>,
    ) -> Self {
        Self(Arc::new(InboundTlsParts {
            acceptor,
            bundle: store.bundle(),
            store,
            metrics,
        }))
    }
}

impl Handshake for InboundTls {
    type Io = (TlsStream<TcpStream>, SpiffeId, bool);

    async fn handshake(&self, tcp: TcpStream, peer_addr: SocketAddr) -> Option<Self::Io> {
        let InboundTlsParts {
            acceptor,
            store,
            bundle,
            metrics,
        } = &*self.0;
        // Right after a start the first SVID is a moment away: the caller waits in its
        // handshake rather than being refused for want of a certificate (within the same
        // handshake timeout).
        mtls::wait_for_svid(store, std::time::Duration::MAX).await;
        let started = Instant::now();
        let stream = match acceptor.accept(tcp).await {
            Ok(stream) => stream,
            Err(e) => {
                let reason = crate::dial::tls_error(&e).map_or("io", handshake_failure_reason);
                metrics.handshake(Direction::Inbound, false, reason);
                tracing::debug!(%peer_addr, reason, error = %e, "inbound handshake refused");
                return None;
            }
        };
        let conn = stream.get_ref().1;
        let resumed = mtls::is_resumed(conn.handshake_kind());
        let peer_id = if resumed {
            // The verifier did not run: check the stored chain against today's bundle and clock.
            match mtls::recheck_resumed_client(conn.peer_certificates(), bundle, SystemTime::now())
            {
                Ok(id) => Some(id),
                Err(e) => {
                    metrics.handshake(Direction::Inbound, false, e.reason());
                    tracing::info!(%peer_addr, error = %e, "resumed session refused");
                    return None;
                }
            }
        } else {
            peer_spiffe_id(conn.peer_certificates())
        };
        let Some(peer_id) = peer_id else {
            // The verifier accepted the chain, so this cannot happen; refuse rather than guess.
            metrics.handshake(Direction::Inbound, false, "not_svid");
            return None;
        };
        metrics.handshake_ok(Direction::Inbound, negotiated_group(conn));
        metrics.handshake_duration(Direction::Inbound, started.elapsed());
        Some((stream, peer_id, resumed))
    }
}
