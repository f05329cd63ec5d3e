//! `trellis demo`: a local mesh on loopback with the embedded defaults. A control plane
//! (self-signed CA, SQLite in a temp dir), two demo apps and their sidecars, which attest with
//! join tokens and get their SVIDs over SDS; then requests cross the mesh and each side says
//! what it saw.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{bail, ensure, Context};
use bytes::Bytes;
use clap::Args;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use trellis_control::config::{ControlFile, ControlSettings};
use trellis_control::server::ControlPlane;
use trellis_identity::tls::{client_config, PeerMatch, SpiffeServerVerifier, TlsPolicy};
use trellis_identity::SpiffeId;
use trellis_sidecar::config::{SdsFile, SidecarFile, UpstreamFile};
use trellis_sidecar::{Sidecar, SidecarSettings};

/// `trellis demo` flags.
#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Run the checks once and exit 0 only if they pass.
    #[arg(long)]
    once: bool,
    /// How often the demo rotates SVIDs.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    rotate_every: Duration,
}

/// Runs the demo.
pub fn run(args: DemoArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(demo(args))
}

const A: &str = "spiffe://example.org/ns/demo/sa/service-a";
const B: &str = "spiffe://example.org/ns/demo/sa/service-b";

/// A demo app: answers every request with what it saw, including the caller the sidecar
/// vouched for in `x-forwarded-client-cert`.
async fn demo_app(name: &'static str) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(move |req: http::Request<Incoming>| async move {
                        let xfcc = req
                            .headers()
                            .get("x-forwarded-client-cert")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("-")
                            .to_owned();
                        let body = format!(
                            "{name} got {} {} xfcc={xfcc}\n",
                            req.method(),
                            req.uri().path()
                        );
                        Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                            Bytes::from(body),
                        )))
                    });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    Ok(addr)
}

fn sidecar_file(
    cp: &ControlPlane,
    token: &str,
    id: &str,
    app: SocketAddr,
    upstreams: Vec<UpstreamFile>,
) -> anyhow::Result<SidecarFile> {
    let mut f = SidecarFile {
        trust_domain: Some("example.org".into()),
        admin: Some("127.0.0.1:0".parse()?),
        ..Default::default()
    };
    f.identity.sds = Some(SdsFile {
        control_plane: Some(cp.sds_addr.to_string()),
        control_bundle: Some(cp.bundle_path.clone()),
        join_token: Some(token.to_owned()),
        spiffe_id: Some(id.to_owned()),
        ..Default::default()
    });
    f.inbound.listen = Some("127.0.0.1:0".parse()?);
    f.inbound.app = Some(app);
    f.outbound.listen = Some("127.0.0.1:0".parse()?);
    f.outbound.upstreams = upstreams;
    Ok(f)
}

fn upstream(name: &str, address: SocketAddr, identity: &str) -> UpstreamFile {
    UpstreamFile {
        name: name.into(),
        listen: None,
        hosts: vec![name.into()],
        address: address.to_string(),
        identity: identity.into(),
        protocol: Default::default(),
    }
}

/// One request from "app A" to its sidecar's outbound port, HTTP/1.1 with `Host`, or h2c with
/// `:authority` naming the upstream.
async fn call(
    outbound: SocketAddr,
    host: &str,
    path: &str,
    h2: bool,
) -> anyhow::Result<(u16, String)> {
    let resp = if h2 {
        let tcp = tokio::net::TcpStream::connect(outbound).await?;
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)).await?;
        tokio::spawn(conn);
        let req =
            http::Request::get(format!("http://{host}{path}")).body(Full::new(Bytes::new()))?;
        sender.send_request(req).await?
    } else {
        let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
        let req = http::Request::get(format!("http://{outbound}{path}"))
            .header(http::header::HOST, host)
            .body(Full::new(Bytes::new()))?;
        client.request(req).await?
    };
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).trim_end().to_owned()))
}

/// What sidecar A's outbound side sees of B: a handshake with A's own SVID, verifying B's ID.
async fn probe(a: &Sidecar, b_inbound: SocketAddr, expect: &SpiffeId) -> anyhow::Result<String> {
    let verifier = SpiffeServerVerifier::new(a.store.bundle(), PeerMatch::Exact(expect.clone()));
    let config = client_config(
        Some(a.store.resolver()),
        verifier,
        TlsPolicy::Tls13,
        &[b"h2"],
    )?;
    let tcp = tokio::net::TcpStream::connect(b_inbound).await?;
    let name = rustls::pki_types::ServerName::try_from("service-b")?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await?;
    let (_, conn) = tls.get_ref();
    let leaf = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .context("no peer certificate")?;
    let facts = trellis_identity::cert_facts(leaf)?;
    let left = facts
        .not_after
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    Ok(format!(
        "{:?}, {:?}, peer {} (serial {}, expires in {})",
        conn.protocol_version().context("no version")?,
        conn.negotiated_cipher_suite()
            .map(|s| s.suite())
            .context("no suite")?,
        facts.leaf_spiffe_id()?,
        facts.serial_hex,
        humantime::format_duration(Duration::from_secs(left.as_secs()))
    ))
}

async fn demo(args: DemoArgs) -> anyhow::Result<()> {
    let state = tempfile::Builder::new()
        .prefix("trellis-demo-")
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .tempdir()
        .context("cannot create a temp dir")?;
    let file = ControlFile {
        trust_domain: Some("example.org".into()),
        listen: Some("127.0.0.1:0".parse()?),
        admin: Some("127.0.0.1:0".parse()?),
        state_dir: Some(state.path().to_owned()),
        svid_ttl: Some(Duration::from_secs(3600)),
        rotate_every: Some(args.rotate_every),
        ..Default::default()
    };
    let cp = ControlPlane::start(ControlSettings::from_file(file)?).await?;
    println!(
        "control plane   sds={}  admin=http://{}",
        cp.sds_addr, cp.admin_addr
    );
    println!(
        "  state dir     {}  (embedded self-signed CA, SQLite, audit.log)",
        state.path().display()
    );

    let (a_id, b_id) = (SpiffeId::parse(A)?, SpiffeId::parse(B)?);
    let ttl = Duration::from_secs(600);
    let token_a = cp
        .registry
        .create_join_token(&a_id, ttl, SystemTime::now())?;
    let token_b = cp
        .registry
        .create_join_token(&b_id, ttl, SystemTime::now())?;
    let app_a = demo_app("service-a").await?;
    let app_b = demo_app("service-b").await?;

    let b = Sidecar::start(SidecarSettings::from_file(sidecar_file(
        &cp,
        &token_b,
        B,
        app_b,
        vec![],
    )?)?)
    .await?;
    let upstreams = vec![
        upstream("service-b", b.inbound_addr, B),
        // Points at service-b's sidecar but expects another identity: the handshake must fail.
        upstream(
            "impostor",
            b.inbound_addr,
            "spiffe://example.org/ns/demo/sa/service-c",
        ),
    ];
    let a = Sidecar::start(SidecarSettings::from_file(sidecar_file(
        &cp, &token_a, A, app_a, upstreams,
    )?)?)
    .await?;
    for (name, s) in [("service-a", &a), ("service-b", &b)] {
        ensure!(
            s.wait_ready(Duration::from_secs(15)).await,
            "{name}'s sidecar got no SVID"
        );
        let svid = s.store.current().context("no SVID")?;
        println!(
            "sidecar {name}  inbound=https://{}  admin=http://{}  {} serial {} (SVID over SDS, key made in the sidecar)",
            s.inbound_addr,
            s.admin_addr,
            svid.spiffe_id(),
            svid.serial_hex()
        );
    }
    let a_out = a.outbound_addr().context("no shared outbound listener")?;
    println!("app service-a -> http://{a_out} (Host: service-b) -> mTLS -> service-b's sidecar -> app service-b");

    println!(
        "service-a's sidecar sees: {}",
        probe(&a, b.inbound_addr, &b_id).await?
    );
    let (status, body) = call(a_out, "service-b", "/hello", false).await?;
    ensure!(
        status == 200,
        "HTTP/1.1 through the mesh answered {status}: {body}"
    );
    ensure!(
        body.contains(&format!("URI={A}")),
        "service-b did not see service-a's identity: {body}"
    );
    println!("  HTTP/1.1  {status}  {body}");
    let (status, body) = call(a_out, "service-b", "/over-h2c", true).await?;
    ensure!(
        status == 200,
        "h2c through the mesh answered {status}: {body}"
    );
    println!("  h2c       {status}  {body}");
    for i in 0..98 {
        let (status, body) = call(a_out, "service-b", &format!("/n/{i}"), false).await?;
        ensure!(status == 200, "request {i} answered {status}: {body}");
    }
    let conns = a.metrics.upstream_connections.get();
    println!("  100 requests rode {conns} mTLS connection(s) to service-b's sidecar");
    let (status, body) = call(a_out, "impostor", "/", false).await?;
    ensure!(
        status == 502,
        "a peer with the wrong identity answered {status}: {body}"
    );
    println!("  wrong identity expected: {status}  {body}");
    println!("checks passed");

    if args.once {
        a.shutdown().await;
        b.shutdown().await;
        cp.shutdown().await;
        return Ok(());
    }
    println!();
    println!("try:  curl -s -H 'Host: service-b' http://{a_out}/anything");
    println!("      curl -s --http2-prior-knowledge -H 'Host: service-b' http://{a_out}/h2");
    println!(
        "      curl -s http://{}/certs     # service-a's SVID and bundle",
        a.admin_addr
    );
    println!(
        "      curl -s http://{}/metrics | grep trellis_",
        a.admin_addr
    );
    println!("      cat {}/audit.log", state.path().display());
    println!(
        "SVIDs rotate every {}; Ctrl-C to stop",
        humantime::format_duration(args.rotate_every)
    );
    let mut generation = a.store.subscribe();
    loop {
        tokio::select! {
            () = crate::signal::shutdown_signal() => break,
            changed = generation.changed() => {
                if changed.is_err() {
                    bail!("service-a's sidecar stopped");
                }
                if let Some(svid) = a.store.current() {
                    println!("  service-a rotated: serial {}", svid.serial_hex());
                }
            }
        }
    }
    a.shutdown().await;
    b.shutdown().await;
    cp.shutdown().await;
    Ok(())
}
