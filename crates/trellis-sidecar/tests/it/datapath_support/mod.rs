//! Shared pieces of the data path tests: one test CA, two sidecars' stores, a tiny echo app,
//! proxies on 127.0.0.1:0, HTTP clients, and a metric reader. Each test uses what it needs.
#![allow(dead_code, clippy::unwrap_used)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Mutex};
use tokio::task::JoinHandle;
use trellis_identity::testca::TestCa;
use trellis_identity::tls::TlsPolicy;
use trellis_identity::{SpiffeId, Svid, TrustDomain};
use trellis_sidecar::config::{FilesFile, IdentitySource, Protocol, TcpForward, Upstream};
use trellis_sidecar::drain::{self, DrainSignal};
use trellis_sidecar::inbound::InboundProxy;
use trellis_sidecar::metrics::SidecarMetrics;
use trellis_sidecar::outbound::OutboundProxy;
use trellis_sidecar::{SidecarSettings, SvidStore};
use trellis_tests::metrics::Metrics;

pub const CLIENT_PATH: &str = "/ns/a/sa/client";
pub const SERVER_PATH: &str = "/ns/b/sa/server";
pub const CLIENT_ID: &str = "spiffe://example.org/ns/a/sa/client";
pub const SERVER_ID: &str = "spiffe://example.org/ns/b/sa/server";

/// One CA, two workloads: `client` (calls out) and `server` (is called).
pub struct Mesh {
    pub ca: TestCa,
    pub client_svid: Svid,
    pub server_svid: Svid,
    pub client_store: Arc<SvidStore>,
    pub server_store: Arc<SvidStore>,
    pub client_metrics: Arc<SidecarMetrics>,
    pub server_metrics: Arc<SidecarMetrics>,
}

impl Mesh {
    pub fn new() -> Self {
        let ca = TestCa::root("example.org");
        let client_svid = ca.svid(CLIENT_PATH);
        let server_svid = ca.svid(SERVER_PATH);
        let (client_store, client_metrics) = store(&ca, client_svid.clone());
        let (server_store, server_metrics) = store(&ca, server_svid.clone());
        Self {
            ca,
            client_svid,
            server_svid,
            client_store,
            server_store,
            client_metrics,
            server_metrics,
        }
    }
}

/// A store holding `svid`, trusting `ca`.
pub fn store(ca: &TestCa, svid: Svid) -> (Arc<SvidStore>, Arc<SidecarMetrics>) {
    let metrics = Arc::new(SidecarMetrics::new());
    let store = SvidStore::new(ca.bundle(), None, metrics.clone());
    store.install(svid, ca.bundle(), SystemTime::now()).unwrap();
    (store, metrics)
}

fn any_port() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// Settings with every listener on an ephemeral loopback port.
pub fn settings(app: SocketAddr, upstreams: Vec<Upstream>) -> SidecarSettings {
    SidecarSettings {
        trust_domain: TrustDomain::parse("example.org").unwrap(),
        identity: IdentitySource::Files(FilesFile {
            cert: PathBuf::from("unused"),
            key: PathBuf::from("unused"),
            bundle: PathBuf::from("unused"),
        }),
        inbound_listen: any_port(),
        app,
        inbound_tcp: Vec::new(),
        headers_with_underscores: Default::default(),
        app_protocol: Default::default(),
        outbound_listen: any_port(),
        upstreams,
        default_route: None,
        resolve_ttl: trellis_sidecar::config::defaults::RESOLVE_TTL,
        admin: any_port(),
        tls_policy: TlsPolicy::Tls13,
        tls_key_exchange: Default::default(),
        drain_timeout: Duration::from_secs(10),
        connect_timeout: Duration::from_secs(5),
        request_timeout: Duration::from_secs(30),
        expiry_margin: Duration::from_secs(60),
        policy: None,
        access_log: false,
        limits: Default::default(),
        workload_api_socket: None,
        workers: trellis_serve::Workers::single(),
    }
}

pub fn http_upstream(name: &str, hosts: &[&str], address: SocketAddr, identity: &str) -> Upstream {
    Upstream {
        name: name.to_owned(),
        listen: None,
        hosts: hosts.iter().map(|h| h.to_string()).collect(),
        address: address.to_string(),
        identity: SpiffeId::parse(identity).unwrap(),
        protocol: Protocol::Http,
    }
}

pub fn tcp_forward(app: SocketAddr) -> TcpForward {
    TcpForward {
        listen: any_port(),
        app,
    }
}

/// A port nothing listens on: bound and kept bound, never listening, for the rest of the test
/// binary, so a connection to it is refused. Released at once, the kernel could hand the same
/// port to the next `bind(0)` of a test running in parallel (an echo app, say), and "the app is
/// down" would then reach that app: `app_down_is_503_from_the_inbound` once got a 200 so. The
/// socket has no `SO_REUSEADDR`, so not even a listener that sets it (tokio's do) can share it.
pub async fn closed_port() -> SocketAddr {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket
        .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    let addr = socket.local_addr().unwrap().as_socket().unwrap();
    // Leaked on purpose: one descriptor per call, held until the test binary exits.
    std::mem::forget(socket);
    addr
}

// ---------------------------------------------------------------------------------------------
// The echo app.

/// What the echo app saw, shared with the test.
pub struct AppState {
    pub requests: AtomicU64,
    pub connections: AtomicU64,
    /// `/hold` requests announce themselves here, then wait for `release`.
    pub held: Mutex<mpsc::UnboundedReceiver<()>>,
    held_tx: mpsc::UnboundedSender<()>,
    release: watch::Sender<bool>,
}

impl AppState {
    pub fn release_held(&self) {
        self.release.send_replace(true);
    }

    pub async fn wait_for_held(&self) {
        self.held.lock().await.recv().await.unwrap();
    }
}

pub struct App {
    pub addr: SocketAddr,
    pub state: Arc<AppState>,
}

/// HTTP/1.1 + h2c echo: answers `method`, `path`, `version`, every `xfcc` value and the number of
/// body bytes it read, one `key: value` per line. `/slow` never answers; `/hold` answers once
/// released; `/download?<n>` sends `n` bytes.
pub async fn spawn_app() -> App {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (held_tx, held_rx) = mpsc::unbounded_channel();
    let state = Arc::new(AppState {
        requests: AtomicU64::new(0),
        connections: AtomicU64::new(0),
        held: Mutex::new(held_rx),
        held_tx,
        release: watch::channel(false).0,
    });
    let s = state.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            s.connections.fetch_add(1, Ordering::SeqCst);
            let s = s.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| echo(s.clone(), req));
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    App { addr, state }
}

async fn echo(
    state: Arc<AppState>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    state.requests.fetch_add(1, Ordering::SeqCst);
    let path = req.uri().path().to_owned();
    match path.as_str() {
        "/slow" => std::future::pending::<()>().await,
        "/hold" => {
            let mut release = state.release.subscribe();
            let _ = state.held_tx.send(());
            let _ = release.wait_for(|r| *r).await;
        }
        "/download" => {
            let n: usize = req.uri().query().and_then(|q| q.parse().ok()).unwrap_or(0);
            return Ok(Response::new(Full::new(Bytes::from(vec![b'x'; n]))));
        }
        _ => {}
    }
    let mut text = format!(
        "method: {}\npath: {}\nversion: {:?}\n",
        req.method(),
        path,
        req.version()
    );
    if let Some(host) = req.headers().get("host") {
        text.push_str(&format!("host: {}\n", host.to_str().unwrap_or("?")));
    }
    for v in req.headers().get_all("x-forwarded-client-cert") {
        text.push_str(&format!("xfcc: {}\n", v.to_str().unwrap_or("?")));
    }
    let mut body = req.into_body();
    let mut bytes = 0u64;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => bytes += f.data_ref().map_or(0, |d| d.len() as u64),
            Err(_) => break,
        }
    }
    text.push_str(&format!("bytes: {bytes}\n"));
    Ok(Response::new(Full::new(Bytes::from(text))))
}

/// The echo app's answer, parsed.
#[derive(Debug, Default)]
pub struct Echo {
    pub method: String,
    pub path: String,
    pub version: String,
    pub host: Option<String>,
    pub xfcc: Vec<String>,
    pub bytes: u64,
}

impl Echo {
    pub fn parse(body: &[u8]) -> Self {
        let text = std::str::from_utf8(body).unwrap();
        let mut echo = Echo::default();
        for line in text.lines() {
            let (k, v) = line
                .split_once(": ")
                .unwrap_or_else(|| panic!("not an echo: {text}"));
            match k {
                "method" => echo.method = v.into(),
                "path" => echo.path = v.into(),
                "version" => echo.version = v.into(),
                "host" => echo.host = Some(v.into()),
                "xfcc" => echo.xfcc.push(v.into()),
                "bytes" => echo.bytes = v.parse().unwrap(),
                _ => panic!("unexpected echo line {line}"),
            }
        }
        echo
    }
}

// ---------------------------------------------------------------------------------------------
// Proxies.

pub struct Running<T> {
    pub addrs: T,
    pub signal: Option<DrainSignal>,
    pub task: JoinHandle<()>,
}

impl<T> Running<T> {
    /// Starts draining; resolves with whether everything finished in time.
    pub fn drain(&mut self, timeout: Duration) -> impl std::future::Future<Output = bool> {
        self.signal.take().unwrap().drain(timeout)
    }
}

pub struct InboundAddrs {
    pub http: SocketAddr,
    pub tcp: Vec<SocketAddr>,
}

pub async fn spawn_inbound(
    settings: &SidecarSettings,
    store: Arc<SvidStore>,
    metrics: Arc<SidecarMetrics>,
) -> Running<InboundAddrs> {
    let proxy = InboundProxy::bind(settings, store, metrics).await.unwrap();
    let addrs = InboundAddrs {
        http: proxy.local_addr(),
        tcp: proxy.tcp_addrs(),
    };
    let (signal, drain) = drain::channel();
    let task = tokio::spawn(proxy.run(drain));
    Running {
        addrs,
        signal: Some(signal),
        task,
    }
}

pub async fn spawn_outbound(
    settings: &SidecarSettings,
    store: Arc<SvidStore>,
    metrics: Arc<SidecarMetrics>,
) -> Running<Vec<(String, SocketAddr)>> {
    let proxy = OutboundProxy::bind(settings, store, metrics).await.unwrap();
    let addrs = proxy.local_addrs();
    let (signal, drain) = drain::channel();
    let task = tokio::spawn(proxy.run(drain));
    Running {
        addrs,
        signal: Some(signal),
        task,
    }
}

pub fn addr_of(addrs: &[(String, SocketAddr)], name: &str) -> SocketAddr {
    addrs
        .iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("no listener {name} in {addrs:?}"))
        .1
}

/// Tweaks for [`pair`].
pub struct PairOptions {
    /// What the outbound expects the inbound to present.
    pub expected_identity: String,
    /// Where the inbound forwards (default: the echo app).
    pub inbound_app: Option<SocketAddr>,
    /// Where the outbound connects (default: the inbound).
    pub upstream_address: Option<SocketAddr>,
    pub outbound_request_timeout: Duration,
    pub inbound_request_timeout: Duration,
}

impl Default for PairOptions {
    fn default() -> Self {
        Self {
            expected_identity: SERVER_ID.to_owned(),
            inbound_app: None,
            upstream_address: None,
            outbound_request_timeout: Duration::from_secs(30),
            inbound_request_timeout: Duration::from_secs(30),
        }
    }
}

/// app → outbound (client workload) → mTLS → inbound (server workload) → echo app.
pub struct Pair {
    pub mesh: Mesh,
    pub app: App,
    pub inbound: Running<InboundAddrs>,
    pub outbound: Running<Vec<(String, SocketAddr)>>,
}

impl Pair {
    /// The shared outbound listener; upstream `b` answers to Host `service-b`.
    pub fn outbound_addr(&self) -> SocketAddr {
        addr_of(&self.outbound.addrs, "shared")
    }
}

pub async fn pair(options: PairOptions) -> Pair {
    let mesh = Mesh::new();
    let app = spawn_app().await;
    let mut inbound_settings = settings(options.inbound_app.unwrap_or(app.addr), Vec::new());
    inbound_settings.request_timeout = options.inbound_request_timeout;
    let inbound = spawn_inbound(
        &inbound_settings,
        mesh.server_store.clone(),
        mesh.server_metrics.clone(),
    )
    .await;
    let upstream = http_upstream(
        "b",
        &["service-b", "service-b.ns-b"],
        options.upstream_address.unwrap_or(inbound.addrs.http),
        &options.expected_identity,
    );
    let mut outbound_settings = settings(closed_port().await, vec![upstream]);
    outbound_settings.request_timeout = options.outbound_request_timeout;
    let outbound = spawn_outbound(
        &outbound_settings,
        mesh.client_store.clone(),
        mesh.client_metrics.clone(),
    )
    .await;
    Pair {
        mesh,
        app,
        inbound,
        outbound,
    }
}

// ---------------------------------------------------------------------------------------------
// Clients.

/// One app connection to a proxy, HTTP/1.1 keep-alive or h2c prior knowledge.
pub enum Client {
    Http1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    H2c(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

impl Client {
    pub async fn http1(addr: SocketAddr) -> Self {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .unwrap();
        tokio::spawn(conn);
        Client::Http1(sender)
    }

    pub async fn h2c(addr: SocketAddr) -> Self {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let (sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
                .await
                .unwrap();
        tokio::spawn(conn);
        Client::H2c(sender)
    }

    /// Sends `method path` with `Host: host` (HTTP/1.1) or `:authority` (h2c) and `body`.
    pub async fn send(
        &mut self,
        method: &str,
        host: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> Reply {
        let (uri, version) = match self {
            Client::Http1(_) => (path.to_owned(), http::Version::HTTP_11),
            Client::H2c(_) => (format!("http://{host}{path}"), http::Version::HTTP_2),
        };
        let mut builder = Request::builder().method(method).uri(uri).version(version);
        if matches!(self, Client::Http1(_)) {
            builder = builder.header("host", host);
        }
        for (k, v) in headers {
            builder = builder.header(*k, *v);
        }
        let req = builder.body(Full::new(body)).unwrap();
        let response = match self {
            Client::Http1(s) => {
                s.ready().await.unwrap();
                s.send_request(req).await.unwrap()
            }
            Client::H2c(s) => s.send_request(req).await.unwrap(),
        };
        let (parts, body) = response.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        Reply {
            status: parts.status,
            headers: parts.headers,
            body,
        }
    }

    pub async fn get(&mut self, host: &str, path: &str) -> Reply {
        self.send("GET", host, path, &[], Bytes::new()).await
    }
}

pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn text(&self) -> &str {
        std::str::from_utf8(&self.body).unwrap()
    }

    pub fn echo(&self) -> Echo {
        assert_eq!(self.status, StatusCode::OK, "{}", self.text());
        Echo::parse(&self.body)
    }

    /// Sidecar error bodies are one line of text.
    pub fn assert_one_line(&self) {
        let text = self.text();
        assert!(
            text.ends_with('\n') && text.trim_end().lines().count() == 1,
            "not one line: {text:?}"
        );
        assert_eq!(
            self.headers.get("content-type").unwrap(),
            "text/plain; charset=utf-8"
        );
    }
}

/// Writes a raw HTTP/1.1 request (`Connection: close`) and reads everything the server sends
/// until it closes. An I/O error after some bytes ends the read (what was read is returned).
pub async fn raw_http1<S>(
    stream: &mut S,
    host: &str,
    path: &str,
    extra: &str,
) -> std::io::Result<String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let req = format!("GET {path} HTTP/1.1\r\nhost: {host}\r\n{extra}connection: close\r\n\r\n");
    stream.write_all(req.as_bytes()).await?;
    stream.flush().await?;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if out.is_empty() => return Err(e),
            Err(_) => break,
        }
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

// ---------------------------------------------------------------------------------------------
// Metrics and waiting.

/// One series (`name` or `name{labels}`) of the sidecar's exposition; panics naming it if
/// absent.
#[track_caller]
pub fn metric(metrics: &SidecarMetrics, series: &str) -> u64 {
    Metrics::parse(&metrics.encode()).unwrap().series(series) as u64
}

/// [`metric`], 0 while a labelled series has not moved yet (for polls that wait for it).
pub fn metric_or_zero(metrics: &SidecarMetrics, series: &str) -> u64 {
    Metrics::parse(&metrics.encode())
        .unwrap()
        .series_or_zero(series) as u64
}

/// `trellis_tls_handshakes_total` for one direction, result and reason; 0 while that label set
/// has not moved (tests poll on it, and compare it to exact counts).
pub fn handshakes(metrics: &SidecarMetrics, direction: &str, result: &str, reason: &str) -> u64 {
    metric_or_zero(
        metrics,
        &format!("trellis_tls_handshakes_total{{direction=\"{direction}\",result=\"{result}\",reason=\"{reason}\"}}"),
    )
}

/// Polls `cond` until it holds or 10 s pass (then panics with `what`).
pub async fn eventually(what: &str, cond: impl FnMut() -> bool) {
    trellis_tests::poll_until(Duration::from_secs(10), what, cond).await
}

/// Counts connections the app accepted.
pub fn app_connections(app: &App) -> u64 {
    app.state.connections.load(Ordering::SeqCst)
}
