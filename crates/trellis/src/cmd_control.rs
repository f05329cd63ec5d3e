//! `trellis control`: flags and env over the YAML file, then run until SIGINT/SIGTERM or an
//! admin `POST /shutdown`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use trellis_control::config::{ControlFile, ControlSettings};
use trellis_control::registry::DatabaseUrl;
use trellis_control::server::ControlPlane;
use trellis_identity::tls::KeyExchange;

/// `trellis control` flags; each overrides the same field of `--config`.
#[derive(Args, Debug)]
pub struct ControlArgs {
    /// YAML config file (fields: trust_domain, listen, admin, state_dir, operator_socket,
    /// svid_ttl, rotate_every,
    /// issuance_retention, jwt_svid_ttl, jwt_key_rotate_every, ca_cert, ca_key, ca_bundle,
    /// pkcs11_module, pkcs11_pin_file, pkcs11_sessions, log_key, k8s_jwks, k8s_issuer, k8s_audience,
    /// k8s_jwks_url, k8s_ca, k8s_token, k8s_jwks_refresh, webhook_listen, webhook_dns_names,
    /// sidecar_image, sidecar_control_plane, native_sidecar, no_proxy, sidecar_default_route, database, and `limits:` nested per listener:
    /// limits.sds.{max_connections, handshake_timeout, max_streams_per_connection, rate_limit,
    /// rate_burst, rate_limit_loopback, max_message_bytes, max_header_list_bytes,
    /// max_pending_resets}, limits.admin.{max_connections, header_read_timeout,
    /// max_header_bytes, idle_timeout, max_streams_per_connection, max_pending_resets},
    /// limits.webhook.{max_connections, max_header_bytes, max_body_bytes, body_timeout,
    /// header_read_timeout, handshake_timeout}, limits.k8s.{max_jwt_bytes, max_jwks_bytes,
    /// jwks_fetch_timeout}, limits.federation.{min_refresh, max_refresh, fetch_timeout,
    /// max_bundle_bytes}, bundle_endpoint, bundle_refresh_hint, and the `federation:` list,
    /// reloaded when the file changes; examples/control.yaml shows them all).
    #[arg(long, env = "TRELLIS_CONFIG")]
    config: Option<PathBuf>,
    /// Trust domain, e.g. example.org.
    #[arg(long, env = "TRELLIS_TRUST_DOMAIN")]
    trust_domain: Option<String>,
    /// SDS (gRPC over TLS) listen address [default: 0.0.0.0:8443].
    #[arg(long, env = "TRELLIS_LISTEN")]
    listen: Option<SocketAddr>,
    /// Admin HTTP listen address [default: 127.0.0.1:9090].
    #[arg(long, env = "TRELLIS_ADMIN")]
    admin: Option<SocketAddr>,
    /// State directory: database, CA, audit log, bundle.pem [default: /var/lib/trellis].
    #[arg(long, env = "TRELLIS_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Unix socket (mode 0600) of the operator API that `trellis token create` and
    /// `trellis ca rotate` use [default: <state-dir>/operator.sock].
    #[arg(long, env = "TRELLIS_OPERATOR_SOCKET")]
    operator_socket: Option<PathBuf>,
    /// SVID lifetime [default: 24h].
    #[arg(long, env = "TRELLIS_SVID_TTL", value_parser = humantime::parse_duration)]
    svid_ttl: Option<Duration>,
    /// How often each workload gets a fresh SVID, minus up to 10% jitter [default: 1h].
    #[arg(long, env = "TRELLIS_ROTATE_EVERY", value_parser = humantime::parse_duration)]
    rotate_every: Option<Duration>,
    /// Issuance records are deleted this long after their SVID expired [default: 7d].
    #[arg(long, env = "TRELLIS_ISSUANCE_RETENTION", value_parser = humantime::parse_duration)]
    issuance_retention: Option<Duration>,
    /// JWT-SVID lifetime, 10s to 24h [default: 5m].
    #[arg(long, env = "TRELLIS_JWT_SVID_TTL", value_parser = humantime::parse_duration)]
    jwt_svid_ttl: Option<Duration>,
    /// How long each JWT signing key signs; its successor is published half of this before
    /// it signs, and it stays published until its last token expired [default: 24h].
    #[arg(long, env = "TRELLIS_JWT_KEY_ROTATE_EVERY", value_parser = humantime::parse_duration)]
    jwt_key_rotate_every: Option<Duration>,
    /// Intermediate CA certificate to sign with (from `trellis ca init`).
    #[arg(long, env = "TRELLIS_CA_CERT", requires = "ca_key")]
    ca_cert: Option<PathBuf>,
    /// Intermediate CA private key: a PEM file, or a key in a PKCS#11 token as an RFC 7512
    /// URI, 'pkcs11:token=LABEL;object=LABEL' (or id=%XX…), with --pkcs11-module and
    /// --pkcs11-pin-file.
    #[arg(long, env = "TRELLIS_CA_KEY", requires = "ca_cert")]
    ca_key: Option<PathBuf>,
    /// PKCS#11 module (the HSM vendor's .so) that holds pkcs11: keys, e.g.
    /// /usr/lib/softhsm/libsofthsm2.so.
    #[arg(long, env = "TRELLIS_PKCS11_MODULE", value_name = "PATH")]
    pkcs11_module: Option<PathBuf>,
    /// File holding the token's user PIN (the PIN is never a flag, never logged).
    #[arg(long, env = "TRELLIS_PKCS11_PIN_FILE", value_name = "PATH")]
    pkcs11_pin_file: Option<PathBuf>,
    /// PKCS#11 sessions per token: how many signatures run at once [default: 4].
    #[arg(long, env = "TRELLIS_PKCS11_SESSIONS", value_name = "N")]
    pkcs11_sessions: Option<usize>,
    /// Transparency-log signing key in a PKCS#11 token ('pkcs11:token=…;object=…')
    /// [default: a key kept in the database].
    #[arg(long, env = "TRELLIS_LOG_KEY", value_name = "URI")]
    log_key: Option<String>,
    /// Trust bundle (root CAs) for the intermediate [default: the self-signed root in --ca-cert].
    #[arg(long, env = "TRELLIS_CA_BUNDLE")]
    ca_bundle: Option<PathBuf>,
    /// JWKS file with the Kubernetes service-account issuer's public keys.
    #[arg(long, env = "TRELLIS_K8S_JWKS")]
    k8s_jwks: Option<PathBuf>,
    /// Expected `iss` of Kubernetes tokens.
    #[arg(long, env = "TRELLIS_K8S_ISSUER")]
    k8s_issuer: Option<String>,
    /// Expected `aud` of Kubernetes tokens [default: trellis].
    #[arg(long, env = "TRELLIS_K8S_AUDIENCE")]
    k8s_audience: Option<String>,
    /// Serve the sidecar injection webhook (HTTPS, POST /inject) on this address, e.g.
    /// 0.0.0.0:8444 [default: off].
    #[arg(long, env = "TRELLIS_WEBHOOK_LISTEN")]
    webhook_listen: Option<SocketAddr>,
    /// Serve the SPIFFE bundle endpoint (HTTPS with the control plane's SVID, GET /) on this
    /// address, e.g. 0.0.0.0:8446 [default: off].
    #[arg(long, env = "TRELLIS_BUNDLE_ENDPOINT")]
    bundle_endpoint: Option<SocketAddr>,
    /// DNS name of the webhook's serving certificate (issued by the control plane's CA);
    /// repeatable or comma-separated [default: trellis-control.trellis-system.svc].
    #[arg(
        long = "webhook-dns-name",
        env = "TRELLIS_WEBHOOK_DNS_NAME",
        value_delimiter = ','
    )]
    webhook_dns_names: Vec<String>,
    /// Image of the sidecar container the webhook injects
    /// [default: ghcr.io/trellis-mesh/trellis:0.1.0].
    #[arg(long, env = "TRELLIS_SIDECAR_IMAGE")]
    sidecar_image: Option<String>,
    /// Control plane address (host:port) injected sidecars connect to
    /// [default: trellis-control.trellis-system.svc:8443].
    #[arg(long, env = "TRELLIS_SIDECAR_CONTROL_PLANE")]
    sidecar_control_plane: Option<String>,
    /// Inject the sidecar as a native sidecar (an init container with restartPolicy Always,
    /// Kubernetes 1.29+); false: an ordinary container, for older clusters. A pod's
    /// trellis.io/native-sidecar annotation wins [default: true].
    #[arg(long, env = "TRELLIS_NATIVE_SIDECAR", value_name = "BOOL")]
    native_sidecar: Option<bool>,
    /// NO_PROXY entries injected app containers get besides localhost and the pod's own
    /// address, comma-separated (hosts, .domains, addresses, CIDRs); a pod's trellis.io/no-proxy
    /// adds more [default: none].
    #[arg(
        long,
        env = "TRELLIS_NO_PROXY",
        value_name = "LIST",
        value_delimiter = ','
    )]
    no_proxy: Vec<String>,
    /// Convention route every injected sidecar gets as TRELLIS_DEFAULT_ROUTE, in its syntax:
    /// `hosts={service}.{namespace}.svc.cluster.local;{service}.{namespace},address={service}.{namespace}.svc.cluster.local:15443,identity=spiffe://{trust_domain}/ns/{namespace}/sa/{service}[,max_peers=N]`,
    /// checked at start as the sidecar checks it; a pod's trellis.io/default-route replaces it
    /// ("false": none) [default: none].
    #[arg(long, env = "TRELLIS_SIDECAR_DEFAULT_ROUTE", value_name = "ROUTE")]
    sidecar_default_route: Option<String>,
    /// Fetch the issuer's JWKS from this URL instead of a file, at start and every
    /// --k8s-jwks-refresh, e.g. https://kubernetes.default.svc/openid/v1/jwks.
    #[arg(long, env = "TRELLIS_K8S_JWKS_URL", conflicts_with = "k8s_jwks")]
    k8s_jwks_url: Option<String>,
    /// CA file that verifies --k8s-jwks-url's server
    /// [default: /var/run/secrets/kubernetes.io/serviceaccount/ca.crt].
    #[arg(long, env = "TRELLIS_K8S_CA")]
    k8s_ca: Option<PathBuf>,
    /// Bearer token file sent to --k8s-jwks-url, read again on each fetch
    /// [default: /var/run/secrets/kubernetes.io/serviceaccount/token].
    #[arg(long, env = "TRELLIS_K8S_TOKEN")]
    k8s_token: Option<PathBuf>,
    /// How often --k8s-jwks-url is fetched again; a failed fetch keeps the keys [default: 5m].
    #[arg(long, env = "TRELLIS_K8S_JWKS_REFRESH", value_parser = humantime::parse_duration)]
    k8s_jwks_refresh: Option<Duration>,
    /// TLS key exchange of the SDS listener, the webhook and the control plane's clients:
    /// X25519MLKEM768 first with X25519 and P-256 fallbacks (`pq-preferred`), X25519MLKEM768
    /// only (`pq-only`), or no post-quantum group (`classical`) [default: pq-preferred].
    #[arg(
        long,
        env = "TRELLIS_TLS_KEY_EXCHANGE",
        value_name = "pq-preferred|pq-only|classical"
    )]
    tls_key_exchange: Option<KeyExchange>,
    /// Where join tokens, issuance records and CA rotations live: postgres://USER:PASSWORD@HOST:5432/DB
    /// shared by replicas (add ?sslmode=verify-full&sslrootcert=CA.pem off loopback), or
    /// sqlite://PATH [default: SQLite in --state-dir].
    // hide_env_values: `--help` must not print the password from TRELLIS_DATABASE.
    #[arg(
        long,
        env = "TRELLIS_DATABASE",
        value_name = "URL",
        hide_env_values = true
    )]
    database: Option<DatabaseUrl>,
    /// Most SDS connections open at once, TLS handshakes included; more are closed on accept
    /// [default: 20000].
    #[arg(long, env = "TRELLIS_SDS_MAX_CONNECTIONS")]
    sds_max_connections: Option<usize>,
    /// How long an SDS client may take to finish its TLS handshake [default: 10s].
    #[arg(long, env = "TRELLIS_SDS_HANDSHAKE_TIMEOUT", value_parser = humantime::parse_duration)]
    sds_handshake_timeout: Option<Duration>,
    /// Most concurrent HTTP/2 streams on one SDS connection [default: 128].
    #[arg(long, env = "TRELLIS_SDS_MAX_STREAMS_PER_CONNECTION")]
    sds_max_streams_per_connection: Option<u32>,
    /// SDS stream opens (attestations) per second per source IP; over it: RESOURCE_EXHAUSTED;
    /// 0 turns the limit off [default: 10].
    #[arg(long, env = "TRELLIS_SDS_RATE_LIMIT")]
    sds_rate_limit: Option<f64>,
    /// SDS stream opens one source IP may make at once before the rate applies [default: 50].
    #[arg(long, env = "TRELLIS_SDS_RATE_BURST")]
    sds_rate_burst: Option<u32>,
    /// Rate-limit loopback peers too (127.0.0.0/8, ::1 are exempt by default).
    #[arg(long, env = "TRELLIS_SDS_RATE_LIMIT_LOOPBACK")]
    sds_rate_limit_loopback: bool,
    /// Most admin connections open at once [default: 64].
    #[arg(long, env = "TRELLIS_ADMIN_MAX_CONNECTIONS")]
    admin_max_connections: Option<usize>,
    /// Most webhook connections open at once [default: 256].
    #[arg(long, env = "TRELLIS_WEBHOOK_MAX_CONNECTIONS")]
    webhook_max_connections: Option<usize>,
    /// Largest SDS request message decoded, in bytes; larger: the stream fails
    /// [default: 262144].
    #[arg(long, env = "TRELLIS_SDS_MAX_MESSAGE_BYTES")]
    sds_max_message_bytes: Option<usize>,
    /// Largest HTTP/2 header list on an SDS connection, in bytes; must hold a --max-jwt-bytes
    /// JWT [default: 16384].
    #[arg(long, env = "TRELLIS_SDS_MAX_HEADER_LIST_BYTES")]
    sds_max_header_list_bytes: Option<u32>,
    /// Streams an SDS client may reset before they are accepted (HTTP/2 rapid reset); past
    /// it: GOAWAY [default: 20].
    #[arg(long, env = "TRELLIS_SDS_MAX_PENDING_RESETS")]
    sds_max_pending_resets: Option<usize>,
    /// How long an admin client may take to send its request head [default: 10s].
    #[arg(long, env = "TRELLIS_ADMIN_HEADER_READ_TIMEOUT", value_parser = humantime::parse_duration)]
    admin_header_read_timeout: Option<Duration>,
    /// Largest admin request head (HTTP/1.1; larger: 431) or header list (HTTP/2), in bytes
    /// [default: 16384].
    #[arg(long, env = "TRELLIS_ADMIN_MAX_HEADER_BYTES")]
    admin_max_header_bytes: Option<usize>,
    /// Admin connections that move no bytes for this long are closed [default: 60s].
    #[arg(long, env = "TRELLIS_ADMIN_IDLE_TIMEOUT", value_parser = humantime::parse_duration)]
    admin_idle_timeout: Option<Duration>,
    /// HTTP/2 streams open at once on one admin connection [default: 16].
    #[arg(long, env = "TRELLIS_ADMIN_MAX_STREAMS_PER_CONNECTION")]
    admin_max_streams_per_connection: Option<u32>,
    /// HTTP/2 streams an admin client may reset before they are accepted (rapid reset)
    /// [default: 20].
    #[arg(long, env = "TRELLIS_ADMIN_MAX_PENDING_RESETS")]
    admin_max_pending_resets: Option<usize>,
    /// Largest webhook request head in bytes; longer heads get 431 [default: 65536].
    #[arg(long, env = "TRELLIS_WEBHOOK_MAX_HEADER_BYTES")]
    webhook_max_header_bytes: Option<usize>,
    /// Largest AdmissionReview the webhook reads, in bytes; larger: 413 [default: 2097152].
    #[arg(long, env = "TRELLIS_WEBHOOK_MAX_BODY_BYTES")]
    webhook_max_body_bytes: Option<usize>,
    /// How long a webhook request body may take to arrive; slower: 408 [default: 10s].
    #[arg(long, env = "TRELLIS_WEBHOOK_BODY_TIMEOUT", value_parser = humantime::parse_duration)]
    webhook_body_timeout: Option<Duration>,
    /// How long a webhook client may take to send its request head [default: 10s].
    #[arg(long, env = "TRELLIS_WEBHOOK_HEADER_READ_TIMEOUT", value_parser = humantime::parse_duration)]
    webhook_header_read_timeout: Option<Duration>,
    /// How long a webhook client may take to finish its TLS handshake [default: 10s].
    #[arg(long, env = "TRELLIS_WEBHOOK_HANDSHAKE_TIMEOUT", value_parser = humantime::parse_duration)]
    webhook_handshake_timeout: Option<Duration>,
    /// Largest Kubernetes service-account JWT accepted, in bytes; larger: INVALID_ARGUMENT
    /// [default: 8192].
    #[arg(long, env = "TRELLIS_MAX_JWT_BYTES")]
    max_jwt_bytes: Option<usize>,
    /// Largest JWKS (--k8s-jwks file or --k8s-jwks-url body), in bytes [default: 1048576].
    #[arg(long, env = "TRELLIS_MAX_JWKS_BYTES")]
    max_jwks_bytes: Option<usize>,
    /// How long one fetch of --k8s-jwks-url may take [default: 10s].
    #[arg(long, env = "TRELLIS_JWKS_FETCH_TIMEOUT", value_parser = humantime::parse_duration)]
    jwks_fetch_timeout: Option<Duration>,
}

impl ControlArgs {
    /// The file (if any) with flags applied over it.
    pub fn merged(self) -> anyhow::Result<ControlFile> {
        let mut f = match &self.config {
            Some(path) => ControlFile::load(path)?,
            None => ControlFile::default(),
        };
        macro_rules! over {
            ($($field:ident),*) => { $( if self.$field.is_some() { f.$field = self.$field; } )* };
        }
        over!(
            trust_domain,
            listen,
            admin,
            state_dir,
            operator_socket,
            svid_ttl,
            rotate_every,
            issuance_retention,
            jwt_svid_ttl,
            jwt_key_rotate_every,
            ca_cert,
            ca_key,
            ca_bundle,
            k8s_jwks,
            k8s_issuer,
            k8s_audience,
            k8s_jwks_url,
            k8s_ca,
            k8s_token,
            k8s_jwks_refresh
        );
        over!(
            webhook_listen,
            sidecar_image,
            sidecar_control_plane,
            native_sidecar,
            sidecar_default_route
        );
        over!(database, tls_key_exchange, bundle_endpoint);
        over!(pkcs11_module, pkcs11_pin_file, pkcs11_sessions, log_key);
        // The flags kept their flat names; each sets one key of the nested `limits:`.
        macro_rules! limits {
            ($($flag:ident => $group:ident . $key:ident),* $(,)?) => {
                $( if self.$flag.is_some() { f.limits.$group.$key = self.$flag; } )*
            };
        }
        limits!(
            sds_max_connections => sds.max_connections,
            sds_handshake_timeout => sds.handshake_timeout,
            sds_max_streams_per_connection => sds.max_streams_per_connection,
            sds_rate_limit => sds.rate_limit,
            sds_rate_burst => sds.rate_burst,
            sds_max_message_bytes => sds.max_message_bytes,
            sds_max_header_list_bytes => sds.max_header_list_bytes,
            sds_max_pending_resets => sds.max_pending_resets,
            admin_max_connections => admin.max_connections,
            admin_header_read_timeout => admin.header_read_timeout,
            admin_max_header_bytes => admin.max_header_bytes,
            admin_idle_timeout => admin.idle_timeout,
            admin_max_streams_per_connection => admin.max_streams_per_connection,
            admin_max_pending_resets => admin.max_pending_resets,
            webhook_max_connections => webhook.max_connections,
            webhook_max_header_bytes => webhook.max_header_bytes,
            webhook_max_body_bytes => webhook.max_body_bytes,
            webhook_body_timeout => webhook.body_timeout,
            webhook_header_read_timeout => webhook.header_read_timeout,
            webhook_handshake_timeout => webhook.handshake_timeout,
            max_jwt_bytes => k8s.max_jwt_bytes,
            max_jwks_bytes => k8s.max_jwks_bytes,
            jwks_fetch_timeout => k8s.jwks_fetch_timeout,
        );
        if self.sds_rate_limit_loopback {
            f.limits.sds.rate_limit_loopback = Some(true);
        }
        if !self.no_proxy.is_empty() {
            f.no_proxy = Some(self.no_proxy);
        }
        if !self.webhook_dns_names.is_empty() {
            f.webhook_dns_names = Some(self.webhook_dns_names);
        }
        Ok(f)
    }
}

/// The settings of a merged file, with the injector's `sidecar_default_route` checked by the
/// sidecar's own parser (the control plane's library cannot import the sidecar's).
fn settings(f: ControlFile) -> anyhow::Result<ControlSettings> {
    let mut settings = ControlSettings::from_file(f)?;
    if let Some(webhook) = settings.webhook.as_mut() {
        webhook.check_default_route(
            trellis_sidecar::config::check_default_route,
            settings.trust_domain.as_str(),
        )?;
    }
    Ok(settings)
}

/// Runs the control plane until a signal or an admin `POST /shutdown`.
pub fn run(args: ControlArgs) -> anyhow::Result<()> {
    let config_path = args.config.clone();
    let mut settings = settings(args.merged()?)?;
    // The `federation:` list of this file is reloaded when the file changes.
    settings.config_path = config_path;
    trellis_identity::tls::install_key_exchange(settings.tls_key_exchange)?;
    // One TLS and HTTP/2 connection per sidecar, nearly all idle between pushes: drop their
    // buffers while idle (the patched h2 and rustls in third_party/; docs/benchmarks.md,
    // "Control plane: memory per sidecar", has what each saves).
    h2::release_idle_buffers(true);
    rustls::release_idle_read_buffers(true);
    // Issuance and attestation run on the blocking pool; a small pool keeps a burst of
    // thousands of streams from spawning hundreds of threads (and their malloc arenas).
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(16)
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let cp = ControlPlane::start(settings).await?;
        // After many sidecars' connections close, the memory aws-lc held for them goes back
        // (alloc.rs says why).
        tokio::spawn(crate::alloc::return_freed_c_heap());
        // Tests and scripts read this line to learn the bound ports (port 0 is allowed).
        let webhook = cp
            .webhook_addr
            .map(|a| format!(" webhook={a}"))
            .unwrap_or_default();
        let bundle_endpoint = cp
            .bundle_endpoint_addr
            .map(|a| format!(" bundle_endpoint={a}"))
            .unwrap_or_default();
        println!(
            "trellis control listening sds={} admin={}{webhook}{bundle_endpoint} operator={}",
            cp.sds_addr,
            cp.admin_addr,
            cp.operator_socket.display()
        );
        tokio::select! {
            () = crate::signal::shutdown_signal() => tracing::info!("signal received; shutting down"),
            () = cp.shutdown_requested() => {
                tracing::info!("shutdown requested on the admin endpoint; shutting down");
            }
        }
        cp.shutdown().await;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limit_flags_override_the_file_and_are_checked() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            args: ControlArgs,
        }
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("c.yaml");
        std::fs::write(
            &config,
            "trust_domain: example.org\nlimits:\n  k8s: { max_jwt_bytes: 2048 }\n  \
             admin: { idle_timeout: 5s }\n  webhook: { max_body_bytes: 65536 }\n",
        )
        .unwrap();
        let config = config.to_str().unwrap();
        let settings = |argv: &[&str]| {
            let args = Cli::try_parse_from([&["trellis", "--config", config], argv].concat())
                .map_err(|e| e.to_string())?
                .args;
            ControlSettings::from_file(args.merged().map_err(|e| e.to_string())?)
                .map_err(|e| e.to_string())
        };
        let s = settings(&[]).unwrap();
        assert_eq!(s.limits.k8s.max_jwt_bytes, 2048);
        assert_eq!(
            s.limits.admin.server.idle_timeout,
            Some(Duration::from_secs(5))
        );
        assert_eq!(s.limits.webhook.max_body_bytes, 65536);
        assert_eq!(s.limits.sds.max_message_bytes, 256 * 1024);
        let s = settings(&[
            "--max-jwt-bytes",
            "4096",
            "--admin-idle-timeout",
            "90s",
            "--sds-max-message-bytes",
            "8192",
            "--sds-max-header-list-bytes",
            "32768",
            "--sds-max-pending-resets",
            "7",
            "--admin-header-read-timeout",
            "2s",
            "--admin-max-header-bytes",
            "20000",
            "--webhook-body-timeout",
            "3s",
            "--webhook-header-read-timeout",
            "4s",
            "--webhook-handshake-timeout",
            "6s",
            "--max-jwks-bytes",
            "5000",
            "--jwks-fetch-timeout",
            "7s",
        ])
        .unwrap();
        let l = s.limits;
        assert_eq!(l.k8s.max_jwt_bytes, 4096);
        assert_eq!(l.admin.server.idle_timeout, Some(Duration::from_secs(90)));
        assert_eq!(l.webhook.max_body_bytes, 65536, "from the file");
        assert_eq!(l.sds.max_message_bytes, 8192);
        assert_eq!(l.sds.max_header_list_bytes, 32768);
        assert_eq!(l.sds.max_pending_resets, 7);
        assert_eq!(l.admin.server.header_read_timeout, Duration::from_secs(2));
        assert_eq!(l.admin.server.max_header_bytes, 20000);
        assert_eq!(l.webhook.body_timeout, Duration::from_secs(3));
        assert_eq!(l.webhook.header_read_timeout, Duration::from_secs(4));
        assert_eq!(l.webhook.handshake_timeout, Duration::from_secs(6));
        assert_eq!(l.k8s.max_jwks_bytes, 5000);
        assert_eq!(l.k8s.jwks_fetch_timeout, Duration::from_secs(7));
        // Out of range on the command line: the field is named (as it is in the file).
        let err = settings(&["--admin-max-header-bytes", "100"]).unwrap_err();
        assert!(err.contains("limits.admin.max_header_bytes"), "{err}");
        let err = settings(&["--webhook-max-body-bytes", "soon"]).unwrap_err();
        assert!(err.contains("--webhook-max-body-bytes"), "{err}");
    }

    #[test]
    fn sidecar_default_route_is_checked_at_start_by_the_sidecars_parser() {
        let with_route = |route: &str| {
            settings(ControlFile {
                trust_domain: Some("example.org".into()),
                webhook_listen: Some("127.0.0.1:0".parse().unwrap()),
                sidecar_default_route: Some(route.into()),
                ..Default::default()
            })
        };
        let good = "hosts={service}.{namespace}.svc.cluster.local;{service}.{namespace},\
                    address={service}.{namespace}.svc.cluster.local:15443,\
                    identity=spiffe://{trust_domain}/ns/{namespace}/sa/{service}";
        let s = with_route(good).unwrap();
        let w = s.webhook.unwrap();
        assert_eq!(w.sidecar_default_route.as_deref(), Some(good));
        assert!(w.default_route_check.is_some());
        for (bad, why) in [
            (
                "hosts={svc}.{namespace},address=x:15443,identity=spiffe://{trust_domain}/x",
                "unknown placeholder `{svc}`",
            ),
            (
                "hosts={service},address={service}:15443,identity=spiffe://other.org/{service}",
                "not in trust domain `example.org`",
            ),
            (
                "hosts={service},address={service},identity=spiffe://{trust_domain}/{service}",
                "literal port",
            ),
            (
                "hosts={service},identity=spiffe://{trust_domain}/x",
                "`address=` is required",
            ),
        ] {
            let err = with_route(bad).unwrap_err().to_string();
            assert!(
                err.contains("sidecar_default_route") && err.contains(why),
                "{bad}: {err}"
            );
        }
    }
}
