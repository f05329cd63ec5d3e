//! A gRPC channel to a control plane's SDS endpoint over mTLS-capable TLS 1.3, verifying the
//! server's SPIFFE ID (`spiffe://<td>/trellis/control`) against a bundle. Used by the demo, the
//! load example and tests; the sidecar has its own client with reconnects.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint};
use trellis_identity::tls::{
    client_config, PeerMatch, SpiffeServerVerifier, SvidResolver, TlsPolicy,
};
use trellis_identity::{SpiffeId, TrustBundle};

/// Why a channel could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// TLS configuration.
    #[error("TLS setup failed: {0}")]
    Tls(String),
    /// Connecting or handshaking.
    #[error("cannot connect to control plane at {addr}: {source}")]
    Connect {
        /// The address.
        addr: SocketAddr,
        /// The transport error.
        source: tonic::transport::Error,
    },
}

/// Opens a channel to `addr`, requiring the server to present `server_id` under `bundle`.
/// With `svid`, the client presents it (re-attestation without a token).
pub async fn connect(
    addr: SocketAddr,
    bundle: TrustBundle,
    server_id: SpiffeId,
    svid: Option<Arc<SvidResolver>>,
) -> Result<Channel, ClientError> {
    connect_from(addr, None, bundle, server_id, svid, None).await
}

/// [`connect`] from the local address `source` (a load test spreads 100,000 connections over
/// many loopback addresses: one source address has ~28,000 ephemeral ports per destination).
/// With `ping`, an HTTP/2 PING every `ping.0`, idle or not, and the connection closed when one
/// goes unanswered for `ping.1`, as a Trellis sidecar's SDS client does.
pub async fn connect_from(
    addr: SocketAddr,
    source: Option<IpAddr>,
    bundle: TrustBundle,
    server_id: SpiffeId,
    svid: Option<Arc<SvidResolver>>,
    ping: Option<(Duration, Duration)>,
) -> Result<Channel, ClientError> {
    let verifier = SpiffeServerVerifier::new(
        Arc::new(ArcSwap::from_pointee(bundle)),
        PeerMatch::Exact(server_id),
    );
    let tls = client_config(svid, verifier, TlsPolicy::Tls13, &[b"h2"])
        .map_err(|e| ClientError::Tls(e.to_string()))?;
    let connector = TlsConnector::from(Arc::new(tls));
    let mut endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| ClientError::Connect { addr, source: e })?
        .connect_timeout(Duration::from_secs(5));
    if let Some((interval, timeout)) = ping {
        endpoint = endpoint
            .http2_keep_alive_interval(interval)
            .keep_alive_timeout(timeout)
            .keep_alive_while_idle(true);
    }
    endpoint
        .connect_with_connector(tower::service_fn(move |_uri| {
            let connector = connector.clone();
            async move {
                let tcp = match source {
                    None => TcpStream::connect(addr).await?,
                    Some(source) => {
                        let socket = match source {
                            IpAddr::V4(_) => TcpSocket::new_v4()?,
                            IpAddr::V6(_) => TcpSocket::new_v6()?,
                        };
                        socket.bind(SocketAddr::new(source, 0))?;
                        socket.connect(addr).await?
                    }
                };
                let _ = tcp.set_nodelay(true);
                // The name is unused: the verifier checks the SPIFFE ID, not a DNS name.
                let name = rustls::pki_types::ServerName::try_from("trellis-control")
                    .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
                let tls = connector.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(TokioIo::new(tls))
            }
        }))
        .await
        .map_err(|source| ClientError::Connect { addr, source })
}
