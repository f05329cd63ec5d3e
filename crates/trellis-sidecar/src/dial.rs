//! Dialling: TCP with a timeout, and a peer sidecar over mTLS with the identity check inside
//! the handshake, the re-check of a resumed session, and the errors the app will read.

pub use trellis_serve::net::DeadPeer;

use crate::forward_error::ForwardError;
use crate::metrics::{Direction, SidecarMetrics};
use crate::mtls;
use crate::resolve::Resolver;
use crate::svid_store::SvidStore;
use rustls::client::ClientSessionMemoryCache;
use rustls::pki_types::ServerName;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use trellis_identity::tls::{
    handshake_failure_reason, negotiated_group, svid_error_of, SharedBundle,
};
use trellis_identity::{SpiffeId, SvidError};
use trellis_serve::prefixed::Prefixed;

/// Longest a new HTTP/2 connection waits for the server's first frame before it is used. A
/// server that refused our certificate (or a resumed session) closes instead of sending
/// SETTINGS; reading first turns that into a handshake error instead of a failed request.
pub(crate) const SERVER_PREFACE_WAIT: Duration = Duration::from_secs(2);

/// The `rustls::Error` inside an I/O error from tokio-rustls, if there is one.
pub fn tls_error(err: &io::Error) -> Option<&rustls::Error> {
    err.get_ref()?.downcast_ref::<rustls::Error>()
}

/// How long a connection attempt waits for the SYN-ACK before another attempt starts beside
/// it. The kernel retransmits a SYN after 1 s, 3 s, 7 s: once a path that dropped packets heals,
/// a lone attempt may sit out the rest of its backoff (or its whole `connect_timeout`) although
/// a new SYN would be answered at once. A fresh SYN every second bounds that wait to ~1 s.
pub(crate) const CONNECT_RETRY: Duration = Duration::from_secs(1);

/// Connects with a timeout and turns Nagle off (requests are small and latency-bound). While
/// no answer comes, a new attempt starts every [`CONNECT_RETRY`] beside the pending ones; the
/// first to connect wins. A refusal (or any other error) ends the wait at once: only silence
/// is retried.
pub async fn connect_tcp(addr: TcpTarget<'_>, timeout: Duration) -> io::Result<TcpStream> {
    let attempt = || async move {
        match addr {
            TcpTarget::Addr(a) => TcpStream::connect(a).await,
            TcpTarget::Name(n) => TcpStream::connect(n).await,
            TcpTarget::Addrs(a) => TcpStream::connect(a).await,
        }
    };
    let connect = async {
        let mut pending = futures::stream::FuturesUnordered::new();
        pending.push(attempt());
        let mut retry =
            tokio::time::interval_at(tokio::time::Instant::now() + CONNECT_RETRY, CONNECT_RETRY);
        loop {
            tokio::select! {
                Some(done) = futures::StreamExt::next(&mut pending) => return done,
                _ = retry.tick() => pending.push(attempt()),
            }
        }
    };
    let stream = tokio::time::timeout(timeout, connect).await.map_err(|_| {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no answer within {}", humantime::format_duration(timeout)),
        )
    })??;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Where to connect: a resolved address, or `host:port` to resolve per connection.
#[derive(Debug, Clone, Copy)]
pub enum TcpTarget<'a> {
    /// Already an address.
    Addr(SocketAddr),
    /// Resolved through the system resolver at each connect.
    Name(&'a str),
    /// Resolved already (by a [`Resolver`]): tried in order.
    Addrs(&'a [SocketAddr]),
}

/// One rustls client config and the sessions it may resume.
#[derive(Clone)]
pub struct TlsClient {
    connector: TlsConnector,
    sessions: Arc<ClientSessionMemoryCache>,
}

impl TlsClient {
    /// Built once per upstream and ALPN set (see [`mtls::client_config`]).
    pub fn new(config: Arc<rustls::ClientConfig>, sessions: Arc<ClientSessionMemoryCache>) -> Self {
        Self {
            connector: TlsConnector::from(config),
            sessions,
        }
    }
}

/// How to reach one upstream sidecar and what it must prove.
pub struct PeerTarget {
    target: Arc<str>,
    address: Arc<str>,
    resolved: Option<SocketAddr>,
    server_name: ServerName<'static>,
    expected: SpiffeId,
    bundle: SharedBundle,
    metrics: Arc<SidecarMetrics>,
    connect_timeout: Duration,
    /// Our identity: a connection waits (up to `connect_timeout`) until it holds an SVID.
    svid: Option<Arc<SvidStore>>,
    dead_peer: Option<DeadPeer>,
    /// Resolves a named `address` (cached); without one, each connect asks the system.
    resolver: Option<Arc<Resolver>>,
}

/// A new HTTP connection to a peer, by negotiated protocol.
pub(crate) enum PeerIo {
    H2(Prefixed<TlsStream<TcpStream>>),
    Http1(TlsStream<TcpStream>),
}

impl PeerTarget {
    /// `name`, `address` (`host:port`) and `expected` come from the upstream's config. The TLS
    /// server name is the address's host (SPIFFE verification ignores it; it keys sessions).
    pub fn new(
        name: &str,
        address: &str,
        expected: SpiffeId,
        bundle: SharedBundle,
        metrics: Arc<SidecarMetrics>,
        connect_timeout: Duration,
    ) -> std::io::Result<Self> {
        let resolved = address.parse::<SocketAddr>().ok();
        let host = match resolved {
            Some(a) => a.ip().to_string(),
            None => {
                let host = crate::headers::host_without_port(address);
                host.trim_start_matches('[')
                    .trim_end_matches(']')
                    .to_owned()
            }
        };
        let server_name = ServerName::try_from(host).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("upstream `{name}`: address `{address}` has no usable host name: {e}"),
            )
        })?;
        Ok(Self {
            target: format!("upstream `{name}` ({address})").into(),
            address: address.into(),
            resolved,
            server_name,
            expected,
            bundle,
            metrics,
            connect_timeout,
            svid: None,
            dead_peer: None,
            resolver: None,
        })
    }

    /// Resolves a named address through `resolver` (its cache) instead of at each connect.
    pub fn resolver(mut self, resolver: Arc<Resolver>) -> Self {
        self.resolver = Some(resolver);
        self
    }

    /// Names the peer `target` in error bodies instead of `upstream `name` (address)`.
    pub fn describe(mut self, target: impl Into<Arc<str>>) -> Self {
        self.target = target.into();
        self
    }

    /// Makes every connection wait, up to the connect timeout, until `store` holds an SVID:
    /// right after a start, before the control plane has answered, a handshake without a
    /// client certificate would only be refused by the peer (a `502` for the app).
    pub fn wait_for_svid(mut self, store: Arc<SvidStore>) -> Self {
        self.svid = Some(store);
        self
    }

    /// Sets [`DeadPeer`]'s socket options on every connection.
    pub fn dead_peer(mut self, dead_peer: DeadPeer) -> Self {
        self.dead_peer = Some(dead_peer);
        self
    }

    /// `upstream `name` (address)`, as error bodies name it.
    pub fn target(&self) -> &Arc<str> {
        &self.target
    }

    pub(crate) fn metrics(&self) -> &SidecarMetrics {
        &self.metrics
    }

    async fn tcp(&self) -> Result<TcpStream, ForwardError> {
        let addrs;
        let to = match (self.resolved, &self.resolver) {
            (Some(a), _) => TcpTarget::Addr(a),
            (None, Some(resolver)) => {
                addrs = resolver.resolve(&self.address).await.map_err(|e| {
                    ForwardError::Unresolvable {
                        target: self.target.clone(),
                        name: e.name,
                        detail: e.detail.to_string(),
                    }
                })?;
                TcpTarget::Addrs(&addrs)
            }
            (None, None) => TcpTarget::Name(&self.address),
        };
        let tcp =
            connect_tcp(to, self.connect_timeout)
                .await
                .map_err(|e| ForwardError::Unreachable {
                    target: self.target.clone(),
                    detail: e.to_string(),
                })?;
        if let Some(dead_peer) = &self.dead_peer {
            dead_peer.apply(&tcp);
        }
        Ok(tcp)
    }

    fn handshake_failed(&self, reason: &'static str) {
        self.metrics.handshake(Direction::Outbound, false, reason);
    }

    fn tls_failure(&self, err: &std::io::Error) -> ForwardError {
        let Some(tls) = tls_error(err) else {
            self.handshake_failed("io");
            return ForwardError::Handshake {
                target: self.target.clone(),
                reason: "io",
                detail: err.to_string(),
            };
        };
        let reason = handshake_failure_reason(tls);
        self.handshake_failed(reason);
        match svid_error_of(tls) {
            Some(SvidError::WrongIdentity {
                expected,
                presented,
            }) => ForwardError::WrongIdentity {
                target: self.target.clone(),
                expected: expected.clone(),
                presented: presented.clone(),
            },
            Some(svid) => ForwardError::Handshake {
                target: self.target.clone(),
                reason,
                detail: svid.to_string(),
            },
            None => ForwardError::Handshake {
                target: self.target.clone(),
                reason,
                detail: tls.to_string(),
            },
        }
    }

    /// TCP + mTLS. The verifier checks the chain and the expected identity inside the handshake;
    /// a resumed session skipped it, so its stored chain is checked again here, and if that
    /// fails the sessions are forgotten and a full handshake is made instead. Returns the
    /// stream, whether it resumed, and how long the (last) TLS handshake took.
    async fn handshake(
        &self,
        tls: &TlsClient,
    ) -> Result<(TlsStream<TcpStream>, bool, Duration), ForwardError> {
        if let Some(store) = &self.svid {
            if !mtls::wait_for_svid(store, self.connect_timeout).await {
                return Err(ForwardError::NoSvid {
                    target: self.target.clone(),
                    waited: self.connect_timeout,
                });
            }
        }
        let mut attempts = 0;
        loop {
            attempts += 1;
            let tcp = self.tcp().await?;
            let started = Instant::now();
            let stream = match tokio::time::timeout(
                self.connect_timeout,
                tls.connector.connect(self.server_name.clone(), tcp),
            )
            .await
            {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => return Err(self.tls_failure(&e)),
                Err(_) => {
                    self.handshake_failed("timeout");
                    return Err(ForwardError::Handshake {
                        target: self.target.clone(),
                        reason: "timeout",
                        detail: format!(
                            "no answer within {}",
                            humantime::format_duration(self.connect_timeout)
                        ),
                    });
                }
            };
            let conn = stream.get_ref().1;
            let resumed = mtls::is_resumed(conn.handshake_kind());
            if resumed {
                let checked = mtls::recheck_resumed_server(
                    conn.peer_certificates(),
                    &self.bundle,
                    &self.expected,
                    SystemTime::now(),
                );
                if let Err(e) = checked {
                    self.handshake_failed(e.reason());
                    tracing::info!(target = %self.target, error = %e, "resumed session no longer verifies; full handshake");
                    mtls::forget_sessions(&tls.sessions, &self.server_name);
                    if attempts < 2 {
                        continue;
                    }
                    return Err(ForwardError::Handshake {
                        target: self.target.clone(),
                        reason: e.reason(),
                        detail: e.to_string(),
                    });
                }
            }
            return Ok((stream, resumed, started.elapsed()));
        }
    }

    fn connected(&self, handshake_took: Duration, group: &'static str) {
        self.metrics.handshake_ok(Direction::Outbound, group);
        self.metrics
            .handshake_duration(Direction::Outbound, handshake_took);
        self.metrics.upstream_connections.inc();
    }

    /// A raw mTLS stream (TCP upstreams).
    pub async fn connect_stream(
        &self,
        tls: &TlsClient,
    ) -> Result<TlsStream<TcpStream>, ForwardError> {
        let (stream, _, took) = self.handshake(tls).await?;
        self.connected(took, negotiated_group(stream.get_ref().1));
        Ok(stream)
    }

    /// An mTLS stream for HTTP. With `h2` negotiated, waits for the server's first bytes: in
    /// TLS 1.3 the client finishes before the server has checked the client certificate, so a
    /// refusal (our SVID, or a resumed session the server no longer accepts) only shows as an
    /// alert or a close on the first read.
    pub(crate) async fn connect_http(&self, tls: &TlsClient) -> Result<PeerIo, ForwardError> {
        let mut attempts = 0;
        loop {
            attempts += 1;
            let (mut stream, resumed, took) = self.handshake(tls).await?;
            if stream.get_ref().1.alpn_protocol() != Some(mtls::ALPN_H2) {
                self.connected(took, negotiated_group(stream.get_ref().1));
                return Ok(PeerIo::Http1(stream));
            }
            let mut first = vec![0u8; 1024];
            let wait = self.connect_timeout.min(SERVER_PREFACE_WAIT);
            let refused = match tokio::time::timeout(wait, stream.read(&mut first)).await {
                // A server that waits for our preface before it speaks: go ahead unchecked.
                Err(_) => {
                    first.clear();
                    None
                }
                Ok(Ok(0)) => Some(None),
                Ok(Ok(n)) => {
                    first.truncate(n);
                    None
                }
                Ok(Err(e)) => Some(Some(e)),
            };
            let Some(err) = refused else {
                self.connected(took, negotiated_group(stream.get_ref().1));
                return Ok(PeerIo::H2(Prefixed::new(first, stream)));
            };
            if resumed && attempts < 2 {
                // Most likely our certificate in that session expired or our CA left the
                // peer's bundle; a full handshake presents the current SVID.
                self.handshake_failed("resumption_refused");
                mtls::forget_sessions(&tls.sessions, &self.server_name);
                continue;
            }
            return Err(match err {
                Some(e) if tls_error(&e).is_some() => self.tls_failure(&e),
                other => {
                    self.handshake_failed("closed");
                    ForwardError::Handshake {
                        target: self.target.clone(),
                        reason: "closed",
                        detail: match other {
                            Some(e) => format!("peer closed the connection after the handshake: {e}"),
                            None => "peer closed the connection after the handshake (does it trust our SVID?)".into(),
                        },
                    }
                }
            });
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn refused_connect_fails_at_once_and_an_answered_one_connects() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let open = listener.local_addr().unwrap();
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let started = Instant::now();
        let err = connect_tcp(TcpTarget::Addr(closed), Duration::from_secs(5))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused, "{err}");
        // Only silence is retried: a refusal is not waited out to the next attempt.
        assert!(started.elapsed() < CONNECT_RETRY, "{:?}", started.elapsed());
        let tcp = connect_tcp(TcpTarget::Addr(open), Duration::from_secs(5))
            .await
            .unwrap();
        assert!(tcp.nodelay().unwrap());
        DeadPeer {
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(5),
        }
        .apply(&tcp);
        let sock = socket2::SockRef::from(&tcp);
        assert_eq!(
            sock.tcp_user_timeout().unwrap(),
            Some(Duration::from_secs(10))
        );
        assert!(sock.keepalive().unwrap());
    }

    #[test]
    fn peer_target_rejects_address_without_host() {
        let ca = trellis_identity::testca::TestCa::root("example.org");
        let id = SpiffeId::parse("spiffe://example.org/b").unwrap();
        let m = Arc::new(SidecarMetrics::new());
        let bad = PeerTarget::new(
            "b",
            ":15443",
            id.clone(),
            ca.shared_bundle(),
            m.clone(),
            Duration::from_secs(1),
        );
        assert!(bad.is_err());
        for ok in ["10.0.0.7:15443", "[::1]:15443", "peer.example.org:15443"] {
            PeerTarget::new(
                "b",
                ok,
                id.clone(),
                ca.shared_bundle(),
                m.clone(),
                Duration::from_secs(1),
            )
            .unwrap();
        }
    }
}
