//! The sidecar injection webhook of `trellis control --webhook-listen`, end to end: HTTPS with
//! a certificate from the control plane's CA (verified against `bundle.pem` by DNS name, as
//! the Kubernetes API server verifies it against `caBundle`), real AdmissionReview JSON in,
//! JSONPatch out; malformed, oversized and slow requests get clean errors; and a sidecar
//! started with exactly the environment the webhook injected gets its SVID from the control
//! plane, its bundle coming from `TRELLIS_CONTROL_BUNDLE_PEM` alone. App containers get
//! `HTTP_PROXY`/`NO_PROXY` (with the control plane's `--no-proxy`) unless the pod opts out,
//! and the sidecar the control plane's `--sidecar-default-route` (checked at start, as the pods'
//! `trellis.io/default-route` is at admission, by the sidecar's own parser).
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};
use base64::Engine as _;
use serde_json::Value;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use trellis_tests::k8s::K8sIssuer;
use trellis_tests::sidecar::{Metrics, Sidecar};
use trellis_tests::{e2e, trellis_bin, workspace_root, ControlPlane, ControlPlaneOpts};

/// The name the API server uses for the webhook Service, and the certificate's first SAN.
const DNS_NAME: &str = "trellis-control.trellis-system.svc";
/// A second `--webhook-dns-name`.
const DNS_NAME_2: &str = "trellis-control.trellis-system.svc.cluster.local";
const IMAGE: &str = "registry.example/trellis:e2e";
/// `--sidecar-default-route`: the convention route of issue #25.
const ROUTE: &str = "hosts={service}.{namespace}.svc.cluster.local;{service}.{namespace},address={service}.{namespace}.svc.cluster.local:15443,identity=spiffe://{trust_domain}/ns/{namespace}/sa/{service}";

fn fixture(name: &str) -> Vec<u8> {
    let path = workspace_root()
        .join("crates/trellis-control/tests/fixtures/admission")
        .join(name);
    std::fs::read(&path)
        .with_context(|| path.display().to_string())
        .unwrap()
}

/// A TLS client that trusts `bundle.pem` only, for `versions`.
fn client_config(
    cp: &ControlPlane,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    for root in cp.bundle()?.roots() {
        roots.add(root.clone())?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_protocol_versions(versions)?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(Arc::new(config))
}

async fn connect(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    name: &str,
) -> anyhow::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let server_name = rustls::pki_types::ServerName::try_from(name.to_owned())?;
    Ok(tokio_rustls::TlsConnector::from(config)
        .connect(server_name, tcp)
        .await?)
}

/// A response, as read off the wire.
struct Answer {
    status: u16,
    headers: BTreeMap<String, String>,
    body: Vec<u8>,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&self.body)))
    }
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Reads one HTTP/1.1 response (headers, then `content-length` bytes) within 20 s.
async fn read_answer<S: tokio::io::AsyncRead + Unpin>(io: &mut S) -> anyhow::Result<Answer> {
    let read = async {
        let mut raw = Vec::new();
        let mut buf = [0u8; 16 * 1024];
        loop {
            if let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = std::str::from_utf8(&raw[..end])?.to_owned();
                let mut lines = head.split("\r\n");
                let status: u16 = lines
                    .next()
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|s| s.parse().ok())
                    .context("status line")?;
                let headers: BTreeMap<String, String> = lines
                    .filter_map(|l| l.split_once(':'))
                    .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
                    .collect();
                let len: usize = headers
                    .get("content-length")
                    .context("content-length")?
                    .parse()?;
                let mut body = raw[end + 4..].to_vec();
                while body.len() < len {
                    let n = io.read(&mut buf).await?;
                    ensure!(n > 0, "EOF inside the body");
                    body.extend_from_slice(&buf[..n]);
                }
                body.truncate(len);
                return Ok(Answer {
                    status,
                    headers,
                    body,
                });
            }
            let n = io.read(&mut buf).await?;
            ensure!(
                n > 0,
                "EOF before the response headers: {:?}",
                String::from_utf8_lossy(&raw)
            );
            raw.extend_from_slice(&buf[..n]);
        }
    };
    tokio::time::timeout(Duration::from_secs(20), read)
        .await
        .context("no response within 20s")?
}

/// POSTs `body` to `path` over a fresh TLS connection checked for `DNS_NAME`, as the API
/// server does.
async fn post(
    cp: &ControlPlane,
    config: Arc<rustls::ClientConfig>,
    path: &str,
    body: &[u8],
) -> anyhow::Result<Answer> {
    let addr = cp
        .webhook_addr
        .context("no webhook= on the listening line")?;
    let mut tls = connect(addr, config, DNS_NAME).await?;
    let head = format!(
        "POST {path}?timeout=5s HTTP/1.1\r\nHost: {DNS_NAME}:443\r\nContent-Type: application/json\r\nAccept: application/json, */*\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    tls.write_all(head.as_bytes()).await?;
    tls.write_all(body).await?;
    tls.flush().await?;
    read_answer(&mut tls).await
}

/// The JSONPatch operations of an allowed, patched response.
fn patch_ops(response: &Value) -> Vec<Value> {
    assert_eq!(response["allowed"], true, "{response}");
    assert_eq!(response["patchType"], "JSONPatch", "{response}");
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(response["patch"].as_str().unwrap())
        .unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

fn env_map(container: &Value) -> BTreeMap<String, String> {
    container["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["name"].as_str().unwrap().to_owned(),
                e["value"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

async fn start(dir: &tempfile::TempDir) -> anyhow::Result<(ControlPlane, K8sIssuer)> {
    let issuer = K8sIssuer::new()?;
    let k8s = issuer.write_jwks(&dir.path().join("jwks.json"))?;
    let cp = ControlPlane::start(ControlPlaneOpts {
        k8s: Some(k8s),
        extra_args: [
            "--webhook-listen",
            "127.0.0.1:0",
            "--webhook-dns-name",
            &format!("{DNS_NAME},{DNS_NAME_2}"),
            "--sidecar-image",
            IMAGE,
            "--no-proxy",
            ".corp.example,10.0.0.0/8",
            "--sidecar-default-route",
            ROUTE,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect(),
        ..Default::default()
    })?;
    Ok((cp, issuer))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_injects_over_tls_and_the_injected_sidecar_gets_its_svid() -> anyhow::Result<()> {
    e2e(async {
        let dir = tempfile::tempdir()?;
        let (cp, issuer) = start(&dir).await?;
        let addr = cp.webhook_addr.context("no webhook= on the listening line")?;
        println!("webhook listening on {addr}");
        let tls13 = client_config(&cp, &[&rustls::version::TLS13])?;
        let tls12 = client_config(&cp, &[&rustls::version::TLS12])?;

        // The serving certificate verifies against bundle.pem for each DNS name, over TLS 1.3
        // and 1.2 (the API server's Go client may use either), and for no other name.
        for (config, version) in [(&tls13, "TLSv1.3"), (&tls12, "TLSv1.2")] {
            for name in [DNS_NAME, DNS_NAME_2] {
                let tls = connect(addr, Arc::clone(config), name)
                    .await
                    .with_context(|| format!("{version} handshake as {name}"))?;
                let (_, conn) = tls.get_ref();
                println!(
                    "handshake {name}: {:?} {:?}",
                    conn.protocol_version(),
                    conn.negotiated_cipher_suite().map(|s| s.suite())
                );
            }
        }
        let wrong = connect(addr, Arc::clone(&tls13), "evil.example.com").await;
        let err = format!("{:#}", wrong.err().context("a wrong name must fail")?);
        ensure!(err.contains("NotValidForName") || err.contains("not valid for"), "{err}");

        // Injection on a Deployment's pod.
        let answer = post(&cp, Arc::clone(&tls13), "/inject", &fixture("deployment-pod.json")).await?;
        ensure!(answer.status == 200, "{} {}", answer.status, answer.text());
        ensure!(
            answer.headers.get("content-type").map(String::as_str) == Some("application/json")
        );
        let review = answer.json();
        assert_eq!(review["apiVersion"], "admission.k8s.io/v1");
        assert_eq!(review["kind"], "AdmissionReview");
        let response = &review["response"];
        assert_eq!(response["uid"], "0f5a9e7c-2b1d-4c3e-9a8f-1d2e3f4a5b6c");
        let ops = patch_ops(response);
        let paths: Vec<&str> = ops.iter().map(|o| o["path"].as_str().unwrap()).collect();
        // The default: a native sidecar, the pod's first init container; then the app
        // container's proxy environment (it had no env).
        assert_eq!(paths, ["/spec/initContainers", "/spec/volumes", "/spec/containers/0/env"]);
        let no_proxy = "localhost,127.0.0.1,::1,$(TRELLIS_POD_IPS),.corp.example,10.0.0.0/8";
        assert_eq!(
            ops[2]["value"],
            serde_json::json!([
                { "name": "TRELLIS_POD_IPS", "valueFrom": { "fieldRef": { "fieldPath": "status.podIPs" } } },
                { "name": "HTTP_PROXY", "value": "http://127.0.0.1:15001" },
                { "name": "http_proxy", "value": "http://127.0.0.1:15001" },
                { "name": "NO_PROXY", "value": no_proxy },
                { "name": "no_proxy", "value": no_proxy },
            ])
        );
        let container = &ops[0]["value"][0];
        assert_eq!(container["name"], "trellis-sidecar");
        assert_eq!(container["restartPolicy"], "Always");
        assert_eq!(container["startupProbe"]["httpGet"]["path"], "/ready");
        assert_eq!(container["image"], IMAGE);
        let env = env_map(container);
        let bundle_pem = std::fs::read_to_string(&cp.bundle_pem_path)?;
        assert_eq!(env["TRELLIS_CONTROL_BUNDLE_PEM"], bundle_pem, "the bundle in force");
        assert_eq!(env["TRELLIS_TRUST_DOMAIN"], "example.org");
        assert_eq!(
            env["TRELLIS_CONTROL_PLANE"],
            "trellis-control.trellis-system.svc:8443"
        );
        assert_eq!(env["TRELLIS_APP"], "127.0.0.1:5678");
        // The sidecar started below with this environment accepts it.
        assert_eq!(env["TRELLIS_DEFAULT_ROUTE"], ROUTE);
        println!(
            "injected: {} env vars, patch {} bytes",
            env.len(),
            response["patch"].as_str().unwrap().len()
        );

        // The same over TLS 1.2.
        let answer = post(&cp, Arc::clone(&tls12), "/inject", &fixture("pod-with-volumes-and-ports.json")).await?;
        ensure!(answer.status == 200, "{} {}", answer.status, answer.text());
        let ops = patch_ops(&answer.json()["response"]);
        let paths: Vec<&str> = ops.iter().map(|o| o["path"].as_str().unwrap()).collect();
        // The pod has init containers: the native sidecar goes first. The first app container
        // has an env to append to, the second none.
        assert_eq!(
            paths,
            [
                &["/spec/initContainers/0", "/spec/volumes/-"][..],
                &["/spec/containers/0/env/-"; 5],
                &["/spec/containers/1/env"],
            ]
            .concat()
        );

        // `trellis.io/proxy-env: "false"`: the sidecar, and nothing in the app containers.
        let mut opted: Value = serde_json::from_slice(&fixture("deployment-pod.json"))?;
        opted["request"]["object"]["metadata"]["annotations"] =
            serde_json::json!({ "trellis.io/proxy-env": "false" });
        let answer = post(&cp, Arc::clone(&tls13), "/inject", &serde_json::to_vec(&opted)?).await?;
        ensure!(answer.status == 200, "{} {}", answer.status, answer.text());
        let ops = patch_ops(&answer.json()["response"]);
        let paths: Vec<&str> = ops.iter().map(|o| o["path"].as_str().unwrap()).collect();
        assert_eq!(paths, ["/spec/initContainers", "/spec/volumes"]);

        // A `trellis.io/default-route` the sidecar would refuse: refused, naming it.
        let mut bad: Value = serde_json::from_slice(&fixture("deployment-pod.json"))?;
        bad["request"]["object"]["metadata"]["annotations"] = serde_json::json!({
            "trellis.io/default-route": "hosts={svc}.{namespace},address=x:15443,identity=spiffe://{trust_domain}/x"
        });
        let answer = post(&cp, Arc::clone(&tls13), "/inject", &serde_json::to_vec(&bad)?).await?;
        ensure!(answer.status == 200, "{} {}", answer.status, answer.text());
        let response = &answer.json()["response"];
        assert_eq!(response["allowed"], false);
        let message = response["status"]["message"].as_str().unwrap_or_default();
        ensure!(
            message.contains("annotation trellis.io/default-route")
                && message.contains("unknown placeholder `{svc}`"),
            "{message}"
        );

        // Opted out and already injected: allowed, no patch.
        for (name, uid) in [
            ("pod-opted-out.json", "1f2e3d4c-5b6a-4978-8a9b-0c1d2e3f4a5b"),
            ("pod-already-injected.json", "3c8a4f0e-0d1b-4a55-9d0e-7f2f8e1b6a01"),
        ] {
            let answer = post(&cp, Arc::clone(&tls13), "/inject", &fixture(name)).await?;
            ensure!(answer.status == 200, "{name}: {} {}", answer.status, answer.text());
            let response = &answer.json()["response"];
            assert_eq!(response["uid"], uid, "{name}");
            assert_eq!(response["allowed"], true, "{name}");
            assert!(response.get("patch").is_none(), "{name}: {response}");
        }

        // A review of a Deployment: a well-formed review, refused with a status.
        let answer = post(&cp, Arc::clone(&tls13), "/inject", &fixture("malformed-not-a-pod.json")).await?;
        ensure!(answer.status == 200, "{} {}", answer.status, answer.text());
        let response = &answer.json()["response"];
        assert_eq!(response["allowed"], false);
        assert_eq!(response["status"]["code"], 400);
        println!("not a pod -> {}", response["status"]["message"]);

        // Malformed bodies: 400 with the reason, and the server keeps serving.
        for (name, want) in [
            ("malformed-not-json.txt", "not a JSON AdmissionReview"),
            ("malformed-v1beta1.json", "admission.k8s.io/v1beta1"),
            ("malformed-no-uid.json", "no uid"),
        ] {
            let answer = post(&cp, Arc::clone(&tls13), "/inject", &fixture(name)).await?;
            ensure!(answer.status == 400, "{name}: {} {}", answer.status, answer.text());
            ensure!(answer.text().contains(want), "{name}: {}", answer.text());
            println!("{name} -> 400 {}", answer.text().trim());
        }
        let answer = post(&cp, Arc::clone(&tls13), "/mutate", b"{}").await?;
        ensure!(answer.status == 404, "{}", answer.status);

        // Oversized: a declared 3 MiB body is refused before it is read.
        let mut tls = connect(addr, Arc::clone(&tls13), DNS_NAME).await?;
        tls.write_all(
            format!(
                "POST /inject HTTP/1.1\r\nHost: {DNS_NAME}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                3 * 1024 * 1024
            )
            .as_bytes(),
        )
        .await?;
        tls.flush().await?;
        let answer = read_answer(&mut tls).await?;
        ensure!(answer.status == 413, "{} {}", answer.status, answer.text());
        println!("3 MiB declared -> 413 {}", answer.text().trim());

        // Metrics on the admin port: one count per answer above.
        let metrics = Metrics::parse(&cp.admin_get("/metrics").await?.text())?;
        for (result, want) in [("injected", 3.0), ("skipped", 1.0), ("opted_out", 1.0), ("error", 6.0)] {
            let got = metrics.sum("trellis_webhook_reviews_total", &[("result", result)]);
            ensure!(got == want, "{result}: {got} != {want}\n{}", metrics.lines_of("trellis_webhook"));
        }
        ensure!(metrics.sum("trellis_webhook_cert_expiry_timestamp_seconds", &[]) > 0.0);

        // A sidecar with exactly the injected environment (addresses and the token path
        // moved to this machine) gets its SVID: the bundle came from the env var alone.
        let token_file = dir.path().join("token");
        std::fs::write(&token_file, issuer.token("demo", "service-a")?)?;
        let mut cmd = Command::new(trellis_bin());
        cmd.args(container["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()));
        for (name, value) in &env {
            cmd.env(name, value);
        }
        cmd.env("TRELLIS_CONTROL_PLANE", cp.sds_addr.to_string())
            .env("TRELLIS_TOKEN_FILE", &token_file)
            .env("TRELLIS_INBOUND", "127.0.0.1:0")
            .env("TRELLIS_OUTBOUND", "127.0.0.1:0")
            .env("TRELLIS_ADMIN", "127.0.0.1:0")
            .env("TRELLIS_APP", "127.0.0.1:1")
            .env_remove("TRELLIS_CONTROL_BUNDLE");
        let started = Instant::now();
        let sidecar = Sidecar::spawn(
            "injected-sidecar",
            "spiffe://example.org/ns/demo/sa/service-a",
            cmd,
            cp.dir.path(),
        )
        .await?;
        let certs: Value = serde_json::from_slice(&sidecar.admin_get("/certs").await?.body)?;
        assert_eq!(
            certs["svid"]["spiffe_id"],
            "spiffe://example.org/ns/demo/sa/service-a"
        );
        println!(
            "injected sidecar ready with {} in {:?}",
            certs["svid"]["spiffe_id"],
            started.elapsed()
        );
        Ok(())
    })
    .await
}

/// A client that sends headers or a body too slowly is cut off; the webhook never hangs on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_timed_out() -> anyhow::Result<()> {
    e2e(async {
        let dir = tempfile::tempdir()?;
        let (cp, _issuer) = start(&dir).await?;
        let addr = cp.webhook_addr.context("no webhook=")?;
        let config = client_config(&cp, &[&rustls::version::TLS13])?;

        // A body that never completes: 408 once the body timeout passes.
        let started = Instant::now();
        let mut tls = connect(addr, Arc::clone(&config), DNS_NAME).await?;
        tls.write_all(
            format!("POST /inject HTTP/1.1\r\nHost: {DNS_NAME}\r\nContent-Length: 100\r\n\r\n{{\"apiVersion\"")
                .as_bytes(),
        )
        .await?;
        tls.flush().await?;
        let answer = read_answer(&mut tls).await?;
        ensure!(answer.status == 408, "{} {}", answer.status, answer.text());
        println!("stalled body -> 408 after {:?}", started.elapsed());

        // Headers that never complete: the connection is closed.
        let started = Instant::now();
        let mut tls = connect(addr, Arc::clone(&config), DNS_NAME).await?;
        tls.write_all(b"POST /inject HTTP/1.1\r\nHost: x\r\n").await?;
        tls.flush().await?;
        let mut buf = [0u8; 1024];
        let closed = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                match tls.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
        if closed.is_err() {
            bail!("a client that never finished its headers was still connected after 30s");
        }
        println!("stalled headers -> closed after {:?}", started.elapsed());

        // And the webhook still answers.
        let answer = post(&cp, config, "/inject", &fixture("pod-opted-out.json")).await?;
        ensure!(answer.status == 200, "{}", answer.status);
        Ok(())
    })
    .await
}

/// A `--sidecar-default-route` the sidecar would refuse stops the control plane at start,
/// naming the setting, instead of every injected sidecar.
#[test]
fn bad_sidecar_default_route_stops_the_control_plane() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let stderr = trellis_tests::control_must_fail_to_start(
        dir.path(),
        &[
            "--webhook-listen",
            "127.0.0.1:0",
            "--sidecar-default-route",
            "hosts={service},address={service}:15443,identity=spiffe://{trust_domain}/{namespace}",
        ],
    )?;
    ensure!(
        stderr.contains("sidecar_default_route") && stderr.contains("{namespace}"),
        "{stderr}"
    );
    println!("-> {}", stderr.lines().last().unwrap_or_default());
    Ok(())
}

/// `TRELLIS_CONTROL_BUNDLE_PEM` that is not a bundle, or given together with a bundle path,
/// stops the sidecar at start with a message naming the setting.
#[test]
fn bad_inline_bundle_stops_the_sidecar_with_a_clear_message() -> anyhow::Result<()> {
    let sidecar = |env: &[(&str, &str)]| -> anyhow::Result<(bool, String)> {
        let mut cmd = Command::new(trellis_bin());
        cmd.args(["sidecar", "--trust-domain", "example.org"])
            .args(["--control-plane", "127.0.0.1:1", "--join-token", "t"])
            .args(["--inbound", "127.0.0.1:0", "--outbound", "127.0.0.1:0"])
            .args(["--admin", "127.0.0.1:0"])
            .env_remove("TRELLIS_CONTROL_BUNDLE")
            .env_remove("TRELLIS_CONTROL_BUNDLE_PEM")
            .envs(env.iter().copied());
        let out = trellis_tests::run_with_timeout(cmd, trellis_tests::COMMAND_TIMEOUT)?;
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    };
    for (env, want) in [
        (
            vec![("TRELLIS_CONTROL_BUNDLE_PEM", "garbage")],
            "TRELLIS_CONTROL_BUNDLE_PEM",
        ),
        (vec![("TRELLIS_CONTROL_BUNDLE_PEM", " \n")], "empty"),
        (
            vec![
                ("TRELLIS_CONTROL_BUNDLE_PEM", "x"),
                ("TRELLIS_CONTROL_BUNDLE", "/b.pem"),
            ],
            "cannot be used with",
        ),
        (vec![], "control_bundle_pem"),
    ] {
        let (ok, stderr) = sidecar(&env)?;
        ensure!(!ok, "{env:?}: the sidecar started");
        ensure!(stderr.contains(want), "{env:?}: want {want:?} in {stderr}");
        println!("{env:?} -> {}", stderr.lines().last().unwrap_or_default());
    }
    Ok(())
}

/// `trellis.io/workload-api: "true"`: the patch shares an `emptyDir` and sets
/// `SPIFFE_ENDPOINT_SOCKET` in the app container; a sidecar started with exactly the injected
/// environment (the socket's directory moved to this machine) serves that socket, and the Rust
/// `spiffe` crate, pointed where the app container's variable points, gets the pod's SVID.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workload_api_annotation_gives_the_app_a_socket_the_spiffe_crate_reads(
) -> anyhow::Result<()> {
    e2e(async {
        let dir = tempfile::tempdir()?;
        let (cp, issuer) = start(&dir).await?;
        let tls = client_config(&cp, &[&rustls::version::TLS13])?;
        let mut review: Value = serde_json::from_slice(&fixture("deployment-pod.json"))?;
        review["request"]["object"]["metadata"]["annotations"] =
            serde_json::json!({ "trellis.io/workload-api": "true" });
        let answer = post(&cp, tls, "/inject", &serde_json::to_vec(&review)?).await?;
        ensure!(answer.status == 200, "{} {}", answer.status, answer.text());
        let ops = patch_ops(&answer.json()["response"]);
        let op = |path: &str| {
            ops.iter()
                .find(|o| o["path"] == path)
                .map(|o| o["value"].clone())
                .with_context(|| format!("no op at {path}: {ops:#?}"))
        };
        let app_env = op("/spec/containers/0/env")?;
        ensure!(
            app_env == serde_json::json!([{ "name": "SPIFFE_ENDPOINT_SOCKET", "value": "unix:///run/spiffe/workload.sock" }]),
            "{app_env}"
        );
        ensure!(
            op("/spec/containers/0/volumeMounts")?
                == serde_json::json!([{ "name": "trellis-spiffe", "mountPath": "/run/spiffe", "readOnly": true }])
        );
        ensure!(op("/spec/securityContext/supplementalGroups")? == serde_json::json!([65532]));
        let container = op("/spec/initContainers")?[0].clone();
        let env = env_map(&container);
        ensure!(env["TRELLIS_WORKLOAD_API_SOCKET"] == "/run/spiffe/workload.sock", "{env:?}");

        // /run/spiffe here is a directory of this test; everything else as injected.
        let run_spiffe = dir.path().join("run-spiffe");
        std::fs::create_dir(&run_spiffe)?;
        let moved = |v: &str| v.replace("/run/spiffe", run_spiffe.to_str().unwrap());
        let token_file = dir.path().join("token");
        std::fs::write(&token_file, issuer.token("demo", "service-a")?)?;
        let mut cmd = Command::new(trellis_bin());
        cmd.args(container["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()));
        for (name, value) in &env {
            cmd.env(name, moved(value));
        }
        cmd.env("TRELLIS_CONTROL_PLANE", cp.sds_addr.to_string())
            .env("TRELLIS_TOKEN_FILE", &token_file)
            .env("TRELLIS_INBOUND", "127.0.0.1:0")
            .env("TRELLIS_OUTBOUND", "127.0.0.1:0")
            .env("TRELLIS_ADMIN", "127.0.0.1:0")
            .env("TRELLIS_APP", "127.0.0.1:1")
            .env_remove("TRELLIS_CONTROL_BUNDLE");
        let _sidecar = Sidecar::spawn(
            "injected-sidecar",
            "spiffe://example.org/ns/demo/sa/service-a",
            cmd,
            cp.dir.path(),
        )
        .await?;
        let endpoint = moved(app_env[0]["value"].as_str().unwrap());
        let client = spiffe::WorkloadApiClient::connect_to(&endpoint).await?;
        let svid = client.fetch_x509_svid().await?;
        ensure!(
            svid.spiffe_id().to_string() == "spiffe://example.org/ns/demo/sa/service-a",
            "{}",
            svid.spiffe_id()
        );
        println!("app container's SPIFFE_ENDPOINT_SOCKET ({endpoint}) served {}", svid.spiffe_id());
        Ok(())
    })
    .await
}
