//! `trellis demo`: a control plane with its embedded defaults on loopback, and a workload that
//! redeems a join token over SDS, verifies what it gets, watches it rotate, and then
//! re-attests with its SVID alone. (The sidecar pair joins the demo with the data plane.)

use std::time::{Duration, SystemTime};

use anyhow::{bail, ensure, Context};
use clap::Args;
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataValue;
use tonic::Streaming;
use trellis_control::config::{ControlFile, ControlSettings};
use trellis_control::server::{ControlPlane, CONTROL_ID_PATH};
use trellis_identity::tls::SvidResolver;
use trellis_identity::{verify_svid_chain, SpiffeId, Svid, TrustBundle, TrustDomain, Usage};
use trellis_proto::{
    secret, DiscoveryRequest, DiscoveryResponse, Secret, SecretDiscoveryServiceClient,
    SECRET_TYPE_URL,
};

/// `trellis demo` flags.
#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Run the checks once and exit 0 only if they pass.
    #[arg(long)]
    once: bool,
    /// How often the demo rotates SVIDs.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    rotate_every: Duration,
}

/// Runs the demo.
pub fn run(args: DemoArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(demo(args))
}

struct Received {
    svid: Svid,
    bundle: TrustBundle,
    response: DiscoveryResponse,
}

fn decode(resp: &DiscoveryResponse, td: &TrustDomain) -> anyhow::Result<Received> {
    let mut chain_key = None;
    let mut bundle = None;
    for any in &resp.resources {
        ensure!(
            any.type_url == SECRET_TYPE_URL,
            "unexpected resource type {}",
            any.type_url
        );
        let s = Secret::decode(any.value.as_slice()).context("undecodable Secret")?;
        match s.r#type {
            Some(secret::Type::TlsCertificate(tc)) => {
                chain_key = Some((inline(tc.certificate_chain)?, inline(tc.private_key)?))
            }
            Some(secret::Type::ValidationContext(vc)) => bundle = Some(inline(vc.trusted_ca)?),
            _ => bail!("secret `{}` has an unexpected type", s.name),
        }
    }
    let (chain, key) = chain_key.context("response has no `default` secret")?;
    let bundle = TrustBundle::from_pem(
        td.clone(),
        &bundle.context("response has no `ROOTCA` secret")?,
    )?;
    let svid = Svid::from_pem(&chain, &key)?;
    Ok(Received {
        svid,
        bundle,
        response: resp.clone(),
    })
}

fn inline(ds: Option<trellis_proto::DataSource>) -> anyhow::Result<Vec<u8>> {
    match ds.and_then(|d| d.specifier) {
        Some(trellis_proto::data_source::Specifier::InlineBytes(b)) => Ok(b),
        Some(trellis_proto::data_source::Specifier::InlineString(s)) => Ok(s.into_bytes()),
        _ => bail!("secret data is not inline"),
    }
}

fn request(version: &str, nonce: &str) -> DiscoveryRequest {
    DiscoveryRequest {
        version_info: version.to_owned(),
        node: Some(trellis_proto::Node {
            id: "demo-web".into(),
            cluster: "demo".into(),
            ..Default::default()
        }),
        resource_names: vec!["default".into(), "ROOTCA".into()],
        type_url: SECRET_TYPE_URL.into(),
        response_nonce: nonce.to_owned(),
        error_detail: None,
    }
}

fn show(label: &str, r: &Received) {
    let left = r
        .svid
        .not_after()
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    println!(
        "  {label:<10} {}  serial {}  expires in {}  (version {})",
        r.svid.spiffe_id(),
        r.svid.serial_hex(),
        humantime::format_duration(Duration::from_secs(left.as_secs())),
        r.response.version_info
    );
}

async fn open_stream(
    client: &mut SecretDiscoveryServiceClient<tonic::transport::Channel>,
    token: Option<&str>,
) -> anyhow::Result<(mpsc::Sender<DiscoveryRequest>, Streaming<DiscoveryResponse>)> {
    let (tx, rx) = mpsc::channel(4);
    tx.send(request("", "")).await?;
    let mut req = tonic::Request::new(ReceiverStream::new(rx));
    if let Some(token) = token {
        req.metadata_mut().insert(
            "authorization",
            MetadataValue::try_from(format!("Bearer {token}"))?,
        );
    }
    let stream = client.stream_secrets(req).await?.into_inner();
    Ok((tx, stream))
}

async fn next(
    stream: &mut Streaming<DiscoveryResponse>,
    td: &TrustDomain,
    within: Duration,
) -> anyhow::Result<Received> {
    let resp = tokio::time::timeout(within, stream.message())
        .await
        .context("no SDS response in time")??
        .context("control plane closed the stream")?;
    decode(&resp, td)
}

async fn demo(args: DemoArgs) -> anyhow::Result<()> {
    let td = TrustDomain::parse("example.org")?;
    let state = tempfile::Builder::new()
        .prefix("trellis-demo-")
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .tempdir()
        .context("cannot create a temp dir")?;
    let file = ControlFile {
        trust_domain: Some(td.to_string()),
        listen: Some("127.0.0.1:0".parse()?),
        admin: Some("127.0.0.1:0".parse()?),
        state_dir: Some(state.path().to_owned()),
        svid_ttl: Some(Duration::from_secs(600)),
        rotate_every: Some(args.rotate_every),
        ..Default::default()
    };
    let cp = ControlPlane::start(ControlSettings::from_file(file)?).await?;
    println!(
        "control plane   sds=https://{}  admin=http://{}",
        cp.sds_addr, cp.admin_addr
    );
    println!(
        "  state dir     {}  (embedded self-signed CA, SQLite, audit.log)",
        state.path().display()
    );

    let web = SpiffeId::parse("spiffe://example.org/demo/web")?;
    let token = cp
        .registry
        .create_join_token(&web, Duration::from_secs(300), SystemTime::now())?;
    println!("join token      created for {web}");

    let bundle_pem = std::fs::read(&cp.bundle_path)?;
    let bootstrap_bundle = TrustBundle::from_pem(td.clone(), &bundle_pem)?;
    let control_id = SpiffeId::from_parts(&td, CONTROL_ID_PATH)?;
    let channel = trellis_control::client::connect(
        cp.sds_addr,
        bootstrap_bundle.clone(),
        control_id.clone(),
        None,
    )
    .await?;
    let mut client = SecretDiscoveryServiceClient::new(channel);
    let (tx, mut stream) = open_stream(&mut client, Some(token.as_str())).await?;

    println!("SDS stream      attested with the join token:");
    let first = next(&mut stream, &td, Duration::from_secs(10)).await?;
    let id = verify_svid_chain(
        first.svid.chain(),
        &first.bundle,
        SystemTime::now(),
        Usage::Either,
    )?;
    ensure!(id == web, "SVID carries {id}, expected {web}");
    show("issued", &first);
    tx.send(request(&first.response.version_info, &first.response.nonce))
        .await?;

    let second = next(&mut stream, &td, args.rotate_every * 3).await?;
    ensure!(
        second.svid.serial_hex() != first.svid.serial_hex(),
        "rotation pushed the same serial"
    );
    verify_svid_chain(
        second.svid.chain(),
        &second.bundle,
        SystemTime::now(),
        Usage::Either,
    )?;
    show("rotated", &second);
    tx.send(request(
        &second.response.version_info,
        &second.response.nonce,
    ))
    .await?;

    // Reconnect without the token: the SVID itself re-attests over mTLS.
    let resolver = SvidResolver::empty();
    resolver.install(&second.svid)?;
    let channel = trellis_control::client::connect(
        cp.sds_addr,
        second.bundle.clone(),
        control_id,
        Some(resolver),
    )
    .await?;
    let mut client2 = SecretDiscoveryServiceClient::new(channel);
    let (_tx2, mut stream2) = open_stream(&mut client2, None).await?;
    let third = next(&mut stream2, &td, Duration::from_secs(10)).await?;
    ensure!(
        third.svid.spiffe_id() == &web,
        "re-attested as {}",
        third.svid.spiffe_id()
    );
    println!("re-attested     with the SVID over mTLS, no token:");
    show("issued", &third);

    let metrics = cp.metrics.encode();
    let issued: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("trellis_svids_issued_total"))
        .collect();
    println!("metrics         {}", issued.join("  "));
    println!("checks passed");

    if args.once {
        cp.shutdown().await;
        return Ok(());
    }
    println!();
    println!(
        "try:  curl -s http://{}/metrics | grep trellis_",
        cp.admin_addr
    );
    println!("      cat {}/audit.log", state.path().display());
    println!(
        "rotations follow every {}; Ctrl-C to stop",
        humantime::format_duration(args.rotate_every)
    );
    let mut last = second;
    loop {
        tokio::select! {
            () = crate::cmd_control::shutdown_signal() => break,
            r = next(&mut stream, &td, args.rotate_every * 3) => {
                let r = r?;
                show("rotated", &r);
                tx.send(request(&r.response.version_info, &r.response.nonce)).await?;
                last = r;
            }
        }
    }
    drop(last);
    cp.shutdown().await;
    Ok(())
}
