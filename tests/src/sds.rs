//! TLS 1.3 clients that verify SPIFFE IDs, and an SDS client driven by hand.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{anyhow, bail, Context as _};
use arc_swap::ArcSwap;
use hyper_util::rt::TokioIo;
use prost::Message as _;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint, Uri};
use trellis_identity::tls::{
    client_config, PeerMatch, SpiffeServerVerifier, SvidResolver, TlsPolicy,
};
use trellis_identity::{CertificateDer, SpiffeId, Svid, TrustBundle, TrustDomain};
use trellis_proto::{
    data_source, secret, DiscoveryRequest, DiscoveryResponse, Node, Secret,
    SecretDiscoveryServiceClient, SECRET_TYPE_URL,
};

use crate::ControlPlane;

/// The generated SDS client over our TLS channel.
pub type SdsClient = SecretDiscoveryServiceClient<Channel>;

/// A rustls client config that verifies the server against `bundle` and `expected`, TLS 1.3
/// only, presenting `client_svid` if given.
pub fn tls_client_config(
    bundle: TrustBundle,
    expected: PeerMatch,
    client_svid: Option<&Svid>,
    alpn: &[&[u8]],
) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let verifier = SpiffeServerVerifier::new(Arc::new(ArcSwap::from_pointee(bundle)), expected);
    let resolver = match client_svid {
        Some(svid) => {
            let r = SvidResolver::empty();
            r.install(svid)
                .map_err(|e| anyhow!("install client SVID: {e}"))?;
            Some(r)
        }
        None => None,
    };
    Ok(Arc::new(client_config(
        resolver,
        verifier,
        TlsPolicy::Tls13,
        alpn,
    )?))
}

/// TCP + TLS to `addr` with `config` (the server name is the IP; SPIFFE verifiers ignore it).
pub async fn tls_connect(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> anyhow::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connect {addr}"))?;
    tcp.set_nodelay(true)?;
    let name = rustls::pki_types::ServerName::from(addr.ip());
    TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .with_context(|| format!("TLS handshake with {addr}"))
}

/// The leaf certificate the server presented on `tls`.
pub fn peer_leaf(tls: &TlsStream<TcpStream>) -> anyhow::Result<CertificateDer<'static>> {
    let (_, conn) = tls.get_ref();
    let certs = conn
        .peer_certificates()
        .context("server sent no certificate")?;
    Ok(certs
        .first()
        .context("empty certificate chain")?
        .clone()
        .into_owned())
}

/// The leaf's serial, lowercase hex.
pub fn serial_of(der: &CertificateDer<'_>) -> anyhow::Result<String> {
    Ok(trellis_identity::cert_facts(der)
        .map_err(|e| anyhow!("parse certificate: {e}"))?
        .serial_hex)
}

/// A gRPC channel to an SDS server over TLS 1.3 (ALPN h2), verifying that the server presents
/// exactly `expected` under `bundle`.
pub async fn connect_sds(
    addr: SocketAddr,
    bundle: TrustBundle,
    expected: SpiffeId,
) -> anyhow::Result<SdsClient> {
    let config = tls_client_config(bundle, PeerMatch::Exact(expected), None, &[b"h2"])?;
    let connector = tower::service_fn(move |_: Uri| {
        let config = config.clone();
        async move {
            let tls = tls_connect(addr, config)
                .await
                .map_err(|e| std::io::Error::other(format!("{e:#}")))?;
            Ok::<_, std::io::Error>(TokioIo::new(tls))
        }
    });
    let channel = Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(5))
        .connect_with_connector(connector)
        .await
        .with_context(|| format!("SDS channel to {addr}"))?;
    Ok(SecretDiscoveryServiceClient::new(channel))
}

/// The node every test request carries.
pub fn test_node() -> Node {
    Node {
        id: "trellis-e2e".to_string(),
        cluster: "trellis-e2e".to_string(),
        ..Default::default()
    }
}

/// One `StreamSecrets` stream, driven by hand.
pub struct SdsStream {
    tx: mpsc::Sender<DiscoveryRequest>,
    inbound: tonic::Streaming<DiscoveryResponse>,
    names: Vec<String>,
}

impl SdsStream {
    /// Opens a stream with `authorization: Bearer <credential>` (if any) and sends the first
    /// request for `names`. A gRPC error is returned as a `tonic::Status` inside the
    /// `anyhow::Error` (see [`grpc_code`]).
    pub async fn open(
        client: &mut SdsClient,
        credential: Option<&str>,
        names: &[&str],
    ) -> anyhow::Result<Self> {
        let first = DiscoveryRequest {
            node: Some(test_node()),
            resource_names: names.iter().map(|s| s.to_string()).collect(),
            type_url: SECRET_TYPE_URL.to_string(),
            ..Default::default()
        };
        Self::open_with(client, credential, first).await
    }

    /// Opens a stream whose first request is `first`, as given (for malformed requests).
    pub async fn open_with(
        client: &mut SdsClient,
        credential: Option<&str>,
        first: DiscoveryRequest,
    ) -> anyhow::Result<Self> {
        let (tx, rx) = mpsc::channel(16);
        let names = first.resource_names.clone();
        tx.send(first).await?;
        let mut req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        if let Some(c) = credential {
            req.metadata_mut()
                .insert("authorization", format!("Bearer {c}").parse()?);
        }
        let resp = tokio::time::timeout(Duration::from_secs(10), client.stream_secrets(req))
            .await
            .context("StreamSecrets: no response headers within 10s")??;
        Ok(SdsStream {
            tx,
            inbound: resp.into_inner(),
            names,
        })
    }

    /// The next response within `timeout`. A gRPC error status is returned inside the error.
    pub async fn recv(&mut self, timeout: Duration) -> anyhow::Result<DiscoveryResponse> {
        match tokio::time::timeout(timeout, self.inbound.message()).await {
            Err(_) => bail!("no SDS response within {timeout:?}"),
            Ok(Err(status)) => Err(status.into()),
            Ok(Ok(None)) => bail!("SDS stream closed by the server without a status"),
            Ok(Ok(Some(r))) => Ok(r),
        }
    }

    /// ACKs `resp` (xDS: a request carrying the response's version_info and nonce).
    pub async fn ack(&mut self, resp: &DiscoveryResponse) -> anyhow::Result<()> {
        self.send(DiscoveryRequest {
            version_info: resp.version_info.clone(),
            node: Some(test_node()),
            resource_names: self.names.clone(),
            type_url: SECRET_TYPE_URL.to_string(),
            response_nonce: resp.nonce.clone(),
            error_detail: None,
        })
        .await
    }

    /// Sends any request on the stream.
    pub async fn send(&mut self, req: DiscoveryRequest) -> anyhow::Result<()> {
        self.tx
            .send(req)
            .await
            .map_err(|_| anyhow!("SDS request stream closed"))
    }
}

/// The gRPC status code inside an error from [`SdsStream`], if it is one.
pub fn grpc_code(err: &anyhow::Error) -> Option<tonic::Code> {
    err.chain()
        .find_map(|e| e.downcast_ref::<tonic::Status>())
        .map(|s| s.code())
}

/// The secrets in a response, by name. Checks each resource's type URL.
pub fn decode_secrets(resp: &DiscoveryResponse) -> anyhow::Result<BTreeMap<String, Secret>> {
    if resp.type_url != SECRET_TYPE_URL {
        bail!(
            "response type_url {:?}, want {SECRET_TYPE_URL}",
            resp.type_url
        );
    }
    let mut out = BTreeMap::new();
    for any in &resp.resources {
        if any.type_url != SECRET_TYPE_URL {
            bail!(
                "resource type_url {:?}, want {SECRET_TYPE_URL}",
                any.type_url
            );
        }
        let secret = Secret::decode(any.value.as_slice()).context("decode Secret")?;
        out.insert(secret.name.clone(), secret);
    }
    Ok(out)
}

fn inline_bytes(ds: Option<&trellis_proto::DataSource>, what: &str) -> anyhow::Result<Vec<u8>> {
    match ds.and_then(|d| d.specifier.as_ref()) {
        Some(data_source::Specifier::InlineBytes(b)) => Ok(b.clone()),
        Some(data_source::Specifier::InlineString(s)) => Ok(s.clone().into_bytes()),
        other => bail!("{what}: want inline bytes, got {other:?}"),
    }
}

/// The SVID in a `tls_certificate` secret (PEM chain + PEM key), validated by `Svid::from_pem`.
pub fn svid_from_secret(s: &Secret) -> anyhow::Result<Svid> {
    let Some(secret::Type::TlsCertificate(tc)) = &s.r#type else {
        bail!("secret {:?} is not a tls_certificate", s.name);
    };
    let chain = inline_bytes(tc.certificate_chain.as_ref(), "certificate_chain")?;
    let key = inline_bytes(tc.private_key.as_ref(), "private_key")?;
    Svid::from_pem(&chain, &key).map_err(|e| anyhow!("secret {:?}: {e}", s.name))
}

/// The trust bundle in a `validation_context` secret.
pub fn bundle_from_secret(s: &Secret, td: &TrustDomain) -> anyhow::Result<TrustBundle> {
    let Some(secret::Type::ValidationContext(vc)) = &s.r#type else {
        bail!("secret {:?} is not a validation_context", s.name);
    };
    let pem = inline_bytes(vc.trusted_ca.as_ref(), "trusted_ca")?;
    TrustBundle::from_pem(td.clone(), &pem).map_err(|e| anyhow!("secret {:?}: {e}", s.name))
}

/// Redeems `token` on a fresh stream and returns the SVID and bundle it was issued (the
/// stream is dropped afterwards). For tests that need a client SVID.
pub async fn fetch_svid(cp: &ControlPlane, token: &str) -> anyhow::Result<(Svid, TrustBundle)> {
    fetch_svid_trusting(cp, cp.bundle()?, token).await
}

/// [`fetch_svid`], verifying the control plane against `bundle` instead of its `bundle.pem`
/// (for tests in which the state directory is out of reach).
pub async fn fetch_svid_trusting(
    cp: &ControlPlane,
    bundle: TrustBundle,
    token: &str,
) -> anyhow::Result<(Svid, TrustBundle)> {
    let mut client = connect_sds(cp.sds_addr, bundle, cp.control_id()).await?;
    let mut stream = SdsStream::open(&mut client, Some(token), &["default", "ROOTCA"]).await?;
    let mut svid = None;
    let mut bundle = None;
    while svid.is_none() || bundle.is_none() {
        let resp = stream.recv(Duration::from_secs(10)).await?;
        let secrets = decode_secrets(&resp)?;
        if let Some(s) = secrets.get("default") {
            svid = Some(svid_from_secret(s)?);
        }
        if let Some(s) = secrets.get("ROOTCA") {
            bundle = Some(bundle_from_secret(s, &cp.trust_domain)?);
        }
        stream.ack(&resp).await?;
    }
    let (svid, bundle) = (svid.context("svid")?, bundle.context("bundle")?);
    svid.verify(&bundle, SystemTime::now())
        .map_err(|e| anyhow!("issued SVID does not verify: {e}"))?;
    Ok((svid, bundle))
}
