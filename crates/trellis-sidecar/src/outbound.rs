//! Outbound: the local app → plain HTTP on 127.0.0.1 → this sidecar → HTTP/2 over mTLS → the
//! upstream's sidecar.
//!
//! The app speaks HTTP/1.1 or h2c (prior knowledge) to the shared listener (routed by `Host`,
//! port stripped, case-insensitive) or to an upstream's dedicated `listen` port. Each HTTP
//! upstream has one [`PeerPool`]: one pooled HTTP/2 connection, every request multiplexed on it.
//! `protocol: tcp` upstreams are spliced byte for byte ([`crate::tcp`]).
//!
//! What the app sees when it goes wrong, each with a one-line `text/plain` body saying why:
//! `404` unknown host, `503` upstream unreachable, `502` handshake or identity failure (naming
//! the expected and presented SPIFFE IDs), `504` no response headers within `request_timeout`.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::{self, HeaderValue};
use http::uri::{Authority, Scheme};
use http::{Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

use trellis_serve::drain::{self, Drain};
use trellis_serve::graceful::serve_until_drained;
use trellis_serve::{accept, IdleClock, Tracked};

use crate::config::{Protocol, SidecarSettings};
use crate::h1_framing::{malformed_body_response, RequestFraming};
use crate::headers::{check_host, host_without_port, strip_hop_by_hop};
use crate::http_util::{text_response, uri_too_long, AccessEntry, ConnDrain, ProxyBody};
use crate::listen;
use crate::metrics::{Direction, Listener, SidecarMetrics};
use crate::mtls;
use crate::pool::{self, ForwardError, PeerPool, PeerTarget, TlsClient};
use crate::svid_store::SvidStore;
use crate::tcp::{self, OutboundTcp};

/// Name of the shared, Host-routed listener in [`OutboundProxy::local_addrs`].
pub const SHARED_LISTENER: &str = "shared";

struct HttpUpstream {
    /// The configured name, as access-log lines name it.
    name: Box<str>,
    pool: PeerPool,
    /// The configured host names as authorities, so the common `Host: billing` costs no parse.
    authorities: Vec<Authority>,
    /// Used when the request carries no usable host at all.
    fallback_authority: Authority,
}

impl HttpUpstream {
    /// The `:authority` to send: the app's own (absolute-form or h2c), else its `Host`.
    fn authority(&self, uri_authority: Option<Authority>, host: Option<&HeaderValue>) -> Authority {
        if let Some(a) = uri_authority {
            return a;
        }
        let Some(host) = host else {
            return self.fallback_authority.clone();
        };
        let bytes = host.as_bytes();
        if let Some(known) = self
            .authorities
            .iter()
            .find(|a| a.as_str().as_bytes() == bytes)
        {
            return known.clone();
        }
        Authority::try_from(bytes).unwrap_or_else(|_| self.fallback_authority.clone())
    }
}

/// Host → upstream index. A short list is scanned (cheaper than hashing the host with SipHash
/// on every request); a long one is hashed.
enum Routes {
    Few(Vec<(Box<str>, usize)>),
    Many(HashMap<Box<str>, usize>),
}

impl Routes {
    const SCAN_UP_TO: usize = 16;

    fn new(routes: HashMap<Box<str>, usize>) -> Self {
        if routes.len() <= Self::SCAN_UP_TO {
            Routes::Few(routes.into_iter().collect())
        } else {
            Routes::Many(routes)
        }
    }

    fn get(&self, host: &str) -> Option<usize> {
        match self {
            Routes::Few(list) => list.iter().find(|(h, _)| &**h == host).map(|(_, i)| *i),
            Routes::Many(map) => map.get(host).copied(),
        }
    }
}

#[derive(Clone, Copy)]
enum Route {
    ByHost,
    Fixed(usize),
}

struct Outbound {
    upstreams: Vec<HttpUpstream>,
    routes: Routes,
    /// `a, b, c` for 404 bodies.
    known_hosts: String,
    metrics: Arc<SidecarMetrics>,
    /// Our identity: the caller in access-log lines.
    store: Arc<SvidStore>,
    access_log: bool,
    request_timeout: Duration,
    max_uri_bytes: usize,
    max_header_bytes: usize,
    header_read_timeout: Duration,
    idle_timeout: Duration,
    /// Per listener.
    max_connections: usize,
    server: auto::Builder<TokioExecutor>,
}

/// The outbound listeners: shared (Host-routed) and per-upstream dedicated ones.
pub struct OutboundProxy {
    shared_listener: TcpListener,
    dedicated: Vec<(String, TcpListener, usize)>,
    tcp: Vec<(String, OutboundTcp)>,
    shared: Arc<Outbound>,
}

impl OutboundProxy {
    /// Binds `settings.outbound_listen` and every upstream's dedicated `listen`, and builds one
    /// TLS client config per upstream (the expected identity is part of its verifier).
    pub async fn bind(
        settings: &SidecarSettings,
        store: Arc<SvidStore>,
        metrics: Arc<SidecarMetrics>,
    ) -> std::io::Result<Self> {
        let mut upstreams = Vec::new();
        let mut routes = HashMap::new();
        let mut dedicated = Vec::new();
        let mut tcp = Vec::new();
        for u in &settings.upstreams {
            let peer = PeerTarget::new(
                &u.name,
                &u.address,
                u.identity.clone(),
                store.bundle(),
                metrics.clone(),
                settings.connect_timeout,
            )?
            .wait_for_svid(Arc::clone(&store));
            match u.protocol {
                Protocol::Http => {
                    let (config, sessions) = mtls::client_config(
                        &store,
                        &u.identity,
                        settings.tls_policy,
                        mtls::ALPN_HTTP,
                    )?;
                    let (config1, sessions1) = mtls::client_config(
                        &store,
                        &u.identity,
                        settings.tls_policy,
                        &[mtls::ALPN_HTTP11],
                    )?;
                    let index = upstreams.len();
                    let authorities: Vec<Authority> = u
                        .hosts
                        .iter()
                        .filter_map(|h| Authority::try_from(h.as_str()).ok())
                        .collect();
                    let fallback_authority = authorities
                        .first()
                        .cloned()
                        .or_else(|| Authority::try_from(u.name.as_str()).ok())
                        .unwrap_or_else(|| Authority::from_static("localhost"));
                    upstreams.push(HttpUpstream {
                        name: u.name.clone().into_boxed_str(),
                        pool: PeerPool::new(
                            peer,
                            TlsClient::new(config, sessions),
                            TlsClient::new(config1, sessions1),
                            &settings.limits,
                        ),
                        authorities,
                        fallback_authority,
                    });
                    for host in &u.hosts {
                        routes.insert(host.to_ascii_lowercase().into_boxed_str(), index);
                    }
                    if let Some(listen) = u.listen {
                        dedicated.push((u.name.clone(), bind(listen, &u.name).await?, index));
                    }
                }
                Protocol::Tcp => {
                    let (config, sessions) = mtls::client_config(
                        &store,
                        &u.identity,
                        settings.tls_policy,
                        mtls::ALPN_NONE,
                    )?;
                    let listen = u.listen.ok_or_else(|| {
                        std::io::Error::new(
                            std::io::ErrorKind::InvalidInput,
                            format!(
                                "upstream `{}`: protocol tcp needs a dedicated `listen` port",
                                u.name
                            ),
                        )
                    })?;
                    tcp.push((
                        u.name.clone(),
                        OutboundTcp {
                            listener: bind(listen, &u.name).await?,
                            peer: Arc::new(peer),
                            tls: TlsClient::new(config, sessions),
                        },
                    ));
                }
            }
        }
        let mut hosts: Vec<&str> = routes.keys().map(|h| &**h).collect();
        hosts.sort_unstable();
        let known_hosts = if hosts.is_empty() {
            "(none)".to_owned()
        } else {
            hosts.join(", ")
        };
        let shared_listener = bind(settings.outbound_listen, SHARED_LISTENER).await?;
        let limits = &settings.limits;
        let mut server = auto::Builder::new(TokioExecutor::new());
        // hyper-util's auto builder has no `max_header_size`: the read buffer's bound is the
        // header section's (hyper answers 431 when a head does not fit; bodies stream through
        // the buffer whatever its size).
        server
            .http1()
            .timer(TokioTimer::new())
            .keep_alive(true)
            .max_headers(limits.http.max_headers)
            .max_buf_size(limits.http.max_header_bytes)
            // `RequestFraming` times request heads from their first byte; hyper's timer would
            // also run while a keep-alive connection waits for its next request (and, with a
            // timer set, defaults to 30 s).
            .header_read_timeout(None);
        server
            .http2()
            .timer(TokioTimer::new())
            .initial_stream_window_size(pool::H2_STREAM_WINDOW)
            .initial_connection_window_size(pool::H2_CONNECTION_WINDOW)
            .max_send_buf_size(pool::H2_MAX_SEND_BUF)
            .max_concurrent_streams(limits.h2.max_concurrent_streams)
            .max_header_list_size(limits.h2.max_header_list_bytes)
            // hyper has no `max_concurrent_reset_streams`: h2's default (50) applies here.
            .max_pending_accept_reset_streams(limits.h2.max_pending_accept_reset_streams)
            .max_local_error_reset_streams(limits.h2.max_local_error_reset_streams);
        Ok(Self {
            shared_listener,
            dedicated,
            tcp,
            shared: Arc::new(Outbound {
                upstreams,
                routes: Routes::new(routes),
                known_hosts,
                metrics,
                store,
                access_log: settings.access_log,
                request_timeout: settings.request_timeout,
                max_uri_bytes: limits.http.max_uri_bytes,
                max_header_bytes: limits.http.max_header_bytes,
                header_read_timeout: limits.http.header_read_timeout,
                idle_timeout: limits.http.idle_timeout,
                max_connections: limits.outbound.max_connections,
                server,
            }),
        })
    }

    /// `("shared", addr)` first, then `(upstream name, addr)` for each dedicated listener
    /// (HTTP ones, then TCP ones).
    pub fn local_addrs(&self) -> Vec<(String, SocketAddr)> {
        let mut addrs = Vec::with_capacity(1 + self.dedicated.len() + self.tcp.len());
        if let Ok(a) = self.shared_listener.local_addr() {
            addrs.push((SHARED_LISTENER.to_owned(), a));
        }
        for (name, listener, _) in &self.dedicated {
            if let Ok(a) = listener.local_addr() {
                addrs.push((name.clone(), a));
            }
        }
        for (name, upstream) in &self.tcp {
            if let Ok(a) = upstream.listener.local_addr() {
                addrs.push((name.clone(), a));
            }
        }
        addrs
    }

    /// Accepts on every listener until `drain` signals. App connections are told to wind down
    /// (`Connection: close` on their in-flight response, GOAWAY for h2c) only once every
    /// listener is closed, so an app that reconnects is refused at once rather than reset from
    /// the backlog of a closing listener; they finish their in-flight requests. `drain` is held
    /// until every connection is done.
    pub async fn run(self, drain: Drain) {
        let OutboundProxy {
            shared_listener,
            dedicated,
            tcp,
            shared,
        } = self;
        let (connections_signal, connections) = drain::channel();
        let mut listeners = tokio::task::JoinSet::new();
        for (_, listener, index) in dedicated {
            listeners.spawn(serve_http(
                listener,
                shared.clone(),
                Route::Fixed(index),
                drain.clone(),
                connections.clone(),
            ));
        }
        let mut forwards = tokio::task::JoinSet::new();
        for (_, upstream) in tcp {
            let (shared, drain) = (shared.clone(), drain.clone());
            forwards.spawn(async move {
                tcp::run_outbound_tcp(upstream, shared.max_connections, &shared.metrics, drain)
                    .await;
            });
        }
        serve_http(
            shared_listener,
            shared,
            Route::ByHost,
            drain.clone(),
            connections,
        )
        .await;
        while listeners.join_next().await.is_some() {}
        connections_signal.drain_all().await;
        while forwards.join_next().await.is_some() {}
    }
}

async fn bind(addr: SocketAddr, what: &str) -> std::io::Result<TcpListener> {
    trellis_serve::bind(addr).await.map_err(|e| {
        std::io::Error::new(e.source.kind(), format!("outbound listener `{what}`: {e}"))
    })
}

/// Accepts on `listener` until `listen` signals (the listener closes when this returns); each
/// app connection holds `connections` and winds down when it signals.
async fn serve_http(
    listener: TcpListener,
    shared: Arc<Outbound>,
    route: Route,
    listen: Drain,
    connections: Drain,
) {
    let events = listen::events(&shared.metrics, Listener::Outbound);
    let listener = accept::Listener::new(listener, "outbound", shared.max_connections, events);
    listener
        .serve(&listen, |conn| {
            let (shared, drain) = (shared.clone(), connections.clone());
            async move {
                let app_addr = conn.peer();
                let tcp = conn.into_tcp();
                let state = Arc::new(ConnDrain::default());
                let service = {
                    let (shared, state) = (shared.clone(), state.clone());
                    hyper::service::service_fn(move |req: Request<Incoming>| {
                        // HTTP/1.x requests are numbered for the framing guard's report; h2c
                        // streams are not (the guard stops at the HTTP/2 preface).
                        let seq = if req.version() == Version::HTTP_2 {
                            0
                        } else {
                            state.framing.next_request()
                        };
                        handle(shared.clone(), state.clone(), route, seq, req)
                    })
                };
                let clock = IdleClock::new();
                let io = TokioIo::new(RequestFraming::new(
                    Tracked::new(tcp, Arc::clone(&clock)),
                    Arc::clone(&state),
                    shared.header_read_timeout,
                    shared.max_header_bytes,
                ));
                let conn = shared.server.serve_connection(io, service);
                if let Err(e) =
                    serve_until_drained(conn, drain, &state.drain, &clock, shared.idle_timeout)
                        .await
                {
                    tracing::debug!(%app_addr, error = %e, "app connection ended with an error");
                }
            }
        })
        .await;
}

/// One app request (`seq`: its number on an HTTP/1.x connection, else 0): forwarded, counted,
/// timed (head received to response head ready) and, with the access log on, logged. A request
/// whose framing the guard refused is answered `400` and not forwarded; one whose chunked body
/// turned out malformed while it was forwarded is answered `400` too (the client's fault, not
/// the upstream's `502`).
async fn handle(
    shared: Arc<Outbound>,
    conn: Arc<ConnDrain>,
    route: Route,
    seq: u64,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    let started = Instant::now();
    let version = req.version();
    // The one cost of the access log when it is off is this branch.
    let logged = shared
        .access_log
        .then(|| (req.method().clone(), req.uri().path_and_query().cloned()));
    let (mut response, upstream) = match conn.framing.refusal(seq) {
        Some(refused) => {
            let reason = if conn.framing.conflicting_lengths(seq) {
                "conflicting_lengths"
            } else {
                "malformed_body"
            };
            shared.metrics.request_refused(Direction::Outbound, reason);
            (refused, None)
        }
        None => {
            let (response, upstream) = shared.forward(route, req).await;
            match conn.framing.malformed_body(seq) {
                Some(why) => {
                    shared
                        .metrics
                        .request_refused(Direction::Outbound, "malformed_body");
                    (malformed_body_response(why), upstream)
                }
                None => (response, upstream),
            }
        }
    };
    *response.version_mut() = version;
    conn.on_response(version, response.headers_mut());
    let took = started.elapsed();
    shared
        .metrics
        .request(Direction::Outbound, response.status().as_u16(), took);
    if let Some((method, path)) = logged {
        let svid = shared.store.current();
        AccessEntry {
            caller: svid.as_deref().map(|s| s.spiffe_id().as_str()),
            direction: Direction::Outbound,
            method: &method,
            path: path.as_ref().map_or("/", http::uri::PathAndQuery::path),
            status: response.status(),
            took,
            upstream: upstream
                .and_then(|i| shared.upstreams.get(i))
                .map(|u| &*u.name),
            raw_path: None,
            rule: None,
            decision: None,
            policy: None,
        }
        .emit();
    }
    Ok(response)
}

impl Outbound {
    fn lookup(&self, host: &str) -> Option<usize> {
        // Host names are case-insensitive (RFC 9110 4.2.3); the table holds lowercase ones.
        if host.bytes().any(|b| b.is_ascii_uppercase()) {
            self.routes.get(&host.to_ascii_lowercase())
        } else {
            self.routes.get(host)
        }
    }

    fn not_found(&self, host: Option<&str>) -> Response<ProxyBody> {
        let message = match host {
            Some(host) => format!(
                "no upstream for host `{host}`; known hosts: {}",
                self.known_hosts
            ),
            None => format!(
                "request has no Host header; known hosts: {}",
                self.known_hosts
            ),
        };
        text_response(StatusCode::NOT_FOUND, &message)
    }

    /// The peer's answer, or the sidecar's own; and which upstream was chosen, if any.
    async fn forward(
        &self,
        route: Route,
        req: Request<Incoming>,
    ) -> (Response<ProxyBody>, Option<usize>) {
        let (parts, body) = req.into_parts();
        if let Some(response) = uri_too_long(&parts.uri, parts.version, self.max_uri_bytes) {
            self.metrics
                .request_refused(Direction::Outbound, "uri_too_long");
            return (response, None);
        }
        // Route by one host or refuse: two Hosts, or an h2c `host` that disagrees with
        // `:authority`, would let the app's stack and this sidecar pick different services.
        if let Err(fault) = check_host(&parts) {
            self.metrics
                .request_refused(Direction::Outbound, fault.reason());
            let mut response = text_response(StatusCode::BAD_REQUEST, fault.message());
            if parts.version != Version::HTTP_2 {
                response
                    .headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            return (response, None);
        }
        let index = match route {
            Route::Fixed(index) => index,
            Route::ByHost => {
                // Absolute-form (or h2c :authority) wins over Host (RFC 9112 3.2.2).
                let host = match parts.uri.authority() {
                    Some(a) => Some(a.as_str()),
                    None => parts
                        .headers
                        .get(header::HOST)
                        .and_then(|h| h.to_str().ok()),
                };
                let Some(host) = host.map(host_without_port) else {
                    return (self.not_found(None), None);
                };
                match self.lookup(host) {
                    Some(index) => index,
                    None => return (self.not_found(Some(host)), None),
                }
            }
        };
        let Some(upstream) = self.upstreams.get(index) else {
            return (self.not_found(None), None);
        };
        (self.forward_to(upstream, parts, body).await, Some(index))
    }

    async fn forward_to(
        &self,
        upstream: &HttpUpstream,
        mut parts: http::request::Parts,
        body: Incoming,
    ) -> Response<ProxyBody> {
        let uri = std::mem::take(&mut parts.uri).into_parts();
        let authority = upstream.authority(uri.authority, parts.headers.get(header::HOST));
        // The authority is the request's one host from here on: `:authority` on HTTP/2 to the
        // peer, and the `Host` the HTTP/1.1 fallback writes from it.
        parts.headers.remove(header::HOST);
        let mut target = http::uri::Parts::default();
        target.scheme = Some(Scheme::HTTP);
        target.authority = Some(authority);
        target.path_and_query = Some(
            uri.path_and_query
                .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")),
        );
        parts.uri = match Uri::from_parts(target) {
            Ok(uri) => uri,
            Err(e) => {
                return text_response(
                    StatusCode::BAD_REQUEST,
                    &format!("cannot forward this request target: {e}"),
                )
            }
        };
        strip_hop_by_hop(&mut parts.headers);
        let req = Request::from_parts(parts, body);
        match tokio::time::timeout(self.request_timeout, upstream.pool.send(req)).await {
            Ok(Ok(mut response)) => {
                strip_hop_by_hop(response.headers_mut());
                response
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "outbound request failed");
                text_response(e.status(), &e.to_string())
            }
            Err(_) => {
                let e = ForwardError::Timeout {
                    target: upstream.pool.target().clone(),
                    timeout: self.request_timeout,
                };
                text_response(e.status(), &e.to_string())
            }
        }
    }
}
