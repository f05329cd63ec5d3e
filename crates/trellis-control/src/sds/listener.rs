//! The SDS listener (which also serves the JWT-SVID service, [`crate::jwt`]): `trellis-serve`'s accept loop (connection cap, TLS handshake bounded by
//! `limits.sds.handshake_timeout`, drain) in front of tonic's gRPC server (`limits.sds`
//! streams, header list, message size and rapid-reset bounds).
//!
//! Handshakes run in their own tasks, so a slow client never stalls the loop. A connection
//! that completed its handshake is handed to tonic with who is on the other end
//! ([`SdsPeer`]); its task lives (holding its place under `limits.sds.max_connections`) until
//! tonic drops the connection.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;
use trellis_proto::trellis::jwt::v1::jwt_svid_service_server::JwtSvidServiceServer;
use trellis_proto::SecretDiscoveryServiceServer;
use trellis_serve::{accept, Drain, Handshake};

use super::limits::SdsLimits;
use super::{SdsPeer, SdsService};

/// HTTP/2 PING interval on SDS connections, and how long a PING may go unanswered.
const KEEPALIVE: (Duration, Duration) = (Duration::from_secs(30), Duration::from_secs(10));

/// The SDS TLS handshake (the control plane's own SVID; a client SVID, when presented, is
/// verified against the bundle and becomes [`SdsPeer::svid`]).
#[derive(Clone)]
pub struct SdsTls(pub TlsAcceptor);

impl Handshake for SdsTls {
    type Io = (TlsStream<TcpStream>, SdsPeer);

    async fn handshake(&self, tcp: TcpStream, addr: SocketAddr) -> Option<Self::Io> {
        match self.0.accept(tcp).await {
            Ok(tls) => {
                let svid =
                    trellis_identity::tls::peer_spiffe_id(tls.get_ref().1.peer_certificates());
                Some((tls, SdsPeer { addr, svid }))
            }
            Err(e) => {
                tracing::debug!(peer = %addr, error = %e, "SDS TLS handshake failed");
                None
            }
        }
    }
}

/// Serves SDS on `listener` until `drain` signals: new connections stop, tonic closes the
/// open ones gracefully (streams end when the CA rotator stops), and whatever is left when
/// the drain is forced is dropped.
pub async fn serve(
    listener: accept::Listener<SdsTls>,
    service: SdsService,
    jwt: std::sync::Arc<crate::jwt::JwtService>,
    limits: SdsLimits,
    drain: Drain,
) {
    let (conn_tx, conn_rx) = mpsc::channel::<Result<SdsConn, io::Error>>(128);
    let accepting = listener.serve(&drain, move |conn| {
        let conn_tx = conn_tx.clone();
        async move {
            // Boxed: this task lives as long as the connection, and would otherwise keep room
            // for the handshake's state (a rustls connection mid-handshake and its timer) for all
            // of it; the box is freed when the handshake ends.
            let Some((inner, peer)) = Box::pin(conn.handshake()).await else {
                return;
            };
            let (closed_tx, closed) = oneshot::channel();
            let conn = SdsConn {
                inner,
                peer,
                _closed: closed_tx,
            };
            let handed_over = conn_tx.send(Ok(conn)).await.is_ok();
            drop(conn_tx);
            if handed_over {
                // Resolves (with an error) once tonic drops the connection.
                let _ = closed.await;
            }
        }
    });
    let grpc = async {
        let service = SecretDiscoveryServiceServer::new(service)
            .max_decoding_message_size(limits.max_message_bytes);
        let server = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(KEEPALIVE.0))
            .http2_keepalive_timeout(Some(KEEPALIVE.1))
            .max_concurrent_streams(limits.max_streams_per_connection)
            .http2_max_header_list_size(limits.max_header_list_bytes)
            .http2_max_pending_accept_reset_streams(Some(limits.max_pending_resets))
            .add_service(service)
            // JWT-SVIDs on the same connections, peers and limits as SDS.
            .add_service(
                JwtSvidServiceServer::from_arc(jwt)
                    .max_decoding_message_size(limits.max_message_bytes),
            )
            .serve_with_incoming_shutdown(ReceiverStream::new(conn_rx), drain.signaled());
        tokio::select! {
            result = server => {
                if let Err(e) = result {
                    tracing::error!(error = %e, "SDS server stopped");
                }
            }
            () = drain.forced() => {}
        }
    };
    // When the loop ends its sender goes with it: tonic's incoming stream then ends once the
    // connections already accepted are in.
    tokio::join!(accepting, grpc);
}

/// A verified TLS connection plus who is on the other end; tonic puts [`SdsPeer`] into each
/// request's extensions.
pub struct SdsConn {
    inner: TlsStream<TcpStream>,
    peer: SdsPeer,
    /// Dropped with the connection: tells its accept task (which holds the connection's place
    /// under `limits.sds.max_connections`) that it is gone.
    _closed: oneshot::Sender<()>,
}

impl Connected for SdsConn {
    type ConnectInfo = SdsPeer;
    fn connect_info(&self) -> SdsPeer {
        self.peer.clone()
    }
}

impl AsyncRead for SdsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for SdsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
