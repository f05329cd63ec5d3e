//! The SPIFFE Workload API in the sidecar (issue #20), with clients nobody here wrote: the Rust
//! `spiffe` crate (`WorkloadApiClient`, `X509Source`) and py-spiffe (PyPI `spiffe`), plus raw
//! gRPC calls for the refusals.
//!
//! ```text
//!  trellis control ──SDS──▶ sidecar --workload-api-socket DIR/workload.sock ◀──unix── spiffe crate / py-spiffe
//! ```

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{anyhow, bail, ensure, Context as _};
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use spiffe::{TrustDomain, WorkloadApiClient, X509Source};
use tonic::transport::{Endpoint, Uri};
use trellis_identity::Svid;
use trellis_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use trellis_proto::workload::{X509BundlesRequest, X509svidRequest};
use trellis_tests::sidecar::{Sidecar, SidecarOpts};
use trellis_tests::{e2e, run_with_timeout, ControlPlane, ControlPlaneOpts, COMMAND_TIMEOUT};

use crate::protocols::venv_python_with;

pub(crate) const ID: &str = "spiffe://example.org/ns/demo/sa/spiffe-app";

/// A sidecar for [`ID`] serving the Workload API at `<cp dir>/spiffe/workload.sock`.
pub(crate) async fn sidecar_with_socket(
    cp: &ControlPlane,
    extra: &[&str],
) -> anyhow::Result<(Sidecar, PathBuf)> {
    let dir = cp.dir.path().join("spiffe");
    std::fs::create_dir(&dir)?;
    let socket = dir.join("workload.sock");
    let opts = SidecarOpts::new("sidecar", ID, "127.0.0.1:9".parse()?)
        .args(&[
            "--workload-api-socket",
            socket.to_str().context("utf-8 path")?,
        ])
        .args(extra);
    Ok((Sidecar::start(cp, opts).await?, socket))
}

/// True if `key` (PKCS#8 DER) is the private half of `chain`'s leaf (the check the sidecar
/// makes before installing an SVID).
fn key_matches_leaf(chain: &[&[u8]], key: &[u8]) -> bool {
    let chain = chain
        .iter()
        .map(|c| CertificateDer::from(c.to_vec()))
        .collect();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.to_vec()));
    Svid::new(chain, key).is_ok()
}

fn serial(svid: &spiffe::X509Svid) -> anyhow::Result<String> {
    let facts =
        trellis_identity::cert_facts(&CertificateDer::from(svid.leaf().as_bytes().to_vec()))
            .map_err(|e| anyhow!("{e}"))?;
    Ok(facts.serial_hex)
}

/// `message` with the security header.
pub(crate) fn with_header<T>(message: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(message);
    req.metadata_mut().insert(
        "workload.spiffe.io",
        tonic::metadata::MetadataValue::from_static("true"),
    );
    req
}

/// A raw tonic channel to the socket: no interceptor, so no security header unless the test
/// adds it.
pub(crate) async fn raw_client(
    socket: &Path,
) -> anyhow::Result<SpiffeWorkloadApiClient<tonic::transport::Channel>> {
    let socket = socket.to_owned();
    let channel = Endpoint::try_from("http://workload.sock")?
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(
                    tokio::net::UnixStream::connect(socket).await?,
                ))
            }
        }))
        .await?;
    Ok(SpiffeWorkloadApiClient::new(channel))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spiffe_crate_fetches_the_svid_and_sees_rotations() -> anyhow::Result<()> {
    e2e(async {
        // 10 s SVIDs rotated every second: a rotation reaches an open stream within seconds.
        let cp = ControlPlane::start(ControlPlaneOpts {
            svid_ttl: Some("10s".into()),
            rotate_every: Some("1s".into()),
            ..Default::default()
        })?;
        let (_sidecar, socket) = sidecar_with_socket(&cp, &["--expiry-margin", "2s"]).await?;
        let endpoint = format!("unix://{}", socket.display());

        let started = std::time::Instant::now();
        let client = WorkloadApiClient::connect_to(&endpoint).await?;
        let svid = client.fetch_x509_svid().await?;
        println!("connect + fetch_x509_svid: {:?}", started.elapsed());
        ensure!(
            svid.spiffe_id().to_string() == ID,
            "got {}",
            svid.spiffe_id()
        );
        let chain: Vec<&[u8]> = svid.cert_chain().iter().map(|c| c.as_bytes()).collect();
        ensure!(
            key_matches_leaf(&chain, svid.private_key().as_bytes()),
            "the key the Workload API served is not the leaf's"
        );

        // The bundle: exactly the control plane's CA(s), for the sidecar's trust domain.
        let bundles = client.fetch_x509_bundles().await?;
        let td = TrustDomain::new("example.org")?;
        let bundle = bundles.get(&td).context("no bundle for example.org")?;
        let want: Vec<Vec<u8>> = cp.bundle()?.roots().iter().map(|c| c.to_vec()).collect();
        let got: Vec<Vec<u8>> = bundle
            .authorities()
            .iter()
            .map(|c| c.as_bytes().to_vec())
            .collect();
        ensure!(
            got == want,
            "bundle: {} CAs, want the control plane's {}",
            got.len(),
            want.len()
        );

        // X509Source follows the stream: the SVID it holds changes as the control plane rotates.
        let source = X509Source::builder().endpoint(&endpoint).build().await?;
        let first = serial(source.svid()?.as_ref())?;
        let mut updates = source.updated();
        let waiting = std::time::Instant::now();
        let rotated = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                updates.changed().await?;
                let svid = source.svid()?;
                let now = serial(svid.as_ref())?;
                if now != first {
                    let chain: Vec<&[u8]> =
                        svid.cert_chain().iter().map(|c| c.as_bytes()).collect();
                    ensure!(
                        key_matches_leaf(&chain, svid.private_key().as_bytes()),
                        "rotated key is not the leaf's"
                    );
                    return Ok::<_, anyhow::Error>(now);
                }
            }
        })
        .await
        .context("X509Source saw no rotation within 20 s")??;
        println!(
            "X509Source: serial {first} rotated to {rotated} after {:?} (the control plane rotates every 1 s)",
            waiting.elapsed()
        );
        source.shutdown().await;
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn py_spiffe_fetches_svid_and_bundles() -> anyhow::Result<()> {
    e2e(async {
        let test = "py_spiffe_fetches_svid_and_bundles";
        let Some(python) = venv_python_with(test, "spiffe") else {
            return Ok(());
        };
        let cp = ControlPlane::start(ControlPlaneOpts::default())?;
        let (_sidecar, socket) = sidecar_with_socket(&cp, &[]).await?;
        let run = |mode: &str| -> anyhow::Result<serde_json::Value> {
            let mut cmd = Command::new(&python);
            cmd.arg(trellis_tests::workspace_root().join("tests/fixtures/spiffe_client.py"))
                .arg(mode)
                .arg(&socket);
            let out = run_with_timeout(cmd, COMMAND_TIMEOUT)?;
            if !out.status.success() {
                bail!(
                    "spiffe_client.py {mode}: {}\n{}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            let line = String::from_utf8_lossy(&out.stdout);
            serde_json::from_str(line.trim())
                .with_context(|| format!("spiffe_client.py said {line:?}"))
        };

        let got = run("x509")?;
        ensure!(got["spiffe_id"] == ID, "py-spiffe: {got}");
        ensure!(
            got["key_matches_leaf"] == true,
            "py-spiffe: key does not match the leaf: {got}"
        );
        ensure!(got["chain_len"].as_u64() >= Some(1), "py-spiffe: {got}");
        let cas = cp.bundle()?.roots().len() as u64;
        ensure!(
            got["bundles"]["example.org"].as_u64() == Some(cas),
            "py-spiffe bundles: {got}, want {cas} CAs"
        );

        // grpcio without the security header: InvalidArgument, as the spec requires.
        let refused = run("no-header")?;
        ensure!(
            refused["code"] == "INVALID_ARGUMENT",
            "no header: {refused}"
        );
        ensure!(
            refused["details"]
                .as_str()
                .is_some_and(|d| d.contains("workload.spiffe.io")),
            "no header: the reason names the header: {refused}"
        );
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_security_header_is_invalid_argument_and_counted() -> anyhow::Result<()> {
    e2e(async {
        let cp = ControlPlane::start(ControlPlaneOpts::default())?;
        let (sidecar, socket) = sidecar_with_socket(&cp, &[]).await?;
        let mut raw = raw_client(&socket).await?;
        let status = raw.fetch_x509svid(X509svidRequest {}).await.unwrap_err();
        ensure!(
            status.code() == tonic::Code::InvalidArgument,
            "FetchX509SVID without header: {status:?}"
        );
        let status = raw
            .fetch_x509_bundles(X509BundlesRequest {})
            .await
            .unwrap_err();
        ensure!(
            status.code() == tonic::Code::InvalidArgument,
            "FetchX509Bundles without header: {status:?}"
        );
        // The wrong value is no better than none.
        let mut req = tonic::Request::new(X509svidRequest {});
        req.metadata_mut()
            .insert("workload.spiffe.io", "yes".parse()?);
        let status = raw.fetch_x509svid(req).await.unwrap_err();
        ensure!(
            status.code() == tonic::Code::InvalidArgument,
            "header `yes`: {status:?}"
        );
        // With it, the same raw client gets the SVID.
        let mut req = tonic::Request::new(X509svidRequest {});
        req.metadata_mut()
            .insert("workload.spiffe.io", "true".parse()?);
        let first = raw
            .fetch_x509svid(req)
            .await?
            .into_inner()
            .message()
            .await?
            .context("no message")?;
        ensure!(
            first.svids.len() == 1 && first.svids[0].spiffe_id == ID,
            "{:?}",
            first.svids.len()
        );

        let metrics = sidecar.metrics().await?;
        let refused = metrics.sum(
            "trellis_workload_api_requests_total",
            &[("result", "missing_security_header")],
        );
        ensure!(refused == 3.0, "refusals counted: {refused}, want 3");
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn before_the_first_svid_svid_stream_waits_and_bundles_answer() -> anyhow::Result<()> {
    e2e(async {
        let cp = ControlPlane::start(ControlPlaneOpts::default())?;
        let dir = cp.dir.path().join("spiffe");
        std::fs::create_dir(&dir)?;
        let socket = dir.join("workload.sock");
        // A join token the control plane never issued: the sidecar keeps asking, never gets an SVID.
        let mut opts = SidecarOpts::new("sidecar", ID, "127.0.0.1:9".parse()?).args(&[
            "--workload-api-socket",
            socket.to_str().context("utf-8 path")?,
        ]);
        opts.join_token = Some("trellis-join.bogus".into());
        let _sidecar = Sidecar::start_unready(&cp, opts)?;

        let mut raw = raw_client(&socket).await?;
        // Bundles: the bootstrap bundle, at once (spec: the first response "as soon as possible").
        let mut bundles = raw
            .fetch_x509_bundles(with_header(X509BundlesRequest {}))
            .await?
            .into_inner();
        let first = tokio::time::timeout(Duration::from_secs(10), bundles.message())
            .await
            .context("no bundle message")??
            .context("bundle stream ended")?;
        ensure!(
            first.bundles.contains_key("spiffe://example.org"),
            "keys: {:?}",
            first.bundles.keys()
        );
        // SVIDs: the stream is open, but nothing arrives (and no error: the sidecar will have one).
        let mut svids = raw
            .fetch_x509svid(with_header(X509svidRequest {}))
            .await?
            .into_inner();
        let waited = tokio::time::timeout(Duration::from_secs(2), svids.message()).await;
        ensure!(
            waited.is_err(),
            "want no message and no error before the first SVID, got {waited:?}"
        );
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_in_missing_directory_is_a_clear_startup_error_and_socket_goes_on_exit(
) -> anyhow::Result<()> {
    e2e(async {
        let cp = ControlPlane::start(ControlPlaneOpts::default())?;
        let missing = cp.dir.path().join("no-such-dir/workload.sock");
        let token = cp.create_token(ID, "1h")?;
        let mut cmd = Command::new(trellis_tests::trellis_bin());
        cmd.arg("sidecar")
            .args(["--trust-domain", "example.org"])
            .args(["--control-plane", &cp.sds_addr.to_string()])
            .arg("--control-bundle")
            .arg(&cp.bundle_pem_path)
            .args([
                "--inbound",
                "127.0.0.1:0",
                "--outbound",
                "127.0.0.1:0",
                "--admin",
                "127.0.0.1:0",
            ])
            .arg("--workload-api-socket")
            .arg(&missing)
            .env("TRELLIS_JOIN_TOKEN", token);
        let out = run_with_timeout(cmd, COMMAND_TIMEOUT)?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(
            !out.status.success(),
            "started with a socket in a missing directory"
        );
        ensure!(
            stderr.contains("no-such-dir") && stderr.contains("does not exist"),
            "the error names the directory: {stderr}"
        );

        // A good path: mode 0660 while serving, gone after SIGTERM.
        let (mut sidecar, socket) = sidecar_with_socket(&cp, &[]).await?;
        use std::os::unix::fs::{FileTypeExt as _, PermissionsExt as _};
        let meta = std::fs::symlink_metadata(&socket)?;
        ensure!(meta.file_type().is_socket(), "not a socket");
        ensure!(
            meta.permissions().mode() & 0o777 == 0o660,
            "mode {:o}",
            meta.permissions().mode() & 0o777
        );
        let status = sidecar.stop(Duration::from_secs(20)).await?;
        ensure!(status.success(), "exit {status}");
        ensure!(!socket.exists(), "socket left behind after exit");
        Ok(())
    })
    .await
}

/// A CA rotation reaches streams that are already open: `trellis ca rotate` adds the next root
/// to the bundle (prepared phase), the control plane pushes it over SDS, and both an open
/// `FetchX509Bundles` stream (the `spiffe` crate's `stream_x509_bundles`) and an open
/// `FetchX509SVID` stream deliver the two-root bundle without being reopened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_rotation_reaches_open_streams() -> anyhow::Result<()> {
    use tokio_stream::StreamExt as _;
    e2e(async {
        let cp = ControlPlane::start(ControlPlaneOpts::default())?;
        let (_sidecar, socket) = sidecar_with_socket(&cp, &[]).await?;
        let client = WorkloadApiClient::connect_to(format!("unix://{}", socket.display())).await?;
        let td = TrustDomain::new("example.org")?;
        let mut bundles = Box::pin(client.stream_x509_bundles().await?);
        let first = bundles.next().await.context("bundle stream ended")??;
        let cas = |set: &spiffe::X509BundleSet| set.get(&td).map_or(0, |b| b.authorities().len());
        ensure!(cas(&first) == 1, "before: {} CAs", cas(&first));
        let mut raw = raw_client(&socket).await?;
        let mut svids = raw
            .fetch_x509svid(with_header(X509svidRequest {}))
            .await?
            .into_inner();
        let svid_first = svids.message().await?.context("svid stream ended")?;

        crate::reliability_ca::ca_rotate(&cp, &["--activate-after", "1h"])?;
        let started = std::time::Instant::now();
        let two = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                let set = bundles.next().await.context("bundle stream ended")??;
                if cas(&set) == 2 {
                    return Ok::<_, anyhow::Error>(set);
                }
            }
        })
        .await
        .context("no two-root bundle on the open stream within 20 s")??;
        println!(
            "open FetchX509Bundles stream got the two-root bundle {:?} after `ca rotate`",
            started.elapsed()
        );
        let want = cp.bundle()?.roots().len();
        ensure!(
            cas(&two) == want,
            "stream has {} CAs, bundle.pem {want}",
            cas(&two)
        );
        // The SVID stream's message carries the new bundle too (same SVID, longer bundle).
        let next = tokio::time::timeout(Duration::from_secs(20), svids.message())
            .await
            .context("no new FetchX509SVID message")??
            .context("svid stream ended")?;
        ensure!(
            next.svids[0].bundle.len() > svid_first.svids[0].bundle.len(),
            "the SVID message's bundle did not grow"
        );
        Ok(())
    })
    .await
}
