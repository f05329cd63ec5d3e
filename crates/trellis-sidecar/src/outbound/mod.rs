//! Outbound: the local app → plain HTTP on 127.0.0.1 → this sidecar → HTTP/2 over mTLS → the
//! upstream's sidecar.
//!
//! The app speaks HTTP/1.1 or h2c (prior knowledge) to the shared listener (routed by `Host`,
//! port stripped, case-insensitive) or to an upstream's dedicated `listen` port. Each HTTP
//! upstream has one [`PeerPool`]: one pooled HTTP/2 connection, every request multiplexed on it.
//! `protocol: tcp` upstreams are spliced byte for byte ([`crate::tcp`]).
//!
//! A host no upstream lists may still match `outbound.default_route` ([`default_route`]): its
//! peer and that peer's identity come from templates. A listed upstream always wins.
//!
//! What the app sees when it goes wrong, each with a one-line `text/plain` body saying why:
//! `404` unknown host (naming the known hosts and the default route's host templates), `503`
//! upstream unreachable, its name unresolvable, or its connection stopped answering PINGs,
//! `502` handshake or identity failure (naming the expected and presented SPIFFE IDs), `504` no
//! response headers within `request_timeout`.

mod default_route;
mod peer_pool;
mod routes;
pub(crate) mod tcp;

use self::default_route::{DefaultRoutes, PeerSettings};
use self::peer_pool::PeerPool;
use self::routes::{HttpUpstream, Route, Routes};
use self::tcp::{run_outbound_tcp, OutboundTcp};
use crate::access_log::AccessEntry;
use crate::body::ProxyBody;
use crate::config::{Protocol, SidecarSettings};
use crate::conn_state::ConnDrain;
use crate::dial::{DeadPeer, PeerTarget, TlsClient};
use crate::forward_error::ForwardError;
use crate::grpc;
use crate::h1_framing::{malformed_body_response, RequestFraming};
use crate::headers::{check_host, host_without_port, strip_hop_by_hop};
use crate::metrics::{Direction, Listener, RouteCounters, SidecarMetrics};
use crate::resolve::Resolver;
use crate::responses::{text_response, uri_too_long};
use crate::svid_store::SvidStore;
use crate::upgrade::{self, restore_upgrade, upgrade_ask, upgrade_refused, UpgradeAsk};
use crate::{listen, mtls};
use http::header::{self, HeaderValue};
use http::uri::{Authority, Scheme};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use trellis_serve::drain::{self, Drain};
use trellis_serve::graceful::serve_until_drained;
use trellis_serve::{accept, IdleClock, Tracked, Workers};

/// Name of the shared, Host-routed listener in [`OutboundProxy::local_addrs`].
pub const SHARED_LISTENER: &str = "shared";

struct Outbound {
    upstreams: Vec<Arc<HttpUpstream>>,
    routes: Routes,
    /// `a, b, c` for 404 bodies.
    known_hosts: String,
    /// Hosts no upstream lists, by convention.
    default_route: Option<DefaultRoutes>,
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
    /// Where the listeners' connections are served.
    workers: Workers,
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
        let max_names =
            settings.upstreams.len() + settings.default_route.as_ref().map_or(0, |d| d.max_peers);
        let resolver = Arc::new(Resolver::new(settings.resolve_ttl, max_names));
        for u in &settings.upstreams {
            let peer = PeerTarget::new(
                &u.name,
                &u.address,
                u.identity.clone(),
                store.bundle(),
                metrics.clone(),
                settings.connect_timeout,
            )?
            .resolver(resolver.clone())
            .wait_for_svid(Arc::clone(&store))
            .dead_peer(DeadPeer {
                interval: settings.limits.h2.keepalive_interval,
                timeout: settings.limits.h2.keepalive_timeout,
            });
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
                    upstreams.push(Arc::new(HttpUpstream {
                        name: u.name.clone().into_boxed_str(),
                        identity: u.identity.as_str().into(),
                        counters: Arc::new(RouteCounters::new(&u.name, u.identity.as_str())),
                        pool: PeerPool::new(
                            peer,
                            TlsClient::new(config, sessions),
                            TlsClient::new(config1, sessions1),
                            &settings.limits,
                            settings.workers.count(),
                        ),
                        authorities,
                        fallback_authority,
                    }));
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
        let default_route = settings.default_route.clone().map(|route| {
            DefaultRoutes::new(
                route,
                settings.trust_domain.as_str(),
                PeerSettings {
                    store: Arc::clone(&store),
                    metrics: Arc::clone(&metrics),
                    resolver,
                    tls_policy: settings.tls_policy,
                    connect_timeout: settings.connect_timeout,
                    limits: settings.limits,
                    workers: settings.workers.count(),
                },
            )
        });
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
            .initial_stream_window_size(mtls::H2_STREAM_WINDOW)
            .initial_connection_window_size(mtls::H2_CONNECTION_WINDOW)
            .max_send_buf_size(mtls::H2_MAX_SEND_BUF)
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
                default_route,
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
                workers: settings.workers.clone(),
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
                run_outbound_tcp(
                    upstream,
                    shared.max_connections,
                    &shared.metrics,
                    shared.workers.clone(),
                    drain,
                )
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
    let listener = accept::Listener::new(listener, "outbound", shared.max_connections, events)
        .with_workers(shared.workers.clone());
    listener
        .serve(&listen, |conn| {
            let (shared, drain) = (shared.clone(), connections.clone());
            async move {
                let app_addr = conn.peer();
                let tcp = match conn.into_tcp() {
                    Ok(tcp) => tcp,
                    Err(e) => {
                        tracing::warn!(%app_addr, error = %e, "cannot serve the app connection");
                        return;
                    }
                };
                let state = Arc::new(ConnDrain::default());
                let service = {
                    let (shared, state, drain) = (shared.clone(), state.clone(), drain.clone());
                    hyper::service::service_fn(move |req: Request<Incoming>| {
                        // HTTP/1.x requests are numbered for the framing guard's report; h2c
                        // streams are not (the guard stops at the HTTP/2 preface).
                        let seq = if req.version() == Version::HTTP_2 {
                            0
                        } else {
                            state.framing.next_request()
                        };
                        handle(
                            shared.clone(),
                            state.clone(),
                            route,
                            seq,
                            req,
                            drain.clone(),
                        )
                    })
                };
                let clock = IdleClock::new();
                let io = TokioIo::new(RequestFraming::new(
                    Tracked::new(tcp, Arc::clone(&clock)),
                    Arc::clone(&state),
                    shared.header_read_timeout,
                    shared.max_header_bytes,
                ));
                let conn = shared.server.serve_connection_with_upgrades(io, service);
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
    drain: Drain,
) -> Result<Response<ProxyBody>, Infallible> {
    let started = Instant::now();
    let version = req.version();
    let grpc = grpc::is_grpc(version, req.headers());
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
            let (response, upstream) = shared.forward(route, req, &conn, drain).await;
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
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        conn.on_response(version, response.headers_mut());
    }
    let took = started.elapsed();
    shared
        .metrics
        .request(Direction::Outbound, response.status().as_u16(), took);
    if let Some(u) = &upstream {
        u.counters
            .record(&shared.metrics, response.status().as_u16());
    }
    if let Some((method, path)) = logged {
        let svid = shared.store.current();
        AccessEntry {
            caller: svid.as_deref().map(|s| s.spiffe_id().as_str()),
            direction: Direction::Outbound,
            method: &method,
            path: path.as_ref().map_or("/", http::uri::PathAndQuery::path),
            status: response.status(),
            took,
            upstream: upstream.as_ref().map(|u| &*u.name),
            identity: upstream.as_ref().map(|u| &*u.identity),
            raw_path: None,
            rule: None,
            decision: None,
            policy: None,
        }
        .emit();
    }
    if grpc {
        response = grpc::into_grpc(response);
    }
    Ok(response)
}

impl Outbound {
    fn not_found(&self, host: Option<&str>) -> Response<ProxyBody> {
        let mut message = match host {
            Some(host) => format!(
                "no upstream for host `{host}`; known hosts: {}",
                self.known_hosts
            ),
            None => format!(
                "request has no Host header; known hosts: {}",
                self.known_hosts
            ),
        };
        if let Some(d) = &self.default_route {
            message.push_str("; default_route hosts: ");
            message.push_str(d.hosts_list());
        }
        text_response(StatusCode::NOT_FOUND, &message)
    }

    /// The listed upstream for `host`, else the default route's peer for it; else the answer
    /// the app gets.
    fn route_host(&self, host: &str) -> Result<Arc<HttpUpstream>, NoRoute> {
        // Host names are case-insensitive (RFC 9110 4.2.3); the tables hold lowercase ones.
        // Lowercased once, and only when it has to be.
        let host: std::borrow::Cow<'_, str> = if host.bytes().any(|b| b.is_ascii_uppercase()) {
            host.to_ascii_lowercase().into()
        } else {
            host.into()
        };
        if let Some(u) = self.routes.get(&host).and_then(|i| self.upstreams.get(i)) {
            return Ok(u.clone());
        }
        let Some(d) = &self.default_route else {
            return Err(NoRoute::Unknown);
        };
        match d.peer(&host) {
            Some(Ok(u)) => Ok(u),
            Some(Err(e)) => Err(NoRoute::Broken(e)),
            None => Err(NoRoute::Unknown),
        }
    }

    /// The peer's answer, or the sidecar's own; and which upstream was chosen, if any.
    async fn forward(
        &self,
        route: Route,
        req: Request<Incoming>,
        conn: &ConnDrain,
        drain: Drain,
    ) -> (Response<ProxyBody>, Option<Arc<HttpUpstream>>) {
        let (parts, body) = req.into_parts();
        if parts.method == Method::CONNECT {
            self.metrics.request_refused(Direction::Outbound, "connect");
            return (connect_refused(), None);
        }
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
        let upstream = match route {
            Route::Fixed(index) => match self.upstreams.get(index) {
                Some(u) => u.clone(),
                None => return (self.not_found(None), None),
            },
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
                match self.route_host(host) {
                    Ok(u) => u,
                    Err(NoRoute::Unknown) => return (self.not_found(Some(host)), None),
                    Err(NoRoute::Broken(e)) => {
                        return (text_response(StatusCode::BAD_GATEWAY, &e), None)
                    }
                }
            }
        };
        let websocket = match upgrade_ask(&parts) {
            UpgradeAsk::None => None,
            UpgradeAsk::WebSocket(upgrade) => Some(upgrade),
            UpgradeAsk::Other(protocol) => {
                self.metrics.request_refused(Direction::Outbound, "upgrade");
                return (upgrade_refused(&protocol), Some(upstream));
            }
        };
        let response = match websocket {
            Some(upgrade) => {
                self.websocket_to(&upstream, parts, body, upgrade, conn, drain)
                    .await
            }
            None => self.forward_to(&upstream, parts, body).await,
        };
        (response, Some(upstream))
    }

    /// A WebSocket upgrade: on its own mTLS connection to the peer; after the peer's `101`,
    /// this connection's bytes are spliced to it ([`crate::upgrade`]).
    async fn websocket_to(
        &self,
        upstream: &HttpUpstream,
        mut parts: http::request::Parts,
        body: Incoming,
        upgrade: HeaderValue,
        conn: &ConnDrain,
        drain: Drain,
    ) -> Response<ProxyBody> {
        let Some(on_upgrade) = parts.extensions.remove::<OnUpgrade>() else {
            return text_response(
                StatusCode::BAD_REQUEST,
                "this connection cannot be upgraded",
            );
        };
        if let Err(e) = to_peer_target(upstream, &mut parts) {
            return text_response(
                StatusCode::BAD_REQUEST,
                &format!("cannot forward this request target: {e}"),
            );
        }
        strip_hop_by_hop(&mut parts.headers);
        restore_upgrade(&mut parts.headers, upgrade);
        let req = Request::from_parts(parts, body);
        match tokio::time::timeout(self.request_timeout, upstream.pool.upgrade(req)).await {
            Ok(Ok(switch)) => upgrade::answer(
                switch,
                on_upgrade,
                &conn.framing,
                drain,
                self.idle_timeout,
                "outbound",
            ),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "WebSocket upgrade failed");
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

    async fn forward_to(
        &self,
        upstream: &HttpUpstream,
        mut parts: http::request::Parts,
        body: Incoming,
    ) -> Response<ProxyBody> {
        if let Err(e) = to_peer_target(upstream, &mut parts) {
            return text_response(
                StatusCode::BAD_REQUEST,
                &format!("cannot forward this request target: {e}"),
            );
        }
        // A gRPC call's own deadline, when shorter, bounds the wait; when it passes, the
        // request is dropped, which resets the stream to the peer and, from there, to its app.
        let timeout = match grpc::timeout(&parts.headers) {
            Some(deadline) if grpc::is_grpc(parts.version, &parts.headers) => {
                deadline.min(self.request_timeout)
            }
            _ => self.request_timeout,
        };
        strip_hop_by_hop(&mut parts.headers);
        let req = Request::from_parts(parts, body);
        match tokio::time::timeout(timeout, upstream.pool.send(req)).await {
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
                    timeout,
                };
                text_response(e.status(), &e.to_string())
            }
        }
    }
}

/// Why a host has no upstream.
enum NoRoute {
    /// No listed host and no default-route template matches: `404`.
    Unknown,
    /// A template matched but its peer cannot be set up (its expanded address or identity is
    /// unusable): `502` with this reason.
    Broken(String),
}

/// `405` for `CONNECT`: the sidecar carries plain `http://` requests and does the TLS itself,
/// so a tunnel (what `HTTPS_PROXY` clients ask for) would wrap the app's TLS inside mTLS and
/// hide every request from the policy.
fn connect_refused() -> Response<ProxyBody> {
    let mut response = text_response(
        StatusCode::METHOD_NOT_ALLOWED,
        "CONNECT is not supported: send plain http:// requests through this sidecar \
         (HTTP_PROXY, absolute-form or Host), not https:// through HTTPS_PROXY; the sidecar \
         adds mTLS itself",
    );
    response.headers_mut().insert(
        header::ALLOW,
        HeaderValue::from_static("GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"),
    );
    response
}

/// Points the request at the peer: `http://<authority><path>`, the authority being the app's
/// own (absolute-form or h2c) or its `Host`; `Host` itself is dropped (`:authority` on
/// HTTP/2, and the HTTP/1.1 path writes it back from the authority).
fn to_peer_target(
    upstream: &HttpUpstream,
    parts: &mut http::request::Parts,
) -> Result<(), http::uri::InvalidUriParts> {
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
    parts.uri = Uri::from_parts(target)?;
    Ok(())
}
