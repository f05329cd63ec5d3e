//! Inbound: peer sidecar → mTLS → this sidecar → plain HTTP/1.1 → the local app.
//!
//! Per connection: the TLS handshake verifies the caller's chain against the current bundle
//! (client certificate required), a resumed session is re-verified, and the caller's SPIFFE ID
//! and the `x-forwarded-client-cert` value are computed once. Per request: [`authorize`]
//! decides, hop-by-hop headers and any caller-supplied XFCC (in any spelling, see
//! [`crate::headers`]) are removed, ours is added, and the
//! request streams to the app over a pooled keep-alive connection.
//!
//! Also the raw TCP forwards (`inbound.tcp`): mTLS outside, plain TCP to the app.

mod app_h2;
mod app_pool;
mod authorize;
pub(crate) mod tcp;

use self::app_pool::AppPool;
use self::authorize::{authorize, Refusal};
use self::tcp::{run_inbound_forward, InboundForward, InboundTcpContext};
use crate::access_log::AccessEntry;
use crate::body::{BoxError, H2Body, ProxyBody, ReqBody};
use crate::config::{Limits, SidecarSettings};
use crate::conn_state::ConnDrain;
use crate::forward_error::ForwardError;
use crate::grpc;
use crate::h1_framing::{malformed_body_response, FramingReport, RequestFraming};
use crate::headers::{
    check_host, sanitize_for_app, set_host_from_authority, strip_hop_by_hop, UnderscoreHeaders,
    XFCC,
};
use crate::listen::{self, InboundTls};
use crate::metrics::{Direction, Listener, SidecarMetrics};
use crate::mtls::{self, SessionTicketer};
use crate::policy::{AccessDecision, ConnectionScope, PolicyEngine};
use crate::responses::{text_response, uri_too_long};
use crate::svid_store::SvidStore;
use crate::upgrade::{self, restore_upgrade, upgrade_ask, upgrade_refused, UpgradeAsk};
use bytes::Bytes;
use futures::stream::{FuturesUnordered, StreamExt};
use http::header::{self, HeaderValue};
use http::request::Parts;
use http::uri::PathAndQuery;
use http::{Request, Response, StatusCode, Uri, Version};
use hyper::body::{Body, Incoming};
use hyper::server::conn::http1;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::ProtocolVersion;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use trellis_identity::{leaf_sha256_hex, SpiffeId};
use trellis_serve::drain::{self, Drain};
use trellis_serve::graceful::{serve_until_drained, IDLE_GOAWAY_GRACE};
use trellis_serve::{accept, IdleClock, Tracked};

/// What is known about an authenticated caller, fixed for the connection's life.
#[derive(Debug)]
pub struct ConnInfo {
    /// The caller's SPIFFE ID, from its verified leaf (the same on a resumed session).
    pub peer_id: SpiffeId,
    /// The caller's address.
    pub peer_addr: SocketAddr,
    /// `x-forwarded-client-cert` as sent to the app:
    /// `By=<our id>;Hash=<sha256 hex of the caller's leaf DER>;URI=<caller id>`.
    pub xfcc: HeaderValue,
    /// Negotiated TLS version.
    pub tls_version: Option<ProtocolVersion>,
    /// True when the connection resumed an earlier session (and was re-verified).
    pub resumed: bool,
    /// True when the peer speaks HTTP/2 (ALPN `h2`).
    pub http2: bool,
    /// The sidecar's drain, held by WebSocket tunnels opened on this connection.
    pub drain: Drain,
}

struct Inbound {
    store: Arc<SvidStore>,
    metrics: Arc<SidecarMetrics>,
    policy: Arc<PolicyEngine>,
    app: AppPool,
    /// The app's address, as access-log lines name it.
    app_label: Box<str>,
    access_log: bool,
    /// What reaches the app of request headers with `_` in their names.
    underscores: UnderscoreHeaders,
    request_timeout: Duration,
    connect_timeout: Duration,
    max_uri_bytes: usize,
    max_header_bytes: usize,
    header_read_timeout: Duration,
    idle_timeout: Duration,
    /// `limits.h2.stream_idle_timeout`.
    stream_idle_timeout: Duration,
    h1: http1::Builder,
    h2: h2::server::Builder,
}

/// The inbound mTLS listener (HTTP) and the raw TCP forwards.
pub struct InboundProxy {
    /// Handshakes may take at most `limits.inbound.handshake_timeout` (a client that stalls
    /// holds a task, not a thread).
    http: accept::Listener<InboundTls>,
    tcp: Vec<InboundForward>,
    shared: Arc<Inbound>,
}

impl InboundProxy {
    /// Binds `settings.inbound_listen` and every `settings.inbound_tcp` listener and builds the
    /// TLS configs (once: they read the current SVID and bundle on each handshake). No policy:
    /// every authenticated peer is allowed (`settings.policy` is not read here; see
    /// [`Self::bind_with_policy`]).
    pub async fn bind(
        settings: &SidecarSettings,
        store: Arc<SvidStore>,
        metrics: Arc<SidecarMetrics>,
    ) -> std::io::Result<Self> {
        let policy = PolicyEngine::allow_all(Arc::clone(&metrics));
        Self::bind_with_policy(settings, store, metrics, policy).await
    }

    /// [`Self::bind`], deciding every request and TCP connection with `policy`.
    pub async fn bind_with_policy(
        settings: &SidecarSettings,
        store: Arc<SvidStore>,
        metrics: Arc<SidecarMetrics>,
        policy: Arc<PolicyEngine>,
    ) -> std::io::Result<Self> {
        let ticketer = SessionTicketer::new()?;
        let http_config = mtls::server_config(
            &store,
            settings.tls_policy,
            mtls::ALPN_HTTP,
            ticketer.clone(),
        )?;
        let tcp_config =
            mtls::server_config(&store, settings.tls_policy, mtls::ALPN_NONE, ticketer)?;
        let limits = &settings.limits;
        // One listener per port, each under the same cap and handshake bound.
        let listener = |tcp, what, acceptor, kind| {
            accept::Listener::new(
                tcp,
                what,
                limits.inbound.max_connections,
                listen::events(&metrics, kind),
            )
            .with_handshake(
                InboundTls::new(acceptor, Arc::clone(&store), Arc::clone(&metrics)),
                limits.inbound.handshake_timeout,
            )
            // A caller whose packets stop arriving is closed by the kernel (a peer's pooled
            // connection has no PING from this side).
            .with_dead_peer(crate::dial::DeadPeer {
                interval: limits.h2.keepalive_interval,
                timeout: limits.h2.keepalive_timeout,
            })
            .with_workers(settings.workers.clone())
        };
        let http = listener(
            bind(settings.inbound_listen).await?,
            "inbound",
            TlsAcceptor::from(http_config),
            Listener::Inbound,
        );
        let mut forwards = Vec::with_capacity(settings.inbound_tcp.len());
        for forward in &settings.inbound_tcp {
            forwards.push(InboundForward {
                listener: listener(
                    bind(forward.listen).await?,
                    "inbound_tcp",
                    TlsAcceptor::from(tcp_config.clone()),
                    Listener::InboundTcp,
                ),
                app: forward.app,
            });
        }
        let mut h1 = http1::Builder::new();
        h1.timer(TokioTimer::new())
            .keep_alive(true)
            .max_headers(limits.http.max_headers)
            .max_header_size(limits.http.max_header_bytes)
            // `RequestFraming` times request heads from their first byte; hyper's timer would
            // also run while a keep-alive connection waits for its next request (and, with a
            // timer set, defaults to 30 s).
            .header_read_timeout(None);
        let h2 = h2_server(limits);
        Ok(Self {
            http,
            tcp: forwards,
            shared: Arc::new(Inbound {
                store,
                metrics,
                policy,
                app: AppPool::new(
                    settings.app,
                    settings.connect_timeout,
                    settings.app_protocol,
                    settings.workers.count(),
                ),
                app_label: settings.app.to_string().into_boxed_str(),
                access_log: settings.access_log,
                underscores: settings.headers_with_underscores,
                request_timeout: settings.request_timeout,
                connect_timeout: settings.connect_timeout,
                max_uri_bytes: limits.http.max_uri_bytes,
                max_header_bytes: limits.http.max_header_bytes,
                header_read_timeout: limits.http.header_read_timeout,
                idle_timeout: limits.http.idle_timeout,
                stream_idle_timeout: limits.h2.stream_idle_timeout,
                h1,
                h2,
            }),
        })
    }

    /// The HTTP listener's address.
    pub fn local_addr(&self) -> SocketAddr {
        self.http
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// The raw TCP forwards' listener addresses, in `settings.inbound_tcp` order.
    pub fn tcp_addrs(&self) -> Vec<SocketAddr> {
        self.tcp
            .iter()
            .filter_map(|f| f.listener.local_addr().ok())
            .collect()
    }

    /// Accepts until `drain` signals. HTTP connections are told to wind down (GOAWAY,
    /// `Connection: close`) only once the listener is closed, so a peer that reconnects is
    /// refused at once instead of landing in the backlog of a listener about to close (which
    /// resets it); they finish their in-flight requests and close. TCP forwards run to their
    /// end. `drain` is held until every connection is done.
    pub async fn run(self, drain: Drain) {
        let InboundProxy { http, tcp, shared } = self;
        let mut forwards = tokio::task::JoinSet::new();
        for forward in tcp {
            let (shared, drain) = (shared.clone(), drain.clone());
            forwards.spawn(async move {
                let ctx = InboundTcpContext {
                    access_log: shared.access_log,
                    metrics: shared.metrics.clone(),
                    policy: shared.policy.clone(),
                    connect_timeout: shared.connect_timeout,
                };
                run_inbound_forward(forward, Arc::new(ctx), drain).await;
            });
        }
        let (connections_signal, connections) = drain::channel();
        http.serve(&drain, |conn| {
            let (shared, conn_drain) = (shared.clone(), connections.clone());
            async move {
                let peer_addr = conn.peer();
                // Boxed, like the protocol halves in `connection`: this task lives as long as
                // the connection, and a future keeps room for its largest state for all of it.
                if let Some((stream, peer_id, resumed)) = Box::pin(conn.handshake()).await {
                    shared
                        .connection(stream, peer_id, resumed, peer_addr, conn_drain)
                        .await;
                }
            }
        })
        .await;
        drop(http);
        drop(connections);
        connections_signal.drain_all().await;
        while forwards.join_next().await.is_some() {}
    }
}

async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    trellis_serve::bind(addr)
        .await
        .map_err(|e| std::io::Error::new(e.source.kind(), e.to_string()))
}

/// The HTTP/2 server settings both proxies' peers meet: `limits` plus the rapid-reset and
/// reset-flood bounds (CONTINUATION floods are bounded by the header list size: h2 stops a
/// header block that grows past it).
pub(crate) fn h2_server(limits: &Limits) -> h2::server::Builder {
    let mut h2 = h2::server::Builder::new();
    h2.initial_window_size(mtls::H2_STREAM_WINDOW)
        .initial_connection_window_size(mtls::H2_CONNECTION_WINDOW)
        .max_send_buffer_size(mtls::H2_MAX_SEND_BUF)
        .max_concurrent_streams(limits.h2.max_concurrent_streams)
        .max_header_list_size(limits.h2.max_header_list_bytes)
        .max_pending_accept_reset_streams(limits.h2.max_pending_accept_reset_streams)
        .max_local_error_reset_streams(Some(limits.h2.max_local_error_reset_streams))
        .max_concurrent_reset_streams(limits.h2.max_concurrent_reset_streams);
    h2
}

impl Inbound {
    /// Serves one authenticated connection ([`InboundTls`] has verified `peer_id`).
    async fn connection(
        self: Arc<Self>,
        stream: TlsStream<TcpStream>,
        peer_id: SpiffeId,
        resumed: bool,
        peer_addr: SocketAddr,
        drain: Drain,
    ) {
        let _open = self.metrics.connection(Direction::Inbound);
        let conn = stream.get_ref().1;
        let http2 = conn.alpn_protocol() == Some(mtls::ALPN_H2);
        let tls_version = conn.protocol_version();
        let Some(leaf) = conn.peer_certificates().and_then(|c| c.first()) else {
            return;
        };
        let own = self
            .store
            .spiffe_id()
            .map(|id| id.to_string())
            .unwrap_or_default();
        let xfcc = format!("By={own};Hash={};URI={peer_id}", leaf_sha256_hex(leaf));
        let Ok(xfcc) = HeaderValue::from_maybe_shared(Bytes::from(xfcc)) else {
            tracing::warn!(%peer_addr, %peer_id, "caller identity does not fit in a header; closing");
            return;
        };
        let info = Arc::new(ConnInfo {
            peer_id,
            peer_addr,
            xfcc,
            tls_version,
            resumed,
            http2,
            drain: drain.clone(),
        });
        tracing::debug!(%peer_addr, peer_id = %info.peer_id, resumed, http2, "inbound connection");
        // This connection winds down gracefully (in-flight requests finish) on the sidecar's
        // drain, or after a policy reload that leaves its caller nothing allowed.
        let (local_signal, local_drain) = drain::channel();
        let Some(mut grant) = self
            .policy
            .admit(info.peer_id.as_str(), ConnectionScope::Http)
        else {
            return;
        };
        let caller = info.peer_id.clone();
        let stop = async {
            tokio::select! {
                () = drain.signaled() => {}
                () = grant.revoked() => {
                    tracing::info!(%peer_addr, caller = %caller, "policy no longer allows this caller anything; closing its connection");
                }
            }
        };
        // Each protocol's future is boxed so a connection holds only the one it speaks: as two
        // branches of one future (each with the TLS stream inline) they took the room of the
        // larger in every connection's task, for as long as the connection lived (the task was
        // 26.7 KB per connection in a heap profile; docs/benchmarks.md, "Memory").
        let serve = async {
            if http2 {
                Box::pin(self.serve_h2(stream, info, local_drain))
                    .await
                    .map_err(BoxError::from)
            } else {
                let state = Arc::new(ConnDrain::default());
                let service = {
                    let (shared, state) = (self.clone(), state.clone());
                    hyper::service::service_fn(move |req| {
                        let seq = state.framing.next_request();
                        handle_http1(shared.clone(), info.clone(), state.clone(), seq, req)
                    })
                };
                let clock = IdleClock::new();
                let io = TokioIo::new(RequestFraming::new(
                    Tracked::new(stream, Arc::clone(&clock)),
                    Arc::clone(&state),
                    self.header_read_timeout,
                    self.max_header_bytes,
                ));
                let conn = self.h1.serve_connection(io, service).with_upgrades();
                Box::pin(serve_until_drained(
                    conn,
                    local_drain,
                    &state.drain,
                    &clock,
                    self.idle_timeout,
                ))
                .await
                .map_err(BoxError::from)
            }
        };
        let mut serve = std::pin::pin!(serve);
        let served = tokio::select! {
            served = serve.as_mut() => served,
            () = stop => {
                // Sends the signal at once; the returned wait is not needed.
                drop(local_signal.drain(Duration::ZERO));
                serve.await
            }
        };
        drop(drain);
        if let Err(e) = served {
            tracing::debug!(%peer_addr, error = %e, "inbound connection ended with an error");
        }
    }

    /// HTTP/2: every stream's handler runs inside this connection's task (no task per stream).
    /// On drain, or after `idle_timeout` with no stream open: GOAWAY, the streams already open
    /// finish, then the connection closes.
    async fn serve_h2(
        self: &Arc<Self>,
        stream: TlsStream<TcpStream>,
        info: Arc<ConnInfo>,
        drain: Drain,
    ) -> Result<(), h2::Error> {
        let mut conn = self.h2.handshake::<_, Bytes>(stream).await?;
        let mut streams = FuturesUnordered::new();
        let draining = drain.signaled();
        let mut draining = std::pin::pin!(draining);
        let mut shutting_down = false;
        let idle = tokio::time::sleep(self.idle_timeout);
        let mut idle = std::pin::pin!(idle);
        // Armed by the idle close: h2's graceful shutdown waits for the peer's PING ACK, which
        // a hostile peer never sends.
        let mut closing_idle = false;
        let grace = tokio::time::sleep(Duration::ZERO);
        let mut grace = std::pin::pin!(grace);
        let result = loop {
            tokio::select! {
                biased;
                () = &mut draining, if !shutting_down => {
                    conn.graceful_shutdown();
                    shutting_down = true;
                }
                () = &mut idle, if !shutting_down && streams.is_empty() => {
                    tracing::debug!(peer = %info.peer_id, "idle HTTP/2 connection closed");
                    conn.graceful_shutdown();
                    shutting_down = true;
                    closing_idle = true;
                    grace.as_mut().reset(tokio::time::Instant::now() + IDLE_GOAWAY_GRACE);
                }
                () = &mut grace, if closing_idle && streams.is_empty() => break Ok(()),
                Some(()) = streams.next(), if !streams.is_empty() => {
                    if streams.is_empty() {
                        idle.as_mut().reset(tokio::time::Instant::now() + self.idle_timeout);
                    }
                }
                accepted = conn.accept() => match accepted {
                    Some(Ok((request, respond))) => {
                        streams.push(serve_h2_stream(self.clone(), info.clone(), request, respond));
                    }
                    Some(Err(e)) => break Err(e),
                    None => break Ok(()),
                },
            }
        };
        // The connection is gone; what is left finds out at its next step.
        while streams.next().await.is_some() {}
        result
    }

    /// What the app (or the policy hook) answers to one request. Counted, timed (head received
    /// to response head ready) and, with the access log on, logged. `h1`: the connection's
    /// framing report and the request's number in it (HTTP/1.1): a request whose framing is
    /// refused never reaches the app, and one whose chunked body turns out malformed on the way
    /// is answered `400` (the caller's fault) rather than `502`.
    async fn respond(
        &self,
        conn: &ConnInfo,
        h1: Option<(&FramingReport, u64)>,
        mut parts: Parts,
        body: ReqBody,
    ) -> Response<ProxyBody> {
        let started = Instant::now();
        // Read before hop-by-hop removal takes `Upgrade` and `Connection` away.
        let ask = upgrade_ask(&parts);
        // gRPC callers read `grpc-status`, and bound the call with `grpc-timeout`.
        let grpc = grpc::is_grpc(parts.version, &parts.headers);
        let timeout = match grpc::timeout(&parts.headers) {
            Some(deadline) if grpc => deadline.min(self.request_timeout),
            _ => self.request_timeout,
        };
        let framing_refused = h1.and_then(|(report, seq)| {
            let response = report.refusal(seq)?;
            let reason = if report.conflicting_lengths(seq) {
                "conflicting_lengths"
            } else {
                "malformed_body"
            };
            self.metrics.request_refused(Direction::Inbound, reason);
            Some(response)
        });
        // With the access log on: the path as received (before normalization) and what the
        // policy decided, for `trellis policy replay`. The URI is kept by reference count (its
        // parts share the request's bytes), not copied.
        let raw_uri = self.access_log.then(|| parts.uri.clone());
        let mut decided = AccessDecision::default();
        let refusal = match framing_refused
            .or_else(|| {
                let response = uri_too_long(&parts.uri, parts.version, self.max_uri_bytes)?;
                self.metrics
                    .request_refused(Direction::Inbound, "uri_too_long");
                Some(response)
            })
            .or_else(|| self.refuse_headers(conn, &mut parts))
        {
            Some(response) => Some(Refusal {
                response,
                rule: None,
            }),
            None => authorize(
                &self.policy,
                &self.metrics,
                conn.peer_id.as_str(),
                &mut parts,
                self.access_log.then_some(&mut decided),
            ),
        };
        // After `authorize`: the path as forwarded (normalized when a policy is in force).
        // The one cost of the access log when it is off is this branch.
        let logged = self
            .access_log
            .then(|| (parts.method.clone(), parts.uri.path_and_query().cloned()));
        let refusal = match (refusal, &ask) {
            (None, UpgradeAsk::Other(protocol)) => {
                self.metrics.request_refused(Direction::Inbound, "upgrade");
                Some(Refusal {
                    response: upgrade_refused(protocol),
                    rule: None,
                })
            }
            (refusal, _) => refusal,
        };
        let (response, rule) = match refusal {
            Some(Refusal { response, rule }) => (response, rule),
            None => {
                to_app_request(&mut parts, &conn.xfcc);
                let response = match ask {
                    UpgradeAsk::WebSocket(upgrade) => {
                        self.websocket(conn, h1, parts, body, upgrade, timeout)
                            .await
                    }
                    _ => {
                        let sent = tokio::time::timeout(
                            timeout,
                            self.app.send(Request::from_parts(parts, body)),
                        )
                        .await;
                        match sent {
                            Ok(Ok(response)) => {
                                let (mut head, body) = response.into_parts();
                                strip_hop_by_hop(&mut head.headers);
                                Response::from_parts(head, body)
                            }
                            Ok(Err(e)) => error_response(&e),
                            Err(_) => error_response(&ForwardError::Timeout {
                                target: self.app.target().clone(),
                                timeout,
                            }),
                        }
                    }
                };
                match h1.and_then(|(report, seq)| report.malformed_body(seq)) {
                    Some(why) => {
                        self.metrics
                            .request_refused(Direction::Inbound, "malformed_body");
                        (malformed_body_response(why), None)
                    }
                    None => (response, None),
                }
            }
        };
        let took = started.elapsed();
        self.metrics
            .request(Direction::Inbound, response.status().as_u16(), took);
        if let Some((method, path)) = logged {
            AccessEntry {
                caller: Some(conn.peer_id.as_str()),
                direction: Direction::Inbound,
                method: &method,
                path: path.as_ref().map_or("/", PathAndQuery::path),
                raw_path: raw_uri.as_ref().map(Uri::path),
                status: response.status(),
                took,
                upstream: Some(&self.app_label),
                identity: None,
                rule: decided.rule.as_deref().or(rule.as_deref()),
                decision: decided.decision,
                policy: decided.policy.as_deref(),
            }
            .emit();
        }
        if grpc {
            grpc::into_grpc(response)
        } else {
            response
        }
    }
}

impl Inbound {
    /// A WebSocket upgrade the policy allowed: on a fresh HTTP/1.1 connection to the app;
    /// after the app's `101`, the caller's connection is spliced to it ([`crate::upgrade`]).
    async fn websocket(
        &self,
        conn: &ConnInfo,
        h1: Option<(&FramingReport, u64)>,
        mut parts: Parts,
        body: ReqBody,
        upgrade: HeaderValue,
        timeout: Duration,
    ) -> Response<ProxyBody> {
        let (Some(on_upgrade), Some((report, _))) = (parts.extensions.remove::<OnUpgrade>(), h1)
        else {
            return text_response(
                StatusCode::BAD_REQUEST,
                "this connection cannot be upgraded",
            );
        };
        restore_upgrade(&mut parts.headers, upgrade);
        let req = Request::from_parts(parts, body);
        match tokio::time::timeout(timeout, self.app.upgrade(req)).await {
            Ok(Ok(switch)) => upgrade::answer(
                switch,
                on_upgrade,
                report,
                conn.drain.clone(),
                self.idle_timeout,
                "inbound",
            ),
            Ok(Err(e)) => error_response(&e),
            Err(_) => error_response(&ForwardError::Timeout {
                target: self.app.target().clone(),
                timeout,
            }),
        }
    }

    /// Applies the header rules ([`crate::headers`]) to a caller's request: `400` for a
    /// duplicate, invalid or disagreeing `Host`, or (under `reject`) a header name with `_`;
    /// otherwise every spelling of a header the sidecar owns, and (under `drop`) other names
    /// with `_`, are removed before the request goes further.
    fn refuse_headers(&self, conn: &ConnInfo, parts: &mut Parts) -> Option<Response<ProxyBody>> {
        if let Err(fault) = check_host(parts) {
            self.metrics
                .request_refused(Direction::Inbound, fault.reason());
            tracing::debug!(caller = %conn.peer_id, reason = fault.reason(), "request Host refused");
            return Some(close_http1(
                text_response(StatusCode::BAD_REQUEST, fault.message()),
                parts.version,
            ));
        }
        match sanitize_for_app(&mut parts.headers, self.underscores) {
            Ok(removed) => {
                if removed.owned + removed.underscore > 0 {
                    self.metrics
                        .headers_removed(removed.owned, removed.underscore);
                    tracing::debug!(
                        caller = %conn.peer_id,
                        owned = removed.owned,
                        underscore = removed.underscore,
                        "caller-supplied headers removed before the app"
                    );
                }
                None
            }
            Err(name) => {
                self.metrics
                    .request_refused(Direction::Inbound, "underscore_header");
                Some(text_response(
                    StatusCode::BAD_REQUEST,
                    &format!(
                        "request header `{name}` has `_` in its name, which this sidecar refuses \
                         (inbound.headers_with_underscores: reject)"
                    ),
                ))
            }
        }
    }
}

/// `response` with `Connection: close` on HTTP/1.x: a peer that sent a malformed head gets no
/// further requests on the connection.
fn close_http1(mut response: Response<ProxyBody>, version: Version) -> Response<ProxyBody> {
    if version != Version::HTTP_2 {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// One HTTP/1.x request, number `seq` on its connection.
async fn handle_http1(
    shared: Arc<Inbound>,
    conn: Arc<ConnInfo>,
    state: Arc<ConnDrain>,
    seq: u64,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    let (parts, body) = req.into_parts();
    let version = parts.version;
    let mut response = shared
        .respond(
            &conn,
            Some((&state.framing, seq)),
            parts,
            ReqBody::Hyper(body),
        )
        .await;
    *response.version_mut() = version;
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        state.on_response(version, response.headers_mut());
    }
    Ok(response)
}

/// One HTTP/2 stream: the app's answer goes back on it, body streamed with flow control. If the
/// caller resets the stream first (it gave up), the app request is dropped (its connection is
/// closed rather than reused).
async fn serve_h2_stream(
    shared: Arc<Inbound>,
    conn: Arc<ConnInfo>,
    request: Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
) {
    let (parts, recv) = request.into_parts();
    let body = ReqBody::H2(H2Body::new(recv, &parts.headers));
    let response = tokio::select! {
        response = shared.respond(&conn, None, parts, body) => response,
        _ = std::future::poll_fn(|cx| respond.poll_reset(cx)) => return,
    };
    let (head, body) = response.into_parts();
    let end_of_stream = body.is_end_stream();
    match respond.send_response(Response::from_parts(head, ()), end_of_stream) {
        Ok(mut send) if !end_of_stream => {
            // The connection's own idle bound does not apply while a stream is open: an app
            // that stalls mid-body (or a caller that stops reading) is cut here instead.
            let stall = Some(shared.stream_idle_timeout);
            if let Err(e) = crate::body::pipe_to_h2(body, &mut send, stall).await {
                if e.downcast_ref::<crate::body::Stalled>().is_some() {
                    shared.metrics.stalled_bodies.inc();
                    tracing::info!(peer = %conn.peer_id, error = %e, "response body stalled; stream reset");
                } else {
                    tracing::debug!(peer = %conn.peer_id, error = %e, "response body ended early");
                }
            }
        }
        Ok(_) => {}
        Err(e) => tracing::debug!(peer = %conn.peer_id, error = %e, "cannot send response"),
    }
}

fn error_response(e: &ForwardError) -> Response<ProxyBody> {
    tracing::debug!(error = %e, "inbound request failed");
    text_response(e.status(), &e.to_string())
}

/// Rewrites a peer's request for the app: HTTP/1.1, origin-form URI, exactly one `Host` (the
/// request's authority when it has one: HTTP/2 `:authority`, HTTP/1.1 absolute-form), no
/// hop-by-hop headers, and exactly one XFCC header: ours. The caller's own XFCC, in any
/// spelling, was removed by [`Inbound::refuse_headers`]; `insert` here replaces the exact name.
fn to_app_request(parts: &mut Parts, xfcc: &HeaderValue) {
    parts.version = Version::HTTP_11;
    strip_hop_by_hop(&mut parts.headers);
    parts.headers.insert(&XFCC, xfcc.clone());
    if parts.uri.authority().is_some() {
        set_host_from_authority(parts);
        let uri = std::mem::take(&mut parts.uri).into_parts();
        parts.uri = match uri.path_and_query {
            Some(pq) => Uri::from(pq),
            None => Uri::from_static("/"),
        };
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::authorize::{forbidden, with_path};
    use super::*;

    fn parts(req: Request<()>) -> Parts {
        req.into_parts().0
    }

    #[test]
    fn h2_request_becomes_origin_form_with_host() {
        let mut p = parts(
            Request::builder()
                .version(Version::HTTP_2)
                .uri("http://service-b:8080/a/b?c=d")
                .header("x-forwarded-client-cert", "By=evil")
                .header("x-forwarded-client-cert", "URI=evil")
                .header("te", "trailers")
                .body(())
                .unwrap(),
        );
        to_app_request(&mut p, &HeaderValue::from_static("By=x;Hash=y;URI=z"));
        assert_eq!(p.uri.to_string(), "/a/b?c=d");
        assert_eq!(p.version, Version::HTTP_11);
        assert_eq!(p.headers.get("host").unwrap(), "service-b:8080");
        let xfcc: Vec<_> = p
            .headers
            .get_all("x-forwarded-client-cert")
            .iter()
            .collect();
        assert_eq!(xfcc, ["By=x;Hash=y;URI=z"]);
    }

    #[test]
    fn with_path_keeps_scheme_authority_and_query() {
        let uri: Uri = "http://service-b:8080/a/./b?c=d/../e".parse().unwrap();
        assert_eq!(
            with_path(&uri, "/a/b").unwrap().to_string(),
            "http://service-b:8080/a/b?c=d/../e"
        );
        let uri: Uri = "//a//b".parse().unwrap();
        assert_eq!(uri.path(), "//a//b");
        assert_eq!(with_path(&uri, "/a/b").unwrap().to_string(), "/a/b");
    }

    #[test]
    fn forbidden_is_json_naming_rule_and_caller() {
        let r = forbidden("no-export", "spiffe://example.org/a");
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
        assert_eq!(r.headers()["content-type"], "application/json");
    }

    #[test]
    fn h1_request_keeps_its_host() {
        let mut p = parts(
            Request::builder()
                .uri("/x")
                .header("host", "b")
                .header("connection", "close")
                .body(())
                .unwrap(),
        );
        to_app_request(&mut p, &HeaderValue::from_static("v"));
        assert_eq!(p.uri, "/x");
        assert_eq!(p.headers.get("host").unwrap(), "b");
        assert!(p.headers.get("connection").is_none());
    }
}
