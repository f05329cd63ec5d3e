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
    let accepting = listener.serve(&drain, move |conn| connection_task(conn, conn_tx.clone()));
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

/// One connection's task: handshake, hand-over to tonic, then wait (holding the connection's
/// place under `limits.sds.max_connections`) until tonic drops it.
///
/// A task's memory is its future's largest state, kept for the task's whole life. Only the
/// wait lasts as long as the connection, so the handshake (a rustls connection mid-handshake
/// and its timer) and the hand-over (a whole TLS stream held across a send) run in a box that
/// is freed when they end: the task then holds ~0.2 KiB per connection instead of ~6.5 KiB
/// (docs/benchmarks.md, "Control plane: memory per sidecar").
async fn connection_task(
    conn: accept::Accepted<SdsTls>,
    conn_tx: mpsc::Sender<Result<SdsConn, io::Error>>,
) {
    let handed_over = Box::pin(async move {
        let (inner, peer) = conn.handshake().await?;
        let (closed_tx, closed) = oneshot::channel();
        let conn = SdsConn {
            inner,
            peer,
            _closed: closed_tx,
        };
        conn_tx.send(Ok(conn)).await.ok()?;
        Some(closed)
    })
    .await;
    if let Some(closed) = handed_over {
        // Resolves (with an error) once tonic drops the connection.
        let _ = closed.await;
    }
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use trellis_serve::limit::Uncounted;

    use super::*;

    /// What a connection's task keeps for the connection's life must not grow back to the
    /// size of a TLS stream: the control plane holds one per sidecar.
    #[tokio::test]
    async fn a_connection_task_keeps_no_tls_state() {
        let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into()]).unwrap();
        let key = rustls::pki_types::PrivatePkcs8KeyDer::from(cert.signing_key.serialize_der());
        let config = rustls::ServerConfig::builder_with_provider(trellis_identity::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.cert.der().clone()], key.into())
            .unwrap();
        let tcp = accept::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let listener = accept::Listener::new(tcp, "sds", 4, Arc::new(Uncounted)).with_handshake(
            SdsTls(TlsAcceptor::from(Arc::new(config))),
            Duration::from_secs(5),
        );
        let (_signal, drain) = trellis_serve::drain::channel();
        let (conn_tx, _conn_rx) = mpsc::channel(1);
        let (size_tx, mut size_rx) = mpsc::channel(1);
        tokio::spawn(async move {
            listener
                .serve(&drain, move |conn| {
                    let task = connection_task(conn, conn_tx.clone());
                    let _ = size_tx.try_send(std::mem::size_of_val(&task));
                    task
                })
                .await;
        });
        let _client = TcpStream::connect(addr).await.unwrap();
        let size = size_rx.recv().await.unwrap();
        let tls_stream = std::mem::size_of::<TlsStream<TcpStream>>();
        assert!(
            size < 512 && size < tls_stream / 2,
            "a connection task is {size} bytes (a TLS stream is {tls_stream})"
        );
    }
}
