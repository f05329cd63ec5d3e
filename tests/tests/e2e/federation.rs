//! SPIFFE federation end to end: two control planes (`a.org`, `b.org`) on loopback that
//! federate from bootstrap bundles through each other's bundle endpoint, a sidecar of each,
//! and in-process fakes for the hostile cases.
//!
//! ```text
//!  test (app A) ─▶ sidecar A (a.org) ══ mTLS ══▶ sidecar B (b.org, policy allows a.org caller) ─▶ app B
//!        trellis control a.org ◀── bundle endpoints (https_spiffe) ──▶ trellis control b.org
//! ```
//!
//! The relationships are written into each control plane's config file after both started
//! (each needs the other's endpoint address): that is also the reload-without-restart path.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, ensure, Context as _};
use base64::Engine as _;
use prost::Message as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;
use trellis_identity::testca::{LeafSpec, TestCa};
use trellis_identity::tls::PeerMatch;
use trellis_identity::{SpiffeId, Svid};
use trellis_proto::{secret, SpiffeCertValidatorConfig};
use trellis_tests::app_client::{echo_json, get_once, Proto};
use trellis_tests::echo::EchoApp;
use trellis_tests::sidecar::{Sidecar, SidecarOpts};
use trellis_tests::{
    decode_secrets, e2e, eventually, free_port, http_get, tls_client_config, tls_connect,
    ControlPlane, ControlPlaneOpts, SdsStream,
};

const A_CALLER: &str = "spiffe://a.org/ns/prod/sa/service-a";
const B_SERVER: &str = "spiffe://b.org/ns/prod/sa/service-b";
const XFCC: &str = "x-forwarded-client-cert";
/// Fast refreshes for tests: hint 1 s, bounded to [200 ms, 2 s].
const FAST: &str = "bundle_refresh_hint: 1s\nlimits:\n  federation:\n    min_refresh: 200ms\n    max_refresh: 2s\n";
const WAIT: Duration = Duration::from_secs(20);

/// A control plane with its config file (for federation edits) and the directory it lives in.
struct Domain {
    cp: ControlPlane,
    config: PathBuf,
    dir: tempfile::TempDir,
}

/// Starts `trellis control` for `td` with `--bundle-endpoint` and a config file; with `ca`,
/// signing with that CA (so the test can mint certificates the domain's CA signed).
fn start_domain(td: &str, ca: Option<&TestCa>) -> anyhow::Result<Domain> {
    start_domain_with(td, ca, ControlPlaneOpts::default())
}

/// [`start_domain`] with other control-plane options (SVID lifetime, rotation).
fn start_domain_with(
    td: &str,
    ca: Option<&TestCa>,
    opts: ControlPlaneOpts,
) -> anyhow::Result<Domain> {
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("control.yaml");
    std::fs::write(&config, FAST)?;
    let mut extra_args = vec![
        "--config".to_string(),
        config.display().to_string(),
        "--bundle-endpoint".to_string(),
        "127.0.0.1:0".to_string(),
    ];
    if let Some(ca) = ca {
        let cert = dir.path().join("ca.pem");
        let key = dir.path().join("ca.key");
        std::fs::write(&cert, ca.cert_pem())?;
        std::fs::write(&key, ca.key_pem())?;
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))?;
        extra_args.extend([
            "--ca-cert".to_string(),
            cert.display().to_string(),
            "--ca-key".to_string(),
            key.display().to_string(),
        ]);
    }
    let cp = ControlPlane::start(ControlPlaneOpts {
        trust_domain: td.to_string(),
        extra_args,
        ..opts
    })?;
    ensure!(
        cp.bundle_endpoint_addr.is_some(),
        "no bundle_endpoint= line"
    );
    Ok(Domain { cp, config, dir })
}

impl Domain {
    /// Rewrites the config with one relationship to `td` (reloaded within a second).
    fn federate(
        &self,
        td: &str,
        url: &str,
        endpoint_id: &str,
        bootstrap: &Path,
    ) -> anyhow::Result<()> {
        let yaml = format!(
            "{FAST}federation:\n  - trust_domain: {td}\n    bundle_endpoint_url: {url}\n    profile: https_spiffe\n    endpoint_spiffe_id: {endpoint_id}\n    bootstrap_bundle: {}\n",
            bootstrap.display()
        );
        // Write then rename: the poller never reads half a file.
        let tmp = self.dir.path().join("control.yaml.tmp");
        std::fs::write(&tmp, yaml)?;
        std::fs::rename(&tmp, &self.config)?;
        Ok(())
    }

    /// Federates with `other` through its bundle endpoint, from its current bundle.pem.
    fn federate_with(&self, other: &Domain) -> anyhow::Result<()> {
        let td = other.cp.trust_domain.to_string();
        let bootstrap = self.dir.path().join(format!("{td}-bootstrap.pem"));
        std::fs::copy(&other.cp.bundle_pem_path, &bootstrap)?;
        let addr = other
            .cp
            .bundle_endpoint_addr
            .context("no bundle endpoint")?;
        self.federate(
            &td,
            &format!("https://{addr}"),
            &format!("spiffe://{td}/trellis/control"),
            &bootstrap,
        )
    }

    /// `/bundles`' entry for `td`.
    async fn federated(&self, td: &str) -> anyhow::Result<serde_json::Value> {
        let report = self.cp.admin_get("/bundles").await?.json()?;
        report["federated"]
            .as_array()
            .and_then(|l| l.iter().find(|d| d["trust_domain"] == td))
            .cloned()
            .with_context(|| format!("{td} not in /bundles: {report}"))
    }

    /// Waits until `/bundles` shows `td` satisfying `cond`.
    async fn wait_for(
        &self,
        td: &str,
        what: &str,
        cond: impl Fn(&serde_json::Value) -> bool,
    ) -> anyhow::Result<serde_json::Value> {
        eventually(WAIT, what, || async {
            let d = self.federated(td).await?;
            ensure!(cond(&d), "{td}: {d}");
            Ok(d)
        })
        .await
    }
}

/// True when the entry was fetched from the endpoint and the last fetch worked.
fn fetched(d: &serde_json::Value) -> bool {
    d["source"] == "endpoint" && d["last_error"].is_null() && d["last_refresh"].is_string()
}

/// Sends one HTTP/1.1 request to sidecar `b`'s inbound listener presenting `svid`; the server
/// must be [`B_SERVER`] under `b_bundle`. The status, or the error.
async fn probe_inbound(
    b: &Sidecar,
    b_bundle: trellis_identity::TrustBundle,
    svid: &Svid,
) -> anyhow::Result<u16> {
    let config = tls_client_config(
        b_bundle,
        PeerMatch::Exact(SpiffeId::parse(B_SERVER)?),
        Some(svid),
        &[b"http/1.1"],
    )?;
    let tls = tls_connect(b.addrs.inbound, config).await?;
    Ok(http_get(tls, "b", "/api/probe").await?.status)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_org_caller_reaches_b_org_app_through_federation() -> anyhow::Result<()> {
    e2e(async {
        let b_ca = TestCa::root("b.org");
        let a = start_domain("a.org", None)?;
        let b = start_domain("b.org", Some(&b_ca))?;
        a.federate_with(&b)?;
        b.federate_with(&a)?;
        let seen_by_a = a.wait_for("b.org", "a.org fetched b.org's bundle", fetched).await?;
        b.wait_for("a.org", "b.org fetched a.org's bundle", fetched).await?;
        ensure!(seen_by_a["sequence"] == 1 && seen_by_a["cas"] == 1, "{seen_by_a}");
        let report = a.cp.admin_get("/bundles").await?.json()?;
        ensure!(
            report["trust_domain"] == "a.org" && report["sequence"] == 1,
            "/bundles: {report}"
        );

        // B's policy: the a.org caller may GET /api/**, nobody else anything.
        let policy = b.dir.path().join("policy");
        std::fs::create_dir(&policy)?;
        std::fs::write(
            policy.join("service-b.yaml"),
            format!(
                "apiVersion: trellis.io/v1\nkind: Policy\ndefaultAction: deny\nrules:\n  - name: a-org-api\n    action: allow\n    from: [{A_CALLER}]\n    to:\n      - methods: [GET]\n        paths: [/api/**]\n"
            ),
        )?;
        let app_b = EchoApp::start("app-b").await?;
        let policy_arg = policy.display().to_string();
        let side_b = Sidecar::start(
            &b.cp,
            SidecarOpts::new("sidecar-b", B_SERVER, app_b.addr).args(&["--policy", &policy_arg]),
        )
        .await?;
        let app_a = EchoApp::start("app-a").await?;
        let side_a = Sidecar::start(
            &a.cp,
            SidecarOpts::new("sidecar-a", A_CALLER, app_a.addr).upstream(
                "b",
                side_b.addrs.inbound,
                B_SERVER,
            ),
        )
        .await?;

        // The a.org caller reaches the b.org app; XFCC names it.
        let call = || async {
            let reply = get_once(side_a.outbound(), Proto::H1, "b", "/api/hello", &[]).await?;
            echo_json(&reply)
        };
        let echo = eventually(WAIT, "a.org → b.org call", call).await?;
        ensure!(echo["app"] == "app-b", "{echo}");
        let seen = app_b.last_seen("/api/hello").context("app B saw nothing")?;
        let xfcc = seen.header_all(XFCC);
        ensure!(
            xfcc.len() == 1
                && xfcc[0].starts_with(&format!("By={B_SERVER};"))
                && xfcc[0].ends_with(&format!("URI={A_CALLER}")),
            "XFCC {xfcc:?}"
        );
        // The policy still decides: a path it does not allow is 403 naming the caller.
        let reply = get_once(side_a.outbound(), Proto::H1, "b", "/admin", &[]).await?;
        ensure!(reply.status == 403, "GET /admin: {}", reply.summary());
        ensure!(
            String::from_utf8_lossy(&reply.body).contains(A_CALLER),
            "403 body: {}",
            String::from_utf8_lossy(&reply.body)
        );

        // The impostor: an a.org ID signed by b.org's CA. B trusts b.org's CA, but a
        // spiffe://a.org/… certificate must chain to a.org's bundle.
        let b_bundle = b.cp.bundle()?;
        let (chain, key) = b_ca.issue(&LeafSpec::new(A_CALLER));
        let impostor = Svid::new(chain, key)?;
        let refused = probe_inbound(&side_b, b_bundle.clone(), &impostor).await;
        ensure!(refused.is_err(), "impostor got HTTP {refused:?}");
        // A genuine b.org workload signed by the same CA is let in (so the refusal above is
        // about the trust domain, not the certificate).
        let (chain, key) = b_ca.issue(&LeafSpec::new("spiffe://b.org/ns/prod/sa/other"));
        let genuine = Svid::new(chain, key)?;
        let status = probe_inbound(&side_b, b_bundle, &genuine).await?;
        ensure!(status == 403, "b.org stranger: HTTP {status} (want the policy's 403)");

        // A wrong endpoint SPIFFE ID is refused, and b.org's bundle stays in force.
        let bootstrap = a.dir.path().join("b.org-bootstrap.pem");
        let b_url = format!("https://{}", b.cp.bundle_endpoint_addr.context("b endpoint")?);
        a.federate("b.org", &b_url, "spiffe://b.org/not-the-endpoint", &bootstrap)?;
        let d = a
            .wait_for("b.org", "the wrong endpoint ID refused", |d| {
                d["last_error"].as_str().is_some_and(|e| e.contains("TLS"))
            })
            .await?;
        // A changed relationship starts from the newest stored bundle (sequence 1).
        ensure!(d["cas"] == 1 && d["sequence"] == 1, "{d}");
        let m = a.cp.metrics().await?;
        ensure!(
            m.sum_or_zero(
                "trellis_federation_refresh_failures_total",
                &[("trust_domain", "b.org"), ("reason", "tls")]
            ) >= 1.0,
            "{}",
            m.lines_of("trellis_federation_refresh_failures_total")
        );
        call().await.context("call with the wrong endpoint ID configured")?;

        // An unreachable endpoint keeps the last good bundle: calls keep working.
        let nowhere = format!("https://127.0.0.1:{}", free_port());
        a.federate("b.org", &nowhere, "spiffe://b.org/trellis/control", &bootstrap)?;
        let d = a
            .wait_for("b.org", "the unreachable endpoint reported", |d| {
                d["last_error"]
                    .as_str()
                    .is_some_and(|e| e.contains("connect"))
            })
            .await?;
        ensure!(d["cas"] == 1, "{d}");
        call().await.context("call with b.org's endpoint unreachable")?;

        // Back to the real endpoint: healthy again.
        a.federate_with(&b)?;
        a.wait_for("b.org", "a.org fetches b.org again", fetched).await?;
        drop((side_a, side_b));
        Ok(())
    })
    .await
}

/// A bundle endpoint in the test: TLS with `svid`, answers every request with `body()`.
async fn fake_endpoint(
    svid: Svid,
    body: Arc<Mutex<String>>,
) -> anyhow::Result<std::net::SocketAddr> {
    use trellis_identity::tls::SvidResolver;
    let resolver = SvidResolver::empty();
    resolver.install(&svid)?;
    let config = rustls::ServerConfig::builder_with_provider(trellis_identity::tls::provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    serve_document(config, body).await
}

/// A bundle endpoint with a Web PKI server certificate (`https_web`): `chain` for `localhost`.
async fn web_endpoint(
    chain: Vec<rustls::pki_types::CertificateDer<'static>>,
    key: rustls::pki_types::PrivateKeyDer<'static>,
    body: Arc<Mutex<String>>,
) -> anyhow::Result<std::net::SocketAddr> {
    let config = rustls::ServerConfig::builder_with_provider(trellis_identity::tls::provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    serve_document(config, body).await
}

/// Serves `body()` to every HTTPS request, with `config`.
async fn serve_document(
    config: rustls::ServerConfig,
    body: Arc<Mutex<String>>,
) -> anyhow::Result<std::net::SocketAddr> {
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, body) = (acceptor.clone(), Arc::clone(&body));
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tls.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let text = body.lock().map(|b| b.clone()).unwrap_or_default();
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{text}",
                    text.len()
                );
                let _ = tls.write_all(resp.as_bytes()).await;
                let _ = tls.shutdown().await;
            });
        }
    });
    Ok(addr)
}

/// A bundle document with one `x509-svid` key per CA.
fn document(cas: &[&TestCa], sequence: u64) -> String {
    let keys: Vec<_> = cas
        .iter()
        .map(|ca| {
            serde_json::json!({
                "use": "x509-svid",
                "kty": "EC",
                "x5c": [base64::engine::general_purpose::STANDARD.encode(ca.cert())],
            })
        })
        .collect();
    serde_json::json!({"keys": keys, "spiffe_sequence": sequence, "spiffe_refresh_hint": 1})
        .to_string()
}

/// The trust domains (and CA counts) of the ROOTCA secret a.org's SDS serves.
async fn sds_trust_domains(cp: &ControlPlane) -> anyhow::Result<Vec<(String, usize)>> {
    Ok(sds_bundles(cp)
        .await?
        .into_iter()
        .map(|(td, certs)| (td, certs.len()))
        .collect())
}

/// Each trust domain's CAs in the ROOTCA secret `cp`'s SDS serves (Envoy's SPIFFE validator
/// entries); empty without federation.
async fn sds_bundles(
    cp: &ControlPlane,
) -> anyhow::Result<Vec<(String, Vec<trellis_identity::CertificateDer<'static>>)>> {
    let token = cp.create_token(cp.id("/ns/prod/sa/envoy").as_str(), "1h")?;
    let mut client = cp.sds_client().await?;
    let mut stream = SdsStream::open(&mut client, Some(&token), &["default", "ROOTCA"]).await?;
    let resp = stream.recv(Duration::from_secs(10)).await?;
    let secrets = decode_secrets(&resp)?;
    let rootca = secrets.get("ROOTCA").context("no ROOTCA")?;
    let Some(secret::Type::ValidationContext(vc)) = &rootca.r#type else {
        bail!("ROOTCA is not a validation context");
    };
    let Some(ext) = &vc.custom_validator_config else {
        return Ok(Vec::new());
    };
    ensure!(
        ext.name == "envoy.tls.cert_validator.spiffe",
        "{}",
        ext.name
    );
    let any = ext.typed_config.as_ref().context("no typed_config")?;
    let config = SpiffeCertValidatorConfig::decode(any.value.as_slice())?;
    config
        .trust_domains
        .iter()
        .map(|d| {
            let pem = match d.trust_bundle.as_ref().and_then(|b| b.specifier.clone()) {
                Some(trellis_proto::data_source::Specifier::InlineBytes(b)) => b,
                other => bail!("{}: trust_bundle {other:?}", d.name),
            };
            Ok((d.name.clone(), trellis_identity::certs_from_pem(&pem)?))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_bundles_that_go_backwards_are_tampered_or_name_another_domain_are_refused(
) -> anyhow::Result<()> {
    e2e(async {
        let b_ca = TestCa::root("b.org");
        let body = Arc::new(Mutex::new(document(&[&b_ca], 5)));
        let endpoint = fake_endpoint(b_ca.svid("/bundle-endpoint"), Arc::clone(&body)).await?;
        let a = start_domain("a.org", None)?;
        // Before federation: SDS carries no validator, exactly the single-domain secret.
        ensure!(sds_trust_domains(&a.cp).await?.is_empty());
        let bootstrap = a.dir.path().join("b.org-bootstrap.pem");
        std::fs::write(&bootstrap, b_ca.bundle_pem())?;
        a.federate(
            "b.org",
            &format!("https://{endpoint}"),
            "spiffe://b.org/bundle-endpoint",
            &bootstrap,
        )?;
        a.wait_for("b.org", "sequence 5 in force", |d| {
            fetched(d) && d["sequence"] == 5
        })
        .await?;
        let domains = sds_trust_domains(&a.cp).await?;
        ensure!(
            domains == [("a.org".to_string(), 1), ("b.org".to_string(), 1)],
            "SDS trust domains {domains:?}"
        );

        let refused = |reason: &'static str, bad: String| {
            let (a, body) = (&a, Arc::clone(&body));
            async move {
                let before = a.cp.metrics().await?.sum_or_zero(
                    "trellis_federation_refresh_failures_total",
                    &[("trust_domain", "b.org"), ("reason", reason)],
                );
                *body.lock().map_err(|_| anyhow::anyhow!("poisoned"))? = bad;
                eventually(WAIT, reason, || async {
                    let n = a.cp.metrics().await?.sum_or_zero(
                        "trellis_federation_refresh_failures_total",
                        &[("trust_domain", "b.org"), ("reason", reason)],
                    );
                    ensure!(n > before, "{reason}: {n}");
                    Ok(())
                })
                .await?;
                let d = a.federated("b.org").await?;
                ensure!(d["sequence"] == 5 && d["cas"] == 1, "after {reason}: {d}");
                anyhow::Ok(())
            }
        };
        // An older sequence (a replayed bundle).
        refused("sequence_backwards", document(&[&b_ca], 3)).await?;
        // A tampered certificate.
        let good = document(&[&b_ca], 9);
        let cert_b64 = base64::engine::general_purpose::STANDARD.encode(b_ca.cert());
        let cut = &cert_b64[..cert_b64.len() - 12];
        refused("invalid_bundle", good.replace(&cert_b64, cut)).await?;
        // A CA of another trust domain.
        let c_ca = TestCa::root("c.org");
        refused("wrong_trust_domain", document(&[&c_ca], 9)).await?;

        // A root rotation in b.org (a second CA, higher sequence) reaches SDS.
        let b_next = TestCa::root("b.org");
        *body.lock().map_err(|_| anyhow::anyhow!("poisoned"))? = document(&[&b_ca, &b_next], 6);
        a.wait_for("b.org", "the rotated bundle", |d| {
            d["sequence"] == 6 && d["cas"] == 2
        })
        .await?;
        let domains = eventually(WAIT, "SDS carries both b.org CAs", || async {
            let d = sds_trust_domains(&a.cp).await?;
            ensure!(d.contains(&("b.org".to_string(), 2)), "{d:?}");
            Ok(d)
        })
        .await?;
        println!("SDS trust domains after the b.org rotation: {domains:?}");
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bundle_endpoint_serves_a_spiffe_bundle_only_with_the_control_planes_svid(
) -> anyhow::Result<()> {
    e2e(async {
        let a = start_domain("a.org", None)?;
        let addr = a.cp.bundle_endpoint_addr.context("no endpoint")?;
        let bundle = a.cp.bundle()?;
        // https_spiffe: the endpoint presents spiffe://a.org/trellis/control under a.org's bundle.
        let config = tls_client_config(
            bundle.clone(),
            PeerMatch::Exact(a.cp.control_id()),
            None,
            &[b"http/1.1"],
        )?;
        let reply = http_get(tls_connect(addr, config).await?, "a.org", "/").await?;
        ensure!(reply.status == 200, "GET /: {}", reply.status);
        let doc = reply.json()?;
        ensure!(doc["spiffe_sequence"] == 1 && doc["spiffe_refresh_hint"] == 1, "{doc}");
        let keys = doc["keys"].as_array().context("no keys")?;
        // The CA (x509-svid) and the JWT-SVID signing key in force (jwt-svid, with its kid).
        ensure!(keys.len() == 2 && keys[0]["use"] == "x509-svid", "{doc}");
        ensure!(
            keys[1]["use"] == "jwt-svid" && keys[1]["kid"].is_string(),
            "{doc}"
        );
        let der = base64::engine::general_purpose::STANDARD
            .decode(keys[0]["x5c"][0].as_str().context("x5c")?)?;
        ensure!(der == bundle.roots()[0].as_ref(), "x5c is not a.org's CA");
        // Expecting another identity fails the handshake.
        let wrong = tls_client_config(
            bundle,
            PeerMatch::Exact(SpiffeId::parse("spiffe://a.org/other")?),
            None,
            &[b"http/1.1"],
        )?;
        let r = async { http_get(tls_connect(addr, wrong).await?, "a.org", "/").await }.await;
        ensure!(r.is_err(), "wrong identity accepted");

        // py-spiffe reads the document: each x509-svid key's x5c as an X.509 bundle of a.org,
        // and PyJWT (its JWK dependency) reads the key parameters, which must be the
        // certificate's own public key.
        let Some(python) = crate::protocols::venv_python_with("bundle_endpoint_py_spiffe", "spiffe")
        else {
            return Ok(());
        };
        let doc_path = a.dir.path().join("bundle.json");
        std::fs::write(&doc_path, doc.to_string())?;
        let script = r#"
import base64, json, sys
import jwt
from cryptography.hazmat.primitives import serialization
from spiffe import TrustDomain, X509Bundle
doc = json.load(open(sys.argv[1]))
keys = [k for k in doc["keys"] if k["use"] == "x509-svid"]
der = b"".join(base64.b64decode(k["x5c"][0]) for k in keys)
bundle = X509Bundle.parse_raw(TrustDomain("a.org"), der)
auth = list(bundle.x509_authorities)
pub = lambda k: k.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
ok = all(pub(jwt.PyJWK(k).key) == pub(a.public_key()) for k, a in zip(keys, auth))
print(json.dumps({"trust_domain": str(bundle.trust_domain), "authorities": len(auth), "keys_match": ok, "sequence": doc["spiffe_sequence"]}))
"#;
        let mut cmd = std::process::Command::new(&python);
        cmd.args(["-c", script]).arg(&doc_path);
        let out = trellis_tests::run_with_timeout(cmd, Duration::from_secs(30))?;
        ensure!(
            out.status.success(),
            "py-spiffe: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let got: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        ensure!(
            got == serde_json::json!({"trust_domain": "a.org", "authorities": 1, "keys_match": true, "sequence": 1}),
            "py-spiffe said {got}"
        );
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stock_envoy_with_federated_validation_context_accepts_both_domains_not_the_impostor(
) -> anyhow::Result<()> {
    e2e(async {
        let test = "stock_envoy_with_federated_validation_context_accepts_both_domains_not_the_impostor";
        let Some(envoy_bin) = trellis_tests::envoy_or_skip(test) else {
            return Ok(());
        };
        // b.org: its CA in the test, its bundle endpoint a fake serving that CA.
        let b_ca = TestCa::root("b.org");
        let body = Arc::new(Mutex::new(document(&[&b_ca], 1)));
        let endpoint = fake_endpoint(b_ca.svid("/bundle-endpoint"), body).await?;
        let dir = tempfile::tempdir()?;
        let bootstrap = dir.path().join("b.org-bootstrap.pem");
        std::fs::write(&bootstrap, b_ca.bundle_pem())?;
        let config = dir.path().join("control.yaml");
        std::fs::write(
            &config,
            format!(
                "{FAST}federation:\n  - trust_domain: b.org\n    bundle_endpoint_url: https://{endpoint}\n    profile: https_spiffe\n    endpoint_spiffe_id: spiffe://b.org/bundle-endpoint\n    bootstrap_bundle: {}\n",
                bootstrap.display()
            ),
        )?;
        let (jwks, jwt) = crate::envoy_sds::k8s_issuer_and_token()?;
        let jwks_path = dir.path().join("jwks.json");
        std::fs::write(&jwks_path, jwks)?;
        let cp = ControlPlane::start_in(
            dir,
            ControlPlaneOpts {
                k8s: Some(trellis_tests::K8sOpts {
                    jwks: jwks_path,
                    issuer: crate::envoy_sds::ISSUER.into(),
                    audience: "trellis".into(),
                }),
                extra_args: vec!["--config".into(), config.display().to_string()],
                ..Default::default()
            },
        )?;
        let workload_id = SpiffeId::parse("spiffe://example.org/ns/default/sa/web")?;
        let tls_port = free_port();
        let rendered = trellis_tests::render_template(
            crate::envoy_sds::BOOTSTRAP,
            &[
                ("SDS_PORT", &cp.sds_addr.port().to_string()),
                ("TLS_PORT", &tls_port.to_string()),
                ("PLAIN_PORT", &free_port().to_string()),
                ("BUNDLE_PEM", &cp.bundle_pem_path.to_string_lossy()),
                ("CONTROL_ID", cp.control_id().as_str()),
                ("WORKLOAD_ID", workload_id.as_str()),
                ("TOKEN", &jwt),
            ],
        )?;
        let envoy_yaml = cp.dir.path().join("envoy.yaml");
        std::fs::write(&envoy_yaml, rendered)?;
        let envoy = trellis_tests::Envoy::start(&envoy_bin, &envoy_yaml, cp.dir.path())?;
        let tls_addr: std::net::SocketAddr = ([127, 0, 0, 1], tls_port).into();
        let bundle = cp.bundle()?;
        let call = |svid: Svid| {
            let bundle = bundle.clone();
            let workload_id = workload_id.clone();
            async move {
                let config = tls_client_config(
                    bundle,
                    PeerMatch::Exact(workload_id),
                    Some(&svid),
                    &[b"http/1.1"],
                )?;
                let resp = http_get(tls_connect(tls_addr, config).await?, "envoy", "/").await?;
                ensure!(resp.status == 200, "HTTP {}", resp.status);
                Ok(resp.header("x-trellis-peer").unwrap_or_default().to_string())
            }
        };
        // Our own domain, over a join token.
        let own_id = "spiffe://example.org/e2e/client";
        let token = cp.create_token(own_id, "1h")?;
        let (own, _) = trellis_tests::fetch_svid(&cp, &token).await?;
        let peer = eventually(Duration::from_secs(30), "Envoy to accept example.org", || {
            call(own.clone())
        })
        .await
        .with_context(|| format!("envoy stderr:\n{}", envoy.child.stderr_tail(40)))?;
        ensure!(peer == own_id, "Envoy saw {peer}");
        // b.org, signed by b.org's CA: Envoy's SPIFFE validator has b.org's bundle.
        let b_id = "spiffe://b.org/ns/prod/sa/caller";
        let b_svid = b_ca.svid("/ns/prod/sa/caller");
        let peer = eventually(Duration::from_secs(30), "Envoy to accept b.org", || {
            call(b_svid.clone())
        })
        .await
        .with_context(|| format!("envoy stderr:\n{}", envoy.child.stderr_tail(40)))?;
        ensure!(peer == b_id, "Envoy saw {peer}");
        // The impostor: an example.org ID signed by b.org's CA.
        let (chain, key) = b_ca.issue(&LeafSpec::new("spiffe://example.org/ns/prod/sa/admin"));
        let refused = call(Svid::new(chain, key)?).await;
        ensure!(refused.is_err(), "Envoy accepted the impostor: {refused:?}");
        drop(envoy);
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn b_org_root_rotation_reaches_a_org_with_no_failed_request() -> anyhow::Result<()> {
    e2e(async {
        let fast_rotation = ControlPlaneOpts {
            svid_ttl: Some("1h".into()),
            rotate_every: Some("2s".into()),
            ..ControlPlaneOpts::default()
        };
        let a = start_domain_with("a.org", None, fast_rotation.clone())?;
        let b = start_domain_with("b.org", None, fast_rotation)?;
        a.federate_with(&b)?;
        b.federate_with(&a)?;
        a.wait_for("b.org", "a.org fetched b.org", fetched).await?;
        b.wait_for("a.org", "b.org fetched a.org", fetched).await?;
        let app_b = EchoApp::start("app-b").await?;
        let side_b =
            Sidecar::start(&b.cp, SidecarOpts::new("sidecar-b", B_SERVER, app_b.addr)).await?;
        let app_a = EchoApp::start("app-a").await?;
        let opts_a = SidecarOpts::new("sidecar-a", A_CALLER, app_a.addr).upstream(
            "b",
            side_b.addrs.inbound,
            B_SERVER,
        );
        let side_a = Sidecar::start(&a.cp, opts_a.clone()).await?;
        let outbound = side_a.outbound();
        eventually(WAIT, "a.org → b.org call", || async {
            echo_json(&get_once(outbound, Proto::H1, "b", "/warm", &[]).await?)
        })
        .await?;

        // Requests flow through the rotation; every one must succeed.
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let load = {
            let stop = Arc::clone(&stop);
            tokio::spawn(async move {
                let (mut ok, mut failed) = (0u64, Vec::new());
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    match get_once(outbound, Proto::H1, "b", "/load", &[]).await {
                        Ok(r) if r.status == 200 => ok += 1,
                        Ok(r) => failed.push(r.summary()),
                        Err(e) => failed.push(e.to_string()),
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                (ok, failed)
            })
        };

        let old_root = b.cp.bundle()?.roots()[0].clone();
        crate::reliability_ca::ca_rotate(&b.cp, &["--activate-after", "5s"])?;
        // The new root reaches a.org's SDS (what its sidecars and Envoys get) through b.org's
        // bundle endpoint before it signs anything.
        let new_root = eventually(WAIT, "b.org's new root in a.org's SDS", || async {
            let bundles = sds_bundles(&a.cp).await?;
            let b_cas = bundles
                .iter()
                .find(|(td, _)| td == "b.org")
                .map(|(_, c)| c.clone())
                .context("no b.org in a.org's SDS")?;
            ensure!(
                b_cas.len() == 2,
                "b.org CAs in a.org's SDS: {}",
                b_cas.len()
            );
            b_cas
                .into_iter()
                .find(|c| *c != old_root)
                .context("no new root")
        })
        .await?;
        let d = a.federated("b.org").await?;
        ensure!(d["sequence"] == 2 && d["cas"] == 2, "{d}");

        // Sidecar B turns to an SVID of the new root; a handshake verified with the b.org
        // bundle of a.org's SDS accepts it, and a fresh a.org sidecar (new handshakes) reaches B.
        let new_issuer = trellis_identity::cert_facts(&new_root)?.subject;
        let a_token = a.cp.create_token("spiffe://a.org/test/probe", "1h")?;
        let (probe_svid, _) = trellis_tests::fetch_svid(&a.cp, &a_token).await?;
        eventually(
            Duration::from_secs(30),
            "sidecar B on the new b.org root",
            || async {
                let b_cas = sds_bundles(&a.cp)
                    .await?
                    .into_iter()
                    .find(|(td, _)| td == "b.org")
                    .map(|(_, c)| c)
                    .context("no b.org")?;
                let b_bundle = trellis_identity::TrustBundle::new(
                    trellis_identity::TrustDomain::parse("b.org")?,
                    b_cas,
                )?;
                let config = tls_client_config(
                    b_bundle,
                    PeerMatch::Exact(SpiffeId::parse(B_SERVER)?),
                    Some(&probe_svid),
                    &[b"http/1.1"],
                )?;
                let tls = tls_connect(side_b.addrs.inbound, config).await?;
                let issuer = trellis_identity::cert_facts(&trellis_tests::peer_leaf(&tls)?)?.issuer;
                ensure!(issuer == new_issuer, "B presents a certificate of {issuer}");
                Ok(())
            },
        )
        .await?;
        let app_a2 = EchoApp::start("app-a2").await?;
        let mut opts_a2 = opts_a;
        opts_a2.name = "sidecar-a2".into();
        opts_a2.app = app_a2.addr;
        let side_a2 = Sidecar::start(&a.cp, opts_a2).await?;
        let echo = echo_json(&get_once(side_a2.outbound(), Proto::H1, "b", "/after", &[]).await?)?;
        ensure!(echo["app"] == "app-b", "{echo}");

        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let (ok, failed) = load.await?;
        println!(
            "requests during the b.org root rotation: {ok} ok, {} failed",
            failed.len()
        );
        ensure!(ok > 50 && failed.is_empty(), "{ok} ok, failed: {failed:?}");
        drop((side_a, side_a2, side_b));
        Ok(())
    })
    .await
}

/// `profile: https_web`: the endpoint is checked against the system's roots (here a test root
/// in `SSL_CERT_FILE`) and the URL's host, not a SPIFFE ID; with no system roots at all the
/// fetch fails with an error saying so rather than an unknown issuer.
#[tokio::test]
async fn https_web_endpoint_is_verified_with_the_system_roots_and_none_is_named(
) -> anyhow::Result<()> {
    let web_root = TestCa::root("web.example");
    let b_ca = TestCa::root("b.org");
    let (chain, key) = web_root.issue(&LeafSpec::server("localhost"));
    let body = Arc::new(Mutex::new(document(&[&b_ca], 1)));
    let endpoint = web_endpoint(chain, key, Arc::clone(&body)).await?;
    let dir = tempfile::tempdir()?;
    let roots = dir.path().join("roots.pem");
    std::fs::write(&roots, web_root.cert_pem())?;
    let no_roots = dir.path().join("no-roots.pem");
    std::fs::write(&no_roots, "")?;
    let federate = |d: &Domain| -> anyhow::Result<()> {
        let yaml = format!(
            "{FAST}federation:\n  - trust_domain: b.org\n    bundle_endpoint_url: https://localhost:{}\n    profile: https_web\n",
            endpoint.port()
        );
        let tmp = d.dir.path().join("control.yaml.tmp");
        std::fs::write(&tmp, yaml)?;
        std::fs::rename(&tmp, &d.config)?;
        Ok(())
    };
    let with_roots = |file: &Path| ControlPlaneOpts {
        env: vec![
            ("SSL_CERT_FILE".into(), file.display().to_string()),
            (
                "SSL_CERT_DIR".into(),
                dir.path().join("no-dir").display().to_string(),
            ),
        ],
        ..ControlPlaneOpts::default()
    };

    let a = start_domain_with("a.org", None, with_roots(&roots))?;
    federate(&a)?;
    let d = a
        .wait_for("b.org", "b.org fetched over https_web", fetched)
        .await?;
    ensure!(d["source"] == "endpoint", "{d}");

    let blind = start_domain_with("a.org", None, with_roots(&no_roots))?;
    federate(&blind)?;
    blind
        .wait_for("b.org", "the missing system roots named", |d| {
            d["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("system's root certificates and none were found"))
        })
        .await?;
    Ok(())
}
