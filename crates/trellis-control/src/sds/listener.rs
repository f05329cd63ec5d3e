//! The SDS listener (which also serves the JWT-SVID service, [`crate::jwt`]): `trellis-serve`'s
//! accept loop (connection cap, TLS handshake bounded by `limits.sds.handshake_timeout`,
//! drain) and, in the same task, hyper's HTTP/2 server over the verified TLS stream, calling
//! tonic's gRPC services (`limits.sds` streams, header list, message size and rapid-reset
//! bounds).
//!
//! Not tonic's `Server`: it would take each connection through a channel into a task of its
//! own, with a boxed service stack and a connection-age timer, while the accept task waited
//! beside it to hold the connection's place under `limits.sds.max_connections`. A control
//! plane holds one connection per sidecar, mostly idle, so what each keeps is multiplied by
//! the fleet: here a connection is one task, holding the HTTP/2 connection and its place
//! (docs/benchmarks.md, "Control plane: memory per sidecar"). Where this differs from tonic's
//! `Server`: no server-side cut at a client's `grpc-timeout`, which the client enforces anyway
//! (SDS streams are meant to last; JWT-SVID calls are short), and hyper's default bound of
//! 1,024 streams a client's errors make the server reset, which tonic lifted.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use futures::FutureExt;

use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tonic::service::Routes;
use tower::ServiceExt;
use trellis_proto::trellis::jwt::v1::jwt_svid_service_server::JwtSvidServiceServer;
use trellis_proto::SecretDiscoveryServiceServer;
use trellis_serve::net::DeadPeer;
use trellis_serve::{accept, Drain, Handshake};

use super::limits::SdsLimits;
use super::{SdsPeer, SdsService};

/// When the kernel gives up on an SDS client whose packets vanish (a node gone without a FIN):
/// TCP keepalive probes after 30 s of quiet, unanswered for 10 s, or pushed data unacknowledged
/// for 40 s. The kernel's probes, not HTTP/2 PINGs: a PING keepalive cost every connection
/// ~0.3 KiB (hyper's ping channel and timer, h2's user-ping state) and woke its task every 30 s
/// (at 100,000 sidecars, 3,300 wakeups and encrypted frames a second) to find the same thing.
/// A client process that hangs with its kernel still answering keeps its connection, as it
/// would keep its SVID.
const DEAD_PEER: DeadPeer = DeadPeer {
    interval: Duration::from_secs(30),
    timeout: Duration::from_secs(10),
};

/// The SDS listener over `tcp`: at most `max_connections`, each connection's `handshake` bounded
/// by `handshake_timeout`, and every socket watched by the kernel ([`DEAD_PEER`]) from before
/// its handshake.
pub(crate) fn sds_listener<H: Handshake>(
    tcp: tokio::net::TcpListener,
    max_connections: usize,
    events: Arc<dyn trellis_serve::ListenerEvents>,
    handshake: H,
    handshake_timeout: Duration,
) -> accept::Listener<H> {
    accept::Listener::new(tcp, "sds", max_connections, events)
        .with_handshake(handshake, handshake_timeout)
        .with_dead_peer(DEAD_PEER)
}

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

/// Serves SDS on `listener` until `drain` signals: new connections stop, open ones get an
/// HTTP/2 GOAWAY and end once their streams have (they end when the CA rotator stops), and
/// whatever is left when the drain is forced is dropped.
pub async fn serve(
    listener: accept::Listener<SdsTls>,
    service: SdsService,
    jwt: Arc<crate::jwt::JwtService>,
    limits: SdsLimits,
    drain: Drain,
) {
    let routes = Routes::new(
        SecretDiscoveryServiceServer::new(service)
            .max_decoding_message_size(limits.max_message_bytes),
    )
    // JWT-SVIDs on the same connections, peers and limits as SDS.
    .add_service(
        JwtSvidServiceServer::from_arc(jwt).max_decoding_message_size(limits.max_message_bytes),
    )
    .prepare();
    let http2 = Arc::new(http2_server(&limits));
    listener
        .serve(&drain, |conn| {
            connection_task(conn, routes.clone(), Arc::clone(&http2), drain.signaled())
        })
        .await;
}

/// The HTTP/2 server settings of every SDS connection.
fn http2_server(limits: &SdsLimits) -> hyper::server::conn::http2::Builder<TokioExecutor> {
    let mut http2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    http2
        .timer(TokioTimer::new())
        // Dead clients are the kernel's to find (`DEAD_PEER`).
        .keep_alive_interval(None)
        .max_concurrent_streams(limits.max_streams_per_connection)
        .max_header_list_size(limits.max_header_list_bytes)
        .max_pending_accept_reset_streams(Some(limits.max_pending_resets))
        // No HPACK table for what clients send: an SDS connection carries one header block
        // for the sidecar's life, and the patched h2 empties the table once the client has
        // agreed (third_party/). JWT-SVID calls on the same connection pay for it: their
        // request headers are sent in full each time (~100 bytes).
        .header_table_size(0);
    http2
}

/// One SDS connection over TLS, as hyper serves it.
type Http2Connection = hyper::server::conn::http2::Connection<
    TokioIo<TlsStream<TcpStream>>,
    PeerRoutes,
    TokioExecutor,
>;

/// One connection's task, for the connection's life (the accept loop holds its place under
/// `limits.sds.max_connections` until it ends): handshake, then HTTP/2 until the client
/// closes, the drain's GOAWAY has let its streams end, or the drain is forced.
///
/// Combinators and [`Served`], not an `async` block: a task keeps its future's largest state
/// for the connection's life, and an `async` block would keep, beside the HTTP/2 connection,
/// the slots of everything it was given (the accepted socket, the acceptor, the routes)
/// long after they were used.
fn connection_task(
    conn: accept::Accepted<SdsTls>,
    routes: Routes,
    http2: Arc<hyper::server::conn::http2::Builder<TokioExecutor>>,
    draining: impl Future<Output = ()> + Unpin,
) -> impl Future<Output = ()> {
    // Boxed: a rustls connection mid-handshake and its timer are larger than what the rest of
    // the connection's life keeps.
    Box::pin(conn.handshake()).then(move |handshaken| Served {
        connection: handshaken.map(|(tls, peer)| {
            http2.serve_connection(
                TokioIo::new(tls),
                PeerRoutes {
                    routes,
                    peer: Box::new(peer),
                },
            )
        }),
        draining: Some(draining),
    })
}

/// An SDS connection served until it ends: on the drain's signal it gets a GOAWAY and is
/// served on until its streams have ended (the accept loop drops it when the drain is forced).
struct Served<D> {
    /// `None`: the handshake failed (logged), nothing to serve.
    connection: Option<Http2Connection>,
    /// `None` once the GOAWAY is sent.
    draining: Option<D>,
}

impl<D: Future<Output = ()> + Unpin> Future for Served<D> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        let Some(connection) = &mut this.connection else {
            return Poll::Ready(());
        };
        if let Some(draining) = &mut this.draining {
            if Pin::new(draining).poll(cx).is_ready() {
                this.draining = None;
                Pin::new(&mut *connection).graceful_shutdown();
            }
        }
        let ended = ready!(Pin::new(connection).poll(cx));
        if let Err(e) = ended {
            tracing::debug!(error = %e, "SDS connection ended with an error");
        }
        this.connection = None;
        Poll::Ready(())
    }
}

/// tonic's services for one connection: each request carries who is on the other end
/// ([`SdsPeer`], in its extensions), as tonic's own server would put it there.
#[derive(Clone)]
struct PeerRoutes {
    routes: Routes,
    /// Boxed: hyper keeps the service inside every connection's HTTP/2 state, and 56 bytes
    /// less there put the SDS connection's task in jemalloc's 1,792-byte class, not 2,048
    /// (see `a_connection_task_is_no_larger_than_its_http2_connection`).
    peer: Box<SdsPeer>,
}

impl hyper::service::Service<http::Request<Incoming>> for PeerRoutes {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    /// Boxed: hyper runs each stream in a task of its own, sized for the largest state of the
    /// stream's future, and this one (320 bytes, the request in it) lasts only until the
    /// response headers; the SDS stream's body that follows lives for the sidecar's life.
    type Future = Pin<Box<tower::util::Oneshot<Routes, http::Request<Incoming>>>>;

    fn call(&self, mut request: http::Request<Incoming>) -> Self::Future {
        request.extensions_mut().insert(SdsPeer::clone(&self.peer));
        Box::pin(self.routes.clone().oneshot(request))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use trellis_serve::limit::Uncounted;

    use super::*;

    /// rustls keeps a connection's QUIC state inline in every connection, QUIC or not; the
    /// patched rustls (third_party/) boxes its three secrets, ~430 bytes a TLS-over-TCP
    /// connection never sets, which every SDS connection's task carried (1,168 bytes inline).
    #[test]
    fn a_tls_connection_holds_no_quic_secrets_inline() {
        let inline = std::mem::size_of::<rustls::ServerConnection>();
        assert!(
            inline <= 800,
            "rustls::ServerConnection is {inline} bytes (720 with the patch)"
        );
    }

    /// The SDS handshake with a self-signed server certificate.
    fn self_signed_tls() -> SdsTls {
        let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into()]).unwrap();
        let key = rustls::pki_types::PrivatePkcs8KeyDer::from(cert.signing_key.serialize_der());
        let config = rustls::ServerConfig::builder_with_provider(trellis_identity::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.cert.der().clone()], key.into())
            .unwrap();
        SdsTls(TlsAcceptor::from(Arc::new(config)))
    }

    /// A client whose node vanishes is found by the kernel (no HTTP/2 PING keeps state in the
    /// process): every SDS socket has keepalive probes and TCP_USER_TIMEOUT before its
    /// handshake.
    #[tokio::test]
    async fn an_sds_socket_is_watched_by_the_kernel() {
        /// Reports the socket options the handshake starts with, and refuses.
        #[derive(Clone)]
        struct Options(tokio::sync::mpsc::Sender<(bool, Duration, Option<Duration>)>);
        impl Handshake for Options {
            type Io = ();
            async fn handshake(&self, tcp: TcpStream, _: SocketAddr) -> Option<()> {
                let sock = socket2::SockRef::from(&tcp);
                let seen = (
                    sock.keepalive().unwrap(),
                    sock.tcp_keepalive_time().unwrap(),
                    sock.tcp_user_timeout().unwrap(),
                );
                let _ = self.0.send(seen).await;
                None
            }
        }
        let tcp = accept::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::channel(1);
        let listener = sds_listener(
            tcp,
            4,
            Arc::new(Uncounted),
            Options(tx),
            Duration::from_secs(5),
        );
        let (_signal, drain) = trellis_serve::drain::channel();
        tokio::spawn(async move {
            listener
                .serve(&drain, |conn| conn.handshake().map(drop))
                .await
        });
        let _client = TcpStream::connect(addr).await.unwrap();
        assert_eq!(
            rx.recv().await.unwrap(),
            (true, Duration::from_secs(30), Some(Duration::from_secs(40)))
        );
    }

    /// A connection's task is, for the connection's whole life, its future's largest state:
    /// that must be the HTTP/2 connection it serves, not the handshake before it (a rustls
    /// connection mid-handshake and its timer) nor what it was given to start with (the
    /// accepted socket, the acceptor, the routes), which would add to every idle sidecar.
    /// (An `async` block here was 424 bytes over, with the drain's wait then 192.)
    #[tokio::test]
    async fn a_connection_task_is_no_larger_than_its_http2_connection() {
        let tcp = accept::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let listener = accept::Listener::new(tcp, "sds", 4, Arc::new(Uncounted))
            .with_handshake(self_signed_tls(), Duration::from_secs(5));
        let (_signal, drain) = trellis_serve::drain::channel();
        let http2 = Arc::new(http2_server(&SdsLimits::default()));
        let (size_tx, mut size_rx) = tokio::sync::mpsc::channel(1);
        let serving = drain.clone();
        tokio::spawn(async move {
            listener
                .serve(&serving, |conn| {
                    let task = connection_task(
                        conn,
                        Routes::default(),
                        Arc::clone(&http2),
                        serving.signaled(),
                    );
                    let _ = size_tx.try_send(std::mem::size_of_val(&task));
                    task
                })
                .await;
        });
        let _client = TcpStream::connect(addr).await.unwrap();
        let size = size_rx.recv().await.unwrap();
        let connection = std::mem::size_of::<
            hyper::server::conn::http2::Connection<
                TokioIo<TlsStream<TcpStream>>,
                PeerRoutes,
                TokioExecutor,
            >,
        >();
        // What may come on top: the wait for the drain (~40 bytes) and the enum tags.
        assert!(
            size <= connection + 64,
            "a connection task is {size} bytes; its HTTP/2 connection is {connection}"
        );
        // Boxed, it is every SDS connection's largest allocation: at most 1,792 bytes keeps it
        // in jemalloc's 1,792-byte class (it was 2,040, in the 2,048-byte class, with h2's
        // SETTINGS and GOAWAY frames and its span, rustls's early-data buffer and the peer
        // inline).
        assert!(size <= 1792, "a connection task is {size} bytes");
    }

    /// The connection's other large allocation, the state its streams share inside h2: at
    /// most 512 bytes keeps it in jemalloc's 512-byte class (it was 592, in the 640-byte class,
    /// with `usize` stream counters and the connection's error inline; third_party/README.md).
    #[test]
    fn the_streams_shared_state_fits_in_512_bytes() {
        let size = h2::shared_stream_state_bytes();
        assert!(size <= 512, "h2's shared stream state is {size} bytes");
    }
}
