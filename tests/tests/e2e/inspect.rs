//! `trellis inspect HOST:PORT`, the real binary, against a Trellis sidecar's inbound, a stock
//! Envoy listener fed by `trellis control` over SDS, and misbehaving peers, one test per failure
//! reason: a server from another CA, an expired server certificate, the wrong SPIFFE ID, a
//! certificate with no SPIFFE ID, a TLS 1.2-only server (these four are `openssl s_server`, a
//! TLS stack that is not rustls), a plain HTTP server, a port nobody listens on, and a peer
//! that accepts TCP and never answers.
//!
//! Every case reads the `--json` report and checks `ok`, `reason` and `refused_by`, and the
//! exit status (0 verified, 1 failed, 2 bad usage).

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use anyhow::{bail, ensure, Context as _};
use serde_json::Value;
use tempfile::TempDir;
use trellis_identity::{certs_to_pem, key_to_pem, Svid};
use trellis_tests::echo::EchoApp;
use trellis_tests::k8s::K8sIssuer;
use trellis_tests::mesh::B_ID;
use trellis_tests::openssl::{InitCa, LeafOpts, PemFiles};
use trellis_tests::sidecar::{Sidecar, SidecarOpts};
use trellis_tests::{
    e2e, envoy_or_skip, eventually, fetch_svid, free_port, render_template, run_with_timeout,
    tool_or_skip, trellis_bin, Child, ControlPlane, ControlPlaneOpts, Envoy, COMMAND_TIMEOUT,
    STARTUP_TIMEOUT,
};

const CLIENT_ID: &str = "spiffe://example.org/ops/inspect";
const SERVER_ID: &str = "spiffe://example.org/ns/demo/sa/server";
/// What Envoy's Kubernetes token for `default/web` is mapped to.
const ENVOY_ID: &str = "spiffe://example.org/ns/default/sa/web";
const ENVOY_BOOTSTRAP: &str = include_str!("../../envoy/sds-bootstrap.yaml");
/// Envoy's listeners warm only once both SDS secrets arrived.
const ENVOY_WARMUP: Duration = Duration::from_secs(45);

/// One run of `trellis inspect`.
struct Run {
    output: Output,
    stdout: String,
    stderr: String,
}

impl Run {
    fn code(&self) -> Option<i32> {
        self.output.status.code()
    }

    /// The `--json` report.
    fn json(&self) -> anyhow::Result<Value> {
        serde_json::from_str(&self.stdout)
            .with_context(|| format!("stdout is not JSON:\n{}", self.describe()))
    }

    fn describe(&self) -> String {
        format!(
            "trellis inspect exited {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.output.status, self.stdout, self.stderr
        )
    }
}

/// Runs `trellis inspect <args…>` on a blocking thread (in-process servers keep running).
async fn inspect(args: Vec<String>) -> anyhow::Result<Run> {
    tokio::task::spawn_blocking(move || {
        let mut cmd = Command::new(trellis_bin());
        cmd.arg("inspect").args(&args);
        let output = run_with_timeout(cmd, COMMAND_TIMEOUT)?;
        Ok(Run {
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
            output,
        })
    })
    .await?
}

/// `HOST:PORT --bundle B --json` plus `extra`.
fn args(addr: SocketAddr, bundle: &Path, extra: &[&str]) -> Vec<String> {
    let mut v = vec![
        addr.to_string(),
        "--bundle".into(),
        bundle.to_string_lossy().into_owned(),
        "--json".into(),
    ];
    v.extend(extra.iter().map(|s| (*s).to_owned()));
    v
}

/// `--cert CHAIN --key KEY` for PEM files (the chain file gets the intermediates too).
fn cert_args(files: &ClientFiles) -> Vec<String> {
    vec![
        "--cert".into(),
        files.chain.to_string_lossy().into_owned(),
        "--key".into(),
        files.key.to_string_lossy().into_owned(),
    ]
}

/// A client certificate chain and key, as `--cert` and `--key` take them.
struct ClientFiles {
    chain: PathBuf,
    key: PathBuf,
}

fn write_client_svid(svid: &Svid, dir: &Path, name: &str) -> anyhow::Result<ClientFiles> {
    let chain = dir.join(format!("{name}-chain.pem"));
    let key = dir.join(format!("{name}-key.pem"));
    std::fs::write(&chain, certs_to_pem(svid.chain()))?;
    std::fs::write(&key, key_to_pem(svid.key()).as_bytes())?;
    Ok(ClientFiles { chain, key })
}

fn client_files_from(pem: &PemFiles, dir: &Path, name: &str) -> anyhow::Result<ClientFiles> {
    let chain = dir.join(format!("{name}-chain.pem"));
    let mut text = std::fs::read_to_string(&pem.cert)?;
    if let Some(rest) = &pem.intermediates {
        text.push_str(&std::fs::read_to_string(rest)?);
    }
    std::fs::write(&chain, text)?;
    Ok(ClientFiles {
        chain,
        key: pem.key.clone(),
    })
}

/// Asserts a failed inspection: exit 1, `ok: false`, and this reason and refusing side.
fn expect_failure(run: &Run, reason: &str, refused_by: Option<&str>) -> anyhow::Result<Value> {
    let report = run.json()?;
    ensure!(
        run.code() == Some(1),
        "want exit 1 for {reason}:\n{}",
        run.describe()
    );
    ensure!(
        report["ok"] == false,
        "ok must be false:\n{}",
        run.describe()
    );
    ensure!(
        report["reason"] == reason,
        "want reason {reason}, got {}:\n{}",
        report["reason"],
        run.describe()
    );
    let want_side = refused_by.map_or(Value::Null, |s| Value::String(s.to_owned()));
    ensure!(
        report["refused_by"] == want_side,
        "want refused_by {want_side}, got {}:\n{}",
        report["refused_by"],
        run.describe()
    );
    ensure!(
        report["detail"].as_str().is_some_and(|d| !d.is_empty()),
        "a failure carries a detail:\n{}",
        run.describe()
    );
    Ok(report)
}

/// A control plane, app B behind sidecar B, and a client SVID for [`CLIENT_ID`] in PEM files.
struct SidecarFixture {
    b: Sidecar,
    client: ClientFiles,
    _app: EchoApp,
    cp: ControlPlane,
}

async fn sidecar_fixture() -> anyhow::Result<SidecarFixture> {
    let cp = ControlPlane::start(ControlPlaneOpts::default())?;
    let app = EchoApp::start("app-b").await?;
    let b = Sidecar::start(&cp, SidecarOpts::new("sidecar-b", B_ID, app.addr)).await?;
    let token = cp.create_token(CLIENT_ID, "1h")?;
    let (svid, _) = fetch_svid(&cp, &token).await?;
    let client = write_client_svid(&svid, cp.dir.path(), "client")?;
    Ok(SidecarFixture {
        b,
        client,
        _app: app,
        cp,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verifies_a_trellis_sidecar_with_tls13_and_h2() -> anyhow::Result<()> {
    e2e(async {
        let f = sidecar_fixture().await?;
        let mut a = args(f.b.addrs.inbound, &f.cp.bundle_pem_path, &[]);
        a.extend(cert_args(&f.client));
        let run = inspect(a.clone()).await?;
        ensure!(run.code() == Some(0), "{}", run.describe());
        let r = run.json()?;
        ensure!(
            r["ok"] == true && r["verified"] == true,
            "{}",
            run.describe()
        );
        ensure!(
            r["reason"].is_null() && r["refused_by"].is_null(),
            "{}",
            run.describe()
        );
        ensure!(r["peer_spiffe_id"] == B_ID, "{}", run.describe());
        ensure!(r["tls_version"] == "TLSv1.3", "{}", run.describe());
        ensure!(r["alpn"] == "h2", "{}", run.describe());
        ensure!(
            r["cipher_suite"]
                .as_str()
                .is_some_and(|s| s.starts_with("TLS13_")),
            "{}",
            run.describe()
        );
        ensure!(r["trust_domain"] == "example.org", "{}", run.describe());
        ensure!(r["trust_domain_source"] == "bundle", "{}", run.describe());
        ensure!(
            r["client_cert"]["presented"] == CLIENT_ID,
            "{}",
            run.describe()
        );
        ensure!(r["client_cert"]["requested"] == true, "{}", run.describe());
        ensure!(r["client_cert"]["accepted"] == true, "{}", run.describe());
        ensure!(
            r["tcp_connect_ms"].is_f64() && r["handshake_ms"].is_f64(),
            "{}",
            run.describe()
        );
        // The chain: the leaf, with its validity window and SPIFFE ID.
        let leaf = &r["peer_chain"][0];
        ensure!(leaf["spiffe_ids"][0] == B_ID, "{}", run.describe());
        ensure!(leaf["is_ca"] == false, "{}", run.describe());
        ensure!(
            leaf["not_before_unix"].as_i64() < leaf["not_after_unix"].as_i64(),
            "{}",
            run.describe()
        );
        ensure!(
            leaf["not_after"].as_str().is_some_and(|s| s.ends_with('Z')),
            "{}",
            run.describe()
        );
        ensure!(
            leaf["serial"].as_str().is_some_and(|s| !s.is_empty()),
            "{}",
            run.describe()
        );

        // The same with the exact expected ID, in human form.
        let mut human = vec![
            f.b.addrs.inbound.to_string(),
            "--bundle".into(),
            f.cp.bundle_pem_path.to_string_lossy().into_owned(),
            "--spiffe-id".into(),
            B_ID.into(),
        ];
        human.extend(cert_args(&f.client));
        let run = inspect(human).await?;
        println!("--- trellis inspect (sidecar, OK) ---\n{}", run.stdout);
        ensure!(run.code() == Some(0), "{}", run.describe());
        let verdict = run.stdout.lines().last().unwrap_or_default();
        ensure!(
            verdict.starts_with(&format!("OK: verified {B_ID} (TLSv1.3, TLS13_"))
                && verdict.contains(", h2) in "),
            "verdict line: {verdict}\n{}",
            run.describe()
        );
        for key in [
            "tls version",
            "cipher suite",
            "alpn",
            "peer chain",
            "client cert",
        ] {
            ensure!(
                run.stdout.lines().any(|l| l.starts_with(key)),
                "no `{key}` line:\n{}",
                run.describe()
            );
        }
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_refuses_a_client_without_certificate() -> anyhow::Result<()> {
    e2e(async {
        let f = sidecar_fixture().await?;
        let run = inspect(args(f.b.addrs.inbound, &f.cp.bundle_pem_path, &[])).await?;
        let r = expect_failure(&run, "no_cert", Some("server"))?;
        // The sidecar itself verified fine: only our missing certificate is at fault.
        ensure!(r["verified"] == true, "{}", run.describe());
        ensure!(r["peer_spiffe_id"] == B_ID, "{}", run.describe());
        ensure!(r["alert"] == "certificate_required", "{}", run.describe());
        ensure!(
            r["client_cert"]["requested"] == true && r["client_cert"]["accepted"] == false,
            "{}",
            run.describe()
        );
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_refuses_a_client_certificate_from_another_ca() -> anyhow::Result<()> {
    e2e(async {
        let f = sidecar_fixture().await?;
        let rogue = InitCa::create("example.org", &f.cp.dir.path().join("rogue-ca"))?;
        let pem =
            rogue.sign_leaf_with_rcgen(&LeafOpts::new(CLIENT_ID), f.cp.dir.path(), "rogue")?;
        let files = client_files_from(&pem, f.cp.dir.path(), "rogue")?;
        let mut a = args(f.b.addrs.inbound, &f.cp.bundle_pem_path, &[]);
        a.extend(cert_args(&files));
        let run = inspect(a).await?;
        let r = expect_failure(&run, "bad_certificate", Some("server"))?;
        ensure!(r["verified"] == true, "{}", run.describe());
        ensure!(r["client_cert"]["accepted"] == false, "{}", run.describe());
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verifies_a_stock_envoy_listener() -> anyhow::Result<()> {
    e2e(async {
        let Some(envoy_bin) = envoy_or_skip("verifies_a_stock_envoy_listener") else {
            return Ok(());
        };
        let dir = tempfile::tempdir()?;
        let issuer = K8sIssuer::new()?;
        let k8s = issuer.write_jwks(&dir.path().join("jwks.json"))?;
        let jwt = issuer.token("default", "web")?;
        let cp = ControlPlane::start_in(
            dir,
            ControlPlaneOpts {
                k8s: Some(k8s),
                ..Default::default()
            },
        )?;
        let token = cp.create_token(CLIENT_ID, "1h")?;
        let (svid, _) = fetch_svid(&cp, &token).await?;
        let client = write_client_svid(&svid, cp.dir.path(), "client")?;

        // tests/envoy/sds-bootstrap.yaml: listener `tls` serves Envoy's SDS SVID and requires a
        // client certificate under the SDS ROOTCA bundle.
        let tls_port = free_port();
        let bootstrap = render_template(
            ENVOY_BOOTSTRAP,
            &[
                ("SDS_PORT", &cp.sds_addr.port().to_string()),
                ("TLS_PORT", &tls_port.to_string()),
                ("PLAIN_PORT", &free_port().to_string()),
                ("BUNDLE_PEM", &cp.bundle_pem_path.to_string_lossy()),
                ("CONTROL_ID", cp.control_id().as_str()),
                ("WORKLOAD_ID", ENVOY_ID),
                ("TOKEN", &jwt),
            ],
        )?;
        let bootstrap_path = cp.dir.path().join("envoy.yaml");
        std::fs::write(&bootstrap_path, bootstrap)?;
        Envoy::validate(&envoy_bin, &bootstrap_path)?;
        let envoy = Envoy::start(&envoy_bin, &bootstrap_path, cp.dir.path())?;
        let tls_addr: SocketAddr = ([127, 0, 0, 1], tls_port).into();

        let mut a = args(
            tls_addr,
            &cp.bundle_pem_path,
            &["--spiffe-id", ENVOY_ID, "--timeout", "3s"],
        );
        a.extend(cert_args(&client));
        let run = eventually(ENVOY_WARMUP, "Envoy's TLS listener to verify", || {
            let a = a.clone();
            async move {
                let run = inspect(a).await?;
                ensure!(run.code() == Some(0), "{}", run.describe());
                Ok(run)
            }
        })
        .await
        .with_context(|| format!("envoy stderr:\n{}", envoy.child.stderr_tail(40)))?;
        let r = run.json()?;
        ensure!(r["peer_spiffe_id"] == ENVOY_ID, "{}", run.describe());
        ensure!(r["tls_version"] == "TLSv1.3", "{}", run.describe());
        // The listener sets no ALPN protocols.
        ensure!(r["alpn"].is_null(), "{}", run.describe());
        ensure!(r["client_cert"]["accepted"] == true, "{}", run.describe());

        // Envoy (BoringSSL) refuses a client without a certificate.
        let run = inspect(args(tls_addr, &cp.bundle_pem_path, &[])).await?;
        let r = expect_failure(&run, "no_cert", Some("server"))?;
        ensure!(r["verified"] == true, "{}", run.describe());
        println!("Envoy without a client certificate: alert {}", r["alert"]);
        Ok(())
    })
    .await
}

/// A `trellis ca init` CA (the bundle `inspect` trusts), openssl, and a directory for PEM files.
struct Pki {
    openssl: PathBuf,
    ca: InitCa,
    dir: TempDir,
}

fn pki(test: &str) -> anyhow::Result<Option<Pki>> {
    let Some(openssl) = tool_or_skip(test, "openssl") else {
        return Ok(None);
    };
    let dir = tempfile::tempdir()?;
    let ca = InitCa::create("example.org", &dir.path().join("ca"))?;
    Ok(Some(Pki { openssl, ca, dir }))
}

/// `openssl s_server -www` presenting `pem` (leaf, key, intermediates) on a port it picks.
struct SServer {
    addr: SocketAddr,
    _child: Child,
}

fn s_server(pki: &Pki, pem: &PemFiles, extra: &[&str]) -> anyhow::Result<SServer> {
    let mut cmd = Command::new(&pki.openssl);
    cmd.args(["s_server", "-accept", "127.0.0.1:0", "-www", "-cert"])
        .arg(&pem.cert)
        .arg("-key")
        .arg(&pem.key)
        .args(extra);
    if let Some(chain) = &pem.intermediates {
        cmd.arg("-cert_chain").arg(chain);
    }
    let mut child = Child::spawn("s_server", cmd, pki.dir.path())?;
    // It prints `ACCEPT 127.0.0.1:PORT` once listening (after a line about DH parameters).
    let deadline = std::time::Instant::now() + STARTUP_TIMEOUT;
    loop {
        let line = child
            .stdout_line(STARTUP_TIMEOUT)
            .with_context(|| format!("s_server stderr:\n{}", child.stderr_tail(20)))?;
        if let Some(addr) = line.strip_prefix("ACCEPT ") {
            let addr = addr.trim().parse()?;
            return Ok(SServer {
                addr,
                _child: child,
            });
        }
        if std::time::Instant::now() > deadline {
            bail!("s_server printed no ACCEPT line");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuses_a_server_signed_by_an_unknown_ca() -> anyhow::Result<()> {
    e2e(async {
        let Some(pki) = pki("refuses_a_server_signed_by_an_unknown_ca")? else {
            return Ok(());
        };
        let rogue = InitCa::create("example.org", &pki.dir.path().join("rogue"))?;
        let pem = rogue.sign_leaf_with_rcgen(&LeafOpts::new(SERVER_ID), pki.dir.path(), "rogue")?;
        let server = s_server(&pki, &pem, &[])?;
        let run = inspect(args(server.addr, &pki.ca.bundle(), &[])).await?;
        let r = expect_failure(&run, "unknown_ca", Some("client"))?;
        ensure!(r["verified"] == false, "{}", run.describe());
        // The chain is reported even though it does not verify.
        ensure!(r["peer_spiffe_id"] == SERVER_ID, "{}", run.describe());
        ensure!(
            r["peer_chain"].as_array().map(Vec::len) == Some(2),
            "{}",
            run.describe()
        );

        let mut human = args(server.addr, &pki.ca.bundle(), &[]);
        human.retain(|a| a != "--json");
        let run = inspect(human).await?;
        println!("--- trellis inspect (unknown CA) ---\n{}", run.stdout);
        let verdict = run.stdout.lines().last().unwrap_or_default();
        ensure!(
            verdict
                == "FAILED (client refused): the peer's certificate is signed by a CA not in the bundle (unknown_ca)",
            "verdict line: {verdict}"
        );
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuses_an_expired_server_certificate() -> anyhow::Result<()> {
    e2e(async {
        let Some(pki) = pki("refuses_an_expired_server_certificate")? else {
            return Ok(());
        };
        let opts = LeafOpts {
            expired: true,
            ..LeafOpts::new(SERVER_ID)
        };
        let pem = pki
            .ca
            .sign_leaf_with_rcgen(&opts, pki.dir.path(), "expired")?;
        let server = s_server(&pki, &pem, &[])?;
        let run = inspect(args(server.addr, &pki.ca.bundle(), &[])).await?;
        let r = expect_failure(&run, "expired", Some("client"))?;
        ensure!(
            r["peer_chain"][0]["not_after"] == "2020-01-02T00:00:00Z",
            "{}",
            run.describe()
        );
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuses_a_server_with_the_wrong_spiffe_id() -> anyhow::Result<()> {
    e2e(async {
        let Some(pki) = pki("refuses_a_server_with_the_wrong_spiffe_id")? else {
            return Ok(());
        };
        let pem =
            pki.ca
                .sign_leaf_with_rcgen(&LeafOpts::new(SERVER_ID), pki.dir.path(), "server")?;
        let server = s_server(&pki, &pem, &[])?;
        // Any ID in the trust domain: fine.
        let run = inspect(args(server.addr, &pki.ca.bundle(), &[])).await?;
        ensure!(run.code() == Some(0), "{}", run.describe());
        // This exact one: refused.
        let run = inspect(args(server.addr, &pki.ca.bundle(), &["--spiffe-id", B_ID])).await?;
        let r = expect_failure(&run, "wrong_identity", Some("client"))?;
        ensure!(r["expected_spiffe_id"] == B_ID, "{}", run.describe());
        ensure!(r["peer_spiffe_id"] == SERVER_ID, "{}", run.describe());
        let detail = r["detail"].as_str().unwrap_or_default();
        ensure!(
            detail.contains(SERVER_ID) && detail.contains(B_ID),
            "the detail names both IDs: {detail}"
        );
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuses_a_server_certificate_without_spiffe_id() -> anyhow::Result<()> {
    e2e(async {
        let Some(pki) = pki("refuses_a_server_certificate_without_spiffe_id")? else {
            return Ok(());
        };
        let opts = LeafOpts {
            uris: Vec::new(),
            ..LeafOpts::new(SERVER_ID)
        };
        let pem = pki
            .ca
            .sign_leaf_with_rcgen(&opts, pki.dir.path(), "no-id")?;
        let server = s_server(&pki, &pem, &[])?;
        let run = inspect(args(server.addr, &pki.ca.bundle(), &[])).await?;
        let r = expect_failure(&run, "no_spiffe_id", Some("client"))?;
        ensure!(r["peer_spiffe_id"].is_null(), "{}", run.describe());
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls12_only_server_is_protocol_version() -> anyhow::Result<()> {
    e2e(async {
        let Some(pki) = pki("tls12_only_server_is_protocol_version")? else {
            return Ok(());
        };
        let pem =
            pki.ca
                .sign_leaf_with_rcgen(&LeafOpts::new(SERVER_ID), pki.dir.path(), "server")?;
        let server = s_server(&pki, &pem, &["-tls1_2"])?;
        let run = inspect(args(server.addr, &pki.ca.bundle(), &[])).await?;
        let r = expect_failure(&run, "protocol_version", Some("server"))?;
        ensure!(r["alert"] == "protocol_version", "{}", run.describe());
        ensure!(r["tls_version"].is_null(), "{}", run.describe());

        // Offering TLS 1.2 too gets through, and says so.
        let run = inspect(args(server.addr, &pki.ca.bundle(), &["--tls12"])).await?;
        ensure!(run.code() == Some(0), "{}", run.describe());
        let r = run.json()?;
        ensure!(r["tls_version"] == "TLSv1.2", "{}", run.describe());
        ensure!(r["peer_spiffe_id"] == SERVER_ID, "{}", run.describe());
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_server_is_not_tls() -> anyhow::Result<()> {
    e2e(async {
        let ca_dir = tempfile::tempdir()?;
        let ca = InitCa::create("example.org", &ca_dir.path().join("ca"))?;
        // An app port: the mistake of pointing inspect past the sidecar.
        let app = EchoApp::start("app").await?;
        let run = inspect(args(app.addr, &ca.bundle(), &[])).await?;
        let r = expect_failure(&run, "not_tls", None)?;
        ensure!(r["tls_version"].is_null(), "{}", run.describe());
        println!("plain HTTP: {}", r["detail"]);
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_listening_is_connect_refused() -> anyhow::Result<()> {
    e2e(async {
        let ca_dir = tempfile::tempdir()?;
        let ca = InitCa::create("example.org", &ca_dir.path().join("ca"))?;
        let addr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0")?;
            l.local_addr()?
        };
        let run = inspect(args(addr, &ca.bundle(), &[])).await?;
        let r = expect_failure(&run, "connect_refused", None)?;
        ensure!(r["tcp_connect_ms"].is_null(), "{}", run.describe());
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_peer_is_timeout() -> anyhow::Result<()> {
    e2e(async {
        let ca_dir = tempfile::tempdir()?;
        let ca = InitCa::create("example.org", &ca_dir.path().join("ca"))?;
        // The kernel completes the TCP handshake from the backlog; nobody ever reads.
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let run = inspect(args(addr, &ca.bundle(), &["--timeout", "1s"])).await?;
        let r = expect_failure(&run, "timeout", None)?;
        ensure!(r["tcp_connect_ms"].is_f64(), "{}", run.describe());
        drop(listener);
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_usage_exits_2_naming_the_file() -> anyhow::Result<()> {
    e2e(async {
        let dir = tempfile::tempdir()?;
        let ca = InitCa::create("example.org", &dir.path().join("ca"))?;
        let missing = dir.path().join("missing.pem");
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "not PEM")?;
        let target = "127.0.0.1:1".to_owned();
        let bundle = ca.bundle().to_string_lossy().into_owned();
        let cases: Vec<(Vec<String>, String)> = vec![
            (
                vec![
                    target.clone(),
                    "--bundle".into(),
                    missing.to_string_lossy().into(),
                ],
                format!("--bundle {}", missing.display()),
            ),
            (
                vec![
                    target.clone(),
                    "--bundle".into(),
                    garbage.to_string_lossy().into(),
                ],
                format!("--bundle {}", garbage.display()),
            ),
            (
                vec![
                    target.clone(),
                    "--bundle".into(),
                    bundle.clone(),
                    "--cert".into(),
                    ca.intermediate().to_string_lossy().into(),
                    "--key".into(),
                    missing.to_string_lossy().into(),
                ],
                format!("--key {}", missing.display()),
            ),
            (
                // The intermediate's key is not the root's.
                vec![
                    target.clone(),
                    "--bundle".into(),
                    bundle.clone(),
                    "--cert".into(),
                    ca.dir.join("root.pem").to_string_lossy().into(),
                    "--key".into(),
                    ca.intermediate_key().to_string_lossy().into(),
                ],
                "does not match".to_owned(),
            ),
            (
                vec!["localhost".into(), "--bundle".into(), bundle.clone()],
                "HOST:PORT".to_owned(),
            ),
            (
                vec![
                    target.clone(),
                    "--bundle".into(),
                    bundle.clone(),
                    "--spiffe-id".into(),
                    "web".into(),
                ],
                "--spiffe-id".to_owned(),
            ),
            (
                vec![
                    target.clone(),
                    "--bundle".into(),
                    bundle,
                    "--cert".into(),
                    "x.pem".into(),
                ],
                "--key".to_owned(),
            ),
        ];
        for (args, want) in cases {
            let run = inspect(args.clone()).await?;
            ensure!(
                run.code() == Some(2),
                "{args:?}: want exit 2\n{}",
                run.describe()
            );
            ensure!(
                run.stderr.contains(&want),
                "{args:?}: stderr does not mention `{want}`\n{}",
                run.describe()
            );
            ensure!(
                run.stdout.is_empty(),
                "{args:?}: no report on bad usage\n{}",
                run.describe()
            );
        }
        Ok(())
    })
    .await
}
