//! `trellis sidecar`: flags and env over the YAML file, then serve until SIGTERM and drain.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use trellis_identity::tls::KeyExchange;
use trellis_sidecar::config::AppProtocol;
use trellis_sidecar::config::{DefaultRouteFile, FilesFile, Protocol, SidecarFile, UpstreamFile};
use trellis_sidecar::headers::UnderscoreHeaders;
use trellis_sidecar::{Sidecar, SidecarSettings};

/// `trellis sidecar` flags; each overrides the same field of `--config`.
#[derive(Args, Debug)]
pub struct SidecarArgs {
    /// YAML config file (see examples/sidecar-a.yaml).
    #[arg(long, env = "TRELLIS_CONFIG")]
    config: Option<PathBuf>,
    /// Trust domain, e.g. example.org.
    #[arg(long, env = "TRELLIS_TRUST_DOMAIN")]
    trust_domain: Option<String>,
    /// Control plane SDS address (host:port): identity from SDS.
    #[arg(long, env = "TRELLIS_CONTROL_PLANE")]
    control_plane: Option<String>,
    /// The control plane's bundle.pem (verifies it; the initial trust bundle).
    #[arg(long, env = "TRELLIS_CONTROL_BUNDLE")]
    control_bundle: Option<PathBuf>,
    /// The same bundle as PEM text instead of a path (set by the injection webhook, which
    /// cannot mount a ConfigMap of another namespace into the pod).
    #[arg(
        long,
        env = "TRELLIS_CONTROL_BUNDLE_PEM",
        conflicts_with = "control_bundle",
        hide_env_values = true
    )]
    control_bundle_pem: Option<String>,
    /// Kubernetes service-account token file, re-read on every connect.
    #[arg(long, env = "TRELLIS_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// Join token from `trellis token create` (prefer the env var: flags show in `ps`).
    #[arg(long, env = "TRELLIS_JOIN_TOKEN", hide_env_values = true)]
    join_token: Option<String>,
    /// The SPIFFE ID this sidecar must receive; any other is refused.
    #[arg(long, env = "TRELLIS_SPIFFE_ID")]
    spiffe_id: Option<String>,
    /// Accept a private key from the control plane instead of sending a CSR.
    #[arg(long, env = "TRELLIS_NO_CSR")]
    no_csr: bool,
    /// SVID chain PEM: identity from files (with --key and --bundle).
    #[arg(long, env = "TRELLIS_CERT", requires_all = ["key", "bundle"])]
    cert: Option<PathBuf>,
    /// SVID private key PEM.
    #[arg(long, env = "TRELLIS_KEY", requires_all = ["cert", "bundle"])]
    key: Option<PathBuf>,
    /// Trust bundle PEM.
    #[arg(long, env = "TRELLIS_BUNDLE", requires_all = ["cert", "key"])]
    bundle: Option<PathBuf>,
    /// Inbound mTLS listener [default: 0.0.0.0:15443].
    #[arg(long, env = "TRELLIS_INBOUND")]
    inbound: Option<SocketAddr>,
    /// The local app [default: 127.0.0.1:8080].
    #[arg(long, env = "TRELLIS_APP")]
    app: Option<SocketAddr>,
    /// Request headers with `_` in their names: `drop` them before the app, `reject` the
    /// request (400), or `allow` them [default: drop]. A spelling of a header the sidecar sets
    /// (`x_forwarded_client_cert`) never reaches the app, whatever this says.
    #[arg(
        long,
        env = "TRELLIS_HEADERS_WITH_UNDERSCORES",
        value_name = "drop|reject|allow"
    )]
    headers_with_underscores: Option<UnderscoreHeaders>,
    /// How to talk to the app: `http1` (pooled keep-alive) or `h2c` (prior-knowledge HTTP/2,
    /// for gRPC servers and other HTTP/2-only apps) [default: http1].
    #[arg(long, env = "TRELLIS_APP_PROTOCOL", value_name = "http1|h2c")]
    app_protocol: Option<AppProtocol>,
    /// Shared, Host-routed outbound listener [default: 127.0.0.1:15001].
    #[arg(long, env = "TRELLIS_OUTBOUND")]
    outbound: Option<SocketAddr>,
    /// An upstream, repeatable: `name=b,address=10.0.0.2:15443,identity=spiffe://td/b[,hosts=b;b.prod][,listen=127.0.0.1:9000][,protocol=tcp]`.
    #[arg(long = "upstream", env = "TRELLIS_UPSTREAMS", value_delimiter = ' ')]
    upstreams: Vec<String>,
    /// Convention route for hosts no upstream lists (replaces the file's `outbound.default_route`):
    /// `hosts={service}.{namespace}.svc.cluster.local;{service}.{namespace},address={service}.{namespace}.svc.cluster.local:15443,identity=spiffe://{trust_domain}/ns/{namespace}/sa/{service}[,max_peers=1024]`.
    #[arg(long, env = "TRELLIS_DEFAULT_ROUTE")]
    default_route: Option<String>,
    /// How long a peer name's addresses from the system resolver are reused (1s to 5m)
    /// [default: 10s].
    #[arg(long, env = "TRELLIS_RESOLVE_TTL", value_parser = humantime::parse_duration)]
    resolve_ttl: Option<Duration>,
    /// Admin listener [default: 127.0.0.1:15000].
    #[arg(long, env = "TRELLIS_ADMIN")]
    admin: Option<SocketAddr>,
    /// `tls13` (default) or `tls12+`.
    #[arg(long, env = "TRELLIS_TLS_POLICY")]
    tls_policy: Option<String>,
    /// TLS key exchange, inbound, outbound and toward the control plane: X25519MLKEM768 first
    /// with X25519 and P-256 fallbacks (`pq-preferred`), X25519MLKEM768 only (`pq-only`), or
    /// no post-quantum group (`classical`) [default: pq-preferred].
    #[arg(
        long,
        env = "TRELLIS_TLS_KEY_EXCHANGE",
        value_name = "pq-preferred|pq-only|classical"
    )]
    tls_key_exchange: Option<KeyExchange>,
    /// SIGTERM waits this long for in-flight requests [default: 15s].
    #[arg(long, env = "TRELLIS_DRAIN_TIMEOUT", value_parser = humantime::parse_duration)]
    drain_timeout: Option<Duration>,
    /// Connect timeout [default: 5s].
    #[arg(long, env = "TRELLIS_CONNECT_TIMEOUT", value_parser = humantime::parse_duration)]
    connect_timeout: Option<Duration>,
    /// Time to response headers [default: 30s].
    #[arg(long, env = "TRELLIS_REQUEST_TIMEOUT", value_parser = humantime::parse_duration)]
    request_timeout: Option<Duration>,
    /// Threads that carry traffic. 1 (the default) runs everything on one thread, the cheapest
    /// way to proxy for one app. N > 1 runs N single-threaded workers, each serving whole
    /// connections (accepted ones go to the worker with the fewest open) with its own pooled
    /// connections to peers and the app, so a request never crosses threads; raise it for a
    /// busy app on a large node (gains need at least N cores free for the sidecar, and many
    /// connections: one peer's pooled HTTP/2 connection is served by one worker).
    #[arg(long, env = "TRELLIS_WORKER_THREADS", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
    worker_threads: u16,
    /// Authorization policy: a YAML file, or a directory of them merged in name order;
    /// hot-reloaded. Without one, every authenticated peer of the trust domain is allowed.
    #[arg(long, env = "TRELLIS_POLICY")]
    policy: Option<PathBuf>,
    /// `/ready` turns false this long before the SVID expires [default: 5m].
    #[arg(long, env = "TRELLIS_EXPIRY_MARGIN", value_parser = humantime::parse_duration)]
    expiry_margin: Option<Duration>,
    /// One log line per proxied request (target `trellis::access`) [default: true].
    #[arg(long, env = "TRELLIS_ACCESS_LOG", value_name = "true|false", action = clap::ArgAction::Set)]
    access_log: Option<bool>,
    /// Serve the SPIFFE Workload API on this Unix socket (mode 0660; its directory must
    /// exist): SPIFFE-aware apps get this sidecar's SVID with SPIFFE_ENDPOINT_SOCKET=unix://PATH.
    #[arg(long, env = "TRELLIS_WORKLOAD_API_SOCKET", value_name = "PATH")]
    workload_api_socket: Option<PathBuf>,
    /// HTTP/1.1 request line + headers, bytes; more is answered 431 [default: 65536].
    #[arg(long, env = "TRELLIS_MAX_HEADER_BYTES")]
    max_header_bytes: Option<usize>,
    /// HTTP/1.1 header lines per request; more is answered 431 [default: 100].
    #[arg(long, env = "TRELLIS_MAX_HEADERS")]
    max_headers: Option<usize>,
    /// Request target bytes; longer is answered 414 [default: 8192].
    #[arg(long, env = "TRELLIS_MAX_URI_BYTES")]
    max_uri_bytes: Option<usize>,
    /// Open streams per HTTP/2 connection; more are refused (REFUSED_STREAM) [default: 1024].
    #[arg(long, env = "TRELLIS_H2_MAX_CONCURRENT_STREAMS")]
    h2_max_concurrent_streams: Option<u32>,
    /// Decoded HTTP/2 header list, bytes (also bounds CONTINUATION frames) [default: 65536].
    #[arg(long, env = "TRELLIS_H2_MAX_HEADER_LIST_BYTES")]
    h2_max_header_list_bytes: Option<u32>,
    /// Open connections on the inbound listener (each); past it, closed at accept [default: 4096].
    #[arg(long, env = "TRELLIS_MAX_CONNECTIONS_INBOUND")]
    max_connections_inbound: Option<usize>,
    /// Open connections on each outbound listener; past it, closed at accept [default: 1024].
    #[arg(long, env = "TRELLIS_MAX_CONNECTIONS_OUTBOUND")]
    max_connections_outbound: Option<usize>,
    /// Inbound mTLS handshake timeout [default: 10s].
    #[arg(long, env = "TRELLIS_HANDSHAKE_TIMEOUT", value_parser = humantime::parse_duration)]
    handshake_timeout: Option<Duration>,
    /// Time to receive an HTTP/1.1 request head (slowloris bound) [default: 10s].
    #[arg(long, env = "TRELLIS_HEADER_READ_TIMEOUT", value_parser = humantime::parse_duration)]
    header_read_timeout: Option<Duration>,
    /// Close an HTTP connection idle this long (HTTP/2: no open stream) [default: 60s].
    #[arg(long, env = "TRELLIS_IDLE_TIMEOUT", value_parser = humantime::parse_duration)]
    idle_timeout: Option<Duration>,
    /// HTTP/2 streams a peer may open and reset before they are accepted (rapid reset); past
    /// it, GOAWAY ENHANCE_YOUR_CALM [default: as many as a peer may have open, the
    /// --h2-max-concurrent-streams value, 1024 unless set].
    #[arg(long, env = "TRELLIS_H2_MAX_PENDING_ACCEPT_RESET_STREAMS")]
    h2_max_pending_accept_reset_streams: Option<usize>,
    /// HTTP/2 streams reset for the peer's protocol errors; past it, GOAWAY ENHANCE_YOUR_CALM
    /// [default: 1024].
    #[arg(long, env = "TRELLIS_H2_MAX_LOCAL_ERROR_RESET_STREAMS")]
    h2_max_local_error_reset_streams: Option<usize>,
    /// Locally reset HTTP/2 streams remembered at once [default: 10].
    #[arg(long, env = "TRELLIS_H2_MAX_CONCURRENT_RESET_STREAMS")]
    h2_max_concurrent_reset_streams: Option<usize>,
    /// PING interval on each pooled HTTP/2 connection to an upstream, idle or not [default: 5s].
    #[arg(long, env = "TRELLIS_H2_KEEPALIVE_INTERVAL", value_parser = humantime::parse_duration)]
    h2_keepalive_interval: Option<Duration>,
    /// An unanswered PING for this long closes the upstream connection (its requests get 503) [default: 5s].
    #[arg(long, env = "TRELLIS_H2_KEEPALIVE_TIMEOUT", value_parser = humantime::parse_duration)]
    h2_keepalive_timeout: Option<Duration>,
    /// An inbound HTTP/2 response body moving no data this long is reset [default: 5m].
    #[arg(long, env = "TRELLIS_H2_STREAM_IDLE_TIMEOUT", value_parser = humantime::parse_duration)]
    h2_stream_idle_timeout: Option<Duration>,
    /// Open admin connections; past it, closed at accept [default: 64].
    #[arg(long, env = "TRELLIS_ADMIN_MAX_CONNECTIONS")]
    admin_max_connections: Option<usize>,
    /// Admin request line + headers, bytes; more is answered 431 [default: 8192].
    #[arg(long, env = "TRELLIS_ADMIN_MAX_HEADER_BYTES")]
    admin_max_header_bytes: Option<usize>,
    /// Header lines per admin request; more is answered 431 [default: 32].
    #[arg(long, env = "TRELLIS_ADMIN_MAX_HEADERS")]
    admin_max_headers: Option<usize>,
    /// Time to receive an admin request head (slowloris bound) [default: 10s].
    #[arg(long, env = "TRELLIS_ADMIN_HEADER_READ_TIMEOUT", value_parser = humantime::parse_duration)]
    admin_header_read_timeout: Option<Duration>,
    /// Close an admin connection that moves no byte for this long [default: 60s].
    #[arg(long, env = "TRELLIS_ADMIN_IDLE_TIMEOUT", value_parser = humantime::parse_duration)]
    admin_idle_timeout: Option<Duration>,
}

/// Parses `name=b,address=…,identity=…[,hosts=a;b][,listen=…][,protocol=tcp]`.
pub fn parse_upstream(spec: &str) -> anyhow::Result<UpstreamFile> {
    let mut u = UpstreamFile {
        name: String::new(),
        listen: None,
        hosts: Vec::new(),
        address: String::new(),
        identity: String::new(),
        protocol: Protocol::Http,
    };
    for part in spec.split(',').filter(|p| !p.is_empty()) {
        let (k, v) = part
            .split_once('=')
            .with_context(|| format!("--upstream `{spec}`: `{part}` is not key=value"))?;
        match k {
            "name" => u.name = v.to_owned(),
            "address" => u.address = v.to_owned(),
            "identity" => u.identity = v.to_owned(),
            "hosts" => u.hosts = v.split(';').filter(|h| !h.is_empty()).map(str::to_owned).collect(),
            "listen" => u.listen = Some(v.parse().with_context(|| format!("--upstream `{spec}`: listen `{v}`"))?),
            "protocol" => {
                u.protocol = match v {
                    "http" => Protocol::Http,
                    "tcp" => Protocol::Tcp,
                    _ => bail!("--upstream `{spec}`: protocol `{v}`: use http or tcp"),
                }
            }
            _ => bail!("--upstream `{spec}`: unknown key `{k}` (name, address, identity, hosts, listen, protocol)"),
        }
    }
    for (field, value) in [
        ("name", &u.name),
        ("address", &u.address),
        ("identity", &u.identity),
    ] {
        if value.is_empty() {
            bail!("--upstream `{spec}`: `{field}=` is required");
        }
    }
    Ok(u)
}

/// Parses `hosts=a;b,address=…,identity=…[,max_peers=N]` (`--default-route`), with the same
/// checks as the file's `outbound.default_route`.
pub fn parse_default_route(spec: &str) -> anyhow::Result<DefaultRouteFile> {
    DefaultRouteFile::parse_spec(spec).map_err(|e| anyhow::anyhow!("--default-route `{spec}`: {e}"))
}

impl SidecarArgs {
    /// The file (if any) with flags applied over it.
    pub fn merged(self) -> anyhow::Result<SidecarFile> {
        let mut f = match &self.config {
            Some(path) => SidecarFile::load(path)?,
            None => SidecarFile::default(),
        };
        if self.trust_domain.is_some() {
            f.trust_domain = self.trust_domain;
        }
        if let (Some(cert), Some(key), Some(bundle)) = (self.cert, self.key, self.bundle) {
            f.identity.sds = None;
            f.identity.files = Some(FilesFile { cert, key, bundle });
        }
        let sds_flags = self.control_plane.is_some()
            || self.control_bundle.is_some()
            || self.control_bundle_pem.is_some()
            || self.token_file.is_some()
            || self.join_token.is_some()
            || self.spiffe_id.is_some()
            || self.no_csr;
        if sds_flags {
            let mut s = f.identity.sds.take().unwrap_or_default();
            if self.control_plane.is_some() {
                s.control_plane = self.control_plane;
            }
            // A bundle given here replaces the file's, whichever form either takes.
            if self.control_bundle.is_some() {
                s.control_bundle = self.control_bundle;
                s.control_bundle_pem = None;
            }
            if self.control_bundle_pem.is_some() {
                s.control_bundle_pem = self.control_bundle_pem;
                s.control_bundle = None;
            }
            if self.token_file.is_some() {
                s.token_file = self.token_file;
                s.join_token = None;
            }
            if self.join_token.is_some() {
                s.join_token = self.join_token;
                s.token_file = None;
            }
            if self.spiffe_id.is_some() {
                s.spiffe_id = self.spiffe_id;
            }
            if self.no_csr {
                s.csr = Some(false);
            }
            f.identity.files = None;
            f.identity.sds = Some(s);
        }
        if self.inbound.is_some() {
            f.inbound.listen = self.inbound;
        }
        if self.app.is_some() {
            f.inbound.app = self.app;
        }
        if self.headers_with_underscores.is_some() {
            f.inbound.headers_with_underscores = self.headers_with_underscores;
        }
        if self.app_protocol.is_some() {
            f.inbound.app_protocol = self.app_protocol;
        }
        if self.outbound.is_some() {
            f.outbound.listen = self.outbound;
        }
        for spec in &self.upstreams {
            f.outbound.upstreams.push(parse_upstream(spec)?);
        }
        if let Some(spec) = &self.default_route {
            f.outbound.default_route = Some(parse_default_route(spec)?);
        }
        if self.resolve_ttl.is_some() {
            f.outbound.resolve_ttl = self.resolve_ttl;
        }
        if self.admin.is_some() {
            f.admin = self.admin;
        }
        if self.tls_policy.is_some() {
            f.tls_policy = self.tls_policy;
        }
        if self.policy.is_some() {
            f.policy = self.policy;
        }
        if self.tls_key_exchange.is_some() {
            f.tls_key_exchange = self.tls_key_exchange;
        }
        if self.workload_api_socket.is_some() {
            f.workload_api.socket = self.workload_api_socket;
        }
        macro_rules! over {
            ($($field:ident),*) => { $( if self.$field.is_some() { f.$field = self.$field; } )* };
        }
        over!(
            drain_timeout,
            connect_timeout,
            request_timeout,
            expiry_margin,
            access_log
        );
        // The flags kept their flat names; each sets one key of the nested `limits:`.
        macro_rules! limits {
            ($($flag:ident => $group:ident . $key:ident),* $(,)?) => {
                $( if self.$flag.is_some() { f.limits.$group.$key = self.$flag; } )*
            };
        }
        limits!(
            max_header_bytes => http.max_header_bytes,
            max_headers => http.max_headers,
            max_uri_bytes => http.max_uri_bytes,
            header_read_timeout => http.header_read_timeout,
            idle_timeout => http.idle_timeout,
            h2_max_concurrent_streams => h2.max_concurrent_streams,
            h2_max_header_list_bytes => h2.max_header_list_bytes,
            h2_max_pending_accept_reset_streams => h2.max_pending_accept_reset_streams,
            h2_max_local_error_reset_streams => h2.max_local_error_reset_streams,
            h2_max_concurrent_reset_streams => h2.max_concurrent_reset_streams,
            h2_keepalive_interval => h2.keepalive_interval,
            h2_keepalive_timeout => h2.keepalive_timeout,
            h2_stream_idle_timeout => h2.stream_idle_timeout,
            max_connections_inbound => inbound.max_connections,
            handshake_timeout => inbound.handshake_timeout,
            max_connections_outbound => outbound.max_connections,
            admin_max_connections => admin.max_connections,
            admin_max_header_bytes => admin.max_header_bytes,
            admin_max_headers => admin.max_headers,
            admin_header_read_timeout => admin.header_read_timeout,
            admin_idle_timeout => admin.idle_timeout,
        );
        Ok(f)
    }
}

/// Runs the sidecar until SIGTERM/SIGINT, then drains.
pub fn run(args: SidecarArgs) -> anyhow::Result<()> {
    let threads = args.worker_threads;
    let mut settings = SidecarSettings::from_file(args.merged()?)?;
    trellis_identity::tls::install_key_exchange(settings.tls_key_exchange)?;
    // Worker 0: this thread's runtime, which also runs the accept loops, admin, the identity
    // source and the policy watcher. Workers 1..N−1 (none when N is 1) get a thread each.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let (workers, worker_threads) =
        trellis_serve::Workers::start(usize::from(threads), runtime.handle().clone())
            .context("cannot start the worker threads")?;
    settings.workers = workers;
    let served = runtime.block_on(async move {
        let sidecar = Sidecar::start(settings).await?;
        // After a burst of connections closes, the memory aws-lc held for them goes back
        // (alloc.rs says why).
        tokio::spawn(crate::alloc::return_freed_c_heap());
        let outbound: Vec<String> = sidecar
            .outbound_addrs
            .iter()
            .map(|(n, a)| format!("{n}={a}"))
            .collect();
        let workload_api = sidecar
            .workload_api_socket()
            .map(|p| format!(" workload_api={}", p.display()))
            .unwrap_or_default();
        // Tests and scripts read this line to learn the bound ports (port 0 is allowed).
        println!(
            "trellis sidecar listening inbound={} outbound={} admin={}{workload_api}",
            sidecar.inbound_addr,
            outbound.join(","),
            sidecar.admin_addr
        );
        tokio::select! {
            () = crate::signal::shutdown_signal() => tracing::info!("signal received; draining"),
            () = sidecar.shutdown_requested() => {
                tracing::info!("shutdown requested on the admin endpoint; draining");
            }
        }
        if !sidecar.shutdown().await {
            tracing::warn!("drain timeout reached with requests still in flight");
        }
        Ok(())
    });
    // Every connection has drained (or was cut at the drain timeout): what is left on the
    // workers are pooled connections, dropped with their runtimes.
    worker_threads.stop();
    served
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_log_flag_overrides_the_file() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            args: SidecarArgs,
        }
        let merged = |argv: &[&str]| {
            Cli::try_parse_from([&["trellis"], argv].concat())
                .map(|c| c.args.merged().unwrap().access_log)
        };
        assert_eq!(merged(&[]).unwrap(), None);
        assert_eq!(merged(&["--access-log", "false"]).unwrap(), Some(false));
        assert_eq!(merged(&["--access-log", "true"]).unwrap(), Some(true));
        assert!(merged(&["--access-log", "maybe"]).is_err());
    }

    #[test]
    fn control_bundle_pem_flag_replaces_the_files_path() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            args: SidecarArgs,
        }
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("s.yaml");
        std::fs::write(
            &config,
            "trust_domain: example.org\nidentity:\n  sds:\n    control_plane: cp:8443\n    control_bundle: /b.pem\n    join_token: t\n",
        )
        .unwrap();
        let config = config.to_str().unwrap();
        let merged =
            Cli::try_parse_from(["trellis", "--config", config, "--control-bundle-pem", "PEM"])
                .unwrap()
                .args
                .merged()
                .unwrap();
        let sds = merged.identity.sds.unwrap();
        assert_eq!(sds.control_bundle_pem.as_deref(), Some("PEM"));
        assert_eq!(sds.control_bundle, None);
        assert!(Cli::try_parse_from([
            "trellis",
            "--control-bundle",
            "/b.pem",
            "--control-bundle-pem",
            "PEM"
        ])
        .is_err());
    }

    #[test]
    fn limit_flags_override_the_file() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            args: SidecarArgs,
        }
        let merged = Cli::try_parse_from([
            "trellis",
            "--max-headers",
            "10",
            "--header-read-timeout",
            "2s",
            "--max-connections-outbound",
            "5",
        ])
        .unwrap()
        .args
        .merged()
        .unwrap();
        assert_eq!(merged.limits.http.max_headers, Some(10));
        assert_eq!(
            merged.limits.http.header_read_timeout,
            Some(Duration::from_secs(2))
        );
        assert_eq!(merged.limits.outbound.max_connections, Some(5));
        assert_eq!(merged.limits.http.idle_timeout, None);
        assert_eq!(merged.limits.admin.max_connections, None);
    }

    #[test]
    fn admin_and_h2_limit_flags_override_the_file() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            args: SidecarArgs,
        }
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("s.yaml");
        std::fs::write(
            &config,
            "limits:\n  admin:\n    max_connections: 7\n    idle_timeout: 9s\n  h2:\n    max_concurrent_reset_streams: 4\n",
        )
        .unwrap();
        let merged = Cli::try_parse_from([
            "trellis",
            "--config",
            config.to_str().unwrap(),
            "--admin-max-connections",
            "4",
            "--admin-max-header-bytes",
            "16384",
            "--admin-max-headers",
            "8",
            "--admin-header-read-timeout",
            "1s",
            "--h2-max-pending-accept-reset-streams",
            "5",
            "--h2-max-local-error-reset-streams",
            "100",
            "--h2-keepalive-interval",
            "5s",
            "--h2-keepalive-timeout",
            "2s",
        ])
        .unwrap()
        .args
        .merged()
        .unwrap();
        let l = &merged.limits;
        assert_eq!(l.admin.max_connections, Some(4), "the flag wins");
        assert_eq!(l.admin.max_header_bytes, Some(16384));
        assert_eq!(l.admin.max_headers, Some(8));
        assert_eq!(l.admin.header_read_timeout, Some(Duration::from_secs(1)));
        assert_eq!(
            l.admin.idle_timeout,
            Some(Duration::from_secs(9)),
            "file kept"
        );
        assert_eq!(l.h2.max_pending_accept_reset_streams, Some(5));
        assert_eq!(l.h2.max_local_error_reset_streams, Some(100));
        assert_eq!(l.h2.max_concurrent_reset_streams, Some(4), "file kept");
        assert_eq!(l.h2.keepalive_interval, Some(Duration::from_secs(5)));
        assert_eq!(l.h2.keepalive_timeout, Some(Duration::from_secs(2)));
        // Out of range is refused when the merged file is validated, naming the field.
        let merged = Cli::try_parse_from(["trellis", "--admin-max-connections", "0"])
            .unwrap()
            .args
            .merged()
            .unwrap();
        let err = trellis_sidecar::config::Limits::from_file(&merged.limits)
            .unwrap_err()
            .to_string();
        assert!(err.contains("limits.admin.max_connections"), "{err}");
    }

    #[test]
    fn workload_api_socket_flag_overrides_the_file() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            args: SidecarArgs,
        }
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("s.yaml");
        std::fs::write(&config, "workload_api:\n  socket: /run/a/workload.sock\n").unwrap();
        let config = config.to_str().unwrap();
        let socket = |argv: &[&str]| {
            Cli::try_parse_from([&["trellis", "--config", config], argv].concat())
                .unwrap()
                .args
                .merged()
                .unwrap()
                .workload_api
                .socket
        };
        assert_eq!(socket(&[]), Some(PathBuf::from("/run/a/workload.sock")));
        assert_eq!(
            socket(&["--workload-api-socket", "/run/b/w.sock"]),
            Some(PathBuf::from("/run/b/w.sock"))
        );
    }

    #[test]
    fn default_route_flag_parses_and_checks_templates() {
        let r = parse_default_route(
            "hosts={service}.{namespace}.svc.cluster.local;{service}.{namespace},\
             address={service}.{namespace}.svc.cluster.local:15443,\
             identity=spiffe://{trust_domain}/ns/{namespace}/sa/{service},max_peers=7",
        )
        .unwrap();
        assert_eq!(r.hosts.len(), 2);
        assert_eq!(r.max_peers, Some(7));
        let e = parse_default_route("hosts={svc}.{namespace},address=x:1,identity=spiffe://a/b")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown placeholder `{svc}`"), "{e}");
        let e = parse_default_route("hosts={service},identity=spiffe://a/b")
            .unwrap_err()
            .to_string();
        assert!(e.contains("`address=` is required"), "{e}");
    }

    #[test]
    fn upstream_flag_parses() {
        let u = parse_upstream(
            "name=b,address=127.0.0.1:15443,identity=spiffe://example.org/b,hosts=b;b.prod",
        )
        .unwrap();
        assert_eq!(u.hosts, ["b", "b.prod"]);
        assert!(parse_upstream("name=b")
            .unwrap_err()
            .to_string()
            .contains("address="));
        assert!(parse_upstream("name=b,adress=x")
            .unwrap_err()
            .to_string()
            .contains("unknown key `adress`"));
    }
}
